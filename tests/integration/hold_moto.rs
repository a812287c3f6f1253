//! A failed shard held for debugging (`debug_hold_minutes`), through the
//! real SDK on moto with real block devices: the job FAILS at once and
//! announces the hold; the instance and its attached volume stay, the
//! failure's snapshot taken first; the reaper spares them until the hold
//! ends, then removes them, snapshotting the volume again first (the person
//! debugging may have changed it); `flotilla release` ends a hold early.

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use flotilla_shared::ports::Clock;
use flotilla_shared::reaper::{self, ReaperSettings};
use flotilla_shared::record::{JobRecord, JobState};
use flotilla_shared::tags;
use serde_json::json;

use crate::moto::{job, MotoStack};

const LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// The reaper's clock, moved to a moment of the hold.
struct Shifted(Duration);

impl Clock for Shifted {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.0
    }
}

/// One reaper run at `at` (the mark needs no grace here: the next run acts).
async fn reap_at(stack: &MotoStack, at: DateTime<Utc>) {
    let mut ports = stack.ports();
    ports.clock = Box::new(Shifted(at - Utc::now()));
    let settings = ReaperSettings { mark_grace: Duration::zero(), stall_grace: Duration::minutes(30) };
    reaper::run(&ports, &settings, false).await.expect("the reaper runs");
}

fn held_spec(id: &str) -> serde_json::Value {
    let mut spec = job(id);
    spec["fleet"] = json!({"count": 1});
    spec["volumes"][0]["snapshot"] = json!("always");
    spec["run"] =
        json!({"script": "echo half-done > /data/progress; sync; echo it broke; exit 3", "timeout_seconds": 60});
    spec["debug_hold_minutes"] = json!(30);
    spec
}

async fn instance(stack: &MotoStack, id: &str) -> aws_sdk_ec2::types::Instance {
    let out = stack.ec2().describe_instances().instance_ids(id).send().await.expect("describe instances");
    out.reservations()[0].instances()[0].clone()
}

fn state(instance: &aws_sdk_ec2::types::Instance) -> String {
    instance.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default()
}

fn tag(instance: &aws_sdk_ec2::types::Instance, key: &str) -> Option<String> {
    instance.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value().map(str::to_string))
}

async fn volume(stack: &MotoStack, id: &str) -> Option<aws_sdk_ec2::types::Volume> {
    let out = stack.ec2().describe_volumes().volume_ids(id).send().await.ok()?;
    out.volumes().first().cloned()
}

async fn failed_and_held(stack: &MotoStack, record: &JobRecord) -> flotilla_shared::record::DebugHold {
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    let hold = record.hold.clone().expect("the failed shard is held");
    assert!(hold.tagged, "expires-at moved before the job ended");
    assert!(record.announced.as_ref().is_some_and(|a| a.hold), "the hold is announced");
    let held = instance(stack, &hold.instance_id).await;
    assert_eq!(state(&held), "running");
    assert_eq!(tag(&held, tags::EXPIRES_AT), Some(hold.until.to_rfc3339_opts(SecondsFormat::Secs, true)));
    let volume_id = hold.volume_ids.first().expect("its volume");
    let attached = volume(stack, volume_id).await.expect("the volume stays");
    assert_eq!(attached.attachments().first().and_then(|a| a.instance_id()), Some(hold.instance_id.as_str()));
    // The failure's snapshot came first, before the hold began.
    let snapshots = stack.snapshots(&record.job_id).await;
    assert!(
        snapshots.iter().any(|s| s.volume_id() == Some(volume_id.as_str())
            && s.tags().iter().any(|t| t.key() == Some(tags::KIND) && t.value() == Some("failed-attempt"))),
        "the failure's snapshot: {snapshots:?} {:?}",
        record.shards[0].attempts[0].volumes
    );
    let report = flotilla_shared::report::render(record);
    assert!(report.contains(&format!("aws ssm start-session --target {}", hold.instance_id)), "{report}");
    hold
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shard_held_for_debugging_is_reaped_after_its_hold_not_before() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    for id in ["held-a", "held-b"] {
        stack.submit(&held_spec(id).to_string()).await;
    }
    let a = stack.run_to_end(&ports, "held-a", false, LIMIT).await;
    let b = stack.run_to_end(&ports, "held-b", false, LIMIT).await;
    let hold_a = failed_and_held(&stack, &a).await;
    let hold_b = failed_and_held(&stack, &b).await;

    // `flotilla release` ends b's hold; a's goes on.
    let ledger =
        flotilla_shared::aws::s3::S3Ledger::new(flotilla_shared::aws::s3_client(&stack.config), stack.bucket.clone());
    let released = flotilla_cli::release::release(&ledger, "held-b", Utc::now()).await.expect("release");
    assert!(matches!(released, flotilla_cli::release::Released::Now(_)));

    // A minute before a's hold ends, twice (a mark would act on the second).
    let before = hold_a.until - Duration::minutes(1);
    for _ in 0..2 {
        reap_at(&stack, before).await;
    }
    let a_now = instance(&stack, &hold_a.instance_id).await;
    assert_eq!(state(&a_now), "running", "reaped before its hold ended");
    assert_eq!(tag(&a_now, tags::ORPHANED_AT), None, "marked before its hold ended");
    assert!(volume(&stack, &hold_a.volume_ids[0]).await.is_some());
    let b_now = instance(&stack, &hold_b.instance_id).await;
    assert_ne!(state(&b_now), "running", "the released hold is reaped");

    // A minute after a's hold: marked, terminated, then its volume is
    // snapshotted again and deleted once that snapshot completes.
    let after = hold_a.until + Duration::minutes(1);
    let volume_id = hold_a.volume_ids[0].clone();
    let mut rounds = 0;
    while volume(&stack, &volume_id).await.is_some_and(|v| v.state().is_none_or(|s| s.as_str() != "deleted")) {
        rounds += 1;
        assert!(rounds < 30, "the held volume is never removed");
        reap_at(&stack, after).await;
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    assert_ne!(state(&instance(&stack, &hold_a.instance_id).await), "running");
    let rescued = stack.snapshots("held-a").await;
    let again: Vec<_> = rescued
        .iter()
        .filter(|s| s.volume_id() == Some(volume_id.as_str()))
        .filter(|s| s.tags().iter().any(|t| t.key() == Some(tags::REAPED) && t.value() == Some("true")))
        .collect();
    assert_eq!(again.len(), 1, "one snapshot taken after the hold: {rescued:?}");
}
