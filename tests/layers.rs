//! The flat stack: `RetryAfter429Layer` → `BalanceLayer` → `EndpointLayer::for_chosen` →
//! `AuthInjectLayer::for_chosen` over **one** client, against real loopback mocks.

mod common;

use common::chat;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::Circuit;
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::BalanceLayer;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{EndpointLayer, Served};
use tower_llm_lb::error::NoBackendChosen;
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::{Backend, Outcome};
use tower_llm_lb_mock::{Fault, MockServer};

async fn mock(name: &str, rps: f64) -> MockServer {
    MockServer::builder()
        .name(name)
        .api_key(format!("key-{name}"))
        .rps(rps)
        .azure_headers()
        .record_requests(true)
        .start()
        .await
        .unwrap()
}

fn backend(name: &str, m: &MockServer) -> Backend {
    Backend::azure(name, m.url(), "gpt-4o", "2024-10-21")
        .credential(Credential::api_key(&format!("key-{name}")).unwrap())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn one_client_serves_every_backend_each_with_its_own_key_and_throttling_moves_on() {
    let mocks = [
        mock("a", 2.0).await,
        mock("b", 50.0).await,
        mock("c", 50.0).await,
    ];
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .zip(&mocks)
        .map(|(n, m)| backend(n, m))
        .collect();
    let svc = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends.clone()).unwrap())
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(http_client::<ReplayBody>());
    let mut by = std::collections::HashMap::new();
    for _ in 0..60 {
        let req = {
            let mut r = chat("{}");
            r.headers_mut()
                .insert("authorization", "Bearer caller-key".parse().unwrap());
            r
        };
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let served = res.extensions().get::<Served>().unwrap();
        *by.entry(served.backend.name().to_string()).or_insert(0) += 1;
    }
    for m in &mocks {
        let c = m.counters();
        assert_eq!(
            c.unauthorized,
            0,
            "{}: every backend got its own key",
            m.name()
        );
        assert_eq!(c.foreign_credentials, 0, "{}: and nothing else", m.name());
    }
    // The 2 req/s backend took what its quota allowed; the rest went elsewhere.
    assert!(by.get("a").copied().unwrap_or(0) <= 6, "{by:?}");
    assert_eq!(by.values().sum::<i32>(), 60);
    // The backends' states were written through the one shared `Endpoint`.
    assert!(backends[1].state().snapshot().counters.success > 0);
}

#[tokio::test(start_paused = true)]
async fn a_chosen_backend_layer_without_a_balance_layer_refuses_without_sending() {
    let m = mock("solo", 10.0).await;
    let svc = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(http_client::<ReplayBody>());
    let err = svc.oneshot(chat("{}")).await.unwrap_err();
    assert!(
        tower_llm_lb::error::find::<NoBackendChosen>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(m.counters().requests, 0, "nothing sent, nothing retried");
    // Not retried: the stack is built wrongly, and trying again would not change that.
    assert_eq!(
        tower_llm_lb::classify::Classify::classify_error(&tower_llm_lb::classify::Standard, &*err),
        Outcome::ClientError {
            status: http::StatusCode::INTERNAL_SERVER_ERROR
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_flat_stack_s_breaker_opens_the_failing_backend_s_circuit_only() {
    let mocks = [mock("bad", 50.0).await, mock("good", 50.0).await];
    mocks[0].set_fault(Some(Fault::Status(500)));
    let backends: Vec<Backend> = ["bad", "good"]
        .iter()
        .zip(&mocks)
        .map(|(n, m)| backend(n, m))
        .collect();
    let breakers = BreakerGroup::try_new(Policy::default()).unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        // Round robin, so the failing backend keeps being chosen until its circuit opens.
        .layer(
            BalanceLayer::try_new(backends.clone())
                .unwrap()
                .strategy(tower_llm_lb::balance::Strategy::RoundRobin),
        )
        .layer(breakers.layer_for_chosen(&backends))
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(http_client::<ReplayBody>());
    for _ in 0..30 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "failures are retried on the good backend"
        );
    }
    assert!(matches!(
        backends[0].state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    assert_eq!(backends[1].state().snapshot().circuit, Circuit::Closed);
    assert!(mocks[0].counters().requests <= 6, "5 to trip, then none");
    // A breaker built for other backends refuses a request for one it does not know.
    let stranger = backend("stranger", &mocks[1]);
    let svc = ServiceBuilder::new()
        .layer(BalanceLayer::try_new([stranger]).unwrap())
        .layer(breakers.layer_for_chosen(&backends))
        .layer(EndpointLayer::for_chosen())
        .service(http_client::<ReplayBody>());
    let err = svc.oneshot(chat("{}")).await.unwrap_err();
    assert!(
        tower_llm_lb::error::find::<NoBackendChosen>(&*err).is_some(),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_flat_stack_fits_a_client_wrapped_in_tower_http_layers_that_change_its_body() {
    use http_body_util::BodyExt;
    let m = mock("east", 50.0).await;
    let backends = [backend("east", &m)];
    // A user's client as it often is: traced and decompressing (its response body type is
    // tower-http's, not hyper's).
    let client = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::decompression::DecompressionLayer::new())
        .service(http_client::<ReplayBody>());
    let svc = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends).unwrap())
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(client.clone());
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    // The client asked for compressed answers on our behalf; the body still streams through.
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "{body:?}");
    let sent = m.requests();
    assert_eq!(sent[0].headers["accept-encoding"], "gzip");
    // The recommended stack with every default fits it too.
    let group = tower_llm_lb::stack::group_over(
        "g",
        [Backend::azure("east2", m.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("key-east").unwrap())
            .build()
            .unwrap()],
        client,
        &tower_llm_lb::stack::Settings::default(),
    )
    .unwrap();
    let res = group.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_fallback_layer_walks_model_variants_over_one_client_and_each_backend_gets_only_its_models()
 {
    use tower_llm_lb::fallback::{FallbackLayer, ServedPath, Variant};
    // LangChain's gpt-4 -> gpt-4-32k: the 8k deployment's backend is nearly out of quota.
    let small = mock("small", 1.0).await;
    let big = mock("big", 50.0).await;
    let backends = [
        Backend::openai("small", format!("{}/v1", small.url()))
            .credential(Credential::api_key("key-small").unwrap())
            .models(["gpt-4"])
            .build()
            .unwrap(),
        Backend::openai("big", format!("{}/v1", big.url()))
            .credential(Credential::api_key("key-big").unwrap())
            .models(["gpt-4-32k"])
            .build()
            .unwrap(),
    ];
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new("gpt-4")
                .variant(Variant::new("as asked"))
                .variant(Variant::model("gpt-4-32k").set("max_tokens", 256)),
        )
        .layer(RetryAfter429Layer::default())
        .layer(BalanceLayer::try_new(backends).unwrap())
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(http_client::<ReplayBody>());
    let mut paths = std::collections::HashMap::<String, u32>::new();
    for _ in 0..10 {
        let req = chat(r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#);
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let path = res.extensions().get::<ServedPath>().unwrap().to_string();
        *paths.entry(path).or_default() += 1;
    }
    assert!(
        paths.contains_key("gpt-4[0:as asked] -> small"),
        "{paths:?}"
    );
    assert!(paths.contains_key("gpt-4[1:gpt-4-32k] -> big"), "{paths:?}");
    // Each backend got only the model it serves, the 32k one with the variant's overrides.
    for r in small.requests() {
        assert!(String::from_utf8_lossy(&r.body).contains(r#""model":"gpt-4""#));
    }
    for r in big.requests() {
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert!(
            body.contains(r#""model":"gpt-4-32k""#) && body.contains(r#""max_tokens":256"#),
            "{body}"
        );
    }
    // A model nobody serves is refused without sending anything.
    let before = small.counters().requests + big.counters().requests;
    let err = ServiceBuilder::new()
        .layer(
            BalanceLayer::try_new([Backend::openai("x", format!("{}/v1", big.url()))
                .models(["gpt-4-32k"])
                .build()
                .unwrap()])
            .unwrap(),
        )
        .layer(EndpointLayer::for_chosen())
        .service(http_client::<ReplayBody>())
        .oneshot(chat(r#"{"model":"o1"}"#))
        .await
        .unwrap_err();
    assert!(
        tower_llm_lb::error::find::<tower_llm_lb::error::NotServed>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(small.counters().requests + big.counters().requests, before);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_variant_can_name_the_backends_it_may_use() {
    use tower_llm_lb::fallback::{FallbackLayer, ServedPath, Variant};
    let (ptu, paygo) = (mock("ptu", 50.0).await, mock("paygo", 50.0).await);
    ptu.set_fault(Some(Fault::Status(500)));
    let backends = [backend("ptu", &ptu), backend("paygo", &paygo)];
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new("chain")
                .variant(Variant::new("provisioned").backends(["ptu"]))
                .variant(Variant::new("pay-as-you-go").backends(["paygo"])),
        )
        .layer(RetryAfter429Layer {
            retry_failures: false,
            ..Default::default()
        })
        .layer(BalanceLayer::try_new(backends).unwrap())
        .layer(EndpointLayer::for_chosen())
        .layer(AuthInjectLayer::for_chosen())
        .service(http_client::<ReplayBody>());
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.extensions().get::<ServedPath>().unwrap().to_string(),
        "chain[1:pay-as-you-go] -> paygo"
    );
    assert_eq!(
        ptu.counters().requests,
        1,
        "the first variant used only ptu"
    );
}
