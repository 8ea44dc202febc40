//! `drill`: runs the DR drill and prints its timeline and figures.
//! `bash examples/drill/run.sh` builds what it needs and runs it.

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "A DR drill on one machine: the primary region stops mid-stream and comes back")]
struct Cli {
    /// The iotdr binary.
    #[arg(long)]
    iotdr: PathBuf,
    /// Where to keep the drill's files and logs.
    #[arg(long, default_value = "target/drill")]
    dir: PathBuf,
    #[arg(long, default_value_t = 50)]
    things: usize,
    /// Changes per second in the primary.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of changes before the primary stops.
    #[arg(long, default_value_t = 20.0)]
    before_outage: f64,
    /// Seconds the primary stays down once the device is on the secondary.
    #[arg(long, default_value_t = 10.0)]
    outage: f64,
    /// Seconds between health checks (failover after 3 failures in a row).
    #[arg(long, default_value_t = 2.0)]
    health_interval: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let options = iotdr_drill::Options {
        iotdr: cli.iotdr,
        dir: cli.dir,
        things: cli.things,
        rate: cli.rate,
        before_outage: Duration::from_secs_f64(cli.before_outage),
        outage: Duration::from_secs_f64(cli.outage),
        health_interval: Duration::from_secs_f64(cli.health_interval),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(iotdr_drill::run(&options, Box::new(|line| println!("{line}"))))?;
    let ms = |v: Option<u64>| v.map_or("-".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0));
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!();
    println!(
        "drill figures (health checks every {:.1} s, failover after 3 failures in a row):",
        options.health_interval.as_secs_f64()
    );
    println!(
        "  RPO: {} of {} changes the primary's stream acknowledged are missing in the secondary",
        report.rpo_missing, report.changes_reached_stream
    );
    println!(
        "  failover decided after {} ({:.1} health intervals)",
        ms(report.failover_decided_ms),
        report.failover_decided_intervals().unwrap_or(f64::NAN)
    );
    println!("  device online on the secondary after {}", ms(report.device_on_secondary_ms));
    println!(
        "  device changes made on the secondary during the outage (not replicated back): {}",
        report.device_changes_on_secondary
    );
    println!(
        "  failback decided {} after the primary returned; device back on it after {}",
        ms(report.failback_decided_ms),
        ms(report.device_back_on_primary_ms)
    );
    println!();
    println!("{} RPO = 0", verdict(report.rpo_missing == 0));
    println!(
        "{} failover decided within 3 health intervals (plus one check)",
        verdict(report.failover_decided_intervals().is_some_and(|i| i <= 4.0))
    );
    println!(
        "{} device back online on the secondary within 60 s",
        verdict(report.device_on_secondary_ms.is_some_and(|ms| ms <= 60_000))
    );
    Ok(())
}
