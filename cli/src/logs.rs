//! `flotilla logs`: a step's whole output. SSM writes each invocation's
//! stdout and stderr to the jobs bucket (`OutputS3KeyPrefix`
//! `outputs/<job>/<phase>/`, then `<command id>/<instance id>/...`) only
//! when the step ends; the job record names each attempt's instance. The
//! reconciler also keeps the end of each step's output beside the record
//! (`jobs/<id>/output/...`, what GetCommandInvocation returns: at most
//! 24,000 characters), the fallback once the full copy has expired.
//!
//! `--follow` shows a running step as it writes: the reconciler sends every
//! step with CloudWatchOutputConfig, so the agent streams its stdout to the
//! stack's step log group (`<command id>/<instance id>/aws-runShellScript/
//! stdout`), read here with GetLogEvents; once the step ends, the rest of
//! the whole output comes from the bucket.

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
    /// Its SSM command, once sent.
    pub command_id: Option<String>,
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
                let run = attempt.phases.iter().find(|p| p.phase == phase);
                let running = run.is_some_and(|p| p.exit_code.is_none()) && attempt.end.is_none();
                steps.push(Step {
                    shard: shard.index,
                    attempt: attempt.number,
                    phase,
                    instance_id: attempt.instance_id.clone(),
                    command_id: run.and_then(|p| record.commands.get(&p.batch)).and_then(|b| b.command_id.clone()),
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

/// Where running steps stream their stdout (CloudWatchOutputConfig).
pub struct Live {
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub group: String,
}

/// What of a running step was printed from its stream.
#[derive(Default)]
struct Tail {
    token: Option<String>,
    lines: usize,
    header: bool,
}

impl Live {
    pub fn new(config: &aws_config::SdkConfig, group: &str) -> Live {
        Live { logs: aws_sdk_cloudwatchlogs::Client::new(config), group: group.to_string() }
    }

    /// The stream's lines after `token`; none while the agent has not
    /// created the stream yet.
    pub async fn next_lines(&self, step: &Step, token: &mut Option<String>) -> Result<Vec<String>> {
        let (Some(command), Some(instance)) = (&step.command_id, &step.instance_id) else { return Ok(vec![]) };
        let stream = format!("{command}/{instance}/aws-runShellScript/stdout");
        let mut lines = Vec::new();
        loop {
            let page = self
                .logs
                .get_log_events()
                .log_group_name(&self.group)
                .log_stream_name(&stream)
                .start_from_head(true)
                .set_next_token(token.clone())
                .send()
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                    return Ok(lines)
                }
                Err(e) => {
                    let e = aws_sdk_cloudwatchlogs::error::DisplayErrorContext(e);
                    anyhow::bail!("reading {stream} in {}: {e}", self.group)
                }
            };
            lines.extend(page.events().iter().filter_map(|e| e.message()).flat_map(|m| m.lines().map(str::to_string)));
            // At the stream's end GetLogEvents hands back the token it was given.
            let next = page.next_forward_token().map(str::to_string);
            if next == *token || page.events().is_empty() {
                *token = next;
                return Ok(lines);
            }
            *token = next;
        }
    }
}

/// `text` without the first `skip` non-empty lines: those were printed live.
pub fn after_printed(text: &str, skip: usize) -> String {
    let mut seen = 0;
    let mut rest = String::new();
    for line in text.lines() {
        if seen < skip {
            seen += usize::from(!line.is_empty());
            continue;
        }
        rest.push_str(line);
        rest.push('\n');
    }
    rest
}

/// Print every selected step's output; with `follow`, keep printing until
/// the job ends: a running step line by line from its stream (when the
/// deployment has a step log group), the rest of each as it ends.
pub async fn logs(
    s3: &aws_sdk_s3::Client,
    ledger: &S3Ledger,
    job_id: &str,
    selection: &Selection,
    follow: Option<&Live>,
    timeout: u64,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut printed = std::collections::BTreeSet::new();
    let mut tails: std::collections::BTreeMap<(u32, u32, Phase), Tail> = std::collections::BTreeMap::new();
    let following = follow.is_some();
    loop {
        let record = match crate::jobs::load(ledger, job_id).await {
            Ok(record) => Some(record),
            // Followed from its submission: intake may not have read it yet.
            Err(err) if following && matches!(err.downcast_ref::<Failure>(), Some(Failure::NoSuchJob(_))) => None,
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
            let key = (step.shard, step.attempt, step.phase);
            if printed.contains(&key) {
                continue;
            }
            if !step.ended && following {
                if let Some(live) = follow.filter(|live| !live.group.is_empty()) {
                    let tail = tails.entry(key).or_default();
                    let lines = live.next_lines(&step, &mut tail.token).await?;
                    if !lines.is_empty() && !tail.header {
                        println!("{}", header(&step));
                        tail.header = true;
                    }
                    for line in lines {
                        tail.lines += usize::from(!line.is_empty());
                        println!("{line}");
                    }
                }
                continue;
            }
            match output(s3, ledger, job_id, &step).await? {
                Some(text) => {
                    let tail = tails.remove(&key).unwrap_or_default();
                    if !tail.header {
                        println!("{}", header(&step));
                    }
                    let text = after_printed(&text, tail.lines);
                    print!("{text}");
                    if step.ended {
                        printed.insert(key);
                    }
                }
                None if !following => println!("{}\n(no output yet)", header(&step)),
                None => {}
            }
        }
        if !following || record.state.is_terminal() {
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
