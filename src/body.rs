//! Bodies: the cheap-clone replayable request body, the layer that buffers incoming bodies into
//! it, and the response body that gives back bytes read for classification.
//!
//! Retries and fallbacks resend a request, so the stack works on [`ReplayBody`]: the whole request
//! body in one [`Bytes`], cloned by reference count. [`BufferRequest`] turns any incoming
//! [`http_body::Body`] (axum's, tonic's, hyper's `Incoming`) into it, refusing bodies over a size
//! cap before anything is sent ([`crate::error::TooLarge`]).
//!
//! Response bodies are never buffered: [`ResponseBody`] streams the backend's body chunk by chunk.
//! Only when a (small, bounded) error body was read to classify a 429 does it first replay those
//! bytes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::BoxError;

/// What the request costs of a token quota: its [`TokenCost`](crate::attempt::TokenCost) if it carries one, else the
/// estimate from its body when that is a [`ReplayBody`], else 0.
pub(crate) fn token_cost<B: 'static>(req: &http::Request<B>) -> u32 {
    if let Some(cost) = req.extensions().get::<crate::attempt::TokenCost>() {
        return cost.0;
    }
    let body: &dyn std::any::Any = req.body();
    body.downcast_ref::<ReplayBody>()
        .map_or(0, |b| crate::provider::estimate_tokens(b.bytes()))
}

/// [`token_cost`] where it matters: on a backend whose answers tell its token quota (0
/// elsewhere, without reading the body).
pub(crate) fn token_cost_on<B: 'static>(
    backend: &crate::backend::Backend,
    req: &http::Request<B>,
) -> u32 {
    if backend.state().is_token_paced() {
        token_cost(req)
    } else {
        0
    }
}

/// A request body held whole in memory, replayable at no cost.
///
/// Cloning shares the bytes and yields a body that replays from the start.
pub struct ReplayBody {
    data: Bytes,
    sent: bool,
}

impl ReplayBody {
    /// A body of `data` (`Bytes::from_static(..)` for static bytes, no allocation; an empty body
    /// is `ReplayBody::default()`).
    pub fn new(data: impl Into<Bytes>) -> Self {
        ReplayBody {
            data: data.into(),
            sent: false,
        }
    }

    /// The body's bytes (all of them, whether or not the body was polled).
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
}

impl Clone for ReplayBody {
    fn clone(&self) -> Self {
        ReplayBody::new(self.data.clone())
    }
}

impl Default for ReplayBody {
    fn default() -> Self {
        Self::new(Bytes::new())
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("len", &self.data.len())
            .finish()
    }
}

impl From<Bytes> for ReplayBody {
    fn from(b: Bytes) -> Self {
        Self::new(b)
    }
}

impl From<String> for ReplayBody {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&'static str> for ReplayBody {
    fn from(s: &'static str) -> Self {
        Self::new(s)
    }
}

impl From<Vec<u8>> for ReplayBody {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.sent || this.data.is_empty() {
            this.sent = true;
            return Poll::Ready(None);
        }
        this.sent = true;
        Poll::Ready(Some(Ok(Frame::data(this.data.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent || self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(if self.sent { 0 } else { self.data.len() as u64 })
    }
}

/// A copy of `req` for replay: method, URI, version, headers, extensions and the (cheaply
/// cloned) body. One place for the layers that resend a request.
pub(crate) fn clone_request<B: Clone>(req: &Request<B>) -> Request<B> {
    let mut out = Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    *out.extensions_mut() = req.extensions().clone();
    out
}

/// The default cap on a buffered request body: 32 MiB (audio uploads are the large ones).
const DEFAULT_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// Layer that wraps a service in [`BufferRequest`].
#[derive(Clone, Copy, Debug)]
pub struct BufferRequestLayer {
    limit: usize,
}

impl BufferRequestLayer {
    /// Buffers bodies up to `limit` bytes; larger ones are refused with [`crate::error::TooLarge`].
    pub fn new(limit: usize) -> Self {
        BufferRequestLayer { limit }
    }
}

impl Default for BufferRequestLayer {
    fn default() -> Self {
        Self::new(DEFAULT_BODY_LIMIT)
    }
}

impl<S> Layer<S> for BufferRequestLayer {
    type Service = BufferRequest<S>;

    fn layer(&self, inner: S) -> BufferRequest<S> {
        BufferRequest {
            inner,
            limit: self.limit,
        }
    }
}

/// Middleware that reads a request's whole body (up to a cap) into a [`ReplayBody`], then calls
/// the inner service.
///
/// | outcome | what it does |
/// |---|---|
/// | body within the cap | calls the inner service with a `Request<ReplayBody>` |
/// | `content-length` or the bytes read exceed the cap | answers [`crate::error::TooLarge`]; the inner service is not called |
/// | the body fails to read | answers [`crate::error::ReadFailed`]; the inner service is not called |
#[derive(Clone, Debug)]
pub struct BufferRequest<S> {
    inner: S,
    limit: usize,
}

impl<S, B> Service<Request<B>> for BufferRequest<S>
where
    S: Service<Request<ReplayBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BufferFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = declared.unwrap_or(0) > self.limit as u64
            || body.size_hint().lower() > self.limit as u64;
        if too_large {
            return BufferFuture {
                state: BufferState::Failed {
                    error: Some(crate::error::TooLarge { limit: self.limit }.into()),
                },
            };
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        BufferFuture {
            state: BufferState::Collect {
                body,
                acc: Accumulator::new(self.limit),
                pending: Some((inner, parts)),
            },
        }
    }
}

/// Collects data chunks up to a limit, copying only when there is more than one chunk.
struct Accumulator {
    first: Bytes,
    rest: Option<bytes::BytesMut>,
    limit: usize,
}

impl Accumulator {
    fn new(limit: usize) -> Self {
        Accumulator {
            first: Bytes::new(),
            rest: None,
            limit,
        }
    }

    fn len(&self) -> usize {
        self.rest.as_ref().map_or(self.first.len(), |r| r.len())
    }

    fn push<D: bytes::Buf>(&mut self, mut data: D) -> Result<(), crate::error::TooLarge> {
        if self.len() + data.remaining() > self.limit {
            return Err(crate::error::TooLarge { limit: self.limit });
        }
        if let Some(rest) = &mut self.rest {
            rest.extend_from_slice(&data.copy_to_bytes(data.remaining()));
        } else if self.first.is_empty() {
            self.first = data.copy_to_bytes(data.remaining());
        } else {
            let mut rest = bytes::BytesMut::with_capacity(self.first.len() + data.remaining());
            rest.extend_from_slice(&self.first);
            rest.extend_from_slice(&data.copy_to_bytes(data.remaining()));
            self.rest = Some(rest);
        }
        Ok(())
    }

    fn take(&mut self) -> Bytes {
        match self.rest.take() {
            Some(r) => r.freeze(),
            None => std::mem::take(&mut self.first),
        }
    }
}

pin_project! {
    /// Response future of [`BufferRequest`].
    pub struct BufferFuture<S: Service<Request<ReplayBody>>, B: Body> {
        #[pin]
        state: BufferState<S, B>,
    }
}

pin_project! {
    #[project = BufferProj]
    enum BufferState<S: Service<Request<ReplayBody>>, B: Body> {
        Failed { error: Option<BoxError> },
        Collect {
            #[pin] body: B,
            acc: Accumulator,
            pending: Option<(S, http::request::Parts)>,
        },
        Call { #[pin] fut: S::Future },
    }
}

impl<S, B> Future for BufferFuture<S, B>
where
    S: Service<Request<ReplayBody>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                BufferProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into())));
                }
                BufferProj::Collect {
                    mut body,
                    acc,
                    pending,
                } => {
                    while let Some(frame) = ready!(body.as_mut().poll_frame(cx)) {
                        let frame = frame.map_err(|e| crate::error::ReadFailed(e.into()))?;
                        if let Ok(data) = frame.into_data() {
                            acc.push(data)?;
                        }
                    }
                    let Some((mut inner, parts)) = pending.take() else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    let req = Request::from_parts(parts, ReplayBody::new(acc.take()));
                    let fut = inner.call(req);
                    this.state.set(BufferState::Call { fut });
                }
                BufferProj::Call { fut } => return fut.poll(cx).map_err(Into::into),
            }
        }
    }
}

impl<S: Service<Request<ReplayBody>>, B: Body> fmt::Debug for BufferFuture<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BufferFuture")
    }
}

pin_project! {
    /// A backend's response body, streamed as it comes.
    ///
    /// When the error body of a response was read (bounded) to classify it, those bytes are
    /// replayed first, then the rest of the backend's body follows.
    ///
    /// Errors are typed: a body that breaks mid-way ends with [`crate::error::StreamInterrupted`]
    /// naming the backend. A streamed (SSE) chat or messages answer that ends without its end
    /// marker (`data: [DONE]`, or Anthropic's `message_stop`) ends with that error too, never
    /// as a clean end, so a truncated answer cannot pass for a complete one.
    pub struct ResponseBody<B> {
        // Boxed: only error bodies read ahead for classification have one, and the response
        // moves through every layer, so it stays small.
        replay: Option<Box<Replay>>,
        backend: Option<std::sync::Arc<str>>,
        end: EndWatch,
        // Counts the answer in flight on its backend until it has been read (or dropped).
        in_flight: Option<crate::state::InFlight>,
        // Boxed: only answers translated from another provider's API have one.
        translate: Option<Box<Translating>>,
        #[pin]
        inner: B,
    }
}

/// An answer being rewritten into the caller's API (see [`translate`](crate::translate)).
#[derive(Debug)]
struct Translating {
    with: Box<dyn crate::provider::translate::StreamTranslate>,
    out: Vec<u8>,
    finished: bool,
}

/// What was read ahead of a body: replayed before the rest.
#[derive(Debug)]
struct Replay {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

/// Watches a stream for its end marker across chunk boundaries.
#[derive(Debug, Default)]
pub(crate) struct EndWatch {
    marker: Option<&'static [u8]>,
    seen: bool,
    tail: [u8; 16],
    tail_len: usize,
}

impl EndWatch {
    /// Watches for `marker` (none: nothing to watch).
    pub(crate) fn new(marker: Option<&'static [u8]>) -> Self {
        EndWatch {
            marker,
            ..EndWatch::default()
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        let Some(marker) = self.marker else { return };
        if self.seen {
            return;
        }
        let contains = |hay: &[u8]| memchr::memmem::find(hay, marker).is_some();
        // The marker may straddle the previous chunk and this one.
        let mut joined = [0u8; 32];
        let head = data.len().min(16);
        joined[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        joined[self.tail_len..self.tail_len + head].copy_from_slice(&data[..head]);
        if contains(&joined[..self.tail_len + head]) || contains(data) {
            self.seen = true;
            return;
        }
        // Keep the last `marker.len() - 1` bytes of (tail ++ data) for the next chunk.
        let need = marker.len().saturating_sub(1).min(16);
        let mut next = [0u8; 16];
        let n = if data.len() >= need {
            next[..need].copy_from_slice(&data[data.len() - need..]);
            need
        } else {
            let from_tail = (need - data.len()).min(self.tail_len);
            let start = self.tail_len - from_tail;
            next[..from_tail].copy_from_slice(&self.tail[start..self.tail_len]);
            next[from_tail..from_tail + data.len()].copy_from_slice(data);
            from_tail + data.len()
        };
        self.tail = next;
        self.tail_len = n;
    }

    /// True when the stream may end now.
    pub(crate) fn complete(&self) -> bool {
        self.marker.is_none() || self.seen
    }
}

impl<B> ResponseBody<B> {
    /// A body that streams `inner` as it is.
    #[inline]
    pub(crate) fn new(inner: B) -> Self {
        ResponseBody {
            replay: None,
            backend: None,
            end: EndWatch::default(),
            in_flight: None,
            translate: None,
            inner,
        }
    }

    pub(crate) fn with_prefix(prefix: Bytes, trailers: Option<HeaderMap>, inner: B) -> Self {
        ResponseBody {
            replay: Some(Box::new(Replay {
                prefix: (!prefix.is_empty()).then_some(prefix),
                trailers,
            })),
            backend: None,
            end: EndWatch::default(),
            in_flight: None,
            translate: None,
            inner,
        }
    }

    /// Names the backend in errors, and requires `end` before a clean end (if given).
    #[inline]
    pub(crate) fn watched(
        mut self,
        backend: std::sync::Arc<str>,
        end: Option<&'static [u8]>,
    ) -> Self {
        self.backend = Some(backend);
        self.end = EndWatch::new(end);
        self
    }

    /// Keeps `guard` (the backend's in-flight count) until the body ends or is dropped.
    #[inline]
    pub(crate) fn holding(mut self, guard: crate::state::InFlight) -> Self {
        self.in_flight = Some(guard);
        self
    }

    /// Rewrites the answer with `with` as it streams (a translated request's answer).
    pub(crate) fn translated(
        mut self,
        with: Box<dyn crate::provider::translate::StreamTranslate>,
    ) -> Self {
        self.translate = Some(Box::new(Translating {
            with,
            out: Vec::new(),
            finished: false,
        }));
        self
    }

    /// The bytes read ahead for classification, if any.
    pub(crate) fn prefix(&self) -> Option<&Bytes> {
        self.replay.as_ref().and_then(|r| r.prefix.as_ref())
    }
}

impl<B: fmt::Debug> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("prefix_len", &self.prefix().map(Bytes::len))
            .field("inner", &self.inner)
            .finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.translate.is_none() {
            return self.poll_raw(cx);
        }
        loop {
            if self.translate.as_ref().is_some_and(|t| t.finished) {
                // Ended, or failed: nothing more of the backend's bytes is passed on.
                return Poll::Ready(None);
            }
            let frame = ready!(self.as_mut().poll_raw(cx));
            let this = self.as_mut().project();
            let Some(t) = this.translate.as_mut() else {
                return Poll::Ready(frame);
            };
            let result = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => t.with.feed(&data, &mut t.out),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    t.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    t.finished = true;
                    t.with.finish(&mut t.out)
                }
            };
            if let Err(reason) = result {
                t.finished = true;
                return Poll::Ready(Some(Err(crate::error::StreamInterrupted {
                    backend: this.backend.clone(),
                    source: Some(format!("the answer could not be translated: {reason}").into()),
                }
                .into())));
            }
            if !t.out.is_empty() {
                let data = Bytes::from(std::mem::take(&mut t.out));
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if t.finished {
                return Poll::Ready(None);
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.translate.as_ref().is_none_or(|t| t.finished) && self.raw_end()
    }

    fn size_hint(&self) -> SizeHint {
        if self.translate.is_some() {
            return SizeHint::new();
        }
        let extra = self.prefix().map_or(0, |p| p.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        if let Some(u) = inner.upper() {
            hint.set_upper(u + extra);
        }
        hint
    }
}

impl<B> ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn raw_end(&self) -> bool {
        self.replay
            .as_ref()
            .is_none_or(|r| r.prefix.is_none() && r.trailers.is_none())
            && self.end.complete()
            && self.inner.is_end_stream()
    }

    /// The backend's frames, with the prefix replayed, the end marker required and the
    /// in-flight count released.
    fn poll_raw(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(p) = this.replay.as_mut().and_then(|r| r.prefix.take()) {
            this.end.feed(&p);
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let interrupted = |backend: &Option<std::sync::Arc<str>>, source: Option<BoxError>| {
            BoxError::from(crate::error::StreamInterrupted {
                backend: backend.clone(),
                source,
            })
        };
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // The answer is over (or broken): no longer in flight.
            this.in_flight.take();
        }
        match frame {
            None => {
                if let Some(t) = this.replay.take().and_then(|r| r.trailers) {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                if !this.end.complete() {
                    // Ended cleanly on the wire but not in the protocol: a truncated answer.
                    this.end.marker = None;
                    return Poll::Ready(Some(Err(interrupted(this.backend, None))));
                }
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(interrupted(this.backend, Some(e.into()))))),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.end.feed(d);
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(code) = crate::classify::grpc::status(t)
                    && let Some(outcome) = crate::classify::grpc::outcome(code, &Default::default())
                    && let Some(guard) = this.in_flight.as_ref()
                {
                    // A gRPC call that failed after its messages: the caller has the answer,
                    // the backend's counters get the failure.
                    guard.state().record_outcome(&outcome);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// Reads up to `limit` bytes of `body` for classification. Returns the bytes read, any trailers
/// met, and whether the body ended.
pub(crate) struct Peek {
    /// The first data frame, kept as it came (no copy) while it is the only one.
    first: Option<Bytes>,
    /// Everything read, once more than one frame was.
    pub(crate) buf: bytes::BytesMut,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) limit: usize,
    pub(crate) done: bool,
    /// Stop early once this says the bytes read are enough.
    pub(crate) enough: Option<fn(&[u8]) -> bool>,
}

impl Peek {
    pub(crate) fn new(limit: usize) -> Self {
        Peek {
            first: None,
            buf: bytes::BytesMut::new(),
            trailers: None,
            limit,
            done: false,
            enough: None,
        }
    }

    /// The bytes read so far.
    pub(crate) fn read(&self) -> &[u8] {
        match &self.first {
            Some(first) => first,
            None => &self.buf,
        }
    }

    /// Takes the bytes read (the first frame itself when it was the only one).
    pub(crate) fn take(&mut self) -> Bytes {
        match self.first.take() {
            Some(first) => first,
            None => std::mem::take(&mut self.buf).freeze(),
        }
    }

    /// Reads until `enough` says so (or the limit, or the end).
    pub(crate) fn until(limit: usize, enough: fn(&[u8]) -> bool) -> Self {
        Peek {
            enough: Some(enough),
            ..Self::new(limit)
        }
    }

    /// Drives `body` until the limit, its end, or an error. Errors end the peek: the error is
    /// left for the caller to meet when it reads the body.
    pub(crate) fn poll_peek<B>(&mut self, cx: &mut Context<'_>, mut body: Pin<&mut B>) -> Poll<()>
    where
        B: Body<Data = Bytes>,
    {
        while !self.done
            && self.read().len() < self.limit
            && !self.enough.is_some_and(|f| f(self.read()))
        {
            match ready!(body.as_mut().poll_frame(cx)) {
                None | Some(Err(_)) => self.done = true,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if self.first.is_none() && self.buf.is_empty() => {
                        self.first = Some(data);
                    }
                    Ok(data) => {
                        if let Some(first) = self.first.take() {
                            self.buf.extend_from_slice(&first);
                        }
                        self.buf.extend_from_slice(&data);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.trailers = Some(t);
                        }
                        self.done = true;
                    }
                },
            }
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tower::{ServiceExt, service_fn};

    #[tokio::test]
    async fn replay_body_clones_replay_from_the_start() {
        let mut a = ReplayBody::from("hello");
        let b = a.clone();
        let first = (&mut a).collect().await.unwrap().to_bytes();
        assert_eq!(first, "hello");
        assert!(a.is_end_stream());
        let c = a.clone();
        assert_eq!(c.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(b.size_hint().exact(), Some(5));
    }

    fn echo_len() -> impl Service<
        Request<ReplayBody>,
        Response = usize,
        Error = BoxError,
        Future = impl Future<Output = Result<usize, BoxError>>,
    > + Clone {
        service_fn(
            |req: Request<ReplayBody>| async move { Ok::<_, BoxError>(req.body().bytes().len()) },
        )
    }

    #[tokio::test]
    async fn buffers_within_the_cap() {
        let svc = BufferRequestLayer::new(10).layer(echo_len());
        let req = Request::new(Full::new(Bytes::from_static(b"0123456789")));
        assert_eq!(svc.oneshot(req).await.unwrap(), 10);
    }

    #[tokio::test]
    async fn refuses_declared_and_streamed_oversize_bodies() {
        let svc = BufferRequestLayer::new(4).layer(echo_len());
        let req = Request::builder()
            .header("content-length", "5")
            .body(Full::new(Bytes::from_static(b"01234")))
            .unwrap();
        let err = svc.clone().oneshot(req).await.unwrap_err();
        assert_eq!(
            err.downcast_ref::<crate::error::TooLarge>(),
            Some(&crate::error::TooLarge { limit: 4 })
        );
        // No declared length: the cap is enforced while reading.
        let chunks = futures_chunks(&[b"012", b"345"]);
        let err = svc.oneshot(Request::new(chunks)).await.unwrap_err();
        assert!(err.is::<crate::error::TooLarge>(), "{err}");
        assert_eq!(err.to_string(), "request body larger than 4 bytes");
    }

    fn futures_chunks(
        chunks: &[&'static [u8]],
    ) -> StreamBody<tokio_stream_shim::Iter<Result<Frame<Bytes>, std::io::Error>>> {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(tokio_stream_shim::Iter(frames.into_iter()))
    }

    mod tokio_stream_shim {
        //! A minimal `Stream` over an iterator, so tests need no extra crate.
        pub(crate) struct Iter<T>(pub(crate) std::vec::IntoIter<T>);
        impl<T> Unpin for Iter<T> {}
        impl<T> futures_core::Stream for Iter<T> {
            type Item = T;
            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<T>> {
                std::task::Poll::Ready(self.0.next())
            }
        }
    }

    #[test]
    fn the_end_marker_is_found_across_chunk_boundaries() {
        for split in 0..=8 {
            let text = b"data: x\n\ndata: [DONE]\n\n";
            let cut = 14 + split.min(6);
            let mut w = EndWatch::new(Some(b"[DONE]"));
            w.feed(&text[..cut]);
            w.feed(&text[cut..]);
            assert!(w.complete(), "split at {cut}");
        }
        let mut w = EndWatch::new(Some(b"[DONE]"));
        for b in b"data: {\"a long chunk of tokens, sent one byte at a time\"}\n\ndata: [DO" {
            w.feed(std::slice::from_ref(b));
        }
        assert!(!w.complete());
        w.feed(b"NE]");
        assert!(w.complete(), "byte by byte");
        let mut w = EndWatch::new(Some(b"message_stop"));
        w.feed(b"event: message_delta\n");
        assert!(!w.complete());
        assert!(EndWatch::new(None).complete());
    }

    #[tokio::test]
    async fn response_body_replays_prefix_then_the_rest() {
        let body = ResponseBody::with_prefix(
            Bytes::from_static(b"{\"error\":"),
            None,
            Full::new(Bytes::from_static(b"{}}")),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{\"error\":{}}");
    }
}
