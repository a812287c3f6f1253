//! Names, tags and ClientTokens of what a job creates.

use super::*;

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
    all.insert(tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string());
    all.insert(tags::STACK.to_string(), settings.stack.clone());
    all.insert(tags::SUBMITTER.to_string(), submitter(record));
    all.insert(tags::JOB_ID.to_string(), record.job_id.clone());
    all.insert(tags::JOB_NAME.to_string(), job_name(record));
    all.insert(tags::EXPIRES_AT.to_string(), expires.to_rfc3339_opts(SecondsFormat::Secs, true));
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
