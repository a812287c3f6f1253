//! "A step runs once" in the simulator: a send or snapshot whose reply was
//! lost, while lookups lag. Each test runs a scenario clean, then with a
//! mutation switch (`mutation.rs`) on: the named checker must fire.

use flotilla_shared::mutation::{self, Mutation};
use flotilla_testkit::fake::Latencies;
use flotilla_testkit::sim::{self, Scenario};
use serde_json::json;

/// One shard, no volumes, a 300 s run: the first SendCommand is the run's.
fn one_step(seed: u64, lag: i64) -> Scenario {
    let mut scenario = sim::clean_scenario(seed, 1);
    scenario.spec["volumes"] = json!([]);
    scenario.spec.as_object_mut().expect("object").remove("setup");
    scenario.spec.as_object_mut().expect("object").remove("before_unmount");
    scenario.latencies = Latencies { lookup_lag: (lag, lag), ..Latencies::realistic() };
    scenario.faults.lose_reply = vec!["SendCommand"];
    scenario
}

async fn fires(scenario: &Scenario, switch: Mutation, invariant: &str) -> sim::SimResult {
    let clean = sim::run(scenario).await;
    assert!(clean.violations.is_empty(), "without {switch:?}: {:?}", clean.violations);
    mutation::set(Some(switch));
    let broken = sim::run(scenario).await;
    mutation::set(None);
    assert!(
        broken.violations.iter().any(|(name, _)| name == invariant),
        "{switch:?} did not make `{invariant}` fire: {:?}",
        broken.violations
    );
    clean
}

/// Lookups lag past the takeover rule's window (an assumption AWS does not
/// promise): the send is made again while the first still runs. The guard
/// holds the second delivery; without it the step starts twice.
#[tokio::test]
async fn a_resent_step_starts_once_and_twice_without_the_guard() {
    let scenario = one_step(9101, 400);
    let clean = fires(&scenario, Mutation::NoGuard, "step started twice").await;
    assert_eq!(clean.state, Some(flotilla_shared::record::JobState::Succeeded));
    assert!(clean.recoveries.get("re-delivery the guard answered").is_some_and(|n| *n >= 1), "{:?}", clean.recoveries);
}

/// Lookups lag within the window: the takeover rule waits for the lost
/// send to show instead of sending again.
#[tokio::test]
async fn a_lost_send_is_found_not_resent_while_it_may_be_in_flight() {
    let scenario = one_step(9102, 60);
    let result = sim::run(&scenario).await;
    assert!(result.violations.is_empty(), "{:?}", result.violations);
    assert_eq!(
        result.recoveries.get("re-delivery the guard answered").copied().unwrap_or(0),
        0,
        "{:?}",
        result.recoveries
    );
    mutation::set(Some(Mutation::NoFence));
    let eager = sim::run(&scenario).await;
    mutation::set(None);
    assert!(
        eager.recoveries.get("re-delivery the guard answered").is_some_and(|n| *n >= 1),
        "without the rule the send is made again at once: {:?}",
        eager.recoveries
    );
}

/// A cancel while the run's send may still land (its reply lost, and
/// ListCommands not showing it). Within the assumed lag the reconciler
/// finds and cancels it before cleanup; past it (400 s), the window ends,
/// the run is taken for never sent, and cleanup goes out while it runs:
/// then the cleanup script's work fence waits for the run. Without the
/// fence, `before_unmount` runs beside it.
#[tokio::test]
async fn a_cancel_never_starts_cleanup_beside_a_step_that_may_land() {
    let cancelled = |lag: i64| {
        let mut scenario = one_step(9104, lag);
        scenario.latencies = Latencies { lookup_lag: (lag, lag), ..Latencies::quick() };
        scenario.spec["before_unmount"] = json!({"script": "sleep 5", "timeout_seconds": 300});
        scenario.spec["run"] = json!({"script": "sleep 1500", "timeout_seconds": 1800});
        scenario.cancel_at = Some(130);
        scenario.recoverable = false;
        scenario
    };
    let found = sim::run(&cancelled(60)).await;
    assert!(found.violations.is_empty(), "{:?}", found.violations);
    assert_eq!(found.state, Some(flotilla_shared::record::JobState::Cancelled));
    let clean = fires(&cancelled(400), Mutation::NoWorkFence, "work beside cleanup").await;
    assert_eq!(clean.state, Some(flotilla_shared::record::JobState::Cancelled));
    // The run that landed unseen is found and cancelled once ListCommands
    // shows it, so cleanup does not wait for it until its own timeout.
    let stuck = clean.recoveries.get("cleanup timed out behind the work fence").copied();
    assert_eq!(stuck, Some(0), "{:?}", clean.recoveries);
}

/// A CreateSnapshot whose reply was lost, with DescribeSnapshots lagging:
/// one snapshot per volume and attempt, and two without the takeover rule.
#[tokio::test]
async fn a_lost_snapshot_is_adopted_and_taken_twice_without_the_rule() {
    let mut scenario = sim::clean_scenario(9103, 1);
    scenario.latencies = Latencies { lookup_lag: (60, 60), ..Latencies::realistic() };
    scenario.faults.lose_reply = vec!["CreateSnapshot"];
    fires(&scenario, Mutation::NoFence, "two snapshots of one attempt").await;
}

/// The simulated cloud, as the DetachVolume reference says: a volume still
/// mounted stays attached (busy) after DetachVolume until it is unmounted;
/// a forced detach does not wait. (Flotilla itself never detaches a volume
/// it mounted: it terminates the instance.)
#[tokio::test]
async fn a_mounted_volume_detaches_only_once_unmounted() {
    use flotilla_shared::ports::{CommandRequest, Commands, NewVolume, Volumes};
    use flotilla_shared::shell::{quote, VOLUME_OP_MARKER};
    use flotilla_shared::tags;
    use flotilla_testkit::fake::{FakeCloud, FakeInstance};
    let now = sim::start_time();
    let cloud = FakeCloud::new(now);
    cloud.lock().instances.push(FakeInstance {
        id: "i-1".into(),
        state: "running".into(),
        az: "us-east-1a".into(),
        instance_type: "m7i.large".into(),
        market: flotilla_shared::spec::Market::OnDemand,
        tags: std::collections::BTreeMap::from([(tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string())]),
        launched_at: now,
        running_at: now,
        online_at: Some(now),
        terminated_at: None,
        shutting_down_at: None,
        launch_index: 0,
        visible_at: now,
        agent_lost_at: None,
        impaired_at: None,
        agent_away: None,
    });
    let mut volumes = Vec::new();
    for token in ["t-1", "t-2"] {
        let request = NewVolume {
            availability_zone: "us-east-1a".into(),
            size_gib: Some(1),
            volume_type: "gp3".into(),
            snapshot_id: None,
            tags: Default::default(),
            client_token: token.into(),
        };
        let id = cloud.create_volume(&request).await.expect("volume").volume_id;
        cloud.attach(&id, "i-1", "/dev/sdf").await.expect("attach");
        volumes.push(id);
    }
    let op = |name: &str, volume: &str| CommandRequest {
        instance_ids: vec!["i-1".into()],
        lines: vec![
            format!("{VOLUME_OP_MARKER} {name}"),
            format!("  {}) VOLUME_ID={} BLANK=1 ;;", quote("i-1"), quote(volume)),
        ],
        timeout_seconds: 600,
        comment: format!("flotilla j {name} c1"),
        output_bucket: "b".into(),
        output_prefix: "o".into(),
        log_group: None,
    };
    cloud.send(&op("mount", &volumes[0])).await.expect("mount");
    cloud.advance_to(now + chrono::Duration::seconds(30));
    let state = |id: &str| cloud.lock().volumes.iter().find(|v| v.id == id).map(|v| v.state.clone());
    cloud.detach(&volumes[0], "i-1", false).await.expect("detach");
    cloud.detach(&volumes[1], "i-1", false).await.expect("detach the unmounted one");
    cloud.advance_to(now + chrono::Duration::seconds(600));
    assert_eq!(state(&volumes[0]).as_deref(), Some("in-use"), "busy while mounted");
    assert_eq!(state(&volumes[1]).as_deref(), Some("available"), "never mounted: detached");
    cloud.send(&op("unmount", &volumes[0])).await.expect("unmount");
    cloud.advance_to(now + chrono::Duration::seconds(700));
    assert_eq!(state(&volumes[0]).as_deref(), Some("available"), "detached once unmounted");
}
