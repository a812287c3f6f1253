//! A job's work items: resolved once at intake (an explicit list, or an S3
//! prefix listed then) and written as one manifest per shard. A retried or
//! replaced shard reads the same manifest, so it redoes exactly its own items.

use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::error::StepError;
use crate::plan::shard_range;
use crate::ports::{Listing, Objects};
use crate::spec::{split_s3_uri, JobSpec, WorkSpec, MAX_WORK_ITEMS};

/// Manifests are written this many at a time: 1,000 shards in a few seconds.
const PARALLEL_WRITES: usize = 32;

/// The items `work` names, in order: None when the job has no `work`. An
/// `Err` is the reason to reject the job (a missing bucket, too many keys).
pub async fn resolve(ledger: &dyn Listing, spec: &JobSpec) -> Result<Result<Option<Vec<String>>, String>, StepError> {
    match &spec.work {
        None => Ok(Ok(None)),
        Some(WorkSpec::List(items)) => Ok(Ok(Some(items.clone()))),
        Some(WorkSpec::S3Prefix(uri)) => {
            let Some((bucket, prefix)) = split_s3_uri(uri) else {
                return Ok(Err(format!("work.s3_prefix: expected s3://bucket/prefix, got {uri}")));
            };
            let keys = match ledger.list_keys(bucket, prefix, MAX_WORK_ITEMS as usize).await {
                Ok(Some(keys)) => keys,
                Ok(None) => return Ok(Err(format!("work.s3_prefix: {uri} holds more than {MAX_WORK_ITEMS} objects"))),
                Err(err) if err.is_transient() => return Err(err.into()),
                Err(err) => return Ok(Err(format!("work.s3_prefix: cannot list {uri}: {err}"))),
            };
            // "Folders" the console creates are not work.
            let items: Vec<String> =
                keys.into_iter().filter(|k| !k.ends_with('/')).map(|k| format!("s3://{bucket}/{k}")).collect();
            if items.is_empty() {
                return Ok(Err(format!("work.s3_prefix: {uri} holds no objects")));
            }
            if let Some(bad) = items.iter().find(|k| k.chars().any(char::is_control)) {
                return Ok(Err(format!(
                    "work.s3_prefix: the key {} holds a control character; a manifest holds one item per line",
                    bad.escape_debug()
                )));
            }
            Ok(Ok(Some(items)))
        }
    }
}

/// FNV-1a over the items and the shard count: the manifests' folder, so two
/// intakes of one job that listed different objects, or split them into a
/// different number of shards, never overwrite each other's manifests.
pub fn digest(items: &[String], shards: u32) -> String {
    let mut hash = crate::hash::Fnv64::default();
    hash.write(&shards.to_le_bytes());
    for item in items {
        hash.write(item.as_bytes()).write(b"\n");
    }
    let hash = hash.finish();
    format!("{hash:016x}")
}

/// Shard `index`'s manifest key under `folder`.
pub fn manifest_key(folder: &str, index: u32) -> String {
    format!("{folder}{index}.txt")
}

/// Write one manifest per shard (items balanced to within one) and return
/// their folder as an `s3://` URI. Safe to repeat: the same items give the
/// same folder and the same bodies.
pub async fn write_manifests(
    ledger: &dyn Objects,
    job_id: &str,
    items: &[String],
    shards: u32,
) -> Result<String, StepError> {
    let folder = format!("work/{job_id}/{}/", digest(items, shards));
    let total = items.len() as u64;
    stream::iter(0..shards)
        .map(|index| {
            let range = shard_range(total, index, shards);
            let mut body = String::new();
            for item in &items[range.start as usize..range.end as usize] {
                body.push_str(item);
                body.push('\n');
            }
            let key = manifest_key(&folder, index);
            async move { ledger.put(&key, body.as_bytes(), "text/plain; charset=utf-8").await }
        })
        .buffer_unordered(PARALLEL_WRITES)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(format!("s3://{}/{folder}", ledger.bucket()))
}
