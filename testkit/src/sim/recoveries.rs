//! What a job recovered from, counted on the simulated cloud: shows the
//! faults were met (attempts ended and replaced, deliveries the step guard
//! answered, creates that landed late, volumes restored, partial launches).

use std::collections::BTreeMap;

use chrono::Duration;

use crate::fake::FakeState;
use flotilla_shared::record::JobRecord;

pub fn count(record: &JobRecord, state: &FakeState, recoveries: &mut BTreeMap<&'static str, u64>) {
    for attempt in record.attempts() {
        let Some(end) = &attempt.end else { continue };
        let kind = match end.cause {
            flotilla_shared::record::EndCause::SpotInterruption => "spot interruption",
            flotilla_shared::record::EndCause::InstanceLost if end.detail.contains("impaired") => "impaired instance",
            flotilla_shared::record::EndCause::InstanceLost if end.detail.contains("stopped reporting") => {
                "silent agent"
            }
            flotilla_shared::record::EndCause::InstanceLost => "instance lost",
            flotilla_shared::record::EndCause::AgentNeverOnline => "agent never online",
            _ => continue,
        };
        *recoveries.entry(kind).or_default() += 1;
    }
    // What the step guard and SSM's delivery did on the simulated instances.
    let runs = || state.commands.iter().flat_map(|c| c.runs.values().map(move |r| (c, r)));
    let user = |c: &crate::fake::FakeCommand| {
        !c.request.lines.iter().any(|l| l.starts_with(flotilla_shared::shell::VOLUME_OP_MARKER))
    };
    let guarded = runs().filter(|(c, r)| user(c) && r.delivered_at.is_some() && !r.started_step).count();
    *recoveries.entry("re-delivery the guard answered").or_default() += guarded as u64;
    let later = runs().filter(|(c, r)| r.delivered_at.is_some_and(|at| at > c.sent_at + Duration::seconds(1))).count();
    *recoveries.entry("delivered when its agent returned").or_default() += later as u64;
    *recoveries.entry("create landed late").or_default() += state.evidence.late_landed;
    // Cleanup killed by its own timeout while the work fence waited on work
    // nobody cancelled (counted, not a violation: data is safe, time is lost).
    let stuck = runs()
        .filter(|(c, r)| {
            let timeout = Duration::seconds(i64::from(c.request.timeout_seconds));
            r.delivered_at.zip(r.begins_at).is_some_and(|(delivered, begins)| begins > delivered + timeout)
        })
        .count();
    *recoveries.entry("cleanup timed out behind the work fence").or_default() += stuck as u64;
    let restored = state.volumes.iter().filter(|v| v.snapshot_id.is_some()).count(); // sim sources are all `new`
    *recoveries.entry("volume restored").or_default() += restored as u64;
    let partial = state.launch_tokens.values().filter(|(print, ids)| {
        print.rsplit('|').next().and_then(|n| n.parse::<usize>().ok()).is_some_and(|asked| ids.len() < asked)
    });
    *recoveries.entry("partial launch").or_default() += partial.count() as u64;
}
