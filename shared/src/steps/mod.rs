//! The steps that drive a job, one per queue. Each is idempotent under
//! duplicate delivery and under a crash between any two cloud calls:
//!
//! 1. A message carries the record's `step_seq`; any other value is stale.
//! 2. A step observes the cloud, does idempotent work (find-or-create by tag,
//!    ClientTokens), and changes state only through `lifecycle::apply`.
//! 3. It writes the record with a compare-and-swap, bumping `step_seq` and
//!    putting the next message in the record's outbox, then sends it. Of two
//!    racing deliveries only one write lands; the loser reloads and finds its
//!    message stale. If the sender crashed before sending, the redelivered
//!    message finds `step_seq` one ahead and sends the outbox again; a
//!    duplicate that causes is stale at the next step.

pub mod command;
pub mod intake;
pub mod launch;
pub mod readiness;
pub mod teardown;

use tracing::{info, warn};

use crate::error::{CloudError, StepError};
use crate::lifecycle::{self, abort_reason, next_step, Event, Step, StepMessage};
use crate::ports::{Cloud, Ports, WriteOutcome};
use crate::record::{JobRecord, Outbox};

/// Compare-and-swap attempts before handing the message back to SQS.
const MAX_WRITE_ATTEMPTS: usize = 4;

/// What a step wants after its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on at once with the step for the (possibly new) state.
    Now,
    /// Observe again after a delay.
    Poll,
    /// Observe again after this many seconds.
    After(u32),
}

/// Outcome of handling one step message, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Advanced {
        state: String,
    },
    /// Duplicate or out-of-date message; nothing done.
    Stale,
    /// The step had written but maybe not sent; its outbox was sent again.
    Resent,
}

/// Handle one step message against the ports.
pub async fn handle(ports: &Ports, message: &StepMessage) -> Result<Handled, StepError> {
    for _ in 0..MAX_WRITE_ATTEMPTS {
        let Some(loaded) = ports.ledger.load(&message.job_id).await? else {
            return Err(StepError::RecordMissing(message.job_id.clone()));
        };
        let record = &loaded.record;
        if record.step_seq == message.seq + 1 {
            if let Some(outbox) = &record.outbox {
                // Our write landed; the send after it may not have. Only a
                // record that stopped moving means the message was lost.
                let quiet = i64::from(outbox.delay_seconds + ports.settings.outbox_grace_seconds);
                let stalled =
                    record.updated_at.is_none_or(|at| ports.clock.now() - at >= chrono::Duration::seconds(quiet));
                if !stalled {
                    return Err(StepError::OutboxPending(message.job_id.clone()));
                }
                ports.queue.send(&outbox.message, outbox.delay_seconds).await?;
                return Ok(Handled::Resent);
            }
        }
        if record.state.is_terminal() || record.step_seq != message.seq {
            return Ok(Handled::Stale);
        }
        if next_step(record.state) != Some(message.step) {
            return Ok(Handled::Stale);
        }
        let mut record = record.clone();
        let now = ports.clock.now();
        let assumed =
            match record.spec.as_ref().and_then(|s| s.role_arn.as_deref().map(|r| (r, s.external_id.as_deref()))) {
                Some((role_arn, external_id)) => {
                    Some(ports.accounts.assume(role_arn, external_id, &record.job_id).await)
                }
                None => None,
            };
        let cloud: &Cloud = match &assumed {
            Some(Ok(cloud)) => cloud,
            _ => &ports.cloud,
        };
        let result = match &assumed {
            Some(Err(err)) => Err(StepError::Cloud(CloudError::api(
                "sts",
                "AssumeRole",
                err.code().unwrap_or("InvalidRole"),
                &err.to_string(),
            ))),
            _ => advance(ports, cloud, &mut record, message.step).await,
        };
        let next = match result {
            Ok(next) => next,
            Err(StepError::Cloud(err)) if !err.is_retryable() => {
                warn!(job_id = %record.job_id, error = %err, "permanent cloud error");
                permanent_error(&mut record, message.step, &err.to_string(), now)?
            }
            Err(err) => return Err(err),
        };
        record.updated_at = Some(now);
        record.step_seq += 1;
        record.outbox = next_step(record.state).map(|step| Outbox {
            message: StepMessage { job_id: record.job_id.clone(), step, seq: record.step_seq },
            // SQS caps DelaySeconds at 900.
            delay_seconds: match next {
                Next::Now => 0,
                Next::Poll => ports.settings.poll_delay_seconds,
                Next::After(seconds) => seconds,
            }
            .min(900),
        });
        match ports.ledger.replace(&record, &loaded.version).await? {
            WriteOutcome::Written { .. } => {
                if let Some(outbox) = &record.outbox {
                    ports.queue.send(&outbox.message, outbox.delay_seconds).await?;
                }
                info!(job_id = %record.job_id, state = %record.state, reason = %record.reason, "step {}", message.step.as_str());
                return Ok(Handled::Advanced { state: record.state.to_string() });
            }
            WriteOutcome::Conflict => {
                info!(job_id = %record.job_id, "record changed underneath; reloading");
                undo_lost_side_effects(ports, cloud, &loaded.record, &record).await;
                continue;
            }
        }
    }
    Err(StepError::Contended(message.job_id.clone()))
}

/// Retrying will not help. Before teardown: fail the job and tear down what
/// exists. During teardown: back off a few times, then give up on the part
/// that fails and leave its tagged resources to the reaper.
fn permanent_error(
    record: &mut JobRecord,
    step: Step,
    error: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Next, StepError> {
    use crate::record::{JobState, Outcome};
    let reason = format!("{} failed: {error}", step.as_str());
    if !matches!(record.state, JobState::Snapshotting | JobState::TearingDown) {
        lifecycle::apply(record, Event::Abort { outcome: Outcome::Failed, reason }, now)?;
        return Ok(Next::Now);
    }
    record.teardown_errors += 1;
    if record.teardown_errors < TEARDOWN_ATTEMPTS {
        record.reason = format!("{reason} (attempt {} of {TEARDOWN_ATTEMPTS})", record.teardown_errors);
        return Ok(Next::After(TEARDOWN_BACKOFF_SECONDS * record.teardown_errors));
    }
    let reason = format!("{reason}; left for the reaper");
    lifecycle::apply(record, Event::Abort { outcome: Outcome::Failed, reason }, now)?;
    let event = if record.state == JobState::Snapshotting { Event::VolumesReleased } else { Event::FleetTerminated };
    lifecycle::apply(record, event, now)?;
    Ok(Next::Now)
}

const TEARDOWN_ATTEMPTS: u32 = 5;
const TEARDOWN_BACKOFF_SECONDS: u32 = 30;

async fn advance(ports: &Ports, cloud: &Cloud, record: &mut JobRecord, step: Step) -> Result<Next, StepError> {
    let now = ports.clock.now();
    if let Some((outcome, reason)) = abort_reason(record, now) {
        info!(job_id = %record.job_id, %reason, "stopping early");
        lifecycle::apply(record, Event::Abort { outcome, reason }, now)?;
        if next_step(record.state) != Some(step) {
            return Ok(Next::Now);
        }
    }
    match step {
        Step::Launch => launch::advance(ports, cloud, record).await,
        Step::Readiness => readiness::advance(ports, cloud, record).await,
        Step::Command => command::advance(ports, cloud, record).await,
        Step::Teardown => teardown::advance(ports, cloud, record).await,
    }
}

/// A racing delivery won the write. Commands, snapshots and volumes this
/// delivery created that the winner did not record would run twice or leak:
/// cancel or delete them. (EC2 ClientTokens make most volume races moot.)
async fn undo_lost_side_effects(ports: &Ports, cloud: &Cloud, before: &JobRecord, ours: &JobRecord) {
    let winner = match ports.ledger.load(&ours.job_id).await {
        Ok(Some(latest)) => latest.record,
        _ => return, // cannot tell what the winner kept; leave it to the reaper
    };
    let commands = |r: &JobRecord| r.steps.iter().flat_map(|s| s.command_ids.clone()).collect::<Vec<_>>();
    let (known, kept) = (commands(before), commands(&winner));
    for command_id in commands(ours).into_iter().filter(|id| !known.contains(id) && !kept.contains(id)) {
        if let Err(err) = cloud.commands.cancel(&command_id).await {
            warn!(%command_id, error = %err, "could not cancel a duplicate command");
        }
    }
    let snapshots = |r: &JobRecord| r.snapshots.iter().map(|s| s.snapshot_id.clone()).collect::<Vec<_>>();
    let (known, kept) = (snapshots(before), snapshots(&winner));
    for snapshot_id in snapshots(ours).into_iter().filter(|id| !known.contains(id) && !kept.contains(id)) {
        if let Err(err) = cloud.volumes.delete_snapshot(&snapshot_id).await {
            warn!(%snapshot_id, error = %err, "could not delete a duplicate snapshot");
        }
    }
    let volumes = |r: &JobRecord| {
        r.volumes
            .iter()
            .filter(|v| v.created_by_flotilla)
            .map(|v| (v.volume_id.clone(), v.instance_id.clone()))
            .collect::<Vec<_>>()
    };
    let (known, kept) = (volumes(before), volumes(&winner));
    for (volume_id, instance_id) in
        volumes(ours).into_iter().filter(|v| !known.contains(v) && !kept.iter().any(|k| k.0 == v.0))
    {
        let _ = cloud.volumes.detach(&volume_id, &instance_id, false).await;
        if let Err(err) = cloud.volumes.delete_volume(&volume_id).await {
            warn!(%volume_id, error = %err, "could not delete a duplicate volume; the reaper will");
        }
    }
}
