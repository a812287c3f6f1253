//! One pass's view of the cloud, in a few batched calls: instances by the
//! job's tag (paginated), volumes while any are made, attached or released,
//! agents of booting instances, snapshots only while one is pending,
//! invocations of the commands in flight that are due a look.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};

use tracing::warn;

use crate::error::RetryClass;
use crate::ports::{Cloud, CloudResult};
use crate::reconcile::{decide, Observation};
use crate::record::{Attempt, CommandBatch, JobRecord, Stage};
use crate::settings::Settings;
use crate::spec::VolumeSource;
use crate::states::{CommandStatus, InstanceState, SnapshotState};
use crate::tags;

/// A command in flight is listed when an event named one of its instances
/// (`focus`), when it was not listed for a safety poll, when it is past its
/// timeout, or while the job or its attempt is being stopped: not on every
/// pass. The calls go in this order, one look per concern.
pub async fn observe(
    cloud: &Cloud,
    record: &JobRecord,
    settings: &Settings,
    now: DateTime<Utc>,
    focus: &BTreeSet<String>,
) -> CloudResult<Observation> {
    let mut observation = Observation::default();
    let launched = record.attempts().any(|a| a.launch_token.is_some());
    if launched {
        for view in cloud.fleet.find_instances(&settings.stack, &record.job_id).await? {
            observation.instances.insert(view.instance_id.clone(), view);
        }
    }
    look_at_agents(cloud, record, settings, now, launched, &mut observation).await?;
    look_at_volumes(cloud, record, settings, &mut observation).await?;
    look_at_snapshots(cloud, record, settings, &mut observation).await?;
    find_unanswered_sends(cloud, record, settings, now, &mut observation).await?;
    list_commands_in_flight(cloud, record, settings, now, focus, &mut observation).await?;
    // A command that timed out: was its agent there to time it out, or gone?
    let timed_out: Vec<String> = observation
        .invocations
        .values()
        .filter(|v| v.status == CommandStatus::TimedOut && !observation.agents_checked.contains(&v.instance_id))
        .map(|v| v.instance_id.clone())
        .collect();
    if !timed_out.is_empty() {
        observation.online.extend(cloud.commands.online_agents(&timed_out).await?);
        observation.agents_checked.extend(timed_out);
    }
    Ok(observation)
}

/// Status checks when they are due, then agents of booting instances and
/// of those whose next command waits to be sent (SendCommand refuses the
/// whole call if one agent is offline).
async fn look_at_agents(
    cloud: &Cloud,
    record: &JobRecord,
    settings: &Settings,
    now: DateTime<Utc>,
    launched: bool,
    observation: &mut Observation,
) -> CloudResult<()> {
    let waiting_send = |a: &Attempt| {
        a.stage == Stage::Working
            && a.phases.iter().any(|p| {
                p.status.is_none()
                    && (p.batch == 0 || record.commands.get(&p.batch).is_some_and(|b| b.command_id.is_none()))
            })
    };
    let instances = &observation.instances;
    let running = |a: &&Attempt| {
        a.instance_id.as_ref().is_some_and(|id| instances.get(id).is_some_and(|v| v.state == InstanceState::Running))
    };
    let health_due = launched
        && record
            .health_checked_at
            .is_none_or(|at| now - at >= Duration::seconds(i64::from(settings.health_check_seconds)));
    let ask: Vec<String> = record
        .shards
        .iter()
        .filter_map(|s| s.current())
        .filter(|a| a.stage == Stage::Booting || waiting_send(a) || (health_due && a.stage == Stage::Working))
        .filter(running)
        .filter_map(|a| a.instance_id.clone())
        .collect();
    if health_due {
        // Status checks of every instance the job still counts on.
        let live: Vec<String> = record
            .shards
            .iter()
            .filter_map(|s| s.current())
            .filter(|a| matches!(a.stage, Stage::Booting | Stage::Attaching | Stage::Working))
            .filter(running)
            .filter_map(|a| a.instance_id.clone())
            .collect();
        observation.health_due = true;
        // Best effort: a throttled or refused status check (a target role
        // without ec2:DescribeInstanceStatus) must not stop the job; a silent
        // agent still gives an impaired instance away.
        match cloud.fleet.status_checks(&live).await {
            _ if live.is_empty() => observation.health_checked = true,
            Ok(checks) => {
                for (id, impaired) in checks {
                    if impaired {
                        observation.impaired.insert(id);
                    } else {
                        observation.healthy.insert(id);
                    }
                }
                observation.health_checked = true;
            }
            Err(err) => warn!(job_id = %record.job_id, error = %err, "status checks unavailable"),
        }
    }
    if !ask.is_empty() {
        observation.online = cloud.commands.online_agents(&ask).await?.into_iter().collect();
        observation.agents_checked = ask.into_iter().collect();
    }
    Ok(())
}

/// Volumes matter while they are made and attached, released, or swept at
/// the end; a working or booting attempt never looks at its volumes.
async fn look_at_volumes(
    cloud: &Cloud,
    record: &JobRecord,
    settings: &Settings,
    observation: &mut Observation,
) -> CloudResult<()> {
    let attaching = record.shards.iter().filter_map(|s| s.current()).any(|a| a.stage == Stage::Attaching);
    let has_volumes = record.attempts().any(|a| !a.volumes.is_empty())
        || (attaching && record.spec.as_ref().is_some_and(|s| !s.volumes.is_empty()));
    let volumes_moving = attaching
        || record.attempts().any(|a| a.stage == Stage::Releasing)
        || record.outcome.is_some()
        || record.shards.iter().all(|s| s.result.is_some());
    if !(has_volumes && volumes_moving) {
        return Ok(());
    }
    for view in
        cloud.volumes.find_volumes(&[(tags::JOB_ID, record.job_id.as_str()), (tags::STACK, &settings.stack)]).await?
    {
        observation.volumes.insert(view.volume_id.clone(), view);
    }
    // Sources the user named are not ours to tag: look at them by id.
    let sources: BTreeSet<String> = record
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter())
        .filter_map(|v| match &v.source {
            VolumeSource::VolumeId(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    // Recorded volumes the tag search missed (gone, or not indexed yet), and
    // sources the user named (not ours to tag): look at them by id.
    let missing: BTreeSet<String> = record
        .attempts()
        .flat_map(|a| a.volumes.iter())
        .filter(|v| !v.deleted && v.kept.is_none())
        .filter_map(|v| v.volume_id.clone())
        .filter(|id| !observation.volumes.contains_key(id))
        .chain(sources)
        .collect();
    for id in missing {
        match cloud.volumes.describe_volume(&id).await? {
            Some(view) => {
                observation.volumes.insert(id, view);
            }
            None => {
                observation.gone_volumes.insert(id);
            }
        }
    }
    Ok(())
}

/// Snapshots only while one is pending.
async fn look_at_snapshots(
    cloud: &Cloud,
    record: &JobRecord,
    settings: &Settings,
    observation: &mut Observation,
) -> CloudResult<()> {
    let snapshot_pending = record
        .attempts()
        .flat_map(|a| a.volumes.iter())
        .any(|v| v.snapshot.as_ref().is_some_and(|s| s.state != SnapshotState::Completed));
    if snapshot_pending {
        for view in cloud
            .volumes
            .find_snapshots(&[(tags::JOB_ID, record.job_id.as_str()), (tags::STACK, &settings.stack)])
            .await?
        {
            observation.snapshots.insert(view.snapshot_id.clone(), view);
        }
    }
    Ok(())
}

/// A send decided in an earlier pass whose reply never came (a crash, a
/// lost reply): did it reach SSM? Looked up by its comment before the
/// batch can be re-planned, so a command that did is never sent twice.
/// A phase a stopping job closed as never sent, once the takeover rule's
/// window ended, is still looked for while SSM could deliver it (a lag
/// past the assumed one): found, it is cancelled (`decide`).
async fn find_unanswered_sends(
    cloud: &Cloud,
    record: &JobRecord,
    settings: &Settings,
    now: DateTime<Utc>,
    observation: &mut Observation,
) -> CloudResult<()> {
    let grace = settings.cleanup_grace_minutes;
    let closed_unsent = |number: u64, batch: &CommandBatch| {
        let timeout = batch_timeout(record, batch, grace);
        let could_run = i64::from(crate::ports::delivery_timeout_seconds(timeout)) + i64::from(timeout);
        now < batch.dispatched_at + Duration::seconds(could_run)
            && record
                .shards
                .iter()
                .filter_map(|s| s.current())
                .any(|a| a.phases.iter().any(|p| p.batch == number && p.status == Some(CommandStatus::Cancelled)))
    };
    for (number, batch) in record.commands.iter().filter(|(_, b)| b.command_id.is_none() && b.dispatched_at < now) {
        let open = |a: &Attempt| {
            a.stage == Stage::Working && a.phases.iter().any(|p| p.status.is_none() && p.batch == *number)
        };
        let late = closed_unsent(*number, batch);
        let first = record
            .shards
            .iter()
            .filter_map(|s| s.current())
            .filter(|a| open(a) || (late && a.phases.iter().any(|p| p.batch == *number)))
            .find_map(|a| a.instance_id.clone());
        let Some(instance_id) = first else { continue };
        let comment = crate::record::command_comment(&record.job_id, batch.phase, *number);
        if let Some(command_id) = cloud.commands.find_by_comment(&instance_id, &comment).await? {
            observation.sent.insert(*number, command_id);
        }
    }
    Ok(())
}

/// Invocations of the commands in flight that are due a look.
async fn list_commands_in_flight(
    cloud: &Cloud,
    record: &JobRecord,
    settings: &Settings,
    now: DateTime<Utc>,
    focus: &BTreeSet<String>,
    observation: &mut Observation,
) -> CloudResult<()> {
    let mut in_flight: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for attempt in record.shards.iter().filter_map(|s| s.current()) {
        if attempt.stage != Stage::Working {
            continue;
        }
        for run in attempt.phases.iter().filter(|p| p.status.is_none()) {
            let command_id = record.commands.get(&run.batch).and_then(|b| b.command_id.as_ref());
            if let (Some(command_id), Some(instance_id)) = (command_id, &attempt.instance_id) {
                in_flight.entry(command_id.clone()).or_default().push(instance_id.clone());
            }
        }
    }
    let spec = record.spec.as_ref();
    let stopping = record.outcome.is_some() || record.cancel_requested;
    // Attempts being stopped or judged: their commands are always looked at.
    let urgent: BTreeSet<&String> = record
        .shards
        .iter()
        .filter_map(|s| s.current())
        .filter(|a| a.interrupted || a.timed_out || a.agent_lost_since.is_some() || a.impaired_since.is_some())
        .filter_map(|a| a.instance_id.as_ref())
        .collect();
    let bound = record.bill_bound(settings.cleanup_grace_minutes);
    let due = |command_id: &str, instance_ids: &[String]| {
        let Some(batch) = record.commands.values().find(|b| b.command_id.as_deref() == Some(command_id)) else {
            return true;
        };
        let timeout =
            spec.map_or(0, |s| decide::phase_timeout(s, batch.phase, record.deadline_at, bound, batch.dispatched_at));
        stopping
            || instance_ids.iter().any(|id| focus.contains(id) || urgent.contains(id))
            || batch.listed_at.is_none()
            || spec.is_none_or(|s| decide::look_due(s, settings, batch, now))
            || now >= batch.dispatched_at + Duration::seconds(i64::from(timeout))
    };
    for (command_id, instance_ids) in in_flight {
        if !due(&command_id, &instance_ids) {
            continue;
        }
        let views = match cloud.commands.invocations(&command_id, &instance_ids).await {
            // SSM does not know it (not yet, or no longer): as if nothing
            // were listed, so the step times out in `decide` and the job
            // goes on; failing the whole look would stall it, past its bound.
            Err(err) if err.class() == RetryClass::NotFound => {
                warn!(job_id = %record.job_id, %command_id, error = %err, "command not found");
                continue;
            }
            views => views?,
        };
        if instance_ids.iter().any(|id| !views.iter().any(|v| &v.instance_id == id)) {
            observation.not_yet_listed.insert(command_id.clone());
        }
        for view in views {
            observation.invocations.insert((command_id.clone(), view.instance_id.clone()), view);
        }
        observation.listed_commands.insert(command_id);
    }
    Ok(())
}

/// The execution timeout a batch's command was sent with.
fn batch_timeout(record: &JobRecord, batch: &CommandBatch, grace_minutes: u32) -> u32 {
    record.spec.as_ref().map_or(0, |spec| {
        decide::phase_timeout(
            spec,
            batch.phase,
            record.deadline_at,
            record.bill_bound(grace_minutes),
            batch.dispatched_at,
        )
    })
}
