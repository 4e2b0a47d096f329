//! The gateway end to end: a real axum server over a JSON config and mock backends, driven with
//! real HTTP.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_llm_lb::client::http_client;
use tower_llm_lb_config::Config;
use tower_llm_lb_gateway::Gateway;
use tower_llm_lb_gateway::settings::GatewayConfig;
use tower_llm_lb_mock::{Fault, MockServer};

struct Running {
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(json: &str) -> Running {
    let config = Config::from_json(json).unwrap();
    let keys = GatewayConfig::of(&config).unwrap().client_keys;
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        Gateway::new(svc, backends, keys)
            .configured(&config)
            .unwrap()
            .serve(listener, async {
                let _ = rx.await;
            }),
    );
    Running {
        url,
        shutdown: Some(tx),
        task,
    }
}

fn post(url: String, key: Option<&str>, body: &'static str) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::post(url).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A `GET` of `url`, with a client key when given.
fn get(url: String, key: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::get(url);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// The ids `GET /v1/models` lists.
async fn model_ids(url: &str) -> Vec<String> {
    let res = send(get(format!("{url}/v1/models"), None)).await;
    let list: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

async fn send(req: http::Request<Full<Bytes>>) -> http::Response<hyper::body::Incoming> {
    http_client().oneshot(req).await.unwrap()
}

async fn text(res: http::Response<hyper::body::Incoming>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn config(primary: &MockServer, backup: &MockServer) -> String {
    format!(
        r#"{{
          "backends": {{
            "primary": {{ "provider": "azure", "url": "{p}", "deployment": "gpt-4o", "api_key": "k-primary" }},
            "backup":  {{ "provider": "openai", "url": "{b}/v1", "api_key": "k-backup" }}
          }},
          "strategy": {{ "mode": "fallback" }},
          "targets": [ {{ "backend": "primary" }}, {{ "backend": "backup", "override_params": {{ "model": "gpt-4o-mini" }} }} ],
          "retry": {{ "attempts": 2, "max_wait_ms": 0 }},
          "gateway": {{ "client_keys": ["client-1"] }}
        }}"#,
        p = primary.url(),
        b = backup.url()
    )
}

async fn mocks() -> (MockServer, MockServer) {
    let primary = MockServer::builder()
        .name("primary")
        .api_key("k-primary")
        .stream_chunks(4)
        .start()
        .await
        .unwrap();
    let backup = MockServer::builder()
        .name("backup")
        .bearer("k-backup")
        .start()
        .await
        .unwrap();
    (primary, backup)
}

#[tokio::test(start_paused = true)]
async fn plain_streamed_and_unauthorized_requests() {
    let (primary, backup) = mocks().await;
    let gw = start(&config(&primary, &backup)).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);

    let res = send(post(chat(), Some("client-1"), r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "primary");
    assert_eq!(res.headers()["x-llm-lb-attempts"], "primary=success");
    assert_eq!(res.headers()["x-llm-lb-attempt-count"], "1");
    assert!(text(res).await.contains("Hello from primary"));
    // The client's own key never reached the backend; the backend's did.
    let seen = &primary.requests()[0].headers;
    assert_eq!(seen["api-key"], "k-primary");
    // The body as it came, with its length.
    assert_eq!(
        seen["content-length"],
        r#"{"model":"gpt-4o"}"#.len().to_string()
    );
    assert!(seen.get("authorization").is_none());

    // The gateway's own tenant headers are read, not forwarded.
    let mut req = post(chat(), Some("client-1"), r#"{"model":"gpt-4o"}"#);
    req.headers_mut()
        .insert("x-llm-lb-priority", http::HeaderValue::from_static("batch"));
    req.headers_mut()
        .insert("x-llm-lb-tenant", http::HeaderValue::from_static("team-a"));
    assert_eq!(send(req).await.status(), 200);
    let seen = &primary.requests()[1].headers;
    assert!(seen.get("x-llm-lb-priority").is_none() && seen.get("x-llm-lb-tenant").is_none());

    let res = send(post(chat(), Some("client-1"), r#"{"stream":true}"#)).await;
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let body = text(res).await;
    assert_eq!(body.matches("data: {").count(), 4);
    assert!(body.ends_with("data: [DONE]\n\n"));

    assert_eq!(send(post(chat(), Some("wrong"), "{}")).await.status(), 401);
    assert_eq!(send(post(chat(), None, "{}")).await.status(), 401);
    let models = http::Request::get(format!("{}/v1/models", gw.url))
        .header("api-key", "client-1")
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = send(models).await;
    let status = res.status();
    assert_eq!(status, 200, "{}", text(res).await);
    assert_eq!(backup.counters().requests, 0);
}

#[tokio::test(start_paused = true)]
async fn throttled_then_served_by_the_fallback_and_all_down_is_a_clear_error() {
    let (primary, backup) = mocks().await;
    let gw = start(&config(&primary, &backup)).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);
    primary.set_fault(Some(Fault::Status(429)));
    let res = send(post(chat(), Some("client-1"), r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "backup");
    let attempts = res.headers()["x-llm-lb-attempts"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(attempts.starts_with("primary=throttled"), "{attempts}");
    // The same count, as a number.
    let count: usize = res.headers()["x-llm-lb-attempt-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(count, attempts.split(", ").count());
    let body: serde_json::Value = serde_json::from_slice(&backup.requests()[0].body).unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");

    // Everything down (fresh backends, so no cooldown from above is in play).
    let (primary, backup) = mocks().await;
    let gw = start(&config(&primary, &backup)).await;
    backup.set_fault(Some(Fault::Status(503)));
    primary.set_fault(Some(Fault::Status(500)));
    let res = send(post(
        format!("{}/v1/chat/completions", gw.url),
        Some("client-1"),
        "{}",
    ))
    .await;
    assert_eq!(res.status(), 502);
    let err: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("primary: server error 500") && msg.contains("backup: server error 503"),
        "{msg}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_upstream_ends_with_an_sse_error_event() {
    let (primary, backup) = mocks().await;
    primary.set_fault(Some(Fault::TruncateStream(2)));
    let gw = start(&config(&primary, &backup)).await;
    let res = send(post(
        format!("{}/v1/chat/completions", gw.url),
        Some("client-1"),
        r#"{"stream":true}"#,
    ))
    .await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut seen = String::new();
    let mut ended_in_error = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => seen.push_str(&String::from_utf8_lossy(&f.into_data().unwrap_or_default())),
            Err(_) => {
                ended_in_error = true;
                break;
            }
        }
    }
    assert!(seen.contains("event: error"), "{seen}");
    assert!(!seen.contains("[DONE]"));
    assert!(ended_in_error, "the stream must not end cleanly");
}

#[tokio::test(start_paused = true)]
async fn stats_report_each_backend_and_shutdown_lets_in_flight_requests_finish() {
    let primary = MockServer::builder()
        .name("primary")
        .api_key("k-primary")
        .latency(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let backup = MockServer::builder()
        .name("backup")
        .bearer("k-backup")
        .start()
        .await
        .unwrap();
    let mut gw = start(&config(&primary, &backup)).await;
    let slow = tokio::spawn(send(post(
        format!("{}/v1/chat/completions", gw.url),
        Some("client-1"),
        "{}",
    )));
    // Wait until the request is in the backend, then ask the gateway to stop.
    // Bounded: a request that never arrives fails the test instead of hanging it.
    for waited in 0.. {
        if primary.counters().in_flight > 0 {
            break;
        }
        assert!(waited < 10_000, "the request never reached the backend");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = http::Request::get(format!("{}/stats", gw.url))
        .header("authorization", "Bearer client-1")
        .body(Full::<Bytes>::default())
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&text(send(stats).await).await).unwrap();
    let names: Vec<_> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["backup", "primary"]);
    assert_eq!(stats["backends"][1]["in_flight"], 1);
    // Nothing learned of a token quota yet: its count per token of our estimate is 1.
    assert_eq!(stats["backends"][1]["token_ratio"], 1.0);
    gw.shutdown.take().unwrap().send(()).unwrap();
    let res = slow.await.unwrap();
    assert_eq!(res.status(), 200, "the in-flight request finished");
    gw.task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_client_keys_only_loopback_is_served() {
    let (primary, backup) = mocks().await;
    let json = config(&primary, &backup).replace(
        r#""gateway": { "client_keys": ["client-1"] }"#,
        r#""gateway": {}"#,
    );
    let gw = start(&json).await;
    let res = send(post(format!("{}/v1/chat/completions", gw.url), None, "{}")).await;
    assert_eq!(res.status(), 200, "loopback client served without a key");
}

#[tokio::test(start_paused = true)]
async fn the_mock_mode_config_serves_through_its_embedded_backends() {
    let (_mocks, json) = tower_llm_lb_gateway::mock_backends().await.unwrap();
    let gw = start(&json).await;
    let chat = format!("{}/v1/chat/completions", gw.url);
    let res = send(post(chat.clone(), None, r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "ptu-eastus");
    // The alias reaches the same backends; embeddings go to the embeddings deployment.
    let res = send(post(chat.clone(), None, r#"{"model":"gpt-4"}"#)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "ptu-eastus");
    let res = send(post(
        format!("{}/v1/embeddings", gw.url),
        None,
        r#"{"model":"text-embedding-3-small","input":"hi"}"#,
    ))
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "embed-eastus");
    // The Anthropic backend answers an OpenAI-shaped request in OpenAI's shape.
    let res = send(post(
        chat.clone(),
        None,
        r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#,
    ))
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "claude");
    let answer: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    let res = send(post(chat, None, r#"{"model":"gpt-5"}"#)).await;
    assert_eq!(res.status(), 404, "an unknown model");
    assert_eq!(
        model_ids(&gw.url).await,
        [
            "claude-sonnet-4-5",
            "gpt-4",
            "gpt-4o",
            "text-embedding-3-small"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_alias_is_sent_as_its_model_and_a_bad_alias_is_a_config_error_naming_it() {
    let m = MockServer::builder()
        .name("chat")
        .bearer("k")
        .record_requests(true)
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{ "chat": {{ "provider": "openai", "url": "{}/v1", "api_key": "k",
                                     "models": ["gpt-4o"] }} }},
             "gateway": {{ "model_aliases": {{ "smart": "gpt-4o" }} }} }}"#,
        m.url()
    );
    let gw = start(&json).await;
    let res = send(post(
        format!("{}/v1/chat/completions", gw.url),
        None,
        r#"{"model":"smart","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#,
    ))
    .await;
    assert_eq!(res.status(), 200);
    let sent: serde_json::Value = serde_json::from_slice(&m.requests()[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o");
    assert_eq!(sent["temperature"], 0.5, "the rest of the body as it was");
    // The rewritten body's own length, not the caller's.
    assert_eq!(
        m.requests()[0].headers["content-length"],
        m.requests()[0].body.len().to_string()
    );

    let config = |aliases: &str| {
        let json = format!(
            r#"{{ "backends": {{ "chat": {{ "provider": "openai", "url": "{}/v1", "api_key": "k",
                                         "models": ["gpt-4o"] }} }} }}"#,
            m.url()
        );
        let (svc, backends) = Config::from_json(&json)
            .unwrap()
            .build_with_backends(http_client())
            .unwrap();
        Gateway::new(svc, backends, Vec::new())
            .model_aliases(serde_json::from_str(aliases).unwrap())
            .map(|_| ())
    };
    assert_eq!(
        config(r#"{"smart": "gpt-5"}"#).unwrap_err(),
        r#"gateway.model_aliases.smart: no backend declares the model "gpt-5""#
    );
    assert_eq!(
        config(r#"{"gpt-4o": "gpt-4o"}"#).unwrap_err(),
        "gateway.model_aliases.gpt-4o: a backend declares this model itself"
    );
}

#[tokio::test(start_paused = true)]
async fn when_every_backend_fails_the_answer_is_a_502_listing_the_attempts_not_a_429() {
    let (a, b) = (
        MockServer::builder().api_key("ka").start().await.unwrap(),
        MockServer::builder().api_key("kb").start().await.unwrap(),
    );
    a.set_fault(Some(Fault::Status(500)));
    b.set_fault(Some(Fault::Status(503)));
    let json = serde_json::json!({ "backends": {
        "a": { "provider": "azure", "url": a.url(), "deployment": "gpt-4o", "api_key": "ka" },
        "b": { "provider": "azure", "url": b.url(), "deployment": "gpt-4o", "api_key": "kb" },
    }})
    .to_string();
    let gw = start(&json).await;
    for _ in 0..12 {
        let res = send(post(format!("{}/v1/chat/completions", gw.url), None, "{}")).await;
        let status = res.status();
        let body = text(res).await;
        // A backend's own 5xx may come back as it is when the attempts ran out; a summary of
        // failed attempts is a 502. Never a 429: nothing was throttled.
        assert!(status.is_server_error(), "{status}: {body}");
        if status == 502 {
            assert!(body.contains("upstream_error"), "{body}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_request_carries_a_request_id_to_the_backend_and_back() {
    let m = MockServer::builder().api_key("k").start().await.unwrap();
    let json = serde_json::json!({ "backends": {
        "a": { "provider": "azure", "url": m.url(), "deployment": "gpt-4o", "api_key": "k" },
    }})
    .to_string();
    let gw = start(&json).await;
    // None sent: one is made, given to the backend, and echoed.
    let res = send(post(format!("{}/v1/chat/completions", gw.url), None, "{}")).await;
    assert_eq!(res.status(), 200);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(m.requests()[0].headers["x-request-id"], id.as_str());
    // One sent: kept.
    let mut req = post(format!("{}/v1/chat/completions", gw.url), None, "{}");
    req.headers_mut()
        .insert("x-request-id", "caller-chose-this".parse().unwrap());
    let res = send(req).await;
    assert_eq!(res.headers()["x-request-id"], "caller-chose-this");
    assert_eq!(m.requests()[1].headers["x-request-id"], "caller-chose-this");
}

#[tokio::test(start_paused = true)]
async fn a_backend_rejecting_the_configured_key_is_a_502_that_never_shows_its_answer() {
    let m = MockServer::builder()
        .api_key("right")
        .start()
        .await
        .unwrap();
    let json = serde_json::json!({ "backends": {
        "a": { "provider": "azure", "url": m.url(), "deployment": "gpt-4o", "api_key": "stale-secret-key" },
    }})
    .to_string();
    let gw = start(&json).await;
    let res = send(post(format!("{}/v1/chat/completions", gw.url), None, "{}")).await;
    assert_eq!(res.status(), 502);
    let body = text(res).await;
    assert!(body.contains("upstream_auth_error"), "{body}");
    assert!(body.contains("credential rejected"), "{body}");
    assert!(!body.contains("stale-secret-key"), "{body}");
}

#[tokio::test(start_paused = true)]
async fn an_error_body_that_is_not_json_becomes_an_openai_shaped_error_with_its_status() {
    let m = MockServer::builder().api_key("k").start().await.unwrap();
    let json = serde_json::json!({ "backends": {
        "a": { "provider": "azure", "url": m.url(), "deployment": "gpt-4o", "api_key": "k" },
    }})
    .to_string();
    let gw = start(&json).await;
    let ask = || async {
        let res = send(post(format!("{}/v1/chat/completions", gw.url), None, "{}")).await;
        let status = res.status();
        let body = text(res).await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        (status, v)
    };
    // A proxy's HTML page.
    m.set_fault(Some(Fault::Page(
        400,
        "<html><body><h1>400 Bad Request</h1>\r\n\u{1}nginx</body></html>".into(),
    )));
    let (status, v) = ask().await;
    assert_eq!(status, 400);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("400 Bad Request"), "{message}");
    assert!(
        !message.contains('\u{1}') && !message.contains('\n'),
        "sanitised: {message}"
    );
    assert_eq!(v["error"]["type"], "upstream_error");
    // An empty 503 (every attempt fails the same way).
    m.set_fault(Some(Fault::Page(503, String::new())));
    let (status, v) = ask().await;
    assert!(status.is_server_error(), "{status}");
    assert!(v["error"]["message"].is_string(), "{v}");
    // A JSON error passes as it came.
    m.set_fault(Some(Fault::Status(404)));
    let (status, v) = ask().await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["message"], "injected fault");
}

#[tokio::test(start_paused = true)]
async fn every_backend_throttled_is_a_429_with_an_honest_wait_and_health_answers_without_a_backend()
{
    let m = MockServer::builder()
        .name("tiny")
        .api_key("k")
        .rps(1.0)
        .azure_headers()
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{ "tiny": {{ "provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "k" }} }},
             "retry": {{ "max_wait_ms": 0 }} }}"#,
        m.url()
    );
    let gw = start(&json).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);
    let mut throttled = None;
    for _ in 0..5 {
        let res = send(post(chat(), None, r#"{"messages":[]}"#)).await;
        if res.status() == 429 {
            throttled = Some(res);
            break;
        }
    }
    let res = throttled.expect("a 1 request/s backend asked 5 times at once throttles");
    let secs: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let ms: u64 = res.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=120).contains(&secs), "whole seconds, never 0: {secs}");
    assert!((1..=120_000).contains(&ms), "never 0: {ms}");
    // OpenAI-shaped (here the backend's own 429 body, passed on).
    let body: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    // Waiting as told, the next request is served.
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    assert_eq!(
        send(post(chat(), None, r#"{"messages":[]}"#))
            .await
            .status(),
        200
    );

    // `/health` answers without touching a backend.
    let before = m.counters().requests;
    let health = send(
        http::Request::get(format!("{}/health", gw.url))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(health.status(), 200);
    assert_eq!(m.counters().requests, before);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_gateway_s_limit_is_a_413_and_never_reaches_a_backend() {
    let m = MockServer::builder().api_key("k").start().await.unwrap();
    let config = Config::from_json(&format!(
        r#"{{ "backends": {{ "a": {{ "provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "k" }} }} }}"#,
        m.url()
    ))
    .unwrap();
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        Gateway::new(svc, backends, vec![])
            .body_limit(1024)
            .serve(listener, std::future::pending()),
    );
    let big: &'static str =
        Box::leak(format!(r#"{{"messages":"{}"}}"#, "x".repeat(4096)).into_boxed_str());
    let res = send(post(format!("{url}/v1/chat/completions"), None, big)).await;
    assert_eq!(res.status(), 413);
    let body: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
    assert_eq!(m.counters().requests, 0);
    server.abort();
}

#[tokio::test(start_paused = true)]
async fn a_backend_echoing_its_own_key_never_passes_it_to_the_caller() {
    let m = MockServer::builder()
        .name("echo")
        .api_key("sk-echo-secret-123")
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{ "echo": {{ "provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "sk-echo-secret-123" }} }},
             "retry": {{ "max_wait_ms": 0, "failures": false }} }}"#,
        m.url()
    );
    let gw = start(&json).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);
    // In a JSON error body (a 500 quoting the header it got), and in a header of a 429.
    m.set_fault(Some(Fault::Page(
        500,
        r#"{"error":{"message":"bad request with api-key sk-echo-secret-123","type":"server_error"}}"#.into(),
    )));
    let res = send(post(chat(), None, "{}")).await;
    assert_eq!(res.status(), 500);
    let body = text(res).await;
    assert!(!body.contains("sk-echo-secret-123"), "{body}");
    assert!(body.contains("[redacted]"), "{body}");
    m.set_fault(Some(Fault::Throttle(vec![
        ("retry-after".into(), "1".into()),
        ("x-debug".into(), "key=sk-echo-secret-123".into()),
    ])));
    let res = send(post(chat(), None, "{}")).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-debug"], "[redacted]");
    assert!(!text(res).await.contains("sk-echo-secret-123"));
}

#[tokio::test(start_paused = true)]
async fn requests_go_to_the_backends_serving_their_model_and_an_unknown_model_is_a_404() {
    let chat_mock = MockServer::builder()
        .name("chat")
        .bearer("k-chat")
        .record_requests(true)
        .start()
        .await
        .unwrap();
    let embed_mock = MockServer::builder()
        .name("embed")
        .bearer("k-embed")
        .record_requests(true)
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{
               "chat":  {{ "provider": "openai", "url": "{}/v1", "api_key": "k-chat", "models": ["gpt-4o", "gpt-4o-mini"] }},
               "embed": {{ "provider": "openai", "url": "{}/v1", "api_key": "k-embed", "models": ["text-embedding-3-small"] }}
             }} }}"#,
        chat_mock.url(),
        embed_mock.url()
    );
    let gw = start(&json).await;
    for _ in 0..4 {
        let res = send(post(
            format!("{}/v1/chat/completions", gw.url),
            None,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .await;
        assert_eq!(res.status(), 200);
        let res = send(post(
            format!("{}/v1/embeddings", gw.url),
            None,
            r#"{"model":"text-embedding-3-small","input":"hi"}"#,
        ))
        .await;
        assert_eq!(res.status(), 200);
    }
    assert!(
        chat_mock
            .requests()
            .iter()
            .all(|r| r.path_and_query.contains("chat"))
    );
    assert!(
        embed_mock
            .requests()
            .iter()
            .all(|r| r.path_and_query.contains("embeddings"))
    );
    assert_eq!(chat_mock.counters().requests, 4);
    assert_eq!(embed_mock.counters().requests, 4);

    let res = send(post(
        format!("{}/v1/chat/completions", gw.url),
        None,
        r#"{"model":"o9-preview","messages":[]}"#,
    ))
    .await;
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let res = send(
        http::Request::get(format!("{}/v1/models", gw.url))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    let ids: Vec<_> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]);
    assert_eq!(
        chat_mock.counters().requests + embed_mock.counters().requests,
        8
    );
}

#[tokio::test(start_paused = true)]
async fn no_secret_reaches_a_log_line_across_balance_retry_fallback_and_the_gateway() {
    let captured = common::Captured::default();
    let _guard = captured.install();
    let azure_mock = |name: &'static str, key: &'static str| async move {
        MockServer::builder()
            .name(name)
            .api_key(key)
            .azure_headers()
            .stream_chunks(3)
            .start()
            .await
            .unwrap()
    };
    // Throttled (1 req/s), failing, holding another key than the config's, echoing its key in
    // its error body; then a healthy backup behind a fallback.
    let throttled = MockServer::builder()
        .name("throttled")
        .api_key("sk-log-throttle-1")
        .rps(1.0)
        .azure_headers()
        .start()
        .await
        .unwrap();
    let failing = azure_mock("failing", "sk-log-fail-2").await;
    failing.set_fault(Some(Fault::Status(500)));
    let stale = azure_mock("stale", "rotated-key").await;
    let echo = azure_mock("echo", "sk-log-echo-4").await;
    echo.set_fault(Some(Fault::Page(
        503,
        "upstream refused api-key sk-log-echo-4".into(),
    )));
    let backup = MockServer::builder()
        .name("backup")
        .bearer("sk-log-backup-5")
        .stream_chunks(3)
        .start()
        .await
        .unwrap();
    let azure = |m: &MockServer, key: &str| {
        format!(
            r#"{{ "provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "{key}" }}"#,
            m.url()
        )
    };
    let json = format!(
        r#"{{
          "backends": {{
            "throttled": {t}, "failing": {f}, "stale": {s}, "echo": {e},
            "backup": {{ "provider": "openai", "url": "{b}/v1", "api_key": "sk-log-backup-5" }}
          }},
          "strategy": {{ "mode": "fallback" }},
          "targets": [
            {{ "strategy": {{ "mode": "loadbalance" }},
               "targets": [ {{ "backend": "throttled" }}, {{ "backend": "failing" }},
                            {{ "backend": "stale" }}, {{ "backend": "echo" }} ] }},
            {{ "backend": "backup" }}
          ],
          "gateway": {{ "client_keys": ["client-secret-6"] }}
        }}"#,
        t = azure(&throttled, "sk-log-throttle-1"),
        f = azure(&failing, "sk-log-fail-2"),
        s = azure(&stale, "sk-log-stale-3"),
        e = azure(&echo, "sk-log-echo-4"),
        b = backup.url()
    );
    let gw = start(&json).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let body: &'static str = if i % 2 == 0 {
            r#"{"model":"gpt-4o","messages":[]}"#
        } else {
            r#"{"model":"gpt-4o","stream":true,"messages":[]}"#
        };
        let mut req = post(url.clone(), Some("client-secret-6"), body);
        // A caller key of its own on top: stripped, never logged.
        req.headers_mut()
            .insert("api-key", "caller-secret-8".parse().unwrap());
        tasks.spawn(async move {
            let res = send(req).await;
            let status = res.status();
            text(res).await;
            status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    // A caller with a wrong key is turned away (and its key is not logged either).
    let res = send(post(url.clone(), Some("client-wrong-secret-7"), "{}")).await;
    assert_eq!(res.status(), 401);

    let logs = captured.text();
    // Every level of every crate was captured: the stack's picks and retries, hyper's traces.
    assert!(logs.contains("tower_llm_lb::balance: picked") && logs.contains("hyper"));
    assert!(
        logs.contains("stale"),
        "the rejected key is logged by backend name: {logs}"
    );
    for secret in [
        "sk-log-throttle-1",
        "sk-log-fail-2",
        "sk-log-stale-3",
        "sk-log-echo-4",
        "sk-log-backup-5",
        "client-secret-6",
        "client-wrong-secret-7",
        "caller-secret-8",
    ] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
    assert!(failing.counters().requests > 0 && echo.counters().requests > 0);
    assert!(stale.counters().unauthorized > 0);
}

#[tokio::test(start_paused = true)]
async fn metrics_count_answers_by_route_and_status_and_each_backend_s_outcomes() {
    let (primary, backup) = mocks().await;
    let gw = start(&config(&primary, &backup)).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);
    for _ in 0..3 {
        let res = send(post(chat(), Some("client-1"), r#"{"model":"gpt-4o"}"#)).await;
        assert_eq!(res.status(), 200);
        text(res).await;
    }
    // Turned away: counted under its status.
    assert_eq!(send(post(chat(), None, "{}")).await.status(), 401);
    primary.set_fault(Some(Fault::Status(500)));
    let res = send(post(chat(), Some("client-1"), "{}")).await;
    assert_eq!(res.status(), 200, "served by the backup");
    text(res).await;

    let metrics = || format!("{}/metrics", gw.url);
    assert_eq!(
        send(get(metrics(), None)).await.status(),
        401,
        "same rule as /stats"
    );
    let res = send(get(metrics(), Some("client-1"))).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let body = text(res).await;
    let line = |needle: &str| {
        body.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in:\n{body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    let chat_route = r#"route="/v1/chat/completions""#;
    assert_eq!(
        line(&format!(
            r#"llm_lb_requests_total{{{chat_route},status="200",client="key-1"}}"#
        )),
        4.0
    );
    assert_eq!(
        line(&format!(
            r#"llm_lb_requests_total{{{chat_route},status="401",client="refused"}}"#
        )),
        1.0
    );
    assert_eq!(
        line(&format!(
            r#"llm_lb_request_duration_seconds_count{{{chat_route},status="200"}}"#
        )),
        4.0
    );
    assert_eq!(
        line(r#"llm_lb_backend_attempts_total{backend="primary",outcome="success"}"#),
        3.0
    );
    assert!(
        line(r#"llm_lb_backend_attempts_total{backend="primary",outcome="server_error"}"#) >= 1.0
    );
    assert_eq!(
        line(r#"llm_lb_backend_attempts_total{backend="backup",outcome="success"}"#),
        1.0
    );
    assert_eq!(line(r#"llm_lb_backend_in_flight{backend="primary"}"#), 0.0);
    // The failed-over request's attempts: primary's 500, then the backup; 4 served requests
    // and every attempt timed, by backend and outcome.
    assert!(line("llm_lb_retries_total") >= 1.0);
    assert!(
        line(r#"llm_lb_attempt_duration_seconds_count{backend="primary",outcome="server_error"}"#)
            >= 1.0
    );
    assert_eq!(
        line(r#"llm_lb_attempt_duration_seconds_count{backend="backup",outcome="success"}"#),
        1.0
    );
    assert_eq!(
        line(r#"llm_lb_wait_duration_seconds_count{client="key-1"}"#),
        4.0
    );
    assert!(body.contains("# TYPE llm_lb_backend_circuit_open gauge"));
    assert!(body.trim_end().ends_with("# EOF"));
    for secret in ["k-primary", "k-backup", "client-1"] {
        assert!(!body.contains(secret), "{secret} in /metrics");
    }
}

#[tokio::test(start_paused = true)]
async fn tokens_reported_in_answers_are_counted_per_backend_and_model() {
    let m = MockServer::builder()
        .name("chat")
        .bearer("k-chat")
        .stream_chunks(3)
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{ "chat": {{ "provider": "openai", "url": "{}/v1", "api_key": "k-chat",
                                     "models": ["gpt-4o"] }} }},
             "gateway": {{ "client_keys": ["client-1"] }} }}"#,
        m.url()
    );
    let gw = start(&json).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);
    // A plain answer: its `usage` object; a stream that asked for usage: its last chunk; a
    // stream that did not: nothing to count.
    for body in [
        r#"{"model":"gpt-4o","max_tokens":10,"messages":[]}"#,
        r#"{"model":"gpt-4o","max_tokens":10,"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        r#"{"model":"gpt-4o","max_tokens":10,"stream":true,"messages":[]}"#,
    ] {
        let res = send(post(chat(), Some("client-1"), body)).await;
        assert_eq!(res.status(), 200);
        text(res).await;
    }
    let res = send(get(format!("{}/metrics", gw.url), Some("client-1"))).await;
    let body = text(res).await;
    let value = |labels: &str| {
        body.lines()
            .find(|l| l.starts_with(&format!("llm_lb_tokens_total{{{labels}}}")))
            .unwrap_or_else(|| panic!("no tokens for {labels} in:\n{body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    // The mock reports 4 completion tokens for a plain answer and one per chunk (3) for a
    // stream; prompt tokens are its estimate of the request.
    assert_eq!(
        value(r#"backend="chat",model="gpt-4o",kind="completion""#),
        4 + 3
    );
    assert!(value(r#"backend="chat",model="gpt-4o",kind="prompt""#) > 0);
    // And by client: the first configured key, never the key itself.
    let by_client = body
        .lines()
        .find(|l| l.starts_with(r#"llm_lb_client_tokens_total{client="key-1",kind="completion"}"#))
        .unwrap_or_else(|| panic!("no client tokens in:\n{body}"));
    assert!(by_client.ends_with(" 7"), "{by_client}");
    assert!(!body.contains("client-1"));
    // /stats has the totals too.
    let res = send(get(format!("{}/stats", gw.url), Some("client-1"))).await;
    let stats: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(stats["backends"][0]["tokens"]["completion"], 7);
}

#[tokio::test(start_paused = true)]
async fn usage_asked_for_on_a_callers_behalf_is_counted_and_never_reaches_the_caller() {
    let m = MockServer::builder()
        .name("chat")
        .stream_chunks(3)
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{ "chat": {{ "provider": "openai", "url": "{}/v1", "models": ["gpt-4o"] }} }},
             "gateway": {{ "client_keys": ["client-1"], "stream_usage": true }} }}"#,
        m.url()
    );
    let gw = start(&json).await;
    let chat = || format!("{}/v1/chat/completions", gw.url);
    // The caller did not ask: the backend is asked, the caller gets no usage chunk.
    let res = send(post(
        chat(),
        Some("client-1"),
        r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
    ))
    .await;
    assert_eq!(res.status(), 200);
    let body = text(res).await;
    assert!(!body.contains("usage"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(body.matches("tok").count(), 3);
    let sent: serde_json::Value = serde_json::from_slice(&m.requests()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // The caller asked: the chunk is theirs.
    let res = send(post(
        chat(),
        Some("client-1"),
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    ))
    .await;
    assert!(text(res).await.contains(r#""usage""#));
    let res = send(get(format!("{}/stats", gw.url), Some("client-1"))).await;
    let stats: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(
        stats["backends"][0]["tokens"]["completion"],
        3 + 3,
        "both streams counted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_under_way_finishes_on_the_old_config_while_new_requests_use_the_new_one() {
    let old = MockServer::builder()
        .name("old")
        .bearer("k-old")
        .stream_chunks(3)
        .gated_stream()
        .start()
        .await
        .unwrap();
    let new = MockServer::builder()
        .name("new")
        .bearer("k-new")
        .start()
        .await
        .unwrap();
    let config = |name: &str, m: &MockServer, key: &str| {
        format!(
            r#"{{ "backends": {{ "{name}": {{ "provider": "openai", "url": "{}/v1", "api_key": "{key}" }} }} }}"#,
            m.url()
        )
    };
    let (svc, backends) = Config::from_json(&config("old", &old, "k-old"))
        .unwrap()
        .build_with_backends(http_client())
        .unwrap();
    let gateway = Gateway::new(svc, backends, Vec::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.clone().serve(listener, async {
        let _ = stopped.await;
    }));

    // A stream starts on the old backend and is held after its first chunk.
    let res = send(post(
        url.clone(),
        None,
        r#"{"model":"gpt-4o","stream":true}"#,
    ))
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-llm-lb-backend"], "old");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"));

    // Reload: the new backend only.
    let (svc, backends) = Config::from_json(&config("new", &new, "k-new"))
        .unwrap()
        .build_reusing(http_client(), &gateway.backends())
        .unwrap();
    gateway
        .replace(svc, backends, Vec::new(), Default::default(), Vec::new())
        .unwrap();
    let res = send(post(url.clone(), None, r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(res.headers()["x-llm-lb-backend"], "new");
    assert_eq!(res.status(), 200);

    // The stream under way still ends whole, from the old backend.
    old.release_chunks(2);
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        rest.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert!(
        String::from_utf8(rest)
            .unwrap()
            .ends_with("data: [DONE]\n\n"),
        "cut by the reload"
    );
    assert_eq!(old.counters().requests, 1);
    assert_eq!(new.counters().ok, 1);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

#[tokio::test(start_paused = true)]
async fn a_models_map_routes_each_model_to_its_own_target_and_lists_them() {
    let (a, b, e) = (
        MockServer::builder()
            .name("a")
            .bearer("ka")
            .record_requests(true)
            .start()
            .await
            .unwrap(),
        MockServer::builder()
            .name("b")
            .bearer("kb")
            .start()
            .await
            .unwrap(),
        MockServer::builder()
            .name("e")
            .bearer("ke")
            .start()
            .await
            .unwrap(),
    );
    let openai = |m: &MockServer, key: &str| {
        format!(
            r#"{{ "provider": "openai", "url": "{}/v1", "api_key": "{key}" }}"#,
            m.url()
        )
    };
    let json = format!(
        r#"{{ "backends": {{ "a": {a}, "b": {b}, "e": {e} }},
             "models": {{
               "gpt-4o": {{ "strategy": {{ "mode": "fallback" }},
                            "targets": [ {{ "backend": "a" }}, {{ "backend": "b" }} ] }},
               "gpt-4": {{ "backend": "a", "override_params": {{ "model": "gpt-4o" }} }},
               "text-embedding-3-small": {{ "backend": "e" }}
             }} }}"#,
        a = openai(&a, "ka"),
        b = openai(&b, "kb"),
        e = openai(&e, "ke")
    );
    let gw = start(&json).await;
    let ask = |path: &str, body: &'static str| post(format!("{}{path}", gw.url), None, body);
    let res = send(ask("/v1/chat/completions", r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(res.headers()["x-llm-lb-backend"], "a");
    let res = send(ask(
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"x"}"#,
    ))
    .await;
    assert_eq!(res.headers()["x-llm-lb-backend"], "e");
    // A model's own target may rewrite the model (an alias with its own target).
    let res = send(ask("/v1/chat/completions", r#"{"model":"gpt-4"}"#)).await;
    assert_eq!(res.status(), 200);
    let sent: serde_json::Value = serde_json::from_slice(&a.requests()[1].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o");
    // gpt-4o falls back to b when a fails; gpt-4 has no fallback.
    a.set_fault(Some(Fault::Status(500)));
    let res = send(ask("/v1/chat/completions", r#"{"model":"gpt-4o"}"#)).await;
    assert_eq!(res.headers()["x-llm-lb-backend"], "b");
    // Not in the map: 404, nothing sent.
    let before = a.counters().requests + b.counters().requests + e.counters().requests;
    let res = send(ask("/v1/chat/completions", r#"{"model":"gpt-5"}"#)).await;
    assert_eq!(res.status(), 404);
    assert!(text(res).await.contains("model_not_found"));
    assert_eq!(
        a.counters().requests + b.counters().requests + e.counters().requests,
        before
    );
    assert_eq!(
        model_ids(&gw.url).await,
        ["gpt-4", "gpt-4o", "text-embedding-3-small"]
    );
}

#[tokio::test]
async fn health_answers_503_draining_once_shutdown_began() {
    let (primary, backup) = mocks().await;
    let config = Config::from_json(&config(&primary, &backup)).unwrap();
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    let gateway = Gateway::new(svc, backends, Vec::new());
    // A router over the same gateway: it sees what the serving one does.
    let app = gateway.clone().router();
    let health = || async {
        let res = app
            .clone()
            .oneshot(
                http::Request::get("/health")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway.serve(listener, async {
        let _ = rx.await;
    }));
    assert_eq!(
        health().await,
        (http::StatusCode::OK, r#"{"status":"ok"}"#.into())
    );
    tx.send(()).unwrap();
    served.await.unwrap().unwrap();
    assert_eq!(
        health().await,
        (
            http::StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"draining"}"#.into()
        )
    );
}

/// The library keeps the `gateway` section as written; the gateway reads it, naming a bad
/// field by its path, and the config's Debug never shows the client keys in it.
#[test]
fn the_gateway_section_is_read_by_the_gateway_naming_bad_fields() {
    let read = |gateway: &str| {
        let json = format!(r#"{{"targets": [], "gateway": {gateway}}}"#);
        GatewayConfig::of(&Config::from_json(&json).unwrap())
    };
    let err = read(r#"{"max_connections": "many"}"#).unwrap_err();
    assert!(
        err.starts_with("gateway.max_connections: invalid type"),
        "{err}"
    );
    let err = read(r#"{"tls": {"cert_file": "a.pem"}}"#).unwrap_err();
    assert!(
        err.starts_with("gateway.tls: missing field `key_file`"),
        "{err}"
    );
    let err = read(r#"{"listne": "127.0.0.1:1"}"#).unwrap_err();
    assert!(err.contains("unknown field `listne`"), "{err}");

    let config = Config::from_json(
        r#"{"targets": [], "gateway": {"client_keys": ["sk-client-secret"], "listen": "127.0.0.1:9"}}"#,
    )
    .unwrap();
    let g = GatewayConfig::of(&config).unwrap();
    assert_eq!(g.client_keys, ["sk-client-secret"]);
    assert_eq!(g.listen.as_deref(), Some("127.0.0.1:9"));
    for shown in [format!("{config:?}"), format!("{g:?}")] {
        assert!(!shown.contains("sk-client-secret"), "{shown}");
    }
    let none = GatewayConfig::of(&Config::from_json(r#"{"targets": []}"#).unwrap()).unwrap();
    assert!(none.client_keys.is_empty() && none.listen.is_none());
}

/// `gateway.tenants` is checked when the gateway applies it, naming the bad field.
#[tokio::test(start_paused = true)]
async fn tenant_settings_are_checked_naming_the_field() {
    let (primary, backup) = mocks().await;
    let with = |tenants: &str| {
        let json = config(&primary, &backup).replace(
            r#""client_keys": ["client-1"]"#,
            &format!(r#""client_keys": ["client-1"], "tenants": {tenants}"#),
        );
        let config = Config::from_json(&json).unwrap();
        let (svc, backends) = config.build_with_backends(http_client()).unwrap();
        Gateway::new(svc, backends, Vec::new())
            .configured(&config)
            .map(|_| ())
    };
    assert!(with(r#"{"key-1": {"weight": 3, "priority": "batch"}}"#).is_ok());
    let err = with(r#"{"key-1": {"priority": "urgent"}}"#).unwrap_err();
    assert!(err.starts_with("gateway.tenants.key-1.priority"), "{err}");
    let err = with(r#"{"key-1": {"weight": 0}}"#).unwrap_err();
    assert!(err.starts_with("gateway.tenants.key-1.weight"), "{err}");
}
