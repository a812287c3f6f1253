//! `flotilla`: submit, plan, list, follow, explain and cancel jobs.
//!
//! Finds its deployment from a stack's outputs (`--stack`), the local
//! stack's `.flotilla/local.env`, a config file or the environment
//! (`deployment`). Exit codes: `output::Failure`, docs/cli.md.

// No function over 80 lines of code (clippy.toml); `make lint` denies warnings.
#![warn(clippy::too_many_lines)]

pub mod deployment;
mod dlq;
pub mod jobs;
pub mod logs;
pub mod output;
pub mod plan_view;
pub mod release;
mod spot_prices;
pub mod watch;

use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use deployment::Deployment;
use flotilla_shared::record::JobState;
use output::{print_json, Format};

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Run batch jobs on short-lived EC2 fleets")]
pub struct Cli {
    /// Read the deployment from this CloudFormation stack's outputs.
    #[arg(long, global = true, env = "FLOTILLA_STACK_NAME")]
    stack: Option<String>,
    /// Environment file to load when no stack is named.
    #[arg(long, global = true, default_value = ".flotilla/local.env")]
    env_file: PathBuf,
    /// text for a person, json for a program (schemas in docs/cli.md).
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Format,
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
        /// A price table (JSON, shaped like shared/prices.json) whose entries replace the
        /// deployment's, to see what-if figures; budget_usd is still judged as intake judges it.
        #[arg(long)]
        prices: Option<PathBuf>,
        /// Price spot from the Region's last 24 h of DescribeSpotPriceHistory (the dearest
        /// Availability Zone) instead of a fixed fraction of on-demand.
        #[arg(long)]
        spot_history: bool,
    },
    /// List jobs, newest first: id, name, state, age, shards, cost.
    Ls {
        /// Only jobs in this state (e.g. RUNNING, FAILED).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this name (the spec's `name`).
        #[arg(long)]
        name: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show a job's phase timeline, reason and last output lines.
    Status {
        job_id: String,
        /// Output lines per instance and phase.
        #[arg(long, default_value_t = 50)]
        lines: usize,
    },
    /// Why a job is not running, or why it ended, in plain words.
    Explain { job_id: String },
    /// End a failed shard's debug hold now: the reaper then removes its instance and volumes.
    Release { job_id: String },
    /// A job's step output, whole: every shard and phase, or the ones named.
    Logs {
        job_id: String,
        #[arg(long)]
        shard: Option<u32>,
        /// mount, setup, run, before_unmount or unmount.
        #[arg(long)]
        phase: Option<String>,
        /// Keep printing each step as it ends, until the job does.
        #[arg(long)]
        follow: bool,
        /// With --follow, give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Write a job's HTML report (every shard and attempt, on a timeline) and print its path.
    Report {
        job_id: String,
        /// Where to write it (default: .flotilla/reports/<job id>.html).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Open it in the desktop's browser (xdg-open, or open on macOS).
        #[arg(long)]
        open: bool,
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

/// Parse the arguments, run, and exit with the code docs/cli.md gives.
pub fn main() {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "flotilla", &mut std::io::stdout());
        return;
    }
    let code = match deployment::choose(cli.stack.as_deref(), &cli.env_file).and_then(|choice| {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(async {
            let deployment = Deployment::find(&choice).await?;
            run(&deployment, cli.command, cli.output).await
        })
    }) {
        Ok(()) => 0,
        // A refusal or an outcome is the answer: stdout. Anything else: stderr.
        Err(err) if matches!(err.downcast_ref(), Some(output::Failure::NotSucceeded(_))) => {
            println!("{err}");
            output::exit_code(&err)
        }
        Err(err) => {
            eprintln!("flotilla: {err:#}");
            output::exit_code(&err)
        }
    };
    std::process::exit(code);
}

async fn run(deployment: &Deployment, command: Command, format: Format) -> Result<()> {
    let now = chrono::Utc::now();
    match command {
        Command::Plan { spec, prices, spot_history } => {
            let options = plan_view::PlanOptions { prices: prices.as_ref(), spot_history };
            plan_view::plan_command(deployment, &spec, options, format).await
        }
        Command::Submit { spec } => plan_view::submit(deployment, &spec).await,
        Command::Ls { state, name, limit } => {
            let state = state.map(|s| parse_state(&s)).transpose()?;
            let filter = jobs::Filter { state, name, limit };
            let bucket = deployment.bucket()?;
            let listing = jobs::list(&deployment.s3(), &deployment.ledger()?, bucket, &filter).await?;
            match format {
                Format::Text => jobs::print_table(&listing, now),
                Format::Json => print_json("jobs", jobs::listing_json(&listing, bucket, now)),
            }
            Ok(())
        }
        Command::Status { job_id, lines } => {
            let ledger = deployment.ledger()?;
            let record = jobs::load(&ledger, &job_id).await?;
            match format {
                Format::Text => {
                    let tails = logs::tails(&ledger, &record).await;
                    print!("{}", flotilla_shared::report::render_with_tail(&record, &tails, lines));
                }
                Format::Json => print_json("job", jobs::job_json(&record, deployment.bucket()?, now)),
            }
            Ok(())
        }
        Command::Explain { job_id } => {
            let record = jobs::load(&deployment.ledger()?, &job_id).await?;
            let explanation = flotilla_shared::explain::explain(&record, now);
            match format {
                Format::Text => print!("{}", explain_text(&explanation)),
                Format::Json => print_json("explain", serde_json::to_value(&explanation)?),
            }
            Ok(())
        }
        Command::Release { job_id } => {
            let released = release::release(&deployment.ledger()?, &job_id, now).await?;
            let (hold, said) = match released {
                release::Released::Now(hold) => (hold, "released"),
                release::Released::AlreadyEnded(hold) => (hold, "already ended"),
            };
            match format {
                Format::Text => println!(
                    "{said}: {} of job {job_id} (shard {}); the reaper snapshots its volumes ({}) and removes them and the instance within about 10 minutes",
                    hold.instance_id,
                    hold.shard,
                    hold.volume_ids.join(", ")
                ),
                Format::Json => print_json("release", serde_json::json!({"jobId": job_id, "status": said, "hold": hold})),
            }
            Ok(())
        }
        Command::Logs { job_id, shard, phase, follow, timeout } => {
            let selection = logs::Selection { shard, phase };
            let live =
                follow.then(|| logs::Live::new(&deployment.config, deployment.step_log_group().unwrap_or_default()));
            logs::logs(&deployment.s3(), &deployment.ledger()?, &job_id, &selection, live.as_ref(), timeout).await
        }
        Command::Report { job_id, out, open } => report(deployment, &job_id, out, open, format).await,
        Command::Watch { job_id, timeout } => watch::watch(&deployment.ledger()?, &job_id, timeout).await,
        Command::Cancel { job_id } => cancel(deployment, &job_id).await,
        Command::Dlq => dlq::list_dead_letters(deployment).await,
        Command::Redrive { queue } => dlq::redrive(deployment, &queue).await,
        Command::Completions { .. } => Ok(()),
    }
}

fn parse_state(text: &str) -> Result<JobState> {
    serde_json::from_value(serde_json::Value::String(text.to_ascii_uppercase())).map_err(|_| {
        anyhow::anyhow!(
            "unknown state `{text}`: expected SUBMITTED, LAUNCHING, WAITING_READY, RUNNING, SNAPSHOTTING, \
             TEARING_DOWN, SUCCEEDED, FAILED, CANCELLED or REJECTED"
        )
    })
}

/// `explain` for a person: the summary, what explains it, the trail.
pub fn explain_text(e: &flotilla_shared::explain::Explanation) -> String {
    use std::fmt::Write;
    let mut out = format!("job {}: {}\n", e.job_id, e.summary);
    if !e.findings.is_empty() {
        out.push_str("why:\n");
        for f in &e.findings {
            let shard = f.shard.map(|s| format!("shard {s}: ")).unwrap_or_default();
            let _ = writeln!(out, "  - {shard}{}", f.text);
        }
    }
    out.push_str("trail:\n");
    for line in &e.trail {
        let shard = line.shard.map(|s| format!("shard {s}: ")).unwrap_or_default();
        let _ = writeln!(out, "  {} {shard}{}", line.at.format("%Y-%m-%d %H:%M:%S"), line.text);
    }
    out
}

async fn cancel(deployment: &Deployment, job_id: &str) -> Result<()> {
    plan_view::send_to_jobs_queue(deployment, &serde_json::json!({ "cancel": job_id }).to_string()).await?;
    // Only to tell the user: the cancel is sent whatever this finds.
    let known = match deployment.ledger() {
        Ok(ledger) => {
            use flotilla_shared::ports::Records;
            ledger.load(job_id).await.ok().map(|found| found.map(|v| v.record.state))
        }
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
    Ok(())
}

/// Render the job's page here (what the notify function writes to the
/// bucket when the job ends), so a running job has one too.
async fn report(deployment: &Deployment, job_id: &str, out: Option<PathBuf>, open: bool, format: Format) -> Result<()> {
    use anyhow::Context;
    let ledger = deployment.ledger()?;
    let record = jobs::load(&ledger, job_id).await?;
    let tails = flotilla_shared::report_html::failed_step_tails(&ledger, &record).await;
    let page = flotilla_shared::report_html::render(&record, &tails, chrono::Utc::now());
    let path = out.unwrap_or_else(|| PathBuf::from(".flotilla/reports").join(format!("{job_id}.html")));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    match format {
        Format::Text => println!("{}", path.display()),
        Format::Json => print_json("report", serde_json::json!({"jobId": job_id, "path": path})),
    }
    if open {
        let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
        std::process::Command::new(opener).arg(&path).status().with_context(|| format!("running {opener}"))?;
    }
    Ok(())
}
