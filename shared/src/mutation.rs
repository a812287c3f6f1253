//! Checked-in mutation switches: each breaks one rule the simulator's
//! invariants guard, so a test can show that invariant's checker fires.
//! Only the tests crate turns on the `mutations` feature; without it every
//! switch is a constant `false` and compiles away. A switch is per thread:
//! the simulator runs a world on one thread, beside other tests.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Retention counts every completed snapshot as good (a failed run's
    /// displaces a good one). Guarded by "newest good snapshot exists".
    CountEveryRun,
    /// A prune deletes without re-reading the claims on a snapshot.
    /// Guarded by "an active job's sources exist".
    IgnoreClaims,
    /// Rescue snapshots are pruned as lineage members. Guarded by "every
    /// rescue snapshot exists".
    PruneRescues,
    /// Snapshots in `error` are never deleted. Guarded by "no snapshot
    /// stays in error".
    KeepErrors,
    /// No bound on the bill: cleanup steps keep their own timeouts.
    /// Guarded by "every instance is terminated by its bound".
    NoBound,
    /// A step's script has no on-instance guard: each delivery runs the
    /// step. Guarded by "step started twice".
    NoGuard,
    /// The takeover rule is off: a command or snapshot not found by its
    /// lookup is sent or taken again at once. Guarded by "two snapshots of
    /// one attempt".
    NoFence,
    /// Cleanup scripts do not close the shard's work on the instance: a
    /// run delivered late runs beside (or after) cleanup. Guarded by "work
    /// beside cleanup".
    NoWorkFence,
}

#[cfg(feature = "mutations")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Whether `mutation` is switched on for this thread.
#[cfg(feature = "mutations")]
pub fn on(mutation: Mutation) -> bool {
    ACTIVE.with(|active| active.get() == Some(mutation))
}

#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub fn on(_mutation: Mutation) -> bool {
    false
}

/// Switch one mutation on (or none) for this thread.
#[cfg(feature = "mutations")]
pub fn set(mutation: Option<Mutation>) {
    ACTIVE.with(|active| active.set(mutation));
}
