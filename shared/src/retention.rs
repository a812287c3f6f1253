//! Snapshot retention: the one rule that both the job's own prune and the
//! reaper apply. Pure: it reads snapshots (with their tags) and what the
//! caller knows of jobs, and says which snapshots to delete and why.
//!
//! A lineage is (submitter, job name, volume, shard). In it:
//! - **Good** snapshots (`flotilla:good=true`) are the final snapshot of a
//!   shard of a run that SUCCEEDED: the job tags them just before it ends, so
//!   a restore snapshot, a failed attempt's, or one taken after a failed
//!   cleanup never is. `keep_last` counts good snapshots only, the newest
//!   good one is kept whatever its age, and `max_age_days` (0: no limit)
//!   drops the others.
//! - **Other** completed snapshots (failed runs, restore snapshots, after a
//!   failed cleanup, a run's shards that succeeded in a run that failed)
//!   never displace good ones and are counted apart: the newest `keep_last`
//!   of them are kept for `max_age_days`, or [`FAILED_RUN_DAYS`] when that
//!   is 0. With no age limit set, the newest of them is also kept whatever
//!   its age while it is newer than every good one (the lineage's latest
//!   state, until a good run supersedes it).
//! - Nothing `pending` is touched; snapshots in `error` hold no data and are
//!   deleted once their job has ended.
//! - A snapshot of a job that has not ended (a retry may restore from it),
//!   or that an active job names as its source, is never deleted.
//! - Rescue snapshots (`flotilla:reaped=true`, the reaper's copy of an
//!   orphaned volume) are outside every lineage: Flotilla never deletes one
//!   that completed; it is the only copy of that volume, and its owner
//!   deletes it. One in `error` is deleted once its volume is gone.
//! - Snapshots taken before this rule existed carry no `flotilla:kind`: the
//!   reaper, which knows how their job ended, counts them as good when it
//!   SUCCEEDED and as other snapshots otherwise; a job's prune, which cannot
//!   know, leaves them alone.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

use crate::mutation::{self, Mutation};
use crate::ports::SnapshotView;
use crate::states::SnapshotState;
use crate::tags;

/// How long snapshots that are not good are kept when `max_age_days` is 0.
pub const FAILED_RUN_DAYS: i64 = 7;

/// What a snapshot is to retention, read from its tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The final snapshot of a shard of a SUCCEEDED run.
    Good,
    /// Any other snapshot a job took.
    NotGood,
    /// The reaper's copy of an orphaned volume.
    Rescue,
    /// Taken before snapshots carried their kind.
    Legacy,
}

/// Why a job took a snapshot (`flotilla:kind`), decided when it is taken.
pub mod kind {
    /// The work and the cleanup succeeded: good once the job SUCCEEDED.
    pub const FINAL: &str = "final";
    /// The attempt's work did not succeed (a failed run, or a restore point).
    pub const FAILED_ATTEMPT: &str = "failed-attempt";
    /// The work succeeded but `before_unmount` or unmount failed.
    pub const AFTER_FAILED_CLEANUP: &str = "after-failed-cleanup";
    /// The work succeeded, then the instance was lost before its cleanup
    /// finished: the run's only copy of that work, crash-consistent. Good
    /// once the job SUCCEEDED, like `final`, so a later run cannot push it out.
    pub const FINAL_CRASH_CONSISTENT: &str = "final-crash-consistent";

    /// Kinds a SUCCEEDED run marks good.
    pub fn can_be_good(kind: &str) -> bool {
        kind == FINAL || kind == FINAL_CRASH_CONSISTENT
    }
}

pub fn kind_of(snapshot: &SnapshotView) -> Kind {
    let rescue = snapshot.tags.get(tags::REAPED).is_some_and(|v| v == "true");
    if rescue && mutation::on(Mutation::PruneRescues) {
        return Kind::Good;
    }
    if rescue {
        Kind::Rescue
    } else if snapshot.tags.get(tags::GOOD).is_some_and(|v| v == "true") {
        Kind::Good
    } else if snapshot.tags.contains_key(tags::KIND) {
        Kind::NotGood
    } else {
        Kind::Legacy
    }
}

/// A lineage's retention, as the spec or the snapshot tags give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub max_age_days: u32,
}

impl Policy {
    pub fn from_tags(snapshot_tags: &BTreeMap<String, String>) -> Option<Policy> {
        let keep_last = snapshot_tags.get(tags::KEEP_LAST)?.parse().ok()?;
        let max_age_days = snapshot_tags.get(tags::MAX_AGE_DAYS).and_then(|v| v.parse().ok()).unwrap_or(0);
        Some(Policy { keep_last, max_age_days })
    }
}

/// What the caller knows beyond the snapshots themselves.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Jobs not known to have ended: their snapshots are theirs.
    pub active_jobs: BTreeSet<String>,
    /// Snapshots an active job names as its source (see `sources.rs`).
    pub sources: BTreeSet<String>,
    /// Jobs known to have SUCCEEDED, for snapshots without a kind; None when
    /// unknown (a job's prune), and then those are left alone.
    pub succeeded_jobs: Option<BTreeSet<String>>,
    /// Volumes that still exist, for rescue snapshots in `error`; None when
    /// unknown, and then those are left alone.
    pub live_volumes: Option<BTreeSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub snapshot_id: String,
    pub why: String,
}

/// (submitter, job name, volume, shard)
type LineageKey = (String, String, String, String);

fn lineage_of(snapshot: &SnapshotView) -> Option<LineageKey> {
    let get = |key: &str| snapshot.tags.get(key).cloned();
    Some((get(tags::SUBMITTER).unwrap_or_default(), get(tags::JOB_NAME)?, get(tags::VOLUME)?, get(tags::SHARD)?))
}

/// Every deletion the rule allows among `snapshots`. `policy` overrides the
/// retention each lineage's newest snapshot carries (a job's prune passes
/// its spec's); a lineage with neither is left alone.
pub fn plan(snapshots: &[SnapshotView], policy: Option<Policy>, facts: &Facts, now: DateTime<Utc>) -> Vec<Deletion> {
    let mut deletions = Vec::new();
    let mut lineages: BTreeMap<LineageKey, Vec<&SnapshotView>> = BTreeMap::new();
    for snapshot in snapshots {
        if kind_of(snapshot) == Kind::Rescue {
            deletions.extend(rescue(snapshot, facts));
        } else if let Some(key) = lineage_of(snapshot) {
            lineages.entry(key).or_default().push(snapshot);
        }
    }
    for ((_, name, volume, shard), mut lineage) in lineages {
        lineage.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| b.snapshot_id.cmp(&a.snapshot_id)));
        let Some(policy) = policy.or_else(|| lineage.iter().find_map(|s| Policy::from_tags(&s.tags))) else {
            continue;
        };
        let at = format!("{name}/{volume} shard {shard}");
        deletions.extend(prune_lineage(&lineage, policy, facts, now, &at));
    }
    deletions
}

/// A rescue snapshot is deleted only when it failed and its volume is gone
/// (while the volume exists, the reaper counts its failed tries).
fn rescue(snapshot: &SnapshotView, facts: &Facts) -> Option<Deletion> {
    let volume_gone = facts.live_volumes.as_ref().is_some_and(|live| !live.contains(&snapshot.volume_id));
    (snapshot.state == SnapshotState::Error && volume_gone).then(|| Deletion {
        snapshot_id: snapshot.snapshot_id.clone(),
        why: format!("rescue snapshot of {} ended in error and the volume is gone", snapshot.volume_id),
    })
}

/// One lineage, newest first.
fn prune_lineage(
    lineage: &[&SnapshotView],
    policy: Policy,
    facts: &Facts,
    now: DateTime<Utc>,
    at: &str,
) -> Vec<Deletion> {
    // Legacy snapshots (no kind) are judged by their job's outcome, when known.
    let judged = |s: &SnapshotView| -> Option<bool> {
        if mutation::on(Mutation::CountEveryRun) && kind_of(s) != Kind::Rescue {
            return Some(true);
        }
        match kind_of(s) {
            Kind::Good => Some(true),
            // A final snapshot whose job the reaper knows SUCCEEDED is good
            // even if tagging it failed.
            // (A job's prune, which cannot know, leaves it alone.)
            Kind::NotGood if s.tags.get(tags::KIND).is_some_and(|k| kind::can_be_good(k)) => {
                let succeeded = facts.succeeded_jobs.as_ref()?;
                Some(s.tags.get(tags::JOB_ID).is_some_and(|job| succeeded.contains(job)))
            }
            Kind::NotGood => Some(false),
            Kind::Legacy => {
                let succeeded = facts.succeeded_jobs.as_ref()?;
                Some(s.tags.get(tags::JOB_ID).is_some_and(|job| succeeded.contains(job)))
            }
            Kind::Rescue => None,
        }
    };
    let is_good = |s: &SnapshotView| judged(s) == Some(true);
    let newest_good = lineage.iter().find(|s| s.state == SnapshotState::Completed && is_good(s)).map(|s| s.started_at);
    let good_age = (policy.max_age_days > 0).then(|| Duration::days(i64::from(policy.max_age_days)));
    let other_age = good_age.unwrap_or(Duration::days(FAILED_RUN_DAYS));
    let keep_last = policy.keep_last.max(1) as usize;
    let (mut good_rank, mut other_rank) = (0usize, 0usize);
    let mut deletions = Vec::new();
    for snapshot in lineage {
        // Its job may still restore from it, or a job names it as its source:
        // it counts toward the lineage, but is never deleted.
        let job = snapshot.tags.get(tags::JOB_ID);
        let protected =
            job.is_none_or(|job| facts.active_jobs.contains(job)) || facts.sources.contains(&snapshot.snapshot_id);
        let delete = |why: String| {
            (!protected).then(|| Deletion { snapshot_id: snapshot.snapshot_id.clone(), why: format!("{at}: {why}") })
        };
        let age = now - snapshot.started_at;
        match snapshot.state {
            SnapshotState::Completed => {}
            SnapshotState::Error if mutation::on(Mutation::KeepErrors) => continue,
            SnapshotState::Error => {
                deletions.extend(delete("ended in error; it holds no data".into()));
                continue;
            }
            _ => continue, // pending: never touched
        }
        if is_good(snapshot) {
            good_rank += 1;
            let too_old = good_age.is_some_and(|limit| age > limit);
            if good_rank == 1 || (good_rank <= keep_last && !too_old) {
                continue;
            }
            deletions.extend(delete(if too_old {
                format!("a successful run's, older than {} days", policy.max_age_days)
            } else {
                format!("{keep_last} newer successful snapshots kept")
            }));
        } else if judged(snapshot) == Some(false) {
            other_rank += 1;
            // With no age limit set, the lineage's latest state (newer than
            // every good snapshot) is kept until a good run supersedes it.
            let latest_state =
                good_age.is_none() && other_rank == 1 && newest_good.is_none_or(|good| snapshot.started_at > good);
            if latest_state || (other_rank <= keep_last && age <= other_age) {
                continue;
            }
            deletions.extend(delete(if other_rank > keep_last {
                format!("not a successful run's; {keep_last} newer such snapshots kept")
            } else {
                format!("not a successful run's, older than {} days", other_age.num_days())
            }));
        }
        // Legacy with no known outcome: left alone.
    }
    deletions
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time")
    }

    fn snap(id: &str, job: &str, days_ago: i64, state: &str, kind: Option<&str>, good: bool) -> SnapshotView {
        let mut t = BTreeMap::from([
            (tags::JOB_ID.to_string(), job.to_string()),
            (tags::JOB_NAME.to_string(), "nightly".to_string()),
            (tags::VOLUME.to_string(), "data".to_string()),
            (tags::SHARD.to_string(), "0".to_string()),
            (tags::SUBMITTER.to_string(), "alice".to_string()),
            (tags::KEEP_LAST.to_string(), "2".to_string()),
            (tags::MAX_AGE_DAYS.to_string(), "0".to_string()),
        ]);
        if let Some(kind) = kind {
            t.insert(tags::KIND.to_string(), kind.to_string());
        }
        if good {
            t.insert(tags::GOOD.to_string(), "true".to_string());
        }
        SnapshotView {
            snapshot_id: id.into(),
            volume_id: format!("vol-{id}"),
            state: state.into(),
            started_at: now() - Duration::days(days_ago) - Duration::seconds(id.len() as i64),
            tags: t,
        }
    }

    fn good(id: &str, job: &str, days_ago: i64) -> SnapshotView {
        snap(id, job, days_ago, "completed", Some(kind::FINAL), true)
    }

    fn failed(id: &str, job: &str, days_ago: i64) -> SnapshotView {
        snap(id, job, days_ago, "completed", Some(kind::FAILED_ATTEMPT), false)
    }

    fn deleted(snapshots: &[SnapshotView], policy: Option<Policy>, facts: &Facts) -> Vec<String> {
        let mut ids: Vec<String> = plan(snapshots, policy, facts, now()).into_iter().map(|d| d.snapshot_id).collect();
        ids.sort();
        ids
    }

    #[test]
    fn good_failed_good_keeps_both_good_snapshots() {
        // keep_last 2, snapshot always: runs good, failed, good.
        let lineage = [good("s1", "r1", 3), failed("s2", "r2", 2), good("s3", "r3", 1)];
        assert_eq!(deleted(&lineage, None, &Facts::default()), Vec::<String>::new());
        // A third good run pushes out the oldest good one, never for the failed one.
        let lineage = [good("s1", "r1", 3), failed("s2", "r2", 2), good("s3", "r3", 1), good("s4", "r4", 0)];
        assert_eq!(deleted(&lineage, None, &Facts::default()), vec!["s1"]);
    }

    #[test]
    fn the_newest_good_snapshot_survives_any_age_and_any_number_of_failures() {
        let policy = Policy { keep_last: 1, max_age_days: 0 };
        let mut lineage = vec![good("old", "r0", 400)];
        for i in 0..10 {
            lineage.push(failed(&format!("f{i}"), &format!("rf{i}"), i));
        }
        let gone = deleted(&lineage, Some(policy), &Facts::default());
        assert!(!gone.contains(&"old".to_string()), "{gone:?}");
        // The newest failure (the latest state) and no other beyond keep_last.
        assert!(!gone.contains(&"f0".to_string()), "{gone:?}");
        assert_eq!(gone.len(), 9, "{gone:?}");
    }

    #[test]
    fn failed_runs_are_kept_for_a_bounded_time_when_max_age_is_zero() {
        // Newer good exists: failed snapshots go after FAILED_RUN_DAYS.
        let lineage = [good("g", "r9", 0), failed("recent", "r1", 2), failed("stale", "r2", FAILED_RUN_DAYS + 1)];
        assert_eq!(deleted(&lineage, None, &Facts::default()), vec!["stale"]);
        // With no good run at all, the newest failure is the latest state: kept.
        let lineage = [failed("only", "r1", 400)];
        assert!(deleted(&lineage, None, &Facts::default()).is_empty());
    }

    #[test]
    fn pending_is_untouched_and_error_is_deleted_once_its_job_ended() {
        let lineage = [
            good("g1", "r1", 5),
            good("g2", "r2", 4),
            good("g3", "r3", 3),
            snap("p", "r4", 9, "pending", Some(kind::FINAL), true),
            snap("e", "r5", 1, "error", Some(kind::FINAL), false),
            snap("e-live", "r6", 1, "error", Some(kind::FINAL), false),
        ];
        let facts = Facts { active_jobs: ["r6".to_string()].into(), ..Facts::default() };
        let mut gone = deleted(&lineage, None, &facts);
        gone.sort();
        assert_eq!(gone, vec!["e", "g1"]);
    }

    #[test]
    fn restore_snapshots_and_failed_cleanups_never_count_as_good() {
        // A successful run with a restore point and a run whose cleanup failed.
        let lineage = [
            good("g-old", "r1", 10),
            good("g-mid", "r2", 9),
            snap("restore", "r3", 2, "completed", Some(kind::FAILED_ATTEMPT), false),
            snap("dirty", "r4", 1, "completed", Some(kind::AFTER_FAILED_CLEANUP), false),
        ];
        assert!(deleted(&lineage, None, &Facts::default()).is_empty());
    }

    #[test]
    fn rescue_snapshots_are_outside_every_lineage() {
        let mut rescued = good("rescue", "r0", 100);
        rescued.tags.insert(tags::REAPED.to_string(), "true".to_string());
        let lineage = [rescued.clone(), good("g1", "r1", 2), good("g2", "r2", 1), good("g3", "r3", 0)];
        let facts = Facts { live_volumes: Some(BTreeSet::new()), ..Facts::default() };
        assert_eq!(deleted(&lineage, Some(Policy { keep_last: 1, max_age_days: 1 }), &facts), vec!["g1", "g2"]);
        // Only a failed one whose volume is gone is deleted.
        rescued.state = "error".into();
        assert_eq!(deleted(&[rescued.clone()], None, &facts), vec!["rescue"]);
        let facts = Facts { live_volumes: Some([rescued.volume_id.clone()].into()), ..Facts::default() };
        assert!(deleted(&[rescued], None, &facts).is_empty());
    }

    #[test]
    fn active_jobs_and_named_sources_are_never_pruned() {
        let lineage = [good("g1", "r1", 5), good("g2", "r2", 4), good("g3", "r3", 3), good("g4", "r4", 2)];
        let facts =
            Facts { active_jobs: ["r1".to_string()].into(), sources: ["g2".to_string()].into(), ..Facts::default() };
        assert!(deleted(&lineage, None, &facts).is_empty());
    }

    #[test]
    fn protected_snapshots_still_count_toward_keep_last() {
        // The pruning job's own good snapshot is the newest: two older ones
        // beyond keep_last 2 leave one.
        let lineage = [good("g1", "r1", 3), good("g2", "r2", 2), good("own", "r3", 0)];
        let facts = Facts { active_jobs: ["r3".to_string()].into(), ..Facts::default() };
        assert_eq!(deleted(&lineage, None, &facts), vec!["g1"]);
    }

    #[test]
    fn a_final_snapshot_of_a_job_known_to_have_succeeded_is_good_untagged() {
        let lineage = [
            good("g1", "r1", 3),
            snap("untagged", "r2", 2, "completed", Some(kind::FINAL), false),
            good("g3", "r3", 1),
        ];
        let facts = Facts { succeeded_jobs: Some(["r1", "r2", "r3"].map(String::from).into()), ..Facts::default() };
        assert_eq!(deleted(&lineage, None, &facts), vec!["g1"]);
    }

    #[test]
    fn legacy_snapshots_count_only_when_their_success_is_known() {
        let legacy = |id: &str, job: &str, d| snap(id, job, d, "completed", None, false);
        let lineage = [legacy("l1", "r1", 5), legacy("l2", "r2", 4), legacy("l3", "r3", 3)];
        assert!(deleted(&lineage, None, &Facts::default()).is_empty());
        let facts = Facts { succeeded_jobs: Some(["r1", "r2", "r3"].map(String::from).into()), ..Facts::default() };
        assert_eq!(deleted(&lineage, None, &facts), vec!["l1"]);
        // A legacy snapshot of a failed run is another run's, kept for a while.
        let lineage = [legacy("l1", "r1", 9), legacy("l2", "r2", 4), legacy("l3", "r3", 3)];
        let facts = Facts { succeeded_jobs: Some(["r2", "r3"].map(String::from).into()), ..Facts::default() };
        assert_eq!(deleted(&lineage, None, &facts), vec!["l1"]);
    }

    #[test]
    fn lineages_are_per_shard_and_submitter() {
        let mut other_shard = good("x1", "r1", 5);
        other_shard.tags.insert(tags::SHARD.to_string(), "1".to_string());
        let mut other_submitter = good("x2", "r1", 5);
        other_submitter.tags.insert(tags::SUBMITTER.to_string(), "mallory".to_string());
        let lineage = [other_shard, other_submitter, good("g2", "r2", 1), good("g3", "r3", 0)];
        assert_eq!(deleted(&lineage, Some(Policy { keep_last: 1, max_age_days: 0 }), &Facts::default()), vec!["g2"]);
    }
}
