//! A device that connects to AWS IoT by a failover name and follows the
//! primary region: it publishes telemetry and its shadow's reported state,
//! re-resolves the name and reads the TXT record `_<name>` every `recheck`,
//! and when the answer names another broker, disconnects and connects there
//! (and back, when the primary returns), without a restart.
//!
//! Where it connects: the broker the TXT record's primary maps to (in
//! `endpoints`, as the AWS sample's device does), else where the name's
//! CNAME points. With a DNS server of its own (`dns`, the drill's) the
//! broker's host is resolved there too and the connection made to its
//! address; otherwise the system resolver finds it, as on a real device.
//!
//! What happens is told as [`Happened`] values, one JSON line each in the
//! binary.

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::RData;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Settings {
    /// The failover name (`iot.example.com`).
    pub name: String,
    pub port: u16,
    pub thing: String,
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// Region → broker host, to follow the TXT record's primary.
    pub endpoints: BTreeMap<String, String>,
    /// A DNS server to ask instead of the system's (`127.0.0.1:5353`).
    pub dns: Option<SocketAddr>,
    /// How often the name and the TXT record are read again.
    pub recheck: Duration,
    /// How often a message and a shadow update are published.
    pub publish_every: Duration,
}

/// Which broker the device should be on, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The broker's host name.
    pub host: String,
    /// Where to connect: the host's address when a DNS server of our own
    /// resolved it, else the host name itself.
    pub address: String,
    /// The TXT record's primary, when it holds one.
    pub primary: Option<String>,
}

/// What the device did or saw.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Happened {
    Resolved {
        at_ms: u64,
        target: Target,
    },
    Connected {
        at_ms: u64,
        target: Target,
    },
    Disconnected {
        at_ms: u64,
        host: String,
        reason: String,
    },
    /// The answer names another broker: leaving this one.
    Switching {
        at_ms: u64,
        from: String,
        to: Target,
    },
    /// A message the broker acknowledged (QoS 1).
    Published {
        at_ms: u64,
        host: String,
        seq: u64,
        topic: String,
    },
    ResolveFailed {
        at_ms: u64,
        reason: String,
    },
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub struct Device {
    settings: Settings,
    resolver: Resolver<TokioConnectionProvider>,
    tls: TlsConfiguration,
    seq: u64,
}

impl Device {
    pub fn new(settings: Settings) -> anyhow::Result<Device> {
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()));
        let tls = TlsConfiguration::Simple {
            ca: read(&settings.ca)?,
            alpn: None,
            client_auth: Some((read(&settings.certificate)?, read(&settings.private_key)?)),
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = match settings.dns {
            Some(server) => {
                let servers = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
                Resolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], servers),
                    TokioConnectionProvider::default(),
                )
            }
            None => Resolver::builder_tokio()?,
        };
        // Every read goes to the server: a failover must be seen at once.
        // A server that does not answer is asked again soon rather than
        // waited for (the resolver's default is 5 s per try).
        let options = builder.options_mut();
        options.cache_size = 0;
        options.timeout = settings.recheck.clamp(Duration::from_millis(200), Duration::from_secs(2));
        options.attempts = 2;
        Ok(Device { settings, resolver: builder.build(), tls, seq: 0 })
    }

    /// Reads the name and its TXT record: the broker to be on now.
    pub async fn resolve(&self) -> anyhow::Result<Target> {
        let name = &self.settings.name;
        let primary = match self.resolver.txt_lookup(format!("_{name}.")).await {
            Ok(txt) => txt
                .iter()
                .map(|record| record.txt_data().iter().map(|part| String::from_utf8_lossy(part)).collect::<String>())
                .find_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|decision| decision["primary"].as_str().map(str::to_string)),
            // No TXT record: follow the CNAME. Any other failure (a timeout)
            // fails this read, and the device stays where it is.
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => None,
            Err(e) => return Err(e.into()),
        };
        let host = match primary.as_ref().and_then(|p| self.settings.endpoints.get(p)) {
            Some(host) => host.clone(),
            None => {
                let answer = self.resolver.lookup_ip(format!("{name}.")).await?;
                answer
                    .as_lookup()
                    .record_iter()
                    .find_map(|record| match record.data() {
                        RData::CNAME(cname) => Some(cname.0.to_utf8().trim_end_matches('.').to_string()),
                        _ => None,
                    })
                    .unwrap_or_else(|| name.clone())
            }
        };
        let address = match self.settings.dns {
            Some(_) => {
                let ips = self.resolver.lookup_ip(format!("{host}.")).await?;
                let ip: IpAddr = ips.iter().next().ok_or_else(|| anyhow::anyhow!("{host} has no address"))?;
                ip.to_string()
            }
            None => host.clone(),
        };
        Ok(Target { host, address, primary })
    }

    /// Runs until `until` (forever when `None`), telling `tell` what happens.
    pub async fn run(&mut self, until: Option<Instant>, tell: &mut (dyn FnMut(Happened) + Send)) {
        let done = || until.is_some_and(|at| Instant::now() >= at);
        while !done() {
            let target = match self.resolve().await {
                Ok(target) => target,
                Err(e) => {
                    tell(Happened::ResolveFailed { at_ms: now_ms(), reason: e.to_string() });
                    tokio::time::sleep(self.settings.recheck).await;
                    continue;
                }
            };
            tell(Happened::Resolved { at_ms: now_ms(), target: target.clone() });
            self.session(target, until, tell).await;
        }
    }

    /// One connection to `target`, until it fails, the answer moves, or `until`.
    async fn session(&mut self, target: Target, until: Option<Instant>, tell: &mut (dyn FnMut(Happened) + Send)) {
        let settings = self.settings.clone();
        let mut options = MqttOptions::new(&settings.thing, &target.address, settings.port);
        options
            .set_transport(Transport::Tls(self.tls.clone()))
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 64);
        let telemetry = format!("dt/{}/telemetry", settings.thing);
        let shadow = format!("$aws/things/{}/shadow/update", settings.thing);
        let mut recheck = tokio::time::interval(settings.recheck);
        let mut publish = tokio::time::interval(settings.publish_every);
        recheck.tick().await;
        let mut connected = false;
        // Packet id -> (seq, topic) of what waits for its PUBACK.
        let mut pending: BTreeMap<u16, (u64, String)> = BTreeMap::new();
        let mut sent: Vec<(u64, String)> = Vec::new();
        loop {
            if until.is_some_and(|at| Instant::now() >= at) {
                let _ = client.try_disconnect();
                return;
            }
            tokio::select! {
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        tell(Happened::Connected { at_ms: now_ms(), target: target.clone() });
                        let _ = client.try_subscribe(format!("$aws/things/{}/shadow/update/delta", settings.thing), QoS::AtLeastOnce);
                        if client.try_publish(format!("$aws/things/{}/shadow/get", settings.thing), QoS::AtLeastOnce, false, "{}").is_ok() {
                            sent.push((0, "shadow/get".into()));
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        if !sent.is_empty() {
                            let (seq, topic) = sent.remove(0);
                            pending.insert(pkid, (seq, topic));
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some((seq, topic)) = pending.remove(&ack.pkid).filter(|(seq, _)| *seq > 0) {
                            tell(Happened::Published { at_ms: now_ms(), host: target.host.clone(), seq, topic });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tell(Happened::Disconnected { at_ms: now_ms(), host: target.host.clone(), reason: e.to_string() });
                        // A moment before asking DNS again: the broker may be restarting.
                        tokio::time::sleep(settings.recheck.min(Duration::from_secs(1))).await;
                        return;
                    }
                },
                _ = publish.tick(), if connected => {
                    self.seq += 1;
                    let seq = self.seq;
                    let body = serde_json::json!({ "seq": seq, "at_ms": now_ms() }).to_string();
                    let reported = serde_json::json!({ "state": { "reported": { "seq": seq, "broker": target.host } } }).to_string();
                    for (topic, payload) in [(&telemetry, body), (&shadow, reported)] {
                        if client.try_publish(topic.as_str(), QoS::AtLeastOnce, false, payload).is_ok() {
                            sent.push((seq, topic.clone()));
                        }
                    }
                }
                _ = recheck.tick() => {
                    match self.resolve().await {
                        Ok(next) if next.address != target.address => {
                            tell(Happened::Switching { at_ms: now_ms(), from: target.host.clone(), to: next });
                            let _ = client.try_disconnect();
                            return;
                        }
                        Ok(_) => {}
                        Err(e) => tell(Happened::ResolveFailed { at_ms: now_ms(), reason: e.to_string() }),
                    }
                }
            }
        }
    }
}
