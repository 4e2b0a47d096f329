//! The only place vendors are named: URL shapes, credential headers and error-body codes of Azure
//! OpenAI, OpenAI(-compatible) APIs and Anthropic.
//!
//! # Path convention
//!
//! Callers write the path as the OpenAI / Anthropic API references show it, starting with `/v1/`:
//! `/v1/chat/completions`, `/v1/embeddings`, `/v1/messages`. Each backend's base URL is what you
//! would hand the official SDK as its base URL, and the provider maps the path onto it:
//!
//! | provider | base URL | `/v1/chat/completions?x=1` becomes |
//! |---|---|---|
//! | [`Provider::OpenAi`] | `https://api.openai.com/v1` | `https://api.openai.com/v1/chat/completions?x=1` |
//! | [`Provider::OpenAi`] (vLLM, Ollama…) | `http://10.0.0.5:8000/v1` | `http://10.0.0.5:8000/v1/chat/completions?x=1` |
//! | [`Provider::AzureOpenAi`] (classic) | `https://res.openai.azure.com` | `https://res.openai.azure.com/openai/deployments/{deployment}/chat/completions?x=1&api-version={version}` |
//! | [`Provider::AzureOpenAiV1`] | `https://res.openai.azure.com/openai/v1` | `https://res.openai.azure.com/openai/v1/chat/completions?x=1` |
//! | [`Provider::Anthropic`] | `https://api.anthropic.com` | `https://api.anthropic.com/v1/messages` (for `/v1/messages`) |
//! | [`Provider::Grpc`] | `http://10.0.0.7:50051` | the path as written: `http://10.0.0.7:50051/pkg.Service/Method` |
//!
//! A caller's `api-version` query parameter is replaced by the backend's on classic Azure.

pub(crate) mod translate;

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use http::header::HeaderName;
use serde::Deserialize;

use crate::error::InvalidConfig;

/// Which API a backend speaks.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Provider {
    /// OpenAI or any OpenAI-compatible server (vLLM, Ollama, LM Studio…). Credential: `Authorization: Bearer`.
    OpenAi,
    /// Azure OpenAI, classic deployment URLs. Credential: `api-key` or an Entra ID bearer token.
    AzureOpenAi {
        /// The deployment name (path segment).
        deployment: Arc<str>,
        /// The `api-version` query value, e.g. `2024-10-21`.
        api_version: Arc<str>,
    },
    /// Azure OpenAI v1 API (`/openai/v1/...`, deployment in the body's `model`). Credential: `api-key`.
    AzureOpenAiV1,
    /// Anthropic's Messages API. Credential: `x-api-key`; `anthropic-version` is set per backend.
    Anthropic {
        /// The `anthropic-version` header value, e.g. `2023-06-01`.
        version: HeaderValue,
    },
    /// A gRPC server (over HTTP/2; see [`client::grpc_client`](crate::client::grpc_client)):
    /// the caller's path (`/package.Service/Method`) goes to the base URL as written, and
    /// answers are classified by `grpc-status` ([`classify::grpc`](crate::classify::grpc)).
    /// Credential: as configured, usually a bearer token in `authorization` metadata.
    Grpc,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provider::OpenAi => f.write_str("OpenAi"),
            Provider::AzureOpenAi {
                deployment,
                api_version,
            } => f
                .debug_struct("AzureOpenAi")
                .field("deployment", deployment)
                .field("api_version", api_version)
                .finish(),
            Provider::AzureOpenAiV1 => f.write_str("AzureOpenAiV1"),
            Provider::Grpc => f.write_str("Grpc"),
            Provider::Anthropic { version } => f
                .debug_struct("Anthropic")
                .field("version", version)
                .finish(),
        }
    }
}

/// The `anthropic-version` header name.
pub(crate) static ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// The default `anthropic-version`.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// The default Azure OpenAI `api-version` for classic deployment URLs.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

fn is_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Checks an Azure deployment name: a plain path segment.
pub(crate) fn valid_deployment(deployment: &str) -> bool {
    !deployment.is_empty() && deployment.chars().all(is_segment_char) && deployment != ".."
}

impl Provider {
    /// Azure OpenAI classic: `deployment` and `api_version` must be plain path / query tokens.
    pub fn azure(deployment: &str, api_version: &str) -> Result<Provider, InvalidConfig> {
        if deployment.is_empty() || !deployment.chars().all(is_segment_char) || deployment == ".." {
            return Err(InvalidConfig::new(format!(
                "azure deployment {deployment:?}: must be non-empty letters, digits, '-', '_' or '.'"
            )));
        }
        if api_version.is_empty() || !api_version.chars().all(is_segment_char) {
            return Err(InvalidConfig::new(format!(
                "azure api-version {api_version:?}: must be non-empty letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Provider::AzureOpenAi {
            deployment: deployment.into(),
            api_version: api_version.into(),
        })
    }

    /// Anthropic with the given `anthropic-version`.
    pub fn anthropic(version: &str) -> Result<Provider, InvalidConfig> {
        let version = HeaderValue::from_str(version)
            .ok()
            .filter(|_| !version.is_empty())
            .ok_or_else(|| {
                InvalidConfig::new(format!("anthropic-version {version:?}: not a header value"))
            })?;
        Ok(Provider::Anthropic { version })
    }

    /// A short lowercase name: `openai`, `azure`, `azure-v1`, `anthropic`, `grpc`.
    pub fn name(&self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::AzureOpenAi { .. } => "azure",
            Provider::AzureOpenAiV1 => "azure-v1",
            Provider::Anthropic { .. } => "anthropic",
            Provider::Grpc => "grpc",
        }
    }

    /// Builds the path and query to send, from the base URL's path (no trailing slash) and the
    /// caller's path and query. See the [module docs](self) for the convention.
    #[cfg(test)]
    pub(crate) fn target_path(&self, base_path: &str, path: &str, query: Option<&str>) -> String {
        self.target_path_for(base_path, path, query, None)
    }

    /// Like [`Provider::target_path`], with the classic Azure deployment replaced by
    /// `deployment` when given (a per-target override; other providers ignore it).
    pub(crate) fn target_path_for(
        &self,
        base_path: &str,
        path: &str,
        query: Option<&str>,
        deployment_override: Option<&str>,
    ) -> String {
        let op = path
            .strip_prefix("/v1")
            .filter(|rest| rest.is_empty() || rest.starts_with('/'));
        let mut out = String::with_capacity(base_path.len() + path.len() + 64);
        out.push_str(base_path);
        match self {
            Provider::OpenAi | Provider::AzureOpenAiV1 => out.push_str(op.unwrap_or(path)),
            Provider::Anthropic { .. } | Provider::Grpc => out.push_str(path),
            Provider::AzureOpenAi { deployment, .. } => match op {
                // Operations of the resource, not of a deployment: files, batches, responses,
                // vector stores, fine-tuning (`/openai/files?api-version=...`).
                Some(op) if !is_deployment_op(op) => {
                    out.push_str("/openai");
                    out.push_str(op);
                }
                _ => {
                    out.push_str("/openai/deployments/");
                    out.push_str(deployment_override.unwrap_or(deployment));
                    out.push_str(op.unwrap_or(path));
                }
            },
        }
        if out.is_empty() {
            out.push('/');
        }
        match self {
            Provider::AzureOpenAi { api_version, .. } => {
                out.push('?');
                let mut first = true;
                for pair in query.unwrap_or("").split('&') {
                    if pair.is_empty() || pair == "api-version" || pair.starts_with("api-version=")
                    {
                        continue;
                    }
                    if !first {
                        out.push('&');
                    }
                    out.push_str(pair);
                    first = false;
                }
                if !first {
                    out.push('&');
                }
                out.push_str("api-version=");
                out.push_str(api_version);
            }
            _ => {
                if let Some(q) = query {
                    out.push('?');
                    out.push_str(q);
                }
            }
        }
        out
    }
}

/// Whether an OpenAI operation (the path after `/v1`) is one of a model deployment on Azure's
/// classic URLs (`/openai/deployments/{name}/...`): completions, embeddings, audio, images.
fn is_deployment_op(op: &str) -> bool {
    const DEPLOYMENT_OPS: [&str; 5] = [
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/audio/",
        "/images/",
    ];
    DEPLOYMENT_OPS
        .iter()
        .any(|d| op == *d || (d.ends_with('/') && op.starts_with(d)))
}

/// Whether `path` is one of Anthropic's own routes (`/v1/messages` and below it).
fn is_anthropic_route(path: &str) -> bool {
    path.strip_prefix("/v1/messages")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Provider {
    /// Whether a backend of this provider can serve a caller's `path` (an OpenAI- or
    /// Anthropic-shaped route), as it is or translated:
    ///
    /// | provider | serves |
    /// |---|---|
    /// | OpenAI-compatible, Azure (classic and v1) | every `/v1/...` route of the OpenAI API, and `/v1/messages` (translated); not Anthropic's other routes (`/v1/messages/count_tokens`, `/v1/messages/batches`) |
    /// | Anthropic | `/v1/messages` and the routes below it, `/v1/models`, `/v1/files`, and `/v1/chat/completions` (translated) |
    /// | gRPC | any path (a gRPC method) |
    ///
    /// A route a backend cannot serve is never sent to it: a group picks among the backends
    /// that can, and refuses with [`NotServed`](crate::error::NotServed) when none can.
    pub(crate) fn serves_route(&self, path: &str) -> bool {
        match self {
            Provider::Grpc => true,
            Provider::Anthropic { .. } => {
                is_anthropic_route(path)
                    || path == "/v1/chat/completions"
                    // Created through chat completions (a stored response cannot be read back).
                    || path == "/v1/responses"
                    || ["/v1/models", "/v1/files"].iter().any(|r| {
                        path.strip_prefix(r)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                    })
            }
            Provider::OpenAi | Provider::AzureOpenAi { .. } | Provider::AzureOpenAiV1 => {
                path == "/v1/messages" || !is_anthropic_route(path)
            }
        }
    }

    /// Which routes it serves, as a class: providers of one class serve the same routes
    /// ([`Provider::serves_route`]).
    pub(crate) fn route_class(&self) -> u8 {
        match self {
            Provider::OpenAi | Provider::AzureOpenAi { .. } | Provider::AzureOpenAiV1 => 0,
            Provider::Anthropic { .. } => 1,
            Provider::Grpc => 2,
        }
    }

    /// The kinds of backend that serve `path`, for an error that names them.
    pub(crate) fn kinds_serving(path: &str) -> &'static str {
        let openai = Provider::OpenAi.serves_route(path);
        let anthropic = Provider::Anthropic {
            version: HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
        }
        .serves_route(path);
        match (openai, anthropic) {
            (true, true) => "OpenAI-compatible, Azure and Anthropic backends",
            (true, false) => "OpenAI-compatible and Azure backends",
            (false, true) => "Anthropic backends",
            (false, false) => "gRPC backends only",
        }
    }
}

/// The codes in an error body that say a 429 will not pass by waiting (billing, spend limits).
pub(crate) const QUOTA_EXHAUSTED_CODES: &[&str] = &[
    "insufficient_quota",
    "billing_hard_limit_reached",
    "billing_not_active",
    "spend_limit_reached",
    "enforced_spend_limit_reached",
];

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    code: Option<serde_json::Value>,
}

/// True when an OpenAI/Azure (`{"error": {"type", "code"}}`) or Anthropic
/// (`{"type": "error", "error": {"type"}}`) error body names a quota that waiting will not refill.
pub(crate) fn is_quota_exhausted_body(body: &[u8]) -> bool {
    let Ok(env) = serde_json::from_slice::<ErrorEnvelope>(body) else {
        return false;
    };
    let Some(detail) = env.error else {
        return false;
    };
    [detail.kind, detail.code]
        .iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .any(|s| QUOTA_EXHAUSTED_CODES.contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_maps_onto_the_sdk_base_url() {
        let p = Provider::OpenAi;
        assert_eq!(
            p.target_path("/v1", "/v1/chat/completions", None),
            "/v1/chat/completions"
        );
        assert_eq!(p.target_path("", "/v1/models", Some("a=1")), "/models?a=1");
        assert_eq!(p.target_path("/v1", "/v1", None), "/v1");
        // A path that does not start with /v1 is appended as written.
        assert_eq!(p.target_path("/v1", "/health", None), "/v1/health");
        assert_eq!(p.target_path("/v1", "/v1beta/x", None), "/v1/v1beta/x");
    }

    #[test]
    fn azure_classic_puts_the_deployment_in_the_path_and_replaces_api_version() {
        let p = Provider::azure("gpt-4o", "2024-10-21").unwrap();
        assert_eq!(
            p.target_path("", "/v1/chat/completions", None),
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            p.target_path("", "/v1/embeddings", Some("api-version=1999&x=1")),
            "/openai/deployments/gpt-4o/embeddings?x=1&api-version=2024-10-21"
        );
    }

    #[test]
    fn the_model_of_a_multipart_form_is_its_model_field() {
        let form = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
            Content-Type: audio/wav\r\n\r\nRIFF....\r\n--b\r\n\
            Content-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n";
        assert_eq!(model_of(form), Some("whisper-1"));
        // A file part named `model` is not the field.
        let file = b"--b\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m\"\r\n\r\nx\r\n--b--";
        assert_eq!(model_of(file), None);
        assert_eq!(
            model_of(b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"),
            None
        );
        // JSON first.
        assert_eq!(model_of(br#"{"model":"gpt-4o"}"#), Some("gpt-4o"));
    }

    #[test]
    fn azure_classic_keeps_operations_of_the_resource_out_of_the_deployment() {
        let p = Provider::azure("gpt-4o", "2025-03-01-preview").unwrap();
        for (path, target) in [
            ("/v1/files", "/openai/files"),
            ("/v1/files/file-1/content", "/openai/files/file-1/content"),
            ("/v1/batches", "/openai/batches"),
            ("/v1/responses", "/openai/responses"),
            ("/v1/responses/resp_1", "/openai/responses/resp_1"),
            (
                "/v1/audio/transcriptions",
                "/openai/deployments/gpt-4o/audio/transcriptions",
            ),
            (
                "/v1/images/generations",
                "/openai/deployments/gpt-4o/images/generations",
            ),
            ("/v1/completions", "/openai/deployments/gpt-4o/completions"),
        ] {
            assert_eq!(
                p.target_path("", path, None),
                format!("{target}?api-version=2025-03-01-preview")
            );
        }
    }

    #[test]
    fn each_provider_serves_its_own_routes_and_the_translated_ones() {
        let openai = Provider::OpenAi;
        let azure = Provider::azure("gpt-4o", "2024-10-21").unwrap();
        let anthropic = Provider::anthropic("2023-06-01").unwrap();
        for path in [
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/models",
            "/v1/files/file-1",
            // Created through chat completions on an Anthropic backend.
            "/v1/responses",
        ] {
            for p in [&openai, &azure, &anthropic] {
                assert!(p.serves_route(path), "{p:?} {path}");
            }
        }
        for path in [
            "/v1/embeddings",
            "/v1/responses/resp_1",
            "/v1/audio/speech",
            "/v1/batches",
        ] {
            assert!(
                openai.serves_route(path) && azure.serves_route(path),
                "{path}"
            );
            assert!(!anthropic.serves_route(path), "{path}");
        }
        for path in ["/v1/messages/count_tokens", "/v1/messages/batches/b1"] {
            assert!(anthropic.serves_route(path), "{path}");
            assert!(
                !openai.serves_route(path) && !azure.serves_route(path),
                "{path}"
            );
        }
        assert!(!anthropic.serves_route("/v1/messagesx"));
        assert!(Provider::Grpc.serves_route("/pkg.Svc/Method"));
        assert_eq!(
            Provider::kinds_serving("/v1/embeddings"),
            "OpenAI-compatible and Azure backends"
        );
        assert_eq!(
            Provider::kinds_serving("/v1/messages/count_tokens"),
            "Anthropic backends"
        );
    }

    #[test]
    fn azure_v1_and_anthropic() {
        assert_eq!(
            Provider::AzureOpenAiV1.target_path("/openai/v1", "/v1/responses", None),
            "/openai/v1/responses"
        );
        let a = Provider::anthropic("2023-06-01").unwrap();
        assert_eq!(a.target_path("", "/v1/messages", None), "/v1/messages");
    }

    #[test]
    fn invalid_settings_are_errors() {
        assert!(Provider::azure("", "2024-10-21").is_err());
        assert!(Provider::azure("a/b", "2024-10-21").is_err());
        assert!(Provider::azure("..", "2024-10-21").is_err());
        assert!(Provider::azure("gpt", "2024 10").is_err());
        assert!(Provider::azure("gpt", "v&x=1").is_err());
        assert!(Provider::anthropic("a\nb").is_err());
        assert!(Provider::anthropic("").is_err());
    }

    #[test]
    fn quota_bodies() {
        assert!(is_quota_exhausted_body(
            br#"{"error":{"code":"insufficient_quota","type":"insufficient_quota"}}"#
        ));
        assert!(is_quota_exhausted_body(
            br#"{"type":"error","error":{"type":"enforced_spend_limit_reached"}}"#
        ));
        assert!(!is_quota_exhausted_body(br#"{"error":{"code":429}}"#));
        assert!(!is_quota_exhausted_body(
            br#"{"error":"insufficient_quota"}"#
        ));
        assert!(!is_quota_exhausted_body(b"\xff"));
    }
}

/// Estimates what a request costs of a token quota, the way Azure OpenAI documents its rate
/// limiter counts it before the answer exists: the prompt's text, about 4 characters per token
/// (the strings of `content`, `text`, `system`, `input`, `prompt`, `instructions` and a tool
/// call's `arguments`, not the JSON around them; a body with none of these, or not JSON: its
/// bytes / 4), plus the most the answer may take (`max_tokens`, `max_completion_tokens` or
/// `max_output_tokens`; 16 when none is given) times the answers asked for (`n`, or
/// completions' `best_of`, the larger). A cheap scan of the JSON, never a parse. A
/// backend that counts otherwise is followed through its quota headers (see
/// [`Snapshot::token_ratio`](crate::state::Snapshot::token_ratio)).
pub(crate) fn estimate_tokens(body: &[u8]) -> u32 {
    // One scan for the three keys (a finder per key and call cost more than the scan).
    static MAX: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"max_"));
    const KEYS: [&[u8]; 3] = [
        b"\"max_tokens\"",
        b"\"max_completion_tokens\"",
        b"\"max_output_tokens\"",
    ];
    let prompt = prompt_chars(body).unwrap_or(body.len()).div_ceil(4);
    // The value at each key's first occurrence; the first key that has a number decides.
    let mut first: [Option<Option<usize>>; 3] = [None; 3];
    let mut from = 0;
    while let Some(pos) = MAX.find(&body[from..]) {
        let at = from + pos;
        if let Some(i) = KEYS.iter().position(|k| body[at..].starts_with(k))
            && first[i].is_none()
        {
            first[i] = Some(number_at(&body[at + KEYS[i].len()..]));
            if matches!(first[0], Some(Some(_))) {
                break;
            }
        }
        from = at + 1;
    }
    let answer = first.iter().find_map(|f| f.flatten()).unwrap_or(16);
    let answer = answer.saturating_mul(answers_asked(body));
    u32::try_from(prompt.saturating_add(answer)).unwrap_or(u32::MAX)
}

/// How many answers the request asks for: the larger of `n` and `best_of` (completions), the
/// first number found at each key; 1 without either, at most 128 (OpenAI's cap on `n`).
fn answers_asked(body: &[u8]) -> usize {
    let mut most = 1;
    for key in [&b"\"n\""[..], b"\"best_of\""] {
        for at in memchr::memmem::find_iter(body, key) {
            if let Some(n) = number_at(&body[at + key.len()..]) {
                most = most.max(n.min(128));
                break;
            }
        }
    }
    most
}

/// The request's top-level `"model"` as the OpenAI and Anthropic APIs carry it, by a cheap scan
/// (no parse): the string after the first `"model":` in the body. `None` without one, or when
/// the value is not a plain string (escapes are not decoded).
/// A `multipart/form-data` body (audio transcriptions, image edits, file uploads) gives the
/// value of its `model` field.
pub fn model_of(body: &[u8]) -> Option<&str> {
    json_model_of(body).or_else(|| form_model_of(body))
}

/// The value of a multipart form's `model` field: the part headed
/// `Content-Disposition: form-data; name="model"`, up to its line end.
fn form_model_of(body: &[u8]) -> Option<&str> {
    static FIELD: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"name=\"model\""));
    let at = FIELD.find(body)? + b"name=\"model\"".len();
    let rest = &body[at..];
    // The part's headers end at the first empty line; a field has no filename.
    let blank = memchr::memmem::find(rest, b"\r\n\r\n")?;
    if rest[..blank].starts_with(b";") {
        return None;
    }
    let value = &rest[blank + 4..];
    let end = memchr::memmem::find(value, b"\r\n")?;
    let model = std::str::from_utf8(&value[..end]).ok()?.trim();
    (!model.is_empty()).then_some(model)
}

/// [`model_of`] for a JSON body.
fn json_model_of(body: &[u8]) -> Option<&str> {
    static MODEL: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"model\""));
    let key = b"\"model\"";
    let mut from = 0;
    while let Some(pos) = MODEL.find(&body[from..]) {
        let at = from + pos + key.len();
        from = at;
        let rest = &body[at..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        // A `"model"` that is a value, not a key: look further.
        let Some(rest) = rest[colon..].strip_prefix(b":") else {
            continue;
        };
        let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let value = rest[start..].strip_prefix(b"\"")?;
        let end = value.iter().position(|b| *b == b'"' || *b == b'\\')?;
        if value[end] != b'"' {
            return None;
        }
        return std::str::from_utf8(&value[..end]).ok();
    }
    None
}

/// Whether a JSON answer's first bytes open an `{"error": {...}}` object (its first key is
/// `"error"` and that value an object): `Some(true)` / `Some(false)` once known, `None` while
/// more bytes are needed. A cheap look at the head, never a parse.
pub(crate) fn json_error_head(buf: &[u8]) -> Option<bool> {
    let mut rest = buf;
    let skip_ws = |r: &mut &[u8]| {
        let n = r.iter().take_while(|b| b.is_ascii_whitespace()).count();
        *r = &r[n..];
        r.first().copied()
    };
    if skip_ws(&mut rest)? != b'{' {
        return Some(false);
    }
    rest = &rest[1..];
    skip_ws(&mut rest)?;
    let key = br#""error""#;
    let n = rest.len().min(key.len());
    if rest[..n] != key[..n] {
        return Some(false);
    }
    if n < key.len() {
        return None;
    }
    rest = &rest[key.len()..];
    if skip_ws(&mut rest)? != b':' {
        return Some(false);
    }
    rest = &rest[1..];
    Some(skip_ws(&mut rest)? == b'{')
}

/// What an error a provider put inside a successful answer means: a throttle when it speaks
/// of rate limits or overload, else a server error (502).
pub(crate) fn in_band_error_outcome(body: &[u8]) -> crate::outcome::Outcome {
    let has = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
    if has(b"rate_limit") || has(b"overloaded") || has(b"\"429\"") {
        crate::outcome::Outcome::Throttled { retry_after: None }
    } else {
        crate::outcome::Outcome::ServerError {
            status: http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// Tokens an answer reports using, `(prompt, completion)`, from the first bytes of its body
/// (`head`: an Anthropic stream's `message_start` carries `input_tokens`) and the last (`tail`:
/// the `usage` object at the end of an OpenAI or Anthropic JSON answer, an OpenAI stream's
/// last chunk when the caller asked for `stream_options.include_usage`, an Anthropic stream's
/// `message_delta`). A cheap scan, never a parse; `None` when neither number is there.
pub fn usage_of(head: &[u8], tail: &[u8]) -> Option<(u64, u64)> {
    let key = br#""usage""#;
    let last = memchr::memmem::rfind(tail, key);
    let usage = last.map_or(&[][..], |at| &tail[at..]);
    let find = |json: &[u8], keys: &[&[u8]]| {
        keys.iter()
            .find_map(|k| number_after(json, k))
            .map(|n| n as u64)
    };
    let prompt = find(usage, &[br#""prompt_tokens""#, br#""input_tokens""#])
        .or_else(|| find(head, &[br#""input_tokens""#]));
    let completion = find(usage, &[br#""completion_tokens""#, br#""output_tokens""#]);
    (prompt.is_some() || completion.is_some())
        .then(|| (prompt.unwrap_or(0), completion.unwrap_or(0)))
}

/// The unsigned number after `"key":` in `json`, if there is one.
fn number_after(json: &[u8], key: &[u8]) -> Option<usize> {
    let at = memchr::memmem::find(json, key)? + key.len();
    number_at(&json[at..])
}

/// The unsigned number after `:` at the start of `rest` (after a key), if there is one.
/// The keys whose string values (or strings listed directly under them) are prompt text.
const TEXT_KEYS: [&[u8]; 7] = [
    b"content",
    b"text",
    b"system",
    b"input",
    b"prompt",
    b"instructions",
    b"arguments",
];

/// The characters of a JSON request's prompt text (see [`estimate_tokens`]): one pass over the
/// structure, strings skipped with `memchr`. `None` when the body is not JSON as far as the
/// scan can tell, nests deeper than 64, or holds no text key.
fn prompt_chars(body: &[u8]) -> Option<usize> {
    /// A container being scanned: an object (whether its current key is a text key, and
    /// whether a key comes next) or an array (whether its strings are text).
    #[derive(Clone, Copy)]
    enum Frame {
        Object { text: bool, key_next: bool },
        Array { text: bool },
    }
    let mut stack: [Frame; 64] = [Frame::Array { text: false }; 64];
    let mut depth = 0usize;
    let mut chars = 0usize;
    let mut found = false;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let start = i + 1;
                let end = string_end(body, start)?;
                let s = &body[start..end];
                match stack.get_mut(depth.checked_sub(1)?)? {
                    Frame::Object { text, key_next } if *key_next => {
                        *text = TEXT_KEYS.contains(&s);
                        *key_next = false;
                        found |= *text;
                    }
                    Frame::Object { text: true, .. } | Frame::Array { text: true } => {
                        // Characters, not bytes: UTF-8 continuation bytes are not counted.
                        chars += s.iter().filter(|b| (**b & 0xC0) != 0x80).count();
                    }
                    _ => {}
                }
                i = end + 1;
                continue;
            }
            b'{' | b'[' => {
                // A list directly under a text key holds text (`"input": ["a", "b"]`).
                let text = body[i] == b'['
                    && depth > 0
                    && matches!(
                        stack[depth - 1],
                        Frame::Object { text: true, .. } | Frame::Array { text: true }
                    );
                let frame = if body[i] == b'{' {
                    Frame::Object {
                        text: false,
                        key_next: true,
                    }
                } else {
                    Frame::Array { text }
                };
                *stack.get_mut(depth)? = frame;
                depth += 1;
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' => {
                if let Some(Frame::Object { key_next, .. }) =
                    depth.checked_sub(1).map(|d| &mut stack[d])
                {
                    *key_next = true;
                }
            }
            _ => {}
        }
        i += 1;
    }
    (found && depth == 0).then_some(chars)
}

/// Where the JSON string starting at `start` (after its opening quote) ends: its closing
/// quote, the first one not escaped. Short strings (keys, most values) byte by byte; past 32
/// bytes, `memchr`.
#[inline]
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut j = start;
    let short = body.len().min(start + 32);
    while j < short {
        match body[j] {
            b'"' => return Some(j),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
    while j < body.len() {
        let at = j + memchr::memchr2(b'"', b'\\', &body[j..])?;
        if body[at] == b'"' {
            return Some(at);
        }
        j = at + 2;
    }
    None
}

fn number_at(rest: &[u8]) -> Option<usize> {
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let digits: &[u8] = &rest[start..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Streams (SSE): what the providers send at the start and the end of a streamed answer,
/// for [`endpoint::Settings::hold_stream_start`](crate::endpoint::Settings::hold_stream_start)
/// and for a custom [`Classify`](crate::classify::Classify).
///
/// True once the start of an SSE stream shows content or an in-band error: a complete event
/// carrying `"content"`, `"delta"`, `"error"`, or `[DONE]`.
pub(crate) fn stream_start_known(buf: &[u8]) -> bool {
    // Only decide on complete events (terminated by a blank line).
    let Some(last_end) = memchr::memmem::rfind(buf, b"\n\n") else {
        return false;
    };
    let events = &buf[..last_end];
    let has_in = |needle: &[u8]| memchr::memmem::find(events, needle).is_some();
    has_in(b"\"content\"")
        || has_in(b"\"delta\"")
        || has_in(b"\"error\"")
        || has_in(b"event: error")
        || has_in(b"[DONE]")
}

/// What an in-band error at the start of a stream means, if there is one.
pub(crate) fn stream_start_outcome(buf: &[u8]) -> Option<crate::outcome::Outcome> {
    let has = |needle: &[u8]| memchr::memmem::find(buf, needle).is_some();
    let content = has(b"\"content\"") && !has(b"\"error\"");
    if content {
        return None;
    }
    if has(b"overloaded") || has(b"rate_limit") {
        return Some(crate::outcome::Outcome::Throttled { retry_after: None });
    }
    if has(b"event: error") || has(b"\"error\"") {
        return Some(crate::outcome::Outcome::ServerError {
            status: http::StatusCode::BAD_GATEWAY,
        });
    }
    None
}

/// The marker a complete streamed answer ends with, by the path the caller wrote:
/// OpenAI's `data: [DONE]` for chat and completions, Anthropic's `message_stop` for messages.
pub(crate) fn stream_end_marker(path: &str) -> Option<&'static [u8]> {
    if path.ends_with("/chat/completions") || path.ends_with("/completions") {
        Some(b"[DONE]")
    } else if path.ends_with("/messages") {
        Some(b"message_stop")
    } else {
        None
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn usage_is_read_from_each_provider_s_answers_and_streams() {
        // OpenAI JSON, and a stream's last chunk (stream_options.include_usage).
        let json = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert_eq!(usage_of(json, json), Some((12, 5)));
        let tail = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage_of(b"data: {}", tail), Some((3, 9)));
        // Anthropic: input tokens in message_start at the head, output in message_delta.
        let head = br#"event: message_start
data: {"type":"message_start","message":{"usage":{"input_tokens":25,"output_tokens":1}}}"#;
        let tail = br#"event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}"#;
        assert_eq!(usage_of(head, tail), Some((25, 15)));
        // A `"usage"` quoted inside the content earlier does not count; none at all is None.
        assert_eq!(usage_of(b"", br#"{"content":"no usage here"}"#), None);
    }

    #[test]
    fn the_start_of_a_stream_is_judged_on_complete_events() {
        assert!(!stream_start_known(b""));
        assert!(
            !stream_start_known(b"data: {\"choices\":[{\"delta\":"),
            "incomplete event"
        );
        assert!(
            !stream_start_known(b": ping\n\n"),
            "a keep-alive says nothing"
        );
        let content = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        assert!(stream_start_known(content));
        assert_eq!(stream_start_outcome(content), None);
        let overloaded = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        assert!(stream_start_known(overloaded));
        assert_eq!(
            stream_start_outcome(overloaded),
            Some(crate::outcome::Outcome::Throttled { retry_after: None })
        );
        let failed = b"data: {\"error\":{\"message\":\"internal\"}}\n\n";
        assert_eq!(
            stream_start_outcome(failed),
            Some(crate::outcome::Outcome::ServerError {
                status: http::StatusCode::BAD_GATEWAY
            })
        );
        assert_eq!(
            stream_end_marker("/v1/chat/completions"),
            Some(&b"[DONE]"[..])
        );
        assert_eq!(
            stream_end_marker("/v1/messages"),
            Some(&b"message_stop"[..])
        );
        assert_eq!(stream_end_marker("/v1/embeddings"), None);
    }
}

#[cfg(test)]
mod estimate_tests {
    use super::{estimate_tokens, model_of};

    #[test]
    fn an_error_object_is_known_from_the_head_of_a_json_answer() {
        use super::json_error_head as h;
        assert_eq!(h(br#"{"error":{"message":"x"}}"#), Some(true));
        assert_eq!(h(b" {\n  \"error\" : {"), Some(true));
        assert_eq!(h(br#"{"error":null,"id":"x"}"#), Some(false));
        assert_eq!(h(br#"{"id":"chatcmpl-1","choices":[]}"#), Some(false));
        assert_eq!(h(br#"{"err"#), None, "more bytes needed");
        assert_eq!(h(b"  "), None);
        assert_eq!(h(b"[1,2]"), Some(false));
        assert_eq!(h(br#"{"errors":{}}"#), Some(false));
    }

    #[test]
    fn the_model_is_read_from_the_body_without_a_parse() {
        assert_eq!(
            model_of(br#"{"model":"gpt-4o","messages":[]}"#),
            Some("gpt-4o")
        );
        assert_eq!(
            model_of(br#"{ "messages": [{"content":"model"}], "model" : "m-1" }"#),
            Some("m-1")
        );
        assert_eq!(model_of(br#"{"messages":[]}"#), None);
        assert_eq!(model_of(br#"{"model":42}"#), None);
        assert_eq!(model_of(br#"{"model":"a\"b"}"#), None);
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(b""), None);
    }

    #[test]
    fn the_prompt_is_the_text_the_providers_count_not_the_json_around_it() {
        use super::prompt_chars;
        // Chat: string contents and text parts; an image's URL and the roles are not text.
        let chat = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Décris"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
            {"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{\"a\":1}"}}]}]}"#;
        assert_eq!(
            prompt_chars(chat.as_bytes()),
            Some(9 + 6 + 9),
            "escapes as written"
        );
        // Anthropic: a system string or blocks; Responses: input and instructions.
        let anthropic = br#"{"system":[{"type":"text","text":"abc"}],"messages":[{"role":"user","content":"de"}]}"#;
        assert_eq!(prompt_chars(anthropic), Some(5));
        let responses = br#"{"instructions":"ab","input":[{"role":"user","content":"cd"}]}"#;
        assert_eq!(prompt_chars(responses), Some(4));
        // Lists of strings under a text key (embeddings, completions).
        assert_eq!(
            prompt_chars(br#"{"input":["ab","cde"],"model":"x"}"#),
            Some(5)
        );
        assert_eq!(prompt_chars(br#"{"prompt":"abcd"}"#), Some(4));
        // An escaped quote does not end a string.
        assert_eq!(prompt_chars(br#"{"content":"a\"b"}"#), Some(4));
        // Not JSON, unbalanced, too deep, no text: no count (the bytes are used).
        for bad in [
            &b"not json"[..],
            br#"{"content":"ab""#,
            br#"{"content":"ab"}}"#,
            br#"{"model":"x"}"#,
            b"\"",
        ] {
            assert_eq!(prompt_chars(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(prompt_chars(deep.as_bytes()), None);
    }

    #[test]
    fn the_token_estimate_is_the_prompt_and_the_answer_s_cap() {
        let body = br#"{"messages":[{"role":"user","content":"hello there"}],"max_tokens": 100}"#;
        assert_eq!(estimate_tokens(body), 3 + 100, "11 characters of text");
        let newer = br#"{"max_completion_tokens":50,"messages":[]}"#;
        assert_eq!(
            estimate_tokens(newer),
            newer.len().div_ceil(4) as u32 + 50,
            "no text: the bytes"
        );
        assert_eq!(estimate_tokens(b"{}"), 1 + 16, "no cap given: 16");
        let several =
            br#"{"messages":[{"role":"user","content":"hello there"}],"max_tokens":100,"n":3}"#;
        assert_eq!(estimate_tokens(several), 3 + 300, "three answers");
        let best = br#"{"prompt":"hello there","max_tokens":10,"best_of":5,"n":2}"#;
        assert_eq!(estimate_tokens(best), 3 + 50, "best_of 5 answers made");
        let nested = br#"{"messages":[{"role":"user","content":"hello there"}],"tools":[{"parameters":{"properties":{"n":{"type":"integer"}}}}],"max_tokens":10}"#;
        assert_eq!(
            estimate_tokens(nested),
            3 + 10,
            "a schema's property named n is no count"
        );
        let absurd = br#"{"prompt":"hello there","max_tokens":1,"n":100000}"#;
        assert_eq!(estimate_tokens(absurd), 3 + 128, "n at most 128");
        assert_eq!(
            estimate_tokens(br#"{"max_tokens":"x"}"#),
            5 + 16,
            "not a number"
        );
        let huge = br#"{"max_tokens": 99999999999999999999999}"#;
        assert_eq!(estimate_tokens(b"not json at all"), 4 + 16);
        assert_eq!(
            estimate_tokens(huge),
            huge.len().div_ceil(4) as u32 + 16,
            "overflow: no cap"
        );
    }
}
