//! A job's bytes, end to end, through the real SDK against moto with real
//! block devices (moto extension gap 21): every emulated instance has its own
//! namespaces and every volume a loop device, so the product's mount,
//! mkfs, step and unmount scripts run on a real ext4 filesystem, and a
//! snapshot holds the blocks the volume had.

use std::time::Duration;

use flotilla_shared::record::{EndCause, JobRecord, JobState, Phase};

use crate::lifecycle_moto::{output, pump_until};
use crate::moto::{job, MotoStack};

const LIMIT: Duration = Duration::from_secs(180);

/// The filesystem's UUID under /data, as a step line.
const UUID_LINE: &str = "echo \"uuid $(blkid -s UUID -o value \"$(findmnt -no SOURCE /data)\")\"";

fn one_instance(id: &str, run: &str) -> serde_json::Value {
    let mut spec = job(id);
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["run"] = serde_json::json!({"script": run, "timeout_seconds": 60});
    spec
}

async fn run(stack: &MotoStack, spec: &serde_json::Value) -> JobRecord {
    let ports = stack.ports();
    stack.submit(&spec.to_string()).await;
    stack.run_to_end(&ports, spec["id"].as_str().expect("id"), false, LIMIT).await
}

/// The value of the first `<word> <value>` line.
fn field(lines: &[String], word: &str) -> Option<String> {
    lines.iter().find_map(|l| l.strip_prefix(&format!("{word} ")).map(str::to_string))
}

fn assert_mounted_for_real(lines: &[String]) {
    assert!(
        lines.iter().any(|l| l.starts_with("mounted vol-") && l.contains("/dev/nvme1n1"))
            && !lines.iter().any(|l| l.contains("skipped")),
        "the mount did not run on a device: {lines:?}"
    );
}

/// Job A writes a file to its new volume and snapshots it; job B's volume is
/// restored from that snapshot and reads the same bytes, on a filesystem
/// with A's UUID: B's mount did not format it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_volume_holds_the_bytes_its_snapshot_took() {
    let stack = MotoStack::start().await;
    let write = format!(
        "head -c 3000000 /dev/urandom > /data/blob\necho \"sha $(sha256sum < /data/blob | cut -d' ' -f1)\"\n{UUID_LINE}"
    );
    let a = run(&stack, &one_instance("bytes-a", &write)).await;
    assert_eq!(a.state, JobState::Succeeded, "{}", a.reason);
    assert_mounted_for_real(&output(&stack, "bytes-a", 0, 1, Phase::Mount).await);
    let wrote = output(&stack, "bytes-a", 0, 1, Phase::Run).await;
    let snapshots = stack.snapshots("bytes-a").await;
    assert_eq!(snapshots.len(), 1, "on-success: one snapshot");
    let snapshot = snapshots[0].snapshot_id().expect("id").to_string();
    // Its owner opts it in for this deployment (intake checks, IAM enforces).
    let opt_in = aws_sdk_ec2::types::Tag::builder().key("flotilla:allow").value("flotilla").build();
    stack.ec2().create_tags().resources(&snapshot).tags(opt_in).send().await.expect("opt in");

    let read = format!("echo \"sha $(sha256sum < /data/blob | cut -d' ' -f1)\"\n{UUID_LINE}");
    let mut spec = one_instance("bytes-b", &read);
    spec["volumes"][0]["source"] = serde_json::json!({"snapshot_id": snapshot});
    spec["volumes"][0]["snapshot"] = serde_json::json!("never");
    let b = run(&stack, &spec).await;
    assert_eq!(b.state, JobState::Succeeded, "{}", b.reason);
    assert_mounted_for_real(&output(&stack, "bytes-b", 0, 1, Phase::Mount).await);
    let got = output(&stack, "bytes-b", 0, 1, Phase::Run).await;
    let sha = field(&wrote, "sha").expect("A printed its checksum");
    assert_eq!(sha.len(), 64, "{wrote:?}");
    assert_eq!(field(&got, "sha").as_deref(), Some(sha.as_str()), "B read other bytes: {got:?}");
    let uuid = field(&wrote, "uuid").filter(|u| !u.is_empty()).expect("A's filesystem UUID");
    assert_eq!(field(&got, "uuid").as_deref(), Some(uuid.as_str()), "B's volume was formatted: {got:?}");
    assert_eq!(stack.running_managed().await, 0);
}

/// A `setup` that leaves a process holding the mount (a database, say):
/// with a `before_unmount` that stops it the unmount is clean; without one,
/// `umount` fails as it would on the instance, and the job reports it: the
/// shard fails, the still-mounted volume is snapshotted while attached
/// (never counted good), and the instance is terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_left_holding_the_mount_fails_the_unmount_unless_before_unmount_stops_it() {
    let stack = MotoStack::start().await;
    // Its own session, stdio closed, cwd on the volume: it outlives the step.
    let daemon = "setsid bash -c 'cd /data && echo $$ > /run/flotilla-db.pid && exec sleep 600' \
                  </dev/null >/dev/null 2>&1 &\nsleep 0.5; echo \"db $(cat /run/flotilla-db.pid)\"";
    let stop = "pid=$(cat /run/flotilla-db.pid); kill \"$pid\"; \
                while kill -0 \"$pid\" 2>/dev/null; do sleep 0.1; done; echo stopped";

    let mut clean = one_instance("held-clean", "echo work > /data/out");
    clean["setup"] = serde_json::json!({"script": daemon, "timeout_seconds": 30});
    clean["before_unmount"] = serde_json::json!({"script": stop, "timeout_seconds": 30});
    let record = run(&stack, &clean).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let unmount = output(&stack, "held-clean", 0, 1, Phase::Unmount).await;
    assert!(unmount.iter().any(|l| l == "unmounted /data"), "{unmount:?}");
    let good = stack.snapshots("held-clean").await;
    assert_eq!(good.len(), 1);
    assert!(good[0].tags().iter().any(|t| t.key() == Some("flotilla:good") && t.value() == Some("true")));

    let mut busy = one_instance("held-busy", "echo work > /data/out");
    busy["setup"] = serde_json::json!({"script": daemon, "timeout_seconds": 30});
    let record = run(&stack, &busy).await;
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    let attempt = record.shards[0].current().expect("attempt");
    let unmount = attempt.phase(Phase::Unmount).expect("the unmount ran");
    assert_eq!(unmount.status.as_ref().map(|s| s.as_str()), Some("Failed"), "{unmount:?}");
    let said = output(&stack, "held-busy", 0, 1, Phase::Unmount).await;
    assert!(said.iter().any(|l| l.contains("target is busy")), "{said:?}");
    let snapshots = stack.snapshots("held-busy").await;
    assert_eq!(snapshots.len(), 1, "the mounted volume is snapshotted while attached");
    assert!(!snapshots[0].tags().iter().any(|t| t.key() == Some("flotilla:good") && t.value() == Some("true")));
    assert_eq!(stack.running_managed().await, 0);
}

/// `on_retry: restore`: a shard whose instance is killed mid-run resumes on
/// its replacement from the bytes the lost attempt wrote (and synced), on
/// the same filesystem, not from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_shard_resumes_from_the_bytes_its_lost_attempt_left() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let written = stack.scratch.join("first-half-written");
    let script = format!(
        "if [ -f /data/progress ]; then echo \"resumed $(cat /data/progress)\"; {UUID_LINE}; exit 0; fi\n\
         blkid -s UUID -o value \"$(findmnt -no SOURCE /data)\" > /data/progress\n\
         sync /data/progress\n\
         touch {}\n\
         sleep 600",
        written.display()
    );
    let mut spec = one_instance("resume-1", &script);
    spec["run"]["timeout_seconds"] = serde_json::json!(300);
    spec["volumes"][0]["snapshot"] = serde_json::json!("always");
    spec["volumes"][0]["on_retry"] = serde_json::json!("restore");
    stack.submit(&spec.to_string()).await;
    let record = pump_until(&stack, "resume-1", |_| written.exists()).await;
    let victim = record.shards[0].current().and_then(|a| a.instance_id.clone()).expect("instance");
    stack.ec2().terminate_instances().instance_ids(&victim).send().await.expect("terminate");
    let record = stack.run_to_end(&ports, "resume-1", false, LIMIT).await;

    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let shard = &record.shards[0];
    assert_eq!(shard.attempts.len(), 2);
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));
    let restored = shard.attempts[1].volumes.iter().find(|v| v.name == "data").expect("volume");
    assert!(restored.restored_from.is_some(), "the replacement's volume was not restored: {restored:?}");
    let said = output(&stack, "resume-1", 0, 2, Phase::Run).await;
    let resumed = field(&said, "resumed").expect("the second attempt found the first one's progress");
    assert_eq!(field(&said, "uuid"), Some(resumed), "same filesystem, not formatted: {said:?}");
    assert_eq!(stack.running_managed().await, 0);
}
