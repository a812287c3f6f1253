//! One error policy: when the next pass comes after a pass stopped early.
//! Every back-off of the reconciler is decided here, from why it stopped.

use super::Next;

/// Back-off after a transient error that outlasted the SDK's own retries.
const TRANSIENT_SECONDS: u32 = 15;

/// Why a pass stopped before it was done.
pub(super) enum Setback {
    /// A call failed for a reason that passes (throttled, a timeout, a 5xx).
    Transient,
    /// Observing failed this many passes in a row, for a reason that may
    /// not pass (the job gives up at `OBSERVE_FAILURES`): back off longer
    /// each time.
    ObserveFailed(u32),
    /// The job's account could not be reached yet while resources may
    /// exist there: the role may take a while to be fixed.
    AccountUnreachable,
    /// A mutating call waited for the shared call budget, which refills in
    /// this many seconds.
    CallBudget(u32),
    /// The pass's time ran out with work left.
    OutOfTime,
}

/// When the next pass comes: never later than `decided` (what the pass
/// itself wanted), except for a transient error, which waits its back-off.
pub(super) fn next_after(setback: Setback, decided: Option<Next>) -> Next {
    let seconds = match setback {
        Setback::Transient => return Next::After(TRANSIENT_SECONDS),
        Setback::ObserveFailed(failures) => return Next::After(TRANSIENT_SECONDS * failures),
        Setback::AccountUnreachable => return Next::After(TRANSIENT_SECONDS * 4),
        Setback::CallBudget(refill) => refill.max(1),
        Setback::OutOfTime => 1,
    };
    match decided {
        Some(Next::After(wanted)) => Next::After(wanted.min(seconds)),
        Some(Next::Finished) => Next::Finished,
        None => Next::After(seconds),
    }
}

/// The seconds a launch waits when the shared launch budget cannot be read.
pub(super) fn launch_budget_unreadable() -> u32 {
    TRANSIENT_SECONDS
}
