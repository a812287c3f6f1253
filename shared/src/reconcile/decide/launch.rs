//! Launching: adopting instances a lost reply launched, choosing the
//! launch option after capacity failures, and the RunInstances requests.

use super::*;

pub(super) fn describe_option(option: &LaunchOption) -> String {
    let market = match option.market {
        crate::spec::Market::OnDemand => "on-demand",
        crate::spec::Market::Spot => "spot",
    };
    match &option.subnet_id {
        Some(subnet) => format!("{} {market} in {subnet}", option.instance_type),
        None => format!("{} {market}", option.instance_type),
    }
}

/// Instances a RunInstances made whose reply was lost (a crash) carry the
/// batch's token as a tag: give them to the attempts waiting on that token,
/// in launch order, as the reply would have.
pub(super) fn adopt_launched(record: &mut JobRecord, obs: &Observation, now: DateTime<Utc>) {
    let assigned: BTreeSet<String> = record.instance_ids().into_iter().collect();
    let mut by_token: BTreeMap<&str, Vec<&InstanceView>> = BTreeMap::new();
    for view in obs.instances.values() {
        if let Some(token) = view.launch_token.as_deref() {
            if !assigned.contains(&view.instance_id) {
                by_token.entry(token).or_default().push(view);
            }
        }
    }
    for (token, mut views) in by_token {
        views.sort_by(|a, b| (a.launch_index, &a.instance_id).cmp(&(b.launch_index, &b.instance_id)));
        let mut views = views.into_iter();
        for shard in &mut record.shards {
            let Some(a) = shard.current_mut() else { continue };
            if a.stage != Stage::Launching || a.instance_id.is_some() || a.launch_token.as_deref() != Some(token) {
                continue;
            }
            let Some(view) = views.next() else { break };
            a.instance_id = Some(view.instance_id.clone());
            a.availability_zone = Some(view.availability_zone.clone());
            a.launched_at = Some(now);
            // Even a job that is stopping takes it, so it is released like any other.
            a.stage = Stage::Booting;
            let text = format!("adopted {} launched under {token}", view.instance_id);
            shard.note(now, text);
        }
    }
}

/// Group attempts waiting to launch into RunInstances calls: one ClientToken
/// per batch, written before the call, MinCount 1 so EC2 fills what it can.
/// Attempts waiting for a first launch (or a relaunch): what a pass asks
/// the shared launch budget for.
pub fn launches_wanted(record: &JobRecord) -> u32 {
    if record.outcome.is_some() {
        return 0;
    }
    let current = || record.shards.iter().filter(|s| s.result.is_none()).filter_map(|s| s.current());
    let pending: BTreeSet<&String> = current()
        .filter(|a| a.stage == Stage::Launching && a.end.is_none())
        .filter_map(|a| a.launch_token.as_ref())
        .collect();
    // plan_launches mints no new token while this many calls are pending:
    // tokens granted now would launch nothing.
    let room = MAX_LAUNCH_CALLS.saturating_sub(pending.len()) * 1000;
    let fresh =
        current().filter(|a| a.stage == Stage::Launching && a.launch_token.is_none() && a.end.is_none()).count();
    fresh.min(room) as u32
}

pub(super) fn plan_launches(record: &mut JobRecord, spec: &JobSpec, ctx: &Context<'_>, decision: &mut Decision) {
    if record.outcome.is_some() {
        return;
    }
    let options = launch_options(spec);
    // Fresh attempts get a token per option group.
    let mut fresh: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (index, shard) in record.shards.iter().enumerate() {
        if shard.result.is_some() {
            continue;
        }
        if let Some(a) = shard.current() {
            if a.stage == Stage::Launching && a.launch_token.is_none() && a.end.is_none() {
                fresh.entry(a.option).or_default().push(index);
            }
        }
    }
    let pending_tokens: BTreeSet<String> = record
        .shards
        .iter()
        .filter_map(|s| s.current())
        .filter(|a| a.stage == Stage::Launching && a.end.is_none())
        .filter_map(|a| a.launch_token.clone())
        .collect();
    let mut calls = pending_tokens.len();
    let mut allowance = ctx.launch_grant.map_or(u32::MAX, |g| g.instances) as usize;
    if let Some(grant) = ctx.launch_grant.filter(|g| g.instances == 0 && !fresh.is_empty()) {
        decision.look_within(grant.retry_after_seconds.max(1));
    }
    for (_, mut shards) in fresh {
        // The shared budget decides how many launch now; the rest wait their turn.
        shards.truncate(allowance);
        allowance -= shards.len();
        for chunk in shards.chunks(1000) {
            if calls >= MAX_LAUNCH_CALLS {
                break;
            }
            calls += 1;
            let seq = decision.take_seq();
            let token = client_token(&ctx.settings.stack, &record.job_id, 'l', seq);
            for index in chunk {
                if let Some(a) = record.shards[*index].current_mut() {
                    a.launch_token = Some(token.clone());
                }
            }
        }
    }
    // A token's count never changes (EC2 answers IdempotentParameterMismatch
    // to the same token with other parameters): every attempt ever given it.
    let waiting: BTreeSet<String> = record
        .shards
        .iter()
        .filter(|s| s.result.is_none())
        .filter_map(|s| s.current())
        .filter(|a| a.stage == Stage::Launching && a.end.is_none() && a.instance_id.is_none())
        .filter_map(|a| a.launch_token.clone())
        .collect();
    let mut by_token: BTreeMap<String, (u32, LaunchOption)> = BTreeMap::new();
    for a in record.attempts() {
        if let Some(token) = a.launch_token.as_ref().filter(|t| waiting.contains(*t)) {
            let entry = by_token.entry(token.clone()).or_insert((0, launch_of(&options, a)));
            entry.0 += 1;
        }
    }
    for (token, (count, option)) in by_token {
        decision.actions.push(Action::Launch { request: launch_request(record, spec, ctx, &token, count, &option) });
        decision.look_within(5);
    }
}

pub(super) fn launch_request(
    record: &JobRecord,
    spec: &JobSpec,
    ctx: &Context<'_>,
    token: &str,
    count: u32,
    option: &LaunchOption,
) -> LaunchRequest {
    let template = spec.launch_template.as_ref();
    let mut launch_tags = job_tags(record, spec, ctx.settings);
    launch_tags.insert(tags::LAUNCH.to_string(), token.to_string());
    LaunchRequest {
        job_id: record.job_id.clone(),
        count,
        instance_type: option.instance_type.clone(),
        image_id: record.resolved_image.clone(),
        launch_template_id: template.and_then(|t| t.id.clone()),
        launch_template_name: template.and_then(|t| t.name.clone()),
        launch_template_version: template.and_then(|t| t.version.clone()),
        subnet_id: option.subnet_id.clone(),
        security_group_ids: spec.security_group_ids.clone(),
        instance_profile: spec.instance_profile.clone().or_else(|| ctx.settings.worker_instance_profile.clone()),
        market: option.market,
        tags: launch_tags,
        client_token: token.to_string(),
    }
}
