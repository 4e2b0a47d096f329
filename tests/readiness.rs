//! Readiness through the stack, with `tower-test` mocks as the inner services (their readiness
//! is ours to give): a client that is not ready makes the whole flat stack not ready, and
//! `Balance` sends to a ready backend rather than queue behind a busy one.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::{Balance, BalanceLayer};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::endpoint::{EndpointLayer, Served};
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb::{Backend, BoxError};
use tower_test::mock;

type Client = mock::Mock<Request<ReplayBody>, Response<Full<Bytes>>>;
type Handle = mock::Handle<Request<ReplayBody>, Response<Full<Bytes>>>;

fn backend(name: &str) -> Backend {
    Backend::openai(name, format!("http://{name}.example/v1"))
        .credential(Credential::api_key(&format!("key-{name}")).unwrap())
        .build()
        .unwrap()
}

fn chat() -> Request<ReplayBody> {
    Request::post("/v1/chat/completions")
        .body(ReplayBody::from("{}"))
        .unwrap()
}

fn ok() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(b"{}")))
}

#[tokio::test(start_paused = true)]
async fn a_client_that_is_not_ready_makes_every_layer_of_the_flat_stack_not_ready() {
    let (client, mut handle): (Client, Handle) = mock::pair();
    handle.allow(0);
    let backends = [backend("a"), backend("b")];
    let stack = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends.clone()).unwrap())
        .layer(
            BreakerGroup::try_new(Policy::default())
                .unwrap()
                .layer_for_chosen(&backends),
        )
        .layer(EndpointLayer::for_chosen())
        .layer(AttemptTimeoutLayer {
            first_byte: Some(Duration::from_secs(5)),
            ..Default::default()
        })
        .layer(AuthInjectLayer::for_chosen())
        .service(client);
    let mut svc = mock::Spawn::new(stack);
    assert_pending!(svc.poll_ready());
    // Capacity for one request: the stack is ready, and the task waiting on it was woken.
    handle.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
    let fut = tokio::spawn(svc.call(chat()));
    let (req, reply) = handle.next_request().await.unwrap();
    // The one client got the request routed to the chosen backend, with that backend's key.
    let host = req.uri().host().unwrap().to_string();
    let name = host.trim_end_matches(".example");
    assert_eq!(req.headers()["api-key"], format!("key-{name}").as_str());
    reply.send_response(ok());
    let res = fut.await.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<Served>().unwrap().backend.name(),
        name
    );
    // Used up again: not ready.
    let stack = svc.into_inner();
    let mut svc = mock::Spawn::new(stack);
    assert_pending!(svc.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn balance_sends_to_a_ready_backend_rather_than_queue_behind_a_busy_one() {
    let (a, b) = (backend("a"), backend("b"));
    let (client_a, mut handle_a): (Client, Handle) = mock::pair();
    let (client_b, mut handle_b): (Client, Handle) = mock::pair();
    handle_a.allow(0);
    handle_b.allow(100);
    let stack = |backend: &Backend, client: Client| {
        ServiceBuilder::new()
            .layer(EndpointLayer::new(backend.clone()))
            .layer(AuthInjectLayer::for_backend(backend))
            .service(client)
    };
    let balance = Balance::builder()
        .backend(a.clone(), stack(&a, client_a))
        .backend(b.clone(), stack(&b, client_b))
        .build()
        .unwrap();
    let responder = tokio::spawn(async move {
        let mut n = 0;
        while let Some((req, reply)) = handle_b.next_request().await {
            assert_eq!(req.uri().host(), Some("b.example"));
            reply.send_response(ok());
            n += 1;
        }
        n
    });
    for _ in 0..20 {
        let res = balance.clone().oneshot(chat()).await.unwrap();
        assert_eq!(
            res.extensions().get::<Served>().unwrap().backend.name(),
            "b"
        );
    }
    // `a` never got one: every pick of it found it busy and took `b` instead.
    let none = tokio::time::timeout(Duration::from_secs(1), handle_a.next_request()).await;
    assert!(none.is_err(), "a got a request while busy");
    drop(balance);
    assert_eq!(responder.await.unwrap(), 20);
}

#[tokio::test(start_paused = true)]
async fn with_every_backend_busy_a_request_waits_for_the_first_that_frees_and_is_not_lost() {
    let a = backend("a");
    let (client, mut handle): (Client, Handle) = mock::pair();
    handle.allow(0);
    let balance = Balance::builder()
        .backend(
            a.clone(),
            ServiceBuilder::new()
                .layer(EndpointLayer::new(a.clone()))
                .service(client),
        )
        .build()
        .unwrap();
    let call = tokio::spawn(balance.clone().oneshot(chat()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!call.is_finished(), "waits while the backend is busy");
    handle.allow(1);
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(ok());
    let res: Result<_, BoxError> = call.await.unwrap();
    assert_eq!(res.unwrap().status(), 200);
}
