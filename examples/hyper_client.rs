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
use tower_llm_lb::retry::{Attempts, RetryAfter429Layer};
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::MockServer;

async fn backend(name: &str, tier: u32) -> Result<(MockServer, Backend), BoxError> {
    let mock = MockServer::builder().name(name).api_key(name).rps(2.0);
    let mock = mock.start().await?;
    let b = Backend::azure(name, mock.url(), "gpt-4o", "2024-10-21");
    Ok((
        mock,
        b.credential(Credential::api_key(name)?)
            .priority(tier)
            .build()?,
    ))
}

/// Each request's status, the backend that answered, and its attempts; then every body the
/// backends received.
type Seen = (
    Vec<(http::StatusCode, Option<String>, usize)>,
    Vec<serde_json::Value>,
);

async fn run() -> Result<Seen, BoxError> {
    let ((east_mock, east), (west_mock, west)) =
        (backend("east", 0).await?, backend("west", 1).await?);

    // Your existing client: any hyper-util legacy client.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http::<ReplayBody>();

    let breakers = BreakerGroup::try_new(Policy::default())?;
    let balance = Balance::from_backends([east, west], |b| {
        ServiceBuilder::new()
            .layer(breakers.layer_for(b)) // stop sending to a failing backend
            .layer(EndpointLayer::new(b.clone())) // route, classify, cool down after 429
            .layer(AttemptTimeoutLayer {
                first_byte: Some(Duration::from_secs(20)),
                ..Default::default()
            })
            .layer(AuthInjectLayer::for_backend(b)) // this backend's key only
            .service(client.clone())
    })
    .strategy(Strategy::RoundRobin)
    .build()?;
    let group = ServiceBuilder::new()
        .layer(RetryAfter429Layer {
            max_wait: Duration::from_secs(2),
            ..Default::default()
        })
        .service(balance);
    let svc = Fallback::builder("chat")
        .target_with("gpt-4o", group, Overrides::default().set("max_tokens", 256))
        .build()?;

    let mut seen = Vec::new();
    for i in 0..6 {
        let body = ReplayBody::from(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        let req = http::Request::post("/v1/chat/completions").body(body)?;
        let res = svc.clone().oneshot(req).await?;
        let who = res
            .extensions()
            .get::<Served>()
            .map(|s| s.backend.name().to_string());
        let tries = res.extensions().get::<Attempts>().map_or(0, |a| a.0.len());
        let (status, len) = (
            res.status(),
            res.into_body().collect().await?.to_bytes().len(),
        );
        println!("request {i}: {status} from {who:?}, {tries} attempt(s), {len} bytes");
        seen.push((status, who, tries));
    }
    let bodies = [east_mock, west_mock]
        .iter()
        .flat_map(|m| m.requests())
        .map(|r| serde_json::from_slice(&r.body))
        .collect::<Result<_, _>>()?;
    Ok((seen, bodies))
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await.map(|_| ())
}

#[cfg(test)]
#[tokio::test(start_paused = true)]
async fn the_example_runs() {
    let (seen, bodies) = run().await.unwrap();
    // Every request answered; tier 0 (east) first, west only once east is used up.
    assert!(
        seen.iter().all(|(s, who, _)| *s == 200 && who.is_some()),
        "{seen:?}"
    );
    assert_eq!(seen[0].1.as_deref(), Some("east"), "{seen:?}");
    // The target's override reached every backend.
    assert!(bodies.iter().all(|b| b["max_tokens"] == 256), "{bodies:?}");
}
