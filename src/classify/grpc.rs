//! gRPC answers: what a `grpc-status` means for routing.
//!
//! A gRPC server answers HTTP 200 and says how the call went in `grpc-status`: in the head of a
//! trailers-only answer (how tonic and other servers answer a call that fails before any
//! message, the usual form of a unary error), or in the trailers after the messages. The stock
//! [`Standard`](super::Standard) policy reads the head's; [`ResponseBody`](crate::body::ResponseBody)
//! counts a failing status met in the trailers on the backend (the answer has already gone to
//! the caller by then, so it steers nothing but the backend's counters).
//!
//! | `grpc-status` | [`Outcome`] |
//! |---|---|
//! | absent, `0` OK | [`Outcome::Success`] |
//! | `8` RESOURCE_EXHAUSTED | [`Outcome::Throttled`], with `grpc-retry-pushback-ms` as the wait |
//! | `14` UNAVAILABLE | [`Outcome::ServerError`] (503): a failure, retried elsewhere |
//! | `4` DEADLINE_EXCEEDED | [`Outcome::Timeout`] |
//! | `16` UNAUTHENTICATED, `7` PERMISSION_DENIED | [`Outcome::ClientError`] 401 / 403 (with a configured credential, `Endpoint` makes it [`Outcome::CredentialRejected`]) |
//! | any other | [`Outcome::ClientError`] with the status of gRPC's HTTP mapping: the caller's |

use http::{HeaderMap, HeaderName, StatusCode};

use super::Outcome;
use super::retry_after::Hints;

/// The `grpc-status` header (or trailer).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// `RESOURCE_EXHAUSTED`: the server's quota is used up.
pub(crate) const RESOURCE_EXHAUSTED: u32 = 8;
/// `UNAVAILABLE`: the server cannot serve now.
pub(crate) const UNAVAILABLE: u32 = 14;
/// `DEADLINE_EXCEEDED`.
pub(crate) const DEADLINE_EXCEEDED: u32 = 4;
/// `UNAUTHENTICATED`.
pub(crate) const UNAUTHENTICATED: u32 = 16;
/// `PERMISSION_DENIED`.
pub(crate) const PERMISSION_DENIED: u32 = 7;

/// The `grpc-status` in `headers` (a head or trailers), if there is a readable one.
pub fn status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// What a gRPC status code means (`None` for `0` OK). `hints` gives the wait of a throttled
/// answer (`grpc-retry-pushback-ms`, read with the other wait hints).
pub fn outcome(code: u32, hints: &Hints) -> Option<Outcome> {
    let client = |status: u16| Outcome::ClientError {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
    };
    Some(match code {
        0 => return None,
        RESOURCE_EXHAUSTED => Outcome::Throttled {
            retry_after: hints.retry_after,
        },
        UNAVAILABLE => Outcome::ServerError {
            status: StatusCode::SERVICE_UNAVAILABLE,
        },
        DEADLINE_EXCEEDED => Outcome::Timeout,
        UNAUTHENTICATED => client(401),
        PERMISSION_DENIED => client(403),
        // gRPC's own HTTP mapping for the rest.
        1 => client(499),
        3 | 9 | 11 => client(400),
        5 => client(404),
        6 | 10 => client(409),
        12 => client(501),
        _ => client(500),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        let hints = Hints {
            retry_after: Some(Duration::from_millis(250)),
            ..Hints::default()
        };
        assert_eq!(outcome(0, &hints), None);
        assert_eq!(
            outcome(8, &hints),
            Some(Outcome::Throttled {
                retry_after: Some(Duration::from_millis(250))
            })
        );
        assert!(outcome(14, &hints).unwrap().is_failure());
        assert_eq!(outcome(4, &hints), Some(Outcome::Timeout));
        assert_eq!(
            outcome(16, &hints),
            Some(Outcome::ClientError {
                status: StatusCode::UNAUTHORIZED
            })
        );
        assert_eq!(
            outcome(3, &hints),
            Some(Outcome::ClientError {
                status: StatusCode::BAD_REQUEST
            })
        );
        assert_eq!(
            outcome(99, &hints),
            Some(Outcome::ClientError {
                status: StatusCode::INTERNAL_SERVER_ERROR
            })
        );
    }

    #[test]
    fn a_status_is_read_from_a_head_or_trailers() {
        let mut h = HeaderMap::new();
        assert_eq!(status(&h), None);
        h.insert(GRPC_STATUS, " 14 ".parse().unwrap());
        assert_eq!(status(&h), Some(14));
        h.insert(GRPC_STATUS, "x".parse().unwrap());
        assert_eq!(status(&h), None);
    }
}

/// The path of gRPC's health check (`grpc.health.v1.Health/Check`).
pub(crate) const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// A gRPC frame holding a `HealthCheckRequest { service }` (protobuf field 1, a string).
pub(crate) fn health_check_request(service: &str) -> bytes::Bytes {
    let mut msg = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame.into()
}

/// Whether a gRPC answer body (frames) holds a `HealthCheckResponse` saying `SERVING` (field 1,
/// value 1). `None` when the body is not one uncompressed frame holding a readable message.
pub(crate) fn health_serving(body: &[u8]) -> Option<bool> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let varint = |buf: &mut &[u8]| -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    };
    let mut status = 0; // UNKNOWN when absent.
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut msg)?,
            (_, 0) => {
                varint(&mut msg)?;
            }
            (_, 2) => {
                let n = varint(&mut msg)? as usize;
                msg = msg.get(n..)?;
            }
            _ => return None,
        }
    }
    Some(status == 1)
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn health_frames_round_trip_the_fields_that_matter() {
        assert_eq!(&health_check_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &health_check_request("chat")[..],
            &[0, 0, 0, 0, 6, 0x0a, 4, b'c', b'h', b'a', b't']
        );
        assert_eq!(health_serving(&[0, 0, 0, 0, 2, 0x08, 1]), Some(true));
        assert_eq!(health_serving(&[0, 0, 0, 0, 2, 0x08, 2]), Some(false));
        assert_eq!(health_serving(&[0, 0, 0, 0, 0]), Some(false));
        assert_eq!(health_serving(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(health_serving(&[0, 0, 0, 0, 9, 0x08]), None);
        assert_eq!(health_serving(&[]), None);
    }
}
