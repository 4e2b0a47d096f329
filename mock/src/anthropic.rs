//! The mock's Anthropic Messages API: request validation as the real service does it, answers,
//! errors and typed stream events in Anthropic's shapes.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

/// The top-level fields the Messages API accepts (others: `Extra inputs are not permitted`).
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "output_config",
];

/// Checks a messages request as Anthropic does; the error message when it is refused.
/// `counting`: a token count (`/v1/messages/count_tokens`), which takes no `max_tokens`.
pub(super) fn validate(body: &Value, counting: bool) -> Result<(), String> {
    let Some(req) = body.as_object() else {
        return Err("body: Input should be a valid dictionary".into());
    };
    for key in req.keys() {
        if !FIELDS.contains(&key.as_str()) {
            return Err(format!("{key}: Extra inputs are not permitted"));
        }
    }
    if !counting && !req.get("max_tokens").is_some_and(Value::is_u64) {
        return Err("max_tokens: Field required".into());
    }
    if !req.get("model").is_some_and(Value::is_string) {
        return Err("model: Field required".into());
    }
    if let Some(t) = req.get("temperature").and_then(Value::as_f64)
        && !(0.0..=1.0).contains(&t)
    {
        return Err("temperature: Input should be less than or equal to 1".into());
    }
    if let Some(budget) = thinking_budget(body) {
        // Extended thinking, checked as the Messages API documents it.
        if budget < 1024 {
            return Err(
                "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                    .into(),
            );
        }
        if !counting && req.get("max_tokens").and_then(Value::as_u64) <= Some(budget) {
            return Err("`max_tokens` must be greater than `thinking.budget_tokens`".into());
        }
        if req
            .get("temperature")
            .and_then(Value::as_f64)
            .is_some_and(|t| t != 1.0)
        {
            return Err("`temperature` may only be set to 1 when thinking is enabled".into());
        }
        if req.contains_key("top_k") {
            return Err("`top_k` is not supported when thinking is enabled".into());
        }
    }
    // Prompt caching: each breakpoint `{"type": "ephemeral"}` (and a `ttl`), four at most, on
    // system blocks, tools and message content blocks.
    let items = |key: &str| req.get(key).and_then(Value::as_array).into_iter().flatten();
    let content = items("messages").flat_map(|m| {
        m.get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    });
    let mut breakpoints = 0;
    for c in items("system")
        .chain(items("tools"))
        .chain(content)
        .filter_map(|v| v.get("cache_control"))
    {
        if c.get("type").and_then(Value::as_str) != Some("ephemeral") {
            return Err("cache_control.type: Input should be 'ephemeral'".into());
        }
        breakpoints += 1;
    }
    if breakpoints > 4 {
        return Err(format!(
            "A maximum of 4 blocks with cache_control may be provided. Found {breakpoints}."
        ));
    }
    if let Some(config) = req.get("output_config") {
        let format = config.get("format").unwrap_or(&Value::Null);
        if format.get("type").and_then(Value::as_str) != Some("json_schema") {
            return Err("output_config.format.type: Input should be 'json_schema'".into());
        }
        let schema = format.get("schema").unwrap_or(&Value::Null);
        if !schema.is_object() {
            return Err("output_config.format.schema: Field required".into());
        }
        super::closed_objects(schema)?;
    }
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return Err("messages: Field required".into());
    };
    // With thinking on, the last assistant turn that called tools carries its thinking back,
    // signed by the service (the mock's own signature), as the Messages API requires.
    if thinking_budget(body).is_some()
        && let Some((i, last)) = messages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, m)| m.get("role").and_then(Value::as_str) == Some("assistant"))
        && let Some(blocks) = last.get("content").and_then(Value::as_array)
        && blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
    {
        let first = blocks.first().unwrap_or(&Value::Null);
        match first.get("type").and_then(Value::as_str) {
            Some("thinking") => {
                if first.get("signature").and_then(Value::as_str) != Some(SIGNATURE) {
                    return Err(format!(
                        "messages.{i}.content.0: Invalid `signature` in `thinking` block"
                    ));
                }
            }
            Some("redacted_thinking") => {}
            found => {
                return Err(format!(
                    "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{}`. When `thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks).",
                    found.unwrap_or("")
                ));
            }
        }
    }
    // Tool-use ids the previous assistant turn opened, to be answered in the next user turn.
    let mut open: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role == "system" {
            return Err(
                "messages: Unexpected role \"system\". The Messages API accepts a \
                        top-level `system` parameter, not \"system\" as an input message role."
                    .into(),
            );
        }
        if role != "user" && role != "assistant" {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(b)) => b.clone(),
            _ => return Err(format!("messages.{i}.content: Field required")),
        };
        if blocks.is_empty() {
            return Err(format!(
                "messages.{i}: all messages must have non-empty content"
            ));
        }
        let mut answered = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => {
                    if !b.get("text").is_some_and(Value::is_string) {
                        return Err(format!("{at}.text: Field required"));
                    }
                }
                Some("image") => {
                    let kind = b.pointer("/source/type").and_then(Value::as_str);
                    if !matches!(kind, Some("base64" | "url")) {
                        return Err(format!("{at}.source: Input tag does not match"));
                    }
                }
                Some("document") if role == "user" => {
                    let source = b.get("source").unwrap_or(&Value::Null);
                    match source.get("type").and_then(Value::as_str) {
                        Some("base64")
                            if source.get("media_type").and_then(Value::as_str)
                                == Some("application/pdf") => {}
                        Some("text") | Some("url") | Some("file") => {}
                        _ => return Err(format!("{at}.source: Input tag does not match")),
                    }
                }
                Some("tool_use") if role == "assistant" => {
                    let id = b.get("id").and_then(Value::as_str).unwrap_or("");
                    if !b.get("input").is_some_and(Value::is_object) {
                        return Err(format!(
                            "{at}.tool_use.input: Input should be a valid dictionary"
                        ));
                    }
                    open.push(id.to_string());
                }
                Some("tool_result") if role == "user" => {
                    let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                    answered.push(id.to_string());
                }
                // Earlier thinking, sent back with its turn.
                Some("thinking" | "redacted_thinking") if role == "assistant" => {}
                Some(other) => {
                    return Err(format!(
                        "{at}.type: unexpected block type {other:?} in a {role} turn"
                    ));
                }
                None => return Err(format!("{at}.type: Field required")),
            }
        }
        if role == "user" {
            for id in &answered {
                if !open.contains(id) {
                    return Err(format!(
                        "messages.{i}.content: unexpected `tool_use_id` found in `tool_result` \
                         blocks: {id}. Each `tool_result` block must have a corresponding \
                         `tool_use` block in the previous message."
                    ));
                }
            }
            if let Some(missing) = open.iter().find(|id| !answered.contains(id)) {
                return Err(format!(
                    "messages.{i}: `tool_use` ids were found without `tool_result` blocks \
                     immediately after: {missing}"
                ));
            }
            open.clear();
        } else if i + 1 == messages.len() {
            open.clear();
        }
    }
    if !open.is_empty() {
        return Err("messages: `tool_use` ids were found without `tool_result` blocks".into());
    }
    Ok(())
}

/// Anthropic's error type for a status.
pub(super) fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error body in Anthropic's shape.
pub(super) fn error_body(status: StatusCode, message: &str) -> String {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}}).to_string()
}

/// The tool the answer calls, if any: the first tool offered, unless the conversation ends
/// with its result or the caller said `none`.
pub(super) fn tool_to_call(req: &Value) -> Option<String> {
    let first = req.pointer("/tools/0/name").and_then(Value::as_str)?;
    if req.pointer("/tool_choice/type").and_then(Value::as_str) == Some("none") {
        return None;
    }
    let last = req.get("messages").and_then(Value::as_array)?.last()?;
    let answers_a_tool = last
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|b| {
            b.iter()
                .any(|b| b.get("type") == Some(&json!("tool_result")))
        });
    (!answers_a_tool).then(|| first.to_string())
}

/// A whole answer.
/// The thinking budget a request enables (`thinking: {"type": "enabled", "budget_tokens": N}`).
pub(super) fn thinking_budget(req: &Value) -> Option<u64> {
    let t = req.get("thinking")?;
    (t.get("type").and_then(Value::as_str) == Some("enabled"))
        .then(|| t.get("budget_tokens").and_then(Value::as_u64).unwrap_or(0))
}

/// The mock's thinking, as a `thinking` content block carries it.
pub(super) const THOUGHT: &str = "Let me think about it.";

/// The signature the mock gives its thinking (and checks when it comes back).
const SIGNATURE: &str = "sig-mock";

pub(super) fn message(
    model: &str,
    text: &str,
    tool: Option<&str>,
    input_tokens: u64,
    thinking: bool,
) -> Value {
    let (mut content, stop) = match tool {
        Some(name) => (
            json!([{"type": "text", "text": text},
                   {"type": "tool_use", "id": "toolu_mock_0", "name": name,
                    "input": {"q": "mock"}}]),
            "tool_use",
        ),
        None => (json!([{"type": "text", "text": text}]), "end_turn"),
    };
    if thinking && let Value::Array(blocks) = &mut content {
        blocks.insert(
            0,
            json!({"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE}),
        );
    }
    json!({
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": 4}
    })
}

fn event(v: Value) -> Bytes {
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
}

/// What comes before the content events of a stream; with `thinking`, a whole thinking block
/// first (index 0), so the content block is index 1.
pub(super) fn stream_head(
    model: &str,
    input_tokens: u64,
    tool: Option<&str>,
    thinking: bool,
) -> Vec<Bytes> {
    let block = match tool {
        Some(name) => json!({"type": "tool_use", "id": "toolu_mock_0", "name": name, "input": {}}),
        None => json!({"type": "text", "text": ""}),
    };
    let mut head = vec![event(json!({"type": "message_start", "message": {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}))];
    if thinking {
        head.extend([
            event(json!({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "thinking", "thinking": "", "signature": ""}})),
            event(json!({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "thinking_delta", "thinking": THOUGHT}})),
            event(json!({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "signature_delta", "signature": SIGNATURE}})),
            event(json!({"type": "content_block_stop", "index": 0})),
        ]);
    }
    let index = u64::from(thinking);
    head.push(event(
        json!({"type": "content_block_start", "index": index, "content_block": block}),
    ));
    head.push(event(json!({"type": "ping"})));
    head
}

/// The `i`th content event (of the block at `index`): a text delta, or a piece of the tool
/// call's JSON input.
pub(super) fn stream_chunk(i: usize, tool: bool, index: u64) -> Bytes {
    let delta = if tool {
        let piece = if i == 0 {
            "{\"q\": \"tok0 ".to_string()
        } else {
            format!("tok{i} ")
        };
        json!({"type": "input_json_delta", "partial_json": piece})
    } else {
        json!({"type": "text_delta", "text": format!("tok{i} ")})
    };
    event(json!({"type": "content_block_delta", "index": index, "delta": delta}))
}

/// What ends a stream of `chunks` content events (of the block at `index`).
pub(super) fn stream_tail(chunks: usize, tool: bool, index: u64) -> Vec<Bytes> {
    let mut tail = Vec::new();
    if tool {
        tail.push(event(json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": "\"}"}})));
    }
    tail.push(event(json!({"type": "content_block_stop", "index": index})));
    tail.push(event(json!({"type": "message_delta",
                           "delta": {"stop_reason": if tool { "tool_use" } else { "end_turn" },
                                     "stop_sequence": null},
                           "usage": {"output_tokens": chunks}})));
    tail.push(event(json!({"type": "message_stop"})));
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_as_anthropic_does() {
        let ok =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(validate(&ok, false), Ok(()));
        let mut no_max = ok.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(
            validate(&no_max, false).unwrap_err(),
            "max_tokens: Field required"
        );
        // A token count takes none.
        assert_eq!(validate(&no_max, true), Ok(()));
        let system = json!({"model": "m", "max_tokens": 5,
                            "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]});
        assert!(
            validate(&system, false)
                .unwrap_err()
                .contains("Unexpected role \"system\"")
        );
        let extra = json!({"model": "m", "max_tokens": 5, "n": 2, "messages": []});
        assert_eq!(
            validate(&extra, false).unwrap_err(),
            "n: Extra inputs are not permitted"
        );
        let orphan = json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}]});
        assert!(
            validate(&orphan, false)
                .unwrap_err()
                .contains("unexpected `tool_use_id`")
        );
        let answered = json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sun"}]}]});
        assert_eq!(validate(&answered, false), Ok(()));
    }
}
