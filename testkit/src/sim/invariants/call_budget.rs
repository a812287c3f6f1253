//! EC2 and SSM mutating calls within a factor of the floor for the work
//! the record shows (retries after injected throttling, interleaved
//! duplicates and capacity failover included).

use super::*;

pub const NAME: &str = "call budget";

/// Mutating EC2/SSM calls may exceed the floor by this factor.
pub const CALL_FACTOR: u64 = 3;

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let (mutating, floor) = (mutating_calls(ended.state), call_floor(ended.record));
    if mutating > floor * CALL_FACTOR + 10 {
        found(violations, NAME, format!("{mutating} mutating EC2/SSM calls, floor {floor}"));
    }
}

/// Mutating EC2 and SSM calls the cloud counted.
pub fn mutating_calls(state: &FakeState) -> u64 {
    [
        "RunInstances",
        "CreateVolume",
        "AttachVolume",
        "CreateSnapshot",
        "DeleteVolume",
        "SendCommand",
        "TerminateInstances",
    ]
    .iter()
    .map(|k| state.calls.get(k).copied().unwrap_or(0))
    .sum()
}

/// The fewest mutating EC2/SSM calls the work the record shows could take.
pub fn call_floor(record: &JobRecord) -> u64 {
    let mut floor = 0u64;
    for attempt in record.attempts() {
        if attempt.instance_id.is_some() {
            floor += 1; // its share of RunInstances and TerminateInstances, rounded up
        }
        // CreateVolume, AttachVolume, CreateSnapshot, DeleteVolume.
        floor += 4 * attempt.volumes.len() as u64;
    }
    floor + record.commands.len() as u64
}
