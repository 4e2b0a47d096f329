//! Calling a service once it is ready, without keeping a copy of it and the request around when
//! it already is.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tower::ServiceExt;
use tower::util::Oneshot;
use tower_service::Service;

use crate::error::BoxError;

pin_project! {
    /// Like [`Oneshot`], but a service that is ready at once (every layer of this crate, and
    /// hyper's client, when not at a limit) is called straight away, so the future holds only
    /// the service's own future: no copy of the service and the request moves with it. A
    /// service that is not ready goes through a boxed `Oneshot`, which polls readiness again
    /// with the task's waker.
    #[project = ReadyCallProj]
    pub(crate) enum ReadyCall<S: Service<R>, R> {
        Called { #[pin] fut: S::Future },
        Waiting { fut: Pin<Box<Oneshot<S, R>>> },
        Failed { error: Option<BoxError> },
    }
}

/// What asking a service once for readiness, without a task, gave.
pub(crate) enum Asked<S: Service<R>, R> {
    /// It was ready and is called.
    Called(S::Future),
    /// Its readiness failed.
    Failed(BoxError),
    /// Not ready yet: the service and the request, for a `Oneshot`.
    NotReady(S, R),
}

/// Asks `svc` once whether it is ready and calls it if so. Asking without a task is safe: a
/// service that is not ready is asked again by `Oneshot`, which registers the real waker.
#[inline]
pub(crate) fn call_if_ready<S: Service<R>, R>(mut svc: S, req: R) -> Asked<S, R>
where
    S::Error: Into<BoxError>,
{
    match svc.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Asked::Called(svc.call(req)),
        Poll::Ready(Err(e)) => Asked::Failed(e.into()),
        Poll::Pending => Asked::NotReady(svc, req),
    }
}

impl<S: Service<R>, R> ReadyCall<S, R>
where
    S::Error: Into<BoxError>,
{
    #[inline]
    pub(crate) fn new(svc: S, req: R) -> Self {
        Self::from_asked(call_if_ready(svc, req))
    }

    #[inline]
    pub(crate) fn from_asked(asked: Asked<S, R>) -> Self {
        match asked {
            Asked::Called(fut) => ReadyCall::Called { fut },
            Asked::Failed(e) => ReadyCall::Failed { error: Some(e) },
            Asked::NotReady(svc, req) => ReadyCall::Waiting {
                fut: Box::pin(svc.oneshot(req)),
            },
        }
    }
}

impl<S: Service<R>, R> Future for ReadyCall<S, R>
where
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ReadyCallProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            ReadyCallProj::Waiting { fut } => fut.as_mut().poll(cx).map_err(Into::into),
            ReadyCallProj::Failed { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Ready only on the second ask, as a service at a limit would be once a slot frees.
    #[derive(Clone)]
    struct Busy(Arc<AtomicUsize>);

    impl Service<u32> for Busy {
        type Response = u32;
        type Error = &'static str;
        type Future = std::future::Ready<Result<u32, &'static str>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: u32) -> Self::Future {
            std::future::ready(Ok(req * 2))
        }
    }

    #[tokio::test]
    async fn a_ready_service_is_called_at_once_and_a_busy_one_when_ready() {
        let ready = tower::service_fn(|x: u32| async move { Ok::<_, &'static str>(x + 1) });
        let call = ReadyCall::new(ready, 1);
        assert!(matches!(call, ReadyCall::Called { .. }));
        assert_eq!(call.await.unwrap(), 2);

        let asks = Arc::new(AtomicUsize::new(0));
        let call = ReadyCall::new(Busy(asks.clone()), 21);
        assert!(matches!(call, ReadyCall::Waiting { .. }));
        assert_eq!(call.await.unwrap(), 42);
        assert_eq!(asks.load(Ordering::SeqCst), 2);
    }
}
