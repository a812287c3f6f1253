//! The notify queue's wire format: a job's notices (one EventBridge event
//! each, or a heartbeat) and the answers to a waiting Step Functions task.
//! `events` makes them; the notify function delivers them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `source` of every event Flotilla puts on EventBridge.
pub const SOURCE: &str = "flotilla";
pub const JOB_STATE_CHANGE: &str = "Flotilla Job State Change";
pub const SHARD_STATE_CHANGE: &str = "Flotilla Shard State Change";
pub const DEBUG_HOLD: &str = "Flotilla Debug Hold";

/// One event to put on EventBridge, and what to tell a waiting task.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// `<job id>:<sequence>`: the same notice sent twice has the same id.
    pub event_id: String,
    pub sequence: u64,
    /// None for a heartbeat, which is no event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail_type: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskAnswer>,
}

impl Notice {
    /// A heartbeat: no event, only "still working" to a waiting task.
    pub fn is_heartbeat(&self) -> bool {
        self.detail_type.is_none() && matches!(self.task, Some(TaskAnswer::Heartbeat { .. }))
    }
}

/// Never print a task token: whoever has it can end the caller's task.
impl std::fmt::Debug for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notice")
            .field("event_id", &self.event_id)
            .field("detail_type", &self.detail_type)
            .field("task", &self.task.as_ref().map(TaskAnswer::kind))
            .finish()
    }
}

/// One notify-queue message: a job's notices, in sequence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoticeBatch {
    pub job_id: String,
    pub notices: Vec<Notice>,
}

/// Notices per notify-queue message: SQS takes 256 KiB a message, and a
/// notice stays under about 8 KiB (snapshot lists cut, 20 output lines).
pub const NOTICES_PER_MESSAGE: usize = 25;

/// The answer to a Step Functions task that waits on the job
/// (`.waitForTaskToken`), with the task's token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum TaskAnswer {
    /// SendTaskSuccess with the job's summary as output.
    Success { token: String, output: Value },
    /// SendTaskFailure with an error name a `Catch` matches (`errors`).
    Failure { token: String, error: String, cause: String },
    /// SendTaskHeartbeat: still working.
    Heartbeat { token: String },
}

impl TaskAnswer {
    pub fn kind(&self) -> &'static str {
        match self {
            TaskAnswer::Success { .. } => "success",
            TaskAnswer::Failure { .. } => "failure",
            TaskAnswer::Heartbeat { .. } => "heartbeat",
        }
    }

    pub fn token(&self) -> &str {
        match self {
            TaskAnswer::Success { token, .. } | TaskAnswer::Failure { token, .. } | TaskAnswer::Heartbeat { token } => {
                token
            }
        }
    }
}

/// The error names SendTaskFailure carries, for a state machine's `Catch`.
pub mod errors {
    pub const FAILED: &str = "Flotilla.JobFailed";
    pub const CANCELLED: &str = "Flotilla.JobCancelled";
    pub const REJECTED: &str = "Flotilla.JobRejected";
}
