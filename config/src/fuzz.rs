//! The config's fuzz entry point (feature `fuzzing`; not part of the API, no semver promise),
//! called by the `cargo fuzz` target `config` in `fuzz/` and by `tests/properties.rs`.

use crate::Config;

/// A config file: arbitrary text as JSON and as TOML, and a valid config
/// mutated by the input (any field replaced by an arbitrary value). Nothing panics; a config
/// that validates also builds or fails with an error.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = Config::from_json(&text);
    let _ = Config::from_toml(&text);
    let mut base = serde_json::json!({
        "backends": {
            "a": { "provider": "azure", "url": "https://a.openai.azure.com", "deployment": "gpt-4o",
                   "api_key": "k1", "priority": 0, "weight": 1, "models": ["gpt-4o"] },
            "b": { "provider": "openai", "url": "https://api.openai.com/v1", "api_key": "k2" },
            "c": { "provider": "anthropic", "url": "https://api.anthropic.com", "api_key": "k3" }
        },
        "strategy": { "mode": "fallback", "on_status_codes": [429, 500] },
        "targets": [
            { "strategy": { "mode": "loadbalance" },
              "targets": [ { "backend": "a", "weight": 0.9 }, { "backend": "b", "weight": 0.1 } ] },
            { "backend": "c", "override_params": { "model": "claude", "max_tokens": 512 } }
        ],
        "retry": { "attempts": 3, "max_wait_ms": 10000 },
        "request_timeout": 300000,
        "timeouts": { "first_byte_ms": 5000 },
        "circuit_breaker": { "consecutive_failures": 5 },
        "health_check": { "path": "/status", "interval_ms": 30000 },
        "gateway": { "client_keys": ["c1"] }
    });
    tower_llm_lb::fuzz::mutate_json(&mut base, data);
    if let Ok(config) = Config::from_json(&base.to_string()) {
        let _ = config.build(tower_llm_lb::client::http_client());
    }
}
