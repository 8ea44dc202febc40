//! One MQTT health check of one region: connect with a client id of its own,
//! subscribe at QoS 1 to a topic of its own, publish N messages there and
//! expect all N back before a timeout.
//!
//! A check shares nothing with any other: its client id, topic and payloads
//! carry a random nonce made for it, and it counts only what carries that
//! nonce. So a check after a failed one passes or fails on its own evidence
//! (the AWS sample's checker kept counters between invocations and could pass
//! without receiving anything), and concurrent checks never count each
//! other's messages.

use super::config::{Credentials, Health};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How to check one region's broker.
#[derive(Clone)]
pub struct MqttCheck {
    pub region: String,
    host: String,
    port: u16,
    tls: TlsConfiguration,
    client_id: String,
    topic: String,
    messages: u32,
    timeout: Duration,
}

/// What one check found: the body of `/health/<region>`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckReport {
    pub region: String,
    pub healthy: bool,
    /// The broker checked (`host:port`).
    pub endpoint: String,
    /// The client id this check connected as.
    pub client_id: String,
    pub sent: u32,
    pub received: u32,
    /// From starting to connect to the connection accepted.
    pub connect_ms: Option<u64>,
    /// From the first message published to the last one back.
    pub round_trip_ms: Option<u64>,
    /// The whole check.
    pub latency_ms: u64,
    /// What failed, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl MqttCheck {
    /// Reads the region's certificate files once; a check reuses them.
    pub fn new(region: &str, endpoint: &str, credentials: &Credentials, health: &Health) -> Result<MqttCheck, String> {
        let (host, port) = endpoint
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("region {region}: mqtt_endpoint `{endpoint}` is not host:port"))?;
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("region {region}: reading {}: {e}", path.display()))
        };
        let tls = TlsConfiguration::Simple {
            ca: read(&credentials.ca)?,
            alpn: None,
            client_auth: Some((read(&credentials.certificate)?, read(&credentials.private_key)?)),
        };
        // rustls finds its crypto through the process default: ring, as the AWS SDK's client.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(MqttCheck {
            region: region.to_string(),
            host,
            port,
            tls,
            client_id: health.client_id.clone(),
            topic: health.topic.trim_end_matches('/').to_string(),
            messages: health.messages,
            timeout: health.timeout,
        })
    }

    /// The report of a check not made: every turn was taken for too long.
    pub fn busy(&self) -> CheckReport {
        CheckReport {
            region: self.region.clone(),
            healthy: false,
            endpoint: format!("{}:{}", self.host, self.port),
            client_id: String::new(),
            sent: 0,
            received: 0,
            connect_ms: None,
            round_trip_ms: None,
            latency_ms: self.timeout.as_millis() as u64,
            failure: Some("too many checks at once: no turn within the timeout".into()),
        }
    }

    /// Runs one check; never longer than the timeout.
    pub async fn run(&self) -> CheckReport {
        let started = Instant::now();
        let nonce = format!("{:016x}", fastrand::u64(..));
        let client_id = format!("{}-{nonce}", self.client_id);
        let mut report = CheckReport {
            region: self.region.clone(),
            healthy: false,
            endpoint: format!("{}:{}", self.host, self.port),
            client_id: client_id.clone(),
            sent: 0,
            received: 0,
            connect_ms: None,
            round_trip_ms: None,
            latency_ms: 0,
            failure: None,
        };
        let mut options = MqttOptions::new(&client_id, &self.host, self.port);
        options
            .set_transport(Transport::Tls(self.tls.clone()))
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, self.messages as usize + 4);
        let topic = format!("{}/{client_id}", self.topic);
        let outcome = tokio::time::timeout(self.timeout, async {
            let mut received = BTreeSet::new();
            let mut published_at = None;
            loop {
                let event = events.poll().await.map_err(|e| format!("connection: {e}"))?;
                match event {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        if ack.code != ConnectReturnCode::Success {
                            return Err(format!("connection refused: {:?}", ack.code));
                        }
                        report.connect_ms = Some(started.elapsed().as_millis() as u64);
                        client.try_subscribe(&topic, QoS::AtLeastOnce).map_err(|e| format!("subscribing: {e}"))?;
                    }
                    Event::Incoming(Packet::SubAck(ack)) => {
                        if ack.return_codes.iter().any(|code| matches!(code, SubscribeReasonCode::Failure)) {
                            return Err(format!("subscribing to {topic} was refused"));
                        }
                        published_at = Some(Instant::now());
                        for seq in 0..self.messages {
                            let payload = serde_json::json!({ "check": nonce, "seq": seq }).to_string();
                            client
                                .try_publish(&topic, QoS::AtLeastOnce, false, payload)
                                .map_err(|e| format!("publishing: {e}"))?;
                            report.sent += 1;
                        }
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        // Only this check's own messages count, each once (QoS 1 may repeat one).
                        let payload: serde_json::Value = serde_json::from_slice(&publish.payload).unwrap_or_default();
                        if publish.topic == topic && payload["check"] == nonce.as_str() {
                            if let Some(seq) = payload["seq"].as_u64().filter(|&seq| seq < u64::from(self.messages)) {
                                received.insert(seq);
                            }
                            report.received = received.len() as u32;
                            if report.received == self.messages {
                                report.round_trip_ms = published_at.map(|at| at.elapsed().as_millis() as u64);
                                return Ok(());
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
        .await;
        report.latency_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(Ok(())) => report.healthy = true,
            Ok(Err(failure)) => report.failure = Some(failure),
            Err(_) => {
                report.failure = Some(match (report.connect_ms, report.sent) {
                    (None, _) => format!("not connected within {} ms", self.timeout.as_millis()),
                    (Some(_), 0) => format!("not subscribed within {} ms", self.timeout.as_millis()),
                    _ => format!(
                        "{} of {} messages came back within {} ms",
                        report.received,
                        report.sent,
                        self.timeout.as_millis()
                    ),
                })
            }
        }
        // A polite goodbye, after the verdict and without delaying it.
        if client.try_disconnect().is_ok() && report.connect_ms.is_some() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Ok(event) = events.poll().await {
                        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                            break;
                        }
                    }
                })
                .await;
            });
        }
        report
    }
}
