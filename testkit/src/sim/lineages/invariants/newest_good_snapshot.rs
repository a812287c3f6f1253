//! The newest good snapshot of every lineage (job name, volume, shard)
//! survives: the last snapshot a SUCCEEDED run took of it, the newest such
//! run's, as the cloud's history of creates shows it.

use super::*;

pub const NAME: &str = "newest good snapshot";

pub fn check(live: &Live<'_>, found: &mut Found) {
    let Live { states, state, now, .. } = *live;
    let exists = |id: &str| state.snapshots.iter().any(|s| s.id == id);
    let mut finals: BTreeMap<(String, String, String, String), &FakeSnapshot> = BTreeMap::new();
    for snapshot in state.evidence.snapshots_created.iter().filter(|s| tag(s, tags::REAPED) != "true") {
        let job = tag(snapshot, tags::JOB_ID).to_string();
        if states.get(&job) != Some(&JobState::Succeeded) {
            continue;
        }
        let key = (
            job,
            tag(snapshot, tags::JOB_NAME).into(),
            tag(snapshot, tags::VOLUME).into(),
            tag(snapshot, tags::SHARD).into(),
        );
        finals.insert(key, snapshot); // history is in creation order: the last one wins
    }
    let mut newest: BTreeMap<(String, String, String), &FakeSnapshot> = BTreeMap::new();
    for ((_, name, volume, shard), snapshot) in finals {
        let entry = newest.entry((name, volume, shard)).or_insert(snapshot);
        if snapshot.started_at > entry.started_at {
            *entry = snapshot;
        }
    }
    for ((name, volume, shard), snapshot) in &newest {
        if completed(snapshot, now) && !exists(&snapshot.id) {
            found.push((NAME, format!("{name}/{volume} shard {shard}: {} is gone", snapshot.id)));
        }
    }
}
