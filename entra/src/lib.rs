//! Entra ID (Azure AD) token sources for keyless Azure OpenAI: client credentials, managed
//! identity (VM / IMDS, App Service / Container Apps), the Azure CLI, and a chain that tries them
//! in order like `DefaultAzureCredential`.
//!
//! Each is a [`TokenSource`]: plug it in with [`Credential::token_source`](tower_llm_lb::auth::Credential::token_source)
//! (or share one [`TokenCache`](tower_llm_lb::auth::TokenCache) between backends of the same tenant), and
//! [`AuthInject`](tower_llm_lb::auth::AuthInject) sends `Authorization: Bearer <token>`, refreshed ahead of
//! expiry, one fetch in flight however many requests wait.
//!
//! Every endpoint URL is configurable, so tests run against a token server on loopback. Errors
//! name the source and say what went wrong; they never contain a secret or a token.
//!
//! **Which to choose**: in production on Azure, a managed identity (no secret to rotate); in CI or
//! off Azure, client credentials; on a developer machine, the Azure CLI; or [`ChainSource`] of
//! all three. If your program already uses the official `azure_identity` crate, pass its
//! credential through `AzureSdkCredential` (feature `azure-identity`) instead: one credential,
//! and every source it supports (workload identity included).
//!
//! ```
//! use tower_llm_lb::auth::Credential;
//! use tower_llm_lb_entra::ClientCredentials;
//!
//! # fn main() -> Result<(), tower_llm_lb::BoxError> {
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # let _guard = rt.enter();
//! let source = ClientCredentials::new("my-tenant-id", "my-client-id", "client-secret")?;
//! let credential = Credential::token_source(source);
//! # let _ = credential;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use tower_llm_lb::BoxError;
use tower_llm_lb::auth::{BoxFuture, Token, TokenSource};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::classify::WallClock;

mod secret;
use secret::Secret;

/// The scope of Azure OpenAI / Cognitive Services tokens.
const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// The resource (v1 endpoints) of Azure OpenAI / Cognitive Services tokens.
const COGNITIVE_SERVICES_RESOURCE: &str = "https://cognitiveservices.azure.com/";
/// The Microsoft identity platform.
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The VM instance metadata (IMDS) token endpoint.
const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// The HTTP client token sources use.
pub type TokenClient = BoxCloneSyncService<Request<ReplayBody>, Response<Incoming>, BoxError>;

fn default_client() -> TokenClient {
    #[cfg(feature = "rustls")]
    {
        if let Ok(c) =
            tower_llm_lb::client::https_client::<ReplayBody>(tower_llm_lb::client::Roots::WebPki)
        {
            return BoxCloneSyncService::new(c.map_err(BoxError::from));
        }
    }
    BoxCloneSyncService::new(
        tower_llm_lb::client::http_client::<ReplayBody>().map_err(BoxError::from),
    )
}

/// A token source failed. Says which and why; never contains a secret.
#[derive(Debug)]
pub struct FetchFailed {
    source_name: String,
    reason: String,
}

impl fmt::Display for FetchFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source_name, self.reason)
    }
}

impl std::error::Error for FetchFailed {}

fn fail(source: &str, reason: impl Into<String>) -> BoxError {
    Box::new(FetchFailed {
        source_name: source.to_string(),
        reason: reason.into(),
    })
}

/// Sends `req`; returns status and (bounded) body.
async fn send(
    client: &TokenClient,
    req: Request<ReplayBody>,
    name: &str,
) -> Result<(u16, Bytes), BoxError> {
    let res = client
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| fail(name, format!("token endpoint unreachable: {e}")))?;
    let status = res.status().as_u16();
    let limited = http_body_util::Limited::new(res.into_body(), 64 * 1024);
    let body = limited
        .collect()
        .await
        .map_err(|e| fail(name, format!("reading the token answer failed: {e}")))?
        .to_bytes();
    Ok((status, body))
}

/// A number that may come as a JSON number or a string (IMDS and App Service send strings).
#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    N(u64),
    S(String),
}

impl Num {
    fn get(&self) -> Option<u64> {
        match self {
            Num::N(n) => Some(*n),
            Num::S(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    #[serde(rename = "accessToken")]
    access_token_cli: Option<String>,
    expires_in: Option<Num>,
    expires_on: Option<Num>,
}

/// Turns a token answer into a [`Token`]: `expires_in` (seconds from now) preferred, else
/// `expires_on` (epoch seconds, resolved against the wall clock).
fn token_from(name: &str, body: &[u8], clock: &WallClock) -> Result<Token, BoxError> {
    let answer: TokenAnswer = serde_json::from_slice(body)
        .map_err(|_| fail(name, "token answer is not the expected JSON"))?;
    let token = answer
        .access_token
        .or(answer.access_token_cli)
        .ok_or_else(|| fail(name, "token answer has no access token"))?;
    let lifetime = if let Some(secs) = answer.expires_in.as_ref().and_then(Num::get) {
        Duration::from_secs(secs)
    } else if let Some(epoch) = answer.expires_on.as_ref().and_then(Num::get) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
        at.duration_since(clock.now()).unwrap_or(Duration::ZERO)
    } else {
        return Err(fail(name, "token answer says nothing of its expiry"));
    };
    if lifetime.is_zero() {
        return Err(fail(name, "token answer is already expired"));
    }
    Token::bearer(&token, lifetime)
        .map_err(|_| fail(name, "access token is not a valid header value"))
}

fn error_reason(status: u16, body: &[u8]) -> String {
    // Identity endpoints answer `{"error": "...", "error_description": "..."}`; keep the code.
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str().map(str::to_string)));
    match code {
        Some(c) => format!("token endpoint answered {status} ({c})"),
        None => format!("token endpoint answered {status}"),
    }
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Client credentials: a service principal's tenant, client id and secret, against the Microsoft
/// identity platform (`POST {authority}/{tenant}/oauth2/v2.0/token`).
#[derive(Clone)]
pub struct ClientCredentials {
    name: String,
    url: String,
    client_id: String,
    secret: Secret,
    scope: String,
    client: TokenClient,
    clock: WallClock,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("secret", &self.secret)
            .finish()
    }
}

fn plain_token(field: &str, v: &str) -> Result<(), BoxError> {
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!("{field}: must be non-empty letters, digits, '-', '_' or '.'").into());
    }
    Ok(())
}

impl ClientCredentials {
    /// For `tenant`, `client_id` and `client_secret`, scope `https://cognitiveservices.azure.com/.default`,
    /// against `https://login.microsoftonline.com`.
    pub fn new(tenant: &str, client_id: &str, client_secret: &str) -> Result<Self, BoxError> {
        plain_token("tenant", tenant)?;
        plain_token("client_id", client_id)?;
        Ok(ClientCredentials {
            name: format!("client-credentials({tenant})"),
            url: format!("{DEFAULT_AUTHORITY}/{tenant}/oauth2/v2.0/token"),
            client_id: client_id.into(),
            secret: Secret::new(client_secret)?,
            scope: COGNITIVE_SERVICES_SCOPE.into(),
            client: default_client(),
            clock: WallClock::default(),
        })
    }

    /// Another authority host (sovereign clouds, or a loopback test server), e.g.
    /// `http://127.0.0.1:9000`.
    pub fn authority(mut self, host: &str) -> Self {
        let tenant = self
            .name
            .trim_start_matches("client-credentials(")
            .trim_end_matches(')')
            .to_string();
        self.url = format!("{}/{tenant}/oauth2/v2.0/token", host.trim_end_matches('/'));
        self
    }

    /// Another scope.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = scope.into();
        self
    }

    /// The HTTP client to reach the endpoint with.
    pub fn client(mut self, client: TokenClient) -> Self {
        self.client = client;
        self
    }
}

impl TokenSource for ClientCredentials {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
        Box::pin(async move {
            let secret = std::str::from_utf8(self.secret.header_value().as_bytes())
                .map_err(|_| fail(&self.name, "client secret is not text"))?;
            let form = form_encode(&[
                ("client_id", &self.client_id),
                ("client_secret", secret),
                ("scope", &self.scope),
                ("grant_type", "client_credentials"),
            ]);
            let req = Request::post(&self.url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(ReplayBody::from(form))
                .map_err(|_| fail(&self.name, "token endpoint URL is invalid"))?;
            let (status, body) = send(&self.client, req, &self.name).await?;
            if status != 200 {
                return Err(fail(&self.name, error_reason(status, &body)));
            }
            token_from(&self.name, &body, &self.clock)
        })
    }
}

/// Which managed-identity endpoint to ask.
#[derive(Clone, Debug)]
enum MiKind {
    Imds,
    AppService { header: Secret },
}

/// A managed identity: the VM instance metadata endpoint (IMDS), or App Service / Container Apps
/// (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`). IMDS answers 404/410/429/5xx are retried with
/// backoff (1 s, 2 s, 4 s) before the fetch fails.
#[derive(Clone)]
pub struct ManagedIdentity {
    name: String,
    url: String,
    kind: MiKind,
    client_id: Option<String>,
    client: TokenClient,
    clock: WallClock,
}

impl fmt::Debug for ManagedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedIdentity")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl ManagedIdentity {
    /// The VM's identity via IMDS (`http://169.254.169.254/metadata/identity/oauth2/token`).
    pub fn imds() -> Self {
        ManagedIdentity {
            name: "managed-identity(imds)".into(),
            url: IMDS_ENDPOINT.into(),
            kind: MiKind::Imds,
            client_id: None,
            client: BoxCloneSyncService::new(
                tower_llm_lb::client::http_client::<ReplayBody>().map_err(BoxError::from),
            ),
            clock: WallClock::default(),
        }
    }

    /// App Service / Container Apps: the `IDENTITY_ENDPOINT` URL and the `IDENTITY_HEADER` secret.
    pub fn app_service(endpoint: &str, identity_header: &str) -> Result<Self, BoxError> {
        Ok(ManagedIdentity {
            name: "managed-identity(app-service)".into(),
            url: endpoint.into(),
            kind: MiKind::AppService {
                header: Secret::new(identity_header)?,
            },
            client_id: None,
            client: default_client(),
            clock: WallClock::default(),
        })
    }

    /// App Service / Container Apps from the `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`
    /// environment variables, if both are set.
    pub fn from_env() -> Option<Result<Self, BoxError>> {
        let endpoint = std::env::var("IDENTITY_ENDPOINT").ok()?;
        let header = std::env::var("IDENTITY_HEADER").ok()?;
        Some(Self::app_service(&endpoint, &header))
    }

    /// Another endpoint URL (a loopback test server).
    pub fn endpoint(mut self, url: &str) -> Self {
        self.url = url.into();
        self
    }

    /// A user-assigned identity's client id.
    pub fn client_id(mut self, id: &str) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// The HTTP client to reach the endpoint with (never a proxy).
    pub fn client(mut self, client: TokenClient) -> Self {
        self.client = client;
        self
    }

    /// The wall clock `expires_on` answers are resolved against (for tests).
    pub fn wall_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    fn request(&self) -> Result<Request<ReplayBody>, BoxError> {
        let (version, header) = match &self.kind {
            MiKind::Imds => ("2018-02-01", ("metadata", HeaderVal::Plain("true"))),
            MiKind::AppService { header } => (
                "2019-08-01",
                ("x-identity-header", HeaderVal::Secret(header)),
            ),
        };
        let mut query = vec![
            ("api-version", version),
            ("resource", COGNITIVE_SERVICES_RESOURCE),
        ];
        if let Some(id) = &self.client_id {
            query.push(("client_id", id));
        }
        let url = format!("{}?{}", self.url, form_encode(&query));
        let mut req = Request::get(url)
            .body(ReplayBody::default())
            .map_err(|_| fail(&self.name, "identity endpoint URL is invalid"))?;
        let value = match header.1 {
            HeaderVal::Plain(v) => http::HeaderValue::from_static(v),
            HeaderVal::Secret(s) => s.header_value().clone(),
        };
        req.headers_mut().insert(header.0, value);
        Ok(req)
    }
}

enum HeaderVal<'a> {
    Plain(&'static str),
    Secret(&'a Secret),
}

impl TokenSource for ManagedIdentity {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
        Box::pin(async move {
            let retryable = |s: u16| matches!(s, 404 | 410 | 429 | 500..=599);
            let mut delay = Duration::from_secs(1);
            let mut tries = 0;
            loop {
                tries += 1;
                let (status, body) = send(&self.client, self.request()?, &self.name).await?;
                if status == 200 {
                    return token_from(&self.name, &body, &self.clock);
                }
                if !retryable(status)
                    || tries >= 4
                    || matches!(self.kind, MiKind::AppService { .. })
                {
                    return Err(fail(&self.name, error_reason(status, &body)));
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        })
    }
}

/// The developer's `az login`: runs `az account get-access-token` (the command is
/// configurable, for tests and unusual installs).
#[derive(Clone, Debug)]
pub struct AzureCli {
    program: String,
    clock: WallClock,
}

impl Default for AzureCli {
    fn default() -> Self {
        Self::new()
    }
}

impl AzureCli {
    /// Runs `az`.
    pub fn new() -> Self {
        AzureCli {
            program: "az".into(),
            clock: WallClock::default(),
        }
    }

    /// Runs another program with the same arguments.
    pub fn program(mut self, program: &str) -> Self {
        self.program = program.into();
        self
    }
}

impl TokenSource for AzureCli {
    fn name(&self) -> &str {
        "azure-cli"
    }

    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
        Box::pin(async move {
            let output = tokio::process::Command::new(&self.program)
                .args([
                    "account",
                    "get-access-token",
                    "--resource",
                    COGNITIVE_SERVICES_RESOURCE.trim_end_matches('/'),
                    "--output",
                    "json",
                ])
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| fail("azure-cli", format!("could not run {}: {e}", self.program)))?;
            if !output.status.success() {
                return Err(fail(
                    "azure-cli",
                    format!(
                        "{} exited with {} (run `az login`?)",
                        self.program, output.status
                    ),
                ));
            }
            token_from("azure-cli", &output.stdout, &self.clock)
        })
    }
}

/// Tries sources in order, like `DefaultAzureCredential`; the first that answers is used from
/// then on. Fails with every source's reason when none answers.
pub struct ChainSource {
    sources: Vec<Arc<dyn TokenSource>>,
    working: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for ChainSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.sources.iter().map(|s| s.name()))
            .finish()
    }
}

impl ChainSource {
    /// A chain of `sources`, tried in order.
    pub fn new(sources: Vec<Arc<dyn TokenSource>>) -> Self {
        ChainSource {
            sources,
            working: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }
}

impl TokenSource for ChainSource {
    fn name(&self) -> &str {
        "chain"
    }

    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
        use std::sync::atomic::Ordering::Relaxed;
        Box::pin(async move {
            let known = self.working.load(Relaxed);
            if let Some(source) = self.sources.get(known) {
                return source.fetch().await;
            }
            let mut reasons = Vec::new();
            for (i, s) in self.sources.iter().enumerate() {
                match s.fetch().await {
                    Ok(t) => {
                        self.working.store(i, Relaxed);
                        return Ok(t);
                    }
                    Err(e) => {
                        let e = e.to_string();
                        // Our sources already start their reasons with their name.
                        if e.starts_with(s.name()) {
                            reasons.push(e);
                        } else {
                            reasons.push(format!("{}: {e}", s.name()));
                        }
                    }
                }
            }
            if reasons.is_empty() {
                return Err(fail("chain", "no sources"));
            }
            Err(fail("chain", reasons.join("; ")))
        })
    }
}

/// The official Azure SDK's credentials (feature `azure-identity`): any
/// `azure_core::credentials::TokenCredential` (e.g. `azure_identity::DefaultAzureCredential`,
/// `ManagedIdentityCredential`, `ClientSecretCredential`) as a [`TokenSource`].
///
/// Prefer this when your program already uses `azure_identity` (one credential, one set of
/// settings, workload identity and the other sources it supports); the sources in this module
/// need no extra dependency and are the choice otherwise.
#[cfg(feature = "azure-identity")]
#[derive(Debug)]
pub struct AzureSdkCredential {
    name: String,
    credential: Arc<dyn azure_core::credentials::TokenCredential>,
    scope: String,
}

#[cfg(feature = "azure-identity")]
impl AzureSdkCredential {
    /// Adapts `credential`, asking for the scope `https://cognitiveservices.azure.com/.default`.
    pub fn new(credential: Arc<dyn azure_core::credentials::TokenCredential>) -> Self {
        AzureSdkCredential {
            name: "azure-sdk-credential".into(),
            credential,
            scope: COGNITIVE_SERVICES_SCOPE.into(),
        }
    }

    /// Another scope.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = scope.into();
        self
    }
}

#[cfg(feature = "azure-identity")]
impl TokenSource for AzureSdkCredential {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
        Box::pin(async move {
            let token = self
                .credential
                .get_token(&[self.scope.as_str()], None)
                .await
                .map_err(|e| fail(&self.name, format!("credential failed: {}", e.kind())))?;
            let now = time::OffsetDateTime::now_utc();
            let left = token.expires_on - now;
            let lifetime = Duration::try_from(left).unwrap_or(Duration::ZERO);
            if lifetime.is_zero() {
                return Err(fail(&self.name, "credential returned an expired token"));
            }
            Token::bearer(token.token.secret(), lifetime)
                .map_err(|_| fail(&self.name, "access token is not a valid header value"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_answers_in_every_shape() {
        let clock = WallClock::from_fn(move || SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
        let t = token_from(
            "t",
            br#"{"access_token":"a","token_type":"Bearer","expires_in":3599}"#,
            &clock,
        )
        .unwrap();
        assert_eq!(
            t.expires_at() - tokio::time::Instant::now(),
            Duration::from_secs(3599)
        );
        let t = token_from(
            "t",
            br#"{"access_token":"a","expires_in":"60","expires_on":"99999"}"#,
            &clock,
        )
        .unwrap();
        assert_eq!(
            t.expires_at() - tokio::time::Instant::now(),
            Duration::from_secs(60)
        );
        let t = token_from("t", br#"{"access_token":"a","expires_on":1300}"#, &clock).unwrap();
        assert_eq!(
            t.expires_at() - tokio::time::Instant::now(),
            Duration::from_secs(300)
        );
        let t = token_from(
            "t",
            br#"{"accessToken":"a","expires_on":1060,"tokenType":"Bearer"}"#,
            &clock,
        )
        .unwrap();
        assert_eq!(
            t.expires_at() - tokio::time::Instant::now(),
            Duration::from_secs(60)
        );
        for bad in [
            &br#"{"expires_in":5}"#[..],
            br#"{"access_token":"a"}"#,
            br#"{"access_token":"a","expires_on":10}"#,
            b"<html>",
        ] {
            let e = token_from("t", bad, &clock).unwrap_err();
            assert!(e.to_string().starts_with("t: "), "{e}");
        }
    }

    #[test]
    fn form_encoding_and_validation() {
        assert_eq!(
            form_encode(&[("a b", "x&y=z"), ("s", "https://c.com/.default")]),
            "a%20b=x%26y%3Dz&s=https%3A%2F%2Fc.com%2F.default"
        );
        assert!(ClientCredentials::new("t/../x", "c", "s").is_err());
        assert!(ClientCredentials::new("t", "c", "bad\nsecret").is_err());
        let c = ClientCredentials::new("tenant-1", "client-1", "sekret-value").unwrap();
        assert!(!format!("{c:?}").contains("sekret"));
    }
}
