//! Budgets shared by every job of a deployment, because EC2 limits calls per
//! account and Region, whichever job makes them:
//!
//! - launches: RunInstances, 5 requests burst refilling 2 a second, and
//!   1,000 instances burst refilling 2 a second (`admission/launch.json`);
//! - mutating calls: 50 burst refilling 5 a second (`admission/mutating.json`).
//!
//! Each is a token bucket in S3 changed only by conditional writes, so jobs
//! acting at once take turns instead of throttling each other. A grant can
//! be partial (RunInstances then asks for that many; the calls not granted
//! wait for the next pass), and a job granted nothing looks again when
//! enough tokens will have refilled.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::CloudError;
use crate::ports::{CloudResult, SharedState, WriteOutcome};

pub const KEY: &str = "admission/launch.json";
/// EC2's RunInstances buckets ("Request throttling for the Amazon EC2 API").
pub const INSTANCES_BURST: f64 = 1000.0;
pub const INSTANCES_PER_SECOND: f64 = 2.0;
pub const REQUESTS_BURST: f64 = 5.0;
pub const REQUESTS_PER_SECOND: f64 = 2.0;
/// A grant is at least this many instances (or all a job wants): fewer,
/// larger RunInstances calls, and the request bucket never binds first.
pub const MIN_GRANT: u32 = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Budget {
    instances: f64,
    requests: f64,
    at: DateTime<Utc>,
}

impl Budget {
    fn full(now: DateTime<Utc>) -> Self {
        Budget { instances: INSTANCES_BURST, requests: REQUESTS_BURST, at: now }
    }

    fn refilled(&self, now: DateTime<Utc>) -> Self {
        let seconds = (now - self.at).num_milliseconds().max(0) as f64 / 1000.0;
        Budget {
            instances: (self.instances + seconds * INSTANCES_PER_SECOND).min(INSTANCES_BURST),
            requests: (self.requests + seconds * REQUESTS_PER_SECOND).min(REQUESTS_BURST),
            at: now.max(self.at),
        }
    }
}

/// What a job may launch now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub instances: u32,
    /// With nothing granted: when to ask again.
    pub retry_after_seconds: u32,
}

/// One budget's read-modify-write: `step` turns the stored state (None when
/// there is none, or it does not parse) into a grant and, when it grants
/// anything, the state to write back, which only a conditional write
/// (If-Match, or If-None-Match for the first) stores; a lost race reads again.
async fn update<S: Serialize + DeserializeOwned>(
    ledger: &dyn SharedState,
    key: &str,
    step: impl Fn(Option<S>) -> (Grant, Option<S>),
) -> CloudResult<Grant> {
    for _ in 0..8 {
        let loaded = ledger.get_versioned(key).await?;
        let (state, version) = match &loaded {
            Some((body, version)) => (serde_json::from_slice(body).ok(), Some(version.as_str())),
            None => (None, None),
        };
        let (grant, left) = step(state);
        let Some(left) = left else { return Ok(grant) };
        let body = serde_json::to_vec(&left).map_err(|e| CloudError::Invalid(e.to_string()))?;
        if let WriteOutcome::Written { .. } = ledger.put_if(key, &body, version).await? {
            return Ok(grant);
        }
    }
    // Many jobs at once: let this one wait a moment rather than spin.
    Ok(Grant { instances: 0, retry_after_seconds: 1 })
}

/// Take up to `wanted` instances (and one request) from the shared budget.
pub async fn take(ledger: &dyn SharedState, wanted: u32, now: DateTime<Utc>) -> CloudResult<Grant> {
    update(ledger, KEY, |state: Option<Budget>| {
        let budget = state.map_or_else(|| Budget::full(now), |b| b.refilled(now));
        let least = f64::from(wanted.min(MIN_GRANT));
        if budget.requests < 1.0 || budget.instances < least {
            // Until a request and the least grant have refilled.
            let need = (1.0 - budget.requests).max(0.0) / REQUESTS_PER_SECOND;
            let need = need.max((least - budget.instances).max(0.0) / INSTANCES_PER_SECOND);
            return (Grant { instances: 0, retry_after_seconds: need.ceil().clamp(1.0, 30.0) as u32 }, None);
        }
        let granted = (budget.instances.floor() as u32).min(wanted);
        let left =
            Budget { instances: budget.instances - f64::from(granted), requests: budget.requests - 1.0, ..budget };
        (Grant { instances: granted, retry_after_seconds: 0 }, Some(left))
    })
    .await
}

/// EC2's mutating actions (CreateVolume, AttachVolume, CreateSnapshot,
/// DeleteVolume, TerminateInstances...) share one bucket per account and
/// Region: 50 burst, refilling 5 a second.
pub const CALLS_KEY: &str = "admission/mutating.json";
pub const CALLS_BURST: f64 = 50.0;
pub const CALLS_PER_SECOND: f64 = 5.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Calls {
    tokens: f64,
    at: DateTime<Utc>,
}

/// Take up to `wanted` mutating calls from the shared budget: the grant's
/// `instances` is the number of calls this pass may make.
pub async fn take_calls(ledger: &dyn SharedState, wanted: u32, now: DateTime<Utc>) -> CloudResult<Grant> {
    update(ledger, CALLS_KEY, |state: Option<Calls>| {
        let tokens = state.map_or(CALLS_BURST, |calls| {
            let seconds = (now - calls.at).num_milliseconds().max(0) as f64 / 1000.0;
            (calls.tokens + seconds * CALLS_PER_SECOND).min(CALLS_BURST)
        });
        if tokens < 1.0 {
            let need = (1.0 - tokens) / CALLS_PER_SECOND;
            return (Grant { instances: 0, retry_after_seconds: need.ceil().clamp(1.0, 30.0) as u32 }, None);
        }
        let granted = (tokens.floor() as u32).min(wanted);
        // What is left over refills at 5 a second: when to come back.
        let short = f64::from(wanted - granted) / CALLS_PER_SECOND;
        let grant = Grant { instances: granted, retry_after_seconds: short.ceil().clamp(1.0, 30.0) as u32 };
        (grant, Some(Calls { tokens: tokens - f64::from(granted), at: now }))
    })
    .await
}
