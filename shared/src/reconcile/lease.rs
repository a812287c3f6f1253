//! The lease and the gate in front of a pass: the only code that reads
//! what sent a wake. A pass runs under a lease taken by compare-and-swap
//! on the record; a wake that finds the lease held, the job just passed, or
//! its poll already on the way is folded into the record or dropped here,
//! so `reconcile` and `decide` never see triggers.

use chrono::{DateTime, Duration, Utc};

use super::{decide, Handled, TICK_GRACE_SECONDS};
use crate::error::StepError;
use crate::ports::{Ports, WriteOutcome};
use crate::record::{JobRecord, Lease, Wake};
use crate::wake::{Trigger, WakeMessage};

/// What the gate let through.
pub(super) enum Gate {
    /// A pass runs: the record under this pass's lease, its version, and the
    /// instances wakes named since the last pass.
    Pass(Box<(JobRecord, String, Vec<String>)>),
    /// No pass: the wake was folded into the record, or was not needed.
    Done(Handled),
    /// A terminal job whose last notices were not sent: send them.
    Flush(Box<(JobRecord, String)>),
}

/// Take the job's lease for `owner` until `lease_until`, unless the wake
/// needs no pass.
pub(super) async fn take(
    ports: &Ports,
    message: &WakeMessage,
    owner: &str,
    started: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Gate, StepError> {
    let mut taken = None;
    let mut fallback_sent = false;
    for _ in 0..4 {
        let Some(loaded) = ports.ledger.load(&message.job_id).await? else { return Ok(Gate::Done(Handled::Unknown)) };
        let mut record = loaded.record;
        if record.state.is_terminal() {
            if !record.outbox.is_empty() && ports.notices.is_some() {
                return Ok(Gate::Flush(Box::new((record, loaded.version))));
            }
            // A marker left by a pass that died after its terminal save.
            if message.trigger == Some(Trigger::Tick) {
                ports.ledger.set_active(&record.job_id, false).await?;
            }
            return Ok(Gate::Done(Handled::Finished));
        }
        let held_by = |owner: &Option<String>| record.lease.as_ref().is_some_and(|l| Some(&l.owner) == owner.as_ref());
        if message.trigger == Some(Trigger::LeaseEnd) && !held_by(&message.lease_owner) {
            return Ok(Gate::Done(Handled::Scheduled));
        }
        let poll_coming = record.wake.as_ref().is_some_and(|w| started < w.at + Duration::seconds(TICK_GRACE_SECONDS));
        if message.trigger == Some(Trigger::Tick) && poll_coming && record.lease.is_none() {
            heartbeat(ports, &record, started).await;
            return Ok(Gate::Done(Handled::Scheduled));
        }
        // An event (or a stale poll) right after a pass: its hints wait in
        // the record for the pass a gap later, so a big job's scattered
        // events share passes.
        let gap = Duration::seconds(i64::from(decide::pass_gap(record.shards.len())));
        let scheduled = message.wake_id.is_some() && record.wake.as_ref().map(|w| &w.id) == message.wake_id.as_ref();
        let early = gap > Duration::zero()
            && matches!(message.trigger, Some(Trigger::Event | Trigger::Busy | Trigger::LeaseEnd | Trigger::Poll))
            && !scheduled
            && record.lease.is_none()
            && record.updated_at.is_some_and(|at| started < at + gap);
        if early {
            if defer(ports, message, &mut record, &loaded.version, started, gap).await? {
                return Ok(Gate::Done(Handled::Deferred));
            }
            continue;
        }
        if let Some(lease) = record.lease.clone().filter(|l| l.until > started) {
            let fallback = (!fallback_sent).then_some(&lease);
            fallback_sent = true;
            if fold_into_pass(ports, message, &mut record, &loaded.version, started, fallback).await? {
                return Ok(Gate::Done(Handled::Busy));
            }
            continue; // the pass saved or ended meanwhile: look again
        }
        record.lease = Some(Lease { owner: owner.to_string(), until: lease_until });
        if message.wake_id.is_some() && record.wake.as_ref().map(|w| &w.id) == message.wake_id.as_ref() {
            record.wake = None; // this poll arrived
        }
        record.passes += 1;
        record.updated_at = Some(started);
        let mut hinted = std::mem::take(&mut record.hinted);
        if std::mem::take(&mut record.woken) {
            // Triggers came during the last pass: what they named is not
            // known, so every command in flight is looked at.
            hinted.extend(record.shards.iter().filter_map(|s| s.current()).filter_map(|a| a.instance_id.clone()));
        }
        record.writes += 1;
        if let WriteOutcome::Written { version } = ports.ledger.replace(&record, &loaded.version).await? {
            taken = Some((record, version, hinted));
            break;
        }
    }
    taken.map(|taken| Gate::Pass(Box::new(taken))).ok_or_else(|| StepError::Contended(message.job_id.clone()))
}

/// An event (or a stale poll) right after a pass: its hints wait in the
/// record for the pass a gap later, so a big job's scattered events share
/// passes. True once written; false on a conflict (look again).
async fn defer(
    ports: &Ports,
    message: &WakeMessage,
    record: &mut JobRecord,
    version: &str,
    started: DateTime<Utc>,
    gap: Duration,
) -> Result<bool, StepError> {
    let due = record.updated_at.unwrap_or(started) + gap;
    for id in &message.instances {
        if !record.hinted.contains(id) {
            record.hinted.push(id.clone());
        }
    }
    let send = record.wake.as_ref().is_none_or(|w| w.at > due + Duration::seconds(1));
    if send {
        let id = uuid::Uuid::new_v4().simple().to_string();
        record.wake = Some(Wake { id: id.clone(), at: due });
        let wake = WakeMessage { wake_id: Some(id), ..WakeMessage::new(&record.job_id, Trigger::Poll) };
        ports.queue.send(&wake, (due - started).num_seconds().clamp(1, 900) as u32).await?;
    }
    record.writes += 1;
    Ok(matches!(ports.ledger.replace(record, version).await?, WriteOutcome::Written { .. }))
}

/// The lease is held by a pass under way. A trigger that asks for
/// something (not a poll, a tick or a lease-end) sets `woken`: that pass
/// takes it in when it saves, and the job's next pass comes a gap after it
/// ends and looks at every command in flight (`finish_pass`). Only the
/// first of a pass writes, so a big job's burst of events costs that pass
/// one conflict, not one per event. Should that pass die, a `lease-end`
/// wake (sent once per gate, given as `fallback`) comes when its lease
/// ends; it is dropped if the pass ends well. True when done; false on a
/// conflict (look again).
async fn fold_into_pass(
    ports: &Ports,
    message: &WakeMessage,
    record: &mut JobRecord,
    version: &str,
    started: DateTime<Utc>,
    fallback: Option<&Lease>,
) -> Result<bool, StepError> {
    let asks = !matches!(message.trigger, Some(Trigger::Poll | Trigger::Tick | Trigger::LeaseEnd));
    if asks && record.woken {
        return Ok(true);
    }
    // Sent first: a failed write then still leaves it on its way.
    if let Some(lease) = fallback {
        let remaining_ms = (lease.until - started).num_milliseconds();
        let mut wake = WakeMessage::new(&record.job_id, Trigger::LeaseEnd);
        wake.lease_owner = Some(lease.owner.clone());
        wake.instances = message.instances.clone();
        ports.queue.send(&wake, (remaining_ms / 1000 + 1).clamp(1, 900) as u32).await?;
    }
    if asks {
        record.woken = true;
        record.writes += 1;
        if let WriteOutcome::Conflict = ports.ledger.replace(record, version).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The tick's heartbeat for a Step Functions task waiting on a job whose
/// passes are far apart (a long step): best effort, the next tick tries again.
async fn heartbeat(ports: &Ports, record: &JobRecord, now: DateTime<Utc>) {
    let (Some(notices), Some(notice)) = (ports.notices.as_ref(), crate::events::heartbeat(record, now)) else { return };
    let batch = crate::events::NoticeBatch { job_id: record.job_id.clone(), notices: vec![notice] };
    if let Err(err) = notices.send(&batch).await {
        tracing::warn!(job_id = %record.job_id, error = %err, "heartbeat not sent");
    }
}
