//! The job record: `s3://<bucket>/jobs/<id>/job.json`, the single source of
//! truth for a job. It holds one slot per shard; each slot keeps its attempts
//! (instance, launch option, volumes, command phases) and a reason trail.
//! Only `reconcile::decide` changes shard and job state; every write is a
//! conditional write (see `ports::Ledger`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::spec::{JobSpec, Market};
use crate::states::{CommandStatus, SnapshotState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Submitted,
    Launching,
    WaitingReady,
    Running,
    Snapshotting,
    TearingDown,
    Succeeded,
    Failed,
    Cancelled,
    Rejected,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Rejected)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Submitted => "SUBMITTED",
            JobState::Launching => "LAUNCHING",
            JobState::WaitingReady => "WAITING_READY",
            JobState::Running => "RUNNING",
            JobState::Snapshotting => "SNAPSHOTTING",
            JobState::TearingDown => "TEARING_DOWN",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::Rejected => "REJECTED",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The command phases run on every shard, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Mount,
    Setup,
    Run,
    BeforeUnmount,
    Unmount,
}

impl Phase {
    pub const ALL: [Phase; 5] = [Phase::Mount, Phase::Setup, Phase::Run, Phase::BeforeUnmount, Phase::Unmount];

    /// Cleanup phases run even after a failure, cancel or deadline.
    pub fn runs_after_failure(self) -> bool {
        matches!(self, Phase::BeforeUnmount | Phase::Unmount)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Mount => "mount",
            Phase::Setup => "setup",
            Phase::Run => "run",
            Phase::BeforeUnmount => "before_unmount",
            Phase::Unmount => "unmount",
        }
    }
}

/// The decided end of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

impl Outcome {
    pub fn terminal_state(self) -> JobState {
        match self {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Failed => JobState::Failed,
            Outcome::Cancelled => JobState::Cancelled,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStamp {
    pub state: JobState,
    pub at: DateTime<Utc>,
}

/// Where one attempt runs: the spec allows a list, tried in the user's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchOption {
    pub instance_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    pub market: Market,
}

/// Where an attempt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting for RunInstances (the token is the intent).
    Launching,
    /// Waiting for `running` and the SSM agent Online.
    Booting,
    /// Creating and attaching the attempt's volumes.
    Attaching,
    /// Running command phases.
    Working,
    /// Terminating the instance, snapshotting and deleting volumes.
    Releasing,
    /// Nothing of this attempt is left running.
    Done,
}

/// Why an attempt's work ended. `evaluate_on_exit` rules match `as_str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndCause {
    Succeeded,
    CommandFailed,
    TimedOut,
    InstanceLost,
    SpotInterruption,
    AgentNeverOnline,
    /// EC2 had no capacity for this option; the next option is tried.
    Capacity,
    /// Cancel, deadline or another shard's failure stopped the job.
    Aborted,
    /// An AWS error that retrying cannot fix (bad snapshot id, no permission).
    Permanent,
}

impl EndCause {
    pub fn as_str(self) -> &'static str {
        match self {
            EndCause::Succeeded => "Succeeded",
            EndCause::CommandFailed => "CommandFailed",
            EndCause::TimedOut => "TimedOut",
            EndCause::InstanceLost => "InstanceLost",
            EndCause::SpotInterruption => "SpotInterruption",
            EndCause::AgentNeverOnline => "AgentNeverOnline",
            EndCause::Capacity => "Capacity",
            EndCause::Aborted => "Aborted",
            EndCause::Permanent => "Permanent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptEnd {
    pub cause: EndCause,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// None until CreateSnapshot answered; the executor first looks it up by tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// As EC2 reports it (pending, completed, error).
    pub state: SnapshotState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
    /// Requested with no answer yet: until then it may still land unseen,
    /// so a lookup that misses it does not take another (`reconcile::fence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptVolume {
    /// The spec's volume name.
    pub name: String,
    /// CreateVolume ClientToken: the intent, written before the call.
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// Flotilla deletes only what it created (`volume_id` sources are kept).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub created: bool,
    /// When CreateVolume answered; DescribeVolumes may not list it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// The snapshot a retry's volume was restored from: it holds data, so
    /// the mount step never formats it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// DescribeVolumes has listed it once: not finding it later means gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seen: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRef>,
    /// Snapshots that ended in `error`; after a few the volume is kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub snapshot_failures: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Why the volume was kept (and left for the reaper), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

fn is_zero_u64(value: &u64) -> bool {
    *value == 0
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// One phase of one shard's attempt. The command itself is the batch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRun {
    pub phase: Phase,
    /// The command batch it is sent in; 0 until batched.
    #[serde(default)]
    pub batch: u64,
    /// When it became due: an agent that takes no command this long is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_at: Option<DateTime<Utc>>,
    /// SSM status once finished: Success, Failed, TimedOut, Cancelled...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CommandStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// One SendCommand for up to 50 shards in the same phase. Its comment is
/// the intent: written before the call, so a retried pass finds the command
/// before it sends another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandBatch {
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    pub dispatched_at: DateTime<Utc>,
    /// When its invocations were last listed: a command is listed again when
    /// an event names one of its instances, or when this is a safety poll old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listed_at: Option<DateTime<Utc>>,
    /// Sent with no answer yet: until then it may still land unseen, so a
    /// lookup that misses it does not send it again (`reconcile::fence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight_until: Option<DateTime<Utc>>,
}

/// SendCommand's Comment for a batch: unique per job and batch.
pub fn command_comment(job_id: &str, phase: Phase, batch: u64) -> String {
    format!("flotilla {job_id} {} c{batch}", phase.as_str())
}

impl SnapshotRef {
    /// Requested now: no answer yet, and none can land unseen before the
    /// takeover rule's window ends.
    pub fn requested(now: DateTime<Utc>, budget_seconds: u32) -> Self {
        SnapshotRef {
            snapshot_id: None,
            state: "requested".into(),
            requested_at: Some(now),
            in_flight_until: Some(crate::fence::in_flight_until(now, budget_seconds)),
        }
    }
}

/// Whole seconds from `from` to `to`, for the report's timeline.
pub fn seconds_after(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Option<u32> {
    let (from, to) = (from?, to?);
    u32::try_from((to - from).num_seconds().max(0)).ok()
}

impl PhaseRun {
    pub fn succeeded(&self) -> bool {
        self.status == Some(CommandStatus::Success)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based; capacity failover keeps the number, a retry adds one.
    pub number: u32,
    /// Index into the job's launch options (`JobRecord::launch_of`).
    pub option: u32,
    /// RunInstances ClientToken of the batch this attempt launches in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched_at: Option<DateTime<Utc>>,
    /// Seconds from launch until a pass first saw the instance stopped,
    /// terminated or released: what the report prices as realized cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminate_requested: bool,
    /// A spot interruption or rebalance warning arrived for this instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// It ran past the retry strategy's `attempt_timeout_seconds`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// First health check that found its SSM agent not Online while working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_lost_since: Option<DateTime<Utc>>,
    /// Last health check that found its agent not Online while working: a
    /// step that then times out may have timed out for want of its agent
    /// (SSM cannot tell), so it counts as the instance's failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_away_seen_at: Option<DateTime<Utc>>,
    /// First health check that found a status check `impaired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impaired_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<AttemptVolume>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseRun>,
    /// Phases that succeeded keep only their names, so a 1,000-shard record
    /// stays small; the phase in flight and failures keep their detail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_phases: Vec<Phase>,
    /// Seconds after launch that the instance was ready (running, its agent
    /// Online): the report's timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_after: Option<u32>,
    /// Each succeeded phase's start and end, in seconds after launch
    /// (`["run", 14, 40]`): the report's timeline, in few bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_times: Vec<(Phase, u32, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<AttemptEnd>,
    /// The first cleanup step (`before_unmount`, unmount) that failed, in
    /// words: the shard fails, and its snapshots never count as good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_failed: Option<String>,
    /// Stopped at the job's bound: its mounted volumes are snapshotted while
    /// attached (crash-consistent), then the instance is terminated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_bound: bool,
    /// The cleanup failed because the instance or its agent was lost, not
    /// the step: the work stands (it is never run twice) and the shard
    /// succeeds; its snapshot, crash-consistent, is that run's only copy of
    /// the work, so it counts as good when the job SUCCEEDED.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cleanup_lost: bool,
    /// Permanent errors terminating the instance; after a few it is left to
    /// the reaper with this reason.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub release_errors: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_for_reaper: Option<String>,
    /// Held for debugging (`debug_hold_minutes`) until then: its instance
    /// and attached volumes are left for the reaper, which removes them after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<DateTime<Utc>>,
}

impl Attempt {
    pub fn new(number: u32, option: u32) -> Self {
        Attempt {
            number,
            option,
            launch_token: None,
            instance_id: None,
            availability_zone: None,
            stage: Stage::Launching,
            launched_at: None,
            billed_seconds: None,
            terminate_requested: false,
            interrupted: false,
            timed_out: false,
            agent_lost_since: None,
            agent_away_seen_at: None,
            impaired_since: None,
            volumes: vec![],
            phases: vec![],
            completed_phases: vec![],
            ready_after: None,
            phase_times: vec![],
            end: None,
            cleanup_failed: None,
            cleanup_lost: false,
            at_bound: false,
            release_errors: 0,
            held_until: None,
            left_for_reaper: None,
        }
    }

    pub fn phase(&self, phase: Phase) -> Option<&PhaseRun> {
        self.phases.iter().find(|p| p.phase == phase)
    }

    /// The phases this attempt ran (or runs), in order, detailed or not.
    pub fn phases_ran(&self) -> Vec<Phase> {
        let mut all: Vec<Phase> =
            self.completed_phases.iter().copied().chain(self.phases.iter().map(|p| p.phase)).collect();
        all.sort();
        all.dedup();
        all
    }
}

/// A reason trail entry: why a decision was made, for the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Note {
    pub at: DateTime<Utc>,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardResult {
    pub succeeded: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    /// The last one is current.
    pub attempts: Vec<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ShardResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trail: Vec<Note>,
}

/// The first shard that failed for good, kept for debugging
/// (`debug_hold_minutes`): its instance and volumes stay until `ends_at`,
/// then the reaper removes them (snapshotting the volumes first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebugHold {
    pub shard: u32,
    pub instance_id: String,
    /// Its volumes, attached to it while it is held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_ids: Vec<String>,
    /// When the hold began: once the failure's snapshots were taken.
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// `flotilla release` ended it early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<DateTime<Utc>>,
    /// The instance's `expires-at` tag says `until`, so the reaper honours
    /// the hold even when it cannot read this record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tagged: bool,
}

impl DebugHold {
    /// When the hold ends: its end, or the release if that came first.
    pub fn ends_at(&self) -> DateTime<Utc> {
        self.released_at.map_or(self.until, |at| at.min(self.until))
    }

    /// The hold in words, with how to reach the instance and end the hold.
    pub fn describe(&self, job_id: &str, now: DateTime<Utc>) -> String {
        let until = self.ends_at().format("%Y-%m-%d %H:%M UTC");
        let volumes = if self.volume_ids.is_empty() {
            String::new()
        } else {
            format!(" with {} attached (unmounted; mount it to look)", self.volume_ids.join(", "))
        };
        if now < self.ends_at() {
            format!(
                "shard {}'s instance {}{volumes} is held for debugging until {until}: `{}`; `flotilla release {job_id}` ends it; then the reaper snapshots its volumes again and removes them and the instance",
                self.shard,
                self.instance_id,
                self.session_command(None)
            )
        } else {
            let how = if self.released_at.is_some() { "released" } else { "ended" };
            format!(
                "shard {}'s instance {} was held for debugging; the hold {how} at {until}, and the reaper removes it and its volumes (snapshotting them first)",
                self.shard, self.instance_id
            )
        }
    }

    /// How a person reaches the instance: Session Manager, no SSH key.
    pub fn session_command(&self, region: Option<&str>) -> String {
        let region = region.map(|r| format!(" --region {r}")).unwrap_or_default();
        format!("aws ssm start-session --target {}{region}", self.instance_id)
    }
}

/// What a job last announced: its state, each shard's status, the counter
/// that numbers its notices, and its last heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Announced {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobState>,
    /// `STATUS#attempt` per shard index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<String>,
    /// The last notice's sequence number; the next is one more.
    #[serde(default)]
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// The debug hold was announced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

/// Lines of output kept per shard and phase; the full output is in S3.
pub const OUTPUT_TAIL_LINES: usize = 50;

/// Where a shard's phase output tail is kept, under `jobs/<id>/`.
pub fn output_name(shard: u32, attempt: u32, phase: Phase) -> String {
    format!("output/{shard}/{attempt}-{}.txt", phase.as_str())
}

/// The trail keeps this many entries per shard, so records stay small.
pub const TRAIL_LIMIT: usize = 12;

impl Shard {
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    pub fn current_mut(&mut self) -> Option<&mut Attempt> {
        self.attempts.last_mut()
    }

    pub fn note(&mut self, at: DateTime<Utc>, text: impl Into<String>) {
        self.trail.push(Note { at, text: text.into() });
        if self.trail.len() > TRAIL_LIMIT {
            let excess = self.trail.len() - TRAIL_LIMIT;
            self.trail.drain(1..=excess); // keep the first entry: how it started
        }
    }
}

/// One reconciler at a time: a lease taken by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub until: DateTime<Utc>,
}

/// The next poll already on its way, so a pass does not send another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wake {
    pub id: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub state: JobState,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    /// Why the job is where it is, in words.
    pub reason: String,
    #[serde(default)]
    pub spec: Option<JobSpec>,
    #[serde(default)]
    pub plan: Option<Plan>,
    pub submitted_at: DateTime<Utc>,
    /// The IAM principal that sent the job (SQS SenderId), or `schedule:<rule>`.
    /// Snapshot retention never prunes across submitters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    #[serde(default)]
    pub deadline_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub timeline: Vec<PhaseStamp>,
    /// Written by intake: the only field another writer may change under a lease.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Instances (or launches whose reply was lost) and volumes the job
    /// could not remove because its role could no longer be assumed past
    /// its bound: the user must look at them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stranded_instances: Vec<String>,
    /// When the cancel arrived: the bound on the bill counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Reconcile messages of this job that SQS dead-lettered, counted by the
    /// reaper. Written outside a pass, like `cancel_requested`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dead_letters: u32,
    /// Their SQS message ids (the last few), so a letter counts once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_letter_ids: Vec<String>,
    /// Instances a spot interruption or rebalance event named; the reconciler
    /// moves them onto their attempts. Written by the event path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interruptions: Vec<String>,
    /// Instances that events named while the job's last pass was too recent
    /// to run another: the next pass lists their commands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hinted: Vec<String>,
    /// A trigger that asks for something (not a poll, tick or lease-end)
    /// came while a pass held the lease: that pass wakes the job again a gap
    /// after it ends, not at its next poll, and the next pass looks at every
    /// command in flight.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub woken: bool,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_reason: Option<String>,
    #[serde(default)]
    pub resolved_image: Option<String>,
    #[serde(default)]
    pub shards: Vec<Shard>,
    /// Counter for tokens and comments, so each intent is unique.
    #[serde(default)]
    pub next_seq: u64,
    /// Command batches by number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub commands: BTreeMap<u64, CommandBatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake: Option<Wake>,
    /// Reconcile passes so far.
    #[serde(default)]
    pub passes: u64,
    /// The shard held for debugging, once its hold began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<DebugHold>,
    /// Writes of this record (S3 PUTs), counted by each writer just before
    /// it writes: Flotilla's own cost is mostly these (`own_cost.rs`).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub writes: u64,
    /// Milliseconds reconcile passes took, lease to release: the Lambda
    /// duration Flotilla bills itself for this job.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub busy_ms: u64,
    /// Last health check of working instances (agents and status checks):
    /// once a minute, not every pass, so a big fleet costs few calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checked_at: Option<DateTime<Utc>>,
    /// Volume names whose snapshot lineage was pruned at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned_snapshots: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub report_written: bool,
    /// Why the last pass stopped early (a throttle or outage that outlasted
    /// the SDK's retries); cleared by the next pass that gets through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    /// Passes in a row whose observation failed with a permanent error.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observe_failures: u32,
    /// Permanent errors of the final sweep; past a few it leaves the rest to the reaper.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cleanup_failures: u32,
    /// A batched TerminateInstances was refused: terminate one at a time, so
    /// one protected instance does not hold the others.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminate_singly: bool,
    /// Things that went wrong without changing the outcome, for the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For REJECTED records: the start of what was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_input: Option<String>,
    /// What the job last announced on its events (`events::collect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<Announced>,
    /// Notices saved with their transitions and not yet sent to the
    /// notify queue (`reconcile::finish_pass` sends them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<crate::notice::Notice>,
}

impl JobRecord {
    pub fn new(job_id: String, spec: JobSpec, plan: Plan, now: DateTime<Utc>) -> Self {
        let reason = format!("accepted: {}", plan.sizing);
        let mut record = JobRecord::blank(job_id, JobState::Submitted, reason, now);
        record.deadline_at = Some(now + chrono::Duration::minutes(i64::from(spec.deadline_minutes)));
        record.shards = (0..plan.instance_count)
            .map(|index| Shard { index, attempts: vec![Attempt::new(1, 0)], result: None, trail: vec![] })
            .collect();
        record.spec = Some(spec);
        record.plan = Some(plan);
        record
    }

    pub fn rejected(job_id: String, reason: String, input: &str, now: DateTime<Utc>) -> Self {
        let mut record = JobRecord::blank(job_id, JobState::Rejected, reason, now);
        record.rejected_input = Some(input.chars().take(2048).collect());
        record
    }

    /// A job whose cancel arrived before it did: terminal at once, nothing
    /// launched, its spec kept for the user.
    pub fn cancelled_on_arrival(job_id: String, spec: JobSpec, reason: String, now: DateTime<Utc>) -> Self {
        let mut record = JobRecord::blank(job_id, JobState::Cancelled, reason.clone(), now);
        record.spec = Some(spec);
        record.cancel_requested = true;
        record.outcome = Some(Outcome::Cancelled);
        record.outcome_reason = Some(reason);
        record
    }

    fn blank(job_id: String, state: JobState, reason: String, now: DateTime<Utc>) -> Self {
        JobRecord {
            job_id,
            state,
            updated_at: Some(now),
            reason,
            spec: None,
            plan: None,
            submitted_at: now,
            submitted_by: None,
            deadline_at: None,
            timeline: vec![PhaseStamp { state, at: now }],
            cancel_requested: false,
            cancel_requested_at: None,
            stranded_instances: vec![],
            dead_letters: 0,
            dead_letter_ids: vec![],
            interruptions: vec![],
            hinted: vec![],
            woken: false,
            outcome: None,
            outcome_reason: None,
            resolved_image: None,
            shards: vec![],
            next_seq: 0,
            commands: BTreeMap::new(),
            lease: None,
            wake: None,
            passes: 0,
            hold: None,
            writes: 0,
            busy_ms: 0,
            health_checked_at: None,
            pruned: vec![],
            pruned_snapshots: vec![],
            report_written: false,
            stalled: None,
            observe_failures: 0,
            cleanup_failures: 0,
            terminate_singly: false,
            warnings: vec![],
            rejected_input: None,
            announced: None,
            outbox: Vec::new(),
        }
    }

    /// Every instance any attempt launched.
    pub fn instance_ids(&self) -> Vec<String> {
        self.attempts().filter_map(|a| a.instance_id.clone()).collect()
    }

    /// The hard bound on the bill: every instance of the job is terminated
    /// by the deadline, or the cancel's arrival, plus the cleanup grace,
    /// whatever its steps' timeouts.
    pub fn bill_bound(&self, cleanup_grace_minutes: u32) -> Option<DateTime<Utc>> {
        if crate::mutation::on(crate::mutation::Mutation::NoBound) {
            return None;
        }
        let stop = match (self.deadline_at, self.cancel_requested_at) {
            (Some(deadline), Some(cancel)) => Some(deadline.min(cancel)),
            (one, other) => one.or(other),
        };
        stop.map(|at| at + chrono::Duration::minutes(i64::from(cleanup_grace_minutes)))
    }

    pub fn attempts(&self) -> impl Iterator<Item = &Attempt> {
        self.shards.iter().flat_map(|s| s.attempts.iter())
    }

    /// Each shard's final snapshots (its last attempt's, completed): what a
    /// SUCCEEDED run marks good, one per shard and volume.
    pub fn final_snapshots(&self, volume: &str) -> Vec<String> {
        self.shards
            .iter()
            .filter_map(|s| s.attempts.last())
            .filter(|a| a.cleanup_failed.is_none() || a.cleanup_lost)
            .flat_map(|a| a.volumes.iter().filter(|v| v.name == volume))
            .filter_map(|v| v.snapshot.as_ref().filter(|s| s.state == SnapshotState::Completed)?.snapshot_id.clone())
            .collect()
    }

    /// Snapshots this job took, with the volume name they belong to.
    pub fn snapshots(&self) -> Vec<(String, String)> {
        self.attempts()
            .flat_map(|a| a.volumes.iter())
            .filter_map(|v| {
                let id = v.snapshot.as_ref()?.snapshot_id.clone()?;
                Some((v.name.clone(), id))
            })
            .collect()
    }

    /// Where an attempt runs: its option in the spec's list.
    pub fn launch_of(&self, attempt: &Attempt) -> LaunchOption {
        launch_of(&self.spec.as_ref().map(launch_options).unwrap_or_default(), attempt)
    }

    pub fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// The option an attempt launches on: its index in `options`, else the
/// first (an index no option has is never written; a record is read
/// safely anyway), else a placeholder for a spec with no types.
pub fn launch_of(options: &[LaunchOption], attempt: &Attempt) -> LaunchOption {
    options.get(attempt.option as usize).or(options.first()).cloned().unwrap_or(LaunchOption {
        instance_type: "?".into(),
        subnet_id: None,
        market: Market::OnDemand,
    })
}

/// The (instance type x subnet x market) options a slot may launch on, in
/// the user's order: every subnet of the first type, then the next type;
/// spot options first when the spec allows an on-demand fallback.
pub fn launch_options(spec: &JobSpec) -> Vec<LaunchOption> {
    let subnets: Vec<Option<String>> =
        if spec.subnet_ids.is_empty() { vec![None] } else { spec.subnet_ids.iter().cloned().map(Some).collect() };
    let mut markets = vec![spec.market];
    if spec.market == Market::Spot && spec.on_demand_fallback {
        markets.push(Market::OnDemand);
    }
    let mut options = Vec::new();
    for market in markets {
        for instance_type in &spec.instance_types {
            for subnet_id in &subnets {
                options.push(LaunchOption {
                    instance_type: instance_type.clone(),
                    subnet_id: subnet_id.clone(),
                    market,
                });
            }
        }
    }
    options
}

/// The S3 key of a job's record.
pub fn record_key(job_id: &str) -> String {
    format!("jobs/{job_id}/job.json")
}

/// The S3 key that marks a job as not yet terminal, for the safety tick.
pub fn active_key(job_id: &str) -> String {
    format!("active/{job_id}")
}
