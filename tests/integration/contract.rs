//! The contract: one set of port behaviours (`Fleet`, `Volumes`,
//! `Commands`), run against the simulated cloud (testkit's `FakeCloud`) and
//! against the SDK adapters on moto with Flotilla's extension, so the two
//! cannot drift apart. Two test doubles agreeing proves nothing about AWS:
//! each case cites the AWS documentation (or the AWS behaviour on record)
//! it encodes, and where AWS is unkind, both sides must be as unkind.
//!
//! Each case is one `async fn` over a `Side`; `contract!` runs it on both.
//! Times: the fake's are virtual (a wait advances its clock), moto's real.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::Duration;
use flotilla_shared::error::RetryClass;
use flotilla_shared::ports::{Cloud, CommandRequest, LaunchRequest, NewVolume, Ports};
use flotilla_shared::settings::Settings;
use flotilla_shared::spec::Market;
use flotilla_shared::states::{CommandStatus, SnapshotState, VolumeState};
use flotilla_shared::tags;
use flotilla_testkit::fake::{FakeCloud, Latencies};
use flotilla_testkit::sim;

use crate::moto::MotoStack;

/// How long a new command or snapshot stays out of lookups on both sides
/// (`Latencies::lookup_lag` on the fake, `scratch/list-lag` on moto).
const LOOKUP_LAG_SECONDS: i64 = 2;
/// How long a snapshot stays `pending` on both sides.
const SNAPSHOT_SECONDS: i64 = 3;
/// An AMI moto knows (the adapter describes the image before launching).
const IMAGE: &str = "ami-12c6146b";
const STACK: &str = "contract";

/// One of the two clouds the contract runs against.
enum Side {
    Fake(FakeCloud, Box<Ports>),
    Moto(Box<MotoStack>, Box<Ports>),
}

impl Side {
    /// The simulated cloud. A step sleeps for the seconds of its `sleep N`
    /// and exits with its `exit K`, as bash would run it on moto.
    fn fake() -> Side {
        let mut cloud = FakeCloud::new(sim::start_time()).with_behaviour(Arc::new(|request, _| {
            let text = request.lines.join("\n");
            let number_after = |word: &str| {
                text.split(word).nth(1).and_then(|rest| rest.split_whitespace().next()?.parse::<i64>().ok())
            };
            (number_after("exit ").unwrap_or(0) as i32, String::new(), number_after("sleep ").unwrap_or(1))
        }));
        cloud.latencies = Latencies {
            snapshot: (SNAPSHOT_SECONDS, SNAPSHOT_SECONDS),
            lookup_lag: (LOOKUP_LAG_SECONDS, LOOKUP_LAG_SECONDS),
            ..Latencies::quick()
        };
        let ports = cloud.ports(settings());
        Side::Fake(cloud, Box::new(ports))
    }

    async fn moto() -> Side {
        let snapshot = SNAPSHOT_SECONDS.to_string();
        let stack = MotoStack::start_with(1, &[("FLOTILLA_EMU_SNAPSHOT_SECONDS", snapshot.as_str())]).await;
        std::fs::create_dir_all(&stack.scratch).expect("scratch");
        std::fs::write(stack.scratch.join("list-lag"), LOOKUP_LAG_SECONDS.to_string()).expect("list-lag");
        let ports = stack.ports();
        Side::Moto(Box::new(stack), Box::new(ports))
    }

    fn cloud(&self) -> &Cloud {
        match self {
            Side::Fake(_, ports) | Side::Moto(_, ports) => &ports.cloud,
        }
    }

    /// Let `seconds` pass: the fake's clock, or the wall clock.
    async fn wait(&self, seconds: f64) {
        match self {
            Side::Fake(cloud, _) => {
                cloud.advance_to(cloud.now() + Duration::milliseconds((seconds * 1000.0) as i64));
            }
            Side::Moto(..) => tokio::time::sleep(StdDuration::from_secs_f64(seconds)).await,
        }
    }

    /// Look every quarter second (of the side's time) until `found` gives
    /// something, for at most `seconds`.
    async fn until<T, F, Fut>(&self, seconds: f64, what: &str, mut found: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let mut waited = 0.0;
        loop {
            if let Some(value) = found().await {
                return value;
            }
            assert!(waited < seconds, "{}: {what} not within {seconds} s", self.name());
            self.wait(0.25).await;
            waited += 0.25;
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Side::Fake(..) => "fake",
            Side::Moto(..) => "moto",
        }
    }

    /// The agent stops answering (ConnectionLost), or comes back.
    fn set_agent_lost(&self, instance_id: &str, lost: bool) {
        match self {
            Side::Fake(cloud, _) => {
                if lost {
                    cloud.lose_agent(instance_id);
                } else if let Some(i) = cloud.lock().instances.iter_mut().find(|i| i.id == instance_id) {
                    i.agent_lost_at = None;
                }
            }
            Side::Moto(stack, _) => {
                let path = stack.scratch.join("impaired");
                let mut lost_ids: Vec<String> = std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| *l != instance_id && !l.is_empty())
                    .map(str::to_string)
                    .collect();
                if lost {
                    lost_ids.push(instance_id.to_string());
                }
                std::fs::write(&path, lost_ids.join("\n") + "\n").expect("impaired");
            }
        }
    }

    /// The instance stops (as a user or a spot stop would): what runs on
    /// it dies, and no agent answers for it.
    async fn stop_instance(&self, instance_id: &str) {
        match self {
            Side::Fake(cloud, _) => cloud.set_instance_state(instance_id, "stopped"),
            Side::Moto(stack, _) => {
                stack.ec2().stop_instances().instance_ids(instance_id).send().await.expect("stop");
            }
        }
    }

    /// `count` instances launched through the port, each agent Online.
    async fn ready(&self, count: u32, token: &str) -> Vec<String> {
        let launched = self.cloud().fleet.launch(&launch(count, token, "t3.micro")).await.expect("launch");
        let ids: Vec<String> = launched.iter().map(|v| v.instance_id.clone()).collect();
        assert_eq!(ids.len(), count as usize, "{}: {launched:?}", self.name());
        self.until(300.0, "agents Online", || async {
            let online = self.cloud().commands.online_agents(&ids).await.expect("agents");
            (online.len() == ids.len()).then_some(())
        })
        .await;
        ids
    }

    /// The invocation of `command_id` on `instance_id`, once listed.
    async fn invocation(&self, command_id: &str, instance_id: &str) -> Option<flotilla_shared::ports::InvocationView> {
        let views =
            self.cloud().commands.invocations(command_id, &[instance_id.to_string()]).await.expect("invocations");
        views.into_iter().find(|v| v.instance_id == instance_id)
    }

    /// Wait for the invocation to end, and give its status.
    async fn ended(&self, command_id: &str, instance_id: &str, seconds: f64) -> CommandStatus {
        self.until(seconds, "the invocation's end", || async {
            self.invocation(command_id, instance_id).await.filter(|v| v.is_finished()).map(|v| v.status)
        })
        .await
    }
}

fn settings() -> Settings {
    Settings { stack: STACK.to_string(), ..sim::settings() }
}

fn launch(count: u32, token: &str, instance_type: &str) -> LaunchRequest {
    let mut launch_tags: BTreeMap<String, String> =
        tags::scope(STACK).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    launch_tags.insert(tags::JOB_ID.to_string(), "contract".to_string());
    launch_tags.insert(tags::LAUNCH.to_string(), token.to_string());
    LaunchRequest {
        job_id: "contract".to_string(),
        count,
        instance_type: instance_type.to_string(),
        image_id: Some(IMAGE.to_string()),
        launch_template_id: None,
        launch_template_name: None,
        launch_template_version: None,
        subnet_id: None,
        security_group_ids: vec![],
        instance_profile: Some(crate::moto::WORKER_PROFILE.to_string()),
        market: Market::OnDemand,
        tags: launch_tags,
        client_token: token.to_string(),
    }
}

fn new_volume(token: &str, size_gib: u32) -> NewVolume {
    let mut volume_tags: BTreeMap<String, String> =
        tags::scope(STACK).iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    volume_tags.insert(tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string());
    NewVolume {
        availability_zone: "us-east-1a".to_string(),
        size_gib: Some(size_gib),
        volume_type: "gp3".to_string(),
        snapshot_id: None,
        tags: volume_tags,
        client_token: token.to_string(),
    }
}

fn command(instance_ids: &[String], script: &str, timeout_seconds: u32, comment: &str) -> CommandRequest {
    CommandRequest {
        instance_ids: instance_ids.to_vec(),
        lines: vec![script.to_string()],
        timeout_seconds,
        comment: comment.to_string(),
        output_bucket: "flotilla-test-jobs".to_string(),
        output_prefix: "outputs/contract".to_string(),
        log_group: None,
    }
}

/// "If you repeat a request with the same client token and the same
/// parameters, ... returns the same response"; "with the same client token,
/// but change one or more of the parameters, ... returns an
/// IdempotentParameterMismatch error" ("Ensuring idempotency in Amazon EC2
/// API requests", EC2 Developer Guide). For RunInstances and CreateVolume.
async fn client_tokens_replay_and_refuse_other_parameters(side: Side) {
    let cloud = side.cloud();
    let first = cloud.fleet.launch(&launch(1, "contract-l-1", "t3.micro")).await.expect("launch");
    let again = cloud.fleet.launch(&launch(1, "contract-l-1", "t3.micro")).await.expect("replay");
    let ids = |views: &[flotilla_shared::ports::InstanceView]| -> Vec<String> {
        views.iter().map(|v| v.instance_id.clone()).collect()
    };
    assert_eq!(ids(&again), ids(&first), "{}: a replay returns the first launch", side.name());
    let other = cloud.fleet.launch(&launch(1, "contract-l-1", "t3.small")).await.expect_err("other parameters");
    assert_eq!(other.code(), Some("IdempotentParameterMismatch"), "{}: {other}", side.name());
    assert_eq!(other.class(), RetryClass::Permanent);
    let found = side
        .until(30.0, "the launched instance listed", || async {
            let found = cloud.fleet.find_instances(STACK, "contract").await.expect("find");
            (!found.is_empty()).then_some(found)
        })
        .await;
    assert_eq!(ids(&found), ids(&first), "{}: one instance for one token", side.name());

    let volume = cloud.volumes.create_volume(&new_volume("contract-v-1", 1)).await.expect("create");
    let replay = cloud.volumes.create_volume(&new_volume("contract-v-1", 1)).await.expect("replay");
    assert_eq!(replay.volume_id, volume.volume_id, "{}: a replay returns the first volume", side.name());
    let bigger = cloud.volumes.create_volume(&new_volume("contract-v-1", 2)).await.expect_err("other size");
    assert_eq!(bigger.code(), Some("IdempotentParameterMismatch"), "{}: {bigger}", side.name());
    assert_eq!(bigger.class(), RetryClass::Permanent);
}

/// Ids EC2 and SSM do not know: "you will get an error responding that the
/// resource does not exist" ("Eventual consistency in the Amazon EC2 API");
/// CancelCommand and GetCommandInvocation answer InvalidCommandId (SSM API
/// reference). The ports turn what only means "gone" into answers: a
/// describe finds nothing, a delete or cancel has nothing left to do; what
/// cannot go on (invocations of, or a snapshot from, an unknown id) stays a
/// NotFound error.
async fn unknown_ids_are_nothing_or_not_found(side: Side) {
    let cloud = side.cloud();
    assert_eq!(cloud.volumes.describe_volume("vol-0123456789abcdef0").await.expect("describe"), None);
    assert_eq!(cloud.volumes.describe_snapshot("snap-0123456789abcdef0").await.expect("describe"), None);
    cloud.volumes.delete_volume("vol-0123456789abcdef0").await.expect("a gone volume is deleted");
    let unknown = "00000000-0000-4000-8000-000000000000";
    cloud.commands.cancel(unknown, &["i-0123456789abcdef0".to_string()]).await.expect("nothing to cancel");
    let err = cloud.commands.invocations(unknown, &["i-0123456789abcdef0".to_string()]).await.expect_err("unknown");
    assert_eq!(err.class(), RetryClass::NotFound, "{}: {err}", side.name());
    let err = cloud
        .volumes
        .create_snapshot("vol-0123456789abcdef0", "contract", &BTreeMap::new())
        .await
        .expect_err("no such volume");
    assert_eq!(err.class(), RetryClass::NotFound, "{}: {err}", side.name());
}

/// DescribeInstanceInformation returns at most 50 a page (MaxResults 5-50,
/// SSM API reference): 51 agents take a second page, and every one is
/// found. SendCommand takes "up to 50 IDs" (SendCommand API reference);
/// SSM refuses 51, before acting, as ThrottlingException "Rate exceeded"
/// (boto/botocore#993), which is why the reconciler never sends more.
async fn fifty_a_page_and_fifty_a_command(side: Side) {
    let ids = side.ready(51, "contract-l-51").await;
    let mut online = side.cloud().commands.online_agents(&ids).await.expect("agents");
    online.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(online, expected, "{}: every agent of two pages", side.name());
    // Refused, whatever the error says (SSM's, on record, is a misleading
    // ThrottlingException; the reconciler never sends more than 50).
    side.cloud().commands.send(&command(&ids, "true", 60, "contract 51")).await.expect_err("51 ids");
    side.wait(f64::from(LOOKUP_LAG_SECONDS as i32) + 1.0).await;
    let found = side.cloud().commands.find_by_comment(&ids[0], "contract 51").await.expect("lookup");
    assert_eq!(found, None, "{}: a refused send sent nothing", side.name());
}

/// "Delayed: The system attempted to send the command to the managed node
/// but wasn't successful. The system retries again"; an agent back in time
/// runs it. "Delivery Timed Out: The command wasn't delivered to the
/// managed node before the delivery timeout expired" ("Understanding
/// command statuses", Systems Manager User Guide): for a step that never
/// started (its plugin has no ResponseStartDateTime) the port reports
/// DeliveryTimedOut, an instance's failure, never the step's own TimedOut
/// (SSM also says Delivery Timed Out of a step that started and went
/// silent: that one keeps its Status, and is never retried as unstarted).
async fn a_lost_agent_delays_delivery_until_it_returns_or_times_out(side: Side) {
    let ids = side.ready(2, "contract-l-lost").await;
    for id in &ids {
        side.set_agent_lost(id, true);
    }
    let online = side.cloud().commands.online_agents(&ids).await.expect("agents");
    assert!(online.is_empty(), "{}: ConnectionLost agents are not Online: {online:?}", side.name());
    // Accepted, as SSM accepts a command for an agent it knows.
    let sent = side.cloud().commands.send(&command(&ids, "echo delivered", 5, "contract lost")).await.expect("send");
    let delayed = side.until(10.0, "the invocation listed", || async { side.invocation(&sent, &ids[0]).await }).await;
    // SSM says Delayed, or keeps it Pending or In Progress: never ended.
    assert!(
        matches!(delayed.status, CommandStatus::Delayed | CommandStatus::Pending | CommandStatus::InProgress),
        "{}: {delayed:?}",
        side.name()
    );
    assert!(!delayed.is_finished());
    side.set_agent_lost(&ids[0], false);
    assert_eq!(side.ended(&sent, &ids[0], 20.0).await, CommandStatus::Success, "{}: delivered on return", side.name());
    // The other never returns: 30 s of delivery timeout (SSM's least) past
    // the 5 s execution timeout.
    assert_eq!(side.ended(&sent, &ids[1], 60.0).await, CommandStatus::DeliveryTimedOut, "{}", side.name());
}

/// A step that started and whose instance then went silent for good: SSM
/// reports it timed out (Delivery Timed Out in its details, at the
/// command's expiry, as the status guide says of invocations still In
/// Progress), and the port keeps that a step that started, TimedOut, so the
/// reconciler never retries it as one that never ran.
async fn a_started_step_whose_instance_stops_is_never_unstarted(side: Side) {
    let ids = side.ready(1, "contract-l-stop").await;
    let sent = side.cloud().commands.send(&command(&ids, "sleep 600", 5, "contract stop")).await.expect("send");
    side.until(20.0, "the step running", || async {
        side.invocation(&sent, &ids[0]).await.filter(|v| v.status == CommandStatus::InProgress)
    })
    .await;
    side.stop_instance(&ids[0]).await;
    let status = side.ended(&sent, &ids[0], 60.0).await;
    assert_eq!(status, CommandStatus::TimedOut, "{}: started, so never DeliveryTimedOut", side.name());
}

/// CancelCommand "attempts to stop" a command, with no guarantee it stops;
/// an invocation is Cancelling while the agent stops it, then Cancelled, "a
/// terminal state" (SSM API reference and the status guide). Both doubles
/// stop it; the reconciler copes with any end (`read_invocation`), and
/// cleanup waits for the step's own process (the work fence).
async fn a_cancel_ends_a_running_step_as_cancelled(side: Side) {
    let ids = side.ready(1, "contract-l-cancel").await;
    let sent = side.cloud().commands.send(&command(&ids, "sleep 600", 900, "contract cancel")).await.expect("send");
    side.until(20.0, "the step running", || async {
        side.invocation(&sent, &ids[0]).await.filter(|v| v.status == CommandStatus::InProgress)
    })
    .await;
    side.cloud().commands.cancel(&sent, &ids).await.expect("cancel");
    // "There is no guarantee that the command will be terminated" (the
    // API reference): what both doubles promise is only that the step is
    // not reported ended while it runs, and ends. Both stop it.
    let status = side.ended(&sent, &ids[0], 30.0).await;
    assert_eq!(status, CommandStatus::Cancelled, "{}: both doubles stop it", side.name());
}

/// "Snapshots occur asynchronously ... The snapshot is in the pending state
/// until the snapshot is complete" (Amazon EBS User Guide, "Create Amazon
/// EBS snapshots"); a new snapshot may not be listed yet at all (EC2's
/// eventual consistency). Nothing is counted on until it is `completed`.
async fn a_snapshot_is_pending_before_it_completes(side: Side) {
    let cloud = side.cloud();
    let volume = cloud.volumes.create_volume(&new_volume("contract-v-snap", 1)).await.expect("create");
    side.until(30.0, "the volume available", || async {
        let view = cloud.volumes.describe_volume(&volume.volume_id).await.expect("describe")?;
        (view.state == VolumeState::Available).then_some(())
    })
    .await;
    let snapshot = cloud.volumes.create_snapshot(&volume.volume_id, "contract", &BTreeMap::new()).await.expect("snap");
    let first = cloud.volumes.describe_snapshot(&snapshot).await.expect("describe");
    assert!(
        first.as_ref().is_none_or(|s| s.state == SnapshotState::Pending),
        "{}: not completed at once: {first:?}",
        side.name()
    );
    side.until(60.0, "the snapshot completed", || async {
        let view = cloud.volumes.describe_snapshot(&snapshot).await.expect("describe")?;
        (view.state == SnapshotState::Completed).then_some(())
    })
    .await;
}

/// ListCommands, the only lookup by comment, is not read-after-write
/// consistent: SSM documents no such guarantee, and a command just sent is
/// missing from it for a while (the takeover rule's lookup lag,
/// `fence::LOOKUP_LAG_SECONDS`). The lookup finds it once the lag passed,
/// by the comment it was sent with.
async fn a_new_command_is_found_by_its_comment_only_after_the_lag(side: Side) {
    let ids = side.ready(1, "contract-l-lag").await;
    let sent = side.cloud().commands.send(&command(&ids, "true", 60, "contract lag 7")).await.expect("send");
    let at_once = side.cloud().commands.find_by_comment(&ids[0], "contract lag 7").await.expect("lookup");
    assert_eq!(at_once, None, "{}: not listed at once", side.name());
    let found = side
        .until(30.0, "the command listed", || async {
            side.cloud().commands.find_by_comment(&ids[0], "contract lag 7").await.expect("lookup")
        })
        .await;
    assert_eq!(found, sent, "{}", side.name());
    let other = side.cloud().commands.find_by_comment(&ids[0], "contract lag 8").await.expect("lookup");
    assert_eq!(other, None, "{}: only its own comment finds it", side.name());
    // The adapter asks SSM to reach every instance whatever fails: with its
    // default MaxErrors 0, "the system stops sending the command to
    // additional targets" after one error (SendCommand API reference).
    if let Side::Moto(stack, _) = &side {
        let listed = stack.ssm().list_commands().command_id(&sent).send().await.expect("list");
        let command = &listed.commands()[0];
        assert_eq!((command.max_errors(), command.max_concurrency()), (Some("100%"), Some("100%")));
    }
}

/// Each case, on the simulated cloud and on moto.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod on_fake {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Side::fake()).await;
                }
            )*
        }
        mod on_moto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Side::moto().await).await;
                }
            )*
        }
    };
}

contract!(
    client_tokens_replay_and_refuse_other_parameters,
    unknown_ids_are_nothing_or_not_found,
    fifty_a_page_and_fifty_a_command,
    a_lost_agent_delays_delivery_until_it_returns_or_times_out,
    a_started_step_whose_instance_stops_is_never_unstarted,
    a_cancel_ends_a_running_step_as_cancelled,
    a_snapshot_is_pending_before_it_completes,
    a_new_command_is_found_by_its_comment_only_after_the_lag,
);
