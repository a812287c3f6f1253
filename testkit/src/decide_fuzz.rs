//! The decision function fed arbitrary observations and action results, from
//! a seed: it must never panic, and never choose to delete a volume that it
//! attached (so may hold data) and whose policy wants a snapshot unless a
//! `completed` snapshot of it was observed.
//! `make fuzz` runs many more seeds than `make test` (FLOTILLA_FUZZ_CASES),
//! and `fuzz/` drives the same checker from libFuzzer's bytes ([`run_bytes`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Duration, TimeZone, Utc};

use crate::fake::Rng;
use flotilla_shared::error::CloudError;
use flotilla_shared::plan::plan;
use flotilla_shared::ports::{InstanceView, InvocationView, SnapshotView, VolumeView};
use flotilla_shared::reconcile::decide::*;
use flotilla_shared::record::{JobRecord, Phase};
use flotilla_shared::settings::Settings;
use flotilla_shared::spec::{parse, SnapshotPolicy};
use flotilla_shared::states::SnapshotState;
use flotilla_shared::tags;

/// Where the checker's choices come from: a seeded generator, or the bytes
/// a coverage-guided fuzzer mutates (so it can steer every choice).
pub trait Choices {
    /// A number in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64;
    fn chance(&mut self, p: f64) -> bool;
}

impl Choices for Rng {
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        Rng::range(self, lo, hi)
    }
    fn chance(&mut self, p: f64) -> bool {
        Rng::chance(self, p)
    }
}

/// Choices read from fuzzer input; zeros once it runs out.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn take(&mut self, n: usize) -> u64 {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }
}

impl Choices for Bytes<'_> {
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi - lo).max(0) as u64 + 1;
        lo + (self.take(2) % span) as i64
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.take(1) as f64) < p * 256.0
    }
}

fn pick<'a>(rng: &mut impl Choices, from: &[&'a str]) -> &'a str {
    from[rng.range(0, from.len() as i64 - 1) as usize]
}

fn spec(rng: &mut impl Choices) -> serde_json::Value {
    let policy = pick(rng, &["always", "on-success", "never"]);
    let mut volume = serde_json::json!({"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf",
        "mount_point": "/data", "snapshot": policy});
    if policy == "always" && rng.chance(0.5) {
        volume["on_retry"] = serde_json::json!("restore");
    }
    let mut volumes = vec![volume];
    if rng.chance(0.5) {
        volumes.push(serde_json::json!({"name": "logs", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdg",
            "mount_point": "/logs", "snapshot": pick(rng, &["always", "on-success", "never"])}));
    }
    serde_json::json!({
        "id": "fz", "fleet": {"count": rng.range(1, 3)}, "instance_types": ["t3.micro", "t3.small"],
        "image": "ami-0abc1234", "volumes": volumes, "market": "spot", "on_demand_fallback": true,
        "setup": {"commands": [["true"]]}, "before_unmount": {"commands": [["sync"]]},
        "run": {"commands": [["true"]]}, "retry": {"attempts": 3}, "deadline_minutes": 60
    })
}

/// What the cloud might show: any state for anything the record knows of.
fn observe(record: &JobRecord, rng: &mut impl Choices, snapshot_of: &BTreeMap<String, String>) -> Observation {
    let mut obs = Observation { health_due: rng.chance(0.3), health_checked: rng.chance(0.3), ..Default::default() };
    for attempt in record.attempts() {
        if let Some(id) = &attempt.instance_id {
            if rng.chance(0.9) {
                let state = pick(
                    rng,
                    &["pending", "running", "running", "running", "stopping", "stopped", "shutting-down", "terminated"],
                );
                obs.instances.insert(
                    id.clone(),
                    InstanceView {
                        instance_id: id.clone(),
                        state: state.into(),
                        availability_zone: "us-east-1a".into(),
                        launch_index: 0,
                        job_id: Some(record.job_id.clone()),
                        launch_token: attempt.launch_token.clone(),
                        tags: BTreeMap::new(),
                    },
                );
            }
            if rng.chance(0.5) {
                obs.agents_checked.insert(id.clone());
                if rng.chance(0.7) {
                    obs.online.insert(id.clone());
                }
            }
            if obs.health_checked && rng.chance(0.1) {
                obs.impaired.insert(id.clone());
            } else if obs.health_checked {
                obs.healthy.insert(id.clone());
            }
        }
        for volume in &attempt.volumes {
            let Some(id) = &volume.volume_id else { continue };
            if rng.chance(0.1) {
                obs.gone_volumes.insert(id.clone());
                continue;
            }
            let owner = match rng.range(0, 2) {
                0 => None,
                1 => attempt.instance_id.clone(),
                _ => Some("i-someone-else".to_string()),
            };
            obs.volumes.insert(
                id.clone(),
                VolumeView {
                    volume_id: id.clone(),
                    state: pick(rng, &["creating", "available", "available", "in-use", "error"]).into(),
                    availability_zone: "us-east-1a".into(),
                    attached_to: owner,
                    tags: BTreeMap::from([(tags::ATTEMPT.to_string(), volume.token.clone())]),
                },
            );
        }
        for volume in &attempt.volumes {
            let Some(snapshot_id) = volume.snapshot.as_ref().and_then(|s| s.snapshot_id.clone()) else { continue };
            obs.snapshots.insert(
                snapshot_id.clone(),
                SnapshotView {
                    snapshot_id: snapshot_id.clone(),
                    volume_id: snapshot_of.get(&snapshot_id).cloned().unwrap_or_default(),
                    state: pick(rng, &["pending", "completed", "error"]).into(),
                    started_at: Utc::now(),
                    tags: BTreeMap::new(),
                },
            );
        }
        for run in attempt.phases.iter().filter(|p| p.status.is_none()) {
            let command = record.commands.get(&run.batch).and_then(|b| b.command_id.clone());
            if let (Some(command_id), Some(instance_id)) = (command, &attempt.instance_id) {
                let status = pick(
                    rng,
                    &[
                        "InProgress",
                        "Success",
                        "Success",
                        "Failed",
                        "TimedOut",
                        "Cancelled",
                        "Cancelling",
                        "Undeliverable",
                    ],
                );
                obs.invocations.insert(
                    (command_id, instance_id.clone()),
                    InvocationView {
                        instance_id: instance_id.clone(),
                        status: status.into(),
                        exit_code: match status {
                            "Success" => Some(0),
                            "Failed" => Some(rng.range(1, 137) as i32),
                            _ => None,
                        },
                        stdout: "out".into(),
                        stderr: String::new(),
                        output_uri: None,
                    },
                );
            }
        }
    }
    obs
}

fn result(action: &Action, rng: &mut impl Choices, next: &mut u64) -> Result<Done, CloudError> {
    let error = |code: &str| Err(CloudError::api("ec2", action.name(), code, "fuzz"));
    match rng.range(0, 19) {
        0 => return error("RequestLimitExceeded"),
        1 => return error("InternalError"),
        2 => return error("InsufficientInstanceCapacity"),
        3 => return error("UnauthorizedOperation"),
        4 => return error("InvalidVolume.NotFound"),
        5 => return error("VolumeInUse"),
        _ => {}
    }
    *next += 1;
    Ok(match action {
        Action::Launch { request } => Done::Launched(
            (0..rng.range(0, i64::from(request.count)))
                .map(|i| InstanceView {
                    instance_id: format!("i-{next}-{i}"),
                    state: "pending".into(),
                    availability_zone: "us-east-1a".into(),
                    launch_index: i as u32,
                    job_id: Some(request.job_id.clone()),
                    launch_token: Some(request.client_token.clone()),
                    tags: BTreeMap::new(),
                })
                .collect(),
        ),
        Action::CreateVolume { .. } => Done::Created(format!("vol-{next}")),
        Action::Send { .. } => Done::Sent(format!("cmd-{next}")),
        Action::Snapshot { .. } => Done::Snapshotted(format!("snap-{next}")),
        Action::Prune { .. } => Done::Pruned(vec![]),
        _ => Done::Ok,
    })
}

/// One seeded run of up to 80 decisions. Returns the first violation.
pub fn run(seed: u64) -> Result<(), String> {
    check(&mut Rng::new(seed))
}

/// The same checker, every choice taken from `data` (libFuzzer's input).
pub fn run_bytes(data: &[u8]) -> Result<(), String> {
    check(&mut Bytes { data })
}

fn check(rng: &mut impl Choices) -> Result<(), String> {
    let spec = parse(&spec(rng).to_string()).map_err(|e| e.to_string())?;
    let start = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time");
    let mut record = JobRecord::new(
        "fz".into(),
        spec.clone(),
        plan(&spec, &flotilla_shared::plan::Prices::builtin()).map_err(|e| e.to_string())?,
        start,
    );
    let settings = Settings { worker_instance_profile: Some("w".into()), ..Settings::default() };
    let mut now = start;
    let mut next = 0u64;
    let mut completed_seen: BTreeSet<String> = BTreeSet::new();
    let mut snapshot_of: BTreeMap<String, String> = BTreeMap::new();
    // Volumes the job attached: only those can hold data.
    let mut attached: BTreeSet<String> = BTreeSet::new();
    for step in 0..80 {
        now += Duration::seconds(rng.range(1, 600));
        if rng.chance(0.02) {
            record.cancel_requested = true;
        }
        let obs = observe(&record, rng, &snapshot_of);
        completed_seen.extend(
            obs.snapshots.values().filter(|s| s.state == SnapshotState::Completed).map(|s| s.snapshot_id.clone()),
        );
        let context = Context { now, settings: &settings, bucket: "b", launch_grant: None };
        let (actions, _) = decide(&mut record, &obs, &context);
        for action in &actions {
            if let Action::DeleteVolume { volume_id } = action {
                for attempt in record.attempts() {
                    let Some(volume) = attempt.volumes.iter().find(|v| v.volume_id.as_deref() == Some(volume_id))
                    else {
                        continue;
                    };
                    let policy = spec.volumes.iter().find(|v| v.name == volume.name).map(|v| v.snapshot);
                    let required = match policy {
                        Some(SnapshotPolicy::Always) => true,
                        Some(SnapshotPolicy::OnSuccess) => attempt.completed_phases.contains(&Phase::Run),
                        _ => false,
                    };
                    let snapshot = volume.snapshot.as_ref().and_then(|s| s.snapshot_id.clone());
                    let safe = snapshot.as_ref().is_some_and(|id| completed_seen.contains(id));
                    if required && !safe && attached.contains(volume_id) {
                        if std::env::var("FLOTILLA_FUZZ_TRACE").is_ok() {
                            println!("{:#?}", attempt);
                        }
                        return Err(format!(
                            "step {step}: DeleteVolume {volume_id} with no completed snapshot ({snapshot:?})"
                        ));
                    }
                }
            }
        }
        for action in &actions {
            let done = result(action, rng, &mut next);
            if std::env::var("FLOTILLA_FUZZ_TRACE").is_ok() {
                println!(
                    "step {step}: {} -> {:?}",
                    action.name(),
                    done.as_ref().map(|_| ()).map_err(|e| e.to_string())
                );
            }
            if let (Action::Snapshot { volume_id, .. }, Ok(Done::Snapshotted(id))) = (action, &done) {
                snapshot_of.insert(id.clone(), volume_id.clone());
            }
            if let (Action::Attach { volume_id, .. }, Ok(_)) = (action, &done) {
                attached.insert(volume_id.clone());
            }
            apply(&mut record, action, done, now);
        }
        if record.state.is_terminal() {
            break;
        }
    }
    Ok(())
}
