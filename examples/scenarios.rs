//! The real-load scenario suite: the gateway with a new user's config, over real sockets,
//! against mock backends that throttle like Azure OpenAI. Prints the table and exits non-zero
//! when a target is missed.
//!
//! ```sh
//! cargo run --release --example scenarios            # S1-S5
//! cargo run --release --example scenarios -- S1 S3   # some of them
//! ```

use tower_llm_lb::mock::scenario::{self, Scenario, TABLE_HEADER};

#[tokio::main]
async fn main() -> Result<(), tower_llm_lb::BoxError> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(name));
    let mut missed = Vec::new();
    println!("{TABLE_HEADER}");
    for s in Scenario::suite() {
        if !wanted(s.name) {
            continue;
        }
        let report = s.run().await?;
        println!("{report}");
        missed.extend(report.missed());
    }
    if wanted("S5") {
        let (direct, via) = scenario::overhead(4000, 16).await?;
        let ratio = via / direct;
        println!(
            "| S5 overhead | direct {direct:.0} req/s, gateway {via:.0} req/s: {ratio:.2}x | 16 in flight, 1 zero-latency backend |"
        );
        if ratio < 0.8 {
            missed.push(format!("S5: gateway {ratio:.2}x direct < 0.8"));
        }
    }
    if missed.is_empty() {
        println!("\nevery target met");
        Ok(())
    } else {
        println!("\nmissed:");
        for m in &missed {
            println!("- {m}");
        }
        std::process::exit(1);
    }
}
