//! The reconcile queue's message: which job to look at, and what sent it.
//! Deployed queues hold these across an upgrade, so every change must still
//! parse what `tests/fixtures/messages/` holds.

use serde::{Deserialize, Serialize};

/// The body of a message on the reconcile queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WakeMessage {
    pub job_id: String,
    /// Set on the job's scheduled poll, so a pass knows that poll arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_id: Option<String>,
    /// What sent it: submit, cancel, poll, tick, event, lease-end (and busy,
    /// from before lease-end). A tick skips a job whose poll is on its way;
    /// an event, lease-end or stale poll right after a pass leaves its
    /// instances for the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Instances EC2 or SSM events named: their commands are listed this
    /// pass; others only once their last listing is a safety poll old.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
    /// On a `lease-end` message: the pass whose lease it waits out. Dropped
    /// if that pass ended (it took everything in and scheduled its next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
}

impl WakeMessage {
    pub fn new(job_id: &str, trigger: &str) -> Self {
        WakeMessage {
            job_id: job_id.to_string(),
            wake_id: None,
            trigger: Some(trigger.to_string()),
            instances: vec![],
            lease_owner: None,
        }
    }
}
