//! The reaper: the scheduled safety net behind every job's own teardown. It
//! takes an inventory of what Flotilla manages in the account (instances in
//! every state, available volumes, snapshots) and of the jobs they belong to,
//! decides in one pure function (`plan`), then acts, and writes what it did
//! to `reaper/<time>.json`.
//!
//! - An instance or volume is an orphan when it is past its `expires-at`, or
//!   its job ended or has no record. A job whose record cannot be read is not
//!   evidence: only `expires-at` can condemn its resources then.
//! - Mark, then delete: an orphan is tagged `flotilla:orphaned-at` on one
//!   pass and removed on a later one, so a record written a moment late never
//!   loses its fleet. Instances of a running job are never touched before
//!   they expire.
//! - A volume is deleted only once a `completed` snapshot of it exists (the
//!   reaper takes one if needed), unless it is tagged scratch; `volume_id`
//!   sources are never tagged as managed, so never touched.
//! - Snapshot lineages are pruned by the retention their tags carry; a
//!   running job's snapshots are never pruned.
//! - A job that made no progress past its deadline plus the grace is ended
//!   FAILED with the reason, and the reaper removes what it left.
//! - `dry_run` plans and reports, and changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::{CloudError, StepError};
use crate::ports::{tags, InstanceView, Ports, SnapshotView, VolumeView, WriteOutcome};
use crate::record::{JobRecord, Outcome, PhaseStamp};

/// What the reaper knows of a job its resources name.
#[derive(Debug, Clone, PartialEq)]
pub enum JobView {
    /// Not terminal; when its deadline was and when a pass last wrote it.
    Active { deadline_at: Option<DateTime<Utc>>, updated_at: Option<DateTime<Utc>>, leased: bool },
    Terminal { state: String },
    /// No record: never submitted here, or deleted.
    Missing,
    /// The lookup failed: no evidence either way.
    Unknown { error: String },
}

#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub instances: Vec<InstanceView>,
    pub volumes: Vec<VolumeView>,
    pub snapshots: Vec<SnapshotView>,
    pub jobs: BTreeMap<String, JobView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ReapAction {
    /// Tag an orphan; a later pass removes it.
    Mark { resource_id: String, why: String },
    Terminate { instance_id: String, why: String },
    Snapshot { volume_id: String, why: String, tags: BTreeMap<String, String> },
    DeleteVolume { volume_id: String, why: String },
    DeleteSnapshot { snapshot_id: String, why: String },
    /// End a job that stopped making progress; its resources are reaped.
    EndJob { job_id: String, why: String },
}

#[derive(Debug, Clone, Copy)]
pub struct ReaperSettings {
    /// How long a mark must stand before the reaper acts on it: less than the
    /// reaper's period, so the next pass acts.
    pub mark_grace: Duration,
    /// How long past its deadline a job may go without progress.
    pub stall_grace: Duration,
}

fn parse_time(value: Option<&String>) -> Option<DateTime<Utc>> {
    value.and_then(|v| DateTime::parse_from_rfc3339(v).ok()).map(|t| t.with_timezone(&Utc))
}

/// Why a resource is an orphan, or None if something still needs it.
fn orphaned(resource_tags: &BTreeMap<String, String>, jobs: &BTreeMap<String, JobView>, now: DateTime<Utc>) -> Option<String> {
    if let Some(expires) = parse_time(resource_tags.get(tags::EXPIRES_AT)).filter(|at| *at < now) {
        return Some(format!("past its expires-at {}", expires.to_rfc3339_opts(SecondsFormat::Secs, true)));
    }
    let Some(job_id) = resource_tags.get(tags::JOB_ID) else {
        return Some("carries no flotilla:job-id".into());
    };
    match jobs.get(job_id) {
        Some(JobView::Terminal { state }) => Some(format!("its job {job_id} ended {state}")),
        Some(JobView::Missing) => Some(format!("its job {job_id} has no record")),
        // Active, or the lookup failed: not evidence enough.
        Some(JobView::Active { .. } | JobView::Unknown { .. }) | None => None,
    }
}

/// Mark now, or act once the mark has stood for the grace.
fn mark_or(
    id: &str,
    resource_tags: &BTreeMap<String, String>,
    why: String,
    now: DateTime<Utc>,
    settings: &ReaperSettings,
    act: impl FnOnce(String) -> Option<ReapAction>,
) -> Option<ReapAction> {
    match parse_time(resource_tags.get(tags::ORPHANED_AT)) {
        Some(marked) if now - marked >= settings.mark_grace => act(why),
        Some(_) => None,
        None => Some(ReapAction::Mark { resource_id: id.to_string(), why }),
    }
}

/// Decide everything one reaper pass does. Pure: no I/O.
pub fn plan(inventory: &Inventory, now: DateTime<Utc>, settings: &ReaperSettings) -> Vec<ReapAction> {
    let mut actions = Vec::new();
    for (job_id, job) in &inventory.jobs {
        if let JobView::Active { deadline_at: Some(deadline), updated_at, leased: false } = job {
            let stalled_since = updated_at.unwrap_or(*deadline);
            if now > *deadline + settings.stall_grace && now - stalled_since > settings.stall_grace {
                actions.push(ReapAction::EndJob {
                    job_id: job_id.clone(),
                    why: format!(
                        "no progress for {} min past its deadline; the reaper removes what it left",
                        (now - *deadline).num_minutes()
                    ),
                });
            }
        }
    }
    for instance in &inventory.instances {
        if matches!(instance.state.as_str(), "shutting-down" | "terminated") {
            continue;
        }
        let Some(why) = orphaned(&instance.tags, &inventory.jobs, now) else { continue };
        let id = instance.instance_id.clone();
        let why = format!("instance {id} ({}): {why}", instance.state);
        actions.extend(mark_or(&id, &instance.tags, why, now, settings, |why| {
            Some(ReapAction::Terminate { instance_id: id.clone(), why })
        }));
    }
    for volume in &inventory.volumes {
        // Attached volumes wait for their instance to go.
        if volume.state != "available" || volume.attached_to.is_some() {
            continue;
        }
        let Some(why) = orphaned(&volume.tags, &inventory.jobs, now) else { continue };
        let id = volume.volume_id.clone();
        let why = format!("volume {id}: {why}");
        let snapshots: Vec<&SnapshotView> = inventory.snapshots.iter().filter(|s| s.volume_id == id).collect();
        let scratch = volume.tags.get(tags::SCRATCH).is_some_and(|v| v == "true");
        actions.extend(mark_or(&id, &volume.tags, why, now, settings, |why| {
            if scratch {
                return Some(ReapAction::DeleteVolume { volume_id: id.clone(), why: format!("{why}; scratch") });
            }
            if let Some(done) = snapshots.iter().find(|s| s.state == "completed") {
                let why = format!("{why}; its data is in {}", done.snapshot_id);
                return Some(ReapAction::DeleteVolume { volume_id: id.clone(), why });
            }
            if snapshots.iter().any(|s| s.state == "pending") {
                return None; // the next pass deletes it once the snapshot completes
            }
            Some(ReapAction::Snapshot { volume_id: id.clone(), why, tags: reaped_snapshot_tags(volume) })
        }));
    }
    actions.extend(prune(inventory, now));
    actions
}

/// The snapshot the reaper takes of an orphaned volume before deleting it:
/// the volume's own tags (job, name, shard), marked as taken by the reaper,
/// and with no retention tags, so no lineage pruning ever removes it.
fn reaped_snapshot_tags(volume: &VolumeView) -> BTreeMap<String, String> {
    let mut kept: BTreeMap<String, String> = volume
        .tags
        .iter()
        .filter(|(k, _)| !k.starts_with("aws:") && k.as_str() != tags::ORPHANED_AT && k.as_str() != tags::EXPIRES_AT)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept.insert(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into());
    kept.insert(tags::SOURCE_VOLUME.into(), volume.volume_id.clone());
    kept.insert("flotilla:reaped".into(), "true".into());
    kept
}

/// Snapshot lineages (job name, volume, shard) past the retention their
/// newest snapshot carries. Snapshots of jobs that are not known to have
/// ended are never pruned: a retry may restore from them.
fn prune(inventory: &Inventory, now: DateTime<Utc>) -> Vec<ReapAction> {
    let mut lineages: BTreeMap<(String, String, String), Vec<&SnapshotView>> = BTreeMap::new();
    for snapshot in &inventory.snapshots {
        let (Some(name), Some(volume)) = (snapshot.tags.get(tags::JOB_NAME), snapshot.tags.get(tags::VOLUME)) else {
            continue;
        };
        if !snapshot.tags.contains_key(tags::KEEP_LAST) {
            continue; // no retention recorded on it: never pruned here
        }
        let shard = snapshot.tags.get(tags::SHARD).cloned().unwrap_or_default();
        lineages.entry((name.clone(), volume.clone(), shard)).or_default().push(snapshot);
    }
    let mut actions = Vec::new();
    for ((name, volume, shard), mut lineage) in lineages {
        lineage.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| b.snapshot_id.cmp(&a.snapshot_id)));
        let newest = lineage[0];
        let keep_last: usize = newest.tags.get(tags::KEEP_LAST).and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
        let max_age: i64 = newest.tags.get(tags::MAX_AGE_DAYS).and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut kept = 0;
        for snapshot in lineage {
            let job_ended = snapshot
                .tags
                .get(tags::JOB_ID)
                .is_some_and(|id| matches!(inventory.jobs.get(id), Some(JobView::Terminal { .. } | JobView::Missing)));
            if !job_ended {
                continue; // a running job's: not known good yet, so neither kept nor counted
            }
            let too_old = max_age > 0 && now - snapshot.started_at > Duration::days(max_age);
            if snapshot.state != "completed" || (kept < keep_last && !too_old) {
                kept += 1;
                continue;
            }
            let why = if too_old {
                format!("{name}/{volume} shard {shard}: older than {max_age} days")
            } else {
                format!("{name}/{volume} shard {shard}: beyond the newest {keep_last}")
            };
            actions.push(ReapAction::DeleteSnapshot { snapshot_id: snapshot.snapshot_id.clone(), why });
        }
    }
    actions
}

/// Read what Flotilla manages, and the jobs it belongs to.
pub async fn take_inventory(ports: &Ports) -> Result<Inventory, CloudError> {
    let cloud = &ports.cloud;
    let managed = [(tags::MANAGED_BY, tags::MANAGED_BY_VALUE)];
    let mut inventory = Inventory {
        instances: cloud.fleet.find_managed().await?,
        volumes: cloud.volumes.find_volumes(&managed).await?,
        snapshots: cloud.volumes.find_snapshots(&managed).await?,
        jobs: BTreeMap::new(),
    };
    let mut job_ids: BTreeSet<String> = BTreeSet::new();
    job_ids.extend(inventory.instances.iter().filter_map(|i| i.tags.get(tags::JOB_ID).cloned()));
    job_ids.extend(inventory.volumes.iter().filter_map(|v| v.tags.get(tags::JOB_ID).cloned()));
    job_ids.extend(inventory.snapshots.iter().filter_map(|s| s.tags.get(tags::JOB_ID).cloned()));
    job_ids.extend(ports.ledger.list_active().await?);
    for job_id in job_ids {
        let view = match ports.ledger.load(&job_id).await {
            Ok(Some(loaded)) if loaded.record.state.is_terminal() => {
                JobView::Terminal { state: loaded.record.state.to_string() }
            }
            Ok(Some(loaded)) => JobView::Active {
                deadline_at: loaded.record.deadline_at,
                updated_at: loaded.record.updated_at,
                leased: loaded.record.lease.as_ref().is_some_and(|l| l.until > ports.clock.now()),
            },
            Ok(None) => JobView::Missing,
            Err(err @ CloudError::Crashed(_)) => return Err(err),
            Err(err) => JobView::Unknown { error: err.to_string() },
        };
        inventory.jobs.insert(job_id, view);
    }
    Ok(inventory)
}

/// A job whose reconcile messages died this often is ended: the reconciler
/// tears it down per policy (or, if it cannot run at all, the stall rule and
/// the reaper do).
pub const DEAD_LETTER_LIMIT: u32 = 3;
/// Dead letters handled per reaper pass.
const DEAD_LETTERS_PER_PASS: usize = 100;

/// The job a dead-lettered reconcile message was for: a wake message names
/// it; an EC2 event names an instance whose tag names it.
async fn job_of_letter(ports: &Ports, body: &str) -> Result<Option<String>, CloudError> {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if let Some(job_id) = value.get("job_id").and_then(Value::as_str) {
        return Ok(Some(job_id.to_string()));
    }
    match value.pointer("/detail/instance-id").and_then(Value::as_str) {
        Some(instance_id) => ports.cloud.fleet.job_of(instance_id).await,
        None => Ok(None),
    }
}

/// Record each dead-lettered reconcile message on its job and wake it; the
/// message is then deleted. One that names no job is left for `flotilla dlq`.
async fn drain_dead_letters(ports: &Ports, dry_run: bool) -> Result<Vec<Value>, StepError> {
    let Some(dlq) = &ports.dead_letters else { return Ok(vec![]) };
    let mut seen = Vec::new();
    for letter in dlq.receive(DEAD_LETTERS_PER_PASS).await? {
        let Some(job_id) = job_of_letter(ports, &letter.body).await? else {
            seen.push(json!({ "job_id": null, "receive_count": letter.receive_count, "left": "names no job" }));
            dlq.release(&letter).await?;
            continue;
        };
        seen.push(json!({ "job_id": job_id, "receive_count": letter.receive_count }));
        if dry_run {
            dlq.release(&letter).await?;
            continue;
        }
        let count = letter.receive_count;
        crate::reconcile::update_inbox(
            ports,
            &job_id,
            |record| {
                record.dead_letters += 1;
                let last = record.stalled.clone().unwrap_or_else(|| "no error recorded".into());
                record.warnings.push(format!(
                    "dead-lettered: a reconcile message failed {count} receives (last pass: {last}); the job was woken"
                ));
                if record.dead_letters >= DEAD_LETTER_LIMIT && record.abort.is_none() {
                    record.abort = Some(format!(
                        "{} of its reconcile messages were dead-lettered (last pass: {last})",
                        record.dead_letters
                    ));
                }
                true
            },
            "dead-letter",
        )
        .await?;
        dlq.delete(&letter).await?;
    }
    Ok(seen)
}

/// One reaper pass: dead letters, inventory, plan, act (unless `dry_run`), report.
pub async fn run(ports: &Ports, settings: &ReaperSettings, dry_run: bool) -> Result<Value, StepError> {
    let started = ports.clock.now();
    let dead_letters = drain_dead_letters(ports, dry_run).await?;
    let inventory = take_inventory(ports).await?;
    let actions = plan(&inventory, started, settings);
    let mut done = Vec::new();
    let mut errors = Vec::new();
    if !dry_run {
        let stamp = started.to_rfc3339_opts(SecondsFormat::Secs, true);
        for action in &actions {
            match execute(ports, action, &stamp).await {
                Ok(()) => done.push(action.clone()),
                Err(err @ StepError::Cloud(CloudError::Crashed(_))) => return Err(err),
                Err(err) => {
                    warn!(?action, error = %err, "reaper action failed");
                    errors.push(json!({ "action": action, "error": err.to_string() }));
                }
            }
        }
    }
    let found = json!({
        "instances": inventory.instances.len(),
        "volumes": inventory.volumes.len(),
        "snapshots": inventory.snapshots.len(),
        "jobs": inventory.jobs.len(),
    });
    let report = json!({
        "at": started.to_rfc3339_opts(SecondsFormat::Millis, true),
        "dry_run": dry_run,
        "found": found,
        "planned": actions,
        "done": done.len(),
        "errors": errors,
        "dead_letters": dead_letters,
    });
    let key = format!("reaper/{}.json", started.to_rfc3339_opts(SecondsFormat::Millis, true));
    let body = serde_json::to_vec_pretty(&report).map_err(|e| StepError::BadMessage(e.to_string()))?;
    ports.ledger.put(&key, &body, "application/json").await?;
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

async fn execute(ports: &Ports, action: &ReapAction, stamp: &str) -> Result<(), StepError> {
    let cloud = &ports.cloud;
    match action {
        ReapAction::Mark { resource_id, .. } => {
            cloud.fleet.tag(std::slice::from_ref(resource_id), tags::ORPHANED_AT, stamp).await?;
        }
        ReapAction::Terminate { instance_id, .. } => cloud.fleet.terminate(std::slice::from_ref(instance_id)).await?,
        ReapAction::Snapshot { volume_id, why, tags: snapshot_tags } => {
            let description = format!("flotilla reaper: {why}");
            cloud.volumes.create_snapshot(volume_id, &description, snapshot_tags).await?;
        }
        ReapAction::DeleteVolume { volume_id, .. } => cloud.volumes.delete_volume(volume_id).await?,
        ReapAction::DeleteSnapshot { snapshot_id, .. } => cloud.volumes.delete_snapshot(snapshot_id).await?,
        ReapAction::EndJob { job_id, why } => end_job(ports, job_id, why).await?,
    }
    Ok(())
}

/// Write a stalled job's terminal state, only if no pass wrote it since
/// (If-Match on the version read).
async fn end_job(ports: &Ports, job_id: &str, why: &str) -> Result<(), StepError> {
    let Some(loaded) = ports.ledger.load(job_id).await? else { return Ok(()) };
    let mut record: JobRecord = loaded.record;
    if record.state.is_terminal() {
        return Ok(());
    }
    let now = ports.clock.now();
    record.outcome.get_or_insert(Outcome::Failed);
    record.outcome_reason = Some(format!("reaped: {why}"));
    record.state = record.outcome.unwrap_or(Outcome::Failed).terminal_state();
    record.reason = record.outcome_reason.clone().unwrap_or_default();
    record.warnings.push(format!("reaped: {why}"));
    record.timeline.push(PhaseStamp { state: record.state, at: now });
    record.updated_at = Some(now);
    if let WriteOutcome::Written { .. } = ports.ledger.replace(&record, &loaded.version).await? {
        ports.ledger.set_active(job_id, false).await?;
    }
    Ok(())
}

impl ReaperSettings {
    pub fn from(settings: &crate::ports::Settings) -> Self {
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

    fn active() -> JobView {
        JobView::Active { deadline_at: Some(now() + Duration::minutes(30)), updated_at: Some(now()), leased: false }
    }

    /// terraform-aws-github-runner's scale-down bugs, as cases: a failed
    /// lookup is no licence to kill (nor a reason to spare an expired one),
    /// a busy instance is never touched, and a fresh mark waits a pass.
    #[test]
    fn only_evidence_condemns_and_a_mark_waits_a_pass() {
        let mut inventory = Inventory::default();
        inventory.jobs.insert("busy".into(), active());
        inventory.jobs.insert("unknown".into(), JobView::Unknown { error: "S3 503".into() });
        inventory.jobs.insert("done".into(), JobView::Terminal { state: "SUCCEEDED".into() });
        inventory.instances = vec![
            instance("i-busy", "busy", 60, None),
            instance("i-unknown", "unknown", 60, None),
            instance("i-unknown-expired", "unknown", -1, None),
            instance("i-done-fresh-mark", "done", 60, Some(1)),
            instance("i-done-old-mark", "done", 60, Some(5)),
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
        assert_eq!(named, vec![("mark", "i-unknown-expired"), ("terminate", "i-done-old-mark")]);
    }

    #[test]
    fn a_job_stalled_past_its_deadline_is_ended_unless_a_pass_holds_it() {
        let mut inventory = Inventory::default();
        let deadline = Some(now() - Duration::minutes(45));
        let stale = Some(now() - Duration::minutes(40));
        inventory.jobs.insert("stalled".into(), JobView::Active { deadline_at: deadline, updated_at: stale, leased: false });
        inventory.jobs.insert("leased".into(), JobView::Active { deadline_at: deadline, updated_at: stale, leased: true });
        inventory.jobs.insert("moving".into(), JobView::Active { deadline_at: deadline, updated_at: Some(now()), leased: false });
        let actions = plan(&inventory, now(), &settings());
        assert!(matches!(actions.as_slice(), [ReapAction::EndJob { job_id, .. }] if job_id == "stalled"), "{actions:?}");
    }

    #[test]
    fn an_orphaned_volume_is_snapshotted_before_it_is_deleted() {
        let volume = |snapshot_state: Option<&str>| {
            let mut inventory = Inventory::default();
            inventory.jobs.insert("done".into(), JobView::Terminal { state: "FAILED".into() });
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
        assert!(matches!(volume(Some("error")).as_slice(), [ReapAction::Snapshot { .. }]), "a failed one does not count");
        assert!(matches!(volume(Some("completed")).as_slice(), [ReapAction::DeleteVolume { .. }]));
    }
}
