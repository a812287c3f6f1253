//! Sending a record's outbox (`events`) to the notify queue. Callers save
//! the record with its outbox first, then send, then clear the outbox:
//! a notice is never sent for a transition that was not saved, and a
//! crash after the send only sends it again, with the same `event_id`.

use serde_json::{json, Value};
use tracing::{error, warn};

use crate::error::{CloudError, StepError};
use crate::events::{NoticeBatch, FAILING_LINES, JOB_STATE_CHANGE};
use crate::ports::{Ports, WriteOutcome};
use crate::record::JobRecord;

/// A terminal record's notices (no pass will run on it again): sent, then
/// cleared, and the job leaves the tick's list. A send that fails for a
/// reason that passes keeps it on the list, so the next tick tries again
/// (`reconcile::lease::Gate::Flush`); one that cannot succeed (no such
/// queue, no permission) leaves the notices in the record, says so, and
/// takes the job off the list: never a message retried forever.
pub async fn finish_terminal(ports: &Ports, mut record: JobRecord, version: String) -> Result<(), StepError> {
    match send_outbox(ports, &record).await {
        Ok(_) => {
            record.outbox.clear();
            // A conflict: another writer got here first (a delivery that sent
            // them too, or a valid job in place of this rejection). Its marker
            // is not ours to clear; the next tick's gate clears a terminal one.
            record.writes += 1;
            if ports.ledger.replace(&record, &version).await? == WriteOutcome::Conflict {
                return Ok(());
            }
        }
        Err(err) if err.is_retryable() => {
            warn!(job_id = %record.job_id, error = %err, "notices not sent; the next tick tries again");
            return Ok(());
        }
        Err(err) => {
            error!(job_id = %record.job_id, error = %err, notices = record.outbox.len(),
                "notices cannot be sent; they stay in the job's record");
            crate::metrics::emit(
                &ports.settings.stack,
                None,
                &[("NoticesUndelivered", crate::metrics::Unit::Count, 1.0)],
            );
        }
    }
    ports.ledger.set_active(&record.job_id, false).await?;
    Ok(())
}

/// The longest output line an event carries, in characters.
const LINE_CHARS: usize = 300;

/// Send the outbox; Ok(false) when the deployment publishes nothing.
pub async fn send_outbox(ports: &Ports, record: &JobRecord) -> Result<bool, CloudError> {
    let Some(notices) = ports.notices.as_ref() else { return Ok(false) };
    if record.outbox.is_empty() {
        return Ok(true);
    }
    let mut batch = NoticeBatch { job_id: record.job_id.clone(), notices: record.outbox.clone() };
    for notice in &mut batch.notices {
        if notice.detail_type.as_deref() == Some(JOB_STATE_CHANGE) {
            add_failing_lines(ports, &record.job_id, &mut notice.detail).await;
        }
    }
    notices.send(&batch).await?;
    Ok(true)
}

/// The failing shard's last output lines, read from its saved output
/// (`jobs/<id>/output/...`). Best effort: an event without them still goes.
async fn add_failing_lines(ports: &Ports, job_id: &str, detail: &mut Value) {
    let Some(name) = detail["failingShard"]["output"].as_str().map(str::to_string) else { return };
    if !detail["failingShard"]["lastLines"].is_null() {
        return;
    }
    match ports.ledger.get(&format!("jobs/{job_id}/{name}")).await {
        Ok(Some(body)) => {
            let text = String::from_utf8_lossy(&body);
            let lines: Vec<&str> = text.lines().collect();
            let last: Vec<String> = lines[lines.len().saturating_sub(FAILING_LINES)..]
                .iter()
                .map(|l| l.chars().take(LINE_CHARS).collect())
                .collect();
            detail["failingShard"]["lastLines"] = json!(last);
        }
        Ok(None) => {}
        Err(err) => warn!(%job_id, error = %err, "failing shard's output unreadable; event sent without it"),
    }
}
