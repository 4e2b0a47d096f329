//! The stack a user gets without settings (`stack::group` with `Settings::default()`), over
//! real loopback mocks that throttle like Azure (per-minute limit and remaining, no reset,
//! whole-second `retry-after`), fail, or refuse: what each default promises.

use std::time::Duration;

use tower::ServiceExt;
use tower_llm_lb::Circuit;
use tower_llm_lb::client::http_client;
use tower_llm_lb::error::{Exhausted, Unavailable, find};
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::stack::{self, LlmService, Settings};
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::{Fault, MockServer};

mod common;
use common::chat;

async fn azure_like(name: &str, rps: f64) -> MockServer {
    MockServer::builder()
        .name(name)
        .rps(rps)
        .azure_headers()
        .latency(Duration::from_millis(50))
        .start()
        .await
        .unwrap()
}

fn backend(name: &str, mock: &MockServer) -> Backend {
    Backend::azure(name, mock.url(), "gpt-4o", "2024-10-21")
        .build()
        .unwrap()
}

fn group(backends: &[Backend], settings: &Settings) -> LlmService {
    stack::group("g", backends.iter().cloned(), http_client(), settings).unwrap()
}

async fn burst(
    svc: &LlmService,
    n: usize,
) -> Vec<Result<http::Response<stack::LlmBody>, BoxError>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let svc = svc.clone();
        tasks.spawn(async move { svc.oneshot(chat(r#"{"max_tokens":10}"#)).await });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn throttled_requests_wait_in_line_for_room_and_never_draw_on_the_retry_budget() {
    let (a, b) = (azure_like("a", 5.0).await, azure_like("b", 5.0).await);
    let backends = [backend("a", &a), backend("b", &b)];
    // A retry budget that allows no retry at all: waiting for announced room is not a retry.
    let settings = Settings {
        retry: RetryAfter429Layer {
            budget: tower_llm_lb::retry::Budget {
                ttl: Duration::from_secs(10),
                min_per_sec: 0,
                retry_percent: 0.0,
            },
            ..RetryAfter429Layer::default()
        },
        ..Settings::default()
    };
    let svc = group(&backends, &settings);
    // 40 at once against 10/s (a burst of 10): about 3 s of queueing, inside the 10 s budget.
    let results = burst(&svc, 40).await;
    let ok = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 200))
        .count();
    assert_eq!(ok, 40);
    let throttled = a.counters().throttled + b.counters().throttled;
    assert!(
        throttled <= 2,
        "paced from limit/remaining: {throttled} 429s"
    );
}

#[tokio::test(start_paused = true)]
async fn when_nothing_has_room_in_time_the_answer_says_when_to_come_back() {
    let a = azure_like("a", 1.0).await;
    let backends = [backend("a", &a)];
    let settings = Settings {
        retry: RetryAfter429Layer {
            max_wait: Duration::from_millis(100),
            ..Default::default()
        },
        ..Settings::default()
    };
    let svc = group(&backends, &settings);
    for r in burst(&svc, 6).await {
        match r {
            Ok(res) if res.status() == 200 => {}
            Ok(res) => {
                assert_eq!(res.status(), 429);
                let ms: u64 = res.headers()["retry-after-ms"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(ms > 0, "never 'now' while everything is throttled");
            }
            Err(e) => {
                let earliest = find::<Unavailable>(&*e)
                    .and_then(|u| u.earliest)
                    .or_else(|| find::<Exhausted>(&*e).and_then(|x| x.earliest))
                    .expect("a refusal says when to come back");
                assert!(earliest > tokio::time::Instant::now(), "{e}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn backends_that_fail_every_request_leave_past_the_group_share_but_the_last_stays() {
    let (bad1, bad2, good) = (
        MockServer::builder().start().await.unwrap(),
        MockServer::builder().start().await.unwrap(),
        MockServer::builder().start().await.unwrap(),
    );
    bad1.set_fault(Some(Fault::Status(500)));
    bad2.set_fault(Some(Fault::Status(503)));
    let backends = [
        backend("bad1", &bad1),
        backend("bad2", &bad2),
        backend("good", &good),
    ];
    let settings = Settings {
        strategy: tower_llm_lb::balance::Strategy::RoundRobin,
        ..Settings::default()
    };
    let svc = group(&backends, &settings);
    for _ in 0..40 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200, "a failure is retried on another backend");
    }
    // Two of three ejected (the share is one), since they failed every request.
    for b in &backends[..2] {
        assert!(
            matches!(b.state().snapshot().circuit, Circuit::Open { .. }),
            "{}",
            b.name()
        );
    }
    assert_eq!(backends[2].state().snapshot().circuit, Circuit::Closed);
    let sent_to_bad = bad1.counters().requests + bad2.counters().requests;
    assert!(
        sent_to_bad <= 12,
        "{sent_to_bad}: 5 each to trip, then none"
    );
    // Now the last one fails too: it stays admitted, and the answers say why.
    good.set_fault(Some(Fault::Status(500)));
    for _ in 0..10 {
        match svc.clone().oneshot(chat("{}")).await {
            Ok(res) => assert!(res.status().is_server_error(), "{}", res.status()),
            Err(e) => {
                let ex = find::<Exhausted>(&*e).expect("a typed error listing the attempts");
                assert!(ex.attempts.iter().all(|a| a.outcome.is_failure()), "{e}");
            }
        }
    }
    assert_eq!(backends[2].state().snapshot().circuit, Circuit::Closed);
}

#[tokio::test(start_paused = true)]
async fn with_hedging_on_a_slow_backend_s_request_is_answered_by_another_in_time() {
    let (slow, fast) = (
        MockServer::builder().name("slow").start().await.unwrap(),
        MockServer::builder()
            .name("fast")
            .latency(Duration::from_millis(50))
            .start()
            .await
            .unwrap(),
    );
    slow.set_fault(Some(Fault::Slow(Duration::from_secs(5))));
    let backends = [backend("slow", &slow), backend("fast", &fast)];
    let settings = Settings {
        strategy: tower_llm_lb::balance::Strategy::RoundRobin,
        retry: RetryAfter429Layer {
            hedge: Some(Duration::from_millis(200)),
            ..Default::default()
        },
        ..Settings::default()
    };
    let svc = group(&backends, &settings);
    for _ in 0..6 {
        let start = tokio::time::Instant::now();
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            start.elapsed() <= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(res.headers()["x-mock-server"], "fast");
    }
    assert!(
        slow.counters().requests >= 3,
        "round robin sent the slow one its share"
    );
    // Without hedging the slow one's requests take its 5 s.
    let svc = group(
        &backends,
        &Settings {
            strategy: tower_llm_lb::balance::Strategy::RoundRobin,
            ..Settings::default()
        },
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let start = tokio::time::Instant::now();
        let _ = svc.clone().oneshot(chat("{}")).await.unwrap();
        slowest = slowest.max(start.elapsed());
    }
    assert!(slowest >= Duration::from_secs(5), "{slowest:?}");
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_rejects_our_key_leaves_the_rotation_and_its_requests_are_served_elsewhere()
{
    let wrong = MockServer::builder()
        .name("wrong")
        .api_key("the-real-key")
        .start()
        .await
        .unwrap();
    let good = MockServer::builder()
        .name("good")
        .api_key("good-key")
        .start()
        .await
        .unwrap();
    let with_key = |name: &str, m: &MockServer, key: &str| {
        Backend::azure(name, m.url(), "gpt-4o", "2024-10-21")
            .credential(tower_llm_lb::auth::Credential::api_key(key).unwrap())
            .build()
            .unwrap()
    };
    let backends = [
        with_key("wrong", &wrong, "a-stale-key"),
        with_key("good", &good, "good-key"),
    ];
    let settings = Settings {
        strategy: tower_llm_lb::balance::Strategy::RoundRobin,
        ..Settings::default()
    };
    let svc = group(&backends, &settings);
    for _ in 0..20 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "never the 401 of a key the caller did not send"
        );
    }
    assert_eq!(
        wrong.counters().unauthorized,
        1,
        "asked once, then left alone (60 s, doubling)"
    );
    // A minute later it is asked again (a probe); still wrong, it is left alone longer.
    tokio::time::sleep(Duration::from_secs(61)).await;
    for _ in 0..20 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(wrong.counters().unauthorized, 2);
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_says_x_should_retry_is_retried_as_it_says() {
    let fault = |status: u16, should: &str| {
        Fault::StatusWith(status, vec![("x-should-retry".into(), should.into())])
    };
    let cases = [
        // (the first backend's answer, settings obey the header, the status the caller gets,
        // requests the second backend sees)
        (fault(500, "false"), true, 500, 0),
        (fault(409, "true"), true, 200, 1),
        (fault(500, "false"), false, 200, 1),
        (Fault::Status(500), true, 200, 1),
    ];
    for (i, (answer, obey, status, second)) in cases.into_iter().enumerate() {
        let first = MockServer::builder().name("first").start().await.unwrap();
        let other = MockServer::builder().name("other").start().await.unwrap();
        first.set_fault(Some(answer.clone()));
        let backends = [
            Backend::azure("first", first.url(), "gpt-4o", "2024-10-21")
                .priority(1)
                .build()
                .unwrap(),
            Backend::azure("other", other.url(), "gpt-4o", "2024-10-21")
                .priority(2)
                .build()
                .unwrap(),
        ];
        let settings = Settings {
            retry: RetryAfter429Layer {
                should_retry_header: obey,
                ..Default::default()
            },
            ..Settings::default()
        };
        let res = group(&backends, &settings)
            .oneshot(chat("{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), status, "case {i}: {answer:?}");
        assert_eq!(first.counters().requests, 1, "case {i}");
        assert_eq!(other.counters().requests, second, "case {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn simultaneous_failures_spread_their_retries() {
    // Two backends that fail every request; breakers that do not trip, so every retry is
    // the retry layer's own.
    let (a, b) = (
        MockServer::builder().name("a").start().await.unwrap(),
        MockServer::builder().name("b").start().await.unwrap(),
    );
    a.set_fault(Some(Fault::Status(503)));
    b.set_fault(Some(Fault::Status(503)));
    let settings = Settings {
        breaker: tower_llm_lb::circuit_breaker::Policy {
            consecutive_failures: 1000,
            min_calls: 0,
            ..Default::default()
        },
        rng: Some(tower_llm_lb::Rng::seeded(7)),
        ..Settings::default()
    };
    let svc = group(&[backend("a", &a), backend("b", &b)], &settings);
    let results = burst(&svc, 10).await;
    assert_eq!(results.len(), 10);
    let mut times: Vec<Duration> = Vec::new();
    let t0 = a.requests()[0].at.min(b.requests()[0].at);
    for m in [&a, &b] {
        times.extend(m.requests().iter().map(|r| r.at - t0));
    }
    times.sort();
    eprintln!("{times:?}");
    // Each request tried both at once, then went back after a backoff: those returns spread.
    let returns: Vec<Duration> = times[20..].iter().copied().take(10).collect();
    let spread = *returns.iter().max().unwrap() - *returns.iter().min().unwrap();
    assert!(spread >= Duration::from_millis(150), "{times:?}");
}

/// `n` requests one after another through `svc`; how many each mock served.
async fn one_at_a_time(svc: &LlmService, n: usize, mocks: &[&MockServer]) -> Vec<u64> {
    for _ in 0..n {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    mocks.iter().map(|m| m.counters().ok).collect()
}

#[tokio::test(start_paused = true)]
async fn equal_backends_share_requests_sent_one_at_a_time_and_a_slow_region_is_avoided() {
    let mock = |name: &'static str, ms: u64| async move {
        MockServer::builder()
            .name(name)
            .latency(Duration::from_millis(ms))
            .start()
            .await
            .unwrap()
    };
    // A few milliseconds apart: the same latency, measured with noise.
    let (a, b) = (mock("a", 50).await, mock("b", 53).await);
    let settings = Settings {
        rng: Some(tower_llm_lb::Rng::seeded(11)),
        ..Settings::default()
    };
    let svc = group(&[backend("a", &a), backend("b", &b)], &settings);
    let got = one_at_a_time(&svc, 60, &[&a, &b]).await;
    assert!(got.iter().all(|n| (18..=42).contains(n)), "{got:?}");
    // Ten times slower: avoided.
    let (fast, slow) = (mock("fast", 50).await, mock("slow", 500).await);
    let svc = group(&[backend("fast", &fast), backend("slow", &slow)], &settings);
    let got = one_at_a_time(&svc, 60, &[&fast, &slow]).await;
    assert!(got[1] <= 6, "{got:?}");
}
