//! `iotdr failover watch`: decides failover from health, as Route 53 does for
//! DNS answers, and records the decision (the failover pair and the TXT
//! record) so that devices reading `_<name>` follow it too.
//!
//! Every `watch_interval` both regions get an MQTT check of their own
//! ([`MqttCheck`]). When the serving primary fails `failure_threshold` checks
//! in a row while the other region passes, the other is promoted. With
//! `auto_failback`, the configured primary is promoted again once it passes
//! `failure_threshold` checks in a row, after a failover the watch made (not
//! after a switch made by hand). The records are read every round, so
//! a switch made by hand (`promote`, `failback`) is what the watch goes on
//! from, and Route 53 unreachable is waited out. Each decision is printed as
//! a JSON line on stdout (for drills and scripts) and logged.

use super::check::MqttCheck;
use super::config::DrConfig;
use super::route53::Route53;
use serde::Serialize;
use std::collections::BTreeMap;

/// One decision of the watch.
#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    pub at_ms: u64,
    /// `promote` (away from a failing primary) or `failback`.
    pub action: &'static str,
    pub primary: String,
    pub secondary: String,
    /// The checks in a row that decided it.
    pub checks_in_a_row: u32,
}

/// Consecutive outcomes of one region's checks.
#[derive(Default, Clone, Copy)]
struct Streak {
    failures: u32,
    passes: u32,
}

impl Streak {
    fn record(&mut self, healthy: bool) {
        if healthy {
            *self = Streak { failures: 0, passes: self.passes + 1 };
        } else {
            *self = Streak { failures: self.failures + 1, passes: 0 };
        }
    }
}

/// What to do after a round of checks, if anything.
fn decide(
    serving: &str,
    configured: &str,
    other: &str,
    streaks: &BTreeMap<String, Streak>,
    threshold: u32,
    auto_failback: bool,
) -> Option<(&'static str, String, u32)> {
    let streak = |region: &str| streaks.get(region).copied().unwrap_or_default();
    let standby = if serving == configured { other } else { configured };
    if streak(serving).failures >= threshold && streak(standby).passes >= 1 {
        return Some(("promote", standby.to_string(), streak(serving).failures));
    }
    if auto_failback && serving != configured && streak(configured).passes >= threshold {
        return Some(("failback", configured.to_string(), streak(configured).passes));
    }
    None
}

/// Watches until the process ends; `decided` hears every decision.
pub async fn watch(config: &DrConfig, decided: &dyn Fn(&Decided)) -> Result<(), String> {
    let failover = config.failover().map_err(|e| e.to_string())?.clone();
    let health = config.health().map_err(|e| e.to_string())?;
    let mut checks = Vec::new();
    for region in [&failover.primary, &failover.secondary] {
        let credentials = config.credentials(region).ok_or_else(|| format!("region {region}: no certificate"))?;
        checks.push(MqttCheck::new(region, &config.regions[region].mqtt_endpoint, credentials, health)?);
    }
    let route53 = Route53::connect(config).await?;
    // The decision in force: the records' (made now when missing). Route 53
    // unreachable is waited out: a watch must outlast what it watches.
    let mut serving = loop {
        let made = async {
            let current = route53.current().await?;
            let (decision, steps) = route53.plan(&current, None);
            route53.execute(steps).await.map(|()| decision.primary)
        };
        match made.await {
            Ok(primary) => break primary,
            Err(e) => {
                tracing::warn!("reading the failover records: {e} (trying again)");
                tokio::time::sleep(failover.watch_interval).await;
            }
        }
    };
    tracing::info!(primary = serving, interval_ms = failover.watch_interval.as_millis() as u64, "watching");
    let threshold = failover.health_check.failure_threshold as u32;
    // Whether the watch itself moved devices off the configured primary:
    // only then does `auto_failback` move them back.
    let mut failed_over = false;
    let mut streaks: BTreeMap<String, Streak> = BTreeMap::new();
    let mut ticks = tokio::time::interval(failover.watch_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let reports = futures_util::future::join_all(checks.iter().map(MqttCheck::run)).await;
        for report in &reports {
            streaks.entry(report.region.clone()).or_default().record(report.healthy);
            if let Some(failure) = &report.failure {
                tracing::info!(region = report.region, failure, "check failed");
            }
        }
        // The records are the decision: one switched by hand counts too.
        match route53.current().await {
            Ok(current) => {
                if let Some(recorded) = current.decision.filter(|d| d.primary != serving) {
                    tracing::info!(primary = recorded.primary, "the records were switched by someone else");
                    serving = recorded.primary;
                    // A switch made by hand is not undone by auto_failback.
                    failed_over = false;
                }
            }
            Err(e) => tracing::warn!("reading the failover records: {e}"),
        }
        let other = if serving == failover.primary { &failover.secondary } else { &failover.primary };
        let fail_back = failover.auto_failback && failed_over;
        let Some((action, primary, in_a_row)) =
            decide(&serving, &failover.primary, other, &streaks, threshold, fail_back)
        else {
            if streaks.values().all(|s| s.failures >= threshold) {
                tracing::warn!("every region fails its checks: the records stay as they are");
            }
            continue;
        };
        // Read again (someone may have switched by hand meanwhile) and write.
        // A failure is retried at the next round: the streak stands.
        let recorded = async {
            let current = route53.current().await?;
            let (decision, steps) = route53.plan(&current, Some(&primary));
            route53.execute(steps).await.map(|()| decision)
        };
        let decision = match recorded.await {
            Ok(decision) => decision,
            Err(e) => {
                tracing::warn!("recording the decision for {primary}: {e} (trying again)");
                continue;
            }
        };
        let decision = Decided {
            at_ms: crate::event::now_ms(),
            action,
            primary: decision.primary,
            secondary: decision.secondary,
            checks_in_a_row: in_a_row,
        };
        tracing::info!(action, primary = decision.primary, in_a_row, "failover decided");
        decided(&decision);
        failed_over = primary != failover.primary;
        serving = primary;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streaks(of: &[(&str, u32, u32)]) -> BTreeMap<String, Streak> {
        of.iter()
            .map(|(r, failures, passes)| (r.to_string(), Streak { failures: *failures, passes: *passes }))
            .collect()
    }

    #[test]
    fn promotes_after_the_threshold_only_to_a_passing_region_and_fails_back_when_asked() {
        let (a, b) = ("us-east-1", "eu-west-1");
        assert_eq!(decide(a, a, b, &streaks(&[(a, 2, 0), (b, 0, 5)]), 3, false), None);
        assert_eq!(decide(a, a, b, &streaks(&[(a, 3, 0), (b, 0, 1)]), 3, false), Some(("promote", b.into(), 3)));
        assert_eq!(decide(a, a, b, &streaks(&[(a, 9, 0), (b, 1, 0)]), 3, false), None, "both down: stay");
        // Serving the secondary: back only with auto_failback, after the threshold.
        assert_eq!(decide(b, a, a, &streaks(&[(a, 0, 5), (b, 0, 5)]), 3, false), None);
        assert_eq!(decide(b, a, a, &streaks(&[(a, 0, 2), (b, 0, 5)]), 3, true), None);
        assert_eq!(decide(b, a, a, &streaks(&[(a, 0, 3), (b, 0, 5)]), 3, true), Some(("failback", a.into(), 3)));
        // The secondary failing while serving: back to the primary if it passes.
        assert_eq!(decide(b, a, a, &streaks(&[(a, 0, 1), (b, 3, 0)]), 3, false), Some(("promote", a.into(), 3)));
    }
}
