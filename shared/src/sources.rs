//! Snapshots that jobs name as their source (`snapshot_id`): a claim per
//! (snapshot, job) in the jobs bucket, `sources/<snapshot>/<job>`, so
//! retention never deletes a snapshot a job is about to use or uses.
//!
//! The race: a prune decides to delete S while intake accepts a job that
//! names S; the job's next restore (a replacement after an instance was
//! lost) would find S gone. It is closed as Dekker's is: intake writes its
//! claim, then looks for a deletion mark, then checks that S exists; a
//! deleter writes the mark, then lists the claims, then deletes. S3 is
//! strongly consistent for PUT, GET and LIST, so one of them sees the other:
//! intake asks for the message again (it comes back once the deletion
//! finished or was called off), or the deleter keeps S.
//!
//! A claim counts while its job's record is missing (intake is under way)
//! or not terminal. Claims of ended jobs are removed when a deletion finds
//! them, or by the reaper.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::error::CloudError;
use crate::ports::{Cloud, Ledger, Objects, Ports};

pub const PREFIX: &str = "sources/";
/// Deletion marks sort after every job id (`a-z 0-9 -`); each deleter writes
/// its own, `~deleting-<unix seconds>-<unique>`, so one deleter calling off
/// never removes another's mark.
const MARK: &str = "~deleting-";
/// A deletion mark older than this was left by a deleter that died: a pass
/// is bounded by its budget, so a live one is much younger.
const MARK_STALE_SECONDS: i64 = 900;

pub fn claim_key(snapshot_id: &str, job_id: &str) -> String {
    format!("{PREFIX}{snapshot_id}/{job_id}")
}

fn prefix(snapshot_id: &str) -> String {
    format!("{PREFIX}{snapshot_id}/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    Held,
    /// A deletion of the snapshot is under way: try again shortly.
    BeingDeleted,
}

/// Intake: claim the snapshot for the job, then look for a live deletion
/// mark. Check that the snapshot exists only after this.
pub async fn claim(
    ledger: &dyn Ledger,
    snapshot_id: &str,
    job_id: &str,
    now: DateTime<Utc>,
) -> Result<Claimed, CloudError> {
    // Milliseconds: a claim is compared with when its job's record ended.
    let stamp = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    ledger.put(&claim_key(snapshot_id, job_id), stamp.as_bytes(), "text/plain").await?;
    let keys = ledger.list_keys(ledger.bucket(), &format!("{}{MARK}", prefix(snapshot_id)), usize::MAX).await?;
    let live = keys
        .unwrap_or_default()
        .iter()
        .filter_map(|k| mark_time(k))
        .any(|at| (now.timestamp() - at).abs() < MARK_STALE_SECONDS);
    Ok(if live { Claimed::BeingDeleted } else { Claimed::Held })
}

fn mark_time(key: &str) -> Option<i64> {
    key.rsplit_once(MARK)?.1.split('-').next()?.parse().ok()
}

pub async fn release(ledger: &dyn Objects, snapshot_id: &str, job_id: &str) -> Result<(), CloudError> {
    ledger.delete(&claim_key(snapshot_id, job_id)).await
}

/// Every claim: snapshot id -> the jobs claiming it.
pub async fn claims(ledger: &dyn Ledger) -> Result<BTreeMap<String, Vec<String>>, CloudError> {
    let keys = ledger.list_keys(ledger.bucket(), PREFIX, usize::MAX).await?.unwrap_or_default();
    let mut claims: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for key in keys {
        let Some((snapshot, job)) = key.strip_prefix(PREFIX).and_then(|rest| rest.split_once('/')) else { continue };
        if !job.starts_with(MARK) {
            claims.entry(snapshot.to_string()).or_default().push(job.to_string());
        }
    }
    Ok(claims)
}

/// Snapshots claimed by a job in `active`: what retention must not plan to
/// delete. (Claims of jobs not yet active are caught by the deletion itself.)
pub fn claimed_by(claims: &BTreeMap<String, Vec<String>>, active: &BTreeSet<String>) -> BTreeSet<String> {
    claims.iter().filter(|(_, jobs)| jobs.iter().any(|j| active.contains(j))).map(|(s, _)| s.clone()).collect()
}

/// Delete a snapshot retention condemned, unless a job claims it: mark,
/// then list the claims, then delete. Returns why it was kept, if it was.
pub async fn delete_unless_claimed(
    ports: &Ports,
    cloud: &Cloud,
    snapshot_id: &str,
) -> Result<Option<String>, CloudError> {
    let ledger = ports.ledger.as_ref();
    let now = ports.clock.now();
    let mark = format!("{}{MARK}{}-{}", prefix(snapshot_id), now.timestamp(), uuid::Uuid::new_v4().simple());
    ledger.put(&mark, b"", "text/plain").await?;
    let deleted = delete_marked(ports, cloud, snapshot_id).await;
    // Called off, done or failed, the mark goes: intake must not wait on it.
    ledger.delete(&mark).await?;
    deleted
}

/// Under this deleter's mark: re-read the claims, then delete unless one
/// is live.
async fn delete_marked(ports: &Ports, cloud: &Cloud, snapshot_id: &str) -> Result<Option<String>, CloudError> {
    let ledger = ports.ledger.as_ref();
    let keys = ledger.list_keys(ledger.bucket(), &prefix(snapshot_id), usize::MAX).await?.unwrap_or_default();
    let claimants = keys.iter().filter_map(|k| k.strip_prefix(&prefix(snapshot_id))).filter(|j| !j.starts_with(MARK));
    for job_id in claimants.filter(|_| !crate::mutation::on(crate::mutation::Mutation::IgnoreClaims)) {
        if claim_is_live(ledger, snapshot_id, job_id).await? {
            return Ok(Some(format!("job {job_id} names it as a source")));
        }
        release(ledger, snapshot_id, job_id).await?;
    }
    match cloud.volumes.delete_snapshot(snapshot_id).await {
        Err(err) if err.class() != crate::error::RetryClass::NotFound => Err(err),
        _ => Ok(None),
    }
}

/// A claim counts while its job has no record (intake is under way), or a
/// record that is not terminal, or one that ended before the claim was made
/// (a valid resubmission replacing a rejection claims before it writes).
async fn claim_is_live(ledger: &dyn Ledger, snapshot_id: &str, job_id: &str) -> Result<bool, CloudError> {
    let Some(loaded) = ledger.load(job_id).await? else { return Ok(true) };
    if !loaded.record.state.is_terminal() {
        return Ok(true);
    }
    let claimed_at = ledger
        .get(&claim_key(snapshot_id, job_id))
        .await?
        .and_then(|body| DateTime::parse_from_rfc3339(String::from_utf8_lossy(&body).trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    let ended_at = loaded.record.updated_at;
    Ok(matches!((claimed_at, ended_at), (Some(claimed), Some(ended)) if claimed >= ended))
}
