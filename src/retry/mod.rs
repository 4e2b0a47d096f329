//! `RetryAfter429`: absorb throttling inside the stack, honouring every Retry-After form, within
//! a wait budget and a deadline.
//!
//! Put it above [`Balance`](crate::balance::Balance) (or a single backend). The backends'
//! [`Endpoint`](crate::endpoint::Endpoint)s have already classified each answer and cooled the
//! throttled backend down until its Retry-After (the cooldown only ever extends); `RetryAfter429`
//! decides what the request does next:
//!
//! | outcome of an attempt | what `RetryAfter429` does |
//! |---|---|
//! | success, client error (4xx) | returns it (a client error whose answer says `x-should-retry: true`: retried as a failure is) |
//! | an answer that says `x-should-retry: false` (5xx, 408) | returns it at once: retried nowhere (off with [`RetryAfter429Layer::should_retry_header`] `false`) |
//! | server error (5xx), 408, timeout, connect error, connection broken before the response head | retries at once on a backend not tried yet; when every backend was tried, after a backoff (0.5 s, doubling per backoff, 8 s cap, less a random share of up to half: simultaneous failures do not come back together) on any; never two sends to one backend without a gap. Draws on the retry budget. Off with [`RetryAfter429Layer::retry_failures`] `false`, except connect errors: nothing was sent, so they are always retried |
//! | throttled (429, 529, 503 with a hint) or quota exhausted | retries at once, so `Balance` sends it to another available backend; does not draw on the retry budget |
//! | nothing available (every backend cooling down, paced or open) | waits in line: `Balance` books the next paced slot of the backend freeing first for this request (slots go out in the order requests ask), and the request waits for it if that fits the wait budget and the deadline; otherwise gives up at once, without sleeping. Waiting never draws on the retry budget |
//!
//! Giving up returns the last 429 **with** `retry-after` and `retry-after-ms` set to when a
//! backend is next free (so the caller's own client can honour it; never "now": when no time is
//! known, 500 ms, the official SDKs' first backoff); the last 5xx as it is when the attempts or
//! the time ran out; otherwise (no answer at all, or nothing free after a failure)
//! [`Exhausted`] listing every attempt and the earliest retry instant, or the balancer's
//! [`Unavailable`] when nothing was ever sent.
//!
//! Bounds: at most [`RetryAfter429Layer::max_attempts`] attempts that reach a backend and are
//! answered other than throttled (default 4); throttled answers (each names when its backend has
//! room and cools it down until then) are bounded by the wait budget and the deadline instead,
//! and all sends by four times `max_attempts`; a retry budget for failure retries (lock-free, after tower's `TpsBudget`: they may add at most a
//! share of the request rate, so a failing group does not multiply its load; throttled
//! requests go only where a backend has announced room, so they need no budget); a
//! per-request wait budget (default 10 s); an overall deadline (the layer's, or a [`Deadline`]
//! request extension, whichever is earlier) that bounds the waits and the attempts too: past
//! it an attempt still without an answer head is abandoned, and the caller gets the last 429
//! (with its honest hint) or [`DeadlineExceeded`]. A client error is never retried, and nothing is
//! retried once the response head was returned (a stream that breaks later is the caller's).
//!
//! Each retry carries a (crate-private) extension naming the backends already tried, so a
//! `Balance` below picks another one when it can.
//!
//! The request is replayed by cloning it (the body must be cheap to clone, like
//! [`ReplayBody`](crate::body::ReplayBody)); a streamed response is passed through untouched. Every
//! response carries an [`Attempts`] extension; every attempt is a `tracing` span with the
//! backend, attempt number, outcome and wait.
//!
//! Opt-in **hedging** ([`RetryAfter429Layer::hedge`]): with no answer head after a delay, a
//! second attempt goes to another backend and the first good answer wins; the other attempt is
//! cancelled. For tails, not for hung backends: those the silence watch and the pick already
//! route around by default.
//!
//! The first attempt runs in a concrete future; only a retry (or a hedged request) moves to a
//! boxed one.

mod budget;

use crate::waitlist::{Place, Slot};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::util::ServiceExt;

use crate::ready::ReadyCall;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::attempt::{Served, answered_by};
use crate::body::clone_request;
use crate::classify::retry_after::set_retry_after;
use crate::classify::{Outcome, classify_error_chain, should_retry};
use crate::error::{Attempt, BoxError, DeadlineExceeded, Exhausted, Unavailable};
use budget::RetryBudget;

use crate::attempt::MaxWait;
pub use crate::attempt::{Attempts, Deadline};

/// What a service made by the layer runs with: the layer's settings as given (`max_attempts`
/// at least 1) and its own retry budget. Shared by the service's clones and its requests.
struct Settings {
    layer: RetryAfter429Layer,
    budget: RetryBudget,
}

/// Layer that wraps a service in [`RetryAfter429`]. Its fields are its settings, each with its
/// default and why; set the ones you change and take the rest from `default()`:
///
/// ```
/// use std::time::Duration;
/// use tower_llm_lb::retry::RetryAfter429Layer;
///
/// let patient = RetryAfter429Layer {
///     max_wait: Duration::from_secs(30),
///     deadline: Some(Duration::from_secs(120)),
///     ..RetryAfter429Layer::default()
/// };
/// # let _ = patient;
/// ```
///
/// Retrying a throttled request, or waiting for a backend that said when it has room, never
/// draws on the retry budget: that load is known.
#[derive(Clone, Debug)]
pub struct RetryAfter429Layer {
    /// At most this many attempts that reach a backend and are answered other than throttled
    /// (at least 1; default 4). Throttled answers do not count while the wait budget and the
    /// deadline last (they cool their backend down, so the next attempt goes elsewhere or
    /// waits); all sends are capped at four times this.
    pub max_attempts: usize,
    /// The most a request may spend waiting for a backend to become free, in total
    /// (default 10 s).
    pub max_wait: Duration,
    /// An overall deadline per request, from when it enters this layer (default: none).
    pub deadline: Option<Duration>,
    /// Whether failures of the backend itself (5xx, 408, timeouts, broken connections before
    /// the response head) are retried on another backend (default true, as every peer gateway
    /// and the official SDKs do; nothing is retried once a byte of the answer went to the
    /// caller). Turn it off where a failed call must not be repeated. A 5xx that is the last
    /// answer is returned as it is. Connect errors are always retried: nothing was sent.
    pub retry_failures: bool,
    /// Whether an answer's `x-should-retry` header decides (default on, as the OpenAI and
    /// Anthropic SDKs obey it): `false` on a failed answer (a 5xx, a 408) returns it at once,
    /// retried nowhere; `true` on a client error (a 409, say) retries it as a failure is
    /// retried. Throttled answers are retried whatever the header says: they are about the
    /// backend's quota, and another backend (or the same one after its wait) has room. Off:
    /// the header is ignored and the status alone decides.
    pub should_retry_header: bool,
    /// The backoff before a failure retry on a backend already tried (every backend of the
    /// group was): `backoff_base * 2^(n-1)` capped at `backoff_max`, less a random share of up
    /// to half (default 0.5 s to 8 s, as the official OpenAI and Anthropic SDKs). Spent out of
    /// the wait budget and within the deadline.
    pub backoff_base: Duration,
    /// See `backoff_base` (default 8 s).
    pub backoff_max: Duration,
    /// Opt-in hedging (default: none): when the first attempt has no answer head after this
    /// long, a second attempt goes to another backend (as a `Balance` below picks, never the
    /// first one's); the first good answer (not throttled, not failed) wins and the other
    /// attempt is cancelled (logged at debug level). A hedge draws on the retry budget, so
    /// hedging cannot more than add the budget's share of load. Set it near the group's p95
    /// time to first byte: the slowest 5% of requests then cost two attempts. Hedged requests
    /// take the boxed path.
    pub hedge: Option<Duration>,
    /// The retry budget for failure retries and hedges (default: 20% of requests over 10 s
    /// with a floor of 10 retries/s, tower's and Envoy's defaults). Each service this layer
    /// makes (and its clones) keeps its own.
    pub budget: Budget,
    /// The random source for backoff jitter (seed it for repeatable tests; default: from
    /// entropy).
    pub rng: crate::rng::Rng,
}

/// How many failure retries and hedges a [`RetryAfter429`] may add: over `ttl`, retries may be
/// `retry_percent` of requests, plus `min_per_sec` retries per second regardless (out-of-range
/// values are clamped).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// The window requests and retries are counted over (default 10 s).
    pub ttl: Duration,
    /// Retries per second allowed whatever the traffic (default 10).
    pub min_per_sec: u32,
    /// Retries as a share of requests (default 0.2).
    pub retry_percent: f32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            retry_percent: 0.2,
        }
    }
}

impl Default for RetryAfter429Layer {
    fn default() -> Self {
        RetryAfter429Layer {
            max_attempts: 4,
            max_wait: Duration::from_secs(10),
            deadline: None,
            retry_failures: true,
            should_retry_header: true,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(8),
            hedge: None,
            budget: Budget::default(),
            rng: crate::rng::Rng::from_entropy(),
        }
    }
}

impl<S> Layer<S> for RetryAfter429Layer {
    type Service = RetryAfter429<S>;

    fn layer(&self, inner: S) -> RetryAfter429<S> {
        let b = self.budget;
        RetryAfter429 {
            inner,
            settings: Arc::new(Settings {
                layer: RetryAfter429Layer {
                    max_attempts: self.max_attempts.max(1),
                    ..self.clone()
                },
                budget: RetryBudget::new(b.ttl, b.min_per_sec, b.retry_percent),
            }),
        }
    }
}

/// Middleware that absorbs 429s. See the [module docs](self).
#[derive(Clone)]
pub struct RetryAfter429<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S: fmt::Debug> fmt::Debug for RetryAfter429<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryAfter429")
            .field("inner", &self.inner)
            .field("max_attempts", &self.settings.layer.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResB> Service<Request<B>> for RetryAfter429<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Clone + Send + Sync + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The first attempt goes to the service driven ready here; each retry re-drives
        // readiness on a clone (`oneshot`).
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        self.settings.budget.deposit_at(start);
        let mut deadline = self.settings.layer.deadline.map(|d| start + d);
        if let Some(Deadline(d)) = req.extensions().get::<Deadline>() {
            deadline = Some(deadline.map_or(*d, |x| x.min(*d)));
        }
        let template = clone_request(&req);
        // The service driven ready is the one called (and kept for retries); the stack keeps
        // a fresh clone. One clone per request.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let max_wait = req
            .extensions()
            .get::<MaxWait>()
            .map_or(self.settings.layer.max_wait, |m| {
                m.0.min(self.settings.layer.max_wait)
            });
        // Sent before the context takes the service (a hedged request is sent inside it).
        let first = match self.settings.layer.hedge {
            None => Ok(ready.call(req)),
            Some(after) => Err((after, req)),
        };
        let ctx = Ctx {
            inner: ready,
            settings: self.settings.clone(),
            template,
            attempts: Vec::new(),
            deadline,
            max_wait,
            waited: Duration::ZERO,
            reserved: None,
            sent: 0,
            elsewhere: false,
            backoffs: 0,
            last_failed: false,
            shed: false,
        };
        match first {
            Ok(first) => {
                // The first attempt carries no wait budget (inserting one would allocate on
                // every request); a refused request's later attempts do, so their slots get
                // booked. A timer only with a deadline.
                ResponseFuture {
                    state: RetryState::First {
                        fut: ReadyCall::from_asked(crate::ready::Asked::Called(first)),
                        ctx: Some(Box::new(ctx)),
                        started: start,
                        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                    },
                }
            }
            Err((after, req)) => {
                let fut = hedged(ctx, req, after, start);
                let fut: BoxFut<_> = match deadline {
                    Some(d) => Box::pin(async move {
                        tokio::time::timeout_at(d, fut)
                            .await
                            .unwrap_or_else(|_| Err(DeadlineExceeded::new(Vec::new()).into()))
                    }),
                    None => Box::pin(fut),
                };
                ResponseFuture {
                    state: RetryState::Retrying { fut },
                }
            }
        }
    }
}

/// How many sends in all a request may make, as a multiple of `max_attempts`, however many were
/// throttled: the floor under the wait budget and the deadline, so that nothing can spin.
const THROTTLED_SENDS: usize = 4;

impl<S, B> Ctx<S, B> {
    /// Whether the attempts are spent: `max_attempts` of them answered other than throttled, or
    /// [`THROTTLED_SENDS`] times as many sent in all. A throttled answer says when its backend
    /// has room and cools it down until then (the next attempt goes elsewhere, or waits, from
    /// the wait budget), so throttling is bounded by the wait budget and the deadline, not by
    /// the count: four 429s in a row while the pace is being learned must not fail a request
    /// that may still wait.
    fn spent_attempts(&self) -> bool {
        let max = self.settings.layer.max_attempts;
        let throttled = self
            .attempts
            .iter()
            .filter(|a| a.outcome.is_throttled())
            .count();
        self.sent.saturating_sub(throttled) >= max
            || self.sent >= max.saturating_mul(THROTTLED_SENDS)
    }

    /// The backoff before going back to a backend that failed: `base * 2^n` for the n-th
    /// backoff (from 0) capped, less a random share of up to half ("equal jitter": requests
    /// that failed together come back spread over half the backoff, never straight back).
    fn backoff(&mut self) -> Duration {
        let s = &self.settings.layer;
        let exp = s
            .backoff_base
            .saturating_mul(2u32.saturating_pow(self.backoffs.min(20)));
        self.backoffs += 1;
        exp.min(s.backoff_max).mul_f64(1.0 - 0.5 * s.rng.next_f64())
    }

    /// How long the request may still wait: what is left of the wait budget, within the deadline.
    fn wait_budget(&self, now: Instant) -> Duration {
        let left = self.max_wait.saturating_sub(self.waited);
        match self.deadline {
            Some(d) => left.min(d.saturating_duration_since(now)),
            None => left,
        }
    }
}

struct Ctx<S, B> {
    inner: S,
    settings: Arc<Settings>,
    template: Request<B>,
    attempts: Vec<Attempt>,
    deadline: Option<Instant>,
    max_wait: Duration,
    waited: Duration,
    /// The backend a `Balance` booked a slot on for this request's next attempt.
    reserved: Option<Arc<str>>,
    /// Attempts that reached a backend (or tried to).
    sent: usize,
    /// The last attempt failed: the next goes only to a backend not tried yet, if there is one.
    elsewhere: bool,
    /// Backoffs taken so far (each doubles the next).
    backoffs: u32,
    /// Whether the last attempt that reached a backend failed (its retry draws on the budget).
    last_failed: bool,
    /// Refused for good: the line stands (no waiting for the slot it named).
    shed: bool,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// Response future of [`RetryAfter429`].
    pub struct ResponseFuture<S: Service<Request<B>>, B, ResB> {
        #[pin]
        state: RetryState<S, B, ResB>,
    }
}

pin_project! {
    #[project = RetryProj]
    enum RetryState<S: Service<Request<B>>, B, ResB> {
        First {
            #[pin] fut: ReadyCall<S, Request<B>>,
            // Boxed: the context (the service kept for retries, the request's copy) is most
            // of the future's size, and the future is moved a few times before it is polled.
            ctx: Option<Box<Ctx<S, B>>>,
            started: Instant,
            // Boxed: only requests with a deadline have one.
            deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        Retrying { fut: BoxFut<Result<Response<ResB>, BoxError>> },
    }
}

/// What one attempt's result means for the loop.
enum Step<ResB> {
    Done(Result<Response<ResB>, BoxError>),
    /// Retry; keeps the throttled response (if any) to return if we give up.
    Retry {
        last: Option<Response<ResB>>,
        /// When something may be available again (from `Unavailable`), if this was a refusal.
        refused_until: Option<Option<Instant>>,
        error: Option<BoxError>,
    },
}

fn judge<S, B, ResB>(
    ctx: &mut Ctx<S, B>,
    result: Result<Response<ResB>, BoxError>,
    started: Instant,
) -> Step<ResB> {
    match result {
        Ok(mut res) => {
            // The endpoint that answered timed the attempt already (no second clock read).
            let (backend, outcome, timed) = answered_by(&res);
            let elapsed = timed.unwrap_or_else(|| started.elapsed());
            ctx.sent += 1;
            ctx.attempts.push(Attempt {
                backend,
                outcome,
                elapsed,
                started,
            });
            tracing::debug!(attempt = ctx.attempts.len(), %outcome, "attempt answered");
            // Only a failed or refused answer is worth the header lookup.
            let told = if ctx.settings.layer.should_retry_header && !outcome.is_success() {
                should_retry(res.headers())
            } else {
                None
            };
            let failed = match told {
                Some(false) => false,
                // The backend says a retry may succeed where the status alone says not.
                Some(true) => !outcome.is_success() && !outcome.is_throttled(),
                None => ctx.settings.layer.retry_failures && outcome.is_failure(),
            };
            ctx.last_failed = failed;
            if failed {
                ctx.elsewhere = true;
            }
            if outcome.is_throttled() || failed {
                Step::Retry {
                    last: Some(res),
                    refused_until: None,
                    error: None,
                }
            } else {
                res.extensions_mut()
                    .insert(Attempts(std::mem::take(&mut ctx.attempts)));
                Step::Done(Ok(res))
            }
        }
        Err(e) => {
            let elapsed = started.elapsed();
            let outcome = classify_error_chain(&*e);
            let backend: Arc<str> = crate::error::find::<crate::error::BackendError>(&*e)
                .map_or_else(|| "-".into(), |b| b.backend.clone());
            match outcome {
                Outcome::Unavailable { retry_at } => {
                    let refused = crate::error::find::<crate::error::Unavailable>(&*e);
                    ctx.reserved = refused.and_then(|u| u.reserved().cloned());
                    // Refused because others wait in line: join it now.
                    let lined = refused.is_some_and(Unavailable::is_lined);
                    ctx.shed = refused.is_some_and(Unavailable::is_shed);
                    Step::Retry {
                        last: None,
                        refused_until: Some(if lined {
                            Some(Instant::now())
                        } else {
                            retry_at
                        }),
                        error: Some(e),
                    }
                }
                o if o == Outcome::ConnectError
                    || (ctx.settings.layer.retry_failures && o.is_failure()) =>
                {
                    ctx.sent += 1;
                    ctx.elsewhere = true;
                    ctx.last_failed = true;
                    ctx.attempts.push(Attempt {
                        backend,
                        outcome,
                        elapsed,
                        started,
                    });
                    Step::Retry {
                        last: None,
                        refused_until: None,
                        error: Some(e),
                    }
                }
                _ => {
                    // A refusal that no retry changes (a misbuilt stack, a path no backend
                    // maps) is the answer itself, whatever came before.
                    if ctx.attempts.is_empty() || matches!(outcome, Outcome::ClientError { .. }) {
                        Step::Done(Err(e))
                    } else {
                        ctx.attempts.push(Attempt {
                            backend,
                            outcome,
                            elapsed,
                            started,
                        });
                        let attempts = std::mem::take(&mut ctx.attempts);
                        Step::Done(Err(Exhausted::new(attempts, None).into()))
                    }
                }
            }
        }
    }
}

/// Sets `retry-after` / `retry-after-ms` on a 429 we return, to when a backend is next free.
/// Never "now" while everything is throttled: a time already past (the request gave up for its
/// attempts or budget, not for a known wait) says [`UNKNOWN_WAIT`], the official SDKs' own
/// first backoff.
fn stamp_retry_after<ResB>(res: &mut Response<ResB>, earliest: Option<Instant>) {
    if let Some(at) = earliest {
        let wait = at.saturating_duration_since(Instant::now());
        let wait = if wait < Duration::from_millis(1) {
            UNKNOWN_WAIT
        } else {
            wait
        };
        set_retry_after(res.headers_mut(), wait);
    }
}

/// The wait a 429 we return asks for when no backend said when it has room again.
const UNKNOWN_WAIT: Duration = Duration::from_millis(500);

async fn retry_loop<S, B, ResB>(
    mut ctx: Ctx<S, B>,
    mut last: Option<Response<ResB>>,
    mut refused: Option<Option<Instant>>,
    mut last_error: Option<BoxError>,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Clone,
{
    // No path can spin: a turn either sends (bounded by `max_attempts`) or, after a refusal,
    // waits at least `MIN_WAIT` out of the wait budget. Refusals back to back at the same
    // instant (many waiters woken together, one admitted) only cost waiting time.
    const MIN_WAIT: Duration = Duration::from_millis(1);
    let mut earliest: Option<Instant> = None;
    // Whether the loop ended because nothing was available (rather than attempts or budget).
    let mut ended_refused;
    let mut turn = 0u32;
    // Whether the last send was restricted to backends not tried yet (after a failure).
    let mut strict = false;
    // The place in a group's line for its next slot, when the last attempt was put in one.
    let mut queued: Option<Place> = None;
    // Its turn in the line came: the next attempt goes (the line's order is kept).
    let mut given = false;
    loop {
        turn += 1;
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        ended_refused = refused.is_some();
        if let Some(retry_at) = refused.take() {
            // Nothing was available: wait for the earliest backend, within budget and deadline.
            // After a failure with every backend tried, back off and go to any of them.
            if retry_at.is_none() && std::mem::take(&mut strict) {
                let backoff = ctx.backoff();
                if backoff > ctx.wait_budget(now) {
                    // No time to go back to a failed backend: its answer stands.
                    ended_refused = false;
                    break;
                }
                wait = backoff;
            } else {
                earliest = retry_at;
                let Some(at) = retry_at else { break };
                wait = at.saturating_duration_since(now).max(MIN_WAIT);
            }
            let over_budget = ctx.waited + wait > ctx.max_wait;
            let past_deadline = ctx.deadline.is_some_and(|d| now + wait > d);
            let shed = std::mem::take(&mut ctx.shed);
            if over_budget || past_deadline || shed {
                tracing::debug!(
                    ?wait,
                    over_budget,
                    past_deadline,
                    shed,
                    "giving up instead of waiting"
                );
                break;
            }
        } else {
            if ctx.spent_attempts() {
                break;
            }
            // Only a retry after a failure is unknown load; a throttled request goes where a
            // backend has room.
            if ctx.last_failed && !ctx.settings.budget.withdraw() {
                tracing::debug!("retry budget exhausted");
                break;
            }
        }
        if let Some(place) = queued.take() {
            // In line: wait for the slot, as long as the budget and the deadline allow.
            let left = ctx.max_wait.saturating_sub(ctx.waited);
            let until = ctx.deadline.map_or(now + left, |d| d.min(now + left));
            let granted = tokio::time::timeout_at(until, place.0.granted()).await;
            if let Ok(Some((_, at))) = &granted {
                // Booked for it, at its time: go then.
                tokio::time::sleep_until(ctx.deadline.map_or(*at, |d| d.min(*at))).await;
            }
            ctx.waited += now.elapsed();
            match granted {
                Ok(slot) => {
                    ctx.reserved = slot.map(|(backend, _)| backend);
                    given = true;
                }
                Err(_) => {
                    tracing::debug!(waited = ?ctx.waited, "no slot in time: giving up");
                    // Say when the line would serve it now (the estimate it joined with has
                    // passed).
                    if let Some(fresh) = place.0.estimate() {
                        earliest = Some(fresh);
                        last_error = last_error.map(|e| match e.downcast::<Unavailable>() {
                            Ok(u) => Box::new(u.until(fresh)) as BoxError,
                            Err(e) => e,
                        });
                    }
                    break;
                }
            }
        } else if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            ctx.waited += wait;
        }
        if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let mut req = clone_request(&ctx.template);
        // Steer the retry away from the backends this request already tried.
        let tried: Vec<Arc<str>> = ctx
            .attempts
            .iter()
            .map(|a| a.backend.clone())
            .filter(|b| &**b != "-")
            .collect();
        // After a failure, only a backend not tried yet (none: back off, then any).
        strict = !tried.is_empty() && std::mem::take(&mut ctx.elsewhere);
        let line = Slot::default();
        req.extensions_mut().insert(crate::attempt::Steer {
            tried,
            elsewhere: strict,
            // Come back for the slot booked while we waited, or let the balancer book one.
            reserved: ctx.reserved.take(),
            wait_budget: Some(ctx.wait_budget(Instant::now())),
            line: Some(line.clone()),
            given: std::mem::take(&mut given),
        });
        let started = Instant::now();
        let span = tracing::debug_span!("attempt", n = ctx.attempts.len() + 1, turn, wait = ?wait);
        let attempt = ctx.inner.clone().oneshot(req).instrument(span);
        let result = match ctx.deadline {
            Some(d) => match tokio::time::timeout_at(d, attempt).await {
                Ok(r) => r.map_err(Into::into),
                // Past the deadline: the last answer, if it was a 429, with its honest hint;
                // else the attempts so far.
                Err(_) if last.is_some() => {
                    ended_refused = false;
                    break;
                }
                Err(_) => return Err(DeadlineExceeded::new(ctx.attempts).into()),
            },
            None => attempt.await.map_err(Into::into),
        };
        match judge(&mut ctx, result, started) {
            Step::Done(r) => return r,
            Step::Retry {
                last: l,
                refused_until,
                error,
            } => {
                if l.is_some() {
                    last = l;
                }
                if error.is_some() {
                    last_error = error;
                }
                refused = refused_until;
                queued = line.get().map(|t| Place(t.clone()));
            }
        }
    }
    // Give up: the last 429 with an honest retry-after; the last 5xx as it is when attempts
    // ran out; otherwise an error listing every attempt and when to come back.
    if let Some(mut res) = last {
        let throttled = res
            .extensions()
            .get::<Served>()
            .is_none_or(|s| s.outcome.is_throttled());
        if !throttled && ended_refused {
            return Err(Exhausted::new(ctx.attempts, earliest).into());
        }
        if !throttled {
            res.extensions_mut().insert(Attempts(ctx.attempts));
            return Ok(res);
        }
        let hint = res
            .extensions()
            .get::<Served>()
            .and_then(|s| match s.outcome {
                Outcome::Throttled { retry_after } => retry_after.map(|d| Instant::now() + d),
                _ => None,
            });
        stamp_retry_after(&mut res, earliest.max(hint));
        res.extensions_mut().insert(Attempts(ctx.attempts));
        return Ok(res);
    }
    if ctx.attempts.is_empty() {
        return Err(last_error.unwrap_or_else(|| Exhausted::new(Vec::new(), earliest).into()));
    }
    Err(Exhausted::new(ctx.attempts, earliest).into())
}

/// True for an answer worth returning: not throttled, not a failure.
fn good<ResB>(result: &Result<Response<ResB>, BoxError>) -> bool {
    match result {
        Ok(res) => {
            let (_, outcome, _) = answered_by(res);
            !outcome.is_throttled() && !outcome.is_failure()
        }
        Err(_) => false,
    }
}

/// The first attempt with a hedge: after `after` without an answer head, a second attempt on
/// another backend; the first good answer wins. Then the usual loop, if the result asks for it.
async fn hedged<S, B, ResB>(
    mut ctx: Ctx<S, B>,
    mut req: Request<B>,
    after: Duration,
    started: Instant,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Clone,
{
    let picked = crate::attempt::Picked::default();
    req.extensions_mut().insert(picked.clone());
    let call = |svc: &S, req: Request<B>| {
        let fut = svc.clone().oneshot(req);
        async move { fut.await.map_err(Into::into) }
    };
    let mut primary = std::pin::pin!(call(&ctx.inner, req));
    let result = tokio::select! {
        r = &mut primary => r,
        _ = tokio::time::sleep(after) => {
            if ctx.settings.budget.withdraw() {
                let mut second = clone_request(&ctx.template);
                second.extensions_mut().remove::<crate::attempt::Picked>();
                if let Some(name) = picked.0.get() {
                    second.extensions_mut().insert(crate::attempt::Steer {
                        tried: vec![name.clone()],
                        elsewhere: true,
                        ..Default::default()
                    });
                }
                tracing::debug!(?after, "no answer yet: hedging on another backend");
                let mut secondary = std::pin::pin!(call(&ctx.inner, second));
                let (first, primary_won) = tokio::select! {
                    r = &mut primary => (r, true),
                    r = &mut secondary => (r, false),
                };
                if good(&first) {
                    tracing::debug!(primary_won, "hedge race won; the other attempt is cancelled");
                    first
                } else {
                    // The first to finish was no good: the other may still be.
                    let other = if primary_won { secondary.await } else { primary.await };
                    let refused = |r: &Result<Response<ResB>, BoxError>| {
                        matches!(r, Err(e) if crate::error::find::<crate::error::Unavailable>(&**e).is_some())
                    };
                    if !refused(&first) && !refused(&other) {
                        // Both reached a backend: one more attempt than `judge` counts.
                        ctx.sent += 1;
                    }
                    if good(&other) || refused(&first) { other } else { first }
                }
            } else {
                primary.await
            }
        }
    };
    match judge(&mut ctx, result, started) {
        Step::Done(r) => r,
        Step::Retry {
            last,
            refused_until,
            error,
        } => retry_loop(ctx, last, refused_until, error).await,
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B, ResB>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Clone + Send + Sync + 'static,
    ResB: Send + 'static,
{
    type Output = Result<Response<ResB>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                RetryProj::First {
                    fut,
                    ctx,
                    started,
                    deadline,
                } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            if let Some(sleep) = deadline {
                                ready!(sleep.as_mut().poll(cx));
                                return Poll::Ready(Err(DeadlineExceeded::new(Vec::new()).into()));
                            }
                            return Poll::Pending;
                        }
                    };
                    let Some(mut c) = ctx.take() else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    match judge(&mut c, result, *started) {
                        Step::Done(r) => return Poll::Ready(r),
                        Step::Retry {
                            last,
                            refused_until,
                            error,
                        } => {
                            let fut = Box::pin(retry_loop(*c, last, refused_until, error));
                            this.state.set(RetryState::Retrying { fut });
                        }
                    }
                }
                RetryProj::Retrying { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

impl<S: Service<Request<B>>, B, ResB> fmt::Debug for ResponseFuture<S, B, ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("retry::ResponseFuture")
    }
}
