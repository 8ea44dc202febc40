//! The AWS side of a run: SDK clients per region, error classification, rate
//! limits with retries, and the applier that turns planned calls into changes.

mod apply;
mod clients;
mod errors;
mod fetch;
mod rate;
mod registry;

pub use apply::{Applied, Applier, ApplyError, DependencyWait};
pub use clients::RegionClients;
pub use errors::{AwsError, ErrorKind};
pub use fetch::{ReadPlan, SourceFetcher, carries_pem};
pub use rate::{CallStats, DEFAULT_RATES, Limiter, RetryPolicy};
pub use registry::GlobalRegistry;
