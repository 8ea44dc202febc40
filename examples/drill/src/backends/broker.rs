//! A mosquitto broker with mutual TLS for one test, started by the project's
//! own script on a free loopback port, stopped when dropped. Its folder holds
//! the CA and the client certificate and key the test and iotdr connect with.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub struct Broker {
    pub port: u16,
    /// The loopback address it listens on.
    pub address: String,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_at(None, None)
    }

    /// A broker on `address` (127.0.0.1 or 127.0.0.2) and a port given or
    /// free, with the certificates of `like` when given (one CA for both).
    pub fn start_at(address_port: Option<(&str, u16)>, like: Option<&Broker>) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        if let Some(like) = like {
            for file in ["ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"] {
                std::fs::copy(like.file(file), dir.path().join(file)).unwrap();
            }
        }
        let script = super::root().join("scripts/mosquitto.sh");
        let mut command = Command::new("bash");
        command.arg(&script).arg("start").arg(dir.path());
        if let Some((address, port)) = address_port {
            command.env("MOSQUITTO_ADDRESS", address).env("MOSQUITTO_PORT", port.to_string());
        }
        let out = command.output().expect("bash runs");
        assert!(out.status.success(), "scripts/mosquitto.sh start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let port = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a port");
        let address = address_port.map_or("127.0.0.1", |(address, _)| address).to_string();
        Broker { port, address, dir }
    }

    /// Stops the broker and starts it again on the same port; with
    /// `forget_sessions` its persistence is wiped in between, as a broker
    /// that lost its state (the sessions and what they queued).
    pub fn restart(&self, forget_sessions: bool) {
        let script = super::root().join("scripts/mosquitto.sh");
        let mut command = Command::new("bash");
        command.arg(&script).arg("restart").arg(self.dir.path());
        if forget_sessions {
            command.arg("--forget-sessions");
        }
        let out = command.output().expect("bash runs");
        assert!(out.status.success(), "scripts/mosquitto.sh restart failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the broker (as an outage); [`Broker::restart`] brings it back.
    pub fn stop(&self) {
        let script = super::root().join("scripts/mosquitto.sh");
        let out = Command::new("bash").arg(&script).arg("stop").arg(self.dir.path()).output().expect("bash runs");
        assert!(out.status.success(), "scripts/mosquitto.sh stop failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }

    /// The `[source]` table of a pipeline that subscribes here as `client_id`.
    pub fn source_table(&self, client_id: &str) -> String {
        let path = |name: &str| self.file(name).display().to_string();
        format!(
            "kind = \"mqtt\"\nendpoint = \"{}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\nclient_id = \"{client_id}\"\n",
            self.endpoint(),
            path("ca.crt"),
            path("client.crt"),
            path("client.key")
        )
    }

    /// Publishes `records` (`{"topic", "payload"}` JSON) at QoS 1 and waits
    /// until the broker acknowledged every one.
    pub async fn publish(&self, records: &[String]) {
        use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let read = |name: &str| std::fs::read(self.file(name)).unwrap();
        let mut options =
            MqttOptions::new(format!("publisher-{}", fastrand::u32(..)), self.address.as_str(), self.port);
        options
            .set_transport(Transport::Tls(TlsConfiguration::Simple {
                ca: read("ca.crt"),
                alpn: None,
                client_auth: Some((read("client.crt"), read("client.key"))),
            }))
            .set_inflight(100);
        let (client, mut events) = AsyncClient::new(options, records.len() + 10);
        for record in records {
            let record: serde_json::Value = serde_json::from_str(record).unwrap();
            let topic = record["topic"].as_str().unwrap().to_string();
            client.try_publish(topic, QoS::AtLeastOnce, false, record["payload"].to_string()).unwrap();
        }
        let (mut sent, mut acked) = (0, 0);
        while acked < records.len() {
            match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Publish(_)))) => sent += 1,
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("publishing to the broker: {e} ({sent} sent, {acked} acknowledged)"),
                Err(_) => panic!("the broker stopped acknowledging ({sent} sent, {acked} acknowledged)"),
            }
        }
        let _ = client.try_disconnect();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let script = super::root().join("scripts/mosquitto.sh");
        let _ = Command::new("bash").arg(&script).arg("stop").arg(self.dir.path()).output();
    }
}
