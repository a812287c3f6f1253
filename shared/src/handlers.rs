//! Lambda event handlers, shared by the function binaries so each `main`
//! only wires config, clients and the runtime.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use chrono::Utc;
use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use tracing::info;

use aws_lambda_events::event::cloudwatch_events::ec2::InstanceStateChange;
use aws_lambda_events::event::cloudwatch_events::CloudWatchEvent;

use crate::error::StepError;
use crate::intake;
use crate::ports::Ports;
use crate::reconcile::{self, WakeMessage};
use crate::sqs_batch::for_each_record;

/// A batch from the reconcile queue: wakes, and EventBridge events that
/// EC2 and SSM rules deliver to the same queue. Each pass gets at most
/// `most`, and never more than what is left before `deadline` (the Lambda's,
/// minus a margin); a message with too little time left goes back to SQS.
pub async fn reconcile_batch(
    ports: &Ports,
    event: SqsEvent,
    most: chrono::Duration,
    deadline: Option<chrono::DateTime<Utc>>,
) -> SqsBatchResponse {
    let handled = std::sync::atomic::AtomicUsize::new(0);
    let handled = &handled;
    for_each_record(event, |message| async move {
        let left = deadline.map(|d| d - Utc::now()).unwrap_or(most);
        let first = handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        if left < chrono::Duration::seconds(5) && !first {
            return Err(StepError::Contended("no time left in this invocation".into()));
        }
        // The first message always gets a short pass, even where a local
        // emulator reports an odd deadline.
        let budget = most.min(left).max(chrono::Duration::seconds(5));
        let body = message.body.unwrap_or_default();
        let value: Value = serde_json::from_str(&body).map_err(|e| StepError::BadMessage(e.to_string()))?;
        if value.get("detail-type").is_some() {
            return instance_event(ports, value).await;
        }
        let wake: WakeMessage = serde_json::from_value(value).map_err(|e| StepError::BadMessage(e.to_string()))?;
        let handled = reconcile::reconcile(ports, &wake, budget).await?;
        info!(job_id = %wake.job_id, ?handled, "handled");
        Ok(())
    })
    .await
}

/// An EC2 event about one instance: record a spot warning on its job, and
/// wake the job so its next step starts now rather than at the next poll.
async fn instance_event(ports: &Ports, value: Value) -> Result<(), StepError> {
    let event: CloudWatchEvent<Value> =
        serde_json::from_value(value).map_err(|e| StepError::BadMessage(e.to_string()))?;
    let detail_type = event.detail_type.clone().unwrap_or_default();
    let instance_id = match detail_type.as_str() {
        "EC2 Instance State-change Notification" => {
            let detail: InstanceStateChange = serde_json::from_value(event.detail.clone().unwrap_or_default())
                .map_err(|e| StepError::BadMessage(e.to_string()))?;
            detail.instance_id
        }
        // SSM's detail names the instance as `instance-id` too.
        _ => event
            .detail
            .as_ref()
            .and_then(|d| d.get("instance-id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| StepError::BadMessage(format!("{detail_type} without detail.instance-id")))?,
    };
    let Some(job_id) = ports.cloud.fleet.job_of(&ports.settings.stack, &instance_id).await? else {
        info!(%instance_id, %detail_type, "not a Flotilla instance; ignored");
        return Ok(());
    };
    // A rebalance recommendation is only a hint: it wakes the job, it does not
    // stop healthy work.
    let interruption = detail_type == "EC2 Spot Instance Interruption Warning";
    if interruption {
        let id = instance_id.clone();
        reconcile::update_inbox(
            ports,
            &job_id,
            move |record| {
                if record.interruptions.contains(&id) {
                    return false;
                }
                record.interruptions.push(id.clone());
                true
            },
            "event",
        )
        .await?;
    } else {
        ports.queue.send(&WakeMessage::new(&job_id, "event"), 0).await?;
    }
    info!(%instance_id, %job_id, %detail_type, "event routed to its job");
    Ok(())
}

/// The scheduled tick: wake every job that is not terminal, so a lost
/// message only ever delays a job, then run the reaper. `{"dry_run": true}`
/// in the event (or FLOTILLA_REAPER_DRY_RUN) makes the reaper plan only.
pub async fn tick(ports: &Ports, event: &Value) -> Result<Value, StepError> {
    let woken = wake_active(ports).await?;
    let dry_run = event.get("dry_run").and_then(Value::as_bool).unwrap_or(ports.settings.reaper_dry_run);
    let reaped = crate::reaper::run(ports, &crate::reaper::ReaperSettings::from(&ports.settings), dry_run).await?;
    Ok(json!({ "woken": woken, "reaper": reaped }))
}

/// The safety tick alone: wake every job that is not terminal.
pub async fn wake_active(ports: &Ports) -> Result<usize, StepError> {
    let jobs = ports.ledger.list_active().await?;
    for job_id in &jobs {
        ports.queue.send(&WakeMessage::new(job_id, "tick"), 0).await?;
    }
    info!(jobs = jobs.len(), "safety tick");
    Ok(jobs.len())
}

/// Intake takes SQS job submissions and EventBridge scheduled events.
pub async fn intake_event(ports: &Ports, event: LambdaEvent<Value>) -> Result<Value, StepError> {
    let payload = event.payload;
    if payload.get("Records").is_some() {
        let batch: SqsEvent = serde_json::from_value(payload).map_err(|e| StepError::BadMessage(e.to_string()))?;
        let response = for_each_record(batch, |message| async move {
            let body = message.body.unwrap_or_default();
            let delivery_id = message.message_id.unwrap_or_default();
            // SQS's SenderId: the IAM principal (user or role session) that sent it.
            let sender = message.attributes.get("SenderId").map(String::as_str);
            let outcome = intake::submit(ports, &body, &delivery_id, sender).await?;
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
