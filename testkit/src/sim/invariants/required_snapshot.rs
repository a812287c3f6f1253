//! Every snapshot the policy requires exists in the cloud and completed
//! (unless the record kept the volume, and says why).

use super::*;

pub const NAME: &str = "required snapshot";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { record, spec, state, now, .. } = *ended;
    for attempt in record.attempts() {
        for volume in attempt.volumes.iter().filter(|v| snapshot_required(spec, attempt, v)) {
            let Some(volume_id) = &volume.volume_id else { continue };
            let snapshot_ok = volume
                .snapshot
                .as_ref()
                .and_then(|s| s.snapshot_id.as_ref())
                .and_then(|id| state.snapshots.iter().find(|s| &s.id == id))
                .is_some_and(|s| now >= s.completes_at && !s.fails);
            if !snapshot_ok && volume.kept.is_none() {
                found(violations, NAME, format!("{volume_id}: no completed snapshot"));
            }
        }
    }
}
