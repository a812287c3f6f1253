//! `flotilla dlq` and `redrive`: what the dead-letter queues hold, and
//! sending it back once the cause is fixed.

use anyhow::Result;

use flotilla_shared::aws;
use flotilla_shared::ports::{DeadLetters, Records};

use crate::deployment::{Deployment, QUEUES};

/// The DLQ of `queue`, and the queue it serves.
fn dead_letter_queue(deployment: &Deployment, queue: &str) -> Result<aws::sqs::SqsDeadLetters> {
    let (dlq_url, source_url) = deployment.dead_letters(queue)?;
    Ok(aws::sqs::SqsDeadLetters { sqs: deployment.sqs(), dlq_url, source_url })
}

pub async fn list_dead_letters(deployment: &Deployment) -> Result<()> {
    let ledger = deployment.ledger()?;
    let mut total = 0;
    for queue in QUEUES {
        let dlq = dead_letter_queue(deployment, queue)?;
        let letters = dlq.receive(100).await.map_err(|e| anyhow::anyhow!("reading the {queue} DLQ: {e}"))?;
        println!("{queue} DLQ: {} message(s)", letters.len());
        for letter in &letters {
            let body: serde_json::Value = serde_json::from_str(&letter.body).unwrap_or(serde_json::Value::Null);
            let job_id =
                body.get("job_id").or_else(|| body.get("id")).or_else(|| body.get("cancel")).and_then(|v| v.as_str());
            let sent = letter.sent_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "?".into());
            let why = match job_id {
                Some(id) => match ledger.load(id).await {
                    Ok(Some(loaded)) => loaded
                        .record
                        .stalled
                        .map(|s| format!("its last pass stopped on: {s}"))
                        .unwrap_or_else(|| format!("job is {} ({})", loaded.record.state, loaded.record.reason)),
                    Ok(None) => "no record for this job".to_string(),
                    Err(err) => format!("record unreadable: {err}"),
                },
                None => "names no job".to_string(),
            };
            let start: String = flotilla_shared::task_token::redacted(&letter.body).chars().take(120).collect();
            dlq.release(letter).await.map_err(|e| anyhow::anyhow!("releasing a {queue} DLQ message: {e}"))?;
            println!(
                "  job {}: tried {} times, first sent {sent}; {why}\n    {start}",
                job_id.unwrap_or("?"),
                letter.receive_count
            );
        }
        total += letters.len();
    }
    if total > 0 {
        println!("{total} dead-lettered message(s): fix the cause, then `flotilla redrive --queue <queue>`");
    }
    Ok(())
}

/// Every message back, a batch at a time until the DLQ is empty: a FIFO
/// DLQ gives no more of a message group while some of it is in flight.
pub async fn redrive(deployment: &Deployment, queue: &str) -> Result<()> {
    let dlq = dead_letter_queue(deployment, queue)?;
    let mut sent = 0;
    loop {
        let letters = dlq.receive(100).await.map_err(|e| anyhow::anyhow!("reading the {queue} DLQ: {e}"))?;
        if letters.is_empty() {
            break;
        }
        for letter in &letters {
            dlq.redrive(letter).await.map_err(|e| anyhow::anyhow!("redriving: {e}"))?;
        }
        sent += letters.len();
    }
    println!("{sent} message(s) sent back to the {queue} queue");
    Ok(())
}
