//! Applying results: each action's reply folded back into the record.

use super::*;

/// Fold an action's result into the record. Transient errors change nothing:
/// the next pass decides the same action again.
pub fn apply(record: &mut JobRecord, action: &Action, result: Result<Done, CloudError>, now: DateTime<Utc>) {
    let error = match result {
        Ok(done) => {
            apply_done(record, action, done, now);
            return;
        }
        Err(err) => err,
    };
    if held_resource_gone(record, action, &error) {
        return;
    }
    let class = error.class();
    if matches!(class, RetryClass::Throttled | RetryClass::NotYetVisible) {
        // Refused before it took effect: nothing of it can land later.
        refused(record, action, now);
    }
    if matches!(class, RetryClass::Throttled | RetryClass::Transient | RetryClass::NotYetVisible) {
        return;
    }
    let message = error.to_string();
    match action {
        Action::Launch { request } => launch_failed(record, &request.client_token, &error, now),
        Action::CreateVolume { .. } if class == RetryClass::Capacity => {} // the next pass tries again
        Action::CreateVolume { request } => {
            fail_attempt_where(record, |a| a.volumes.iter().any(|v| v.token == request.client_token), &message, now);
        }
        Action::Attach { volume_id, .. } => {
            if matches!(error.code(), Some("VolumeInUse" | "IncorrectState" | "IncorrectInstanceState")) {
                return; // a racing attach, or not available yet: the next pass looks again
            }
            let id = volume_id.clone();
            fail_attempt_where(
                record,
                |a| {
                    a.stage == Stage::Attaching && a.volumes.iter().any(|v| v.volume_id.as_deref() == Some(id.as_str()))
                },
                &message,
                now,
            );
        }
        Action::Send { batch, .. } => {
            let batch = *batch;
            fail_attempt_where(
                record,
                |a| a.phases.iter().any(|p| p.batch == batch && p.status.is_none()),
                &message,
                now,
            );
            for a in record.shards.iter_mut().filter_map(|s| s.current_mut()) {
                for p in a.phases.iter_mut().filter(|p| p.batch == batch && p.status.is_none()) {
                    p.status = Some("Failed".into());
                    p.finished_at = Some(now);
                }
            }
        }
        Action::Cancel { .. } | Action::SaveOutput { .. } => {}
        Action::Terminate { instance_ids } if instance_ids.len() > 1 => {
            // One refused instance fails the whole call: find it one by one.
            record.terminate_singly = true;
        }
        Action::Terminate { instance_ids } => terminate_failed(record, instance_ids, &message),
        Action::Snapshot { volume_id, .. } => {
            for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
                if v.volume_id.as_deref() == Some(volume_id.as_str()) {
                    v.kept = Some(format!("snapshot refused ({message}); kept so no data is lost"));
                }
            }
        }
        Action::DeleteVolume { volume_id } => delete_failed(record, volume_id, &error),
        Action::Prune { volume, .. } => {
            // Unmarked, this run's snapshots would not count as good: the
            // executor prunes nothing when marking fails.
            record.warnings.push(format!("pruning snapshots of {volume}: {message}"));
            record.pruned.push(volume.clone());
        }
        Action::WriteReport => {
            record.warnings.push(format!("report not written: {message}"));
            record.report_written = true;
        }
        // The record still says held, and the reaper reads it.
        Action::TagHold { instance_id, .. } => tag_hold_ended(record, format!("tagging {instance_id}: {message}")),
    }
}

/// The held instance or a volume of it is gone (terminated and purged, or
/// deleted by hand) when its hold is tagged: nothing is left to tag, and
/// asking again would never end.
fn held_resource_gone(record: &mut JobRecord, action: &Action, error: &CloudError) -> bool {
    let Action::TagHold { instance_id, .. } = action else { return false };
    if !error.code().is_some_and(|code| code.ends_with(".NotFound")) {
        return false;
    }
    tag_hold_ended(record, format!("the held instance {instance_id} or a volume of it is gone: {error}"));
    true
}

fn tag_hold_ended(record: &mut JobRecord, warning: String) {
    record.warnings.push(warning);
    if let Some(hold) = record.hold.as_mut() {
        hold.tagged = true;
    }
}

/// A launch refused: every attempt launched under its token ends (out of
/// capacity, or for good), and the shards settle.
fn launch_failed(record: &mut JobRecord, client_token: &str, error: &CloudError, now: DateTime<Utc>) {
    let capacity = error.class() == RetryClass::Capacity;
    let options = record.spec.as_ref().map(launch_options).unwrap_or_default();
    for shard in &mut record.shards {
        let Some(a) = shard.current_mut() else { continue };
        if a.launch_token.as_deref() == Some(client_token) && a.stage == Stage::Launching {
            let cause = if capacity { EndCause::Capacity } else { EndCause::Permanent };
            let detail = if capacity {
                format!("{}: {}", error.code().unwrap_or("no capacity"), describe_option(&launch_of(&options, a)))
            } else {
                format!("launch failed: {error}")
            };
            end(a, cause, &detail, None);
            a.stage = Stage::Done;
        }
    }
    settle_launch_failures(record, now);
}

/// A terminate refused for these instances: a warning, and each
/// attempt's release error counted (the reaper takes over past a limit).
fn terminate_failed(record: &mut JobRecord, instance_ids: &[String], message: &str) {
    record.warnings.push(format!("TerminateInstances {instance_ids:?}: {message}"));
    record.cleanup_failures += 1;
    for a in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()) {
        if a.instance_id.as_ref().is_some_and(|id| instance_ids.contains(id)) {
            bump_release_error(a, message);
        }
    }
    dedup_warnings(record);
}

/// A delete refused: gone already is deleted, in use is looked at again,
/// anything else keeps the volume for the reaper, with a warning.
fn delete_failed(record: &mut JobRecord, volume_id: &str, error: &CloudError) {
    if error.class() == RetryClass::NotFound {
        mark_deleted(record, volume_id);
        return;
    }
    if error.code() == Some("VolumeInUse") {
        return;
    }
    for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
        if v.volume_id.as_deref() == Some(volume_id) {
            v.kept = Some(format!("delete refused: {error}; left for the reaper"));
        }
    }
    record.warnings.push(format!("volume {volume_id} not deleted: {error}"));
}

/// A create AWS refused (throttled, or not yet able to see what it names)
/// did not happen: it is not waited for as maybe in flight.
pub(super) fn refused(record: &mut JobRecord, action: &Action, now: DateTime<Utc>) {
    match action {
        Action::Send { batch, .. } => {
            if let Some(batch) = record.commands.get_mut(batch).filter(|b| b.command_id.is_none()) {
                batch.in_flight_until = Some(now);
            }
        }
        Action::Snapshot { volume_id, .. } => {
            for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
                if v.volume_id.as_deref() == Some(volume_id.as_str()) {
                    if let Some(snapshot) = v.snapshot.as_mut().filter(|s| s.snapshot_id.is_none()) {
                        snapshot.in_flight_until = Some(now);
                    }
                }
            }
        }
        _ => {}
    }
}

pub(super) fn dedup_warnings(record: &mut JobRecord) {
    let mut seen = BTreeSet::new();
    record.warnings.retain(|w| seen.insert(w.clone()));
}

/// A permanent error while terminating: after a few, stop waiting on the
/// instance and leave it to the reaper (its tags carry expires-at) rather
/// than loop.
pub(super) fn bump_release_error(attempt: &mut Attempt, message: &str) {
    attempt.release_errors += 1;
    if attempt.release_errors >= RELEASE_ERRORS {
        attempt.left_for_reaper = Some(message.to_string());
    }
}

pub(super) fn mark_deleted(record: &mut JobRecord, volume_id: &str) {
    for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
        if v.volume_id.as_deref() == Some(volume_id) {
            v.deleted = true;
        }
    }
}

/// A permanent error ends the current attempt; release cleans up after it.
pub(super) fn fail_attempt_where(
    record: &mut JobRecord,
    matches: impl Fn(&Attempt) -> bool,
    message: &str,
    now: DateTime<Utc>,
) {
    for shard in &mut record.shards {
        let Some(a) = shard.attempts.last_mut() else { continue };
        if matches(a) && a.end.is_none() {
            end(a, EndCause::Permanent, message, None);
            a.stage = Stage::Releasing;
            shard.note(now, message.to_string());
        }
    }
}

/// Launch failures end attempts at once (nothing was launched): fail over or fail.
pub(super) fn settle_launch_failures(record: &mut JobRecord, now: DateTime<Utc>) {
    let Some(spec) = record.spec.clone() else { return };
    let job = JobFacts {
        spec: &spec,
        job_id: record.job_id.clone(),
        aborting: record.outcome.is_some(),
        cancel_requested: record.cancel_requested,
        tags: BTreeMap::new(),
        deadline_at: record.deadline_at,
        bound: None,
        past_bound: false,
        stack: String::new(),
        budget_seconds: 0,
    };
    for shard in &mut record.shards {
        if shard.result.is_none() && shard.current().is_some_and(|a| a.stage == Stage::Done) {
            settle(&job, shard, now);
        }
    }
}

pub(super) fn apply_done(record: &mut JobRecord, action: &Action, done: Done, now: DateTime<Utc>) {
    match (action, done) {
        (_, Done::NotStarted) => withdraw(record, action, now),
        (Action::Launch { request }, Done::Launched(mut instances)) => {
            let assigned: BTreeSet<String> = record.instance_ids().into_iter().collect();
            instances.retain(|i| !assigned.contains(&i.instance_id));
            instances.sort_by(|a, b| (a.launch_index, &a.instance_id).cmp(&(b.launch_index, &b.instance_id)));
            let mut instances = instances.into_iter();
            let mut short = 0;
            for shard in &mut record.shards {
                let Some(a) = shard.current_mut() else { continue };
                if a.launch_token.as_deref() != Some(request.client_token.as_str())
                    || a.stage != Stage::Launching
                    || a.instance_id.is_some()
                {
                    continue;
                }
                match instances.next() {
                    Some(view) => {
                        a.instance_id = Some(view.instance_id.clone());
                        a.availability_zone = Some(view.availability_zone.clone());
                        a.launched_at = Some(now);
                        a.stage = Stage::Booting;
                    }
                    None => {
                        // EC2 filled part of the batch: the rest launch next pass.
                        a.launch_token = None;
                        short += 1;
                    }
                }
            }
            if short > 0 {
                record.warnings.push(format!("a launch got fewer instances than asked; {short} retried"));
                dedup_warnings(record);
            }
        }
        (Action::CreateVolume { request }, Done::Created(volume_id)) => {
            for v in record.shards.iter_mut().filter_map(|s| s.current_mut()).flat_map(|a| a.volumes.iter_mut()) {
                // A volume already given up on (its attempt ended before the
                // reply) stays unrecorded: the final sweep deletes it, unattached.
                if v.token == request.client_token && v.volume_id.is_none() && !v.deleted {
                    v.volume_id = Some(volume_id.clone());
                    v.created_at = Some(now);
                }
            }
        }
        (Action::Send { batch, .. }, Done::Sent(command_id)) => {
            if let Some(batch) = record.commands.get_mut(batch) {
                batch.command_id = Some(command_id);
                batch.in_flight_until = None;
                // Timeouts count from the send, not from a throttled wait before it.
                batch.dispatched_at = now;
                // Nothing to list yet: its end comes as an event, or a safety poll finds it.
                batch.listed_at = Some(now);
            }
        }
        (Action::Snapshot { volume_id, .. }, Done::Snapshotted(snapshot_id)) => {
            for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
                if v.volume_id.as_deref() == Some(volume_id.as_str()) && v.kept.is_none() && !v.deleted {
                    if let Some(snapshot) = v.snapshot.as_mut().filter(|s| s.snapshot_id.is_none()) {
                        snapshot.snapshot_id = Some(snapshot_id.clone());
                        snapshot.state = "pending".into();
                        snapshot.in_flight_until = None;
                    }
                }
            }
        }
        (Action::DeleteVolume { volume_id }, _) => mark_deleted(record, volume_id),
        (Action::Prune { volume, .. }, Done::Pruned(ids)) => {
            record.pruned.push(volume.clone());
            record.pruned_snapshots.extend(ids);
        }
        (Action::WriteReport, _) => record.report_written = true,
        (Action::TagHold { .. }, _) => {
            if let Some(hold) = record.hold.as_mut() {
                hold.tagged = true;
            }
        }
        _ => {}
    }
}
