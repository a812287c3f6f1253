//! Every lifecycle path through the real SDK against moto (with the extension):
//! success, a failing command, a timeout, the deadline, a cancel, and
//! duplicate delivery of every step. After each: no managed instance runs,
//! and snapshots exist exactly where the policy says.

use std::time::Duration;

use flotilla_shared::record::{JobState, Phase};

use crate::moto::{job, MotoStack};

// Generous: a loaded 2-core CI machine runs several moto servers at once.
const LIMIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_runs_every_phase_snapshots_and_cleans_up() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    stack.submit(&job("ok-1").to_string()).await;
    let record = stack.run_to_end(&ports, "ok-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.instances.len(), 2);
    let phases: Vec<Phase> = record.steps.iter().map(|s| s.phase).collect();
    assert_eq!(phases, vec![Phase::Mount, Phase::Setup, Phase::Run, Phase::BeforeUnmount, Phase::Unmount]);
    let run = record.step(Phase::Run).expect("run step");
    for invocation in &run.invocations {
        assert_eq!(invocation.exit_code, Some(0));
        // The env value reached the script verbatim: quoted, not executed.
        assert!(
            invocation.output_tail.iter().any(|l| l.ends_with("/2 it's me; $(not run)")),
            "{:?}",
            invocation.output_tail
        );
        assert!(
            invocation.output_uri.as_deref().is_some_and(|u| u.contains("/outputs/ok-1/run/")),
            "{:?}",
            invocation.output_uri
        );
    }
    let shards: Vec<String> =
        run.invocations.iter().flat_map(|i| i.output_tail.clone()).filter(|l| l.starts_with("run ")).collect();
    assert!(
        shards.iter().any(|l| l.starts_with("run 0/2")) && shards.iter().any(|l| l.starts_with("run 1/2")),
        "{shards:?}"
    );

    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(record.snapshots.len(), 2, "one snapshot per instance volume");
    let snapshots = stack.snapshots("ok-1").await;
    assert_eq!(snapshots.len(), 2);
    for snapshot in &snapshots {
        let description = snapshot.description().unwrap_or_default();
        assert!(description.starts_with("flotilla job ok-1 volume data shard"), "{description}");
        assert!(snapshot.tags().iter().any(|t| t.key() == Some("flotilla:managed-by")));
    }
    assert_eq!(stack.live_job_volumes("ok-1").await, 0, "job volumes are deleted after their snapshot");
    // The report is written beside the record.
    let report = flotilla_shared::ports::Ledger::get(ports.ledger.as_ref(), "jobs/ok-1/report.txt")
        .await
        .expect("get")
        .expect("report");
    assert!(String::from_utf8_lossy(&report).contains("job ok-1: SUCCEEDED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_fails_the_job_still_unmounts_and_skips_on_success_snapshots() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("fail-1");
    spec["run"] = serde_json::json!({"script": "echo about to fail; exit 3", "timeout_seconds": 30});
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "fail-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Failed);
    assert!(
        record.reason.starts_with("run failed on 2/2 instance(s)") && record.reason.ends_with("exited 3"),
        "{}",
        record.reason
    );
    let run = record.step(Phase::Run).expect("run");
    assert!(run
        .invocations
        .iter()
        .all(|i| i.exit_code == Some(3) && i.output_tail.contains(&"about to fail".to_string())));
    // Cleanup phases still ran.
    assert!(record.step(Phase::BeforeUnmount).is_some_and(|s| s.succeeded == Some(true)));
    assert!(record.step(Phase::Unmount).is_some_and(|s| s.succeeded == Some(true)));
    assert_eq!(stack.running_managed().await, 0);
    assert!(stack.snapshots("fail-1").await.is_empty(), "on-success policy: no snapshot of a failed job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_command_fails_and_always_policy_still_snapshots() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("slow-1");
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["run"] = serde_json::json!({"script": "echo started; sleep 30", "timeout_seconds": 2});
    spec["volumes"][0]["snapshot"] = serde_json::json!("always");
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "slow-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Failed);
    assert!(
        record.reason.contains("run failed on 1/1") && record.reason.contains("timed out after 2 s"),
        "{}",
        record.reason
    );
    assert_eq!(record.step(Phase::Run).map(|s| s.invocations[0].status.as_str()), Some("TimedOut"));
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.snapshots("slow-1").await.len(), 1, "always policy snapshots a failed job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_stops_a_long_run_and_tears_down() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("late-1");
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["run"] = serde_json::json!({"script": "sleep 120", "timeout_seconds": 300});
    stack.submit(&spec.to_string()).await;
    // Run until the command is in flight, then move the deadline into the past.
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        stack.pump_once(&ports, false).await;
        let record = stack.record(&ports, "late-1").await;
        if record.as_ref().is_some_and(|r| r.step(Phase::Run).is_some()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "run never dispatched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Steps write concurrently; retry the compare-and-swap like any writer.
    loop {
        let loaded =
            flotilla_shared::ports::Ledger::load(ports.ledger.as_ref(), "late-1").await.expect("load").expect("record");
        let mut record = loaded.record.clone();
        record.deadline_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
        let outcome = flotilla_shared::ports::Ledger::replace(ports.ledger.as_ref(), &record, &loaded.version)
            .await
            .expect("replace");
        if matches!(outcome, flotilla_shared::ports::WriteOutcome::Written { .. }) {
            break;
        }
    }

    let record = stack.run_to_end(&ports, "late-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.starts_with("deadline of 10 min passed while RUNNING"), "{}", record.reason);
    assert_eq!(record.step(Phase::Run).and_then(|s| s.succeeded), Some(false));
    assert!(record.step(Phase::Unmount).is_some(), "cleanup ran after the deadline");
    assert_eq!(stack.running_managed().await, 0);
    assert!(stack.snapshots("late-1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_cancels_the_command_and_tears_down() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("cancel-1");
    spec["run"] = serde_json::json!({"script": "sleep 120", "timeout_seconds": 300});
    stack.submit(&spec.to_string()).await;
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        stack.pump_once(&ports, false).await;
        if stack.record(&ports, "cancel-1").await.is_some_and(|r| r.step(Phase::Run).is_some()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "run never dispatched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.submit(r#"{"cancel": "cancel-1"}"#).await;
    let record = stack.run_to_end(&ports, "cancel-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Cancelled);
    assert!(record.reason.starts_with("cancelled by request while RUNNING"), "{}", record.reason);
    let run = record.step(Phase::Run).expect("run");
    assert_eq!(run.succeeded, Some(false));
    let status = stack.ssm().list_command_invocations().command_id(&run.command_ids[0]).send().await.expect("list");
    assert!(
        status.command_invocations().iter().all(|i| i.status().map(|s| s.as_str()) == Some("Cancelled")),
        "{:?}",
        status.command_invocations()
    );
    assert_eq!(stack.running_managed().await, 0);
    assert!(stack.snapshots("cancel-1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_survives_duplicate_concurrent_delivery() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    stack.submit(&job("dup-1").to_string()).await;
    let record = stack.run_to_end(&ports, "dup-1", true, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(stack.managed_instance_count("dup-1").await, 2, "one fleet, not two");
    for phase in [Phase::Mount, Phase::Setup, Phase::Run, Phase::BeforeUnmount, Phase::Unmount] {
        let comment = format!("flotilla dup-1 {} 0", phase.as_str());
        let commands = stack.ssm().list_commands().send().await.expect("list");
        let live: Vec<_> = commands
            .commands()
            .iter()
            .filter(|c| c.comment() == Some(comment.as_str()))
            .filter(|c| {
                // A racing duplicate may send and then cancel its own copy.
                let id = c.command_id().unwrap_or_default();
                record.steps.iter().any(|s| s.command_ids.iter().any(|k| k == id))
            })
            .collect();
        assert_eq!(live.len(), 1, "{phase:?} recorded exactly once");
    }
    assert_eq!(record.instances.len(), 2, "the whole fleet recorded, not what a racing lookup saw");
    assert_eq!(stack.snapshots("dup-1").await.len(), 2, "one snapshot per volume");
    assert_eq!(stack.running_managed().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_arn_job_runs_with_sts_temporary_credentials() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("role-1");
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["role_arn"] = serde_json::json!("arn:aws:iam::123456789012:role/flotilla-target");
    spec["external_id"] = serde_json::json!("tenant-7");
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "role-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(stack.running_managed().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_template_spot_and_every_volume_source() {
    use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let ec2 = stack.ec2();
    ec2.create_launch_template()
        .launch_template_name("flotilla-workers")
        .launch_template_data(
            RequestLaunchTemplateData::builder().image_id("ami-12c6146b").instance_type(InstanceType::T3Micro).build(),
        )
        .send()
        .await
        .expect("launch template");
    let existing = ec2.create_volume().availability_zone("us-east-1a").size(2).send().await.expect("volume");
    let existing = existing.volume_id().expect("id").to_string();
    let seed = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.expect("seed");
    let seed_snapshot = ec2.create_snapshot().volume_id(seed.volume_id().expect("id")).send().await.expect("snapshot");
    let seed_snapshot = seed_snapshot.snapshot_id().expect("id").to_string();

    let mut spec = job("sources-1");
    spec.as_object_mut().expect("object").remove("image");
    spec["launch_template"] = serde_json::json!({"name": "flotilla-workers", "version": "$Latest"});
    spec["market"] = serde_json::json!("spot");
    spec["volumes"] = serde_json::json!([
        {"name": "keep", "source": {"volume_id": existing}, "device": "/dev/sdg", "mount_point": "/keep", "snapshot": "always", "retention": {"keep_last": 3}},
        {"name": "data", "source": {"snapshot_id": seed_snapshot}, "device": "/dev/sdf", "mount_point": "/data", "snapshot": "never"}
    ]);
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "sources-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);

    let instances = ec2
        .describe_instances()
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:job-id").values("sources-1").build())
        .send()
        .await
        .expect("describe");
    let images: Vec<_> = instances
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| i.image_id().unwrap_or_default().to_string())
        .collect();
    assert_eq!(images, vec!["ami-12c6146b".to_string(); 2], "launched from the template");
    // The user's volume went to shard 0 only, was detached, and is never deleted.
    let kept: Vec<_> = record.volumes.iter().filter(|v| v.name == "keep").collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].instance_id, record.instances[0].instance_id);
    let view = ec2.describe_volumes().volume_ids(&existing).send().await.expect("volume");
    assert_eq!(view.volumes()[0].state().map(|s| s.as_str()), Some("available"));
    // Restored volumes were ours: deleted, and "never" means no snapshot of them.
    assert_eq!(stack.live_job_volumes("sources-1").await, 0);
    let snapshots = stack.snapshots("sources-1").await;
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].volume_id(), Some(existing.as_str()));
    assert_eq!(stack.running_managed().await, 0);
}
