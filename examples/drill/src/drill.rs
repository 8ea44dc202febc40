//! The drill's steps, in order (see the crate's documentation).

use crate::backends::broker::Broker;
use crate::backends::dns::Dns;
use crate::backends::free_port;
use crate::backends::moto::Moto;
use iotdr_device_client::{Device, Happened, Settings};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PRIMARY: &str = "us-east-1";
const SECONDARY: &str = "eu-west-1";
const NAME: &str = "iot.drill.test";
/// The brokers' hosts and addresses, as the DNS server answers them.
const HOSTS: [(&str, &str, &str); 2] =
    [(PRIMARY, "us-east-1.drill.test", "127.0.0.1"), (SECONDARY, "eu-west-1.drill.test", "127.0.0.2")];

pub struct Options {
    /// The `iotdr` binary.
    pub iotdr: PathBuf,
    /// Where the drill keeps its files and the logs of what it runs.
    pub dir: PathBuf,
    /// Things changed in the primary, in turn.
    pub things: usize,
    /// Changes per second made in the primary.
    pub rate: f64,
    /// Changes made before the primary stops.
    pub before_outage: Duration,
    /// How long the primary stays down after the device is on the secondary.
    pub outage: Duration,
    /// How often the health checker checks; it decides after 3 failures in a row.
    pub health_interval: Duration,
}

/// What the drill measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Changes the primary's stream acknowledged before it stopped.
    pub changes_reached_stream: usize,
    /// Of those, missing in the secondary once it settled: the RPO.
    pub rpo_missing: usize,
    pub health_interval_ms: u64,
    /// From the primary stopping to failover decided.
    pub failover_decided_ms: Option<u64>,
    /// From the primary stopping to the device's first message acknowledged on the secondary.
    pub device_on_secondary_ms: Option<u64>,
    /// Messages the device published on the secondary during the outage:
    /// not replicated back to the primary (that needs echo suppression).
    pub device_changes_on_secondary: usize,
    /// From the primary returning to the failback decided.
    pub failback_decided_ms: Option<u64>,
    /// From the primary returning to the device's first message acknowledged on it again.
    pub device_back_on_primary_ms: Option<u64>,
    /// Milliseconds since the drill started, and what happened.
    pub timeline: Vec<(u64, String)>,
}

impl Report {
    pub fn failover_decided_intervals(&self) -> Option<f64> {
        self.failover_decided_ms.map(|ms| ms as f64 / self.health_interval_ms as f64)
    }
}

/// A process the drill started; killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the drill saw, with its times.
struct Timeline {
    started: Instant,
    entries: Mutex<Vec<(u64, String)>>,
    say: Box<dyn Fn(&str) + Send + Sync>,
}

impl Timeline {
    fn note(&self, what: impl Into<String>) -> Instant {
        let what = what.into();
        let at = self.started.elapsed().as_millis() as u64;
        (self.say)(&format!("{:>7.2} s  {what}", at as f64 / 1000.0));
        self.entries.lock().unwrap().push((at, what));
        Instant::now()
    }
}

/// Runs the drill. Needs a multi-threaded tokio runtime: the scripts that
/// stop and start the backends block, and the device must go on meanwhile.
pub async fn run(options: &Options, say: Box<dyn Fn(&str) + Send + Sync>) -> anyhow::Result<Report> {
    let timeline = Arc::new(Timeline { started: Instant::now(), entries: Mutex::new(Vec::new()), say });
    std::fs::create_dir_all(&options.dir)?;
    let dir = options.dir.canonicalize()?;

    // Two regions: an API (moto) and a broker each; Route 53 in the secondary's moto.
    let (primary_api, secondary_api) = (Moto::start(), Moto::start());
    let port = free_port();
    let primary_broker = Broker::start_at(Some((HOSTS[0].2, port)), None);
    let _secondary_broker = Broker::start_at(Some((HOSTS[1].2, port)), Some(&primary_broker));
    let route53 = aws_sdk_route53::Client::new(&secondary_api.sdk_config("us-east-1").await);
    let zone = route53.create_hosted_zone().name("drill.test").caller_reference("iotdr-drill").send().await?;
    let zone = zone.hosted_zone().map(|z| z.id().to_string()).unwrap_or_default();
    let source_iot = primary_api.iot(PRIMARY).await;
    let target_iot = secondary_api.iot(SECONDARY).await;
    timeline.note("started two regions (moto and mosquitto each)");

    let files = |broker: &Broker| {
        let path = |name: &str| broker.file(name).display().to_string();
        format!(
            "ca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
            path("ca.crt"),
            path("client.crt"),
            path("client.key")
        )
    };
    let interval_ms = options.health_interval.as_millis();
    let dr = dir.join("dr.toml");
    std::fs::write(
        &dr,
        format!(
            "[regions.{PRIMARY}]\nmqtt_endpoint = \"{}:{port}\"\n[regions.{SECONDARY}]\nmqtt_endpoint = \"{}:{port}\"\n\
             [health]\nlisten = \"127.0.0.1:{}\"\ntimeout_ms = {}\n{}\
             [failover]\nhosted_zone_id = \"{zone}\"\nname = \"{NAME}\"\nprimary = \"{PRIMARY}\"\nsecondary = \"{SECONDARY}\"\n\
             ttl = 1\nendpoint_url = \"{}\"\nwatch_interval_ms = {interval_ms}\nauto_failback = true\n\
             health_check = {{ fqdn = \"health.drill.test\", failure_threshold = 3, interval = 10 }}\n",
            HOSTS[0].2,
            HOSTS[1].2,
            free_port(),
            (interval_ms * 8 / 10).max(100),
            files(&primary_broker),
            secondary_api.url
        ),
    )?;
    let iotdr = |args: &[&str], log: &str, stdout: Stdio| -> anyhow::Result<Running> {
        let child = Command::new(&options.iotdr)
            .args(args)
            .current_dir(&dir)
            .envs(primary_api.env())
            .env("IOTDR_LOG", "info")
            .stdout(stdout)
            .stderr(std::fs::File::create(dir.join(log))?)
            .spawn()?;
        Ok(Running(child))
    };
    let applied = Command::new(&options.iotdr).args(["failover", "apply"]).arg(&dr).envs(primary_api.env()).output()?;
    anyhow::ensure!(applied.status.success(), "iotdr failover apply: {}", String::from_utf8_lossy(&applied.stderr));

    // DNS answers mirror the records, as Route 53 would serve them.
    let records = dns_records(&route53, &zone).await?;
    let dns = Arc::new(Dns::start(&records));
    let mirror = tokio::spawn(mirror_dns(route53.clone(), zone.clone(), dns.clone(), records, timeline.clone()));

    // The replicator, on the primary's live MQTT events.
    let pipeline = dir.join("replicate.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\nname = \"drill\"\nsource_region = \"{PRIMARY}\"\ntargets = [\"{SECONDARY}\"]\nbatch_size = 64\n\
             [regions.{PRIMARY}]\nendpoint_url = \"{}\"\n[regions.{SECONDARY}]\nendpoint_url = \"{}\"\n\
             [source]\nkind = \"mqtt\"\nendpoint = \"{}:{port}\"\nclient_id = \"iotdr-drill-replicator\"\n{}\
             [apply]\ninitial_backoff_ms = 50\nmax_backoff_ms = 1000\n[state]\ndir = \"state\"\n",
            primary_api.url,
            secondary_api.url,
            HOSTS[0].2,
            files(&primary_broker)
        ),
    )?;
    let _replicator = iotdr(&["run", "replicate.toml"], "replicator.log", Stdio::null())?;
    // The health checker, deciding failover.
    let mut watch = iotdr(&["failover", "watch", "dr.toml"], "watch.log", Stdio::piped())?;
    let decisions = decisions_of(watch.0.stdout.take().expect("piped"));
    timeline.note("replicator, health checker and DNS running");

    // The device.
    let happened: Arc<Mutex<Vec<(Instant, Happened)>>> = Arc::default();
    let device = {
        let settings = Settings {
            name: NAME.into(),
            port,
            thing: "drill-device".into(),
            ca: primary_broker.file("ca.crt"),
            certificate: primary_broker.file("client.crt"),
            private_key: primary_broker.file("client.key"),
            endpoints: HOSTS.iter().map(|(region, host, _)| (region.to_string(), host.to_string())).collect(),
            dns: Some(dns.address),
            recheck: Duration::from_millis(500),
            publish_every: Duration::from_millis(250),
        };
        let happened = happened.clone();
        tokio::spawn(async move {
            let mut device = Device::new(settings).expect("the device starts");
            device.run(None, &mut |h| happened.lock().unwrap().push((Instant::now(), h))).await;
        })
    };
    let on = |host: &str, after: Instant| {
        happened.lock().unwrap().iter().find_map(|(at, h)| match h {
            Happened::Published { host: h, .. } if h == host && *at >= after => Some(*at),
            _ => None,
        })
    };
    wait_for("the device on the primary", Duration::from_secs(30), || on(HOSTS[0].1, timeline.started)).await?;
    timeline.note("the device publishes on the primary");

    // Changes in the primary: made in its API, announced on its stream.
    let names: Vec<String> = (0..options.things).map(|i| format!("drill-thing-{i:03}")).collect();
    for name in &names {
        source_iot.create_thing().thing_name(name).send().await?;
    }
    let publisher = Publisher::connect(&primary_broker, port).await?;
    // Every change the primary's stream acknowledged: (thing, sequence number).
    let reached: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let generator = {
        let (names, reached, rate) = (names.clone(), reached.clone(), options.rate);
        let source_iot = source_iot.clone();
        tokio::spawn(async move {
            let mut publisher = publisher;
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            for seq in 1u64.. {
                ticks.tick().await;
                let name = &names[seq as usize % names.len()];
                let attributes = aws_sdk_iot::types::AttributePayload::builder()
                    .attributes("seq", seq.to_string())
                    .merge(true)
                    .build();
                let update = source_iot.update_thing().thing_name(name).attribute_payload(attributes).send();
                if !matches!(tokio::time::timeout(Duration::from_millis(500), update).await, Ok(Ok(_))) {
                    continue; // the primary's API is down: no change made
                }
                if publisher.publish_update(name, seq).await {
                    reached.lock().unwrap().push((name.clone(), seq));
                }
            }
        })
    };
    tokio::time::sleep(options.before_outage).await;

    // The primary stops: its broker and its API, together. (The scripts
    // block: off the runtime's other tasks, the device among them.)
    let stopped = timeline.note("the primary's broker and API stop");
    tokio::task::block_in_place(|| {
        primary_broker.stop();
        primary_api.freeze(true);
    });
    let decided = wait_for("the failover decision", Duration::from_secs(120), || {
        decisions.lock().unwrap().iter().find(|(at, d)| d["action"] == "promote" && *at >= stopped).map(|(at, _)| *at)
    })
    .await?;
    timeline.note(format!("failover decided ({} ms after the outage began)", (decided - stopped).as_millis()));
    let online = wait_for("the device on the secondary", Duration::from_secs(120), || on(HOSTS[1].1, stopped)).await?;
    timeline.note("the device publishes on the secondary");
    generator.abort();

    // RPO: what the primary's stream acknowledged, against the secondary.
    let reached = reached.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rpo_missing = loop {
        let missing = missing_in(&target_iot, &reached).await;
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    timeline.note(format!(
        "the secondary holds {} of the {} changes the primary's stream acknowledged",
        reached.len() - rpo_missing,
        reached.len()
    ));

    tokio::time::sleep(options.outage).await;
    let device_changes_on_secondary = happened
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, h)| *at >= online && matches!(h, Happened::Published { host, .. } if host == HOSTS[1].1))
        .count();

    // The primary returns.
    tokio::task::block_in_place(|| {
        primary_api.freeze(false);
        primary_broker.restart(false);
    });
    let restored = timeline.note("the primary's broker and API are back");
    let failback = wait_for("the failback decision", Duration::from_secs(120), || {
        decisions.lock().unwrap().iter().find(|(at, d)| d["action"] == "failback" && *at >= restored).map(|(at, _)| *at)
    })
    .await?;
    timeline.note("failback decided");
    let back =
        wait_for("the device back on the primary", Duration::from_secs(120), || on(HOSTS[0].1, restored)).await?;
    timeline.note("the device publishes on the primary again");

    device.abort();
    mirror.abort();
    let report = Report {
        changes_reached_stream: reached.len(),
        rpo_missing,
        health_interval_ms: interval_ms as u64,
        failover_decided_ms: Some((decided - stopped).as_millis() as u64),
        device_on_secondary_ms: Some((online - stopped).as_millis() as u64),
        device_changes_on_secondary,
        failback_decided_ms: Some((failback - restored).as_millis() as u64),
        device_back_on_primary_ms: Some((back - restored).as_millis() as u64),
        timeline: timeline.entries.lock().unwrap().clone(),
    };
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

/// How many of the `reached` changes the secondary lacks: a change is there
/// when its thing holds its sequence number or a later one.
async fn missing_in(target: &aws_sdk_iot::Client, reached: &[(String, u64)]) -> usize {
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, _) in reached {
        if held.contains_key(name.as_str()) {
            continue;
        }
        let seq = match target.describe_thing().thing_name(name).send().await {
            Ok(thing) => thing.attributes().and_then(|a| a.get("seq")).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
            Err(_) => 0,
        };
        held.insert(name, seq);
    }
    reached.iter().filter(|(name, seq)| held[name.as_str()] < *seq).count()
}

/// Publishes the primary's registry events at QoS 1, as AWS IoT would.
struct Publisher {
    client: AsyncClient,
    events: rumqttc::EventLoop,
}

impl Publisher {
    async fn connect(broker: &Broker, port: u16) -> anyhow::Result<Publisher> {
        let read = |name: &str| std::fs::read(broker.file(name));
        let mut options = MqttOptions::new("drill-registry-events", HOSTS[0].2, port);
        options.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: read("ca.crt")?,
            alpn: None,
            client_auth: Some((read("client.crt")?, read("client.key")?)),
        }));
        let (client, events) = AsyncClient::new(options, 16);
        Ok(Publisher { client, events })
    }

    /// Whether the broker acknowledged the event of `name`'s change `seq`.
    async fn publish_update(&mut self, name: &str, seq: u64) -> bool {
        let payload = serde_json::json!({
            "eventType": "THING_EVENT", "eventId": format!("drill-{seq:08}-{:08x}", fastrand::u32(..)),
            "timestamp": iotdr_device_client::now_ms(), "operation": "UPDATED", "accountId": "123456789012",
            "thingId": format!("00000000-0000-4000-8000-{seq:012}"), "thingName": name, "versionNumber": seq,
            "attributes": { "seq": seq.to_string() },
        });
        if self
            .client
            .try_publish(format!("$aws/events/thing/{name}/updated"), QoS::AtLeastOnce, false, payload.to_string())
            .is_err()
        {
            return false;
        }
        let acked = tokio::time::timeout(Duration::from_millis(500), async {
            let mut pkid = None;
            loop {
                match self.events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(id))) => pkid = Some(id),
                    Ok(Event::Incoming(Packet::PubAck(ack))) if Some(ack.pkid) == pkid => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        matches!(acked, Ok(true))
    }
}

/// The decisions `iotdr failover watch` prints, with when they were read.
fn decisions_of(stdout: std::process::ChildStdout) -> Arc<Mutex<Vec<(Instant, serde_json::Value)>>> {
    let decisions: Arc<Mutex<Vec<(Instant, serde_json::Value)>>> = Arc::default();
    let sink = decisions.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(decision) = serde_json::from_str(&line) {
                sink.lock().unwrap().push((Instant::now(), decision));
            }
        }
    });
    decisions
}

/// The dnsmasq lines Route 53 would answer with: the name a CNAME to the
/// broker of the PRIMARY record, `_name` its TXT record, the brokers' addresses.
async fn dns_records(route53: &aws_sdk_route53::Client, zone: &str) -> anyhow::Result<String> {
    let sets = route53.list_resource_record_sets().hosted_zone_id(zone).send().await?;
    let mut text = String::new();
    for set in sets.resource_record_sets() {
        let name = set.name().trim_end_matches('.');
        let value = set.resource_records().first().map(|r| r.value().to_string()).unwrap_or_default();
        match (set.r#type().as_str(), set.failover().map(|f| f.as_str())) {
            ("CNAME", Some("PRIMARY")) => {
                let host = HOSTS.iter().find(|(_, _, ip)| *ip == value).map_or(value.as_str(), |(_, host, _)| host);
                text.push_str(&format!("cname={name},{host}\n"));
            }
            ("TXT", _) => text.push_str(&format!("txt-record={name},{value}\n")),
            _ => {}
        }
    }
    for (_, host, ip) in HOSTS {
        text.push_str(&format!("host-record={host},{ip}\n"));
    }
    Ok(text)
}

/// Keeps the DNS server's answers equal to the records.
async fn mirror_dns(
    route53: aws_sdk_route53::Client,
    zone: String,
    dns: Arc<Dns>,
    mut served: String,
    timeline: Arc<Timeline>,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(records) = dns_records(&route53, &zone).await else { continue };
        if records != served {
            // Restarting dnsmasq blocks: off the runtime that runs the device.
            let (dns, text) = (dns.clone(), records.clone());
            if tokio::task::spawn_blocking(move || dns.set(&text)).await.is_err() {
                continue;
            }
            let primary =
                records.lines().find_map(|l| l.strip_prefix(&format!("cname={NAME},"))).unwrap_or("?").to_string();
            timeline.note(format!("DNS answers {NAME} -> {primary}"));
            served = records;
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> Option<Instant>) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(at) = done() {
            return Ok(at);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
