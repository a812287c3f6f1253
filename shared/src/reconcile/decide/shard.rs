//! One shard's step in a pass: where its current attempt stands and
//! which of the other files moves it on.

use super::*;

pub(super) fn step_shard(
    job: &JobFacts<'_>,
    shard: &mut Shard,
    commands: &BTreeMap<u64, CommandBatch>,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) {
    let now = ctx.now;
    let index = shard.index;
    let restore_from = restore_snapshots(job.spec, shard);
    let Some(attempt) = shard.attempts.last_mut() else { return };

    end_past_attempt_timeout(job, attempt, now, decision);
    // Loss and stop conditions, before the stage's own work.
    if matches!(attempt.stage, Stage::Booting | Stage::Attaching | Stage::Working) {
        stop_if_lost_or_stopping(job, index, attempt, commands, obs, ctx, decision);
    }
    match attempt.stage {
        Stage::Launching => {
            decision.look_within(ctx.settings.poll_delay_seconds);
            if job.aborting {
                // A launch may have happened under its token: the final sweep
                // terminates whatever carries this job's tag.
                end(attempt, EndCause::Aborted, "job stopped before launch", None);
                attempt.stage = Stage::Done;
            }
        }
        Stage::Booting => boot(attempt, obs, ctx, decision),
        _ => {}
    }
    if attempt.stage == Stage::Attaching {
        attach(job, index, attempt, &restore_from, obs, now, decision);
    }
    if attempt.stage == Stage::Working {
        work(job, index, attempt, commands, obs, ctx, decision);
        if attempt.stage == Stage::Working {
            // Events say when a command ends; this poll is the safety net.
            // What no event announces (a timeout, a failing health check
            // coming to its limit, the deadline) is looked at when it is due.
            let next = next_working_look(job, attempt, commands, ctx.settings, now);
            decision.look_within((next - now).num_seconds().clamp(1, i64::from(u32::MAX)) as u32);
        }
    }
    if attempt.stage == Stage::Releasing {
        release_and_look(job, index, attempt, obs, ctx, decision);
    }

    let done = attempt.stage == Stage::Done;
    if done {
        for volume in &mut attempt.volumes {
            if let Some(snapshot) = volume.snapshot.as_mut() {
                snapshot.requested_at = None;
            }
        }
    }
    for note in std::mem::take(&mut decision.notes) {
        shard.note(now, note);
    }
    if done {
        settle(job, shard, now);
    }
}

/// AWS Batch's attempt timeout: an attempt that has not finished its work
/// this long after launch ends TimedOut (its work is cancelled, cleanup runs).
fn end_past_attempt_timeout(job: &JobFacts<'_>, attempt: &mut Attempt, now: DateTime<Utc>, decision: &mut Decision) {
    let attempt_timeout = job.spec.retry.as_ref().and_then(|r| r.attempt_timeout_seconds);
    if let (Some(limit), Some(at), None) = (attempt_timeout, attempt.launched_at, attempt.end.as_ref()) {
        if matches!(attempt.stage, Stage::Booting | Stage::Attaching | Stage::Working)
            && !attempt.completed_phases.contains(&Phase::Run)
            && now - at > Duration::seconds(i64::from(limit))
        {
            let detail = format!("attempt exceeded attempt_timeout_seconds {limit}");
            decision.notes.push(detail.clone());
            end(attempt, EndCause::TimedOut, &detail, None);
            attempt.timed_out = true;
            if attempt.stage != Stage::Working {
                attempt.stage = Stage::Releasing;
            }
        }
    }
}

/// The instance is gone, vanished or unhealthy; or the bill's bound has
/// passed, the job is stopping, or a spot warning came: the attempt moves
/// to releasing (a working one stops its command first, in `work`).
fn stop_if_lost_or_stopping(
    job: &JobFacts<'_>,
    index: u32,
    attempt: &mut Attempt,
    commands: &BTreeMap<u64, CommandBatch>,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) {
    let now = ctx.now;
    let instance = attempt.instance_id.as_ref().and_then(|id| obs.instances.get(id));
    track_health(attempt, instance, obs, now);
    let lost = match instance {
        Some(view) if view.is_gone() => Some(format!("instance {} became {}", view.instance_id, view.state)),
        None if attempt.launched_at.is_some_and(|at| now - at > Duration::seconds(VANISHED_AFTER_SECONDS)) => {
            Some(format!("instance {} vanished", attempt.instance_id.as_deref().unwrap_or("?")))
        }
        Some(view) => unhealthy(attempt, &view.instance_id, now, ctx.settings),
        None => None,
    };
    if let Some(detail) = lost {
        // Whatever the attempt was doing (cleanup included) died with it;
        // work already done stays done (its snapshot is crash-consistent).
        if attempt.completed_phases.contains(&Phase::Run) {
            decision.notes.push(format!("{detail} after its work succeeded; cleanup skipped"));
            end(attempt, EndCause::Succeeded, "", Some(0));
            let cleaned = planned_phases(job.spec, index)
                .iter()
                .all(|p| !p.runs_after_failure() || attempt.completed_phases.contains(p));
            if !cleaned {
                // Its snapshot is crash-consistent, not clean: never good.
                attempt.cleanup_failed.get_or_insert(format!("shard {index}: {detail} before cleanup finished"));
                attempt.cleanup_lost = true;
            }
        } else {
            let cause = if attempt.interrupted { EndCause::SpotInterruption } else { EndCause::InstanceLost };
            end(attempt, cause, &detail, None);
        }
        decision.notes.push(detail);
        attempt.stage = Stage::Releasing;
    } else if job.past_bound {
        stop_at_bound(attempt, index, commands, now, decision);
    } else if job.aborting && attempt.stage != Stage::Working {
        end(attempt, EndCause::Aborted, "job stopping", None);
        attempt.stage = Stage::Releasing;
    } else if attempt.interrupted && attempt.stage != Stage::Working {
        end(attempt, EndCause::SpotInterruption, "spot interruption warning", None);
        attempt.stage = Stage::Releasing;
    }
}

/// A booting instance moves on once it runs and its agent is Online; an
/// agent that never comes ends the attempt.
fn boot(attempt: &mut Attempt, obs: &Observation, ctx: &Context<'_>, decision: &mut Decision) {
    let now = ctx.now;
    let instance = attempt.instance_id.as_ref().and_then(|id| obs.instances.get(id));
    let Some(view) = instance.filter(|view| view.state == InstanceState::Running) else {
        decision.look_within(10);
        return;
    };
    attempt.availability_zone = Some(view.availability_zone.clone());
    if obs.online.contains(&view.instance_id) {
        attempt.stage = Stage::Attaching;
        attempt.ready_after = crate::record::seconds_after(attempt.launched_at, Some(now));
    } else if attempt
        .launched_at
        .is_some_and(|at| now - at > Duration::seconds(i64::from(ctx.settings.agent_timeout_seconds)))
    {
        let detail = format!(
            "SSM agent of {} not Online after {} s (instance profile? SSM endpoint?)",
            view.instance_id, ctx.settings.agent_timeout_seconds
        );
        end(attempt, EndCause::AgentNeverOnline, &detail, None);
        decision.notes.push(detail);
        attempt.stage = Stage::Releasing;
    } else {
        // No event says an agent came Online: look again soon,
        // then less often, so the wait adds at most a fifth.
        let waited = attempt.launched_at.map_or(0, |at| (now - at).num_seconds().max(0));
        let most = i64::from(ctx.settings.poll_delay_seconds).max(AGENT_POLL_MIN_SECONDS);
        decision.look_within((waited / 5).clamp(AGENT_POLL_MIN_SECONDS, most) as u32);
    }
}

/// Volumes made and attached: the attempt works once all are; a volume it
/// cannot have ends the attempt, with nothing more created for it.
fn attach(
    job: &JobFacts<'_>,
    index: u32,
    attempt: &mut Attempt,
    restore_from: &BTreeMap<String, Option<String>>,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) {
    if attempt.volumes.is_empty() {
        for (name, snapshot_id) in restore_from {
            decision.notes.push(match snapshot_id {
                Some(id) => format!("volume {name} restored from {id}, the last attempt's snapshot"),
                None => format!("volume {name} starts fresh: the last attempt's volume has no completed snapshot"),
            });
        }
    }
    let before = decision.actions.len();
    match attach_volumes(job, index, attempt, restore_from, obs, now, decision) {
        Ok(true) => {
            attempt.stage = Stage::Working;
        }
        Ok(false) => decision.look_within(5),
        Err(detail) => {
            // The attempt ends here: create or attach nothing more for it.
            decision.actions.truncate(before);
            end(attempt, EndCause::Permanent, &detail, None);
            decision.notes.push(detail);
            attempt.stage = Stage::Releasing;
        }
    }
}

/// Release, and when to look again if something is left.
fn release_and_look(
    job: &JobFacts<'_>,
    index: u32,
    attempt: &mut Attempt,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) {
    let now = ctx.now;
    let before = decision.actions.len();
    if release(job, index, attempt, obs, now, decision) {
        attempt.stage = Stage::Done;
        return;
    }
    let events = ctx.settings.safety_poll_seconds.is_some() && job.spec.role_arn.is_none();
    let waited = snapshot_wait(attempt, events, now);
    decision.look_within(waited.unwrap_or_else(|| release_wait(attempt, instance_gone_at(attempt), events, now)));
    // A deleted volume settles its shard on the next look, and no
    // event says so: look again soon (a big job's gap still batches).
    if decision.actions[before..].iter().any(|a| matches!(a, Action::DeleteVolume { .. })) {
        decision.look_within(1);
    }
    // Held for a snapshot's answer: terminate right after.
    if !attempt.terminate_requested && decision.actions[before..].iter().any(|a| matches!(a, Action::Snapshot { .. })) {
        decision.look_within(1);
    }
}

/// The bound on the bill has passed: stop waiting on any step. A command in
/// flight is cancelled (best effort: the instance goes anyway); the volumes
/// still mounted are snapshotted while attached, then the instance is
/// terminated (`release`). Work that finished keeps its result, but its
/// cleanup did not finish, so no snapshot of it counts as good.
pub(super) fn stop_at_bound(
    attempt: &mut Attempt,
    shard: u32,
    commands: &BTreeMap<u64, CommandBatch>,
    now: DateTime<Utc>,
    decision: &mut Decision,
) {
    let instance_id = attempt.instance_id.clone().unwrap_or_default();
    for run in attempt.phases.iter_mut().filter(|p| p.status.is_none()) {
        if let Some(command_id) = commands.get(&run.batch).and_then(|b| b.command_id.clone()) {
            decision.actions.push(Action::Cancel { command_id, instance_ids: vec![instance_id.clone()] });
        }
        run.status = Some("Cancelled".into());
        run.finished_at = Some(now);
    }
    let detail = "stopped at the job's bound (deadline or cancel, plus the cleanup grace)";
    if attempt.completed_phases.contains(&Phase::Run) {
        end(attempt, EndCause::Succeeded, "", Some(0));
        attempt.cleanup_failed.get_or_insert(format!("shard {shard}: cleanup {detail}"));
    } else {
        end(attempt, EndCause::Aborted, detail, None);
    }
    attempt.at_bound = true;
    attempt.stage = Stage::Releasing;
    decision.notes.push(format!("{instance_id}: {detail}"));
}

pub(super) fn end(attempt: &mut Attempt, cause: EndCause, detail: &str, exit_code: Option<i32>) {
    if attempt.end.is_none() {
        attempt.end = Some(AttemptEnd { cause, detail: detail.to_string(), exit_code });
    }
}
