//! The states AWS reports, as enums: parsed once where a reply is read (the
//! adapters, the record's JSON), compared as variants everywhere else. A
//! name this code does not know (AWS adds states) parses as `Other`, keeps
//! its text, and matches no rule written for a known state.

/// An enum of names as they are written on the wire (AWS's states, a
/// wake's trigger), each spelled exactly as written.
macro_rules! aws_names {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
            /// A name this code does not know.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Other(text) => text,
                }
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                match text {
                    $($text => $name::$variant,)+
                    _ => $name::Other(text.to_string()),
                }
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                $name::from(text.as_str())
            }
        }

        impl From<$name> for String {
            fn from(state: $name) -> Self {
                state.as_str().to_string()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use aws_names;

aws_names! {
    /// An EC2 instance's state (`InstanceStateName`).
    InstanceState {
        Pending = "pending",
        Running = "running",
        ShuttingDown = "shutting-down",
        Terminated = "terminated",
        Stopping = "stopping",
        Stopped = "stopped",
    }
}

aws_names! {
    /// An EBS volume's state (`VolumeState`).
    VolumeState {
        Creating = "creating",
        Available = "available",
        InUse = "in-use",
        Deleting = "deleting",
        Deleted = "deleted",
        Error = "error",
    }
}

aws_names! {
    /// An EBS snapshot's state (`SnapshotState`).
    SnapshotState {
        Pending = "pending",
        Completed = "completed",
        Error = "error",
        Recoverable = "recoverable",
        Recovering = "recovering",
    }
}

aws_names! {
    /// An SSM command invocation's status (`CommandInvocationStatus`, and
    /// the detailed statuses GetCommandInvocation reports).
    CommandStatus {
        Pending = "Pending",
        InProgress = "InProgress",
        Delayed = "Delayed",
        Success = "Success",
        Cancelled = "Cancelled",
        Cancelling = "Cancelling",
        TimedOut = "TimedOut",
        Failed = "Failed",
        DeliveryTimedOut = "DeliveryTimedOut",
        ExecutionTimedOut = "ExecutionTimedOut",
        Undeliverable = "Undeliverable",
        Terminated = "Terminated",
        InvalidPlatform = "InvalidPlatform",
        AccessDenied = "AccessDenied",
    }
}

impl CommandStatus {
    /// Ended, one way or another (`Cancelling` is not yet).
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            CommandStatus::Success
                | CommandStatus::Failed
                | CommandStatus::TimedOut
                | CommandStatus::Cancelled
                | CommandStatus::Undeliverable
                | CommandStatus::Terminated
                | CommandStatus::DeliveryTimedOut
        )
    }
}

impl InstanceState {
    /// Stopped or on its way out: its work is lost.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            InstanceState::ShuttingDown | InstanceState::Terminated | InstanceState::Stopping | InstanceState::Stopped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_to_their_variants_and_unknown_names_survive() {
        assert_eq!(InstanceState::from("shutting-down"), InstanceState::ShuttingDown);
        assert_eq!(VolumeState::from("in-use"), VolumeState::InUse);
        assert_eq!(SnapshotState::from("completed"), SnapshotState::Completed);
        assert_eq!(CommandStatus::from("TimedOut"), CommandStatus::TimedOut);
        let later = SnapshotState::from("archived");
        assert_eq!(later, SnapshotState::Other("archived".into()));
        let json = serde_json::to_string(&later).expect("json");
        assert_eq!(json, r#""archived""#);
        assert_eq!(serde_json::from_str::<SnapshotState>(r#""pending""#).expect("parse"), SnapshotState::Pending);
    }
}
