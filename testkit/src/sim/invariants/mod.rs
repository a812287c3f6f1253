//! The simulator's invariants, one per file, as TigerBeetle keeps its
//! checkers. Each reads the simulated cloud after a job ended (what ran on
//! the instances, what the cloud holds), not the record alone, so the
//! cloud disagreeing with the record is caught. `ALL` lists them in the
//! order `make chaos` prints them.

pub mod call_budget;
mod concurrent_command;
mod deleted_without_snapshot;
mod duplicate_instances;
mod instances_left;
mod past_bound;
mod recoverable_failed;
mod required_snapshot;
mod restore_from_snapshot;
mod step_started_twice;
mod two_snapshots;
mod volumes_left;
mod work_beside_cleanup;

pub(super) use std::collections::{BTreeMap, BTreeSet};

pub(super) use chrono::{DateTime, Duration, Utc};

pub(super) use super::{lineages, settings, start_time, Scenario};
pub(super) use crate::fake::FakeState;
pub(super) use flotilla_shared::record::{Attempt, AttemptVolume, JobRecord, JobState};
pub(super) use flotilla_shared::spec::JobSpec;

/// Checked in `sim::run` itself: the job ended, and ended as the simulator
/// meant (it writes only valid specs, so a rejection is a job never run).
pub const TERMINAL: &str = "terminal";
/// Checked in `sim::run` itself, from the reaper's plan while the job runs.
pub const REAPER_TOUCHED_A_BUSY_JOB: &str = "reaper touched a busy job";

/// Every invariant, in the order `make chaos` prints them.
pub const ALL: [&str; 15] = [
    TERMINAL,
    instances_left::NAME,
    past_bound::NAME,
    volumes_left::NAME,
    required_snapshot::NAME,
    deleted_without_snapshot::NAME,
    duplicate_instances::NAME,
    concurrent_command::NAME,
    step_started_twice::NAME,
    two_snapshots::NAME,
    work_beside_cleanup::NAME,
    restore_from_snapshot::NAME,
    REAPER_TOUCHED_A_BUSY_JOB,
    recoverable_failed::NAME,
    call_budget::NAME,
];

/// What an invariant looks at once a job ended.
#[derive(Clone, Copy)]
pub struct Ended<'a> {
    pub scenario: &'a Scenario,
    pub record: &'a JobRecord,
    pub spec: &'a JobSpec,
    pub state: &'a FakeState,
    pub now: DateTime<Utc>,
}

/// (invariant, what broke it).
pub type Violations = Vec<(String, String)>;

pub(super) fn found(violations: &mut Violations, invariant: &str, detail: String) {
    violations.push((invariant.to_string(), detail));
}

/// Every invariant but the two `sim::run` checks itself.
pub fn check_all(ended: &Ended<'_>, violations: &mut Violations) {
    instances_left::check(ended, violations);
    past_bound::check(ended, violations);
    volumes_left::check(ended, violations);
    required_snapshot::check(ended, violations);
    deleted_without_snapshot::check(ended, violations);
    restore_from_snapshot::check(ended, violations);
    duplicate_instances::check(ended, violations);
    concurrent_command::check(ended, violations);
    step_started_twice::check(ended, violations);
    work_beside_cleanup::check(ended, violations);
    two_snapshots::check(ended, violations);
    recoverable_failed::check(ended, violations);
    call_budget::check(ended, violations);
}

/// Does the policy require a snapshot of this attempt's volume? Always, or
/// on success when the shard's work (its run phase) succeeded on this
/// attempt: judged from the phases, not from how the code ended it.
pub(super) fn snapshot_required(spec: &JobSpec, attempt: &Attempt, volume: &AttemptVolume) -> bool {
    let policy = spec.volumes.iter().find(|v| v.name == volume.name).map(|v| v.snapshot);
    match policy {
        Some(flotilla_shared::spec::SnapshotPolicy::Always) => true,
        Some(flotilla_shared::spec::SnapshotPolicy::OnSuccess) => {
            attempt.completed_phases.contains(&flotilla_shared::record::Phase::Run)
        }
        _ => false,
    }
}
