//! The lineage worlds' invariants, one per file. Each reads what the
//! simulated cloud created and still holds, never a record (only a job's
//! outcome, which is what its user sees, comes from there).

mod active_job_snapshots;
mod instances_left;
mod newest_good_snapshot;
mod past_bound;
mod rescue_snapshot;
mod snapshot_in_error;

pub(super) use std::collections::{BTreeMap, BTreeSet};

pub(super) use chrono::{DateTime, Utc};

pub(super) use super::{completed, tag, World, BOUND_SLACK_MINUTES};
pub(super) use crate::fake::{FakeSnapshot, FakeState};
pub(super) use flotilla_shared::record::JobState;
pub(super) use flotilla_shared::tags;

/// Checked in `check_end` itself: every job ended.
pub const TERMINAL: &str = "terminal";

/// Every invariant, in the order `make chaos` prints them.
pub const ALL: [&str; 7] = [
    TERMINAL,
    instances_left::NAME,
    newest_good_snapshot::NAME,
    active_job_snapshots::NAME,
    rescue_snapshot::NAME,
    snapshot_in_error::NAME,
    past_bound::NAME,
];

/// What the invariants that hold at every moment look at.
pub struct Live<'a> {
    pub world: &'a World,
    pub submitted: &'a BTreeMap<usize, DateTime<Utc>>,
    /// The snapshot each job restoring from a lineage named.
    pub sources: &'a BTreeMap<String, String>,
    /// Each job's state, SUCCEEDED as soon as that outcome is decided.
    pub states: &'a BTreeMap<String, JobState>,
    pub state: &'a FakeState,
    pub now: DateTime<Utc>,
}

/// What the invariants checked once the world settled look at.
pub struct End<'a> {
    /// Each job's bound on the bill, from what the world did.
    pub bounds: &'a BTreeMap<String, DateTime<Utc>>,
    pub state: &'a FakeState,
    pub now: DateTime<Utc>,
}

/// (invariant, what broke it).
pub type Found = Vec<(&'static str, String)>;

pub fn check_live(live: &Live<'_>, found: &mut Found) {
    newest_good_snapshot::check(live, found);
    active_job_snapshots::check(live, found);
    rescue_snapshot::check(live, found);
}

/// The world's end; gives the latest an instance stopped past its bound.
pub fn check_end(end: &End<'_>, violations: &mut Vec<(String, String)>) -> i64 {
    let mut found = Found::new();
    instances_left::check(end, &mut found);
    let lateness = past_bound::check(end, &mut found);
    snapshot_in_error::check(end, &mut found);
    violations.extend(found.into_iter().map(|(invariant, detail)| (invariant.to_string(), detail)));
    lateness
}
