//! Flotilla's domain: job spec, planner, lifecycle state machine, steps,
//! ports, AWS adapters and the in-memory fake cloud.

pub mod aws;
pub mod error;
pub mod fake;
pub mod handlers;
pub mod lifecycle;
pub mod plan;
pub mod ports;
pub mod record;
pub mod report;
pub mod shell;
pub mod spec;
pub mod sqs_batch;
pub mod steps;
