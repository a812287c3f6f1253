//! 0 managed instances not terminated once the job ended.

use super::*;

pub const NAME: &str = "instances left";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { state, .. } = *ended;
    let alive: Vec<&String> = state
        .instances
        .iter()
        .filter(|i| !matches!(i.state.as_str(), "terminated" | "shutting-down"))
        .map(|i| &i.id)
        .collect();
    if !alive.is_empty() {
        found(violations, NAME, format!("{} not terminated: {alive:?}", alive.len()));
    }
}
