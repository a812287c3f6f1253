//! The human-readable job report, written to `jobs/<id>/report.txt` and shown
//! by `flotilla status`.

use std::fmt::Write;

use crate::record::JobRecord;

/// How many output lines per instance the report shows.
pub const REPORT_TAIL_LINES: usize = 10;

pub fn render(record: &JobRecord) -> String {
    render_with_tail(record, REPORT_TAIL_LINES)
}

pub fn render_with_tail(record: &JobRecord, tail: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "job {}: {}", record.job_id, record.state);
    let _ = writeln!(out, "reason: {}", record.reason);
    for warning in &record.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    if let Some(plan) = &record.plan {
        let cost = plan.max_cost_usd.map(|c| format!("${c:.2} at most")).unwrap_or_else(|| "unknown price".to_string());
        let market = match plan.market {
            crate::spec::Market::OnDemand => "on-demand",
            crate::spec::Market::Spot => "spot",
        };
        let _ = writeln!(
            out,
            "plan: {} x {} ({market}); {}; cost {cost}",
            plan.instance_count, plan.instance_type, plan.sizing
        );
    }
    let _ = writeln!(out, "timeline:");
    for (index, stamp) in record.timeline.iter().enumerate() {
        let took = record
            .timeline
            .get(index + 1)
            .map(|next| format!(" ({:.1}s)", (next.at - stamp.at).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_default();
        let _ = writeln!(out, "  {}  {}{took}", stamp.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"), stamp.state);
    }
    if !record.instances.is_empty() {
        let _ = writeln!(out, "instances:");
        for instance in &record.instances {
            let _ = writeln!(
                out,
                "  shard {} {} {} {}",
                instance.shard_index, instance.instance_id, instance.availability_zone, instance.state
            );
        }
    }
    if !record.volumes.is_empty() {
        let _ = writeln!(out, "volumes:");
        for v in &record.volumes {
            let fate = if v.deleted {
                "deleted"
            } else if v.detached {
                "detached"
            } else {
                "attached"
            };
            let _ = writeln!(out, "  {} {} on {} at {} ({fate})", v.name, v.volume_id, v.instance_id, v.device);
        }
    }
    for step in &record.steps {
        let took = step
            .finished_at
            .map(|f| format!(" in {:.1}s", (f - step.dispatched_at).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_default();
        let status = match step.succeeded {
            Some(true) => "succeeded",
            Some(false) => "FAILED",
            None => "in progress",
        };
        let _ = writeln!(out, "phase {}: {status}{took} [{}]", step.phase.as_str(), step.command_ids.join(", "));
        // Every instance's output sits under the command's prefix; name it once.
        if let Some(uri) = step.invocations.iter().find_map(|i| i.output_uri.as_deref()) {
            if let Some(command_id) = step.command_ids.first() {
                if let Some(end) = uri.find(command_id.as_str()) {
                    let _ = writeln!(out, "  full output: {}{command_id}/<instance>/", &uri[..end]);
                }
            }
        }
        for invocation in &step.invocations {
            let code = invocation.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".to_string());
            let _ = writeln!(out, "  {} {} exit {code}", invocation.instance_id, invocation.status);
            let skip = invocation.output_tail.len().saturating_sub(tail);
            for line in &invocation.output_tail[skip..] {
                let _ = writeln!(out, "    | {line}");
            }
        }
    }
    if !record.snapshots.is_empty() {
        let _ = writeln!(out, "snapshots:");
        for s in &record.snapshots {
            let _ = writeln!(out, "  {} of {} ({})", s.snapshot_id, s.volume_id, s.volume_name);
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
