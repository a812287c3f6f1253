//! Every rescue snapshot (the reaper's, of a volume it found orphaned) is
//! kept until its owner deletes it.

use super::*;

pub const NAME: &str = "rescue snapshot";

pub fn check(live: &Live<'_>, found: &mut Found) {
    let Live { state, now, .. } = *live;
    let exists = |id: &str| state.snapshots.iter().any(|s| s.id == id);
    for rescue in
        state.evidence.snapshots_created.iter().filter(|s| tag(s, tags::REAPED) == "true" && completed(s, now))
    {
        if !exists(&rescue.id) {
            found.push((NAME, format!("{} of {} is gone", rescue.id, rescue.volume_id)));
        }
    }
}
