//! Errors shared by the layers.
//!
//! Between layers errors travel as [`BoxError`]; each failure this crate makes is a small struct
//! that can be downcast. Every one can say which backend(s) it concerns and what happened, and
//! none carries a secret: credentials are never formatted into errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::outcome::Outcome;

/// The type-erased error passed between layers, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Finds the first error of type `E` in `error`'s source chain (itself included).
///
/// Layers wrap errors (an [`Endpoint`](crate::endpoint::Endpoint) wraps its inner service's
/// failure in a [`BackendError`]), so look through the chain rather than downcasting the top.
pub fn find<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// One backend failed an attempt without answering: connect error, broken connection, timeout.
///
/// Made by [`Endpoint`](crate::endpoint::Endpoint), which knows the backend and has classified the
/// failure; the original error is the [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct BackendError {
    /// The backend's name.
    pub backend: Arc<str>,
    /// What the failure means.
    pub outcome: Outcome,
    source: BoxError,
}

impl BackendError {
    /// Wraps `source`, the failure of an attempt on `backend`.
    pub(crate) fn new(backend: Arc<str>, outcome: Outcome, source: BoxError) -> Self {
        BackendError {
            backend,
            outcome,
            source,
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {}: {}: {}",
            self.backend, self.outcome, self.source
        )
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A layer refused to send because nothing was available (every backend cooling down, circuit
/// open). Carries the earliest instant something may be available again and, from a `Balance`,
/// why each of its backends could not take the request.
#[derive(Clone, Debug)]
pub struct Unavailable {
    what: Arc<str>,
    /// The earliest instant something may be available again, if known.
    pub earliest: Option<Instant>,
    reserved: Option<Arc<str>>,
    /// Why each backend could not take the request (empty where the refusing layer did not
    /// say).
    pub backends: Arc<[Out]>,
    /// Refused because requests wait in line: one that may wait joins it at once.
    lined: bool,
    /// Refused at once because the line stands (see `waitlist`): no waiting for it.
    shed: bool,
}

/// Why one backend could not take a request that found nothing available.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    /// The backend's name.
    pub backend: Arc<str>,
    /// Why: `circuit open`, `cooling down` (a 429's hint, a rejected key), `silent` (on
    /// probation after answering nothing), `paced` (its next slot is later), `busy` (as many in
    /// flight as it may have), `already tried`, `weight 0`.
    pub reason: &'static str,
    /// Until when, where known.
    pub until: Option<Instant>,
}

impl Unavailable {
    /// `what` says what was unavailable (a backend's or a group's name).
    pub(crate) fn new(what: impl Into<Arc<str>>, earliest: Option<Instant>) -> Self {
        Unavailable {
            what: what.into(),
            earliest,
            reserved: None,
            backends: Arc::new([]),
            lined: false,
            shed: false,
        }
    }

    /// Says the request is refused for good: the group's line stands, and waiting would only
    /// lengthen it.
    pub(crate) fn shed(mut self) -> Self {
        self.shed = true;
        self
    }

    /// Whether the request is refused for good (see [`Unavailable::shed`]).
    pub(crate) fn is_shed(&self) -> bool {
        self.shed
    }

    /// Says the request was refused because others wait in line for the next slot.
    pub(crate) fn lined(mut self) -> Self {
        self.lined = true;
        self
    }

    /// Whether the request was refused because others wait in line (one that may wait joins
    /// the line at once, rather than waiting for the next slot first).
    pub(crate) fn is_lined(&self) -> bool {
        self.lined
    }

    /// Says why each backend was out.
    pub(crate) fn with_backends(mut self, out: Vec<Out>) -> Self {
        self.backends = out.into();
        self
    }

    /// Says that a slot at `earliest` on `backend` was booked for this request (the retry layer
    /// sends it again then, to that backend).
    pub(crate) fn with_reservation(mut self, backend: Arc<str>) -> Self {
        self.reserved = Some(backend);
        self
    }

    /// The backend a slot was booked on, if any.
    pub(crate) fn reserved(&self) -> Option<&Arc<str>> {
        self.reserved.as_ref()
    }

    /// Says something may be available again at `at` (a fresher estimate).
    pub(crate) fn until(mut self, at: Instant) -> Self {
        self.earliest = Some(at);
        self
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = Instant::now();
        write!(f, "{} unavailable", self.what)?;
        if let Some(at) = self.earliest {
            let wait = at.saturating_duration_since(now);
            write!(f, " for {:.3}s", wait.as_secs_f64())?;
        }
        for (i, out) in self.backends.iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{} {}", out.backend, out.reason)?;
            if let Some(until) = out.until {
                let wait = until.saturating_duration_since(now);
                write!(f, " for {:.1}s", wait.as_secs_f64())?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Unavailable {}

/// One attempt of a request: which backend, what happened, how long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The backend's name.
    pub backend: Arc<str>,
    /// What the attempt's result meant.
    pub outcome: Outcome,
    /// How long the attempt took (excluding any wait before it).
    pub elapsed: Duration,
    /// When the attempt began (tokio's clock): with `elapsed`, where it lies in the request's
    /// time (a trace's span per attempt).
    pub started: Instant,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} after {:.3}s",
            self.backend,
            self.outcome,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Every attempt a layer was allowed to make failed.
///
/// Lists each attempt and the earliest instant a retry could succeed, so a caller (or a
/// `Fallback` above) can decide what to do next.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Exhausted {
    /// The attempts, in order.
    pub attempts: Vec<Attempt>,
    /// The earliest instant a retry could succeed, if known.
    pub earliest: Option<Instant>,
}

impl Exhausted {
    /// Builds the error from the attempts made.
    pub(crate) fn new(attempts: Vec<Attempt>, earliest: Option<Instant>) -> Self {
        Exhausted { attempts, earliest }
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "all {} attempts failed", self.attempts.len())?;
        for (i, a) in self.attempts.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{a}")?;
        }
        if let Some(at) = self.earliest {
            let wait = at.saturating_duration_since(Instant::now());
            write!(f, "; earliest retry in {:.3}s", wait.as_secs_f64())?;
        }
        Ok(())
    }
}

impl std::error::Error for Exhausted {}

/// The request's deadline passed before an answer came: the attempt in flight was abandoned.
/// Lists the attempts that had answered before it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadlineExceeded {
    /// The attempts that answered before the deadline, in order.
    pub attempts: Vec<Attempt>,
}

impl DeadlineExceeded {
    pub(crate) fn new(attempts: Vec<Attempt>) -> Self {
        DeadlineExceeded { attempts }
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request deadline passed")?;
        for (i, a) in self.attempts.iter().enumerate() {
            f.write_str(if i == 0 { " after: " } else { "; " })?;
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DeadlineExceeded {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn exhausted_reads_like_a_sentence() {
        let e = Exhausted::new(
            vec![
                Attempt {
                    backend: "westus".into(),
                    outcome: Outcome::Throttled {
                        retry_after: Some(Duration::from_secs(2)),
                    },
                    elapsed: Duration::from_millis(12),
                    started: Instant::now(),
                },
                Attempt {
                    backend: "eastus".into(),
                    outcome: Outcome::ConnectError,
                    elapsed: Duration::ZERO,
                    started: Instant::now(),
                },
            ],
            Some(Instant::now() + Duration::from_millis(1500)),
        );
        assert_eq!(
            e.to_string(),
            "all 2 attempts failed: westus: throttled (retry after 2.000s) after 0.012s; \
             eastus: connect error after 0.000s; earliest retry in 1.500s"
        );
    }
}

/// A layer built for the chosen backend
/// ([`EndpointLayer::for_chosen`](crate::endpoint::EndpointLayer::for_chosen),
/// [`AuthInjectLayer::for_chosen`](crate::auth::AuthInjectLayer::for_chosen)) got a request no
/// [`BalanceLayer`](crate::balance::BalanceLayer) above it had marked. Nothing was sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoBackendChosen;

impl fmt::Display for NoBackendChosen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "no backend chosen for this request: a layer built for the chosen backend needs a BalanceLayer above it",
        )
    }
}

impl std::error::Error for NoBackendChosen {}

/// A backend's credential was about to reach another backend, so nothing was sent: an
/// [`AuthInjectLayer::for_backend`](crate::auth::AuthInjectLayer::for_backend) sits above the
/// layer that picks the backend (or below an `Endpoint` for another one). Place it below the
/// `Balance`, or use [`AuthInjectLayer::for_chosen`](crate::auth::AuthInjectLayer::for_chosen).
/// Never retried: the stack is built wrongly. Names the backends, never the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CredentialMisplaced {
    /// The backend whose credential it is.
    pub owner: Arc<str>,
    /// Where the request was going (a backend's name or an authority).
    pub target: Arc<str>,
}

impl CredentialMisplaced {
    pub(crate) fn new(owner: Arc<str>, target: impl Into<Arc<str>>) -> Self {
        CredentialMisplaced {
            owner,
            target: target.into(),
        }
    }
}

impl fmt::Display for CredentialMisplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the credential of backend {} would have gone to {}: place AuthInjectLayer::for_backend below the layer that picks the backend, or use AuthInjectLayer::for_chosen",
            self.owner, self.target
        )
    }
}

impl std::error::Error for CredentialMisplaced {}

// The errors below are the layers' own (each layer's `error` module re-exports its own):
// defined here so that classification (`classify`) knows them without importing any layer.

/// The backend's circuit is open: the request was not sent.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Open {
    /// The backend's name.
    pub backend: Arc<str>,
    /// When the breaker will let a probe through, if known.
    pub until: Option<Instant>,
}

impl fmt::Display for Open {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit open for backend {}", self.backend)
    }
}

impl std::error::Error for Open {}

/// No valid token could be had: the source failed and no cached token is still valid.
///
/// Names the source and its reason; never contains a secret.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TokenUnavailable {
    /// The token source's name.
    pub source_name: Arc<str>,
    /// Why the source failed (never a secret).
    pub reason: String,
    /// When the failing fetch was made.
    pub failed_at: Instant,
}

impl TokenUnavailable {
    pub(crate) fn new(source_name: &str, reason: &str, at: Instant) -> Self {
        TokenUnavailable {
            source_name: source_name.into(),
            reason: reason.into(),
            failed_at: at,
        }
    }
}

impl fmt::Display for TokenUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no token from {}: {}", self.source_name, self.reason)
    }
}

impl std::error::Error for TokenUnavailable {}

/// No backend of the group serves the request's route (an Anthropic-only route in a group of
/// OpenAI backends, say), its `model`, or is among those a fallback variant named: nothing
/// was sent, and no wait would change it. A `Fallback` moves on to its next target; the
/// gateway answers 404 (`route_not_served` or `model_not_found`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotServed {
    pub(crate) group: Arc<str>,
    /// The model asked for, if the request named one.
    pub model: Option<String>,
    /// The route (path) no backend of the group can serve, when that is why.
    pub route: Option<String>,
    /// The kinds of backend that would serve `route`.
    pub(crate) served_by: &'static str,
    /// The backend the request was [`Pinned`](crate::balance::Pinned) to, not among the
    /// group's, when that is why.
    pub pinned: Option<Arc<str>>,
}

impl NotServed {
    /// No target of `group` serves `model` (or, with none, the request named no model): for
    /// a router of your own that sends each model to its own stack, so a model it does not
    /// list is refused as the library's groups refuse it (the gateway answers 404
    /// `model_not_found`).
    pub fn for_model(group: &str, model: Option<&str>) -> NotServed {
        NotServed {
            group: Arc::from(group),
            model: model.map(str::to_string),
            route: None,
            served_by: "",
            pinned: None,
        }
    }
}

impl fmt::Display for NotServed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(route) = &self.route {
            return write!(
                f,
                "no backend of {} serves {route} (it is served by {})",
                self.group, self.served_by
            );
        }
        if let Some(p) = &self.pinned {
            return write!(
                f,
                "backend {p}, which holds what the request names, is not among those of {}",
                self.group
            );
        }
        match &self.model {
            Some(m) => write!(f, "no backend of {} serves model {m:?}", self.group),
            None => write!(
                f,
                "no backend of {} is among those this request may use",
                self.group
            ),
        }
    }
}

impl std::error::Error for NotServed {}

/// The request's path could not be mapped onto the backend's URL. Nothing was sent.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct InvalidTarget {
    /// The backend's name.
    pub backend: Arc<str>,
}

impl InvalidTarget {
    pub(crate) fn new(backend: Arc<str>) -> Self {
        InvalidTarget { backend }
    }
}

impl fmt::Display for InvalidTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {}: request path cannot be mapped onto its url",
            self.backend
        )
    }
}

impl std::error::Error for InvalidTarget {}

/// Which limit ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// No first byte in time.
    FirstByte,
    /// No chunk in time after the previous one.
    Idle,
    /// The whole exchange took too long.
    Total,
    /// No answer while the backend answered nothing else either, far longer than its
    /// group's other backends take (see [`AttemptTimeoutLayer`](crate::timeout::AttemptTimeoutLayer)'s
    /// silence watch).
    Silent,
}

/// An attempt's time limit ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed(pub Limit);

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Limit::FirstByte => "no first byte within the attempt's first-byte timeout",
            Limit::Idle => "stream idle longer than the attempt's idle timeout",
            Limit::Total => "attempt exceeded its total timeout",
            Limit::Silent => {
                "backend silent: no answer to this or any other request far longer than its peers take"
            }
        })
    }
}

impl std::error::Error for Elapsed {}

/// The request body is larger than the configured cap. Nothing was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The cap, in bytes.
    pub limit: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body larger than {} bytes", self.limit)
    }
}

impl std::error::Error for TooLarge {}

/// A response body broke off: the connection failed mid-way, or a streamed answer ended
/// without its end marker. The caller has an incomplete answer.
#[derive(Debug)]
pub struct StreamInterrupted {
    /// The backend whose answer broke off, if known.
    pub backend: Option<Arc<str>>,
    pub(crate) source: Option<BoxError>,
}

impl fmt::Display for StreamInterrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b) = &self.backend {
            write!(f, "backend {b}: ")?;
        }
        match &self.source {
            Some(e) => write!(f, "answer interrupted: {e}"),
            None => f.write_str("streamed answer ended without its end marker"),
        }
    }
}

impl std::error::Error for StreamInterrupted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Reading the request body failed. Nothing was sent.
#[derive(Debug)]
pub struct ReadFailed(pub(crate) BoxError);

impl fmt::Display for ReadFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading request body failed: {}", self.0)
    }
}

impl std::error::Error for ReadFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// A setting rejected when it was built: a backend, a balance group, a fallback, a breaker
/// policy or health probe, a credential, a provider's URL shape. The message says which and
/// why, never what a secret was. Nothing was sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig(String);

impl InvalidConfig {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        InvalidConfig(message.into())
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidConfig {}
