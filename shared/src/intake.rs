//! Intake: accept (validate, plan, record) or reject a job, or record a cancel
//! request. Bad input is answered with a REJECTED record and never retried.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::{info, warn};

use crate::error::StepError;
use crate::plan::{given_items, plan_for, Prices};
use crate::ports::{Cloud, Ports, WriteOutcome};
use crate::record::JobRecord;
use crate::sources::{self, Claimed};
use crate::spec::{self, check_job_id, EnvValue, JobSpec, SecretRef, VolumeSource, WorkSpec};
use crate::tags;
use crate::wake::{Trigger, WakeMessage};
use crate::work;

#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    Accepted {
        job_id: String,
    },
    /// The job already exists: a resubmission or a duplicate delivery.
    AlreadyKnown {
        job_id: String,
    },
    Rejected {
        job_id: String,
        reason: String,
    },
    CancelRequested {
        job_id: String,
    },
    /// `{"dry_run": <spec>}`: every check intake makes, and the plan, with
    /// nothing written and nothing launched.
    Planned {
        job_id: String,
        plan: Box<crate::plan::Plan>,
    },
    CancelIgnored {
        job_id: String,
        reason: String,
    },
    /// A cancel for a job intake has not seen: kept for
    /// [`CANCEL_WINDOW_DAYS`], so the job ends CANCELLED if it arrives.
    CancelPending {
        job_id: String,
    },
    /// The job arrived after its cancel: recorded CANCELLED, nothing launched.
    CancelledOnArrival {
        job_id: String,
    },
}

/// How long a cancel for a job not seen yet is kept: longer than the jobs
/// dead-letter queue keeps a submission (14 days, counted from when it was
/// first sent), so `flotilla redrive` honours it. template.yaml expires
/// `cancels/` after as many days.
pub const CANCEL_WINDOW_DAYS: i64 = 15;

/// `cancels/<job id>`: a cancel that arrived before its job.
pub fn cancel_key(job_id: &str) -> String {
    format!("cancels/{job_id}")
}

/// When a cancel for this id arrived before the job, if within the window.
async fn pending_cancel(ports: &Ports, job_id: &str, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, StepError> {
    let Some(body) = ports.ledger.get(&cancel_key(job_id)).await? else { return Ok(None) };
    let at = std::str::from_utf8(&body)
        .ok()
        .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(now); // unreadable: assume it is recent rather than lose it
    Ok((now - at <= chrono::Duration::days(CANCEL_WINDOW_DAYS)).then_some(at))
}

/// Where a scheduled rule's job spec is kept: `schedules/<rule-name>.json`.
pub fn schedule_key(rule_name: &str) -> String {
    format!("schedules/{rule_name}.json")
}

/// Handle one submission body. `delivery_id` (the SQS message id) names jobs
/// that carry no id of their own, so a redelivery maps to the same job;
/// `sender` (the SQS SenderId) is who submitted it.
pub async fn submit(ports: &Ports, body: &str, delivery_id: &str, sender: Option<&str>) -> Result<Intake, StepError> {
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(body) {
        if map.len() == 1 {
            if let Some(Value::String(job_id)) = map.get("cancel") {
                return cancel(ports, job_id).await;
            }
            if let Some(spec @ Value::Object(_)) = map.get("dry_run") {
                let fallback_id = derived_id(delivery_id);
                return submit_spec(ports, &spec.to_string(), fallback_id, None, Mode::DryRun).await;
            }
        }
    }
    let fallback_id = derived_id(delivery_id);
    submit_spec(ports, body, fallback_id, sender.filter(|s| !s.is_empty()).map(str::to_string), Mode::Submit).await
}

/// A submission, or a dry run that stops before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Submit,
    DryRun,
}

/// A scheduled firing: the spec is read from the bucket, the job id is the rule
/// and the firing minute, so a duplicate delivery of one firing is one job.
pub async fn scheduled(ports: &Ports, rule_name: &str, fired_at: DateTime<Utc>) -> Result<Intake, StepError> {
    let job_id = format!("{}-{}", schedule_id_part(rule_name), fired_at.format("%Y%m%d%H%M"));
    let Some(body) = ports.ledger.get(&schedule_key(rule_name)).await? else {
        return reject(
            ports,
            job_id,
            format!("schedule {rule_name}: no spec at s3://{}/{}", ports.ledger.bucket(), schedule_key(rule_name)),
            "",
        )
        .await;
    };
    let body = String::from_utf8_lossy(&body).to_string();
    // The firing's own id wins over any id in the stored spec.
    let body = match serde_json::from_str::<Value>(&body) {
        Ok(Value::Object(mut map)) => {
            map.insert("id".to_string(), Value::String(job_id.clone()));
            Value::Object(map).to_string()
        }
        _ => body,
    };
    submit_spec(ports, &body, job_id, Some(format!("schedule:{rule_name}")), Mode::Submit).await
}

/// A schedule's part of its jobs' ids: its name in lowercase letters,
/// digits and dashes, at most 34 characters. A name that cleaning changed
/// (`team/nightly`, `Team-Nightly`, `team.nightly`) or that is longer keeps
/// at most 25 of those characters and adds a hash of the name as given, so
/// two schedules never make the same id.
fn schedule_id_part(name: &str) -> String {
    let clean: String =
        name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let clean = clean.trim_matches('-');
    if clean == name && clean.len() <= 34 {
        return clean.to_string();
    }
    let hash = crate::hash::fnv32(name.as_bytes());
    let kept = clean.get(..25).unwrap_or(clean).trim_end_matches('-');
    if kept.is_empty() {
        return format!("{hash:08x}");
    }
    format!("{kept}-{hash:08x}")
}

/// The job's limits, the secrets it may read, the deployment's total, and
/// the sources it names: Err with the reason it is refused.
async fn admit(
    ports: &Ports,
    spec: &JobSpec,
    job_id: &str,
    instances: u32,
    mode: Mode,
) -> Result<Result<(), String>, StepError> {
    if let Err(err) = ports.settings.limits.check(spec, instances) {
        return Ok(Err(err.message));
    }
    if let Err(reason) = check_secret_scope(spec, &ports.settings) {
        return Ok(Err(reason));
    }
    if let Some(reason) = over_total(ports, job_id, instances).await? {
        return Ok(Err(reason));
    }
    check_sources(ports, spec, job_id, mode).await
}

/// Store the accepted job and wake it. The record takes the place of an
/// earlier rejection; an existing job is only woken (a redelivery).
async fn store(ports: &Ports, record: &JobRecord, now: DateTime<Utc>) -> Result<Intake, StepError> {
    let job_id = record.job_id.clone();
    let fresh = record;
    // SUBMITTED, saved with the record; the job's first pass sends it.
    let mut record = record.clone();
    if ports.notices.is_some() {
        crate::events::collect(&mut record, ports.ledger.bucket(), now);
    }
    record.writes += 1;
    let record = &record;
    // The marker first: a job the tick cannot see could strand if its wake is lost.
    ports.ledger.set_active(&job_id, true).await?;
    match ports.ledger.create(record).await? {
        WriteOutcome::Written { .. } => {
            crate::index::add(&*ports.ledger, record).await?;
            honour_late_cancel(ports, &job_id, now).await?;
            ports.queue.send(&WakeMessage::new(&job_id, Trigger::Submit), 0).await?;
            info!(%job_id, reason = %record.reason, "job accepted");
            crate::metrics::emit(
                &ports.settings.stack,
                job_name(record),
                &[("JobsSubmitted", crate::metrics::Unit::Count, 1.0)],
            );
            Ok(Intake::Accepted { job_id })
        }
        WriteOutcome::Conflict => {
            // A rejection holds nothing: a bad body that claimed this id must
            // not turn the valid submission that follows into a no-op.
            if let Some(existing) = ports.ledger.load(&job_id).await? {
                if existing.record.state == crate::record::JobState::Rejected {
                    let mut replacement = carry_notices(ports, &existing.record, fresh.clone(), now);
                    replacement.writes += 1;
                    if let WriteOutcome::Written { .. } = ports.ledger.replace(&replacement, &existing.version).await? {
                        crate::index::add(&*ports.ledger, &replacement).await?;
                        honour_late_cancel(ports, &job_id, now).await?;
                        ports.queue.send(&WakeMessage::new(&job_id, Trigger::Submit), 0).await?;
                        info!(%job_id, "job accepted in place of an earlier rejection");
                        let submitted = [("JobsSubmitted", crate::metrics::Unit::Count, 1.0)];
                        crate::metrics::emit(&ports.settings.stack, job_name(&replacement), &submitted);
                        return Ok(Intake::Accepted { job_id });
                    }
                }
            }
            // A redelivery, perhaps after a crash before the wake was sent:
            // waking a job is always harmless.
            if let Some(existing) = ports.ledger.load(&job_id).await? {
                // Perhaps after a crash before its index entries were written.
                crate::index::add(&*ports.ledger, &existing.record).await?;
                if !existing.record.state.is_terminal() {
                    ports.queue.send(&WakeMessage::new(&job_id, Trigger::Submit), 0).await?;
                }
                info!(%job_id, state = %existing.record.state, "job already exists; resubmission ignored");
            }
            Ok(Intake::AlreadyKnown { job_id })
        }
    }
}

async fn submit_spec(
    ports: &Ports,
    body: &str,
    fallback_id: String,
    submitted_by: Option<String>,
    mode: Mode,
) -> Result<Intake, StepError> {
    let now = ports.clock.now();
    // A dry run records no rejection either: its answer is the reply.
    let refuse = |job_id: String, reason: String, body: &str| {
        let body = body.to_string();
        async move {
            match mode {
                Mode::Submit => reject(ports, job_id, reason, &body).await,
                Mode::DryRun => Ok(Intake::Rejected { job_id, reason }),
            }
        }
    };
    let parsed = spec::parse(body).and_then(|spec| spec::validate(&spec).map(|_| spec));
    let spec = match parsed {
        Ok(spec) => spec,
        Err(err) => return refuse(claimed_id(body).unwrap_or(fallback_id), err.message, body).await,
    };
    let mut spec = spec;
    let job_id = spec.id.clone().unwrap_or(fallback_id);
    if mode == Mode::Submit {
        if let Some(at) = pending_cancel(ports, &job_id, now).await? {
            return cancel_on_arrival(ports, job_id, spec, at, now).await;
        }
    }
    let prices = match prices(ports).await? {
        Ok(prices) => prices,
        Err(reason) => return refuse(job_id, reason, body).await,
    };
    // A job that exists (a redelivery, a resubmission) is not listed or
    // planned again: its manifests are never rewritten under a running job.
    if spec.work.is_some() && mode == Mode::Submit {
        if let Some(existing) = ports.ledger.load(&job_id).await? {
            if existing.record.state != crate::record::JobState::Rejected {
                if !existing.record.state.is_terminal() {
                    ports.queue.send(&WakeMessage::new(&job_id, Trigger::Submit), 0).await?;
                }
                info!(%job_id, state = %existing.record.state, "job already exists; resubmission ignored");
                return Ok(Intake::AlreadyKnown { job_id });
            }
        }
    }
    let items = match work::resolve(ports.ledger.as_ref(), &spec).await? {
        Ok(items) => items,
        Err(reason) => return refuse(job_id, reason, body).await,
    };
    let count = items.as_ref().map(|i| i.len() as u64).or_else(|| given_items(&spec));
    let mut plan = match plan_for(&spec, count, &prices) {
        Ok(plan) => plan,
        Err(err) => return refuse(job_id, err.message, body).await,
    };
    if let Err(reason) = admit(ports, &spec, &job_id, plan.instance_count, mode).await? {
        return refuse(job_id, reason, body).await;
    }
    if mode == Mode::DryRun {
        info!(%job_id, instances = plan.instance_count, "dry run planned");
        return Ok(Intake::Planned { job_id, plan: Box::new(plan) });
    }
    if let Some(items) = &items {
        // Before the record: a job is never visible without its manifests.
        plan.manifests = Some(work::write_manifests(ports.ledger.as_ref(), &job_id, items, plan.instance_count).await?);
    }
    // The list lives in the manifests, not in the record every pass reads.
    if let Some(WorkSpec::List(list)) = &mut spec.work {
        list.clear();
    }
    let mut record = JobRecord::new(job_id, spec, plan, now);
    record.submitted_by = submitted_by;
    store(ports, &record, now).await
}

/// Where an operator overrides the built-in price table.
pub const PRICES_KEY: &str = "config/prices.json";

/// The built-in price table, with `config/prices.json` from the bucket on
/// top when there is one. A broken override rejects jobs with its reason
/// rather than estimating from prices the operator meant to replace.
async fn prices(ports: &Ports) -> Result<Result<Prices, String>, StepError> {
    Ok(match ports.ledger.get(PRICES_KEY).await? {
        None => Ok(Prices::builtin()),
        Some(body) => Prices::with_override(&String::from_utf8_lossy(&body))
            .map_err(|e| format!("s3://{}/{PRICES_KEY}: {e}", ports.ledger.bucket())),
    })
}

/// On the deployment's own worker role a secret outside this stack's
/// namespace can never be read: say so now rather than as a failed step. A
/// job that names its own instance profile, or runs in another account,
/// answers to that role's policy instead.
fn check_secret_scope(spec: &JobSpec, settings: &crate::settings::Settings) -> Result<(), String> {
    if spec.instance_profile.is_some() || spec.role_arn.is_some() {
        return Ok(());
    }
    let stack = &settings.stack;
    for (key, value) in &spec.env {
        let (at, inside) = match value {
            EnvValue::Secret(SecretRef::FromSsm(path)) => {
                (format!("env.{key}.from_ssm"), path.starts_with(&format!("/flotilla/{stack}/")))
            }
            EnvValue::Secret(SecretRef::FromSecretsManager(arn)) => {
                let parts: Vec<&str> = arn.splitn(7, ':').collect();
                let same = |have: &str, want: &Option<String>| want.as_deref().is_none_or(|w| w == have);
                let inside = parts.get(6).is_some_and(|name| name.starts_with(&format!("flotilla/{stack}/")))
                    && same(parts.get(3).copied().unwrap_or_default(), &settings.region)
                    && same(parts.get(4).copied().unwrap_or_default(), &settings.account_id);
                (format!("env.{key}.from_secrets_manager"), inside)
            }
            EnvValue::Plain(_) => continue,
        };
        if !inside {
            return Err(format!(
                "{at}: the worker role reads only parameters under /flotilla/{stack}/ and secrets named flotilla/{stack}/... \
                 in this deployment's account and Region; keep it there, or name an instance_profile whose role may read it"
            ));
        }
    }
    Ok(())
}

/// The deployment's cap on instances across running jobs. Two intakes at
/// once may both pass; the cap bounds ordinary use, not a race.
async fn over_total(ports: &Ports, job_id: &str, wanted: u32) -> Result<Option<String>, StepError> {
    let Some(max) = ports.settings.limits.max_instances_total else { return Ok(None) };
    let mut held: u64 = 0;
    for other in ports.ledger.list_active().await? {
        if other == job_id {
            continue;
        }
        if let Some(loaded) = ports.ledger.load(&other).await? {
            if !loaded.record.state.is_terminal() {
                held += u64::from(loaded.record.plan.as_ref().map_or(0, |p| p.instance_count));
            }
        }
    }
    if held + u64::from(wanted) > u64::from(max) {
        return Ok(Some(format!(
            "fleet: {wanted} instances, but running jobs hold {held} of this deployment's {max}; submit again later"
        )));
    }
    Ok(None)
}

/// A volume or snapshot a job names must carry the deployment's opt-in tag
/// (`flotilla:allow=<stack>`), looked up where the job runs: otherwise any
/// submitter could attach any volume in the account to a root shell. IAM
/// refuses the same (see template.yaml); this gives the reason first.
/// `Ok(Err(reason))` rejects; `Err` is a lookup to retry. A submission
/// claims each `snapshot_id` source before it looks the snapshot up, so
/// retention keeps it while the job may restore from it (`sources.rs`).
async fn check_sources(
    ports: &Ports,
    spec: &JobSpec,
    job_id: &str,
    mode: Mode,
) -> Result<Result<(), String>, StepError> {
    let mut claimed = Vec::new();
    let checked = check_sources_claiming(ports, spec, job_id, mode, &mut claimed).await;
    // Only this submission's own claims: a redelivery of a job that exists
    // shares its claim keys, and that job still needs them.
    let owns_claims = !claimed.is_empty()
        && ports.ledger.load(job_id).await?.is_none_or(|e| e.record.state == crate::record::JobState::Rejected);
    if !matches!(checked, Ok(Ok(()))) && owns_claims {
        for snapshot_id in &claimed {
            // Best effort: a claim left behind only keeps a snapshot longer.
            if let Err(err) = sources::release(ports.ledger.as_ref(), snapshot_id, job_id).await {
                warn!(%job_id, %snapshot_id, error = %err, "claim not released");
            }
        }
    }
    checked
}

async fn check_sources_claiming(
    ports: &Ports,
    spec: &JobSpec,
    job_id: &str,
    mode: Mode,
    claimed: &mut Vec<String>,
) -> Result<Result<(), String>, StepError> {
    let named = spec.volumes.iter().enumerate().filter(|(_, v)| !matches!(v.source, VolumeSource::New { .. }));
    let named: Vec<_> = named.collect();
    if named.is_empty() {
        return Ok(Ok(()));
    }
    let assumed = match &spec.role_arn {
        Some(role_arn) => match ports.accounts.assume(role_arn, spec.external_id.as_deref(), job_id).await {
            Ok(cloud) => Some(cloud),
            Err(err) if err.is_transient() => return Err(err.into()),
            Err(err) => {
                return Ok(Err(format!("role_arn: cannot act as {role_arn} to check the job's volumes: {err}")))
            }
        },
        None => None,
    };
    let cloud: &Cloud = assumed.as_deref().unwrap_or(&ports.cloud);
    let stack = &ports.settings.stack;
    for (i, volume) in named {
        let (at, id, found) = match &volume.source {
            VolumeSource::VolumeId(id) => {
                let found = cloud.volumes.describe_volume(id).await;
                (format!("volumes[{i}].source.volume_id"), id, found.map(|v| v.map(|v| v.tags)))
            }
            VolumeSource::SnapshotId(id) => {
                if mode == Mode::Submit {
                    match sources::claim(ports.ledger.as_ref(), id, job_id, ports.clock.now()).await? {
                        Claimed::Held => claimed.push(id.clone()),
                        Claimed::BeingDeleted => {
                            claimed.push(id.clone());
                            return Err(StepError::Contended(format!(
                                "{job_id}: retention is deleting {id} right now; the submission is retried"
                            )));
                        }
                    }
                }
                let found = cloud.volumes.describe_snapshot(id).await;
                (format!("volumes[{i}].source.snapshot_id"), id, found.map(|s| s.map(|s| s.tags)))
            }
            VolumeSource::New { .. } => continue,
        };
        let found_tags = match found {
            Ok(found) => found,
            Err(err) if err.is_retryable() => return Err(err.into()),
            Err(err) => return Ok(Err(format!("{at}: cannot look up {id}: {err}"))),
        };
        let Some(found_tags) = found_tags else {
            return Ok(Err(format!("{at}: {id} does not exist in the account the job runs in")));
        };
        if found_tags.get(tags::ALLOW) != Some(stack) {
            return Ok(Err(format!(
                "{at}: {id} lacks the opt-in tag {}={stack}; its owner must add that tag before a job may use it",
                tags::ALLOW
            )));
        }
    }
    Ok(Ok(()))
}

async fn reject(ports: &Ports, job_id: String, reason: String, body: &str) -> Result<Intake, StepError> {
    warn!(%job_id, %reason, "job rejected");
    let now = ports.clock.now();
    let mut record = JobRecord::rejected(job_id.clone(), reason.clone(), &crate::task_token::redacted(body), now);
    announce_rejection(ports, &mut record, body, now);
    if !record.outbox.is_empty() {
        // Its notices are sent below; if they are not, the tick sends them.
        ports.ledger.set_active(&job_id, true).await?;
    }
    record.writes += 1;
    match ports.ledger.create(&record).await? {
        WriteOutcome::Written { version } => {
            crate::index::add(&*ports.ledger, &record).await?;
            crate::metrics::emit(&ports.settings.stack, None, &crate::metrics::job_ended(&record));
            crate::publish::finish_terminal(ports, record, version).await?;
            Ok(Intake::Rejected { job_id, reason })
        }
        // Never overwrite a real job with a rejection of a later submission;
        // a redelivery sends the notices a crash or failure kept back.
        WriteOutcome::Conflict => {
            if let Some(existing) = ports.ledger.load(&job_id).await? {
                crate::index::add(&*ports.ledger, &existing.record).await?;
                if existing.record.state.is_terminal() && !existing.record.outbox.is_empty() {
                    crate::publish::finish_terminal(ports, existing.record, existing.version).await?;
                }
            }
            Ok(Intake::AlreadyKnown { job_id })
        }
    }
}

/// A record taking the place of a rejection (a valid body for the same id)
/// goes on with its notices: the rejection's unsent ones first, then its
/// own numbered after the rejection's, so no `event_id` is used twice.
fn carry_notices(ports: &Ports, rejected: &JobRecord, mut record: JobRecord, now: DateTime<Utc>) -> JobRecord {
    if ports.notices.is_none() {
        return record;
    }
    let sequence = rejected.announced.as_ref().map_or(0, |a| a.sequence);
    record.announced = Some(crate::record::Announced { sequence, ..Default::default() });
    record.outbox = rejected.outbox.clone();
    crate::events::collect(&mut record, ports.ledger.bucket(), now);
    record
}

/// A rejected job's event, and SendTaskFailure (`Flotilla.JobRejected`) for
/// a task token the body carries, read leniently: the body did not parse
/// as a spec, yet its caller still waits.
fn announce_rejection(ports: &Ports, record: &mut JobRecord, body: &str, now: DateTime<Utc>) {
    if ports.notices.is_none() {
        return;
    }
    crate::events::collect(record, ports.ledger.bucket(), now);
    let token = crate::task_token::find(body);
    let Some(detail) = record.outbox.last().map(|n| n.detail.clone()) else { return };
    if let Some(token) = token {
        let answer = crate::events::answer(record, token, &detail);
        if let Some(last) = record.outbox.last_mut() {
            last.task = Some(answer);
        }
    }
}

/// A cancel that raced the job's creation: it wrote its marker after the
/// check before `create`, and read no record before `create` wrote it.
/// Marker first, record second on the cancel's side; record first, marker
/// second here: one of the two sees the other.
async fn honour_late_cancel(ports: &Ports, job_id: &str, now: DateTime<Utc>) -> Result<(), StepError> {
    if pending_cancel(ports, job_id, now).await?.is_some() {
        // update_inbox wakes the job when it sets the flag.
        crate::inbox::update_inbox(
            ports,
            job_id,
            |record| {
                record.cancel_requested_at.get_or_insert(now);
                !std::mem::replace(&mut record.cancel_requested, true)
            },
            Trigger::Cancel,
        )
        .await?;
        ports.ledger.delete(&cancel_key(job_id)).await?;
        info!(%job_id, "cancel that arrived before the job applied");
    }
    Ok(())
}

/// A job whose cancel came first: recorded CANCELLED, nothing launched. If
/// a record exists (a redelivery after a crash that followed the create, or
/// a rejection this valid submission replaces), the cancel still reaches it.
async fn cancel_on_arrival(
    ports: &Ports,
    job_id: String,
    spec: JobSpec,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Intake, StepError> {
    let reason = format!(
        "cancelled before it arrived (cancel received {}); nothing was launched",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let mut record = JobRecord::cancelled_on_arrival(job_id.clone(), spec, reason, now);
    let written = match ports.ledger.load(&job_id).await? {
        None => {
            if ports.notices.is_some() {
                crate::events::collect(&mut record, ports.ledger.bucket(), now);
                // Its notices are sent below; if they are not, the tick sends them.
                ports.ledger.set_active(&job_id, true).await?;
            }
            record.writes += 1;
            ports.ledger.create(&record).await?
        }
        Some(existing) if existing.record.state == crate::record::JobState::Rejected => {
            record = carry_notices(ports, &existing.record, record, now);
            ports.ledger.set_active(&job_id, true).await?;
            record.writes += 1;
            ports.ledger.replace(&record, &existing.version).await?
        }
        Some(existing) => {
            info!(%job_id, state = %existing.record.state, "job already exists; resubmission ignored");
            crate::index::add(&*ports.ledger, &existing.record).await?;
            if !existing.record.state.is_terminal() {
                honour_late_cancel(ports, &job_id, now).await?;
            } else if !existing.record.outbox.is_empty() {
                // A redelivery after the notices did not go: send them now.
                crate::publish::finish_terminal(ports, existing.record, existing.version).await?;
            }
            return Ok(Intake::AlreadyKnown { job_id });
        }
    };
    match written {
        WriteOutcome::Written { version } => {
            crate::index::add(&*ports.ledger, &record).await?;
            crate::metrics::emit(&ports.settings.stack, job_name(&record), &crate::metrics::job_ended(&record));
            crate::publish::finish_terminal(ports, record, version).await?;
            ports.ledger.delete(&cancel_key(&job_id)).await?;
            info!(%job_id, "job cancelled on arrival");
            Ok(Intake::CancelledOnArrival { job_id })
        }
        // Written meanwhile by a concurrent delivery: it is handled there.
        WriteOutcome::Conflict => Ok(Intake::AlreadyKnown { job_id }),
    }
}

async fn cancel(ports: &Ports, job_id: &str) -> Result<Intake, StepError> {
    if check_job_id("cancel", job_id).is_err() {
        return Ok(Intake::CancelIgnored { job_id: job_id.chars().take(64).collect(), reason: "not a job id".into() });
    }
    let now = ports.clock.now();
    // No job yet, or only a rejection a valid submission may still replace.
    let not_here = |found: &Option<crate::ports::Versioned>| {
        found.as_ref().is_none_or(|l| l.record.state == crate::record::JobState::Rejected)
    };
    let mut found = ports.ledger.load(job_id).await?;
    if not_here(&found) {
        // The jobs queue does not keep order: keep the cancel, then look
        // again, so a job created meanwhile is not missed.
        let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        ports.ledger.put(&cancel_key(job_id), stamp.as_bytes(), "text/plain").await?;
        found = ports.ledger.load(job_id).await?;
        if not_here(&found) {
            info!(%job_id, "cancel kept for a job not seen yet");
            return Ok(Intake::CancelPending { job_id: job_id.to_string() });
        }
    }
    let Some(loaded) = found else { return Ok(Intake::CancelPending { job_id: job_id.to_string() }) };
    if loaded.record.state.is_terminal() || loaded.record.cancel_requested {
        return Ok(Intake::CancelIgnored {
            job_id: job_id.to_string(),
            reason: format!("job is {}", loaded.record.state),
        });
    }
    // Only the flag is written; the job's reconciler acts on it.
    let requested = crate::inbox::update_inbox(
        ports,
        job_id,
        |record| {
            if record.cancel_requested {
                return false;
            }
            record.cancel_requested = true;
            record.cancel_requested_at = Some(now);
            true
        },
        Trigger::Cancel,
    )
    .await?;
    if requested {
        info!(%job_id, "cancel requested");
        Ok(Intake::CancelRequested { job_id: job_id.to_string() })
    } else {
        Ok(Intake::CancelIgnored { job_id: job_id.to_string(), reason: "job finished or already cancelling".into() })
    }
}

/// The id a malformed body claims, if it is a valid id: the user finds the
/// rejection under the name they chose.
fn claimed_id(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    let id = value.get("id")?.as_str()?;
    check_job_id("id", id).ok().map(|_| id.to_string())
}

/// `job-<SQS message id>`, so a user who sent a spec without an id (say with
/// awscli, which prints the MessageId) can find its record.
fn derived_id(delivery_id: &str) -> String {
    let clean: String = delivery_id
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
        .take(44) // job ids are at most 48 characters
        .collect();
    if clean.is_empty() {
        format!("job-{}", uuid::Uuid::new_v4().simple())[..24].to_string()
    } else {
        format!("job-{clean}")
    }
}

/// The job-name dimension's value (`metrics`): its name, or its id.
fn job_name(record: &JobRecord) -> Option<&str> {
    record.spec.as_ref().and_then(|s| s.name.as_deref()).or(Some(record.job_id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::schedule_id_part;

    #[test]
    fn schedules_whose_names_clean_alike_make_different_ids() {
        let names = ["team/nightly", "team-nightly", "Team-Nightly", "a.b", "a_b", "a-b", "-a-b-", "__"];
        let ids: Vec<String> = names.iter().map(|n| schedule_id_part(n)).collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{ids:?}");
        // A clean name is its own id part, as the jobs it made so far.
        assert_eq!(schedule_id_part("flotilla-nightly-example"), "flotilla-nightly-example");
        for id in &ids {
            assert!(id.len() <= 34 && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!id.starts_with('-') && !id.ends_with('-'), "{id}");
        }
        let long = "a-schedule-whose-name-runs-past-thirty-four-characters";
        assert_ne!(schedule_id_part(long), schedule_id_part(&format!("{long}-2")));
        assert!(schedule_id_part(long).len() <= 34);
    }
}
