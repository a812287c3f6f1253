//! The one place where job and shard state changes: a pure function of
//! (record, observation, now) that returns the actions to take, and a pure
//! function that folds each action's result back into the record.
//!
//! Every action's intent (a ClientToken, a command comment, a snapshot
//! request) is in the record before the action runs, so a pass that crashes
//! after any call is finished by the next pass without repeating it.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, SecondsFormat, Utc};

use crate::error::{CloudError, RetryClass};
use crate::mutation::{self, Mutation};
use crate::ports::{
    tags, CommandRequest, InstanceView, InvocationView, LaunchRequest, NewVolume, Settings, SnapshotView, VolumeView,
    MAX_INSTANCES_PER_COMMAND,
};
use crate::reconcile::fence;
use crate::record::*;
use crate::retention;
use crate::shell::{self, MountTarget, Preamble};
use crate::spec::{
    pattern_matches, CommandSpec, JobSpec, OnRetry, RetryAction, RetryStrategy, SnapshotPolicy, VolumeSource,
};

/// What one pass saw of the cloud: a few batched, paginated calls.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// This job's instances by id, found by tag, in every state.
    pub instances: BTreeMap<String, InstanceView>,
    /// Instances whose SSM agent is Online.
    pub online: BTreeSet<String>,
    /// This job's volumes (by tag) and its `volume_id` sources, by id.
    pub volumes: BTreeMap<String, VolumeView>,
    /// This job's snapshots, by id.
    pub snapshots: BTreeMap<String, SnapshotView>,
    /// By (command id, instance id).
    pub invocations: BTreeMap<(String, String), InvocationView>,
    /// Recorded volumes that DescribeVolumes says no longer exist.
    pub gone_volumes: BTreeSet<String>,
    /// Instances whose agent was asked about this pass (a command waits to be
    /// sent, or the health check ran).
    pub agents_checked: BTreeSet<String>,
    /// The health check was due this pass (its clock moves on even if the
    /// status checks could not be read).
    pub health_due: bool,
    /// Status checks were read this pass.
    pub health_checked: bool,
    /// Instances whose instance or system status check is `impaired`, and
    /// those whose checks are both `ok`.
    pub impaired: BTreeSet<String>,
    pub healthy: BTreeSet<String>,
    /// Commands whose invocations were listed this pass.
    pub listed_commands: BTreeSet<String>,
    /// Batches with no command id whose send is found to have reached SSM
    /// (by its comment), with the command id.
    pub sent: BTreeMap<u64, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Launch {
        request: LaunchRequest,
    },
    CreateVolume {
        request: NewVolume,
    },
    Attach {
        volume_id: String,
        instance_id: String,
        device: String,
    },
    /// With `look_first` (a send decided before this pass, whose reply may
    /// have been lost) the executor looks the comment up first and sends
    /// only if it finds nothing.
    Send {
        batch: u64,
        request: CommandRequest,
        look_first: bool,
    },
    /// SSM cancels only the named instances' invocations.
    Cancel {
        command_id: String,
        instance_ids: Vec<String>,
    },
    Terminate {
        instance_ids: Vec<String>,
    },
    /// With `look_first` (requested before this pass) the executor looks
    /// for a snapshot with these tags first.
    Snapshot {
        volume_id: String,
        description: String,
        tags: BTreeMap<String, String>,
        look_first: bool,
    },
    DeleteVolume {
        volume_id: String,
    },
    /// A SUCCEEDED run tags its final snapshots of the volume `flotilla:good`
    /// (the only snapshots `keep_last` counts), then applies the lineage's
    /// retention (`retention.rs`); never to this job's own.
    Prune {
        volume: String,
        finals: Vec<String>,
        job_name: String,
        keep_last: u32,
        max_age_days: u32,
    },
    /// The tail of one shard's phase output, beside the record in S3.
    SaveOutput {
        name: String,
        body: String,
    },
    WriteReport,
}

/// Lines of output kept per shard and phase; the full output is in S3.
pub const OUTPUT_TAIL_LINES: usize = 50;

/// Where a shard's phase output tail is kept, under `jobs/<id>/`.
pub fn output_name(shard: u32, attempt: u32, phase: Phase) -> String {
    format!("output/{shard}/{attempt}-{}.txt", phase.as_str())
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Launch { .. } => "RunInstances",
            Action::CreateVolume { .. } => "CreateVolume",
            Action::Attach { .. } => "AttachVolume",
            Action::Send { .. } => "SendCommand",
            Action::Cancel { .. } => "CancelCommand",
            Action::Terminate { .. } => "TerminateInstances",
            Action::Snapshot { .. } => "CreateSnapshot",
            Action::DeleteVolume { .. } => "DeleteVolume",
            Action::Prune { .. } => "PruneSnapshots",
            Action::SaveOutput { .. } => "SaveOutput",
            Action::WriteReport => "WriteReport",
        }
    }
}

impl Action {
    /// Draws on EC2's shared bucket of mutating actions (RunInstances has
    /// its own).
    pub fn is_mutating(&self) -> bool {
        self.waits_for_call_budget() || matches!(self, Action::Terminate { .. })
    }

    /// Whether the next round of the same pass can build on this action at
    /// once, with no change in the cloud to wait for. A failed action always
    /// can: `apply` holds back an offline agent, releases a failed batch,
    /// keeps a volume or retries a launch elsewhere. So can a launch (the
    /// shared budget is asked again for the shards still waiting, and says
    /// when to come back), pruning and the report (the record's last steps).
    /// Any other call's effect shows in seconds (volumes) or comes as an
    /// event (instances, commands, snapshots), which the pass's wait covers.
    pub fn unlocks_at_once(&self, failed: bool) -> bool {
        failed || matches!(self, Action::Launch { .. } | Action::Prune { .. } | Action::WriteReport)
    }

    /// A mutating call that waits when the bucket is empty. TerminateInstances
    /// takes its token but never waits: it stops the billing, and takes up to
    /// 1,000 instances a call.
    pub fn waits_for_call_budget(&self) -> bool {
        matches!(
            self,
            Action::CreateVolume { .. } | Action::Attach { .. } | Action::Snapshot { .. } | Action::DeleteVolume { .. }
        )
    }
}

/// An action the pass did not run (the shared budget of calls had none
/// left): undo the intent that would make the next pass look for its result.
/// A send or snapshot that never ran cannot land: it is not waited for.
pub fn withdraw(record: &mut JobRecord, action: &Action, now: DateTime<Utc>) {
    if let Action::Snapshot { volume_id, look_first: false, .. } = action {
        for volume in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
            if volume.volume_id.as_deref() == Some(volume_id.as_str())
                && volume.snapshot.as_ref().is_some_and(|s| s.snapshot_id.is_none())
            {
                volume.snapshot = None;
            }
        }
        return;
    }
    refused(record, action, now);
}

/// What an action returned.
#[derive(Debug)]
pub enum Done {
    Launched(Vec<InstanceView>),
    Created(String),
    Sent(String),
    Snapshotted(String),
    Pruned(Vec<String>),
    /// A create not started: it could not end before the lease does.
    NotStarted,
    Ok,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The job is terminal: no wake needed.
    Finished,
    /// Look again after this many seconds.
    After(u32),
}

/// Per-pass limits, so one pass stays inside its time budget; the rest
/// waits for the next pass. RunInstances: 5 requests burst, 2/s refill.
const MAX_LAUNCH_CALLS: usize = 4;
const MAX_VOLUME_CALLS: usize = 100;
/// How long past its own timeout a command may stay unreported before we cancel it.
const REPORT_GRACE_SECONDS: i64 = 120;
/// Mount and unmount get this long; they wait at most 60 s for a device.
const VOLUME_OP_TIMEOUT_SECONDS: u32 = 600;
/// An instance RunInstances returned but DescribeInstances never showed.
const VANISHED_AFTER_SECONDS: i64 = 600;
/// A snapshot that errors this often is given up on, and its volume kept.
const SNAPSHOT_TRIES: u32 = 3;
/// Permanent errors while releasing an attempt before leaving it to the reaper.
const RELEASE_ERRORS: u32 = 3;
/// A requested snapshot not visible this long is treated as failed.
const SNAPSHOT_LOST_SECONDS: i64 = 1800;

pub struct Context<'a> {
    pub now: DateTime<Utc>,
    pub settings: &'a Settings,
    pub bucket: &'a str,
    /// What the deployment's shared launch budget granted this pass (None:
    /// no admission control; launch everything waiting).
    pub launch_grant: Option<crate::admission::Grant>,
}

/// Decide the next actions for a job, updating shard and job state.
pub fn decide(record: &mut JobRecord, obs: &Observation, ctx: &Context<'_>) -> (Vec<Action>, Next) {
    if record.state.is_terminal() {
        return (vec![], Next::Finished);
    }
    let Some(spec) = record.spec.clone() else {
        record.state = JobState::Failed;
        record.reason = "record has no spec".into();
        return (vec![], Next::Finished);
    };
    let now = ctx.now;
    // Each stage that waits on something lowers this; a job whose shards
    // all work is polled only as the safety net, which grows with the
    // commands' age.
    let working = record.shards.iter().filter_map(|s| s.current()).any(|a| a.stage == Stage::Working);
    let base = if spec.role_arn.is_some() { ctx.settings.poll_delay_seconds } else { ctx.settings.safety_poll() };
    let ceiling = if working { working_poll(&spec, ctx.settings, now - Duration::days(1), now) } else { 0 };
    let mut wait = ctx.settings.poll_delay_seconds.max(base).max(ceiling);
    let mut actions = Vec::new();

    for instance_id in std::mem::take(&mut record.interruptions) {
        for shard in &mut record.shards {
            let Some(attempt) = shard.current_mut() else { continue };
            if attempt.instance_id.as_deref() == Some(instance_id.as_str()) && attempt.stage != Stage::Done {
                attempt.interrupted = true;
                shard.note(now, format!("spot interruption warning for {instance_id}"));
            }
        }
    }
    check_abort(record, now);
    adopt_launched(record, obs, now);
    // Sends whose reply was lost but that reached SSM: theirs now. One whose
    // phase was closed as never sent (a stopping job, after the takeover
    // window) landed late: it is cancelled, so cleanup does not wait on it.
    for (number, command_id) in &obs.sent {
        if let Some(batch) = record.commands.get_mut(number).filter(|b| b.command_id.is_none()) {
            batch.command_id = Some(command_id.clone());
            batch.listed_at = None;
            let late: Vec<String> = record
                .shards
                .iter()
                .filter_map(|s| s.current())
                .filter(|a| a.phases.iter().any(|p| p.batch == *number && p.status.as_deref() == Some("Cancelled")))
                .filter_map(|a| a.instance_id.clone())
                .collect();
            if !late.is_empty() {
                actions.push(Action::Cancel { command_id: command_id.clone(), instance_ids: late });
            }
        }
    }
    for batch in record.commands.values_mut() {
        if batch.command_id.as_ref().is_some_and(|id| obs.listed_commands.contains(id)) {
            batch.listed_at = Some(now);
        }
    }
    if obs.health_due {
        record.health_checked_at = Some(now);
    }

    let mut terminate: Vec<String> = Vec::new();
    let aborting = record.outcome.is_some();
    let bound = record.bill_bound(ctx.settings.cleanup_grace_minutes);
    let job = JobFacts {
        spec: &spec,
        job_id: record.job_id.clone(),
        aborting,
        tags: job_tags(record, &spec, ctx.settings),
        deadline_at: record.deadline_at,
        bound,
        past_bound: bound.is_some_and(|at| now >= at),
        stack: ctx.settings.stack.clone(),
        budget_seconds: ctx.settings.pass_budget_seconds,
    };
    if let Some(at) = bound.filter(|at| *at > now) {
        // A pass at the bound, whatever else the job waits on.
        wait = wait.min(u32::try_from((at - now).num_seconds().max(1)).unwrap_or(u32::MAX));
    }
    let commands = record.commands.clone();
    for index in 0..record.shards.len() {
        if record.shards[index].result.is_some() {
            continue;
        }
        let mut seq = record.next_seq;
        let shard = &mut record.shards[index];
        step_shard(&job, shard, &commands, obs, ctx, &mut seq, &mut actions, &mut terminate, &mut wait);
        record.next_seq = seq;
    }
    // A shard that failed for good stops the job (fail fast), with its reason.
    check_abort(record, now);

    plan_launches(record, &spec, ctx, &mut actions, &mut wait);
    plan_dispatch(record, &spec, obs, ctx, &mut actions, &mut wait);

    let all_done = record.shards.iter().all(|s| s.result.is_some());
    if all_done {
        finish(record, &spec, obs, &mut actions, &mut terminate, &mut wait);
    }
    if !terminate.is_empty() {
        terminate.sort();
        terminate.dedup();
        // First: nothing a pass runs before them keeps an instance billing.
        let terminations: Vec<Action> = if record.terminate_singly {
            terminate.into_iter().map(|id| Action::Terminate { instance_ids: vec![id] }).collect()
        } else {
            // TerminateInstances takes at most 1,000 ids.
            terminate.chunks(1000).map(|chunk| Action::Terminate { instance_ids: chunk.to_vec() }).collect()
        };
        actions.splice(0..0, terminations);
        wait = wait.min(5);
    }
    stamp_billed(record, obs, now);
    compact(record);
    update_state(record, now);
    if record.state.is_terminal() {
        return (actions, Next::Finished);
    }
    (actions, Next::After(wait.max(pass_gap(record.shards.len())).max(1)))
}

/// The shortest wait between a job's passes: none below 20 shards (each
/// event is acted on at once), then a second per 20 shards, at most 10 s:
/// a big job's shards reach their steps at scattered moments, and each
/// pass then serves many of them in the same batched calls.
pub fn pass_gap(shards: usize) -> u32 {
    (shards / 20).min(10) as u32
}

/// How long each attempt's instance was billed: from its launch to the first
/// pass that saw it stopped or terminated, or finished releasing it.
fn stamp_billed(record: &mut JobRecord, obs: &Observation, now: DateTime<Utc>) {
    for attempt in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()) {
        let Some(launched_at) = attempt.launched_at.filter(|_| attempt.billed_seconds.is_none()) else { continue };
        let seen_gone =
            attempt.instance_id.as_ref().and_then(|id| obs.instances.get(id)).is_some_and(|view| view.is_gone());
        if seen_gone || attempt.stage == Stage::Done {
            attempt.billed_seconds = Some((now - launched_at).num_seconds().clamp(0, i64::from(u32::MAX)) as u32);
        }
    }
}

struct JobFacts<'a> {
    spec: &'a JobSpec,
    job_id: String,
    aborting: bool,
    /// The tags on everything the job creates.
    tags: BTreeMap<String, String>,
    deadline_at: Option<DateTime<Utc>>,
    /// The bound on the bill (`JobRecord::bill_bound`): no command outlasts
    /// it, and at it every instance is stopped.
    bound: Option<DateTime<Utc>>,
    past_bound: bool,
    stack: String,
    /// A pass's time budget: the takeover rule's window counts from it.
    budget_seconds: u32,
}

/// Cancel, deadline, or a shard that failed for good: decide the outcome once.
fn check_abort(record: &mut JobRecord, now: DateTime<Utc>) {
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

#[allow(clippy::too_many_arguments)]
fn step_shard(
    job: &JobFacts<'_>,
    shard: &mut Shard,
    commands: &BTreeMap<u64, CommandBatch>,
    obs: &Observation,
    ctx: &Context<'_>,
    seq: &mut u64,
    actions: &mut Vec<Action>,
    terminate: &mut Vec<String>,
    wait: &mut u32,
) {
    let now = ctx.now;
    let index = shard.index;
    let restore_from = restore_snapshots(job.spec, shard);
    let Some(attempt) = shard.attempts.last_mut() else { return };
    let instance = attempt.instance_id.as_ref().and_then(|id| obs.instances.get(id));
    let mut notes: Vec<String> = Vec::new();

    // AWS Batch's attempt timeout: an attempt that has not finished its work
    // this long after launch ends TimedOut (its work is cancelled, cleanup runs).
    let attempt_timeout = job.spec.retry.as_ref().and_then(|r| r.attempt_timeout_seconds);
    if let (Some(limit), Some(at), None) = (attempt_timeout, attempt.launched_at, attempt.end.as_ref()) {
        if matches!(attempt.stage, Stage::Booting | Stage::Attaching | Stage::Working)
            && !attempt.completed_phases.contains(&Phase::Run)
            && now - at > Duration::seconds(i64::from(limit))
        {
            let detail = format!("attempt exceeded attempt_timeout_seconds {limit}");
            notes.push(detail.clone());
            end(attempt, EndCause::TimedOut, &detail, None);
            attempt.timed_out = true;
            if attempt.stage != Stage::Working {
                attempt.stage = Stage::Releasing;
            }
        }
    }

    // Loss and stop conditions, before the stage's own work.
    if matches!(attempt.stage, Stage::Booting | Stage::Attaching | Stage::Working) {
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
                notes.push(format!("{detail} after its work succeeded; cleanup skipped"));
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
            notes.push(detail);
            attempt.stage = Stage::Releasing;
        } else if job.past_bound {
            stop_at_bound(attempt, index, commands, now, actions, &mut notes);
        } else if job.aborting && attempt.stage != Stage::Working {
            end(attempt, EndCause::Aborted, "job stopping", None);
            attempt.stage = Stage::Releasing;
        } else if attempt.interrupted && attempt.stage != Stage::Working {
            end(attempt, EndCause::SpotInterruption, "spot interruption warning", None);
            attempt.stage = Stage::Releasing;
        }
    }

    match attempt.stage {
        Stage::Launching => {
            *wait = (*wait).min(ctx.settings.poll_delay_seconds);
            if job.aborting {
                // A launch may have happened under its token: the final sweep
                // terminates whatever carries this job's tag.
                end(attempt, EndCause::Aborted, "job stopped before launch", None);
                attempt.stage = Stage::Done;
            }
        }
        Stage::Booting => {
            let view = instance;
            match view {
                Some(view) if view.state == "running" => {
                    attempt.availability_zone = Some(view.availability_zone.clone());
                    if obs.online.contains(&view.instance_id) {
                        attempt.stage = Stage::Attaching;
                    } else if attempt
                        .launched_at
                        .is_some_and(|at| now - at > Duration::seconds(i64::from(ctx.settings.agent_timeout_seconds)))
                    {
                        let detail = format!(
                            "SSM agent of {} not Online after {} s (instance profile? SSM endpoint?)",
                            view.instance_id, ctx.settings.agent_timeout_seconds
                        );
                        end(attempt, EndCause::AgentNeverOnline, &detail, None);
                        notes.push(detail);
                        attempt.stage = Stage::Releasing;
                    } else {
                        // No event says an agent came Online: look again soon,
                        // then less often, so the wait adds at most a fifth.
                        let waited = attempt.launched_at.map_or(0, |at| (now - at).num_seconds().max(0));
                        let most = i64::from(ctx.settings.poll_delay_seconds).max(AGENT_POLL_MIN_SECONDS);
                        *wait = (*wait).min((waited / 5).clamp(AGENT_POLL_MIN_SECONDS, most) as u32);
                    }
                }
                _ => *wait = (*wait).min(10),
            }
        }
        _ => {}
    }

    if attempt.stage == Stage::Attaching {
        if attempt.volumes.is_empty() {
            for (name, snapshot_id) in &restore_from {
                notes.push(match snapshot_id {
                    Some(id) => format!("volume {name} restored from {id}, the last attempt's snapshot"),
                    None => format!("volume {name} starts fresh: the last attempt's volume has no completed snapshot"),
                });
            }
        }
        let before = actions.len();
        match attach_volumes(job, index, attempt, &restore_from, obs, now, seq, actions) {
            Ok(true) => {
                attempt.stage = Stage::Working;
            }
            Ok(false) => *wait = (*wait).min(5),
            Err(detail) => {
                // The attempt ends here: create or attach nothing more for it.
                actions.truncate(before);
                end(attempt, EndCause::Permanent, &detail, None);
                notes.push(detail);
                attempt.stage = Stage::Releasing;
            }
        }
    }

    if attempt.stage == Stage::Working {
        work(job, index, attempt, commands, obs, ctx, actions, &mut notes);
        if attempt.stage == Stage::Working {
            // Events say when a command ends; this poll is the safety net.
            // What no event announces (a timeout, a failing health check
            // coming to its limit, the deadline) is looked at when it is due.
            let next = next_working_look(job, attempt, commands, ctx.settings, now);
            *wait = (*wait).min((next - now).num_seconds().clamp(1, i64::from(u32::MAX)) as u32);
        }
    }

    if attempt.stage == Stage::Releasing {
        let before = actions.len();
        if release(job, index, attempt, obs, now, actions, terminate, &mut notes) {
            attempt.stage = Stage::Done;
        } else {
            let events = ctx.settings.safety_poll_seconds.is_some() && job.spec.role_arn.is_none();
            let waited = snapshot_wait(attempt, events, now);
            *wait =
                (*wait).min(waited.unwrap_or_else(|| release_wait(attempt, instance_gone_at(attempt), events, now)));
            // A deleted volume settles its shard on the next look, and no
            // event says so: look again soon (a big job's gap still batches).
            if actions[before..].iter().any(|a| matches!(a, Action::DeleteVolume { .. })) {
                *wait = (*wait).min(1);
            }
            // Held for a snapshot's answer: terminate right after.
            if !attempt.terminate_requested && actions[before..].iter().any(|a| matches!(a, Action::Snapshot { .. })) {
                *wait = (*wait).min(1);
            }
        }
    }

    let done = attempt.stage == Stage::Done;
    if done {
        for volume in &mut attempt.volumes {
            if let Some(snapshot) = volume.snapshot.as_mut() {
                snapshot.requested_at = None;
            }
        }
    }
    for note in notes {
        shard.note(now, note);
    }
    if done {
        settle(job, shard, now);
    }
}

/// Fold this pass's health check into the attempt: since when its status
/// checks fail, and since when its agent (while working) has not been Online.
fn track_health(attempt: &mut Attempt, instance: Option<&InstanceView>, obs: &Observation, now: DateTime<Utc>) {
    let Some(view) = instance.filter(|v| v.state == "running") else { return };
    let id = &view.instance_id;
    // Only a conclusive `ok` clears it: initializing or unknown proves nothing.
    if obs.impaired.contains(id) {
        attempt.impaired_since.get_or_insert(now);
    } else if obs.healthy.contains(id) {
        attempt.impaired_since = None;
    }
    if attempt.stage == Stage::Working && obs.agents_checked.contains(id) {
        if obs.online.contains(id) {
            attempt.agent_lost_since = None;
        } else {
            attempt.agent_lost_since.get_or_insert(now);
        }
    }
}

/// A running instance the job can no longer use: status checks impaired
/// for minutes, or an agent silent while it works. It is replaced like a
/// terminated one (its work, if unfinished, is retried).
fn unhealthy(attempt: &Attempt, instance_id: &str, now: DateTime<Utc>, settings: &Settings) -> Option<String> {
    let impaired_limit = Duration::seconds(i64::from(settings.impaired_timeout_seconds));
    if let Some(since) = attempt.impaired_since.filter(|at| now - *at >= impaired_limit) {
        return Some(format!(
            "instance {instance_id} failed its EC2 status checks (impaired) for {} s",
            (now - since).num_seconds()
        ));
    }
    let limit = Duration::seconds(i64::from(settings.agent_timeout_seconds));
    if let Some(since) = attempt.agent_lost_since.filter(|at| now - *at >= limit) {
        return Some(format!(
            "SSM agent of {instance_id} stopped reporting for {} s while it worked",
            (now - since).num_seconds()
        ));
    }
    None
}

/// For volumes that restore on retry, by name: the completed snapshot of the
/// volume the shard's latest earlier attempt had, or None when that volume
/// has none (kept after failed snapshots): never an older attempt's data.
fn restore_snapshots(spec: &JobSpec, shard: &Shard) -> BTreeMap<String, Option<String>> {
    let mut found = BTreeMap::new();
    let Some((_, earlier)) = shard.attempts.split_last() else { return found };
    for volume in spec.volumes.iter().filter(|v| v.on_retry == OnRetry::Restore) {
        let Some((owner, last)) =
            earlier.iter().rev().find_map(|a| a.volumes.iter().find(|v| v.name == volume.name).map(|v| (a, v)))
        else {
            continue; // no attempt got as far as creating it: start fresh
        };
        // Created empty and its mount never finished, so no step that writes
        // data ran on it: nothing to restore, and a volume restored from it
        // could be blank yet never formatted. Start fresh.
        let never_mounted = !owner.completed_phases.contains(&Phase::Mount);
        if last.created && last.restored_from.is_none() && never_mounted {
            continue;
        }
        let snapshot = last.snapshot.as_ref().filter(|s| s.state == "completed").and_then(|s| s.snapshot_id.clone());
        found.insert(volume.name.clone(), snapshot);
    }
    found
}

/// The bound on the bill has passed: stop waiting on any step. A command in
/// flight is cancelled (best effort: the instance goes anyway); the volumes
/// still mounted are snapshotted while attached, then the instance is
/// terminated (`release`). Work that finished keeps its result, but its
/// cleanup did not finish, so no snapshot of it counts as good.
fn stop_at_bound(
    attempt: &mut Attempt,
    shard: u32,
    commands: &BTreeMap<u64, CommandBatch>,
    now: DateTime<Utc>,
    actions: &mut Vec<Action>,
    notes: &mut Vec<String>,
) {
    let instance_id = attempt.instance_id.clone().unwrap_or_default();
    for run in attempt.phases.iter_mut().filter(|p| p.status.is_none()) {
        if let Some(command_id) = commands.get(&run.batch).and_then(|b| b.command_id.clone()) {
            actions.push(Action::Cancel { command_id, instance_ids: vec![instance_id.clone()] });
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
    notes.push(format!("{instance_id}: {detail}"));
}

fn end(attempt: &mut Attempt, cause: EndCause, detail: &str, exit_code: Option<i32>) {
    if attempt.end.is_none() {
        attempt.end = Some(AttemptEnd { cause, detail: detail.to_string(), exit_code });
    }
}

/// An attempt is over and released: retry, fail over, or record the result.
fn settle(job: &JobFacts<'_>, shard: &mut Shard, now: DateTime<Utc>) {
    let Some(attempt) = shard.attempts.last() else { return };
    let Some(ended) = attempt.end.clone() else {
        shard.result = Some(ShardResult { succeeded: false, reason: "attempt ended without a cause".into() });
        return;
    };
    let options = launch_options(job.spec);
    match ended.cause {
        // The instance or its agent was lost during cleanup after the work
        // succeeded: the work stands (never run twice), but its snapshot is
        // crash-consistent and not counted as good.
        EndCause::Succeeded if attempt.cleanup_lost => {
            let what = attempt.cleanup_failed.clone().unwrap_or_default();
            shard.note(now, format!("{what}: the work stands; its snapshot is crash-consistent"));
            shard.result = Some(ShardResult { succeeded: true, reason: String::new() });
        }
        EndCause::Succeeded if attempt.cleanup_failed.is_some() => {
            let what = attempt.cleanup_failed.clone().unwrap_or_default();
            shard.result = Some(ShardResult {
                succeeded: false,
                reason: format!(
                    "cleanup failed: {what} (the work finished; its volume snapshot is kept, not counted as good)"
                ),
            });
        }
        EndCause::Succeeded => {
            shard.result = Some(ShardResult { succeeded: true, reason: String::new() });
        }
        EndCause::Aborted | EndCause::Permanent => {
            shard.result = Some(ShardResult { succeeded: false, reason: ended.detail.clone() });
        }
        EndCause::Capacity => {
            let next = attempt.option + 1;
            if job.aborting {
                shard.result = Some(ShardResult { succeeded: false, reason: "job stopped".into() });
            } else if let Some(option) = options.get(next as usize) {
                // Nothing was launched: the same attempt moves to the next
                // option (the trail keeps why), so the record stays small.
                shard.note(now, format!("{} -> failing over to {}", ended.detail, describe_option(option)));
                if let Some(attempt) = shard.attempts.last_mut() {
                    *attempt = Attempt::new(attempt.number, next);
                }
            } else {
                shard.result = Some(ShardResult {
                    succeeded: false,
                    reason: format!("no capacity in any allowed option: {}", ended.detail),
                });
            }
        }
        cause if attempt.left_for_reaper.is_some() && !attempt.completed_phases.contains(&Phase::Run) => {
            // Its instance could not be terminated, so its work may still be
            // running: a retry could run the shard twice at once.
            let why = attempt.left_for_reaper.clone().unwrap_or_default();
            shard.result = Some(ShardResult {
                succeeded: false,
                reason: format!(
                    "{}: {}; not retried: instance {} could not be terminated ({why})",
                    cause.as_str(),
                    ended.detail,
                    attempt.instance_id.as_deref().unwrap_or("?")
                ),
            });
        }
        cause => {
            let strategy = job.spec.retry.clone().unwrap_or_default();
            let used = shard.attempts.last().map(|a| a.number).unwrap_or(1);
            let action = retry_action(&strategy, cause, ended.exit_code);
            if !job.aborting && action == RetryAction::Retry && used < strategy.attempts {
                let current = shard.attempts.last().cloned().expect("an attempt");
                // A spot interruption moves the slot to on-demand when allowed.
                let option = if cause == EndCause::SpotInterruption {
                    options
                        .iter()
                        .position(|o| o.market == crate::spec::Market::OnDemand)
                        .map(|p| p as u32)
                        .unwrap_or(current.option)
                } else {
                    current.option
                };
                let launch = options.get(option as usize).cloned().unwrap_or(LaunchOption {
                    instance_type: "?".into(),
                    subnet_id: None,
                    market: crate::spec::Market::OnDemand,
                });
                shard.note(
                    now,
                    format!(
                        "{}: {}; retrying (attempt {} of {}) on {}",
                        cause.as_str(),
                        ended.detail,
                        used + 1,
                        strategy.attempts,
                        describe_option(&launch)
                    ),
                );
                shard.attempts.push(Attempt::new(used + 1, option));
            } else {
                let why = if job.aborting {
                    "job stopping".to_string()
                } else if action == RetryAction::Exit {
                    "retry strategy says EXIT".to_string()
                } else {
                    format!("{used} of {} attempts used", strategy.attempts)
                };
                shard.result = Some(ShardResult {
                    succeeded: false,
                    reason: format!("{}: {} ({why})", cause.as_str(), ended.detail),
                });
            }
        }
    }
}

/// AWS Batch's evaluateOnExit: the first matching rule decides, else the default.
pub fn retry_action(strategy: &RetryStrategy, cause: EndCause, exit_code: Option<i32>) -> RetryAction {
    for rule in &strategy.evaluate_on_exit {
        let code_ok = rule
            .on_exit_code
            .as_ref()
            .is_none_or(|p| exit_code.is_some_and(|code| pattern_matches(p, &code.to_string())));
        let reason_ok = rule.on_reason.as_ref().is_none_or(|p| pattern_matches(p, cause.as_str()));
        if code_ok && reason_ok {
            return rule.action;
        }
    }
    match cause {
        EndCause::InstanceLost | EndCause::SpotInterruption | EndCause::AgentNeverOnline => RetryAction::Retry,
        _ => RetryAction::Exit,
    }
}

fn describe_option(option: &LaunchOption) -> String {
    let market = match option.market {
        crate::spec::Market::OnDemand => "on-demand",
        crate::spec::Market::Spot => "spot",
    };
    match &option.subnet_id {
        Some(subnet) => format!("{} {market} in {subnet}", option.instance_type),
        None => format!("{} {market}", option.instance_type),
    }
}

/// Volumes this shard gets: a `volume_id` source goes to shard 0 only.
fn volume_specs<'a>(spec: &'a JobSpec, shard: u32) -> impl Iterator<Item = &'a crate::spec::VolumeSpec> {
    spec.volumes.iter().filter(move |v| !matches!(v.source, VolumeSource::VolumeId(_)) || shard == 0)
}

/// Create (by token) and attach this attempt's volumes. True once all are
/// attached; Err with a reason when retrying cannot help.
#[allow(clippy::too_many_arguments)]
fn attach_volumes(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    restore_from: &BTreeMap<String, Option<String>>,
    obs: &Observation,
    now: DateTime<Utc>,
    seq: &mut u64,
    actions: &mut Vec<Action>,
) -> Result<bool, String> {
    let (Some(instance_id), Some(az)) = (attempt.instance_id.clone(), attempt.availability_zone.clone()) else {
        return Ok(false);
    };
    let mut all = true;
    for volume in volume_specs(job.spec, shard) {
        if !attempt.volumes.iter().any(|v| v.name == volume.name) {
            *seq += 1;
            let (volume_id, created) = match &volume.source {
                VolumeSource::VolumeId(id) => (Some(id.clone()), false),
                _ => (None, true),
            };
            attempt.volumes.push(AttemptVolume {
                restored_from: None,
                name: volume.name.clone(),
                // ClientToken: at most 64 ASCII characters; job ids are at most 48.
                token: client_token(&job.stack, &job.job_id, 'v', *seq),
                volume_id,
                created,
                created_at: None,
                seen: false,
                snapshot: None,
                snapshot_failures: 0,
                deleted: false,
                kept: None,
            });
        }
        let entry = attempt.volumes.iter().find(|v| v.name == volume.name).cloned().expect("just added");
        let Some(volume_id) = entry.volume_id.clone() else {
            let (size_gib, volume_type, mut snapshot_id) = match &volume.source {
                VolumeSource::New { size_gib, volume_type } => (Some(*size_gib), volume_type.clone(), None),
                VolumeSource::SnapshotId(id) => (None, "gp3".to_string(), Some(id.clone())),
                VolumeSource::VolumeId(_) => unreachable!("volume_id sources have an id"),
            };
            // A retry resumes from the lost attempt's data (same size: a
            // volume is at least as large as its snapshot).
            if let Some(Some(restored)) = restore_from.get(&volume.name) {
                snapshot_id = Some(restored.clone());
                if let Some(v) = attempt.volumes.iter_mut().find(|v| v.name == volume.name) {
                    v.restored_from = Some(restored.clone()); // never formatted
                }
            }
            let mut volume_tags = job.tags.clone();
            volume_tags.insert(tags::VOLUME.to_string(), volume.name.clone());
            volume_tags.insert(tags::INSTANCE.to_string(), instance_id.clone());
            volume_tags.insert(tags::SHARD.to_string(), shard.to_string());
            volume_tags.insert(tags::ATTEMPT.to_string(), entry.token.clone());
            if volume.snapshot == SnapshotPolicy::Never {
                // The reaper may delete it, if ever left behind, without a snapshot.
                volume_tags.insert(tags::SCRATCH.to_string(), "true".to_string());
            }
            actions.push(Action::CreateVolume {
                request: NewVolume {
                    availability_zone: az.clone(),
                    size_gib,
                    volume_type,
                    snapshot_id,
                    tags: volume_tags,
                    client_token: entry.token.clone(),
                },
            });
            all = false;
            continue;
        };
        let Some(view) = obs.volumes.get(&volume_id) else {
            if obs.gone_volumes.contains(&volume_id) && is_gone(&entry, now) {
                return Err(format!("volume {volume_id} does not exist"));
            }
            all = false; // just created, or not looked at yet
            continue;
        };
        if let Some(v) = attempt.volumes.iter_mut().find(|v| v.name == volume.name) {
            v.seen = true;
        }
        if view.availability_zone != az {
            return Err(format!(
                "volume {volume_id} is in {}, instance {instance_id} in {az}: EBS attaches only within one AZ",
                view.availability_zone
            ));
        }
        match (view.state.as_str(), view.attached_to.as_deref()) {
            (_, Some(owner)) if owner == instance_id => {}
            (_, Some(other)) => {
                if !entry.created {
                    return Err(format!("volume {volume_id} is attached to {other}, not to this job's {instance_id}"));
                }
                all = false;
            }
            ("available", None) => {
                actions.push(Action::Attach {
                    volume_id: volume_id.clone(),
                    instance_id: instance_id.clone(),
                    device: volume.device.clone(),
                });
                all = false;
            }
            ("error", _) => return Err(format!("volume {volume_id} is in state error")),
            _ => all = false,
        }
    }
    Ok(all)
}

/// The phases this job runs, in order.
pub fn planned_phases(spec: &JobSpec, shard: u32) -> Vec<Phase> {
    let has_volumes = volume_specs(spec, shard).next().is_some();
    Phase::ALL
        .into_iter()
        .filter(|phase| match phase {
            Phase::Mount | Phase::Unmount => has_volumes,
            Phase::Setup => spec.setup.is_some(),
            Phase::Run => true,
            Phase::BeforeUnmount => spec.before_unmount.is_some(),
        })
        .collect()
}

fn phase_spec(spec: &JobSpec, phase: Phase) -> Option<&CommandSpec> {
    match phase {
        Phase::Setup => spec.setup.as_ref(),
        Phase::Run => Some(&spec.run),
        Phase::BeforeUnmount => spec.before_unmount.as_ref(),
        Phase::Mount | Phase::Unmount => None,
    }
}

/// The step's own timeout, else what is left of the deadline: a work step
/// gets all of it (at least a minute), within SSM's 48 hours; a cleanup step,
/// which also runs after a cancel or the deadline, 10 minutes to an hour.
/// A phase's SSM timeout: its own, or what is left of the deadline, and
/// never past the bound on the bill.
pub fn phase_timeout(
    spec: &JobSpec,
    phase: Phase,
    deadline_at: Option<DateTime<Utc>>,
    bound: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> u32 {
    let own = own_phase_timeout(spec, phase, deadline_at, now);
    match bound {
        Some(at) => own.min(u32::try_from((at - now).num_seconds().max(1)).unwrap_or(u32::MAX)),
        None => own,
    }
}

fn own_phase_timeout(spec: &JobSpec, phase: Phase, deadline_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> u32 {
    let Some(step) = phase_spec(spec, phase) else { return VOLUME_OP_TIMEOUT_SECONDS };
    step.timeout_seconds.unwrap_or_else(|| {
        let left = deadline_at.map_or(i64::from(spec.deadline_minutes) * 60, |at| (at - now).num_seconds());
        let (least, most) = if phase.runs_after_failure() {
            (600, 3600)
        } else {
            (60, i64::from(crate::spec::MAX_STEP_TIMEOUT_SECONDS))
        };
        left.clamp(least, most) as u32
    })
}

/// Collect the phase in flight, then pick the next one. Work phases stop at
/// the first failure, cancel, deadline or interruption; cleanup phases run
/// after those if the volumes were mounted.
#[allow(clippy::too_many_arguments)]
fn work(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    commands: &BTreeMap<u64, CommandBatch>,
    obs: &Observation,
    ctx: &Context<'_>,
    actions: &mut Vec<Action>,
    notes: &mut Vec<String>,
) {
    let now = ctx.now;
    let instance_id = attempt.instance_id.clone().unwrap_or_default();
    let stopping = job.aborting || attempt.interrupted || attempt.timed_out;
    // SSM reports TimedOut for a command whose agent went away too: that is
    // the instance's failure, not the work's.
    let agent_offline_now = obs.agents_checked.contains(&instance_id) && !obs.online.contains(&instance_id);
    if let Some(run) = attempt.phases.iter_mut().find(|p| p.status.is_none()) {
        // No batch: held back while its agent is offline.
        let batch = commands.get(&run.batch);
        let dispatched_at = batch.map(|b| b.dispatched_at).or(run.opened_at).unwrap_or(now);
        let command_id = batch.and_then(|b| b.command_id.clone()).unwrap_or_default();
        let unsent = command_id.is_empty();
        if unsent {
            // Its Send is planned again (found by comment first).
            let in_flight = batch.and_then(|b| send_in_flight(b, job.budget_seconds, now)).is_some();
            if stopping && !run.phase.runs_after_failure() && in_flight {
                // It may still land: cleanup must not run beside it. It is
                // looked up until it is found (then cancelled) or cannot land.
                return;
            } else if stopping && !run.phase.runs_after_failure() {
                run.status = Some("Cancelled".into());
                run.finished_at = Some(now);
            } else if now
                > run.opened_at.unwrap_or(dispatched_at)
                    + Duration::seconds(i64::from(ctx.settings.agent_timeout_seconds))
            {
                // SSM would not take the command this long: its agent is gone.
                let detail = format!("SSM agent of {instance_id} stopped answering before {}", run.phase.as_str());
                let in_cleanup = run.phase.runs_after_failure();
                if attempt.completed_phases.contains(&Phase::Run) {
                    end(attempt, EndCause::Succeeded, "", Some(0)); // the work is done
                    if in_cleanup {
                        attempt.cleanup_failed.get_or_insert(format!("shard {shard}: {detail}"));
                        attempt.cleanup_lost = true;
                    }
                } else {
                    end(attempt, EndCause::InstanceLost, &detail, None);
                }
                notes.push(detail);
                attempt.stage = Stage::Releasing;
                return;
            } else {
                return;
            }
        }
        let sent_timeout = phase_timeout(job.spec, run.phase, job.deadline_at, job.bound, dispatched_at);
        let timeout = Duration::seconds(i64::from(sent_timeout) + REPORT_GRACE_SECONDS);
        // The step guard said an earlier delivery of this step died mid-step.
        let mut guard_lost = false;
        match obs.invocations.get(&(command_id.clone(), instance_id.clone())) {
            _ if unsent => {}
            Some(view) if view.is_finished() => {
                guard_lost = view.exit_code == Some(shell::LOST_EXIT_CODE) && view.stderr.contains(shell::LOST_MARKER);
                let mut lines: Vec<&str> = view.stdout.lines().collect();
                let stderr: Vec<String> = view.stderr.lines().map(|l| format!("[stderr] {l}")).collect();
                lines.extend(stderr.iter().map(String::as_str));
                if !lines.is_empty() {
                    let skip = lines.len().saturating_sub(OUTPUT_TAIL_LINES);
                    actions.push(Action::SaveOutput {
                        name: output_name(shard, attempt.number, run.phase),
                        body: lines[skip..].join("\n"),
                    });
                }
                run.status = Some(view.status.clone());
                run.exit_code = view.exit_code;
                run.finished_at = Some(now);
            }
            _ if stopping && !run.phase.runs_after_failure() && now <= dispatched_at + timeout => {
                // Cancel until SSM reports the invocation ended: cleanup must
                // not run beside work that is still writing. While SSM says
                // Cancelling, the cancel is under way: asking again adds nothing.
                let view = obs.invocations.get(&(command_id.clone(), instance_id.clone()));
                if view.is_none_or(|v| v.status != "Cancelling") {
                    actions.push(Action::Cancel { command_id, instance_ids: vec![instance_id.clone()] });
                }
                return;
            }
            _ if now > dispatched_at + timeout => {
                // SSM never reported: treat as a timeout and stop the command.
                actions.push(Action::Cancel { command_id, instance_ids: vec![instance_id.clone()] });
                run.status = Some("TimedOut".into());
                run.finished_at = Some(now);
            }
            _ => return,
        }
        let run = run.clone();
        if run.succeeded() {
            // Only failures and the phase in flight keep their detail.
            attempt.phases.retain(|p| p.phase != run.phase);
            attempt.completed_phases.push(run.phase);
        } else {
            let what = match (run.status.as_deref(), run.exit_code) {
                (Some("TimedOut"), _) => format!("timed out after {sent_timeout} s"),
                (_, Some(code)) if code >= 0 => format!("exited {code}"),
                (status, _) => status.unwrap_or("?").to_ascii_lowercase(),
            };
            let detail = format!("{} {what} on {instance_id}", run.phase.as_str());
            notes.push(detail.clone());
            // The on-instance guard's reserved code: an earlier delivery of
            // this step died mid-step, so the step's outcome is unknown.
            let agent_lost = matches!(run.status.as_deref(), Some("Undeliverable" | "DeliveryTimedOut" | "Terminated"))
                || (run.status.as_deref() == Some("TimedOut") && agent_offline_now)
                || guard_lost;
            if run.phase.runs_after_failure() {
                // The work's results may be on the volume, but not cleanly:
                // its snapshot is kept but never good, and the shard fails
                // (or, when the instance rather than the step failed, retries).
                attempt.cleanup_failed.get_or_insert(format!("shard {shard}: {detail}"));
                attempt.cleanup_lost |= agent_lost;
            } else if stopping {
                let cause = if attempt.interrupted { EndCause::SpotInterruption } else { EndCause::Aborted };
                end(attempt, cause, "stopped while working", None);
            } else if agent_lost {
                // SSM never reached the agent: the instance, not the work, failed.
                end(attempt, EndCause::InstanceLost, &detail, None);
            } else {
                let cause = if run.status.as_deref() == Some("TimedOut") {
                    EndCause::TimedOut
                } else {
                    EndCause::CommandFailed
                };
                end(attempt, cause, &detail, run.exit_code.filter(|c| *c >= 0));
            }
        }
    }
    if stopping && attempt.end.is_none() {
        if attempt.completed_phases.contains(&Phase::Run) {
            // The work is done: its on-success snapshots are earned; cleanup still runs.
            end(attempt, EndCause::Succeeded, "", Some(0));
        } else {
            let cause = if attempt.interrupted { EndCause::SpotInterruption } else { EndCause::Aborted };
            end(attempt, cause, "stopped while working", None);
        }
    }
    let planned = planned_phases(job.spec, shard);
    let ran = |p: Phase| attempt.completed_phases.contains(&p) || attempt.phases.iter().any(|r| r.phase == p);
    let next = if attempt.end.is_none() {
        planned.into_iter().find(|p| !ran(*p))
    } else {
        // Cleanup runs only where the volumes were mounted (or there are none).
        let mounted = attempt.volumes.is_empty() || attempt.completed_phases.contains(&Phase::Mount);
        let started =
            !attempt.completed_phases.is_empty() || attempt.phases.iter().any(|r| !r.phase.runs_after_failure());
        if mounted && started {
            planned.into_iter().filter(|p| p.runs_after_failure()).find(|p| !ran(*p))
        } else {
            None
        }
    };
    match next {
        Some(phase) => {
            // Opened here; plan_dispatch groups it into a SendCommand.
            attempt.phases.push(PhaseRun {
                phase,
                batch: 0,
                opened_at: Some(now),
                status: None,
                exit_code: None,
                finished_at: None,
            });
        }
        None => {
            if attempt.end.is_none() {
                end(attempt, EndCause::Succeeded, "", Some(0));
            }
            attempt.stage = Stage::Releasing;
        }
    }
}

/// Terminate the instance (stopped ones too), then snapshot what the policy
/// wants once each volume is free, and delete a created volume only after its
/// snapshot is `completed`. True when nothing of the attempt is left.
#[allow(clippy::too_many_arguments)]
fn release(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    obs: &Observation,
    now: DateTime<Utc>,
    actions: &mut Vec<Action>,
    terminate: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> bool {
    // Stopped at the bound, or an unmount that failed: what is still mounted
    // is snapshotted while attached, then the instance is terminated (which
    // releases the volume; it is never detached while mounted).
    let still_mounted = attempt.at_bound || attempt.cleanup_failed.is_some();
    if still_mounted && !attempt.terminate_requested && snapshot_while_mounted(job, shard, attempt, obs, now, actions) {
        return false; // terminated once CreateSnapshot answered
    }
    let mut settled = true;
    let instance_gone = match attempt.instance_id.as_ref() {
        None => true,
        Some(_) if attempt.left_for_reaper.is_some() => true,
        Some(id) => match obs.instances.get(id) {
            Some(view) if view.is_terminated() => true,
            Some(view) => {
                if view.state != "shutting-down" {
                    terminate.push(id.clone());
                }
                attempt.terminate_requested = true;
                false
            }
            // Not listed: terminated long ago, or never visible.
            None => attempt.terminate_requested || attempt.launched_at.is_none_or(|at| now - at > Duration::minutes(5)),
        },
    };
    if !instance_gone {
        settled = false;
    }
    let work_succeeded = attempt.end.as_ref().is_some_and(|e| e.cause == EndCause::Succeeded);
    let kind = snapshot_kind(attempt);
    let attempt_instance = attempt.instance_id.clone();
    let left_for_reaper = attempt.left_for_reaper.is_some();
    let mut launched_volume_calls = 0;
    for volume in &mut attempt.volumes {
        if volume.deleted || volume.kept.is_some() {
            continue;
        }
        // A create whose reply was lost: find the volume by its token tag.
        if volume.volume_id.is_none() {
            volume.volume_id = obs
                .volumes
                .values()
                .find(|v| v.tags.get(tags::ATTEMPT) == Some(&volume.token))
                .map(|v| v.volume_id.clone());
            if volume.volume_id.is_none() {
                volume.deleted = true; // never created (the final sweep catches a late one)
                continue;
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
            } else {
                settled = false; // not visible yet
            }
            continue;
        };
        let policy = job.spec.volumes.iter().find(|v| v.name == volume.name).map(|v| v.snapshot);
        let wanted = match policy {
            Some(SnapshotPolicy::Always) => true,
            Some(SnapshotPolicy::OnSuccess) => work_succeeded,
            _ => false,
        };
        volume.seen = true;
        let attached_elsewhere =
            view.attached_to.as_ref().is_some_and(|owner| Some(owner) != attempt_instance.as_ref());
        if view.state == "error" {
            volume.kept = Some("the volume is in state error: nothing to snapshot; left for the reaper".into());
            continue;
        }
        if attached_elsewhere && !volume.created {
            volume.kept = Some("a volume_id source attached to another instance: left alone".into());
            continue;
        }
        if view.attached_to.is_some() && left_for_reaper {
            volume.kept = Some("attached to an instance left for the reaper".into());
            continue;
        }
        let attached = view.attached_to.is_some() || view.state == "in-use";
        if attached || view.state == "creating" {
            settled = false;
            continue;
        }
        if view.state != "available" {
            settled = false;
            continue;
        }
        let mut ready_to_delete = !wanted;
        if wanted {
            match volume.snapshot.clone() {
                None => {
                    volume.snapshot = Some(SnapshotRef::requested(now, job.budget_seconds));
                    actions.push(snapshot_action(job, shard, volume, &volume_id, now, kind, false));
                    settled = false;
                }
                Some(SnapshotRef { snapshot_id: None, .. }) => {
                    if let Some(action) = unanswered_snapshot(job, shard, volume, &volume_id, obs, now, kind) {
                        actions.push(action);
                    }
                    settled = false;
                }
                Some(SnapshotRef { snapshot_id: Some(id), state, requested_at, .. }) => {
                    let seen = obs.snapshots.get(&id).map(|s| s.state.clone());
                    // A snapshot that never shows up (deleted by someone) is a failed one.
                    let lost = seen.is_none()
                        && state != "completed"
                        && requested_at.is_some_and(|at| now - at > Duration::seconds(SNAPSHOT_LOST_SECONDS));
                    let state_now = if lost { "error".to_string() } else { seen.unwrap_or(state) };
                    match state_now.as_str() {
                        "completed" => {
                            volume.snapshot = Some(SnapshotRef {
                                snapshot_id: Some(id),
                                state: "completed".into(),
                                requested_at,
                                in_flight_until: None,
                            });
                            ready_to_delete = true;
                        }
                        "error" => {
                            volume.snapshot_failures += 1;
                            notes.push(format!("snapshot {id} of {volume_id} ended in error"));
                            if volume.snapshot_failures >= SNAPSHOT_TRIES {
                                volume.kept = Some(format!(
                                    "{SNAPSHOT_TRIES} snapshots of it ended in error; kept so no data is lost"
                                ));
                            } else {
                                volume.snapshot = None; // a new one next pass
                                settled = false;
                            }
                        }
                        _ => settled = false,
                    }
                }
            }
        }
        if ready_to_delete && volume.kept.is_none() {
            if volume.created {
                if launched_volume_calls < MAX_VOLUME_CALLS {
                    actions.push(Action::DeleteVolume { volume_id: volume_id.clone() });
                    launched_volume_calls += 1;
                }
                settled = false; // marked deleted when the call succeeds
            } else {
                volume.kept = Some("a volume_id source: never deleted".into());
            }
        }
    }
    settled && instance_gone && attempt.volumes.iter().all(|v| v.deleted || v.kept.is_some())
}

/// Why this attempt's volumes are snapshotted (`retention::kind`).
fn snapshot_kind(attempt: &Attempt) -> &'static str {
    let work_succeeded = attempt.end.as_ref().is_some_and(|e| e.cause == EndCause::Succeeded);
    match (work_succeeded, attempt.cleanup_failed.is_some(), attempt.cleanup_lost) {
        (true, false, _) => retention::kind::FINAL,
        (true, true, true) => retention::kind::FINAL_CRASH_CONSISTENT,
        (true, true, false) => retention::kind::AFTER_FAILED_CLEANUP,
        (false, _, _) => retention::kind::FAILED_ATTEMPT,
    }
}

/// How long past the bound termination waits for CreateSnapshot to answer.
const BOUND_SNAPSHOT_SECONDS: i64 = 120;

/// A volume the policy wants snapshotted that is still mounted (stopped at
/// the bound, or its unmount failed) is snapshotted while attached
/// (crash-consistent), before the instance is terminated. True while such a
/// snapshot has not been answered yet (and the bound's short wait for it has
/// not run out).
fn snapshot_while_mounted(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    obs: &Observation,
    now: DateTime<Utc>,
    actions: &mut Vec<Action>,
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
    let kind = snapshot_kind(attempt);
    let work_succeeded = kind != retention::kind::FAILED_ATTEMPT;
    let mut waiting = false;
    for volume in attempt.volumes.iter_mut().filter(|v| !v.deleted && v.kept.is_none()) {
        let Some(volume_id) = volume.volume_id.clone() else { continue };
        let attached_here = obs.volumes.get(&volume_id).is_some_and(|v| v.attached_to.as_deref() == Some(&instance_id));
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
                actions.push(snapshot_action(job, shard, volume, &volume_id, now, kind, false));
                waiting = true;
            }
            Some(SnapshotRef { snapshot_id: None, .. }) => {
                if let Some(action) = unanswered_snapshot(job, shard, volume, &volume_id, obs, now, kind) {
                    actions.push(action);
                }
                waiting = true;
            }
            Some(_) => {}
        }
    }
    waiting
}

fn launch_of(options: &[LaunchOption], attempt: &Attempt) -> LaunchOption {
    options.get(attempt.option as usize).or(options.first()).cloned().unwrap_or(LaunchOption {
        instance_type: "?".into(),
        subnet_id: None,
        market: crate::spec::Market::OnDemand,
    })
}

/// DescribeVolumes is eventually consistent right after a create: a created
/// volume counts as gone only once it was listed before, or long after.
fn is_gone(volume: &AttemptVolume, now: DateTime<Utc>) -> bool {
    !volume.created || volume.seen || volume.created_at.is_none_or(|at| now - at > Duration::minutes(5))
}

/// A send decided earlier whose answer never came may still land until the
/// takeover rule's window ends (`fence`); a record from before the window
/// was kept counts it from the decision.
/// Some(the window's end) while it may.
fn send_in_flight(batch: &CommandBatch, budget_seconds: u32, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let until = batch.in_flight_until.unwrap_or_else(|| fence::in_flight_until(batch.dispatched_at, budget_seconds));
    (batch.command_id.is_none() && until > now && !mutation::on(Mutation::NoFence)).then_some(until)
}

/// The same for a snapshot requested earlier.
fn snapshot_in_flight(snapshot: &SnapshotRef, budget_seconds: u32, now: DateTime<Utc>) -> bool {
    let until =
        snapshot.in_flight_until.or_else(|| snapshot.requested_at.map(|at| fence::in_flight_until(at, budget_seconds)));
    snapshot.snapshot_id.is_none() && until.is_some_and(|until| until > now) && !mutation::on(Mutation::NoFence)
}

/// A snapshot requested earlier whose answer never came. What the cloud
/// shows of it is adopted; while it may still land unseen, nothing is
/// done; after that, it is requested again (the executor looks first).
fn unanswered_snapshot(
    job: &JobFacts<'_>,
    shard: u32,
    volume: &mut AttemptVolume,
    volume_id: &str,
    obs: &Observation,
    now: DateTime<Utc>,
    kind: &str,
) -> Option<Action> {
    let found = obs.snapshots.values().find(|s| {
        s.state != "error"
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

fn snapshot_action(
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

/// Instances a RunInstances made whose reply was lost (a crash) carry the
/// batch's token as a tag: give them to the attempts waiting on that token,
/// in launch order, as the reply would have.
fn adopt_launched(record: &mut JobRecord, obs: &Observation, now: DateTime<Utc>) {
    let assigned: BTreeSet<String> = record.instance_ids().into_iter().collect();
    let mut by_token: BTreeMap<&str, Vec<&InstanceView>> = BTreeMap::new();
    for view in obs.instances.values() {
        if let Some(token) = view.launch_token.as_deref() {
            if !assigned.contains(&view.instance_id) {
                by_token.entry(token).or_default().push(view);
            }
        }
    }
    for (token, mut views) in by_token {
        views.sort_by(|a, b| (a.launch_index, &a.instance_id).cmp(&(b.launch_index, &b.instance_id)));
        let mut views = views.into_iter();
        for shard in &mut record.shards {
            let Some(a) = shard.current_mut() else { continue };
            if a.stage != Stage::Launching || a.instance_id.is_some() || a.launch_token.as_deref() != Some(token) {
                continue;
            }
            let Some(view) = views.next() else { break };
            a.instance_id = Some(view.instance_id.clone());
            a.availability_zone = Some(view.availability_zone.clone());
            a.launched_at = Some(now);
            // Even a job that is stopping takes it, so it is released like any other.
            a.stage = Stage::Booting;
            let text = format!("adopted {} launched under {token}", view.instance_id);
            shard.note(now, text);
        }
    }
}

/// Group attempts waiting to launch into RunInstances calls: one ClientToken
/// per batch, written before the call, MinCount 1 so EC2 fills what it can.
/// Attempts waiting for a first launch (or a relaunch): what a pass asks
/// the shared launch budget for.
pub fn launches_wanted(record: &JobRecord) -> u32 {
    if record.outcome.is_some() {
        return 0;
    }
    let current = || record.shards.iter().filter(|s| s.result.is_none()).filter_map(|s| s.current());
    let pending: BTreeSet<&String> = current()
        .filter(|a| a.stage == Stage::Launching && a.end.is_none())
        .filter_map(|a| a.launch_token.as_ref())
        .collect();
    // plan_launches mints no new token while this many calls are pending:
    // tokens granted now would launch nothing.
    let room = MAX_LAUNCH_CALLS.saturating_sub(pending.len()) * 1000;
    let fresh =
        current().filter(|a| a.stage == Stage::Launching && a.launch_token.is_none() && a.end.is_none()).count();
    fresh.min(room) as u32
}

fn plan_launches(record: &mut JobRecord, spec: &JobSpec, ctx: &Context<'_>, actions: &mut Vec<Action>, wait: &mut u32) {
    if record.outcome.is_some() {
        return;
    }
    let options = launch_options(spec);
    // Fresh attempts get a token per option group.
    let mut fresh: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (index, shard) in record.shards.iter().enumerate() {
        if shard.result.is_some() {
            continue;
        }
        if let Some(a) = shard.current() {
            if a.stage == Stage::Launching && a.launch_token.is_none() && a.end.is_none() {
                fresh.entry(a.option).or_default().push(index);
            }
        }
    }
    let pending_tokens: BTreeSet<String> = record
        .shards
        .iter()
        .filter_map(|s| s.current())
        .filter(|a| a.stage == Stage::Launching && a.end.is_none())
        .filter_map(|a| a.launch_token.clone())
        .collect();
    let mut calls = pending_tokens.len();
    let mut allowance = ctx.launch_grant.map_or(u32::MAX, |g| g.instances) as usize;
    if let Some(grant) = ctx.launch_grant.filter(|g| g.instances == 0 && !fresh.is_empty()) {
        *wait = (*wait).min(grant.retry_after_seconds.max(1));
    }
    for (_, mut shards) in fresh {
        // The shared budget decides how many launch now; the rest wait their turn.
        shards.truncate(allowance);
        allowance -= shards.len();
        for chunk in shards.chunks(1000) {
            if calls >= MAX_LAUNCH_CALLS {
                break;
            }
            calls += 1;
            let seq = record.take_seq();
            let token = client_token(&ctx.settings.stack, &record.job_id, 'l', seq);
            for index in chunk {
                if let Some(a) = record.shards[*index].current_mut() {
                    a.launch_token = Some(token.clone());
                }
            }
        }
    }
    // A token's count never changes (EC2 answers IdempotentParameterMismatch
    // to the same token with other parameters): every attempt ever given it.
    let waiting: BTreeSet<String> = record
        .shards
        .iter()
        .filter(|s| s.result.is_none())
        .filter_map(|s| s.current())
        .filter(|a| a.stage == Stage::Launching && a.end.is_none() && a.instance_id.is_none())
        .filter_map(|a| a.launch_token.clone())
        .collect();
    let mut by_token: BTreeMap<String, (u32, LaunchOption)> = BTreeMap::new();
    for a in record.attempts() {
        if let Some(token) = a.launch_token.as_ref().filter(|t| waiting.contains(*t)) {
            let entry = by_token.entry(token.clone()).or_insert((0, launch_of(&options, a)));
            entry.0 += 1;
        }
    }
    for (token, (count, option)) in by_token {
        actions.push(Action::Launch { request: launch_request(record, spec, ctx, &token, count, &option) });
        *wait = (*wait).min(5);
    }
}

/// An EC2 ClientToken: EC2 scopes tokens to the account and Region, so the
/// stack is in it too, or two stacks with a job id in common would be
/// handed each other's instances and volumes. At most 64 characters: a
/// 6-hex stack hash, the job id (48 at most), the kind and the sequence.
pub fn client_token(stack: &str, job_id: &str, kind: char, seq: u64) -> String {
    // FNV-1a: stable across builds, unlike the std hasher.
    let hash = stack.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("{:06x}-{job_id}-{kind}{seq}", hash & 0x00ff_ffff)
}

/// The tags on everything a job creates.
pub fn job_tags(record: &JobRecord, spec: &JobSpec, settings: &Settings) -> BTreeMap<String, String> {
    let mut all = spec.tags.clone();
    let expires = record.deadline_at.unwrap_or(record.submitted_at)
        + chrono::Duration::minutes(i64::from(settings.expiry_grace_minutes));
    all.insert(tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string());
    all.insert(tags::STACK.to_string(), settings.stack.clone());
    all.insert(tags::SUBMITTER.to_string(), submitter(record));
    all.insert(tags::JOB_ID.to_string(), record.job_id.clone());
    all.insert(tags::JOB_NAME.to_string(), job_name(record));
    all.insert(tags::EXPIRES_AT.to_string(), expires.to_rfc3339_opts(SecondsFormat::Secs, true));
    all.insert("Name".to_string(), format!("flotilla-{}", record.job_id));
    all
}

/// Who submitted the job, as its snapshots' lineage names it: the SQS
/// SenderId, without the session name of a role (`AROA...:<session>`), which
/// changes on every run of an ECS task or Lambda that submits.
pub fn submitter(record: &JobRecord) -> String {
    match record.submitted_by.as_deref() {
        Some(id) if id.starts_with("AROA") => id.split(':').next().unwrap_or(id).to_string(),
        Some(id) => id.to_string(),
        None => "unknown".to_string(),
    }
}

pub fn job_name(record: &JobRecord) -> String {
    record.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_else(|| record.job_id.clone())
}

fn launch_request(
    record: &JobRecord,
    spec: &JobSpec,
    ctx: &Context<'_>,
    token: &str,
    count: u32,
    option: &LaunchOption,
) -> LaunchRequest {
    let template = spec.launch_template.as_ref();
    let mut launch_tags = job_tags(record, spec, ctx.settings);
    launch_tags.insert(tags::LAUNCH.to_string(), token.to_string());
    LaunchRequest {
        job_id: record.job_id.clone(),
        count,
        instance_type: option.instance_type.clone(),
        image_id: record.resolved_image.clone(),
        launch_template_id: template.and_then(|t| t.id.clone()),
        launch_template_name: template.and_then(|t| t.name.clone()),
        launch_template_version: template.and_then(|t| t.version.clone()),
        subnet_id: option.subnet_id.clone(),
        security_group_ids: spec.security_group_ids.clone(),
        instance_profile: spec.instance_profile.clone().or_else(|| ctx.settings.worker_instance_profile.clone()),
        market: option.market,
        tags: launch_tags,
        client_token: token.to_string(),
    }
}

/// The longest a command in flight goes without a look when events are on.
pub const SAFETY_POLL_MAX_SECONDS: i64 = 600;

/// How often a command in flight is looked at without an event. Without
/// events (a job in another account, whose events stay on that account's
/// bus, or a deployment without them): the poll delay. With them: the
/// safety poll, growing to a quarter of the command's age (at most 10
/// minutes), so a lost event delays the job by at most a quarter.
pub fn working_poll(spec: &JobSpec, settings: &Settings, since: DateTime<Utc>, now: DateTime<Utc>) -> u32 {
    match settings.safety_poll_seconds.filter(|_| spec.role_arn.is_none()) {
        None => settings.poll_delay_seconds,
        Some(safety) => {
            let safety = i64::from(safety);
            ((now - since).num_seconds() / 4).clamp(safety, SAFETY_POLL_MAX_SECONDS.max(safety)) as u32
        }
    }
}

/// When a command in flight is next due a look without an event: its
/// safety interval after its last listing (or its send). Observe lists it
/// from then on, and the pass that schedules the look waits until then.
pub fn next_look(spec: &JobSpec, settings: &Settings, batch: &CommandBatch) -> DateTime<Utc> {
    let last = batch.listed_at.unwrap_or(batch.dispatched_at);
    last + Duration::seconds(i64::from(working_poll(spec, settings, batch.dispatched_at, last)))
}

/// Is a command in flight due a look this pass? From half-way to its next
/// look on: a pass that one command's look brings lists every command
/// that is half-way there, so the looks of shards that started apart fall
/// into the same passes.
pub fn look_due(spec: &JobSpec, settings: &Settings, batch: &CommandBatch, now: DateTime<Utc>) -> bool {
    let last = batch.listed_at.unwrap_or(batch.dispatched_at);
    let next = next_look(spec, settings, batch);
    now >= next - (next - last) / 2
}

/// The next moment a working attempt needs a pass with no event to bring
/// it: its commands' safety looks and timeouts (and the grace after them),
/// the limits of a failing health check, its attempt timeout, the deadline.
fn next_working_look(
    job: &JobFacts<'_>,
    attempt: &Attempt,
    commands: &BTreeMap<u64, CommandBatch>,
    settings: &Settings,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let seconds = |s: u32| Duration::seconds(i64::from(s));
    let mut moments: Vec<DateTime<Utc>> = Vec::new();
    let mut in_flight = false;
    for run in attempt.phases.iter().filter(|p| p.status.is_none()) {
        let Some(batch) = commands.get(&run.batch).filter(|b| b.command_id.is_some()) else { continue };
        in_flight = true;
        moments.push(next_look(job.spec, settings, batch));
        let timeout = batch.dispatched_at
            + seconds(phase_timeout(job.spec, batch.phase, job.deadline_at, job.bound, batch.dispatched_at));
        moments.push(timeout + Duration::seconds(1));
        moments.push(timeout + Duration::seconds(REPORT_GRACE_SECONDS + 1));
    }
    if !in_flight {
        moments.push(now + seconds(working_poll(job.spec, settings, now, now)));
    }
    moments.extend(attempt.impaired_since.map(|at| at + seconds(settings.impaired_timeout_seconds)));
    moments.extend(attempt.agent_lost_since.map(|at| at + seconds(settings.agent_timeout_seconds)));
    if let (Some(limit), Some(at)) =
        (job.spec.retry.as_ref().and_then(|r| r.attempt_timeout_seconds), attempt.launched_at)
    {
        moments.push(at + seconds(limit) + Duration::seconds(1));
    }
    moments.extend(job.deadline_at.map(|d| d + Duration::seconds(1)));
    moments.into_iter().filter(|m| *m > now).min().unwrap_or(now + seconds(settings.poll_delay_seconds))
}

/// While an attempt waits only for its snapshots (minutes each): with
/// events (EBS says when a snapshot completes or fails), a safety look after
/// half the time waited, 30-120 s; without, after a tenth, 5-30 s, so a
/// 10-minute snapshot costs about 30 looks, not 120.
fn snapshot_wait(attempt: &Attempt, events: bool, now: DateTime<Utc>) -> Option<u32> {
    let mut oldest: Option<DateTime<Utc>> = None;
    for volume in attempt.volumes.iter().filter(|v| !v.deleted && v.kept.is_none()) {
        let snapshot = volume.snapshot.as_ref().filter(|s| s.snapshot_id.is_some() && s.state == "pending")?;
        let at = snapshot.requested_at?;
        oldest = Some(oldest.map_or(at, |o| o.min(at)));
    }
    let waited = (now - oldest?).num_seconds().max(0);
    Some(if events { (waited / 2).clamp(30, 120) } else { (waited / 10).clamp(5, 30) } as u32)
}

/// When a pass first saw the attempt's instance gone (its billing ended).
fn instance_gone_at(attempt: &Attempt) -> Option<DateTime<Utc>> {
    Some(attempt.launched_at? + Duration::seconds(i64::from(attempt.billed_seconds?)))
}

/// While an attempt is released and no snapshot is pending: its instance's
/// termination is an event (a safety look every 30 s), and its volumes'
/// detachment is looked at after a fifth of the time since, 5-30 s.
fn release_wait(attempt: &Attempt, gone_at: Option<DateTime<Utc>>, events: bool, now: DateTime<Utc>) -> u32 {
    match gone_at {
        Some(at) if !attempt.volumes.is_empty() => ((now - at).num_seconds() / 5).clamp(5, 30) as u32,
        _ if events && attempt.terminate_requested => 30,
        _ => 5,
    }
}

/// The quickest re-look at an agent that is not Online yet.
pub const AGENT_POLL_MIN_SECONDS: i64 = 1;

/// Shards that reach a phase within this long of each other share its
/// SendCommand: N shards cost ceil(N / 50) sends, and as many
/// ListCommandInvocations per pass, not one per straggler.
pub const COALESCE_SECONDS: i64 = 3;

/// Will this attempt reach `phase` soon: still starting, or in flight in an
/// earlier phase?
fn catching_up(attempt: &Attempt, phase: Phase) -> bool {
    match attempt.stage {
        Stage::Launching | Stage::Booting | Stage::Attaching => true,
        Stage::Working => attempt.phases.iter().any(|p| p.status.is_none() && p.phase < phase && p.batch != 0),
        Stage::Releasing | Stage::Done => false,
    }
}

/// Phases that `work` opened this pass (no batch yet) or whose send never
/// answered (a batch, no command id): one SendCommand per phase and 50
/// instances, with a comment that makes the send findable.
fn plan_dispatch(
    record: &mut JobRecord,
    spec: &JobSpec,
    obs: &Observation,
    ctx: &Context<'_>,
    actions: &mut Vec<Action>,
    wait: &mut u32,
) {
    // SendCommand fails for all if one agent is offline: hold those back.
    let offline =
        |id: &Option<String>| id.as_ref().is_some_and(|id| obs.agents_checked.contains(id) && !obs.online.contains(id));
    // Only a batch that cannot have reached SSM: one that may still land
    // keeps its comment, so it is found (or cancelled) rather than orphaned.
    let budget = ctx.settings.pass_budget_seconds;
    let unsent: BTreeSet<u64> = record
        .commands
        .iter()
        .filter(|(_, b)| b.command_id.is_none() && send_in_flight(b, budget, ctx.now).is_none())
        .map(|(n, _)| *n)
        .collect();
    for shard in &mut record.shards {
        let Some(a) = shard.current_mut() else { continue };
        if a.stage != Stage::Working || !offline(&a.instance_id) {
            continue;
        }
        if let Some(run) = a.phases.iter_mut().find(|p| p.status.is_none() && unsent.contains(&p.batch)) {
            run.batch = 0;
        }
    }
    // No event says an agent is back: look again at the poll delay.
    let held_offline = record.shards.iter().filter_map(|s| s.current()).any(|a| {
        a.stage == Stage::Working
            && offline(&a.instance_id)
            && a.phases.iter().any(|p| p.status.is_none() && p.batch == 0)
    });
    if held_offline {
        *wait = (*wait).min(ctx.settings.poll_delay_seconds);
    }
    let mut fresh: BTreeMap<Phase, Vec<usize>> = BTreeMap::new();
    for (index, shard) in record.shards.iter().enumerate() {
        let Some(a) = shard.current() else { continue };
        if a.stage != Stage::Working {
            continue;
        }
        if let Some(run) = a.phases.iter().find(|p| p.status.is_none() && p.batch == 0) {
            if !offline(&a.instance_id) {
                fresh.entry(run.phase).or_default().push(index);
            }
        }
    }
    let aborting = record.outcome.is_some();
    // Batches made by this decision were never sent: no need to look first.
    let mut made_now: BTreeSet<u64> = BTreeSet::new();
    for (phase, mut shards) in fresh {
        // Full sends go now; a remainder waits a moment for shards close behind.
        let remainder = shards.len() % MAX_INSTANCES_PER_COMMAND;
        if remainder > 0 && !aborting {
            let first_open = shards
                .iter()
                .filter_map(|i| record.shards[*i].current())
                .filter_map(|a| a.phases.iter().find(|p| p.status.is_none() && p.batch == 0)?.opened_at)
                .min()
                .unwrap_or(ctx.now);
            let held = (ctx.now - first_open).num_seconds();
            let behind = record
                .shards
                .iter()
                .filter(|s| s.result.is_none())
                .filter_map(|s| s.current())
                .any(|a| catching_up(a, phase));
            if behind && held < COALESCE_SECONDS {
                shards.truncate(shards.len() - remainder);
                *wait = (*wait).min((COALESCE_SECONDS - held).max(1) as u32);
            }
        }
        for chunk in shards.chunks(MAX_INSTANCES_PER_COMMAND) {
            let batch = record.take_seq();
            made_now.insert(batch);
            record.commands.insert(
                batch,
                CommandBatch {
                    phase,
                    command_id: None,
                    dispatched_at: ctx.now,
                    listed_at: None,
                    in_flight_until: None,
                },
            );
            for index in chunk {
                if let Some(run) =
                    record.shards[*index].current_mut().and_then(|a| a.phases.iter_mut().find(|p| p.status.is_none()))
                {
                    run.batch = batch;
                }
            }
        }
    }
    // Every batch without a command id gets its Send (the executor adopts a
    // command already sent under its comment).
    let mut unsent: BTreeMap<u64, Vec<(String, u32)>> = BTreeMap::new();
    for shard in &record.shards {
        let Some(a) = shard.current() else { continue };
        if a.stage != Stage::Working {
            continue;
        }
        let Some(run) = a.phases.iter().find(|p| p.status.is_none()) else { continue };
        let waiting = record.commands.get(&run.batch).is_some_and(|b| b.command_id.is_none());
        if let (true, Some(instance_id)) = (waiting, &a.instance_id) {
            unsent.entry(run.batch).or_default().push((instance_id.clone(), shard.index));
        }
    }
    for (batch, instances) in unsent {
        let Some((phase, dispatched_at)) = record.commands.get(&batch).map(|b| (b.phase, b.dispatched_at)) else {
            continue;
        };
        let made = made_now.contains(&batch);
        // Sent before, never answered, and not found by its comment: it may
        // still land unseen, so it is not sent again yet (`fence`).
        let budget = ctx.settings.pass_budget_seconds;
        let in_flight = record.commands.get(&batch).and_then(|b| send_in_flight(b, budget, ctx.now));
        if let Some(until) = in_flight.filter(|_| !made) {
            *wait = (*wait).min(u32::try_from((until - ctx.now).num_seconds().max(1)).unwrap_or(u32::MAX));
            continue;
        }
        if let Some(b) = record.commands.get_mut(&batch) {
            b.in_flight_until = Some(fence::in_flight_until(ctx.now, budget));
        }
        let lines = phase_lines(record, spec, phase, &instances);
        actions.push(Action::Send {
            batch,
            look_first: !made,
            request: CommandRequest {
                instance_ids: instances.iter().map(|(id, _)| id.clone()).collect(),
                lines,
                // From the dispatch, so a resend asks for what was recorded.
                timeout_seconds: phase_timeout(
                    spec,
                    phase,
                    record.deadline_at,
                    record.bill_bound(ctx.settings.cleanup_grace_minutes),
                    dispatched_at,
                ),
                comment: command_comment(&record.job_id, phase, batch),
                output_bucket: ctx.bucket.to_string(),
                // Outside jobs/: the SSM agent writes output without an SSE header.
                output_prefix: format!("outputs/{}/{}", record.job_id, phase.as_str()),
            },
        });
    }
}

fn phase_lines(record: &JobRecord, spec: &JobSpec, phase: Phase, instances: &[(String, u32)]) -> Vec<String> {
    let mounts: Vec<(String, String)> = spec.volumes.iter().map(|v| (v.name.clone(), v.mount_point.clone())).collect();
    let plan = record.plan.as_ref();
    let preamble = Preamble {
        job_id: &record.job_id,
        instances,
        shard_count: record.shards.len() as u32,
        env: &spec.env,
        mounts: &mounts,
        items: plan.and_then(|p| p.items),
        manifests: plan.and_then(|p| p.manifests.as_deref()),
    };
    let wanted: BTreeSet<&String> = instances.iter().map(|(id, _)| id).collect();
    let targets: Vec<MountTarget> = spec
        .volumes
        .iter()
        .map(|v| MountTarget {
            name: v.name.clone(),
            device: v.device.clone(),
            mount_point: v.mount_point.clone(),
            volume_by_instance: record
                .shards
                .iter()
                .filter_map(|s| s.current())
                .filter_map(|a| {
                    let instance = a.instance_id.as_ref().filter(|id| wanted.contains(id))?;
                    let volume = a.volumes.iter().find(|x| x.name == v.name)?.volume_id.clone()?;
                    Some((instance.clone(), volume))
                })
                .collect(),
            created_blank_on: record
                .shards
                .iter()
                .filter_map(|s| s.current())
                .filter(|a| a.instance_id.as_ref().is_some_and(|id| wanted.contains(id)))
                .filter(|a| a.volumes.iter().any(|x| x.name == v.name && x.created && x.restored_from.is_none()))
                .filter(|_| matches!(v.source, VolumeSource::New { .. }))
                .filter_map(|a| a.instance_id.clone())
                .collect(),
        })
        .filter(|t| !t.volume_by_instance.is_empty())
        .collect();
    match phase {
        Phase::Mount => shell::mount_script(&preamble, &targets),
        Phase::Unmount => shell::unmount_script(&preamble, &targets),
        _ => match phase_spec(spec, phase) {
            Some(command) => shell::step_script(&preamble, command, phase.as_str()),
            None => vec!["true".to_string()],
        },
    }
}

/// Every shard has its result: sweep by tag, prune retention, write the
/// report, then the terminal state.
fn finish(
    record: &mut JobRecord,
    spec: &JobSpec,
    obs: &Observation,
    actions: &mut Vec<Action>,
    terminate: &mut Vec<String>,
    wait: &mut u32,
) {
    // A run whose cleanup could not finish (a refused delete, a volume kept
    // because its snapshots failed, an instance left for the reaper) is not a
    // success: the user must look at what was left.
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
    // Anything carrying this job's tag that a lost reply or a crash left.
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
            if view.state != "shutting-down" {
                terminate.push(view.instance_id.clone());
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
            match (view.state.as_str(), view.attached_to.is_some()) {
                ("available", false) => actions.push(Action::DeleteVolume { volume_id: view.volume_id.clone() }),
                ("deleting" | "deleted", _) => continue,
                _ => {}
            }
            busy = true;
        }
    }
    if busy {
        *wait = (*wait).min(5);
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
            actions.push(Action::Prune {
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
        actions.push(Action::WriteReport);
        return;
    }
    let outcome = record.outcome.unwrap_or(Outcome::Failed);
    record.state = outcome.terminal_state();
    record.reason = record.outcome_reason.clone().unwrap_or_default();
}

/// Drop what finished resources no longer need, so a 1,000-shard record
/// stays small.
fn compact(record: &mut JobRecord) {
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
fn update_state(record: &mut JobRecord, now: DateTime<Utc>) {
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
        Action::Launch { request } => {
            let capacity = class == RetryClass::Capacity;
            let options = record.spec.as_ref().map(launch_options).unwrap_or_default();
            for shard in &mut record.shards {
                let Some(a) = shard.current_mut() else { continue };
                if a.launch_token.as_deref() == Some(request.client_token.as_str()) && a.stage == Stage::Launching {
                    let cause = if capacity { EndCause::Capacity } else { EndCause::Permanent };
                    let detail = if capacity {
                        format!(
                            "{}: {}",
                            error.code().unwrap_or("no capacity"),
                            describe_option(&launch_of(&options, a))
                        )
                    } else {
                        format!("launch failed: {message}")
                    };
                    end(a, cause, &detail, None);
                    a.stage = Stage::Done;
                }
            }
            settle_launch_failures(record, now);
        }
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
        Action::Terminate { instance_ids } => {
            record.warnings.push(format!("TerminateInstances {instance_ids:?}: {message}"));
            record.cleanup_failures += 1;
            for a in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()) {
                if a.instance_id.as_ref().is_some_and(|id| instance_ids.contains(id)) {
                    bump_release_error(a, &message);
                }
            }
            dedup_warnings(record);
        }
        Action::Snapshot { volume_id, .. } => {
            for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
                if v.volume_id.as_deref() == Some(volume_id.as_str()) {
                    v.kept = Some(format!("snapshot refused ({message}); kept so no data is lost"));
                }
            }
        }
        Action::DeleteVolume { volume_id } => {
            if class == RetryClass::NotFound {
                mark_deleted(record, volume_id);
                return;
            }
            if error.code() == Some("VolumeInUse") {
                return;
            }
            for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
                if v.volume_id.as_deref() == Some(volume_id.as_str()) {
                    v.kept = Some(format!("delete refused: {message}; left for the reaper"));
                }
            }
            record.warnings.push(format!("volume {volume_id} not deleted: {message}"));
        }
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
    }
}

/// A create AWS refused (throttled, or not yet able to see what it names)
/// did not happen: it is not waited for as maybe in flight.
fn refused(record: &mut JobRecord, action: &Action, now: DateTime<Utc>) {
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

fn dedup_warnings(record: &mut JobRecord) {
    let mut seen = BTreeSet::new();
    record.warnings.retain(|w| seen.insert(w.clone()));
}

/// A permanent error while terminating: after a few, stop waiting on the
/// instance and leave it to the reaper (its tags carry expires-at) rather
/// than loop.
fn bump_release_error(attempt: &mut Attempt, message: &str) {
    attempt.release_errors += 1;
    if attempt.release_errors >= RELEASE_ERRORS {
        attempt.left_for_reaper = Some(message.to_string());
    }
}

fn mark_deleted(record: &mut JobRecord, volume_id: &str) {
    for v in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
        if v.volume_id.as_deref() == Some(volume_id) {
            v.deleted = true;
        }
    }
}

/// A permanent error ends the current attempt; release cleans up after it.
fn fail_attempt_where(record: &mut JobRecord, matches: impl Fn(&Attempt) -> bool, message: &str, now: DateTime<Utc>) {
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
fn settle_launch_failures(record: &mut JobRecord, now: DateTime<Utc>) {
    let Some(spec) = record.spec.clone() else { return };
    let job = JobFacts {
        spec: &spec,
        job_id: record.job_id.clone(),
        aborting: record.outcome.is_some(),
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

fn apply_done(record: &mut JobRecord, action: &Action, done: Done, now: DateTime<Utc>) {
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
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::spec::{parse, ExitRule, Market};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time")
    }

    fn record(extra: serde_json::Value) -> JobRecord {
        let mut spec = serde_json::json!({
            "id": "j", "fleet": {"count": 2}, "instance_types": ["t3.micro", "t3.small"], "image": "ami-0abc1234",
            "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data"}],
            "run": {"commands": [["true"]]}, "deadline_minutes": 60
        });
        for (key, value) in extra.as_object().expect("object") {
            spec[key] = value.clone();
        }
        let spec = parse(&spec.to_string()).expect("spec");
        let plan = plan(&spec, &crate::plan::Prices::builtin()).expect("plan");
        JobRecord::new("j".into(), spec, plan, now())
    }

    fn settings() -> Settings {
        Settings { worker_instance_profile: Some("worker".into()), ..Settings::default() }
    }

    /// An unset step timeout is what is left of the deadline (it used to be
    /// a flat hour, which killed an 8-hour run after one); a set one is kept.
    #[test]
    fn an_unset_step_timeout_is_what_is_left_of_the_deadline() {
        let long = record(serde_json::json!({"deadline_minutes": 480}));
        let spec = long.spec.clone().expect("spec");
        assert_eq!(phase_timeout(&spec, Phase::Run, long.deadline_at, None, now()), 480 * 60);
        assert_eq!(phase_timeout(&spec, Phase::Run, long.deadline_at, None, now() + Duration::hours(7)), 3600);
        // A work step sent after the deadline (it is cancelled anyway) gets a minute.
        assert_eq!(phase_timeout(&spec, Phase::Run, long.deadline_at, None, now() + Duration::hours(9)), 60);
        // A cleanup step: 10 minutes to an hour, whatever is left.
        let hook = record(serde_json::json!({"deadline_minutes": 480, "before_unmount": {"commands": [["sync"]]}}));
        let spec = hook.spec.clone().expect("spec");
        assert_eq!(phase_timeout(&spec, Phase::BeforeUnmount, hook.deadline_at, None, now()), 3600);
        assert_eq!(phase_timeout(&spec, Phase::BeforeUnmount, hook.deadline_at, None, now() + Duration::hours(9)), 600);
        let set = record(serde_json::json!({"run": {"commands": [["true"]], "timeout_seconds": 90}}));
        let spec = set.spec.clone().expect("spec");
        assert_eq!(phase_timeout(&spec, Phase::Run, set.deadline_at, None, now()), 90);
    }

    fn run(record: &mut JobRecord, obs: &Observation, at: DateTime<Utc>) -> Vec<Action> {
        let settings = settings();
        decide(record, obs, &Context { now: at, settings: &settings, bucket: "b", launch_grant: None }).0
    }

    fn instance(id: &str, state: &str, token: &str, index: u32) -> InstanceView {
        InstanceView {
            instance_id: id.into(),
            state: state.into(),
            availability_zone: "us-east-1a".into(),
            launch_index: index,
            job_id: Some("j".into()),
            launch_token: Some(token.into()),
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn the_launch_intent_is_recorded_and_repeated_with_the_same_token_and_count() {
        let mut r = record(serde_json::json!({}));
        let first = run(&mut r, &Observation::default(), now());
        let Some(Action::Launch { request }) = first.first() else { panic!("{first:?}") };
        assert_eq!((request.count, request.instance_profile.as_deref()), (2, Some("worker")));
        assert!(r
            .shards
            .iter()
            .all(|s| s.current().and_then(|a| a.launch_token.as_ref()) == Some(&request.client_token)));
        // No reply recorded (a crash): the same call again, never a second fleet.
        let again = run(&mut r, &Observation::default(), now());
        assert_eq!(again.first(), first.first());
    }

    #[test]
    fn a_partly_filled_launch_relaunches_only_the_rest() {
        let mut r = record(serde_json::json!({}));
        let actions = run(&mut r, &Observation::default(), now());
        let token = match &actions[0] {
            Action::Launch { request } => request.client_token.clone(),
            other => panic!("{other:?}"),
        };
        apply(&mut r, &actions[0], Ok(Done::Launched(vec![instance("i-1", "pending", &token, 0)])), now());
        assert_eq!(r.shards[0].current().map(|a| a.stage), Some(Stage::Booting));
        let next = run(&mut r, &Observation::default(), now());
        match &next[0] {
            Action::Launch { request } => assert_eq!((request.count, request.client_token != token), (1, true)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn instances_of_a_lost_reply_are_adopted_by_their_launch_tag() {
        let mut r = record(serde_json::json!({}));
        run(&mut r, &Observation::default(), now());
        let token = r.shards[0].current().and_then(|a| a.launch_token.clone()).expect("token");
        let mut obs = Observation::default();
        for (i, id) in ["i-b", "i-a"].iter().enumerate() {
            obs.instances.insert(id.to_string(), instance(id, "pending", &token, 1 - i as u32));
        }
        let actions = run(&mut r, &obs, now());
        assert!(!actions.iter().any(|a| matches!(a, Action::Launch { .. })), "{actions:?}");
        assert_eq!(r.instance_ids(), vec!["i-a".to_string(), "i-b".to_string()], "in launch order");
    }

    #[test]
    fn capacity_fails_over_in_order_and_then_fails_the_shard() {
        let mut r = record(serde_json::json!({}));
        for expected in ["t3.small"] {
            let actions = run(&mut r, &Observation::default(), now());
            let err = CloudError::api("ec2", "RunInstances", "InsufficientInstanceCapacity", "none");
            apply(&mut r, &actions[0], Err(err), now());
            assert!(r.shards.iter().all(|s| s.current().is_some_and(|a| r.launch_of(a).instance_type == expected)));
        }
        let actions = run(&mut r, &Observation::default(), now());
        apply(
            &mut r,
            &actions[0],
            Err(CloudError::api("ec2", "RunInstances", "InsufficientInstanceCapacity", "none")),
            now(),
        );
        assert!(r
            .shards
            .iter()
            .all(|s| s.result.as_ref().is_some_and(|x| !x.succeeded && x.reason.contains("no capacity"))));
    }

    #[test]
    fn throttling_changes_nothing_and_a_permanent_launch_error_fails_the_job() {
        let mut r = record(serde_json::json!({}));
        let actions = run(&mut r, &Observation::default(), now());
        let before = r.clone();
        apply(&mut r, &actions[0], Err(CloudError::api("ec2", "RunInstances", "RequestLimitExceeded", "slow")), now());
        assert_eq!(r, before);
        apply(&mut r, &actions[0], Err(CloudError::api("ec2", "RunInstances", "InvalidAMIID.Malformed", "bad")), now());
        run(&mut r, &Observation::default(), now());
        assert_eq!(r.outcome, Some(Outcome::Failed));
        assert!(r.outcome_reason.as_deref().is_some_and(|x| x.contains("InvalidAMIID.Malformed")));
    }

    /// A volume whose snapshot the policy wants is deleted only once the
    /// snapshot is completed, whatever the job's outcome became meanwhile.
    #[test]
    fn a_volume_goes_only_after_its_snapshot_completes_even_after_a_cancel() {
        let mut r = record(serde_json::json!({"fleet": {"count": 1}}));
        let attempt = r.shards[0].current_mut().expect("attempt");
        attempt.stage = Stage::Releasing;
        attempt.instance_id = Some("i-1".into());
        attempt.end = Some(AttemptEnd { cause: EndCause::Succeeded, detail: String::new(), exit_code: Some(0) });
        attempt.volumes.push(AttemptVolume {
            restored_from: None,
            name: "data".into(),
            token: "j-v1".into(),
            volume_id: Some("vol-1".into()),
            created: true,
            created_at: None,
            seen: true,
            snapshot: None,
            snapshot_failures: 0,
            deleted: false,
            kept: None,
        });
        r.cancel_requested = true;
        let mut obs = Observation::default();
        obs.instances.insert("i-1".into(), instance("i-1", "terminated", "t", 0));
        obs.volumes.insert(
            "vol-1".into(),
            VolumeView {
                volume_id: "vol-1".into(),
                state: "available".into(),
                availability_zone: "us-east-1a".into(),
                attached_to: None,
                tags: BTreeMap::new(),
            },
        );
        let actions = run(&mut r, &obs, now());
        assert!(matches!(actions.as_slice(), [Action::Snapshot { .. }]), "{actions:?}");
        apply(&mut r, &actions[0], Ok(Done::Snapshotted("snap-1".into())), now());
        let snapshot = |state: &str| SnapshotView {
            snapshot_id: "snap-1".into(),
            volume_id: "vol-1".into(),
            state: state.into(),
            started_at: now(),
            tags: BTreeMap::new(),
        };
        obs.snapshots.insert("snap-1".into(), snapshot("pending"));
        let actions = run(&mut r, &obs, now());
        assert!(!actions.iter().any(|a| matches!(a, Action::DeleteVolume { .. })), "{actions:?}");
        obs.snapshots.insert("snap-1".into(), snapshot("completed"));
        let actions = run(&mut r, &obs, now());
        assert!(actions.iter().any(|a| matches!(a, Action::DeleteVolume { volume_id } if volume_id == "vol-1")));
    }

    /// The shared launch budget's grant bounds what launches; nothing is
    /// asked for while launch calls are pending at their limit.
    #[test]
    fn launches_follow_the_grant_and_ask_nothing_while_calls_are_pending() {
        let mut r = record(serde_json::json!({"fleet": {"count": 5}, "volumes": []}));
        assert_eq!(launches_wanted(&r), 5);
        let settings = settings();
        let grant = crate::admission::Grant { instances: 2, retry_after_seconds: 0 };
        let ctx = Context { now: now(), settings: &settings, bucket: "b", launch_grant: Some(grant) };
        let (actions, _) = decide(&mut r, &Observation::default(), &ctx);
        let counts: Vec<u32> = actions
            .iter()
            .filter_map(|a| if let Action::Launch { request } = a { Some(request.count) } else { None })
            .collect();
        assert_eq!(counts, vec![2], "two granted, two launched");
        assert_eq!(launches_wanted(&r), 3, "the other three wait their turn");
        // Nothing granted: nothing new launches, and the job looks again when tokens refill.
        let none = crate::admission::Grant { instances: 0, retry_after_seconds: 7 };
        let ctx = Context { now: now(), settings: &settings, bucket: "b", launch_grant: Some(none) };
        let (actions, next) = decide(&mut r, &Observation::default(), &ctx);
        let fresh: Vec<u32> = actions
            .iter()
            .filter_map(|a| if let Action::Launch { request } = a { Some(request.count) } else { None })
            .collect();
        assert_eq!(fresh, vec![2], "only the pending call is repeated");
        assert!(matches!(next, Next::After(w) if w <= 7), "{next:?}");
        // Four calls pending: tokens granted now could launch nothing, so none are asked for.
        for index in 0..4 {
            if let Some(a) = r.shards[index].current_mut() {
                a.launch_token = Some(format!("t{index}"));
            }
        }
        assert_eq!(launches_wanted(&r), 0);
    }

    /// Shards reaching a phase a few at a time share sends: stragglers wait
    /// at most COALESCE_SECONDS for peers still in an earlier phase, and
    /// never once nobody is behind.
    #[test]
    fn shards_reaching_a_phase_one_by_one_share_a_few_sends() {
        let mut r = record(serde_json::json!({
            "fleet": {"count": 50}, "volumes": [], "before_unmount": {"commands": [["sync"]]}
        }));
        let mut obs = Observation::default();
        let batch = r.take_seq();
        for (index, shard) in r.shards.iter_mut().enumerate() {
            let id = format!("i-{index}");
            let attempt = shard.current_mut().expect("attempt");
            attempt.stage = Stage::Working;
            attempt.instance_id = Some(id.clone());
            attempt.launch_token = Some("t".into());
            attempt.launched_at = Some(now());
            attempt.phases.push(PhaseRun {
                phase: Phase::Run,
                batch,
                opened_at: Some(now()),
                status: None,
                exit_code: None,
                finished_at: None,
            });
            obs.instances.insert(id.clone(), instance(&id, "running", "t", index as u32));
        }
        r.commands.insert(
            batch,
            CommandBatch {
                phase: Phase::Run,
                command_id: Some("c-1".into()),
                dispatched_at: now(),
                listed_at: None,
                in_flight_until: None,
            },
        );
        let view = |index: usize, status: &str| InvocationView {
            instance_id: format!("i-{index}"),
            status: status.into(),
            exit_code: (status == "Success").then_some(0),
            stdout: String::new(),
            stderr: String::new(),
            output_uri: None,
        };
        for index in 0..50 {
            obs.invocations.insert(("c-1".into(), format!("i-{index}")), view(index, "InProgress"));
        }
        // Five shards finish their run every second for ten seconds.
        let mut sends: Vec<(i64, usize)> = Vec::new();
        for second in 1..=12 {
            if second <= 10 {
                for index in (second - 1) * 5..second * 5 {
                    obs.invocations.insert(("c-1".into(), format!("i-{index}")), view(index as usize, "Success"));
                }
            }
            let at = now() + Duration::seconds(second as i64);
            let settings = settings();
            let (actions, next) =
                decide(&mut r, &obs, &Context { now: at, settings: &settings, bucket: "b", launch_grant: None });
            for action in &actions {
                if let Action::Send { request, .. } = action {
                    sends.push((second as i64, request.instance_ids.len()));
                    let id = format!("c-{}", sends.len() + 1);
                    apply(&mut r, action, Ok(Done::Sent(id)), at);
                }
            }
            let held = r.shards.iter().filter_map(|s| s.current()).any(|a| a.phases.iter().any(|p| p.batch == 0));
            if let (true, Next::After(wait)) = (held, next) {
                assert!(wait as i64 <= COALESCE_SECONDS, "a held phase is looked at again within the window");
            }
        }
        let sent: usize = sends.iter().map(|(_, n)| n).sum();
        assert_eq!(sent, 50, "every shard's before_unmount was sent: {sends:?}");
        assert!(sends.len() <= 4, "ten arrivals, a few sends: {sends:?}");
        // The last ones go the moment nobody is behind them.
        assert_eq!(sends.last().map(|(second, _)| *second), Some(10), "{sends:?}");
    }

    /// One shard working on i-1, `phase` in flight as command c-1, which
    /// has just finished with `status`, `exit_code` and `stderr`.
    fn finished_step(
        extra: serde_json::Value,
        phase: Phase,
        status: &str,
        exit_code: i32,
        stderr: &str,
    ) -> (JobRecord, Observation) {
        let mut r = record(extra);
        let attempt = r.shards[0].current_mut().expect("attempt");
        attempt.stage = Stage::Working;
        attempt.instance_id = Some("i-1".into());
        attempt.launch_token = Some("t".into());
        attempt.launched_at = Some(now());
        attempt.phases.push(PhaseRun {
            phase,
            batch: 1,
            opened_at: Some(now()),
            status: None,
            exit_code: None,
            finished_at: None,
        });
        r.commands.insert(
            1,
            CommandBatch {
                phase,
                command_id: Some("c-1".into()),
                dispatched_at: now(),
                listed_at: None,
                in_flight_until: None,
            },
        );
        let mut obs = Observation::default();
        obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
        obs.invocations.insert(
            ("c-1".into(), "i-1".into()),
            InvocationView {
                instance_id: "i-1".into(),
                status: status.into(),
                exit_code: Some(exit_code),
                stdout: String::new(),
                stderr: stderr.into(),
                output_uri: None,
            },
        );
        (r, obs)
    }

    /// The step guard's reserved code (an earlier delivery died mid-step)
    /// is a lost instance, retried as one, never the step's own failure.
    #[test]
    fn the_guards_reserved_code_is_read_as_lost() {
        let lost = format!("{}: an earlier delivery of run started here and never finished", shell::LOST_MARKER);
        let extra = serde_json::json!({"fleet": {"count": 1}, "volumes": []});
        let (mut r, mut obs) = finished_step(extra, Phase::Run, "Failed", shell::LOST_EXIT_CODE, &lost);
        let mut own = r.clone();
        run(&mut r, &obs, now() + Duration::seconds(5));
        let first = &r.shards[0].attempts[0];
        assert_eq!(first.end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost), "{first:?}");
        // A step that exits 237 itself (no guard marker) failed on its own.
        if let Some(view) = obs.invocations.get_mut(&("c-1".to_string(), "i-1".to_string())) {
            view.stderr = String::new();
        }
        run(&mut own, &obs, now() + Duration::seconds(5));
        let first = &own.shards[0].attempts[0];
        assert_eq!(first.end.as_ref().map(|e| e.cause), Some(EndCause::CommandFailed), "{first:?}");
    }

    /// A send decided in an earlier pass whose answer never came, and that
    /// ListCommands does not show: no new send until the takeover rule's
    /// window ends (it may still land), then one that looks first; one
    /// that shows is adopted; one AWS refused (throttled) is sent again at once.
    #[test]
    fn a_send_not_found_is_sent_again_only_after_it_cannot_land_unseen() {
        let extra = serde_json::json!({"fleet": {"count": 1}, "volumes": []});
        let (mut r, mut obs) = finished_step(extra, Phase::Run, "Success", 0, "");
        obs.invocations.clear();
        let decided = now();
        if let Some(batch) = r.commands.get_mut(&1) {
            batch.command_id = None;
            batch.in_flight_until = Some(fence::in_flight_until(decided, settings().pass_budget_seconds));
        }
        let sends = |actions: &[Action]| actions.iter().filter(|a| matches!(a, Action::Send { .. })).count();
        let window = fence::in_flight_until(decided, settings().pass_budget_seconds);
        let mut early = r.clone();
        assert_eq!(sends(&run(&mut early, &obs, window - Duration::seconds(1))), 0, "maybe in flight");
        let mut late = r.clone();
        let actions = run(&mut late, &obs, window);
        assert!(
            actions.iter().any(|a| matches!(a, Action::Send { look_first: true, .. })),
            "after the window, sent again, looking first: {actions:?}"
        );
        let mut found = r.clone();
        obs.sent.insert(1, "c-9".into());
        assert_eq!(sends(&run(&mut found, &obs, decided + Duration::seconds(20))), 0);
        assert_eq!(found.commands[&1].command_id.as_deref(), Some("c-9"), "adopted");
        obs.sent.clear();
        let mut refused = r.clone();
        let send = run(&mut r.clone(), &obs, window).into_iter().find(|a| matches!(a, Action::Send { .. }));
        let throttled = CloudError::api("ssm", "SendCommand", "ThrottlingException", "Rate exceeded");
        apply(&mut refused, &send.expect("send"), Err(throttled), decided + Duration::seconds(1));
        assert_eq!(sends(&run(&mut refused, &obs, decided + Duration::seconds(20))), 1, "refused: sent again at once");
    }

    /// A cancel while the run's send may still land (its answer lost, and
    /// ListCommands not showing it yet): the run stays open, so no cleanup
    /// runs beside it; found, it is cancelled; once it cannot land, it is
    /// closed as cancelled.
    #[test]
    fn a_stopping_job_never_cleans_up_beside_a_send_that_may_land() {
        let extra = serde_json::json!({"fleet": {"count": 1}, "volumes": []});
        let (mut r, mut obs) = finished_step(extra, Phase::Run, "Success", 0, "");
        obs.invocations.clear();
        let budget = settings().pass_budget_seconds;
        if let Some(batch) = r.commands.get_mut(&1) {
            batch.command_id = None;
            batch.in_flight_until = Some(fence::in_flight_until(now(), budget));
        }
        r.cancel_requested = true;
        r.cancel_requested_at = Some(now());
        let open =
            |r: &JobRecord| r.shards[0].attempts[0].phases.iter().any(|p| p.phase == Phase::Run && p.status.is_none());
        let cleanup =
            |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::Send { .. } | Action::Terminate { .. }));
        let mut waiting = r.clone();
        let actions = run(&mut waiting, &obs, now() + Duration::seconds(30));
        assert!(open(&waiting) && !cleanup(&actions), "held open: {actions:?}");
        let mut found = r.clone();
        obs.sent.insert(1, "c-7".into());
        let actions = run(&mut found, &obs, now() + Duration::seconds(40));
        assert!(
            actions.iter().any(|a| matches!(a, Action::Cancel { command_id, .. } if command_id == "c-7")),
            "found: cancelled: {actions:?}"
        );
        obs.sent.clear();
        let mut gone = r.clone();
        run(&mut gone, &obs, fence::in_flight_until(now(), budget) + Duration::seconds(1));
        assert!(!open(&gone), "cannot land any more: closed");
    }

    /// An unmount that fails: the shard fails, its still-mounted volume is
    /// snapshotted while attached (never good), and only then is the
    /// instance terminated; nothing detaches it while mounted.
    #[test]
    fn a_failed_unmount_snapshots_while_attached_then_terminates() {
        let busy = "umount: /data: target is busy";
        let (mut r, mut obs) =
            finished_step(serde_json::json!({"fleet": {"count": 1}}), Phase::Unmount, "Failed", 32, busy);
        let attempt = r.shards[0].current_mut().expect("attempt");
        attempt.completed_phases = vec![Phase::Mount, Phase::Run];
        attempt.volumes.push(AttemptVolume {
            restored_from: None,
            name: "data".into(),
            token: "j-v1".into(),
            volume_id: Some("vol-1".into()),
            created: true,
            created_at: Some(now()),
            seen: true,
            snapshot: None,
            snapshot_failures: 0,
            deleted: false,
            kept: None,
        });
        obs.volumes.insert(
            "vol-1".into(),
            VolumeView {
                volume_id: "vol-1".into(),
                state: "in-use".into(),
                availability_zone: "us-east-1a".into(),
                attached_to: Some("i-1".into()),
                tags: BTreeMap::new(),
            },
        );
        let at = now() + Duration::seconds(5);
        let actions = run(&mut r, &obs, at);
        let snapshot = actions.iter().find(|a| matches!(a, Action::Snapshot { .. })).expect("a snapshot first");
        let Action::Snapshot { tags: snapshot_tags, volume_id, .. } = snapshot else { unreachable!() };
        assert_eq!(volume_id, "vol-1");
        assert_eq!(snapshot_tags.get(tags::KIND).map(String::as_str), Some(retention::kind::AFTER_FAILED_CLEANUP));
        assert!(!actions.iter().any(|a| matches!(a, Action::Terminate { .. })), "not before the snapshot: {actions:?}");
        apply(&mut r, snapshot, Ok(Done::Snapshotted("snap-1".into())), at);
        let actions = run(&mut r, &obs, at + Duration::seconds(1));
        assert!(actions.iter().any(|a| matches!(a, Action::Terminate { .. })), "{actions:?}");
        assert!(!actions.iter().any(|a| matches!(a, Action::Snapshot { .. })), "one snapshot: {actions:?}");
        let attempt = r.shards[0].current().expect("attempt");
        assert!(attempt.cleanup_failed.as_deref().is_some_and(|c| c.contains("unmount exited 32")), "{attempt:?}");
    }

    /// An agent silent while its instance works is forgiven when it comes
    /// back, and replaced only after `agent_timeout_seconds` of silence.
    #[test]
    fn a_silent_agent_is_replaced_after_the_agent_timeout_and_forgiven_if_it_returns() {
        let mut r = record(serde_json::json!({"fleet": {"count": 1}, "volumes": []}));
        let attempt = r.shards[0].current_mut().expect("attempt");
        attempt.stage = Stage::Working;
        attempt.instance_id = Some("i-1".into());
        attempt.launch_token = Some("t".into());
        attempt.launched_at = Some(now());
        attempt.phases.push(PhaseRun {
            phase: Phase::Run,
            batch: 1,
            opened_at: Some(now()),
            status: None,
            exit_code: None,
            finished_at: None,
        });
        r.commands.insert(
            1,
            CommandBatch {
                phase: Phase::Run,
                command_id: Some("c-1".into()),
                dispatched_at: now(),
                listed_at: None,
                in_flight_until: None,
            },
        );
        let mut obs = Observation::default();
        obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
        obs.invocations.insert(
            ("c-1".into(), "i-1".into()),
            InvocationView {
                instance_id: "i-1".into(),
                status: "InProgress".into(),
                exit_code: None,
                stdout: String::new(),
                stderr: String::new(),
                output_uri: None,
            },
        );
        obs.health_checked = true;
        obs.agents_checked.insert("i-1".into());
        let minutes = |m: i64| now() + Duration::minutes(m);
        let stage = |r: &JobRecord| r.shards[0].current().map(|a| a.stage);
        run(&mut r, &obs, minutes(1));
        run(&mut r, &obs, minutes(14));
        assert_eq!(stage(&r), Some(Stage::Working), "13 min of silence is not yet loss");
        obs.online.insert("i-1".into());
        run(&mut r, &obs, minutes(15));
        assert_eq!(r.shards[0].current().and_then(|a| a.agent_lost_since), None, "back Online: forgiven");
        obs.online.clear();
        run(&mut r, &obs, minutes(16));
        run(&mut r, &obs, minutes(30));
        assert_eq!(stage(&r), Some(Stage::Working), "the clock restarted at minute 16");
        let actions = run(&mut r, &obs, minutes(31));
        let attempt = r.shards[0].attempts[0].clone();
        assert_eq!(attempt.end.map(|e| e.cause), Some(EndCause::InstanceLost));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Terminate { instance_ids } if instance_ids == &["i-1".to_string()])),
            "{actions:?}"
        );
        assert!(
            r.shards[0].trail.iter().any(|n| n.text.contains("stopped reporting for 900 s")),
            "{:?}",
            r.shards[0].trail
        );
    }

    /// Found by the simulator (seed 1186): an attempt that fails on one volume
    /// in `error` must not create its other volumes in the same pass; a
    /// volume created then was found by the final sweep and deleted without
    /// the snapshot its `always` policy asks for.
    #[test]
    fn an_attempt_that_fails_on_a_volume_creates_no_other_volume() {
        let mut r = record(serde_json::json!({"fleet": {"count": 1}, "volumes": [
            {"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/a", "snapshot": "always"},
            {"name": "b", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdg", "mount_point": "/b"}
        ]}));
        let attempt = r.shards[0].current_mut().expect("attempt");
        attempt.stage = Stage::Attaching;
        attempt.instance_id = Some("i-1".into());
        attempt.availability_zone = Some("us-east-1a".into());
        attempt.launch_token = Some("t".into());
        attempt.launched_at = Some(now());
        attempt.volumes.push(AttemptVolume {
            restored_from: None,
            name: "b".into(),
            token: "j-v2".into(),
            volume_id: Some("vol-b".into()),
            created: true,
            created_at: Some(now()),
            seen: true,
            snapshot: None,
            snapshot_failures: 0,
            deleted: false,
            kept: None,
        });
        let mut obs = Observation::default();
        obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
        obs.volumes.insert(
            "vol-b".into(),
            VolumeView {
                volume_id: "vol-b".into(),
                state: "error".into(),
                availability_zone: "us-east-1a".into(),
                attached_to: None,
                tags: BTreeMap::new(),
            },
        );
        let actions = run(&mut r, &obs, now());
        assert!(!actions.iter().any(|a| matches!(a, Action::CreateVolume { .. })), "{actions:?}");
        assert_eq!(r.shards[0].attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::Permanent));
    }

    #[test]
    fn retry_rules_match_like_aws_batch() {
        let strategy = RetryStrategy {
            attempts: 3,
            evaluate_on_exit: vec![
                ExitRule { on_exit_code: Some("13*".into()), on_reason: None, action: RetryAction::Retry },
                ExitRule { on_exit_code: None, on_reason: Some("Spot*".into()), action: RetryAction::Exit },
            ],
            attempt_timeout_seconds: None,
        };
        assert_eq!(retry_action(&strategy, EndCause::CommandFailed, Some(137)), RetryAction::Retry);
        assert_eq!(retry_action(&strategy, EndCause::CommandFailed, Some(1)), RetryAction::Exit);
        assert_eq!(retry_action(&strategy, EndCause::SpotInterruption, None), RetryAction::Exit);
        assert_eq!(retry_action(&strategy, EndCause::InstanceLost, None), RetryAction::Retry);
        let default = RetryStrategy::default();
        assert_eq!(retry_action(&default, EndCause::TimedOut, None), RetryAction::Exit);
        assert_eq!(retry_action(&default, EndCause::AgentNeverOnline, None), RetryAction::Retry);
    }

    #[test]
    fn launch_options_put_spot_first_and_subnets_within_each_type() {
        let r = record(
            serde_json::json!({"market": "spot", "on_demand_fallback": true, "subnet_ids": ["subnet-0aaa1111", "subnet-0bbb2222"]}),
        );
        let options = launch_options(r.spec.as_ref().expect("spec"));
        let described: Vec<String> = options.iter().map(describe_option).collect();
        assert_eq!(described[0], "t3.micro spot in subnet-0aaa1111");
        assert_eq!(described[1], "t3.micro spot in subnet-0bbb2222");
        assert_eq!(described[2], "t3.small spot in subnet-0aaa1111");
        assert_eq!(options[4].market, Market::OnDemand);
        assert_eq!(options.len(), 8);
    }
}
