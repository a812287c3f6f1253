//! Jobs as the user looks them up: one by id (`status`), or the newest
//! first (`ls`), read from the jobs index (`flotilla_shared::index`) one
//! page at a time: a ListObjectsV2 and a GET per job shown, never a GET per
//! job ever run.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use flotilla_shared::aws::s3::S3Ledger;
use flotilla_shared::index;
use flotilla_shared::ports::Records;
use flotilla_shared::record::{JobRecord, JobState};

use crate::output::Failure;

/// Records read at once while listing.
const READS_AT_ONCE: usize = 8;
/// With a state filter, at most this many index entries are read per job
/// asked for, so a rare state cannot read the whole history.
const SCAN_PER_ROW: usize = 25;

pub async fn load(ledger: &S3Ledger, job_id: &str) -> Result<JobRecord> {
    match ledger.load(job_id).await.with_context(|| format!("reading job {job_id}"))? {
        Some(versioned) => Ok(versioned.record),
        None => Err(Failure::NoSuchJob(job_id.to_string()).into()),
    }
}

/// What `ls` asks for.
pub struct Filter {
    pub state: Option<JobState>,
    pub name: Option<String>,
    pub limit: usize,
}

/// One line of `ls`.
pub struct Row {
    pub record: JobRecord,
}

/// What `ls` found, and how many index entries it read to find it.
pub struct Listing {
    pub rows: Vec<Row>,
    pub scanned: usize,
    /// More entries were left unread.
    pub more: bool,
}

/// The newest jobs that pass `filter`.
pub async fn list(s3: &aws_sdk_s3::Client, ledger: &S3Ledger, bucket: &str, filter: &Filter) -> Result<Listing> {
    let prefix = filter.name.as_deref().map_or(index::ALL.to_string(), index::by_name);
    let budget = if filter.state.is_some() { filter.limit * SCAN_PER_ROW } else { filter.limit };
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(&prefix)
        .max_keys(filter.limit.clamp(1, 1000) as i32)
        .into_paginator()
        .send();
    let mut listing = Listing { rows: Vec::new(), scanned: 0, more: false };
    let mut seen = std::collections::BTreeSet::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            anyhow::anyhow!("listing s3://{bucket}/{prefix}: {}", aws_sdk_s3::error::DisplayErrorContext(e))
        })?;
        let ids: Vec<String> = page
            .contents()
            .iter()
            .filter_map(|o| index::parse(&prefix, o.key()?))
            .map(|(id, _)| id)
            .filter(|id| seen.insert(id.clone()))
            .collect();
        listing.scanned += page.contents().len();
        let records: Vec<Option<JobRecord>> = stream::iter(ids)
            .map(|id| async move { ledger.load(&id).await.ok().flatten().map(|v| v.record) })
            .buffered(READS_AT_ONCE)
            .collect()
            .await;
        for record in records.into_iter().flatten() {
            if filter.state.is_none_or(|s| s == record.state) && listing.rows.len() < filter.limit {
                listing.rows.push(Row { record });
            }
        }
        if listing.rows.len() >= filter.limit || listing.scanned >= budget {
            listing.more = page.is_truncated().unwrap_or(false);
            break;
        }
    }
    Ok(listing)
}

/// "3m", "2h", "5d": how long ago.
pub fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - at).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Shards done, failed and in all.
fn shard_counts(record: &JobRecord) -> (usize, usize, usize) {
    let done = record.shards.iter().filter(|s| s.result.as_ref().is_some_and(|r| r.succeeded)).count();
    let failed = record.shards.iter().filter(|s| s.result.as_ref().is_some_and(|r| !r.succeeded)).count();
    (done, failed, record.shards.len())
}

/// Realized cost once it ran, else the estimate (marked `~`).
fn cost(record: &JobRecord) -> (Option<f64>, bool) {
    let realized = flotilla_shared::report::realized(record);
    if realized.instance_seconds > 0 {
        return (realized.usd, false);
    }
    (record.plan.as_ref().and_then(|p| p.estimate.as_ref()).map(|e| e.total_usd), true)
}

pub fn print_table(listing: &Listing, now: DateTime<Utc>) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["ID", "NAME", "STATE", "AGE", "SHARDS", "COST"]);
    for Row { record } in &listing.rows {
        let (done, failed, total) = shard_counts(record);
        let shards = if failed > 0 { format!("{done}/{total} ({failed} failed)") } else { format!("{done}/{total}") };
        let (usd, estimated) = cost(record);
        let usd = usd.map_or("-".to_string(), |u| format!("{}${u:.2}", if estimated { "~" } else { "" }));
        let name = record.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_else(|| "-".into());
        table.add_row([
            record.job_id.clone(),
            name,
            record.state.to_string(),
            age(record.submitted_at, now),
            shards,
            usd,
        ]);
    }
    println!("{table}");
    if listing.rows.is_empty() {
        println!("no jobs found ({} index entries read)", listing.scanned);
    } else if listing.more {
        println!("(newest {} shown; --limit N for more)", listing.rows.len());
    }
}

pub fn listing_json(listing: &Listing, bucket: &str, now: DateTime<Utc>) -> Value {
    let jobs: Vec<Value> = listing
        .rows
        .iter()
        .map(|Row { record }| flotilla_shared::events::job_detail(record, None, bucket, now))
        .collect();
    json!({"jobs": jobs, "more": listing.more, "indexEntriesRead": listing.scanned})
}

/// A job as `status --output json` prints it: the job event's detail,
/// each shard's, and the timeline.
pub fn job_json(record: &JobRecord, bucket: &str, now: DateTime<Utc>) -> Value {
    let shards: Vec<Value> = record.shards.iter().map(|s| flotilla_shared::events::shard_detail(record, s)).collect();
    let timeline: Vec<Value> =
        record.timeline.iter().map(|t| json!({"status": t.state, "at": t.at.timestamp_millis()})).collect();
    json!({
        "job": flotilla_shared::events::job_detail(record, None, bucket, now),
        "shards": shards,
        "timeline": timeline,
        "warnings": record.warnings,
    })
}
