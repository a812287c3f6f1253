//! Readiness: every instance running, its SSM agent Online, and its data
//! volumes created in its AZ and attached. Until then, poll by delayed message.

use std::collections::BTreeMap;

use crate::error::StepError;
use crate::lifecycle::{self, Event};
use crate::ports::{tags, Cloud, NewVolume, Ports};
use crate::record::{JobRecord, Outcome, VolumeEntry};
use crate::spec::VolumeSource;
use crate::steps::launch::job_tags;
use crate::steps::Next;

pub async fn advance(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<Next, StepError> {
    let now = ports.clock.now();
    let ids = record.instance_ids();
    let views = cloud.fleet.describe(&ids).await?;
    for entry in &mut record.instances {
        if let Some(view) = views.iter().find(|v| v.instance_id == entry.instance_id) {
            entry.state = view.state.clone();
            entry.availability_zone = view.availability_zone.clone();
        }
    }
    if let Some(lost) = record
        .instances
        .iter()
        .find(|i| matches!(i.state.as_str(), "shutting-down" | "terminated" | "stopping" | "stopped"))
    {
        let reason = format!("instance {} became {} before the job ran", lost.instance_id, lost.state);
        lifecycle::apply(record, Event::Abort { outcome: Outcome::Failed, reason }, now)?;
        return Ok(Next::Now);
    }
    let running = record.instances.iter().filter(|i| i.state == "running").count();
    if running < record.instances.len() {
        record.reason = format!("{running}/{} instances running", record.instances.len());
        return Ok(Next::Poll);
    }
    // SSM rejects commands to an instance until its agent is Online.
    let online = cloud.commands.online_agents(&ids).await?;
    if online.len() < ids.len() {
        record.reason = format!("{}/{} SSM agents Online", online.len(), ids.len());
        return Ok(Next::Poll);
    }
    if !ensure_volumes(ports, cloud, record).await? {
        return Ok(Next::Poll);
    }
    lifecycle::apply(record, Event::FleetReady, now)?;
    Ok(Next::Now)
}

/// Create (or find) and attach every data volume. True once all are attached.
async fn ensure_volumes(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<bool, StepError> {
    let Some(spec) = record.spec.clone() else { return Ok(true) };
    let base_tags = job_tags(record, &spec, ports.settings.expiry_grace_minutes);
    let mut all_attached = true;
    for volume in &spec.volumes {
        let targets: Vec<_> = match volume.source {
            // One EBS volume attaches to one instance: an existing one goes to shard 0.
            VolumeSource::VolumeId(_) => record.instances.iter().take(1).cloned().collect(),
            _ => record.instances.clone(),
        };
        for instance in targets {
            let known =
                record.volumes.iter().position(|v| v.name == volume.name && v.instance_id == instance.instance_id);
            let index = match known {
                Some(index) => index,
                None => {
                    let entry = find_or_create(
                        cloud,
                        record,
                        &base_tags,
                        volume,
                        &instance.instance_id,
                        &instance.availability_zone,
                        instance.shard_index,
                    )
                    .await?;
                    record.volumes.push(entry);
                    record.volumes.len() - 1
                }
            };
            let entry = record.volumes[index].clone();
            let view = cloud.volumes.describe_volume(&entry.volume_id).await?.ok_or_else(|| {
                StepError::Cloud(crate::error::CloudError::Invalid(format!("volume {} vanished", entry.volume_id)))
            })?;
            if view.availability_zone != instance.availability_zone {
                return Err(StepError::Cloud(crate::error::CloudError::Invalid(format!(
                    "volume {} is in {}, instance {} in {}: EBS attaches only within one AZ",
                    entry.volume_id, view.availability_zone, instance.instance_id, instance.availability_zone
                ))));
            }
            match (view.state.as_str(), view.attached_to.as_deref()) {
                (_, Some(owner)) if owner == instance.instance_id => {}
                ("available", None) => {
                    match cloud.volumes.attach(&entry.volume_id, &instance.instance_id, &entry.device).await {
                        Ok(()) => {}
                        // A racing duplicate delivery attached it after our describe:
                        // the next poll sees who holds it.
                        Err(err) if err.code() == Some("VolumeInUse") => {}
                        Err(err) => return Err(err.into()),
                    }
                    all_attached = false;
                }
                (_, Some(other)) => {
                    return Err(StepError::Cloud(crate::error::CloudError::Invalid(format!(
                        "volume {} is attached to {other}, not to this job's {}",
                        entry.volume_id, instance.instance_id
                    ))));
                }
                _ => all_attached = false,
            }
        }
    }
    let attached = record.volumes.len();
    if !all_attached {
        record.reason = format!("attaching {attached} data volume(s)");
    }
    Ok(all_attached)
}

async fn find_or_create(
    cloud: &Cloud,
    record: &JobRecord,
    base_tags: &BTreeMap<String, String>,
    volume: &crate::spec::VolumeSpec,
    instance_id: &str,
    availability_zone: &str,
    shard: u32,
) -> Result<VolumeEntry, StepError> {
    let entry = |volume_id: String, created: bool| VolumeEntry {
        name: volume.name.clone(),
        volume_id,
        instance_id: instance_id.to_string(),
        device: volume.device.clone(),
        created_by_flotilla: created,
        detached: false,
        deleted: false,
        detach_requests: 0,
        detach_abandoned: false,
    };
    let (size_gib, volume_type, snapshot_id) = match &volume.source {
        VolumeSource::VolumeId(id) => return Ok(entry(id.clone(), false)),
        VolumeSource::New { size_gib, volume_type } => (Some(*size_gib), volume_type.clone(), None),
        VolumeSource::SnapshotId(snapshot) => (None, "gp3".to_string(), Some(snapshot.clone())),
    };
    let found = cloud
        .volumes
        .find_volumes(&[(tags::JOB_ID, &record.job_id), (tags::VOLUME, &volume.name), (tags::INSTANCE, instance_id)])
        .await?;
    if let Some(existing) = found.into_iter().find(|v| v.state != "deleting" && v.state != "deleted") {
        return Ok(entry(existing.volume_id, true));
    }
    let mut volume_tags = base_tags.clone();
    volume_tags.insert(tags::VOLUME.to_string(), volume.name.clone());
    volume_tags.insert(tags::INSTANCE.to_string(), instance_id.to_string());
    volume_tags.insert(tags::SHARD.to_string(), shard.to_string());
    let created = cloud
        .volumes
        .create_volume(&NewVolume {
            availability_zone: availability_zone.to_string(),
            size_gib,
            volume_type,
            snapshot_id,
            tags: volume_tags,
            client_token: format!("{}-{}-{}", record.job_id, volume.name, shard),
        })
        .await?;
    Ok(entry(created.volume_id, true))
}
