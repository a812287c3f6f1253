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
    /// What sent it. Only the lease's gate reads it (`reconcile::lease`);
    /// a pass, once it runs, never asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
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
    pub fn new(job_id: &str, trigger: Trigger) -> Self {
        WakeMessage {
            job_id: job_id.to_string(),
            wake_id: None,
            trigger: Some(trigger),
            instances: vec![],
            lease_owner: None,
        }
    }
}

crate::states::aws_names! {
    /// What sent a wake, as older code wrote it; a name this code does not
    /// know (from a newer or older version) still parses, as `Other`, and
    /// is treated as a trigger that asks for a pass.
    Trigger {
        /// A job accepted by intake.
        Submit = "submit",
        /// A cancel recorded on the job.
        Cancel = "cancel",
        /// The job's own scheduled look (`wake_id` names it).
        Poll = "poll",
        /// The safety tick, for every active job.
        Tick = "tick",
        /// An EC2, SSM or EBS event naming the job's instances or snapshots.
        Event = "event",
        /// Sent by a trigger that found the lease held: comes when it ends.
        LeaseEnd = "lease-end",
        /// A dead-lettered message of the job, recorded by the reaper.
        DeadLetter = "dead-letter",
        /// From before `LeaseEnd`: a trigger that found the lease held.
        Busy = "busy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name an earlier version wrote parses to its own variant (a
    /// known name read as `Other` would pass a round trip, yet the lease's
    /// gate would treat a tick or a lease-end as a trigger that asks).
    #[test]
    fn each_name_written_parses_to_its_own_variant() {
        let named = [
            ("submit", Trigger::Submit),
            ("cancel", Trigger::Cancel),
            ("poll", Trigger::Poll),
            ("tick", Trigger::Tick),
            ("event", Trigger::Event),
            ("lease-end", Trigger::LeaseEnd),
            ("dead-letter", Trigger::DeadLetter),
            ("busy", Trigger::Busy),
        ];
        for (name, variant) in named {
            let wake: WakeMessage =
                serde_json::from_str(&format!(r#"{{"job_id": "j", "trigger": "{name}"}}"#)).expect("parses");
            assert_eq!(wake.trigger, Some(variant.clone()), "{name}");
            assert_eq!(serde_json::to_value(&wake).expect("json")["trigger"], name);
        }
        let unknown: WakeMessage = serde_json::from_str(r#"{"job_id": "j", "trigger": "retired"}"#).expect("parses");
        assert_eq!(unknown.trigger, Some(Trigger::Other("retired".into())));
    }
}
