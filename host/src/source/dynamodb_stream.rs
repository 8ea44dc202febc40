//! The DynamoDB stream of the table an IoT topic rule fills from the source
//! region's `$aws/events/#`, JITR and shadow `accepted` topics. Each item
//! carries `topic` (S) and `payload` (M); the keys are the rule's choice.
//!
//! Every shard is read; a child shard only once its parent is finished (the
//! Kinesis Client Library's rule), so one entity's records stay in order
//! across a split. Each shard's position (the last sequence number handed
//! out, or `end`) is a checkpoint stored with the batch it ends; a restart
//! resumes after it. A shard without one starts at the trim horizon (or the
//! stream's latest record, `start = "latest"`).

use super::{Batch, Record, Source, SourceError};
use crate::aws::{AwsError, ErrorKind, Limiter, RegionClients};
use crate::config::StreamStart;
use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, ShardIteratorType};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the shard list is read again while nothing ends (new shards
/// appear when AWS splits one, about every four hours).
const RELIST_EVERY: Duration = Duration::from_secs(60);
/// GetRecords returns at most this many records.
const MAX_RECORDS: usize = 1000;

/// Which shards may be read now: a shard whose parent is still being read
/// waits for it. Pure bookkeeping, so the rule is tested without a stream
/// that splits (moto's never does).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ShardGraph {
    /// shard → its parent, for every shard the stream lists.
    parents: BTreeMap<String, Option<String>>,
    finished: HashSet<String>,
}

impl ShardGraph {
    /// The shards as the stream lists them now, (shard, parent).
    pub fn list(&mut self, shards: impl IntoIterator<Item = (String, Option<String>)>) {
        self.parents = shards.into_iter().collect();
    }

    pub fn finish(&mut self, shard: &str) {
        self.finished.insert(shard.to_string());
    }

    pub fn is_finished(&self, shard: &str) -> bool {
        self.finished.contains(shard)
    }

    /// Shards to read, oldest first (shard ids sort by creation): not
    /// finished, and their parent finished or no longer listed (trimmed
    /// away with everything it held, which was read before or expired).
    pub fn readable(&self) -> Vec<String> {
        self.parents
            .iter()
            .filter(|(shard, _)| !self.finished.contains(*shard))
            .filter(|(_, parent)| match parent {
                None => true,
                Some(parent) => self.finished.contains(parent) || !self.parents.contains_key(parent),
            })
            .map(|(shard, _)| shard.clone())
            .collect()
    }
}

/// Where one shard is.
#[derive(Debug, Clone, PartialEq)]
enum Position {
    /// Nothing handed out yet: start at the configured place.
    Start,
    After(String),
    End,
}

impl Position {
    fn parse(text: &str) -> Position {
        match text.strip_prefix("after:") {
            Some(sequence) => Position::After(sequence.to_string()),
            None if text == "end" => Position::End,
            None => Position::Start,
        }
    }

    fn text(&self) -> String {
        match self {
            Position::Start => "start".into(),
            Position::After(sequence) => format!("after:{sequence}"),
            Position::End => "end".into(),
        }
    }
}

pub struct DynamodbStream {
    table: String,
    clients: RegionClients,
    limiter: Arc<Limiter>,
    start: StreamStart,
    stream_arn: Option<String>,
    graph: ShardGraph,
    positions: HashMap<String, Position>,
    iterators: HashMap<String, String>,
    /// Checkpoints stored before this run (by stream ARN and shard), read once the stream is known.
    stored: HashMap<String, String>,
    listed_at: Option<Instant>,
    idle: bool,
}

impl DynamodbStream {
    /// `stored` holds this source's checkpoints (see [`DynamodbStream::checkpoint_prefix`]).
    pub fn new(
        table: &str,
        clients: RegionClients,
        limiter: Arc<Limiter>,
        start: StreamStart,
        stored: HashMap<String, String>,
    ) -> DynamodbStream {
        DynamodbStream {
            table: table.to_string(),
            clients,
            limiter,
            start,
            stream_arn: None,
            graph: ShardGraph::default(),
            positions: HashMap::new(),
            iterators: HashMap::new(),
            stored,
            listed_at: None,
            idle: false,
        }
    }

    /// The prefix of every checkpoint key of `table`'s stream source.
    pub fn checkpoint_prefix(table: &str) -> String {
        format!("dynamodb-stream:{table}:")
    }

    fn key(&self, shard: &str) -> String {
        format!("{}{}/{shard}", Self::checkpoint_prefix(&self.table), self.stream_arn.as_deref().unwrap_or(""))
    }

    fn error(&self, message: String) -> SourceError {
        SourceError { source_name: format!("dynamodb-stream {}", self.table), message }
    }

    async fn stream_arn(&mut self) -> Result<String, SourceError> {
        if let Some(arn) = &self.stream_arn {
            return Ok(arn.clone());
        }
        let client = &self.clients.dynamodb;
        let table = self.table.clone();
        let described = self
            .limiter
            .send(&self.clients.region, "DescribeTable", || {
                let request = client.describe_table().table_name(&table);
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await
            .map_err(|e| self.error(format!("DescribeTable: {e}")))?;
        let arn = described.table.and_then(|t| t.latest_stream_arn).ok_or_else(|| {
            self.error("the table has no stream: enable one with the NEW_IMAGE view (see docs/pipelines.md)".into())
        })?;
        self.stream_arn = Some(arn.clone());
        Ok(arn)
    }

    /// Reads the shard list again (all pages) and learns the positions of shards new to this run.
    async fn list_shards(&mut self) -> Result<(), SourceError> {
        let arn = self.stream_arn().await?;
        let mut shards = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let client = &self.clients.streams;
            let (arn, from) = (arn.clone(), after.clone());
            let page = self
                .limiter
                .send(&self.clients.region, "DescribeStream", || {
                    let request = client.describe_stream().stream_arn(&arn).set_exclusive_start_shard_id(from.clone());
                    async move { request.send().await.map_err(AwsError::from_sdk) }
                })
                .await
                .map_err(|e| self.error(format!("DescribeStream: {e}")))?;
            let description = page
                .stream_description
                .unwrap_or_else(|| aws_sdk_dynamodbstreams::types::StreamDescription::builder().build());
            after = description.last_evaluated_shard_id.clone();
            for shard in description.shards.unwrap_or_default() {
                if let Some(id) = shard.shard_id {
                    shards.push((id, shard.parent_shard_id));
                }
            }
            if after.is_none() {
                break;
            }
        }
        for (shard, _) in &shards {
            if !self.positions.contains_key(shard) {
                let stored = self.stored.get(&self.key(shard)).map(|p| Position::parse(p)).unwrap_or(Position::Start);
                if stored == Position::End {
                    self.graph.finish(shard);
                }
                self.positions.insert(shard.clone(), stored);
            }
        }
        self.graph.list(shards);
        self.listed_at = Some(Instant::now());
        Ok(())
    }

    async fn iterator(&mut self, shard: &str) -> Result<Option<String>, SourceError> {
        if let Some(iterator) = self.iterators.get(shard) {
            return Ok(Some(iterator.clone()));
        }
        let arn = self.stream_arn().await?;
        let (kind, sequence) = match self.positions.get(shard).cloned().unwrap_or(Position::Start) {
            Position::After(sequence) => (ShardIteratorType::AfterSequenceNumber, Some(sequence)),
            Position::Start if self.start == StreamStart::Latest => (ShardIteratorType::Latest, None),
            Position::Start => (ShardIteratorType::TrimHorizon, None),
            Position::End => return Ok(None),
        };
        let client = &self.clients.streams;
        let got = self
            .limiter
            .send(&self.clients.region, "GetShardIterator", || {
                let request = client
                    .get_shard_iterator()
                    .stream_arn(&arn)
                    .shard_id(shard)
                    .shard_iterator_type(kind.clone())
                    .set_sequence_number(sequence.clone());
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await;
        match got {
            Ok(out) => {
                let iterator = out.shard_iterator;
                if let Some(iterator) = &iterator {
                    self.iterators.insert(shard.to_string(), iterator.clone());
                }
                Ok(iterator)
            }
            // Trimmed away since it was listed: finished, as far as anyone can read it.
            Err(e) if e.is(ErrorKind::NotFound) => {
                tracing::warn!(table = %self.table, shard, "shard no longer in the stream: {e}");
                self.graph.finish(shard);
                Ok(None)
            }
            Err(e) => Err(self.error(format!("GetShardIterator {shard}: {e}"))),
        }
    }

    /// One GetRecords call on `shard`: records as text, and whether the shard ended.
    async fn read_shard(&mut self, shard: &str, max: usize, out: &mut Vec<Record>) -> Result<bool, SourceError> {
        let Some(iterator) = self.iterator(shard).await? else { return Ok(self.graph.is_finished(shard)) };
        let client = &self.clients.streams;
        let limit = max.clamp(1, MAX_RECORDS) as i32;
        let got = self
            .limiter
            .send(&self.clients.region, "GetRecords", || {
                let request = client.get_records().shard_iterator(&iterator).limit(limit);
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await;
        let page = match got {
            Ok(page) => page,
            Err(e) => {
                // An expired or refused iterator: get a new one from where
                // this shard is, next time. Data trimmed before it was read
                // is gone: say so, and go on from the oldest that is left.
                self.iterators.remove(shard);
                if e.code == "TrimmedDataAccessException" {
                    tracing::error!(table = %self.table, shard, "records expired before they were read: {e}");
                    self.positions.insert(shard.to_string(), Position::Start);
                } else if e.code != "ExpiredIteratorException" {
                    return Err(self.error(format!("GetRecords {shard}: {e}")));
                }
                return Ok(false);
            }
        };
        for record in page.records.unwrap_or_default() {
            let Some(stream) = record.dynamodb else { continue };
            let Some(sequence) = stream.sequence_number.clone() else { continue };
            self.positions.insert(shard.to_string(), Position::After(sequence.clone()));
            // An item removed (TTL expiry, clean-up) is no event.
            if record.event_name == Some(OperationType::Remove) {
                continue;
            }
            let origin = format!("{} {shard} {sequence}", self.table);
            let text = match stream.new_image {
                Some(image) => Value::Object(image_json(&image)).to_string(),
                None => json!({ "dynamodb": { "SequenceNumber": sequence } }).to_string(),
            };
            out.push(Record { text, origin });
        }
        match page.next_shard_iterator {
            Some(next) => {
                self.iterators.insert(shard.to_string(), next);
                Ok(false)
            }
            None => {
                // A closed shard read to its end: its children may go now.
                self.iterators.remove(shard);
                self.positions.insert(shard.to_string(), Position::End);
                self.graph.finish(shard);
                Ok(true)
            }
        }
    }
}

impl Source for DynamodbStream {
    async fn read(&mut self, max: usize) -> Result<Batch, SourceError> {
        if self.listed_at.is_none_or(|at| at.elapsed() >= RELIST_EVERY) {
            self.list_shards().await?;
        }
        let mut records = Vec::new();
        let mut touched = Vec::new();
        let mut ended = false;
        for shard in self.graph.readable() {
            if records.len() >= max {
                break;
            }
            let before = records.len();
            ended |= self.read_shard(&shard, max - records.len(), &mut records).await?;
            if records.len() > before || self.graph.is_finished(&shard) {
                touched.push(shard);
            }
        }
        if ended {
            // Children of what ended may be listed by now.
            self.list_shards().await?;
        }
        self.idle = records.is_empty() && !ended;
        let checkpoints = touched
            .iter()
            .map(|shard| (self.key(shard), self.positions.get(shard).unwrap_or(&Position::Start).text()))
            .collect();
        Ok(Batch { records, checkpoints })
    }

    fn idle(&self) -> bool {
        self.idle
    }
}

/// An item image as DynamoDB's typed JSON (`{"S": ...}`, `{"M": {...}}`), the
/// form the decoder reads.
fn image_json(image: &HashMap<String, AttributeValue>) -> Map<String, Value> {
    image.iter().map(|(k, v)| (k.clone(), attribute_json(v))).collect()
}

fn attribute_json(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(_) => json!({ "NULL": true }),
        AttributeValue::M(map) => json!({ "M": image_json(map) }),
        AttributeValue::L(list) => json!({ "L": list.iter().map(attribute_json).collect::<Vec<_>>() }),
        AttributeValue::Ss(set) => json!({ "SS": set }),
        AttributeValue::Ns(set) => json!({ "NS": set }),
        // Binary values carry nothing the decoder reads.
        _ => json!({ "NULL": true }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>) -> (String, Option<String>) {
        (id.to_string(), parent.map(str::to_string))
    }

    #[test]
    fn a_child_waits_until_its_parent_is_finished() {
        let mut graph = ShardGraph::default();
        graph.list([shard("s-1", None), shard("s-2", Some("s-1")), shard("s-3", Some("s-1"))]);
        assert_eq!(graph.readable(), ["s-1"], "the split's children wait");
        graph.finish("s-1");
        assert_eq!(graph.readable(), ["s-2", "s-3"], "both halves of the split, once their parent is done");
        graph.finish("s-2");
        graph.list([
            shard("s-1", None),
            shard("s-2", Some("s-1")),
            shard("s-3", Some("s-1")),
            shard("s-4", Some("s-3")),
        ]);
        assert_eq!(graph.readable(), ["s-3"], "a grandchild waits for its own parent");
    }

    #[test]
    fn a_parent_trimmed_from_the_stream_does_not_hold_its_child() {
        let mut graph = ShardGraph::default();
        graph.list([shard("s-7", Some("s-6")), shard("s-8", None)]);
        assert_eq!(graph.readable(), ["s-7", "s-8"]);
        graph.finish("s-8");
        assert_eq!(graph.readable(), ["s-7"], "a finished shard is never read again");
    }

    #[test]
    fn positions_round_trip_and_unknown_text_starts_over() {
        for position in [Position::Start, Position::After("1100000000017454423009".into()), Position::End] {
            assert_eq!(Position::parse(&position.text()), position);
        }
        assert_eq!(Position::parse("garbage"), Position::Start);
    }

    #[test]
    fn images_become_the_typed_json_the_decoder_reads() {
        let image: HashMap<String, AttributeValue> = [
            ("topic".to_string(), AttributeValue::S("$aws/events/thing/t/created".into())),
            (
                "payload".to_string(),
                AttributeValue::M(
                    [
                        ("thingName".to_string(), AttributeValue::S("t".into())),
                        ("timestamp".to_string(), AttributeValue::N("5".into())),
                        ("operation".to_string(), AttributeValue::S("CREATED".into())),
                        ("attributes".to_string(), AttributeValue::M(HashMap::new())),
                    ]
                    .into(),
                ),
            ),
        ]
        .into();
        let text = Value::Object(image_json(&image)).to_string();
        let event = crate::event::decode_line(&text, "us-east-1").unwrap();
        assert_eq!((event.name.as_str(), event.timestamp_ms), ("t", 5));
    }
}
