//! The attempt context: what the layers tell each other about one request and its attempts, as
//! request and response extensions. It is core vocabulary: every layer imports it, none imports
//! another layer to learn these things.
//!
//! Public, because a caller gives or reads them:
//! - [`Deadline`] (request): the request's overall deadline;
//! - [`TokenCost`] (request): what the request costs of a token quota;
//! - [`Served`] (response): which backend answered, what the answer means, its hints and time;
//! - [`Attempts`] (response): every attempt the request took.
//!
//! Crate-private, so a caller's request cannot forge them and their shape can change without
//! breaking anyone: [`Chosen`] (the backend a `BalanceLayer` picked), [`Steer`] (a retry's
//! wishes: not these backends, this booked slot, this much wait), [`MaxWait`], [`Picked`],
//! [`Only`] (a fallback variant's backends), [`Deployment`], [`AsWritten`] and [`InjectedFor`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::classify::retry_after::{DEFAULT_MAX_HINT, Hints};
use crate::classify::{Classify, Standard};
use crate::error::Attempt;
use crate::outcome::Outcome;

/// What a retry layer says about one retry to the layers below it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Steer {
    /// The backends this request already tried: a `Balance` picks another available backend
    /// if there is one (and one of these only if there is not).
    pub(crate) tried: Vec<Arc<str>>,
    /// Only a backend not tried yet may be picked (after a failure): when every backend was
    /// tried the attempt is refused at once, so the retry layer backs off first. An
    /// `Endpoint` for a tried backend refuses it too (no `Balance` in between).
    pub(crate) elsewhere: bool,
    /// The backend a `Balance` booked a paced slot on for this attempt: it goes there.
    pub(crate) reserved: Option<Arc<str>>,
    /// How long the request may still wait: with it, a `Balance` with nothing free books the
    /// next paced slot for the request, or puts it in line for one.
    pub(crate) wait_budget: Option<Duration>,
    /// Where a `Balance` that put the request in line for its next slot leaves the ticket
    /// (see [`crate::waitlist`]).
    pub(crate) line: Option<crate::waitlist::Slot>,
    /// The request's turn in a group's line came (on any backend, as the balancer picks).
    pub(crate) given: bool,
}

impl Steer {
    /// Whether `backend` must not take this attempt (a strict retry that already tried it).
    pub(crate) fn refuses(&self, backend: &str) -> bool {
        self.elsewhere && self.tried.iter().any(|t| &**t == backend)
    }
}

/// A cap on this request's wait budget below the retry layer's own: `Fallback` sets zero on
/// every target but the last (a target with nothing free fails over at once), `Balance` on a
/// member that is itself a group (another member may have room).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MaxWait(pub(crate) Duration);

/// `Balance` writes the name of the backend it sent the request to (a hedging retry layer
/// sends its second attempt elsewhere).
#[derive(Clone, Debug, Default)]
pub(crate) struct Picked(pub(crate) Arc<std::sync::OnceLock<Arc<str>>>);

impl Picked {
    pub(crate) fn note(req: &http::Request<impl Sized>, backend: &Backend) {
        if let Some(p) = req.extensions().get::<Picked>() {
            let _ = p.0.set(backend.name_arc().clone());
        }
    }
}

/// The backends a `Fallback` variant may use ([`FallbackLayer`](crate::fallback::FallbackLayer)
/// with [`Variant::backends`](crate::fallback::Variant::backends)): a `Balance` picks only among
/// these.
#[derive(Clone, Debug)]
pub(crate) struct Only(pub(crate) Arc<[Arc<str>]>);

impl Only {
    pub(crate) fn names(&self, backend: &str) -> bool {
        self.0.iter().any(|n| &**n == backend)
    }
}

/// The one backend a request may go to, as a request extension: a follow-up that names state
/// only that backend has (a stored response, an uploaded file, a batch). A `Balance` picks it
/// or, when it is not among the group's backends, none ([`NotServed`](crate::error::NotServed),
/// so a `Fallback` above moves on to the target that has it); while it cannot take the request
/// (cooling down, circuit open), the request waits for it or is refused saying so, and is never
/// sent to another backend. The gateway sets it from the ids it hands out (see its docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned(pub Arc<str>);

/// The backend a `Balance` built by a `BalanceLayer` chose for this
/// attempt. The layers below it that act for one backend read it when they were built for the
/// chosen backend ([`EndpointLayer::for_chosen`](crate::endpoint::EndpointLayer::for_chosen),
/// [`AuthInjectLayer::for_chosen`](crate::auth::AuthInjectLayer::for_chosen)), so one client and
/// one set of layers serve every backend.
#[derive(Clone, Debug)]
pub(crate) struct Chosen(pub(crate) Backend, pub(crate) Instant, pub(crate) u32);

impl Chosen {
    /// The chosen backend.
    pub(crate) fn backend(&self) -> &Backend {
        &self.0
    }
}

/// A request extension: what the request is estimated to cost of a backend's token quota
/// (prompt and `max_tokens`, see [`provider::estimate_tokens`](crate::provider::estimate_tokens)).
/// With it, `Balance` paces a backend whose answers tell its token quota by tokens as well as
/// by requests. Without it, `Balance` estimates the cost of a
/// [`ReplayBody`](crate::body::ReplayBody) request itself; set it where you know better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TokenCost(pub u32);

/// A request's overall deadline, as a request extension. `RetryAfter429` never waits past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// The attempts a request took, as a response extension (in order, the last one answered).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attempts(pub Vec<Attempt>);

/// What the [`Endpoint`](crate::endpoint::Endpoint) of the backend that answered found; inserted into every response's
/// extensions.
#[derive(Clone, Debug)]
pub struct Served {
    /// The backend that answered.
    pub backend: Backend,
    /// What the answer means.
    pub outcome: Outcome,
    /// The wait and quota hints the answer carried.
    pub hints: Hints,
    /// Time from sending to the response head.
    pub elapsed: Duration,
}

/// What an answer means, and which backend gave it: the [`Served`] stamp of the `Endpoint`
/// that classified it, or, for an answer that passed through none, the stock [`Standard`](crate::classify::Standard)
/// classification of its status and headers (backend `-`). One place for the layers above to ask.
pub(crate) fn outcome_of<B>(res: &http::Response<B>) -> (Arc<str>, Outcome) {
    let (backend, outcome, _) = answered_by(res);
    (backend, outcome)
}

/// [`outcome_of`], with the attempt's time when an `Endpoint` measured it.
pub(crate) fn answered_by<B>(res: &http::Response<B>) -> (Arc<str>, Outcome, Option<Duration>) {
    match res.extensions().get::<Served>() {
        Some(s) => (s.backend.name_arc().clone(), s.outcome, Some(s.elapsed)),
        None => {
            let hints =
                Hints::from_headers_at(res.headers(), std::time::SystemTime::now, DEFAULT_MAX_HINT);
            (
                "-".into(),
                Standard.classify_response(res.status(), res.headers(), &hints),
                None,
            )
        }
    }
}

/// A request extension replacing a classic Azure backend's deployment for this request (a
/// `Fallback` target's per-target deployment). Other providers ignore it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Deployment(pub(crate) Arc<str>);

impl Deployment {
    /// `name` must be a plain path segment (letters, digits, `-`, `_`, `.`).
    pub(crate) fn new(name: &str) -> Result<Self, crate::error::InvalidConfig> {
        if crate::provider::valid_deployment(name) {
            Ok(Deployment(name.into()))
        } else {
            // Reuse the provider's message, which names the field.
            Err(crate::provider::Provider::azure(name, "x").unwrap_err())
        }
    }
}

/// A crate-private request extension: send the request's path to the backend's host as it is
/// written, without mapping it onto the provider's API paths (health probes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AsWritten;

/// A crate-private request extension: an `AuthInject` above the routing layer injected the
/// credential of the backend at this authority; an `Endpoint` sending elsewhere refuses.
#[derive(Clone, Debug)]
pub(crate) struct InjectedFor {
    pub(crate) backend: Arc<str>,
    pub(crate) authority: http::uri::Authority,
}
