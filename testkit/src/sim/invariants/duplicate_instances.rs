//! 0 duplicate instances for one slot attempt: a launch token never yields
//! more instances than attempts were given it, and no instance serves two
//! attempts.

use super::*;

pub const NAME: &str = "duplicate instances";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { record, state, .. } = *ended;
    let mut given: BTreeMap<String, usize> = BTreeMap::new();
    for attempt in record.attempts() {
        if let Some(token) = &attempt.launch_token {
            *given.entry(token.clone()).or_default() += 1;
        }
    }
    let mut launched: BTreeMap<String, usize> = BTreeMap::new();
    for instance in &state.instances {
        let token = instance.tags.get(flotilla_shared::tags::LAUNCH).cloned().unwrap_or_default();
        *launched.entry(token).or_default() += 1;
    }
    for (token, count) in &launched {
        let allowed = given.get(token).copied().unwrap_or(0);
        if *count > allowed {
            found(violations, NAME, format!("token {token}: {count} instances for {allowed} attempts"));
        }
    }
    let ids = record.instance_ids();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    if distinct.len() != ids.len() {
        found(violations, NAME, "an instance serves two attempts".into());
    }
}
