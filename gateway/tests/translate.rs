//! One request shape, any provider: OpenAI chat requests served by Anthropic backends and
//! Anthropic messages requests served by OpenAI / Azure ones, against mocks that check each
//! API as the real service does (Anthropic refuses a missing `max_tokens`, a `system` role,
//! unknown fields and unanswered tool calls; OpenAI refuses Anthropic's parameters and a tool
//! result answering no call).

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb_config::Config;
use tower_llm_lb_gateway::Gateway;
use tower_llm_lb_mock::{Fault, MockServer};

async fn anthropic_mock() -> MockServer {
    MockServer::builder()
        .name("claude")
        .x_api_key("sk-ant")
        .start()
        .await
        .unwrap()
}

async fn openai_mock() -> MockServer {
    MockServer::builder()
        .name("openai")
        .bearer("sk-oai")
        .start()
        .await
        .unwrap()
}

/// The stack over one Anthropic backend (the claude mock), with `extra` top-level config.
fn claude_only(claude: &MockServer, extra: &str) -> tower_llm_lb::stack::LlmService {
    let json = format!(
        r#"{{ "backends": {{ "claude": {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant" }} }} {extra} }}"#,
        a = claude.url()
    );
    Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap()
}

fn chat(body: &Value) -> http::Request<ReplayBody> {
    http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(body.to_string()))
        .unwrap()
}

async fn text<B>(res: http::Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// The data payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

const TOOLS: &str = r#"[{"type": "function", "function": {"name": "lookup",
    "description": "Looks a word up", "parameters": {"type": "object",
    "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]"#;

/// Checks an answer is a complete OpenAI chat answer; returns its model.
fn check_openai_answer(body: &str, streamed: bool, tools: bool) -> String {
    if !streamed {
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["object"], "chat.completion", "{body}");
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0, "{body}");
        let choice = &v["choices"][0];
        if tools {
            assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
            let call = &choice["message"]["tool_calls"][0];
            assert_eq!(call["function"]["name"], "lookup");
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(args, json!({"q": "mock"}));
        } else {
            assert_eq!(choice["finish_reason"], "stop", "{body}");
            assert!(
                choice["message"]["content"]
                    .as_str()
                    .unwrap()
                    .starts_with("Hello from")
            );
        }
        return v["model"].as_str().unwrap().to_string();
    }
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let usage = chunks.iter().find(|c| c["usage"].is_object());
    assert!(usage.is_some(), "include_usage asked for: {body}");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| f.is_string())
        .collect();
    if tools {
        let args: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        let args: Value = serde_json::from_str(&args).unwrap();
        assert!(args["q"].as_str().unwrap().starts_with("tok0"), "{args}");
        assert_eq!(finish, [&json!("tool_calls")]);
    } else {
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(text.starts_with("tok0 "), "{text}");
    }
    chunks[0]["model"].as_str().unwrap().to_string()
}

/// Portkey's headline config (one OpenAI-shaped call split between Anthropic and OpenAI, each
/// target naming its own model), with `algorithm` added when given.
fn portkey_50_50(claude: &MockServer, openai: &MockServer, algorithm: Option<&str>) -> String {
    let algorithm = algorithm.map_or(String::new(), |a| format!(r#", "algorithm": "{a}""#));
    format!(
        r#"{{
          "strategy": {{ "mode": "loadbalance"{algorithm} }},
          "targets": [
            {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant", "weight": 0.5,
               "override_params": {{ "model": "claude-sonnet-4-5" }} }},
            {{ "provider": "openai", "url": "{o}/v1", "api_key": "sk-oai", "weight": 0.5,
               "override_params": {{ "model": "gpt-4o" }} }}
          ]
        }}"#,
        a = claude.url(),
        o = openai.url()
    )
}

/// Sends `n` chat requests (plain, streamed, with tools) through `json`'s stack, checks every
/// answer is OpenAI's shape, and returns the share Anthropic served.
async fn anthropic_share(json: &str, n: u64, claude: &MockServer, openai: &MockServer) -> f64 {
    let svc = Config::from_json(json)
        .unwrap()
        .build(http_client())
        .unwrap();
    let (c0, o0) = (claude.counters().ok, openai.counters().ok);
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    for i in 0..n {
        let streamed = i % 2 == 1;
        let with_tools = i % 3 == 2;
        let mut body = json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": format!("Question {i}")}],
            "temperature": 0.2,
        });
        if streamed {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        if with_tools {
            body["tools"] = tools.clone();
        }
        let res = svc.clone().oneshot(chat(&body)).await.unwrap();
        assert_eq!(res.status(), 200, "request {i}");
        let model = check_openai_answer(&text(res).await, streamed, with_tools);
        assert!(model == "claude-sonnet-4-5" || model == "gpt-4o", "{model}");
    }
    let (c, o) = (claude.counters().ok - c0, openai.counters().ok - o0);
    assert_eq!(c + o, n);
    c as f64 / n as f64
}

#[tokio::test(start_paused = true)]
async fn portkeys_50_50_anthropic_and_openai_config_answers_every_request_in_openai_shape() {
    let claude = anthropic_mock().await;
    let openai = openai_mock().await;
    let n = 1000;
    // Round robin splits exactly.
    let json = portkey_50_50(&claude, &openai, Some("round_robin"));
    let share = anthropic_share(&json, n, &claude, &openai).await;
    assert!((share - 0.5).abs() <= 0.02, "anthropic served {share}");
    // As Portkey writes it (weights, the default pick): each request is a draw, so the share
    // of 1,000 has a standard deviation of 1.6 points (seen here: 48.2-50.2%); five of them.
    let json = portkey_50_50(&claude, &openai, None);
    let share = anthropic_share(&json, n, &claude, &openai).await;
    let tolerance = 5.0 * (0.25 / n as f64).sqrt();
    assert!((share - 0.5).abs() < tolerance, "anthropic served {share}");
    assert_eq!(
        claude.counters().errors + openai.counters().errors,
        0,
        "no request refused by either API"
    );
    // What reached Anthropic was an Anthropic request.
    let seen: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(seen["system"], "Be brief.");
    assert_eq!(seen["max_tokens"], 4096);
    assert_eq!(seen["model"], "claude-sonnet-4-5");
    assert_eq!(claude.requests()[0].path_and_query, "/v1/messages");
    for m in [&claude, &openai] {
        assert_eq!(m.counters().foreign_credentials, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn set_weights_are_honoured_whatever_the_latencies() {
    // Anthropic answering in 80 ms, OpenAI in 50 ms, a weight of 0.5 each: half each (equal
    // weights left the pick latency-aware: the faster one took more).
    let claude = MockServer::builder()
        .name("claude")
        .x_api_key("sk-ant")
        .latency(std::time::Duration::from_millis(80))
        .start()
        .await
        .unwrap();
    let openai = MockServer::builder()
        .name("openai")
        .bearer("sk-oai")
        .latency(std::time::Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{
              "claude": {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant", "weight": 0.5 }},
              "openai": {{ "provider": "openai", "url": "{o}/v1", "api_key": "sk-oai", "weight": 0.5 }} }} }}"#,
        a = claude.url(),
        o = openai.url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    // 400 requests, 16 at a time (the faster backend has fewer in flight).
    let n = 400;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (svc, gate) = (svc.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let body = json!({"model": "gpt-4o-mini",
                              "messages": [{"role": "user", "content": format!("Question {i}")}]});
            svc.oneshot(chat(&body)).await.unwrap().status()
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let share = claude.counters().ok as f64 / n as f64;
    let tolerance = 4.0 * (0.25 / n as f64).sqrt();
    assert!((share - 0.5).abs() < tolerance, "anthropic served {share}");
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_anthropic_target_falls_back_to_openai_in_the_middle_of_a_conversation() {
    let claude = anthropic_mock().await;
    let openai = openai_mock().await;
    let json = format!(
        r#"{{
          "strategy": {{ "mode": "fallback" }},
          "targets": [
            {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant",
               "override_params": {{ "model": "claude-sonnet-4-5" }} }},
            {{ "provider": "openai", "url": "{o}/v1", "api_key": "sk-oai",
               "override_params": {{ "model": "gpt-4o" }} }}
          ]
        }}"#,
        a = claude.url(),
        o = openai.url()
    );
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    let tools: Value = serde_json::from_str(TOOLS).unwrap();
    let mut messages = vec![json!({"role": "user", "content": "What does 'tower' mean?"})];
    // One turn of the conversation: the answer, which must be a 200.
    let ask = |messages: Vec<Value>| {
        let (svc, tools) = (svc.clone(), tools.clone());
        async move {
            let body = json!({"model": "m", "messages": messages, "tools": tools});
            let res = svc.oneshot(chat(&body)).await.unwrap();
            assert_eq!(res.status(), 200);
            serde_json::from_str::<Value>(&text(res).await).unwrap()
        }
    };
    // Turn 1: Anthropic answers with a tool call, in OpenAI's shape.
    let turn1 = ask(messages.clone()).await;
    assert_eq!(turn1["model"], "claude-sonnet-4-5");
    let call = turn1["choices"][0]["message"]["tool_calls"][0].clone();
    messages.push(turn1["choices"][0]["message"].clone());
    messages
        .push(json!({"role": "tool", "tool_call_id": call["id"], "content": "a tall building"}));
    // Turn 2: Anthropic is overloaded (529); OpenAI takes the conversation, tool call and
    // result included, and accepts it as valid.
    claude.set_fault(Some(Fault::Status(529)));
    let turn2 = ask(messages).await;
    assert_eq!(turn2["model"], "gpt-4o");
    assert_eq!(
        turn2["choices"][0]["message"]["content"],
        "Hello from openai"
    );
    let seen: Value = serde_json::from_slice(&openai.requests()[0].body).unwrap();
    assert_eq!(seen["messages"][1]["tool_calls"][0]["id"], call["id"]);
    assert_eq!(seen["messages"][2]["role"], "tool");
    // Anthropic accepted turn 2's translation (its 529 comes after its checks).
    let statuses: Vec<u16> = claude.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses[..2], [200, 529]);
    let seen: Value = serde_json::from_slice(&claude.requests()[1].body).unwrap();
    assert_eq!(seen["messages"][2]["content"][0]["type"], "tool_result");
    // With OpenAI failing too, the caller gets Anthropic's overload as OpenAI's 503.
    let only = format!(
        r#"{{ "targets": [ {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant" }} ],
              "retry": {{ "attempts": 1 }} }}"#,
        a = claude.url()
    );
    let svc = Config::from_json(&only)
        .unwrap()
        .build(http_client())
        .unwrap();
    let res = svc
        .oneshot(chat(
            &json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let err: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(err["error"]["code"], "overloaded");
}

fn gateway_for(json: &str) -> axum::Router {
    let config = Config::from_json(json).unwrap();
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    Gateway::new(svc, backends, vec!["gw-key".into()]).router()
}

/// A gateway over one Azure mock with its key; keep the mock alive.
async fn azure_gateway() -> (MockServer, axum::Router) {
    let azure = MockServer::builder()
        .name("azure")
        .api_key("az")
        .start()
        .await
        .unwrap();
    let json = format!(
        r#"{{ "backends": {{ "azure": {{ "provider": "azure", "url": "{z}", "deployment": "gpt-4o",
                                        "api_key": "az" }} }} }}"#,
        z = azure.url()
    );
    let app = gateway_for(&json);
    (azure, app)
}

/// A gateway over one Azure mock (no key) that answers with `fault`; keep the mock alive.
async fn keyless_azure_gateway(fault: Fault) -> (MockServer, axum::Router) {
    let azure = MockServer::builder().name("azure").start().await.unwrap();
    azure.set_fault(Some(fault));
    let json = format!(
        r#"{{ "backends": {{ "azure": {{ "provider": "azure", "url": "{z}", "deployment": "gpt-4o" }} }} }}"#,
        z = azure.url()
    );
    let app = gateway_for(&json);
    (azure, app)
}

fn messages_request(body: &Value) -> http::Request<axum::body::Body> {
    http::Request::post("/v1/messages")
        .header("x-api-key", "gw-key")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn the_messages_route_over_an_azure_backend_answers_in_anthropic_s_shape() {
    let (azure, app) = azure_gateway().await;
    let ask = json!({"model": "gpt-4o", "max_tokens": 64, "system": "Be brief.",
                     "messages": [{"role": "user", "content": "Hi"}]});
    let res = app.clone().oneshot(messages_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(
        answer["content"][0],
        json!({"type": "text", "text": "Hello from azure"})
    );
    assert_eq!(answer["stop_reason"], "end_turn");
    assert!(answer["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let seen = &azure.requests()[0];
    assert!(
        seen.path_and_query
            .starts_with("/openai/deployments/gpt-4o/chat/completions?api-version=")
    );
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );

    // Streamed, with a tool: Anthropic's typed events, ending in `message_stop`.
    let mut ask = ask;
    ask["stream"] = json!(true);
    ask["tools"] = json!([{"name": "lookup", "input_schema": {"type": "object"}}]);
    let res = app.clone().oneshot(messages_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let events: Vec<Value> = sse_data(&text(res).await)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"message_start"));
    assert_eq!(types.last(), Some(&"message_stop"));
    assert_eq!(events[1]["content_block"]["type"], "tool_use");
    let input: String = events
        .iter()
        .filter_map(|e| e["delta"]["partial_json"].as_str())
        .collect();
    let input: Value = serde_json::from_str(&input).unwrap();
    assert!(input["q"].as_str().unwrap().starts_with("tok0"));
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_parameter_with_no_anthropic_counterpart_is_a_400_naming_it_and_nothing_is_sent() {
    let claude = anthropic_mock().await;
    let json = format!(
        r#"{{ "backends": {{ "claude": {{ "provider": "anthropic", "url": "{a}", "api_key": "sk-ant" }} }} }}"#,
        a = claude.url()
    );
    let app = gateway_for(&json);
    let req = http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer gw-key")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]})
                .to_string(),
        ))
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 400);
    let err: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(err["error"]["param"], "n");
    assert_eq!(err["error"]["code"], "unsupported_parameter");
    assert_eq!(claude.counters().requests, 0);
    // Dropped instead when the config says so.
    let svc = claude_only(
        &claude,
        r#", "translation": { "drop_unsupported": true, "default_max_tokens": 256 }"#,
    );
    let res = svc
        .oneshot(chat(
            &json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(seen["max_tokens"], 256);
    assert!(seen.get("n").is_none());
}

#[tokio::test]
async fn the_anthropic_mock_refuses_what_anthropic_refuses_in_anthropic_s_shape() {
    let claude = anthropic_mock().await;
    let client = http_client::<Full<Bytes>>();
    for (body, says) in [
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [
                {"role": "system", "content": "x"}, {"role": "user", "content": "x"}]}),
            "Unexpected role \"system\"",
        ),
    ] {
        let req = http::Request::post(format!("{}/v1/messages", claude.url()))
            .header("x-api-key", "sk-ant")
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), 400);
        let err: Value = serde_json::from_str(&text(res).await).unwrap();
        assert_eq!(err["type"], "error");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(says),
            "{err}"
        );
    }
}

#[tokio::test]
async fn the_readme_s_mixed_provider_config_serves_openai_callers_from_both() {
    let claude = MockServer::builder().name("claude").start().await.unwrap();
    let openai = MockServer::builder().name("openai").start().await.unwrap();
    let json = common::readme_json_after("is then a config:");
    // Its backends are the providers' default URLs, its keys environment variables (any that
    // is set will do here).
    let json = json
        .replace(
            r#""provider": "anthropic","#,
            &format!(r#""provider": "anthropic", "url": "{}","#, claude.url()),
        )
        .replace(
            r#""provider": "openai","#,
            &format!(r#""provider": "openai", "url": "{}/v1","#, openai.url()),
        )
        .replace("ANTHROPIC_API_KEY", "PATH")
        .replace("OPENAI_API_KEY", "PATH");
    let svc = Config::from_json(&json)
        .unwrap()
        .build(http_client())
        .unwrap();
    for _ in 0..40 {
        let res = svc
            .clone()
            .oneshot(chat(
                &json!({"model": "any", "messages": [{"role": "user", "content": "hi"}]}),
            ))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        check_openai_answer(&text(res).await, false, false);
    }
    assert!(claude.counters().ok > 0 && openai.counters().ok > 0);
}

#[tokio::test]
async fn documented_requests_of_each_api_are_accepted_by_the_other_s_mock() {
    // OpenAI's vision + tool-result request, streamed, to an Anthropic backend.
    let claude = anthropic_mock().await;
    let svc = claude_only(&claude, "");
    let request: Value = serde_json::from_str(include_str!(
        "fixtures/translate/openai_vision_tools_request.json"
    ))
    .unwrap();
    let res = svc.oneshot(chat(&request)).await.unwrap();
    assert_eq!(res.status(), 200);
    check_openai_answer(&text(res).await, true, false);
    let seen: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(seen["system"], "You are a helpful assistant.");
    assert_eq!(seen["max_tokens"], 300);
    assert_eq!(seen["messages"][0]["content"][1]["source"]["type"], "url");
    assert_eq!(
        seen["messages"][1]["content"][0]["input"],
        json!({"location": "Madison, WI"})
    );
    assert_eq!(
        seen["messages"][2]["content"][0]["tool_use_id"],
        "call_abc123"
    );

    // Anthropic's tool-use request, with an image beside the tool result, to Azure.
    let (azure, app) = azure_gateway().await;
    let request: Value = serde_json::from_str(include_str!(
        "fixtures/translate/anthropic_tool_use_request.json"
    ))
    .unwrap();
    let res = app.oneshot(messages_request(&request)).await.unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(
        answer["stop_reason"], "end_turn",
        "the conversation ends with the tool's result"
    );
    let seen: Value = serde_json::from_slice(&azure.requests()[0].body).unwrap();
    assert_eq!(seen["parallel_tool_calls"], false);
    assert_eq!(seen["tool_choice"], "auto");
    let roles: Vec<&str> = seen["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
    assert_eq!(
        seen["messages"][4]["content"][0]["image_url"]["url"],
        "data:image/jpeg;base64,/9j/4AAQSkZJRg=="
    );
}

#[tokio::test]
async fn the_gateway_s_own_errors_on_the_messages_route_are_in_anthropic_s_shape() {
    let (_azure, app) = keyless_azure_gateway(Fault::Status(500)).await;
    let ask = json!({"model": "gpt-4o", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]});
    // A wrong client key: the gateway refuses.
    let mut req = messages_request(&ask);
    req.headers_mut()
        .insert("x-api-key", "wrong".parse().unwrap());
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 401);
    let err: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "authentication_error");
    // The backend fails: its error, translated, in Anthropic's shape.
    let res = app.oneshot(messages_request(&ask)).await.unwrap();
    assert!(res.status().is_server_error());
    let err: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_translated_stream_cut_or_ended_early_upstream_ends_with_an_error_never_done() {
    let claude = anthropic_mock().await;
    let svc = claude_only(&claude, "");
    let ask = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]});
    for fault in [Fault::TruncateStream(2), Fault::EndStreamEarly(2)] {
        claude.set_fault(Some(fault.clone()));
        let res = svc.clone().oneshot(chat(&ask)).await.unwrap();
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        let mut seen = String::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => seen.push_str(&String::from_utf8_lossy(f.data_ref().unwrap())),
                Some(Err(e)) => break e.to_string(),
                None => panic!("{fault:?}: a clean end after {seen}"),
            }
        };
        assert!(err.contains("claude"), "{fault:?}: {err}");
        assert!(
            seen.contains("tok0 ") && !seen.contains("[DONE]"),
            "{fault:?}: {seen}"
        );
    }
}

#[tokio::test]
async fn a_messages_stream_cut_upstream_ends_with_anthropic_s_error_event() {
    let (_azure, app) = keyless_azure_gateway(Fault::TruncateStream(2)).await;
    let ask = json!({"model": "gpt-4o", "max_tokens": 8, "stream": true,
                     "messages": [{"role": "user", "content": "Hi"}]});
    let res = app.oneshot(messages_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut seen = String::new();
    while let Some(Ok(frame)) = body.frame().await {
        seen.push_str(&String::from_utf8_lossy(frame.data_ref().unwrap()));
    }
    let last = sse_data(&seen).pop().unwrap();
    let event: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(event["type"], "error", "{seen}");
    assert_eq!(event["error"]["type"], "api_error");
    assert!(
        seen.contains("event: message_start") && !seen.contains("message_stop"),
        "{seen}"
    );
}

#[tokio::test(start_paused = true)]
async fn reasoning_effort_becomes_extended_thinking_and_the_thinking_comes_back_as_reasoning() {
    let claude = anthropic_mock().await;
    let svc = claude_only(&claude, "");
    let ask = |extra: Value| {
        let mut body = json!({"model": "claude-sonnet-4-5",
                              "messages": [{"role": "user", "content": "Why is the sky blue?"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        chat(&body)
    };
    // The request: a thinking budget per level, below max_tokens.
    let res = svc
        .clone()
        .oneshot(ask(
            json!({"reasoning_effort": "medium", "max_tokens": 8000}),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    let seen: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(
        seen["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert_eq!(seen["max_tokens"], 8000);
    assert!(seen.get("reasoning_effort").is_none());
    // The answer: the thinking as `reasoning_content`, the text as the content.
    let message = &answer["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Let me think about it.");
    assert_eq!(message["content"], "Hello from claude");
    // The stream: the thinking as `reasoning_content` deltas, before the content.
    let res = svc
        .clone()
        .oneshot(ask(json!({"reasoning_effort": "high", "stream": true})))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = text(res).await;
    let (mut reasoning, mut content) = (String::new(), String::new());
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        let delta = &chunk["choices"][0]["delta"];
        if let Some(r) = delta["reasoning_content"].as_str() {
            assert!(content.is_empty(), "reasoning before content: {body}");
            reasoning.push_str(r);
        }
        if let Some(c) = delta["content"].as_str() {
            content.push_str(c);
        }
    }
    assert_eq!(reasoning, "Let me think about it.");
    assert!(!content.is_empty(), "{body}");
    // High with the default max_tokens (4096): the budget stays below it.
    let seen: Value = serde_json::from_slice(&claude.requests()[1].body).unwrap();
    assert_eq!(seen["thinking"]["budget_tokens"], 4095);
    // What Anthropic would refuse is refused before sending, naming the parameter.
    for (extra, param) in [
        (
            json!({"reasoning_effort": "low", "max_tokens": 1000}),
            "reasoning_effort",
        ),
        (
            json!({"reasoning_effort": "low", "temperature": 0.2}),
            "temperature",
        ),
        (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
    ] {
        let err = svc.clone().oneshot(ask(extra.clone())).await.unwrap_err();
        let u = tower_llm_lb::error::find::<tower_llm_lb::translate::Untranslatable>(&*err)
            .unwrap_or_else(|| panic!("{extra}: {err}"));
        assert_eq!(u.param, param, "{extra}: {err}");
    }
    assert_eq!(claude.requests().len(), 2, "nothing refused was sent");
    // No thinking asked for: none given, none returned.
    let res = svc
        .clone()
        .oneshot(ask(json!({"reasoning_effort": "minimal"})))
        .await
        .unwrap();
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    assert!(
        answer["choices"][0]["message"]
            .get("reasoning_content")
            .is_none()
    );
    let seen: Value = serde_json::from_slice(&claude.requests()[2].body).unwrap();
    assert!(seen.get("thinking").is_none());
}

/// Structured outputs both ways: OpenAI's `response_format` (`json_schema`) reaches Anthropic as
/// `output_config.format` with the same schema, and Anthropic's reaches OpenAI / Azure as
/// `response_format` (strict); the answer is the JSON as text in each caller's shape. The
/// Anthropic mock refuses a schema with an open object, as the service does.
#[tokio::test]
async fn structured_outputs_translate_both_ways() {
    let schema = json!({"type": "object", "additionalProperties": false,
                        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                        "required": ["city", "days"]});
    let claude = anthropic_mock().await;
    let svc = claude_only(&claude, "");
    let ask = json!({"model": "claude-x", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "Plan a trip"}],
                     "response_format": {"type": "json_schema",
                                         "json_schema": {"name": "trip", "strict": true, "schema": schema}}});
    let res = svc.clone().oneshot(chat(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let trip: Value = serde_json::from_str(content).unwrap();
    assert_eq!(trip, json!({"city": "mock", "days": 1}), "{answer}");
    let sent: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(
        sent["output_config"],
        json!({"format": {"type": "json_schema", "schema": schema}})
    );
    assert!(sent.get("response_format").is_none());
    // An open object: the service's own 400 comes back.
    let mut open = ask.clone();
    open["response_format"]["json_schema"]["schema"] = json!({"type": "object"});
    let res = svc.clone().oneshot(chat(&open)).await.unwrap();
    assert_eq!(res.status(), 400, "{}", text(res).await);
    // `json_object` (any JSON, no schema) has no counterpart: refused naming it.
    let mut any = ask.clone();
    any["response_format"] = json!({"type": "json_object"});
    let err = svc.oneshot(chat(&any)).await.unwrap_err();
    assert!(err.to_string().contains("response_format"), "{err}");

    // The other way: an Anthropic caller, an Azure backend.
    let (azure, app) = azure_gateway().await;
    let ask = json!({"model": "gpt-4o", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "Plan a trip"}],
                     "output_config": {"format": {"type": "json_schema", "schema": schema}}});
    let res = app.oneshot(messages_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    let trip: Value = serde_json::from_str(answer["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(trip, json!({"city": "mock", "days": 1}), "{answer}");
    let sent: Value = serde_json::from_slice(&azure.requests()[0].body).unwrap();
    assert_eq!(
        sent["response_format"],
        json!({"type": "json_schema",
               "json_schema": {"name": "output", "schema": schema, "strict": true}})
    );
}

/// A PDF and prompt-caching breakpoints from an OpenAI caller reach Anthropic as a `document`
/// block and `cache_control` where they were set, which the mock checks as the service does
/// (document sources, `ephemeral` breakpoints, four at most); an Anthropic caller's PDF reaches
/// Azure as an inline `file` part.
#[tokio::test]
async fn documents_and_caching_breakpoints_reach_the_other_provider() {
    let claude = anthropic_mock().await;
    let svc = claude_only(&claude, "");
    let pdf = "data:application/pdf;base64,JVBERi0xLjQK";
    let breakpoint = json!({"type": "ephemeral"});
    let ask = json!({"model": "claude-x", "max_tokens": 64, "messages": [
        {"role": "system", "content": "Long rules.", "cache_control": breakpoint},
        {"role": "user", "content": [
            {"type": "file", "file": {"file_data": pdf, "filename": "q.pdf"}},
            {"type": "text", "text": "Summarise", "cache_control": breakpoint}]}]});
    let res = svc.clone().oneshot(chat(&ask)).await.unwrap();
    assert_eq!(res.status(), 200, "{}", text(res).await);
    let sent: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(sent["system"][0]["cache_control"], breakpoint);
    assert_eq!(sent["messages"][0]["content"][0]["type"], "document");
    assert_eq!(
        sent["messages"][0]["content"][1]["cache_control"],
        breakpoint
    );
    // Five breakpoints: the service's own 400 comes back.
    let mut five = ask.clone();
    let parts: Vec<Value> = (0..4)
        .map(|i| json!({"type": "text", "text": format!("part {i}"), "cache_control": breakpoint}))
        .collect();
    five["messages"][1]["content"] = Value::Array(parts);
    let res = svc.oneshot(chat(&five)).await.unwrap();
    assert_eq!(res.status(), 400);
    assert!(
        text(res)
            .await
            .contains("A maximum of 4 blocks with cache_control")
    );

    let (azure, app) = azure_gateway().await;
    let ask = json!({"model": "gpt-4o", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "document", "title": "q.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}},
        {"type": "text", "text": "Summarise"}]}]});
    let res = app.oneshot(messages_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200, "{}", text(res).await);
    let sent: Value = serde_json::from_slice(&azure.requests()[0].body).unwrap();
    assert_eq!(
        sent["messages"][0]["content"][0],
        json!({"type": "file", "file": {"file_data": pdf, "filename": "q.pdf"}})
    );
}

/// Extended thinking asked by an Anthropic caller of an Azure backend: a `reasoning_effort`
/// (the mock refuses `thinking` as OpenAI does), and the thinking blocks of the conversation
/// so far left out of what Azure gets.
#[tokio::test]
async fn thinking_asked_of_an_openai_backend_becomes_a_reasoning_effort() {
    let (azure, app) = azure_gateway().await;
    let ask = json!({"model": "gpt-4o", "max_tokens": 8000,
                     "thinking": {"type": "enabled", "budget_tokens": 3000},
                     "messages": [
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": [
                             {"type": "thinking", "thinking": "They greet.", "signature": "c2ln"},
                             {"type": "text", "text": "Hello"}]},
                         {"role": "user", "content": "And?"}]});
    let res = app.oneshot(messages_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200, "{}", text(res).await);
    let sent: Value = serde_json::from_slice(&azure.requests()[0].body).unwrap();
    assert_eq!(sent["reasoning_effort"], "medium");
    assert!(sent.get("thinking").is_none());
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": "Hello"})
    );
}

fn responses_request(body: &Value) -> http::Request<axum::body::Body> {
    http::Request::post("/v1/responses")
        .header("authorization", "Bearer gw-key")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap()
}

/// The Responses API (the OpenAI Agents SDK's) served by an Anthropic backend through the chat
/// translation: a Response, a stream of Responses events, a function tool, and a follow-up
/// naming a stored response refused by name (Anthropic keeps none).
#[tokio::test]
async fn the_responses_api_is_served_by_an_anthropic_backend() {
    let claude = anthropic_mock().await;
    let app = gateway_for(&format!(
        r#"{{ "backends": {{ "claude": {{ "provider": "anthropic", "url": "{}", "api_key": "sk-ant" }} }} }}"#,
        claude.url()
    ));
    let ask = json!({"model": "claude-x", "instructions": "Be brief.", "input": "Hi",
                     "max_output_tokens": 64});
    let res = app.clone().oneshot(responses_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let response: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(
        response["output"][0]["content"][0]["text"],
        "Hello from claude"
    );
    let id = response["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("resp_") && id.ends_with("~claude"), "{id}");
    let sent: Value = serde_json::from_slice(&claude.requests()[0].body).unwrap();
    assert_eq!(claude.requests()[0].path_and_query, "/v1/messages");
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["max_tokens"], 64);

    // Streamed, with a tool the mock calls.
    let ask = json!({"model": "claude-x", "input": "Weather in Paris?", "stream": true,
                     "tools": [{"type": "function", "name": "weather",
                                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]});
    let res = app.clone().oneshot(responses_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 200);
    let events = text(res).await;
    let kinds: Vec<String> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("response.created"),
        "{events}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("response.completed"),
        "{events}"
    );
    assert!(
        kinds
            .iter()
            .any(|k| k == "response.function_call_arguments.delta"),
        "{events}"
    );
    let completed: Value = serde_json::from_str(
        events
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .next_back()
            .unwrap(),
    )
    .unwrap();
    let call = completed["response"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("{events}"));
    assert_eq!(call["name"], "weather");
    assert!(serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).is_ok());

    // A follow-up naming the stored response: refused by name, nothing sent.
    let before = claude.requests().len();
    let ask = json!({"model": "claude-x", "input": "And?", "previous_response_id": id});
    let res = app.oneshot(responses_request(&ask)).await.unwrap();
    assert_eq!(res.status(), 400);
    let error: Value = serde_json::from_str(&text(res).await).unwrap();
    assert_eq!(error["error"]["param"], "previous_response_id", "{error}");
    assert_eq!(claude.requests().len(), before);
}

/// With thinking on, a tool-using turn must carry its signed thinking back to Anthropic (the
/// mock refuses it otherwise, as the service does): the answer gives it as `thinking_blocks`,
/// plain and streamed, and the next request's assistant turn takes it back.
#[tokio::test]
async fn a_tool_using_turn_carries_its_signed_thinking_back_to_anthropic() {
    let claude = anthropic_mock().await;
    let svc = claude_only(&claude, "");
    let tools = json!([{"type": "function", "function": {"name": "weather",
                        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    let first = json!({"model": "claude-x", "max_tokens": 4000, "reasoning_effort": "low",
                       "tools": tools, "messages": [{"role": "user", "content": "Weather?"}]});
    let res = svc.clone().oneshot(chat(&first)).await.unwrap();
    assert_eq!(res.status(), 200);
    let answer: Value = serde_json::from_str(&text(res).await).unwrap();
    let turn = answer["choices"][0]["message"].clone();
    assert_eq!(turn["thinking_blocks"][0]["type"], "thinking", "{answer}");
    assert!(
        !turn["thinking_blocks"][0]["signature"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    let call_id = turn["tool_calls"][0]["id"].as_str().unwrap().to_string();
    let next = |assistant: Value| {
        json!({"model": "claude-x", "max_tokens": 4000, "reasoning_effort": "low", "tools": tools,
               "messages": [{"role": "user", "content": "Weather?"}, assistant,
                            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]})
    };
    let res = svc
        .clone()
        .oneshot(chat(&next(turn.clone())))
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", text(res).await);
    // Without its thinking, the turn is refused by the backend.
    let mut bare = turn.clone();
    bare.as_object_mut().unwrap().remove("thinking_blocks");
    let res = svc.clone().oneshot(chat(&next(bare))).await.unwrap();
    assert_eq!(res.status(), 400);
    // Streamed: the signed block comes as a `thinking_blocks` delta.
    let mut streamed = first.clone();
    streamed["stream"] = json!(true);
    let res = svc.oneshot(chat(&streamed)).await.unwrap();
    let events = text(res).await;
    let block = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|c| {
            c["choices"][0]["delta"]["thinking_blocks"][0]
                .as_object()
                .cloned()
        })
        .unwrap_or_else(|| panic!("{events}"));
    assert_eq!(block["signature"], turn["thinking_blocks"][0]["signature"]);
    assert_eq!(block["thinking"], turn["thinking_blocks"][0]["thinking"]);
}
