//! Boot and health: an instance's status checks and its agent.

use super::*;

/// Fold this pass's health check into the attempt: since when its status
/// checks fail, and since when its agent (while working) has not been Online.
pub(super) fn track_health(
    attempt: &mut Attempt,
    instance: Option<&InstanceView>,
    obs: &Observation,
    now: DateTime<Utc>,
) {
    let Some(view) = instance.filter(|v| v.state == InstanceState::Running) else { return };
    let id = &view.instance_id;
    // Only a conclusive `ok` clears it: initializing or unknown proves nothing.
    if obs.impaired.contains(id) {
        attempt.impaired_since.get_or_insert(now);
    } else if obs.healthy.contains(id) {
        attempt.impaired_since = None;
    }
    if attempt.stage == Stage::Working && obs.agents_checked.contains(id) {
        if obs.online.contains(id) {
            attempt.agent_lost_since = None;
        } else {
            attempt.agent_lost_since.get_or_insert(now);
            attempt.agent_away_seen_at = Some(now);
        }
    }
}

/// A running instance the job can no longer use: status checks impaired
/// for minutes, or an agent silent while it works. It is replaced like a
/// terminated one (its work, if unfinished, is retried).
pub(super) fn unhealthy(
    attempt: &Attempt,
    instance_id: &str,
    now: DateTime<Utc>,
    settings: &Settings,
) -> Option<String> {
    let impaired_limit = Duration::seconds(i64::from(settings.impaired_timeout_seconds));
    if let Some(since) = attempt.impaired_since.filter(|at| now - *at >= impaired_limit) {
        return Some(format!(
            "instance {instance_id} failed its EC2 status checks (impaired) for {} s",
            (now - since).num_seconds()
        ));
    }
    let limit = Duration::seconds(i64::from(settings.agent_timeout_seconds));
    if let Some(since) = attempt.agent_lost_since.filter(|at| now - *at >= limit) {
        return Some(format!(
            "SSM agent of {instance_id} stopped reporting for {} s while it worked",
            (now - since).num_seconds()
        ));
    }
    None
}
