//! SQS partial batch failures: one bad record never fails or drops its
//! neighbours. Retryable errors go back to the queue (and to the DLQ after
//! maxReceiveCount); permanent ones are logged and acknowledged, so nothing
//! loops as a poison message.

use std::future::Future;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use tracing::{error, warn, Instrument};

use crate::error::StepError;

pub async fn for_each_record<F, Fut>(event: SqsEvent, handle: F) -> SqsBatchResponse
where
    F: Fn(SqsMessage) -> Fut,
    Fut: Future<Output = Result<(), StepError>>,
{
    let mut response = SqsBatchResponse::default();
    for message in event.records {
        let message_id = message.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!("record", %message_id);
        let result = handle(message).instrument(span).await;
        match result {
            Ok(()) => {}
            Err(err) if err.is_retryable() => {
                warn!(%message_id, error = %err, "will retry");
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = message_id;
                response.batch_item_failures.push(failure);
            }
            Err(err) => error!(%message_id, error = %err, "dropped: retrying cannot help"),
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::sqs::SqsMessage;

    fn message(id: &str) -> SqsMessage {
        let mut message = SqsMessage::default();
        message.message_id = Some(id.to_string());
        message.body = Some(id.to_string());
        message
    }

    #[tokio::test]
    async fn only_retryable_records_are_returned_to_the_queue() {
        let mut event = SqsEvent::default();
        event.records = vec![message("ok"), message("bad"), message("busy"), message("ok-too")];
        let response = for_each_record(event, |m| async move {
            match m.body.as_deref() {
                Some("bad") => Err(StepError::BadMessage("garbage".into())),
                Some("busy") => Err(StepError::Contended("j".into())),
                _ => Ok(()),
            }
        })
        .await;
        let failed: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
        assert_eq!(failed, vec!["busy"]);
    }
}
