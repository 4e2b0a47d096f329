//! The config's fuzz entry point (feature `fuzzing`; not part of the API, no semver promise),
//! called by the `cargo fuzz` target `config` in `fuzz/` and by `tests/properties.rs`.

use crate::Config;

/// Reads structured values off the front of fuzz input; past the end, zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.u8()))
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

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
    let mut input = Input(data);
    for _ in 0..1 + input.u8() % 4 {
        mutate(&mut base, &mut input, 0);
    }
    if let Ok(config) = Config::from_json(&base.to_string()) {
        let _ = config.build(tower_llm_lb::client::http_client());
    }
}

/// Replaces one value somewhere in `v`, chosen by the input, with an arbitrary one.
fn mutate(v: &mut serde_json::Value, input: &mut Input<'_>, depth: usize) {
    use serde_json::Value;
    let descend = depth < 6 && !input.u8().is_multiple_of(4);
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let i = usize::from(input.u8()) % map.len();
            if let Some((_, child)) = map.iter_mut().nth(i) {
                return mutate(child, input, depth + 1);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = usize::from(input.u8()) % items.len();
            return mutate(&mut items[i], input, depth + 1);
        }
        _ => {}
    }
    *v = match input.u8() % 10 {
        0 => Value::Null,
        1 => Value::Bool(input.u8().is_multiple_of(2)),
        2 => Value::from(input.u64() as i64),
        3 => Value::from(input.u64()),
        4 => serde_json::Number::from_f64(f64::from_bits(input.u64()))
            .map_or(Value::Null, Value::Number),
        5 => Value::from(-1),
        6 => Value::from(0),
        7 => {
            let len = usize::from(input.u8() % 16);
            Value::from(String::from_utf8_lossy(input.bytes(len)).into_owned())
        }
        8 => Value::Array(Vec::new()),
        _ => Value::Object(serde_json::Map::new()),
    };
}
