//! Settling an ended attempt: retry it, replace it, or give the shard its result.

use super::*;

/// An attempt is over and released: retry, fail over, or record the result.
pub(super) fn settle(job: &JobFacts<'_>, shard: &mut Shard, now: DateTime<Utc>) {
    let Some(attempt) = shard.attempts.last() else { return };
    let Some(ended) = attempt.end.clone() else {
        shard.result = Some(ShardResult { succeeded: false, reason: "attempt ended without a cause".into() });
        return;
    };
    match ended.cause {
        // The instance or its agent was lost during cleanup after the work
        // succeeded: the work stands (never run twice), but its snapshot is
        // crash-consistent and not counted as good.
        EndCause::Succeeded if attempt.cleanup_lost => {
            let what = attempt.cleanup_failed.clone().unwrap_or_default();
            shard.note(now, format!("{what}: the work stands; its snapshot is crash-consistent"));
            shard.result = Some(ShardResult { succeeded: true, reason: String::new() });
        }
        EndCause::Succeeded if attempt.cleanup_failed.is_some() => {
            let what = attempt.cleanup_failed.clone().unwrap_or_default();
            shard.result = Some(ShardResult {
                succeeded: false,
                reason: format!(
                    "cleanup failed: {what} (the work finished; its volume snapshot is kept, not counted as good)"
                ),
            });
        }
        EndCause::Succeeded => {
            shard.result = Some(ShardResult { succeeded: true, reason: String::new() });
        }
        EndCause::Aborted | EndCause::Permanent => {
            shard.result = Some(ShardResult { succeeded: false, reason: ended.detail.clone() });
        }
        EndCause::Capacity => fail_over(job, shard, &ended, now),
        cause
            if attempt.left_for_reaper.is_some()
                && attempt.held_until.is_none()
                && !attempt.completed_phases.contains(&Phase::Run) =>
        {
            // Its instance could not be terminated, so its work may still be
            // running: a retry could run the shard twice at once.
            let why = attempt.left_for_reaper.clone().unwrap_or_default();
            shard.result = Some(ShardResult {
                succeeded: false,
                reason: format!(
                    "{}: {}; not retried: instance {} could not be terminated ({why})",
                    cause.as_str(),
                    ended.detail,
                    attempt.instance_id.as_deref().unwrap_or("?")
                ),
            });
        }
        cause => retry_or_fail(job, shard, cause, &ended, now),
    }
}

/// Nothing was launched for want of capacity: the same attempt moves to
/// the next option (the trail keeps why), so the record stays small; none
/// left, the shard fails.
fn fail_over(job: &JobFacts<'_>, shard: &mut Shard, ended: &AttemptEnd, now: DateTime<Utc>) {
    let Some(attempt) = shard.attempts.last() else { return };
    let next = attempt.option + 1;
    if job.aborting {
        shard.result = Some(ShardResult { succeeded: false, reason: "job stopped".into() });
    } else if let Some(option) = launch_options(job.spec).get(next as usize) {
        shard.note(now, format!("{} -> failing over to {}", ended.detail, describe_option(option)));
        if let Some(attempt) = shard.attempts.last_mut() {
            *attempt = Attempt::new(attempt.number, next);
        }
    } else {
        shard.result = Some(ShardResult {
            succeeded: false,
            reason: format!("no capacity in any allowed option: {}", ended.detail),
        });
    }
}

/// The retry strategy decides: a new attempt (a spot interruption moves the
/// slot to on-demand when allowed), or the shard fails with why not.
fn retry_or_fail(job: &JobFacts<'_>, shard: &mut Shard, cause: EndCause, ended: &AttemptEnd, now: DateTime<Utc>) {
    let options = launch_options(job.spec);
    let strategy = job.spec.retry.clone().unwrap_or_default();
    let used = shard.attempts.last().map(|a| a.number).unwrap_or(1);
    let action = retry_action(&strategy, cause, ended.exit_code);
    if !job.aborting && action == RetryAction::Retry && used < strategy.attempts {
        let current = shard.attempts.last().cloned().expect("an attempt");
        let option = if cause == EndCause::SpotInterruption {
            options
                .iter()
                .position(|o| o.market == crate::spec::Market::OnDemand)
                .map(|p| p as u32)
                .unwrap_or(current.option)
        } else {
            current.option
        };
        let launch = options.get(option as usize).cloned().unwrap_or(LaunchOption {
            instance_type: "?".into(),
            subnet_id: None,
            market: crate::spec::Market::OnDemand,
        });
        shard.note(
            now,
            format!(
                "{}: {}; retrying (attempt {} of {}) on {}",
                cause.as_str(),
                ended.detail,
                used + 1,
                strategy.attempts,
                describe_option(&launch)
            ),
        );
        shard.attempts.push(Attempt::new(used + 1, option));
    } else {
        let why = if job.aborting {
            "job stopping".to_string()
        } else if action == RetryAction::Exit {
            "retry strategy says EXIT".to_string()
        } else {
            format!("{used} of {} attempts used", strategy.attempts)
        };
        shard.result =
            Some(ShardResult { succeeded: false, reason: format!("{}: {} ({why})", cause.as_str(), ended.detail) });
    }
}

/// AWS Batch's evaluateOnExit: the first matching rule decides, else the default.
pub fn retry_action(strategy: &RetryStrategy, cause: EndCause, exit_code: Option<i32>) -> RetryAction {
    for rule in &strategy.evaluate_on_exit {
        let code_ok = rule
            .on_exit_code
            .as_ref()
            .is_none_or(|p| exit_code.is_some_and(|code| pattern_matches(p, &code.to_string())));
        let reason_ok = rule.on_reason.as_ref().is_none_or(|p| pattern_matches(p, cause.as_str()));
        if code_ok && reason_ok {
            return rule.action;
        }
    }
    match cause {
        EndCause::InstanceLost | EndCause::SpotInterruption | EndCause::AgentNeverOnline => RetryAction::Retry,
        _ => RetryAction::Exit,
    }
}
