//! What the CLI prints: text for a person, or JSON (`--output json`) for a
//! program. Every JSON document names its schema and version
//! (`"schema": "flotilla.<kind>/1"`); a version changes only when a field
//! is removed or changes meaning (fields are added freely). docs/cli.md
//! describes each.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// The version every schema is at.
pub const SCHEMA_VERSION: u32 = 1;

/// `body` with its schema's name, printed on one line.
pub fn print_json(kind: &str, mut body: Value) {
    if let Value::Object(map) = &mut body {
        map.insert("schema".into(), json!(format!("flotilla.{kind}/{SCHEMA_VERSION}")));
    }
    println!("{body}");
}

/// Why the CLI stops, each with its exit code (docs/cli.md, "Exit codes").
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// 1: the job ended other than SUCCEEDED, or the spec is refused.
    #[error("{0}")]
    NotSucceeded(String),
    /// 3: no such job.
    #[error("no job {0} (not submitted yet, intake has not read it, or another deployment)")]
    NoSuchJob(String),
    /// 4: `watch` or `logs --follow` gave up before the job ended.
    #[error("{0}")]
    TimedOut(String),
}

/// The exit code of an error: a `Failure`'s own, else 2 (usage,
/// configuration, or an AWS call that failed).
pub fn exit_code(err: &anyhow::Error) -> i32 {
    match err.downcast_ref::<Failure>() {
        Some(Failure::NotSucceeded(_)) => 1,
        Some(Failure::NoSuchJob(_)) => 3,
        Some(Failure::TimedOut(_)) => 4,
        None => 2,
    }
}
