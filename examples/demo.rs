//! The whole point in one run, no credentials needed: embedded mock backends with their own keys
//! and rate limits, each behind the per-backend layers (`Endpoint` + `AuthInject`), and a few
//! hundred requests spread over them. Prints what each backend served and how the 429s were
//! absorbed by cooling backends down.
//!
//! Run: `cargo run --release --example demo`

use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::auth::{AuthInject, AuthInjectLayer, Credential};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{Endpoint, EndpointLayer, Served};
use tower_llm_lb::mock::MockServer;
use tower_llm_lb::{Backend, BoxError};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ReplayBody,
>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Three simulated backends: a provisioned (PTU) Azure deployment, a pay-as-you-go Azure
    // region and an OpenAI org, each with its own key and request/s limit.
    let ptu = MockServer::builder()
        .name("ptu-eastus")
        .api_key("ptu-key")
        .rps(40.0)
        .start()
        .await?;
    let paygo = MockServer::builder()
        .name("paygo-westus")
        .api_key("west-key")
        .rps(20.0)
        .start()
        .await?;
    let openai = MockServer::builder()
        .name("openai")
        .bearer("sk-demo")
        .rps(10.0)
        .start()
        .await?;

    let backends = [
        Backend::azure("ptu-eastus", ptu.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("ptu-key")?)
            .build()?,
        Backend::azure("paygo-westus", paygo.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("west-key")?)
            .build()?,
        Backend::openai("openai", format!("{}/v1", openai.url()))
            .credential(Credential::bearer("sk-demo")?)
            .priority(1)
            .build()?,
    ];
    let client: Client = http_client();
    let stacks: Vec<Endpoint<AuthInject<Client>>> = backends
        .iter()
        .map(|b| {
            ServiceBuilder::new()
                .layer(EndpointLayer::new(b.clone()))
                .layer(AuthInjectLayer::for_backend(b))
                .service(client.clone())
        })
        .collect();

    println!("tower-llm-lb demo: 3 mock backends on loopback, 600 requests at ~120/s\n");
    let started = std::time::Instant::now();
    let mut served = [0u32; 3];
    let mut rejected_locally = 0u32;
    let mut next = 0usize;
    let mut ticker = tokio::time::interval(Duration::from_millis(25));
    for _round in 0..200 {
        ticker.tick().await;
        for _ in 0..3 {
            // Routing for now: round robin over the best priority tier with a backend that is not
            // cooling down (Balance will own this).
            let now = tokio::time::Instant::now();
            let best = backends
                .iter()
                .filter(|b| b.state().is_available(now))
                .map(|b| b.priority())
                .min();
            let Some(tier) = best else {
                rejected_locally += 1;
                continue;
            };
            let pick = (0..3)
                .map(|i| (next + i) % 3)
                .find(|&i| backends[i].priority() == tier && backends[i].state().is_available(now))
                .unwrap_or(0);
            next = pick + 1;
            let req = http::Request::post("/v1/chat/completions")
                .header("authorization", "Bearer the-callers-key-never-forwarded")
                .body(ReplayBody::from(
                    r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                ))?;
            let res = stacks[pick].clone().oneshot(req).await?;
            let who = res
                .extensions()
                .get::<Served>()
                .map(|s| s.backend.name().to_string());
            if res.status().is_success() {
                served[pick] += 1;
            }
            let _ = who;
        }
    }

    println!(
        "{:<14} {:>6} {:>8} {:>10} {:>8}",
        "backend", "tier", "served", "429s seen", "leaks"
    );
    for (b, mock) in backends.iter().zip([&ptu, &paygo, &openai]) {
        let c = b.state().counters();
        let m = mock.counters();
        println!(
            "{:<14} {:>6} {:>8} {:>10} {:>8}",
            b.name(),
            b.priority(),
            c.success,
            c.throttled,
            m.foreign_credentials
        );
    }
    let total: u32 = served.iter().sum();
    println!(
        "\n{total} served, {rejected_locally} held back while every backend cooled down, in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "caller credentials forwarded to any backend: {}",
        ptu.counters().foreign_credentials
            + paygo.counters().foreign_credentials
            + openai.counters().foreign_credentials
    );
    Ok(())
}
