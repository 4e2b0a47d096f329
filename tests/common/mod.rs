//! Helpers shared by the integration tests: a per-backend stack over a real hyper-util client.

#![allow(dead_code)]

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceBuilder;
use tower_llm_lb::Backend;
use tower_llm_lb::auth::{AuthInject, AuthInjectLayer};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{Endpoint, EndpointLayer};
/// The test kit's log capture, under the name these tests use.
#[allow(unused_imports)]
pub use tower_llm_lb_mock::CapturedLogs as Captured;

pub type Stack = Endpoint<AuthInject<Client<HttpConnector, ReplayBody>>>;

/// The per-backend layers over a fresh hyper-util client.
pub fn stack(backend: &Backend) -> Stack {
    stack_with(EndpointLayer::new(backend.clone()), backend)
}

pub fn stack_with(endpoint: EndpointLayer, backend: &Backend) -> Stack {
    ServiceBuilder::new()
        .layer(endpoint)
        .layer(AuthInjectLayer::for_backend(backend))
        .service(http_client())
}

pub fn chat(body: &'static str) -> http::Request<ReplayBody> {
    http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(body))
        .unwrap()
}

pub async fn body_string<B>(res: http::Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

use tower_llm_lb::balance::Balance;
use tower_llm_lb::retry::{RetryAfter429, RetryAfter429Layer};

pub type Balanced = Balance<Stack>;

/// `RetryAfter429` over `Balance` over per-backend stacks sharing one client.
pub fn balanced(
    backends: &[Backend],
    strategy: tower_llm_lb::balance::Strategy,
    retry: RetryAfter429Layer,
) -> RetryAfter429<Balanced> {
    let client: Client<HttpConnector, ReplayBody> = http_client();
    let balance = Balance::from_backends(backends.iter().cloned(), |b| {
        ServiceBuilder::new()
            .layer(EndpointLayer::new(b.clone()))
            .layer(AuthInjectLayer::for_backend(b))
            .service(client.clone())
    })
    .strategy(strategy)
    .rng(tower_llm_lb::Rng::seeded(7))
    .build()
    .unwrap();
    tower::Layer::layer(&retry, balance)
}

use tower_llm_lb::auth::AuthInject as Auth;
use tower_llm_lb::circuit_breaker::{BreakerGroup, CircuitBreaker};
use tower_llm_lb::timeout::{AttemptTimeout, AttemptTimeoutLayer};

pub type Guarded =
    CircuitBreaker<Endpoint<AttemptTimeout<Auth<Client<HttpConnector, ReplayBody>>>>>;

/// The full per-backend stack: breaker, endpoint, attempt timeouts, auth, client.
pub fn guarded(
    backend: &Backend,
    group: &BreakerGroup,
    timeouts: AttemptTimeoutLayer,
    client: &Client<HttpConnector, ReplayBody>,
) -> Guarded {
    ServiceBuilder::new()
        .layer(group.layer_for(backend))
        .layer(EndpointLayer::new(backend.clone()))
        .layer(timeouts)
        .layer(AuthInjectLayer::for_backend(backend))
        .service(client.clone())
}

/// `RetryAfter429` over `Balance` over full per-backend stacks.
pub fn guarded_group(
    backends: &[Backend],
    group: &BreakerGroup,
    timeouts: AttemptTimeoutLayer,
    retry: RetryAfter429Layer,
) -> RetryAfter429<Balance<Guarded>> {
    let client: Client<HttpConnector, ReplayBody> = http_client();
    let balance = Balance::from_backends(backends.iter().cloned(), |b| {
        guarded(b, group, timeouts, &client)
    })
    .strategy(tower_llm_lb::balance::Strategy::RoundRobin)
    .build()
    .unwrap();
    tower::Layer::layer(&retry, balance)
}

/// A backend whose port refuses connections, reserved for the rest of the test process (so
/// no server of a parallel test can take it).
pub fn refusing(name: &str) -> Backend {
    let port: &'static tower_llm_lb_mock::RefusingPort =
        Box::leak(Box::new(tower_llm_lb_mock::RefusingPort::new().unwrap()));
    Backend::openai(name, format!("{}/v1", port.url()))
        .build()
        .unwrap()
}

use tower_llm_lb::body::ResponseBody;
use tower_llm_lb::fallback::BoxTarget;
use tower_llm_lb::timeout::TimeoutBody;

/// The response body of a full per-backend stack.
pub type FullBody = ResponseBody<TimeoutBody<hyper::body::Incoming>>;

/// `RetryAfter429` over `Balance` over full stacks, boxed as a fallback target.
pub fn group_target(backends: &[Backend], retry: RetryAfter429Layer) -> BoxTarget<FullBody> {
    let group = BreakerGroup::try_new(tower_llm_lb::circuit_breaker::Policy::default()).unwrap();
    BoxTarget::new(guarded_group(
        backends,
        &group,
        AttemptTimeoutLayer::default(),
        retry,
    ))
}

/// The README's first JSON block after `marker`.
pub fn readme_json_after(marker: &str) -> &'static str {
    let readme = include_str!("../../README.md");
    let from = readme.find(marker).expect("the marker is in the README");
    let start = from + readme[from..].find("```json\n").expect("a JSON block") + "```json\n".len();
    &readme[start..start + readme[start..].find("```").unwrap()]
}
