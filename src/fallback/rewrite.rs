//! Per-target request rewrites: JSON body field overrides (`model`, `max_tokens`, anything).

use bytes::Bytes;
use serde_json::{Map, Value};

/// JSON fields a target sets in the request body, over the caller's (Portkey's
/// `override_params`). An empty set changes nothing and reads nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    fields: Map<String, Value>,
}

/// The request body could not take the target's overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotJson {
    pub(crate) target: String,
}

impl std::fmt::Display for NotJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "target {}: request body is not a JSON object, so its overrides cannot be applied",
            self.target
        )
    }
}

impl std::error::Error for NotJson {}

impl Overrides {
    /// Sets `field` to `value`.
    pub fn set(mut self, field: impl Into<String>, value: impl Into<Value>) -> Self {
        self.fields.insert(field.into(), value.into());
        self
    }

    /// True when there is nothing to override.
    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The body with the overrides applied (top-level fields replaced or added). The caller's
    /// body is not changed; an empty set returns it as is, without parsing.
    pub(crate) fn apply(&self, body: &Bytes, target: &str) -> Result<Bytes, NotJson> {
        if self.is_empty() {
            return Ok(body.clone());
        }
        let not_json = || NotJson {
            target: target.to_string(),
        };
        let mut value: Value = serde_json::from_slice(body).map_err(|_| not_json())?;
        let obj = value.as_object_mut().ok_or_else(not_json)?;
        for (k, v) in &self.fields {
            obj.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&value)
            .map(Bytes::from)
            .map_err(|_| not_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_and_add_top_level_fields() {
        let o = Overrides::default()
            .set("model", "gpt-4-32k")
            .set("max_tokens", 512);
        let body = Bytes::from_static(br#"{"model":"gpt-4","messages":[],"temperature":0.2}"#);
        let out: Value = serde_json::from_slice(&o.apply(&body, "t").unwrap()).unwrap();
        assert_eq!(out["model"], "gpt-4-32k");
        assert_eq!(out["max_tokens"], 512);
        assert_eq!(out["temperature"], 0.2);
        assert!(
            Overrides::default()
                .apply(&Bytes::from_static(b"not json"), "t")
                .is_ok()
        );
    }

    #[test]
    fn a_body_that_is_not_a_json_object_is_a_clear_error() {
        let o = Overrides::default().set("model", "m");
        for bad in [&b"not json"[..], b"[1,2]", b"\"s\"", b""] {
            let e = o
                .apply(&Bytes::copy_from_slice(bad), "gpt-4-32k")
                .unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("target gpt-4-32k: request body is not a JSON object")
            );
        }
    }
}
