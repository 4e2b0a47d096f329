//! Credentials: secrets held so they never print, and the ways to get them.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use http::header::{AUTHORIZATION, HeaderName};

use crate::error::InvalidConfig;

mod token;

pub use token::{BoxFuture, Token, TokenCache, TokenSource};

/// A secret header value: marked sensitive (so HTTP/2 never indexes it), and redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(HeaderValue);

impl Secret {
    /// Wraps `prefix` followed by `value` (e.g. `Bearer ` and a token). Fails, without echoing
    /// the value, if it is empty or has characters not allowed in a header (control
    /// characters, newlines, non-visible bytes).
    pub(crate) fn with_prefix(prefix: &str, value: &str) -> Result<Secret, InvalidCredential> {
        if value.trim().is_empty() {
            return Err(InvalidCredential::new("is empty"));
        }
        if value.trim() != value {
            return Err(InvalidCredential::new(
                "has leading or trailing whitespace (a copy-paste slip?)",
            ));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidCredential::new(
                "has characters not allowed in a header (only visible ASCII, no spaces)",
            ));
        }
        let mut s = String::with_capacity(prefix.len() + value.len());
        s.push_str(prefix);
        s.push_str(value);
        let mut v = HeaderValue::from_str(&s)
            .map_err(|_| InvalidCredential::new("has characters not allowed in a header"))?;
        v.set_sensitive(true);
        Ok(Secret(v))
    }

    /// The header value, marked sensitive. Handle with care.
    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a credential could not be built; never what the secret was. Reaches callers as an
/// [`InvalidConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InvalidCredential {
    reason: String,
}

impl InvalidCredential {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        InvalidCredential {
            reason: reason.into(),
        }
    }

    fn context(self, what: &str) -> Self {
        InvalidCredential {
            reason: format!("{what}: {}", self.reason),
        }
    }
}

impl From<InvalidCredential> for InvalidConfig {
    fn from(e: InvalidCredential) -> Self {
        InvalidConfig::new(format!("invalid credential: {}", e.reason))
    }
}

static API_KEY: HeaderName = HeaderName::from_static("api-key");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// How a backend proves who it is. Cheap to clone; `Debug` never shows the secret.
#[derive(Clone)]
pub struct Credential(pub(crate) Kind);

#[derive(Clone)]
pub(crate) enum Kind {
    Header(HeaderName, Secret),
    Token(TokenCache),
}

impl Credential {
    /// The secret texts a backend could echo back: the header value as sent, and without its
    /// `Bearer ` prefix (for a token credential, the token it holds now).
    pub(crate) fn secret_texts(&self) -> Vec<Vec<u8>> {
        let value = match &self.0 {
            Kind::Header(_, secret) => Some(secret.header_value().as_bytes().to_vec()),
            Kind::Token(cache) => cache
                .fresh(tokio::time::Instant::now())
                .map(|v| v.as_bytes().to_vec()),
        };
        let Some(value) = value else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(2);
        if let Some(bare) = value.strip_prefix(b"Bearer ") {
            out.push(bare.to_vec());
        }
        out.push(value);
        out
    }

    /// The token cache of a token credential.
    pub(crate) fn cache(&self) -> Option<&TokenCache> {
        match &self.0 {
            Kind::Token(cache) => Some(cache),
            Kind::Header(..) => None,
        }
    }

    fn static_secret(
        name: HeaderName,
        prefix: &str,
        what: &str,
        secret: &str,
    ) -> Result<Credential, InvalidConfig> {
        let secret = Secret::with_prefix(prefix, secret).map_err(|e| e.context(what))?;
        Ok(Credential(Kind::Header(name, secret)))
    }

    /// Azure OpenAI `api-key`.
    pub fn api_key(key: &str) -> Result<Credential, InvalidConfig> {
        Self::static_secret(API_KEY.clone(), "", "api-key", key)
    }

    /// `Authorization: Bearer <token>` (OpenAI keys, static tokens).
    pub fn bearer(token: &str) -> Result<Credential, InvalidConfig> {
        Self::static_secret(AUTHORIZATION, "Bearer ", "bearer token", token)
    }

    /// Anthropic `x-api-key`.
    pub fn x_api_key(key: &str) -> Result<Credential, InvalidConfig> {
        Self::static_secret(X_API_KEY.clone(), "", "x-api-key", key)
    }

    /// Any header name with a secret value (an API gateway's subscription key, say).
    pub fn header(name: HeaderName, secret: &str) -> Result<Credential, InvalidConfig> {
        let what = name.as_str().to_string();
        Self::static_secret(name, "", &what, secret)
    }

    /// A refreshable bearer token from `source`, cached and refreshed ahead of expiry (see
    /// [`TokenCache`]).
    pub fn token_source(source: impl TokenSource) -> Credential {
        Credential(Kind::Token(TokenCache::new(Arc::new(source))))
    }

    /// A bearer token from an existing cache (one cache can serve many backends).
    pub fn token_cache(cache: TokenCache) -> Credential {
        Credential(Kind::Token(cache))
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Header(name, _) => write!(f, "Credential({name}: <redacted>)"),
            Kind::Token(cache) => write!(f, "Credential(token from {})", cache.source_name()),
        }
    }
}

/// What a configured secret becomes in text [`redact`] passes on.
const REDACTED: &str = "[redacted]";

/// `text` with every secret of `credentials` replaced by `[redacted]`: the header value as
/// sent and, for a bearer credential, the token without its `Bearer ` prefix (a token
/// credential's current token). For an upstream answer passed on to a caller, which a backend
/// may have made echo its own key (a 401 quoting the header it got). Secrets shorter than 4
/// bytes are left, being too likely to be ordinary text.
pub fn redact<'a>(text: Bytes, credentials: impl IntoIterator<Item = &'a Credential>) -> Bytes {
    let secrets: Vec<Vec<u8>> = credentials
        .into_iter()
        .flat_map(Credential::secret_texts)
        .filter(|s| s.len() >= 4)
        .collect();
    redact_secrets(text, &secrets)
}

/// `bytes` with every occurrence of each of `secrets` replaced by `[redacted]`.
fn redact_secrets(bytes: Bytes, secrets: &[Vec<u8>]) -> Bytes {
    let found = |hay: &[u8]| {
        secrets
            .iter()
            .any(|s| memchr::memmem::find(hay, s).is_some())
    };
    if !found(&bytes) {
        return bytes;
    }
    let mut out: Vec<u8> = bytes.to_vec();
    for s in secrets {
        let mut i = 0;
        while i + s.len() <= out.len() {
            if out[i..i + s.len()] == s[..] {
                out.splice(i..i + s.len(), REDACTED.bytes());
                i += REDACTED.len();
            } else {
                i += 1;
            }
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn illegal_keys_are_errors_without_echo() {
        for bad in [
            "",
            "  ",
            "abc\ndef",
            "abc\r\nX-Evil: 1",
            "k\u{7f}",
            " padded",
        ] {
            let err = Credential::api_key(bad).unwrap_err();
            assert!(!err.to_string().contains("abc"), "{err}");
            assert!(
                err.to_string().starts_with("invalid credential: api-key"),
                "{err}"
            );
        }
        assert!(Credential::bearer("sk-\u{e9}").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credential::bearer("sk-very-secret").unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert_eq!(shown, "Credential(authorization: <redacted>)");
        let Kind::Header(_, s) = &c.0 else { panic!() };
        assert!(s.header_value().is_sensitive());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
