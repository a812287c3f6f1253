//! Pins what tools/flotilla_moto.py adds to moto 5.2.5, each behaviour as AWS
//! documents it. Without the extension every test here fails.

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{IamInstanceProfileSpecification, InstanceType};
use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter};

use crate::moto::{MotoStack, WORKER_PROFILE};

async fn launch(stack: &MotoStack, count: i32, token: Option<&str>) -> Vec<String> {
    let out = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(count)
        .max_count(count)
        .iam_instance_profile(IamInstanceProfileSpecification::builder().name(WORKER_PROFILE).build())
        .set_client_token(token.map(str::to_string))
        .send()
        .await
        .expect("run instances");
    out.instances().iter().filter_map(|i| i.instance_id().map(str::to_string)).collect()
}

async fn finished(
    stack: &MotoStack,
    command_id: &str,
    instance_id: &str,
) -> aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = stack
            .ssm()
            .get_command_invocation()
            .command_id(command_id)
            .instance_id(instance_id)
            .send()
            .await
            .expect("get invocation");
        if !matches!(out.status(), Some(CommandInvocationStatus::InProgress | CommandInvocationStatus::Pending)) {
            return out;
        }
        assert!(Instant::now() < deadline, "command never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SSM refuses commands until the agent is Online (InvalidInstanceId).
async fn wait_online(stack: &MotoStack, instances: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut online = 0;
        for ids in instances.chunks(100) {
            let filter = InstanceInformationStringFilter::builder()
                .key("InstanceIds")
                .set_values(Some(ids.to_vec()))
                .build()
                .expect("filter");
            let mut pages = stack
                .ssm()
                .describe_instance_information()
                .filters(filter)
                .max_results(50)
                .into_paginator()
                .items()
                .send();
            while let Some(agent) = pages.next().await {
                agent.expect("describe");
                online += 1;
            }
        }
        if online == instances.len() {
            return;
        }
        assert!(Instant::now() < deadline, "agents never came Online");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn send(stack: &MotoStack, instances: &[String], script: &str, timeout: u32) -> String {
    wait_online(stack, instances).await;
    stack
        .ssm()
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(instances.to_vec()))
        .parameters("commands", vec![script.to_string()])
        .parameters("executionTimeout", vec![timeout.to_string()])
        .output_s3_bucket_name(&stack.bucket)
        .output_s3_key_prefix("outputs/ext")
        .send()
        .await
        .expect("send")
        .command()
        .and_then(|c| c.command_id())
        .expect("id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_come_online_after_boot_and_only_named_instances_are_listed() {
    let stack = MotoStack::start_with_agent_delay(8).await;
    let launched = std::time::Instant::now();
    let ids = launch(&stack, 2, None).await;
    let ask = || {
        stack
            .ssm()
            .describe_instance_information()
            .filters(
                InstanceInformationStringFilter::builder().key("InstanceIds").values(&ids[0]).build().expect("filter"),
            )
            .send()
    };
    let early = ask().await.expect("describe");
    assert!(early.instance_information_list().is_empty(), "agent not registered right after launch");
    // Polled, not slept: a slow machine may answer late, never early.
    let later = loop {
        let later = ask().await.expect("describe");
        if !later.instance_information_list().is_empty() {
            break later;
        }
        assert!(launched.elapsed() < Duration::from_secs(60), "agent never came Online");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(launched.elapsed() >= Duration::from_millis(7500), "Online after {:?}, not 8 s", launched.elapsed());
    let list = later.instance_information_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id(), Some(ids[0].as_str()));
    assert_eq!(list[0].ping_status().map(|p| p.as_str()), Some("Online"));
    assert!(list[0].agent_version().unwrap_or_default().contains("flotilla-emulator"));
}

/// Gap 1's paging: 10 agents a page unless asked (5-50), at most 100 ids in
/// a filter, an unknown id refused; the reconciler's adapter asks for 50,
/// follows the pages and halves a refused lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_lookups_page_as_ssm_does() {
    use flotilla_shared::ports::Commands;
    let stack = MotoStack::start().await;
    // More than one of the adapter's 50-agent pages.
    let ids = launch(&stack, 60, None).await;
    wait_online(&stack, &ids).await;
    let filter = |values: Vec<String>| {
        InstanceInformationStringFilter::builder().key("InstanceIds").set_values(Some(values)).build().expect("filter")
    };
    let first = stack.ssm().describe_instance_information().filters(filter(ids.clone())).send().await.expect("page");
    assert_eq!(first.instance_information_list().len(), 10, "10 a page by default");
    assert!(first.next_token().is_some());
    let too_small =
        stack.ssm().describe_instance_information().filters(filter(ids.clone())).max_results(4).send().await;
    let code = too_small.err().and_then(|e| e.into_service_error().meta().code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("ValidationException"));
    let mut many = ids.clone();
    many.extend((0..41).map(|i| format!("i-{i:017x}")));
    let too_many = stack.ssm().describe_instance_information().filters(filter(many)).max_results(50).send().await;
    let code = too_many.err().and_then(|e| e.into_service_error().meta().code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("ValidationException"), "101 filter values");
    let unknown = stack
        .ssm()
        .describe_instance_information()
        .filters(filter(vec![ids[0].clone(), "i-0000000000000dead".into()]))
        .send()
        .await;
    let code = unknown.err().and_then(|e| e.into_service_error().meta().code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("InvalidInstanceId"), "an id that is no instance of the account");
    // The adapter: 100 ids a lookup, every page followed, and a lookup an
    // unknown id refuses halved until the rest are seen.
    let commands = flotilla_shared::aws::ssm::SsmCommands { ssm: stack.ssm() };
    let all = commands.online_agents(&ids).await.expect("online agents");
    assert_eq!(all.len(), ids.len(), "one lookup of 60: both pages read");
    let mut asked = ids.clone();
    asked.insert(17, "i-0000000000000dead".into());
    let mut online = commands.online_agents(&asked).await.expect("online agents");
    online.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(online, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_token_makes_run_instances_idempotent() {
    let stack = MotoStack::start().await;
    let first = launch(&stack, 2, Some("job-x-launch-1")).await;
    let again = launch(&stack, 2, Some("job-x-launch-1")).await;
    assert_eq!(first, again);
    let other = launch(&stack, 1, Some("job-y-launch-1")).await;
    assert_ne!(first[0], other[0]);
    let all: usize = stack
        .ec2()
        .describe_instances()
        .send()
        .await
        .expect("describe")
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum();
    assert_eq!(all, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_token_makes_create_volume_idempotent() {
    let stack = MotoStack::start().await;
    let create =
        || stack.ec2().create_volume().availability_zone("us-east-1a").size(1).client_token("job-x-data-0").send();
    let first = create().await.expect("create");
    let again = create().await.expect("create again");
    assert_eq!(first.volume_id(), again.volume_id());
    assert_eq!(stack.ec2().describe_volumes().send().await.expect("describe").volumes().len(), 1);
    // The same token with another size is refused; another zone is not a difference.
    let other = stack.ec2().create_volume().availability_zone("us-east-1a").size(2).client_token("job-x-data-0");
    let refused = other.send().await.expect_err("a changed parameter is refused");
    assert_eq!(
        aws_sdk_ec2::error::ProvideErrorMetadata::code(&refused),
        Some("IdempotentParameterMismatch"),
        "{refused:?}"
    );
    let elsewhere = stack.ec2().create_volume().availability_zone("us-east-1b").size(1).client_token("job-x-data-0");
    assert_eq!(elsewhere.send().await.expect("another zone").volume_id(), first.volume_id());
}

/// A snapshot stays `pending` for a while, then completes (gap 18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_pending_before_it_completes() {
    let stack = MotoStack::start().await;
    let volume = stack.ec2().create_volume().availability_zone("us-east-1a").size(1).send().await.expect("volume");
    let snapshot =
        stack.ec2().create_snapshot().volume_id(volume.volume_id().expect("id")).send().await.expect("snapshot");
    let id = snapshot.snapshot_id().expect("id").to_string();
    let state = || async {
        let out = stack.ec2().describe_snapshots().snapshot_ids(&id).send().await.expect("describe");
        out.snapshots()[0].state().map(|s| s.as_str().to_string()).unwrap_or_default()
    };
    assert_eq!(state().await, "pending");
    let deadline = Instant::now() + Duration::from_secs(30);
    while state().await != "completed" {
        assert!(Instant::now() < deadline, "the snapshot never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// ListCommands by instance does not show a command at once (gap 19); by
/// its id it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_commands_lags_behind_send_command() {
    let stack = MotoStack::start().await;
    std::fs::write(stack.scratch.join("list-lag"), "3").expect("lag");
    let ids = launch(&stack, 1, None).await;
    let command = send(&stack, &ids, "true", 60).await;
    let listed = || async {
        let out = stack.ssm().list_commands().instance_id(&ids[0]).send().await.expect("list");
        out.commands().iter().filter_map(|c| c.command_id().map(str::to_string)).collect::<Vec<_>>()
    };
    assert!(listed().await.is_empty(), "a new command is not listed at once");
    let by_id = stack.ssm().list_commands().command_id(&command).send().await.expect("by id");
    assert_eq!(by_id.commands().len(), 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(listed().await, vec![command]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_target_only_named_instances_and_really_run() {
    let stack = MotoStack::start().await;
    let ids = launch(&stack, 2, None).await;
    let command_id = send(&stack, &ids[..1], "echo \"on $AWS_SSM_INSTANCE_ID\"; echo oops >&2; exit 4", 30).await;
    let listed =
        stack.ssm().list_command_invocations().command_id(&command_id).details(true).send().await.expect("list");
    assert_eq!(listed.command_invocations().len(), 1, "only the named instance");
    let out = finished(&stack, &command_id, &ids[0]).await;
    assert_eq!(out.status(), Some(&CommandInvocationStatus::Failed));
    assert_eq!(out.response_code(), 4);
    assert_eq!(out.standard_output_content(), Some(format!("on {}\n", ids[0]).as_str()));
    assert_eq!(out.standard_error_content(), Some("oops\n"));
    // Full output lands in S3 at SSM's key layout.
    let key = format!("outputs/ext/{command_id}/{}/awsrunShellScript/0.awsrunShellScript/stdout", ids[0]);
    let object = flotilla_shared::aws::s3_client(&stack.config)
        .get_object()
        .bucket(&stack.bucket)
        .key(&key)
        .send()
        .await
        .expect("output object");
    let body = object.body.collect().await.expect("body").into_bytes();
    assert_eq!(&body[..], format!("on {}\n", ids[0]).as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_and_cancel_are_reported() {
    let stack = MotoStack::start().await;
    let ids = launch(&stack, 1, None).await;
    let slow = send(&stack, &ids, "sleep 20", 1).await;
    assert_eq!(finished(&stack, &slow, &ids[0]).await.status(), Some(&CommandInvocationStatus::TimedOut));
    let cancelled = send(&stack, &ids, "sleep 20", 60).await;
    stack.ssm().cancel_command().command_id(&cancelled).send().await.expect("cancel");
    assert_eq!(finished(&stack, &cancelled, &ids[0]).await.status(), Some(&CommandInvocationStatus::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_real_devices_volume_scripts_are_reported_not_run() {
    let stack = MotoStack::start_with(1, &[("FLOTILLA_EMU_DEVICES", "off"), ("CI", "")]).await;
    let ids = launch(&stack, 1, None).await;
    let script = format!("# flotilla:volume-op mount\n  {}) VOLUME_ID=vol-0abc ;;\n  i-other) VOLUME_ID=vol-0def ;;\nmkdir -p /data\nmkfs -t ext4 /dev/nonexistent", ids[0]);
    let command_id = send(&stack, &ids, &script, 30).await;
    let out = finished(&stack, &command_id, &ids[0]).await;
    assert_eq!(out.status(), Some(&CommandInvocationStatus::Success));
    let stdout = out.standard_output_content().unwrap_or_default();
    assert!(stdout.contains("flotilla-emulator") && stdout.contains("skipped: no EBS block devices"), "{stdout}");
    assert!(
        stdout.contains("would find vol-0abc ") && !stdout.contains("vol-0def") && stdout.contains("mount at /data"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_templates_give_every_instance_their_metadata_options_and_profile() {
    use aws_sdk_ec2::types::{
        HttpTokensState, LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
        LaunchTemplateInstanceMetadataOptionsRequest, LaunchTemplateSpecification, RequestLaunchTemplateData,
    };
    let stack = MotoStack::start().await;
    // MotoStack::start made the deployment's worker profile, flotilla-worker.
    let ec2 = stack.ec2();
    let data = RequestLaunchTemplateData::builder()
        .image_id("ami-12c6146b")
        .metadata_options(
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(LaunchTemplateHttpTokensState::Required)
                .http_put_response_hop_limit(2)
                .build(),
        )
        .iam_instance_profile(
            LaunchTemplateIamInstanceProfileSpecificationRequest::builder().name("flotilla-worker").build(),
        )
        .build();
    ec2.create_launch_template().launch_template_name("workers").launch_template_data(data).send().await.expect("lt");
    let run = || {
        ec2.run_instances()
            .launch_template(LaunchTemplateSpecification::builder().launch_template_name("workers").build())
            .min_count(3)
            .max_count(3)
            .client_token("lt-launch-1")
            .send()
    };
    let first = run().await.expect("run from template");
    // A repeated token returns the same launch without re-associating profiles.
    let again = run().await.expect("same token again");
    let ids: Vec<String> = first.instances().iter().filter_map(|i| i.instance_id().map(str::to_string)).collect();
    let again: Vec<String> = again.instances().iter().filter_map(|i| i.instance_id().map(str::to_string)).collect();
    assert_eq!(ids, again);
    let described = ec2.describe_instances().set_instance_ids(Some(ids.clone())).send().await.expect("describe");
    let instances: Vec<_> = described.reservations().iter().flat_map(|r| r.instances()).collect();
    assert_eq!(instances.len(), 3);
    for instance in instances {
        let options = instance.metadata_options().expect("metadata options");
        assert_eq!(options.http_tokens(), Some(&HttpTokensState::Required), "{:?}", instance.instance_id());
        assert_eq!(options.http_put_response_hop_limit(), Some(2));
        let profile = instance.iam_instance_profile().and_then(|p| p.arn()).unwrap_or_default();
        assert!(profile.ends_with(":instance-profile/flotilla-worker"), "{:?}: {profile}", instance.instance_id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_instances_max_results_counts_instances() {
    let stack = MotoStack::start().await;
    launch(&stack, 7, None).await;
    launch(&stack, 1, None).await;
    let mut pages = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = stack
            .ec2()
            .describe_instances()
            .max_results(5)
            .set_next_token(token.clone())
            .send()
            .await
            .expect("describe page");
        pages.push(page.reservations().iter().map(|r| r.instances().len()).sum::<usize>());
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, vec![5, 3], "pages of at most 5 instances, a reservation of 7 split");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_volume_refuses_a_volume_or_device_in_use() {
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    let stack = MotoStack::start().await;
    let ec2 = stack.ec2();
    let instances = launch(&stack, 2, None).await;
    let volume = |size| ec2.create_volume().availability_zone("us-east-1a").size(size).send();
    let first = volume(1).await.expect("volume").volume_id().expect("id").to_string();
    let second = volume(2).await.expect("volume").volume_id().expect("id").to_string();
    let attach = |volume_id: &str, instance_id: &str| {
        ec2.attach_volume().volume_id(volume_id).instance_id(instance_id).device("/dev/sdf").send()
    };
    attach(&first, &instances[0]).await.expect("first attach");

    let again = attach(&first, &instances[1]).await.expect_err("an attached volume");
    assert_eq!(again.code(), Some("VolumeInUse"), "{again:?}");
    let taken = attach(&second, &instances[0]).await.expect_err("a device in use");
    assert_eq!(taken.code(), Some("InvalidParameterValue"), "{taken:?}");
    assert!(taken.message().unwrap_or_default().contains("/dev/sdf is already in use"), "{taken:?}");

    // The refusals changed nothing: the first attachment stands and detaches cleanly.
    let view = ec2.describe_volumes().volume_ids(&first).send().await.expect("describe");
    let attachments = view.volumes()[0].attachments();
    assert_eq!(attachments.len(), 1);
    assert_eq!(attachments[0].instance_id(), Some(instances[0].as_str()));
    ec2.detach_volume().volume_id(&first).instance_id(&instances[0]).send().await.expect("detach");
    attach(&second, &instances[0]).await.expect("the device is free again");
}

/// Gap 1: the SSM agent needs an instance profile; without one it never registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_a_profile_never_comes_online() {
    let stack = MotoStack::start_with_agent_delay(1).await;
    let out = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("run instances");
    let id = out.instances()[0].instance_id().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = stack
        .ssm()
        .describe_instance_information()
        .filters(InstanceInformationStringFilter::builder().key("InstanceIds").values(&id).build().expect("filter"))
        .send()
        .await
        .expect("describe");
    assert!(info.instance_information_list().is_empty());
    let sent = stack
        .ssm()
        .send_command()
        .document_name("AWS-RunShellScript")
        .instance_ids(&id)
        .parameters("commands", vec!["true".to_string()])
        .send()
        .await;
    let code = sent.err().and_then(|e| e.into_service_error().meta().code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("InvalidInstanceId"));
}

/// Gaps 5 and 12: a reused ClientToken with other parameters is refused;
/// RunInstances launches MaxCount when capacity allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_token_with_other_parameters_is_refused_and_max_count_launches() {
    let stack = MotoStack::start().await;
    let launched = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(3)
        .client_token("job-z-l1")
        .send()
        .await
        .expect("run");
    assert_eq!(launched.instances().len(), 3, "MaxCount, as EC2 launches when capacity allows");
    let mismatch = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Small)
        .min_count(1)
        .max_count(3)
        .client_token("job-z-l1")
        .send()
        .await;
    let code = mismatch.err().and_then(|e| e.into_service_error().meta().code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("IdempotentParameterMismatch"));
}

/// Gap 11: capacity refused for a named type, as EC2 reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_can_be_refused_for_a_named_type() {
    let stack = MotoStack::start().await;
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(stack.scratch.join("no-capacity"), "t3.micro\n").expect("write");
    let refused = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await;
    let code = refused.err().and_then(|e| e.into_service_error().meta().code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("InsufficientInstanceCapacity"));
    let other = stack
        .ec2()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Small)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("other types still launch");
    assert_eq!(other.instances().len(), 1);
}

/// Gap 10: a command on an instance terminated mid-run never reports
/// Success; CancelCommand with InstanceIds cancels only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_instance_never_reports_success_and_cancel_is_per_instance() {
    let stack = MotoStack::start_with_agent_delay(1).await;
    let ids = launch(&stack, 3, None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Every invocation waits for `go`, so the terminate and the cancel land
    // mid-run however slowly they reach moto.
    let go = stack.scratch.join("go");
    let script = format!("until [ -e '{}' ]; do sleep 0.1; done; echo done", go.display());
    let command = send(&stack, &ids, &script, 30).await;
    stack.ec2().terminate_instances().instance_ids(&ids[0]).send().await.expect("terminate");
    stack.ssm().cancel_command().command_id(&command).instance_ids(&ids[1]).send().await.expect("cancel");
    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(&go, "").expect("go");
    let survivor = finished(&stack, &command, &ids[2]).await;
    assert_eq!(survivor.status(), Some(&CommandInvocationStatus::Success));
    let cancelled = finished(&stack, &command, &ids[1]).await;
    assert_eq!(cancelled.status(), Some(&CommandInvocationStatus::Cancelled));
    let lost =
        stack.ssm().get_command_invocation().command_id(&command).instance_id(&ids[0]).send().await.expect("get");
    assert_ne!(lost.status(), Some(&CommandInvocationStatus::Success), "its work died with its instance");
}

/// Gap 14: an instance listed as impaired fails its instance status check
/// as DescribeInstanceStatus reports it, through the adapter the reconciler
/// uses, and its agent (unreachable) reports ConnectionLost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_instance_fails_its_status_check_and_its_agent_is_lost() {
    let stack = MotoStack::start().await;
    let instances = launch(&stack, 2, None).await;
    wait_online(&stack, &instances).await;
    let ports = stack.ports();
    let checks = ports.cloud.fleet.status_checks(&instances).await.expect("status");
    assert_eq!(checks.len(), 2, "{checks:?}");
    assert!(checks.iter().all(|(_, impaired)| !impaired), "moto's checks pass: {checks:?}");

    std::fs::create_dir_all(&stack.scratch).expect("scratch");
    std::fs::write(stack.scratch.join("impaired"), format!("{}\n", instances[0])).expect("impair");
    let status = stack.ec2().describe_instance_status().instance_ids(&instances[0]).send().await.expect("status");
    let summary = status.instance_statuses()[0].instance_status().expect("instance status");
    assert_eq!(summary.status().map(|s| s.as_str()), Some("impaired"));
    assert_eq!(summary.details()[0].status().map(|s| s.as_str()), Some("failed"));
    assert!(summary.details()[0].impaired_since().is_some());
    // An unknown id fails DescribeInstanceStatus as a whole; the others are still checked.
    let mut asked = vec!["i-0123456789abcdef0".to_string()];
    asked.extend(instances.iter().cloned());
    let mut checks = ports.cloud.fleet.status_checks(&asked).await.expect("status");
    checks.sort();
    let mut expected = vec![(instances[0].clone(), true), (instances[1].clone(), false)];
    expected.sort();
    assert_eq!(checks, expected);
    let online = ports.cloud.commands.online_agents(&instances).await.expect("agents");
    assert_eq!(online, vec![instances[1].clone()], "the impaired instance's agent is not Online");
}

/// Gap 16: DescribeVolumes and DescribeSnapshots page as EC2 does, so the
/// adapters' paginators are exercised: a page holds MaxResults, a NextToken
/// follows while more remain, and EC2's bounds are enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_snapshots_page_by_max_results() {
    use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
    use flotilla_shared::tags;
    let stack = MotoStack::start().await;
    let ec2 = stack.ec2();
    let [managed, of_stack] = tags::scope("paged");
    let spec = |resource: ResourceType| {
        TagSpecification::builder()
            .resource_type(resource)
            .tags(Tag::builder().key(managed.0).value(managed.1).build())
            .tags(Tag::builder().key(of_stack.0).value(of_stack.1).build())
            .build()
    };
    let mut volumes = Vec::new();
    for _ in 0..7 {
        let out = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .tag_specifications(spec(ResourceType::Volume))
            .send()
            .await
            .expect("volume");
        volumes.push(out.volume_id().expect("id").to_string());
    }
    for _ in 0..6 {
        ec2.create_snapshot()
            .volume_id(&volumes[0])
            .tag_specifications(spec(ResourceType::Snapshot))
            .send()
            .await
            .expect("snapshot");
    }
    let filter = Filter::builder().name(format!("tag:{}", tags::STACK)).values("paged").build();
    let first = ec2.describe_volumes().filters(filter.clone()).max_results(5).send().await.expect("page");
    assert_eq!(first.volumes().len(), 5);
    let token = first.next_token().expect("a token while more remain").to_string();
    let second =
        ec2.describe_volumes().filters(filter.clone()).max_results(5).next_token(token).send().await.expect("page 2");
    assert_eq!(second.volumes().len(), 2);
    assert!(second.next_token().is_none());
    let snapshots =
        ec2.describe_snapshots().owner_ids("self").filters(filter.clone()).max_results(5).send().await.expect("page");
    assert_eq!(snapshots.snapshots().len(), 5);
    assert!(snapshots.next_token().is_some());
    // EC2's bounds: 5-500 for volumes, and never beside explicit ids.
    let refused = ec2.describe_volumes().max_results(4).send().await.expect_err("below 5");
    assert!(format!("{refused:?}").contains("InvalidParameterValue"), "{refused:?}");
    let refused = ec2.describe_volumes().volume_ids(&volumes[0]).max_results(5).send().await.expect_err("with ids");
    assert!(format!("{refused:?}").contains("InvalidParameterCombination"), "{refused:?}");
    // The adapters read every page.
    let ports = stack.ports();
    assert_eq!(ports.cloud.volumes.find_volumes(&tags::scope("paged")).await.expect("find").len(), 7);
    assert_eq!(ports.cloud.volumes.find_snapshots(&tags::scope("paged")).await.expect("find").len(), 6);
}

/// Gap 17: EC2 state changes and Run Command status changes reach
/// EventBridge, and a rule routes them to its SQS target as on AWS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_state_and_command_status_events_reach_eventbridge_rules() {
    let stack = MotoStack::start().await;
    let queue = stack.sqs().create_queue().queue_name("events").send().await.expect("queue");
    let queue_url = queue.queue_url().expect("url").to_string();
    stack.route_events(
        "states",
        &serde_json::json!({"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"],
                            "detail": {"state": ["running", "terminated"]}}),
        &queue_url,
    );
    stack.route_events(
        "commands",
        &serde_json::json!({"source": ["aws.ssm"], "detail-type": ["EC2 Command Invocation Status-change Notification"],
                            "detail": {"status": ["Success", "Failed"]}}),
        &queue_url,
    );
    let ids = launch(&stack, 1, None).await;
    let command_id = send(&stack, &ids, "exit 3", 30).await;
    finished(&stack, &command_id, &ids[0]).await;
    stack.ec2().terminate_instances().instance_ids(&ids[0]).send().await.expect("terminate");
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 3 && Instant::now() < deadline {
        let received = stack
            .sqs()
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .expect("receive");
        for message in received.messages() {
            let event: serde_json::Value = serde_json::from_str(message.body().unwrap_or_default()).expect("json");
            assert_eq!(event["detail"]["instance-id"], ids[0].as_str(), "{event}");
            let what = event["detail"]["state"].as_str().or(event["detail"]["status"].as_str()).unwrap_or_default();
            seen.push(format!("{} {what}", event["detail-type"].as_str().unwrap_or_default()));
            if let Some(id) = event["detail"]["command-id"].as_str() {
                assert_eq!(id, command_id);
            }
        }
    }
    assert_eq!(
        seen,
        vec![
            "EC2 Instance State-change Notification running",
            "EC2 Command Invocation Status-change Notification Failed",
            "EC2 Instance State-change Notification terminated",
        ],
        "pending and shutting-down are not routed: the rule's pattern leaves them out"
    );
}

/// EBS's "EBS Snapshot Notification" (gap 17): a completed snapshot's event
/// reaches the rule, and the reconciler's router, through the real SDK's
/// DescribeSnapshots, wakes the job whose tags the snapshot carries; another
/// tool's snapshot wakes nobody.
#[tokio::test]
async fn a_completed_snapshot_wakes_its_job_and_no_other() {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    use flotilla_shared::tags;

    let stack = MotoStack::start().await;
    let ports = stack.ports();
    let queue = stack.sqs().create_queue().queue_name("snapshot-events").send().await.expect("queue");
    let queue_url = queue.queue_url().expect("url").to_string();
    // template.yaml's SnapshotCompletedRule pattern.
    stack.route_events(
        "snapshots",
        &serde_json::json!({"source": ["aws.ec2"], "detail-type": ["EBS Snapshot Notification"],
                            "detail": {"event": ["createSnapshot"]}}),
        &queue_url,
    );
    let ec2 = stack.ec2();
    let snapshot = |job: Option<&'static str>| {
        let ec2 = ec2.clone();
        let stack_name = ports.settings.stack.clone();
        async move {
            let volume = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.expect("volume");
            // Another tool's snapshot carries its own tags, none of ours.
            let mut spec = TagSpecification::builder()
                .resource_type(ResourceType::Snapshot)
                .tags(Tag::builder().key("team").value("other-tool").build());
            if let Some(job) = job {
                for (key, value) in
                    [(tags::MANAGED_BY, tags::MANAGED_BY_VALUE), (tags::STACK, &stack_name), (tags::JOB_ID, job)]
                {
                    spec = spec.tags(Tag::builder().key(key).value(value).build());
                }
            }
            let created = ec2
                .create_snapshot()
                .volume_id(volume.volume_id().expect("id"))
                .tag_specifications(spec.build())
                .send()
                .await
                .expect("snapshot");
            created.snapshot_id().expect("id").to_string()
        }
    };
    let ours = snapshot(Some("snap-owner")).await;
    let theirs = snapshot(None).await;
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while events.len() < 2 && Instant::now() < deadline {
        let received = stack
            .sqs()
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .expect("receive");
        events.extend(received.messages().iter().map(|m| m.body().unwrap_or_default().to_string()));
    }
    assert_eq!(events.len(), 2, "one event per completed snapshot: {events:?}");
    // Each completes in its own time: in either order.
    for id in [&ours, &theirs] {
        let event = events
            .iter()
            .map(|body| serde_json::from_str::<serde_json::Value>(body).expect("json"))
            .find(|e| e["resources"][0].as_str().unwrap_or_default().ends_with(&format!(":snapshot/{id}")))
            .unwrap_or_else(|| panic!("no event for {id}: {events:?}"));
        assert_eq!(event["detail"]["result"], "succeeded");
    }
    let batch: aws_lambda_events::event::sqs::SqsEvent = serde_json::from_value(serde_json::json!({"Records":
        events.iter().enumerate().map(|(i, body)| serde_json::json!({"messageId": format!("m-{i}"), "body": body}))
            .collect::<Vec<_>>()}))
    .expect("sqs event");
    let response = flotilla_shared::handlers::reconcile_batch(&ports, batch, chrono::Duration::seconds(20), None).await;
    assert!(response.batch_item_failures.is_empty());
    let woken = stack
        .sqs()
        .receive_message()
        .queue_url(&stack.reconcile_queue)
        .max_number_of_messages(10)
        .send()
        .await
        .expect("receive");
    let wakes: Vec<serde_json::Value> =
        woken.messages().iter().map(|m| serde_json::from_str(m.body().unwrap_or_default()).expect("json")).collect();
    assert_eq!(wakes.len(), 1, "{wakes:?}");
    assert_eq!(wakes[0]["job_id"], "snap-owner");
    assert_eq!(wakes[0]["trigger"], "event");
}

/// Gap 21: one command's stdout on one instance (30 s execution timeout).
async fn on(stack: &MotoStack, instance: &str, script: &str) -> String {
    let command_id = send(stack, &[instance.to_string()], script, 30).await;
    let mut out = finished(stack, &command_id, instance).await;
    // Delayed: the agent of an instance that just started is not Online yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.status() == Some(&CommandInvocationStatus::Delayed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        out = finished(stack, &command_id, instance).await;
    }
    assert_eq!(
        out.status(),
        Some(&CommandInvocationStatus::Success),
        "{script}: {}",
        out.standard_error_content().unwrap_or_default()
    );
    out.standard_output_content().unwrap_or_default().to_string()
}

async fn new_volume(stack: &MotoStack, instance: &str) -> String {
    let ec2 = stack.ec2();
    let volume = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.expect("volume");
    let id = volume.volume_id().expect("id").to_string();
    ec2.attach_volume().volume_id(&id).instance_id(instance).device("/dev/sdf").send().await.expect("attach");
    id
}

async fn attachment_state(stack: &MotoStack, volume: &str) -> Option<String> {
    let out = stack.ec2().describe_volumes().volume_ids(volume).send().await.expect("describe");
    out.volumes()[0].attachments().first().and_then(|a| a.state()).map(|s| s.as_str().to_string())
}

/// Gap 21: each instance is its own PID and mount namespace. Its volume is
/// a device under the Nitro names inside it only; a process a command leaves
/// running lives on between commands; the host's /data is never touched; a
/// detach while mounted stays `busy` until the unmount; stopping the instance
/// kills what ran in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_has_its_own_devices_processes_and_mounts() {
    let stack = MotoStack::start().await;
    let host_data = std::path::Path::new("/data").exists();
    let ids = launch(&stack, 2, None).await;
    let (a, b) = (&ids[0], &ids[1]);
    let volume = new_volume(&stack, a).await;
    let link = format!("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{}", volume.replace('-', ""));
    let out = on(
        &stack,
        a,
        &format!(
            "readlink -f {link}; mkfs -t ext4 -q {link}; mkdir -p /data; mount {link} /data; echo x > /data/x\n\
             setsid sleep 600 </dev/null >/dev/null 2>&1 &\necho pid1 $(cat /proc/1/comm)"
        ),
    )
    .await;
    assert!(out.starts_with("/dev/nvme1n1\n") && out.contains("pid1 python"), "{out}");
    assert_eq!(on(&stack, b, &format!("ls /dev/disk/by-id/; [ -e {link} ] || echo absent")).await, "absent\n");
    let out = on(
        &stack,
        a,
        "pgrep -x sleep >/dev/null && echo alive; cat /data/x; ls -A \"$HOME/../.ebs\" \"$HOME/../.ns\" | grep -v : | grep . || echo hidden; ps -e --no-headers | wc -l",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["alive", "x", "hidden"], "the store and other roots are not the instance's: {out}");
    assert!(lines[3].trim().parse::<u32>().expect("count") < 10, "a PID namespace of its own: {out}");
    assert_eq!(std::path::Path::new("/data").exists(), host_data, "the host's /data was touched");

    let detach = stack.ec2().detach_volume().volume_id(&volume).send().await.expect("detach");
    assert_eq!(detach.state().map(|s| s.as_str()), Some("detaching"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(attachment_state(&stack, &volume).await.as_deref(), Some("busy"), "mounted: stuck busy");
    on(&stack, a, "umount /data").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while attachment_state(&stack, &volume).await.is_some() {
        assert!(Instant::now() < deadline, "never detached after the unmount");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    stack.ec2().stop_instances().instance_ids(a).send().await.expect("stop");
    stack.ec2().start_instances().instance_ids(a).send().await.expect("start");
    assert_eq!(on(&stack, a, "pgrep -x sleep || echo none").await, "none\n", "the stop killed it");
}

/// Gap 21: a snapshot holds the blocks its volume had when CreateSnapshot
/// ran, even while the volume is mounted and written: what was synced
/// before is in it, what was written after is not (crash consistent: its
/// ext4 journal is replayed on mount). The budget refuses past its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_the_volume_at_the_call_and_the_store_has_a_budget() {
    let stack = MotoStack::start_with(1, &[("FLOTILLA_EMU_EBS_BUDGET_MIB", "128")]).await;
    let ids = launch(&stack, 2, None).await;
    let volume = new_volume(&stack, &ids[0]).await;
    let link = format!("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{}", volume.replace('-', ""));
    on(
        &stack,
        &ids[0],
        &format!("mkfs -t ext4 -q {link}; mkdir -p /data; mount {link} /data; echo before > /data/before; sync"),
    )
    .await;
    let ec2 = stack.ec2();
    let snapshot = ec2.create_snapshot().volume_id(&volume).send().await.expect("snapshot");
    let snapshot = snapshot.snapshot_id().expect("id").to_string();
    on(&stack, &ids[0], "echo after > /data/after; sync").await;
    let restored = ec2
        .create_volume()
        .availability_zone("us-east-1a")
        .snapshot_id(&snapshot)
        .send()
        .await
        .expect("restore")
        .volume_id()
        .expect("id")
        .to_string();
    ec2.attach_volume().volume_id(&restored).instance_id(&ids[1]).device("/dev/sdf").send().await.expect("attach");
    let link = format!("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{}", restored.replace('-', ""));
    let out = on(&stack, &ids[1], &format!("mkdir -p /data; mount {link} /data; ls /data")).await;
    assert!(out.contains("before") && !out.contains("after"), "{out}");

    // Past 128 MiB of real bytes (an ext4 journal alone is 32 MiB): no volume and no snapshot more.
    on(&stack, &ids[0], "head -c 200000000 /dev/urandom > /data/big; sync").await;
    let err = ec2.create_snapshot().volume_id(&volume).send().await.expect_err("over budget");
    assert_eq!(err.into_service_error().meta().code(), Some("SnapshotLimitExceeded"));
    let err = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.expect_err("over budget");
    assert_eq!(err.into_service_error().meta().code(), Some("VolumeLimitExceeded"));
    // Deleting frees them: the bytes go with the volume.
    on(&stack, &ids[0], "rm /data/big; umount /data").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while attachment_state(&stack, &volume).await.is_some() {
        let _ = ec2.detach_volume().volume_id(&volume).send().await;
        assert!(Instant::now() < deadline, "never detached");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ec2.delete_volume().volume_id(&volume).send().await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(err) = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await {
        assert!(Instant::now() < deadline, "still over budget after the delete: {err:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
