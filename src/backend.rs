//! [`Backend`]: one endpoint's description. Plain data, no I/O.

use std::fmt;
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use crate::credential::Credential;
use crate::error::InvalidConfig;
use crate::provider::Provider;
use crate::state::BackendState;

/// One endpoint of an LLM API: a name, a base URL, a provider, a priority tier, a weight, an
/// optional credential, and its [`BackendState`].
///
/// Cheap to clone; clones share the same state.
///
/// ```
/// use tower_llm_lb::{Backend, auth::Credential};
///
/// let ptu = Backend::azure("ptu-eastus", "https://my-ptu.openai.azure.com", "gpt-4o", "2024-10-21")
///     .priority(0)
///     .credential(Credential::api_key("key-1")?)
///     .build()?;
/// let paygo = Backend::openai("openai", "https://api.openai.com/v1")
///     .priority(1)
///     .weight(0.5)
///     .build()?;
/// assert_eq!(ptu.name(), "ptu-eastus");
/// assert_eq!(paygo.priority(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    base_path: Box<str>,
    provider: Provider,
    priority: u32,
    weight: f64,
    /// Whether the weight was set (a config's `weight`, [`BackendBuilder::weight`]): set
    /// weights are honoured exactly by the default pick, even equal ones.
    weight_set: bool,
    credential: Option<Credential>,
    state: BackendState,
    /// The target URI of each of [`COMMON_PATHS`], worked out once.
    routes: Box<[Option<Uri>]>,
    /// The models it serves (`None`: any).
    models: Option<Arc<[Box<str>]>>,
}

/// The caller paths whose target URI each backend works out once, so the request path only
/// clones it (when the request has no query and no deployment override).
const COMMON_PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/models",
];

fn routes(
    scheme: &Scheme,
    authority: &Authority,
    base_path: &str,
    provider: &Provider,
) -> Box<[Option<Uri>]> {
    COMMON_PATHS
        .iter()
        .map(|path| {
            let target = provider.target_path_for(base_path, path, None, None);
            Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query(target)
                .build()
                .ok()
        })
        .collect()
}

/// The error of a backend description that cannot be used: names the backend and the field.
fn invalid(name: &str, reason: impl fmt::Display) -> InvalidConfig {
    InvalidConfig::new(format!("backend {name:?}: {reason}"))
}

/// Builds a [`Backend`]; errors surface at [`BackendBuilder::build`].
#[derive(Debug)]
#[must_use]
pub struct BackendBuilder {
    name: String,
    url: String,
    provider: Result<Provider, String>,
    priority: u32,
    weight: f64,
    weight_set: bool,
    credential: Option<Credential>,
    state: Option<BackendState>,
    models: Option<Arc<[Box<str>]>>,
}

impl Backend {
    /// A backend speaking `provider` at `url` (the base URL its official SDK takes; see
    /// [`provider`](crate::provider)).
    pub fn builder(
        name: impl Into<String>,
        url: impl Into<String>,
        provider: Provider,
    ) -> BackendBuilder {
        BackendBuilder {
            name: name.into(),
            url: url.into(),
            provider: Ok(provider),
            priority: 0,
            weight: 1.0,
            weight_set: false,
            credential: None,
            state: None,
            models: None,
        }
    }

    /// An OpenAI or OpenAI-compatible backend; `url` is the API base, e.g. `https://api.openai.com/v1`.
    pub fn openai(name: impl Into<String>, url: impl Into<String>) -> BackendBuilder {
        Self::builder(name, url, Provider::OpenAi)
    }

    /// An Azure OpenAI deployment (classic URLs); `url` is the resource endpoint,
    /// e.g. `https://my-resource.openai.azure.com`.
    pub fn azure(
        name: impl Into<String>,
        url: impl Into<String>,
        deployment: &str,
        api_version: &str,
    ) -> BackendBuilder {
        let mut b = Self::builder(name, url, Provider::OpenAi);
        b.provider = Provider::azure(deployment, api_version).map_err(|e| e.to_string());
        b
    }

    /// An Anthropic backend; `url` is e.g. `https://api.anthropic.com`; `anthropic-version` is
    /// `2023-06-01`.
    pub fn anthropic(name: impl Into<String>, url: impl Into<String>) -> BackendBuilder {
        let mut b = Self::builder(name, url, Provider::OpenAi);
        b.provider = Provider::anthropic(crate::provider::DEFAULT_ANTHROPIC_VERSION)
            .map_err(|e| e.to_string());
        b
    }

    /// A gRPC server; `url` is where it listens, e.g. `http://10.0.0.7:50051` (plaintext HTTP/2:
    /// use [`client::grpc_client`](crate::client::grpc_client)).
    pub fn grpc(name: impl Into<String>, url: impl Into<String>) -> BackendBuilder {
        Self::builder(name, url, Provider::Grpc)
    }

    /// A copy of this backend description with another weight (and fresh state): for building
    /// the same endpoint into a canary split. Fails on a weight that is not finite and >= 0.
    pub fn with_weight(&self, weight: f64) -> Result<Backend, InvalidConfig> {
        self.with_tier(self.priority(), Some(weight))
    }

    /// A copy of this backend description with another priority tier and, when given, weight
    /// (and fresh state). Fails on a weight that is not finite and >= 0.
    pub fn with_tier(&self, priority: u32, weight: Option<f64>) -> Result<Backend, InvalidConfig> {
        let i = &self.inner;
        let weight_set = weight.is_some() || i.weight_set;
        let weight = weight.unwrap_or(i.weight);
        if !weight.is_finite() || weight < 0.0 {
            return Err(invalid(
                self.name(),
                format!("weight: must be a finite number >= 0, got {weight}"),
            ));
        }
        Ok(Backend {
            inner: Arc::new(Inner {
                name: i.name.clone(),
                scheme: i.scheme.clone(),
                authority: i.authority.clone(),
                host: i.host.clone(),
                base_path: i.base_path.clone(),
                provider: i.provider.clone(),
                priority,
                weight,
                weight_set,
                credential: i.credential.clone(),
                state: BackendState::new(),
                routes: i.routes.clone(),
                models: i.models.clone(),
            }),
        })
    }

    /// The same Azure endpoint serving another deployment of its resource, as a backend of its
    /// own named `{name}.{deployment}`: a quota scope. Azure's quota is per deployment, so the
    /// scope has its own cooldown, pace and quota hints (a 429 on `gpt-4-8k` does not hold back
    /// `gpt-4-32k` on the same resource), while connect errors and the circuit stay with the
    /// endpoint it shares. Fails for a backend that is not classic Azure, or a bad name.
    pub fn for_deployment(&self, deployment: &str) -> Result<Backend, InvalidConfig> {
        let err = |reason: String| invalid(self.name(), reason);
        let Provider::AzureOpenAi { api_version, .. } = self.provider() else {
            return Err(err(
                "deployment: only a classic Azure backend has deployments".into(),
            ));
        };
        let provider = Provider::azure(deployment, api_version)
            .map_err(|e| err(format!("deployment: {e}")))?;
        let i = &self.inner;
        let url = format!("{}://{}{}", i.scheme, i.authority, i.base_path);
        let mut builder = Backend::builder(format!("{}.{deployment}", i.name), url, provider)
            .priority(i.priority);
        builder.weight = i.weight;
        builder.weight_set = i.weight_set;
        if let Some(c) = &i.credential {
            builder = builder.credential(c.clone());
        }
        builder.models = i.models.clone();
        let scoped = builder.build()?;
        let mut inner = Arc::try_unwrap(scoped.inner).map_err(|_| err("internal".into()))?;
        inner.state = BackendState::scoped_under(&i.state);
        Ok(Backend {
            inner: Arc::new(inner),
        })
    }

    /// Whether it serves `model` (a backend that declares no models serves any).
    pub(crate) fn serves(&self, model: &str) -> bool {
        self.inner
            .models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| &**x == model))
    }

    /// The models it declared ([`BackendBuilder::models`]), if any.
    pub fn models(&self) -> Option<impl Iterator<Item = &str>> {
        self.inner.models.as_ref().map(|m| m.iter().map(|x| &**x))
    }

    /// The backend's name, unique within a stack.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The name as a shared string, cloned without allocating (as errors and
    /// [`Attempt`](crate::error::Attempt)s carry it; a metrics label, say).
    pub fn name_arc(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// The provider.
    pub fn provider(&self) -> &Provider {
        &self.inner.provider
    }

    /// The priority tier: lower is preferred.
    pub fn priority(&self) -> u32 {
        self.inner.priority
    }

    /// The relative weight within its tier; 0 receives nothing.
    pub fn weight(&self) -> f64 {
        self.inner.weight
    }

    /// Whether its weight was set rather than left at the default.
    pub(crate) fn weight_set(&self) -> bool {
        self.inner.weight_set
    }

    /// The credential, if it has one.
    pub fn credential(&self) -> Option<&Credential> {
        self.inner.credential.as_ref()
    }

    /// The shared live state.
    pub fn state(&self) -> &BackendState {
        &self.inner.state
    }

    /// The scheme requests are sent with.
    pub(crate) fn scheme(&self) -> &Scheme {
        &self.inner.scheme
    }

    /// The authority requests are sent to.
    pub fn authority(&self) -> &Authority {
        &self.inner.authority
    }

    /// The `Host` header value sent (the authority).
    pub(crate) fn host(&self) -> &HeaderValue {
        &self.inner.host
    }

    /// The base URL's path, without a trailing slash (may be empty).
    pub(crate) fn base_path(&self) -> &str {
        &self.inner.base_path
    }

    /// The target URI for a caller's `path` (no query, no deployment override), when it is one
    /// of the common operations worked out in advance.
    pub(crate) fn common_uri(&self, path: &str) -> Option<&Uri> {
        let i = COMMON_PATHS.iter().position(|p| *p == path)?;
        self.inner.routes[i].as_ref()
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.inner.name)
            .field(
                "url",
                &format_args!(
                    "{}://{}{}",
                    self.inner.scheme, self.inner.authority, self.inner.base_path
                ),
            )
            .field("provider", &self.inner.provider)
            .field("priority", &self.inner.priority)
            .field("weight", &self.inner.weight)
            .field("credential", &self.inner.credential)
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl BackendBuilder {
    /// Sets the priority tier (lower is preferred; default 0).
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the weight within the tier (default 1; 0 receives nothing; must be finite, >= 0).
    pub fn weight(mut self, weight: f64) -> Self {
        self.weight = weight;
        self.weight_set = true;
        self
    }

    /// Sets the credential.
    pub fn credential(mut self, credential: Credential) -> Self {
        self.credential = Some(credential);
        self
    }

    /// The models it serves, as callers name them in the request body's `model`: a `Balance`
    /// sends a request naming a model only to backends serving it (and one naming none, or
    /// with no JSON body, to any). Without this, a backend serves any model.
    pub fn models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.models = Some(
            models
                .into_iter()
                .map(|m| m.into().into_boxed_str())
                .collect(),
        );
        self
    }

    /// Uses `state` instead of a fresh one: a backend rebuilt on a config reload keeps its
    /// cooldown, pace, circuit and counters (take it from the running backend's
    /// [`Backend::state`]).
    pub fn state(mut self, state: BackendState) -> Self {
        self.state = Some(state);
        self
    }

    /// Validates and builds the backend.
    pub fn build(self) -> Result<Backend, InvalidConfig> {
        // Never echo a URL that may carry a password.
        let shown = if self.url.contains('@') {
            "<redacted>".to_string()
        } else {
            format!("{:?}", self.url)
        };
        let err = |reason: String| invalid(&self.name, reason);
        if !valid_name(&self.name) {
            return Err(err(
                "name: must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let provider = self.provider.clone().map_err(err)?;
        if !self.weight.is_finite() || self.weight < 0.0 {
            return Err(err(format!(
                "weight: must be a finite number >= 0, got {}",
                self.weight
            )));
        }
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| err(format!("url {shown}: {e}")))?;
        let scheme = uri
            .scheme()
            .filter(|s| *s == &Scheme::HTTP || *s == &Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| err(format!("url {shown}: must start with http:// or https://")))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| err(format!("url {shown}: has no host")))?;
        if authority.as_str().contains('@') {
            return Err(err(
                "url: must not carry user info; give credentials with .credential()".into(),
            ));
        }
        if uri.query().is_some() {
            return Err(err(format!("url {shown}: must not have a query")));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| err("url: host is not a valid Host header".into()))?;
        let base_path: Box<str> = uri.path().trim_end_matches('/').into();
        let routes = routes(&scheme, &authority, &base_path, &provider);
        Ok(Backend {
            inner: Arc::new(Inner {
                name: self.name.into(),
                scheme,
                authority,
                host,
                base_path,
                provider,
                priority: self.priority,
                weight: self.weight,
                weight_set: self.weight_set,
                credential: self.credential,
                state: self.state.unwrap_or_else(BackendState::new),
                routes,
                models: self.models,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_normalises() {
        let b = Backend::openai("vllm", "http://127.0.0.1:8000/v1/")
            .build()
            .unwrap();
        assert_eq!(b.base_path(), "/v1");
        assert_eq!(b.authority().as_str(), "127.0.0.1:8000");
        assert_eq!(b.host(), "127.0.0.1:8000");
        let a = Backend::azure("east", "https://r.openai.azure.com", "gpt-4o", "2024-10-21")
            .build()
            .unwrap();
        assert_eq!(a.base_path(), "");
        assert_eq!(a.provider().name(), "azure");
    }

    #[test]
    fn invalid_input_is_an_error_naming_the_field() {
        let cases = [
            (Backend::openai("", "http://x"), "name"),
            (Backend::openai("a b", "http://x"), "name"),
            (Backend::openai("a", "ftp://x"), "http:// or https://"),
            (Backend::openai("a", "ftp://u:pw@x"), "http:// or https://"),
            (Backend::openai("a", "not a url"), "url"),
            (Backend::openai("a", "/just/a/path"), "url"),
            (Backend::openai("a", "http://x?y=1"), "query"),
            (Backend::openai("a", "http://user:pw@x"), "user info"),
            (Backend::openai("a", "http://x").weight(-1.0), "weight"),
            (Backend::openai("a", "http://x").weight(f64::NAN), "weight"),
            (
                Backend::azure("a", "http://x", "bad/dep", "v"),
                "deployment",
            ),
        ];
        for (builder, field) in cases {
            let e = builder.build().unwrap_err().to_string();
            assert!(e.contains(field), "{e} should mention {field}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn debug_redacts_the_credential() {
        let b = Backend::openai("o", "https://api.openai.com/v1")
            .credential(Credential::bearer("sk-secret-123").unwrap())
            .build()
            .unwrap();
        let shown = format!("{b:?}");
        assert!(shown.contains("https://api.openai.com/v1"));
        assert!(!shown.contains("sk-secret"), "{shown}");
    }
}
