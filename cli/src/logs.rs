//! `flotilla logs`: a step's whole output. SSM writes each invocation's
//! stdout and stderr to the jobs bucket (`OutputS3KeyPrefix`
//! `outputs/<job>/<phase>/`, then `<command id>/<instance id>/...`) when the
//! step ends; the job record names each attempt's instance. The reconciler
//! also keeps the end of each step's output beside the record
//! (`jobs/<id>/output/...`, what GetCommandInvocation returns: at most
//! 24,000 characters), the fallback once the full copy has expired.

use std::time::Duration;

use anyhow::Result;

use flotilla_shared::aws::s3::S3Ledger;
use flotilla_shared::ports::Objects;
use flotilla_shared::record::{output_name, JobRecord, Phase};
use flotilla_shared::report;

use crate::output::Failure;

/// Which steps to show.
pub struct Selection {
    pub shard: Option<u32>,
    pub phase: Option<String>,
}

/// One step of one attempt: where its output is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Step {
    pub shard: u32,
    pub attempt: u32,
    pub phase: Phase,
    pub instance_id: Option<String>,
    /// Ended (its output is final).
    pub ended: bool,
}

/// The steps `selection` names that have run or are running, in order.
pub fn steps(record: &JobRecord, selection: &Selection) -> Vec<Step> {
    let mut steps = Vec::new();
    for shard in record.shards.iter().filter(|s| selection.shard.is_none_or(|n| n == s.index)) {
        for attempt in &shard.attempts {
            for phase in attempt.phases_ran() {
                if selection.phase.as_deref().is_some_and(|p| p != phase.as_str()) {
                    continue;
                }
                let running =
                    attempt.phases.iter().any(|p| p.phase == phase && p.exit_code.is_none()) && attempt.end.is_none();
                steps.push(Step {
                    shard: shard.index,
                    attempt: attempt.number,
                    phase,
                    instance_id: attempt.instance_id.clone(),
                    ended: !running,
                });
            }
        }
    }
    steps
}

/// A step's whole output: SSM's copy (stdout, then stderr), else the end
/// the reconciler kept. None while neither exists yet.
pub async fn output(s3: &aws_sdk_s3::Client, ledger: &S3Ledger, job_id: &str, step: &Step) -> Result<Option<String>> {
    if let Some(instance) = &step.instance_id {
        let prefix = format!("outputs/{job_id}/{}/", step.phase.as_str());
        let pages = s3
            .list_objects_v2()
            .bucket(ledger.bucket())
            .prefix(&prefix)
            .into_paginator()
            .send()
            .collect::<Result<Vec<_>, _>>()
            .await
            .map_err(|e| anyhow::anyhow!("listing {prefix}: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
        let listed: Vec<&aws_sdk_s3::types::Object> = pages.iter().flat_map(|p| p.contents()).collect();
        let mut keys: Vec<(Option<aws_sdk_s3::primitives::DateTime>, String)> = listed
            .iter()
            .filter_map(|o| Some((o.last_modified().cloned(), o.key()?.to_string())))
            .filter(|(_, k)| k.contains(&format!("/{instance}/")))
            .collect();
        // Oldest first; stdout before stderr of one invocation.
        keys.sort_by_key(|(at, key)| (at.map(|t| t.secs()), key.ends_with("stderr"), key.clone()));
        if !keys.is_empty() {
            let mut text = String::new();
            for (_, key) in &keys {
                if let Some(body) = ledger.get(key).await? {
                    text.push_str(&String::from_utf8_lossy(&body));
                }
            }
            return Ok(Some(text));
        }
    }
    let kept = ledger.get(&format!("jobs/{job_id}/{}", output_name(step.shard, step.attempt, step.phase))).await?;
    Ok(kept.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn header(step: &Step) -> String {
    format!(
        "==> shard {} attempt {} {} ({}) <==",
        step.shard,
        step.attempt,
        step.phase.as_str(),
        step.instance_id.as_deref().unwrap_or("no instance")
    )
}

/// Print every selected step's output; with `follow`, keep printing each
/// step as it ends until the job does.
pub async fn logs(
    s3: &aws_sdk_s3::Client,
    ledger: &S3Ledger,
    job_id: &str,
    selection: &Selection,
    follow: bool,
    timeout: u64,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut printed = std::collections::BTreeSet::new();
    loop {
        let record = match crate::jobs::load(ledger, job_id).await {
            Ok(record) => Some(record),
            // Followed from its submission: intake may not have read it yet.
            Err(err) if follow && matches!(err.downcast_ref::<Failure>(), Some(Failure::NoSuchJob(_))) => None,
            Err(err) => return Err(err),
        };
        let Some(record) = record else {
            if started.elapsed() > Duration::from_secs(timeout) {
                return Err(Failure::NoSuchJob(job_id.to_string()).into());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        };
        for step in steps(&record, selection) {
            if printed.contains(&(step.shard, step.attempt, step.phase)) {
                continue;
            }
            if !step.ended && follow {
                continue;
            }
            match output(s3, ledger, job_id, &step).await? {
                Some(text) => {
                    println!("{}", header(&step));
                    print!("{text}");
                    if !text.ends_with('\n') && !text.is_empty() {
                        println!();
                    }
                    if step.ended {
                        printed.insert((step.shard, step.attempt, step.phase));
                    }
                }
                None if !follow => println!("{}\n(no output yet)", header(&step)),
                None => {}
            }
        }
        if !follow || record.state.is_terminal() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            return Err(Failure::TimedOut(format!("{job_id} not finished after {timeout} s")).into());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The kept end of each shown shard's steps, for the text report.
pub async fn tails(ledger: &S3Ledger, record: &JobRecord) -> report::Tails {
    let mut tails = report::Tails::new();
    for shard in record.shards.iter().take(report::MAX_SHARDS_SHOWN) {
        for attempt in &shard.attempts {
            for phase in attempt.phases_ran() {
                let key = format!("jobs/{}/{}", record.job_id, output_name(shard.index, attempt.number, phase));
                if let Ok(Some(body)) = ledger.get(&key).await {
                    let lines = String::from_utf8_lossy(&body).lines().map(str::to_string).collect();
                    tails.insert((shard.index, attempt.number, phase.as_str().to_string()), lines);
                }
            }
        }
    }
    tails
}
