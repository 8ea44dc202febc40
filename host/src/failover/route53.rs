//! `iotdr failover`: the Route 53 side of a failover (`aws-sdk-route53`).
//!
//! - one health check per region, probing `iotdr health serve` at
//!   `/health/<region>` (found again by its caller reference, which names
//!   the failover name and the region, so a second run updates instead of
//!   adding, and another DR file's checks are left alone);
//! - the failover CNAME pair for the devices' endpoint name: set identifiers
//!   `iotdr-primary` (failover PRIMARY) and `iotdr-secondary` (SECONDARY),
//!   each pointing at a region's MQTT host with that region's health check;
//! - the TXT record `_<name>` holding `{"primary": "<region>", "secondary": "<region>"}`,
//!   which device clients read to know the decision.
//!
//! `apply` creates or updates them and keeps the current decision (the TXT
//! record's); `promote <region>` and `failback` switch the pair and the TXT
//! record in one change batch. Records already as wanted are not written, so
//! a second run changes nothing. `--dry-run` prints the steps and writes nothing.

use super::config::{DrConfig, Failover};
use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, HealthCheckConfig, HealthCheckType, ResourceRecord, ResourceRecordSet,
    ResourceRecordSetFailover, RrType,
};
use serde::Serialize;
use std::collections::BTreeMap;

const PRIMARY_ID: &str = "iotdr-primary";
const SECONDARY_ID: &str = "iotdr-secondary";

/// Which region devices are sent to first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Decision {
    pub primary: String,
    pub secondary: String,
}

/// What a region's Route 53 health check probes, and how. Its path may
/// hold the secret: it is neither serialized nor shown whole (`Debug` masks it).
#[derive(Clone, PartialEq)]
pub struct CheckSettings {
    pub https: bool,
    pub fqdn: String,
    pub port: i32,
    /// `/health/<region>`, with `?secret=` when a secret is set.
    pub resource_path: String,
    pub interval: i32,
    pub failure_threshold: i32,
}

impl std::fmt::Debug for CheckSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl CheckSettings {
    /// Whether `other` can become this by UpdateHealthCheck (type and
    /// interval are fixed once created).
    fn updatable_from(&self, other: &CheckSettings) -> bool {
        self.https == other.https && self.interval == other.interval
    }

    /// For people: the secret is never shown.
    fn describe(&self) -> String {
        let path = match self.resource_path.split_once("?secret=") {
            Some((path, _)) => format!("{path}?secret=***"),
            None => self.resource_path.clone(),
        };
        format!(
            "{} {}:{}{path} every {} s, unhealthy after {} failures",
            if self.https { "HTTPS" } else { "HTTP" },
            self.fqdn,
            self.port,
            self.interval,
            self.failure_threshold
        )
    }
}

/// A health check Route 53 holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingCheck {
    pub id: String,
    pub settings: CheckSettings,
}

/// A record of the failover name, as Route 53 holds it or as wanted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub name: String,
    pub kind: String,
    pub set_identifier: Option<String>,
    pub failover: Option<String>,
    pub ttl: Option<i64>,
    pub values: Vec<String>,
    pub health_check_id: Option<String>,
}

/// What Route 53 holds for this failover.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// Per region, the health checks probing its `/health/<region>`.
    pub health_checks: BTreeMap<String, Vec<ExistingCheck>>,
    /// The records named `name` or `_name`.
    pub records: Vec<Record>,
    /// What the TXT record says, when it holds a decision.
    pub decision: Option<Decision>,
}

/// One thing `apply` does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    CreateHealthCheck {
        region: String,
        settings: CheckSettings,
    },
    UpdateHealthCheck {
        region: String,
        id: String,
        settings: CheckSettings,
    },
    /// The records, written in one change batch.
    Upsert(Vec<Record>),
    /// A check no record uses any more (replaced, or a duplicate).
    DeleteHealthCheck {
        region: String,
        id: String,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::CreateHealthCheck { region, settings } => {
                write!(f, "create the health check of {region}: {}", settings.describe())
            }
            Step::UpdateHealthCheck { region, id, settings } => {
                write!(f, "update health check {id} of {region}: {}", settings.describe())
            }
            Step::Upsert(records) => {
                for (i, record) in records.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "upsert {}", describe_record(record))?;
                }
                Ok(())
            }
            Step::DeleteHealthCheck { region, id } => write!(f, "delete health check {id} of {region}, no longer used"),
        }
    }
}

fn describe_record(record: &Record) -> String {
    let mut text = format!("{} {}", record.kind, record.name);
    if let Some(failover) = &record.failover {
        text.push_str(&format!(" {failover}"));
    }
    text.push_str(&format!(" -> {}", record.values.join(" ")));
    if let Some(id) = &record.health_check_id {
        text.push_str(&format!(" (health check {id})"));
    }
    text
}

/// A health check id that `apply` will create (shown by `--dry-run`).
fn new_check_id(region: &str) -> String {
    format!("<new health check of {region}>")
}

/// The Route 53 side of one DR file.
pub struct Route53 {
    client: aws_sdk_route53::Client,
    config: Failover,
    /// Per region, its MQTT host (what the CNAME points at).
    hosts: BTreeMap<String, String>,
    secret: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("Route 53 {operation}: {message}")]
pub struct Route53Error {
    pub operation: &'static str,
    pub message: String,
}

fn failed<E: std::error::Error>(operation: &'static str) -> impl FnOnce(E) -> Route53Error {
    move |e| Route53Error { operation, message: aws_sdk_route53::error::DisplayErrorContext(e).to_string() }
}

impl Route53 {
    /// Route 53 is global: its API is reached through us-east-1.
    pub async fn connect(config: &DrConfig) -> Result<Route53, String> {
        let failover = config.failover().map_err(|e| e.to_string())?.clone();
        let shared = crate::aws::sdk_config("us-east-1", failover.endpoint_url.as_deref()).await;
        let secret = config.health_secret()?;
        let hosts =
            config.regions.iter().map(|(name, region)| (name.clone(), region.mqtt_host().to_string())).collect();
        Ok(Route53 { client: aws_sdk_route53::Client::new(&shared), config: failover, hosts, secret })
    }

    /// What a region's health check should be.
    pub fn wanted_check(&self, region: &str) -> CheckSettings {
        let check = &self.config.health_check;
        let mut resource_path = format!("/health/{region}");
        if let Some(secret) = &self.secret {
            resource_path.push_str(&format!("?secret={secret}"));
        }
        CheckSettings {
            https: check.https,
            fqdn: check.fqdn.clone(),
            port: check.port,
            resource_path,
            interval: check.interval,
            failure_threshold: check.failure_threshold,
        }
    }

    /// How the caller references of this name's health check of `region`
    /// begin: `iotdr-<hash of the name>-<region>-`.
    fn reference_prefix(&self, region: &str) -> String {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(self.config.name.as_bytes());
        let short: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("iotdr-{short}-{region}-")
    }

    fn regions(&self) -> [&str; 2] {
        [&self.config.primary, &self.config.secondary]
    }

    /// Reads the health checks and records of this failover.
    pub async fn current(&self) -> Result<Current, Route53Error> {
        let mut current = Current::default();
        let mut marker = None;
        loop {
            let page = self
                .client
                .list_health_checks()
                .set_marker(marker.take())
                .send()
                .await
                .map_err(failed("ListHealthChecks"))?;
            for check in page.health_checks() {
                // Ours: made by iotdr for this name (its caller reference says
                // so), whatever it probes now; another DR file's are left alone.
                let Some(region) = self
                    .regions()
                    .into_iter()
                    .find(|region| check.caller_reference().starts_with(&self.reference_prefix(region)))
                else {
                    continue;
                };
                let Some(config) = check.health_check_config() else { continue };
                let settings = CheckSettings {
                    https: matches!(config.r#type(), HealthCheckType::Https),
                    fqdn: config.fully_qualified_domain_name().unwrap_or_default().to_string(),
                    port: config.port().unwrap_or(0),
                    resource_path: config.resource_path().unwrap_or_default().to_string(),
                    interval: config.request_interval().unwrap_or(30),
                    failure_threshold: config.failure_threshold().unwrap_or(3),
                };
                current
                    .health_checks
                    .entry(region.to_string())
                    .or_default()
                    .push(ExistingCheck { id: check.id().to_string(), settings });
            }
            match page.next_marker() {
                Some(next) if page.is_truncated() => marker = Some(next.to_string()),
                _ => break,
            }
        }

        let names = [self.config.name.clone(), format!("_{}", self.config.name)];
        let mut start: Option<(String, RrType, Option<String>)> = None;
        loop {
            let mut request = self.client.list_resource_record_sets().hosted_zone_id(&self.config.hosted_zone_id);
            if let Some((name, kind, identifier)) = start.take() {
                request =
                    request.start_record_name(name).start_record_type(kind).set_start_record_identifier(identifier);
            }
            let page = request.send().await.map_err(failed("ListResourceRecordSets"))?;
            for set in page.resource_record_sets() {
                let name = set.name().trim_end_matches('.').to_ascii_lowercase();
                if !names.contains(&name) {
                    continue;
                }
                current.records.push(Record {
                    name,
                    kind: set.r#type().as_str().to_string(),
                    set_identifier: set.set_identifier().map(str::to_string),
                    failover: set.failover().map(|f| f.as_str().to_string()),
                    ttl: set.ttl(),
                    values: set.resource_records().iter().map(|r| r.value().to_string()).collect(),
                    health_check_id: set.health_check_id().map(str::to_string),
                });
            }
            match (page.is_truncated(), page.next_record_name(), page.next_record_type()) {
                (true, Some(name), Some(kind)) => {
                    start = Some((name.to_string(), kind.clone(), page.next_record_identifier().map(str::to_string)))
                }
                _ => break,
            }
        }
        let txt = format!("_{}", self.config.name);
        current.decision = current
            .records
            .iter()
            .find(|r| r.name == txt && r.kind == "TXT")
            .and_then(|r| r.values.first())
            .and_then(|value| serde_json::from_str::<Decision>(&txt_text(value)).ok())
            .filter(|d| self.regions().contains(&d.primary.as_str()) && self.regions().contains(&d.secondary.as_str()));
        Ok(current)
    }

    /// The steps that make Route 53 hold this failover with `primary` first
    /// (else the current decision, else the configured primary).
    pub fn plan(&self, current: &Current, primary: Option<&str>) -> (Decision, Vec<Step>) {
        let primary = primary
            .map(str::to_string)
            .or_else(|| current.decision.as_ref().map(|d| d.primary.clone()))
            .unwrap_or_else(|| self.config.primary.clone());
        let secondary = self.regions().into_iter().find(|r| *r != primary).unwrap_or_default().to_string();
        let decision = Decision { primary, secondary };

        let mut steps = Vec::new();
        let mut deletions = Vec::new();
        let mut check_ids = BTreeMap::new();
        for region in self.regions() {
            let wanted = self.wanted_check(region);
            let existing = current.health_checks.get(region).map(Vec::as_slice).unwrap_or_default();
            // Keep one that can become what is wanted, the same preferably; delete the others.
            let kept = existing
                .iter()
                .find(|c| c.settings == wanted)
                .or_else(|| existing.iter().find(|c| wanted.updatable_from(&c.settings)));
            match kept {
                Some(check) => {
                    if check.settings != wanted {
                        steps.push(Step::UpdateHealthCheck {
                            region: region.to_string(),
                            id: check.id.clone(),
                            settings: wanted.clone(),
                        });
                    }
                    check_ids.insert(region, check.id.clone());
                }
                None => {
                    steps.push(Step::CreateHealthCheck { region: region.to_string(), settings: wanted.clone() });
                    check_ids.insert(region, new_check_id(region));
                }
            }
            for check in existing.iter().filter(|c| Some(&c.id) != kept.map(|k| &k.id)) {
                deletions.push(Step::DeleteHealthCheck { region: region.to_string(), id: check.id.clone() });
            }
        }

        let cname = |identifier: &str, failover: &str, region: &str| Record {
            name: self.config.name.clone(),
            kind: "CNAME".into(),
            set_identifier: Some(identifier.into()),
            failover: Some(failover.into()),
            ttl: Some(self.config.ttl),
            values: vec![self.hosts[region].clone()],
            health_check_id: Some(check_ids[region].clone()),
        };
        let txt = Record {
            name: format!("_{}", self.config.name),
            kind: "TXT".into(),
            set_identifier: None,
            failover: None,
            ttl: Some(self.config.ttl),
            values: vec![txt_value(&serde_json::to_string(&decision).expect("a decision is JSON"))],
            health_check_id: None,
        };
        let wanted = [
            cname(PRIMARY_ID, "PRIMARY", &decision.primary),
            cname(SECONDARY_ID, "SECONDARY", &decision.secondary),
            txt,
        ];
        let upserts: Vec<Record> = wanted.into_iter().filter(|record| !current.records.contains(record)).collect();
        if !upserts.is_empty() {
            steps.push(Step::Upsert(upserts));
        }
        steps.extend(deletions);
        (decision, steps)
    }

    /// Carries `steps` out, in order; new health checks' ids replace their placeholders.
    pub async fn execute(&self, steps: Vec<Step>) -> Result<(), Route53Error> {
        let mut created: BTreeMap<String, String> = BTreeMap::new();
        for step in steps {
            match step {
                Step::CreateHealthCheck { region, settings } => {
                    // At most 64 characters: the name goes in as a hash.
                    let reference = format!("{}{:016x}", self.reference_prefix(&region), fastrand::u64(..));
                    let answer = self
                        .client
                        .create_health_check()
                        .caller_reference(reference)
                        .health_check_config(check_config(&settings))
                        .send()
                        .await
                        .map_err(failed("CreateHealthCheck"))?;
                    let id = answer.health_check().map(|c| c.id().to_string()).ok_or_else(|| Route53Error {
                        operation: "CreateHealthCheck",
                        message: "the answer holds no health check".into(),
                    })?;
                    tracing::info!(region, id, "health check created");
                    created.insert(new_check_id(&region), id);
                }
                Step::UpdateHealthCheck { region, id, settings } => {
                    self.client
                        .update_health_check()
                        .health_check_id(&id)
                        .fully_qualified_domain_name(&settings.fqdn)
                        .port(settings.port)
                        .resource_path(&settings.resource_path)
                        .failure_threshold(settings.failure_threshold)
                        .send()
                        .await
                        .map_err(failed("UpdateHealthCheck"))?;
                    tracing::info!(region, id, "health check updated");
                }
                Step::Upsert(records) => {
                    let mut batch = ChangeBatch::builder().comment("iotdr failover");
                    for mut record in records {
                        if let Some(id) = record.health_check_id.as_ref().and_then(|id| created.get(id)) {
                            record.health_check_id = Some(id.clone());
                        }
                        batch = batch.changes(
                            Change::builder()
                                .action(ChangeAction::Upsert)
                                .resource_record_set(record_set(&record).map_err(failed("ChangeResourceRecordSets"))?)
                                .build()
                                .map_err(failed("ChangeResourceRecordSets"))?,
                        );
                    }
                    let answer = self
                        .client
                        .change_resource_record_sets()
                        .hosted_zone_id(&self.config.hosted_zone_id)
                        .change_batch(batch.build().map_err(failed("ChangeResourceRecordSets"))?)
                        .send()
                        .await
                        .map_err(failed("ChangeResourceRecordSets"))?;
                    let status = answer.change_info().map(|c| c.status().as_str().to_string()).unwrap_or_default();
                    tracing::info!(status, "records changed");
                }
                Step::DeleteHealthCheck { region, id } => {
                    self.client
                        .delete_health_check()
                        .health_check_id(&id)
                        .send()
                        .await
                        .map_err(failed("DeleteHealthCheck"))?;
                    tracing::info!(region, id, "health check deleted");
                }
            }
        }
        Ok(())
    }

    /// Route 53's view of a health check: how many of its checkers last saw it healthy.
    pub async fn check_status(&self, id: &str) -> Result<(usize, usize), Route53Error> {
        let answer = self
            .client
            .get_health_check_status()
            .health_check_id(id)
            .send()
            .await
            .map_err(failed("GetHealthCheckStatus"))?;
        let observations = answer.health_check_observations();
        let healthy = observations
            .iter()
            .filter(|o| o.status_report().and_then(|r| r.status()).is_some_and(|s| s.starts_with("Success")))
            .count();
        Ok((healthy, observations.len()))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn configured(&self) -> Decision {
        Decision { primary: self.config.primary.clone(), secondary: self.config.secondary.clone() }
    }
}

fn check_config(settings: &CheckSettings) -> HealthCheckConfig {
    HealthCheckConfig::builder()
        .r#type(if settings.https { HealthCheckType::Https } else { HealthCheckType::Http })
        .fully_qualified_domain_name(&settings.fqdn)
        .port(settings.port)
        .resource_path(&settings.resource_path)
        .request_interval(settings.interval)
        .failure_threshold(settings.failure_threshold)
        .build()
        .expect("the type is set")
}

fn record_set(record: &Record) -> Result<ResourceRecordSet, aws_sdk_route53::error::BuildError> {
    let mut set = ResourceRecordSet::builder()
        .name(&record.name)
        .r#type(RrType::from(record.kind.as_str()))
        .set_set_identifier(record.set_identifier.clone())
        .set_failover(record.failover.as_deref().map(ResourceRecordSetFailover::from))
        .set_ttl(record.ttl)
        .set_health_check_id(record.health_check_id.clone());
    for value in &record.values {
        set = set.resource_records(ResourceRecord::builder().value(value).build()?);
    }
    set.build()
}

/// `text` as one TXT string: quoted, its quotes and backslashes escaped.
fn txt_value(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The text of a TXT value (one or more quoted strings, joined).
pub fn txt_text(value: &str) -> String {
    let mut text = String::new();
    let mut chars = value.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => text.extend(chars.next()),
            c if quoted => text.push(c),
            _ => {}
        }
    }
    if text.is_empty() && !value.contains('"') { value.to_string() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_values_round_trip_with_quotes_escaped() {
        let json = r#"{"primary":"us-east-1","secondary":"eu-west-1"}"#;
        let value = txt_value(json);
        assert_eq!(value, r#""{\"primary\":\"us-east-1\",\"secondary\":\"eu-west-1\"}""#);
        assert_eq!(txt_text(&value), json);
        assert_eq!(txt_text(r#""ab" "cd""#), "abcd", "strings of one record are joined");
        assert_eq!(txt_text("plain"), "plain");
    }

    #[test]
    fn the_secret_is_never_described() {
        let settings = CheckSettings {
            https: true,
            fqdn: "h.example.com".into(),
            port: 443,
            resource_path: "/health/us-east-1?secret=hunter2".into(),
            interval: 30,
            failure_threshold: 3,
        };
        let text = Step::CreateHealthCheck { region: "us-east-1".into(), settings }.to_string();
        assert!(text.contains("/health/us-east-1?secret=***") && !text.contains("hunter2"), "{text}");
    }
}
