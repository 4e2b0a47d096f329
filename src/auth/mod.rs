//! `AuthInject`: each backend's own credential on each request, and nobody else's.
//!
//! For every request, [`AuthInject`] first removes every credential header the caller sent
//! (`authorization`, `proxy-authorization`, `api-key`,
//! `x-api-key`, `ocp-apim-subscription-key`, `cookie`), then inserts the backend's
//! [`Credential`], marked sensitive. So a caller's key never reaches a backend, and backend A's key
//! never reaches backend B: each backend's stack has its own `AuthInject`.
//!
//! | outcome | what `AuthInject` does |
//! |---|---|
//! | static credential | inserts it and calls the inner service; no extra allocation or await |
//! | token credential, token fresh | inserts the cached token (a lock-free load) |
//! | token due for refresh | one request refreshes, the rest use the still-valid token ([`TokenCache`]) |
//! | no valid token, source failing | answers [`error::TokenUnavailable`] without calling the inner service |
//! | any response or inner error | passes it through untouched |
//! | a backend's credential ([`AuthInjectLayer::for_backend`]) on a request for another backend | answers [`CredentialMisplaced`](crate::error::CredentialMisplaced) without sending (checked here when the request is already routed, else by the `Endpoint` below that routes it) |
//! | [`AuthInjectLayer::for_chosen`] with no `BalanceLayer` above | answers [`error::NoBackendChosen`] without sending |
//!
//! Credentials never appear in `Debug` output, logs or errors.
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_lb::auth::{AuthInjectLayer, Credential};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(AuthInjectLayer::new(Credential::api_key("backend-key")?))
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         // The backend sees its own key, and not the caller's bearer token.
//!         assert_eq!(req.headers()["api-key"], "backend-key");
//!         assert!(req.headers().get("authorization").is_none());
//!         Ok::<_, std::convert::Infallible>(http::Response::new(()))
//!     }));
//! let req = http::Request::builder()
//!     .header("authorization", "Bearer the-callers-own-key")
//!     .body(())?;
//! svc.oneshot(req).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{AUTHORIZATION, COOKIE, HeaderName, PROXY_AUTHORIZATION};
use http::{HeaderValue, Request};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use crate::credential::{BoxFuture, Credential, Token, TokenCache, TokenSource, redact};

use crate::attempt::InjectedFor;
use crate::credential::Kind;
use crate::error::{self, BoxError};

/// The headers removed from every request before the backend's credential is inserted.
static CALLER_CREDENTIAL_HEADERS: [HeaderName; 6] = [
    AUTHORIZATION,
    PROXY_AUTHORIZATION,
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("ocp-apim-subscription-key"),
    COOKIE,
];

/// Removes the caller's credentials from `headers`.
pub(crate) fn strip_caller_credentials(headers: &mut http::HeaderMap) {
    // One pass over the names present (usually a handful) instead of six hashed lookups.
    let mut found = [false; CALLER_CREDENTIAL_HEADERS.len()];
    for name in headers.keys() {
        if let Some(i) = CALLER_CREDENTIAL_HEADERS.iter().position(|c| c == name) {
            found[i] = true;
        }
    }
    for (name, _) in CALLER_CREDENTIAL_HEADERS
        .iter()
        .zip(found)
        .filter(|(_, found)| *found)
    {
        headers.remove(name);
    }
}

/// Layer that wraps a service in [`AuthInject`].
#[derive(Clone, Debug)]
pub struct AuthInjectLayer {
    credential: Source,
}

/// Whose credential an [`AuthInject`] injects.
#[derive(Clone, Debug)]
enum Source {
    /// This one (`None`: strip only).
    Fixed(Option<Credential>),
    /// The chosen backend's ([`Chosen`](crate::balance::Chosen)).
    Chosen,
    /// One backend's: sent only to that backend's authority. Shared: the layer is cloned for
    /// every request, and one reference count is cheaper than the three inside.
    Owned(Arc<Owned>),
}

/// A credential that belongs to one backend, and where it may go.
#[derive(Clone, Debug)]
struct Owned {
    backend: Arc<str>,
    authority: http::uri::Authority,
    credential: Credential,
}

impl AuthInjectLayer {
    /// Injects `credential` into every request.
    pub fn new(credential: Credential) -> Self {
        AuthInjectLayer {
            credential: Source::Fixed(Some(credential)),
        }
    }

    /// The backend's credential, or strip-only if it has none.
    ///
    /// The credential goes only to that backend: placed where the request is already routed
    /// (below its `Endpoint`), a request for another authority is refused with
    /// [`CredentialMisplaced`](crate::error::CredentialMisplaced) without sending; placed above
    /// the routing (above a `Balance`, say), the request is marked, and the `Endpoint` that
    /// would send it to another backend refuses it the same way. One backend's key never
    /// reaches another.
    pub fn for_backend(backend: &crate::Backend) -> Self {
        AuthInjectLayer {
            credential: match backend.credential() {
                None => Source::Fixed(None),
                Some(c) => Source::Owned(Arc::new(Owned {
                    backend: backend.name_arc().clone(),
                    authority: backend.authority().clone(),
                    credential: c.clone(),
                })),
            },
        }
    }

    /// The credential of the backend a [`BalanceLayer`](crate::balance::BalanceLayer) above
    /// chose for each request (strip-only for a backend without one): one `AuthInject` serves
    /// every backend of the group, and each backend still gets only its own key. A request
    /// nobody marked is refused with [`error::NoBackendChosen`], without sending: it has no
    /// key to get, and a caller's is never passed on.
    pub fn for_chosen() -> Self {
        AuthInjectLayer {
            credential: Source::Chosen,
        }
    }
}

impl<S> Layer<S> for AuthInjectLayer {
    type Service = AuthInject<S>;

    fn layer(&self, inner: S) -> AuthInject<S> {
        AuthInject {
            inner,
            credential: self.credential.clone(),
        }
    }
}

/// Middleware that replaces the caller's credentials with a backend's own. See the
/// [module docs](self).
#[derive(Clone)]
pub struct AuthInject<S> {
    inner: S,
    credential: Source,
}

impl<S: fmt::Debug> fmt::Debug for AuthInject<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthInject")
            .field("inner", &self.inner)
            .field("credential", &self.credential)
            .finish()
    }
}

impl<S, B> Service<Request<B>> for AuthInject<S>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        strip_caller_credentials(req.headers_mut());
        let chosen;
        let credential = match &self.credential {
            Source::Fixed(c) => c.as_ref(),
            Source::Chosen => {
                chosen = match req.extensions().get::<crate::attempt::Chosen>() {
                    Some(c) => c.backend().clone(),
                    None => return ResponseFuture::failed(error::NoBackendChosen.into()),
                };
                chosen.credential()
            }
            Source::Owned(owned) => {
                match req.uri().authority() {
                    Some(a) if !same_authority(a, &owned.authority) => {
                        return ResponseFuture::failed(
                            crate::error::CredentialMisplaced::new(
                                owned.backend.clone(),
                                a.as_str(),
                            )
                            .into(),
                        );
                    }
                    Some(_) => {}
                    // Not routed yet: the `Endpoint` below checks where it goes.
                    None => {
                        req.extensions_mut().insert(InjectedFor {
                            backend: owned.backend.clone(),
                            authority: owned.authority.clone(),
                        });
                    }
                }
                Some(&owned.credential)
            }
        };
        let cache = match credential {
            None => return ResponseFuture::direct(self.inner.call(req)),
            Some(Credential(Kind::Header(name, secret))) => {
                req.headers_mut()
                    .insert(name.clone(), secret.header_value().clone());
                return ResponseFuture::direct(self.inner.call(req));
            }
            Some(Credential(Kind::Token(cache))) => cache,
        };
        if let Some(value) = cache.fresh(tokio::time::Instant::now()) {
            req.headers_mut().insert(AUTHORIZATION, value);
            return ResponseFuture::direct(self.inner.call(req));
        }
        // Slow path: wait for a token. Take the service that was driven ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let cache = cache.clone();
        ResponseFuture {
            state: State::Token {
                token: Box::pin(async move { cache.get().await }),
                pending: Some(Box::new((inner, req))),
            },
        }
    }
}

type TokenFuture = BoxFuture<'static, Result<HeaderValue, error::TokenUnavailable>>;

pin_project! {
    /// Response future of [`AuthInject`].
    pub struct ResponseFuture<S: Service<R>, R> {
        #[pin]
        state: State<S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<R>, R> {
        // Boxed: the slow path must not make every request's future larger.
        Token { token: TokenFuture, pending: Option<Box<(S, R)>> },
        Call { #[pin] fut: S::Future },
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<R>, R> ResponseFuture<S, R> {
    fn direct(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Call { fut },
        }
    }

    fn failed(error: BoxError) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<S, B> Future for ResponseFuture<S, Request<B>>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Call { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "polled after completion".into())));
                }
                StateProj::Token { token, pending } => {
                    let value = ready!(token.as_mut().poll(cx))?;
                    let Some(pending) = pending.take() else {
                        return Poll::Ready(Err("polled after completion".into()));
                    };
                    let (mut inner, mut req) = *pending;
                    req.headers_mut().insert(AUTHORIZATION, value);
                    let fut = inner.call(req);
                    this.state.set(State::Call { fut });
                }
            }
        }
    }
}

impl<S: Service<R>, R> fmt::Debug for ResponseFuture<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("auth::ResponseFuture")
    }
}

/// `a == b` (case-insensitive, as `Authority` compares), answered at once when both share one
/// buffer: the `Endpoint` above routes each request with a clone of its backend's authority,
/// so the per-request check costs a pointer comparison, not a byte-by-byte one (~280
/// instructions a request).
#[inline]
fn same_authority(a: &http::uri::Authority, b: &http::uri::Authority) -> bool {
    let (x, y) = (a.as_str(), b.as_str());
    (x.as_ptr() == y.as_ptr() && x.len() == y.len()) || a == b
}
