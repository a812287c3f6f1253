//! SSM Run Command behind `Commands`.

use std::collections::VecDeque;

use async_trait::async_trait;
use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter, PingStatus};

use super::cloud_error;
use crate::error::RetryClass;
use crate::ports::{
    CloudResult, CommandRequest, Commands, InvocationView, MAX_AGENTS_PER_PAGE, MAX_AGENT_IDS_PER_LOOKUP,
};
use crate::states::CommandStatus;

pub struct SsmCommands {
    pub ssm: aws_sdk_ssm::Client,
}

/// What aws:runShellScript puts between stdout and stderr in a plugin's Output.
const ERROR_SEPARATOR: &str = "\n----------ERROR-------\n";

/// Refused agent lookups halved per call: one unknown id among 100 is
/// isolated in 7; many cost at most twice this in extra lookups.
const MAX_HALVINGS_PER_CALL: usize = 8;

/// SSM's Comment field holds at most 100 characters.
const MAX_COMMENT: usize = 100;

impl SsmCommands {
    /// The Online agents among at most 100 ids, every page followed.
    async fn agents(&self, ids: &[String]) -> CloudResult<Vec<String>> {
        let filter = InstanceInformationStringFilter::builder()
            .key("InstanceIds")
            .set_values(Some(ids.to_vec()))
            .build()
            .map_err(|e| crate::error::CloudError::Invalid(e.to_string()))?;
        let mut agents = self
            .ssm
            .describe_instance_information()
            .filters(filter)
            .max_results(MAX_AGENTS_PER_PAGE as i32)
            .into_paginator()
            .items()
            .send();
        let mut online = Vec::new();
        while let Some(agent) = agents.next().await {
            let agent = agent.map_err(|e| cloud_error("ssm", "DescribeInstanceInformation", e))?;
            if agent.ping_status() == Some(&PingStatus::Online) {
                if let Some(id) = agent.instance_id() {
                    online.push(id.to_string());
                }
            }
        }
        Ok(online)
    }
}

#[async_trait]
impl Commands for SsmCommands {
    async fn online_agents(&self, instance_ids: &[String]) -> CloudResult<Vec<String>> {
        let mut online = Vec::new();
        let mut lookups: VecDeque<&[String]> = instance_ids.chunks(MAX_AGENT_IDS_PER_LOOKUP).collect();
        let mut halvings = 0;
        while let Some(ids) = lookups.pop_front() {
            match self.agents(ids).await {
                Ok(found) => online.extend(found),
                // One id SSM does not take (AWS: "an instance ID that is not
                // valid ... you receive an error") refuses the whole lookup:
                // halve it, so the rest are still seen, within a bound; what
                // is still refused counts as not Online yet, for a later pass.
                Err(err) if err.class() == RetryClass::NotYetVisible => {
                    if ids.len() > 1 && halvings < MAX_HALVINGS_PER_CALL {
                        halvings += 1;
                        let (left, right) = ids.split_at(ids.len() / 2);
                        lookups.extend([left, right]);
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(online)
    }

    async fn send(&self, request: &CommandRequest) -> CloudResult<String> {
        let comment: String = request.comment.chars().take(MAX_COMMENT).collect();
        let response = self
            .ssm
            .send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(request.instance_ids.clone()))
            .parameters("commands", request.lines.clone())
            .parameters("executionTimeout", vec![request.timeout_seconds.to_string()])
            // An agent that is away (ConnectionLost) gets the command when it
            // returns, if before this; never an hour later (the default).
            .timeout_seconds(crate::ports::delivery_timeout_seconds(request.timeout_seconds) as i32)
            .comment(comment)
            // Each shard's step is its own: one failing must never stop the
            // command reaching the others. SSM's defaults would (MaxErrors
            // 0: "the system stops sending the command to additional
            // targets" after one error, and those end Terminated).
            .max_errors("100%")
            .max_concurrency("100%")
            .output_s3_bucket_name(&request.output_bucket)
            .output_s3_key_prefix(&request.output_prefix)
            // The agent uploads to S3 only when the step ends; CloudWatch
            // Logs gets the output as it is written, for `logs --follow`.
            .set_cloud_watch_output_config(request.log_group.as_ref().map(|group| {
                aws_sdk_ssm::types::CloudWatchOutputConfig::builder()
                    .cloud_watch_output_enabled(true)
                    .cloud_watch_log_group_name(group)
                    .build()
            }))
            // No ClientToken exists for SendCommand: a retry after a lost
            // reply would run the work twice. The next pass looks the
            // command up by its comment before it sends again.
            .customize()
            .config_override(
                aws_sdk_ssm::config::Builder::default()
                    .retry_config(aws_sdk_ssm::config::retry::RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| cloud_error("ssm", "SendCommand", e))?;
        Ok(response.command().and_then(|c| c.command_id()).unwrap_or_default().to_string())
    }

    async fn find_by_comment(&self, instance_id: &str, comment: &str) -> CloudResult<Option<String>> {
        let comment: String = comment.chars().take(MAX_COMMENT).collect();
        let mut token: Option<String> = None;
        loop {
            let response = self
                .ssm
                .list_commands()
                .instance_id(instance_id)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| cloud_error("ssm", "ListCommands", e))?;
            if let Some(found) = response.commands().iter().find(|c| c.comment() == Some(comment.as_str())) {
                return Ok(found.command_id().map(str::to_string));
            }
            token = response.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(None);
            }
        }
    }

    async fn invocations(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<Vec<InvocationView>> {
        // One paginated list with Details: status, exit code and the first
        // 2,500 characters of output for 50 invocations a call. Only a failed
        // or timed-out one is read again with Get: its 24,000 characters hold
        // the error.
        let mut pages = self
            .ssm
            .list_command_invocations()
            .command_id(command_id)
            .details(true)
            .max_results(50)
            .into_paginator()
            .send();
        let mut views = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| cloud_error("ssm", "ListCommandInvocations", e))?;
            for invocation in page.command_invocations() {
                let (Some(instance_id), Some(status)) = (invocation.instance_id(), invocation.status()) else {
                    continue;
                };
                if !instance_ids.iter().any(|id| id == instance_id) {
                    continue;
                }
                let finished = !matches!(
                    status,
                    CommandInvocationStatus::Pending
                        | CommandInvocationStatus::InProgress
                        | CommandInvocationStatus::Delayed
                        | CommandInvocationStatus::Cancelling
                );
                let plugin = invocation.command_plugins().first();
                let output = plugin.and_then(|p| p.output()).unwrap_or_default();
                let (stdout, stderr) = output.split_once(ERROR_SEPARATOR).unwrap_or((output, ""));
                views.push(InvocationView {
                    instance_id: instance_id.to_string(),
                    status: invocation_status(
                        status,
                        invocation.status_details(),
                        plugin.is_some_and(|p| p.response_start_date_time().is_some()),
                    ),
                    exit_code: finished.then(|| plugin.map_or(-1, |p| p.response_code())),
                    stdout: if finished { stdout.to_string() } else { String::new() },
                    stderr: if finished { stderr.to_string() } else { String::new() },
                    output_uri: invocation.standard_output_url().filter(|u| !u.is_empty()).map(str::to_string),
                });
            }
        }
        for view in views.iter_mut().filter(|v| matches!(v.status.as_str(), "Failed" | "TimedOut")) {
            let detail = self
                .ssm
                .get_command_invocation()
                .command_id(command_id)
                .instance_id(&view.instance_id)
                .send()
                .await
                .map_err(|e| cloud_error("ssm", "GetCommandInvocation", e))?;
            view.exit_code = Some(detail.response_code());
            view.stdout = detail.standard_output_content().unwrap_or_default().to_string();
            view.stderr = detail.standard_error_content().unwrap_or_default().to_string();
        }
        Ok(views)
    }

    async fn cancel(&self, command_id: &str, instance_ids: &[String]) -> CloudResult<()> {
        let call = self.ssm.cancel_command().command_id(command_id).set_instance_ids(Some(instance_ids.to_vec()));
        match call.send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = cloud_error("ssm", "CancelCommand", e);
                // Finished commands cannot be cancelled; that is fine.
                if matches!(err.class(), RetryClass::NotFound | RetryClass::Permanent) {
                    tracing::info!(%command_id, error = %err, "cancel not needed");
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }
}

/// An invocation's status, with what only StatusDetails tells about a step
/// that never started. Undeliverable and Terminated ("the parent command
/// exceeded its MaxErrors limit and subsequent command invocations were
/// canceled") never reached the instance; Delivery Timed Out is also what
/// SSM says of a step that started and whose agent then went silent
/// ("Understanding command statuses", Systems Manager User Guide), so it
/// counts as never delivered only when its plugin never started
/// (ResponseStartDateTime unset). Anything else keeps its Status: a step
/// that may have run is never retried as if it had not. The guide writes
/// the details with spaces, the events without: both are read.
fn invocation_status(status: &CommandInvocationStatus, details: Option<&str>, started: bool) -> CommandStatus {
    let details = details.unwrap_or_default().replace(' ', "");
    match details.as_str() {
        "DeliveryTimedOut" if !started => CommandStatus::DeliveryTimedOut,
        "Undeliverable" => CommandStatus::Undeliverable,
        "Terminated" => CommandStatus::Terminated,
        _ => CommandStatus::from(status.as_str()),
    }
}
