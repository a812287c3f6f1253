//! Typed errors. A cloud error keeps its AWS code and a retry class so a step
//! can decide between "wait and retry" and "give up and tear down".

use thiserror::Error;

/// Why a job spec was refused. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct SpecError {
    pub message: String,
}

impl SpecError {
    pub fn new(message: impl Into<String>) -> Self {
        SpecError { message: message.into() }
    }
}

/// How a failed AWS call should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryClass {
    /// Rate limited, as the SDK's own classifier says: it already backed off
    /// (adaptive mode); the job waits and tries again, and never fails for it.
    Throttled,
    /// Transport error, timeout or 5xx, as the SDK's classifiers say.
    Transient,
    /// No capacity for this instance type, AZ or market: try the next option.
    Capacity,
    /// Eventual consistency right after a create, e.g. an instance id SSM
    /// has not seen yet.
    NotYetVisible,
    /// The resource is gone; usually fine during teardown.
    NotFound,
    /// Bad request, missing permission, a referenced resource that does not
    /// exist: retrying will not help.
    Permanent,
}

#[derive(Debug, Error)]
pub enum CloudError {
    #[error("{service} {operation}: {code}: {message}")]
    Api { service: &'static str, operation: &'static str, code: String, message: String, class: RetryClass },
    #[error("{0}")]
    Invalid(String),
}

impl CloudError {
    pub fn class(&self) -> RetryClass {
        match self {
            CloudError::Api { class, .. } => *class,
            CloudError::Invalid(_) => RetryClass::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self.class(), RetryClass::Permanent)
    }

    /// Throttling or a transient fault: wait and try again, never fail for it.
    pub fn is_transient(&self) -> bool {
        matches!(self.class(), RetryClass::Throttled | RetryClass::Transient)
    }

    /// The AWS error code, for the few calls that treat one code specially.
    pub fn code(&self) -> Option<&str> {
        match self {
            CloudError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// An error whose class comes from the domain table alone (fakes, tests).
    pub fn api(service: &'static str, operation: &'static str, code: &str, message: &str) -> Self {
        let class = classify(code).unwrap_or(RetryClass::Permanent);
        CloudError::Api { service, operation, code: code.to_string(), message: message.to_string(), class }
    }

    /// An error the SDK classified first: `sdk` is its verdict for codes the
    /// domain table does not know.
    pub fn classified(
        service: &'static str,
        operation: &'static str,
        code: &str,
        message: &str,
        sdk: Option<RetryClass>,
    ) -> Self {
        // EC2 sends capacity errors as 5xx: what the domain knows about a code
        // (capacity, not found, not yet visible) wins over "5xx is transient".
        let class = match classify(code) {
            Some(domain @ (RetryClass::Capacity | RetryClass::NotFound | RetryClass::NotYetVisible)) => domain,
            domain => sdk.or(domain).unwrap_or(RetryClass::Permanent),
        };
        CloudError::Api { service, operation, code: code.to_string(), message: message.to_string(), class }
    }
}

/// The classes the SDK cannot know. Throttling and transient faults are not
/// here: the SDK's retry classifiers decide those (see `aws::cloud_error`).
pub fn classify(code: &str) -> Option<RetryClass> {
    Some(match code {
        // EC2 "Insufficient capacity" and spot errors, docs: AWSEC2/latest/APIReference/errors-overview.html
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientFreeAddressesInSubnet"
        | "InsufficientCapacityOnHost"
        | "Unsupported"
        | "SpotMaxPriceTooLow"
        | "MaxSpotInstanceCountExceeded"
        | "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "InsufficientVolumeCapacity" => RetryClass::Capacity,
        // EC2 "Eventual consistency" (AWSEC2/latest/devguide/eventual-consistency.html); SSM
        // answers InvalidInstanceId until the agent registers (SendCommand reference).
        "InvalidInstanceID.NotFound" | "InvalidInstanceId" | "InvalidInstanceInformationFilterValue" => {
            RetryClass::NotYetVisible
        }
        "InvalidVolume.NotFound"
        | "InvalidAttachment.NotFound"
        | "NoSuchKey"
        | "NotFound"
        | "InvocationDoesNotExist"
        | "InvalidCommandId"
        | "InvalidSnapshot.NotFound" => RetryClass::NotFound,
        // The simulator's and our own transport labels.
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "dispatch" | "timeout" | "response" => {
            RetryClass::Transient
        }
        "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => RetryClass::Throttled,
        _ => return None,
    })
}

/// Why handling a message could not complete. Retryable errors leave the SQS
/// message to be redelivered; the rest are recorded and dropped.
#[derive(Debug, Error)]
pub enum StepError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("job record {0} not found")]
    RecordMissing(String),
    #[error("job record {job_id} is corrupt: {reason}")]
    RecordCorrupt { job_id: String, reason: String },
    #[error("unreadable message: {0}")]
    BadMessage(String),
    #[error("job {0}: record kept changing; will retry")]
    Contended(String),
    /// Another reconciler took the lease over (ours had expired): stop at once.
    #[error("job {0}: lease lost to another reconciler")]
    LeaseLost(String),
}

impl StepError {
    /// Whether SQS redelivery could help.
    pub fn is_retryable(&self) -> bool {
        match self {
            StepError::Cloud(err) => err.is_retryable(),
            StepError::Contended(_) | StepError::LeaseLost(_) => true,
            _ => false,
        }
    }
}
