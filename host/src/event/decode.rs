//! Decoders from every AWS shape into [`Event`].
//!
//! A record is `{"topic": ..., "payload": {...}}` as an IoT rule or MQTT
//! subscription sees it, the same record flattened (`SELECT topic() AS topic, *`),
//! the same record as a DynamoDB item or stream record (DynamoDB JSON), or an
//! iotdr-native event (`{"event": {...}}`, what `scan` and the examples use).
//! Nothing here panics: bad input is a [`DecodeError`] that names the problem.

use super::{Entity, Event, Operation, related};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("expected a JSON object with `topic` and `payload`")]
    NotARecord,
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}`: {problem}")]
    BadField { field: &'static str, problem: String },
    #[error("unknown operation `{0}`")]
    UnknownOperation(String),
    #[error("bad DynamoDB JSON: {0}")]
    BadDynamoDb(String),
    #[error("bad iotdr event: {0}")]
    BadNativeEvent(String),
}

/// Decodes one line of a JSON-lines source.
pub fn decode_line(line: &str, source_region: &str) -> Result<Event, DecodeError> {
    let value: Value = serde_json::from_str(line).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    decode_record(&value, source_region)
}

/// Decodes one record in any of the accepted forms (see the module docs).
pub fn decode_record(record: &Value, source_region: &str) -> Result<Event, DecodeError> {
    let object = record.as_object().ok_or(DecodeError::NotARecord)?;
    if let Some(stream) = object.get("dynamodb") {
        let image = stream.get("NewImage").ok_or(DecodeError::BadDynamoDb("stream record without NewImage".into()))?;
        return decode_dynamodb_image(image, source_region);
    }
    if let Some(native) = object.get("event") {
        // An item of the event table in DynamoDB's typed form (`sync --into-table`).
        if native.as_object().is_some_and(|typed| typed.len() == 1 && typed.contains_key("M")) {
            return decode_dynamodb_image(record, source_region);
        }
        return decode_native(native, source_region);
    }
    match object.get("topic") {
        Some(Value::Object(attr)) if attr.contains_key("S") => decode_dynamodb_image(record, source_region),
        Some(Value::String(topic)) => {
            let payload = match object.get("payload") {
                Some(Value::Object(p)) => p.clone(),
                // Rules that store the payload as a string column.
                Some(Value::String(text)) => match serde_json::from_str(text) {
                    Ok(Value::Object(p)) => p,
                    _ => return Err(DecodeError::BadField { field: "payload", problem: "not a JSON object".into() }),
                },
                Some(_) => return Err(DecodeError::BadField { field: "payload", problem: "not a JSON object".into() }),
                // The flat form: the payload's fields sit beside `topic`.
                None => object.iter().filter(|(k, _)| *k != "topic").map(|(k, v)| (k.clone(), v.clone())).collect(),
            };
            decode_topic(topic, &payload, source_region)
        }
        Some(_) => Err(DecodeError::BadField { field: "topic", problem: "not a string".into() }),
        None => Err(DecodeError::NotARecord),
    }
}

/// Decodes a DynamoDB item image (`{"topic": {"S": ...}, "payload": {"M": ...}}`).
pub fn decode_dynamodb_image(image: &Value, source_region: &str) -> Result<Event, DecodeError> {
    let plain = from_dynamodb_map(image)?;
    decode_record(&Value::Object(plain), source_region)
}

fn from_dynamodb_map(value: &Value) -> Result<Map<String, Value>, DecodeError> {
    let object = value.as_object().ok_or(DecodeError::BadDynamoDb("item is not an object".into()))?;
    object.iter().map(|(k, v)| Ok((k.clone(), from_dynamodb_value(v)?))).collect()
}

fn from_dynamodb_value(value: &Value) -> Result<Value, DecodeError> {
    let object = value.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
        DecodeError::BadDynamoDb(format!("attribute value must be an object with one type key, got {value}"))
    })?;
    let (kind, inner) = object.iter().next().expect("checked len");
    let bad = |what: &str| DecodeError::BadDynamoDb(format!("`{kind}` holds {what}"));
    Ok(match kind.as_str() {
        "S" => Value::String(inner.as_str().ok_or_else(|| bad("a non-string"))?.to_string()),
        "N" => {
            let text = inner.as_str().ok_or_else(|| bad("a non-string"))?;
            let number: serde_json::Number = text.parse().map_err(|_| bad("a malformed number"))?;
            Value::Number(number)
        }
        "BOOL" => Value::Bool(inner.as_bool().ok_or_else(|| bad("a non-boolean"))?),
        "NULL" => Value::Null,
        "M" => Value::Object(from_dynamodb_map(inner)?),
        "L" => Value::Array(
            inner
                .as_array()
                .ok_or_else(|| bad("a non-list"))?
                .iter()
                .map(from_dynamodb_value)
                .collect::<Result<_, _>>()?,
        ),
        "SS" => Value::Array(inner.as_array().ok_or_else(|| bad("a non-list"))?.clone()),
        "NS" => Value::Array(
            inner
                .as_array()
                .ok_or_else(|| bad("a non-list"))?
                .iter()
                .map(|n| from_dynamodb_value(&serde_json::json!({ "N": n })))
                .collect::<Result<_, _>>()?,
        ),
        other => return Err(DecodeError::BadDynamoDb(format!("unsupported attribute type `{other}`"))),
    })
}

fn decode_native(native: &Value, source_region: &str) -> Result<Event, DecodeError> {
    let mut event: Event =
        serde_json::from_value(native.clone()).map_err(|e| DecodeError::BadNativeEvent(e.to_string()))?;
    if event.name.is_empty() {
        return Err(DecodeError::BadNativeEvent("empty `name`".into()));
    }
    if event.source_region.is_empty() {
        event.source_region = source_region.to_string();
    }
    if event.id.is_empty() {
        event.id = format!("{}-{}-{}-{}", event.entity, event.operation, event.name, event.timestamp_ms);
    }
    Ok(event)
}

fn decode_topic(topic: &str, payload: &Map<String, Value>, source_region: &str) -> Result<Event, DecodeError> {
    let parts: Vec<&str> = topic.split('/').collect();
    let unknown = || DecodeError::UnknownTopic(topic.to_string());
    let fields = Fields(payload);
    let mut event = match parts.as_slice() {
        ["$aws", "events", "thing", name, _] => decode_thing(&fields, name)?,
        ["$aws", "events", "thingType", name, _] => decode_thing_type(&fields, name)?,
        ["$aws", "events", "thingTypeAssociation", "thing", thing, thing_type] => {
            let mut e =
                Event::new(Entity::ThingTypeAssociation, fields.link_operation()?, fields.str_or("thingName", thing)?);
            e.set_related(related::THING_TYPE, Some(fields.str_or("thingTypeName", thing_type)?));
            e
        }
        ["$aws", "events", "thingGroup", name, _] => decode_thing_group(&fields, name)?,
        ["$aws", "events", "thingGroupHierarchy", "thingGroup", parent, "childThingGroup", child, _] => {
            let mut e = Event::new(
                Entity::ThingGroupHierarchy,
                fields.link_operation()?,
                fields.str_or("childGroupName", child)?,
            );
            e.set_related(related::PARENT_GROUP, Some(fields.str_or("thingGroupName", parent)?));
            e
        }
        ["$aws", "events", "thingGroupMembership", "thingGroup", group, "thing", thing, _] => {
            let thing = arn_resource_name(fields.opt_str("thingArn")?, "thing/").unwrap_or(thing);
            let group = arn_resource_name(fields.opt_str("groupArn")?, "thinggroup/").unwrap_or(group);
            let mut e =
                Event::new(Entity::ThingGroupMembership, fields.link_operation()?, non_empty(thing, "thingArn")?);
            e.set_related(related::THING_GROUP, Some(non_empty(group, "groupArn")?.to_string()));
            e
        }
        ["$aws", "events", "certificates", "registered", ca_id] => decode_certificate(&fields, ca_id)?,
        ["$aws", "things", thing, "shadow", rest @ ..] => decode_shadow(&fields, thing, rest).ok_or_else(unknown)??,
        _ => return Err(unknown()),
    };
    event.source_region = source_region.to_string();
    if event.account_id.is_empty() {
        event.account_id =
            fields.opt_str("accountId")?.or(fields.opt_str("awsAccountId")?).unwrap_or_default().to_string();
    }
    if event.timestamp_ms == 0 {
        event.timestamp_ms = fields.opt_u64("timestamp")?.unwrap_or(0);
    }
    if event.id.is_empty() {
        event.id = match fields.opt_str("eventId")? {
            Some(id) => id.to_string(),
            None => format!("{}-{}-{}-{}", event.entity, event.operation, event.name, event.timestamp_ms),
        };
    }
    Ok(event)
}

fn decode_thing(fields: &Fields, topic_name: &str) -> Result<Event, DecodeError> {
    let mut e = Event::new(Entity::Thing, fields.entity_operation()?, fields.str_or("thingName", topic_name)?);
    e.version = fields.opt_u64("versionNumber")?;
    e.attributes = fields.attributes("attributes")?;
    e.set_related(related::THING_TYPE, fields.opt_str("thingTypeName")?.map(str::to_string));
    Ok(e)
}

fn decode_thing_type(fields: &Fields, topic_name: &str) -> Result<Event, DecodeError> {
    let mut e = Event::new(Entity::ThingType, fields.entity_operation()?, fields.str_or("thingTypeName", topic_name)?);
    let mut properties = Map::new();
    for (from, to) in [
        ("description", "description"),
        ("searchableAttributes", "searchableAttributes"),
        ("propagatingAttributes", "propagatingAttributes"),
        ("isDeprecated", "deprecated"),
        ("deprecationDate", "deprecationDate"),
    ] {
        if let Some(v) = fields.0.get(from).filter(|v| !v.is_null()) {
            properties.insert(to.to_string(), v.clone());
        }
    }
    e.document = Some(Value::Object(properties).to_string());
    Ok(e)
}

fn decode_thing_group(fields: &Fields, topic_name: &str) -> Result<Event, DecodeError> {
    let mut e =
        Event::new(Entity::ThingGroup, fields.entity_operation()?, fields.str_or("thingGroupName", topic_name)?);
    e.version = fields.opt_u64("versionNumber")?;
    e.attributes = fields.attributes("attributes")?;
    e.set_related(related::PARENT_GROUP, fields.opt_str("parentGroupName")?.map(str::to_string));
    let mut properties = Map::new();
    if let Some(description) = fields.opt_str("description")? {
        properties.insert("description".into(), description.into());
    }
    if fields.opt_str("dynamicGroupMappingId")?.is_some() {
        properties.insert("dynamic".into(), true.into());
    }
    e.document = Some(Value::Object(properties).to_string());
    Ok(e)
}

fn decode_certificate(fields: &Fields, topic_ca_id: &str) -> Result<Event, DecodeError> {
    let certificate_id = fields.opt_str("certificateId")?.ok_or(DecodeError::MissingField("certificateId"))?;
    let mut e = Event::new(Entity::Certificate, Operation::Created, non_empty(certificate_id, "certificateId")?);
    e.set_related(related::CA_CERTIFICATE, Some(fields.str_or("caCertificateId", topic_ca_id)?));
    let status = fields.opt_str("certificateStatus")?.ok_or(DecodeError::MissingField("certificateStatus"))?;
    e.set_related(related::CERTIFICATE_STATUS, Some(status.to_string()));
    Ok(e)
}

/// `rest` is what follows `$aws/things/<thing>/shadow/`: `update/accepted`,
/// `delete/accepted`, or the same after `name/<shadow>/`. `None` for other topics.
fn decode_shadow(fields: &Fields, thing: &str, rest: &[&str]) -> Option<Result<Event, DecodeError>> {
    let (shadow_name, action) = match rest {
        [action, "accepted"] => (None, *action),
        ["name", shadow, action, "accepted"] => (Some(*shadow), *action),
        _ => return None,
    };
    let operation = match action {
        "update" => Operation::Updated,
        "delete" => Operation::Deleted,
        _ => return None,
    };
    Some((|| {
        let mut e = Event::new(Entity::Shadow, operation, non_empty(thing, "topic")?);
        if let Some(shadow) = shadow_name {
            e.set_related(related::SHADOW_NAME, Some(non_empty(shadow, "topic")?.to_string()));
        }
        e.version = fields.opt_u64("version")?;
        // Shadow documents stamp seconds; everything else milliseconds.
        e.timestamp_ms = fields.opt_u64("timestamp")?.unwrap_or(0).saturating_mul(1000);
        if operation == Operation::Updated {
            let state = fields.0.get("state").filter(|s| s.is_object()).ok_or(DecodeError::MissingField("state"))?;
            e.document = Some(serde_json::json!({ "state": state }).to_string());
        }
        e.id = format!(
            "shadow-{}-{}-{}-{}",
            e.name,
            shadow_name.unwrap_or(""),
            operation,
            e.version.unwrap_or(e.timestamp_ms)
        );
        Ok(e)
    })())
}

/// `arn:aws:iot:us-east-1:111122223333:thing/pump-0001` → `pump-0001`.
fn arn_resource_name<'a>(arn: Option<&'a str>, prefix: &str) -> Option<&'a str> {
    let resource = arn?.splitn(6, ':').nth(5)?;
    resource.strip_prefix(prefix).filter(|name| !name.is_empty())
}

fn non_empty<'a>(value: &'a str, field: &'static str) -> Result<&'a str, DecodeError> {
    if value.is_empty() { Err(DecodeError::BadField { field, problem: "empty name".into() }) } else { Ok(value) }
}

/// Typed access to a payload's fields with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn opt_str(&self, field: &'static str) -> Result<Option<&str>, DecodeError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(DecodeError::BadField { field, problem: format!("expected a string, got {other}") }),
        }
    }

    /// The payload's value of `field`, else the name the topic carries.
    fn str_or(&self, field: &'static str, from_topic: &str) -> Result<String, DecodeError> {
        Ok(non_empty(self.opt_str(field)?.unwrap_or(from_topic), field)?.to_string())
    }

    fn opt_u64(&self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| DecodeError::BadField {
                field,
                problem: format!("expected a non-negative integer, got {n}"),
            }),
            // Some publishers stringify numbers (certificateRegistrationTimestamp does).
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| DecodeError::BadField { field, problem: format!("expected an integer, got {s:?}") }),
            Some(other) => Err(DecodeError::BadField { field, problem: format!("expected an integer, got {other}") }),
        }
    }

    fn attributes(&self, field: &'static str) -> Result<std::collections::BTreeMap<String, String>, DecodeError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(Default::default()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(DecodeError::BadField {
                        field,
                        problem: format!("attribute `{k}` is {other}, not a string"),
                    }),
                })
                .collect(),
            Some(other) => Err(DecodeError::BadField { field, problem: format!("expected an object, got {other}") }),
        }
    }

    fn raw_operation(&self) -> Result<&str, DecodeError> {
        self.opt_str("operation")?.ok_or(DecodeError::MissingField("operation"))
    }

    /// For entities: CREATED | UPDATED | DELETED.
    fn entity_operation(&self) -> Result<Operation, DecodeError> {
        match self.raw_operation()? {
            "CREATED" => Ok(Operation::Created),
            "UPDATED" => Ok(Operation::Updated),
            "DELETED" => Ok(Operation::Deleted),
            other => Err(DecodeError::UnknownOperation(other.to_string())),
        }
    }

    /// For links (associations, memberships, hierarchy): ADDED | REMOVED, and
    /// CREATED | DELETED from the publishers that use those words.
    fn link_operation(&self) -> Result<Operation, DecodeError> {
        match self.raw_operation()? {
            "ADDED" | "CREATED" => Ok(Operation::Added),
            "REMOVED" | "DELETED" => Ok(Operation::Removed),
            other => Err(DecodeError::UnknownOperation(other.to_string())),
        }
    }
}
