//! [`RedisStore`]: the shared state on a Redis server (feature `redis`).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Exchange, SharedStore, redact_url};
use crate::error::BoxError;

/// One round trip for all keys: each wait is extended (never shortened) to `now + wait` on
/// Redis' own clock and expires then; every key's time left comes back, in order.
const EXCHANGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local wait = tonumber(ARGV[i]) or 0
  local cur = tonumber(redis.call('GET', key) or '0') or 0
  if wait > 0 and now + wait > cur then
    cur = now + wait
    redis.call('SET', key, cur, 'PX', wait)
  end
  local left = cur - now
  if left < 0 then left = 0 end
  out[i] = left
end
return out
";

/// The shared state on one Redis server (a managed Redis too), through the `redis` crate's
/// reconnecting connection manager. The connection is made lazily: a replica starts, and
/// serves, while Redis is down.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    script: redis::Script,
    url: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisStore {
    /// A store at `url` (`redis://[user:password@]host[:port][/db]`, `rediss://` for TLS is
    /// not built in). Fails only on a URL that cannot be used; it does not connect yet.
    /// Must be called inside a tokio runtime.
    pub fn new(url: &str) -> Result<RedisStore, BoxError> {
        let redacted = redact_url(url);
        let client = redis::Client::open(url)
            .map_err(|e| format!("shared state URL {redacted}: {}", e.kind_str()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("shared state {redacted}: {}", e.kind_str()))?;
        Ok(RedisStore {
            conn,
            script: redis::Script::new(EXCHANGE),
            url: redacted,
        })
    }
}

trait KindStr {
    fn kind_str(&self) -> String;
}

impl KindStr for redis::RedisError {
    /// The error without anything of the URL (a password) in it.
    fn kind_str(&self) -> String {
        format!("{:?}", self.kind())
    }
}

impl SharedStore for RedisStore {
    fn exchange<'a>(&'a self, waits: &'a [(String, Duration)]) -> Exchange<'a> {
        Box::pin(async move {
            let mut invocation = self.script.prepare_invoke();
            for (key, wait) in waits {
                invocation.key(key).arg(wait.as_millis() as u64);
            }
            let mut conn = self.conn.clone();
            let left: Vec<u64> = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(|e| BoxError::from(format!("redis: {}", e.kind_str())))?;
            Ok(left.into_iter().map(Duration::from_millis).collect())
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}
