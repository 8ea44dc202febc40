//! The device client (`examples/device-client`) against two real mosquitto
//! brokers (127.0.0.1 and 127.0.0.2, one port, one CA) and a real DNS server
//! (dnsmasq) whose answers the test switches as a failover decision would:
//! the device follows the primary over and back without a restart, by the
//! TXT record (knowing the regions' brokers) and by the CNAME alone.

mod common;

use common::broker::Broker;
use common::dns::{Dns, failover_records};
use iotdr_device_client::{Device, Happened, Settings};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const NAME: &str = "iot.drill.test";
const EAST_HOST: &str = "us-east-1.drill.test";
const WEST_HOST: &str = "eu-west-1.drill.test";
const HOSTS: [(&str, &str, &str); 2] = [("us-east-1", EAST_HOST, "127.0.0.1"), ("eu-west-1", WEST_HOST, "127.0.0.2")];

fn records(primary: &str) -> String {
    let secondary = if primary == "us-east-1" { "eu-west-1" } else { "us-east-1" };
    failover_records(NAME, primary, secondary, &HOSTS)
}

/// A device running in a task of its own; what it tells arrives on the receiver.
fn device(broker: &Broker, dns: &Dns, thing: &str, follow_txt: bool) -> mpsc::UnboundedReceiver<Happened> {
    let endpoints: BTreeMap<String, String> = if follow_txt {
        HOSTS.iter().map(|(region, host, _)| (region.to_string(), host.to_string())).collect()
    } else {
        BTreeMap::new()
    };
    let settings = Settings {
        name: NAME.into(),
        port: broker.port,
        thing: thing.into(),
        ca: broker.file("ca.crt"),
        certificate: broker.file("client.crt"),
        private_key: broker.file("client.key"),
        endpoints,
        dns: Some(dns.address),
        recheck: Duration::from_millis(200),
        publish_every: Duration::from_millis(100),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut device = Device::new(settings).expect("the device starts");
        device.run(None, &mut |happened| drop(tx.send(happened))).await;
    });
    rx
}

/// Waits until the device has a message acknowledged by the broker at `host`;
/// returns what it told meanwhile.
async fn publishing_on(device: &mut mpsc::UnboundedReceiver<Happened>, host: &str) -> Vec<Happened> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, device.recv()).await {
            Ok(Some(happened)) => {
                let done = matches!(&happened, Happened::Published { host: h, .. } if h == host);
                seen.push(happened);
                if done {
                    return seen;
                }
            }
            _ => panic!("never published on {host}; it told:\n{seen:#?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_follows_the_primary_over_and_back_without_a_restart() {
    let port = common::free_port();
    let east = Broker::start_at(Some(("127.0.0.1", port)), None);
    let west = Broker::start_at(Some(("127.0.0.2", port)), Some(&east));
    let dns = Dns::start(&records("us-east-1"));
    let mut by_txt = device(&east, &dns, "device-txt", true);
    let mut by_cname = device(&east, &dns, "device-cname", false);
    for device in [&mut by_txt, &mut by_cname] {
        let told = publishing_on(device, EAST_HOST).await;
        assert!(
            told.iter().any(|h| matches!(h, Happened::Connected { target, .. } if target.address == "127.0.0.1")),
            "{told:#?}"
        );
    }

    // The decision moves: both leave the east broker for the west one.
    tokio::task::block_in_place(|| dns.set(&records("eu-west-1")));
    for device in [&mut by_txt, &mut by_cname] {
        let told = publishing_on(device, WEST_HOST).await;
        let switched = told.iter().find_map(|h| match h {
            Happened::Switching { from, to, .. } => Some((from.clone(), to.host.clone(), to.primary.clone())),
            _ => None,
        });
        assert_eq!(switched, Some((EAST_HOST.into(), WEST_HOST.into(), Some("eu-west-1".into()))), "{told:#?}");
    }

    // The primary region's broker dies before DNS moves back: the devices
    // keep trying where DNS sends them, and follow it once it does.
    tokio::task::block_in_place(|| dns.set(&records("us-east-1")));
    for device in [&mut by_txt, &mut by_cname] {
        publishing_on(device, EAST_HOST).await;
    }
    // (The scripts block: off the runtime's other threads, the devices'.)
    tokio::task::block_in_place(|| east.stop());
    for device in [&mut by_txt, &mut by_cname] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, device.recv()).await {
                Ok(Some(Happened::Disconnected { host, .. })) if host == EAST_HOST => break,
                Ok(Some(_)) => {}
                _ => panic!("the east broker's loss went unnoticed"),
            }
        }
    }
    tokio::task::block_in_place(|| dns.set(&records("eu-west-1")));
    for device in [&mut by_txt, &mut by_cname] {
        publishing_on(device, WEST_HOST).await;
    }
    drop(west);
}
