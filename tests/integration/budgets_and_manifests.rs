//! Shared-crate functions exercised against the simulated cloud: work
//! manifests (`work.rs`) and the deployment's launch and call budgets
//! (`admission.rs`).

use chrono::Duration;
use flotilla_shared::admission::{take, take_calls};
use flotilla_shared::ports::Objects;
use flotilla_shared::work::{digest, manifest_key, write_manifests};
use flotilla_testkit::fake::FakeCloud;
use flotilla_testkit::sim;

#[tokio::test]
async fn manifests_balance_within_one_and_hold_every_item_once() {
    let cloud = FakeCloud::new(chrono::Utc::now());
    let items: Vec<String> = (0..1003).map(|i| format!("s3://in/frame-{i:05}.exr")).collect();
    let folder = write_manifests(&cloud, "j1", &items, 10).await.expect("written");
    assert_eq!(folder, format!("s3://{}/work/j1/{}/", cloud.bucket(), digest(&items, 10)));
    let key_folder = folder.split_once(&format!("{}/", cloud.bucket())).expect("bucket").1.to_string();
    let mut seen = Vec::new();
    for index in 0..10 {
        let body = cloud.get(&manifest_key(&key_folder, index)).await.expect("get").expect("exists");
        let lines: Vec<String> = String::from_utf8(body).expect("utf8").lines().map(str::to_string).collect();
        assert!(lines.len() == 100 || lines.len() == 101, "shard {index}: {}", lines.len());
        seen.extend(lines);
    }
    assert_eq!(seen, items, "every item once, in order");
    // Another listing, or another shard count, never overwrites these manifests.
    assert_ne!(digest(&items[1..], 10), digest(&items, 10));
    assert_ne!(digest(&items, 5), digest(&items, 10));
}

#[tokio::test]
async fn jobs_share_the_burst_then_the_refill() {
    let cloud = FakeCloud::new(sim::start_time());
    let t0 = sim::start_time();
    // Ten jobs of 100 take the 1,000-instance burst between them...
    for _ in 0..5 {
        assert_eq!(take(&cloud, 100, t0).await.expect("take").instances, 100);
    }
    // ... but only five requests burst: the sixth waits half a second's refill.
    let sixth = take(&cloud, 100, t0).await.expect("take");
    assert_eq!((sixth.instances, sixth.retry_after_seconds), (0, 1));
    let later = t0 + Duration::seconds(3);
    for _ in 0..5 {
        assert_eq!(take(&cloud, 100, later).await.expect("take").instances, 100);
    }
    // Burst spent: 10 s later, 20 instances have refilled.
    let partial = take(&cloud, 100, later + Duration::seconds(10)).await.expect("take");
    assert_eq!(partial.instances, 26, "3 s + 10 s at 2/s");
    let none = take(&cloud, 100, later + Duration::seconds(10)).await.expect("take");
    assert_eq!(none.instances, 0);
    assert!(none.retry_after_seconds >= 1);
}

#[tokio::test]
async fn mutating_calls_share_fifty_then_five_a_second() {
    let cloud = FakeCloud::new(sim::start_time());
    let t0 = sim::start_time();
    assert_eq!(take_calls(&cloud, 30, t0).await.expect("take").instances, 30);
    let second = take_calls(&cloud, 30, t0).await.expect("take");
    assert_eq!(second.instances, 20, "the rest of the burst");
    assert_eq!(second.retry_after_seconds, 2, "10 calls short refill in 2 s");
    let empty = take_calls(&cloud, 5, t0).await.expect("take");
    assert_eq!((empty.instances, empty.retry_after_seconds), (0, 1));
    assert_eq!(take_calls(&cloud, 100, t0 + Duration::seconds(3)).await.expect("take").instances, 15);
}
