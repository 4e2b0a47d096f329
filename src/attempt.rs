//! What the layers tell each other about one attempt, as request extensions. Crate-private: a
//! caller's request cannot forge them, and their shape can change without breaking anyone.

use std::sync::Arc;
use std::time::Duration;

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
    /// next paced slot for the request.
    pub(crate) wait_budget: Option<Duration>,
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
    pub(crate) fn note(req: &http::Request<impl Sized>, backend: &crate::Backend) {
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
