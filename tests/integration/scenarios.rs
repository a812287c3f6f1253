//! The reconciler against the simulated cloud, on a virtual clock: one
//! scenario per bug the old step chain had, plus recovery features. Each
//! asserts what the user sees (state, reason) and what is left in the cloud.

use std::collections::BTreeMap;

use chrono::Duration;
use flotilla_shared::intake;
use flotilla_shared::ports::Ports;
use flotilla_shared::reconcile::{self, WakeMessage};
use flotilla_shared::record::{EndCause, JobRecord, JobState, Phase, Stage};
use flotilla_testkit::fake::{FakeCloud, Faults, Latencies};
use flotilla_testkit::sim;
use serde_json::json;

use crate::fingerprint::{job_figures, Fingerprint};
use crate::moto::job;
use flotilla_shared::wake::Trigger;

pub(crate) fn cloud() -> FakeCloud {
    FakeCloud::new(sim::start_time())
}

fn ports(cloud: &FakeCloud) -> Ports {
    cloud.ports(sim::settings())
}

const BUDGET_SECONDS: i64 = 50;

/// One delivery of a message; with `copies` 2, two deliveries interleaved
/// at every await point the simulated cloud yields at.
/// A pass whose process died (`FakeCloud::process`) counts as failed.
async fn deliver(cloud: &FakeCloud, ports: &Ports, message: &WakeMessage, copies: usize) -> usize {
    let budget = Duration::seconds(BUDGET_SECONDS);
    let pass = || cloud.process(reconcile::reconcile(ports, message, budget));
    let results = if copies == 2 {
        let (a, b) = tokio::join!(pass(), pass());
        vec![a, b]
    } else {
        vec![pass().await]
    };
    results.iter().filter(|r| r.as_ref().is_none_or(|r| r.is_err())).count()
}

/// Deliver messages in time order until `stop` holds or none is left; a
/// failed delivery comes back after the visibility timeout.
async fn drive(cloud: &FakeCloud, ports: &Ports, copies: usize, stop: impl Fn(&JobRecord) -> bool, job_id: &str) {
    let mut handled = 0;
    while let Some(message) = cloud.next_message() {
        handled += 1;
        assert!(handled < 20_000, "runaway message loop");
        if deliver(cloud, ports, &message, copies).await > 0 {
            cloud.redeliver_later(message, 150);
        }
        if cloud.record(job_id).is_some_and(|r| stop(&r)) {
            return;
        }
    }
}

pub(crate) async fn run_job(cloud: &FakeCloud, spec: serde_json::Value, copies: usize) -> JobRecord {
    let ports = ports(cloud);
    let id = spec["id"].as_str().expect("id").to_string();
    let submitted = cloud.process(intake::submit(&ports, &spec.to_string(), "m-1", None)).await;
    submitted.expect("intake's process lived").expect("intake");
    drive(cloud, &ports, copies, |r| r.state.is_terminal(), &id).await;
    cloud.record(&id).expect("record")
}

fn phases(record: &JobRecord, shard: usize) -> Vec<Phase> {
    record.shards[shard].current().map(|a| a.phases_ran()).unwrap_or_default()
}

fn left_volumes(cloud: &FakeCloud) -> Vec<String> {
    cloud.lock().volumes.iter().filter(|v| v.state != "deleted").map(|v| v.id.clone()).collect()
}

#[tokio::test]
async fn sized_fleet_runs_every_phase_per_shard_on_virtual_time() {
    let cloud = cloud();
    let mut spec = job("sim-1");
    spec["fleet"] = json!({"items": 202, "items_per_instance_minute": 10, "within_minutes": 10, "max_instances": 5});
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.shards.len(), 3);
    for shard in 0..3 {
        assert_eq!(
            phases(&record, shard),
            vec![Phase::Mount, Phase::Setup, Phase::Run, Phase::BeforeUnmount, Phase::Unmount]
        );
    }
    assert_eq!(record.snapshots().len(), 3);
    assert_eq!(cloud.running_instances(), 0);
    assert!(left_volumes(&cloud).is_empty());
    // The fleet waited for boot and agents on the virtual clock, not by sleeping.
    let running = record.timeline.iter().find(|s| s.state == JobState::Running).expect("ran");
    assert!(running.at - record.submitted_at >= Duration::seconds(60));
    // One RunInstances for the fleet, one SendCommand per phase.
    let calls = cloud.lock().calls.clone();
    assert_eq!(calls.get("RunInstances"), Some(&1));
    assert_eq!(calls.get("SendCommand"), Some(&5));
}

/// Bug 7 and test gap 8: two deliveries run interleaved at every await point.
/// Exactly one fleet, one volume and one snapshot per slot, and no shard's
/// command is ever sent twice.
#[tokio::test]
async fn interleaved_duplicate_deliveries_launch_once_and_send_each_phase_once() {
    let cloud =
        FakeCloud::seeded(sim::start_time(), 7, Latencies::quick(), Faults { yield_rate: 0.5, ..Default::default() });
    let record = run_job(&cloud, job("sim-dup"), 2).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let calls = cloud.lock().calls.clone();
    assert_eq!(calls.get("RunInstances"), Some(&1));
    assert_eq!(calls.get("SendCommand"), Some(&5), "mount, setup, run, before_unmount, unmount");
    assert_eq!(calls.get("CreateSnapshot"), Some(&2));
    assert_eq!(calls.get("CreateVolume"), Some(&2));
}

/// A crash after each kind of call, one at a time: the next pass finishes
/// what the crashed one started, without repeating it.
/// A crash kills the process at the call that drew it (`FakeCloud::process`):
/// the call's effect stays, and nothing after it runs, not even code that
/// would carry on after an error and call again.
#[tokio::test]
async fn a_crashed_process_makes_no_further_call() {
    use flotilla_shared::ports::Fleet;
    let cloud = cloud();
    cloud.lock().crash_after.push("TerminateInstances");
    let ids = vec!["i-00000000000000001".to_string()];
    let outcome = cloud
        .process(async {
            let first = cloud.terminate(&ids).await;
            let _ = cloud.terminate(&ids).await; // never returns
            first
        })
        .await;
    assert!(outcome.is_none(), "the process died");
    assert_eq!(cloud.lock().calls.get("TerminateInstances"), Some(&1), "the second call was never made");
    // Without a crash the same process ends, and its calls are counted.
    let outcome = cloud.process(async { cloud.terminate(&ids).await }).await;
    assert!(outcome.is_some());
    assert_eq!(cloud.lock().calls.get("TerminateInstances"), Some(&2));
}

#[tokio::test]
async fn a_crash_after_any_call_is_finished_without_repeating_it() {
    for operation in [
        "RunInstances",
        "CreateVolume",
        "AttachVolume",
        "SendCommand",
        "CreateSnapshot",
        "DeleteVolume",
        "TerminateInstances",
        "PutObject",
    ] {
        let cloud = cloud();
        cloud.lock().crash_after.push(operation);
        let record = run_job(&cloud, job(&format!("crash-{}", operation.to_lowercase())), 1).await;
        assert_eq!(record.state, JobState::Succeeded, "{operation}: {}", record.reason);
        let calls = cloud.lock().calls.clone();
        assert_eq!(cloud.lock().instances.len(), 2, "{operation}: one fleet");
        assert_eq!(calls.get("CreateSnapshot"), Some(&2), "{operation}: one snapshot per volume");
        let mut sends: BTreeMap<(String, String), u32> = BTreeMap::new();
        for command in &cloud.lock().commands {
            let phase = command.request.comment.split_whitespace().nth(2).unwrap_or_default().to_string();
            for instance in &command.request.instance_ids {
                *sends.entry((instance.clone(), phase.clone())).or_default() += 1;
            }
        }
        assert_eq!(sends.len(), 10, "{operation}: five phases on two instances");
        assert!(sends.values().all(|n| *n == 1), "{operation}: each phase sent once per shard: {sends:?}");
        assert!(left_volumes(&cloud).is_empty(), "{operation}");
        assert_eq!(cloud.running_instances(), 0, "{operation}");
    }
}

/// Bug 1: a cancel while snapshots are being taken keeps them; volumes go
/// only after their snapshot is completed (bug 4).
#[tokio::test]
async fn cancel_during_snapshotting_keeps_the_snapshots() {
    let mut latencies = Latencies::quick();
    latencies.snapshot = (300, 300);
    let cloud = FakeCloud::seeded(sim::start_time(), 3, latencies, Faults::default());
    let ports = ports(&cloud);
    intake::submit(&ports, &job("snap-cancel").to_string(), "m-1", None).await.expect("intake");
    drive(&cloud, &ports, 1, |r| r.snapshots().len() == 2, "snap-cancel").await;
    intake::submit(&ports, r#"{"cancel": "snap-cancel"}"#, "m-2", None).await.expect("cancel");
    // Deleting before the snapshot completes is what AWS allows and what loses data.
    assert!(cloud.lock().evidence.deleted_volumes.is_empty());
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "snap-cancel").await;
    let record = cloud.record("snap-cancel").expect("record");
    assert_eq!(record.state, JobState::Cancelled, "{}", record.reason);
    let state = cloud.lock();
    assert_eq!(state.snapshots.len(), 2, "the job's only snapshots survive the cancel");
    for (volume, _, completed) in &state.evidence.deleted_volumes {
        assert!(!completed.is_empty(), "{volume} deleted before its snapshot completed");
    }
}

/// Bug 2: a cancel while volumes are being created (one create's reply lost)
/// leaks nothing: the volume is found by its token tag and deleted.
#[tokio::test]
async fn cancel_while_volumes_are_created_leaks_nothing() {
    let mut latencies = Latencies::quick();
    latencies.volume_create = (20, 20);
    let cloud = FakeCloud::seeded(sim::start_time(), 5, latencies, Faults::default());
    cloud.lock().crash_after.push("CreateVolume");
    let ports = ports(&cloud);
    intake::submit(&ports, &job("vol-cancel").to_string(), "m-1", None).await.expect("intake");
    // Stop once a volume's intent is recorded; its create crashed before the reply.
    drive(&cloud, &ports, 1, |r| r.attempts().any(|a| !a.volumes.is_empty()), "vol-cancel").await;
    assert!(!left_volumes(&cloud).is_empty(), "a volume exists that the record has no id for");
    intake::submit(&ports, r#"{"cancel": "vol-cancel"}"#, "m-2", None).await.expect("cancel");
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "vol-cancel").await;
    let record = cloud.record("vol-cancel").expect("record");
    assert_eq!(record.state, JobState::Cancelled, "{}", record.reason);
    assert!(left_volumes(&cloud).is_empty(), "{:?}", left_volumes(&cloud));
    assert_eq!(cloud.running_instances(), 0);
}

/// Bug 3 and 10: an instance stopped mid-run (a user's `aws ec2
/// stop-instances`, or a `poweroff`) is terminated and its shard re-run on a
/// replacement; the job succeeds and nothing stays stopped.
#[tokio::test]
async fn a_stopped_instance_is_terminated_and_its_shard_replaced() {
    let mut latencies = Latencies::quick();
    latencies.shutting_down = (10, 10);
    let cloud = FakeCloud::seeded(sim::start_time(), 9, latencies, Faults::default()).with_behaviour(
        std::sync::Arc::new(|request, _| {
            let seconds = if request.comment.contains(" run ") { 600 } else { 5 };
            (0, "ok".into(), seconds)
        }),
    );
    let ports = ports(&cloud);
    let mut spec = job("stopped-1");
    spec["run"]["timeout_seconds"] = json!(3600);
    spec["deadline_minutes"] = json!(120);
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    let running = |r: &JobRecord| r.shards.iter().all(|s| s.current().is_some_and(|a| a.phase(Phase::Run).is_some()));
    drive(&cloud, &ports, 1, running, "stopped-1").await;
    let record = cloud.record("stopped-1").expect("record");
    let victim = record.shards[1].current().and_then(|a| a.instance_id.clone()).expect("instance");
    let other = record.shards[0].current().and_then(|a| a.instance_id.clone()).expect("instance");
    cloud.set_instance_state(&victim, "stopped");
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "stopped-1").await;

    let record = cloud.record("stopped-1").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    let shard = &record.shards[1];
    assert_eq!(shard.attempts.len(), 2, "replaced once");
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));
    assert!(shard.trail.iter().any(|n| n.text.contains("became stopped")), "{:?}", shard.trail);
    // The other shard's work was not repeated.
    assert_eq!(record.shards[0].attempts.len(), 1);
    let runs_on_other = cloud
        .lock()
        .commands
        .iter()
        .filter(|c| c.request.comment.contains(" run ") && c.request.instance_ids.contains(&other))
        .count();
    assert_eq!(runs_on_other, 1, "shard 0's run was sent once");
    let state = cloud.lock();
    let stopped = state.instances.iter().find(|i| i.id == victim).expect("victim");
    assert_eq!(stopped.state, "terminated", "a stopped instance is terminated, not left stopped");
    drop(state);
    assert!(left_volumes(&cloud).is_empty());
}

/// Starts a two-shard job whose run takes 10 minutes and returns it once
/// both shards are running their work, with the instance of shard 1.
async fn start_long_job(cloud: &FakeCloud, ports: &Ports, spec: serde_json::Value) -> (String, String) {
    let id = spec["id"].as_str().expect("id").to_string();
    intake::submit(ports, &spec.to_string(), "m-1", None).await.expect("intake");
    let running = |r: &JobRecord| r.shards.iter().all(|s| s.current().is_some_and(|a| a.phase(Phase::Run).is_some()));
    drive(cloud, ports, 1, running, &id).await;
    let record = cloud.record(&id).expect("record");
    let victim = record.shards[1].current().and_then(|a| a.instance_id.clone()).expect("instance");
    (id, victim)
}

fn long_cloud(seed: u64) -> FakeCloud {
    let mut latencies = Latencies::quick();
    latencies.shutting_down = (10, 10);
    FakeCloud::seeded(sim::start_time(), seed, latencies, Faults::default()).with_behaviour(std::sync::Arc::new(
        |request, _| {
            let seconds = if request.comment.contains(" run ") { 600 } else { 5 };
            (0, "ok".into(), seconds)
        },
    ))
}

fn long_job(id: &str) -> serde_json::Value {
    let mut spec = job(id);
    spec["run"]["timeout_seconds"] = json!(3600);
    spec["deadline_minutes"] = json!(180);
    spec
}

/// Asserts shard 1 was replaced once for `why`, shard 0 ran once, and nothing is left.
fn assert_replaced(cloud: &FakeCloud, record: &JobRecord, victim: &str, why: &str) {
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(record));
    let shard = &record.shards[1];
    assert_eq!(shard.attempts.len(), 2, "replaced once");
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost));
    assert!(!shard.attempts[0].completed_phases.contains(&Phase::Run), "the lost run never counts as done");
    assert!(shard.trail.iter().any(|n| n.text.contains(why)), "{:?}", shard.trail);
    assert_eq!(record.shards[0].attempts.len(), 1, "the healthy shard was not touched");
    let state = cloud.lock();
    let lost = state.instances.iter().find(|i| i.id == victim).expect("victim");
    assert_eq!(lost.state, "terminated", "the unhealthy instance is terminated");
    drop(state);
    assert_eq!(cloud.running_instances(), 0);
    assert!(left_volumes(cloud).is_empty());
}

/// An instance whose status checks stay impaired (still `running` to
/// DescribeInstances) is terminated and its shard re-run on a replacement.
#[tokio::test]
async fn an_impaired_instance_is_replaced_and_its_shard_rerun() {
    let cloud = long_cloud(11);
    let ports = ports(&cloud);
    let (id, victim) = start_long_job(&cloud, &ports, long_job("impaired-1")).await;
    cloud.impair(&victim);
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), &id).await;
    let record = cloud.record(&id).expect("record");
    assert_replaced(&cloud, &record, &victim, "impaired");
}

/// An agent that stops reporting while its instance works: SSM would keep
/// the invocation InProgress until it times out; the shard is moved to a
/// replacement after `agent_timeout_seconds` instead.
#[tokio::test]
async fn an_agent_that_goes_silent_mid_run_is_replaced() {
    let cloud = long_cloud(12);
    let ports = ports(&cloud);
    let (id, victim) = start_long_job(&cloud, &ports, long_job("silent-1")).await;
    cloud.lose_agent(&victim);
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), &id).await;
    let record = cloud.record(&id).expect("record");
    assert_replaced(&cloud, &record, &victim, "stopped reporting");
}

/// `on_retry: restore`: the replacement's volume is created from the
/// snapshot of the lost attempt's volume; without it, a fresh one.
#[tokio::test]
async fn a_retried_shard_restores_its_volume_from_the_lost_attempts_snapshot() {
    for restore in [true, false] {
        let cloud = long_cloud(13);
        let ports = ports(&cloud);
        let mut spec = long_job(&format!("restore-{restore}"));
        if restore {
            spec["volumes"][0]["on_retry"] = json!("restore");
            spec["volumes"][0]["snapshot"] = json!("always");
        }
        let (id, victim) = start_long_job(&cloud, &ports, spec).await;
        cloud.set_instance_state(&victim, "terminated");
        drive(&cloud, &ports, 1, |r| r.state.is_terminal(), &id).await;
        let record = cloud.record(&id).expect("record");
        assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
        let shard = &record.shards[1];
        assert_eq!(shard.attempts.len(), 2);
        let lost = &shard.attempts[0].volumes[0];
        let replacement = shard.attempts[1].volumes[0].volume_id.clone().expect("volume");
        let source = cloud.lock().volumes.iter().find(|v| v.id == replacement).and_then(|v| v.snapshot_id.clone());
        if restore {
            let checkpoint = lost.snapshot.as_ref().and_then(|s| s.snapshot_id.clone());
            assert!(checkpoint.is_some(), "the lost attempt's volume was snapshotted");
            assert_eq!(source, checkpoint, "the replacement resumes from it");
            assert!(shard.trail.iter().any(|n| n.text.contains("restored from")), "{:?}", shard.trail);
        } else {
            assert_eq!(source, None, "a fresh volume");
            assert!(lost.snapshot.is_none(), "on-success takes no snapshot of a failed attempt");
        }
        assert!(left_volumes(&cloud).is_empty());
    }
}

/// An unhealthy instance that cannot be terminated (IAM refuses) may still
/// be running the shard's work: the shard is failed, never retried beside it.
#[tokio::test]
async fn an_instance_that_cannot_be_terminated_is_never_retried_beside_itself() {
    let cloud = long_cloud(15);
    let ports = ports(&cloud);
    let (id, victim) = start_long_job(&cloud, &ports, long_job("stuck-1")).await;
    cloud.lock().refused.insert("TerminateInstances", "UnauthorizedOperation");
    cloud.lose_agent(&victim);
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), &id).await;
    let record = cloud.record(&id).expect("record");
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    assert_eq!(record.shards[1].attempts.len(), 1, "{:?}", record.shards[1].trail);
    assert!(record.reason.contains("could not be terminated"), "{}", record.reason);
    assert_eq!(cloud.lock().instances.len(), 2, "no replacement was launched");
}

/// A job still running may restore from its snapshots: another run of the
/// same name that succeeds meanwhile must not prune them by retention.
#[tokio::test]
async fn retention_never_prunes_the_snapshots_of_a_running_job() {
    let mut latencies = Latencies::quick();
    latencies.shutting_down = (10, 10);
    let cloud = FakeCloud::seeded(sim::start_time(), 16, latencies, Faults::default()).with_behaviour(
        std::sync::Arc::new(|request, _| {
            let long = request.comment.starts_with("flotilla resumed ") && request.comment.contains(" run ");
            (0, "ok".into(), if long { 3000 } else { 5 })
        }),
    );
    let ports = ports(&cloud);
    let mut spec = long_job("resumed");
    spec["name"] = json!("nightly");
    spec["volumes"][0]["on_retry"] = json!("restore");
    spec["volumes"][0]["snapshot"] = json!("always");
    let (id, victim) = start_long_job(&cloud, &ports, spec).await;
    cloud.set_instance_state(&victim, "terminated");
    let retried = |r: &JobRecord| r.shards[1].attempts.len() == 2;
    drive(&cloud, &ports, 1, retried, &id).await;
    let checkpoint = cloud.record(&id).expect("record").shards[1].attempts[0].volumes[0]
        .snapshot
        .as_ref()
        .and_then(|s| s.snapshot_id.clone())
        .expect("the lost attempt's snapshot");

    // Meanwhile a newer run of the same name succeeds, keeping only 1.
    let mut other = job("nightly-other");
    other["name"] = json!("nightly");
    other["volumes"][0]["retention"] = json!({"keep_last": 1});
    intake::submit(&ports, &other.to_string(), "m-2", None).await.expect("intake");
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "nightly-other").await;
    assert_eq!(cloud.record("nightly-other").expect("record").state, JobState::Succeeded);
    assert!(cloud.lock().snapshots.iter().any(|s| s.id == checkpoint), "pruned while its job still needed it");

    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), &id).await;
    let record = cloud.record(&id).expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
}

/// An outage that outlasts the SDK's retries never fails the job: the
/// record and report say what it waits for, and it carries on after.
#[tokio::test]
async fn an_outage_is_shown_on_the_job_and_outlived() {
    let cloud = cloud();
    let ports = ports(&cloud);
    intake::submit(&ports, &job("outage-1").to_string(), "m-1", None).await.expect("intake");
    drive(&cloud, &ports, 1, |r| r.instance_ids().len() == 2, "outage-1").await;
    cloud.lock().refused.insert("DescribeInstances", "ServiceUnavailable");
    drive(&cloud, &ports, 1, |r| r.stalled.is_some(), "outage-1").await;
    let record = cloud.record("outage-1").expect("record");
    let report = flotilla_shared::report::render(&record);
    assert!(report.contains("retrying after: observing:") && report.contains("ServiceUnavailable"), "{report}");
    assert!(!record.state.is_terminal());
    cloud.lock().refused.clear();
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "outage-1").await;
    let record = cloud.record("outage-1").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert_eq!(record.stalled, None);
}

/// EC2 fills part of each RunInstances (MinCount 1): the rest launch on
/// later passes, and no slot ever gets two instances.
#[tokio::test]
async fn a_partly_filled_launch_completes_the_fleet_later() {
    let cloud = FakeCloud::seeded(
        sim::start_time(),
        14,
        Latencies::quick(),
        Faults { partial_fill: 1.0, ..Default::default() },
    );
    let mut spec = job("partial-1");
    spec["fleet"] = json!({"count": 6});
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let launches = cloud.lock().calls.get("RunInstances").copied().unwrap_or(0);
    assert!(launches >= 2, "the first call filled only part: {launches}");
    assert_eq!(cloud.lock().instances.len(), 6, "one instance per slot");
    assert!(record.shards.iter().all(|s| s.attempts.len() == 1));
}

/// Bug 4: a snapshot that ends in `error` is retried; after three the volume
/// is kept (never deleted without a snapshot) and the report says why.
#[tokio::test]
async fn a_snapshot_in_error_is_retried_and_the_volume_kept_after_three() {
    let mut latencies = Latencies::quick();
    latencies.snapshot = (60, 60);
    let faults = Faults { snapshot_error: 1.0, ..Default::default() };
    let cloud = FakeCloud::seeded(sim::start_time(), 11, latencies, faults);
    let mut spec = job("snap-error");
    spec["fleet"] = json!({"count": 1});
    let record = run_job(&cloud, spec, 1).await;
    assert!(record.state.is_terminal());
    let volume = &record.shards[0].attempts[0].volumes[0];
    assert_eq!(volume.snapshot_failures, 3);
    assert!(volume.kept.as_deref().is_some_and(|k| k.contains("ended in error")), "{volume:?}");
    assert_eq!(left_volumes(&cloud).len(), 1, "kept, not deleted");
    assert!(cloud.lock().evidence.deleted_volumes.is_empty());
    assert!(flotilla_shared::report::render(&record).contains("kept: 3 snapshots of it ended in error"));
    assert_eq!(cloud.running_instances(), 0);
}

/// Bug 5: a permanent error while releasing (DeleteVolume refused) ends the
/// job with a warning instead of looping, and the fleet is still terminated.
#[tokio::test]
async fn a_permanent_error_in_cleanup_ends_the_job_and_tears_down() {
    let cloud = cloud();
    cloud.lock().refused.insert("DeleteVolume", "UnauthorizedOperation");
    let record = run_job(&cloud, job("cleanup-refused"), 1).await;
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    assert!(record.reason.contains("cleanup did not finish"), "{}", record.reason);
    assert!(record.warnings.iter().any(|w| w.contains("UnauthorizedOperation")), "{:?}", record.warnings);
    assert_eq!(cloud.running_instances(), 0);
    // Snapshots were taken before the refused deletes: no data lost.
    assert_eq!(cloud.lock().snapshots.len(), 2);
    assert!(cloud.lock().calls.get("DeleteVolume").copied().unwrap_or(0) <= 4, "no loop");
}

/// Bug 6: a volume from a snapshot that does not exist fails the job with
/// the reason, and tears down the fleet at once (not at the DLQ, not at the
/// deadline).
#[tokio::test]
async fn a_missing_snapshot_fails_the_job_and_tears_down() {
    let cloud = cloud();
    let ports = ports(&cloud);
    // Opted in when intake looks, deleted before the volumes are created.
    let at = sim::start_time();
    cloud.lock().snapshots.push(flotilla_testkit::fake::FakeSnapshot {
        id: "snap-0123456789abcdef0".into(),
        volume_id: "vol-00000000".into(),
        started_at: at,
        completes_at: at,
        fails: false,
        tags: BTreeMap::from([(flotilla_shared::tags::ALLOW.to_string(), ports.settings.stack.clone())]),
        listed_at: at,
    });
    let mut spec = job("bad-snapshot");
    spec["volumes"][0]["source"] = json!({"snapshot_id": "snap-0123456789abcdef0"});
    let outcome = intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    assert!(matches!(outcome, intake::Intake::Accepted { .. }), "{outcome:?}");
    cloud.lock().snapshots.clear();
    cloud.lock().missing_snapshots.insert("snap-0123456789abcdef0".into());
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "bad-snapshot").await;
    let record = cloud.record("bad-snapshot").expect("record");
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.contains("InvalidSnapshot.NotFound"), "{}", record.reason);
    assert!(record.timeline.last().expect("end").at - record.submitted_at < Duration::minutes(10));
    assert_eq!(cloud.running_instances(), 0);
}

/// Bug 6: capacity errors fail over to the next instance type, in the
/// user's order, and the trail records each decision.
#[tokio::test]
async fn capacity_refused_for_the_first_type_runs_on_the_second() {
    let faults = Faults { no_capacity: ["t3.micro".to_string()].into(), ..Default::default() };
    let cloud = FakeCloud::seeded(sim::start_time(), 13, Latencies::quick(), faults);
    let mut spec = job("capacity-1");
    spec["instance_types"] = json!(["t3.micro", "t3.small"]);
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    for shard in &record.shards {
        assert_eq!(shard.attempts.len(), 1, "failover moves the attempt; it is not a retry");
        assert_eq!(shard.current().map(|a| record.launch_of(a).instance_type), Some("t3.small".to_string()));
        assert!(shard.trail.iter().any(|n| n.text.contains("failing over to t3.small")), "{:?}", shard.trail);
    }
    assert!(cloud.lock().instances.iter().all(|i| i.instance_type == "t3.small"));
}

/// Spot capacity gone: the slot falls back to on-demand when the spec allows.
#[tokio::test]
async fn no_spot_capacity_falls_back_to_on_demand() {
    let faults = Faults { no_spot_capacity: true, ..Default::default() };
    let cloud = FakeCloud::seeded(sim::start_time(), 17, Latencies::quick(), faults);
    let mut spec = job("spot-1");
    spec["market"] = json!("spot");
    spec["on_demand_fallback"] = json!(true);
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(cloud.lock().instances.iter().all(|i| i.market == flotilla_shared::spec::Market::OnDemand));
}

/// A spot interruption warning mid-run: the shard runs its cleanup phases,
/// snapshots per policy, and is replaced on on-demand; the job succeeds.
#[tokio::test]
async fn a_spot_interruption_moves_the_shard_to_on_demand() {
    let cloud = cloud().with_behaviour(std::sync::Arc::new(|request, _| {
        (0, "ok".into(), if request.comment.contains(" run ") { 600 } else { 5 })
    }));
    let ports = ports(&cloud);
    let mut spec = job("spot-2");
    spec["market"] = json!("spot");
    spec["on_demand_fallback"] = json!(true);
    spec["volumes"][0]["snapshot"] = json!("always");
    spec["run"]["timeout_seconds"] = json!(3600);
    spec["deadline_minutes"] = json!(120);
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    let running = |r: &JobRecord| r.shards.iter().all(|s| s.current().is_some_and(|a| a.phase(Phase::Run).is_some()));
    drive(&cloud, &ports, 1, running, "spot-2").await;
    let victim =
        cloud.record("spot-2").expect("r").shards[0].current().and_then(|a| a.instance_id.clone()).expect("id");
    let noted = victim.clone();
    reconcile::update_inbox(
        &ports,
        "spot-2",
        move |r| {
            r.interruptions.push(noted.clone());
            true
        },
        Trigger::Event,
    )
    .await
    .expect("warning");
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "spot-2").await;
    let record = cloud.record("spot-2").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    let shard = &record.shards[0];
    assert_eq!(shard.attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::SpotInterruption));
    let cleanup: Vec<Phase> = shard.attempts[0].phases_ran();
    assert!(cleanup.contains(&Phase::Unmount), "cleanup ran before the instance went: {cleanup:?}");
    assert!(shard.attempts[0].volumes[0].snapshot.as_ref().is_some_and(|s| s.state.as_str() == "completed"));
    assert_eq!(record.launch_of(&shard.attempts[1]).market, flotilla_shared::spec::Market::OnDemand);
    assert_eq!(record.shards[1].attempts.len(), 1, "only the interrupted shard moved");
}

/// AWS Batch's evaluateOnExit: exit 137 retries, anything else exits.
#[tokio::test]
async fn retry_strategy_retries_only_the_matching_exit() {
    let cloud = cloud().with_behaviour(std::sync::Arc::new({
        let tries = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
        move |request, instance| {
            if !request.comment.contains(" run ") {
                return (0, String::new(), 5);
            }
            // Shard 1's first run is OOM-killed (137); the retry succeeds.
            let mut tries = tries.lock().expect("tries");
            let count = tries.entry(instance.to_string()).or_default();
            *count += 1;
            let shard1 = request.lines.iter().any(|l| l.contains(instance) && l.contains("SHARD_INDEX=1"));
            (if shard1 && *count == 1 && instance.ends_with('2') { 137 } else { 0 }, "ok".into(), 5)
        }
    }));
    let mut spec = job("retry-1");
    spec["retry"] = json!({"attempts": 2, "evaluate_on_exit": [{"on_exit_code": "137", "action": "RETRY"}]});
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", flotilla_shared::report::render(&record));
    assert_eq!(record.shards[1].attempts.len(), 2);
    assert_eq!(record.shards[1].attempts[0].end.as_ref().and_then(|e| e.exit_code), Some(137));
    assert_eq!(record.shards[0].attempts.len(), 1, "only the failed shard retried");

    // Without a matching rule a failed command exits: the job fails.
    let cloud = self::cloud().with_behaviour(std::sync::Arc::new(|request, _| {
        (if request.comment.contains(" run ") { 3 } else { 0 }, String::new(), 5)
    }));
    let record = run_job(&cloud, job("retry-2"), 1).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.contains("run exited 3"), "{}", record.reason);
    assert!(record.shards.iter().all(|s| s.attempts.len() == 1));
    // Cleanup still ran, and on-success snapshots were not taken.
    assert!(phases(&record, 0).contains(&Phase::Unmount));
    assert!(cloud.lock().snapshots.is_empty());
}

/// AWS Batch's attempt timeout: a run that outlasts it is cancelled, cleanup
/// runs, and with the default strategy the shard exits.
#[tokio::test]
async fn an_attempt_past_its_timeout_is_stopped_and_cleaned_up() {
    let cloud = cloud().with_behaviour(std::sync::Arc::new(|request, _| {
        (0, "ok".into(), if request.comment.contains(" run ") { 3000 } else { 5 })
    }));
    let mut spec = job("attempt-timeout");
    spec["fleet"] = json!({"count": 1});
    spec["run"]["timeout_seconds"] = json!(3600);
    spec["deadline_minutes"] = json!(120);
    spec["retry"] = json!({"attempt_timeout_seconds": 600});
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.contains("attempt exceeded attempt_timeout_seconds 600"), "{}", record.reason);
    let attempt = &record.shards[0].attempts[0];
    assert_eq!(attempt.end.as_ref().map(|e| e.cause), Some(EndCause::TimedOut));
    assert!(attempt.completed_phases.contains(&Phase::Unmount), "cleanup ran: {:?}", attempt.phases_ran());
    assert!(record.timeline.last().expect("end").at - record.submitted_at < Duration::minutes(20));
    assert_eq!(cloud.running_instances(), 0);
}

/// A role that is refused fails the job with the reason and launches nothing.
#[tokio::test]
async fn a_refused_role_fails_the_job_with_the_reason_and_launches_nothing() {
    let cloud = cloud();
    cloud.lock().refused_roles.push("arn:aws:iam::210987654321:role/locked".to_string());
    let mut spec = job("sim-locked");
    spec["role_arn"] = json!("arn:aws:iam::210987654321:role/locked");
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Failed);
    assert!(record.reason.contains("AccessDenied"), "{}", record.reason);
    assert_eq!(cloud.lock().calls.get("RunInstances"), None);
}

#[tokio::test]
async fn retention_keeps_the_newest_snapshots_per_shard() {
    let cloud = cloud();
    for run in 0..4 {
        let mut spec = job(&format!("nightly-{run}"));
        spec["name"] = json!("nightly");
        spec["fleet"] = json!({"count": 1});
        let record = run_job(&cloud, spec, 1).await;
        assert_eq!(record.state, JobState::Succeeded);
    }
    // keep_last is 2: runs 0 and 1 were pruned by runs 2 and 3.
    let kept: Vec<String> = cloud.lock().snapshots.iter().map(|s| s.tags["flotilla:job-id"].clone()).collect();
    assert_eq!(kept, vec!["nightly-2".to_string(), "nightly-3".to_string()]);
}

/// A lost wake (every message dead-lettered) only delays the job: the safety
/// tick wakes it.
#[tokio::test]
async fn the_safety_tick_carries_a_job_whose_messages_died() {
    let cloud = cloud();
    let ports = ports(&cloud);
    let mut spec = job("orphaned");
    spec["deadline_minutes"] = json!(600);
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    cloud.lock().queue.clear(); // every wake lost
    for _ in 0..200 {
        flotilla_shared::handlers::wake_active(&ports).await.expect("tick");
        while let Some(message) = cloud.next_message() {
            // Only the tick's wakes are delivered; polls are dropped too.
            if message.trigger == Some(Trigger::Tick) {
                let _ = deliver(&cloud, &ports, &message, 1).await;
            }
        }
        let now = cloud.now();
        cloud.advance_to(now + Duration::seconds(300));
        if cloud.record("orphaned").is_some_and(|r| r.state.is_terminal()) {
            break;
        }
    }
    let record = cloud.record("orphaned").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(ports.ledger.list_active().await.expect("list").is_empty());
}

/// The record of a 1,000-instance job stays well under 1 MB, and the job
/// launches in one RunInstances call and commands in batches of 50.
#[tokio::test]
async fn a_thousand_instance_job_keeps_a_small_record() {
    let cloud = cloud();
    let mut spec = job("big-1");
    spec["fleet"] = json!({"count": 1000});
    let record = run_job(&cloud, spec, 1).await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let bytes = cloud.lock().max_record_bytes;
    assert!(
        bytes < 800_000,
        "record is {bytes} bytes; a shard: {}",
        serde_json::to_string(&record.shards[0]).expect("json")
    );
    let calls = cloud.lock().calls.clone();
    assert_eq!(calls.get("RunInstances"), Some(&1));
    assert_eq!(calls.get("SendCommand"), Some(&(5 * 20)), "five phases, 20 batches of 50");
    assert!(record.shards.iter().all(|s| s.current().is_some_and(|a| a.stage == Stage::Done)));
    println!(
        "1,000-instance record: at most {bytes} bytes, {} at the end; calls: {calls:?}",
        cloud.record_bytes("big-1")
    );
}

/// The seeded simulation. `make test` runs 120 jobs; `make chaos` runs
/// 2,000 plus five of 1,000 instances (FLOTILLA_SIM_JOBS, FLOTILLA_SIM_BIG)
/// and prints the figures; FLOTILLA_SIM_SEED replays one seed with its report.
#[tokio::test]
async fn seeded_simulation_holds_every_invariant() {
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    if let Ok(seed) = std::env::var("FLOTILLA_SIM_SEED") {
        let seed: u64 = seed.parse().expect("FLOTILLA_SIM_SEED is a number");
        let size = std::env::var("FLOTILLA_SIM_SIZE").ok().and_then(|s| s.parse().ok());
        let scenario = sim::scenario(seed, size);
        let result = sim::run(&scenario).await;
        println!("{scenario:#?}\n{:?}\n{}", result.violations, result.report);
        assert!(result.violations.is_empty());
        return;
    }
    let (jobs, big) = (env("FLOTILLA_SIM_JOBS", 120), env("FLOTILLA_SIM_BIG", 0));
    let fingerprint = Fingerprint::open("jobs");
    let mut drift = Vec::new();
    let started = std::time::Instant::now();
    let mut campaign = sim::Campaign::default();
    for seed in 1..=jobs {
        let scenario = sim::scenario(seed, None);
        let one = std::time::Instant::now();
        let result = sim::run(&scenario).await;
        drift.extend(fingerprint.check(&format!("job {seed}"), job_figures(&result)));
        campaign.add(&scenario, &result);
        if one.elapsed().as_secs() >= 10 {
            eprintln!("seed {seed} took {:.0} s", one.elapsed().as_secs_f64());
        }
        if seed % 250 == 0 {
            eprintln!("{seed} jobs simulated, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    for index in 0..big {
        let scenario = sim::scenario(1_000_000 + index, Some(1000));
        let result = sim::run(&scenario).await;
        drift.extend(fingerprint.check(&format!("big {}", 1_000_000 + index), job_figures(&result)));
        campaign.add(&scenario, &result);
    }
    campaign.seconds = started.elapsed().as_secs_f64();
    campaign.print();
    // What a job costs when nothing goes wrong: five phases, one volume each.
    // `make test` runs the small ones; `make chaos` adds 1,000 instances.
    println!("fault-free jobs (one volume per instance, five phases):");
    println!(
        "  {:>9} {:>10} {:>16} {:>22} {:>12} {:>13}",
        "instances", "calls", "calls/instance", "EC2+SSM mutating", "passes", "max record"
    );
    let sizes: &[u32] = if big > 0 { &[1, 10, 100, 1000] } else { &[1, 10, 100] };
    for &size in sizes {
        let scenario = sim::clean_scenario(7_000 + u64::from(size), size);
        let result = sim::run(&scenario).await;
        assert!(result.violations.is_empty(), "fault-free {size}: {:?}", result.violations);
        drift.extend(fingerprint.check(&format!("clean {size}"), job_figures(&result)));
        println!(
            "  {size:>9} {:>10} {:>16.1} {:>22} {:>12} {:>11} B",
            result.calls,
            result.calls as f64 / f64::from(size),
            result.mutating_calls,
            result.passes,
            result.record_bytes
        );
    }
    drift.extend(fingerprint.unseen("job", jobs));
    drift.extend(fingerprint.unseen("big", (1_000_000 + big).saturating_sub(1)));
    drift.extend(fingerprint.unseen("clean", u64::from(*sizes.last().expect("sizes"))));
    fingerprint.finish();
    assert!(
        campaign.failed_seeds.is_empty(),
        "replay one with `make chaos SEED=<seed>`:\n{}",
        campaign.failed_seeds.join("\n")
    );
    assert!(drift.is_empty(), "the simulator's figures moved from tests/fingerprint/jobs.txt:\n{}", drift.join("\n"));
}

/// A malformed body that names an id gets a REJECTED record under it; the
/// valid submission that follows with that id is accepted, not ignored.
#[tokio::test]
async fn a_rejection_never_blocks_a_later_valid_job_with_the_same_id() {
    let cloud = cloud();
    let ports = ports(&cloud);
    let mut bad = job("claimed-1");
    bad["fleet"] = json!({"count": 0});
    let first = intake::submit(&ports, &bad.to_string(), "m-1", None).await.expect("intake");
    assert!(matches!(first, intake::Intake::Rejected { .. }), "{first:?}");
    assert_eq!(cloud.record("claimed-1").expect("record").state, JobState::Rejected);
    let second = intake::submit(&ports, &job("claimed-1").to_string(), "m-2", None).await.expect("intake");
    assert_eq!(second, intake::Intake::Accepted { job_id: "claimed-1".into() });
    // And a bad body after a real job never overwrites it.
    let third = intake::submit(&ports, &bad.to_string(), "m-3", None).await.expect("intake");
    assert!(matches!(third, intake::Intake::AlreadyKnown { .. }), "{third:?}");
    let ports2 = ports;
    drive(&cloud, &ports2, 1, |r| r.state.is_terminal(), "claimed-1").await;
    assert_eq!(cloud.record("claimed-1").expect("record").state, JobState::Succeeded);
}

/// The debug hold in the simulated cloud: the failed shard's instance and
/// volume stay, tagged `held-until` (and the instance's `expires-at` moved)
/// so the reaper honours the hold without the record; a cancel that arrives
/// before the hold is taken means stop everything, so nothing is held; and a
/// held instance gone before it could be tagged ends the tagging.
#[tokio::test]
async fn a_failed_shard_is_held_and_tagged_but_never_once_a_cancel_arrived() {
    use flotilla_shared::tags;
    let failing = || -> flotilla_testkit::fake::CommandBehaviour {
        std::sync::Arc::new(|request, _| (if request.comment.contains(" run ") { 3 } else { 0 }, String::new(), 5))
    };
    let held = |id: &str| {
        let mut spec = job(id);
        spec["fleet"] = json!({"count": 1});
        spec["debug_hold_minutes"] = json!(30);
        spec
    };

    // Two shards: the other's cleanup goes on after the hold is taken.
    let cloud = cloud().with_behaviour(failing());
    let mut two = held("held-1");
    two["fleet"] = json!({"count": 2});
    let record = run_job(&cloud, two, 1).await;
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    let hold = record.hold.clone().expect("the failed shard is held");
    assert!(hold.tagged);
    let until = hold.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // Billed from launch to the hold's end, the passes after it not twice.
    let held_attempt = &record.shards[hold.shard as usize].attempts[0];
    let launched = held_attempt.launched_at.expect("launched");
    assert!(record.updated_at.is_some_and(|at| at > hold.since), "passes wrote the record after the hold began");
    let others: u64 = record
        .attempts()
        .filter(|a| a.instance_id != held_attempt.instance_id)
        .map(|a| u64::from(a.billed_seconds.expect("terminated, so billed")))
        .sum();
    let realized = flotilla_shared::report::realized(&record).instance_seconds;
    assert_eq!(realized, others + (hold.ends_at() - launched).num_seconds() as u64);
    {
        let state = cloud.lock();
        let instance = state.instances.iter().find(|i| i.id == hold.instance_id).expect("held instance");
        assert_eq!(instance.state, "running");
        assert_eq!(instance.tags.get(tags::HELD_UNTIL), Some(&until));
        assert_eq!(instance.tags.get(tags::EXPIRES_AT), Some(&until));
        assert!(!hold.volume_ids.is_empty());
        for id in &hold.volume_ids {
            let volume = state.volumes.iter().find(|v| &v.id == id).expect("held volume");
            assert_eq!(volume.tags.get(tags::HELD_UNTIL), Some(&until), "{id}");
        }
    }

    // A cancel once the step failed, before the failure's snapshots answer.
    let cloud = self::cloud().with_behaviour(failing());
    let ports = ports(&cloud);
    intake::submit(&ports, &held("held-2").to_string(), "m-1", None).await.expect("intake");
    drive(&cloud, &ports, 1, |r| r.shards[0].attempts.first().is_some_and(|a| a.end.is_some()), "held-2").await;
    assert!(cloud.record("held-2").expect("record").hold.is_none(), "held before the cancel could arrive");
    intake::submit(&ports, r#"{"cancel": "held-2"}"#, "m-2", None).await.expect("cancel");
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "held-2").await;
    let record = cloud.record("held-2").expect("record");
    assert!(record.hold.is_none(), "held after a cancel: {:?}", record.hold);
    assert_eq!(cloud.running_instances(), 0);

    // A cancel during the hold (the other shard still running) ends it.
    let cloud = self::cloud().with_behaviour(std::sync::Arc::new(|request, instance| {
        if !request.comment.contains(" run ") {
            return (0, String::new(), 5);
        }
        let shard1 = request.lines.iter().any(|l| l.contains(instance) && l.contains("SHARD_INDEX=1"));
        if shard1 {
            (0, String::new(), 1200)
        } else {
            (3, String::new(), 5)
        }
    }));
    let ports = self::ports(&cloud);
    let mut two = held("held-3");
    two["fleet"] = json!({"count": 2});
    intake::submit(&ports, &two.to_string(), "m-1", None).await.expect("intake");
    drive(&cloud, &ports, 1, |r| r.hold.is_some(), "held-3").await;
    assert!(!cloud.record("held-3").expect("record").state.is_terminal(), "shard 1 still runs");
    intake::submit(&ports, r#"{"cancel": "held-3"}"#, "m-2", None).await.expect("cancel");
    drive(&cloud, &ports, 1, |r| r.state.is_terminal(), "held-3").await;
    let record3 = cloud.record("held-3").expect("record");
    let ended = record3.hold.as_ref().and_then(|h| h.released_at);
    assert!(
        ended.is_some_and(|at| record3
            .cancel_requested_at
            .is_some_and(|c| at <= c.max(record3.hold.as_ref().expect("hold").since))),
        "the cancel did not end the hold: {:?}",
        record3.hold
    );

    // The held instance is gone when the tags are written: EC2 says
    // NotFound, and the pass records it once instead of asking forever.
    let mut gone = record.clone();
    gone.hold = hold.clone().into();
    gone.hold.as_mut().expect("hold").tagged = false;
    let tag = flotilla_shared::reconcile::Action::TagHold {
        instance_id: hold.instance_id.clone(),
        volume_ids: hold.volume_ids.clone(),
        until,
    };
    let not_found = flotilla_shared::error::CloudError::api("ec2", "CreateTags", "InvalidInstanceID.NotFound", "gone");
    flotilla_shared::reconcile::decide::apply(&mut gone, &tag, Err(not_found), sim::start_time());
    assert!(gone.hold.as_ref().is_some_and(|h| h.tagged), "TagHold would be asked for again on every pass");
}
