//! Every file in events/ is fed to the function that receives it in AWS,
//! through the real handlers and SDK, against moto.

use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::SqsEvent;
use flotilla_shared::handlers;
use flotilla_shared::lifecycle::Step;
use flotilla_shared::ports::Ports;
use flotilla_shared::record::JobState;
use lambda_runtime::LambdaEvent;
use serde_json::Value;

use crate::moto::{job, workspace_root, MotoStack};

fn event(name: &str) -> Value {
    let path = workspace_root().join("events").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("event file")).expect("event JSON")
}

async fn intake(ports: &Ports, payload: Value) -> Value {
    handlers::intake_event(ports, LambdaEvent::new(payload, Default::default())).await.expect("intake")
}

/// Feed a step file, with its `seq` set to the record's current one.
async fn feed_step(ports: &Ports, name: &str, step: Step, job_id: &str) {
    let record = ports.ledger.load(job_id).await.expect("load").expect("record").record;
    let mut payload = event(name);
    let mut body: Value =
        serde_json::from_str(payload["Records"][0]["body"].as_str().expect("body")).expect("step body");
    body["seq"] = Value::from(record.step_seq);
    payload["Records"][0]["body"] = Value::String(body.to_string());
    let batch: SqsEvent = serde_json::from_value(payload).expect("SqsEvent");
    let response = handlers::step_batch(ports, step, batch).await;
    assert!(response.batch_item_failures.is_empty(), "{name}: {:?}", response.batch_item_failures);
}

async fn drive_until(ports: &Ports, name: &str, step: Step, job_id: &str, done: impl Fn(JobState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = ports.ledger.load(job_id).await.expect("load").expect("record").record.state;
        if done(state) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: stuck in {state}");
        feed_step(ports, name, step, job_id).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The README's full spec example is the demo job, so it cannot drift.
#[test]
fn readme_example_is_the_demo_job() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let block = readme.split("```json\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a json block");
    let example: Value = serde_json::from_str(block).expect("README example is JSON");
    assert_eq!(example, event("demo-job.json"));
}

#[test]
fn demo_job_is_valid_and_plans_three_instances() {
    let body = std::fs::read_to_string(workspace_root().join("events/demo-job.json")).expect("demo job");
    let spec = flotilla_shared::spec::parse(&body).expect("parses");
    flotilla_shared::spec::validate(&spec).expect("valid");
    let plan = flotilla_shared::plan::plan(&spec).expect("plan");
    assert_eq!(plan.instance_count, 3, "ceil(202 / (10 x 10))");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_file_drives_its_function() {
    let stack = MotoStack::start().await;
    let ports = stack.ports();

    // EventBridge schedule: the spec is stored under schedules/<rule>.json.
    let mut scheduled = job("ignored");
    scheduled["fleet"] = serde_json::json!({"count": 1});
    flotilla_shared::aws::s3_client(&stack.config)
        .put_object()
        .bucket(&stack.bucket)
        .key("schedules/flotilla-nightly-example.json")
        .body(scheduled.to_string().into_bytes().into())
        .send()
        .await
        .expect("store schedule spec");
    intake(&ports, event("scheduled-event.json")).await;
    let fired = ports.ledger.load("flotilla-nightly-example-202611210300").await.expect("load").expect("scheduled job");
    assert_eq!(fired.record.state, JobState::Submitted);
    // A duplicate delivery of the same firing is the same job.
    intake(&ports, event("scheduled-event.json")).await;
    assert_eq!(
        ports.ledger.load("flotilla-nightly-example-202611210300").await.expect("load").expect("job").version,
        fired.version
    );

    let response = intake(&ports, event("sqs-submit-bad-jobs.json")).await;
    assert_eq!(response["batchItemFailures"].as_array().map(Vec::len), Some(0), "bad input is never retried");
    for (id, reason) in [
        // No id of its own: named after the SQS message id, as the README says.
        ("job-059f36b4-87a3-44ab-83d2-661975830a7d", "malformed JSON: EOF while parsing"),
        ("hostile-tag", "tags.team: value contains"),
        ("hostile-program", "program `rm -rf /;` must be a plain path"),
        ("absurd-count", "fleet.count: must be 1..=1000"),
    ] {
        let record = ports.ledger.load(id).await.expect("load").expect(id).record;
        assert_eq!(record.state, JobState::Rejected);
        assert!(record.reason.contains(reason), "{id}: {}", record.reason);
    }

    intake(&ports, event("sqs-submit-job.json")).await;
    let submitted = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    assert_eq!((submitted.state, submitted.step_seq), (JobState::Submitted, 1));

    feed_step(&ports, "step-launch.json", Step::Launch, "events-submit").await;
    let launched = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    assert_eq!(launched.state, JobState::WaitingReady);
    assert_eq!(launched.instances.len(), 2);

    drive_until(&ports, "step-readiness.json", Step::Readiness, "events-submit", |s| s == JobState::Running).await;
    drive_until(&ports, "step-command.json", Step::Command, "events-submit", |s| s == JobState::Snapshotting).await;
    drive_until(&ports, "step-teardown.json", Step::Teardown, "events-submit", JobState::is_terminal).await;
    let done = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.reason);

    // Cancelling a finished job changes nothing.
    intake(&ports, event("sqs-cancel-job.json")).await;
    let after = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    assert!(!after.cancel_requested);
    assert_eq!(stack.running_managed().await, 0);
}
