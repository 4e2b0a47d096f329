//! What one attempt's result means: the word every layer uses. Made by a
//! [`Classify`](crate::classify::Classify) policy; read from a response's
//! [`Served`](crate::endpoint::Served) stamp or an error's
//! [`BackendError`](crate::error::BackendError).

use std::fmt;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

/// What one attempt's result means for routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The backend answered and the answer is the caller's (any status below 400).
    Success,
    /// The backend is over its quota or overloaded; waiting or another backend helps.
    Throttled {
        /// How long the backend asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// A 429 that waiting will not fix (billing, spend limit): take the backend out for long.
    QuotaExhausted,
    /// The backend failed (5xx).
    ServerError {
        /// The status it answered.
        status: StatusCode,
    },
    /// The request never reached the backend: refused, DNS, TLS.
    ConnectError,
    /// The connection broke after it was made (reset, early close).
    Transport,
    /// No answer in time.
    Timeout,
    /// The request itself is wrong (4xx other than 408/429): never retried, never failed over.
    ClientError {
        /// The status it answered.
        status: StatusCode,
    },
    /// The backend refused the credential we gave it (401/403 from a backend with a configured
    /// credential: a wrong key, a missing role, an expired secret). A broken backend for us, not
    /// the caller's error: failed over, and the backend taken out for long.
    CredentialRejected {
        /// The status it answered.
        status: StatusCode,
    },
    /// A layer of ours refused without sending (every backend cooling down, breaker open).
    Unavailable {
        /// The earliest instant something could be available again, if known.
        retry_at: Option<Instant>,
    },
}

impl Outcome {
    /// True for [`Outcome::Success`].
    pub(crate) fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }

    /// True when the outcome says the backend itself is unhealthy: server errors, connect and
    /// transport errors, timeouts, a rejected credential. Throttling steers load; it is not a
    /// health failure.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Outcome::ServerError { .. }
                | Outcome::ConnectError
                | Outcome::Transport
                | Outcome::Timeout
                | Outcome::CredentialRejected { .. }
        )
    }

    /// True for [`Outcome::Throttled`] and [`Outcome::QuotaExhausted`].
    pub(crate) fn is_throttled(&self) -> bool {
        matches!(self, Outcome::Throttled { .. } | Outcome::QuotaExhausted)
    }

    /// A short lowercase name: `success`, `throttled`, ... (for logs, metrics and headers).
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Throttled { .. } => "throttled",
            Outcome::QuotaExhausted => "quota_exhausted",
            Outcome::ServerError { .. } => "server_error",
            Outcome::ConnectError => "connect_error",
            Outcome::Transport => "transport_error",
            Outcome::Timeout => "timeout",
            Outcome::ClientError { .. } => "client_error",
            Outcome::CredentialRejected { .. } => "credential_rejected",
            Outcome::Unavailable { .. } => "unavailable",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Throttled {
                retry_after: Some(d),
            } => write!(f, "throttled (retry after {:.3}s)", d.as_secs_f64()),
            Outcome::Throttled { retry_after: None } => f.write_str("throttled"),
            Outcome::QuotaExhausted => f.write_str("quota exhausted"),
            Outcome::ServerError { status } => write!(f, "server error {}", status.as_u16()),
            Outcome::ClientError { status } => write!(f, "client error {}", status.as_u16()),
            Outcome::CredentialRejected { status } => {
                write!(f, "credential rejected ({})", status.as_u16())
            }
            Outcome::Success => f.write_str("success"),
            Outcome::ConnectError => f.write_str("connect error"),
            Outcome::Transport => f.write_str("transport error"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Unavailable { .. } => f.write_str("unavailable"),
        }
    }
}
