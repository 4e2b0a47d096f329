//! `CircuitBreaker`: stop sending to a failing backend, probe it back.
//!
//! One breaker per backend, placed above that backend's [`Endpoint`](crate::endpoint::Endpoint)
//! so it sees each attempt's [`Outcome`]. The decision logic is a pure, crate-private state
//! machine (`state::Machine`, tested on its own); this layer is only the gate, and it publishes the circuit in the
//! backend's [`BackendState`](crate::BackendState) so that `Balance` skips an open backend
//! without asking.
//!
//! | outcome of an admitted request | what the breaker does |
//! |---|---|
//! | success, client error (4xx) | counts as a healthy answer (resets the consecutive-failure count) |
//! | throttled (429), quota exhausted | counts as nothing: throttling steers load, it is not ill health (the cooldown handles it) |
//! | server error (5xx), connect error, transport error, timeout | counts as a failure |
//! | slower than `slow_call` (if set) | counts as a failure |
//! | another backend's answer (a breaker for one backend placed above a `Balance`) | counts as nothing |
//!
//! States: `Closed` (traffic flows) → `Open` after `consecutive_failures` failures in a row, or a
//! failure rate of `failure_rate` over `window` once `min_calls` calls were seen. While open it
//! answers at once with [`error::Open`] (no network I/O). The open period starts at `base_open`,
//! grows by `growth` with each consecutive trip up to `max_open` (1 s, x1.2, 10 s by default), ±`jitter`, and resets after a recovery.
//! When it ends the breaker is `HalfOpen`: it lets `probes` requests through; a healthy answer
//! closes it, a failure reopens it for longer. A probe whose caller gives up frees its slot.
//!
//! **Safety valve**: the breakers of one [`BreakerGroup`] never eject more than
//! `max_ejection` of the group (default 50%, at least one backend) for a failure *rate*. A
//! backend that failed every request (its trip came from `consecutive_failures` in a row: a
//! refused port, a 500 to everything) may leave past that share, as long as one backend of the
//! group stays admitted: a dead backend leaves the rotation even in a group of three. A breaker
//! that would exceed the cap stays closed and logs why, so when every backend fails, requests
//! keep reaching the ones left and end with a typed error naming each backend and why (never a
//! hang, never an empty group).
//!
//! **One circuit per backend**: a backend that is in several groups (two chains, a chat and a
//! batch route) has one state machine, shared by the breakers of every group; failures seen
//! through any of them add up, and one probe serves them all. The first group's policy applies.
//!
//! **No lock per answer**: a closed circuit counts answers in atomics and takes the machine's
//! lock only to trip, probe or close.
//!
//! **Health probes** (optional, [`CircuitBreaker::spawn_health_probe`]): a background task sends
//! `GET {path}` through the backend's stack at an interval and feeds the breaker, so a dead
//! backend is known before users hit it and a recovered one is let back in without sacrificing a
//! user request. The task stops when the last clone of the breaker is dropped.
//!
//! State changes are `tracing` events (`warn` on open, `info` on half-open and close) and are
//! observable through [`Snapshot::circuit`](crate::Snapshot::circuit).
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_llm_lb::{Backend, circuit_breaker::{BreakerGroup, Policy}, endpoint::EndpointLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! # let refusing = tower_llm_lb_mock::RefusingPort::new()?;
//! # let url = format!("{}/v1", refusing.url());
//! let backend = Backend::openai("local", url).build()?;
//! let group = BreakerGroup::try_new(Policy { consecutive_failures: 1, ..Policy::default() })?;
//! let svc = ServiceBuilder::new()
//!     .layer(group.layer_for(&backend))
//!     .layer(EndpointLayer::new(backend.clone()))
//!     .service(tower_llm_lb::client::http_client::<String>());
//! // The port refuses: the first failure trips the breaker (a group of one may eject its only
//! // backend), and the next request is refused without touching the network.
//! let _ = svc.clone().oneshot(http::Request::post("/v1/chat/completions").body(String::new())?).await;
//! let err = svc.oneshot(http::Request::post("/v1/chat/completions").body(String::new())?).await.unwrap_err();
//! assert!(err.is::<tower_llm_lb::error::Open>());
//! # Ok(()) }
//! ```

mod state;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::Backend;
use crate::body::ReplayBody;
use crate::classify::{Outcome, classify_error_chain};
use crate::error::{self, BoxError};
use crate::rng::Rng;
use crate::state::Circuit;
pub use state::Policy;
use state::{Admit, Machine, Tally, Transition};

/// How many backends of a group may be ejected at once.
#[derive(Debug)]
struct Ejections {
    max_share: f64,
    members: AtomicUsize,
    ejected: AtomicUsize,
}

impl Ejections {
    /// Claims an ejection slot; false when the group may not lose another backend. A backend
    /// that failed every request (`dead`) may go past the share, as long as one backend of a
    /// larger group stays admitted.
    fn try_eject(&self, dead: bool) -> bool {
        let members = self.members.load(Acquire);
        let share = ((members as f64 * self.max_share).floor() as usize).max(1);
        let allowed = if dead {
            share.max(members.saturating_sub(1))
        } else {
            share
        };
        self.ejected
            .fetch_update(AcqRel, Acquire, |e| (e < allowed).then_some(e + 1))
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .ejected
            .fetch_update(AcqRel, Acquire, |e| Some(e.saturating_sub(1)));
    }
}

/// The breakers of one group of backends (a `Balance`), sharing a policy and the ejection cap.
#[derive(Clone, Debug)]
pub struct BreakerGroup {
    policy: Policy,
    ejections: Arc<Ejections>,
    rng: Rng,
}

impl BreakerGroup {
    /// A group with `policy`; fails on a policy that cannot work (the message names the field).
    pub fn try_new(policy: Policy) -> Result<Self, error::InvalidConfig> {
        policy.validate().map_err(|e| {
            error::InvalidConfig::new(format!("invalid circuit breaker policy: {e}"))
        })?;
        Ok(BreakerGroup {
            policy,
            ejections: Arc::new(Ejections {
                max_share: 0.5,
                members: AtomicUsize::new(0),
                ejected: AtomicUsize::new(0),
            }),
            rng: Rng::from_entropy(),
        })
    }

    /// The largest share of the group's backends that may be ejected at once (default 0.5; at
    /// least one backend may always be ejected). Call before [`BreakerGroup::layer_for`].
    pub fn max_ejection(mut self, share: f64) -> Result<Self, error::InvalidConfig> {
        if !(0.0..=1.0).contains(&share) {
            return Err(error::InvalidConfig::new(
                "invalid circuit breaker policy: max_ejection: must be in [0, 1]",
            ));
        }
        self.ejections = Arc::new(Ejections {
            max_share: share,
            members: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
        });
        Ok(self)
    }

    /// The random source for the open-time jitter.
    pub(crate) fn rng(mut self, rng: Rng) -> Self {
        self.rng = rng;
        self
    }

    /// The breaker layer for one backend of the group.
    ///
    /// A backend has one circuit, however many groups it is in: the first breaker made for it
    /// creates its state machine (with this group's policy) and later ones, from other groups,
    /// share it (a different policy is ignored with a warning). An open circuit takes an
    /// ejection slot in the group whose answer opened it.
    pub fn layer_for(&self, backend: &Backend) -> CircuitBreakerLayer {
        CircuitBreakerLayer {
            target: Target::One(self.shared_for(backend)),
        }
    }

    /// One breaker layer for every backend of `backends`, acting for the one a
    /// [`BalanceLayer`](crate::balance::BalanceLayer) above chose for each request (its
    /// mark on the request): the flat stack's breaker, over one client. Each
    /// backend keeps its own circuit (the same one `layer_for` would give it). A request for a
    /// backend it was not built for, or that nobody marked, is refused with
    /// [`NoBackendChosen`](crate::error::NoBackendChosen), without sending.
    pub fn layer_for_chosen<'a>(
        &self,
        backends: impl IntoIterator<Item = &'a Backend>,
    ) -> CircuitBreakerLayer {
        let map = backends
            .into_iter()
            .map(|b| (b.name_arc().clone(), self.shared_for(b)))
            .collect();
        CircuitBreakerLayer {
            target: Target::Chosen(Arc::new(map)),
        }
    }

    /// The breaker of `backend` in this group, counted as a member of it.
    fn shared_for(&self, backend: &Backend) -> Arc<Shared> {
        self.ejections.members.fetch_add(1, AcqRel);
        let make = || Core::new(self.policy.clone());
        let core = backend
            .state()
            .breaker_core(make)
            .unwrap_or_else(|| Arc::new(make()));
        if core.policy != self.policy {
            tracing::warn!(
                backend = backend.name(),
                "backend is in groups with different breaker policies: the first one applies"
            );
        }
        Arc::new(Shared {
            backend: backend.clone(),
            core,
            ejections: self.ejections.clone(),
            rng: self.rng.clone(),
            probe_task: Mutex::new(None),
        })
    }
}

/// Whose breaker a [`CircuitBreaker`] is.
#[derive(Clone)]
enum Target {
    /// One backend's.
    One(Arc<Shared>),
    /// Each request's chosen backend's, by name.
    Chosen(Arc<std::collections::HashMap<Arc<str>, Arc<Shared>>>),
}

impl Target {
    fn for_request<B>(&self, req: &Request<B>) -> Option<&Arc<Shared>> {
        match self {
            Target::One(s) => Some(s),
            Target::Chosen(map) => req
                .extensions()
                .get::<crate::attempt::Chosen>()
                .and_then(|c| map.get(c.backend().name())),
        }
    }

    fn one(&self) -> Option<&Arc<Shared>> {
        match self {
            Target::One(s) => Some(s),
            Target::Chosen(_) => None,
        }
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::One(s) => f.write_str(s.backend.name()),
            Target::Chosen(map) => write!(f, "the chosen one of {} backends", map.len()),
        }
    }
}

/// One backend's breaker state, shared by the breakers of every group it is in.
struct Core {
    /// The machine's counts, for answers of a closed circuit (no lock).
    tally: Arc<Tally>,
    policy: Policy,
    machine: Mutex<Machine>,
    /// The group whose ejection slot the open circuit holds, if it is open.
    ejected_by: Mutex<Option<Arc<Ejections>>>,
}

impl Core {
    fn new(policy: Policy) -> Self {
        let machine = Machine::new(policy.clone());
        Core {
            tally: machine.tally(),
            policy,
            machine: Mutex::new(machine),
            ejected_by: Mutex::new(None),
        }
    }

    fn ejected_by(&self) -> std::sync::MutexGuard<'_, Option<Arc<Ejections>>> {
        self.ejected_by.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One group's breaker for one backend.
struct Shared {
    backend: Backend,
    core: Arc<Core>,
    ejections: Arc<Ejections>,
    rng: Rng,
    probe_task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.probe_task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
        // The group is going away: give back the slot its ejection of this backend holds.
        let mut holder = self.core.ejected_by();
        if holder
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, &self.ejections))
            && let Some(e) = holder.take()
        {
            e.release();
        }
    }
}

impl Shared {
    fn with_machine<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> T {
        let mut m = self.core.machine.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut m)
    }

    /// Applies a transition: the ejection cap, the shared circuit, the events.
    fn apply(&self, tr: Option<Transition>) {
        let Some(tr) = tr else { return };
        let name = self.backend.name();
        match tr {
            Transition::Opened { until, trips } => {
                {
                    let mut holder = self.core.ejected_by();
                    if holder.is_none() {
                        let dead = self.with_machine(|m| m.tripped_in_a_row());
                        if !self.ejections.try_eject(dead) {
                            drop(holder);
                            self.with_machine(Machine::stay_closed);
                            tracing::warn!(
                                backend = name,
                                "circuit not opened: the group may not eject more of its backends"
                            );
                            return;
                        }
                        *holder = Some(self.ejections.clone());
                    }
                }
                self.backend.state().set_circuit(Circuit::Open { until });
                tracing::warn!(backend = name, trips, open_for = ?until.saturating_duration_since(Instant::now()), "circuit opened");
            }
            Transition::HalfOpened => {
                self.backend.state().set_circuit(Circuit::HalfOpen);
                tracing::info!(backend = name, "circuit half-open: probing");
            }
            Transition::Closed => {
                if let Some(e) = self.core.ejected_by().take() {
                    e.release();
                }
                self.backend.state().set_circuit(Circuit::Closed);
                tracing::info!(backend = name, "circuit closed");
            }
        }
    }

    /// Asks the machine (a circuit that is not closed; a closed one admits without asking).
    fn admit(&self, now: Instant) -> Admit {
        let (admit, tr) = self.with_machine(|m| m.admit(now));
        self.apply(tr);
        admit
    }

    fn record(&self, probe: bool, outcome: Outcome, start: Option<Instant>) {
        let now = Instant::now();
        let elapsed = start.map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if outcome.is_throttled() || matches!(outcome, Outcome::Unavailable { .. }) {
            if probe {
                // The backend answered (busy): alive. Close rather than hold the probe slot.
                let tr = self.with_machine(|m| m.record(true, false, elapsed, now, 0.5));
                self.apply(tr);
            }
            return;
        }
        let failed = outcome.is_failure();
        if !probe && self.backend.state().circuit() == Circuit::Closed {
            // A closed circuit counts without a lock; only a trip takes the machine.
            let slow = self.core.policy.slow_call.is_some_and(|s| elapsed >= s);
            if self
                .core
                .tally
                .count(&self.core.policy, failed || slow, now)
            {
                let tr = self.with_machine(|m| m.trip_if_closed(now, self.rng.next_f64()));
                self.apply(tr);
            }
            return;
        }
        let tr = self.with_machine(|m| m.record(probe, failed, elapsed, now, self.rng.next_f64()));
        self.apply(tr);
    }
}

/// Layer that wraps one backend's service in a [`CircuitBreaker`]. Made by
/// [`BreakerGroup::layer_for`].
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    target: Target,
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("backend", &self.target)
            .finish()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            target: self.target.clone(),
        }
    }
}

/// Middleware that stops sending to a failing backend. See the [module docs](self).
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    target: Target,
}

impl<S> CircuitBreaker<S> {
    /// The backend's circuit now (a chosen-backend breaker, which has one circuit per backend,
    /// says `Closed`: read each backend's [`Snapshot::circuit`](crate::Snapshot::circuit)).
    pub(crate) fn circuit(&self) -> Circuit {
        self.target
            .one()
            .map_or(Circuit::Closed, |s| s.backend.state().circuit())
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("backend", &self.target)
            .field("circuit", &self.circuit())
            .field("inner", &self.inner)
            .finish()
    }
}

/// What the answer means for `backend`'s health: `None` when another backend gave it (as its
/// `Endpoint` stamped it), so a breaker placed above a `Balance` never trips one backend for
/// another's failures.
fn outcome_of<B>(result: &Result<Response<B>, BoxError>, backend: &Backend) -> Option<Outcome> {
    let mine = |by: &str| by == "-" || by == backend.name();
    match result {
        Ok(res) => match res.extensions().get::<crate::attempt::Served>() {
            Some(s) => (Arc::ptr_eq(s.backend.name_arc(), backend.name_arc())
                || mine(s.backend.name()))
            .then_some(s.outcome),
            // Below the `Endpoint`: the stock reading of the status.
            None => Some(crate::attempt::outcome_of(res).1),
        },
        Err(e) => crate::error::find::<crate::error::BackendError>(&**e)
            .is_none_or(|b| mine(&b.backend))
            .then(|| classify_error_chain(&**e)),
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CircuitBreaker<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Some(shared) = self.target.for_request(&req).cloned() else {
            return ResponseFuture::rejected(crate::error::NoBackendChosen.into());
        };
        // A closed circuit admits without the clock; the start time is only needed to spot
        // slow calls.
        if shared.backend.state().circuit() == Circuit::Closed {
            let start = shared.core.policy.slow_call.map(|_| Instant::now());
            return ResponseFuture::call(self.inner.call(req), shared, false, start);
        }
        let now = Instant::now();
        let probe = match shared.admit(now) {
            Admit::Yes => false,
            Admit::Probe => true,
            Admit::No(until) => {
                return ResponseFuture::rejected(
                    error::Open {
                        backend: shared.backend.name_arc().clone(),
                        until,
                    }
                    .into(),
                );
            }
        };
        ResponseFuture::call(self.inner.call(req), shared, probe, Some(now))
    }
}

impl<F> ResponseFuture<F> {
    fn rejected(error: BoxError) -> Self {
        ResponseFuture {
            state: BreakerState::Rejected { error: Some(error) },
            guard: None,
        }
    }

    fn call(fut: F, shared: Arc<Shared>, probe: bool, start: Option<Instant>) -> Self {
        ResponseFuture {
            state: BreakerState::Call { fut },
            guard: Some(Guard {
                shared,
                probe,
                start,
                done: false,
            }),
        }
    }
}

/// Records the outcome, or frees a probe slot if the caller gave up first.
struct Guard {
    shared: Arc<Shared>,
    probe: bool,
    /// When the call was sent, if the policy needs its duration (slow calls, probes).
    start: Option<Instant>,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.shared.with_machine(Machine::abandon_probe);
        }
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: BreakerState<F>,
        guard: Option<Guard>,
    }
}

pin_project! {
    #[project = BreakerProj]
    enum BreakerState<F> {
        Call { #[pin] fut: F },
        // Boxed: refusals are the rare path.
        Rejected { error: Option<BoxError> },
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            BreakerProj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| "polled after completion".into()))),
            BreakerProj::Call { fut } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(mut g) = this.guard.take() {
                    g.done = true;
                    match outcome_of(&result, &g.shared.backend) {
                        Some(outcome) => g.shared.record(g.probe, outcome, g.start),
                        // Another backend's answer (the breaker sits above the layer that
                        // picks): not this backend's health. A probe slot is freed.
                        None if g.probe => g.shared.with_machine(Machine::abandon_probe),
                        None => {}
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit_breaker::ResponseFuture")
    }
}

/// What an active health probe sends and how often.
#[derive(Clone, Debug)]
pub struct HealthProbe {
    /// The path to `GET`, sent to the backend's host as written (`/status-0123456789abcdef`),
    /// not mapped like an API path.
    pub path: String,
    /// Time between probes (default 30 s, as Azure Application Gateway).
    pub interval: Duration,
    /// How long one probe may take before it counts as a failure (default 30 s).
    pub timeout: Duration,
    /// The statuses that mean healthy (default 200-399, as Application Gateway).
    pub healthy: std::ops::RangeInclusive<u16>,
    /// Failed probes in a row that take the backend out (default 2; its circuit opens).
    pub unhealthy_threshold: u32,
    /// Healthy probes in a row that let it back in (default 1).
    pub healthy_threshold: u32,
    /// What a probe asks (default: `GET {path}`, judged by status).
    pub protocol: ProbeProtocol,
}

/// What a [`HealthProbe`] asks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeProtocol {
    /// `GET {path}`; healthy when the status is in `healthy`.
    #[default]
    Http,
    /// gRPC's health protocol (`grpc.health.v1.Health/Check` for this service name, `""` for
    /// the whole server); healthy when the answer says `SERVING`. `path` and `healthy` are
    /// not used. For [`Provider::Grpc`](crate::provider::Provider::Grpc) backends whose
    /// servers offer `grpc.health.v1.Health` (tonic's `tonic-health` does).
    Grpc {
        /// The service to ask about.
        service: String,
    },
}

impl Default for HealthProbe {
    fn default() -> Self {
        HealthProbe {
            path: "/".into(),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            healthy: 200..=399,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            protocol: ProbeProtocol::Http,
        }
    }
}

impl<S, ResB> CircuitBreaker<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    ResB: http_body::Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    /// Starts a background task that probes the backend through the inner service every
    /// `probe.interval` and feeds the breaker: a healthy answer (below 500, not a timeout or
    /// connection failure) closes an open circuit at once, a failure counts like a request's.
    ///
    /// The task holds only a weak reference: it stops when the last clone of this breaker (and
    /// of its layer) is dropped. Replaces a probe started earlier. Needs a tokio runtime.
    pub fn spawn_health_probe(&self, probe: HealthProbe) -> Result<(), error::InvalidConfig> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| probe_not_started("no tokio runtime"))?;
        let path = match &probe.protocol {
            ProbeProtocol::Http => probe.path.as_str(),
            ProbeProtocol::Grpc { .. } => crate::classify::grpc::HEALTH_CHECK_PATH,
        };
        let uri: http::Uri = path
            .parse()
            .map_err(|_| probe_not_started("path is not a valid request path"))?;
        let Some(shared) = self.target.one() else {
            return Err(probe_not_started(
                "a chosen-backend breaker has no one backend to probe: use BreakerGroup::layer_for",
            ));
        };
        let weak: Weak<Shared> = Arc::downgrade(shared);
        let inner = self.inner.clone();
        let task = handle.spawn(probe_loop(weak, inner, uri, probe));
        let mut slot = shared.probe_task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.replace(task.abort_handle()) {
            old.abort();
        }
        Ok(())
    }
}

/// Whether a gRPC health answer says `SERVING`: status 200, no failing `grpc-status` in the
/// head or the trailers, and a `HealthCheckResponse` of `SERVING` in the (small) body.
async fn grpc_healthy<ResB>(res: Response<ResB>) -> bool
where
    ResB: http_body::Body,
    ResB::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let failing = |h: &http::HeaderMap| crate::classify::grpc::status(h).is_some_and(|c| c != 0);
    if res.status() != http::StatusCode::OK || failing(res.headers()) {
        return false;
    }
    let Ok(body) = http_body_util::Limited::new(res.into_body(), 4096)
        .collect()
        .await
    else {
        return false;
    };
    if body.trailers().is_some_and(failing) {
        return false;
    }
    crate::classify::grpc::health_serving(&body.to_bytes()) == Some(true)
}

async fn probe_loop<S, ResB>(weak: Weak<Shared>, inner: S, uri: http::Uri, probe: HealthProbe)
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    ResB: http_body::Body,
    ResB::Error: Into<BoxError>,
{
    use tower::ServiceExt;
    let mut ticker = tokio::time::interval(probe.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut failed_in_a_row, mut healthy_in_a_row) = (0u32, 0u32);
    loop {
        ticker.tick().await;
        if weak.strong_count() == 0 {
            return;
        }
        let mut req = match &probe.protocol {
            ProbeProtocol::Http => Request::new(ReplayBody::default()),
            ProbeProtocol::Grpc { service } => {
                let mut req = Request::new(ReplayBody::from(
                    crate::classify::grpc::health_check_request(service),
                ));
                *req.method_mut() = http::Method::POST;
                let h = req.headers_mut();
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
                req
            }
        };
        *req.uri_mut() = uri.clone();
        req.extensions_mut().insert(crate::attempt::AsWritten);
        let (svc, grpc, statuses) = (
            inner.clone(),
            matches!(probe.protocol, ProbeProtocol::Grpc { .. }),
            probe.healthy.clone(),
        );
        let asked = async move {
            let res = svc.oneshot(req).await.map_err(Into::into)?;
            Ok::<_, BoxError>(if grpc {
                grpc_healthy(res).await
            } else {
                statuses.contains(&res.status().as_u16())
            })
        };
        let healthy = matches!(
            tokio::time::timeout(probe.timeout, asked).await,
            Ok(Ok(true))
        );
        let Some(shared) = weak.upgrade() else { return };
        let now = Instant::now();
        shared.backend.state().note_probe(now, healthy);
        failed_in_a_row = if healthy { 0 } else { failed_in_a_row + 1 };
        healthy_in_a_row = if healthy { healthy_in_a_row + 1 } else { 0 };
        let jitter = shared.rng.next_f64();
        let out = shared.backend.state().circuit() != Circuit::Closed;
        let tr = if healthy && out && healthy_in_a_row < probe.healthy_threshold.max(1) {
            // Not healthy long enough to come back yet.
            None
        } else if !healthy && failed_in_a_row >= probe.unhealthy_threshold.max(1) {
            // The threshold is the probe's own, not the requests' consecutive-failure count.
            shared.with_machine(|m| {
                m.trip_if_closed(now, jitter)
                    .or_else(|| m.health(false, now, jitter))
            })
        } else {
            shared.with_machine(|m| m.health(healthy, now, jitter))
        };
        tracing::debug!(backend = shared.backend.name(), healthy, "health probe");
        shared.apply(tr);
    }
}

fn probe_not_started(why: &str) -> error::InvalidConfig {
    error::InvalidConfig::new(format!("health probe not started: {why}"))
}
