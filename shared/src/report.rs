//! The human-readable job report, written to `jobs/<id>/report.txt` and shown
//! by `flotilla status`.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::plan::cents;
use crate::record::{Attempt, JobRecord};
use crate::spec::Market;

/// How many output lines per instance the report shows.
pub const REPORT_TAIL_LINES: usize = 10;

/// Shards listed one by one; a 1,000-shard report lists the first ones.
pub const MAX_SHARDS_SHOWN: usize = 50;

/// Output tails by (shard, attempt, phase), read from `jobs/<id>/output/`.
pub type Tails = BTreeMap<(u32, u32, String), Vec<String>>;

pub fn render(record: &JobRecord) -> String {
    render_with_tail(record, &Tails::new(), REPORT_TAIL_LINES)
}

/// The state a report shows: reports are written just before the terminal
/// record (`WriteReport`), so a decided outcome shows as its end state.
pub fn shown_state(record: &JobRecord) -> crate::record::JobState {
    match (record.state.is_terminal(), record.outcome) {
        (false, Some(outcome)) if record.shards.iter().all(|s| s.result.is_some()) => outcome.terminal_state(),
        _ => record.state,
    }
}

pub fn render_with_tail(record: &JobRecord, tails: &Tails, tail: usize) -> String {
    let mut out = String::new();
    let state = shown_state(record);
    let _ = writeln!(out, "job {}: {state}", record.job_id);
    let reason = match (&record.outcome_reason, state.is_terminal()) {
        (Some(reason), true) => reason.clone(),
        _ => record.reason.clone(),
    };
    let _ = writeln!(out, "reason: {reason}");
    if let Some(hold) = &record.hold {
        let now = record.updated_at.unwrap_or(record.submitted_at);
        let _ = writeln!(out, "debug hold: {}", hold.describe(&record.job_id, now));
    }
    if let (Some(stalled), false) = (&record.stalled, state.is_terminal()) {
        let _ = writeln!(out, "retrying after: {stalled}");
    }
    for warning in &record.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    if let Some(plan) = &record.plan {
        write_plan(&mut out, record, plan);
    }
    write_timeline(&mut out, record);
    let shown = record.shards.len().min(MAX_SHARDS_SHOWN);
    if !record.shards.is_empty() {
        let failed = record.shards.iter().filter(|s| s.result.as_ref().is_some_and(|r| !r.succeeded)).count();
        let retried = record.shards.iter().filter(|s| s.attempts.len() > 1).count();
        let _ = writeln!(
            out,
            "shards: {} ({} failed, {} with more than one attempt); showing {shown}",
            record.shards.len(),
            failed,
            retried
        );
    }
    for shard in record.shards.iter().take(shown) {
        let result = match &shard.result {
            Some(r) if r.succeeded => "succeeded".to_string(),
            Some(r) => format!("FAILED: {}", r.reason),
            None => "in progress".to_string(),
        };
        let _ = writeln!(out, "shard {}: {result}", shard.index);
        for attempt in &shard.attempts {
            write_attempt(&mut out, record, shard.index, attempt, tails, tail);
        }
        for note in &shard.trail {
            let _ = writeln!(out, "  why {}: {}", note.at.format("%H:%M:%S"), note.text);
        }
    }
    let snapshots = record.snapshots();
    if !snapshots.is_empty() {
        let _ = writeln!(out, "snapshots:");
        for (volume, id) in snapshots {
            let _ = writeln!(out, "  {id} ({volume})");
        }
    }
    if !record.pruned_snapshots.is_empty() {
        let _ = writeln!(out, "pruned past retention: {}", record.pruned_snapshots.join(", "));
    }
    if let Some(input) = &record.rejected_input {
        let _ = writeln!(out, "received: {}", input.chars().take(300).collect::<String>());
    }
    out
}

/// The plan: fleet, items, estimated and realized cost.
fn write_plan(out: &mut String, record: &JobRecord, plan: &crate::plan::Plan) {
    let cost = match &plan.estimate {
        Some(e) => format!(
            "estimated ${:.2} for {:.2} instance-hours (instances ${:.2}, volumes ${:.2}, snapshots ${:.2}; at most ${:.2})",
            e.total_usd, e.instance_hours, e.instances_usd, e.volumes_usd, e.snapshots_usd, e.max_usd
        ),
        None => format!("no price for {} in the price table", plan.instance_type),
    };
    let market = match plan.market {
        crate::spec::Market::OnDemand => "on-demand",
        crate::spec::Market::Spot => "spot",
    };
    let _ = writeln!(out, "plan: {} x {} ({market}); {}", plan.instance_count, plan.instance_type, plan.sizing);
    if let Some(items) = plan.items {
        let manifests = plan.manifests.as_deref().map(|m| format!(", manifests {m}<shard>.txt")).unwrap_or_default();
        let _ = writeln!(out, "items: {items} over {} shards{manifests}", plan.instance_count);
    }
    let _ = writeln!(out, "cost: {cost}");
    let realized = realized(record);
    let usd = realized.usd.map(|u| format!("${u:.2}")).unwrap_or_else(|| "unpriced".to_string());
    let _ = writeln!(
        out,
        "realized: {} instance-seconds ({:.2} instance-hours), {usd} from launch and terminate times",
        realized.instance_seconds,
        realized.instance_seconds as f64 / 3600.0
    );
    let own = crate::own_cost::from_record(record);
    let _ = writeln!(
        out,
        "flotilla's own cost: {} from {} passes, {} record writes, {:.1} s of Lambda",
        crate::own_cost::summary(&crate::own_cost::price(&own)),
        record.passes,
        record.writes,
        record.busy_ms as f64 / 1000.0
    );
}

/// Each state the job went through, and how long it stayed.
fn write_timeline(out: &mut String, record: &JobRecord) {
    let _ = writeln!(out, "timeline:");
    for (index, stamp) in record.timeline.iter().enumerate() {
        let took = record
            .timeline
            .get(index + 1)
            .map(|next| format!(" ({:.1}s)", (next.at - stamp.at).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_default();
        let _ = writeln!(out, "  {}  {}{took}", stamp.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"), stamp.state);
    }
}

/// One attempt of a shard: where it ran, its phases with their output
/// tails, its volumes and what became of them.
fn write_attempt(out: &mut String, record: &JobRecord, shard: u32, attempt: &Attempt, tails: &Tails, tail: usize) {
    let launch = record.launch_of(attempt);
    let market = match launch.market {
        crate::spec::Market::OnDemand => "on-demand",
        crate::spec::Market::Spot => "spot",
    };
    let ended = match &attempt.end {
        Some(e) if e.detail.is_empty() => format!(" -> {}", e.cause.as_str()),
        Some(e) => format!(" -> {}: {}", e.cause.as_str(), e.detail),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "  attempt {} {} {} {market} {}{ended}",
        attempt.number,
        attempt.instance_id.as_deref().unwrap_or("(not launched)"),
        launch.instance_type,
        attempt.availability_zone.as_deref().unwrap_or("")
    );
    if !attempt.completed_phases.is_empty() {
        let names: Vec<&str> = attempt.completed_phases.iter().map(|p| p.as_str()).collect();
        let _ = writeln!(out, "    phases succeeded: {}", names.join(", "));
        for phase in &attempt.completed_phases {
            if let Some(lines) = tails.get(&(shard, attempt.number, phase.as_str().to_string())) {
                let skip = lines.len().saturating_sub(tail);
                for line in &lines[skip..] {
                    let _ = writeln!(out, "      {} | {line}", phase.as_str());
                }
            }
        }
    }
    for run in &attempt.phases {
        let batch = record.commands.get(&run.batch);
        let took = match (run.finished_at, batch) {
            (Some(f), Some(b)) => {
                format!(" in {:.1}s", (f - b.dispatched_at).num_milliseconds() as f64 / 1000.0)
            }
            _ => String::new(),
        };
        let code = run.exit_code.map(|c| format!(" exit {c}")).unwrap_or_default();
        let status = run.status.as_ref().map_or("in progress", |s| s.as_str());
        let _ = writeln!(
            out,
            "    {} {status}{code}{took} [{}]",
            run.phase.as_str(),
            batch.and_then(|b| b.command_id.as_deref()).unwrap_or("-")
        );
        if let Some(lines) = tails.get(&(shard, attempt.number, run.phase.as_str().to_string())) {
            let skip = lines.len().saturating_sub(tail);
            for line in &lines[skip..] {
                let _ = writeln!(out, "      | {line}");
            }
        }
    }
    for v in &attempt.volumes {
        let fate = match (&v.kept, v.deleted) {
            (Some(why), _) => format!("kept: {why}"),
            (None, true) => "deleted".to_string(),
            (None, false) => "in use".to_string(),
        };
        let snapshot = v
            .snapshot
            .as_ref()
            .and_then(|s| s.snapshot_id.as_ref().map(|id| format!(", snapshot {id} {}", s.state)))
            .unwrap_or_default();
        let _ = writeln!(out, "    volume {} {} ({fate}{snapshot})", v.name, v.volume_id.as_deref().unwrap_or("-"));
    }
}

/// What a job's instances were billed for, from its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Realized {
    pub instance_seconds: u64,
    /// None when an attempt ran on a type the estimate had no price for.
    pub usd: Option<f64>,
}

/// Launch to stop of every attempt (still running ones up to the record's
/// last write), priced with the estimate's table in each attempt's market.
pub fn realized(record: &JobRecord) -> Realized {
    let until = record.updated_at.unwrap_or(record.submitted_at);
    let estimate = record.plan.as_ref().and_then(|p| p.estimate.as_ref());
    let mut instance_seconds = 0;
    let mut usd = Some(0.0);
    for attempt in record.shards.iter().flat_map(|s| s.attempts.iter()) {
        let Some(launched_at) = attempt.launched_at else { continue };
        // A debug hold bills on after the attempt: to its end, or the release
        // (counted whole once taken, so the report does not grow with it).
        let held = record.hold.as_ref().filter(|h| attempt.held_until.is_some() && h.since >= launched_at);
        let span = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
            (to - from).num_seconds().max(0) as u64
        };
        let seconds = match (attempt.billed_seconds.map(u64::from), held) {
            (Some(billed), Some(hold)) => billed + span(hold.since, hold.ends_at()),
            (Some(billed), None) => billed,
            (None, Some(hold)) => span(launched_at, hold.ends_at()),
            (None, None) => span(launched_at, until),
        };
        instance_seconds += seconds;
        let option = record.launch_of(attempt);
        let hourly = estimate.and_then(|e| {
            let quoted = e.spot_hourly_usd.get(&option.instance_type).filter(|_| option.market == Market::Spot);
            let on_demand = e.hourly_usd.get(&option.instance_type);
            let price = match (quoted, on_demand) {
                (Some(quoted), _) => *quoted,
                (None, Some(price)) if option.market == Market::Spot => price * e.spot_factor,
                (None, price) => *price?,
            };
            Some(price + e.volumes_hourly_usd)
        });
        usd = usd.zip(hourly).map(|(sum, hourly)| sum + hourly * seconds as f64 / 3600.0);
    }
    Realized { instance_seconds, usd: usd.map(cents) }
}
