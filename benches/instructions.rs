//! A fixed number of requests through the bare client, the flat stack of the README's first
//! example (`flat`), the recommended group (`stack::group`) or the full stack (group under a
//! `Fallback`), on a current-thread runtime, for counting instructions with
//! valgrind (exact and repeatable, unlike wall time on a shared machine):
//!
//! ```sh
//! cargo bench --bench instructions --no-run          # prints the executable's path
//! valgrind --tool=callgrind <path> bare 5000
//! valgrind --tool=callgrind <path> flat 5000          # cloned per request, `oneshot`
//! valgrind --tool=callgrind <path> flat-owned 5000    # one owner: `ready().await`, `call`
//! valgrind --tool=callgrind <path> stack 5000
//! ```
//!
//! The difference of the two totals divided by 5 000 is what the stack adds per request.
//! `cargo bench` runs each mode once (2 000 requests) and prints microseconds per request.

mod common;

use common::{
    Bare, flat_over, group_over, one_bare, one_owned, one_stack, one_through, stack_over,
};
use tower_llm_lb::client::http_client;

fn run(mode: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let addr = common::minimal_server().await;
        let client: Bare = http_client();
        let svc = match mode {
            "stack" => stack_over(addr, client.clone()),
            _ => group_over(addr, client.clone()),
        };
        let mut flat = flat_over(addr, client.clone());
        let start = std::time::Instant::now();
        for _ in 0..n {
            match mode {
                "bare" => one_bare(&client, addr).await,
                "flat" => one_through(&flat).await,
                "flat-owned" => one_owned(&mut flat).await,
                _ => one_stack(&svc).await,
            }
        }
        println!(
            "{mode:>6}: {n} requests, {:.2} us per request",
            start.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    });
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match (args.first().map(String::as_str), args.get(1)) {
        (Some(mode @ ("bare" | "flat" | "flat-owned" | "group" | "stack")), n) => {
            run(mode, n.and_then(|n| n.parse().ok()).unwrap_or(5000))
        }
        _ => {
            for mode in ["bare", "flat", "flat-owned", "group", "stack"] {
                run(mode, 2000);
            }
        }
    }
}
