//! A job whose only faults are recoverable succeeds.

use super::*;

pub const NAME: &str = "recoverable job failed";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { scenario, record, .. } = *ended;
    if scenario.recoverable && record.state != JobState::Succeeded {
        found(violations, NAME, format!("{}: {}", record.state, record.reason));
    }
}
