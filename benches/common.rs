//! A minimal hyper server on loopback (the fastest possible backend), and the bare and stacked
//! requests the benches send to it.

#![allow(dead_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;
use tower_llm_lb::Backend;
use tower_llm_lb::auth::Credential;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::fallback::Fallback;
use tower_llm_lb::stack::{self, LlmService, Settings};

/// The bare hyper-util client.
pub type Bare = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ReplayBody,
>;

const REQ_BODY: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

/// Three Azure-shaped backends at `addr`, one key.
fn backends(addr: SocketAddr) -> Vec<Backend> {
    (0..3)
        .map(|i| {
            Backend::azure(
                format!("b{i}"),
                format!("http://{addr}"),
                "gpt-4o",
                "2024-10-21",
            )
            .credential(Credential::api_key("bench-key").unwrap())
            .build()
            .unwrap()
        })
        .collect()
}

/// The recommended group (`stack::group`) over 3 backends at `addr`, through `client`.
pub fn group_over(addr: SocketAddr, client: Bare) -> LlmService {
    stack::group("bench", backends(addr), client, &Settings::default()).unwrap()
}

/// The full stack: a `Fallback` chain over [`group_over`].
pub fn stack_over(addr: SocketAddr, client: Bare) -> LlmService {
    let chain = Fallback::builder("chain")
        .target("group", group_over(addr, client))
        .build()
        .unwrap();
    LlmService::new(chain)
}

/// The flat stack of the README's first example over 3 backends at `addr`, unboxed:
/// `RetryAfter429Layer` → `BalanceLayer` → breaker → `EndpointLayer::for_chosen` →
/// `AuthInjectLayer::for_chosen` → `client`.
pub fn flat_over(
    addr: SocketAddr,
    client: Bare,
) -> impl tower::Service<
    http::Request<ReplayBody>,
    Response = http::Response<impl http_body::Body<Data = Bytes, Error = tower_llm_lb::BoxError>>,
    Error = tower_llm_lb::BoxError,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    use tower_llm_lb::auth::AuthInjectLayer;
    use tower_llm_lb::balance::BalanceLayer;
    use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
    use tower_llm_lb::endpoint::EndpointLayer;
    use tower_llm_lb::retry::RetryAfter429Layer;
    let backends = backends(addr);
    tower::ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends.clone()).unwrap())
        .layer(
            BreakerGroup::try_new(Policy::default())
                .unwrap()
                .layer_for_chosen(&backends),
        )
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(client)
}

/// One request through any stack, as a caller writes it.
pub async fn one_through<S, B>(svc: &S)
where
    S: tower::Service<http::Request<ReplayBody>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let req = http::Request::post("/v1/chat/completions")
        .body(ReplayBody::from(REQ_BODY))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
}

/// One request through a stack held by one owner (driven ready, then called: no clone per
/// request), as the bare client is called.
pub async fn one_owned<S, B>(svc: &mut S)
where
    S: tower::Service<http::Request<ReplayBody>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let req = http::Request::post("/v1/chat/completions")
        .body(ReplayBody::from(REQ_BODY))
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
}

/// One request through the bare client, with the Azure path and key already in it.
pub async fn one_bare(client: &Bare, addr: SocketAddr) {
    let req = http::Request::post(format!(
        "http://{addr}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    ))
    .header("api-key", "bench-key")
    .body(ReplayBody::from(REQ_BODY))
    .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
}

/// One request through a stack, as a caller writes it.
pub async fn one_stack(svc: &LlmService) {
    let req = http::Request::post("/v1/chat/completions")
        .body(ReplayBody::from(REQ_BODY))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
}

const BODY: &[u8] = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}"#;

/// Starts a server that answers every request 200 with a small JSON body; returns its address.
pub async fn minimal_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(BODY)))
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
