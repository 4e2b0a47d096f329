//! A fixed number of requests through the bare client, the recommended group or the full stack
//! (group under a `Fallback`), on a current-thread runtime, for counting instructions with
//! valgrind (exact and repeatable, unlike wall time on a shared machine):
//!
//! ```sh
//! cargo bench --bench instructions --no-run          # prints the executable's path
//! valgrind --tool=callgrind <path> bare 5000
//! valgrind --tool=callgrind <path> stack 5000
//! ```
//!
//! The difference of the two totals divided by 5 000 is what the stack adds per request.
//! `cargo bench` runs each mode once (2 000 requests) and prints microseconds per request.

mod common;

use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_llm_lb::Backend;
use tower_llm_lb::auth::Credential;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::fallback::Fallback;
use tower_llm_lb::stack::{self, LlmService, Settings};

type Bare = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ReplayBody,
>;

const REQ_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

async fn one(mode: &str, client: &Bare, svc: &LlmService, addr: std::net::SocketAddr) {
    if mode == "bare" {
        let req = http::Request::post(format!(
            "http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        ))
        .header("api-key", "bench-key")
        .body(ReplayBody::from(REQ_BODY))
        .unwrap();
        let res = client.request(req).await.unwrap();
        res.into_body().collect().await.unwrap();
    } else {
        let req = http::Request::post("/v1/chat/completions")
            .body(ReplayBody::from(REQ_BODY))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
}

fn run(mode: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let addr = common::minimal_server().await;
        let client: Bare = http_client();
        let backends = (0..3).map(|i| {
            Backend::azure(
                format!("b{i}"),
                format!("http://{addr}"),
                "gpt-4o",
                "2024-10-21",
            )
            .credential(Credential::api_key("bench-key").unwrap())
            .build()
            .unwrap()
        });
        let group = stack::group("bench", backends, client.clone(), &Settings::default()).unwrap();
        let svc = match mode {
            "stack" => LlmService::new(
                Fallback::builder("chain")
                    .target("group", group)
                    .build()
                    .unwrap(),
            ),
            _ => group,
        };
        let start = std::time::Instant::now();
        for _ in 0..n {
            one(mode, &client, &svc, addr).await;
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
        (Some(mode @ ("bare" | "group" | "stack")), n) => {
            run(mode, n.and_then(|n| n.parse().ok()).unwrap_or(5000))
        }
        _ => {
            for mode in ["bare", "group", "stack"] {
                run(mode, 2000);
            }
        }
    }
}
