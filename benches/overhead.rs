//! What the whole stack costs beside the bare hyper-util client, against a minimal hyper server
//! in the same process on loopback, at concurrency 1 and 64.
//!
//! Stack: `Fallback` → `RetryAfter429` → `Balance` over 3 backends → per backend
//! `CircuitBreaker` → `Endpoint` → `AttemptTimeout` → `AuthInject` → the same client.
//!
//! Criterion times each; then a side-by-side run prints requests/s of both, the ratio (target
//! >= 0.97) and the time the stack adds per request in microseconds.

mod common;

use std::time::{Duration, Instant};

use common::{Bare, one_bare, one_stack, stack_over};
use criterion::{BenchmarkId, Criterion, Throughput};
use tower_llm_lb::client::http_client;

/// Runs `total` requests with `concurrency` tasks; returns the elapsed time.
async fn run<F, Fut>(total: u64, concurrency: u64, make: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = total.div_ceil(concurrency);
    for _ in 0..concurrency {
        let futs: Vec<Fut> = (0..per_task).map(|_| make()).collect();
        tasks.spawn(async move {
            for f in futs {
                f.await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    start.elapsed()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(common::minimal_server());
    let client: Bare = rt.block_on(async { http_client() });
    let svc = rt.block_on(async { stack_over(addr, client.clone()) });

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    let mut group = c.benchmark_group("overhead");
    for concurrency in [1u64, 64] {
        group.throughput(Throughput::Elements(concurrency));
        group.bench_with_input(
            BenchmarkId::new("bare", concurrency),
            &concurrency,
            |b, &n| {
                b.to_async(&rt).iter_custom(|iters| {
                    let client = client.clone();
                    async move {
                        run(iters * n, n, || {
                            let client = client.clone();
                            async move { one_bare(&client, addr).await }
                        })
                        .await
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("stack", concurrency),
            &concurrency,
            |b, &n| {
                b.to_async(&rt).iter_custom(|iters| {
                    let svc = svc.clone();
                    async move {
                        run(iters * n, n, || {
                            let svc = svc.clone();
                            async move { one_stack(&svc).await }
                        })
                        .await
                    }
                })
            },
        );
    }
    group.finish();

    // Side by side in one run: alternate rounds so drift hits both alike.
    println!("\nside by side (same process, same server, alternating rounds):");
    println!(
        "{:>11} {:>14} {:>14} {:>7} {:>20}",
        "concurrency", "bare req/s", "stack req/s", "ratio", "extra time per req"
    );
    for concurrency in [1u64, 64] {
        let total = if concurrency == 1 { 4_000 } else { 20_000 };
        // Many short alternating rounds; the medians resist the shared machine's noise better
        // than one long run each.
        let (mut bare, mut stacked, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _round in 0..ROUNDS {
            let b = rt.block_on(run(total, concurrency, || {
                let client = client.clone();
                async move { one_bare(&client, addr).await }
            }));
            let s = rt.block_on(run(total, concurrency, || {
                let svc = svc.clone();
                async move { one_stack(&svc).await }
            }));
            let (rb, rs) = (
                total as f64 / b.as_secs_f64(),
                total as f64 / s.as_secs_f64(),
            );
            bare.push(rb);
            stacked.push(rs);
            ratios.push(rs / rb);
        }
        let (rb, rs, ratio) = (median(bare), median(stacked), median(ratios));
        // What the stack adds to each request's share of the run (1 / throughput): at
        // concurrency 1 its latency; at 64 (CPU-bound on 2 cores) about half its CPU time.
        let extra_us = (1.0 / rs - 1.0 / rb) * 1e6;
        println!("{concurrency:>11} {rb:>14.0} {rs:>14.0} {ratio:>7.3} {extra_us:>17.2} us");
    }
    println!(
        "(medians of {ROUNDS} alternating rounds; the ratio is the median of each round's pair)"
    );
}

const ROUNDS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
