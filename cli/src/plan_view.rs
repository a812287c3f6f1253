//! `flotilla plan` and `submit`: a spec read, sized, priced and checked
//! before anything is sent; nothing is created by `plan`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use flotilla_shared::ports::Listing;
use flotilla_shared::{aws, plan, spec};

use crate::deployment::Deployment;
use crate::output::{print_json, Failure, Format};

pub fn read_spec(path: &Path) -> Result<(String, spec::JobSpec)> {
    let body = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let parsed = spec::parse(&body).and_then(|s| spec::validate(&s).map(|_| s));
    match parsed {
        Ok(job) => Ok((body, job)),
        Err(err) => Err(Failure::NotSucceeded(format!("{}: rejected: {err}", path.display())).into()),
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
pub fn print_plan(job: &spec::JobSpec, plan: &plan::Plan, prices_from: &str) {
    println!("fleet:     {} x {} ({})", plan.instance_count, plan.instance_type, plan.market.as_str());
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

pub async fn plan_command(
    deployment: &Deployment,
    path: &Path,
    prices_path: Option<&PathBuf>,
    format: Format,
) -> Result<()> {
    let (_, job) = read_spec(path)?;
    let (prices, prices_from) = load_prices(prices_path)?;
    // An S3 prefix is listed now, as intake will list it.
    let items = match &job.work {
        Some(spec::WorkSpec::S3Prefix(uri)) => {
            let lister = aws::s3::S3Ledger::new(deployment.s3(), String::new());
            let bucket_and_prefix = spec::split_s3_uri(uri).context("work.s3_prefix")?;
            match lister.list_keys(bucket_and_prefix.0, bucket_and_prefix.1, spec::MAX_WORK_ITEMS as usize).await {
                Ok(Some(keys)) => Some(keys.iter().filter(|k| !k.ends_with('/')).count() as u64),
                Ok(None) => {
                    let reason = format!("work.s3_prefix: {uri} holds more than {} objects", spec::MAX_WORK_ITEMS);
                    return Err(Failure::NotSucceeded(format!("rejected: {reason}")).into());
                }
                Err(e) => bail!("listing {uri}: {e}"),
            }
        }
        _ => plan::given_items(&job),
    };
    let plan = match plan::plan_for(&job, items, &prices) {
        Ok(plan) => plan,
        Err(err) => return Err(Failure::NotSucceeded(format!("rejected: {err}")).into()),
    };
    match format {
        Format::Text => {
            print_plan(&job, &plan, &prices_from);
            println!("nothing was created");
        }
        Format::Json => print_json("plan", json!({"plan": plan, "prices": prices_from, "created": false})),
    }
    Ok(())
}

pub async fn submit(deployment: &Deployment, path: &Path) -> Result<()> {
    let (body, job) = read_spec(path)?;
    // Intake decides with the deployment's prices and the listed items; this
    // catches what the spec alone gets wrong before anything is sent.
    if !matches!(job.work, Some(spec::WorkSpec::S3Prefix(_))) {
        plan::plan(&job, &plan::Prices::builtin()).map_err(|e| Failure::NotSucceeded(format!("rejected: {e}")))?;
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
    send_to_jobs_queue(deployment, &body).await?;
    println!("{job_id}");
    Ok(())
}

pub async fn send_to_jobs_queue(deployment: &Deployment, body: &str) -> Result<()> {
    let queue_url = deployment.jobs_queue_url()?;
    deployment
        .sqs()
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("sending to the jobs queue: {}", aws_sdk_sqs::error::DisplayErrorContext(e)))?;
    Ok(())
}
