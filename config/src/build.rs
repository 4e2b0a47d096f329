//! The one validating step from [`Config`] to a running stack.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tower::ServiceBuilder;
use tower_service::Service;

use super::{
    Algorithm, BackendConfig, Config, EntraConfig, Mode, ProviderKind, StrategyConfig, TargetConfig,
};
use std::sync::Arc;
use tower_llm_lb::auth::{Credential, TokenCache, TokenSource};
use tower_llm_lb::backend::Backend;
use tower_llm_lb::balance::{Balance, Strategy};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::Policy;
use tower_llm_lb::error::BoxError;
use tower_llm_lb::error::InvalidConfig;
use tower_llm_lb::fallback::BoxTarget;
use tower_llm_lb::fallback::{Fallback, Overrides};
use tower_llm_lb::provider::{DEFAULT_ANTHROPIC_VERSION, DEFAULT_AZURE_API_VERSION, Provider};
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::stack::{self, LlmService, Settings, StackOver};
use tower_llm_lb::timeout::AttemptTimeoutLayer;
use tower_llm_lb_entra::{AzureCli, ChainSource, ClientCredentials, ManagedIdentity};

/// A configuration that cannot be used: the path of the bad field and why. Never contains a
/// secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    path: String,
    message: String,
}

impl ConfigError {
    pub(crate) fn new(path: String, message: String) -> Self {
        ConfigError { path, message }
    }

    /// The path of the bad field (`targets[1].weight`), or empty for the whole document.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(path: &str, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::new(path.to_string(), message.into()))
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

struct Ctx<'a, C, ResB> {
    _body: std::marker::PhantomData<fn() -> ResB>,
    config: &'a Config,
    client: C,
    settings: Settings,
    backends: BTreeMap<String, Backend>,
    deadline: Option<Duration>,
    /// Every backend the built stack sends to, for stats pages.
    used: Vec<Backend>,
    /// Backends of a stack this one replaces: a backend of the same name, URL and provider
    /// keeps its state (cooldown, pace, circuit, counters).
    previous: &'a [Backend],
    /// Token caches by identity.
    caches: Caches,
}

impl Config {
    /// Validates the whole configuration and builds the stack over `client` (any hyper-util
    /// client, e.g. [`client::https_client`](tower_llm_lb::client)).
    pub fn build<C>(&self, client: C) -> Result<LlmService, ConfigError>
    where
        C: Service<Request<ReplayBody>, Response = Response<Incoming>>
            + Clone
            + Send
            + Sync
            + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
    {
        self.build_with_backends(client).map(|(svc, _)| svc)
    }

    /// Like [`Config::build`], also returning every backend the stack sends to (their
    /// [`BackendState`](tower_llm_lb::BackendState)s feed stats pages), each once.
    pub fn build_with_backends<C>(
        &self,
        client: C,
    ) -> Result<(LlmService, Vec<Backend>), ConfigError>
    where
        C: Service<Request<ReplayBody>, Response = Response<Incoming>>
            + Clone
            + Send
            + Sync
            + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
    {
        self.build_over(client)
    }

    /// Like [`Config::build_with_backends`], for a config that replaces a running one (a
    /// reload): each backend with the same name, URL and provider as one of `previous` keeps
    /// that backend's state, so its cooldown, pace, circuit and counters carry over and a
    /// backend that asked to be left alone is not asked again at once.
    pub fn build_reusing<C>(
        &self,
        client: C,
        previous: &[Backend],
    ) -> Result<(LlmService, Vec<Backend>), ConfigError>
    where
        C: Service<Request<ReplayBody>, Response = Response<Incoming>>
            + Clone
            + Send
            + Sync
            + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
    {
        self.build_inner(client, previous)
    }

    /// Like [`Config::build_with_backends`], over any client whose response body streams
    /// `Bytes`: a client with its own connector, or already wrapped in layers that change the
    /// body type (decompression, tracing, a `MapResponse`).
    pub fn build_over<C, ResB>(
        &self,
        client: C,
    ) -> Result<(StackOver<ResB>, Vec<Backend>), ConfigError>
    where
        C: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
        ResB: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        self.build_inner(client, &[])
    }

    fn build_inner<C, ResB>(
        &self,
        client: C,
        previous: &[Backend],
    ) -> Result<(StackOver<ResB>, Vec<Backend>), ConfigError>
    where
        C: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send + 'static,
        ResB: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let mut ctx = Ctx {
            _body: std::marker::PhantomData,
            used: Vec::new(),
            previous,
            caches: Caches::new(),
            config: self,
            client,
            settings: settings(self)?,
            backends: BTreeMap::new(),
            deadline: self.request_timeout.map(ms),
        };
        for (name, b) in &self.backends {
            let path = format!("backends.{name}");
            let backend = carrying(&path, name, b, &mut ctx.caches, previous)?;
            ctx.backends.insert(name.clone(), backend);
        }
        if !self.models.is_empty() {
            if !self.targets.is_empty() {
                return err(
                    "models",
                    "routes by model in place of `targets`: use one of them",
                );
            }
            if self.strategy.is_some() {
                return err(
                    "strategy",
                    "with `models`, each model's target has its own strategy",
                );
            }
            let mut routes = BTreeMap::new();
            let mut by_backend = BTreeMap::new();
            for (i, (model, t)) in self.models.iter().enumerate() {
                let path = format!("models.{model}");
                if model.trim().is_empty() {
                    return err(&path, "a model name must not be empty");
                }
                let named = TargetConfig {
                    name: t.name.clone().or_else(|| Some(model.clone())),
                    ..t.clone()
                };
                let before = ctx.used.len();
                let target = ctx.with_overrides(&path, &named, i)?;
                for b in &ctx.used[before..] {
                    by_backend
                        .entry(b.name().to_string())
                        .or_insert_with(|| target.clone());
                }
                routes.insert(model.clone(), target);
            }
            let svc = BoxTarget::new(ModelRouter {
                routes: Arc::new(routes),
                by_backend: Arc::new(by_backend),
            });
            return Ok((svc, each_once(ctx.used)));
        }
        let root = TargetConfig {
            name: Some("root".into()),
            strategy: self.strategy.clone(),
            targets: if self.targets.is_empty() {
                self.backends
                    .keys()
                    .map(|n| TargetConfig {
                        backend: Some(n.clone()),
                        ..TargetConfig::default()
                    })
                    .collect()
            } else {
                self.targets.clone()
            },
            ..TargetConfig::default()
        };
        if root.targets.is_empty() {
            return err("targets", "no targets and no backends to balance over");
        }
        let root = if self.targets.is_empty() && self.strategy.is_none() {
            TargetConfig {
                strategy: Some(StrategyConfig {
                    mode: Mode::Loadbalance,
                    on_status_codes: Vec::new(),
                    algorithm: None,
                }),
                ..root
            }
        } else {
            root
        };
        let svc = ctx.node("", &root, None)?;
        Ok((svc, each_once(ctx.used)))
    }
}

/// A target's `override_params` as [`Overrides`].
fn overrides(params: &serde_json::Map<String, serde_json::Value>) -> Overrides {
    params.iter().fold(Overrides::default(), |o, (k, v)| {
        o.set(k.clone(), v.clone())
    })
}

/// Every backend a stack sends to, each once, by name.
fn each_once(mut used: Vec<Backend>) -> Vec<Backend> {
    used.sort_by(|a, b| a.name().cmp(b.name()));
    used.dedup_by(|a, b| a.state().ptr_eq(b.state()));
    used
}

/// Sends each request to the target its `model` names (config `models`); a request without a
/// model that is [`Pinned`](tower_llm_lb::balance::Pinned) to a backend (`GET /v1/responses/{id}`),
/// to the first model's target holding that backend; a model not listed, or none, is
/// [`NotServed`](tower_llm_lb::error::NotServed), nothing sent.
struct ModelRouter<B> {
    routes: Arc<BTreeMap<String, BoxTarget<B>>>,
    by_backend: Arc<BTreeMap<String, BoxTarget<B>>>,
}

impl<B> Clone for ModelRouter<B> {
    fn clone(&self) -> Self {
        ModelRouter {
            routes: self.routes.clone(),
            by_backend: self.by_backend.clone(),
        }
    }
}

impl<B: Send + 'static> Service<Request<ReplayBody>> for ModelRouter<B> {
    type Response = Response<B>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<B>, BoxError>> + Send>>;

    /// Always ready: each model's target is driven ready inside its call.
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        let model = tower_llm_lb::provider::model_of(req.body().bytes());
        let pinned = || {
            let p = req.extensions().get::<tower_llm_lb::balance::Pinned>()?;
            self.by_backend.get(&*p.0)
        };
        let target = match model {
            Some(m) => self.routes.get(m),
            None => pinned(),
        };
        match target {
            Some(target) => target.clone().call(req),
            None => {
                let refused = tower_llm_lb::error::NotServed::for_model("models", model);
                Box::pin(async move { Err(refused.into()) })
            }
        }
    }
}

fn settings(config: &Config) -> Result<Settings, ConfigError> {
    let mut s = Settings::default();
    if let Some(t) = &config.translation {
        let d = tower_llm_lb::translate::Options::default();
        if t.default_max_tokens == Some(0) {
            return err("translation.default_max_tokens", "must be at least 1");
        }
        s.translation = tower_llm_lb::translate::Options {
            default_max_tokens: t.default_max_tokens.unwrap_or(d.default_max_tokens),
            drop_unsupported: t.drop_unsupported.unwrap_or(d.drop_unsupported),
        };
    }
    if let Some(b) = &config.circuit_breaker {
        let d = Policy::default();
        s.breaker = Policy {
            consecutive_failures: b.consecutive_failures.unwrap_or(d.consecutive_failures),
            failure_rate: b.failure_rate.unwrap_or(d.failure_rate),
            window: b.window_ms.map_or(d.window, ms),
            min_calls: b.min_calls.unwrap_or(d.min_calls),
            base_open: b.base_open_ms.map_or(d.base_open, ms),
            // A first open period set longer than the default longest: it is the longest.
            max_open: b.max_open_ms.map_or_else(
                || d.max_open.max(b.base_open_ms.map_or(d.base_open, ms)),
                ms,
            ),
            growth: b.open_growth.unwrap_or(d.growth),
            probes: b.probes.unwrap_or(d.probes),
            ..d
        };
        if let Err(e) = s.breaker.validate() {
            return err("circuit_breaker", e);
        }
        if let Some(m) = b.max_ejection {
            if !(0.0..=1.0).contains(&m) {
                return err("circuit_breaker.max_ejection", "must be between 0 and 1");
            }
            s.max_ejection = m;
        }
    }
    if let Some(t) = &config.timeouts {
        let mut l = AttemptTimeoutLayer::default();
        for (field, v) in [
            ("first_byte_ms", t.first_byte_ms),
            ("idle_ms", t.idle_ms),
            ("total_ms", t.total_ms),
        ] {
            if v == Some(0) {
                return err(&format!("timeouts.{field}"), "must be > 0");
            }
        }
        if let Some(v) = t.first_byte_ms {
            l.first_byte = Some(ms(v));
        }
        if let Some(v) = t.idle_ms {
            l.idle = Some(ms(v));
        }
        if let Some(v) = t.total_ms {
            l.total = Some(ms(v));
        }
        s.timeouts = l;
        if let Some(v) = t.silence_ms {
            s.silence = (v > 0).then(|| ms(v));
        }
    }
    if config.request_timeout == Some(0) {
        return err("request_timeout", "must be > 0");
    }
    if let Some(h) = &config.health_check {
        s.health = Some(health_probe("health_check", h)?);
    }
    for (name, b) in &config.backends {
        if let Some(h) = &b.health_check {
            let probe = health_probe(&format!("backends.{name}.health_check"), h)?;
            s.health_for.insert(name.clone(), probe);
        }
    }
    s.retry = retry_layer("retry", config.retry.as_ref(), config.request_timeout)?;
    s.standing_line = standing_line("retry", config.retry.as_ref(), s.standing_line)?;
    Ok(s)
}

/// The standing line of a group from its `retry` section at `path` (see
/// [`StandingLine`](tower_llm_lb::balance::StandingLine)), `base` where it sets nothing.
fn standing_line(
    path: &str,
    retry: Option<&super::RetryConfig>,
    base: Option<tower_llm_lb::balance::StandingLine>,
) -> Result<Option<tower_llm_lb::balance::StandingLine>, ConfigError> {
    let Some(r) = retry else { return Ok(base) };
    if r.line_interval_ms == Some(0) {
        return err(&format!("{path}.line_interval_ms"), "must be > 0");
    }
    if r.line_target_ms == Some(0) {
        return Ok(None);
    }
    if r.line_target_ms.is_none() && r.line_interval_ms.is_none() {
        return Ok(base);
    }
    let mut limit = base.unwrap_or_default();
    if let Some(t) = r.line_target_ms {
        limit.target = ms(t);
    }
    if let Some(i) = r.line_interval_ms {
        limit.interval = ms(i);
    }
    Ok(Some(limit))
}

/// A validated health probe from its config at `path`.
fn health_probe(
    path: &str,
    h: &super::HealthCheckConfig,
) -> Result<tower_llm_lb::circuit_breaker::HealthProbe, ConfigError> {
    let d = tower_llm_lb::circuit_breaker::HealthProbe::default();
    let Some(probe_path) = &h.path else {
        return err(&format!("{path}.path"), "missing");
    };
    if !probe_path.starts_with('/') || probe_path.parse::<http::Uri>().is_err() {
        return err(&format!("{path}.path"), "must be a path starting with '/'");
    }
    for (field, v) in [("interval_ms", h.interval_ms), ("timeout_ms", h.timeout_ms)] {
        if v == Some(0) {
            return err(&format!("{path}.{field}"), "must be > 0");
        }
    }
    let healthy = match h.healthy_statuses {
        Some([lo, hi]) if lo <= hi && (100..=599).contains(&lo) && hi <= 599 => lo..=hi,
        Some(_) => {
            return err(
                &format!("{path}.healthy_statuses"),
                "must be [lowest, highest], statuses from 100 to 599",
            );
        }
        None => d.healthy.clone(),
    };
    Ok(tower_llm_lb::circuit_breaker::HealthProbe {
        path: probe_path.clone(),
        interval: h.interval_ms.map_or(d.interval, ms),
        timeout: h.timeout_ms.map_or(d.timeout, ms),
        healthy,
        unhealthy_threshold: h
            .unhealthy_threshold
            .unwrap_or(d.unhealthy_threshold)
            .max(1),
        healthy_threshold: h.healthy_threshold.unwrap_or(d.healthy_threshold).max(1),
        protocol: Default::default(),
    })
}

fn retry_layer(
    path: &str,
    retry: Option<&super::RetryConfig>,
    request_timeout: Option<u64>,
) -> Result<RetryAfter429Layer, ConfigError> {
    let mut layer = RetryAfter429Layer::default();
    if let Some(t) = request_timeout {
        layer.deadline = Some(ms(t));
    }
    let Some(r) = retry else { return Ok(layer) };
    if let Some(a) = r.attempts {
        if a == 0 {
            return err(&format!("{path}.attempts"), "must be >= 1");
        }
        layer.max_attempts = a as usize;
    }
    if let Some(w) = r.max_wait_ms {
        layer.max_wait = ms(w);
    }
    if let Some(yes) = r.failures {
        layer.retry_failures = yes;
    }
    if let Some(yes) = r.should_retry_header {
        layer.should_retry_header = yes;
    }
    if let Some(h) = r.hedge_after_ms {
        if h == 0 {
            return err(&format!("{path}.hedge_after_ms"), "must be > 0");
        }
        layer.hedge = Some(ms(h));
    }
    for (i, code) in r.on_status_codes.iter().enumerate() {
        let Ok(status) = StatusCode::from_u16(*code) else {
            return err(
                &format!("{path}.on_status_codes[{i}]"),
                "not an HTTP status",
            );
        };
        if status.is_server_error() {
            layer.retry_failures = true;
        } else if status != StatusCode::TOO_MANY_REQUESTS {
            return err(
                &format!("{path}.on_status_codes[{i}]"),
                "only 429 and 5xx can be retried (a client error is never retried)",
            );
        }
    }
    Ok(layer)
}

/// [`backend_from`], keeping the state of the backend of `previous` with the same name, URL and
/// provider (a reload).
fn carrying(
    path: &str,
    name: &str,
    b: &BackendConfig,
    caches: &mut Caches,
    previous: &[Backend],
) -> Result<Backend, ConfigError> {
    let backend = backend_from(path, name, b, caches, None)?;
    match previous.iter().find(|p| {
        p.name() == backend.name()
            && p.authority() == backend.authority()
            && p.provider() == backend.provider()
    }) {
        Some(prev) => backend_from(path, name, b, caches, Some(prev.state().clone())),
        None => Ok(backend),
    }
}

fn backend_from(
    path: &str,
    name: &str,
    b: &BackendConfig,
    caches: &mut Caches,
    state: Option<tower_llm_lb::BackendState>,
) -> Result<Backend, ConfigError> {
    let Some(kind) = b.provider else {
        return err(
            &format!("{path}.provider"),
            "missing (openai, azure, azure-v1, anthropic)",
        );
    };
    let Some(url) = &b.url else {
        return err(&format!("{path}.url"), "missing");
    };
    let provider = match kind {
        ProviderKind::Openai => Provider::OpenAi,
        ProviderKind::AzureV1 => Provider::AzureOpenAiV1,
        ProviderKind::Azure => {
            let Some(dep) = &b.deployment else {
                return err(
                    &format!("{path}.deployment"),
                    "missing (azure needs a deployment)",
                );
            };
            let version = b
                .api_version
                .as_deref()
                .unwrap_or(DEFAULT_AZURE_API_VERSION);
            Provider::azure(dep, version)
                .map_err(|e| ConfigError::new(format!("{path}.deployment"), e.to_string()))?
        }
        ProviderKind::Anthropic => {
            let v = b
                .anthropic_version
                .as_deref()
                .unwrap_or(DEFAULT_ANTHROPIC_VERSION);
            Provider::anthropic(v)
                .map_err(|e| ConfigError::new(format!("{path}.anthropic_version"), e.to_string()))?
        }
    };
    // The header each provider reads its key from.
    let credential_of: fn(&str) -> Result<Credential, InvalidConfig> = match kind {
        ProviderKind::Openai => Credential::bearer,
        ProviderKind::Azure | ProviderKind::AzureV1 => Credential::api_key,
        ProviderKind::Anthropic => Credential::x_api_key,
    };
    let credential =
        match (&b.api_key, &b.api_key_env, &b.entra) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return err(&format!("{path}.entra"), "give a key or entra, not both");
            }
            (None, None, Some(entra)) => Some(Credential::token_cache(token_cache(
                &format!("{path}.entra"),
                entra,
                caches,
            )?)),
            (Some(_), Some(_), None) => {
                return err(
                    &format!("{path}.api_key"),
                    "give api_key or api_key_env, not both",
                );
            }
            (Some(k), None, None) => Some(
                credential_of(k)
                    .map_err(|e| ConfigError::new(format!("{path}.api_key"), e.to_string()))?,
            ),
            (None, Some(var), None) => {
                // Read once, now; the message names the variable, never its value.
                let at = || format!("{path}.api_key_env");
                let value = std::env::var(var).map_err(|e| {
                ConfigError::new(
                    at(),
                    match e {
                        std::env::VarError::NotPresent => {
                            format!("invalid credential: environment variable {var} is not set")
                        }
                        std::env::VarError::NotUnicode(_) => format!(
                            "invalid credential: environment variable {var} is not valid unicode"
                        ),
                    },
                )
            })?;
                Some(credential_of(&value).map_err(|e| {
                    ConfigError::new(at(), format!("environment variable {var}: {e}"))
                })?)
            }
            (None, None, None) => None,
        };
    let mut builder =
        Backend::builder(name, url.clone(), provider).priority(b.priority.unwrap_or(0));
    if let Some(w) = b.weight {
        builder = builder.weight(w);
    }
    if let Some(c) = credential {
        builder = builder.credential(c);
    }
    if let Some(state) = state {
        builder = builder.state(state);
    }
    if let Some(models) = &b.models {
        if models.is_empty() || models.iter().any(|m| m.trim().is_empty()) {
            return err(
                &format!("{path}.models"),
                "must list at least one model, none empty",
            );
        }
        builder = builder.models(models.iter().cloned());
    }
    builder.build().map_err(|e| {
        // The backend's own message names its field after the backend's name.
        let msg = e.to_string();
        let field = msg
            .split_once(": ")
            .map_or(msg.as_str(), |(_, rest)| rest)
            .to_string();
        ConfigError::new(path.to_string(), field)
    })
}

/// Token caches by identity, so backends of one identity share one token.
type Caches = BTreeMap<String, TokenCache>;

fn token_cache(
    path: &str,
    entra: &EntraConfig,
    caches: &mut Caches,
) -> Result<TokenCache, ConfigError> {
    let key = format!("{entra:?}");
    if let Some(c) = caches.get(&key) {
        return Ok(c.clone());
    }
    let bad = |e: BoxError| ConfigError::new(path.to_string(), e.to_string());
    let source: Arc<dyn TokenSource> = match entra {
        EntraConfig::ClientCredentials {
            tenant,
            client_id,
            client_secret_env,
            authority,
        } => {
            let secret = std::env::var(client_secret_env).map_err(|_| {
                ConfigError::new(
                    format!("{path}.client_secret_env"),
                    format!("environment variable {client_secret_env} is not set"),
                )
            })?;
            let mut c = ClientCredentials::new(tenant, client_id, &secret).map_err(bad)?;
            if let Some(a) = authority {
                c = c.authority(a);
            }
            Arc::new(c)
        }
        EntraConfig::ManagedIdentity {
            client_id,
            endpoint,
        } => {
            let mut mi = match ManagedIdentity::from_env() {
                Some(r) => r.map_err(bad)?,
                None => ManagedIdentity::imds(),
            };
            if let Some(e) = endpoint {
                mi = mi.endpoint(e);
            }
            if let Some(id) = client_id {
                mi = mi.client_id(id);
            }
            Arc::new(mi)
        }
        EntraConfig::AzureCli => Arc::new(AzureCli::new()),
        EntraConfig::Default => {
            let mut chain: Vec<Arc<dyn TokenSource>> = Vec::new();
            if let (Ok(t), Ok(c), Ok(s)) = (
                std::env::var("AZURE_TENANT_ID"),
                std::env::var("AZURE_CLIENT_ID"),
                std::env::var("AZURE_CLIENT_SECRET"),
            ) {
                chain.push(Arc::new(ClientCredentials::new(&t, &c, &s).map_err(bad)?));
            }
            match ManagedIdentity::from_env() {
                Some(r) => chain.push(Arc::new(r.map_err(bad)?)),
                None => chain.push(Arc::new(ManagedIdentity::imds())),
            }
            chain.push(Arc::new(AzureCli::new()));
            Arc::new(ChainSource::new(chain))
        }
    };
    let cache = TokenCache::new(source);
    caches.insert(key, cache.clone());
    Ok(cache)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

impl<C, ResB> Ctx<'_, C, ResB>
where
    C: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
    ResB: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    fn is_plain_leaf(t: &TargetConfig) -> bool {
        t.targets.is_empty()
            && t.strategy.is_none()
            && t.override_params.is_empty()
            && t.retry.is_none()
    }

    /// The backend a leaf target names or defines, with the target's tier and weight; noted
    /// for stats pages.
    fn leaf_backend(
        &mut self,
        path: &str,
        index: usize,
        t: &TargetConfig,
    ) -> Result<Backend, ConfigError> {
        let b = self.leaf_backend_inner(path, index, t)?;
        self.used.push(b.clone());
        Ok(b)
    }

    fn leaf_backend_inner(
        &mut self,
        path: &str,
        index: usize,
        t: &TargetConfig,
    ) -> Result<Backend, ConfigError> {
        if let Some(w) = t.weight
            && (!w.is_finite() || w < 0.0)
        {
            return err(&join(path, "weight"), "must be a finite number >= 0");
        }
        let backend = match (&t.backend, t.provider) {
            (Some(_), Some(_)) => {
                return err(
                    &join(path, "provider"),
                    "give `backend` or an inline provider, not both",
                );
            }
            (Some(name), None) => match self.backends.get(name) {
                Some(b) => b.clone(),
                None => {
                    return err(
                        &join(path, "backend"),
                        format!("no backend named {name:?} in `backends`"),
                    );
                }
            },
            (None, Some(kind)) => {
                let name = t
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}-{index}", provider_name(kind)));
                let def = BackendConfig {
                    provider: Some(kind),
                    url: t
                        .url
                        .clone()
                        .or_else(|| default_url(kind).map(str::to_string)),
                    deployment: t.deployment.clone(),
                    api_version: t.api_version.clone(),
                    anthropic_version: t.anthropic_version.clone(),
                    api_key: t.api_key.clone(),
                    api_key_env: t.api_key_env.clone(),
                    entra: t.entra.clone(),
                    priority: t.priority,
                    weight: t.weight,
                    health_check: None,
                    models: None,
                };
                return carrying(path, &name, &def, &mut self.caches, self.previous);
            }
            (None, None) => {
                return err(path, "needs `backend`, an inline `provider`, or `targets`");
            }
        };
        let backend = if t.weight.is_some() || t.priority.is_some() {
            let priority = t.priority.unwrap_or(backend.priority());
            backend
                .with_tier(priority, t.weight)
                .map_err(|e| ConfigError::new(join(path, "weight"), e.to_string()))?
        } else {
            backend
        };
        // Another deployment of the named backend's resource: a quota scope of its own.
        match &t.deployment {
            Some(dep) => backend
                .for_deployment(dep)
                .map_err(|e| ConfigError::new(join(path, "deployment"), e.to_string())),
            None => Ok(backend),
        }
    }

    fn settings_for(&self, path: &str, t: &TargetConfig) -> Result<Settings, ConfigError> {
        let mut s = self.settings.clone();
        if t.retry.is_some() {
            s.retry = retry_layer(
                &join(path, "retry"),
                t.retry.as_ref(),
                self.config.request_timeout,
            )?;
            s.standing_line =
                standing_line(&join(path, "retry"), t.retry.as_ref(), s.standing_line)?;
        }
        if let Some(a) = t.strategy.as_ref().and_then(|s| s.algorithm) {
            s.strategy = match a {
                Algorithm::LatencyAware => Strategy::LatencyAware,
                Algorithm::WeightedRandom => Strategy::WeightedRandom,
                Algorithm::RoundRobin => Strategy::RoundRobin,
                Algorithm::LeastInFlight => Strategy::LeastInFlight,
                Algorithm::PowerOfTwo => Strategy::PowerOfTwo,
            };
        }
        Ok(s)
    }

    fn name_of(&self, t: &TargetConfig, index: usize) -> String {
        t.name
            .clone()
            .or_else(|| match (&t.backend, &t.deployment) {
                (Some(b), Some(d)) => Some(format!("{b}.{d}")),
                (b, _) => b.clone(),
            })
            .unwrap_or_else(|| match t.provider {
                Some(k) => format!("{}-{index}", provider_name(k)),
                None => format!("group-{index}"),
            })
    }

    /// Builds one node. `index` is its position in the parent (for default names).
    fn node(
        &mut self,
        path: &str,
        t: &TargetConfig,
        index: Option<usize>,
    ) -> Result<StackOver<ResB>, ConfigError> {
        let name = self.name_of(t, index.unwrap_or(0));
        if t.targets.is_empty() {
            if t.strategy.is_some() {
                return err(&join(path, "targets"), "a strategy needs targets");
            }
            let backend = self.leaf_backend(path, index.unwrap_or(0), t)?;
            let settings = self.settings_for(path, t)?;
            return stack::group_over(&name, [backend], self.client.clone(), &settings)
                .map_err(|e| ConfigError::new(path.to_string(), e.to_string()));
        }
        if t.backend.is_some() || t.provider.is_some() {
            return err(
                &join(path, "targets"),
                "a target is either a backend or a group, not both",
            );
        }
        let mode = match (&t.strategy, t.targets.len()) {
            (Some(s), _) => s.mode,
            (None, 1) => Mode::Single,
            (None, _) => {
                return err(
                    &join(path, "strategy"),
                    "required with more than one target",
                );
            }
        };
        let child = |i: usize| join(path, &format!("targets[{i}]"));
        match mode {
            Mode::Single => {
                let only = &t.targets[0];
                self.with_overrides(&child(0), only, 0)
            }
            Mode::Fallback => {
                let on_status = t
                    .strategy
                    .as_ref()
                    .map(|s| s.on_status_codes.clone())
                    .unwrap_or_default();
                let mut settings = tower_llm_lb::fallback::Settings {
                    attribution_headers: true,
                    deadline: self.deadline,
                    ..Default::default()
                };
                for (i, code) in on_status.iter().enumerate() {
                    let Ok(status) = StatusCode::from_u16(*code) else {
                        return err(
                            &join(path, &format!("strategy.on_status_codes[{i}]")),
                            "not an HTTP status",
                        );
                    };
                    settings.statuses.push(status);
                }
                let mut fb = Fallback::builder(name.clone()).settings(settings);
                for (i, c) in t.targets.iter().enumerate() {
                    let p = child(i);
                    let built = self.node_plain(&p, c, i)?;
                    let overrides = overrides(&c.override_params);
                    fb = fb.target_with(self.name_of(c, i), built, overrides);
                }
                let chain = fb
                    .build()
                    .map_err(|e| ConfigError::new(join(path, "targets"), e.to_string()))?;
                Ok(BoxTarget::new(chain))
            }
            Mode::Loadbalance => {
                let settings = self.settings_for(path, t)?;
                if t.targets.iter().all(Self::is_plain_leaf) {
                    let mut backends = Vec::new();
                    for (i, c) in t.targets.iter().enumerate() {
                        backends.push(self.leaf_backend(&child(i), i, c)?);
                    }
                    return stack::group_over(&name, backends, self.client.clone(), &settings)
                        .map_err(|e| ConfigError::new(join(path, "targets"), e.to_string()));
                }
                let mut balance = Balance::builder().name(name).strategy(settings.strategy);
                for (i, c) in t.targets.iter().enumerate() {
                    let p = child(i);
                    let weight = c.weight.unwrap_or(1.0);
                    if !weight.is_finite() || weight < 0.0 {
                        return err(&join(&p, "weight"), "must be a finite number >= 0");
                    }
                    // The member is available while one of its backends is.
                    let first = self.used.len();
                    let built = self.with_overrides(&p, c, i)?;
                    let inside = self.used[first..].to_vec();
                    balance = balance.member(
                        &self.name_of(c, i),
                        weight,
                        c.priority.unwrap_or(0),
                        built,
                        &inside,
                    );
                }
                let balance = balance
                    .build()
                    .map_err(|e| ConfigError::new(join(path, "targets"), e.to_string()))?;
                let svc = ServiceBuilder::new()
                    .layer(settings.retry.clone())
                    .service(balance);
                Ok(BoxTarget::new(svc))
            }
        }
    }

    /// Builds a node ignoring its own overrides (the caller applies them).
    fn node_plain(
        &mut self,
        path: &str,
        t: &TargetConfig,
        index: usize,
    ) -> Result<StackOver<ResB>, ConfigError> {
        self.node(path, t, Some(index))
    }

    /// Builds a node and applies its overrides (and deployment override) itself, through a
    /// one-target chain, for parents that cannot (balanced groups, `single`).
    fn with_overrides(
        &mut self,
        path: &str,
        t: &TargetConfig,
        index: usize,
    ) -> Result<StackOver<ResB>, ConfigError> {
        let built = self.node(path, t, Some(index))?;
        if t.override_params.is_empty() {
            return Ok(built);
        }
        let fb = Fallback::builder(self.name_of(t, index)).target_with(
            self.name_of(t, index),
            built,
            overrides(&t.override_params),
        );
        let chain = fb
            .build()
            .map_err(|e| ConfigError::new(path.to_string(), e.to_string()))?;
        Ok(BoxTarget::new(chain))
    }
}

fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "openai",
        ProviderKind::Azure => "azure",
        ProviderKind::AzureV1 => "azure-v1",
        ProviderKind::Anthropic => "anthropic",
    }
}

fn default_url(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Openai => Some("https://api.openai.com/v1"),
        ProviderKind::Anthropic => Some("https://api.anthropic.com"),
        _ => None,
    }
}
