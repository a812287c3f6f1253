//! SQS partial batch failures: one bad record never fails or drops its
//! neighbours. Retryable errors go back to the queue (and to the DLQ after
//! maxReceiveCount); permanent ones are logged and acknowledged, so nothing
//! loops as a poison message.

use std::collections::BTreeMap;
use std::future::Future;

use futures_util::stream::StreamExt;

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

/// How many keys one invocation handles at once: enough that one job's
/// long pass does not hold back the others, few enough that the calls,
/// memory and CPU of one invocation stay near those of one pass
/// (`ReconcileMaxConcurrency` invocations run at once).
pub const AT_ONCE: usize = 4;

/// As `for_each_record`, with records of different keys handled at once:
/// one job's long pass never holds back another job's wake in the same
/// batch. Records with the same key are handled one at a time, in order, so
/// two wakes of one job never race each other for its lease.
pub async fn for_each_record_by<K, F, Fut>(event: SqsEvent, key: K, handle: F) -> SqsBatchResponse
where
    K: Fn(&SqsMessage) -> String,
    F: Fn(SqsMessage) -> Fut,
    Fut: Future<Output = Result<(), StepError>>,
{
    let mut groups: BTreeMap<String, Vec<SqsMessage>> = BTreeMap::new();
    for message in event.records {
        groups.entry(key(&message)).or_default().push(message);
    }
    let handle = &handle;
    let responses: Vec<SqsBatchResponse> = futures_util::stream::iter(groups.into_values().map(|records| {
        let mut group = SqsEvent::default();
        group.records = records;
        for_each_record(group, handle)
    }))
    .buffer_unordered(AT_ONCE)
    .collect()
    .await;
    let mut response = SqsBatchResponse::default();
    for part in responses {
        response.batch_item_failures.extend(part.batch_item_failures);
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

    /// Two keys run interleaved: the first key's first record waits on a
    /// signal the second key's record gives, so handling the batch in turn
    /// would never finish. One key's records stay in order.
    #[tokio::test]
    async fn different_keys_run_at_once_and_one_key_in_order() {
        let mut event = SqsEvent::default();
        event.records = vec![message("a1"), message("a2"), message("b1")];
        let (tx, rx) = tokio::sync::watch::channel(false);
        let seen = std::sync::Mutex::new(Vec::new());
        let run = for_each_record_by(
            event,
            |m| m.body.clone().unwrap_or_default()[..1].to_string(),
            |m| {
                let (tx, mut rx, seen) = (tx.clone(), rx.clone(), &seen);
                async move {
                    let body = m.body.unwrap_or_default();
                    if body == "a1" {
                        rx.wait_for(|go| *go).await.unwrap();
                    }
                    if body == "b1" {
                        tx.send(true).unwrap();
                    }
                    seen.lock().unwrap().push(body);
                    Ok(())
                }
            },
        );
        let response = tokio::time::timeout(std::time::Duration::from_secs(5), run)
            .await
            .expect("a batch handled in turn would wait forever");
        assert!(response.batch_item_failures.is_empty());
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen, vec!["b1", "a1", "a2"]);
    }
}
