//! Every instance stopped by its job's bound on the bill (the deadline, or
//! the cancel, plus the cleanup grace), within BOUND_SLACK_MINUTES.

use super::*;

pub const NAME: &str = "instance past its bound";

/// Gives the latest an instance stopped past its bound, in seconds.
pub fn check(end: &End<'_>, found: &mut Found) -> i64 {
    let mut latest = i64::MIN;
    for instance in &end.state.instances {
        if !matches!(instance.state.as_str(), "terminated" | "shutting-down") {
            continue;
        }
        let job = instance.tags.get(tags::JOB_ID).cloned().unwrap_or_default();
        let (Some(bound), Some(stopped)) = (end.bounds.get(&job), instance.shutting_down_at.or(instance.terminated_at))
        else {
            continue;
        };
        let late = (stopped - *bound).num_seconds();
        latest = latest.max(late);
        if late > BOUND_SLACK_MINUTES * 60 {
            found.push((NAME, format!("{} of {job}: {late} s past it", instance.id)));
        }
    }
    latest
}
