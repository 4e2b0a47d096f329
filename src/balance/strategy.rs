//! How [`Balance`](super::Balance) picks one backend among the available ones of a tier.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio::time::Instant;

use crate::rng::Rng;
use crate::state::BackendState;

/// The pick strategy within a priority tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// The default. Where nobody set a weight in the tier: two different backends at random,
    /// the one with the lower load (requests in flight + 1, times its peak-sensitive latency
    /// average; 1 s until it has answered) wins. Latency averages within 1.5x of each other
    /// count as equal (measurement noise), so equal backends share even requests sent one at
    /// a time, while of one answering in 600 ms and one in 50 ms the fast one takes most
    /// requests. Where any weight was set (even equal ones, as Portkey's `0.5`/`0.5`),
    /// [`Strategy::WeightedRandom`], so set weights are honoured exactly.
    #[default]
    LatencyAware,
    /// Weighted random: each available backend is chosen with probability weight / sum of the
    /// available weights. Honours small weights exactly (`99/0.5/0.5`); weight 0 gets nothing.
    WeightedRandom,
    /// Round robin over the available backends (weights other than 0 are ignored).
    RoundRobin,
    /// The available backend with the fewest requests in flight; ties go round robin.
    LeastInFlight,
    /// Power of two choices: two weighted-random candidates, the one with the lower load
    /// (in flight × latency EWMA) wins, as tower's p2c balancer does.
    PowerOfTwo,
}

/// One priority tier: its members (indices into the group's candidates), built once.
pub(crate) struct Tier {
    pub(crate) members: Box<[usize]>,
    /// The members' weights summed up to each: a weighted draw is a binary search.
    cumulative: Box<[f64]>,
    /// Whether every member has the same weight, none of them set.
    uniform: bool,
    /// Whether some member's weight was set: the default pick is then weighted random.
    weights_set: bool,
}

impl Tier {
    pub(crate) fn new(members: Box<[usize]>, all: &[Candidate]) -> Self {
        let mut sum = 0.0;
        let cumulative = members
            .iter()
            .map(|i| {
                sum += all[*i].weight.max(0.0);
                sum
            })
            .collect();
        // Set weights are honoured exactly, even equal ones: only weights nobody set leave
        // the default pick latency-aware.
        let weights_set = members.iter().any(|i| all[*i].weight_set);
        let uniform = members
            .windows(2)
            .all(|w| all[w[0]].weight == all[w[1]].weight)
            && !weights_set;
        Tier {
            members,
            cumulative,
            uniform,
            weights_set,
        }
    }
}

/// Tiers of more backends than this are sampled, not scanned: a pick costs about the same at
/// 3,000 backends as at 30 while most of them can take a request. Smaller tiers are scanned:
/// exact, and as cheap.
pub(crate) const SCAN_MAX: usize = 64;

/// Draws a sampled pick makes before it scans the tier after all (most of it unavailable).
const DRAWS: usize = 16;

/// One backend as the picker sees it.
pub(crate) struct Candidate {
    pub(crate) weight: f64,
    /// The weight was set (even to the default): the pick honours it exactly.
    pub(crate) weight_set: bool,
    pub(crate) state: BackendState,
}

/// Whether a backend is usable now, and whether it has quota headroom by its last hints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Avail {
    No,
    LowHeadroom,
    Yes,
}

pub(crate) fn availability(all: &[Candidate], c: &Candidate, now: Instant) -> Avail {
    if c.weight <= 0.0 {
        return Avail::No;
    }
    let (available, headroom_low) = c.state.availability(now);
    if !available || on_probation(&c.state) {
        Avail::No
    } else if headroom_low || silent(all, c, now) {
        Avail::LowHeadroom
    } else {
        Avail::Yes
    }
}

/// A backend that has answered nothing for longer than [`SILENT_FLOOR`] and than
/// [`SILENT_FACTOR`] times its slowest peer's latency average, while requests await it: it gets
/// new requests only when no other backend of its tier can take them, until it answers again.
/// A hung backend stops collecting requests within seconds; one that is merely slow still
/// answers something now and then.
fn silent(all: &[Candidate], c: &Candidate, now: Instant) -> bool {
    let Some(silence) = c.state.silent_for(now).filter(|s| *s > SILENT_FLOOR) else {
        return false;
    };
    let peers = all
        .iter()
        .filter(|p| !p.state.ptr_eq(&c.state))
        .filter_map(|p| p.state.latency())
        .max()
        .unwrap_or_default();
    silence > peers.saturating_mul(SILENT_FACTOR)
}

/// See [`silent`]: the shortest silence that takes a backend out of the way of new requests.
pub(crate) const SILENT_FLOOR: std::time::Duration = std::time::Duration::from_secs(2);
/// See [`silent`].
pub(crate) const SILENT_FACTOR: u32 = 5;

/// A backend back from a 429 cooldown, with no pace to go by (its answers carry no quota hints),
/// takes one request at a time until one succeeds, so the requests that waited for it do not all
/// rush it at once and earn a 429 each. (With a pace, admission spacing does that job.)
///
/// Likewise a half-open circuit takes no more requests while its probe is in flight.
///
/// And a backend that has not answered yet takes at most [`COLD_START`] requests at once: its
/// first answer tells its quota (a cold burst of a batch job would otherwise spend the whole
/// burst on 429s before anything is known).
pub(crate) fn on_probation(state: &BackendState) -> bool {
    let in_flight = state.in_flight();
    in_flight > 0
        && (state.circuit() == crate::state::Circuit::HalfOpen
            || (state.throttle_streak() > 0 && state.pace().is_none())
            || (in_flight >= COLD_START && !state.answered_once()))
}

/// See [`on_probation`]: requests a backend takes at once before its first answer.
pub(crate) const COLD_START: usize = 4;

/// Picks among `tier` (indices into `all`), considering only candidates whose availability is
/// `want`. Returns `None` when none qualifies.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pick(
    strategy: Strategy,
    all: &[Candidate],
    tier: &Tier,
    want: Avail,
    now: Instant,
    rng: &Rng,
    cursor: &AtomicUsize,
    skip: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let ok = |i: &usize| !skip(*i) && availability(all, &all[*i], now) == want;
    if tier.members.len() > SCAN_MAX
        && let Some(i) = sampled(strategy, all, tier, &ok, rng, cursor)
    {
        return Some(i);
    }
    let weights_set = tier.weights_set;
    let tier = &tier.members[..];
    match strategy {
        Strategy::LatencyAware if weights_set => weighted(all, tier, &ok, rng),
        Strategy::LatencyAware => {
            // Ask each candidate once: which are eligible (a bit each), and whether their
            // weights are all equal.
            if tier.len() > 64 {
                return weighted(all, tier, &ok, rng);
            }
            let (mut mask, mut weight, mut uniform) = (0u64, None, true);
            for (k, i) in tier.iter().enumerate() {
                if ok(i) {
                    mask |= 1 << k;
                    let w = all[*i].weight;
                    uniform &= *weight.get_or_insert(w) == w;
                }
            }
            let eligible = mask.count_ones() as usize;
            if eligible == 0 {
                return None;
            }
            if !uniform {
                return weighted(all, tier, &ok, rng);
            }
            let nth = |n: usize| {
                let mut m = mask;
                for _ in 0..n {
                    m &= m - 1;
                }
                tier[m.trailing_zeros() as usize]
            };
            if eligible == 1 {
                return Some(nth(0));
            }
            // Two different eligible backends, uniformly; ties go to the first draw, so equal
            // backends share evenly.
            let n = eligible as u64;
            let a = (rng.next_u64() % n) as usize;
            let b = (a + 1 + (rng.next_u64() % (n - 1)) as usize) % eligible;
            let (x, y) = (nth(a), nth(b));
            Some(if lighter(&all[y], &all[x], true) {
                y
            } else {
                x
            })
        }
        Strategy::WeightedRandom => weighted(all, tier, &ok, rng),
        Strategy::RoundRobin => {
            // The n-th eligible backend, so skipped ones do not double their neighbour's share.
            let eligible = tier.iter().filter(|i| ok(i)).count();
            if eligible == 0 {
                return None;
            }
            let nth = cursor.fetch_add(1, Relaxed) % eligible;
            tier.iter().copied().filter(|i| ok(i)).nth(nth)
        }
        Strategy::LeastInFlight => {
            let start = cursor.fetch_add(1, Relaxed);
            (0..tier.len())
                .map(|k| tier[(start + k) % tier.len()])
                .filter(|i| ok(i))
                .min_by_key(|i| all[*i].state.in_flight())
        }
        Strategy::PowerOfTwo => {
            let a = weighted(all, tier, &ok, rng)?;
            let b = weighted(all, tier, &ok, rng)?;
            Some(if lighter(&all[b], &all[a], false) {
                b
            } else {
                a
            })
        }
    }
}

/// A pick in a large tier by drawing members at random, each kept only if `ok` (rejection
/// sampling: among the members `ok` accepts, the same distribution a scan gives, weighted or
/// uniform). `None` when [`DRAWS`] draws found none (most of the tier out): the caller scans.
/// Round robin takes the member at its turn, or a random one when that one cannot take the
/// request (so no neighbour takes a double share); least-in-flight is the least loaded of up to
/// eight accepted draws (power of d choices) instead of the whole tier's minimum.
fn sampled(
    strategy: Strategy,
    all: &[Candidate],
    tier: &Tier,
    ok: &impl Fn(&usize) -> bool,
    rng: &Rng,
    cursor: &AtomicUsize,
) -> Option<usize> {
    let members = &tier.members;
    let uniform = |not: Option<usize>| {
        (0..DRAWS)
            .map(|_| members[(rng.next_u64() % members.len() as u64) as usize])
            .find(|i| Some(*i) != not && ok(i))
    };
    let weighted = || {
        let total = *tier.cumulative.last()?;
        if total <= 0.0 {
            return None;
        }
        (0..DRAWS)
            .map(|_| {
                let r = rng.next_f64() * total;
                let k = tier.cumulative.partition_point(|c| *c <= r);
                members[k.min(members.len() - 1)]
            })
            .find(|i| ok(i))
    };
    match strategy {
        Strategy::LatencyAware if tier.uniform => {
            let x = uniform(None)?;
            let y = uniform(Some(x))?;
            Some(if lighter(&all[y], &all[x], true) {
                y
            } else {
                x
            })
        }
        Strategy::LatencyAware | Strategy::WeightedRandom => weighted(),
        Strategy::PowerOfTwo => {
            let x = weighted()?;
            let y = weighted()?;
            Some(if lighter(&all[y], &all[x], false) {
                y
            } else {
                x
            })
        }
        Strategy::RoundRobin => {
            let turn = members[cursor.fetch_add(1, Relaxed) % members.len()];
            if ok(&turn) { Some(turn) } else { uniform(None) }
        }
        Strategy::LeastInFlight => (0..8)
            .map_while(|_| uniform(None))
            .min_by_key(|i| all[*i].state.in_flight()),
    }
}

/// True when `y` carries less load than `x`: in flight (plus one) times latency EWMA. A backend
/// that has not answered yet is taken to be as fast as the other one, so the two compare by
/// in-flight count: a new backend gets its share and is measured, instead of losing every
/// comparison to backends already known to be fast (its first burst is capped by
/// [`on_probation`]).
///
/// `tolerant` (the default pick): latencies within [`SAME_LATENCY`] of each other count as
/// equal, so that equal backends compare by in-flight count alone and, with nothing in flight,
/// the first of the two random candidates wins: they share even one request at a time, where
/// a few milliseconds of measurement noise used to send everything to one of them.
fn lighter(y: &Candidate, x: &Candidate, tolerant: bool) -> bool {
    let (ly, lx) = (y.state.latency(), x.state.latency());
    let secs = |l: Option<std::time::Duration>, other: Option<std::time::Duration>| {
        l.or(other).map_or(1.0, |d| d.as_secs_f64().max(1e-6))
    };
    let (mut sy, mut sx) = (secs(ly, lx), secs(lx, ly));
    if tolerant && sy.max(sx) < SAME_LATENCY * sy.min(sx) {
        (sy, sx) = (1.0, 1.0);
    }
    let load = |c: &Candidate, latency: f64| (c.state.in_flight() as f64 + 1.0) * latency;
    load(y, sy) < load(x, sx)
}

/// Latency averages closer than this factor are the same latency measured with noise (a slow
/// region's is many times its peers').
const SAME_LATENCY: f64 = 1.5;

fn weighted(
    all: &[Candidate],
    tier: &[usize],
    ok: &impl Fn(&usize) -> bool,
    rng: &Rng,
) -> Option<usize> {
    // Ask each candidate once (a tier of up to 64; larger tiers ask twice).
    let mut eligible = 0u64;
    let mut total = 0.0;
    for (k, i) in tier.iter().enumerate() {
        if ok(i) {
            total += all[*i].weight;
            if k < 64 {
                eligible |= 1 << k;
            }
        }
    }
    if total <= 0.0 {
        return None;
    }
    let was_eligible = |k: usize, i: &usize| {
        if k < 64 {
            eligible & (1 << k) != 0
        } else {
            ok(i)
        }
    };
    let mut r = rng.next_f64() * total;
    let mut last = None;
    for (_, i) in tier.iter().enumerate().filter(|(k, i)| was_eligible(*k, i)) {
        last = Some(*i);
        r -= all[*i].weight;
        if r < 0.0 {
            return Some(*i);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// True when `got` is within five standard deviations of the binomial share `p` over `n`
    /// picks (a share of 0.005 must land in 0.0015-0.0085, not anywhere under 0.02).
    fn within_binomial(p: f64, got: f64, n: usize) -> bool {
        (got - p).abs() <= 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-9
    }

    /// Weight-1 candidates over `states`.
    fn equal(states: &[BackendState]) -> Vec<Candidate> {
        states
            .iter()
            .map(|s| Candidate {
                weight: 1.0,
                weight_set: false,
                state: s.clone(),
            })
            .collect()
    }

    fn shares(weights: &[f64], strategy: Strategy, n: usize) -> Vec<f64> {
        let (_states, all) = large(weights.iter().copied());
        counts(strategy, &all, n, 42)
            .iter()
            .map(|c| *c as f64 / n as f64)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_random_honours_weights_within_two_points() {
        for weights in [vec![0.7, 0.3], vec![99.0, 0.5, 0.5], vec![1.0, 0.0, 1.0]] {
            let total: f64 = weights.iter().sum();
            let got = shares(&weights, Strategy::WeightedRandom, 10_000);
            for (w, g) in weights.iter().zip(&got) {
                assert!(
                    within_binomial(w / total, *g, 10_000),
                    "{weights:?}: {got:?}"
                );
            }
        }
        let got = shares(&[1.0, 0.0, 1.0], Strategy::WeightedRandom, 10_000);
        assert_eq!(got[1], 0.0, "weight 0 receives nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn by_default_the_fast_backend_of_two_equal_ones_takes_nearly_every_request() {
        let states = [BackendState::new(), BackendState::new()];
        states[0].record_latency(Duration::from_millis(600));
        states[1].record_latency(Duration::from_millis(5));
        let all = equal(&states);
        let (rng, cursor) = (Rng::seeded(7), AtomicUsize::new(0));
        let pick_one = || {
            pick(
                Strategy::default(),
                &all,
                &Tier::new(Box::new([0, 1]), &all),
                Avail::Yes,
                Instant::now(),
                &rng,
                &cursor,
                &|_| false,
            )
            .unwrap()
        };
        // Two different candidates every time: the lighter one always wins while idle.
        assert!((0..1000).all(|_| pick_one() == 1));
        // Load counts: 200 requests in flight on the fast one outweigh the slow one's latency.
        let _busy: Vec<_> = (0..200).map(|_| states[1].start_request(0)).collect();
        assert_eq!(pick_one(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn by_default_set_weights_are_still_exact() {
        for weights in [vec![0.7, 0.3], vec![99.0, 0.5, 0.5]] {
            let total: f64 = weights.iter().sum();
            let got = shares(&weights, Strategy::default(), 10_000);
            for (w, g) in weights.iter().zip(&got) {
                assert!(
                    within_binomial(w / total, *g, 10_000),
                    "{weights:?}: {got:?}"
                );
            }
        }
        let got = shares(&[1.0, 1.0, 1.0], Strategy::default(), 3_000);
        assert!(
            got.iter().all(|g| *g > 0.25),
            "equal and idle: spread, {got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_cycles_and_skips_weight_zero() {
        let got = shares(&[1.0, 0.0, 5.0], Strategy::RoundRobin, 1000);
        assert_eq!(got, vec![0.5, 0.0, 0.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn least_in_flight_prefers_the_idle_backend() {
        let states = [BackendState::new(), BackendState::new()];
        let _busy = states[0].start_request(0);
        let all = equal(&states);
        let cursor = AtomicUsize::new(0);
        let rng = Rng::seeded(1);
        for _ in 0..10 {
            let i = pick(
                Strategy::LeastInFlight,
                &all,
                &Tier::new(Box::new([0, 1]), &all),
                Avail::Yes,
                Instant::now(),
                &rng,
                &cursor,
                &|_| false,
            );
            assert_eq!(i, Some(1));
        }
        states[1].record_latency(Duration::from_millis(1));
        states[0].record_latency(Duration::from_millis(500));
        // Power of two: whenever the two draws differ, the lighter backend (1) wins; when both
        // draws are the same backend it is taken. So 1 gets about 3/4 of the picks, 0 about 1/4.
        let mut to_idle = 0;
        for _ in 0..1000 {
            let i = pick(
                Strategy::PowerOfTwo,
                &all,
                &Tier::new(Box::new([0, 1]), &all),
                Avail::Yes,
                Instant::now(),
                &rng,
                &cursor,
                &|_| false,
            );
            to_idle += usize::from(i == Some(1));
        }
        assert!(
            (700..=800).contains(&to_idle),
            "{to_idle} of 1000 to the idle backend"
        );
    }

    /// Fresh states and the candidates over them, of these weights.
    fn large(weights: impl Iterator<Item = f64>) -> (Vec<BackendState>, Vec<Candidate>) {
        let weights: Vec<f64> = weights.collect();
        let states: Vec<BackendState> = weights.iter().map(|_| BackendState::new()).collect();
        let all = weights
            .iter()
            .zip(&states)
            .map(|(w, s)| Candidate {
                weight: *w,
                weight_set: false,
                state: s.clone(),
            })
            .collect();
        (states, all)
    }

    /// How many of `n` picks each candidate got, all of `all` one tier.
    fn counts(strategy: Strategy, all: &[Candidate], n: usize, seed: u64) -> Vec<usize> {
        let tier = Tier::new((0..all.len()).collect(), all);
        let (rng, cursor, now) = (Rng::seeded(seed), AtomicUsize::new(0), Instant::now());
        let mut counts = vec![0usize; all.len()];
        for _ in 0..n {
            let i = pick(
                strategy,
                all,
                &tier,
                Avail::Yes,
                now,
                &rng,
                &cursor,
                &|_| false,
            );
            counts[i.expect("a backend is free")] += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_tier_is_sampled_and_still_honours_weights() {
        // 300 backends of weights 1, 2, 3, 4 in turn: each weight class gets its share.
        let (_states, all) = large((0..300).map(|i| f64::from(i % 4 + 1)));
        let n = 200_000;
        for strategy in [Strategy::WeightedRandom, Strategy::LatencyAware] {
            let got = counts(strategy, &all, n, 3);
            for class in 1..=4 {
                let share: usize = got.iter().skip(class - 1).step_by(4).sum();
                let want = class as f64 / 10.0;
                assert!(
                    within_binomial(want, share as f64 / n as f64, n),
                    "{strategy:?}: weight {class}: {share}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_tier_almost_all_out_still_finds_the_backend_left() {
        let (states, all) = large((0..300).map(|_| 1.0));
        let until = Instant::now() + Duration::from_secs(60);
        for s in &states[..299] {
            s.extend_cooldown(until);
        }
        for strategy in [
            Strategy::LatencyAware,
            Strategy::WeightedRandom,
            Strategy::RoundRobin,
            Strategy::LeastInFlight,
            Strategy::PowerOfTwo,
        ] {
            let got = counts(strategy, &all, 50, 3);
            assert_eq!(got[299], 50, "{strategy:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_in_a_large_tier_gives_no_neighbour_of_a_backend_out_a_double_share() {
        let (states, all) = large((0..100).map(|_| 1.0));
        states[10].extend_cooldown(Instant::now() + Duration::from_secs(60));
        let got = counts(Strategy::RoundRobin, &all, 100_000, 3);
        assert_eq!(got[10], 0);
        // 1,000 turns each, and the out one's 1,000 spread at random over the other 99.
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, c)| i == 10 || (990..=1040).contains(c)),
            "{got:?}"
        );
    }
}
