//! EC2 (and SSM Parameter Store for image aliases) behind `Fleet` and `Volumes`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMarketOptionsRequest, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceType,
    LaunchTemplateSpecification, MarketType, ResourceType, ShutdownBehavior, SpotInstanceType, SpotMarketOptions,
    SummaryStatus, Tag, TagSpecification, VolumeType,
};
use chrono::{DateTime, Utc};

use super::cloud_error;
use crate::error::{CloudError, RetryClass};
use crate::ports::{CloudResult, Fleet, InstanceView, LaunchRequest, NewVolume, SnapshotView, VolumeView, Volumes};
use crate::spec::Market;
use crate::states::{InstanceState, SnapshotState, VolumeState};
use crate::tags;

/// TerminateInstances accepts up to 1000 ids per call.
const TERMINATE_CHUNK: usize = 1000;
/// DescribeInstanceStatus accepts at most 100 explicit instance ids.
const STATUS_CHUNK: usize = 100;

pub struct Ec2Fleet {
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
}

pub struct Ec2Volumes {
    pub ec2: aws_sdk_ec2::Client,
}

fn tag_spec(resource: ResourceType, tags: &BTreeMap<String, String>) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(resource);
    for (key, value) in tags {
        spec = spec.tags(Tag::builder().key(key).value(value).build());
    }
    spec.build()
}

/// EC2 takes at most 200 values in one filter.
const FILTER_VALUES: usize = 200;

fn tag_filters(tags: &[(&str, &str)]) -> Vec<Filter> {
    tags.iter().map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(*v).build()).collect()
}

fn tags_of(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter().filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string()))).collect()
}

fn instance_view(instance: &aws_sdk_ec2::types::Instance) -> Option<InstanceView> {
    Some(InstanceView {
        instance_id: instance.instance_id()?.to_string(),
        state: InstanceState::from(instance.state().and_then(|s| s.name()).map(|n| n.as_str()).unwrap_or_default()),
        availability_zone: instance.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
        launch_index: instance.ami_launch_index().unwrap_or_default().max(0) as u32,
        job_id: tag_value(instance.tags(), tags::JOB_ID),
        launch_token: tag_value(instance.tags(), tags::LAUNCH),
        tags: tags_of(instance.tags()),
    })
}

fn tag_value(tags: &[Tag], key: &str) -> Option<String> {
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).map(str::to_string)
}

impl Ec2Fleet {
    /// Pages of up to 1,000 instances when searching by tag; EC2 refuses
    /// MaxResults together with InstanceIds.
    async fn describe_filtered(&self, ids: &[String], filters: Vec<Filter>) -> CloudResult<Vec<InstanceView>> {
        let mut views = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let response = self
                .ec2
                .describe_instances()
                .set_instance_ids(if ids.is_empty() { None } else { Some(ids.to_vec()) })
                .set_filters(if filters.is_empty() { None } else { Some(filters.clone()) })
                .set_max_results(ids.is_empty().then_some(1000))
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| cloud_error("ec2", "DescribeInstances", e))?;
            for reservation in response.reservations() {
                views.extend(reservation.instances().iter().filter_map(instance_view));
            }
            token = response.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(views);
            }
        }
    }

    /// The image's root device and its size, so the root volume can be
    /// mapped as encrypted without shrinking it.
    async fn root_device(&self, image_id: &str) -> CloudResult<Option<(String, Option<i32>)>> {
        let response = self
            .ec2
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .map_err(|e| cloud_error("ec2", "DescribeImages", e))?;
        let Some(image) = response.images().first() else { return Ok(None) };
        let Some(root) = image.root_device_name() else { return Ok(None) };
        let size = image
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(root))
            .and_then(|m| m.ebs())
            .and_then(|ebs| ebs.volume_size());
        Ok(Some((root.to_string(), size)))
    }
}

#[async_trait]
impl Fleet for Ec2Fleet {
    async fn resolve_image(&self, parameter: &str) -> CloudResult<String> {
        let response =
            self.ssm.get_parameter().name(parameter).send().await.map_err(|e| cloud_error("ssm", "GetParameter", e))?;
        response
            .parameter()
            .and_then(|p| p.value())
            .filter(|v| v.starts_with("ami-"))
            .map(str::to_string)
            .ok_or_else(|| CloudError::Invalid(format!("SSM parameter {parameter} does not hold an AMI id")))
    }

    async fn find_instances(&self, stack: &str, job_id: &str) -> CloudResult<Vec<InstanceView>> {
        // Every state: a terminated instance tells the job it was lost.
        let [managed, of_stack] = tags::scope(stack);
        let filters = tag_filters(&[(tags::JOB_ID, job_id), managed, of_stack]);
        self.describe_filtered(&[], filters).await
    }

    async fn launch(&self, request: &LaunchRequest) -> CloudResult<Vec<InstanceView>> {
        let count = i32::try_from(request.count).map_err(|_| CloudError::Invalid("instance count too large".into()))?;
        let mut call = self
            .ec2
            .run_instances()
            // EC2 launches what capacity allows; the rest launch on later passes.
            .min_count(1)
            .max_count(count)
            // A `poweroff` in a user's script must not leave a stopped, billed volume.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            // Overrides a launch template's termination protection, which
            // would keep the instance (and its bill) past every cleanup.
            .disable_api_termination(false)
            .client_token(&request.client_token)
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance, &request.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &request.tags))
            .set_subnet_id(request.subnet_id.clone())
            .set_security_group_ids(if request.security_group_ids.is_empty() {
                None
            } else {
                Some(request.security_group_ids.clone())
            });
        if let Some(image_id) = &request.image_id {
            call = call.image_id(image_id);
            if let Some((root, size)) = self.root_device(image_id).await? {
                call = call.block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name(root)
                        .ebs(
                            EbsBlockDevice::builder()
                                .encrypted(true)
                                .delete_on_termination(true)
                                .set_volume_size(size)
                                .build(),
                        )
                        .build(),
                );
            }
        }
        if request.launch_template_id.is_some() || request.launch_template_name.is_some() {
            call = call.launch_template(
                LaunchTemplateSpecification::builder()
                    .set_launch_template_id(request.launch_template_id.clone())
                    .set_launch_template_name(request.launch_template_name.clone())
                    .set_version(request.launch_template_version.clone())
                    .build(),
            );
        }
        if let Some(profile) = &request.instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            call = call.iam_instance_profile(spec.build());
        }
        if request.market == Market::Spot {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(SpotMarketOptions::builder().spot_instance_type(SpotInstanceType::OneTime).build())
                    .build(),
            );
        }
        let response = call.send().await.map_err(|e| cloud_error("ec2", "RunInstances", e))?;
        Ok(response.instances().iter().filter_map(instance_view).collect())
    }

    async fn jobs_of(&self, stack: &str, instance_ids: &[String]) -> CloudResult<BTreeMap<String, String>> {
        // A filter, not InstanceIds: an unknown id then matches nothing
        // instead of failing the whole call.
        let mut jobs = BTreeMap::new();
        for chunk in instance_ids.chunks(FILTER_VALUES) {
            let mut filters = tag_filters(&tags::scope(stack));
            filters.push(Filter::builder().name("instance-id").set_values(Some(chunk.to_vec())).build());
            for view in self.describe_filtered(&[], filters).await? {
                if let Some(job_id) = view.job_id {
                    jobs.insert(view.instance_id, job_id);
                }
            }
        }
        Ok(jobs)
    }

    async fn status_checks(&self, instance_ids: &[String]) -> CloudResult<Vec<(String, bool)>> {
        let mut checks = Vec::new();
        let mut pending: Vec<Vec<String>> = instance_ids.chunks(STATUS_CHUNK).map(<[String]>::to_vec).collect();
        while let Some(chunk) = pending.pop() {
            let response = match self.ec2.describe_instance_status().set_instance_ids(Some(chunk.clone())).send().await
            {
                Ok(response) => response,
                Err(e) => {
                    let err = cloud_error("ec2", "DescribeInstanceStatus", e);
                    if !matches!(err.class(), RetryClass::NotFound | RetryClass::NotYetVisible) {
                        return Err(err);
                    }
                    // One unknown id fails the whole call: ask the others
                    // one by one, so they are still checked.
                    if chunk.len() > 1 {
                        pending.extend(chunk.into_iter().map(|id| vec![id]));
                    }
                    continue;
                }
            };
            for status in response.instance_statuses() {
                let summary =
                    |s: Option<&aws_sdk_ec2::types::InstanceStatusSummary>| s.and_then(|s| s.status()).cloned();
                let (instance, system) = (summary(status.instance_status()), summary(status.system_status()));
                let impaired = instance == Some(SummaryStatus::Impaired) || system == Some(SummaryStatus::Impaired);
                let ok = instance == Some(SummaryStatus::Ok) && system == Some(SummaryStatus::Ok);
                if let (Some(id), true) = (status.instance_id(), impaired || ok) {
                    checks.push((id.to_string(), impaired));
                }
            }
        }
        Ok(checks)
    }

    async fn find_managed(&self, stack: &str) -> CloudResult<Vec<InstanceView>> {
        let mut filters = tag_filters(&tags::scope(stack));
        filters.push(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "shutting-down", "stopping", "stopped"].map(String::from).to_vec(),
                ))
                .build(),
        );
        self.describe_filtered(&[], filters).await
    }

    async fn tag(&self, resource_ids: &[String], key: &str, value: &str) -> CloudResult<()> {
        // CreateTags takes up to 1,000 resource ids.
        for chunk in resource_ids.chunks(1000) {
            self.ec2
                .create_tags()
                .set_resources(Some(chunk.to_vec()))
                .tags(Tag::builder().key(key).value(value).build())
                .send()
                .await
                .map_err(|e| cloud_error("ec2", "CreateTags", e))?;
        }
        Ok(())
    }

    /// EC2 refuses the whole call when one id is unknown (NotFound, which
    /// its eventual-consistency page says does not mean terminated): a
    /// refused chunk is halved until the refused ids are alone, so the
    /// others are terminated; the first refusal is returned, and the
    /// reconciler believes only DescribeInstances.
    async fn terminate(&self, instance_ids: &[String]) -> CloudResult<()> {
        let mut pending: Vec<&[String]> = instance_ids.chunks(TERMINATE_CHUNK).rev().collect();
        let mut refused = None;
        while let Some(chunk) = pending.pop() {
            let Err(e) = self.ec2.terminate_instances().set_instance_ids(Some(chunk.to_vec())).send().await else {
                continue;
            };
            let err = cloud_error("ec2", "TerminateInstances", e);
            let split = chunk.len() > 1 && matches!(err.class(), RetryClass::NotFound | RetryClass::NotYetVisible);
            if split {
                let (a, b) = chunk.split_at(chunk.len() / 2);
                pending.push(b);
                pending.push(a);
            } else if refused.is_none() {
                refused = Some(err);
            }
        }
        refused.map_or(Ok(()), Err)
    }
}

fn volume_view(volume: &aws_sdk_ec2::types::Volume) -> Option<VolumeView> {
    let attached_to = volume
        .attachments()
        .iter()
        // A `busy` attachment (a detach asked while the instance still had
        // the volume mounted) is still attached: the device is there.
        .find(|a| a.state().is_some_and(|s| matches!(s.as_str(), "attached" | "busy")))
        .and_then(|a| a.instance_id())
        .map(str::to_string);
    Some(VolumeView {
        volume_id: volume.volume_id()?.to_string(),
        state: VolumeState::from(volume.state().map(|s| s.as_str()).unwrap_or_default()),
        availability_zone: volume.availability_zone().unwrap_or_default().to_string(),
        attached_to,
        tags: tags_of(volume.tags()),
    })
}

/// A describe by id of something that does not exist: None, not an error.
fn none_if_not_found<T>(result: CloudResult<Option<T>>) -> CloudResult<Option<T>> {
    match result {
        Err(err) if err.class() == RetryClass::NotFound => Ok(None),
        other => other,
    }
}

fn ignore_not_found(result: Result<(), CloudError>) -> CloudResult<()> {
    match result {
        Err(err) if err.class() == RetryClass::NotFound => Ok(()),
        other => other,
    }
}

#[async_trait]
impl Volumes for Ec2Volumes {
    async fn find_volumes(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<VolumeView>> {
        // The SDK's paginator, 500 a page (EC2's most for DescribeVolumes).
        let mut pages =
            self.ec2.describe_volumes().set_filters(Some(tag_filters(tags))).max_results(500).into_paginator().send();
        let mut views = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| cloud_error("ec2", "DescribeVolumes", e))?;
            views.extend(page.volumes().iter().filter_map(volume_view));
        }
        Ok(views)
    }

    async fn describe_volume(&self, volume_id: &str) -> CloudResult<Option<VolumeView>> {
        let found = self
            .ec2
            .describe_volumes()
            .volume_ids(volume_id)
            .send()
            .await
            .map_err(|e| cloud_error("ec2", "DescribeVolumes", e));
        none_if_not_found(found.map(|response| response.volumes().iter().filter_map(volume_view).next()))
    }

    async fn create_volume(&self, request: &NewVolume) -> CloudResult<VolumeView> {
        let response = self
            .ec2
            .create_volume()
            .availability_zone(&request.availability_zone)
            .set_size(request.size_gib.map(|s| s as i32))
            .set_snapshot_id(request.snapshot_id.clone())
            .volume_type(VolumeType::from(request.volume_type.as_str()))
            .encrypted(true)
            .client_token(&request.client_token)
            .tag_specifications(tag_spec(ResourceType::Volume, &request.tags))
            .send()
            .await
            .map_err(|e| cloud_error("ec2", "CreateVolume", e))?;
        Ok(VolumeView {
            volume_id: response.volume_id().unwrap_or_default().to_string(),
            state: VolumeState::from(response.state().map(|s| s.as_str()).unwrap_or_default()),
            availability_zone: response.availability_zone().unwrap_or_default().to_string(),
            attached_to: None,
            tags: tags_of(response.tags()),
        })
    }

    async fn attach(&self, volume_id: &str, instance_id: &str, device: &str) -> CloudResult<()> {
        self.ec2
            .attach_volume()
            .volume_id(volume_id)
            .instance_id(instance_id)
            .device(device)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("ec2", "AttachVolume", e))
    }

    async fn detach(&self, volume_id: &str, instance_id: &str, force: bool) -> CloudResult<()> {
        let result = self
            .ec2
            .detach_volume()
            .volume_id(volume_id)
            .instance_id(instance_id)
            .force(force)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("ec2", "DetachVolume", e));
        ignore_not_found(result)
    }

    async fn delete_volume(&self, volume_id: &str) -> CloudResult<()> {
        let result = self
            .ec2
            .delete_volume()
            .volume_id(volume_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("ec2", "DeleteVolume", e));
        ignore_not_found(result)
    }

    async fn find_snapshots(&self, tags: &[(&str, &str)]) -> CloudResult<Vec<SnapshotView>> {
        // The SDK's paginator, 1,000 a page (EC2's most for DescribeSnapshots).
        let mut pages = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .set_filters(Some(tag_filters(tags)))
            .max_results(1000)
            .into_paginator()
            .send();
        let mut views = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| cloud_error("ec2", "DescribeSnapshots", e))?;
            views.extend(page.snapshots().iter().filter_map(snapshot_view));
        }
        Ok(views)
    }

    async fn snapshot_jobs(&self, stack: &str, snapshot_ids: &[String]) -> CloudResult<BTreeMap<String, String>> {
        let mut jobs = BTreeMap::new();
        for chunk in snapshot_ids.chunks(FILTER_VALUES) {
            let mut filters = tag_filters(&tags::scope(stack));
            filters.push(Filter::builder().name("snapshot-id").set_values(Some(chunk.to_vec())).build());
            let mut pages = self
                .ec2
                .describe_snapshots()
                .owner_ids("self")
                .set_filters(Some(filters))
                .max_results(1000)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| cloud_error("ec2", "DescribeSnapshots", e))?;
                for view in page.snapshots().iter().filter_map(snapshot_view) {
                    if let Some(job_id) = view.tags.get(tags::JOB_ID) {
                        jobs.insert(view.snapshot_id.clone(), job_id.clone());
                    }
                }
            }
        }
        Ok(jobs)
    }

    async fn describe_snapshot(&self, snapshot_id: &str) -> CloudResult<Option<SnapshotView>> {
        let found = self
            .ec2
            .describe_snapshots()
            .snapshot_ids(snapshot_id)
            .send()
            .await
            .map_err(|e| cloud_error("ec2", "DescribeSnapshots", e));
        none_if_not_found(found.map(|response| response.snapshots().iter().filter_map(snapshot_view).next()))
    }

    async fn create_snapshot(
        &self,
        volume_id: &str,
        description: &str,
        tags: &BTreeMap<String, String>,
    ) -> CloudResult<String> {
        let response = self
            .ec2
            .create_snapshot()
            .volume_id(volume_id)
            .description(description)
            // EC2 refuses a TagSpecification without tags.
            .set_tag_specifications((!tags.is_empty()).then(|| vec![tag_spec(ResourceType::Snapshot, tags)]))
            // No ClientToken: no blind SDK retry; the next pass finds a
            // snapshot made by a lost reply by its tags first.
            .customize()
            .config_override(
                aws_sdk_ec2::config::Builder::default()
                    .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| cloud_error("ec2", "CreateSnapshot", e))?;
        Ok(response.snapshot_id().unwrap_or_default().to_string())
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> CloudResult<()> {
        let result = self
            .ec2
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| cloud_error("ec2", "DeleteSnapshot", e));
        ignore_not_found(result)
    }
}

fn snapshot_view(s: &aws_sdk_ec2::types::Snapshot) -> Option<SnapshotView> {
    Some(SnapshotView {
        snapshot_id: s.snapshot_id()?.to_string(),
        volume_id: s.volume_id().unwrap_or_default().to_string(),
        state: SnapshotState::from(s.state().map(|st| st.as_str()).unwrap_or_default()),
        started_at: s
            .start_time()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
            .unwrap_or_default(),
        tags: tags_of(s.tags()),
    })
}
