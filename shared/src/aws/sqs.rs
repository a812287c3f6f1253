//! SQS behind `WakeQueue`: one reconcile queue.

use async_trait::async_trait;

use super::cloud_error;
use crate::error::CloudError;
use crate::ports::{CloudResult, WakeQueue};
use crate::reconcile::WakeMessage;

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
