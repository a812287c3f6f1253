//! Where the deployment is. In order: `--stack NAME` (or FLOTILLA_STACK_NAME)
//! reads a CloudFormation stack's outputs; else `.flotilla/local.env` (what
//! `make local-up` writes) when it exists; else `stack = NAME` in the config
//! file (`$XDG_CONFIG_HOME/flotilla/config`, `~/.config/flotilla/config`);
//! else the environment (FLOTILLA_BUCKET, FLOTILLA_JOBS_QUEUE_URL, ...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The stack outputs the CLI reads, and the variable each stands for when
/// the deployment comes from the environment.
pub const OUTPUTS: [(&str, &str); 8] = [
    ("JobsBucketName", "FLOTILLA_BUCKET"),
    ("JobsQueueUrl", "FLOTILLA_JOBS_QUEUE_URL"),
    ("ReconcileQueueUrl", "FLOTILLA_RECONCILE_QUEUE_URL"),
    ("NotifyQueueUrl", "FLOTILLA_NOTIFY_QUEUE_URL"),
    ("JobsDeadLetterQueueUrl", "FLOTILLA_JOBS_DLQ_URL"),
    ("ReconcileDeadLetterQueueUrl", "FLOTILLA_RECONCILE_DLQ_URL"),
    ("NotifyDeadLetterQueueUrl", "FLOTILLA_NOTIFY_DLQ_URL"),
    ("StepLogGroupName", "FLOTILLA_STEP_LOG_GROUP"),
];

/// The queues with a dead-letter queue.
pub const QUEUES: [&str; 3] = ["jobs", "reconcile", "notify"];

/// Which deployment: a stack, or the environment (with what was loaded into it).
pub enum Choice {
    Stack(String),
    Environment(String),
}

/// Pick the deployment (see the module's comment), loading the env file
/// into the environment when it is the one. Before any thread starts:
/// it may set environment variables.
pub fn choose(stack: Option<&str>, env_file: &Path) -> Result<Choice> {
    if let Some(stack) = stack {
        return Ok(Choice::Stack(stack.to_string()));
    }
    if env_file.exists() {
        load_env_file(env_file)?;
        return Ok(Choice::Environment(env_file.display().to_string()));
    }
    if let Some(stack) = configured_stack() {
        return Ok(Choice::Stack(stack));
    }
    Ok(Choice::Environment("the environment".into()))
}

/// A deployment: the AWS configuration and its resources by variable name.
pub struct Deployment {
    pub config: aws_config::SdkConfig,
    values: BTreeMap<&'static str, String>,
    /// Where the values came from, for messages.
    pub source: String,
}

impl Deployment {
    /// Read the deployment `choose` picked.
    pub async fn find(choice: &Choice) -> Result<Self> {
        let config = flotilla_shared::aws::load_config().await;
        match choice {
            Choice::Stack(stack) => Self::from_stack(&config, stack).await,
            Choice::Environment(source) => Ok(Self::from_env(config, source.clone())),
        }
    }

    /// DescribeStacks: every output the CLI reads, named as in template.yaml.
    pub async fn from_stack(config: &aws_config::SdkConfig, stack: &str) -> Result<Self> {
        let cfn = aws_sdk_cloudformation::Client::new(config);
        let found = cfn.describe_stacks().stack_name(stack).send().await.map_err(|e| {
            let region = config.region().map_or("no region".to_string(), ToString::to_string);
            anyhow::anyhow!(
                "reading stack {stack} in {region}: {} (set AWS_REGION or AWS_PROFILE to the stack's account and Region)",
                aws_sdk_cloudformation::error::DisplayErrorContext(e)
            )
        })?;
        let outputs: BTreeMap<String, String> = found
            .stacks()
            .first()
            .map(|s| {
                s.outputs()
                    .iter()
                    .filter_map(|o| Some((o.output_key()?.to_string(), o.output_value()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let mut values = BTreeMap::new();
        for (output, variable) in OUTPUTS {
            if let Some(value) = outputs.get(output) {
                values.insert(variable, value.clone());
            }
        }
        if values.is_empty() {
            bail!("stack {stack} has none of Flotilla's outputs ({}): is it a Flotilla stack?", output_names());
        }
        Ok(Deployment { config: config.clone(), values, source: format!("stack {stack}") })
    }

    /// The variables of OUTPUTS from the environment.
    pub fn from_env(config: aws_config::SdkConfig, source: String) -> Self {
        let values = OUTPUTS.iter().filter_map(|(_, v)| Some((*v, std::env::var(v).ok()?))).collect();
        Deployment { config, values, source }
    }

    fn value(&self, variable: &'static str) -> Result<&str> {
        let output = OUTPUTS.iter().find(|(_, v)| *v == variable).map_or("", |(o, _)| *o);
        self.values.get(variable).map(String::as_str).with_context(|| {
            format!(
                "{} gives no {variable} (stack output {output}): use --stack NAME, run `make local-up`, or export it",
                self.source
            )
        })
    }

    pub fn bucket(&self) -> Result<&str> {
        self.value("FLOTILLA_BUCKET")
    }

    pub fn jobs_queue_url(&self) -> Result<&str> {
        self.value("FLOTILLA_JOBS_QUEUE_URL")
    }

    /// The DLQ of `queue` and the queue it serves.
    pub fn dead_letters(&self, queue: &str) -> Result<(String, String)> {
        let (dlq, source) = match queue {
            "jobs" => ("FLOTILLA_JOBS_DLQ_URL", "FLOTILLA_JOBS_QUEUE_URL"),
            "reconcile" => ("FLOTILLA_RECONCILE_DLQ_URL", "FLOTILLA_RECONCILE_QUEUE_URL"),
            "notify" => ("FLOTILLA_NOTIFY_DLQ_URL", "FLOTILLA_NOTIFY_QUEUE_URL"),
            other => bail!("unknown queue `{other}`: expected one of {}", QUEUES.join(", ")),
        };
        Ok((self.value(dlq)?.to_string(), self.value(source)?.to_string()))
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        flotilla_shared::aws::s3_client(&self.config)
    }

    /// The log group running steps stream to, when the deployment has one.
    pub fn step_log_group(&self) -> Option<&str> {
        self.values.get("FLOTILLA_STEP_LOG_GROUP").map(String::as_str).filter(|g| !g.is_empty())
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.config)
    }

    /// The job records' store.
    pub fn ledger(&self) -> Result<flotilla_shared::aws::s3::S3Ledger> {
        Ok(flotilla_shared::aws::s3::S3Ledger::new(self.s3(), self.bucket()?.to_string()))
    }
}

fn output_names() -> String {
    OUTPUTS.iter().map(|(o, _)| *o).collect::<Vec<_>>().join(", ")
}

/// The config file's `stack = NAME`, if any.
fn configured_stack() -> Option<String> {
    let path = config_file()?;
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().filter_map(|l| l.split_once('=')).find(|(k, _)| k.trim() == "stack").map(|(_, v)| v.trim().to_string())
}

/// `$XDG_CONFIG_HOME/flotilla/config`, else `~/.config/flotilla/config`.
pub fn config_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("flotilla").join("config"))
}

/// KEY=VALUE lines (an optional `export ` prefix is allowed); variables
/// already set in the environment win.
fn load_env_file(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if std::env::var_os(key).is_none() {
                // `choose` runs before the runtime starts any thread.
                unsafe { std::env::set_var(key, value.trim_matches('"')) };
            }
        }
    }
    Ok(())
}
