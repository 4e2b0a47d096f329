//! The breaker's pure state machine: outcome + now in, admit / reject out. No I/O, no clock of
//! its own, no randomness of its own: all are passed in, so every transition is unit-tested.
//!
//! The closed circuit's counts (failures in a row, the failure-rate window) live in atomics
//! beside the machine, so the breaker counts the answers of a closed circuit without a lock and
//! takes the machine's lock only to change phase (trip, probe, close).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::Duration;

use tokio::time::Instant;

/// When a breaker trips, how long it stays open and how it probes.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Trip after this many failures in a row (default 5, as Envoy and linkerd).
    pub consecutive_failures: u32,
    /// Trip when the failure rate over the window reaches this share (default 0.5)…
    pub failure_rate: f64,
    /// …over this sliding window of time (default 30 s)…
    pub window: Duration,
    /// …once the window holds at least this many calls (default 20). 0 disables the rate rule.
    pub min_calls: u32,
    /// Open duration of the first trip (default 1 s)…
    pub base_open: Duration,
    /// …multiplied by this for each consecutive trip (default 1.2)…
    pub growth: f64,
    /// …up to this (default 10 s).
    ///
    /// The defaults probe a backend that keeps failing at 1, 2.2, 3.6, 5.4, 7.4, 9.9, 12.9 ...
    /// s after its trip, then every 10 s: one that recovers serves again within about a fifth
    /// of its outage (within 0.5 s after a 5 s outage), and one that stays dead costs one
    /// attempt per 10 s once its first minute is over. Doubling from 5 s up to 5 min (before)
    /// brought a backend back from a 5 s outage 10 s late whenever its first probe came just
    /// before its recovery.
    pub max_open: Duration,
    /// Random share of the open duration added or removed (default 0.1 = ±10%).
    pub jitter: f64,
    /// Requests let through at once while half-open (default 1).
    pub probes: u32,
    /// Calls slower than this count as failures (default: never).
    pub slow_call: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(30),
            min_calls: 20,
            base_open: Duration::from_secs(1),
            growth: 1.2,
            max_open: Duration::from_secs(10),
            jitter: 0.1,
            probes: 1,
            slow_call: None,
        }
    }
}

impl Policy {
    /// Checks the policy; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.consecutive_failures == 0 {
            return Err("consecutive_failures: must be >= 1".into());
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err("failure_rate: must be in (0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err("jitter: must be in [0, 1)".into());
        }
        if self.probes == 0 {
            return Err("probes: must be >= 1".into());
        }
        if self.base_open.is_zero() || self.max_open < self.base_open {
            return Err("base_open / max_open: need 0 < base_open <= max_open".into());
        }
        if !(self.growth >= 1.0 && self.growth <= 10.0) {
            return Err("growth: must be in [1, 10]".into());
        }
        Ok(())
    }
}

/// What the breaker says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Closed: send it.
    Yes,
    /// Half-open: send it as a probe; its outcome decides.
    Probe,
    /// Open (or probes already in flight): do not send; try again at the instant, if known.
    No(Option<Instant>),
}

/// A state change, for events and the shared [`Circuit`](crate::state::Circuit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Tripped: open until the instant.
    Opened {
        /// End of the open period.
        until: Instant,
        /// Consecutive trips so far (1 on the first).
        trips: u32,
    },
    /// The open period ended; probing.
    HalfOpened,
    /// A probe succeeded (or a health probe found the backend well): closed again.
    Closed,
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32 },
}

/// The state machine.
#[derive(Debug)]
pub(crate) struct Machine {
    policy: Policy,
    phase: Phase,
    /// Consecutive trips without a recovery in between.
    trips: u32,
    /// The closed circuit's counts: atomics, so a closed breaker can count an answer without
    /// holding the machine (see [`Tally`]).
    tally: Arc<Tally>,
    /// Whether the last trip came from failures in a row (the backend failed every request),
    /// not from a failure rate.
    tripped_in_a_row: bool,
}

impl Clone for Machine {
    /// A machine in the same state with its own copy of the counts.
    fn clone(&self) -> Self {
        Machine {
            policy: self.policy.clone(),
            phase: self.phase.clone(),
            trips: self.trips,
            tally: Arc::new(self.tally.snapshot()),
            tripped_in_a_row: self.tripped_in_a_row,
        }
    }
}

const BUCKETS: usize = 10;

/// The counts of a closed circuit: failures in a row, and calls and failures over a sliding
/// window of time in `BUCKETS` slices. All atomics, O(1) per answer, fixed memory, no lock: the
/// breaker counts every answer of a closed circuit here and takes the machine's lock only to
/// trip. A slice is one `AtomicU64` (slice index: 32 bits, calls: 16, failures: 16) updated by
/// compare-and-swap, so concurrent answers are never lost; a slice that reaches 65 535 calls
/// stops counting (its failure share is kept).
#[derive(Debug)]
pub(crate) struct Tally {
    origin: Instant,
    consecutive: AtomicU32,
    slices: [AtomicU64; BUCKETS],
    /// The slice of the latest failure counted, plus one (0: none since the last clear): while
    /// it lies outside the window, the window holds no failure and an answer need not sum the
    /// slices to know the rate is not exceeded (~380 instructions an answer).
    last_failure: AtomicU64,
}

fn pack(slice: u32, calls: u16, failures: u16) -> u64 {
    (u64::from(slice) << 32) | (u64::from(calls) << 16) | u64::from(failures)
}

fn unpack(v: u64) -> (u32, u16, u16) {
    ((v >> 32) as u32, (v >> 16) as u16, v as u16)
}

impl Tally {
    fn new(origin: Instant) -> Self {
        Tally {
            origin,
            consecutive: AtomicU32::new(0),
            slices: Default::default(),
            last_failure: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> Self {
        Tally {
            origin: self.origin,
            consecutive: AtomicU32::new(self.consecutive.load(Acquire)),
            slices: std::array::from_fn(|i| AtomicU64::new(self.slices[i].load(Acquire))),
            last_failure: AtomicU64::new(self.last_failure.load(Acquire)),
        }
    }

    /// The index of the slice `now` falls in (64-bit: nanoseconds since the origin fit for 584
    /// years).
    fn slice(&self, now: Instant, window: Duration) -> u64 {
        let width = (u64::try_from(window.as_nanos()).unwrap_or(u64::MAX) / BUCKETS as u64).max(1);
        let since = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        since / width
    }

    /// Counts one answer; true when `policy` says the circuit should trip.
    pub(crate) fn count(&self, policy: &Policy, failed: bool, now: Instant) -> bool {
        let idx = self.slice(now, policy.window);
        let tag = idx as u32;
        let cell = &self.slices[(idx % BUCKETS as u64) as usize];
        let mut current = cell.load(Acquire);
        loop {
            let (slice, calls, failures) = unpack(current);
            let next = if slice != tag || calls == 0 {
                pack(tag, 1, u16::from(failed))
            } else if calls == u16::MAX {
                break;
            } else {
                pack(tag, calls + 1, failures + u16::from(failed))
            };
            match cell.compare_exchange_weak(current, next, AcqRel, Acquire) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        if failed {
            self.last_failure.fetch_max(idx + 1, AcqRel);
        }
        let consecutive = if failed {
            self.consecutive.fetch_add(1, AcqRel).saturating_add(1)
        } else {
            if self.consecutive.load(Relaxed) != 0 {
                self.consecutive.store(0, Release);
            }
            0
        };
        consecutive >= policy.consecutive_failures
            || (self.failed_within(idx, policy) && self.rate_exceeded(policy, now))
    }

    /// Whether a failure may be counted in the window ending at slice `idx`; false only when
    /// none is (the latest failure's slice lies outside it) and a rate of none cannot trip.
    fn failed_within(&self, idx: u64, policy: &Policy) -> bool {
        let last = self.last_failure.load(Acquire);
        policy.failure_rate <= 0.0 || (last != 0 && idx.saturating_sub(last - 1) < BUCKETS as u64)
    }

    /// (calls, failures) over the slices still inside the window at `now`.
    fn totals(&self, now: Instant, window: Duration) -> (u32, u32) {
        let tag = self.slice(now, window) as u32;
        self.slices
            .iter()
            .map(|c| unpack(c.load(Acquire)))
            .filter(|(slice, calls, _)| *calls > 0 && tag.wrapping_sub(*slice) < BUCKETS as u32)
            .fold((0, 0), |(c, f), (_, calls, failures)| {
                (c + u32::from(calls), f + u32::from(failures))
            })
    }

    fn rate_exceeded(&self, policy: &Policy, now: Instant) -> bool {
        if policy.min_calls == 0 {
            return false;
        }
        let (calls, failures) = self.totals(now, policy.window);
        calls >= policy.min_calls
            && calls > 0
            && f64::from(failures) / f64::from(calls) >= policy.failure_rate
    }

    fn clear(&self) {
        self.consecutive.store(0, Release);
        self.last_failure.store(0, Release);
        for c in &self.slices {
            c.store(0, Release);
        }
    }
}

impl Machine {
    /// A closed breaker with `policy`.
    pub(crate) fn new(policy: Policy) -> Self {
        Machine {
            policy,
            phase: Phase::Closed,
            trips: 0,
            tally: Arc::new(Tally::new(Instant::now())),
            tripped_in_a_row: false,
        }
    }

    /// Consecutive trips so far.
    #[cfg(test)]
    pub(crate) fn trips(&self) -> u32 {
        self.trips
    }

    /// Decides about one request at `now`.
    pub(crate) fn admit(&mut self, now: Instant) -> (Admit, Option<Transition>) {
        match self.phase {
            Phase::Closed => (Admit::Yes, None),
            Phase::Open { until } if now < until => (Admit::No(Some(until)), None),
            Phase::Open { .. } => {
                self.phase = Phase::HalfOpen { in_flight: 1 };
                (Admit::Probe, Some(Transition::HalfOpened))
            }
            Phase::HalfOpen { ref mut in_flight } => {
                if *in_flight < self.policy.probes {
                    *in_flight += 1;
                    (Admit::Probe, None)
                } else {
                    (Admit::No(None), None)
                }
            }
        }
    }

    /// Records the result of a request admitted at `admitted` as `Yes` (`probe = false`) or
    /// `Probe`. `failed` is the classifier's verdict; `jitter` is a uniform draw in `[0, 1)`.
    pub(crate) fn record(
        &mut self,
        probe: bool,
        failed: bool,
        elapsed: Duration,
        now: Instant,
        jitter: f64,
    ) -> Option<Transition> {
        let failed = failed || self.policy.slow_call.is_some_and(|s| elapsed >= s);
        if probe {
            if let Phase::HalfOpen { in_flight } = &mut self.phase {
                *in_flight = in_flight.saturating_sub(1);
            }
            return if failed {
                Some(self.trip(now, jitter))
            } else {
                self.close()
            };
        }
        if self.phase != Phase::Closed {
            // A result of a request admitted before the trip: it changes nothing now.
            return None;
        }
        if self.tally.count(&self.policy, failed, now) {
            return Some(self.trip(now, jitter));
        }
        None
    }

    /// A probe admitted as `Probe` was abandoned (its future dropped): free its slot.
    pub(crate) fn abandon_probe(&mut self) {
        if let Phase::HalfOpen { in_flight } = &mut self.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// A health probe's result: a healthy answer closes an open breaker at once; a failure
    /// counts like a request's.
    pub(crate) fn health(
        &mut self,
        healthy: bool,
        now: Instant,
        jitter: f64,
    ) -> Option<Transition> {
        match (&self.phase, healthy) {
            (Phase::Closed, _) => self.record(false, !healthy, Duration::ZERO, now, jitter),
            (_, true) => self.close(),
            (Phase::Open { .. }, false) => None,
            (Phase::HalfOpen { .. }, false) => Some(self.trip(now, jitter)),
        }
    }

    /// Trips, unless `allowed` says the group cannot lose another backend.
    fn trip(&mut self, now: Instant, jitter: f64) -> Transition {
        self.trips = self.trips.saturating_add(1);
        let steps = self.trips.saturating_sub(1).min(200) as i32;
        let grown = self.policy.growth.powi(steps);
        let base =
            if grown >= self.policy.max_open.as_secs_f64() / self.policy.base_open.as_secs_f64() {
                self.policy.max_open
            } else {
                self.policy.base_open.mul_f64(grown)
            };
        let factor = 1.0 + self.policy.jitter * (2.0 * jitter - 1.0);
        let until = now + base.mul_f64(factor.max(0.0));
        self.phase = Phase::Open { until };
        self.tripped_in_a_row =
            self.tally.consecutive.load(Acquire) >= self.policy.consecutive_failures;
        self.tally.clear();
        Transition::Opened {
            until,
            trips: self.trips,
        }
    }

    fn close(&mut self) -> Option<Transition> {
        let was = std::mem::replace(&mut self.phase, Phase::Closed);
        self.trips = 0;
        self.tally.clear();
        (was != Phase::Closed).then_some(Transition::Closed)
    }

    /// Forces the breaker closed without a transition count (used when the group may not lose
    /// this backend).
    pub(crate) fn stay_closed(&mut self) {
        self.phase = Phase::Closed;
        self.tally.clear();
        self.trips = self.trips.saturating_sub(1);
    }

    /// Whether the last trip came from `consecutive_failures` failures in a row: the backend
    /// failed every request it was sent (refused connections, a 500 to everything), so the
    /// group may let it go past its ejection share.
    pub(crate) fn tripped_in_a_row(&self) -> bool {
        self.tripped_in_a_row
    }

    /// The closed circuit's counts, shared with the breaker's lock-free path.
    pub(crate) fn tally(&self) -> Arc<Tally> {
        self.tally.clone()
    }

    /// Trips a circuit that is still closed (its counts said so without the lock).
    pub(crate) fn trip_if_closed(&mut self, now: Instant, jitter: f64) -> Option<Transition> {
        (self.phase == Phase::Closed).then(|| self.trip(now, jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            consecutive_failures: 3,
            min_calls: 0,
            jitter: 0.0,
            base_open: Duration::from_secs(10),
            growth: 2.0,
            max_open: Duration::from_secs(35),
            ..Policy::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn by_default_a_failing_backend_is_probed_often_at_first_then_every_10_s() {
        let mut m = Machine::new(Policy {
            jitter: 0.0,
            ..Policy::default()
        });
        let mut t = Instant::now();
        for _ in 0..5 {
            m.record(false, true, MS, t, 0.5);
        }
        let mut opened = Vec::new();
        for _ in 0..16 {
            let Phase::Open { until } = m.phase else {
                panic!("open")
            };
            opened.push((until - t).as_millis());
            t = until;
            assert_eq!(m.admit(t).0, Admit::Probe);
            m.record(true, true, MS, t, 0.5);
        }
        assert_eq!(
            opened,
            [
                1000, 1200, 1440, 1728, 2073, 2488, 2985, 3583, 4299, 5159, 6191, 7430, 8916,
                10000, 10000, 10000
            ]
        );
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn trips_after_consecutive_failures_and_a_success_resets_the_count() {
        let mut m = Machine::new(policy());
        let t = Instant::now();
        assert_eq!(m.record(false, true, MS, t, 0.5), None);
        assert_eq!(m.record(false, true, MS, t, 0.5), None);
        assert_eq!(m.record(false, false, MS, t, 0.5), None);
        assert_eq!(m.record(false, true, MS, t, 0.5), None);
        assert_eq!(m.record(false, true, MS, t, 0.5), None);
        let tr = m.record(false, true, MS, t, 0.5);
        assert_eq!(
            tr,
            Some(Transition::Opened {
                until: t + Duration::from_secs(10),
                trips: 1
            })
        );
        assert_eq!(m.admit(t).0, Admit::No(Some(t + Duration::from_secs(10))));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_the_permitted_probes_then_closes_or_reopens_longer() {
        let mut m = Machine::new(Policy {
            probes: 2,
            ..policy()
        });
        let t = Instant::now();
        for _ in 0..3 {
            m.record(false, true, MS, t, 0.5);
        }
        let t1 = t + Duration::from_secs(10);
        assert_eq!(m.admit(t1), (Admit::Probe, Some(Transition::HalfOpened)));
        assert_eq!(m.admit(t1), (Admit::Probe, None));
        assert_eq!(
            m.admit(t1),
            (Admit::No(None), None),
            "only the permitted probes"
        );
        // A failed probe reopens, for twice as long.
        let tr = m.record(true, true, MS, t1, 0.5);
        assert_eq!(
            tr,
            Some(Transition::Opened {
                until: t1 + Duration::from_secs(20),
                trips: 2
            })
        );
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(m.admit(t2).0, Admit::Probe);
        let tr = m.record(true, true, MS, t2, 0.5);
        // Capped at max_open.
        assert_eq!(
            tr,
            Some(Transition::Opened {
                until: t2 + Duration::from_secs(35),
                trips: 3
            })
        );
        let t3 = t2 + Duration::from_secs(35);
        assert_eq!(m.admit(t3).0, Admit::Probe);
        assert_eq!(m.record(true, false, MS, t3, 0.5), Some(Transition::Closed));
        assert_eq!(m.trips(), 0, "recovery resets the growth");
        for _ in 0..3 {
            m.record(false, true, MS, t3, 0.5);
        }
        assert_eq!(m.admit(t3).0, Admit::No(Some(t3 + Duration::from_secs(10))));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_over_the_window_trips_once_min_calls_is_reached() {
        let mut m = Machine::new(Policy {
            consecutive_failures: 100,
            min_calls: 10,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            ..policy()
        });
        let t = Instant::now();
        // Alternating: never 2 in a row, 50% rate.
        let mut tripped = None;
        for i in 0..10 {
            tripped = tripped.or(m.record(false, i % 2 == 0, MS, t, 0.5));
        }
        assert!(matches!(tripped, Some(Transition::Opened { .. })));
        // Old calls leave the window.
        let mut m = Machine::new(Policy {
            consecutive_failures: 100,
            min_calls: 4,
            ..policy()
        });
        for _ in 0..3 {
            m.record(false, true, MS, t, 0.5);
        }
        let later = t + Duration::from_secs(60);
        assert_eq!(
            m.record(false, false, MS, later, 0.5),
            None,
            "old failures expired"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_count_when_asked_and_jitter_spreads_the_open_time() {
        let mut m = Machine::new(Policy {
            slow_call: Some(Duration::from_secs(2)),
            ..policy()
        });
        let t = Instant::now();
        for _ in 0..2 {
            m.record(false, false, Duration::from_secs(3), t, 0.5);
        }
        assert!(
            m.record(false, false, Duration::from_secs(3), t, 0.5)
                .is_some()
        );
        let mut m = Machine::new(Policy {
            jitter: 0.1,
            ..policy()
        });
        for _ in 0..2 {
            m.record(false, true, MS, t, 0.0);
        }
        let Some(Transition::Opened { until, .. }) = m.record(false, true, MS, t, 0.0) else {
            panic!()
        };
        assert_eq!(until - t, Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn health_probes_close_an_open_breaker_and_abandoned_probes_free_their_slot() {
        let mut m = Machine::new(policy());
        let t = Instant::now();
        for _ in 0..3 {
            m.record(false, true, MS, t, 0.5);
        }
        assert_eq!(m.health(false, t, 0.5), None);
        assert_eq!(m.health(true, t, 0.5), Some(Transition::Closed));
        assert_eq!(m.admit(t).0, Admit::Yes);
        for _ in 0..3 {
            m.record(false, true, MS, t, 0.5);
        }
        let t1 = t + Duration::from_secs(10);
        assert_eq!(m.admit(t1).0, Admit::Probe);
        assert_eq!(m.admit(t1).0, Admit::No(None));
        m.abandon_probe();
        assert_eq!(m.admit(t1).0, Admit::Probe);
    }

    #[test]
    fn concurrent_answers_are_all_counted_without_a_lock() {
        let policy = Policy {
            consecutive_failures: u32::MAX,
            min_calls: 0,
            ..Policy::default()
        };
        let now = Instant::now();
        let tally = Arc::new(Tally::new(now));
        std::thread::scope(|s| {
            for t in 0..4 {
                let (tally, policy) = (tally.clone(), policy.clone());
                s.spawn(move || {
                    for i in 0..5_000 {
                        // One answer in five fails.
                        tally.count(&policy, (i + t) % 5 == 0, now);
                    }
                });
            }
        });
        assert_eq!(tally.totals(now, policy.window), (20_000, 4_000));
    }

    #[test]
    fn a_full_slice_stops_counting_and_keeps_its_failure_share() {
        let policy = Policy::default();
        let now = Instant::now();
        let tally = Tally::new(now);
        for i in 0..70_000u32 {
            tally.count(&policy, i % 2 == 0, now);
        }
        let (calls, failures) = tally.totals(now, policy.window);
        assert_eq!(calls, u32::from(u16::MAX));
        assert_eq!(failures, u32::from(u16::MAX).div_ceil(2));
    }

    #[test]
    fn invalid_policies_name_the_field() {
        assert!(Policy::default().validate().is_ok());
        let e = Policy {
            consecutive_failures: 0,
            ..Policy::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("consecutive_failures"));
        let e = Policy {
            failure_rate: 1.5,
            ..Policy::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("failure_rate"));
        let e = Policy {
            probes: 0,
            ..Policy::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("probes"));
    }
}
