//! The job record: `s3://<bucket>/jobs/<id>/job.json`, the single source of
//! truth for a job. Every change is a conditional write (see `ports::Ledger`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::spec::JobSpec;

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

/// The command phases run on every instance, in this order.
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

/// The decided end of a job, set before teardown so teardown knows it.
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
pub struct Outbox {
    pub message: crate::lifecycle::StepMessage,
    pub delay_seconds: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStamp {
    pub state: JobState,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceEntry {
    pub instance_id: String,
    pub shard_index: u32,
    #[serde(default)]
    pub availability_zone: String,
    #[serde(default)]
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// The spec's volume name.
    pub name: String,
    pub volume_id: String,
    pub instance_id: String,
    pub device: String,
    /// Flotilla deletes only what it created.
    pub created_by_flotilla: bool,
    #[serde(default)]
    pub detached: bool,
    #[serde(default)]
    pub deleted: bool,
    /// DetachVolume calls so far; past a limit teardown forces, then gives up.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub detach_requests: u32,
    /// It never detached: snapshotted in place, deleted once the fleet is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach_abandoned: bool,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    pub instance_id: String,
    /// SSM status: Pending, InProgress, Success, Failed, TimedOut, Cancelled...
    pub status: String,
    pub exit_code: Option<i32>,
    /// The last lines of standard output and error.
    #[serde(default)]
    pub output_tail: Vec<String>,
    #[serde(default)]
    pub output_uri: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRun {
    pub phase: Phase,
    /// One SendCommand per 50 instances.
    #[serde(default)]
    pub command_ids: Vec<String>,
    /// Set before SendCommand so a redelivery finds (not repeats) the command.
    pub dispatched_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub invocations: Vec<Invocation>,
    #[serde(default)]
    pub succeeded: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub volume_name: String,
    pub volume_id: String,
    pub snapshot_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub state: JobState,
    /// Bumped by every step write; a step message carries the value it expects.
    #[serde(default)]
    pub step_seq: u64,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    /// The message sent after the last write (transactional outbox): if the
    /// sender crashed before sending it, a redelivery of the message before
    /// sends it again.
    #[serde(default)]
    pub outbox: Option<Outbox>,
    /// Why the job is where it is, in words.
    pub reason: String,
    #[serde(default)]
    pub spec: Option<JobSpec>,
    #[serde(default)]
    pub plan: Option<Plan>,
    pub submitted_at: DateTime<Utc>,
    #[serde(default)]
    pub deadline_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub timeline: Vec<PhaseStamp>,
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Why the outcome was decided; `reason` also carries progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_reason: Option<String>,
    #[serde(default)]
    pub resolved_image: Option<String>,
    #[serde(default)]
    pub instances: Vec<InstanceEntry>,
    #[serde(default)]
    pub volumes: Vec<VolumeEntry>,
    #[serde(default)]
    pub steps: Vec<StepRun>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotEntry>,
    #[serde(default)]
    pub pruned_snapshots: Vec<String>,
    #[serde(default)]
    pub terminated: bool,
    /// Permanent errors met while releasing resources; teardown gives up after a few.
    #[serde(default)]
    pub teardown_errors: u32,
    /// Things that went wrong without changing the outcome, for the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// For REJECTED records: the start of what was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_input: Option<String>,
}

impl JobRecord {
    pub fn new(job_id: String, spec: JobSpec, plan: Plan, now: DateTime<Utc>) -> Self {
        let reason = format!("accepted: {}", plan.sizing);
        let mut record = JobRecord::blank(job_id, JobState::Submitted, reason, now);
        record.deadline_at = Some(now + chrono::Duration::minutes(i64::from(spec.deadline_minutes)));
        record.spec = Some(spec);
        record.plan = Some(plan);
        record
    }

    pub fn rejected(job_id: String, reason: String, input: &str, now: DateTime<Utc>) -> Self {
        let mut record = JobRecord::blank(job_id, JobState::Rejected, reason, now);
        record.rejected_input = Some(input.chars().take(2048).collect());
        record
    }

    fn blank(job_id: String, state: JobState, reason: String, now: DateTime<Utc>) -> Self {
        JobRecord {
            job_id,
            state,
            step_seq: 0,
            updated_at: Some(now),
            outbox: None,
            reason,
            spec: None,
            plan: None,
            submitted_at: now,
            deadline_at: None,
            timeline: vec![PhaseStamp { state, at: now }],
            cancel_requested: false,
            outcome: None,
            outcome_reason: None,
            resolved_image: None,
            instances: vec![],
            volumes: vec![],
            steps: vec![],
            snapshots: vec![],
            pruned_snapshots: vec![],
            terminated: false,
            teardown_errors: 0,
            warnings: vec![],
            rejected_input: None,
        }
    }

    pub fn step(&self, phase: Phase) -> Option<&StepRun> {
        self.steps.iter().find(|s| s.phase == phase)
    }

    pub fn step_mut(&mut self, phase: Phase) -> Option<&mut StepRun> {
        self.steps.iter_mut().find(|s| s.phase == phase)
    }

    pub fn instance_ids(&self) -> Vec<String> {
        self.instances.iter().map(|i| i.instance_id.clone()).collect()
    }
}

/// The S3 key of a job's record.
pub fn record_key(job_id: &str) -> String {
    format!("jobs/{job_id}/job.json")
}
