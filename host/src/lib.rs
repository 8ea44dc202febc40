//! iotdr: disaster recovery for AWS IoT fleets.
//!
//! The flow of one event: a `source` yields raw records, `event` decodes them,
//! the `pipeline` runs them through Wasm stages (`plugin`), `plan` turns the
//! result into API calls per target region and a `sink` applies them; `run`
//! drives that loop and `state` keeps what must survive a restart.

pub mod admin;
pub mod aws;
pub mod config;
pub mod context;
pub mod event;
pub mod failover;
pub mod into_table;
pub mod order;
pub mod pipeline;
pub mod pipeline_tests;
pub mod plan;
pub mod plugin;
pub mod preflight;
pub mod progress;
pub mod run;
pub mod setup;
pub mod sink;
pub mod source;
pub mod state;
pub mod verify;
