//! Release: unmount, snapshot and delete an attempt's volumes, then its instance.

use super::*;

/// Terminate the instance (stopped ones too), then snapshot what the policy
/// wants once each volume is free, and delete a created volume only after its
/// snapshot is `completed`. True when nothing of the attempt is left.
pub(super) fn release(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) -> bool {
    if hold_if_wanted(job, shard, attempt, obs, now, decision) {
        return false; // held once CreateSnapshot answered
    }
    // Stopped at the bound, or an unmount that failed: what is still mounted
    // is snapshotted while attached, then the instance is terminated (which
    // releases the volume; it is never detached while mounted).
    let still_mounted = attempt.at_bound || attempt.cleanup_failed.is_some();
    if still_mounted && !attempt.terminate_requested && snapshot_while_mounted(job, shard, attempt, obs, now, decision)
    {
        return false; // terminated once CreateSnapshot answered
    }
    let instance_gone = terminate(attempt, obs, now, decision);
    let releasing = Releasing {
        shard,
        instance_id: attempt.instance_id.clone(),
        left_for_reaper: attempt.left_for_reaper.is_some(),
        held: attempt.held_until.is_some(),
        work_succeeded: attempt.end.as_ref().is_some_and(|e| e.cause == EndCause::Succeeded),
        kind: snapshot_kind(attempt),
        now,
    };
    let mut settled = instance_gone;
    let mut volume_calls = 0;
    for volume in &mut attempt.volumes {
        if volume.deleted || volume.kept.is_some() {
            continue;
        }
        if !release_volume(job, &releasing, volume, obs, &mut volume_calls, decision) {
            settled = false;
        }
    }
    settled && attempt.volumes.iter().all(|v| v.deleted || v.kept.is_some())
}

/// Terminate the attempt's instance unless it is gone. True once it is.
fn terminate(attempt: &mut Attempt, obs: &Observation, now: DateTime<Utc>, decision: &mut Decision) -> bool {
    match attempt.instance_id.as_ref() {
        None => true,
        Some(_) if attempt.left_for_reaper.is_some() => true,
        Some(id) => match obs.instances.get(id) {
            Some(view) if view.is_terminated() => true,
            Some(view) => {
                if view.state != InstanceState::ShuttingDown {
                    decision.terminate.push(id.clone());
                }
                attempt.terminate_requested = true;
                false
            }
            // Not listed: terminated long ago, or never visible.
            None => attempt.terminate_requested || attempt.launched_at.is_none_or(|at| now - at > Duration::minutes(5)),
        },
    }
}

/// What every volume of a releasing attempt shares.
struct Releasing {
    shard: u32,
    instance_id: Option<String>,
    left_for_reaper: bool,
    /// Held for debugging: its attached volumes stay with the instance.
    held: bool,
    work_succeeded: bool,
    /// Why its volumes are snapshotted (`retention::kind`).
    kind: &'static str,
    now: DateTime<Utc>,
}

/// One volume of a releasing attempt: found, freed, snapshotted if the
/// policy wants it, then deleted if Flotilla created it; kept with a reason
/// where that is not safe. True when nothing more is to be done for it.
fn release_volume(
    job: &JobFacts<'_>,
    releasing: &Releasing,
    volume: &mut AttemptVolume,
    obs: &Observation,
    volume_calls: &mut usize,
    decision: &mut Decision,
) -> bool {
    let now = releasing.now;
    // A create whose reply was lost: find the volume by its token tag.
    if volume.volume_id.is_none() {
        volume.volume_id = obs
            .volumes
            .values()
            .find(|v| v.tags.get(tags::ATTEMPT) == Some(&volume.token))
            .map(|v| v.volume_id.clone());
        if volume.volume_id.is_none() {
            volume.deleted = true; // never created (the final sweep catches a late one)
            return true;
        }
    }
    let volume_id = volume.volume_id.clone().unwrap_or_default();
    let Some(view) = obs.volumes.get(&volume_id) else {
        if obs.gone_volumes.contains(&volume_id) && is_gone(volume, now) {
            if volume.created {
                volume.deleted = true;
            } else {
                volume.kept = Some("a volume_id source: never deleted".into());
            }
            return true;
        }
        return false; // not visible yet
    };
    volume.seen = true;
    let attached_elsewhere =
        view.attached_to.as_ref().is_some_and(|owner| Some(owner) != releasing.instance_id.as_ref());
    if view.state == VolumeState::Error {
        volume.kept = Some("the volume is in state error: nothing to snapshot; left for the reaper".into());
        return true;
    }
    if attached_elsewhere && !volume.created {
        volume.kept = Some("a volume_id source attached to another instance: left alone".into());
        return true;
    }
    if view.attached_to.is_some() && releasing.held {
        volume.kept =
            Some("held for debugging with its instance; the reaper snapshots it again before deleting it".into());
        return true;
    }
    if view.attached_to.is_some() && releasing.left_for_reaper {
        volume.kept = Some("attached to an instance left for the reaper".into());
        return true;
    }
    let attached = view.attached_to.is_some() || view.state == VolumeState::InUse;
    if attached || view.state != VolumeState::Available {
        return false;
    }
    let policy = job.spec.volumes.iter().find(|v| v.name == volume.name).map(|v| v.snapshot);
    let wanted = match policy {
        Some(SnapshotPolicy::Always) => true,
        Some(SnapshotPolicy::OnSuccess) => releasing.work_succeeded,
        _ => false,
    };
    let mut settled = true;
    let ready_to_delete = if wanted {
        let snapshotted = snapshot_before_delete(job, releasing, volume, &volume_id, obs, decision);
        settled = snapshotted.settled;
        snapshotted.completed
    } else {
        true
    };
    if ready_to_delete && volume.kept.is_none() {
        if volume.created {
            if *volume_calls < MAX_VOLUME_CALLS {
                decision.actions.push(Action::DeleteVolume { volume_id: volume_id.clone() });
                *volume_calls += 1;
            }
            settled = false; // marked deleted when the call succeeds
        } else {
            volume.kept = Some("a volume_id source: never deleted".into());
        }
    }
    settled
}

/// Where a free volume's snapshot stands.
struct Snapshotted {
    /// It is `completed`: the volume may go.
    completed: bool,
    /// Nothing more to wait for (a volume kept after failed snapshots).
    settled: bool,
}

/// Ask for the snapshot, find one whose answer was lost, or follow it to
/// `completed`; one that ends in error is asked again, up to
/// SNAPSHOT_TRIES, then the volume is kept so no data is lost.
fn snapshot_before_delete(
    job: &JobFacts<'_>,
    releasing: &Releasing,
    volume: &mut AttemptVolume,
    volume_id: &str,
    obs: &Observation,
    decision: &mut Decision,
) -> Snapshotted {
    let (now, shard, kind) = (releasing.now, releasing.shard, releasing.kind);
    let waiting = Snapshotted { completed: false, settled: false };
    match volume.snapshot.clone() {
        None => {
            volume.snapshot = Some(SnapshotRef::requested(now, job.budget_seconds));
            decision.actions.push(snapshot_action(job, shard, volume, volume_id, now, kind, false));
            waiting
        }
        Some(SnapshotRef { snapshot_id: None, .. }) => {
            if let Some(action) = unanswered_snapshot(job, shard, volume, volume_id, obs, now, kind) {
                decision.actions.push(action);
            }
            waiting
        }
        Some(SnapshotRef { snapshot_id: Some(id), state, requested_at, .. }) => {
            let seen = obs.snapshots.get(&id).map(|s| s.state.clone());
            // A snapshot that never shows up (deleted by someone) is a failed one.
            let lost = seen.is_none()
                && state != SnapshotState::Completed
                && requested_at.is_some_and(|at| now - at > Duration::seconds(SNAPSHOT_LOST_SECONDS));
            let state_now = if lost { SnapshotState::Error } else { seen.unwrap_or(state) };
            match state_now {
                SnapshotState::Completed => {
                    volume.snapshot = Some(SnapshotRef {
                        snapshot_id: Some(id),
                        state: SnapshotState::Completed,
                        requested_at,
                        in_flight_until: None,
                    });
                    Snapshotted { completed: true, settled: true }
                }
                SnapshotState::Error => {
                    volume.snapshot_failures += 1;
                    decision.notes.push(format!("snapshot {id} of {volume_id} ended in error"));
                    if volume.snapshot_failures >= SNAPSHOT_TRIES {
                        volume.kept =
                            Some(format!("{SNAPSHOT_TRIES} snapshots of it ended in error; kept so no data is lost"));
                        Snapshotted { completed: false, settled: true }
                    } else {
                        volume.snapshot = None; // a new one next pass
                        waiting
                    }
                }
                _ => waiting,
            }
        }
    }
}

/// Why this attempt's volumes are snapshotted (`retention::kind`).
pub(super) fn snapshot_kind(attempt: &Attempt) -> &'static str {
    let work_succeeded = attempt.end.as_ref().is_some_and(|e| e.cause == EndCause::Succeeded);
    match (work_succeeded, attempt.cleanup_failed.is_some(), attempt.cleanup_lost) {
        (true, false, _) => retention::kind::FINAL,
        (true, true, true) => retention::kind::FINAL_CRASH_CONSISTENT,
        (true, true, false) => retention::kind::AFTER_FAILED_CLEANUP,
        (false, _, _) => retention::kind::FAILED_ATTEMPT,
    }
}

/// How long past the bound termination waits for CreateSnapshot to answer.
pub(super) const BOUND_SNAPSHOT_SECONDS: i64 = 120;

/// A volume the policy wants snapshotted that is still mounted (stopped at
/// the bound, or its unmount failed) is snapshotted while attached
/// (crash-consistent), before the instance is terminated. True while such a
/// snapshot has not been answered yet (and the bound's short wait for it has
/// not run out).
pub(super) fn snapshot_while_mounted(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) -> bool {
    // The wait for CreateSnapshot's answer is short: from the bound, or from
    // when the cleanup step failed (an instance lost in cleanup is not held).
    let failed_cleanup_at = attempt
        .phases
        .iter()
        .filter(|p| p.phase.runs_after_failure() && p.status.is_some() && !p.succeeded())
        .filter_map(|p| p.finished_at)
        .max();
    let since = if attempt.at_bound { job.bound } else { failed_cleanup_at };
    if since.is_none_or(|at| now > at + Duration::seconds(BOUND_SNAPSHOT_SECONDS)) {
        return false;
    }
    let mounted =
        attempt.completed_phases.contains(&Phase::Mount) && !attempt.completed_phases.contains(&Phase::Unmount);
    let Some(instance_id) = attempt.instance_id.clone().filter(|_| mounted) else { return false };
    snapshot_attached(job, shard, attempt, &instance_id, obs, now, decision)
}

/// Snapshot each volume attached to `instance_id` that the policy wants
/// snapshotted, while attached. True while a CreateSnapshot has not answered.
pub(super) fn snapshot_attached(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    instance_id: &str,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) -> bool {
    let kind = snapshot_kind(attempt);
    let work_succeeded = kind != retention::kind::FAILED_ATTEMPT;
    let mut waiting = false;
    for volume in attempt.volumes.iter_mut().filter(|v| !v.deleted && v.kept.is_none()) {
        let Some(volume_id) = volume.volume_id.clone() else { continue };
        let attached_here = obs.volumes.get(&volume_id).is_some_and(|v| v.attached_to.as_deref() == Some(instance_id));
        let wanted = match job.spec.volumes.iter().find(|v| v.name == volume.name).map(|v| v.snapshot) {
            Some(SnapshotPolicy::Always) => true,
            Some(SnapshotPolicy::OnSuccess) => work_succeeded,
            _ => false,
        };
        if !attached_here || !wanted {
            continue;
        }
        match &volume.snapshot {
            None => {
                volume.snapshot = Some(SnapshotRef::requested(now, job.budget_seconds));
                decision.actions.push(snapshot_action(job, shard, volume, &volume_id, now, kind, false));
                waiting = true;
            }
            Some(SnapshotRef { snapshot_id: None, .. }) => {
                if let Some(action) = unanswered_snapshot(job, shard, volume, &volume_id, obs, now, kind) {
                    decision.actions.push(action);
                }
                waiting = true;
            }
            Some(_) => {}
        }
    }
    waiting
}

/// The same for a snapshot requested earlier.
pub(super) fn snapshot_in_flight(snapshot: &SnapshotRef, budget_seconds: u32, now: DateTime<Utc>) -> bool {
    let until =
        snapshot.in_flight_until.or_else(|| snapshot.requested_at.map(|at| fence::in_flight_until(at, budget_seconds)));
    snapshot.snapshot_id.is_none() && until.is_some_and(|until| until > now) && !mutation::on(Mutation::NoFence)
}

/// A snapshot requested earlier whose answer never came. What the cloud
/// shows of it is adopted; while it may still land unseen, nothing is
/// done; after that, it is requested again (the executor looks first).
pub(super) fn unanswered_snapshot(
    job: &JobFacts<'_>,
    shard: u32,
    volume: &mut AttemptVolume,
    volume_id: &str,
    obs: &Observation,
    now: DateTime<Utc>,
    kind: &str,
) -> Option<Action> {
    let found = obs.snapshots.values().find(|s| {
        s.state != SnapshotState::Error
            && s.tags.get(tags::ATTEMPT) == Some(&volume.token)
            && s.tags.get(tags::SOURCE_VOLUME).map(String::as_str) == Some(volume_id)
    });
    let snapshot = volume.snapshot.as_mut()?;
    if let Some(found) = found {
        snapshot.snapshot_id = Some(found.snapshot_id.clone());
        snapshot.state = found.state.clone();
        snapshot.in_flight_until = None;
        return None;
    }
    if snapshot_in_flight(snapshot, job.budget_seconds, now) {
        return None;
    }
    snapshot.in_flight_until = Some(fence::in_flight_until(now, job.budget_seconds));
    Some(snapshot_action(job, shard, volume, volume_id, now, kind, true))
}

pub(super) fn snapshot_action(
    job: &JobFacts<'_>,
    shard: u32,
    volume: &AttemptVolume,
    volume_id: &str,
    now: DateTime<Utc>,
    kind: &str,
    look_first: bool,
) -> Action {
    let name = job.spec.name.clone().unwrap_or_else(|| job.job_id.clone());
    let mut snapshot_tags = BTreeMap::new();
    snapshot_tags.insert(tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string());
    for key in [tags::STACK, tags::SUBMITTER] {
        if let Some(value) = job.tags.get(key) {
            snapshot_tags.insert(key.to_string(), value.clone());
        }
    }
    snapshot_tags.insert(tags::JOB_ID.to_string(), job.job_id.clone());
    snapshot_tags.insert(tags::JOB_NAME.to_string(), name.clone());
    snapshot_tags.insert(tags::VOLUME.to_string(), volume.name.clone());
    snapshot_tags.insert(tags::SOURCE_VOLUME.to_string(), volume_id.to_string());
    snapshot_tags.insert(tags::SHARD.to_string(), shard.to_string());
    snapshot_tags.insert(tags::ATTEMPT.to_string(), volume.token.clone());
    snapshot_tags.insert(tags::KIND.to_string(), kind.to_string());
    snapshot_tags.insert("Name".to_string(), format!("{name}-{}-{shard}", volume.name));
    // The lineage's retention, for the reaper when no later run prunes.
    if let Some(spec) = job.spec.volumes.iter().find(|v| v.name == volume.name) {
        snapshot_tags.insert(tags::KEEP_LAST.to_string(), spec.retention.keep_last.to_string());
        snapshot_tags.insert(tags::MAX_AGE_DAYS.to_string(), spec.retention.max_age_days.to_string());
    }
    for (key, value) in &job.spec.tags {
        snapshot_tags.entry(key.clone()).or_insert_with(|| value.clone());
    }
    let description = format!(
        "flotilla job {} volume {} shard {shard} from {volume_id} at {}",
        job.job_id,
        volume.name,
        now.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    Action::Snapshot { volume_id: volume_id.to_string(), description, tags: snapshot_tags, look_first }
}
