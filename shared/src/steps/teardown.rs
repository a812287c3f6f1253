//! Teardown: detach volumes, snapshot them as the policy says, prune old
//! snapshots past retention, delete the volumes Flotilla created, terminate
//! the fleet and write the report.

use std::collections::BTreeMap;

use chrono::SecondsFormat;

use crate::error::StepError;
use crate::lifecycle::{self, Event};
use crate::ports::{tags, Cloud, Ports};
use crate::record::{JobRecord, JobState, Outcome, SnapshotEntry};
use crate::report;
use crate::spec::SnapshotPolicy;
use crate::steps::launch::{job_name, job_tags};
use crate::steps::Next;

/// Detach and terminate progress is checked this often.
const TEARDOWN_POLL_SECONDS: u32 = 5;
/// A detach still pending after this many polls is forced...
const FORCE_DETACH_AFTER_REQUESTS: u32 = 12;
/// ...and after this many teardown stops waiting: terminating the instance
/// detaches the volume, and a job must not hang on one busy device.
const ABANDON_DETACH_AFTER_REQUESTS: u32 = 24;

pub async fn advance(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<Next, StepError> {
    match record.state {
        JobState::Snapshotting => release_volumes(ports, cloud, record).await,
        JobState::TearingDown => terminate_fleet(ports, cloud, record).await,
        _ => Ok(Next::Now),
    }
}

async fn release_volumes(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<Next, StepError> {
    let now = ports.clock.now();
    // Detach: the command step already ran sync and umount.
    let mut waiting = 0;
    for entry in record.volumes.iter_mut().filter(|v| !v.detached && !v.detach_abandoned) {
        match cloud.volumes.describe_volume(&entry.volume_id).await? {
            None => entry.detached = true,
            Some(view) => match (view.state.as_str(), view.attached_to.as_deref()) {
                ("available", None) => entry.detached = true,
                (_, Some(owner)) if owner == entry.instance_id => {
                    if entry.detach_requests >= ABANDON_DETACH_AFTER_REQUESTS {
                        entry.detach_abandoned = true;
                        record.warnings.push(format!(
                            "volume {} did not detach after {ABANDON_DETACH_AFTER_REQUESTS} requests \
                             (the last {} forced): snapshotted while attached, deleted after the fleet terminated",
                            entry.volume_id,
                            ABANDON_DETACH_AFTER_REQUESTS - FORCE_DETACH_AFTER_REQUESTS
                        ));
                        continue;
                    }
                    entry.detach_requests += 1;
                    let force = entry.detach_requests > FORCE_DETACH_AFTER_REQUESTS;
                    cloud.volumes.detach(&entry.volume_id, &entry.instance_id, force).await?;
                    waiting += 1;
                }
                (_, Some(_other)) => entry.detached = true, // no longer ours to detach
                _ => waiting += 1,
            },
        }
    }
    if waiting > 0 {
        record.reason = format!("detaching {waiting} volume(s)");
        return Ok(Next::After(TEARDOWN_POLL_SECONDS));
    }

    let spec = record
        .spec
        .clone()
        .ok_or_else(|| StepError::RecordCorrupt { job_id: record.job_id.clone(), reason: "no spec".into() })?;
    let succeeded = record.outcome == Some(Outcome::Succeeded);
    let base_tags = job_tags(record, &spec, ports.settings.expiry_grace_minutes);
    let name = job_name(record);
    for volume in &spec.volumes {
        let wanted = match volume.snapshot {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::OnSuccess => succeeded,
            SnapshotPolicy::Always => true,
        };
        if !wanted {
            continue;
        }
        let entries: Vec<_> = record.volumes.iter().filter(|v| v.name == volume.name).cloned().collect();
        for entry in entries {
            if record.snapshots.iter().any(|s| s.volume_id == entry.volume_id) {
                continue;
            }
            let found = cloud
                .volumes
                .find_snapshots(&[(tags::JOB_ID, &record.job_id), (tags::SOURCE_VOLUME, &entry.volume_id)])
                .await?;
            let snapshot_id = match found.into_iter().next() {
                Some(existing) => existing.snapshot_id,
                None => {
                    let shard = record
                        .instances
                        .iter()
                        .find(|i| i.instance_id == entry.instance_id)
                        .map(|i| i.shard_index)
                        .unwrap_or(0);
                    let mut snapshot_tags: BTreeMap<String, String> = base_tags.clone();
                    snapshot_tags.remove(tags::EXPIRES_AT); // snapshots live by retention, not job expiry
                    snapshot_tags.insert(tags::VOLUME.to_string(), volume.name.clone());
                    snapshot_tags.insert(tags::SOURCE_VOLUME.to_string(), entry.volume_id.clone());
                    snapshot_tags.insert(tags::SHARD.to_string(), shard.to_string());
                    snapshot_tags.insert("Name".to_string(), format!("{name}-{}-{shard}", volume.name));
                    let description = format!(
                        "flotilla job {} volume {} shard {shard} from {} at {}",
                        record.job_id,
                        volume.name,
                        entry.volume_id,
                        now.to_rfc3339_opts(SecondsFormat::Secs, true)
                    );
                    cloud.volumes.create_snapshot(&entry.volume_id, &description, &snapshot_tags).await?
                }
            };
            record.snapshots.push(SnapshotEntry {
                volume_name: volume.name.clone(),
                volume_id: entry.volume_id.clone(),
                snapshot_id,
            });
        }
        prune(ports, cloud, record, &name, volume).await?;
    }
    // Snapshots copy from the point in time they start, so the volume may go now.
    for entry in record.volumes.iter_mut().filter(|v| v.created_by_flotilla && !v.deleted && !v.detach_abandoned) {
        cloud.volumes.delete_volume(&entry.volume_id).await?;
        entry.deleted = true;
    }
    lifecycle::apply(record, Event::VolumesReleased, now)?;
    Ok(Next::Now)
}

/// Keep the newest `keep_last` snapshots per job name, volume and shard, and
/// drop any older than `max_age_days`. This job id's own snapshots always stay.
async fn prune(
    ports: &Ports,
    cloud: &Cloud,
    record: &mut JobRecord,
    name: &str,
    volume: &crate::spec::VolumeSpec,
) -> Result<(), StepError> {
    let now = ports.clock.now();
    let mut lineage = cloud
        .volumes
        .find_snapshots(&[
            (tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
            (tags::JOB_NAME, name),
            (tags::VOLUME, &volume.name),
        ])
        .await?;
    lineage.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| b.snapshot_id.cmp(&a.snapshot_id)));
    let mut kept_per_shard: BTreeMap<String, u32> = BTreeMap::new();
    for snapshot in lineage {
        // Any snapshot of this job id is this run's, including one a racing
        // duplicate delivery made and has not recorded yet: never prune it.
        let own = record.snapshots.iter().any(|s| s.snapshot_id == snapshot.snapshot_id)
            || snapshot.tags.get(tags::JOB_ID) == Some(&record.job_id);
        let shard = snapshot.tags.get(tags::SHARD).cloned().unwrap_or_default();
        let kept = kept_per_shard.entry(shard).or_default();
        let too_old = volume.retention.max_age_days > 0
            && now - snapshot.started_at > chrono::Duration::days(i64::from(volume.retention.max_age_days));
        if own || (*kept < volume.retention.keep_last && !too_old) {
            *kept += 1;
            continue;
        }
        if !record.pruned_snapshots.contains(&snapshot.snapshot_id) {
            cloud.volumes.delete_snapshot(&snapshot.snapshot_id).await?;
            record.pruned_snapshots.push(snapshot.snapshot_id);
        }
    }
    Ok(())
}

async fn terminate_fleet(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<Next, StepError> {
    let now = ports.clock.now();
    // Tag lookup also catches instances a launch made but never recorded.
    let mut ids = record.instance_ids();
    for found in cloud.fleet.find_instances(&record.job_id).await? {
        if !ids.contains(&found.instance_id) {
            ids.push(found.instance_id);
        }
    }
    let views = if ids.is_empty() { vec![] } else { cloud.fleet.describe(&ids).await? };
    let alive: Vec<String> = views.iter().filter(|v| v.state != "terminated").map(|v| v.instance_id.clone()).collect();
    if !alive.is_empty() {
        let to_stop: Vec<String> = views.iter().filter(|v| !v.is_gone()).map(|v| v.instance_id.clone()).collect();
        if !to_stop.is_empty() {
            cloud.fleet.terminate(&to_stop).await?;
        }
        record.reason = format!("terminating {} instance(s)", alive.len());
        return Ok(Next::After(TEARDOWN_POLL_SECONDS));
    }
    // Volumes that never detached are free once their instance is gone.
    let mut still_attached = 0;
    for entry in record.volumes.iter_mut().filter(|v| v.detach_abandoned && v.created_by_flotilla && !v.deleted) {
        match cloud.volumes.describe_volume(&entry.volume_id).await? {
            None => entry.deleted = true,
            Some(view) if view.attached_to.is_none() => {
                cloud.volumes.delete_volume(&entry.volume_id).await?;
                entry.deleted = true;
            }
            Some(_) => still_attached += 1,
        }
    }
    if still_attached > 0 {
        record.reason = format!("waiting for {still_attached} volume(s) to detach from terminated instances");
        return Ok(Next::After(TEARDOWN_POLL_SECONDS));
    }
    for entry in &mut record.instances {
        entry.state = "terminated".to_string();
    }
    record.terminated = true;
    let mut finished = record.clone();
    lifecycle::apply(&mut finished, Event::FleetTerminated, now)?;
    // The report is written before the terminal record, so a terminal record always has one.
    ports
        .ledger
        .put_artifact(&record.job_id, "report.txt", report::render(&finished).as_bytes(), "text/plain; charset=utf-8")
        .await?;
    *record = finished;
    Ok(Next::Now)
}
