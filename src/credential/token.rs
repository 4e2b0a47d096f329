//! Refreshable tokens: the [`TokenSource`] trait and the [`TokenCache`] in front of it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::*};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::time::Instant;

use super::Secret;
use crate::error::{BoxError, TokenUnavailable};

/// A boxed, sendable future, as token sources return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A token and the instant it stops being valid.
#[derive(Clone, Debug)]
pub struct Token {
    secret: Secret,
    expires_at: Instant,
}

impl Token {
    /// A bearer token valid for `expires_in` from now (by tokio's clock).
    pub fn bearer(token: &str, expires_in: Duration) -> Result<Token, BoxError> {
        Ok(Token {
            secret: Secret::with_prefix("Bearer ", token)
                .map_err(crate::error::InvalidConfig::from)?,
            expires_at: Instant::now() + expires_in,
        })
    }

    /// When the token expires.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }
}

/// Something that can fetch a fresh token: an identity endpoint, a CLI, a user's own code.
///
/// Implementations do the fetch only; caching, refresh ahead of expiry, single-flight and
/// backoff are [`TokenCache`]'s job. Errors must not contain secrets.
pub trait TokenSource: Send + Sync + 'static {
    /// A name for logs and errors (e.g. `client-credentials(tenant-id)`); never a secret.
    fn name(&self) -> &str;

    /// Fetches a new token.
    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>>;
}

/// Caches one [`TokenSource`]'s token and refreshes it.
///
/// - A valid token is served from memory without locking (an atomic pointer load).
/// - Inside the refresh window (`refresh_ahead` before expiry, at most half the token's lifetime),
///   one request refreshes while the others keep using the still-valid token.
/// - With no valid token, requests wait for one fetch: however many wait, one fetch is in flight.
/// - A failed fetch is retried no sooner than a backoff (1 s doubling to 30 s); meanwhile a still
///   valid token keeps being served, and without one requests fail fast with
///   [`TokenUnavailable`].
///
/// Clones share the cache, so one source can serve many backends.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn TokenSource>,
    current: ArcSwapOption<Cached>,
    refresh: tokio::sync::Mutex<()>,
    refresh_ahead: Duration,
    failures: AtomicU32,
    last_failure: ArcSwapOption<Failure>,
}

struct Cached {
    header: HeaderValue,
    expires_at: Instant,
    refresh_at: Instant,
}

struct Failure {
    at: Instant,
    retry_at: Instant,
    reason: String,
}

/// Default time before expiry at which a token is refreshed (as `azure_identity` does).
pub(crate) const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl TokenCache {
    /// A cache in front of `source`, refreshing five minutes before expiry.
    pub fn new(source: Arc<dyn TokenSource>) -> TokenCache {
        Self::with_refresh_ahead(source, DEFAULT_REFRESH_AHEAD)
    }

    /// A cache refreshing `refresh_ahead` before expiry (at most half a token's lifetime).
    pub(crate) fn with_refresh_ahead(
        source: Arc<dyn TokenSource>,
        refresh_ahead: Duration,
    ) -> TokenCache {
        TokenCache {
            inner: Arc::new(Inner {
                source,
                current: ArcSwapOption::empty(),
                refresh: tokio::sync::Mutex::new(()),
                refresh_ahead,
                failures: AtomicU32::new(0),
                last_failure: ArcSwapOption::empty(),
            }),
        }
    }

    /// Forgets the cached token (a backend rejected it: revoked, or its role changed), so the
    /// next request fetches a new one.
    pub(crate) fn invalidate(&self) {
        self.inner.current.store(None);
    }

    /// The source's name.
    pub(crate) fn source_name(&self) -> &str {
        self.inner.source.name()
    }

    /// The cached header value if it is valid at `now` and not yet due for refresh.
    pub(crate) fn fresh(&self, now: Instant) -> Option<HeaderValue> {
        let cur = self.inner.current.load();
        cur.as_ref()
            .filter(|c| now < c.refresh_at)
            .map(|c| c.header.clone())
    }

    /// A valid `Authorization` header value, fetching a token if needed (see the type docs).
    pub async fn get(&self) -> Result<HeaderValue, TokenUnavailable> {
        let now = Instant::now();
        if let Some(h) = self.fresh(now) {
            return Ok(h);
        }
        // In the refresh window with a valid token: refresh only if nobody else is and the
        // backoff allows; otherwise keep serving the valid token.
        if let Some(valid) = self.valid(now) {
            if self.in_backoff(now) {
                return Ok(valid);
            }
            let Ok(_guard) = self.inner.refresh.try_lock() else {
                return Ok(valid);
            };
            return Ok(self.refresh(now).await.unwrap_or(valid));
        }
        // No valid token: wait for the one fetch in flight, or make it.
        let _guard = self.inner.refresh.lock().await;
        let now = Instant::now();
        if let Some(valid) = self.valid(now) {
            return Ok(valid);
        }
        if let Some(f) = self.inner.last_failure.load().as_ref()
            && now < f.retry_at
        {
            return Err(self.unavailable(&f.reason, f.at));
        }
        self.refresh(now)
            .await
            .map_err(|reason| self.unavailable(&reason, now))
    }

    fn valid(&self, now: Instant) -> Option<HeaderValue> {
        let cur = self.inner.current.load();
        cur.as_ref()
            .filter(|c| now < c.expires_at)
            .map(|c| c.header.clone())
    }

    fn in_backoff(&self, now: Instant) -> bool {
        self.inner
            .last_failure
            .load()
            .as_ref()
            .is_some_and(|f| now < f.retry_at)
    }

    fn unavailable(&self, reason: &str, at: Instant) -> TokenUnavailable {
        TokenUnavailable::new(self.inner.source.name(), reason, at)
    }

    /// Fetches and stores a token; the caller holds the refresh lock.
    async fn refresh(&self, started: Instant) -> Result<HeaderValue, String> {
        match self.inner.source.fetch().await {
            Ok(token) => {
                let now = Instant::now();
                if token.expires_at <= now {
                    return Err(self.fail(started, "token source returned an expired token".into()));
                }
                let lifetime = token.expires_at - now;
                let ahead = self.inner.refresh_ahead.min(lifetime / 2);
                let header = token.secret.header_value().clone();
                self.inner.current.store(Some(Arc::new(Cached {
                    header: header.clone(),
                    expires_at: token.expires_at,
                    refresh_at: token.expires_at - ahead,
                })));
                self.inner.failures.store(0, Release);
                self.inner.last_failure.store(None);
                Ok(header)
            }
            Err(e) => {
                // Sources often name themselves in their errors; do not say it twice.
                let e = e.to_string();
                let prefix = format!("{}: ", self.inner.source.name());
                let reason = e.strip_prefix(&prefix).map_or(e.clone(), str::to_string);
                Err(self.fail(started, reason))
            }
        }
    }

    fn fail(&self, at: Instant, reason: String) -> String {
        let n = self.inner.failures.fetch_add(1, AcqRel).min(5);
        let backoff = (Duration::from_secs(1) * 2u32.pow(n)).min(MAX_BACKOFF);
        tracing::warn!(source = self.inner.source.name(), %reason, ?backoff, "token fetch failed");
        self.inner.last_failure.store(Some(Arc::new(Failure {
            at,
            retry_at: Instant::now() + backoff,
            reason: reason.clone(),
        })));
        reason
    }
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.inner.current.load();
        f.debug_struct("TokenCache")
            .field("source", &self.inner.source.name())
            .field("expires_at", &cur.as_ref().map(|c| c.expires_at))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counting {
        fetches: AtomicUsize,
        lifetime: Duration,
        fail: std::sync::atomic::AtomicBool,
        delay: Duration,
    }

    impl TokenSource for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                let n = self.fetches.fetch_add(1, SeqCst);
                if self.fail.load(SeqCst) {
                    return Err("identity endpoint said 503".into());
                }
                Token::bearer(&format!("tok-{n}"), self.lifetime)
            })
        }
    }

    fn source(lifetime: Duration) -> Arc<Counting> {
        Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            lifetime,
            fail: false.into(),
            delay: Duration::from_millis(50),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_fetch() {
        let src = source(Duration::from_secs(3600));
        let cache = TokenCache::new(src.clone());
        let handles: Vec<_> = (0..1000)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.get().await })
            })
            .collect();
        for h in handles {
            assert_eq!(h.await.unwrap().unwrap(), "Bearer tok-0");
        }
        assert_eq!(src.fetches.load(SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_expiry_and_keeps_old_token_on_failure() {
        let src = source(Duration::from_secs(3600));
        let cache = TokenCache::new(src.clone());
        assert_eq!(cache.get().await.unwrap(), "Bearer tok-0");
        // 55 minutes in: inside the 5-minute refresh window.
        tokio::time::sleep(Duration::from_secs(55 * 60 + 1)).await;
        assert_eq!(cache.fresh(Instant::now()), None);
        src.fail.store(true, SeqCst);
        assert_eq!(
            cache.get().await.unwrap(),
            "Bearer tok-0",
            "old token still valid"
        );
        // Inside the backoff, no new fetch is made.
        assert_eq!(cache.get().await.unwrap(), "Bearer tok-0");
        assert_eq!(src.fetches.load(SeqCst), 2);
        src.fail.store(false, SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(cache.get().await.unwrap(), "Bearer tok-2");
        assert!(cache.fresh(Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_and_failing_source_is_a_typed_error() {
        let src = source(Duration::from_secs(60));
        src.fail.store(true, SeqCst);
        let cache = TokenCache::new(src.clone());
        let err = cache.get().await.unwrap_err();
        assert_eq!(&*err.source_name, "counting");
        assert!(
            err.to_string().contains("identity endpoint said 503"),
            "{err}"
        );
        // Fails fast during the backoff: no second fetch.
        assert!(cache.get().await.is_err());
        assert_eq!(src.fetches.load(SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_refresh_at_half_life() {
        let src = source(Duration::from_secs(60));
        let cache = TokenCache::new(src.clone());
        cache.get().await.unwrap();
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(cache.fresh(Instant::now()).is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(cache.fresh(Instant::now()).is_none());
        assert_eq!(cache.get().await.unwrap(), "Bearer tok-1");
    }
}
