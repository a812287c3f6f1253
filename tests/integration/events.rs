//! Every file in events/ is fed to the function that receives it in AWS,
//! through the real handlers and SDK, against moto.

use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::SqsEvent;
use flotilla_shared::handlers;
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

/// Feed an SQS file to the reconcile function, with its job id replaced.
async fn feed(ports: &Ports, name: &str, edit: impl Fn(&mut Value)) -> Value {
    let mut payload = event(name);
    let mut body: Value = serde_json::from_str(payload["Records"][0]["body"].as_str().expect("body")).expect("body");
    edit(&mut body);
    payload["Records"][0]["body"] = Value::String(body.to_string());
    let batch: SqsEvent = serde_json::from_value(payload).expect("SqsEvent");
    let response = handlers::reconcile_batch(ports, batch, chrono::Duration::seconds(20), None).await;
    assert!(response.batch_item_failures.is_empty(), "{name}: {:?}", response.batch_item_failures);
    body
}

/// Wake the job with the wake file until `done`, as its polls would.
async fn drive_until(ports: &Ports, job_id: &str, done: impl Fn(JobState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let state = ports.ledger.load(job_id).await.expect("load").expect("record").record.state;
        if done(state) {
            return;
        }
        assert!(Instant::now() < deadline, "stuck in {state}");
        feed(ports, "reconcile-wake.json", |body| {
            body["job_id"] = Value::from(job_id);
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The job spec page's full example is the demo job, so it cannot drift.
#[test]
fn job_spec_page_example_is_the_demo_job() {
    let page = std::fs::read_to_string(workspace_root().join("docs/job-spec.md")).expect("docs/job-spec.md");
    let block = page.split("```json\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a json block");
    let example: Value = serde_json::from_str(block).expect("the job spec page's example is JSON");
    assert_eq!(example, event("demo-job.json"));
}

/// The README's small job is a job intake accepts.
#[test]
fn readme_small_job_is_a_valid_spec() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let block = readme.split("```json\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a json block");
    let spec = flotilla_shared::spec::parse(block).expect("the README's job parses");
    flotilla_shared::spec::validate(&spec).expect("the README's job is valid");
}

#[test]
fn demo_job_is_valid_and_plans_three_instances() {
    let body = std::fs::read_to_string(workspace_root().join("events/demo-job.json")).expect("demo job");
    let spec = flotilla_shared::spec::parse(&body).expect("parses");
    flotilla_shared::spec::validate(&spec).expect("valid");
    let plan = flotilla_shared::plan::plan(&spec, &flotilla_shared::plan::Prices::builtin()).expect("plan");
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
    assert_eq!(submitted.state, JobState::Submitted);
    assert_eq!(submitted.shards.len(), 2);

    // The wake file reconciles the job; any number of wakes is harmless.
    drive_until(&ports, "events-submit", |s| s == JobState::Running).await;
    let running = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    let instance = running.shards[0].current().and_then(|a| a.instance_id.clone()).expect("an instance");

    // The spot warning file names an instance: routed to its job by tag and
    // recorded there (here for a real instance of the job).
    feed(&ports, "spot-interruption.json", |body| {
        body["detail"]["instance-id"] = Value::from(instance.clone());
    })
    .await;
    drive_until(&ports, "events-submit", JobState::is_terminal).await;
    let done = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    assert_eq!(done.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&done));
    let warned = &done.shards[0];
    assert!(warned.attempts.len() == 2 || warned.attempts[0].interrupted, "{:?}", warned.trail);

    // The tick file is a scheduled event; the tick wakes every job not yet
    // terminal: only the scheduled one, which nothing has run here.
    let _: aws_lambda_events::event::eventbridge::EventBridgeEvent =
        serde_json::from_value(event("tick.json")).expect("tick.json is a scheduled event");
    let ticked = handlers::tick(&ports, &event("tick.json")).await.expect("tick");
    assert_eq!(ticked["woken"], 1);
    assert_eq!(
        ports.ledger.list_active().await.expect("active"),
        vec!["flotilla-nightly-example-202611210300".to_string()]
    );

    // A dry run answers with the plan, and writes and launches nothing.
    let planned = intake(&ports, event("dry-run-job.json")).await;
    assert_eq!(planned["outcome"], "planned", "{planned}");
    assert_eq!(planned["plan"]["instance_count"], 3, "the worked example: ceil(202 / (10 x 10))");
    assert!(planned["plan"]["estimate"]["total_usd"].as_f64().is_some_and(|usd| usd > 0.0), "{planned}");
    let demo_id = planned["job_id"].as_str().expect("job id").to_string();
    assert!(ports.ledger.load(&demo_id).await.expect("load").is_none(), "no record for a dry run");
    let mut over_budget = event("dry-run-job.json");
    over_budget["dry_run"]["budget_usd"] = serde_json::json!(0.01);
    let refused = intake(&ports, over_budget).await;
    assert_eq!(refused["outcome"], "rejected");
    assert!(refused["reason"].as_str().is_some_and(|r| r.starts_with("budget_usd: the estimate is")), "{refused}");
    assert!(ports.ledger.load(&demo_id).await.expect("load").is_none(), "nor for its rejection");
    assert_eq!(stack.running_managed().await, 0);

    // Cancelling a finished job changes nothing.
    intake(&ports, event("sqs-cancel-job.json")).await;
    let after = ports.ledger.load("events-submit").await.expect("load").expect("job").record;
    assert!(!after.cancel_requested);
    assert_eq!(stack.running_managed().await, 0);
}

/// The README fits on a screen or two and maps every page of `docs/`; no
/// relative link in the README or the docs points at a missing file.
#[test]
fn readme_is_short_and_every_docs_page_is_linked() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(readme.lines().count() < 200, "README.md has {} lines", readme.lines().count());
    let mut pages: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty());
    for page in &pages {
        assert!(readme.contains(&format!("(docs/{page}")), "README.md does not link docs/{page}");
    }
    let mut files = vec![(root.clone(), readme)];
    files.extend(
        pages.iter().map(|p| (root.join("docs"), std::fs::read_to_string(root.join("docs").join(p)).expect("page"))),
    );
    for (dir, text) in files {
        for link in text.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
            let target = link.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            assert!(dir.join(target).exists(), "a link to {link} from {} points at nothing", dir.display());
        }
    }
}
