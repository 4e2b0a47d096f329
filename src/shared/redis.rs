//! [`RedisStore`]: the shared state on a Redis server (feature `redis`).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Exchanged, News, SharedStore, redact_url};
use crate::credential::BoxFuture;
use crate::error::BoxError;

/// One round trip for all backends. KEYS: each backend's wait, open circuit, demand and
/// answers through, then the replicas; ARGV: this replica's name, `alive` (ms), then each
/// backend's wait, open (ms), demand (thousandths of a request) and answers through (a running
/// count). A wait is extended (never shortened) to `now + wait` on Redis' own clock and expires
/// then; a demand or count is this replica's field in the backend's hash, dropped when the
/// replica has not exchanged within `alive` (a sorted set of replica names by last exchange).
/// Back: each backend's two waits' time left and its demands' and counts' totals, in order,
/// then the number of live replicas.
const EXCHANGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = (#KEYS - 1) / 4
local replicas = KEYS[#KEYS]
local me = ARGV[1]
local alive = tonumber(ARGV[2]) or 300
redis.call('ZADD', replicas, now, me)
local gone = redis.call('ZRANGEBYSCORE', replicas, '-inf', now - alive)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', replicas, '-inf', now - alive)
end
redis.call('PEXPIRE', replicas, alive * 10)
local out = {}
for b = 0, n - 1 do
  for j = 1, 2 do
    local key = KEYS[b * 4 + j]
    local wait = tonumber(ARGV[2 + b * 4 + j]) or 0
    local cur = tonumber(redis.call('GET', key) or '0') or 0
    if wait > 0 and now + wait > cur then
      cur = now + wait
      redis.call('SET', key, cur, 'PX', wait)
    end
    local left = cur - now
    if left < 0 then left = 0 end
    out[#out + 1] = left
  end
  for j = 3, 4 do
    local key = KEYS[b * 4 + j]
    redis.call('HSET', key, me, tonumber(ARGV[2 + b * 4 + j]) or 0)
    if #gone > 0 then
      redis.call('HDEL', key, unpack(gone))
    end
    redis.call('PEXPIRE', key, alive * 10)
    local total = 0
    for _, v in ipairs(redis.call('HVALS', key)) do
      total = total + (tonumber(v) or 0)
    end
    out[#out + 1] = total
  end
end
out[#out + 1] = redis.call('ZCARD', replicas)
return out
";

/// The shared state on one Redis server (a managed Redis too), through the `redis` crate's
/// reconnecting connection manager. The connection is made lazily: a replica starts, and
/// serves, while Redis is down.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    script: redis::Script,
    url: String,
    replicas_key: String,
}

#[derive(Clone)]
struct Cluster {
    client: redis::cluster::ClusterClient,
    conn: std::sync::Arc<tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>>,
}

/// One server through the reconnecting manager, or a Redis Cluster (connected at the first
/// exchange that reaches it, and again after a failed connect).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    // Boxed: a cluster client is large, and the store is built once.
    Cluster(Box<Cluster>),
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisStore {
    /// A store at `url` (`redis://[user:password@]host[:port][/db]`; `rediss://` for TLS,
    /// the server's certificate checked against the system's roots and webpki's, as managed
    /// Redis services need), counting replicas under `key_prefix` (the prefix of
    /// [`SharedSettings`](super::SharedSettings)). Fails only on a URL that cannot be used; it
    /// does not connect yet. Must be called inside a tokio runtime.
    ///
    /// Several URLs separated by commas are the seed nodes of a Redis Cluster: every key of a
    /// prefix is in one hash slot (the prefix is the key's hash tag), so each exchange is one
    /// script call on the node holding it.
    pub fn new(url: &str, key_prefix: &str) -> Result<RedisStore, BoxError> {
        Self::built(url, key_prefix, None)
    }

    /// [`RedisStore::new`] for a `rediss://` server whose certificate chains to `ca_pem` (PEM:
    /// a private CA) instead of the system's roots.
    pub fn with_root_certificate(
        url: &str,
        key_prefix: &str,
        ca_pem: &[u8],
    ) -> Result<RedisStore, BoxError> {
        Self::built(url, key_prefix, Some(ca_pem))
    }

    fn built(url: &str, key_prefix: &str, ca_pem: Option<&[u8]>) -> Result<RedisStore, BoxError> {
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: ca_pem.map(<[u8]>::to_vec),
        };
        let redacted = url
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
        let timeout = Duration::from_millis(500);
        let conn = if url.contains(',') {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let mut builder = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout);
            if ca_pem.is_some() {
                builder = builder.certs(certs());
            }
            let client = builder
                .build()
                .map_err(|e| format!("shared state URLs {redacted}: {}", e.kind_str()))?;
            Conn::Cluster(Box::new(Cluster {
                client,
                conn: Default::default(),
            }))
        } else {
            let client = match ca_pem {
                Some(_) => redis::Client::build_with_tls(url, certs()),
                None => redis::Client::open(url),
            }
            .map_err(|e| format!("shared state URL {redacted}: {}", e.kind_str()))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            Conn::Single(
                ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| format!("shared state {redacted}: {}", e.kind_str()))?,
            )
        };
        Ok(RedisStore {
            conn,
            script: redis::Script::new(EXCHANGE),
            url: redacted,
            replicas_key: format!("{{{key_prefix}}}:replicas"),
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

/// A demand in thousandths of a request (what the script adds up), never negative.
fn milli(demand: f64) -> u64 {
    if demand.is_finite() && demand > 0.0 {
        (demand * 1000.0).round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

impl SharedStore for RedisStore {
    fn exchange<'a>(
        &'a self,
        replica: &'a str,
        alive: Duration,
        backends: &'a [(String, News)],
    ) -> BoxFuture<'a, Result<Exchanged, BoxError>> {
        Box::pin(async move {
            let mut invocation = self.script.prepare_invoke();
            invocation.arg(replica).arg(alive.as_millis() as u64);
            for (key, news) in backends {
                invocation
                    .key(format!("{key}:wait"))
                    .arg(news.wait.as_millis() as u64)
                    .key(format!("{key}:open"))
                    .arg(news.open.as_millis() as u64)
                    .key(format!("{key}:demand"))
                    .arg(milli(news.demand))
                    .key(format!("{key}:through"))
                    .arg(news.through);
            }
            invocation.key(&self.replicas_key);
            let failed = |e: redis::RedisError| BoxError::from(format!("redis: {}", e.kind_str()));
            let mut out: Vec<u64> = match &self.conn {
                Conn::Single(conn) => invocation
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(failed)?,
                Conn::Cluster(c) => {
                    let conn = c
                        .conn
                        .get_or_try_init(|| c.client.get_async_connection())
                        .await
                        .map_err(failed)?;
                    invocation
                        .invoke_async(&mut conn.clone())
                        .await
                        .map_err(failed)?
                }
            };
            let replicas = out.pop().unwrap_or(1);
            Ok(Exchanged {
                backends: out
                    .chunks_exact(4)
                    .map(|c| News {
                        wait: Duration::from_millis(c[0]),
                        open: Duration::from_millis(c[1]),
                        demand: c[2] as f64 / 1000.0,
                        through: c[3],
                    })
                    .collect(),
                replicas: u32::try_from(replicas).unwrap_or(u32::MAX),
            })
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}
