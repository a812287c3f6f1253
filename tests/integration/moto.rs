//! A moto server per test (with tools/flotilla_moto.py loaded), the bucket and
//! queues, real SDK clients, and a driver that plays the Lambda event source:
//! it receives from each queue, hands the batch to the real handler, and
//! deletes only the records the handler did not report as failed.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::{Region, SdkConfig};
use aws_lambda_events::event::sqs::SqsEvent;
use aws_sdk_s3::config::Credentials;
use flotilla_shared::aws::{self, Environment};
use flotilla_shared::handlers;
use flotilla_shared::ports::Ports;
use flotilla_shared::record::JobRecord;
use flotilla_shared::settings::Settings;
use serde_json::json;

/// Read at run time: a shared CARGO_TARGET_DIR may hold a binary compiled in
/// another clone, whose compile-time path no longer exists.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(manifest_dir).parent().expect("workspace root").to_path_buf()
}

/// The 100-instance tests take turns: together they starve each other (and
/// the 2-core machine) of time their deadlines assume.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The instance profile tests' launches get by default, as a deployment's would.
pub const WORKER_PROFILE: &str = "flotilla-worker";

/// Where the test stack's steps stream their output.
pub const STEP_LOG_GROUP: &str = "/flotilla/test/steps";

pub struct MotoStack {
    child: Child,
    pub endpoint: String,
    pub config: SdkConfig,
    pub bucket: String,
    pub jobs_queue: String,
    pub reconcile_queue: String,
    /// Where the reconciler sends job notices (the notify function's queue).
    pub notify_queue: String,
    pub scratch: PathBuf,
    python: PathBuf,
}

impl Drop for MotoStack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A free port below Linux's ephemeral range (32768-60999), so no client
/// socket of a test running beside this one can take it before moto binds
/// it; random, so two servers starting at once do not pick the same one.
fn free_port() -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl MotoStack {
    pub async fn start() -> MotoStack {
        MotoStack::start_with_agent_delay(1).await
    }

    /// `agent_seconds`: how long after launch the emulated SSM agent comes Online.
    pub async fn start_with_agent_delay(agent_seconds: u32) -> MotoStack {
        MotoStack::start_with(agent_seconds, &[]).await
    }

    /// With more environment for the server (the extension's FLOTILLA_EMU_* knobs).
    pub async fn start_with(agent_seconds: u32, env: &[(&str, &str)]) -> MotoStack {
        let root = workspace_root();
        let python =
            std::env::var("FLOTILLA_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/python"));
        assert!(
            python.exists(),
            "{} not found: run the tests with `make test`, which installs moto into .venv",
            python.display()
        );
        // A server that lost its port to another exits: start it on another.
        let (child, port, scratch) = 'started: {
            for _ in 0..5 {
                let port = free_port();
                let scratch = std::env::temp_dir().join(format!("flotilla-test-{port}"));
                let mut child = Command::new(&python)
                    .arg(root.join("tools/moto_server.py"))
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .env("FLOTILLA_EMU_SCRATCH", &scratch)
                    .env("FLOTILLA_EMU_AGENT_SECONDS", agent_seconds.to_string())
                    .envs(env.iter().copied())
                    .stdout(Stdio::null())
                    // FLOTILLA_TEST_MOTO_LOG=<dir>: keep each server's log there.
                    .stderr(match std::env::var_os("FLOTILLA_TEST_MOTO_LOG") {
                        Some(dir) => Stdio::from(
                            std::fs::File::create(PathBuf::from(dir).join(format!("moto-{port}.log"))).expect("log"),
                        ),
                        None => Stdio::null(),
                    })
                    .spawn()
                    .expect("start moto server");
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if child.try_wait().expect("moto server status").is_some() {
                        break;
                    }
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        break 'started (child, port, scratch);
                    }
                    assert!(Instant::now() < deadline, "moto server did not start on port {port}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            panic!("moto server exited five times before it listened");
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        // The functions' own loader: their HTTPS client, trust store and retries.
        let config = aws::config_loader()
            .endpoint_url(&endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .load()
            .await;
        let bucket = "flotilla-test-jobs".to_string();
        aws::s3_client(&config).create_bucket().bucket(&bucket).send().await.expect("create bucket");
        let sqs = aws_sdk_sqs::Client::new(&config);
        let create = |name: String| {
            let sqs = sqs.clone();
            async move {
                let dlq = sqs.create_queue().queue_name(format!("{name}-dlq")).send().await.expect("dlq");
                let dlq_arn = format!("arn:aws:sqs:us-east-1:123456789012:{name}-dlq");
                let _ = dlq;
                let redrive = json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5}).to_string();
                sqs.create_queue()
                    .queue_name(&name)
                    .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, "2")
                    .attributes(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy, redrive)
                    .send()
                    .await
                    .expect("queue")
                    .queue_url()
                    .expect("url")
                    .to_string()
            }
        };
        let jobs_queue = create("flotilla-jobs".to_string()).await;
        let reconcile_queue = create("flotilla-reconcile".to_string()).await;
        // FIFO, as template.yaml's (one message group per job).
        let notify_queue = sqs
            .create_queue()
            .queue_name("flotilla-notify.fifo")
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, "2")
            .send()
            .await
            .expect("notify queue")
            .queue_url()
            .expect("url")
            .to_string();
        let stack =
            MotoStack { child, endpoint, config, bucket, jobs_queue, reconcile_queue, notify_queue, scratch, python };
        // The deployment's worker profile: the SSM agent needs one to come Online.
        stack.create_instance_profile(WORKER_PROFILE);
        stack
    }

    pub fn ports(&self) -> Ports {
        let env = Environment {
            bucket: self.bucket.clone(),
            reconcile_queue_url: self.reconcile_queue.clone(),
            reconcile_dlq_url: Some(format!("{}-dlq", self.reconcile_queue)),
            notify_queue_url: Some(self.notify_queue.clone()),
            settings: Settings {
                poll_delay_seconds: 1,
                expiry_grace_minutes: 30,
                worker_instance_profile: Some(WORKER_PROFILE.to_string()),
                pass_budget_seconds: 20,
                agent_timeout_seconds: 120,
                health_check_seconds: 1,
                impaired_timeout_seconds: 3,
                reaper_mark_grace_seconds: 0,
                reaper_dry_run: false,
                // Steps stream their output there (the agent makes the group).
                step_log_group: Some(STEP_LOG_GROUP.to_string()),
                ..Settings::default()
            },
        };
        aws::ports(&self.config, &env)
    }

    /// IAM is not in the workspace's SDK set (one more SDK crate to build for
    /// one test call), so the profile is made with boto3 from the same venv.
    pub fn create_instance_profile(&self, name: &str) {
        let script = "import boto3, sys; boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1', \
                      aws_access_key_id='testing', aws_secret_access_key='testing')\
                      .create_instance_profile(InstanceProfileName=sys.argv[2])";
        let status =
            Command::new(&self.python).args(["-c", script, &self.endpoint, name]).status().expect("run python");
        assert!(status.success(), "create instance profile {name}");
    }

    /// An EventBridge rule on moto's default bus that sends `pattern`'s
    /// events to `queue_url` (boto3 again: no EventBridge SDK crate here).
    pub fn route_events(&self, rule: &str, pattern: &serde_json::Value, queue_url: &str) {
        let queue_name = queue_url.rsplit('/').next().expect("queue name");
        let script = "import boto3, sys; e = boto3.client('events', endpoint_url=sys.argv[1], region_name='us-east-1', \
                      aws_access_key_id='testing', aws_secret_access_key='testing'); \
                      e.put_rule(Name=sys.argv[2], EventPattern=sys.argv[3], State='ENABLED'); \
                      e.put_targets(Rule=sys.argv[2], Targets=[{'Id': 'q', 'Arn': 'arn:aws:sqs:us-east-1:123456789012:' + sys.argv[4]}])";
        let status = Command::new(&self.python)
            .args(["-c", script, &self.endpoint, rule, &pattern.to_string(), queue_name])
            .status()
            .expect("run python");
        assert!(status.success(), "create rule {rule}");
    }

    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.config)
    }

    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.config)
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.config)
    }

    pub async fn submit(&self, body: &str) {
        self.sqs().send_message().queue_url(&self.jobs_queue).message_body(body).send().await.expect("submit");
    }

    pub async fn record(&self, ports: &Ports, job_id: &str) -> Option<JobRecord> {
        ports.ledger.load(job_id).await.expect("load").map(|v| v.record)
    }

    /// Managed instances not terminated: pending, running, stopping, stopped
    /// (a stopped instance still bills its volumes).
    pub async fn running_managed(&self) -> usize {
        let out = self
            .ec2()
            .describe_instances()
            .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:managed-by").values("flotilla").build())
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .build(),
            )
            .send()
            .await
            .expect("describe");
        out.reservations().iter().map(|r| r.instances().len()).sum()
    }

    pub async fn managed_instance_count(&self, job_id: &str) -> usize {
        let out = self
            .ec2()
            .describe_instances()
            .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:job-id").values(job_id).build())
            .send()
            .await
            .expect("describe");
        out.reservations().iter().map(|r| r.instances().len()).sum()
    }

    pub async fn snapshots(&self, job_id: &str) -> Vec<aws_sdk_ec2::types::Snapshot> {
        self.ec2()
            .describe_snapshots()
            .owner_ids("self")
            .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:job-id").values(job_id).build())
            .send()
            .await
            .expect("snapshots")
            .snapshots()
            .to_vec()
    }

    pub async fn live_job_volumes(&self, job_id: &str) -> usize {
        self.ec2()
            .describe_volumes()
            .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:job-id").values(job_id).build())
            .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:volume").values("data").build())
            .send()
            .await
            .expect("volumes")
            .volumes()
            .len()
    }

    /// Deliver every queue's messages once, as the Lambda event source does.
    /// With `duplicate`, each batch is handed to the handler twice at once.
    pub async fn pump_once(&self, ports: &Ports, duplicate: bool) -> usize {
        let mut delivered = self.pump_notices().await;
        for (intake, url) in [(true, self.jobs_queue.clone()), (false, self.reconcile_queue.clone())] {
            let received = self
                .sqs()
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive");
            let messages = received.messages().to_vec();
            if messages.is_empty() {
                continue;
            }
            delivered += messages.len();
            let event = json!({"Records": messages.iter().map(|m| json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                // As Lambda delivers them: SenderId, ApproximateReceiveCount, ...
                "attributes": m.attributes().map(|a| a.iter().map(|(k, v)| (k.as_str().to_string(), json!(v))).collect::<serde_json::Map<_, _>>()).unwrap_or_default(),
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:test",
                "awsRegion": "us-east-1",
            })).collect::<Vec<_>>()});
            let failed = if intake {
                // Boxed: a debug build's handler futures are large, and the
                // test thread's stack is 2 MiB.
                let call = || {
                    Box::pin(handlers::intake_event(
                        ports,
                        lambda_runtime::LambdaEvent::new(event.clone(), Default::default()),
                    ))
                };
                if duplicate {
                    // Each copy fails or succeeds on its own, as two SQS receipts do.
                    let (a, b) = tokio::join!(call(), call());
                    let mut failed = failures(&a.expect("intake a"));
                    failed.extend(failures(&b.expect("intake b")));
                    failed
                } else {
                    failures(&call().await.expect("intake"))
                }
            } else {
                let batch: SqsEvent = serde_json::from_value(event.clone()).expect("sqs event");
                let failed_in = |response| failures(&serde_json::to_value(response).expect("json"));
                let budget = chrono::Duration::seconds(20);
                if duplicate {
                    let (a, b) = tokio::join!(
                        Box::pin(handlers::reconcile_batch(ports, batch.clone(), budget, None)),
                        Box::pin(handlers::reconcile_batch(ports, batch, budget, None))
                    );
                    let mut failed = failed_in(a);
                    failed.extend(failed_in(b));
                    failed
                } else {
                    failed_in(Box::pin(handlers::reconcile_batch(ports, batch, budget, None)).await)
                }
            };
            for message in messages {
                if !failed.contains(&message.message_id().unwrap_or_default().to_string()) {
                    self.sqs()
                        .delete_message()
                        .queue_url(&url)
                        .receipt_handle(message.receipt_handle().unwrap_or_default())
                        .send()
                        .await
                        .expect("delete");
                }
            }
        }
        delivered
    }

    /// The notify function's part: what the notify queue holds onto moto's
    /// EventBridge (and Step Functions), failures left for redelivery.
    pub async fn pump_notices(&self) -> usize {
        let messages = self.receive_notices().await;
        if messages.is_empty() {
            return 0;
        }
        let batch = notify_event(&messages);
        let notifier = notify::Notifier::new(&self.config, "default", &self.jobs_queue);
        let failed = failures(&serde_json::to_value(notifier.handle(batch, None).await).expect("json"));
        for message in &messages {
            if !failed.contains(&message.message_id().unwrap_or_default().to_string()) {
                let receipt = message.receipt_handle().unwrap_or_default();
                self.sqs()
                    .delete_message()
                    .queue_url(&self.notify_queue)
                    .receipt_handle(receipt)
                    .send()
                    .await
                    .expect("delete");
            }
        }
        messages.len()
    }

    /// Up to ten messages of the notify queue, with their message groups.
    pub async fn receive_notices(&self) -> Vec<aws_sdk_sqs::types::Message> {
        let received = self
            .sqs()
            .receive_message()
            .queue_url(&self.notify_queue)
            .max_number_of_messages(10)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .expect("receive notices");
        received.messages().to_vec()
    }

    /// A volume with an ext4 filesystem, as a user's own volume or the source
    /// of a snapshot they name has (a job never formats those): formatted on
    /// a helper instance, not Flotilla's, which is then terminated.
    pub async fn formatted_volume(&self, size_gib: i32) -> String {
        let (ec2, ssm) = (self.ec2(), self.ssm());
        let volume = ec2.create_volume().availability_zone("us-east-1a").size(size_gib).send().await.expect("volume");
        let volume = volume.volume_id().expect("id").to_string();
        let launched = ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .placement(aws_sdk_ec2::types::Placement::builder().availability_zone("us-east-1a").build())
            .iam_instance_profile(
                aws_sdk_ec2::types::IamInstanceProfileSpecification::builder().name(WORKER_PROFILE).build(),
            )
            .send()
            .await
            .expect("helper instance");
        let helper = launched.instances()[0].instance_id().expect("id").to_string();
        ec2.attach_volume().volume_id(&volume).instance_id(&helper).device("/dev/sdf").send().await.expect("attach");
        let script = format!(
            "mkfs -t ext4 -q \"$(readlink -f /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{})\"",
            volume.replace('-', "")
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            assert!(Instant::now() < deadline, "formatting {volume} did not finish");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Ok(sent) = ssm
                .send_command()
                .document_name("AWS-RunShellScript")
                .instance_ids(&helper)
                .parameters("commands", vec![script.clone()])
                .send()
                .await
            else {
                continue; // the agent is not Online yet
            };
            let command_id = sent.command().and_then(|c| c.command_id()).expect("id").to_string();
            break loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let Ok(out) = ssm.get_command_invocation().command_id(&command_id).instance_id(&helper).send().await
                else {
                    continue;
                };
                match out.status().map(|s| s.as_str().to_string()).unwrap_or_default().as_str() {
                    "Pending" | "InProgress" | "Delayed" => assert!(Instant::now() < deadline, "mkfs hangs"),
                    status => break format!("{status}: {}", out.standard_error_content().unwrap_or_default()),
                }
            };
        };
        assert!(status.starts_with("Success"), "mkfs on {volume}: {status}");
        ec2.detach_volume().volume_id(&volume).send().await.expect("detach");
        ec2.terminate_instances().instance_ids(&helper).send().await.expect("terminate helper");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = ec2.describe_volumes().volume_ids(&volume).send().await.expect("describe");
            if out.volumes()[0].state().map(|s| s.as_str()) == Some("available") {
                return volume;
            }
            assert!(Instant::now() < deadline, "{volume} never became available");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every volume with its state and attachments, and every instance's
    /// block device mapping: what a stuck teardown needs explained.
    pub async fn volume_attachments(&self) -> String {
        let ec2 = self.ec2();
        let mut out = String::new();
        for volume in ec2.describe_volumes().send().await.expect("volumes").volumes() {
            let attachments: Vec<_> = volume
                .attachments()
                .iter()
                .map(|a| format!("{:?}@{:?}:{:?}", a.instance_id(), a.device(), a.state()))
                .collect();
            out += &format!("\n  {:?} {:?} {attachments:?}", volume.volume_id(), volume.state());
        }
        for reservation in ec2.describe_instances().send().await.expect("instances").reservations() {
            for instance in reservation.instances() {
                let devices: Vec<_> = instance
                    .block_device_mappings()
                    .iter()
                    .map(|m| format!("{:?}={:?}", m.device_name(), m.ebs().and_then(|e| e.volume_id())))
                    .collect();
                out += &format!(
                    "\n  {:?} {:?} {devices:?}",
                    instance.instance_id(),
                    instance.state().and_then(|s| s.name())
                );
            }
        }
        out
    }

    /// Pump until the job is terminal.
    pub async fn run_to_end(&self, ports: &Ports, job_id: &str, duplicate: bool, timeout: Duration) -> JobRecord {
        let deadline = Instant::now() + timeout;
        loop {
            let delivered = self.pump_once(ports, duplicate).await;
            if let Some(record) = self.record(ports, job_id).await {
                if record.state.is_terminal() {
                    // Nothing may stay in flight after the end.
                    self.pump_once(ports, duplicate).await;
                    return record;
                }
            }
            if Instant::now() >= deadline {
                let record = self.record(ports, job_id).await;
                panic!(
                    "job {job_id} not terminal after {timeout:?}: {:?}\nreport:\n{}\nin the emulator: {}",
                    record.as_ref().map(|r| (r.state, &r.reason)),
                    record.as_ref().map(flotilla_shared::report::render).unwrap_or_default(),
                    self.volume_attachments().await
                );
            }
            if delivered == 0 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    }
}

/// Notify-queue messages as Lambda hands them to the notify function.
pub fn notify_event(messages: &[aws_sdk_sqs::types::Message]) -> SqsEvent {
    let event = json!({"Records": messages.iter().map(|m| json!({
        "messageId": m.message_id(), "receiptHandle": m.receipt_handle(), "body": m.body(),
        "attributes": {}, "messageAttributes": {}, "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:flotilla-notify", "awsRegion": "us-east-1",
    })).collect::<Vec<_>>()});
    serde_json::from_value(event).expect("sqs event")
}

pub fn failures(response: &serde_json::Value) -> Vec<String> {
    response["batchItemFailures"]
        .as_array()
        .map(|items| items.iter().filter_map(|i| i["itemIdentifier"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// A small valid job; tests adjust it.
pub fn job(id: &str) -> serde_json::Value {
    json!({
        "id": id,
        "fleet": {"count": 2},
        "instance_types": ["t3.micro"],
        "image": "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        "tags": {"team": "tests"},
        "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data", "snapshot": "on-success", "retention": {"keep_last": 2}}],
        "env": {"WHO": "it's me; $(not run)"},
        "setup": {"commands": [["echo", "setup"]], "timeout_seconds": 30},
        "run": {"script": "echo \"run $FLOTILLA_SHARD_INDEX/$FLOTILLA_SHARD_COUNT $WHO\"", "timeout_seconds": 30},
        "before_unmount": {"commands": [["echo", "hook"]], "timeout_seconds": 30},
        "deadline_minutes": 10
    })
}
