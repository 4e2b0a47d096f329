//! Errors of [`AuthInject`](super::AuthInject).

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

pub use crate::error::{CredentialMisplaced, NoBackendChosen};

/// No valid token could be had: the source failed and no cached token is still valid.
///
/// Names the source and its reason; never contains a secret.
#[derive(Clone, Debug)]
pub struct TokenUnavailable {
    source_name: Arc<str>,
    reason: String,
    at: Instant,
}

impl TokenUnavailable {
    pub(crate) fn new(source_name: &str, reason: &str, at: Instant) -> Self {
        TokenUnavailable {
            source_name: source_name.into(),
            reason: reason.into(),
            at,
        }
    }

    /// The token source's name.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// When the failing fetch was made.
    pub fn failed_at(&self) -> Instant {
        self.at
    }
}

impl fmt::Display for TokenUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no token from {}: {}", self.source_name, self.reason)
    }
}

impl std::error::Error for TokenUnavailable {}
