//! What a pass saw (`Observation`) and what it asks the cloud to do
//! (`Action`), with each action's reply (`Done`) and the pass's `Next`.

use super::*;

/// What one pass saw of the cloud: a few batched, paginated calls.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// This job's instances by id, found by tag, in every state.
    pub instances: BTreeMap<String, InstanceView>,
    /// Instances whose SSM agent is Online.
    pub online: BTreeSet<String>,
    /// This job's volumes (by tag) and its `volume_id` sources, by id.
    pub volumes: BTreeMap<String, VolumeView>,
    /// This job's snapshots, by id.
    pub snapshots: BTreeMap<String, SnapshotView>,
    /// By (command id, instance id).
    pub invocations: BTreeMap<(String, String), InvocationView>,
    /// Recorded volumes that DescribeVolumes says no longer exist.
    pub gone_volumes: BTreeSet<String>,
    /// Instances whose agent was asked about this pass (a command waits to be
    /// sent, or the health check ran).
    pub agents_checked: BTreeSet<String>,
    /// The health check was due this pass (its clock moves on even if the
    /// status checks could not be read).
    pub health_due: bool,
    /// Status checks were read this pass.
    pub health_checked: bool,
    /// Instances whose instance or system status check is `impaired`, and
    /// those whose checks are both `ok`.
    pub impaired: BTreeSet<String>,
    pub healthy: BTreeSet<String>,
    /// Commands whose invocations were listed this pass.
    pub listed_commands: BTreeSet<String>,
    /// Of those, commands SSM did not list yet for every instance looked
    /// for: a new command's invocations appear after a lag, even when its
    /// status-change event has come.
    pub not_yet_listed: BTreeSet<String>,
    /// Batches with no command id whose send is found to have reached SSM
    /// (by its comment), with the command id.
    pub sent: BTreeMap<u64, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Launch {
        request: LaunchRequest,
    },
    CreateVolume {
        request: NewVolume,
    },
    Attach {
        volume_id: String,
        instance_id: String,
        device: String,
    },
    /// With `look_first` (a send decided before this pass, whose reply may
    /// have been lost) the executor looks the comment up first and sends
    /// only if it finds nothing.
    Send {
        batch: u64,
        request: CommandRequest,
        look_first: bool,
    },
    /// SSM cancels only the named instances' invocations.
    Cancel {
        command_id: String,
        instance_ids: Vec<String>,
    },
    Terminate {
        instance_ids: Vec<String>,
    },
    /// With `look_first` (requested before this pass) the executor looks
    /// for a snapshot with these tags first.
    Snapshot {
        volume_id: String,
        description: String,
        tags: BTreeMap<String, String>,
        look_first: bool,
    },
    DeleteVolume {
        volume_id: String,
    },
    /// The held instance's `expires-at` moved to the end of its debug hold,
    /// and `held-until` on it and its volumes.
    TagHold {
        instance_id: String,
        volume_ids: Vec<String>,
        until: String,
    },
    /// A SUCCEEDED run tags its final snapshots of the volume `flotilla:good`
    /// (the only snapshots `keep_last` counts), then applies the lineage's
    /// retention (`retention.rs`); never to this job's own.
    Prune {
        volume: String,
        finals: Vec<String>,
        job_name: String,
        keep_last: u32,
        max_age_days: u32,
    },
    /// The tail of one shard's phase output, beside the record in S3.
    SaveOutput {
        name: String,
        body: String,
    },
    WriteReport,
}

pub use crate::record::{output_name, OUTPUT_TAIL_LINES};

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Launch { .. } => "RunInstances",
            Action::CreateVolume { .. } => "CreateVolume",
            Action::Attach { .. } => "AttachVolume",
            Action::Send { .. } => "SendCommand",
            Action::Cancel { .. } => "CancelCommand",
            Action::Terminate { .. } => "TerminateInstances",
            Action::Snapshot { .. } => "CreateSnapshot",
            Action::DeleteVolume { .. } => "DeleteVolume",
            Action::TagHold { .. } => "CreateTags",
            Action::Prune { .. } => "PruneSnapshots",
            Action::SaveOutput { .. } => "SaveOutput",
            Action::WriteReport => "WriteReport",
        }
    }
}

impl Action {
    /// Draws on EC2's shared bucket of mutating actions (RunInstances has
    /// its own).
    pub fn is_mutating(&self) -> bool {
        self.waits_for_call_budget() || matches!(self, Action::Terminate { .. })
    }

    /// Whether the next round of the same pass can build on this action at
    /// once, with no change in the cloud to wait for. A failed action always
    /// can: `apply` holds back an offline agent, releases a failed batch,
    /// keeps a volume or retries a launch elsewhere. So can a launch (the
    /// shared budget is asked again for the shards still waiting, and says
    /// when to come back), pruning and the report (the record's last steps).
    /// Any other call's effect shows in seconds (volumes) or comes as an
    /// event (instances, commands, snapshots), which the pass's wait covers.
    pub fn unlocks_at_once(&self, failed: bool) -> bool {
        failed
            || matches!(
                self,
                Action::Launch { .. } | Action::Prune { .. } | Action::WriteReport | Action::TagHold { .. }
            )
    }

    /// A mutating call that waits when the bucket is empty. TerminateInstances
    /// takes its token but never waits: it stops the billing, and takes up to
    /// 1,000 instances a call.
    pub fn waits_for_call_budget(&self) -> bool {
        matches!(
            self,
            Action::CreateVolume { .. } | Action::Attach { .. } | Action::Snapshot { .. } | Action::DeleteVolume { .. }
        )
    }
}

/// An action the pass did not run (the shared budget of calls had none
/// left): undo the intent that would make the next pass look for its result.
/// A send or snapshot that never ran cannot land: it is not waited for.
pub fn withdraw(record: &mut JobRecord, action: &Action, now: DateTime<Utc>) {
    if let Action::Snapshot { volume_id, look_first: false, .. } = action {
        for volume in record.shards.iter_mut().flat_map(|s| s.attempts.iter_mut()).flat_map(|a| a.volumes.iter_mut()) {
            if volume.volume_id.as_deref() == Some(volume_id.as_str())
                && volume.snapshot.as_ref().is_some_and(|s| s.snapshot_id.is_none())
            {
                volume.snapshot = None;
            }
        }
        return;
    }
    refused(record, action, now);
}

/// What an action returned.
#[derive(Debug)]
pub enum Done {
    Launched(Vec<InstanceView>),
    Created(String),
    Sent(String),
    Snapshotted(String),
    Pruned(Vec<String>),
    /// A create not started: it could not end before the lease does.
    NotStarted,
    Ok,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The job is terminal: no wake needed.
    Finished,
    /// Look again after this many seconds.
    After(u32),
}
