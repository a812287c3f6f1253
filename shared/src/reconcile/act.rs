//! Run one decided action against the ports. Creates that have no
//! ClientToken, decided in an earlier pass (whose reply may have been
//! lost), look for their earlier result first: a command by its comment, a
//! snapshot by its tags.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use crate::error::{CloudError, RetryClass};
use crate::fence;
use crate::ports::{Cloud, Ports};
use crate::reconcile::decide::{Action, Done};
use crate::record::JobRecord;
use crate::report;
use crate::retention::{self, Facts, Policy};
use crate::sources;
use crate::states::SnapshotState;
use crate::tags;

/// `lease_end`: a create with no ClientToken starts only if it can end
/// before the pass's lease does (`fence`), after its lookup.
pub async fn execute(
    ports: &Ports,
    cloud: &Cloud,
    record: &JobRecord,
    action: &Action,
    lease_end: DateTime<Utc>,
) -> Result<Done, CloudError> {
    let may_start = || fence::may_start_call(ports.clock.now(), lease_end);
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
            if !may_start() {
                return Ok(Done::NotStarted);
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
                if let Some(existing) = found.into_iter().find(|s| s.state != SnapshotState::Error) {
                    return Ok(Done::Snapshotted(existing.snapshot_id));
                }
            }
            if !may_start() {
                return Ok(Done::NotStarted);
            }
            cloud.volumes.create_snapshot(volume_id, description, snapshot_tags).await.map(Done::Snapshotted)
        }
        Action::DeleteVolume { volume_id } => cloud.volumes.delete_volume(volume_id).await.map(|_| Done::Ok),
        Action::TagHold { instance_id, volume_ids, until } => {
            let held: Vec<String> = std::iter::once(instance_id.clone()).chain(volume_ids.iter().cloned()).collect();
            // The instance's expires-at first: it alone keeps the instance
            // from the reaper when the record cannot be read.
            cloud.fleet.tag(std::slice::from_ref(instance_id), crate::tags::EXPIRES_AT, until).await?;
            cloud.fleet.tag(&held, crate::tags::HELD_UNTIL, until).await.map(|_| Done::Ok)
        }
        Action::Prune { volume, finals, job_name, keep_last, max_age_days } => {
            mark_good(cloud, finals).await?;
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
            // The page beside it: rendered here, where S3 is already linked,
            // so the notify function stays small.
            let tails = crate::report_html::failed_step_tails(ports.ledger.as_ref(), record).await;
            let page = crate::report_html::render(record, &tails, ports.clock.now());
            ports
                .ledger
                .put_artifact(&record.job_id, "report.html", page.as_bytes(), "text/html; charset=utf-8")
                .await?;
            Ok(Done::Ok)
        }
    }
}

/// EC2 refuses the whole CreateTags for one id it does not know (a snapshot
/// someone deleted): then one by one, so the others are still marked.
async fn mark_good(cloud: &Cloud, snapshot_ids: &[String]) -> Result<(), CloudError> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let gone = |err: &CloudError| err.class() == RetryClass::NotFound;
    match cloud.fleet.tag(snapshot_ids, tags::GOOD, "true").await {
        Err(err) if gone(&err) => {
            for id in snapshot_ids {
                match cloud.fleet.tag(std::slice::from_ref(id), tags::GOOD, "true").await {
                    Err(err) if gone(&err) => {}
                    other => other?,
                }
            }
            Ok(())
        }
        other => other,
    }
}

/// The lineage's retention (`retention.rs`) after a successful run: this
/// deployment's and this submitter's snapshots of the job name and volume.
/// Jobs still active keep theirs (a retry may restore from them), and each
/// deletion re-checks that no job claims the snapshot as its source.
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
    let mut active: BTreeSet<String> = ports.ledger.list_active().await?.into_iter().collect();
    active.insert(record.job_id.clone());
    let submitter = crate::reconcile::decide::submitter(record);
    let [managed, stack] = tags::scope(&ports.settings.stack);
    let lineage = cloud
        .volumes
        .find_snapshots(&[
            managed,
            stack,
            (tags::SUBMITTER, &submitter),
            (tags::JOB_NAME, job_name),
            (tags::VOLUME, volume),
        ])
        .await?;
    let facts = Facts { active_jobs: active, ..Facts::default() };
    let mut deleted = Vec::new();
    for doomed in retention::plan(&lineage, Some(Policy { keep_last, max_age_days }), &facts, now) {
        if sources::delete_unless_claimed(ports, cloud, &doomed.snapshot_id).await?.is_none() {
            deleted.push(doomed.snapshot_id);
        }
    }
    Ok(deleted)
}
