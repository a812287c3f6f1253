//! Phases: which steps a shard runs, their timeouts, and a working
//! attempt's move from one phase to the next.

use super::*;

/// The phases this job runs, in order.
pub fn planned_phases(spec: &JobSpec, shard: u32) -> Vec<Phase> {
    let has_volumes = volume_specs(spec, shard).next().is_some();
    Phase::ALL
        .into_iter()
        .filter(|phase| match phase {
            Phase::Mount | Phase::Unmount => has_volumes,
            Phase::Setup => spec.setup.is_some(),
            Phase::Run => true,
            Phase::BeforeUnmount => spec.before_unmount.is_some(),
        })
        .collect()
}

pub(super) fn phase_spec(spec: &JobSpec, phase: Phase) -> Option<&CommandSpec> {
    match phase {
        Phase::Setup => spec.setup.as_ref(),
        Phase::Run => Some(&spec.run),
        Phase::BeforeUnmount => spec.before_unmount.as_ref(),
        Phase::Mount | Phase::Unmount => None,
    }
}

/// The step's own timeout, else what is left of the deadline: a work step
/// gets all of it (at least a minute), within SSM's 48 hours; a cleanup step,
/// which also runs after a cancel or the deadline, 10 minutes to an hour.
/// A phase's SSM timeout: its own, or what is left of the deadline, and
/// never past the bound on the bill.
pub fn phase_timeout(
    spec: &JobSpec,
    phase: Phase,
    deadline_at: Option<DateTime<Utc>>,
    bound: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> u32 {
    let own = own_phase_timeout(spec, phase, deadline_at, now);
    match bound {
        Some(at) => own.min(u32::try_from((at - now).num_seconds().max(1)).unwrap_or(u32::MAX)),
        None => own,
    }
}

pub(super) fn own_phase_timeout(
    spec: &JobSpec,
    phase: Phase,
    deadline_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> u32 {
    let Some(step) = phase_spec(spec, phase) else { return VOLUME_OP_TIMEOUT_SECONDS };
    step.timeout_seconds.unwrap_or_else(|| {
        let left = deadline_at.map_or(i64::from(spec.deadline_minutes) * 60, |at| (at - now).num_seconds());
        let (least, most) = if phase.runs_after_failure() {
            (600, 3600)
        } else {
            (60, i64::from(crate::spec::MAX_STEP_TIMEOUT_SECONDS))
        };
        left.clamp(least, most) as u32
    })
}

/// Collect the phase in flight, then pick the next one. Work phases stop at
/// the first failure, cancel, deadline or interruption; cleanup phases run
/// after those if the volumes were mounted.
pub(super) fn work(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    commands: &BTreeMap<u64, CommandBatch>,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) {
    let stopping = job.aborting || attempt.interrupted || attempt.timed_out;
    if collect_phase(job, shard, attempt, commands, obs, ctx, decision) == Collected::Waiting {
        return;
    }
    if stopping && attempt.end.is_none() {
        if attempt.completed_phases.contains(&Phase::Run) {
            // The work is done: its on-success snapshots are earned; cleanup still runs.
            end(attempt, EndCause::Succeeded, "", Some(0));
        } else {
            let cause = if attempt.interrupted { EndCause::SpotInterruption } else { EndCause::Aborted };
            end(attempt, cause, "stopped while working", None);
        }
    }
    open_next_phase(job.spec, shard, attempt, ctx.now);
}

/// What became of the phase in flight.
#[derive(PartialEq, Eq)]
enum Collected {
    /// Still running, or waiting to be sent: nothing follows it in this pass.
    Waiting,
    /// It ended, or there is none: the next phase may open.
    Ended,
}

/// The phase in flight, as one look found it.
struct InFlight {
    /// Its place in `attempt.phases`.
    at: usize,
    /// Empty while its Send has no answer.
    command_id: String,
    dispatched_at: DateTime<Utc>,
    /// The execution timeout it was sent with.
    sent_timeout: u32,
    /// The guard said an earlier delivery of this step died mid-step.
    guard_lost: bool,
}

/// The phase in flight: its invocation's result, a cancel while the job
/// stops, or a timeout SSM never reported; an ended one is judged.
fn collect_phase(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    commands: &BTreeMap<u64, CommandBatch>,
    obs: &Observation,
    ctx: &Context<'_>,
    decision: &mut Decision,
) -> Collected {
    let now = ctx.now;
    let Some(at) = attempt.phases.iter().position(|p| p.status.is_none()) else { return Collected::Ended };
    let run = &attempt.phases[at];
    // No batch: held back while its agent is offline.
    let batch = commands.get(&run.batch);
    let dispatched_at = batch.map(|b| b.dispatched_at).or(run.opened_at).unwrap_or(now);
    let mut flight = InFlight {
        at,
        command_id: batch.and_then(|b| b.command_id.clone()).unwrap_or_default(),
        dispatched_at,
        sent_timeout: phase_timeout(job.spec, run.phase, job.deadline_at, job.bound, dispatched_at),
        guard_lost: false,
    };
    let collected = if flight.command_id.is_empty() {
        collect_unsent(job, shard, attempt, &flight, batch, ctx, decision)
    } else {
        read_invocation(job, shard, attempt, &mut flight, obs, now, decision)
    };
    if collected == Collected::Ended {
        judge(job, shard, attempt, &flight, obs, decision);
    }
    collected
}

/// A phase whose Send has no answer yet: it is planned again (found by
/// comment first); while the job stops it is closed as never sent, unless
/// it may still land; an agent that never took it ends the attempt.
fn collect_unsent(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    flight: &InFlight,
    batch: Option<&CommandBatch>,
    ctx: &Context<'_>,
    decision: &mut Decision,
) -> Collected {
    let now = ctx.now;
    let stopping = job.aborting || attempt.interrupted || attempt.timed_out;
    let run = &mut attempt.phases[flight.at];
    let in_flight = batch.and_then(|b| send_in_flight(b, job.budget_seconds, now)).is_some();
    if stopping && !run.phase.runs_after_failure() && in_flight {
        // It may still land: cleanup must not run beside it. It is
        // looked up until it is found (then cancelled) or cannot land.
        return Collected::Waiting;
    }
    if stopping && !run.phase.runs_after_failure() {
        run.status = Some("Cancelled".into());
        run.finished_at = Some(now);
        return Collected::Ended;
    }
    let asked_at = run.opened_at.unwrap_or(flight.dispatched_at);
    if now <= asked_at + Duration::seconds(i64::from(ctx.settings.agent_timeout_seconds)) {
        return Collected::Waiting;
    }
    // SSM would not take the command this long: its agent is gone.
    let instance_id = attempt.instance_id.clone().unwrap_or_default();
    let detail = format!("SSM agent of {instance_id} stopped answering before {}", run.phase.as_str());
    let in_cleanup = run.phase.runs_after_failure();
    if attempt.completed_phases.contains(&Phase::Run) {
        end(attempt, EndCause::Succeeded, "", Some(0)); // the work is done
        if in_cleanup {
            attempt.cleanup_failed.get_or_insert(format!("shard {shard}: {detail}"));
            attempt.cleanup_lost = true;
        }
    } else {
        end(attempt, EndCause::InstanceLost, &detail, None);
    }
    decision.notes.push(detail);
    attempt.stage = Stage::Releasing;
    Collected::Waiting
}

/// A sent phase's invocation: its result and output once it ended; while
/// the job stops, a cancel until SSM says it ended; past its timeout with
/// no report, a cancel and TimedOut.
fn read_invocation(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    flight: &mut InFlight,
    obs: &Observation,
    now: DateTime<Utc>,
    decision: &mut Decision,
) -> Collected {
    let stopping = job.aborting || attempt.interrupted || attempt.timed_out;
    let instance_id = attempt.instance_id.clone().unwrap_or_default();
    let number = attempt.number;
    let run = &mut attempt.phases[flight.at];
    let timeout = Duration::seconds(i64::from(flight.sent_timeout) + REPORT_GRACE_SECONDS);
    let command_id = flight.command_id.clone();
    let view = obs.invocations.get(&(command_id.clone(), instance_id.clone()));
    match view {
        Some(view) if view.is_finished() => {
            flight.guard_lost =
                view.exit_code == Some(shell::LOST_EXIT_CODE) && view.stderr.contains(shell::LOST_MARKER);
            let mut lines: Vec<&str> = view.stdout.lines().collect();
            let stderr: Vec<String> = view.stderr.lines().map(|l| format!("[stderr] {l}")).collect();
            lines.extend(stderr.iter().map(String::as_str));
            if !lines.is_empty() {
                let skip = lines.len().saturating_sub(OUTPUT_TAIL_LINES);
                decision.actions.push(Action::SaveOutput {
                    name: output_name(shard, number, run.phase),
                    body: lines[skip..].join("\n"),
                });
            }
            run.status = Some(view.status.clone());
            run.exit_code = view.exit_code;
            run.finished_at = Some(now);
            Collected::Ended
        }
        _ if stopping && !run.phase.runs_after_failure() && now <= flight.dispatched_at + timeout => {
            // Cancel until SSM reports the invocation ended: cleanup must
            // not run beside work that is still writing. While SSM says
            // Cancelling, the cancel is under way: asking again adds nothing.
            if view.is_none_or(|v| v.status != CommandStatus::Cancelling) {
                decision.actions.push(Action::Cancel { command_id, instance_ids: vec![instance_id] });
            }
            Collected::Waiting
        }
        _ if now > flight.dispatched_at + timeout => {
            // SSM never reported: treat as a timeout and stop the command.
            decision.actions.push(Action::Cancel { command_id, instance_ids: vec![instance_id] });
            run.status = Some("TimedOut".into());
            run.finished_at = Some(now);
            Collected::Ended
        }
        _ => Collected::Waiting,
    }
}

/// An ended phase: a success is recorded; a failure fails the cleanup, or
/// ends the attempt as stopped, lost (SSM never reached the agent, or the
/// guard found an earlier delivery dead) or failed.
fn judge(
    job: &JobFacts<'_>,
    shard: u32,
    attempt: &mut Attempt,
    flight: &InFlight,
    obs: &Observation,
    decision: &mut Decision,
) {
    let run = attempt.phases[flight.at].clone();
    if run.succeeded() {
        // Only failures and the phase in flight keep their detail; a
        // success keeps its name and, for the report, its times.
        let after_launch = |at| crate::record::seconds_after(attempt.launched_at, at);
        if let (Some(start), Some(end)) = (after_launch(run.opened_at), after_launch(run.finished_at)) {
            attempt.phase_times.push((run.phase, start, end));
        }
        attempt.phases.retain(|p| p.phase != run.phase);
        attempt.completed_phases.push(run.phase);
        return;
    }
    let stopping = job.aborting || attempt.interrupted || attempt.timed_out;
    let instance_id = attempt.instance_id.clone().unwrap_or_default();
    // SSM reports TimedOut for a command whose agent went away too: that is
    // the instance's failure, not the work's.
    let agent_offline_now = obs.agents_checked.contains(&instance_id) && !obs.online.contains(&instance_id);
    let what = match (&run.status, run.exit_code) {
        (Some(CommandStatus::TimedOut), _) => format!("timed out after {} s", flight.sent_timeout),
        (_, Some(code)) if code >= 0 => format!("exited {code}"),
        (status, _) => status.as_ref().map_or("?", |s| s.as_str()).to_ascii_lowercase(),
    };
    let detail = format!("{} {what} on {instance_id}", run.phase.as_str());
    decision.notes.push(detail.clone());
    // The on-instance guard's reserved code: an earlier delivery of
    // this step died mid-step, so the step's outcome is unknown.
    let agent_lost = matches!(
        run.status,
        Some(CommandStatus::Undeliverable | CommandStatus::DeliveryTimedOut | CommandStatus::Terminated)
    ) || (run.status == Some(CommandStatus::TimedOut)
        && (agent_offline_now || agent_away_during(attempt, flight)))
        || flight.guard_lost;
    if run.phase.runs_after_failure() {
        // The work's results may be on the volume, but not cleanly:
        // its snapshot is kept but never good, and the shard fails
        // (or, when the instance rather than the step failed, retries).
        attempt.cleanup_failed.get_or_insert(format!("shard {shard}: {detail}"));
        attempt.cleanup_lost |= agent_lost;
    } else if stopping {
        let cause = if attempt.interrupted { EndCause::SpotInterruption } else { EndCause::Aborted };
        end(attempt, cause, "stopped while working", None);
    } else if agent_lost {
        // SSM never reached the agent: the instance, not the work, failed.
        end(attempt, EndCause::InstanceLost, &detail, None);
    } else {
        let cause =
            if run.status == Some(CommandStatus::TimedOut) { EndCause::TimedOut } else { EndCause::CommandFailed };
        end(attempt, cause, &detail, run.exit_code.filter(|c| *c >= 0));
    }
}

/// Its agent was seen away while this step was out: SSM times out a step
/// whose agent is not back by the execution timeout, as it times out one
/// that ran too long, and cannot tell them apart.
fn agent_away_during(attempt: &Attempt, flight: &InFlight) -> bool {
    attempt.agent_away_seen_at.is_some_and(|seen| seen >= flight.dispatched_at)
}

/// The next phase: the planned ones in order while the attempt has not
/// ended; after it ended, the cleanup phases, only where the volumes were
/// mounted (or there are none). None left: the attempt releases.
fn open_next_phase(spec: &JobSpec, shard: u32, attempt: &mut Attempt, now: DateTime<Utc>) {
    let planned = planned_phases(spec, shard);
    let ran = |p: Phase| attempt.completed_phases.contains(&p) || attempt.phases.iter().any(|r| r.phase == p);
    let next = if attempt.end.is_none() {
        planned.into_iter().find(|p| !ran(*p))
    } else {
        let mounted = attempt.volumes.is_empty() || attempt.completed_phases.contains(&Phase::Mount);
        let started =
            !attempt.completed_phases.is_empty() || attempt.phases.iter().any(|r| !r.phase.runs_after_failure());
        if mounted && started {
            planned.into_iter().filter(|p| p.runs_after_failure()).find(|p| !ran(*p))
        } else {
            None
        }
    };
    match next {
        Some(phase) => {
            // Opened here; plan_dispatch groups it into a SendCommand.
            attempt.phases.push(PhaseRun {
                phase,
                batch: 0,
                opened_at: Some(now),
                status: None,
                exit_code: None,
                finished_at: None,
            });
        }
        None => {
            if attempt.end.is_none() {
                end(attempt, EndCause::Succeeded, "", Some(0));
            }
            attempt.stage = Stage::Releasing;
        }
    }
}

/// A send decided earlier whose answer never came may still land until the
/// takeover rule's window ends (`fence`); a record from before the window
/// was kept counts it from the decision.
/// Some(the window's end) while it may.
pub(super) fn send_in_flight(batch: &CommandBatch, budget_seconds: u32, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let until = batch.in_flight_until.unwrap_or_else(|| fence::in_flight_until(batch.dispatched_at, budget_seconds));
    (batch.command_id.is_none() && until > now && !mutation::on(Mutation::NoFence)).then_some(until)
}
