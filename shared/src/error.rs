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
    /// Rate limited: retry later with backoff.
    Throttled,
    /// No capacity for this instance type or AZ: try another or fail over.
    Capacity,
    /// Eventual consistency, e.g. an instance id SSM has not seen yet.
    NotYetVisible,
    /// The resource is gone; usually fine during teardown.
    NotFound,
    /// Transport error or 5xx.
    Transient,
    /// Bad request, missing permission: retrying will not help.
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

    /// The AWS error code, for the few calls that treat one code specially.
    pub fn code(&self) -> Option<&str> {
        match self {
            CloudError::Api { code, .. } => Some(code),
            CloudError::Invalid(_) => None,
        }
    }

    pub fn api(service: &'static str, operation: &'static str, code: &str, message: &str) -> Self {
        CloudError::Api {
            service,
            operation,
            code: code.to_string(),
            message: message.to_string(),
            class: classify(code),
        }
    }
}

/// Map an AWS error code to a retry class.
pub fn classify(code: &str) -> RetryClass {
    match code {
        "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "SlowDown"
        | "RequestThrottled" => RetryClass::Throttled,
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "SpotMaxPriceTooLow"
        | "MaxSpotInstanceCountExceeded"
        | "InstanceLimitExceeded"
        | "Unsupported" => RetryClass::Capacity,
        "InvalidInstanceId" | "InvalidInstanceID.NotFound" | "InvalidInstanceInformationFilterValue" => {
            RetryClass::NotYetVisible
        }
        "InvalidVolume.NotFound"
        | "InvalidSnapshot.NotFound"
        | "InvalidAttachment.NotFound"
        | "NoSuchKey"
        | "NotFound"
        | "InvocationDoesNotExist"
        | "InvalidCommandId"
        | "IncorrectState"
        | "IncorrectInstanceState" => RetryClass::NotFound,
        "" | "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" | "dispatch" | "timeout"
        | "response" => RetryClass::Transient,
        _ => RetryClass::Permanent,
    }
}

/// Why a step could not complete. Retryable errors leave the SQS message to be
/// redelivered; the rest fail the job with a reason.
#[derive(Debug, Error)]
pub enum StepError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("job record {0} not found")]
    RecordMissing(String),
    #[error("job record {job_id} is corrupt: {reason}")]
    RecordCorrupt { job_id: String, reason: String },
    #[error("unreadable step message: {0}")]
    BadMessage(String),
    #[error("illegal transition: {0}")]
    Illegal(String),
    #[error("job {0}: record kept changing; will retry")]
    Contended(String),
    /// This message's successor was sent moments ago and may still be on its
    /// way; ask again later rather than resend it or drop this message.
    #[error("job {0}: next step message may still be in flight")]
    OutboxPending(String),
}

impl StepError {
    /// Whether SQS redelivery could help.
    pub fn is_retryable(&self) -> bool {
        match self {
            StepError::Cloud(err) => err.is_retryable(),
            StepError::Contended(_) | StepError::OutboxPending(_) => true,
            _ => false,
        }
    }
}
