//! The debug hold (`debug_hold_minutes`): the first shard that fails for
//! good keeps its instance and attached volumes once its failure's
//! snapshots are taken. The attempt is then left for the reaper, which
//! removes both after the hold (or `flotilla release`), snapshotting the
//! volumes again first (`reaper.rs`). Only a step's own failure is held:
//! a lost instance has nothing to look at, and a retried shard is not done.

use super::*;

/// True while the hold waits for CreateSnapshot to answer. Once it has, the
/// attempt is held: `release` treats its instance as the reaper's and keeps
/// its attached volumes.
pub(super) fn hold_if_wanted(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) -> bool {
    let Some(minutes) = job.spec.debug_hold_minutes else { return false };
    if decision.hold_taken || attempt.held_until.is_some() || attempt.terminate_requested || job.past_bound {
        return false;
    }
    // A cancel or a passed deadline asked for everything to stop.
    if job.cancel_requested || job.deadline_at.is_some_and(|at| now >= at) {
        return false;
    }
    let failed_step =
        attempt.end.as_ref().is_some_and(|e| matches!(e.cause, EndCause::CommandFailed | EndCause::TimedOut));
    if !failed_step || would_retry(job, attempt) {
        return false;
    }
    let Some(instance_id) = attempt.instance_id.clone() else { return false };
    if obs.instances.get(&instance_id).is_none_or(|view| view.state != InstanceState::Running) {
        return false;
    }
    // The pass that ended the step looked at no volumes (a working attempt
    // does not): the next one does, and snapshots them.
    let unseen = attempt
        .volumes
        .iter()
        .filter(|v| !v.deleted && v.kept.is_none())
        .filter_map(|v| v.volume_id.as_ref())
        .any(|id| !obs.volumes.contains_key(id) && !obs.gone_volumes.contains(id));
    if unseen {
        decision.look_within(1);
        return true;
    }
    // The failure's snapshots first: the hold may change the volumes.
    if snapshot_attached(job, shard, attempt, &instance_id, obs, now, decision) {
        return true;
    }
    let until = now + Duration::minutes(i64::from(minutes));
    let at = until.to_rfc3339_opts(SecondsFormat::Secs, true);
    attempt.held_until = Some(until);
    attempt.left_for_reaper = Some(format!("held for debugging until {at}"));
    decision.hold_taken = true;
    decision.notes.push(format!(
        "{instance_id} held for debugging until {at} (aws ssm start-session --target {instance_id}; \
         `flotilla release {}` ends it); the reaper removes it and its volumes after",
        job.job_id
    ));
    false
}

/// The record's summary of the hold, once an attempt is held; a cancel that
/// arrives during the hold ends it (the reaper removes the instance next).
pub(super) fn note_hold(record: &mut JobRecord, now: DateTime<Utc>) {
    if let Some(hold) = record.hold.as_mut() {
        if record.cancel_requested && hold.released_at.is_none() {
            hold.released_at = Some(record.cancel_requested_at.unwrap_or(now).max(hold.since));
        }
        return;
    }
    let held = record.shards.iter().find_map(|s| {
        let attempt = s.attempts.iter().find(|a| a.held_until.is_some())?;
        Some((s.index, attempt))
    });
    let Some((shard, attempt)) = held else { return };
    record.hold = Some(DebugHold {
        shard,
        instance_id: attempt.instance_id.clone().unwrap_or_default(),
        volume_ids: attempt.volumes.iter().filter_map(|v| v.volume_id.clone()).collect(),
        since: now,
        until: attempt.held_until.unwrap_or(now),
        released_at: None,
        tagged: false,
    });
}

/// The held instance's `expires-at`, moved to the hold's end, and
/// `held-until` on it and its volumes, so the reaper honours the hold even
/// without the record, and trusts only its own snapshot of the volumes.
/// None once done.
pub(super) fn tag_hold(record: &JobRecord) -> Option<Action> {
    let hold = record.hold.as_ref().filter(|h| !h.tagged)?;
    // Only volumes the job created: a `volume_id` source is the owner's, and
    // the role may not tag it (nor should it).
    let created: Vec<String> = record
        .attempts()
        .filter(|a| a.held_until.is_some())
        .flat_map(|a| a.volumes.iter())
        .filter(|v| v.created)
        .filter_map(|v| v.volume_id.clone())
        .filter(|id| hold.volume_ids.contains(id))
        .collect();
    Some(Action::TagHold {
        instance_id: hold.instance_id.clone(),
        volume_ids: created,
        until: hold.until.to_rfc3339_opts(SecondsFormat::Secs, true),
    })
}

/// The retry strategy alone would start another attempt of this shard: a
/// shard stopped only because another failed the job is not held.
pub(super) fn would_retry(job: &JobFacts<'_>, attempt: &Attempt) -> bool {
    let Some(ended) = attempt.end.as_ref() else { return false };
    let strategy = job.spec.retry.clone().unwrap_or_default();
    retry_action(&strategy, ended.cause, ended.exit_code) == RetryAction::Retry && attempt.number < strategy.attempts
}
