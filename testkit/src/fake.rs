//! The simulated cloud: the same ports as AWS, on a virtual clock, with
//! realistic latencies and seeded faults. It is for faults and scale, beside
//! moto (which the SDK adapters are tested against), never instead of it.
//!
//! - Time moves only when the simulator says: every call costs a few tens of
//!   milliseconds of virtual time, and instances, agents, volumes and
//!   snapshots change state when their moment passes.
//! - Every call is an await point where the seeded scheduler may yield, so
//!   two reconcilers joined on one thread interleave deterministically.
//! - RunInstances and CreateVolume honour ClientTokens as EC2 documents,
//!   `IdempotentParameterMismatch` included.
//! - It keeps the evidence the invariant checkers need: every command run
//!   per shard, every volume deletion and the snapshots it had then.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use flotilla_shared::error::CloudError;
use flotilla_shared::ports::*;
use flotilla_shared::reconcile::WakeMessage;
use flotilla_shared::record::{active_key, record_key, JobRecord};
use flotilla_shared::settings::Settings;
use flotilla_shared::spec::Market;
use flotilla_shared::states::{CommandStatus, InstanceState, VolumeState};
use flotilla_shared::tags;
use flotilla_shared::wake::Trigger;

/// What a command does on one instance: (exit code, stdout, seconds it takes).
pub type CommandBehaviour = Arc<dyn Fn(&CommandRequest, &str) -> (i32, String, i64) + Send + Sync>;

/// splitmix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as i64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() as f64 / u64::MAX as f64) < p
    }
}

/// Latencies, in virtual seconds, drawn per resource.
#[derive(Debug, Clone)]
pub struct Latencies {
    pub running: (i64, i64),
    pub agent: (i64, i64),
    pub shutting_down: (i64, i64),
    pub volume_create: (i64, i64),
    pub attach: (i64, i64),
    /// Seconds a volume takes to detach after its instance terminated.
    pub detach: (i64, i64),
    pub snapshot: (i64, i64),
    /// Milliseconds each API call takes.
    pub call_ms: (i64, i64),
    /// Seconds before a new instance, volume or snapshot shows in describes.
    pub visible: (i64, i64),
    /// Seconds before a new command shows in ListCommands and its
    /// invocations in ListCommandInvocations, and a new snapshot in
    /// DescribeSnapshots: AWS documents no read-after-write consistency for
    /// either (EC2's API is eventually consistent; SSM says nothing).
    pub lookup_lag: (i64, i64),
}

impl Latencies {
    /// As AWS behaves: 5-18 s to running, 30 s to 6 min for SSM, snapshots in minutes.
    pub fn realistic() -> Self {
        Latencies {
            running: (5, 18),
            agent: (30, 360),
            shutting_down: (5, 60),
            volume_create: (1, 10),
            attach: (1, 8),
            detach: (1, 90),
            snapshot: (60, 600),
            call_ms: (20, 250),
            visible: (0, 4),
            lookup_lag: (0, LOOKUP_LAG_SECONDS),
        }
    }

    /// Short and fixed, for scenario tests that count calls.
    pub fn quick() -> Self {
        Latencies {
            running: (30, 30),
            agent: (60, 60),
            shutting_down: (0, 0),
            volume_create: (0, 0),
            attach: (0, 0),
            detach: (0, 0),
            snapshot: (0, 0),
            call_ms: (0, 0),
            visible: (0, 0),
            lookup_lag: (0, 0),
        }
    }
}

/// The longest lookup lag the simulated cloud draws: the figure Flotilla's
/// takeover rule assumes (`reconcile::fence::LOOKUP_LAG_SECONDS`).
pub const LOOKUP_LAG_SECONDS: i64 = flotilla_shared::fence::LOOKUP_LAG_SECONDS;

/// An EventBridge event reaches its SQS target about this long after it happened.
const EVENT_DELIVERY_SECONDS: i64 = 1;

/// An event about one of `job_id`'s instances at `at` wakes the job a second
/// later; events within a second of each other share one wake, as the
/// router turns a batch of events into one wake per job.
fn queue_event(state: &mut FakeState, job_id: &str, instance_id: Option<&str>, at: DateTime<Utc>) {
    let deliver = at + Duration::seconds(EVENT_DELIVERY_SECONDS);
    let shared = state.queue.iter_mut().find(|(when, m)| {
        m.job_id == job_id && m.trigger == Some(Trigger::Event) && (*when - deliver).num_seconds().abs() < 1
    });
    match shared {
        Some((_, wake)) => wake.instances.extend(instance_id.map(str::to_string)),
        None => {
            let mut wake = WakeMessage::new(job_id, Trigger::Event);
            wake.instances.extend(instance_id.map(str::to_string));
            state.queue.push_back((deliver, wake));
        }
    }
}

/// One token bucket: `capacity` tokens, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    pub capacity: f64,
    pub per_second: f64,
    tokens: f64,
    at: Option<DateTime<Utc>>,
}

impl TokenBucket {
    pub fn new(capacity: f64, per_second: f64) -> Self {
        TokenBucket { capacity, per_second, tokens: capacity, at: None }
    }

    /// Take `n` tokens at `now` if there are that many.
    pub fn take(&mut self, now: DateTime<Utc>, n: f64) -> bool {
        let elapsed = self.at.map_or(0.0, |at| (now - at).num_milliseconds().max(0) as f64 / 1000.0);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.at = Some(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// EC2's request throttling per account and Region, as AWS documents it
/// ("Request throttling for the Amazon EC2 API"): RunInstances requests 5
/// burst refilling 2/s, and instances 1,000 refilling 2/s; other mutating
/// actions 50 refilling 5/s; describes 100 refilling 20/s. SSM, S3 and SQS
/// are not limited here.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub buckets: BTreeMap<&'static str, TokenBucket>,
    /// Calls refused, by operation.
    pub throttled: BTreeMap<&'static str, u64>,
}

impl ApiLimits {
    pub fn ec2() -> Self {
        let buckets = BTreeMap::from([
            ("RunInstances", TokenBucket::new(5.0, 2.0)),
            ("RunInstances:instances", TokenBucket::new(1000.0, 2.0)),
            ("mutating", TokenBucket::new(50.0, 5.0)),
            ("describe", TokenBucket::new(100.0, 20.0)),
        ]);
        ApiLimits { buckets, throttled: BTreeMap::new() }
    }

    /// Which bucket an operation draws on, if it is EC2's.
    pub fn bucket_of(operation: &'static str) -> Option<&'static str> {
        Some(match operation {
            "RunInstances" | "RunInstances:instances" => operation,
            "DescribeInstances" | "DescribeInstanceStatus" | "DescribeVolumes" | "DescribeSnapshots" => "describe",
            "CreateVolume" | "AttachVolume" | "DetachVolume" | "DeleteVolume" | "CreateSnapshot" | "DeleteSnapshot"
            | "TerminateInstances" | "CreateTags" => "mutating",
            _ => return None,
        })
    }

    /// Take `n` tokens for `operation`; false (and counted) if throttled.
    pub fn take(&mut self, operation: &'static str, now: DateTime<Utc>, n: f64) -> bool {
        let Some(name) = Self::bucket_of(operation) else { return true };
        let Some(bucket) = self.buckets.get_mut(name) else { return true };
        if bucket.take(now, n) {
            return true;
        }
        *self.throttled.entry(operation).or_default() += 1;
        false
    }
}

/// Seeded faults. Probabilities are per call (or per resource where noted).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A call fails with a throttling or 5xx error (before taking effect).
    pub transient: f64,
    /// A mutating call takes effect, then the process dies (the pass ends).
    pub crash_after: f64,
    /// A mutating call takes effect, then its reply is lost (a timeout).
    pub lost_reply: f64,
    /// Per instance: its SSM agent stops answering at some point.
    pub agent_dies: f64,
    /// Instance types EC2 has no capacity for (InsufficientInstanceCapacity).
    pub no_capacity: BTreeSet<String>,
    /// Spot has no capacity at all (spot capacity-not-available).
    pub no_spot_capacity: bool,
    /// Per instance: its agent never registers.
    pub agent_never: f64,
    /// Per snapshot: it ends in `error`.
    pub snapshot_error: f64,
    /// Per command invocation: exit 1 / hang until the timeout.
    pub command_fail: f64,
    pub command_hang: f64,
    /// The scheduler yields at an await point with this probability.
    pub yield_rate: f64,
    /// Per RunInstances of more than one instance: EC2 launches only part
    /// of MaxCount (MinCount is 1), as it does when capacity is short.
    pub partial_fill: f64,
    /// Per CreateVolume: the volume ends in `error` instead of `available`.
    pub volume_error: f64,
    /// Per volume: its detach, once its instance terminated, takes 5-15 min.
    pub stuck_detach: f64,
    /// SQS is not FIFO: each message is delivered up to this many seconds
    /// late, so messages sent close together arrive out of order.
    pub reorder_seconds: i64,
    /// Per instance: its agent is `ConnectionLost` once for 1-10 minutes,
    /// then returns. Steps keep running; commands sent meanwhile are
    /// accepted and delivered when it returns (within their timeout).
    pub agent_blips: f64,
    /// Per mutating call whose reply is lost (`lost_reply`): its effect
    /// lands up to this many seconds later, after the caller gave up.
    /// (SendCommand and CreateSnapshot, the creates with no ClientToken.)
    pub late_effect_seconds: i64,
    /// The next call of each named operation takes effect and its reply is
    /// lost (the caller sees a timeout).
    pub lose_reply: Vec<&'static str>,
    /// Per command: ListCommands does not show it for 1-5 minutes, past
    /// the lag the takeover rule assumes (AWS promises none): the send is
    /// made again, and only the step guard keeps the step from running twice.
    pub long_command_lag: f64,
    /// Per call: it takes up to the SDK's operation timeout (a slow
    /// endpoint, retries inside the SDK) before it takes effect.
    pub slow_calls: f64,
}

#[derive(Debug, Clone)]
pub struct FakeInstance {
    pub id: String,
    pub state: String,
    pub az: String,
    pub instance_type: String,
    pub market: Market,
    pub tags: BTreeMap<String, String>,
    pub launched_at: DateTime<Utc>,
    pub running_at: DateTime<Utc>,
    /// None: its agent never comes Online (no profile, or a fault).
    pub online_at: Option<DateTime<Utc>>,
    pub terminated_at: Option<DateTime<Utc>>,
    /// When TerminateInstances reached it: billing stops here.
    pub shutting_down_at: Option<DateTime<Utc>>,
    pub launch_index: u32,
    /// Describes list it from this moment (eventual consistency).
    pub visible_at: DateTime<Utc>,
    /// Its agent stops answering from this moment.
    pub agent_lost_at: Option<DateTime<Utc>>,
    /// Its status checks report `impaired` from this moment.
    pub impaired_at: Option<DateTime<Utc>>,
    /// Its agent is `ConnectionLost` over this window, then back.
    pub agent_away: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl FakeInstance {
    fn agent_up(&self, now: DateTime<Utc>) -> bool {
        self.state == "running"
            && self.online_at.is_some_and(|at| now >= at)
            && self.agent_lost_at.is_none_or(|at| now < at)
            && self.agent_away.is_none_or(|(from, until)| now < from || now >= until)
    }

    /// A managed node SSM accepts commands for: its agent registered once
    /// (Online or ConnectionLost) and the instance is not ending.
    fn managed(&self, now: DateTime<Utc>) -> bool {
        matches!(self.state.as_str(), "running" | "pending" | "stopping" | "stopped")
            && self.online_at.is_some_and(|at| now >= at)
    }
}

#[derive(Debug, Clone)]
pub struct FakeVolume {
    pub id: String,
    pub state: String,
    pub az: String,
    pub attached_to: Option<String>,
    pub available_at: DateTime<Utc>,
    pub visible_at: DateTime<Utc>,
    pub tags: BTreeMap<String, String>,
    /// The snapshot it was created from.
    pub snapshot_id: Option<String>,
    /// It ends in `error` instead of `available`.
    pub fails: bool,
    /// Its instance terminated: `in-use` (attachment `detaching`) until then.
    pub detached_at: Option<DateTime<Utc>>,
    /// Mounted on its instance (a mount step ended well there, and no
    /// unmount, stop or termination since).
    pub mounted: bool,
    /// DetachVolume asked while it was mounted: it stays `busy` until it is
    /// unmounted or its instance stops.
    pub detach_waiting: bool,
}

#[derive(Debug, Clone)]
pub struct FakeSnapshot {
    pub id: String,
    pub volume_id: String,
    pub started_at: DateTime<Utc>,
    pub completes_at: DateTime<Utc>,
    pub fails: bool,
    pub tags: BTreeMap<String, String>,
    /// DescribeSnapshots lists it from this moment.
    pub listed_at: DateTime<Utc>,
}

impl FakeSnapshot {
    fn state(&self, now: DateTime<Utc>) -> &'static str {
        match (now >= self.completes_at, self.fails) {
            (false, _) => "pending",
            (true, true) => "error",
            (true, false) => "completed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeRun {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// How long the user's step takes once it starts.
    pub seconds: i64,
    /// When its agent received it: None while the agent is away.
    pub delivered_at: Option<DateTime<Utc>>,
    /// A delivery the step guard held on the lock: the run it waits for.
    pub waits_on: Option<(String, String)>,
    /// This delivery ran the script's work (the guard let it, or there is none).
    pub started_step: bool,
    /// When its work began: after the delivery when a cleanup script's work
    /// fence waited for the shard's work to end.
    pub begins_at: Option<DateTime<Utc>>,
    /// The runs that work fence waits for.
    pub fence_waits_on: Vec<(String, String)>,
    /// A mount or unmount that ended well has marked its volumes.
    pub volume_effect_done: bool,
    /// Far in the future until it is delivered.
    pub finishes_at: DateTime<Utc>,
    /// Set when its instance stopped or terminated before it finished.
    pub died_at: Option<DateTime<Utc>>,
    /// CancelCommand reached it: `Cancelling` until `cancelled_at`.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct FakeCommand {
    pub id: String,
    pub request: CommandRequest,
    pub sent_at: DateTime<Utc>,
    pub runs: BTreeMap<String, FakeRun>,
    /// ListCommandInvocations (by its id) shows it from this moment.
    pub listed_at: DateTime<Utc>,
    /// ListCommands (a search by instance and comment) shows it from this
    /// moment: the same lag, or longer (`Faults::long_command_lag`).
    pub searchable_at: DateTime<Utc>,
}

/// Evidence for the invariant checkers.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// (volume id, its tags, completed snapshots of it at that moment).
    pub deleted_volumes: Vec<(String, BTreeMap<String, String>, Vec<String>)>,
    /// Every snapshot ever created, as created (tags at creation), deleted
    /// or not: what the simulator's lineage invariants judge by.
    pub snapshots_created: Vec<FakeSnapshot>,
    /// Every start of a user's step on an instance: (job.shard.phase.instance, when).
    pub step_starts: Vec<(String, DateTime<Utc>)>,
    /// Creates that landed after their caller gave up.
    pub late_landed: u64,
}

#[derive(Default)]
pub struct FakeState {
    pub now: Option<DateTime<Utc>>,
    pub rng: Option<Rng>,
    pub instances: Vec<FakeInstance>,
    pub volumes: Vec<FakeVolume>,
    pub snapshots: Vec<FakeSnapshot>,
    pub commands: Vec<FakeCommand>,
    pub objects: BTreeMap<String, (Vec<u8>, u64)>,
    /// Keys of buckets other than the ledger's (a job's work items).
    pub buckets: BTreeMap<String, BTreeSet<String>>,
    /// EC2's request throttling, when a bench turns it on.
    pub limits: Option<ApiLimits>,
    /// Every call with its virtual time, when a bench asks for it.
    pub call_log: Option<Vec<(DateTime<Utc>, &'static str)>>,
    /// The notify queue: Some turns publishing on (`Ports::notices`), and
    /// holds every batch sent, duplicates included.
    pub notices: Option<Vec<flotilla_shared::events::NoticeBatch>>,
    /// Sends to the notify queue to fail before they land.
    pub fail_notices: u32,
    /// EventBridge on: an instance's `running` and each command's end wake
    /// its job a second later, as the template's rules deliver them.
    pub events: bool,
    pub queue: VecDeque<(DateTime<Utc>, WakeMessage)>,
    /// ClientToken -> (request fingerprint, instance ids).
    pub launch_tokens: BTreeMap<String, (String, Vec<String>)>,
    /// ClientToken -> (request fingerprint, volume id).
    pub volume_tokens: BTreeMap<String, (String, String)>,
    pub next_id: u64,
    /// Counts of each call, for assertions and the call budget.
    pub calls: BTreeMap<&'static str, u64>,
    pub faults: Faults,
    /// Roles assumed, with their external ids; roles listed in `refused_roles` are denied.
    pub assumed_roles: Vec<(String, Option<String>)>,
    pub refused_roles: Vec<String>,
    /// The next call of each named operation takes effect, then the caller
    /// crashes before seeing the reply.
    pub crash_after: Vec<&'static str>,
    /// Processes (`FakeCloud::process`) that died at a call: numbered, and
    /// the dead ones, until their runner drops them.
    pub processes: u64,
    pub dead_processes: BTreeSet<u64>,
    /// Fault injection: this many SendMessage calls fail.
    pub fail_sends: u32,
    pub evidence: Evidence,
    /// Snapshot ids that do not exist: CreateVolume from one is refused.
    pub missing_snapshots: BTreeSet<String>,
    /// The largest record written so far, in bytes, and the record itself.
    pub max_record_bytes: usize,
    pub largest_record: Vec<u8>,
    /// Operations refused with this (permanent) error code, as IAM would.
    pub refused: BTreeMap<&'static str, &'static str>,
    /// Snapshots deleted here: CreateVolume from one is refused, as EC2 does.
    pub deleted_snapshots: BTreeSet<String>,
    /// Seconds a detach takes after its instance terminated (from `Latencies`).
    pub detach: (i64, i64),
    /// The step guard's state on each instance: key to the run that holds
    /// (or held) its lock and wrote `started`.
    pub guards: BTreeMap<String, (String, String)>,
    /// Shards whose work a cleanup script closed, as `job.shard.work.instance`.
    pub closed: BTreeSet<String>,
    /// Creates whose reply was lost and whose effect lands later.
    pub late: Vec<(DateTime<Utc>, LateEffect)>,
}

/// A create that lands after its caller gave up.
#[derive(Debug, Clone)]
pub enum LateEffect {
    Command(FakeCommand),
    Snapshot(FakeSnapshot),
}

#[derive(Clone)]
pub struct FakeCloud {
    pub state: Arc<Mutex<FakeState>>,
    behaviour: CommandBehaviour,
    pub latencies: Latencies,
    bucket: String,
}

impl FakeCloud {
    pub fn new(start: DateTime<Utc>) -> Self {
        let state = FakeState { now: Some(start), rng: Some(Rng::new(1)), ..Default::default() };
        FakeCloud {
            state: Arc::new(Mutex::new(state)),
            behaviour: Arc::new(|_, _| (0, "ok".to_string(), 5)),
            latencies: Latencies::quick(),
            bucket: "fake-bucket".to_string(),
        }
    }

    pub fn seeded(start: DateTime<Utc>, seed: u64, latencies: Latencies, faults: Faults) -> Self {
        let cloud = FakeCloud::new(start);
        {
            let mut state = cloud.lock();
            state.rng = Some(Rng::new(seed));
            state.faults = faults;
            state.detach = latencies.detach;
        }
        FakeCloud { latencies, ..cloud }
    }

    pub fn with_behaviour(mut self, behaviour: CommandBehaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.lock().now.unwrap_or_default()
    }

    pub fn advance_to(&self, at: DateTime<Utc>) {
        let mut state = self.lock();
        if state.now.is_none_or(|now| at > now) {
            state.now = Some(at);
        }
        refresh(&mut state);
    }

    fn cloud(&self) -> Cloud {
        Cloud { fleet: Box::new(self.clone()), volumes: Box::new(self.clone()), commands: Box::new(self.clone()) }
    }

    pub fn ports(&self, settings: Settings) -> Ports {
        Ports {
            cloud: self.cloud(),
            accounts: Box::new(self.clone()),
            ledger: Box::new(self.clone()),
            queue: Box::new(self.clone()),
            notices: self.lock().notices.is_some().then(|| Box::new(self.clone()) as Box<dyn Notices>),
            dead_letters: None,
            clock: Box::new(self.clone()),
            settings,
        }
    }

    /// Instances not terminated (stopped ones count: they still cost their volumes).
    pub fn running_instances(&self) -> usize {
        let mut state = self.lock();
        refresh(&mut state);
        state.instances.iter().filter(|i| i.state != "terminated" && i.state != "shutting-down").count()
    }

    pub fn record(&self, job_id: &str) -> Option<JobRecord> {
        let state = self.lock();
        state.objects.get(&record_key(job_id)).and_then(|(body, _)| serde_json::from_slice(body).ok())
    }

    pub fn record_bytes(&self, job_id: &str) -> usize {
        self.lock().objects.get(&record_key(job_id)).map(|(body, _)| body.len()).unwrap_or(0)
    }

    /// Stop or kill an instance now, as a user or EC2 would.
    pub fn set_instance_state(&self, instance_id: &str, state_name: &str) {
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        if let Some(instance) = state.instances.iter_mut().find(|i| i.id == instance_id) {
            if instance.state == "terminated" {
                return;
            }
            instance.state = state_name.to_string();
            if state_name == "terminated" {
                instance.terminated_at = Some(now);
            }
        }
        refresh(&mut state);
    }

    /// The instance fails its status checks from now on, and its agent,
    /// unreachable, stops answering.
    pub fn impair(&self, instance_id: &str) {
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        if let Some(instance) = state.instances.iter_mut().find(|i| i.id == instance_id) {
            instance.impaired_at = Some(now);
            instance.agent_lost_at = Some(instance.agent_lost_at.map_or(now, |at| at.min(now)));
        }
    }

    /// An available volume with these tags, as a crash between a create and
    /// its record would leave one: the reaper's to find.
    pub fn add_volume(&self, volume_tags: BTreeMap<String, String>) -> String {
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let id = FakeCloud::next_id(&mut state, "vol");
        state.volumes.push(FakeVolume {
            id: id.clone(),
            state: "available".into(),
            az: "us-east-1a".into(),
            attached_to: None,
            available_at: now,
            visible_at: now,
            tags: volume_tags,
            snapshot_id: None,
            fails: false,
            detached_at: None,
            mounted: false,
            detach_waiting: false,
        });
        id
    }

    /// The instance's SSM agent stops answering from now on.
    pub fn lose_agent(&self, instance_id: &str) {
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        if let Some(instance) = state.instances.iter_mut().find(|i| i.id == instance_id) {
            instance.agent_lost_at = Some(instance.agent_lost_at.map_or(now, |at| at.min(now)));
        }
    }

    fn next_id(state: &mut FakeState, prefix: &str) -> String {
        state.next_id += 1;
        format!("{prefix}-{:017x}", state.next_id)
    }

    /// Every call: count it, let virtual time pass, maybe fail before it
    /// takes effect, and maybe yield to the other reconciler. A process that
    /// died makes no call: it never returns from this await point.
    async fn call(&self, operation: &'static str, mutating: bool) -> CloudResult<()> {
        if self.died() {
            return std::future::pending().await;
        }
        let yield_now = {
            let mut state = self.lock();
            *state.calls.entry(operation).or_default() += 1;
            let (lo, hi) = self.latencies.call_ms;
            let (transient_rate, yield_rate) = (state.faults.transient, state.faults.yield_rate);
            let rng = state.rng.as_mut().expect("rng");
            let ms = rng.range(lo, hi);
            let transient = rng.chance(transient_rate);
            let yields = rng.chance(yield_rate);
            let slow = state.faults.slow_calls;
            let ms = if slow > 0.0 {
                let rng = state.rng.as_mut().expect("rng");
                let limit = flotilla_shared::fence::OPERATION_TIMEOUT_SECONDS * 1000;
                if rng.chance(slow) {
                    rng.range(1000, limit)
                } else {
                    ms
                }
            } else {
                ms
            };
            let now = state.now.unwrap_or_default() + Duration::milliseconds(ms);
            state.now = Some(now);
            refresh(&mut state);
            if let Some(log) = state.call_log.as_mut() {
                log.push((now, operation));
            }
            if let Some(limits) = state.limits.as_mut() {
                if !limits.take(operation, now, 1.0) {
                    return Err(CloudError::api("ec2", operation, "RequestLimitExceeded", "Request limit exceeded."));
                }
            }
            if transient {
                let code = if mutating { "RequestLimitExceeded" } else { "ServiceUnavailable" };
                return Err(CloudError::api("ec2", operation, code, "injected"));
            }
            if let Some(code) = state.refused.get(operation) {
                return Err(CloudError::api("ec2", operation, code, "refused by policy (injected)"));
            }
            yields
        };
        if yield_now {
            YieldOnce(false).await;
        }
        Ok(())
    }

    /// A listing's pages beyond the first, counted as the calls the SDK's
    /// paginator makes (EC2 and SSM return at most `per_page` a call).
    fn more_pages(&self, state: &mut FakeState, operation: &'static str, items: usize, per_page: usize) {
        let extra = items.div_ceil(per_page).saturating_sub(1) as u64;
        if extra > 0 {
            *state.calls.entry(operation).or_default() += extra;
            let now = state.now.unwrap_or_default();
            if let Some(log) = state.call_log.as_mut() {
                log.extend(std::iter::repeat_n((now, operation), extra as usize));
            }
        }
    }

    /// A create whose reply is lost and whose effect lands this many
    /// seconds later (drawn only when the scenario has late effects).
    fn lands_late(&self, state: &mut FakeState) -> Option<i64> {
        let (late, lost) = (state.faults.late_effect_seconds, state.faults.lost_reply);
        if late <= 0 {
            return None;
        }
        let rng = state.rng.as_mut().expect("rng");
        rng.chance(lost).then(|| rng.range(1, late))
    }

    /// After a call took effect: maybe the process dies before the reply.
    fn after(&self, state: &mut FakeState, operation: &'static str) -> CloudResult<()> {
        if let Some(index) = state.crash_after.iter().position(|c| *c == operation) {
            state.crash_after.remove(index);
            return die(state, operation);
        }
        if let Some(index) = state.faults.lose_reply.iter().position(|c| *c == operation) {
            state.faults.lose_reply.remove(index);
            return Err(CloudError::api("ec2", operation, "timeout", "injected: reply lost"));
        }
        let (p, lost) = (state.faults.crash_after, state.faults.lost_reply);
        let rng = state.rng.as_mut().expect("rng");
        if rng.chance(p) {
            return die(state, operation);
        }
        if rng.chance(lost) {
            // Done on AWS's side; the caller only sees a timeout.
            return Err(CloudError::api("ec2", operation, "timeout", "injected: reply lost"));
        }
        Ok(())
    }

    /// Whether the process polling now died at an earlier call.
    fn died(&self) -> bool {
        PROCESS.with(|p| p.get()).is_some_and(|id| self.lock().dead_processes.contains(&id))
    }

    /// Run `work` as one process (a Lambda invocation, a reaper run). When a
    /// call it makes draws a crash, the process dies there: `work` is
    /// dropped at that await point, as the process would be, and this
    /// returns None. What the call did in the cloud stays done; the product
    /// never sees a crash, only what the next process finds.
    pub async fn process<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let id = {
            let mut state = self.lock();
            state.processes += 1;
            state.processes
        };
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(move |cx| {
            let outer = PROCESS.with(|p| p.replace(Some(id)));
            let polled = work.as_mut().poll(cx);
            PROCESS.with(|p| p.set(outer));
            if self.lock().dead_processes.remove(&id) {
                return Poll::Ready(None);
            }
            polled.map(Some)
        })
        .await
    }
}

thread_local! {
    /// The process whose future is being polled (`FakeCloud::process`).
    static PROCESS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The polling process dies after `operation` took effect. It still gets
/// this error back, but it is never polled again (`FakeCloud::process`), and
/// any call it makes meanwhile never returns.
fn die(state: &mut FakeState, operation: &'static str) -> CloudResult<()> {
    let Some(id) = PROCESS.with(|p| p.get()) else {
        panic!("a crash after {operation} outside FakeCloud::process: run the entry point inside it");
    };
    state.dead_processes.insert(id);
    Err(CloudError::api("fake", operation, "ProcessDied", "the simulated process died after this call"))
}

impl FakeCloud {
    /// Wait, on the virtual clock, until `at`: time moves as the other
    /// branch of a join calls the cloud; once `alone` says that branch has
    /// ended, the clock is moved to `at` here.
    pub async fn sleep_until(&self, at: DateTime<Utc>, alone: &std::cell::Cell<bool>) {
        loop {
            if self.now() >= at {
                return;
            }
            if alone.get() {
                self.advance_to(at);
                return;
            }
            YieldOnce(false).await;
        }
    }
}

/// Returns Pending once, waking itself: the executor polls the other branch.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// Move every resource to the state its moment says.
fn refresh(state: &mut FakeState) {
    let now = state.now.unwrap_or_default();
    let (detach, stuck) = (state.detach, state.faults.stuck_detach);
    let mut ended: BTreeSet<String> = BTreeSet::new();
    let mut terminated: BTreeSet<String> = BTreeSet::new();
    for instance in &mut state.instances {
        if instance.state == "pending" && now >= instance.running_at {
            instance.state = "running".to_string();
        }
        if instance.state == "shutting-down" && instance.terminated_at.is_some_and(|at| now >= at) {
            instance.state = "terminated".to_string();
        }
        if matches!(instance.state.as_str(), "terminated" | "stopped" | "stopping" | "shutting-down") {
            ended.insert(instance.id.clone());
        }
        if instance.state == "terminated" {
            terminated.insert(instance.id.clone());
        }
    }
    let FakeState { volumes, rng, .. } = state;
    let rng = rng.as_mut().expect("rng");
    for volume in volumes.iter_mut() {
        if volume.state == "creating" && now >= volume.available_at {
            volume.state = if volume.fails { "error" } else { "available" }.to_string();
        }
        // EC2 detaches a volume when its instance terminates, in its own time:
        // the volume stays `in-use` (attachment `detaching`) until then.
        if let Some(owner) = &volume.attached_to {
            if terminated.contains(owner) {
                let seconds = if rng.chance(stuck) { rng.range(300, 900) } else { rng.range(detach.0, detach.1) };
                volume.attached_to = None;
                volume.state = "in-use".to_string();
                volume.detached_at = Some(now + Duration::seconds(seconds));
            } else if volume.state == "attaching" && now >= volume.available_at {
                volume.state = "in-use".to_string();
            }
        }
        if volume.attached_to.is_none() && volume.state == "in-use" && volume.detached_at.is_some_and(|at| now >= at) {
            volume.state = "available".to_string();
        }
    }
    land_late(state, now);
    deliver_runs(state);
    mount_effects(state, now, &ended);
    if ended.is_empty() {
        return;
    }
    for command in &mut state.commands {
        for (instance_id, run) in command.runs.iter_mut() {
            if run.died_at.is_none() && now < run.finishes_at && ended.contains(instance_id) {
                run.died_at = Some(now);
            }
        }
    }
}

fn has_tags(have: &BTreeMap<String, String>, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
}

impl Clock for FakeCloud {
    fn now(&self) -> DateTime<Utc> {
        FakeCloud::now(self)
    }
}

fn view(instance: &FakeInstance) -> InstanceView {
    InstanceView {
        instance_id: instance.id.clone(),
        state: InstanceState::from(instance.state.as_str()),
        availability_zone: instance.az.clone(),
        launch_index: instance.launch_index,
        job_id: instance.tags.get(tags::JOB_ID).cloned(),
        launch_token: instance.tags.get(tags::LAUNCH).cloned(),
        tags: instance.tags.clone(),
    }
}

fn fingerprint(request: &LaunchRequest) -> String {
    format!(
        "{}|{:?}|{:?}|{:?}|{:?}|{}",
        request.instance_type,
        request.image_id,
        request.subnet_id,
        request.market,
        request.instance_profile,
        request.count
    )
}

#[async_trait]
impl Fleet for FakeCloud {
    async fn resolve_image(&self, parameter: &str) -> CloudResult<String> {
        self.call("GetParameter", false).await?;
        Ok(format!("ami-{:016x}", parameter.len()))
    }

    async fn find_instances(&self, stack: &str, job_id: &str) -> CloudResult<Vec<InstanceView>> {
        self.call("DescribeInstances", false).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let [managed, of_stack] = tags::scope(stack);
        let found: Vec<InstanceView> = state
            .instances
            .iter()
            .filter(|i| now >= i.visible_at && has_tags(&i.tags, &[(tags::JOB_ID, job_id), managed, of_stack]))
            .map(view)
            .collect();
        self.more_pages(&mut state, "DescribeInstances", found.len(), 1000);
        Ok(found)
    }

    async fn launch(&self, request: &LaunchRequest) -> CloudResult<Vec<InstanceView>> {
        self.call("RunInstances", true).await?;
        tag_limit("RunInstances", request.tags.len())?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        if let Some((print, ids)) = state.launch_tokens.get(&request.client_token).cloned() {
            if print != fingerprint(request) {
                return Err(CloudError::api(
                    "ec2",
                    "RunInstances",
                    "IdempotentParameterMismatch",
                    "the client token was used with different parameters",
                ));
            }
            return Ok(state.instances.iter().filter(|i| ids.contains(&i.id)).map(view).collect());
        }
        if state.faults.no_capacity.contains(&request.instance_type) {
            return Err(CloudError::api("ec2", "RunInstances", "InsufficientInstanceCapacity", "no capacity"));
        }
        if request.market == Market::Spot && state.faults.no_spot_capacity {
            return Err(CloudError::api(
                "ec2",
                "RunInstances",
                "InsufficientInstanceCapacity",
                "spot capacity-not-available",
            ));
        }
        if let Some(limits) = state.limits.as_mut() {
            if !limits.take("RunInstances:instances", now, f64::from(request.count)) {
                return Err(CloudError::api("ec2", "RunInstances", "RequestLimitExceeded", "Request limit exceeded."));
            }
        }
        let mut ids = Vec::new();
        let partial = state.faults.partial_fill;
        let rng = state.rng.as_mut().expect("rng");
        let count = if request.count > 1 && rng.chance(partial) {
            rng.range(1, i64::from(request.count) - 1) as u32
        } else {
            request.count
        };
        for index in 0..count {
            let id = FakeCloud::next_id(&mut state, "i");
            let l = &self.latencies;
            let agent_never = state.faults.agent_never;
            let rng = state.rng.as_mut().expect("rng");
            let running_at = now + Duration::seconds(rng.range(l.running.0, l.running.1));
            let online_at = running_at + Duration::seconds(rng.range(l.agent.0, l.agent.1));
            let visible_at = now + Duration::seconds(rng.range(l.visible.0, l.visible.1));
            // The agent needs an instance profile (or Default Host Management).
            let online = request.instance_profile.is_some() && !rng.chance(agent_never);
            let agent_dies = state.faults.agent_dies;
            let rng = state.rng.as_mut().expect("rng");
            let agent_lost_at = rng.chance(agent_dies).then(|| online_at + Duration::seconds(rng.range(30, 1800)));
            let blips = state.faults.agent_blips;
            let agent_away = (blips > 0.0).then_some(()).and_then(|()| {
                let rng = state.rng.as_mut().expect("rng");
                rng.chance(blips).then(|| {
                    let from = online_at + Duration::seconds(rng.range(10, 1200));
                    (from, from + Duration::seconds(rng.range(60, 600)))
                })
            });
            let az = ["us-east-1a", "us-east-1b"]
                [usize::from(request.subnet_id.as_deref().is_some_and(|s| s.ends_with('b')))];
            let mut instance_tags = request.tags.clone();
            instance_tags.insert(tags::LAUNCH.to_string(), request.client_token.clone());
            state.instances.push(FakeInstance {
                id: id.clone(),
                state: "pending".into(),
                az: az.to_string(),
                instance_type: request.instance_type.clone(),
                market: request.market,
                tags: instance_tags,
                launched_at: now,
                running_at,
                online_at: online.then_some(online_at),
                terminated_at: None,
                shutting_down_at: None,
                launch_index: index,
                visible_at,
                agent_lost_at,
                impaired_at: None,
                agent_away,
            });
            if state.events {
                queue_event(&mut state, &request.job_id, Some(&id), running_at);
            }
            ids.push(id);
        }
        state.launch_tokens.insert(request.client_token.clone(), (fingerprint(request), ids.clone()));
        self.after(&mut state, "RunInstances")?;
        Ok(state.instances.iter().filter(|i| ids.contains(&i.id)).map(view).collect())
    }

    async fn jobs_of(&self, stack: &str, instance_ids: &[String]) -> CloudResult<BTreeMap<String, String>> {
        self.call("DescribeInstances", false).await?;
        let state = self.lock();
        Ok(state
            .instances
            .iter()
            .filter(|i| instance_ids.contains(&i.id) && has_tags(&i.tags, &tags::scope(stack)))
            .filter_map(|i| Some((i.id.clone(), i.tags.get(tags::JOB_ID)?.clone())))
            .collect())
    }

    async fn status_checks(&self, instance_ids: &[String]) -> CloudResult<Vec<(String, bool)>> {
        self.call("DescribeInstanceStatus", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        // EC2 reports `initializing` for the first minutes after boot.
        Ok(state
            .instances
            .iter()
            .filter(|i| {
                instance_ids.contains(&i.id) && i.state == "running" && now >= i.running_at + Duration::seconds(120)
            })
            .map(|i| (i.id.clone(), i.impaired_at.is_some_and(|at| now >= at)))
            .collect())
    }

    async fn find_managed(&self, stack: &str) -> CloudResult<Vec<InstanceView>> {
        self.call("DescribeInstances", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        Ok(state
            .instances
            .iter()
            .filter(|i| now >= i.visible_at && i.state != "terminated")
            .filter(|i| has_tags(&i.tags, &tags::scope(stack)))
            .map(view)
            .collect())
    }

    async fn tag(&self, resource_ids: &[String], key: &str, value: &str) -> CloudResult<()> {
        self.call("CreateTags", true).await?;
        let mut state = self.lock();
        // EC2 refuses the call if any resource would pass 50 tags.
        let instance_tags = state.instances.iter().filter(|i| resource_ids.contains(&i.id)).map(|i| &i.tags);
        let volume_tags = state.volumes.iter().filter(|v| resource_ids.contains(&v.id)).map(|v| &v.tags);
        let snapshot_tags = state.snapshots.iter().filter(|s| resource_ids.contains(&s.id)).map(|s| &s.tags);
        for tags in instance_tags.chain(volume_tags).chain(snapshot_tags) {
            tag_limit("CreateTags", tags.len() + usize::from(!tags.contains_key(key)))?;
        }
        // EC2 fails the whole call for an id it does not know.
        if let Some(unknown) = resource_ids.iter().find(|id| {
            !state.instances.iter().any(|i| &i.id == *id)
                && !state.volumes.iter().any(|v| &v.id == *id && v.state != "deleted")
                && !state.snapshots.iter().any(|s| &s.id == *id)
        }) {
            let code = if unknown.starts_with("snap-") {
                "InvalidSnapshot.NotFound"
            } else if unknown.starts_with("vol-") {
                "InvalidVolume.NotFound"
            } else {
                "InvalidInstanceID.NotFound"
            };
            return Err(CloudError::api("ec2", "CreateTags", code, &format!("{unknown} does not exist")));
        }
        for snapshot in state.snapshots.iter_mut().filter(|s| resource_ids.contains(&s.id)) {
            snapshot.tags.insert(key.to_string(), value.to_string());
        }
        for instance in state.instances.iter_mut().filter(|i| resource_ids.contains(&i.id)) {
            instance.tags.insert(key.to_string(), value.to_string());
        }
        for volume in state.volumes.iter_mut().filter(|v| resource_ids.contains(&v.id)) {
            volume.tags.insert(key.to_string(), value.to_string());
        }
        Ok(())
    }

    async fn terminate(&self, instance_ids: &[String]) -> CloudResult<()> {
        self.call("TerminateInstances", true).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let (lo, hi) = self.latencies.shutting_down;
        let mut terminated = Vec::new();
        // EC2 refuses an id it does not know (or not yet: eventual
        // consistency); the adapter splits the call so the others go.
        let unknown =
            instance_ids.iter().find(|id| !state.instances.iter().any(|i| &i.id == *id && now >= i.visible_at));
        let refused = unknown.map(|id| {
            CloudError::api("ec2", "TerminateInstances", "InvalidInstanceID.NotFound", &format!("{id} does not exist"))
        });
        for id in instance_ids {
            let delay = state.rng.as_mut().expect("rng").range(lo, hi);
            if let Some(instance) = state.instances.iter_mut().find(|i| &i.id == id && now >= i.visible_at) {
                if !matches!(instance.state.as_str(), "terminated" | "shutting-down") {
                    instance.state = "shutting-down".into();
                    instance.shutting_down_at = Some(now);
                    instance.terminated_at = Some(now + Duration::seconds(delay));
                    if let Some(job_id) = instance.tags.get(tags::JOB_ID) {
                        terminated.push((job_id.clone(), id.clone(), now + Duration::seconds(delay)));
                    }
                }
            }
        }
        // EC2's state-change event when each is terminated.
        if state.events {
            for (job_id, id, at) in terminated {
                queue_event(&mut state, &job_id, Some(&id), at);
            }
        }
        refresh(&mut state);
        self.after(&mut state, "TerminateInstances")?;
        refused.map_or(Ok(()), Err)
    }
}

fn volume_view(volume: &FakeVolume) -> VolumeView {
    VolumeView {
        volume_id: volume.id.clone(),
        state: VolumeState::from(volume.state.as_str()),
        availability_zone: volume.az.clone(),
        attached_to: volume.attached_to.clone(),
        tags: volume.tags.clone(),
    }
}

fn snapshot_view(snapshot: &FakeSnapshot, now: DateTime<Utc>) -> SnapshotView {
    SnapshotView {
        snapshot_id: snapshot.id.clone(),
        volume_id: snapshot.volume_id.clone(),
        state: snapshot.state(now).into(),
        started_at: snapshot.started_at,
        tags: snapshot.tags.clone(),
    }
}

/// EC2 refuses a 51st tag on a resource.
fn tag_limit(operation: &'static str, count: usize) -> CloudResult<()> {
    if count > 50 {
        return Err(CloudError::api(
            "ec2",
            operation,
            "TagLimitExceeded",
            "The maximum number of Tags for a resource has been reached.",
        ));
    }
    Ok(())
}

fn not_found(operation: &'static str, code: &str) -> CloudError {
    CloudError::api("ec2", operation, code, "not found")
}

#[async_trait]
impl Volumes for FakeCloud {
    async fn find_volumes(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<VolumeView>> {
        self.call("DescribeVolumes", false).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let found: Vec<VolumeView> = state
            .volumes
            .iter()
            .filter(|v| now >= v.visible_at && v.state != "deleted" && has_tags(&v.tags, tags))
            .map(volume_view)
            .collect();
        self.more_pages(&mut state, "DescribeVolumes", found.len(), 500);
        Ok(found)
    }

    async fn describe_volume(&self, volume_id: &str) -> CloudResult<Option<VolumeView>> {
        self.call("DescribeVolumes", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        Ok(state
            .volumes
            .iter()
            .find(|v| v.id == volume_id && v.state != "deleted" && now >= v.visible_at)
            .map(volume_view))
    }

    async fn create_volume(&self, request: &NewVolume) -> CloudResult<VolumeView> {
        self.call("CreateVolume", true).await?;
        tag_limit("CreateVolume", request.tags.len() + usize::from(!request.tags.contains_key(tags::MANAGED_BY)))?;
        let mut state = self.lock();
        // EC2: the same token with any parameter changed but the Region or
        // Availability Zone is refused.
        let print =
            format!("{:?}|{}|{:?}|{:?}", request.size_gib, request.volume_type, request.snapshot_id, request.tags);
        if let Some((seen, id)) = state.volume_tokens.get(&request.client_token).cloned() {
            if seen != print {
                return Err(CloudError::api(
                    "ec2",
                    "CreateVolume",
                    "IdempotentParameterMismatch",
                    "the client token was used with different parameters",
                ));
            }
            if let Some(volume) = state.volumes.iter().find(|v| v.id == id) {
                return Ok(volume_view(volume));
            }
        }
        if let Some(snapshot) = &request.snapshot_id {
            if state.missing_snapshots.contains(snapshot) || state.deleted_snapshots.contains(snapshot) {
                return Err(CloudError::api("ec2", "CreateVolume", "InvalidSnapshot.NotFound", "no such snapshot"));
            }
        }
        let now = state.now.unwrap_or_default();
        let (lo, hi) = self.latencies.volume_create;
        let delay = state.rng.as_mut().expect("rng").range(lo, hi);
        let (vlo, vhi) = self.latencies.visible;
        let visible = state.rng.as_mut().expect("rng").range(vlo, vhi);
        let volume_error = state.faults.volume_error;
        let fails = state.rng.as_mut().expect("rng").chance(volume_error);
        let id = FakeCloud::next_id(&mut state, "vol");
        let mut volume_tags = request.tags.clone();
        volume_tags.insert(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into());
        let volume = FakeVolume {
            id: id.clone(),
            state: match (delay, fails) {
                (0, false) => "available".into(),
                (0, true) => "error".into(),
                _ => "creating".into(),
            },
            az: request.availability_zone.clone(),
            attached_to: None,
            available_at: now + Duration::seconds(delay),
            visible_at: now + Duration::seconds(visible),
            tags: volume_tags,
            snapshot_id: request.snapshot_id.clone(),
            fails,
            detached_at: None,
            mounted: false,
            detach_waiting: false,
        };
        state.volumes.push(volume.clone());
        state.volume_tokens.insert(request.client_token.clone(), (print, id));
        self.after(&mut state, "CreateVolume")?;
        Ok(volume_view(&volume))
    }

    async fn attach(&self, volume_id: &str, instance_id: &str, _device: &str) -> CloudResult<()> {
        self.call("AttachVolume", true).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let (lo, hi) = self.latencies.attach;
        let delay = state.rng.as_mut().expect("rng").range(lo, hi);
        let alive = state.instances.iter().any(|i| i.id == instance_id && i.state == "running");
        let volume = state
            .volumes
            .iter_mut()
            .find(|v| v.id == volume_id && v.state != "deleted")
            .ok_or_else(|| not_found("AttachVolume", "InvalidVolume.NotFound"))?;
        if volume.attached_to.is_some() {
            return Err(CloudError::api("ec2", "AttachVolume", "VolumeInUse", "already attached"));
        }
        if volume.state != "available" || !alive {
            return Err(CloudError::api("ec2", "AttachVolume", "IncorrectState", "not available"));
        }
        volume.attached_to = Some(instance_id.to_string());
        volume.state = if delay == 0 { "in-use".into() } else { "attaching".into() };
        volume.available_at = now + Duration::seconds(delay);
        self.after(&mut state, "AttachVolume")
    }

    async fn detach(&self, volume_id: &str, _instance_id: &str, force: bool) -> CloudResult<()> {
        self.call("DetachVolume", true).await?;
        let mut state = self.lock();
        if let Some(volume) = state.volumes.iter_mut().find(|v| v.id == volume_id) {
            // "Failure to [unmount] can result in the volume becoming stuck in
            // the busy state while detaching ... delayed indefinitely until you
            // unmount the volume, force detachment, reboot the instance"
            // (DetachVolume reference).
            if volume.mounted && !force {
                volume.detach_waiting = true;
            } else {
                volume.attached_to = None;
                volume.state = "available".into();
                volume.detach_waiting = false;
            }
        }
        Ok(())
    }

    async fn delete_volume(&self, volume_id: &str) -> CloudResult<()> {
        self.call("DeleteVolume", true).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let completed: Vec<String> = state
            .snapshots
            .iter()
            .filter(|s| s.volume_id == volume_id && s.state(now) == "completed")
            .map(|s| s.id.clone())
            .collect();
        let Some(volume) = state.volumes.iter_mut().find(|v| v.id == volume_id && v.state != "deleted") else {
            // EC2 answers InvalidVolume.NotFound; the port, as the adapter
            // does (`ignore_not_found`), answers that it is gone: done.
            return Ok(());
        };
        if volume.attached_to.is_some() || volume.state == "in-use" {
            return Err(CloudError::api("ec2", "DeleteVolume", "VolumeInUse", "attached"));
        }
        volume.state = "deleted".into();
        let tags = volume.tags.clone();
        state.evidence.deleted_volumes.push((volume_id.to_string(), tags, completed));
        self.after(&mut state, "DeleteVolume")
    }

    async fn find_snapshots(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<SnapshotView>> {
        self.call("DescribeSnapshots", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        Ok(state
            .snapshots
            .iter()
            .filter(|s| now >= s.listed_at && has_tags(&s.tags, tags))
            .map(|s| snapshot_view(s, now))
            .collect())
    }

    async fn snapshot_jobs(&self, stack: &str, snapshot_ids: &[String]) -> CloudResult<BTreeMap<String, String>> {
        self.call("DescribeSnapshots", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        Ok(state
            .snapshots
            .iter()
            .filter(|s| now >= s.listed_at && snapshot_ids.contains(&s.id) && has_tags(&s.tags, &tags::scope(stack)))
            .filter_map(|s| Some((s.id.clone(), s.tags.get(tags::JOB_ID)?.clone())))
            .collect())
    }

    async fn describe_snapshot(&self, snapshot_id: &str) -> CloudResult<Option<SnapshotView>> {
        self.call("DescribeSnapshots", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        Ok(state.snapshots.iter().find(|s| s.id == snapshot_id && now >= s.listed_at).map(|s| snapshot_view(s, now)))
    }

    async fn create_snapshot(
        &self,
        volume_id: &str,
        _description: &str,
        tags: &BTreeMap<String, String>,
    ) -> CloudResult<String> {
        self.call("CreateSnapshot", true).await?;
        tag_limit("CreateSnapshot", tags.len())?;
        let mut state = self.lock();
        if !state.volumes.iter().any(|v| v.id == volume_id && v.state != "deleted") {
            return Err(not_found("CreateSnapshot", "InvalidVolume.NotFound"));
        }
        let now = state.now.unwrap_or_default();
        let (lo, hi) = self.latencies.snapshot;
        let p = state.faults.snapshot_error;
        let rng = state.rng.as_mut().expect("rng");
        let took = rng.range(lo, hi);
        let fails = rng.chance(p);
        let id = FakeCloud::next_id(&mut state, "snap");
        let lag = draw(&mut state, self.latencies.lookup_lag);
        let snapshot = FakeSnapshot {
            id: id.clone(),
            volume_id: volume_id.to_string(),
            started_at: now,
            completes_at: now + Duration::seconds(took),
            fails,
            tags: tags.clone(),
            listed_at: now + Duration::seconds(lag),
        };
        if let Some(delay) = self.lands_late(&mut state) {
            // The request is in AWS's hands; the caller sees a timeout.
            state.late.push((now + Duration::seconds(delay), LateEffect::Snapshot(snapshot)));
            return Err(CloudError::api("ec2", "CreateSnapshot", "timeout", "injected: reply lost, effect late"));
        }
        land_snapshot(&mut state, snapshot);
        self.after(&mut state, "CreateSnapshot")?;
        Ok(id)
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> CloudResult<()> {
        self.call("DeleteSnapshot", true).await?;
        let mut state = self.lock();
        state.snapshots.retain(|s| s.id != snapshot_id);
        state.deleted_snapshots.insert(snapshot_id.to_string());
        Ok(())
    }
}

#[async_trait]
impl Commands for FakeCloud {
    async fn online_agents(&self, instance_ids: &[String]) -> CloudResult<Vec<String>> {
        self.call("DescribeInstanceInformation", false).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let online: Vec<String> = state
            .instances
            .iter()
            .filter(|i| instance_ids.contains(&i.id) && i.agent_up(now))
            .map(|i| i.id.clone())
            .collect();
        // 100 ids a lookup, 50 agents a page: a lookup of agents not yet
        // registered is one page, one of 100 Online agents two.
        let pages: usize = instance_ids
            .chunks(MAX_AGENT_IDS_PER_LOOKUP)
            .map(|chunk| chunk.iter().filter(|id| online.contains(id)).count().div_ceil(MAX_AGENTS_PER_PAGE).max(1))
            .sum();
        self.more_pages(&mut state, "DescribeInstanceInformation", pages, 1);
        Ok(online)
    }

    async fn send(&self, request: &CommandRequest) -> CloudResult<String> {
        self.call("SendCommand", true).await?;
        if request.instance_ids.len() > MAX_INSTANCES_PER_COMMAND {
            // Real SSM answers this with a misleading throttling error.
            return Err(CloudError::api("ssm", "SendCommand", "ThrottlingException", "too many instance ids"));
        }
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        // SSM takes a command for any managed node, Online or not: one whose
        // agent is `ConnectionLost` gets it when it returns, within the
        // command's timeout (then `DeliveryTimedOut`).
        for id in &request.instance_ids {
            let managed = state.instances.iter().any(|i| &i.id == id && i.managed(now));
            if !managed {
                let seen = state.instances.iter().find(|i| &i.id == id).map(|i| (i.state.clone(), i.online_at));
                return Err(CloudError::api(
                    "ssm",
                    "SendCommand",
                    "InvalidInstanceId",
                    &format!("{id} is not a managed node: {seen:?}"),
                ));
            }
        }
        let mut runs = BTreeMap::new();
        for id in &request.instance_ids {
            let (mut code, stdout, mut seconds) = (self.behaviour)(request, id);
            let faults = state.faults.clone();
            let user_phase = !request.lines.iter().any(|l| l.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER));
            let rng = state.rng.as_mut().expect("rng");
            if user_phase && rng.chance(faults.command_fail) {
                code = 1;
            }
            if user_phase && rng.chance(faults.command_hang) {
                seconds = i64::from(request.timeout_seconds) + 3600;
            }
            runs.insert(
                id.clone(),
                FakeRun {
                    exit_code: code,
                    stdout,
                    stderr: String::new(),
                    seconds,
                    delivered_at: None,
                    waits_on: None,
                    started_step: false,
                    begins_at: None,
                    fence_waits_on: Vec::new(),
                    volume_effect_done: false,
                    finishes_at: FAR_FUTURE,
                    died_at: None,
                    cancel_requested_at: None,
                    cancelled_at: None,
                },
            );
        }
        let id = FakeCloud::next_id(&mut state, "cmd");
        let lag = draw(&mut state, self.latencies.lookup_lag);
        let mut search_lag = lag;
        let long = state.faults.long_command_lag;
        if long > 0.0 {
            let rng = state.rng.as_mut().expect("rng");
            if rng.chance(long) {
                search_lag = rng.range(60, 300);
            }
        }
        let command = FakeCommand {
            id: id.clone(),
            request: request.clone(),
            sent_at: now,
            runs,
            listed_at: now + Duration::seconds(lag),
            searchable_at: now + Duration::seconds(search_lag),
        };
        if let Some(delay) = self.lands_late(&mut state) {
            state.late.push((now + Duration::seconds(delay), LateEffect::Command(command)));
            return Err(CloudError::api("ssm", "SendCommand", "timeout", "injected: reply lost, effect late"));
        }
        state.commands.push(command);
        deliver_runs(&mut state);
        self.after(&mut state, "SendCommand")?;
        Ok(id)
    }

    async fn find_by_comment(&self, instance_id: &str, comment: &str) -> CloudResult<Option<String>> {
        self.call("ListCommands", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        Ok(state
            .commands
            .iter()
            .find(|c| {
                now >= c.searchable_at
                    && c.request.comment == comment
                    && c.request.instance_ids.iter().any(|i| i == instance_id)
            })
            .map(|c| c.id.clone()))
    }

    async fn invocations(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<Vec<InvocationView>> {
        self.call("ListCommandInvocations", false).await?;
        let state = self.lock();
        let now = state.now.unwrap_or_default();
        let command =
            state.commands.iter().find(|c| c.id == command_id).ok_or_else(|| {
                CloudError::api("ssm", "ListCommandInvocations", "InvalidCommandId", "no such command")
            })?;
        if now < command.listed_at {
            return Ok(vec![]); // not listed yet
        }
        let timeout = Duration::seconds(i64::from(command.request.timeout_seconds));
        let agents: BTreeMap<&String, &FakeInstance> = state.instances.iter().map(|i| (&i.id, i)).collect();
        Ok(command
            .runs
            .iter()
            .filter(|(id, _)| instance_ids.contains(id))
            .map(|(id, run)| {
                // The agent times the execution from when it received it.
                let deadline = run.delivered_at.unwrap_or(command.sent_at) + timeout;
                let instance = agents.get(id);
                // An agent that stopped answering before the run ended never reports its result.
                let unheard =
                    instance.and_then(|i| i.agent_lost_at).is_some_and(|at| at <= now && at < run.finishes_at);
                // An agent away when the run ended reports when it is back;
                // not back by the execution timeout, the run is TimedOut,
                // for good ("In Progress until the agent is available again,
                // or until the execution timeout limit is reached").
                let back = instance
                    .and_then(|i| i.agent_away)
                    .filter(|(from, until)| *from <= run.finishes_at && run.finishes_at < *until)
                    .map(|(_, until)| until);
                let away = back.is_some_and(|until| now < until || until > deadline);
                let cancelling = run.cancel_requested_at.is_some();
                let (status, exit_code) = if run.delivered_at.is_none() {
                    // Pending until delivery and execution timeouts have both passed.
                    let gave_up = deadline + Duration::seconds(delivery_timeout(&command.request));
                    match (run.cancelled_at.is_some(), now >= gave_up) {
                        (true, _) => ("Cancelled", None),
                        (false, true) => ("DeliveryTimedOut", None),
                        // "Delayed: The system attempted to send the command to the
                        // managed node but wasn't successful" (the status guide).
                        (false, false) if instance.is_some_and(|i| !i.agent_up(now)) => ("Delayed", None),
                        (false, false) => ("Pending", None),
                    }
                } else if run.cancelled_at.is_some_and(|at| now >= at && at <= run.finishes_at) {
                    ("Cancelled", None)
                } else if run.died_at.is_some() || unheard || away {
                    // The agent died with its instance, or cannot be reached:
                    // SSM never hears a result, and the invocation times out
                    // (never Success; a cancel never completes).
                    match (now >= deadline, cancelling) {
                        (true, _) => ("TimedOut", Some(-1)),
                        (false, true) => ("Cancelling", None),
                        (false, false) => ("InProgress", None),
                    }
                } else if cancelling && now < run.finishes_at && now < deadline {
                    ("Cancelling", None)
                } else if run.finishes_at > deadline && now >= deadline {
                    ("TimedOut", Some(-1))
                } else if now < run.finishes_at {
                    ("InProgress", None)
                } else if run.exit_code == 0 {
                    ("Success", Some(0))
                } else {
                    ("Failed", Some(run.exit_code))
                };
                let done = exit_code.is_some() || status == "Cancelled";
                InvocationView {
                    instance_id: id.clone(),
                    status: CommandStatus::from(status),
                    exit_code,
                    stdout: if done { run.stdout.clone() } else { String::new() },
                    stderr: if done { run.stderr.clone() } else { String::new() },
                    output_uri: None,
                }
            })
            .collect())
    }

    async fn cancel(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<()> {
        self.call("CancelCommand", true).await?;
        let mut state = self.lock();
        let now = state.now.unwrap_or_default();
        let delay = state.rng.as_mut().expect("rng").range(1, 8);
        let agent_up: BTreeSet<String> =
            state.instances.iter().filter(|i| i.agent_up(now)).map(|i| i.id.clone()).collect();
        // SSM answers InvalidCommandId; the port, as the adapter does, has
        // nothing to cancel.
        let Some(command) = state.commands.iter_mut().find(|c| c.id == command_id) else { return Ok(()) };
        let mut killed = Vec::new();
        for (id, run) in command.runs.iter_mut() {
            if !instance_ids.contains(id) || run.cancel_requested_at.is_some() || run.died_at.is_some() {
                continue;
            }
            if run.delivered_at.is_none() {
                // Never delivered: SSM cancels it where it waits.
                run.cancel_requested_at = Some(now);
                run.cancelled_at = Some(now);
            } else if now < run.finishes_at {
                // SSM reports Cancelling until the agent has stopped the
                // process; an agent that cannot be reached never does.
                run.cancel_requested_at = Some(now);
                if agent_up.contains(id) {
                    let at = now + Duration::seconds(delay);
                    run.cancelled_at = Some(at);
                    killed.push((id.clone(), at));
                }
            }
        }
        // A cleanup script's work fence waiting on a killed step goes on
        // when it ends.
        if !killed.is_empty() {
            refence(&mut state, now);
        }
        // The step guard: a delivery waiting on a killed step's lock finds
        // `started` with no `done`, and reports the outcome unknown.
        for (instance_id, at) in killed {
            let holder = (command_id.to_string(), instance_id);
            for run in state.commands.iter_mut().flat_map(|c| c.runs.values_mut()) {
                if run.waits_on.as_ref() == Some(&holder) && run.finishes_at > at {
                    lose(run, at);
                }
            }
        }
        Ok(())
    }
}

/// What mount and unmount steps that ended well did to their instance's
/// volumes; a stopped or terminated instance has nothing mounted. A detach
/// that waited on a mounted volume completes once it is not.
fn mount_effects(state: &mut FakeState, now: DateTime<Utc>, ended: &BTreeSet<String>) {
    let mut mounted: Vec<(String, String)> = Vec::new();
    let mut unmounted: BTreeSet<String> = ended.clone();
    for command in &mut state.commands {
        let Some(first) = command.request.lines.first() else { continue };
        let op = first.strip_prefix(flotilla_shared::shell::VOLUME_OP_MARKER).map(str::trim);
        let Some(op) = op.filter(|op| matches!(*op, "mount" | "unmount")) else { continue };
        let timeout = Duration::seconds(i64::from(command.request.timeout_seconds));
        for (instance_id, run) in command.runs.iter_mut() {
            // Ended well: exit 0, before SSM's timeout killed it.
            let in_time = run.delivered_at.is_some_and(|at| run.finishes_at <= at + timeout);
            let well = in_time && run.exit_code == 0 && now >= run.finishes_at;
            let killed = [run.died_at, run.cancelled_at].into_iter().flatten().any(|at| at <= run.finishes_at);
            if !well || killed || run.volume_effect_done {
                continue;
            }
            run.volume_effect_done = true;
            if op == "unmount" {
                unmounted.insert(instance_id.clone());
                continue;
            }
            let prefix = format!("  {}) VOLUME_ID=", flotilla_shared::shell::quote(instance_id));
            for line in command.request.lines.iter().filter_map(|l| l.strip_prefix(&prefix)) {
                let volume = line.split_whitespace().next().unwrap_or_default().trim_matches('\'');
                mounted.push((instance_id.clone(), volume.to_string()));
            }
        }
    }
    for volume in &mut state.volumes {
        let owner = volume.attached_to.clone();
        if mounted.iter().any(|(i, v)| *v == volume.id && owner.as_ref() == Some(i)) {
            volume.mounted = true;
        }
        if owner.as_ref().is_none_or(|i| unmounted.contains(i)) {
            volume.mounted = false;
        }
        if volume.detach_waiting && !volume.mounted {
            volume.detach_waiting = false;
            volume.attached_to = None;
            volume.state = "available".into();
        }
    }
}

/// Creates whose moment came land now, as AWS took them in then.
fn land_late(state: &mut FakeState, now: DateTime<Utc>) {
    if state.late.is_empty() {
        return;
    }
    let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut state.late).into_iter().partition(|(at, _)| *at <= now);
    state.late = later;
    for (at, effect) in due {
        match effect {
            LateEffect::Command(mut command) => {
                let managed = command
                    .request
                    .instance_ids
                    .iter()
                    .all(|id| state.instances.iter().any(|i| &i.id == id && i.managed(at)));
                if managed {
                    let shift = at - command.sent_at;
                    command.sent_at = at;
                    command.listed_at += shift;
                    command.searchable_at += shift;
                    state.commands.push(command);
                    state.evidence.late_landed += 1;
                }
            }
            LateEffect::Snapshot(mut snapshot) => {
                if state.volumes.iter().any(|v| v.id == snapshot.volume_id && v.state != "deleted") {
                    let shift = at - snapshot.started_at;
                    snapshot.started_at = at;
                    snapshot.completes_at += shift;
                    snapshot.listed_at += shift;
                    land_snapshot(state, snapshot);
                    state.evidence.late_landed += 1;
                }
            }
        }
    }
}

/// Work fences still waiting: their start moves to when the runs they wait
/// for now end (a cancel ended one early).
fn refence(state: &mut FakeState, now: DateTime<Utc>) {
    let mut moved: Vec<(usize, String, DateTime<Utc>)> = Vec::new();
    for (index, command) in state.commands.iter().enumerate() {
        for (instance_id, run) in &command.runs {
            let (Some(delivered), Some(begins)) = (run.delivered_at, run.begins_at) else { continue };
            if run.fence_waits_on.is_empty() || begins <= now {
                continue;
            }
            let ends = run.fence_waits_on.iter().filter_map(|h| holder_end(state, h, now)).map(|(end, _, _)| end);
            let at = ends.fold(delivered, DateTime::max);
            if at < begins {
                moved.push((index, instance_id.clone(), at));
            }
        }
    }
    for (index, instance_id, at) in moved {
        if let Some(run) = state.commands[index].runs.get_mut(&instance_id) {
            let shift = run.begins_at.map_or(Duration::zero(), |begins| begins - at);
            run.begins_at = Some(at);
            run.finishes_at -= shift;
        }
    }
}

/// A delivery the guard turned away: the step's outcome is unknown.
fn lose(run: &mut FakeRun, at: DateTime<Utc>) {
    run.finishes_at = at;
    run.exit_code = flotilla_shared::shell::LOST_EXIT_CODE;
    run.stdout = String::new();
    run.stderr =
        format!("{}: an earlier delivery started here and never finished", flotilla_shared::shell::LOST_MARKER);
    run.waits_on = None;
}

/// SendCommand's TimeoutSeconds, as the adapter sets it: a command its
/// agent has not received by then never runs.
fn delivery_timeout(request: &CommandRequest) -> i64 {
    i64::from(flotilla_shared::ports::delivery_timeout_seconds(request.timeout_seconds))
}

/// Far in the future: a run not delivered yet has no end.
const FAR_FUTURE: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

/// A draw from `range`, with no draw at all when it is empty (so a
/// scenario without the fault keeps its seeded sequence).
fn draw(state: &mut FakeState, (lo, hi): (i64, i64)) -> i64 {
    if hi <= lo {
        return lo;
    }
    state.rng.as_mut().expect("rng").range(lo, hi)
}

/// A snapshot EC2 has taken in: evidence, and EBS's "EBS Snapshot
/// Notification" when it completes or fails.
fn land_snapshot(state: &mut FakeState, snapshot: FakeSnapshot) {
    if let (true, Some(job_id)) = (state.events, snapshot.tags.get(tags::JOB_ID)) {
        queue_event(state, &job_id.clone(), None, snapshot.completes_at);
    }
    state.evidence.snapshots_created.push(snapshot.clone());
    state.snapshots.push(snapshot);
}

/// Where the guard leaves a delivery.
enum Guarded {
    /// No guard holds this step: the user's step starts.
    Start,
    /// The step already ran: its recorded code, at once.
    Report(i32),
    /// An earlier delivery started and never finished.
    Lost,
    /// An earlier delivery holds the lock until `end`: wait for it, then
    /// report its code, or the outcome unknown if it was killed.
    Wait { holder: (String, String), end: DateTime<Utc>, code: i32, killed: bool },
}

/// The guard's key for a delivery, read off the script's own lines as bash
/// would run them: None when the script has no guard (every delivery then
/// starts the step). Job, shard, phase and instance, as the guard keys it.
pub fn guard_key(lines: &[String], instance_id: &str) -> Option<String> {
    let defined = lines.iter().any(|l| l == "flotilla_guard() {") && lines.iter().any(|l| l.contains("flock 9"));
    let phase = lines.iter().rev().find_map(|l| l.strip_prefix("flotilla_guard "))?;
    step_key(lines, phase, instance_id).filter(|_| defined)
}

/// A user step's identity on an instance: job, shard, phase, instance.
pub fn step_key(lines: &[String], phase: &str, instance_id: &str) -> Option<String> {
    let job = lines.iter().find_map(|l| l.strip_prefix("export FLOTILLA_JOB_ID="))?;
    let shard = shards_in(lines).get(instance_id).copied()?;
    Some(format!("{job}.{shard}.{}.{instance_id}", phase.trim_matches('\'')))
}

/// Each instance's shard index, from the preamble's `case` lines.
pub fn shards_in(lines: &[String]) -> BTreeMap<String, u32> {
    lines
        .iter()
        .filter_map(|line| {
            let (id, rest) = line.trim().split_once(") export FLOTILLA_SHARD_INDEX=")?;
            let index = rest.split_whitespace().next()?.trim_end_matches(";;").parse().ok()?;
            Some((id.trim_matches('\'').to_string(), index))
        })
        .collect()
}

/// When the run holding a guard's lock ends (now or later), whether it was
/// killed before it could write `done` (its timeout, a cancel, its
/// instance), and its code. None: no such run.
fn holder_end(state: &FakeState, holder: &(String, String), now: DateTime<Utc>) -> Option<(DateTime<Utc>, bool, i32)> {
    let command = state.commands.iter().find(|c| c.id == holder.0)?;
    let run = command.runs.get(&holder.1)?;
    // SSM times a run from its delivery.
    let delivered = run.delivered_at.unwrap_or(now);
    let mut end = run.finishes_at.min(delivered + Duration::seconds(i64::from(command.request.timeout_seconds)));
    for at in [run.cancelled_at, run.died_at].into_iter().flatten() {
        end = end.min(at);
    }
    Some((end, end < run.finishes_at, run.exit_code))
}

/// Deliver every run whose agent is there to take it: the guard (when the
/// script has one) decides whether the user's step starts. A run whose
/// timeout passes first is never delivered (`DeliveryTimedOut`).
fn deliver_runs(state: &mut FakeState) {
    let now = state.now.unwrap_or_default();
    let up: BTreeSet<String> = state.instances.iter().filter(|i| i.agent_up(now)).map(|i| i.id.clone()).collect();
    let mut waiting: Vec<(usize, String)> = Vec::new();
    for (index, command) in state.commands.iter().enumerate() {
        let deadline = command.sent_at + Duration::seconds(delivery_timeout(&command.request));
        for (instance_id, run) in &command.runs {
            if run.delivered_at.is_none() && run.cancelled_at.is_none() && up.contains(instance_id) && now < deadline {
                waiting.push((index, instance_id.clone()));
            }
        }
    }
    for (index, instance_id) in waiting {
        let (lines, comment, command_id) = {
            let c = &state.commands[index];
            (c.request.lines.clone(), c.request.comment.clone(), c.id.clone())
        };
        let user_step = !lines.iter().any(|l| l.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER));
        let phase = comment.split(' ').nth(2).unwrap_or_default().to_string();
        let key = guard_key(&lines, &instance_id);
        // The work fence (in cleanup scripts): the shard's work here is
        // closed, and this waits for any of it still running.
        let fence = lines.iter().find_map(|l| l.strip_prefix("flotilla_close_work ")).map(str::to_string);
        let closes = lines.iter().any(|l| l == "flotilla_close_work() {") && fence.is_some();
        let work = step_key(&lines, "work", &instance_id);
        let mut begins = now;
        let mut fence_waits_on = Vec::new();
        if let (true, Some(work)) = (closes, work.as_ref()) {
            state.closed.insert(work.clone());
            for phase in fence.as_deref().unwrap_or_default().split_whitespace() {
                let holder = step_key(&lines, phase, &instance_id).and_then(|k| state.guards.get(&k).cloned());
                if let Some((holder, (end, _, _))) = holder.and_then(|h| Some((h.clone(), holder_end(state, &h, now)?)))
                {
                    if end > now {
                        fence_waits_on.push(holder);
                    }
                    begins = begins.max(end);
                }
            }
        }
        let closed = matches!(phase.as_str(), "setup" | "run") && work.is_some_and(|w| state.closed.contains(&w));
        let outcome = match key.as_ref().and_then(|k| state.guards.get(k)).cloned() {
            None if closed && key.is_some() => Guarded::Lost,
            None => Guarded::Start,
            Some(holder) => match holder_end(state, &holder, now) {
                None => Guarded::Lost,
                Some((end, killed, code)) => match (killed, now >= end) {
                    (true, true) => Guarded::Lost,
                    (false, true) => Guarded::Report(code),
                    (_, false) => Guarded::Wait { holder, end, code, killed },
                },
            },
        };
        let starts = matches!(outcome, Guarded::Start);
        if user_step && starts {
            if let Some(step) = step_key(&lines, &phase, &instance_id) {
                state.evidence.step_starts.push((step, now));
            }
        }
        let job_id = comment.split(' ').nth(1).map(str::to_string);
        let run = state.commands[index].runs.get_mut(&instance_id).expect("run");
        run.delivered_at = Some(now);
        run.begins_at = Some(begins);
        run.fence_waits_on = fence_waits_on;
        run.started_step = starts;
        match outcome {
            Guarded::Start => run.finishes_at = begins + Duration::seconds(run.seconds),
            Guarded::Report(code) => {
                run.finishes_at = now + Duration::seconds(1);
                run.exit_code = code;
                run.stdout = String::new();
                run.stderr = format!("flotilla: {phase} already ran on this instance (exit {code}); not run again");
            }
            Guarded::Lost => lose(run, now + Duration::seconds(1)),
            Guarded::Wait { holder, end, code, killed } => {
                run.finishes_at = end;
                run.exit_code = code;
                run.stdout = String::new();
                run.stderr = format!("flotilla: {phase} already ran on this instance (exit {code}); not run again");
                run.waits_on = Some(holder);
                if killed {
                    lose(run, end);
                }
            }
        }
        let finishes_at = run.finishes_at;
        if let (Some(key), true) = (key, starts) {
            state.guards.insert(key, (command_id, instance_id.clone()));
        }
        if let (true, Some(job_id)) = (state.events, job_id) {
            queue_event(state, &job_id, Some(&instance_id), finishes_at);
        }
    }
}

#[async_trait]
impl Records for FakeCloud {
    async fn load(&self, job_id: &str) -> CloudResult<Option<Versioned>> {
        self.call("GetObject", false).await?;
        let state = self.lock();
        match state.objects.get(&record_key(job_id)) {
            None => Ok(None),
            Some((body, version)) => {
                let record = serde_json::from_slice(body).map_err(|e| CloudError::Invalid(e.to_string()))?;
                Ok(Some(Versioned { record, version: version.to_string() }))
            }
        }
    }

    async fn create(&self, record: &JobRecord) -> CloudResult<WriteOutcome> {
        self.call("PutObject", true).await?;
        let mut state = self.lock();
        let key = record_key(&record.job_id);
        if state.objects.contains_key(&key) {
            return Ok(WriteOutcome::Conflict);
        }
        let body = serde_json::to_vec(record).map_err(|e| CloudError::Invalid(e.to_string()))?;
        state.objects.insert(key, (body, 1));
        Ok(WriteOutcome::Written { version: "1".into() })
    }

    async fn replace(&self, record: &JobRecord, version: &str) -> CloudResult<WriteOutcome> {
        self.call("PutObject", true).await?;
        let mut state = self.lock();
        let key = record_key(&record.job_id);
        let current = state.objects.get(&key).map(|(_, v)| *v);
        if current.map(|v| v.to_string()).as_deref() != Some(version) {
            return Ok(WriteOutcome::Conflict);
        }
        let next = current.unwrap_or_default() + 1;
        let body = serde_json::to_vec(record).map_err(|e| CloudError::Invalid(e.to_string()))?;
        if body.len() > state.max_record_bytes {
            state.max_record_bytes = body.len();
            state.largest_record = body.clone();
        }
        state.objects.insert(key, (body, next));
        self.after(&mut state, "PutObject")?;
        Ok(WriteOutcome::Written { version: next.to_string() })
    }
}

#[async_trait]
impl Objects for FakeCloud {
    async fn put_artifact(&self, job_id: &str, name: &str, body: &[u8], _content_type: &str) -> CloudResult<()> {
        self.call("PutObject", true).await?;
        self.lock().objects.insert(format!("jobs/{job_id}/{name}"), (body.to_vec(), 1));
        Ok(())
    }

    async fn put(&self, key: &str, body: &[u8], _content_type: &str) -> CloudResult<()> {
        self.call("PutObject", true).await?;
        self.lock().objects.insert(key.to_string(), (body.to_vec(), 1));
        Ok(())
    }

    async fn get(&self, key: &str) -> CloudResult<Option<Vec<u8>>> {
        self.call("GetObject", false).await?;
        Ok(self.lock().objects.get(key).map(|(body, _)| body.clone()))
    }

    async fn delete(&self, key: &str) -> CloudResult<()> {
        self.call("DeleteObject", true).await?;
        self.lock().objects.remove(key);
        Ok(())
    }

    fn bucket(&self) -> &str {
        &self.bucket
    }
}

#[async_trait]
impl ActiveJobs for FakeCloud {
    async fn set_active(&self, job_id: &str, active: bool) -> CloudResult<()> {
        self.call("PutObject", true).await?;
        let mut state = self.lock();
        if active {
            state.objects.insert(active_key(job_id), (vec![], 1));
        } else {
            state.objects.remove(&active_key(job_id));
        }
        Ok(())
    }

    async fn list_active(&self) -> CloudResult<Vec<String>> {
        self.call("ListObjectsV2", false).await?;
        let state = self.lock();
        Ok(state.objects.keys().filter_map(|k| k.strip_prefix("active/")).map(str::to_string).collect())
    }
}

#[async_trait]
impl SharedState for FakeCloud {
    async fn get_versioned(&self, key: &str) -> CloudResult<Option<(Vec<u8>, String)>> {
        self.call("GetObject", false).await?;
        Ok(self.lock().objects.get(key).map(|(body, version)| (body.clone(), version.to_string())))
    }

    async fn put_if(&self, key: &str, body: &[u8], version: Option<&str>) -> CloudResult<WriteOutcome> {
        self.call("PutObject", true).await?;
        let mut state = self.lock();
        let current = state.objects.get(key).map(|(_, v)| *v);
        if current.map(|v| v.to_string()).as_deref() != version {
            return Ok(WriteOutcome::Conflict);
        }
        let next = current.unwrap_or_default() + 1;
        state.objects.insert(key.to_string(), (body.to_vec(), next));
        Ok(WriteOutcome::Written { version: next.to_string() })
    }
}

#[async_trait]
impl Listing for FakeCloud {
    async fn list_keys(&self, bucket: &str, prefix: &str, most: usize) -> CloudResult<Option<Vec<String>>> {
        self.call("ListObjectsV2", false).await?;
        let state = self.lock();
        let keys: Vec<String> = if bucket == self.bucket {
            state.objects.keys().filter(|k| k.starts_with(prefix)).cloned().collect()
        } else {
            let Some(keys) = state.buckets.get(bucket) else {
                return Err(CloudError::api(
                    "s3",
                    "ListObjectsV2",
                    "NoSuchBucket",
                    "The specified bucket does not exist",
                ));
            };
            keys.iter().filter(|k| k.starts_with(prefix)).cloned().collect()
        };
        Ok((keys.len() <= most).then_some(keys))
    }
}

/// One fake cloud stands for every account; it records which roles were assumed.
#[async_trait]
impl Accounts for FakeCloud {
    async fn assume(&self, role_arn: &str, external_id: Option<&str>, _job_id: &str) -> CloudResult<Arc<Cloud>> {
        self.call("AssumeRole", false).await?;
        let mut state = self.lock();
        if state.refused_roles.iter().any(|r| r == role_arn) {
            return Err(CloudError::api(
                "sts",
                "AssumeRole",
                "AccessDenied",
                "not authorized to perform sts:AssumeRole",
            ));
        }
        state.assumed_roles.push((role_arn.to_string(), external_id.map(str::to_string)));
        drop(state);
        Ok(Arc::new(self.cloud()))
    }
}

#[async_trait]
impl Notices for FakeCloud {
    async fn send(&self, batch: &flotilla_shared::events::NoticeBatch) -> CloudResult<()> {
        self.call("SendMessage", true).await?;
        let mut state = self.lock();
        if state.fail_notices > 0 {
            state.fail_notices -= 1;
            return Err(CloudError::api("sqs", "SendMessage", "ServiceUnavailable", "injected fault"));
        }
        state.notices.get_or_insert_with(Vec::new).push(batch.clone());
        Ok(())
    }
}

#[async_trait]
impl WakeQueue for FakeCloud {
    async fn send(&self, message: &WakeMessage, delay_seconds: u32) -> CloudResult<()> {
        self.call("SendMessage", true).await?;
        let mut state = self.lock();
        if state.fail_sends > 0 {
            state.fail_sends -= 1;
            return Err(CloudError::api("sqs", "SendMessage", "ServiceUnavailable", "injected fault"));
        }
        let now = state.now.unwrap_or_default();
        let late = state.faults.reorder_seconds;
        let late = state.rng.as_mut().expect("rng").range(0, late);
        state.queue.push_back((now + Duration::seconds(i64::from(delay_seconds) + late), message.clone()));
        Ok(())
    }
}

impl FakeCloud {
    /// Take the message due soonest and move the clock to it.
    pub fn next_message(&self) -> Option<WakeMessage> {
        let (at, message) = {
            let mut state = self.lock();
            let index = (0..state.queue.len()).min_by_key(|i| (state.queue[*i].0, *i))?;
            state.queue.remove(index)?
        };
        self.advance_to(at);
        Some(message)
    }

    /// When the next message is due, if any.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.lock().queue.iter().map(|(at, _)| *at).min()
    }

    /// Put a message back as SQS would after its visibility timeout.
    pub fn redeliver_later(&self, message: WakeMessage, seconds: i64) {
        let mut state = self.lock();
        let at = state.now.unwrap_or_default() + Duration::seconds(seconds);
        state.queue.push_back((at, message));
    }

    /// Total calls, and mutating ones (creates, deletes, sends).
    pub fn call_totals(&self) -> (u64, u64) {
        let state = self.lock();
        let total = state.calls.values().sum();
        let reads = [
            "DescribeInstances",
            "DescribeVolumes",
            "DescribeSnapshots",
            "DescribeInstanceInformation",
            "ListCommands",
            "ListCommandInvocations",
            "GetObject",
            "GetParameter",
            "AssumeRole",
            "ListObjectsV2",
        ];
        let mutating = state.calls.iter().filter(|(k, _)| !reads.contains(k)).map(|(_, v)| *v).sum();
        (total, mutating)
    }
}
