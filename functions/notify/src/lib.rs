//! The notifier: each notify-queue message carries a job's notices
//! (`flotilla_shared::events`); each becomes an EventBridge event (source
//! `flotilla`) and, for a job a Step Functions task waits on, the task's
//! answer. Delivery is at least once: a message whose events or answers
//! could not all be delivered goes back to the queue whole, and notices
//! carry `event_id` so subscribers drop the repeats.

// aws_lambda_events' types are #[non_exhaustive]: built from Default, then set.
#![allow(clippy::field_reassign_with_default)]

use std::time::Duration;

use std::collections::BTreeSet;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use flotilla_shared::aws::cloud_error;
use flotilla_shared::error::{CloudError, StepError};
use flotilla_shared::events::{Notice, NoticeBatch, TaskAnswer, SOURCE};
use tracing::{info, warn};

/// PutEvents takes at most 10 entries a call.
const ENTRIES_PER_CALL: usize = 10;
/// Rounds of PutEvents for entries it reports failed (`FailedEntryCount`
/// with HTTP 200), before the message goes back to the queue.
const PUT_ROUNDS: u32 = 4;

pub struct Notifier {
    pub events: aws_sdk_eventbridge::Client,
    pub sfn: aws_sdk_sfn::Client,
    pub sqs: aws_sdk_sqs::Client,
    /// The event bus Flotilla's events go to (`default` unless the stack says).
    pub bus: String,
    /// The jobs queue, where a cancel goes when a task's caller gave up.
    pub jobs_queue_url: String,
}

impl Notifier {
    pub fn new(config: &aws_config::SdkConfig, bus: &str, jobs_queue_url: &str) -> Self {
        Notifier {
            events: aws_sdk_eventbridge::Client::new(config),
            sfn: aws_sdk_sfn::Client::new(config),
            sqs: aws_sdk_sqs::Client::new(config),
            bus: bus.to_string(),
            jobs_queue_url: jobs_queue_url.to_string(),
        }
    }

    /// FLOTILLA_JOBS_QUEUE_URL, and FLOTILLA_EVENT_BUS (default: `default`).
    pub fn from_env(config: &aws_config::SdkConfig) -> Result<Self, String> {
        let jobs = std::env::var("FLOTILLA_JOBS_QUEUE_URL")
            .map_err(|_| "environment variable FLOTILLA_JOBS_QUEUE_URL is not set".to_string())?;
        let bus = std::env::var("FLOTILLA_EVENT_BUS").ok().filter(|b| !b.is_empty()).unwrap_or("default".into());
        Ok(Notifier::new(config, &bus, &jobs))
    }

    /// One SQS batch from the FIFO notify queue, in order: failures go back
    /// to the queue, and so does every later message of a job whose message
    /// failed, so its notices never overtake one another. A message that
    /// is not a notice batch is dropped with its reason (never retried).
    pub async fn handle(&self, batch: SqsEvent) -> SqsBatchResponse {
        let mut response = SqsBatchResponse::default();
        let mut held: BTreeSet<String> = BTreeSet::new();
        for message in batch.records {
            let id = message.message_id.clone().unwrap_or_default();
            let group = message.attributes.get("MessageGroupId").cloned();
            let parsed: Result<NoticeBatch, _> = serde_json::from_str(message.body.as_deref().unwrap_or_default());
            let job = parsed.as_ref().map(|b| b.job_id.clone()).ok().or(group);
            let result = match (&parsed, &job) {
                (_, Some(job)) if held.contains(job) => {
                    Err(StepError::Contended(format!("{job}: an earlier notice failed")))
                }
                (Ok(notices), _) => self.deliver(notices).await,
                (Err(err), _) => Err(StepError::BadMessage(err.to_string())),
            };
            match result {
                Ok(()) => {}
                Err(err) if err.is_retryable() => {
                    warn!(message_id = %id, error = %err, "will retry");
                    held.extend(job);
                    let mut failure = BatchItemFailure::default();
                    failure.item_identifier = id;
                    response.batch_item_failures.push(failure);
                }
                Err(err) => warn!(message_id = %id, error = %err, "dropped: not a notice batch"),
            }
        }
        response
    }

    /// Every notice's event, then every task answer.
    pub async fn deliver(&self, batch: &NoticeBatch) -> Result<(), StepError> {
        let events: Vec<&Notice> = batch.notices.iter().filter(|n| n.detail_type.is_some()).collect();
        for chunk in events.chunks(ENTRIES_PER_CALL) {
            self.put_events(chunk).await?;
        }
        for answer in batch.notices.iter().filter_map(|n| n.task.as_ref()) {
            self.answer(&batch.job_id, answer).await?;
        }
        info!(job_id = %batch.job_id, events = events.len(), "notices delivered");
        Ok(())
    }

    /// PutEvents, again for the entries it failed (throttled, internal).
    async fn put_events(&self, notices: &[&Notice]) -> Result<(), StepError> {
        let mut pending: Vec<&Notice> = notices.to_vec();
        for round in 0..PUT_ROUNDS {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(200 << round)).await;
            }
            let entries: Vec<PutEventsRequestEntry> = pending.iter().map(|n| self.entry(n)).collect();
            let response = self
                .events
                .put_events()
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| cloud_error("events", "PutEvents", e))?;
            if response.failed_entry_count() == 0 {
                return Ok(());
            }
            // Results are in the order of the entries; a failed one has an error code.
            let failed: Vec<&Notice> = pending
                .iter()
                .zip(response.entries())
                .filter(|(_, result)| result.error_code().is_some())
                .map(|(notice, result)| {
                    warn!(event_id = %notice.event_id, code = ?result.error_code(), "PutEvents entry failed");
                    *notice
                })
                .collect();
            pending = failed;
        }
        Err(StepError::Cloud(CloudError::classified(
            "events",
            "PutEvents",
            "FailedEntries",
            &format!("{} entries still failed after {PUT_ROUNDS} rounds", pending.len()),
            Some(flotilla_shared::error::RetryClass::Transient),
        )))
    }

    fn entry(&self, notice: &Notice) -> PutEventsRequestEntry {
        let job_id = notice.detail["jobId"].as_str().unwrap_or_default();
        PutEventsRequestEntry::builder()
            .source(SOURCE)
            .detail_type(notice.detail_type.clone().unwrap_or_default())
            .detail(notice.detail.to_string())
            .event_bus_name(&self.bus)
            .resources(format!("flotilla:job/{job_id}"))
            .build()
    }

    /// SendTaskSuccess, SendTaskFailure or SendTaskHeartbeat. The caller
    /// gave up (its task timed out, or the token is unknown): a heartbeat
    /// then cancels the job, since nobody waits for it; an end has no one
    /// left to tell.
    async fn answer(&self, job_id: &str, answer: &TaskAnswer) -> Result<(), StepError> {
        let result = match answer {
            TaskAnswer::Success { token, output } => self
                .sfn
                .send_task_success()
                .task_token(token)
                .output(output.to_string())
                .send()
                .await
                .map(|_| ())
                .map_err(|e| cloud_error("states", "SendTaskSuccess", e)),
            TaskAnswer::Failure { token, error, cause } => self
                .sfn
                .send_task_failure()
                .task_token(token)
                .error(error)
                .cause(cause)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| cloud_error("states", "SendTaskFailure", e)),
            TaskAnswer::Heartbeat { token } => self
                .sfn
                .send_task_heartbeat()
                .task_token(token)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| cloud_error("states", "SendTaskHeartbeat", e)),
        };
        match result {
            Err(err) if caller_gave_up(&err) => {
                warn!(%job_id, answer = answer.kind(), code = ?err.code(), "the waiting task is gone");
                if matches!(answer, TaskAnswer::Heartbeat { .. }) {
                    self.cancel(job_id).await?;
                }
                Ok(())
            }
            other => other.map_err(StepError::from),
        }
    }

    async fn cancel(&self, job_id: &str) -> Result<(), StepError> {
        // Intake reads a body of exactly `{"cancel": <job id>}` as a cancel.
        let body = serde_json::json!({ "cancel": job_id });
        self.sqs
            .send_message()
            .queue_url(&self.jobs_queue_url)
            .message_body(body.to_string())
            .send()
            .await
            .map_err(|e| StepError::Cloud(cloud_error("sqs", "SendMessage", e)))?;
        info!(%job_id, "cancelled: its Step Functions task is gone");
        Ok(())
    }
}

/// Step Functions' answers for a task that no longer waits: timed out
/// (`TaskTimedOut`, also after it ended), or a token it does not know.
fn caller_gave_up(err: &CloudError) -> bool {
    matches!(err.code(), Some("TaskTimedOut" | "TaskDoesNotExist" | "InvalidToken"))
}
