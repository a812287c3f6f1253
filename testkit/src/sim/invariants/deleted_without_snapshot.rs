//! No volume whose snapshot the policy requires was deleted before one of
//! its snapshots completed, as the cloud recorded the delete.

use super::*;

pub const NAME: &str = "deleted without snapshot";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { record, spec, state, .. } = *ended;
    for attempt in record.attempts() {
        for volume in attempt.volumes.iter().filter(|v| snapshot_required(spec, attempt, v)) {
            let Some(volume_id) = &volume.volume_id else { continue };
            let deleted = state.evidence.deleted_volumes.iter().find(|(id, _, _)| id == volume_id);
            if deleted.is_some_and(|(_, _, completed)| completed.is_empty()) {
                found(violations, NAME, volume_id.clone());
            }
        }
    }
}
