//! Endpoint against real loopback mock servers: each outcome is classified once and written into
//! the backend's shared state.

mod common;

use std::time::Duration;

use common::{body_string, chat, stack, stack_with};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_lb::endpoint::{EndpointLayer, Served, Settings};
use tower_llm_lb::error::BackendError;
use tower_llm_lb::{Backend, Outcome};
use tower_llm_lb_mock::{Fault, MockServer};

fn azure(url: String) -> Backend {
    Backend::azure("east", url, "gpt-4o", "2024-10-21")
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn throttled_backend_cools_down_until_its_retry_after() {
    // No quota headers: the 429's retry-after is the only signal (as Azure PTU answers).
    let mock = MockServer::builder()
        .rps(1.0)
        .quota_headers(false)
        .start()
        .await
        .unwrap();
    let backend = azure(mock.url());
    let svc = stack(&backend);
    let first = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(backend.state().snapshot().unavailable_until.is_none());
    let start = Instant::now();
    let second = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(second.status(), 429);
    let served = second.extensions().get::<Served>().unwrap();
    let Outcome::Throttled {
        retry_after: Some(wait),
    } = served.outcome
    else {
        panic!(
            "expected a throttled outcome with a hint, got {:?}",
            served.outcome
        )
    };
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    let until = backend
        .state()
        .snapshot()
        .unavailable_until
        .expect("cooling down");
    assert!(until >= start + wait && until <= Instant::now() + wait);
    assert_eq!(backend.state().snapshot().throttle_streak, 1);
    // The 429's body is still the caller's to read.
    assert!(
        body_string(second)
            .await
            .contains("exceeded call rate limit")
    );
    // After the cooldown the backend is available and answers again.
    tokio::time::sleep_until(until).await;
    assert!(backend.state().snapshot().unavailable_until.is_none());
    assert_eq!(svc.oneshot(chat("{}")).await.unwrap().status(), 200);
    assert_eq!(backend.state().snapshot().throttle_streak, 0);
    let c = backend.state().snapshot().counters;
    assert_eq!((c.requests, c.success, c.throttled), (3, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn quota_exhausted_429_takes_the_backend_out_for_long() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::QuotaExhausted));
    let backend = azure(mock.url());
    let layer = EndpointLayer::new(backend.clone()).settings(Settings {
        quota_exhausted_cooldown: Duration::from_secs(900),
        ..Settings::default()
    });
    let res = stack_with(layer, &backend)
        .oneshot(chat("{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.extensions().get::<Served>().unwrap().outcome,
        Outcome::QuotaExhausted
    );
    let until = backend.state().snapshot().unavailable_until.unwrap();
    assert_eq!(until - Instant::now(), Duration::from_secs(900));
    // The error body read to classify is replayed whole to the caller.
    let body = body_string(res).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "insufficient_quota");
}

#[tokio::test(start_paused = true)]
async fn a_429_without_hint_backs_off_exponentially_and_only_extends() {
    // A 429 status fault carries no retry-after headers, unlike the mock's rate limiter.
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Status(429)));
    let backend = azure(mock.url());
    let layer = EndpointLayer::new(backend.clone()).settings(Settings {
        backoff_base: Duration::from_secs(2),
        backoff_max: Duration::from_secs(5),
        rng: tower_llm_lb::Rng::seeded(1),
        ..Settings::default()
    });
    let svc = stack_with(layer, &backend);
    let mut last = Instant::now();
    for attempt in 1..=4u32 {
        let now = Instant::now();
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(
            res.extensions().get::<Served>().unwrap().outcome,
            Outcome::Throttled { retry_after: None }
        );
        let until = backend.state().snapshot().cooldown_until.unwrap();
        let nominal = Duration::from_secs(2 * 2u64.pow(attempt - 1)).min(Duration::from_secs(5));
        let wait = until - now;
        assert!(until >= last, "cooldown never shortens");
        assert!(
            wait <= nominal && wait >= nominal.mul_f64(0.75),
            "attempt {attempt}: {wait:?} vs {nominal:?}"
        );
        last = until;
        // Nothing is sent during the wait: the endpoint refuses, naming when it ends.
        let err = svc.clone().oneshot(chat("{}")).await.unwrap_err();
        let refused = tower_llm_lb::error::find::<tower_llm_lb::error::Unavailable>(&*err).unwrap();
        assert_eq!(refused.earliest, Some(until));
        tokio::time::sleep_until(until).await;
    }
    assert_eq!(mock.counters().requests, 4);
    assert_eq!(backend.state().snapshot().throttle_streak, 4);
}

#[tokio::test]
async fn server_errors_are_returned_and_counted() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Status(503)));
    let backend = azure(mock.url());
    let res = stack(&backend).oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.extensions().get::<Served>().unwrap().outcome,
        Outcome::ServerError {
            status: http::StatusCode::SERVICE_UNAVAILABLE
        }
    );
    assert!(
        backend.state().snapshot().unavailable_until.is_none(),
        "a 5xx is not a cooldown"
    );
    assert_eq!(backend.state().snapshot().counters.server_errors, 1);
}

#[tokio::test]
async fn connect_error_is_a_typed_error_naming_the_backend() {
    // A port that refuses connections, reserved while the test runs.
    let port = tower_llm_lb_mock::RefusingPort::new().unwrap();
    let backend = azure(port.url());
    let err = stack(&backend).oneshot(chat("{}")).await.unwrap_err();
    let be = err.downcast_ref::<BackendError>().expect("BackendError");
    assert_eq!(&*be.backend, "east");
    assert_eq!(be.outcome, Outcome::ConnectError);
    assert!(
        err.to_string().starts_with("backend east: connect error: "),
        "{err}"
    );
    assert_eq!(backend.state().snapshot().counters.failures, 1);
    assert_eq!(backend.state().snapshot().in_flight, 0);
}

#[tokio::test]
async fn connection_reset_is_a_transport_error() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Reset));
    let backend = azure(mock.url());
    let err = stack(&backend).oneshot(chat("{}")).await.unwrap_err();
    let be = err.downcast_ref::<BackendError>().expect("BackendError");
    assert_eq!(be.outcome, Outcome::Transport);
}

#[tokio::test(start_paused = true)]
async fn hanging_backend_is_abandoned_by_a_timeout_and_in_flight_returns_to_zero() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Hang));
    let backend = azure(mock.url());
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .service(stack(&backend));
    let fut = svc.oneshot(chat("{}"));
    let err = fut.await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(
        backend.state().snapshot().in_flight,
        0,
        "the dropped attempt is no longer in flight"
    );
    assert_eq!(
        mock.counters().in_flight,
        1,
        "the mock is still hanging on it"
    );
}

#[tokio::test(start_paused = true)]
async fn remaining_requests_zero_rests_and_paces_the_backend_before_any_429() {
    let mock = MockServer::builder().rps(4.0).start().await.unwrap();
    let backend = azure(mock.url());
    let svc = stack(&backend);
    for _ in 0..3 {
        svc.clone().oneshot(chat("{}")).await.unwrap();
        assert!(backend.state().snapshot().unavailable_until.is_none());
    }
    // The 4th answer says remaining-requests: 0 (reset 1 s, limit 4): rest 250 ms and pace.
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
    let until = backend
        .state()
        .snapshot()
        .unavailable_until
        .expect("resting");
    assert_eq!(until - Instant::now(), Duration::from_millis(250));
    assert_eq!(
        backend.state().snapshot().pace,
        Some(Duration::from_millis(250))
    );
    assert_eq!(mock.counters().throttled, 0);
}

#[tokio::test(start_paused = true)]
async fn a_429_of_a_backend_limited_by_tokens_only_rests_it_and_sets_no_request_pace() {
    // Quota headers for tokens only (an Azure deployment limited by tokens per minute): the
    // token quota paces it; its 429 asks for a wait, and says nothing of a request rate.
    for azure_headers in [false, true] {
        let mut b = MockServer::builder().tps(200.0);
        if azure_headers {
            b = b.azure_headers();
        }
        let mock = b.start().await.unwrap();
        let backend = azure(mock.url());
        let svc = stack(&backend);
        let ok = svc
            .clone()
            .oneshot(chat(r#"{"max_tokens":150}"#))
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let throttled = svc
            .clone()
            .oneshot(chat(r#"{"max_tokens":150}"#))
            .await
            .unwrap();
        assert_eq!(throttled.status(), 429, "the token quota is used up");
        let served = throttled.extensions().get::<Served>().unwrap();
        assert!(
            matches!(
                served.outcome,
                Outcome::Throttled {
                    retry_after: Some(_)
                }
            ),
            "{:?}",
            served.outcome
        );
        assert!(
            backend.state().snapshot().unavailable_until.is_some(),
            "resting"
        );
        assert_eq!(
            backend.state().snapshot().pace,
            None,
            "azure headers: {azure_headers}"
        );
    }
}

#[tokio::test]
async fn quota_hints_of_successful_answers_are_recorded() {
    let mock = MockServer::builder()
        .rps(100.0)
        .tps(10_000.0)
        .start()
        .await
        .unwrap();
    let backend = azure(mock.url());
    let res = stack(&backend)
        .oneshot(chat(r#"{"max_tokens":100}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let q = backend.state().snapshot().quota.expect("hints seen");
    assert_eq!(q.remaining_requests, Some(99));
    assert!(q.remaining_tokens.unwrap() < 10_000 - 100);
    assert!(backend.state().snapshot().latency.is_some());
}

#[tokio::test]
async fn caller_path_and_query_map_onto_each_provider() {
    let mock = MockServer::builder().start().await.unwrap();
    let openai = Backend::openai("vllm", format!("{}/v1", mock.url()))
        .build()
        .unwrap();
    let v1 = Backend::builder(
        "azv1",
        format!("{}/openai/v1", mock.url()),
        tower_llm_lb::provider::Provider::AzureOpenAiV1,
    )
    .build()
    .unwrap();
    let classic = azure(mock.url());
    for b in [&openai, &v1, &classic] {
        let req = http::Request::post("/v1/embeddings?user=7")
            .body(r#"{"input":"x"}"#.into())
            .unwrap();
        assert_eq!(
            stack(b).oneshot(req).await.unwrap().status(),
            200,
            "{}",
            b.name()
        );
    }
    let paths: Vec<_> = mock
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/embeddings?user=7",
            "/openai/v1/embeddings?user=7",
            "/openai/deployments/gpt-4o/embeddings?user=7&api-version=2024-10-21"
        ]
    );
}

#[tokio::test]
async fn common_paths_without_query_map_the_same_and_a_callers_host_is_replaced() {
    // `/v1/chat/completions` and `/v1/embeddings` without a query take the per-backend
    // precomputed route; `/v1/audio/speech` is worked out per request. Both must agree.
    let mock = MockServer::builder().start().await.unwrap();
    let openai = Backend::openai("vllm", format!("{}/v1", mock.url()))
        .build()
        .unwrap();
    let classic = azure(mock.url());
    let anthropic = Backend::anthropic("claude", mock.url()).build().unwrap();
    for b in [&openai, &classic, &anthropic] {
        for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/audio/speech"] {
            let req = http::Request::post(path)
                .header("host", "gateway.example")
                .body(r#"{"input":"x"}"#.into())
                .unwrap();
            let status = stack(b).oneshot(req).await.unwrap().status();
            assert!(
                status.is_success() || status == 404,
                "{} {path}: {status}",
                b.name()
            );
        }
    }
    let seen = mock.requests();
    let paths: Vec<_> = seen.iter().map(|r| r.path_and_query.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/audio/speech",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/audio/speech?api-version=2024-10-21",
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/audio/speech",
        ]
    );
    for r in &seen {
        assert_eq!(r.headers["host"], mock.addr().to_string().as_str());
    }
    assert!(
        seen[6..]
            .iter()
            .all(|r| r.headers.contains_key("anthropic-version"))
    );
}
