//! Applies jobs to the target regions through the AWS SDK: dependency levels
//! from `order`, concurrency within a level, the applier for each job.

use super::{Job, JobResult, Sink, SinkError};
use crate::aws::{
    Applied, Applier, ApplyError, AwsError, CallStats, DependencyWait, GlobalRegistry, Limiter, RegionClients,
};
use crate::config;
use crate::state::StateStore;
use crate::state::ledger::entity_in;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AwsSinkError {
    #[error("connecting to {region}: {error}")]
    Connect { region: String, error: AwsError },
}

pub struct AwsSink {
    applier: Applier,
    registry: Option<GlobalRegistry>,
    concurrency: usize,
    targets: Vec<String>,
}

impl AwsSink {
    /// Connects to every target region of the pipeline; `limiter` is the
    /// run's one limiter (one bucket per region and operation).
    pub async fn connect(
        pipeline: &config::Pipeline,
        state: Arc<StateStore>,
        limiter: Arc<Limiter>,
    ) -> Result<AwsSink, AwsSinkError> {
        let apply = &pipeline.apply;
        let mut regions = HashMap::new();
        for region in &pipeline.targets {
            let settings = pipeline.regions.get(region).cloned().unwrap_or_default();
            let clients = RegionClients::connect(region, &settings, true)
                .await
                .map_err(|error| AwsSinkError::Connect { region: region.clone(), error })?;
            regions.insert(region.clone(), clients);
        }
        let wait = DependencyWait { attempts: apply.dependency_attempts, pause: apply.dependency_pause };
        let registry = match &apply.global_registry_table {
            None => None,
            Some(table) => {
                let region = apply.global_registry_region.clone().unwrap_or_else(|| pipeline.targets[0].clone());
                let client = match regions.get(&region) {
                    Some(clients) => clients.dynamodb.clone(),
                    None => {
                        let settings = pipeline.regions.get(&region).cloned().unwrap_or_default();
                        RegionClients::connect(&region, &settings, false)
                            .await
                            .map_err(|error| AwsSinkError::Connect { region: region.clone(), error })?
                            .dynamodb
                    }
                };
                let registry = GlobalRegistry::new(client, &region, table, limiter.clone());
                registry
                    .ensure_table()
                    .await
                    .map_err(|error| AwsSinkError::Connect { region: region.clone(), error })?;
                Some(registry)
            }
        };
        Ok(AwsSink {
            applier: Applier::new(regions, limiter, state, wait),
            registry,
            concurrency: apply.concurrency,
            targets: pipeline.targets.clone(),
        })
    }

    /// The IoT requests sent to the target regions so far (the global
    /// registry's DynamoDB writes are counted with their own operation name,
    /// `UpdateItem`, and left out here).
    pub fn stats(&self) -> CallStats {
        self.applier.limiter().stats(&self.targets, &["UpdateItem", "DescribeTable", "CreateTable"])
    }
}

impl Sink for AwsSink {
    async fn apply(&mut self, jobs: &[Job]) -> Result<Vec<JobResult>, SinkError> {
        let levels = crate::order::levels(jobs.iter().map(|j| (j.region.as_str(), &j.event)));
        let mut results: Vec<Option<JobResult>> = vec![None; jobs.len()];
        let top = levels.iter().copied().max().unwrap_or(0);
        let applier = &self.applier;
        let concurrency = self.concurrency;
        {
            // (region, ledger key) of the changes that wait: a later change of
            // the same entity waits behind them instead of overtaking them.
            let mut held = std::collections::HashSet::new();
            let key = |job: &Job| entity_in(&job.event, &job.region);
            for level in 0..=top {
                let mut runs = Vec::new();
                for (i, job) in jobs.iter().enumerate().filter(|(i, _)| levels[*i] == level) {
                    if key(job).is_some_and(|key| held.contains(&key)) {
                        results[i] =
                            Some(JobResult::Waiting("behind an earlier change of the same entity that waits".into()));
                        continue;
                    }
                    runs.push(async move { (i, applier.apply(&job.event, &job.region, &job.calls).await) });
                }
                let mut done = futures_util::stream::iter(runs).buffer_unordered(concurrency);
                while let Some((index, result)) = done.next().await {
                    if let Err(e) = &result
                        && e.is_missing_dependency()
                        && let Some(key) = key(&jobs[index])
                    {
                        held.insert(key);
                    }
                    results[index] = Some(match result {
                        Ok(Applied::Done) => JobResult::Applied,
                        Ok(Applied::Stale) => JobResult::Stale,
                        Err(ApplyError::State(e)) => return Err(SinkError::State(e.to_string())),
                        Err(e) if e.is_missing_dependency() => JobResult::Waiting(e.to_string()),
                        Err(e) => JobResult::Failed(e.to_string()),
                    });
                }
            }
            if let Some(registry) = &self.registry {
                record_in_registry(registry, jobs, &levels, &mut results, concurrency).await;
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every level ran")).collect())
    }
}

/// Records every applied event once in the global registry: per thing in
/// the order they were applied (source order, but for a change that waited
/// in its batch for a creation), things concurrently. A failure marks the
/// event's first job failed, so it is dead-lettered (and a replay records it
/// again), and so are the thing's later events, which must not overtake it.
async fn record_in_registry(
    registry: &GlobalRegistry,
    jobs: &[Job],
    levels: &[usize],
    results: &mut [Option<JobResult>],
    concurrency: usize,
) {
    let mut per_thing: Vec<(String, Vec<usize>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut applied_order: Vec<usize> = (0..jobs.len()).collect();
    applied_order.sort_by_key(|&index| (levels[index], index));
    for index in applied_order {
        let job = &jobs[index];
        let applied = matches!(results[index], Some(JobResult::Applied));
        if !applied
            || !GlobalRegistry::records(job.event.entity)
            || !seen.insert((job.event.id.as_str(), job.event.name.as_str(), job.event.entity))
        {
            continue;
        }
        match per_thing.iter_mut().find(|(name, _)| *name == job.event.name) {
            Some((_, indices)) => indices.push(index),
            None => per_thing.push((job.event.name.clone(), vec![index])),
        }
    }
    let runs = per_thing.into_iter().map(|(_, indices)| async move {
        for (at, &index) in indices.iter().enumerate() {
            if let Err(e) = registry.record(&jobs[index].event).await {
                return Some((e, indices[at..].to_vec()));
            }
        }
        None
    });
    let mut done = futures_util::stream::iter(runs).buffer_unordered(concurrency);
    while let Some(outcome) = done.next().await {
        if let Some((e, failed)) = outcome {
            results[failed[0]] = Some(JobResult::Failed(format!("global registry: UpdateItem: {e}")));
            for &index in &failed[1..] {
                let reason =
                    format!("global registry: an earlier change to {} failed to be recorded", jobs[index].event.name);
                results[index] = Some(JobResult::Failed(reason));
            }
        }
    }
}
