//! The OpenAI-compatible gateway built on [`tower_llm_lb`]: any OpenAI (or Anthropic) SDK points
//! its base URL here and its calls are spread over the configured backends. The crate builds the
//! `tower-llm-lb` binary (`cargo install --path gateway`; [`cli`]); as a library it gives the
//! [`Gateway`] (an axum `Router` over a stack) and [`response_for`] to mount a stack in your own
//! axum app.
//!
//! | route | what it does |
//! |---|---|
//! | every route under `/v1/` of the OpenAI and Anthropic APIs, any method (`/v1/chat/completions`, `/v1/responses`, `/v1/embeddings`, `/v1/moderations`, `/v1/audio/...`, `/v1/images/...`, `/v1/files/...`, `/v1/batches/...`, `/v1/messages`, `/v1/messages/count_tokens`, ...) | forwards through the stack to a backend whose provider serves the route (as it is, or translated: chat completions and messages); streamed and binary answers pass through unbuffered. A route no backend of the group serves is refused before sending: `404 route_not_served`, naming the kinds of backend that serve it, in the caller's API shape |
//! | `GET /health` | `200 {"status":"ok"}`; `503 {"status":"draining"}` once shutdown began ([`Gateway::serve`]) |
//! | `GET /v1/models` | the models the backends declared (config `models`), OpenAI's list format; with none declared, forwarded to a backend |
//! | `GET /stats` | per backend: requests, 2xx, 429, 5xx, failures, in flight, circuit, cooling until, last health probe, tokens |
//! | `GET /metrics` | Prometheus text format: requests by route, status and client; time to head; tokens by backend, model and client; retries, waits, each attempt's time; per backend attempts by outcome, in flight, circuit, cooldown, latency |
//! | `GET /`, `/ui` | a self-contained live page over `/stats` (a client key in the fragment: `#key=...`) |
//!
//! A request whose `model` is one of `gateway.model_aliases` is sent as the model it names.
//! [`Gateway::replace`] swaps the stack, backends, keys and aliases of a running gateway (the
//! binary reloads its config on `SIGHUP` and when the file changes); requests under way finish
//! on what they started with.
//!
//! Every request gets an `x-request-id` (the caller's, or a new UUID) that goes to the backend
//! on every attempt and comes back in the answer (tower-http's request-id layers).
//!
//! Callers' credentials never reach a backend (each backend's `AuthInject` replaces them). The
//! gateway's own client keys (`gateway.client_keys`, sent as `Authorization: Bearer`,
//! `api-key`, or `x-api-key` as Anthropic's SDKs do) are required; with none configured, only loopback clients are served.
//!
//! | outcome | answer |
//! |---|---|
//! | a backend answered | its status, headers and body, plus `x-llm-lb-backend`, `x-llm-lb-attempts` (each attempt's backend and outcome: `east=throttled, west=success`) and `x-llm-lb-attempt-count` (how many attempts were sent: `2`) |
//! | a backend answered an error whose body is not a JSON error (an HTML page, truncated JSON, empty) | the same status with an OpenAI-shaped JSON error carrying a short, sanitised excerpt |
//! | an error answer (body or header) quoting a configured backend credential | passed on with every such secret replaced by `[redacted]` |
//! | a request body over the limit | `413` `request_too_large`, OpenAI-shaped, nothing sent |
//! | a model no backend serves (`models` declared) | `404` `model_not_found` |
//! | a chat request for an Anthropic backend (or a messages request for an OpenAI one) with a parameter that has no counterpart ([`translate`](tower_llm_lb::translate)) | `400` `unsupported_parameter` with `param` naming it |
//! | a stream is cut upstream | an SSE `event: error` then a broken stream, never a clean end |
//! | nothing free in time | `429` with `retry-after` / `retry-after-ms` when a retry time is known, else `503` |
//! | the backend rejected the credential configured for it (401/403) | `502` `upstream_auth_error` naming the backend (its answer is not passed on) |
//! | the request's deadline (`request_timeout`) passed before an answer | `504` `request_timeout` |
//! | every attempt failed (5xx, timeouts, connect errors; none throttled) | `502` with an OpenAI-shaped error listing each attempt, and `retry-after` when a backend's circuit says when to come back |
//! | request body over the cap | `413` |
//! | missing or wrong client key | `401`; non-loopback client without keys configured: `403` |
//!
//! Errors on `/v1/messages` are in Anthropic's shape (`{"type": "error", "error": {...}}`),
//! the others in OpenAI's.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cli;
mod log;
mod metrics;
#[cfg(feature = "otel")]
mod otel;
pub mod settings;
mod stateful;
mod tls;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body::Frame;
use tokio::time::Instant;
use tower::ServiceExt;

use tower_llm_lb::Circuit;
use tower_llm_lb::auth::redact;
use tower_llm_lb::backend::Backend;
use tower_llm_lb::balance::{Priority, Tenant};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::endpoint::Served;
use tower_llm_lb::error::{BoxError, Exhausted, Unavailable, find};
use tower_llm_lb::retry::Attempts;
use tower_llm_lb::stack::{LlmBody, LlmService};

/// What [`Gateway::serve`] allows a client, so slow or idle clients cannot hold the process's
/// connections (config `gateway.client_header_timeout_ms`, `client_body_timeout_ms`,
/// `max_connections`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// The time to send a request's head; a kept-alive connection waiting for its next request
    /// is closed after as long (hyper starts the head's timer when the connection waits).
    /// Default 30 s, hyper's.
    pub header_timeout: Duration,
    /// The longest pause between a request body's bytes: then `408` and the connection closes.
    /// Default 30 s.
    pub body_timeout: Duration,
    /// Connections served at once; more wait in the listen queue until one closes. Default
    /// 4 096.
    pub max_connections: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_connections: 4096,
        }
    }
}

/// The answer to a request whose handling panicked.
fn panicked(_: Box<dyn std::any::Any + Send>) -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the gateway failed on this request",
    )
}

/// What the gateway serves. Clones share it: [`Gateway::replace`] on one changes what all serve
/// (a config reload), while requests already under way finish on what they started with.
#[derive(Clone)]
pub struct Gateway {
    live: Arc<arc_swap::ArcSwap<Live>>,
    body_limit: usize,
    limits: ClientLimits,
    /// Set: [`Gateway::serve`] speaks HTTPS.
    tls: Option<tls::Tls>,
    /// Set: each forwarded request is traced (feature `otel`).
    #[cfg(feature = "otel")]
    otel: Option<Arc<otel::Otel>>,
    stream_usage: bool,
    /// Configured tenants (`gateway.tenants`), by name.
    tenants: Arc<std::collections::HashMap<Arc<str>, Tenant>>,
    // Shared by every clone, so a reload can swap it.
    shared: Arc<arc_swap::ArcSwapOption<tower_llm_lb::shared::SharedState>>,
    metrics: Arc<metrics::Metrics>,
    /// Set when [`Gateway::serve`]'s shutdown began: `/health` answers 503.
    draining: Arc<std::sync::atomic::AtomicBool>,
}

/// What a reload replaces at once: the stack, its backends, the client keys and the aliases.
pub(crate) struct Live {
    service: LlmService,
    backends: Arc<[Backend]>,
    client_keys: Arc<[String]>,
    aliases: Arc<std::collections::BTreeMap<String, String>>,
    /// The models served by name (config `models`).
    models: Vec<String>,
    /// Those and the models the backends declare.
    declared: std::collections::BTreeSet<Arc<str>>,
    /// Each backend's attribution headers, made once: by the address of its name (the `Arc`
    /// every `Served` of it shares), its `x-llm-lb-backend` value and the `x-llm-lb-attempts`
    /// value of one successful attempt (`name=success`). Made per answer, they cost three
    /// allocations.
    attribution: Box<[(usize, HeaderValue, HeaderValue)]>,
}

impl Live {
    fn new(
        service: LlmService,
        backends: Vec<Backend>,
        client_keys: Vec<String>,
        aliases: std::collections::BTreeMap<String, String>,
        models: Vec<String>,
    ) -> Result<Self, String> {
        let declared: std::collections::BTreeSet<Arc<str>> = backends
            .iter()
            .filter_map(Backend::models)
            .flatten()
            .chain(models.iter().map(String::as_str))
            .map(Arc::from)
            .collect();
        for (alias, model) in &aliases {
            let at = format!("gateway.model_aliases.{alias}");
            if alias.is_empty() || model.is_empty() {
                return Err(format!("{at}: an alias and its model must not be empty"));
            }
            if declared.contains(alias.as_str()) {
                return Err(format!("{at}: a backend declares this model itself"));
            }
            if !declared.is_empty() && !declared.contains(model.as_str()) {
                return Err(format!("{at}: no backend declares the model \"{model}\""));
            }
        }
        let mut attribution: Vec<(usize, HeaderValue, HeaderValue)> = backends
            .iter()
            .filter_map(|b| {
                let name = HeaderValue::from_str(b.name()).ok()?;
                let once = HeaderValue::from_str(&format!("{}=success", b.name())).ok()?;
                Some((name_address(b), name, once))
            })
            .collect();
        attribution.sort_unstable_by_key(|(at, _, _)| *at);
        Ok(Live {
            attribution: attribution.into(),
            service,
            backends: backends.into(),
            client_keys: client_keys.into(),
            aliases: Arc::new(aliases),
            models,
            declared,
        })
    }

    pub(crate) fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// `backend`'s attribution headers made once (see [`Live::attribution`]).
    fn attribution_of(&self, backend: &Backend) -> Option<(&HeaderValue, &HeaderValue)> {
        let at = name_address(backend);
        let i = self
            .attribution
            .binary_search_by_key(&at, |(a, _, _)| *a)
            .ok()?;
        let (_, name, once) = &self.attribution[i];
        Some((name, once))
    }

    /// The declared model of that name, as a label value (no allocation).
    pub(crate) fn declared_name(&self, model: &str) -> Option<metrics::Name> {
        self.declared
            .get(model)
            .map(|m| metrics::Name::from_shared(m.clone()))
    }

    pub(crate) fn declared(&self) -> impl Iterator<Item = &str> {
        self.declared.iter().map(|m| &**m)
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.live.load();
        f.debug_struct("Gateway")
            .field(
                "backends",
                &live.backends.iter().map(Backend::name).collect::<Vec<_>>(),
            )
            .field(
                "client_keys",
                &format_args!("<{} redacted>", live.client_keys.len()),
            )
            .finish()
    }
}

impl Gateway {
    /// A gateway over `service`, reporting `backends` on `/stats`, requiring one of
    /// `client_keys` (none: loopback clients only).
    pub fn new(service: LlmService, backends: Vec<Backend>, client_keys: Vec<String>) -> Self {
        let live = Live::new(
            service,
            backends,
            client_keys,
            Default::default(),
            Vec::new(),
        )
        .unwrap_or_else(|_| unreachable!("no aliases to check"));
        let live = Arc::new(arc_swap::ArcSwap::from_pointee(live));
        Gateway {
            metrics: Arc::new(metrics::Metrics::new(live.clone())),
            live,
            body_limit: BODY_LIMIT,
            limits: ClientLimits::default(),
            tls: None,
            #[cfg(feature = "otel")]
            otel: None,
            stream_usage: false,
            tenants: Arc::default(),
            shared: Default::default(),
            draining: Default::default(),
        }
    }

    /// Shows `link`'s status on `/stats` (`shared_state`), and keeps it running as long as
    /// the gateway does.
    pub fn shared_state(self, link: tower_llm_lb::shared::SharedState) -> Self {
        self.replace_shared_state(Some(link));
        self
    }

    /// Replaces (or with `None` ends) the shared-state link of every clone of this gateway, as
    /// a config reload does: the old link's task stops when nothing else holds it.
    pub fn replace_shared_state(&self, link: Option<tower_llm_lb::shared::SharedState>) {
        self.shared.store(link.map(Arc::new));
    }

    /// Applies what `config` says of the gateway beside its keys: the models the service routes
    /// by name (`models`), `gateway.model_aliases` and `gateway.stream_usage`. Fails as
    /// [`Gateway::model_aliases`] does.
    pub fn configured(self, config: &tower_llm_lb_config::Config) -> Result<Self, String> {
        let g = settings::GatewayConfig::of(config)?;
        let d = ClientLimits::default();
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        let limits = ClientLimits {
            header_timeout: ms(g.client_header_timeout_ms, d.header_timeout),
            body_timeout: ms(g.client_body_timeout_ms, d.body_timeout),
            max_connections: g.max_connections.unwrap_or(d.max_connections),
        };
        if limits.header_timeout.is_zero() || limits.body_timeout.is_zero() {
            return Err(
                "gateway.client_header_timeout_ms and client_body_timeout_ms must be above 0"
                    .into(),
            );
        }
        if limits.max_connections == 0 {
            return Err("gateway.max_connections must be at least 1".into());
        }
        let this = match &g.tls {
            Some(t) => self.tls(&t.cert_file, &t.key_file)?,
            None => self,
        };
        let mut tenants = std::collections::HashMap::new();
        for (name, t) in &g.tenants {
            let priority = match t.priority.as_deref() {
                None | Some("interactive") => Priority::Interactive,
                Some("batch") => Priority::Batch,
                Some(other) => {
                    return Err(format!(
                        "gateway.tenants.{name}.priority: {other:?} is neither \"interactive\" nor \"batch\""
                    ));
                }
            };
            let weight = t.weight.unwrap_or(1);
            if weight == 0 {
                return Err(format!("gateway.tenants.{name}.weight must be at least 1"));
            }
            let name: Arc<str> = name.as_str().into();
            let tenant = Tenant {
                name: name.clone(),
                weight,
                priority,
            };
            tenants.insert(name, tenant);
        }
        let mut this = this;
        this.tenants = Arc::new(tenants);
        this.client_limits(limits)
            .stream_usage(g.stream_usage.unwrap_or(false))
            .served_models(config.models().map(String::from).collect())
            .model_aliases(g.model_aliases)
    }

    /// Asks backends for the token usage of streamed chat answers whose caller did not
    /// (`stream_options.include_usage`), counts it, and removes that last chunk before the
    /// caller sees it (config `gateway.stream_usage`; default off: Azure `api-version`s before
    /// `2024-09-01-preview`, and some OpenAI-compatible servers, refuse `stream_options`).
    pub fn stream_usage(mut self, on: bool) -> Self {
        self.stream_usage = on;
        self
    }

    /// Replaces what every clone of this gateway serves (a config reload): new requests use the
    /// new stack at once; requests under way finish on the old one. Fails, naming the alias, as
    /// [`Gateway::model_aliases`] does, and then changes nothing. Build the new stack with
    /// [`Config::build_reusing`](tower_llm_lb_config::Config::build_reusing) over
    /// [`Gateway::backends`] so unchanged backends keep their state. `models` are the models
    /// the service routes by name (config `models`), listed on `/v1/models` with those the
    /// backends declare.
    pub fn replace(
        &self,
        service: LlmService,
        backends: Vec<Backend>,
        client_keys: Vec<String>,
        aliases: std::collections::BTreeMap<String, String>,
        models: Vec<String>,
    ) -> Result<(), String> {
        let live = Live::new(service, backends, client_keys, aliases, models)?;
        self.live.store(Arc::new(live));
        Ok(())
    }

    /// The backends served now.
    pub fn backends(&self) -> Vec<Backend> {
        self.live.load().backends.to_vec()
    }

    /// Other names for models (config `gateway.model_aliases`): a request naming an alias is
    /// sent as the model it stands for. Fails, naming the alias, on an empty name, an alias that
    /// is itself a model a backend declares, or (when backends declare models) a target no
    /// backend declares.
    pub fn model_aliases(
        self,
        aliases: std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let now = self.live.load_full();
        self.replace(
            now.service.clone(),
            now.backends.to_vec(),
            now.client_keys.to_vec(),
            aliases,
            now.models.clone(),
        )?;
        Ok(self)
    }

    /// The models the service routes by name (config `models`: see
    /// [`Config::models`](tower_llm_lb_config::Config::models)), listed on `/v1/models` beside those
    /// the backends declare, and usable as alias targets and metric labels.
    pub fn served_models(self, models: Vec<String>) -> Self {
        let now = self.live.load_full();
        let live = Live::new(
            now.service.clone(),
            now.backends.to_vec(),
            now.client_keys.to_vec(),
            (*now.aliases).clone(),
            models,
        );
        // The aliases were valid with fewer models: they stay valid with more.
        if let Ok(live) = live {
            self.live.store(Arc::new(live));
        }
        self
    }

    /// The largest request body accepted (default 32 MiB).
    pub fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    /// Makes [`Gateway::serve`] speak HTTPS (HTTP/2 or HTTP/1.1 by ALPN; rustls) with the PEM
    /// certificate chain and private key in these files, read again when they change (checked
    /// every 2 s): new connections get the new certificate, open ones keep theirs. Fails naming
    /// the file that cannot be read or used (config `gateway.tls: { cert_file, key_file }`).
    pub fn tls(
        mut self,
        cert_file: impl AsRef<std::path::Path>,
        key_file: impl AsRef<std::path::Path>,
    ) -> Result<Self, String> {
        self.tls = Some(tls::Tls::new(cert_file.as_ref(), key_file.as_ref())?);
        Ok(self)
    }

    /// Traces each forwarded request to the exporter the `OTEL_*` environment names.
    #[cfg(feature = "otel")]
    pub(crate) fn traced(mut self, otel: Option<Arc<otel::Otel>>) -> Self {
        self.otel = otel;
        self
    }

    /// What [`Gateway::serve`] allows a client (see [`ClientLimits`]).
    pub fn client_limits(mut self, limits: ClientLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The axum router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so
    /// the loopback rule can see the peer.
    ///
    /// Around every route, tower-http's layers: the caller's credential headers marked
    /// sensitive (never logged), an `x-request-id` set when the caller sent none (a UUID),
    /// passed to the backend on every attempt and echoed in the answer, a `tracing` span per
    /// request carrying it, the body limit, and a panic turned into a `500` JSON error.
    pub fn router(self) -> Router {
        use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
        let limit = self.body_limit;
        let layers = tower::ServiceBuilder::new()
            .layer(
                tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new([
                    http::header::AUTHORIZATION,
                    http::HeaderName::from_static("api-key"),
                    http::HeaderName::from_static("x-api-key"),
                ]),
            )
            .layer(SetRequestIdLayer::x_request_id(FastRequestId))
            .layer(
                tower_http::trace::TraceLayer::new_for_http().make_span_with(
                    |req: &http::Request<_>| {
                        let id = req
                            .headers()
                            .get(&X_REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        tracing::debug_span!("request", method = %req.method(), path = req.uri().path(), request_id = id)
                    },
                ),
            )
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
            // The limit's own 413 is plain text: OpenAI SDKs parse error bodies as JSON.
            .map_response(move |res: http::Response<_>| {
                let json = res
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                if res.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
                    return error_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request_too_large",
                        &format!("request body larger than {limit} bytes"),
                    );
                }
                res.map(Body::new)
            })
            .layer(tower_http::limit::RequestBodyLimitLayer::new(limit));
        Router::new()
            .route("/v1/chat/completions", post(forward))
            .route("/v1/completions", post(forward))
            .route("/v1/embeddings", post(forward))
            .route("/v1/messages", post(forward))
            .route("/v1/models", get(models))
            .fallback(forward_other)
            .route("/health", get(health))
            .route("/stats", get(stats))
            .route("/metrics", get(metrics_text))
            .route("/", get(live_page))
            .route("/ui", get(live_page))
            .with_state(self)
            .layer(layers)
    }

    /// Serves on `listener` until `shutdown` resolves; then `/health` answers `503`
    /// (`{"status":"draining"}`) on the connections still open, the listener stops accepting
    /// (a new connection is refused), idle connections are closed, and the requests and streams
    /// in flight finish; it returns when the last one has. Bound the wait yourself (the binary
    /// stops waiting after `gateway.shutdown_grace_ms`).
    ///
    /// Each connection is served by hyper (HTTP/1.1 and HTTP/2) inside the same layers as
    /// [`Gateway::router`]; the forwarded routes (every `/v1/...` route but `GET /v1/models`)
    /// go straight to the stack, the others through the router.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let draining = self.draining.clone();
        let routes = self.clone().router();
        let limits = self.limits;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let builder = Arc::new(builder);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // Tells connections still waiting for their first byte that shutdown began.
        let (stopping, stop) = tokio::sync::watch::channel(false);
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        // The certificate's files are watched while this serves.
        let _watch = self.tls.as_ref().map(|t| AbortOnDrop(t.watch()));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            // At the limit, wait for a connection to close before accepting the next.
            let permit = tokio::select! {
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Nagle's algorithm would hold a response's body behind its head until the client's
            // delayed ACK (40 ms on Linux): every answer would pay it.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            let front = Front {
                gw: self.clone(),
                routes: routes.clone(),
                peer,
            };
            let (builder, watcher, mut stop) = (builder.clone(), graceful.watcher(), stop.clone());
            let tls = self.tls.clone();
            tokio::spawn(async move {
                // A client that connects and sends nothing is closed after the head timeout too
                // (hyper's own timer starts once the connection reads a request, after the
                // first bytes tell HTTP/1 from HTTP/2).
                let mut byte = [0u8; 1];
                tokio::select! {
                    first = tokio::time::timeout(limits.header_timeout, tcp.peek(&mut byte)) => {
                        if !matches!(first, Ok(Ok(1))) {
                            return;
                        }
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
                let front = hyper_util::service::TowerToHyperService::new(front);
                let ended = match tls {
                    None => {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), front);
                        watcher.watch(conn).await
                    }
                    Some(tls) => {
                        // The handshake is bounded like a request head.
                        let accepted = tokio::select! {
                            a = tokio::time::timeout(limits.header_timeout, tls.acceptor().accept(tcp)) => a,
                            _ = stop.wait_for(|s| *s) => return,
                        };
                        let stream = match accepted {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), front);
                        watcher.watch(conn).await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(permit);
            });
        }
        let _ = stopping.send(true);
        draining.store(true, std::sync::atomic::Ordering::Release);
        drop(listener);
        graceful.shutdown().await;
        Ok(())
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An accept that failed: a connection that went away before it was taken is nothing; anything
/// else (out of file descriptors, say) is logged and waited out for a second, as axum does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What [`Gateway::serve`] runs for each connection: the forwarded routes go to the stack
/// directly, the others to [`Gateway::router`]. The direct path does inline what the router's
/// tower-http layers do (credential headers marked sensitive, the request id set and echoed,
/// the `debug` span, a panic answered with a `500`), and reads the body with the same limit;
/// the layers, the route matching, the per-route boxing and the extractors cost 9,000
/// instructions and 9 allocations a request (`benches/proxy.sh instructions`).
#[derive(Clone)]
struct Front {
    gw: Gateway,
    routes: Router,
    peer: SocketAddr,
}

impl<B> tower::Service<http::Request<B>> for Front
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let forwarded = is_forwarded(req.method(), req.uri().path());
        if forwarded {
            use futures_util::FutureExt;
            use tracing::Instrument;
            // One pass over the few headers a request has (no hashing).
            for (name, value) in req.headers_mut().iter_mut() {
                if name == http::header::AUTHORIZATION || name == API_KEY || name == X_API_KEY {
                    value.set_sensitive(true);
                }
            }
            let id = match req.headers().get(&X_REQUEST_ID) {
                Some(id) => id.clone(),
                None => {
                    let id = uuid_v4(fastrand::u64(..), fastrand::u64(..));
                    req.headers_mut().insert(X_REQUEST_ID, id.clone());
                    id
                }
            };
            let span = tracing::debug_span!(
                "request",
                method = %req.method(),
                path = req.uri().path(),
                request_id = id.to_str().unwrap_or("-")
            );
            let (gw, peer) = (self.gw.clone(), self.peer);
            // The answer's future is made inside the boxed one: it is large, and each move of
            // it is a copy.
            return Box::pin(
                async move {
                    let answer = std::panic::AssertUnwindSafe(forward_from(gw, Some(peer), req));
                    let mut res = answer.catch_unwind().await.unwrap_or_else(panicked);
                    if let http::header::Entry::Vacant(e) = res.headers_mut().entry(X_REQUEST_ID) {
                        e.insert(id);
                    }
                    Ok(res)
                }
                .instrument(span),
            );
        }
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let routes = self.routes.clone();
        Box::pin(routes.oneshot(req))
    }
}

/// Whether a request goes to the backends: every route under `/v1/` of the OpenAI and
/// Anthropic APIs, whatever the method, except `GET /v1/models` (the gateway answers it).
fn is_forwarded(method: &http::Method, path: &str) -> bool {
    path.starts_with("/v1/") && !(path == "/v1/models" && method == http::Method::GET)
}

/// Whether `path` is one of Anthropic's routes (`/v1/messages` and below): its errors are
/// written in Anthropic's shape.
fn is_anthropic_route(path: &str) -> bool {
    path.strip_prefix("/v1/messages")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Request ids in UUID v4 form, from the per-thread random source: no system call per request
/// (tower-http's `MakeRequestUuid` asks the kernel for 16 random bytes each time). Ids only
/// need to be unique, not unpredictable.
#[derive(Clone, Copy, Debug, Default)]
struct FastRequestId;

impl tower_http::request_id::MakeRequestId for FastRequestId {
    fn make_request_id<B>(
        &mut self,
        _: &http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        Some(tower_http::request_id::RequestId::new(uuid_v4(
            fastrand::u64(..),
            fastrand::u64(..),
        )))
    }
}

/// The UUID v4 text (`8-4-4-4-12` lowercase hex) of 122 random bits taken from `hi` and `lo`.
fn uuid_v4(hi: u64, lo: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = (hi & !0xf000) | 0x4000; // version 4
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62); // variant 10
    let bits = (u128::from(hi) << 64) | u128::from(lo);
    let mut out = [0u8; 36];
    let mut nibble = 32;
    for (i, b) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *b = b'-';
        } else {
            nibble -= 1;
            *b = HEX[((bits >> (nibble * 4)) & 0xf) as usize];
        }
    }
    // Shared from the start: the answer gets a copy of the id, and a `Bytes` made from a
    // slice allocates again on its first clone (one allocation instead of two).
    HeaderValue::from_maybe_shared(Bytes::from_owner(out))
        .expect("hex digits and dashes are a valid header value")
}

/// `GET /health`: `200 {"status":"ok"}` while serving, `503 {"status":"draining"}` once shutdown
/// began (a load balancer stops sending).
async fn health(State(gw): State<Gateway>) -> Response {
    if gw.draining.load(std::sync::atomic::Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "draining"})),
        )
            .into_response()
    } else {
        axum::Json(serde_json::json!({"status": "ok"})).into_response()
    }
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": kind}
    });
    (status, axum::Json(body)).into_response()
}

/// `None` when the client may proceed; otherwise the refusal to send.
fn refusal(live: &Live, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<Response> {
    admit(live, headers, peer).err().map(Refused::response)
}

/// Why a client was turned away.
#[derive(Clone, Copy, Debug)]
enum Refused {
    /// No client keys are configured and the client is not on loopback.
    NotLoopback,
    /// A missing or wrong client key.
    WrongKey,
}

impl Refused {
    fn response(self) -> Response {
        match self {
            Refused::NotLoopback => error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                "no client keys are configured: only loopback clients are served",
            ),
            Refused::WrongKey => error_response(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong gateway client key",
            ),
        }
    }
}

/// Who the client is, as metrics name it (`key-N`: the N-th configured client key, never the
/// key; `loopback` where no keys are configured), or the refusal to send.
fn admit(
    live: &Live,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<&'static str, Refused> {
    if live.client_keys.is_empty() {
        return match peer {
            Some(p) if p.ip().is_loopback() => Ok("loopback"),
            _ => Err(Refused::NotLoopback),
        };
    }
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get(&API_KEY).and_then(|v| v.to_str().ok());
    // What Anthropic's SDKs send.
    let x_api_key = headers.get(&X_API_KEY).and_then(|v| v.to_str().ok());
    let found = [bearer, api_key, x_api_key]
        .into_iter()
        .flatten()
        .find_map(|k| {
            live.client_keys
                .iter()
                .position(|c| constant_time_eq(c.as_bytes(), k.as_bytes()))
        });
    match found {
        Some(i) => Ok(client_label(i)),
        None => Err(Refused::WrongKey),
    }
}

/// Who a request is for when requests wait for paced slots (each tenant gets its turn, see
/// `tower_llm_lb::balance::Tenant`): the client key it came with, when there are several; on
/// a gateway without keys (loopback callers, an app in front of it), the `x-llm-lb-tenant`
/// header. Its weight and priority come from `gateway.tenants` (default 1, interactive);
/// `x-llm-lb-priority: batch` puts the request behind interactive ones (a caller can only
/// lower its own). Both headers are removed before the request goes on. `None`: one tenant in
/// all, interactive (no extension is inserted: the common case costs nothing).
fn tenant_of(
    keys: usize,
    configured: &std::collections::HashMap<Arc<str>, Tenant>,
    client: &'static str,
    ours: bool,
    headers: &mut HeaderMap,
) -> Option<Tenant> {
    // Looked up only when the request carries a header named `x-llm-lb-*` (the hop-by-hop
    // pass saw it): the common request pays nothing here.
    let named = ours.then(|| headers.remove(&X_LLM_LB_TENANT)).flatten();
    let batch = ours
        && headers
            .remove(&X_LLM_LB_PRIORITY)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"batch"));
    let name: &str = if keys > 0 {
        client
    } else {
        match named.as_ref().and_then(|v| v.to_str().ok()) {
            Some(n) if !n.is_empty() && n.len() <= 64 => n,
            _ => "",
        }
    };
    // One tenant in all (a single key, or no key and no header), interactive and not
    // configured: nothing to tell the line.
    let alone = keys == 1 || name.is_empty();
    let mut tenant = match configured.get(name) {
        Some(t) => t.clone(),
        None if alone && !batch => return None,
        None => Tenant {
            name: name.into(),
            ..Tenant::default()
        },
    };
    if batch {
        tenant.priority = Priority::Batch;
    }
    Some(tenant)
}

/// `key-1`, `key-2`, ... (the first 32; later keys share `key-33+`: label sets stay bounded).
fn client_label(i: usize) -> &'static str {
    const LABELS: [&str; 33] = [
        "key-1", "key-2", "key-3", "key-4", "key-5", "key-6", "key-7", "key-8", "key-9", "key-10",
        "key-11", "key-12", "key-13", "key-14", "key-15", "key-16", "key-17", "key-18", "key-19",
        "key-20", "key-21", "key-22", "key-23", "key-24", "key-25", "key-26", "key-27", "key-28",
        "key-29", "key-30", "key-31", "key-32", "key-33+",
    ];
    LABELS[i.min(32)]
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// Header names read or written on every request, made once (a `&str` name is parsed and hashed
// on each lookup).
/// The default cap on a request body, and the cap on a backend's answer the gateway reads
/// whole to tag the ids in it: 32 MiB (audio uploads are the large requests).
const BODY_LIMIT: usize = 32 * 1024 * 1024;
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
const API_KEY: http::HeaderName = http::HeaderName::from_static("api-key");
const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");
const X_LLM_LB_BACKEND: http::HeaderName = http::HeaderName::from_static("x-llm-lb-backend");
const X_LLM_LB_TENANT: http::HeaderName = http::HeaderName::from_static("x-llm-lb-tenant");
const X_LLM_LB_PRIORITY: http::HeaderName = http::HeaderName::from_static("x-llm-lb-priority");
const X_LLM_LB_ATTEMPTS: http::HeaderName = http::HeaderName::from_static("x-llm-lb-attempts");
const X_LLM_LB_ATTEMPT_COUNT: http::HeaderName =
    http::HeaderName::from_static("x-llm-lb-attempt-count");

/// Headers of one connection, not of the request or answer: never passed on. Names, not
/// strings, so removing them parses nothing.
// A static, not a const: a const array of header names is built (and dropped) at each use.
static HOP_BY_HOP: [http::HeaderName; 8] = [
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::TE,
    http::header::TRAILER,
    http::header::UPGRADE,
    http::header::HOST,
];

/// Removes the [`HOP_BY_HOP`] headers (and `also`) from `headers`: one pass over the names
/// present (a handful) instead of a hashed lookup of each of nine names. True when a header
/// named `x-llm-lb-*` (the gateway's own: tenant, priority) is present.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, also: Option<&http::HeaderName>) -> bool {
    let mut found = [false; 9]; // HOP_BY_HOP, then `also`
    let mut ours = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str()) {
            found[i] = true;
        } else if also == Some(name) {
            found[8] = true;
        } else if name.as_str().starts_with("x-llm-lb-") {
            ours = true;
        }
    }
    for (name, _) in HOP_BY_HOP.iter().chain(also).zip(found).filter(|(_, f)| *f) {
        headers.remove(name);
    }
    ours
}

/// The position of `name` in [`HOP_BY_HOP`]: a `match` on the text (a switch on its length,
/// then one comparison), where comparing with each of the eight names cost about 700
/// instructions a request.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    match name {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "transfer-encoding" => Some(3),
        "te" => Some(4),
        "trailer" => Some(5),
        "upgrade" => Some(6),
        "host" => Some(7),
        _ => None,
    }
}

fn peer_of(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// Forwards a request and counts its answer in the metrics.
async fn forward(State(gw): State<Gateway>, req: Request) -> Response {
    let peer = peer_of(&req);
    forward_from(gw, peer, req).await
}

/// Any other route: forwarded when it is one of the APIs' (`/v1/...`), else a 404.
async fn forward_other(State(gw): State<Gateway>, req: Request) -> Response {
    if is_forwarded(req.method(), req.uri().path()) {
        return forward(State(gw), req).await;
    }
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// [`forward`] for a request from `peer` with any body.
async fn forward_from<B>(gw: Gateway, peer: Option<SocketAddr>, req: http::Request<B>) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let route = metrics::route_label(req.uri().path());
    let anthropic_caller = is_anthropic_route(req.uri().path());
    let mut line = Some(Box::new(AccessLine {
        // The request id (set by the layers or the direct path when the caller sent none).
        request_id: req.headers().get(&X_REQUEST_ID).cloned(),
        method: req.method().clone(),
        route,
        client: "refused",
        model: None,
        started,
        status: 0,
        backend: None,
        attempts: 0,
        head_us: 0,
        #[cfg(feature = "otel")]
        span: gw
            .otel
            .as_ref()
            .map(|o| o.start(req.headers(), req.uri().path())),
    }));
    // What this request starts with it finishes with, whatever a reload does meanwhile.
    let live = gw.live.load_full();
    let (client, mut res) = match admit(&live, req.headers(), peer) {
        Ok(client) => {
            if let Some(l) = line.as_mut() {
                l.client = client;
            }
            let res = forward_counted(&gw, live, client, req, &mut line).await;
            (client, res)
        }
        Err(refused) => ("refused", refused.response()),
    };
    if anthropic_caller && res.status().as_u16() >= 400 {
        res = Box::pin(anthropic_shaped(res)).await;
    }
    if let Some(route) = route {
        gw.metrics
            .observe(route, res.status().as_u16(), client, started);
    }
    // An answer that is not streamed from a backend is logged now; the others when they end.
    if let Some(mut line) = line {
        line.head(&res);
        line.write(None);
    }
    res
}

/// An error answer to an Anthropic caller (`/v1/messages`) in Anthropic's shape: the
/// gateway's own errors (refusals, every backend busy or failed) are written in OpenAI's.
async fn anthropic_shaped(res: Response) -> Response {
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, ERROR_BODY_LIMIT).await else {
        let body = tower_llm_lb::translate::error_to_anthropic(parts.status.as_u16(), b"");
        return Response::from_parts(parts, axum::body::Body::from(body));
    };
    let already = serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("error"));
    if already {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let body = tower_llm_lb::translate::error_to_anthropic(parts.status.as_u16(), &bytes);
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// `GET /` and `/ui`: a self-contained live page (no build step, no CDN) that polls `/stats`
/// every second and shows each backend's tier, state, share of traffic, errors, latency and
/// tokens. The page carries no data, so it needs no key; `/stats` keeps its access rule (a
/// client key goes in the page's fragment, `#key=...`, which browsers never send).
async fn live_page() -> Response {
    (
        [
            (http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("ui.html"),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus' text format (same access rule as `/stats`).
async fn metrics_text(State(gw): State<Gateway>, req: Request) -> Response {
    if let Some(res) = refusal(&gw.live.load(), req.headers(), peer_of(&req)) {
        return res;
    }
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics.encode(),
    )
        .into_response()
}

enum ReadError {
    TooLarge,
    Stalled,
}

/// The whole request body, up to `limit` bytes, with at most `idle` between its frames. A body
/// that fails to read counts as too large, as before (the caller went away or sent garbage).
async fn read_body<B>(body: B, limit: usize, idle: Duration) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
{
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    // Most bodies come in one frame: kept as it is; more are joined.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(ReadError::Stalled),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ReadError::TooLarge),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (_, Some(all)) => all.extend_from_slice(&data),
            (Some(one), None) => {
                let mut all = bytes::BytesMut::with_capacity(one.len() + data.len());
                all.extend_from_slice(one);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    })
}

async fn forward_counted<B>(
    gw: &Gateway,
    live: Arc<Live>,
    client: &'static str,
    req: http::Request<B>,
    line: &mut Option<Box<AccessLine>>,
) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body, gw.body_limit, gw.limits.body_timeout).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                &format!("request body larger than {} bytes", gw.body_limit),
            );
        }
        Err(ReadError::Stalled) => {
            let mut res = error_response(
                StatusCode::REQUEST_TIMEOUT,
                "request_body_timeout",
                &format!(
                    "the request body stalled: no byte for {} ms",
                    gw.limits.body_timeout.as_millis()
                ),
            );
            res.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return res;
        }
    };
    let anthropic_caller = is_anthropic_route(parts.uri.path());
    // What the caller sent, to tell whether the body is passed on as it came.
    let sent = (bytes.as_ptr() as usize, bytes.len());
    let mut bytes = resolve_alias(&live.aliases, bytes);
    // A follow-up naming an object a backend keeps goes to that backend, with its own ids.
    let keeps = stateful::keeps_objects(parts.uri.path());
    let pinned = match stateful::unpin(
        parts.uri.path_and_query().map_or("", |p| p.as_str()),
        &bytes,
    ) {
        Ok(p) => p,
        Err(message) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
        }
    };
    let (mut pin, mut pinned_path) = (None, None);
    if let Some(p) = pinned {
        if let Some(body) = p.body {
            bytes = body;
        }
        pinned_path = p.path_and_query.and_then(|p| p.parse::<http::Uri>().ok());
        pin = Some(p.backend);
    }
    // Usage asked for on the caller's behalf is removed from what the caller gets.
    let mut strip_usage = false;
    if gw.stream_usage
        && parts.uri.path() == "/v1/chat/completions"
        && let Some(asked) = tower_llm_lb::translate::ask_stream_usage(&bytes)
    {
        bytes = Bytes::from(asked);
        strip_usage = true;
    }
    // Read once: the metric's label (declared models only) and the access line's model.
    let asked = tower_llm_lb::provider::model_of(&bytes);
    let model = gw.metrics.model_label(&live, asked);
    // The access line names the model asked for (the metric's label only declared ones).
    if let (Some(l), Some(m)) = (line.as_mut(), asked) {
        l.model = Some(bytes.slice_ref(m.as_bytes()));
        #[cfg(feature = "otel")]
        if let Some(span) = &l.span {
            span.model(m);
        }
    }
    let unchanged = (bytes.as_ptr() as usize, bytes.len()) == sent;
    let mut out = http::Request::new(ReplayBody::new(bytes));
    *out.method_mut() = parts.method;
    // The path and query only (a request in absolute form names the gateway's own host).
    *out.uri_mut() = if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        parts.uri
    } else {
        parts
            .uri
            .path_and_query()
            .and_then(|p| p.as_str().parse().ok())
            .unwrap_or_else(|| http::Uri::from_static("/"))
    };
    if let Some(uri) = pinned_path {
        *out.uri_mut() = uri;
    }
    if let Some(pin) = pin {
        out.extensions_mut().insert(pin);
    }
    let mut headers = parts.headers;
    // The caller's `content-length` stays with a body passed on as it came (hyper checks it
    // against the body, and writing it anew costs two allocations); a rewritten body's goes.
    let ours = strip_hop_by_hop(
        &mut headers,
        (!unchanged).then_some(&http::header::CONTENT_LENGTH),
    );
    // The backend continues the request's trace.
    #[cfg(feature = "otel")]
    if let Some(span) = line.as_ref().and_then(|l| l.span.as_ref()) {
        span.inject(&mut headers);
    }
    let keys = live.client_keys.len();
    if let Some(tenant) = tenant_of(keys, &gw.tenants, client, ours, &mut headers) {
        out.extensions_mut().insert(tenant);
    }
    *out.headers_mut() = headers;
    let started = Instant::now();
    let answer = live.service.clone().oneshot(out).await;
    // Retries, waits and each attempt's time, from the attempts the stack reports.
    let attempts = match &answer {
        Ok(res) => res.extensions().get::<Attempts>().map(|a| &a.0[..]),
        Err(e) => find::<Exhausted>(&**e)
            .map(|x| &x.attempts[..])
            .or_else(|| {
                find::<tower_llm_lb::error::DeadlineExceeded>(&**e).map(|d| &d.attempts[..])
            }),
    };
    if let Some(attempts) = attempts {
        gw.metrics.attempts(attempts, started.elapsed(), client);
    }
    match answer {
        Ok(res) => {
            if res.status().as_u16() >= 400 {
                // Boxed: a rare path, and its state would make every request's future larger.
                return Box::pin(shaped_error(res, &live)).await;
            }
            let kept_by = keeps
                .then(|| res.extensions().get::<Served>())
                .flatten()
                .map(|s| s.backend.name_arc().clone());
            let usage = metrics::UsageWatch::new(gw.metrics.clone(), &res, model, client);
            let answer = into_axum(res, usage, strip_usage, anthropic_caller, line, &live);
            match kept_by {
                // Boxed: a rare path (see `shaped_error`).
                Some(backend) if is_json(answer.headers()) => {
                    Box::pin(tag_kept(answer, backend)).await
                }
                Some(backend) if is_event_stream(answer.headers()) => answer
                    .map(|body| axum::body::Body::new(stateful::TagEvents::new(body, backend))),
                _ => answer,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "request failed");
            error_for(&e)
        }
    }
}

/// Whether a head says its body is a stream of server-sent events.
fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Whether a head says its body is JSON.
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// An answer about objects `backend` keeps, with their ids tagged (see [`stateful`]). A body
/// that fails to arrive whole is a `502`: the caller would get ids it cannot use.
async fn tag_kept(res: Response, backend: Arc<str>) -> Response {
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            &format!("backend {backend}: the answer broke off"),
        );
    };
    match stateful::tag_answer(&bytes, &backend) {
        Some(tagged) => {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Response::from_parts(parts, axum::body::Body::from(tagged))
        }
        None => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}

/// What a configured secret becomes in a header passed on to a caller.
const REDACTED: &str = "[redacted]";

/// The most of an upstream error body read to check its shape.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// An upstream error answer as OpenAI SDKs parse it: passed on when its body is an
/// OpenAI- or Anthropic-shaped JSON error, otherwise (an HTML page from a proxy, truncated
/// JSON, an empty body) replaced by one, keeping the status and a short, sanitised excerpt.
async fn shaped_error(res: http::Response<LlmBody>, live: &Live) -> Response {
    let backends = &live.backends[..];
    use http_body_util::BodyExt;
    let status = res.status();
    let backend = res
        .extensions()
        .get::<Served>()
        .map(|s| s.backend.name().to_string());
    let (mut parts, body) = res.into_parts();
    let bytes = match http_body_util::Limited::new(body, ERROR_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    // A backend may echo its own key (a 401 quoting the header it got): no configured
    // secret reaches a caller, in the body or a header.
    let credentials = || backends.iter().filter_map(Backend::credential);
    let bytes = redact(bytes, credentials());
    for value in parts.headers.values_mut() {
        let clean = redact(Bytes::copy_from_slice(value.as_bytes()), credentials());
        if clean != value.as_bytes() {
            *value = HeaderValue::from_static(REDACTED);
        }
    }
    let shaped = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(|e| e.is_object()));
    attribute(&mut parts, live);
    if shaped {
        parts.headers.remove(http::header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::from(bytes));
    }
    let excerpt: String = String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    let excerpt = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
    let from = backend.map_or_else(String::new, |b| format!(" from backend {b}"));
    let message = if excerpt.is_empty() {
        format!(
            "upstream answered {}{from} with an empty body",
            status.as_u16()
        )
    } else {
        format!("upstream answered {}{from}: {excerpt}", status.as_u16())
    };
    let mut out = error_response(status, "upstream_error", &message);
    // Keep what tells the caller when to come back, and the attribution.
    for name in [
        "retry-after",
        "retry-after-ms",
        "x-llm-lb-backend",
        "x-llm-lb-attempts",
        "x-llm-lb-attempt-count",
    ] {
        if let Some(v) = parts.headers.get(name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

fn into_axum(
    res: http::Response<LlmBody>,
    usage: Option<metrics::UsageWatch>,
    strip_usage: bool,
    anthropic: bool,
    line: &mut Option<Box<AccessLine>>,
    live: &Live,
) -> Response {
    // A backend that refused *our* credential: the caller's key is not at fault, and the
    // backend's answer (which may echo the key) is not passed on.
    if let Some(served) = res.extensions().get::<Served>()
        && matches!(
            served.outcome,
            tower_llm_lb::Outcome::CredentialRejected { .. }
        )
    {
        return error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_auth_error",
            &format!(
                "backend {} rejected the credential configured for it",
                served.backend.name()
            ),
        );
    }
    // The answer is logged when its body ends.
    let line = line.take().map(|mut l| {
        l.head(&res);
        l
    });
    let (mut parts, body) = res.into_parts();
    attribute(&mut parts, live);
    let sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let strip = (sse && strip_usage).then(|| Stripping {
        with: tower_llm_lb::translate::StripUsage::default(),
        out: Vec::new(),
        finished: false,
    });
    if strip.is_some() {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    let body = Body::new(StreamGuard {
        inner: body,
        sse,
        failed: None,
        flushed: false,
        usage,
        strip: strip.map(Box::new),
        anthropic,
        line,
    });
    Response::from_parts(parts, body)
}

/// `n` as a header value; the common counts without an allocation.
fn count_value(n: usize) -> HeaderValue {
    const SMALL: [&str; 9] = ["0", "1", "2", "3", "4", "5", "6", "7", "8"];
    SMALL
        .get(n)
        .map_or_else(|| HeaderValue::from(n), |s| HeaderValue::from_static(s))
}

/// Hop-by-hop headers out; `x-llm-lb-backend`, `x-llm-lb-attempts` and
/// `x-llm-lb-attempt-count` in.
fn attribute(parts: &mut http::response::Parts, live: &Live) {
    strip_hop_by_hop(&mut parts.headers, None);
    let served = parts.extensions.get::<Served>();
    let made = served.and_then(|s| live.attribution_of(&s.backend));
    if !parts.headers.contains_key(&X_LLM_LB_BACKEND)
        && let Some(served) = served
    {
        let value = match made {
            Some((name, _)) => Some(name.clone()),
            None => HeaderValue::from_str(served.backend.name()).ok(),
        };
        if let Some(v) = value {
            parts.headers.insert(X_LLM_LB_BACKEND, v);
        }
    }
    if !parts.headers.contains_key(&X_LLM_LB_ATTEMPTS)
        && let Some(Attempts(a)) = parts.extensions.get::<Attempts>()
    {
        // The common answer: one attempt, a success, on the backend that served it.
        if let ([one], Some((_, once))) = (&a[..], made)
            && one.outcome == tower_llm_lb::Outcome::Success
            && served.is_some_and(|s| *s.backend.name() == *one.backend)
        {
            parts.headers.insert(X_LLM_LB_ATTEMPTS, once.clone());
            parts.headers.insert(X_LLM_LB_ATTEMPT_COUNT, count_value(1));
            return;
        }
        let mut list = String::with_capacity(32 * a.len());
        for (i, x) in a.iter().enumerate() {
            if i > 0 {
                list.push_str(", ");
            }
            list.push_str(&x.backend);
            list.push('=');
            list.push_str(x.outcome.name());
        }
        if let Ok(v) = HeaderValue::from_str(&list) {
            parts.headers.insert(X_LLM_LB_ATTEMPTS, v);
        }
        parts
            .headers
            .insert(X_LLM_LB_ATTEMPT_COUNT, count_value(a.len()));
    }
}

/// The address of a backend's name: the same for every clone of it (see [`Live::attribution`]).
fn name_address(backend: &Backend) -> usize {
    Arc::as_ptr(backend.name_arc()).cast::<u8>() as usize
}

/// The answer the gateway gives for an error of the stack: an OpenAI-shaped JSON error with
/// the status of the table in the [module docs](self) (`429` with `retry-after` when a retry
/// time is known, `502` when every attempt failed, `503`, `413`, `400`). Use it to mount the
/// stack straight into your own axum app, as a route service behind axum's `HandleErrorLayer`:
///
/// ```
/// use axum::{Router, error_handling::HandleErrorLayer};
/// use tower::ServiceBuilder;
/// use tower_llm_lb::{BoxError, body::BufferRequestLayer};
/// use tower_llm_lb_gateway::response_for;
/// # fn app(llm: tower_llm_lb::stack::LlmService) -> Router {
/// let route = ServiceBuilder::new()
///     .layer(HandleErrorLayer::new(|e: BoxError| async move { response_for(&e) }))
///     .layer(BufferRequestLayer::new(1 << 20)) // any body in, a replayable one to the stack
///     .service(llm);
/// Router::new().route_service("/v1/chat/completions", route)
/// # }
/// ```
pub fn response_for(e: &BoxError) -> Response {
    error_for(e)
}

fn error_for(e: &BoxError) -> Response {
    if find::<tower_llm_lb::error::DeadlineExceeded>(&**e).is_some() {
        return error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "request_timeout",
            &e.to_string(),
        );
    }
    // Every attempt failed (no throttling in them): a bad gateway, whatever the wait.
    let failed = find::<Exhausted>(&**e)
        .filter(|x| !x.attempts.is_empty() && x.attempts.iter().all(|a| a.outcome.is_failure()));
    if let Some(ex) = failed {
        let kind = if ex
            .attempts
            .iter()
            .all(|a| matches!(a.outcome, tower_llm_lb::Outcome::CredentialRejected { .. }))
        {
            "upstream_auth_error"
        } else {
            "upstream_error"
        };
        let mut res = error_response(StatusCode::BAD_GATEWAY, kind, &e.to_string());
        if let Some(at) = ex.earliest {
            let wait = at.saturating_duration_since(Instant::now());
            tower_llm_lb::classify::set_retry_after(res.headers_mut(), wait);
        }
        return res;
    }
    let earliest = find::<Unavailable>(&**e)
        .and_then(|u| u.earliest)
        .or_else(|| find::<Exhausted>(&**e).and_then(|x| x.earliest));
    let unavailable = find::<Unavailable>(&**e).is_some();
    if let Some(at) = earliest {
        let wait = at.saturating_duration_since(Instant::now());
        let mut res = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            &format!("every backend is busy: {e}"),
        );
        tower_llm_lb::classify::set_retry_after(res.headers_mut(), wait);
        return res;
    }
    if unavailable {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            &e.to_string(),
        );
    }
    if let Some(n) = find::<tower_llm_lb::error::NotServed>(&**e) {
        let code = if n.route.is_some() {
            "route_not_served"
        } else if n.pinned.is_some() {
            "backend_not_found"
        } else {
            "model_not_found"
        };
        return error_response(StatusCode::NOT_FOUND, code, &e.to_string());
    }
    if let Some(u) = find::<tower_llm_lb::translate::Untranslatable>(&**e) {
        let body = serde_json::json!({
            "error": {"message": e.to_string(), "type": "invalid_request_error",
                      "param": u.param, "code": "unsupported_parameter"}
        });
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    if find::<tower_llm_lb::fallback::NotJson>(&**e).is_some() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &e.to_string(),
        );
    }
    if find::<tower_llm_lb::error::TooLarge>(&**e).is_some() {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            &e.to_string(),
        );
    }
    error_response(StatusCode::BAD_GATEWAY, "upstream_error", &e.to_string())
}

/// The access log's line for one request, written once: when the answer's head is ready, or,
/// for an answer from a backend, when its body ends (with the tokens it used) or is dropped.
struct AccessLine {
    request_id: Option<HeaderValue>,
    method: http::Method,
    route: Option<&'static str>,
    client: &'static str,
    /// The body's `model`, as sent on (a slice of the body: no copy).
    model: Option<Bytes>,
    started: Instant,
    status: u16,
    backend: Option<metrics::Name>,
    attempts: usize,
    /// Time to the answer's head.
    head_us: u64,
    #[cfg(feature = "otel")]
    span: Option<otel::RequestSpan>,
}

impl AccessLine {
    /// What the answer's head says.
    fn head<B>(&mut self, res: &http::Response<B>) {
        self.status = res.status().as_u16();
        if let Some(s) = res.extensions().get::<Served>() {
            self.backend = Some(metrics::Name::from_shared(s.backend.name_arc().clone()));
        }
        self.attempts = res.extensions().get::<Attempts>().map_or(0, |a| a.0.len());
        self.head_us = self.started.elapsed().as_micros() as u64;
        #[cfg(feature = "otel")]
        if let Some(span) = &self.span {
            span.answered(
                self.status,
                res.extensions().get::<Served>(),
                res.extensions()
                    .get::<Attempts>()
                    .map_or(&[][..], |a| &a.0[..]),
            );
        }
    }

    /// Our own values are written as they are (`%`: no quoting and escaping pass); the
    /// caller's request id and model are quoted and escaped. Tokens when the answer said.
    fn write(&mut self, tokens: Option<(u64, u64)>) {
        #[cfg(feature = "otel")]
        if let Some(span) = self.span.take() {
            span.end(tokens);
        }
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let model = self
            .model
            .as_deref()
            .and_then(|m| std::str::from_utf8(m).ok())
            .unwrap_or("-");
        let duration_us = self.started.elapsed().as_micros() as u64;
        if log::text_lines() && tracing::enabled!(tracing::Level::INFO) {
            // The binary's text lines: the same text, written here in one piece (tracing's
            // visit of twelve fields cost about 5,000 instructions a request).
            log::with_line(|line| {
                line.push_str("request");
                log::quoted(line, "request_id", request_id);
                log::plain(line, "method", self.method.as_str());
                log::plain(line, "path", self.route.unwrap_or("-"));
                log::number(line, "status", u64::from(self.status));
                log::plain(
                    line,
                    "backend",
                    self.backend.as_ref().map_or("-", metrics::Name::as_str),
                );
                log::plain(line, "client", self.client);
                log::quoted(line, "model", model);
                log::number(line, "attempts", self.attempts as u64);
                if let Some((prompt, completion)) = tokens {
                    log::number(line, "prompt_tokens", prompt);
                    log::number(line, "completion_tokens", completion);
                }
                log::number(line, "elapsed_us", self.head_us);
                log::number(line, "duration_us", duration_us);
                if !log::write_direct(module_path!(), line) {
                    tracing::info!("{line}");
                }
            });
            return;
        }
        tracing::info!(
            request_id,
            method = %self.method,
            path = %self.route.unwrap_or("-"),
            status = self.status,
            backend = %self.backend.as_ref().map_or("-", metrics::Name::as_str),
            client = %self.client,
            model,
            attempts = self.attempts,
            prompt_tokens = tokens.map(|t| t.0),
            completion_tokens = tokens.map(|t| t.1),
            elapsed_us = self.head_us,
            duration_us,
            "request"
        );
    }
}

pin_project_lite::pin_project! {
    /// Streams the backend's body; if it fails mid-way, an SSE stream first gets an
    /// `event: error`, then the stream breaks (so no client mistakes it for a clean end).
    struct StreamGuard {
        #[pin]
        inner: LlmBody,
        sse: bool,
        failed: Option<BoxError>,
        flushed: bool,
        usage: Option<metrics::UsageWatch>,
        // Boxed: only streams whose usage chunk the gateway asked for.
        strip: Option<Box<Stripping>>,
        // The caller speaks Anthropic's API (`/v1/messages`).
        anthropic: bool,
        // Written when the body ends, or is dropped (the caller went away).
        line: Option<Box<AccessLine>>,
    }
    impl PinnedDrop for StreamGuard {
        fn drop(this: Pin<&mut Self>) {
            if let Some(mut line) = this.project().line.take() {
                line.write(None);
            }
        }
    }
}

/// A stream losing the usage chunk the gateway asked for on its caller's behalf.
struct Stripping {
    with: tower_llm_lb::translate::StripUsage,
    out: Vec<u8>,
    finished: bool,
}

impl http_body::Body for StreamGuard {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if this.failed.is_some() {
            // Let the server flush the error event before the stream breaks: one turn of
            // Pending (woken at once) makes hyper write out what it has buffered.
            if !*this.flushed {
                *this.flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(this.failed.take().map(Err));
        }
        let frame = loop {
            if this.strip.as_ref().is_some_and(|s| s.finished) {
                break None;
            }
            let frame = ready!(this.inner.as_mut().poll_frame(cx));
            match &frame {
                Some(Ok(f)) => {
                    if let (Some(watch), Some(data)) = (this.usage.as_mut(), f.data_ref()) {
                        watch.feed(data);
                    }
                }
                // The whole answer went through: count what it says it used, and log it.
                None => {
                    let tokens = this.usage.take().and_then(metrics::UsageWatch::finish);
                    if let Some(mut line) = this.line.take() {
                        line.write(tokens);
                    }
                }
                Some(Err(_)) => {
                    *this.usage = None;
                    if let Some(mut line) = this.line.take() {
                        line.write(None);
                    }
                }
            }
            let Some(strip) = this.strip.as_mut() else {
                break frame;
            };
            match frame {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => {
                        // Its own output only: a line it cannot hold is passed on as it is.
                        if strip.with.feed(&data, &mut strip.out).is_err() {
                            strip.out.extend_from_slice(&data);
                        }
                    }
                    Err(f) => break Some(Ok(f)),
                },
                Some(Err(e)) => {
                    strip.finished = true;
                    break Some(Err(e));
                }
                None => {
                    strip.finished = true;
                    let _ = strip.with.finish(&mut strip.out);
                }
            }
            if !strip.out.is_empty() {
                break Some(Ok(Frame::data(Bytes::from(std::mem::take(&mut strip.out)))));
            }
        };
        match frame {
            Some(Err(e)) if *this.sse => {
                let message = format!("stream interrupted upstream: {e}");
                // In the caller's API: Anthropic's typed error event on `/v1/messages`.
                let event = if *this.anthropic {
                    serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}})
                } else {
                    serde_json::json!({"error": {"message": message, "type": "upstream_error"}})
                };
                *this.failed = Some(e);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                    "event: error\ndata: {event}\n\n"
                ))))))
            }
            other => Poll::Ready(other),
        }
    }
}

/// The body with its `model` replaced by the model it is an alias of (unchanged otherwise, and
/// when it is not a JSON object).
fn resolve_alias(aliases: &std::collections::BTreeMap<String, String>, bytes: Bytes) -> Bytes {
    if aliases.is_empty() {
        return bytes;
    }
    let Some(model) = tower_llm_lb::provider::model_of(&bytes).and_then(|m| aliases.get(m)) else {
        return bytes;
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("model".into(), serde_json::Value::String(model.clone()));
            serde_json::to_vec(&map).map_or(bytes, Bytes::from)
        }
        _ => bytes,
    }
}

/// `GET /v1/models`: the models the backends declared (config `models`), in OpenAI's list
/// format; with none declared, the first backend's own answer.
async fn models(State(gw): State<Gateway>, req: Request) -> Response {
    let live = gw.live.load_full();
    let mut names: Vec<&str> = live.declared().collect();
    if names.is_empty() {
        return forward(State(gw.clone()), req).await;
    }
    if let Some(res) = refusal(&live, req.headers(), peer_of(&req)) {
        return res;
    }
    names.extend(live.aliases.keys().map(String::as_str));
    names.sort_unstable();
    names.dedup();
    let data: Vec<_> = names
        .iter()
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "tower-llm-lb"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn stats(State(gw): State<Gateway>, req: Request) -> Response {
    let live = gw.live.load_full();
    if let Some(res) = refusal(&live, req.headers(), peer_of(&req)) {
        return res;
    }
    let now = Instant::now();
    let list: Vec<_> = live
        .backends
        .iter()
        .map(|b| {
            let s = b.state().snapshot();
            let c = s.counters;
            let (prompt, completion) = gw.metrics.tokens_of(b.name());
            let circuit = match s.circuit {
                Circuit::Closed => "closed",
                Circuit::Open { until } if until > now => "open",
                Circuit::Open { .. } | Circuit::HalfOpen => "half_open",
            };
            let cooling_ms = s
                .cooldown_until
                .filter(|u| *u > now)
                .map(|u| (u - now).as_millis() as u64);
            serde_json::json!({
                "name": b.name(),
                "provider": b.provider().name(),
                "priority": b.priority(),
                "weight": b.weight(),
                "requests": c.requests,
                "success": c.success,
                "throttled": c.throttled,
                "server_errors": c.server_errors,
                "failures": c.failures,
                "client_errors": c.client_errors,
                "in_flight": s.in_flight,
                "tokens": {"prompt": prompt, "completion": completion},
                "circuit": circuit,
                "cooling_for_ms": cooling_ms,
                "latency_ms": s.latency.map(|d| d.as_secs_f64() * 1e3),
                // This replica's pace and share of the backend's quota (1: all of it; set by
                // the shared state from the replicas' demand).
                "pace_ms": s.pace.map(|d| d.as_secs_f64() * 1e3),
                "quota_share": s.share,
                // Tokens the backend counts of its quota per token of our estimate of a
                // request's cost, learned from its answers (1: not learned).
                "token_ratio": s.token_ratio,
                "probe": s.last_probe.map(|(at, healthy)| serde_json::json!({
                    "healthy": healthy,
                    "ago_ms": now.saturating_duration_since(at).as_millis() as u64,
                })),
            })
        })
        .collect();
    let shared = gw.shared.load_full().map(|l| {
        let s = l.status();
        serde_json::json!({
            "store": s.store, "healthy": s.healthy, "replicas": s.replicas, "exchanges": s.exchanges,
            "failures": s.failures, "applied": s.applied, "last_error": s.last_error,
        })
    });
    axum::Json(serde_json::json!({ "backends": list, "shared_state": shared })).into_response()
}

/// A mock chat backend of `--mock`: 30 ms to answer, streams of 8 chunks 40 ms apart.
#[cfg(feature = "mock")]
fn chat_mock(name: &str) -> tower_llm_lb_mock::MockBuilder {
    tower_llm_lb_mock::MockServer::builder()
        .name(name)
        .latency(Duration::from_millis(30))
        .stream_chunks(8)
        .chunk_delay(Duration::from_millis(40))
}

/// Mock backends for `--mock`: a PTU and two pay-as-you-go regions serving `gpt-4o` with
/// request/s limits, an embeddings deployment serving `text-embedding-3-small`, an Anthropic
/// backend serving `claude-sonnet-4-5` (OpenAI-shaped requests for it are translated), and the
/// JSON config that points at them (every setting default; the alias `gpt-4` for `gpt-4o`). Keep the
/// servers alive as long as the gateway runs.
#[cfg(feature = "mock")]
pub async fn mock_backends() -> std::io::Result<(Vec<tower_llm_lb_mock::MockServer>, String)> {
    use tower_llm_lb_mock::MockServer;
    // (name, key, requests per second, tier)
    let specs = [
        ("ptu-eastus", "mock-ptu", 20.0, 0),
        ("paygo-westus", "mock-west", 10.0, 1),
        ("paygo-sweden", "mock-sweden", 10.0, 1),
    ];
    let mut servers = Vec::new();
    let mut backends = serde_json::Map::new();
    for (name, key, rps, tier) in specs {
        let server = chat_mock(name).api_key(key).rps(rps).start().await?;
        backends.insert(
            name.into(),
            serde_json::json!({"provider": "azure", "url": server.url(), "deployment": "gpt-4o",
                               "api_key": key, "priority": tier, "models": ["gpt-4o"]}),
        );
        servers.push(server);
    }
    // An embeddings deployment beside them: requests go by their `model`.
    let embed = MockServer::builder()
        .name("embed-eastus")
        .api_key("mock-embed")
        .rps(20.0)
        .latency(Duration::from_millis(10))
        .start()
        .await?;
    backends.insert(
        "embed-eastus".into(),
        serde_json::json!({"provider": "azure", "url": embed.url(),
                           "deployment": "text-embedding-3-small", "api_key": "mock-embed",
                           "models": ["text-embedding-3-small"]}),
    );
    servers.push(embed);
    // An Anthropic backend: OpenAI-shaped chat requests for its model are translated.
    let claude = chat_mock("claude")
        .x_api_key("mock-claude")
        .rps(10.0)
        .start()
        .await?;
    backends.insert(
        "claude".into(),
        serde_json::json!({"provider": "anthropic", "url": claude.url(), "api_key": "mock-claude",
                           "models": ["claude-sonnet-4-5"]}),
    );
    servers.push(claude);
    // Every other setting default, as a new user's config.
    let config = serde_json::json!({
        "backends": backends,
        "gateway": {"model_aliases": {"gpt-4": "gpt-4o"}}
    });
    Ok((servers, config.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_http::request_id::MakeRequestId;

    #[test]
    fn the_hop_by_hop_match_names_each_hop_by_hop_header_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
        }
        for other in ["content-type", "x-request-id", "hosts", "connection2", ""] {
            assert_eq!(hop_by_hop_index(other), None, "{other}");
        }
    }

    #[test]
    fn a_request_s_tenant_comes_from_its_key_the_header_and_the_config() {
        type Seen = Option<(String, u32, Priority)>;
        fn tenant(
            keys: usize,
            configured: &[(&str, u32, Priority)],
            client: &'static str,
            h: &[(&'static str, &'static str)],
        ) -> Seen {
            let configured = configured
                .iter()
                .map(|(n, weight, priority)| {
                    let name: Arc<str> = (*n).into();
                    let t = Tenant {
                        name: name.clone(),
                        weight: *weight,
                        priority: *priority,
                    };
                    (name, t)
                })
                .collect();
            let mut headers = HeaderMap::new();
            for (k, v) in h {
                headers.insert(
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                );
            }
            let ours = !h.is_empty();
            let t = tenant_of(keys, &configured, client, ours, &mut headers);
            assert!(headers.is_empty(), "the gateway's headers are removed");
            t.map(|t| (t.name.to_string(), t.weight, t.priority))
        }
        let (i, b) = (Priority::Interactive, Priority::Batch);
        // One key, or no key and no header: one tenant, nothing inserted.
        assert_eq!(tenant(1, &[], "key-1", &[]), None);
        assert_eq!(tenant(0, &[], "loopback", &[]), None);
        // Several keys: each its own; the header cannot pick another.
        let named = [("x-llm-lb-tenant", "team-a")];
        assert_eq!(
            tenant(2, &[], "key-2", &named),
            Some(("key-2".into(), 1, i))
        );
        // No keys: the header names it.
        assert_eq!(
            tenant(0, &[], "loopback", &named),
            Some(("team-a".into(), 1, i))
        );
        // The config's weight and priority; a caller can make itself batch, not interactive.
        let conf = [("key-1", 3, i), ("team-a", 2, b)];
        assert_eq!(tenant(1, &conf, "key-1", &[]), Some(("key-1".into(), 3, i)));
        assert_eq!(
            tenant(0, &conf, "loopback", &named),
            Some(("team-a".into(), 2, b))
        );
        let batch = [("x-llm-lb-priority", "batch")];
        assert_eq!(
            tenant(1, &conf, "key-1", &batch),
            Some(("key-1".into(), 3, b))
        );
        assert_eq!(
            tenant(1, &[], "key-1", &batch),
            Some(("key-1".into(), 1, b))
        );
        let interactive = [("x-llm-lb-priority", "interactive")];
        assert_eq!(
            tenant(0, &conf, "loopback", &[named[0], interactive[0]]),
            Some(("team-a".into(), 2, b))
        );
    }

    #[test]
    fn the_access_line_written_in_one_piece_reads_as_its_fields_do() {
        let line = || AccessLine {
            request_id: Some(HeaderValue::from_static("a b\"c")),
            method: http::Method::POST,
            route: Some("/v1/chat/completions"),
            client: "loopback",
            model: Some(Bytes::from_static("gpt-4o\tmini é".as_bytes())),
            started: Instant::now(),
            status: 200,
            backend: Some(metrics::Name::from_shared("east".into())),
            attempts: 2,
            head_us: 1234,
            #[cfg(feature = "otel")]
            span: None,
        };
        // `duration_us` is read from the clock: compare the lines without it.
        let cut = |s: String| s[..s.find(" duration_us=").unwrap()].to_string();
        for tokens in [Some((12, 34)), None] {
            let fields = log::tests::text_of(false, || line().write(tokens));
            let piece = log::tests::text_of(true, || line().write(tokens));
            assert_eq!(cut(piece), cut(fields));
        }
        let fields = log::tests::text_of(false, || line().write(Some((12, 34))));
        assert!(
            fields.contains(r#"request request_id="a b\"c" method=POST path=/v1/chat/completions status=200 backend=east client=loopback model="gpt-4o\tmini é" attempts=2 prompt_tokens=12 completion_tokens=34 elapsed_us=1234 duration_us="#),
            "{fields}"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_removed_every_value_and_nothing_else() {
        let mut headers = http::HeaderMap::new();
        for (k, v) in [
            ("host", "gw"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("keep-alive", "max=100"),
            ("te", "trailers"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("x-private", "kept: only named in connection"),
        ] {
            headers.append(
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        let mut answer = headers.clone();
        strip_hop_by_hop(&mut headers, Some(&http::header::CONTENT_LENGTH));
        let names = |h: &http::HeaderMap| {
            let mut n: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&headers), ["content-type", "x-private"]);
        strip_hop_by_hop(&mut answer, None);
        assert_eq!(
            names(&answer),
            ["content-length", "content-type", "x-private"]
        );
    }

    #[test]
    fn request_ids_are_uuid_v4_text() {
        let id = uuid_v4(u64::MAX, 0);
        assert_eq!(id, "ffffffff-ffff-4fff-8000-000000000000");
        let id = uuid_v4(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
        assert_eq!(id, "01234567-89ab-4def-bedc-ba9876543210");
        let a = FastRequestId
            .make_request_id(&http::Request::new(()))
            .unwrap();
        let b = FastRequestId
            .make_request_id(&http::Request::new(()))
            .unwrap();
        assert_ne!(a.header_value(), b.header_value());
    }
}
