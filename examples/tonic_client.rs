//! The layers under a generated tonic client, spreading its calls over three gRPC servers on
//! one HTTP/2 client: one server has a quota of 2 calls a second (`RESOURCE_EXHAUSTED` with
//! `grpc-retry-pushback-ms` past it), one answers `UNAVAILABLE` to everything. Each server gets
//! its own bearer token. Embedded mock tonic servers, no credentials needed.
//!
//! Run: `cargo run --example tonic_client`

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::BalanceLayer;
use tower_llm_lb::body::{BufferRequestLayer, ReplayBody};
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::client::grpc_client;
use tower_llm_lb::endpoint::EndpointLayer;
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::grpc::{GrpcCounters, GrpcFault, GrpcMock};

/// What each server saw, and whether its circuit was open at the end.
async fn run() -> Result<Vec<(String, GrpcCounters, bool)>, BoxError> {
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    for (name, rps) in [("quota-2", 2), ("down", 100), ("steady", 100)] {
        let token = format!("token-{name}");
        let server = GrpcMock::builder()
            .name(name)
            .bearer(&token)
            .rps(rps)
            .start()
            .await?;
        backends.push(
            Backend::grpc(name, server.url())
                .credential(Credential::bearer(&token)?)
                .build()?,
        );
        servers.push(server);
    }
    servers[1].set_fault(Some(GrpcFault::Status(14))); // UNAVAILABLE

    // The flat stack over one plaintext HTTP/2 client; the generated client sits on top.
    let stack = ServiceBuilder::new()
        .layer(BufferRequestLayer::new(1 << 20)) // unary calls: replayable
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends.clone())?)
        .layer(BreakerGroup::try_new(Policy::default())?.layer_for_chosen(&backends))
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(grpc_client::<ReplayBody>());
    let mut client = HealthClient::new(stack);

    for i in 0..12 {
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
        println!(
            "call {i:2}: {:?} from {server}",
            res.get_ref().status() // SERVING
        );
    }
    let mut seen = Vec::new();
    for (server, backend) in servers.iter().zip(&backends) {
        let c = server.counters();
        let open = !matches!(
            backend.state().snapshot().circuit,
            tower_llm_lb::Circuit::Closed
        );
        println!(
            "{:8} got {:2} calls: {:2} served, {} RESOURCE_EXHAUSTED, {} failed, {} during a pushback, {} foreign credentials; circuit {:?}",
            backend.name(),
            c.requests,
            c.ok,
            c.throttled,
            c.errors,
            c.during_pushback,
            c.foreign_credentials,
            backend.state().snapshot().circuit
        );
        seen.push((backend.name().to_string(), c, open));
    }
    Ok(seen)
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await.map(|_| ())
}

#[cfg(test)]
#[tokio::test(start_paused = true)]
async fn the_example_runs() {
    // Every call was answered (`run` fails otherwise).
    let seen = run().await.unwrap();
    let served: u64 = seen.iter().map(|(_, c, _)| c.ok).sum();
    assert_eq!(served, 12, "{seen:?}");
    for (name, c, open) in &seen {
        // No call during a pushback, no token at the wrong server.
        assert_eq!(c.during_pushback, 0, "{name}");
        assert_eq!(c.foreign_credentials, 0, "{name}");
        if name == "down" {
            // UNAVAILABLE to everything: it served nothing (each call it got went elsewhere),
            // and five in a row open its circuit.
            assert_eq!(c.ok, 0, "{name}: {c:?}");
            assert!(*open || c.errors < 5, "{name}: {c:?}");
        } else {
            assert!(!open, "{name}: {c:?}");
        }
    }
}
