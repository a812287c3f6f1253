//! `flotilla`: submit, plan, follow and cancel jobs.
//!
//! Reads `.flotilla/local.env` (written by `make local-up`) when present, else
//! the normal AWS environment plus FLOTILLA_BUCKET and FLOTILLA_JOBS_QUEUE_URL.

// No function over 80 lines of code (clippy.toml); `make lint` denies warnings.
#![warn(clippy::too_many_lines)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use flotilla_shared::aws::s3::S3Ledger;
use flotilla_shared::ports::{Listing, Objects, Records};
use flotilla_shared::reconcile::decide::output_name;
use flotilla_shared::record::{JobRecord, JobState};
use flotilla_shared::{aws, plan, report, spec};

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Run batch jobs on short-lived EC2 fleets")]
struct Cli {
    /// Environment file to load before the AWS environment.
    #[arg(long, global = true, default_value = ".flotilla/local.env")]
    env_file: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a job spec and send it to the jobs queue; prints the job id.
    Submit { spec: PathBuf },
    /// Show sizing, cost and what would be launched. Creates nothing.
    Plan {
        spec: PathBuf,
        /// A price table (JSON, shaped like shared/prices.json) whose entries replace the built-in ones.
        #[arg(long)]
        prices: Option<PathBuf>,
    },
    /// Show a job's phase timeline, reason and last output lines.
    Status {
        job_id: String,
        /// Output lines per instance and phase.
        #[arg(long, default_value_t = 50)]
        lines: usize,
    },
    /// Follow a job to a terminal state; exits 0 only if it SUCCEEDED.
    Watch {
        job_id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Ask a job to stop: running commands are cancelled, volumes unmounted
    /// and snapshotted per policy, the fleet terminated
    ///
    /// Every instance is terminated by the cancel's arrival plus the cleanup
    /// grace (CleanupGraceMinutes, default 15 min). A cancel for a job intake
    /// has not read yet is kept for 15 days: if the job arrives, it ends
    /// CANCELLED and launches nothing.
    Cancel { job_id: String },
    /// List the dead-letter queues: each message's job, how often it was
    /// tried, and why its job's last pass stopped.
    Dlq,
    /// Send dead-lettered messages back to the queue they came from, after a fix.
    Redrive {
        /// jobs, reconcile or notify
        #[arg(long, default_value = "reconcile")]
        queue: String,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("flotilla: {err:#}");
            std::process::exit(2);
        }
    }
}

async fn run(cli: Cli) -> Result<i32> {
    load_env_file(&cli.env_file)?;
    match cli.command {
        Command::Plan { spec, prices } => plan_command(&spec, prices.as_ref()).await,
        Command::Submit { spec } => submit(&spec).await,
        Command::Status { job_id, lines } => {
            let record = load(&job_id).await?;
            let ledger = ledger().await?;
            print!("{}", report::render_with_tail(&record, &tails(&ledger, &record).await, lines));
            Ok(0)
        }
        Command::Watch { job_id, timeout } => watch(&job_id, timeout).await,
        Command::Cancel { job_id } => {
            send_to_jobs_queue(&serde_json::json!({ "cancel": job_id }).to_string()).await?;
            // Only to tell the user: the cancel is sent whatever this finds.
            let known = match ledger().await {
                Ok(ledger) => ledger.load(&job_id).await.ok().map(|found| found.map(|v| v.record.state)),
                Err(_) => None,
            };
            match known {
                None => println!("cancel requested for {job_id}"),
                Some(Some(state)) => println!("cancel requested for {job_id} (now {state})"),
                Some(None) => println!(
                    "cancel requested for {job_id}: the job is not known yet; the cancel is kept for {} days, \
                     and if the job arrives it ends CANCELLED without launching anything",
                    flotilla_shared::intake::CANCEL_WINDOW_DAYS
                ),
            }
            Ok(0)
        }
        Command::Dlq => list_dead_letters().await,
        Command::Redrive { queue } => redrive(&queue).await,
    }
}

/// The queues with a DLQ: jobs (intake), reconcile, notify (events out).
const QUEUES: [&str; 3] = ["jobs", "reconcile", "notify"];

/// The DLQ of `queue`, from FLOTILLA_<QUEUE>_DLQ_URL.
async fn dead_letter_queue(queue: &str) -> Result<aws::sqs::SqsDeadLetters> {
    let prefix = match queue {
        "jobs" => "FLOTILLA_JOBS",
        "reconcile" => "FLOTILLA_RECONCILE",
        "notify" => "FLOTILLA_NOTIFY",
        other => bail!("unknown queue `{other}`: expected one of {}", QUEUES.join(", ")),
    };
    let var = |name: String| {
        std::env::var(&name).with_context(|| format!("{name} is not set (run `make local-up` or export it)"))
    };
    let config = aws::load_config().await;
    Ok(aws::sqs::SqsDeadLetters {
        sqs: aws_sdk_sqs::Client::new(&config),
        dlq_url: var(format!("{prefix}_DLQ_URL"))?,
        source_url: var(format!("{prefix}_QUEUE_URL"))?,
    })
}

async fn list_dead_letters() -> Result<i32> {
    use flotilla_shared::ports::DeadLetters;
    let ledger = ledger().await?;
    let mut total = 0;
    for queue in QUEUES {
        let dlq = dead_letter_queue(queue).await?;
        let letters = dlq.receive(100).await.map_err(|e| anyhow::anyhow!("reading the {queue} DLQ: {e}"))?;
        println!("{queue} DLQ: {} message(s)", letters.len());
        for letter in &letters {
            let body: serde_json::Value = serde_json::from_str(&letter.body).unwrap_or(serde_json::Value::Null);
            let job_id =
                body.get("job_id").or_else(|| body.get("id")).or_else(|| body.get("cancel")).and_then(|v| v.as_str());
            let sent = letter.sent_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "?".into());
            let why = match job_id {
                Some(id) => match ledger.load(id).await {
                    Ok(Some(loaded)) => loaded
                        .record
                        .stalled
                        .map(|s| format!("its last pass stopped on: {s}"))
                        .unwrap_or_else(|| format!("job is {} ({})", loaded.record.state, loaded.record.reason)),
                    Ok(None) => "no record for this job".to_string(),
                    Err(err) => format!("record unreadable: {err}"),
                },
                None => "names no job".to_string(),
            };
            let start: String = letter.body.chars().take(120).collect();
            dlq.release(letter).await.map_err(|e| anyhow::anyhow!("releasing a {queue} DLQ message: {e}"))?;
            println!(
                "  job {}: tried {} times, first sent {sent}; {why}\n    {start}",
                job_id.unwrap_or("?"),
                letter.receive_count
            );
        }
        total += letters.len();
    }
    let _ = total;
    Ok(0)
}

async fn redrive(queue: &str) -> Result<i32> {
    use flotilla_shared::ports::DeadLetters;
    let dlq = dead_letter_queue(queue).await?;
    let letters = dlq.receive(1000).await.map_err(|e| anyhow::anyhow!("reading the {queue} DLQ: {e}"))?;
    for letter in &letters {
        dlq.redrive(letter).await.map_err(|e| anyhow::anyhow!("redriving: {e}"))?;
    }
    println!("{} message(s) sent back to the {queue} queue", letters.len());
    Ok(0)
}

/// KEY=VALUE lines (an optional `export ` prefix is allowed); variables already
/// set in the environment win.
fn load_env_file(path: &PathBuf) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if std::env::var_os(key).is_none() {
                // Single-threaded here: no other thread reads the environment yet.
                unsafe { std::env::set_var(key, value.trim_matches('"')) };
            }
        }
    }
    Ok(())
}

fn read_spec(path: &PathBuf) -> Result<(String, spec::JobSpec)> {
    let body = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let parsed = spec::parse(&body).and_then(|s| spec::validate(&s).map(|_| s));
    match parsed {
        Ok(job) => Ok((body, job)),
        Err(err) => bail!("{}: rejected: {err}", path.display()),
    }
}

fn market(market: spec::Market) -> &'static str {
    match market {
        spec::Market::OnDemand => "on-demand",
        spec::Market::Spot => "spot",
    }
}

/// The price table, and where it came from.
fn load_prices(prices_path: Option<&PathBuf>) -> Result<(plan::Prices, String)> {
    Ok(match prices_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let prices = plan::Prices::with_override(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            (prices, format!("{} over the built-in table", p.display()))
        }
        None => {
            (plan::Prices::builtin(), "the built-in table (shared/prices.json; override with --prices)".to_string())
        }
    })
}

/// What `flotilla plan` prints: the fleet, its items, cost and budget.
fn print_plan(job: &spec::JobSpec, plan: &plan::Plan, prices_from: &str) {
    println!("fleet:     {} x {} ({})", plan.instance_count, plan.instance_type, market(plan.market));
    println!("sizing:    {}", plan.sizing);
    if let Some(items) = plan.items {
        let (most, least) = (items.div_ceil(u64::from(plan.instance_count)), items / u64::from(plan.instance_count));
        let source = match &job.work {
            Some(spec::WorkSpec::S3Prefix(uri)) => {
                format!(" (the objects under {uri}); {least}-{most} per shard, one manifest each")
            }
            Some(spec::WorkSpec::List(_)) => format!(" (work.list); {least}-{most} per shard, one manifest each"),
            None => format!("; {least}-{most} per shard, as FLOTILLA_ITEM_START..FLOTILLA_ITEM_END"),
        };
        println!("items:     {items}{source}");
    }
    println!("image:     {}", job.image.as_deref().unwrap_or("from launch template"));
    match &plan.estimate {
        Some(e) => {
            println!(
                "estimate:  ${:.2} for {:.2} instance-hours ({} x {:.1} min): instances ${:.2}, volumes ${:.2}, snapshots ${:.2} (a month, at full size)",
                e.total_usd,
                e.instance_hours,
                plan.instance_count,
                e.hours_per_instance * 60.0,
                e.instances_usd,
                e.volumes_usd,
                e.snapshots_usd
            );
            println!(
                "at most:   ${:.2} (every instance and volume for the whole {} min deadline)",
                e.max_usd, job.deadline_minutes
            );
        }
        None => println!("estimate:  no price for {} in the price table", plan.instance_type),
    }
    if let Some(budget) = job.budget_usd {
        println!("budget:    ${budget:.2}: the estimate fits");
    }
    println!("prices:    {prices_from}");
    print_volumes_and_steps(job);
}

/// The volumes, the steps and how instances launch.
fn print_volumes_and_steps(job: &spec::JobSpec) {
    for volume in &job.volumes {
        let source = match &volume.source {
            spec::VolumeSource::New { size_gib, volume_type } => {
                format!("new {size_gib} GiB {volume_type} per instance")
            }
            spec::VolumeSource::SnapshotId(id) => format!("from {id} per instance"),
            spec::VolumeSource::VolumeId(id) => format!("existing {id} on shard 0"),
        };
        let snapshot = match volume.snapshot {
            spec::SnapshotPolicy::Never => "never snapshotted".to_string(),
            spec::SnapshotPolicy::OnSuccess => format!("snapshot on success, keep {}", volume.retention.keep_last),
            spec::SnapshotPolicy::Always => format!("snapshot always, keep {}", volume.retention.keep_last),
        };
        println!("volume:    {}: {source}, {} at {}, {snapshot}", volume.name, volume.device, volume.mount_point);
    }
    let steps: Vec<&str> =
        [job.setup.as_ref().map(|_| "setup"), Some("run"), job.before_unmount.as_ref().map(|_| "before_unmount")]
            .into_iter()
            .flatten()
            .collect();
    println!("steps:     {}", steps.join(" -> "));
    println!("launches:  IMDSv2 required, encrypted EBS, no key pair; tagged flotilla:managed-by, flotilla:job-id, flotilla:expires-at");
}

async fn plan_command(path: &PathBuf, prices_path: Option<&PathBuf>) -> Result<i32> {
    let (_, job) = read_spec(path)?;
    let (prices, prices_from) = load_prices(prices_path)?;
    // An S3 prefix is listed now, as intake will list it.
    let items = match &job.work {
        Some(spec::WorkSpec::S3Prefix(uri)) => {
            let config = aws::load_config().await;
            let lister = aws::s3::S3Ledger::new(aws::s3_client(&config), String::new());
            let bucket_and_prefix = spec::split_s3_uri(uri).context("work.s3_prefix")?;
            match lister.list_keys(bucket_and_prefix.0, bucket_and_prefix.1, spec::MAX_WORK_ITEMS as usize).await {
                Ok(Some(keys)) => Some(keys.iter().filter(|k| !k.ends_with('/')).count() as u64),
                Ok(None) => {
                    println!("rejected: work.s3_prefix: {uri} holds more than {} objects", spec::MAX_WORK_ITEMS);
                    return Ok(1);
                }
                Err(e) => bail!("listing {uri}: {e}"),
            }
        }
        _ => plan::given_items(&job),
    };
    let plan = match plan::plan_for(&job, items, &prices) {
        Ok(plan) => plan,
        Err(err) => {
            println!("rejected: {err}");
            return Ok(1);
        }
    };
    print_plan(&job, &plan, &prices_from);
    println!("nothing was created");
    Ok(0)
}

async fn submit(path: &PathBuf) -> Result<i32> {
    let (body, job) = read_spec(path)?;
    // Intake decides with the deployment's prices and the listed items; this
    // catches what the spec alone gets wrong before anything is sent.
    if !matches!(job.work, Some(spec::WorkSpec::S3Prefix(_))) {
        plan::plan(&job, &plan::Prices::builtin()).map_err(|e| anyhow::anyhow!("rejected: {e}"))?;
    }
    // Give the job an id here so the user can follow it.
    let (job_id, body) = match &job.id {
        Some(id) => (id.clone(), body),
        None => {
            let id = format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            let mut value: serde_json::Value = serde_json::from_str(&body)?;
            value["id"] = serde_json::Value::String(id.clone());
            (id, value.to_string())
        }
    };
    send_to_jobs_queue(&body).await?;
    println!("{job_id}");
    Ok(0)
}

async fn send_to_jobs_queue(body: &str) -> Result<()> {
    let queue_url = std::env::var("FLOTILLA_JOBS_QUEUE_URL")
        .context("FLOTILLA_JOBS_QUEUE_URL is not set (run `make local-up` or export it)")?;
    let config = aws::load_config().await;
    aws_sdk_sqs::Client::new(&config)
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("sending to the jobs queue: {}", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
    Ok(())
}

async fn ledger() -> Result<aws::s3::S3Ledger> {
    let bucket =
        std::env::var("FLOTILLA_BUCKET").context("FLOTILLA_BUCKET is not set (run `make local-up` or export it)")?;
    let config = aws::load_config().await;
    Ok(aws::s3::S3Ledger::new(aws::s3_client(&config), bucket))
}

async fn load(job_id: &str) -> Result<JobRecord> {
    let ledger = ledger().await?;
    match ledger.load(job_id).await? {
        Some(versioned) => Ok(versioned.record),
        None => bail!("no job {job_id} (not submitted yet, or intake has not read it)"),
    }
}

/// The output tails of the shards the report shows, from beside the record.
async fn tails(ledger: &S3Ledger, record: &JobRecord) -> report::Tails {
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

const ORDER: [JobState; 7] = [
    JobState::Submitted,
    JobState::Launching,
    JobState::WaitingReady,
    JobState::Running,
    JobState::Snapshotting,
    JobState::TearingDown,
    JobState::Succeeded,
];

fn progress_bar(record: &JobRecord) -> String {
    let reached = ORDER.iter().position(|s| *s == record.state).unwrap_or(ORDER.len() - 1)
        + usize::from(record.state.is_terminal());
    let done = reached.min(ORDER.len());
    format!("[{}{}]", "#".repeat(done), ".".repeat(ORDER.len() - done))
}

async fn watch(job_id: &str, timeout: u64) -> Result<i32> {
    let ledger = ledger().await?;
    let started = std::time::Instant::now();
    let mut last = String::new();
    loop {
        if let Some(versioned) = ledger.load(job_id).await? {
            let record = versioned.record;
            let line = format!("{} {:<13} {}", progress_bar(&record), record.state.as_str(), record.reason);
            if line != last {
                println!("{} {line}", chrono::Utc::now().format("%H:%M:%S"));
                std::io::stdout().flush().ok();
                last = line;
            }
            if record.state.is_terminal() {
                println!();
                print!(
                    "{}",
                    report::render_with_tail(&record, &tails(&ledger, &record).await, report::REPORT_TAIL_LINES)
                );
                return Ok(if record.state == JobState::Succeeded { 0 } else { 1 });
            }
        } else if last.is_empty() {
            println!("waiting for intake to record {job_id}...");
            last = "waiting".to_string();
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            bail!("{job_id} not finished after {timeout} s");
        }
        // A person is watching: the CLI polls. Lambda code never sleeps.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}
