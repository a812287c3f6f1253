//! No moment where one shard's work ran twice at once, on the simulated
//! instances: deliveries the step guard held or turned away ran nothing.

use super::*;

pub const NAME: &str = "concurrent command";

pub fn check(ended: &Ended<'_>, violations: &mut Violations) {
    let Ended { state, .. } = *ended;
    type Interval = (DateTime<Utc>, DateTime<Utc>);
    let mut intervals: BTreeMap<(u32, String), Vec<Interval>> = BTreeMap::new();
    for command in &state.commands {
        let shards = crate::fake::shards_in(&command.request.lines);
        let phase = command.request.comment.split_whitespace().nth(2).unwrap_or_default().to_string();
        let timeout = Duration::seconds(i64::from(command.request.timeout_seconds));
        for (instance_id, run) in &command.runs {
            let Some(started) = run.delivered_at.filter(|_| run.started_step) else { continue };
            let mut until = run.finishes_at.min(started + timeout);
            if let Some(at) = run.died_at {
                until = until.min(at);
            }
            if let Some(at) = run.cancelled_at {
                until = until.min(at);
            }
            if let Some(shard) = shards.get(instance_id) {
                intervals.entry((*shard, phase.clone())).or_default().push((started, until));
            }
        }
    }
    for ((shard, phase), mut runs) in intervals {
        runs.sort();
        for pair in runs.windows(2) {
            if pair[1].0 < pair[0].1 {
                found(violations, NAME, format!("shard {shard} {phase} ran twice at once"));
            }
        }
    }
}
