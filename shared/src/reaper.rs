//! The reaper: the scheduled safety net behind every job's own teardown. It
//! records dead-lettered reconcile messages on their jobs, takes an inventory
//! of what Flotilla manages in the account (instances in every state,
//! volumes, snapshots) and of the jobs they belong to, decides in one pure
//! function (`plan`), acts, and writes what it did to `reaper/<time>.json`.
//!
//! - An instance or volume is an orphan when its job ended or has no record,
//!   or when it is past its `expires-at` and its job makes no progress (no
//!   live lease, no pass for `stall_grace`). A job whose record cannot be
//!   read is no evidence: only `expires-at` condemns then.
//! - Mark, then delete: an orphan is tagged `flotilla:orphaned-at` on one
//!   pass and removed on a later one, so a record written a moment late never
//!   loses its fleet. A mark older than `MARK_STALE` is renewed, not acted on.
//! - A volume is deleted only once a `completed` snapshot of it exists (the
//!   reaper takes one if needed), unless it is tagged scratch. Volumes that
//!   are not `available` (in use, or in `error`) are reported, not touched;
//!   `volume_id` sources are never tagged as managed, and never touched
//!   while a running job names them.
//! - Snapshot lineages are pruned by the one retention rule
//!   (`retention.rs`), with the retention their tags carry; rescue snapshots
//!   are outside it.
//! - A job past its deadline by twice the grace that no pass holds is ended
//!   FAILED with the reason (written only if nothing wrote it since the
//!   inventory), and the reaper removes what it left.
//! - `dry_run` plans and reports, and changes nothing (it does not even read
//!   the dead-letter queue).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::{CloudError, StepError};
use crate::ports::{Cloud, InstanceView, Ports, SnapshotView, VolumeView, WriteOutcome};
use crate::record::{DebugHold, JobRecord, JobState, Outcome, PhaseStamp};
use crate::retention::{self, Facts};
use crate::spec::VolumeSource;
use crate::states::{InstanceState, SnapshotState, VolumeState};
use crate::tags;
use crate::wake::Trigger;

/// A job that is not terminal, as the reaper saw it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActiveJob {
    pub deadline_at: Option<DateTime<Utc>>,
    /// When a pass last wrote it.
    pub updated_at: Option<DateTime<Utc>>,
    /// A pass holds its lease right now.
    pub leased: bool,
    /// It acts in another account (`role_arn`): its resources are not here.
    pub foreign: bool,
    /// The record's version, so ending it never overwrites a newer write.
    pub version: String,
    /// `volume_id` sources its spec names: never the reaper's.
    pub volume_sources: Vec<String>,
}

/// What the reaper knows of a job its resources name.
#[derive(Debug, Clone, PartialEq)]
pub enum JobView {
    Active(ActiveJob),
    Terminal {
        state: JobState,
    },
    /// No record: never submitted here, or deleted.
    Missing,
    /// The lookup failed: no evidence either way.
    Unknown {
        error: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub instances: Vec<InstanceView>,
    pub volumes: Vec<VolumeView>,
    pub snapshots: Vec<SnapshotView>,
    pub jobs: BTreeMap<String, JobView>,
    /// Snapshots jobs name as their source, and the jobs (`sources.rs`).
    pub claims: BTreeMap<String, Vec<String>>,
    /// Debug holds of ended jobs, by job: the held instance is kept until
    /// the hold ends, and its volumes need a snapshot taken after it.
    pub holds: BTreeMap<String, DebugHold>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ReapAction {
    /// Tag an orphan; a later pass removes it.
    Mark {
        resource_id: String,
        why: String,
    },
    Terminate {
        instance_id: String,
        why: String,
    },
    Snapshot {
        volume_id: String,
        why: String,
        tags: BTreeMap<String, String>,
    },
    DeleteVolume {
        volume_id: String,
        why: String,
    },
    DeleteSnapshot {
        snapshot_id: String,
        why: String,
    },
    /// End a job that stopped making progress; its resources are reaped.
    EndJob {
        job_id: String,
        why: String,
        version: String,
    },
    /// Nothing the reaper may do: a person should look (reported only).
    Leave {
        resource_id: String,
        why: String,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct ReaperSettings {
    /// How long a mark must stand before the reaper acts on it: less than the
    /// reaper's period, so the next pass acts.
    pub mark_grace: Duration,
    /// How long without a pass makes a job past its expiry "not progressing".
    pub stall_grace: Duration,
}

/// A mark this old is stale (the resource was not an orphan for a while, or
/// the reaper was off): renew it and wait again rather than act.
const MARK_STALE_MINUTES: i64 = 60;
/// Snapshots the reaper takes of one volume that may end in `error` before
/// it gives up and reports the volume.
const REAPER_SNAPSHOT_TRIES: usize = 3;

fn parse_time(value: Option<&String>) -> Option<DateTime<Utc>> {
    value.and_then(|v| DateTime::parse_from_rfc3339(v).ok()).map(|t| t.with_timezone(&Utc))
}

/// No pass holds the job and none wrote it for `stall_grace`.
fn stalled(job: &ActiveJob, now: DateTime<Utc>, settings: &ReaperSettings) -> bool {
    !job.leased && job.updated_at.is_none_or(|at| now - at > settings.stall_grace)
}

/// Why a resource is an orphan, or None if something still needs it.
fn orphaned(
    resource_tags: &BTreeMap<String, String>,
    jobs: &BTreeMap<String, JobView>,
    now: DateTime<Utc>,
    settings: &ReaperSettings,
) -> Option<String> {
    let job = resource_tags.get(tags::JOB_ID).map(|id| (id, jobs.get(id)));
    let expired = parse_time(resource_tags.get(tags::EXPIRES_AT)).filter(|at| *at < now);
    let expired_why =
        |at: DateTime<Utc>| format!("past its expires-at {}", at.to_rfc3339_opts(SecondsFormat::Secs, true));
    match job {
        None => Some("carries no flotilla:job-id".into()),
        Some((id, Some(JobView::Terminal { state }))) => Some(format!("its job {id} ended {state}")),
        Some((id, Some(JobView::Missing))) => Some(format!("its job {id} has no record")),
        // A job still making progress keeps its resources, expired or not:
        // its own teardown is under way.
        Some((id, Some(JobView::Active(active)))) => expired
            .filter(|_| stalled(active, now, settings))
            .map(|at| format!("{}, and its job {id} makes no progress", expired_why(at))),
        // The lookup failed, or was not made: only expiry is evidence.
        Some((_, Some(JobView::Unknown { .. }) | None)) => expired.map(expired_why),
    }
}

/// When the debug hold on this instance or volume ends (past or not): the
/// job record's word, which knows of an early release, else the
/// `held-until` tag the hold put on it, for when the record cannot be read.
fn hold_ends(inventory: &Inventory, id: &str, resource_tags: &BTreeMap<String, String>) -> Option<DateTime<Utc>> {
    let from_record = resource_tags
        .get(tags::JOB_ID)
        .and_then(|job_id| inventory.holds.get(job_id))
        .filter(|hold| hold.instance_id == id || hold.volume_ids.iter().any(|v| v == id))
        .map(DebugHold::ends_at);
    from_record.or_else(|| parse_time(resource_tags.get(tags::HELD_UNTIL)))
}

/// Mark now (or renew a stale mark), or act once the mark has stood for the grace.
fn mark_or(
    id: &str,
    resource_tags: &BTreeMap<String, String>,
    why: String,
    now: DateTime<Utc>,
    settings: &ReaperSettings,
    act: impl FnOnce(String) -> Option<ReapAction>,
) -> Option<ReapAction> {
    match parse_time(resource_tags.get(tags::ORPHANED_AT)) {
        Some(marked) if now - marked > Duration::minutes(MARK_STALE_MINUTES) => {
            Some(ReapAction::Mark { resource_id: id.to_string(), why: format!("{why} (stale mark renewed)") })
        }
        Some(marked) if now - marked >= settings.mark_grace => act(why),
        Some(_) => None,
        None => Some(ReapAction::Mark { resource_id: id.to_string(), why }),
    }
}

/// Decide everything one reaper pass does. Pure: no I/O.
pub fn plan(inventory: &Inventory, now: DateTime<Utc>, settings: &ReaperSettings) -> Vec<ReapAction> {
    let mut actions = Vec::new();
    for (job_id, job) in &inventory.jobs {
        let JobView::Active(active) = job else { continue };
        let Some(deadline) = active.deadline_at else { continue };
        // Its resources live in another account: only its own teardown can
        // release them, so it is never ended from here.
        if active.foreign || now <= deadline + settings.stall_grace * 2 || !stalled(active, now, settings) {
            continue;
        }
        actions.push(ReapAction::EndJob {
            job_id: job_id.clone(),
            why: format!(
                "no progress {} min past its deadline; the reaper removes what it left",
                (now - deadline).num_minutes()
            ),
            version: active.version.clone(),
        });
    }
    for instance in &inventory.instances {
        if matches!(instance.state, InstanceState::ShuttingDown | InstanceState::Terminated) {
            continue;
        }
        if hold_ends(inventory, &instance.instance_id, &instance.tags).is_some_and(|end| now < end) {
            continue; // held for debugging: the reaper's after the hold
        }
        let Some(why) = orphaned(&instance.tags, &inventory.jobs, now, settings) else { continue };
        let id = instance.instance_id.clone();
        let why = format!("instance {id} ({}): {why}", instance.state);
        actions.extend(mark_or(&id, &instance.tags, why, now, settings, |why| {
            Some(ReapAction::Terminate { instance_id: id.clone(), why })
        }));
    }
    actions.extend(plan_volumes(inventory, now, settings));
    actions.extend(prune(inventory, now));
    actions
}

/// Orphaned volumes: snapshotted (unless scratch), then deleted once a
/// completed snapshot holds their data; what cannot be snapshotted is left.
fn plan_volumes(inventory: &Inventory, now: DateTime<Utc>, settings: &ReaperSettings) -> Vec<ReapAction> {
    let mut actions = Vec::new();
    let sources: BTreeSet<&String> = inventory
        .jobs
        .values()
        .filter_map(|j| match j {
            JobView::Active(active) => Some(active.volume_sources.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    for volume in &inventory.volumes {
        if volume.attached_to.is_some() || sources.contains(&volume.volume_id) {
            continue; // attached volumes wait for their instance to go
        }
        let hold_ended = hold_ends(inventory, &volume.volume_id, &volume.tags);
        if hold_ended.is_some_and(|end| now < end) {
            continue; // detached by the person debugging: still theirs until the hold ends
        }
        let Some(why) = orphaned(&volume.tags, &inventory.jobs, now, settings) else { continue };
        let id = volume.volume_id.clone();
        if volume.state != VolumeState::Available {
            if volume.state == VolumeState::Error {
                let why =
                    format!("volume {id} is in state error: it cannot be snapshotted, so it is left for you ({why})");
                actions.push(ReapAction::Leave { resource_id: id, why });
            }
            continue;
        }
        let why = format!("volume {id}: {why}");
        // A held volume may have changed during the hold: only a snapshot
        // the reaper took (which it does only once the hold is over) holds
        // what it holds; the failure's snapshot predates the hold.
        let was_held = hold_ended.is_some();
        let snapshots: Vec<&SnapshotView> = inventory
            .snapshots
            .iter()
            .filter(|s| s.volume_id == id)
            .filter(|s| !was_held || s.tags.get(tags::REAPED).is_some_and(|v| v == "true"))
            .collect();
        let scratch = volume.tags.get(tags::SCRATCH).is_some_and(|v| v == "true");
        actions.extend(mark_or(&id, &volume.tags, why, now, settings, |why| {
            if scratch {
                return Some(ReapAction::DeleteVolume { volume_id: id.clone(), why: format!("{why}; scratch") });
            }
            if let Some(done) = snapshots.iter().find(|s| s.state == SnapshotState::Completed) {
                let why = format!("{why}; its data is in {}", done.snapshot_id);
                return Some(ReapAction::DeleteVolume { volume_id: id.clone(), why });
            }
            if snapshots.iter().any(|s| s.state == SnapshotState::Pending) {
                return None; // the next pass deletes it once the snapshot completes
            }
            if snapshots.iter().filter(|s| s.state == SnapshotState::Error).count() >= REAPER_SNAPSHOT_TRIES {
                let why =
                    format!("{why}; {REAPER_SNAPSHOT_TRIES} snapshots of it ended in error, so it is kept for you");
                return Some(ReapAction::Leave { resource_id: id.clone(), why });
            }
            Some(ReapAction::Snapshot { volume_id: id.clone(), why, tags: reaped_snapshot_tags(volume) })
        }));
    }
    actions
}

/// The snapshot the reaper takes of an orphaned volume before deleting it:
/// the volume's own tags (job, name, shard), marked as taken by the reaper,
/// and with no retention tags, so no lineage pruning ever removes it: it is
/// the only copy of what the volume held.
fn reaped_snapshot_tags(volume: &VolumeView) -> BTreeMap<String, String> {
    let mut kept: BTreeMap<String, String> = volume
        .tags
        .iter()
        .filter(|(k, _)| !k.starts_with("aws:") && k.as_str() != tags::ORPHANED_AT && k.as_str() != tags::EXPIRES_AT)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept.insert(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into());
    kept.insert(tags::SOURCE_VOLUME.into(), volume.volume_id.clone());
    kept.insert(tags::REAPED.into(), "true".into());
    kept
}

/// Snapshot retention (`retention.rs`), with the retention each lineage's
/// snapshots carry. Jobs not known to have ended keep their snapshots, and
/// so do snapshots an active job claims as its source; each deletion
/// re-checks the claims (`sources.rs`).
fn prune(inventory: &Inventory, now: DateTime<Utc>) -> Vec<ReapAction> {
    let ended = |id: &String| matches!(inventory.jobs.get(id), Some(JobView::Terminal { .. } | JobView::Missing));
    let active_jobs: BTreeSet<String> = inventory
        .snapshots
        .iter()
        .filter_map(|s| s.tags.get(tags::JOB_ID))
        .chain(inventory.claims.values().flatten())
        .filter(|id| !ended(id))
        .cloned()
        .collect();
    let succeeded_jobs = inventory
        .jobs
        .iter()
        .filter(|(_, job)| matches!(job, JobView::Terminal { state: JobState::Succeeded }))
        .map(|(id, _)| id.clone())
        .collect();
    let facts = Facts {
        sources: crate::sources::claimed_by(&inventory.claims, &active_jobs),
        active_jobs,
        succeeded_jobs: Some(succeeded_jobs),
        live_volumes: Some(inventory.volumes.iter().map(|v| v.volume_id.clone()).collect()),
    };
    retention::plan(&inventory.snapshots, None, &facts, now)
        .into_iter()
        .map(|d| ReapAction::DeleteSnapshot { snapshot_id: d.snapshot_id, why: d.why })
        .collect()
}

/// Read what Flotilla manages in this account, and the jobs it belongs to.
pub async fn take_inventory(ports: &Ports) -> Result<Inventory, CloudError> {
    take_inventory_in(ports, &ports.cloud).await
}

/// The same in the account `cloud` acts in (a `role_arn` target's); the jobs
/// are always read from this deployment's ledger.
pub async fn take_inventory_in(ports: &Ports, cloud: &Cloud) -> Result<Inventory, CloudError> {
    let managed = tags::scope(&ports.settings.stack);
    let mut inventory = Inventory {
        instances: cloud.fleet.find_managed(&ports.settings.stack).await?,
        volumes: cloud.volumes.find_volumes(&managed).await?,
        snapshots: cloud.volumes.find_snapshots(&managed).await?,
        jobs: BTreeMap::new(),
        claims: crate::sources::claims(ports.ledger.as_ref()).await?,
        holds: BTreeMap::new(),
    };
    let mut job_ids: BTreeSet<String> = BTreeSet::new();
    job_ids.extend(inventory.instances.iter().filter_map(|i| i.tags.get(tags::JOB_ID).cloned()));
    job_ids.extend(inventory.volumes.iter().filter_map(|v| v.tags.get(tags::JOB_ID).cloned()));
    job_ids.extend(inventory.snapshots.iter().filter_map(|s| s.tags.get(tags::JOB_ID).cloned()));
    job_ids.extend(ports.ledger.list_active().await?);
    job_ids.extend(inventory.claims.values().flatten().cloned());
    let now = ports.clock.now();
    for job_id in job_ids {
        let view = match ports.ledger.load(&job_id).await {
            Ok(Some(loaded)) if loaded.record.state.is_terminal() => {
                if let Some(hold) = loaded.record.hold.clone() {
                    inventory.holds.insert(job_id.clone(), hold);
                }
                JobView::Terminal { state: loaded.record.state }
            }
            Ok(Some(loaded)) => {
                let record = loaded.record;
                let spec = record.spec.as_ref();
                JobView::Active(ActiveJob {
                    deadline_at: record.deadline_at,
                    updated_at: record.updated_at,
                    leased: record.lease.as_ref().is_some_and(|l| l.until > now),
                    foreign: spec.is_some_and(|s| s.role_arn.is_some()),
                    version: loaded.version,
                    volume_sources: spec
                        .iter()
                        .flat_map(|s| s.volumes.iter())
                        .filter_map(|v| match &v.source {
                            VolumeSource::VolumeId(id) => Some(id.clone()),
                            _ => None,
                        })
                        .collect(),
                })
            }
            Ok(None) => JobView::Missing,
            Err(err) => JobView::Unknown { error: err.to_string() },
        };
        inventory.jobs.insert(job_id, view);
    }
    Ok(inventory)
}

/// `stranded/<job id>`: instances a job could not terminate because its
/// role could no longer be assumed. Every reaper report lists them until a
/// person has dealt with them and deletes the key.
pub fn stranded_key(job_id: &str) -> String {
    format!("stranded/{job_id}")
}

/// What `stranded/` holds, for the report.
async fn stranded(ports: &Ports) -> Result<Vec<Value>, CloudError> {
    let keys = ports.ledger.list_keys(ports.ledger.bucket(), "stranded/", 1000).await?.unwrap_or_default();
    let mut found = Vec::new();
    for key in keys {
        if let Some(body) = ports.ledger.get(&key).await? {
            found.push(serde_json::from_slice(&body).unwrap_or_else(|_| json!({ "key": key })));
        }
    }
    Ok(found)
}

/// Dead letters handled per reaper pass.
const DEAD_LETTERS_PER_PASS: usize = 100;
/// Message ids of dead letters a record remembers, so a letter seen twice
/// (a crash before its delete, two overlapping ticks) counts once.
const DEAD_LETTER_IDS_KEPT: usize = 20;

/// The job a dead-lettered reconcile message was for: a wake message names
/// it; an EC2 event names an instance whose tag names it.
async fn job_of_letter(ports: &Ports, body: &str) -> Result<Option<String>, CloudError> {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if let Some(job_id) = value.get("job_id").and_then(Value::as_str) {
        return Ok(Some(job_id.to_string()));
    }
    match value.pointer("/detail/instance-id").and_then(Value::as_str) {
        Some(instance_id) => {
            let mut jobs = ports.cloud.fleet.jobs_of(&ports.settings.stack, &[instance_id.to_string()]).await?;
            Ok(jobs.remove(instance_id))
        }
        None => Ok(None),
    }
}

/// Record each dead-lettered reconcile message on its job (a warning with
/// the receive count and why the last pass stopped) and wake the job: a
/// message that died only delays it. Then delete the letter; one that names
/// no job (an event for an instance that is not Flotilla's) is deleted too,
/// and listed in the report. One letter's error never stops the others.
async fn drain_dead_letters(ports: &Ports, dry_run: bool) -> Result<Vec<Value>, StepError> {
    let Some(dlq) = &ports.dead_letters else { return Ok(vec![]) };
    if dry_run {
        return Ok(vec![json!({ "skipped": "a dry run does not read the dead-letter queue" })]);
    }
    let mut seen = Vec::new();
    for letter in dlq.receive(DEAD_LETTERS_PER_PASS).await? {
        let outcome = async {
            let Some(job_id) = job_of_letter(ports, &letter.body).await? else {
                return Ok::<Value, StepError>(json!({ "job_id": null, "receive_count": letter.receive_count }));
            };
            let (count, id) = (letter.receive_count, letter.message_id.clone());
            let recorded = crate::inbox::update_inbox(
                ports,
                &job_id,
                |record| {
                    if !id.is_empty() && record.dead_letter_ids.contains(&id) {
                        return false; // counted already
                    }
                    record.dead_letters += 1;
                    record.dead_letter_ids.push(id.clone());
                    let excess = record.dead_letter_ids.len().saturating_sub(DEAD_LETTER_IDS_KEPT);
                    record.dead_letter_ids.drain(..excess);
                    let last = record.stalled.clone().unwrap_or_else(|| "no error recorded".into());
                    record.warnings.push(format!(
                        "dead-lettered: a reconcile message failed {count} receives (last pass: {last}); the job was woken"
                    ));
                    true
                },
                Trigger::DeadLetter,
            )
            .await?;
            Ok(json!({ "job_id": job_id, "receive_count": count, "recorded": recorded }))
        }
        .await;
        match outcome {
            Ok(entry) => {
                seen.push(entry);
                if let Err(err) = dlq.delete(&letter).await {
                    warn!(error = %err, "could not delete a dead letter; it is handled again next pass");
                }
            }
            Err(err) => {
                warn!(error = %err, "dead letter not recorded; kept for the next pass");
                seen.push(json!({ "error": err.to_string(), "receive_count": letter.receive_count }));
            }
        }
    }
    Ok(seen)
}

/// One reaper pass: dead letters, then in this account and in each target
/// account it is given (`FLOTILLA_REAPER_ROLE_ARNS`): inventory, plan, act
/// (unless `dry_run`); then the report.
pub async fn run(ports: &Ports, settings: &ReaperSettings, dry_run: bool) -> Result<Value, StepError> {
    let started = ports.clock.now();
    let dead_letters = drain_dead_letters(ports, dry_run).await?;
    let inventory = take_inventory(ports).await?;
    let mut actions = plan(&inventory, started, settings);
    let (mut done, mut errors) = act(ports, &ports.cloud, &actions, dry_run).await?;
    let mut planned: Vec<Value> = actions.iter().map(|a| json!(a)).collect();
    let mut found = vec![found_in("this account", &inventory)];
    let mut reaped_accounts: BTreeSet<String> = ports.settings.account_id.iter().cloned().collect();
    for role in &ports.settings.reaper_roles {
        // One pass per account: a second in the same pass would act on
        // what the first just changed (EC2's describes lag).
        let account = role.split(':').nth(4).unwrap_or_default().to_string();
        if !reaped_accounts.insert(account.clone()) {
            errors.push(
                json!({ "account": role, "error": format!("account {account} is reaped once per pass already") }),
            );
            continue;
        }
        // A role that cannot be assumed, or an account that cannot be read,
        // is reported; the other accounts are still reaped.
        let cloud = match ports.accounts.assume(role, None, "reaper").await {
            Ok(cloud) => cloud,
            Err(err) => {
                warn!(%role, error = %err, "reaper cannot act in this account");
                errors.push(json!({ "account": role, "error": err.to_string() }));
                continue;
            }
        };
        let inventory = match take_inventory_in(ports, &cloud).await {
            Ok(inventory) => known_jobs_only(inventory),
            Err(err) => {
                errors.push(json!({ "account": role, "error": err.to_string() }));
                continue;
            }
        };
        // Ending a stalled job is this account's pass's to do, once.
        let there: Vec<ReapAction> = plan(&inventory, started, settings)
            .into_iter()
            .filter(|a| !matches!(a, ReapAction::EndJob { .. }))
            .collect();
        let (done_there, errors_there) = act(ports, &cloud, &there, dry_run).await?;
        done.extend(done_there);
        errors.extend(errors_there.into_iter().map(|mut e| {
            e["account"] = json!(role);
            e
        }));
        found.push(found_in(role, &inventory));
        planned.extend(there.iter().map(|a| {
            let mut entry = json!(a);
            entry["account"] = json!(role);
            entry
        }));
        actions.extend(there);
    }
    let stranded = match stranded(ports).await {
        Ok(found) => found,
        Err(err) => vec![json!({ "error": err.to_string() })],
    };
    let report = json!({
        "at": started.to_rfc3339_opts(SecondsFormat::Millis, true),
        "dry_run": dry_run,
        "stranded": stranded,
        "found": found,
        "planned": planned,
        "done": done.len(),
        "errors": errors,
        "dead_letters": dead_letters,
    });
    let key = format!("reaper/{}.json", started.to_rfc3339_opts(SecondsFormat::Millis, true));
    let body = serde_json::to_vec_pretty(&report).map_err(|e| StepError::BadMessage(e.to_string()))?;
    ports.ledger.put(&key, &body, "application/json").await?;
    if !dry_run {
        emit_metrics(ports, done.len(), dead_letters.len(), errors.len());
    }
    // The plan as JSON in the log too: a dry run is read there.
    info!(dry_run, planned = actions.len(), done = done.len(), errors = errors.len(), %key, plan = %json!(actions), "reaper");
    Ok(json!({
        "dry_run": dry_run,
        "planned": actions.len(),
        "done": done.len(),
        "errors": errors.len(),
        "dead_letters": dead_letters.len(),
        "report": key,
    }))
}

/// The reaper's figures (`metrics`): what it removed, the dead letters it
/// recorded, and what it could not do.
fn emit_metrics(ports: &Ports, done: usize, dead_letters: usize, errors: usize) {
    use crate::metrics::Unit::Count;
    let figures = [
        ("OrphansReaped", Count, done as f64),
        ("DeadLetters", Count, dead_letters as f64),
        ("ReaperErrors", Count, errors as f64),
    ];
    crate::metrics::emit(&ports.settings.stack, None, &figures);
}

/// In another account, only what this deployment's records name: a
/// deployment there with the same stack name has jobs this ledger has never
/// seen, and "no record" must not condemn them. (An orphan there whose
/// record is gone is left to expire by hand.)
fn known_jobs_only(mut inventory: Inventory) -> Inventory {
    let known = |tags: &BTreeMap<String, String>, jobs: &BTreeMap<String, JobView>| {
        tags.get(tags::JOB_ID)
            .and_then(|id| jobs.get(id))
            .is_some_and(|view| matches!(view, JobView::Active(_) | JobView::Terminal { .. }))
    };
    let jobs = inventory.jobs.clone();
    inventory.instances.retain(|i| known(&i.tags, &jobs));
    inventory.volumes.retain(|v| known(&v.tags, &jobs));
    inventory.snapshots.retain(|s| known(&s.tags, &jobs));
    inventory
}

fn found_in(account: &str, inventory: &Inventory) -> Value {
    json!({
        "account": account,
        "instances": inventory.instances.len(),
        "volumes": inventory.volumes.len(),
        "snapshots": inventory.snapshots.len(),
        "jobs": inventory.jobs.len(),
    })
}

/// Run the planned actions in one account; one failure never stops the rest.
async fn act(
    ports: &Ports,
    cloud: &Cloud,
    actions: &[ReapAction],
    dry_run: bool,
) -> Result<(Vec<ReapAction>, Vec<Value>), StepError> {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    if dry_run {
        return Ok((done, errors));
    }
    for action in actions {
        match execute(ports, cloud, action).await {
            Ok(()) => done.push(action.clone()),
            Err(err) => {
                warn!(?action, error = %err, "reaper action failed");
                errors.push(json!({ "action": action, "error": err.to_string() }));
            }
        }
    }
    Ok((done, errors))
}

async fn execute(ports: &Ports, cloud: &Cloud, action: &ReapAction) -> Result<(), StepError> {
    match action {
        ReapAction::Mark { resource_id, .. } => {
            // Stamped when written, so the grace counts from the mark itself.
            let stamp = ports.clock.now().to_rfc3339_opts(SecondsFormat::Secs, true);
            cloud.fleet.tag(std::slice::from_ref(resource_id), tags::ORPHANED_AT, &stamp).await?;
        }
        ReapAction::Terminate { instance_id, .. } => cloud.fleet.terminate(std::slice::from_ref(instance_id)).await?,
        ReapAction::Snapshot { volume_id, why, tags: snapshot_tags } => {
            let description = format!("flotilla reaper: {why}");
            cloud.volumes.create_snapshot(volume_id, &description, snapshot_tags).await?;
        }
        ReapAction::DeleteVolume { volume_id, .. } => cloud.volumes.delete_volume(volume_id).await?,
        ReapAction::DeleteSnapshot { snapshot_id, .. } => {
            if let Some(why) = crate::sources::delete_unless_claimed(ports, cloud, snapshot_id).await? {
                info!(%snapshot_id, %why, "snapshot kept");
            }
        }
        ReapAction::EndJob { job_id, why, version } => end_job(ports, job_id, why, version).await?,
        ReapAction::Leave { .. } => {}
    }
    Ok(())
}

/// Write a stalled job's terminal state, only if nothing wrote the record
/// since the inventory read it (If-Match on that version): a pass that took
/// the lease meanwhile wins, and the job goes on. Its notices go out as a
/// pass's would.
async fn end_job(ports: &Ports, job_id: &str, why: &str, version: &str) -> Result<(), StepError> {
    let Some(loaded) = ports.ledger.load(job_id).await? else { return Ok(()) };
    if loaded.version != version || loaded.record.state.is_terminal() {
        return Ok(());
    }
    let mut record: JobRecord = loaded.record;
    let now = ports.clock.now();
    record.outcome.get_or_insert(Outcome::Failed);
    record.outcome_reason = Some(format!("reaped: {why}"));
    record.state = record.outcome.unwrap_or(Outcome::Failed).terminal_state();
    record.reason = record.outcome_reason.clone().unwrap_or_default();
    record.warnings.push(format!("reaped: {why}"));
    record.timeline.push(PhaseStamp { state: record.state, at: now });
    record.lease = None;
    record.updated_at = Some(now);
    // Its end is announced like any other (a waiting task gets its failure).
    if ports.notices.is_some() {
        crate::events::collect(&mut record, ports.ledger.bucket(), now);
    }
    record.writes += 1;
    if let WriteOutcome::Written { version } = ports.ledger.replace(&record, version).await? {
        // Sends the outbox, then takes the job off the active list; one
        // that could not be sent keeps it there for the tick's flush.
        crate::publish::finish_terminal(ports, record, version).await?;
    }
    Ok(())
}

impl ReaperSettings {
    pub fn from(settings: &crate::settings::Settings) -> Self {
        ReaperSettings {
            mark_grace: Duration::seconds(i64::from(settings.reaper_mark_grace_seconds)),
            stall_grace: Duration::minutes(i64::from(settings.expiry_grace_minutes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time")
    }

    fn at(minutes: i64) -> String {
        (now() + Duration::minutes(minutes)).to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    fn settings() -> ReaperSettings {
        ReaperSettings { mark_grace: Duration::minutes(4), stall_grace: Duration::minutes(30) }
    }

    fn instance(id: &str, job: &str, expires_in: i64, marked_ago: Option<i64>) -> InstanceView {
        let mut tags = BTreeMap::from([
            (tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string()),
            (tags::JOB_ID.to_string(), job.to_string()),
            (tags::EXPIRES_AT.to_string(), at(expires_in)),
        ]);
        if let Some(ago) = marked_ago {
            tags.insert(tags::ORPHANED_AT.to_string(), at(-ago));
        }
        InstanceView {
            instance_id: id.into(),
            state: "running".into(),
            availability_zone: "us-east-1a".into(),
            launch_index: 0,
            job_id: Some(job.into()),
            launch_token: None,
            tags,
        }
    }

    fn active(deadline_in: i64, updated_ago: i64, leased: bool) -> JobView {
        JobView::Active(ActiveJob {
            deadline_at: Some(now() + Duration::minutes(deadline_in)),
            updated_at: Some(now() - Duration::minutes(updated_ago)),
            leased,
            version: "7".into(),
            ..Default::default()
        })
    }

    /// terraform-aws-github-runner's scale-down bugs, as cases: a failed
    /// lookup is no licence to kill (nor a reason to spare an expired one),
    /// a busy instance is never touched, and a fresh mark waits a pass.
    #[test]
    fn only_evidence_condemns_and_a_mark_waits_a_pass() {
        let mut inventory = Inventory::default();
        inventory.jobs.insert("busy".into(), active(30, 0, false));
        inventory.jobs.insert("tearing-down".into(), active(-40, 0, true));
        inventory.jobs.insert("stuck".into(), active(-40, 35, false));
        inventory.jobs.insert("unknown".into(), JobView::Unknown { error: "S3 503".into() });
        inventory.jobs.insert("done".into(), JobView::Terminal { state: JobState::Succeeded });
        inventory.instances = vec![
            instance("i-busy", "busy", 60, None),
            instance("i-busy-expired-but-moving", "tearing-down", -10, Some(10)),
            instance("i-stuck-expired", "stuck", -10, None),
            instance("i-unknown", "unknown", 60, None),
            instance("i-unknown-expired", "unknown", -1, None),
            instance("i-done-fresh-mark", "done", 60, Some(1)),
            instance("i-done-old-mark", "done", 60, Some(5)),
            instance("i-done-stale-mark", "done", 60, Some(120)),
        ];
        let actions = plan(&inventory, now(), &settings());
        let named: Vec<(&str, &str)> = actions
            .iter()
            .map(|a| match a {
                ReapAction::Mark { resource_id, .. } => ("mark", resource_id.as_str()),
                ReapAction::Terminate { instance_id, .. } => ("terminate", instance_id.as_str()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            named,
            vec![
                ("mark", "i-stuck-expired"),
                ("mark", "i-unknown-expired"),
                ("terminate", "i-done-old-mark"),
                ("mark", "i-done-stale-mark"),
            ]
        );
    }

    #[test]
    fn a_job_stalled_past_its_deadline_is_ended_unless_a_pass_holds_it() {
        let mut inventory = Inventory::default();
        inventory.jobs.insert("stalled".into(), active(-65, 40, false));
        inventory.jobs.insert("not-yet".into(), active(-55, 40, false));
        inventory.jobs.insert("leased".into(), active(-65, 40, true));
        inventory.jobs.insert("moving".into(), active(-65, 0, false));
        let mut foreign = active(-65, 40, false);
        if let JobView::Active(job) = &mut foreign {
            job.foreign = true;
        }
        inventory.jobs.insert("foreign".into(), foreign);
        let actions = plan(&inventory, now(), &settings());
        assert!(
            matches!(actions.as_slice(), [ReapAction::EndJob { job_id, version, .. }] if job_id == "stalled" && version == "7"),
            "{actions:?}"
        );
    }

    #[test]
    fn an_orphaned_volume_is_snapshotted_before_it_is_deleted() {
        let volume = |snapshot_state: Option<&str>| {
            let mut inventory = Inventory::default();
            inventory.jobs.insert("done".into(), JobView::Terminal { state: JobState::Failed });
            inventory.volumes.push(VolumeView {
                volume_id: "vol-1".into(),
                state: "available".into(),
                availability_zone: "us-east-1a".into(),
                attached_to: None,
                tags: BTreeMap::from([
                    (tags::JOB_ID.to_string(), "done".to_string()),
                    (tags::ORPHANED_AT.to_string(), at(-10)),
                ]),
            });
            if let Some(state) = snapshot_state {
                inventory.snapshots.push(SnapshotView {
                    snapshot_id: "snap-1".into(),
                    volume_id: "vol-1".into(),
                    state: state.into(),
                    started_at: now(),
                    tags: BTreeMap::new(),
                });
            }
            plan(&inventory, now(), &settings())
        };
        assert!(matches!(volume(None).as_slice(), [ReapAction::Snapshot { .. }]));
        assert!(volume(Some("pending")).is_empty(), "waits for the snapshot");
        assert!(
            matches!(volume(Some("error")).as_slice(), [ReapAction::Snapshot { .. }]),
            "a failed one does not count"
        );
        assert!(matches!(volume(Some("completed")).as_slice(), [ReapAction::DeleteVolume { .. }]));
    }

    /// A failed job's held instance is spared until its hold ends (or its
    /// release), then marked and terminated as any orphan; its volume, once
    /// free, needs a snapshot taken after the hold: the failure's snapshot
    /// from before it may miss what the person debugging changed.
    #[test]
    fn a_held_instance_is_reaped_after_its_hold_not_before() {
        let hold = |released_ago: Option<i64>| DebugHold {
            shard: 0,
            instance_id: "i-held".into(),
            volume_ids: vec!["vol-held".into()],
            since: now() - Duration::minutes(30),
            until: now() + Duration::minutes(30),
            released_at: released_ago.map(|m| now() - Duration::minutes(m)),
            tagged: true,
        };
        let inventory = |hold: DebugHold, marked_ago: Option<i64>| {
            let mut inventory = Inventory::default();
            inventory.jobs.insert("failed".into(), JobView::Terminal { state: JobState::Failed });
            inventory.holds.insert("failed".into(), hold);
            inventory.instances = vec![instance("i-held", "failed", 30, marked_ago)];
            inventory
        };
        let named = |actions: Vec<ReapAction>| -> Vec<String> {
            actions
                .iter()
                .map(|a| match a {
                    ReapAction::Mark { resource_id, .. } => format!("mark {resource_id}"),
                    ReapAction::Terminate { instance_id, .. } => format!("terminate {instance_id}"),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        assert!(plan(&inventory(hold(None), None), now(), &settings()).is_empty(), "spared during the hold");
        assert!(plan(&inventory(hold(None), Some(10)), now(), &settings()).is_empty(), "a mark does not condemn it");
        let after = now() + Duration::minutes(31);
        assert_eq!(named(plan(&inventory(hold(None), None), after, &settings())), ["mark i-held"]);
        let marked = inventory(hold(None), Some(-26)); // marked 5 min before `after`
        assert_eq!(named(plan(&marked, after, &settings())), ["terminate i-held"]);
        // Released 5 minutes ago: the hold is over.
        assert_eq!(named(plan(&inventory(hold(Some(5)), None), now(), &settings())), ["mark i-held"]);

        let mut freed = inventory(hold(None), None);
        freed.instances.clear();
        // Detached during the hold: still the person's.
        let mut detached = freed.clone();
        detached.volumes.push(VolumeView {
            volume_id: "vol-held".into(),
            state: "available".into(),
            availability_zone: "us-east-1a".into(),
            attached_to: None,
            tags: BTreeMap::from([(tags::JOB_ID.to_string(), "failed".to_string())]),
        });
        assert!(plan(&detached, now(), &settings()).is_empty(), "a held volume is kept during the hold");
        freed.volumes.push(VolumeView {
            volume_id: "vol-held".into(),
            state: "available".into(),
            availability_zone: "us-east-1a".into(),
            attached_to: None,
            tags: BTreeMap::from([
                (tags::JOB_ID.to_string(), "failed".to_string()),
                (tags::ORPHANED_AT.to_string(), at(-10)),
            ]),
        });
        let snapshot = |id: &str, reaped: bool, minutes: i64| SnapshotView {
            snapshot_id: id.into(),
            volume_id: "vol-held".into(),
            state: "completed".into(),
            started_at: now() + Duration::minutes(minutes),
            tags: if reaped {
                BTreeMap::from([(tags::REAPED.to_string(), "true".to_string())])
            } else {
                BTreeMap::new()
            },
        };
        freed.snapshots.push(snapshot("snap-failure", false, -31));
        assert!(
            matches!(plan(&freed, after, &settings()).as_slice(), [ReapAction::Snapshot { .. }]),
            "the failure's snapshot predates what the hold changed"
        );
        let mut later = freed.clone();
        later.snapshots.push(snapshot("snap-after", true, 31));
        assert!(matches!(
            plan(&later, after, &settings()).as_slice(),
            [ReapAction::DeleteVolume { why, .. }] if why.contains("snap-after")
        ));
    }

    /// The record unreadable or gone: the `held-until` tags the hold wrote
    /// keep the instance and volume until it ends, and then the failure's
    /// snapshot still does not count: a new one is taken first.
    #[test]
    fn a_hold_is_honoured_from_its_tags_when_the_record_cannot_say() {
        let until = (now() + Duration::minutes(30)).to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut inventory = Inventory::default();
        inventory.jobs.insert("failed".into(), JobView::Missing);
        inventory.instances = vec![instance("i-held", "failed", 30, None)];
        inventory.instances[0].tags.insert(tags::HELD_UNTIL.into(), until.clone());
        inventory.volumes.push(VolumeView {
            volume_id: "vol-held".into(),
            state: "available".into(),
            availability_zone: "us-east-1a".into(),
            attached_to: None,
            tags: BTreeMap::from([
                (tags::JOB_ID.to_string(), "failed".to_string()),
                (tags::ORPHANED_AT.to_string(), at(-10)),
                (tags::HELD_UNTIL.to_string(), until),
            ]),
        });
        inventory.snapshots.push(SnapshotView {
            snapshot_id: "snap-failure".into(),
            volume_id: "vol-held".into(),
            state: "completed".into(),
            started_at: now() - Duration::minutes(31),
            tags: BTreeMap::new(),
        });
        assert!(plan(&inventory, now(), &settings()).is_empty(), "the tags keep the hold");
        let planned = plan(&inventory, now() + Duration::minutes(31), &settings());
        assert!(
            planned.iter().any(|a| matches!(a, ReapAction::Snapshot { volume_id, .. } if volume_id == "vol-held")),
            "after the tagged hold, a new snapshot first: {planned:?}"
        );
    }

    /// A failed run's snapshots never push out the last good one, and the
    /// newest good one stays whatever its age.
    #[test]
    fn retention_counts_only_successful_runs_and_keeps_the_newest_good_one() {
        let mut inventory = Inventory::default();
        inventory.jobs.insert("good-1".into(), JobView::Terminal { state: JobState::Succeeded });
        inventory.jobs.insert("good-2".into(), JobView::Terminal { state: JobState::Succeeded });
        inventory.jobs.insert("bad-3".into(), JobView::Terminal { state: JobState::Failed });
        inventory.jobs.insert("running-4".into(), active(30, 0, true));
        let snapshot = |id: &str, job: &str, days_ago: i64| SnapshotView {
            snapshot_id: id.into(),
            volume_id: "vol-x".into(),
            state: "completed".into(),
            started_at: now() - Duration::days(days_ago),
            tags: BTreeMap::from([
                (tags::JOB_ID.to_string(), job.to_string()),
                (tags::JOB_NAME.to_string(), "nightly".to_string()),
                (tags::VOLUME.to_string(), "data".to_string()),
                (tags::SHARD.to_string(), "0".to_string()),
                (tags::KEEP_LAST.to_string(), "1".to_string()),
                (tags::MAX_AGE_DAYS.to_string(), "30".to_string()),
            ]),
        };
        inventory.snapshots = vec![
            snapshot("snap-running", "running-4", 0),
            snapshot("snap-bad", "bad-3", 40),
            snapshot("snap-good-2", "good-2", 50),
            snapshot("snap-good-1", "good-1", 60),
        ];
        let deleted: Vec<String> = plan(&inventory, now(), &settings())
            .into_iter()
            .filter_map(|a| match a {
                ReapAction::DeleteSnapshot { snapshot_id, .. } => Some(snapshot_id),
                _ => None,
            })
            .collect();
        // The failed run's is past max age; good-2 is the newest good one and
        // stays though older than 30 days; good-1 is beyond keep_last.
        assert_eq!(deleted, vec!["snap-bad".to_string(), "snap-good-1".to_string()]);
    }

    /// A lineage is one submitter's: another principal's newer snapshots
    /// under the same job name never push out yours.
    #[test]
    fn retention_never_crosses_submitters() {
        let mut inventory = Inventory::default();
        let snapshot = |id: &str, job: &str, submitter: &str, days_ago: i64| SnapshotView {
            snapshot_id: id.into(),
            volume_id: "vol-x".into(),
            state: "completed".into(),
            started_at: now() - Duration::days(days_ago),
            tags: BTreeMap::from([
                (tags::JOB_ID.to_string(), job.to_string()),
                (tags::SUBMITTER.to_string(), submitter.to_string()),
                (tags::JOB_NAME.to_string(), "nightly".to_string()),
                (tags::VOLUME.to_string(), "data".to_string()),
                (tags::SHARD.to_string(), "0".to_string()),
                (tags::KEEP_LAST.to_string(), "1".to_string()),
                (tags::MAX_AGE_DAYS.to_string(), "0".to_string()),
            ]),
        };
        for job in ["alice-1", "mallory-1", "mallory-2"] {
            inventory.jobs.insert(job.into(), JobView::Terminal { state: JobState::Succeeded });
        }
        inventory.snapshots = vec![
            snapshot("snap-alice", "alice-1", "AROAALICE", 9),
            snapshot("snap-mallory-1", "mallory-1", "AROAMALLORY", 2),
            snapshot("snap-mallory-2", "mallory-2", "AROAMALLORY", 1),
        ];
        let deleted: Vec<String> = plan(&inventory, now(), &settings())
            .into_iter()
            .filter_map(|a| match a {
                ReapAction::DeleteSnapshot { snapshot_id, .. } => Some(snapshot_id),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec!["snap-mallory-1".to_string()], "only mallory's own older one");
    }
}
