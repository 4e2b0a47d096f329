//! A loopback mock gRPC server (feature `grpc`): a real tonic server on `127.0.0.1` that
//! throttles and fails like a quota-limited gRPC backend.
//!
//! It serves gRPC's standard health service (`grpc.health.v1.Health`, from `tonic-health`), so
//! any tonic client generated for it (`tonic_health::pb::health_client::HealthClient`) calls it
//! (and [`ProbeProtocol::Grpc`](tower_llm_lb::circuit_breaker::ProbeProtocol::Grpc) probes it; switch it
//! with [`GrpcMock::set_serving`]), and a tower layer in front of it applies, in order:
//!
//! - **Auth** (with [`GrpcMockBuilder::bearer`]): `authorization: Bearer {token}` must be there,
//!   else `UNAUTHENTICATED`; any other credential header is counted in
//!   [`GrpcCounters::foreign_credentials`].
//! - **Faults** ([`GrpcFault`]), switchable at run time: a status for everything
//!   (`UNAVAILABLE`, ...), or a hang.
//! - **A quota** ([`GrpcMockBuilder::rps`]): calls per whole second; past it
//!   `RESOURCE_EXHAUSTED` in a trailers-only answer with `grpc-retry-pushback-ms` until the next
//!   second. A call that arrives before an earlier pushback ended is counted in
//!   [`GrpcCounters::during_pushback`].
//!
//! Every answer carries `x-mock-server: {name}`. The server stops when the [`GrpcMock`] is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use tower_llm_lb::error::BoxError;

/// What a [`GrpcMock`] does to every call, instead of serving it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum GrpcFault {
    /// Answer with this gRPC status code (e.g. `14` UNAVAILABLE), trailers-only.
    Status(i32),
    /// Never answer.
    Hang,
    /// Serve the call (its message goes out), then end it with this status code in the
    /// trailers instead of `OK`: a failure that shows only after the answer's head.
    AfterMessages(i32),
}

/// What a [`GrpcMock`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcCounters {
    /// Calls received.
    pub requests: u64,
    /// Calls served.
    pub ok: u64,
    /// Calls answered `RESOURCE_EXHAUSTED`.
    pub throttled: u64,
    /// Calls answered `UNAUTHENTICATED`.
    pub unauthenticated: u64,
    /// Calls answered with a fault's status.
    pub errors: u64,
    /// Calls that carried a credential header other than the expected one.
    pub foreign_credentials: u64,
    /// Calls that arrived before an earlier `grpc-retry-pushback-ms` had run out.
    pub during_pushback: u64,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    ok: AtomicU64,
    throttled: AtomicU64,
    unauthenticated: AtomicU64,
    errors: AtomicU64,
    foreign: AtomicU64,
    during_pushback: AtomicU64,
}

struct Shared {
    name: HeaderValue,
    bearer: Option<String>,
    rps: Option<u32>,
    fault: Mutex<Option<GrpcFault>>,
    /// The current second's start and the calls served in it.
    window: Mutex<(Instant, u32)>,
    /// The end of the latest pushback sent.
    pushback_until: Mutex<Option<Instant>>,
    counts: Counts,
}

/// Builds a [`GrpcMock`].
#[derive(Debug, Default)]
#[must_use]
pub struct GrpcMockBuilder {
    name: String,
    bearer: Option<String>,
    rps: Option<u32>,
}

impl GrpcMockBuilder {
    /// Names the server (in `x-mock-server`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Requires `authorization: Bearer {token}`.
    pub fn bearer(mut self, token: impl Into<String>) -> Self {
        self.bearer = Some(token.into());
        self
    }

    /// Serves at most `rps` calls per whole second (tokio's clock).
    pub fn rps(mut self, rps: u32) -> Self {
        self.rps = Some(rps);
        self
    }

    /// Starts the server on a free loopback port.
    pub async fn start(self) -> Result<GrpcMock, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let name = if self.name.is_empty() {
            "grpc-mock".to_string()
        } else {
            self.name
        };
        let shared = Arc::new(Shared {
            name: HeaderValue::try_from(name)?,
            bearer: self.bearer,
            rps: self.rps,
            fault: Mutex::new(None),
            window: Mutex::new((Instant::now(), 0)),
            pushback_until: Mutex::new(None),
            counts: Counts::default(),
        });
        let (reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let layer = GateLayer(shared.clone());
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .layer(layer)
                .add_service(health)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "grpc mock stopped");
            }
        });
        Ok(GrpcMock {
            addr,
            shared,
            reporter,
            _stop: stop,
        })
    }
}

/// A running mock gRPC server. See the [module docs](self).
pub struct GrpcMock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    reporter: tonic_health::server::HealthReporter,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for GrpcMock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcMock")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl GrpcMock {
    /// A builder.
    pub fn builder() -> GrpcMockBuilder {
        GrpcMockBuilder::default()
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets (or with `None` clears) the fault applied to every call.
    pub fn set_fault(&self, fault: Option<GrpcFault>) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// What the health service says about the whole server (`""`): `SERVING` (the start) or
    /// `NOT_SERVING`.
    pub async fn set_serving(&self, serving: bool) {
        use tonic_health::ServingStatus;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }

    /// What the server saw so far.
    pub fn counters(&self) -> GrpcCounters {
        let c = &self.shared.counts;
        GrpcCounters {
            requests: c.requests.load(Relaxed),
            ok: c.ok.load(Relaxed),
            throttled: c.throttled.load(Relaxed),
            unauthenticated: c.unauthenticated.load(Relaxed),
            errors: c.errors.load(Relaxed),
            foreign_credentials: c.foreign.load(Relaxed),
            during_pushback: c.during_pushback.load(Relaxed),
        }
    }
}

#[derive(Clone)]
struct GateLayer(Arc<Shared>);

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            shared: self.0.clone(),
            inner,
        }
    }
}

/// The auth, fault and quota checks in front of the real services.
#[derive(Clone)]
struct Gate<S> {
    shared: Arc<Shared>,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for Gate<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let sh = self.shared.clone();
        let name = sh.name.clone();
        let stamp = move |mut res: Response<Body>| {
            res.headers_mut().insert("x-mock-server", name.clone());
            res
        };
        match sh.admit(&req) {
            Err(Refusal::Hang) => Box::pin(std::future::pending()),
            Err(Refusal::Status(status, pushback)) => {
                let mut res = status.into_http::<Body>();
                if let Some(ms) = pushback {
                    res.headers_mut()
                        .insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
                }
                let res = stamp(res);
                Box::pin(async move { Ok(res) })
            }
            Ok(trailer_code) => {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    let res = inner.call(req).await?;
                    let Some(code) = trailer_code else {
                        sh.counts.ok.fetch_add(1, Relaxed);
                        return Ok(stamp(res));
                    };
                    // The messages as served, then this status in the trailers.
                    use http_body_util::BodyExt;
                    let res = res.map(|body| {
                        Body::new(body.map_frame(move |frame| match frame.into_trailers() {
                            Ok(mut t) => {
                                t.insert("grpc-status", HeaderValue::from(code));
                                t.insert("grpc-message", HeaderValue::from_static("mock%20fault"));
                                http_body::Frame::trailers(t)
                            }
                            Err(data) => data,
                        }))
                    });
                    Ok(stamp(res))
                })
            }
        }
    }
}

enum Refusal {
    Hang,
    /// A status, with a pushback in milliseconds.
    Status(tonic::Status, Option<u64>),
}

impl Shared {
    /// Whether the call is served; `Some(code)`: served, ending with `code` in its trailers.
    fn admit(&self, req: &Request<Body>) -> Result<Option<i32>, Refusal> {
        let c = &self.counts;
        c.requests.fetch_add(1, Relaxed);
        let now = Instant::now();
        if self
            .pushback_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until)
        {
            c.during_pushback.fetch_add(1, Relaxed);
        }
        let headers = req.headers();
        let expected = self.bearer.as_ref().map(|t| format!("Bearer {t}"));
        for h in crate::CREDENTIAL_HEADERS {
            for v in headers.get_all(h) {
                let ours = h == "authorization" && expected.as_deref() == v.to_str().ok();
                if !ours {
                    c.foreign.fetch_add(1, Relaxed);
                }
            }
        }
        if let Some(expected) = &expected
            && headers
                .get("authorization")
                .is_none_or(|v| v.to_str().ok() != Some(expected.as_str()))
        {
            c.unauthenticated.fetch_add(1, Relaxed);
            return Err(Refusal::Status(
                tonic::Status::unauthenticated("missing or wrong bearer token"),
                None,
            ));
        }
        let fault = self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match fault {
            Some(GrpcFault::Hang) => return Err(Refusal::Hang),
            Some(GrpcFault::Status(code)) => {
                c.errors.fetch_add(1, Relaxed);
                return Err(Refusal::Status(
                    tonic::Status::new(tonic::Code::from_i32(code), "mock fault"),
                    None,
                ));
            }
            Some(GrpcFault::AfterMessages(code)) => {
                c.errors.fetch_add(1, Relaxed);
                return Ok(Some(code));
            }
            None => {}
        }
        if let Some(rps) = self.rps {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            let second = Duration::from_secs(1);
            while now >= w.0 + second {
                *w = (w.0 + second, 0);
            }
            if w.1 >= rps {
                let until = w.0 + second;
                let ms = (until - now).as_millis().max(1) as u64;
                *self
                    .pushback_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(until);
                c.throttled.fetch_add(1, Relaxed);
                return Err(Refusal::Status(
                    tonic::Status::resource_exhausted("quota exceeded"),
                    Some(ms),
                ));
            }
            w.1 += 1;
        }
        Ok(None)
    }
}
