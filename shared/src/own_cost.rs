//! What Flotilla itself costs per job, beside the fleet it runs: Lambda
//! requests and GB-seconds, SQS requests, S3 requests, EventBridge events
//! and log ingestion. Pure: `make bench` feeds it the simulator's counters,
//! the report the job record's own (`passes`, `writes`, `busy_ms`).

use serde::Serialize;

use crate::record::JobRecord;

/// The goal: a fault-free 10-instance job costs Flotilla under a tenth of a cent.
pub const GOAL_USD: f64 = 0.001;

/// us-east-1 list prices (December 2026), free tiers ignored.
pub mod rates {
    /// Lambda on arm64 (the deployed architecture), per GB-second.
    pub const LAMBDA_GB_SECOND: f64 = 0.000_013_333_4;
    pub const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    /// Standard and FIFO queues are within 25%: the dearer FIFO price is taken.
    pub const SQS_REQUEST: f64 = 0.50 / 1e6;
    /// S3 Standard PUT, COPY, POST and LIST requests.
    pub const S3_WRITE: f64 = 0.005 / 1e3;
    /// S3 Standard GET and other reads.
    pub const S3_READ: f64 = 0.0004 / 1e3;
    /// EventBridge custom events (each 64 KB chunk).
    pub const EVENT: f64 = 1.00 / 1e6;
    /// CloudWatch Logs ingestion, per byte (USD 0.50 per GB).
    pub const LOG_BYTE: f64 = 0.50 / 1e9;
}

/// The template's `MemorySize` for every function.
pub const MEMORY_MB: u64 = 256;

/// Log bytes per invocation: the runtime's START/END/REPORT lines (about
/// 350 bytes) and one JSON line of the pass's outcome and metrics (about 650).
pub const LOG_BYTES_PER_INVOCATION: u64 = 1_000;

/// SQS requests per message: the send, the poller's receive and its delete.
pub const SQS_REQUESTS_PER_MESSAGE: u64 = 3;

/// What a job made Flotilla do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub invocations: u64,
    /// Billed Lambda milliseconds, mostly spent awaiting AWS's answers.
    pub busy_ms: u64,
    pub sqs_messages: u64,
    pub s3_writes: u64,
    pub s3_reads: u64,
    pub events: u64,
}

/// Its price, part by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct OwnCost {
    pub lambda_requests_usd: f64,
    pub lambda_compute_usd: f64,
    pub sqs_usd: f64,
    pub s3_writes_usd: f64,
    pub s3_reads_usd: f64,
    pub events_usd: f64,
    pub logs_usd: f64,
    pub total_usd: f64,
}

pub fn price(usage: &Usage) -> OwnCost {
    let gb_seconds = usage.busy_ms as f64 / 1000.0 * MEMORY_MB as f64 / 1024.0;
    let mut cost = OwnCost {
        lambda_requests_usd: usage.invocations as f64 * rates::LAMBDA_REQUEST,
        lambda_compute_usd: gb_seconds * rates::LAMBDA_GB_SECOND,
        sqs_usd: (usage.sqs_messages * SQS_REQUESTS_PER_MESSAGE) as f64 * rates::SQS_REQUEST,
        s3_writes_usd: usage.s3_writes as f64 * rates::S3_WRITE,
        s3_reads_usd: usage.s3_reads as f64 * rates::S3_READ,
        events_usd: usage.events as f64 * rates::EVENT,
        logs_usd: (usage.invocations * LOG_BYTES_PER_INVOCATION) as f64 * rates::LOG_BYTE,
        total_usd: 0.0,
    };
    cost.total_usd = cost.lambda_requests_usd
        + cost.lambda_compute_usd
        + cost.sqs_usd
        + cost.s3_writes_usd
        + cost.s3_reads_usd
        + cost.events_usd
        + cost.logs_usd;
    cost
}

/// What the record itself counted: one invocation, wake message and record
/// read per pass (plus intake's), every write of the record, its notices.
/// Output copies, index entries and the notify function's own requests are
/// not in the record, so this is a floor of what `make bench` counts.
pub fn from_record(record: &JobRecord) -> Usage {
    let invocations = record.passes + 1;
    Usage {
        invocations,
        busy_ms: record.busy_ms,
        sqs_messages: invocations,
        s3_writes: record.writes,
        s3_reads: record.passes,
        events: record.announced.as_ref().map_or(0, |a| a.sequence),
    }
}

/// One line for the report: the total and where most of it goes.
pub fn summary(cost: &OwnCost) -> String {
    let parts = [
        ("S3 writes", cost.s3_writes_usd),
        ("Lambda", cost.lambda_requests_usd + cost.lambda_compute_usd),
        ("SQS", cost.sqs_usd),
        ("logs", cost.logs_usd),
        ("events", cost.events_usd),
        ("S3 reads", cost.s3_reads_usd),
    ];
    let largest = parts.iter().copied().fold(("", 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let share = if cost.total_usd > 0.0 { largest.1 / cost.total_usd * 100.0 } else { 0.0 };
    format!("${:.4} (goal ${GOAL_USD:.3} for a 10-instance job; {:.0}% of it {})", cost.total_usd, share, largest.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_record_writes_cost_half_a_cent() {
        let usage = Usage { s3_writes: 1000, ..Usage::default() };
        assert!((price(&usage).total_usd - 0.005).abs() < 1e-12);
        // A second of a 256 MB function: a quarter GB-second.
        let usage = Usage { busy_ms: 1000, invocations: 1, ..Usage::default() };
        let cost = price(&usage);
        assert!((cost.lambda_compute_usd - 0.25 * rates::LAMBDA_GB_SECOND).abs() < 1e-15);
        assert!((cost.logs_usd - 1000.0 * rates::LOG_BYTE).abs() < 1e-15);
        assert!(summary(&cost).contains("Lambda"), "{}", summary(&cost));
    }
}
