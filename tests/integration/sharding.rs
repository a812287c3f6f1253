//! Work items on moto, through the real SDK: a 100-instance job over 1,000
//! objects listed from an S3 prefix, one manifest per shard, each instance
//! reading its own with the AWS CLI, one shard's instance killed mid-run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_shared::record::{EndCause, JobState, Phase};

use crate::moto::{job, MotoStack};

const SHARDS: usize = 100;
const ITEMS: usize = 1000;
const VICTIM: usize = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_shards_process_a_thousand_items_once_and_a_retried_shard_redoes_only_its_own() {
    let _turn = crate::moto::HEAVY.lock().await;
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let s3 = flotilla_shared::aws::s3_client(&stack.config);
    s3.create_bucket().bucket("render-inputs").send().await.expect("bucket");
    let items: Vec<String> = (0..ITEMS).map(|i| format!("s3://render-inputs/frames/f-{i:04}.exr")).collect();
    for i in 0..ITEMS {
        let key = format!("frames/f-{i:04}.exr");
        s3.put_object().bucket("render-inputs").key(key).body(Vec::new().into()).send().await.expect("put");
    }
    // Where the emulated instances log what they processed, per instance.
    let marks = stack.scratch.join("marks");
    std::fs::create_dir_all(&marks).expect("marks");

    let mut spec = job("frames-1");
    let object = spec.as_object_mut().expect("object");
    object.remove("volumes");
    object.remove("setup");
    // 1,000 items at 1 per instance-minute within 10 minutes: 100 instances.
    spec["fleet"] = serde_json::json!({"items_per_instance_minute": 1, "within_minutes": 10, "max_instances": 100});
    spec["work"] = serde_json::json!({"s3_prefix": "s3://render-inputs/frames/"});
    spec["env"] = serde_json::json!({"MARKS": marks.display().to_string()});
    // A hundred instances' cleanup at once on a loaded 2-core machine.
    spec["before_unmount"]["timeout_seconds"] = serde_json::json!(120);
    // All shards start processing together, and the 99 that are not killed
    // end together (as equal shards would, and within the coalescing window
    // however loaded the machine); shard 7's first instance stalls after its
    // first item until the test kills it.
    spec["run"] = serde_json::json!({"script": format!(r#"
touch "$MARKS/fetched-$FLOTILLA_SHARD_INDEX"
until [ "$(ls "$MARKS" | grep -c '^fetched-')" -ge {SHARDS} ]; do sleep 0.5; done
while IFS= read -r item; do
  echo "$item" >> "$MARKS/processed-$FLOTILLA_INSTANCE_ID"
  if [ "$FLOTILLA_SHARD_INDEX" = {VICTIM} ] && [ ! -e "$MARKS/killed" ]; then touch "$MARKS/stalled"; sleep 300; fi
done < "$FLOTILLA_MANIFEST_FILE"
touch "$MARKS/done-$FLOTILLA_SHARD_INDEX"
until [ "$(ls "$MARKS" | grep -c '^done-')" -ge {survivors} ]; do sleep 0.5; done
echo "shard $FLOTILLA_SHARD_INDEX: $(wc -l < "$FLOTILLA_MANIFEST_FILE") items from $FLOTILLA_MANIFEST"
"#, survivors = SHARDS - 1), "timeout_seconds": 600});
    stack.submit(&spec.to_string()).await;

    // Pump until shard 7 stalls mid-run, then kill its instance.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while !marks.join("stalled").exists() {
        stack.pump_once(&ports, false).await;
        assert!(std::time::Instant::now() < deadline, "shard {VICTIM} never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let record = stack.record(&ports, "frames-1").await.expect("record");
    let plan = record.plan.clone().expect("plan");
    assert_eq!((plan.instance_count, plan.items), (SHARDS as u32, Some(ITEMS as u64)));
    let victim = record.shards[VICTIM].current().and_then(|a| a.instance_id.clone()).expect("instance");
    std::fs::write(marks.join("killed"), "").expect("mark");
    stack.ec2().terminate_instances().instance_ids(&victim).send().await.expect("terminate");
    let record = stack.run_to_end(&ports, "frames-1", false, Duration::from_secs(600)).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));

    // Shard 7 ran twice: its first attempt was lost, the retry succeeded.
    let shard = &record.shards[VICTIM];
    assert_eq!(shard.attempts.len(), 2, "{:?}", shard.trail);
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));
    let retry = shard.attempts[1].instance_id.clone().expect("retry instance");
    assert!(record.shards.iter().enumerate().all(|(i, s)| i == VICTIM || s.attempts.len() == 1));

    // What each instance processed, from its own log.
    let processed = |instance: &str| -> Vec<String> {
        std::fs::read_to_string(marks.join(format!("processed-{instance}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    // Every item exactly once across the attempts that succeeded, and each
    // shard's items a contiguous, balanced slice of the listing.
    let mut done: Vec<String> = Vec::new();
    for (index, shard) in record.shards.iter().enumerate() {
        let instance = shard.current().and_then(|a| a.instance_id.clone()).expect("instance");
        let mine = processed(&instance);
        assert_eq!(mine.len(), ITEMS / SHARDS, "shard {index} processed {} items", mine.len());
        assert_eq!(mine[..], items[index * 10..index * 10 + 10], "shard {index} has its own slice");
        done.extend(mine);
    }
    let unique: BTreeSet<&String> = done.iter().collect();
    assert_eq!((done.len(), unique.len()), (ITEMS, ITEMS), "every item once");
    // The lost attempt did part of shard 7's items and none of anyone else's;
    // the retry redid exactly shard 7's.
    let lost = processed(&victim);
    assert_eq!(lost, items[VICTIM * 10..VICTIM * 10 + 1], "the lost attempt stalled after its first item");
    assert_eq!(processed(&retry), items[VICTIM * 10..VICTIM * 10 + 10]);

    // One SendCommand per 50 shards and phase (a phase's stragglers wait a
    // moment for the rest), plus the retried shard's own sends.
    let mut pages = stack.ssm().list_commands().into_paginator().items().send();
    let mut sends: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    while let Some(command) = pages.next().await {
        let command = command.expect("list commands");
        let comment = command.comment().unwrap_or_default().to_string();
        if let Some(phase) = comment.strip_prefix("flotilla frames-1 ").and_then(|r| r.split(' ').next()) {
            sends.entry(phase.to_string()).or_default().push(command.instance_ids().to_vec());
        }
    }
    for phase in [Phase::Run, Phase::BeforeUnmount] {
        let calls = sends.get(phase.as_str()).cloned().unwrap_or_default();
        let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|n| *n <= 50), "{phase:?}: {sizes:?}");
        let ids: BTreeSet<&String> = calls.iter().flatten().collect();
        // Run: every first attempt and the retry. before_unmount: the 99 that
        // finished their run, and the retry (the lost attempt never got there).
        let expected = if phase == Phase::Run { SHARDS + 1 } else { SHARDS };
        assert_eq!((ids.len(), sizes.iter().sum::<usize>()), (expected, expected), "{phase:?}: each once");
        // The first attempts go out in ⌈100/50⌉ calls. The retry may catch up
        // and share one of them, or take a call of its own.
        let first_wave = calls.iter().filter(|ids| ids.iter().any(|id| *id != retry)).count();
        assert_eq!(first_wave, SHARDS.div_ceil(50), "{phase:?}: {sizes:?}");
        assert!(calls.len() <= SHARDS.div_ceil(50) + 1, "{phase:?}: {sizes:?}, the retry's own at most");
    }
    // The report prices what ran.
    let report = flotilla_shared::report::render(&record);
    assert!(report.contains("items: 1000 over 100 shards"), "{report}");
    assert!(report.contains("realized: "), "{report}");
    assert_eq!(stack.running_managed().await, 0);
}

/// A resubmission of a running job, even with another shard count, is not
/// listed or planned again: the running job's manifests stay as they were.
#[tokio::test]
async fn resubmitting_a_running_job_never_rewrites_its_manifests() {
    use flotilla_shared::intake::{self, Intake};
    use flotilla_testkit::fake::FakeCloud;
    let cloud = FakeCloud::new(flotilla_testkit::sim::start_time());
    let ports = cloud.ports(flotilla_testkit::sim::settings());
    let mut spec = job("resubmit-1");
    spec["work"] = serde_json::json!({"list": (0..20).map(|i| format!("item-{i}")).collect::<Vec<_>>()});
    spec["fleet"] = serde_json::json!({"count": 10});
    let first = intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    assert_eq!(first, Intake::Accepted { job_id: "resubmit-1".into() });
    let manifests = |cloud: &FakeCloud| -> BTreeMap<String, Vec<u8>> {
        cloud
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with("work/resubmit-1/"))
            .map(|(k, (body, _))| (k.clone(), body.clone()))
            .collect()
    };
    let before = manifests(&cloud);
    assert_eq!(before.len(), 10);
    spec["fleet"] = serde_json::json!({"count": 5});
    let again = intake::submit(&ports, &spec.to_string(), "m-2", None).await.expect("intake");
    assert_eq!(again, Intake::AlreadyKnown { job_id: "resubmit-1".into() });
    assert_eq!(manifests(&cloud), before, "no manifest written or changed");
    let record = cloud.record("resubmit-1").expect("record");
    assert_eq!(record.plan.and_then(|p| p.items), Some(20));
    assert_eq!(
        record.spec.and_then(|s| s.work),
        Some(flotilla_shared::spec::WorkSpec::List(vec![])),
        "the list lives in the manifests"
    );
}
