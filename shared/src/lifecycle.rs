//! The job lifecycle as a pure state machine: no I/O, no clock of its own.
//!
//! Steps observe the cloud, turn what they saw into an [`Event`], and call
//! [`apply`]. Which message follows which state is [`next_step`]. Which
//! command phase runs next is [`next_phase`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::StepError;
use crate::record::{JobRecord, JobState, Outcome, Phase, PhaseStamp};

/// Something a step observed that moves the job on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Launch claimed the job.
    LaunchStarted,
    /// Every instance exists.
    FleetLaunched,
    /// Every instance is running, its agent Online, its volumes attached.
    FleetReady,
    /// The last command phase finished.
    PhasesDone,
    /// Volumes detached, snapshotted and pruned.
    VolumesReleased,
    /// Every instance is terminated; the report is written.
    FleetTerminated,
    /// Stop early: cancel, deadline, or a failure the job cannot recover from.
    Abort { outcome: Outcome, reason: String },
}

/// The SQS step that drives a job in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Launch,
    Readiness,
    Command,
    Teardown,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Launch => "launch",
            Step::Readiness => "readiness",
            Step::Command => "command",
            Step::Teardown => "teardown",
        }
    }
}

/// The message that chains steps; one queue per step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepMessage {
    pub job_id: String,
    pub step: Step,
    /// The record's `step_seq` this message was sent for. Older is stale.
    pub seq: u64,
}

pub fn next_step(state: JobState) -> Option<Step> {
    match state {
        JobState::Submitted | JobState::Launching => Some(Step::Launch),
        JobState::WaitingReady => Some(Step::Readiness),
        JobState::Running => Some(Step::Command),
        JobState::Snapshotting | JobState::TearingDown => Some(Step::Teardown),
        _ => None,
    }
}

/// Apply an event to a record: the only place a job's state changes.
pub fn apply(record: &mut JobRecord, event: Event, now: DateTime<Utc>) -> Result<(), StepError> {
    use JobState::*;
    let from = record.state;
    let (to, reason) = match (&event, from) {
        (_, s) if s.is_terminal() => return Err(illegal(from, &event)),
        (Event::LaunchStarted, Submitted) => (Launching, "launching the fleet".to_string()),
        (Event::FleetLaunched, Launching) => {
            (WaitingReady, "waiting for instances to run and their SSM agents to come Online".to_string())
        }
        (Event::FleetReady, WaitingReady) => (Running, "fleet ready; running commands".to_string()),
        (Event::PhasesDone, Running) => {
            if record.outcome.is_none() {
                record.outcome = Some(Outcome::Succeeded);
            }
            (Snapshotting, keep_reason(record, "commands succeeded; snapshotting volumes"))
        }
        (Event::VolumesReleased, Snapshotting) => (TearingDown, keep_reason(record, "terminating the fleet")),
        (Event::FleetTerminated, TearingDown) => {
            let outcome = record.outcome.unwrap_or(Outcome::Failed);
            (outcome.terminal_state(), keep_reason(record, "all commands succeeded"))
        }
        (Event::Abort { outcome, reason }, state) => {
            // The first decided outcome wins: a cancel after a failure stays a failure.
            if record.outcome.is_none() || record.outcome == Some(Outcome::Succeeded) {
                record.outcome = Some(*outcome);
                record.outcome_reason = Some(reason.clone());
            }
            record.reason = record.outcome_reason.clone().unwrap_or_else(|| reason.clone());
            let to = match state {
                // Instances may exist already: terminate by tag.
                Submitted | Launching => TearingDown,
                // Volumes may be attached but are not mounted.
                WaitingReady => Snapshotting,
                // The command step runs the cleanup phases, then moves on.
                Running => Running,
                Snapshotting | TearingDown => state,
                _ => return Err(illegal(from, &event)),
            };
            record.state = to;
            if to != from {
                record.timeline.push(PhaseStamp { state: to, at: now });
            }
            return Ok(());
        }
        _ => return Err(illegal(from, &event)),
    };
    record.state = to;
    record.reason = reason;
    record.timeline.push(PhaseStamp { state: to, at: now });
    Ok(())
}

/// A decided failure's reason outlives progress messages.
fn keep_reason(record: &JobRecord, default: &str) -> String {
    match (record.outcome, &record.outcome_reason) {
        (Some(Outcome::Failed | Outcome::Cancelled), Some(reason)) => reason.clone(),
        _ => default.to_string(),
    }
}

fn illegal(from: JobState, event: &Event) -> StepError {
    StepError::Illegal(format!("{event:?} in state {from}"))
}

/// Whether the job must stop early, and why. Checked by every step.
pub fn abort_reason(record: &JobRecord, now: DateTime<Utc>) -> Option<(Outcome, String)> {
    if record.outcome.is_some_and(|o| o != Outcome::Succeeded) {
        return None; // already decided
    }
    // Once the work is done, a late deadline or cancel must not turn a success
    // into a failure, nor skip its on-success snapshots.
    if matches!(record.state, JobState::Snapshotting | JobState::TearingDown) {
        return None;
    }
    if record.cancel_requested {
        return Some((Outcome::Cancelled, format!("cancelled by request while {}", record.state)));
    }
    let deadline = record.deadline_at?;
    if now > deadline {
        let minutes = record.spec.as_ref().map(|s| s.deadline_minutes).unwrap_or_default();
        return Some((Outcome::Failed, format!("deadline of {minutes} min passed while {}", record.state)));
    }
    None
}

/// The phases this job runs, in order.
pub fn planned_phases(record: &JobRecord) -> Vec<Phase> {
    let Some(spec) = &record.spec else { return vec![] };
    let has_volumes = !record.volumes.is_empty();
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

/// The next command phase to dispatch or collect, or None when all are done.
/// After a failure or abort only cleanup phases run.
pub fn next_phase(record: &JobRecord) -> Option<Phase> {
    let failed = record.outcome.is_some_and(|o| o != Outcome::Succeeded);
    planned_phases(record).into_iter().find(|phase| {
        let finished = record.step(*phase).is_some_and(|s| s.finished_at.is_some());
        let started = record.step(*phase).is_some();
        if finished {
            return false;
        }
        // An unfinished phase that was started must be collected, even after failure.
        !failed || phase.runs_after_failure() || started
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::record::StepRun;
    use crate::spec::parse;

    fn record(with_volume: bool) -> JobRecord {
        let mut spec = serde_json::json!({
            "fleet": {"count": 2}, "instance_types": ["t3.micro"], "image": "ami-0abc",
            "setup": {"commands": [["true"]]}, "run": {"commands": [["true"]]},
            "before_unmount": {"commands": [["true"]]}, "deadline_minutes": 10
        });
        if with_volume {
            spec["volumes"] = serde_json::json!([{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data"}]);
        }
        let spec = parse(&spec.to_string()).expect("spec");
        let plan = plan(&spec).expect("plan");
        let mut record = JobRecord::new("j".into(), spec, plan, Utc::now());
        if with_volume {
            record.volumes.push(crate::record::VolumeEntry {
                name: "data".into(),
                volume_id: "vol-1".into(),
                instance_id: "i-1".into(),
                device: "/dev/sdf".into(),
                created_by_flotilla: true,
                detached: false,
                deleted: false,
                detach_requests: 0,
                detach_abandoned: false,
            });
        }
        record
    }

    fn finish(record: &mut JobRecord, phase: Phase, ok: bool) {
        record.steps.push(StepRun {
            phase,
            command_ids: vec![],
            dispatched_at: Utc::now(),
            finished_at: Some(Utc::now()),
            invocations: vec![],
            succeeded: Some(ok),
        });
    }

    #[test]
    fn happy_path_visits_every_state_in_order() {
        let mut r = record(true);
        let now = Utc::now();
        for event in [
            Event::LaunchStarted,
            Event::FleetLaunched,
            Event::FleetReady,
            Event::PhasesDone,
            Event::VolumesReleased,
            Event::FleetTerminated,
        ] {
            apply(&mut r, event, now).expect("legal");
        }
        let states: Vec<_> = r.timeline.iter().map(|s| s.state).collect();
        use JobState::*;
        assert_eq!(states, vec![Submitted, Launching, WaitingReady, Running, Snapshotting, TearingDown, Succeeded]);
        assert_eq!(r.reason, "all commands succeeded");
    }

    #[test]
    fn terminal_states_accept_nothing() {
        let mut r = record(false);
        r.state = JobState::Succeeded;
        assert!(apply(&mut r, Event::LaunchStarted, Utc::now()).is_err());
        assert!(apply(&mut r, Event::Abort { outcome: Outcome::Cancelled, reason: "x".into() }, Utc::now()).is_err());
    }

    #[test]
    fn duplicate_events_are_illegal_not_repeated() {
        let mut r = record(false);
        apply(&mut r, Event::LaunchStarted, Utc::now()).expect("first");
        assert!(apply(&mut r, Event::LaunchStarted, Utc::now()).is_err());
    }

    #[test]
    fn phases_run_in_order_and_cleanup_survives_failure() {
        let mut r = record(true);
        assert_eq!(next_phase(&r), Some(Phase::Mount));
        finish(&mut r, Phase::Mount, true);
        assert_eq!(next_phase(&r), Some(Phase::Setup));
        finish(&mut r, Phase::Setup, true);
        assert_eq!(next_phase(&r), Some(Phase::Run));
        finish(&mut r, Phase::Run, false);
        r.outcome = Some(Outcome::Failed);
        assert_eq!(next_phase(&r), Some(Phase::BeforeUnmount));
        finish(&mut r, Phase::BeforeUnmount, true);
        assert_eq!(next_phase(&r), Some(Phase::Unmount));
        finish(&mut r, Phase::Unmount, true);
        assert_eq!(next_phase(&r), None);
    }

    #[test]
    fn failure_in_setup_skips_run() {
        let mut r = record(false);
        finish(&mut r, Phase::Setup, false);
        r.outcome = Some(Outcome::Failed);
        assert_eq!(next_phase(&r), Some(Phase::BeforeUnmount));
    }

    #[test]
    fn abort_while_waiting_goes_to_snapshotting_and_keeps_first_reason() {
        let mut r = record(true);
        apply(&mut r, Event::LaunchStarted, Utc::now()).expect("legal");
        apply(&mut r, Event::FleetLaunched, Utc::now()).expect("legal");
        apply(&mut r, Event::Abort { outcome: Outcome::Failed, reason: "deadline".into() }, Utc::now()).expect("legal");
        assert_eq!(r.state, JobState::Snapshotting);
        apply(&mut r, Event::Abort { outcome: Outcome::Cancelled, reason: "cancel".into() }, Utc::now())
            .expect("legal");
        assert_eq!((r.outcome, r.reason.as_str()), (Some(Outcome::Failed), "deadline"));
        apply(&mut r, Event::VolumesReleased, Utc::now()).expect("legal");
        apply(&mut r, Event::FleetTerminated, Utc::now()).expect("legal");
        assert_eq!((r.state, r.reason.as_str()), (JobState::Failed, "deadline"));
    }

    #[test]
    fn deadline_and_cancel_are_noticed() {
        let mut r = record(false);
        let late = r.deadline_at.expect("deadline") + chrono::Duration::seconds(1);
        assert_eq!(abort_reason(&r, Utc::now()), None);
        assert!(
            abort_reason(&r, late).is_some_and(|(o, why)| o == Outcome::Failed && why.contains("deadline of 10 min"))
        );
        r.cancel_requested = true;
        assert_eq!(abort_reason(&r, Utc::now()).map(|a| a.0), Some(Outcome::Cancelled));
    }

    #[test]
    fn finishing_jobs_ignore_late_deadlines_and_cancels() {
        let mut r = record(true);
        r.state = JobState::Snapshotting;
        r.outcome = Some(Outcome::Succeeded);
        r.cancel_requested = true;
        let late = r.deadline_at.expect("deadline") + chrono::Duration::hours(1);
        assert_eq!(abort_reason(&r, late), None);
    }
}
