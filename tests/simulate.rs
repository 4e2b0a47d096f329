//! The quota simulator gives the same figures every run, and meets its targets on a small
//! scenario.

use std::time::Duration;

use tower_llm_lb::balance::Strategy;
use tower_llm_lb_mock::sim::{Arrivals, Scenario, SimBackend, run};

fn scenario(load: f64, quota_headers: bool) -> Scenario {
    Scenario {
        name: "small".into(),
        backends: vec![
            SimBackend::new("a", 20.0, Duration::from_millis(600)),
            SimBackend::new("b", 20.0, Duration::from_millis(600)),
        ],
        load,
        duration: Duration::from_secs(60),
        arrivals: Arrivals::Steady,
        max_wait: Duration::from_secs(10),
        quota_headers,
        azure_headers: false,
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_scenario_gives_the_same_figures_twice() {
    for strategy in [Strategy::WeightedRandom, Strategy::PowerOfTwo] {
        let s = scenario(1.5, true);
        let a = run(&s, strategy, 7).await.unwrap();
        let b = run(&s, strategy, 7).await.unwrap();
        assert_eq!(a, b, "{strategy:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn below_capacity_everything_is_served_and_above_it_the_quota_is_spent() {
    let under = run(&scenario(0.9, true), Strategy::WeightedRandom, 1)
        .await
        .unwrap();
    assert_eq!(under.client_errors, 0);
    assert_eq!(under.served, under.offered);
    assert_eq!(under.throttled_per_success, 0.0);
    let over = run(&scenario(3.0, true), Strategy::WeightedRandom, 1)
        .await
        .unwrap();
    eprintln!("3x with headers: {over:?}");
    assert!(over.goodput() >= 0.98, "{over:?}");
    // BENCHMARKS.md states 0.015 for 3x with quota headers.
    assert!(over.throttled_per_success <= 0.02, "{over:?}");
}

#[tokio::test(start_paused = true)]
async fn at_low_request_rates_the_learned_pace_keeps_429s_rare() {
    // 2 and 5 requests/s per backend: whole-number quota hints overstate the refill rate by up
    // to a fifth here; pacing at that estimate earned 0.09-0.37 429s per success.
    for rps in [2.0, 5.0] {
        let mut s = scenario(3.0, true);
        s.duration = Duration::from_secs(120);
        for b in &mut s.backends {
            b.rps = rps;
            b.latency = Duration::from_millis(300);
        }
        let r = run(&s, Strategy::WeightedRandom, 3).await.unwrap();
        eprintln!("{rps} req/s: {r:?}");
        assert!(r.goodput() >= 0.98, "{rps}: {r:?}");
        // BENCHMARKS.md states 0.024-0.028 at these rates.
        assert!(r.throttled_per_success <= 0.03, "{rps}: {r:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn without_quota_headers_the_rate_measured_between_429s_paces_the_backends() {
    // Azure PTU style: 429s carry only retry-after-ms. Pacing at the 429s' waits (the time to
    // the next free slot, about half the interval under load) earned 0.4 429s per success.
    let mut s = scenario(1.5, false);
    s.duration = Duration::from_secs(300);
    let r = run(&s, Strategy::WeightedRandom, 5).await.unwrap();
    eprintln!("no headers: {r:?}");
    assert!(r.goodput() >= 0.98, "{r:?}");
    // BENCHMARKS.md states 0.018 without quota headers (0.041 while the pace was probed
    // upward by 0.2% per answer).
    assert!(r.throttled_per_success <= 0.03, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_bad_backend_name_is_an_error_not_a_panic() {
    let mut s = scenario(1.0, true);
    s.backends[0].name = "not a name".into();
    assert!(run(&s, Strategy::RoundRobin, 1).await.is_err());
}
