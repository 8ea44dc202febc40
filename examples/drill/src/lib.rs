//! A DR drill on one machine. Two regions, each an AWS API (a moto server)
//! and an MQTT broker (mosquitto, mutual TLS); a DNS server (dnsmasq) whose
//! answers mirror the Route 53 records; and, running together:
//!
//! - `iotdr run`, replicating the primary's registry events (its MQTT
//!   `$aws/events` topics) into the secondary;
//! - `iotdr failover watch`, the health checker that decides failover and
//!   records it in Route 53 (moto's, in the secondary's server);
//! - the device client, connected by the failover name.
//!
//! Mid-stream the primary's broker and API stop together. The drill reports
//! the RPO (changes the primary's stream acknowledged that the secondary
//! lacks), the time until failover is decided, the time until the device is
//! online on the secondary, then brings the primary back and times the
//! failback. What it emulates and what real AWS does instead:
//! `examples/drill/README.md`.

pub mod backends;
mod drill;

pub use drill::{Options, Report, run};
