//! No snapshot ends in error, but a rescue snapshot of a volume still there
//! (the reaper tries again; the volume holds the data).

use super::*;

pub const NAME: &str = "snapshot in error";

pub fn check(end: &End<'_>, found: &mut Found) {
    let End { state, now, .. } = *end;
    let live_volumes: BTreeSet<&String> =
        state.volumes.iter().filter(|v| v.state != "deleted").map(|v| &v.id).collect();
    for snapshot in state.snapshots.iter().filter(|s| s.fails && now >= s.completes_at) {
        let rescue_of_live_volume = tag(snapshot, tags::REAPED) == "true" && live_volumes.contains(&snapshot.volume_id);
        if !rescue_of_live_volume {
            found.push((NAME, format!("{} ({})", snapshot.id, tag(snapshot, tags::JOB_ID))));
        }
    }
}
