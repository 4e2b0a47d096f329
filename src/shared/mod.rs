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
//! | each replica's demand for each backend: the requests it admitted there in about the last second ([`Snapshot::admitted`](crate::Snapshot::admitted): counted when they come, a booked slot too, so pacing does not hide them) plus those in flight or waiting for a paced slot now ([`Snapshot::demand`](crate::Snapshot::demand)) | every exchange | each replica's share of the backend's quota (below) |
//! | the number of live replicas (each one's last exchange within 3 intervals) | every exchange | the shares' floor, and the equal share while the store is down |
//! | each replica's count of answers that got through | every exchange | for a backend that sends no quota headers, whose pace is learned from the answers that got through between two 429s: the other replicas' answers count too (toward the window, and shrinking the pace 0.05% each as a replica's own do), so every replica learns the whole backend's pace and paces at its share of it |
//!
//! **Pacing is shared as capacity leases**, the way YouTube's Doorman apportions a resource: at
//! each exchange every replica gets a share of each backend's quota, in proportion to its
//! demand, and paces the backend on its own at that share until the next exchange (the credits
//! and token rate its quota headers give are scaled by the share, the pace from them
//! stretched by its inverse: [`BackendState::set_share`](crate::BackendState)). The shares of
//! the live replicas add up to the whole quota: a quarter of an equal share each (so a replica
//! that was idle is never paced to a standstill when its requests come), the rest by demand.
//! Demand is what a replica is asked, not what it sends (a share by the rate each replica
//! sends would keep a starved replica starved: it sends only what its share lets it), and its
//! requests waiting count too, so a replica whose share is too small queues and its share grows.
//! A share moves a third of the way to its target at each exchange (demand jitters), and at
//! once when replicas come or go. No demand anywhere: equal shares. While the
//! store is down, each replica takes an equal share of the last count (Doorman's "safe
//! capacity"). A slot-by-slot shared GCRA was not built: a replica would either wait for the
//! store when its batch of slots ran out (the store on a request's path) or hold slots its load
//! did not need (quota unused).
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
//! Not shared: quota hints themselves (every replica reads the shared remaining quota in the
//! answers it gets anyway).

#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::credential::BoxFuture;
use crate::error::BoxError;
use crate::state::Circuit;

#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// One backend's news: what one replica publishes, and what the store gives back of all
/// replicas' news.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct News {
    /// Time left of the wait a throttled answer asked for (zero: none). Back from the store:
    /// the longest any replica published (extend-only, expiring at its end).
    pub wait: Duration,
    /// Time left until an open circuit lets a probe through (zero: not open). Back from the
    /// store: the longest, like `wait`.
    pub open: Duration,
    /// Requests the replica has for the backend: in flight and waiting for a paced slot
    /// ([`Snapshot::demand`](crate::Snapshot::demand)). Back from the store: the total
    /// of the live replicas.
    pub demand: f64,
    /// Answers of the backend that got through to this replica so far (a running count).
    /// Back from the store: the live replicas' total. A backend that sends no quota headers
    /// is paced from the answers that got through between two 429s: every replica's.
    pub through: u64,
}

/// What one exchange with a [`SharedStore`] brought back.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchanged {
    /// Each backend's news from all replicas, in the order given.
    pub backends: Vec<News>,
    /// Replicas that exchanged within the last `alive` (this one included).
    pub replicas: u32,
}

/// Where replicas meet. One call per interval per replica, for all its backends.
pub trait SharedStore: Send + Sync + 'static {
    /// Publishes each backend's news under its key (a backend's waits only ever extend and
    /// expire at their end; its demand is this replica's until the next exchange); notes that
    /// `replica` is alive, forgetting the demand of replicas silent for longer than `alive`;
    /// returns every backend's news from all live replicas and how many there are.
    fn exchange<'a>(
        &'a self,
        replica: &'a str,
        alive: Duration,
        backends: &'a [(String, News)],
    ) -> BoxFuture<'a, Result<Exchanged, BoxError>>;

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

/// A backend's key (a store adds its own suffixes): the prefix (in braces, so Redis Cluster
/// keeps all of one deployment's keys in one slot) and a hash of the backend's name and host,
/// never a credential.
fn key(prefix: &str, backend: &Backend) -> String {
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
    format!("{{{prefix}}}:{h:016x}")
}

impl SharedState {
    /// Starts exchanging `backends`' waits through `store` on the current tokio runtime.
    pub fn spawn(
        store: Arc<dyn SharedStore>,
        backends: Vec<Backend>,
        settings: SharedSettings,
    ) -> SharedState {
        for b in &backends {
            b.state().mark_shared();
        }
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

/// The window over which a replica's admission rate is averaged: a second holds enough
/// requests at a few per second to be steady, and follows a change of load within about that.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// One backend's demand on this replica, between exchanges.
#[derive(Clone, Copy, Debug, Default)]
struct Demand {
    /// Requests admitted at the last exchange.
    admitted: u64,
    /// Requests admitted per second, averaged over about [`RATE_WINDOW`].
    rate: f64,
    /// Requests in flight or waiting for a slot, averaged over two exchanges.
    queued: f64,
}

impl Demand {
    /// The demand to publish: the requests that came in the last [`RATE_WINDOW`] (the rate
    /// asked of this replica: bookings count when they are made, so pacing does not hide it)
    /// plus those in flight or waiting now (a replica whose share is too small queues, and its
    /// share grows until its requests wait about as long as the others').
    fn sample(&mut self, state: &crate::BackendState, now: Instant, elapsed: Duration) -> f64 {
        let admitted = state.admitted();
        let came = admitted.saturating_sub(self.admitted) as f64;
        self.admitted = admitted;
        let secs = elapsed.as_secs_f64().max(1e-3);
        let weight = (secs / RATE_WINDOW.as_secs_f64()).min(1.0);
        self.rate += (came / secs - self.rate) * weight;
        self.queued = (self.queued + state.demand(now)) / 2.0;
        let demand = self.rate * RATE_WINDOW.as_secs_f64() + self.queued;
        // What is left of demand that ended: none (else it would weigh against none).
        if demand < 0.01 { 0.0 } else { demand }
    }
}

/// This replica's share of a backend's quota from its demand (`mine`) and all live replicas'
/// (`total`, `mine` included): a quarter of an equal share each, so a replica that was idle
/// is never paced to a standstill when requests come, and the rest in proportion to demand
/// (which also damps the demands' jitter: measured, it kept evenly loaded replicas' p99 nearer
/// to equal shares' than a share by demand alone). No demand anywhere: equal shares.
fn share_of(mine: f64, total: f64, replicas: u32) -> f64 {
    let n = f64::from(replicas.max(1));
    if total.is_nan() || total <= 0.0 || !mine.is_finite() {
        return 1.0 / n;
    }
    let floor = 1.0 / (4.0 * n);
    floor + (1.0 - n * floor) * (mine.max(0.0) / total).min(1.0)
}

async fn run(
    store: Arc<dyn SharedStore>,
    backends: Vec<Backend>,
    settings: SharedSettings,
    tally: Arc<Tally>,
) {
    let keys: Vec<String> = backends
        .iter()
        .map(|b| key(&settings.key_prefix, b))
        .collect();
    // This replica's name in the store: random, so restarts and clones never collide.
    let replica = format!("{:016x}", fastrand::u64(..));
    let alive = settings.interval.max(Duration::from_millis(1)) * 3;
    let mut ticker = tokio::time::interval(settings.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each backend's demand: requests admitted per second (over about `RATE_WINDOW`) and
    // requests in flight or waiting (half the weight to the newest sample).
    let mut demand = vec![Demand::default(); backends.len()];
    let mut last = Instant::now();
    // Each backend's answers through at the other replicas, at the last exchange.
    let mut others_through = vec![0_u64; backends.len()];
    // Logged once per outage, and once when it ends.
    let mut down = false;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(last);
        last = now;
        let mut news = Vec::with_capacity(keys.len());
        for ((b, key), demand) in backends.iter().zip(&keys).zip(&mut demand) {
            let state = b.state();
            let open_until = match state.circuit() {
                Circuit::Open { until } => Some(until),
                _ => None,
            };
            let item = News {
                wait: left(state.throttled_until(), now),
                open: left(open_until, now),
                demand: demand.sample(state, now, elapsed),
                through: state.counters().success,
            };
            news.push((key.clone(), item));
        }
        let answer =
            tokio::time::timeout(settings.budget, store.exchange(&replica, alive, &news)).await;
        let (shared, replicas) = match answer {
            Ok(Ok(x)) if x.backends.len() == news.len() => (x.backends, x.replicas.max(1)),
            other => {
                let why = match other {
                    Ok(Ok(_)) => "the store answered a different number of keys".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {:?}", settings.budget),
                };
                tally.failures.fetch_add(1, Relaxed);
                tally.healthy.store(false, Release);
                // Without news of the others' demand: an equal share of the last count.
                let replicas = tally.replicas.load(Acquire).max(1);
                for b in &backends {
                    b.state().set_share(1.0 / f64::from(replicas));
                }
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
        // The count the shares were last set for (0: none yet).
        let counted = tally.replicas.swap(replicas, AcqRel);
        let counted = if down { 0 } else { counted };
        if down {
            tracing::info!(store = %store.describe(), "shared state answering again");
            down = false;
        }
        // What the others know and this replica does not: apply it, extend-only. A small
        // margin keeps this replica's own wait (sent a moment ago) from counting as news.
        let now = Instant::now();
        let margin = Duration::from_millis(5);
        for (((b, all), (_, mine)), last_others) in backends
            .iter()
            .zip(&shared)
            .zip(&news)
            .zip(&mut others_through)
        {
            let state = b.state();
            // Moved a third of the way each exchange (half a second to settle at 100 ms):
            // demand jitters from one exchange to the next, and a replica whose share dips
            // books its waiting requests' slots that much further apart. When replicas come or
            // go, at once: the shares' sum must stay the whole quota.
            let target = share_of(mine.demand, all.demand, replicas);
            let share = state.share();
            state.set_share(if replicas == counted {
                share + (target - share) / 3.0
            } else {
                target
            });
            // The answers the other replicas got through since the last exchange count
            // toward this replica's measure of the backend's rate (when the count of replicas
            // changed, only the new baseline).
            let others = all.through.saturating_sub(mine.through);
            if replicas == counted {
                state.others_got_through(others.saturating_sub(*last_others));
            }
            *last_others = others;
            if all.wait > left(state.throttled_until(), now) + margin {
                state.throttle_until(now + all.wait);
                tally.applied.fetch_add(1, Relaxed);
            }
            if all.open > left(state.cooldown_until(), now) + margin
                && !matches!(state.circuit(), Circuit::Open { .. })
            {
                state.extend_cooldown(now + all.open);
                tally.applied.fetch_add(1, Relaxed);
            }
        }
    }
}

/// A store URL without its password (`redis://user:secret@host/` → `redis://user:***@host/`),
/// for logs and `Debug` output.
pub fn redact_url(url: &str) -> String {
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
    fn shares_follow_demand_above_a_floor_and_add_up_to_the_whole() {
        // Even demand, or none: equal shares.
        assert_eq!(share_of(5.0, 15.0, 3), 1.0 / 3.0);
        assert_eq!(share_of(0.0, 0.0, 3), 1.0 / 3.0);
        // 60/20/20: the busy replica takes most, the quiet ones keep more than their demand's.
        let shares = [
            share_of(6.0, 10.0, 3),
            share_of(2.0, 10.0, 3),
            share_of(2.0, 10.0, 3),
        ];
        assert!(
            (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{shares:?}"
        );
        assert!((shares[0] - (1.0 / 12.0 + 0.75 * 0.6)).abs() < 1e-9);
        // An idle replica keeps a quarter of an equal share.
        assert_eq!(share_of(0.0, 10.0, 2), 1.0 / 8.0);
        assert_eq!(share_of(f64::NAN, 10.0, 2), 0.5);
        assert_eq!(
            share_of(20.0, 10.0, 2),
            share_of(10.0, 10.0, 2),
            "never more than all the demand's"
        );
    }

    /// A store that never answers.
    struct Silent;

    impl SharedStore for Silent {
        fn exchange<'a>(
            &'a self,
            _replica: &'a str,
            _alive: Duration,
            _backends: &'a [(String, News)],
        ) -> BoxFuture<'a, Result<Exchanged, BoxError>> {
            Box::pin(std::future::pending())
        }

        fn describe(&self) -> String {
            "silent".into()
        }
    }

    #[tokio::test]
    async fn the_backends_exchanged_are_marked_shared_so_their_pace_is_not_measured_alone() {
        let b = Backend::openai("a", "http://127.0.0.1:1/v1")
            .build()
            .unwrap();
        assert!(!b.state().is_shared());
        let _shared =
            SharedState::spawn(Arc::new(Silent), vec![b.clone()], SharedSettings::default());
        assert!(b.state().is_shared());
    }

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
        let k = key("llm-lb", &b);
        assert!(
            k.starts_with("{llm-lb}:") && k.len() == "{llm-lb}:".len() + 16,
            "{k}"
        );
        assert_eq!(k, key("llm-lb", &b.clone()));
        let other = Backend::openai("west", "https://east.example/v1")
            .build()
            .unwrap();
        assert_ne!(k, key("llm-lb", &other));
    }
}
