//! The account a job acts in: the deployment's own, or the one its
//! `role_arn` names. A role that cannot be assumed either waits (anything
//! may still run there) or ends the job with what it left there.

use std::sync::Arc;

use tracing::warn;

use super::backoff::{next_after, Setback};
use super::give_up;
use crate::error::StepError;
use crate::ports::{Cloud, Ports};
use crate::reconcile::decide::Next;
use crate::record::{JobRecord, Outcome};

/// Where this pass acts, or why it stops before acting.
pub(super) enum JobCloud {
    Own,
    Assumed(Arc<Cloud>),
    /// No cloud to act in this pass: finish it with this next step.
    Stop(Next),
}

pub(super) async fn job_cloud(ports: &Ports, record: &mut JobRecord) -> Result<JobCloud, StepError> {
    let assumed = match record.spec.as_ref().and_then(|s| s.role_arn.clone().map(|r| (r, s.external_id.clone()))) {
        Some((role_arn, external_id)) => {
            Some(ports.accounts.assume(&role_arn, external_id.as_deref(), &record.job_id).await)
        }
        None => None,
    };
    Ok(match assumed {
        Some(Ok(cloud)) => JobCloud::Assumed(cloud),
        Some(Err(err))
            if !err.is_transient()
                && record
                    .bill_bound(ports.settings.cleanup_grace_minutes)
                    .is_some_and(|bound| ports.clock.now() > bound) =>
        {
            // Past the bound and the role is still refused: stop re-passing.
            // The record names what may still run there (each instance's
            // expires-at tag lets a reaper with a role there remove it).
            // Everything that may still exist there: instances (or launches
            // whose reply was lost) and volumes not yet deleted.
            let mut stranded: Vec<String> = Vec::new();
            for attempt in record.attempts().filter(|a| a.stage != crate::record::Stage::Done) {
                match (&attempt.instance_id, &attempt.launch_token) {
                    (Some(id), _) => stranded.push(id.clone()),
                    (None, Some(token)) => stranded.push(format!("an instance launched with token {token}")),
                    (None, None) => {}
                }
            }
            let volumes = record.attempts().flat_map(|a| a.volumes.iter()).filter(|v| v.created && !v.deleted);
            stranded.extend(
                volumes.map(|v| v.volume_id.clone().unwrap_or_else(|| format!("a volume of token {}", v.token))),
            );
            let reason = format!(
                "cannot act in the job's account past its bound ({err}); left there: {}",
                if stranded.is_empty() { "nothing recorded".to_string() } else { stranded.join(", ") }
            );
            if !stranded.is_empty() {
                // The reaper's report lists these until a person removes the key.
                let body = serde_json::json!({ "job_id": record.job_id, "role_arn": record.spec.as_ref().and_then(|s| s.role_arn.clone()), "left": stranded, "reason": err.to_string() });
                ports
                    .ledger
                    .put(&crate::reaper::stranded_key(&record.job_id), body.to_string().as_bytes(), "application/json")
                    .await?;
            }
            record.stranded_instances = stranded;
            record.outcome = Some(Outcome::Failed);
            record.outcome_reason = Some(reason.clone());
            give_up(record, &reason, ports.clock.now());
            JobCloud::Stop(Next::Finished)
        }
        Some(Err(err)) if err.is_transient() || record.attempts().any(|a| a.launch_token.is_some()) => {
            // Resources may exist there: never go terminal without releasing
            // them; wait for the role (the reason says why).
            warn!(job_id = %record.job_id, error = %err, "cannot assume the job's role yet");
            record.reason = format!("waiting to act in the job's account: {err}");
            JobCloud::Stop(next_after(Setback::AccountUnreachable, None))
        }
        Some(Err(err)) => {
            // Refused before anything was launched: nothing exists there.
            let reason = format!("cannot act in the job's account: {err}");
            give_up(record, &reason, ports.clock.now());
            JobCloud::Stop(Next::Finished)
        }
        None => JobCloud::Own,
    })
}
