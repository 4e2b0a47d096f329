//! `Translate`: the per-backend layer that lets one request shape reach any provider.
//!
//! An OpenAI chat request (`POST /v1/chat/completions`) sent to an Anthropic backend leaves as
//! an Anthropic messages request (`POST /v1/messages`), and its answer comes back as an OpenAI
//! chat completion: plain, streamed (`chat.completion.chunk`s ending in `data: [DONE]`), or an
//! error in OpenAI's shape. The other way round, `POST /v1/messages` to an OpenAI, Azure or
//! Azure v1 backend leaves as a chat request and comes back in Anthropic's shape. Every other
//! request, and every request to a backend that speaks its API, passes untouched (one path
//! comparison). The field mapping is in `provider/translate.rs`.
//!
//! It sits per backend, just above that backend's `Endpoint` (which routes and classifies the
//! backend's own answer: Anthropic's `529 overloaded_error` is throttling there), so `Balance`,
//! `RetryAfter429` and `Fallback` above stay provider-neutral: a group can mix providers, and a
//! chain can fall back from one provider to another in the middle of a conversation.
//! [`stack::group`](crate::stack::group) and the config build place it on every backend.
//!
//! | outcome | what `Translate` does |
//! |---|---|
//! | request in the backend's own API, or another path | passes it on untouched |
//! | a request it can translate | sends the translation (`max_tokens` defaulted for Anthropic, [`Options`]) |
//! | a parameter with no counterpart (`n: 2`, `logprobs`, an audio part…) | answers [`Untranslatable`] naming it without sending (a client error: never retried or failed over; the gateway answers `400`) unless [`Options::drop_unsupported`] |
//! | success | rewrites the answer (whole, or the stream event by event) into the caller's API |
//! | error status | rewrites the error body into the caller's shape; `529` becomes `503` for OpenAI callers |
//! | an answer that cannot be translated (not JSON, a broken stream) | the body ends with an error naming the backend, never a clean end |
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_llm_lb::{Backend, endpoint::EndpointLayer, translate::TranslateLayer};
//! use tower_llm_lb_mock::MockServer;
//! use http_body_util::BodyExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_llm_lb::BoxError> {
//! let claude = MockServer::builder().name("claude").start().await?;
//! let backend = Backend::anthropic("claude", claude.url()).build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(TranslateLayer::for_backend(&backend))
//!     .layer(EndpointLayer::new(backend))
//!     .service(tower_llm_lb::client::http_client());
//! let req = http::Request::post("/v1/chat/completions").body(
//!     r#"{"model":"claude-sonnet-4-5","messages":[{"role":"system","content":"Be brief."},
//!                                              {"role":"user","content":"Hi"}]}"#.into(),
//! )?;
//! let res = svc.oneshot(req).await?;
//! let answer: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
//! assert_eq!(answer["object"], "chat.completion");
//! assert_eq!(answer["choices"][0]["message"]["content"], "Hello from claude");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::Backend;
use crate::body::{ReplayBody, ResponseBody};
use crate::classify::retry_after::WallClock;
use crate::error::BoxError;
use crate::provider::Provider;
use crate::provider::translate::{self as t, StreamTranslate};

pub use crate::provider::translate::{
    Options, StripUsage, Untranslatable, ask_stream_usage, error_to_anthropic,
};

/// Which way a request is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// OpenAI chat → Anthropic messages.
    ChatToMessages,
    /// Anthropic messages → OpenAI chat.
    MessagesToChat,
    /// OpenAI Responses → Anthropic messages (through chat completions).
    ResponsesToMessages,
}

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";
const RESPONSES: &str = "/v1/responses";

fn direction(provider: &Provider, method: &Method, path: &str) -> Option<Direction> {
    if method != Method::POST {
        return None;
    }
    match provider {
        Provider::Anthropic { .. } if path == CHAT => Some(Direction::ChatToMessages),
        Provider::Anthropic { .. } if path == RESPONSES => Some(Direction::ResponsesToMessages),
        Provider::OpenAi | Provider::AzureOpenAi { .. } | Provider::AzureOpenAiV1
            if path == MESSAGES =>
        {
            Some(Direction::MessagesToChat)
        }
        _ => None,
    }
}

/// Places [`Translate`] over a backend's endpoint.
#[derive(Clone)]
pub struct TranslateLayer {
    provider: Provider,
    options: Arc<Options>,
    clock: WallClock,
}

impl TranslateLayer {
    /// Translates for `backend`'s provider, with the default [`Options`].
    pub fn for_backend(backend: &Backend) -> Self {
        TranslateLayer {
            provider: backend.provider().clone(),
            options: Arc::new(Options::default()),
            clock: WallClock::default(),
        }
    }

    /// Sets how requests are translated.
    pub fn options(mut self, options: Options) -> Self {
        self.options = Arc::new(options);
        self
    }
}

impl fmt::Debug for TranslateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TranslateLayer")
            .field("provider", &self.provider.name())
            .field("options", &self.options)
            .finish()
    }
}

impl<S> Layer<S> for TranslateLayer {
    type Service = Translate<S>;

    fn layer(&self, inner: S) -> Translate<S> {
        Translate {
            inner,
            layer: self.clone(),
        }
    }
}

/// Translates requests and answers between OpenAI's and Anthropic's APIs for one backend. See
/// the [module docs](self).
#[derive(Clone)]
pub struct Translate<S> {
    inner: S,
    layer: TranslateLayer,
}

impl<S: fmt::Debug> fmt::Debug for Translate<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Translate")
            .field("layer", &self.layer)
            .field("inner", &self.inner)
            .finish()
    }
}

/// What the answer of a translated request needs.
#[derive(Clone, Copy, Debug)]
struct Plan {
    direction: Direction,
    include_usage: bool,
    created: u64,
}

impl<S, B> Service<Request<ReplayBody>> for Translate<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResponseBody<B>>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<B>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        let Some(direction) = direction(&self.layer.provider, req.method(), req.uri().path())
        else {
            return ResponseFuture {
                plan: None,
                state: State::Call {
                    fut: self.inner.call(req),
                },
            };
        };
        let (mut parts, body) = req.into_parts();
        let options = &self.layer.options;
        let translated = match direction {
            Direction::ChatToMessages => t::chat_to_messages(body.bytes(), options),
            Direction::MessagesToChat => t::messages_to_chat(body.bytes(), options),
            Direction::ResponsesToMessages => t::responses_to_chat(body.bytes())
                .and_then(|(chat, _)| t::chat_to_messages(&chat, options)),
        };
        let translated = match translated {
            Ok(tr) => tr,
            Err(e) => {
                return ResponseFuture {
                    plan: None,
                    state: State::Refused { error: Some(e) },
                };
            }
        };
        let path = match direction {
            Direction::ChatToMessages | Direction::ResponsesToMessages => MESSAGES,
            Direction::MessagesToChat => CHAT,
        };
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query = path_and_query.parse().ok();
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
        parts.headers.remove(CONTENT_LENGTH);
        let created = self
            .layer
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let plan = Plan {
            direction,
            include_usage: translated.include_usage,
            created,
        };
        let req = Request::from_parts(parts, ReplayBody::from(translated.body));
        ResponseFuture {
            plan: Some(plan),
            state: State::Call {
                fut: self.inner.call(req),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Translate`].
    pub struct ResponseFuture<F> {
        plan: Option<Plan>,
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Refused { error: Option<Untranslatable> },
        Call { #[pin] fut: F },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody<B>>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match this.state.project() {
            StateProj::Refused { error } => {
                return Poll::Ready(Err(match error.take() {
                    Some(e) => e.into(),
                    None => "polled after completion".into(),
                }));
            }
            StateProj::Call { fut } => ready!(fut.poll(cx)).map_err(Into::into)?,
        };
        let Some(plan) = *this.plan else {
            return Poll::Ready(Ok(res));
        };
        Poll::Ready(Ok(answer(res, plan)))
    }
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn to_openai(body: &[u8], created: u64, status: u16) -> Result<Vec<u8>, String> {
    if status >= 400 || t::is_error_body(body) {
        return Ok(t::error_to_openai(body));
    }
    t::message_to_completion(body, created)
}

fn to_response(body: &[u8], created: u64, status: u16) -> Result<Vec<u8>, String> {
    if status >= 400 || t::is_error_body(body) {
        return Ok(t::error_to_openai(body));
    }
    t::completion_to_response(&t::message_to_completion(body, created)?, created)
}

fn to_anthropic(body: &[u8], _created: u64, status: u16) -> Result<Vec<u8>, String> {
    if status >= 400 || t::is_error_body(body) {
        return Ok(t::error_to_anthropic(status, body));
    }
    t::completion_to_message(body)
}

/// Rewrites the backend's answer into the caller's API.
fn answer<B>(res: Response<ResponseBody<B>>, plan: Plan) -> Response<ResponseBody<B>> {
    let (mut parts, body) = res.into_parts();
    let status = parts.status.as_u16();
    let stream = parts.status.is_success() && is_event_stream(&parts.headers);
    let with: Box<dyn StreamTranslate> = match (plan.direction, stream) {
        (Direction::ChatToMessages, true) => {
            Box::new(t::ToChatChunks::new(plan.created, plan.include_usage))
        }
        (Direction::MessagesToChat, true) => Box::new(t::ToMessageEvents::new()),
        (Direction::ChatToMessages, false) => {
            Box::new(t::Whole::new(to_openai, plan.created, status))
        }
        (Direction::MessagesToChat, false) => {
            Box::new(t::Whole::new(to_anthropic, plan.created, status))
        }
        (Direction::ResponsesToMessages, true) => Box::new(t::Chain::new(
            Box::new(t::ToChatChunks::new(plan.created, true)),
            Box::new(t::ToResponseEvents::new(plan.created)),
        )),
        (Direction::ResponsesToMessages, false) => {
            Box::new(t::Whole::new(to_response, plan.created, status))
        }
    };
    if plan.direction != Direction::MessagesToChat {
        let mapped = t::status_for_openai(status);
        if mapped != status
            && let Ok(s) = http::StatusCode::from_u16(mapped)
        {
            parts.status = s;
        }
    }
    parts.headers.remove(CONTENT_LENGTH);
    if !stream {
        parts
            .headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Response::from_parts(parts, body.translated(with))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cross_provider_chat_and_messages_posts_are_translated() {
        let anthropic = Provider::anthropic("2023-06-01").unwrap();
        let post = Method::POST;
        assert_eq!(
            direction(&anthropic, &post, CHAT),
            Some(Direction::ChatToMessages)
        );
        assert_eq!(direction(&anthropic, &post, MESSAGES), None);
        assert_eq!(direction(&anthropic, &Method::GET, CHAT), None);
        assert_eq!(direction(&anthropic, &post, "/v1/embeddings"), None);
        assert_eq!(
            direction(&Provider::OpenAi, &post, MESSAGES),
            Some(Direction::MessagesToChat)
        );
        assert_eq!(direction(&Provider::OpenAi, &post, CHAT), None);
        assert_eq!(
            direction(&Provider::AzureOpenAiV1, &post, MESSAGES),
            Some(Direction::MessagesToChat)
        );
        assert_eq!(direction(&Provider::Grpc, &post, MESSAGES), None);
    }
}
