//! OpenAI chat completions ⇄ Anthropic messages: requests, answers, error bodies and streams.
//!
//! Pure functions and byte-stream state machines, no I/O; the
//! [`translate`](crate::translate) layer drives them per backend. Field by field:
//!
//! | OpenAI chat (`/v1/chat/completions`) | Anthropic messages (`/v1/messages`) |
//! |---|---|
//! | `system` / `developer` messages | `system` (joined, in order) |
//! | `user` text and `image_url` parts (URL or `data:` base64) | `text` and `image` blocks (`url` or `base64` source) |
//! | `assistant` content and `tool_calls` | `text` and `tool_use` blocks (`arguments` parsed to `input`) |
//! | `tool` messages | `tool_result` blocks in a `user` turn (consecutive ones merged: parallel calls) |
//! | consecutive turns of one role | merged into one turn |
//! | `max_tokens` / `max_completion_tokens` (none: the configured default) | `max_tokens` (required) |
//! | `temperature` (0-2), `top_p`, `stop`, `user` | `temperature` (0-1), `top_p`, `stop_sequences`, `metadata.user_id` |
//! | `tools` (`function`), `tool_choice` (`auto`, `none`, `required`, a function), `parallel_tool_calls: false` | `tools` (`input_schema`), `tool_choice` (`auto`, `none`, `any`, `tool`), `disable_parallel_tool_use` |
//! | an assistant turn's `thinking_blocks` (as the answer gave them: signed) | its `thinking` / `redacted_thinking` blocks, first (a tool-using turn must carry them back when thinking is on); answers and streams give them as `thinking_blocks` |
//! | `reasoning_effort` `low` / `medium` / `high` (and back from `thinking`: a budget below 2048 `low`, below 4096 `medium`, else `high`; thinking blocks of the history left out toward OpenAI; `reasoning_content` of OpenAI-compatible servers as thinking blocks, without signature) (`none`, `minimal`: no thinking); answer `message.reasoning_content`, stream `delta.reasoning_content` | `thinking: {"type": "enabled", "budget_tokens": 1024 / 2048 / 4096}`, the budget kept below `max_tokens` (refused when `max_tokens` leaves less than 1024, or with a `temperature` other than 1); answer `thinking` blocks, stream `thinking_delta` |
//! | `file` parts with `file_data` (a base64 data URL: a PDF), `filename` | `document` blocks (`base64` source), `title`; a plain-text document as text |
//! | `cache_control` on a message, a content part or a tool (as LiteLLM and Portkey accept it) | `cache_control` on the block it ends (system messages with one become system blocks), on the tool; toward OpenAI dropped (OpenAI caches on its own) |
//! | `usage.prompt_tokens_details.cached_tokens` | `usage.cache_read_input_tokens` |
//! | `response_format` `json_schema` (its `schema`) | `output_config.format` `json_schema` (structured outputs; the answer is the JSON as text either way; toward OpenAI `strict: true`) |
//! | `stream`, `stream_options.include_usage` | `stream` (usage always sent; a usage chunk only when asked for) |
//! | answer `finish_reason` `stop` / `length` / `tool_calls` / `content_filter` | `stop_reason` `end_turn` or `stop_sequence` / `max_tokens` / `tool_use` / `refusal` |
//! | `usage.prompt_tokens` / `completion_tokens` | `usage.input_tokens` (+ cache reads and writes) / `output_tokens` |
//! | `{"error": {"message", "type", "param", "code"}}` | `{"type": "error", "error": {"type", "message"}}`; `529 overloaded_error` ⇄ `503` |
//!
//! Parameters of the target's own API found on the request (`top_k`, `stop_sequences`,
//! `thinking` for Anthropic; `logprobs`, `seed`… for OpenAI), as `override_params` put them,
//! are carried over as they are. Anything else that has no counterpart (`n > 1`, `logprobs`,
//! `response_format` `json_object`, audio parts, a temperature above 1 for Anthropic…) is refused, naming the
//! parameter, or dropped with [`Options::drop_unsupported`]; content is never dropped.

use std::fmt;

use serde_json::{Map, Value, json};

/// How requests are translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `max_tokens` sent to Anthropic when the caller gave none (Anthropic requires it;
    /// default 4096).
    pub default_max_tokens: u32,
    /// Drop parameters that have no counterpart instead of refusing the request (default
    /// `false`: refuse, naming the parameter). Message content is never dropped.
    pub drop_unsupported: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            default_max_tokens: 4096,
            drop_unsupported: false,
        }
    }
}

/// A request that cannot be translated for the backend's API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Untranslatable {
    /// The parameter, as a path into the request (`messages[2].content[0].type`, `logprobs`).
    pub param: String,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.param, self.reason)
    }
}

impl std::error::Error for Untranslatable {}

fn bad(param: impl Into<String>, reason: impl Into<String>) -> Untranslatable {
    Untranslatable {
        param: param.into(),
        reason: reason.into(),
    }
}

/// A translated request body and what its answer will need.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Translated {
    pub(crate) body: Vec<u8>,
    /// The caller asked for a stream.
    pub(crate) stream: bool,
    /// The caller (OpenAI) asked for a usage chunk at the end of the stream.
    pub(crate) include_usage: bool,
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Untranslatable> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("body", "must be a JSON object")),
        Err(e) => Err(bad("body", format!("not JSON ({e})"))),
    }
}

fn is_false_or_null(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}

fn is_zero_or_null(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(0.0)
}

/// Text of an OpenAI content value (a string or text parts).
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                out.push_str(p.get("text")?.as_str()?);
            }
            Some(out)
        }
        _ => None,
    }
}

const TO_ANTHROPIC: &str = "cannot be sent to an Anthropic backend";
const TO_OPENAI: &str = "cannot be sent to an OpenAI backend";

/// OpenAI chat request → Anthropic messages request.
pub(crate) fn chat_to_messages(body: &[u8], opts: &Options) -> Result<Translated, Untranslatable> {
    let req = parse_object(body)?;
    let mut out = Map::new();
    // Each system message's text, and its prompt-caching breakpoint if it set one.
    let mut system: Vec<(String, Option<Value>)> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let mut stream = false;
    let mut include_usage = false;
    let mut tools_given = false;
    let mut tool_choice: Option<Value> = None;
    let mut parallel: Option<bool> = None;
    let mut effort: Option<u64> = None;
    let unsupported = |key: &str, why: &str| -> Result<(), Untranslatable> {
        if opts.drop_unsupported {
            Ok(())
        } else {
            Err(bad(key, why))
        }
    };
    for (key, value) in req {
        match key.as_str() {
            "model" | "top_p" | "top_k" | "thinking" | "stop_sequences" => {
                out.insert(key, value);
            }
            "messages" => {
                let Value::Array(messages) = value else {
                    return Err(bad("messages", "must be an array"));
                };
                for (i, m) in messages.iter().enumerate() {
                    let path = format!("messages[{i}]");
                    let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                    match role {
                        "system" | "developer" => {
                            let content = m.get("content").unwrap_or(&Value::Null);
                            let text = text_of(content)
                                .ok_or_else(|| bad(format!("{path}.content"), "must be text"))?;
                            system.push((text, breakpoint_of(m, content)));
                        }
                        "user" => {
                            let mut blocks = user_blocks(m.get("content"), &path)?;
                            cache_last(m, &mut blocks);
                            push_turn(&mut turns, "user", blocks);
                        }
                        "assistant" => {
                            let mut blocks = assistant_blocks(m, &path)?;
                            cache_last(m, &mut blocks);
                            push_turn(&mut turns, "assistant", blocks);
                        }
                        "tool" => {
                            let id = m
                                .get("tool_call_id")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("{path}.tool_call_id"), "required"))?;
                            let content = text_of(m.get("content").unwrap_or(&Value::Null))
                                .ok_or_else(|| bad(format!("{path}.content"), "must be text"))?;
                            let mut blocks = vec![json!({"type": "tool_result", "tool_use_id": id,
                                               "content": content})];
                            cache_last(m, &mut blocks);
                            push_turn(&mut turns, "user", blocks);
                        }
                        other => {
                            return Err(bad(
                                format!("{path}.role"),
                                format!("{other:?} {TO_ANTHROPIC}"),
                            ));
                        }
                    }
                }
            }
            "system" => match value {
                Value::String(s) => system.push((s, None)),
                other => {
                    let text = text_of(&other).ok_or_else(|| bad("system", "must be text"))?;
                    system.push((text, None));
                }
            },
            "max_tokens" | "max_completion_tokens" => {
                if !value.is_null() {
                    out.insert("max_tokens".into(), value);
                }
            }
            "temperature" => match value.as_f64() {
                Some(t) if t > 1.0 => {
                    unsupported(
                        "temperature",
                        &format!("{t} is above Anthropic's maximum of 1"),
                    )?;
                    out.insert(key, json!(1.0));
                }
                _ => {
                    out.insert(key, value);
                }
            },
            "stop" => match value {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(a) => {
                    out.insert("stop_sequences".into(), Value::Array(a));
                }
                _ => return Err(bad("stop", "must be a string or an array of strings")),
            },
            "user" => {
                if let Some(u) = value.as_str() {
                    out.insert("metadata".into(), json!({"user_id": u}));
                }
            }
            "metadata" => {
                // Anthropic's own `metadata` (only `user_id`) passes; OpenAI's stored-completion
                // tags have no counterpart.
                let only_user = value
                    .as_object()
                    .is_some_and(|m| m.keys().all(|k| k == "user_id"));
                if only_user {
                    out.insert(key, value);
                } else if !value.is_null() {
                    unsupported("metadata", &format!("OpenAI's metadata {TO_ANTHROPIC}"))?;
                }
            }
            "stream" => {
                stream = value.as_bool() == Some(true);
                out.insert(key, value);
            }
            "stream_options" => {
                include_usage = value
                    .get("include_usage")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            }
            "tools" => {
                let Value::Array(tools) = value else {
                    return Err(bad("tools", "must be an array"));
                };
                let mut converted = Vec::with_capacity(tools.len());
                for (i, t) in tools.iter().enumerate() {
                    if t.get("type").and_then(Value::as_str) != Some("function") {
                        return Err(bad(
                            format!("tools[{i}].type"),
                            format!("only function tools {TO_ANTHROPIC}"),
                        ));
                    }
                    let f = t.get("function").unwrap_or(&Value::Null);
                    let name = f
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("tools[{i}].function.name"), "required"))?;
                    let mut tool = Map::new();
                    tool.insert("name".into(), json!(name));
                    if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
                        tool.insert("description".into(), d.clone());
                    }
                    let schema = f
                        .get("parameters")
                        .filter(|p| !p.is_null())
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                    tool.insert("input_schema".into(), schema);
                    if let Some(c) = t.get("cache_control").filter(|c| !c.is_null()) {
                        tool.insert("cache_control".into(), c.clone());
                    }
                    converted.push(Value::Object(tool));
                }
                tools_given = !converted.is_empty();
                if tools_given {
                    out.insert("tools".into(), Value::Array(converted));
                }
            }
            "tool_choice" => tool_choice = Some(value),
            "parallel_tool_calls" => parallel = value.as_bool(),
            "n" => {
                if !(value.is_null() || value.as_u64() == Some(1)) {
                    unsupported("n", &format!("more than one choice {TO_ANTHROPIC}"))?;
                }
            }
            "logprobs" | "store" => {
                if !is_false_or_null(&value) {
                    unsupported(&key, TO_ANTHROPIC)?;
                }
            }
            "presence_penalty" | "frequency_penalty" => {
                if !is_zero_or_null(&value) {
                    unsupported(&key, TO_ANTHROPIC)?;
                }
            }
            "reasoning_effort" => {
                // Extended thinking with a budget per level (as LiteLLM maps them); "minimal"
                // and "none" think not at all.
                effort = match value.as_str() {
                    _ if value.is_null() => None,
                    Some("none" | "minimal") => None,
                    Some("low") => Some(1024),
                    Some("medium") => Some(2048),
                    Some("high") => Some(4096),
                    _ => {
                        return Err(bad(
                            "reasoning_effort",
                            "must be none, minimal, low, medium or high",
                        ));
                    }
                };
            }
            "response_format" => match value.get("type").and_then(Value::as_str) {
                _ if value.is_null() => {}
                Some("text") => {}
                // Structured outputs: Anthropic's `output_config.format`, the same JSON Schema
                // (the answer is the JSON as text, as OpenAI's is).
                Some("json_schema") => {
                    let schema = value
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .filter(|s| s.is_object())
                        .ok_or_else(|| {
                            bad(
                                "response_format.json_schema.schema",
                                "must be a JSON Schema object",
                            )
                        })?;
                    out.insert(
                        "output_config".into(),
                        json!({"format": {"type": "json_schema", "schema": schema}}),
                    );
                }
                // `json_object` (any JSON, no schema) has no counterpart.
                _ => unsupported("response_format", TO_ANTHROPIC)?,
            },
            "modalities" => {
                let text_only = value.is_null() || value == json!(["text"]);
                if !text_only {
                    unsupported("modalities", TO_ANTHROPIC)?;
                }
            }
            _ => {
                if !value.is_null() {
                    unsupported(&key, TO_ANTHROPIC)?;
                }
            }
        }
    }
    if system.iter().any(|(_, cache)| cache.is_some()) {
        // A prompt-caching breakpoint in the system prompt: its blocks, each as written.
        let blocks = system
            .into_iter()
            .map(|(text, cache)| match cache {
                Some(c) => json!({"type": "text", "text": text, "cache_control": c}),
                None => json!({"type": "text", "text": text}),
            })
            .collect();
        out.insert("system".into(), Value::Array(blocks));
    } else if !system.is_empty() {
        let texts: Vec<String> = system.into_iter().map(|(text, _)| text).collect();
        out.insert("system".into(), json!(texts.join("\n\n")));
    }
    out.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    out.entry("max_tokens")
        .or_insert_with(|| json!(opts.default_max_tokens));
    if let Some(level) = effort.filter(|_| !out.contains_key("thinking")) {
        // `max_tokens` bounds thinking and answer together, as OpenAI's
        // `max_completion_tokens` bounds reasoning and answer: the budget fits below it.
        let max = out.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
        let budget = level.min(max.saturating_sub(1));
        if budget < 1024 {
            return Err(bad(
                "reasoning_effort",
                format!(
                    "needs max_tokens above 1024 {TO_ANTHROPIC} (thinking takes at least 1024)"
                ),
            ));
        }
        if out
            .get("temperature")
            .and_then(Value::as_f64)
            .is_some_and(|t| t != 1.0)
        {
            return Err(bad(
                "temperature",
                format!("must be 1 or absent with reasoning_effort {TO_ANTHROPIC}"),
            ));
        }
        out.insert(
            "thinking".into(),
            json!({"type": "enabled", "budget_tokens": budget}),
        );
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => tools_given.then(|| json!({"type": "auto"})),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "none" => Some(json!({"type": "none"})),
            "required" => Some(json!({"type": "any"})),
            other => return Err(bad("tool_choice", format!("unknown value {other:?}"))),
        },
        Some(obj) => {
            let name = obj
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice.function.name", "required"))?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if let Some(mut choice) = choice {
        if parallel == Some(false) && choice.get("type") != Some(&json!("none")) {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        out.insert("tool_choice".into(), choice);
    }
    Ok(Translated {
        body: serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
        stream,
        include_usage,
    })
}

/// Appends blocks to the conversation, merging a turn of the same role into the last one.
/// Tool results go before any other block of their user turn, as Anthropic requires.
fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, blocks: Vec<Value>) {
    let is_result = |b: &Value| b.get("type").and_then(Value::as_str) == Some("tool_result");
    match turns.last_mut() {
        Some((last, content)) if *last == role => {
            for b in blocks {
                if is_result(&b) {
                    let at = content.iter().take_while(|c| is_result(c)).count();
                    content.insert(at, b);
                } else {
                    content.push(b);
                }
            }
        }
        _ => turns.push((role, blocks)),
    }
}

fn user_blocks(content: Option<&Value>, path: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                let at = format!("{path}.content[{j}]");
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = p.get("text").and_then(Value::as_str).unwrap_or("");
                        blocks.push(json!({"type": "text", "text": text}));
                    }
                    Some("image_url") => {
                        let url = p
                            .get("image_url")
                            .and_then(|i| i.get("url").or(Some(i)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| bad(format!("{at}.image_url.url"), "required"))?;
                        blocks.push(image_block(url, &at)?);
                    }
                    // A PDF (or other document) sent inline: Anthropic's `document` block.
                    Some("file") => blocks.push(document_block(p.get("file"), &at)?),
                    Some(other) => {
                        return Err(bad(format!("{at}.type"), format!("{other} {TO_ANTHROPIC}")));
                    }
                    None => return Err(bad(format!("{at}.type"), "required")),
                }
                cache_part(p, &mut blocks);
            }
            Ok(blocks)
        }
        Some(_) => Err(bad(
            format!("{path}.content"),
            "must be a string or an array",
        )),
    }
}

/// A prompt-caching breakpoint (`cache_control`, as Anthropic names it and as LiteLLM and
/// Portkey accept it on OpenAI-shaped requests) on a system message or on one of its parts
/// (which become one block).
fn breakpoint_of(m: &Value, content: &Value) -> Option<Value> {
    m.get("cache_control")
        .or_else(|| match content {
            Value::Array(parts) => parts.iter().rev().find_map(|p| p.get("cache_control")),
            _ => None,
        })
        .filter(|c| !c.is_null())
        .cloned()
}

/// A message's own `cache_control` goes on its last block (where the cached prefix ends).
fn cache_last(m: &Value, blocks: &mut [Value]) {
    if let (Some(c), Some(Value::Object(last))) = (
        m.get("cache_control").filter(|c| !c.is_null()),
        blocks.last_mut(),
    ) {
        last.insert("cache_control".into(), c.clone());
    }
}

/// A content part's `cache_control` goes on the block made from it (the last one pushed).
fn cache_part(part: &Value, blocks: &mut [Value]) {
    if let (Some(c), Some(Value::Object(last))) = (
        part.get("cache_control").filter(|c| !c.is_null()),
        blocks.last_mut(),
    ) {
        last.insert("cache_control".into(), c.clone());
    }
}

/// An OpenAI `file` part sent inline (`file_data`, a base64 data URL) as an Anthropic
/// `document` block, its `filename` as the title. A `file_id` names a file uploaded to the
/// OpenAI side, which an Anthropic backend does not have: refused.
fn document_block(file: Option<&Value>, at: &str) -> Result<Value, Untranslatable> {
    let file = file.unwrap_or(&Value::Null);
    let Some(data) = file.get("file_data").and_then(Value::as_str) else {
        let why = if file.get("file_id").is_some() {
            format!("a file id {TO_ANTHROPIC} (send the file inline, as file_data)")
        } else {
            "required".to_string()
        };
        return Err(bad(format!("{at}.file.file_data"), why));
    };
    let (media, data) = data
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .ok_or_else(|| bad(format!("{at}.file.file_data"), "must be a base64 data URL"))?;
    let mut block = json!({"type": "document",
                           "source": {"type": "base64", "media_type": media, "data": data}});
    if let Some(name) = file.get("filename").and_then(Value::as_str) {
        block["title"] = json!(name);
    }
    Ok(block)
}

/// The text of a content part of an earlier answer (`text`, or a `refusal`).
fn answer_part_text<'a>(p: &'a Value, at: &str) -> Result<&'a str, Untranslatable> {
    p.get("text")
        .or_else(|| p.get("refusal"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad(at, "must be text"))
}

fn image_block(url: &str, at: &str) -> Result<Value, Untranslatable> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media, data) = rest
            .split_once(";base64,")
            .ok_or_else(|| bad(format!("{at}.image_url.url"), "a data URL must be base64"))?;
        return Ok(json!({"type": "image",
                         "source": {"type": "base64", "media_type": media, "data": data}}));
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn assistant_blocks(m: &Value, path: &str) -> Result<Vec<Value>, Untranslatable> {
    let mut blocks = Vec::new();
    // The turn's thinking as Anthropic gave it (signed), first: a tool-using turn must carry
    // it back when thinking is on.
    for (k, b) in m
        .get("thinking_blocks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        match b.get("type").and_then(Value::as_str) {
            Some("thinking" | "redacted_thinking") => blocks.push(b.clone()),
            _ => {
                return Err(bad(
                    format!("{path}.thinking_blocks[{k}].type"),
                    "must be thinking or redacted_thinking",
                ));
            }
        }
    }
    match m.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                blocks.push(json!({"type": "text", "text": s}));
            }
        }
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                let text = answer_part_text(p, &format!("{path}.content[{j}]"))?;
                blocks.push(json!({"type": "text", "text": text}));
                cache_part(p, &mut blocks);
            }
        }
        Some(_) => {
            return Err(bad(
                format!("{path}.content"),
                "must be a string or an array",
            ));
        }
    }
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        for (k, c) in calls.iter().enumerate() {
            let at = format!("{path}.tool_calls[{k}]");
            let id = c
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{at}.id"), "required"))?;
            let f = c.get("function").unwrap_or(&Value::Null);
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{at}.function.name"), "required"))?;
            let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
            let input: Value = if args.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(args)
                    .map_err(|_| bad(format!("{at}.function.arguments"), "not a JSON object"))?
            };
            if !input.is_object() {
                return Err(bad(format!("{at}.function.arguments"), "not a JSON object"));
            }
            blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        }
    }
    Ok(blocks)
}

/// Anthropic messages request → OpenAI chat request.
pub(crate) fn messages_to_chat(body: &[u8], opts: &Options) -> Result<Translated, Untranslatable> {
    let req = parse_object(body)?;
    let mut out = Map::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut stream = false;
    let mut tool_choice: Option<Value> = None;
    let unsupported = |key: &str, why: &str| -> Result<(), Untranslatable> {
        if opts.drop_unsupported {
            Ok(())
        } else {
            Err(bad(key, why))
        }
    };
    let mut system: Option<Value> = None;
    for (key, value) in req {
        match key.as_str() {
            "model"
            | "max_tokens"
            | "temperature"
            | "top_p"
            | "logprobs"
            | "top_logprobs"
            | "seed"
            | "presence_penalty"
            | "frequency_penalty"
            | "n"
            | "user"
            | "response_format"
            | "logit_bias"
            | "reasoning_effort"
            | "parallel_tool_calls"
            | "max_completion_tokens" => {
                out.insert(key, value);
            }
            "system" => system = Some(value),
            "messages" => {
                let Value::Array(turns) = value else {
                    return Err(bad("messages", "must be an array"));
                };
                for (i, m) in turns.iter().enumerate() {
                    let path = format!("messages[{i}]");
                    match m.get("role").and_then(Value::as_str) {
                        Some("user") => openai_user(m.get("content"), &path, &mut messages)?,
                        Some("assistant") => {
                            messages.push(openai_assistant(m.get("content"), &path)?)
                        }
                        other => {
                            return Err(bad(
                                format!("{path}.role"),
                                format!("{:?} is not a messages role", other.unwrap_or("")),
                            ));
                        }
                    }
                }
            }
            "stop_sequences" => {
                if !value.is_null() {
                    out.insert("stop".into(), value);
                }
            }
            "metadata" => {
                if let Some(u) = value.get("user_id").and_then(Value::as_str) {
                    out.insert("user".into(), json!(u));
                }
            }
            "stream" => {
                stream = value.as_bool() == Some(true);
                out.insert(key, value);
            }
            "tools" => {
                let Value::Array(tools) = value else {
                    return Err(bad("tools", "must be an array"));
                };
                let mut converted = Vec::with_capacity(tools.len());
                for (i, t) in tools.iter().enumerate() {
                    let name = t
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("tools[{i}].name"), "required"))?;
                    if t.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|ty| ty != "custom")
                    {
                        return Err(bad(
                            format!("tools[{i}].type"),
                            format!("server tools {TO_OPENAI}"),
                        ));
                    }
                    let mut f = Map::new();
                    f.insert("name".into(), json!(name));
                    if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
                        f.insert("description".into(), d.clone());
                    }
                    if let Some(s) = t.get("input_schema") {
                        f.insert("parameters".into(), s.clone());
                    }
                    converted.push(json!({"type": "function", "function": f}));
                }
                if !converted.is_empty() {
                    out.insert("tools".into(), Value::Array(converted));
                }
            }
            "tool_choice" => tool_choice = Some(value),
            "top_k" => {
                if !value.is_null() {
                    unsupported(&key, TO_OPENAI)?;
                }
            }
            // Extended thinking: OpenAI's `reasoning_effort`, the level whose budget this one
            // reaches (1024 / 2048 / 4096 the other way).
            "thinking" => match value.get("type").and_then(Value::as_str) {
                _ if value.is_null() => {}
                Some("disabled") => {}
                Some("enabled") => {
                    let budget = value
                        .get("budget_tokens")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| bad("thinking.budget_tokens", "required"))?;
                    let level = match budget {
                        0..2048 => "low",
                        2048..4096 => "medium",
                        _ => "high",
                    };
                    out.insert("reasoning_effort".into(), json!(level));
                }
                _ => unsupported("thinking", TO_OPENAI)?,
            },
            // Structured outputs: OpenAI's `response_format` with the same JSON Schema, strict
            // (Anthropic's output follows the schema always).
            "output_config" => {
                let Value::Object(config) = value else {
                    if !value.is_null() {
                        return Err(bad("output_config", "must be an object"));
                    }
                    continue;
                };
                for (k, v) in config {
                    match (k.as_str(), v.get("type").and_then(Value::as_str)) {
                        (_, _) if v.is_null() => {}
                        ("format", Some("json_schema")) => {
                            let schema =
                                v.get("schema").filter(|s| s.is_object()).ok_or_else(|| {
                                    bad(
                                        "output_config.format.schema",
                                        "must be a JSON Schema object",
                                    )
                                })?;
                            out.insert(
                                "response_format".into(),
                                json!({"type": "json_schema", "json_schema": {
                                    "name": "output", "schema": schema, "strict": true}}),
                            );
                        }
                        _ => unsupported(&format!("output_config.{k}"), TO_OPENAI)?,
                    }
                }
            }
            "service_tier" => {}
            _ => {
                if !value.is_null() {
                    unsupported(&key, TO_OPENAI)?;
                }
            }
        }
    }
    if let Some(sys) = system {
        let text = match &sys {
            Value::String(s) => s.clone(),
            Value::Array(_) => text_of(&sys).ok_or_else(|| bad("system", "must be text"))?,
            _ => return Err(bad("system", "must be text")),
        };
        messages.insert(0, json!({"role": "system", "content": text}));
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(choice) = tool_choice {
        let kind = choice.get("type").and_then(Value::as_str).unwrap_or("");
        let converted = match kind {
            "auto" => json!("auto"),
            "any" => json!("required"),
            "none" => json!("none"),
            "tool" => {
                let name = choice
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("tool_choice.name", "required"))?;
                json!({"type": "function", "function": {"name": name}})
            }
            other => return Err(bad("tool_choice.type", format!("unknown value {other:?}"))),
        };
        if choice.get("disable_parallel_tool_use") == Some(&json!(true)) && kind != "none" {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
        out.insert("tool_choice".into(), converted);
    }
    if stream {
        // Anthropic's stream always ends with the usage.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Translated {
        body: serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
        stream,
        include_usage: false,
    })
}

fn openai_user(
    content: Option<&Value>,
    path: &str,
    messages: &mut Vec<Value>,
) -> Result<(), Untranslatable> {
    let blocks = match content {
        Some(Value::String(s)) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(
                format!("{path}.content"),
                "must be a string or an array",
            ));
        }
    };
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{path}.content[{j}]");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                parts.push(
                    json!({"type": "text", "text": b.get("text").cloned().unwrap_or(json!(""))}),
                );
            }
            Some("image") => {
                let src = b.get("source").unwrap_or(&Value::Null);
                let url = match src.get("type").and_then(Value::as_str) {
                    Some("base64") => format!(
                        "data:{};base64,{}",
                        src.get("media_type")
                            .and_then(Value::as_str)
                            .unwrap_or("image/png"),
                        src.get("data").and_then(Value::as_str).unwrap_or("")
                    ),
                    Some("url") => src
                        .get("url")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    _ => return Err(bad(format!("{at}.source.type"), TO_OPENAI)),
                };
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            // A document: a base64 one (a PDF) as OpenAI's inline `file` part, a plain-text one
            // as text.
            Some("document") => {
                let src = b.get("source").unwrap_or(&Value::Null);
                let str_at = |k: &str| src.get(k).and_then(Value::as_str).unwrap_or("");
                match src.get("type").and_then(Value::as_str) {
                    Some("base64") => {
                        let name = b
                            .get("title")
                            .and_then(Value::as_str)
                            .unwrap_or("document.pdf");
                        let data =
                            format!("data:{};base64,{}", str_at("media_type"), str_at("data"));
                        parts.push(json!({"type": "file",
                                          "file": {"file_data": data, "filename": name}}));
                    }
                    Some("text") => parts.push(json!({"type": "text", "text": str_at("data")})),
                    _ => return Err(bad(format!("{at}.source.type"), TO_OPENAI)),
                }
            }
            Some("tool_result") => {
                let id = b
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{at}.tool_use_id"), "required"))?;
                let text = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(c) => text_of(c).ok_or_else(|| {
                        bad(
                            format!("{at}.content"),
                            format!("non-text tool results {TO_OPENAI}"),
                        )
                    })?,
                };
                if b.get("is_error") == Some(&json!(true)) {
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": format!("Error: {text}")}));
                } else {
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
                }
            }
            Some(other) => return Err(bad(format!("{at}.type"), format!("{other} {TO_OPENAI}"))),
            None => return Err(bad(format!("{at}.type"), "required")),
        }
    }
    if !parts.is_empty() {
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn openai_assistant(content: Option<&Value>, path: &str) -> Result<Value, Untranslatable> {
    let mut msg = Map::new();
    msg.insert("role".into(), json!("assistant"));
    let blocks = match content {
        Some(Value::String(s)) => {
            msg.insert("content".into(), json!(s));
            return Ok(Value::Object(msg));
        }
        Some(Value::Array(b)) => b,
        _ => {
            return Err(bad(
                format!("{path}.content"),
                "must be a string or an array",
            ));
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{path}.content[{j}]");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let input = b.get("input").cloned().unwrap_or(json!({}));
                calls.push(json!({
                    "id": b.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                                 "arguments": input.to_string()}
                }));
            }
            // The model's own earlier reasoning: an OpenAI backend takes none back (its
            // reasoning stays on its side), so it is left out of the history it gets.
            Some("thinking") | Some("redacted_thinking") => {}
            Some(other) => return Err(bad(format!("{at}.type"), format!("{other} {TO_OPENAI}"))),
            None => return Err(bad(format!("{at}.type"), "required")),
        }
    }
    msg.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            json!(text)
        },
    );
    if !calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(Value::Object(msg))
}

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`.
fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

fn u64_at(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Anthropic usage → (prompt tokens with cache reads and writes, completion tokens, cache reads).
/// OpenAI's `usage` in Anthropic's terms: the prompt's cached tokens are cache reads, the rest
/// input.
fn openai_usage_to_anthropic(u: &Value) -> Value {
    let cached = u
        .pointer("/prompt_tokens_details/cached_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let prompt = u64_at(u, "prompt_tokens");
    json!({"input_tokens": prompt.saturating_sub(cached),
           "cache_read_input_tokens": cached,
           "output_tokens": u64_at(u, "completion_tokens")})
}

fn anthropic_usage(u: &Value) -> (u64, u64, u64) {
    let cached = u64_at(u, "cache_read_input_tokens");
    let prompt = u64_at(u, "input_tokens") + u64_at(u, "cache_creation_input_tokens") + cached;
    (prompt, u64_at(u, "output_tokens"), cached)
}

fn openai_usage(prompt: u64, completion: u64, cached: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// An Anthropic `message` answer → an OpenAI `chat.completion`.
pub(crate) fn message_to_completion(body: &[u8], created: u64) -> Result<Vec<u8>, String> {
    let msg: Value = serde_json::from_slice(body).map_err(|e| format!("answer not JSON ({e})"))?;
    let blocks = msg
        .get("content")
        .and_then(Value::as_array)
        .ok_or("answer has no content array")?;
    let mut text: Option<String> = None;
    let mut thought: Option<String> = None;
    // The thinking blocks as they came (with their signatures), to be sent back with the turn.
    let mut thinking_blocks = Vec::new();
    let mut calls = Vec::new();
    for b in blocks {
        if matches!(
            b.get("type").and_then(Value::as_str),
            Some("thinking" | "redacted_thinking")
        ) {
            thinking_blocks.push(b.clone());
        }
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text
                .get_or_insert_with(String::new)
                .push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            // Extended thinking, as OpenAI-compatible servers return reasoning
            // (`reasoning_content`: DeepSeek, vLLM, LiteLLM); redacted thinking has no text.
            Some("thinking") => thought
                .get_or_insert_with(String::new)
                .push_str(b.get("thinking").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                             "arguments": b.get("input").cloned().unwrap_or(json!({})).to_string()}
            })),
            _ => {}
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        match text {
            Some(t) => json!(t),
            None if calls.is_empty() => json!(""),
            None => Value::Null,
        },
    );
    message.insert("refusal".into(), Value::Null);
    if let Some(thought) = thought {
        message.insert("reasoning_content".into(), json!(thought));
    }
    if !thinking_blocks.is_empty() {
        message.insert("thinking_blocks".into(), Value::Array(thinking_blocks));
    }
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let stop = msg
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    let (prompt, completion, cached) = anthropic_usage(msg.get("usage").unwrap_or(&Value::Null));
    let out = json!({
        "id": msg.get("id").cloned().unwrap_or(json!("msg")),
        "object": "chat.completion",
        "created": created,
        "model": msg.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": finish_reason(stop)}],
        "usage": openai_usage(prompt, completion, cached),
    });
    Ok(out.to_string().into_bytes())
}

/// An OpenAI `chat.completion` answer → an Anthropic `message`.
pub(crate) fn completion_to_message(body: &[u8]) -> Result<Vec<u8>, String> {
    let ans: Value = serde_json::from_slice(body).map_err(|e| format!("answer not JSON ({e})"))?;
    let choice = ans
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or("answer has no choices")?;
    let message = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    // Reasoning text, as OpenAI-compatible servers return it (DeepSeek, vLLM): a thinking
    // block, with no signature (there is none to give).
    if let Some(t) = message.get("reasoning_content").and_then(Value::as_str)
        && !t.is_empty()
    {
        content.push(json!({"type": "thinking", "thinking": t, "signature": ""}));
    }
    if let Some(t) = message.get("content").and_then(Value::as_str)
        && !t.is_empty()
    {
        content.push(json!({"type": "text", "text": t}));
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        for c in calls {
            let f = c.get("function").unwrap_or(&Value::Null);
            let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
            let input: Value = serde_json::from_str(args)
                .map_err(|_| "a tool call's arguments are not JSON".to_string())?;
            content.push(json!({"type": "tool_use", "id": c.get("id").cloned().unwrap_or(Value::Null),
                                "name": f.get("name").cloned().unwrap_or(Value::Null), "input": input}));
        }
    }
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    let usage = ans.get("usage").unwrap_or(&Value::Null);
    let out = json!({
        "id": ans.get("id").cloned().unwrap_or(json!("msg")),
        "type": "message",
        "role": "assistant",
        "model": ans.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": openai_usage_to_anthropic(usage),
    });
    Ok(out.to_string().into_bytes())
}

/// The message of an error body of either shape (or its text, cut to 1 KiB).
fn error_message(body: &[u8]) -> (Option<String>, String) {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(e) = v.get("error")
    {
        let kind = e.get("type").and_then(Value::as_str).map(str::to_string);
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return (kind, message);
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned();
    (None, text)
}

/// True for a JSON error object of either provider (a `200` may carry one).
pub(crate) fn is_error_body(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(Value::is_object))
}

/// An Anthropic error status → the status an OpenAI client expects.
pub(crate) fn status_for_openai(status: u16) -> u16 {
    if status == 529 { 503 } else { status }
}

/// An Anthropic error body → OpenAI's error shape.
pub(crate) fn error_to_openai(body: &[u8]) -> Vec<u8> {
    let (kind, message) = error_message(body);
    let kind = kind.unwrap_or_else(|| "api_error".into());
    let (openai_type, code) = match kind.as_str() {
        "invalid_request_error" | "request_too_large" | "not_found_error" => {
            ("invalid_request_error", kind.as_str())
        }
        "authentication_error" => ("invalid_request_error", "invalid_api_key"),
        "permission_error" => ("invalid_request_error", "permission_denied"),
        "rate_limit_error" => ("requests", "rate_limit_exceeded"),
        "overloaded_error" => ("server_error", "overloaded"),
        _ => ("server_error", kind.as_str()),
    };
    json!({"error": {"message": message, "type": openai_type, "param": null, "code": code}})
        .to_string()
        .into_bytes()
}

/// An OpenAI error body and status → Anthropic's error shape.
pub fn error_to_anthropic(status: u16, body: &[u8]) -> Vec<u8> {
    let (_, message) = error_message(body);
    let kind = match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
        .to_string()
        .into_bytes()
}

/// The longest an SSE line may grow before the stream is refused (a backend sending no line
/// breaks would otherwise grow the buffer without end).
const MAX_LINE: usize = 4 << 20;

/// Splits an SSE byte stream into events' `data` payloads, across any chunking.
#[derive(Debug, Default)]
struct SseReader {
    buf: Vec<u8>,
    data: Option<String>,
}

impl SseReader {
    /// Feeds bytes; calls `on` with each complete event's data.
    fn feed(
        &mut self,
        bytes: &[u8],
        on: &mut dyn FnMut(&str) -> Result<(), String>,
    ) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + nl;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    on(&d)?;
                }
            } else if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                let text = String::from_utf8_lossy(rest);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&text);
                    }
                    None => self.data = Some(text.into_owned()),
                }
            }
            start = end + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err("an event stream line longer than 4 MiB".into());
        }
        Ok(())
    }

    /// At the end of the stream: an event not closed by a blank line still counts.
    fn finish(&mut self, on: &mut dyn FnMut(&str) -> Result<(), String>) -> Result<(), String> {
        if !self.buf.is_empty() {
            self.feed(b"\n", on)?;
        }
        if let Some(d) = self.data.take() {
            on(&d)?;
        }
        Ok(())
    }
}

/// Rewrites one provider's stream into the other's, chunk by chunk.
pub(crate) trait StreamTranslate: Send + Sync + fmt::Debug {
    /// Bytes of the backend's stream in; the caller's bytes out (possibly none yet).
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String>;
    /// The backend's stream ended cleanly.
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String>;
}

/// A stream rewritten event by event: its SSE reader, and what each event's data becomes.
trait Events: Send + Sync + fmt::Debug {
    fn reader(&mut self) -> &mut SseReader;
    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String>;
}

impl<T: Events> StreamTranslate for T {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // The reader is taken out while it calls back into `self`.
        let mut sse = std::mem::take(self.reader());
        let r = sse.feed(bytes, &mut |d| self.event(d, out));
        *self.reader() = sse;
        r
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let mut sse = std::mem::take(self.reader());
        let r = sse.finish(&mut |d| self.event(d, out));
        *self.reader() = sse;
        r
    }
}

/// Anthropic's typed events → OpenAI `chat.completion.chunk`s and `data: [DONE]`.
#[derive(Debug)]
pub(crate) struct ToChatChunks {
    sse: SseReader,
    created: u64,
    include_usage: bool,
    id: String,
    model: String,
    usage: (u64, u64, u64),
    /// Anthropic block index → OpenAI tool call index, for tool-use blocks.
    tools: Vec<(u64, u64)>,
    finish: Option<&'static str>,
    /// The thinking block being streamed: its index and the block so far (text, signature).
    thinking: Option<(u64, Value)>,
}

impl ToChatChunks {
    pub(crate) fn new(created: u64, include_usage: bool) -> Self {
        ToChatChunks {
            sse: SseReader::default(),
            created,
            include_usage,
            id: String::new(),
            model: String::new(),
            usage: (0, 0, 0),
            tools: Vec::new(),
            finish: None,
            thinking: None,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        let chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        write_data(out, &chunk);
    }

    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        let Ok(ev) = serde_json::from_str::<Value>(data) else {
            return Err("an event that is not JSON".into());
        };
        match ev.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let m = ev.get("message").unwrap_or(&Value::Null);
                self.id = m
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.model = m
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let (p, c, k) = anthropic_usage(m.get("usage").unwrap_or(&Value::Null));
                self.usage = (p, c, k);
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
            "content_block_start" => {
                let block = ev.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let index = self.tools.len() as u64;
                        self.tools.push((u64_at(&ev, "index"), index));
                        self.chunk(
                            json!({"tool_calls": [{"index": index, "id": block.get("id"),
                                   "type": "function",
                                   "function": {"name": block.get("name"), "arguments": ""}}]}),
                            None,
                            out,
                        );
                    }
                    Some("text") => {
                        if let Some(t) = block.get("text").and_then(Value::as_str)
                            && !t.is_empty()
                        {
                            self.chunk(json!({"content": t}), None, out);
                        }
                    }
                    Some("thinking") | Some("redacted_thinking") => {
                        self.thinking = Some((u64_at(&ev, "index"), block.clone()));
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                // A thinking block whole, signature included: the caller sends it back with
                // the turn (as LiteLLM's `thinking_blocks`), as a tool-using turn must.
                if let Some((index, block)) = self.thinking.take() {
                    if index == u64_at(&ev, "index") {
                        self.chunk(json!({"thinking_blocks": [block]}), None, out);
                    } else {
                        self.thinking = Some((index, block));
                    }
                }
            }
            "content_block_delta" => {
                let delta = ev.get("delta").unwrap_or(&Value::Null);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        self.chunk(json!({"content": delta.get("text")}), None, out);
                    }
                    Some("thinking_delta") => {
                        if let Some((_, block)) = &mut self.thinking {
                            append(&mut block["thinking"], delta.get("thinking"));
                        }
                        self.chunk(
                            json!({"reasoning_content": delta.get("thinking")}),
                            None,
                            out,
                        );
                    }
                    Some("signature_delta") => {
                        if let Some((_, block)) = &mut self.thinking {
                            append(&mut block["signature"], delta.get("signature"));
                        }
                    }
                    Some("input_json_delta") => {
                        let block = u64_at(&ev, "index");
                        let index = self
                            .tools
                            .iter()
                            .find(|(b, _)| *b == block)
                            .map_or(0, |(_, i)| *i);
                        self.chunk(
                            json!({"tool_calls": [{"index": index,
                                   "function": {"arguments": delta.get("partial_json")}}]}),
                            None,
                            out,
                        );
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = ev.get("usage") {
                    self.usage.1 = u64_at(u, "output_tokens");
                    if u.get("input_tokens").is_some() {
                        let (p, _, k) = anthropic_usage(u);
                        self.usage.0 = p;
                        self.usage.2 = k;
                    }
                }
                if let Some(r) = ev
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    let finish = finish_reason(r);
                    self.finish = Some(finish);
                    self.chunk(json!({}), Some(finish), out);
                }
            }
            "message_stop" => {
                if self.include_usage {
                    let (p, c, k) = self.usage;
                    let chunk = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": openai_usage(p, c, k)
                    });
                    write_data(out, &chunk);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            "error" => {
                let e = ev.get("error").unwrap_or(&Value::Null);
                let body = error_to_openai(json!({"error": e}).to_string().as_bytes());
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&body);
                out.extend_from_slice(b"\n\n");
            }
            _ => {}
        }
        Ok(())
    }
}

/// Appends a delta's text to a block's text in place (a long thinking comes in thousands of
/// deltas: rebuilding the text each time would cost their square).
fn append(text: &mut Value, more: Option<&Value>) {
    let more = more.and_then(Value::as_str).unwrap_or("");
    match text {
        Value::String(s) => s.push_str(more),
        other => *other = json!(more),
    }
}

fn write_data(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

fn write_event(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .as_bytes(),
    );
    out.push(b'\n');
    write_data(out, v);
}

impl Events for ToChatChunks {
    fn reader(&mut self) -> &mut SseReader {
        &mut self.sse
    }

    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        ToChatChunks::event(self, data, out)
    }
}

/// OpenAI `chat.completion.chunk`s → Anthropic's typed events, ending in `message_stop`.
#[derive(Debug, Default)]
pub(crate) struct ToMessageEvents {
    sse: SseReader,
    started: bool,
    /// The open content block: its index and kind ([`TEXT`], [`TOOL`], [`THINKING`]).
    open: Option<(u64, u8)>,
    next_block: u64,
    stop: Option<&'static str>,
    usage: (u64, u64),
    done: bool,
}

/// The kinds of an open content block of [`ToMessageEvents`].
const TEXT: u8 = 0;
const TOOL: u8 = 1;
const THINKING: u8 = 2;

impl ToMessageEvents {
    pub(crate) fn new() -> Self {
        ToMessageEvents::default()
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            write_event(out, &json!({"type": "content_block_stop", "index": index}));
        }
    }

    fn open_block(&mut self, block: Value, kind: u8, out: &mut Vec<u8>) -> u64 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((index, kind));
        write_event(
            out,
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        if data.trim() == "[DONE]" {
            if !self.started || self.done {
                return Ok(());
            }
            self.close_block(out);
            write_event(
                out,
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
                        "usage": {"input_tokens": self.usage.0, "output_tokens": self.usage.1}}),
            );
            write_event(out, &json!({"type": "message_stop"}));
            self.done = true;
            return Ok(());
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return Err("a chunk that is not JSON".into());
        };
        if chunk.get("error").is_some() {
            let status = 500;
            let body = error_to_anthropic(status, data.as_bytes());
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            write_event(out, &v);
            return Ok(());
        }
        if !self.started {
            self.started = true;
            write_event(
                out,
                &json!({"type": "message_start", "message": {
                    "id": chunk.get("id"), "type": "message", "role": "assistant",
                    "model": chunk.get("model"), "content": [], "stop_reason": null,
                    "stop_sequence": null, "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            );
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = (u64_at(u, "prompt_tokens"), u64_at(u, "completion_tokens"));
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return Ok(());
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(text) = delta.get("reasoning_content").and_then(Value::as_str)
            && !text.is_empty()
        {
            let index = match self.open {
                Some((i, THINKING)) => i,
                _ => self.open_block(
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    THINKING,
                    out,
                ),
            };
            write_event(
                out,
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "thinking_delta", "thinking": text}}),
            );
        }
        if let Some(text) = delta.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            let index = match self.open {
                Some((i, TEXT)) => i,
                _ => self.open_block(json!({"type": "text", "text": ""}), TEXT, out),
            };
            write_event(
                out,
                &json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": text}}),
            );
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for c in calls {
                let f = c.get("function").unwrap_or(&Value::Null);
                let index = match (c.get("id").and_then(Value::as_str), self.open) {
                    (Some(id), _) => self.open_block(
                        json!({"type": "tool_use", "id": id, "name": f.get("name"), "input": {}}),
                        TOOL,
                        out,
                    ),
                    (None, Some((i, TOOL))) => i,
                    (None, _) => return Err("a tool call fragment before its start".into()),
                };
                if let Some(args) = f.get("arguments").and_then(Value::as_str)
                    && !args.is_empty()
                {
                    write_event(
                        out,
                        &json!({"type": "content_block_delta", "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": args}}),
                    );
                }
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop = Some(stop_reason(f));
        }
        Ok(())
    }
}

impl Events for ToMessageEvents {
    fn reader(&mut self) -> &mut SseReader {
        &mut self.sse
    }

    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        ToMessageEvents::event(self, data, out)
    }
}

/// Passes an OpenAI stream on without its usage-only chunk (`"choices": []` with `usage`):
/// the one a gateway asked for on behalf of a caller who did not ([`ask_stream_usage`]).
#[derive(Debug, Default)]
pub struct StripUsage {
    sse: SseReader,
}

impl StripUsage {
    /// Bytes of the stream in; the caller's bytes out (possibly none yet). An error names an
    /// event line too long to hold.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        StreamTranslate::feed(self, bytes, out)
    }

    /// The stream ended: what is left of it.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        StreamTranslate::finish(self, out)
    }

    fn pass(data: &str, out: &mut Vec<u8>) {
        let usage_only = data.starts_with('{')
            && serde_json::from_str::<Value>(data).is_ok_and(|v| {
                v.get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty)
                    && v.get("usage").is_some_and(|u| !u.is_null())
            });
        if usage_only {
            return;
        }
        for line in data.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}

impl Events for StripUsage {
    fn reader(&mut self) -> &mut SseReader {
        &mut self.sse
    }

    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        Self::pass(data, out);
        Ok(())
    }
}

/// Asks for the usage chunk of a streamed OpenAI chat request whose caller did not: the body
/// with `stream_options.include_usage` set, or `None` when it is not a streamed chat request
/// without it.
pub fn ask_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    if req.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let options = req.entry("stream_options").or_insert_with(|| json!({}));
    if !options.is_object() || options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    options["include_usage"] = json!(true);
    serde_json::to_vec(&req).ok()
}

/// Translates a whole body: (body, `created` timestamp, status) → the caller's body.
pub(crate) type Convert = fn(&[u8], u64, u16) -> Result<Vec<u8>, String>;

/// A whole (non-streamed) body, translated once it has all arrived.
#[derive(Debug)]
pub(crate) struct Whole {
    buf: Vec<u8>,
    convert: Convert,
    created: u64,
    status: u16,
}

/// The largest answer body translated whole (64 MiB).
const MAX_WHOLE: usize = 64 << 20;

impl Whole {
    pub(crate) fn new(convert: Convert, created: u64, status: u16) -> Self {
        Whole {
            buf: Vec::new(),
            convert,
            created,
            status,
        }
    }
}

impl StreamTranslate for Whole {
    fn feed(&mut self, bytes: &[u8], _out: &mut Vec<u8>) -> Result<(), String> {
        if self.buf.len() + bytes.len() > MAX_WHOLE {
            return Err("an answer larger than 64 MiB".into());
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let body = (self.convert)(&self.buf, self.created, self.status)?;
        out.extend_from_slice(&body);
        Ok(())
    }
}

mod responses;
pub(crate) use responses::{ToResponseEvents, completion_to_response, responses_to_chat};

/// Two stream translations in a row (an Anthropic stream → chat chunks → Responses events),
/// the bytes between them in one buffer kept for the whole stream.
#[derive(Debug)]
pub(crate) struct Chain {
    first: Box<dyn StreamTranslate>,
    second: Box<dyn StreamTranslate>,
    between: Vec<u8>,
}

impl Chain {
    pub(crate) fn new(first: Box<dyn StreamTranslate>, second: Box<dyn StreamTranslate>) -> Self {
        Chain {
            first,
            second,
            between: Vec::new(),
        }
    }
}

impl StreamTranslate for Chain {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.between.clear();
        self.first.feed(bytes, &mut self.between)?;
        self.second.feed(&self.between, out)
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        self.between.clear();
        self.first.finish(&mut self.between)?;
        self.second.feed(&self.between, out)?;
        self.second.finish(out)
    }
}

#[cfg(test)]
mod tests;
