//! Checks made before a command writes (`sync`, `verify --repair`): the
//! source region and every target answer a read with these credentials.
//! Without them, an unreachable or forbidden region would show only at the
//! first write, retried until the run's deadline (hours), or as dead letters.
//! Writes themselves cannot be tried without making one; an identity that
//! may read and not write still fails at its first write, as a dead letter
//! naming the call.

use crate::aws::{AwsError, RegionClients, briefly};
use crate::config;

#[derive(Debug, thiserror::Error)]
#[error("{role} region {region} {what}: {error} (checked before any write; nothing was written)")]
pub struct PreflightError {
    pub role: &'static str,
    pub region: String,
    pub what: &'static str,
    pub error: AwsError,
}

/// Reads once from the source and from every target of `config`; with a
/// sync's `query`, the source runs it once too.
pub async fn check(config: &config::Pipeline, query: Option<&str>) -> Result<(), PreflightError> {
    let regions =
        std::iter::once(("source", &config.source_region)).chain(config.targets.iter().map(|t| ("target", t)));
    for (role, region) in regions {
        let settings = config.regions.get(region).cloned().unwrap_or_default();
        let fail = |what, error| PreflightError { role, region: region.clone(), what, error };
        let clients =
            RegionClients::connect(region, &settings, false).await.map_err(|e| fail("cannot be reached", e))?;
        briefly!(clients.iot.list_thing_types().max_results(1))
            .map_err(|e| fail("does not answer a read (ListThingTypes)", e))?;
        if let (Some(query), "source") = (query, role) {
            briefly!(clients.iot.search_index().query_string(query).max_results(1))
                .map_err(|e| fail("rejects the --query (SearchIndex; is fleet indexing on?)", e))?;
        }
    }
    Ok(())
}
