//! API economy on the simulated cloud: what a pass leaves out, and what
//! waits for a later one, must never lose a job or a step.

use chrono::Duration;
use flotilla_shared::intake;
use flotilla_shared::ports::Ports;
use flotilla_shared::reconcile::{self, Handled, WakeMessage};
use flotilla_shared::record::{JobState, Phase, Stage};
use flotilla_shared::settings::Settings;
use flotilla_testkit::fake::{ApiLimits, FakeCloud, Faults, Latencies};
use flotilla_testkit::sim;
use serde_json::json;

use crate::moto::job;
use flotilla_shared::wake::Trigger;

const BUDGET: i64 = 50;

fn ec2_calls(cloud: &FakeCloud) -> u64 {
    let state = cloud.lock();
    ["DescribeInstances", "DescribeVolumes", "DescribeInstanceInformation", "ListCommandInvocations", "SendCommand"]
        .iter()
        .map(|op| state.calls.get(op).copied().unwrap_or(0))
        .sum()
}

/// Deliver queued messages in time order until `stop` holds.
async fn drive_until(cloud: &FakeCloud, ports: &Ports, job_id: &str, stop: impl Fn(&FakeCloud) -> bool) {
    for _ in 0..5_000 {
        if stop(cloud) {
            return;
        }
        let Some(message) = cloud.next_message() else { break };
        let _ = reconcile::reconcile(ports, &message, Duration::seconds(BUDGET)).await;
    }
    assert!(stop(cloud), "{job_id} never got there: {:?}", cloud.record(job_id).map(|r| r.reason));
}

fn running(cloud: &FakeCloud, job_id: &str) -> bool {
    cloud.record(job_id).is_some_and(|r| {
        r.shards.iter().all(|s| {
            s.current().is_some_and(|a| {
                a.stage == Stage::Working
                    && a.phases.iter().any(|p| p.phase == Phase::Run && p.status.is_none() && p.batch != 0)
            })
        })
    })
}

fn long_job(id: &str) -> serde_json::Value {
    let mut spec = job(id);
    spec["run"] = json!({"script": "sleep 3600", "timeout_seconds": 7200});
    spec["deadline_minutes"] = json!(240);
    spec
}

/// A simulated cloud on which the run phase takes an hour, the others 1 s.
fn long_run_cloud() -> FakeCloud {
    FakeCloud::new(sim::start_time()).with_behaviour(std::sync::Arc::new(|request, _| {
        if request.comment.contains(" run ") {
            (0, "done".into(), 3600)
        } else {
            (0, String::new(), 1)
        }
    }))
}

/// A 3-instance job with every shard in its hour-long run phase, no
/// message queued, 30 s after its last pass (events on, 120 s safety poll).
async fn quiet_running_job(id: &str) -> (FakeCloud, Ports) {
    let cloud = long_run_cloud();
    let ports = cloud.ports(Settings { safety_poll_seconds: Some(120), ..sim::settings() });
    let mut spec = long_job(id);
    spec["fleet"] = json!({"count": 3});
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    drive_until(&cloud, &ports, id, |c| running(c, id)).await;
    cloud.lock().queue.clear();
    cloud.advance_to(cloud.record(id).and_then(|r| r.updated_at).expect("a pass ran") + Duration::seconds(30));
    (cloud, ports)
}

/// A tick for a job whose poll is on its way costs nothing; once that poll
/// is overdue (lost), the tick runs the pass that carries the job on.
#[tokio::test]
async fn a_tick_skips_a_job_whose_poll_is_coming_and_carries_one_whose_poll_was_lost() {
    let cloud = long_run_cloud();
    let ports = cloud.ports(sim::settings());
    intake::submit(&ports, &long_job("ticked").to_string(), "m-1", None).await.expect("intake");
    drive_until(&cloud, &ports, "ticked", |c| running(c, "ticked")).await;
    let record = cloud.record("ticked").expect("record");
    let wake = record.wake.clone().expect("a poll is scheduled");
    let before = ec2_calls(&cloud);
    let tick = WakeMessage::new("ticked", Trigger::Tick);
    assert_eq!(reconcile::reconcile(&ports, &tick, Duration::seconds(BUDGET)).await.expect("tick"), Handled::Scheduled);
    assert_eq!(ec2_calls(&cloud), before, "a skipped tick makes no AWS call");
    assert_eq!(cloud.record("ticked").expect("record").passes, record.passes);

    // The poll is lost; two minutes past its moment, the tick takes over.
    cloud.lock().queue.clear();
    cloud.advance_to(wake.at + Duration::seconds(121));
    let handled = reconcile::reconcile(&ports, &tick, Duration::seconds(BUDGET)).await.expect("tick");
    assert!(matches!(handled, Handled::Reconciled { .. }), "{handled:?}");
    let after = cloud.record("ticked").expect("record");
    assert_eq!(after.passes, record.passes + 1);
    assert!(after.wake.is_some_and(|w| w.id != wake.id), "the pass scheduled a new poll");
}

/// An event right after a pass waits in the record; the pass a gap later
/// lists the command of the instance it named, although that command's
/// safety poll is not due.
#[tokio::test]
async fn an_event_right_after_a_pass_is_kept_for_the_next_and_its_instance_is_looked_at() {
    let cloud = long_run_cloud();
    let settings = Settings { safety_poll_seconds: Some(120), ..sim::settings() };
    let ports = cloud.ports(settings);
    // 40 shards: passes at least 2 s apart (none below 20 shards).
    let mut spec = long_job("hinted");
    spec["fleet"] = json!({"count": 40});
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    drive_until(&cloud, &ports, "hinted", |c| running(c, "hinted")).await;
    let record = cloud.record("hinted").expect("record");
    let instance = record.shards[0].current().and_then(|a| a.instance_id.clone()).expect("instance");
    let last_pass = record.updated_at.expect("a pass ran");
    let run_batch = |r: &flotilla_shared::record::JobRecord| {
        r.commands.values().find(|b| b.phase == Phase::Run).cloned().expect("run batch")
    };
    let listed_before = run_batch(&record).listed_at;
    cloud.lock().queue.clear();

    cloud.advance_to(last_pass);
    let mut event = WakeMessage::new("hinted", Trigger::Event);
    event.instances = vec![instance.clone()];
    let handled = reconcile::reconcile(&ports, &event, Duration::seconds(BUDGET)).await.expect("event");
    assert_eq!(handled, Handled::Deferred);
    let kept = cloud.record("hinted").expect("record");
    assert_eq!(kept.hinted, vec![instance.clone()]);
    assert_eq!(kept.passes, record.passes, "no pass ran");
    let poll = cloud.next_message().expect("a poll for the gap's end");
    let wake = kept.wake.clone().expect("scheduled");
    assert_eq!(poll.wake_id, Some(wake.id));
    assert_eq!(wake.at, last_pass + Duration::seconds(2), "due one gap after the pass");

    let handled = reconcile::reconcile(&ports, &poll, Duration::seconds(BUDGET)).await.expect("poll");
    assert!(matches!(handled, Handled::Reconciled { .. }), "{handled:?}");
    let after = cloud.record("hinted").expect("record");
    assert!(after.hinted.is_empty());
    assert_ne!(run_batch(&after).listed_at, listed_before, "the named instance's command was listed");
}

/// Two hundred shards reach their volumes at once: with admission control
/// their mutating calls (CreateVolume, AttachVolume, CreateSnapshot,
/// DeleteVolume, TerminateInstances) stay within EC2's bucket of 50 and
/// 5 a second, and the job still succeeds; without it, EC2 throttles.
#[tokio::test]
async fn mutating_calls_stay_within_ec2s_bucket() {
    async fn run(admission: bool) -> (JobState, u64) {
        let cloud = FakeCloud::new(sim::start_time());
        {
            let mut state = cloud.lock();
            state.limits = Some(ApiLimits::ec2());
        }
        let ports = cloud.ports(Settings { launch_admission: admission, ..sim::settings() });
        let mut spec = job("volumes-200");
        spec["fleet"] = json!({"count": 200});
        spec["deadline_minutes"] = json!(120);
        intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
        for _ in 0..50_000 {
            if cloud.record("volumes-200").is_some_and(|r| r.state.is_terminal()) {
                break;
            }
            let Some(message) = cloud.next_message() else { break };
            if reconcile::reconcile(&ports, &message, Duration::seconds(BUDGET)).await.is_err() {
                cloud.redeliver_later(message, 30);
            }
        }
        let state = cloud.record("volumes-200").map(|r| r.state).expect("record");
        let throttled = cloud.lock().limits.as_ref().map(|l| {
            ["CreateVolume", "AttachVolume", "CreateSnapshot", "DeleteVolume", "TerminateInstances"]
                .iter()
                .map(|op| l.throttled.get(op).copied().unwrap_or(0))
                .sum()
        });
        (state, throttled.unwrap_or(0))
    }
    let (state, throttled) = run(true).await;
    assert_eq!((state, throttled), (JobState::Succeeded, 0));
    let (_, unmanaged) = run(false).await;
    assert!(unmanaged > 0, "without admission the same job is throttled: the bucket binds");
}

/// A command or snapshot decided in this pass was never sent: the executor
/// sends it without looking for an earlier one (ListCommands, or
/// DescribeSnapshots by tag), which only a crash or a lost reply needs.
#[tokio::test]
async fn a_fault_free_job_never_looks_up_what_it_just_decided() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(sim::settings());
    let mut spec = job("no-lookups");
    spec["fleet"] = json!({"count": 3});
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    drive_until(&cloud, &ports, "no-lookups", |c| c.record("no-lookups").is_some_and(|r| r.state.is_terminal())).await;
    let record = cloud.record("no-lookups").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let calls = cloud.lock().calls.clone();
    assert_eq!(calls.get("ListCommands"), None, "{calls:?}");
    assert!(calls.get("SendCommand").is_some_and(|n| *n >= 5));
    assert!(calls.get("CreateSnapshot").is_some_and(|n| *n >= 3));
}

/// A send whose reply was lost (the pass died after SendCommand took
/// effect), to an instance whose agent then drops off for a minute: the
/// command that did reach SSM is found by its comment and adopted, never
/// sent again under a new batch once the agent is back.
#[tokio::test]
async fn a_send_whose_reply_was_lost_is_adopted_though_its_agent_dropped_off() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(sim::settings());
    cloud.lock().crash_after.push("SendCommand");
    let mut spec = job("lost-reply");
    spec["deadline_minutes"] = json!(60);
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    let deliver = |message: WakeMessage| {
        let (cloud, ports) = (&cloud, &ports);
        async move {
            let outcome = cloud.process(reconcile::reconcile(ports, &message, Duration::seconds(BUDGET))).await;
            if outcome.is_none_or(|outcome| outcome.is_err()) {
                cloud.redeliver_later(message, 150);
            }
        }
    };
    while cloud.lock().commands.is_empty() {
        deliver(cloud.next_message().expect("a message")).await;
    }
    let record = cloud.record("lost-reply").expect("record");
    assert!(record.commands.values().any(|b| b.command_id.is_none()), "the send's reply was lost");
    let instance = cloud.lock().commands[0].request.instance_ids[0].clone();
    cloud.lose_agent(&instance);
    // Offline across the passes that follow the crash (the lost pass's
    // message comes back after 150 s).
    let back_at = cloud.now() + Duration::seconds(400);
    let passes = cloud.record("lost-reply").map(|r| r.passes).unwrap_or_default();
    while cloud.next_due().is_some_and(|due| due <= back_at) {
        deliver(cloud.next_message().expect("a message")).await;
    }
    assert!(cloud.record("lost-reply").is_some_and(|r| r.passes > passes + 1), "passes ran while it was offline");
    for lost in cloud.lock().instances.iter_mut().filter(|i| i.id == instance) {
        lost.agent_lost_at = None;
    }
    drive_until(&cloud, &ports, "lost-reply", |c| c.record("lost-reply").is_some_and(|r| r.state.is_terminal())).await;
    let record = cloud.record("lost-reply").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let mut sends: std::collections::BTreeMap<(String, String), u32> = Default::default();
    for command in &cloud.lock().commands {
        let phase = command.request.comment.split_whitespace().nth(2).unwrap_or_default().to_string();
        for id in &command.request.instance_ids {
            *sends.entry((id.clone(), phase.clone())).or_default() += 1;
        }
    }
    assert!(sends.values().all(|n| *n == 1), "each phase sent once per instance: {sends:?}");
}

/// A round's cloud calls show their effect seconds later or as an event, so
/// a pass that made them ends instead of observing again at once: one look
/// a pass. Pruning and the report are the record's own steps, so the pass
/// that writes the report also ends the job; and the job ends within
/// seconds of its last volume's delete (no event says a shard settled).
#[tokio::test]
async fn a_pass_looks_once_unless_what_it_did_unlocks_the_next_step() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(sim::settings());
    let mut spec = job("one-look");
    spec["fleet"] = json!({"count": 3});
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    let mut last_deleted_at = None;
    for _ in 0..5_000 {
        let Some(message) = cloud.next_message() else { break };
        let _ = reconcile::reconcile(&ports, &message, Duration::seconds(BUDGET)).await;
        let record = cloud.record("one-look").expect("record");
        assert!(
            !record.report_written || record.state.is_terminal(),
            "the pass that wrote the report left the job {}",
            record.state
        );
        let volumes: Vec<_> = record.attempts().flat_map(|a| a.volumes.iter()).collect();
        if !volumes.is_empty() && volumes.iter().all(|v| v.deleted) {
            let deleted_at = *last_deleted_at.get_or_insert(cloud.now());
            let since = (cloud.now() - deleted_at).num_seconds();
            assert!(!record.state.is_terminal() || since <= 2, "ended {since} s after the last volume's delete");
        }
        if record.state.is_terminal() {
            break;
        }
    }
    let record = cloud.record("one-look").expect("record");
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let looks = cloud.lock().calls.get("DescribeInstances").copied().unwrap_or(0);
    // Launching, the passes, and the two record-only rounds at the end.
    assert!(looks <= record.passes + 2, "{looks} looks in {} passes", record.passes);
}

/// A SendCommand refused after the look (an agent that dropped off in
/// between) leaves no command, so no event will follow: the pass tries
/// again at once, and when its rounds run out it comes back within the poll
/// delay, not a safety poll (10 minutes here) later.
#[tokio::test]
async fn a_refused_send_is_tried_again_within_the_poll_delay() {
    let cloud = FakeCloud::new(sim::start_time());
    let settings = Settings { safety_poll_seconds: Some(600), ..sim::settings() };
    let poll = i64::from(settings.poll_delay_seconds);
    let ports = cloud.ports(settings);
    let mut spec = job("refused-send");
    spec["fleet"] = json!({"count": 2});
    cloud.lock().refused.insert("SendCommand", "InvalidInstanceId");
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    while !cloud.lock().calls.contains_key("SendCommand") {
        let message = cloud.next_message().expect("a message");
        let _ = reconcile::reconcile(&ports, &message, Duration::seconds(BUDGET)).await;
    }
    let refused_at = cloud.now();
    let tries = cloud.lock().calls["SendCommand"];
    assert!(tries > 1, "tried again in the same pass: {tries}");
    cloud.lock().refused.remove("SendCommand");
    drive_until(&cloud, &ports, "refused-send", |c| !c.lock().commands.is_empty()).await;
    let waited = (cloud.now() - refused_at).num_seconds();
    assert!(waited <= poll + 5, "sent {waited} s after the refusal (poll delay {poll} s)");
}

/// An event that comes while a pass holds the lease (the two interleaved:
/// the fake yields at every call, and the event runs once the pass holds
/// the lease) is not left for the lease's
/// end or the next safety poll: the pass under way learns of it when it
/// saves, and the job's next pass comes a second after it ends and lists the
/// commands in flight.
#[tokio::test]
async fn an_event_during_a_pass_brings_the_next_pass_a_second_after_it() {
    let (cloud, ports) = quiet_running_job("during").await;
    let record = cloud.record("during").expect("record");
    let instance = record.shards[1].current().and_then(|a| a.instance_id.clone()).expect("instance");
    let run_batch = |r: &flotilla_shared::record::JobRecord| {
        r.commands.values().find(|b| b.phase == Phase::Run).cloned().expect("run batch")
    };

    cloud.lock().faults.yield_rate = 1.0;
    let poll = WakeMessage::new("during", Trigger::Poll);
    let mut event = WakeMessage::new("during", Trigger::Event);
    event.instances = vec![instance];
    // The pass runs, one call at a time, until it holds the lease; the event
    // comes then; the pass goes on.
    let mut pass = std::pin::pin!(reconcile::reconcile(&ports, &poll, Duration::seconds(BUDGET)));
    loop {
        let step =
            std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(pass.as_mut(), cx))).await;
        assert!(step.is_pending(), "the pass ended before the event came: {step:?}");
        if cloud.record("during").is_some_and(|r| r.lease.is_some()) {
            break;
        }
    }
    let busy = reconcile::reconcile(&ports, &event, Duration::seconds(BUDGET)).await;
    let pass = pass.await;
    cloud.lock().faults.yield_rate = 0.0;
    assert!(matches!(pass, Ok(Handled::Reconciled { .. })), "{pass:?}");
    assert_eq!(busy.ok(), Some(Handled::Busy), "the event came during the pass");
    let ended = cloud.now();
    let listed_before = run_batch(&cloud.record("during").expect("record")).listed_at;
    let due = cloud.next_due().expect("a wake");
    assert!(
        due <= ended + Duration::seconds(2),
        "next pass {} s after the one the event found busy",
        (due - ended).num_seconds()
    );
    let next = cloud.next_message().expect("a wake");
    let handled = reconcile::reconcile(&ports, &next, Duration::seconds(BUDGET)).await.expect("pass");
    assert!(matches!(handled, Handled::Reconciled { .. }), "{handled:?}");
    let after = cloud.record("during").expect("record");
    assert!(!after.woken);
    assert_ne!(run_batch(&after).listed_at, listed_before, "the commands in flight were listed");
}

/// A pass that dies holding the lease: the first event that finds it busy
/// sets `woken` and leaves one lease-end message for the lease's end (later
/// events add nothing). That message runs the pass the dead one owed, which
/// lists every command in flight; a lease-end message for a pass that ended
/// is dropped.
#[tokio::test]
async fn a_lease_end_message_stands_in_for_a_pass_that_died_and_is_dropped_after_one_that_ended() {
    let (cloud, ports) = quiet_running_job("dead-owner").await;
    // The pass that took this lease died.
    let loaded = ports.ledger.load("dead-owner").await.expect("load").expect("record");
    let mut record = loaded.record;
    record.lease =
        Some(flotilla_shared::record::Lease { owner: "dead".into(), until: cloud.now() + Duration::seconds(10) });
    ports.ledger.replace(&record, &loaded.version).await.expect("lease");
    let instance = record.shards[0].current().and_then(|a| a.instance_id.clone()).expect("instance");

    for n in 0..3 {
        let mut event = WakeMessage::new("dead-owner", Trigger::Event);
        event.instances = vec![instance.clone()];
        let handled = reconcile::reconcile(&ports, &event, Duration::seconds(BUDGET)).await.expect("event");
        assert_eq!(handled, Handled::Busy);
        assert_eq!(cloud.lock().queue.len(), 1, "after event {n}: one lease-end message");
    }
    assert!(cloud.record("dead-owner").is_some_and(|r| r.woken));
    let listed_before =
        cloud.record("dead-owner").expect("record").commands.values().map(|b| b.listed_at).collect::<Vec<_>>();
    let due = cloud.next_due().expect("due");
    assert!(due > cloud.now() + Duration::seconds(10), "after the lease's end");
    let lease_end = cloud.next_message().expect("the lease-end message");
    assert_eq!((lease_end.trigger.clone(), lease_end.lease_owner.as_deref()), (Some(Trigger::LeaseEnd), Some("dead")));
    let handled = reconcile::reconcile(&ports, &lease_end, Duration::seconds(BUDGET)).await.expect("pass");
    assert!(matches!(handled, Handled::Reconciled { .. }), "{handled:?}");
    let after = cloud.record("dead-owner").expect("record");
    assert!(!after.woken && after.lease.is_none());
    let listed_after = after.commands.values().map(|b| b.listed_at).collect::<Vec<_>>();
    assert_ne!(listed_after, listed_before, "every command in flight was listed");
    // The same message again (SQS delivers at least once): that pass ended.
    let handled = reconcile::reconcile(&ports, &lease_end, Duration::seconds(BUDGET)).await.expect("again");
    assert_eq!(handled, Handled::Scheduled);
}

/// A command SSM no longer knows (its invocations answer InvalidCommandId)
/// must not stall its job: the look goes on without it, the step times out
/// in `decide`, and the job ends with every instance gone. Before, the
/// whole observation failed, every pass, so nothing ran, the bound on the
/// bill included.
#[tokio::test]
async fn a_command_ssm_no_longer_knows_does_not_stall_its_job() {
    let cloud = long_run_cloud();
    let ports = cloud.ports(sim::settings());
    let mut spec = long_job("forgotten");
    spec["run"]["timeout_seconds"] = json!(600);
    intake::submit(&ports, &spec.to_string(), "m-1", None).await.expect("intake");
    drive_until(&cloud, &ports, "forgotten", |c| running(c, "forgotten")).await;
    cloud.lock().commands.clear();
    drive_until(&cloud, &ports, "forgotten", |c| c.record("forgotten").is_some_and(|r| r.state.is_terminal())).await;
    let record = cloud.record("forgotten").expect("record");
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    assert!(record.reason.contains("run timed out"), "the step's timeout, not the look's failure: {}", record.reason);
    assert_eq!(cloud.running_instances(), 0);
}

/// SSM lists a new command's invocations only after a lag, and its
/// status-change event can come first: the pass the event brings finds
/// nothing listed. The next phase must start once the listing catches up
/// (looks every 2-15 s while the lag lasts), not a safety poll later.
#[tokio::test]
async fn a_step_whose_event_outruns_its_listing_is_seen_once_listed() {
    const LAG: i64 = 30;
    let latencies = Latencies { lookup_lag: (LAG, LAG), ..Latencies::quick() };
    let cloud = FakeCloud::seeded(sim::start_time(), 7, latencies, Faults::default())
        .with_behaviour(std::sync::Arc::new(|_, _| (0, String::new(), 1)));
    cloud.lock().events = true;
    let ports = cloud.ports(Settings { safety_poll_seconds: Some(120), ..sim::settings() });
    intake::submit(&ports, &job("lagged").to_string(), "m-1", None).await.expect("intake");
    drive_until(&cloud, &ports, "lagged", |c| c.record("lagged").is_some_and(|r| r.state.is_terminal())).await;
    assert_eq!(cloud.record("lagged").map(|r| r.state), Some(JobState::Succeeded));

    let state = cloud.lock();
    let phases: Vec<(String, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = state
        .commands
        .iter()
        .map(|c| {
            let ended = c.runs.values().map(|r| r.finishes_at).max().expect("a run");
            (c.request.comment.clone(), c.sent_at, ended)
        })
        .collect();
    assert!(phases.len() >= 3, "{phases:?}");
    for pair in phases.windows(2) {
        let gap = (pair[1].1 - pair[0].2).num_seconds();
        assert!(gap <= LAG + 15 + 2, "{} sent {gap} s after {} ended (lag {LAG} s): {phases:?}", pair[1].0, pair[0].0);
    }
}
