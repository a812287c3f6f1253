//! Snapshot lineages through the real SDK against moto: several runs of one
//! job name on one cloud, with failures between them, a rescue snapshot, a
//! source another job restores from, a cancel that arrives before its job,
//! and a cleanup step that fails. Every check reads EC2, not the record.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_shared::record::{EndCause, JobState, Phase};

use crate::moto::{job, MotoStack};

const LIMIT: Duration = Duration::from_secs(180);

/// One instance, one volume snapshotted `always`, retention `keep_last`.
fn run_of(id: &str, name: &str, keep_last: u32, succeed: bool) -> serde_json::Value {
    let mut spec = job(id);
    spec["name"] = serde_json::json!(name);
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["volumes"][0]["snapshot"] = serde_json::json!("always");
    spec["volumes"][0]["retention"] = serde_json::json!({"keep_last": keep_last});
    if !succeed {
        spec["run"] = serde_json::json!({"script": "exit 3", "timeout_seconds": 30});
    }
    spec
}

/// The lineage's snapshots in EC2: job id -> (snapshot id, tags).
async fn lineage(stack: &MotoStack, name: &str) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
    let out = stack
        .ec2()
        .describe_snapshots()
        .owner_ids("self")
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:flotilla:job-name").values(name).build())
        .send()
        .await
        .expect("snapshots");
    out.snapshots()
        .iter()
        .map(|s| {
            let tags: BTreeMap<String, String> = s
                .tags()
                .iter()
                .map(|t| (t.key().unwrap_or_default().to_string(), t.value().unwrap_or_default().to_string()))
                .collect();
            let job = tags.get("flotilla:job-id").cloned().unwrap_or_default();
            (job, (s.snapshot_id().unwrap_or_default().to_string(), tags))
        })
        .collect()
}

async fn run(stack: &MotoStack, spec: &serde_json::Value) -> flotilla_shared::record::JobRecord {
    let ports = stack.ports();
    let id = spec["id"].as_str().expect("id").to_string();
    stack.submit(&spec.to_string()).await;
    stack.run_to_end(&ports, &id, false, LIMIT).await
}

async fn snapshot_exists(stack: &MotoStack, snapshot_id: &str) -> bool {
    match stack.ec2().describe_snapshots().snapshot_ids(snapshot_id).send().await {
        Ok(out) => !out.snapshots().is_empty(),
        Err(_) => false, // InvalidSnapshot.NotFound
    }
}

/// Runs good, failed, good with keep_last 2 keep both good snapshots (the
/// failed run's never displaces one); a fourth, good run pushes out only
/// the oldest good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_failed_good_keeps_both_good_snapshots() {
    let stack = MotoStack::start().await;
    for (id, ok) in [("nightly-1", true), ("nightly-2", false), ("nightly-3", true)] {
        let record = run(&stack, &run_of(id, "nightly", 2, ok)).await;
        let want = if ok { JobState::Succeeded } else { JobState::Failed };
        assert_eq!(record.state, want, "{id}: {}", record.reason);
    }
    let found = lineage(&stack, "nightly").await;
    assert_eq!(found.keys().collect::<Vec<_>>(), ["nightly-1", "nightly-2", "nightly-3"], "{found:?}");
    let good = |job: &str| found[job].1.get("flotilla:good").map(String::as_str) == Some("true");
    assert!(good("nightly-1") && good("nightly-3") && !good("nightly-2"), "{found:?}");
    assert_eq!(found["nightly-2"].1.get("flotilla:kind").map(String::as_str), Some("failed-attempt"));

    let record = run(&stack, &run_of("nightly-4", "nightly", 2, true)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let found = lineage(&stack, "nightly").await;
    assert_eq!(found.keys().collect::<Vec<_>>(), ["nightly-2", "nightly-3", "nightly-4"], "{found:?}");
    assert_eq!(stack.running_managed().await, 0);
}

/// A rescue snapshot (the reaper's copy of an orphaned volume) carries the
/// lineage's tags, and the next successful run of that name keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescue_snapshot_survives_the_next_run() {
    let stack = MotoStack::start().await;
    let record = run(&stack, &run_of("rescued-1", "rescued", 1, true)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let (_, tags) = lineage(&stack, "rescued").await.remove("rescued-1").expect("first run's snapshot");

    // What the reaper takes of an orphaned volume of that lineage.
    let ec2 = stack.ec2();
    let volume = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.expect("volume");
    let mut rescue_tags: Vec<aws_sdk_ec2::types::Tag> = tags
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "flotilla:good" | "flotilla:kind"))
        .map(|(k, v)| {
            aws_sdk_ec2::types::Tag::builder().key(k).value(if k == "flotilla:job-id" { "orphan-0" } else { v }).build()
        })
        .collect();
    rescue_tags.push(aws_sdk_ec2::types::Tag::builder().key("flotilla:reaped").value("true").build());
    let rescue = ec2
        .create_snapshot()
        .volume_id(volume.volume_id().expect("id"))
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
                .set_tags(Some(rescue_tags))
                .build(),
        )
        .send()
        .await
        .expect("rescue snapshot");
    let rescue = rescue.snapshot_id().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later StartTime for the next run

    let record = run(&stack, &run_of("rescued-2", "rescued", 1, true)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(
        snapshot_exists(&stack, &rescue).await,
        "the rescue snapshot was pruned: {}",
        record.pruned_snapshots.join(",")
    );
    let found = lineage(&stack, "rescued").await;
    assert!(found.contains_key("rescued-2") && !found.contains_key("rescued-1"), "{found:?}");
}

/// A job restores from another lineage's snapshot. While it runs, newer runs
/// of that lineage (keep_last 1) would prune it; its instance is killed, and
/// the replacement restores from the same snapshot. Once the job ended, the
/// next run of the lineage prunes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_snapshot_survives_while_a_job_restores_from_it() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let record = run(&stack, &run_of("src-1", "src", 1, true)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let (source, _) = lineage(&stack, "src").await.remove("src-1").expect("source snapshot");
    let opt_in = aws_sdk_ec2::types::Tag::builder().key("flotilla:allow").value("flotilla").build();
    stack.ec2().create_tags().resources(&source).tags(opt_in).send().await.expect("opt in");

    let mut user = job("user-1");
    user["fleet"] = serde_json::json!({"count": 1});
    user["volumes"][0]["source"] = serde_json::json!({"snapshot_id": source});
    user["volumes"][0]["snapshot"] = serde_json::json!("never");
    let go = stack.scratch.join("go");
    user["env"]["GO"] = serde_json::json!(go.display().to_string());
    user["run"] = serde_json::json!({"script": "until [ -e \"$GO\" ]; do sleep 0.2; done; echo restored", "timeout_seconds": 120});
    stack.submit(&user.to_string()).await;
    let deadline = std::time::Instant::now() + LIMIT;
    let first = loop {
        stack.pump_once(&ports, false).await;
        let record = stack.record(&ports, "user-1").await;
        let running = record.as_ref().and_then(|r| r.shards[0].current()).filter(|a| {
            a.phase(Phase::Run).is_some_and(|p| {
                record.as_ref().and_then(|r| r.commands.get(&p.batch)).is_some_and(|b| b.command_id.is_some())
            })
        });
        if let Some(attempt) = running {
            break attempt.instance_id.clone().expect("instance");
        }
        assert!(std::time::Instant::now() < deadline, "user-1 never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let record = run(&stack, &run_of("src-2", "src", 1, true)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(snapshot_exists(&stack, &source).await, "pruned while user-1 restores from it");

    stack.ec2().terminate_instances().instance_ids(&first).send().await.expect("kill");
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(&go, "").expect("go");
    let record = stack.run_to_end(&ports, "user-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    assert_eq!(record.shards[0].attempts.len(), 2, "the replacement restored from the source");
    assert_eq!(record.shards[0].attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let record = run(&stack, &run_of("src-3", "src", 1, true)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(!snapshot_exists(&stack, &source).await, "no job names it any more: retention applies again");
}

/// `flotilla cancel` before `flotilla submit`, processed first: the job
/// arrives, ends CANCELLED, and launches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_before_its_job_is_kept_and_applied() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    stack.submit(&serde_json::json!({"cancel": "early-1"}).to_string()).await;
    stack.pump_once(&ports, false).await;
    assert!(stack.record(&ports, "early-1").await.is_none());
    let record = run(&stack, &job("early-1")).await;
    assert_eq!(record.state, JobState::Cancelled, "{}", record.reason);
    assert!(record.reason.contains("cancelled before it arrived"), "{}", record.reason);
    assert_eq!(stack.managed_instance_count("early-1").await, 0, "nothing launched");
    assert_eq!(stack.live_job_volumes("early-1").await, 0);
}

/// A failed `before_unmount` fails the job, naming the step, shard and exit
/// code; the work's volume is still snapshotted, tagged as taken after a
/// failed cleanup, and not good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_before_unmount_fails_the_job_and_keeps_a_tagged_snapshot() {
    let stack = MotoStack::start().await;
    let mut spec = job("dirty-1");
    spec["before_unmount"] = serde_json::json!({"script": "echo stopping; exit 5", "timeout_seconds": 30});
    let record = run(&stack, &spec).await;
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    assert!(
        record.reason.contains("before_unmount exited 5") && record.reason.contains("shard 0"),
        "{}",
        record.reason
    );
    let snapshots = stack.snapshots("dirty-1").await;
    assert_eq!(snapshots.len(), 2, "the work's results are kept");
    for snapshot in &snapshots {
        let tag = |key: &str| {
            snapshot.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).map(str::to_string)
        };
        assert_eq!(tag("flotilla:kind").as_deref(), Some("after-failed-cleanup"));
        assert_eq!(tag("flotilla:good"), None);
    }
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.live_job_volumes("dirty-1").await, 0);
}

/// The deadline passes while the run ignores it and `before_unmount` would
/// sleep ten minutes (its own timeout): every instance is still terminated
/// at the bound (deadline plus the cleanup grace), its mounted volume
/// snapshotted while attached first, and the snapshot is not good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_steps_outlast_the_bound_is_terminated_at_it() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let grace = chrono::Duration::minutes(i64::from(ports.settings.cleanup_grace_minutes));
    let mut spec = job("bound-1");
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["volumes"][0]["snapshot"] = serde_json::json!("always");
    spec["run"] = serde_json::json!({"script": "trap '' TERM; sleep 600", "timeout_seconds": 600});
    spec["before_unmount"] = serde_json::json!({"script": "trap '' TERM; sleep 3000", "timeout_seconds": 600});
    stack.submit(&spec.to_string()).await;
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        stack.pump_once(&ports, false).await;
        assert!(std::time::Instant::now() < deadline, "never ran");
        let Some(record) = stack.record(&ports, "bound-1").await else { continue };
        let run =
            record.shards[0].current().and_then(|a| a.phase(Phase::Run)).and_then(|p| record.commands.get(&p.batch));
        if run.is_some_and(|b| b.command_id.is_some()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The deadline passed long enough ago that the bound is 20 s away.
    let bound = chrono::Utc::now() + chrono::Duration::seconds(20);
    loop {
        let loaded = ports.ledger.load("bound-1").await.expect("load").expect("record");
        let mut record = loaded.record.clone();
        record.deadline_at = Some(bound - grace);
        if matches!(
            ports.ledger.replace(&record, &loaded.version).await.expect("replace"),
            flotilla_shared::ports::WriteOutcome::Written { .. }
        ) {
            break;
        }
    }
    let record = stack.run_to_end(&ports, "bound-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    let attempt = record.shards[0].current().expect("attempt");
    assert!(attempt.at_bound, "{}", flotilla_shared::report::render(&record));
    // Terminated by the bound plus a few seconds (a pass, one call each).
    let out = stack
        .ec2()
        .describe_instances()
        .instance_ids(attempt.instance_id.clone().expect("id"))
        .send()
        .await
        .expect("describe");
    let instance = &out.reservations()[0].instances()[0];
    assert_eq!(instance.state().and_then(|s| s.name()).map(|n| n.as_str()), Some("terminated"));
    let stopped_at = record.timeline.last().map(|s| s.at).expect("timeline");
    assert!(
        stopped_at < bound + chrono::Duration::seconds(60),
        "ended {} s after the bound",
        (stopped_at - bound).num_seconds()
    );
    let snapshots = stack.snapshots("bound-1").await;
    assert_eq!(snapshots.len(), 1, "the mounted volume, snapshotted while attached");
    let kind = snapshots[0].tags().iter().find(|t| t.key() == Some("flotilla:kind")).and_then(|t| t.value());
    assert_eq!(kind, Some("failed-attempt"));
    assert_eq!(stack.running_managed().await, 0);
    assert_eq!(stack.live_job_volumes("bound-1").await, 0);
}
