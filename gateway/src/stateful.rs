//! Stateful calls stay on their backend.
//!
//! A stored response (`resp_...`), an uploaded file (`file-...`), a batch or a vector store
//! exists only on the backend that created it: a follow-up (`previous_response_id`,
//! `GET /v1/responses/{id}`, a `file_id` in a message) sent to another backend fails there, or
//! worse, finds nothing and answers something else. So the ids the gateway hands back carry the
//! backend: `resp_abc` created by backend `eastus` reaches the caller as `resp_abc~eastus`
//! (a name with other characters than letters, digits, `-` and `_` is written in hex after
//! `~~`). A request naming such an id, in its path or in one of the id fields of its JSON body,
//! is pinned to that backend ([`Pinned`]) and goes on with the backend's own id restored. The
//! state lives in the id, so every replica and a restarted gateway route it the same way, with
//! no shared store. If the backend cannot take the request (cooling down, circuit open,
//! failing), the caller is told so, naming it; the request never goes to another backend.
//!
//! Streamed answers (`POST /v1/responses` with `stream: true`) have the ids in each event's
//! data tagged as they pass ([`TagEvents`]). Not covered: ids in query strings (list cursors
//! such as `after=`), and object ids other than the families below (a stored chat completion's
//! `chatcmpl-...`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use serde_json::Value;

use tower_llm_lb::balance::Pinned;

/// Between a backend's id and the tag naming the backend.
const MARK: char = '~';

/// The prefixes of the ids of objects a backend keeps (OpenAI and Anthropic).
const KEPT: [&str; 9] = [
    "resp_",
    "file-",
    "file_",
    "batch_",
    "vs_",
    "vsfb_",
    "msgbatch_",
    "upload_",
    "conv_",
];

/// The JSON fields of a request or an answer that hold such ids (besides an answer's `id`).
const ID_FIELDS: [&str; 11] = [
    "previous_response_id",
    "response_id",
    "file_id",
    "input_file_id",
    "output_file_id",
    "error_file_id",
    "vector_store_id",
    "batch_id",
    "upload_id",
    "file_ids",
    "vector_store_ids",
];

/// The routes whose answers hold ids of kept objects.
pub(crate) fn keeps_objects(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return false;
    };
    // The common routes (chat, completions, embeddings, messages) at a glance.
    if !matches!(
        rest.as_bytes().first(),
        Some(b'r' | b'f' | b'b' | b'v' | b'u' | b'c' | b'm')
    ) || rest.starts_with("chat/")
        || rest.starts_with("completions")
        || rest == "messages"
    {
        return false;
    }
    let family = [
        "responses",
        "files",
        "batches",
        "vector_stores",
        "uploads",
        "conversations",
    ]
    .iter()
    .any(|f| rest == *f || rest.strip_prefix(f).is_some_and(|r| r.starts_with('/')));
    // A file's content or a batch's results are the caller's data, not an object.
    (family || rest.starts_with("messages/batches"))
        && !path.ends_with("/content")
        && !path.ends_with("/results")
}

/// `id` as handed back for an object `backend` keeps.
pub(crate) fn tag(id: &str, backend: &str) -> String {
    let plain = !backend.is_empty()
        && backend
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("{id}{MARK}{backend}")
    } else {
        let hex: String = backend.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{id}{MARK}{MARK}{hex}")
    }
}

/// The backend's own id and the backend's name, from an id [`tag`] made; `None` for any
/// other text.
pub(crate) fn untag(tagged: &str) -> Option<(&str, String)> {
    let (id, backend) = tagged.split_once(MARK)?;
    if id.is_empty() || backend.is_empty() {
        return None;
    }
    let name = match backend.strip_prefix(MARK) {
        Some(hex) if hex.len() % 2 == 0 && !hex.is_empty() => {
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            String::from_utf8(bytes).ok()?
        }
        Some(_) => return None,
        None if backend.contains(MARK) => return None,
        None => backend.to_string(),
    };
    Some((id, name))
}

/// What a request names: the backend its ids pin it to, with its path and body as that
/// backend knows them.
#[derive(Debug, PartialEq)]
pub(crate) struct Unpinned {
    pub(crate) backend: Pinned,
    /// The path and query with the backend's own ids, if the path named one.
    pub(crate) path_and_query: Option<String>,
    /// The body with the backend's own ids, if the body named one.
    pub(crate) body: Option<Bytes>,
}

/// The backend a request's ids name, if any: ids in its path's segments and in the id fields
/// of its JSON body. An error when they name two backends.
pub(crate) fn unpin(path_and_query: &str, body: &Bytes) -> Result<Option<Unpinned>, String> {
    let mut backend: Option<String> = None;
    let mut name = |found: String| -> Result<(), String> {
        match &backend {
            Some(b) if *b != found => Err(format!(
                "the request names objects of two backends, {b} and {found}: each object is kept by the backend that created it"
            )),
            _ => {
                backend = Some(found);
                Ok(())
            }
        }
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut new_path = None;
    if path.starts_with("/v1/") && memchr::memchr(MARK as u8, path.as_bytes()).is_some() {
        let mut segments = Vec::new();
        for segment in path.split('/') {
            match untag(segment) {
                Some((id, b)) => {
                    name(b)?;
                    segments.push(id);
                }
                None => segments.push(segment),
            }
        }
        let mut p = segments.join("/");
        if let Some(q) = query {
            p.push('?');
            p.push_str(q);
        }
        new_path = Some(p);
    }
    let mut new_body = None;
    if holds_a_tag(body)
        && let Ok(mut json) = serde_json::from_slice::<Value>(body)
    {
        let mut changed = false;
        untag_fields(&mut json, &mut |b| name(b), &mut changed)?;
        if changed {
            new_body = serde_json::to_vec(&json).ok().map(Bytes::from);
        }
    }
    Ok(backend.map(|b| Unpinned {
        backend: Pinned(Arc::from(b)),
        path_and_query: new_path,
        body: new_body,
    }))
}

/// The longest a backend's own id is taken to be, for [`holds_a_tag`].
const ID_LOOK_BACK: usize = 256;

/// Whether `body` may hold a tagged id: a JSON string that starts with a kept object's prefix
/// and has the mark in it. Only then is the body parsed (a prompt that merely contains a `~`
/// is not).
fn holds_a_tag(body: &[u8]) -> bool {
    memchr::memchr_iter(MARK as u8, body).any(|at| {
        // The string this mark is in starts after the last quote before it (an id has none,
        // and is short: the look back is bounded, so a body full of marks costs linear time).
        let from = at.saturating_sub(ID_LOOK_BACK);
        memchr::memrchr(b'"', &body[from..at]).is_some_and(|q| {
            KEPT.iter()
                .any(|p| body[from + q + 1..at].starts_with(p.as_bytes()))
        })
    })
}

/// Restores the backend's own ids in the id fields of `json`, at any depth, telling `name`
/// each backend named.
fn untag_fields(
    json: &mut Value,
    name: &mut impl FnMut(String) -> Result<(), String>,
    changed: &mut bool,
) -> Result<(), String> {
    match json {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if ID_FIELDS.contains(&key.as_str()) {
                    let ids: Vec<&mut Value> = match value {
                        Value::Array(items) => items.iter_mut().collect(),
                        v => vec![v],
                    };
                    for v in ids {
                        if let Some((id, b)) = v.as_str().and_then(untag) {
                            let id = id.to_string();
                            name(b)?;
                            *v = Value::String(id);
                            *changed = true;
                        }
                    }
                } else {
                    untag_fields(value, name, changed)?;
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                untag_fields(v, name, changed)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// An answer's JSON with the ids of kept objects tagged with `backend`; `None` when it holds
/// none (or is not JSON).
pub(crate) fn tag_answer(body: &[u8], backend: &str) -> Option<Vec<u8>> {
    let mut json: Value = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    tag_fields(&mut json, backend, &mut changed);
    changed.then(|| serde_json::to_vec(&json).ok()).flatten()
}

/// One server-sent event (its bytes up to and with the blank line that ends it) with the ids
/// of kept objects in its `data:` lines tagged; `None` when it holds none.
pub(crate) fn tag_event(event: &[u8], backend: &str) -> Option<Vec<u8>> {
    if !KEPT
        .iter()
        .any(|p| memchr::memmem::find(event, p.as_bytes()).is_some())
    {
        return None;
    }
    let mut out = Vec::with_capacity(event.len() + 16);
    let mut changed = false;
    for line in event.split_inclusive(|b| *b == b'\n') {
        let tagged = line
            .strip_prefix(b"data: ")
            .and_then(|data| tag_answer(data.trim_ascii_end(), backend));
        match tagged {
            Some(data) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&data);
                out.push(b'\n');
                changed = true;
            }
            None => out.extend_from_slice(line),
        }
    }
    changed.then_some(out)
}

/// The most of an event held while waiting for its end: past it, the bytes pass as they are.
const EVENT_LIMIT: usize = 1 << 20;

pin_project_lite::pin_project! {
    /// A streamed answer whose events have their ids tagged ([`tag_event`]) as they pass; each
    /// event is held only until its blank line arrives.
    pub(crate) struct TagEvents<B> {
        #[pin]
        inner: B,
        held: BytesMut,
        backend: Arc<str>,
        // Trailers that came while bytes were held: passed on after them.
        trailers: Option<Frame<Bytes>>,
        ended: bool,
    }
}

impl<B> TagEvents<B> {
    pub(crate) fn new(inner: B, backend: Arc<str>) -> Self {
        TagEvents {
            inner,
            held: BytesMut::new(),
            backend,
            trailers: None,
            ended: false,
        }
    }
}

/// `events` (complete events, each ending with a blank line), each tagged.
fn tag_events(events: Bytes, backend: &str) -> Bytes {
    let mut out = Vec::new();
    let mut changed = false;
    let mut rest = &events[..];
    while let Some(i) = memchr::memmem::find(rest, b"\n\n") {
        let (event, tail) = rest.split_at(i + 2);
        match tag_event(event, backend) {
            Some(t) => {
                out.extend_from_slice(&t);
                changed = true;
            }
            None => out.extend_from_slice(event),
        }
        rest = tail;
    }
    out.extend_from_slice(rest);
    if changed { Bytes::from(out) } else { events }
}

impl<B: Body<Data = Bytes>> Body for TagEvents<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            // The complete events held go out, tagged.
            if let Some(end) = memchr::memmem::rfind(this.held, b"\n\n") {
                let events = this.held.split_to(end + 2).freeze();
                return Poll::Ready(Some(Ok(Frame::data(tag_events(events, this.backend)))));
            }
            if this.trailers.is_some() || *this.ended || this.held.len() > EVENT_LIMIT {
                if !this.held.is_empty() {
                    let rest = this.held.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                if let Some(trailers) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(trailers)));
                }
                if *this.ended {
                    return Poll::Ready(None);
                }
            }
            match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.held.extend_from_slice(&data),
                    Err(trailers) => *this.trailers = Some(trailers),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => *this.ended = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_empty() && self.trailers.is_none()
    }
}

fn tag_fields(json: &mut Value, backend: &str, changed: &mut bool) {
    match json {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "id" || ID_FIELDS.contains(&key.as_str()) {
                    let ids: Vec<&mut Value> = match value {
                        Value::Array(items) => items.iter_mut().collect(),
                        v => vec![v],
                    };
                    for v in ids {
                        if let Some(id) = v.as_str()
                            && KEPT.iter().any(|p| id.starts_with(p))
                            && !id.contains(MARK)
                        {
                            *v = Value::String(tag(id, backend));
                            *changed = true;
                        }
                    }
                } else {
                    tag_fields(value, backend, changed);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                tag_fields(v, backend, changed);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_names_the_backend_and_reads_back_whatever_the_name() {
        for name in ["eastus", "gpt-4o_east-2", "azure.gpt-4", "région ~ 1", "~"] {
            let tagged = tag("resp_abc", name);
            assert_eq!(
                untag(&tagged),
                Some(("resp_abc", name.to_string())),
                "{tagged}"
            );
            assert!(
                tagged
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_~".contains(&b)),
                "path-safe: {tagged}"
            );
        }
        assert_eq!(tag("resp_abc", "eastus"), "resp_abc~eastus");
        for plain in [
            "resp_abc",
            "~eastus",
            "resp_abc~",
            "a~~zz",
            "a~~abc",
            "a~b~c",
            "",
        ] {
            assert_eq!(untag(plain), None, "{plain}");
        }
    }

    #[test]
    fn a_request_is_pinned_by_the_ids_in_its_path_and_body_with_the_backend_s_ids_restored() {
        let none = unpin(
            "/v1/responses",
            &Bytes::from_static(b"{\"input\":\"hi ~ there\"}"),
        );
        assert_eq!(none, Ok(None), "text with a ~ is not an id");
        assert!(
            !holds_a_tag(b"{\"input\":\"hi ~ there\"}"),
            "not even parsed"
        );
        assert!(holds_a_tag(b"{\"previous_response_id\": \"resp_1~east\"}"));
        assert!(!holds_a_tag(b"~resp_"));
        let got = unpin(
            "/v1/responses/resp_1~east/input_items?limit=2",
            &Bytes::new(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(*got.backend.0, *"east");
        assert_eq!(
            got.path_and_query.as_deref(),
            Some("/v1/responses/resp_1/input_items?limit=2")
        );
        let body = Bytes::from_static(
            br#"{"model":"m","previous_response_id":"resp_1~east","input":[{"role":"user","content":[{"type":"input_file","file_id":"file-2~east"}]}],"tools":[{"type":"file_search","vector_store_ids":["vs_3~east"]}]}"#,
        );
        let got = unpin("/v1/responses", &body).unwrap().unwrap();
        assert_eq!(*got.backend.0, *"east");
        let json: Value = serde_json::from_slice(got.body.as_ref().unwrap()).unwrap();
        assert_eq!(json["previous_response_id"], "resp_1");
        assert_eq!(json["input"][0]["content"][0]["file_id"], "file-2");
        assert_eq!(json["tools"][0]["vector_store_ids"][0], "vs_3");
        let two = Bytes::from_static(br#"{"previous_response_id":"resp_1~east"}"#);
        let err = unpin("/v1/responses/resp_2~west", &two).unwrap_err();
        assert!(err.contains("east") && err.contains("west"), "{err}");
    }

    #[test]
    fn an_answer_s_kept_objects_are_tagged_and_nothing_else() {
        let body = br#"{"id":"resp_1","object":"response","previous_response_id":"resp_0","output":[{"id":"msg_1","type":"message"}],"data":[{"id":"file-9"}],"model":"resp_x"}"#;
        let out: Value = serde_json::from_slice(&tag_answer(body, "east").unwrap()).unwrap();
        assert_eq!(out["id"], "resp_1~east");
        assert_eq!(out["previous_response_id"], "resp_0~east");
        assert_eq!(
            out["output"][0]["id"], "msg_1",
            "an output item is not kept apart"
        );
        assert_eq!(out["data"][0]["id"], "file-9~east", "a list's objects");
        assert_eq!(out["model"], "resp_x", "only id fields");
        assert_eq!(tag_answer(br#"{"id":"chatcmpl-1"}"#, "east"), None);
        assert_eq!(tag_answer(b"not json", "east"), None);
        assert_eq!(tag_answer(br#"{"id":"resp_1~east"}"#, "east"), None, "once");
    }

    proptest::proptest! {
        /// What a caller sends is read without panicking, and every tag reads back.
        #[test]
        fn any_path_and_body_is_read_and_every_tag_reads_back(
            path in "/v1/[a-z_/~0-9x-]{0,40}(\\?[a-z=~&]{0,10})?",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            id in "[a-zA-Z0-9_-]{1,20}",
            name in "\\PC{1,20}",
        ) {
            let _ = unpin(&path, &Bytes::from(body.clone()));
            let json = format!(r#"{{"previous_response_id":{}}}"#, Value::from(String::from_utf8_lossy(&body)));
            let _ = unpin("/v1/responses", &Bytes::from(json));
            let tagged = tag(&id, &name);
            proptest::prop_assert_eq!(untag(&tagged), Some((id.as_str(), name.clone())));
            let pinned = unpin(&format!("/v1/files/{tagged}"), &Bytes::new()).unwrap().unwrap();
            proptest::prop_assert_eq!(&*pinned.backend.0, name.as_str());
        }
    }

    #[tokio::test]
    async fn a_stream_s_events_are_tagged_however_the_bytes_are_cut() {
        use http_body_util::BodyExt;
        let stream = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\"}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"hi\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\"}}\n\n",
        );
        let whole = {
            let body = http_body_util::Full::new(Bytes::from_static(stream.as_bytes()));
            TagEvents::new(body, Arc::from("east"))
                .collect()
                .await
                .unwrap()
                .to_bytes()
        };
        let text = std::str::from_utf8(&whole).unwrap();
        assert_eq!(text.matches("resp_1~east").count(), 2, "{text}");
        assert!(
            text.contains("msg_1\""),
            "an item id is not kept apart: {text}"
        );
        assert_eq!(text.matches("\n\n").count(), 3, "{text}");
        // Cut at every byte: the same bytes out.
        for cut in 1..stream.len() {
            let (a, b) = stream.as_bytes().split_at(cut);
            let frames = futures_util::stream::iter([
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(a))),
                Ok(Frame::data(Bytes::copy_from_slice(b))),
            ]);
            let body = http_body_util::StreamBody::new(frames);
            let got = TagEvents::new(body, Arc::from("east"))
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn the_routes_of_kept_objects_are_known_and_their_contents_are_not_rewritten() {
        for yes in [
            "/v1/responses",
            "/v1/responses/resp_1",
            "/v1/files",
            "/v1/batches/batch_1/cancel",
            "/v1/vector_stores/vs_1/files",
            "/v1/messages/batches",
        ] {
            assert!(keeps_objects(yes), "{yes}");
        }
        for no in [
            "/v1/chat/completions",
            "/v1/files/file-1/content",
            "/v1/messages/batches/msgbatch_1/results",
            "/v1/responsesx",
            "/v1/embeddings",
        ] {
            assert!(!keeps_objects(no), "{no}");
        }
    }
}
