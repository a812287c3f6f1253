//! Flotilla's own events, end to end on moto: the reconciler's outbox, the
//! notify queue, the notify function's PutEvents, an EventBridge rule and
//! a subscriber's queue. At least once, deduplicable by `event_id`, every
//! `sequence` present, even when the send fails before or after it lands.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use flotilla_shared::events::{Notice, NoticeBatch, TaskAnswer};
use flotilla_shared::ports::{CloudResult, Notices};
use flotilla_shared::record::JobState;
use serde_json::{json, Value};

use crate::lifecycle_moto::{all_running, gate_run, open_gate, pump_until};
use crate::moto::{job, notify_event, MotoStack};

const LIMIT: Duration = Duration::from_secs(180);

/// The notify queue as the reconciler sees it, with injected failures: the
/// first `lost_before` sends fail before anything lands (a crash between a
/// transition and its publish); the next `lost_after` land, then fail (a
/// crash after a successful publish, before the outbox is cleared).
struct Flaky {
    inner: Box<dyn Notices>,
    lost_before: AtomicU32,
    lost_after: AtomicU32,
    sends: Arc<AtomicU32>,
}

#[async_trait]
impl Notices for Flaky {
    async fn send(&self, batch: &NoticeBatch) -> CloudResult<()> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        let injected = || flotilla_shared::error::CloudError::api("sqs", "SendMessage", "crash", "injected");
        if self.lost_before.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(injected());
        }
        self.inner.send(batch).await?;
        if self.lost_after.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(injected());
        }
        Ok(())
    }
}

/// A queue that an EventBridge rule sends every Flotilla event to.
async fn subscribed(stack: &MotoStack, name: &str) -> String {
    let queue = stack.sqs().create_queue().queue_name(name).send().await.expect("queue");
    let url = queue.queue_url().expect("url").to_string();
    stack.route_events(&format!("{name}-rule"), &json!({"source": ["flotilla"]}), &url);
    url
}

/// A job event notice, numbered `n`.
fn notice(job_id: &str, n: u64) -> Notice {
    Notice {
        event_id: format!("{job_id}:{n}"),
        sequence: n,
        detail_type: Some(flotilla_shared::events::JOB_STATE_CHANGE.into()),
        detail: json!({"jobId": job_id, "sequence": n, "event_id": format!("{job_id}:{n}")}),
        task: None,
    }
}

/// Every event the subscriber's queue holds, as EventBridge delivered them.
async fn received(stack: &MotoStack, queue: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let got = stack
            .sqs()
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .visibility_timeout(600)
            .send()
            .await
            .expect("receive");
        if got.messages().is_empty() {
            return events;
        }
        for message in got.messages() {
            events.push(serde_json::from_str(message.body().unwrap_or_default()).expect("an event envelope"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_hears_every_transition_once_by_event_id_though_sends_fail() {
    let stack = MotoStack::start().await;
    let subscriber = subscribed(&stack, "subscriber").await;
    let mut ports = stack.ports();
    let sends = Arc::new(AtomicU32::new(0));
    let real = ports.notices.take().expect("the stack publishes");
    ports.notices =
        Some(Box::new(Flaky { inner: real, lost_before: 1.into(), lost_after: 1.into(), sends: sends.clone() }));

    // A retry: shard 1's instance is killed mid-run and replaced.
    let mut spec = job("events-1");
    spec["name"] = json!("nightly-index");
    let go = gate_run(&stack, &mut spec, "echo done $FLOTILLA_SHARD_INDEX");
    stack.submit(&spec.to_string()).await;
    let record = pump_until(&stack, "events-1", all_running).await;
    let victim = record.shards[1].current().and_then(|a| a.instance_id.clone()).expect("instance");
    stack.ec2().terminate_instances().instance_ids(&victim).send().await.expect("terminate");
    pump_until(&stack, "events-1", |r| r.shards[1].attempts.len() == 2).await;
    open_gate(&stack, &go);
    let record = stack.run_to_end(&ports, "events-1", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    // The last pass's notices, and any the notify function must redo.
    while stack.pump_notices().await > 0 {}
    let record = stack.record(&ports, "events-1").await.expect("record");
    assert!(record.outbox.is_empty(), "the outbox was sent and cleared");

    let events = received(&stack, &subscriber).await;
    assert!(events.iter().all(|e| e["source"] == "flotilla"), "{events:?}");
    // Duplicates only with the same event_id, and then the same detail.
    let mut by_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for event in &events {
        by_id.entry(event["detail"]["event_id"].as_str().expect("event_id").to_string()).or_default().push(event);
    }
    let repeated = by_id.values().filter(|copies| copies.len() > 1).count();
    assert!(repeated > 0, "the send that landed and then failed was repeated: {} sends", sends.load(Ordering::SeqCst));
    for copies in by_id.values() {
        assert!(copies.iter().all(|c| c["detail"] == copies[0]["detail"]), "{copies:?}");
    }
    // Every sequence number from 1, no gap.
    let sequences: Vec<u64> = by_id.values().map(|c| c[0]["detail"]["sequence"].as_u64().expect("sequence")).collect();
    let most = *sequences.iter().max().expect("events");
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=most).collect::<Vec<_>>(), "no gap, no repeat of a number under two ids");

    let ordered: Vec<&Value> = {
        let mut firsts: Vec<&Value> = by_id.values().map(|c| c[0]).collect();
        firsts.sort_by_key(|e| e["detail"]["sequence"].as_u64());
        firsts
    };
    let jobs: Vec<&Value> =
        ordered.iter().copied().filter(|e| e["detail-type"] == "Flotilla Job State Change").collect();
    let statuses: Vec<&str> = jobs.iter().map(|e| e["detail"]["status"].as_str().unwrap_or_default()).collect();
    assert_eq!(statuses.first(), Some(&"SUBMITTED"), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&"SUCCEEDED"), "{statuses:?}");
    assert_eq!(
        ordered.last().map(|e| e["detail"]["status"].clone()),
        Some(json!("SUCCEEDED")),
        "the job's end comes last"
    );
    let end = &jobs.last().expect("an end")["detail"];
    assert_eq!(end["jobId"], "events-1");
    assert_eq!(end["jobName"], "nightly-index");
    assert_eq!(end["shards"], json!({"total": 2, "succeeded": 2, "failed": 0, "running": 0}));
    assert_eq!(end["attempts"], 3, "two shards, one retried");
    assert!(end["cost"]["estimatedUsd"].as_f64().is_some_and(|usd| usd > 0.0), "{end}");
    assert!(end["cost"]["realizedUsd"].as_f64().is_some(), "{end}");
    assert!(end["stoppedAt"].as_i64() >= end["startedAt"].as_i64(), "{end}");
    let snapshots: Vec<String> =
        stack.snapshots("events-1").await.iter().filter_map(|s| s.snapshot_id.clone()).collect();
    assert_eq!(end["snapshotsTotal"], json!(snapshots.len()));
    for id in &snapshots {
        assert!(end["snapshots"].as_array().is_some_and(|listed| listed.contains(&json!(id))), "{id} in {end}");
    }
    assert!(end["report"].as_str().is_some_and(|r| r.ends_with("/jobs/events-1/report.txt")), "{end}");

    // Shard 1: its first attempt ran, was lost, and its second succeeded.
    let shard1: Vec<(u64, String)> = ordered
        .iter()
        .filter(|e| e["detail-type"] == "Flotilla Shard State Change" && e["detail"]["shard"] == 1)
        .map(|e| {
            (e["detail"]["attempt"].as_u64().unwrap_or(0), e["detail"]["status"].as_str().unwrap_or("").to_string())
        })
        .collect();
    assert!(shard1.contains(&(1, "RUNNING".into())), "{shard1:?}");
    assert!(shard1.contains(&(2, "RUNNING".into())), "{shard1:?}");
    assert_eq!(shard1.last(), Some(&(2, "SUCCEEDED".to_string())), "{shard1:?}");
}

/// What the moto extension's Step Functions tasks were told (gap 22).
fn task_calls(stack: &MotoStack) -> Vec<Value> {
    std::fs::read_to_string(stack.scratch.join("sfn-calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a call"))
        .collect()
}

fn tasks_waiting(stack: &MotoStack, file: &str, tokens: &[&str]) {
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(stack.scratch.join(file), tokens.join("\n")).expect("tasks");
}

fn with_token(mut spec: Value, token: &str) -> Value {
    spec["notify"] = json!({"task_token": token});
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_gets_heartbeats_then_the_jobs_summary() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    tasks_waiting(&stack, "sfn-open", &["token-ok"]);
    stack.submit(&with_token(job("task-ok"), "token-ok").to_string()).await;
    let record = stack.run_to_end(&ports, "task-ok", false, LIMIT).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    while stack.pump_notices().await > 0 {}

    let calls = task_calls(&stack);
    let actions: Vec<&str> = calls.iter().map(|c| c["action"].as_str().unwrap_or_default()).collect();
    assert!(actions.first() == Some(&"SendTaskHeartbeat"), "a heartbeat while it ran: {actions:?}");
    assert_eq!(actions.last(), Some(&"SendTaskSuccess"), "{actions:?}");
    assert_eq!(actions.iter().filter(|a| **a == "SendTaskSuccess").count(), 1, "{actions:?}");
    let output = &calls.last().expect("success")["output"];
    assert_eq!(output["jobId"], "task-ok");
    assert_eq!(output["status"], "SUCCEEDED");
    assert_eq!(output["snapshotsTotal"], 2, "{output}");
    // The token is a secret: in no event detail, no record line of output.
    let record_text = serde_json::to_string(&stack.record(&ports, "task-ok").await).expect("json");
    assert_eq!(record_text.matches("token-ok").count(), 1, "only the spec holds it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_rejected_job_fails_its_task_with_an_error_a_catch_names() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    tasks_waiting(&stack, "sfn-open", &["token-fail", "token-bad"]);
    let mut failing = with_token(job("task-fail"), "token-fail");
    failing["fleet"] = json!({"count": 1});
    failing["run"] = json!({"script": "echo broken; exit 3"});
    failing["retry"] = json!({"attempts": 1});
    stack.submit(&failing.to_string()).await;
    // Valid JSON carrying a token, but not a valid spec.
    let mut bad = with_token(job("task-bad"), "token-bad");
    bad["deadline_minutes"] = json!(0);
    stack.submit(&bad.to_string()).await;
    let record = stack.run_to_end(&ports, "task-fail", false, LIMIT).await;
    assert_eq!(record.state, JobState::Failed);
    assert_eq!(stack.record(&ports, "task-bad").await.map(|r| r.state), Some(JobState::Rejected));
    while stack.pump_notices().await > 0 {}

    let calls = task_calls(&stack);
    let ended = |token: &str| {
        calls.iter().filter(|c| c["token"] == token && c["action"] != "SendTaskHeartbeat").cloned().collect::<Vec<_>>()
    };
    let failed = ended("token-fail");
    assert_eq!(failed.len(), 1, "{calls:?}");
    assert_eq!(failed[0]["action"], "SendTaskFailure");
    assert_eq!(failed[0]["error"], flotilla_shared::events::errors::FAILED);
    let kept = stack.record(&ports, "task-bad").await.and_then(|r| r.rejected_input).expect("the body, for the report");
    assert!(!kept.contains("token-bad") && kept.contains("<redacted>"), "{kept}");
    let rejected = ended("token-bad");
    assert_eq!(rejected.len(), 1, "{calls:?}");
    assert_eq!(rejected[0]["action"], "SendTaskFailure");
    assert_eq!(rejected[0]["error"], flotilla_shared::events::errors::REJECTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_task_timed_out_is_cancelled() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    tasks_waiting(&stack, "sfn-timed-out", &["token-gone"]);
    let mut spec = with_token(job("task-gone"), "token-gone");
    // A run that would hold the fleet for an hour.
    spec["run"] = json!({"script": "sleep 3600", "timeout_seconds": 300});
    stack.submit(&spec.to_string()).await;
    let record = stack.run_to_end(&ports, "task-gone", false, LIMIT).await;
    assert_eq!(record.state, JobState::Cancelled, "{}", flotilla_shared::report::render(&record));
    assert_eq!(stack.running_managed().await, 0);
}

/// The example state machine catches exactly the errors Flotilla sends.
#[test]
fn the_example_state_machine_catches_the_errors_flotilla_sends() {
    use flotilla_shared::events::errors;
    let path = crate::moto::workspace_root().join("examples/chain-two-jobs.yaml");
    let text = std::fs::read_to_string(&path).expect("the example");
    let caught: Vec<String> = text
        .lines()
        .filter_map(|line| line.split_once("ErrorEquals:").map(|(_, list)| list.to_string()))
        .flat_map(|list| {
            list.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|n| n.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let sent = [errors::FAILED, errors::CANCELLED, errors::REJECTED];
    assert!(!caught.is_empty(), "no Catch in {}", path.display());
    for name in &caught {
        assert!(sent.contains(&name.as_str()), "{name} is not an error Flotilla sends");
    }
    for name in sent {
        assert!(caught.iter().any(|c| c == name), "{name} is not caught");
    }
}

/// PutEvents answers HTTP 200 with some entries failed (moto extension
/// gap 23): the notifier sends those again, so every event arrives; past
/// its rounds the message fails and SQS brings it back, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_eventbridge_fails_are_sent_again() {
    let stack = MotoStack::start().await;
    let subscriber = subscribed(&stack, "failures").await;
    let batch = NoticeBatch { job_id: "retry-1".into(), notices: (1..=12).map(|n| notice("retry-1", n)).collect() };
    let notifier = notify::Notifier::new(&stack.config, "default", &stack.jobs_queue);
    tasks_waiting(&stack, "put-events-fail", &["5"]);
    notifier.deliver(&batch).await.expect("delivered after sending the failed entries again");
    let events = received(&stack, &subscriber).await;
    let mut ids: Vec<u64> = events.iter().filter_map(|e| e["detail"]["sequence"].as_u64()).collect();
    ids.sort_unstable();
    ids.dedup();
    // Every one; those after a failed entry go again too (same event_id), to keep the order.
    assert_eq!(ids, (1..=12).collect::<Vec<_>>(), "each at least once");
    // More failures than rounds: the message fails, to be redelivered whole.
    tasks_waiting(&stack, "put-events-fail", &["100"]);
    let err = notifier.deliver(&batch).await.expect_err("not all delivered");
    assert!(err.is_retryable(), "{err}");
}

/// An entry EventBridge will never take (a code AWS calls non-retryable)
/// is dropped, not sent again: the rest of the batch is delivered and the
/// message is done, never a poison message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_eventbridge_refuses_for_good_is_not_sent_again() {
    let stack = MotoStack::start().await;
    let subscriber = subscribed(&stack, "refused").await;
    let batch = NoticeBatch { job_id: "refused-1".into(), notices: (1..=6).map(|n| notice("refused-1", n)).collect() };
    let notifier = notify::Notifier::new(&stack.config, "default", &stack.jobs_queue);
    tasks_waiting(&stack, "put-events-fail", &["2 MalformedDetail"]);
    notifier.deliver(&batch).await.expect("done: the refused entries are dropped");
    let mut got: Vec<u64> =
        received(&stack, &subscriber).await.iter().filter_map(|e| e["detail"]["sequence"].as_u64()).collect();
    got.sort_unstable();
    assert_eq!(got, vec![3, 4, 5, 6], "the two refused are not put again");
}

/// A job's heartbeats go in a message group of their own, and a notice of
/// the job that fails never holds one back or sends it round again: a
/// heartbeat held past the task's HeartbeatSeconds times the task out,
/// and Flotilla then cancels a healthy job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_notice_never_holds_back_its_jobs_heartbeat() {
    let stack = MotoStack::start().await;
    tasks_waiting(&stack, "sfn-open", &["token-hb"]);
    let ports = stack.ports();
    let heartbeat = Notice {
        event_id: "hb-1:heartbeat:60".into(),
        sequence: 0,
        detail_type: None,
        detail: Value::Null,
        task: Some(TaskAnswer::Heartbeat { token: "token-hb".into() }),
    };
    let batch = NoticeBatch { job_id: "hb-1".into(), notices: vec![notice("hb-1", 1), heartbeat] };
    ports.notices.as_ref().expect("the stack publishes").send(&batch).await.expect("sent");
    let mut messages = Vec::new();
    loop {
        let got = stack.receive_notices().await;
        if got.is_empty() {
            break;
        }
        messages.extend(got);
    }
    let group = |m: &aws_sdk_sqs::types::Message| {
        m.attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId))
            .cloned()
            .unwrap_or_default()
    };
    let groups: Vec<String> = messages.iter().map(group).collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert!(groups.contains(&"hb-1".to_string()) && groups.contains(&"hb-1#heartbeat".to_string()), "{groups:?}");
    // The job's event first, failing every round; its heartbeat after it.
    messages.sort_by_key(|m| group(m).contains("#heartbeat"));
    tasks_waiting(&stack, "put-events-fail", &["100"]);
    let notifier = notify::Notifier::new(&stack.config, "default", &stack.jobs_queue);
    let response = notifier.handle(notify_event(&messages), None).await;
    let failed: Vec<String> = response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
    assert_eq!(failed, vec![messages[0].message_id().unwrap_or_default().to_string()], "only the event goes back");
    let calls = task_calls(&stack);
    assert!(calls.iter().any(|c| c["action"] == "SendTaskHeartbeat" && c["token"] == "token-hb"), "{calls:?}");
}

/// A job the reaper ends (no pass for long past its deadline) is announced
/// like any other end: its waiting task fails with the name a Catch
/// matches, and its marker is cleared only once its notices are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_reaper_ends_fails_its_waiting_task() {
    use flotilla_shared::reaper::{self, ReaperSettings};
    let stack = MotoStack::start().await;
    let ports = stack.ports();
    tasks_waiting(&stack, "sfn-open", &["token-reaped"]);
    let now = chrono::Utc::now();
    let spec = flotilla_shared::spec::parse(&with_token(job("stuck-2"), "token-reaped").to_string()).expect("spec");
    let planned = flotilla_shared::plan::plan(&spec, &flotilla_shared::plan::Prices::builtin()).expect("plan");
    let mut stuck =
        flotilla_shared::record::JobRecord::new("stuck-2".into(), spec, planned, now - chrono::Duration::minutes(75));
    stuck.updated_at = Some(now - chrono::Duration::minutes(50));
    ports.ledger.create(&stuck).await.expect("record");
    ports.ledger.set_active("stuck-2", true).await.expect("active");

    reaper::run(&ports, &ReaperSettings::from(&ports.settings), false).await.expect("reaper");
    let record = stack.record(&ports, "stuck-2").await.expect("record");
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    assert!(record.outbox.is_empty(), "sent, then cleared");
    assert!(!ports.ledger.list_active().await.expect("list").contains(&"stuck-2".to_string()));
    while stack.pump_notices().await > 0 {}
    let calls = task_calls(&stack);
    let ended: Vec<&Value> = calls.iter().filter(|c| c["token"] == "token-reaped").collect();
    assert_eq!(ended.len(), 1, "{calls:?}");
    assert_eq!(ended[0]["action"], "SendTaskFailure");
    assert_eq!(ended[0]["error"], flotilla_shared::events::errors::FAILED);
}
