//! Backends from environment variables (`AOAI_ENDPOINT_01`, `AOAI_KEY_01`, …).

use super::{BackendConfig, Config, ConfigError, ProviderKind};

pub(super) fn from_env(
    deployment: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    for i in 1..=99 {
        let n = format!("{i:02}");
        let Some(url) = get(&format!("AOAI_ENDPOINT_{n}")) else {
            continue;
        };
        let key_var = format!("AOAI_KEY_{n}");
        if get(&key_var).is_none() {
            return Err(ConfigError::new(
                key_var,
                "not set, but AOAI_ENDPOINT_".to_string() + &n + " is",
            ));
        }
        let priority = match get(&format!("AOAI_PRIORITY_{n}")) {
            Some(p) => Some(p.trim().parse::<u32>().map_err(|_| {
                ConfigError::new(
                    format!("AOAI_PRIORITY_{n}"),
                    "must be a whole number >= 0".into(),
                )
            })?),
            None => None,
        };
        let weight = match get(&format!("AOAI_WEIGHT_{n}")) {
            Some(w) => Some(w.trim().parse::<f64>().map_err(|_| {
                ConfigError::new(format!("AOAI_WEIGHT_{n}"), "must be a number >= 0".into())
            })?),
            None => None,
        };
        config.backends.insert(
            format!("aoai-{n}"),
            BackendConfig {
                provider: Some(ProviderKind::Azure),
                url: Some(url),
                deployment: Some(
                    get(&format!("AOAI_DEPLOYMENT_{n}")).unwrap_or_else(|| deployment.to_string()),
                ),
                api_key_env: Some(key_var),
                priority,
                weight,
                ..BackendConfig::default()
            },
        );
    }
    if config.backends.is_empty() {
        return Err(ConfigError::new(
            "AOAI_ENDPOINT_01".into(),
            "not set: no backends found in the environment".into(),
        ));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_numbered_backends_and_never_copies_the_key() {
        let c = from_env(
            "gpt-4o",
            env(&[
                ("AOAI_ENDPOINT_01", "https://a.openai.azure.com"),
                ("AOAI_KEY_01", "secret-a"),
                ("AOAI_ENDPOINT_03", "https://c.openai.azure.com"),
                ("AOAI_KEY_03", "secret-c"),
                ("AOAI_DEPLOYMENT_03", "gpt-4o-mini"),
                ("AOAI_PRIORITY_03", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.backends.len(), 2);
        let a = &c.backends["aoai-01"];
        assert_eq!(a.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(a.api_key_env.as_deref(), Some("AOAI_KEY_01"));
        assert_eq!(a.api_key, None);
        assert_eq!(c.backends["aoai-03"].priority, Some(1));
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn bad_or_missing_variables_name_the_variable() {
        let e = from_env("d", env(&[])).unwrap_err();
        assert!(e.to_string().starts_with("AOAI_ENDPOINT_01: not set"));
        let e = from_env("d", env(&[("AOAI_ENDPOINT_01", "https://a")])).unwrap_err();
        assert!(e.to_string().starts_with("AOAI_KEY_01: not set"));
        let e = from_env(
            "d",
            env(&[
                ("AOAI_ENDPOINT_01", "https://a"),
                ("AOAI_KEY_01", "k"),
                ("AOAI_PRIORITY_01", "high"),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "AOAI_PRIORITY_01: must be a whole number >= 0"
        );
    }
}
