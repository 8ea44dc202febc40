//! The AWS side of a run: SDK clients per region, error classification, rate
//! limits with retries, and the applier that turns planned calls into changes.

/// Sends an SDK request from a reader holding `limiter` and `clients` (the
/// fetch at ingest, the scan): through the run's limiter, as `$operation` in
/// the clients' region, with its retries.
macro_rules! limited {
    ($self:ident, $operation:literal, $request:expr) => {{
        let request = $request;
        $self
            .limiter
            .send(&$self.clients.region, $operation, || {
                let request = request.clone();
                async move { request.send().await.map_err($crate::aws::AwsError::from_sdk) }
            })
            .await
    }};
}
pub(crate) use limited;

mod apply;
mod clients;
mod errors;
mod fetch;
mod rate;
mod registry;

pub use apply::{Applied, Applier, ApplyError, DependencyWait, forget_known};
pub use clients::RegionClients;
pub use errors::{AwsError, ErrorKind};
pub use fetch::{ReadPlan, SourceFetcher, carries_pem};
pub use rate::{CallStats, DEFAULT_RATES, Limiter, RetryPolicy};
pub use registry::GlobalRegistry;
