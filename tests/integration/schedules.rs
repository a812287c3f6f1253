//! Schedules on EventBridge Scheduler, in a time zone: the local stack
//! fires template.yaml's schedule at the instants Scheduler would, across
//! daylight-saving changes, with the Input Scheduler delivers; intake turns
//! each firing into one job, however often it is delivered.

use std::process::Command;

use flotilla_shared::handlers;
use flotilla_shared::intake::schedule_key;
use flotilla_shared::ports::{Objects, Records};
use flotilla_shared::settings::Settings;
use flotilla_testkit::fake::FakeCloud;
use flotilla_testkit::sim;
use serde_json::Value;

use crate::moto::{job, workspace_root};

fn local_stack(args: &[&str]) -> String {
    let python = std::env::var("FLOTILLA_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let out = Command::new(python)
        .current_dir(workspace_root())
        .arg("tools/local_stack.py")
        .args(args)
        .output()
        .expect("run tools/local_stack.py");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

/// The example nightly schedule (03:00 Berlin time) around both of 2026's
/// changes: on 29 March 03:00 still exists (02:00-03:00 is skipped) and
/// moves from 02:00 to 01:00 UTC; on 25 October it moves back.
#[test]
fn a_berlin_schedule_fires_at_three_local_across_both_changes() {
    let spring = local_stack(&["next-fires", "cron(0 3 * * ? *)", "Europe/Berlin", "2026-03-27T12:00:00Z", "4"]);
    assert_eq!(
        spring.lines().collect::<Vec<_>>(),
        ["2026-03-28T02:00:00Z", "2026-03-29T01:00:00Z", "2026-03-30T01:00:00Z", "2026-03-31T01:00:00Z"]
    );
    let autumn = local_stack(&["next-fires", "cron(0 3 * * ? *)", "Europe/Berlin", "2026-10-23T12:00:00Z", "4"]);
    assert_eq!(
        autumn.lines().collect::<Vec<_>>(),
        ["2026-10-24T01:00:00Z", "2026-10-25T02:00:00Z", "2026-10-26T02:00:00Z", "2026-10-27T02:00:00Z"]
    );
    // 02:30 does not exist on 29 March (skipped), and happens twice on 25
    // October (fired once, the first time), as Scheduler's guide says.
    let skipped = local_stack(&["next-fires", "cron(30 2 * * ? *)", "Europe/Berlin", "2026-03-28T12:00:00Z", "2"]);
    assert_eq!(skipped.lines().collect::<Vec<_>>(), ["2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]);
    let once = local_stack(&["next-fires", "cron(30 2 * * ? *)", "Europe/Berlin", "2026-10-24T12:00:00Z", "2"]);
    assert_eq!(once.lines().collect::<Vec<_>>(), ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]);
}

/// Each firing across the spring change, delivered twice (Scheduler
/// delivers at least once), makes exactly one job, named by the schedule
/// and the scheduled minute.
#[tokio::test]
async fn each_firing_is_one_job_however_often_it_is_delivered() {
    let schedule = "flotilla-nightly-example";
    let fires = local_stack(&["next-fires", "cron(0 3 * * ? *)", "Europe/Berlin", "2026-03-27T12:00:00Z", "3"]);
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(Settings { ..sim::settings() });
    let mut spec = job("ignored");
    spec["deadline_minutes"] = serde_json::json!(60);
    cloud.put(&schedule_key(schedule), spec.to_string().as_bytes(), "application/json").await.expect("spec");
    let mut ids = Vec::new();
    for at in fires.lines() {
        let payload: Value = serde_json::from_str(&local_stack(&["payload", schedule, at])).expect("payload");
        assert_eq!(payload["scheduled_time"], at, "{payload}");
        assert!(payload["schedule_arn"]
            .as_str()
            .is_some_and(|a| a.ends_with(&format!(":schedule/default/{schedule}"))));
        for _ in 0..2 {
            let event = lambda_runtime::LambdaEvent::new(payload.clone(), Default::default());
            handlers::intake_event(&ports, event).await.expect("intake");
        }
        let minute: String = at.chars().filter(char::is_ascii_digit).take(12).collect();
        ids.push(format!("{schedule}-{minute}"));
    }
    assert_eq!(
        ids,
        [
            "flotilla-nightly-example-202603280200",
            "flotilla-nightly-example-202603290100",
            "flotilla-nightly-example-202603300100"
        ]
    );
    let records: Vec<String> = cloud.lock().objects.keys().filter(|k| k.ends_with("/job.json")).cloned().collect();
    assert_eq!(records.len(), 3, "{records:?}");
    for id in &ids {
        let record = cloud.load(id).await.expect("load").expect("one job per firing").record;
        assert_eq!(record.submitted_by.as_deref(), Some(format!("schedule:{schedule}").as_str()));
    }
}

/// A firing whose Input was not filled in by Scheduler is refused with the
/// reason, and creates nothing.
#[tokio::test]
async fn an_unfilled_placeholder_is_refused_with_its_name() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(sim::settings());
    let payload =
        serde_json::json!({"schedule_arn": "<aws.scheduler.schedule-arn>", "scheduled_time": "2026-03-28T02:00:00Z"});
    let err = handlers::intake_event(&ports, lambda_runtime::LambdaEvent::new(payload, Default::default()))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("schedule_arn"), "{err}");
    assert!(!err.is_retryable());
    assert!(cloud.lock().objects.is_empty());
}

/// A rejection's notices are flushed from a stale copy after a valid
/// submission took its id: the flush must not take the now running job
/// off the tick's list (its replace conflicts; the marker is not its own).
#[tokio::test]
async fn flushing_a_replaced_rejection_leaves_the_live_jobs_marker() {
    use flotilla_shared::ports::ActiveJobs;
    let cloud = FakeCloud::new(sim::start_time());
    cloud.lock().notices = Some(Vec::new());
    let ports = cloud.ports(sim::settings());
    let mut bad = job("taken");
    bad["deadline_minutes"] = serde_json::json!(0);
    flotilla_shared::intake::submit(&ports, &bad.to_string(), "m-1", None).await.expect("rejected");
    let stale = cloud.load("taken").await.expect("load").expect("the rejection");
    assert_eq!(stale.record.state, flotilla_shared::record::JobState::Rejected);
    flotilla_shared::intake::submit(&ports, &job("taken").to_string(), "m-2", None).await.expect("accepted");
    flotilla_shared::publish::finish_terminal(&ports, stale.record, stale.version).await.expect("flush");
    assert!(cloud.list_active().await.expect("list").contains(&"taken".to_string()), "the live job stays on the list");
}
