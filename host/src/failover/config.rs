//! The DR file (`dr.toml`) that `iotdr health serve` and `iotdr failover`
//! read: the regions devices can be on (their MQTT endpoint, where their AWS
//! APIs are), how a health check connects, and the Route 53 failover records.
//!
//! ```toml
//! [regions.us-east-1]
//! mqtt_endpoint = "a1b2c3-ats.iot.us-east-1.amazonaws.com:8883"
//! [regions.eu-west-1]
//! mqtt_endpoint = "a1b2c3-ats.iot.eu-west-1.amazonaws.com:8883"
//!
//! [health]
//! listen = "0.0.0.0:8443"
//! ca = "AmazonRootCA1.pem"
//! certificate = "health.crt"
//! private_key = "health.key"
//!
//! [failover]
//! hosted_zone_id = "Z0123456789ABCDEFGHIJ"
//! name = "iot.example.com"
//! primary = "us-east-1"
//! secondary = "eu-west-1"
//! health_check = { fqdn = "health.example.com" }
//! ```

use crate::config::{ConfigError, Region as ApiSettings, TomlFile, check_region};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct DrConfig {
    pub file: PathBuf,
    pub regions: BTreeMap<String, DrRegion>,
    pub health: Option<Health>,
    pub failover: Option<Failover>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DrRegion {
    /// `host:port` of the region's MQTT broker (its `iot:Data-ATS` endpoint
    /// and 8883); the host is what the failover records point devices at.
    pub mqtt_endpoint: String,
    /// Where its AWS APIs are (emulators, VPC endpoints): the control-plane
    /// probe and Route 53 use them.
    pub api: ApiSettings,
    /// The health check's credentials here, when not `[health]`'s.
    pub credentials: Option<Credentials>,
}

impl DrRegion {
    pub fn mqtt_host(&self) -> &str {
        self.mqtt_endpoint.rsplit_once(':').map_or(&self.mqtt_endpoint, |(host, _)| host)
    }
}

/// The X.509 files an MQTT health check connects with.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub listen: SocketAddr,
    pub credentials: Option<Credentials>,
    /// Each check connects as `<client_id>-<random>`: the AWS IoT policy of
    /// its certificate must allow `client/<client_id>-*`.
    pub client_id: String,
    /// Each check round-trips on `<topic>/<its client id>`.
    pub topic: String,
    pub messages: u32,
    pub timeout: Duration,
    /// Asked for as `?secret=` when set (file, else IOTDR_HEALTH_SECRET).
    pub secret_file: Option<PathBuf>,
    /// Checks run at once per region; more requests wait their turn.
    pub concurrency: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    pub hosted_zone_id: String,
    /// The name devices connect by; a CNAME pair with failover routing.
    pub name: String,
    pub primary: String,
    pub secondary: String,
    pub ttl: i64,
    pub health_check: HealthCheck,
    /// Where the Route 53 API is (an emulator); else `AWS_ENDPOINT_URL`, else AWS's own.
    pub endpoint_url: Option<String>,
    /// How often `iotdr failover watch` checks both regions (default: the
    /// health check's interval).
    pub watch_interval: Duration,
    /// Whether `watch` sends devices back to the primary once it passes
    /// `failure_threshold` checks in a row again (default: no, people do).
    pub auto_failback: bool,
}

/// One Route 53 health check per region, probing `iotdr health serve`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// Where Route 53 reaches `iotdr health serve`.
    pub fqdn: String,
    pub port: i32,
    pub https: bool,
    /// Seconds between Route 53's probes: 10 or 30.
    pub interval: i32,
    pub failure_threshold: i32,
}

impl DrConfig {
    pub fn load(file: &Path) -> Result<DrConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        DrConfig::parse(file, &text, &|name| std::env::var(name).ok())
    }

    pub fn parse(file: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<DrConfig, ConfigError> {
        let (raw, located) = TomlFile::read::<RawDr>(file, text, env)?;
        let at = |span: std::ops::Range<usize>, message: String| located.at(span, message);
        let base = file.parent().unwrap_or(Path::new("."));
        let path = |p: &str| base.join(p);
        let credentials = |raw: &RawCredentials, span: std::ops::Range<usize>| -> Result<_, ConfigError> {
            match (&raw.ca, &raw.certificate, &raw.private_key) {
                (None, None, None) => Ok(None),
                (Some(ca), Some(certificate), Some(key)) => {
                    Ok(Some(Credentials { ca: path(ca), certificate: path(certificate), private_key: path(key) }))
                }
                _ => Err(at(span, "`ca`, `certificate` and `private_key` go together".into())),
            }
        };

        let mut regions = BTreeMap::new();
        for (name, region) in raw.regions {
            check_region(name.get_ref()).map_err(|m| at(name.span(), m))?;
            let span = region.span();
            let region = region.into_inner();
            let endpoint = region.mqtt_endpoint.get_ref();
            let port = endpoint.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
                return Err(at(region.mqtt_endpoint.span(), format!("mqtt_endpoint `{endpoint}` is not host:port")));
            }
            regions.insert(
                name.into_inner(),
                DrRegion {
                    mqtt_endpoint: endpoint.clone(),
                    api: ApiSettings { endpoint_url: region.endpoint_url, data_endpoint_url: None },
                    credentials: credentials(&region.credentials, span)?,
                },
            );
        }
        if regions.is_empty() {
            return Err(at(0..0, "no [regions.<name>] table: name the regions devices can be on".into()));
        }

        let health = match raw.health {
            None => None,
            Some(health) => {
                let span = health.span();
                let health = health.into_inner();
                let listen = health.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
                    at(health.listen.span(), format!("listen `{}`: {e} (like 127.0.0.1:8443)", health.listen.get_ref()))
                })?;
                let health_credentials = credentials(&health.credentials, span.clone())?;
                if health_credentials.is_none()
                    && let Some((name, _)) = regions.iter().find(|(_, r)| r.credentials.is_none())
                {
                    return Err(at(
                        span,
                        format!("region {name} has no `ca`, `certificate` and `private_key`, nor does [health]"),
                    ));
                }
                let bounded =
                    |value: &Option<Spanned<i64>>, name: &str, range: std::ops::RangeInclusive<i64>, default| {
                        match value {
                            None => Ok(default),
                            Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref()),
                            Some(v) => Err(at(v.span(), format!("{name} = {} is out of range {range:?}", v.get_ref()))),
                        }
                    };
                Some(Health {
                    listen,
                    credentials: health_credentials,
                    client_id: health.client_id.unwrap_or_else(|| "iotdr-health".into()),
                    topic: health.topic.unwrap_or_else(|| "iotdr/health".into()),
                    messages: bounded(&health.messages, "messages", 1..=100, 2)? as u32,
                    timeout: Duration::from_millis(
                        bounded(&health.timeout_ms, "timeout_ms", 100..=60_000, 3000)? as u64
                    ),
                    secret_file: health.secret_file.as_deref().map(path),
                    concurrency: bounded(&health.concurrency, "concurrency", 1..=64, 8)? as usize,
                })
            }
        };

        let failover = match raw.failover {
            None => None,
            Some(failover) => {
                let known = |region: &Spanned<String>| -> Result<String, ConfigError> {
                    if regions.contains_key(region.get_ref()) {
                        Ok(region.get_ref().clone())
                    } else {
                        let names: Vec<&str> = regions.keys().map(String::as_str).collect();
                        Err(at(
                            region.span(),
                            format!(
                                "region {} has no [regions.{}] table (known: {})",
                                region.get_ref(),
                                region.get_ref(),
                                names.join(", ")
                            ),
                        ))
                    }
                };
                let primary = known(&failover.primary)?;
                let secondary = known(&failover.secondary)?;
                if primary == secondary {
                    return Err(at(failover.secondary.span(), "the secondary is the primary".into()));
                }
                let name = failover.name.get_ref().trim_end_matches('.').to_ascii_lowercase();
                if name.split('.').count() < 2 || name.split('.').any(str::is_empty) {
                    return Err(at(
                        failover.name.span(),
                        format!("name `{}` is not a DNS name", failover.name.get_ref()),
                    ));
                }
                let check = failover.health_check.into_inner();
                // HTTP by default: `iotdr health serve` speaks plain HTTP; HTTPS
                // needs a TLS terminator in front of it (docs/failover.md).
                let https = match check.r#type.as_ref().map(|t| (t.get_ref().as_str(), t.span())) {
                    None | Some(("HTTP", _)) => false,
                    Some(("HTTPS", _)) => true,
                    Some((other, span)) => {
                        return Err(at(span, format!("type `{other}`: HTTP or HTTPS")));
                    }
                };
                let port = match &check.port {
                    None => None,
                    Some(port) if (1..=65_535).contains(port.get_ref()) => Some(*port.get_ref() as i32),
                    Some(port) => {
                        return Err(at(port.span(), format!("port = {} is out of range 1..=65535", port.get_ref())));
                    }
                };
                let interval = check.interval.map_or(Ok(30), |v| match *v.get_ref() {
                    10 | 30 => Ok(*v.get_ref() as i32),
                    other => Err(at(v.span(), format!("interval = {other}: Route 53 probes every 10 or 30 seconds"))),
                })?;
                let threshold = check.failure_threshold.map_or(Ok(3), |v| match *v.get_ref() {
                    n @ 1..=10 => Ok(n as i32),
                    other => Err(at(v.span(), format!("failure_threshold = {other} is out of range 1..=10"))),
                })?;
                let ttl = failover.ttl.map_or(Ok(30), |v| match *v.get_ref() {
                    n @ 0..=86_400 => Ok(n),
                    other => Err(at(v.span(), format!("ttl = {other} is out of range 0..=86400"))),
                })?;
                let watch_interval = match &failover.watch_interval_ms {
                    None => Duration::from_secs(interval as u64),
                    Some(ms) if (100..=3_600_000).contains(ms.get_ref()) => Duration::from_millis(*ms.get_ref() as u64),
                    Some(ms) => {
                        return Err(at(
                            ms.span(),
                            format!("watch_interval_ms = {} is out of range 100..=3600000", ms.get_ref()),
                        ));
                    }
                };
                Some(Failover {
                    watch_interval,
                    auto_failback: failover.auto_failback,
                    hosted_zone_id: failover.hosted_zone_id.trim_start_matches("/hostedzone/").to_string(),
                    name,
                    primary,
                    secondary,
                    ttl,
                    health_check: HealthCheck {
                        fqdn: check.fqdn,
                        port: port.unwrap_or(if https { 443 } else { 80 }),
                        https,
                        interval,
                        failure_threshold: threshold,
                    },
                    endpoint_url: failover.endpoint_url,
                })
            }
        };
        Ok(DrConfig { file: file.to_path_buf(), regions, health, failover })
    }

    /// The health settings, or an error naming the file.
    pub fn health(&self) -> Result<&Health, ConfigError> {
        self.health.as_ref().ok_or_else(|| self.missing("[health]"))
    }

    /// The failover settings, or an error naming the file.
    pub fn failover(&self) -> Result<&Failover, ConfigError> {
        self.failover.as_ref().ok_or_else(|| self.missing("[failover]"))
    }

    fn missing(&self, table: &str) -> ConfigError {
        ConfigError { file: self.file.clone(), line: 0, column: 0, message: format!("no {table} table") }
    }

    /// The secret health checks want (`?secret=`): `[health] secret_file`,
    /// else IOTDR_HEALTH_SECRET. It travels in a URL's query string, so it
    /// is held to the characters that need no encoding there.
    pub fn health_secret(&self) -> Result<Option<String>, String> {
        let file = self.health.as_ref().and_then(|h| h.secret_file.as_deref());
        let secret = crate::config::read_secret(file, "health.secret_file", "IOTDR_HEALTH_SECRET")?;
        if let Some(secret) = &secret
            && !secret.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            let from =
                file.map_or("IOTDR_HEALTH_SECRET".to_string(), |f| format!("health.secret_file {}", f.display()));
            return Err(format!("{from}: the secret may hold only letters, digits and . _ ~ - (it goes in a URL)"));
        }
        Ok(secret)
    }

    /// The files a region's health check connects with.
    pub fn credentials(&self, region: &str) -> Option<&Credentials> {
        let region = self.regions.get(region)?;
        region.credentials.as_ref().or(self.health.as_ref()?.credentials.as_ref())
    }
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDr {
    #[serde(default)]
    regions: BTreeMap<Spanned<String>, Spanned<RawRegion>>,
    health: Option<Spanned<RawHealth>>,
    failover: Option<RawFailover>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    ca: Option<String>,
    certificate: Option<String>,
    private_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    mqtt_endpoint: Spanned<String>,
    endpoint_url: Option<String>,
    #[serde(flatten)]
    credentials: RawCredentials,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    listen: Spanned<String>,
    #[serde(flatten)]
    credentials: RawCredentials,
    client_id: Option<String>,
    topic: Option<String>,
    messages: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    secret_file: Option<String>,
    concurrency: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    hosted_zone_id: String,
    name: Spanned<String>,
    primary: Spanned<String>,
    secondary: Spanned<String>,
    ttl: Option<Spanned<i64>>,
    health_check: Spanned<RawHealthCheck>,
    endpoint_url: Option<String>,
    watch_interval_ms: Option<Spanned<i64>>,
    #[serde(default)]
    auto_failback: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    fqdn: String,
    port: Option<Spanned<i64>>,
    r#type: Option<Spanned<String>>,
    interval: Option<Spanned<i64>>,
    failure_threshold: Option<Spanned<i64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DrConfig, ConfigError> {
        DrConfig::parse(Path::new("/etc/iotdr/dr.toml"), text, &|_| None)
    }

    const REGIONS: &str = "[regions.us-east-1]\nmqtt_endpoint = \"a-ats.iot.us-east-1.amazonaws.com:8883\"\n\
                           [regions.eu-west-1]\nmqtt_endpoint = \"a-ats.iot.eu-west-1.amazonaws.com:8883\"\n";

    #[test]
    fn a_whole_file_with_defaults_filled_in() {
        let config = parse(&format!(
            "{REGIONS}[health]\nlisten = \"127.0.0.1:8443\"\nca = \"ca.pem\"\ncertificate = \"h.crt\"\nprivate_key = \"h.key\"\n\
             [failover]\nhosted_zone_id = \"/hostedzone/Z1\"\nname = \"IoT.example.com.\"\nprimary = \"us-east-1\"\n\
             secondary = \"eu-west-1\"\nhealth_check = {{ fqdn = \"health.example.com\" }}\n"
        ))
        .unwrap();
        let health = config.health().unwrap();
        assert_eq!((health.messages, health.timeout, health.concurrency), (2, Duration::from_secs(3), 8));
        assert_eq!(config.credentials("eu-west-1").unwrap().ca, Path::new("/etc/iotdr/ca.pem"));
        let failover = config.failover().unwrap();
        assert_eq!((failover.hosted_zone_id.as_str(), failover.name.as_str()), ("Z1", "iot.example.com"));
        assert_eq!(
            failover.health_check,
            HealthCheck {
                fqdn: "health.example.com".into(),
                port: 80,
                https: false,
                interval: 30,
                failure_threshold: 3
            }
        );
        assert_eq!(config.regions["us-east-1"].mqtt_host(), "a-ats.iot.us-east-1.amazonaws.com");
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        let failover = |extra: &str| {
            parse(&format!(
                "{REGIONS}[failover]\nhosted_zone_id = \"Z1\"\nname = \"iot.example.com\"\n{extra}\
                 health_check = {{ fqdn = \"h.example.com\" }}\n"
            ))
            .unwrap_err()
            .to_string()
        };
        let error = failover("primary = \"us-west-2\"\nsecondary = \"eu-west-1\"\n");
        assert!(
            error.starts_with("/etc/iotdr/dr.toml:8:") && error.contains("us-west-2 has no [regions.us-west-2]"),
            "{error}"
        );
        let error = failover("primary = \"eu-west-1\"\nsecondary = \"eu-west-1\"\n");
        assert!(error.contains(":9:") && error.contains("the secondary is the primary"), "{error}");
        let error = parse("[regions.us-east-1]\nmqtt_endpoint = \"no-port\"\n").unwrap_err().to_string();
        assert!(error.contains(":2:") && error.contains("not host:port"), "{error}");
        let error = parse(&format!("{REGIONS}[health]\nlisten = \"127.0.0.1:1\"\n")).unwrap_err().to_string();
        assert!(error.contains("region eu-west-1 has no `ca`"), "{error}");
        let error =
            parse(&format!("{REGIONS}[health]\nlisten = \"127.0.0.1:1\"\nca = \"x\"\n")).unwrap_err().to_string();
        assert!(error.contains("go together"), "{error}");
        let error =
            parse(&format!("{REGIONS}[health]\nlisten = \"127.0.0.1:1\"\nmesages = 2\n")).unwrap_err().to_string();
        assert!(error.contains("mesages"), "{error}");
        assert!(parse("").unwrap_err().to_string().contains("no [regions.<name>] table"));
        let typed = parse(&format!(
            "{REGIONS}[failover]\nhosted_zone_id = \"Z1\"\nname = \"iot.example.com\"\nprimary = \"us-east-1\"\n\
             secondary = \"eu-west-1\"\nhealth_check = {{ fqdn = \"h.example.com\", type = \"TCP\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(typed.contains(":10:") && typed.contains("type `TCP`: HTTP or HTTPS"), "{typed}");
    }
}
