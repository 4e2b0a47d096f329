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
use tower::ServiceExt;

use crate::{Fault, MockServer};
use tower_llm_lb::Rng;
use tower_llm_lb::backend::Backend;
use tower_llm_lb::balance::Strategy;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::retry::RetryAfter429Layer;

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
    /// With `quota_headers`: send them as Azure standard deployments do (per-minute limit and
    /// remaining, no reset) rather than as OpenAI does (with a reset).
    pub azure_headers: bool,
}

/// Sends each request to the in-process backend its `Endpoint` pointed it at (by host).
#[derive(Clone)]
struct Router(Vec<crate::InProcess>);

impl tower_service::Service<http::Request<ReplayBody>> for Router {
    type Response = http::Response<crate::MockBody>;
    type Error = std::io::Error;
    type Future = <crate::InProcess as tower_service::Service<http::Request<ReplayBody>>>::Future;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<ReplayBody>) -> Self::Future {
        let host = req.uri().host().unwrap_or_default();
        let name = host.strip_suffix(".sim").unwrap_or(host);
        let i = self.0.iter().position(|m| m.name() == name).unwrap_or(0);
        self.0[i].call(req)
    }
}

/// What a scenario gave with one strategy.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Requests offered.
    pub offered: u64,
    /// Requests answered 200.
    pub served: u64,
    /// The most the backends could have served, given when the requests arrived: their quota
    /// while healthy, spent on requests that had arrived and had not yet waited past
    /// `max_wait` (see [`servable`]).
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
    /// Served as a share of what could be served ([`capacity`](Report::capacity): the offered
    /// load when below the quota, the quota when above it, and the right mix of both when the
    /// quota changes during the run).
    pub fn goodput(&self) -> f64 {
        self.served as f64 / (self.offered as f64).min(self.capacity).max(1.0)
    }
}

/// The length of a time slice of [`servable`].
const SLICE: Duration = Duration::from_millis(100);

/// The physical limit of a run: the most any balancer could have served, given the arrivals
/// (`arrivals[i]`: requests arriving in the `i`-th 100 ms slice) and the backends' quotas. A
/// fluid model: one token bucket per backend (a second's worth of burst, as the mock's), refilled
/// while the backend is healthy, spent on waiting requests oldest first; a request still waiting
/// after `max_wait` is lost, as the stack gives up on it. Runs for `slices` slices.
///
/// Counting each backend's quota over the whole run instead would call capacity that had no
/// requests to serve "unused": with a backend failing halfway at 0.9x, the first half has quota
/// to spare and the second too little, and that measure put a perfect balancer at 94%.
pub fn servable(scenario: &Scenario, arrivals: &[u64], slices: usize) -> f64 {
    let dt = SLICE.as_secs_f64();
    let max_age = (scenario.max_wait.as_secs_f64() / dt).ceil() as usize;
    let mut buckets: Vec<f64> = scenario.backends.iter().map(|b| b.rps.max(1.0)).collect();
    let mut waiting: std::collections::VecDeque<(usize, f64)> = Default::default();
    let mut total = 0.0;
    for slice in 0..slices {
        let t = SLICE * u32::try_from(slice).unwrap_or(u32::MAX);
        if let Some(&n) = arrivals.get(slice).filter(|n| **n > 0) {
            waiting.push_back((slice, n as f64));
        }
        while waiting.front().is_some_and(|(at, _)| slice > at + max_age) {
            waiting.pop_front();
        }
        for (b, level) in scenario.backends.iter().zip(&mut buckets) {
            if b.fails_at.is_some_and(|f| t >= f) {
                *level = 0.0;
                continue;
            }
            *level = (*level + b.rps * dt).min(b.rps.max(1.0));
            while *level >= 1.0 {
                let Some(front) = waiting.front_mut() else {
                    break;
                };
                let take = front.1.min(level.floor());
                front.1 -= take;
                *level -= take;
                total += take;
                if front.1 <= 0.0 {
                    waiting.pop_front();
                }
            }
        }
    }
    total
}

/// Runs `scenario` with `strategy`; deterministic for a given `seed`. Fails on a backend name
/// that is not a valid backend name.
pub async fn run(
    scenario: &Scenario,
    strategy: Strategy,
    seed: u64,
) -> Result<Report, tower_llm_lb::BoxError> {
    let start = Instant::now();
    let rng = Rng::seeded(seed);
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for b in &scenario.backends {
        let mut mock = MockServer::builder()
            .name(&b.name)
            .rps(b.rps)
            .latency(b.latency)
            .quota_headers(scenario.quota_headers)
            .record_requests(false);
        if scenario.quota_headers && scenario.azure_headers {
            mock = mock.azure_headers();
        }
        let mock = mock.in_process();
        let backend = Backend::openai(&b.name, format!("http://{}.sim/v1", b.name))
            .priority(b.priority)
            .build()?;
        mocks.push(mock);
        backends.push(backend);
    }
    // The stack a user gets: `stack::group`'s layers and defaults, over in-process backends.
    let settings = tower_llm_lb::stack::Settings {
        strategy,
        retry: RetryAfter429Layer {
            max_wait: scenario.max_wait,
            ..Default::default()
        },
        rng: Some(rng.clone()),
        ..tower_llm_lb::stack::Settings::default()
    };
    let svc = tower_llm_lb::stack::group_over(
        "sim",
        backends.iter().cloned(),
        Router(mocks.clone()),
        &settings,
    )?;

    let aggregate: f64 = scenario.backends.iter().map(|b| b.rps).sum();
    let rate = aggregate * scenario.load;
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut offered = 0u64;
    let mut t = Duration::ZERO;
    let mut failed: Vec<bool> = vec![false; mocks.len()];
    let mut arrivals: Vec<u64> = Vec::new();
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
        let slice = (t.as_nanos() / SLICE.as_nanos()) as usize;
        if arrivals.len() <= slice {
            arrivals.resize(slice + 1, 0);
        }
        arrivals[slice] += 1;
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
    // The physical limit, up to when the last request finished.
    let slices = (start.elapsed().as_nanos() / SLICE.as_nanos()) as usize + 1;
    let capacity = servable(scenario, &arrivals, slices);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(rps: &[f64], fails_at: Option<Duration>) -> Scenario {
        Scenario {
            name: "t".into(),
            backends: rps
                .iter()
                .enumerate()
                .map(|(i, r)| SimBackend {
                    fails_at: (i == 0).then_some(fails_at).flatten(),
                    ..SimBackend::new(&format!("b{i}"), *r, Duration::from_millis(100))
                })
                .collect(),
            load: 1.0,
            duration: Duration::from_secs(100),
            arrivals: Arrivals::Steady,
            max_wait: Duration::from_secs(1),
            quota_headers: true,
            azure_headers: false,
        }
    }

    /// `per_slice` requests in each of `slices` 100 ms slices.
    fn steady(per_slice: u64, slices: usize) -> Vec<u64> {
        vec![per_slice; slices]
    }

    #[test]
    fn below_the_quota_everything_that_arrives_is_servable() {
        // 10 req/s offered to 20 req/s of quota for 100 s.
        let s = scenario(&[10.0, 10.0], None);
        assert_eq!(servable(&s, &steady(1, 1000), 1000), 1000.0);
    }

    #[test]
    fn above_the_quota_the_quota_and_the_initial_burst_are_servable() {
        // 40 req/s offered to 20 req/s for 100 s: 2 000 plus the 20 of the full buckets.
        let s = scenario(&[10.0, 10.0], None);
        let n = servable(&s, &steady(4, 1000), 1000);
        assert!((2000.0..=2021.0).contains(&n), "{n}");
    }

    #[test]
    fn a_backend_failing_halfway_counts_the_demand_of_each_half() {
        // 18 req/s to 3 x 10 req/s; one fails at 50 s. First half: all 900 arrive and are
        // servable; second half: 20 req/s of 18 req/s offered, so all 900 again.
        let s = scenario(&[10.0, 10.0, 10.0], Some(Duration::from_secs(50)));
        let arrivals: Vec<u64> = (0..1000).map(|i| if i % 5 == 4 { 1 } else { 2 }).collect();
        let offered: u64 = arrivals.iter().sum();
        assert_eq!(servable(&s, &arrivals, 1000), offered as f64);
        // At 27 req/s the second half can serve only 20 req/s (+ what waits 1 s at the end),
        // while the first half serves all 27: quota over the whole run would say 2 500.
        let arrivals: Vec<u64> = (0..1000).map(|i| if i % 10 < 7 { 3 } else { 2 }).collect();
        let n = servable(&s, &arrivals, 1000);
        assert!(
            (1350.0 + 1000.0..=1350.0 + 1000.0 + 30.0).contains(&n),
            "{n}"
        );
    }
}
