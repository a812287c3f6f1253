//! The one place where job and shard state changes: a pure function of
//! (record, observation, now) that returns the actions to take, and a pure
//! function that folds each action's result back into the record.
//!
//! Every action's intent (a ClientToken, a command comment, a snapshot
//! request) is in the record before the action runs, so a pass that crashes
//! after any call is finished by the next pass without repeating it.
//!
//! `decide` below is the list of steps a pass takes, in order. Each concern
//! has its own file:
//!
//! - `actions`: what a pass saw (`Observation`) and asks for (`Action`);
//! - `shard`: one shard's step, which hands its attempt to the files below;
//! - `launch`, `health`, `volumes`: launching, booting and status checks,
//!   creating and attaching volumes;
//! - `phases`, `dispatch`: which steps run, their timeouts, moving from one
//!   phase to the next, and the SendCommand batches that start them;
//! - `release`: unmount, snapshot and delete volumes, then the instance;
//! - `hold`: the first shard that fails for good, kept to debug (`debug_hold_minutes`);
//! - `settle`: an ended attempt is retried, replaced or gives its shard a result;
//! - `finish`: the job's outcome, state, report and final cleanup;
//! - `timing`: when the next pass looks again;
//! - `apply`: each action's reply folded back into the record.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, SecondsFormat, Utc};

use crate::error::{CloudError, RetryClass};
use crate::fence;
use crate::mutation::{self, Mutation};
use crate::ports::{
    CommandRequest, InstanceView, InvocationView, LaunchRequest, NewVolume, SnapshotView, VolumeView,
    MAX_INSTANCES_PER_COMMAND,
};
use crate::record::*;
use crate::retention;
use crate::settings::Settings;
use crate::shell::{self, MountTarget, Preamble};
use crate::spec::{
    pattern_matches, CommandSpec, JobSpec, OnRetry, RetryAction, RetryStrategy, SnapshotPolicy, VolumeSource,
};
use crate::states::{CommandStatus, InstanceState, SnapshotState, VolumeState};
use crate::tags;
pub use crate::tags::{client_token, job_name, job_tags, submitter};

mod actions;
mod apply;
mod dispatch;
mod finish;
mod health;
mod hold;
mod launch;
mod phases;
mod release;
mod settle;
mod shard;
#[cfg(test)]
mod tests;
mod timing;
mod volumes;

pub use actions::*;
pub use apply::*;
use dispatch::*;
use finish::*;
use health::*;
use hold::*;
pub use launch::*;
pub use phases::*;
use release::*;
pub use settle::*;
use shard::*;
pub use timing::*;
use volumes::*;

/// Per-pass limits, so one pass stays inside its time budget; the rest
/// waits for the next pass. RunInstances: 5 requests burst, 2/s refill.
pub(super) const MAX_LAUNCH_CALLS: usize = 4;

pub(super) const MAX_VOLUME_CALLS: usize = 100;

/// How long past its own timeout a command may stay unreported before we cancel it.
pub(super) const REPORT_GRACE_SECONDS: i64 = 120;

/// Mount and unmount get this long; they wait at most 60 s for a device.
pub(super) const VOLUME_OP_TIMEOUT_SECONDS: u32 = 600;

/// An instance RunInstances returned but DescribeInstances never showed.
pub(super) const VANISHED_AFTER_SECONDS: i64 = 600;

/// A snapshot that errors this often is given up on, and its volume kept.
pub(super) const SNAPSHOT_TRIES: u32 = 3;

/// Permanent errors while releasing an attempt before leaving it to the reaper.
pub(super) const RELEASE_ERRORS: u32 = 3;

/// A requested snapshot not visible this long is treated as failed.
pub(super) const SNAPSHOT_LOST_SECONDS: i64 = 1800;

pub struct Context<'a> {
    pub now: DateTime<Utc>,
    pub settings: &'a Settings,
    pub bucket: &'a str,
    /// What the deployment's shared launch budget granted this pass (None:
    /// no admission control; launch everything waiting).
    pub launch_grant: Option<crate::admission::Grant>,
}

/// What a pass decides, gathered as it goes: the actions in the order they
/// run, the instances to terminate (run before every other action), how
/// soon to look again, the job's ClientToken sequence (taken from the
/// record, given back at the end), and the notes for the shard being stepped.
pub(super) struct Decision {
    pub actions: Vec<Action>,
    pub terminate: Vec<String>,
    pub notes: Vec<String>,
    /// A shard of the job is held for debugging: no other is.
    pub hold_taken: bool,
    wait: u32,
    seq: u64,
}

impl Decision {
    fn new(wait: u32, seq: u64) -> Self {
        Decision { actions: Vec::new(), terminate: Vec::new(), notes: Vec::new(), hold_taken: false, wait, seq }
    }

    /// Something is due within `seconds`: the next pass comes no later.
    pub fn look_within(&mut self, seconds: u32) {
        self.wait = self.wait.min(seconds);
    }

    /// The next ClientToken sequence number of the job.
    pub fn take_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The actions to run, terminations first (nothing a pass runs before
    /// them keeps an instance billing), and how soon to look again; the
    /// ClientToken sequence goes back to the record.
    fn into_actions(self, record: &mut JobRecord) -> (Vec<Action>, u32) {
        let Decision { mut actions, mut terminate, mut wait, seq, .. } = self;
        record.next_seq = seq;
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
        (actions, wait)
    }
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
    let mut decision = Decision::new(ctx.settings.poll_delay_seconds.max(base).max(ceiling), record.next_seq);
    decision.hold_taken = record.attempts().any(|a| a.held_until.is_some());

    take_in(record, obs, now, &mut decision);

    let aborting = record.outcome.is_some();
    let bound = record.bill_bound(ctx.settings.cleanup_grace_minutes);
    let job = JobFacts {
        spec: &spec,
        job_id: record.job_id.clone(),
        aborting,
        cancel_requested: record.cancel_requested,
        tags: job_tags(record, &spec, ctx.settings),
        deadline_at: record.deadline_at,
        bound,
        past_bound: bound.is_some_and(|at| now >= at),
        stack: ctx.settings.stack.clone(),
        budget_seconds: ctx.settings.pass_budget_seconds,
    };
    if let Some(at) = bound.filter(|at| *at > now) {
        // A pass at the bound, whatever else the job waits on.
        decision.look_within(u32::try_from((at - now).num_seconds().max(1)).unwrap_or(u32::MAX));
    }
    let commands = record.commands.clone();
    for shard in record.shards.iter_mut().filter(|s| s.result.is_none()) {
        step_shard(&job, shard, &commands, obs, ctx, &mut decision);
    }
    note_hold(record, now);
    // A shard that failed for good stops the job (fail fast), with its reason.
    check_abort(record, now);

    plan_launches(record, &spec, ctx, &mut decision);
    plan_dispatch(record, &spec, obs, ctx, &mut decision);

    let all_done = record.shards.iter().all(|s| s.result.is_some());
    if all_done {
        finish(record, &spec, obs, &mut decision);
    }
    debug_assert!(decision.notes.is_empty(), "notes belong to a shard: only step_shard writes them");
    let (actions, wait) = decision.into_actions(record);
    stamp_billed(record, obs, now);
    compact(record);
    update_state(record, now);
    if record.state.is_terminal() {
        return (actions, Next::Finished);
    }
    (actions, Next::After(wait.max(pass_gap(record.shards.len())).max(1)))
}

/// What arrived since the last pass: spot warnings, sends found by their
/// comment, commands listed, status checks done.
fn take_in(record: &mut JobRecord, obs: &Observation, now: DateTime<Utc>, decision: &mut Decision) {
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
                .filter(|a| a.phases.iter().any(|p| p.batch == *number && p.status == Some(CommandStatus::Cancelled)))
                .filter_map(|a| a.instance_id.clone())
                .collect();
            if !late.is_empty() {
                decision.actions.push(Action::Cancel { command_id: command_id.clone(), instance_ids: late });
            }
        }
    }
    for batch in record.commands.values_mut() {
        let Some(id) = batch.command_id.as_ref() else { continue };
        let young = now - batch.dispatched_at <= Duration::seconds(fence::LOOKUP_LAG_SECONDS);
        if obs.not_yet_listed.contains(id) && young {
            // Not a look: listed again soon (`timing::next_working_look`).
            batch.listed_at = None;
        } else if obs.listed_commands.contains(id) {
            batch.listed_at = Some(now);
        }
    }
    if obs.health_due {
        record.health_checked_at = Some(now);
    }
}

pub(super) struct JobFacts<'a> {
    spec: &'a JobSpec,
    job_id: String,
    aborting: bool,
    /// `flotilla cancel` arrived: nothing is held for debugging.
    cancel_requested: bool,
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
