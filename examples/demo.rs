//! The whole stack against simulated rate-limited backends, no credentials needed.
//!
//! Starts six mock backends on loopback (a provisioned PTU deployment and five pay-as-you-go ones,
//! each with its own key and request/s quota; one of them starts failing halfway, one hangs),
//! stacks `RetryAfter429` over `Balance` over the per-backend `CircuitBreaker` + `Endpoint` +
//! `AttemptTimeout` + `AuthInject` layers, and drives traffic at 80% and then 150% of the
//! healthy backends' quota. Prints a per-backend table every second and a summary.
//!
//! Run: `cargo run --release --example demo`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::{Balance, Strategy};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{EndpointLayer, Served};
use tower_llm_lb::mock::{Fault, MockServer};
use tower_llm_lb::retry::{Attempts, RetryAfter429Layer};
use tower_llm_lb::state::Circuit;
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb::{Backend, BoxError};

struct Spec {
    name: &'static str,
    priority: u32,
    rps: f64,
    key: &'static str,
}

const fn spec(name: &'static str, priority: u32, rps: f64, key: &'static str) -> Spec {
    Spec {
        name,
        priority,
        rps,
        key,
    }
}

const SPECS: [Spec; 6] = [
    spec("ptu-eastus", 0, 40.0, "ptu-key"),
    spec("paygo-westus", 1, 20.0, "west-key"),
    spec("paygo-swedencentral", 1, 20.0, "sweden-key"),
    spec("paygo-japaneast", 1, 20.0, "japan-key"),
    spec("paygo-brazilsouth", 1, 20.0, "brazil-key"),
    spec("paygo-uksouth", 1, 20.0, "uk-key"),
];
/// Starts answering 500 when phase 2 begins.
const FAILS_HALFWAY: usize = 4;
/// Accepts connections and never answers.
const HANGS: usize = 5;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    client_429: AtomicU64,
    client_errors: AtomicU64,
    turned_away: AtomicU64,
    exhausted: AtomicU64,
    retried: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for s in &SPECS {
        let mock = MockServer::builder()
            .name(s.name)
            .api_key(s.key)
            .rps(s.rps)
            .latency(Duration::from_millis(20))
            .start()
            .await?;
        backends.push(
            Backend::azure(s.name, mock.url(), "gpt-4o", "2024-10-21")
                .credential(Credential::api_key(s.key)?)
                .priority(s.priority)
                .build()?,
        );
        mocks.push(mock);
    }
    mocks[HANGS].set_fault(Some(Fault::Hang));
    // Quota of the backends that stay healthy throughout.
    let capacity: f64 = SPECS.iter().take(FAILS_HALFWAY).map(|s| s.rps).sum();

    let client = http_client::<ReplayBody>();
    let breakers = BreakerGroup::try_new(Policy {
        base_open: Duration::from_secs(2),
        ..Policy::default()
    })?;
    let balance = Balance::from_backends(backends.iter().cloned(), |b| {
        ServiceBuilder::new()
            .layer(breakers.layer_for(b))
            .layer(EndpointLayer::new(b.clone()))
            .layer(AttemptTimeoutLayer::new().first_byte(Duration::from_secs(1)))
            .layer(AuthInjectLayer::for_backend(b))
            .service(client.clone())
    })
    .strategy(Strategy::LeastInFlight)
    .build()?;
    let stack = ServiceBuilder::new()
        .layer(
            RetryAfter429Layer::new()
                .max_wait(Duration::from_secs(3))
                .retry_failures(true),
        )
        .service(balance);

    println!(
        "tower-llm-lb demo: 1 PTU + 3 pay-as-you-go mock deployments, {capacity} requests/s of quota in all"
    );
    println!("phase 1: 80% of the healthy quota for 5 s; phase 2: 150% for 5 s\n");

    let tally = Arc::new(Tally::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let mut next_report = Duration::from_secs(1);
    for (phase, load) in [(1, 0.8), (2, 1.5)] {
        if phase == 2 {
            mocks[FAILS_HALFWAY].set_fault(Some(Fault::Status(500)));
        }
        let rate = capacity * load;
        let phase_start = Instant::now();
        let mut i = 0u64;
        while phase_start.elapsed() < Duration::from_secs(5) {
            let due = phase_start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            i += 1;
            sent += 1;
            let (svc, t, lat) = (stack.clone(), tally.clone(), latencies.clone());
            tasks.spawn(async move {
                let t0 = Instant::now();
                let req = http::Request::post("/v1/chat/completions")
                    .header("authorization", "Bearer the-callers-key-never-forwarded")
                    .body(ReplayBody::from(
                        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                    ))
                    .expect("valid request");
                match svc.oneshot(req).await {
                    Ok(res) if res.status().is_success() => {
                        t.ok.fetch_add(1, Relaxed);
                        if res
                            .extensions()
                            .get::<Attempts>()
                            .is_some_and(|a| a.0.len() > 1)
                        {
                            t.retried.fetch_add(1, Relaxed);
                        }
                        let _ = res.extensions().get::<Served>();
                        lat.lock().expect("lock").push(t0.elapsed());
                    }
                    Ok(res) if res.status() == 429 => {
                        t.client_429.fetch_add(1, Relaxed);
                    }
                    Err(e)
                        if tower_llm_lb::error::find::<tower_llm_lb::error::Unavailable>(&*e)
                            .is_some() =>
                    {
                        t.turned_away.fetch_add(1, Relaxed);
                    }
                    Err(e) if e.is::<tower_llm_lb::error::Exhausted>() => {
                        t.exhausted.fetch_add(1, Relaxed);
                    }
                    other => {
                        // Expected never to happen: say exactly what it was.
                        {
                            match &other {
                                Ok(res) => eprintln!(
                                    "unexpected: status {} attempts {:?}",
                                    res.status(),
                                    res.extensions().get::<Attempts>().map(|a| a
                                        .0
                                        .iter()
                                        .map(|x| x.to_string())
                                        .collect::<Vec<_>>())
                                ),
                                Err(e) => eprintln!("unexpected error: {e}"),
                            }
                        }
                        t.client_errors.fetch_add(1, Relaxed);
                    }
                }
            });
            while tasks.try_join_next().is_some() {}
            if started.elapsed() >= next_report {
                next_report += Duration::from_secs(1);
                report(phase, started.elapsed(), &backends, &tally);
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    report(2, started.elapsed(), &backends, &tally);

    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let throttled_absorbed: u64 = backends
        .iter()
        .map(|b| b.state().counters().throttled)
        .sum();
    let leaks: u64 = mocks.iter().map(|m| m.counters().foreign_credentials).sum();
    println!("\nsummary after {:.1}s", started.elapsed().as_secs_f64());
    println!("  requests sent            {sent}");
    println!("  served                   {}", tally.ok.load(Relaxed));
    println!("    of them after a retry  {}", tally.retried.load(Relaxed));
    println!("  429s from backends       {throttled_absorbed} (absorbed inside the stack)");
    println!(
        "  429s passed to callers   {} (each with an honest retry-after)",
        tally.client_429.load(Relaxed)
    );
    println!(
        "  turned away, unsent      {} (no backend free within the 3 s wait budget: a typed error with the retry time)",
        tally.turned_away.load(Relaxed)
    );
    println!(
        "  gave up after a failure  {} (a backend failed, no other free within the budget: typed, lists each attempt)",
        tally.exhausted.load(Relaxed)
    );
    println!(
        "  other errors             {} (expected: 0)",
        tally.client_errors.load(Relaxed)
    );
    println!(
        "  latency p50 / p99        {:.0} ms / {:.0} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    println!("  caller keys forwarded    {leaks}");
    Ok(())
}

fn report(phase: u32, at: Duration, backends: &[Backend], tally: &Tally) {
    println!(
        "t={:>4.1}s phase {phase}  served {:>5}  429→caller {:>4}  turned away {:>4}  errors {:>4}",
        at.as_secs_f64(),
        tally.ok.load(Relaxed),
        tally.client_429.load(Relaxed),
        tally.turned_away.load(Relaxed),
        tally.client_errors.load(Relaxed)
    );
    for b in backends {
        let c = b.state().counters();
        let now = tokio::time::Instant::now();
        let status = match b.state().circuit() {
            Circuit::Open { until } if until > now => "circuit open",
            Circuit::Open { .. } | Circuit::HalfOpen => "probing",
            Circuit::Closed if b.state().unavailable_until(now).is_some() => "resting",
            Circuit::Closed => "ready",
        };
        println!(
            "    {:<20} tier {}  ok {:>5}  429 {:>4}  5xx {:>4}  failed {:>4}  in flight {:>3}  {}",
            b.name(),
            b.priority(),
            c.success,
            c.throttled,
            c.server_errors,
            c.failures,
            b.state().in_flight(),
            status
        );
    }
}
