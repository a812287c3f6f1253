//! Lambda event handlers, shared by the function binaries so each `main`
//! only wires config, clients and the runtime.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use chrono::Utc;
use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use tracing::info;

use crate::error::StepError;
use crate::lifecycle::{Step, StepMessage};
use crate::ports::Ports;
use crate::sqs_batch::for_each_record;
use crate::steps::{self, intake};

/// A batch from one step's queue.
pub async fn step_batch(ports: &Ports, expected: Step, event: SqsEvent) -> SqsBatchResponse {
    for_each_record(event, |message| async move {
        let body = message.body.unwrap_or_default();
        let step: StepMessage = serde_json::from_str(&body).map_err(|e| StepError::BadMessage(e.to_string()))?;
        if step.step != expected {
            return Err(StepError::BadMessage(format!(
                "{} message on the {} queue",
                step.step.as_str(),
                expected.as_str()
            )));
        }
        let handled = steps::handle(ports, &step).await?;
        info!(job_id = %step.job_id, ?handled, "handled");
        Ok(())
    })
    .await
}

/// Intake takes SQS job submissions and EventBridge scheduled events.
pub async fn intake_event(ports: &Ports, event: LambdaEvent<Value>) -> Result<Value, StepError> {
    let payload = event.payload;
    if payload.get("Records").is_some() {
        let batch: SqsEvent = serde_json::from_value(payload).map_err(|e| StepError::BadMessage(e.to_string()))?;
        let response = for_each_record(batch, |message| async move {
            let body = message.body.unwrap_or_default();
            let delivery_id = message.message_id.unwrap_or_default();
            let outcome = intake::submit(ports, &body, &delivery_id).await?;
            info!(?outcome, "intake");
            Ok(())
        })
        .await;
        return serde_json::to_value(response).map_err(|e| StepError::BadMessage(e.to_string()));
    }
    if payload.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event") {
        let scheduled: aws_lambda_events::event::eventbridge::EventBridgeEvent =
            serde_json::from_value(payload).map_err(|e| StepError::BadMessage(e.to_string()))?;
        // resources holds the rule ARN: arn:aws:events:region:account:rule/<name>
        let rule = scheduled
            .resources
            .as_deref()
            .and_then(|r| r.first())
            .and_then(|arn| arn.rsplit('/').next())
            .ok_or_else(|| StepError::BadMessage("scheduled event without a rule ARN in resources".into()))?
            .to_string();
        let fired_at = scheduled.time.unwrap_or_else(Utc::now);
        let outcome = intake::scheduled(ports, &rule, fired_at).await?;
        info!(?outcome, "scheduled intake");
        return Ok(json!({ "outcome": format!("{outcome:?}") }));
    }
    Err(StepError::BadMessage("expected an SQS batch or an EventBridge Scheduled Event".into()))
}
