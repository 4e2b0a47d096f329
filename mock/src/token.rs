//! A loopback mock of the Entra ID token endpoints, issuing short-lived tokens that
//! [`MockServer`](crate::MockServer)s built with [`MockBuilder::entra`](crate::MockBuilder::entra)
//! accept only until they expire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Tokens issued by a [`MockTokenServer`] and when each expires (tokio's clock).
#[derive(Debug, Default)]
pub struct TokenRegistry {
    tokens: Mutex<HashMap<String, Instant>>,
}

impl TokenRegistry {
    /// Revokes every token issued so far (a role removed, a secret rotated): they are refused
    /// from now on, though not expired.
    pub fn revoke_all(&self) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// True when `token` was issued and has not expired at `now`.
    pub fn valid(&self, token: &str, now: Instant) -> bool {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .is_some_and(|exp| now < *exp)
    }
}

struct Shared {
    client_id: String,
    client_secret: String,
    identity_header: String,
    lifetime: Duration,
    registry: Arc<TokenRegistry>,
    fetches: AtomicU64,
    failing: AtomicBool,
    /// Answer this many IMDS requests with 429 before succeeding.
    imds_throttle: AtomicU64,
    epoch_at_start: u64,
    started: Instant,
}

/// A mock Entra ID token server on loopback:
/// - `POST /{tenant}/oauth2/v2.0/token` (client credentials; checks client id and secret),
/// - `GET /metadata/identity/oauth2/token` (IMDS; needs `Metadata: true`; string fields),
/// - `GET /msi/token` (App Service; needs `X-IDENTITY-HEADER`; `expires_on` epoch seconds).
///
/// Every token lives `lifetime` (tokio's clock). Stops when dropped.
pub struct MockTokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockTokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for MockTokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockTokenServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MockTokenServer {
    /// Starts a server accepting `client_id` / `client_secret` and App Service
    /// `identity_header`, issuing tokens that live `lifetime`.
    pub async fn start(
        client_id: &str,
        client_secret: &str,
        identity_header: &str,
        lifetime: Duration,
    ) -> std::io::Result<MockTokenServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            identity_header: identity_header.into(),
            lifetime,
            registry: Arc::new(TokenRegistry::default()),
            fetches: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            imds_throttle: AtomicU64::new(0),
            epoch_at_start: 1_700_000_000,
            started: Instant::now(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let s = s.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| answer(s.clone(), req));
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(MockTokenServer { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT` (the authority host for client credentials).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The tokens issued, shared with token-checking mock LLM servers.
    pub fn registry(&self) -> Arc<TokenRegistry> {
        self.shared.registry.clone()
    }

    /// Token requests received (successful or not).
    pub fn fetches(&self) -> u64 {
        self.shared.fetches.load(SeqCst)
    }

    /// Makes every following request fail with 503 (or work again).
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, SeqCst);
    }

    /// Answers the next `n` IMDS requests with 429.
    pub fn throttle_imds(&self, n: u64) {
        self.shared.imds_throttle.store(n, SeqCst);
    }

    /// A wall clock that agrees with this server's `expires_on` answers (for token sources).
    pub fn wall_clock(&self) -> tower_llm_lb::classify::WallClock {
        let shared = self.shared.clone();
        tower_llm_lb::classify::WallClock::from_fn(move || {
            std::time::SystemTime::UNIX_EPOCH
                + Duration::from_secs(shared.epoch_at_start)
                + shared.started.elapsed()
        })
    }

    /// The wall-clock epoch seconds the server considers "now" (its start is 1 700 000 000).
    pub fn epoch_now(&self) -> u64 {
        self.shared.epoch_at_start + self.shared.started.elapsed().as_secs()
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(v.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    res
}

fn issue(s: &Shared) -> (String, u64) {
    let n = s.fetches.load(SeqCst);
    let token = format!("mock-token-{n}");
    s.registry
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token.clone(), Instant::now() + s.lifetime);
    (token, s.lifetime.as_secs())
}

async fn answer(
    s: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    s.fetches.fetch_add(1, SeqCst);
    if s.failing.load(SeqCst) {
        return Ok(json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "temporarily_unavailable"}),
        ));
    }
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if path.ends_with("/oauth2/v2.0/token") && req.method() == http::Method::POST {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let form: HashMap<String, String> = String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), decode(v)))
            .collect();
        let ok = form.get("client_id") == Some(&s.client_id)
            && form.get("client_secret") == Some(&s.client_secret)
            && form.get("grant_type").map(String::as_str) == Some("client_credentials")
            && form.get("scope").is_some_and(|v| v.ends_with("/.default"));
        if !ok {
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client"}),
            ));
        }
        let (token, secs) = issue(&s);
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({
                "token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": token
            }),
        ));
    }
    if path == "/metadata/identity/oauth2/token" {
        if header("metadata") != "true" {
            return Ok(json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_request"}),
            ));
        }
        let pending = s.imds_throttle.load(SeqCst);
        if pending > 0 {
            s.imds_throttle.store(pending - 1, SeqCst);
            return Ok(json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": "too_many_requests"}),
            ));
        }
        let (token, secs) = issue(&s);
        let now = s.epoch_at_start + s.started.elapsed().as_secs();
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": token, "expires_in": secs.to_string(),
                "expires_on": (now + secs).to_string(), "resource": "https://cognitiveservices.azure.com/",
                "token_type": "Bearer"
            }),
        ));
    }
    if path == "/msi/token" {
        if header("x-identity-header") != s.identity_header {
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "unauthorized"}),
            ));
        }
        let (token, secs) = issue(&s);
        let now = s.epoch_at_start + s.started.elapsed().as_secs();
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": token, "expires_on": (now + secs).to_string(),
                "resource": "https://cognitiveservices.azure.com/", "token_type": "Bearer"
            }),
        ));
    }
    Ok(json(
        StatusCode::NOT_FOUND,
        serde_json::json!({"error": "not_found"}),
    ))
}

fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
