//! Every instance stopped by the bound on the bill (the deadline or a
//! cancel, plus the cleanup grace), as the scenario scheduled them, within
//! a slack.

use super::*;

pub const NAME: &str = "instance past its bound";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { scenario, record, state, .. } = *ended;
    let deadline = scenario.spec["deadline_minutes"].as_i64().unwrap_or(60) * 60;
    // From when intake took the cancel in (a redelivered one comes later).
    let cancelled = record.cancel_requested_at.map(|at| (at - start_time()).num_seconds());
    let stop = cancelled.map_or(deadline, |at| at.min(deadline));
    let bound = start_time() + Duration::seconds(stop) + Duration::minutes(i64::from(settings().cleanup_grace_minutes));
    for instance in &state.instances {
        let Some(stopped) = instance.shutting_down_at.or(instance.terminated_at) else { continue };
        let late = (stopped - bound).num_seconds();
        if late > lineages::BOUND_SLACK_MINUTES * 60 {
            found(violations, NAME, format!("{}: {late} s past it", instance.id));
        }
    }
}
