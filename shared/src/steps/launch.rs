//! Launch: find this job's instances by tag, or launch them all at once.

use std::collections::BTreeMap;

use crate::error::StepError;
use crate::lifecycle::{self, Event};
use crate::ports::{tags, Cloud, LaunchRequest, Ports};
use crate::record::{InstanceEntry, JobRecord, JobState};
use crate::spec::JobSpec;
use crate::steps::Next;

pub async fn advance(ports: &Ports, cloud: &Cloud, record: &mut JobRecord) -> Result<Next, StepError> {
    let now = ports.clock.now();
    if record.state == JobState::Submitted {
        lifecycle::apply(record, Event::LaunchStarted, now)?;
    }
    let spec = record.spec.clone().ok_or_else(|| corrupt(record, "no spec"))?;
    let count = record.plan.as_ref().ok_or_else(|| corrupt(record, "no plan"))?.instance_count;

    if record.resolved_image.is_none() {
        if let Some(image) = &spec.image {
            let resolved = if image.starts_with('/') { cloud.fleet.resolve_image(image).await? } else { image.clone() };
            record.resolved_image = Some(resolved);
        }
    }

    // Adopt by tag first: a redelivery may come after the ClientToken's window.
    let mut instances = cloud.fleet.find_instances(&record.job_id).await?;
    instances.retain(|i| !i.is_gone());
    if instances.len() < count as usize {
        // Fewer than asked may mean a tag lookup that saw a launch half-way
        // (DescribeInstances is eventually consistent, and a racing delivery
        // may still be inside RunInstances). The same ClientToken returns that
        // launch's instances instead of starting a second fleet.
        let request = launch_request(record, &spec, count, ports.settings.expiry_grace_minutes);
        for launched in cloud.fleet.launch(&request).await? {
            if !launched.is_gone() && !instances.iter().any(|i| i.instance_id == launched.instance_id) {
                instances.push(launched);
            }
        }
    }
    instances.sort_by(|a, b| (a.launch_index, &a.instance_id).cmp(&(b.launch_index, &b.instance_id)));
    record.instances = instances
        .into_iter()
        .enumerate()
        .map(|(index, view)| InstanceEntry {
            instance_id: view.instance_id,
            shard_index: index as u32,
            availability_zone: view.availability_zone,
            state: view.state,
        })
        .collect();
    lifecycle::apply(record, Event::FleetLaunched, now)?;
    record.reason = format!("launched {} instance(s); waiting for running + SSM Online", record.instances.len());
    Ok(Next::Poll)
}

/// The tags on everything a job creates.
pub fn job_tags(record: &JobRecord, spec: &JobSpec, grace_minutes: u32) -> BTreeMap<String, String> {
    let mut all = spec.tags.clone();
    let expires =
        record.deadline_at.unwrap_or(record.submitted_at) + chrono::Duration::minutes(i64::from(grace_minutes));
    all.insert(tags::MANAGED_BY.to_string(), tags::MANAGED_BY_VALUE.to_string());
    all.insert(tags::JOB_ID.to_string(), record.job_id.clone());
    all.insert(tags::JOB_NAME.to_string(), job_name(record));
    all.insert(tags::EXPIRES_AT.to_string(), expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    all.insert("Name".to_string(), format!("flotilla-{}", record.job_id));
    all
}

pub fn job_name(record: &JobRecord) -> String {
    record.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_else(|| record.job_id.clone())
}

fn launch_request(record: &JobRecord, spec: &JobSpec, count: u32, grace_minutes: u32) -> LaunchRequest {
    let template = spec.launch_template.as_ref();
    LaunchRequest {
        job_id: record.job_id.clone(),
        count,
        instance_type: spec.instance_types[0].clone(),
        image_id: record.resolved_image.clone(),
        launch_template_id: template.and_then(|t| t.id.clone()),
        launch_template_name: template.and_then(|t| t.name.clone()),
        launch_template_version: template.and_then(|t| t.version.clone()),
        subnet_id: spec.subnet_ids.first().cloned(),
        security_group_ids: spec.security_group_ids.clone(),
        instance_profile: spec.instance_profile.clone(),
        market: spec.market,
        tags: job_tags(record, spec, grace_minutes),
        // ClientToken is at most 64 ASCII characters; job ids are at most 48.
        client_token: format!("{}-launch-1", record.job_id),
    }
}

fn corrupt(record: &JobRecord, reason: &str) -> StepError {
    StepError::RecordCorrupt { job_id: record.job_id.clone(), reason: reason.to_string() }
}
