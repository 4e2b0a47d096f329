//! Fuzz entry points (feature `fuzzing`; not part of the API, no semver promise).
//!
//! Each function reads arbitrary bytes as one input of a parser that reads bytes a backend or a
//! user controls, runs it, and panics only when an invariant breaks: no input may panic, wait
//! longer than the cap it was given, or give a different answer when its bytes arrive in other
//! chunks. The `cargo fuzz` targets in `fuzz/` (nightly) and the stable proptest properties in
//! `tests/properties.rs` (run in CI) call these same functions, so a crash the fuzzer finds is a
//! test case the properties can replay.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::body::EndWatch;
use crate::classify::grpc;
use crate::classify::retry_after::Hints;
use crate::provider;

/// Reads structured values off the front of fuzz input; past the end, zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.u8()))
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// A JSON value mutated by the input: one to four values somewhere in it (chosen by the
/// input) replaced by arbitrary ones. For entry points that start from a valid document (the
/// config crate's).
pub fn mutate_json(v: &mut serde_json::Value, data: &[u8]) {
    let mut input = Input(data);
    for _ in 0..1 + input.u8() % 4 {
        mutate(v, &mut input, 0);
    }
}

/// The parsers there is an entry point for (each described at its function below).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `rate_limit_headers`: quota and wait headers.
    RateLimitHeaders,
    /// `sse_stream`: a streamed answer's end and error checks, in any chunks.
    SseStream,
    /// `json_body`: answer and error bodies (usage, model, error kind).
    JsonBody,
    /// `redaction`: credentials out of text passed on.
    Redaction,
    /// `translate_request`: request translation both ways.
    TranslateRequest,
    /// `translate_stream`: stream translation, in any chunks.
    TranslateStream,
    /// `translate_round_trip`: OpenAI to Anthropic to OpenAI keeps every translatable field.
    TranslateRoundTrip,
}

/// Runs `target` on `data`; panics when an invariant breaks. False only when
/// [`Target::TranslateRoundTrip`]'s input was not translated (so nothing was compared).
pub fn run(target: Target, data: &[u8]) -> bool {
    match target {
        Target::RateLimitHeaders => rate_limit_headers(data),
        Target::SseStream => sse_stream(data),
        Target::JsonBody => json_body(data),
        Target::Redaction => redaction(data),
        Target::TranslateRequest => translate_request(data),
        Target::TranslateStream => translate_stream(data),
        Target::TranslateRoundTrip => return translate_round_trip(data),
    }
    true
}

/// Replaces one value somewhere in `v`, chosen by the input, with an arbitrary one.
fn mutate(v: &mut serde_json::Value, input: &mut Input<'_>, depth: usize) {
    use serde_json::Value;
    let descend = depth < 6 && !input.u8().is_multiple_of(4);
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let i = usize::from(input.u8()) % map.len();
            if let Some((_, child)) = map.iter_mut().nth(i) {
                return mutate(child, input, depth + 1);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = usize::from(input.u8()) % items.len();
            return mutate(&mut items[i], input, depth + 1);
        }
        _ => {}
    }
    *v = match input.u8() % 10 {
        0 => Value::Null,
        1 => Value::Bool(input.u8().is_multiple_of(2)),
        2 => Value::from(input.u64() as i64),
        3 => Value::from(input.u64()),
        4 => serde_json::Number::from_f64(f64::from_bits(input.u64()))
            .map_or(Value::Null, Value::Number),
        5 => Value::from(-1),
        6 => Value::from(0),
        7 => {
            let len = usize::from(input.u8() % 16);
            Value::from(String::from_utf8_lossy(input.bytes(len)).into_owned())
        }
        8 => Value::Array(Vec::new()),
        _ => Value::Object(serde_json::Map::new()),
    };
}

/// Every header a provider sends about waits and quotas.
const HINT_HEADERS: &[&str] = &[
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "date",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "grpc-status",
    "grpc-retry-pushback-ms",
];

/// Rate-limit and wait headers of every provider (and gRPC's status and pushback): up to 8
/// headers with arbitrary values, an arbitrary clock and cap. No wait may exceed the cap, and
/// the wait the gateway passes on (`set_retry_after`) must read back as at least the wait.
fn rate_limit_headers(data: &[u8]) {
    let mut input = Input(data);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(input.u64() % (1 << 40));
    let cap = Duration::from_millis(input.u64() % 1_000_000_000);
    let mut headers = HeaderMap::new();
    for _ in 0..input.u8() % 9 {
        let name = HINT_HEADERS[usize::from(input.u8()) % HINT_HEADERS.len()];
        let len = usize::from(input.u8() % 48);
        if let Ok(value) = HeaderValue::from_bytes(input.bytes(len)) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    let hints = Hints::from_headers(&headers, now, cap);
    if let Some(w) = hints.wait() {
        assert!(w <= cap, "wait {w:?} over the cap {cap:?}: {headers:?}");
        // What a caller is told: the wait (clamped to the documented cap) rounded up, never
        // less, never 0 for a wait above 0 (found by this target: 777 µs was told as 0 ms).
        let mut out = HeaderMap::new();
        crate::classify::retry_after::set_retry_after(&mut out, w);
        let told = w.min(crate::classify::retry_after::MAX_PASSED_HINT);
        let ms: u64 = out["retry-after-ms"].to_str().unwrap().parse().unwrap();
        let secs: u64 = out["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(
            u128::from(ms) == told.as_nanos().div_ceil(1_000_000)
                && secs * 1000 >= ms
                && secs * 1000 < ms + 1000,
            "{out:?} for {w:?}"
        );
    }
    if let Some(r) = hints.token_rate() {
        assert!(r.is_finite() && r >= 0.0, "token rate {r}: {headers:?}");
    }
    let _ = (
        hints.next_request_in(),
        hints.refill_interval(),
        hints.quota_pace(),
        hints.burst_credits(),
        hints.burst_tokens(),
        hints.is_empty(),
    );
    if let Some(code) = grpc::status(&headers) {
        let _ = grpc::outcome(code, &hints);
    }
}

/// The paths whose streams have an end marker, and one without.
const STREAM_PATHS: &[&str] = &["/v1/chat/completions", "/v1/messages", "/v1/embeddings"];

/// A streamed answer cut into arbitrary chunks: the end-of-stream watch must see the end
/// marker exactly when the whole stream holds it, however the bytes are cut; the stream-start
/// checks must not panic on any prefix, and once the start is known it stays known.
fn sse_stream(data: &[u8]) {
    let mut input = Input(data);
    let path = STREAM_PATHS[usize::from(input.u8()) % STREAM_PATHS.len()];
    let cuts: Vec<usize> = (0..input.u8() % 16)
        .map(|_| usize::from(input.u8()))
        .collect();
    let stream = input.rest();
    let marker = provider::stream_end_marker(path);
    let mut watch = EndWatch::new(marker);
    let mut at: usize = 0;
    for cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
        let end = at.saturating_add(*cut).min(stream.len());
        watch.feed(&stream[at..end]);
        at = end;
    }
    let whole = marker.is_none_or(|m| stream.windows(m.len()).any(|w| w == m));
    assert_eq!(
        watch.complete(),
        whole,
        "end marker {marker:?} cut at {cuts:?} in {stream:?}"
    );
    let mut known = false;
    for end in 0..=stream.len().min(512) {
        let prefix = &stream[..end];
        let now_known = provider::stream_start_known(prefix);
        assert!(!known || now_known, "start known, then unknown at {end}");
        known = now_known;
        let _ = provider::stream_start_outcome(prefix);
    }
}

/// A JSON answer or error body: the cheap head check of a `200 {"error": ..}` decides once
/// and never changes its mind as more bytes arrive, and agrees with a real parse whenever the
/// body is JSON; the other body scans (model, quota-exhausted, token estimate) never panic,
/// and a model found is text of the body.
fn json_body(data: &[u8]) {
    let mut decided = None;
    for end in 0..=data.len().min(256) {
        let head = provider::json_error_head(&data[..end]);
        if let Some(d) = decided {
            assert_eq!(
                head,
                Some(d),
                "decided {d}, then {head:?} at {end}: {data:?}"
            );
        }
        decided = head.or(decided);
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(data) {
        // serde_json keeps keys sorted, so only a body whose one key is "error" is unambiguous.
        if map.len() == 1 {
            let error_object = map.get("error").is_some_and(serde_json::Value::is_object);
            assert_eq!(
                provider::json_error_head(data),
                Some(error_object),
                "{data:?}"
            );
        }
    }
    let _ = provider::in_band_error_outcome(data);
    let _ = provider::is_quota_exhausted_body(data);
    let _ = provider::estimate_tokens(data);
    let _ = provider::usage_of(data, data);
    if let Some(model) = provider::model_of(data) {
        let hay = data.windows(model.len().max(1));
        assert!(model.is_empty() || hay.clone().any(|w| w == model.as_bytes()));
    }
}

/// The redaction of backend secrets from what is passed on ([`redact`](crate::auth::redact)): the first bytes choose
/// up to four secrets (`[A-Z0-9-]`, at least 4 long, so none is text of the `[redacted]`
/// marker); none of them survives in the output.
fn redaction(data: &[u8]) {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
    let mut input = Input(data);
    let secrets: Vec<Vec<u8>> = (0..1 + input.u8() % 4)
        .map(|_| {
            let len = 4 + usize::from(input.u8() % 12);
            (0..len)
                .map(|_| ALPHABET[usize::from(input.u8()) % ALPHABET.len()])
                .collect()
        })
        .collect();
    let body = input.rest();
    let credentials: Vec<crate::auth::Credential> = secrets
        .iter()
        .map(|s| crate::auth::Credential::api_key(&String::from_utf8_lossy(s)))
        .collect::<Result<_, _>>()
        .expect("[A-Z0-9-] is a valid header value");
    let out = crate::auth::redact(bytes::Bytes::copy_from_slice(body), &credentials);
    for s in &secrets {
        assert!(
            !out.windows(s.len()).any(|w| w == &s[..]),
            "{s:?} survived in {out:?}"
        );
    }
}

/// A request body translated for the other provider's API (the first byte picks the direction,
/// whether unsupported parameters are dropped, and whether the body is first read as a
/// Responses request, which becomes a chat request). Nothing panics; a chat request translated
/// for Anthropic is a JSON object with `max_tokens`, only `user` and `assistant` turns, never
/// two of one role in a row, and tool results first in their turn; a messages request
/// translated for OpenAI is a JSON object with a `messages` array.
fn translate_request(data: &[u8]) {
    use crate::provider::translate::{
        Options, chat_to_messages, messages_to_chat, responses_to_chat,
    };
    let mut input = Input(data);
    let flags = input.u8();
    let options = Options {
        default_max_tokens: 1 + u32::from(input.u8()),
        drop_unsupported: flags & 2 != 0,
    };
    let body = input.rest();
    // A Responses request goes through chat completions: first that step.
    let converted;
    let body = if flags & 4 != 0 {
        let Ok((chat, _)) = responses_to_chat(body) else {
            return;
        };
        let v: serde_json::Value = serde_json::from_slice(&chat).expect("a translation is JSON");
        assert!(v["messages"].is_array(), "no messages in {v}");
        converted = chat;
        &converted[..]
    } else {
        body
    };
    if flags & 1 == 0 {
        let Ok(t) = chat_to_messages(body, &options) else {
            return;
        };
        let v: serde_json::Value = serde_json::from_slice(&t.body).expect("a translation is JSON");
        assert!(!v["max_tokens"].is_null(), "no max_tokens in {v}");
        let turns = v["messages"].as_array().expect("messages");
        let mut last = "";
        for turn in turns {
            let role = turn["role"].as_str().unwrap_or("");
            assert!(role == "user" || role == "assistant", "role {role} in {v}");
            assert_ne!(role, last, "two {role} turns in a row in {v}");
            last = role;
            let kinds: Vec<bool> = turn["content"]
                .as_array()
                .expect("content blocks")
                .iter()
                .map(|b| b["type"] == "tool_result")
                .collect();
            assert!(
                kinds.windows(2).all(|w| w[0] || !w[1]),
                "a tool result after other content in {v}"
            );
        }
    } else if let Ok(t) = messages_to_chat(body, &options) {
        let v: serde_json::Value = serde_json::from_slice(&t.body).expect("a translation is JSON");
        assert!(v["messages"].is_array(), "no messages in {v}");
    }
}

/// A backend's stream translated for the caller (the first byte picks the direction and
/// whether usage is asked for, the next ones where the bytes are cut): nothing panics, and
/// the output (and any error) is the same however the bytes arrive.
fn translate_stream(data: &[u8]) {
    use crate::provider::translate::{StreamTranslate, ToChatChunks, ToMessageEvents};
    let mut input = Input(data);
    let flags = input.u8();
    let cuts: Vec<usize> = (0..input.u8() % 16)
        .map(|_| usize::from(input.u8()))
        .collect();
    let stream = input.rest();
    let fresh = || -> Box<dyn StreamTranslate> {
        if flags & 1 == 0 {
            Box::new(ToChatChunks::new(0, flags & 2 != 0))
        } else {
            Box::new(ToMessageEvents::new())
        }
    };
    let run = |pieces: &[&[u8]]| {
        let mut t = fresh();
        let mut out = Vec::new();
        for p in pieces {
            if let Err(e) = t.feed(p, &mut out) {
                return (out, Some(e));
            }
        }
        let e = t.finish(&mut out).err();
        (out, e)
    };
    let whole = run(&[stream]);
    let mut pieces = Vec::new();
    let mut at = 0usize;
    for cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
        let end = at.saturating_add(*cut).min(stream.len());
        pieces.push(&stream[at..end]);
        at = end;
    }
    assert_eq!(run(&pieces), whole, "cut at {cuts:?}");
}

/// An OpenAI chat request sent to Anthropic and back (as a messages request through an OpenAI
/// backend would be): when both directions translate, every translatable field survives.
/// The comparison is on what each API can express: system prompts joined, turns of one role
/// merged, tool results first in their turn, an assistant turn's text joined, `stop` as a
/// list, `tool_choice` `auto` where tools are given without one, a structured output's schema
/// (not its name), a document's data and file name. True when both directions
/// translated (and so the two were compared).
fn translate_round_trip(data: &[u8]) -> bool {
    use crate::provider::translate::{Options, chat_to_messages, messages_to_chat};
    let options = Options::default();
    let Ok(there) = chat_to_messages(data, &options) else {
        return false;
    };
    let Ok(back) = messages_to_chat(&there.body, &options) else {
        return false;
    };
    let original: serde_json::Value = serde_json::from_slice(data).expect("translated, so JSON");
    let back: serde_json::Value =
        serde_json::from_slice(&back.body).expect("a translation is JSON");
    assert_eq!(
        canonical_chat(&original, options.default_max_tokens),
        canonical_chat(&back, options.default_max_tokens),
        "\n{original}\n->\n{}\n->\n{back}",
        String::from_utf8_lossy(&there.body)
    );
    true
}

/// What an OpenAI chat request means, in a form both APIs can express (see
/// [`translate_round_trip`]).
fn canonical_chat(req: &serde_json::Value, default_max_tokens: u32) -> serde_json::Value {
    use serde_json::{Value, json};
    let text_of = |c: &Value| -> String {
        match c {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
            _ => String::new(),
        }
    };
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for m in req["messages"].as_array().into_iter().flatten() {
        let (role, items): (&str, Vec<Value>) = match m["role"].as_str().unwrap_or("") {
            "system" | "developer" => {
                system.push(text_of(&m["content"]));
                continue;
            }
            "tool" => (
                "user",
                vec![json!({"result": m["tool_call_id"], "text": text_of(&m["content"])})],
            ),
            "user" => {
                let items = match &m["content"] {
                    Value::String(s) => vec![json!({"text": s})],
                    Value::Array(parts) => parts
                        .iter()
                        .map(|p| match p["type"].as_str() {
                            Some("image_url") => json!({"image": p["image_url"]["url"]}),
                            Some("file") => json!({"file": p["file"]["file_data"],
                                                   "name": p["file"]["filename"]}),
                            _ => json!({"text": p["text"]}),
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                ("user", items)
            }
            _ => {
                let mut items = vec![json!({"text": text_of(&m["content"])})];
                for c in m["tool_calls"].as_array().into_iter().flatten() {
                    let args: Value =
                        serde_json::from_str(c["function"]["arguments"].as_str().unwrap_or("{}"))
                            .unwrap_or(Value::Null);
                    items.push(
                        json!({"call": c["id"], "name": c["function"]["name"], "args": args}),
                    );
                }
                ("assistant", items)
            }
        };
        match turns.last_mut() {
            Some((last, content)) if *last == role => content.extend(items),
            _ => turns.push((role, items)),
        }
    }
    // Anthropic's own top-level `system` (as `override_params` may set it) comes after the
    // system messages.
    if !req["system"].is_null() {
        system.push(text_of(&req["system"]));
    }
    let turns: Vec<Value> = turns
        .into_iter()
        .map(|(role, items)| {
            if role == "assistant" {
                // One text (the joined texts), then the calls.
                let text: String = items.iter().filter_map(|i| i["text"].as_str()).collect();
                let mut out = vec![json!({"text": text})];
                out.extend(items.into_iter().filter(|i| i.get("call").is_some()));
                json!({"role": role, "items": out})
            } else {
                let (results, rest): (Vec<Value>, Vec<Value>) =
                    items.into_iter().partition(|i| i.get("result").is_some());
                let items = [results, rest].concat();
                json!({"role": role, "items": items})
            }
        })
        .collect();
    let tools: Vec<Value> = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let f = &t["function"];
            let schema = if f["parameters"].is_null() {
                json!({"type": "object", "properties": {}})
            } else {
                f["parameters"].clone()
            };
            json!({"name": f["name"], "description": f["description"], "schema": schema})
        })
        .collect();
    let mut choice = req["tool_choice"].clone();
    if choice.is_null() && !tools.is_empty() {
        choice = json!("auto");
    }
    let serial =
        req["parallel_tool_calls"] == json!(false) && !choice.is_null() && choice != json!("none");
    let stop = match &req["stop"] {
        Value::String(s) => json!([s]),
        other => other.clone(),
    };
    let max_tokens = [&req["max_tokens"], &req["max_completion_tokens"]]
        .into_iter()
        .find(|v| !v.is_null())
        .cloned()
        .unwrap_or(json!(default_max_tokens));
    json!({
        "model": req["model"], "max_tokens": max_tokens, "temperature": req["temperature"],
        "top_p": req["top_p"], "stop": stop, "user": req["user"],
        "stream": req["stream"] == json!(true),
        "system": (!system.is_empty()).then(|| system.join("\n\n")),
        "turns": turns, "tools": tools, "tool_choice": choice, "serial_tools": serial,
        "schema": req.pointer("/response_format/json_schema/schema"),
    })
}
