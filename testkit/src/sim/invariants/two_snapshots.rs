//! At most one snapshot (not ended in error) per volume and attempt.

use super::*;

pub const NAME: &str = "two snapshots of one attempt";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { state, .. } = *ended;
    let mut taken: BTreeMap<(&String, Option<&String>), Vec<&String>> = BTreeMap::new();
    for snapshot in state.evidence.snapshots_created.iter().filter(|s| !s.fails) {
        taken
            .entry((&snapshot.volume_id, snapshot.tags.get(flotilla_shared::tags::ATTEMPT)))
            .or_default()
            .push(&snapshot.id);
    }
    for ((volume, _), ids) in taken.iter().filter(|(_, ids)| ids.len() > 1) {
        found(violations, NAME, format!("{volume}: {ids:?}"));
    }
}
