//! [`BoxTarget`]: a whole stack behind one type, cloned by reference count.
//!
//! tower's `BoxCloneSyncService` allocates on every clone (it clones the boxed service into a
//! new box), and a service is cloned for every request (`svc.clone().oneshot(req)`, and again by
//! a `Fallback` for each target it tries). `BoxTarget` shares one boxed service behind an `Arc`:
//! a clone is a reference-count increment, and each call clones the service inside (for the
//! stacks of this crate, a few reference counts) and drives its readiness within the returned
//! future, so `poll_ready` is always ready.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::body::ReplayBody;
use crate::error::BoxError;
use crate::ready::ReadyCall;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project_lite::pin_project! {
    /// A future whose error is turned into a [`BoxError`].
    struct ErrInto<F> {
        #[pin]
        fut: F,
    }
}

impl<F, T, E> Future for ErrInto<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().fut.poll(cx).map_err(Into::into)
    }
}

trait Erased<ResB>: Send + Sync {
    fn call(&self, req: Request<ReplayBody>) -> BoxFuture<Result<Response<ResB>, BoxError>>;
}

struct Holder<S>(S);

impl<S, ResB> Erased<ResB> for Holder<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn call(&self, req: Request<ReplayBody>) -> BoxFuture<Result<Response<ResB>, BoxError>> {
        let mut svc = self.0.clone();
        // Ready at once (the common case): box the service's own future, nothing around it.
        match svc.poll_ready(&mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(Ok(())) => Box::pin(ErrInto { fut: svc.call(req) }),
            Poll::Ready(Err(e)) => Box::pin(ReadyCall::<S, _>::failed(e.into())),
            Poll::Pending => Box::pin(ReadyCall::new(svc, req)),
        }
    }
}

/// A type-erased, cloneable, shareable service over replayable requests: what a fallback target,
/// a balanced group of mixed members, or a whole stack is boxed into. See the
/// [module docs](self).
pub struct BoxTarget<ResB> {
    inner: Arc<dyn Erased<ResB>>,
}

impl<ResB: 'static> BoxTarget<ResB> {
    /// Boxes `service`. Its readiness is driven inside each call's future.
    pub fn new<S>(service: S) -> Self
    where
        S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        BoxTarget {
            inner: Arc::new(Holder(service)),
        }
    }
}

impl<ResB> Clone for BoxTarget<ResB> {
    fn clone(&self) -> Self {
        BoxTarget {
            inner: self.inner.clone(),
        }
    }
}

impl<ResB> fmt::Debug for BoxTarget<ResB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxTarget")
    }
}

impl<ResB> Service<Request<ReplayBody>> for BoxTarget<ResB> {
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ResB>, BoxError>>;

    /// Always ready: the boxed service's readiness is driven inside each call.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn clones_share_one_service_and_each_call_gets_its_own_copy() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let svc = BoxTarget::new(tower::service_fn(move |req: Request<ReplayBody>| {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, BoxError>(Response::new((n, req.body().len()))) }
        }));
        let a = svc
            .clone()
            .oneshot(Request::new(ReplayBody::from("ab")))
            .await
            .unwrap();
        let b = svc
            .oneshot(Request::new(ReplayBody::from("abc")))
            .await
            .unwrap();
        assert_eq!((*a.body(), *b.body()), ((0, 2), (1, 3)));
    }
}
