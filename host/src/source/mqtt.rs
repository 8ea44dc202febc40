//! The source region's registry, JITR and shadow topics, subscribed to
//! directly on its MQTT endpoint with X.509 mutual TLS (`rumqttc`).
//!
//! A persistent session (clean session off, a fixed client id) at QoS 1
//! keeps what arrives while iotdr is down. A message is acknowledged
//! (PUBACK, in arrival order) only once its batch is stored: a crash before
//! that has the broker deliver it again. AWS delivers at least once, so
//! messages are deduplicated by `eventId` within a run, and the ledger makes a
//! duplicate across runs harmless. When the broker lost the session, the
//! topics are subscribed to again.

use super::{Batch, Record, Source, SourceError};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the registry, JITR and shadow events are published on.
pub const DEFAULT_TOPICS: [&str; 5] = [
    // `#` also covers `$aws/events/certificates/registered/<ca>` (JITR).
    "$aws/events/#",
    "$aws/things/+/shadow/update/accepted",
    "$aws/things/+/shadow/delete/accepted",
    "$aws/things/+/shadow/name/+/update/accepted",
    "$aws/things/+/shadow/name/+/delete/accepted",
];

/// How many recent event ids are remembered to drop redeliveries.
const REMEMBERED: usize = 50_000;
/// How long one read waits for a first message.
const READ_WAIT: Duration = Duration::from_millis(200);

/// Where and how to connect (`[source] kind = "mqtt"`).
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// `host:port`; the host is also the name the server certificate must carry.
    pub endpoint: String,
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub client_id: String,
    pub topics: Vec<String>,
}

pub struct MqttSource {
    client: AsyncClient,
    events: EventLoop,
    endpoint: String,
    topics: Vec<String>,
    /// Idle once nothing arrived for this long.
    idle_after: Duration,
    last_message: Instant,
    /// Read, not yet acknowledged, in arrival order.
    unacked: Vec<Publish>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    failing_since: Option<Instant>,
    idle: bool,
}

impl MqttSource {
    /// Prepares the connection (made on the first read). `capacity` bounds
    /// the requests (acknowledgements) queued between two reads.
    pub fn new(settings: &MqttSettings, idle_after: Duration, capacity: usize) -> Result<MqttSource, SourceError> {
        let fail = |message: String| SourceError { source_name: format!("mqtt {}", settings.endpoint), message };
        let (host, port) = settings
            .endpoint
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
            .ok_or_else(|| fail("endpoint must be host:port".into()))?;
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| fail(format!("reading {}: {e}", path.display())));
        let tls = TlsConfiguration::Simple {
            ca: read(&settings.ca)?,
            alpn: None,
            client_auth: Some((read(&settings.certificate)?, read(&settings.private_key)?)),
        };
        // rustls finds its crypto through the process default: ring, as the AWS SDK's client.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut options = MqttOptions::new(&settings.client_id, host, port);
        options
            .set_transport(Transport::Tls(tls))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30));
        let (client, events) = AsyncClient::new(options, capacity.max(64));
        let source = MqttSource {
            client,
            events,
            endpoint: settings.endpoint.clone(),
            topics: settings.topics.clone(),
            idle_after,
            last_message: Instant::now(),
            unacked: Vec::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            failing_since: None,
            idle: false,
        };
        source.subscribe()?;
        Ok(source)
    }

    fn error(&self, message: String) -> SourceError {
        SourceError { source_name: format!("mqtt {}", self.endpoint), message }
    }

    fn subscribe(&self) -> Result<(), SourceError> {
        let filters = self.topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        self.client.try_subscribe_many(filters).map_err(|e| self.error(format!("subscribing: {e}")))
    }

    /// Whether this message was read before in this run (AWS redelivers).
    fn seen_before(&mut self, key: Option<String>) -> bool {
        let Some(key) = key else { return false };
        if !self.seen.insert(key.clone()) {
            return true;
        }
        self.seen_order.push_back(key);
        if self.seen_order.len() > REMEMBERED
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        false
    }
}

/// The record of a message, and the key that identifies it across redeliveries.
fn record_of(publish: &Publish) -> (Record, Option<String>) {
    let payload: Value = serde_json::from_slice(&publish.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&publish.payload).into_owned()));
    let key = match (payload.get("eventId").and_then(Value::as_str), payload.get("version")) {
        (Some(id), _) => Some(id.to_string()),
        // Shadow documents carry no event id; their topic and version name them.
        (None, Some(version)) => Some(format!("{} {version}", publish.topic)),
        (None, None) => None,
    };
    let text = json!({ "topic": publish.topic, "payload": payload }).to_string();
    (Record { text, origin: format!("mqtt {} #{}", publish.topic, publish.pkid) }, key)
}

impl Source for MqttSource {
    async fn read(&mut self, max: usize) -> Result<Batch, SourceError> {
        let mut records = Vec::new();
        let started = Instant::now();
        while records.len() < max {
            let wait = READ_WAIT.saturating_sub(started.elapsed());
            let polled = match tokio::time::timeout(wait, self.events.poll()).await {
                Err(_) => break,
                Ok(polled) => polled,
            };
            match polled {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    self.failing_since = None;
                    self.last_message = Instant::now();
                    let (record, key) = record_of(&publish);
                    // Duplicates are acknowledged too: acks go out in arrival order.
                    if !self.seen_before(key) {
                        records.push(record);
                    }
                    self.unacked.push(publish);
                }
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    self.failing_since = None;
                    // The broker kept nothing: subscribe again. Messages read
                    // on the old connection and not yet acknowledged come back.
                    self.unacked.clear();
                    if !connack.session_present {
                        tracing::info!(endpoint = %self.endpoint, "no session on the broker: subscribing");
                        self.subscribe()?;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // The broker is away: rumqttc reconnects on the next poll.
                    let since = *self.failing_since.get_or_insert_with(Instant::now);
                    tracing::warn!(endpoint = %self.endpoint, "MQTT connection failed ({:?} so far): {e}", since.elapsed());
                    self.unacked.clear();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
        self.idle = records.is_empty() && self.last_message.elapsed() >= self.idle_after;
        Ok(Batch { records, checkpoints: Vec::new() })
    }

    fn idle(&self) -> bool {
        self.idle
    }

    /// PUBACKs for everything read, in arrival order; they go out on the next read's polls.
    async fn acknowledge(&mut self) -> Result<(), SourceError> {
        for publish in std::mem::take(&mut self.unacked) {
            self.client.try_ack(&publish).map_err(|e| self.error(format!("acknowledging: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_named_by_event_id_or_by_topic_and_version() {
        let publish = |topic: &str, payload: &str| Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        let (record, key) = record_of(&publish("$aws/events/thing/t/created", r#"{"eventId":"e1","thingName":"t"}"#));
        assert_eq!(key.as_deref(), Some("e1"));
        let decoded: Value = serde_json::from_str(&record.text).unwrap();
        assert_eq!(decoded["topic"], "$aws/events/thing/t/created");
        assert_eq!(decoded["payload"]["thingName"], "t");
        let (_, key) = record_of(&publish("$aws/things/t/shadow/update/accepted", r#"{"version":4,"state":{}}"#));
        assert_eq!(key.as_deref(), Some("$aws/things/t/shadow/update/accepted 4"));
        let (record, key) = record_of(&publish("$aws/events/thing/t/created", "not json"));
        assert_eq!(key, None);
        assert!(crate::event::decode_line(&record.text, "us-east-1").is_err(), "a dead letter, not a panic");
    }
}
