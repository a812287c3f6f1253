//! Level-triggered reconciliation: every trigger (a poll, a submission, a
//! cancel, an EventBridge event, the safety tick) runs the same pass for one
//! job. Only the gate in front of the lease (`lease.rs`) reads which
//! trigger woke it; the pass never asks:
//!
//! 1. load the record and take its lease by compare-and-swap (`lease.rs`:
//!    one actor per job; a trigger that finds the lease held marks the
//!    record `woken`, and one `lease-end` wake waits out that lease);
//! 2. observe the cloud in a few batched calls;
//! 3. `decide` (pure) updates shard state and returns actions; the record,
//!    with every action's intent, is saved before any action runs;
//! 4. run the actions, fold their results in (`decide::apply`), save;
//! 5. repeat only while what it did unlocks the next step at once (a failed
//!    call, a launch, the record's last steps) and the time budget lasts, then
//!    release the lease and make sure one wake is on its way unless the job
//!    is terminal.
//!
//! A crash anywhere leaves intents in the record (tokens, comments, snapshot
//! requests) that the next pass completes without repeating; a lease that
//! outlives its crashed owner expires. Nothing is rolled back: a pass that
//! loses the lease stops, and its side effects are found again by token,
//! comment or tag.

mod account;
pub mod act;
mod backoff;
pub mod decide;
mod lease;
pub mod observe;
mod rounds;

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use tracing::{info, warn};

use crate::error::{CloudError, StepError};
use crate::fence;
pub use crate::inbox::update_inbox;
use crate::metrics;
use crate::ports::{Cloud, Ports, WriteOutcome};
use crate::record::{JobRecord, Outcome, Stage, Wake};
pub use crate::wake::{Trigger, WakeMessage};

pub use decide::{Action, Context, Next, Observation};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The job is terminal; nothing to do.
    Finished,
    /// Another pass holds the lease; the trigger was folded into the record.
    Busy,
    /// No record: a wake for a job that does not exist.
    Unknown,
    /// Nothing to do: a safety tick for a job whose poll is on its way, or a
    /// lease-end message for a pass that ended.
    Scheduled,
    /// An event right after a pass: kept in the record for the next.
    Deferred,
    Reconciled {
        state: String,
    },
}

/// Observe-decide-act rounds per pass. A round runs again only when what it
/// did can be used at once (see `Action::unlocks_at_once`): a cloud call's
/// effect shows seconds later or comes as an event, and looking again at
/// once would cost a whole observation for nothing.
const MAX_ROUNDS: usize = 4;
/// Passes in a row whose observation fails permanently before the job gives up.
const OBSERVE_FAILURES: u32 = 5;
/// A tick leaves a job alone while its scheduled poll is due within this
/// long: a poll that never came (lost to the dead-letter queue, or never
/// sent by a pass that crashed) is overdue, and the tick runs the pass.
pub(crate) const TICK_GRACE_SECONDS: i64 = 120;

/// One reconcile pass for one job, within `budget`.
pub async fn reconcile(ports: &Ports, message: &WakeMessage, budget: Duration) -> Result<Handled, StepError> {
    let started = ports.clock.now();
    let owner = uuid::Uuid::new_v4().simple().to_string();
    let lease_until = started + budget + Duration::seconds(fence::LEASE_MARGIN_SECONDS);

    // 1. The lease, behind the gate that reads the trigger.
    let (mut record, mut version, hinted) = match lease::take(ports, message, &owner, started, lease_until).await? {
        lease::Gate::Pass(taken) => *taken,
        lease::Gate::Done(handled) => return Ok(handled),
        lease::Gate::Flush(unsent) => return flush_terminal(ports, unsent.0, unsent.1).await,
    };

    // 2. The job's cloud: its own account, or the role it names.
    let assumed = match account::job_cloud(ports, &mut record).await? {
        account::JobCloud::Stop(next) => {
            return finish_pass(ports, &mut record, &mut version, &owner, next, started).await
        }
        assumed => assumed,
    };
    let cloud = match &assumed {
        account::JobCloud::Assumed(cloud) => cloud,
        _ => &ports.cloud,
    };

    // 3. Observe, decide, save, act and save, round after round.
    let pass = rounds::Pass { ports, cloud, owner: &owner, started, budget, lease_until };
    let focus: BTreeSet<String> = message.instances.iter().chain(&hinted).cloned().collect();
    let next = rounds::run(&pass, &mut record, &mut version, focus).await?;

    // 4. Release the lease, with one wake on its way unless the job is terminal.
    finish_pass(ports, &mut record, &mut version, &owner, next, started).await
}

/// How many of this round's mutating calls may run: all of them unless
/// admission control is on and the job acts in the deployment's account
/// (or the budget cannot be read).
async fn calls_granted(
    ports: &Ports,
    record: &JobRecord,
    own_account: bool,
    actions: &[decide::Action],
    now: DateTime<Utc>,
) -> Result<crate::admission::Grant, StepError> {
    let wanted = actions.iter().filter(|a| a.is_mutating()).count() as u32;
    if !(ports.settings.launch_admission && own_account) || wanted == 0 {
        return Ok(crate::admission::Grant { instances: wanted, retry_after_seconds: 0 });
    }
    match crate::admission::take_calls(ports.ledger.as_ref(), wanted, now).await {
        Ok(grant) => Ok(grant),
        // Open, not shut: an unreadable budget must never hold a teardown
        // back; EC2's throttling and the SDK's adaptive retry remain.
        Err(err) => {
            warn!(job_id = %record.job_id, error = %err, "budget of calls unavailable; calling without it");
            Ok(crate::admission::Grant { instances: wanted, retry_after_seconds: 0 })
        }
    }
}

/// Nothing more can be done from here: fail with the reason, and leave what
/// exists to the reaper (every resource carries expires-at).
fn give_up(record: &mut JobRecord, reason: &str, now: DateTime<Utc>) {
    record.outcome.get_or_insert(Outcome::Failed);
    record.outcome_reason.get_or_insert(reason.to_string());
    record.warnings.push(format!("{reason}; any resources left are for the reaper"));
    record.state = record.outcome.unwrap_or(Outcome::Failed).terminal_state();
    record.reason = record.outcome_reason.clone().unwrap_or_default();
    record.timeline.push(crate::record::PhaseStamp { state: record.state, at: now });
}

async fn resolve_image(cloud: &Cloud, record: &mut JobRecord) -> Result<(), CloudError> {
    let launching = record.shards.iter().filter_map(|s| s.current()).any(|a| a.stage == Stage::Launching);
    if record.resolved_image.is_some() || !launching || record.outcome.is_some() {
        return Ok(());
    }
    let Some(image) = record.spec.as_ref().and_then(|s| s.image.clone()) else { return Ok(()) };
    let resolved = if image.starts_with('/') { cloud.fleet.resolve_image(&image).await? } else { image };
    record.resolved_image = Some(resolved);
    Ok(())
}

/// Release the lease, make sure one wake is on its way, save.
async fn finish_pass(
    ports: &Ports,
    record: &mut JobRecord,
    version: &mut String,
    owner: &str,
    next: Next,
    started: DateTime<Utc>,
) -> Result<Handled, StepError> {
    let now = ports.clock.now();
    record.busy_ms += (now - started).num_milliseconds().max(0) as u64;
    // The notices, under the lease: saved, sent, then cleared by the save below.
    flush_outbox(ports, record, version, owner).await?;
    record.lease = None;
    let mut send = None;
    // A trigger came during this pass: the next one comes a gap after it.
    let soon = decide::pass_gap(record.shards.len()).max(1);
    let woken = record.woken;
    if let (false, Next::After(seconds)) = (record.state.is_terminal(), next) {
        // SQS caps DelaySeconds at 900.
        let seconds = if woken { seconds.min(soon) } else { seconds.min(900) };
        let due = now + Duration::seconds(i64::from(seconds));
        let pending = record.wake.as_ref().is_some_and(|w| w.at > now && w.at <= due + Duration::seconds(2));
        if !pending {
            let id = uuid::Uuid::new_v4().simple().to_string();
            record.wake = Some(Wake { id: id.clone(), at: due });
            send =
                Some((WakeMessage { wake_id: Some(id), ..WakeMessage::new(&record.job_id, Trigger::Poll) }, seconds));
        }
    }
    // Sent before the save: if the save is lost the wake still comes, and an
    // unexpected wake is harmless.
    if let Some((message, delay)) = &send {
        ports.queue.send(message, *delay).await?;
    }
    if record.state.is_terminal() {
        record.wake = None;
    }
    save(ports, record, version, owner).await?;
    // A terminal job whose notices did not go stays active: the tick brings
    // it back to the gate, which sends them (`lease::Gate::Flush`).
    emit_metrics(ports, record);
    if record.state.is_terminal() && record.outbox.is_empty() {
        ports.ledger.set_active(&record.job_id, false).await?;
    } else if record.woken && !woken {
        // The trigger came while this last save was under way: its wake was
        // already decided, so one more message brings the next pass.
        ports.queue.send(&WakeMessage::new(&record.job_id, Trigger::Poll), soon).await?;
    }
    info!(job_id = %record.job_id, state = %record.state, reason = %record.reason, "reconciled");
    Ok(Handled::Reconciled { state: record.state.to_string() })
}

/// The job's figures once its end is saved (only this pass can have ended
/// it: the gate lets no pass run on a terminal job), and a stall.
fn emit_metrics(ports: &Ports, record: &JobRecord) {
    let name = record.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_else(|| record.job_id.clone());
    let mut figures = if record.state.is_terminal() { metrics::job_ended(record) } else { vec![] };
    if record.stalled.is_some() {
        figures.push(("Stalls", metrics::Unit::Count, 1.0));
    }
    metrics::emit(&ports.settings.stack, Some(&name), &figures);
}

/// Save the outbox with what it announces, send it, clear it (the caller's
/// next save writes that). A failed send keeps it for the next pass.
async fn flush_outbox(
    ports: &Ports,
    record: &mut JobRecord,
    version: &mut String,
    owner: &str,
) -> Result<(), StepError> {
    if ports.notices.is_none() {
        return Ok(());
    }
    crate::events::collect(record, ports.ledger.bucket(), ports.clock.now());
    if record.outbox.is_empty() {
        return Ok(());
    }
    save(ports, record, version, owner).await?;
    match crate::publish::send_outbox(ports, record).await {
        Ok(_) => record.outbox.clear(),
        Err(err) => warn!(job_id = %record.job_id, error = %err, "notices not sent; the next pass sends them"),
    }
    Ok(())
}

/// A terminal job's notices that its last pass could not send.
async fn flush_terminal(ports: &Ports, record: JobRecord, version: String) -> Result<Handled, StepError> {
    crate::publish::finish_terminal(ports, record, version).await?;
    Ok(Handled::Finished)
}

/// Compare-and-swap under our lease. Intake may set `cancel_requested`, the
/// event path may add `interruptions`, a trigger that found the job busy
/// sets `woken`, and the reaper may count `dead_letters` (with their
/// ids and a warning) meanwhile: those are merged; any other change means
/// the lease was lost.
async fn save(ports: &Ports, record: &mut JobRecord, version: &mut String, owner: &str) -> Result<(), StepError> {
    for _ in 0..5 {
        let now = ports.clock.now();
        record.updated_at = Some(now);
        // Each transition's notice is saved with it (`events`).
        if ports.notices.is_some() {
            crate::events::collect(record, ports.ledger.bucket(), now);
        }
        // Each save extends the lease: a pass that is still saving is never overtaken.
        if let Some(lease) = record.lease.as_mut().filter(|l| l.owner == owner) {
            lease.until = lease.until.max(now + Duration::seconds(fence::LEASE_MARGIN_SECONDS));
        }
        record.writes += 1;
        match ports.ledger.replace(record, version).await? {
            WriteOutcome::Written { version: written } => {
                *version = written;
                return Ok(());
            }
            WriteOutcome::Conflict => {
                let Some(fresh) = ports.ledger.load(&record.job_id).await? else {
                    return Err(StepError::RecordMissing(record.job_id.clone()));
                };
                if fresh.record.lease.as_ref().map(|l| l.owner.as_str()) != Some(owner) {
                    return Err(StepError::LeaseLost(record.job_id.clone()));
                }
                record.cancel_requested |= fresh.record.cancel_requested;
                record.cancel_requested_at = record.cancel_requested_at.or(fresh.record.cancel_requested_at);
                // `flotilla release` ended the debug hold meanwhile.
                if let (Some(hold), Some(fresh)) = (record.hold.as_mut(), fresh.record.hold.as_ref()) {
                    hold.released_at = hold.released_at.or(fresh.released_at);
                }
                record.dead_letters = record.dead_letters.max(fresh.record.dead_letters);
                for id in fresh.record.dead_letter_ids {
                    if !record.dead_letter_ids.contains(&id) {
                        record.dead_letter_ids.push(id);
                    }
                }
                for warning in fresh.record.warnings.iter().filter(|w| w.starts_with("dead-lettered:")) {
                    if !record.warnings.contains(warning) {
                        record.warnings.push(warning.clone());
                    }
                }
                for id in fresh.record.interruptions {
                    if !record.interruptions.contains(&id) {
                        record.interruptions.push(id);
                    }
                }
                // A trigger that came during the pass (see the lease above).
                record.woken |= fresh.record.woken;
                *version = fresh.version;
            }
        }
    }
    Err(StepError::Contended(record.job_id.clone()))
}
