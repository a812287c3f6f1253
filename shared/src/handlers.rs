//! Lambda event handlers, shared by the function binaries so each `main`
//! only wires config, clients and the runtime.

use std::collections::{BTreeMap, BTreeSet};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::{DateTime, Utc};
use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use tracing::{info, warn};

use aws_lambda_events::event::cloudwatch_events::ec2::InstanceStateChange;
use aws_lambda_events::event::cloudwatch_events::CloudWatchEvent;

use crate::error::StepError;
use crate::intake;
use crate::ports::{CloudResult, Ports};
use crate::reconcile;
use crate::sqs_batch::{for_each_record, for_each_record_by};
use crate::wake::{Trigger, WakeMessage};

/// A batch from the reconcile queue: wakes, and EventBridge events that
/// EC2, SSM and EBS rules deliver to the same queue. Each pass gets at most
/// `most`, and never more than what is left before `deadline` (the Lambda's,
/// minus a margin); a message with too little time left goes back to SQS.
pub async fn reconcile_batch(
    ports: &Ports,
    event: SqsEvent,
    most: chrono::Duration,
    deadline: Option<chrono::DateTime<Utc>>,
) -> SqsBatchResponse {
    // Events are routed together: one DescribeInstances for every instance
    // the batch names, and one wake per job however many events name it.
    let (events, wakes): (Vec<SqsMessage>, Vec<SqsMessage>) =
        event.records.into_iter().partition(|m| m.body.as_deref().is_some_and(is_event));
    let mut response = route_events(ports, events).await;
    let handled = std::sync::atomic::AtomicUsize::new(0);
    let handled = &handled;
    let mut batch = SqsEvent::default();
    batch.records = wakes;
    // Jobs are passed at once (one job's long pass never holds back
    // another's wake); one job's wakes in turn.
    let job_of = |message: &SqsMessage| {
        let body = message.body.as_deref().unwrap_or_default();
        serde_json::from_str::<WakeMessage>(body)
            .map(|wake| wake.job_id)
            .unwrap_or_else(|_| message.message_id.clone().unwrap_or_default())
    };
    let passes = for_each_record_by(batch, job_of, |message| async move {
        // A call started at the end of a pass may take its whole operation
        // timeout: the pass ends that long before the invocation must.
        let call = chrono::Duration::seconds(crate::fence::OPERATION_TIMEOUT_SECONDS);
        let left = deadline.map(|d| d - Utc::now() - call).unwrap_or(most);
        let first = handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        if left < chrono::Duration::seconds(5) && !first {
            return Err(StepError::Contended(format!(
                "no time left in this invocation ({} ms before its deadline)",
                left.num_milliseconds()
            )));
        }
        // The first message always gets a short pass, even where a local
        // emulator reports an odd deadline.
        let budget = most.min(left).max(chrono::Duration::seconds(5));
        let body = message.body.unwrap_or_default();
        let wake: WakeMessage = serde_json::from_str(&body).map_err(|e| StepError::BadMessage(e.to_string()))?;
        let handled = reconcile::reconcile(ports, &wake, budget).await?;
        info!(job_id = %wake.job_id, ?handled, "handled");
        Ok(())
    })
    .await;
    response.batch_item_failures.extend(passes.batch_item_failures);
    response
}

/// When a reconcile invocation must stop acting: the Lambda's deadline
/// (`Lambda-Runtime-Deadline-Ms`) less `margin_ms`, to save and re-queue.
/// A deadline that has already passed when the invocation starts is not a
/// deadline Lambda gives (cargo lambda's local runtime sends one), so the
/// pass budget alone bounds the batch; otherwise every wake after a batch's
/// first would go back to the queue and wait out its visibility timeout.
pub fn invocation_deadline(
    deadline_ms: u64,
    margin_ms: i64,
    now: chrono::DateTime<Utc>,
) -> Option<chrono::DateTime<Utc>> {
    let deadline = chrono::DateTime::from_timestamp_millis(i64::try_from(deadline_ms).ok()?)?;
    (deadline > now).then(|| deadline - chrono::Duration::milliseconds(margin_ms))
}

fn is_event(body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|v| v.get("detail-type").is_some())
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Instance(String),
    Snapshot(String),
}

/// EC2, SSM and EBS events about instances and snapshots: a spot warning is
/// recorded on its job, and every job an event names is woken once, so its
/// next step starts now rather than at the next poll. Events about what is
/// not this deployment's are dropped.
async fn route_events(ports: &Ports, messages: Vec<SqsMessage>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    // (message id, detail-type, subject) of each event that parses.
    let mut named: Vec<(String, String, Subject)> = Vec::new();
    for message in messages {
        let message_id = message.message_id.clone().unwrap_or_default();
        match subject_of(message.body.as_deref().unwrap_or_default()) {
            Ok((detail_type, subject)) => named.push((message_id, detail_type, subject)),
            Err(err) => warn!(%message_id, error = %err, "dropped: retrying cannot help"),
        }
    }
    if named.is_empty() {
        return response;
    }
    let jobs = owners(ports, &named, &mut response).await;
    for (job_id, (message_ids, instances, interrupted)) in by_job(&named, &jobs) {
        match wake_for_events(ports, &job_id, instances, interrupted).await {
            Ok(()) => info!(%job_id, events = message_ids.len(), "events routed to their job"),
            Err(err) if err.is_retryable() => {
                warn!(%job_id, error = %err, "events will retry");
                fail_all(&mut response, &mut message_ids.iter());
            }
            Err(err) => warn!(%job_id, error = %err, "events dropped: retrying cannot help"),
        }
    }
    response
}

/// These messages go back to the queue.
fn fail_all(response: &mut SqsBatchResponse, ids: &mut dyn Iterator<Item = &String>) {
    for id in ids {
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = id.clone();
        response.batch_item_failures.push(failure);
    }
}

/// The job of each subject, by tag, in one DescribeInstances and one
/// DescribeSnapshots for the whole batch; a lookup that fails costs only
/// the events it was for.
async fn owners(
    ports: &Ports,
    named: &[(String, String, Subject)],
    response: &mut SqsBatchResponse,
) -> BTreeMap<Subject, String> {
    let ids = |pick: fn(&Subject) -> Option<&String>| -> Vec<String> {
        named.iter().filter_map(|(_, _, s)| pick(s).cloned()).collect::<BTreeSet<_>>().into_iter().collect()
    };
    let instance_ids = ids(|s| if let Subject::Instance(id) = s { Some(id) } else { None });
    let snapshot_ids = ids(|s| if let Subject::Snapshot(id) = s { Some(id) } else { None });
    let stack = &ports.settings.stack;
    let mut jobs: BTreeMap<Subject, String> = BTreeMap::new();
    let instance_jobs = async {
        if instance_ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        ports.cloud.fleet.jobs_of(stack, &instance_ids).await
    };
    let snapshot_jobs = async {
        if snapshot_ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        ports.cloud.volumes.snapshot_jobs(stack, &snapshot_ids).await
    };
    type Covers = fn(&Subject) -> bool;
    type Lookup = (Covers, fn(String) -> Subject, CloudResult<BTreeMap<String, String>>);
    let lookups: [Lookup; 2] = [
        (|s| matches!(s, Subject::Instance(_)), Subject::Instance, instance_jobs.await),
        (|s| matches!(s, Subject::Snapshot(_)), Subject::Snapshot, snapshot_jobs.await),
    ];
    for (covers, subject, found) in lookups {
        match found {
            Ok(found) => jobs.extend(found.into_iter().map(|(id, job)| (subject(id), job))),
            Err(err) if err.is_retryable() => {
                warn!(error = %err, "events will retry");
                fail_all(response, &mut named.iter().filter(|(_, _, s)| covers(s)).map(|(m, _, _)| m));
            }
            Err(err) => warn!(error = %err, "events dropped: retrying cannot help"),
        }
    }
    jobs
}

/// Per job: (its message ids, the instances events named, those a spot
/// warning named).
type Named = (Vec<String>, BTreeSet<String>, Vec<String>);

fn by_job(named: &[(String, String, Subject)], jobs: &BTreeMap<Subject, String>) -> BTreeMap<String, Named> {
    let mut by_job: BTreeMap<String, Named> = BTreeMap::new();
    for (message_id, detail_type, subject) in named {
        let Some(job_id) = jobs.get(subject) else {
            info!(?subject, %detail_type, "not a Flotilla resource of this stack; ignored");
            continue;
        };
        let entry = by_job.entry(job_id.clone()).or_default();
        entry.0.push(message_id.clone());
        if let Subject::Instance(instance_id) = subject {
            entry.1.insert(instance_id.clone());
            // A rebalance recommendation is only a hint: it wakes the job, it
            // does not stop healthy work.
            if detail_type == "EC2 Spot Instance Interruption Warning" {
                entry.2.push(instance_id.clone());
            }
        }
    }
    by_job
}

/// Record the spot warnings on the job, then wake it; the pass lists the
/// named instances' commands at once. A repeated warning changes nothing
/// and wakes nobody through the inbox, so the wake is sent regardless.
async fn wake_for_events(
    ports: &Ports,
    job_id: &str,
    instances: BTreeSet<String>,
    interrupted: Vec<String>,
) -> Result<(), StepError> {
    let mut wake = WakeMessage::new(job_id, Trigger::Event);
    wake.instances = instances.into_iter().collect();
    if !interrupted.is_empty() {
        crate::inbox::update_inbox(
            ports,
            job_id,
            move |record| {
                let fresh: Vec<String> =
                    interrupted.iter().filter(|id| !record.interruptions.contains(id)).cloned().collect();
                record.interruptions.extend(fresh.iter().cloned());
                !fresh.is_empty()
            },
            Trigger::Event,
        )
        .await?;
    }
    ports.queue.send(&wake, 0).await?;
    Ok(())
}

/// The event's detail-type and what it is about.
fn subject_of(body: &str) -> Result<(String, Subject), StepError> {
    let event: CloudWatchEvent<Value> = serde_json::from_str(body).map_err(|e| StepError::BadMessage(e.to_string()))?;
    let detail_type = event.detail_type.clone().unwrap_or_default();
    let subject = match detail_type.as_str() {
        "EC2 Instance State-change Notification" => {
            let detail: InstanceStateChange = serde_json::from_value(event.detail.clone().unwrap_or_default())
                .map_err(|e| StepError::BadMessage(e.to_string()))?;
            Subject::Instance(detail.instance_id)
        }
        // The snapshot's ARN is the event's resource: arn:aws:ec2:<region>::snapshot/<id>.
        "EBS Snapshot Notification" => event
            .resources
            .iter()
            .find_map(|arn| arn.split_once(":snapshot/").map(|(_, id)| id.to_string()))
            .filter(|id| id.starts_with("snap-"))
            .map(Subject::Snapshot)
            .ok_or_else(|| StepError::BadMessage(format!("{detail_type} without a snapshot ARN in resources")))?,
        // The spot warning's, rebalance's and SSM's details name it `instance-id` too.
        _ => event
            .detail
            .as_ref()
            .and_then(|d| d.get("instance-id"))
            .and_then(Value::as_str)
            .map(|id| Subject::Instance(id.to_string()))
            .ok_or_else(|| StepError::BadMessage(format!("{detail_type} without detail.instance-id")))?,
    };
    Ok((detail_type, subject))
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
        ports.queue.send(&WakeMessage::new(job_id, Trigger::Tick), 0).await?;
    }
    info!(jobs = jobs.len(), "safety tick");
    Ok(jobs.len())
}

/// Intake takes SQS job submissions, EventBridge scheduled events, and
/// `{"dry_run": <spec>}` invoked directly (the plan is the reply).
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
            // A dry run sent through the queue: its answer is kept beside
            // where the job's record would be.
            if let intake::Intake::Planned { job_id, plan } = &outcome {
                let body = serde_json::to_vec_pretty(plan).map_err(|e| StepError::BadMessage(e.to_string()))?;
                ports.ledger.put_artifact(job_id, "dry-run.json", &body, "application/json").await?;
            }
            Ok(())
        })
        .await;
        return serde_json::to_value(response).map_err(|e| StepError::BadMessage(e.to_string()));
    }
    // `cargo lambda invoke` / `aws lambda invoke` with {"dry_run": <spec>}:
    // the plan (or the rejection) is the reply; nothing is written.
    if payload.get("dry_run").is_some() {
        let outcome = intake::submit(ports, &payload.to_string(), "dry-run", None).await?;
        return Ok(match outcome {
            intake::Intake::Planned { job_id, plan } => json!({ "outcome": "planned", "job_id": job_id, "plan": plan }),
            intake::Intake::Rejected { job_id, reason } => {
                json!({ "outcome": "rejected", "job_id": job_id, "reason": reason })
            }
            other => json!({ "outcome": format!("{other:?}") }),
        });
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
    if payload.get("schedule_arn").is_some() || payload.get("scheduled_time").is_some() {
        let (schedule, fired_at) = scheduler_firing(&payload)?;
        let outcome = intake::scheduled(ports, &schedule, fired_at).await?;
        info!(?outcome, %schedule, "scheduled intake");
        return Ok(json!({ "outcome": format!("{outcome:?}") }));
    }
    Err(StepError::BadMessage(
        "expected an SQS batch, an EventBridge Scheduler firing ({\"schedule_arn\", \"scheduled_time\"}), \
         an EventBridge Scheduled Event or {\"dry_run\": <job spec>}"
            .into(),
    ))
}

/// An EventBridge Scheduler firing: the target's `Input`, as template.yaml
/// gives it, with Scheduler's placeholders filled in:
/// `{"schedule_arn": "<aws.scheduler.schedule-arn>", "scheduled_time":
/// "<aws.scheduler.scheduled-time>"}`. The schedule's name (the ARN's last
/// part) names its spec in the bucket; the scheduled time, not the moment
/// of delivery, makes the job id, so a repeated delivery, or one a
/// flexible window moved, is the same job.
fn scheduler_firing(payload: &Value) -> Result<(String, DateTime<Utc>), StepError> {
    let field = |name: &str| {
        payload.get(name).and_then(Value::as_str).filter(|v| !v.starts_with("<aws.scheduler.")).ok_or_else(|| {
            StepError::BadMessage(format!(
                "a Scheduler firing needs {name} filled in by Scheduler's placeholder (<aws.scheduler.{}>), got {}",
                if name == "schedule_arn" { "schedule-arn" } else { "scheduled-time" },
                payload.get(name).map_or("nothing".to_string(), |v| v.to_string())
            ))
        })
    };
    let arn = field("schedule_arn")?;
    // arn:<partition>:scheduler:<region>:<account>:schedule/<group>/<name>;
    // a schedule outside the default group is `<group>/<name>`, its spec
    // `schedules/<group>/<name>.json`, so two groups' names never meet.
    let name = arn
        .split_once(":schedule/")
        .and_then(|(_, rest)| rest.split_once('/'))
        .filter(|(group, name)| !group.is_empty() && !name.is_empty() && !name.contains('/'))
        .map(|(group, name)| if group == "default" { name.to_string() } else { format!("{group}/{name}") })
        .ok_or_else(|| StepError::BadMessage(format!("schedule_arn {arn:?} is not a Scheduler schedule ARN")))?;
    let at = field("scheduled_time")?;
    let fired_at = DateTime::parse_from_rfc3339(at)
        .map_err(|e| StepError::BadMessage(format!("scheduled_time {at:?} is not an RFC 3339 time: {e}")))?
        .with_timezone(&Utc);
    Ok((name, fired_at))
}

#[cfg(test)]
mod tests {
    use super::invocation_deadline;

    #[test]
    fn a_deadline_already_past_at_the_start_is_no_deadline() {
        let now = chrono::DateTime::from_timestamp_millis(1_796_000_000_000).unwrap();
        let ahead = invocation_deadline(1_796_000_900_000, 15_000, now).expect("a real deadline");
        assert_eq!((ahead - now).num_milliseconds(), 885_000);
        // cargo lambda's local runtime: a deadline far in the past.
        assert_eq!(invocation_deadline(733_000, 15_000, now), None);
        assert_eq!(invocation_deadline(1_796_000_000_000, 15_000, now), None);
    }
}
