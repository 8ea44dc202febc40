//! Per-API token buckets that adapt to throttling, and the retry loop with
//! jittered exponential backoff. Throttling and transient failures are
//! retried until a deadline (hours by default), never turned into a failure
//! after a few attempts: a burst of throttling slows iotdr down instead.

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
    ("GetThingShadow", 400.0),
    ("DeleteThingShadow", 400.0),
    ("UpdateItem", 1000.0),
    // Reads: the source's, at ingest and for second reads, and the
    // applier's where it converges. Service Quotas defaults (code in the
    // comment) as AWS listed them in 2024-2025.
    ("ListThingPrincipals", 20.0),      // L-FC3EF4D9
    ("DescribeCertificate", 10.0),      // L-FC864907
    ("ListAttachedPolicies", 15.0),     // L-B2DA2A45
    ("GetPolicy", 10.0),                // L-5CE9072D
    ("GetPolicyVersion", 15.0),         // L-1FE17093
    ("ListPrincipalThings", 10.0),      // L-C481616A
    ("DescribeThingType", 100.0),       // L-DDCF8E97
    ("DescribeThingGroup", 100.0),      // L-52E1E197
    ("DescribeBillingGroup", 100.0),    // L-23DF46E7
    ("ListThingGroupsForThing", 100.0), // L-75F129AD
    ("ListThingsInThingGroup", 25.0),   // L-D33FD5F9
    ("ListThingsInBillingGroup", 25.0), // L-E8797DCC
    ("ListThings", 10.0),               // L-57AAC135
    ("ListThingTypes", 10.0),           // L-F9EBF527
    ("ListThingGroups", 10.0),          // L-1E5260D6
    ("ListBillingGroups", 10.0),        // L-BB923BC2
    ("ListCertificates", 10.0),         // L-97DA2C60
    ("ListPolicies", 10.0),             // L-2B86A5A0
    ("SearchIndex", 15.0),              // L-908D0FBE (AWS IoT Device Management)
];

/// For APIs not in the table (ListNamedShadowsForThing, DescribeEndpoint, ...).
pub const FALLBACK_RATE: f64 = 20.0;

/// The slowest an adaptive bucket gets however often it is throttled: a
/// tenth of its configured rate, and never under half a request per second.
const MIN_ADAPTIVE_SHARE: f64 = 0.1;
const MIN_ADAPTIVE_RATE: f64 = 0.5;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// How long a call keeps being retried on throttling and transient
    /// failures (5xx, timeouts, unreachable endpoints) before it fails.
    pub deadline: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(6 * 3600),
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

/// A token bucket whose rate adapts like the AWS SDKs' adaptive retry mode,
/// simplified: a throttled answer halves the rate (down to a tenth of the
/// configured ceiling), each success wins back a twentieth of the ceiling,
/// which the rate never exceeds. The
/// concurrent calls of one wave of throttling halve it once, not once each.
struct Bucket {
    ceiling: f64,
    rate: f64,
    tokens: f64,
    refilled: Instant,
    slowed: Option<Instant>,
}

/// Throttled answers within this long of a slow-down belong to the same wave.
const THROTTLE_WAVE: Duration = Duration::from_millis(200);

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket { ceiling: rate, rate, tokens: rate.max(1.0), refilled: Instant::now(), slowed: None }
    }

    /// A burst of one second's worth at the current rate, at least one call.
    fn burst(&self) -> f64 {
        self.rate.max(1.0)
    }

    fn throttled(&mut self, now: Instant) {
        if self.slowed.is_some_and(|at| now.saturating_duration_since(at) < THROTTLE_WAVE) {
            return;
        }
        self.slowed = Some(now);
        let floor = (self.ceiling * MIN_ADAPTIVE_SHARE).max(MIN_ADAPTIVE_RATE).min(self.ceiling);
        self.rate = (self.rate / 2.0).max(floor);
        // What was saved up at the old rate must not be spent at once.
        self.tokens = self.tokens.min(1.0);
    }

    fn succeeded(&mut self) {
        if self.rate < self.ceiling {
            self.rate = (self.rate + self.ceiling / 20.0).min(self.ceiling);
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst());
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
    stats: Mutex<HashMap<(String, &'static str), CallStats>>,
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
    /// Calls that were still failing retryably when the retry deadline passed.
    pub deadline_exceeded: u64,
    /// Calls given a shorter deadline of their own (see [`Limiter::send_within`])
    /// that were still failing retryably when it passed: their caller does
    /// the work another way, not a failure.
    pub gave_up_early: u64,
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
            stats: Mutex::new(HashMap::new()),
        }
    }

    /// The limiter of a run, from its `[apply]` rates and retry settings.
    pub fn from_config(apply: &crate::config::Apply) -> Limiter {
        let retry = RetryPolicy {
            deadline: apply.retry_deadline,
            initial_backoff: apply.initial_backoff,
            max_backoff: apply.max_backoff,
        };
        let rates = apply.rate_limits.iter().map(|(k, v)| (k.clone(), *v)).collect();
        Limiter::new(&rates, retry)
    }

    /// What was sent to `regions`, leaving out the operations in `except`.
    pub fn stats(&self, regions: &[String], except: &[&str]) -> CallStats {
        let stats = self.stats.lock().expect("stats lock");
        let mut total = CallStats::default();
        for ((region, operation), counts) in stats.iter() {
            if regions.contains(region) && !except.contains(operation) {
                total.requests += counts.requests;
                total.calls += counts.calls;
                total.throttled += counts.throttled;
                total.transient_failures += counts.transient_failures;
                total.deadline_exceeded += counts.deadline_exceeded;
                total.gave_up_early += counts.gave_up_early;
            }
        }
        total
    }

    /// Everything counted, per region and operation.
    pub fn all_stats(&self) -> Vec<(String, &'static str, CallStats)> {
        let stats = self.stats.lock().expect("stats lock");
        stats.iter().map(|((region, operation), counts)| (region.clone(), *operation, counts.clone())).collect()
    }

    /// Calls that ended, per operation, in `region`.
    pub fn calls_by_operation(&self, region: &str) -> std::collections::BTreeMap<&'static str, u64> {
        let stats = self.stats.lock().expect("stats lock");
        stats
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|((_, operation), counts)| (*operation, counts.calls))
            .collect()
    }

    /// The rate `operation` is configured to (before any adaptation).
    pub fn configured_rate(&self, operation: &str) -> f64 {
        self.rates.get(operation).copied().unwrap_or(self.fallback)
    }

    fn bucket<R>(&self, region: &str, operation: &'static str, f: impl FnOnce(&mut Bucket) -> R) -> R {
        let mut buckets = self.buckets.lock().expect("bucket lock");
        let rate = self.configured_rate(operation);
        f(buckets.entry((region.to_string(), operation)).or_insert_with(|| Bucket::new(rate)))
    }

    async fn acquire(&self, region: &str, operation: &'static str) {
        while let Some(wait) = self.bucket(region, operation, |b| b.take(Instant::now())) {
            tokio::time::sleep(wait).await;
        }
    }

    /// How long calls are retried (see [`RetryPolicy::deadline`]).
    pub fn retry_deadline(&self) -> Duration {
        self.retry.deadline
    }

    /// The rate the bucket of `operation` in `region` is held to now.
    pub fn current_rate(&self, region: &str, operation: &'static str) -> f64 {
        self.bucket(region, operation, |b| b.rate)
    }

    /// Sends one call: waits for its token, retries throttling and transient
    /// failures with backoff until the retry deadline, and returns the last
    /// result. Throttling slows the operation's bucket down.
    pub async fn send<T, F, Fut>(&self, region: &str, operation: &'static str, request: F) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AwsError>>,
    {
        self.send_within(region, operation, None, request).await
    }

    /// [`send`](Self::send), retrying for at most `deadline` when it is
    /// shorter than the retry deadline, counted from the first token, and an
    /// attempt in flight included (one can otherwise hang until its
    /// timeout). The error after a shorter deadline is still retryable: the
    /// caller that chose it has another way (ingest leaves the read to a
    /// second read).
    pub async fn send_within<T, F, Fut>(
        &self,
        region: &str,
        operation: &'static str,
        deadline: Option<Duration>,
        mut request: F,
    ) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AwsError>>,
    {
        let early = deadline.filter(|d| *d < self.retry.deadline);
        let deadline = early.unwrap_or(self.retry.deadline);
        let mut first_token = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.acquire(region, operation).await;
            let started = *first_token.get_or_insert_with(Instant::now);
            let result = match early {
                Some(early) => {
                    let left = early.saturating_sub(started.elapsed());
                    // Dropping a read midway changes nothing; callers with a deadline of their own only read.
                    tokio::time::timeout(left, request()).await.unwrap_or_else(|_| {
                        Err(AwsError {
                            kind: super::errors::ErrorKind::Transient,
                            code: "Timeout".into(),
                            message: format!("no answer within {early:?}"),
                            status: None,
                            resource_id: None,
                        })
                    })
                }
                None => request().await,
            };
            let throttled = matches!(&result, Err(e) if e.is(super::errors::ErrorKind::Throttled));
            self.bucket(region, operation, |b| {
                if throttled {
                    b.throttled(Instant::now())
                } else if result.is_ok() {
                    b.succeeded()
                }
            });
            let backoff = self.retry.backoff(attempt);
            let in_time = started.elapsed() + backoff < deadline;
            let retry = {
                let mut all = self.stats.lock().expect("stats lock");
                let stats = all.entry((region.to_string(), operation)).or_default();
                stats.requests += 1;
                match &result {
                    Err(e) if e.retryable() && in_time => {
                        if throttled {
                            stats.throttled += 1;
                        } else {
                            stats.transient_failures += 1;
                        }
                        true
                    }
                    Err(e) if e.retryable() => {
                        if early.is_some() {
                            stats.gave_up_early += 1;
                        } else {
                            stats.deadline_exceeded += 1;
                        }
                        stats.calls += 1;
                        false
                    }
                    _ => {
                        stats.calls += 1;
                        false
                    }
                }
            };
            match result {
                Err(e) if retry => {
                    // A long outage is worth a line now and then, not one per attempt.
                    if attempt % 20 == 0 {
                        tracing::warn!(region, operation, attempt, "still failing after {:?}: {e}", started.elapsed());
                    } else {
                        tracing::debug!(region, operation, attempt, "retrying after {e}");
                    }
                    tokio::time::sleep(backoff).await;
                }
                Err(e) if e.retryable() && early.is_some() => {
                    tracing::debug!(
                        region,
                        operation,
                        attempt,
                        "leaving it for later after {:?}: {e}",
                        started.elapsed()
                    );
                    return Err(e);
                }
                Err(e) if e.retryable() => {
                    return Err(AwsError {
                        message: format!(
                            "{} (still failing after {} attempts over {:?}, the retry deadline)",
                            e.message, attempt, self.retry.deadline
                        ),
                        ..e
                    });
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
    fn throttling_halves_the_rate_and_successes_win_it_back() {
        let mut bucket = Bucket::new(100.0);
        let mut at = Instant::now();
        bucket.throttled(at);
        bucket.throttled(at + Duration::from_millis(50));
        assert_eq!(bucket.rate, 50.0, "one wave of throttled answers slows down once");
        at += THROTTLE_WAVE;
        bucket.throttled(at);
        assert_eq!(bucket.rate, 25.0);
        for _ in 0..100 {
            at += THROTTLE_WAVE;
            bucket.throttled(at);
        }
        assert_eq!(bucket.rate, 10.0, "never under a tenth of the configured rate");
        let start = Instant::now();
        assert_eq!(bucket.take(start), None, "one call still goes");
        assert!(bucket.take(start).is_some(), "saved-up tokens are not spent at once after throttling");
        for _ in 0..18 {
            bucket.succeeded();
        }
        assert_eq!(bucket.rate, 100.0, "back to the ceiling, never past it");
        bucket.succeeded();
        assert_eq!(bucket.rate, 100.0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            deadline: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        for _ in 0..100 {
            assert!(policy.backoff(1) <= Duration::from_millis(100));
            assert!(policy.backoff(2) <= Duration::from_millis(200));
            assert!(policy.backoff(9) <= Duration::from_millis(350));
        }
    }

    #[tokio::test]
    async fn a_deadline_of_its_own_ends_retries_and_a_hanging_attempt_in_time() {
        let retry = RetryPolicy {
            deadline: Duration::from_secs(3600),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let limiter = Limiter::new(&HashMap::new(), retry);
        let unavailable = AwsError {
            kind: super::super::errors::ErrorKind::Transient,
            code: "ServiceUnavailable".into(),
            message: "503".into(),
            status: Some(503),
            resource_id: None,
        };
        let failing = || {
            let error = unavailable.clone();
            async move { Err::<(), _>(error) }
        };
        let started = tokio::time::Instant::now();
        let result = limiter.send_within("r", "ListThingPrincipals", Some(Duration::from_millis(300)), failing).await;
        assert!(result.unwrap_err().retryable(), "still retryable: the caller leaves it for later");
        assert!(started.elapsed() < Duration::from_secs(60), "not the retry deadline: {:?}", started.elapsed());

        let hanging = || std::future::pending::<Result<(), AwsError>>();
        let started = tokio::time::Instant::now();
        let result = limiter.send_within("r", "DescribeCertificate", Some(Duration::from_millis(300)), hanging).await;
        assert!(result.unwrap_err().retryable());
        assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(60), "the attempt in flight is cut: {:?}", started.elapsed());
        let stats = limiter.stats(&["r".to_string()], &[]);
        assert_eq!((stats.gave_up_early, stats.deadline_exceeded), (2, 0));
    }
}
