//! Dispatch: the SendCommand batches that start a phase on many instances at once.

use super::*;

/// Will this attempt reach `phase` soon: still starting, or in flight in an
/// earlier phase?
pub(super) fn catching_up(attempt: &Attempt, phase: Phase) -> bool {
    match attempt.stage {
        Stage::Launching | Stage::Booting | Stage::Attaching => true,
        Stage::Working => attempt.phases.iter().any(|p| p.status.is_none() && p.phase < phase && p.batch != 0),
        Stage::Releasing | Stage::Done => false,
    }
}

/// Phases that `work` opened this pass (no batch yet) or whose send never
/// answered (a batch, no command id): one SendCommand per phase and 50
/// instances, with a comment that makes the send findable.
pub(super) fn plan_dispatch(
    record: &mut JobRecord,
    spec: &JobSpec,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) {
    hold_back_offline(record, obs, ctx, decision);
    let made_now = make_batches(record, obs, ctx, decision);
    send_batches(record, spec, &made_now, ctx, decision);
}

/// SendCommand fails for all if one agent is offline: hold those back.
fn agent_offline(obs: &Observation, id: &Option<String>) -> bool {
    id.as_ref().is_some_and(|id| obs.agents_checked.contains(id) && !obs.online.contains(id))
}

/// A phase whose agent is offline leaves its unsent batch, to be batched
/// again once the agent is back.
fn hold_back_offline(record: &mut JobRecord, obs: &Observation, ctx: &Context<'_>, decision: &mut Decision) {
    let offline = |id: &Option<String>| agent_offline(obs, id);
    // Only a batch that cannot have reached SSM: one that may still land
    // keeps its comment, so it is found (or cancelled) rather than orphaned.
    let budget = ctx.settings.pass_budget_seconds;
    let unsent: BTreeSet<u64> = record
        .commands
        .iter()
        .filter(|(_, b)| b.command_id.is_none() && send_in_flight(b, budget, ctx.now).is_none())
        .map(|(n, _)| *n)
        .collect();
    for shard in &mut record.shards {
        let Some(a) = shard.current_mut() else { continue };
        if a.stage != Stage::Working || !offline(&a.instance_id) {
            continue;
        }
        if let Some(run) = a.phases.iter_mut().find(|p| p.status.is_none() && unsent.contains(&p.batch)) {
            run.batch = 0;
        }
    }
    // No event says an agent is back: look again at the poll delay.
    let held_offline = record.shards.iter().filter_map(|s| s.current()).any(|a| {
        a.stage == Stage::Working
            && offline(&a.instance_id)
            && a.phases.iter().any(|p| p.status.is_none() && p.batch == 0)
    });
    if held_offline {
        decision.look_within(ctx.settings.poll_delay_seconds);
    }
}

/// Phases opened this pass go into batches of up to 50 instances, one per
/// phase; a remainder waits a moment for shards close behind. The numbers
/// of the batches made now.
fn make_batches(
    record: &mut JobRecord,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) -> BTreeSet<u64> {
    let offline = |id: &Option<String>| agent_offline(obs, id);
    let mut fresh: BTreeMap<Phase, Vec<usize>> = BTreeMap::new();
    for (index, shard) in record.shards.iter().enumerate() {
        let Some(a) = shard.current() else { continue };
        if a.stage != Stage::Working {
            continue;
        }
        if let Some(run) = a.phases.iter().find(|p| p.status.is_none() && p.batch == 0) {
            if !offline(&a.instance_id) {
                fresh.entry(run.phase).or_default().push(index);
            }
        }
    }
    let aborting = record.outcome.is_some();
    // Batches made by this decision were never sent: no need to look first.
    let mut made_now: BTreeSet<u64> = BTreeSet::new();
    for (phase, mut shards) in fresh {
        // Full sends go now; a remainder waits a moment for shards close behind.
        let remainder = shards.len() % MAX_INSTANCES_PER_COMMAND;
        if remainder > 0 && !aborting {
            let first_open = shards
                .iter()
                .filter_map(|i| record.shards[*i].current())
                .filter_map(|a| a.phases.iter().find(|p| p.status.is_none() && p.batch == 0)?.opened_at)
                .min()
                .unwrap_or(ctx.now);
            let held = (ctx.now - first_open).num_seconds();
            let behind = record
                .shards
                .iter()
                .filter(|s| s.result.is_none())
                .filter_map(|s| s.current())
                .any(|a| catching_up(a, phase));
            if behind && held < COALESCE_SECONDS {
                shards.truncate(shards.len() - remainder);
                decision.look_within((COALESCE_SECONDS - held).max(1) as u32);
            }
        }
        for chunk in shards.chunks(MAX_INSTANCES_PER_COMMAND) {
            let batch = decision.take_seq();
            made_now.insert(batch);
            record.commands.insert(
                batch,
                CommandBatch {
                    phase,
                    command_id: None,
                    dispatched_at: ctx.now,
                    listed_at: None,
                    in_flight_until: None,
                },
            );
            for index in chunk {
                if let Some(run) =
                    record.shards[*index].current_mut().and_then(|a| a.phases.iter_mut().find(|p| p.status.is_none()))
                {
                    run.batch = batch;
                }
            }
        }
    }
    made_now
}

/// Every batch without a command id gets its Send (the executor adopts a
/// command already sent under its comment), unless one sent before may
/// still land unseen.
fn send_batches(
    record: &mut JobRecord,
    spec: &JobSpec,
    made_now: &BTreeSet<u64>,
    ctx: &Context<'_>,
    decision: &mut Decision,
) {
    let mut unsent: BTreeMap<u64, Vec<(String, u32)>> = BTreeMap::new();
    for shard in &record.shards {
        let Some(a) = shard.current() else { continue };
        if a.stage != Stage::Working {
            continue;
        }
        let Some(run) = a.phases.iter().find(|p| p.status.is_none()) else { continue };
        let waiting = record.commands.get(&run.batch).is_some_and(|b| b.command_id.is_none());
        if let (true, Some(instance_id)) = (waiting, &a.instance_id) {
            unsent.entry(run.batch).or_default().push((instance_id.clone(), shard.index));
        }
    }
    for (batch, instances) in unsent {
        let Some((phase, dispatched_at)) = record.commands.get(&batch).map(|b| (b.phase, b.dispatched_at)) else {
            continue;
        };
        let made = made_now.contains(&batch);
        // Sent before, never answered, and not found by its comment: it may
        // still land unseen, so it is not sent again yet (`fence`).
        let budget = ctx.settings.pass_budget_seconds;
        let in_flight = record.commands.get(&batch).and_then(|b| send_in_flight(b, budget, ctx.now));
        if let Some(until) = in_flight.filter(|_| !made) {
            decision.look_within(u32::try_from((until - ctx.now).num_seconds().max(1)).unwrap_or(u32::MAX));
            continue;
        }
        if let Some(b) = record.commands.get_mut(&batch) {
            b.in_flight_until = Some(fence::in_flight_until(ctx.now, budget));
        }
        let lines = phase_lines(record, spec, phase, &instances);
        decision.actions.push(Action::Send {
            batch,
            look_first: !made,
            request: CommandRequest {
                instance_ids: instances.iter().map(|(id, _)| id.clone()).collect(),
                lines,
                // From the dispatch, so a resend asks for what was recorded.
                timeout_seconds: phase_timeout(
                    spec,
                    phase,
                    record.deadline_at,
                    record.bill_bound(ctx.settings.cleanup_grace_minutes),
                    dispatched_at,
                ),
                comment: command_comment(&record.job_id, phase, batch),
                output_bucket: ctx.bucket.to_string(),
                // Outside jobs/: the SSM agent writes output without an SSE header.
                output_prefix: format!("outputs/{}/{}", record.job_id, phase.as_str()),
                // Only where the stack's worker role runs it: another
                // profile or account may not be allowed to write there.
                log_group: ctx
                    .settings
                    .step_log_group
                    .clone()
                    .filter(|_| spec.instance_profile.is_none() && spec.role_arn.is_none()),
            },
        });
    }
}

pub(super) fn phase_lines(
    record: &JobRecord,
    spec: &JobSpec,
    phase: Phase,
    instances: &[(String, u32)],
) -> Vec<String> {
    let mounts: Vec<(String, String)> = spec.volumes.iter().map(|v| (v.name.clone(), v.mount_point.clone())).collect();
    let plan = record.plan.as_ref();
    let preamble = Preamble {
        job_id: &record.job_id,
        instances,
        shard_count: record.shards.len() as u32,
        env: &spec.env,
        mounts: &mounts,
        items: plan.and_then(|p| p.items),
        manifests: plan.and_then(|p| p.manifests.as_deref()),
    };
    let wanted: BTreeSet<&String> = instances.iter().map(|(id, _)| id).collect();
    let targets: Vec<MountTarget> = spec
        .volumes
        .iter()
        .map(|v| MountTarget {
            name: v.name.clone(),
            device: v.device.clone(),
            mount_point: v.mount_point.clone(),
            volume_by_instance: record
                .shards
                .iter()
                .filter_map(|s| s.current())
                .filter_map(|a| {
                    let instance = a.instance_id.as_ref().filter(|id| wanted.contains(id))?;
                    let volume = a.volumes.iter().find(|x| x.name == v.name)?.volume_id.clone()?;
                    Some((instance.clone(), volume))
                })
                .collect(),
            created_blank_on: record
                .shards
                .iter()
                .filter_map(|s| s.current())
                .filter(|a| a.instance_id.as_ref().is_some_and(|id| wanted.contains(id)))
                .filter(|a| a.volumes.iter().any(|x| x.name == v.name && x.created && x.restored_from.is_none()))
                .filter(|_| matches!(v.source, VolumeSource::New { .. }))
                .filter_map(|a| a.instance_id.clone())
                .collect(),
        })
        .filter(|t| !t.volume_by_instance.is_empty())
        .collect();
    match phase {
        Phase::Mount => shell::mount_script(&preamble, &targets),
        Phase::Unmount => shell::unmount_script(&preamble, &targets),
        _ => match phase_spec(spec, phase) {
            Some(command) => shell::step_script(&preamble, command, phase.as_str()),
            None => vec!["true".to_string()],
        },
    }
}
