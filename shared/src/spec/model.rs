//! What a job spec says: the types a body parses into. Their checks are
//! in `spec` (`validate`), beside the limits they enforce.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Caller-chosen id: resubmitting the same id is a no-op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Groups runs of the same job for snapshot retention; defaults to the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub fleet: FleetSpec,
    /// The work items, split into one manifest per shard in S3. Without it,
    /// `fleet.items` (a count) gives each shard a range of item numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<WorkSpec>,
    /// Reject the job if its cost estimate is above this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// Keep the first shard that fails for good (its instance and volumes)
    /// this long after the job fails, to debug it over Session Manager;
    /// `flotilla release` ends it early and the reaper removes it after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_hold_minutes: Option<u32>,
    pub instance_types: Vec<String>,
    /// An AMI id (`ami-...`) or an SSM parameter path (`/aws/service/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template: Option<LaunchTemplateRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnet_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    #[serde(default)]
    pub market: Market,
    /// With `market: spot`: when spot has no capacity, or an instance is
    /// interrupted, the slot moves to on-demand.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand_fallback: bool,
    /// Which shard failures are retried, and how often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryStrategy>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// Plain values, or secrets by reference (`{"from_ssm": "/path"}`,
    /// `{"from_secrets_manager": "arn:..."}`) that the instance resolves:
    /// a secret is never in the record or in a SendCommand.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<CommandSpec>,
    pub run: CommandSpec,
    /// Runs before unmount and snapshot, even when `run` failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_unmount: Option<CommandSpec>,
    /// Whole-job deadline, counted from submission.
    pub deadline_minutes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Who hears of the job besides EventBridge: a Step Functions task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
}

/// `notify.task_token`: the token of a Step Functions task started with
/// `.waitForTaskToken`. The job ends it with SendTaskSuccess (the job's
/// summary) or SendTaskFailure (`Flotilla.JobFailed`, `Flotilla.JobCancelled`,
/// `Flotilla.JobRejected`), and heartbeats it while it runs.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_token: Option<String>,
}

/// A token ends the caller's task for whoever holds it: never printed.
impl std::fmt::Debug for NotifySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifySpec").field("task_token", &self.task_token.as_ref().map(|_| "<redacted>")).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum FleetSpec {
    Count {
        count: u32,
    },
    /// Sized from a benchmark: `ceil(items / (items_per_instance_minute * within_minutes))`.
    /// `items` is omitted when `work` gives the items.
    Sized {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        items: Option<u64>,
        items_per_instance_minute: f64,
        within_minutes: u32,
        max_instances: u32,
    },
}

/// Where a job's work items come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkSpec {
    /// Every object under `s3://bucket/prefix`, listed once at intake; a
    /// manifest line is the object's `s3://` URI.
    S3Prefix(String),
    /// The items themselves, one manifest line each. The record keeps only
    /// their count: the list lives in the manifests.
    List(Vec<String>),
}

/// AWS Batch's retry strategy, per shard: `attempts` counts the first run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryStrategy {
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Checked in order; the first match decides. When none matches, instance
    /// loss, spot interruption and an agent that never came Online are
    /// retried, and a failed or timed-out command exits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluate_on_exit: Vec<ExitRule>,
    /// An attempt not finished this long after its instance launched ends
    /// TimedOut (AWS Batch's attemptDurationSeconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_timeout_seconds: Option<u32>,
}

fn default_attempts() -> u32 {
    3
}

impl Default for RetryStrategy {
    fn default() -> Self {
        RetryStrategy { attempts: default_attempts(), evaluate_on_exit: vec![], attempt_timeout_seconds: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRule {
    /// Exit code pattern: digits, optionally ending in `*` (`"13*"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exit_code: Option<String>,
    /// Reason pattern, optionally ending in `*`: `InstanceLost`,
    /// `SpotInterruption`, `AgentNeverOnline`, `CommandFailed`, `TimedOut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_reason: Option<String>,
    pub action: RetryAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RetryAction {
    Retry,
    Exit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchTemplateRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    #[default]
    OnDemand,
    Spot,
}

impl Market {
    /// As the spec spells it: `on-demand` or `spot`.
    pub fn as_str(self) -> &'static str {
        match self {
            Market::OnDemand => "on-demand",
            Market::Spot => "spot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Short name, used in tags and for retention.
    pub name: String,
    pub source: VolumeSource,
    /// Device name requested at attach, e.g. `/dev/sdf`. On Nitro instances the
    /// kernel names it `/dev/nvme*n1`; the mount script finds it by volume id.
    pub device: String,
    pub mount_point: String,
    #[serde(default)]
    pub snapshot: SnapshotPolicy,
    #[serde(default)]
    pub retention: Retention,
    /// What a retried shard's replacement instance gets: a fresh volume, or
    /// one restored from the snapshot of the lost attempt's volume.
    #[serde(default, skip_serializing_if = "OnRetry::is_fresh")]
    pub on_retry: OnRetry,
}

/// A retried shard's volume: fresh (the default) or restored from the last
/// snapshot of the attempt it replaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRetry {
    #[default]
    Fresh,
    /// The next attempt's volume is created from the snapshot of the last
    /// attempt's volume (`snapshot: always` takes one at the end of every
    /// attempt), so work resumes from where it stopped.
    Restore,
}

impl OnRetry {
    pub fn is_fresh(&self) -> bool {
        *self == OnRetry::Fresh
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeSource {
    /// A fresh, empty, encrypted volume per instance; formatted on first mount.
    New {
        size_gib: u32,
        #[serde(default = "default_volume_type")]
        volume_type: String,
    },
    /// A volume per instance restored from this snapshot.
    SnapshotId(String),
    /// An existing volume; attached to the first instance only and never deleted.
    VolumeId(String),
}

fn default_volume_type() -> String {
    "gp3".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotPolicy {
    Never,
    #[default]
    OnSuccess,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep this many of the newest snapshots of this job name and volume.
    pub keep_last: u32,
    /// Delete older snapshots past this age; 0 keeps them regardless of age.
    #[serde(default)]
    pub max_age_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_last: 7, max_age_days: 0 }
    }
}

/// An environment variable's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    Plain(String),
    Secret(SecretRef),
}

impl From<&str> for EnvValue {
    fn from(value: &str) -> Self {
        EnvValue::Plain(value.to_string())
    }
}

/// Where the instance reads a secret from, with its own credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// An SSM parameter path (a SecureString is decrypted).
    FromSsm(String),
    /// A Secrets Manager secret ARN; its SecretString is used.
    FromSecretsManager(String),
}

/// One step of work: either argv arrays (quoted by Flotilla) or a script
/// (the user's own shell code, passed verbatim).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// SSM's executionTimeout. Unset: whatever is left of the job's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}
