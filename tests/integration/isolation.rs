//! Nobody crosses: what one submitter or one deployment may reach, on the
//! simulated cloud. Volumes and snapshots a job names need the opt-in tag;
//! two stacks in one account never adopt or reap each other's instances;
//! retention never prunes another submitter's snapshots; the deployment's
//! limits and secrets by reference.

use std::collections::BTreeMap;

use chrono::Duration;
use flotilla_shared::intake::{self, Intake};
use flotilla_shared::ports::{LaunchRequest, Ports};
use flotilla_shared::reaper::{self, ReaperSettings};
use flotilla_shared::reconcile::{self, decide::client_token};
use flotilla_shared::record::{JobRecord, JobState};
use flotilla_shared::settings::Settings;
use flotilla_shared::spec::Market;
use flotilla_shared::tags;
use flotilla_testkit::fake::{FakeCloud, FakeInstance, FakeSnapshot, FakeVolume};
use flotilla_testkit::sim;
use serde_json::json;

use crate::moto::job;

fn settings(stack: &str) -> Settings {
    Settings { stack: stack.to_string(), ..sim::settings() }
}

async fn drive(cloud: &FakeCloud, ports: &Ports, job_id: &str) -> JobRecord {
    let mut handled = 0;
    while let Some(message) = cloud.next_message() {
        handled += 1;
        assert!(handled < 20_000, "runaway message loop");
        if reconcile::reconcile(ports, &message, Duration::seconds(50)).await.is_err() {
            cloud.redeliver_later(message, 150);
        }
        if cloud.record(job_id).is_some_and(|r| r.state.is_terminal()) {
            break;
        }
    }
    cloud.record(job_id).expect("record")
}

fn mutating_calls(cloud: &FakeCloud) -> u64 {
    let state = cloud.lock();
    ["RunInstances", "CreateVolume", "AttachVolume", "CreateSnapshot", "SendCommand"]
        .iter()
        .map(|op| state.calls.get(op).copied().unwrap_or(0))
        .sum()
}

fn user_volume(cloud: &FakeCloud, id: &str, opt_in: Option<&str>) {
    let now = sim::start_time();
    let tags: BTreeMap<String, String> =
        opt_in.map(|stack| BTreeMap::from([(tags::ALLOW.to_string(), stack.to_string())])).unwrap_or_default();
    cloud.lock().volumes.push(FakeVolume {
        id: id.into(),
        state: "available".into(),
        az: "us-east-1a".into(),
        attached_to: None,
        available_at: now,
        visible_at: now,
        tags,
        snapshot_id: None,
        fails: false,
        detached_at: None,
        mounted: false,
        detach_waiting: false,
    });
}

fn user_snapshot(cloud: &FakeCloud, id: &str, opt_in: Option<&str>) {
    let now = sim::start_time();
    let tags: BTreeMap<String, String> =
        opt_in.map(|stack| BTreeMap::from([(tags::ALLOW.to_string(), stack.to_string())])).unwrap_or_default();
    cloud.lock().snapshots.push(FakeSnapshot {
        id: id.into(),
        volume_id: "vol-00000000".into(),
        started_at: now - Duration::days(1),
        completes_at: now - Duration::days(1),
        fails: false,
        tags,
        listed_at: now - Duration::days(1),
    });
}

fn with_source(id: &str, source: serde_json::Value) -> serde_json::Value {
    let mut spec = job(id);
    spec["fleet"] = json!({"count": 1});
    spec["volumes"] =
        json!([{"name": "data", "source": source, "device": "/dev/sdf", "mount_point": "/data", "snapshot": "never"}]);
    spec
}

/// A volume or snapshot without `flotilla:allow=<this stack>` is REJECTED at
/// intake with the field and the tag to add, and nothing is created; one
/// that carries it (for this stack, not another) runs.
#[tokio::test]
async fn sources_without_the_opt_in_tag_are_rejected_and_create_nothing() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(settings("prod"));
    user_volume(&cloud, "vol-0000000000000000a", None);
    user_volume(&cloud, "vol-0000000000000000b", Some("staging"));
    user_snapshot(&cloud, "snap-0000000000000000c", None);
    let cases = [
        (
            "no-tag-vol",
            json!({"volume_id": "vol-0000000000000000a"}),
            "volumes[0].source.volume_id: vol-0000000000000000a lacks the opt-in tag flotilla:allow=prod",
        ),
        ("other-stack-vol", json!({"volume_id": "vol-0000000000000000b"}), "lacks the opt-in tag flotilla:allow=prod"),
        (
            "no-tag-snap",
            json!({"snapshot_id": "snap-0000000000000000c"}),
            "volumes[0].source.snapshot_id: snap-0000000000000000c lacks the opt-in tag",
        ),
        ("absent-snap", json!({"snapshot_id": "snap-0000000000000000d"}), "snap-0000000000000000d does not exist"),
        ("absent-vol", json!({"volume_id": "vol-0000000000000000e"}), "vol-0000000000000000e does not exist"),
    ];
    for (id, source, reason) in cases {
        let outcome = intake::submit(&ports, &with_source(id, source).to_string(), "m", None).await.expect("intake");
        assert!(matches!(&outcome, Intake::Rejected { reason: r, .. } if r.contains(reason)), "{id}: {outcome:?}");
        let record = cloud.record(id).expect("a record the user can read");
        assert_eq!(record.state, JobState::Rejected);
        assert!(record.reason.contains(reason), "{}", record.reason);
    }
    assert_eq!(mutating_calls(&cloud), 0, "a rejected job creates nothing");
    assert!(cloud.next_message().is_none(), "and wakes nothing");

    // Opted in for this stack: the job runs.
    user_volume(&cloud, "vol-0000000000000000f", Some("prod"));
    let spec = with_source("tagged-vol", json!({"volume_id": "vol-0000000000000000f"}));
    intake::submit(&ports, &spec.to_string(), "m", None).await.expect("intake");
    let record = drive(&cloud, &ports, "tagged-vol").await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
}

fn foreign_instance(cloud: &FakeCloud, id: &str, stack: &str, job_id: &str) {
    let now = sim::start_time();
    cloud.lock().instances.push(FakeInstance {
        id: id.into(),
        state: "running".into(),
        az: "us-east-1a".into(),
        instance_type: "t3.micro".into(),
        market: Market::OnDemand,
        tags: BTreeMap::from([
            (tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string()),
            (tags::STACK.to_string(), stack.to_string()),
            (tags::JOB_ID.to_string(), job_id.to_string()),
            (tags::EXPIRES_AT.to_string(), (now + Duration::days(1)).to_rfc3339()),
        ]),
        launched_at: now,
        running_at: now,
        online_at: Some(now),
        terminated_at: None,
        shutting_down_at: None,
        launch_index: 0,
        visible_at: now,
        agent_lost_at: None,
        impaired_at: None,
        agent_away: None,
    });
}

/// Two deployments in one account and Region, and a job id both use. Stack
/// `b` launched first, exactly as `a`'s job will (EC2 scopes ClientTokens to
/// the account, so a token without the stack in it would hand `a` `b`'s
/// instance). `a`'s job never adopts it, and `a`'s reaper, for which that job
/// has ended, never marks or terminates it. `a`'s own orphan it does reap.
#[tokio::test]
async fn two_stacks_never_adopt_or_reap_each_others_instances() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(settings("a"));
    let b = cloud.ports(settings("b"));
    let image = b.cloud.fleet.resolve_image(job("nightly")["image"].as_str().expect("image")).await.expect("image");
    let b_tags = BTreeMap::from([
        (tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string()),
        (tags::STACK.to_string(), "b".to_string()),
        (tags::JOB_ID.to_string(), "nightly".to_string()),
        (tags::EXPIRES_AT.to_string(), (sim::start_time() + Duration::days(1)).to_rfc3339()),
    ]);
    let launched = b
        .cloud
        .fleet
        .launch(&LaunchRequest {
            job_id: "nightly".into(),
            count: 1,
            instance_type: "t3.micro".into(),
            image_id: Some(image),
            launch_template_id: None,
            launch_template_name: None,
            launch_template_version: None,
            subnet_id: None,
            security_group_ids: vec![],
            instance_profile: b.settings.worker_instance_profile.clone(),
            market: Market::OnDemand,
            tags: b_tags,
            client_token: client_token("b", "nightly", 'l', 1),
        })
        .await
        .expect("b launches");
    let b_instance = launched[0].instance_id.clone();
    foreign_instance(&cloud, "i-0a0000000000000002", "a", "gone-job");
    let mut spec = job("nightly");
    spec["fleet"] = json!({"count": 1});
    intake::submit(&ports, &spec.to_string(), "m", None).await.expect("intake");
    let record = drive(&cloud, &ports, "nightly").await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    assert!(!record.instance_ids().contains(&b_instance), "a adopted b's instance");

    let reaper_settings = ReaperSettings { mark_grace: Duration::zero(), stall_grace: Duration::minutes(30) };
    for _ in 0..2 {
        reaper::run(&ports, &reaper_settings, false).await.expect("reaper");
    }
    let state = cloud.lock();
    let theirs = state.instances.iter().find(|i| i.id == b_instance).expect("b's instance");
    assert_eq!(theirs.state, "running", "stack a terminated b's instance");
    assert!(!theirs.tags.contains_key(tags::ORPHANED_AT), "a's reaper marked b's instance");
    let own = state.instances.iter().find(|i| i.id == "i-0a0000000000000002").expect("a's orphan");
    assert_ne!(own.state, "running", "a's own orphan is reaped");
}

fn snapshots_of(cloud: &FakeCloud, job_id: &str) -> Vec<String> {
    let state = cloud.lock();
    state
        .snapshots
        .iter()
        .filter(|s| s.tags.get(tags::JOB_ID).is_some_and(|j| j == job_id))
        .map(|s| s.id.clone())
        .collect()
}

/// One job can no longer delete another submitter's snapshots by reusing
/// its name with `keep_last: 1`: the lineage is the submitter's (the SQS
/// SenderId intake records). The same submitter's next run still prunes.
#[tokio::test]
async fn retention_never_prunes_another_submitters_snapshots() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(settings("prod"));
    let spec = |id: &str| {
        let mut spec = job(id);
        spec["name"] = json!("nightly");
        spec["fleet"] = json!({"count": 1});
        spec["volumes"][0]["retention"] = json!({"keep_last": 1, "max_age_days": 1});
        spec
    };
    let run = |id: &'static str, sender: &'static str| {
        let (cloud, ports) = (&cloud, &ports);
        async move {
            let body = spec(id).to_string();
            intake::submit(ports, &body, "m", Some(sender)).await.expect("intake");
            let record = drive(cloud, ports, id).await;
            assert_eq!(record.state, JobState::Succeeded, "{id}: {}", record.reason);
            assert_eq!(record.submitted_by.as_deref(), Some(sender));
            record
        }
    };
    // A role submits under a new session name each run: still one submitter.
    run("alice-1", "AROAALICE:run-1").await;
    let alices = snapshots_of(&cloud, "alice-1");
    assert_eq!(alices.len(), 1);
    assert_eq!(
        cloud.lock().snapshots[0].tags.get(tags::SUBMITTER).map(String::as_str),
        Some("AROAALICE"),
        "the lineage names its submitter, not the session"
    );
    let mallory = run("mallory-1", "AROAMALLORY:run-1").await;
    assert!(mallory.pruned_snapshots.is_empty(), "{:?}", mallory.pruned_snapshots);
    assert_eq!(snapshots_of(&cloud, "alice-1"), alices, "another submitter's run pruned alice's snapshot");
    // Alice's own next run prunes her older snapshot, as retention says.
    let alice = run("alice-2", "AROAALICE:run-2").await;
    assert_eq!(alice.pruned_snapshots, alices);
    assert!(snapshots_of(&cloud, "alice-1").is_empty());
    assert_eq!(snapshots_of(&cloud, "mallory-1").len(), 1);
}

/// The deployment's limits (template parameters) reject with the limit in
/// the reason, before anything is created.
#[tokio::test]
async fn deployment_limits_reject_with_the_limit() {
    let cloud = FakeCloud::new(sim::start_time());
    let mut limited = settings("prod");
    limited.limits.max_instances_per_job = Some(4);
    limited.limits.max_deadline_minutes = Some(60);
    limited.limits.allowed_instance_types = vec!["c7g.*".into(), "t3.micro".into()];
    let ports = cloud.ports(limited);
    let mut too_many = job("too-many");
    too_many["fleet"] = json!({"count": 5});
    too_many["instance_types"] = json!(["t3.micro"]);
    let mut too_long = job("too-long");
    too_long["deadline_minutes"] = json!(61);
    let mut wrong_type = job("wrong-type");
    wrong_type["instance_types"] = json!(["c7g.large", "p5.48xlarge"]);
    let cases = [
        (too_many, "fleet: 5 instances, but this deployment allows at most 4 per job"),
        (too_long, "deadline_minutes: 61, but this deployment allows at most 60"),
        (wrong_type, "instance_types[1]: `p5.48xlarge` is not allowed here (allowed: c7g.*, t3.micro)"),
    ];
    for (spec, reason) in cases {
        let outcome = intake::submit(&ports, &spec.to_string(), "m", None).await.expect("intake");
        assert!(matches!(&outcome, Intake::Rejected { reason: r, .. } if r == reason), "{outcome:?}");
    }
    assert_eq!(mutating_calls(&cloud), 0);
    let mut fits = job("fits");
    fits["fleet"] = json!({"count": 4});
    let outcome = intake::submit(&ports, &fits.to_string(), "m", None).await.expect("intake");
    assert!(matches!(outcome, Intake::Accepted { .. }), "{outcome:?}");

    // The cap across running jobs: 4 are held, 6 allowed.
    let mut capped = settings("prod");
    capped.limits.max_instances_total = Some(6);
    let ports = cloud.ports(capped);
    let mut three = job("three");
    three["fleet"] = json!({"count": 3});
    let outcome = intake::submit(&ports, &three.to_string(), "m", None).await.expect("intake");
    let reason = "fleet: 3 instances, but running jobs hold 4 of this deployment's 6; submit again later";
    assert!(matches!(&outcome, Intake::Rejected { reason: r, .. } if r == reason), "{outcome:?}");
    let mut two = job("two");
    two["fleet"] = json!({"count": 2});
    let outcome = intake::submit(&ports, &two.to_string(), "m", None).await.expect("intake");
    assert!(matches!(outcome, Intake::Accepted { .. }), "{outcome:?}");
}

/// A secret by reference: the record and every SendCommand carry only its
/// name; the value never leaves where it is kept.
#[tokio::test]
async fn secrets_travel_by_reference_only() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(settings("prod"));
    let mut spec = job("with-secret");
    spec["fleet"] = json!({"count": 1});
    spec["env"] = json!({
        "DB_PASSWORD": {"from_ssm": "/flotilla/prod/db-password"},
        "API_KEY": {"from_secrets_manager": "arn:aws:secretsmanager:us-east-1:123456789012:secret:flotilla/prod/api-key-AbCdEf"},
        "PLAIN": "visible"
    });
    intake::submit(&ports, &spec.to_string(), "m", None).await.expect("intake");
    let record = drive(&cloud, &ports, "with-secret").await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let stored = serde_json::to_string(&record).expect("json");
    assert!(stored.contains(r#""DB_PASSWORD":{"from_ssm":"/flotilla/prod/db-password"}"#), "{stored}");
    let script = {
        let state = cloud.lock();
        let run = state.commands.iter().find(|c| c.request.comment.contains(" run ")).expect("the run command");
        run.request.lines.join("\n")
    };
    assert!(script.contains("DB_PASSWORD=$(aws ssm get-parameter"), "{script}");
    assert!(script
        .contains("--secret-id arn:aws:secretsmanager:us-east-1:123456789012:secret:flotilla/prod/api-key-AbCdEf"));
    assert!(script.contains("export PLAIN=visible"));

    // Outside the stack's namespace the worker role could never read it.
    let mut outside = job("outside-secret");
    outside["env"] = json!({"DB": {"from_ssm": "/prod/db-password"}});
    let outcome = intake::submit(&ports, &outside.to_string(), "m", None).await.expect("intake");
    assert!(
        matches!(&outcome, Intake::Rejected { reason, .. } if reason.starts_with("env.DB.from_ssm: the worker role reads only parameters under /flotilla/prod/")),
        "{outcome:?}"
    );
    // A secret in another account or Region than the deployment's: refused too.
    let mut placed = settings("prod");
    placed.account_id = Some("123456789012".into());
    placed.region = Some("us-east-1".into());
    let placed_ports = cloud.ports(placed);
    let mut elsewhere = job("secret-elsewhere");
    elsewhere["env"] = json!({"API": {"from_secrets_manager": "arn:aws:secretsmanager:eu-west-1:999999999999:secret:flotilla/prod/x"}});
    let outcome = intake::submit(&placed_ports, &elsewhere.to_string(), "m", None).await.expect("intake");
    assert!(
        matches!(&outcome, Intake::Rejected { reason, .. } if reason.contains("in this deployment's account and Region")),
        "{outcome:?}"
    );
    // With its own instance profile, that role's policy decides.
    outside["id"] = json!("own-profile-secret");
    outside["instance_profile"] = json!("analytics-workers");
    let outcome = intake::submit(&ports, &outside.to_string(), "m", None).await.expect("intake");
    assert!(matches!(outcome, Intake::Accepted { .. }), "{outcome:?}");
}

/// The most tags Flotilla puts on any resource, with the most user tags a
/// spec may give (35), stays within EC2's 50 with room for the reaper's mark
/// (the fake refuses a 51st tag, as EC2 does).
#[tokio::test]
async fn the_largest_tag_set_fits_ec2s_limit() {
    let cloud = FakeCloud::new(sim::start_time());
    let ports = cloud.ports(settings("prod"));
    let mut spec = job("many-tags");
    spec["fleet"] = json!({"count": 1});
    let most_user_tags = flotilla_shared::spec::MAX_USER_TAGS;
    spec["tags"] = json!((0..most_user_tags).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>());
    spec["volumes"] = json!([
        {"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data", "snapshot": "always"},
        {"name": "tmp", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdg", "mount_point": "/tmp-data", "snapshot": "never"}
    ]);
    intake::submit(&ports, &spec.to_string(), "m", Some("AROAEXAMPLE:session")).await.expect("intake");
    let record = drive(&cloud, &ports, "many-tags").await;
    assert_eq!(record.state, JobState::Succeeded, "{}", record.reason);
    let state = cloud.lock();
    let most = state
        .instances
        .iter()
        .map(|i| i.tags.len())
        .chain(state.volumes.iter().map(|v| v.tags.len()))
        .chain(state.snapshots.iter().map(|s| s.tags.len()))
        .max()
        .expect("resources");
    // The reaper adds its mark to an orphan; its snapshot of one keeps the
    // volume's tags less two and adds two.
    assert!(most < 50, "{most} tags on one resource leave no room for the reaper's mark");
}

/// The account a `role_arn` job runs in, as the reaper reaches it.
struct TargetAccount {
    cloud: std::sync::Arc<flotilla_shared::ports::Cloud>,
}

#[async_trait::async_trait]
impl flotilla_shared::ports::Accounts for TargetAccount {
    async fn assume(
        &self,
        _role_arn: &str,
        _external_id: Option<&str>,
        _job_id: &str,
    ) -> flotilla_shared::ports::CloudResult<std::sync::Arc<flotilla_shared::ports::Cloud>> {
        Ok(self.cloud.clone())
    }
}

/// Orphans in a `role_arn` target account (here an instance of a job that
/// ended) are reaped there when the deployment names that account's role
/// (`ReaperTargetRoleArns`), marked first as here; without it, left alone.
/// What this ledger never heard of is left too: it may be a deployment of
/// the same name that lives in that account. Each account is reaped once
/// per pass, and the home account never twice.
#[tokio::test]
async fn the_reaper_reaps_orphans_in_target_accounts_it_is_given() {
    let here = FakeCloud::new(sim::start_time());
    let there = FakeCloud::new(sim::start_time());
    let mut ports = here.ports(settings("prod"));
    let spec = flotilla_shared::spec::parse(&job("ended-job").to_string()).expect("spec");
    let plan = flotilla_shared::plan::plan(&spec, &flotilla_shared::plan::Prices::builtin()).expect("plan");
    let mut ended = JobRecord::new("ended-job".into(), spec, plan, sim::start_time());
    ended.state = JobState::Failed;
    ports.ledger.create(&ended).await.expect("record");
    foreign_instance(&there, "i-0c0000000000000003", "prod", "ended-job");
    foreign_instance(&there, "i-0c0000000000000004", "staging", "ended-job");
    foreign_instance(&there, "i-0c0000000000000005", "prod", "their-own-job");
    ports.accounts = Box::new(TargetAccount { cloud: std::sync::Arc::new(there.ports(settings("prod")).cloud) });
    let reaper_settings = ReaperSettings { mark_grace: Duration::zero(), stall_grace: Duration::minutes(30) };
    let state_of = |id: &str| there.lock().instances.iter().find(|i| i.id == id).map(|i| i.state.clone());

    for _ in 0..2 {
        reaper::run(&ports, &reaper_settings, false).await.expect("reaper");
    }
    assert_eq!(state_of("i-0c0000000000000003").as_deref(), Some("running"), "not given that account");

    ports.settings.account_id = Some("111111111111".into());
    ports.settings.reaper_roles = vec![
        "arn:aws:iam::222222222222:role/flotilla-target-prod".into(),
        "arn:aws:iam::222222222222:role/flotilla-target-other".into(),
        "arn:aws:iam::111111111111:role/flotilla-target-home".into(),
    ];
    let first = reaper::run(&ports, &reaper_settings, false).await.expect("reaper");
    assert_eq!(state_of("i-0c0000000000000003").as_deref(), Some("running"), "marked first: {first}");
    assert!(there.lock().instances.iter().any(|i| i.tags.contains_key(tags::ORPHANED_AT)));
    assert_eq!(first["planned"], 1, "one mark, planned once though two roles name that account: {first}");
    let report: serde_json::Value = serde_json::from_slice(
        &ports.ledger.get(first["report"].as_str().expect("key")).await.expect("get").expect("report"),
    )
    .expect("json");
    assert_eq!(report["planned"][0]["account"], "arn:aws:iam::222222222222:role/flotilla-target-prod", "{report:#}");
    let skipped = report["errors"].as_array().expect("errors").len();
    assert_eq!(skipped, 2, "the second role of 222222222222 and the home account are skipped: {report:#}");
    reaper::run(&ports, &reaper_settings, false).await.expect("reaper");
    assert_ne!(state_of("i-0c0000000000000003").as_deref(), Some("running"), "reaped in the target account");
    assert_eq!(state_of("i-0c0000000000000004").as_deref(), Some("running"), "another stack's, there too");
    assert_eq!(state_of("i-0c0000000000000005").as_deref(), Some("running"), "a job this ledger never knew");
}

/// A debug hold tags only what the job created: the owner's opted-in
/// volume (a `volume_id` source) is held but never tagged, since the
/// reconcile role may tag only this stack's resources (one refused id
/// fails the whole CreateTags call).
#[tokio::test]
async fn a_debug_hold_never_tags_the_owners_volume() {
    let cloud = FakeCloud::new(sim::start_time()).with_behaviour(std::sync::Arc::new(|request, _| {
        (if request.comment.contains(" run ") { 3 } else { 0 }, String::new(), 5)
    }));
    let ports = cloud.ports(settings("prod"));
    user_volume(&cloud, "vol-0000000000000000f", Some("prod"));
    let mut spec = with_source("held-own", json!({"volume_id": "vol-0000000000000000f"}));
    spec["debug_hold_minutes"] = json!(30);
    intake::submit(&ports, &spec.to_string(), "m", None).await.expect("intake");
    let record = drive(&cloud, &ports, "held-own").await;
    assert_eq!(record.state, JobState::Failed, "{}", record.reason);
    let hold = record.hold.clone().expect("held");
    assert!(hold.volume_ids.contains(&"vol-0000000000000000f".to_string()), "the owner's volume is held");
    let state = cloud.lock();
    let own = state.volumes.iter().find(|v| v.id == "vol-0000000000000000f").expect("the owner's volume");
    assert!(!own.tags.contains_key(tags::HELD_UNTIL), "the owner's volume was tagged: {:?}", own.tags);
    let instance = state.instances.iter().find(|i| i.id == hold.instance_id).expect("held instance");
    assert!(instance.tags.contains_key(tags::HELD_UNTIL), "the instance is tagged");
}
