//! The whole stack against simulated rate-limited backends, no credentials needed.
//!
//! Starts six mock Azure deployments on loopback: a provisioned (PTU) one drained first, three
//! pay-as-you-go regions behind it, one that starts failing halfway and one that hangs. Drives a
//! few thousand requests through the stack a user gets with every setting default
//! (`stack::group`: `RetryAfter429` → `Balance` → per backend `CircuitBreaker` → `Endpoint` →
//! `AttemptTimeout` → `AuthInject`) for 20 s at 85% of the healthy quota with a burst to 130% in
//! the middle, shows a live per-backend table, and ends with a summary.
//!
//! Run: `cargo run --release --example demo`

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tower::ServiceExt;
use tower_llm_lb::Circuit;
use tower_llm_lb::auth::Credential;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::Served;
use tower_llm_lb::error::{Exhausted, Unavailable, find};
use tower_llm_lb::retry::Attempts;
use tower_llm_lb::stack::{self, Settings};
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::{Fault, MockServer};

/// (name, priority tier, requests per second)
const BACKENDS: [(&str, u32, f64); 6] = [
    ("ptu-eastus", 0, 80.0),
    ("paygo-westus", 1, 40.0),
    ("paygo-swedencentral", 1, 40.0),
    ("paygo-japaneast", 1, 40.0),
    ("paygo-brazilsouth", 1, 40.0),
    ("paygo-uksouth", 1, 40.0),
];
const FAILS_HALFWAY: usize = 4;
const HANGS: usize = 5;
const RUN: Duration = Duration::from_secs(20);

/// Offered load at `t`, as a share of the healthy quota: 85%, with a burst to 130% at 8-11 s.
fn load(t: Duration) -> f64 {
    if (8.0..11.0).contains(&t.as_secs_f64()) {
        1.3
    } else {
        0.85
    }
}

#[derive(Default)]
struct Tally {
    served: AtomicU64,
    retried: AtomicU64,
    client_429: AtomicU64,
    turned_away: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for (name, tier, rps) in BACKENDS {
        let key = format!("{name}-key");
        let mock = MockServer::builder()
            .name(name)
            .api_key(&key)
            .rps(rps)
            .azure_headers();
        let mock = mock.latency(Duration::from_millis(25)).start().await?;
        let b = Backend::azure(name, mock.url(), "gpt-4o", "2024-10-21");
        backends.push(
            b.credential(Credential::api_key(&key)?)
                .priority(tier)
                .build()?,
        );
        mocks.push(mock);
    }
    mocks[HANGS].set_fault(Some(Fault::Hang));
    let healthy: f64 = BACKENDS[..FAILS_HALFWAY].iter().map(|b| b.2).sum();

    // Every setting default: what a new user gets (the README's "What you get by default").
    let stack = stack::group(
        "demo",
        backends.iter().cloned(),
        http_client::<ReplayBody>(),
        &Settings::default(),
    )?;

    println!("tower-llm-lb demo: 1 PTU + 5 pay-as-you-go mock deployments (no credentials needed)");
    println!(
        "  {} fails from halfway on, {} hangs; healthy quota {healthy} req/s",
        BACKENDS[FAILS_HALFWAY].0, BACKENDS[HANGS].0
    );
    println!("  load: 85% of it for 20 s, a burst to 130% at 8-11 s\n");

    let tally = Arc::new(Tally::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let live = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let (mut sent, mut next_report, mut drawn) = (0u64, Duration::ZERO, 0usize);
    let mut due = Duration::ZERO;
    while due < RUN {
        tokio::time::sleep_until((started + due).into()).await;
        if due >= RUN / 2 && mocks[FAILS_HALFWAY].counters().errors == 0 {
            mocks[FAILS_HALFWAY].set_fault(Some(Fault::Status(500)));
        }
        sent += 1;
        let (svc, t, lat) = (stack.clone(), tally.clone(), latencies.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            let body = ReplayBody::from(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
            let req = http::Request::post("/v1/chat/completions")
                .header("authorization", "Bearer the-callers-key-never-forwarded")
                .body(body)
                .expect("valid request");
            match svc.oneshot(req).await {
                Ok(res) if res.status().is_success() => {
                    t.served.fetch_add(1, Relaxed);
                    let retried = res
                        .extensions()
                        .get::<Attempts>()
                        .is_some_and(|a| a.0.len() > 1);
                    t.retried.fetch_add(u64::from(retried), Relaxed);
                    debug_assert!(res.extensions().get::<Served>().is_some());
                    lat.lock().expect("lock").push(t0.elapsed());
                }
                Ok(res) if res.status() == 429 => _ = t.client_429.fetch_add(1, Relaxed),
                Err(e) if find::<Unavailable>(&*e).is_some() || e.is::<Exhausted>() => {
                    t.turned_away.fetch_add(1, Relaxed);
                }
                other => {
                    eprintln!("unexpected: {:?}", other.map(|r| r.status()));
                    t.errors.fetch_add(1, Relaxed);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
        due += Duration::from_secs_f64(1.0 / (healthy * load(due)));
        if started.elapsed() >= next_report {
            next_report += Duration::from_millis(if live { 250 } else { 2000 });
            drawn = table(&backends, &tally, started.elapsed(), sent, live, drawn);
        }
    }
    while tasks.join_next().await.is_some() {}
    table(&backends, &tally, started.elapsed(), sent, live, drawn);

    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let absorbed: u64 = backends
        .iter()
        .map(|b| b.state().snapshot().counters.throttled)
        .sum();
    let leaks: u64 = mocks.iter().map(|m| m.counters().foreign_credentials).sum();
    let visible = tally.client_429.load(Relaxed)
        + tally.turned_away.load(Relaxed)
        + tally.errors.load(Relaxed);
    println!("\nsummary after {:.1}s", started.elapsed().as_secs_f64());
    println!("  requests                 {sent}");
    println!(
        "  served                   {} ({} after a retry on another backend)",
        tally.served.load(Relaxed),
        tally.retried.load(Relaxed)
    );
    for b in &backends {
        println!(
            "    by {:<21} {}",
            b.name(),
            b.state().snapshot().counters.success
        );
    }
    println!("  client-visible errors    {visible} (expected: 0)");
    println!("  429s absorbed            {absorbed} (sent by backends, never seen by callers)");
    println!(
        "  latency p50 / p99        {:.0} ms / {:.0} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    println!("  caller keys forwarded    {leaks}");
    Ok(())
}

/// Prints the per-backend table; live on a terminal (redrawn in place). Returns lines drawn.
fn table(
    backends: &[Backend],
    t: &Tally,
    at: Duration,
    sent: u64,
    live: bool,
    drawn: usize,
) -> usize {
    let mut out = String::new();
    let done = (at.as_secs_f64() / RUN.as_secs_f64()).min(1.0);
    let bar = "#".repeat((done * 30.0) as usize) + &".".repeat(30 - (done * 30.0) as usize);
    out += &format!(
        "[{bar}] {:>4.1}s  sent {sent:>5}  served {:>5}  429 to callers {:>3}  turned away {:>3}  errors {:>3}\n",
        at.as_secs_f64(),
        t.served.load(Relaxed),
        t.client_429.load(Relaxed),
        t.turned_away.load(Relaxed),
        t.errors.load(Relaxed)
    );
    out += &format!(
        "  {:<20} {:>4} {:>7} {:>6} {:>6} {:>7} {:>9}  {}\n",
        "backend", "tier", "served", "429", "5xx", "failed", "in flight", "state"
    );
    let now = tokio::time::Instant::now();
    for b in backends {
        let s = b.state().snapshot();
        let c = s.counters;
        let state = match s.circuit {
            Circuit::Open { until } if until > now => "circuit open",
            Circuit::Open { .. } | Circuit::HalfOpen => "probing",
            Circuit::Closed if s.unavailable_until.is_some() => "pacing",
            Circuit::Closed => "ready",
        };
        out += &format!(
            "  {:<20} {:>4} {:>7} {:>6} {:>6} {:>7} {:>9}  {state}\n",
            b.name(),
            b.priority(),
            c.success,
            c.throttled,
            c.server_errors,
            c.failures,
            s.in_flight
        );
    }
    let lines = out.lines().count();
    let mut stdout = std::io::stdout().lock();
    if live && drawn > 0 {
        let _ = write!(stdout, "\x1b[{drawn}A");
    }
    let _ = write!(stdout, "{out}");
    let _ = stdout.flush();
    lines
}
