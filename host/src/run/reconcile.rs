//! The reconcile part of `iotdr run` (`[reconcile] every`): AWS publishes
//! no event when a certificate's status changes, a policy gets a new
//! version, a principal is detached, or someone edits a target by hand.
//! Every period, once the queue is empty (drift that is only queued is not
//! drift), it verifies the targets against the source through the stages
//! (`verify`) and queues the source's events of what drifted, which apply
//! then passes through the stages like any other. Extras (in a target, not
//! in the source) are reported, never deleted: a live run only writes what
//! the source says; `iotdr verify --repair` deletes them.

use super::RunError;
use super::reload::Reload;
use crate::aws::Limiter;
use crate::config;
use crate::pipeline::Pipeline;
use crate::state::StateStore;
use crate::state::queue::Ingested;
use crate::verify::{Reads, to_queue, verify};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify};

pub struct Reconcile {
    pub every: Duration,
    /// Its own instances of the stages: apply's are busy beside it.
    pub pipeline: Mutex<Pipeline>,
    /// The run's limiter: its reads share the run's buckets.
    pub limiter: Arc<Limiter>,
}

impl Reconcile {
    /// Reconciles every period, for as long as the run follows its source.
    pub(super) async fn run(
        &self,
        config: &config::Pipeline,
        store: &StateStore,
        queued: &Notify,
        poll: Duration,
        reload: Option<&Reload>,
    ) -> Result<(), RunError> {
        let mut version = reload.map_or(1, Reload::serving);
        loop {
            tokio::time::sleep(self.every).await;
            while store.queue_len()? > 0 {
                tokio::time::sleep(poll).await;
            }
            let mut pipeline = self.pipeline.lock().await;
            // Compare through the stages that serve now: a hot swap changed them.
            if let Some(reload) = reload
                && reload.serving() != version
            {
                match reload.build_serving() {
                    Ok(built) => {
                        *pipeline = built;
                        version = reload.serving();
                    }
                    Err(e) => {
                        tracing::warn!(
                            "reconcile skipped, tried again in {:?}: building version {}: {e}",
                            self.every,
                            reload.serving()
                        );
                        continue;
                    }
                }
            }
            let verification = match verify(config, &mut pipeline, self.limiter.clone(), None, &Reads::expected()).await
            {
                Ok(verification) => verification,
                // The source region may be down: that is what iotdr is for. Next period.
                Err(e) => {
                    tracing::warn!("reconcile failed, tried again in {:?}: {e}", self.every);
                    continue;
                }
            };
            let events = to_queue(&verification);
            if !events.is_empty() {
                store.ingest(&Ingested { events: &events, ..Default::default() })?;
                queued.notify_one();
            }
            for report in &verification.reports {
                for (kind, counts) in &report.kinds {
                    if !counts.extra.is_empty() {
                        tracing::warn!(
                            region = report.region,
                            "{} {kind} in the target that the source does not have (left alone; `iotdr verify --repair` deletes them): {}",
                            counts.extra.len(),
                            counts.extra.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                        );
                    }
                }
            }
            tracing::info!(
                drift = verification.drift(),
                queued = events.len(),
                "reconciled the targets with the source"
            );
        }
    }
}
