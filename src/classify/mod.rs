//! Deciding, never doing: what one attempt's result means.
//!
//! Every layer asks the same question, "what happened?", and gets the same [`Outcome`]. The
//! per-backend [`Endpoint`](crate::endpoint::Endpoint) classifies each attempt once and stamps
//! the answer on the response (see [`Served`](crate::endpoint::Served)) or inside the error
//! ([`BackendError`]); layers above read it from there.
//!
//! | what came back | [`Outcome`] |
//! |---|---|
//! | 1xx, 2xx, 3xx | [`Outcome::Success`] |
//! | gRPC: 200 with a failing `grpc-status` in the head (trailers-only answer) | see [`grpc`]: `RESOURCE_EXHAUSTED` throttled (wait from `grpc-retry-pushback-ms`), `UNAVAILABLE` a failure, `DEADLINE_EXCEEDED` a timeout, the rest the caller's |
//! | 429, Anthropic 529, 503 carrying a wait hint | [`Outcome::Throttled`] with the hint |
//! | 429 whose small JSON error body says billing / spend limit | [`Outcome::QuotaExhausted`] |
//! | 500, 502, 503 without hint, 504, other 5xx | [`Outcome::ServerError`] |
//! | 408 | [`Outcome::Timeout`] |
//! | 401 / 403 from a backend with a configured credential (judged by `Endpoint`) | [`Outcome::CredentialRejected`]: failed over, the backend taken out for long |
//! | other 4xx | [`Outcome::ClientError`]: never retried, never failed over |
//! | connection refused, DNS, TLS | [`Outcome::ConnectError`] |
//! | connection broke after it was made | [`Outcome::Transport`] |
//! | a timer of ours fired | [`Outcome::Timeout`] |
//! | a layer of ours refused without sending (nothing available, no token) | [`Outcome::Unavailable`] |
//! | a path that cannot be mapped onto the backend (400), a stack without the `BalanceLayer` its chosen-backend layers need (500) | [`Outcome::ClientError`]: nothing was sent, never retried |
//!
//! Replace the policy by implementing [`Classify`], in the spirit of tower's retry `Policy`.

pub mod grpc;
pub(crate) mod retry_after;

pub use retry_after::{Hints, WallClock, set_retry_after};

use std::error::Error as StdError;

use http::{HeaderMap, StatusCode};

use crate::error::{BackendError, Exhausted};
pub use crate::outcome::Outcome;

/// The policy that turns a response head or an error into an [`Outcome`].
///
/// [`Standard`] is the stock policy described in the [module docs](self).
pub trait Classify: Send + Sync + 'static {
    /// Classifies a response from its status and headers; `hints` are the headers' parsed wait
    /// and quota hints.
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap, hints: &Hints) -> Outcome;

    /// Classifies an error returned instead of a response.
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome;

    /// Whether the (bounded) error body of a response classified as `outcome` should be read to
    /// refine it. Default: throttled responses only. A success body is never read.
    fn wants_error_body(&self, outcome: &Outcome) -> bool {
        matches!(outcome, Outcome::Throttled { .. })
    }

    /// Refines `outcome` from the first bytes of the error body.
    fn classify_error_body(&self, outcome: Outcome, body: &[u8]) -> Outcome {
        let _ = body;
        outcome
    }
}

/// The stock [`Classify`] policy, following the table in the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct Standard;

impl Classify for Standard {
    fn classify_response(&self, status: StatusCode, headers: &HeaderMap, hints: &Hints) -> Outcome {
        match status.as_u16() {
            // A gRPC call that failed before any message: a trailers-only answer.
            200 => grpc::status(headers)
                .and_then(|code| grpc::outcome(code, hints))
                .unwrap_or(Outcome::Success),
            0..=399 => Outcome::Success,
            429 | 529 => Outcome::Throttled {
                retry_after: hints.wait(),
            },
            503 if hints.retry_after.is_some() => Outcome::Throttled {
                retry_after: hints.retry_after,
            },
            408 => Outcome::Timeout,
            400..=499 => Outcome::ClientError { status },
            _ => Outcome::ServerError { status },
        }
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Outcome {
        classify_error_chain(error)
    }

    fn classify_error_body(&self, outcome: Outcome, body: &[u8]) -> Outcome {
        if crate::provider::is_quota_exhausted_body(body) {
            Outcome::QuotaExhausted
        } else {
            outcome
        }
    }
}

/// An answer's `x-should-retry` (`true` / `false`, as OpenAI and Anthropic send it): whether
/// the backend says a retry may succeed, where it says so.
pub(crate) fn should_retry(headers: &HeaderMap) -> Option<bool> {
    static X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");
    match headers.get(&X_SHOULD_RETRY)?.as_bytes() {
        b"true" => Some(true),
        b"false" => Some(false),
        _ => None,
    }
}

/// Walks an error's source chain for the first cause this crate knows (the stock error policy).
pub(crate) fn classify_error_chain(error: &(dyn StdError + 'static)) -> Outcome {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cur {
        if let Some(b) = e.downcast_ref::<BackendError>() {
            return b.outcome;
        }
        if let Some(x) = e.downcast_ref::<Exhausted>() {
            return Outcome::Unavailable {
                retry_at: x.earliest,
            };
        }
        if let Some(u) = e.downcast_ref::<crate::error::Unavailable>() {
            return Outcome::Unavailable {
                retry_at: u.earliest,
            };
        }
        if let Some(open) = e.downcast_ref::<crate::error::Open>() {
            return Outcome::Unavailable {
                retry_at: open.until,
            };
        }
        if e.is::<crate::error::TokenUnavailable>() {
            return Outcome::Unavailable { retry_at: None };
        }
        // Nothing was sent, and sending again would not change it: never retried.
        // Nothing here serves it: nothing was sent, no wait helps, another target may.
        if e.is::<crate::error::NotServed>() {
            return Outcome::Unavailable { retry_at: None };
        }
        if e.is::<crate::error::InvalidTarget>()
            || e.is::<crate::provider::translate::Untranslatable>()
        {
            return Outcome::ClientError {
                status: StatusCode::BAD_REQUEST,
            };
        }
        if e.is::<crate::error::NoBackendChosen>() || e.is::<crate::error::CredentialMisplaced>() {
            return Outcome::ClientError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
            };
        }
        if e.is::<crate::error::Elapsed>()
            || e.is::<crate::error::DeadlineExceeded>()
            || e.is::<tokio::time::error::Elapsed>()
            || e.is::<tower::timeout::error::Elapsed>()
        {
            return Outcome::Timeout;
        }
        if let Some(c) = e.downcast_ref::<hyper_util::client::legacy::Error>()
            && c.is_connect()
        {
            return Outcome::ConnectError;
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_timeout()
        {
            return Outcome::Timeout;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionRefused | AddrNotAvailable | NotFound | HostUnreachable
                | NetworkUnreachable => return Outcome::ConnectError,
                TimedOut => return Outcome::Timeout,
                _ => {}
            }
        }
        cur = e.source();
    }
    Outcome::Transport
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::Duration;

    fn classify(status: u16, headers: &[(&str, &str)]) -> Outcome {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let hints = Hints::from_headers(
            &h,
            std::time::SystemTime::UNIX_EPOCH,
            retry_after::DEFAULT_MAX_HINT,
        );
        Standard.classify_response(StatusCode::from_u16(status).unwrap(), &h, &hints)
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(classify(200, &[]), Outcome::Success);
        assert_eq!(classify(304, &[]), Outcome::Success);
        assert_eq!(classify(429, &[]), Outcome::Throttled { retry_after: None });
        assert_eq!(
            classify(429, &[("retry-after", "3")]),
            Outcome::Throttled {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(classify(529, &[]), Outcome::Throttled { retry_after: None });
        assert_eq!(
            classify(503, &[("retry-after-ms", "100")]),
            Outcome::Throttled {
                retry_after: Some(Duration::from_millis(100))
            }
        );
        for s in [500, 502, 503, 504, 599] {
            assert!(
                matches!(classify(s, &[]), Outcome::ServerError { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(
                matches!(classify(s, &[]), Outcome::ClientError { .. }),
                "{s}"
            );
        }
        assert_eq!(classify(408, &[]), Outcome::Timeout);
    }

    #[test]
    fn quota_exhausted_bodies_refine_throttled() {
        let t = Outcome::Throttled { retry_after: None };
        let openai = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let anthropic = br#"{"type":"error","error":{"type":"enforced_spend_limit_reached","message":"spend limit"}}"#;
        let plain = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            Standard.classify_error_body(t, openai),
            Outcome::QuotaExhausted
        );
        assert_eq!(
            Standard.classify_error_body(t, anthropic),
            Outcome::QuotaExhausted
        );
        assert_eq!(Standard.classify_error_body(t, plain), t);
        assert_eq!(Standard.classify_error_body(t, b"not json"), t);
        assert_eq!(Standard.classify_error_body(t, b""), t);
    }

    #[test]
    fn errors_map_to_outcomes() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Standard.classify_error(&refused), Outcome::ConnectError);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(Standard.classify_error(&reset), Outcome::Transport);
        let elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(Standard.classify_error(&elapsed), Outcome::Timeout);
    }

    #[test]
    fn outcome_kinds() {
        assert!(Outcome::Success.is_success());
        assert!(!Outcome::Throttled { retry_after: None }.is_failure());
        assert!(Outcome::ConnectError.is_failure());
        assert_eq!(
            Outcome::Throttled {
                retry_after: Some(Duration::from_millis(1500))
            }
            .to_string(),
            "throttled (retry after 1.500s)"
        );
    }
}
