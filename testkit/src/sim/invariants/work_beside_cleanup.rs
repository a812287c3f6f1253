//! No user work (setup, run) running on an instance once its cleanup
//! (before_unmount, unmount) started there, on the simulated instances.

use super::*;

pub const NAME: &str = "work beside cleanup";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { state, .. } = *ended;
    type Run = (DateTime<Utc>, DateTime<Utc>, String);
    let mut work: BTreeMap<&String, Vec<Run>> = BTreeMap::new();
    let mut cleanup: BTreeMap<&String, DateTime<Utc>> = BTreeMap::new();
    for command in &state.commands {
        let phase = command.request.comment.split_whitespace().nth(2).unwrap_or_default();
        let timeout = Duration::seconds(i64::from(command.request.timeout_seconds));
        for (instance_id, run) in &command.runs {
            let Some(started) = run.delivered_at.filter(|_| run.started_step) else { continue };
            let mut until = run.finishes_at.min(started + timeout);
            for at in [run.died_at, run.cancelled_at].into_iter().flatten() {
                until = until.min(at);
            }
            match phase {
                "setup" | "run" => work.entry(instance_id).or_default().push((started, until, phase.to_string())),
                "before_unmount" | "unmount" => {
                    let began = run.begins_at.unwrap_or(started);
                    let first = cleanup.entry(instance_id).or_insert(began);
                    *first = (*first).min(began);
                }
                _ => {}
            }
        }
    }
    for (instance_id, from) in &cleanup {
        for (started, until, phase) in work.get(instance_id).into_iter().flatten() {
            if *until > *from {
                found(violations, NAME, format!("{instance_id}: {phase} ran {started}..{until}, cleanup from {from}"));
            }
        }
    }
}
