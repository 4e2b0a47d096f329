//! `Fallback`: an ordered chain of alternatives (deployments, models, providers, groups), nestable
//! with `Balance` to any depth.
//!
//! A request goes to the first target; on a triggering outcome it goes to the next, replayed
//! from its cheap-clone body with that target's rewrites (JSON body overrides such as `model` and
//! `max_tokens`, an Azure deployment); the caller's request is never changed for the others.
//!
//! | outcome of a target | what `Fallback` does |
//! |---|---|
//! | success | returns it, with attribution (see below) |
//! | client error (4xx) | returns it at once: a bad request is never sent to the next target |
//! | an answer that says `x-should-retry: false` (not throttled) | returns it at once: the backend says no retry will help |
//! | throttled / quota exhausted, server error, connect or transport error, timeout, nothing available | next target (the triggers are configurable; add status codes to [`Settings::statuses`]) |
//! | last target fails too | the last 429 with the earliest `retry-after` of all targets if the last failures were 429s; otherwise [`Exhausted`] listing every target's failure |
//!
//! **Fail fast**: every target but the last gets a wait budget of zero, so a `RetryAfter429`
//! inside it gives up at once when nothing is free instead of sleeping, and falling back costs
//! microseconds, not a Retry-After. The last target keeps its own wait budget.
//!
//! **Deadline**: one overall deadline per request across all targets and their retries (the
//! builder's [`Settings::deadline`], or a [`Deadline`] request extension, whichever is
//! earlier), passed down as a [`Deadline`] so inner layers do not wait past it. An attempt still
//! running at the deadline is dropped and the request ends with [`Exhausted`], that target's
//! attempt marked as a timeout.
//!
//! **Attribution**: the response carries [`ServedPath`] (e.g. `models[1:gpt-4-32k] -> westus`)
//! and [`Attempts`] listing every attempt of every target; with
//! [`Settings::attribution_headers`] also the headers `x-llm-lb-backend` and
//! `x-llm-lb-attempts` (and their number, `x-llm-lb-attempt-count`). The caller's `x-request-id` is kept and recorded in each target's span.
//!
//! **Streams**: a response is returned once its head arrives, so failover happens only before the
//! first body byte reaches the caller; after that the body streams untouched, and a stream cut
//! upstream (or ending without its `[DONE]` / `message_stop`) ends in a typed
//! [`StreamInterrupted`](crate::error::StreamInterrupted) body error, never a clean end.
//! To fail over on an error a provider sends *inside* a 200 stream before any content, opt in
//! per backend with [`endpoint::Settings::hold_stream_start`](crate::endpoint::Settings::hold_stream_start).
//!
//! ```
//! use tower::ServiceExt;
//! use tower_llm_lb::fallback::{Fallback, Overrides};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! // Two stand-in targets: the 8k deployment is out of quota, the 32k one answers.
//! let small = tower::service_fn(|_req: http::Request<tower_llm_lb::body::ReplayBody>| async {
//!     Ok::<_, tower_llm_lb::BoxError>(http::Response::builder().status(429).body(String::new())?)
//! });
//! let big = tower::service_fn(|req: http::Request<tower_llm_lb::body::ReplayBody>| async move {
//!     Ok::<_, tower_llm_lb::BoxError>(http::Response::new(String::from_utf8(req.body().bytes().to_vec())?))
//! });
//! let chain = Fallback::builder("gpt-4")
//!     .target("gpt-4-8k", small)
//!     .target_with("gpt-4-32k", big, Overrides::default().set("model", "gpt-4-32k"))
//!     .build()?;
//! let res = chain.oneshot(http::Request::new(r#"{"model":"gpt-4"}"#.into())).await?;
//! assert_eq!(res.body(), r#"{"model":"gpt-4-32k"}"#);
//! # Ok(()) }
//! ```

mod layer;
mod rewrite;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use tokio::time::Instant;

use tower_service::Service;
use tracing::Instrument;

use crate::attempt::MaxWait;
use crate::attempt::{Attempts, Deadline};
use crate::attempt::{Deployment, answered_by, outcome_of};
use crate::body::ReplayBody;
use crate::classify::retry_after::set_retry_after;
use crate::classify::retry_after::{DEFAULT_MAX_HINT, Hints};
use crate::classify::{Outcome, classify_error_chain, should_retry};
use crate::error::{Attempt, BoxError, Exhausted, InvalidConfig};
use crate::ready::ReadyCall;
pub use layer::{FallbackLayer, ResponseBodyOf, Variant};
pub use rewrite::{NotJson, Overrides};

pub use crate::boxed::BoxTarget;

/// Which backend or group served a request, through which targets (a response extension).
/// `Display` gives e.g. `models[1:gpt-4-32k] -> westus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedPath {
    chain: Arc<str>,
    index: usize,
    target: Arc<str>,
    tail: Tail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tail {
    Backend(Arc<str>),
    Nested(Box<ServedPath>),
}

impl ServedPath {
    /// The backend that answered, at the end of the path.
    pub fn backend(&self) -> &str {
        match &self.tail {
            Tail::Backend(b) => b,
            Tail::Nested(p) => p.backend(),
        }
    }
}

/// Formats as `chain[index:target] -> … -> backend`, only when asked (not on the request path).
impl fmt::Display for ServedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}:{}] -> ", self.chain, self.index, self.target)?;
        match &self.tail {
            Tail::Backend(b) => f.write_str(b),
            Tail::Nested(p) => write!(f, "{p}"),
        }
    }
}

/// How a chain moves on: which outcomes move a request on to the next target, one deadline
/// across them, attribution headers. Set the fields you change and take the rest from
/// `default()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// 429 / 529 / 503-with-hint and quota-exhausted answers (default on).
    pub throttled: bool,
    /// 5xx answers (default on).
    pub server_errors: bool,
    /// Connect and transport errors, timeouts (default on).
    pub failures: bool,
    /// Nothing available in the target (default on).
    pub unavailable: bool,
    /// Extra statuses that move on (Portkey's `on_status_codes`); 4xx listed here move on too
    /// (default: none).
    pub statuses: Vec<StatusCode>,
    /// One overall deadline per request across all targets (default: none; each target's own
    /// retry layer bounds its time).
    pub deadline: Option<Duration>,
    /// Also reports attribution as `x-llm-lb-backend`, `x-llm-lb-attempts` and
    /// `x-llm-lb-attempt-count` response headers (default off: the [`ServedPath`] and
    /// [`Attempts`] extensions always carry it).
    pub attribution_headers: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            throttled: true,
            server_errors: true,
            failures: true,
            unavailable: true,
            statuses: Vec::new(),
            deadline: None,
            attribution_headers: false,
        }
    }
}

impl Settings {
    fn fires(&self, outcome: &Outcome, status: Option<StatusCode>) -> bool {
        if status.is_some_and(|s| self.statuses.contains(&s)) {
            return true;
        }
        match outcome {
            Outcome::Throttled { .. } | Outcome::QuotaExhausted => self.throttled,
            Outcome::ServerError { .. } => self.server_errors,
            Outcome::ConnectError | Outcome::Transport | Outcome::Timeout => self.failures,
            Outcome::Unavailable { .. } => self.unavailable,
            _ => false,
        }
    }
}

struct Target<ResB> {
    name: Arc<str>,
    service: BoxTarget<ResB>,
    overrides: Overrides,
    deployment: Option<Deployment>,
}

impl<ResB> Clone for Target<ResB> {
    fn clone(&self) -> Self {
        Target {
            name: self.name.clone(),
            service: self.service.clone(),
            overrides: self.overrides.clone(),
            deployment: self.deployment.clone(),
        }
    }
}

struct Shared<ResB> {
    name: Arc<str>,
    targets: Box<[Target<ResB>]>,
    settings: Settings,
}

/// An ordered chain of targets. See the [module docs](self).
pub struct Fallback<ResB> {
    shared: Arc<Shared<ResB>>,
}

impl<ResB> Clone for Fallback<ResB> {
    fn clone(&self) -> Self {
        Fallback {
            shared: self.shared.clone(),
        }
    }
}

impl<ResB> fmt::Debug for Fallback<ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("name", &self.shared.name)
            .field(
                "targets",
                &self
                    .shared
                    .targets
                    .iter()
                    .map(|t| &*t.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The error of a fallback chain that cannot be built.
fn invalid(message: impl fmt::Display) -> InvalidConfig {
    InvalidConfig::new(format!("invalid fallback: {message}"))
}

/// Builds a [`Fallback`].
#[must_use]
pub struct FallbackBuilder<ResB> {
    name: String,
    targets: Vec<Target<ResB>>,
    settings: Settings,
    error: Option<String>,
}

impl<ResB> fmt::Debug for FallbackBuilder<ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackBuilder")
            .field("name", &self.name)
            .field("targets", &self.targets.len())
            .finish()
    }
}

impl<ResB: 'static> Fallback<ResB> {
    /// A builder for a chain named `name` (used in attribution and errors).
    pub fn builder(name: impl Into<String>) -> FallbackBuilder<ResB> {
        FallbackBuilder {
            name: name.into(),
            targets: Vec::new(),
            settings: Settings::default(),
            error: None,
        }
    }

    /// The chain's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl<ResB: 'static> FallbackBuilder<ResB> {
    /// Adds a target with no rewrites.
    pub fn target<S>(self, name: impl Into<String>, service: S) -> Self
    where
        S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.target_with(name, service, Overrides::default())
    }

    /// Adds a target whose requests get `overrides` applied to their JSON body.
    pub fn target_with<S>(
        mut self,
        name: impl Into<String>,
        service: S,
        overrides: Overrides,
    ) -> Self
    where
        S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let service = BoxTarget::new(service);
        self.targets.push(Target {
            name: name.into().into(),
            service,
            overrides,
            deployment: None,
        });
        self
    }

    /// Sends the last added target's requests to this Azure deployment (classic URLs), whatever
    /// its backends are configured with.
    pub fn deployment(mut self, deployment: &str) -> Self {
        match (Deployment::new(deployment), self.targets.last_mut()) {
            (Ok(d), Some(t)) => t.deployment = Some(d),
            (Err(e), _) => self.error = Some(e.to_string()),
            (_, None) => self.error = Some("deployment: set before any target".into()),
        }
        self
    }

    /// How the chain moves on (see [`Settings`]).
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Validates and builds: at least one target, unique target names.
    pub fn build(self) -> Result<Fallback<ResB>, InvalidConfig> {
        if let Some(e) = self.error {
            return Err(invalid(format!("{}: {e}", self.name)));
        }
        if self.targets.is_empty() {
            return Err(invalid(format!("{}: no targets", self.name)));
        }
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].iter().any(|o| o.name == t.name) {
                return Err(invalid(format!(
                    "{}: target name {:?} used twice",
                    self.name, t.name
                )));
            }
        }
        Ok(Fallback {
            shared: Arc::new(Shared {
                name: self.name.into(),
                targets: self.targets.into_boxed_slice(),
                settings: self.settings,
            }),
        })
    }
}

impl<ResB: Send + 'static> Service<Request<ReplayBody>> for Fallback<ResB> {
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    /// Always ready: each target's readiness is driven when it is tried.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        ResponseFuture::new(Run::new(self.shared.clone(), req))
    }
}

/// When a throttled answer says a retry may succeed.
fn retry_at<B>(res: &Response<B>) -> Option<Instant> {
    let hints = Hints::from_headers_at(res.headers(), std::time::SystemTime::now, DEFAULT_MAX_HINT);
    hints.wait().map(|d| Instant::now() + d)
}

/// One request's way down the chain: what the targets tried so far said.
pub(crate) struct Run<ResB> {
    shared: Arc<Shared<ResB>>,
    /// The caller's request, kept for the targets after the next; the last one takes it.
    original: Option<Request<ReplayBody>>,
    deadline: Option<Instant>,
    /// The caller's `x-request-id`, read only when debug spans are on.
    request_id: Option<HeaderValue>,
    attempts: Vec<Attempt>,
    /// Boxed: only a chain that saw a 429 has one.
    last_429: Option<Box<(usize, Response<ResB>)>>,
    earliest: Option<Instant>,
}

impl<ResB> Run<ResB> {
    fn new(shared: Arc<Shared<ResB>>, req: Request<ReplayBody>) -> Self {
        let mut deadline = shared.settings.deadline.map(|d| Instant::now() + d);
        if let Some(Deadline(d)) = req.extensions().get::<Deadline>() {
            deadline = Some(deadline.map_or(*d, |x| x.min(*d)));
        }
        let request_id = if tracing::level_enabled!(tracing::Level::DEBUG) {
            req.headers().get("x-request-id").cloned()
        } else {
            None
        };
        Run {
            shared,
            original: Some(req),
            deadline,
            request_id,
            attempts: Vec::new(),
            last_429: None,
            earliest: None,
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The request for target `i`: the caller's own for the last target, a copy before that,
    /// with the target's rewrites and the chain's deadline.
    fn request_for(&mut self, i: usize) -> Result<Request<ReplayBody>, BoxError> {
        let target = &self.shared.targets[i];
        let last = i == self.shared.targets.len() - 1;
        let mut attempt = match (last, self.original.take()) {
            (true, Some(req)) => rewrite_for(req, target)?,
            (false, Some(req)) => {
                let a = clone_for(&req, target);
                self.original = Some(req);
                a?
            }
            (_, None) => return Err("fallback: request already consumed".into()),
        };
        if let Some(d) = self.deadline {
            attempt.extensions_mut().insert(Deadline(d));
        }
        if !last {
            attempt.extensions_mut().insert(MaxWait(Duration::ZERO));
        }
        Ok(attempt)
    }

    fn span(&self, i: usize) -> tracing::Span {
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::debug_span!(
            "fallback_target",
            chain = &*self.shared.name,
            target = &*self.shared.targets[i].name,
            index = i,
            request_id
        )
    }

    /// Sends the request for target `i`, within the deadline.
    fn send(&mut self, i: usize) -> Result<Attempting<ResB>, BoxError> {
        let req = self.request_for(i)?;
        let span = self.span(i);
        let fut = {
            let _in_span = span.enter();
            ReadyCall::new(self.shared.targets[i].service.clone(), req)
        }
        .instrument(span);
        Ok(Attempting {
            fut,
            deadline: self.deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            started: Instant::now(),
        })
    }

    /// What target `i`'s result means: `Some` ends the request, `None` moves on.
    fn judge(
        &mut self,
        i: usize,
        result: Result<Response<ResB>, BoxError>,
        started: Instant,
    ) -> Option<Result<Response<ResB>, BoxError>> {
        let target_name = &self.shared.targets[i].name;
        match result {
            Ok(mut res) => {
                let (backend, outcome, timed) = answered_by(&res);
                // An answer that says `x-should-retry: false` is final (throttling excepted:
                // it is about the backend's quota, not the request).
                let final_answer = !outcome.is_throttled()
                    && !outcome.is_success()
                    && should_retry(res.headers()) == Some(false);
                let fires =
                    !final_answer && self.shared.settings.fires(&outcome, Some(res.status()));
                // An answer from the first target tried keeps its own list of attempts.
                let own = !fires
                    && self.attempts.is_empty()
                    && res.extensions().get::<Attempts>().is_some();
                if !own {
                    match res.extensions_mut().remove::<Attempts>() {
                        Some(Attempts(inner)) => self.attempts.extend(inner),
                        None => self.attempts.push(Attempt {
                            backend: backend.clone(),
                            outcome,
                            elapsed: timed.unwrap_or_else(|| started.elapsed()),
                            started,
                        }),
                    }
                }
                if !fires {
                    if !own {
                        let attempts = std::mem::take(&mut self.attempts);
                        res.extensions_mut().insert(Attempts(attempts));
                    }
                    return Some(Ok(attribute(&self.shared, i, res, backend)));
                }
                tracing::debug!(target = &**target_name, %outcome, "target failed");
                if outcome.is_throttled() {
                    self.earliest = min_opt(self.earliest, retry_at(&res));
                    self.last_429 = Some(Box::new((i, res)));
                } else {
                    self.last_429 = None;
                }
                None
            }
            Err(e) => {
                let outcome = classify_error_chain(&*e);
                if !self.shared.settings.fires(&outcome, None) {
                    // Not a failure to move on from (a bad override, a client-side error).
                    return Some(Err(e));
                }
                if let Outcome::Unavailable { retry_at } = outcome {
                    self.earliest = min_opt(self.earliest, retry_at);
                }
                match e.downcast::<Exhausted>() {
                    Ok(x) => {
                        self.earliest = min_opt(self.earliest, x.earliest);
                        self.attempts.extend(x.attempts);
                    }
                    Err(e) => {
                        let backend = crate::error::find::<crate::error::BackendError>(&*e)
                            .map_or_else(|| target_name.clone(), |b| b.backend.clone());
                        self.attempts.push(Attempt {
                            backend,
                            outcome,
                            elapsed: started.elapsed(),
                            started,
                        });
                    }
                }
                // A refusal after a 429 leaves that 429 as the last word; a real failure does not.
                if !matches!(outcome, Outcome::Unavailable { .. }) {
                    self.last_429 = None;
                }
                None
            }
        }
    }

    /// The overall deadline passed while target `i` was answering: that target timed out, and
    /// no other is tried.
    fn timed_out(mut self, i: usize, elapsed: Duration) -> BoxError {
        self.attempts.push(Attempt {
            backend: self.shared.targets[i].name.clone(),
            outcome: Outcome::Timeout,
            elapsed,
            started: Instant::now()
                .checked_sub(elapsed)
                .unwrap_or_else(Instant::now),
        });
        Exhausted::new(self.attempts, self.earliest).into()
    }

    /// Every target failed: the last 429 with the earliest retry of all targets, or an error
    /// that lists every failure.
    fn give_up(self) -> Result<Response<ResB>, BoxError> {
        if let Some(last) = self.last_429 {
            let (i, mut res) = *last;
            let (backend, _) = outcome_of(&res);
            res.extensions_mut().insert(Attempts(self.attempts));
            let mut res = attribute(&self.shared, i, res, backend);
            if let Some(at) = self.earliest {
                set_retry_after(
                    res.headers_mut(),
                    at.saturating_duration_since(Instant::now()),
                );
            }
            return Ok(res);
        }
        Err(Exhausted::new(self.attempts, self.earliest).into())
    }
}

/// The targets after the first (the slow path, boxed).
async fn rest<ResB>(mut run: Run<ResB>, from: usize) -> Result<Response<ResB>, BoxError> {
    for i in from..run.shared.targets.len() {
        if run.past_deadline() {
            break;
        }
        let attempting = run.send(i)?;
        let started = attempting.started;
        let result = match attempting.finish().await {
            Ok(r) => r,
            Err(TimedOut) => return Err(run.timed_out(i, started.elapsed())),
        };
        if let Some(done) = run.judge(i, result, started) {
            return done;
        }
    }
    run.give_up()
}

type Call<ResB> =
    tracing::instrument::Instrumented<ReadyCall<BoxTarget<ResB>, Request<ReplayBody>>>;

pin_project_lite::pin_project! {
    /// One target's attempt, bounded by the chain's deadline.
    struct Attempting<ResB> {
        #[pin]
        fut: Call<ResB>,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        started: Instant,
    }
}

/// The chain's deadline passed during an attempt.
struct TimedOut;

impl<ResB> Attempting<ResB> {
    async fn finish(self) -> Result<Result<Response<ResB>, BoxError>, TimedOut> {
        let mut this = std::pin::pin!(self);
        std::future::poll_fn(move |cx| this.as_mut().poll_attempt(cx)).await
    }

    fn poll_attempt(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Result<Response<ResB>, BoxError>, TimedOut>> {
        let this = self.project();
        if let Poll::Ready(r) = this.fut.poll(cx) {
            return Poll::Ready(Ok(r));
        }
        match this.deadline {
            Some(d) => d.as_mut().poll(cx).map(|()| Err(TimedOut)),
            None => Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Fallback`]: the first target's attempt is polled in place; moving
    /// on to the next targets boxes the rest of the run.
    pub struct ResponseFuture<ResB> {
        #[pin]
        state: State<ResB>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<ResB> {
        First { #[pin] attempting: Attempting<ResB>, run: Option<Run<ResB>> },
        Rest { fut: Pin<Box<dyn Future<Output = Result<Response<ResB>, BoxError>> + Send>> },
        Failed { error: Option<BoxError> },
    }
}

impl<ResB: Send + 'static> ResponseFuture<ResB> {
    fn new(mut run: Run<ResB>) -> Self {
        let state = if run.past_deadline() {
            State::Rest {
                fut: Box::pin(std::future::ready(run.give_up())),
            }
        } else {
            match run.send(0) {
                Ok(attempting) => State::First {
                    attempting,
                    run: Some(run),
                },
                Err(e) => State::Failed { error: Some(e) },
            }
        };
        ResponseFuture { state }
    }
}

impl<ResB: Send + 'static> Future for ResponseFuture<ResB> {
    type Output = Result<Response<ResB>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::First { attempting, run } => {
                    let started = attempting.started;
                    let result = std::task::ready!(attempting.poll_attempt(cx));
                    let Some(mut r) = run.take() else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    let result = match result {
                        Ok(result) => result,
                        Err(TimedOut) => {
                            return Poll::Ready(Err(r.timed_out(0, started.elapsed())));
                        }
                    };
                    if let Some(done) = r.judge(0, result, started) {
                        return Poll::Ready(done);
                    }
                    this.state.set(State::Rest {
                        fut: Box::pin(rest(r, 1)),
                    });
                }
                StateProj::Rest { fut } => return fut.as_mut().poll(cx),
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into())));
                }
            }
        }
    }
}

impl<ResB> fmt::Debug for ResponseFuture<ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fallback::ResponseFuture")
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The caller's own request, rewritten for the last target (no copy needed).
fn rewrite_for<ResB>(
    mut req: Request<ReplayBody>,
    target: &Target<ResB>,
) -> Result<Request<ReplayBody>, BoxError> {
    if !target.overrides.is_empty() {
        let body = target.overrides.apply(req.body().bytes(), &target.name)?;
        *req.body_mut() = ReplayBody::new(body);
        req.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    if let Some(d) = &target.deployment {
        req.extensions_mut().insert(d.clone());
    }
    Ok(req)
}

/// A copy of the caller's request, rewritten for a target before the last.
fn clone_for<ResB>(
    req: &Request<ReplayBody>,
    target: &Target<ResB>,
) -> Result<Request<ReplayBody>, BoxError> {
    rewrite_for(crate::body::clone_request(req), target)
}

fn attribute<ResB>(
    shared: &Shared<ResB>,
    index: usize,
    mut res: Response<ResB>,
    backend: Arc<str>,
) -> Response<ResB> {
    let tail = match res.extensions_mut().remove::<ServedPath>() {
        Some(inner) => Tail::Nested(Box::new(inner)),
        None => Tail::Backend(backend.clone()),
    };
    let path = ServedPath {
        chain: shared.name.clone(),
        index,
        target: shared.targets[index].name.clone(),
        tail,
    };
    if shared.settings.attribution_headers {
        if let Ok(v) = HeaderValue::from_str(&backend) {
            res.headers_mut().insert("x-llm-lb-backend", v);
        }
        let attempts = res.extensions().get::<Attempts>().map(|a| {
            let list =
                a.0.iter()
                    .map(|a| format!("{}={}", a.backend, a.outcome.name()))
                    .collect::<Vec<_>>()
                    .join(", ");
            (list, a.0.len())
        });
        if let Some((list, n)) = attempts {
            if let Ok(v) = HeaderValue::from_str(&list) {
                res.headers_mut().insert("x-llm-lb-attempts", v);
            }
            res.headers_mut()
                .insert("x-llm-lb-attempt-count", HeaderValue::from(n));
        }
    }
    res.extensions_mut().insert(path);
    res
}
