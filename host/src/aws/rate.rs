//! Per-API token buckets and the retry loop with jittered exponential backoff.

use super::errors::AwsError;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// AWS IoT's default per-account request rates for the APIs iotdr calls
/// (requests per second). Accounts with raised quotas set `[apply.rate_limits]`.
pub const DEFAULT_RATES: &[(&str, f64)] = &[
    ("CreateThing", 100.0),
    ("UpdateThing", 100.0),
    ("DeleteThing", 100.0),
    ("DescribeThing", 350.0),
    ("CreateThingType", 15.0),
    ("DeprecateThingType", 15.0),
    ("DeleteThingType", 15.0),
    ("CreateThingGroup", 25.0),
    ("UpdateThingGroup", 25.0),
    ("DeleteThingGroup", 25.0),
    ("DeleteDynamicThingGroup", 25.0),
    ("AddThingToThingGroup", 100.0),
    ("RemoveThingFromThingGroup", 100.0),
    ("CreateBillingGroup", 25.0),
    ("UpdateBillingGroup", 25.0),
    ("DeleteBillingGroup", 25.0),
    ("AddThingToBillingGroup", 60.0),
    ("RemoveThingFromBillingGroup", 60.0),
    ("RegisterCertificateWithoutCA", 10.0),
    ("UpdateCertificate", 10.0),
    ("DeleteCertificate", 10.0),
    ("CreatePolicy", 10.0),
    ("CreatePolicyVersion", 10.0),
    ("DeletePolicy", 10.0),
    ("AttachPolicy", 15.0),
    ("DetachPolicy", 15.0),
    ("AttachThingPrincipal", 100.0),
    ("DetachThingPrincipal", 100.0),
    ("UpdateThingShadow", 400.0),
    ("DeleteThingShadow", 400.0),
    ("UpdateItem", 1000.0),
];

/// For APIs not in the table (reads the applier makes to converge).
pub const FALLBACK_RATE: f64 = 20.0;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// "Full jitter": a uniform wait up to the exponential bound, so clients
    /// that were throttled together do not come back together.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(20);
        let bound = self.initial_backoff.saturating_mul(1 << exponent).min(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        // A burst of one second's worth, at least one call.
        let burst = rate.max(1.0);
        Bucket { rate, burst, tokens: burst, refilled: Instant::now() }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Token buckets keyed by (region, operation), and counts of what was sent.
pub struct Limiter {
    rates: HashMap<String, f64>,
    /// For operations without a rate of their own.
    fallback: f64,
    buckets: Mutex<HashMap<(String, &'static str), Bucket>>,
    retry: RetryPolicy,
    stats: Mutex<CallStats>,
}

/// What went over the wire.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct CallStats {
    /// Requests sent, retries included.
    pub requests: u64,
    /// Logical calls that ended (in success or in a final error).
    pub calls: u64,
    pub throttled: u64,
    pub transient_failures: u64,
}

impl Limiter {
    /// `overrides`: operation → requests per second, on top of [`DEFAULT_RATES`];
    /// `*` replaces every default (and the fallback), named operations still win.
    pub fn new(overrides: &HashMap<String, f64>, retry: RetryPolicy) -> Limiter {
        let every = overrides.get("*").copied();
        let mut rates: HashMap<String, f64> =
            DEFAULT_RATES.iter().map(|(op, r)| (op.to_string(), every.unwrap_or(*r))).collect();
        rates.extend(overrides.iter().filter(|(k, _)| *k != "*").map(|(k, v)| (k.clone(), *v)));
        Limiter {
            rates,
            fallback: every.unwrap_or(FALLBACK_RATE),
            buckets: Mutex::new(HashMap::new()),
            retry,
            stats: Mutex::new(CallStats::default()),
        }
    }

    pub fn stats(&self) -> CallStats {
        self.stats.lock().expect("stats lock").clone()
    }

    async fn acquire(&self, region: &str, operation: &'static str) {
        loop {
            let wait = {
                let mut buckets = self.buckets.lock().expect("bucket lock");
                let rate = self.rates.get(operation).copied().unwrap_or(self.fallback);
                buckets.entry((region.to_string(), operation)).or_insert_with(|| Bucket::new(rate)).take(Instant::now())
            };
            match wait {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Sends one call: waits for its token, retries throttling and transient
    /// failures with backoff, and returns the last result.
    pub async fn send<T, F, Fut>(&self, region: &str, operation: &'static str, mut request: F) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AwsError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.acquire(region, operation).await;
            let result = request().await;
            let retry = {
                let mut stats = self.stats.lock().expect("stats lock");
                stats.requests += 1;
                match &result {
                    Err(e) if e.retryable() && attempt < self.retry.max_attempts => {
                        if e.is(super::errors::ErrorKind::Throttled) {
                            stats.throttled += 1;
                        } else {
                            stats.transient_failures += 1;
                        }
                        true
                    }
                    _ => {
                        stats.calls += 1;
                        false
                    }
                }
            };
            match result {
                Err(e) if retry => {
                    tracing::debug!(region, operation, attempt, "retrying after {e}");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_pace() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10.0);
        for _ in 0..10 {
            assert_eq!(bucket.take(start), None);
        }
        let wait = bucket.take(start).expect("the burst is spent");
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(bucket.take(start + Duration::from_millis(100)), None);
    }

    #[test]
    fn a_star_rate_replaces_every_default_but_named_rates_win() {
        let overrides: HashMap<String, f64> = [("*".to_string(), 500.0), ("CreateThing".to_string(), 50.0)].into();
        let limiter = Limiter::new(&overrides, RetryPolicy::default());
        assert_eq!(limiter.rates["CreateThing"], 50.0);
        assert_eq!(limiter.rates["RegisterCertificateWithoutCA"], 500.0);
        assert_eq!(limiter.fallback, 500.0);
        assert!(!limiter.rates.contains_key("*"));
        let plain = Limiter::new(&HashMap::new(), RetryPolicy::default());
        assert_eq!(plain.rates["RegisterCertificateWithoutCA"], 10.0);
        assert_eq!(plain.fallback, FALLBACK_RATE);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        for _ in 0..100 {
            assert!(policy.backoff(1) <= Duration::from_millis(100));
            assert!(policy.backoff(2) <= Duration::from_millis(200));
            assert!(policy.backoff(9) <= Duration::from_millis(350));
        }
    }
}
