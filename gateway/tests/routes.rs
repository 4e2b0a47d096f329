//! Routes and mixed-provider configs through the gateway over real sockets: every `/v1/*`
//! route goes to a backend whose provider serves it (as it is or translated), never to one
//! that speaks another API; a route no backend serves is refused before sending, in the
//! caller's API shape; seed 001's config (an Anthropic arm beside a nested OpenAI -> Azure
//! fallback arm) serves as written.

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_llm_lb::client::http_client;
use tower_llm_lb_mock::MockServer;

async fn call(method: &str, url: String, body: Option<Value>) -> (u16, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(
            body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
        ))
        .unwrap();
    let res = http_client().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn each_route_goes_to_a_backend_that_serves_it_and_no_other() {
    let openai = MockServer::builder()
        .name("openai")
        .bearer("sk-o")
        .start()
        .await
        .unwrap();
    let claude = MockServer::builder()
        .name("claude")
        .x_api_key("sk-a")
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{
              "openai": {{ "provider": "openai", "url": "{o}/v1", "api_key": "sk-o" }},
              "claude": {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-a" }} }} }}"#,
        o = openai.url(),
        a = claude.url()
    );
    let (url, _stop) = common::serve_json(&json).await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    // OpenAI's routes beyond chat: only the OpenAI backend can serve them, every time.
    for _ in 0..6 {
        let (status, body) = call(
            "POST",
            format!("{url}/v1/embeddings"),
            Some(json!({"model": "m", "input": "x"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(
            "POST",
            format!("{url}/v1/moderations"),
            Some(json!({"model": "m", "input": "x"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["flagged"], false);
        let (status, body) = call(
            "POST",
            format!("{url}/v1/responses"),
            Some(json!({"model": "m", "input": "x"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // Anthropic's token count: only the Anthropic backend.
        let (status, body) = call(
            "POST",
            format!("{url}/v1/messages/count_tokens"),
            Some(json!({"model": "m", "messages": messages})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["input_tokens"].as_u64().is_some(), "{body}");
    }
    let paths = |m: &MockServer| -> Vec<String> {
        m.requests().into_iter().map(|r| r.path_and_query).collect()
    };
    let (o, a) = (paths(&openai), paths(&claude));
    assert!(
        o.iter()
            .all(|p| ["/v1/embeddings", "/v1/moderations", "/v1/responses"].contains(&p.as_str())),
        "{o:?}"
    );
    let count = |v: &[String], p: &str| v.iter().filter(|x| *x == p).count();
    assert_eq!(
        count(&o, "/v1/embeddings") + count(&o, "/v1/moderations"),
        12,
        "{o:?}"
    );
    // The Responses API goes to either: as it is to OpenAI, through the chat translation (as
    // messages) to Anthropic.
    assert_eq!(
        count(&o, "/v1/responses") + count(&a, "/v1/messages"),
        6,
        "{o:?} {a:?}"
    );
    assert_eq!(count(&a, "/v1/messages/count_tokens"), 6, "{a:?}");
    assert_eq!(a.len(), 6 + count(&a, "/v1/messages"), "{a:?}");
}

#[tokio::test]
async fn a_route_no_backend_serves_is_refused_before_sending_in_the_callers_shape() {
    let openai = MockServer::builder().name("openai").start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{ "openai": {{ "provider": "openai", "url": "{o}/v1" }} }} }}"#,
        o = openai.url()
    );
    let (url, _stop) = common::serve_json(&json).await;
    let (status, body) = call(
        "POST",
        format!("{url}/v1/messages/count_tokens"),
        Some(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    // An Anthropic route: Anthropic's error shape, naming the route and who serves it.
    assert_eq!(body["type"], "error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("/v1/messages/count_tokens"), "{message}");
    assert!(message.contains("Anthropic backends"), "{message}");
    assert_eq!(openai.counters().requests, 0);

    let claude = MockServer::builder().name("claude").start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{ "claude": {{ "provider": "anthropic", "url": "{a}" }} }} }}"#,
        a = claude.url()
    );
    let (url, _stop) = common::serve_json(&json).await;
    let (status, body) = call(
        "POST",
        format!("{url}/v1/embeddings"),
        Some(json!({"model": "m", "input": "x"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "route_not_served", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("OpenAI-compatible and Azure"),
        "{body}"
    );
    assert_eq!(claude.counters().requests, 0);
}

/// Seed 001's config as users write it: an Anthropic arm (its own model and `max_tokens`)
/// beside a nested fallback arm (OpenAI, then Azure), half the traffic each.
#[tokio::test]
async fn an_anthropic_arm_beside_a_nested_openai_then_azure_fallback_arm() {
    let claude = MockServer::builder()
        .name("claude")
        .x_api_key("sk-ant")
        .start()
        .await
        .unwrap();
    let openai = MockServer::builder()
        .name("openai")
        .bearer("sk-oai")
        .start()
        .await
        .unwrap();
    let azure = MockServer::builder()
        .name("azure")
        .api_key("az-key")
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{
          "strategy": {{ "mode": "loadbalance" }},
          "targets": [
            {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant", "weight": 0.5,
               "override_params": {{ "model": "claude-sonnet-4-5", "max_tokens": 512 }} }},
            {{ "strategy": {{ "mode": "fallback" }}, "weight": 0.5,
               "targets": [
                 {{ "provider": "openai", "url": "{o}/v1", "api_key": "sk-oai",
                    "override_params": {{ "model": "gpt-4o" }} }},
                 {{ "provider": "azure", "url": "{z}", "deployment": "gpt-4o", "api_key": "az-key" }}
               ] }}
          ]
        }}"#,
        a = claude.url(),
        o = openai.url(),
        z = azure.url()
    );
    let (url, _stop) = common::serve_json(&json).await;
    let ask = || {
        call(
            "POST",
            format!("{url}/v1/chat/completions"),
            Some(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})),
        )
    };
    let n = 200;
    for _ in 0..n {
        let (status, body) = ask().await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["choices"][0]["message"]["content"].is_string(),
            "{body}"
        );
    }
    let (c, o) = (claude.counters().ok, openai.counters().ok);
    assert_eq!(c + o, n);
    // Half each within binomial noise (4 standard deviations of 200 draws: +-14 points).
    assert!((60..=140).contains(&c), "claude {c}, openai {o}");
    assert_eq!(
        azure.counters().requests,
        0,
        "the fallback's second target is idle"
    );
    // The Anthropic arm's overrides, in an Anthropic request.
    for r in claude.requests() {
        let seen: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(seen["max_tokens"], 512);
        assert_eq!(seen["model"], "claude-sonnet-4-5");
        assert_eq!(r.path_and_query, "/v1/messages");
    }
    // OpenAI down: its arm falls back to Azure; every request still answered.
    openai.set_fault(Some(tower_llm_lb_mock::Fault::Status(500)));
    for _ in 0..40 {
        let (status, body) = ask().await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(azure.counters().ok > 0, "azure served the fallback arm");
    assert_eq!(claude.counters().ok + azure.counters().ok, n + 40 - o);
    for m in [&claude, &openai, &azure] {
        assert_eq!(m.counters().foreign_credentials, 0, "{}", m.name());
    }
}

#[tokio::test]
async fn a_multipart_upload_is_routed_by_its_model_field() {
    let chat = MockServer::builder().name("chat").start().await.unwrap();
    let audio = MockServer::builder().name("audio").start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{
              "chat": {{ "provider": "openai", "url": "{c}/v1", "models": ["gpt-4o"] }},
              "audio": {{ "provider": "openai", "url": "{a}/v1", "models": ["whisper-1"] }} }} }}"#,
        c = chat.url(),
        a = audio.url()
    );
    let (url, _stop) = common::serve_json(&json).await;
    let form = "--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
                Content-Type: audio/wav\r\n\r\nRIFF0000\r\n--xyz\r\n\
                Content-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--xyz--\r\n";
    // Twelve: a pick blind to the model would send all of them to `audio` 1 time in 4,096.
    for _ in 0..12 {
        let req = http::Request::post(format!("{url}/v1/audio/transcriptions"))
            .header("content-type", "multipart/form-data; boundary=xyz")
            .body(Full::new(Bytes::from(form)))
            .unwrap();
        let res = http_client().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            answer["text"], "Hello from audio",
            "the transcription, as JSON"
        );
    }
    assert_eq!(audio.counters().requests, 12);
    assert_eq!(chat.counters().requests, 0);
    // The body reached the backend as sent, byte for byte.
    assert_eq!(audio.requests()[0].body, form.as_bytes());
    assert_eq!(
        audio.requests()[0].path_and_query,
        "/v1/audio/transcriptions"
    );
}

/// A binary answer: `POST /v1/audio/speech` (a JSON request as the official SDK sends it) comes
/// back as audio bytes, byte for byte, with its content type.
#[tokio::test]
async fn a_binary_answer_comes_back_byte_for_byte() {
    let audio = MockServer::builder().name("audio").start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{ "audio": {{ "provider": "openai", "url": "{a}/v1" }} }} }}"#,
        a = audio.url()
    );
    let (url, _stop) = common::serve_json(&json).await;
    let req = http::Request::post(format!("{url}/v1/audio/speech"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"model": "tts-1", "input": "Hello", "voice": "alloy", "response_format": "mp3"})
                .to_string(),
        )))
        .unwrap();
    let res = http_client().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "audio/mpeg");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), tower_llm_lb_mock::SPEECH_BYTES);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}
