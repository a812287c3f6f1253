//! SQS behind `StepQueue`: one queue per step.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::cloud_error;
use crate::error::CloudError;
use crate::lifecycle::StepMessage;
use crate::ports::{CloudResult, StepQueue};

pub struct SqsStepQueue {
    pub sqs: aws_sdk_sqs::Client,
    /// Step name to queue URL.
    pub queue_urls: BTreeMap<&'static str, String>,
}

#[async_trait]
impl StepQueue for SqsStepQueue {
    async fn send(&self, message: &StepMessage, delay_seconds: u32) -> CloudResult<()> {
        let url = self
            .queue_urls
            .get(message.step.as_str())
            .ok_or_else(|| CloudError::Invalid(format!("no queue for step {}", message.step.as_str())))?;
        let body = serde_json::to_string(message).map_err(|e| CloudError::Invalid(e.to_string()))?;
        self.sqs
            .send_message()
            .queue_url(url)
            .message_body(body)
            // SQS caps DelaySeconds at 900.
            .delay_seconds(delay_seconds.min(900) as i32)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("sqs", "SendMessage", e))
    }
}
