//! An in-memory fake cloud behind the same ports, on a virtual clock.
//!
//! It is for scenario tests and, later, fault injection and scale simulation;
//! the SDK adapters are tested against moto instead. Instances boot, agents
//! come Online and commands finish as virtual time passes; a `CommandBehaviour`
//! decides each command's exit code, output and duration.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};

use crate::error::CloudError;
use crate::lifecycle::StepMessage;
use crate::ports::*;
use crate::record::{record_key, JobRecord};

/// What a command does on one instance: (exit code, stdout, seconds it takes).
pub type CommandBehaviour = Arc<dyn Fn(&CommandRequest, &str) -> (i32, String, i64) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct FakeInstance {
    pub id: String,
    pub state: String,
    pub az: String,
    pub tags: BTreeMap<String, String>,
    pub launched_at: DateTime<Utc>,
    pub launch_index: u32,
}

#[derive(Debug, Clone)]
pub struct FakeVolume {
    pub id: String,
    pub state: String,
    pub az: String,
    pub attached_to: Option<String>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct FakeSnapshot {
    pub id: String,
    pub volume_id: String,
    pub started_at: DateTime<Utc>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct FakeCommand {
    pub id: String,
    pub request: CommandRequest,
    pub sent_at: DateTime<Utc>,
    pub cancelled: bool,
    /// Per instance: exit code, stdout, finishes at.
    pub results: BTreeMap<String, (i32, String, DateTime<Utc>)>,
}

#[derive(Default)]
pub struct FakeState {
    pub now: Option<DateTime<Utc>>,
    pub instances: Vec<FakeInstance>,
    pub volumes: Vec<FakeVolume>,
    pub snapshots: Vec<FakeSnapshot>,
    pub commands: Vec<FakeCommand>,
    pub objects: BTreeMap<String, (Vec<u8>, u64)>,
    pub queue: VecDeque<(DateTime<Utc>, StepMessage)>,
    pub launch_tokens: BTreeMap<String, Vec<String>>,
    pub next_id: u64,
    /// Counts of each call, for assertions and rate checks.
    pub calls: BTreeMap<&'static str, u64>,
    /// Fault injection: this many SendMessage calls fail (as after a crash).
    pub fail_sends: u32,
    /// Roles assumed, with their external ids; roles listed in `refused_roles` are denied.
    pub assumed_roles: Vec<(String, Option<String>)>,
    pub refused_roles: Vec<String>,
    /// Fault injection: the next call of each named operation takes effect,
    /// then fails, as if the caller crashed before seeing the reply.
    pub crash_after: Vec<&'static str>,
    /// Fault injection: this many instance tag lookups miss the newest
    /// instance, as an eventually consistent DescribeInstances does.
    pub stale_tag_lookups: u32,
    /// Fault injection: this many volume describes show the volume as
    /// available and unattached, as a read that lags a racing attach does.
    pub stale_volume_views: u32,
    /// Fault injection: DetachVolume is accepted but never completes (a busy
    /// device); a forced detach still works unless `stuck_even_forced`.
    pub stuck_detaches: bool,
    pub stuck_even_forced: bool,
}

#[derive(Clone)]
pub struct FakeCloud {
    pub state: Arc<Mutex<FakeState>>,
    behaviour: CommandBehaviour,
    /// Seconds from launch until running, and until the agent is Online.
    pub boot_seconds: i64,
    pub agent_seconds: i64,
    bucket: String,
}

impl FakeCloud {
    pub fn new(start: DateTime<Utc>) -> Self {
        let state = FakeState { now: Some(start), ..Default::default() };
        FakeCloud {
            state: Arc::new(Mutex::new(state)),
            behaviour: Arc::new(|_, _| (0, "ok".to_string(), 5)),
            boot_seconds: 30,
            agent_seconds: 60,
            bucket: "fake-bucket".to_string(),
        }
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
            clock: Box::new(self.clone()),
            settings,
        }
    }

    pub fn running_instances(&self) -> usize {
        let now = self.now();
        let mut state = self.lock();
        refresh(&mut state, now, self.boot_seconds);
        state.instances.iter().filter(|i| i.state != "terminated").count()
    }

    pub fn record(&self, job_id: &str) -> Option<JobRecord> {
        let state = self.lock();
        state.objects.get(&record_key(job_id)).and_then(|(body, _)| serde_json::from_slice(body).ok())
    }

    fn next_id(state: &mut FakeState, prefix: &str) -> String {
        state.next_id += 1;
        format!("{prefix}-{:017x}", state.next_id)
    }

    fn count(state: &mut FakeState, call: &'static str) {
        *state.calls.entry(call).or_default() += 1;
    }

    /// After an operation took effect: fail if a crash was injected here.
    fn crash_point(state: &mut FakeState, call: &'static str) -> CloudResult<()> {
        match state.crash_after.iter().position(|c| *c == call) {
            Some(index) => {
                state.crash_after.remove(index);
                // Transient, as a Lambda that died mid-call: SQS redelivers the message.
                Err(CloudError::api("ec2", call, "InternalError", "injected: crashed before the reply"))
            }
            None => Ok(()),
        }
    }
}

fn refresh(state: &mut FakeState, now: DateTime<Utc>, boot_seconds: i64) {
    for instance in &mut state.instances {
        if instance.state == "pending" && now >= instance.launched_at + Duration::seconds(boot_seconds) {
            instance.state = "running".to_string();
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

#[async_trait]
impl Fleet for FakeCloud {
    async fn resolve_image(&self, parameter: &str) -> CloudResult<String> {
        Ok(format!("ami-{:016x}", parameter.len()))
    }

    async fn find_instances(&self, job_id: &str) -> CloudResult<Vec<InstanceView>> {
        let now = self.now();
        let mut state = self.lock();
        FakeCloud::count(&mut state, "DescribeInstances");
        refresh(&mut state, now, self.boot_seconds);
        let mut found: Vec<InstanceView> = state
            .instances
            .iter()
            .filter(|i| i.state != "terminated" && has_tags(&i.tags, &[(tags::JOB_ID, job_id)]))
            .map(view)
            .collect();
        if state.stale_tag_lookups > 0 {
            state.stale_tag_lookups -= 1;
            found.pop();
        }
        Ok(found)
    }

    async fn launch(&self, request: &LaunchRequest) -> CloudResult<Vec<InstanceView>> {
        let now = self.now();
        let mut state = self.lock();
        FakeCloud::count(&mut state, "RunInstances");
        if let Some(ids) = state.launch_tokens.get(&request.client_token).cloned() {
            return Ok(state.instances.iter().filter(|i| ids.contains(&i.id)).map(view).collect());
        }
        let mut ids = Vec::new();
        for index in 0..request.count {
            let id = FakeCloud::next_id(&mut state, "i");
            state.instances.push(FakeInstance {
                id: id.clone(),
                state: "pending".into(),
                az: "us-east-1a".into(),
                tags: request.tags.clone(),
                launched_at: now,
                launch_index: index,
            });
            ids.push(id);
        }
        state.launch_tokens.insert(request.client_token.clone(), ids.clone());
        FakeCloud::crash_point(&mut state, "RunInstances")?;
        Ok(state.instances.iter().filter(|i| ids.contains(&i.id)).map(view).collect())
    }

    async fn describe(&self, instance_ids: &[String]) -> CloudResult<Vec<InstanceView>> {
        let now = self.now();
        let mut state = self.lock();
        FakeCloud::count(&mut state, "DescribeInstances");
        refresh(&mut state, now, self.boot_seconds);
        Ok(state.instances.iter().filter(|i| instance_ids.contains(&i.id)).map(view).collect())
    }

    async fn terminate(&self, instance_ids: &[String]) -> CloudResult<()> {
        let mut state = self.lock();
        FakeCloud::count(&mut state, "TerminateInstances");
        for instance in state.instances.iter_mut().filter(|i| instance_ids.contains(&i.id)) {
            instance.state = "terminated".into();
        }
        for volume in state.volumes.iter_mut() {
            if volume.attached_to.as_ref().is_some_and(|id| instance_ids.contains(id)) {
                volume.attached_to = None;
                volume.state = "available".into();
            }
        }
        Ok(())
    }
}

fn view(instance: &FakeInstance) -> InstanceView {
    InstanceView {
        instance_id: instance.id.clone(),
        state: instance.state.clone(),
        availability_zone: instance.az.clone(),
        launch_index: instance.launch_index,
    }
}

fn volume_view(volume: &FakeVolume) -> VolumeView {
    VolumeView {
        volume_id: volume.id.clone(),
        state: volume.state.clone(),
        availability_zone: volume.az.clone(),
        attached_to: volume.attached_to.clone(),
        tags: volume.tags.clone(),
    }
}

fn not_found(operation: &'static str, code: &str) -> CloudError {
    CloudError::api("ec2", operation, code, "not found")
}

#[async_trait]
impl Volumes for FakeCloud {
    async fn find_volumes(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<VolumeView>> {
        let state = self.lock();
        Ok(state.volumes.iter().filter(|v| v.state != "deleted" && has_tags(&v.tags, tags)).map(volume_view).collect())
    }

    async fn describe_volume(&self, volume_id: &str) -> CloudResult<Option<VolumeView>> {
        let mut state = self.lock();
        let mut view = state.volumes.iter().find(|v| v.id == volume_id && v.state != "deleted").map(volume_view);
        if let Some(view) = view.as_mut().filter(|v| v.attached_to.is_some()) {
            if state.stale_volume_views > 0 {
                state.stale_volume_views -= 1;
                view.state = "available".into();
                view.attached_to = None;
            }
        }
        Ok(view)
    }

    async fn create_volume(&self, request: &NewVolume) -> CloudResult<VolumeView> {
        let mut state = self.lock();
        FakeCloud::count(&mut state, "CreateVolume");
        let id = FakeCloud::next_id(&mut state, "vol");
        let volume = FakeVolume {
            id,
            state: "available".into(),
            az: request.availability_zone.clone(),
            attached_to: None,
            tags: request.tags.clone(),
        };
        state.volumes.push(volume.clone());
        Ok(volume_view(&volume))
    }

    async fn attach(&self, volume_id: &str, instance_id: &str, _device: &str) -> CloudResult<()> {
        let mut state = self.lock();
        FakeCloud::count(&mut state, "AttachVolume");
        let volume = state
            .volumes
            .iter_mut()
            .find(|v| v.id == volume_id)
            .ok_or_else(|| not_found("AttachVolume", "InvalidVolume.NotFound"))?;
        if volume.attached_to.is_some() {
            return Err(CloudError::api("ec2", "AttachVolume", "VolumeInUse", "already attached"));
        }
        volume.attached_to = Some(instance_id.to_string());
        volume.state = "in-use".into();
        Ok(())
    }

    async fn detach(&self, volume_id: &str, _instance_id: &str, force: bool) -> CloudResult<()> {
        let mut state = self.lock();
        FakeCloud::count(&mut state, if force { "DetachVolume(force)" } else { "DetachVolume" });
        let stuck = state.stuck_detaches;
        let forced_free = force && !state.stuck_even_forced;
        if let Some(volume) = state.volumes.iter_mut().find(|v| v.id == volume_id) {
            if stuck && !forced_free {
                return Ok(()); // accepted, as EC2 does, yet it never finishes
            }
            volume.attached_to = None;
            volume.state = "available".into();
        }
        Ok(())
    }

    async fn delete_volume(&self, volume_id: &str) -> CloudResult<()> {
        let mut state = self.lock();
        if let Some(volume) = state.volumes.iter_mut().find(|v| v.id == volume_id) {
            if volume.attached_to.is_some() {
                return Err(CloudError::api("ec2", "DeleteVolume", "VolumeInUse", "attached"));
            }
            volume.state = "deleted".into();
        }
        Ok(())
    }

    async fn find_snapshots(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<SnapshotView>> {
        let state = self.lock();
        Ok(state
            .snapshots
            .iter()
            .filter(|s| has_tags(&s.tags, tags))
            .map(|s| SnapshotView {
                snapshot_id: s.id.clone(),
                volume_id: s.volume_id.clone(),
                state: "completed".into(),
                started_at: s.started_at,
                tags: s.tags.clone(),
            })
            .collect())
    }

    async fn create_snapshot(
        &self,
        volume_id: &str,
        _description: &str,
        tags: &BTreeMap<String, String>,
    ) -> CloudResult<String> {
        let now = self.now();
        let mut state = self.lock();
        FakeCloud::count(&mut state, "CreateSnapshot");
        let id = FakeCloud::next_id(&mut state, "snap");
        state.snapshots.push(FakeSnapshot {
            id: id.clone(),
            volume_id: volume_id.to_string(),
            started_at: now,
            tags: tags.clone(),
        });
        Ok(id)
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> CloudResult<()> {
        let mut state = self.lock();
        state.snapshots.retain(|s| s.id != snapshot_id);
        Ok(())
    }
}

#[async_trait]
impl Commands for FakeCloud {
    async fn online_agents(&self, instance_ids: &[String]) -> CloudResult<Vec<String>> {
        let now = self.now();
        let mut state = self.lock();
        refresh(&mut state, now, self.boot_seconds);
        Ok(state
            .instances
            .iter()
            .filter(|i| {
                instance_ids.contains(&i.id)
                    && i.state == "running"
                    && now >= i.launched_at + Duration::seconds(self.agent_seconds)
            })
            .map(|i| i.id.clone())
            .collect())
    }

    async fn send(&self, request: &CommandRequest) -> CloudResult<String> {
        if request.instance_ids.len() > MAX_INSTANCES_PER_COMMAND {
            // Real SSM answers this with a misleading throttling error.
            return Err(CloudError::api("ssm", "SendCommand", "ThrottlingException", "too many instance ids"));
        }
        let now = self.now();
        let results = request
            .instance_ids
            .iter()
            .map(|id| {
                let (code, stdout, seconds) = (self.behaviour)(request, id);
                (id.clone(), (code, stdout, now + Duration::seconds(seconds)))
            })
            .collect();
        let mut state = self.lock();
        FakeCloud::count(&mut state, "SendCommand");
        let id = FakeCloud::next_id(&mut state, "cmd");
        state.commands.push(FakeCommand {
            id: id.clone(),
            request: request.clone(),
            sent_at: now,
            cancelled: false,
            results,
        });
        Ok(id)
    }

    async fn find_by_comment(&self, instance_id: &str, comment: &str) -> CloudResult<Option<String>> {
        let state = self.lock();
        Ok(state
            .commands
            .iter()
            .find(|c| c.request.comment == comment && c.request.instance_ids.iter().any(|i| i == instance_id))
            .map(|c| c.id.clone()))
    }

    async fn invocations(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<Vec<InvocationView>> {
        let now = self.now();
        let state = self.lock();
        let command =
            state.commands.iter().find(|c| c.id == command_id).ok_or_else(|| {
                CloudError::api("ssm", "ListCommandInvocations", "InvalidCommandId", "no such command")
            })?;
        Ok(command
            .results
            .iter()
            .filter(|(id, _)| instance_ids.contains(id))
            .map(|(id, (code, stdout, finishes_at))| {
                let deadline = command.sent_at + Duration::seconds(i64::from(command.request.timeout_seconds));
                let (status, exit_code) = if command.cancelled {
                    ("Cancelled", None)
                } else if *finishes_at > deadline && now >= deadline {
                    ("TimedOut", Some(-1))
                } else if now < *finishes_at {
                    ("InProgress", None)
                } else if *code == 0 {
                    ("Success", Some(0))
                } else {
                    ("Failed", Some(*code))
                };
                let done = exit_code.is_some() || command.cancelled;
                InvocationView {
                    instance_id: id.clone(),
                    status: status.to_string(),
                    exit_code,
                    stdout: if done { stdout.clone() } else { String::new() },
                    stderr: String::new(),
                    output_uri: None,
                }
            })
            .collect())
    }

    async fn cancel(&self, command_id: &str) -> CloudResult<()> {
        let mut state = self.lock();
        if let Some(command) = state.commands.iter_mut().find(|c| c.id == command_id) {
            command.cancelled = true;
        }
        Ok(())
    }
}

#[async_trait]
impl Ledger for FakeCloud {
    async fn load(&self, job_id: &str) -> CloudResult<Option<Versioned>> {
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
        let mut state = self.lock();
        let key = record_key(&record.job_id);
        let current = state.objects.get(&key).map(|(_, v)| *v);
        if current.map(|v| v.to_string()).as_deref() != Some(version) {
            return Ok(WriteOutcome::Conflict);
        }
        let next = current.unwrap_or_default() + 1;
        let body = serde_json::to_vec(record).map_err(|e| CloudError::Invalid(e.to_string()))?;
        state.objects.insert(key, (body, next));
        Ok(WriteOutcome::Written { version: next.to_string() })
    }

    async fn put_artifact(&self, job_id: &str, name: &str, body: &[u8], _content_type: &str) -> CloudResult<()> {
        self.lock().objects.insert(format!("jobs/{job_id}/{name}"), (body.to_vec(), 1));
        Ok(())
    }

    async fn get(&self, key: &str) -> CloudResult<Option<Vec<u8>>> {
        Ok(self.lock().objects.get(key).map(|(body, _)| body.clone()))
    }

    fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// One fake cloud stands for every account; it records which roles were assumed.
#[async_trait]
impl Accounts for FakeCloud {
    async fn assume(&self, role_arn: &str, external_id: Option<&str>, _job_id: &str) -> CloudResult<Arc<Cloud>> {
        let mut state = self.lock();
        FakeCloud::count(&mut state, "AssumeRole");
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
impl StepQueue for FakeCloud {
    async fn send(&self, message: &StepMessage, delay_seconds: u32) -> CloudResult<()> {
        let now = self.now();
        let mut state = self.lock();
        FakeCloud::count(&mut state, "SendMessage");
        if state.fail_sends > 0 {
            state.fail_sends -= 1;
            return Err(CloudError::api("sqs", "SendMessage", "ServiceUnavailable", "injected fault"));
        }
        state.queue.push_back((now + Duration::seconds(i64::from(delay_seconds)), message.clone()));
        Ok(())
    }
}

impl FakeCloud {
    /// Take the message due soonest and move the clock to it.
    pub fn next_message(&self) -> Option<StepMessage> {
        let (at, message) = {
            let mut state = self.lock();
            let index = (0..state.queue.len()).min_by_key(|i| state.queue[*i].0)?;
            state.queue.remove(index)?
        };
        self.advance_to(at);
        Some(message)
    }

    /// Put a message back as SQS would after its visibility timeout.
    pub fn redeliver_later(&self, message: StepMessage, seconds: i64) {
        let at = self.now() + Duration::seconds(seconds);
        self.lock().queue.push_back((at, message));
    }
}
