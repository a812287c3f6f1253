//! The jobs index: one empty object per job under `index/`, named so that
//! S3's name order (the only order ListObjectsV2 knows) is newest first.
//! `flotilla ls` reads a page of it and the records of that page: a cost
//! that grows with the page, not with every job ever run. Intake writes a
//! job's entries, one PUT each; writing them again is harmless (same name).

use chrono::{DateTime, Utc};

/// Every job, newest first.
pub const ALL: &str = "index/jobs/";

/// The jobs of one name (`spec.name`), newest first.
pub fn by_name(name: &str) -> String {
    format!("index/names/{name}/")
}

/// Milliseconds counted down from the year 2286, so a later job sorts first.
const LAST_MS: i64 = 9_999_999_999_999;

/// The entry's name under `prefix`: `<inverted ms>-<job id>`.
pub fn entry(prefix: &str, job_id: &str, submitted_at: DateTime<Utc>) -> String {
    let inverted = LAST_MS - submitted_at.timestamp_millis().clamp(0, LAST_MS);
    format!("{prefix}{inverted:013}-{job_id}")
}

/// The job id and submission time an entry names.
pub fn parse(prefix: &str, key: &str) -> Option<(String, DateTime<Utc>)> {
    let rest = key.strip_prefix(prefix)?;
    let (inverted, job_id) = rest.split_once('-')?;
    let inverted: i64 = inverted.parse().ok()?;
    Some((job_id.to_string(), DateTime::from_timestamp_millis(LAST_MS - inverted)?))
}

/// The keys to write for a job.
pub fn entries(job_id: &str, name: Option<&str>, submitted_at: DateTime<Utc>) -> Vec<String> {
    let mut keys = vec![entry(ALL, job_id, submitted_at)];
    if let Some(name) = name {
        keys.push(entry(&by_name(name), job_id, submitted_at));
    }
    keys
}

/// Write `record`'s entries (empty objects).
pub async fn add<O: crate::ports::Objects + ?Sized>(
    objects: &O,
    record: &crate::record::JobRecord,
) -> crate::ports::CloudResult<()> {
    let name = record.spec.as_ref().and_then(|s| s.name.as_deref());
    for key in entries(&record.job_id, name, record.submitted_at) {
        objects.put(&key, b"", "text/plain").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn newer_jobs_sort_first_and_entries_read_back() {
        let early = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("time");
        let late = early + chrono::Duration::milliseconds(1);
        let (a, b) = (entry(ALL, "job-a-1", early), entry(ALL, "job-b", late));
        assert!(b < a, "{b} sorts before {a}");
        assert_eq!(parse(ALL, &a), Some(("job-a-1".to_string(), early)));
        assert_eq!(entries("j", Some("nightly"), early).len(), 2);
        assert!(entries("j", Some("nightly"), early)[1].starts_with("index/names/nightly/"));
    }
}
