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

/// Sends an SDK request with [`retry_briefly`]: for one-off commands.
macro_rules! briefly {
    ($request:expr) => {{
        let request = $request;
        $crate::aws::retry_briefly(|| {
            let request = request.clone();
            async move { request.send().await.map_err($crate::aws::AwsError::from_sdk) }
        })
        .await
    }};
}
pub(crate) use briefly;

/// A call retried a few times on throttling and 5xx, then given up: for
/// one-off commands (setup, the checks before a sync writes) that should
/// say what is wrong rather than wait out the run's retry deadline.
pub async fn retry_briefly<T, F, Fut>(mut request: F) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AwsError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match request().await {
            Err(e) if e.retryable() && attempt < 4 => {
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await
            }
            other => return other,
        }
    }
}

mod apply;
mod clients;
mod errors;
mod fetch;
mod rate;
mod registry;

pub use apply::{Applied, Applier, ApplyError, DependencyWait, forget_known};
pub use clients::{RegionClients, sdk_config};
pub use errors::{AwsError, ErrorKind};
pub use fetch::{DEFERRED, ReadPlan, SourceFetcher, carries_pem};
pub use rate::{CallStats, DEFAULT_RATES, Limiter, RetryPolicy};
pub use registry::GlobalRegistry;
