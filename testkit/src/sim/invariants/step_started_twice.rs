//! A user's step started at most once per shard, attempt (its instance) and
//! phase, counted where it ran.

use super::*;

pub const NAME: &str = "step started twice";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { state, .. } = *ended;
    let mut starts: BTreeMap<&String, usize> = BTreeMap::new();
    for (key, _) in &state.evidence.step_starts {
        *starts.entry(key).or_default() += 1;
    }
    for (key, count) in starts.iter().filter(|(_, n)| **n > 1) {
        found(violations, NAME, format!("{key}: started {count} times"));
    }
}
