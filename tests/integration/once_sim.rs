//! "A step runs once" in the simulator: a send or snapshot whose reply was
//! lost, while lookups lag. Each test runs a scenario clean, then with a
//! mutation switch (`mutation.rs`) on: the named checker must fire.

use flotilla_shared::fake::Latencies;
use flotilla_shared::mutation::{self, Mutation};
use flotilla_shared::sim::{self, Scenario};
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
    assert_eq!(result.recoveries.get("re-delivery the guard answered").copied().unwrap_or(0), 0, "{:?}", result.recoveries);
    mutation::set(Some(Mutation::NoFence));
    let eager = sim::run(&scenario).await;
    mutation::set(None);
    assert!(
        eager.recoveries.get("re-delivery the guard answered").is_some_and(|n| *n >= 1),
        "without the rule the send is made again at once: {:?}",
        eager.recoveries
    );
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
