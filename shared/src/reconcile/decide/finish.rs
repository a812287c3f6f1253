//! Finishing: the job's outcome, its state, and its final report and cleanup.

use super::*;

/// How long each attempt's instance was billed: from its launch to the first
/// pass that saw it stopped or terminated, or finished releasing it.
pub(super) fn stamp_billed(record: &mut JobRecord, obs: &Observation, now: DateTime<Utc>) {
    for attempt in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()) {
        let Some(launched_at) = attempt.launched_at.filter(|_| attempt.billed_seconds.is_none()) else { continue };
        let seen_gone =
            attempt.instance_id.as_ref().and_then(|id| obs.instances.get(id)).is_some_and(|view| view.is_gone());
        if seen_gone || attempt.stage == Stage::Done {
            attempt.billed_seconds = Some((now - launched_at).num_seconds().clamp(0, i64::from(u32::MAX)) as u32);
        }
    }
}

/// Cancel, deadline, or a shard that failed for good: decide the outcome once.
pub(super) fn check_abort(record: &mut JobRecord, now: DateTime<Utc>) {
    if record.outcome.is_some() || record.shards.iter().all(|s| s.result.is_some()) {
        return;
    }
    let (outcome, reason) = if record.cancel_requested {
        (Outcome::Cancelled, format!("cancelled by request while {}", record.state))
    } else if record.deadline_at.is_some_and(|d| now > d) {
        let minutes = record.spec.as_ref().map(|s| s.deadline_minutes).unwrap_or_default();
        (Outcome::Failed, format!("deadline of {minutes} min passed while {}", record.state))
    } else if let Some(failed) = record.shards.iter().find(|s| s.result.as_ref().is_some_and(|r| !r.succeeded)) {
        let reason = failed.result.as_ref().map(|r| r.reason.clone()).unwrap_or_default();
        (Outcome::Failed, format!("shard {} failed: {reason}", failed.index))
    } else {
        return;
    };
    record.outcome = Some(outcome);
    record.outcome_reason = Some(reason);
}

/// Every shard has its result: sweep by tag, prune retention, write the
/// report, then the terminal state.
pub(super) fn finish(record: &mut JobRecord, spec: &JobSpec, obs: &Observation, decision: &mut Decision) {
    decide_outcome(record);
    if sweep(record, obs, decision) {
        decision.look_within(5);
        return;
    }
    if let Some(tag) = tag_hold(record) {
        decision.actions.push(tag);
        return;
    }
    let name = job_name(record);
    let took_snapshots: BTreeSet<String> = record.snapshots().into_iter().map(|(volume, _)| volume).collect();
    let mut pruning = false;
    // Only a succeeded run prunes: a failed one must not push out the
    // snapshots of the last good run.
    let succeeded = record.outcome == Some(Outcome::Succeeded);
    for volume in &spec.volumes {
        if succeeded && took_snapshots.contains(&volume.name) && !record.pruned.contains(&volume.name) {
            decision.actions.push(Action::Prune {
                volume: volume.name.clone(),
                // Good only in a run that SUCCEEDED: one per shard, its last attempt's.
                finals: record.final_snapshots(&volume.name),
                job_name: name.clone(),
                keep_last: volume.retention.keep_last,
                max_age_days: volume.retention.max_age_days,
            });
            pruning = true;
        }
    }
    if pruning {
        return;
    }
    if !record.report_written {
        decision.actions.push(Action::WriteReport);
        return;
    }
    let outcome = record.outcome.unwrap_or(Outcome::Failed);
    record.state = outcome.terminal_state();
    record.reason = record.outcome_reason.clone().unwrap_or_default();
}

/// The job's outcome once every shard has its result, unless a stop
/// decided it. A run whose cleanup could not finish (a refused delete, a
/// volume kept because its snapshots failed, an instance left for the
/// reaper) is not a success: the user must look at what was left.
fn decide_outcome(record: &mut JobRecord) {
    let left: Vec<String> = record
        .attempts()
        .flat_map(|a| {
            let volumes = a.volumes.iter().filter(|v| v.created && v.kept.is_some()).map(|v| {
                format!("volume {} kept: {}", v.volume_id.as_deref().unwrap_or("?"), v.kept.as_deref().unwrap_or(""))
            });
            let instance = a
                .left_for_reaper
                .as_ref()
                .map(|why| format!("instance {} left: {why}", a.instance_id.as_deref().unwrap_or("?")));
            volumes.chain(instance)
        })
        .collect();
    if record.outcome.is_none()
        && !left.is_empty()
        && record.shards.iter().all(|s| s.result.as_ref().is_some_and(|r| r.succeeded))
    {
        record.outcome = Some(Outcome::Failed);
        record.outcome_reason = Some(format!("the work succeeded but cleanup did not finish: {}", left[0]));
    }
    if record.outcome.is_none() {
        let failed = record.shards.iter().find(|s| s.result.as_ref().is_some_and(|r| !r.succeeded));
        match failed {
            None => {
                record.outcome = Some(Outcome::Succeeded);
                record.outcome_reason = Some("all shards succeeded".into());
            }
            Some(shard) => {
                record.outcome = Some(Outcome::Failed);
                let reason = shard.result.as_ref().map(|r| r.reason.clone()).unwrap_or_default();
                record.outcome_reason = Some(format!("shard {} failed: {reason}", shard.index));
            }
        }
    }
}

/// Anything carrying this job's tag that a lost reply or a crash left:
/// instances are terminated, volumes never attached are deleted. True
/// while something is still going.
fn sweep(record: &JobRecord, obs: &Observation, decision: &mut Decision) -> bool {
    let mut busy = false;
    let abandoned: BTreeSet<&String> =
        record.attempts().filter(|a| a.left_for_reaper.is_some()).filter_map(|a| a.instance_id.as_ref()).collect();
    let give_up = record.cleanup_failures >= RELEASE_ERRORS * 2;
    for view in obs.instances.values() {
        if abandoned.contains(&view.instance_id) || give_up {
            continue;
        }
        if !view.is_terminated() {
            busy = true;
            if view.state != InstanceState::ShuttingDown {
                decision.terminate.push(view.instance_id.clone());
            }
        }
    }
    // Volumes the record still counts as live (or kept on purpose); any other
    // volume with a token tag was made by a lost reply, or marked deleted
    // too early: never attached by us, so no data.
    let known: BTreeSet<String> = record
        .attempts()
        .flat_map(|a| a.volumes.iter())
        .filter(|v| !v.deleted || v.kept.is_some())
        .filter_map(|v| v.volume_id.clone())
        .collect();
    // Every id the record ever held: one it marked gone that shows up again
    // may hold data, so it is the reaper's (which snapshots first), not ours.
    let recorded: BTreeSet<String> =
        record.attempts().flat_map(|a| a.volumes.iter()).filter_map(|v| v.volume_id.clone()).collect();
    for view in obs.volumes.values() {
        // Created under a token whose reply was lost and never attached: no data.
        if !known.contains(&view.volume_id)
            && !recorded.contains(&view.volume_id)
            && view.tags.contains_key(tags::ATTEMPT)
        {
            match (&view.state, view.attached_to.is_some()) {
                (VolumeState::Available, false) => {
                    decision.actions.push(Action::DeleteVolume { volume_id: view.volume_id.clone() })
                }
                (VolumeState::Deleting | VolumeState::Deleted, _) => continue,
                _ => {}
            }
            busy = true;
        }
    }
    busy
}

/// Drop what finished resources no longer need, so a 1,000-shard record
/// stays small.
pub(super) fn compact(record: &mut JobRecord) {
    for attempt in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()) {
        if attempt.stage == Stage::Done {
            attempt.terminate_requested = false;
        }
        for volume in attempt.volumes.iter_mut().filter(|v| v.deleted) {
            volume.created_at = None;
            volume.seen = false;
        }
        for run in attempt.phases.iter_mut().filter(|p| p.status.is_some()) {
            run.opened_at = None;
        }
    }
}

/// The job's state, derived from its shards, and a reason in words.
pub(super) fn update_state(record: &mut JobRecord, now: DateTime<Utc>) {
    if !record.state.is_terminal() {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut stages = BTreeSet::new();
        for shard in &record.shards {
            if shard.result.is_some() {
                *counts.entry("done").or_default() += 1;
                continue;
            }
            if let Some(a) = shard.current() {
                stages.insert(a.stage as u8);
                let label = match a.stage {
                    Stage::Launching => "launching",
                    Stage::Booting => "booting",
                    Stage::Attaching => "attaching volumes",
                    Stage::Working => "working",
                    Stage::Releasing => "releasing",
                    Stage::Done => "done",
                };
                *counts.entry(label).or_default() += 1;
            }
        }
        let has = |s: Stage| stages.contains(&(s as u8));
        record.state = if stages.is_empty() {
            JobState::TearingDown
        } else if has(Stage::Working) {
            JobState::Running
        } else if has(Stage::Booting) || has(Stage::Attaching) {
            JobState::WaitingReady
        } else if has(Stage::Launching) {
            JobState::Launching
        } else {
            JobState::Snapshotting
        };
        let summary: Vec<String> = counts.iter().map(|(label, n)| format!("{n} {label}")).collect();
        let total = record.shards.len();
        record.reason = match &record.outcome_reason {
            Some(reason) if record.outcome != Some(Outcome::Succeeded) => {
                format!("{reason}; shards of {total}: {}", summary.join(", "))
            }
            _ => format!("shards of {total}: {}", summary.join(", ")),
        };
    }
    if record.timeline.last().map(|s| s.state) != Some(record.state) {
        record.timeline.push(PhaseStamp { state: record.state, at: now });
    }
}
