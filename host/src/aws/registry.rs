//! The global registry: one DynamoDB table holding a read replica of every
//! thing from every source region (key: thing name + source region), kept up
//! to date by the same events that are replicated. Operators query it for
//! "where is this device, what is it" without asking each region.

use super::errors::{AwsError, ErrorKind};
use super::rate::Limiter;
use crate::event::{Entity, Event, Operation, related};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use std::collections::HashMap;
use std::sync::Arc;

pub const KEY: &str = "thingName";
pub const SORT_KEY: &str = "sourceRegion";
/// How long a run waits for a new table to become active.
const TABLE_ACTIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

pub struct GlobalRegistry {
    client: aws_sdk_dynamodb::Client,
    region: String,
    table: String,
    limiter: Arc<Limiter>,
}

impl GlobalRegistry {
    pub fn new(client: aws_sdk_dynamodb::Client, region: &str, table: &str, limiter: Arc<Limiter>) -> GlobalRegistry {
        GlobalRegistry { client, region: region.to_string(), table: table.to_string(), limiter }
    }

    /// Creates the table (on-demand billing) unless it exists, and waits
    /// until it takes writes: a new table is `CREATING` for a while on AWS,
    /// and writes to it fail as if it did not exist.
    pub async fn ensure_table(&self) -> Result<(), AwsError> {
        match self.table_status().await {
            Ok(_) => return self.await_active().await,
            Err(e) if e.is(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        let key = |name: &str, kind: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(kind).build();
        let attribute = |name: &str| {
            AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build()
        };
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key(KEY, KeyType::Hash).expect("complete key"))
            .key_schema(key(SORT_KEY, KeyType::Range).expect("complete key"))
            .attribute_definitions(attribute(KEY).expect("complete attribute"))
            .attribute_definitions(attribute(SORT_KEY).expect("complete attribute"))
            .send()
            .await
            .map_err(AwsError::from_sdk);
        match created {
            Err(e) if e.code == "ResourceInUseException" => {}
            other => other.map(drop)?,
        }
        self.await_active().await
    }

    async fn table_status(&self) -> Result<Option<TableStatus>, AwsError> {
        let described =
            self.client.describe_table().table_name(&self.table).send().await.map_err(AwsError::from_sdk)?;
        Ok(described.table.and_then(|t| t.table_status))
    }

    async fn await_active(&self) -> Result<(), AwsError> {
        let deadline = std::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
        loop {
            match self.table_status().await? {
                // An `UPDATING` table (a replica or index being added) takes writes.
                Some(TableStatus::Active | TableStatus::Updating) | None => return Ok(()),
                Some(status) if std::time::Instant::now() >= deadline => {
                    return Err(AwsError::permanent(
                        "DescribeTable",
                        format!(
                            "table {} in {} is still {} after {} s",
                            self.table,
                            self.region,
                            status.as_str(),
                            TABLE_ACTIVE_TIMEOUT.as_secs()
                        ),
                    ));
                }
                Some(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
            }
        }
    }

    /// Whether [`GlobalRegistry::record`] writes anything for `entity`.
    pub fn records(entity: Entity) -> bool {
        matches!(
            entity,
            Entity::Thing
                | Entity::ThingTypeAssociation
                | Entity::ThingGroupMembership
                | Entity::BillingGroupMembership
                | Entity::Shadow
        )
    }

    /// Records what `event` says about a thing; other events are not about one.
    /// A row already updated by a newer event is left alone (a replayed
    /// letter never rolls it back).
    pub async fn record(&self, event: &Event) -> Result<(), AwsError> {
        let s = |v: &str| AttributeValue::S(v.to_string());
        let now = AttributeValue::N(event.timestamp_ms.to_string());
        let mut values: HashMap<String, AttributeValue> = HashMap::new();
        values.insert(":at".into(), now);
        let expression = match (event.entity, event.operation) {
            (Entity::Thing, Operation::Created | Operation::Updated) => {
                let attributes =
                    event.attributes.iter().map(|(k, v)| (k.clone(), AttributeValue::S(v.clone()))).collect();
                values.insert(":attributes".into(), AttributeValue::M(attributes));
                values.insert(":active".into(), s("active"));
                values.insert(":account".into(), s(&event.account_id));
                let type_part = match event.related(related::THING_TYPE) {
                    Some(thing_type) => {
                        values.insert(":type".into(), s(thing_type));
                        "thingType = :type"
                    }
                    None => "thingType = :none",
                };
                if type_part.ends_with(":none") {
                    values.insert(":none".into(), AttributeValue::Null(true));
                }
                format!(
                    "SET attributes = :attributes, {type_part}, #state = :active, accountId = :account, \
                     updatedAtMs = :at, createdAtMs = if_not_exists(createdAtMs, :at)"
                )
            }
            (Entity::Thing, Operation::Deleted) => {
                values.insert(":deleted".into(), s("deleted"));
                "SET #state = :deleted, updatedAtMs = :at, deletedAtMs = :at".to_string()
            }
            (Entity::ThingTypeAssociation, Operation::Added) => {
                let Some(thing_type) = event.related(related::THING_TYPE) else { return Ok(()) };
                values.insert(":type".into(), s(thing_type));
                "SET thingType = :type, updatedAtMs = :at".to_string()
            }
            (Entity::ThingTypeAssociation, Operation::Removed) => {
                values.insert(":none".into(), AttributeValue::Null(true));
                "SET thingType = :none, updatedAtMs = :at".to_string()
            }
            (Entity::ThingGroupMembership, Operation::Added | Operation::Removed) => {
                let Some(group) = event.related(related::THING_GROUP) else { return Ok(()) };
                values.insert(":group".into(), AttributeValue::Ss(vec![group.to_string()]));
                if event.operation == Operation::Added {
                    "ADD thingGroups :group SET updatedAtMs = :at".to_string()
                } else {
                    "DELETE thingGroups :group SET updatedAtMs = :at".to_string()
                }
            }
            (Entity::BillingGroupMembership, Operation::Added) => {
                let Some(group) = event.related(related::BILLING_GROUP) else { return Ok(()) };
                values.insert(":billing".into(), s(group));
                "SET billingGroup = :billing, updatedAtMs = :at".to_string()
            }
            (Entity::Shadow, _) => {
                let name = event.related(related::SHADOW_NAME).unwrap_or("classic");
                values.insert(":shadow".into(), AttributeValue::Ss(vec![name.to_string()]));
                if event.operation == Operation::Deleted {
                    "DELETE shadows :shadow SET updatedAtMs = :at".to_string()
                } else {
                    "ADD shadows :shadow SET updatedAtMs = :at".to_string()
                }
            }
            _ => return Ok(()),
        };
        let uses_state = expression.contains("#state");
        // Events without a time (0) cannot be ordered: they always write.
        let newer_only = (event.timestamp_ms > 0).then_some("attribute_not_exists(updatedAtMs) OR updatedAtMs <= :at");
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY, s(&event.name))
            .key(SORT_KEY, s(&event.source_region))
            .update_expression(expression)
            .set_condition_expression(newer_only.map(str::to_string))
            .set_expression_attribute_names(
                uses_state.then(|| HashMap::from([("#state".to_string(), "state".to_string())])),
            )
            .set_expression_attribute_values(Some(values));
        match self
            .limiter
            .send(&self.region, "UpdateItem", || {
                let request = request.clone();
                async move { request.send().await.map_err(AwsError::from_sdk) }
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == "ConditionalCheckFailedException" => {
                tracing::debug!(thing = %event.name, event = %event.id, "global registry: a newer change is recorded already");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
