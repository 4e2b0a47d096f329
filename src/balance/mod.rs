//! `Balance`: spread requests over backends by priority tier and weight, skipping throttled or
//! broken ones.
//!
//! Each backend is a service already wrapped in its per-backend layers (at least
//! [`Endpoint`](crate::endpoint::Endpoint), which keeps the backend's [`BackendState`](crate::BackendState) current).
//! For every request `Balance`:
//!
//! 1. takes the best (lowest) priority tier that has an available backend: one that is not
//!    cooling down after a 429, whose circuit is not open, and whose weight is above 0. Lower
//!    tiers take over when the whole better tier is unavailable, and give traffic back as soon as
//!    it recovers (how a provisioned PTU deployment is drained first);
//! 2. within the tier, prefers backends whose last answer did not say the token quota is used up
//!    (`x-ratelimit-remaining-*: 0`), and backends that are not silent (answering nothing for
//!    2 s and 5x their peers' latency while requests await them: a hung backend), so load moves
//!    before the 429 or the timeout comes;
//! 3. a backend whose request quota is used up is paced: one request per refill interval, so
//!    its quota is spent to the last request without earning 429s. The interval comes from the
//!    headers real services send: a reset and a remaining count (OpenAI, Anthropic), or a
//!    per-minute limit and remaining with no reset (Azure standard deployments: one minute over
//!    the limit, a burst of one second's share of what remains, less a small reserve);
//! 4. a backend just back from a 429 cooldown that gives no quota hints takes one request at a time until one
//!    succeeds (so the requests that waited for it do not all rush it and earn a 429 each);
//!    while that probe is in flight it counts as available again in 25 ms; likewise a backend
//!    takes at most 4 requests at once before its first answer tells its quota;
//! 5. picks one with its [`Strategy`] (by default the less loaded of two, load being requests
//!    in flight times latency; weighted random where weights differ) and sends the request there,
//!    driving that backend's readiness first.
//!
//! | outcome | what `Balance` does |
//! |---|---|
//! | any response (2xx, 429, 5xx, 4xx) | returns it as is; the backend's `Endpoint` already recorded it |
//! | an error from the backend | returns it as is ([`BackendError`](crate::error::BackendError) names the backend) |
//! | no backend of any tier available | fails at once, without waiting or sending, with [`error::Unavailable`] carrying the earliest instant one becomes available |
//!
//! `Balance` never retries; put [`RetryAfter429`](crate::retry::RetryAfter429) above it.
//!
//! It is `Clone + Send + Sync` and shared by any number of tasks without `Buffer`: picking reads
//! atomics only, takes no lock and allocates nothing; each call clones the chosen backend's
//! service (reference counts).
//!
//! ```
//! use tower::ServiceExt;
//! use tower_llm_lb::{Backend, balance::{Balance, Strategy}};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! let ptu = Backend::openai("ptu", "http://10.0.0.1/v1").priority(0).build()?;
//! let paygo = Backend::openai("paygo", "http://10.0.0.2/v1").priority(1).build()?;
//! let svc = |name: &'static str| tower::service_fn(move |_req: http::Request<()>| async move {
//!     Ok::<_, tower_llm_lb::BoxError>(http::Response::new(name))
//! });
//! let balance = Balance::builder()
//!     .backend(ptu.clone(), svc("ptu"))
//!     .backend(paygo, svc("paygo"))
//!     .strategy(Strategy::RoundRobin)
//!     .build()?;
//! assert_eq!(*balance.clone().oneshot(http::Request::new(())).await?.body(), "ptu");
//! // While the PTU deployment cools down after a 429, the next tier takes the traffic.
//! ptu.state().extend_cooldown(tokio::time::Instant::now() + std::time::Duration::from_secs(5));
//! assert_eq!(*balance.oneshot(http::Request::new(())).await?.body(), "paygo");
//! # Ok(()) }
//! ```

mod strategy;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::ready::ReadyCall;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use crate::attempt::Chosen;
pub use crate::attempt::Pinned;
use crate::attempt::TokenCost;
use crate::backend::Backend;
use crate::body::{token_cost, token_cost_on};
use crate::error::BoxError;
use crate::rng::Rng;
use crate::waitlist::Waitlist;
pub use crate::waitlist::{Priority, StandingLine, Tenant};
pub use strategy::Strategy;
use strategy::{Avail, Candidate, Tier};

use crate::error;

struct Slot<S> {
    backend: Backend,
    service: S,
    /// A member that is itself a group: it must not wait for room inside, since this group
    /// may have room elsewhere (its requests carry a zero wait budget).
    group: bool,
    /// A member (a service standing for other backends, not a backend): the routes it serves
    /// are its own business.
    member: bool,
}

/// Which routes the backends of a group serve (see [`Provider::serves_route`]).
struct Routes {
    /// One provider of each route class among the group's backends (members excluded): a
    /// request's route is checked against these, at most three, not against every backend.
    classes: Box<[crate::provider::Provider]>,
    /// Some slot is a member, whose routes are its own business.
    members: bool,
}
struct Shared<S> {
    name: Arc<str>,
    slots: Box<[Slot<S>]>,
    /// What the picker reads of each slot, built once.
    candidates: Box<[Candidate]>,
    /// Slot indices grouped by tier, best tier first.
    tiers: Box<[strategy::Tier]>,
    strategy: Strategy,
    rng: Rng,
    cursors: Box<[AtomicUsize]>,
    probe_poll: std::time::Duration,
    /// Some backend declared the models it serves: requests are matched by their `model`.
    by_model: bool,
    routes: Routes,
    /// The requests waiting for this group's paced slots (`None` in a group of groups, whose
    /// members pace themselves).
    waitlist: Option<Arc<Waitlist>>,
}

/// Spreads requests over backends. See the [module docs](self).
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Balance {
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("name", &self.shared.name)
            .field(
                "backends",
                &self
                    .shared
                    .slots
                    .iter()
                    .map(|s| s.backend.name())
                    .collect::<Vec<_>>(),
            )
            .field("strategy", &self.shared.strategy)
            .finish()
    }
}

/// Builds a [`Balance`].
#[must_use]
pub struct BalanceBuilder<S> {
    name: String,
    error: Option<String>,
    slots: Vec<Slot<S>>,
    strategy: Strategy,
    rng: Option<Rng>,
    standing: Option<StandingLine>,
}

impl<S> fmt::Debug for BalanceBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceBuilder")
            .field("name", &self.name)
            .field("backends", &self.slots.len())
            .finish()
    }
}

impl<S> Balance<S> {
    /// A builder for a group named `balance`.
    pub fn builder() -> BalanceBuilder<S> {
        BalanceBuilder {
            name: "balance".into(),
            error: None,
            slots: Vec::new(),
            strategy: Strategy::default(),
            rng: None,
            standing: Some(StandingLine::default()),
        }
    }

    /// A group over `backends`, each wrapped by `make` into its per-backend service.
    pub fn from_backends(
        backends: impl IntoIterator<Item = Backend>,
        mut make: impl FnMut(&Backend) -> S,
    ) -> BalanceBuilder<S> {
        let mut b = Self::builder();
        for backend in backends {
            let svc = make(&backend);
            b = b.backend(backend, svc);
        }
        b
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The backends, in the order they were added.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.shared.slots.iter().map(|s| &s.backend)
    }

    /// `None` when some backend `skip` does not rule out can take a request at `now`;
    /// otherwise the earliest instant one can (`Some(None)` if none ever will: all weights 0).
    fn unavailable_until_among(
        &self,
        now: Instant,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<Option<Instant>> {
        let mut earliest: Option<Instant> = None;
        for (_, slot) in self
            .shared
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.backend.weight() > 0.0 && !skip(*i))
        {
            let state = slot.backend.state();
            let until = match state.unavailable_until(now) {
                None if strategy::on_probation(state) => now + self.shared.probe_poll,
                None => return None,
                Some(u) => u,
            };
            earliest = Some(earliest.map_or(until, |e| e.min(until)));
        }
        Some(earliest)
    }

    /// Chooses a backend for the next request, or says when one will be available.
    pub fn pick(&self, now: Instant) -> Result<&Backend, error::Unavailable> {
        self.pick_index(now, &[], false)
            .map(|i| &self.shared.slots[i].backend)
            .map_err(|earliest| error::Unavailable::new(self.shared.name.clone(), earliest))
    }

    fn pick_index(
        &self,
        now: Instant,
        tried: &[Arc<str>],
        strict: bool,
    ) -> Result<usize, Option<Instant>> {
        self.pick_among(now, tried, strict, None)
    }

    /// [`Balance::pick_index`] among the backends `allowed` lets through (all: `None`).
    fn pick_among(
        &self,
        now: Instant,
        tried: &[Arc<str>],
        strict: bool,
        allowed: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<usize, Option<Instant>> {
        let sh = &*self.shared;
        let all = &sh.candidates;
        let barred = |i: usize| allowed.is_some_and(|a| !a(i));
        let avoided =
            |i: usize| barred(i) || tried.iter().any(|n| **n == *sh.slots[i].backend.name());
        let only_barred: &dyn Fn(usize) -> bool = if allowed.is_some() {
            &barred
        } else {
            &|_| false
        };
        let passes: &[&dyn Fn(usize) -> bool] = match (!tried.is_empty(), strict) {
            (true, true) => &[&avoided],
            (true, false) => &[&avoided, only_barred],
            (false, _) => &[only_barred],
        };
        for skip in passes {
            for (t, tier) in sh.tiers.iter().enumerate() {
                for want in [Avail::Yes, Avail::LowHeadroom] {
                    let cursor = &sh.cursors[t];
                    if let Some(i) =
                        strategy::pick(sh.strategy, all, tier, want, now, &sh.rng, cursor, skip)
                    {
                        return Ok(i);
                    }
                }
            }
        }
        if strict {
            // Only the backends not tried yet count: when is the first of them free?
            return Err(self.unavailable_until_among(now, &avoided).flatten());
        }
        Err(self.unavailable_until_among(now, only_barred).flatten())
    }
}

/// The `model` a request's body names, when the body is a [`ReplayBody`](crate::body::ReplayBody)
/// (what every stack of this crate carries) holding JSON.
fn request_model<B: 'static>(req: &http::Request<B>) -> Option<&str> {
    let body: &dyn std::any::Any = req.body();
    let body = body.downcast_ref::<crate::body::ReplayBody>()?;
    crate::provider::model_of(body.bytes())
}

impl<S> BalanceBuilder<S> {
    /// Names the group (in errors and logs).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a backend and its per-backend service.
    pub fn backend(mut self, backend: Backend, service: S) -> Self {
        self.slots.push(Slot {
            backend,
            service,
            group: false,
            member: false,
        });
        self
    }

    /// Adds a member that is not one backend but a group (another `Balance`, a `Fallback`),
    /// with its weight and priority tier and the `backends` it sends to (their states). It is
    /// picked only while one of them can take a request, and when none can, this group says
    /// when the first of them will. A request sent to it does not wait inside it for room (a
    /// `RetryAfter429` in it gets a zero wait budget): the `RetryAfter429` above this group
    /// waits, or goes to another member, instead.
    ///
    /// With no `backends` (a member whose backends this group does not know) it is always
    /// eligible, and a member with nothing free answers at once with
    /// [`Unavailable`](error::Unavailable) so a `RetryAfter429` above moves on.
    ///
    /// Members of one group share a service type; box mixed ones into
    /// [`BoxTarget`](crate::fallback::BoxTarget).
    pub fn member(
        self,
        name: &str,
        weight: f64,
        priority: u32,
        service: S,
        backends: &[Backend],
    ) -> Self {
        let state = (!backends.is_empty()).then(|| {
            let states: Arc<[crate::BackendState]> =
                backends.iter().map(|b| b.state().clone()).collect();
            crate::BackendState::of_members(states)
        });
        self.push_member(name, weight, priority, service, state)
    }

    /// Adds a group member under a stand-in backend: with `state`, one that reads its
    /// backends' states; without, one that is always eligible.
    fn push_member(
        mut self,
        name: &str,
        weight: f64,
        priority: u32,
        service: S,
        state: Option<crate::BackendState>,
    ) -> Self {
        let group = state.is_some();
        let mut builder = Backend::builder(
            name,
            "http://group.invalid",
            crate::provider::Provider::OpenAi,
        )
        .priority(priority);
        // A member's weight other than 1 is its share as written (set); 1, the default, leaves
        // the pick latency-aware.
        if weight != 1.0 {
            builder = builder.weight(weight);
        }
        if let Some(state) = state {
            builder = builder.state(state);
        }
        match builder.build() {
            Ok(backend) => self.slots.push(Slot {
                backend,
                service,
                group,
                member: true,
            }),
            Err(e) => self.error = Some(e.to_string()),
        }
        self
    }

    /// Sets the pick strategy within a tier (default weighted random).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the random source (seed it for repeatable picks).
    pub fn rng(mut self, rng: Rng) -> Self {
        self.rng = Some(rng);
        self
    }

    /// When the group's line of waiting requests stands and refuses early (see
    /// [`StandingLine`]; default [`StandingLine::default`]); `None`: never, every request may
    /// wait its whole budget.
    pub fn standing_line(mut self, limit: Option<StandingLine>) -> Self {
        self.standing = limit;
        self
    }

    /// Validates and builds: at least one backend, unique names.
    pub fn build(self) -> Result<Balance<S>, error::InvalidConfig> {
        if let Some(e) = self.error {
            return Err(error::InvalidConfig::new(format!(
                "invalid balance group: {}: {e}",
                self.name
            )));
        }
        check(&self.name, self.slots.iter().map(|s| &s.backend))?;
        Ok(self.assemble())
    }

    /// Builds a group that [`check`] accepted.
    fn assemble(self) -> Balance<S> {
        let mut priorities: Vec<u32> = self.slots.iter().map(|s| s.backend.priority()).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let by_model = self.slots.iter().any(|s| s.backend.models().is_some());
        let mut classes: Vec<crate::provider::Provider> = Vec::new();
        for s in self.slots.iter().filter(|s| !s.member) {
            let p = s.backend.provider();
            if !classes.iter().any(|c| c.route_class() == p.route_class()) {
                classes.push(p.clone());
            }
        }
        let routes = Routes {
            classes: classes.into_boxed_slice(),
            members: self.slots.iter().any(|s| s.member),
        };
        let candidates: Box<[Candidate]> = self
            .slots
            .iter()
            .map(|s| Candidate {
                weight: s.backend.weight(),
                weight_set: s.backend.weight_set(),
                state: s.backend.state().clone(),
            })
            .collect();
        let tiers: Box<[Tier]> = priorities
            .iter()
            .map(|p| {
                let members = (0..self.slots.len())
                    .filter(|i| self.slots[*i].backend.priority() == *p)
                    .collect();
                Tier::new(members, &candidates)
            })
            .collect();
        let cursors = tiers.iter().map(|_| AtomicUsize::new(0)).collect();
        let waitlist = (!routes.members).then(|| {
            Arc::new(Waitlist::new(
                self.slots.iter().map(|s| s.backend.clone()).collect(),
                self.standing,
            ))
        });
        Balance {
            shared: Arc::new(Shared {
                name: self.name.into(),
                slots: self.slots.into_boxed_slice(),
                candidates,
                tiers,
                strategy: self.strategy,
                rng: self.rng.unwrap_or_default(),
                cursors,
                probe_poll: std::time::Duration::from_millis(25),
                by_model,
                routes,
                waitlist,
            }),
        }
    }
}

/// A group can be built: at least one backend, unique names.
fn check<'a>(
    group: &str,
    backends: impl Iterator<Item = &'a Backend>,
) -> Result<(), error::InvalidConfig> {
    let mut seen: Vec<&str> = Vec::new();
    for b in backends {
        if seen.contains(&b.name()) {
            return Err(error::InvalidConfig::new(format!(
                "invalid balance group: {group}: backend name {:?} used twice",
                b.name()
            )));
        }
        seen.push(b.name());
    }
    if seen.is_empty() {
        return Err(error::InvalidConfig::new(format!(
            "invalid balance group: {group}: no backends"
        )));
    }
    Ok(())
}

/// `Balance` as a [`Layer`](tower_layer::Layer): picks one of `backends` for each request,
/// marks the request with it and calls the one inner service, so the per-backend
/// layers below act for the chosen backend over one client (one connection pool):
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_llm_lb::{Backend, auth::{AuthInjectLayer, Credential}, balance::BalanceLayer,
///                    body::ReplayBody, client::http_client, endpoint::{EndpointLayer, Served},
///                    retry::RetryAfter429Layer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
/// # let east_mock = tower_llm_lb_mock::MockServer::builder().api_key("k-east").start().await?;
/// # let west_mock = tower_llm_lb_mock::MockServer::builder().api_key("k-west").start().await?;
/// let backend = |name: &str, url: String, key: &str| -> Result<Backend, tower_llm_lb::BoxError> {
///     let b = Backend::azure(name, url, "gpt-4o", "2024-10-21");
///     Ok(b.credential(Credential::api_key(key)?).build()?)
/// };
/// let backends = [
///     backend("east", east_mock.url(), "k-east")?,
///     backend("west", west_mock.url(), "k-west")?,
/// ];
/// let svc = ServiceBuilder::new()
///     .layer(RetryAfter429Layer::default())
///     .layer(BalanceLayer::try_new(backends)?)
///     .layer(EndpointLayer::for_chosen())
///     .layer(AuthInjectLayer::for_chosen())
///     .service(http_client::<ReplayBody>());
/// let req = http::Request::post("/v1/chat/completions")
///     .body(ReplayBody::from(r#"{"messages":[{"role":"user","content":"hi"}]}"#))?;
/// let res = svc.oneshot(req).await?;
/// assert_eq!(res.status(), 200);
/// let served = res.extensions().get::<Served>().unwrap();
/// assert!(["east", "west"].contains(&served.backend.name()));
/// # Ok(()) }
/// ```
///
/// [`BreakerGroup::layer_for_chosen`](crate::circuit_breaker::BreakerGroup::layer_for_chosen)
/// is the breaker of this shape. The closure form ([`Balance::from_backends`]) stays for a
/// different inner service per backend.
#[derive(Clone, Debug)]
pub struct BalanceLayer {
    name: String,
    backends: Arc<[Backend]>,
    strategy: Strategy,
    rng: Option<Rng>,
}

impl BalanceLayer {
    /// A group over `backends`: at least one, with unique names.
    pub fn try_new(
        backends: impl IntoIterator<Item = Backend>,
    ) -> Result<Self, error::InvalidConfig> {
        let backends: Arc<[Backend]> = backends.into_iter().collect();
        check("balance", backends.iter())?;
        Ok(BalanceLayer {
            name: "balance".into(),
            backends,
            strategy: Strategy::default(),
            rng: None,
        })
    }

    /// Names the group (in errors and logs).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the pick strategy within a tier.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the random source (seed it for repeatable picks).
    pub fn rng(mut self, rng: Rng) -> Self {
        self.rng = Some(rng);
        self
    }
}

impl<S> tower_layer::Layer<S> for BalanceLayer {
    type Service = Pick<S>;

    fn layer(&self, inner: S) -> Pick<S> {
        let mut builder = Balance::from_backends(self.backends.iter().cloned(), |_| ())
            .name(self.name.clone())
            .strategy(self.strategy);
        if let Some(rng) = &self.rng {
            builder = builder.rng(rng.clone());
        }
        Pick {
            // `try_new` checked the backends.
            picker: builder.assemble(),
            inner,
        }
    }
}

/// The service a [`BalanceLayer`] makes: picks a backend for each request as [`Balance`] does,
/// marks the request with it and calls the one inner service. Ready when the inner
/// service is (a client at its limit makes the whole stack not ready), and the service driven
/// ready is the one called (no clone per request).
pub struct Pick<S> {
    picker: Balance<()>,
    inner: S,
}

impl<S: Clone> Clone for Pick<S> {
    fn clone(&self) -> Self {
        Pick {
            picker: self.picker.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Pick<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("group", &self.picker)
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, B: 'static> Service<http::Request<B>> for Pick<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, http::Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let now = Instant::now();
        let (i, cost) = match self.picker.reserved_slot(&req, now) {
            Some(i) => {
                let backend = &self.picker.shared.slots[i].backend;
                crate::attempt::Picked::note(&req, backend);
                (i, token_cost_on(backend, &req))
            }
            None => match self.picker.pick_for(&req, now) {
                Ok(i) => (i, self.picker.admit(i, &mut req, now)),
                Err(error) => {
                    return ResponseFuture {
                        state: State::Unavailable { error: Some(error) },
                    };
                }
            },
        };
        req.extensions_mut().insert(Chosen(
            self.picker.shared.slots[i].backend.clone(),
            now,
            cost,
        ));
        // The inner service was driven ready by this one's `poll_ready`; its future owns
        // nothing of it, so no clone is needed.
        ResponseFuture {
            state: State::Send {
                fut: ReadyCall::from_asked(crate::ready::Asked::Called(self.inner.call(req))),
            },
        }
    }
}

impl<S, B: 'static> Service<http::Request<B>> for Balance<S>
where
    S: Service<http::Request<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, http::Request<B>>;

    /// Always ready: readiness is driven on the chosen backend's service inside the call.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let now = Instant::now();
        if let Some(i) = self.reserved_slot(&req, now) {
            let slot = &self.shared.slots[i];
            crate::attempt::Picked::note(&req, &slot.backend);
            return ResponseFuture {
                state: State::Send {
                    fut: ReadyCall::new(slot.service.clone(), req),
                },
            };
        }
        let i = match self.pick_for(&req, now) {
            Ok(i) => i,
            Err(error) => {
                return ResponseFuture {
                    state: State::Unavailable { error: Some(error) },
                };
            }
        };
        let mut svc = self.shared.slots[i].service.clone();
        let (i, asked) = match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => (i, Ok(svc)),
            Poll::Ready(Err(e)) => (i, Err(e.into())),
            // Busy (a concurrency limit, a full pool): a ready backend instead, if there is
            // one; else wait for this one.
            Poll::Pending => self.ready_instead(now, i, &req).unwrap_or((i, Ok(svc))),
        };
        let cost = self.admit(i, &mut req, now);
        if cost != 0 {
            // The backend's `Endpoint` counts it in flight at this cost (not estimated again).
            req.extensions_mut().insert(TokenCost(cost));
        }
        let fut = match asked {
            // Asked with a no-op waker: `Oneshot` asks again with the task's own.
            Ok(svc) => ReadyCall::new(svc, req),
            Err(e) => ReadyCall::from_asked(crate::ready::Asked::Failed(e)),
        };
        ResponseFuture {
            state: State::Send { fut },
        }
    }
}

impl<S> Balance<S> {
    /// The slot a request coming back for the slot it booked goes to, straight away (its
    /// admission was counted when the slot was booked), unless that backend's circuit opened
    /// or it asked for a wait meanwhile.
    #[inline]
    fn reserved_slot<B>(&self, req: &http::Request<B>, now: Instant) -> Option<usize> {
        let name = req
            .extensions()
            .get::<crate::attempt::Steer>()?
            .reserved
            .as_ref()?;
        let i = self
            .shared
            .slots
            .iter()
            .position(|s| *s.backend.name() == **name)?;
        let state = self.shared.slots[i].backend.state();
        (state.circuit() == crate::state::Circuit::Closed
            && state.throttled_until().is_none_or(|t| t <= now))
        .then_some(i)
    }

    /// The backend for this request, or why none: when something is free again (booking a
    /// paced slot for a request that may wait).
    #[inline]
    fn pick_for<B: 'static>(
        &self,
        req: &http::Request<B>,
        now: Instant,
    ) -> Result<usize, BoxError> {
        let steer = req.extensions().get::<crate::attempt::Steer>();
        let (tried, strict) = steer.map_or((&[][..], false), |s| (&s.tried[..], s.elsewhere));
        let refuse = |earliest, queue: bool| -> BoxError {
            let budget = steer.and_then(|s| s.wait_budget);
            let cost = token_cost(req);
            let line = steer
                .filter(|s| !s.given)
                .and_then(|s| s.line.as_ref())
                .filter(|_| queue)
                .map(|l| (l, req.extensions().get::<Tenant>()));
            self.refuse(now, earliest, budget, cost, queue, line).into()
        };
        // Which backends may take it: those serving its model, among those a fallback variant
        // named. Only looked at when a backend declared models or a variant named backends.
        let model = if self.shared.by_model {
            request_model(req)
        } else {
            None
        };
        let only = req.extensions().get::<crate::attempt::Only>();
        let pinned = req.extensions().get::<Pinned>();
        // Which backends can serve its route: one check per route class in the group; the
        // candidates are filtered only when some class cannot serve it.
        let path = req.uri().path();
        let routes = &self.shared.routes;
        let serving = routes
            .classes
            .iter()
            .filter(|p| p.serves_route(path))
            .count();
        if serving == 0 && !routes.members && !routes.classes.is_empty() {
            return Err(self.not_served_route(path));
        }
        let mixed = serving < routes.classes.len();
        if model.is_none() && only.is_none() && pinned.is_none() && !mixed {
            return self
                .pick_index(now, tried, strict)
                .map_err(|at| refuse(at, !strict));
        }
        let slots = &self.shared.slots;
        let routed = |i: usize| {
            let s = &slots[i];
            !mixed || s.member || s.backend.provider().serves_route(path)
        };
        let allowed = |i: usize| {
            let b = &slots[i].backend;
            routed(i)
                && model.is_none_or(|m| b.serves(m))
                && only.is_none_or(|o| o.names(b.name()))
                // A member that is a group passes the pin on to its own backends.
                && pinned.is_none_or(|p| slots[i].member || *p.0 == *b.name())
        };
        if !(0..slots.len()).any(allowed) {
            if !(0..slots.len()).any(routed) {
                return Err(self.not_served_route(path));
            }
            return Err(error::NotServed {
                group: self.shared.name.clone(),
                model: model.map(Into::into),
                route: None,
                served_by: "",
                pinned: pinned.map(|p| p.0.clone()),
            }
            .into());
        }
        self.pick_among(now, tried, strict, Some(&allowed))
            .map_err(|at| refuse(at, false))
    }

    /// No backend of the group can serve the request's route.
    #[cold]
    fn not_served_route(&self, path: &str) -> BoxError {
        error::NotServed {
            group: self.shared.name.clone(),
            model: None,
            route: Some(path.into()),
            served_by: crate::provider::Provider::kinds_serving(path),
            pinned: None,
        }
        .into()
    }

    /// Counts the request against the picked backend's quota and pace, and notes the pick;
    /// returns the request's estimated token cost.
    #[inline]
    fn admit<B: 'static>(&self, i: usize, req: &mut http::Request<B>, now: Instant) -> u32 {
        let slot = &self.shared.slots[i];
        let cost = token_cost_on(&slot.backend, req);
        slot.backend.state().admit_cost(now, cost);
        crate::attempt::Picked::note(req, &slot.backend);
        if slot.group {
            // Another member may have room: a group member answers at once.
            req.extensions_mut()
                .insert(crate::attempt::MaxWait(Duration::ZERO));
        }
        tracing::trace!(
            group = &*self.shared.name,
            backend = slot.backend.name(),
            "picked"
        );
        cost
    }
}

impl<S: Clone> Balance<S> {
    /// Another available backend whose service is ready now, when the one picked (`busy`) is
    /// not: the pick again with `busy` (and what the request already avoids) left out.
    #[cold]
    fn ready_instead<Req>(
        &self,
        now: Instant,
        busy: usize,
        req: &http::Request<Req>,
    ) -> Option<(usize, Result<S, BoxError>)>
    where
        S: Service<http::Request<Req>>,
        S::Error: Into<BoxError>,
    {
        let mut tried = req
            .extensions()
            .get::<crate::attempt::Steer>()
            .map(|s| s.tried.clone())
            .unwrap_or_default();
        tried.push(self.shared.slots[busy].backend.name_arc().clone());
        let j = self.pick_index(now, &tried, true).ok()?;
        let mut svc = self.shared.slots[j].service.clone();
        match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Some((j, Ok(svc))),
            _ => None,
        }
    }
}

impl<S> Balance<S> {
    /// Nothing is free: say when something will be. If the request may wait that long and the
    /// backend freeing first is paced, book its next slot for this request, so the requests
    /// waiting on a group line up one pace apart instead of all waking at once.
    fn refuse(
        &self,
        now: Instant,
        earliest: Option<Instant>,
        budget: Option<Duration>,
        cost: u32,
        queue: bool,
        line: Option<(&crate::waitlist::Slot, Option<&Tenant>)>,
    ) -> error::Unavailable {
        let name = self.shared.name.clone();
        let slot = self
            .shared
            .slots
            .iter()
            .filter(|s| crate::waitlist::paced_open(&s.backend))
            .filter_map(|s| s.backend.state().unavailable_until(now).map(|u| (u, s)))
            .min_by_key(|(u, _)| *u);
        let waitlist = self.shared.waitlist.as_ref();
        let (Some(at), Some(budget)) = (earliest, budget) else {
            let refused =
                error::Unavailable::new(name, earliest).with_backends(self.why_out(now, &[]));
            // Paced backends are busy: a request that may wait comes back with its budget at
            // once and joins the line (rather than wake when the slot is due and race the
            // line for it).
            let lined = queue && waitlist.is_some() && slot.is_some();
            return if lined { refused.lined() } else { refused };
        };
        if let (Some(w), Some((place, tenant))) = (waitlist, line)
            && slot.is_some()
        {
            // Wait in line for the group's next paced slot, if the line reaches it in time.
            // If not, and the line is the earliest way in, refused now, saying when the line
            // would have reached it; else (a backend that is not paced may free up sooner)
            // refused as without a line.
            let wait = w.estimate(now, tenant);
            // A standing line takes no one who would wait past its target (see
            // `StandingLine`): refused now, saying when the line would have served it.
            let target = w.standing_target(now);
            let stands = target.is_some();
            let limit = target.map_or(budget, |t| budget.min(t));
            if let Some(wait) = wait.filter(|wait| *wait <= limit) {
                let _ = place.set(w.join(tenant, cost));
                return error::Unavailable::new(name, Some(now + wait));
            }
            if stands && let Some(wait) = wait.filter(|wait| *wait <= budget) {
                return error::Unavailable::new(name, Some(now + wait))
                    .with_backends(self.why_out(now, &[]))
                    .shed();
            }
            // Other tenants wait, and the line is the earliest way in (nothing else frees
            // before its next slot): refused now, saying when the line would have served it,
            // rather than coming back at every slot to take one owed to them. (With one
            // tenant, it comes back when something frees, as without a line.)
            let line_first = w.tenants() > 1 && slot.is_some_and(|(first, _)| first <= at);
            let until = match wait {
                Some(wait) if line_first => now + wait,
                _ => at,
            };
            return error::Unavailable::new(name, Some(until))
                .with_backends(self.why_out(now, &[]));
        }
        match slot {
            Some((until, s)) if until.saturating_duration_since(now) <= budget => {
                s.backend.state().admit_cost(until, cost);
                error::Unavailable::new(name, Some(until))
                    .with_reservation(s.backend.name_arc().clone())
            }
            _ => error::Unavailable::new(name, Some(at)).with_backends(self.why_out(now, &[])),
        }
    }

    /// Why each backend could not take a request now (for the caller's error: the cold path).
    fn why_out(&self, now: Instant, tried: &[Arc<str>]) -> Vec<error::Out> {
        self.shared
            .slots
            .iter()
            .map(|slot| {
                let b = &slot.backend;
                let state = b.state();
                let (reason, until) = if b.weight() <= 0.0 {
                    ("weight 0", None)
                } else if let crate::state::Circuit::Open { until } = state.circuit() {
                    ("circuit open", Some(until))
                } else if let Some(until) = state.cooldown_until().filter(|u| *u > now) {
                    ("cooling down", Some(until))
                } else if tried.iter().any(|t| **t == *b.name()) {
                    ("already tried", None)
                } else if strategy::on_probation(state) {
                    ("silent", None)
                } else {
                    match state.unavailable_until(now) {
                        Some(until) => ("paced", Some(until)),
                        None => ("busy", None),
                    }
                };
                error::Out {
                    backend: b.name_arc().clone(),
                    reason,
                    until,
                }
            })
            .collect()
    }
}

pin_project! {
    /// Response future of [`Balance`].
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Send { #[pin] fut: ReadyCall<S, Req> },
        Unavailable { error: Option<BoxError> },
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Send { fut } => fut.poll(cx),
            StateProj::Unavailable { error } => Poll::Ready(Err(error
                .take()
                .map_or_else(|| "polled after completion".into(), Into::into))),
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("balance::ResponseFuture")
    }
}
