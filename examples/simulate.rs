//! A quota simulator: how much of the backends' quota the stack turns into answers, per scenario
//! and strategy, in virtual time (tokio's paused clock, in-process backends, no sockets). Every
//! run gives the same figures.
//!
//! Run: `cargo run --release --example simulate` (add `-- --minutes N` to change the length).

use std::time::{Duration, Instant};

use tower_llm_lb::balance::Strategy;
use tower_llm_lb_mock::sim::{Arrivals, Scenario, SimBackend, run};

fn regions(latency: Duration) -> Vec<SimBackend> {
    ["eastus", "westus", "swedencentral"]
        .iter()
        .map(|n| SimBackend::new(n, 20.0, latency))
        .collect()
}

fn scenarios(minutes: u64) -> Vec<Scenario> {
    let duration = Duration::from_secs(minutes * 60);
    let latency = Duration::from_millis(600);
    let base = |name: &str, load: f64| Scenario {
        name: name.into(),
        backends: regions(latency),
        load,
        duration,
        arrivals: Arrivals::Steady,
        max_wait: Duration::from_secs(30),
        quota_headers: true,
        azure_headers: false,
    };
    let mut ptu = base("ptu + paygo 1.5x", 1.5);
    ptu.backends[0].name = "ptu".into();
    ptu.backends[0].rps = 40.0;
    for b in &mut ptu.backends[1..] {
        b.priority = 1;
    }
    let mut failing = base("one fails halfway 0.9x", 0.9);
    failing.backends[2].fails_at = Some(duration / 2);
    let mut bursty = base("bursty 0.9x", 0.9);
    bursty.arrivals = Arrivals::Bursty {
        on: Duration::from_secs(10),
        off: Duration::from_secs(10),
    };
    let mut no_hints = base("no quota headers 1.5x", 1.5);
    no_hints.quota_headers = false;
    let mut azure = base("azure headers 1.5x", 1.5);
    azure.azure_headers = true;
    vec![
        base("steady 0.5x", 0.5),
        base("steady 0.9x", 0.9),
        base("steady 1.5x", 1.5),
        base("steady 3x", 3.0),
        ptu,
        failing,
        bursty,
        no_hints,
        azure,
    ]
}

fn main() {
    let minutes = std::env::args()
        .skip_while(|a| a != "--minutes")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(60);
    let strategies = [
        Strategy::LatencyAware,
        Strategy::WeightedRandom,
        Strategy::RoundRobin,
        Strategy::LeastInFlight,
        Strategy::PowerOfTwo,
    ];
    println!(
        "quota simulator: 3 deployments x 20 req/s (3600 req/min in all), 600 ms answers, {minutes} min of virtual time each\n"
    );
    println!(
        "{:<24} {:<15} {:>8} {:>8} {:>9} {:>9} {:>7} {:>8} {:>8}",
        "scenario", "strategy", "offered", "served", "goodput", "429/succ", "errors", "p50", "p99"
    );
    let wall = Instant::now();
    for scenario in scenarios(minutes) {
        for strategy in strategies {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .expect("runtime");
            let r = match rt.block_on(run(&scenario, strategy, 42)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{}: {e}", scenario.name);
                    std::process::exit(1);
                }
            };
            println!(
                "{:<24} {:<15} {:>8} {:>8} {:>8.1}% {:>9.3} {:>7} {:>6.0}ms {:>6.0}ms",
                scenario.name,
                format!("{strategy:?}"),
                r.offered,
                r.served,
                r.goodput() * 100.0,
                r.throttled_per_success,
                r.client_errors,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3
            );
        }
    }
    println!("\n{:.1} s of wall time", wall.elapsed().as_secs_f64());
}
