//! Wait hints that mean "now", "never", or come from a server whose clock is off: each gets a
//! safe outcome through the default stack, against a real loopback mock that sends them.

mod common;

use std::time::{Duration, SystemTime};

use common::chat;
use tower::ServiceExt;
use tower_llm_lb::Backend;
use tower_llm_lb::client::http_client;
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::stack::{self, LlmService, Settings};
use tower_llm_lb_mock::{Fault, MockServer};

async fn throttling(name: &str, headers: &[(&str, &str)]) -> MockServer {
    let m = MockServer::builder().name(name).start().await.unwrap();
    m.set_fault(Some(Fault::Throttle(
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )));
    m
}

fn group(mocks: &[&MockServer], settings: &Settings) -> LlmService {
    let backends = mocks.iter().map(|m| {
        Backend::openai(m.name(), format!("{}/v1", m.url()))
            .build()
            .unwrap()
    });
    stack::group("g", backends, http_client(), settings).unwrap()
}

fn waited_ms(res: &http::Response<stack::LlmBody>) -> u64 {
    res.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The gaps between the requests a mock received.
fn gaps(m: &MockServer) -> Vec<Duration> {
    let at: Vec<_> = m.requests().iter().map(|r| r.at).collect();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn a_hint_that_says_now_still_costs_a_short_backoff_never_a_resend_with_no_gap() {
    for hint in ["0", "-1", "Thu, 01 Jan 1970 00:00:00 GMT"] {
        let m = throttling("now", &[("retry-after", hint)]).await;
        let settings = Settings {
            retry: RetryAfter429Layer {
                max_wait: Duration::from_secs(3),
                ..Default::default()
            },
            ..Settings::default()
        };
        let res = group(&[&m], &settings).oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 429, "{hint}");
        assert!(
            waited_ms(&res) > 0,
            "{hint}: the 429 passed on never says now"
        );
        let gaps = gaps(&m);
        assert!(gaps.len() >= 2, "{hint}: retried");
        assert!(
            gaps.iter().all(|g| *g >= Duration::from_millis(75)),
            "{hint}: {gaps:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_negative_ms_hint_falls_through_to_retry_after() {
    let m = throttling("neg", &[("retry-after-ms", "-5"), ("retry-after", "1")]).await;
    let settings = Settings {
        retry: RetryAfter429Layer {
            max_wait: Duration::from_secs(3),
            ..Default::default()
        },
        ..Settings::default()
    };
    let res = group(&[&m], &settings).oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 429);
    let gaps = gaps(&m);
    assert!(!gaps.is_empty());
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_secs(1)),
        "{gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hint_of_a_day_is_passed_on_as_at_most_120_s_and_the_request_moves_on() {
    for hint in [
        "86400",
        "99999999999999999999999",
        "Fri, 31 Dec 9999 23:59:59 GMT",
    ] {
        let long = throttling("long", &[("retry-after", hint)]).await;
        let ok = MockServer::builder().name("ok").start().await.unwrap();
        // With another backend, the request is served there.
        let res = group(&[&long, &ok], &Settings::default())
            .oneshot(chat("{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{hint}");
        // Alone, the caller gets the 429 at once, with a hint it can use.
        let alone = group(&[&long], &Settings::default());
        let start = tokio::time::Instant::now();
        let res = alone.clone().oneshot(chat("{}")).await.unwrap();
        assert_eq!(res.status(), 429, "{hint}");
        assert!(start.elapsed() < Duration::from_secs(1), "{hint}");
        assert!(waited_ms(&res) <= 120_000, "{hint}: {}", waited_ms(&res));
        let secs: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs <= 120, "{hint}: {secs}");
        // And the backend is left alone for what it asked (up to 300 s).
        let sent = long.counters().requests;
        let _ = alone.oneshot(chat("{}")).await;
        assert_eq!(long.counters().requests, sent, "{hint}: not asked again");
    }
}

#[tokio::test(start_paused = true)]
async fn an_http_date_hint_is_read_against_the_answer_s_own_date() {
    // The server's clock is 10 minutes ahead of ours; it asks for 2 s by its own clock.
    let server_now = SystemTime::now() + Duration::from_secs(600);
    let date = httpdate::fmt_http_date(server_now);
    let retry = httpdate::fmt_http_date(server_now + Duration::from_secs(2));
    let m = throttling("skewed", &[("date", &date), ("retry-after", &retry)]).await;
    let settings = Settings {
        retry: RetryAfter429Layer {
            max_wait: Duration::ZERO,
            ..Default::default()
        },
        ..Settings::default()
    };
    let res = group(&[&m], &settings).oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 429);
    let ms = waited_ms(&res);
    assert!((1_000..=2_000).contains(&ms), "{ms} ms, not 120 000");
}

#[tokio::test(start_paused = true)]
async fn no_wait_outlives_the_request_deadline() {
    let m = throttling("slow-to-free", &[("retry-after", "3")]).await;
    let settings = Settings {
        retry: RetryAfter429Layer {
            deadline: Some(Duration::from_millis(1500)),
            ..Default::default()
        },
        ..Settings::default()
    };
    let start = tokio::time::Instant::now();
    let res = group(&[&m], &settings).oneshot(chat("{}")).await.unwrap();
    assert!(
        start.elapsed() <= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(res.status(), 429);
    let ms = waited_ms(&res);
    assert!((2_000..=3_000).contains(&ms), "an honest hint: {ms} ms");
    assert_eq!(m.counters().requests, 1, "not re-sent into its wait");
}

#[tokio::test(start_paused = true)]
async fn a_configured_request_timeout_bounds_a_slow_attempt_too() {
    let m = MockServer::builder().name("slow").start().await.unwrap();
    m.set_fault(Some(Fault::Slow(Duration::from_secs(5))));
    let json = serde_json::json!({
        "backends": { "slow": { "provider": "openai", "url": format!("{}/v1", m.url()) } },
        "request_timeout": 1500
    })
    .to_string();
    let svc = tower_llm_lb_config::Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    let start = tokio::time::Instant::now();
    let out = svc.oneshot(chat("{}")).await;
    let took = start.elapsed();
    assert!(took <= Duration::from_millis(1600), "{took:?}");
    let err = out.unwrap_err();
    assert!(
        tower_llm_lb::error::find::<tower_llm_lb::error::DeadlineExceeded>(&*err).is_some(),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn throttled_answers_do_not_spend_the_attempts_while_the_wait_budget_lasts() {
    // Five 429s in a row (a pace still being learned), each asking for a second, then room:
    // the request waits its turns and is served. Counting the 429s as attempts (4 by default)
    // answered the caller the fourth 429 with 10 s of wait budget left.
    let m = std::sync::Arc::new(throttling("busy", &[("retry-after", "1")]).await);
    let svc = group(&[&*m], &Settings::default());
    let room = m.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(4500)).await;
        room.set_fault(None);
    });
    let res = svc.oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(m.counters().throttled, 5, "{:?}", m.counters());
    assert_eq!(m.counters().ok, 1);
}
