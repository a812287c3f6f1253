//! Why a job is where it is, in plain words: what `flotilla explain` and
//! the HTML report say. Read from the record alone; it changes nothing.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::record::{Attempt, EndCause, JobRecord, JobState, Stage};

/// One thing that explains the job's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// `quota`, `capacity`, `agent`, `admission`, `stalled`, `failed`,
    /// `interrupted`, `lost`, `timed_out`, `cancel`, `dead_letters`, `stranded`,
    /// `warning`: for a program to match.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    pub text: String,
}

/// One line of the trail, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrailLine {
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub job_id: String,
    pub state: JobState,
    /// One sentence: where the job is and why.
    pub summary: String,
    pub findings: Vec<Finding>,
    pub trail: Vec<TrailLine>,
}

/// EC2's launch errors that are the account's limits, not EC2's capacity:
/// more launches will not help until the quota is raised.
const QUOTA_CODES: [&str; 3] = ["VcpuLimitExceeded", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded"];

/// The Service Quotas quota (EC2) that limits `instance_type`'s vCPUs.
pub fn vcpu_quota_name(instance_type: &str, spot: bool) -> String {
    let family: String = instance_type.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    let group = match family.as_str() {
        "g" | "vt" => "G and VT",
        "p" => "P",
        "inf" => "Inf",
        "trn" => "Trn",
        "f" => "F",
        "x" => "X",
        "dl" => "DL",
        "u" => "High Memory",
        _ => "Standard (A, C, D, H, I, M, R, T, Z)",
    };
    if spot {
        format!("All {group} Spot Instance Requests")
    } else {
        format!("Running On-Demand {group} instances")
    }
}

/// vCPUs of an instance type, from its size as EC2 names sizes: `large` 2,
/// `xlarge` 4, `Nxlarge` 4N; burstable `nano`..`medium` 2, other `medium` 1.
/// None for `metal` and names this rule does not know.
pub fn vcpus(instance_type: &str) -> Option<u32> {
    let (family, size) = instance_type.split_once('.')?;
    match size {
        "nano" | "micro" | "small" if family.starts_with('t') => Some(2),
        "medium" => Some(if family.starts_with('t') { 2 } else { 1 }),
        "large" => Some(2),
        "xlarge" => Some(4),
        _ => size.strip_suffix("xlarge")?.parse::<u32>().ok().map(|n| 4 * n),
    }
}

/// Families whose vCPU quota new accounts get at or near 0.
pub fn starts_low(instance_type: &str) -> bool {
    let family: String = instance_type.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    matches!(family.as_str(), "g" | "vt" | "p" | "inf" | "trn" | "f" | "dl" | "x" | "u")
}

pub fn explain(record: &JobRecord, now: DateTime<Utc>) -> Explanation {
    let mut findings = Vec::new();
    for shard in &record.shards {
        for attempt in &shard.attempts {
            if let Some(finding) = attempt_finding(record, shard.index, attempt) {
                findings.push(finding);
            }
        }
    }
    let waiting = record
        .shards
        .iter()
        .filter_map(|s| s.current())
        .filter(|a| a.stage == Stage::Launching && a.launch_token.is_none() && a.end.is_none())
        .count();
    if waiting > 0 && !record.state.is_terminal() {
        findings.push(Finding {
            kind: "admission",
            shard: None,
            text: format!(
                "{waiting} shard(s) wait their turn to launch: launches of all jobs take turns through the \
                 deployment's launch budget, so EC2's request rate is never exceeded"
            ),
        });
    }
    for (kind, text) in job_findings(record) {
        findings.push(Finding { kind, shard: None, text });
    }
    if let Some(hold) = &record.hold {
        findings.push(Finding {
            kind: "debug-hold",
            shard: Some(hold.shard),
            text: hold.describe(&record.job_id, now),
        });
    }
    Explanation {
        job_id: record.job_id.clone(),
        state: record.state,
        summary: summary(record, now),
        findings,
        trail: trail(record),
    }
}

/// What an attempt's end says, if it explains anything.
fn attempt_finding(record: &JobRecord, shard: u32, attempt: &Attempt) -> Option<Finding> {
    let end = attempt.end.as_ref()?;
    let launch = record.launch_of(attempt);
    let what = format!("{} {}", launch.instance_type, launch.market.as_str());
    let (kind, text) = match end.cause {
        EndCause::Capacity if QUOTA_CODES.iter().any(|c| end.detail.contains(c)) => (
            "quota",
            format!(
                "attempt {}: the account's quota refused {what}: {}. More tries will not help: ask for an \
                 increase of \"{}\" (Service Quotas, Amazon EC2) in this Region",
                attempt.number,
                end.detail,
                vcpu_quota_name(&launch.instance_type, launch.market == crate::spec::Market::Spot)
            ),
        ),
        EndCause::Capacity => {
            ("capacity", format!("attempt {}: EC2 had no capacity for {what}: {}", attempt.number, end.detail))
        }
        EndCause::AgentNeverOnline => (
            "agent",
            format!(
                "attempt {}: {} never registered with SSM ({}): check that its instance profile has \
                 AmazonSSMManagedInstanceCore and its subnet reaches SSM (a NAT or VPC endpoints)",
                attempt.number,
                attempt.instance_id.as_deref().unwrap_or("the instance"),
                end.detail
            ),
        ),
        EndCause::CommandFailed => (
            "failed",
            format!(
                "attempt {}: a step failed{}: {}",
                attempt.number,
                end.exit_code.map(|c| format!(" with exit code {c}")).unwrap_or_default(),
                end.detail
            ),
        ),
        EndCause::SpotInterruption => {
            ("interrupted", format!("attempt {}: EC2 reclaimed its spot instance: {}", attempt.number, end.detail))
        }
        EndCause::InstanceLost => {
            ("lost", format!("attempt {}: its instance was lost: {}", attempt.number, end.detail))
        }
        EndCause::TimedOut => ("timed_out", format!("attempt {}: ran past its time: {}", attempt.number, end.detail)),
        EndCause::Permanent => ("failed", format!("attempt {}: {}", attempt.number, end.detail)),
        EndCause::Succeeded | EndCause::Aborted => return None,
    };
    Some(Finding { kind, shard: Some(shard), text })
}

fn job_findings(record: &JobRecord) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(stalled) = record.stalled.as_ref().filter(|_| !record.state.is_terminal()) {
        out.push(("stalled", format!("its last pass stopped early and will try again: {stalled}")));
    }
    if record.cancel_requested {
        let at = record.cancel_requested_at.map(|t| format!(" at {}", t.format("%H:%M:%S UTC"))).unwrap_or_default();
        out.push(("cancel", format!("a cancel was received{at}")));
    }
    if record.dead_letters > 0 {
        out.push((
            "dead_letters",
            format!("{} of its reconcile messages failed five times (see `flotilla dlq`)", record.dead_letters),
        ));
    }
    if !record.stranded_instances.is_empty() {
        out.push((
            "stranded",
            format!("left for you to look at, the job could not remove: {}", record.stranded_instances.join(", ")),
        ));
    }
    for warning in &record.warnings {
        out.push(("warning", warning.clone()));
    }
    out
}

/// "RUNNING for 14m: shards of 4: 3 working, 1 launching".
fn summary(record: &JobRecord, now: DateTime<Utc>) -> String {
    let since = record.timeline.last().map_or(record.submitted_at, |s| s.at);
    let minutes = (now - since).num_minutes().max(0);
    let reason = match (&record.outcome_reason, record.state.is_terminal()) {
        (Some(reason), true) => reason.clone(),
        _ => record.reason.clone(),
    };
    if record.state.is_terminal() {
        format!("{} at {}: {reason}", record.state, since.format("%Y-%m-%d %H:%M:%S UTC"))
    } else {
        format!("{} for {minutes} min: {reason}", record.state)
    }
}

/// The job's states and every shard's notes, oldest first.
fn trail(record: &JobRecord) -> Vec<TrailLine> {
    // The timeline is in the order the states came; stamps written by
    // different functions may disagree by a clock's skew, so keep its order.
    let mut latest = record.submitted_at;
    let mut lines: Vec<TrailLine> = record
        .timeline
        .iter()
        .map(|s| {
            latest = latest.max(s.at);
            TrailLine { at: latest, shard: None, text: format!("job {}", s.state) }
        })
        .collect();
    for shard in &record.shards {
        for note in &shard.trail {
            lines.push(TrailLine { at: note.at, shard: Some(shard.index), text: note.text.clone() });
        }
    }
    lines.sort_by_key(|l| l.at);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_for_a_family_is_named() {
        assert_eq!(vcpu_quota_name("g5.xlarge", false), "Running On-Demand G and VT instances");
        assert_eq!(vcpu_quota_name("p4d.24xlarge", true), "All P Spot Instance Requests");
        assert_eq!(vcpu_quota_name("trn1.2xlarge", false), "Running On-Demand Trn instances");
        assert_eq!(vcpu_quota_name("inf2.xlarge", false), "Running On-Demand Inf instances");
        assert_eq!(
            vcpu_quota_name("c5.large", false),
            "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"
        );
    }
}
