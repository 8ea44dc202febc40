//! Where raw records come from. Every source yields batches of records with
//! their origin and the position to resume from once the batch is stored;
//! the run loop stores the batch, then acknowledges it. One run loop serves
//! every source.

mod dynamodb_stream;
mod file;
mod mqtt;
mod scan;

pub use dynamodb_stream::{DynamodbStream, ShardGraph};
pub use file::FileSource;
pub use mqtt::{DEFAULT_TOPICS as MQTT_DEFAULT_TOPICS, MqttSettings, MqttSource};
pub use scan::{Reading, RegistryScan};

use std::future::Future;

/// One raw record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub text: String,
    /// Human-readable origin, e.g. `events.jsonl:12`.
    pub origin: String,
}

/// What one read of a source gave.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// (source key, position) pairs to store with the batch: where the source
    /// resumes after a restart once this batch is stored.
    pub checkpoints: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("source {source_name}: {message}")]
pub struct SourceError {
    pub source_name: String,
    pub message: String,
}

pub trait Source {
    /// Up to `max` records that are there now; an empty batch when there are none.
    fn read(&mut self, max: usize) -> impl Future<Output = Result<Batch, SourceError>>;

    /// Whether the last read found nothing more to give for now (`--until-idle` ends then).
    fn idle(&self) -> bool;

    /// Everything read so far is stored durably (its checkpoints included):
    /// sources that acknowledge to their broker do it now.
    fn acknowledge(&mut self) -> impl Future<Output = Result<(), SourceError>> {
        async { Ok(()) }
    }
}

/// Every source kind, so that the run loop is one generic function.
pub enum AnySource {
    File(FileSource),
    DynamodbStream(Box<DynamodbStream>),
    Mqtt(Box<MqttSource>),
    Scan(Box<RegistryScan>),
}

impl Source for AnySource {
    async fn read(&mut self, max: usize) -> Result<Batch, SourceError> {
        match self {
            AnySource::File(source) => source.read(max).await,
            AnySource::DynamodbStream(source) => source.read(max).await,
            AnySource::Mqtt(source) => source.read(max).await,
            AnySource::Scan(source) => source.read(max).await,
        }
    }

    fn idle(&self) -> bool {
        match self {
            AnySource::File(source) => source.idle(),
            AnySource::DynamodbStream(source) => source.idle(),
            AnySource::Mqtt(source) => source.idle(),
            AnySource::Scan(source) => source.idle(),
        }
    }

    async fn acknowledge(&mut self) -> Result<(), SourceError> {
        match self {
            AnySource::File(source) => source.acknowledge().await,
            AnySource::DynamodbStream(source) => source.acknowledge().await,
            AnySource::Mqtt(source) => source.acknowledge().await,
            AnySource::Scan(source) => source.acknowledge().await,
        }
    }
}
