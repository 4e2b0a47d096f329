//! A secret this crate holds (a client secret, App Service's identity header): marked
//! sensitive, redacted in `Debug`, and checked without echoing it.

use std::fmt;

use http::HeaderValue;
use tower_llm_lb::BoxError;

#[derive(Clone)]
pub(crate) struct Secret(HeaderValue);

impl Secret {
    /// Wraps `value`. Fails, without echoing the value, if it is empty, has leading or
    /// trailing whitespace, or has characters not allowed in a header.
    pub(crate) fn new(value: &str) -> Result<Secret, BoxError> {
        let why = if value.trim().is_empty() {
            "is empty"
        } else if value.trim() != value {
            "has leading or trailing whitespace (a copy-paste slip?)"
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            "has characters not allowed in a header (only visible ASCII, no spaces)"
        } else {
            let mut v = HeaderValue::from_str(value).map_err(|_| "secret: not a header value")?;
            v.set_sensitive(true);
            return Ok(Secret(v));
        };
        Err(format!("secret {why}").into())
    }

    /// The value, marked sensitive. Handle with care.
    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
