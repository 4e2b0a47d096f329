//! Errors of [`Endpoint`](super::Endpoint).

use std::fmt;
use std::sync::Arc;

/// The request's path could not be mapped onto the backend's URL. Nothing was sent.
#[derive(Clone, Debug)]
pub struct InvalidTarget {
    backend: Arc<str>,
}

impl InvalidTarget {
    pub(crate) fn new(backend: Arc<str>) -> Self {
        InvalidTarget { backend }
    }

    /// The backend's name.
    pub fn backend(&self) -> &str {
        &self.backend
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

pub use crate::error::{CredentialMisplaced, NoBackendChosen};
