//! Stable property tests over every parser that reads bytes a backend or a user controls: the
//! same entry points (`tower_llm_lb::fuzz`, feature `fuzzing`) the `cargo fuzz` targets in
//! `fuzz/` call, fed by proptest instead of libFuzzer. Each property panics on a broken
//! invariant (a panic, a wait over its cap, an answer that depends on how bytes were chunked).
//! `PROPTEST_CASES` raises the count (CI runs the default below).

#![cfg(feature = "fuzzing")]

use proptest::prelude::*;
use tower_llm_lb::fuzz::{self, Target};

fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2048);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Bytes that look like what the parsers read: mostly header, JSON and SSE text.
fn texty() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"event: error\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(b"message_stop".to_vec()),
        Just(br#"{"error":{"message":"overloaded","type":"rate_limit"}}"#.to_vec()),
        Just(br#"{"choices":[{"delta":{"content":"hi"}}]}"#.to_vec()),
        Just(br#""model":"gpt-4o""#.to_vec()),
        Just(br#""max_tokens": 99999999999999999999"#.to_vec()),
        Just(b"{ \"error\" : ".to_vec()),
        Just(b"Sun, 06 Nov 1994 08:49:37 GMT".to_vec()),
        Just(b"Fri, 31 Dec 9999 23:59:59 GMT".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"-5".to_vec()),
        Just(b"1.5s".to_vec()),
        Just(b"6m0s".to_vec()),
        Just(b"2026-11-30T17:00:00Z".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(token, 0..24).prop_map(|parts| parts.concat())
}

/// Either raw bytes or text-like bytes, behind a prefix of structure bytes (the entry points
/// read their choices off the front).
fn input() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), 0..40),
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..256), texty()],
    )
        .prop_map(|(head, tail)| [head, tail].concat())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn rate_limit_and_wait_headers(data in input()) {
        fuzz::run(Target::RateLimitHeaders, &data);
    }

    #[test]
    fn sse_streams_in_any_chunks(data in input()) {
        fuzz::run(Target::SseStream, &data);
    }

    #[test]
    fn json_answer_and_error_bodies(data in prop_oneof![texty(), proptest::collection::vec(any::<u8>(), 0..256)]) {
        fuzz::run(Target::JsonBody, &data);
    }

    #[test]
    fn configs_as_text_and_as_mutations_of_a_valid_one(data in input()) {
        tower_llm_lb_config::fuzz::config(&data);
    }

    #[test]
    fn redaction_leaves_no_secret(data in input()) {
        fuzz::run(Target::Redaction, &data);
    }

    #[test]
    fn request_translation_never_panics_and_keeps_each_api_s_rules(data in prop_oneof![input(), chat_request().prop_map(|r| [vec![0u8, 7], r].concat())]) {
        fuzz::run(Target::TranslateRequest, &data);
    }

    #[test]
    fn stream_translation_is_the_same_in_any_chunks(data in prop_oneof![input(), stream_input()]) {
        fuzz::run(Target::TranslateStream, &data);
    }

    #[test]
    fn openai_to_anthropic_to_openai_keeps_every_translatable_field(req in chat_request()) {
        prop_assert!(fuzz::run(Target::TranslateRoundTrip, &req), "not translated: {}", String::from_utf8_lossy(&req));
    }
}

/// OpenAI chat requests of every translatable kind: system prompts, text and image parts,
/// tool calls and their results (parallel ones too), sampling parameters, tools and choices.
fn chat_request() -> impl Strategy<Value = Vec<u8>> {
    use serde_json::{Value, json};
    let text = "[a-z ]{0,12}";
    let user = prop_oneof![
        text.prop_map(|t| json!({"role": "user", "content": t})),
        proptest::collection::vec(
            prop_oneof![
                text.prop_map(|t| json!({"type": "text", "text": t})),
                "[A-Za-z0-9+/]{4,12}".prop_map(|d| json!({"type": "image_url",
                    "image_url": {"url": format!("data:image/png;base64,{d}")}})),
                "[a-z]{1,8}".prop_map(|h| json!({"type": "image_url",
                    "image_url": {"url": format!("https://{h}.test/i.png")}})),
                ("[A-Za-z0-9+/]{4,12}", "[a-z]{1,8}").prop_map(|(d, n)| json!({"type": "file",
                    "file": {"file_data": format!("data:application/pdf;base64,{d}"),
                             "filename": format!("{n}.pdf")}})),
            ],
            1..4,
        )
        .prop_map(|parts| json!({"role": "user", "content": parts})),
    ];
    let system = text.prop_map(|t| json!({"role": "system", "content": t}));
    // An assistant turn calling 0-3 tools, followed by a result for each call.
    let exchange = (prop::option::of("[a-z ]{1,12}"), 0usize..4, any::<u16>()).prop_map(
        |(said, calls, seed)| {
            let ids: Vec<String> = (0..calls).map(|k| format!("call_{seed}_{k}")).collect();
            let mut turns = vec![json!({
                "role": "assistant",
                "content": said,
                "tool_calls": ids.iter().map(|id| json!({"id": id, "type": "function",
                    "function": {"name": "lookup", "arguments": format!("{{\"q\":\"{id}\"}}")}})).collect::<Vec<_>>(),
            })];
            if calls == 0 {
                turns[0].as_object_mut().map(|m| m.remove("tool_calls"));
            }
            turns.extend(ids.iter().map(|id| json!({"role": "tool", "tool_call_id": id, "content": "ok"})));
            turns
        },
    );
    let turn = prop_oneof![
        user.clone().prop_map(|u| vec![u]),
        system.prop_map(|s| vec![s]),
        exchange
    ];
    (
        proptest::collection::vec(turn, 1..6),
        prop::option::of(0u32..100).prop_map(|t| t.map(|t| f64::from(t) / 100.0)),
        prop::option::of(prop_oneof![
            "[A-Z]{1,4}".prop_map(Value::from),
            proptest::collection::vec("[A-Z]{1,4}", 1..3).prop_map(Value::from)
        ]),
        prop::option::of(1u32..5000),
        any::<bool>(),
        prop::option::of(prop_oneof![
            Just(json!("auto")),
            Just(json!("none")),
            Just(json!("required")),
            Just(json!({"type": "function", "function": {"name": "lookup"}}))
        ]),
        prop::option::of(any::<bool>()),
        prop::option::of("[a-z0-9]{1,8}"),
        prop::option::of("[a-z]{1,8}"),
    )
        .prop_map(
            |(turns, temperature, stop, max_tokens, stream, choice, parallel, user, field)| {
                let mut req = json!({"model": "gpt-4o", "messages": turns.concat()});
                let mut set = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        req[k] = v;
                    }
                };
                set("temperature", temperature.map(Value::from));
                set("stop", stop);
                set("max_tokens", max_tokens.map(Value::from));
                set("stream", stream.then_some(json!(true)));
                let tools = json!([{"type": "function", "function": {"name": "lookup",
                "description": "d", "parameters": {"type": "object"}}}]);
                set("tools", choice.is_some().then_some(tools));
                set("tool_choice", choice);
                set("parallel_tool_calls", parallel.map(Value::from));
                set("user", user.map(Value::from));
                // Structured output: an object with one string field.
                set(
                    "response_format",
                    field.map(|f| {
                        json!({"type": "json_schema",
                    "json_schema": {"name": "out", "schema": {"type": "object",
                        "additionalProperties": false,
                        "properties": {f.clone(): {"type": "string"}}, "required": [f]}}})
                    }),
                );
                req.to_string().into_bytes()
            },
        )
}

/// A stream of either provider's events, behind the direction and cut bytes.
fn stream_input() -> impl Strategy<Value = Vec<u8>> {
    let anthropic = prop_oneof![
        Just(&b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":3}}}\n\n"[..]),
        Just(&b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"w\",\"input\":{}}}\n\n"[..]),
        Just(&b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n"[..]),
        Just(&b"data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\"}}\r\n\r\n"[..]),
        Just(&b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":2}}\n\n"[..]),
        Just(&b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"[..]),
        Just(&b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"o\"}}\n\n"[..]),
        Just(&b": keep-alive\n\n"[..]),
        Just(&b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"[..]),
        Just(&b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"w\",\"arguments\":\"{}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n"[..]),
        Just(&b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n"[..]),
        Just(&b"data: [DONE]\n\n"[..]),
    ];
    (
        proptest::collection::vec(any::<u8>(), 0..18),
        proptest::collection::vec(anthropic, 0..12),
    )
        .prop_map(|(head, events)| [head, events.concat()].concat())
}

/// A few inputs that once broke an invariant, or would have, replayed as they are.
#[test]
fn known_hostile_inputs() {
    // Found by `cargo fuzz run rate_limit_headers`: a 777 µs wait (from an RFC 3339 reset)
    // was passed on as `retry-after-ms: 0`, "now".
    fuzz::run(
        Target::RateLimitHeaders,
        &[
            0x00, 0x0e, 0xa8, 0x60, 0x02, 0x60, 0x02, 0x30, 0x3f, 0x30, 0x86, 0x00, 0x34, 0x2f,
            0x3c, 0x3c, 0x3c, 0x3c, 0x3c, 0x36, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x32, 0x37, 0x37, 0x37, 0x37, 0x2e, 0x37, 0x37, 0x37, 0x37, 0x37, 0x37, 0x31, 0x31,
            0x2d, 0xe4, 0xff, 0xff,
        ],
    );
    // Found by `cargo fuzz run translate_round_trip`: a top-level `system` (Anthropic's own
    // parameter on an OpenAI request) became a system message on the way back, which the
    // comparison did not count as the same system prompt (the translation was right).
    assert!(fuzz::run(
        Target::TranslateRoundTrip,
        br#"{"system":"Be brief.","messages":[{"role":"system","content":"No emoji."}]}"#
    ));
    // Found by `cargo fuzz run translate_round_trip`: serde_json's default float parsing can
    // be one unit in the last place off, so a parameter changed on each translation; the
    // crate now enables `float_roundtrip`.
    assert!(fuzz::run(
        Target::TranslateRoundTrip,
        br#"{"model":"m","temperature":0.7,"top_p":16616955236661955236565,"messages":[]}"#
    ));
    for body in [
        &br#"{"error":{"message":"x"}}"#[..],
        br#"  {  "error"  :  {}"#,
        br#"{"err"#,
        br#"{"errors":{}}"#,
        b"",
    ] {
        fuzz::run(Target::JsonBody, body);
    }
}
