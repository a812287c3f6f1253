//! The rounds of one pass: observe the cloud, decide (pure), save the
//! intents, act, fold each result in and save, while what a round did
//! unlocks the next at once and the pass's budget lasts.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use tracing::{info, warn};

use super::backoff::{self, next_after, Setback};
use super::{
    act, calls_granted, decide, give_up, observe, resolve_image, save, Context, Next, MAX_ROUNDS, OBSERVE_FAILURES,
};
use crate::admission::Grant;
use crate::error::StepError;
use crate::fence;
use crate::ports::{Cloud, Ports};
use crate::reconcile::decide::Action;
use crate::reconcile::Observation;
use crate::record::{JobRecord, Outcome};

/// One pass: where it acts, whose lease it holds, and its time.
pub(super) struct Pass<'a> {
    pub ports: &'a Ports,
    pub cloud: &'a Cloud,
    pub owner: &'a str,
    pub started: DateTime<Utc>,
    pub budget: Duration,
    pub lease_until: DateTime<Utc>,
}

/// Observe, decide, save the intents, act and save, round after round: a
/// round runs again only when what it did can be used at once
/// (`Action::unlocks_at_once`), while the pass's budget lasts.
pub(super) async fn run(
    pass: &Pass<'_>,
    record: &mut JobRecord,
    version: &mut String,
    mut focus: BTreeSet<String>,
) -> Result<Next, StepError> {
    let mut next = Next::After(pass.ports.settings.poll_delay_seconds);
    let mut again = false;
    for _ in 0..MAX_ROUNDS {
        again = false;
        let now = pass.ports.clock.now();
        // Observe. What triggers named is listed in the first round only.
        let observation = match look(pass, record, now, &focus).await {
            Ok(observation) => observation,
            Err(stop) => {
                next = stop;
                break;
            }
        };
        focus.clear();
        // Decide, and save the intents. Whole seconds: finer times only
        // make the record bigger.
        let context = Context {
            now: now.trunc_subsecs(0),
            settings: &pass.ports.settings,
            bucket: pass.ports.ledger.bucket(),
            launch_grant: launch_grant(pass, record, now).await,
        };
        let (actions, decided) = decide::decide(record, &observation, &context);
        next = decided;
        save(pass.ports, record, version, pass.owner).await?;
        if actions.is_empty() {
            break;
        }
        // Act, within the shared budget of mutating calls.
        let own_account = record.spec.as_ref().is_some_and(|s| s.role_arn.is_none());
        let mut calls = calls_granted(pass.ports, record, own_account, &actions, now).await?;
        let acted = act_all(pass, record, &actions, &mut calls).await;
        again = acted.again;
        save(pass.ports, record, version, pass.owner).await?;
        if acted.transient {
            next = next_after(Setback::Transient, Some(next));
            break;
        }
        if acted.deferred {
            next = next_after(Setback::CallBudget(calls.retry_after_seconds), Some(next));
            break;
        }
        if pass.ports.clock.now() >= pass.started + pass.budget {
            next = next_after(Setback::OutOfTime, None);
            break;
        }
        if !again {
            break;
        }
    }
    // Out of rounds with a failure still to act on: decide's wait assumed
    // the calls would succeed, and no event follows a call that failed.
    if let (true, Next::After(seconds)) = (again, next) {
        next = Next::After(seconds.min(pass.ports.settings.poll_delay_seconds));
    }
    Ok(next)
}

/// The image resolved, then the cloud observed. Err: the pass stops here,
/// and when it comes again (a transient error backs off; observing that
/// keeps failing gives the job up).
async fn look(
    pass: &Pass<'_>,
    record: &mut JobRecord,
    now: DateTime<Utc>,
    focus: &BTreeSet<String>,
) -> Result<Observation, Next> {
    if let Err(err) = resolve_image(pass.cloud, record).await {
        if err.is_transient() {
            record.stalled = Some(format!("resolving the image: {err}"));
            return Err(next_after(Setback::Transient, None));
        }
        record.outcome.get_or_insert(Outcome::Failed);
        record.outcome_reason.get_or_insert(format!("image: {err}"));
    }
    match observe::observe(pass.cloud, record, &pass.ports.settings, now, focus).await {
        Ok(observation) => {
            record.observe_failures = 0;
            record.stalled = None;
            Ok(observation)
        }
        Err(err) if err.is_retryable() => {
            record.stalled = Some(format!("observing: {err}"));
            Err(next_after(Setback::Transient, None))
        }
        Err(err) => {
            record.observe_failures += 1;
            warn!(job_id = %record.job_id, error = %err, "observation failed");
            if record.observe_failures >= OBSERVE_FAILURES {
                give_up(record, &format!("cannot observe the job's resources: {err}"), now);
                Err(Next::Finished)
            } else {
                Err(next_after(Setback::ObserveFailed(record.observe_failures), None))
            }
        }
    }
}

/// The shared launch budget, asked only when something waits to launch
/// (jobs in other accounts launch against those accounts' limits).
async fn launch_grant(pass: &Pass<'_>, record: &mut JobRecord, now: DateTime<Utc>) -> Option<Grant> {
    let wanted = decide::launches_wanted(record);
    let own_account = record.spec.as_ref().is_some_and(|s| s.role_arn.is_none());
    if !(pass.ports.settings.launch_admission && own_account && wanted > 0) {
        return None;
    }
    match crate::admission::take(pass.ports.ledger.as_ref(), wanted, now).await {
        Ok(grant) => Some(grant),
        Err(err) => {
            record.stalled = Some(format!("taking from the launch budget ({}): {err}", crate::admission::KEY));
            Some(Grant { instances: 0, retry_after_seconds: backoff::launch_budget_unreadable() })
        }
    }
}

/// What one round's actions came to.
#[derive(Default)]
struct Acted {
    /// What was done can be used at once: another round pays.
    again: bool,
    /// A call failed for a reason that passes: back off.
    transient: bool,
    /// A mutating call waited for the shared budget.
    deferred: bool,
}

/// Run the round's actions in order, each folded into the record. A call
/// starts only while the pass's budget lasts and it can end before the
/// lease does (`fence`); what does not start is withdrawn, decided again
/// next pass.
async fn act_all(pass: &Pass<'_>, record: &mut JobRecord, actions: &[Action], calls: &mut Grant) -> Acted {
    let mut acted = Acted::default();
    for (index, action) in actions.iter().enumerate() {
        // A call must end before the lease does (see `fence`).
        let lease_end = record.lease.as_ref().map_or(pass.lease_until, |l| l.until);
        let now = pass.ports.clock.now();
        if now >= pass.started + pass.budget || !fence::may_start_call(now, lease_end) {
            // The rest is decided again next pass; none of it ran.
            let now = now.trunc_subsecs(0);
            for skipped in &actions[index..] {
                decide::withdraw(record, skipped, now);
            }
            break;
        }
        if action.waits_for_call_budget() && calls.instances == 0 {
            decide::withdraw(record, action, now.trunc_subsecs(0));
            acted.deferred = true;
            continue;
        }
        if action.is_mutating() {
            calls.instances = calls.instances.saturating_sub(1);
        }
        let result = act::execute(pass.ports, pass.cloud, record, action, lease_end).await;
        if let Err(err) = &result {
            if err.is_transient() {
                acted.transient = true;
                record.stalled = Some(format!("{}: {err}", action.name()));
            }
            info!(job_id = %record.job_id, action = action.name(), error = %err, "action failed");
        }
        acted.again |= action.unlocks_at_once(result.is_err());
        decide::apply(record, action, result, pass.ports.clock.now().trunc_subsecs(0));
    }
    acted
}
