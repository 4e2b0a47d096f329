//! Shared state: what one replica learns about a backend's quota, the others know too.
//!
//! N gateway replicas (or N app instances embedding the stack) in front of the same Azure
//! deployments each keep their own [`BackendState`](crate::BackendState): without sharing, a backend's `429 ...
//! retry-after: 5` teaches one replica to wait while the other N-1 keep sending and earn their
//! own 429s, and a tripped circuit in one replica leaves the others sending to a failing
//! backend. [`SharedState`] runs one background task per replica that, every
//! [`SharedSettings::interval`], publishes each backend's waits to a [`SharedStore`] and
//! takes back the waits the other replicas published:
//!
//! | shared | published when | applied as |
//! |---|---|---|
//! | a throttled backend's wait (`retry-after` of a 429 / 529 / 503) | a replica's backend is throttled | the same wait on every replica's backend (extend-only) |
//! | an open circuit, until its probe time | a replica's breaker trips | a cooldown until then on every other replica (its own breaker decides when to probe) |
//! | the number of live replicas (each one's last exchange within 3 intervals) | every exchange | each backend's quota split evenly: the credits and token rate its quota headers give are divided by N and the pace from them is N times longer (see below) |
//!
//! The quota share assumes the load is spread evenly over the replicas (a Kubernetes Service,
//! a round-robin load balancer). While the store is down, each replica keeps the last count it
//! knew.
//!
//! **The store is never on a request's path.** Requests read only their replica's own state;
//! the task exchanges everything for all backends in one store round trip per interval
//! (0 store operations per request), bounded by [`SharedSettings::budget`]. When the store is
//! slow or down, each replica goes on with its own state, logs it once, and logs again when the
//! store answers again; no request fails or waits because of it. [`SharedState::status`] says
//! which (the gateway's `/stats` shows it).
//!
//! Waits cross as time left (milliseconds from now), and the store's own clock (Redis `TIME`)
//! turns them into instants there: replicas' clocks are never compared. A wait arrives at the
//! other replicas within about two intervals (one to publish, one to take back).
//!
//! The in-process state stays the default; [`SharedStore`] is the trait another store can
//! implement. The `redis` feature has one on a Redis server ([`RedisStore`]).
//!
//! Not shared yet: pacing (each replica paces a quota on its own; with quota headers each
//! replica sees the shared remaining quota in every answer anyway) and quota hints.

#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::error::BoxError;
use crate::state::Circuit;

#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// What one exchange with a [`SharedStore`] brought back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchanged {
    /// Each key's shared wait (time left), in the order given.
    pub waits: Vec<Duration>,
    /// Replicas that exchanged within the last `alive` (this one included).
    pub replicas: u32,
}

/// What a [`SharedStore`]'s exchange returns.
pub type Exchange<'a> = Pin<Box<dyn Future<Output = Result<Exchanged, BoxError>> + Send + 'a>>;

/// Where replicas meet. One call per interval per replica, for all its backends.
pub trait SharedStore: Send + Sync + 'static {
    /// Publishes each key's wait (time left from now; zero: none) so that a key's shared wait
    /// only ever extends and expires at its end; notes that `replica` is alive (for `alive`);
    /// returns each key's shared wait and how many replicas were alive.
    fn exchange<'a>(
        &'a self,
        replica: &'a str,
        alive: Duration,
        waits: &'a [(String, Duration)],
    ) -> Exchange<'a>;

    /// Where the store is, with any password removed (for logs and `/stats`).
    fn describe(&self) -> String;
}

/// How often and how patiently a replica exchanges with the store.
#[derive(Clone, Debug)]
pub struct SharedSettings {
    /// Between two exchanges (default 100 ms).
    pub interval: Duration,
    /// The longest an exchange may take before the replica goes on without it (default
    /// 50 ms). Requests never wait for it.
    pub budget: Duration,
    /// Prefix of every key, so several deployments can share one store (default `llm-lb`).
    pub key_prefix: String,
}

impl Default for SharedSettings {
    fn default() -> Self {
        SharedSettings {
            interval: Duration::from_millis(100),
            budget: Duration::from_millis(50),
            key_prefix: "llm-lb".into(),
        }
    }
}

/// Whether the shared state is in use and answering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Where the store is (no password).
    pub store: String,
    /// The last exchange succeeded.
    pub healthy: bool,
    /// Live replicas at the last exchange (this one included; 1 before the first).
    pub replicas: u32,
    /// Exchanges that succeeded.
    pub exchanges: u64,
    /// Exchanges that failed or ran out of time.
    pub failures: u64,
    /// Waits taken from the other replicas (a backend cooled down by another replica's news).
    pub applied: u64,
    /// Why the last failure failed.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    healthy: AtomicBool,
    replicas: std::sync::atomic::AtomicU32,
    exchanges: AtomicU64,
    failures: AtomicU64,
    applied: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// One replica's link to the shared state: a background task, stopped when the last clone
/// of this is dropped.
#[derive(Clone)]
pub struct SharedState {
    link: Arc<Link>,
}

struct Link {
    store: String,
    tally: Arc<Tally>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedState")
            .field("status", &self.status())
            .finish()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend's key: the prefix (in braces, so Redis Cluster keeps all of one deployment's keys
/// in one slot) and a hash of the backend's name and host, never a credential.
fn key(prefix: &str, backend: &Backend, kind: &str) -> String {
    // FNV-1a: stable across processes and versions (std's hasher is neither).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in backend
        .name()
        .bytes()
        .chain([0])
        .chain(backend.authority().as_str().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{{{prefix}}}:{h:016x}:{kind}")
}

impl SharedState {
    /// Starts exchanging `backends`' waits through `store` on the current tokio runtime.
    pub fn spawn(
        store: Arc<dyn SharedStore>,
        backends: Vec<Backend>,
        settings: SharedSettings,
    ) -> SharedState {
        let tally = Arc::new(Tally::default());
        let describe = store.describe();
        let task = tokio::spawn(run(store, backends, settings, tally.clone()));
        SharedState {
            link: Arc::new(Link {
                store: describe,
                tally,
                task,
            }),
        }
    }

    /// Whether the store answers, and what was exchanged.
    pub fn status(&self) -> Status {
        let t = &self.link.tally;
        Status {
            store: self.link.store.clone(),
            healthy: t.healthy.load(Acquire),
            replicas: t.replicas.load(Acquire).max(1),
            exchanges: t.exchanges.load(Relaxed),
            failures: t.failures.load(Relaxed),
            applied: t.applied.load(Relaxed),
            last_error: t
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// Time left until `until`, zero when none or past.
fn left(until: Option<Instant>, now: Instant) -> Duration {
    until.map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
}

async fn run(
    store: Arc<dyn SharedStore>,
    backends: Vec<Backend>,
    settings: SharedSettings,
    tally: Arc<Tally>,
) {
    let keys: Vec<[String; 2]> = backends
        .iter()
        .map(|b| {
            [
                key(&settings.key_prefix, b, "wait"),
                key(&settings.key_prefix, b, "open"),
            ]
        })
        .collect();
    // This replica's name in the store: random, so restarts and clones never collide.
    let replica = format!("{:016x}", fastrand::u64(..));
    let alive = settings.interval.max(Duration::from_millis(1)) * 3;
    let mut ticker = tokio::time::interval(settings.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Logged once per outage, and once when it ends.
    let mut down = false;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let mut waits = Vec::with_capacity(keys.len() * 2);
        for (b, [wait, open]) in backends.iter().zip(&keys) {
            let state = b.state();
            waits.push((wait.clone(), left(state.throttled_until(), now)));
            let open_until = match state.circuit() {
                Circuit::Open { until } => Some(until),
                _ => None,
            };
            waits.push((open.clone(), left(open_until, now)));
        }
        let answer =
            tokio::time::timeout(settings.budget, store.exchange(&replica, alive, &waits)).await;
        let (shared, replicas) = match answer {
            Ok(Ok(x)) if x.waits.len() == waits.len() => (x.waits, x.replicas.max(1)),
            other => {
                let why = match other {
                    Ok(Ok(_)) => "the store answered a different number of keys".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {:?}", settings.budget),
                };
                tally.failures.fetch_add(1, Relaxed);
                tally.healthy.store(false, Release);
                if !down {
                    tracing::warn!(store = %store.describe(), error = %why,
                        "shared state unavailable; each replica goes on with its own");
                    down = true;
                }
                *tally.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                continue;
            }
        };
        tally.exchanges.fetch_add(1, Relaxed);
        tally.healthy.store(true, Release);
        tally.replicas.store(replicas, Release);
        if down {
            tracing::info!(store = %store.describe(), "shared state answering again");
            down = false;
        }
        // What the others know and this replica does not: apply it, extend-only. A small
        // margin keeps this replica's own wait (sent a moment ago) from counting as news.
        let now = Instant::now();
        let margin = Duration::from_millis(5);
        for (b, pair) in backends.iter().zip(shared.chunks(2)) {
            let state = b.state();
            state.set_share(replicas);
            let (wait, open) = (pair[0], pair[1]);
            if wait > left(state.throttled_until(), now) + margin {
                state.throttle_until(now + wait);
                tally.applied.fetch_add(1, Relaxed);
            }
            if open > left(state.cooldown_until(), now) + margin
                && !matches!(state.circuit(), Circuit::Open { .. })
            {
                state.extend_cooldown(now + open);
                tally.applied.fetch_add(1, Relaxed);
            }
        }
    }
}

/// A store URL without its password (`redis://user:secret@host/` → `redis://user:***@host/`).
#[cfg_attr(not(any(feature = "redis", feature = "config")), allow(dead_code))]
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let host = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{user}:***@{host}")
        }
        None => authority.to_string(),
    };
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("rediss://app:s3cret@cache.example:6380"),
            "rediss://app:***@cache.example:6380"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("s3cret"), "<not a URL>");
    }

    #[test]
    fn keys_are_stable_hashes_in_one_slot() {
        let b = Backend::openai("east", "https://east.example/v1")
            .build()
            .unwrap();
        let k = key("llm-lb", &b, "wait");
        assert!(k.starts_with("{llm-lb}:") && k.ends_with(":wait"), "{k}");
        assert_eq!(k, key("llm-lb", &b.clone(), "wait"));
        let other = Backend::openai("west", "https://east.example/v1")
            .build()
            .unwrap();
        assert_ne!(k, key("llm-lb", &other, "wait"));
    }
}
