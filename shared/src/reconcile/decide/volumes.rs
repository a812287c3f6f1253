//! Volumes: creating, restoring and attaching an attempt's EBS volumes.

use super::*;
use crate::spec::VolumeSpec;

/// For volumes that restore on retry, by name: the completed snapshot of the
/// volume the shard's latest earlier attempt had, or None when that volume
/// has none (kept after failed snapshots): never an older attempt's data.
pub(super) fn restore_snapshots(spec: &JobSpec, shard: &Shard) -> BTreeMap<String, Option<String>> {
    let mut found = BTreeMap::new();
    let Some((_, earlier)) = shard.attempts.split_last() else { return found };
    for volume in spec.volumes.iter().filter(|v| v.on_retry == OnRetry::Restore) {
        let Some((owner, last)) =
            earlier.iter().rev().find_map(|a| a.volumes.iter().find(|v| v.name == volume.name).map(|v| (a, v)))
        else {
            continue; // no attempt got as far as creating it: start fresh
        };
        // Created empty and its mount never finished, so no step that writes
        // data ran on it: nothing to restore, and a volume restored from it
        // could be blank yet never formatted. Start fresh.
        let never_mounted = !owner.completed_phases.contains(&Phase::Mount);
        if last.created && last.restored_from.is_none() && never_mounted {
            continue;
        }
        let snapshot =
            last.snapshot.as_ref().filter(|s| s.state == SnapshotState::Completed).and_then(|s| s.snapshot_id.clone());
        found.insert(volume.name.clone(), snapshot);
    }
    found
}

/// Volumes this shard gets: a `volume_id` source goes to shard 0 only.
pub(super) fn volume_specs(spec: &JobSpec, shard: u32) -> impl Iterator<Item = &VolumeSpec> {
    spec.volumes.iter().filter(move |v| !matches!(v.source, VolumeSource::VolumeId(_)) || shard == 0)
}

/// Create (by token) and attach this attempt's volumes. True once all are
/// attached; Err with a reason when retrying cannot help.
pub(super) fn attach_volumes(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    restore_from: &BTreeMap<String, Option<String>>,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) -> Result<bool, String> {
    let (Some(instance_id), Some(az)) = (attempt.instance_id.clone(), attempt.availability_zone.clone()) else {
        return Ok(false);
    };
    let mut all = true;
    for volume in volume_specs(job.spec, shard) {
        if !attempt.volumes.iter().any(|v| v.name == volume.name) {
            let seq = decision.take_seq();
            attempt.volumes.push(new_volume(job, volume, seq));
        }
        let entry = attempt.volumes.iter().find(|v| v.name == volume.name).cloned().expect("just added");
        let Some(volume_id) = entry.volume_id.clone() else {
            let request = create_request(job, shard, attempt, volume, restore_from, &entry.token);
            decision.actions.push(Action::CreateVolume { request });
            all = false;
            continue;
        };
        let Some(view) = obs.volumes.get(&volume_id) else {
            if obs.gone_volumes.contains(&volume_id) && is_gone(&entry, now) {
                return Err(format!("volume {volume_id} does not exist"));
            }
            all = false; // just created, or not looked at yet
            continue;
        };
        if let Some(v) = attempt.volumes.iter_mut().find(|v| v.name == volume.name) {
            v.seen = true;
        }
        if view.availability_zone != az {
            return Err(format!(
                "volume {volume_id} is in {}, instance {instance_id} in {az}: EBS attaches only within one AZ",
                view.availability_zone
            ));
        }
        match (&view.state, view.attached_to.as_deref()) {
            (_, Some(owner)) if owner == instance_id => {}
            (_, Some(other)) => {
                if !entry.created {
                    return Err(format!("volume {volume_id} is attached to {other}, not to this job's {instance_id}"));
                }
                all = false;
            }
            (VolumeState::Available, None) => {
                decision.actions.push(Action::Attach {
                    volume_id: volume_id.clone(),
                    instance_id: instance_id.clone(),
                    device: volume.device.clone(),
                });
                all = false;
            }
            (VolumeState::Error, _) => return Err(format!("volume {volume_id} is in state error")),
            _ => all = false,
        }
    }
    Ok(all)
}

/// A volume of the attempt, before it exists: a created one gets its
/// ClientToken, a `volume_id` source its id.
fn new_volume(job: &JobFacts<'_>, volume: &VolumeSpec, seq: u64) -> AttemptVolume {
    let (volume_id, created) = match &volume.source {
        VolumeSource::VolumeId(id) => (Some(id.clone()), false),
        _ => (None, true),
    };
    AttemptVolume {
        restored_from: None,
        name: volume.name.clone(),
        // ClientToken: at most 64 ASCII characters; job ids are at most 48.
        token: client_token(&job.stack, &job.job_id, 'v', seq),
        volume_id,
        created,
        created_at: None,
        seen: false,
        snapshot: None,
        snapshot_failures: 0,
        deleted: false,
        kept: None,
    }
}

/// The CreateVolume for a volume of the attempt, in its instance's AZ,
/// tagged so a lost reply is found again. A retry resumes from the lost
/// attempt's data (same size: a volume is at least as large as its
/// snapshot), and such a volume is never formatted.
fn create_request(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    volume: &VolumeSpec,
    restore_from: &BTreeMap<String, Option<String>>,
    token: &str,
) -> NewVolume {
    let (size_gib, volume_type, mut snapshot_id) = match &volume.source {
        VolumeSource::New { size_gib, volume_type } => (Some(*size_gib), volume_type.clone(), None),
        VolumeSource::SnapshotId(id) => (None, "gp3".to_string(), Some(id.clone())),
        VolumeSource::VolumeId(_) => unreachable!("volume_id sources have an id"),
    };
    if let Some(Some(restored)) = restore_from.get(&volume.name) {
        snapshot_id = Some(restored.clone());
        if let Some(v) = attempt.volumes.iter_mut().find(|v| v.name == volume.name) {
            v.restored_from = Some(restored.clone()); // never formatted
        }
    }
    let mut volume_tags = job.tags.clone();
    volume_tags.insert(tags::VOLUME.to_string(), volume.name.clone());
    volume_tags.insert(tags::INSTANCE.to_string(), attempt.instance_id.clone().unwrap_or_default());
    volume_tags.insert(tags::SHARD.to_string(), shard.to_string());
    volume_tags.insert(tags::ATTEMPT.to_string(), token.to_string());
    if volume.snapshot == SnapshotPolicy::Never {
        // The reaper may delete it, if ever left behind, without a snapshot.
        volume_tags.insert(tags::SCRATCH.to_string(), "true".to_string());
    }
    NewVolume {
        availability_zone: attempt.availability_zone.clone().unwrap_or_default(),
        size_gib,
        volume_type,
        snapshot_id,
        tags: volume_tags,
        client_token: token.to_string(),
    }
}

/// DescribeVolumes is eventually consistent right after a create: a created
/// volume counts as gone only once it was listed before, or long after.
pub(super) fn is_gone(volume: &AttemptVolume, now: DateTime<Utc>) -> bool {
    !volume.created || volume.seen || volume.created_at.is_none_or(|at| now - at > Duration::minutes(5))
}
