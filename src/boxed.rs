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
use crate::ready::{Asked, ReadyCall, call_if_ready};

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
        // Ready at once (the common case): box the service's own future, nothing around it.
        match call_if_ready(self.0.clone(), req) {
            Asked::Called(fut) => Box::pin(ErrInto { fut }),
            asked => Box::pin(ReadyCall::from_asked(asked)),
        }
    }
}

/// A type-erased, cloneable, shareable service over replayable requests: what a fallback target,
/// a balanced group of mixed members, or a whole stack is boxed into. It drives its service's
/// readiness itself (`poll_ready` always answers ready), so clones share one service without
/// `Buffer`.
pub struct BoxTarget<ResB> {
    inner: Arc<dyn Erased<ResB>>,
}

impl<ResB: 'static> BoxTarget<ResB> {
    /// Boxes `service`. Its readiness is driven inside each call's future. A service that is
    /// already a `BoxTarget` (a `stack::group`, a boxed chain) is returned as it is, not boxed
    /// again.
    pub fn new<S>(service: S) -> Self
    where
        S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let mut slot = Some(service);
        if let Some(boxed) = (&mut slot as &mut dyn std::any::Any)
            .downcast_mut::<Option<Self>>()
            .and_then(Option::take)
        {
            return boxed;
        }
        BoxTarget {
            inner: match slot {
                Some(service) => Arc::new(Holder(service)),
                // The slot is only emptied when it held a `BoxTarget`, returned above.
                None => unreachable!("the service was taken only if it was a BoxTarget"),
            },
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
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;
    use tower::ServiceExt;

    /// Answers with the request's body length and counts its own clones.
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, SeqCst);
            Counted(self.0.clone())
        }
    }

    impl Service<Request<ReplayBody>> for Counted {
        type Response = Response<usize>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<usize>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
            std::future::ready(Ok(Response::new(req.body().bytes().len())))
        }
    }

    #[tokio::test]
    async fn a_clone_shares_the_boxed_service_and_only_a_call_copies_it() {
        let clones = Arc::new(AtomicUsize::new(0));
        let svc = BoxTarget::new(Counted(clones.clone()));
        let copies: Vec<_> = (0..10).map(|_| svc.clone()).collect();
        assert_eq!(clones.load(SeqCst), 0, "cloning the box copies nothing");
        let res = copies[3]
            .clone()
            .oneshot(Request::new(ReplayBody::from("abc")))
            .await
            .unwrap();
        assert_eq!(*res.body(), 3);
        assert_eq!(clones.load(SeqCst), 1, "one copy per call");
    }

    #[test]
    fn boxing_a_box_returns_it_as_it_is() {
        let svc = BoxTarget::new(Counted(Arc::default()));
        let again = BoxTarget::new(svc.clone());
        assert!(Arc::ptr_eq(&svc.inner, &again.inner));
    }
}
