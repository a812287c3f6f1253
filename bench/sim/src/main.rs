//! `make bench`'s simulator figures, on virtual time with AWS's latencies
//! (5-18 s to running, 30 s to 6 min for an SSM agent) and EC2's request
//! token buckets in the fake cloud:
//!
//! - AWS calls per job for 1, 10, 100 and 1,000 instances against the floor;
//! - fifty 100-instance jobs at once in one account: launch rate, throttles,
//!   and the spread of their start times;
//! - orchestration overhead of a 1-hour job with and without events, and the
//!   idle time from an instance's last command to its termination;
//! - `pass N`: one reconcile decision over an N-shard record (for callgrind).
//!
//! Prints plain tables; `--json PATH` writes the figures too.
//! FLOTILLA_BENCH_BY_OP=1 adds calls by operation and deliveries by trigger;
//! FLOTILLA_BENCH_TIMELINE=1 every call of a `calls` job with its time;
//! FLOTILLA_BENCH_LAUNCHES=1 the fifty-job launches per 100 s.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use flotilla_shared::ports::{InstanceView, InvocationView, Ports};
use flotilla_shared::reconcile::decide::{decide, Context, Observation};
use flotilla_shared::record::{active_key, CommandBatch, JobRecord, Phase, PhaseRun, Stage};
use flotilla_shared::settings::Settings;
use flotilla_shared::{handlers, intake, own_cost, plan, reconcile};
use flotilla_testkit::fake::{ApiLimits, FakeCloud, Faults, Latencies};
use flotilla_testkit::sim;

/// As deployed: with events, a working job is polled every 2 minutes as a
/// safety net; without them, every 20 s.
fn settings(events: bool) -> Settings {
    Settings { safety_poll_seconds: events.then_some(120), launch_admission: true, ..sim::settings() }
}
use serde_json::{json, Value};

const RUN_SECONDS: i64 = 3600;

fn spec(id: &str, instances: u32, volumes: bool, run_seconds: i64) -> Value {
    let mut spec = json!({
        "id": id, "fleet": {"count": instances}, "instance_types": ["m7i.large"], "image": "ami-0abcdef1234567890",
        "setup": {"commands": [["true"]]}, "run": {"script": format!("sleep {run_seconds}")},
        "before_unmount": {"commands": [["sync"]]}, "deadline_minutes": 240
    });
    if volumes {
        spec["volumes"] = json!([{"name": "data", "source": {"new": {"size_gib": 8}}, "device": "/dev/sdf",
            "mount_point": "/data", "snapshot": "on-success"}]);
    }
    spec
}

/// A fault-free fake cloud with EC2's token buckets, commands that take 2 s
/// (3 s for volume operations) and `run_seconds` for the run. SSM lists a
/// new command (and EC2 a new snapshot) 0-60 s after it is made, as the
/// simulator draws it, unless `lag` is off.
fn cloud(seed: u64, events: bool, run_seconds: i64, lag: bool) -> FakeCloud {
    let realistic = Latencies::realistic();
    let lookup_lag = if lag { realistic.lookup_lag } else { (0, 0) };
    let latencies = Latencies { call_ms: (20, 120), lookup_lag, ..realistic };
    let cloud = FakeCloud::seeded(sim::start_time(), seed, latencies, Faults::default()).with_behaviour(
        std::sync::Arc::new(move |request, _| {
            if request.lines.iter().any(|l| l.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER)) {
                (0, String::new(), 3)
            } else if request.comment.contains(" run ") {
                (0, "done".into(), run_seconds)
            } else {
                (0, String::new(), 2)
            }
        }),
    );
    {
        let mut state = cloud.lock();
        state.limits = Some(ApiLimits::ec2());
        state.call_log = Some(Vec::new());
        state.events = events;
        // Events out on, as deployed: every transition is a notice.
        state.notices = Some(Vec::new());
    }
    cloud
}

/// Submit every spec, then deliver messages (and the 5-minute tick) until no
/// job is active.
/// Lambda invocations a drive made: reconcile deliveries and tick runs.
#[derive(Default)]
struct Invoked {
    deliveries: u64,
    ticks: u64,
}

async fn drive(cloud: &FakeCloud, ports: &Ports, specs: &[Value]) -> Vec<String> {
    drive_counted(cloud, ports, specs).await.0
}

async fn drive_counted(cloud: &FakeCloud, ports: &Ports, specs: &[Value]) -> (Vec<String>, Invoked) {
    let mut jobs = Vec::new();
    for spec in specs {
        let id = spec["id"].as_str().unwrap_or_default().to_string();
        intake::submit(ports, &spec.to_string(), &id, Some("AIDABENCH")).await.expect("intake");
        jobs.push(id);
    }
    let mut next_tick = cloud.now() + Duration::seconds(300);
    let budget = Duration::seconds(i64::from(ports.settings.pass_budget_seconds));
    let mut triggers: BTreeMap<String, u64> = BTreeMap::new();
    let mut invoked = Invoked::default();
    for _ in 0..5_000_000u64 {
        let active = {
            let state = cloud.lock();
            jobs.iter().any(|j| state.objects.contains_key(&active_key(j)))
        };
        if !active {
            break;
        }
        if cloud.next_due().is_none_or(|due| due > next_tick) {
            cloud.advance_to(next_tick);
            next_tick += Duration::seconds(300);
            invoked.ticks += 1;
            let _ = handlers::wake_active(ports).await;
            continue;
        }
        let Some(message) = cloud.next_message() else { continue };
        invoked.deliveries += 1;
        *triggers.entry(message.trigger.as_ref().map(|t| t.to_string()).unwrap_or_default()).or_default() += 1;
        if let Err(err) = reconcile::reconcile(ports, &message, budget).await {
            if err.is_retryable() {
                cloud.redeliver_later(message, 30);
            }
        }
    }
    if std::env::var("FLOTILLA_BENCH_BY_OP").is_ok() {
        eprintln!("deliveries by trigger: {triggers:?}");
    }
    (jobs, invoked)
}

const EC2_SSM: [&str; 18] = [
    "RunInstances",
    "TerminateInstances",
    "DescribeInstances",
    "DescribeInstanceStatus",
    "CreateVolume",
    "AttachVolume",
    "DetachVolume",
    "DeleteVolume",
    "DescribeVolumes",
    "CreateSnapshot",
    "DeleteSnapshot",
    "DescribeSnapshots",
    "CreateTags",
    "SendCommand",
    "ListCommands",
    "ListCommandInvocations",
    "DescribeInstanceInformation",
    "CancelCommand",
];

/// The fewest EC2 and SSM calls a fault-free job of `n` instances, one
/// volume each and five phases can make: every per-volume call, batched
/// launches, terminations and sends, and one look at each state change.
fn floor(n: u64, volumes: bool, phases: u64) -> u64 {
    let per = |size: u64| n.div_ceil(size);
    let mut floor = 2 * per(1000) // RunInstances, TerminateInstances
        + phases * per(50) // SendCommand
        + 2 * per(1000) // DescribeInstances: running, terminated
        + per(50) // DescribeInstanceInformation: agents Online
        + phases * per(50); // ListCommandInvocations: each phase done
    if volumes {
        // CreateVolume, AttachVolume, CreateSnapshot, DeleteVolume; volumes
        // seen available, in use and free; snapshots seen completed.
        floor += 4 * n + 3 * per(500) + per(1000);
    }
    floor
}

struct JobFigures {
    own: OwnFigures,
    calls: u64,
    ec2_ssm: u64,
    floor: u64,
    throttled: u64,
    passes: u64,
    makespan_s: f64,
}

async fn calls_per_job(n: u32) -> JobFigures {
    let cloud = cloud(u64::from(n), true, RUN_SECONDS, true);
    let ports = cloud.ports(settings(true));
    let (jobs, invoked) = drive_counted(&cloud, &ports, &[spec(&format!("calls-{n}"), n, true, RUN_SECONDS)]).await;
    let record = cloud.record(&jobs[0]).expect("record");
    assert!(record.state.is_terminal(), "calls-{n} ended {}", record.state);
    let state = cloud.lock();
    let ec2_ssm = EC2_SSM.iter().map(|op| state.calls.get(op).copied().unwrap_or(0)).sum();
    let throttled = state.limits.as_ref().map_or(0, |l| l.throttled.values().sum());
    if std::env::var("FLOTILLA_BENCH_BY_OP").is_ok() {
        eprintln!("calls-{n} by operation: {:?}", state.calls);
    }
    // Every EC2, SSM and SQS call with its second since submission: where
    // a job's calls go, for the next cut.
    if std::env::var("FLOTILLA_BENCH_TIMELINE").is_ok() {
        let start = record.submitted_at;
        for (at, op) in state.call_log.iter().flatten() {
            if EC2_SSM.contains(op) || *op == "SendMessage" {
                eprintln!("{:>8.1} {op}", (*at - start).num_milliseconds() as f64 / 1000.0);
            }
        }
    }
    let end = record.updated_at.unwrap_or(record.submitted_at);
    let own = own_figures(&state, &record, &invoked);
    JobFigures {
        own,
        calls: state.calls.values().sum(),
        ec2_ssm,
        floor: floor(u64::from(n), true, 5),
        throttled,
        passes: record.passes,
        makespan_s: (end - record.submitted_at).num_milliseconds() as f64 / 1000.0,
    }
}

/// Flotilla's own cost of one job, from the simulator's counters: every
/// call the job's functions made, priced by `own_cost`.
struct OwnFigures {
    usage: own_cost::Usage,
    cost: own_cost::OwnCost,
    /// The same job priced from its record alone, as the report does.
    from_record: f64,
}

/// Milliseconds assumed for an invocation that is not a reconcile pass
/// (intake, a tick, a notify batch): a few calls at the simulator's 20-120 ms.
const OTHER_INVOCATION_MS: u64 = 200;

fn own_figures(state: &flotilla_testkit::fake::FakeState, record: &JobRecord, invoked: &Invoked) -> OwnFigures {
    let count = |op: &str| state.calls.get(op).copied().unwrap_or(0);
    let batches = state.notices.as_ref().map_or(0, Vec::len) as u64;
    let events = state.notices.as_ref().map_or(0, |b| b.iter().map(|b| b.notices.len()).sum::<usize>()) as u64;
    let others = 1 + invoked.ticks + batches;
    let usage = own_cost::Usage {
        invocations: invoked.deliveries + others,
        // A pass's calls run one after another in the simulator, each 20-120
        // ms of virtual time: the record's busy time is their sum.
        busy_ms: record.busy_ms + others * OTHER_INVOCATION_MS,
        // Intake's own message, then every wake and notice batch sent.
        sqs_messages: 1 + count("SendMessage"),
        s3_writes: count("PutObject") + count("ListObjectsV2"),
        s3_reads: count("GetObject"),
        events,
    };
    let cost = own_cost::price(&usage);
    let from_record = own_cost::price(&own_cost::from_record(record)).total_usd;
    OwnFigures { usage, cost, from_record }
}

struct Fleetwide {
    instances: usize,
    launch_seconds: f64,
    rate: f64,
    throttled: BTreeMap<&'static str, u64>,
    spread_s: f64,
    all_succeeded: bool,
}

/// Fifty 100-instance jobs submitted together in one account.
async fn fifty_jobs() -> Fleetwide {
    let cloud = cloud(50, true, 300, true);
    let ports = cloud.ports(settings(true));
    let specs: Vec<Value> = (0..50).map(|i| spec(&format!("many-{i:02}"), 100, false, 300)).collect();
    let jobs = drive(&cloud, &ports, &specs).await;
    let all_succeeded =
        jobs.iter().all(|j| cloud.record(j).is_some_and(|r| r.state == flotilla_shared::record::JobState::Succeeded));
    let state = cloud.lock();
    let still_up = state.instances.iter().filter(|i| i.terminated_at.is_none()).count();
    if std::env::var("FLOTILLA_BENCH_BY_OP").is_ok() {
        eprintln!(
            "fifty jobs: {} instances, {still_up} never terminated, calls {:?}",
            state.instances.len(),
            state.calls
        );
    }
    let mut launches: Vec<DateTime<Utc>> = state.instances.iter().map(|i| i.launched_at).collect();
    launches.sort();
    let (first, last) = (launches[0], launches[launches.len() - 1]);
    if std::env::var("FLOTILLA_BENCH_LAUNCHES").is_ok() {
        let mut hist = std::collections::BTreeMap::new();
        for l in &launches {
            *hist.entry((*l - first).num_seconds() / 100).or_insert(0) += 1;
        }
        eprintln!("launches per 100 s: {hist:?}");
    }
    let launch_seconds = (last - first).num_milliseconds() as f64 / 1000.0;
    // Beyond the 1,000-instance burst, the bucket refills 2 a second.
    let rate = (launches.len().saturating_sub(1000)) as f64 / launch_seconds.max(1.0);
    // When each job had its whole fleet: the spread of those moments.
    let mut ready: Vec<DateTime<Utc>> = jobs
        .iter()
        .filter_map(|job| {
            state.instances.iter().filter(|i| i.tags.get("flotilla:job-id") == Some(job)).map(|i| i.launched_at).max()
        })
        .collect();
    ready.sort();
    let spread_s = ready.last().zip(ready.first()).map_or(0.0, |(l, f)| (*l - *f).num_milliseconds() as f64 / 1000.0);
    Fleetwide {
        instances: launches.len(),
        launch_seconds,
        rate,
        throttled: state.limits.as_ref().map(|l| l.throttled.clone()).unwrap_or_default(),
        spread_s,
        all_succeeded,
    }
}

struct Overhead {
    makespan_s: f64,
    floor_s: f64,
    idle_max_s: f64,
    idle_mean_s: f64,
}

/// A 10-instance, 1-hour job without volumes: makespan (submission to the
/// last instance shutting down, when billing stops) minus the physical
/// floor (the slowest agent Online, then setup 2 s, run 1 h, before_unmount
/// 2 s, and one terminate call). With `lag`, each command's end is seen
/// only once SSM lists the command, so the idle time includes that lag.
async fn overhead(events: bool, lag: bool) -> Overhead {
    let cloud = cloud(10, events, RUN_SECONDS, lag);
    let ports = cloud.ports(settings(events));
    let jobs = drive(&cloud, &ports, &[spec("overhead", 10, false, RUN_SECONDS)]).await;
    let record = cloud.record(&jobs[0]).expect("record");
    let state = cloud.lock();
    let submitted = record.submitted_at;
    let ready = state.instances.iter().filter_map(|i| i.online_at).max().expect("agents");
    let stopped = state.instances.iter().filter_map(|i| i.shutting_down_at).max().expect("terminated");
    let floor_s = (ready - submitted).num_milliseconds() as f64 / 1000.0 + 2.0 + RUN_SECONDS as f64 + 2.0 + 0.1;
    let mut idle = Vec::new();
    for instance in &state.instances {
        let last_done = state.commands.iter().filter_map(|c| c.runs.get(&instance.id)).map(|r| r.finishes_at).max();
        if let (Some(done), Some(down)) = (last_done, instance.shutting_down_at) {
            idle.push((down - done).num_milliseconds() as f64 / 1000.0);
        }
    }
    Overhead {
        makespan_s: (stopped - submitted).num_milliseconds() as f64 / 1000.0,
        floor_s,
        idle_max_s: idle.iter().cloned().fold(0.0, f64::max),
        idle_mean_s: idle.iter().sum::<f64>() / idle.len().max(1) as f64,
    }
}

/// One decision over an N-shard job whose run is in flight, with the
/// record's load and save (what a pass spends besides waiting on AWS).
fn one_pass(n: u32, decide_it: bool) -> usize {
    let spec_value = spec("pass", n, true, RUN_SECONDS);
    let job: flotilla_shared::spec::JobSpec = serde_json::from_value(spec_value).expect("spec");
    let planned = plan::plan(&job, &plan::Prices::builtin()).expect("plan");
    let now = sim::start_time();
    let mut record = JobRecord::new("pass".into(), job, planned, now);
    let mut obs = Observation::default();
    let batch_of = |index: usize| 1 + (index / 50) as u64;
    for (index, shard) in record.shards.iter_mut().enumerate() {
        let id = format!("i-{index:017x}");
        let attempt = shard.current_mut().expect("attempt");
        attempt.stage = Stage::Working;
        attempt.instance_id = Some(id.clone());
        attempt.launch_token = Some("token".into());
        attempt.launched_at = Some(now);
        attempt.completed_phases = vec![Phase::Mount, Phase::Setup];
        attempt.phases.push(PhaseRun {
            phase: Phase::Run,
            batch: batch_of(index),
            opened_at: Some(now),
            status: None,
            exit_code: None,
            finished_at: None,
        });
        obs.instances.insert(
            id.clone(),
            InstanceView {
                instance_id: id.clone(),
                state: "running".into(),
                availability_zone: "us-east-1a".into(),
                launch_index: index as u32,
                job_id: Some("pass".into()),
                launch_token: Some("token".into()),
                tags: BTreeMap::new(),
            },
        );
        let command_id = format!("cmd-{}", batch_of(index));
        obs.invocations.insert(
            (command_id, id.clone()),
            InvocationView {
                instance_id: id,
                status: if index % 2 == 0 { "Success".into() } else { "InProgress".into() },
                exit_code: (index % 2 == 0).then_some(0),
                stdout: "done".into(),
                stderr: String::new(),
                output_uri: None,
            },
        );
    }
    for batch in 1..=batch_of(n as usize - 1) {
        record.commands.insert(
            batch,
            CommandBatch {
                phase: Phase::Run,
                command_id: Some(format!("cmd-{batch}")),
                dispatched_at: now,
                listed_at: None,
                in_flight_until: None,
            },
        );
    }
    record.next_seq = batch_of(n as usize) + 1;
    let body = serde_json::to_vec(&record).expect("json");
    if !decide_it {
        return body.len();
    }
    // Load, decide, save: the CPU of one pass.
    let mut loaded: JobRecord = serde_json::from_slice(&body).expect("load");
    let settings = Settings { worker_instance_profile: Some("w".into()), ..Settings::default() };
    let (actions, _) = decide(
        &mut loaded,
        &obs,
        &Context { now: now + Duration::seconds(30), settings: &settings, bucket: "b", launch_grant: None },
    );
    let saved = serde_json::to_vec(&loaded).expect("save");
    actions.len() + saved.len()
}

/// Flotilla's own cost per job, part by part, beside the goal.
fn print_own_costs(owns: &[(u32, OwnFigures)], figures: &mut Value) {
    println!();
    println!(
        "Flotilla's own cost per job (same jobs; us-east-1 list prices, arm64 Lambda at {} MB; each AWS call \
         20-120 ms, a pass's calls one after another; {} B of logs per invocation; goal ${} at 10 instances):",
        own_cost::MEMORY_MB,
        own_cost::LOG_BYTES_PER_INVOCATION,
        own_cost::GOAL_USD
    );
    println!(
        "{:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "instances",
        "total $",
        "invokes",
        "GB-s",
        "SQS msg",
        "S3 PUT",
        "S3 GET",
        "events",
        "S3 PUT $",
        "Lambda $",
        "record's $"
    );
    for (n, own) in owns {
        let u = &own.usage;
        let gb_s = u.busy_ms as f64 / 1000.0 * own_cost::MEMORY_MB as f64 / 1024.0;
        println!(
            "{n:>9} {:>10.5} {:>8} {:>8.1} {:>8} {:>8} {:>9} {:>9} {:>9.5} {:>10.5} {:>10.5}",
            own.cost.total_usd,
            u.invocations,
            gb_s,
            u.sqs_messages,
            u.s3_writes,
            u.s3_reads,
            u.events,
            own.cost.s3_writes_usd,
            own.cost.lambda_requests_usd + own.cost.lambda_compute_usd,
            own.from_record
        );
        figures[format!("own_cost_{n}")] = json!({"usage": u, "cost": own.cost, "from_record_usd": own.from_record,
            "goal_usd": own_cost::GOAL_USD});
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("pass") {
        // `pass N [setup]`: for callgrind, with and without the decision.
        let n: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
        let decide_it = args.get(3).map(String::as_str) != Some("setup");
        println!("{}", one_pass(n, decide_it));
        return;
    }
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    // `--only calls|fifty|overhead` runs one part; `--sizes 1,10` picks sizes.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let sizes: Vec<u32> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 10, 100, 1000]);
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut figures = json!({});

    if part("calls") {
        let mut owns = Vec::new();
        println!("AWS calls per job (fault-free, one 8 GiB volume per instance, five phases, a 1-hour run, events on,");
        println!("EC2's token buckets enforced). floor = the fewest EC2+SSM calls such a job can make.");
        println!(
            "{:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>7} {:>12}",
            "instances", "all calls", "EC2+SSM", "floor", "ratio", "throttled", "passes", "makespan s"
        );
        for n in sizes {
            let f = calls_per_job(n).await;
            let ratio = f.ec2_ssm as f64 / f.floor as f64;
            println!(
                "{n:>9} {:>9} {:>9} {:>9} {:>7.2}x {:>10} {:>7} {:>12.0}",
                f.calls, f.ec2_ssm, f.floor, ratio, f.throttled, f.passes, f.makespan_s
            );
            figures[format!("calls_{n}")] = json!({"calls": f.calls, "ec2_ssm": f.ec2_ssm, "floor": f.floor,
            "ratio": ratio, "throttled": f.throttled, "passes": f.passes, "makespan_s": f.makespan_s});
            owns.push((n, f.own));
        }
        print_own_costs(&owns, &mut figures);
    }

    if part("fifty") {
        println!();
        let many = fifty_jobs().await;
        let share = many.rate / 2.0 * 100.0;
        let throttled: u64 = many.throttled.values().sum();
        println!("Fifty 100-instance jobs at once, one account (RunInstances: 1,000 instances burst, then 2/s):");
        println!(
            "  {} instances launched over {:.0} s: {:.2}/s beyond the burst = {share:.0}% of the sustained 2/s; \
         {throttled} throttled calls {:?}; job fleets complete within {:.0} s of each other; all succeeded: {}",
            many.instances, many.launch_seconds, many.rate, many.throttled, many.spread_s, many.all_succeeded
        );
        figures["fifty_jobs"] = json!({"instances": many.instances, "launch_seconds": many.launch_seconds,
        "rate": many.rate, "share_of_sustained": share, "throttled": throttled, "spread_s": many.spread_s,
        "all_succeeded": many.all_succeeded});
    }

    if part("overhead") {
        println!();
        println!("Orchestration overhead, 10 instances, a 1-hour run, no volumes (makespan to the last instance shutting down):");
        for (lag, suffix) in [(false, ""), (true, "_lagged")] {
            println!(
                "  {}",
                if lag {
                    "with SSM's listing lag (0-60 s, drawn per command):"
                } else {
                    "no listing lag (what Flotilla adds):"
                }
            );
            for events in [true, false] {
                let o = overhead(events, lag).await;
                let over = o.makespan_s - o.floor_s;
                let label = if events { "events on " } else { "polls only" };
                println!(
                    "    {label}: makespan {:.0} s, floor {:.0} s, overhead {over:.1} s = {:.2}% of 1 h; \
                     idle after the last command: max {:.1} s, mean {:.1} s",
                    o.makespan_s,
                    o.floor_s,
                    over / 36.0,
                    o.idle_max_s,
                    o.idle_mean_s
                );
                let key = format!("overhead_{}{suffix}", if events { "events" } else { "polls" });
                figures[key] = json!({"makespan_s": o.makespan_s, "floor_s": o.floor_s, "overhead_s": over,
                    "overhead_pct": over / 36.0, "idle_max_s": o.idle_max_s, "idle_mean_s": o.idle_mean_s});
            }
        }
    }
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_string_pretty(&figures).expect("json")).expect("write figures");
    }
}
