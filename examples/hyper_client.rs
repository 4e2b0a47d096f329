//! The five layers stacked by hand over an existing hyper-util client, in a custom order, against
//! two embedded mock backends (no credentials needed).
//!
//! Run: `cargo run --example hyper_client`

use std::time::Duration;

use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::{Balance, Strategy};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::endpoint::{EndpointLayer, Served};
use tower_llm_lb::fallback::{Fallback, Overrides};
use tower_llm_lb::mock::MockServer;
use tower_llm_lb::retry::{Attempts, RetryAfter429Layer};
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb::{Backend, BoxError};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let east = MockServer::builder()
        .name("east")
        .api_key("k-east")
        .rps(2.0)
        .start()
        .await?;
    let west = MockServer::builder()
        .name("west")
        .api_key("k-west")
        .start()
        .await?;

    // Your existing client: any hyper-util legacy client works.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http::<ReplayBody>();

    let backends = [
        Backend::azure("east", east.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("k-east")?)
            .build()?,
        Backend::azure("west", west.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("k-west")?)
            .priority(1)
            .build()?,
    ];
    let breakers = BreakerGroup::try_new(Policy::default())?;
    let balance = Balance::from_backends(backends, |b| {
        ServiceBuilder::new()
            .layer(breakers.layer_for(b)) // stop sending to a failing backend
            .layer(EndpointLayer::new(b.clone())) // route, classify, cool down after 429
            .layer(AttemptTimeoutLayer::new().first_byte(Duration::from_secs(20)))
            .layer(AuthInjectLayer::for_backend(b)) // this backend's key only
            .service(client.clone())
    })
    .strategy(Strategy::RoundRobin)
    .build()?;
    let group = ServiceBuilder::new()
        .layer(RetryAfter429Layer::new().max_wait(Duration::from_secs(2)))
        .service(balance);
    let svc = Fallback::builder("chat")
        .target_with("gpt-4o", group, Overrides::new().set("max_tokens", 256))
        .build()?;

    for i in 0..6 {
        let req = http::Request::post("/v1/chat/completions").body(ReplayBody::from(
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ))?;
        let res = svc.clone().oneshot(req).await?;
        let who = res
            .extensions()
            .get::<Served>()
            .map(|s| s.backend.name().to_string());
        let tries = res.extensions().get::<Attempts>().map_or(0, |a| a.0.len());
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "request {i}: {status} from {who:?} after {tries} attempt(s), {} bytes",
            body.len()
        );
    }
    Ok(())
}
