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

use crate::error::StepError;
use crate::lifecycle::{self, abort_reason, next_step, Event, Step, StepMessage};
use crate::ports::{Ports, WriteOutcome};
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
    Advanced { state: String },
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
                // Our write landed; the send after it may not have.
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
        let next = match advance(ports, &mut record, message.step).await {
            Ok(next) => next,
            Err(StepError::Cloud(err)) if !err.is_retryable() => {
                // Retrying will not help: fail the job and tear down what exists.
                warn!(job_id = %record.job_id, error = %err, "permanent cloud error; failing the job");
                let reason = format!("{} failed: {err}", message.step.as_str());
                lifecycle::apply(&mut record, Event::Abort { outcome: crate::record::Outcome::Failed, reason }, now)?;
                Next::Now
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
                cancel_unrecorded_commands(ports, &loaded.record, &record).await;
                continue;
            }
        }
    }
    Err(StepError::Contended(message.job_id.clone()))
}

async fn advance(ports: &Ports, record: &mut JobRecord, step: Step) -> Result<Next, StepError> {
    let now = ports.clock.now();
    if let Some((outcome, reason)) = abort_reason(record, now) {
        info!(job_id = %record.job_id, %reason, "stopping early");
        lifecycle::apply(record, Event::Abort { outcome, reason }, now)?;
        if next_step(record.state) != Some(step) {
            return Ok(Next::Now);
        }
    }
    match step {
        Step::Launch => launch::advance(ports, record).await,
        Step::Readiness => readiness::advance(ports, record).await,
        Step::Command => command::advance(ports, record).await,
        Step::Teardown => teardown::advance(ports, record).await,
    }
}

/// A racing delivery won the write, so commands this delivery sent will never
/// be collected: cancel them rather than let the work run twice.
async fn cancel_unrecorded_commands(ports: &Ports, before: &JobRecord, after: &JobRecord) {
    let known: Vec<&String> = before.steps.iter().flat_map(|s| &s.command_ids).collect();
    for command_id in after.steps.iter().flat_map(|s| &s.command_ids).filter(|id| !known.contains(id)) {
        if let Err(err) = ports.commands.cancel(command_id).await {
            warn!(%command_id, error = %err, "could not cancel a duplicate command");
        }
    }
}
