//! Dispatch and collect SSM Run Command phases: mount, setup, run,
//! before_unmount, unmount. A phase that fails, times out or is cancelled
//! skips the work phases that follow; cleanup phases still run.

use chrono::Duration;

use crate::error::StepError;
use crate::lifecycle::{self, next_phase, Event};
use crate::ports::{Cloud, CommandRequest, InvocationView, Ports, MAX_INSTANCES_PER_COMMAND};
use crate::record::{Invocation, JobRecord, Outcome, Phase, StepRun};
use crate::shell::{self, MountTarget, Preamble};
use crate::spec::{CommandSpec, VolumeSource};
use crate::steps::Next;

/// Lines of output kept in the record; the full output is in S3.
pub const OUTPUT_TAIL_LINES: usize = 50;
/// How long past its own timeout a command may stay unreported before we cancel it.
const REPORT_GRACE_SECONDS: i64 = 120;
/// Mount and unmount get this long; they wait at most 60 s for a device.
const VOLUME_OP_TIMEOUT_SECONDS: u32 = 600;

pub async fn advance(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<Next, StepError> {
    let now = ports.clock.now();
    let Some(phase) = next_phase(record) else {
        lifecycle::apply(record, Event::PhasesDone, now)?;
        return Ok(Next::Now);
    };
    let aborted = record.outcome.is_some_and(|o| o != Outcome::Succeeded);
    let Some(step) = record.step(phase).cloned() else {
        dispatch(ports, cloud, record, phase).await?;
        return Ok(Next::Poll);
    };
    if step.command_ids.is_empty() {
        // Claimed by a delivery that crashed before SendCommand returned.
        dispatch(ports, cloud, record, phase).await?;
        return Ok(Next::Poll);
    }
    // A cancel or deadline stops a work phase at once.
    if aborted && !phase.runs_after_failure() {
        for command_id in &step.command_ids {
            cloud.commands.cancel(command_id).await?;
        }
        finish(record, phase, vec![], false, now);
        return Ok(Next::Now);
    }
    let chunks: Vec<Vec<String>> =
        record.instance_ids().chunks(MAX_INSTANCES_PER_COMMAND).map(<[String]>::to_vec).collect();
    let mut views = Vec::new();
    for (command_id, instance_ids) in step.command_ids.iter().zip(&chunks) {
        views.extend(cloud.commands.invocations(command_id, instance_ids).await?);
    }
    let done = views.len() == record.instances.len() && views.iter().all(InvocationView::is_finished);
    let timeout = Duration::seconds(i64::from(phase_timeout(record, phase)) + REPORT_GRACE_SECONDS);
    if !done && now < step.dispatched_at + timeout {
        let finished = views.iter().filter(|v| v.is_finished()).count();
        record.reason = format!("{}: {finished}/{} instances finished", phase.as_str(), record.instances.len());
        return Ok(Next::Poll);
    }
    if !done {
        // SSM never reported: treat as a timeout and stop the command.
        for command_id in &step.command_ids {
            cloud.commands.cancel(command_id).await?;
        }
    }
    let invocations: Vec<Invocation> = record
        .instance_ids()
        .into_iter()
        .map(|instance_id| match views.iter().find(|v| v.instance_id == instance_id) {
            Some(view) if view.is_finished() => to_invocation(view),
            _ => Invocation {
                instance_id,
                status: "TimedOut".to_string(),
                exit_code: None,
                output_tail: vec![],
                output_uri: None,
            },
        })
        .collect();
    let succeeded = invocations.iter().all(|i| i.status == "Success");
    if !succeeded {
        let reason = failure_reason(record, phase, &invocations);
        if phase.runs_after_failure() {
            // Cleanup trouble is reported but does not undo the decided outcome.
            if record.outcome.is_none() || record.outcome == Some(Outcome::Succeeded) {
                lifecycle::apply(record, Event::Abort { outcome: Outcome::Failed, reason }, now)?;
            }
        } else {
            lifecycle::apply(record, Event::Abort { outcome: Outcome::Failed, reason }, now)?;
        }
    }
    finish(record, phase, invocations, succeeded, now);
    Ok(Next::Now)
}

fn finish(
    record: &mut JobRecord,
    phase: Phase,
    invocations: Vec<Invocation>,
    succeeded: bool,
    now: chrono::DateTime<chrono::Utc>,
) {
    if let Some(step) = record.step_mut(phase) {
        step.invocations = invocations;
        step.finished_at = Some(now);
        step.succeeded = Some(succeeded);
    }
}

fn failure_reason(record: &JobRecord, phase: Phase, invocations: &[Invocation]) -> String {
    let failed: Vec<&Invocation> = invocations.iter().filter(|i| i.status != "Success").collect();
    let first = failed[0];
    let what = match (first.status.as_str(), first.exit_code) {
        ("TimedOut", _) => format!("timed out after {} s", phase_timeout(record, phase)),
        (_, Some(code)) if code >= 0 => format!("exited {code}"),
        (status, _) => status.to_ascii_lowercase(),
    };
    format!(
        "{} failed on {}/{} instance(s): {} {what}",
        phase.as_str(),
        failed.len(),
        invocations.len(),
        first.instance_id
    )
}

fn to_invocation(view: &InvocationView) -> Invocation {
    let mut lines: Vec<String> = view.stdout.lines().map(str::to_string).collect();
    lines.extend(view.stderr.lines().map(|l| format!("[stderr] {l}")));
    let skip = lines.len().saturating_sub(OUTPUT_TAIL_LINES);
    Invocation {
        instance_id: view.instance_id.clone(),
        status: view.status.clone(),
        exit_code: view.exit_code,
        output_tail: lines.split_off(skip),
        output_uri: view.output_uri.clone(),
    }
}

fn phase_spec(record: &JobRecord, phase: Phase) -> Option<&CommandSpec> {
    let spec = record.spec.as_ref()?;
    match phase {
        Phase::Setup => spec.setup.as_ref(),
        Phase::Run => Some(&spec.run),
        Phase::BeforeUnmount => spec.before_unmount.as_ref(),
        Phase::Mount | Phase::Unmount => None,
    }
}

fn phase_timeout(record: &JobRecord, phase: Phase) -> u32 {
    phase_spec(record, phase).map(|c| c.timeout_seconds).unwrap_or(VOLUME_OP_TIMEOUT_SECONDS)
}

/// Send the phase's command, or adopt one a crashed delivery already sent.
async fn dispatch(ports: &Ports, cloud: &Cloud, record: &mut JobRecord, phase: Phase) -> Result<(), StepError> {
    let now = ports.clock.now();
    let lines = phase_lines(record, phase);
    let ids = record.instance_ids();
    let mut command_ids = Vec::new();
    for (chunk_index, chunk) in ids.chunks(MAX_INSTANCES_PER_COMMAND).enumerate() {
        let comment = format!("flotilla {} {} {chunk_index}", record.job_id, phase.as_str());
        if let Some(existing) = cloud.commands.find_by_comment(&chunk[0], &comment).await? {
            command_ids.push(existing);
            continue;
        }
        let request = CommandRequest {
            instance_ids: chunk.to_vec(),
            lines: lines.clone(),
            timeout_seconds: phase_timeout(record, phase),
            comment,
            output_bucket: ports.ledger.bucket().to_string(),
            // Outside jobs/: the SSM agent writes output without an SSE header.
            output_prefix: format!("outputs/{}/{}", record.job_id, phase.as_str()),
        };
        command_ids.push(cloud.commands.send(&request).await?);
    }
    record.steps.retain(|s| s.phase != phase);
    record.steps.push(StepRun {
        phase,
        command_ids,
        dispatched_at: now,
        finished_at: None,
        invocations: vec![],
        succeeded: None,
    });
    record.reason = format!("{} dispatched to {} instance(s)", phase.as_str(), ids.len());
    Ok(())
}

fn phase_lines(record: &JobRecord, phase: Phase) -> Vec<String> {
    let empty = Default::default();
    let spec = record.spec.as_ref();
    let env = spec.map(|s| &s.env).unwrap_or(&empty);
    let instances = record.instance_ids();
    let mounts: Vec<(String, String)> =
        spec.map(|s| s.volumes.iter().map(|v| (v.name.clone(), v.mount_point.clone())).collect()).unwrap_or_default();
    let items = spec.and_then(|s| match s.fleet {
        crate::spec::FleetSpec::Sized { items, .. } => Some(items),
        crate::spec::FleetSpec::Count { .. } => None,
    });
    let preamble = Preamble { job_id: &record.job_id, instances: &instances, env, mounts: &mounts, items };
    let targets: Vec<MountTarget> = spec
        .map(|s| {
            s.volumes
                .iter()
                .map(|v| MountTarget {
                    name: v.name.clone(),
                    device: v.device.clone(),
                    mount_point: v.mount_point.clone(),
                    volume_by_instance: record
                        .volumes
                        .iter()
                        .filter(|e| e.name == v.name)
                        .map(|e| (e.instance_id.clone(), e.volume_id.clone()))
                        .collect(),
                    format_if_blank: matches!(v.source, VolumeSource::New { .. }),
                })
                .collect()
        })
        .unwrap_or_default();
    match phase {
        Phase::Mount => shell::mount_script(&preamble, &targets),
        Phase::Unmount => shell::unmount_script(&preamble, &targets),
        _ => match phase_spec(record, phase) {
            Some(command) => shell::step_script(&preamble, command),
            None => vec!["true".to_string()],
        },
    }
}
