//! Tower middleware that spreads LLM API calls over many endpoints and keeps working when they
//! throttle or fail.
//!
//! Every Azure OpenAI deployment, OpenAI organisation and Anthropic key has a quota; past it the
//! service answers 429 with a `retry-after`. `tower-llm-lb` gives any hyper-based client (or an
//! axum / tonic app) composable [`Layer`](tower_layer::Layer)s that absorb that:
//!
//! | layer | what it does |
//! |---|---|
//! | [`fallback::Fallback`] | an ordered chain of targets (deployments, models, providers, groups) with per-target JSON overrides, one deadline, attribution |
//! | [`balance::Balance`] / [`balance::BalanceLayer`] | spreads requests over backends by priority tier, load and weight, skipping ones cooling down, open or silent; spends each backend's remaining quota then paces it (requests and tokens); as a layer, one client serves every backend |
//! | [`retry::RetryAfter429`] | absorbs 429s: retries elsewhere at once, waits for the earliest free backend only within a budget and deadline, else answers with an honest `retry-after` |
//! | [`circuit_breaker::CircuitBreaker`] | per backend: stops sending to a failing backend, probes it back, never ejects more than a share of a group |
//! | [`auth::AuthInject`] | per backend: strips the caller's credentials, injects the backend's own (`api-key`, bearer, refreshed token) |
//! | [`endpoint::Endpoint`] | per backend: points the request at it, classifies the answer once, records cooldowns and quota hints in the backend's [`BackendState`] |
//! | [`translate::Translate`] | per backend: an OpenAI chat request for an Anthropic backend (and an Anthropic messages request for an OpenAI one) goes out in the backend's API and its answer, stream or error comes back in the caller's |
//! | [`timeout::AttemptTimeout`] | per backend: first-byte, idle and total limits per attempt |
//! | [`body::BufferRequest`] | once, outermost: makes the request body cheap to replay, with a size cap |
//! | [`shared::SharedState`] | beside the stack, not a layer: replicas share what they learn about each backend (waits, open circuits, their share of its quota) through a store, off the request path |
//!
//! All of them share one [`classify::Outcome`] per attempt and one [`BackendState`] per
//! backend (read it through a [`Snapshot`]). The layers import only the crate's core vocabulary,
//! never each other; the repository's `ARCHITECTURE.md` maps it. [`stack::group`] builds the recommended per-group stack over your client and boxes it
//! as one [`stack::LlmService`] type.
//!
//! # Recommended order
//!
//! Outermost first: `BufferRequest` → `Fallback` → `RetryAfter429` → `Balance` → per backend:
//! `CircuitBreaker` → `Translate` → `Endpoint` → `AttemptTimeout` → `AuthInject` → the HTTP
//! client.
//!
//! The breaker sits above `Endpoint` so it sees each attempt's classified outcome; the timeout
//! sits below it so a timeout is classified as one. `Translate` sits just above `Endpoint`, so
//! the backend's own answer is classified (Anthropic's `529` is throttling) and everything
//! above the pick stays provider-neutral.
//!
//! Other orders work too, with the meanings the README's "Layer order" table gives (retries
//! below the `Balance` stay on the chosen backend and wait out its `retry-after`; a single
//! backend without a `Balance` is never sent a request during its `retry-after`). A layer that
//! cannot do its job where it is refuses without sending: a layer for the chosen backend above
//! the `BalanceLayer` with [`error::NoBackendChosen`], one backend's credential above the pick
//! with [`error::CredentialMisplaced`].

//! # Example
//!
//! One Azure deployment behind the per-backend layers, over a plain hyper-util client:
//!
//! ```
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_llm_lb::{Backend, auth::{AuthInjectLayer, Credential}, body::ReplayBody,
//!                    endpoint::{EndpointLayer, Served}, client::http_client};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! # let mock = tower_llm_lb_mock::MockServer::builder().api_key("key-1").start().await?;
//! # let url = mock.url();
//! let backend = Backend::azure("eastus", url, "gpt-4o", "2024-10-21")
//!     .credential(Credential::api_key("key-1")?)
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(EndpointLayer::new(backend.clone()))
//!     .layer(AuthInjectLayer::for_backend(&backend))
//!     .service(http_client::<ReplayBody>());
//!
//! let req = http::Request::post("/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(ReplayBody::from(r#"{"messages":[{"role":"user","content":"hi"}]}"#))?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.extensions().get::<Served>().unwrap().backend.name(), "eastus");
//! let body = res.into_body().collect().await?.to_bytes();
//! assert!(body.starts_with(b"{"));
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `rustls` | yes | [`client::https_client`]: hyper-util + rustls (ring), webpki or native roots; [`client::https_client_with`] for your own rustls config (private roots, client certificates) |
//! | `redis` | no | `shared::RedisStore`: replicas share backend waits, open circuits and their quota shares through Redis (or a Redis Cluster) |
//!
//! gRPC needs no feature: [`Backend::grpc`], [`client::grpc_client`] and [`classify::grpc`]
//! put the same layers under a tonic client.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod attempt;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod body;
mod boxed;
pub mod circuit_breaker;
pub mod classify;
pub mod client;
mod credential;
pub mod endpoint;
pub mod error;
pub mod fallback;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
mod outcome;
pub mod provider;
mod ready;
pub mod retry;
mod rng;
pub mod shared;
pub mod stack;
mod state;
pub mod timeout;
pub mod translate;
mod waitlist;

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
struct ReadmeDoctests;

pub use backend::Backend;
pub use error::BoxError;
pub use outcome::Outcome;
pub use rng::Rng;
pub use state::{BackendState, Circuit, Counters, Quota, Snapshot};
