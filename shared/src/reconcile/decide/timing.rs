//! Timing: when the next pass looks again.

use super::*;

/// The shortest wait between a job's passes: none below 20 shards (each
/// event is acted on at once), then a second per 20 shards, at most 10 s:
/// a big job's shards reach their steps at scattered moments, and each
/// pass then serves many of them in the same batched calls.
pub fn pass_gap(shards: usize) -> u32 {
    (shards / 20).min(10) as u32
}

/// The longest a command in flight goes without a look when events are on.
pub const SAFETY_POLL_MAX_SECONDS: i64 = 600;

/// How often a command in flight is looked at without an event. Without
/// events (a job in another account, whose events stay on that account's
/// bus, or a deployment without them): the poll delay. With them: the
/// safety poll, growing to a quarter of the command's age (at most 10
/// minutes), so a lost event delays the job by at most a quarter.
pub fn working_poll(spec: &JobSpec, settings: &Settings, since: DateTime<Utc>, now: DateTime<Utc>) -> u32 {
    match settings.safety_poll_seconds.filter(|_| spec.role_arn.is_none()) {
        None => settings.poll_delay_seconds,
        Some(safety) => {
            let safety = i64::from(safety);
            ((now - since).num_seconds() / 4).clamp(safety, SAFETY_POLL_MAX_SECONDS.max(safety)) as u32
        }
    }
}

/// When a command in flight is next due a look without an event: its
/// safety interval after its last listing (or its send). Observe lists it
/// from then on, and the pass that schedules the look waits until then.
pub fn next_look(spec: &JobSpec, settings: &Settings, batch: &CommandBatch) -> DateTime<Utc> {
    let last = batch.listed_at.unwrap_or(batch.dispatched_at);
    last + Duration::seconds(i64::from(working_poll(spec, settings, batch.dispatched_at, last)))
}

/// A command whose invocations SSM did not list yet (its listing lags its
/// send, by up to `fence::LOOKUP_LAG_SECONDS`, and its status-change event
/// can come first): looked at again after a quarter of its age, 2-15 s,
/// while that lag lasts, so its end is seen seconds after the event, not a
/// safety poll later. Past the lag, its safety looks and timeout go on.
fn unlisted_look(batch: &CommandBatch, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let age = (now - batch.dispatched_at).num_seconds().max(0);
    (batch.listed_at.is_none() && age <= fence::LOOKUP_LAG_SECONDS + UNLISTED_LOOK_MAX_SECONDS)
        .then(|| now + Duration::seconds((age / 4).clamp(2, UNLISTED_LOOK_MAX_SECONDS)))
}

/// The longest wait between looks at a command not listed yet.
const UNLISTED_LOOK_MAX_SECONDS: i64 = 15;

/// Is a command in flight due a look this pass? From half-way to its next
/// look on: a pass that one command's look brings lists every command
/// that is half-way there, so the looks of shards that started apart fall
/// into the same passes.
pub fn look_due(spec: &JobSpec, settings: &Settings, batch: &CommandBatch, now: DateTime<Utc>) -> bool {
    let last = batch.listed_at.unwrap_or(batch.dispatched_at);
    let next = next_look(spec, settings, batch);
    now >= next - (next - last) / 2
}

/// The next moment a working attempt needs a pass with no event to bring
/// it: its commands' safety looks and timeouts (and the grace after them),
/// the limits of a failing health check, its attempt timeout, the deadline.
pub(super) fn next_working_look(
    job: &JobFacts<'_>,
    attempt: &Attempt,
    commands: &BTreeMap<u64, CommandBatch>,
    settings: &Settings,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let seconds = |s: u32| Duration::seconds(i64::from(s));
    let mut moments: Vec<DateTime<Utc>> = Vec::new();
    let mut in_flight = false;
    for run in attempt.phases.iter().filter(|p| p.status.is_none()) {
        let Some(batch) = commands.get(&run.batch).filter(|b| b.command_id.is_some()) else { continue };
        in_flight = true;
        moments.push(next_look(job.spec, settings, batch));
        moments.extend(unlisted_look(batch, now));
        let timeout = batch.dispatched_at
            + seconds(phase_timeout(job.spec, batch.phase, job.deadline_at, job.bound, batch.dispatched_at));
        moments.push(timeout + Duration::seconds(1));
        moments.push(timeout + Duration::seconds(REPORT_GRACE_SECONDS + 1));
    }
    if !in_flight {
        moments.push(now + seconds(working_poll(job.spec, settings, now, now)));
    }
    moments.extend(attempt.impaired_since.map(|at| at + seconds(settings.impaired_timeout_seconds)));
    moments.extend(attempt.agent_lost_since.map(|at| at + seconds(settings.agent_timeout_seconds)));
    if let (Some(limit), Some(at)) =
        (job.spec.retry.as_ref().and_then(|r| r.attempt_timeout_seconds), attempt.launched_at)
    {
        moments.push(at + seconds(limit) + Duration::seconds(1));
    }
    moments.extend(job.deadline_at.map(|d| d + Duration::seconds(1)));
    moments.into_iter().filter(|m| *m > now).min().unwrap_or(now + seconds(settings.poll_delay_seconds))
}

/// While an attempt waits only for its snapshots (minutes each): with
/// events (EBS says when a snapshot completes or fails), a safety look after
/// half the time waited, 30-120 s; without, after a tenth, 5-30 s, so a
/// 10-minute snapshot costs about 30 looks, not 120.
pub(super) fn snapshot_wait(attempt: &Attempt, events: bool, now: DateTime<Utc>) -> Option<u32> {
    let mut oldest: Option<DateTime<Utc>> = None;
    for volume in attempt.volumes.iter().filter(|v| !v.deleted && v.kept.is_none()) {
        let snapshot =
            volume.snapshot.as_ref().filter(|s| s.snapshot_id.is_some() && s.state == SnapshotState::Pending)?;
        let at = snapshot.requested_at?;
        oldest = Some(oldest.map_or(at, |o| o.min(at)));
    }
    let waited = (now - oldest?).num_seconds().max(0);
    Some(if events { (waited / 2).clamp(30, 120) } else { (waited / 10).clamp(5, 30) } as u32)
}

/// When a pass first saw the attempt's instance gone (its billing ended).
pub(super) fn instance_gone_at(attempt: &Attempt) -> Option<DateTime<Utc>> {
    Some(attempt.launched_at? + Duration::seconds(i64::from(attempt.billed_seconds?)))
}

/// While an attempt is released and no snapshot is pending: its instance's
/// termination is an event (a safety look every 30 s), and its volumes'
/// detachment is looked at after a fifth of the time since, 5-30 s.
pub(super) fn release_wait(attempt: &Attempt, gone_at: Option<DateTime<Utc>>, events: bool, now: DateTime<Utc>) -> u32 {
    match gone_at {
        Some(at) if !attempt.volumes.is_empty() => ((now - at).num_seconds() / 5).clamp(5, 30) as u32,
        _ if events && attempt.terminate_requested => 30,
        _ => 5,
    }
}

/// The quickest re-look at an agent that is not Online yet.
pub const AGENT_POLL_MIN_SECONDS: i64 = 1;

/// Shards that reach a phase within this long of each other share its
/// SendCommand: N shards cost ceil(N / 50) sends, and as many
/// ListCommandInvocations per pass, not one per straggler.
pub const COALESCE_SECONDS: i64 = 3;
