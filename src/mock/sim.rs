//! A quota simulator in virtual time: backends with request/s (and token/s) limits answering 429
//! with Retry-After exactly like [`MockServer`]s, in process (no sockets), on
//! tokio's paused clock, so an hour of traffic runs in seconds and gives the same figures every
//! run. `examples/simulate.rs` prints its report; users can run their own capacity plans.
//!
//! [`run`] must be awaited inside a current-thread runtime whose clock is paused
//! (`tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true)`, or
//! `#[tokio::test(start_paused = true)]`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

use super::{Fault, MockServer};
use crate::backend::Backend;
use crate::balance::{Balance, Strategy};
use crate::body::ReplayBody;
use crate::circuit_breaker::{BreakerGroup, Policy};
use crate::endpoint::EndpointLayer;
use crate::retry::RetryAfter429Layer;
use crate::rng::Rng;

/// One simulated backend.
#[derive(Clone, Debug)]
pub struct SimBackend {
    /// Its name.
    pub name: String,
    /// Priority tier (lower is preferred).
    pub priority: u32,
    /// Requests per second it allows.
    pub rps: f64,
    /// Time it takes to answer.
    pub latency: Duration,
    /// When it starts answering 500, if ever.
    pub fails_at: Option<Duration>,
}

impl SimBackend {
    /// A backend allowing `rps`, answering in `latency`, tier 0.
    pub fn new(name: &str, rps: f64, latency: Duration) -> Self {
        SimBackend {
            name: name.into(),
            priority: 0,
            rps,
            latency,
            fails_at: None,
        }
    }
}

/// How requests arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// Evenly spaced.
    Steady,
    /// On for `on` at a rate raised so the average is kept, then off for `off`.
    Bursty {
        /// Length of a burst.
        on: Duration,
        /// Quiet time after it.
        off: Duration,
    },
}

/// One scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name in the report.
    pub name: String,
    /// The backends.
    pub backends: Vec<SimBackend>,
    /// Offered load as a multiple of the aggregate request quota.
    pub load: f64,
    /// Simulated time.
    pub duration: Duration,
    /// Arrival pattern.
    pub arrivals: Arrivals,
    /// How long a request may wait for a free backend.
    pub max_wait: Duration,
    /// Whether backends send `x-ratelimit-*` quota headers (OpenAI and Azure pay-as-you-go
    /// do; Azure PTU 429s carry only `retry-after-ms`).
    pub quota_headers: bool,
}

/// What a scenario gave with one strategy.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Requests offered.
    pub offered: u64,
    /// Requests answered 200.
    pub served: u64,
    /// The most the backends could have served (their quota over the time they were healthy).
    pub capacity: f64,
    /// 429s the backends sent, per success.
    pub throttled_per_success: f64,
    /// Requests that ended in an error or a 429 for the caller.
    pub client_errors: u64,
    /// Median latency of served requests, waits included.
    pub p50: Duration,
    /// 99th percentile latency of served requests, waits included.
    pub p99: Duration,
}

impl Report {
    /// Served as a share of what could be served: of the capacity when overloaded, of the
    /// offered load otherwise.
    pub fn goodput(&self) -> f64 {
        self.served as f64 / (self.offered as f64).min(self.capacity).max(1.0)
    }
}

/// Runs `scenario` with `strategy`; deterministic for a given `seed`. Fails on a backend name
/// that is not a valid backend name.
pub async fn run(
    scenario: &Scenario,
    strategy: Strategy,
    seed: u64,
) -> Result<Report, crate::BoxError> {
    let start = Instant::now();
    let rng = Rng::seeded(seed);
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for b in &scenario.backends {
        let mock = MockServer::builder()
            .name(&b.name)
            .rps(b.rps)
            .latency(b.latency)
            .quota_headers(scenario.quota_headers)
            .record_requests(false)
            .in_process();
        let backend = Backend::openai(&b.name, format!("http://{}.sim/v1", b.name))
            .priority(b.priority)
            .build()?;
        mocks.push(mock);
        backends.push(backend);
    }
    let breakers = BreakerGroup::try_new(Policy::default())?.rng(rng.clone());
    let balance = Balance::from_backends(backends.iter().cloned(), |b| {
        let i = backends
            .iter()
            .position(|x| x.name() == b.name())
            .unwrap_or(0);
        ServiceBuilder::new()
            .layer(breakers.layer_for(b))
            .layer(EndpointLayer::new(b.clone()).rng(rng.clone()))
            .service(mocks[i].clone())
    })
    .strategy(strategy)
    .rng(rng.clone())
    .build()?;
    let svc = ServiceBuilder::new()
        .layer(
            RetryAfter429Layer::new()
                .max_wait(scenario.max_wait)
                .retry_failures(true),
        )
        .service(balance);

    let aggregate: f64 = scenario.backends.iter().map(|b| b.rps).sum();
    let rate = aggregate * scenario.load;
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut offered = 0u64;
    let mut t = Duration::ZERO;
    let mut failed: Vec<bool> = vec![false; mocks.len()];
    while t < scenario.duration {
        tokio::time::sleep_until(start + t).await;
        for (i, b) in scenario.backends.iter().enumerate() {
            if !failed[i] && b.fails_at.is_some_and(|f| t >= f) {
                mocks[i].set_fault(Some(Fault::Status(500)));
                failed[i] = true;
            }
        }
        let r = match scenario.arrivals {
            Arrivals::Steady => rate,
            Arrivals::Bursty { on, off } => {
                let period = (on + off).as_secs_f64();
                if t.as_secs_f64() % period < on.as_secs_f64() {
                    rate * period / on.as_secs_f64()
                } else {
                    0.0
                }
            }
        };
        if r <= 0.0 {
            t += Duration::from_millis(10);
            continue;
        }
        t += Duration::from_secs_f64(1.0 / r);
        offered += 1;
        let (svc, served, errors, lat) = (
            svc.clone(),
            served.clone(),
            errors.clone(),
            latencies.clone(),
        );
        tasks.spawn(async move {
            let t0 = Instant::now();
            let req = http::Request::post("/v1/chat/completions")
                .body(ReplayBody::from(
                    r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#,
                ))
                .expect("valid request");
            match svc.oneshot(req).await {
                Ok(res) if res.status().is_success() => {
                    served.fetch_add(1, Relaxed);
                    lat.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(t0.elapsed());
                }
                _ => {
                    errors.fetch_add(1, Relaxed);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    // The physical limit: each backend's quota over the time it was healthy (until the last
    // request finished), plus its initial burst.
    let elapsed = start.elapsed();
    let capacity: f64 = scenario
        .backends
        .iter()
        .map(|b| {
            let healthy = b.fails_at.map_or(elapsed, |f| f.min(elapsed));
            b.rps * healthy.as_secs_f64() + b.rps.max(1.0)
        })
        .sum();
    let throttled: u64 = mocks.iter().map(|m| m.counters().throttled).sum();
    let served = served.load(Relaxed);
    let mut lat = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Report {
        offered,
        served,
        capacity,
        throttled_per_success: throttled as f64 / served.max(1) as f64,
        client_errors: errors.load(Relaxed),
        p50: pct(0.5),
        p99: pct(0.99),
    })
}
