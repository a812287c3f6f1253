//! Lineage worlds: many jobs on one simulated cloud. Runs of one job name
//! follow each other and overlap, some fail, some are cancelled (one before
//! it even arrives), some outlast their deadline; other jobs restore from a
//! lineage's newest good snapshot and lose their instance; orphaned volumes
//! appear for the reaper, which executes its plan every tick. The invariants
//! read what the simulated cloud created and still holds, never a record
//! (only a job's outcome, which is what its user sees, comes from there).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

use super::{settings, start_time, TICK_SECONDS};

mod invariants;
use crate::fake::{CommandBehaviour, FakeCloud, FakeSnapshot, Faults, Latencies, Rng};
use flotilla_shared::intake;
use flotilla_shared::ports::Ports;
use flotilla_shared::record::{active_key, JobState};
use flotilla_shared::tags;

/// Past its bound, a job's instances must be shutting down within this: the
/// pass at the bound, a snapshot's answer, and a crash's redelivery (150 s)
/// or the next safety tick (300 s) when faults strike then.
pub const BOUND_SLACK_MINUTES: i64 = 10;
/// After the last job ended, the world runs this long (reaper passes, the
/// last snapshots completing) before the final checks.
const SETTLE_MINUTES: i64 = 90;

pub use invariants::ALL as INVARIANTS;

/// One job of a world, and what happens to it.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    /// Seconds after the world starts.
    pub at: i64,
    pub spec: Value,
    /// The lineage it is a run of.
    pub lineage: Option<usize>,
    /// It restores from this lineage's newest good snapshot (chosen when it
    /// is submitted).
    pub source_of: Option<usize>,
    /// Seconds after the world starts (before `at`: a cancel that comes first).
    pub cancel_at: Option<i64>,
    /// Seconds after `at` at which one of its instances is killed.
    pub kill_after: Option<i64>,
    /// Once it ended, a volume of it appears that its record never held.
    pub orphan_after: bool,
}

#[derive(Debug, Clone)]
pub struct World {
    pub seed: u64,
    pub lineages: usize,
    pub jobs: Vec<PlannedJob>,
    pub faults: Faults,
    /// Probability that a message is delivered twice at once.
    pub duplicate: f64,
}

#[derive(Debug, Clone, Default)]
pub struct WorldResult {
    pub seed: u64,
    pub jobs: usize,
    pub runs: usize,
    pub consumers: usize,
    /// Runs submitted while the lineage's previous run was still active.
    pub overlapping: usize,
    pub cancels_first: usize,
    pub states: BTreeMap<String, usize>,
    /// What the reaper did, by action.
    pub reaper_actions: BTreeMap<String, u64>,
    pub rescues: usize,
    /// Attempts stopped at their job's bound.
    pub bound_stops: usize,
    pub max_bound_lateness_seconds: i64,
    /// Every call the world made, and the mutating ones.
    pub calls: u64,
    pub mutating_calls: u64,
    pub violations: Vec<(String, String)>,
    /// For a failed world's replay.
    pub trace: Vec<String>,
}

fn violation(result: &mut WorldResult, invariant: &str, detail: String) {
    if !result.violations.iter().any(|(i, d)| i == invariant && *d == detail) {
        result.violations.push((invariant.to_string(), detail));
    }
}

/// A random world for `seed`: two lineages of 4-6 runs each, and 1-2 jobs
/// per lineage that restore from it.
pub fn world(seed: u64) -> World {
    let mut rng = Rng::new(seed ^ 0x11AE_5EED);
    let lineages = 2;
    let mut jobs = Vec::new();
    for l in 0..lineages {
        let name = format!("lin{l}-{seed}");
        let keep_last = rng.range(1, 2);
        let policy = if rng.chance(0.6) { "always" } else { "on-success" };
        let restore = policy == "always" && rng.chance(0.3);
        let mut at = rng.range(0, 300);
        for r in 0..rng.range(4, 6) {
            let fails = rng.chance(0.25);
            // Runs past the deadline, and a cleanup step that would outlast the bound.
            let outlasts = !fails && rng.chance(0.1);
            let run_seconds = if outlasts { 4000 } else { rng.range(60, 600) };
            let mut spec =
                run_spec(&format!("{name}-r{r}"), &name, keep_last, policy, run_seconds, if fails { 3 } else { 0 });
            spec["fleet"] = json!({"count": rng.range(1, 3)});
            if restore {
                spec["volumes"][0]["on_retry"] = json!("restore");
            }
            if outlasts {
                spec["before_unmount"] = json!({"script": ": sim-step 5000 0", "timeout_seconds": 3600});
            } else if rng.chance(0.5) {
                spec["before_unmount"] = json!({"commands": [["sync"]], "timeout_seconds": 300});
            }
            let cancel_at = match rng.range(0, 19) {
                0 => Some(at - 30),
                1 | 2 => Some(at + rng.range(60, 1200)),
                _ => None,
            };
            let kill_after = rng.chance(0.2).then(|| rng.range(300, 900));
            let orphan_after = rng.chance(0.3);
            jobs.push(PlannedJob { at, spec, lineage: Some(l), source_of: None, cancel_at, kill_after, orphan_after });
            at += rng.range(200, 1500);
        }
        for c in 0..rng.range(1, 2) {
            let spec = consumer_spec(&format!("use{l}{c}-{seed}"), rng.range(600, 1800));
            let kill_after = rng.chance(0.5).then(|| rng.range(300, 500));
            jobs.push(PlannedJob {
                at: rng.range(900, at.max(901)),
                spec,
                lineage: None,
                source_of: Some(l),
                cancel_at: None,
                kill_after,
                orphan_after: false,
            });
        }
    }
    jobs.sort_by_key(|j| j.at);
    let faults = Faults {
        transient: 0.01,
        crash_after: if rng.chance(0.5) { 0.005 } else { 0.0 },
        lost_reply: if rng.chance(0.5) { 0.005 } else { 0.0 },
        snapshot_error: if rng.chance(0.5) { 0.1 } else { 0.0 },
        yield_rate: 0.3,
        reorder_seconds: 3,
        ..Default::default()
    };
    World { seed, lineages, jobs, faults, duplicate: 0.1 }
}

/// A run of lineage `name`: one instance, one volume, a run step that takes
/// `run_seconds` and exits `exit`, a 60-minute deadline.
pub fn run_spec(id: &str, name: &str, keep_last: i64, policy: &str, run_seconds: i64, exit: i32) -> Value {
    json!({
        "id": id, "name": name, "fleet": {"count": 1}, "instance_types": ["m7i.large"], "image": "ami-0abc1234",
        "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data",
            "snapshot": policy, "retention": {"keep_last": keep_last}}],
        "run": {"script": format!(": sim-step {run_seconds} {exit}"), "timeout_seconds": 3600},
        "deadline_minutes": 60,
    })
}

/// A job that restores from a lineage's snapshot (filled in when submitted).
pub fn consumer_spec(id: &str, run_seconds: i64) -> Value {
    json!({
        "id": id, "name": id, "fleet": {"count": 1}, "instance_types": ["m7i.large"], "image": "ami-0abc1234",
        "volumes": [{"name": "data", "source": {"snapshot_id": "snap-00000000"}, "device": "/dev/sdf",
            "mount_point": "/data", "snapshot": "never"}],
        "run": {"script": format!(": sim-step {run_seconds} 0"), "timeout_seconds": 3600},
        "deadline_minutes": 120,
    })
}

/// Steps are `: sim-step <seconds> <exit code>`; volume steps take 3 s.
fn behaviour() -> CommandBehaviour {
    Arc::new(|request, _| {
        if request.lines.iter().any(|l| l.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER)) {
            return (0, String::new(), 3);
        }
        for line in &request.lines {
            if let Some(rest) = line.split(": sim-step ").nth(1) {
                let mut numbers = rest.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty());
                let seconds = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(5);
                let exit = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                return (exit, "done".into(), seconds);
            }
        }
        (0, String::new(), 2)
    })
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Cancel(usize),
    Submit(usize),
    Kill(usize),
    Orphan(usize),
}

/// Run a world to its end, checking the invariants at every tick and at the end.
pub async fn run(world: &World) -> WorldResult {
    let cloud = FakeCloud::seeded(start_time(), world.seed, Latencies::realistic(), world.faults.clone())
        .with_behaviour(behaviour());
    let ports = cloud.ports(settings());
    let grace = Duration::minutes(i64::from(ports.settings.cleanup_grace_minutes));
    let start = start_time();
    let mut rng = Rng::new(world.seed ^ 0xA11_0C8);
    let mut result = WorldResult { seed: world.seed, ..Default::default() };
    let mut timed: Vec<(i64, Event)> = Vec::new();
    for (i, job) in world.jobs.iter().enumerate() {
        timed.push((job.at, Event::Submit(i)));
        if let Some(at) = job.cancel_at {
            timed.push((at.max(0), Event::Cancel(i)));
        }
        if let Some(after) = job.kill_after {
            timed.push((job.at + after, Event::Kill(i)));
        }
    }
    timed.sort();
    // What the world did, by job index: when it was submitted, when its cancel went out.
    let mut submitted: BTreeMap<usize, DateTime<Utc>> = BTreeMap::new();
    let mut cancelled: BTreeMap<usize, DateTime<Utc>> = BTreeMap::new();
    let mut orphaned: BTreeSet<usize> = BTreeSet::new();
    // The snapshot each restoring job was given.
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    let id_of = |i: usize| world.jobs[i].spec["id"].as_str().unwrap_or_default().to_string();
    let mut receives: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_tick = start + Duration::seconds(TICK_SECONDS);
    let mut settle_until: Option<DateTime<Utc>> = None;
    let mut steps = 0u64;
    loop {
        steps += 1;
        if steps > 400_000 {
            violation(&mut result, "terminal", "runaway: more than 400,000 deliveries".into());
            break;
        }
        let active = cloud.lock().objects.keys().any(|k| k.starts_with("active/"));
        if settle_until.is_none() && timed.is_empty() && !active {
            settle_until = Some(cloud.now() + Duration::minutes(SETTLE_MINUTES));
        }
        let due = cloud.next_due();
        let mut next = next_tick;
        if let Some(at) = due {
            next = next.min(at);
        }
        let event_at = timed.first().map(|(t, _)| start + Duration::seconds(*t));
        if let Some(at) = event_at {
            next = next.min(at);
        }
        if settle_until.is_some_and(|end| next > end) || next > start + Duration::hours(12) {
            break;
        }
        if event_at == Some(next) {
            cloud.advance_to(next);
            let (_, event) = timed.remove(0);
            match event {
                Event::Submit(i) => {
                    let mut spec = world.jobs[i].spec.clone();
                    if let Some(l) = world.jobs[i].source_of {
                        let Some(source) = newest_good(&cloud, &lineage_name(world, l)) else { continue };
                        // The snapshot's owner opts in, as a user would.
                        if let Some(s) = cloud.lock().snapshots.iter_mut().find(|s| s.id == source) {
                            s.tags.insert(tags::ALLOW.into(), ports.settings.stack.clone());
                        }
                        spec["volumes"][0]["source"] = json!({ "snapshot_id": source });
                        sources.insert(id_of(i), source);
                        result.consumers += 1;
                    }
                    if let Some(l) = world.jobs[i].lineage {
                        result.runs += 1;
                        let previous = submitted.keys().rev().find(|j| world.jobs[**j].lineage == Some(l)).copied();
                        if previous.is_some_and(|p| cloud.lock().objects.contains_key(&active_key(&id_of(p)))) {
                            result.overlapping += 1;
                        }
                    }
                    submitted.insert(i, cloud.now());
                    result.jobs += 1;
                    submit(&cloud, &ports, &spec.to_string(), &format!("m-{i}")).await;
                    if world.jobs[i].cancel_at.is_some_and(|at| at < world.jobs[i].at) {
                        result.cancels_first += 1;
                    }
                }
                Event::Cancel(i) => {
                    cancelled.entry(i).or_insert(cloud.now());
                    submit(&cloud, &ports, &json!({ "cancel": id_of(i) }).to_string(), &format!("c-{i}")).await;
                }
                Event::Kill(i) => {
                    let job_id = id_of(i);
                    let victims: Vec<String> = cloud
                        .lock()
                        .instances
                        .iter()
                        .filter(|v| v.tags.get(tags::JOB_ID) == Some(&job_id) && v.state == "running")
                        .map(|v| v.id.clone())
                        .collect();
                    if !victims.is_empty() {
                        let victim = &victims[rng.range(0, victims.len() as i64 - 1) as usize];
                        cloud.set_instance_state(victim, "terminated");
                    }
                }
                Event::Orphan(i) => {
                    let job_id = id_of(i);
                    let name = world.jobs[i].spec["name"].as_str().unwrap_or_default().to_string();
                    cloud.add_volume(BTreeMap::from([
                        (tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string()),
                        (tags::STACK.to_string(), ports.settings.stack.clone()),
                        (tags::JOB_ID.to_string(), job_id),
                        (tags::JOB_NAME.to_string(), name),
                        (tags::VOLUME.to_string(), "data".to_string()),
                        (tags::SHARD.to_string(), "0".to_string()),
                        (tags::SUBMITTER.to_string(), "AIDASIMULATED".to_string()),
                        (tags::KEEP_LAST.to_string(), "1".to_string()),
                    ]));
                }
            }
            continue;
        }
        if next == next_tick && due.is_none_or(|d| d > next_tick) {
            cloud.advance_to(next_tick);
            next_tick += Duration::seconds(TICK_SECONDS);
            let _ = cloud.process(flotilla_shared::handlers::wake_active(&ports)).await;
            reap(&ports, &cloud, &mut result).await;
            // Orphans appear for jobs that ended since.
            for (i, job) in world.jobs.iter().enumerate() {
                let ended = submitted.contains_key(&i) && !cloud.lock().objects.contains_key(&active_key(&id_of(i)));
                if job.orphan_after && ended && orphaned.insert(i) {
                    let at = (cloud.now() - start).num_seconds() + 1;
                    timed.push((at, Event::Orphan(i)));
                    timed.sort();
                }
            }
            check_live(world, &cloud, &submitted, &sources, &mut result);
            continue;
        }
        let Some(message) = cloud.next_message() else { continue };
        super::deliver(&cloud, &ports, message, world.duplicate, &mut rng, &mut receives).await;
    }
    check_live(world, &cloud, &submitted, &sources, &mut result);
    check_end(world, &cloud, &submitted, &cancelled, grace, &mut result);
    if !result.violations.is_empty() || std::env::var_os("FLOTILLA_SIM_TRACE").is_some() {
        result.trace = trace(world, &cloud);
    }
    result
}

/// What a failed world's replay prints: every snapshot taken, and what each
/// job and the reaper deleted.
fn trace(world: &World, cloud: &FakeCloud) -> Vec<String> {
    let mut lines = Vec::new();
    for job in &world.jobs {
        let id = job.spec["id"].as_str().unwrap_or_default();
        if let Some(record) = cloud.record(id) {
            lines.push(format!(
                "{id}: {} submitted {} ended {:?}: {}; pruned {:?}",
                record.state,
                record.submitted_at.format("%H:%M:%S"),
                record.timeline.last().map(|t| t.at.format("%H:%M:%S").to_string()),
                record.reason,
                record.pruned_snapshots
            ));
        }
    }
    let state = cloud.lock();
    let now = state.now.unwrap_or_default();
    for s in &state.evidence.snapshots_created {
        let alive = state.snapshots.iter().find(|x| x.id == s.id);
        lines.push(format!(
            "{} {} job {} shard {} kind {} good {} reaped {} started {} {}",
            s.id,
            tag(s, tags::JOB_NAME),
            tag(s, tags::JOB_ID),
            tag(s, tags::SHARD),
            tag(s, tags::KIND),
            alive.map(|a| tag(a, tags::GOOD)).unwrap_or("?"),
            tag(s, tags::REAPED),
            s.started_at.format("%H:%M:%S"),
            if alive.is_some() {
                if completed(s, now) {
                    "exists"
                } else {
                    "exists, not completed"
                }
            } else {
                "DELETED"
            }
        ));
    }
    for (key, (body, _)) in state.objects.iter().filter(|(k, _)| k.starts_with("reaper/")) {
        let report: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        for action in report["planned"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["action"] == "delete_snapshot" || a["action"] == "leave")
        {
            lines.push(format!("{key}: {action}"));
        }
    }
    lines
}

fn lineage_name(world: &World, lineage: usize) -> String {
    format!("lin{lineage}-{}", world.seed)
}

/// Intake, retried as SQS would until it lands.
async fn submit(cloud: &FakeCloud, ports: &Ports, body: &str, delivery: &str) {
    for _ in 0..20 {
        if cloud.process(intake::submit(ports, body, delivery, Some("AIDASIMULATED"))).await.is_some_and(|r| r.is_ok())
        {
            return;
        }
        let now = cloud.now();
        cloud.advance_to(now + Duration::seconds(30));
    }
}

/// One reaper pass that acts, as the scheduled tick runs it; what it did
/// is read from its report.
async fn reap(ports: &Ports, cloud: &FakeCloud, result: &mut WorldResult) {
    let settings = flotilla_shared::reaper::ReaperSettings::from(&ports.settings);
    let Some(Ok(summary)) = cloud.process(flotilla_shared::reaper::run(ports, &settings, false)).await else { return };
    let Some(key) = summary["report"].as_str() else { return };
    let body = cloud.lock().objects.get(key).map(|(body, _)| body.clone());
    let report: Value = body.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    let failed: BTreeSet<String> =
        report["errors"].as_array().into_iter().flatten().map(|e| e["action"].to_string()).collect();
    for action in report["planned"].as_array().into_iter().flatten() {
        if !failed.contains(&action.to_string()) {
            let kind = action["action"].as_str().unwrap_or("?").to_string();
            *result.reaper_actions.entry(kind).or_default() += 1;
        }
    }
}

fn completed(snapshot: &FakeSnapshot, now: DateTime<Utc>) -> bool {
    !snapshot.fails && now >= snapshot.completes_at
}

fn tag<'a>(snapshot: &'a FakeSnapshot, key: &str) -> &'a str {
    snapshot.tags.get(key).map(String::as_str).unwrap_or_default()
}

/// The lineage's newest snapshot tagged good and completed, for a job that
/// restores from it (as a user would pick it in the console).
fn newest_good(cloud: &FakeCloud, name: &str) -> Option<String> {
    let state = cloud.lock();
    let now = state.now.unwrap_or_default();
    state
        .snapshots
        .iter()
        .filter(|s| tag(s, tags::JOB_NAME) == name && tag(s, tags::GOOD) == "true" && completed(s, now))
        .max_by_key(|s| s.started_at)
        .map(|s| s.id.clone())
}

/// Invariants that hold at every moment (`invariants/`).
fn check_live(
    world: &World,
    cloud: &FakeCloud,
    submitted: &BTreeMap<usize, DateTime<Utc>>,
    sources: &BTreeMap<String, String>,
    result: &mut WorldResult,
) {
    // A job's outcome is the one thing read from its record: once decided
    // SUCCEEDED (its final snapshots marked good), its own prune may run.
    let records: BTreeMap<String, flotilla_shared::record::JobRecord> = submitted
        .keys()
        .filter_map(|i| {
            let id = world.jobs[*i].spec["id"].as_str()?.to_string();
            Some((id.clone(), cloud.record(&id)?))
        })
        .collect();
    let states: BTreeMap<String, JobState> = records
        .iter()
        .map(|(id, r)| {
            let decided = r.outcome == Some(flotilla_shared::record::Outcome::Succeeded);
            (id.clone(), if decided { JobState::Succeeded } else { r.state })
        })
        .collect();
    let state = cloud.lock();
    let live = invariants::Live {
        world,
        submitted,
        sources,
        states: &states,
        state: &state,
        now: state.now.unwrap_or_default(),
    };
    let mut found = Vec::new();
    invariants::check_live(&live, &mut found);
    drop(state);
    for (invariant, detail) in found {
        violation(result, invariant, detail);
    }
}

/// What must hold once the world settled.
fn check_end(
    world: &World,
    cloud: &FakeCloud,
    submitted: &BTreeMap<usize, DateTime<Utc>>,
    cancelled: &BTreeMap<usize, DateTime<Utc>>,
    grace: Duration,
    result: &mut WorldResult,
) {
    let mut bounds: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for (i, at) in submitted {
        let spec = &world.jobs[*i].spec;
        let id = spec["id"].as_str().unwrap_or_default().to_string();
        let Some(record) = cloud.record(&id) else {
            violation(result, "terminal", format!("{id}: no record"));
            continue;
        };
        *result.states.entry(record.state.to_string()).or_default() += 1;
        if !record.state.is_terminal() {
            violation(result, "terminal", format!("{id}: still {} ({})", record.state, record.reason));
        }
        result.bound_stops += record.attempts().filter(|a| a.at_bound).count();
        // The bound from what the world did: its submission and its cancel.
        let deadline = *at + Duration::minutes(spec["deadline_minutes"].as_i64().unwrap_or(60));
        let stop = cancelled.get(i).map_or(deadline, |c| (*c).max(*at).min(deadline));
        bounds.insert(id, stop + grace);
    }
    (result.calls, result.mutating_calls) = cloud.call_totals();
    let state = cloud.lock();
    let end = invariants::End { bounds: &bounds, state: &state, now: state.now.unwrap_or_default() };
    result.max_bound_lateness_seconds =
        result.max_bound_lateness_seconds.max(invariants::check_end(&end, &mut result.violations));
    result.rescues = state.evidence.snapshots_created.iter().filter(|s| tag(s, tags::REAPED) == "true").count();
}

/// Many worlds: the mix and the figures `make chaos` prints.
#[derive(Debug, Default)]
pub struct LineageCampaign {
    pub worlds: usize,
    pub jobs: usize,
    pub lineages: usize,
    pub runs: usize,
    pub consumers: usize,
    pub overlapping: usize,
    pub cancels_first: usize,
    pub rescues: usize,
    pub bound_stops: usize,
    pub max_bound_lateness_seconds: i64,
    pub states: BTreeMap<String, usize>,
    pub reaper_actions: BTreeMap<String, u64>,
    pub violations: BTreeMap<String, usize>,
    pub failed_seeds: Vec<String>,
}

impl LineageCampaign {
    pub fn add(&mut self, world: &World, result: &WorldResult) {
        self.worlds += 1;
        self.jobs += result.jobs;
        self.lineages += world.lineages;
        self.runs += result.runs;
        self.consumers += result.consumers;
        self.overlapping += result.overlapping;
        self.cancels_first += result.cancels_first;
        self.rescues += result.rescues;
        self.bound_stops += result.bound_stops;
        self.max_bound_lateness_seconds = self.max_bound_lateness_seconds.max(result.max_bound_lateness_seconds);
        for (state, n) in &result.states {
            *self.states.entry(state.clone()).or_default() += n;
        }
        for (action, n) in &result.reaper_actions {
            *self.reaper_actions.entry(action.clone()).or_default() += n;
        }
        for (invariant, _) in &result.violations {
            *self.violations.entry(invariant.clone()).or_default() += 1;
        }
        if !result.violations.is_empty() {
            self.failed_seeds.push(format!("lineage world {}: {:?}", result.seed, result.violations));
        }
    }

    pub fn print(&self) {
        println!(
            "lineage worlds: {} worlds, {} jobs: {} lineages, {} runs ({:.1} per lineage, {} overlapping the previous run), \
             {} jobs restoring from a lineage, {} cancels sent before their job",
            self.worlds,
            self.jobs,
            self.lineages,
            self.runs,
            self.runs as f64 / self.lineages.max(1) as f64,
            self.overlapping,
            self.consumers,
            self.cancels_first
        );
        println!("  outcomes: {:?}", self.states);
        println!("  reaper actions executed: {:?}; rescue snapshots taken: {}", self.reaper_actions, self.rescues);
        println!(
            "  attempts stopped at their bound: {}; latest instance stop past its bound: {} s (slack {} min)",
            self.bound_stops,
            self.max_bound_lateness_seconds.max(0),
            BOUND_SLACK_MINUTES
        );
        println!("  violations per invariant:");
        for invariant in INVARIANTS {
            println!("    {invariant:<26} {}", self.violations.get(invariant).copied().unwrap_or(0));
        }
    }
}
