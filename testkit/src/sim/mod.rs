//! The deterministic simulator: one job at a time through intake and the
//! real reconciler, on the simulated cloud's virtual clock, with seeded
//! faults (crashes at await points, duplicate concurrent deliveries,
//! throttling, capacity, instance kills and stops, spot warnings, agents that
//! never register, failing and hanging commands, snapshots that end in
//! error, cancels and deadlines at random moments). After each job it checks
//! the invariants; a failing seed replays exactly.

mod invariants;
pub mod lineages;
mod recoveries;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{json, Value};

use crate::fake::{FakeCloud, Faults, Latencies, Rng};
use flotilla_shared::intake;
use flotilla_shared::ports::Ports;
use flotilla_shared::reconcile;
use flotilla_shared::record::JobState;
use flotilla_shared::settings::Settings;
use flotilla_shared::wake::Trigger;

/// SQS hands a message to the DLQ after this many receives.
const MAX_RECEIVES: u32 = 5;
/// The reconcile queue's visibility timeout.
const VISIBILITY_SECONDS: i64 = 150;
/// The jobs queue's (a submission or cancel that failed comes back after it).
const JOBS_VISIBILITY_SECONDS: i64 = 360;
/// The safety tick's period.
const TICK_SECONDS: i64 = 300;
/// A job must be terminal this long after its deadline at the latest: the
/// longest cleanup (cleanup phases' timeouts, snapshots in minutes) fits.
pub const FINISH_BOUND_MINUTES: i64 = 45;

/// One simulated job: its spec and the faults it meets.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub spec: Value,
    pub faults: Faults,
    pub latencies: Latencies,
    /// Probability that a message is delivered twice at once.
    pub duplicate: f64,
    /// Seconds after submission at which each timed fault happens.
    pub kills: Vec<i64>,
    pub stops: Vec<i64>,
    pub spot_warnings: Vec<i64>,
    /// Instances whose status checks turn `impaired`, and whose agents go silent.
    pub impairs: Vec<i64>,
    pub agent_losses: Vec<i64>,
    pub cancel_at: Option<i64>,
    /// Only faults a job must survive: it must SUCCEED.
    pub recoverable: bool,
    /// EventBridge rules deliver instance, command and snapshot events,
    /// beside the polls (a working job is then polled every 2 minutes).
    pub events: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SimResult {
    pub seed: u64,
    pub shards: u32,
    pub state: Option<JobState>,
    pub violations: Vec<(String, String)>,
    pub calls: u64,
    pub mutating_calls: u64,
    pub call_floor: u64,
    pub passes: u64,
    pub record_bytes: usize,
    pub virtual_minutes: i64,
    /// The job's report, kept when an invariant failed.
    pub report: String,
    /// What the job recovered from, by kind: shows the faults were met.
    pub recoveries: BTreeMap<&'static str, u64>,
}

pub fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time")
}

pub fn settings() -> Settings {
    Settings {
        poll_delay_seconds: 20,
        expiry_grace_minutes: 30,
        worker_instance_profile: Some("flotilla-worker".into()),
        pass_budget_seconds: 50,
        agent_timeout_seconds: 900,
        ..Settings::default()
    }
}

/// A random scenario for `seed`: sizes 1-50 (mostly small), volumes and
/// policies, markets, and faults; about half are recoverable-only.
pub fn scenario(seed: u64, size: Option<u32>) -> Scenario {
    let mut rng = Rng::new(seed);
    let shards = size.unwrap_or_else(|| match rng.range(0, 9) {
        0..=4 => rng.range(1, 4) as u32,
        5..=7 => rng.range(5, 20) as u32,
        _ => rng.range(21, 50) as u32,
    });
    let recoverable = rng.chance(0.5);
    let policies = ["on-success", "always", "never"];
    let volumes: Vec<Value> = (0..rng.range(0, 2))
        .map(|i| {
            let policy = policies[rng.range(0, 2) as usize];
            let mut volume = json!({"name": format!("v{i}"), "source": {"new": {"size_gib": 1}}, "device": format!("/dev/sd{}", ["f", "g"][i as usize]),
                   "mount_point": format!("/data{i}"), "snapshot": policy, "retention": {"keep_last": 2}});
            if policy == "always" && rng.chance(0.5) {
                volume["on_retry"] = json!("restore");
            }
            volume
        })
        .collect();
    let spot = rng.chance(0.3);
    let two_types = rng.chance(0.5);
    // Per-call rates fall with size, so a pass of a big job meets a few
    // faults, not one per hundred calls (a Lambda dies per invocation, and
    // the SDK absorbs most throttling before the reconciler sees it).
    let scale = f64::from(shards.div_ceil(10).max(1));
    let mut faults = Faults {
        transient: 0.02 / scale,
        crash_after: if rng.chance(0.6) { 0.01 / scale } else { 0.0 },
        lost_reply: if rng.chance(0.5) { 0.01 / scale } else { 0.0 },
        yield_rate: 0.3,
        partial_fill: if rng.chance(0.3) { 0.5 } else { 0.0 },
        reorder_seconds: 3,
        ..Default::default()
    };
    if two_types && rng.chance(0.5) {
        faults.no_capacity.insert("m7i.large".into());
    }
    if spot && rng.chance(0.4) {
        faults.no_spot_capacity = true;
    }
    let deadline = 120;
    let mut scenario = Scenario {
        seed,
        spec: json!({}),
        faults,
        latencies: Latencies::realistic(),
        duplicate: 0.2,
        kills: vec![],
        stops: vec![],
        spot_warnings: vec![],
        impairs: vec![],
        agent_losses: vec![],
        cancel_at: None,
        recoverable,
        events: false,
    };
    let mut types = vec!["m7i.large"];
    if two_types {
        types.push("c7i.large");
    }
    // With a single spot type and no fallback, no spot capacity is fatal.
    if scenario.faults.no_spot_capacity && recoverable && !two_types {
        scenario.faults.no_spot_capacity = false;
    }
    if !two_types {
        scenario.faults.no_capacity.clear();
    }
    let losses = if shards > 0 { rng.range(0, 2) } else { 0 };
    for _ in 0..losses {
        match rng.range(0, 4) {
            0 => scenario.kills.push(rng.range(30, 1500)),
            1 => scenario.stops.push(rng.range(30, 1500)),
            2 => scenario.spot_warnings.push(rng.range(30, 1500)),
            3 => scenario.impairs.push(rng.range(30, 1500)),
            _ => scenario.agent_losses.push(rng.range(30, 1500)),
        }
    }
    if !recoverable {
        scenario.faults.agent_never = if rng.chance(0.3) { 0.05 } else { 0.0 };
        scenario.faults.agent_dies = if rng.chance(0.2) { 0.05 } else { 0.0 };
        scenario.faults.snapshot_error = if rng.chance(0.5) { 0.2 } else { 0.0 };
        scenario.faults.command_fail = if rng.chance(0.4) { 0.03 } else { 0.0 };
        scenario.faults.command_hang = if rng.chance(0.2) { 0.02 } else { 0.0 };
        scenario.faults.volume_error = if rng.chance(0.2) { 0.05 } else { 0.0 };
        scenario.faults.stuck_detach = if rng.chance(0.2) { 0.1 } else { 0.0 };
        if rng.chance(0.4) {
            scenario.cancel_at = Some(rng.range(10, 3000));
        }
    }
    let run_seconds = rng.range(30, 900);
    let deadline_minutes = if recoverable { deadline } else { [20, 60, deadline][rng.range(0, 2) as usize] };
    // Half the jobs leave the run's timeout to the deadline.
    let run = if rng.chance(0.5) {
        json!({"script": format!("sleep {run_seconds}")})
    } else {
        json!({"script": format!("sleep {run_seconds}"), "timeout_seconds": (deadline_minutes * 60).min(1800)})
    };
    let mut spec = json!({
        "id": format!("sim-{seed}"),
        "name": format!("sim-{}", seed % 7),
        "fleet": {"count": shards},
        "instance_types": types,
        "image": "ami-0abc1234",
        "volumes": volumes,
        "run": run,
        "deadline_minutes": deadline_minutes,
    });
    if rng.chance(0.5) {
        spec["setup"] = json!({"commands": [["true"]], "timeout_seconds": 300});
    }
    if rng.chance(0.5) {
        spec["before_unmount"] = json!({"commands": [["sync"]], "timeout_seconds": 300});
    }
    if spot {
        spec["market"] = json!("spot");
        spec["on_demand_fallback"] = json!(true);
    }
    // Acting in another account through an assumed role.
    if rng.chance(0.1) {
        spec["role_arn"] = json!("arn:aws:iam::210987654321:role/flotilla/sim-target");
        spec["external_id"] = json!(format!("sim-{seed}"));
    }
    // As AWS documents them: agents that drop out (ConnectionLost) and come
    // back, sends and snapshots whose effect lands after the caller gave up,
    // and events beside the polls. (Lookups lag in every scenario: see
    // `Latencies::realistic`.)
    if rng.chance(0.3) {
        scenario.faults.agent_blips = 0.2;
    }
    if scenario.faults.lost_reply > 0.0 && rng.chance(0.5) {
        scenario.faults.late_effect_seconds = flotilla_shared::fence::OPERATION_TIMEOUT_SECONDS;
    }
    if rng.chance(0.3) {
        scenario.faults.slow_calls = 0.02 / scale;
    }
    if scenario.faults.lost_reply > 0.0 && rng.chance(0.5) {
        scenario.faults.long_command_lag = 0.5;
    }
    scenario.events = rng.chance(0.5);
    scenario.spec = spec;
    scenario
}

/// A fault-free job of `size` instances with one volume each, on realistic
/// latencies: the calls a job of that size costs when nothing goes wrong.
pub fn clean_scenario(seed: u64, size: u32) -> Scenario {
    let mut scenario = scenario(seed, Some(size));
    scenario.faults = Faults { yield_rate: 0.0, ..Default::default() };
    scenario.duplicate = 0.0;
    scenario.kills.clear();
    scenario.stops.clear();
    scenario.spot_warnings.clear();
    scenario.impairs.clear();
    scenario.agent_losses.clear();
    scenario.cancel_at = None;
    scenario.recoverable = true;
    scenario.events = false;
    scenario.spec["volumes"] = json!([{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf",
        "mount_point": "/data", "snapshot": "on-success", "retention": {"keep_last": 2}}]);
    scenario.spec["setup"] = json!({"commands": [["true"]], "timeout_seconds": 300});
    scenario.spec["before_unmount"] = json!({"commands": [["sync"]], "timeout_seconds": 300});
    scenario.spec["deadline_minutes"] = json!(120);
    scenario.spec["run"] = json!({"script": "sleep 300", "timeout_seconds": 1800});
    scenario.spec.as_object_mut().expect("object").remove("market");
    scenario.spec.as_object_mut().expect("object").remove("on_demand_fallback");
    scenario.spec["instance_types"] = json!(["m7i.large"]);
    scenario
}

/// Run one scenario to its end and check every invariant.
pub async fn run(scenario: &Scenario) -> SimResult {
    let run_seconds: i64 = scenario.spec["run"]["script"]
        .as_str()
        .and_then(|s| s.strip_prefix("sleep "))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let cloud = FakeCloud::seeded(start_time(), scenario.seed, scenario.latencies.clone(), scenario.faults.clone())
        .with_behaviour(std::sync::Arc::new(move |request, _| {
            let volume_op = request.lines.iter().any(|l| l.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER));
            if volume_op {
                (0, String::new(), 3)
            } else if request.comment.contains(" run ") {
                (0, "done".into(), run_seconds)
            } else {
                (0, String::new(), 2)
            }
        }));
    cloud.lock().events = scenario.events;
    let ports = cloud.ports(Settings { safety_poll_seconds: scenario.events.then_some(120), ..settings() });
    let job_id = scenario.spec["id"].as_str().unwrap_or_default().to_string();
    let shards = scenario.spec["fleet"]["count"].as_u64().unwrap_or(1) as u32;
    let mut rng = Rng::new(scenario.seed ^ 0x5151);
    let mut result = SimResult { seed: scenario.seed, shards, ..Default::default() };
    let start = start_time();

    // Intake, retried as SQS would until it lands.
    let body = scenario.spec.to_string();
    for _ in 0..20 {
        if cloud.process(intake::submit(&ports, &body, "m-1", Some("AIDASIMULATED"))).await.is_some_and(|r| r.is_ok()) {
            break;
        }
        let now = cloud.now();
        cloud.advance_to(now + Duration::seconds(30));
    }
    let deadline_minutes = scenario.spec["deadline_minutes"].as_i64().unwrap_or(60);
    let hard_stop = start + Duration::minutes(deadline_minutes + FINISH_BOUND_MINUTES);
    let mut timed: Vec<(i64, Fault)> = Vec::new();
    timed.extend(scenario.kills.iter().map(|t| (*t, Fault::Kill)));
    timed.extend(scenario.stops.iter().map(|t| (*t, Fault::Stop)));
    timed.extend(scenario.spot_warnings.iter().map(|t| (*t, Fault::SpotWarning)));
    timed.extend(scenario.impairs.iter().map(|t| (*t, Fault::Impair)));
    timed.extend(scenario.agent_losses.iter().map(|t| (*t, Fault::AgentLoss)));
    timed.extend(scenario.cancel_at.iter().map(|t| (*t, Fault::Cancel(1))));
    timed.sort();
    let mut receives: BTreeMap<String, u32> = BTreeMap::new();
    let mut reaper_violations: Vec<String> = Vec::new();
    let mut next_tick = start + Duration::seconds(TICK_SECONDS);
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > 200_000 {
            result.violations.push(("runaway".into(), "more than 200,000 deliveries".into()));
            break;
        }
        // Cheap: a job is terminal once its active marker is gone (a record
        // read here would parse up to a megabyte per delivery).
        let active = cloud.lock().objects.contains_key(&flotilla_shared::record::active_key(&job_id));
        if !active && steps > 1 {
            break;
        }
        let due = cloud.next_due();
        let fault_at = timed.first().map(|(t, _)| start + Duration::seconds(*t));
        // What comes first: a timed fault, the tick, or a message.
        let mut next = next_tick;
        if let Some(at) = due {
            next = next.min(at);
        }
        if let Some(at) = fault_at {
            next = next.min(at);
        }
        if next > hard_stop {
            break;
        }
        if fault_at == Some(next) {
            cloud.advance_to(next);
            let (_, fault) = timed.remove(0);
            if let Some(follow) = inject(&cloud, &ports, &job_id, fault, &mut rng).await {
                timed.push(follow);
                timed.sort();
            }
            continue;
        }
        if next == next_tick && due.is_none_or(|d| d > next_tick) {
            cloud.advance_to(next_tick);
            next_tick += Duration::seconds(TICK_SECONDS);
            let _ = cloud.process(flotilla_shared::handlers::wake_active(&ports)).await;
            // The reaper's plan beside the running job: while the job makes
            // progress it must condemn nothing, expired or not (it only plans
            // here, so a leak is still the job's own and still counted).
            // (The record, not the active marker: a pass that died between
            // its terminal save and clearing the marker leaves the marker.)
            let active = cloud.record(&job_id).is_some_and(|r| !r.state.is_terminal());
            // (Taken after the job ended too: the figures count those calls.)
            let inventory = cloud.process(flotilla_shared::reaper::take_inventory(&ports)).await;
            if let (true, Some(Ok(inventory))) = (active, inventory) {
                let settings = flotilla_shared::reaper::ReaperSettings::from(&ports.settings);
                for action in flotilla_shared::reaper::plan(&inventory, cloud.now(), &settings) {
                    reaper_violations.push(format!("{action:?}"));
                }
            }
            continue;
        }
        let Some(message) = cloud.next_message() else { continue };
        deliver(&cloud, &ports, message, scenario.duplicate, &mut rng, &mut receives).await;
    }
    // Let instances finish shutting down before counting what is left.
    let end = cloud.now();
    cloud.advance_to(end + Duration::minutes(5));
    check(scenario, &cloud, &job_id, &mut result);
    if let Some(first) = reaper_violations.first() {
        violation(
            &mut result,
            invariants::REAPER_TOUCHED_A_BUSY_JOB,
            format!("{} actions, first: {first}", reaper_violations.len()),
        );
    }
    // For size work: the largest record this job wrote.
    if let Ok(path) = std::env::var("FLOTILLA_SIM_DUMP") {
        let _ = std::fs::write(path, &cloud.lock().largest_record);
    }
    if !result.violations.is_empty() {
        if let Some(record) = cloud.record(&job_id) {
            result.report = flotilla_shared::report::render(&record);
        }
    }
    result.virtual_minutes = (end - start).num_minutes();
    result
}

/// Deliver one message as the Lambda event source does: now and then twice
/// at once (interleaved at every await point), and a retryable failure
/// comes back after the visibility timeout until SQS dead-letters it (the
/// safety tick then carries the job on).
pub(crate) async fn deliver(
    cloud: &FakeCloud,
    ports: &Ports,
    message: reconcile::WakeMessage,
    duplicate: f64,
    rng: &mut Rng,
    receives: &mut BTreeMap<String, u32>,
) {
    let budget = Duration::seconds(i64::from(ports.settings.pass_budget_seconds));
    let outcomes = if rng.chance(duplicate / 4.0) {
        // A second pass that comes when the first one's lease was to end
        // (its lease-end message, or a later trigger), while the first may
        // still be acting, slowed by its calls.
        let at = cloud.now() + budget + Duration::seconds(flotilla_shared::fence::LEASE_MARGIN_SECONDS + 1);
        let first_done = std::cell::Cell::new(false);
        let first = async {
            let outcome = cloud.process(reconcile::reconcile(ports, &message, budget)).await;
            first_done.set(true);
            outcome
        };
        let later = reconcile::WakeMessage::new(&message.job_id, Trigger::Event);
        let second = async {
            cloud.sleep_until(at, &first_done).await;
            cloud.process(reconcile::reconcile(ports, &later, budget)).await
        };
        let (a, b) = tokio::join!(first, second);
        vec![a, b]
    } else if rng.chance(duplicate) {
        // The same message twice, or another trigger for the job at once
        // (an event beside a poll, the safety tick beside either).
        let other = match rng.range(0, 3) {
            0 => message.clone(),
            1 => reconcile::WakeMessage::new(&message.job_id, Trigger::Event),
            2 => reconcile::WakeMessage::new(&message.job_id, Trigger::Tick),
            _ => reconcile::WakeMessage::new(&message.job_id, Trigger::Poll),
        };
        let (a, b) = tokio::join!(
            cloud.process(reconcile::reconcile(ports, &message, budget)),
            cloud.process(reconcile::reconcile(ports, &other, budget))
        );
        vec![a, b]
    } else {
        vec![cloud.process(reconcile::reconcile(ports, &message, budget)).await]
    };
    for outcome in outcomes {
        // A process that died, or a retryable failure: SQS delivers it again.
        if outcome.is_none_or(|outcome| outcome.is_err_and(|err| err.is_retryable())) {
            let count = receives.entry(format!("{message:?}")).or_default();
            *count += 1;
            if *count < MAX_RECEIVES {
                cloud.redeliver_later(message.clone(), VISIBILITY_SECONDS);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Stop,
    SpotWarning,
    Impair,
    AgentLoss,
    /// A cancel message, on its n-th receive.
    Cancel(u32),
    /// EC2 reclaims a spot instance two minutes after its warning.
    Reclaim(String),
}

/// Apply one timed fault; a spot warning schedules its reclaim.
async fn inject(cloud: &FakeCloud, ports: &Ports, job_id: &str, fault: Fault, rng: &mut Rng) -> Option<(i64, Fault)> {
    let candidates: Vec<String> = {
        let state = cloud.lock();
        state
            .instances
            .iter()
            .filter(|i| matches!(i.state.as_str(), "pending" | "running"))
            .map(|i| i.id.clone())
            .collect()
    };
    let victim =
        (!candidates.is_empty()).then(|| candidates[rng.range(0, candidates.len() as i64 - 1) as usize].clone());
    match (fault, victim) {
        (Fault::Cancel(receives), _) => {
            // The jobs queue redelivers a cancel that failed after its
            // visibility timeout, until it dead-letters after 5 receives.
            let body = json!({"cancel": job_id}).to_string();
            let submitted = cloud.process(intake::submit(ports, &body, "m-cancel", None)).await;
            let failed = submitted.is_none_or(|submitted| submitted.is_err_and(|err| err.is_retryable()));
            if failed && receives < MAX_RECEIVES {
                let at = (cloud.now() - start_time()).num_seconds() + JOBS_VISIBILITY_SECONDS;
                return Some((at, Fault::Cancel(receives + 1)));
            }
        }
        (Fault::Reclaim(id), _) => cloud.set_instance_state(&id, "terminated"),
        (_, None) => {}
        (Fault::Kill, Some(id)) => cloud.set_instance_state(&id, "terminated"),
        (Fault::Stop, Some(id)) => cloud.set_instance_state(&id, "stopped"),
        (Fault::Impair, Some(id)) => cloud.impair(&id),
        (Fault::AgentLoss, Some(id)) => cloud.lose_agent(&id),
        (Fault::SpotWarning, Some(id)) => {
            // The handler's path for the EventBridge warning: record it on the job.
            let noted = id.clone();
            let _ = cloud
                .process(reconcile::update_inbox(
                    ports,
                    job_id,
                    move |record| {
                        record.interruptions.push(noted.clone());
                        true
                    },
                    Trigger::Event,
                ))
                .await;
            let at = (cloud.now() - start_time()).num_seconds() + 120;
            return Some((at, Fault::Reclaim(id)));
        }
    }
    None
}

fn violation(result: &mut SimResult, invariant: &str, detail: String) {
    result.violations.push((invariant.to_string(), detail));
}

/// The figures of a job that ended, then every invariant (`invariants/`).
fn check(scenario: &Scenario, cloud: &FakeCloud, job_id: &str, result: &mut SimResult) {
    let Some(record) = cloud.record(job_id) else {
        violation(result, invariants::TERMINAL, "no record".into());
        return;
    };
    result.state = Some(record.state);
    result.passes = record.passes;
    result.record_bytes = cloud.lock().max_record_bytes;
    let (calls, _) = cloud.call_totals();
    result.calls = calls;
    if !record.state.is_terminal() {
        violation(result, invariants::TERMINAL, format!("still {} ({})", record.state, record.reason));
    }
    // The simulator writes only valid specs: a rejection is a job never run.
    if record.state == JobState::Rejected {
        violation(result, invariants::TERMINAL, format!("rejected: {}", record.reason));
    }
    let state = cloud.lock();
    let spec: flotilla_shared::spec::JobSpec = serde_json::from_value(scenario.spec.clone()).expect("spec");
    let ended =
        invariants::Ended { scenario, record: &record, spec: &spec, state: &state, now: state.now.unwrap_or_default() };
    invariants::check_all(&ended, &mut result.violations);
    recoveries::count(&record, &state, &mut result.recoveries);
    result.call_floor = invariants::call_budget::call_floor(&record);
    result.mutating_calls = invariants::call_budget::mutating_calls(&state);
}

/// A campaign's figures: what `make chaos` prints.
#[derive(Debug, Default)]
pub struct Campaign {
    pub jobs: usize,
    pub seconds: f64,
    pub violations: BTreeMap<String, usize>,
    pub failed_seeds: Vec<String>,
    pub states: BTreeMap<String, usize>,
    /// By size bucket: (jobs, total calls, mutating EC2/SSM calls, floor, largest record).
    pub by_size: BTreeMap<&'static str, (u64, u64, u64, u64, usize)>,
    pub max_virtual_overrun_minutes: i64,
    pub recoveries: BTreeMap<&'static str, u64>,
}

pub use invariants::call_budget::CALL_FACTOR;
pub use invariants::ALL as INVARIANTS;

fn bucket(shards: u32) -> &'static str {
    match shards {
        1 => "1",
        2..=10 => "2-10",
        11..=50 => "11-50",
        51..=999 => "51-999",
        _ => "1000",
    }
}

impl Campaign {
    pub fn add(&mut self, scenario: &Scenario, result: &SimResult) {
        self.jobs += 1;
        for (invariant, _) in &result.violations {
            *self.violations.entry(invariant.clone()).or_default() += 1;
        }
        if !result.violations.is_empty() {
            self.failed_seeds.push(format!("seed {} ({} shards): {:?}", result.seed, result.shards, result.violations));
        }
        let state = result.state.map(|s| s.to_string()).unwrap_or_else(|| "none".into());
        *self.states.entry(state).or_default() += 1;
        let entry = self.by_size.entry(bucket(result.shards)).or_default();
        entry.0 += 1;
        entry.1 += result.calls;
        entry.2 += result.mutating_calls;
        entry.3 += result.call_floor;
        entry.4 = entry.4.max(result.record_bytes);
        for (kind, count) in &result.recoveries {
            *self.recoveries.entry(kind).or_default() += count;
        }
        let deadline = scenario.spec["deadline_minutes"].as_i64().unwrap_or(0);
        self.max_virtual_overrun_minutes = self.max_virtual_overrun_minutes.max(result.virtual_minutes - deadline);
    }

    pub fn print(&self) {
        println!(
            "simulated jobs: {} in {:.1} s ({:.1} jobs/s)",
            self.jobs,
            self.seconds,
            self.jobs as f64 / self.seconds.max(0.001)
        );
        println!("outcomes: {:?}", self.states);
        println!("violations per invariant:");
        for invariant in INVARIANTS {
            println!("  {invariant:<26} {}", self.violations.get(invariant).copied().unwrap_or(0));
        }
        println!("recovered from (attempts ended, volumes restored, launches partly filled): {:?}", self.recoveries);
        println!(
            "latest finish past a deadline: {} min (bound {FINISH_BOUND_MINUTES} min)",
            self.max_virtual_overrun_minutes.max(0)
        );
        println!("calls per job by size (faults included):");
        println!(
            "  {:<7} {:>6} {:>12} {:>22} {:>16} {:>14}",
            "shards", "jobs", "calls/job", "EC2+SSM mutating/job", "floor/job", "max record"
        );
        for (size, (jobs, calls, mutating, floor, record)) in &self.by_size {
            let n = (*jobs).max(1) as f64;
            println!(
                "  {size:<7} {jobs:>6} {:>12.1} {:>22.1} {:>16.1} {:>12} B",
                *calls as f64 / n,
                *mutating as f64 / n,
                *floor as f64 / n,
                record
            );
        }
    }
}
