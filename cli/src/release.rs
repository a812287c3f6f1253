//! `flotilla release JOB`: end a debug hold early. The record says so; the
//! reaper's next runs (every 5 minutes by default: it marks, then acts)
//! snapshot the held volumes again and remove them and the instance.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use flotilla_shared::aws::s3::S3Ledger;
use flotilla_shared::ports::{Records, WriteOutcome};
use flotilla_shared::record::DebugHold;

use crate::output::Failure;

/// What `release` did.
pub enum Released {
    Now(DebugHold),
    /// The hold had already ended (or been released).
    AlreadyEnded(DebugHold),
}

pub async fn release(ledger: &S3Ledger, job_id: &str, now: DateTime<Utc>) -> Result<Released> {
    // A conditional write: a pass or another release may write meanwhile.
    for _ in 0..5 {
        let Some(loaded) = ledger.load(job_id).await.with_context(|| format!("reading job {job_id}"))? else {
            return Err(Failure::NoSuchJob(job_id.to_string()).into());
        };
        let mut record = loaded.record;
        let Some(hold) = record.hold.as_mut() else {
            return Err(Failure::NotSucceeded(format!(
                "job {job_id} holds nothing for debugging (its spec sets no debug_hold_minutes, or no shard failed for good)"
            ))
            .into());
        };
        if hold.ends_at() <= now {
            return Ok(Released::AlreadyEnded(hold.clone()));
        }
        hold.released_at = Some(now);
        let released = hold.clone();
        record.writes += 1;
        match ledger.replace(&record, &loaded.version).await.with_context(|| format!("writing job {job_id}"))? {
            WriteOutcome::Written { .. } => return Ok(Released::Now(released)),
            WriteOutcome::Conflict => continue,
        }
    }
    anyhow::bail!("job {job_id} kept changing under the release: try again")
}
