//! Narrow ports between the lifecycle and the cloud. The AWS adapters live in
//! `aws/`, the in-memory fake cloud in `fake`. Every call must be safe to
//! repeat: a redelivered message repeats the calls of the step it carries.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::CloudError;
use crate::record::JobRecord;
use crate::settings::Settings;
use crate::spec::Market;
pub use crate::states::{CommandStatus, InstanceState, SnapshotState, VolumeState};
use crate::wake::WakeMessage;

pub type CloudResult<T> = Result<T, CloudError>;

/// Tag keys Flotilla writes on everything it creates.

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub instance_id: String,
    pub state: InstanceState,
    pub availability_zone: String,
    pub launch_index: u32,
    /// Its `flotilla:job-id` tag.
    pub job_id: Option<String>,
    /// Its `flotilla:launch` tag: the RunInstances ClientToken it came from.
    pub launch_token: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl InstanceView {
    /// Not running and never will again without help: lost to the job.
    pub fn is_gone(&self) -> bool {
        self.state.is_gone()
    }

    pub fn is_terminated(&self) -> bool {
        self.state == InstanceState::Terminated
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRequest {
    pub job_id: String,
    /// MaxCount; MinCount is 1, so EC2 launches what capacity allows.
    pub count: u32,
    pub instance_type: String,
    pub image_id: Option<String>,
    pub launch_template_id: Option<String>,
    pub launch_template_name: Option<String>,
    pub launch_template_version: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub instance_profile: Option<String>,
    pub market: Market,
    /// All tags, applied at create time to instances and their root volumes.
    pub tags: BTreeMap<String, String>,
    /// Same job and attempt, same token: EC2 returns the first launch again.
    pub client_token: String,
}

#[async_trait]
pub trait Fleet: Send + Sync {
    /// Resolve an SSM parameter such as `/aws/service/ami-amazon-linux-latest/...`.
    async fn resolve_image(&self, parameter: &str) -> CloudResult<String>;
    /// This deployment's instances of this job in every state, terminated
    /// ones included while EC2 still lists them, found by tag (one paginated call).
    async fn find_instances(&self, stack: &str, job_id: &str) -> CloudResult<Vec<InstanceView>>;
    async fn launch(&self, request: &LaunchRequest) -> CloudResult<Vec<InstanceView>>;
    /// The job each of these instances belongs to, from its tags, in one
    /// filtered call; instances that are not this deployment's (or not
    /// visible yet) are left out.
    async fn jobs_of(&self, stack: &str, instance_ids: &[String]) -> CloudResult<BTreeMap<String, String>>;
    /// DescribeInstanceStatus of these running instances: each one whose
    /// checks are conclusive, with true if its instance or system check is
    /// `impaired` (false: both `ok`). Initializing or unknown ones are left out.
    async fn status_checks(&self, instance_ids: &[String]) -> CloudResult<Vec<(String, bool)>>;
    /// Every instance this deployment manages in this account and Region that
    /// is not terminated yet, stopped ones included (one paginated call).
    async fn find_managed(&self, stack: &str) -> CloudResult<Vec<InstanceView>>;
    /// CreateTags on instances or volumes.
    async fn tag(&self, resource_ids: &[String], key: &str, value: &str) -> CloudResult<()>;
    /// Terminating an already terminated (or stopped) instance is fine.
    async fn terminate(&self, instance_ids: &[String]) -> CloudResult<()>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeView {
    pub volume_id: String,
    pub state: VolumeState,
    pub availability_zone: String,
    pub attached_to: Option<String>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewVolume {
    pub availability_zone: String,
    pub size_gib: Option<u32>,
    pub volume_type: String,
    pub snapshot_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub client_token: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotView {
    pub snapshot_id: String,
    pub volume_id: String,
    pub state: SnapshotState,
    pub started_at: DateTime<Utc>,
    pub tags: BTreeMap<String, String>,
}

#[async_trait]
pub trait Volumes: Send + Sync {
    /// Volumes carrying all of these tags.
    async fn find_volumes(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<VolumeView>>;
    async fn describe_volume(&self, volume_id: &str) -> CloudResult<Option<VolumeView>>;
    async fn create_volume(&self, request: &NewVolume) -> CloudResult<VolumeView>;
    async fn attach(&self, volume_id: &str, instance_id: &str, device: &str) -> CloudResult<()>;
    /// `force` is EC2's last resort for a detach that does not finish.
    async fn detach(&self, volume_id: &str, instance_id: &str, force: bool) -> CloudResult<()>;
    async fn delete_volume(&self, volume_id: &str) -> CloudResult<()>;
    async fn describe_snapshot(&self, snapshot_id: &str) -> CloudResult<Option<SnapshotView>>;
    /// Snapshots carrying all of these tags.
    async fn find_snapshots(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<SnapshotView>>;
    /// The job of each of these snapshots that is this stack's, by id (an
    /// unknown id matches nothing rather than failing the call).
    async fn snapshot_jobs(&self, stack: &str, snapshot_ids: &[String]) -> CloudResult<BTreeMap<String, String>>;
    async fn create_snapshot(
        &self,
        volume_id: &str,
        description: &str,
        tags: &BTreeMap<String, String>,
    ) -> CloudResult<String>;
    async fn delete_snapshot(&self, snapshot_id: &str) -> CloudResult<()>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    /// At most 50: SendCommand's limit.
    pub instance_ids: Vec<String>,
    pub lines: Vec<String>,
    pub timeout_seconds: u32,
    /// Identifies the command so a redelivery can find it instead of resending.
    pub comment: String,
    pub output_bucket: String,
    pub output_prefix: String,
    /// Stream the output to this CloudWatch Logs group as it is written
    /// (the S3 copy comes only once the step ends).
    pub log_group: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InvocationView {
    pub instance_id: String,
    pub status: CommandStatus,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_uri: Option<String>,
}

/// SendCommand's delivery timeout (TimeoutSeconds, 30 s at least) for a
/// command with this execution timeout: a command its agent has not
/// received by then never runs, and is `DeliveryTimedOut` once both have
/// passed. The default would be an hour.
pub fn delivery_timeout_seconds(execution_timeout_seconds: u32) -> u32 {
    execution_timeout_seconds.clamp(30, 2_592_000)
}

impl InvocationView {
    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }
}

/// SendCommand's instance limit.
pub const MAX_INSTANCES_PER_COMMAND: usize = 50;

/// DescribeInstanceInformation: at most 100 values in its InstanceIds
/// filter, and at most 50 agents on a page (10 unless asked).
pub const MAX_AGENT_IDS_PER_LOOKUP: usize = 100;
pub const MAX_AGENTS_PER_PAGE: usize = 50;

#[async_trait]
pub trait Commands: Send + Sync {
    /// Instance ids whose SSM agent reports PingStatus Online.
    async fn online_agents(&self, instance_ids: &[String]) -> CloudResult<Vec<String>>;
    async fn send(&self, request: &CommandRequest) -> CloudResult<String>;
    /// A command sent earlier to this instance with this comment.
    async fn find_by_comment(&self, instance_id: &str, comment: &str) -> CloudResult<Option<String>>;
    async fn invocations(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<Vec<InvocationView>>;
    /// Cancel the command on these instances only (the others keep running).
    async fn cancel(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<()>;
}

/// A record and the version it was read at.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub record: JobRecord,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Written {
        version: String,
    },
    /// Someone else wrote first: reload and decide again.
    Conflict,
}

/// Job records, changed only by compare-and-swap.
#[async_trait]
pub trait Records: Send + Sync {
    async fn load(&self, job_id: &str) -> CloudResult<Option<Versioned>>;
    /// Create only if absent (If-None-Match: *).
    async fn create(&self, record: &JobRecord) -> CloudResult<WriteOutcome>;
    /// Replace only if unchanged since `version` (If-Match).
    async fn replace(&self, record: &JobRecord, version: &str) -> CloudResult<WriteOutcome>;
}

/// Other objects of the deployment's bucket: a job's artifacts (report,
/// outputs, manifests), the reaper's reports, markers and stored specs.
#[async_trait]
pub trait Objects: Send + Sync {
    async fn put_artifact(&self, job_id: &str, name: &str, body: &[u8], content_type: &str) -> CloudResult<()>;
    /// Any object in the bucket, e.g. the reaper's `reaper/<time>.json`.
    async fn put(&self, key: &str, body: &[u8], content_type: &str) -> CloudResult<()>;
    /// Any object in the bucket, e.g. a schedule's stored spec.
    async fn get(&self, key: &str) -> CloudResult<Option<Vec<u8>>>;
    /// Remove an object; an absent one is fine.
    async fn delete(&self, key: &str) -> CloudResult<()>;
    fn bucket(&self) -> &str;
}

/// `active/<job_id>` markers: the jobs the safety tick wakes.
#[async_trait]
pub trait ActiveJobs: Send + Sync {
    async fn set_active(&self, job_id: &str, active: bool) -> CloudResult<()>;
    async fn list_active(&self) -> CloudResult<Vec<String>>;
}

/// Small state every job of a deployment shares (the launch and call
/// budgets), changed by compare-and-swap.
#[async_trait]
pub trait SharedState: Send + Sync {
    /// Any object and its version.
    async fn get_versioned(&self, key: &str) -> CloudResult<Option<(Vec<u8>, String)>>;
    /// Write only if the object is still at `version` (None: only if absent).
    async fn put_if(&self, key: &str, body: &[u8], version: Option<&str>) -> CloudResult<WriteOutcome>;
}

/// Listing keys in any bucket the deployment may read.
#[async_trait]
pub trait Listing: Send + Sync {
    /// Keys under `prefix` in `bucket`, in S3's order; None if there are
    /// more than `most`. Intake lists a job's work items with it.
    async fn list_keys(&self, bucket: &str, prefix: &str, most: usize) -> CloudResult<Option<Vec<String>>>;
}

/// Everything the bucket holds, as one adapter provides it; each consumer
/// asks only for the capability it uses (`&dyn Records`, `&dyn SharedState`, ...).
pub trait Ledger: Records + Objects + ActiveJobs + SharedState + Listing {}

impl<T: Records + Objects + ActiveJobs + SharedState + Listing> Ledger for T {}

#[async_trait]
pub trait WakeQueue: Send + Sync {
    /// SQS caps DelaySeconds at 900.
    async fn send(&self, message: &WakeMessage, delay_seconds: u32) -> CloudResult<()>;
}

/// The notify queue: a job's notices, for the notify function to put on
/// EventBridge and answer Step Functions with (`events`).
#[async_trait]
pub trait Notices: Send + Sync {
    /// All of them, in order, in as few messages as SQS's size allows.
    async fn send(&self, batch: &crate::notice::NoticeBatch) -> CloudResult<()>;
}

/// A message SQS moved to a dead-letter queue after its last receive.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The original message's id (SQS keeps it when it dead-letters).
    pub message_id: String,
    pub body: String,
    /// For DeleteMessage.
    pub receipt: String,
    /// SQS's ApproximateReceiveCount: how often it was tried.
    pub receive_count: u32,
    pub sent_at: Option<DateTime<Utc>>,
    /// A FIFO queue's message group: the redrive sends it back in the same one.
    pub group: Option<String>,
}

/// A dead-letter queue and the queue it serves.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Up to `max` messages, hidden for a minute while they are handled.
    async fn receive(&self, max: usize) -> CloudResult<Vec<DeadLetter>>;
    async fn delete(&self, letter: &DeadLetter) -> CloudResult<()>;
    /// Make it visible again at once (it was only looked at).
    async fn release(&self, letter: &DeadLetter) -> CloudResult<()>;
    /// Send it back to the queue it came from, then delete it here.
    async fn redrive(&self, letter: &DeadLetter) -> CloudResult<()>;
}

/// Clock port, so the fake cloud can run on virtual time.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The ports that act on a job's instances and volumes, in one account.
pub struct Cloud {
    pub fleet: Box<dyn Fleet>,
    pub volumes: Box<dyn Volumes>,
    pub commands: Box<dyn Commands>,
}

/// Cloud ports in another account, for jobs with a `role_arn`.
#[async_trait]
pub trait Accounts: Send + Sync {
    /// Assume `role_arn` (with its external id) and return ports acting as it.
    async fn assume(
        &self,
        role_arn: &str,
        external_id: Option<&str>,
        job_id: &str,
    ) -> CloudResult<std::sync::Arc<Cloud>>;
}

/// Everything a step needs, wired once per Lambda cold start.
pub struct Ports {
    /// The function's own account.
    pub cloud: Cloud,
    pub accounts: Box<dyn Accounts>,
    pub ledger: Box<dyn Ledger>,
    pub queue: Box<dyn WakeQueue>,
    /// Where job and shard notices go; None: the deployment publishes none.
    pub notices: Option<Box<dyn Notices>>,
    /// The reconcile queue's dead letters, when the deployment names its DLQ.
    pub dead_letters: Option<Box<dyn DeadLetters>>,
    pub clock: Box<dyn Clock>,
    pub settings: Settings,
}
