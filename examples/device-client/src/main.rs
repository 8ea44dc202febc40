//! `device-client`: the device of `iotdr_device_client`, one JSON line per
//! thing it does or sees.

use clap::Parser;
use iotdr_device_client::{Device, Settings};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "A device that follows the primary region of an iotdr failover")]
struct Cli {
    /// The failover name (`iot.example.com`).
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// The thing name, also the MQTT client id.
    #[arg(long)]
    thing: String,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    certificate: PathBuf,
    #[arg(long)]
    private_key: PathBuf,
    /// `region=host`: the broker of a region, to follow the TXT record's primary (repeatable).
    #[arg(long = "endpoint", value_parser = region_host)]
    endpoints: Vec<(String, String)>,
    /// A DNS server to ask instead of the system's (`127.0.0.1:5353`).
    #[arg(long)]
    dns: Option<std::net::SocketAddr>,
    /// Seconds between two reads of the name and its TXT record.
    #[arg(long, default_value_t = 60.0)]
    recheck_seconds: f64,
    /// Seconds between two publications.
    #[arg(long, default_value_t = 5.0)]
    publish_seconds: f64,
    /// Stop after this many seconds (default: never).
    #[arg(long)]
    for_seconds: Option<f64>,
}

fn region_host(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(region, host)| (region.to_string(), host.to_string()))
        .ok_or_else(|| format!("`{text}`: expected region=host"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings {
        name: cli.name.trim_end_matches('.').to_string(),
        port: cli.port,
        thing: cli.thing,
        ca: cli.ca,
        certificate: cli.certificate,
        private_key: cli.private_key,
        endpoints: cli.endpoints.into_iter().collect(),
        dns: cli.dns,
        recheck: Duration::from_secs_f64(cli.recheck_seconds),
        publish_every: Duration::from_secs_f64(cli.publish_seconds),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut device = Device::new(settings)?;
        let until = cli.for_seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
        device
            .run(until, &mut |happened| {
                println!("{}", serde_json::to_string(&happened).expect("JSON"));
            })
            .await;
        Ok(())
    })
}
