//! The whole state machine against the in-memory fake cloud, on a virtual
//! clock: the same steps and ports as in AWS, with faults injected.

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use flotilla_shared::fake::FakeCloud;
use flotilla_shared::ports::{Ports, Settings};
use flotilla_shared::record::{JobRecord, JobState, Phase};
use flotilla_shared::steps::{self, intake};

use crate::moto::job;

fn cloud() -> FakeCloud {
    FakeCloud::new(Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time"))
}

fn ports(cloud: &FakeCloud) -> Ports {
    cloud.ports(Settings { poll_delay_seconds: 20, expiry_grace_minutes: 30, outbox_grace_seconds: 20 })
}

/// Deliver messages in time order until none is left. `copies` delivers each
/// message that many times; a retryable error redelivers after 30 s.
async fn drain(cloud: &FakeCloud, ports: &Ports, copies: usize) -> usize {
    let mut handled = 0;
    while let Some(message) = cloud.next_message() {
        for _ in 0..copies {
            handled += 1;
            if let Err(err) = steps::handle(ports, &message).await {
                assert!(err.is_retryable(), "permanent step error: {err}");
                cloud.redeliver_later(message.clone(), 30);
            }
        }
        assert!(handled < 10_000, "runaway message loop");
    }
    handled
}

async fn run_job(cloud: &FakeCloud, spec: serde_json::Value, copies: usize) -> JobRecord {
    let ports = ports(cloud);
    let id = spec["id"].as_str().expect("id").to_string();
    intake::submit(&ports, &spec.to_string(), "m-1").await.expect("intake");
    drain(cloud, &ports, copies).await;
    cloud.record(&id).expect("record")
}

#[tokio::test]
async fn sized_fleet_runs_every_phase_on_virtual_time() {
    let cloud = cloud();
    let mut spec = job("sim-1");
    spec["fleet"] =
        serde_json::json!({"items": 202, "items_per_instance_minute": 10, "within_minutes": 10, "max_instances": 5});
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.instances.len(), 3);
    assert_eq!(record.snapshots.len(), 3);
    assert_eq!(cloud.running_instances(), 0);
    let states: Vec<JobState> = record.timeline.iter().map(|s| s.state).collect();
    use JobState::*;
    assert_eq!(states, vec![Submitted, Launching, WaitingReady, Running, Snapshotting, TearingDown, Succeeded]);
    // The fleet waited for boot and agents on the virtual clock, not by sleeping.
    let waited = record.timeline[3].at - record.timeline[2].at;
    assert!(waited >= chrono::Duration::seconds(60), "{waited}");
}

#[tokio::test]
async fn duplicated_messages_launch_once_and_send_each_phase_once() {
    let cloud = cloud();
    let record = run_job(&cloud, job("sim-dup"), 3).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let calls = cloud.lock().calls.clone();
    assert_eq!(calls.get("RunInstances"), Some(&1));
    assert_eq!(calls.get("SendCommand"), Some(&5), "mount, setup, run, before_unmount, unmount");
    assert_eq!(calls.get("CreateSnapshot"), Some(&2));
    assert_eq!(calls.get("CreateVolume"), Some(&2));
}

#[tokio::test]
async fn a_crash_between_record_write_and_send_is_repaired_by_redelivery() {
    let cloud = cloud();
    let ports = ports(&cloud);
    intake::submit(&ports, &job("sim-crash").to_string(), "m-1").await.expect("intake");
    // Every fifth send fails after its record write, many times over.
    for _ in 0..6 {
        if let Some(message) = cloud.next_message() {
            cloud.lock().fail_sends = 1;
            if steps::handle(&ports, &message).await.is_err() {
                cloud.redeliver_later(message, 30);
            }
        }
        drain_some(&cloud, &ports, 4).await;
    }
    drain(&cloud, &ports, 1).await;
    let record = cloud.record("sim-crash").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(cloud.lock().calls.get("RunInstances"), Some(&1));
}

#[tokio::test]
async fn a_launch_seen_half_way_by_tag_is_completed_through_its_client_token() {
    let cloud = cloud();
    let ports = ports(&cloud);
    intake::submit(&ports, &job("sim-half").to_string(), "m-1").await.expect("intake");
    // The first launch lands but its delivery dies before the reply; the
    // redelivery's tag lookup then sees only one of the two instances.
    cloud.lock().crash_after.push("RunInstances");
    let launch = cloud.next_message().expect("launch message");
    assert!(steps::handle(&ports, &launch).await.is_err(), "the injected crash");
    assert_eq!(cloud.lock().instances.len(), 2);
    cloud.lock().stale_tag_lookups = 1;
    cloud.redeliver_later(launch, 30);
    drain(&cloud, &ports, 1).await;
    let record = cloud.record("sim-half").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.instances.len(), 2, "the whole fleet, not the part the lookup saw");
    assert_eq!(record.snapshots.len(), 2, "one snapshot per instance's volume");
    assert_eq!(cloud.lock().instances.len(), 2, "the repeated token launched nothing new");
    assert_eq!(cloud.lock().calls.get("RunInstances"), Some(&2));
    assert_eq!(cloud.running_instances(), 0);
}

#[tokio::test]
async fn an_attach_that_lost_a_race_waits_for_the_next_poll() {
    let cloud = cloud();
    // Readiness reads its volumes as unattached after they were attached, so
    // it attaches again and EC2 answers VolumeInUse, as it does to a racing
    // duplicate delivery.
    cloud.lock().stale_volume_views = 2;
    let record = run_job(&cloud, job("sim-attach-race"), 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(cloud.lock().stale_volume_views, 0, "the stale reads happened");
    assert!(cloud.lock().calls.get("AttachVolume").copied().unwrap_or(0) >= 3, "{:?}", cloud.lock().calls);
}

async fn drain_some(cloud: &FakeCloud, ports: &Ports, count: usize) {
    for _ in 0..count {
        let Some(message) = cloud.next_message() else { return };
        if steps::handle(ports, &message).await.is_err() {
            cloud.redeliver_later(message, 30);
        }
    }
}

#[tokio::test]
async fn failing_run_fails_job_without_on_success_snapshots() {
    let cloud = cloud().with_behaviour(Arc::new(|request, _| {
        if request.comment.contains(" run ") {
            (7, "boom".to_string(), 10)
        } else {
            (0, "ok".to_string(), 2)
        }
    }));
    let record = run_job(&cloud, job("sim-fail"), 1).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.ends_with("exited 7"), "{}", record.reason);
    assert!(record.snapshots.is_empty());
    assert!(record.step(Phase::Unmount).is_some());
    assert_eq!(cloud.running_instances(), 0);
}

#[tokio::test]
async fn cancel_while_waiting_for_agents_detaches_and_terminates() {
    let cloud = cloud();
    let ports = ports(&cloud);
    intake::submit(&ports, &job("sim-cancel").to_string(), "m-1").await.expect("intake");
    drain_some(&cloud, &ports, 2).await; // launch, first readiness poll
    let outcome = intake::submit(&ports, r#"{"cancel": "sim-cancel"}"#, "m-2").await.expect("cancel");
    assert_eq!(outcome, intake::Intake::CancelRequested { job_id: "sim-cancel".into() });
    drain(&cloud, &ports, 1).await;
    let record = cloud.record("sim-cancel").expect("record");
    assert_eq!(record.state, JobState::Cancelled);
    assert!(record.steps.is_empty(), "no command ran");
    assert_eq!(cloud.running_instances(), 0);
}

#[tokio::test]
async fn retention_keeps_the_newest_snapshots_per_shard() {
    let cloud = cloud();
    for run in 0..4 {
        let mut spec = job(&format!("nightly-{run}"));
        spec["name"] = serde_json::json!("nightly");
        spec["fleet"] = serde_json::json!({"count": 1});
        let record = run_job(&cloud, spec, 1).await;
        assert_eq!(record.state, JobState::Succeeded);
    }
    // keep_last is 2: runs 0 and 1 were pruned by runs 2 and 3.
    let kept: Vec<String> = cloud.lock().snapshots.iter().map(|s| s.tags["flotilla:job-id"].clone()).collect();
    assert_eq!(kept, vec!["nightly-2".to_string(), "nightly-3".to_string()]);
}

/// A small seeded soak: many jobs, random failures and duplicates. Every job
/// must end, and nothing may be left running.
#[tokio::test]
async fn seeded_soak_of_mixed_jobs_leaves_nothing_running() {
    let mut seed: u64 = 0x5eed_f10f;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let cloud = cloud().with_behaviour(Arc::new(|request, instance| {
        let fails = request.comment.contains("soak-fail") && request.comment.contains(" run ");
        let code = if fails && instance.ends_with('1') { 2 } else { 0 };
        (code, "soak".to_string(), 5)
    }));
    let ports = ports(&cloud);
    let mut expected = Vec::new();
    for index in 0..60 {
        let kind = next() % 3;
        let id = match kind {
            0 => format!("soak-ok-{index}"),
            1 => format!("soak-fail-{index}"),
            _ => format!("soak-cancel-{index}"),
        };
        let mut spec = job(&id);
        spec["fleet"] = serde_json::json!({"count": 1 + next() % 3});
        intake::submit(&ports, &spec.to_string(), &format!("m-{index}")).await.expect("intake");
        expected.push((id, kind));
    }
    let mut handled = 0;
    while let Some(message) = cloud.next_message() {
        handled += 1;
        assert!(handled < 50_000, "runaway");
        if next() % 10 == 0 {
            cloud.lock().fail_sends = 1;
        }
        let copies = if next() % 7 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            if steps::handle(&ports, &message).await.is_err() {
                cloud.redeliver_later(message.clone(), 30);
            }
        }
        if handled % 25 == 0 {
            for (id, kind) in &expected {
                if *kind == 2 {
                    intake::submit(&ports, &format!(r#"{{"cancel": "{id}"}}"#), "c").await.expect("cancel");
                }
            }
        }
    }
    for (id, kind) in &expected {
        let record = cloud.record(id).expect("record");
        assert!(record.state.is_terminal(), "{id} stuck in {}", record.state);
        if *kind == 0 {
            assert_eq!(record.state, JobState::Succeeded, "{id}: {}", record.reason);
        }
    }
    assert_eq!(cloud.running_instances(), 0);
}

#[tokio::test]
async fn role_arn_jobs_act_through_the_assumed_role() {
    let cloud = cloud();
    let mut spec = job("sim-role");
    spec["role_arn"] = serde_json::json!("arn:aws:iam::210987654321:role/flotilla-target");
    spec["external_id"] = serde_json::json!("tenant-7");
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let assumed = cloud.lock().assumed_roles.clone();
    assert!(!assumed.is_empty());
    assert!(assumed
        .iter()
        .all(|(role, external)| role.ends_with(":role/flotilla-target") && external.as_deref() == Some("tenant-7")));
}

#[tokio::test]
async fn a_refused_role_fails_the_job_with_the_reason_and_launches_nothing() {
    let cloud = cloud();
    cloud.lock().refused_roles.push("arn:aws:iam::210987654321:role/locked".to_string());
    let mut spec = job("sim-locked");
    spec["role_arn"] = serde_json::json!("arn:aws:iam::210987654321:role/locked");
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.starts_with("launch failed: sts AssumeRole: AccessDenied"), "{}", record.reason);
    assert_eq!(cloud.lock().calls.get("RunInstances"), None);
}

#[tokio::test]
async fn a_detach_that_does_not_finish_is_forced() {
    let cloud = cloud();
    cloud.lock().stuck_detaches = true;
    let record = run_job(&cloud, job("sim-stuck"), 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(record.warnings.is_empty(), "{:?}", record.warnings);
    let state = cloud.lock();
    assert!(state.calls.get("DetachVolume(force)").is_some_and(|n| *n >= 2), "{:?}", state.calls);
    assert!(state.volumes.iter().all(|v| v.state == "deleted"), "{:?}", state.volumes);
    assert_eq!(state.snapshots.len(), 2);
}

#[tokio::test]
async fn a_volume_that_never_detaches_is_snapshotted_in_place_and_deleted_after_terminate() {
    let cloud = cloud();
    {
        let mut state = cloud.lock();
        state.stuck_detaches = true;
        state.stuck_even_forced = true;
    }
    let record = run_job(&cloud, job("sim-wedged"), 2).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.warnings.len(), 2, "{:?}", record.warnings);
    assert!(record.warnings[0].contains("did not detach"), "{}", record.warnings[0]);
    assert!(record.volumes.iter().all(|v| v.detach_abandoned && v.deleted));
    assert_eq!(cloud.running_instances(), 0);
    let state = cloud.lock();
    assert!(state.volumes.iter().all(|v| v.state == "deleted"), "{:?}", state.volumes);
    assert_eq!(state.snapshots.len(), 2, "the policy's snapshots are still taken");
    let report =
        String::from_utf8(state.objects.iter().find(|(k, _)| k.ends_with("/report.txt")).expect("report").1 .0.clone())
            .expect("utf8");
    assert!(report.contains("warning: volume vol-"), "{report}");
}
