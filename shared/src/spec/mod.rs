//! The job spec a user submits, and its validation.
//!
//! Parsing is strict (`deny_unknown_fields`) and every rejection names the
//! offending field, so a REJECTED record tells the user exactly what to fix.

use std::collections::BTreeMap;

use crate::error::SpecError;

mod model;
pub use model::*;

/// Largest fleet one job may ask for. EC2 account limits are usually lower.
pub const MAX_INSTANCES: u32 = 1000;
/// SSM `executionTimeout` accepts at most 172800 seconds (48 hours).
pub const MAX_STEP_TIMEOUT_SECONDS: u32 = 172_800;
pub const MAX_DEADLINE_MINUTES: u32 = 7 * 24 * 60;

/// The longest debug hold a spec may ask for; the deployment's
/// `MaxDebugHoldMinutes` may allow less.
pub const MAX_DEBUG_HOLD_MINUTES: u32 = 24 * 60;
/// gp3/gp2 volumes top out at 16 TiB.
pub const MAX_VOLUME_GIB: u32 = 16_384;
/// SSM SendCommand's whole request is limited; keep each script well inside it.
pub const MAX_SCRIPT_BYTES: usize = 48 * 1024;
/// EC2 allows 50 tags per resource; Flotilla puts up to 13 of its own on one
/// (a job volume with the reaper's mark), so user tags stop at 35.
pub const MAX_USER_TAGS: usize = 35;
/// Names and values of `env`, in all.
pub const MAX_ENV_BYTES: usize = 16 * 1024;
/// SQS carries at most 256 KiB; a larger body can only come another way.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Work items in one job: a manifest line each, listed at intake.
pub const MAX_WORK_ITEMS: u64 = 100_000;
/// S3's key length, and so the longest item.
pub const MAX_ITEM_BYTES: usize = 1024;

/// Parse a job body with a precise, path-qualified error.
pub fn parse(body: &str) -> Result<JobSpec, SpecError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(SpecError::new(format!(
            "the job spec is {} bytes, at most {MAX_BODY_BYTES} (SQS's limit)",
            body.len()
        )));
    }
    let de = &mut serde_json::Deserializer::from_str(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // serde reports some shape errors (an enum object with two keys) as
        // syntax: only JSON that does not parse at all is "malformed".
        let well_formed = serde_json::from_str::<serde::de::IgnoredAny>(body).is_ok();
        let message = if (inner.is_syntax() || inner.is_eof()) && !well_formed {
            format!("malformed JSON: {inner}")
        } else if inner.is_syntax() && path != "." {
            format!("{path}: expected exactly one key here ({inner})")
        } else if path == "." {
            inner.to_string()
        } else if path.starts_with("env.") && inner.to_string().contains("untagged") {
            format!("{path}: expected a string, {{\"from_ssm\": \"/parameter/path\"}} or {{\"from_secrets_manager\": \"arn:...:secret:...\"}}")
        } else if path.starts_with("fleet") && inner.to_string().contains("untagged") {
            "fleet: expected {\"count\": N} or {\"items\", \"items_per_instance_minute\", \"within_minutes\", \"max_instances\"} (items omitted when `work` gives them) with no other fields".to_string()
        } else {
            format!("{path}: {inner}")
        };
        SpecError::new(message)
    })
}

/// Check everything serde cannot: ranges, character sets, cross-field rules.
pub fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    if let Some(id) = &spec.id {
        check_job_id("id", id)?;
    }
    if let Some(name) = &spec.name {
        check_job_id("name", name)?;
    }
    check_fleet(spec)?;
    if let Some(work) = &spec.work {
        check_work(work)?;
    }
    if let Some(budget) = spec.budget_usd {
        if !budget.is_finite() || budget <= 0.0 {
            return fail(format!("budget_usd: must be a positive number, got {budget}"));
        }
    }
    if let Some(minutes) = spec.debug_hold_minutes {
        if !(1..=MAX_DEBUG_HOLD_MINUTES).contains(&minutes) {
            return fail(format!("debug_hold_minutes: must be 1-{MAX_DEBUG_HOLD_MINUTES}, got {minutes}"));
        }
        // The held instance is left to the reaper, which may have no role in
        // the other account (or none it can assume): it could run forever.
        if spec.role_arn.is_some() {
            return fail("debug_hold_minutes: not allowed with role_arn (the reaper may be unable to remove a held instance in another account)");
        }
    }
    if spec.instance_types.is_empty() {
        return fail("instance_types: at least one instance type is required");
    }
    for (i, t) in spec.instance_types.iter().enumerate() {
        if !is_instance_type(t) {
            return fail(format!("instance_types[{i}]: `{}` is not an instance type like `m7g.large`", printable(t)));
        }
    }
    match (&spec.image, &spec.launch_template) {
        (None, None) => return fail("image: an AMI id or SSM parameter is required unless launch_template is given"),
        (Some(image), _) => check_image(image)?,
        _ => {}
    }
    if let Some(lt) = &spec.launch_template {
        check_launch_template(lt)?;
    }
    for (i, s) in spec.subnet_ids.iter().enumerate() {
        check_resource_id(&format!("subnet_ids[{i}]"), s, "subnet-")?;
    }
    for (i, s) in spec.security_group_ids.iter().enumerate() {
        check_resource_id(&format!("security_group_ids[{i}]"), s, "sg-")?;
    }
    if let Some(profile) = &spec.instance_profile {
        check_instance_profile(profile)?;
    }
    if spec.tags.len() > MAX_USER_TAGS {
        return fail(format!("tags: at most {MAX_USER_TAGS} tags, got {}", spec.tags.len()));
    }
    for (key, value) in &spec.tags {
        check_tag(key, value)?;
    }
    check_volumes(&spec.volumes)?;
    if spec.on_demand_fallback && spec.market != Market::Spot {
        return fail("on_demand_fallback: only meaningful with market `spot`");
    }
    if let Some(retry) = &spec.retry {
        check_retry(retry)?;
    }
    check_env(&spec.env)?;
    if spec.deadline_minutes == 0 || spec.deadline_minutes > MAX_DEADLINE_MINUTES {
        return fail(format!("deadline_minutes: must be 1..={MAX_DEADLINE_MINUTES}, got {}", spec.deadline_minutes));
    }
    let deadline_seconds = spec.deadline_minutes.saturating_mul(60);
    if let Some(setup) = &spec.setup {
        check_command("setup", setup, deadline_seconds)?;
    }
    check_command("run", &spec.run, deadline_seconds)?;
    if let Some(hook) = &spec.before_unmount {
        check_command("before_unmount", hook, deadline_seconds)?;
    }
    check_role(spec)?;
    check_notify(spec)?;
    Ok(())
}

/// A fleet of a fixed count, or one sized from its items and rate.
fn check_fleet(spec: &JobSpec) -> Result<(), SpecError> {
    match &spec.fleet {
        FleetSpec::Count { count } => {
            if *count == 0 || *count > MAX_INSTANCES {
                return fail(format!("fleet.count: must be 1..={MAX_INSTANCES}, got {count}"));
            }
        }
        FleetSpec::Sized { items, items_per_instance_minute, within_minutes, max_instances } => {
            match (items, &spec.work) {
                (Some(0), _) => return fail("fleet.items: must be at least 1"),
                (Some(_), Some(_)) => return fail("fleet.items: omit it when `work` gives the items"),
                (None, None) => return fail("fleet.items: required unless `work` gives the items"),
                _ => {}
            }
            if !items_per_instance_minute.is_finite() || *items_per_instance_minute <= 0.0 {
                return fail(format!(
                    "fleet.items_per_instance_minute: must be a positive number, got {items_per_instance_minute}"
                ));
            }
            if *within_minutes == 0 {
                return fail("fleet.within_minutes: must be at least 1");
            }
            if *max_instances == 0 || *max_instances > MAX_INSTANCES {
                return fail(format!("fleet.max_instances: must be 1..={MAX_INSTANCES}, got {max_instances}"));
            }
        }
    }
    Ok(())
}

/// Exactly one of id or name, and a version AWS knows.
fn check_launch_template(lt: &LaunchTemplateRef) -> Result<(), SpecError> {
    match (&lt.id, &lt.name) {
        (Some(id), None) => check_resource_id("launch_template.id", id, "lt-")?,
        (None, Some(name)) => {
            check_charset("launch_template.name", name, 128, |c| c.is_ascii_alphanumeric() || "()./_-".contains(c))?
        }
        _ => return fail("launch_template: give exactly one of `id` or `name`"),
    }
    if let Some(version) = &lt.version {
        if !(version == "$Latest" || version == "$Default" || version.parse::<u64>().is_ok()) {
            return fail(format!(
                "launch_template.version: expected a number, `$Latest` or `$Default`, got `{}`",
                printable(version)
            ));
        }
    }
    Ok(())
}

/// Names bash takes, values within SendCommand's cap.
fn check_env(env: &BTreeMap<String, EnvValue>) -> Result<(), SpecError> {
    for (key, value) in env {
        let ok = !key.is_empty()
            && key.len() <= 128
            && key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return fail(format!("env: `{}` is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)", printable(key)));
        }
        if key.starts_with("FLOTILLA_") || key.starts_with("AWS_SSM_") {
            return fail(format!("env.{key}: the FLOTILLA_ and AWS_SSM_ prefixes are reserved"));
        }
        // Readonly in bash (assigning them fails every step, unmount
        // included), or read by bash itself before any step runs.
        if ["UID", "EUID", "PPID", "BASHOPTS", "SHELLOPTS", "BASH_VERSINFO", "BASH_ENV", "ENV", "IFS"]
            .contains(&key.as_str())
        {
            return fail(format!("env.{key}: a name bash reserves; choose another"));
        }
        check_env_value(key, value)?;
    }
    // The environment travels in every SendCommand, whose parameters are capped.
    let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.text().len()).sum();
    if env_bytes > MAX_ENV_BYTES {
        return fail(format!("env: {env_bytes} bytes in all, at most {MAX_ENV_BYTES}"));
    }
    Ok(())
}

/// Step Functions takes a task token of 1-1024 characters. The token is
/// never echoed: whoever reads it can end the caller's task.
fn check_notify(spec: &JobSpec) -> Result<(), SpecError> {
    let Some(token) = spec.notify.as_ref().and_then(|n| n.task_token.as_ref()) else { return Ok(()) };
    if token.is_empty() || token.len() > 1024 {
        return fail(format!("notify.task_token: must be 1-1024 characters, got {}", token.len()));
    }
    if token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return fail("notify.task_token: has a space or control character (not shown: a token is a secret)");
    }
    Ok(())
}

/// A role to assume in another account, and its external id.
fn check_role(spec: &JobSpec) -> Result<(), SpecError> {
    if let Some(role) = &spec.role_arn {
        check_charset("role_arn", role, 2048, |c| c.is_ascii_alphanumeric() || "+=,.@-_:/".contains(c))?;
        check_role_arn(role)?;
    }
    if let Some(external_id) = &spec.external_id {
        if spec.role_arn.is_none() {
            return fail("external_id: only meaningful with role_arn");
        }
        // STS: 2-1224 characters.
        if external_id.len() < 2 {
            return fail("external_id: STS needs at least 2 characters");
        }
        check_charset("external_id", external_id, 1224, |c| c.is_ascii_alphanumeric() || "+=,.@:/-".contains(c))?;
    }
    Ok(())
}

/// The resource part of an IAM ARN (`arn:<partition>:iam::<12-digit
/// account>:<kind><rest>`) in a partition AWS has, or None.
fn iam_arn_resource<'a>(arn: &'a str, kind: &str) -> Option<&'a str> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && ["aws", "aws-cn", "aws-us-gov"].contains(&parts[1])
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit());
    if ok {
        parts[5].strip_prefix(kind)
    } else {
        None
    }
}

/// A profile name (IAM: 1-128 of `[\w+=,.@-]`) or its ARN
/// (`arn:<partition>:iam::<account>:instance-profile/<path/><name>`).
fn check_instance_profile(profile: &str) -> Result<(), SpecError> {
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= 128
            && name != "."
            && name != ".."
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
    };
    let ok = if profile.starts_with("arn:") {
        iam_arn_resource(profile, "instance-profile/").is_some_and(|path| path.split('/').all(name_ok))
    } else {
        name_ok(profile)
    };
    if ok {
        Ok(())
    } else {
        fail(format!(
            "instance_profile: `{}` is not a profile name ([A-Za-z0-9+=,.@_-], 1-128) or an instance-profile ARN",
            printable(profile)
        ))
    }
}

/// `arn:<partition>:iam::<12-digit account>:role/<path/name>`.
fn check_role_arn(role: &str) -> Result<(), SpecError> {
    if iam_arn_resource(role, "role/").is_some_and(|name| !name.is_empty() && !name.ends_with('/')) {
        Ok(())
    } else {
        fail(format!(
            "role_arn: `{}` is not arn:aws|aws-cn|aws-us-gov:iam::<12-digit account>:role/<name>",
            printable(role)
        ))
    }
}

fn check_volumes(volumes: &[VolumeSpec]) -> Result<(), SpecError> {
    // EC2 recommends /dev/sd[f-p] for EBS data volumes.
    if volumes.len() > 11 {
        return fail(format!("volumes: at most 11 data volumes, got {}", volumes.len()));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut devices = std::collections::BTreeSet::new();
    let mut mounts = std::collections::BTreeSet::new();
    for (i, v) in volumes.iter().enumerate() {
        let at = format!("volumes[{i}]");
        check_charset(&format!("{at}.name"), &v.name, 32, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
        })?;
        if !names.insert(v.name.as_str()) {
            return fail(format!("{at}.name: `{}` is used twice", v.name));
        }
        let device_ok = ["/dev/sd", "/dev/xvd"].iter().any(|prefix| {
            v.device
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.len() == 1 && ('f'..='p').contains(&rest.chars().next().unwrap_or('a')))
        });
        if !device_ok {
            return fail(format!(
                "{at}.device: expected /dev/sd[f-p] or /dev/xvd[f-p], got `{}`",
                printable(&v.device)
            ));
        }
        // /dev/sdf and /dev/xvdf name the same attachment point.
        let letter = v.device.chars().last().unwrap_or('?');
        if !devices.insert(letter) {
            return fail(format!(
                "{at}.device: `{}` is the same device as an earlier volume's (sd{letter} = xvd{letter})",
                v.device
            ));
        }
        check_mount_point(&format!("{at}.mount_point"), &v.mount_point)?;
        if let Some(other) = mounts.iter().find(|m: &&&str| nested(m, &v.mount_point)) {
            return fail(format!("{at}.mount_point: `{}` overlaps `{other}`, an earlier volume's", v.mount_point));
        }
        mounts.insert(v.mount_point.as_str());
        match &v.source {
            VolumeSource::New { size_gib, volume_type } => {
                if *size_gib == 0 || *size_gib > MAX_VOLUME_GIB {
                    return fail(format!("{at}.source.new.size_gib: must be 1..={MAX_VOLUME_GIB}, got {size_gib}"));
                }
                if !["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"].contains(&volume_type.as_str()) {
                    return fail(format!("{at}.source.new.volume_type: unknown type `{}`", printable(volume_type)));
                }
            }
            VolumeSource::SnapshotId(id) => check_resource_id(&format!("{at}.source.snapshot_id"), id, "snap-")?,
            VolumeSource::VolumeId(id) => check_resource_id(&format!("{at}.source.volume_id"), id, "vol-")?,
        }
        if v.on_retry == OnRetry::Restore {
            if matches!(v.source, VolumeSource::VolumeId(_)) {
                return fail(format!("{at}.on_retry: `restore` needs a volume Flotilla creates; a volume_id source is re-attached as it is"));
            }
            if v.snapshot != SnapshotPolicy::Always {
                return fail(format!(
                    "{at}.on_retry: `restore` resumes from the snapshot every ended attempt takes; set snapshot to `always`"
                ));
            }
        }
        if v.retention.keep_last == 0 && v.snapshot != SnapshotPolicy::Never {
            return fail(format!("{at}.retention.keep_last: must be at least 1 when snapshots are taken"));
        }
        if v.retention.keep_last > 1000 {
            return fail(format!("{at}.retention.keep_last: at most 1000, got {}", v.retention.keep_last));
        }
    }
    Ok(())
}

fn check_retry(retry: &RetryStrategy) -> Result<(), SpecError> {
    if retry.attempts == 0 || retry.attempts > 10 {
        return fail(format!("retry.attempts: must be 1..=10, got {}", retry.attempts));
    }
    if let Some(limit) = retry.attempt_timeout_seconds {
        // AWS Batch's minimum attempt duration is 60 s.
        if !(60..=MAX_STEP_TIMEOUT_SECONDS).contains(&limit) {
            return fail(format!(
                "retry.attempt_timeout_seconds: must be 60..={MAX_STEP_TIMEOUT_SECONDS}, got {limit}"
            ));
        }
    }
    if retry.evaluate_on_exit.len() > 5 {
        return fail("retry.evaluate_on_exit: at most 5 rules");
    }
    for (i, rule) in retry.evaluate_on_exit.iter().enumerate() {
        let at = format!("retry.evaluate_on_exit[{i}]");
        if rule.on_exit_code.is_none() && rule.on_reason.is_none() {
            return fail(format!("{at}: give on_exit_code or on_reason"));
        }
        if let Some(code) = &rule.on_exit_code {
            let digits = code.strip_suffix('*').unwrap_or(code);
            if code.is_empty() || code.len() > 12 || !digits.chars().all(|c| c.is_ascii_digit()) {
                return fail(format!(
                    "{at}.on_exit_code: expected digits optionally ending in *, got `{}`",
                    printable(code)
                ));
            }
        }
        if let Some(reason) = &rule.on_reason {
            check_charset(&format!("{at}.on_reason"), reason, 512, |c| {
                c.is_ascii_alphanumeric() || " .:_-*".contains(c)
            })?;
        }
    }
    Ok(())
}

/// AWS Batch's pattern match: exact, or a prefix ending in `*`.
pub fn pattern_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

fn check_command(at: &str, command: &CommandSpec, deadline_seconds: u32) -> Result<(), SpecError> {
    match (command.commands.is_empty(), &command.script) {
        (true, None) => return fail(format!("{at}: give `commands` (argv arrays) or `script`")),
        (false, Some(_)) => return fail(format!("{at}: give `commands` or `script`, not both")),
        _ => {}
    }
    if let Some(timeout) = command.timeout_seconds {
        if timeout == 0 || timeout > MAX_STEP_TIMEOUT_SECONDS {
            return fail(format!("{at}.timeout_seconds: must be 1..={MAX_STEP_TIMEOUT_SECONDS}, got {timeout}"));
        }
        // before_unmount runs after the deadline too, but is bounded the same.
        if timeout > deadline_seconds {
            return fail(format!(
                "{at}.timeout_seconds: {timeout} s is longer than the job's deadline ({deadline_seconds} s); leave it unset to use what is left of the deadline"
            ));
        }
    }
    for (i, argv) in command.commands.iter().enumerate() {
        let program = argv.first().ok_or_else(|| SpecError::new(format!("{at}.commands[{i}]: empty argv")))?;
        let plain = !program.is_empty() && program.chars().all(|c| c.is_ascii_alphanumeric() || "_./+-".contains(c));
        if !plain {
            return fail(format!(
                "{at}.commands[{i}][0]: program `{}` must be a plain path (letters, digits, _ . / + -); use `script` for shell syntax",
                printable(program)
            ));
        }
        for (j, arg) in argv.iter().enumerate() {
            check_no_control(&format!("{at}.commands[{i}][{j}]"), arg)?;
        }
    }
    if let Some(script) = &command.script {
        if script.trim().is_empty() {
            return fail(format!("{at}.script: is empty"));
        }
        if script.len() > MAX_SCRIPT_BYTES {
            return fail(format!("{at}.script: {} bytes, at most {MAX_SCRIPT_BYTES}", script.len()));
        }
        if let Some(c) = script.chars().find(|c| c.is_control() && *c != '\n' && *c != '\t') {
            return fail(format!("{at}.script: control character U+{:04X} not allowed", c as u32));
        }
        check_no_invisible(&format!("{at}.script"), script)?;
    }
    Ok(())
}

impl EnvValue {
    /// What travels in a SendCommand: the value, or the secret's reference.
    pub fn text(&self) -> &str {
        match self {
            EnvValue::Plain(value) => value,
            EnvValue::Secret(SecretRef::FromSsm(path) | SecretRef::FromSecretsManager(path)) => path,
        }
    }
}

fn check_env_value(key: &str, value: &EnvValue) -> Result<(), SpecError> {
    let at = format!("env.{key}");
    match value {
        EnvValue::Plain(text) => check_no_control(&at, text),
        // SSM parameter names: letters, digits and _.-/, up to 1011 with the path.
        EnvValue::Secret(SecretRef::FromSsm(path)) => {
            let at = format!("{at}.from_ssm");
            check_charset(&at, path, 1011, |c| c.is_ascii_alphanumeric() || "/_.-".contains(c))?;
            if !path.starts_with('/') || path.contains("//") || path.ends_with('/') {
                return fail(format!("{at}: `{}` is not a parameter path like /team/db-password", printable(path)));
            }
            Ok(())
        }
        EnvValue::Secret(SecretRef::FromSecretsManager(arn)) => {
            let at = format!("{at}.from_secrets_manager");
            check_charset(&at, arn, 2048, |c| c.is_ascii_alphanumeric() || "/_+=.@:-".contains(c))?;
            let parts: Vec<&str> = arn.splitn(7, ':').collect();
            let ok = parts.len() == 7
                && parts[0] == "arn"
                && ["aws", "aws-cn", "aws-us-gov"].contains(&parts[1])
                && parts[2] == "secretsmanager"
                && !parts[3].is_empty()
                && parts[4].len() == 12
                && parts[4].chars().all(|c| c.is_ascii_digit())
                && parts[5] == "secret"
                && !parts[6].is_empty();
            if ok {
                Ok(())
            } else {
                fail(format!(
                    "{at}: `{}` is not a secret ARN like arn:aws:secretsmanager:<region>:<account>:secret:<name>",
                    printable(arn)
                ))
            }
        }
    }
}

/// What a deployment allows any job (template parameters). Checked at
/// intake with a clear reason; IAM enforces what it can as well.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Instances one job may ask for (None: [`MAX_INSTANCES`]).
    pub max_instances_per_job: Option<u32>,
    /// Instances all running jobs may hold together (None: no limit).
    pub max_instances_total: Option<u32>,
    /// The longest deadline a job may set (None: [`MAX_DEADLINE_MINUTES`]).
    pub max_deadline_minutes: Option<u32>,
    /// Instance types allowed, exact or a prefix ending in `*` (empty: any).
    pub allowed_instance_types: Vec<String>,
    /// The longest debug hold a job may ask for; 0 allows none (None:
    /// [`MAX_DEBUG_HOLD_MINUTES`]).
    pub max_debug_hold_minutes: Option<u32>,
}

impl Limits {
    /// A job that is valid on its own, checked against the deployment.
    pub fn check(&self, spec: &JobSpec, instances: u32) -> Result<(), SpecError> {
        if let Some(max) = self.max_instances_per_job {
            if instances > max {
                return fail(format!("fleet: {instances} instances, but this deployment allows at most {max} per job"));
            }
        }
        if let Some(max) = self.max_deadline_minutes {
            if spec.deadline_minutes > max {
                return fail(format!(
                    "deadline_minutes: {}, but this deployment allows at most {max}",
                    spec.deadline_minutes
                ));
            }
        }
        if let (Some(max), Some(minutes)) = (self.max_debug_hold_minutes, spec.debug_hold_minutes) {
            if minutes > max {
                return fail(format!(
                    "debug_hold_minutes: {minutes}, but this deployment allows at most {max} (template parameter MaxDebugHoldMinutes)"
                ));
            }
        }
        if !self.allowed_instance_types.is_empty() {
            for (i, t) in spec.instance_types.iter().enumerate() {
                if !self.allowed_instance_types.iter().any(|p| pattern_matches(p, t)) {
                    return fail(format!(
                        "instance_types[{i}]: `{t}` is not allowed here (allowed: {})",
                        self.allowed_instance_types.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Job ids become S3 keys, tag values and ClientTokens, so they are kept plain.
pub fn check_job_id(at: &str, id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= 48
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        fail(format!("{at}: `{}` must be 1-48 of a-z, 0-9 and -, not starting with -", printable(id)))
    }
}

fn check_image(image: &str) -> Result<(), SpecError> {
    if image.starts_with("ami-") {
        return check_resource_id("image", image, "ami-");
    }
    if image.starts_with('/') {
        return check_charset("image", image, 1011, |c| c.is_ascii_alphanumeric() || "/_.-".contains(c));
    }
    fail(format!("image: expected `ami-...` or an SSM parameter path `/aws/service/...`, got `{}`", printable(image)))
}

/// EC2 tags allow letters, digits, spaces and `_.:/=+-@`; we refuse the rest
/// rather than let quotes or newlines reach tooling that reads tags.
fn check_tag(key: &str, value: &str) -> Result<(), SpecError> {
    let allowed = |c: char| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c);
    let lower = key.to_ascii_lowercase();
    if key.is_empty() || key.chars().count() > 128 || lower.starts_with("aws:") || lower.starts_with("flotilla:") {
        return fail(format!(
            "tags: key `{}` must be 1-128 characters and not start with aws: or flotilla:",
            printable(key)
        ));
    }
    // Keys are ASCII: a Cyrillic `а` would make a second, look-alike key.
    if let Some(c) = key.chars().find(|c| !(c.is_ascii() && allowed(*c))) {
        return fail(format!(
            "tags: key `{}` contains `{}`; allowed are ASCII letters, digits, spaces and _.:/=+-@",
            printable(key),
            printable(&c.to_string())
        ));
    }
    if value.chars().count() > 256 {
        return fail(format!("tags.{key}: value longer than 256 characters"));
    }
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return fail(format!(
            "tags.{key}: value contains `{}`; allowed are letters, digits, spaces and _.:/=+-@",
            printable(&c.to_string())
        ));
    }
    Ok(())
}

/// One path is the other, or lies under it.
fn nested(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x == y || x.strip_prefix(y).is_some_and(|rest| rest.starts_with('/'));
    under(a, b) || under(b, a)
}

/// Mounting over these (or anything under the first list) breaks the
/// instance, the SSM agent (/var/lib/amazon/ssm) or Flotilla's own scripts.
const SYSTEM_TREES: [&str; 17] = [
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib64",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib",
    "/var/log",
    "/var/run",
    "/var/cache",
    "/snap",
];
const SYSTEM_DIRS: [&str; 9] = ["/", "/var", "/tmp", "/home", "/opt", "/mnt", "/srv", "/media", "/var/tmp"];

fn check_mount_point(at: &str, path: &str) -> Result<(), SpecError> {
    check_charset(at, path, 200, |c| c.is_ascii_alphanumeric() || "/_.-".contains(c))?;
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    if !path.starts_with('/') || parts.iter().any(|p| p.is_empty() || *p == ".." || *p == ".") {
        return fail(format!(
            "{at}: `{path}` must be an absolute path without . or .., empty parts (//) or a trailing /"
        ));
    }
    if SYSTEM_DIRS.contains(&path) || SYSTEM_TREES.iter().any(|tree| nested(path, tree) && path.starts_with(tree)) {
        return fail(format!("{at}: `{path}` is a system directory"));
    }
    Ok(())
}

fn check_resource_id(at: &str, id: &str, prefix: &str) -> Result<(), SpecError> {
    // EC2 ids are the prefix and 8 (older) or 17 lowercase hex digits.
    let rest = id.strip_prefix(prefix).unwrap_or("");
    let ok =
        (rest.len() == 8 || rest.len() == 17) && rest.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if ok {
        Ok(())
    } else {
        fail(format!("{at}: `{}` is not a valid {prefix}... id", printable(id)))
    }
}

fn check_work(work: &WorkSpec) -> Result<(), SpecError> {
    match work {
        WorkSpec::List(items) => {
            if items.is_empty() || items.len() as u64 > MAX_WORK_ITEMS {
                return fail(format!("work.list: must hold 1..={MAX_WORK_ITEMS} items, got {}", items.len()));
            }
            for (i, item) in items.iter().enumerate() {
                let at = format!("work.list[{i}]");
                if item.is_empty() || item.len() > MAX_ITEM_BYTES {
                    return fail(format!("{at}: must be 1-{MAX_ITEM_BYTES} bytes"));
                }
                // A manifest holds one item per line.
                check_no_control(&at, item)?;
            }
            Ok(())
        }
        WorkSpec::S3Prefix(uri) => {
            let Some((bucket, prefix)) = split_s3_uri(uri) else {
                return fail(format!("work.s3_prefix: expected s3://bucket/prefix, got `{}`", printable(uri)));
            };
            let label_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
            let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if bucket.len() < 3
                || bucket.len() > 63
                || !bucket.chars().all(label_ok)
                || !edge_ok(bucket.chars().next())
                || !edge_ok(bucket.chars().last())
            {
                return fail(format!("work.s3_prefix: `{}` is not an S3 bucket name", printable(bucket)));
            }
            if prefix.len() > MAX_ITEM_BYTES {
                return fail(format!("work.s3_prefix: the prefix is longer than {MAX_ITEM_BYTES} bytes"));
            }
            check_no_control("work.s3_prefix", prefix)
        }
    }
}

/// `s3://bucket/prefix` as (bucket, prefix); the prefix may be empty.
pub fn split_s3_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("s3://")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

fn check_charset(at: &str, value: &str, max_len: usize, allowed: impl Fn(char) -> bool) -> Result<(), SpecError> {
    if value.is_empty() || value.len() > max_len {
        return fail(format!("{at}: must be 1-{max_len} characters"));
    }
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return fail(format!(
            "{at}: character `{}` is not allowed in `{}`",
            printable(&c.to_string()),
            printable(value)
        ));
    }
    Ok(())
}

fn check_no_control(at: &str, value: &str) -> Result<(), SpecError> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return fail(format!("{at}: control character U+{:04X} not allowed", c as u32));
    }
    check_no_invisible(at, value)
}

/// Bidi overrides and zero-width characters make text read differently from
/// what runs ("Trojan Source"); free text may hold any visible character.
fn check_no_invisible(at: &str, value: &str) -> Result<(), SpecError> {
    let invisible = |c: char| matches!(c as u32, 0xAD | 0x061C | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB);
    if let Some(c) = value.chars().find(|c| invisible(*c)) {
        return fail(format!("{at}: invisible or bidi-override character U+{:04X} not allowed", c as u32));
    }
    Ok(())
}

fn is_instance_type(t: &str) -> bool {
    let mut parts = t.split('.');
    let (Some(family), Some(size), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let word = |s: &str| {
        !s.is_empty() && s.len() <= 24 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    word(family) && word(size)
}

/// Show hostile input in a reason without echoing control characters.
fn printable(s: &str) -> String {
    let shown: String =
        s.chars().take(80).map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect();
    if s.chars().count() > 80 {
        format!("{shown}…")
    } else {
        shown
    }
}

fn fail<T>(message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError::new(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn minimal() -> serde_json::Value {
        serde_json::json!({
            "fleet": {"count": 2},
            "instance_types": ["t3.micro"],
            "image": "ami-0abcdef1234567890",
            "run": {"commands": [["echo", "hello"]]},
            "deadline_minutes": 30
        })
    }

    fn reason(value: serde_json::Value) -> String {
        let body = value.to_string();
        match parse(&body).and_then(|spec| validate(&spec).map(|_| spec)) {
            Ok(_) => panic!("expected rejection for {body}"),
            Err(err) => err.to_string(),
        }
    }

    fn with(path: &[&str], value: serde_json::Value) -> serde_json::Value {
        let mut spec = minimal();
        let mut cursor = &mut spec;
        for key in &path[..path.len() - 1] {
            cursor = cursor.get_mut(*key).expect("path exists");
        }
        cursor[path[path.len() - 1]] = value;
        spec
    }

    #[test]
    fn minimal_spec_is_valid() {
        let spec = parse(&minimal().to_string()).expect("parses");
        validate(&spec).expect("valid");
        assert_eq!(spec.market, Market::OnDemand);
        assert_eq!(spec.run.timeout_seconds, None, "unset: what is left of the deadline");
    }

    #[test]
    fn malformed_json_is_named() {
        let err = parse("{\"fleet\": ").expect_err("malformed");
        assert!(err.to_string().starts_with("malformed JSON"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let r = reason(with(&["colour"], serde_json::json!("blue")));
        assert!(r.contains("unknown field `colour`"), "{r}");
    }

    #[test]
    fn wrong_type_names_path() {
        let r = reason(with(&["deadline_minutes"], serde_json::json!("soon")));
        assert!(r.starts_with("deadline_minutes: invalid type"), "{r}");
    }

    #[test]
    fn absurd_counts_are_rejected() {
        let r = reason(with(&["fleet"], serde_json::json!({"count": 100000})));
        assert!(r.contains("fleet.count: must be 1..=1000, got 100000"), "{r}");
        let r = reason(with(&["fleet"], serde_json::json!({"count": 0})));
        assert!(r.contains("fleet.count"), "{r}");
        let r = reason(with(&["fleet"], serde_json::json!({"count": -1})));
        assert!(r.starts_with("fleet"), "{r}");
    }

    #[test]
    fn injection_in_program_and_tags_is_rejected() {
        let r = reason(with(&["run"], serde_json::json!({"commands": [["echo;rm", "-rf"]]})));
        assert!(r.contains("run.commands[0][0]: program `echo;rm`"), "{r}");
        let r = reason(with(&["run"], serde_json::json!({"commands": [["echo", "a\nrm -rf /"]]})));
        assert!(r.contains("run.commands[0][1]: control character U+000A"), "{r}");
        let r = reason(with(&["tags"], serde_json::json!({"team": "x\"; rm -rf /"})));
        assert!(r.contains("tags.team: value contains `\"`"), "{r}");
        let r = reason(with(&["tags"], serde_json::json!({"a;b": "x"})));
        assert!(r.contains("key `a;b` contains `;`"), "{r}");
        let r = reason(with(&["tags"], serde_json::json!({"team": "a\nb"})));
        assert!(r.contains("tags.team: value contains `\\n`"), "{r}");
        let r = reason(with(&["env"], serde_json::json!({"X; rm": "1"})));
        assert!(r.contains("env: `X; rm` is not a valid variable name"), "{r}");
    }

    #[test]
    fn hostile_paths_and_ids_are_rejected() {
        let vol = |mount: &str| {
            with(
                &["volumes"],
                serde_json::json!([{"name": "data", "source": {"new": {"size_gib": 10}}, "device": "/dev/sdf", "mount_point": mount}]),
            )
        };
        assert!(reason(vol("/data/../etc")).contains("mount_point"));
        assert!(reason(vol("/data$(reboot)")).contains("character `$`"));
        assert!(reason(vol("/etc")).contains("system directory"));
        let r = reason(with(&["id"], serde_json::json!("../../x")));
        assert!(r.starts_with("id: `../../x` must be"), "{r}");
        let r = reason(with(&["image"], serde_json::json!("ami-zz; reboot")));
        assert!(r.starts_with("image: `ami-zz; reboot` is not a valid"), "{r}");
    }

    #[test]
    fn work_items_are_checked_where_they_are_given() {
        let cases = [
            (serde_json::json!({"list": []}), "work.list: must hold 1..=100000 items, got 0"),
            (serde_json::json!({"list": ["ok", "two\nlines"]}), "work.list[1]: control character U+000A not allowed"),
            (
                serde_json::json!({"list": ["a\u{202e}b"]}),
                "work.list[0]: invisible or bidi-override character U+202E not allowed",
            ),
            (serde_json::json!({"list": [""]}), "work.list[0]: must be 1-1024 bytes"),
            (
                serde_json::json!({"s3_prefix": "bucket/x"}),
                "work.s3_prefix: expected s3://bucket/prefix, got `bucket/x`",
            ),
            (
                serde_json::json!({"s3_prefix": "s3://Bad_Bucket/x"}),
                "work.s3_prefix: `Bad_Bucket` is not an S3 bucket name",
            ),
            (
                serde_json::json!({"s3_prefix": "s3://ok-bucket/x\ty"}),
                "work.s3_prefix: control character U+0009 not allowed",
            ),
        ];
        for (work, expected) in cases {
            let r = reason(with(&["work"], work.clone()));
            assert_eq!(r, expected, "{work}");
        }
        let sized = serde_json::json!({"items_per_instance_minute": 1, "within_minutes": 10, "max_instances": 5});
        let mut both = with(
            &["fleet"],
            serde_json::json!({"items": 3, "items_per_instance_minute": 1, "within_minutes": 10, "max_instances": 5}),
        );
        both["work"] = serde_json::json!({"list": ["a"]});
        assert_eq!(reason(both), "fleet.items: omit it when `work` gives the items");
        assert_eq!(reason(with(&["fleet"], sized.clone())), "fleet.items: required unless `work` gives the items");
        let mut ok = with(&["fleet"], sized);
        ok["work"] = serde_json::json!({"s3_prefix": "s3://my-inputs/frames/"});
        validate(&parse(&ok.to_string()).expect("parses")).expect("a prefix sizes the fleet");
        assert_eq!(
            reason(with(&["budget_usd"], serde_json::json!(-1))),
            "budget_usd: must be a positive number, got -1"
        );
        for (minutes, expected) in [(0, "got 0"), (1441, "got 1441")] {
            let r = reason(with(&["debug_hold_minutes"], serde_json::json!(minutes)));
            assert_eq!(r, format!("debug_hold_minutes: must be 1-1440, {expected}"));
        }
        let held = parse(&with(&["debug_hold_minutes"], serde_json::json!(60)).to_string()).expect("parses");
        validate(&held).expect("an hour's hold is valid");
        let mut foreign = with(&["debug_hold_minutes"], serde_json::json!(60));
        foreign["role_arn"] = serde_json::json!("arn:aws:iam::210987654321:role/flotilla-target-a");
        assert!(reason(foreign).starts_with("debug_hold_minutes: not allowed with role_arn"));
        let deployment = Limits { max_debug_hold_minutes: Some(30), ..Limits::default() };
        let err = deployment.check(&held, 1).expect_err("above the deployment's limit");
        assert!(err.message.contains("allows at most 30 (template parameter MaxDebugHoldMinutes)"), "{}", err.message);
        let none = Limits { max_debug_hold_minutes: Some(0), ..Limits::default() };
        none.check(&held, 1).expect_err("0 allows no hold");
    }

    #[test]
    fn sized_fleet_needs_all_fields() {
        let r = reason(with(&["fleet"], serde_json::json!({"items": 10})));
        assert!(r.starts_with("fleet: expected"), "{r}");
    }

    /// Input that used to slip through (issue 9's audit), each with the
    /// reason the user sees.
    #[test]
    fn look_alikes_overlaps_and_malformed_ids_are_rejected_with_reasons() {
        let volumes = |v: serde_json::Value| with(&["volumes"], v);
        let vol = |device: &str, mount: &str| serde_json::json!({"name": format!("v{}", device.len() + mount.len()), "source": {"new": {"size_gib": 1}}, "device": device, "mount_point": mount});
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (with(&["tags"], serde_json::json!({"te\u{0430}m": "x"})), "allowed are ASCII letters"),
            (with(&["tags"], serde_json::json!({"AWS:owner": "x"})), "not start with aws: or flotilla:"),
            (with(&["tags"], serde_json::json!({"Flotilla:job-id": "x"})), "not start with aws: or flotilla:"),
            (volumes(serde_json::json!([vol("/dev/sdf", "/a"), vol("/dev/xvdf", "/b")])), "same device"),
            (volumes(serde_json::json!([vol("/dev/sdf", "/usr/bin")])), "system directory"),
            (volumes(serde_json::json!([vol("/dev/sdf", "/var/lib/amazon/ssm")])), "system directory"),
            (volumes(serde_json::json!([vol("/dev/sdf", "//data")])), "empty parts"),
            (
                volumes(serde_json::json!([vol("/dev/sdf", "/data"), vol("/dev/sdg", "/data/inner")])),
                "overlaps `/data`",
            ),
            (with(&["image"], serde_json::json!("ami-0")), "not a valid ami-"),
            (with(&["image"], serde_json::json!("ami-0ABCDEF1")), "not a valid ami-"),
            (with(&["subnet_ids"], serde_json::json!(["subnet-123"])), "not a valid subnet-"),
            (with(&["role_arn"], serde_json::json!("arn:aws:iam::12345:role/x")), "12-digit account"),
            (with(&["role_arn"], serde_json::json!("arn:aws-xx:iam::123456789012:role/x")), "12-digit account"),
            (with(&["role_arn"], serde_json::json!("arn:aws:iam::123456789012:user/x")), "12-digit account"),
            (
                {
                    let mut spec = with(&["role_arn"], serde_json::json!("arn:aws:iam::123456789012:role/flotilla/x"));
                    spec["external_id"] = serde_json::json!("a");
                    spec
                },
                "at least 2 characters",
            ),
            (with(&["env"], serde_json::json!({"UID": "0"})), "a name bash reserves"),
            (with(&["env"], serde_json::json!({"BASH_ENV": "/tmp/x"})), "a name bash reserves"),
        ];
        for (spec, expected) in cases {
            let r = reason(spec.clone());
            assert!(r.contains(expected), "{spec}: {r}");
        }
        // Still fine: an ARN in another partition, a lowercase 17-digit id, a mount under /var.
        let ok = with(&["role_arn"], serde_json::json!("arn:aws-cn:iam::123456789012:role/flotilla/x"));
        assert!(validate(&parse(&ok.to_string()).expect("parse")).is_ok());
        let ok = volumes(serde_json::json!([vol("/dev/sdf", "/var/data"), vol("/dev/sdg", "/data")]));
        assert!(validate(&parse(&ok.to_string()).expect("parse")).is_ok());
    }

    fn fuzz_cases() -> u32 {
        std::env::var("FLOTILLA_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(fuzz_cases()))]
        /// Any bytes at all: an error or a spec, never a panic.
        #[test]
        fn parsing_arbitrary_text_never_panics(body in ".{0,600}") {
            if let Ok(spec) = parse(&body) {
                let _ = validate(&spec);
            }
        }

        /// A valid spec with one field replaced by arbitrary text: the
        /// validator answers, never panics, and a rejection names a field.
        #[test]
        fn validating_arbitrary_field_values_never_panics(
            field in 0usize..12,
            value in proptest::prelude::any::<String>(),
        ) {
            let paths: [&[&str]; 12] = [
                &["id"], &["name"], &["image"], &["instance_profile"], &["deadline_minutes"], &["market"],
                &["role_arn"], &["external_id"], &["instance_types"], &["tags"], &["env"], &["volumes"],
            ];
            let json_value = match field {
                8 => serde_json::json!([value]),
                9 | 10 => serde_json::json!({ value.clone(): value }),
                11 => serde_json::json!([{"name": value, "source": {"new": {"size_gib": 1}}, "device": "/dev/sdf", "mount_point": value}]),
                _ => serde_json::json!(value),
            };
            let mut spec = with(paths[field], json_value);
            if field == 7 {
                spec["role_arn"] = serde_json::json!("arn:aws:iam::123456789012:role/x");
            }
            if let Err(err) = parse(&spec.to_string()).and_then(|s| validate(&s)) {
                proptest::prop_assert!(!err.to_string().is_empty());
            }
        }
    }
}
