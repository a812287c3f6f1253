//! Job and shard transitions, published at least once, deduplicable.
//!
//! `collect` (pure) compares the record with what it last announced
//! (`JobRecord::announced`) and puts one notice per change in the record's
//! outbox, so a transition and its notice are saved by the same write. The
//! pass's end sends the outbox to the notify queue and clears it
//! (`reconcile::finish_pass`); the notify function puts each notice on
//! EventBridge and answers a waiting Step Functions task. A crash before
//! the send leaves the notices in the outbox for the next pass; a crash
//! after it sends them again, with the same `event_id`.
//!
//! The detail is shaped like AWS Batch's "Batch Job State Change" (jobId,
//! jobName, status, statusReason, attempts, createdAt, startedAt,
//! stoppedAt in epoch milliseconds), plus what Batch leaves out: cost,
//! shard counts, snapshots, the failing shard and the report.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

pub use crate::notice::*;
use crate::record::{output_name, Announced, JobRecord, JobState, Shard, Stage};
use crate::report;

/// Snapshot ids an event lists; past this the report has them all, so a
/// 1,000-shard job's event stays far under EventBridge's 256 KB entry.
pub const SNAPSHOTS_LISTED: usize = 100;

/// Lines of the failing shard's output a job event carries.
pub const FAILING_LINES: usize = 20;

/// How often a pass tells a waiting Step Functions task the job is alive.
/// The safety tick wakes every job at least every `SafetyTickRate`, so a
/// state machine's `HeartbeatSeconds` of twice that rate plus this is safe.
pub const HEARTBEAT_SECONDS: i64 = 60;

/// Step Functions caps a cause at 32,768 characters and a task's output at
/// 256 KiB; ours stay far below.
const CAUSE_CHARS: usize = 4_000;

/// A shard's status as Batch names a job's: RUNNABLE (waiting for
/// capacity or a retry), STARTING (booting, attaching), RUNNING (its
/// steps), STOPPING (cleanup), SUCCEEDED, FAILED.
pub fn shard_status(shard: &Shard) -> &'static str {
    if let Some(result) = &shard.result {
        return if result.succeeded { "SUCCEEDED" } else { "FAILED" };
    }
    match shard.current().map(|a| a.stage) {
        None | Some(Stage::Launching) | Some(Stage::Done) => "RUNNABLE",
        Some(Stage::Booting) | Some(Stage::Attaching) => "STARTING",
        Some(Stage::Working) => "RUNNING",
        Some(Stage::Releasing) => "STOPPING",
    }
}

fn shard_mark(shard: &Shard) -> String {
    format!("{}#{}", shard_status(shard), shard.current().map_or(0, |a| a.number))
}

/// Add a notice for every change since the last announcement to the
/// outbox: the job's state first when it starts, last when it ends, so a
/// subscriber sees SUCCEEDED after the shards that made it so. A job with
/// a task token also gets its answer (at the end) or a heartbeat.
pub fn collect(record: &mut JobRecord, bucket: &str, now: DateTime<Utc>) {
    let mut announced = record.announced.clone().unwrap_or_default();
    let job_changed = announced.job != Some(record.state);
    let terminal = record.state.is_terminal();
    if job_changed && !terminal {
        push_job(record, &mut announced, bucket, now);
    }
    announced.shards.resize(record.shards.len(), String::new());
    for index in 0..record.shards.len() {
        let mark = shard_mark(&record.shards[index]);
        if announced.shards[index] != mark {
            let detail = shard_detail(record, &record.shards[index]);
            push(record, &mut announced, SHARD_STATE_CHANGE, detail, None);
            announced.shards[index] = mark;
        }
    }
    if let Some(hold) = record.hold.clone().filter(|_| !announced.hold) {
        // Before the job's end, so a subscriber hears of the hold first.
        let detail = hold_detail(record, &hold);
        push(record, &mut announced, DEBUG_HOLD, detail, None);
        announced.hold = true;
    }
    if job_changed && terminal {
        push_job(record, &mut announced, bucket, now);
    }
    if terminal {
        // Its answer is on its way: a heartbeat after it would find the task closed.
        record.outbox.retain(|n| !n.is_heartbeat());
    }
    let heartbeat_due = announced.heartbeat_at.is_none_or(|at| (now - at).num_seconds() >= HEARTBEAT_SECONDS);
    if let Some(notice) = heartbeat(record, now).filter(|_| heartbeat_due) {
        // One heartbeat waiting is enough: while sends fail, no pile of them.
        record.outbox.retain(|n| !matches!(n.task, Some(TaskAnswer::Heartbeat { .. })));
        record.outbox.push(notice);
        announced.heartbeat_at = Some(now);
    }
    record.announced = Some(announced);
}

/// A heartbeat for the Step Functions task waiting on a running job.
pub fn heartbeat(record: &JobRecord, now: DateTime<Utc>) -> Option<Notice> {
    let token = task_token(record).filter(|_| !record.state.is_terminal())?;
    Some(Notice {
        event_id: format!("{}:heartbeat:{}", record.job_id, now.timestamp()),
        sequence: record.announced.as_ref().map_or(0, |a| a.sequence),
        detail_type: None,
        detail: Value::Null,
        task: Some(TaskAnswer::Heartbeat { token }),
    })
}

fn push_job(record: &mut JobRecord, announced: &mut Announced, bucket: &str, now: DateTime<Utc>) {
    let previous = announced.job;
    let detail = job_detail(record, previous, bucket, now);
    let task = task_token(record).filter(|_| record.state.is_terminal()).map(|token| answer(record, token, &detail));
    push(record, announced, JOB_STATE_CHANGE, detail, task);
    announced.job = Some(record.state);
}

fn push(record: &mut JobRecord, announced: &mut Announced, kind: &str, mut detail: Value, task: Option<TaskAnswer>) {
    announced.sequence += 1;
    let sequence = announced.sequence;
    let event_id = format!("{}:{sequence}", record.job_id);
    detail["event_id"] = json!(event_id);
    detail["sequence"] = json!(sequence);
    record.outbox.push(Notice { event_id, sequence, detail_type: Some(kind.to_string()), detail, task });
}

fn task_token(record: &JobRecord) -> Option<String> {
    record.spec.as_ref().and_then(|s| s.notify.as_ref()).and_then(|n| n.task_token.clone())
}

/// SendTaskSuccess with the job's detail, or SendTaskFailure with the
/// error name for its end and its reason as the cause.
pub fn answer(record: &JobRecord, token: String, detail: &Value) -> TaskAnswer {
    let error = match record.state {
        JobState::Succeeded => return TaskAnswer::Success { token, output: detail.clone() },
        JobState::Cancelled => errors::CANCELLED,
        JobState::Rejected => errors::REJECTED,
        _ => errors::FAILED,
    };
    let cause: String = format!("job {}: {}", record.job_id, record.reason).chars().take(CAUSE_CHARS).collect();
    TaskAnswer::Failure { token, error: error.to_string(), cause }
}

fn millis(at: Option<DateTime<Utc>>) -> Value {
    at.map_or(Value::Null, |t| json!(t.timestamp_millis()))
}

/// The job's detail: Batch's fields, then Flotilla's.
pub fn job_detail(record: &JobRecord, previous: Option<JobState>, bucket: &str, now: DateTime<Utc>) -> Value {
    let spec = record.spec.as_ref();
    let count = |status: &str| record.shards.iter().filter(|s| shard_status(s) == status).count();
    let started = record.shards.iter().flat_map(|s| &s.attempts).filter_map(|a| a.launched_at).min();
    let realized = report::realized(record);
    let snapshots: Vec<&str> = record
        .shards
        .iter()
        .flat_map(|s| &s.attempts)
        .flat_map(|a| &a.volumes)
        .filter_map(|v| v.snapshot.as_ref().and_then(|s| s.snapshot_id.as_deref()))
        .collect();
    let failing = record.shards.iter().find(|s| s.result.as_ref().is_some_and(|r| !r.succeeded));
    json!({
        "jobId": record.job_id,
        "jobName": spec.and_then(|s| s.name.clone()),
        "status": record.state,
        "previousStatus": previous,
        "statusReason": record.reason,
        "attempts": record.shards.iter().map(|s| s.attempts.len()).sum::<usize>(),
        "createdAt": record.submitted_at.timestamp_millis(),
        "startedAt": millis(started),
        "stoppedAt": millis(record.state.is_terminal().then_some(now)),
        "shards": {
            "total": record.shards.len(),
            "succeeded": count("SUCCEEDED"),
            "failed": count("FAILED"),
            "running": count("RUNNING"),
        },
        "cost": {
            "estimatedUsd": record.plan.as_ref().and_then(|p| p.estimate.as_ref()).map(|e| e.total_usd),
            "realizedUsd": realized.usd,
            "instanceSeconds": realized.instance_seconds,
        },
        "snapshots": snapshots.iter().take(SNAPSHOTS_LISTED).collect::<Vec<_>>(),
        "snapshotsTotal": snapshots.len(),
        "failingShard": failing.map(failing_shard),
        "report": format!("s3://{bucket}/jobs/{}/report.txt", record.job_id),
    })
}

/// The failing shard, where its output is (the publisher adds its last
/// lines, `failingShard.lastLines`), and why it failed.
fn failing_shard(shard: &Shard) -> Value {
    let attempt = shard.current();
    let phase = attempt.and_then(|a| a.phases.iter().rev().find(|p| p.exit_code.is_some_and(|c| c != 0)));
    json!({
        "index": shard.index,
        "attempt": attempt.map(|a| a.number),
        "reason": shard.result.as_ref().map(|r| r.reason.clone()),
        "phase": phase.map(|p| p.phase.as_str()),
        "output": phase.zip(attempt).map(|(p, a)| output_name(shard.index, a.number, p.phase)),
    })
}

/// A shard held for debugging: where it is, how to reach it, until when.
pub fn hold_detail(record: &JobRecord, hold: &crate::record::DebugHold) -> Value {
    json!({
        "jobId": record.job_id,
        "jobName": record.spec.as_ref().and_then(|s| s.name.clone()),
        "shard": hold.shard,
        "instanceId": hold.instance_id,
        "volumeIds": hold.volume_ids,
        "holdSince": millis(Some(hold.since)),
        "holdUntil": millis(Some(hold.until)),
        "startSession": hold.session_command(None),
        "release": format!("flotilla release {}", record.job_id),
    })
}

pub fn shard_detail(record: &JobRecord, shard: &Shard) -> Value {
    let attempt = shard.current();
    let launch = attempt.map(|a| record.launch_of(a));
    let snapshots: Vec<&str> = attempt
        .into_iter()
        .flat_map(|a| &a.volumes)
        .filter_map(|v| v.snapshot.as_ref().and_then(|s| s.snapshot_id.as_deref()))
        .collect();
    json!({
        "jobId": record.job_id,
        "jobName": record.spec.as_ref().and_then(|s| s.name.clone()),
        "shard": shard.index,
        "status": shard_status(shard),
        "statusReason": shard.result.as_ref().map(|r| r.reason.clone()).or_else(|| shard.trail.last().map(|n| n.text.clone())),
        "attempt": attempt.map(|a| a.number),
        "attempts": shard.attempts.len(),
        "instanceId": attempt.and_then(|a| a.instance_id.clone()),
        "instanceType": launch.as_ref().map(|l| l.instance_type.clone()),
        "market": launch.as_ref().map(|l| l.market),
        "availabilityZone": attempt.and_then(|a| a.availability_zone.clone()),
        "startedAt": millis(attempt.and_then(|a| a.launched_at)),
        "snapshots": snapshots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{AttemptVolume, ShardResult};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("time")
    }

    /// A finished 1,000-shard job, each shard with a snapshot and a long
    /// reason: what the largest events carry.
    fn big_job(token: Option<&str>) -> JobRecord {
        let mut spec = json!({
            "id": "big", "name": "n".repeat(100), "fleet": {"count": 1000}, "instance_types": ["t3.micro"],
            "image": "ami-0abc1234", "run": {"commands": [["true"]]}, "deadline_minutes": 60,
            "volumes": [{"name": "data", "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": "/data"}]
        });
        if let Some(token) = token {
            spec["notify"] = json!({"task_token": token});
        }
        let spec = crate::spec::parse(&spec.to_string()).expect("spec");
        let plan = crate::plan::plan(&spec, &crate::plan::Prices::builtin()).expect("plan");
        let mut record = JobRecord::new("big".into(), spec, plan, now());
        for shard in &mut record.shards {
            let volume: AttemptVolume = serde_json::from_value(json!({
                "name": "data", "token": "t", "volume_id": format!("vol-{:017x}", shard.index),
                "snapshot": {"snapshot_id": format!("snap-{:017x}", shard.index), "state": "completed"}
            }))
            .expect("volume");
            let attempt = shard.current_mut().expect("attempt");
            attempt.volumes.push(volume);
            attempt.stage = Stage::Done;
            shard.result = Some(ShardResult { succeeded: false, reason: "x".repeat(2_000) });
        }
        record.state = JobState::Failed;
        record.reason = "r".repeat(5_000);
        record
    }

    /// EventBridge takes 256 KB an entry, Step Functions 256 KiB of output
    /// and SQS 256 KiB a message: at 1,000 shards every event, answer and
    /// notify-queue message stays under them.
    #[test]
    fn a_thousand_shard_jobs_events_stay_under_every_limit() {
        let mut record = big_job(Some("token"));
        collect(&mut record, "bucket", now());
        assert_eq!(record.outbox.len(), 1_001, "a job event and one per shard");
        let end = record.outbox.last().expect("the job's end");
        assert_eq!(end.detail["status"], "FAILED");
        assert_eq!(end.detail["snapshots"].as_array().map(Vec::len), Some(SNAPSHOTS_LISTED));
        assert_eq!(end.detail["snapshotsTotal"], 1_000);
        for notice in &record.outbox {
            let size = notice.detail.to_string().len() + notice.detail_type.as_ref().map_or(0, String::len);
            assert!(size < 32 * 1024, "{} is {size} bytes", notice.event_id);
        }
        match &end.task {
            Some(TaskAnswer::Failure { error, cause, .. }) => {
                assert_eq!(error, errors::FAILED);
                assert!(cause.len() <= CAUSE_CHARS, "{}", cause.len());
            }
            other => panic!("{:?}", other.as_ref().map(TaskAnswer::kind)),
        }
        for part in record.outbox.chunks(NOTICES_PER_MESSAGE) {
            let message =
                serde_json::to_string(&NoticeBatch { job_id: "big".into(), notices: part.to_vec() }).expect("json");
            assert!(message.len() < 256 * 1024, "a notify message is {} bytes", message.len());
        }
    }

    /// Every notice numbered once, in order, with no gap; a second collect
    /// with nothing changed adds nothing.
    #[test]
    fn sequences_have_no_gap_and_nothing_changed_adds_nothing() {
        let mut record = big_job(None);
        record.shards.truncate(3);
        record.state = JobState::Running;
        collect(&mut record, "bucket", now());
        let first = record.outbox.len();
        collect(&mut record, "bucket", now());
        assert_eq!(record.outbox.len(), first);
        record.state = JobState::Failed;
        collect(&mut record, "bucket", now());
        let sequences: Vec<u64> = record.outbox.iter().map(|n| n.sequence).collect();
        assert_eq!(sequences, (1..=record.outbox.len() as u64).collect::<Vec<_>>());
        assert_eq!(record.outbox.last().map(|n| n.detail["previousStatus"].clone()), Some(json!("RUNNING")));
    }
}
