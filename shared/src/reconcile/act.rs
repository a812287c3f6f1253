//! Run one decided action against the ports. Creates that have no
//! ClientToken, decided in an earlier pass (whose reply may have been
//! lost), look for their earlier result first: a command by its comment, a
//! snapshot by its tags.

use std::collections::BTreeMap;

use chrono::Duration;

use crate::error::CloudError;
use crate::ports::{tags, Cloud, Ports};
use crate::reconcile::decide::{Action, Done};
use crate::record::JobRecord;
use crate::report;

pub async fn execute(ports: &Ports, cloud: &Cloud, record: &JobRecord, action: &Action) -> Result<Done, CloudError> {
    match action {
        Action::Launch { request } => cloud.fleet.launch(request).await.map(Done::Launched),
        Action::CreateVolume { request } => {
            cloud.volumes.create_volume(request).await.map(|v| Done::Created(v.volume_id))
        }
        Action::Attach { volume_id, instance_id, device } => {
            cloud.volumes.attach(volume_id, instance_id, device).await.map(|_| Done::Ok)
        }
        Action::Send { request, look_first, .. } => {
            let first =
                request.instance_ids.first().ok_or_else(|| CloudError::Invalid("a command with no instance".into()))?;
            if *look_first {
                if let Some(existing) = cloud.commands.find_by_comment(first, &request.comment).await? {
                    return Ok(Done::Sent(existing));
                }
            }
            cloud.commands.send(request).await.map(Done::Sent)
        }
        Action::Cancel { command_id, instance_ids } => {
            cloud.commands.cancel(command_id, instance_ids).await.map(|_| Done::Ok)
        }
        Action::Terminate { instance_ids } => cloud.fleet.terminate(instance_ids).await.map(|_| Done::Ok),
        Action::Snapshot { volume_id, description, tags: snapshot_tags, look_first } => {
            if *look_first {
                let token = snapshot_tags.get(tags::ATTEMPT).cloned().unwrap_or_default();
                let found = cloud
                    .volumes
                    .find_snapshots(&[
                        (tags::ATTEMPT, token.as_str()),
                        (tags::SOURCE_VOLUME, volume_id.as_str()),
                        (tags::STACK, &ports.settings.stack),
                    ])
                    .await?;
                if let Some(existing) = found.into_iter().find(|s| s.state != "error") {
                    return Ok(Done::Snapshotted(existing.snapshot_id));
                }
            }
            cloud.volumes.create_snapshot(volume_id, description, snapshot_tags).await.map(Done::Snapshotted)
        }
        Action::DeleteVolume { volume_id } => cloud.volumes.delete_volume(volume_id).await.map(|_| Done::Ok),
        Action::Prune { volume, job_name, keep_last, max_age_days } => {
            prune(ports, cloud, record, volume, job_name, *keep_last, *max_age_days).await.map(Done::Pruned)
        }
        Action::SaveOutput { name, body } => {
            ports.ledger.put_artifact(&record.job_id, name, body.as_bytes(), "text/plain; charset=utf-8").await?;
            Ok(Done::Ok)
        }
        Action::WriteReport => {
            let body = report::render(record);
            ports
                .ledger
                .put_artifact(&record.job_id, "report.txt", body.as_bytes(), "text/plain; charset=utf-8")
                .await?;
            Ok(Done::Ok)
        }
    }
}

/// Keep the newest `keep_last` completed snapshots per job name, volume and
/// shard; drop older ones and any past `max_age_days`. A lineage is this
/// deployment's and this submitter's only: another principal reusing the
/// job name never reaches these snapshots. Snapshots of this job,
/// or of any job still active (a retry may restore from them), are never
/// pruned, nor any that is not `completed` yet.
async fn prune(
    ports: &Ports,
    cloud: &Cloud,
    record: &JobRecord,
    volume: &str,
    job_name: &str,
    keep_last: u32,
    max_age_days: u32,
) -> Result<Vec<String>, CloudError> {
    let now = ports.clock.now();
    // A job still running may restore from its snapshots: never prune those.
    let active: std::collections::BTreeSet<String> = ports.ledger.list_active().await?.into_iter().collect();
    let submitter = crate::reconcile::decide::submitter(record);
    let [managed, stack] = tags::scope(&ports.settings.stack);
    let mut lineage = cloud
        .volumes
        .find_snapshots(&[
            managed,
            stack,
            (tags::SUBMITTER, &submitter),
            (tags::JOB_NAME, job_name),
            (tags::VOLUME, volume),
        ])
        .await?;
    lineage.sort_by(|a, b| b.started_at.cmp(&a.started_at).then_with(|| b.snapshot_id.cmp(&a.snapshot_id)));
    let mut kept: BTreeMap<String, u32> = BTreeMap::new();
    let mut deleted = Vec::new();
    for snapshot in lineage {
        let own = snapshot.tags.get(tags::JOB_ID).is_some_and(|id| *id == record.job_id || active.contains(id));
        let shard = snapshot.tags.get(tags::SHARD).cloned().unwrap_or_default();
        let count = kept.entry(shard).or_default();
        let too_old = max_age_days > 0 && now - snapshot.started_at > Duration::days(i64::from(max_age_days));
        if own || snapshot.state != "completed" || (*count < keep_last && !too_old) {
            *count += 1;
            continue;
        }
        cloud.volumes.delete_snapshot(&snapshot.snapshot_id).await?;
        deleted.push(snapshot.snapshot_id);
    }
    Ok(deleted)
}
