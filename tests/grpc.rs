//! The layers under a tonic client: a generated client (`tonic-health`'s `HealthClient`) calls
//! three real tonic servers on loopback through the flat stack over one HTTP/2 client. The
//! servers throttle (`RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`), fail (`UNAVAILABLE`)
//! and reject bad input (`INVALID_ARGUMENT`); each backend gets its own bearer token.

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_llm_lb::Circuit;
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::BalanceLayer;
use tower_llm_lb::body::{BufferRequestLayer, ReplayBody};
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::client::grpc_client;
use tower_llm_lb::endpoint::EndpointLayer;
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::grpc::{GrpcFault, GrpcMock};

async fn servers(rps: [u32; 3]) -> (Vec<GrpcMock>, Vec<Backend>) {
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for (name, rps) in ["a", "b", "c"].into_iter().zip(rps) {
        let m = GrpcMock::builder()
            .name(name)
            .bearer(format!("tok-{name}"))
            .rps(rps)
            .start()
            .await
            .unwrap();
        backends.push(
            Backend::grpc(name, m.url())
                .credential(Credential::bearer(&format!("tok-{name}")).unwrap())
                .build()
                .unwrap(),
        );
        mocks.push(m);
    }
    (mocks, backends)
}

/// The flat stack, under a generated tonic client.
fn client(
    backends: &[Backend],
) -> HealthClient<
    impl tonic::client::GrpcService<
        tonic::body::Body,
        Error = BoxError,
        ResponseBody = impl http_body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
> {
    let stack = ServiceBuilder::new()
        // tonic's request body becomes a cheap-to-replay one (unary and bounded streams only).
        .layer(BufferRequestLayer::new(1 << 20))
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends.to_vec()).unwrap())
        .layer(
            BreakerGroup::try_new(Policy::default())
                .unwrap()
                .layer_for_chosen(backends),
        )
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(grpc_client::<ReplayBody>());
    HealthClient::new(stack)
}

async fn check<T>(client: &mut HealthClient<T>) -> Result<String, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let res = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    let server = res
        .metadata()
        .get("x-mock-server")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    assert_eq!(res.get_ref().status, 1, "SERVING");
    Ok(server)
}

#[tokio::test(start_paused = true)]
async fn a_throttling_grpc_server_is_paced_around_and_never_called_during_its_pushback() {
    let (mocks, backends) = servers([2, 50, 50]).await;
    let mut client = client(&backends);
    let mut by = std::collections::HashMap::<String, u32>::new();
    for _ in 0..40 {
        let server = check(&mut client).await.unwrap();
        *by.entry(server).or_default() += 1;
    }
    assert_eq!(by.values().sum::<u32>(), 40, "{by:?}");
    for m in &mocks {
        let c = m.counters();
        assert_eq!(c.during_pushback, 0, "{c:?}");
        assert_eq!(
            c.foreign_credentials, 0,
            "each server got its own token only"
        );
        assert_eq!(c.unauthenticated, 0);
    }
    assert!(mocks[0].counters().ok <= 10, "a served at most its quota");
    eprintln!("served by {by:?}; a saw {:?}", mocks[0].counters());
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_grpc_server_is_failed_over_and_its_circuit_opens() {
    let (mocks, backends) = servers([100, 100, 100]).await;
    mocks[0].set_fault(Some(GrpcFault::Status(14)));
    let mut client = client(&backends);
    for _ in 0..40 {
        let server = check(&mut client).await.unwrap();
        assert_ne!(server, "a");
    }
    assert!(matches!(
        backends[0].state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    assert!(
        mocks[0].counters().requests <= 6,
        "{:?}",
        mocks[0].counters()
    );
}

#[tokio::test(start_paused = true)]
async fn a_grpc_client_error_is_the_caller_s_and_never_retried() {
    let (mocks, backends) = servers([100, 100, 100]).await;
    for m in &mocks {
        m.set_fault(Some(GrpcFault::Status(3)));
    }
    let mut client = client(&backends);
    let status = check(&mut client).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let sent: u64 = mocks.iter().map(|m| m.counters().requests).sum();
    assert_eq!(sent, 1);
}

#[tokio::test(start_paused = true)]
async fn a_status_in_the_trailers_after_the_message_reaches_the_caller_as_sent() {
    // Real tonic servers that serve the call, then end it UNAVAILABLE in the trailers: the
    // head said nothing wrong, so the answer is already the caller's (nothing is retried once
    // the head is passed on), and the status must arrive through every layer's body.
    let (mocks, backends) = servers([100, 100, 100]).await;
    for m in &mocks {
        m.set_fault(Some(GrpcFault::AfterMessages(14)));
    }
    let mut client = client(&backends);
    let status = check(&mut client).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "mock fault");
    let sent: u64 = mocks.iter().map(|m| m.counters().requests).sum();
    assert_eq!(sent, 1);
}

#[tokio::test(start_paused = true)]
async fn grpc_health_probes_take_a_not_serving_server_out_and_let_it_back() {
    use tower_llm_lb::circuit_breaker::HealthProbe;
    let (mocks, backends) = servers([100, 100, 100]).await;
    let group = BreakerGroup::try_new(Policy::default()).unwrap();
    // Per-backend stacks: the breaker of `a` probes `a` through its own layers.
    let breaker = ServiceBuilder::new()
        .layer(group.layer_for(&backends[0]))
        .layer(tower_llm_lb::endpoint::EndpointLayer::new(
            backends[0].clone(),
        ))
        .layer(AuthInjectLayer::for_backend(&backends[0]))
        .service(grpc_client::<ReplayBody>());
    let probe = HealthProbe {
        interval: std::time::Duration::from_secs(5),
        protocol: tower_llm_lb::circuit_breaker::ProbeProtocol::Grpc {
            service: String::new(),
        },
        ..HealthProbe::default()
    };
    breaker.spawn_health_probe(probe).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert_eq!(backends[0].state().snapshot().circuit, Circuit::Closed);
    assert_eq!(
        backends[0].state().snapshot().last_probe.map(|p| p.1),
        Some(true)
    );
    mocks[0].set_serving(false).await;
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert!(
        matches!(backends[0].state().snapshot().circuit, Circuit::Open { .. }),
        "two NOT_SERVING answers in a row take it out"
    );
    mocks[0].set_serving(true).await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_eq!(
        backends[0].state().snapshot().circuit,
        Circuit::Closed,
        "one SERVING lets it back"
    );
    assert_eq!(
        mocks[0].counters().unauthenticated,
        0,
        "probes carry the backend's token"
    );
    drop(breaker);
}
