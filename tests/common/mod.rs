//! Helpers shared by the integration tests: a per-backend stack over a real hyper-util client.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceBuilder;
use tower_llm_lb::Backend;
use tower_llm_lb::auth::{AuthInject, AuthInjectLayer};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{Endpoint, EndpointLayer};

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

/// A `tracing` writer that keeps everything written, to check logs for secrets.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    /// Captures every event of this thread, at all levels, until the guard is dropped.
    ///
    /// tracing caches each callsite's interest process-wide, computed on the thread that first
    /// reaches it: a sibling test without a subscriber would cache "never" and blind this
    /// capture (it failed a CI run that way). A global [`Anchor`] that is interested
    /// "sometimes" in every callsite makes each event ask the current thread's subscriber.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        static ANCHOR: std::sync::Once = std::sync::Once::new();
        ANCHOR.call_once(|| {
            let _ = tracing::subscriber::set_global_default(Anchor);
        });
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(self.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
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
    .rng(tower_llm_lb::rng::Rng::seeded(7))
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
        AttemptTimeoutLayer::new(),
        retry,
    ))
}

/// The process-wide default subscriber of a test binary that captures logs: records nothing,
/// but keeps every callsite's interest at "sometimes" (see [`Captured::install`]).
pub struct Anchor;

impl tracing::Subscriber for Anchor {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The README's first JSON block after `marker`.
pub fn readme_json_after(marker: &str) -> &'static str {
    let readme = include_str!("../../README.md");
    let from = readme.find(marker).expect("the marker is in the README");
    let start = from + readme[from..].find("```json\n").expect("a JSON block") + "```json\n".len();
    &readme[start..start + readme[start..].find("```").unwrap()]
}
