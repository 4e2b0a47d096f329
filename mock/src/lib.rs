//! The test kit of `tower-llm-lb`: a loopback mock LLM server, real hyper on `127.0.0.1`, for
//! the workspace's tests, the demo and users' own tests (add it as a dev-dependency, as
//! `tower-test` is to tower). Beside it: an Entra ID token server ([`MockTokenServer`]), a gRPC
//! mock ([`grpc`], feature `grpc`), a real `redis-server` on a loopback port ([`RedisServer`]),
//! a log capture ([`CapturedLogs`]), the quota simulator ([`sim`]) and the soak driver ([`soak`]).
//!
//! Each [`MockServer`] is one simulated backend with its own port, credential, rate limits, fault
//! script and counters; start as many as you like in one process. It serves:
//!
//! - OpenAI routes: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `GET /v1/models`;
//! - Azure classic routes: `POST /openai/deployments/{deployment}/{op}?api-version=…` and the v1
//!   routes under `/openai/v1/`;
//! - Anthropic: `POST /v1/messages`, checked as Anthropic checks it (`anthropic-version`,
//!   `max_tokens` required, no `system` role in `messages`, no unknown fields, every
//!   `tool_result` answering the previous turn's `tool_use`), with Anthropic's answer, error
//!   and stream shapes (typed events ending in `message_stop`) and `retry-after` in whole seconds.
//! - Tools: a chat or messages request offering tools gets a call of the first one (arguments
//!   `{"q": "mock"}`, streamed in pieces), unless it ends with the tool's result.
//!
//! Behaviour:
//! - **Auth**: the configured credential must be present, else `401`. Any *other* credential header
//!   on a request (a leaked caller or foreign key) is counted in [`MockCounters::foreign_credentials`].
//! - **Rate limits**: request/s and token/s token buckets (tokens estimated as body bytes / 4 plus
//!   `max_tokens`) on tokio's clock, so they follow a paused clock. Past them: `429` with
//!   `retry-after`, `retry-after-ms`, `x-ratelimit-remaining-*` and `x-ratelimit-reset-*`, and an
//!   OpenAI-shaped error body. Successful answers carry the remaining-quota headers too.
//! - **Streaming**: `"stream": true` in the body gets an SSE answer of N chunks, a configurable
//!   delay apart, ending with `data: [DONE]`.
//! - **Faults** ([`Fault`]), switchable at run time: a status code, a hang, a connection reset, a
//!   slow answer, an SSE stream cut mid-way, a quota-exhausted 429.
//!
//! The server stops, with all its connections, when the [`MockServer`] is dropped.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

mod anthropic;
#[cfg(feature = "grpc")]
pub mod grpc;
mod logs;
mod redis;
pub mod sim;
pub mod soak;
mod token;
pub use logs::CapturedLogs;
pub use redis::RedisServer;
pub use token::{MockTokenServer, TokenRegistry};

/// The headers that carry a credential to the services the mock plays (OpenAI's and Azure's
/// `Authorization` / `api-key`, Anthropic's `x-api-key`, API Management's subscription key,
/// cookies and proxy credentials). The mock's own list, not the library's: a credential the
/// gateway forwards where it should not is caught here even if the library forgot the header.
pub const CREDENTIAL_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "api-key",
    "x-api-key",
    "ocp-apim-subscription-key",
    "cookie",
];

/// A loopback port that refuses every connection, reserved for as long as this lives: a socket
/// bound and never listening. (Binding a listener and dropping it frees the port for anyone,
/// a parallel test's server included; a fixed port such as 9 may be open on some machines.)
pub struct RefusingPort {
    _socket: tokio::net::TcpSocket,
    port: u16,
}

impl RefusingPort {
    /// Reserves a free loopback port that refuses connections.
    pub fn new() -> std::io::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let port = socket.local_addr()?.port();
        Ok(RefusingPort {
            _socket: socket,
            port,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl std::fmt::Debug for RefusingPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusingPort")
            .field("port", &self.port)
            .finish()
    }
}

/// A fault a [`MockServer`] injects into every request while it is set.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer this status with an OpenAI-shaped error body.
    Status(u16),
    /// Answer this status with an OpenAI-shaped error body and these headers (for example
    /// `x-should-retry: false`, as OpenAI and Anthropic send on errors a retry will not fix).
    StatusWith(u16, Vec<(String, String)>),
    /// Never answer (the connection stays open).
    Hang,
    /// Close the connection without an answer.
    Reset,
    /// Wait this long before answering normally.
    Slow(Duration),
    /// Streamed answers stop after this many chunks with a broken connection (no `[DONE]`);
    /// plain answers are unaffected.
    TruncateStream(usize),
    /// Answer 429 with an `insufficient_quota` body (billing limit: waiting will not help).
    QuotaExhausted,
    /// Streamed answers end cleanly on the wire after this many chunks, without `[DONE]` (a
    /// proxy that closes the stream early); plain answers are unaffected.
    EndStreamEarly(usize),
    /// Streamed answers are a 200 whose first event is an in-band `overloaded_error` (as
    /// Anthropic sends), then the stream ends; plain answers are unaffected.
    StreamError,
    /// Answer 429 with these headers as they are (hostile or odd wait hints: `retry-after: 0`,
    /// `-1`, a date in the past or in year 9999, `retry-after-ms: -5`, a `date` far off).
    Throttle(Vec<(String, String)>),
    /// The inner fault, only for requests whose path contains the text (one deployment of a
    /// resource out of quota while another is not).
    OnPath(String, Box<Fault>),
    /// Answer this status with this body as `text/html` (a proxy's error page; empty: no body).
    Page(u16, String),
    /// Answer this status with this body as `application/json` (a `200` whose body is an
    /// `{"error": ...}` object, as some OpenAI-compatible servers send).
    Json(u16, String),
}

/// The credential a [`MockServer`] requires.
#[derive(Clone, Debug, Default)]
enum Expect {
    #[default]
    Nothing,
    Header(&'static str, String),
    /// `authorization: Bearer <token>` with a token the registry issued and that has not expired.
    Entra(Arc<TokenRegistry>),
}

/// Builds a [`MockServer`].
#[derive(Clone, Debug)]
#[must_use]
pub struct MockBuilder {
    name: String,
    expect: Expect,
    rps: Option<f64>,
    tps: Option<f64>,
    latency: Duration,
    stream_chunks: usize,
    chunk_delay: Duration,
    gated: bool,
    quota_headers: QuotaHeaders,
    latency_per_token: Duration,
    record: bool,
    /// Counts a request's prompt as its text's characters / 4 times this (none: its JSON
    /// bytes / 4).
    prompt_text: Option<f64>,
}

/// Which quota headers a [`MockServer`] sends with its answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QuotaHeaders {
    /// None at all (Azure PTU deployments).
    Off,
    /// OpenAI's: limit, remaining and reset (a duration until full) per dimension.
    OpenAi,
    /// What Azure standard deployments send: per-minute limit and remaining, no reset.
    Azure,
}

/// Counts of what a [`MockServer`] saw and answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MockCounters {
    /// Requests received.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 429.
    pub throttled: u64,
    /// Answered 401 (missing or wrong credential).
    pub unauthorized: u64,
    /// Answered another 4xx/5xx, or faulted (hang, reset, truncation).
    pub errors: u64,
    /// Requests that carried a credential header other than the expected one.
    pub foreign_credentials: u64,
    /// SSE chunks handed to the connection so far.
    pub streamed_chunks: u64,
    /// Requests being handled right now.
    pub in_flight: u64,
    /// Connections open right now (a client that leaks connections shows here).
    pub connections: u64,
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Method.
    pub method: Method,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers as received (credentials included: this is a test tool).
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
    /// When it arrived (tokio's clock).
    pub at: Instant,
    /// The status answered (0 for a hang or reset).
    pub status: u16,
    /// The wait a 429 answer asked for (its `retry-after-ms`).
    pub retry_after: Option<Duration>,
}

struct Shared {
    name: String,
    expect: Expect,
    latency: Duration,
    latency_per_token: Duration,
    stream_chunks: usize,
    chunk_delay: Duration,
    quota_headers: QuotaHeaders,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    requests: Mutex<Vec<RecordedRequest>>,
    record: bool,
    prompt_text: Option<f64>,
    fault: Mutex<Option<Fault>>,
    buckets: Mutex<Buckets>,
    counters: [AtomicU64; 9],
    /// What this server created and keeps (stored responses, uploaded files), by id: as on the
    /// real services, only the server that created an object knows it.
    stored: Mutex<std::collections::HashMap<String, serde_json::Value>>,
}

impl Shared {
    /// Whether this server created the object `id`.
    fn keeps(&self, id: &str) -> bool {
        self.stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Creates and keeps an object: a fresh id with `prefix` (random, as the services' ids
    /// are, so two servers never make the same one), the object `make` builds around it.
    fn keep(
        &self,
        prefix: &str,
        make: impl FnOnce(&str) -> serde_json::Value,
    ) -> serde_json::Value {
        let id = format!(
            "{prefix}{:016x}{:08x}",
            fastrand::u64(..),
            fastrand::u32(..)
        );
        let object = make(&id);
        self.stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, object.clone());
        object
    }
}

struct Bucket {
    rate: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Bucket {
            rate,
            level: rate.max(1.0),
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.rate.max(1.0));
        self.at = now;
    }

    /// Time until `cost` is available.
    fn wait_for(&self, cost: f64) -> Duration {
        if self.level >= cost || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((cost - self.level) / self.rate)
        }
    }

    fn to_full(&self) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((self.rate.max(1.0) - self.level).max(0.0) / self.rate)
    }
}

#[derive(Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

const C_REQUESTS: usize = 0;
const C_OK: usize = 1;
const C_THROTTLED: usize = 2;
const C_UNAUTHORIZED: usize = 3;
const C_ERRORS: usize = 4;
const C_FOREIGN: usize = 5;
const C_CHUNKS: usize = 6;
const C_IN_FLIGHT: usize = 7;
const C_CONNECTIONS: usize = 8;

/// A running mock LLM backend on loopback. Dropping it stops the server and all its connections.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("name", &self.shared.name)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Default for MockBuilder {
    fn default() -> Self {
        MockBuilder {
            name: "mock".into(),
            expect: Expect::Nothing,
            rps: None,
            tps: None,
            latency: Duration::ZERO,
            stream_chunks: 5,
            chunk_delay: Duration::ZERO,
            gated: false,
            quota_headers: QuotaHeaders::OpenAi,
            latency_per_token: Duration::ZERO,
            record: true,
            prompt_text: None,
        }
    }
}

impl MockBuilder {
    /// Names the server (sent back in `x-mock-server` and in answers).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Requires `api-key: <key>` (Azure).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.expect = Expect::Header("api-key", key.into());
        self
    }

    /// Requires `authorization: Bearer <token>` (OpenAI, Entra ID).
    pub fn bearer(mut self, token: impl Into<String>) -> Self {
        self.expect = Expect::Header("authorization", format!("Bearer {}", token.into()));
        self
    }

    /// Requires `x-api-key: <key>` (Anthropic).
    pub fn x_api_key(mut self, key: impl Into<String>) -> Self {
        self.expect = Expect::Header("x-api-key", key.into());
        self
    }

    /// Requires a bearer token issued by `tokens` and not yet expired (keyless Entra ID auth).
    pub fn entra(mut self, tokens: &MockTokenServer) -> Self {
        self.expect = Expect::Entra(tokens.registry());
        self
    }

    /// Limits requests per second (token bucket, burst = one second's worth).
    pub fn rps(mut self, rps: f64) -> Self {
        self.rps = Some(rps);
        self
    }

    /// Limits tokens per second (token bucket, burst = one second's worth).
    pub fn tps(mut self, tps: f64) -> Self {
        self.tps = Some(tps);
        self
    }

    /// Time taken to answer each request (simulated processing).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Number of content chunks in a streamed answer (default 5).
    pub fn stream_chunks(mut self, n: usize) -> Self {
        self.stream_chunks = n;
        self
    }

    /// Delay between streamed chunks (default none).
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }

    /// Whether answers carry `x-ratelimit-*` quota headers (default true). Without them a 429
    /// carries only `retry-after` / `retry-after-ms`, as Azure PTU deployments answer.
    pub fn quota_headers(mut self, yes: bool) -> Self {
        self.quota_headers = if yes {
            QuotaHeaders::OpenAi
        } else {
            QuotaHeaders::Off
        };
        self
    }

    /// Quota headers as Azure standard deployments send them: `x-ratelimit-limit-*` per
    /// minute (the bucket's rate x 60), `x-ratelimit-remaining-*` as the bucket's level scaled
    /// to that minute, and **no** reset header, while the limit is enforced over the 1 s bucket
    /// (so a minute's share in a burst earns 429s).
    pub fn azure_headers(mut self) -> Self {
        self.quota_headers = QuotaHeaders::Azure;
        self
    }

    /// Extra time per output token (the request's `max_tokens`, 16 when absent), on top of
    /// [`MockBuilder::latency`]: a generation's time grows with its length.
    pub fn latency_per_token(mut self, d: Duration) -> Self {
        self.latency_per_token = d;
        self
    }

    /// Holds every streamed chunk after the first until the test lets it go with
    /// [`MockServer::release_chunks`]: streaming tests that need no clock at all.
    pub fn gated_stream(mut self) -> Self {
        self.gated = true;
        self
    }

    /// Counts a request's tokens as Azure OpenAI documents its rate limiter does: the prompt's
    /// text (message contents and text parts, `system`, `input`, `prompt`), characters / 4,
    /// plus `max_tokens` (or `max_completion_tokens`; 16 without) times the answers asked for
    /// (`n` or `best_of`, the larger); the prompt part times `scale` (1.0: as documented; 1.3 or 0.7: a
    /// service that counts 30% more or less than that). The default counts the request's JSON
    /// bytes / 4 plus the same answer cap.
    pub fn count_prompt_text(mut self, scale: f64) -> Self {
        self.prompt_text = Some(scale);
        self
    }

    /// Whether every request is kept for [`MockServer::requests`] (default true; turn it off
    /// for long simulations).
    pub fn record_requests(mut self, yes: bool) -> Self {
        self.record = yes;
        self
    }

    /// The same backend without a socket: an in-process service, for simulations in virtual
    /// time (see [`sim`]).
    pub fn in_process(self) -> InProcess {
        InProcess {
            shared: self.shared(),
        }
    }

    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start(self) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = self.shared();
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(MockServer { addr, shared, task })
    }

    fn shared(self) -> Arc<Shared> {
        Arc::new(Shared {
            name: self.name,
            expect: self.expect,
            latency: self.latency,
            latency_per_token: self.latency_per_token,
            stream_chunks: self.stream_chunks,
            chunk_delay: self.chunk_delay,
            quota_headers: self.quota_headers,
            gate: self.gated.then(|| Arc::new(tokio::sync::Semaphore::new(0))),
            requests: Mutex::new(Vec::new()),
            record: self.record,
            prompt_text: self.prompt_text,
            fault: Mutex::new(None),
            buckets: Mutex::new(Buckets {
                requests: self.rps.map(Bucket::new),
                tokens: self.tps.map(Bucket::new),
            }),
            counters: Default::default(),
            stored: Mutex::new(std::collections::HashMap::new()),
        })
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set: aborting the accept task drops the set and aborts them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                shared.counters[C_CONNECTIONS].fetch_add(1, SeqCst);
                conns.spawn(async move {
                    let _open = Count(shared.clone(), C_CONNECTIONS);
                    let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

impl MockServer {
    /// A builder with defaults: no credential required, no limits, no latency.
    pub fn builder() -> MockBuilder {
        MockBuilder::default()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Sets (or clears) the fault injected into every following request.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Lets `n` more held chunks of gated streams go (see [`MockBuilder::gated_stream`]).
    pub fn release_chunks(&self, n: usize) {
        if let Some(g) = &self.shared.gate {
            g.add_permits(n);
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> MockCounters {
        self.shared.snapshot()
    }
}

impl Shared {
    fn snapshot(&self) -> MockCounters {
        let g = |i: usize| self.counters[i].load(SeqCst);
        MockCounters {
            requests: g(C_REQUESTS),
            ok: g(C_OK),
            throttled: g(C_THROTTLED),
            unauthorized: g(C_UNAUTHORIZED),
            errors: g(C_ERRORS),
            foreign_credentials: g(C_FOREIGN),
            streamed_chunks: g(C_CHUNKS),
            in_flight: g(C_IN_FLIGHT),
            connections: g(C_CONNECTIONS),
        }
    }
}

impl MockServer {
    /// Checks that no request arrived while an earlier 429 of this server asked to wait: after
    /// a 429 that arrived at `t` asking for `w`, no request may arrive in `(t, t + w)`. (Requests
    /// arriving at `t` itself were already on their way.) Returns the first offending
    /// `(429 arrival, offending arrival)` if one did.
    pub fn request_during_retry_after(&self) -> Option<(Instant, Instant)> {
        let log = self.requests();
        let quiet: Vec<(Instant, Instant)> = log
            .iter()
            .filter(|r| r.status == 429)
            .filter_map(|r| r.retry_after.map(|w| (r.at, r.at + w)))
            .collect();
        log.iter().find_map(|r| {
            quiet
                .iter()
                .find(|(from, to)| r.at > *from && r.at < *to)
                .map(|(from, _)| (*from, r.at))
        })
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Shared {
    fn count(&self, i: usize) {
        self.counters[i].fetch_add(1, SeqCst);
    }

    fn fault(&self) -> Option<Fault> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, rec: RecordedRequest) -> usize {
        if !self.record {
            return usize::MAX;
        }
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        log.push(rec);
        log.len() - 1
    }

    fn set_status(&self, idx: usize, status: u16, retry_after: Option<Duration>) {
        if let Some(r) = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(idx)
        {
            r.status = status;
            r.retry_after = retry_after;
        }
    }
}

/// Takes one off a gauge (in flight, connections open) when dropped.
struct Count(Arc<Shared>, usize);

impl Drop for Count {
    fn drop(&mut self) {
        self.0.counters[self.1].fetch_sub(1, SeqCst);
    }
}

/// A mock backend without a socket: the same behaviour as a [`MockServer`] (routes, auth,
/// limits, faults, counters) as an in-process service, for simulations in virtual time.
#[derive(Clone)]
pub struct InProcess {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("name", &self.shared.name)
            .finish()
    }
}

impl InProcess {
    /// The backend's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> MockCounters {
        self.shared.snapshot()
    }

    /// Sets (or clears) the fault injected into every following request.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }
}

impl tower_service::Service<Request<tower_llm_lb::body::ReplayBody>> for InProcess {
    type Response = Response<MockBody>;
    type Error = std::io::Error;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Response<MockBody>, std::io::Error>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tower_llm_lb::body::ReplayBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        Box::pin(serve(self.shared.clone(), parts, body.bytes().clone()))
    }
}

/// The mock's response body: whole, or streamed from a channel.
pub struct MockBody {
    kind: BodyKind,
}

enum BodyKind {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut res = Response::new(MockBody {
        kind: BodyKind::Full(Some(body.into())),
    });
    *res.status_mut() = status;
    res.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    res
}

fn error_json(status: StatusCode, code: &str, message: &str) -> Response<MockBody> {
    let body = serde_json::json!({
        "error": {"message": message, "type": code, "param": null, "code": code}
    });
    full(status, body.to_string())
}

struct Route {
    model: String,
    anthropic: bool,
    kind: &'static str,
}

/// An error answer: status, code, message.
type Refusal = (StatusCode, &'static str, &'static str);

fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, Refusal> {
    let not_found = || (StatusCode::NOT_FOUND, "not_found", "Resource not found");
    let op = |op: &str| -> Option<&'static str> {
        match op {
            "chat/completions" => Some("chat"),
            "completions" => Some("completion"),
            "embeddings" => Some("embedding"),
            "models" => Some("models"),
            "responses" => Some("chat"),
            "moderations" => Some("moderation"),
            "audio/speech" => Some("speech"),
            "audio/transcriptions" => Some("transcription"),
            _ => None,
        }
    };
    let want_get = |k: &str| (k == "models") == (method == Method::GET);
    // A health endpoint, as load balancers probe (`/status-0123456789abcdef`, `/status`).
    if method == Method::GET && path.starts_with("/status") {
        return Ok(Route {
            model: String::new(),
            anthropic: false,
            kind: "status",
        });
    }
    if path == "/v1/messages" && method == Method::POST {
        return Ok(Route {
            model: String::new(),
            anthropic: true,
            kind: "chat",
        });
    }
    if path == "/v1/messages/count_tokens" && method == Method::POST {
        return Ok(Route {
            model: String::new(),
            anthropic: true,
            kind: "count_tokens",
        });
    }
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let (deployment, rest) = rest.split_once('/').ok_or_else(not_found)?;
        let has_version = query
            .unwrap_or("")
            .split('&')
            .any(|p| p.starts_with("api-version=") && p.len() > "api-version=".len());
        if !has_version {
            return Err((
                StatusCode::BAD_REQUEST,
                "missing_api_version",
                "Missing api-version query parameter",
            ));
        }
        let kind = op(rest).filter(|k| want_get(k)).ok_or_else(not_found)?;
        return Ok(Route {
            model: deployment.to_string(),
            anthropic: false,
            kind,
        });
    }
    // Azure's classic operations of the resource (not of a deployment): the model list.
    if path == "/openai/models" && method == Method::GET {
        return Ok(Route {
            model: String::new(),
            anthropic: false,
            kind: "models",
        });
    }
    let rest = path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/v1/"))
        .ok_or_else(not_found)?;
    // Objects the server keeps: a stored response, an uploaded file.
    let kept = |kind| {
        Ok(Route {
            model: String::new(),
            anthropic: false,
            kind,
        })
    };
    if let Some(id) = rest
        .strip_prefix("responses/")
        .or_else(|| rest.strip_prefix("files/"))
        && !id.is_empty()
        && !id.contains('/')
        && method == Method::GET
    {
        return kept("stored");
    }
    if rest == "files" && method == Method::POST {
        return kept("file");
    }
    let kind = op(rest).filter(|k| want_get(k)).ok_or_else(not_found)?;
    Ok(Route {
        model: String::new(),
        anthropic: false,
        kind,
    })
}

/// Appends the fault's `(name, value)` headers as written (pairs that are not valid headers are
/// skipped).
fn append_headers<B>(res: &mut http::Response<B>, headers: &[(String, String)]) {
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::try_from(k.as_str()),
            HeaderValue::from_str(v),
        ) {
            res.headers_mut().append(k, v);
        }
    }
}

fn header_str(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    serve(shared, parts, body).await
}

/// The characters of a request's prompt text, as a rate limiter that reads the text counts
/// them: message contents (strings, or the `text` of their parts), `system`, `input` and
/// `prompt` (strings or lists of strings).
fn prompt_text_chars(json: &serde_json::Value) -> usize {
    fn text(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.chars().count(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    serde_json::Value::Object(part) => part.get("text").map_or(0, text),
                    other => text(other),
                })
                .sum(),
            _ => 0,
        }
    }
    let messages = json
        .get("messages")
        .and_then(|m| m.as_array())
        .map_or(0, |m| {
            m.iter().map(|m| m.get("content").map_or(0, text)).sum()
        });
    messages
        + ["system", "input", "prompt"]
            .iter()
            .map(|k| json.get(*k).map_or(0, text))
            .sum::<usize>()
}

/// Answers one request whose body has been read: counts, records, applies auth, limits, faults.
async fn serve(
    shared: Arc<Shared>,
    parts: http::request::Parts,
    body: Bytes,
) -> Result<Response<MockBody>, std::io::Error> {
    shared.count(C_REQUESTS);
    shared.counters[C_IN_FLIGHT].fetch_add(1, SeqCst);
    let _in_flight = Count(shared.clone(), C_IN_FLIGHT);
    let idx = shared.record(RecordedRequest {
        method: parts.method.clone(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(String::new, |p| p.to_string()),
        headers: parts.headers.clone(),
        body: body.clone(),
        at: Instant::now(),
        status: 0,
        retry_after: None,
    });
    let res = answer(&shared, &parts, body).await;
    match res {
        Some(mut res) => {
            let status = res.status();
            let header = |name: &str| {
                res.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            // Anthropic's 429s say whole seconds only.
            let retry_after = header("retry-after-ms")
                .map(Duration::from_millis)
                .or_else(|| header("retry-after").map(Duration::from_secs));
            shared.set_status(idx, status.as_u16(), retry_after);
            let counter = match status.as_u16() {
                200..=299 => C_OK,
                429 => C_THROTTLED,
                401 => C_UNAUTHORIZED,
                _ => C_ERRORS,
            };
            shared.count(counter);
            if let Ok(v) = HeaderValue::from_str(&shared.name) {
                res.headers_mut().insert("x-mock-server", v);
            }
            Ok(res)
        }
        None => {
            // Reset: a service error makes hyper drop the connection without an answer.
            shared.count(C_ERRORS);
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
        }
    }
}

/// Builds the answer; `None` means reset the connection.
async fn answer(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: Bytes,
) -> Option<Response<MockBody>> {
    // Auth first, as real services do.
    let mut foreign = false;
    for name in CREDENTIAL_HEADERS {
        if parts.headers.contains_key(name)
            && !matches!(&shared.expect, Expect::Header(n, _) if *n == name)
            && !matches!(&shared.expect, Expect::Entra(_) if name == "authorization")
        {
            foreign = true;
        }
    }
    if foreign {
        shared.count(C_FOREIGN);
    }
    let authorized = match &shared.expect {
        Expect::Nothing => true,
        Expect::Header(name, want) => {
            parts.headers.get(*name).map(|v| v.as_bytes()) == Some(want.as_bytes())
        }
        Expect::Entra(registry) => parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| registry.valid(t, Instant::now())),
    };
    let is_messages = parts.uri.path() == "/v1/messages";
    let refuse = |status: StatusCode, code: &str, message: &str| {
        if is_messages {
            full(status, anthropic::error_body(status, message))
        } else {
            error_json(status, code, message)
        }
    };
    if !authorized {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        ));
    }
    let route = match route(&parts.method, parts.uri.path(), parts.uri.query()) {
        Ok(r) => r,
        Err((status, code, message)) => return Some(error_json(status, code, message)),
    };
    if route.anthropic && !parts.headers.contains_key("anthropic-version") {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        ));
    }
    // An upload is a multipart form, not JSON.
    let json: serde_json::Value =
        if body.is_empty() || ["file", "transcription"].contains(&route.kind) {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(_) => {
                    return Some(refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "We could not parse the JSON body of your request.",
                    ));
                }
            }
        };
    if route.anthropic
        && let Err(message) = anthropic::validate(&json, route.kind == "count_tokens")
    {
        return Some(refuse(StatusCode::BAD_REQUEST, "", &message));
    }
    let responses_api = parts.uri.path().ends_with("/responses");
    if route.kind == "chat"
        && !route.anthropic
        && !responses_api
        && let Err(message) = check_chat(&json)
    {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
        ));
    }
    let fault = match shared.fault() {
        Some(Fault::OnPath(part, inner)) => parts.uri.path().contains(&part).then_some(*inner),
        other => other,
    };
    match &fault {
        Some(Fault::Status(s)) => {
            let status = StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Some(refuse(status, "server_error", "injected fault"));
        }
        Some(Fault::StatusWith(s, headers)) => {
            let status = StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut res = refuse(status, "server_error", "injected fault");
            append_headers(&mut res, headers);
            return Some(res);
        }
        Some(Fault::Hang) => std::future::pending::<()>().await,
        Some(Fault::Reset) => return None,
        Some(Fault::Slow(d)) => tokio::time::sleep(*d).await,
        Some(Fault::Page(status, page)) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut res = full(status, page.clone());
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("text/html"));
            return Some(res);
        }
        Some(Fault::Json(status, body)) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut res = full(status, body.clone());
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return Some(res);
        }
        Some(Fault::Throttle(headers)) => {
            let mut res = refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "429",
                "Rate limit reached. Please retry after the time in the retry-after header.",
            );
            append_headers(&mut res, headers);
            return Some(res);
        }
        Some(Fault::QuotaExhausted) => {
            return Some(error_json(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
            ));
        }
        // A path filter inside a path filter applies to nothing.
        Some(Fault::TruncateStream(_))
        | Some(Fault::EndStreamEarly(_))
        | Some(Fault::StreamError)
        | Some(Fault::OnPath(..))
        | None => {}
    }
    if route.kind == "status" {
        return Some(full(StatusCode::OK, r#"{"status":"ok"}"#));
    }
    if responses_api
        && let Some(prev) = json.get("previous_response_id").and_then(|v| v.as_str())
        && !shared.keeps(prev)
    {
        return Some(full(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": {
                "message": format!("Previous response with id '{prev}' not found."),
                "type": "invalid_request_error", "param": "previous_response_id",
                "code": "previous_response_not_found"}})
            .to_string(),
        ));
    }
    if route.kind == "stored" {
        let id = parts.uri.path().rsplit('/').next().unwrap_or("");
        let found = shared
            .stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        return Some(match found {
            Some(object) => full(StatusCode::OK, object.to_string()),
            None => error_json(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("No such object: '{id}'"),
            ),
        });
    }
    // Rate limits.
    // The answer's cap, once per answer asked for: Azure documents counting the prompt, its
    // count (`n`), `max_tokens` and `best_of`.
    let answers = ["n", "best_of"]
        .iter()
        .filter_map(|k| json.get(*k).and_then(|v| v.as_u64()))
        .max()
        .unwrap_or(1)
        .clamp(1, 128);
    let max_tokens = json
        .get("max_tokens")
        .or_else(|| json.get("max_completion_tokens"))
        .and_then(|v| v.as_u64())
        .unwrap_or(16)
        * answers;
    let prompt_tokens = match shared.prompt_text {
        Some(scale) => (prompt_text_chars(&json) as f64 / 4.0 * scale).ceil(),
        None => (body.len() as f64 / 4.0).ceil(),
    };
    let cost_tokens = prompt_tokens + max_tokens as f64;
    let (limited, quota_headers) = {
        let mut b = shared.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        if let Some(r) = &mut b.requests {
            r.refill(now);
            wait = wait.max(r.wait_for(1.0));
        }
        if let Some(t) = &mut b.tokens {
            t.refill(now);
            wait = wait.max(t.wait_for(cost_tokens));
        }
        if wait.is_zero() {
            if let Some(r) = &mut b.requests {
                r.level -= 1.0;
            }
            if let Some(t) = &mut b.tokens {
                t.level -= cost_tokens;
            }
        }
        let mut h = HeaderMap::new();
        let dims = [(&b.requests, "requests"), (&b.tokens, "tokens")];
        for (bucket, dim) in dims {
            let Some(bucket) = bucket else { continue };
            let cap = bucket.rate.max(1.0);
            let level = bucket.level.max(0.0);
            let (limit, remaining, reset) = match shared.quota_headers {
                QuotaHeaders::Off => continue,
                QuotaHeaders::OpenAi => (cap, level, Some(bucket.to_full())),
                QuotaHeaders::Azure => {
                    let per_minute = (bucket.rate * 60.0).round();
                    (per_minute, (level / cap * per_minute).floor(), None)
                }
            };
            h.insert(ratelimit_header("limit", dim), num(limit as u64));
            h.insert(ratelimit_header("remaining", dim), num(remaining as u64));
            if let Some(reset) = reset {
                h.insert(ratelimit_header("reset", dim), go_duration(reset));
            }
        }
        ((!wait.is_zero()).then_some(wait), h)
    };
    let quota_headers = if route.anthropic {
        anthropic_quota_headers(quota_headers)
    } else {
        quota_headers
    };
    if let Some(wait) = limited {
        let mut res = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "429",
            "Requests to the ChatCompletions_Create Operation have exceeded call rate limit. \
             Please retry after the time given in the retry-after header.",
        );
        let h = res.headers_mut();
        h.extend(quota_headers);
        if !route.anthropic {
            // Anthropic sends whole seconds only.
            let ms = wait.as_secs_f64() * 1000.0;
            h.insert("retry-after-ms", num(ms.ceil() as u64));
        }
        h.insert("retry-after", num(wait.as_secs_f64().ceil() as u64));
        return Some(res);
    }
    let latency = shared.latency + shared.latency_per_token * max_tokens.min(4096) as u32;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let stream = json.get("stream").and_then(|v| v.as_bool()) == Some(true);
    let model = json
        .get("model")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or(route.model);
    let mut res = if stream {
        let (cut, stop) = match fault {
            Some(Fault::TruncateStream(n)) => (Some(n), None),
            Some(Fault::EndStreamEarly(n)) => (None, Some(n)),
            _ => (None, None),
        };
        if fault == Some(Fault::StreamError) {
            let event = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
            let mut res = full(StatusCode::OK, event);
            res.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            return Some(res);
        }
        let input_tokens = cost_tokens as u64 - max_tokens;
        let chunks = shared.stream_chunks;
        let shape = if responses_api && !route.anthropic {
            let text = format!("Hello from {}", shared.name);
            let object = shared.keep("resp_", |id| {
                response_object(id, &model, &json, &text, input_tokens)
            });
            responses_stream(object)
        } else if route.anthropic {
            let tool = anthropic::tool_to_call(&json);
            let calls = tool.is_some();
            let thinking = anthropic::thinking_budget(&json).is_some();
            let index = u64::from(thinking);
            Stream {
                head: anthropic::stream_head(&model, input_tokens, tool.as_deref(), thinking),
                chunk: Box::new(move |i| anthropic::stream_chunk(i, calls, index)),
                tail: anthropic::stream_tail(chunks, calls, index),
            }
        } else {
            // OpenAI sends one last chunk with `usage` when the caller asked for it.
            let usage = json
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
                .then_some((input_tokens, chunks as u64));
            openai_stream(model, openai_tool_to_call(&json), usage)
        };
        sse(shared.clone(), shape, cut, stop)
    } else {
        // Asked for structured output: JSON following the schema, as text.
        let text = structured_schema(&json)
            .map(|s| instance_of(s).to_string())
            .unwrap_or_else(|| format!("Hello from {}", shared.name));
        let input_tokens = cost_tokens as u64 - max_tokens;
        let body = match (route.anthropic, route.kind) {
            (true, "count_tokens") => serde_json::json!({ "input_tokens": input_tokens }),
            (true, _) => {
                let tool = anthropic::tool_to_call(&json);
                let thinking = anthropic::thinking_budget(&json).is_some();
                anthropic::message(&model, &text, tool.as_deref(), input_tokens, thinking)
            }
            (_, "chat") if openai_tool_to_call(&json).is_some() => {
                let name = openai_tool_to_call(&json).unwrap_or_default();
                serde_json::json!({
                    "id": "chatcmpl-mock", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "finish_reason": "tool_calls",
                                 "message": {"role": "assistant", "content": null,
                                             "tool_calls": [{"id": "call_mock_0", "type": "function",
                                                             "function": {"name": name,
                                                                          "arguments": "{\"q\": \"mock\"}"}}]}}],
                    "usage": {"prompt_tokens": input_tokens, "completion_tokens": 4,
                              "total_tokens": input_tokens + 4}
                })
            }
            (_, "embedding") => serde_json::json!({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 4, "total_tokens": 4}
            }),
            (_, "transcription") => serde_json::json!({ "text": text }),
            (_, "moderation") => serde_json::json!({
                "id": "modr-mock", "model": model,
                "results": [{"flagged": false, "categories": {}, "category_scores": {}}]
            }),
            (_, "models") => serde_json::json!({
                "object": "list", "data": [{"id": model, "object": "model", "owned_by": shared.name}]
            }),
            (_, "file") => shared.keep("file-", |id| {
                serde_json::json!({"id": id, "object": "file", "bytes": body.len(),
                                   "filename": "upload", "purpose": "user_data"})
            }),
            (_, "chat") if responses_api => shared.keep("resp_", |id| {
                response_object(id, &model, &json, &text, input_tokens)
            }),
            _ => serde_json::json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": cost_tokens as u64 - max_tokens, "completion_tokens": 4,
                          "total_tokens": cost_tokens as u64 - max_tokens + 4}
            }),
        };
        if route.kind == "speech" {
            // Speech: audio bytes, not JSON (a fixed pattern the tests can check).
            let audio: Vec<u8> = (0..SPEECH_BYTES).map(|i| (i % 251) as u8).collect();
            let mut res = full(StatusCode::OK, audio);
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("audio/mpeg"));
            res
        } else {
            full(StatusCode::OK, body.to_string())
        }
    };
    res.headers_mut().extend(quota_headers);
    let rid = header_str(&parts.headers, "x-request-id");
    if let Ok(v) = HeaderValue::from_str(if rid.is_empty() { "mock-request" } else { &rid }) {
        res.headers_mut().insert("x-request-id", v);
    }
    Some(res)
}

fn ratelimit_header(kind: &str, dim: &str) -> http::HeaderName {
    http::HeaderName::try_from(format!("x-ratelimit-{kind}-{dim}"))
        .unwrap_or(http::HeaderName::from_static("x-ratelimit-unknown"))
}

fn num(n: u64) -> HeaderValue {
    HeaderValue::from(n)
}

fn go_duration(d: Duration) -> HeaderValue {
    let ms = d.as_millis();
    let s = if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.3}s", d.as_secs_f64())
    };
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("0s"))
}

/// A stream's events: what comes first, the `i`th content event, what ends it.
/// The JSON Schema a request asks its answer to follow: OpenAI's `response_format`
/// (`json_schema`), Anthropic's `output_config.format`.
fn structured_schema(req: &serde_json::Value) -> Option<&serde_json::Value> {
    req.pointer("/response_format/json_schema/schema")
        .or_else(|| req.pointer("/output_config/format/schema"))
        .filter(|s| s.is_object())
}

/// A value that follows `schema` (the first `enum` value; each property of an object).
fn instance_of(schema: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, s)| (k.clone(), instance_of(s)))
                .collect(),
        ),
        Some("array") => Value::Array(vec![instance_of(
            schema.get("items").unwrap_or(&Value::Null),
        )]),
        Some("string") => "mock".into(),
        Some("integer") | Some("number") => 1.into(),
        Some("boolean") => true.into(),
        _ => Value::Null,
    }
}

/// Structured outputs' rule for a schema, as Anthropic and OpenAI's strict mode state it: every
/// object sets `additionalProperties: false`.
fn closed_objects(schema: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    match schema {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("object")
                && map.get("additionalProperties") != Some(&Value::Bool(false))
            {
                return Err(
                    "output_config.format.schema: For 'object' type, 'additionalProperties' must be explicitly set to false"
                        .into(),
                );
            }
            map.values().try_for_each(closed_objects)
        }
        Value::Array(items) => items.iter().try_for_each(closed_objects),
        _ => Ok(()),
    }
}

/// How many bytes of audio the mock's speech answers carry: byte `i` is `i % 251`.
pub const SPEECH_BYTES: usize = 100_000;

/// A stored response of the Responses API (`POST /v1/responses`), as the service answers it.
fn response_object(
    id: &str,
    model: &str,
    req: &serde_json::Value,
    text: &str,
    input_tokens: u64,
) -> serde_json::Value {
    serde_json::json!({
        "id": id, "object": "response", "status": "completed", "model": model,
        "previous_response_id": req.get("previous_response_id"),
        "output": [{"type": "message", "id": format!("msg_{}", id.trim_start_matches("resp_")),
                    "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text}]}],
        "usage": {"input_tokens": input_tokens, "output_tokens": 4,
                  "total_tokens": input_tokens + 4}
    })
}

/// A streamed Responses API answer: `response.created` (the response in progress),
/// `response.output_text.delta` events, `response.completed` with the whole response.
fn responses_stream(response: serde_json::Value) -> Stream {
    let event = |name: &str, data: serde_json::Value| {
        Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
    };
    let mut created = response.clone();
    created["status"] = "in_progress".into();
    created["output"] = serde_json::json!([]);
    let item = response["output"][0]["id"].clone();
    Stream {
        head: vec![event(
            "response.created",
            serde_json::json!({"type": "response.created", "response": created}),
        )],
        chunk: Box::new(move |_| {
            let delta = serde_json::json!({"type": "response.output_text.delta",
                "item_id": item, "output_index": 0, "content_index": 0, "delta": "mock "});
            Bytes::from(format!(
                "event: response.output_text.delta\ndata: {delta}\n\n"
            ))
        }),
        tail: vec![event(
            "response.completed",
            serde_json::json!({"type": "response.completed", "response": response}),
        )],
    }
}

struct Stream {
    head: Vec<Bytes>,
    chunk: Box<dyn Fn(usize) -> Bytes + Send>,
    tail: Vec<Bytes>,
}

/// The tool an OpenAI chat answer calls, if any: the first tool offered, unless a tool's
/// result came after the last assistant turn or the caller said `none`.
fn openai_tool_to_call(req: &serde_json::Value) -> Option<String> {
    let first = req.pointer("/tools/0/function/name")?.as_str()?;
    if req.get("tool_choice").and_then(|c| c.as_str()) == Some("none") {
        return None;
    }
    // The turns since the last assistant turn: a tool result among them answers the call.
    let messages = req.get("messages")?.as_array()?;
    fn role(m: &serde_json::Value) -> &str {
        m.get("role").and_then(|r| r.as_str()).unwrap_or("")
    }
    let answered = messages
        .iter()
        .rev()
        .take_while(|m| role(m) != "assistant")
        .any(|m| role(m) == "tool");
    (!answered).then(|| first.to_string())
}

/// Refuses what OpenAI refuses: Anthropic's own parameters, and a tool result that answers
/// no earlier tool call.
fn check_chat(req: &serde_json::Value) -> Result<(), String> {
    for key in ["system", "stop_sequences", "top_k", "thinking"] {
        if req.get(key).is_some() {
            return Err(format!("Unrecognized request argument supplied: {key}"));
        }
    }
    let mut calls: Vec<&str> = Vec::new();
    for m in req
        .get("messages")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(tc) = m.get("tool_calls").and_then(|t| t.as_array()) {
            calls.extend(tc.iter().filter_map(|c| c.get("id")?.as_str()));
        }
        if m.get("role").and_then(|r| r.as_str()) == Some("tool") {
            let id = m.get("tool_call_id").and_then(|i| i.as_str()).unwrap_or("");
            if !calls.contains(&id) {
                return Err(
                    "Invalid parameter: messages with role 'tool' must be a response \
                            to a preceeding message with 'tool_calls'."
                        .into(),
                );
            }
        }
    }
    Ok(())
}

/// Anthropic's names for the quota headers (no reset: Anthropic's is an RFC 3339 time).
fn anthropic_quota_headers(h: HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in &h {
        let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") else {
            continue;
        };
        let Some((kind, dim)) = rest.split_once('-') else {
            continue;
        };
        if kind == "reset" {
            continue;
        }
        if let Ok(n) = http::HeaderName::try_from(format!("anthropic-ratelimit-{dim}-{kind}")) {
            out.insert(n, value.clone());
        }
    }
    out
}

fn openai_stream(model: String, tool: Option<String>, usage: Option<(u64, u64)>) -> Stream {
    let chunk = move |model: &str, delta: serde_json::Value, finish: Option<&str>| {
        let c = serde_json::json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        Bytes::from(format!("data: {c}\n\n"))
    };
    let calls = tool.is_some();
    let mut head = Vec::new();
    let mut tail = Vec::new();
    if let Some(name) = &tool {
        head.push(chunk(
            &model,
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_mock_0", "type": "function",
                 "function": {"name": name, "arguments": ""}}]}),
            None,
        ));
        tail.push(chunk(
            &model,
            serde_json::json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"}"}}]}),
            None,
        ));
        tail.push(chunk(&model, serde_json::json!({}), Some("tool_calls")));
    }
    if let Some((prompt, completion)) = usage {
        let c = serde_json::json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}
        });
        tail.push(Bytes::from(format!("data: {c}\n\n")));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Stream {
        head,
        chunk: Box::new(move |i| {
            let delta = if calls {
                let piece = if i == 0 {
                    "{\"q\": \"tok0 ".to_string()
                } else {
                    format!("tok{i} ")
                };
                serde_json::json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            } else {
                serde_json::json!({"content": format!("tok{i} ")})
            };
            chunk(&model, delta, None)
        }),
        tail,
    }
}

fn sse(
    shared: Arc<Shared>,
    shape: Stream,
    cut_after: Option<usize>,
    stop_after: Option<usize>,
) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let chunks = shared.stream_chunks;
    let delay = shared.chunk_delay;
    tokio::spawn(async move {
        for head in shape.head {
            if tx.send(Ok(head)).await.is_err() {
                return;
            }
        }
        for i in 0..chunks {
            if stop_after == Some(i) {
                return; // the channel closes: a clean end on the wire, no end marker
            }
            if cut_after == Some(i) {
                let _ = tx
                    .send(Err(std::io::Error::from(
                        std::io::ErrorKind::ConnectionReset,
                    )))
                    .await;
                return;
            }
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if i > 0
                && let Some(gate) = &shared.gate
            {
                match gate.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            if tx.send(Ok((shape.chunk)(i))).await.is_err() {
                return;
            }
            shared.count(C_CHUNKS);
        }
        for tail in shape.tail {
            if tx.send(Ok(tail)).await.is_err() {
                return;
            }
        }
    });
    let mut res = Response::new(MockBody {
        kind: BodyKind::Channel(rx),
    });
    res.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    res
}

#[cfg(test)]
mod tests {
    use super::prompt_text_chars;

    #[test]
    fn the_prompt_text_is_what_the_messages_system_input_and_prompt_say() {
        let count = |v: serde_json::Value| prompt_text_chars(&v);
        assert_eq!(
            count(serde_json::json!({"model": "gpt-4o", "max_tokens": 20,
                "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Say hello."}]})),
            19
        );
        // Parts: only their text; an image's URL is not text.
        assert_eq!(
            count(
                serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
            ),
            5
        );
        // Anthropic's system, embeddings' inputs, completions' prompt; characters, not bytes.
        assert_eq!(
            count(
                serde_json::json!({"system": "Hé", "messages": [], "input": ["ab", "c"], "prompt": "xyz"})
            ),
            8
        );
    }
}
