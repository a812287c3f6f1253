//! The takeover rule, and the numbers it rests on.
//!
//! Correctness rests on idempotency: a ClientToken wherever EC2 has one
//! (RunInstances, CreateVolume), and where it has none a lookup (a command
//! by its comment, a snapshot by its attempt's tags) plus, for a user's
//! step, the on-instance guard (`shell.rs`). A lookup can miss what was
//! just created: AWS documents no read-after-write consistency for
//! ListCommands, and EC2's describes are eventually consistent. So a pass
//! that finds no trace of a create decided earlier treats it as "maybe in
//! flight", and creates again only once it can no longer land unseen:
//!
//! ```text
//! in flight until = decided at + pass budget + lease margin   (the deciding pass's lease end, at the latest)
//!                              + operation timeout             (its last call, started before then, gives up)
//!                              + lookup lag                    (and what it created shows in lookups)
//! ```
//!
//! With the default 50 s budget: 50 + 30 + 30 + 60 = 170 s. A pass starts
//! no action after its budget, and a create with no token (after its
//! lookup) only if it can end before the lease does; every save extends
//! the lease, so no pass acts once another may have taken over. While a
//! send may be in flight, a stopping job keeps its phase open (found, it is
//! cancelled), so cleanup never runs beside it, and a shard held back for
//! an offline agent keeps that batch. An action the pass never ran is not
//! waited for. Timeouts only bound the wait: an effect that lands later
//! still meets the guard (a step) or is adopted by the next lookup (a
//! snapshot; one that lands after a second was taken is an extra snapshot,
//! never a lost one).

use chrono::{DateTime, Duration, Utc};

/// Every AWS call gives up after this long, the SDK's retries included
/// (its operation timeout).
pub const OPERATION_TIMEOUT_SECONDS: i64 = 30;
/// One attempt of a call gives up after this long (the SDK's operation
/// attempt timeout); the SDK retries within the operation timeout.
pub const ATTEMPT_TIMEOUT_SECONDS: i64 = 15;
/// How long a new command (ListCommands by comment) or snapshot
/// (DescribeSnapshots by tag) may stay out of lookups. AWS documents no
/// figure: this is the assumption, and the simulator draws lags up to it.
pub const LOOKUP_LAG_SECONDS: i64 = 60;
/// The lease outlives the pass budget by this much, so a pass that is
/// still saving is never overtaken; a crashed pass's lease expires after
/// it. At least the operation timeout: a call started within the budget
/// ends before the lease does.
pub const LEASE_MARGIN_SECONDS: i64 = 30;

const _: () = assert!(LEASE_MARGIN_SECONDS >= OPERATION_TIMEOUT_SECONDS);

/// Until when a create decided at `decided_at` (by a pass with this budget)
/// may still land unseen.
pub fn in_flight_until(decided_at: DateTime<Utc>, budget_seconds: u32) -> DateTime<Utc> {
    decided_at
        + Duration::seconds(
            i64::from(budget_seconds) + LEASE_MARGIN_SECONDS + OPERATION_TIMEOUT_SECONDS + LOOKUP_LAG_SECONDS,
        )
}

/// Whether a call started now ends before the lease does.
pub fn may_start_call(now: DateTime<Utc>, lease_until: DateTime<Utc>) -> bool {
    now + Duration::seconds(OPERATION_TIMEOUT_SECONDS) <= lease_until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_deciding_pass_lease_plus_a_call_plus_the_lag() {
        let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 4, 12, 0, 0).single().expect("time");
        assert_eq!((in_flight_until(at, 50) - at).num_seconds(), 170);
        let lease_until = at + Duration::seconds(80);
        assert!(may_start_call(at + Duration::seconds(50), lease_until));
        assert!(!may_start_call(at + Duration::seconds(51), lease_until));
    }
}
