//! `iotdr setup`: the source region's side of live replication, made once
//! and idempotently. Registry events turned on (`UpdateEventConfigurations`);
//! the event table (key `id`, a NEW_IMAGE stream, a TTL attribute); the topic
//! rules that fill it from the registry and JITR events and from the shadow
//! `accepted` topics. Each step reads first and changes only what differs;
//! `--dry-run` reads and says what it would change. docs/pipelines.md#iotdr-setup.

use crate::aws::{AwsError, ErrorKind, RegionClients, briefly};
use crate::config;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, StreamSpecification,
    StreamViewType, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_iot::types::{Action, Configuration, DynamoDBv2Action, EventType, PutItemInput, TopicRulePayload};
use std::fmt;
use std::time::Duration;

/// The registry events the replicator reads (certificate registrations are always published).
pub const EVENT_TYPES: [EventType; 6] = [
    EventType::Thing,
    EventType::ThingType,
    EventType::ThingTypeAssociation,
    EventType::ThingGroup,
    EventType::ThingGroupMembership,
    EventType::ThingGroupHierarchy,
];

/// The item attribute the table's TTL reads.
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// The table's key: a UUID per message.
pub const KEY_ATTRIBUTE: &str = "id";
/// The table used when the pipeline's source is not a `dynamodb-stream`.
pub const DEFAULT_TABLE: &str = "iotdr-events";

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub table: String,
    /// The IAM role the rules write to the table with.
    pub role_arn: String,
    pub ttl: Duration,
    pub dry_run: bool,
}

/// What became of one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Already as wanted.
    Present,
    /// Changed now (what was done).
    Made(String),
    /// What a real setup would do (a dry run).
    Would(String),
    /// The step failed; the others still ran.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub outcome: Outcome,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Present => write!(f, "{:<44} already set up", self.name),
            Outcome::Made(what) => write!(f, "{:<44} {what}", self.name),
            Outcome::Would(what) => write!(f, "{:<44} would {what}", self.name),
            Outcome::Failed(why) => write!(f, "{:<44} FAILED: {why}", self.name),
        }
    }
}

/// The two rules and their SQL: every message becomes an item with its
/// payload's fields, `topic`, a UUID key and an expiry (the decoder's flat form).
pub fn rules(pipeline: &str, ttl: Duration) -> [(String, String); 2] {
    let prefix: String = pipeline.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect::<String>();
    let columns = format!(
        "*, topic() AS topic, newuuid() AS {KEY_ATTRIBUTE}, floor(timestamp() / 1000) + {} AS {TTL_ATTRIBUTE}",
        ttl.as_secs()
    );
    [
        (format!("iotdr_{prefix}_events"), format!("SELECT {columns} FROM '$aws/events/#'")),
        (
            format!("iotdr_{prefix}_shadows"),
            format!(
                "SELECT {columns} FROM '$aws/things/+/shadow/#' WHERE endswith(topic(), '/update/accepted') OR endswith(topic(), '/delete/accepted')"
            ),
        ),
    ]
}

/// Sets up the source region of `config`.
pub async fn setup(config: &config::Pipeline, settings: &Settings) -> Result<Vec<Step>, AwsError> {
    let region = config.regions.get(&config.source_region).cloned().unwrap_or_default();
    let clients = RegionClients::connect(&config.source_region, &region, false).await?;
    let mut steps = vec![
        Step { name: "registry events".into(), outcome: event_configurations(&clients, settings).await },
        Step { name: format!("table {}", settings.table), outcome: table(&clients, settings).await },
        Step {
            name: format!("time to live on {}.{TTL_ATTRIBUTE}", settings.table),
            outcome: ttl(&clients, settings).await,
        },
    ];
    for (name, sql) in rules(&config.name, settings.ttl) {
        let outcome = rule(&clients, settings, &name, &sql).await;
        steps.push(Step { name: format!("topic rule {name}"), outcome });
    }
    Ok(steps)
}

fn failed(what: &str, e: AwsError) -> Outcome {
    // moto answers 500 to what it does not implement (UpdateEventConfigurations).
    let hint = if e.status == Some(500) { " (an emulator may not implement it; AWS does)" } else { "" };
    Outcome::Failed(format!("{what}: {e}{hint}"))
}

async fn event_configurations(c: &RegionClients, settings: &Settings) -> Outcome {
    let current = match briefly!(c.iot.describe_event_configurations()) {
        Ok(out) => out.event_configurations.unwrap_or_default(),
        Err(e) => return failed("DescribeEventConfigurations", e),
    };
    let off: Vec<EventType> =
        EVENT_TYPES.iter().filter(|t| !current.get(t).is_some_and(|c| c.enabled)).cloned().collect();
    if off.is_empty() {
        return Outcome::Present;
    }
    let names = off.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ");
    if settings.dry_run {
        return Outcome::Would(format!("enable {names}"));
    }
    let mut update = c.iot.update_event_configurations();
    for event_type in off {
        update = update.event_configurations(event_type, Configuration::builder().enabled(true).build());
    }
    match briefly!(update) {
        Ok(_) => Outcome::Made(format!("enabled {names}")),
        Err(e) => failed("UpdateEventConfigurations", e),
    }
}

async fn table(c: &RegionClients, settings: &Settings) -> Outcome {
    let name = settings.table.as_str();
    let described = match briefly!(c.dynamodb.describe_table().table_name(name)) {
        Ok(out) => out.table,
        Err(e) if e.is(ErrorKind::NotFound) => None,
        Err(e) => return failed("DescribeTable", e),
    };
    let Some(table) = described else {
        if settings.dry_run {
            return Outcome::Would(format!("create it (key `{KEY_ATTRIBUTE}`, on-demand, stream NEW_IMAGE)"));
        }
        let key = AttributeDefinition::builder()
            .attribute_name(KEY_ATTRIBUTE)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("complete");
        let schema = KeySchemaElement::builder()
            .attribute_name(KEY_ATTRIBUTE)
            .key_type(KeyType::Hash)
            .build()
            .expect("complete");
        let created = briefly!(
            c.dynamodb
                .create_table()
                .table_name(name)
                .attribute_definitions(key)
                .key_schema(schema)
                .billing_mode(BillingMode::PayPerRequest)
                .stream_specification(stream())
        );
        return match created {
            Ok(_) => match active(c, name).await {
                Ok(()) => Outcome::Made(format!("created (key `{KEY_ATTRIBUTE}`, on-demand, stream NEW_IMAGE)")),
                Err(e) => failed("DescribeTable", e),
            },
            Err(e) => failed("CreateTable", e),
        };
    };
    let key = table.key_schema().iter().find(|k| k.key_type == KeyType::Hash).map(|k| k.attribute_name.clone());
    if key.as_deref() != Some(KEY_ATTRIBUTE) || table.key_schema().len() != 1 {
        return Outcome::Failed(format!(
            "it exists with another key ({}): the rules write items keyed by `{KEY_ATTRIBUTE}` alone; name another table with --table",
            key.unwrap_or_default()
        ));
    }
    let streaming = table.stream_specification().is_some_and(|s| {
        s.stream_enabled
            && matches!(s.stream_view_type, Some(StreamViewType::NewImage | StreamViewType::NewAndOldImages))
    });
    if streaming {
        return Outcome::Present;
    }
    if table.stream_specification().is_some_and(|s| s.stream_enabled) {
        return Outcome::Failed(
            "its stream carries no new images: iotdr reads NEW_IMAGE (turn the stream off and run setup again)".into(),
        );
    }
    if settings.dry_run {
        return Outcome::Would("turn its stream on (NEW_IMAGE)".into());
    }
    match briefly!(c.dynamodb.update_table().table_name(name).stream_specification(stream())) {
        Ok(_) => Outcome::Made("stream turned on (NEW_IMAGE)".into()),
        Err(e) => failed("UpdateTable", e),
    }
}

fn stream() -> StreamSpecification {
    StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::NewImage)
        .build()
        .expect("complete")
}

/// Waits for a new table to become active (a minute at most).
async fn active(c: &RegionClients, name: &str) -> Result<(), AwsError> {
    for _ in 0..120 {
        let out = briefly!(c.dynamodb.describe_table().table_name(name))?;
        if out.table.and_then(|t| t.table_status) == Some(TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(AwsError::permanent("TableNotActive", format!("table {name} did not become ACTIVE within a minute")))
}

async fn ttl(c: &RegionClients, settings: &Settings) -> Outcome {
    let name = settings.table.as_str();
    let current = match briefly!(c.dynamodb.describe_time_to_live().table_name(name)) {
        Ok(out) => out.time_to_live_description,
        // A dry run on a table not made yet.
        Err(e) if e.is(ErrorKind::NotFound) && settings.dry_run => None,
        Err(e) => return failed("DescribeTimeToLive", e),
    };
    let on = current
        .as_ref()
        .is_some_and(|d| matches!(d.time_to_live_status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)));
    match current.and_then(|d| d.attribute_name) {
        Some(attribute) if on && attribute == TTL_ATTRIBUTE => return Outcome::Present,
        Some(attribute) if on => {
            return Outcome::Failed(format!(
                "the table's time to live reads `{attribute}`; the rules write `{TTL_ATTRIBUTE}`"
            ));
        }
        _ => {}
    }
    let days = settings.ttl.as_secs() as f64 / 86_400.0;
    if settings.dry_run {
        return Outcome::Would(format!("turn it on (items expire {days:.1} days after their event)"));
    }
    let specification =
        TimeToLiveSpecification::builder().enabled(true).attribute_name(TTL_ATTRIBUTE).build().expect("complete");
    match briefly!(c.dynamodb.update_time_to_live().table_name(name).time_to_live_specification(specification)) {
        Ok(_) => Outcome::Made(format!("turned on (items expire {days:.1} days after their event)")),
        Err(e) => failed("UpdateTimeToLive", e),
    }
}

async fn rule(c: &RegionClients, settings: &Settings, name: &str, sql: &str) -> Outcome {
    let current = match briefly!(c.iot.get_topic_rule().rule_name(name)) {
        Ok(out) => out.rule,
        Err(e) if e.is(ErrorKind::NotFound) => None,
        // AWS answers UnauthorizedException for a rule that does not exist.
        Err(e) if e.code == "UnauthorizedException" => None,
        Err(e) => return failed("GetTopicRule", e),
    };
    let same = current.as_ref().is_some_and(|rule| {
        let writes = rule.actions().iter().any(|a| {
            a.dynamo_dbv2().is_some_and(|d| {
                d.role_arn() == settings.role_arn && d.put_item().is_some_and(|p| p.table_name() == settings.table)
            })
        });
        rule.sql() == Some(sql) && rule.actions().len() == 1 && writes && rule.rule_disabled() != Some(true)
    });
    if same {
        return Outcome::Present;
    }
    let verb = if current.is_some() { "replace" } else { "create" };
    if settings.dry_run {
        return Outcome::Would(format!("{verb} it: {sql} → table {}", settings.table));
    }
    let action = Action::builder()
        .dynamo_dbv2(
            DynamoDBv2Action::builder()
                .role_arn(&settings.role_arn)
                .put_item(PutItemInput::builder().table_name(&settings.table).build().expect("complete"))
                .build()
                .expect("complete"),
        )
        .build();
    let payload = TopicRulePayload::builder()
        .sql(sql)
        .description("iotdr: AWS IoT registry, JITR and shadow events into the event table")
        .aws_iot_sql_version("2016-03-23")
        .rule_disabled(false)
        .actions(action)
        .build()
        .expect("complete");
    let result = if current.is_some() {
        briefly!(c.iot.replace_topic_rule().rule_name(name).topic_rule_payload(payload)).map(drop)
    } else {
        briefly!(c.iot.create_topic_rule().rule_name(name).topic_rule_payload(payload)).map(drop)
    };
    match result {
        Ok(()) => Outcome::Made(format!("{verb}d: {sql} → table {}", settings.table)),
        Err(e) => failed(if current.is_some() { "ReplaceTopicRule" } else { "CreateTopicRule" }, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_give_items_a_topic_a_key_and_an_expiry() {
        let [(events, sql), (shadows, shadow_sql)] = rules("active-passive", Duration::from_secs(48 * 3600));
        assert_eq!(events, "iotdr_active_passive_events");
        assert_eq!(
            sql,
            "SELECT *, topic() AS topic, newuuid() AS id, floor(timestamp() / 1000) + 172800 AS expires_at FROM '$aws/events/#'"
        );
        assert_eq!(shadows, "iotdr_active_passive_shadows");
        assert!(shadow_sql.contains("FROM '$aws/things/+/shadow/#' WHERE endswith(topic(), '/update/accepted')"));
    }
}
