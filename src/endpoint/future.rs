//! Response future of [`Endpoint`](super::Endpoint).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;

use super::Record;
use crate::body::{Peek, ResponseBody};
use crate::classify::Outcome;
use crate::classify::retry_after::Hints;
use crate::error::BoxError;

pin_project! {
    /// Response future of [`Endpoint`](super::Endpoint).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Failed { error: Option<BoxError> },
        Call { #[pin] fut: F, record: Option<Record> },
        // Boxed: rare (error bodies, held stream starts), and large.
        PeekBody { peeking: Box<Peeking<B>> },
    }
}

/// The most of a 200 JSON answer read to see whether it is an `{"error": ...}` object.
const JSON_HEAD_LIMIT: usize = 1024;

/// Why an answer's first bytes are read before its head is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeekFor {
    /// A throttled answer's error body (quota exhausted or not).
    ErrorBody,
    /// A stream's first event (an in-band error before any content).
    StreamStart,
    /// A 200 JSON answer that may be an `{"error": ...}` object.
    JsonError,
}

struct Peeking<B> {
    head: Option<(http::response::Parts, B)>,
    peek: Peek,
    why: PeekFor,
    outcome: Outcome,
    hints: Hints,
    record: Option<Record>,
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(fut: F, record: Record) -> Self {
        ResponseFuture {
            state: State::Call {
                fut,
                record: Some(record),
            },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

#[inline]
fn done<B>(
    mut parts: http::response::Parts,
    body: ResponseBody<B>,
    record: Record,
    outcome: Outcome,
    hints: Hints,
) -> Response<ResponseBody<B>> {
    let sse = outcome.is_success()
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let marker = if sse { record.end_marker } else { None };
    let body = body.watched(record.backend.name_arc().clone(), marker);
    let (served, in_flight) = record.finish(outcome, hints);
    let body = body.holding(in_flight);
    parts.extensions.insert(served);
    Response::from_parts(parts, body)
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into())));
                }
                StateProj::Call { fut, record } => {
                    let result = ready!(fut.poll(cx));
                    let Some(rec) = record.take() else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    let res = match result {
                        Ok(res) => res,
                        Err(e) => return Poll::Ready(Err(rec.fail(e.into()))),
                    };
                    let hints = rec.hints(res.headers());
                    let classify = &rec.settings.classify;
                    let outcome = classify.classify_response(res.status(), res.headers(), &hints);
                    let (parts, body) = res.into_parts();
                    let hold = rec.settings.hold_stream_start.filter(|_| {
                        outcome.is_success()
                            && parts
                                .headers
                                .get(http::header::CONTENT_TYPE)
                                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
                    });
                    let json_success = rec.settings.json_error_in_success
                        && parts.status == http::StatusCode::OK
                        && outcome.is_success()
                        && parts
                            .headers
                            .get(http::header::CONTENT_TYPE)
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                    let (peek, why) = match hold {
                        Some(limit) => (
                            Peek::until(limit, crate::provider::stream_start_known),
                            PeekFor::StreamStart,
                        ),
                        None if classify.wants_error_body(&outcome) => {
                            (Peek::new(rec.settings.error_body_limit), PeekFor::ErrorBody)
                        }
                        None if json_success => (
                            Peek::until(JSON_HEAD_LIMIT, |b| {
                                crate::provider::json_error_head(b).is_some()
                            }),
                            PeekFor::JsonError,
                        ),
                        None => {
                            let body = ResponseBody::new(body);
                            return Poll::Ready(Ok(done(parts, body, rec, outcome, hints)));
                        }
                    };
                    this.state.set(State::PeekBody {
                        peeking: Box::new(Peeking {
                            head: Some((parts, body)),
                            peek,
                            why,
                            outcome,
                            hints,
                            record: Some(rec),
                        }),
                    });
                }
                StateProj::PeekBody { peeking } => {
                    let Peeking {
                        head,
                        peek,
                        why,
                        outcome,
                        hints,
                        record,
                    } = &mut **peeking;
                    let Some((_, body)) = head.as_mut() else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    ready!(peek.poll_peek(cx, Pin::new(body)));
                    let (Some((parts, body)), Some(rec)) = (head.take(), record.take()) else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    let read = peek.take();
                    let outcome = if *why == PeekFor::StreamStart {
                        crate::provider::stream_start_outcome(&read).unwrap_or(*outcome)
                    } else if *why == PeekFor::JsonError {
                        if crate::provider::json_error_head(&read) == Some(true) {
                            crate::provider::in_band_error_outcome(&read)
                        } else {
                            *outcome
                        }
                    } else {
                        // Exactly the first `limit` bytes decide (the frame that crossed the
                        // limit may hold more; it is replayed, not read further).
                        let seen = &read[..read.len().min(peek.limit)];
                        rec.settings.classify.classify_error_body(*outcome, seen)
                    };
                    let body = ResponseBody::with_prefix(read, peek.trailers.take(), body);
                    return Poll::Ready(Ok(done(parts, body, rec, outcome, *hints)));
                }
            }
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("endpoint::ResponseFuture")
    }
}
