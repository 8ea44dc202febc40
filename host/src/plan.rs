//! Turns an event into the AWS API calls that apply it to one target region,
//! in the order they must run. Operation names and input fields are the AWS
//! API's own (`CreateThing` with `thingName`, `attributePayload`, ...), so a dry
//! run shows exactly what a real run sends.

use crate::event::{Entity, Event, Operation, related};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// One API call for one region.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    pub region: String,
    pub operation: &'static str,
    pub input: Value,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("nothing applies a {entity} event with operation {operation}")]
    Unsupported { entity: Entity, operation: Operation },
    #[error("{entity} event without {what}")]
    Missing { entity: Entity, what: &'static str },
    #[error("{entity} document is not a JSON object: {problem}")]
    BadDocument { entity: Entity, problem: String },
    #[error(
        "thing group {0} is dynamic and its query was not read from the source (a dry run without \
         --fetch, or the group was deleted there since): replay this letter once the source answers, \
         or purge it"
    )]
    DynamicGroup(String),
}

/// The calls that apply `event` to `region`, in order. An empty plan means the
/// event needs no call (a hierarchy link removed along with its child group).
pub fn plan(event: &Event, region: &str) -> Result<Vec<Call>, PlanError> {
    let call = |operation: &'static str, input: Value| Call { region: region.to_string(), operation, input };
    let missing = |what| PlanError::Missing { entity: event.entity, what };
    let name = event.name.as_str();
    let unsupported = || PlanError::Unsupported { entity: event.entity, operation: event.operation };
    use Entity as E;
    use Operation as O;
    Ok(match (event.entity, event.operation) {
        (E::Thing, O::Created) => {
            let mut input = json!({ "thingName": name, "attributePayload": { "attributes": event.attributes } });
            if let Some(thing_type) = event.related(related::THING_TYPE) {
                input["thingTypeName"] = thing_type.into();
            }
            let mut calls = vec![call("CreateThing", input)];
            calls.extend(principal_calls(event, region));
            calls
        }
        (E::Thing, O::Updated) => {
            // The event carries every attribute the thing has now: replace, do
            // not merge, so attributes removed in the source go in the target.
            let mut input =
                json!({ "thingName": name, "attributePayload": { "attributes": event.attributes, "merge": false } });
            match event.related(related::THING_TYPE) {
                Some(thing_type) => input["thingTypeName"] = thing_type.into(),
                None => input["removeThingType"] = true.into(),
            }
            let mut calls = vec![call("UpdateThing", input)];
            calls.extend(principal_calls(event, region));
            calls
        }
        // The applier first detaches the principals and deletes the shadows it
        // finds on the thing in the target, then deletes it.
        (E::Thing, O::Deleted) => vec![call("DeleteThing", json!({ "thingName": name }))],
        (E::ThingType, O::Created) => {
            let properties = document(event)?;
            let mut type_properties = Map::new();
            if let Some(description) = properties.get("description").filter(|d| d.is_string()) {
                type_properties.insert("thingTypeDescription".into(), description.clone());
            }
            if let Some(searchable) = properties.get("searchableAttributes").filter(|s| s.is_array()) {
                type_properties.insert("searchableAttributes".into(), searchable.clone());
            }
            let mut calls =
                vec![call("CreateThingType", json!({ "thingTypeName": name, "thingTypeProperties": type_properties }))];
            if properties.get("deprecated") == Some(&Value::Bool(true)) {
                calls.push(call("DeprecateThingType", json!({ "thingTypeName": name, "undoDeprecate": false })));
            }
            calls
        }
        (E::ThingType, O::Updated) => {
            let deprecated = document(event)?.get("deprecated") == Some(&Value::Bool(true));
            vec![call("DeprecateThingType", json!({ "thingTypeName": name, "undoDeprecate": !deprecated }))]
        }
        // AWS deletes only deprecated types.
        (E::ThingType, O::Deleted) => vec![
            call("DeprecateThingType", json!({ "thingTypeName": name, "undoDeprecate": false })),
            call("DeleteThingType", json!({ "thingTypeName": name })),
        ],
        (E::ThingTypeAssociation, O::Added) => {
            let thing_type = event.related(related::THING_TYPE).ok_or(missing("a thing-type"))?;
            vec![call("UpdateThing", json!({ "thingName": name, "thingTypeName": thing_type }))]
        }
        (E::ThingTypeAssociation, O::Removed) => {
            vec![call("UpdateThing", json!({ "thingName": name, "removeThingType": true }))]
        }
        // Its query, read from the source, fills it in each region. Created
        // as a plain group it would never fill itself: without the query, refuse.
        (E::ThingGroup, O::Created | O::Updated) if is_dynamic_group(event) => {
            let properties = document(event)?;
            let query = properties.get("queryString").and_then(Value::as_str);
            let query = query.ok_or_else(|| PlanError::DynamicGroup(name.to_string()))?;
            let mut input = json!({ "thingGroupName": name, "queryString": query, "thingGroupProperties": group_properties(event, true)? });
            for field in ["indexName", "queryVersion"] {
                if let Some(value) = properties.get(field).filter(|v| v.is_string()) {
                    input[field] = value.clone();
                }
            }
            vec![call("CreateDynamicThingGroup", input)]
        }
        (E::ThingGroup, O::Deleted) if is_dynamic_group(event) => {
            vec![call("DeleteDynamicThingGroup", json!({ "thingGroupName": name }))]
        }
        (E::ThingGroup, O::Created) => {
            let mut input = json!({ "thingGroupName": name, "thingGroupProperties": group_properties(event, false)? });
            if let Some(parent) = event.related(related::PARENT_GROUP) {
                input["parentGroupName"] = parent.into();
            }
            vec![call("CreateThingGroup", input)]
        }
        (E::ThingGroup, O::Updated) => vec![call(
            "UpdateThingGroup",
            json!({ "thingGroupName": name, "thingGroupProperties": group_properties(event, true)? }),
        )],
        (E::ThingGroup, O::Deleted) => vec![call("DeleteThingGroup", json!({ "thingGroupName": name }))],
        // A group's parent is fixed when the group is created, so a link added
        // means "this child exists under this parent".
        (E::ThingGroupHierarchy, O::Added) => {
            let parent = event.related(related::PARENT_GROUP).ok_or(missing("a parent-group"))?;
            vec![call("CreateThingGroup", json!({ "thingGroupName": name, "parentGroupName": parent }))]
        }
        // Links are removed only with the child group, whose own event deletes it.
        (E::ThingGroupHierarchy, O::Removed) => Vec::new(),
        (E::ThingGroupMembership, O::Added | O::Removed) => {
            let group = event.related(related::THING_GROUP).ok_or(missing("a thing-group"))?;
            let operation =
                if event.operation == O::Added { "AddThingToThingGroup" } else { "RemoveThingFromThingGroup" };
            vec![call(operation, json!({ "thingGroupName": group, "thingName": name }))]
        }
        (E::BillingGroup, O::Created | O::Updated) => {
            let properties = document(event)?;
            let mut billing_properties = Map::new();
            if let Some(description) = properties.get("description").filter(|d| d.is_string()) {
                billing_properties.insert("billingGroupDescription".into(), description.clone());
            }
            let operation = if event.operation == O::Created { "CreateBillingGroup" } else { "UpdateBillingGroup" };
            vec![call(operation, json!({ "billingGroupName": name, "billingGroupProperties": billing_properties }))]
        }
        (E::BillingGroup, O::Deleted) => vec![call("DeleteBillingGroup", json!({ "billingGroupName": name }))],
        (E::BillingGroupMembership, O::Added | O::Removed) => {
            let group = event.related(related::BILLING_GROUP).ok_or(missing("a billing-group"))?;
            let operation =
                if event.operation == O::Added { "AddThingToBillingGroup" } else { "RemoveThingFromBillingGroup" };
            vec![call(operation, json!({ "billingGroupName": group, "thingName": name }))]
        }
        (E::Certificate, O::Created) => {
            let status = event.related(related::CERTIFICATE_STATUS).ok_or(missing("a certificate-status"))?;
            let properties = optional_document(event)?;
            let pem = properties.get("certificatePem").and_then(Value::as_str).map(str::to_string);
            let mut calls = vec![call(
                "RegisterCertificateWithoutCA",
                json!({ "certificatePem": pem.unwrap_or_else(|| format!("(fetched from {} at ingest)", event.source_region)), "status": status }),
            )];
            let arn = certificate_arn(event, region);
            for policy in event.related.iter().filter(|(k, _)| k == related::POLICY).map(|(_, v)| v) {
                calls.push(call("AttachPolicy", json!({ "policyName": policy, "target": arn })));
            }
            calls
        }
        (E::Certificate, O::Updated) => {
            let status = event.related(related::CERTIFICATE_STATUS).ok_or(missing("a certificate-status"))?;
            vec![call("UpdateCertificate", json!({ "certificateId": name, "newStatus": status }))]
        }
        (E::Certificate, O::Deleted) => vec![
            call("UpdateCertificate", json!({ "certificateId": name, "newStatus": "INACTIVE" })),
            call("DeleteCertificate", json!({ "certificateId": name, "forceDelete": true })),
        ],
        (E::Policy, O::Created | O::Updated) => {
            let policy_document = event.document.as_deref().ok_or(missing("a policy document"))?;
            if event.operation == O::Created {
                vec![call("CreatePolicy", json!({ "policyName": name, "policyDocument": policy_document }))]
            } else {
                vec![call(
                    "CreatePolicyVersion",
                    json!({ "policyName": name, "policyDocument": policy_document, "setAsDefault": true }),
                )]
            }
        }
        (E::Policy, O::Deleted) => vec![call("DeletePolicy", json!({ "policyName": name }))],
        (E::Shadow, O::Updated) => {
            let payload = document(event)?;
            let mut input = json!({ "thingName": name, "payload": payload });
            if let Some(shadow) = event.related(related::SHADOW_NAME) {
                input["shadowName"] = shadow.into();
            }
            vec![call("UpdateThingShadow", input)]
        }
        (E::Shadow, O::Deleted) => {
            let mut input = json!({ "thingName": name });
            if let Some(shadow) = event.related(related::SHADOW_NAME) {
                input["shadowName"] = shadow.into();
            }
            vec![call("DeleteThingShadow", input)]
        }
        _ => return Err(unsupported()),
    })
}

impl Call {
    /// The call as one JSON line, with certificate PEMs replaced by their size:
    /// what may be printed or logged.
    pub fn to_redacted_json(&self) -> String {
        let mut shown = self.clone();
        if let Some(pem) = shown.input.get_mut("certificatePem")
            && let Some(text) = pem.as_str()
            && text.starts_with("-----BEGIN")
        {
            *pem = format!("(certificate PEM, {} bytes)", text.len()).into();
        }
        serde_json::to_string(&shown).expect("calls are JSON")
    }
}

fn certificate_arn(event: &Event, region: &str) -> String {
    format!("arn:aws:iot:{region}:{}:cert/{}", event.account_id, event.name)
}

/// The thing's certificates (fetched from the source at ingest), attached in
/// the target, then those a repair names as detached. The ARN names the
/// source's account; the applier uses the certificate's ARN in the target.
fn principal_calls(event: &Event, region: &str) -> Vec<Call> {
    let operations =
        [(related::PRINCIPAL, "AttachThingPrincipal"), (related::DETACHED_PRINCIPAL, "DetachThingPrincipal")];
    operations
        .into_iter()
        .flat_map(|(wanted, operation)| {
            event.related.iter().filter(move |(kind, _)| kind == wanted).map(move |(_, id)| Call {
                region: region.to_string(),
                operation,
                input: json!({
                    "thingName": event.name,
                    "principal": format!("arn:aws:iot:{region}:{}:cert/{id}", event.account_id),
                }),
            })
        })
        .collect()
}

/// A dynamic group's event without its query (live events carry none).
pub fn lacks_dynamic_query(event: &Event) -> bool {
    event.entity == Entity::ThingGroup
        && matches!(event.operation, Operation::Created | Operation::Updated)
        && is_dynamic_group(event)
        && optional_document(event).is_ok_and(|d| d.get("queryString").is_none_or(|q| !q.is_string()))
}

fn is_dynamic_group(event: &Event) -> bool {
    event.document.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()).is_some_and(|d| d["dynamic"] == true)
}

fn document(event: &Event) -> Result<Map<String, Value>, PlanError> {
    let text = event.document.as_deref().ok_or(PlanError::Missing { entity: event.entity, what: "a document" })?;
    parse_object(event, text)
}

fn optional_document(event: &Event) -> Result<Map<String, Value>, PlanError> {
    event.document.as_deref().map_or(Ok(Map::new()), |text| parse_object(event, text))
}

fn parse_object(event: &Event, text: &str) -> Result<Map<String, Value>, PlanError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(PlanError::BadDocument { entity: event.entity, problem: format!("got {other}") }),
        Err(e) => Err(PlanError::BadDocument { entity: event.entity, problem: e.to_string() }),
    }
}

fn group_properties(event: &Event, replace_attributes: bool) -> Result<Value, PlanError> {
    let properties = optional_document(event)?;
    let mut out = json!({ "attributePayload": { "attributes": event.attributes } });
    if replace_attributes {
        out["attributePayload"]["merge"] = false.into();
    }
    if let Some(description) = properties.get("description").filter(|d| d.is_string()) {
        out["thingGroupDescription"] = description.clone();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thing(operation: Operation) -> Event {
        let mut e = Event::new(Entity::Thing, operation, "pump-1");
        e.attributes.insert("site".into(), "berlin".into());
        e.account_id = "111122223333".into();
        e
    }

    #[test]
    fn dynamic_groups_are_created_with_their_query_and_refused_without() {
        let mut group = Event::new(Entity::ThingGroup, Operation::Created, "online-pumps");
        group.document = Some(r#"{"dynamic":true}"#.into());
        assert!(lacks_dynamic_query(&group));
        let error = plan(&group, "eu-west-1").unwrap_err();
        assert_eq!(error, PlanError::DynamicGroup("online-pumps".into()));
        assert!(error.to_string().contains("query was not read"), "{error}");
        let mut complete = group.clone();
        complete.document = Some(
            r#"{"dynamic":true,"queryString":"attributes.site:lyon","indexName":"AWS_Things","queryVersion":null}"#
                .into(),
        );
        assert!(!lacks_dynamic_query(&complete));
        let calls = plan(&complete, "eu-west-1").unwrap();
        assert_eq!(calls[0].operation, "CreateDynamicThingGroup");
        assert_eq!(calls[0].input["queryString"], "attributes.site:lyon");
        assert_eq!(calls[0].input["indexName"], "AWS_Things");
        assert!(calls[0].input.get("queryVersion").is_none());
        let mut deleted = group.clone();
        deleted.operation = Operation::Deleted;
        assert_eq!(plan(&deleted, "eu-west-1").unwrap()[0].operation, "DeleteDynamicThingGroup");
        group.document = Some(r#"{"description":"static"}"#.into());
        assert_eq!(plan(&group, "eu-west-1").unwrap()[0].operation, "CreateThingGroup");
    }

    #[test]
    fn thing_lifecycle() {
        let mut created = thing(Operation::Created);
        created.set_related(related::THING_TYPE, Some("sensor".into()));
        let calls = plan(&created, "eu-west-1").unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].operation, "CreateThing");
        assert_eq!(
            calls[0].input,
            json!({"thingName":"pump-1","thingTypeName":"sensor","attributePayload":{"attributes":{"site":"berlin"}}})
        );

        let updated = plan(&thing(Operation::Updated), "eu-west-1").unwrap();
        assert_eq!(updated[0].input["attributePayload"]["merge"], false);
        assert_eq!(updated[0].input["removeThingType"], true);

        let deleted = thing(Operation::Deleted);
        let ops: Vec<&str> = plan(&deleted, "eu-west-1").unwrap().iter().map(|c| c.operation).collect();
        assert_eq!(ops, ["DeleteThing"]);
    }

    #[test]
    fn certificates_never_print_their_pem() {
        let mut cert = Event::new(Entity::Certificate, Operation::Created, "abc");
        cert.set_related(related::CERTIFICATE_STATUS, Some("PENDING_ACTIVATION".into()));
        cert.related.push((related::POLICY.into(), "device-policy".into()));
        cert.document = Some(
            json!({"certificatePem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}).to_string(),
        );
        let calls = plan(&cert, "eu-west-1").unwrap();
        assert_eq!(calls[1].operation, "AttachPolicy");
        let shown = calls[0].to_redacted_json();
        assert!(!shown.contains("MIIB") && shown.contains("certificate PEM"), "{shown}");
    }

    #[test]
    fn unsupported_and_incomplete_events_are_errors() {
        let odd = Event::new(Entity::Thing, Operation::Added, "x");
        assert!(matches!(plan(&odd, "eu-west-1"), Err(PlanError::Unsupported { .. })));
        let membership = Event::new(Entity::ThingGroupMembership, Operation::Added, "x");
        assert_eq!(
            plan(&membership, "eu-west-1").unwrap_err().to_string(),
            "thing-group-membership event without a thing-group"
        );
    }
}
