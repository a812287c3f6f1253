//! `flotilla plan` and `submit`: a spec read, sized, priced and checked
//! before anything is sent; nothing is created by `plan`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use flotilla_shared::ports::{Listing, Objects};
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

/// The table intake prices jobs with: the built-in one, with the
/// deployment's `config/prices.json` on top when there is one.
async fn intake_prices(deployment: &Deployment) -> Result<(plan::Prices, String)> {
    let builtin = "the built-in table (shared/prices.json)".to_string();
    let Ok(bucket) = deployment.bucket() else {
        return Ok((plan::Prices::builtin(), format!("{builtin}; no deployment found, whose table may differ")));
    };
    let at = format!("s3://{bucket}/{}", flotilla_shared::intake::PRICES_KEY);
    match deployment.ledger()?.get(flotilla_shared::intake::PRICES_KEY).await {
        Ok(None) => Ok((plan::Prices::builtin(), format!("{builtin}; {at} overrides none of it"))),
        Ok(Some(body)) => {
            let prices = plan::Prices::with_override(&String::from_utf8_lossy(&body))
                .map_err(|e| Failure::NotSucceeded(format!("rejected: {at}: {e}")))?;
            Ok((prices, format!("{at} over the built-in table")))
        }
        Err(e) => bail!("reading {at}, the table intake prices with: {e}"),
    }
}

/// `--prices FILE` on top of `base`: a what-if, shown beside intake's figure.
fn with_file(base: &plan::Prices, path: &Path) -> Result<plan::Prices> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    base.over(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// What `flotilla plan` prints: the fleet, its items, cost and budget.
pub fn print_plan(job: &spec::JobSpec, plan: &plan::Plan, prices: &Priced) {
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
            if let Some(minutes) = job.debug_hold_minutes {
                println!(
                    "hold:      ${:.2}: the first shard that fails for good keeps its instance and volumes {minutes} min after the job fails (in the estimate and the bound)",
                    e.hold_usd
                );
            }
            println!(
                "at most:   ${:.2} (every instance and volume for the whole {} min deadline{})",
                e.max_usd,
                job.deadline_minutes,
                if e.hold_usd > 0.0 { ", and the debug hold" } else { "" }
            );
        }
        None => println!("estimate:  no price for {} in the price table", plan.instance_type),
    }
    if let Some(e) = plan.estimate.as_ref().filter(|e| !e.spot_price_from.is_empty()) {
        let hourly = e
            .spot_hourly_usd
            .get(&plan.instance_type)
            .copied()
            .or_else(|| Some(e.hourly_usd.get(&plan.instance_type)? * e.spot_factor));
        let hourly = hourly.map_or("?".to_string(), |h| format!("${h:.4}"));
        println!("spot:      {hourly}/h per {} from {}", plan.instance_type, e.spot_price_from);
    }
    if let Some(budget) = job.budget_usd {
        match prices.intake_total {
            Some(total) if prices.shown_differs => println!(
                "budget:    ${budget:.2}: fits; intake checks it with its own table ({}), whose estimate is ${total:.2}",
                prices.intake_from
            ),
            _ => println!("budget:    ${budget:.2}: the estimate fits, as intake will check it"),
        }
    }
    println!("prices:    {}", prices.shown_from);
    print_quota(plan);
    print_volumes_and_steps(job);
}

/// The vCPU quota the fleet counts against: GPU and accelerated families
/// often start at 0, and a launch past the quota is refused, never queued.
fn print_quota(plan: &plan::Plan) {
    let quota = flotilla_shared::explain::vcpu_quota_name(&plan.instance_type, plan.market == spec::Market::Spot);
    let Some(vcpus) = flotilla_shared::explain::vcpus(&plan.instance_type) else {
        return println!("quota:     counts against {quota} (vCPUs of {} unknown here)", plan.instance_type);
    };
    let total = vcpus * plan.instance_count;
    println!(
        "quota:     {} x {vcpus} = {total} vCPUs of \"{quota}\"; past it EC2 refuses the launch (VcpuLimitExceeded, a quota, not capacity: `flotilla explain` says which)",
        plan.instance_count
    );
    if flotilla_shared::explain::starts_low(&plan.instance_type) {
        println!("           new accounts often start this quota at 0 vCPUs: check it in Service Quotas before the first run");
    }
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

/// Which prices a plan was shown with, and what intake will say.
pub struct Priced {
    pub shown_from: String,
    pub intake_from: String,
    /// Intake's estimate, when the shown prices are not intake's.
    pub intake_total: Option<f64>,
    pub shown_differs: bool,
}

pub struct PlanOptions<'a> {
    pub prices: Option<&'a PathBuf>,
    pub spot_history: bool,
}

pub async fn plan_command(
    deployment: &Deployment,
    path: &Path,
    options: PlanOptions<'_>,
    format: Format,
) -> Result<()> {
    let (job, plan, priced) = priced_plan(deployment, path, options).await?;
    match format {
        Format::Text => {
            print_plan(&job, &plan, &priced);
            println!("nothing was created");
        }
        Format::Json => print_json(
            "plan",
            json!({
                "plan": plan,
                "prices": priced.shown_from,
                "intake": {"prices": priced.intake_from, "estimate_usd": priced.intake_total, "budget_fits": true},
                "created": false
            }),
        ),
    }
    Ok(())
}

/// The plan with the prices asked for, after intake's verdict on its budget.
pub async fn priced_plan(
    deployment: &Deployment,
    path: &Path,
    options: PlanOptions<'_>,
) -> Result<(spec::JobSpec, plan::Plan, Priced)> {
    let (_, job) = read_spec(path)?;
    let (intake, intake_from) = intake_prices(deployment).await?;
    let items = items_of(deployment, &job).await?;
    // The verdict is intake's: the same estimate with the same table.
    let intake_plan = match plan::plan_for(&job, items, &intake) {
        Ok(plan) => plan,
        Err(err) => return Err(Failure::NotSucceeded(format!("rejected: {err}")).into()),
    };
    let mut shown = match options.prices {
        Some(file) => with_file(&intake, file)?,
        None => intake.clone(),
    };
    let mut shown_from = match options.prices {
        Some(file) => format!("{} over {intake_from}", file.display()),
        None => intake_from.clone(),
    };
    if options.spot_history {
        let now = chrono::Utc::now();
        let region = deployment.config.region().map_or("the default Region".to_string(), ToString::to_string);
        let ec2 = aws_sdk_ec2::Client::new(&deployment.config);
        let points = crate::spot_prices::history(&ec2, &job.instance_types, now).await?;
        let missing = crate::spot_prices::apply(&mut shown, &points, &job.instance_types, &region, now);
        if !missing.is_empty() {
            shown_from.push_str(&format!("; no spot price history for {}", missing.join(", ")));
        }
    }
    let shown_differs = options.prices.is_some() || options.spot_history;
    let plan = if shown_differs {
        let what_if = spec::JobSpec { budget_usd: None, ..job.clone() };
        plan::plan_for(&what_if, items, &shown).map_err(|err| Failure::NotSucceeded(format!("rejected: {err}")))?
    } else {
        intake_plan.clone()
    };
    let priced = Priced {
        shown_from,
        intake_from,
        intake_total: intake_plan.estimate.as_ref().map(|e| e.total_usd),
        shown_differs,
    };
    Ok((job, plan, priced))
}

/// The job's items: an S3 prefix is listed now, as intake will list it.
async fn items_of(deployment: &Deployment, job: &spec::JobSpec) -> Result<Option<u64>> {
    let Some(spec::WorkSpec::S3Prefix(uri)) = &job.work else {
        return Ok(plan::given_items(job));
    };
    let lister = aws::s3::S3Ledger::new(deployment.s3(), String::new());
    let bucket_and_prefix = spec::split_s3_uri(uri).context("work.s3_prefix")?;
    match lister.list_keys(bucket_and_prefix.0, bucket_and_prefix.1, spec::MAX_WORK_ITEMS as usize).await {
        Ok(Some(keys)) => Ok(Some(keys.iter().filter(|k| !k.ends_with('/')).count() as u64)),
        Ok(None) => {
            let reason = format!("work.s3_prefix: {uri} holds more than {} objects", spec::MAX_WORK_ITEMS);
            Err(Failure::NotSucceeded(format!("rejected: {reason}")).into())
        }
        Err(e) => bail!("listing {uri}: {e}"),
    }
}

pub async fn submit(deployment: &Deployment, path: &Path) -> Result<()> {
    let (body, job) = read_spec(path)?;
    // Intake decides with the deployment's prices and the listed items; this
    // catches what the spec alone gets wrong before anything is sent.
    if !matches!(job.work, Some(spec::WorkSpec::S3Prefix(_))) {
        let (prices, _) = intake_prices(deployment).await?;
        plan::plan(&job, &prices).map_err(|e| Failure::NotSucceeded(format!("rejected: {e}")))?;
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
