//! The race `sources.rs` closes: intake accepting a job that names a
//! snapshot while a prune deletes that snapshot. The two run interleaved at
//! every await point the simulated cloud yields at, one seed per schedule:
//! a job is never accepted with a snapshot that is then deleted.

use std::collections::BTreeMap;

use chrono::Duration;
use flotilla_shared::intake::{self, Intake};
use flotilla_shared::mutation::{self, Mutation};
use flotilla_shared::record::JobState;
use flotilla_shared::sources;
use flotilla_shared::tags;
use flotilla_testkit::fake::{FakeCloud, Faults, Latencies};
use flotilla_testkit::sim;

use crate::moto::job;

#[derive(Debug, Default)]
struct Tally {
    /// The job was accepted and its snapshot kept.
    kept: u32,
    /// The snapshot was deleted first: the job was refused (it does not exist).
    refused: u32,
    /// Intake saw the deletion under way and asked for the message again.
    retried: u32,
    /// The job was accepted and its snapshot deleted: the bug.
    lost: Vec<u64>,
}

async fn race(seed: u64) -> Tally {
    let faults = Faults { yield_rate: 0.5, ..Faults::default() };
    let cloud = FakeCloud::seeded(sim::start_time(), seed, Latencies::quick(), faults);
    let ports = cloud.ports(sim::settings());
    let volume = cloud.add_volume(BTreeMap::new());
    let allow = BTreeMap::from([(tags::ALLOW.to_string(), ports.settings.stack.clone())]);
    let snapshot = ports.cloud.volumes.create_snapshot(&volume, "seed", &allow).await.expect("snapshot");
    let later = cloud.now() + Duration::minutes(30);
    cloud.advance_to(later);
    let mut spec = job(&format!("user-{seed}"));
    spec["fleet"] = serde_json::json!({"count": 1});
    spec["volumes"][0]["source"] = serde_json::json!({"snapshot_id": snapshot});
    spec["volumes"][0]["snapshot"] = serde_json::json!("never");
    let body = spec.to_string();
    let (accepted, deleted) = tokio::join!(
        intake::submit(&ports, &body, "m-1", None),
        sources::delete_unless_claimed(&ports, &ports.cloud, &snapshot)
    );
    let mut tally = Tally::default();
    let exists = cloud.lock().snapshots.iter().any(|s| s.id == snapshot);
    let state = cloud.record(&format!("user-{seed}")).map(|r| r.state);
    match (accepted, state) {
        (Err(_), _) => tally.retried += 1,
        (Ok(Intake::Accepted { .. }), Some(state)) if state != JobState::Rejected => {
            if exists {
                tally.kept += 1;
            } else {
                tally.lost.push(seed);
            }
        }
        (Ok(_), _) => tally.refused += 1,
    }
    assert!(deleted.is_ok(), "seed {seed}: {deleted:?}");
    tally
}

async fn campaign(seeds: u64) -> Tally {
    let mut all = Tally::default();
    for seed in 1..=seeds {
        let one = race(seed).await;
        all.kept += one.kept;
        all.refused += one.refused;
        all.retried += one.retried;
        all.lost.extend(one.lost);
    }
    all
}

#[tokio::test]
async fn a_job_is_never_accepted_with_a_snapshot_a_prune_then_deletes() {
    let tally = campaign(300).await;
    println!("{tally:?}");
    assert!(tally.lost.is_empty(), "accepted, then its snapshot deleted: seeds {:?}", tally.lost);
    // The schedules reached every outcome: the race was run, not avoided.
    assert!(tally.kept > 0 && tally.refused > 0 && tally.retried > 0, "{tally:?}");
}

/// With the prune not re-reading the claims, some schedule loses the snapshot.
#[tokio::test]
async fn the_race_is_lost_when_prunes_ignore_claims() {
    mutation::set(Some(Mutation::IgnoreClaims));
    let tally = campaign(300).await;
    mutation::set(None);
    assert!(!tally.lost.is_empty(), "{tally:?}");
}
