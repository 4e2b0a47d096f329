//! A lock-free retry budget: retries may add at most a share of the request rate, plus a small
//! floor, so a storm of 429s does not multiply load.
//!
//! The model of tower's `TpsBudget` (and Envoy's retry budgets) kept in atomics so the request
//! path takes no lock: each request deposits `retry_percent` of a token, each retry withdraws
//! one; deposits and withdrawals count over a sliding window of `ttl` (the current and the
//! previous window); and a constant reserve of `min_per_sec × ttl` tokens is always added.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::*};
use std::time::Duration;

use tokio::time::Instant;

const UNIT: i64 = 1000;

/// Retry budget; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct RetryBudget {
    reserve: i64,
    per_request: i64,
    ttl_ns: u64,
    epoch: Instant,
    window: AtomicU64,
    current: AtomicI64,
    previous: AtomicI64,
}

impl RetryBudget {
    /// Over `ttl` (clamped to 1..=60 s), retries may be `retry_percent` (clamped to 0..=1000;
    /// NaN is 0) of requests, plus `min_per_sec` per second.
    pub(crate) fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let pct = if retry_percent.is_nan() {
            0.0
        } else {
            retry_percent.clamp(0.0, 1000.0)
        };
        RetryBudget {
            reserve: i64::from(min_per_sec.min(1_000_000)) * ttl.as_secs() as i64 * UNIT,
            per_request: (f64::from(pct) * UNIT as f64) as i64,
            ttl_ns: ttl.as_nanos() as u64,
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            current: AtomicI64::new(0),
            previous: AtomicI64::new(0),
        }
    }

    /// Moves to the current window if time has passed.
    fn roll(&self) {
        self.roll_at(Instant::now());
    }

    fn roll_at(&self, at: Instant) {
        let since = at.saturating_duration_since(self.epoch);
        let now = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX) / self.ttl_ns;
        let seen = self.window.load(Acquire);
        if now > seen
            && self
                .window
                .compare_exchange(seen, now, AcqRel, Acquire)
                .is_ok()
        {
            let carried = if now == seen + 1 {
                self.current.swap(0, AcqRel)
            } else {
                self.current.store(0, Release);
                0
            };
            self.previous.store(carried, Release);
        }
    }

    /// Counts one request.
    #[cfg(test)]
    pub(crate) fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Counts one request arriving `at` (a time the caller already read).
    pub(crate) fn deposit_at(&self, at: Instant) {
        if self.per_request > 0 {
            self.roll_at(at);
            self.current.fetch_add(self.per_request, AcqRel);
        }
    }

    /// Takes one retry token; false when the budget is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.roll();
        let previous = self.previous.load(Acquire);
        self.current
            .fetch_update(AcqRel, Acquire, |c| {
                (self.reserve + previous + c >= UNIT).then_some(c - UNIT)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_plus_a_reserve() {
        // 20% of requests, 1 retry/s over a 10 s window: a reserve of 10.
        let b = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 10 + 20, "reserve plus 20% of 100 requests");
        // The next window still sees the last one; two windows later it is forgotten.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!b.withdraw(), "still spent: the previous window counts");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(
            granted, 10,
            "only the reserve once the old windows have passed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_do_not_pile_up_beyond_the_window() {
        let b = RetryBudget::new(Duration::from_secs(1), 0, 0.5);
        for _ in 0..10 {
            for _ in 0..100 {
                b.deposit();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Only the last window's 100 requests (now the previous window) count: 50 retries.
        let granted = (0..1000).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn odd_settings_are_clamped_not_panics() {
        let b = RetryBudget::new(Duration::ZERO, 0, f32::NAN);
        assert!(!b.withdraw(), "no reserve, no share: no retries");
        let _ = RetryBudget::new(Duration::from_secs(3600), u32::MAX, 1e9);
    }
}
