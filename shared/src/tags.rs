//! Names, tags and ClientTokens of everything a job creates: the one home
//! of how Flotilla marks what is its own, read back by the reconciler, the
//! reaper and the event router.

use std::collections::BTreeMap;

use chrono::SecondsFormat;

use crate::record::JobRecord;
use crate::settings::Settings;
use crate::spec::JobSpec;

pub const MANAGED_BY: &str = "flotilla:managed-by";
pub const MANAGED_BY_VALUE: &str = "flotilla";
/// The deployment (CloudFormation stack) that created it: every search
/// and every IAM condition is scoped to it, so two stacks in one account
/// never adopt or reap each other's resources.
pub const STACK: &str = "flotilla:stack";
/// The opt-in a user puts on a volume or snapshot (value: the stack name)
/// before a job may name it as `volume_id` or `snapshot_id`.
pub const ALLOW: &str = "flotilla:allow";
/// Who submitted the job (the SQS SenderId): snapshot retention never
/// crosses principals.
pub const SUBMITTER: &str = "flotilla:submitter";
pub const JOB_ID: &str = "flotilla:job-id";
pub const JOB_NAME: &str = "flotilla:job-name";
pub const EXPIRES_AT: &str = "flotilla:expires-at";
pub const SHARD: &str = "flotilla:shard";
pub const VOLUME: &str = "flotilla:volume";
pub const SOURCE_VOLUME: &str = "flotilla:source-volume";
pub const INSTANCE: &str = "flotilla:instance";
/// The RunInstances ClientToken an instance was launched with.
pub const LAUNCH: &str = "flotilla:launch";
pub const ATTEMPT: &str = "flotilla:attempt";
/// The reaper's mark: when it first found the resource orphaned. It acts
/// only on a later pass, so a record written a moment late never loses
/// its fleet (mark-then-delete).
pub const ORPHANED_AT: &str = "flotilla:orphaned-at";
/// A volume whose policy takes no snapshot: the reaper may delete it
/// without one.
pub const SCRATCH: &str = "flotilla:scratch";
/// A snapshot lineage's retention, so the reaper can apply it when no
/// run of the job prunes any more.
pub const KEEP_LAST: &str = "flotilla:keep-last";
pub const MAX_AGE_DAYS: &str = "flotilla:max-age-days";
/// Why a job took a snapshot (`retention::kind`): only `final` ones can
/// become good.
pub const KIND: &str = "flotilla:kind";
/// Set by a job that SUCCEEDED on its shards' final snapshots just
/// before it ends: the only snapshots `keep_last` counts.
pub const GOOD: &str = "flotilla:good";
/// The reaper's copy of an orphaned volume: outside every lineage rule.
pub const REAPED: &str = "flotilla:reaped";
/// On a debug hold's instance and the volumes its job created: when the
/// hold ends. The reaper spares them until then, and counts only its own
/// (`REAPED`) snapshot of a held volume: the failure's predates the hold.
pub const HELD_UNTIL: &str = "flotilla:held-until";

/// The tags every search for this deployment's resources carries.
pub fn scope(stack: &str) -> [(&'static str, &str); 2] {
    [(MANAGED_BY, MANAGED_BY_VALUE), (STACK, stack)]
}

/// An EC2 ClientToken: EC2 scopes tokens to the account and Region, so the
/// stack is in it too, or two stacks with a job id in common would be
/// handed each other's instances and volumes. At most 64 characters: a
/// 6-hex stack hash, the job id (48 at most), the kind and the sequence.
pub fn client_token(stack: &str, job_id: &str, kind: char, seq: u64) -> String {
    // FNV-1a: stable across builds, unlike the std hasher.
    let hash = stack.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("{:06x}-{job_id}-{kind}{seq}", hash & 0x00ff_ffff)
}

/// The tags on everything a job creates.
pub fn job_tags(record: &JobRecord, spec: &JobSpec, settings: &Settings) -> BTreeMap<String, String> {
    let mut all = spec.tags.clone();
    let expires = record.deadline_at.unwrap_or(record.submitted_at)
        + chrono::Duration::minutes(i64::from(settings.expiry_grace_minutes));
    all.insert(MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string());
    all.insert(STACK.to_string(), settings.stack.clone());
    all.insert(SUBMITTER.to_string(), submitter(record));
    all.insert(JOB_ID.to_string(), record.job_id.clone());
    all.insert(JOB_NAME.to_string(), job_name(record));
    all.insert(EXPIRES_AT.to_string(), expires.to_rfc3339_opts(SecondsFormat::Secs, true));
    all.insert("Name".to_string(), format!("flotilla-{}", record.job_id));
    all
}

/// Who submitted the job, as its snapshots' lineage names it: the SQS
/// SenderId, without the session name of a role (`AROA...:<session>`), which
/// changes on every run of an ECS task or Lambda that submits.
pub fn submitter(record: &JobRecord) -> String {
    match record.submitted_by.as_deref() {
        Some(id) if id.starts_with("AROA") => id.split(':').next().unwrap_or(id).to_string(),
        Some(id) => id.to_string(),
        None => "unknown".to_string(),
    }
}

pub fn job_name(record: &JobRecord) -> String {
    record.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_else(|| record.job_id.clone())
}
