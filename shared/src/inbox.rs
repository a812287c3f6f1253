//! Changes made to a job from outside its passes (a cancel, a spot
//! interruption, a reaper's note): written by compare-and-swap without the
//! lease, then the job is woken to act on them.

use crate::error::StepError;
use crate::ports::{Ports, WriteOutcome};
use crate::record::JobRecord;
use crate::wake::{Trigger, WakeMessage};

/// Record something on a job from outside a pass (a cancel, an
/// interruption), without touching the lease, then wake the job.
pub async fn update_inbox(
    ports: &Ports,
    job_id: &str,
    change: impl Fn(&mut JobRecord) -> bool,
    trigger: Trigger,
) -> Result<bool, StepError> {
    for _ in 0..5 {
        let Some(loaded) = ports.ledger.load(job_id).await? else { return Ok(false) };
        let mut record = loaded.record;
        if record.state.is_terminal() || !change(&mut record) {
            return Ok(false);
        }
        record.writes += 1;
        if let WriteOutcome::Written { .. } = ports.ledger.replace(&record, &loaded.version).await? {
            ports.queue.send(&WakeMessage::new(job_id, trigger), 0).await?;
            return Ok(true);
        }
    }
    Err(StepError::Contended(job_id.to_string()))
}
