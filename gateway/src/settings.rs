//! The config's `gateway` section: the gateway's own settings beside the stack's. The library
//! keeps the section as written ([`Config::gateway`]); this reads it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use tower_llm_lb_config::Config;

/// The `gateway` section of the config.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Keys clients must present (`Authorization: Bearer <key>`, `api-key` or `x-api-key`). None: only
    /// loopback clients are served.
    #[serde(default)]
    pub client_keys: Vec<String>,
    /// Address to listen on (default `127.0.0.1:8080`).
    pub listen: Option<String>,
    /// Other names for models: a request whose `model` is an alias is sent as the model it
    /// names (`{"gpt4": "gpt-4o"}`); `/v1/models` lists the aliases too.
    #[serde(default)]
    pub model_aliases: BTreeMap<String, String>,
    /// Ask backends for the token usage of streamed chat answers whose caller did not, count
    /// it, and remove that chunk before the caller sees it (default `false`: Azure
    /// `api-version`s before `2024-09-01-preview`, and some OpenAI-compatible servers, refuse
    /// `stream_options`). Not reloaded.
    pub stream_usage: Option<bool>,
    /// On SIGTERM or SIGINT, how long requests and streams in flight may take to finish before
    /// the process exits, in ms (default 30 000, Kubernetes' default grace period). Not reloaded.
    pub shutdown_grace_ms: Option<u64>,
    /// How long a client may take to send a request's head, in ms; a kept-alive connection
    /// waiting for its next request is closed after as long (default 30 000, hyper's). Stops a
    /// client that drips header bytes from holding a connection. Not reloaded.
    pub client_header_timeout_ms: Option<u64>,
    /// The longest pause between a request body's bytes, in ms: then the answer is `408` and
    /// the connection is closed (default 30 000). Not reloaded.
    pub client_body_timeout_ms: Option<u64>,
    /// Client connections served at once (default 4 096); more wait to be accepted, in the
    /// listen queue, until one closes. Keep it below the process's file descriptor limit less
    /// what the backends take (`ulimit -n`). Not reloaded.
    pub max_connections: Option<usize>,
    /// Serve HTTPS (HTTP/2 or HTTP/1.1 by ALPN) with this certificate and key. None: plain
    /// HTTP.
    pub tls: Option<TlsConfig>,
    /// Each tenant's share of the paced slots when requests wait for them (a tenant is a
    /// client key, named as metrics name it: `key-1` for the first key of `client_keys`; or,
    /// on a gateway without keys, the `x-llm-lb-tenant` header's value): `{"key-2": {"weight":
    /// 3}, "key-3": {"priority": "batch"}}`. Unnamed tenants: weight 1, interactive. Not
    /// reloaded.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The binary's log lines: `"text"` (default) or `"json"`, one object per line (the
    /// command line's `--log-format` wins). Not reloaded.
    pub log_format: Option<String>,
}

/// One tenant's settings (see [`GatewayConfig::tenants`]).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Slots per round while tenants wait together (default 1; at least 1).
    pub weight: Option<u32>,
    /// `"interactive"` (default) or `"batch"`: batch requests get only the slots no interactive
    /// request waits for.
    pub priority: Option<String>,
}

/// The gateway's TLS listener: PEM files, read again when they change (checked every 2 s, as
/// cert-manager rotates a Kubernetes secret's files).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayConfig")
            .field(
                "client_keys",
                &format_args!("<{} redacted>", self.client_keys.len()),
            )
            .field("listen", &self.listen)
            .field("model_aliases", &self.model_aliases)
            .field("stream_usage", &self.stream_usage)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("client_header_timeout_ms", &self.client_header_timeout_ms)
            .field("client_body_timeout_ms", &self.client_body_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("tls", &self.tls)
            .field("tenants", &self.tenants)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl GatewayConfig {
    /// Reads `config`'s `gateway` section (none: every default). An error names the bad field
    /// as `gateway.<field>`, as the library's errors name theirs.
    pub fn of(config: &Config) -> Result<GatewayConfig, String> {
        let Some(section) = config.gateway() else {
            return Ok(GatewayConfig::default());
        };
        serde_path_to_error::deserialize(section).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "gateway".to_string()
            } else {
                format!("gateway.{path}")
            };
            format!("{path}: {}", e.inner())
        })
    }
}
