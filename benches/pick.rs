//! How much picking a backend costs as the group grows (3 to 3000 backends), and under
//! concurrent use of one shared `Balance` (1, 16, 256 tasks): no lock, so no contention cliff.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use tower_llm_lb::Backend;
use tower_llm_lb::balance::{Balance, Strategy};

fn group(n: usize, strategy: Strategy) -> Balance<()> {
    let mut b = Balance::builder()
        .strategy(strategy)
        .rng(tower_llm_lb::Rng::seeded(1));
    for i in 0..n {
        let backend = Backend::openai(format!("b{i}"), "http://127.0.0.1:1/v1")
            .priority((i % 3) as u32)
            .weight(1.0 + (i % 5) as f64)
            .build()
            .unwrap();
        b = b.backend(backend, ());
    }
    b.build().unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    let mut g = c.benchmark_group("pick");
    for strategy in [
        Strategy::WeightedRandom,
        Strategy::RoundRobin,
        Strategy::LeastInFlight,
        Strategy::PowerOfTwo,
    ] {
        for n in [3usize, 30, 300, 3000] {
            let balance = group(n, strategy);
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(BenchmarkId::new(format!("{strategy:?}"), n), &n, |b, _| {
                b.iter(|| {
                    let now = tokio::time::Instant::now();
                    std::hint::black_box(balance.pick(now).is_ok())
                })
            });
        }
    }
    g.finish();

    println!("\nshared Balance (30 backends, weighted random), picks per second by task count:");
    let balance = group(30, Strategy::WeightedRandom);
    for tasks in [1usize, 16, 256] {
        let per_task = 200_000 / tasks;
        let start = Instant::now();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..tasks {
                let b = balance.clone();
                set.spawn(async move {
                    for _ in 0..per_task {
                        std::hint::black_box(b.pick(tokio::time::Instant::now()).is_ok());
                    }
                });
            }
            while set.join_next().await.is_some() {}
        });
        let rate = (per_task * tasks) as f64 / start.elapsed().as_secs_f64();
        println!(
            "{tasks:>5} tasks: {rate:>12.0} picks/s ({:.0} ns per pick)",
            1e9 / rate
        );
    }
}
