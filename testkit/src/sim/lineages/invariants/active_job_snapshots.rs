//! Every snapshot an active job names, or took (and may restore from),
//! survives while the job runs.

use super::*;

pub const NAME: &str = "active job's snapshots";

pub fn check(live: &Live<'_>, found: &mut Found) {
    let Live { world, submitted, sources, states, state, now } = *live;
    let exists = |id: &str| state.snapshots.iter().any(|s| s.id == id);
    for i in submitted.keys() {
        let spec = &world.jobs[*i].spec;
        let id = spec["id"].as_str().unwrap_or_default();
        if states.get(id).is_none_or(|s| s.is_terminal()) {
            continue;
        }
        if let Some(named) = sources.get(id).filter(|named| !exists(named)) {
            found.push((NAME, format!("{id} restores from {named}, which is gone")));
        }
        for taken in state.evidence.snapshots_created.iter().filter(|s| tag(s, tags::JOB_ID) == id && completed(s, now))
        {
            if !exists(&taken.id) {
                found.push((NAME, format!("{id} may restore from {}, which is gone", taken.id)));
            }
        }
    }
}
