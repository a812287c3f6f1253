//! SQS behind `WakeQueue` (the reconcile queue), `Notices` (the notify
//! queue) and `DeadLetters` (a DLQ).

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageSystemAttributeName;
use chrono::{DateTime, Utc};

use super::cloud_error;
use crate::error::CloudError;
use crate::notice::{Notice, NoticeBatch, NOTICES_PER_MESSAGE};
use crate::ports::{CloudResult, DeadLetter, DeadLetters, Notices, WakeQueue};
use crate::wake::WakeMessage;

pub struct SqsWakeQueue {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
}

#[async_trait]
impl WakeQueue for SqsWakeQueue {
    async fn send(&self, message: &WakeMessage, delay_seconds: u32) -> CloudResult<()> {
        let body = serde_json::to_string(message).map_err(|e| CloudError::Invalid(e.to_string()))?;
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            // SQS caps DelaySeconds at 900.
            .delay_seconds(delay_seconds.min(900) as i32)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("sqs", "SendMessage", e))
    }
}

pub struct SqsNotices {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
}

#[async_trait]
impl Notices for SqsNotices {
    /// FIFO, one message group per job, so a job's notices stay in order;
    /// its heartbeats go in a group of their own (`<job>#heartbeat`), so a
    /// notice that fails never holds them back past the task's
    /// `HeartbeatSeconds`. The same notices sent again within SQS's
    /// 5-minute deduplication window are dropped.
    async fn send(&self, batch: &NoticeBatch) -> CloudResult<()> {
        let (heartbeats, notices): (Vec<Notice>, Vec<Notice>) =
            batch.notices.iter().cloned().partition(Notice::is_heartbeat);
        for notices in notices.chunks(NOTICES_PER_MESSAGE) {
            self.send_one(&batch.job_id, batch.job_id.clone(), notices).await?;
        }
        // The outbox holds at most one heartbeat; the newest is enough.
        if let Some(heartbeat) = heartbeats.last() {
            let group = format!("{}#heartbeat", batch.job_id);
            self.send_one(&batch.job_id, group, std::slice::from_ref(heartbeat)).await?;
        }
        Ok(())
    }
}

impl SqsNotices {
    async fn send_one(&self, job_id: &str, group: String, notices: &[Notice]) -> CloudResult<()> {
        let part = NoticeBatch { job_id: job_id.to_string(), notices: notices.to_vec() };
        let body = serde_json::to_string(&part).map_err(|e| CloudError::Invalid(e.to_string()))?;
        let ids: Vec<&str> = notices.iter().map(|n| n.event_id.as_str()).collect();
        let dedup = crate::hash::fnv64(ids.join(",").as_bytes());
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_group_id(group)
            .message_deduplication_id(format!("{dedup:016x}-{}", ids.len()))
            .message_body(body)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("sqs", "SendMessage", e))
    }
}

pub struct SqsDeadLetters {
    pub sqs: aws_sdk_sqs::Client,
    pub dlq_url: String,
    pub source_url: String,
}

#[async_trait]
impl DeadLetters for SqsDeadLetters {
    async fn receive(&self, max: usize) -> CloudResult<Vec<DeadLetter>> {
        let mut letters = Vec::new();
        while letters.len() < max {
            // ReceiveMessage returns at most 10 messages.
            let want = (max - letters.len()).min(10) as i32;
            let response = self
                .sqs
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(want)
                .visibility_timeout(60)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .send()
                .await
                .map_err(|e| cloud_error("sqs", "ReceiveMessage", e))?;
            let messages = response.messages();
            if messages.is_empty() {
                break;
            }
            for message in messages {
                let attribute = |name: MessageSystemAttributeName| {
                    message.attributes().and_then(|a| a.get(&name)).and_then(|v| v.parse::<i64>().ok())
                };
                letters.push(DeadLetter {
                    message_id: message.message_id().unwrap_or_default().to_string(),
                    body: message.body().unwrap_or_default().to_string(),
                    receipt: message.receipt_handle().unwrap_or_default().to_string(),
                    receive_count: attribute(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(0).max(0)
                        as u32,
                    sent_at: attribute(MessageSystemAttributeName::SentTimestamp)
                        .and_then(DateTime::<Utc>::from_timestamp_millis),
                    group: message
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                        .cloned(),
                });
            }
        }
        Ok(letters)
    }

    async fn delete(&self, letter: &DeadLetter) -> CloudResult<()> {
        self.sqs
            .delete_message()
            .queue_url(&self.dlq_url)
            .receipt_handle(&letter.receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("sqs", "DeleteMessage", e))
    }

    async fn release(&self, letter: &DeadLetter) -> CloudResult<()> {
        self.sqs
            .change_message_visibility()
            .queue_url(&self.dlq_url)
            .receipt_handle(&letter.receipt)
            .visibility_timeout(0)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("sqs", "ChangeMessageVisibility", e))
    }

    /// Back to the source queue; to a FIFO one in the message's own group,
    /// deduplicated by its id, so a redrive repeated within SQS's 5-minute
    /// window sends it once.
    async fn redrive(&self, letter: &DeadLetter) -> CloudResult<()> {
        let fifo = letter.group.as_ref();
        self.sqs
            .send_message()
            .queue_url(&self.source_url)
            .message_body(&letter.body)
            .set_message_group_id(fifo.cloned())
            .set_message_deduplication_id(fifo.map(|_| letter.message_id.clone()))
            .send()
            .await
            .map_err(|e| cloud_error("sqs", "SendMessage", e))?;
        self.delete(letter).await
    }
}
