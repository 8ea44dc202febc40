//! `iotdr sync --into-table`: the registry scan's events written into the
//! event table of the pipeline's `dynamodb-stream` source instead of
//! applied, so that the live run replicates them through its stages, ledger
//! and dead letters like any other event (the AWS sample's region-to-ddb
//! mode). An item carries the event in iotdr's own form (`event`, a map; it
//! is complete: PEMs, principals, policies), the table's key attributes and,
//! when the table has a TTL, its attribute (`ITEM_TTL` from now). The scan's
//! position is checkpointed once a page is written: an interrupted copy
//! resumes at that page.

use crate::aws::{AwsError, Limiter, RegionClients};
use crate::source::{RegistryScan, Source, SourceError};
use crate::state::{StateError, StateStore};
use aws_sdk_dynamodb::types::{AttributeValue, KeyType, PutRequest, ScalarAttributeType, WriteRequest};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a copied item lives when the table expires items: the default
/// of `iotdr setup`, time enough for the live run to read it.
pub const ITEM_TTL: Duration = Duration::from_secs(48 * 3600);
/// Items per BatchWriteItem (DynamoDB's maximum).
const PER_BATCH: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum IntoTableError {
    #[error("reading the description of table {table} in {region}: {error}")]
    Describe { table: String, region: String, error: AwsError },
    #[error("table {table} has a key attribute {attribute} of type {kind}: only S and N keys can be filled")]
    Key { table: String, attribute: String, kind: String },
    #[error("writing to table {table}: {error}")]
    Write { table: String, error: AwsError },
    #[error(transparent)]
    Scan(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The event table, ready to take events.
pub struct EventTable {
    clients: RegionClients,
    limiter: Arc<Limiter>,
    table: String,
    /// The key attributes (hash, then range) and their types.
    keys: Vec<(String, ScalarAttributeType)>,
    /// The TTL attribute, when the table expires items.
    ttl: Option<String>,
}

impl EventTable {
    /// Reads `table`'s key schema and TTL setting in the region `clients` reach.
    pub async fn open(
        clients: RegionClients,
        limiter: Arc<Limiter>,
        table: &str,
    ) -> Result<EventTable, IntoTableError> {
        let describe =
            |error| IntoTableError::Describe { table: table.to_string(), region: clients.region.clone(), error };
        let described = crate::aws::briefly!(clients.dynamodb.describe_table().table_name(table))
            .map_err(describe)?
            .table
            .unwrap_or_else(|| aws_sdk_dynamodb::types::TableDescription::builder().build());
        let types: HashMap<String, ScalarAttributeType> = described
            .attribute_definitions
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d.attribute_name, d.attribute_type))
            .collect();
        let mut schema = described.key_schema.unwrap_or_default();
        schema.sort_by_key(|k| k.key_type != KeyType::Hash);
        let mut keys = Vec::new();
        for key in schema {
            let kind = types.get(&key.attribute_name).cloned().unwrap_or(ScalarAttributeType::S);
            if !matches!(kind, ScalarAttributeType::S | ScalarAttributeType::N) {
                return Err(IntoTableError::Key {
                    table: table.to_string(),
                    attribute: key.attribute_name,
                    kind: kind.as_str().to_string(),
                });
            }
            keys.push((key.attribute_name, kind));
        }
        let ttl = crate::aws::briefly!(clients.dynamodb.describe_time_to_live().table_name(table))
            .map_err(describe)?
            .time_to_live_description
            .filter(|d| {
                use aws_sdk_dynamodb::types::TimeToLiveStatus::{Enabled, Enabling};
                matches!(d.time_to_live_status, Some(Enabled | Enabling))
            })
            .and_then(|d| d.attribute_name);
        Ok(EventTable { clients, limiter, table: table.to_string(), keys, ttl })
    }

    /// Writes `records` (scan records), 25 per request; items DynamoDB
    /// leaves unprocessed (its soft throttling) are sent again after a pause.
    async fn write(&self, records: &[crate::source::Record], first_sequence: u64) -> Result<(), IntoTableError> {
        let mut requests: Vec<WriteRequest> = records
            .iter()
            .enumerate()
            .map(|(i, record)| {
                let item = item(&self.keys, self.ttl.as_deref(), &record.text, first_sequence + i as u64);
                let put = PutRequest::builder().set_item(Some(item));
                WriteRequest::builder().put_request(put.build().expect("an item is set")).build()
            })
            .collect();
        let mut pause = Duration::from_millis(50);
        while !requests.is_empty() {
            let chunk: Vec<WriteRequest> = requests.drain(..requests.len().min(PER_BATCH)).collect();
            let request = self.clients.dynamodb.batch_write_item().request_items(&self.table, chunk);
            let written = self
                .limiter
                .send(&self.clients.region, "BatchWriteItem", || {
                    let request = request.clone();
                    async move { request.send().await.map_err(AwsError::from_sdk) }
                })
                .await
                .map_err(|error| IntoTableError::Write { table: self.table.clone(), error })?;
            let unprocessed = written.unprocessed_items.unwrap_or_default().remove(&self.table).unwrap_or_default();
            if unprocessed.is_empty() {
                pause = Duration::from_millis(50);
            } else {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                requests.extend(unprocessed);
            }
        }
        Ok(())
    }
}

/// The checkpoint key of a copy of `region` into `table`: apart from a
/// sync's, which applies what it lists.
pub fn checkpoint_key(region: &str, table: &str) -> String {
    format!("into-table:{table}:{}", RegistryScan::checkpoint_key(region, None))
}

/// Copies what `scan` lists into `table`, checkpointing each written page
/// under [`checkpoint_key`]. Returns the number of events written.
pub async fn copy(scan: &mut RegistryScan, table: &EventTable, state: &StateStore) -> Result<u64, IntoTableError> {
    let key = checkpoint_key(&table.clients.region, &table.table);
    let mut written = 0u64;
    // Numeric keys: unique across copies too (milliseconds, then the place).
    let base = crate::event::now_ms() * 1_000_000;
    while !scan.idle() {
        let batch = scan.read(0).await?;
        table.write(&batch.records, base + written).await?;
        written += batch.records.len() as u64;
        for (_, position) in &batch.checkpoints {
            state.set_checkpoint(&key, position)?;
        }
    }
    Ok(written)
}

/// The item of one scan record (`{"event": ...}`) for a table with `keys`
/// and the TTL attribute `ttl`; `sequence` makes numeric keys unique.
fn item(
    keys: &[(String, ScalarAttributeType)],
    ttl: Option<&str>,
    text: &str,
    sequence: u64,
) -> HashMap<String, AttributeValue> {
    // The scan writes its own records: one that is not JSON is a bug.
    let record: Value = serde_json::from_str(text).expect("a scan record is JSON");
    let id = record["event"]["id"].as_str().unwrap_or_default().to_string();
    let mut item = HashMap::from([("event".to_string(), attribute(&record["event"]))]);
    for (name, kind) in keys {
        let value = match kind {
            ScalarAttributeType::N => AttributeValue::N(sequence.to_string()),
            _ => AttributeValue::S(id.clone()),
        };
        item.insert(name.clone(), value);
    }
    if let Some(ttl) = ttl {
        let expires = crate::event::now_ms() / 1000 + ITEM_TTL.as_secs();
        item.insert(ttl.to_string(), AttributeValue::N(expires.to_string()));
    }
    item
}

/// A JSON value as a DynamoDB attribute value (an event table's item, as
/// a topic rule writes it).
pub fn attribute(value: &Value) -> AttributeValue {
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(values) => AttributeValue::L(values.iter().map(attribute).collect()),
        Value::Object(fields) => AttributeValue::M(fields.iter().map(|(k, v)| (k.clone(), attribute(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Entity, Event, Operation, decode_line};

    /// The item's attributes in the stream's JSON form (what the source decodes).
    fn stream_json(value: &AttributeValue) -> Value {
        match value {
            AttributeValue::Null(_) => serde_json::json!({ "NULL": true }),
            AttributeValue::Bool(b) => serde_json::json!({ "BOOL": b }),
            AttributeValue::N(n) => serde_json::json!({ "N": n }),
            AttributeValue::S(s) => serde_json::json!({ "S": s }),
            AttributeValue::L(l) => serde_json::json!({ "L": l.iter().map(stream_json).collect::<Vec<_>>() }),
            AttributeValue::M(m) => {
                serde_json::json!({ "M": m.iter().map(|(k, v)| (k.clone(), stream_json(v))).collect::<serde_json::Map<_, _>>() })
            }
            other => panic!("not written: {other:?}"),
        }
    }

    #[test]
    fn an_event_written_as_an_item_decodes_back_from_the_stream() {
        let mut event = Event::new(Entity::Thing, Operation::Created, "pump:1");
        event.attributes.insert("site".into(), "".into());
        event.version = Some(3);
        event.related.push(("principal".into(), "abc".into()));
        let text = serde_json::json!({ "event": event }).to_string();
        let keys = [("id".to_string(), ScalarAttributeType::S), ("at".to_string(), ScalarAttributeType::N)];
        let item = item(&keys, Some("expires_at"), &text, 7);
        assert_eq!(item["at"], AttributeValue::N("7".into()));
        assert_eq!(item["id"], AttributeValue::S(event.id.clone()));
        assert!(matches!(item["expires_at"], AttributeValue::N(_)));
        // As the stream source hands it to the decoder.
        let image = stream_json(&AttributeValue::M(item));
        let decoded = decode_line(&image["M"].to_string(), "us-east-1").unwrap();
        assert_eq!(decoded.name, "pump:1");
        assert_eq!(decoded.version, Some(3));
        assert_eq!(decoded.attributes.get("site").map(String::as_str), Some(""));
        assert_eq!(decoded.related, event.related);
    }
}
