//! Lineage worlds on the simulated cloud (`shared/src/sim/lineages.rs`):
//! many runs of one job name, overlapping, failing, restored from by other
//! jobs, with the reaper acting. Then, for each lineage invariant, its
//! mutation switch on (`mutation.rs`): the checker must fire.

use crate::fingerprint::{world_figures, Fingerprint};
use flotilla_shared::mutation::{self, Mutation};
use flotilla_testkit::fake::Faults;
use flotilla_testkit::sim::lineages::{self, consumer_spec, run_spec, LineageCampaign, PlannedJob, World};

/// `make test` runs a few worlds; `make chaos` runs FLOTILLA_SIM_WORLDS and
/// prints the mix; FLOTILLA_SIM_WORLD replays one world.
#[tokio::test]
async fn lineage_worlds_hold_every_invariant() {
    if let Ok(seed) = std::env::var("FLOTILLA_SIM_WORLD") {
        let world = lineages::world(seed.parse().expect("FLOTILLA_SIM_WORLD is a number"));
        let result = lineages::run(&world).await;
        println!("{world:#?}\n{:?}\n{}", result.violations, result.trace.join("\n"));
        assert!(result.violations.is_empty());
        return;
    }
    let worlds: u64 = std::env::var("FLOTILLA_SIM_WORLDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let started = std::time::Instant::now();
    let mut campaign = LineageCampaign::default();
    let fingerprint = Fingerprint::open("worlds");
    let mut drift = Vec::new();
    for seed in 1..=worlds {
        let world = lineages::world(seed);
        let result = lineages::run(&world).await;
        drift.extend(fingerprint.check(&format!("world {seed}"), world_figures(&result)));
        campaign.add(&world, &result);
        if seed % 25 == 0 {
            eprintln!("{seed} worlds simulated, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    println!("{:.0} s", started.elapsed().as_secs_f64());
    campaign.print();
    drift.extend(fingerprint.unseen("world", worlds));
    fingerprint.finish();
    assert!(drift.is_empty(), "the simulator's figures moved from tests/fingerprint/worlds.txt:\n{}", drift.join("\n"));
    // The mix the invariants need, so none of them passes by checking nothing.
    assert!(campaign.runs > campaign.lineages, "several runs per lineage");
    let succeeded = campaign.states.get("SUCCEEDED").copied().unwrap_or(0);
    assert!(succeeded > campaign.lineages, "good runs to keep: {:?}", campaign.states);
    assert!(campaign.overlapping > 0 && campaign.consumers > 0 && campaign.cancels_first > 0, "{campaign:?}");
    assert!(campaign.rescues > 0 && campaign.bound_stops > 0, "{campaign:?}");
    assert!(campaign.reaper_actions.get("delete_snapshot").is_some_and(|n| *n > 0), "{campaign:?}");
    assert!(
        campaign.failed_seeds.is_empty(),
        "replay one with `make chaos WORLD=<seed>`:\n{}",
        campaign.failed_seeds.join("\n")
    );
}

fn planned(at: i64, spec: serde_json::Value, lineage: Option<usize>) -> PlannedJob {
    PlannedJob { at, spec, lineage, source_of: None, cancel_at: None, kill_after: None, orphan_after: false }
}

fn quiet_world(seed: u64, jobs: Vec<PlannedJob>) -> World {
    World { seed, lineages: 1, jobs, faults: Faults { yield_rate: 0.3, ..Faults::default() }, duplicate: 0.0 }
}

/// The world with and without the mutation: clean without it, and the named
/// invariant fires with it.
async fn fires(world: World, switch: Mutation, invariant: &str) {
    let clean = lineages::run(&world).await;
    assert!(clean.violations.is_empty(), "without {switch:?}: {:?}", clean.violations);
    mutation::set(Some(switch));
    let broken = lineages::run(&world).await;
    mutation::set(None);
    assert!(
        broken.violations.iter().any(|(name, _)| name == invariant),
        "{switch:?} did not make `{invariant}` fire: {:?}",
        broken.violations
    );
}

fn name(seed: u64) -> String {
    format!("lin0-{seed}")
}

/// A good run, then a failed one: counting the failed run's snapshot as
/// good lets the reaper prune the only good one.
#[tokio::test]
async fn newest_good_checker_fires_when_failed_runs_count() {
    let jobs = vec![
        planned(0, run_spec("m1-good", &name(9001), 1, "always", 120, 0), Some(0)),
        planned(1500, run_spec("m1-failed", &name(9001), 1, "always", 120, 3), Some(0)),
    ];
    fires(quiet_world(9001, jobs), Mutation::CountEveryRun, "newest good snapshot").await;
}

/// A job restores from the lineage's snapshot while a newer run prunes it.
#[tokio::test]
async fn source_checker_fires_when_prunes_ignore_claims() {
    let mut consumer = planned(1500, consumer_spec("m2-user", 3000), None);
    consumer.source_of = Some(0);
    let jobs = vec![
        planned(0, run_spec("m2-r0", &name(9002), 1, "on-success", 120, 0), Some(0)),
        consumer,
        planned(1800, run_spec("m2-r1", &name(9002), 1, "on-success", 120, 0), Some(0)),
    ];
    fires(quiet_world(9002, jobs), Mutation::IgnoreClaims, "active job's snapshots").await;
}

/// An orphaned volume of the lineage is rescued by the reaper; the next
/// successful run must not prune the rescue snapshot.
#[tokio::test]
async fn rescue_checker_fires_when_rescues_join_the_lineage() {
    let mut first = planned(0, run_spec("m3-r0", &name(9003), 1, "on-success", 120, 0), Some(0));
    first.orphan_after = true;
    let jobs = vec![first, planned(4000, run_spec("m3-r1", &name(9003), 1, "on-success", 120, 0), Some(0))];
    fires(quiet_world(9003, jobs), Mutation::PruneRescues, "rescue snapshot").await;
}

/// Snapshots that end in error must not stay.
#[tokio::test]
async fn error_checker_fires_when_errors_are_kept() {
    let jobs = (0..4)
        .map(|r| planned(r * 1200, run_spec(&format!("m4-r{r}"), &name(9004), 2, "always", 120, 0), Some(0)))
        .collect();
    let mut world = quiet_world(9004, jobs);
    world.faults.snapshot_error = 0.4;
    fires(world, Mutation::KeepErrors, "snapshot in error").await;
}

/// The run outlasts the deadline and `before_unmount` would run an hour:
/// without the bound, the instance lives well past deadline plus grace.
#[tokio::test]
async fn bound_checker_fires_without_the_bound() {
    let mut spec = run_spec("m5-r0", &name(9005), 1, "always", 4000, 0);
    spec["before_unmount"] = serde_json::json!({"script": ": sim-step 5000 0", "timeout_seconds": 3600});
    fires(quiet_world(9005, vec![planned(0, spec, Some(0))]), Mutation::NoBound, "instance past its bound").await;
}
