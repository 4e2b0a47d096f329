//! README promises that had no test of their own, each against real loopback servers on the
//! paused clock: the breaker ignores throttling and client errors; the retry budget stops a
//! failure storm; redirects are never followed (a key never travels to another origin); the
//! error body read to classify is bounded; a `Fallback` moves on after an attempt timeout and on
//! a status it was told to; an answer hyper cannot parse is a failure retried elsewhere.

mod common;

use std::time::Duration;

use common::{chat, stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::Circuit;
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::Balance;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{EndpointLayer, Served};
use tower_llm_lb::fallback::{Fallback, ServedPath};
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb::{Backend, Outcome};
use tower_llm_lb_mock::{Fault, MockServer};

fn azure(name: &str, url: String) -> Backend {
    Backend::azure(name, url, "gpt-4o", "2024-10-21")
        .credential(Credential::api_key(&format!("key-{name}")).unwrap())
        .build()
        .unwrap()
}

async fn mock(name: &str) -> MockServer {
    MockServer::builder()
        .name(name)
        .api_key(format!("key-{name}"))
        .start()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_breaker_counts_throttling_and_client_errors_as_nothing() {
    for fault in [Fault::Status(429), Fault::Status(400), Fault::Status(404)] {
        let m = mock("a").await;
        m.set_fault(Some(fault.clone()));
        let b = azure("a", m.url());
        let group = BreakerGroup::try_new(Policy {
            consecutive_failures: 2,
            ..Policy::default()
        })
        .unwrap();
        let svc = ServiceBuilder::new()
            .layer(group.layer_for(&b))
            .service(stack(&b));
        for _ in 0..10 {
            let _ = svc.clone().oneshot(chat("{}")).await;
            // A 429's cooldown would refuse the next one without sending: wait it out.
            tokio::time::sleep(Duration::from_secs(61)).await;
        }
        assert_eq!(b.state().snapshot().circuit, Circuit::Closed, "{fault:?}");
        assert_eq!(
            m.counters().requests,
            10,
            "{fault:?}: every request was sent"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_stops_a_failure_storm() {
    let (a, b) = (mock("a").await, mock("b").await);
    a.set_fault(Some(Fault::Status(500)));
    b.set_fault(Some(Fault::Status(500)));
    let backends = [azure("a", a.url()), azure("b", b.url())];
    // No breaker: the budget alone bounds the retries.
    let balance = Balance::from_backends(backends, stack).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .service(balance);
    let n = 500;
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(svc.clone().oneshot(chat("{}"))))
        .collect();
    for c in calls {
        let res = c.await.unwrap().unwrap();
        assert_eq!(res.status(), 500, "every request ends with the last 500");
    }
    let sent = a.counters().requests + b.counters().requests;
    // Without a budget: up to 4 attempts each (2 000). The default budget lets retries add 20%
    // of the requests plus a reserve of 10 a second over its 10 s window (100).
    assert!(
        sent <= n + n / 5 + 100 + 10,
        "{sent} attempts for {n} requests"
    );
    assert!(sent > n, "some retries were made: {sent}");
}

/// A raw HTTP server that answers every request with a redirect to `to`, and the count of
/// connections a second server (the redirect's target) received.
async fn redirecting_to_a_thief() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let thief = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let thief_addr = thief.local_addr().unwrap();
    let stolen = std::sync::Arc::new(AtomicUsize::new(0));
    let count = stolen.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = thief.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{thief_addr}/steal\r\ncontent-length: 0\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, stolen)
}

#[tokio::test(start_paused = true)]
async fn a_redirect_is_returned_as_it_is_and_the_key_never_travels_to_its_target() {
    let (url, stolen) = redirecting_to_a_thief().await;
    let b = azure("a", url);
    let svc = ServiceBuilder::new()
        .layer(RetryAfter429Layer::default())
        .service(stack(&b));
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 307, "passed on, not followed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stolen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing connected to the redirect's target"
    );
}

#[tokio::test(start_paused = true)]
async fn the_error_body_read_to_classify_a_429_is_bounded_and_passed_on_whole() {
    // A billing 429 whose code sits past the first 1 KiB: beyond a 1 KiB read it is a plain
    // throttle; within it, quota exhaustion.
    let padding = " ".repeat(2000);
    let body = format!(
        r#"{{"padding":"{padding}","error":{{"code":"insufficient_quota","message":"billing"}}}}"#
    );
    for (limit, expect) in [
        (1024, Outcome::Throttled { retry_after: None }),
        (16 * 1024, Outcome::QuotaExhausted),
    ] {
        let m = mock("a").await;
        m.set_fault(Some(Fault::Page(429, body.clone())));
        let b = azure("a", m.url());
        let svc = ServiceBuilder::new()
            .layer(
                EndpointLayer::new(b.clone()).settings(tower_llm_lb::endpoint::Settings {
                    error_body_limit: limit,
                    ..Default::default()
                }),
            )
            .layer(AuthInjectLayer::for_backend(&b))
            .service(http_client::<ReplayBody>());
        let res = svc.oneshot(chat("{}")).await.unwrap();
        assert_eq!(
            res.extensions().get::<Served>().unwrap().outcome,
            expect,
            "limit {limit}"
        );
        let got = common::body_string(res).await;
        assert_eq!(
            got, body,
            "the caller gets the whole body, read part replayed first"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_fallback_moves_on_after_an_attempt_timeout_and_on_a_status_it_was_told_to() {
    let (hung, ok) = (mock("hung").await, mock("ok").await);
    hung.set_fault(Some(Fault::Hang));
    let (h, o) = (azure("hung", hung.url()), azure("ok", ok.url()));
    let timed = |b: &Backend| {
        ServiceBuilder::new()
            .layer(EndpointLayer::new(b.clone()))
            .layer(AttemptTimeoutLayer {
                first_byte: Some(Duration::from_secs(2)),
                ..Default::default()
            })
            .layer(AuthInjectLayer::for_backend(b))
            .service(http_client::<ReplayBody>())
    };
    let chain = Fallback::builder("c")
        .target("hung", timed(&h))
        .target("ok", timed(&o))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let res = chain.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.extensions().get::<ServedPath>().unwrap().to_string(),
        "c[1:ok] -> ok"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "moved on at the first-byte limit"
    );

    // A 404 is the caller's by default; told to, the chain moves on for it.
    let (missing, ok2) = (mock("missing").await, mock("ok2").await);
    missing.set_fault(Some(Fault::Status(404)));
    let (m, o2) = (azure("missing", missing.url()), azure("ok2", ok2.url()));
    let plain = Fallback::builder("c")
        .target("missing", stack(&m))
        .target("ok2", stack(&o2))
        .build()
        .unwrap();
    assert_eq!(plain.oneshot(chat("{}")).await.unwrap().status(), 404);
    let told = Fallback::builder("c")
        .target("missing", stack(&m))
        .target("ok2", stack(&o2))
        .settings(tower_llm_lb::fallback::Settings {
            statuses: vec![http::StatusCode::NOT_FOUND],
            ..Default::default()
        })
        .build()
        .unwrap();
    let res = told.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ok2.counters().ok, 1);
}

#[tokio::test(start_paused = true)]
async fn a_200_whose_json_body_is_an_error_object_is_a_failure_and_fails_over() {
    let (bad, good) = (mock("bad").await, mock("good").await);
    bad.set_fault(Some(Fault::Json(
        200,
        r#"{"error":{"message":"upstream model crashed","type":"server_error"}}"#.into(),
    )));
    let backends = [azure("bad", bad.url()), azure("good", good.url())];
    // The recommended group: on by default there.
    let settings = tower_llm_lb::stack::Settings {
        strategy: tower_llm_lb::balance::Strategy::RoundRobin,
        ..Default::default()
    };
    let svc = tower_llm_lb::stack::group("g", backends.clone(), http_client(), &settings).unwrap();
    for _ in 0..6 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.extensions().get::<Served>().unwrap().backend.name(),
            "good"
        );
        let body = common::body_string(res).await;
        assert!(body.contains("choices"), "{body}");
    }
    assert!(bad.counters().requests >= 1, "the bad backend was tried");
    assert!(backends[0].state().snapshot().counters.server_errors >= 1);
    // Off (the bare `EndpointLayer`'s default): the same answer is the caller's success, passed
    // on whole.
    let plain = ServiceBuilder::new()
        .layer(EndpointLayer::new(backends[0].clone()))
        .layer(AuthInjectLayer::for_backend(&backends[0]))
        .service(http_client::<ReplayBody>());
    let res = plain.oneshot(chat("{}")).await.unwrap();
    assert_eq!(
        res.extensions().get::<Served>().unwrap().outcome,
        Outcome::Success
    );
    assert!(
        common::body_string(res)
            .await
            .contains("upstream model crashed")
    );
    // A success whose JSON happens to carry `"error": null` is a success.
    bad.set_fault(Some(Fault::Json(
        200,
        r#"{"error":null,"choices":[]}"#.into(),
    )));
    let res = ServiceBuilder::new()
        .layer(
            EndpointLayer::new(backends[0].clone()).settings(tower_llm_lb::endpoint::Settings {
                json_error_in_success: true,
                ..Default::default()
            }),
        )
        .layer(AuthInjectLayer::for_backend(&backends[0]))
        .service(http_client::<ReplayBody>())
        .oneshot(chat("{}"))
        .await
        .unwrap();
    assert_eq!(
        res.extensions().get::<Served>().unwrap().outcome,
        Outcome::Success
    );
}

/// A server whose every answer has a header value hyper refuses to parse (a control byte).
async fn answering_unparsable_heads() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nx-bad: a\x01b\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test(start_paused = true)]
async fn an_answer_hyper_cannot_parse_is_a_failure_retried_elsewhere_not_a_502() {
    let (bad_url, bad_seen) = answering_unparsable_heads().await;
    let good = mock("good").await;
    let settings = tower_llm_lb::stack::Settings {
        strategy: tower_llm_lb::balance::Strategy::RoundRobin,
        ..Default::default()
    };
    let svc = tower_llm_lb::stack::group(
        "g",
        [azure("bad", bad_url), azure("good", good.url())],
        http_client(),
        &settings,
    )
    .unwrap();
    for _ in 0..10 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200, "served by the other backend");
        assert_eq!(
            res.extensions().get::<Served>().unwrap().backend.name(),
            "good"
        );
    }
    assert!(bad_seen.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(good.counters().ok, 10);
}
