//! AWS adapters behind the ports, through the real SDK. Clients are built
//! once per cold start from one `SdkConfig`.

pub mod ec2;
pub mod s3;
pub mod sqs;
pub mod ssm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::error::{CloudError, RetryClass, SpecError};
use crate::ports::{Accounts, Cloud, CloudResult, Ports, SystemClock};
use crate::settings::Settings;

/// Load the SDK config from the environment. `AWS_ENDPOINT_URL` points every
/// client at an emulator such as moto. Adaptive retry: the SDK backs off
/// throttling with a client-side rate limiter shared by every call of the
/// process, before an error ever reaches the reconciler.
pub async fn load_config() -> SdkConfig {
    config_loader().load().await
}

/// The loader behind `load_config`, for callers that add to it (tests give
/// moto's endpoint and credentials).
pub fn config_loader() -> aws_config::ConfigLoader {
    use crate::fence::{ATTEMPT_TIMEOUT_SECONDS, OPERATION_TIMEOUT_SECONDS};
    let seconds = |s: i64| std::time::Duration::from_secs(s.unsigned_abs());
    // Bounded calls: a pass starts a call only if it ends before the lease
    // does (`reconcile::fence`). A timeout does not undo a call's effect on
    // AWS's side; the takeover rule and the step guard cover that.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(seconds(ATTEMPT_TIMEOUT_SECONDS))
        .operation_timeout(seconds(OPERATION_TIMEOUT_SECONDS))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::adaptive().with_max_attempts(5))
        .timeout_config(timeouts);
    // Lambda puts the function's credentials and Region in the environment,
    // where the default chains would find them first anyway. Naming them
    // skips building the rest of those chains (web identity with its own STS
    // client, ECS, IMDS), which was a large part of the SDK's start-up.
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID").is_some() && set("AWS_SECRET_ACCESS_KEY").is_some() {
        loader = loader.credentials_provider(aws_config::environment::EnvironmentVariableCredentialsProvider::new());
    }
    if let Some(region) = set("AWS_REGION").or_else(|| set("AWS_DEFAULT_REGION")) {
        loader = loader.region(aws_config::Region::new(region));
    }
    match amazon_roots_client() {
        Some(client) => loader.http_client(client),
        None => loader,
    }
}

/// The roots of Amazon Trust Services (Amazon Root CA 1-4, and Starfield
/// Services Root G2, which cross-signs them), copied from Debian's
/// ca-certificates. Every endpoint Flotilla calls (EC2, SSM, S3, SQS, STS)
/// presents a certificate that chains to them.
const AMAZON_TRUST_ROOTS: &str = include_str!("amazon_trust_roots.pem");

/// The SDK's own HTTPS client (hyper, rustls with aws-lc), trusting only
/// Amazon's roots: reading and parsing the platform's ~140 roots was most
/// of a cold start (9 of 16 ms of CPU). `FLOTILLA_TLS_ROOTS=native` keeps
/// the platform's store, for a proxy or endpoint with another CA.
fn amazon_roots_client() -> Option<aws_sdk_ec2::config::SharedHttpClient> {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
    if std::env::var("FLOTILLA_TLS_ROOTS").is_ok_and(|v| v == "native") {
        return None;
    }
    let store = TrustStore::empty().with_pem_certificate(AMAZON_TRUST_ROOTS.as_bytes());
    let context = TlsContext::builder().with_trust_store(store).build().ok()?;
    Some(
        aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(context)
            .build_https(),
    )
}

/// Jobs with a `role_arn` act in the target account through STS AssumeRole.
/// Clients are cached per role and external id: a warm Lambda reuses them,
/// and their identity cache refreshes the temporary credentials.
/// A role ARN and its external id.
type RoleKey = (String, Option<String>);

pub struct StsAccounts {
    base: SdkConfig,
    cache: Mutex<HashMap<RoleKey, Arc<Cloud>>>,
}

impl StsAccounts {
    pub fn new(base: SdkConfig) -> Self {
        StsAccounts { base, cache: Mutex::new(HashMap::new()) }
    }
}

#[async_trait]
impl Accounts for StsAccounts {
    async fn assume(&self, role_arn: &str, external_id: Option<&str>, job_id: &str) -> CloudResult<Arc<Cloud>> {
        let key = (role_arn.to_string(), external_id.map(str::to_string));
        if let Some(cloud) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(cloud);
        }
        let mut builder = aws_config::sts::AssumeRoleProvider::builder(role_arn)
            // RoleSessionName: at most 64 characters of [\w+=,.@-].
            .session_name(format!("flotilla-{job_id}").chars().take(64).collect::<String>())
            .configure(&self.base);
        if let Some(external_id) = external_id {
            builder = builder.external_id(external_id);
        }
        let provider = builder.build().await;
        // Resolve once now, so a refused role fails the job with its reason
        // instead of surfacing later as a transport error on every call.
        if let Err(err) = provider.provide_credentials().await {
            let message = DisplayErrorContext(&err).to_string();
            // A refusal is permanent; anything else (a network blip) is waited
            // out, bounded by the job's deadline.
            if message.contains("AccessDenied") || message.contains("not authorized") {
                return Err(CloudError::api("sts", "AssumeRole", "AccessDenied", &message));
            }
            return Err(CloudError::classified("sts", "AssumeRole", "", &message, Some(RetryClass::Transient)));
        }
        let config = self.base.to_builder().credentials_provider(SharedCredentialsProvider::new(provider)).build();
        let cloud = Arc::new(cloud(&config));
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(key, cloud.clone());
        }
        Ok(cloud)
    }
}

fn cloud(config: &SdkConfig) -> Cloud {
    let ec2 = aws_sdk_ec2::Client::new(config);
    let ssm = aws_sdk_ssm::Client::new(config);
    Cloud {
        fleet: Box::new(ec2::Ec2Fleet { ec2: ec2.clone(), ssm: ssm.clone() }),
        volumes: Box::new(ec2::Ec2Volumes { ec2 }),
        commands: Box::new(ssm::SsmCommands { ssm }),
    }
}

/// Everything the functions read from their environment.
#[derive(Debug, Clone)]
pub struct Environment {
    pub bucket: String,
    pub reconcile_queue_url: String,
    /// The reconcile queue's DLQ, which the reaper drains onto the jobs.
    pub reconcile_dlq_url: Option<String>,
    /// The notify queue: without it, no job events are published.
    pub notify_queue_url: Option<String>,
    pub settings: Settings,
}

impl Environment {
    pub fn from_env() -> Result<Self, SpecError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| SpecError::new(format!("environment variable {name} is not set")))
        };
        let mut settings = Settings::default();
        let number = |name: &str, default: u32| match std::env::var(name) {
            Ok(value) => {
                value.parse().map_err(|_| SpecError::new(format!("{name} must be a whole number, got {value:?}")))
            }
            Err(_) => Ok(default),
        };
        settings.poll_delay_seconds = number("FLOTILLA_POLL_DELAY_SECONDS", settings.poll_delay_seconds)?;
        settings.safety_poll_seconds = Some(number("FLOTILLA_SAFETY_POLL_SECONDS", settings.poll_delay_seconds)?);
        settings.agent_timeout_seconds = number("FLOTILLA_AGENT_TIMEOUT_SECONDS", settings.agent_timeout_seconds)?;
        settings.health_check_seconds = number("FLOTILLA_HEALTH_CHECK_SECONDS", settings.health_check_seconds)?;
        settings.impaired_timeout_seconds =
            number("FLOTILLA_IMPAIRED_TIMEOUT_SECONDS", settings.impaired_timeout_seconds)?;
        settings.reaper_mark_grace_seconds =
            number("FLOTILLA_REAPER_MARK_GRACE_SECONDS", settings.reaper_mark_grace_seconds)?;
        settings.cleanup_grace_minutes = number("FLOTILLA_CLEANUP_GRACE_MINUTES", settings.cleanup_grace_minutes)?;
        if !(1..=60).contains(&settings.cleanup_grace_minutes) {
            return Err(SpecError::new(format!(
                "FLOTILLA_CLEANUP_GRACE_MINUTES must be 1-60, got {}",
                settings.cleanup_grace_minutes
            )));
        }
        settings.reaper_dry_run = std::env::var("FLOTILLA_REAPER_DRY_RUN").is_ok_and(|v| v == "true");
        settings.launch_admission = std::env::var("FLOTILLA_LAUNCH_ADMISSION").is_ok_and(|v| v == "true");
        settings.step_log_group = std::env::var("FLOTILLA_STEP_LOG_GROUP").ok().filter(|g| !g.trim().is_empty());
        // Required: a default would let two deployments share one scope.
        settings.stack = var("FLOTILLA_STACK")?;
        let optional = |name: &str| match std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
            Some(value) => value
                .parse::<u32>()
                .map(Some)
                .map_err(|_| SpecError::new(format!("{name} must be a whole number, got {value:?}"))),
            None => Ok(None),
        };
        settings.limits.max_instances_per_job = optional("FLOTILLA_MAX_INSTANCES_PER_JOB")?;
        settings.limits.max_deadline_minutes = optional("FLOTILLA_MAX_DEADLINE_MINUTES")?;
        settings.limits.max_debug_hold_minutes = optional("FLOTILLA_MAX_DEBUG_HOLD_MINUTES")?;
        settings.limits.max_instances_total = optional("FLOTILLA_MAX_INSTANCES_TOTAL")?.filter(|n| *n > 0);
        settings.limits.allowed_instance_types = std::env::var("FLOTILLA_ALLOWED_INSTANCE_TYPES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
        settings.account_id = std::env::var("FLOTILLA_ACCOUNT_ID").ok().filter(|a| !a.trim().is_empty());
        // Lambda sets AWS_REGION.
        settings.region = std::env::var("AWS_REGION").ok().filter(|r| !r.trim().is_empty());
        settings.reaper_roles = std::env::var("FLOTILLA_REAPER_ROLE_ARNS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .collect();
        settings.worker_instance_profile =
            std::env::var("FLOTILLA_WORKER_INSTANCE_PROFILE").ok().filter(|p| !p.trim().is_empty());
        Ok(Environment {
            bucket: var("FLOTILLA_BUCKET")?,
            reconcile_queue_url: var("FLOTILLA_RECONCILE_QUEUE_URL")?,
            reconcile_dlq_url: std::env::var("FLOTILLA_RECONCILE_DLQ_URL").ok().filter(|u| !u.trim().is_empty()),
            notify_queue_url: std::env::var("FLOTILLA_NOTIFY_QUEUE_URL").ok().filter(|u| !u.trim().is_empty()),
            settings,
        })
    }
}

/// The real ports, wired from one config.
pub fn ports(config: &SdkConfig, env: &Environment) -> Ports {
    // One client per service: each builds its endpoint resolver and connector.
    let sqs = aws_sdk_sqs::Client::new(config);
    Ports {
        cloud: cloud(config),
        accounts: Box::new(StsAccounts::new(config.clone())),
        ledger: Box::new(s3::S3Ledger::new(s3_client(config), env.bucket.clone())),
        queue: Box::new(sqs::SqsWakeQueue { sqs: sqs.clone(), queue_url: env.reconcile_queue_url.clone() }),
        notices: env.notify_queue_url.as_ref().map(|queue_url| {
            Box::new(sqs::SqsNotices { sqs: sqs.clone(), queue_url: queue_url.clone() })
                as Box<dyn crate::ports::Notices>
        }),
        dead_letters: env.reconcile_dlq_url.as_ref().map(|dlq_url| {
            Box::new(sqs::SqsDeadLetters {
                sqs: sqs.clone(),
                dlq_url: dlq_url.clone(),
                source_url: env.reconcile_queue_url.clone(),
            }) as Box<dyn crate::ports::DeadLetters>
        }),
        clock: Box::new(SystemClock),
        settings: env.settings.clone(),
    }
}

/// S3 with path-style addressing when an endpoint is overridden: emulators on
/// 127.0.0.1 have no per-bucket host names.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let path_style = config.endpoint_url().is_some() || std::env::var("AWS_ENDPOINT_URL_S3").is_ok();
    let s3_config = aws_sdk_s3::config::Builder::from(config).force_path_style(path_style).build();
    aws_sdk_s3::Client::from_conf(s3_config)
}

/// Keep the AWS error code, and classify it the way the SDK's own retry
/// classifiers do (transport errors, 5xx, its lists of throttling and
/// transient codes) before the domain table decides the rest.
pub fn cloud_error<E>(service: &'static str, operation: &'static str, err: SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
    let code = err.code().unwrap_or_default().to_string();
    let message = match err.message() {
        Some(message) => message.to_string(),
        None => DisplayErrorContext(&err).to_string(),
    };
    let sdk_class = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Some(RetryClass::Transient)
        }
        _ if THROTTLING_ERRORS.contains(&code.as_str()) => Some(RetryClass::Throttled),
        _ if TRANSIENT_ERRORS.contains(&code.as_str()) => Some(RetryClass::Transient),
        SdkError::ServiceError(service_error) if service_error.raw().status().as_u16() >= 500 => {
            Some(RetryClass::Transient)
        }
        _ => None,
    };
    let code = if code.is_empty() {
        match &err {
            SdkError::TimeoutError(_) => "timeout".to_string(),
            SdkError::DispatchFailure(_) => "dispatch".to_string(),
            SdkError::ResponseError(_) => "response".to_string(),
            _ => String::new(),
        }
    } else {
        code
    };
    CloudError::classified(service, operation, &code, &message, sdk_class)
}
