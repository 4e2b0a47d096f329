//! The one home of a backend's shared, live state.
//!
//! Each [`Backend`](crate::backend::Backend) owns one [`BackendState`]. The per-backend layers
//! write it ([`Endpoint`](crate::endpoint::Endpoint): in-flight count, latency, quota hints,
//! cooldown after a 429; the circuit breaker: its circuit), and `Balance` reads it to pick. It is
//! all atomics: no lock on the request path, and cloning the handle is one reference count.
//!
//! Instants are stored as nanoseconds since the state's creation, read through `tokio::time`, so
//! they follow tokio's paused clock in tests.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::*,
};
use std::time::Duration;

use tokio::time::Instant;

use crate::outcome::Outcome;

/// What a circuit breaker says about a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Circuit {
    /// Traffic flows.
    Closed,
    /// Tripped: no traffic until the instant given.
    Open {
        /// When the breaker will let probes through.
        until: Instant,
    },
    /// Probing: a limited number of requests are let through.
    HalfOpen,
}

const CIRCUIT_CLOSED: u8 = 0;
const CIRCUIT_OPEN: u8 = 1;
const CIRCUIT_HALF_OPEN: u8 = 2;
const UNKNOWN: u64 = u64::MAX;
const UNTRACKED: i64 = i64::MAX;
/// A whole quota, in millionths.
const SHARE_ALL: u32 = 1_000_000;

/// A backend's shared live state. Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct BackendState {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    cooldown_until: AtomicU64,
    throttle_streak: AtomicU32,
    /// Credential rejections in a row (401/403 to our credential), reset by a success.
    rejections: AtomicU32,
    circuit: AtomicU8,
    circuit_until: AtomicU64,
    in_flight: AtomicUsize,
    /// Attempts sent and not yet answered (no response head, no error).
    awaiting_head: AtomicUsize,
    /// When (ticks) the backend last answered anything, or began to be awaited after nothing
    /// was: the start of its current silence.
    progress_at: AtomicU64,
    /// An attempt was abandoned for the backend's silence and it has answered nothing since:
    /// its silence goes on even while nothing is awaited.
    abandoned: std::sync::atomic::AtomicBool,
    latency_ewma_ns: AtomicU64,
    remaining_requests: AtomicU64,
    remaining_tokens: AtomicU64,
    quota_seen_at: AtomicU64,
    low_headroom_until: AtomicU64,
    pace_ns: AtomicU64,
    /// The last spacing a paced admission added (ns): what one booked request is worth, to
    /// count the requests waiting for the backend ([`BackendState::demand`]).
    step_ns: AtomicU64,
    /// The end of the last slot a paced admission booked (ticks): unlike `cooldown_until`, a
    /// rest nobody waits through is not in it.
    booked_until: AtomicU64,
    /// Requests admitted (sent at once or booked a slot), counted when they come: what this
    /// replica is asked for, whatever its pace lets through.
    admitted: AtomicU64,
    /// This replica's share of the backend's quota, in millionths (all of it: `SHARE_ALL`);
    /// see [`BackendState::set_share`].
    share_ppm: AtomicU32,
    /// Since the last throttled answer (without quota hints): when (ticks) and how many answers
    /// got through; see [`BackendState::saturated_interval`].
    window_start: AtomicU64,
    window_successes: AtomicU64,
    /// Attempts sent to the backend so far (a running count).
    sends: AtomicU64,
    /// Replicas share the backend through a store ([`crate::shared`]).
    shared: AtomicBool,
    /// The token window between two 429s with precise waits (see
    /// [`BackendState::interval_from_tokens`]): when it began (ticks; 0: never), when the
    /// backend said its next token comes, the sends counted then, and the 429s since to
    /// requests sent within it.
    tw_start: AtomicU64,
    tw_token: AtomicU64,
    tw_sends: AtomicU64,
    tw_refused: AtomicU64,
    /// When (ticks) a 429 last set the pace: a 429 to a request sent before says nothing of it.
    pace_from: AtomicU64,
    /// Whether the pace was measured (between two 429s) rather than guessed.
    pace_measured: std::sync::atomic::AtomicBool,
    credits: AtomicI64,
    /// Tokens the quota hints allow before token pacing starts (`UNTRACKED`: no hints).
    token_credits: AtomicI64,
    /// The token quota's refill time per token, in picoseconds (0: not paced by tokens).
    ps_per_token: AtomicU64,
    /// The estimated token cost of the requests in flight (see `in_flight`).
    in_flight_tokens: AtomicU64,
    /// The estimated token cost of every request sent so far.
    tokens_sent: AtomicU64,
    /// What the backend counts per token of our estimate, learned from its answers.
    calibration: std::sync::Mutex<Calibration>,
    throttled_until: AtomicU64,
    counters: [AtomicU64; COUNTERS],
    /// The circuit breaker's machine for this backend, shared by every breaker over it (one
    /// backend in two groups still has one circuit). Opaque here: the breaker's business.
    breaker: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
    /// A quota scope's endpoint (another deployment of the same resource): its circuit and
    /// breaker are the endpoint's; everything else is the scope's own.
    endpoint: Option<BackendState>,
    /// A group member's state: available while one of these is, else free at their earliest.
    members: Option<Arc<[BackendState]>>,
    /// The last health probe: when (ticks, 0: never) and whether it was healthy.
    probe_at: AtomicU64,
    probe_ok: std::sync::atomic::AtomicBool,
}

const COUNTERS: usize = 7;

/// Running totals of a backend's outcomes, for stats pages and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Attempts sent (or refused) through the backend's `Endpoint`.
    pub requests: u64,
    /// Answers below 400.
    pub success: u64,
    /// 429 / 529 / 503-with-hint answers, including quota exhausted.
    pub throttled: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// Connect, transport errors and timeouts.
    pub failures: u64,
    /// 4xx answers other than 408/429.
    pub client_errors: u64,
    /// Local refusals.
    pub unavailable: u64,
}

/// The last quota hints a backend sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Requests left in the window, if the backend said.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the window, if the backend said.
    pub remaining_tokens: Option<u64>,
    /// When the hints were seen.
    pub seen_at: Instant,
}

/// A backend's live state as read at one instant ([`BackendState::snapshot`]): for stats
/// pages, metrics, dashboards and tests. Every field is a copy; reading changes nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// When it was read (tokio's clock).
    pub at: Instant,
    /// What the circuit breaker says. An open circuit whose time has passed still reads `Open`
    /// until the breaker admits a probe.
    pub circuit: Circuit,
    /// `None` when the backend could take a request now; else the earliest instant it can (the
    /// end of its cooldown or of its open circuit; for a group, of its first free member).
    pub unavailable_until: Option<Instant>,
    /// The end of the last cooldown (a 429's wait, pacing, a rejected key), if one was ever set;
    /// it may be in the past.
    pub cooldown_until: Option<Instant>,
    /// The end of the last wait a throttled answer asked for (not pacing), if any.
    pub throttled_until: Option<Instant>,
    /// Throttled answers in a row.
    pub throttle_streak: u32,
    /// Requests in flight: sent, their answer not yet read to the end.
    pub in_flight: usize,
    /// The moving average of the time to a response head, once one was seen (a slower sample
    /// is taken at once, a faster one moves it by 1/8).
    pub latency: Option<Duration>,
    /// With attempts awaiting an answer, how long since the backend last answered anything;
    /// `None` when nothing is awaited.
    pub silent_for: Option<Duration>,
    /// The current pace (one request per `pace` while its quota is used up), this replica's
    /// share of it.
    pub pace: Option<Duration>,
    /// The whole backend's pace as learned, before this replica's share stretches it.
    pub whole_pace: Option<Duration>,
    /// This replica's share of the backend's quota (`1.0`: all of it, this replica alone).
    pub share: f64,
    /// How many requests this replica has for the backend: in flight and waiting for a paced
    /// slot.
    pub demand: f64,
    /// Requests admitted so far (sent, or given a paced slot), counted when they come.
    pub admitted: u64,
    /// The last quota hints the backend sent, if any.
    pub quota: Option<Quota>,
    /// True while the last quota hints said a quota is used up.
    pub headroom_low: bool,
    /// The last health probe: when, and whether it was healthy.
    pub last_probe: Option<(Instant, bool)>,
    /// The running totals of its outcomes.
    pub counters: Counters,
    /// How many tokens of its quota the backend counts per token we estimate a request
    /// costs, learned from the quota its answers say is left (`1.0` until learned; bounded
    /// to 0.25-4).
    pub token_ratio: f64,
}

/// What two 429s with precise waits say of a backend's refill interval
/// ([`BackendState::interval_from_tokens`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tokens {
    /// The interval between its tokens.
    Interval(Duration),
    /// Nothing got in since the last 429: the same token refused again.
    SameToken,
    /// Nothing yet (the first 429, or a request sent before the window).
    Unknown,
}

impl BackendState {
    /// Fresh state: no cooldown, circuit closed, nothing in flight.
    pub(crate) fn new() -> Self {
        BackendState {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                cooldown_until: AtomicU64::new(0),
                throttle_streak: AtomicU32::new(0),
                rejections: AtomicU32::new(0),
                circuit: AtomicU8::new(CIRCUIT_CLOSED),
                circuit_until: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                awaiting_head: AtomicUsize::new(0),
                progress_at: AtomicU64::new(0),
                abandoned: std::sync::atomic::AtomicBool::new(false),
                latency_ewma_ns: AtomicU64::new(UNKNOWN),
                remaining_requests: AtomicU64::new(UNKNOWN),
                remaining_tokens: AtomicU64::new(UNKNOWN),
                quota_seen_at: AtomicU64::new(0),
                low_headroom_until: AtomicU64::new(0),
                pace_ns: AtomicU64::new(0),
                step_ns: AtomicU64::new(0),
                booked_until: AtomicU64::new(0),
                admitted: AtomicU64::new(0),
                share_ppm: AtomicU32::new(SHARE_ALL),
                window_start: AtomicU64::new(0),
                window_successes: AtomicU64::new(0),
                sends: AtomicU64::new(0),
                shared: AtomicBool::new(false),
                tw_start: AtomicU64::new(0),
                tw_token: AtomicU64::new(0),
                tw_sends: AtomicU64::new(0),
                tw_refused: AtomicU64::new(0),
                pace_from: AtomicU64::new(0),
                pace_measured: std::sync::atomic::AtomicBool::new(false),
                credits: AtomicI64::new(UNTRACKED),
                token_credits: AtomicI64::new(UNTRACKED),
                ps_per_token: AtomicU64::new(0),
                in_flight_tokens: AtomicU64::new(0),
                tokens_sent: AtomicU64::new(0),
                calibration: std::sync::Mutex::new(Calibration::new()),
                throttled_until: AtomicU64::new(0),
                counters: Default::default(),
                breaker: std::sync::OnceLock::new(),
                endpoint: None,
                members: None,
                probe_at: AtomicU64::new(0),
                probe_ok: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Fresh state for a quota scope of `endpoint` (see
    /// [`Backend::for_deployment`](crate::Backend::for_deployment)): its own cooldown, pace,
    /// quota hints and counters; the endpoint's circuit.
    pub(crate) fn scoped_under(endpoint: &BackendState) -> Self {
        let mut s = Self::new();
        if let Some(inner) = Arc::get_mut(&mut s.inner) {
            // A scope of a scope is a scope of the same endpoint.
            inner.endpoint = Some(endpoint.circuit_home().clone());
        }
        s
    }

    /// State for a member of a balance group that is itself a group of `members`: it can take a
    /// request while one of them can, and is next free when the first of them is.
    pub(crate) fn of_members(members: Arc<[BackendState]>) -> Self {
        let mut s = Self::new();
        if let Some(inner) = Arc::get_mut(&mut s.inner) {
            inner.members = Some(members);
        }
        s
    }

    /// The state that holds this backend's circuit: the endpoint's, for a quota scope.
    fn circuit_home(&self) -> &BackendState {
        self.inner.endpoint.as_ref().unwrap_or(self)
    }

    /// Nanoseconds since the epoch, plus one: 0 is reserved for "none". An instant before the
    /// epoch is stored as the epoch.
    fn ticks_of(&self, at: Instant) -> u64 {
        let ns = at.saturating_duration_since(self.inner.epoch).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX - 2).min(u64::MAX - 2) + 1
    }

    fn instant_of(&self, ticks: u64) -> Option<Instant> {
        (ticks != 0).then(|| self.inner.epoch + Duration::from_nanos(ticks - 1))
    }

    /// The breaker core of this backend: the one stored by the first caller (`make` runs only
    /// then). `None` if a value of another type is stored.
    pub(crate) fn breaker_core<T: std::any::Any + Send + Sync>(
        &self,
        make: impl FnOnce() -> T,
    ) -> Option<Arc<T>> {
        let core = self
            .circuit_home()
            .inner
            .breaker
            .get_or_init(|| Arc::new(make()));
        core.clone().downcast::<T>().ok()
    }

    /// Reads everything at once, at tokio's `now`. Not on any request path: a page, a scrape
    /// or a test asks.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        Snapshot {
            at: now,
            circuit: self.circuit(),
            unavailable_until: self.unavailable_until(now),
            cooldown_until: self.cooldown_until(),
            throttled_until: self.throttled_until(),
            throttle_streak: self.throttle_streak(),
            in_flight: self.in_flight(),
            latency: self.latency(),
            silent_for: self.silent_for(now),
            pace: self.pace(),
            whole_pace: self.whole_pace(),
            share: self.share(),
            demand: self.demand(now),
            admitted: self.admitted(),
            quota: self.quota(),
            headroom_low: self.headroom_low(now),
            last_probe: self.last_probe(),
            counters: self.counters(),
            token_ratio: self.token_ratio(),
        }
    }

    /// True when both handles point at the same backend's state.
    pub fn ptr_eq(&self, other: &BackendState) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    // ---- availability ----

    /// Until when the backend takes nothing, in ticks (0: never): the later of its cooldown and
    /// of its open circuit. The one definition both [`BackendState::unavailable_until`] and the
    /// pickers' [`BackendState::availability`] read.
    fn blocked_until(&self) -> u64 {
        let i = &self.inner;
        if let Some(members) = i.members.as_deref().filter(|m| !m.is_empty()) {
            // Free when the first member is (in this state's ticks); a member never blocked
            // (0) makes the group free.
            let mut earliest = u64::MAX;
            for m in members {
                let b = m.blocked_until();
                if b == 0 {
                    return 0;
                }
                let at = m.instant_of(b).map_or(0, |t| self.ticks_of(t));
                earliest = earliest.min(at);
            }
            return earliest;
        }
        let open = match &i.endpoint {
            None if i.circuit.load(Acquire) == CIRCUIT_OPEN => i.circuit_until.load(Acquire),
            None => 0,
            // The endpoint's circuit, in this state's ticks.
            Some(e) => match e.circuit() {
                Circuit::Open { until } => self.ticks_of(until),
                _ => 0,
            },
        };
        i.cooldown_until.load(Acquire).max(open)
    }

    /// `None` when the backend can take a request at `now`; otherwise the earliest instant it
    /// can (end of its cooldown, or of its open circuit).
    pub(crate) fn unavailable_until(&self, now: Instant) -> Option<Instant> {
        self.instant_of(self.blocked_until()).filter(|u| *u > now)
    }

    /// True when the backend can take a request at `now`.
    pub(crate) fn is_available(&self, now: Instant) -> bool {
        self.availability(now).0
    }

    /// `(is_available(now), headroom_low(now))` in one go: this runs for every candidate of
    /// every pick. A backend that was never cooled down, opened or short of headroom answers
    /// without any clock arithmetic.
    pub(crate) fn availability(&self, now: Instant) -> (bool, bool) {
        let blocked = self.blocked_until();
        let low = self.inner.low_headroom_until.load(Acquire);
        if blocked == 0 && low == 0 {
            return (true, false);
        }
        let later = |ticks: u64| self.instant_of(ticks).is_some_and(|t| t > now);
        (!later(blocked), later(low))
    }

    // ---- cooldown (throttling) ----

    /// The end of the current cooldown, if one was ever set (it may be in the past).
    pub(crate) fn cooldown_until(&self) -> Option<Instant> {
        self.instant_of(self.inner.cooldown_until.load(Acquire))
    }

    /// Cools the backend down until `until`: no request is sent to it before then (an
    /// operator's drain, or a test's). The `Endpoint` does the same on a 429's wait. A cooldown
    /// only ever extends: a shorter one never shortens the current one.
    pub fn extend_cooldown(&self, until: Instant) {
        self.inner
            .cooldown_until
            .fetch_max(self.ticks_of(until), AcqRel);
    }

    /// Sets (or with `None` clears) the pace: while a backend's request quota is used up, one
    /// request is let through every `pace` (its refill interval), see [`BackendState::admit`].
    pub(crate) fn set_pace(&self, pace: Option<Duration>) {
        let ns = pace.map_or(0, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        if self.inner.pace_ns.load(Relaxed) != ns {
            self.inner.pace_ns.store(ns, Release);
        }
    }

    /// Learns the pace from one answer's quota hints. `sample` (`reset / (limit - remaining)`)
    /// never overstates the refill interval but understates it by up to `1 / (limit -
    /// remaining)`: `remaining` is a whole number while the bucket refills continuously. So the
    /// pace is the largest recent sample, forgotten by 0.1% per answer (a quota that grew is
    /// followed within a few hundred answers); pacing at the lower bound itself earned a 429
    /// every ~10 successes at 5 requests/s.
    pub(crate) fn learn_pace(&self, sample: Option<Duration>) {
        let Some(sample) = sample else {
            self.set_pace(None);
            return;
        };
        // The whole quota's pace: this replica's share stretches it when read (`pace`), so a
        // share that changes takes effect at once.
        let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self.inner.pace_ns.fetch_update(AcqRel, Acquire, |old| {
            let next = sample.max(old - old / 1000);
            (next != old).then_some(next)
        });
    }

    /// Counts `n` answers that got through toward the rate measured between throttled answers.
    fn count_through(&self, n: u64) {
        if n > 0 && self.inner.window_start.load(Relaxed) != 0 {
            self.inner.window_successes.fetch_add(n, Relaxed);
        }
    }

    /// `n` answers got through (not throttled) with no quota hints to go by: while the backend
    /// is paced from its 429s, they count toward the rate measured between throttled answers.
    /// A pace measured at a 429 shrinks by 0.05% each (a quota that doubled is found within
    /// about 1,400 answers) until the next 429 measures it again; at 0.2% each, the probing
    /// itself earned a 429 every 25 answers at 1.5x overload in the simulator. Holding a
    /// measured pace for 200 answers before probing earned 5x fewer 429s (0.002 per success
    /// there) but served 4% less: a measurement is exact only over a window where the backend
    /// was saturated, so a held pace slower than the backend drifted slower. A pace only
    /// guessed (from a 429's wait) shrinks by 0.5% each: a guess too slow must not keep the
    /// backend below its rate until the next 429.
    pub(crate) fn got_through(&self, n: u64) {
        let Some(pace) = self.whole_pace() else {
            return;
        };
        if n == 0 {
            return;
        }
        self.count_through(n);
        // A measured pace is probed gently; a guessed one is searched from faster.
        let per = if self.inner.pace_measured.load(Acquire) {
            2000
        } else {
            200
        };
        let next = if n == 1 {
            pace - pace / per
        } else {
            pace.mul_f64((1.0 - 1.0 / f64::from(per)).powf(n.min(100_000) as f64))
        };
        self.set_pace((next >= Duration::from_millis(1)).then_some(next));
    }

    /// [`BackendState::got_through`] for `n` answers that got through to the other replicas
    /// sharing a backend that sends no quota hints: the rate measured, and the pace learned,
    /// are then the whole backend's.
    pub(crate) fn others_got_through(&self, n: u64) {
        if self.inner.quota_seen_at.load(Acquire) == 0 {
            self.got_through(n);
        }
    }

    /// A throttled answer at `now` on a backend that sends no quota hints: if enough answers got
    /// through since the last one, the interval between them is the backend's real refill
    /// interval (it was saturated: it let through all it could); starts the next window.
    ///
    /// The 429's own wait cannot tell: it is only the time to the next free slot, which under
    /// load settles near half the interval.
    pub(crate) fn saturated_interval(&self, now: Instant) -> Option<Duration> {
        const MIN_SUCCESSES: u64 = 20;
        let i = &self.inner;
        let start = i.window_start.load(Acquire);
        let through = i.window_successes.load(Acquire);
        let now_ticks = self.ticks_of(now);
        if start != 0 && through < MIN_SUCCESSES {
            return None;
        }
        i.window_start.store(now_ticks, Release);
        i.window_successes.store(0, Release);
        (start != 0).then(|| Duration::from_nanos(now_ticks.saturating_sub(start) / through))
    }

    /// The backend's refill interval from two 429s whose waits are precise (milliseconds): each
    /// says when the backend's next token comes (`now + wait`). Between two of them the quota
    /// was empty at both ends, so the `k` requests it let in between took exactly the tokens
    /// that came between: the interval is their span over `k`, whatever the quota's burst and
    /// however many answers are still on their way. `k` is counted at send time: the sends
    /// since the first 429, less the 429s to them. `None` when
    /// this 429 starts the window, when its request was sent before the window began, or when
    /// no request got in since (the same token refused twice); the window then goes on.
    fn interval_from_tokens(&self, now: Instant, sent_at: Instant, token: Instant) -> Tokens {
        let i = &self.inner;
        let sends = i.sends.load(Acquire);
        let restart = || {
            i.tw_start.store(self.ticks_of(now), Release);
            i.tw_token.store(self.ticks_of(token), Release);
            i.tw_sends.store(sends, Release);
            i.tw_refused.store(0, Release);
        };
        let start = i.tw_start.load(Acquire);
        if start == 0 {
            restart();
            return Tokens::Unknown;
        }
        if self.ticks_of(sent_at) < start {
            return Tokens::Unknown;
        }
        let refused = i.tw_refused.load(Acquire);
        let k = sends
            .saturating_sub(i.tw_sends.load(Acquire))
            .saturating_sub(refused + 1);
        let (t1, t2) = (i.tw_token.load(Acquire), self.ticks_of(token));
        if k == 0 || t2 <= t1 {
            i.tw_refused.fetch_add(1, AcqRel);
            return Tokens::SameToken;
        }
        restart();
        Tokens::Interval(Duration::from_nanos((t2 - t1) / k))
    }

    /// A throttled answer with no quota hints, at `now`, to a request sent at `sent_at`, that
    /// asked to wait `wait`: sets the pace the backend is sent to from now on.
    ///
    /// - The wait is precise (milliseconds) and this replica is alone on the backend: two such
    ///   429s give the interval exactly ([`BackendState::interval_from_tokens`]); the pace is
    ///   that, 2% slower (sends off the token's edge). S1p: 7-8 backend 429s per 600 over six
    ///   runs, two per backend while learning (8-15 with the rules below alone). A second 429
    ///   for the same token, once the interval is known, leaves the pace.
    ///
    /// Otherwise:
    /// - Enough answers got through since the last 429: the rate they came at is what the
    ///   backend bears ([`BackendState::saturated_interval`]); the pace is that interval.
    /// - Already paced, and the request was sent after the pace was set: the pace is too fast,
    ///   by evidence; it grows by a quarter (or to the guess below, if longer). Keeping the
    ///   longer of the pace and the guess instead held S1p's backends at a first guess 30% too
    ///   fast for a second: a 429 every third request.
    /// - Already paced, the request sent before: it says nothing of the pace, which stays.
    /// - Not paced yet: twice the wait asked (a 429's wait is the time to the backend's next
    ///   free slot: half an interval on average). One sample of it may be anywhere in the
    ///   interval, so a first guess too fast is corrected by the rule above.
    ///
    /// Bounded to 1 ms ..= 1 s.
    pub(crate) fn pace_from_throttle(
        &self,
        now: Instant,
        sent_at: Instant,
        wait: Duration,
        precise: bool,
    ) {
        // Alone on the backend only: replicas sharing it spend its tokens too, and their sends
        // are not counted here (scaling by the share measured by demand made S8p worse: 22-38
        // backend 429s and a p99 of up to 2.6 s, against 20-32 and 1.2-1.7 s without).
        let alone = !self.inner.shared.load(Acquire);
        let tokens = if precise && alone {
            self.interval_from_tokens(now, sent_at, now + wait)
        } else {
            Tokens::Unknown
        };
        // A second 429 for a token already refused once, once the interval is known: a
        // request sent with another at the same slot, not a pace too fast; the window goes on.
        if tokens == Tokens::SameToken && self.inner.pace_measured.load(Acquire) {
            return;
        }
        if let Tokens::Interval(interval) = tokens {
            // Exact up to the wait's rounding: a margin keeps sends off the token's edge.
            let pace = interval + interval / 50;
            self.set_pace(Some(
                pace.clamp(Duration::from_millis(1), Duration::from_secs(1)),
            ));
            self.inner.pace_measured.store(true, Release);
            self.inner.pace_from.store(self.ticks_of(now), Release);
            // The answers-between-429s window starts again from here.
            self.inner.window_start.store(self.ticks_of(now), Release);
            self.inner.window_successes.store(0, Release);
            return;
        }
        let guess = wait.saturating_mul(2);
        let measured = self.saturated_interval(now);
        let pace = match measured {
            Some(measured) => measured,
            None => match self.whole_pace() {
                Some(p) if self.ticks_of(sent_at) >= self.inner.pace_from.load(Acquire) => {
                    (p + p / 4).max(guess)
                }
                Some(_) => return,
                None => guess,
            },
        };
        self.set_pace(Some(
            pace.clamp(Duration::from_millis(1), Duration::from_secs(1)),
        ));
        self.inner.pace_measured.store(measured.is_some(), Release);
        self.inner.pace_from.store(self.ticks_of(now), Release);
    }

    /// True when the backend's answers tell its token quota (its admissions are spaced by it).
    pub(crate) fn is_token_paced(&self) -> bool {
        self.inner.ps_per_token.load(Relaxed) != 0
    }

    /// True when admissions are spaced: by a request pace, or by the token quota's rate.
    pub(crate) fn is_paced(&self) -> bool {
        self.inner.pace_ns.load(Acquire) != 0 || self.inner.ps_per_token.load(Acquire) != 0
    }

    /// Tells the backend which share of its quota this replica may spend (`1.0`: all of it, the
    /// default; the shared state sets it, see [`crate::shared`]): the credits and the token
    /// rate its quota hints give are scaled by it, and the pace from its hints is stretched by
    /// its inverse, so replicas whose shares add up to one spend the quota once. A share is
    /// clamped to `[0.000001, 1]`.
    pub(crate) fn set_share(&self, share: f64) {
        let ppm = if share.is_nan() {
            SHARE_ALL
        } else {
            (share.clamp(0.0, 1.0) * f64::from(SHARE_ALL)).round() as u32
        };
        self.inner.share_ppm.store(ppm.max(1), Release);
    }

    /// Notes that replicas share the backend through a store: its pace is not measured from
    /// this replica's sends alone.
    pub(crate) fn mark_shared(&self) {
        self.inner.shared.store(true, Release);
    }

    /// Whether replicas share the backend ([`BackendState::mark_shared`]).
    #[cfg(test)]
    pub(crate) fn is_shared(&self) -> bool {
        self.inner.shared.load(Acquire)
    }

    /// This replica's share of the backend's quota (`1.0`: all of it, this replica alone).
    pub(crate) fn share(&self) -> f64 {
        f64::from(self.share_ppm()) / f64::from(SHARE_ALL)
    }

    fn share_ppm(&self) -> u32 {
        self.inner.share_ppm.load(Acquire).clamp(1, SHARE_ALL)
    }

    /// `n` scaled by this replica's share (rounded down).
    fn of_share(&self, n: i64) -> i64 {
        let ppm = self.share_ppm();
        if ppm == SHARE_ALL {
            return n;
        }
        (i128::from(n) * i128::from(ppm) / i128::from(SHARE_ALL)) as i64
    }

    /// How many requests this replica has for the backend now: those in flight, and those
    /// waiting for a paced slot of it (the time booked ahead, over one slot's spacing). With
    /// the rate of [`BackendState::admitted`], what the shared state weighs the replicas'
    /// shares by.
    pub(crate) fn demand(&self, now: Instant) -> f64 {
        let mut demand = self.in_flight() as f64;
        let step = self.inner.step_ns.load(Acquire);
        let until = self.inner.booked_until.load(Acquire);
        if step != 0 && until != 0 {
            // Booked slots begin where a throttled answer's wait ends, if later than now.
            let from = self
                .ticks_of(now)
                .max(self.inner.throttled_until.load(Acquire));
            demand += until.saturating_sub(from) as f64 / step as f64;
        }
        demand
    }

    /// The spacing of the backend's paced slots as last booked (the request pace or, for a
    /// token quota, the refill time of the last request's tokens, whichever was longer), or
    /// its request pace before any was booked.
    pub(crate) fn slot_spacing(&self) -> Option<Duration> {
        let step = self.inner.step_ns.load(Acquire);
        if step != 0 {
            return Some(Duration::from_nanos(step));
        }
        self.pace()
    }

    /// Requests admitted to the backend so far: sent, or given a paced slot to wait for, counted
    /// when they come (so their rate is the rate asked of this replica, not the rate its pace
    /// lets through).
    pub(crate) fn admitted(&self) -> u64 {
        self.inner.admitted.load(Relaxed)
    }

    /// The whole backend's pace as learned (from quota hints, or from the answers that got
    /// through between 429s), before this replica's share stretches it.
    pub(crate) fn whole_pace(&self) -> Option<Duration> {
        let ns = self.inner.pace_ns.load(Acquire);
        (ns != 0).then(|| Duration::from_nanos(ns))
    }

    /// The current pace, if the backend is being paced: the whole backend's, stretched by this
    /// replica's share ([`BackendState::share`]).
    pub(crate) fn pace(&self) -> Option<Duration> {
        let ns = self.inner.pace_ns.load(Acquire);
        if ns == 0 {
            return None;
        }
        let ppm = self.share_ppm();
        if ppm == SHARE_ALL {
            return Some(Duration::from_nanos(ns));
        }
        let stretched = u128::from(ns) * u128::from(SHARE_ALL) / u128::from(ppm);
        Some(Duration::from_nanos(
            u64::try_from(stretched).unwrap_or(u64::MAX),
        ))
    }

    /// Sets the token quota's state from one answer's hints: the tokens that may go at once
    /// before token pacing starts, and the quota's refill rate (tokens per second), both as
    /// the backend counts them; `others`: the estimated cost of the requests sent since the
    /// answered one was counted (in flight), already spent of that. `None`: not said (token
    /// pacing stops). The backend's counts are turned into our estimate's by the learned
    /// [`Snapshot::token_ratio`].
    pub(crate) fn set_token_quota(&self, credits: Option<i64>, others: i64, rate: Option<f64>) {
        let ratio = self.token_ratio();
        let credits = credits.map(|c| (self.of_share(c) as f64 / ratio) as i64 - others);
        let rate = rate.map(|r| r * self.share() / ratio);
        self.inner
            .token_credits
            .store(credits.map_or(UNTRACKED, |c| c.min(UNTRACKED - 1)), Release);
        let ps = rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .map_or(0, |r| (1e12 / r).min(u64::MAX as f64) as u64);
        if self.inner.ps_per_token.load(Relaxed) != ps {
            self.inner.ps_per_token.store(ps, Release);
        }
    }

    /// Sets how many more requests the backend's last quota hints allow before pacing starts
    /// (`None`: no hints, pace every request once a pace is set).
    pub(crate) fn set_credits(&self, credits: Option<i64>) {
        let credits = credits.map(|c| self.of_share(c));
        self.inner
            .credits
            .store(credits.map_or(UNTRACKED, |c| c.min(UNTRACKED - 1)), Release);
    }

    /// Records that a request was just sent to the backend at `now`: it spends one credit; with
    /// none left (or none tracked) and a pace set, the next request may go one pace later (the
    /// cooldown moves to `max(cooldown, now) + pace`).
    #[cfg(test)]
    pub(crate) fn admit(&self, now: Instant) {
        self.admit_cost(now, 0);
    }

    /// [`BackendState::admit`] for a request estimated to cost `tokens` of the token quota: it
    /// also spends that many token credits, and with too few left (and a token rate known) the
    /// next request waits at least the time the quota takes to refill them. The wait is the
    /// longer of the request pace's and the tokens', not their sum.
    pub(crate) fn admit_cost(&self, now: Instant, tokens: u32) {
        self.inner.admitted.fetch_add(1, Relaxed);
        let mut step = Duration::ZERO;
        let before = self.inner.credits.load(Relaxed);
        if before == UNTRACKED || self.inner.credits.fetch_sub(1, AcqRel) <= 0 {
            step = self.pace().unwrap_or_default();
        }
        let ps = self.inner.ps_per_token.load(Acquire);
        if tokens > 0
            && ps > 0
            && self.inner.token_credits.load(Relaxed) != UNTRACKED
            && self
                .inner
                .token_credits
                .fetch_sub(i64::from(tokens), AcqRel)
                < i64::from(tokens)
        {
            let ps_total = u128::from(ps) * u128::from(tokens);
            let refill = Duration::from_nanos(u64::try_from(ps_total / 1000).unwrap_or(u64::MAX));
            step = step.max(refill);
        }
        if step.is_zero() {
            return;
        }
        let now_ticks = self.ticks_of(now);
        let pace_ticks = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
        if self.inner.step_ns.load(Relaxed) != pace_ticks {
            self.inner.step_ns.store(pace_ticks, Release);
        }
        let slot = |cur: u64| cur.max(now_ticks).saturating_add(pace_ticks);
        let booked = match self
            .inner
            .cooldown_until
            .fetch_update(AcqRel, Acquire, |cur| Some(slot(cur)))
        {
            Ok(cur) | Err(cur) => slot(cur),
        };
        self.inner.booked_until.fetch_max(booked, AcqRel);
    }

    /// Cools the backend down until `until` because it answered 429 (or 529, or 503 with a
    /// hint) asking to wait that long: like [`BackendState::extend_cooldown`], and remembered
    /// apart from pacing, so a request holding a booked slot is not sent into a server's wait.
    pub(crate) fn throttle_until(&self, until: Instant) {
        self.inner
            .throttled_until
            .fetch_max(self.ticks_of(until), AcqRel);
        self.extend_cooldown(until);
    }

    /// The end of the last wait a throttled answer asked for (not pacing), if any.
    pub(crate) fn throttled_until(&self) -> Option<Instant> {
        self.instant_of(self.inner.throttled_until.load(Acquire))
    }

    /// Counts one more throttled answer in a row and returns the new streak length.
    pub(crate) fn note_throttled(&self) -> u32 {
        self.inner
            .throttle_streak
            .fetch_add(1, AcqRel)
            .saturating_add(1)
    }

    /// How many throttled answers in a row the backend gave.
    pub(crate) fn throttle_streak(&self) -> u32 {
        self.inner.throttle_streak.load(Acquire)
    }

    /// Resets the throttle streak (after a success), and the credential rejections.
    pub(crate) fn reset_throttle_streak(&self) {
        if self.inner.throttle_streak.load(Relaxed) != 0 {
            self.inner.throttle_streak.store(0, Release);
        }
        if self.inner.rejections.load(Relaxed) != 0 {
            self.inner.rejections.store(0, Release);
        }
    }

    /// Counts one more rejection of our credential in a row; returns how many.
    pub(crate) fn note_rejected(&self) -> u32 {
        self.inner.rejections.fetch_add(1, AcqRel).saturating_add(1)
    }

    // ---- circuit ----

    /// The circuit breaker's view of the backend. An open circuit whose time has passed still
    /// reads `Open`; the breaker moves it to half-open when it admits a probe.
    pub(crate) fn circuit(&self) -> Circuit {
        if let Some(e) = &self.inner.endpoint {
            return e.circuit();
        }
        match self.inner.circuit.load(Acquire) {
            CIRCUIT_OPEN => Circuit::Open {
                until: self
                    .instant_of(self.inner.circuit_until.load(Acquire))
                    .unwrap_or(self.inner.epoch),
            },
            CIRCUIT_HALF_OPEN => Circuit::HalfOpen,
            _ => Circuit::Closed,
        }
    }

    /// Sets the circuit (written by the circuit breaker only).
    pub(crate) fn set_circuit(&self, circuit: Circuit) {
        if let Some(e) = &self.inner.endpoint {
            return e.set_circuit(circuit);
        }
        match circuit {
            Circuit::Closed => self.inner.circuit.store(CIRCUIT_CLOSED, Release),
            Circuit::HalfOpen => self.inner.circuit.store(CIRCUIT_HALF_OPEN, Release),
            Circuit::Open { until } => {
                self.inner
                    .circuit_until
                    .store(self.ticks_of(until), Release);
                self.inner.circuit.store(CIRCUIT_OPEN, Release);
            }
        }
    }

    // ---- load ----

    /// Requests in flight: sent, and their answer not yet read to the end.
    pub(crate) fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Relaxed)
    }

    /// The estimated token cost of the requests in flight.
    pub(crate) fn in_flight_tokens(&self) -> u64 {
        self.inner.in_flight_tokens.load(Relaxed)
    }

    /// Counts a request estimated to cost `tokens` of the token quota in flight until the
    /// guard is dropped.
    pub(crate) fn start_request(&self, tokens: u32) -> InFlight {
        self.inner.in_flight.fetch_add(1, Relaxed);
        self.inner.sends.fetch_add(1, Relaxed);
        let mut sent = 0;
        if tokens != 0 {
            self.inner
                .in_flight_tokens
                .fetch_add(u64::from(tokens), Relaxed);
            sent = self.inner.tokens_sent.fetch_add(u64::from(tokens), Relaxed) + u64::from(tokens);
        }
        InFlight {
            state: self.clone(),
            tokens,
            sent,
        }
    }

    /// How many tokens of its quota the backend counts per token of our estimate.
    pub(crate) fn token_ratio(&self) -> f64 {
        self.inner
            .calibration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ratio
    }

    /// Learns the token ratio from one answer to a request sent at `sent_at` (see
    /// [`Calibration`]): the quota's level it tells, if any, and whether the request was
    /// refused (throttled: it spent nothing).
    pub(crate) fn calibrate(
        &self,
        guard: &InFlight,
        sent_at: Instant,
        level: Option<Level>,
        refused: bool,
    ) {
        if level.is_none() && !refused {
            return;
        }
        let mut c = self
            .inner
            .calibration
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if refused {
            c.refused(guard.sent, guard.tokens);
        }
        if let Some(level) = level {
            // Requests wait for the token quota's refill: our credits are spent.
            let holding_back = self.inner.token_credits.load(Relaxed) < 0;
            c.learn(level, sent_at, guard.sent, self.share(), holding_back);
        }
    }

    /// Counts an attempt as awaiting its answer's head from `now` until the guard is dropped
    /// (when the head or an error comes, or the attempt is abandoned).
    pub(crate) fn await_head(&self, now: Instant) -> AwaitingHead {
        if self.inner.awaiting_head.fetch_add(1, AcqRel) == 0 && !self.inner.abandoned.load(Acquire)
        {
            // A silence starts only once something is awaited (unless it never ended).
            self.inner.progress_at.store(self.ticks_of(now), Release);
        }
        AwaitingHead {
            state: self.clone(),
        }
    }

    /// Notes that the backend answered (a head or an error) at `now`.
    pub(crate) fn note_progress(&self, now: Instant) {
        self.inner.progress_at.fetch_max(self.ticks_of(now), AcqRel);
        if self.inner.abandoned.load(Relaxed) {
            self.inner.abandoned.store(false, Release);
        }
    }

    /// Notes that an attempt was given up on without an answer (a timeout): the backend's
    /// silence goes on until it answers something.
    pub(crate) fn note_abandoned(&self) {
        self.inner.abandoned.store(true, Release);
    }

    /// How long the backend has been silent: with attempts awaiting an answer, the time since it
    /// last answered anything (or since it was first awaited). `None` when nothing is awaited.
    /// A hung backend's silence grows; a busy one answers now and then.
    pub(crate) fn silent_for(&self, now: Instant) -> Option<Duration> {
        if self.inner.awaiting_head.load(Acquire) == 0 {
            return None;
        }
        let since = self.instant_of(self.inner.progress_at.load(Acquire))?;
        Some(now.saturating_duration_since(since))
    }

    /// True when the backend answered nothing since `since`.
    pub(crate) fn silent_since(&self, since: Instant) -> bool {
        self.inner.progress_at.load(Acquire) <= self.ticks_of(since)
    }

    /// Folds one latency sample into the moving average, peak-sensitive: a slower sample is
    /// taken at once, a faster one moves the average by 1/8 (so a backend that slows down is
    /// avoided at once, and earns its way back).
    pub(crate) fn record_latency(&self, sample: Duration) {
        let s = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX - 1);
        let _ = self
            .inner
            .latency_ewma_ns
            .fetch_update(AcqRel, Acquire, |old| {
                Some(if old == UNKNOWN || s > old {
                    s
                } else {
                    old - old / 8 + s / 8
                })
            });
    }

    /// The moving average of response-head latency, once a sample has been seen.
    pub(crate) fn latency(&self) -> Option<Duration> {
        let ns = self.inner.latency_ewma_ns.load(Acquire);
        (ns != UNKNOWN).then(|| Duration::from_nanos(ns))
    }

    // ---- quota hints ----

    /// Records the quota hints of a response.
    pub(crate) fn record_quota(
        &self,
        remaining_requests: Option<u64>,
        remaining_tokens: Option<u64>,
        at: Instant,
    ) {
        if remaining_requests.is_none() && remaining_tokens.is_none() {
            return;
        }
        let clamp = |v: Option<u64>| v.map_or(UNKNOWN, |v| v.min(UNKNOWN - 1));
        self.inner
            .remaining_requests
            .store(clamp(remaining_requests), Relaxed);
        self.inner
            .remaining_tokens
            .store(clamp(remaining_tokens), Relaxed);
        self.inner.quota_seen_at.store(self.ticks_of(at), Release);
    }

    /// The last quota hints, if any were seen.
    pub(crate) fn quota(&self) -> Option<Quota> {
        let seen_at = self.instant_of(self.inner.quota_seen_at.load(Acquire))?;
        let get = |a: &AtomicU64| Some(a.load(Relaxed)).filter(|v| *v != UNKNOWN);
        Some(Quota {
            remaining_requests: get(&self.inner.remaining_requests),
            remaining_tokens: get(&self.inner.remaining_tokens),
            seen_at,
        })
    }

    /// Marks the backend as having no quota headroom until `until` (its last answer said a
    /// quota is used up). `Balance` then prefers other backends of the tier, before this one
    /// answers 429. Replaces any earlier mark.
    pub(crate) fn mark_low_headroom(&self, until: Instant) {
        self.inner
            .low_headroom_until
            .store(self.ticks_of(until), Release);
    }

    /// True while the last quota hints said a quota is used up.
    pub(crate) fn headroom_low(&self, now: Instant) -> bool {
        self.availability(now).1
    }

    // ---- counters ----

    /// Counts one attempt's outcome.
    pub(crate) fn record_outcome(&self, outcome: &Outcome) {
        let c = &self.inner.counters;
        c[0].fetch_add(1, Relaxed);
        let slot = match outcome {
            Outcome::Success => 1,
            Outcome::Throttled { .. } | Outcome::QuotaExhausted => 2,
            Outcome::ServerError { .. } => 3,
            Outcome::ConnectError
            | Outcome::Transport
            | Outcome::Timeout
            | Outcome::CredentialRejected { .. } => 4,
            Outcome::ClientError { .. } => 5,
            Outcome::Unavailable { .. } => 6,
        };
        c[slot].fetch_add(1, Relaxed);
    }

    /// Notes a health probe's result.
    pub(crate) fn note_probe(&self, at: Instant, healthy: bool) {
        self.inner.probe_ok.store(healthy, Release);
        self.inner.probe_at.store(self.ticks_of(at), Release);
    }

    /// The last health probe: when, and whether it was healthy. `None` before the first.
    pub(crate) fn last_probe(&self) -> Option<(Instant, bool)> {
        let at = self.instant_of(self.inner.probe_at.load(Acquire))?;
        Some((at, self.inner.probe_ok.load(Acquire)))
    }

    /// True once the backend has answered (or failed) at least one attempt.
    pub(crate) fn answered_once(&self) -> bool {
        self.inner.counters[0].load(Relaxed) > 0
    }

    /// The running totals.
    pub(crate) fn counters(&self) -> Counters {
        let c = &self.inner.counters;
        let g = |i: usize| c[i].load(Relaxed);
        Counters {
            requests: g(0),
            success: g(1),
            throttled: g(2),
            server_errors: g(3),
            failures: g(4),
            client_errors: g(5),
            unavailable: g(6),
        }
    }
}

impl fmt::Debug for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendState")
            .field("cooldown_until", &self.cooldown_until())
            .field("circuit", &self.circuit())
            .field("in_flight", &self.in_flight())
            .field("latency", &self.latency())
            .field("quota", &self.quota())
            .field("counters", &self.counters())
            .finish()
    }
}

/// Counts one request in flight on a backend until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    state: BackendState,
    tokens: u32,
    /// The backend's `tokens_sent` with this request's cost in it.
    sent: u64,
}

/// What an answer said of the token quota, as the backend counts it: the tokens left when the
/// request was counted, what the quota holds when full, and its refill rate per second.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Level {
    pub(crate) left: f64,
    pub(crate) capacity: f64,
    pub(crate) rate: f64,
}

/// The learned ratio between what a backend counts of its token quota and what we estimate.
/// Between the answers to two requests, the backend spent what its level says it lost plus
/// what refilled meanwhile, and we sent what our estimates say, less the requests it refused
/// (a 429 spends nothing); their ratio is a sample. A sample spans at least 100 ms and a
/// twentieth of the quota (shorter spans are noise), and only while the quota was below 90% full
/// (a full one refills nothing, so it tells nothing). The ratio is the mean of the first five
/// samples, then moves a fifth of the way to each (bounded to 0.25-4). While the quota is full
/// and requests wait for it, the ratio comes down 5% per round trip.
#[derive(Debug)]
struct Calibration {
    ratio: f64,
    /// The base of the next sample: an answer's level, when its request was sent, and our
    /// `tokens_sent` with it.
    last: Option<(f64, Instant, u64)>,
    /// Requests refused since the base: their `tokens_sent` mark and cost.
    refused: std::collections::VecDeque<(u64, u32)>,
    /// When the ratio last came down for a full quota.
    probed: Option<Instant>,
    /// Samples taken.
    samples: u32,
}

impl Calibration {
    const BOUNDS: (f64, f64) = (0.25, 4.0);
    /// How far the ratio moves towards one sample, after the first few.
    const STEP: f64 = 0.2;
    /// The least time between a sample's two requests.
    const MIN_APART: Duration = Duration::from_millis(100);
    /// The least share of the quota's capacity a sample's requests must have cost.
    const MIN_SPAN: f64 = 0.05;
    /// Above this share of its capacity the quota is full (it tells no sample).
    const FULL: f64 = 0.9;
    /// How much the ratio comes down per round trip that finds the quota full while we
    /// hold requests back.
    const PROBE: f64 = 0.05;
    /// The most refusals remembered between two samples.
    const REFUSALS: usize = 1024;

    fn new() -> Self {
        Calibration {
            ratio: 1.0,
            last: None,
            refused: std::collections::VecDeque::new(),
            probed: None,
            samples: 0,
        }
    }

    /// A request (its `tokens_sent` mark, its cost) was refused: it spent nothing.
    fn refused(&mut self, sent: u64, tokens: u32) {
        if self.refused.len() == Self::REFUSALS {
            // Too many to tell a sample: start over.
            self.refused.clear();
            self.last = None;
            return;
        }
        self.refused.push_back((sent, tokens));
    }

    fn learn(&mut self, level: Level, sent_at: Instant, sent: u64, share: f64, holding_back: bool) {
        let full = Self::FULL * level.capacity;
        if level.left > full && holding_back && self.probed.is_none_or(|p| sent_at > p) {
            // Full while we hold requests back: our estimate counts more than the backend
            // does; a full quota tells no sample, so the ratio comes down a step, once per
            // round trip (the answer to a request sent after the last step), until the quota
            // is spent below full and samples set it.
            self.ratio = (self.ratio * (1.0 - Self::PROBE)).max(Self::BOUNDS.0);
            self.probed = Some(Instant::now());
        }
        let rebase = |c: &mut Self| {
            c.last = Some((level.left, sent_at, sent));
            c.refused.retain(|(m, _)| *m > sent);
        };
        let Some((left, at, before)) = self.last else {
            rebase(self);
            return;
        };
        if sent_at <= at {
            // An answer to an earlier request that came later: nothing to compare.
            return;
        }
        let apart = sent_at.saturating_duration_since(at);
        let refused: u64 = self
            .refused
            .iter()
            .filter(|(m, _)| *m > before && *m <= sent)
            .map(|(_, t)| u64::from(*t))
            .sum();
        let ours = sent.saturating_sub(before).saturating_sub(refused) as f64;
        let refilled = level.rate * apart.as_secs_f64();
        if left + refilled > full || level.left > full {
            // The quota may have been full meanwhile: no sample, a new base.
            rebase(self);
            return;
        }
        if apart < Self::MIN_APART || ours * self.ratio < Self::MIN_SPAN * level.capacity {
            // Too short a span yet: keep the base.
            return;
        }
        rebase(self);
        // What the whole quota lost; this replica sent its share of it.
        let spent = (left + refilled - level.left) * share;
        let sample = (spent / ours).clamp(Self::BOUNDS.0, Self::BOUNDS.1);
        // The mean of the first samples, then a moving average.
        self.samples = self.samples.saturating_add(1);
        let step = (1.0 / f64::from(self.samples)).max(Self::STEP);
        self.ratio =
            (self.ratio + step * (sample - self.ratio)).clamp(Self::BOUNDS.0, Self::BOUNDS.1);
    }
}

impl InFlight {
    /// The backend's state.
    pub(crate) fn state(&self) -> &BackendState {
        &self.state
    }

    /// The request's estimated token cost.
    pub(crate) fn tokens(&self) -> u32 {
        self.tokens
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.inner.in_flight.fetch_sub(1, Relaxed);
        if self.tokens != 0 {
            self.state
                .inner
                .in_flight_tokens
                .fetch_sub(u64::from(self.tokens), Relaxed);
        }
    }
}

/// Counts one attempt as awaiting its answer's head until dropped.
#[derive(Debug)]
pub(crate) struct AwaitingHead {
    state: BackendState,
}

impl Drop for AwaitingHead {
    fn drop(&mut self) {
        self.state.inner.awaiting_head.fetch_sub(1, AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_between_throttled_answers_is_measured_once_enough_got_through() {
        let s = BackendState::new();
        let t0 = Instant::now();
        assert_eq!(
            s.saturated_interval(t0),
            None,
            "the first 429 opens the window"
        );
        for _ in 0..19 {
            s.count_through(1);
        }
        let early = t0 + Duration::from_millis(500);
        assert_eq!(
            s.saturated_interval(early),
            None,
            "19 answers are too few to tell"
        );
        s.count_through(1);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.saturated_interval(t1), Some(Duration::from_millis(50)));
        // A new window starts at each measurement.
        assert_eq!(s.saturated_interval(t1 + Duration::from_secs(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn two_precise_429s_give_the_refill_interval_from_the_requests_let_in_between() {
        let ms = Duration::from_millis;
        let s = BackendState::new();
        tokio::time::advance(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        // Requests in flight from the burst before the first 429 do not count.
        let _burst: Vec<_> = (0..5).map(|_| s.start_request(0)).collect();
        // The first 429: the next token in 2 ms; a guess of twice that.
        let _refused = s.start_request(0);
        s.pace_from_throttle(t0, t0, ms(2), true);
        assert_eq!(s.whole_pace(), Some(ms(4)));
        // Three requests get in (the tokens at 2, 52 and 102 ms); the next is refused, its 429
        // saying the next token comes at 152 ms.
        let _in: Vec<_> = (0..3).map(|_| s.start_request(0)).collect();
        let _refused = s.start_request(0);
        s.pace_from_throttle(t0 + ms(110), t0 + ms(110), ms(42), true);
        // 3 let in between the tokens at 2 ms and 152 ms: 50 ms, and a margin of 2%.
        assert_eq!(s.whole_pace(), Some(ms(51)));
        // A request sent before that 429 says nothing.
        s.pace_from_throttle(t0 + ms(111), t0 + ms(100), ms(41), true);
        assert_eq!(s.whole_pace(), Some(ms(51)));
        // A 429 to the same token, with nobody let in since: the window goes on, the pace
        // stays (the rule for imprecise waits would slow it to 80 ms).
        let _refused = s.start_request(0);
        s.pace_from_throttle(t0 + ms(112), t0 + ms(112), ms(40), true);
        assert_eq!(s.whole_pace(), Some(ms(51)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_shared_by_replicas_is_not_measured_from_this_replica_s_sends() {
        let ms = Duration::from_millis;
        let s = BackendState::new();
        s.mark_shared();
        tokio::time::advance(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        let _refused = s.start_request(0);
        s.pace_from_throttle(t0, t0, ms(2), true);
        let _in: Vec<_> = (0..3).map(|_| s.start_request(0)).collect();
        let _refused = s.start_request(0);
        s.pace_from_throttle(t0 + ms(110), t0 + ms(110), ms(42), true);
        // The rule for imprecise waits: the longer of a quarter more and twice the wait.
        assert_eq!(s.whole_pace(), Some(ms(84)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_to_a_request_sent_at_the_pace_slows_it_and_one_sent_before_does_not() {
        let ms = Duration::from_millis;
        let s = BackendState::new();
        tokio::time::advance(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        // The first 429 (no quota hints): twice the wait it asks, a guess.
        s.pace_from_throttle(t0, t0, ms(15), false);
        assert_eq!(s.whole_pace(), Some(ms(30)));
        // A 429 to a request sent before that guess says nothing of it.
        let t1 = t0 + ms(10);
        s.pace_from_throttle(t1, t0 - ms(5), ms(10), false);
        assert_eq!(s.whole_pace(), Some(ms(30)));
        // One sent at the pace: the pace is too fast, it grows by a quarter (not to a shorter
        // guess: the old rule kept 30 ms here, and a 429 every third request followed).
        let t2 = t0 + ms(40);
        s.pace_from_throttle(t2, t0 + ms(35), ms(5), false);
        assert_eq!(s.whole_pace(), Some(ms(37) + Duration::from_micros(500)));
        // A guessed pace is searched downward at 0.5% an answer, a measured one at 0.05%.
        s.got_through(1);
        assert_eq!(s.whole_pace(), Some(Duration::from_nanos(37_312_500)));
        for _ in 0..19 {
            s.got_through(1);
        }
        s.pace_from_throttle(t0 + ms(1000), t0 + ms(999), ms(5), false);
        assert_eq!(
            s.whole_pace(),
            Some(ms(50)),
            "20 answers in the second since the first 429"
        );
        s.got_through(1);
        assert_eq!(s.whole_pace(), Some(ms(50) - Duration::from_micros(25)));
        // A 429 to a request sent before that measurement changes nothing: the pace stays
        // measured, and probed at 0.05%.
        s.pace_from_throttle(t0 + ms(1010), t0 + ms(990), ms(5), false);
        s.got_through(1);
        assert_eq!(
            s.whole_pace(),
            Some(Duration::from_nanos(49_975_000 - 24_987))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn availability_and_the_earliest_free_instant_agree_on_cooldowns_and_open_circuits() {
        let now = Instant::now();
        let (past, soon, later) = (
            now,
            now + Duration::from_secs(1),
            now + Duration::from_secs(5),
        );
        for (cooldown, open, expect) in [
            (None, None, None),
            (Some(past), None, None),
            (Some(soon), None, Some(soon)),
            (Some(past), Some(later), Some(later)),
            (Some(later), Some(soon), Some(later)),
            (Some(soon), Some(past), Some(soon)),
        ] {
            let s = BackendState::new();
            if let Some(c) = cooldown {
                s.extend_cooldown(c);
            }
            if let Some(until) = open {
                s.set_circuit(Circuit::Open { until });
            }
            assert_eq!(s.unavailable_until(now), expect, "{cooldown:?} {open:?}");
            assert_eq!(
                s.is_available(now),
                expect.is_none(),
                "{cooldown:?} {open:?}"
            );
        }
    }

    #[test]
    fn a_learned_pace_is_the_largest_recent_estimate_and_forgets_slowly() {
        let s = BackendState::new();
        let ms = Duration::from_millis;
        s.learn_pace(Some(ms(200)));
        s.learn_pace(Some(ms(180)));
        assert_eq!(
            s.pace(),
            Some(ms(200) - ms(200) / 1000),
            "a lower estimate only wears it down"
        );
        s.learn_pace(Some(ms(210)));
        assert_eq!(s.pace(), Some(ms(210)));
        for _ in 0..700 {
            s.learn_pace(Some(ms(100)));
        }
        let pace = s.pace().unwrap();
        assert!(
            pace < ms(110) && pace >= ms(100),
            "a quota that doubled is followed: {pace:?}"
        );
        s.learn_pace(None);
        assert_eq!(s.pace(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn cooldown_only_extends() {
        let s = BackendState::new();
        let now = Instant::now();
        assert!(s.is_available(now));
        s.extend_cooldown(now + Duration::from_secs(10));
        s.extend_cooldown(now + Duration::from_secs(2));
        assert_eq!(s.cooldown_until(), Some(now + Duration::from_secs(10)));
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_secs(10))
        );
        assert!(s.is_available(now + Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_admissions_one_pace_apart() {
        let s = BackendState::new();
        let now = Instant::now();
        s.admit(now);
        assert!(s.is_available(now), "no pace, no effect");
        s.set_pace(Some(Duration::from_millis(100)));
        s.admit(now);
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_millis(100))
        );
        s.admit(now);
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_millis(200))
        );
        s.set_pace(None);
        assert_eq!(s.pace(), None);
        // With credits left, admissions are free until they run out.
        let s = BackendState::new();
        s.set_pace(Some(Duration::from_millis(100)));
        s.set_credits(Some(2));
        s.admit(now);
        s.admit(now);
        assert!(s.is_available(now));
        s.admit(now);
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn token_pacing_spaces_admissions_by_their_cost_and_takes_the_longer_of_two_paces() {
        let s = BackendState::new();
        let now = Instant::now();
        // 1 000 tokens/s, 300 tokens may go at once.
        s.set_token_quota(Some(300), 0, Some(1000.0));
        s.admit_cost(now, 200);
        assert!(s.is_available(now), "within the burst");
        s.admit_cost(now, 200);
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_millis(200)),
            "past it: the time 200 tokens take to refill"
        );
        // A request pace of 50 ms and a token refill of 100 ms: the next waits 100 ms, not 150.
        s.set_pace(Some(Duration::from_millis(50)));
        s.admit_cost(now, 100);
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_millis(300))
        );
        // No token hints: requests are paced by count alone.
        s.set_token_quota(None, 0, None);
        s.admit_cost(now, 100_000);
        assert_eq!(
            s.unavailable_until(now),
            Some(now + Duration::from_millis(350))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_circuit_makes_unavailable_until_its_end() {
        let s = BackendState::new();
        let now = Instant::now();
        s.set_circuit(Circuit::Open {
            until: now + Duration::from_secs(5),
        });
        s.extend_cooldown(now + Duration::from_secs(1));
        assert_eq!(s.unavailable_until(now), Some(now + Duration::from_secs(5)));
        s.set_circuit(Circuit::HalfOpen);
        assert_eq!(s.unavailable_until(now), Some(now + Duration::from_secs(1)));
    }

    /// A quota of 560 tokens per second, `left` of them left.
    fn level(left: f64) -> Level {
        Level {
            left,
            capacity: 560.0,
            rate: 560.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_in_flight_are_counted_until_the_answer_is_read() {
        let s = BackendState::new();
        let a = s.start_request(40);
        let b = s.start_request(60);
        assert_eq!(s.in_flight_tokens(), 100);
        assert_eq!((a.sent, b.sent), (40, 100));
        drop(a);
        assert_eq!(s.in_flight_tokens(), 60);
        drop(b);
        assert_eq!(s.in_flight_tokens(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_ratio_is_what_the_backend_spent_over_what_we_sent() {
        let s = BackendState::new();
        let t0 = Instant::now();
        // Request A, then 200 ms later B, each estimated at 100 tokens; between them the
        // backend's level fell from 300 to 200 while 112 tokens refilled: it spent 212 for
        // our 100 (B's cost: A's was in A's level already).
        let a = s.start_request(100);
        tokio::time::advance(Duration::from_millis(200)).await;
        let b = s.start_request(100);
        s.calibrate(&a, t0, Some(level(300.0)), false);
        assert_eq!(s.token_ratio(), 1.0, "one answer is no sample");
        s.calibrate(
            &b,
            t0 + Duration::from_millis(200),
            Some(level(200.0)),
            false,
        );
        assert!((s.token_ratio() - 2.12).abs() < 1e-9, "{}", s.token_ratio());
        assert_eq!(s.snapshot().token_ratio, s.token_ratio());
        // The credits and refill rate the backend tells are turned into our estimate's.
        s.set_token_quota(Some(424), 50, Some(1060.0));
        assert_eq!(s.inner.token_credits.load(Acquire), 200 - 50);
        assert_eq!(s.inner.ps_per_token.load(Acquire), 2_000_000_000);
        // A refused request spent nothing: 200 ms later, of C (refused) and D (our 100
        // each), the backend spent 200 + 112 - 100 = 212 for D's 100 alone.
        tokio::time::advance(Duration::from_millis(100)).await;
        let c = s.start_request(100);
        s.calibrate(&c, Instant::now(), Some(level(250.0)), true);
        tokio::time::advance(Duration::from_millis(100)).await;
        let d = s.start_request(100);
        s.calibrate(
            &d,
            t0 + Duration::from_millis(400),
            Some(level(100.0)),
            false,
        );
        assert!((s.token_ratio() - 2.12).abs() < 1e-9, "{}", s.token_ratio());
        // Too short a span is no sample yet; the base stays.
        let e = s.start_request(100);
        s.calibrate(&e, t0 + Duration::from_millis(450), Some(level(0.0)), false);
        assert!((s.token_ratio() - 2.12).abs() < 1e-9, "{}", s.token_ratio());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_quota_while_requests_wait_brings_the_ratio_down_once_per_round_trip() {
        let s = BackendState::new();
        s.set_token_quota(Some(0), 100, Some(560.0));
        let full = level(540.0);
        let early = s.start_request(100);
        tokio::time::advance(Duration::from_millis(50)).await;
        s.calibrate(&early, Instant::now(), Some(full), false);
        assert!((s.token_ratio() - 0.95).abs() < 1e-9);
        // Answers to requests sent before that step change nothing; one sent after does.
        s.calibrate(
            &early,
            Instant::now() - Duration::from_millis(10),
            Some(full),
            false,
        );
        assert!((s.token_ratio() - 0.95).abs() < 1e-9);
        tokio::time::advance(Duration::from_millis(1)).await;
        let late = s.start_request(100);
        s.calibrate(&late, Instant::now(), Some(full), false);
        assert!((s.token_ratio() - 0.9025).abs() < 1e-9);
        // Nothing held back: a full quota says nothing.
        s.set_token_quota(Some(10_000), 0, Some(560.0));
        tokio::time::advance(Duration::from_millis(1)).await;
        let idle = s.start_request(100);
        s.calibrate(&idle, Instant::now(), Some(full), false);
        assert!((s.token_ratio() - 0.9025).abs() < 1e-9);
    }

    #[test]
    fn the_token_ratio_stays_within_its_bounds() {
        let t0 = Instant::now();
        let mut c = Calibration::new();
        c.learn(level(400.0), t0, 100, 1.0, false);
        // Spent 400 + 56 for our 28: a sample of 16, taken as 4.
        c.learn(level(0.0), t0 + Duration::from_millis(100), 128, 1.0, false);
        assert_eq!(c.ratio, 4.0);
        for i in 0..50 {
            c.learn(
                level(0.0),
                t0 + Duration::from_millis(200 + 100 * i),
                10_000 * (i + 2),
                1.0,
                false,
            );
        }
        assert!(c.ratio >= 0.25 && c.ratio < 0.26, "{}", c.ratio);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_latency_quota_counters() {
        let s = BackendState::new();
        let g1 = s.start_request(0);
        let g2 = s.clone().start_request(0);
        assert_eq!(s.in_flight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.latency(), None);
        s.record_latency(Duration::from_millis(80));
        s.record_latency(Duration::from_millis(160));
        assert_eq!(
            s.latency(),
            Some(Duration::from_millis(160)),
            "a peak is taken at once"
        );
        s.record_latency(Duration::from_millis(80));
        assert_eq!(
            s.latency(),
            Some(Duration::from_millis(150)),
            "and decays by 1/8"
        );
        assert_eq!(s.quota(), None);
        s.record_quota(Some(3), None, Instant::now());
        let q = s.quota().unwrap();
        assert_eq!((q.remaining_requests, q.remaining_tokens), (Some(3), None));
        s.record_outcome(&Outcome::Success);
        s.record_outcome(&Outcome::QuotaExhausted);
        let c = s.counters();
        assert_eq!((c.requests, c.success, c.throttled), (2, 1, 1));
        assert_eq!(s.note_throttled(), 1);
        assert_eq!(s.note_throttled(), 2);
        s.reset_throttle_streak();
        assert_eq!(s.throttle_streak(), 0);
    }

    #[test]
    fn replicas_sharing_a_quota_each_take_their_share_of_its_hints() {
        let s = BackendState::new();
        s.set_share(0.25);
        s.set_credits(Some(9));
        assert_eq!(s.inner.credits.load(Acquire), 2);
        s.learn_pace(Some(Duration::from_millis(100)));
        assert_eq!(s.pace(), Some(Duration::from_millis(400)));
        s.set_token_quota(Some(3000), 0, Some(400.0));
        assert_eq!(s.inner.token_credits.load(Acquire), 750);
        assert_eq!(s.inner.ps_per_token.load(Acquire), (1e12 / 100.0) as u64);
        s.set_share(0.5);
        assert_eq!(
            s.pace(),
            Some(Duration::from_millis(200)),
            "a new share applies to the pace at once"
        );
        s.set_pace(Some(Duration::from_millis(100)));
        assert_eq!(
            s.pace(),
            Some(Duration::from_millis(200)),
            "a pace learned from 429s is the whole backend's too"
        );
        assert_eq!(s.whole_pace(), Some(Duration::from_millis(100)));
        s.set_share(f64::NAN);
        assert_eq!(s.share(), 1.0);
        s.set_share(-3.0);
        assert!(s.share() > 0.0, "never nothing at all");
    }

    #[tokio::test(start_paused = true)]
    async fn demand_counts_requests_in_flight_and_waiting_for_a_paced_slot() {
        let s = BackendState::new();
        let now = Instant::now();
        assert_eq!(s.demand(now), 0.0);
        let _a = s.start_request(0);
        assert_eq!(s.demand(now), 1.0);
        s.set_credits(Some(0));
        s.learn_pace(Some(Duration::from_millis(100)));
        // No credits: each admission books the backend's next slot, 100 ms on.
        for _ in 0..3 {
            s.admit(now);
        }
        assert_eq!(s.demand(now), 1.0 + 3.0);
        assert_eq!(s.demand(now + Duration::from_millis(150)), 1.0 + 1.5);
        s.throttle_until(now + Duration::from_secs(1));
        assert_eq!(
            s.demand(now),
            1.0,
            "a server's wait is not a request waiting"
        );
    }
}
