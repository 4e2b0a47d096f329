//! The soak at full size: 1,000,000 requests (or the count given) through the recommended
//! stack with every default, over three loopback mocks whose faults change every 25 requests,
//! on tokio's paused clock. Prints the figures; exits 1 when a request did not end exactly
//! once, a task, connection or in-flight count leaked, or resident memory grew by more than
//! 64 MiB after the first tenth of the run.
//!
//! ```sh
//! cargo run --release --example soak            # 1,000,000 requests
//! cargo run --release --example soak -- 100000
//! ```

use tower_llm_lb_mock::soak::Soak;

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let requests = std::env::args()
        .nth(1)
        .map(|n| n.replace('_', "").parse().expect("a request count"))
        .unwrap_or(1_000_000);
    let soak = Soak {
        requests,
        samples: 20,
        ..Soak::default()
    };
    let report = match soak.run().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("the soak could not run: {e}");
            std::process::exit(2);
        }
    };
    println!("{report}");
    let mut problems = report.problems();
    if let Some(growth) = report.rss_growth_kib() {
        println!(
            "resident memory growth after the first tenth: {} KiB",
            growth
        );
        if growth > 64 * 1024 {
            problems.push(format!("resident memory grew {} MiB", growth / 1024));
        }
    }
    if !problems.is_empty() {
        eprintln!("FAILED: {}", problems.join("; "));
        std::process::exit(1);
    }
    println!("ok: every request ended exactly once, nothing leaked");
}
