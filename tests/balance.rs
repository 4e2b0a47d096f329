//! Balance and RetryAfter429 over real loopback mock servers: quota spent across backends, 429s
//! absorbed, throttled backends left alone, priority tiers drained in order.

mod common;

use std::time::Duration;

use common::{balanced, chat};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_lb::balance::Strategy;
use tower_llm_lb::endpoint::Served;
use tower_llm_lb::error::Exhausted;
use tower_llm_lb::retry::{Attempts, Deadline, RetryAfter429Layer};
use tower_llm_lb::{Backend, Outcome};
use tower_llm_lb_mock::MockServer;

async fn mocks(n: usize, rps: f64) -> Vec<MockServer> {
    mocks_with(n, rps, true).await
}

/// No mock got a request inside a retry-after it had asked for.
fn assert_none_while_cooling(ms: &[MockServer]) {
    for m in ms {
        assert_eq!(
            m.request_during_retry_after(),
            None,
            "{} got a request while cooling",
            m.name()
        );
    }
}

/// Mocks without quota headers answer 429s with `retry-after` only (as Azure PTU does).
async fn mocks_with(n: usize, rps: f64, quota_headers: bool) -> Vec<MockServer> {
    let mut v = Vec::new();
    for i in 0..n {
        let b = MockServer::builder()
            .name(format!("m{i}"))
            .rps(rps)
            .quota_headers(quota_headers);
        v.push(b.start().await.unwrap());
    }
    v
}

fn backend(name: &str, m: &MockServer, priority: u32, weight: f64) -> Backend {
    Backend::openai(name, format!("{}/v1", m.url()))
        .priority(priority)
        .weight(weight)
        .build()
        .unwrap()
}

fn served_by<B>(res: &http::Response<B>) -> String {
    res.extensions()
        .get::<Served>()
        .unwrap()
        .backend
        .name()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn ptu_first_then_paygo_then_back_to_ptu_after_its_cooldown() {
    let ptu = MockServer::builder()
        .name("ptu")
        .rps(5.0)
        .quota_headers(false)
        .start()
        .await
        .unwrap();
    let paygo = mocks(2, 100.0).await;
    let backends = [
        backend("ptu", &ptu, 0, 1.0),
        backend("paygo-0", &paygo[0], 1, 1.0),
        backend("paygo-1", &paygo[1], 1, 1.0),
    ];
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer::default(),
    );
    let mut by = Vec::new();
    for _ in 0..10 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
        by.push(served_by(&res));
    }
    // The PTU burst (5) is served by the PTU; its 429 moves the 6th to pay-as-you-go at once.
    assert!(by[..5].iter().all(|b| b == "ptu"), "{by:?}");
    assert!(by[5..].iter().all(|b| b.starts_with("paygo")), "{by:?}");
    assert_eq!(
        ptu.counters().throttled,
        1,
        "one 429, then the PTU was left alone while cooling"
    );
    let attempts = svc.clone();
    let _ = attempts;
    assert_eq!(paygo[0].counters().ok + paygo[1].counters().ok, 5);
    // After the cooldown the PTU takes the traffic back.
    let until = backends[0].state().snapshot().cooldown_until.unwrap();
    tokio::time::sleep_until(until).await;
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(served_by(&res), "ptu");
}

#[tokio::test(start_paused = true)]
async fn quota_hints_steer_away_from_the_ptu_before_it_answers_429() {
    let ptu = MockServer::builder()
        .name("ptu")
        .rps(5.0)
        .start()
        .await
        .unwrap();
    let paygo = mocks(1, 100.0).await;
    let backends = [
        backend("ptu", &ptu, 0, 1.0),
        backend("paygo", &paygo[0], 1, 1.0),
    ];
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer::default(),
    );
    let mut by = Vec::new();
    for _ in 0..8 {
        by.push(served_by(&svc.clone().oneshot(chat("{}")).await.unwrap()));
    }
    assert_eq!(
        by,
        ["ptu", "ptu", "ptu", "ptu", "ptu", "paygo", "paygo", "paygo"]
    );
    assert_eq!(
        ptu.counters().throttled,
        0,
        "remaining-requests: 0 was heeded, no 429 earned"
    );
    // The PTU is paced at its refill rate (5/s) from then on: one request per 200 ms.
    let mut ptu_served = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if served_by(&svc.clone().oneshot(chat("{}")).await.unwrap()) == "ptu" {
            ptu_served += 1;
        }
    }
    assert!(
        (4..=6).contains(&ptu_served),
        "PTU served {ptu_served} of 20 over 1 s"
    );
    assert_eq!(ptu.counters().throttled, 0);
}

#[tokio::test(start_paused = true)]
async fn a_429_is_retried_on_another_backend_and_the_attempts_are_listed() {
    let ms = mocks_with(2, 1.0, false).await;
    let backends = [backend("a", &ms[0], 0, 1.0), backend("b", &ms[1], 0, 1.0)];
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer::default(),
    );
    // Use up both backends' one request per second (no hints, so nothing tells us yet).
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    }
    let start = Instant::now();
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    let attempts = &res.extensions().get::<Attempts>().unwrap().0;
    let seen: Vec<_> = attempts
        .iter()
        .map(|a| (a.backend.to_string(), a.outcome.name()))
        .collect();
    // a throttles, b is tried at once and throttles too, then the request waits for the
    // earliest of the two and is served there.
    assert_eq!(seen[0], ("a".to_string(), "throttled"));
    assert_eq!(seen[1], ("b".to_string(), "throttled"));
    assert_eq!(seen[2].1, "success");
    assert_eq!(attempts.len(), 3);
    assert!(Instant::now() - start <= Duration::from_secs(1));
    assert_none_while_cooling(&ms);
}

#[tokio::test(start_paused = true)]
async fn all_throttled_and_deadline_shorter_than_retry_after_answers_429_at_once() {
    let ms = mocks_with(2, 1.0, false).await;
    let backends = [backend("a", &ms[0], 0, 1.0), backend("b", &ms[1], 0, 1.0)];
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer::default(),
    );
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    }
    let start = Instant::now();
    let mut req = chat("{}");
    req.extensions_mut()
        .insert(Deadline(start + Duration::from_millis(100)));
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        Instant::now(),
        start,
        "no sleep when the wait cannot fit the deadline"
    );
    assert_eq!(res.headers()["retry-after"], "1");
    let ms_hint: u64 = res.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms_hint > 900 && ms_hint <= 1000, "{ms_hint}");
    // Both backends got one 429 each, and nothing while cooling down.
    assert_eq!(ms[0].counters().throttled + ms[1].counters().throttled, 2);
    // Without a deadline the same request waits for the earliest backend (within the budget).
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(Instant::now() > start);
}

#[tokio::test(start_paused = true)]
async fn all_throttled_waits_for_the_earliest_backend_within_the_budget() {
    let ms = mocks_with(2, 1.0, false).await;
    let backends = [backend("a", &ms[0], 0, 1.0), backend("b", &ms[1], 0, 1.0)];
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer {
            max_wait: Duration::from_secs(5),
            ..Default::default()
        },
    );
    for _ in 0..4 {
        svc.clone().oneshot(chat("{}")).await.unwrap();
    }
    let start = Instant::now();
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    let waited = Instant::now() - start;
    assert!(
        waited > Duration::ZERO && waited <= Duration::from_secs(1),
        "{waited:?}"
    );
    // No backend received a request while a 429 of its own asked to wait.
    assert_none_while_cooling(&ms);
}

#[tokio::test(start_paused = true)]
async fn a_client_error_is_returned_at_once_from_exactly_one_backend() {
    let ms = mocks(3, 100.0).await;
    let backends: Vec<_> = ms
        .iter()
        .enumerate()
        .map(|(i, m)| backend(&format!("b{i}"), m, 0, 1.0))
        .collect();
    let svc = balanced(
        &backends,
        Strategy::WeightedRandom,
        RetryAfter429Layer::default(),
    );
    let res = svc.oneshot(chat("this is not json")).await.unwrap();
    assert_eq!(res.status(), 400);
    let total: u64 = ms.iter().map(|m| m.counters().requests).sum();
    assert_eq!(total, 1);
    assert_eq!(res.extensions().get::<Attempts>().unwrap().0.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn every_backend_refusing_connections_is_tried_once_each_then_again_after_a_backoff() {
    let dead = common::refusing;
    let backends = [dead("x"), dead("y")];
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer {
            max_attempts: 3,
            ..Default::default()
        },
    );
    let start = tokio::time::Instant::now();
    let err = svc.oneshot(chat("{}")).await.unwrap_err();
    let ex = err.downcast_ref::<Exhausted>().expect("Exhausted");
    // After a refused connection a backend not tried yet is asked at once; once every backend
    // was tried, the third attempt goes after a backoff (0.5 s less up to half at random), never
    // straight back. No backend said when it has room: no retry time to offer.
    assert_eq!(ex.attempts.len(), 3);
    assert!(
        ex.attempts
            .iter()
            .all(|a| a.outcome == Outcome::ConnectError)
    );
    assert_ne!(ex.attempts[0].backend, ex.attempts[1].backend);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took <= Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(ex.earliest, None);
    let text = err.to_string();
    assert!(text.starts_with("all 3 attempts failed: "), "{text}");
    assert!(
        text.contains("x: connect error") && text.contains("y: connect error"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn weights_give_shares_within_two_points_over_ten_thousand_requests() {
    for weights in [[0.7, 0.3, 0.0], [99.0, 0.5, 0.5]] {
        let ms = mocks(3, 1e9).await;
        let backends: Vec<_> = ms
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (m, w))| backend(&format!("w{i}"), m, 0, w))
            .collect();
        let svc = balanced(
            &backends,
            Strategy::WeightedRandom,
            RetryAfter429Layer::default(),
        );
        let n = 10_000;
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in 0..16 {
            let svc = svc.clone();
            tasks.spawn(async move {
                for _ in (chunk..n).step_by(16) {
                    assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let total: f64 = weights.iter().sum();
        for (m, w) in ms.iter().zip(weights) {
            let share = m.counters().ok as f64 / n as f64;
            // Five standard deviations of a binomial share: a 0.5 in 100 backend (0.005) must
            // get 0.0015-0.0085, not anything under 0.02.
            let p = w / total;
            let tolerance = 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-9;
            assert!(
                (share - p).abs() <= tolerance,
                "{weights:?}: {} got {share}, want {p} +- {tolerance}",
                m.name()
            );
            if w == 0.0 {
                assert_eq!(m.counters().requests, 0, "weight 0 receives nothing");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn twice_the_aggregate_load_ends_in_success_or_an_honest_429() {
    twice_the_aggregate_load(true).await;
}

#[tokio::test(start_paused = true)]
async fn twice_the_aggregate_load_without_quota_hints_never_hits_a_cooling_backend() {
    twice_the_aggregate_load(false).await;
}

async fn twice_the_aggregate_load(quota_headers: bool) {
    let ms = mocks_with(3, 10.0, quota_headers).await;
    let backends: Vec<_> = ms
        .iter()
        .enumerate()
        .map(|(i, m)| backend(&format!("r{i}"), m, 0, 1.0))
        .collect();
    let svc = balanced(
        &backends,
        Strategy::WeightedRandom,
        RetryAfter429Layer {
            max_wait: Duration::from_secs(2),
            ..Default::default()
        },
    );
    // 60 requests/s offered against 30/s of capacity, for 5 seconds.
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / 60));
    for _ in 0..300 {
        tick.tick().await;
        let svc = svc.clone();
        tasks.spawn(async move { svc.oneshot(chat("{}")).await });
    }
    let (mut ok, mut limited, mut refused) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let res = match r.unwrap() {
            Ok(res) => res,
            Err(e) => {
                // Turned away without sending: a typed error saying when to come back.
                let u = e
                    .downcast_ref::<tower_llm_lb::error::Unavailable>()
                    .expect("typed error");
                assert!(u.earliest.is_some(), "says when a backend is free again");
                refused += 1;
                continue;
            }
        };
        match res.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let ra: u64 = res.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                // Never "now", never past the 120 s the SDKs still honour.
                assert!((1..=120).contains(&ra), "retry-after within the cap: {ra}");
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok + limited + refused, 300);
    // Capacity is 30/s (plus a burst of 10 each); over ~5-7 s at least that much is served.
    assert!(ok >= 150, "served {ok}, 429 {limited}, refused {refused}");
    assert_none_while_cooling(&ms);
    let throttled: u64 = ms.iter().map(|m| m.counters().throttled).sum();
    eprintln!("served {ok}, 429 {limited}, refused {refused}; 429s the backends sent: {throttled}");
    if quota_headers {
        assert!(
            (throttled as f64) < 0.05 * ok as f64,
            "pacing keeps the 429s the backends send ({throttled}) under 5% of successes ({ok})"
        );
    } else {
        // Without hints the pace is learned from the 429s themselves; over this short run,
        // start included, that costs well under a tenth of the successes (13 per 216 here).
        assert!(
            (throttled as f64) <= 0.1 * ok as f64,
            "429s sent ({throttled}) vs successes ({ok})"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_5xx_is_retried_elsewhere_unless_failure_retries_are_off() {
    let failing = MockServer::builder().name("failing").start().await.unwrap();
    failing.set_fault(Some(tower_llm_lb_mock::Fault::Status(503)));
    let ok = MockServer::builder().name("ok").start().await.unwrap();
    let backends = [
        backend("failing", &failing, 0, 1.0),
        backend("ok", &ok, 1, 1.0),
    ];
    // Off: the 5xx is the caller's.
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer {
            retry_failures: false,
            ..Default::default()
        },
    );
    assert_eq!(svc.oneshot(chat("{}")).await.unwrap().status(), 503);
    // On (the default): moved to the next backend, and the attempts say so.
    let svc = balanced(
        &backends,
        Strategy::RoundRobin,
        RetryAfter429Layer::default(),
    );
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    let attempts = &res.extensions().get::<Attempts>().unwrap().0;
    let seen: Vec<_> = attempts.iter().map(|a| a.to_string()).collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].starts_with("failing: server error 503"), "{seen:?}");
    assert!(seen[1].starts_with("ok: success"), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_avoids_the_backend_already_tried_when_another_is_free() {
    let failing = MockServer::builder().name("a").start().await.unwrap();
    failing.set_fault(Some(tower_llm_lb_mock::Fault::Status(500)));
    let others = mocks(2, 1000.0).await;
    let backends = [
        backend("a", &failing, 0, 100.0),
        backend("b", &others[0], 0, 0.01),
        backend("c", &others[1], 0, 0.01),
    ];
    // Weighted random almost always picks `a` first; the retry must not pick it again.
    let svc = balanced(
        &backends,
        Strategy::WeightedRandom,
        RetryAfter429Layer {
            retry_failures: true,
            ..Default::default()
        },
    );
    for _ in 0..20 {
        let res = svc.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 200);
        let attempts = &res.extensions().get::<Attempts>().unwrap().0;
        assert!(attempts.len() <= 2, "{attempts:?}");
    }
}

#[test]
fn out_of_range_budget_settings_do_not_panic() {
    use tower::Layer;
    use tower_llm_lb::retry::Budget;
    for (ttl, min_per_sec, retry_percent) in [
        (Duration::ZERO, u32::MAX, f32::NAN),
        (Duration::from_secs(3600), 0, -1.0),
        (Duration::from_secs(5), 1, 1e9),
    ] {
        let layer = RetryAfter429Layer {
            budget: Budget {
                ttl,
                min_per_sec,
                retry_percent,
            },
            ..RetryAfter429Layer::default()
        };
        let _ = layer.layer(());
    }
}
