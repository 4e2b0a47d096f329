//! `Endpoint`: the per-backend layer that points a request at one backend and records what
//! happened.
//!
//! One request can be sent to any backend of a group: [`Endpoint`] rewrites its scheme, authority,
//! path and query for its [`Backend`] (see [`provider`](crate::provider) for the path
//! convention), sets `Host` to the backend's authority, and sets provider-required headers
//! (`anthropic-version`). It then classifies the attempt once, with the stack's
//! [`Classify`] policy, writes the result into the backend's [`BackendState`], and stamps it on
//! the response as a [`Served`] extension (or inside a [`BackendError`]) for the layers above.
//!
//! | outcome | what `Endpoint` does |
//! |---|---|
//! | success | records latency and quota hints; `x-ratelimit-remaining-requests` becomes credits (less the requests already in flight) that `Balance` spends freely, after which it paces the backend at the quota's refill interval (the largest recent `reset / (limit - remaining)`: whole-number hints only ever understate it); at 0 the backend rests for one interval at once; `x-ratelimit-remaining-tokens: 0` marks it low on headroom until the token reset so `Balance` prefers others; resets the throttle streak; returns the response |
//! | 429 / 529 / 503 with a hint | cools the backend down until the hint (no hint: exponential backoff with jitter, capped); a cooldown only ever extends; without quota headers, also paces the backend: at the rate it let requests through since its previous 429 (once 20 got through; it was saturated, so that is its real rate), before that at one request per the wait (at most 1 s); the pace shrinks 0.05% with each later answer that is not throttled; returns the response |
//! | 429 with a billing / spend-limit body | cools the backend down for the long quota-exhausted period and logs a warning once; returns the response |
//! | 5xx, other 4xx | counts it, returns the response (the circuit breaker decides about health) |
//! | connect error, broken connection, timeout | counts it, answers [`BackendError`] naming the backend and the outcome |
//! | a path that cannot be mapped | answers [`error::InvalidTarget`] without sending |
//! | a `200` JSON answer whose body is an `{"error": {...}}` object, with [`Settings::json_error_in_success`] (on in `stack::group` and the gateway) | a server error (a throttle when it says `rate_limit` / `overloaded`), the body passed on unchanged |
//! | the backend asked for a wait (429 hint) that is not over | answers [`Unavailable`](crate::error::Unavailable) with the end of the wait, without sending: a `RetryAfter429` above waits for it (or moves on) instead of earning another 429 |
//! | a retry after a failure that must go to a backend not tried yet, and this one was tried | answers [`Unavailable`](crate::error::Unavailable) without sending, so the retry layer backs off before coming back |
//! | another backend's credential on the request (an `AuthInject` for one backend placed above the `Balance`) | answers [`CredentialMisplaced`](crate::error::CredentialMisplaced) without sending |
//!
//! Each attempt counts as in flight on its backend from sending until its answer has been read
//! to the end (or dropped), so a long stream keeps counting for load-aware picks.
//!
//! Response bodies stream through untouched ([`ResponseBody`]). Only for throttled answers is
//! the error body read, bounded by [`Settings::error_body_limit`] (default 16 KiB), to spot
//! quota exhaustion; those bytes are replayed to the caller first.
//!
//! Endpoint never follows redirects (the hyper client does not either), so a credential never
//! travels to another origin.
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_lb::{Backend, endpoint::{EndpointLayer, Served}};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! let westus = Backend::azure("westus", "https://w.openai.azure.com", "gpt-4o", "2024-10-21").build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(EndpointLayer::new(westus))
//!     .service(service_fn(|req: http::Request<String>| async move {
//!         assert_eq!(
//!             req.uri(),
//!             "https://w.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
//!         );
//!         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//!     }));
//! let res = svc.oneshot(http::Request::post("/v1/chat/completions").body(String::new())?).await?;
//! assert_eq!(res.extensions().get::<Served>().unwrap().backend.name(), "westus");
//! # Ok(()) }
//! ```

mod future;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Uri};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::Backend;
use crate::classify::retry_after::{DEFAULT_MAX_HINT, Hints, WallClock};
use crate::classify::{Classify, Outcome, Standard};
use crate::error::{self, BackendError, BoxError};
use crate::provider::{ANTHROPIC_VERSION, Provider};
use crate::rng::Rng;
use crate::state::BackendState;

pub use crate::attempt::Served;
use crate::attempt::{AsWritten, Deployment};
pub use crate::body::ResponseBody;
pub use future::ResponseFuture;

/// How an [`Endpoint`] reads answers: its fields are the settings, each with its default and
/// why. Set the ones you change and take the rest from `default()`:
///
/// ```
/// use std::time::Duration;
/// use tower_llm_lb::{Backend, endpoint::{EndpointLayer, Settings}};
///
/// # fn main() -> Result<(), tower_llm_lb::BoxError> {
/// let backend = Backend::openai("local", "http://127.0.0.1:8000/v1").build()?;
/// let layer = EndpointLayer::new(backend).settings(Settings {
///     hold_stream_start: Some(64 * 1024),
///     ..Settings::default()
/// });
/// # let _ = layer; Ok(()) }
/// ```
///
/// Server hints are capped at 300 s whatever they say.
#[derive(Clone)]
pub struct Settings {
    /// The classification policy (default [`Standard`]; write your own [`Classify`] for a
    /// service that says "throttled" its own way).
    pub classify: Arc<dyn Classify>,
    /// The wall clock for HTTP-date and RFC 3339 hints (default the system's; inject one in
    /// tests on tokio's paused clock).
    pub wall_clock: WallClock,
    /// The cooldown after a 429 without a hint: `backoff_base * 2^(streak-1)`, capped at
    /// `backoff_max`, less up to 25% jitter (default 1 s doubling to 10 s).
    pub backoff_base: Duration,
    /// See `backoff_base` (default 10 s).
    pub backoff_max: Duration,
    /// How long a backend whose quota is exhausted (billing, spend limit) is left alone
    /// (default 10 minutes: such a quota does not come back by itself within seconds).
    pub quota_exhausted_cooldown: Duration,
    /// How much of a throttled or failed answer's body may be read to classify it (default
    /// 16 KiB: every provider's error object fits).
    pub error_body_limit: usize,
    /// Opt-in (default: none): hold back the start of a streamed (SSE) answer, up to this many
    /// bytes, until its first event with content (or the stream's end) has arrived. An error
    /// the provider sends inside a 200 stream before any content (`event: error`, an
    /// `{"error": …}` event; Anthropic `overloaded_error`) then makes the attempt a failure (a
    /// throttle for overload) that the layers above can retry or fail over, since nothing
    /// reached the caller yet. Costs the time to the first content event; the held bytes are
    /// passed on unchanged.
    pub hold_stream_start: Option<usize>,
    /// Whether a `200` JSON answer (not a stream) whose top-level object starts with an
    /// `"error"` object (`{"error": {...}}`, as some OpenAI-compatible servers and proxies send
    /// for a failure) is a failure rather than a success (default off here; on in
    /// [`stack::group`](crate::stack::group) and the gateway): a server error, or a
    /// throttle when its text says `rate_limit` or `overloaded`, retried and failed over like
    /// one. Costs holding the answer's head until its first bytes arrive (they are passed on
    /// unchanged), and about 1 200 instructions per answer (`BENCHMARKS.md`). Streams are
    /// unaffected (`hold_stream_start` is their opt-in).
    pub json_error_in_success: bool,
    /// The random source for backoff jitter (seed it for repeatable tests; default: from
    /// entropy).
    pub rng: Rng,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            classify: Arc::new(Standard),
            wall_clock: WallClock::default(),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            quota_exhausted_cooldown: Duration::from_secs(600),
            error_body_limit: 16 * 1024,
            hold_stream_start: None,
            json_error_in_success: false,
            rng: Rng::from_entropy(),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("quota_exhausted_cooldown", &self.quota_exhausted_cooldown)
            .field("error_body_limit", &self.error_body_limit)
            .field("hold_stream_start", &self.hold_stream_start)
            .field("json_error_in_success", &self.json_error_in_success)
            .finish_non_exhaustive()
    }
}

/// Layer that wraps a service in [`Endpoint`] for one backend, or for whichever backend a
/// [`BalanceLayer`](crate::balance::BalanceLayer) above chose ([`EndpointLayer::for_chosen`]).
#[derive(Clone)]
pub struct EndpointLayer {
    backend: Option<Backend>,
    settings: Arc<Settings>,
}

impl EndpointLayer {
    /// Points requests at `backend`, with the default [`Settings`].
    pub fn new(backend: Backend) -> Self {
        Self::with_backend(Some(backend))
    }

    /// Like [`EndpointLayer::new`], for the backend a [`BalanceLayer`](crate::balance::BalanceLayer)
    /// above chose for each request (its mark on the request): one
    /// `Endpoint` and one client serve every backend of the group. A request nobody marked is
    /// refused with [`error::NoBackendChosen`], without sending.
    pub fn for_chosen() -> Self {
        Self::with_backend(None)
    }

    fn with_backend(backend: Option<Backend>) -> Self {
        EndpointLayer {
            backend,
            settings: Arc::new(Settings::default()),
        }
    }

    /// Reads answers with these settings.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = Arc::new(settings);
        self
    }

    /// The same settings for another backend.
    pub(crate) fn for_backend(&self, backend: Backend) -> Self {
        EndpointLayer {
            backend: Some(backend),
            settings: self.settings.clone(),
        }
    }
}

impl fmt::Debug for EndpointLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointLayer")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for EndpointLayer {
    type Service = Endpoint<S>;

    fn layer(&self, inner: S) -> Endpoint<S> {
        Endpoint {
            inner,
            backend: self.backend.clone(),
            settings: self.settings.clone(),
        }
    }
}

/// Middleware that sends requests to one backend and records each attempt's outcome. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Endpoint<S> {
    inner: S,
    backend: Option<Backend>,
    settings: Arc<Settings>,
}

impl<S: fmt::Debug> fmt::Debug for Endpoint<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("backend", &self.backend)
            .field("inner", &self.inner)
            .finish()
    }
}

/// Rewrites `req` for `backend`.
fn route<B>(backend: &Backend, req: &mut Request<B>) -> Result<(), error::InvalidTarget> {
    if req.extensions().get::<AsWritten>().is_some() {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(backend.scheme().clone());
        parts.authority = Some(backend.authority().clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|_| error::InvalidTarget::new(backend.name_arc().clone()))?;
        finish_route(backend, req);
        return Ok(());
    }
    let uri = req.uri();
    let deployment = req.extensions().get::<Deployment>().map(|d| &*d.0);
    if deployment.is_none()
        && uri.query().is_none()
        && let Some(target) = backend.common_uri(uri.path())
    {
        *req.uri_mut() = target.clone();
        finish_route(backend, req);
        return Ok(());
    }
    let target = backend.provider().target_path_for(
        backend.base_path(),
        uri.path(),
        uri.query(),
        deployment,
    );
    let path_and_query = PathAndQuery::try_from(target)
        .map_err(|_| error::InvalidTarget::new(backend.name_arc().clone()))?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(backend.scheme().clone());
    parts.authority = Some(backend.authority().clone());
    parts.path_and_query = Some(path_and_query);
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| error::InvalidTarget::new(backend.name_arc().clone()))?;
    finish_route(backend, req);
    Ok(())
}

/// The headers that go with the new URI. `Host` is always the backend's (a caller's is
/// replaced; setting the precomputed value also spares the client deriving it from the URI).
fn finish_route<B>(backend: &Backend, req: &mut Request<B>) {
    let headers = req.headers_mut();
    headers.insert(http::header::HOST, backend.host().clone());
    if let Provider::Anthropic { version } = backend.provider() {
        headers.insert(ANTHROPIC_VERSION.clone(), version.clone());
    }
}

impl<S, ReqB: 'static, ResB> Service<Request<ReqB>> for Endpoint<S>
where
    S: Service<Request<ReqB>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Response = http::Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| {
            let e = e.into();
            let Some(backend) = &self.backend else {
                // Shared by every backend: no one backend to blame.
                return e;
            };
            let outcome = self.settings.classify.classify_error(&*e);
            backend.state().record_outcome(&outcome);
            BackendError::new(backend.name_arc().clone(), outcome, e).into()
        })
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let (backend, start, tokens) = match &self.backend {
            // A backend of a group: the cost its `Balance` put on the request, where the token
            // quota is tracked.
            Some(b) => (
                b.clone(),
                Instant::now(),
                crate::body::token_cost_on(b, &req),
            ),
            // The pick's own clock reading (microseconds ago) starts the attempt.
            None => match req.extensions().get::<crate::attempt::Chosen>() {
                Some(c) => (c.0.clone(), c.1, c.2),
                None => return ResponseFuture::failed(error::NoBackendChosen.into()),
            },
        };
        if let Some(e) = refusal(&backend, &req, start) {
            return ResponseFuture::failed(e);
        }
        let end_marker = crate::provider::stream_end_marker(req.uri().path());
        if let Err(e) = route(&backend, &mut req) {
            return ResponseFuture::failed(e.into());
        }
        let (guard, awaiting) = {
            let state = backend.state();
            (state.start_request(tokens), Some(state.await_head(start)))
        };
        let record = Record {
            guard,
            awaiting,
            backend,
            settings: self.settings.clone(),
            start,
            end_marker,
        };
        ResponseFuture::new(self.inner.call(req), record)
    }
}

/// Why `req` must not go to `backend` now, if it must not: the backend asked for a wait that is
/// not over (a `Balance` above skips it already; without one, a retry waits for it instead of
/// earning another 429); the request is a retry that must go to a backend not tried yet (after
/// a failure), and this one was tried, so the retry layer backs off first; or it carries
/// another backend's credential. Nothing is sent.
#[inline]
fn refusal<B>(backend: &Backend, req: &Request<B>, now: Instant) -> Option<BoxError> {
    let state = backend.state();
    if let Some(until) = state.throttled_until().filter(|u| *u > now) {
        return Some(
            crate::error::Unavailable::new(backend.name_arc().clone(), Some(until)).into(),
        );
    }
    let ext = req.extensions();
    if ext
        .get::<crate::attempt::Steer>()
        .is_some_and(|s| s.refuses(backend.name()))
    {
        return Some(crate::error::Unavailable::new(backend.name_arc().clone(), None).into());
    }
    if let Some(owned) = ext.get::<crate::attempt::InjectedFor>()
        && owned.authority != *backend.authority()
    {
        return Some(
            crate::error::CredentialMisplaced::new(
                owned.backend.clone(),
                backend.name_arc().clone(),
            )
            .into(),
        );
    }
    None
}

/// How long a backend that rejected our credential is first left alone (doubling each time it
/// rejects it again, up to an hour).
const CREDENTIAL_COOLDOWN: Duration = Duration::from_secs(60);

/// The first backoff after a throttled answer whose hint says "now" (`retry-after: 0`, a date
/// in the past): short, as the server asked for little, but never none.
const NOW_BACKOFF: Duration = Duration::from_millis(100);

/// What an in-flight attempt needs to record its outcome.
pub(crate) struct Record {
    guard: crate::state::InFlight,
    /// Dropped with the record: when the answer's head (or an error) came, or the attempt was
    /// abandoned.
    awaiting: Option<crate::state::AwaitingHead>,
    backend: Backend,
    settings: Arc<Settings>,
    start: Instant,
    /// The end marker a streamed answer to this request must carry.
    end_marker: Option<&'static [u8]>,
}

impl Record {
    fn state(&self) -> &BackendState {
        self.backend.state()
    }

    fn hints(&self, headers: &http::HeaderMap) -> Hints {
        Hints::from_headers_at(headers, || self.settings.wall_clock.now(), DEFAULT_MAX_HINT)
    }

    /// Writes the outcome into the backend's state; returns the `Served` extension and the
    /// in-flight count, which the response body keeps until the answer has been read.
    fn finish(mut self, outcome: Outcome, hints: Hints) -> (Served, crate::state::InFlight) {
        let now = Instant::now();
        // The caller's credentials never reach a backend that has one of its own: a 401/403
        // is about ours.
        let outcome = match outcome {
            Outcome::ClientError { status }
                if (status == http::StatusCode::UNAUTHORIZED
                    || status == http::StatusCode::FORBIDDEN)
                    && self.backend.credential().is_some() =>
            {
                Outcome::CredentialRejected { status }
            }
            other => other,
        };
        let elapsed = now.saturating_duration_since(self.start);
        // An answer is a sign of life (`fail` has already said whether an error was).
        if self.awaiting.is_some() {
            self.backend.state().note_progress(now);
        }
        drop(self.awaiting.take());
        let state = self.state();
        state.record_outcome(&outcome);
        state.record_quota(hints.remaining_requests, hints.remaining_tokens, now);
        if self.guard.tokens() != 0 && (outcome == Outcome::Success || outcome.is_throttled()) {
            // What the backend counts per token of our estimate, learned from the level the
            // answer tells (if it does); a refused request spent nothing.
            let level =
                hints
                    .token_level()
                    .zip(hints.token_rate())
                    .map(|((left, capacity), rate)| crate::state::Level {
                        left,
                        capacity,
                        rate,
                    });
            state.calibrate(&self.guard, self.start, level, outcome.is_throttled());
        }
        if hints.remaining_tokens.is_some() || hints.limit_tokens.is_some() {
            // The token quota likewise: what may go at once (less what was sent after this
            // request was counted: an answer that took seconds tells a quota that has been
            // spent since), then its refill rate.
            let others = state
                .in_flight_tokens()
                .saturating_sub(u64::from(self.guard.tokens()));
            let others = i64::try_from(others).unwrap_or(i64::MAX);
            state.set_token_quota(hints.burst_tokens(), others, hints.token_rate());
        }
        if let Some(credits) = hints.burst_credits() {
            // Spend what the quota has left (less what is already on its way), then pace the
            // backend at its refill interval.
            let others = state.in_flight().saturating_sub(1) as i64;
            state.set_credits(Some(credits.saturating_sub(others)));
            state.learn_pace(hints.quota_pace());
        } else if !outcome.is_throttled() {
            // No quota hints to go by: the pace learned from 429s (below) shrinks with each
            // answer that is not throttled, and is measured again at the next 429.
            state.got_through(1);
        }
        match outcome {
            Outcome::Success => {
                state.record_latency(elapsed);
                state.reset_throttle_streak();
                // Proactive steering: the answer says the request quota is used up, so the next
                // request would only earn a 429; rest the backend until one is likely let through.
                if let Some(next) = hints.next_request_in() {
                    state.extend_cooldown(now + next);
                }
                // Tokens used up: prefer other backends of the tier until the reset.
                if hints.remaining_tokens == Some(0) {
                    let reset = hints.reset_tokens.unwrap_or(Duration::from_secs(1));
                    state.mark_low_headroom(now + reset);
                }
            }
            Outcome::Throttled { retry_after } => {
                let streak = state.note_throttled();
                let wait = match retry_after {
                    // A hint that says "now" (0, a date past): still a short jittered backoff,
                    // never a resend with no gap.
                    Some(w) if w < Duration::from_millis(1) => {
                        self.backoff_from(NOW_BACKOFF, streak)
                    }
                    Some(w) => w,
                    None => self.backoff(streak),
                };
                state.throttle_until(now + wait);
                // A backend limited by tokens only (quota headers for tokens, none for
                // requests) is paced by its token quota: its 429 says nothing of a request rate.
                let token_hints = hints.remaining_tokens.is_some() || hints.limit_tokens.is_some();
                if hints.remaining_requests.is_none() && !token_hints {
                    // No quota hints: the pace is learned from the 429s themselves.
                    // A wait given in milliseconds tells when the next token comes.
                    let precise = retry_after.is_some_and(|w| w.subsec_nanos() != 0);
                    state.pace_from_throttle(now, self.start, wait, precise);
                }
                tracing::debug!(
                    backend = self.backend.name(),
                    ?wait,
                    streak,
                    "backend throttled"
                );
            }
            Outcome::CredentialRejected { status } => {
                let was_available = state.is_available(now);
                let mut streak = state.note_rejected();
                // A token may have been revoked: the first rejection only forces a new one
                // (the next attempt on this backend, after the retry layer's backoff where
                // there is no other backend, carries it); a fresh token rejected too is a
                // broken backend.
                if let Some(cache) = self.backend.credential().and_then(|c| c.cache()) {
                    cache.invalidate();
                    streak = streak.saturating_sub(1);
                }
                let wait = CREDENTIAL_COOLDOWN
                    .saturating_mul(2u32.saturating_pow(streak.saturating_sub(1).min(6)))
                    .min(Duration::from_secs(3600));
                if streak > 0 {
                    // A wait the backend imposed, like a throttled answer's: nothing is sent
                    // to it until it ends, not even a request holding a booked slot.
                    state.throttle_until(now + wait);
                }
                if was_available && streak > 0 {
                    tracing::error!(
                        backend = self.backend.name(),
                        status = status.as_u16(),
                        cooldown = ?wait,
                        "backend rejected the credential configured for it (wrong key, missing role, expired secret?): taken out of rotation"
                    );
                }
            }
            Outcome::QuotaExhausted => {
                let was_available = state.is_available(now);
                state.note_throttled();
                state.throttle_until(now + self.settings.quota_exhausted_cooldown);
                if was_available {
                    tracing::warn!(
                        backend = self.backend.name(),
                        cooldown = ?self.settings.quota_exhausted_cooldown,
                        "backend quota exhausted (billing or spend limit): taken out of rotation"
                    );
                }
            }
            _ => {}
        }
        let served = Served {
            backend: self.backend,
            outcome,
            hints,
            elapsed,
        };
        (served, self.guard)
    }

    fn fail(mut self, error: BoxError) -> BoxError {
        let outcome = self.settings.classify.classify_error(&*error);
        if outcome == Outcome::Timeout {
            // We gave up waiting: no sign of life from the backend, whose silence goes on.
            self.backend.state().note_abandoned();
            drop(self.awaiting.take());
        }
        let name = self.backend.name_arc().clone();
        tracing::debug!(backend = &*name, %outcome, "attempt failed");
        drop(self.finish(outcome, Hints::default()));
        BackendError::new(name, outcome, error).into()
    }

    /// `base * 2^(streak-1)` capped, less up to 25% jitter.
    fn backoff(&self, streak: u32) -> Duration {
        self.backoff_from(self.settings.backoff_base, streak)
    }

    /// `base * 2^(streak-1)` capped at the backoff's max, less up to 25% jitter.
    fn backoff_from(&self, base: Duration, streak: u32) -> Duration {
        let s = &self.settings;
        let exp = base.saturating_mul(2u32.saturating_pow(streak.saturating_sub(1).min(20)));
        let capped = exp.min(s.backoff_max);
        capped.mul_f64(1.0 - 0.25 * s.rng.next_f64())
    }
}
