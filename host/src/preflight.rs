//! Checks made before a command writes (`sync`, `verify --repair`): the
//! source region and every target answer a read with these credentials,
//! and the identity may make the writes a sync makes in every target.
//! Without them, an unreachable or forbidden region would show only at the
//! first write, retried until the run's deadline (hours), or as dead letters.
//!
//! Write permissions are asked of IAM's policy simulator
//! (`SimulatePrincipalPolicy`) for the caller (`GetCallerIdentity`; an
//! assumed role is simulated as its role, found with `GetRole`). It weighs
//! the identity's policies, permission boundaries and the organization's
//! SCPs, not a role session's own policy. Where it cannot be asked (the
//! identity may not call it, root or federated callers, emulators without
//! IAM) the check is skipped with a warning, and a missing permission shows
//! at the first write, as a dead letter naming the call.

use crate::aws::{AwsError, RegionClients, briefly, sdk_config};
use crate::config;
use crate::event::Entity;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{role} region {region} {what}: {error} (checked before any write; nothing was written)")]
    Unreachable { role: &'static str, region: String, what: &'static str, error: AwsError },
    #[error(
        "target region {region}: {principal} may not {} (IAM's policy simulator, for resources such as {example}; \
         checked before any write; nothing was written). If its policies allow these on the names iotdr writes \
         only, pass --skip-permission-check",
        refused.join(", ")
    )]
    NotPermitted { region: String, principal: String, refused: Vec<String>, example: String },
}

/// Reads once from the source and from every target of `config`; with a
/// sync's `query`, the source runs it once too. With `writes`, also asks
/// whether the caller may write in every target.
pub async fn check(config: &config::Pipeline, query: Option<&str>, writes: bool) -> Result<(), PreflightError> {
    let regions =
        std::iter::once(("source", &config.source_region)).chain(config.targets.iter().map(|t| ("target", t)));
    for (role, region) in regions {
        let settings = config.regions.get(region).cloned().unwrap_or_default();
        let fail = |what, error| PreflightError::Unreachable { role, region: region.clone(), what, error };
        let clients =
            RegionClients::connect(region, &settings, false).await.map_err(|e| fail("cannot be reached", e))?;
        briefly!(clients.iot.list_thing_types().max_results(1))
            .map_err(|e| fail("does not answer a read (ListThingTypes)", e))?;
        if let (Some(query), "source") = (query, role) {
            briefly!(clients.iot.search_index().query_string(query).max_results(1))
                .map_err(|e| fail("rejects the --query (SearchIndex; is fleet indexing on?)", e))?;
        }
    }
    if writes {
        permissions(config).await?;
    }
    Ok(())
}

/// The IAM actions a sync or a repair needs in a target, the kind of
/// resource each acts on, and the entity whose replication needs it.
const WRITES: [(&str, &str, Entity); 16] = [
    ("iot:CreateThing", "thing", Entity::Thing),
    ("iot:UpdateThing", "thing", Entity::Thing),
    ("iot:AttachThingPrincipal", "thing", Entity::Thing),
    ("iot:UpdateThingShadow", "thing", Entity::Shadow),
    ("iot:CreateThingType", "thingtype", Entity::ThingType),
    ("iot:CreateThingGroup", "thinggroup", Entity::ThingGroup),
    ("iot:UpdateThingGroup", "thinggroup", Entity::ThingGroup),
    ("iot:CreateDynamicThingGroup", "thinggroup", Entity::ThingGroup),
    ("iot:AddThingToThingGroup", "thinggroup", Entity::ThingGroupMembership),
    ("iot:CreateBillingGroup", "billinggroup", Entity::BillingGroup),
    ("iot:AddThingToBillingGroup", "billinggroup", Entity::BillingGroupMembership),
    ("iot:RegisterCertificateWithoutCA", "cert", Entity::Certificate),
    ("iot:UpdateCertificate", "cert", Entity::Certificate),
    ("iot:AttachPolicy", "cert", Entity::Policy),
    ("iot:CreatePolicy", "policy", Entity::Policy),
    ("iot:CreatePolicyVersion", "policy", Entity::Policy),
];

/// The name the simulated resources take: any name iotdr may write.
const PROBE: &str = "iotdr-permission-check";

/// Who the policy simulator is asked about, from `GetCallerIdentity`'s ARN.
#[derive(Debug, PartialEq)]
enum Caller {
    /// An IAM user: simulated as it is.
    User(String),
    /// A role session: the role is simulated (its ARN has a path `GetRole` knows).
    Role { partition: String, account: String, name: String },
    /// Root, a federated user or anything else the simulator does not take.
    Other(String),
}

fn caller(arn: &str) -> Caller {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let (partition, service, account, resource) = match parts.as_slice() {
        ["arn", partition, service, _, account, resource] => (*partition, *service, *account, *resource),
        _ => return Caller::Other(arn.to_string()),
    };
    match (service, resource.split('/').collect::<Vec<_>>().as_slice()) {
        ("iam", ["user", ..]) => Caller::User(arn.to_string()),
        ("sts", ["assumed-role", name, _session]) => {
            Caller::Role { partition: partition.into(), account: account.into(), name: (*name).into() }
        }
        _ => Caller::Other(arn.to_string()),
    }
}

/// One question for the simulator: these actions on this resource, asked
/// from this region (`aws:RequestedRegion`, which SCPs often condition on).
#[derive(Debug, PartialEq)]
struct Simulation {
    resource: String,
    region: String,
    actions: Vec<&'static str>,
}

/// The questions for one target: per kind of resource, the actions
/// `replicate` needs on an ARN of that kind in `region` (in the caller's
/// `partition` and `account`), and the global registry's write with the first target.
fn simulations(config: &config::Pipeline, region: &str, partition: &str, account: &str) -> Vec<Simulation> {
    let mut out: Vec<Simulation> = Vec::new();
    for (action, kind, entity) in WRITES {
        if !config.apply.replicate.contains(&entity) {
            continue;
        }
        let resource = format!("arn:{partition}:iot:{region}:{account}:{kind}/{PROBE}");
        match out.iter_mut().find(|s| s.resource == resource) {
            Some(simulation) => simulation.actions.push(action),
            None => out.push(Simulation { resource, region: region.to_string(), actions: vec![action] }),
        }
    }
    if let (Some(table), Some(first)) = (&config.apply.global_registry_table, config.targets.first())
        && region == first
    {
        let table_region = config.apply.global_registry_region.as_deref().unwrap_or(region);
        out.push(Simulation {
            resource: format!("arn:{partition}:dynamodb:{table_region}:{account}:table/{table}"),
            region: table_region.to_string(),
            // What `GlobalRegistry` writes with.
            actions: vec!["dynamodb:UpdateItem"],
        });
    }
    out
}

/// Asks IAM's policy simulator whether the caller may make a sync's writes
/// in every target; skips (with a warning) when it cannot be asked.
async fn permissions(config: &config::Pipeline) -> Result<(), PreflightError> {
    let Some(first) = config.targets.first() else { return Ok(()) };
    let settings = config.regions.get(first).cloned().unwrap_or_default();
    let shared = sdk_config(first, settings.endpoint_url.as_deref()).await;
    let skip = |why: String| {
        tracing::warn!(
            "write permissions not checked before writing: {why}; a missing permission shows at the first write, \
             as a dead letter naming the call"
        );
    };
    let sts = aws_sdk_sts::Client::new(&shared);
    let identity = match briefly!(sts.get_caller_identity()) {
        Ok(identity) => identity,
        Err(e) => {
            skip(format!("GetCallerIdentity failed: {e}"));
            return Ok(());
        }
    };
    let (arn, account) = (identity.arn.unwrap_or_default(), identity.account.unwrap_or_default());
    let partition = arn.split(':').nth(1).unwrap_or("aws").to_string();
    let iam = aws_sdk_iam::Client::new(&shared);
    let principal = match caller(&arn) {
        Caller::User(arn) => arn,
        Caller::Role { partition, account, name } => match briefly!(iam.get_role().role_name(&name)) {
            Ok(role) => role.role.map(|r| r.arn).unwrap_or_default(),
            // Without GetRole: right unless the role has a path.
            Err(_) => format!("arn:{partition}:iam::{account}:role/{name}"),
        },
        Caller::Other(arn) => {
            skip(format!("IAM's policy simulator does not take the caller {arn}"));
            return Ok(());
        }
    };
    for region in &config.targets {
        let mut refused = Vec::new();
        let mut undetermined = Vec::new();
        let mut example = String::new();
        for Simulation { resource, region: asked_from, actions } in simulations(config, region, &partition, &account) {
            let requested_region = aws_sdk_iam::types::ContextEntry::builder()
                .context_key_name("aws:RequestedRegion")
                .context_key_values(asked_from)
                .context_key_type(aws_sdk_iam::types::ContextKeyTypeEnum::String)
                .build();
            let simulated = briefly!(
                iam.simulate_principal_policy()
                    .policy_source_arn(&principal)
                    .set_action_names(Some(actions.iter().map(|a| a.to_string()).collect()))
                    .resource_arns(&resource)
                    .context_entries(requested_region)
            );
            let results = match simulated {
                Ok(out) => out.evaluation_results.unwrap_or_default(),
                Err(e) => {
                    skip(format!("SimulatePrincipalPolicy for {principal} failed: {e}"));
                    return Ok(());
                }
            };
            let decisions = results
                .iter()
                .map(|r| Decision {
                    action: r.eval_action_name.as_str(),
                    decision: r.eval_decision.as_str(),
                    needs_context: r.missing_context_values.as_ref().is_some_and(|m| !m.is_empty()),
                })
                .collect::<Vec<_>>();
            let (no, unknown) = refusals(&actions, &decisions);
            if !no.is_empty() && example.is_empty() {
                example = resource;
            }
            refused.extend(no);
            undetermined.extend(unknown);
        }
        if !undetermined.is_empty() {
            // A condition on what only the request itself holds (a tag, a source IP): the simulator cannot tell.
            tracing::warn!(
                region,
                "write permissions not known before writing for {}: they depend on conditions the policy simulator \
                 is not given",
                undetermined.join(", ")
            );
        }
        if !refused.is_empty() {
            return Err(PreflightError::NotPermitted { region: region.clone(), principal, refused, example });
        }
    }
    Ok(())
}

/// The simulator's answer for one action.
struct Decision<'a> {
    action: &'a str,
    /// `allowed`, `explicitDeny` or `implicitDeny`.
    decision: &'a str,
    /// It named context keys it was not given: a denial may not hold.
    needs_context: bool,
}

/// The actions the simulator did not allow, each with its decision (an
/// action it gave no answer for counts as refused), and apart those whose
/// denial rests on context it was not given.
fn refusals(actions: &[&str], decisions: &[Decision]) -> (Vec<String>, Vec<String>) {
    let (mut refused, mut undetermined) = (Vec::new(), Vec::new());
    for action in actions {
        match decisions.iter().find(|d| d.action.eq_ignore_ascii_case(action)) {
            Some(d) if d.decision == "allowed" => {}
            Some(d) if d.needs_context => undetermined.push(action.to_string()),
            Some(d) => refused.push(format!("{action} ({})", d.decision)),
            None => refused.push(format!("{action} (no answer)")),
        }
    }
    (refused, undetermined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_simulated_as_their_user_or_role() {
        assert_eq!(
            caller("arn:aws:iam::123456789012:user/ops/alice"),
            Caller::User("arn:aws:iam::123456789012:user/ops/alice".into())
        );
        assert_eq!(
            caller("arn:aws:sts::123456789012:assumed-role/iotdr-sync/i-0abc"),
            Caller::Role { partition: "aws".into(), account: "123456789012".into(), name: "iotdr-sync".into() }
        );
        assert!(matches!(caller("arn:aws:iam::123456789012:root"), Caller::Other(_)));
        assert!(matches!(caller("arn:aws:sts::123456789012:federated-user/bob"), Caller::Other(_)));
        assert!(matches!(caller("not an arn"), Caller::Other(_)));
    }

    #[test]
    fn what_is_not_allowed_is_named_with_its_decision() {
        let actions = ["iot:CreateThing", "iot:UpdateThing", "iot:AttachThingPrincipal", "iot:UpdateThingShadow"];
        let decision = |action, decision, needs_context| Decision { action, decision, needs_context };
        let decisions = [
            decision("iot:CreateThing", "allowed", false),
            decision("iot:UpdateThing", "explicitDeny", false),
            decision("iot:UpdateThingShadow", "implicitDeny", true),
        ];
        let (refused, undetermined) = refusals(&actions, &decisions);
        assert_eq!(refused, ["iot:UpdateThing (explicitDeny)", "iot:AttachThingPrincipal (no answer)"]);
        assert_eq!(undetermined, ["iot:UpdateThingShadow"], "a denial resting on missing context is not a refusal");
    }

    #[test]
    fn only_what_the_pipeline_replicates_is_simulated() {
        let text = r#"
[pipeline]
name = "p"
source_region = "us-east-1"
targets = ["eu-west-1", "cn-north-1"]

[source]
kind = "dynamodb-stream"
table = "events"

[apply]
replicate = ["things", "certificates"]
global_registry_table = "fleet"
global_registry_region = "us-east-1"
"#;
        let config = config::Pipeline::parse(std::path::Path::new("p.toml"), text, &|_| None).unwrap();
        let simulation = |resource: &str, region: &str, actions: &[&'static str]| Simulation {
            resource: resource.to_string(),
            region: region.to_string(),
            actions: actions.to_vec(),
        };
        assert_eq!(
            simulations(&config, "cn-north-1", "aws-cn", "123456789012"),
            [
                simulation(
                    "arn:aws-cn:iot:cn-north-1:123456789012:thing/iotdr-permission-check",
                    "cn-north-1",
                    &["iot:CreateThing", "iot:UpdateThing", "iot:AttachThingPrincipal"]
                ),
                simulation(
                    "arn:aws-cn:iot:cn-north-1:123456789012:cert/iotdr-permission-check",
                    "cn-north-1",
                    &["iot:RegisterCertificateWithoutCA", "iot:UpdateCertificate"]
                ),
            ],
            "not the first target: no global registry"
        );
        let first = simulations(&config, "eu-west-1", "aws", "123456789012");
        assert_eq!(
            first.last(),
            Some(&simulation(
                "arn:aws:dynamodb:us-east-1:123456789012:table/fleet",
                "us-east-1",
                &["dynamodb:UpdateItem"]
            ))
        );
    }
}
