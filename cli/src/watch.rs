//! `flotilla watch`: a job followed to its end, shard by shard. On a
//! terminal, a progress bar of shards done with the counts beside it; in a
//! pipe or a log, one plain line each time a count changes. The ETA comes
//! from the plan's sizing (its billed hours per instance).

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};

use flotilla_shared::aws::s3::S3Ledger;
use flotilla_shared::ports::Records;
use flotilla_shared::record::{JobRecord, JobState, Stage};
use flotilla_shared::report;

use crate::output::Failure;

/// Shards by where they are.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Progress {
    pub booting: usize,
    pub running: usize,
    pub finishing: usize,
    pub done: usize,
    pub failed: usize,
}

impl Progress {
    pub fn of(record: &JobRecord) -> Self {
        let mut p = Progress::default();
        for shard in &record.shards {
            match (&shard.result, shard.current().map(|a| a.stage)) {
                (Some(r), _) if r.succeeded => p.done += 1,
                (Some(_), _) => p.failed += 1,
                (None, Some(Stage::Working)) => p.running += 1,
                (None, Some(Stage::Releasing | Stage::Done)) => p.finishing += 1,
                (None, _) => p.booting += 1,
            }
        }
        p
    }

    fn words(&self) -> String {
        format!(
            "{} booting, {} running, {} finishing, {} done, {} failed",
            self.booting, self.running, self.finishing, self.done, self.failed
        )
    }
}

/// When the plan expects the job to end: its submission plus each
/// instance's billed hours (start-up, work and teardown).
pub fn eta(record: &JobRecord) -> Option<DateTime<Utc>> {
    let hours = record.plan.as_ref()?.estimate.as_ref()?.hours_per_instance;
    Some(record.submitted_at + chrono::Duration::seconds((hours * 3600.0) as i64))
}

fn line(record: &JobRecord, progress: &Progress) -> String {
    let eta =
        eta(record).filter(|_| !record.state.is_terminal()).map(|t| format!("; ETA {}", t.format("%H:%M:%S UTC")));
    format!("{:<13} {}{}", record.state.as_str(), progress.words(), eta.unwrap_or_default())
}

pub async fn watch(ledger: &S3Ledger, job_id: &str, timeout: u64) -> Result<()> {
    let started = std::time::Instant::now();
    let terminal = std::io::stdout().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last = String::new();
    loop {
        if let Some(versioned) = ledger.load(job_id).await? {
            let record = versioned.record;
            let progress = Progress::of(&record);
            let text = line(&record, &progress);
            if terminal {
                let bar = bar.get_or_insert_with(|| new_bar(record.shards.len() as u64));
                bar.set_position((progress.done + progress.failed) as u64);
                bar.set_message(text.clone());
            } else if text != last {
                println!("{} {text}", Utc::now().format("%H:%M:%S"));
            }
            last = text;
            if record.state.is_terminal() {
                if let Some(bar) = bar.take() {
                    bar.finish();
                }
                println!();
                let tails = crate::logs::tails(ledger, &record).await;
                print!("{}", report::render_with_tail(&record, &tails, report::REPORT_TAIL_LINES));
                if record.state == JobState::Succeeded {
                    return Ok(());
                }
                return Err(Failure::NotSucceeded(format!("job {job_id} ended {}", record.state)).into());
            }
        } else if last.is_empty() {
            println!("waiting for intake to record {job_id}...");
            last = "waiting".to_string();
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            return Err(Failure::TimedOut(format!("{job_id} not finished after {timeout} s")).into());
        }
        // A person is watching: the CLI polls. Lambda code never sleeps.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

fn new_bar(shards: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(shards);
    let style = indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} shards ended  {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>.");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}
