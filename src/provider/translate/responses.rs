//! The Responses API (`/v1/responses`) for a backend that speaks another API, through chat
//! completions: a Responses request becomes a chat request (then, for an Anthropic backend, a
//! messages request, by the chat translation), and the chat answer a Response (the Anthropic
//! answer first becoming a chat answer). So every mapping of the chat translation applies, and
//! only the Responses shapes are mapped here:
//!
//! | Responses | chat completions |
//! |---|---|
//! | `instructions` | a first `system` message |
//! | `input` text, or items: messages (`input_text`, `output_text`, `input_image`, `input_file` parts), `function_call`, `function_call_output` | `messages`: user / assistant / system turns, assistant `tool_calls`, `tool` results; earlier `reasoning` items left out |
//! | `max_output_tokens`, `temperature`, `top_p`, `user`, `parallel_tool_calls` | the same names (`max_completion_tokens`) |
//! | `tools` (`function`, flat), `tool_choice` | `tools` (`function.{name, description, parameters}`), `tool_choice` |
//! | `text.format` `json_schema` | `response_format` `json_schema` |
//! | `reasoning.effort` | `reasoning_effort` |
//! | `stream` | `stream` with `stream_options.include_usage` |
//! | answer `output`: `reasoning` (summary), `message` (`output_text`), `function_call` items; `usage` | `reasoning_content`, `content`, `tool_calls`; `usage` |
//! | stream `response.created`, `output_item.added`, `content_part.added`, `output_text.delta`, `reasoning_summary_text.delta`, `function_call_arguments.delta`, the `.done` events, `response.completed` | the chunks' deltas |
//!
//! Refused by name: `previous_response_id` and `conversation` (the backend keeps no responses:
//! send the conversation in `input`), `background`, tools other than functions (web search,
//! file search, computer use), a file by id, and any other field with no counterpart. `store`
//! is not honoured (nothing is stored) and not refused, as it is on by default.

use serde_json::{Map, Value, json};

use super::{Events, SseReader, Untranslatable, answer_part_text, bad, parse_object, write_event};

const TO_CHAT: &str =
    "cannot be sent to a backend of another API (it is served through chat completions)";

/// A Responses request as a chat completions request; whether it asks for a stream.
pub(crate) fn responses_to_chat(body: &[u8]) -> Result<(Vec<u8>, bool), Untranslatable> {
    let req = parse_object(body)?;
    let mut out = Map::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut stream = false;
    let mut instructions = None;
    let mut input = None;
    for (key, value) in req {
        match key.as_str() {
            "model" | "temperature" | "top_p" | "user" | "parallel_tool_calls" | "metadata" => {
                if !value.is_null() {
                    out.insert(key, value);
                }
            }
            "max_output_tokens" => {
                if !value.is_null() {
                    out.insert("max_completion_tokens".into(), value);
                }
            }
            "instructions" => instructions = Some(value),
            "input" => input = Some(value),
            "stream" => stream = value.as_bool() == Some(true),
            "tools" => {
                let Value::Array(tools) = value else {
                    return Err(bad("tools", "must be an array"));
                };
                let mut converted = Vec::with_capacity(tools.len());
                for (i, t) in tools.iter().enumerate() {
                    let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
                    if kind != "function" {
                        return Err(bad(format!("tools[{i}].type"), format!("{kind} {TO_CHAT}")));
                    }
                    let mut f = Map::new();
                    for k in ["name", "description", "parameters", "strict"] {
                        if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                            f.insert(k.into(), v.clone());
                        }
                    }
                    converted.push(json!({"type": "function", "function": f}));
                }
                if !converted.is_empty() {
                    out.insert("tools".into(), Value::Array(converted));
                }
            }
            "tool_choice" => {
                let choice = match &value {
                    Value::Object(c)
                        if c.get("type").and_then(Value::as_str) == Some("function") =>
                    {
                        json!({"type": "function", "function": {"name": c.get("name")}})
                    }
                    Value::String(_) | Value::Null => value,
                    _ => return Err(bad("tool_choice", TO_CHAT)),
                };
                if !choice.is_null() {
                    out.insert("tool_choice".into(), choice);
                }
            }
            "text" => match value.pointer("/format/type").and_then(Value::as_str) {
                None | Some("text") => {}
                Some("json_schema") => {
                    let f = &value["format"];
                    let mut schema = Map::new();
                    for k in ["name", "schema", "strict", "description"] {
                        if let Some(v) = f.get(k).filter(|v| !v.is_null()) {
                            schema.insert(k.into(), v.clone());
                        }
                    }
                    out.insert(
                        "response_format".into(),
                        json!({"type": "json_schema", "json_schema": schema}),
                    );
                }
                Some(other) => return Err(bad("text.format.type", format!("{other} {TO_CHAT}"))),
            },
            "reasoning" => {
                if let Some(effort) = value.get("effort").filter(|e| !e.is_null()) {
                    out.insert("reasoning_effort".into(), effort.clone());
                }
            }
            // Nothing is stored (and `store` is on by default): not refused.
            "store" | "truncation" | "service_tier" | "prompt_cache_key" | "safety_identifier" => {}
            "include" => {
                if value.as_array().is_some_and(|a| !a.is_empty()) {
                    return Err(bad("include", TO_CHAT));
                }
            }
            "background" => {
                if value.as_bool() == Some(true) {
                    return Err(bad("background", TO_CHAT));
                }
            }
            "previous_response_id" | "conversation" => {
                if !value.is_null() {
                    return Err(bad(
                        key,
                        "the backend keeps no responses (it is served through chat completions): send the conversation in `input`",
                    ));
                }
            }
            _ => {
                if !value.is_null() {
                    return Err(bad(key, TO_CHAT));
                }
            }
        }
    }
    if let Some(i) = instructions.filter(|i| !i.is_null()) {
        let text = i
            .as_str()
            .ok_or_else(|| bad("instructions", "must be text"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    match input {
        None | Some(Value::Null) => return Err(bad("input", "required")),
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, &format!("input[{i}]"), &mut messages)?;
            }
        }
        Some(_) => return Err(bad("input", "must be text or an array of items")),
    }
    out.insert("messages".into(), Value::Array(messages));
    if stream {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let body = serde_json::to_vec(&Value::Object(out)).map_err(|e| bad("body", e.to_string()))?;
    Ok((body, stream))
}

/// One item of `input` appended to the chat `messages`.
fn input_item(item: &Value, at: &str, messages: &mut Vec<Value>) -> Result<(), Untranslatable> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => {
            let role = item.get("role").and_then(Value::as_str).unwrap_or("");
            if !["user", "assistant", "system", "developer"].contains(&role) {
                return Err(bad(
                    format!("{at}.role"),
                    "must be user, assistant, system or developer",
                ));
            }
            let content = match item.get("content") {
                Some(Value::String(s)) => json!(s),
                Some(Value::Array(parts)) if role == "assistant" => {
                    // An earlier answer: its text.
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        text.push_str(answer_part_text(p, &format!("{at}.content[{j}]"))?);
                    }
                    json!(text)
                }
                Some(Value::Array(parts)) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        out.push(input_part(p, &format!("{at}.content[{j}]"))?);
                    }
                    Value::Array(out)
                }
                _ => return Err(bad(format!("{at}.content"), "must be text or an array")),
            };
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            let call = json!({"id": item.get("call_id"), "type": "function",
                              "function": {"name": item.get("name"),
                                           "arguments": item.get("arguments").cloned().unwrap_or(json!("{}"))}});
            // Calls in a row are one assistant turn (parallel calls).
            match messages.last_mut() {
                Some(Value::Object(m))
                    if m.get("role").and_then(Value::as_str) == Some("assistant") =>
                {
                    match m.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => {
                            m.insert("tool_calls".into(), json!([call]));
                        }
                    }
                }
                _ => messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect(),
                _ => return Err(bad(format!("{at}.output"), "must be text")),
            };
            messages.push(
                json!({"role": "tool", "tool_call_id": item.get("call_id"), "content": output}),
            );
        }
        // The model's own earlier reasoning: not sent back (see the chat translation).
        "reasoning" => {}
        other => return Err(bad(format!("{at}.type"), format!("{other} {TO_CHAT}"))),
    }
    Ok(())
}

/// One content part of an input message as a chat content part.
fn input_part(p: &Value, at: &str) -> Result<Value, Untranslatable> {
    match p.get("type").and_then(Value::as_str) {
        Some("input_text") | Some("output_text") => {
            Ok(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))}))
        }
        Some("input_image") => {
            let url = p.get("image_url").and_then(Value::as_str).ok_or_else(|| {
                bad(
                    format!("{at}.image_url"),
                    "required (a file id cannot be sent)",
                )
            })?;
            Ok(json!({"type": "image_url", "image_url": {"url": url}}))
        }
        Some("input_file") => {
            let data = p.get("file_data").ok_or_else(|| {
                bad(
                    format!("{at}.file_data"),
                    "required (a file id cannot be sent)",
                )
            })?;
            let mut file = json!({"file_data": data});
            if let Some(name) = p.get("filename") {
                file["filename"] = name.clone();
            }
            Ok(json!({"type": "file", "file": file}))
        }
        Some(other) => Err(bad(format!("{at}.type"), format!("{other} {TO_CHAT}"))),
        None => Err(bad(format!("{at}.type"), "required")),
    }
}

/// The Response for a chat answer, made at `created` (Unix seconds).
pub(crate) fn completion_to_response(body: &[u8], created: u64) -> Result<Vec<u8>, String> {
    let ans: Value = serde_json::from_slice(body).map_err(|e| format!("answer not JSON ({e})"))?;
    let choice = ans
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or("answer has no choices")?;
    let message = choice.get("message").unwrap_or(&Value::Null);
    let id = ans.get("id").and_then(Value::as_str).unwrap_or("0");
    let mut output = Vec::new();
    if let Some(r) = message.get("reasoning_content").and_then(Value::as_str)
        && !r.is_empty()
    {
        output.push(json!({"type": "reasoning", "id": format!("rs_{id}"),
                           "summary": [{"type": "summary_text", "text": r}]}));
    }
    if let Some(t) = message.get("content").and_then(Value::as_str)
        && !t.is_empty()
    {
        output.push(message_item(&format!("msg_{id}"), t, "completed"));
    }
    for c in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let call_id = c.get("id").and_then(Value::as_str).unwrap_or("");
        let f = c.get("function").unwrap_or(&Value::Null);
        output.push(
            json!({"type": "function_call", "id": format!("fc_{call_id}"),
                           "call_id": call_id, "name": f.get("name"),
                           "arguments": f.get("arguments").cloned().unwrap_or(json!("{}")),
                           "status": "completed"}),
        );
    }
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let usage = ans.get("usage").unwrap_or(&Value::Null);
    let response = response_object(
        &format!("resp_{id}"),
        created,
        ans.get("model").cloned().unwrap_or(Value::Null),
        output,
        finish,
        Some(usage),
    );
    Ok(response.to_string().into_bytes())
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

/// A Response object: `finish` of `length` is an incomplete one; `usage` a chat usage.
fn response_object(
    id: &str,
    created: u64,
    model: Value,
    output: Vec<Value>,
    finish: Option<&str>,
    usage: Option<&Value>,
) -> Value {
    let incomplete = finish == Some("length");
    let status = match finish {
        None => "in_progress",
        Some("length") => "incomplete",
        Some(_) => "completed",
    };
    let usage = usage.filter(|u| !u.is_null()).map(|u| {
        let n = |p: &str| u.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        json!({"input_tokens": n("/prompt_tokens"),
               "input_tokens_details": {"cached_tokens": n("/prompt_tokens_details/cached_tokens")},
               "output_tokens": n("/completion_tokens"),
               "output_tokens_details": {"reasoning_tokens": n("/completion_tokens_details/reasoning_tokens")},
               "total_tokens": n("/prompt_tokens") + n("/completion_tokens")})
    });
    json!({"id": id, "object": "response", "created_at": created, "status": status,
           "model": model, "output": output, "error": null,
           "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
           "usage": usage})
}

/// The items streamed as text: a reasoning item's summary, a message's output text. Their
/// events have the same sequence (item added, part added, text deltas, text done, part done,
/// item done) under different names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextKind {
    Reasoning,
    Message,
}

impl TextKind {
    fn id_prefix(self) -> &'static str {
        match self {
            TextKind::Reasoning => "rs",
            TextKind::Message => "msg",
        }
    }

    /// The part events' name (`.added`, `.done` follow).
    fn part_event(self) -> &'static str {
        match self {
            TextKind::Reasoning => "response.reasoning_summary_part",
            TextKind::Message => "response.content_part",
        }
    }

    /// The text events' name (`.delta`, `.done` follow).
    fn text_event(self) -> &'static str {
        match self {
            TextKind::Reasoning => "response.reasoning_summary_text",
            TextKind::Message => "response.output_text",
        }
    }

    /// The key of the part's index in its events.
    fn index_key(self) -> &'static str {
        match self {
            TextKind::Reasoning => "summary_index",
            TextKind::Message => "content_index",
        }
    }

    fn part(self, text: &str) -> Value {
        match self {
            TextKind::Reasoning => json!({"type": "summary_text", "text": text}),
            TextKind::Message => json!({"type": "output_text", "text": text, "annotations": []}),
        }
    }

    /// The item as it starts (no text yet), or done with `text`.
    fn item(self, id: &str, text: Option<&str>) -> Value {
        match (self, text) {
            (TextKind::Reasoning, None) => json!({"type": "reasoning", "id": id, "summary": []}),
            (TextKind::Reasoning, Some(t)) => {
                json!({"type": "reasoning", "id": id, "summary": [self.part(t)]})
            }
            (TextKind::Message, None) => json!({"type": "message", "id": id,
                "status": "in_progress", "role": "assistant", "content": []}),
            (TextKind::Message, Some(t)) => message_item(id, t, "completed"),
        }
    }

    /// An event of the part at `output_index`: `{"type": name, "item_id", "output_index",
    /// <index key>: 0}` and `more`.
    fn event(self, name: String, id: &str, output_index: usize, more: Value) -> Value {
        let mut event = json!({"type": name, "item_id": id, "output_index": output_index});
        event[self.index_key()] = json!(0);
        if let (Value::Object(e), Value::Object(m)) = (&mut event, more) {
            e.extend(m);
        }
        event
    }
}

/// The item being streamed.
#[derive(Debug)]
enum Open {
    Text {
        kind: TextKind,
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: Value,
        arguments: String,
    },
}

/// Chat completion chunks (`data: {...}`, `data: [DONE]`) → the Responses API's stream events.
#[derive(Debug, Default)]
pub(crate) struct ToResponseEvents {
    sse: SseReader,
    created: u64,
    id: String,
    model: Value,
    started: bool,
    sequence: u64,
    open: Option<Open>,
    /// The items done, as `response.completed` lists them.
    done_items: Vec<Value>,
    finish: Option<String>,
    usage: Option<Value>,
    ended: bool,
}

impl ToResponseEvents {
    pub(crate) fn new(created: u64) -> Self {
        ToResponseEvents {
            created,
            ..Default::default()
        }
    }

    fn emit(&mut self, mut event: Value, out: &mut Vec<u8>) {
        event["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        write_event(out, &event);
    }

    fn response(&self, finish: Option<&str>) -> Value {
        response_object(
            &self.id,
            self.created,
            self.model.clone(),
            self.done_items.clone(),
            finish,
            self.usage.as_ref(),
        )
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        let index = self.done_items.len();
        match self.open.take() {
            Some(Open::Text { kind, id, text }) => {
                let done = kind.event(
                    format!("{}.done", kind.text_event()),
                    &id,
                    index,
                    json!({"text": text}),
                );
                self.emit(done, out);
                let done = kind.event(
                    format!("{}.done", kind.part_event()),
                    &id,
                    index,
                    json!({"part": kind.part(&text)}),
                );
                self.emit(done, out);
                let item = kind.item(&id, Some(&text));
                self.emit(
                    json!({"type": "response.output_item.done", "output_index": index, "item": item}),
                    out,
                );
                self.done_items.push(item);
            }
            Some(Open::Call {
                id,
                call_id,
                name,
                arguments,
            }) => {
                self.emit(
                    json!({"type": "response.function_call_arguments.done", "item_id": id,
                           "output_index": index, "arguments": arguments}),
                    out,
                );
                let item = json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                                  "arguments": arguments, "status": "completed"});
                self.emit(
                    json!({"type": "response.output_item.done", "output_index": index, "item": item}),
                    out,
                );
                self.done_items.push(item);
            }
            None => {}
        }
    }

    /// `text` of a `kind` item: the item opened first if another one is open.
    fn text_delta(&mut self, kind: TextKind, text: &str, out: &mut Vec<u8>) {
        if !matches!(&self.open, Some(Open::Text { kind: k, .. }) if *k == kind) {
            self.close(out);
            let index = self.done_items.len();
            let id = format!(
                "{}_{}_{index}",
                kind.id_prefix(),
                self.id.trim_start_matches("resp_")
            );
            self.emit(
                json!({"type": "response.output_item.added", "output_index": index,
                       "item": kind.item(&id, None)}),
                out,
            );
            let added = kind.event(
                format!("{}.added", kind.part_event()),
                &id,
                index,
                json!({"part": kind.part("")}),
            );
            self.emit(added, out);
            self.open = Some(Open::Text {
                kind,
                id,
                text: String::new(),
            });
        }
        let index = self.done_items.len();
        if let Some(Open::Text { id, text: all, .. }) = &mut self.open {
            all.push_str(text);
            let event = kind.event(
                format!("{}.delta", kind.text_event()),
                id,
                index,
                json!({"delta": text}),
            );
            self.emit(event, out);
        }
    }

    fn chunk(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        if data.trim() == "[DONE]" {
            if !self.started || self.ended {
                return Ok(());
            }
            self.close(out);
            let finish = self.finish.clone().unwrap_or_else(|| "stop".into());
            let response = self.response(Some(&finish));
            let kind = if finish == "length" {
                "response.incomplete"
            } else {
                "response.completed"
            };
            self.emit(json!({"type": kind, "response": response}), out);
            self.ended = true;
            return Ok(());
        }
        let chunk: Value =
            serde_json::from_str(data).map_err(|_| "a chunk that is not JSON".to_string())?;
        if let Some(e) = chunk.get("error") {
            self.emit(
                json!({"type": "error", "code": e.get("code").or(e.get("type")),
                       "message": e.get("message"), "param": e.get("param")}),
                out,
            );
            return Ok(());
        }
        if !self.started {
            self.started = true;
            self.id = format!(
                "resp_{}",
                chunk.get("id").and_then(Value::as_str).unwrap_or("0")
            );
            self.model = chunk.get("model").cloned().unwrap_or(Value::Null);
            let response = self.response(None);
            self.emit(
                json!({"type": "response.created", "response": response}),
                out,
            );
            let response = self.response(None);
            self.emit(
                json!({"type": "response.in_progress", "response": response}),
                out,
            );
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return Ok(());
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        // Reasoning (Anthropic's thinking, through the chat translation): a reasoning item
        // whose summary is the text; then the answer's text.
        for (key, kind) in [
            ("reasoning_content", TextKind::Reasoning),
            ("content", TextKind::Message),
        ] {
            if let Some(text) = delta.get(key).and_then(Value::as_str)
                && !text.is_empty()
            {
                self.text_delta(kind, text, out);
            }
        }
        for c in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let f = c.get("function").unwrap_or(&Value::Null);
            if let Some(call_id) = c.get("id").and_then(Value::as_str) {
                self.close(out);
                let index = self.done_items.len();
                let id = format!("fc_{call_id}");
                let name = f.get("name").cloned().unwrap_or(Value::Null);
                self.emit(
                    json!({"type": "response.output_item.added", "output_index": index,
                           "item": {"type": "function_call", "id": id, "call_id": call_id,
                                    "name": name, "arguments": "", "status": "in_progress"}}),
                    out,
                );
                self.open = Some(Open::Call {
                    id,
                    call_id: call_id.to_string(),
                    name,
                    arguments: String::new(),
                });
            }
            let index = self.done_items.len();
            match (&mut self.open, f.get("arguments").and_then(Value::as_str)) {
                (Some(Open::Call { id, arguments, .. }), Some(args)) if !args.is_empty() => {
                    arguments.push_str(args);
                    let event = json!({"type": "response.function_call_arguments.delta",
                                       "item_id": id, "output_index": index, "delta": args});
                    self.emit(event, out);
                }
                (Some(Open::Call { .. }), _) => {}
                _ => return Err("a tool call fragment before its start".into()),
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(f.to_string());
        }
        Ok(())
    }
}

impl Events for ToResponseEvents {
    fn reader(&mut self) -> &mut SseReader {
        &mut self.sse
    }

    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        self.chunk(data, out)
    }
}
