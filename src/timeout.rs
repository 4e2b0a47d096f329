//! `AttemptTimeout`: per-attempt deadlines that abandon a hung backend without cutting a stream
//! that is flowing.
//!
//! Place it per backend, under the [`Endpoint`](crate::endpoint::Endpoint), so a timeout is
//! classified as [`Outcome::Timeout`](crate::Outcome::Timeout): a failure the circuit breaker
//! counts and a reason for the layers above to try elsewhere.
//!
//! Three independent limits, each optional:
//!
//! | limit | measured | on expiry |
//! |---|---|---|
//! | `first_byte` | from sending until the first body byte (for a non-streamed answer the head comes only when the whole answer is ready, so set it with that in mind) | before the head: the attempt fails with [`Elapsed`]; after it: the body ends with that error |
//! | `idle` | between body chunks, once the first has come | the body ends with [`Elapsed`] |
//! | `total` | from sending until the body's end (default 300 s, as users set on Application Gateway) | as above |
//!
//! A stream that keeps flowing is never cut by `first_byte` or `idle`, only by `total`.
//!
//! **Silence watch** (in [`stack::group`](crate::stack::group), on by default where no
//! `first_byte` limit is set): an attempt is abandoned with [`Elapsed`]`(`[`Silent`](Limit::Silent)`)`
//! once its backend has answered nothing at all, neither it nor any other request, for 10 s
//! and for 10x the slowest latency average of the group's other backends. A hung backend is
//! silent; a busy one answers its other requests, so a long generation on a working backend is
//! not cut. The retry layer then tries another backend and the breaker counts a failure. The
//! default 10 s floor and 10x factor: a request is rescued well before the OpenAI SDKs' 60 s and
//! a user's patience, while no peer-relative slowness short of 10x is mistaken for a hang. Set
//! `Settings::silence` (config `timeouts.silence_ms`, 0 for off) to change it.
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_lb::timeout::AttemptTimeoutLayer;
//!
//! let layer = AttemptTimeoutLayer {
//!     first_byte: Some(Duration::from_secs(20)),
//!     idle: Some(Duration::from_secs(30)),
//!     ..AttemptTimeoutLayer::default() // total: 300 s
//! };
//! # let _ = layer;
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;

use crate::error::{Elapsed, Limit};

/// Layer that wraps a service in [`AttemptTimeout`]: its fields are the three limits (see the
/// [module docs](self)); `AttemptTimeoutLayer::default()` sets only `total`, 300 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptTimeoutLayer {
    /// From sending until the first body byte (default: none).
    pub first_byte: Option<Duration>,
    /// Between body chunks, once the first has come (default: none).
    pub idle: Option<Duration>,
    /// From sending until the body's end (default 300 s, as users set on Application Gateway;
    /// `None`: no limit).
    pub total: Option<Duration>,
}

impl Default for AttemptTimeoutLayer {
    fn default() -> Self {
        AttemptTimeoutLayer {
            first_byte: None,
            idle: None,
            total: Some(Duration::from_secs(300)),
        }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout {
            inner,
            limits: *self,
            watch: None,
        }
    }
}

/// Middleware that bounds each attempt in time. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct AttemptTimeout<S> {
    inner: S,
    limits: AttemptTimeoutLayer,
    watch: Option<Arc<SilenceWatch>>,
}

/// Abandons an attempt on a backend that has gone silent: no answer to it and none to any other
/// request since it was sent, for longer than `floor` and than `factor` times the slowest
/// answer time (moving average) of the group's other backends. A hung backend is silent; a
/// busy one keeps answering its other requests, and a flowing stream has its head already.
#[derive(Debug)]
pub(crate) struct SilenceWatch {
    pub(crate) own: crate::state::BackendState,
    pub(crate) peers: Arc<[crate::state::BackendState]>,
    pub(crate) floor: Duration,
    pub(crate) factor: u32,
}

impl SilenceWatch {
    /// How long an attempt may wait on a silent backend: `floor`, or `factor` times the
    /// slowest of the peers' latency averages if that is longer.
    pub(crate) fn limit(&self) -> Duration {
        let peers = self
            .peers
            .iter()
            .filter(|p| !p.ptr_eq(&self.own))
            .filter_map(|p| p.latency())
            .max()
            .unwrap_or_default();
        self.floor.max(peers.saturating_mul(self.factor))
    }
}

/// [`AttemptTimeoutLayer`] with a [`SilenceWatch`] over one backend of a group.
#[derive(Clone, Debug)]
pub(crate) struct WatchedTimeoutLayer {
    pub(crate) limits: AttemptTimeoutLayer,
    pub(crate) watch: Option<Arc<SilenceWatch>>,
}

impl<S> Layer<S> for WatchedTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout {
            inner,
            limits: self.limits,
            watch: self.watch.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Deadlines {
    first_byte: Option<Instant>,
    total: Option<Instant>,
    idle: Option<Duration>,
}

impl Deadlines {
    /// The nearest deadline before the first byte, and which limit it is.
    fn before_first_byte(&self) -> Option<(Instant, Limit)> {
        match (self.first_byte, self.total) {
            (Some(f), Some(t)) if t < f => Some((t, Limit::Total)),
            (Some(f), _) => Some((f, Limit::FirstByte)),
            (None, Some(t)) => Some((t, Limit::Total)),
            (None, None) => None,
        }
    }

    /// The nearest deadline after a chunk at `now`.
    fn after_chunk(&self, now: Instant) -> Option<(Instant, Limit)> {
        let idle = self.idle.map(|d| (now + d, Limit::Idle));
        match (idle, self.total) {
            (Some((i, _)), Some(t)) if t <= i => Some((t, Limit::Total)),
            (Some(i), _) => Some(i),
            (None, Some(t)) => Some((t, Limit::Total)),
            (None, None) => None,
        }
    }
}

impl<S, Req, B> Service<Req> for AttemptTimeout<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<TimeoutBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let now = Instant::now();
        let deadlines = Deadlines {
            first_byte: self.limits.first_byte.map(|d| now + d),
            total: self.limits.total.map(|d| now + d),
            idle: self.limits.idle,
        };
        // The silence watch stands in for a first-byte limit the user did not set.
        let watch = self
            .watch
            .as_ref()
            .filter(|_| self.limits.first_byte.is_none());
        let first = match (deadlines.before_first_byte(), watch) {
            (Some((at, limit)), Some(w)) if at <= now + w.floor => Some((at, limit)),
            (_, Some(w)) => Some((now + w.floor, Limit::Silent)),
            (other, None) => other,
        };
        // One timer per attempt: the head's, handed on to the body (no limit, no timer).
        let sleep = first.map(|(at, limit)| (Box::pin(tokio::time::sleep_until(at)), limit));
        ResponseFuture {
            fut: self.inner.call(req),
            sleep,
            deadlines,
            watch: watch.cloned(),
            start: now,
        }
    }
}

pin_project! {
    /// Response future of [`AttemptTimeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        sleep: Option<(Pin<Box<Sleep>>, Limit)>,
        deadlines: Deadlines,
        watch: Option<Arc<SilenceWatch>>,
        start: Instant,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<TimeoutBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.fut.poll(cx) {
            let res = result.map_err(Into::into)?;
            let deadlines = *this.deadlines;
            let mut sleep = this.sleep.take();
            if let Some((s, limit)) = &mut sleep
                && *limit == Limit::Silent
            {
                // The head came: the body keeps only the limits the user set.
                match deadlines.before_first_byte() {
                    Some((at, l)) => {
                        s.as_mut().reset(at);
                        *limit = l;
                    }
                    None => sleep = None,
                }
            }
            return Poll::Ready(Ok(res.map(|inner| TimeoutBody {
                inner,
                deadlines,
                sleep,
                started: false,
            })));
        }
        loop {
            let Some((sleep, limit)) = this.sleep.as_mut() else {
                return Poll::Pending;
            };
            ready!(sleep.as_mut().poll(cx));
            let Some(watch) = this.watch.as_ref().filter(|_| *limit == Limit::Silent) else {
                return Poll::Ready(Err(Elapsed(*limit).into()));
            };
            let now = Instant::now();
            let due = *this.start + watch.limit();
            if now >= due && watch.own.silent_since(*this.start) {
                return Poll::Ready(Err(Elapsed(Limit::Silent).into()));
            }
            // Not silent (it answered others) or not long enough: look again later, never past
            // the user's own limits.
            let next = due.max(now + (watch.floor / 4).max(Duration::from_millis(100)));
            match this.deadlines.before_first_byte() {
                Some((at, l)) if at <= next => {
                    sleep.as_mut().reset(at);
                    *limit = l;
                }
                _ => sleep.as_mut().reset(next),
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timeout::ResponseFuture")
    }
}

pin_project! {
    /// A response body bounded by the attempt's limits.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        deadlines: Deadlines,
        sleep: Option<(Pin<Box<Sleep>>, Limit)>,
        started: bool,
    }
}

impl<B: fmt::Debug> fmt::Debug for TimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutBody")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if let Some(Ok(f)) = &frame
                && f.is_data()
            {
                // A chunk: the first-byte limit is met; the idle clock restarts.
                *this.started = true;
                let now = Instant::now();
                match this.deadlines.after_chunk(now) {
                    Some((at, limit)) => match this.sleep {
                        Some((s, l)) => {
                            s.as_mut().reset(at);
                            *l = limit;
                        }
                        None => *this.sleep = Some((Box::pin(tokio::time::sleep_until(at)), limit)),
                    },
                    None => *this.sleep = None,
                }
            }
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if this.sleep.is_none() {
            let deadline = if *this.started {
                this.deadlines.after_chunk(Instant::now())
            } else {
                this.deadlines.before_first_byte()
            };
            let Some((at, limit)) = deadline else {
                return Poll::Pending;
            };
            *this.sleep = Some((Box::pin(tokio::time::sleep_until(at)), limit));
        }
        let Some((sleep, limit)) = this.sleep else {
            return Poll::Pending;
        };
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(Elapsed(*limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
