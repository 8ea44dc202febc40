//! The last part of a DR job: knowing whether a region's broker works
//! (`iotdr health serve`, [`check`] and [`serve`]) and pointing devices at
//! the region that does (`iotdr failover`, [`route53`]), both read from one
//! DR file ([`config`]).

pub mod check;
pub mod config;
pub mod route53;
pub mod serve;
pub mod watch;

pub use check::{CheckReport, MqttCheck};
pub use config::DrConfig;
pub use route53::{Decision, Route53, Step};
