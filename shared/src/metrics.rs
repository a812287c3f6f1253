//! CloudWatch metrics in the embedded metric format (EMF): one top-level
//! JSON object per line on stdout, which Lambda sends to CloudWatch Logs,
//! where the metrics are extracted. No PutMetricData call, nothing added to
//! a pass's time. A metric inside a `tracing` JSON line would not be
//! extracted, so these lines are printed, never logged.
//!
//! Dimensioned by stack; `FLOTILLA_METRICS_BY_JOB_NAME=true` adds a
//! (stack, job name) set: every combination is a billed custom metric.

use serde_json::{json, Map, Value};

use crate::record::{EndCause, JobRecord, JobState};

pub const NAMESPACE: &str = "Flotilla";

/// CloudWatch's units for the figures Flotilla emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Seconds,
    /// Dollars have no CloudWatch unit.
    None,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Seconds => "Seconds",
            Unit::None => "None",
        }
    }
}

/// One figure: its name, unit and value.
pub type Figure = (&'static str, Unit, f64);

/// The EMF line for `figures`, at `timestamp_ms`.
pub fn line(stack: &str, job_name: Option<&str>, figures: &[Figure], timestamp_ms: i64) -> String {
    let mut dimensions = vec![json!(["Stack"])];
    let mut root = Map::new();
    root.insert("Stack".into(), json!(stack));
    if let Some(name) = job_name {
        dimensions.push(json!(["Stack", "JobName"]));
        root.insert("JobName".into(), json!(name));
    }
    let metrics: Vec<Value> =
        figures.iter().map(|(name, unit, _)| json!({"Name": name, "Unit": unit.as_str()})).collect();
    for (name, _, value) in figures {
        root.insert((*name).into(), json!(value));
    }
    root.insert(
        "_aws".into(),
        json!({"Timestamp": timestamp_ms, "CloudWatchMetrics": [{
            "Namespace": NAMESPACE, "Dimensions": dimensions, "Metrics": metrics,
        }]}),
    );
    Value::Object(root).to_string()
}

/// Print `figures` as one EMF line: only in a Lambda function (Lambda,
/// and cargo lambda locally, set AWS_LAMBDA_FUNCTION_NAME), so the
/// simulator and the tests, which run the same code, print none.
pub fn emit(stack: &str, job_name: Option<&str>, figures: &[Figure]) {
    if figures.is_empty() || std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_none() {
        return;
    }
    let by_name = std::env::var("FLOTILLA_METRICS_BY_JOB_NAME").is_ok_and(|v| v == "true");
    let now = chrono::Utc::now().timestamp_millis();
    println!("{}", line(stack, job_name.filter(|_| by_name), figures, now));
}

/// A job's figures at its end: its outcome, time to fleet ready, run
/// time, retries, replacements, spot interruptions, capacity failovers
/// and realized cost.
pub fn job_ended(record: &JobRecord) -> Vec<Figure> {
    let outcome = match record.state {
        JobState::Succeeded => "JobsSucceeded",
        JobState::Failed => "JobsFailed",
        JobState::Cancelled => "JobsCancelled",
        JobState::Rejected => return vec![("JobsRejected", Unit::Count, 1.0)],
        _ => return vec![],
    };
    let attempts: Vec<_> = record.shards.iter().flat_map(|s| &s.attempts).collect();
    let ended = |cause: EndCause| attempts.iter().filter(|a| a.end.as_ref().is_some_and(|e| e.cause == cause)).count();
    let stamp = |state: JobState| record.timeline.iter().find(|s| s.state == state).map(|s| s.at);
    let stopped = record.updated_at.unwrap_or(record.submitted_at);
    let mut figures = vec![
        (outcome, Unit::Count, 1.0),
        ("Retries", Unit::Count, attempts.len().saturating_sub(record.shards.len()) as f64),
        ("Replacements", Unit::Count, (ended(EndCause::InstanceLost) + ended(EndCause::AgentNeverOnline)) as f64),
        ("SpotInterruptions", Unit::Count, ended(EndCause::SpotInterruption) as f64),
        ("CapacityFailovers", Unit::Count, ended(EndCause::Capacity) as f64),
    ];
    if let Some(running) = stamp(JobState::Running) {
        figures.push(("TimeToFleetReady", Unit::Seconds, (running - record.submitted_at).num_seconds() as f64));
        figures.push(("RunTime", Unit::Seconds, (stopped - running).num_seconds().max(0) as f64));
    }
    if let Some(usd) = crate::report::realized(record).usd {
        figures.push(("RealizedCostUsd", Unit::None, usd));
    }
    figures
}
