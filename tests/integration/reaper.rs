//! The reaper against moto through the real SDK: orphans of every kind are
//! planned in a dry run that changes nothing, then marked, then removed on a
//! later pass (volumes snapshotted first), and a last pass finds nothing.
//! What a running job still needs is never touched.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use chrono::{Duration, SecondsFormat, Utc};
use flotilla_shared::plan::plan;
use flotilla_shared::reaper::{self, ReapAction, ReaperSettings};
use flotilla_shared::record::JobRecord;
use flotilla_shared::spec::parse;
use flotilla_shared::tags;
use serde_json::Value;

use crate::moto::{job, MotoStack};

fn spec_tags(pairs: &[(&str, &str)], resource: ResourceType) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(resource);
    for (key, value) in pairs {
        spec = spec.tags(Tag::builder().key(*key).value(*value).build());
    }
    spec.build()
}

async fn instance(stack: &MotoStack, pairs: &[(&str, &str)]) -> String {
    let out = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(spec_tags(pairs, ResourceType::Instance))
        .send()
        .await
        .expect("run instances");
    out.instances()[0].instance_id().expect("id").to_string()
}

async fn volume(stack: &MotoStack, pairs: &[(&str, &str)]) -> String {
    let mut call = stack.ec2().create_volume().availability_zone("us-east-1a").size(1);
    if !pairs.is_empty() {
        call = call.tag_specifications(spec_tags(pairs, ResourceType::Volume));
    }
    call.send().await.expect("volume").volume_id().expect("id").to_string()
}

async fn snapshot(stack: &MotoStack, volume_id: &str, pairs: &[(&str, &str)]) -> String {
    let out = stack
        .ec2()
        .create_snapshot()
        .volume_id(volume_id)
        .tag_specifications(spec_tags(pairs, ResourceType::Snapshot))
        .send()
        .await
        .expect("snapshot");
    out.snapshot_id().expect("id").to_string()
}

async fn instance_state(stack: &MotoStack, id: &str) -> String {
    let out = stack.ec2().describe_instances().instance_ids(id).send().await.expect("describe");
    let instance = &out.reservations()[0].instances()[0];
    instance.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default()
}

async fn volume_exists(stack: &MotoStack, id: &str) -> bool {
    stack.ec2().describe_volumes().volume_ids(id).send().await.is_ok_and(|out| !out.volumes().is_empty())
}

async fn snapshot_ids(stack: &MotoStack) -> Vec<String> {
    let managed = aws_sdk_ec2::types::Filter::builder()
        .name(format!("tag:{}", tags::MANAGED_BY))
        .values(tags::MANAGED_BY_VALUE)
        .build();
    let out = stack.ec2().describe_snapshots().owner_ids("self").filters(managed).send().await.expect("snapshots");
    let mut ids: Vec<String> = out.snapshots().iter().filter_map(|s| s.snapshot_id().map(str::to_string)).collect();
    ids.sort();
    ids
}

/// Snapshots stay `pending` for a while, as on EBS: wait until none is.
async fn all_completed(stack: &MotoStack) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = stack.ec2().describe_snapshots().owner_ids("self").send().await.expect("snapshots");
        if out.snapshots().iter().all(|s| s.state().is_some_and(|s| s.as_str() == "completed")) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "snapshots never completed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The ids an action names, by kind.
fn targets(actions: &[ReapAction]) -> BTreeMap<&'static str, Vec<String>> {
    let mut by_kind: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for action in actions {
        let (kind, id) = match action {
            ReapAction::Mark { resource_id, .. } => ("mark", resource_id),
            ReapAction::Terminate { instance_id, .. } => ("terminate", instance_id),
            ReapAction::Snapshot { volume_id, .. } => ("snapshot", volume_id),
            ReapAction::DeleteVolume { volume_id, .. } => ("delete volume", volume_id),
            ReapAction::DeleteSnapshot { snapshot_id, .. } => ("delete snapshot", snapshot_id),
            ReapAction::EndJob { job_id, .. } => ("end job", job_id),
            ReapAction::Leave { resource_id, .. } => ("leave", resource_id),
        };
        by_kind.entry(kind).or_default().push(id.clone());
    }
    for ids in by_kind.values_mut() {
        ids.sort();
    }
    by_kind
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_plans_marks_then_removes_every_orphan_and_nothing_a_job_needs() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let settings = ReaperSettings::from(&ports.settings);
    let now = Utc::now();
    let future = (now + Duration::hours(2)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let past = (now - Duration::minutes(5)).to_rfc3339_opts(SecondsFormat::Secs, true);

    // A job that ended; one still running (its deadline far ahead, a pass
    // just now); one past its deadline that no pass has touched for an hour.
    let spec = parse(&job("busy-1").to_string()).expect("spec");
    let mut ended = JobRecord::new(
        "done-1".into(),
        spec.clone(),
        plan(&spec, &flotilla_shared::plan::Prices::builtin()).expect("plan"),
        now,
    );
    ended.state = flotilla_shared::record::JobState::Succeeded;
    ports.ledger.create(&ended).await.expect("record");
    let busy = JobRecord::new(
        "busy-1".into(),
        spec.clone(),
        plan(&spec, &flotilla_shared::plan::Prices::builtin()).expect("plan"),
        now,
    );
    ports.ledger.create(&busy).await.expect("record");
    ports.ledger.set_active("busy-1", true).await.expect("active");
    let mut stuck = JobRecord::new(
        "stuck-1".into(),
        spec.clone(),
        plan(&spec, &flotilla_shared::plan::Prices::builtin()).expect("plan"),
        now - Duration::minutes(75),
    );
    stuck.updated_at = Some(now - Duration::minutes(50));
    ports.ledger.create(&stuck).await.expect("record");
    ports.ledger.set_active("stuck-1", true).await.expect("active");

    let managed = (tags::MANAGED_BY, tags::MANAGED_BY_VALUE);
    let stack_tag = (tags::STACK, ports.settings.stack.as_str());
    let of_ended = instance(&stack, &[managed, stack_tag, (tags::JOB_ID, "done-1"), (tags::EXPIRES_AT, &future)]).await;
    let of_nobody =
        instance(&stack, &[managed, stack_tag, (tags::JOB_ID, "ghost-1"), (tags::EXPIRES_AT, &future)]).await;
    stack.ec2().stop_instances().instance_ids(&of_nobody).send().await.expect("stop");
    let expired = instance(&stack, &[managed, stack_tag, (tags::JOB_ID, "stuck-1"), (tags::EXPIRES_AT, &past)]).await;
    let untagged = instance(&stack, &[managed, stack_tag]).await;
    // Another deployment's orphans in the same account: never this reaper's.
    let other = (tags::STACK, "other");
    let other_stack = instance(&stack, &[managed, other, (tags::JOB_ID, "ghost-1")]).await;
    let other_volume = volume(&stack, &[managed, other, (tags::JOB_ID, "ghost-1")]).await;
    let other_snapshot = snapshot(
        &stack,
        &other_volume,
        &[
            managed,
            other,
            (tags::JOB_ID, "ghost-1"),
            (tags::JOB_NAME, "nightly"),
            (tags::VOLUME, "data"),
            (tags::KEEP_LAST, "1"),
        ],
    )
    .await;
    let working = instance(&stack, &[managed, stack_tag, (tags::JOB_ID, "busy-1"), (tags::EXPIRES_AT, &future)]).await;
    // Past expiry, but its job is still making passes (a long teardown): spared.
    let tearing_down =
        instance(&stack, &[managed, stack_tag, (tags::JOB_ID, "busy-1"), (tags::EXPIRES_AT, &past)]).await;

    let left_data =
        volume(&stack, &[managed, stack_tag, (tags::JOB_ID, "done-1"), (tags::VOLUME, "data"), (tags::SHARD, "0")])
            .await;
    let scratch = volume(&stack, &[managed, stack_tag, (tags::JOB_ID, "ghost-1"), (tags::SCRATCH, "true")]).await;
    let busy_volume = volume(&stack, &[managed, stack_tag, (tags::JOB_ID, "busy-1")]).await;
    let user_volume = volume(&stack, &[]).await; // a volume_id source: not ours

    // Lineages with retention 1: three of the ended job's, two of the running one's.
    let lineage = |job_id: &'static str| {
        [
            managed,
            stack_tag,
            (tags::JOB_ID, job_id),
            (tags::JOB_NAME, "nightly"),
            (tags::VOLUME, "data"),
            (tags::SHARD, "0"),
            (tags::KEEP_LAST, "1"),
        ]
    };
    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(snapshot(&stack, &user_volume, &lineage("done-1")).await);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // distinct start times
    }
    for _ in 0..2 {
        snapshot(&stack, &user_volume, &lineage("busy-1")).await;
    }
    all_completed(&stack).await; // a pending snapshot is never pruned
    let snapshots_before = snapshot_ids(&stack).await;

    // Dry run: every orphan is listed, nothing changes.
    let report = reaper::run(&ports, &settings, true).await.expect("dry run");
    let planned = reaper::plan(&reaper::take_inventory(&ports).await.expect("inventory"), Utc::now(), &settings);
    let by_kind = targets(&planned);
    let orphans = sorted(vec![
        of_ended.clone(),
        of_nobody.clone(),
        expired.clone(),
        untagged.clone(),
        left_data.clone(),
        scratch.clone(),
    ]);
    assert_eq!(by_kind.get("mark"), Some(&orphans), "{planned:#?}");
    assert_eq!(by_kind.get("delete snapshot"), Some(&sorted(old[..2].to_vec())), "the two oldest of the ended lineage");
    assert_eq!(by_kind.get("end job"), Some(&vec!["stuck-1".to_string()]), "no pass for 50 min, 65 past its deadline");
    assert_eq!(by_kind.len(), 3, "{planned:#?}");
    let key = report["report"].as_str().expect("report key").to_string();
    let written: Value =
        serde_json::from_slice(&ports.ledger.get(&key).await.expect("get").expect("report")).expect("json");
    assert_eq!(written["dry_run"], true);
    assert_eq!(written["planned"].as_array().map(Vec::len), Some(planned.len()), "{written:#}");
    assert_eq!(instance_state(&stack, &of_ended).await, "running", "a dry run changes nothing");
    assert_eq!(instance_state(&stack, &of_nobody).await, "stopped");
    assert!(volume_exists(&stack, &scratch).await);
    assert_eq!(snapshot_ids(&stack).await, snapshots_before);
    let marks = stack.ec2().describe_tags().send().await.expect("tags");
    assert!(!marks.tags().iter().any(|t| t.key() == Some(tags::ORPHANED_AT)), "no mark in a dry run");

    // Pass 1 marks the orphans (and prunes the lineage); pass 2 acts on marks.
    reaper::run(&ports, &settings, false).await.expect("pass 1");
    for id in [&of_ended, &of_nobody, &expired, &untagged] {
        assert_ne!(instance_state(&stack, id).await, "terminated", "marked, not yet removed: {id}");
    }
    assert!(volume_exists(&stack, &scratch).await);
    reaper::run(&ports, &settings, false).await.expect("pass 2");
    for id in [&of_ended, &of_nobody, &expired, &untagged] {
        assert_eq!(instance_state(&stack, id).await, "terminated", "{id}");
    }
    assert!(!volume_exists(&stack, &scratch).await, "scratch: deleted without a snapshot");
    assert!(volume_exists(&stack, &left_data).await, "snapshotted first, deleted next pass");
    let taken = stack
        .ec2()
        .describe_snapshots()
        .owner_ids("self")
        .filters(aws_sdk_ec2::types::Filter::builder().name("volume-id").values(&left_data).build())
        .send()
        .await
        .expect("snapshots");
    assert_eq!(taken.snapshots().len(), 1, "one snapshot of the orphaned volume");
    all_completed(&stack).await;
    reaper::run(&ports, &settings, false).await.expect("pass 3");
    assert!(!volume_exists(&stack, &left_data).await, "deleted once its snapshot completed");

    // A last pass finds nothing; what the running job needs is untouched.
    let last = reaper::run(&ports, &settings, false).await.expect("pass 4");
    assert_eq!(last["planned"], 0, "{last}");
    assert_eq!(instance_state(&stack, &working).await, "running");
    assert_eq!(instance_state(&stack, &tearing_down).await, "running");
    assert_eq!(instance_state(&stack, &other_stack).await, "running", "another stack's orphan");
    assert!(volume_exists(&stack, &other_volume).await, "another stack's volume");
    assert!(snapshot_ids(&stack).await.contains(&other_snapshot), "another stack's snapshot");
    let stuck = ports.ledger.load("stuck-1").await.expect("load").expect("record").record;
    assert_eq!(stuck.state, flotilla_shared::record::JobState::Failed);
    assert!(stuck.reason.starts_with("reaped: no progress"), "{}", stuck.reason);
    assert!(volume_exists(&stack, &busy_volume).await);
    assert!(volume_exists(&stack, &user_volume).await);
    let remaining = snapshot_ids(&stack).await;
    assert!(!remaining.contains(&old[0]) && !remaining.contains(&old[1]) && remaining.contains(&old[2]));
    assert_eq!(
        remaining.len(),
        1 + 2 + 1 + 1,
        "newest of the ended lineage, both of the running one, the reaper's own, the other stack's"
    );
}
