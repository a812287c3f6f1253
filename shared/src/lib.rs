//! Flotilla's domain: job spec, planner, the reconciler (one pure decision
//! function and the loop around it), ports, AWS adapters and the simulated
//! cloud.

pub mod admission;
#[cfg(feature = "aws")]
pub mod aws;
pub mod error;
pub mod fake;
#[cfg(feature = "aws")]
pub mod handlers;
pub mod intake;
pub mod mutation;
pub mod plan;
pub mod ports;
pub mod reaper;
pub mod reconcile;
pub mod record;
pub mod report;
pub mod retention;
pub mod shell;
#[cfg(feature = "aws")]
pub mod sim;
pub mod sources;
pub mod spec;
#[cfg(feature = "aws")]
pub mod sqs_batch;
pub mod work;
