//! Flotilla's domain: job spec, planner, the reconciler (one pure decision
//! function and the loop around it), ports and AWS adapters. Test support
//! (the simulated cloud, the simulator) is in `testkit/`.

// aws_lambda_events' types are #[non_exhaustive]: built from Default, then set.
#![allow(clippy::field_reassign_with_default)]
// No function over 80 lines of code (clippy.toml); `make lint` denies warnings.
#![warn(clippy::too_many_lines)]

pub mod admission;
#[cfg(feature = "aws")]
pub mod aws;
pub mod error;
pub mod events;
pub mod explain;
pub mod fence;
#[cfg(feature = "aws")]
pub mod handlers;
pub mod hash;
pub mod inbox;
pub mod index;
pub mod intake;
pub mod metrics;
pub mod mutation;
pub mod notice;
pub mod own_cost;
pub mod plan;
pub mod ports;
pub mod publish;
pub mod reaper;
pub mod reconcile;
pub mod record;
pub mod report;
#[cfg(feature = "aws")]
pub mod report_html;
pub mod retention;
pub mod settings;
pub mod shell;
pub mod sources;
pub mod spec;
#[cfg(feature = "aws")]
pub mod sqs_batch;
pub mod states;
pub mod tags;
pub mod task_token;
pub mod wake;
pub mod work;
