//! 0 managed volumes left, apart from those the record says it kept (and why).

use super::*;

pub const NAME: &str = "volumes left";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { record, state, .. } = *ended;
    let kept: BTreeSet<String> = record
        .attempts()
        .flat_map(|a| a.volumes.iter())
        .filter(|v| v.kept.is_some())
        .filter_map(|v| v.volume_id.clone())
        .collect();
    let leaked: Vec<&String> = state
        .volumes
        .iter()
        .filter(|v| v.state != "deleted")
        .filter(|v| !kept.contains(&v.id))
        .map(|v| &v.id)
        .collect();
    if !leaked.is_empty() {
        found(violations, NAME, format!("{leaked:?}"));
    }
}
