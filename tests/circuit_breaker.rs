//! CircuitBreaker, attempt timeouts and health probes against real loopback mock servers, on
//! tokio's paused clock.

mod common;

use std::time::Duration;

use common::{chat, guarded, guarded_group, refusing};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_lb::Circuit;
use tower_llm_lb::circuit_breaker::{BreakerGroup, HealthProbe, Policy};
use tower_llm_lb::client::http_client;
use tower_llm_lb::error::{Elapsed, Open};
use tower_llm_lb::error::{Exhausted, Unavailable, find};
use tower_llm_lb::retry::{Attempts, RetryAfter429Layer};
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb::{Backend, Outcome};
use tower_llm_lb_mock::{Fault, MockServer};

fn policy() -> Policy {
    Policy {
        consecutive_failures: 3,
        base_open: Duration::from_secs(10),
        growth: 2.0,
        max_open: Duration::from_secs(60),
        jitter: 0.0,
        ..Policy::default()
    }
}

fn azure(name: &str, m: &MockServer) -> Backend {
    Backend::azure(name, m.url(), "gpt-4o", "2024-10-21")
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_backend_answering_500_gets_nothing_while_open_then_exactly_the_permitted_probes() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Status(500)));
    let backend = azure("east", &mock);
    let group = BreakerGroup::try_new(policy()).unwrap();
    let svc = guarded(
        &backend,
        &group,
        AttemptTimeoutLayer::default(),
        &http_client(),
    );
    for _ in 0..3 {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 500);
    }
    let opened = Instant::now();
    assert_eq!(
        backend.state().snapshot().circuit,
        Circuit::Open {
            until: opened + Duration::from_secs(10)
        }
    );
    for _ in 0..5 {
        let err = svc.clone().oneshot(chat("{}")).await.unwrap_err();
        let open = err.downcast_ref::<Open>().expect("rejected by the breaker");
        assert_eq!(&*open.backend, "east");
        assert_eq!(open.until, Some(opened + Duration::from_secs(10)));
    }
    assert_eq!(mock.counters().requests, 3, "nothing sent while open");

    // The open period ends: one probe goes; it fails, so the breaker reopens for twice as long.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 500);
    assert_eq!(mock.counters().requests, 4);
    let reopened = Instant::now();
    assert_eq!(
        backend.state().snapshot().circuit,
        Circuit::Open {
            until: reopened + Duration::from_secs(20)
        }
    );

    // The backend recovers. When the period ends, of two concurrent requests only the permitted
    // probe is sent; its success closes the circuit.
    mock.set_fault(None);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (a, b) = tokio::join!(
        svc.clone().oneshot(chat("{}")),
        svc.clone().oneshot(chat("{}"))
    );
    assert_eq!(a.unwrap().status(), 200);
    let err = b.unwrap_err();
    assert_eq!(
        err.downcast_ref::<Open>().unwrap().until,
        None,
        "probe slot taken"
    );
    assert_eq!(mock.counters().requests, 5);
    assert_eq!(backend.state().snapshot().circuit, Circuit::Closed);
    assert_eq!(svc.oneshot(chat("{}")).await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn open_time_grows_with_consecutive_trips_and_resets_after_recovery() {
    let mock = MockServer::builder().start().await.unwrap();
    let backend = azure("east", &mock);
    let group = BreakerGroup::try_new(policy()).unwrap();
    let svc = guarded(
        &backend,
        &group,
        AttemptTimeoutLayer::default(),
        &http_client(),
    );
    let open_for = || match backend.state().snapshot().circuit {
        Circuit::Open { until } => until - Instant::now(),
        other => panic!("expected open, got {other:?}"),
    };
    mock.set_fault(Some(Fault::Status(502)));
    for _ in 0..3 {
        let _ = svc.clone().oneshot(chat("{}")).await;
    }
    assert_eq!(open_for(), Duration::from_secs(10));
    for expected in [20, 40, 60, 60] {
        tokio::time::sleep(open_for()).await;
        let _ = svc.clone().oneshot(chat("{}")).await; // the failing probe
        assert_eq!(open_for(), Duration::from_secs(expected));
    }
    mock.set_fault(None);
    tokio::time::sleep(open_for()).await;
    assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    mock.set_fault(Some(Fault::Status(502)));
    for _ in 0..3 {
        let _ = svc.clone().oneshot(chat("{}")).await;
    }
    assert_eq!(
        open_for(),
        Duration::from_secs(10),
        "recovery reset the growth"
    );
}

#[tokio::test(start_paused = true)]
async fn refused_and_hanging_backends_are_ejected_while_requests_succeed_elsewhere() {
    let hang = MockServer::builder().name("hang").start().await.unwrap();
    hang.set_fault(Some(Fault::Hang));
    let healthy = MockServer::builder().name("ok").start().await.unwrap();
    let backends = [
        refusing("dead"),
        azure("hang", &hang),
        azure("ok", &healthy),
    ];
    let group = BreakerGroup::try_new(Policy {
        consecutive_failures: 2,
        ..policy()
    })
    .unwrap()
    .max_ejection(0.67)
    .unwrap();
    let svc = guarded_group(
        &backends,
        &group,
        AttemptTimeoutLayer {
            first_byte: Some(Duration::from_secs(5)),
            ..Default::default()
        },
        RetryAfter429Layer {
            retry_failures: true,
            max_attempts: 3,
            ..Default::default()
        },
    );
    for _ in 0..12 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
        let attempts = &res.extensions().get::<Attempts>().unwrap().0;
        assert_eq!(&*attempts.last().unwrap().backend, "ok");
    }
    assert!(
        matches!(backends[0].state().snapshot().circuit, Circuit::Open { .. }),
        "refusing backend ejected"
    );
    assert!(
        matches!(backends[1].state().snapshot().circuit, Circuit::Open { .. }),
        "hanging backend ejected"
    );
    assert_eq!(healthy.counters().ok, 12);
    assert!(
        hang.counters().requests <= 2,
        "the hang got {} requests",
        hang.counters().requests
    );
}

/// A mock streaming 10 chunks one second apart, its backend and a breaker group.
async fn slow_stream() -> (MockServer, Backend, BreakerGroup) {
    let mock = MockServer::builder()
        .stream_chunks(10)
        .chunk_delay(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let backend = Backend::openai("o", format!("{}/v1", mock.url()))
        .build()
        .unwrap();
    (mock, backend, BreakerGroup::try_new(policy()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_stream_flowing_longer_than_the_first_byte_timeout_is_not_cut() {
    let (_mock, backend, group) = slow_stream().await;
    let timeouts = AttemptTimeoutLayer {
        first_byte: Some(Duration::from_secs(2)),
        idle: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let svc = guarded(&backend, &group, timeouts, &http_client());
    let start = Instant::now();
    let res = svc.oneshot(chat(r#"{"stream":true}"#)).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    assert!(
        Instant::now() - start >= Duration::from_secs(9),
        "the stream took 9 s to flow"
    );
}

#[tokio::test(start_paused = true)]
async fn the_total_limit_spans_head_and_body_and_cuts_a_stream_still_flowing() {
    let (_mock, backend, group) = slow_stream().await;
    let timeouts = AttemptTimeoutLayer {
        total: Some(Duration::from_millis(4500)),
        ..Default::default()
    };
    let svc = guarded(&backend, &group, timeouts, &http_client());
    let start = Instant::now();
    let res = svc.oneshot(chat(r#"{"stream":true}"#)).await.unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    let elapsed = find::<Elapsed>(&*err).expect("typed timeout");
    assert_eq!(elapsed.0, tower_llm_lb::error::Limit::Total);
    let took = Instant::now() - start;
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(5),
        "cut at the total limit, not before or a chunk later: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_stalls_longer_than_the_idle_timeout_ends_in_an_error() {
    let mock = MockServer::builder()
        .stream_chunks(3)
        .chunk_delay(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let backend = Backend::openai("o", format!("{}/v1", mock.url()))
        .build()
        .unwrap();
    let group = BreakerGroup::try_new(policy()).unwrap();
    let svc = guarded(
        &backend,
        &group,
        AttemptTimeoutLayer {
            idle: Some(Duration::from_secs(3)),
            ..Default::default()
        },
        &http_client(),
    );
    let res = svc.oneshot(chat(r#"{"stream":true}"#)).await.unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    let elapsed = find::<Elapsed>(&*err).expect("typed timeout");
    assert_eq!(elapsed.0, tower_llm_lb::error::Limit::Idle);
}

#[tokio::test(start_paused = true)]
async fn when_every_backend_fails_each_request_ends_in_a_typed_error_and_none_hangs() {
    let hang = MockServer::builder().start().await.unwrap();
    hang.set_fault(Some(Fault::Hang));
    let backends = [
        refusing("refused-a"),
        refusing("refused-b"),
        azure("hung", &hang),
    ];
    let group = BreakerGroup::try_new(policy()).unwrap();
    let svc = guarded_group(
        &backends,
        &group,
        AttemptTimeoutLayer {
            first_byte: Some(Duration::from_secs(5)),
            ..Default::default()
        },
        RetryAfter429Layer {
            retry_failures: true,
            max_attempts: 3,
            max_wait: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(600), svc.oneshot(chat("{}"))).await
        });
    }
    let mut named = std::collections::HashSet::new();
    while let Some(r) = tasks.join_next().await {
        let err = r
            .unwrap()
            .expect("no request hangs")
            .expect_err("no backend can answer");
        if let Some(ex) = err.downcast_ref::<Exhausted>() {
            for a in &ex.attempts {
                assert!(
                    matches!(a.outcome, Outcome::ConnectError | Outcome::Timeout),
                    "{a}"
                );
                named.insert(a.backend.to_string());
            }
        } else {
            // Turned away while every breaker that may open is open: says when to come back.
            let u = find::<Unavailable>(&*err).or(None);
            let open = find::<Open>(&*err);
            assert!(u.is_some() || open.is_some(), "untyped error: {err}");
        }
    }
    assert_eq!(
        named.len(),
        3,
        "every backend named with its reason: {named:?}"
    );
    // The safety valve: backends that fail every request may leave past the group's share
    // (half), but one always stays admitted.
    let open = backends
        .iter()
        .filter(|b| {
            matches!(
                b.state().snapshot().circuit,
                Circuit::Open { .. } | Circuit::HalfOpen
            )
        })
        .count();
    assert!(open <= 2, "{open} of 3 ejected");
}

#[tokio::test(start_paused = true)]
async fn health_probes_readmit_a_recovered_backend_and_stop_when_the_stack_is_dropped() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Status(500)));
    let backend = azure("east", &mock);
    let group = BreakerGroup::try_new(Policy {
        base_open: Duration::from_secs(300),
        max_open: Duration::from_secs(600),
        ..policy()
    })
    .unwrap();
    let svc = guarded(
        &backend,
        &group,
        AttemptTimeoutLayer::default(),
        &http_client(),
    );
    svc.spawn_health_probe(HealthProbe {
        path: "/status-0123456789abcdef".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        ..HealthProbe::default()
    })
    .unwrap();
    // Two failing health probes (the default threshold) trip the breaker before any user
    // request is sent: within two intervals.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(matches!(
        backend.state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    let (_, healthy) = backend.state().snapshot().last_probe.unwrap();
    assert!(!healthy);
    // The probe hits exactly the configured path, not one mapped like an API path.
    let probes = mock.requests();
    assert!(
        probes.iter().all(
            |r| r.method == http::Method::GET && r.path_and_query == "/status-0123456789abcdef"
        ),
        "{:?}",
        probes.iter().map(|r| &r.path_and_query).collect::<Vec<_>>()
    );
    // It recovers: the next health probe closes the circuit, long before the 300 s open period.
    mock.set_fault(None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(backend.state().snapshot().circuit, Circuit::Closed);
    assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    // Dropping the stack stops the probe task: no more requests reach the mock.
    drop(svc);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mock.counters().requests;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        mock.counters().requests,
        before,
        "probe task still running after drop"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_in_two_groups_has_one_circuit_and_one_probe() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Status(500)));
    let backend = azure("shared", &mock);
    let (chat_group, batch_group) = (
        BreakerGroup::try_new(policy()).unwrap(),
        BreakerGroup::try_new(policy()).unwrap(),
    );
    let via_chat = guarded(
        &backend,
        &chat_group,
        AttemptTimeoutLayer::default(),
        &http_client(),
    );
    let via_batch = guarded(
        &backend,
        &batch_group,
        AttemptTimeoutLayer::default(),
        &http_client(),
    );
    // Failures through either group count toward the one circuit.
    for svc in [&via_chat, &via_batch, &via_chat] {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 500);
    }
    assert!(matches!(
        backend.state().snapshot().circuit,
        Circuit::Open { .. }
    ));
    for svc in [&via_chat, &via_batch] {
        let err = svc.clone().oneshot(chat("{}")).await.unwrap_err();
        assert!(
            err.downcast_ref::<Open>().is_some(),
            "both groups see it open"
        );
    }
    assert_eq!(mock.counters().requests, 3);
    // When the open period ends, one probe is let through, from whichever group asks first.
    mock.set_fault(None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (a, b) = tokio::join!(
        via_batch.clone().oneshot(chat("{}")),
        via_chat.clone().oneshot(chat("{}"))
    );
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap_err().downcast_ref::<Open>().unwrap().until, None);
    assert_eq!(mock.counters().requests, 4);
    assert_eq!(backend.state().snapshot().circuit, Circuit::Closed);
    assert_eq!(via_chat.oneshot(chat("{}")).await.unwrap().status(), 200);
}
