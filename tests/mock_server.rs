//! The mock LLM server itself: routes, auth, rate limits and faults behave as documented, since
//! every other test relies on it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::body_string;
use http_body_util::Full;
use tower::ServiceExt;
use tower_llm_lb::client::http_client;
use tower_llm_lb_mock::{Fault, MockServer};

async fn send(req: http::Request<Full<Bytes>>) -> http::Response<hyper::body::Incoming> {
    http_client().oneshot(req).await.unwrap()
}

fn post(url: String, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn rate_limit_answers_429_with_every_hint_header() {
    let mock = MockServer::builder().rps(2.0).start().await.unwrap();
    let url = format!("{}/v1/chat/completions", mock.url());
    assert_eq!(send(post(url.clone(), "{}")).await.status(), 200);
    let ok = send(post(url.clone(), "{}")).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "0");
    let limited = send(post(url.clone(), "{}")).await;
    assert_eq!(limited.status(), 429);
    let h = limited.headers();
    assert_eq!(h["retry-after"], "1");
    let ms: u64 = h["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((1..=500).contains(&ms), "{ms}");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    assert_eq!(send(post(url, "{}")).await.status(), 200);
    let c = mock.counters();
    assert_eq!((c.requests, c.ok, c.throttled), (4, 3, 1));
}

#[tokio::test]
async fn azure_routes_need_api_version_and_unknown_paths_404() {
    let mock = MockServer::builder().start().await.unwrap();
    let base = mock.url();
    let no_version = post(
        format!("{base}/openai/deployments/d/chat/completions"),
        "{}",
    );
    assert_eq!(send(no_version).await.status(), 400);
    let with = post(
        format!("{base}/openai/deployments/d/chat/completions?api-version=2024-10-21"),
        "{}",
    );
    assert_eq!(send(with).await.status(), 200);
    assert_eq!(send(post(format!("{base}/nope"), "{}")).await.status(), 404);
    let models = http::Request::get(format!("{base}/v1/models"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(models).await.status(), 200);
    assert_eq!(
        send(post(format!("{base}/v1/chat/completions"), "not json"))
            .await
            .status(),
        400
    );
}

#[tokio::test]
async fn auth_is_checked_and_foreign_credentials_counted() {
    let mock = MockServer::builder().api_key("k").start().await.unwrap();
    let url = format!("{}/v1/chat/completions", mock.url());
    assert_eq!(send(post(url.clone(), "{}")).await.status(), 401);
    let mut req = post(url, "{}");
    req.headers_mut().insert("api-key", "k".parse().unwrap());
    req.headers_mut()
        .insert("authorization", "Bearer other".parse().unwrap());
    assert_eq!(send(req).await.status(), 200);
    let c = mock.counters();
    assert_eq!((c.unauthorized, c.ok, c.foreign_credentials), (1, 1, 1));
}

#[tokio::test]
async fn status_and_quota_faults() {
    let mock = MockServer::builder().name("west").start().await.unwrap();
    let url = format!("{}/v1/chat/completions", mock.url());
    mock.set_fault(Some(Fault::Status(502)));
    let res = send(post(url.clone(), "{}")).await;
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-mock-server"], "west");
    mock.set_fault(Some(Fault::QuotaExhausted));
    let res = send(post(url.clone(), "{}")).await;
    assert_eq!(res.status(), 429);
    assert!(body_string(res).await.contains("insufficient_quota"));
    mock.set_fault(None);
    let res = send(post(url, r#"{"model":"m1"}"#)).await;
    assert!(body_string(res).await.contains("Hello from west"));
}

#[tokio::test(start_paused = true)]
async fn slow_fault_delays_the_answer_on_tokios_clock() {
    let mock = MockServer::builder().start().await.unwrap();
    mock.set_fault(Some(Fault::Slow(Duration::from_secs(40))));
    let start = tokio::time::Instant::now();
    let res = send(post(format!("{}/v1/chat/completions", mock.url()), "{}")).await;
    assert_eq!(res.status(), 200);
    assert!(start.elapsed() >= Duration::from_secs(40));
}

#[tokio::test]
async fn dropping_the_server_closes_it() {
    let mock = MockServer::builder().start().await.unwrap();
    let url = format!("{}/v1/models", mock.url());
    drop(mock);
    tokio::task::yield_now().await;
    let req = http::Request::get(url)
        .body(Full::<Bytes>::default())
        .unwrap();
    assert!(http_client().oneshot(req).await.is_err());
}

/// The mock counts a request's tokens as Azure documents: the prompt's text / 4, plus
/// `max_tokens` (or `max_completion_tokens`) once per answer asked for (`n`, `best_of`).
#[tokio::test(start_paused = true)]
async fn a_token_quota_counts_the_cap_once_per_answer_asked_for() {
    let mock = MockServer::builder()
        .tps(1000.0)
        .count_prompt_text(1.0)
        .start()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", mock.url());
    let remaining = |res: &http::Response<_>| -> u64 {
        res.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    // 8 characters of text: 2 tokens.
    let one = r#"{"messages":[{"role":"user","content":"12345678"}],"max_tokens":10}"#;
    let three =
        r#"{"messages":[{"role":"user","content":"12345678"}],"max_completion_tokens":10,"n":3}"#;
    let first = remaining(&send(post(url.clone(), one)).await);
    let second = remaining(&send(post(url.clone(), three)).await);
    assert_eq!(first - second, 2 + 30, "three answers of at most 10 tokens");
}
