use super::*;

fn to_messages(v: Value) -> Result<Value, Untranslatable> {
    let t = chat_to_messages(v.to_string().as_bytes(), &Options::default())?;
    Ok(serde_json::from_slice(&t.body).unwrap())
}

fn to_chat(v: Value) -> Result<Value, Untranslatable> {
    let t = messages_to_chat(v.to_string().as_bytes(), &Options::default())?;
    Ok(serde_json::from_slice(&t.body).unwrap())
}

#[test]
fn system_prompts_move_to_system_and_same_role_turns_merge() {
    let out = to_messages(json!({
        "model": "claude", "temperature": 0.5, "top_p": 0.9, "stop": "END", "user": "u-1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "there"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]}
        ]
    }))
    .unwrap();
    assert_eq!(
        out,
        json!({
            "model": "claude", "temperature": 0.5, "top_p": 0.9, "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"}, "max_tokens": 4096,
            "system": "Be brief.\n\nNo emoji.",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "there"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.png"}}
            ]}]
        })
    );
}

#[test]
fn tools_calls_and_parallel_results_translate() {
    let out = to_messages(json!({
        "model": "claude", "max_completion_tokens": 100, "parallel_tool_calls": false,
        "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "weather", "description": "d",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sun"},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"}
        ]
    }))
    .unwrap();
    assert_eq!(out["max_tokens"], 100);
    assert_eq!(
        out["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        out["tools"],
        json!([{"name": "weather", "description": "d",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    );
    assert_eq!(
        out["messages"][1]["content"][1]["input"],
        json!({"city": "Rome"})
    );
    assert_eq!(
        out["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "sun"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "rain"}]})
    );
}

#[test]
fn what_has_no_counterpart_is_refused_by_name_or_dropped_when_asked() {
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("response_format", json!({"type": "json_object"})),
        ("seed", json!(7)),
        ("frequency_penalty", json!(0.5)),
        ("temperature", json!(1.5)),
    ] {
        let mut req = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        req[field] = value;
        let err = to_messages(req.clone()).unwrap_err();
        assert_eq!(err.param, field, "{err}");
        let dropped = chat_to_messages(
            req.to_string().as_bytes(),
            &Options {
                drop_unsupported: true,
                ..Options::default()
            },
        )
        .unwrap();
        let dropped: Value = serde_json::from_slice(&dropped.body).unwrap();
        assert!(
            field == "temperature" || dropped.get(field).is_none(),
            "{field}"
        );
    }
    let audio = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]});
    assert_eq!(
        to_messages(audio).unwrap_err().to_string(),
        "messages[0].content[0].type: input_audio cannot be sent to an Anthropic backend"
    );
    // Neutral values of OpenAI-only parameters are not refused.
    let neutral = json!({"model": "m", "n": 1, "logprobs": false, "presence_penalty": 0,
                         "stream_options": {"include_usage": true}, "store": false,
                         "messages": [{"role": "user", "content": "x"}]});
    assert!(to_messages(neutral).is_ok());
    // The target's own parameters (as override_params put them) pass as they are.
    let own = to_messages(json!({"model": "m", "top_k": 5, "stop_sequences": ["Z"],
                                 "messages": [{"role": "user", "content": "x"}]}))
    .unwrap();
    assert_eq!(
        (own["top_k"].clone(), own["stop_sequences"].clone()),
        (json!(5), json!(["Z"]))
    );
}

#[test]
fn documents_and_prompt_caching_breakpoints_translate() {
    let pdf = "data:application/pdf;base64,JVBERi0=";
    let to = to_messages(json!({"model": "m",
        "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "system", "content": "Long rules.", "cache_control": {"type": "ephemeral"}},
            {"role": "system", "content": "Short."},
            {"role": "user", "content": [
                {"type": "file", "file": {"file_data": pdf, "filename": "q.pdf"}},
                {"type": "text", "text": "Summarise", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
            {"role": "assistant", "content": "Done.", "cache_control": {"type": "ephemeral"}}]}))
    .unwrap();
    assert_eq!(
        to["system"],
        json!([{"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}},
               {"type": "text", "text": "Short."}])
    );
    assert_eq!(
        to["tools"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(
        to["messages"][0]["content"][0],
        json!({"type": "document", "title": "q.pdf",
               "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}})
    );
    assert_eq!(
        to["messages"][0]["content"][1]["cache_control"],
        json!({"type": "ephemeral", "ttl": "1h"})
    );
    assert_eq!(
        to["messages"][1]["content"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    // Without a breakpoint the system prompt stays one string.
    let plain = to_messages(json!({"model": "m", "messages": [
        {"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}))
    .unwrap();
    assert_eq!(plain["system"], "a");
    // A file id is the OpenAI side's: refused, naming the part.
    let by_id = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-1"}}]}]}),
    )
    .unwrap_err();
    assert_eq!(by_id.param, "messages[0].content[0].file.file_data");
    // And back: a PDF document becomes an inline file part.
    let back = to_chat(json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user",
        "content": [{"type": "document", "title": "q.pdf",
                     "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                    {"type": "text", "text": "Summarise", "cache_control": {"type": "ephemeral"}}]}]}))
    .unwrap();
    assert_eq!(
        back["messages"][0]["content"],
        json!([{"type": "file", "file": {"file_data": pdf, "filename": "q.pdf"}},
               {"type": "text", "text": "Summarise"}])
    );
}

#[test]
fn structured_outputs_map_to_each_other_s_field() {
    let schema = json!({"type": "object", "additionalProperties": false,
                        "properties": {"a": {"type": "string"}}, "required": ["a"]});
    let to = to_messages(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}))
    .unwrap();
    assert_eq!(
        to["output_config"],
        json!({"format": {"type": "json_schema", "schema": schema}})
    );
    let back = to_chat(json!({"model": "m", "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}}}))
    .unwrap();
    assert_eq!(back["response_format"]["json_schema"]["schema"], schema);
    assert_eq!(back["response_format"]["json_schema"]["strict"], true);
    let no_schema = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}),
    )
    .unwrap_err();
    assert_eq!(no_schema.param, "response_format.json_schema.schema");
    let other = to_chat(json!({"model": "m", "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "output_config": {"effort": "high"}}))
    .unwrap_err();
    assert_eq!(other.param, "output_config.effort");
}

#[test]
fn messages_requests_become_chat_requests() {
    let out = to_chat(json!({
        "model": "gpt-4o", "max_tokens": 50, "system": "Be brief.", "stream": true,
        "stop_sequences": ["END"], "metadata": {"user_id": "u"},
        "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "weather"},
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "snow"},
                {"type": "text", "text": "Thanks"}]}
        ]
    }))
    .unwrap();
    assert_eq!(
        out,
        json!({
            "model": "gpt-4o", "max_tokens": 50, "stream": true, "stop": ["END"], "user": "u",
            "stream_options": {"include_usage": true},
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "snow"},
                {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}
            ]
        })
    );
    assert_eq!(
        to_chat(json!({"model": "m", "max_tokens": 5, "top_k": 3, "messages": []}))
            .unwrap_err()
            .param,
        "top_k"
    );
}

#[test]
fn answers_and_errors_translate_both_ways() {
    let msg = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Hi"},
                    {"type": "tool_use", "id": "t1", "name": "w", "input": {"a": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 3}});
    let chat: Value =
        serde_json::from_slice(&message_to_completion(msg.to_string().as_bytes(), 7).unwrap())
            .unwrap();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["created"], 7);
    assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chat["choices"][0]["message"]["content"], "Hi");
    assert_eq!(
        chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"a\":1}"
    );
    assert_eq!(chat["usage"]["prompt_tokens"], 15);
    assert_eq!(chat["usage"]["total_tokens"], 18);
    let back: Value =
        serde_json::from_slice(&completion_to_message(chat.to_string().as_bytes()).unwrap())
            .unwrap();
    assert_eq!(back["content"], msg["content"]);
    assert_eq!(back["stop_reason"], "tool_use");
    // Cache reads come back as cache reads: the usage makes the round trip whole.
    assert_eq!(back["usage"], msg["usage"]);

    let overloaded =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    assert_eq!(status_for_openai(529), 503);
    let e: Value = serde_json::from_slice(&error_to_openai(overloaded)).unwrap();
    assert_eq!(
        e,
        json!({"error": {"message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded"}})
    );
    let e: Value = serde_json::from_slice(&error_to_anthropic(
        429,
        br#"{"error":{"message":"slow down","type":"requests"}}"#,
    ))
    .unwrap();
    assert_eq!(
        e,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
    );
    let e: Value = serde_json::from_slice(&error_to_openai(b"<html>bad gateway</html>")).unwrap();
    assert_eq!(e["error"]["message"], "<html>bad gateway</html>");
}

const ANTHROPIC_STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\":\"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"w\",\"input\":{}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":1}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

fn run(t: &mut dyn StreamTranslate, pieces: &[&[u8]]) -> Result<String, String> {
    let mut out = Vec::new();
    for p in pieces {
        t.feed(p, &mut out)?;
    }
    t.finish(&mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

/// Feeds `bytes` cut in two at every boundary into a fresh translator from `make`; each time
/// the output must be `whole`.
fn same_at_every_cut<T: StreamTranslate>(make: impl Fn() -> T, bytes: &[u8], whole: &str) {
    for cut in 0..=bytes.len() {
        let (a, b) = bytes.split_at(cut);
        assert_eq!(run(&mut make(), &[a, b]).unwrap(), whole, "cut at {cut}");
    }
}

/// An Anthropic stream translated to chat chunks (created at `created`) in one go: the text,
/// which ends with `[DONE]`, and the chunks before it, parsed.
fn chat_chunks(created: u64, stream: &str) -> (String, Vec<Value>) {
    let whole = run(&mut ToChatChunks::new(created, true), &[stream.as_bytes()]).unwrap();
    let data = datas(&whole);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks = data[..data.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    (whole, chunks)
}

/// The data payloads of an SSE text.
fn datas(sse: &str) -> Vec<String> {
    sse.split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn an_anthropic_stream_becomes_chat_chunks_at_every_cut() {
    let (whole, parsed) = chat_chunks(3, ANTHROPIC_STREAM);
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    let args: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"a\":1}");
    assert!(
        parsed
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
    let usage = &parsed.last().unwrap()["usage"];
    assert_eq!(
        (
            usage["prompt_tokens"].clone(),
            usage["completion_tokens"].clone()
        ),
        (json!(12), json!(9))
    );
    same_at_every_cut(
        || ToChatChunks::new(3, true),
        ANTHROPIC_STREAM.as_bytes(),
        &whole,
    );
}

#[test]
fn a_chat_stream_becomes_anthropic_events_at_every_cut() {
    let stream = "data: {\"id\":\"c1\",\"model\":\"gpt\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"w\",\"arguments\":\"\"}}]}}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}\n\n\
data: [DONE]\n\n";
    let whole = run(&mut ToMessageEvents::new(), &[stream.as_bytes()]).unwrap();
    let events: Vec<Value> = datas(&whole)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[7]["delta"]["stop_reason"], "tool_use");
    assert_eq!(events[7]["usage"]["output_tokens"], 6);
    assert_eq!(events[4]["content_block"]["id"], "call_1");
    same_at_every_cut(ToMessageEvents::new, stream.as_bytes(), &whole);
}

#[test]
fn an_error_event_stays_an_error_and_garbage_is_refused() {
    let stream = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{}}}\n\n\
event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let out = run(&mut ToChatChunks::new(0, false), &[stream]).unwrap();
    let last: Value = serde_json::from_str(datas(&out).last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "overloaded");
    assert!(!out.contains("[DONE]"));
    assert!(run(&mut ToChatChunks::new(0, false), &[b"data: {not json\n\n"]).is_err());
}

// Fixtures written from the providers' API references (their documented examples).
const FIXTURE_ANTHROPIC_STREAM: &str =
    include_str!("../../../tests/fixtures/translate/anthropic_stream_tool_use.sse");
const FIXTURE_OPENAI_STREAM: &str =
    include_str!("../../../tests/fixtures/translate/openai_stream_tool_calls.sse");

#[test]
fn the_documented_anthropic_tool_use_stream_becomes_chat_chunks_at_every_cut() {
    let (whole, chunks) = chat_chunks(9, FIXTURE_ANTHROPIC_STREAM);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Okay, let's check the weather for San Francisco, CA:");
    let call = &chunks
        .iter()
        .find(|c| c["choices"][0]["delta"]["tool_calls"][0]["id"].is_string())
        .unwrap()["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    let args: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(
        args,
        json!({"location": "San Francisco, CA", "unit": "fahrenheit"})
    );
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        (
            usage["prompt_tokens"].clone(),
            usage["completion_tokens"].clone()
        ),
        (json!(472), json!(89))
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == "msg_014p7gG3wDgGV9EUtLvnow3U" && c["created"] == 9)
    );
    same_at_every_cut(
        || ToChatChunks::new(9, true),
        FIXTURE_ANTHROPIC_STREAM.as_bytes(),
        &whole,
    );
}

#[test]
fn the_documented_openai_tool_call_stream_becomes_anthropic_events_at_every_cut() {
    let whole = run(
        &mut ToMessageEvents::new(),
        &[FIXTURE_OPENAI_STREAM.as_bytes()],
    )
    .unwrap();
    let events: Vec<Value> = datas(&whole)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types[..2], ["message_start", "content_block_start"]);
    assert_eq!(
        types[types.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert_eq!(
        events[1]["content_block"],
        json!({"type": "tool_use", "id": "call_4vRGFUvrz5C8XYNXRD1pzy7R",
        "name": "get_current_weather", "input": {}})
    );
    let input: String = events
        .iter()
        .filter_map(|e| e["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&input).unwrap(),
        json!({"location": "Boston, MA"})
    );
    let delta = &events[events.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(
        delta["usage"],
        json!({"input_tokens": 82, "output_tokens": 18})
    );
    // Each event's name line matches its type, as Anthropic's SDKs read it.
    for e in whole.split("\n\n").filter(|e| !e.is_empty()) {
        let name = e.lines().next().unwrap().strip_prefix("event: ").unwrap();
        assert!(e.contains(&format!("\"type\":\"{name}\"")), "{e}");
    }
    same_at_every_cut(
        ToMessageEvents::new,
        FIXTURE_OPENAI_STREAM.as_bytes(),
        &whole,
    );
}

#[test]
fn the_usage_chunk_asked_for_on_a_caller_s_behalf_is_removed_at_every_cut() {
    let stream = "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
data: [DONE]\n\n";
    let want = "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: [DONE]\n\n";
    same_at_every_cut(StripUsage::default, stream.as_bytes(), want);
    let asked: Value = serde_json::from_slice(
        &ask_stream_usage(br#"{"stream":true,"stream_options":{"x":1},"messages":[]}"#).unwrap(),
    )
    .unwrap();
    assert_eq!(
        asked["stream_options"],
        json!({"x": 1, "include_usage": true})
    );
    assert_eq!(ask_stream_usage(br#"{"stream":false}"#), None);
    assert_eq!(
        ask_stream_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
        None
    );
}

#[test]
fn thinking_asked_of_an_openai_backend_is_a_reasoning_effort_and_its_reasoning_comes_back_as_thinking()
 {
    for (budget, level) in [
        (1024, "low"),
        (2047, "low"),
        (2048, "medium"),
        (4096, "high"),
    ] {
        let req = to_chat(json!({"model": "m", "max_tokens": 8000,
            "thinking": {"type": "enabled", "budget_tokens": budget},
            "messages": [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": [
                             {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                             {"type": "text", "text": "y"}]},
                         {"role": "user", "content": "z"}]}))
        .unwrap();
        assert_eq!(req["reasoning_effort"], level, "{budget}");
        assert!(req.get("thinking").is_none());
        assert_eq!(
            req["messages"][1]["content"], "y",
            "earlier thinking left out of the history"
        );
    }
    let off = to_chat(
        json!({"model": "m", "max_tokens": 5, "thinking": {"type": "disabled"},
                             "messages": [{"role": "user", "content": "x"}]}),
    )
    .unwrap();
    assert!(off.get("reasoning_effort").is_none());
    // The answer of an OpenAI-compatible server that returns its reasoning (DeepSeek, vLLM).
    let answer = json!({"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "reasoning_content": "think", "content": "done"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}});
    let msg: Value =
        serde_json::from_slice(&completion_to_message(answer.to_string().as_bytes()).unwrap())
            .unwrap();
    assert_eq!(
        msg["content"],
        json!([{"type": "thinking", "thinking": "think", "signature": ""},
               {"type": "text", "text": "done"}])
    );
    // Streamed: a thinking block of thinking deltas, then the text block, however it is cut.
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let stream = [
        chunk(
            json!({"role": "assistant", "reasoning_content": "th"}),
            Value::Null,
        ),
        chunk(json!({"reasoning_content": "ink"}), Value::Null),
        chunk(json!({"content": "done"}), Value::Null),
        chunk(json!({}), json!("stop")),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let whole = run(&mut ToMessageEvents::new(), &[stream.as_bytes()]).unwrap();
    same_at_every_cut(ToMessageEvents::new, stream.as_bytes(), &whole);
    let events: Vec<Value> = datas(&whole)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            let t = e["type"].as_str().unwrap();
            match e["delta"]["type"]
                .as_str()
                .or(e["content_block"]["type"].as_str())
            {
                Some(k) => format!("{t}:{k}"),
                None => t.to_string(),
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "message_start",
            "content_block_start:thinking",
            "content_block_delta:thinking_delta",
            "content_block_delta:thinking_delta",
            "content_block_stop",
            "content_block_start:text",
            "content_block_delta:text_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
}

#[test]
fn a_responses_request_becomes_a_chat_request_and_its_answer_a_response() {
    let (chat, stream) = responses_to_chat(
        json!({"model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "store": true,
               "input": [
                   {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                                {"type": "input_image", "image_url": "https://x/a.png"}]},
                   {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"q\":1}"},
                   {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                   {"type": "reasoning", "id": "rs_1", "summary": []},
                   {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
                   {"role": "user", "content": "Thanks"}],
               "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
               "tool_choice": {"type": "function", "name": "w"},
               "text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}}}})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    assert!(!stream);
    let chat: Value = serde_json::from_slice(&chat).unwrap();
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                         {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"q\":1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks"}])
    );
    assert_eq!(chat["max_completion_tokens"], 50);
    assert_eq!(chat["tools"][0]["function"]["name"], "w");
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "w"}})
    );
    assert_eq!(chat["response_format"]["json_schema"]["name"], "o");
    for (field, value) in [
        ("previous_response_id", json!("resp_1")),
        ("background", json!(true)),
        ("tools", json!([{"type": "web_search"}])),
    ] {
        let mut req = json!({"model": "m", "input": "x"});
        req[field] = value;
        let err = responses_to_chat(req.to_string().as_bytes()).unwrap_err();
        assert!(err.param.starts_with(field), "{err}");
    }
    let (chat, stream) = responses_to_chat(br#"{"model":"m","input":"hi","stream":true}"#).unwrap();
    assert!(stream);
    let chat: Value = serde_json::from_slice(&chat).unwrap();
    assert_eq!(chat["stream_options"]["include_usage"], true);

    let answer = json!({"id": "x1", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3}});
    let response: Value =
        serde_json::from_slice(&completion_to_response(answer.to_string().as_bytes(), 9).unwrap())
            .unwrap();
    assert_eq!(response["id"], "resp_x1");
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["created_at"], 9);
    assert_eq!(response["output"][0]["content"][0]["text"], "Checking.");
    assert_eq!(response["output"][1]["type"], "function_call");
    assert_eq!(response["output"][1]["call_id"], "c2");
    assert_eq!(response["usage"]["total_tokens"], 10);
}

#[test]
fn an_anthropic_stream_becomes_responses_events_at_every_cut() {
    let anthropic = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":5,\"output_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let events = responses_events(anthropic);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let seq: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seq, (0..10).collect::<Vec<_>>());
    let done = &events[9]["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["usage"]["input_tokens"], 5);
    assert_eq!(done["usage"]["output_tokens"], 2);
}

#[test]
fn anthropic_thinking_streams_as_a_responses_reasoning_item() {
    let anthropic = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_2\",\"model\":\"claude\",\"usage\":{\"input_tokens\":5,\"output_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Hmm.\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"s\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Yes\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let events = responses_events(anthropic);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let done = &events[14]["response"];
    assert_eq!(done["output"][0]["summary"][0]["text"], "Hmm.");
    assert_eq!(done["output"][1]["content"][0]["text"], "Yes");
}

#[test]
fn a_streamed_thinking_block_comes_whole_and_signed_when_it_ends() {
    let anthropic = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Let me \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"see.\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"ab\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"cd\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let whole = run(&mut ToChatChunks::new(1, false), &[anthropic.as_bytes()]).unwrap();
    same_at_every_cut(|| ToChatChunks::new(1, false), anthropic.as_bytes(), &whole);
    let blocks: Vec<Value> = datas(&whole)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"].get("thinking_blocks").cloned())
        .collect();
    assert_eq!(
        blocks,
        [json!([{"type": "thinking", "thinking": "Let me see.", "signature": "abcd"}])]
    );
}

/// An Anthropic stream through chat chunks to Responses events (created at 3), the same at
/// every cut; the events, parsed.
fn responses_events(anthropic: &str) -> Vec<Value> {
    let make = || {
        Chain::new(
            Box::new(ToChatChunks::new(3, true)),
            Box::new(ToResponseEvents::new(3)),
        )
    };
    let whole = run(&mut make(), &[anthropic.as_bytes()]).unwrap();
    same_at_every_cut(make, anthropic.as_bytes(), &whole);
    datas(&whole)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}
