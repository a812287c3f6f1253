//! Every lifecycle path through the real SDK against moto (with the extension):
//! success, a failing command, a timeout, the deadline, a cancel, duplicate
//! concurrent delivery, and recovery (an instance killed, a spot warning,
//! capacity refused, a cancel while snapshotting, a 100-instance job). After
//! each: no managed instance runs, and snapshots exist exactly where the
//! policy says.

use std::time::Duration;

use flotilla_shared::record::{EndCause, JobRecord, JobState, Phase, Stage};

use crate::moto::{job, MotoStack};

// Generous: a loaded 2-core CI machine runs several moto servers at once.
const LIMIT: Duration = Duration::from_secs(180);

fn phases(record: &JobRecord, shard: usize) -> Vec<Phase> {
    record.shards[shard].current().map(|a| a.phases_ran()).unwrap_or_default()
}

fn run_of(record: &JobRecord, shard: usize) -> flotilla_shared::record::PhaseRun {
    record.shards[shard].current().and_then(|a| a.phase(Phase::Run)).cloned().expect("a run phase")
}

/// A shard's output tail, kept beside the record.
pub(crate) async fn output(stack: &MotoStack, job_id: &str, shard: u32, attempt: u32, phase: Phase) -> Vec<String> {
    let name = flotilla_shared::reconcile::decide::output_name(shard, attempt, phase);
    let ports = stack.ports();
    let body = ports.ledger.get(&format!("jobs/{job_id}/{name}")).await.expect("get").unwrap_or_default();
    String::from_utf8_lossy(&body).lines().map(str::to_string).collect()
}

/// Pump until `ready` holds for the record.
pub(crate) async fn pump_until(stack: &MotoStack, job_id: &str, ready: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let ports = stack.ports();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        stack.pump_once(&ports, false).await;
        if let Some(record) = stack.record(&ports, job_id).await {
            if ready(&record) {
                return record;
            }
            assert!(!record.state.is_terminal(), "{job_id} ended early: {}", record.reason);
        }
        assert!(std::time::Instant::now() < deadline, "{job_id}: condition never held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Make the job's run wait for the test's `go` file before `then`, so what
/// the test does mid-run lands mid-run however slow the machine is.
pub(crate) fn gate_run(stack: &MotoStack, spec: &mut serde_json::Value, then: &str) -> std::path::PathBuf {
    let go = stack.scratch.join("go");
    spec["env"]["GO"] = serde_json::json!(go.display().to_string());
    spec["run"] = serde_json::json!({"script": format!("until [ -e \"$GO\" ]; do sleep 0.2; done; {then}"), "timeout_seconds": 120});
    go
}

pub(crate) fn open_gate(stack: &MotoStack, go: &std::path::Path) {
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(go, "").expect("go");
}

pub(crate) fn all_running(record: &JobRecord) -> bool {
    record.shards.iter().all(|s| {
        s.current()
            .and_then(|a| a.phase(Phase::Run))
            .and_then(|p| record.commands.get(&p.batch))
            .is_some_and(|b| b.command_id.is_some())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_runs_every_phase_snapshots_and_cleans_up() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    // A secret by reference: read on the instance, never in the record or the command.
    stack
        .ssm()
        .put_parameter()
        .name("/flotilla/flotilla/token")
        .value("s3cret-value")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .expect("parameter");
    let mut spec = job("ok-1");
    spec["env"]["TOKEN"] = serde_json::json!({"from_ssm": "/flotilla/flotilla/token"});
    spec["run"]["script"] = serde_json::json!(format!(
        // Compared by hash, so the spec itself never holds the value.
        "{}; [ \"$(printf %s \"$TOKEN\" | sha256sum | cut -c1-16)\" = bf496b76b91b8282 ] && echo token-arrived",
        spec["run"]["script"].as_str().expect("script")
    ));
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "ok-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.shards.len(), 2);
    let mut seen = Vec::new();
    for shard in 0..2 {
        assert_eq!(
            phases(&record, shard),
            vec![Phase::Mount, Phase::Setup, Phase::Run, Phase::BeforeUnmount, Phase::Unmount]
        );
        assert_eq!(record.shards[shard].current().and_then(|a| a.end.as_ref()).and_then(|e| e.exit_code), Some(0));
        let tail = output(&stack, "ok-1", shard as u32, 1, Phase::Run).await;
        // The env value reached the script verbatim: quoted, not executed.
        assert!(tail.iter().any(|l| l.ends_with("/2 it's me; $(not run)")), "{tail:?}");
        assert!(tail.iter().any(|l| l == "token-arrived"), "{tail:?}");
        seen.extend(tail);
    }
    assert!(seen.iter().any(|l| l.starts_with("run 0/2")) && seen.iter().any(|l| l.starts_with("run 1/2")), "{seen:?}");

    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(record.snapshots().len(), 2, "one snapshot per instance volume");
    let snapshots = stack.snapshots("ok-1").await;
    assert_eq!(snapshots.len(), 2);
    for snapshot in &snapshots {
        let description = snapshot.description().unwrap_or_default();
        assert!(description.starts_with("flotilla job ok-1 volume data shard"), "{description}");
        assert!(snapshot.tags().iter().any(|t| t.key() == Some("flotilla:managed-by")));
    }
    assert_eq!(stack.live_job_volumes("ok-1").await, 0, "job volumes are deleted after their snapshot");
    let report = ports.ledger.get("jobs/ok-1/report.txt").await.expect("get").expect("report");
    assert!(String::from_utf8_lossy(&report).contains("job ok-1: SUCCEEDED"));
    assert!(ports.ledger.list_active().await.expect("list").is_empty(), "no longer active");
    let stored = ports.ledger.get("jobs/ok-1/job.json").await.expect("get").expect("record");
    assert!(!String::from_utf8_lossy(&stored).contains("s3cret"), "the secret is not in the record");
    let commands = stack.ssm().list_commands().send().await.expect("list commands");
    for command in commands.commands() {
        let parameters = format!("{:?}", command.parameters());
        assert!(!parameters.contains("s3cret"), "the secret is not in SendCommand: {parameters}");
    }
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
    assert!(record.reason.contains("CommandFailed: run exited 3 on i-"), "{}", record.reason);
    for shard in 0..2 {
        let attempt = record.shards[shard].current().expect("attempt");
        // The first failure stops the job; a shard still running is cancelled.
        assert!(matches!(attempt.end.as_ref().map(|e| e.cause), Some(EndCause::CommandFailed | EndCause::Aborted)));
        // Cleanup phases still ran.
        assert!(attempt.completed_phases.contains(&Phase::BeforeUnmount), "{:?}", attempt.phases_ran());
        assert!(attempt.completed_phases.contains(&Phase::Unmount));
    }
    let failed = record
        .shards
        .iter()
        .find(|s| s.attempts[0].end.as_ref().is_some_and(|e| e.cause == EndCause::CommandFailed))
        .expect("a failed shard");
    let tail = output(&stack, "fail-1", failed.index, 1, Phase::Run).await;
    assert!(tail.contains(&"about to fail".to_string()), "{tail:?}");
    assert_eq!(stack.running_managed().await, 0);
    assert!(stack.snapshots("fail-1").await.is_empty(), "on-success policy: no snapshot of a failed shard");
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
    assert!(record.reason.contains("TimedOut: run timed out after 2 s"), "{}", record.reason);
    assert_eq!(run_of(&record, 0).status.as_ref().map(|s| s.as_str()), Some("TimedOut"));
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
    pump_until(&stack, "late-1", all_running).await;
    // Move the deadline into the past; retry the compare-and-swap like any writer.
    loop {
        let loaded = ports.ledger.load("late-1").await.expect("load").expect("record");
        let mut record = loaded.record.clone();
        record.deadline_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
        let outcome = ports.ledger.replace(&record, &loaded.version).await.expect("replace");
        if matches!(outcome, flotilla_shared::ports::WriteOutcome::Written { .. }) {
            break;
        }
    }
    let record = stack.run_to_end(&ports, "late-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.starts_with("deadline of 10 min passed while RUNNING"), "{}", record.reason);
    assert_eq!(run_of(&record, 0).status.as_ref().map(|s| s.as_str()), Some("Cancelled"));
    assert!(phases(&record, 0).contains(&Phase::Unmount), "cleanup ran after the deadline");
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
    pump_until(&stack, "cancel-1", all_running).await;
    stack.submit(r#"{"cancel": "cancel-1"}"#).await;
    let record = stack.run_to_end(&ports, "cancel-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Cancelled);
    assert!(record.reason.starts_with("cancelled by request while RUNNING"), "{}", record.reason);
    for shard in 0..2 {
        let run = run_of(&record, shard);
        assert_eq!(run.status.as_ref().map(|s| s.as_str()), Some("Cancelled"));
        let command_id = record.commands[&run.batch].command_id.clone().expect("sent");
        let status = stack.ssm().list_command_invocations().command_id(&command_id).send().await.expect("list");
        assert!(
            status.command_invocations().iter().all(|i| i.status().map(|s| s.as_str()) == Some("Cancelled")),
            "{:?}",
            status.command_invocations()
        );
    }
    assert_eq!(stack.running_managed().await, 0);
    assert!(stack.snapshots("cancel-1").await.is_empty());
}

/// Two deliveries of every message, handled at once: one fleet, and every
/// phase sent exactly once per shard (counted in SSM, not in the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_survives_duplicate_concurrent_delivery() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    stack.submit(&job("dup-1").to_string()).await;
    let record = stack.run_to_end(&ports, "dup-1", true, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(stack.managed_instance_count("dup-1").await, 2, "one fleet, not two");
    let commands = stack.ssm().list_commands().send().await.expect("list");
    for phase in [Phase::Mount, Phase::Setup, Phase::Run, Phase::BeforeUnmount, Phase::Unmount] {
        let prefix = format!("flotilla dup-1 {} ", phase.as_str());
        let sent: Vec<_> =
            commands.commands().iter().filter(|c| c.comment().is_some_and(|k| k.starts_with(&prefix))).collect();
        // Each instance once. Both shards usually share one call; a loaded
        // machine may see them a coalescing window apart (decide's unit tests
        // hold the coalescing itself).
        let mut ids: Vec<&String> = sent.iter().flat_map(|c| c.instance_ids()).collect();
        let calls = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!((ids.len(), calls), (2, 2), "{phase:?} sent exactly once per shard: {sent:?}");
    }
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
    // A user's own volumes carry a filesystem; a job never formats them.
    let existing = stack.formatted_volume(2).await;
    let seed = stack.formatted_volume(1).await;
    let seed_snapshot = ec2.create_snapshot().volume_id(&seed).send().await.expect("snapshot");
    let seed_snapshot = seed_snapshot.snapshot_id().expect("id").to_string();
    // Their owner opts them in for this deployment (intake checks, IAM enforces).
    let opt_in = aws_sdk_ec2::types::Tag::builder().key("flotilla:allow").value("flotilla").build();
    ec2.create_tags().resources(&existing).resources(&seed_snapshot).tags(opt_in).send().await.expect("opt in");

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
    let kept: Vec<_> = record.attempts().flat_map(|a| a.volumes.iter()).filter(|v| v.name == "keep").collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(record.shards[0].attempts[0].volumes.iter().filter(|v| v.name == "keep").count(), 1);
    let view = ec2.describe_volumes().volume_ids(&existing).send().await.expect("volume");
    assert_eq!(view.volumes()[0].state().map(|s| s.as_str()), Some("available"));
    // Restored volumes were ours: deleted, and "never" means no snapshot of them.
    assert_eq!(stack.live_job_volumes("sources-1").await, 0);
    let snapshots = stack.snapshots("sources-1").await;
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].volume_id(), Some(existing.as_str()));
    assert_eq!(stack.running_managed().await, 0);
}

/// An instance terminated mid-run (a plain `aws ec2 terminate-instances`):
/// its shard re-runs on a replacement and the job SUCCEEDS; the other shard
/// is not re-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_run_is_replaced_and_the_job_succeeds() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("killed-1");
    let go = gate_run(&stack, &mut spec, "echo done $FLOTILLA_SHARD_INDEX");
    stack.submit(&spec.to_string()).await;
    let record = pump_until(&stack, "killed-1", all_running).await;
    let victim = record.shards[1].current().and_then(|a| a.instance_id.clone()).expect("instance");
    stack.ec2().terminate_instances().instance_ids(&victim).send().await.expect("terminate");
    open_gate(&stack, &go);
    let record = stack.run_to_end(&ports, "killed-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    let shard = &record.shards[1];
    assert_eq!(shard.attempts.len(), 2);
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));
    assert_eq!(record.shards[0].attempts.len(), 1, "the other shard kept its instance");
    assert_eq!(output(&stack, "killed-1", 1, 2, Phase::Run).await, vec!["done 1".to_string()]);
    assert_eq!(stack.running_managed().await, 0);
    // on-success: the lost attempt's volume is not snapshotted; the two finished ones are.
    assert_eq!(stack.snapshots("killed-1").await.len(), 2);
    assert_eq!(stack.live_job_volumes("killed-1").await, 0);
}

/// An instance whose status check fails while it works (moto extension gap
/// 14) is terminated and its shard re-run on a replacement; the job SUCCEEDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impaired_instance_is_replaced_and_the_job_succeeds() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("impaired-1");
    let go = gate_run(&stack, &mut spec, "echo done $FLOTILLA_SHARD_INDEX");
    stack.submit(&spec.to_string()).await;
    let record = pump_until(&stack, "impaired-1", all_running).await;
    let victim = record.shards[1].current().and_then(|a| a.instance_id.clone()).expect("instance");
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(stack.scratch.join("impaired"), format!("{victim}\n")).expect("impair");
    // The run holds until the impaired instance has been replaced.
    pump_until(&stack, "impaired-1", |r| r.shards[1].attempts.len() == 2).await;
    open_gate(&stack, &go);
    let record = stack.run_to_end(&ports, "impaired-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    let shard = &record.shards[1];
    assert_eq!(shard.attempts.len(), 2);
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));
    assert!(shard.trail.iter().any(|n| n.text.contains("impaired")), "{:?}", shard.trail);
    assert_eq!(record.shards[0].attempts.len(), 1, "the other shard kept its instance");
    assert_eq!(output(&stack, "impaired-1", 1, 2, Phase::Run).await, vec!["done 1".to_string()]);
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.live_job_volumes("impaired-1").await, 0);
}

/// A spot interruption warning arrives as an EventBridge event on the
/// reconcile queue; the instance is reclaimed moments later. The shard runs
/// its cleanup, is replaced on on-demand, and the job SUCCEEDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_mid_run_moves_the_shard_and_the_job_succeeds() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("spot-1");
    spec["market"] = serde_json::json!("spot");
    spec["on_demand_fallback"] = serde_json::json!(true);
    let go = gate_run(&stack, &mut spec, "echo done");
    stack.submit(&spec.to_string()).await;
    let record = pump_until(&stack, "spot-1", all_running).await;
    let victim = record.shards[0].current().and_then(|a| a.instance_id.clone()).expect("instance");
    let event = serde_json::json!({
        "version": "0", "id": "7e1d5b8a-0000-4000-8000-000000000001",
        "detail-type": "EC2 Spot Instance Interruption Warning", "source": "aws.ec2",
        "account": "123456789012", "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "region": "us-east-1", "resources": [format!("arn:aws:ec2:us-east-1a:instance/{victim}")],
        "detail": {"instance-id": victim, "instance-action": "terminate"}
    });
    stack
        .sqs()
        .send_message()
        .queue_url(&stack.reconcile_queue)
        .message_body(event.to_string())
        .send()
        .await
        .expect("event");
    // Deliver the warning, then EC2 reclaims the instance.
    for _ in 0..5 {
        stack.pump_once(&ports, false).await;
    }
    stack.ec2().terminate_instances().instance_ids(&victim).send().await.expect("reclaim");
    open_gate(&stack, &go);
    let record = stack.run_to_end(&ports, "spot-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    let shard = &record.shards[0];
    assert_eq!(shard.attempts.len(), 2, "{:?}", shard.trail);
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::SpotInterruption));
    assert_eq!(record.launch_of(&shard.attempts[1]).market, flotilla_shared::spec::Market::OnDemand);
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.live_job_volumes("spot-1").await, 0);
}

/// EC2 has no capacity for the first instance type: every slot fails over
/// to the second, in the user's order, and the trail says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_refused_for_the_first_type_runs_on_the_second() {
    let stack = MotoStack::start().await;
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(stack.scratch.join("no-capacity"), "t3.micro\n").expect("refuse t3.micro");
    let ports = stack.ports();
    let mut spec = job("capacity-1");
    spec["instance_types"] = serde_json::json!(["t3.micro", "t3.small"]);
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "capacity-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    for shard in &record.shards {
        assert_eq!(shard.attempts.len(), 1, "failover moves the attempt; it is not a retry");
        assert_eq!(shard.current().map(|a| record.launch_of(a).instance_type), Some("t3.small".to_string()));
        assert!(shard.trail.iter().any(|n| n.text.contains("InsufficientInstanceCapacity")), "{:?}", shard.trail);
    }
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.snapshots("capacity-1").await.len(), 2);
}

/// A cancel that lands while shards are releasing (snapshotting) keeps the
/// snapshots their succeeded work earned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_snapshotting_keeps_the_snapshots() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    stack.submit(&job("snapcancel-1").to_string()).await;
    pump_until(&stack, "snapcancel-1", |r| {
        r.shards.iter().all(|s| s.current().is_some_and(|a| a.stage == Stage::Releasing || a.stage == Stage::Done))
    })
    .await;
    stack.submit(r#"{"cancel": "snapcancel-1"}"#).await;
    let record = stack.run_to_end(&ports, "snapcancel-1", false, LIMIT).await;
    assert!(record.state.is_terminal());
    assert_eq!(stack.snapshots("snapcancel-1").await.len(), 2, "{}", flotilla_shared::report::render(&record));
    assert_eq!(stack.live_job_volumes("snapcancel-1").await, 0);
    assert_eq!(stack.running_managed().await, 0);
}

/// A permanent AWS error while cleaning up (IAM refuses DeleteVolume): the
/// job ends FAILED with the reason, the fleet is still terminated, the
/// snapshots taken, and the kept volumes named in the report. It never loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_during_cleanup_fails_the_job_and_tears_down() {
    let stack = MotoStack::start().await;
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(stack.scratch.join("refuse"), "DeleteVolume\n").expect("refuse DeleteVolume");
    let ports = stack.ports();
    stack.submit(&job("refused-1").to_string()).await;
    let record = stack.run_to_end(&ports, "refused-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(
        record.reason.contains("cleanup did not finish") && record.reason.contains("UnauthorizedOperation"),
        "{}",
        record.reason
    );
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.snapshots("refused-1").await.len(), 2, "snapshots first: no data lost");
    assert!(flotilla_shared::report::render(&record).contains("kept: delete refused"));
}

/// The work fails and so does a cleanup phase: the job ends FAILED with the
/// first reason, and everything is torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cleanup_phase_still_ends_the_job_and_tears_down() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("cleanup-1");
    spec["run"] = serde_json::json!({"script": "exit 4", "timeout_seconds": 30});
    spec["before_unmount"] = serde_json::json!({"script": "exit 5", "timeout_seconds": 30});
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "cleanup-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.contains("run exited 4"), "{}", record.reason);
    assert!(record.shards.iter().any(|s| s.trail.iter().any(|n| n.text.contains("before_unmount exited 5"))));
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.live_job_volumes("cleanup-1").await, 0);
}

/// 100 instances with a volume each, through the real SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_instance_job_with_a_volume_each() {
    let _turn = crate::moto::HEAVY.lock().await;
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("hundred-1");
    spec["fleet"] = serde_json::json!({"count": 100});
    spec.as_object_mut().expect("object").remove("setup");
    spec.as_object_mut().expect("object").remove("before_unmount");
    spec["run"] = serde_json::json!({"commands": [["true"]], "timeout_seconds": 60});
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "hundred-1", false, Duration::from_secs(600)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.shards.len(), 100);
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.snapshots("hundred-1").await.len(), 100);
    assert_eq!(stack.live_job_volumes("hundred-1").await, 0);
}

/// The job's reconcile messages die for real (received and never deleted
/// until SQS's redrive policy, maxReceiveCount 5, moves them to the DLQ).
/// The reaper records each on its job, once, and wakes it: the job ends with
/// the reason on its record, and nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_messages_are_dead_lettered_ends_with_the_reason_and_leaves_nothing() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let mut spec = job("dlq-1");
    spec["run"] = serde_json::json!({"script": "sleep 30", "timeout_seconds": 60});
    stack.submit(&spec.to_string()).await;
    pump_until(&stack, "dlq-1", all_running).await;
    let sqs = stack.sqs();
    for _ in 0..3 {
        let wake = serde_json::json!({"job_id": "dlq-1", "trigger": "poll"}).to_string();
        sqs.send_message().queue_url(&stack.reconcile_queue).message_body(wake).send().await.expect("send");
    }
    // A consumer that fails every time: receive, never delete, until SQS moves them.
    let dlq = format!("{}-dlq", stack.reconcile_queue);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        sqs.receive_message()
            .queue_url(&stack.reconcile_queue)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .send()
            .await
            .expect("receive");
        let attributes = sqs
            .get_queue_attributes()
            .queue_url(&dlq)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .expect("attributes");
        let dead = attributes
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        if dead >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SQS never dead-lettered the messages");
    }
    // The job's own poll died with them: nothing wakes it but the tick.
    let ticked = flotilla_shared::handlers::tick(&ports, &serde_json::json!({})).await.expect("tick");
    let drained = ticked["reaper"]["dead_letters"].as_u64().unwrap_or(0);
    assert!(drained >= 3, "{ticked}");
    let record = stack.record(&ports, "dlq-1").await.expect("record");
    assert_eq!(u64::from(record.dead_letters), drained, "each letter counted once");
    // A second tick finds the DLQ empty and counts nothing twice.
    let again = flotilla_shared::handlers::tick(&ports, &serde_json::json!({})).await.expect("tick");
    assert_eq!(again["reaper"]["dead_letters"], 0, "{again}");

    let record = stack.run_to_end(&ports, "dlq-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "a message that died only delays the job");
    let report = flotilla_shared::report::render(&record);
    assert!(report.contains("warning: dead-lettered: a reconcile message failed"), "{report}");
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.live_job_volumes("dlq-1").await, 0);
}
