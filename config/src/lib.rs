//! A serde config (JSON or TOML, one schema) and the one validating step that builds the stack
//! from it (the `tower-llm-lb-config` crate).
//!
//! The schema keeps Portkey's gateway-config meanings, so its users feel at home:
//! `strategy.mode` (`loadbalance`, `fallback`), nested `targets`, `weight`, `override_params`,
//! `retry.attempts`, `retry.on_status_codes`, `request_timeout` (ms); and adds ours: named
//! `backends` (provider, url, deployment, api_version, credentials by env var), `priority`,
//! `circuit_breaker`, `timeouts` and `translation`, and a `models` map (each model its own target, chosen by
//! the request's `model`) in place of `targets`. Unknown fields are rejected; every error names the path of
//! the bad field (`targets[1].weight: must be a finite number >= 0`); secrets are never printed
//! back.
//!
//! ```
//! use tower_llm_lb_config::Config;
//!
//! let json = r#"{
//!   "backends": {
//!     "ptu-eastus": { "provider": "azure", "url": "https://ptu.openai.azure.com",
//!                     "deployment": "gpt-4o", "api_key": "k1", "priority": 0 },
//!     "westus":     { "provider": "azure", "url": "https://w.openai.azure.com",
//!                     "deployment": "gpt-4o", "api_key_env": "PATH", "priority": 1 }
//!   },
//!   "strategy": { "mode": "fallback", "on_status_codes": [429] },
//!   "targets": [
//!     { "backend": "ptu-eastus" },
//!     { "backend": "westus", "override_params": { "max_tokens": 512 } }
//!   ],
//!   "retry": { "attempts": 3 },
//!   "request_timeout": 300000
//! }"#;
//! let config = Config::from_json(json)?;
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # let _guard = rt.enter();
//! let service = config.build(tower_llm_lb::client::http_client())?;
//! # let _ = service;
//! let err = Config::from_json(r#"{ "targets": [ { "backend": "x", "weight": -1 } ] }"#)
//!     .and_then(|c| c.build(tower_llm_lb::client::http_client()).map(|_| ()))
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "targets[0].weight: must be a finite number >= 0");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod build;
mod env;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use tower_llm_lb::shared::redact_url;

pub use build::ConfigError;

/// The whole configuration. See the [crate docs](crate).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Named backends that targets refer to with `"backend": "name"`.
    #[serde(default)]
    pub(crate) backends: BTreeMap<String, BackendConfig>,
    /// How the top-level targets are used; needed with more than one target.
    pub(crate) strategy: Option<StrategyConfig>,
    /// The top-level targets. None: load-balance over every backend in `backends`.
    #[serde(default)]
    pub(crate) targets: Vec<TargetConfig>,
    /// Routing by model, in place of `targets`: each model's own target (a backend, a group or
    /// a chain, as in `targets`), chosen by the request's `model`; a model not listed is
    /// refused without sending (the gateway answers `404 model_not_found`).
    #[serde(default)]
    pub(crate) models: BTreeMap<String, TargetConfig>,
    /// Retries of throttled requests (and of failures, with `on_status_codes` / `failures`).
    pub(crate) retry: Option<RetryConfig>,
    /// One overall deadline per request, in milliseconds (Portkey's `request_timeout`).
    pub(crate) request_timeout: Option<u64>,
    /// Per-attempt time limits.
    pub(crate) timeouts: Option<TimeoutsConfig>,
    /// Circuit-breaker settings of every backend.
    pub(crate) circuit_breaker: Option<BreakerConfig>,
    /// Health probes of every backend (none by default).
    pub(crate) health_check: Option<HealthCheckConfig>,
    /// The gateway's own settings, read by the gateway crate.
    pub(crate) gateway: Option<Section>,
    /// How OpenAI chat requests are translated for Anthropic backends, and Anthropic messages
    /// requests for OpenAI and Azure ones (see [`translate`](tower_llm_lb::translate)).
    pub(crate) translation: Option<TranslationConfig>,
    /// Backend waits and open circuits shared with the other replicas through Redis (see
    /// [`shared`](tower_llm_lb::shared); needs the `redis` feature). None: each replica on its own.
    pub(crate) shared_state: Option<SharedStateConfig>,
}

/// Where and how often replicas share what they learn about backends.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SharedStateConfig {
    /// `redis://[user:password@]host[:port][/db]` (prefer `redis_url_env`: it may hold a
    /// password).
    pub redis_url: Option<String>,
    /// The environment variable holding the Redis URL.
    pub redis_url_env: Option<String>,
    /// Prefix of every key (default `llm-lb`); replicas sharing one quota use the same.
    pub key_prefix: Option<String>,
    /// Between two exchanges with Redis, in ms (default 100).
    pub sync_interval_ms: Option<u64>,
    /// The longest one exchange may take, in ms (default 50); requests never wait for it.
    pub timeout_ms: Option<u64>,
    /// A PEM file of the CA that signed a `rediss://` server's certificate (a private CA);
    /// without it the system's roots and webpki's are trusted.
    pub redis_ca_file: Option<String>,
}

impl fmt::Debug for SharedStateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStateConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_url_env", &self.redis_url_env)
            .field("key_prefix", &self.key_prefix)
            .field("sync_interval_ms", &self.sync_interval_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("redis_ca_file", &self.redis_ca_file)
            .finish()
    }
}

/// How requests are translated between providers' APIs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TranslationConfig {
    /// `max_tokens` sent to Anthropic when the caller gave none (default 4096; Anthropic
    /// requires one).
    pub default_max_tokens: Option<u32>,
    /// Drop parameters that have no counterpart (`n`, `logprobs`, `seed`…) instead of
    /// answering `400` naming them (default `false`). Message content is never dropped.
    pub drop_unsupported: Option<bool>,
}

/// One backend definition.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendConfig {
    /// `openai` (and compatibles), `azure` / `azure-openai` (classic deployment URLs),
    /// `azure-v1`, `anthropic`.
    pub provider: Option<ProviderKind>,
    /// The base URL its official SDK takes.
    #[serde(alias = "base_url")]
    pub url: Option<String>,
    /// Azure classic: the deployment name.
    pub deployment: Option<String>,
    /// Azure classic: the `api-version` (default `2024-10-21`).
    pub api_version: Option<String>,
    /// Anthropic: the `anthropic-version` (default `2023-06-01`).
    pub anthropic_version: Option<String>,
    /// The key itself (prefer `api_key_env`).
    pub api_key: Option<String>,
    /// The environment variable holding the key.
    pub api_key_env: Option<String>,
    /// Keyless Entra ID (Azure AD) auth instead of a key; backends with the same identity
    /// share one token.
    pub entra: Option<EntraConfig>,
    /// Priority tier: lower is preferred (default 0).
    pub priority: Option<u32>,
    /// Weight within the tier (default 1; 0 receives nothing).
    pub weight: Option<f64>,
    /// This backend's health probe, in place of the top-level `health_check`.
    pub health_check: Option<HealthCheckConfig>,
    /// The models it serves, as callers name them in `model` (default: any). With models
    /// declared, a request goes only to backends serving its model, an unknown model is a 404
    /// `model_not_found`, and the gateway's `GET /v1/models` lists them.
    pub models: Option<Vec<String>>,
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("provider", &self.provider)
            .field("url", &self.url)
            .field("deployment", &self.deployment)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_env", &self.api_key_env)
            .field("priority", &self.priority)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// An Entra ID token source (see [`tower_llm_lb_entra`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum EntraConfig {
    /// A service principal: tenant, client id, and the environment variable holding its secret.
    ClientCredentials {
        /// The tenant (directory) id.
        tenant: String,
        /// The application (client) id.
        client_id: String,
        /// The environment variable holding the client secret.
        client_secret_env: String,
        /// Another authority host (sovereign clouds, tests).
        authority: Option<String>,
    },
    /// A managed identity: App Service / Container Apps when `IDENTITY_ENDPOINT` and
    /// `IDENTITY_HEADER` are set, else the VM's IMDS.
    ManagedIdentity {
        /// A user-assigned identity's client id.
        client_id: Option<String>,
        /// Another IMDS endpoint URL (tests).
        endpoint: Option<String>,
    },
    /// The developer's `az login`.
    AzureCli,
    /// Like `DefaultAzureCredential`: client credentials from `AZURE_TENANT_ID`,
    /// `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET` if set, then a managed identity, then the CLI.
    Default,
}

/// Which API a backend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ProviderKind {
    /// OpenAI and compatibles.
    Openai,
    /// Azure OpenAI, classic deployment URLs.
    #[serde(alias = "azure-openai")]
    Azure,
    /// Azure OpenAI v1 API.
    AzureV1,
    /// Anthropic.
    Anthropic,
}

/// How a group uses its targets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StrategyConfig {
    /// `loadbalance` or `fallback` (`single`: the first target only).
    pub mode: Mode,
    /// Fallback: extra statuses that move on to the next target.
    #[serde(default)]
    pub on_status_codes: Vec<u16>,
    /// Loadbalance: `weighted_random` (default), `round_robin`, `least_in_flight`,
    /// `power_of_two`.
    pub algorithm: Option<Algorithm>,
}

/// A group's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Spread over the targets by priority and weight.
    Loadbalance,
    /// Try the targets in order.
    Fallback,
    /// Use the first target only.
    Single,
}

/// A load-balancing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Algorithm {
    /// The default: lower load (in flight x latency) of two, weights exact where set.
    LatencyAware,
    /// Weighted random.
    WeightedRandom,
    /// Round robin.
    RoundRobin,
    /// Fewest requests in flight.
    LeastInFlight,
    /// Power of two choices.
    PowerOfTwo,
}

/// One target: a backend (by name or inline), or a nested group.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetConfig {
    /// A name for attribution (default: the backend's name, or `group-N`).
    pub name: Option<String>,
    /// A backend from `backends`, by name.
    pub backend: Option<String>,
    /// Inline backend: provider (Portkey style).
    pub provider: Option<ProviderKind>,
    /// Inline backend: base URL.
    #[serde(alias = "base_url")]
    pub url: Option<String>,
    /// Inline backend: the key.
    pub api_key: Option<String>,
    /// Inline backend: the environment variable holding the key.
    pub api_key_env: Option<String>,
    /// Inline backend: keyless Entra ID auth.
    pub entra: Option<EntraConfig>,
    /// Inline Azure backend: its deployment; on a `backend` reference: a per-target override.
    pub deployment: Option<String>,
    /// Inline Azure backend: `api-version`.
    pub api_version: Option<String>,
    /// Inline Anthropic backend: `anthropic-version`.
    pub anthropic_version: Option<String>,
    /// Nested group: its strategy.
    pub strategy: Option<StrategyConfig>,
    /// Nested group: its targets.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Weight within a loadbalance group (default 1; 0 receives nothing).
    pub weight: Option<f64>,
    /// Priority tier within a loadbalance group (default 0 or the backend's).
    pub priority: Option<u32>,
    /// JSON body fields this target sets (`model`, `max_tokens`, …).
    #[serde(default)]
    pub override_params: serde_json::Map<String, serde_json::Value>,
    /// Retries inside this target.
    pub retry: Option<RetryConfig>,
}

impl fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetConfig")
            .field("name", &self.name)
            .field("backend", &self.backend)
            .field("provider", &self.provider)
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("strategy", &self.strategy)
            .field("targets", &self.targets)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// Retry settings (Portkey's `retry`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryConfig {
    /// Attempts that reach a backend and are answered other than throttled (default 4); throttled
    /// ones are bounded by `max_wait_ms` and the deadline, all sends by four times this.
    pub attempts: Option<u32>,
    /// Statuses that are retried elsewhere; listing any 5xx turns on retrying failures.
    #[serde(default)]
    pub on_status_codes: Vec<u16>,
    /// The most a request may wait for a backend to become free, in ms (default 10 000).
    pub max_wait_ms: Option<u64>,
    /// Whether failures (5xx, 408, timeouts, connection errors) are retried on another backend
    /// (default true).
    pub failures: Option<bool>,
    /// Whether an answer's `x-should-retry` header decides whether it is retried (default
    /// true: `false` is retried nowhere, `true` makes a client error retryable).
    pub should_retry_header: Option<bool>,
    /// Opt-in hedging: with no answer head after this many ms, a second attempt goes to
    /// another backend; the first good answer wins and the other is cancelled.
    pub hedge_after_ms: Option<u64>,
    /// The wait a group's line of waiting requests keeps once it stands (default 1 000; 0: the
    /// line never refuses early). See `balance::StandingLine`.
    pub line_target_ms: Option<u64>,
    /// How long every wait must stay above `line_target_ms` before the line stands (default
    /// 10 000).
    pub line_interval_ms: Option<u64>,
}

/// Per-attempt limits, in milliseconds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeoutsConfig {
    /// Until the first body byte.
    pub first_byte_ms: Option<u64>,
    /// Between body chunks.
    pub idle_ms: Option<u64>,
    /// The whole attempt (default 300 000).
    pub total_ms: Option<u64>,
    /// Where `first_byte_ms` is not set: abandon an attempt (and try another backend) once
    /// the backend has answered nothing at all, to it or any other request, for this long and
    /// for 10x its peers' answer time (default 10 000; 0 turns the watch off).
    pub silence_ms: Option<u64>,
}

/// Health probes (as Azure Application Gateway's): `GET {path}` on each backend's host, the
/// path sent as written; durations in milliseconds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheckConfig {
    /// The path to `GET` (required), e.g. `/status-0123456789abcdef`.
    pub path: Option<String>,
    /// Time between probes (default 30 000).
    pub interval_ms: Option<u64>,
    /// How long a probe may take (default 30 000).
    pub timeout_ms: Option<u64>,
    /// The lowest and highest status that mean healthy (default `[200, 399]`).
    pub healthy_statuses: Option<[u16; 2]>,
    /// Failed probes in a row that take a backend out (default 2).
    pub unhealthy_threshold: Option<u32>,
    /// Healthy probes in a row that let it back in (default 1).
    pub healthy_threshold: Option<u32>,
}

/// Circuit-breaker settings; durations in milliseconds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakerConfig {
    /// Trip after this many failures in a row.
    pub consecutive_failures: Option<u32>,
    /// Trip at this failure rate over the window.
    pub failure_rate: Option<f64>,
    /// The window.
    pub window_ms: Option<u64>,
    /// Calls needed in the window before the rate counts.
    pub min_calls: Option<u32>,
    /// First open period.
    pub base_open_ms: Option<u64>,
    /// Each consecutive trip multiplies the open period by this (default 1.2).
    pub open_growth: Option<f64>,
    /// Longest open period.
    pub max_open_ms: Option<u64>,
    /// Probes let through while half-open.
    pub probes: Option<u32>,
    /// Share of a group that may be ejected at once.
    pub max_ejection: Option<f64>,
}

/// The `gateway` section as written: the library does not read it (the gateway crate does).
/// Its Debug names the keys only, as the section holds client keys.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct Section(serde_json::Value);

impl fmt::Debug for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            serde_json::Value::Object(m) => f.debug_set().entries(m.keys()).finish(),
            _ => f.write_str("<not a table>"),
        }
    }
}

impl Config {
    /// The `gateway` section as written, unread by the library: the gateway (the
    /// `tower-llm-lb-gateway` crate) parses it, naming a bad field `gateway.<field>`.
    pub fn gateway(&self) -> Option<&serde_json::Value> {
        self.gateway.as_ref().map(|s| &s.0)
    }

    /// The models the `models` map routes by (each its own target), in order.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Parses JSON; errors name the path of the bad field.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| ConfigError::new(e.path().to_string(), e.inner().to_string()))
    }

    /// Parses TOML; errors name the path of the bad field.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de)
            .map_err(|e| ConfigError::new(e.path().to_string(), e.inner().message().to_string()))
    }

    /// Reads a file: `.json` or `.toml` by extension.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), e.to_string()))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json(&text),
            Some("toml") => Self::from_toml(&text),
            _ => Err(ConfigError::new(
                path.display().to_string(),
                "must end in .json or .toml".into(),
            )),
        }
    }

    /// Starts sharing `backends`' waits with the other replicas, as `shared_state` says (none
    /// configured: `Ok(None)`). Call inside a tokio runtime and keep the link as long as the
    /// backends serve. Fails, naming the field, on a missing or unusable URL, or without the
    /// `redis` feature.
    pub fn shared_state(
        &self,
        backends: Vec<tower_llm_lb::Backend>,
    ) -> Result<Option<tower_llm_lb::shared::SharedState>, ConfigError> {
        let Some(c) = &self.shared_state else {
            return Ok(None);
        };
        let url = match (&c.redis_url, &c.redis_url_env) {
            (Some(u), None) => u.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                ConfigError::new(
                    "shared_state.redis_url_env".into(),
                    format!("environment variable {var} is not set"),
                )
            })?,
            _ => {
                return Err(ConfigError::new(
                    "shared_state".into(),
                    "give one of redis_url and redis_url_env".into(),
                ));
            }
        };
        let d = tower_llm_lb::shared::SharedSettings::default();
        let settings = tower_llm_lb::shared::SharedSettings {
            interval: c
                .sync_interval_ms
                .map_or(d.interval, std::time::Duration::from_millis),
            budget: c
                .timeout_ms
                .map_or(d.budget, std::time::Duration::from_millis),
            key_prefix: c.key_prefix.clone().unwrap_or(d.key_prefix),
        };
        if settings.interval.is_zero() || settings.budget.is_zero() {
            return Err(ConfigError::new(
                "shared_state".into(),
                "sync_interval_ms and timeout_ms must be at least 1".into(),
            ));
        }
        #[cfg(feature = "redis")]
        {
            let store = match &c.redis_ca_file {
                None => tower_llm_lb::shared::RedisStore::new(&url, &settings.key_prefix),
                Some(file) => {
                    let ca = std::fs::read(file).map_err(|e| {
                        ConfigError::new(
                            "shared_state.redis_ca_file".into(),
                            format!("{file}: {e}"),
                        )
                    })?;
                    tower_llm_lb::shared::RedisStore::with_root_certificate(
                        &url,
                        &settings.key_prefix,
                        &ca,
                    )
                }
            }
            .map_err(|e| ConfigError::new("shared_state.redis_url".into(), e.to_string()))?;
            Ok(Some(tower_llm_lb::shared::SharedState::spawn(
                std::sync::Arc::new(store),
                backends,
                settings,
            )))
        }
        #[cfg(not(feature = "redis"))]
        {
            let _ = (url, backends, settings);
            Err(ConfigError::new(
                "shared_state".into(),
                "this build has no Redis support (cargo feature `redis`)".into(),
            ))
        }
    }

    /// Backends from environment variables in the pattern users already use:
    /// `AOAI_ENDPOINT_01` + `AOAI_KEY_01` (+ optional `AOAI_DEPLOYMENT_01`, `AOAI_PRIORITY_01`,
    /// `AOAI_WEIGHT_01`), `_02`, … up to `_99`; `deployment` is the default deployment.
    pub fn from_env(deployment: &str) -> Result<Config, ConfigError> {
        env::from_env(deployment, |k| std::env::var(k).ok())
    }
}
