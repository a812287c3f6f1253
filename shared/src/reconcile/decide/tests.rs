use super::*;
use crate::plan::plan;
use crate::spec::{parse, ExitRule, Market};
use chrono::TimeZone;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time")
}

fn record(extra: serde_json::Value) -> JobRecord {
    let mut spec = serde_json::json!({
        "id": "j", "fleet": {"count": 2}, "instance_types": ["t3.micro", "t3.small"], "image": "ami-0abc1234",
        "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data"}],
        "run": {"commands": [["true"]]}, "deadline_minutes": 60
    });
    for (key, value) in extra.as_object().expect("object") {
        spec[key] = value.clone();
    }
    let spec = parse(&spec.to_string()).expect("spec");
    let plan = plan(&spec, &crate::plan::Prices::builtin()).expect("plan");
    JobRecord::new("j".into(), spec, plan, now())
}

fn settings() -> Settings {
    Settings { worker_instance_profile: Some("worker".into()), ..Settings::default() }
}

/// An unset step timeout is what is left of the deadline (it used to be
/// a flat hour, which killed an 8-hour run after one); a set one is kept.
#[test]
fn an_unset_step_timeout_is_what_is_left_of_the_deadline() {
    let long = record(serde_json::json!({"deadline_minutes": 480}));
    let spec = long.spec.clone().expect("spec");
    assert_eq!(phase_timeout(&spec, Phase::Run, long.deadline_at, None, now()), 480 * 60);
    assert_eq!(phase_timeout(&spec, Phase::Run, long.deadline_at, None, now() + Duration::hours(7)), 3600);
    // A work step sent after the deadline (it is cancelled anyway) gets a minute.
    assert_eq!(phase_timeout(&spec, Phase::Run, long.deadline_at, None, now() + Duration::hours(9)), 60);
    // A cleanup step: 10 minutes to an hour, whatever is left.
    let hook = record(serde_json::json!({"deadline_minutes": 480, "before_unmount": {"commands": [["sync"]]}}));
    let spec = hook.spec.clone().expect("spec");
    assert_eq!(phase_timeout(&spec, Phase::BeforeUnmount, hook.deadline_at, None, now()), 3600);
    assert_eq!(phase_timeout(&spec, Phase::BeforeUnmount, hook.deadline_at, None, now() + Duration::hours(9)), 600);
    let set = record(serde_json::json!({"run": {"commands": [["true"]], "timeout_seconds": 90}}));
    let spec = set.spec.clone().expect("spec");
    assert_eq!(phase_timeout(&spec, Phase::Run, set.deadline_at, None, now()), 90);
}

fn run(record: &mut JobRecord, obs: &Observation, at: DateTime<Utc>) -> Vec<Action> {
    let settings = settings();
    decide(record, obs, &Context { now: at, settings: &settings, bucket: "b", launch_grant: None }).0
}

fn instance(id: &str, state: &str, token: &str, index: u32) -> InstanceView {
    InstanceView {
        instance_id: id.into(),
        state: state.into(),
        availability_zone: "us-east-1a".into(),
        launch_index: index,
        job_id: Some("j".into()),
        launch_token: Some(token.into()),
        tags: BTreeMap::new(),
    }
}

#[test]
fn the_launch_intent_is_recorded_and_repeated_with_the_same_token_and_count() {
    let mut r = record(serde_json::json!({}));
    let first = run(&mut r, &Observation::default(), now());
    let Some(Action::Launch { request }) = first.first() else { panic!("{first:?}") };
    assert_eq!((request.count, request.instance_profile.as_deref()), (2, Some("worker")));
    assert!(r.shards.iter().all(|s| s.current().and_then(|a| a.launch_token.as_ref()) == Some(&request.client_token)));
    // No reply recorded (a crash): the same call again, never a second fleet.
    let again = run(&mut r, &Observation::default(), now());
    assert_eq!(again.first(), first.first());
}

#[test]
fn a_partly_filled_launch_relaunches_only_the_rest() {
    let mut r = record(serde_json::json!({}));
    let actions = run(&mut r, &Observation::default(), now());
    let token = match &actions[0] {
        Action::Launch { request } => request.client_token.clone(),
        other => panic!("{other:?}"),
    };
    apply(&mut r, &actions[0], Ok(Done::Launched(vec![instance("i-1", "pending", &token, 0)])), now());
    assert_eq!(r.shards[0].current().map(|a| a.stage), Some(Stage::Booting));
    let next = run(&mut r, &Observation::default(), now());
    match &next[0] {
        Action::Launch { request } => assert_eq!((request.count, request.client_token != token), (1, true)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn instances_of_a_lost_reply_are_adopted_by_their_launch_tag() {
    let mut r = record(serde_json::json!({}));
    run(&mut r, &Observation::default(), now());
    let token = r.shards[0].current().and_then(|a| a.launch_token.clone()).expect("token");
    let mut obs = Observation::default();
    for (i, id) in ["i-b", "i-a"].iter().enumerate() {
        obs.instances.insert(id.to_string(), instance(id, "pending", &token, 1 - i as u32));
    }
    let actions = run(&mut r, &obs, now());
    assert!(!actions.iter().any(|a| matches!(a, Action::Launch { .. })), "{actions:?}");
    assert_eq!(r.instance_ids(), vec!["i-a".to_string(), "i-b".to_string()], "in launch order");
}

#[test]
fn capacity_fails_over_in_order_and_then_fails_the_shard() {
    let mut r = record(serde_json::json!({}));
    {
        let expected = "t3.small";
        let actions = run(&mut r, &Observation::default(), now());
        let err = CloudError::api("ec2", "RunInstances", "InsufficientInstanceCapacity", "none");
        apply(&mut r, &actions[0], Err(err), now());
        assert!(r.shards.iter().all(|s| s.current().is_some_and(|a| r.launch_of(a).instance_type == expected)));
    }
    let actions = run(&mut r, &Observation::default(), now());
    apply(
        &mut r,
        &actions[0],
        Err(CloudError::api("ec2", "RunInstances", "InsufficientInstanceCapacity", "none")),
        now(),
    );
    assert!(r
        .shards
        .iter()
        .all(|s| s.result.as_ref().is_some_and(|x| !x.succeeded && x.reason.contains("no capacity"))));
}

#[test]
fn throttling_changes_nothing_and_a_permanent_launch_error_fails_the_job() {
    let mut r = record(serde_json::json!({}));
    let actions = run(&mut r, &Observation::default(), now());
    let before = r.clone();
    apply(&mut r, &actions[0], Err(CloudError::api("ec2", "RunInstances", "RequestLimitExceeded", "slow")), now());
    assert_eq!(r, before);
    apply(&mut r, &actions[0], Err(CloudError::api("ec2", "RunInstances", "InvalidAMIID.Malformed", "bad")), now());
    run(&mut r, &Observation::default(), now());
    assert_eq!(r.outcome, Some(Outcome::Failed));
    assert!(r.outcome_reason.as_deref().is_some_and(|x| x.contains("InvalidAMIID.Malformed")));
}

/// A volume whose snapshot the policy wants is deleted only once the
/// snapshot is completed, whatever the job's outcome became meanwhile.
#[test]
fn a_volume_goes_only_after_its_snapshot_completes_even_after_a_cancel() {
    let mut r = record(serde_json::json!({"fleet": {"count": 1}}));
    let attempt = r.shards[0].current_mut().expect("attempt");
    attempt.stage = Stage::Releasing;
    attempt.instance_id = Some("i-1".into());
    attempt.end = Some(AttemptEnd { cause: EndCause::Succeeded, detail: String::new(), exit_code: Some(0) });
    attempt.volumes.push(AttemptVolume {
        restored_from: None,
        name: "data".into(),
        token: "j-v1".into(),
        volume_id: Some("vol-1".into()),
        created: true,
        created_at: None,
        seen: true,
        snapshot: None,
        snapshot_failures: 0,
        deleted: false,
        kept: None,
    });
    r.cancel_requested = true;
    let mut obs = Observation::default();
    obs.instances.insert("i-1".into(), instance("i-1", "terminated", "t", 0));
    obs.volumes.insert(
        "vol-1".into(),
        VolumeView {
            volume_id: "vol-1".into(),
            state: "available".into(),
            availability_zone: "us-east-1a".into(),
            attached_to: None,
            tags: BTreeMap::new(),
        },
    );
    let actions = run(&mut r, &obs, now());
    assert!(matches!(actions.as_slice(), [Action::Snapshot { .. }]), "{actions:?}");
    apply(&mut r, &actions[0], Ok(Done::Snapshotted("snap-1".into())), now());
    let snapshot = |state: &str| SnapshotView {
        snapshot_id: "snap-1".into(),
        volume_id: "vol-1".into(),
        state: state.into(),
        started_at: now(),
        tags: BTreeMap::new(),
    };
    obs.snapshots.insert("snap-1".into(), snapshot("pending"));
    let actions = run(&mut r, &obs, now());
    assert!(!actions.iter().any(|a| matches!(a, Action::DeleteVolume { .. })), "{actions:?}");
    obs.snapshots.insert("snap-1".into(), snapshot("completed"));
    let actions = run(&mut r, &obs, now());
    assert!(actions.iter().any(|a| matches!(a, Action::DeleteVolume { volume_id } if volume_id == "vol-1")));
}

/// The shared launch budget's grant bounds what launches; nothing is
/// asked for while launch calls are pending at their limit.
#[test]
fn launches_follow_the_grant_and_ask_nothing_while_calls_are_pending() {
    let mut r = record(serde_json::json!({"fleet": {"count": 5}, "volumes": []}));
    assert_eq!(launches_wanted(&r), 5);
    let settings = settings();
    let grant = crate::admission::Grant { instances: 2, retry_after_seconds: 0 };
    let ctx = Context { now: now(), settings: &settings, bucket: "b", launch_grant: Some(grant) };
    let (actions, _) = decide(&mut r, &Observation::default(), &ctx);
    let counts: Vec<u32> = actions
        .iter()
        .filter_map(|a| if let Action::Launch { request } = a { Some(request.count) } else { None })
        .collect();
    assert_eq!(counts, vec![2], "two granted, two launched");
    assert_eq!(launches_wanted(&r), 3, "the other three wait their turn");
    // Nothing granted: nothing new launches, and the job looks again when tokens refill.
    let none = crate::admission::Grant { instances: 0, retry_after_seconds: 7 };
    let ctx = Context { now: now(), settings: &settings, bucket: "b", launch_grant: Some(none) };
    let (actions, next) = decide(&mut r, &Observation::default(), &ctx);
    let fresh: Vec<u32> = actions
        .iter()
        .filter_map(|a| if let Action::Launch { request } = a { Some(request.count) } else { None })
        .collect();
    assert_eq!(fresh, vec![2], "only the pending call is repeated");
    assert!(matches!(next, Next::After(w) if w <= 7), "{next:?}");
    // Four calls pending: tokens granted now could launch nothing, so none are asked for.
    for index in 0..4 {
        if let Some(a) = r.shards[index].current_mut() {
            a.launch_token = Some(format!("t{index}"));
        }
    }
    assert_eq!(launches_wanted(&r), 0);
}

/// Shards reaching a phase a few at a time share sends: stragglers wait
/// at most COALESCE_SECONDS for peers still in an earlier phase, and
/// never once nobody is behind.
#[test]
fn shards_reaching_a_phase_one_by_one_share_a_few_sends() {
    let mut r = record(serde_json::json!({
        "fleet": {"count": 50}, "volumes": [], "before_unmount": {"commands": [["sync"]]}
    }));
    let mut obs = Observation::default();
    let batch = r.take_seq();
    for (index, shard) in r.shards.iter_mut().enumerate() {
        let id = format!("i-{index}");
        let attempt = shard.current_mut().expect("attempt");
        attempt.stage = Stage::Working;
        attempt.instance_id = Some(id.clone());
        attempt.launch_token = Some("t".into());
        attempt.launched_at = Some(now());
        attempt.phases.push(PhaseRun {
            phase: Phase::Run,
            batch,
            opened_at: Some(now()),
            status: None,
            exit_code: None,
            finished_at: None,
        });
        obs.instances.insert(id.clone(), instance(&id, "running", "t", index as u32));
    }
    r.commands.insert(
        batch,
        CommandBatch {
            phase: Phase::Run,
            command_id: Some("c-1".into()),
            dispatched_at: now(),
            listed_at: None,
            in_flight_until: None,
        },
    );
    let view = |index: usize, status: &str| InvocationView {
        instance_id: format!("i-{index}"),
        status: status.into(),
        exit_code: (status == "Success").then_some(0),
        stdout: String::new(),
        stderr: String::new(),
        output_uri: None,
    };
    for index in 0..50 {
        obs.invocations.insert(("c-1".into(), format!("i-{index}")), view(index, "InProgress"));
    }
    // Five shards finish their run every second for ten seconds.
    let mut sends: Vec<(i64, usize)> = Vec::new();
    for second in 1..=12 {
        if second <= 10 {
            for index in (second - 1) * 5..second * 5 {
                obs.invocations.insert(("c-1".into(), format!("i-{index}")), view(index as usize, "Success"));
            }
        }
        let at = now() + Duration::seconds(second as i64);
        let settings = settings();
        let (actions, next) =
            decide(&mut r, &obs, &Context { now: at, settings: &settings, bucket: "b", launch_grant: None });
        for action in &actions {
            if let Action::Send { request, .. } = action {
                sends.push((second as i64, request.instance_ids.len()));
                let id = format!("c-{}", sends.len() + 1);
                apply(&mut r, action, Ok(Done::Sent(id)), at);
            }
        }
        let held = r.shards.iter().filter_map(|s| s.current()).any(|a| a.phases.iter().any(|p| p.batch == 0));
        if let (true, Next::After(wait)) = (held, next) {
            assert!(wait as i64 <= COALESCE_SECONDS, "a held phase is looked at again within the window");
        }
    }
    let sent: usize = sends.iter().map(|(_, n)| n).sum();
    assert_eq!(sent, 50, "every shard's before_unmount was sent: {sends:?}");
    assert!(sends.len() <= 4, "ten arrivals, a few sends: {sends:?}");
    // The last ones go the moment nobody is behind them.
    assert_eq!(sends.last().map(|(second, _)| *second), Some(10), "{sends:?}");
}

/// One shard working on i-1, `phase` in flight as command c-1, which
/// has just finished with `status`, `exit_code` and `stderr`.
fn finished_step(
    extra: serde_json::Value,
    phase: Phase,
    status: &str,
    exit_code: i32,
    stderr: &str,
) -> (JobRecord, Observation) {
    let mut r = record(extra);
    let attempt = r.shards[0].current_mut().expect("attempt");
    attempt.stage = Stage::Working;
    attempt.instance_id = Some("i-1".into());
    attempt.launch_token = Some("t".into());
    attempt.launched_at = Some(now());
    attempt.phases.push(PhaseRun {
        phase,
        batch: 1,
        opened_at: Some(now()),
        status: None,
        exit_code: None,
        finished_at: None,
    });
    r.commands.insert(
        1,
        CommandBatch {
            phase,
            command_id: Some("c-1".into()),
            dispatched_at: now(),
            listed_at: None,
            in_flight_until: None,
        },
    );
    let mut obs = Observation::default();
    obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
    obs.invocations.insert(
        ("c-1".into(), "i-1".into()),
        InvocationView {
            instance_id: "i-1".into(),
            status: status.into(),
            exit_code: Some(exit_code),
            stdout: String::new(),
            stderr: stderr.into(),
            output_uri: None,
        },
    );
    (r, obs)
}

/// The step guard's reserved code (an earlier delivery died mid-step)
/// is a lost instance, retried as one, never the step's own failure.
#[test]
fn the_guards_reserved_code_is_read_as_lost() {
    let lost = format!("{}: an earlier delivery of run started here and never finished", shell::LOST_MARKER);
    let extra = serde_json::json!({"fleet": {"count": 1}, "volumes": []});
    let (mut r, mut obs) = finished_step(extra, Phase::Run, "Failed", shell::LOST_EXIT_CODE, &lost);
    let mut own = r.clone();
    run(&mut r, &obs, now() + Duration::seconds(5));
    let first = &r.shards[0].attempts[0];
    assert_eq!(first.end.as_ref().map(|e| e.cause), Some(EndCause::InstanceLost), "{first:?}");
    // A step that exits 237 itself (no guard marker) failed on its own.
    if let Some(view) = obs.invocations.get_mut(&("c-1".to_string(), "i-1".to_string())) {
        view.stderr = String::new();
    }
    run(&mut own, &obs, now() + Duration::seconds(5));
    let first = &own.shards[0].attempts[0];
    assert_eq!(first.end.as_ref().map(|e| e.cause), Some(EndCause::CommandFailed), "{first:?}");
}

/// A send decided in an earlier pass whose answer never came, and that
/// ListCommands does not show: no new send until the takeover rule's
/// window ends (it may still land), then one that looks first; one
/// that shows is adopted; one AWS refused (throttled) is sent again at once.
#[test]
fn a_send_not_found_is_sent_again_only_after_it_cannot_land_unseen() {
    let extra = serde_json::json!({"fleet": {"count": 1}, "volumes": []});
    let (mut r, mut obs) = finished_step(extra, Phase::Run, "Success", 0, "");
    obs.invocations.clear();
    let decided = now();
    if let Some(batch) = r.commands.get_mut(&1) {
        batch.command_id = None;
        batch.in_flight_until = Some(fence::in_flight_until(decided, settings().pass_budget_seconds));
    }
    let sends = |actions: &[Action]| actions.iter().filter(|a| matches!(a, Action::Send { .. })).count();
    let window = fence::in_flight_until(decided, settings().pass_budget_seconds);
    let mut early = r.clone();
    assert_eq!(sends(&run(&mut early, &obs, window - Duration::seconds(1))), 0, "maybe in flight");
    let mut late = r.clone();
    let actions = run(&mut late, &obs, window);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Send { look_first: true, .. })),
        "after the window, sent again, looking first: {actions:?}"
    );
    let mut found = r.clone();
    obs.sent.insert(1, "c-9".into());
    assert_eq!(sends(&run(&mut found, &obs, decided + Duration::seconds(20))), 0);
    assert_eq!(found.commands[&1].command_id.as_deref(), Some("c-9"), "adopted");
    obs.sent.clear();
    let mut refused = r.clone();
    let send = run(&mut r.clone(), &obs, window).into_iter().find(|a| matches!(a, Action::Send { .. }));
    let throttled = CloudError::api("ssm", "SendCommand", "ThrottlingException", "Rate exceeded");
    apply(&mut refused, &send.expect("send"), Err(throttled), decided + Duration::seconds(1));
    assert_eq!(sends(&run(&mut refused, &obs, decided + Duration::seconds(20))), 1, "refused: sent again at once");
}

/// A cancel while the run's send may still land (its answer lost, and
/// ListCommands not showing it yet): the run stays open, so no cleanup
/// runs beside it; found, it is cancelled; once it cannot land, it is
/// closed as cancelled.
#[test]
fn a_stopping_job_never_cleans_up_beside_a_send_that_may_land() {
    let extra = serde_json::json!({"fleet": {"count": 1}, "volumes": []});
    let (mut r, mut obs) = finished_step(extra, Phase::Run, "Success", 0, "");
    obs.invocations.clear();
    let budget = settings().pass_budget_seconds;
    if let Some(batch) = r.commands.get_mut(&1) {
        batch.command_id = None;
        batch.in_flight_until = Some(fence::in_flight_until(now(), budget));
    }
    r.cancel_requested = true;
    r.cancel_requested_at = Some(now());
    let open =
        |r: &JobRecord| r.shards[0].attempts[0].phases.iter().any(|p| p.phase == Phase::Run && p.status.is_none());
    let cleanup =
        |actions: &[Action]| actions.iter().any(|a| matches!(a, Action::Send { .. } | Action::Terminate { .. }));
    let mut waiting = r.clone();
    let actions = run(&mut waiting, &obs, now() + Duration::seconds(30));
    assert!(open(&waiting) && !cleanup(&actions), "held open: {actions:?}");
    let mut found = r.clone();
    obs.sent.insert(1, "c-7".into());
    let actions = run(&mut found, &obs, now() + Duration::seconds(40));
    assert!(
        actions.iter().any(|a| matches!(a, Action::Cancel { command_id, .. } if command_id == "c-7")),
        "found: cancelled: {actions:?}"
    );
    obs.sent.clear();
    let mut gone = r.clone();
    run(&mut gone, &obs, fence::in_flight_until(now(), budget) + Duration::seconds(1));
    assert!(!open(&gone), "cannot land any more: closed");
}

/// An unmount that fails: the shard fails, its still-mounted volume is
/// snapshotted while attached (never good), and only then is the
/// instance terminated; nothing detaches it while mounted.
#[test]
fn a_failed_unmount_snapshots_while_attached_then_terminates() {
    let busy = "umount: /data: target is busy";
    let (mut r, mut obs) =
        finished_step(serde_json::json!({"fleet": {"count": 1}}), Phase::Unmount, "Failed", 32, busy);
    let attempt = r.shards[0].current_mut().expect("attempt");
    attempt.completed_phases = vec![Phase::Mount, Phase::Run];
    attempt.volumes.push(AttemptVolume {
        restored_from: None,
        name: "data".into(),
        token: "j-v1".into(),
        volume_id: Some("vol-1".into()),
        created: true,
        created_at: Some(now()),
        seen: true,
        snapshot: None,
        snapshot_failures: 0,
        deleted: false,
        kept: None,
    });
    obs.volumes.insert(
        "vol-1".into(),
        VolumeView {
            volume_id: "vol-1".into(),
            state: "in-use".into(),
            availability_zone: "us-east-1a".into(),
            attached_to: Some("i-1".into()),
            tags: BTreeMap::new(),
        },
    );
    let at = now() + Duration::seconds(5);
    let actions = run(&mut r, &obs, at);
    let snapshot = actions.iter().find(|a| matches!(a, Action::Snapshot { .. })).expect("a snapshot first");
    let Action::Snapshot { tags: snapshot_tags, volume_id, .. } = snapshot else { unreachable!() };
    assert_eq!(volume_id, "vol-1");
    assert_eq!(snapshot_tags.get(tags::KIND).map(String::as_str), Some(retention::kind::AFTER_FAILED_CLEANUP));
    assert!(!actions.iter().any(|a| matches!(a, Action::Terminate { .. })), "not before the snapshot: {actions:?}");
    apply(&mut r, snapshot, Ok(Done::Snapshotted("snap-1".into())), at);
    let actions = run(&mut r, &obs, at + Duration::seconds(1));
    assert!(actions.iter().any(|a| matches!(a, Action::Terminate { .. })), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Snapshot { .. })), "one snapshot: {actions:?}");
    let attempt = r.shards[0].current().expect("attempt");
    assert!(attempt.cleanup_failed.as_deref().is_some_and(|c| c.contains("unmount exited 32")), "{attempt:?}");
}

/// An agent silent while its instance works is forgiven when it comes
/// back, and replaced only after `agent_timeout_seconds` of silence.
#[test]
fn a_silent_agent_is_replaced_after_the_agent_timeout_and_forgiven_if_it_returns() {
    let mut r = record(serde_json::json!({"fleet": {"count": 1}, "volumes": []}));
    let attempt = r.shards[0].current_mut().expect("attempt");
    attempt.stage = Stage::Working;
    attempt.instance_id = Some("i-1".into());
    attempt.launch_token = Some("t".into());
    attempt.launched_at = Some(now());
    attempt.phases.push(PhaseRun {
        phase: Phase::Run,
        batch: 1,
        opened_at: Some(now()),
        status: None,
        exit_code: None,
        finished_at: None,
    });
    r.commands.insert(
        1,
        CommandBatch {
            phase: Phase::Run,
            command_id: Some("c-1".into()),
            dispatched_at: now(),
            listed_at: None,
            in_flight_until: None,
        },
    );
    let mut obs = Observation::default();
    obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
    obs.invocations.insert(
        ("c-1".into(), "i-1".into()),
        InvocationView {
            instance_id: "i-1".into(),
            status: "InProgress".into(),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            output_uri: None,
        },
    );
    obs.health_checked = true;
    obs.agents_checked.insert("i-1".into());
    let minutes = |m: i64| now() + Duration::minutes(m);
    let stage = |r: &JobRecord| r.shards[0].current().map(|a| a.stage);
    run(&mut r, &obs, minutes(1));
    run(&mut r, &obs, minutes(14));
    assert_eq!(stage(&r), Some(Stage::Working), "13 min of silence is not yet loss");
    obs.online.insert("i-1".into());
    run(&mut r, &obs, minutes(15));
    assert_eq!(r.shards[0].current().and_then(|a| a.agent_lost_since), None, "back Online: forgiven");
    obs.online.clear();
    run(&mut r, &obs, minutes(16));
    run(&mut r, &obs, minutes(30));
    assert_eq!(stage(&r), Some(Stage::Working), "the clock restarted at minute 16");
    let actions = run(&mut r, &obs, minutes(31));
    let attempt = r.shards[0].attempts[0].clone();
    assert_eq!(attempt.end.map(|e| e.cause), Some(EndCause::InstanceLost));
    assert!(
        actions.iter().any(|a| matches!(a, Action::Terminate { instance_ids } if instance_ids == &["i-1".to_string()])),
        "{actions:?}"
    );
    assert!(
        r.shards[0].trail.iter().any(|n| n.text.contains("stopped reporting for 900 s")),
        "{:?}",
        r.shards[0].trail
    );
}

/// Found by the simulator (seed 217 of `make chaos`): an agent away for a
/// few minutes while a step ran, back before the step was judged. SSM
/// reports such a step TimedOut, as it does one that ran too long; the
/// health check saw the agent away, so the instance failed, not the work:
/// the shard is retried, never failed for it.
#[test]
fn a_step_timed_out_while_its_agent_was_seen_away_is_the_instances_failure() {
    let mut r = record(serde_json::json!({"fleet": {"count": 1}, "volumes": []}));
    let attempt = r.shards[0].current_mut().expect("attempt");
    attempt.stage = Stage::Working;
    attempt.instance_id = Some("i-1".into());
    attempt.launch_token = Some("t".into());
    attempt.launched_at = Some(now());
    attempt.phases.push(PhaseRun {
        phase: Phase::Run,
        batch: 1,
        opened_at: Some(now()),
        status: None,
        exit_code: None,
        finished_at: None,
    });
    r.commands.insert(
        1,
        CommandBatch {
            phase: Phase::Run,
            command_id: Some("c-1".into()),
            dispatched_at: now(),
            listed_at: None,
            in_flight_until: None,
        },
    );
    let mut obs = Observation::default();
    obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
    let invocation = |status: &str, exit_code: Option<i32>| InvocationView {
        instance_id: "i-1".into(),
        status: status.into(),
        exit_code,
        stdout: String::new(),
        stderr: String::new(),
        output_uri: None,
    };
    obs.invocations.insert(("c-1".into(), "i-1".into()), invocation("InProgress", None));
    obs.health_checked = true;
    obs.agents_checked.insert("i-1".into());
    let minutes = |m: i64| now() + Duration::minutes(m);
    run(&mut r, &obs, minutes(2)); // the agent is away
    obs.online.insert("i-1".into());
    run(&mut r, &obs, minutes(4)); // and back
    obs.invocations.insert(("c-1".into(), "i-1".into()), invocation("TimedOut", Some(-1)));
    run(&mut r, &obs, minutes(6));
    let end = r.shards[0].attempts[0].end.clone().expect("ended");
    assert_eq!(end.cause, EndCause::InstanceLost, "{end:?}");
}

/// Found by the simulator (seed 1186): an attempt that fails on one volume
/// in `error` must not create its other volumes in the same pass; a
/// volume created then was found by the final sweep and deleted without
/// the snapshot its `always` policy asks for.
#[test]
fn an_attempt_that_fails_on_a_volume_creates_no_other_volume() {
    let mut r = record(serde_json::json!({"fleet": {"count": 1}, "volumes": [
        {"name": "a", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/a", "snapshot": "always"},
        {"name": "b", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdg", "mount_point": "/b"}
    ]}));
    let attempt = r.shards[0].current_mut().expect("attempt");
    attempt.stage = Stage::Attaching;
    attempt.instance_id = Some("i-1".into());
    attempt.availability_zone = Some("us-east-1a".into());
    attempt.launch_token = Some("t".into());
    attempt.launched_at = Some(now());
    attempt.volumes.push(AttemptVolume {
        restored_from: None,
        name: "b".into(),
        token: "j-v2".into(),
        volume_id: Some("vol-b".into()),
        created: true,
        created_at: Some(now()),
        seen: true,
        snapshot: None,
        snapshot_failures: 0,
        deleted: false,
        kept: None,
    });
    let mut obs = Observation::default();
    obs.instances.insert("i-1".into(), instance("i-1", "running", "t", 0));
    obs.volumes.insert(
        "vol-b".into(),
        VolumeView {
            volume_id: "vol-b".into(),
            state: "error".into(),
            availability_zone: "us-east-1a".into(),
            attached_to: None,
            tags: BTreeMap::new(),
        },
    );
    let actions = run(&mut r, &obs, now());
    assert!(!actions.iter().any(|a| matches!(a, Action::CreateVolume { .. })), "{actions:?}");
    assert_eq!(r.shards[0].attempts[0].end.as_ref().map(|e| e.cause), Some(EndCause::Permanent));
}

#[test]
fn retry_rules_match_like_aws_batch() {
    let strategy = RetryStrategy {
        attempts: 3,
        evaluate_on_exit: vec![
            ExitRule { on_exit_code: Some("13*".into()), on_reason: None, action: RetryAction::Retry },
            ExitRule { on_exit_code: None, on_reason: Some("Spot*".into()), action: RetryAction::Exit },
        ],
        attempt_timeout_seconds: None,
    };
    assert_eq!(retry_action(&strategy, EndCause::CommandFailed, Some(137)), RetryAction::Retry);
    assert_eq!(retry_action(&strategy, EndCause::CommandFailed, Some(1)), RetryAction::Exit);
    assert_eq!(retry_action(&strategy, EndCause::SpotInterruption, None), RetryAction::Exit);
    assert_eq!(retry_action(&strategy, EndCause::InstanceLost, None), RetryAction::Retry);
    let default = RetryStrategy::default();
    assert_eq!(retry_action(&default, EndCause::TimedOut, None), RetryAction::Exit);
    assert_eq!(retry_action(&default, EndCause::AgentNeverOnline, None), RetryAction::Retry);
}

#[test]
fn launch_options_put_spot_first_and_subnets_within_each_type() {
    let r = record(
        serde_json::json!({"market": "spot", "on_demand_fallback": true, "subnet_ids": ["subnet-0aaa1111", "subnet-0bbb2222"]}),
    );
    let options = launch_options(r.spec.as_ref().expect("spec"));
    let described: Vec<String> = options.iter().map(describe_option).collect();
    assert_eq!(described[0], "t3.micro spot in subnet-0aaa1111");
    assert_eq!(described[1], "t3.micro spot in subnet-0bbb2222");
    assert_eq!(described[2], "t3.small spot in subnet-0aaa1111");
    assert_eq!(options[4].market, Market::OnDemand);
    assert_eq!(options.len(), 8);
}
