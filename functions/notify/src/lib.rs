//! The notifier: each notify-queue message carries a job's notices
//! (`flotilla_shared::events`); each becomes an EventBridge event (source
//! `flotilla`) and, for a job a Step Functions task waits on, the task's
//! answer. Delivery is at least once: a message whose events or answers
//! could not all be delivered goes back to the queue whole, and notices
//! carry `event_id` so subscribers drop the repeats.

// aws_lambda_events' types are #[non_exhaustive]: built from Default, then set.
#![allow(clippy::field_reassign_with_default)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use flotilla_shared::aws::cloud_error;
use flotilla_shared::error::{CloudError, StepError};
use flotilla_shared::events::{Notice, NoticeBatch, TaskAnswer, SOURCE};
use flotilla_shared::metrics::Unit;
use tracing::{error, info, warn};

/// Time kept back from the invocation's deadline: a message is started
/// only with at least this left (a few calls at their timeouts).
const HEADROOM: Duration = Duration::from_secs(8);

/// PutEvents takes at most 10 entries a call.
const ENTRIES_PER_CALL: usize = 10;
/// Rounds of PutEvents for entries it reports failed (`FailedEntryCount`
/// with HTTP 200), with no sleep between them (a Lambda waiting is billed),
/// before the message goes back to the queue.
const PUT_ROUNDS: u32 = 2;

pub struct Notifier {
    pub events: aws_sdk_eventbridge::Client,
    pub sfn: aws_sdk_sfn::Client,
    pub sqs: aws_sdk_sqs::Client,
    /// The event bus Flotilla's events go to (`default` unless the stack says).
    pub bus: String,
    /// The jobs queue, where a cancel goes when a task's caller gave up.
    pub jobs_queue_url: String,
    /// The stack, for metrics' dimension.
    pub stack: String,
}

impl Notifier {
    pub fn new(config: &aws_config::SdkConfig, bus: &str, jobs_queue_url: &str) -> Self {
        Notifier {
            events: aws_sdk_eventbridge::Client::new(config),
            sfn: aws_sdk_sfn::Client::new(config),
            sqs: aws_sdk_sqs::Client::new(config),
            bus: bus.to_string(),
            jobs_queue_url: jobs_queue_url.to_string(),
            stack: std::env::var("FLOTILLA_STACK").unwrap_or_default(),
        }
    }

    /// FLOTILLA_JOBS_QUEUE_URL, and FLOTILLA_EVENT_BUS (default: `default`).
    pub fn from_env(config: &aws_config::SdkConfig) -> Result<Self, String> {
        let jobs = std::env::var("FLOTILLA_JOBS_QUEUE_URL")
            .map_err(|_| "environment variable FLOTILLA_JOBS_QUEUE_URL is not set".to_string())?;
        let bus = std::env::var("FLOTILLA_EVENT_BUS").ok().filter(|b| !b.is_empty()).unwrap_or("default".into());
        Ok(Notifier::new(config, &bus, &jobs))
    }

    /// One SQS batch from the FIFO notify queue, in order. A message that
    /// failed for a reason that passes goes back to the queue, and so does
    /// every later message of its job, so its notices never overtake one
    /// another. A heartbeat is never held and never retried: the next tick
    /// sends another, and a held one could outlive the task's
    /// `HeartbeatSeconds`. A message that can never be delivered is
    /// dropped with its reason and counted (`NoticesUndelivered`); one
    /// refused for a reason a fix can clear (no permission) goes back, and
    /// after five receives to the dead-letter queue, for `flotilla redrive`.
    /// Messages left when less than `HEADROOM` remains before `deadline`
    /// go back untried, so a slow call never times the whole batch out.
    pub async fn handle(&self, batch: SqsEvent, deadline: Option<Instant>) -> SqsBatchResponse {
        let mut response = SqsBatchResponse::default();
        let mut held: BTreeSet<String> = BTreeSet::new();
        let give_back = |response: &mut SqsBatchResponse, id: String| {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id;
            response.batch_item_failures.push(failure);
        };
        for message in batch.records {
            let id = message.message_id.clone().unwrap_or_default();
            if deadline.is_some_and(|d| d.saturating_duration_since(Instant::now()) < HEADROOM) {
                give_back(&mut response, id);
                continue;
            }
            let notices: NoticeBatch = match serde_json::from_str(message.body.as_deref().unwrap_or_default()) {
                Ok(notices) => notices,
                Err(err) => {
                    error!(message_id = %id, error = %err, "dropped: not a notice batch");
                    self.count_undelivered(1);
                    continue;
                }
            };
            if notices.notices.iter().all(Notice::is_heartbeat) {
                if let Err(err) = self.deliver(&notices).await {
                    warn!(job_id = %notices.job_id, error = %err, "heartbeat not sent; the next tick sends another");
                }
                continue;
            }
            let result = if held.contains(&notices.job_id) {
                Err(StepError::Contended(format!("{}: an earlier notice failed", notices.job_id)))
            } else {
                self.deliver(&notices).await
            };
            match result {
                Ok(()) => {}
                Err(err) if is_content_error(&err) => {
                    error!(message_id = %id, job_id = %notices.job_id, error = %err,
                        "dropped: these notices can never be delivered");
                    self.count_undelivered(notices.notices.len());
                }
                Err(err) => {
                    warn!(message_id = %id, job_id = %notices.job_id, error = %err, "will retry");
                    held.insert(notices.job_id.clone());
                    give_back(&mut response, id);
                }
            }
        }
        response
    }

    fn count_undelivered(&self, notices: usize) {
        flotilla_shared::metrics::emit(&self.stack, None, &[("NoticesUndelivered", Unit::Count, notices as f64)]);
    }

    /// Every notice's event, every task answer, then, for a job that ended,
    /// its HTML report (written again by a redelivery: the same page).
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

    /// PutEvents, and again at once from the first entry it failed for a
    /// reason that passes (`InternalFailure`, `ThrottlingException`): the
    /// entries after it go again too (their `event_id` marks the repeats),
    /// so a job's events reach the bus in order. An entry whose content
    /// EventBridge will never take (`MalformedDetail`, `InvalidArgument`)
    /// is logged whole and counted, never retried; any other refusal (no
    /// permission) fails the message, which SQS brings back.
    async fn put_events(&self, notices: &[&Notice]) -> Result<(), StepError> {
        let mut pending: Vec<&Notice> = notices.to_vec();
        for _ in 0..PUT_ROUNDS {
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
            let mut resend_from = None;
            let mut dropped = BTreeSet::new();
            for (index, (notice, result)) in pending.iter().zip(response.entries()).enumerate() {
                match result.error_code() {
                    None => {}
                    Some(code @ ("MalformedDetail" | "InvalidArgument")) => {
                        error!(event_id = %notice.event_id, code, reason = ?result.error_message(),
                            detail = %notice.detail, "PutEvents refused this event's content; it is dropped");
                        self.count_undelivered(1);
                        dropped.insert(notice.event_id.clone());
                    }
                    Some("InternalFailure" | "ThrottlingException") => {
                        warn!(event_id = %notice.event_id, "PutEvents entry failed; sent again");
                        resend_from.get_or_insert(index);
                    }
                    Some(code) => {
                        return Err(StepError::Cloud(CloudError::classified(
                            "events",
                            "PutEvents",
                            code,
                            result.error_message().unwrap_or_default(),
                            Some(flotilla_shared::error::RetryClass::Transient),
                        )))
                    }
                }
            }
            let Some(from) = resend_from else { return Ok(()) };
            pending = pending[from..].iter().filter(|n| !dropped.contains(&n.event_id)).copied().collect();
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

/// The deployment's AWS configuration with the notifier's own bounds: a
/// batch of ten messages must end well inside the function's 30 s, so a
/// call gets 3 s an attempt, 8 s in all, and three attempts (the SDK's
/// standard retry); what does not fit goes back to the queue (`handle`).
pub fn quick_calls(config: &aws_config::SdkConfig) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(3))
        .operation_timeout(Duration::from_secs(8))
        .build();
    config
        .to_builder()
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3))
        .build()
}

/// Errors no retry or fix can clear: the notices' own content (too large,
/// malformed). Everything else goes back to the queue.
fn is_content_error(err: &StepError) -> bool {
    match err {
        StepError::BadMessage(_) => true,
        StepError::Cloud(cloud) => {
            matches!(
                cloud.code(),
                Some("MalformedDetail" | "InvalidArgument" | "InvalidOutput" | "ValidationException")
            )
        }
        _ => false,
    }
}

/// Step Functions' answers for a task that no longer waits: timed out
/// (`TaskTimedOut`, also after it ended), or a token it does not know.
fn caller_gave_up(err: &CloudError) -> bool {
    matches!(err.code(), Some("TaskTimedOut" | "TaskDoesNotExist" | "InvalidToken"))
}
