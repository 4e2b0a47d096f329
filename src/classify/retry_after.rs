//! Pure parsers for every Retry-After and rate-limit header form the providers send, read all at
//! once into [`Hints`].
//!
//! Nothing here does I/O or reads a clock by itself: forms that carry an absolute time (HTTP-date,
//! RFC 3339) are resolved against a [`WallClock`] the caller passes in, so tests can pin it.
//! Garbage yields "no hint" (`None`), never a panic. Negative or past values mean "now"
//! ([`Duration::ZERO`]); absurdly long values are clamped to the `cap` the caller gives.
//!
//! | header | form | parser (crate-private) |
//! |---|---|---|
//! | `retry-after-ms`, `x-ms-retry-after-ms`, gRPC's `grpc-retry-pushback-ms` | float milliseconds | `parse_millis` |
//! | `retry-after` | delay-seconds (float and whitespace tolerated) or HTTP-date (all three RFC 9110 formats) | `parse_retry_after` |
//! | `x-ratelimit-reset-requests`, `x-ratelimit-reset-tokens` | Go-style durations (`20ms`, `6m0s`, `1h2m3.5s`) or integer seconds; `0`/`-1` mean unknown | `parse_reset` |
//! | `anthropic-ratelimit-*-reset` | RFC 3339 timestamp | `parse_rfc3339` |
//! | `x-ratelimit-remaining-*`, `anthropic-ratelimit-*-remaining` | unsigned integer | `parse_remaining` |
//!
//! [`Hints`] reads them all at once and [`Hints::wait`] picks the wait the official
//! SDKs would honour, in their order of preference.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};

/// The default upper bound for any server hint: 300 s, as Envoy caps `retry-after`.
pub(crate) const DEFAULT_MAX_HINT: Duration = Duration::from_secs(300);

/// The longest wait a hint the stack passes on to a caller asks for: openai-python honours a
/// hint only up to 120 s (Anthropic's SDK 60 s) and otherwise does not retry at all. A backend
/// may announce longer; it is then left alone that long (up to [`DEFAULT_MAX_HINT`]) while the
/// request moves on.
pub(crate) const MAX_PASSED_HINT: Duration = Duration::from_secs(120);

/// The window of a quota limit sent without a reset (`x-ratelimit-limit-*` is per minute).
const PER_MINUTE: Duration = Duration::from_secs(60);

/// A source of wall-clock time, for hints that carry an absolute date.
///
/// tokio's paused clock only freezes `tokio::time::Instant`; HTTP-date and RFC 3339 hints need the
/// wall clock, so it is injectable. `WallClock::default()` is the real one.
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl WallClock {
    /// A clock driven by any function: one that follows tokio's paused clock in tests, or
    /// `move || at` for one that always reads `at`.
    pub fn from_fn(f: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        WallClock(Arc::new(f))
    }

    /// Reads the clock.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
}

/// The system's wall clock.
impl Default for WallClock {
    fn default() -> Self {
        WallClock(Arc::new(SystemTime::now))
    }
}

impl fmt::Debug for WallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WallClock")
    }
}

fn as_trimmed_str(value: &HeaderValue) -> Option<&str> {
    let s = std::str::from_utf8(value.as_bytes()).ok()?.trim();
    (!s.is_empty()).then_some(s)
}

/// Turns a finite number of seconds into a duration: negative means now, too long is `cap`.
fn seconds_to_duration(secs: f64, cap: Duration) -> Option<Duration> {
    if secs.is_nan() {
        return None;
    }
    if secs <= 0.0 {
        return Some(Duration::ZERO);
    }
    if secs >= cap.as_secs_f64() {
        return Some(cap);
    }
    Some(Duration::from_secs_f64(secs))
}

/// Parses a plain decimal number: digits with an optional sign and fraction. Rejects `inf`, `nan`,
/// exponents and hex, which `f64::from_str` would accept.
fn parse_decimal(s: &str) -> Option<f64> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    let mut seen_digit = false;
    let mut seen_dot = false;
    for c in digits.chars() {
        match c {
            '0'..='9' => seen_digit = true,
            '.' if !seen_dot => seen_dot = true,
            _ => return None,
        }
    }
    if !seen_digit {
        return None;
    }
    s.parse().ok()
}

/// Parses `retry-after-ms` / `x-ms-retry-after-ms`: a (possibly fractional) number of milliseconds.
///
/// A negative value is no hint (the next header form is read instead).
pub(crate) fn parse_millis(value: &HeaderValue, cap: Duration) -> Option<Duration> {
    let ms = parse_decimal(as_trimmed_str(value)?).filter(|ms| *ms >= 0.0)?;
    seconds_to_duration(ms / 1000.0, cap)
}

/// Parses `retry-after`: delay-seconds (fractions tolerated) or an HTTP-date in any of the three
/// RFC 9110 formats, resolved against `now`. A past date means [`Duration::ZERO`].
#[cfg(test)]
pub(crate) fn parse_retry_after(
    value: &HeaderValue,
    now: SystemTime,
    cap: Duration,
) -> Option<Duration> {
    retry_after_with(value, || now, cap)
}

/// [`parse_retry_after`], reading the wall clock only for the HTTP-date form.
fn retry_after_with(
    value: &HeaderValue,
    now: impl FnOnce() -> SystemTime,
    cap: Duration,
) -> Option<Duration> {
    let s = as_trimmed_str(value)?;
    if let Some(secs) = parse_decimal(s) {
        // A negative number of seconds is no hint.
        return seconds_to_duration(secs, cap).filter(|_| secs >= 0.0);
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(until(at, now()).min(cap))
}

/// True when a `retry-after` value is an HTTP-date rather than a number.
fn is_date(value: &HeaderValue) -> bool {
    as_trimmed_str(value).is_some_and(|s| parse_decimal(s).is_none())
}

/// Parses an RFC 3339 timestamp (Anthropic's `anthropic-ratelimit-*-reset`) into the time left
/// until it, resolved against `now`. A past time means [`Duration::ZERO`].
pub(crate) fn parse_rfc3339(
    value: &HeaderValue,
    now: SystemTime,
    cap: Duration,
) -> Option<Duration> {
    let s = as_trimmed_str(value)?;
    let at = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(until(SystemTime::from(at), now).min(cap))
}

fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Parses `x-ratelimit-reset-requests` / `-tokens`.
///
/// OpenAI sends Go-style durations (`12ms`, `1s`, `6m0s`, `2m59.56s`, `1h2m3.5s`); Azure sends the
/// same header names with integer seconds, where `0` and `-1` mean unknown (observed), so a bare
/// number that is not positive is no hint.
pub(crate) fn parse_reset(value: &HeaderValue, cap: Duration) -> Option<Duration> {
    let s = as_trimmed_str(value)?;
    if let Some(secs) = parse_decimal(s) {
        return if secs > 0.0 {
            seconds_to_duration(secs, cap)
        } else {
            None
        };
    }
    parse_go_duration(s).map(|d| d.min(cap))
}

/// Parses a Go `time.Duration` string: one or more `<decimal><unit>` with units `ns`, `us`, `µs`,
/// `ms`, `s`, `m`, `h`. Returns `None` on anything else, and on a negative duration.
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s.starts_with('-') {
        return None;
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = parse_decimal(&rest[..num_len])?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    if !total.is_finite() {
        return None;
    }
    // Durations beyond u64 seconds are absurd; callers clamp to their cap anyway.
    Some(Duration::from_secs_f64(total.min(u32::MAX as f64)))
}

/// Parses an `x-ratelimit-remaining-*` quota hint: an unsigned integer.
pub(crate) fn parse_remaining(value: &HeaderValue) -> Option<u64> {
    let s = as_trimmed_str(value)?;
    if s.starts_with('+') {
        return None;
    }
    s.parse().ok()
}

/// Tells a caller to wait `wait`: sets `retry-after` (whole seconds, rounded up) and
/// `retry-after-ms` (and `grpc-retry-pushback-ms` on a gRPC answer), and removes
/// `x-ms-retry-after-ms` so no stale hint contradicts them.
///
/// Clamped to 120 s: the official SDKs do not wait on a longer hint at all.
pub fn set_retry_after(headers: &mut HeaderMap, wait: Duration) {
    let wait = wait.min(MAX_PASSED_HINT);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    // Both rounded up: a wait under a millisecond is `1`, never `0` ("now").
    let ms = wait.as_millis() as u64 + u64::from(!wait.subsec_nanos().is_multiple_of(1_000_000));
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    headers.insert("retry-after-ms", HeaderValue::from(ms));
    headers.remove("x-ms-retry-after-ms");
    // A gRPC answer: its own form, which gRPC clients read.
    // (retry_after knows no other module: the header is named here, not taken from `grpc`.)
    if headers.contains_key("grpc-status") {
        headers.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
    }
}

/// Every wait and quota hint one response carried, parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `retry-after-ms`, else `x-ms-retry-after-ms` (or gRPC's `grpc-retry-pushback-ms`), else
    /// `retry-after`: the server's explicit wait.
    pub retry_after: Option<Duration>,
    /// Time until the request quota is fully replenished.
    pub reset_requests: Option<Duration>,
    /// Time until the token quota is fully replenished.
    pub reset_tokens: Option<Duration>,
    /// Requests left in the current window.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the current window.
    pub remaining_tokens: Option<u64>,
    /// The request quota of the window (`x-ratelimit-limit-requests`).
    pub limit_requests: Option<u64>,
    /// The token quota of the window (`x-ratelimit-limit-tokens`).
    pub limit_tokens: Option<u64>,
}

/// Anthropic's rate-limit dimensions: (is the requests dimension, remaining header, reset header).
const ANTHROPIC: [(bool, &str, &str); 4] = [
    (
        true,
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ),
    (
        false,
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        false,
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        false,
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ),
];

impl Hints {
    /// Reads every hint a response carries. `cap` bounds each duration. (Tests and fuzzing;
    /// the layers read the clock only when a hint is a date, with [`Hints::from_headers_at`].)
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_headers(headers: &HeaderMap, now: SystemTime, cap: Duration) -> Hints {
        Hints::from_headers_at(headers, || now, cap)
    }

    /// [`Hints::from_headers`], reading the wall clock only if a hint is a date (an HTTP-date
    /// `retry-after`, an RFC 3339 reset): most answers carry none, and the clock is not free.
    pub(crate) fn from_headers_at(
        headers: &HeaderMap,
        now: impl Fn() -> SystemTime,
        cap: Duration,
    ) -> Hints {
        // One pass over the headers, matching names by text: cheaper than a hashed lookup per
        // name, and most responses carry only a few headers. A header sent twice (a proxy adding
        // its own) counts at its most cautious: the longest wait and reset, the fewest remaining.
        let (mut ms, mut x_ms, mut ra) = (None, None, None);
        let longer = |a: Option<Duration>, b: Option<Duration>| a.max(b);
        let fewer = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut hints = Hints::default();
        // Anthropic: (remaining, reset) per dimension, paired once all are seen.
        let mut anthropic: [(Option<&HeaderValue>, Option<&HeaderValue>); 4] = [(None, None); 4];
        let mut any_anthropic = false;
        // An HTTP-date `retry-after` is read against the answer's own `Date` when it has one
        // (servers' clocks drift from ours); after the pass, as the two may come in any order.
        let mut dated_retry_after = false;
        let mut date: Option<&HeaderValue> = None;
        let mut anthropic_limits: (Option<u64>, Option<u64>) = (None, None);
        for (name, value) in headers {
            let n = name.as_str();
            // Every name below starts with one of these: most headers (content-*, server,
            // cache-*) are passed over at the first byte.
            if !matches!(n.as_bytes().first(), Some(b'r' | b'x' | b'g' | b'd' | b'a')) {
                continue;
            }
            match n {
                "retry-after-ms" => ms = longer(ms, parse_millis(value, cap)),
                "x-ms-retry-after-ms" => x_ms = longer(x_ms, parse_millis(value, cap)),
                "grpc-retry-pushback-ms" => x_ms = longer(x_ms, parse_millis(value, cap)),
                "retry-after" if is_date(value) => dated_retry_after = true,
                "retry-after" => ra = longer(ra, retry_after_with(value, &now, cap)),
                "date" => date = Some(value),
                "x-ratelimit-reset-requests" => {
                    hints.reset_requests = longer(hints.reset_requests, parse_reset(value, cap))
                }
                "x-ratelimit-reset-tokens" => {
                    hints.reset_tokens = longer(hints.reset_tokens, parse_reset(value, cap))
                }
                "x-ratelimit-remaining-requests" => {
                    hints.remaining_requests =
                        fewer(hints.remaining_requests, parse_remaining(value))
                }
                "x-ratelimit-remaining-tokens" => {
                    hints.remaining_tokens = fewer(hints.remaining_tokens, parse_remaining(value))
                }
                "x-ratelimit-limit-requests" => {
                    hints.limit_requests = fewer(hints.limit_requests, parse_remaining(value))
                }
                "x-ratelimit-limit-tokens" => {
                    hints.limit_tokens = fewer(hints.limit_tokens, parse_remaining(value))
                }
                _ => {
                    if !n.starts_with("anthropic-ratelimit-") {
                        continue;
                    }
                    // The limits fill what the OpenAI-style headers did not say.
                    if n == "anthropic-ratelimit-requests-limit" {
                        anthropic_limits.0 = fewer(anthropic_limits.0, parse_remaining(value));
                        continue;
                    }
                    if n == "anthropic-ratelimit-tokens-limit" {
                        anthropic_limits.1 = fewer(anthropic_limits.1, parse_remaining(value));
                        continue;
                    }
                    for (i, (_, remaining, reset)) in ANTHROPIC.iter().enumerate() {
                        if n == *remaining {
                            anthropic[i].0 = Some(value);
                            any_anthropic = true;
                        } else if n == *reset {
                            anthropic[i].1 = Some(value);
                        }
                    }
                }
            }
        }
        if dated_retry_after {
            let server_now = date
                .and_then(as_trimmed_str)
                .and_then(|d| httpdate::parse_http_date(d).ok());
            for value in headers.get_all(http::header::RETRY_AFTER) {
                if is_date(value) {
                    let hint = match server_now {
                        Some(at) => retry_after_with(value, || at, cap),
                        None => retry_after_with(value, &now, cap),
                    };
                    ra = longer(ra, hint);
                }
            }
        }
        hints.retry_after = ms.or(x_ms).or(ra);
        if !any_anthropic {
            return hints;
        }
        hints.limit_requests = hints.limit_requests.or(anthropic_limits.0);
        hints.limit_tokens = hints.limit_tokens.or(anthropic_limits.1);
        // Anthropic's family: fill what the OpenAI-style headers did not say.
        for (i, (is_requests, _, _)) in ANTHROPIC.iter().enumerate() {
            let (Some(remaining_value), reset_value) = anthropic[i] else {
                continue;
            };
            let remaining = parse_remaining(remaining_value);
            let reset = reset_value.and_then(|v| parse_rfc3339(v, now(), cap));
            let (rem_slot, reset_slot) = if *is_requests {
                (&mut hints.remaining_requests, &mut hints.reset_requests)
            } else {
                (&mut hints.remaining_tokens, &mut hints.reset_tokens)
            };
            if let Some(r) = remaining {
                *rem_slot = Some(rem_slot.map_or(r, |old| old.min(r)));
            }
            if let Some(d) = reset
                && remaining == Some(0)
            {
                *reset_slot = Some(reset_slot.map_or(d, |old| old.max(d)));
            } else if let Some(d) = reset
                && reset_slot.is_none()
            {
                *reset_slot = Some(d);
            }
        }
        hints
    }

    /// The wait a throttled response asks for: the explicit hint if there is one; else the reset
    /// time of a quota the headers say is used up (remaining 0); else `None`.
    pub fn wait(&self) -> Option<Duration> {
        if self.retry_after.is_some() {
            return self.retry_after;
        }
        let req = self
            .reset_requests
            .filter(|_| self.remaining_requests == Some(0));
        let tok = self
            .reset_tokens
            .filter(|_| self.remaining_tokens == Some(0));
        match (req, tok) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the request quota is used up (`remaining-requests: 0`), the time until the next
    /// request is likely to be let through: the reset time spread over the window's limit
    /// (a token bucket refills one request every `reset / limit`), or the whole reset time when
    /// the limit is unknown. `None` while requests remain or nothing was said.
    pub(crate) fn next_request_in(&self) -> Option<Duration> {
        if self.remaining_requests != Some(0) {
            return None;
        }
        let reset = self.reset_requests?;
        Some(match self.limit_requests {
            Some(limit) if limit > 0 => reset / u32::try_from(limit).unwrap_or(u32::MAX),
            _ => reset,
        })
    }

    /// The interval at which the request quota refills one request: `reset / (limit -
    /// remaining)` (a token bucket refills to full in `reset`), or the whole reset time when the
    /// quota is used up and the limit is unknown. `None` when the headers do not say.
    pub(crate) fn refill_interval(&self) -> Option<Duration> {
        let reset = self.reset_requests?;
        let remaining = self.remaining_requests?;
        match self.limit_requests {
            Some(limit) if limit > remaining => {
                Some(reset / u32::try_from(limit - remaining).unwrap_or(u32::MAX))
            }
            _ if remaining == 0 => Some(reset),
            _ => None,
        }
    }

    /// The pace at which the backend's request quota refills one request, from whatever the
    /// headers say: with a reset (OpenAI, Anthropic), [`Hints::refill_interval`]; without one
    /// but with a limit (Azure standard deployments send only per-minute limit and remaining),
    /// one minute spread over the limit. `None` when the headers do not say.
    pub(crate) fn quota_pace(&self) -> Option<Duration> {
        if self.reset_requests.is_some() {
            return self.refill_interval();
        }
        match self.limit_requests {
            Some(limit) if limit > 0 => Some(PER_MINUTE / u32::try_from(limit).unwrap_or(u32::MAX)),
            _ => None,
        }
    }

    /// How many requests may go at once before pacing starts. With a reset, the remaining
    /// count itself. Without one, the count is per minute while the quota is enforced over
    /// short windows (Azure: 1 s or 10 s), so a minute's remaining share in one burst earns
    /// 429s: the burst is one second's share of what remains (`remaining / 60`), less a
    /// reserve of a tenth of a second's quota (at least one request) that absorbs the jitter
    /// of paced arrivals. `None` without a remaining count.
    pub(crate) fn burst_credits(&self) -> Option<i64> {
        let remaining = i64::try_from(self.remaining_requests?).unwrap_or(i64::MAX);
        if self.reset_requests.is_some() {
            return Some(remaining);
        }
        let Some(limit) = self.limit_requests.filter(|l| *l > 0) else {
            return Some(remaining);
        };
        let per_second = i64::try_from(limit / 60).unwrap_or(i64::MAX);
        let reserve = (per_second / 10).max(1);
        Some(remaining / 60 - reserve)
    }

    /// The rate at which the token quota refills, in tokens per second: with a reset
    /// (OpenAI), what is missing over the time to refill it; without one (Azure), the
    /// per-minute limit over 60 s. `None` when the headers do not say.
    pub(crate) fn token_rate(&self) -> Option<f64> {
        let limit = self.limit_tokens.filter(|l| *l > 0)? as f64;
        match (self.reset_tokens, self.remaining_tokens) {
            (Some(reset), Some(remaining)) if !reset.is_zero() && (remaining as f64) < limit => {
                Some((limit - remaining as f64) / reset.as_secs_f64())
            }
            (Some(_), _) => None,
            (None, _) => Some(limit / PER_MINUTE.as_secs_f64()),
        }
    }

    /// The token quota as the answer tells it: the tokens left and what the quota holds when
    /// full, over the window the refill rate ([`Hints::token_rate`]) fills (with a reset, the
    /// counts themselves; without one, the per-minute counts' one-second share). `None`
    /// without both counts.
    pub(crate) fn token_level(&self) -> Option<(f64, f64)> {
        let left = self.remaining_tokens? as f64;
        let limit = self.limit_tokens.filter(|l| *l > 0)? as f64;
        if self.reset_tokens.is_some() {
            return Some((left, limit));
        }
        let per_second = PER_MINUTE.as_secs_f64();
        Some((left / per_second, limit / per_second))
    }

    /// How many tokens requests may spend at once before token pacing starts: like
    /// [`Hints::burst_credits`] for requests (without a reset, one second's share of what
    /// remains less a tenth of a second's quota). `None` without a remaining count.
    pub(crate) fn burst_tokens(&self) -> Option<i64> {
        let remaining = i64::try_from(self.remaining_tokens?).unwrap_or(i64::MAX);
        if self.reset_tokens.is_some() {
            return Some(remaining);
        }
        let Some(limit) = self.limit_tokens.filter(|l| *l > 0) else {
            return Some(remaining);
        };
        let per_second = i64::try_from(limit / 60).unwrap_or(i64::MAX);
        Some(remaining / 60 - (per_second / 10).max(1))
    }

    /// True when the response carried no hint at all (the fuzz entry points' and tests' check).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn is_empty(&self) -> bool {
        *self == Hints::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAP: Duration = DEFAULT_MAX_HINT;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn epoch(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    // 1994-11-06T08:49:37Z, the RFC 9110 example date.
    const RFC_EXAMPLE: u64 = 784_111_777;

    #[test]
    fn azure_limit_and_remaining_without_a_reset_give_a_pace_and_a_second_s_burst() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            Hints::from_headers(&m, SystemTime::UNIX_EPOCH, DEFAULT_MAX_HINT)
        };
        // 1200 per minute: one request every 50 ms; a full minute's 1200 left is one second's
        // 20 in a burst, less a reserve of 2.
        let azure = h(&[
            ("x-ratelimit-limit-requests", "1200"),
            ("x-ratelimit-remaining-requests", "1200"),
        ]);
        assert_eq!(azure.quota_pace(), Some(Duration::from_millis(50)));
        assert_eq!(azure.burst_credits(), Some(18));
        let drained = h(&[
            ("x-ratelimit-limit-requests", "1200"),
            ("x-ratelimit-remaining-requests", "30"),
        ]);
        assert_eq!(drained.burst_credits(), Some(-2), "paced at once");
        // With a reset (OpenAI), the remaining count is the burst and the reset sets the pace.
        let openai = h(&[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "60"),
            ("x-ratelimit-reset-requests", "4s"),
        ]);
        assert_eq!(openai.burst_credits(), Some(60));
        assert_eq!(openai.quota_pace(), Some(Duration::from_millis(100)));
        // Tokens the same way: 60 000 per minute is 1 000/s; a full minute left is one
        // second's 1 000 in a burst, less 100.
        let tokens = h(&[
            ("x-ratelimit-limit-tokens", "60000"),
            ("x-ratelimit-remaining-tokens", "60000"),
        ]);
        assert_eq!(tokens.token_rate(), Some(1000.0));
        assert_eq!(tokens.burst_tokens(), Some(900));
        let openai_tokens = h(&[
            ("x-ratelimit-limit-tokens", "10000"),
            ("x-ratelimit-remaining-tokens", "6000"),
            ("x-ratelimit-reset-tokens", "2s"),
        ]);
        assert_eq!(openai_tokens.token_rate(), Some(2000.0));
        assert_eq!(openai_tokens.burst_tokens(), Some(6000));
        // Anthropic: RFC 3339 resets (here 10 s after the injected clock) and limits.
        let anthropic = h(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "40"),
            ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:10Z"),
        ]);
        assert_eq!(anthropic.quota_pace(), Some(Duration::from_secs(1)));
        assert_eq!(anthropic.burst_credits(), Some(40));
        // Nothing said: nothing inferred.
        assert_eq!(h(&[]).token_rate(), None);
        assert_eq!(h(&[]).quota_pace(), None);
        assert_eq!(h(&[]).burst_credits(), None);
        let zero = h(&[("x-ratelimit-limit-requests", "0")]);
        assert_eq!(zero.quota_pace(), None, "no division by zero");
    }

    #[test]
    fn millis_forms() {
        assert_eq!(
            parse_millis(&hv("1500"), CAP),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_millis(&hv("12.5"), CAP),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(
            parse_millis(&hv("  250 "), CAP),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_millis(&hv("0"), CAP), Some(Duration::ZERO));
        assert_eq!(
            parse_millis(&hv("-40"), CAP),
            None,
            "negative: no hint, the next form is read"
        );
        assert_eq!(parse_millis(&hv("99999999999"), CAP), Some(CAP));
    }

    #[test]
    fn a_hint_passed_on_is_clamped_to_120_s() {
        let mut h = HeaderMap::new();
        set_retry_after(&mut h, Duration::from_secs(86_400));
        assert_eq!(h["retry-after"], "120");
        assert_eq!(h["retry-after-ms"], "120000");
        set_retry_after(&mut h, Duration::from_millis(1500));
        assert_eq!(h["retry-after"], "2", "whole seconds, rounded up");
        assert_eq!(h["retry-after-ms"], "1500");
        // Found by the fuzzer: a wait under a millisecond was passed on as `retry-after-ms: 0`.
        set_retry_after(&mut h, Duration::from_nanos(777_777));
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["retry-after-ms"], "1", "never 0 for a wait above 0");
    }

    #[test]
    fn millis_garbage_is_no_hint() {
        for bad in [
            "", " ", "abc", "1e3", "inf", "NaN", "0x10", "1.2.3", "10ms", "-", ".",
        ] {
            assert_eq!(parse_millis(&hv(bad), CAP), None, "{bad:?}");
        }
        let opaque = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert_eq!(parse_millis(&opaque, CAP), None);
    }

    #[test]
    fn retry_after_seconds_forms() {
        let now = epoch(RFC_EXAMPLE);
        assert_eq!(
            parse_retry_after(&hv("7"), now, CAP),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(&hv(" 7 "), now, CAP),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(&hv("1.5"), now, CAP),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after(&hv("0"), now, CAP), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(&hv("-3"), now, CAP),
            None,
            "negative: no hint"
        );
        assert_eq!(parse_retry_after(&hv("86400"), now, CAP), Some(CAP));
        assert_eq!(
            parse_retry_after(&hv("18446744073709551616"), now, CAP),
            Some(CAP)
        );
    }

    #[test]
    fn retry_after_all_three_http_date_formats() {
        let now = epoch(RFC_EXAMPLE - 30);
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_retry_after(&hv(form), now, CAP),
                Some(Duration::from_secs(30)),
                "{form}"
            );
        }
    }

    #[test]
    fn retry_after_past_date_means_now_and_far_date_is_capped() {
        let date = hv("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            parse_retry_after(&date, epoch(RFC_EXAMPLE + 3600), CAP),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&date, epoch(0), CAP), Some(CAP));
    }

    #[test]
    fn retry_after_garbage_is_no_hint() {
        let now = epoch(RFC_EXAMPLE);
        for bad in [
            "",
            "soon",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "2024-01-01T00:00:00Z",
            "1e2",
            "inf",
            "5 s",
        ] {
            assert_eq!(parse_retry_after(&hv(bad), now, CAP), None, "{bad:?}");
        }
    }

    #[test]
    fn reset_go_durations() {
        const CAP: Duration = Duration::from_secs(4000);
        let cases = [
            ("20ms", Duration::from_millis(20)),
            ("1s", Duration::from_secs(1)),
            ("6m0s", Duration::from_secs(360)),
            ("2m59.56s", Duration::from_millis(179_560)),
            ("1h2m3.5s", Duration::from_millis(3_723_500)),
            ("0s", Duration::ZERO),
            ("1.5h", CAP),
            ("500us", Duration::from_micros(500)),
            ("500µs", Duration::from_micros(500)),
            ("7ns", Duration::from_nanos(7)),
        ];
        for (s, want) in cases {
            let got = parse_reset(&hv(s), CAP).unwrap_or_else(|| panic!("{s} gave no hint"));
            let diff = got.abs_diff(want);
            assert!(diff < Duration::from_micros(1), "{s}: {got:?} != {want:?}");
        }
    }

    #[test]
    fn reset_integer_seconds_azure_form() {
        assert_eq!(parse_reset(&hv("12"), CAP), Some(Duration::from_secs(12)));
        assert_eq!(parse_reset(&hv("0"), CAP), None, "0 means unknown on Azure");
        assert_eq!(
            parse_reset(&hv("-1"), CAP),
            None,
            "-1 means unknown on Azure"
        );
    }

    #[test]
    fn reset_garbage_is_no_hint() {
        for bad in [
            "", "s", "1x", "-5s", "1m-3s", "ms", "1..2s", "1s2", "h1", "1 s", "1sm",
        ] {
            assert_eq!(parse_reset(&hv(bad), CAP), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_forms() {
        let now = epoch(1_700_000_000); // 2023-11-14T22:13:20Z
        assert_eq!(
            parse_rfc3339(&hv("2023-11-14T22:13:50Z"), now, CAP),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_rfc3339(&hv("2023-11-14T23:13:21+01:00"), now, CAP),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            parse_rfc3339(&hv("2023-11-14T22:13:20.250Z"), now, CAP),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_rfc3339(&hv("2020-01-01T00:00:00Z"), now, CAP),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_rfc3339(&hv("2099-01-01T00:00:00Z"), now, CAP),
            Some(CAP)
        );
        for bad in [
            "",
            "tomorrow",
            "2023-11-14",
            "2023-13-14T22:13:50Z",
            "1700000000",
        ] {
            assert_eq!(parse_rfc3339(&hv(bad), now, CAP), None, "{bad:?}");
        }
    }

    #[test]
    fn remaining_forms() {
        assert_eq!(parse_remaining(&hv("42")), Some(42));
        assert_eq!(parse_remaining(&hv(" 0 ")), Some(0));
        for bad in ["-1", "+1", "1.5", "lots", "", "99999999999999999999999"] {
            assert_eq!(parse_remaining(&hv(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn hints_prefer_ms_headers_over_retry_after() {
        let now = epoch(RFC_EXAMPLE);
        let mut h = HeaderMap::new();
        h.insert("retry-after", hv("10"));
        assert_eq!(
            Hints::from_headers(&h, now, CAP).wait(),
            Some(Duration::from_secs(10))
        );
        h.insert("x-ms-retry-after-ms", hv("2000"));
        assert_eq!(
            Hints::from_headers(&h, now, CAP).wait(),
            Some(Duration::from_secs(2))
        );
        h.insert("retry-after-ms", hv("1250.5"));
        let got = Hints::from_headers(&h, now, CAP).wait().unwrap();
        assert_eq!(got, Duration::from_micros(1_250_500));
        // A garbage preferred header falls through to the next form.
        h.insert("retry-after-ms", hv("garbage"));
        assert_eq!(
            Hints::from_headers(&h, now, CAP).wait(),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_hint_sent_twice_counts_at_its_most_cautious() {
        let now = epoch(RFC_EXAMPLE);
        let mut h = HeaderMap::new();
        h.append("retry-after-ms", hv("200"));
        h.append("retry-after-ms", hv("1500"));
        h.append("retry-after-ms", hv("garbage"));
        h.append("x-ratelimit-remaining-requests", hv("40"));
        h.append("x-ratelimit-remaining-requests", hv("3"));
        h.append("x-ratelimit-reset-requests", hv("2s"));
        h.append("x-ratelimit-reset-requests", hv("500ms"));
        let hints = Hints::from_headers(&h, now, CAP);
        assert_eq!(hints.retry_after, Some(Duration::from_millis(1500)));
        assert_eq!(hints.remaining_requests, Some(3));
        assert_eq!(hints.reset_requests, Some(Duration::from_secs(2)));
    }

    #[test]
    fn hints_fall_back_to_reset_of_exhausted_quota() {
        let now = epoch(RFC_EXAMPLE);
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining-requests", hv("0"));
        h.insert("x-ratelimit-reset-requests", hv("1.5s"));
        h.insert("x-ratelimit-remaining-tokens", hv("1000"));
        h.insert("x-ratelimit-reset-tokens", hv("6m0s"));
        let hints = Hints::from_headers(&h, now, CAP);
        assert_eq!(hints.remaining_requests, Some(0));
        assert_eq!(hints.remaining_tokens, Some(1000));
        // Only the exhausted dimension's reset counts as a wait.
        assert_eq!(hints.wait(), Some(Duration::from_millis(1500)));
        assert_eq!(hints.next_request_in(), Some(Duration::from_millis(1500)));
        h.insert("x-ratelimit-limit-requests", hv("3"));
        let hints = Hints::from_headers(&h, now, CAP);
        assert_eq!(hints.next_request_in(), Some(Duration::from_millis(500)));
        assert_eq!(hints.refill_interval(), Some(Duration::from_millis(500)));
        h.insert("x-ratelimit-remaining-requests", hv("1"));
        let hints = Hints::from_headers(&h, now, CAP);
        assert_eq!(hints.next_request_in(), None);
        assert_eq!(hints.refill_interval(), Some(Duration::from_millis(750)));
        assert_eq!(
            Hints::from_headers(&HeaderMap::new(), now, CAP).wait(),
            None
        );
        assert!(Hints::from_headers(&HeaderMap::new(), now, CAP).is_empty());
    }

    #[test]
    fn hints_read_anthropic_family() {
        let now = epoch(1_700_000_000);
        let mut h = HeaderMap::new();
        h.insert("anthropic-ratelimit-requests-remaining", hv("5"));
        h.insert(
            "anthropic-ratelimit-requests-reset",
            hv("2023-11-14T22:13:30Z"),
        );
        h.insert("anthropic-ratelimit-input-tokens-remaining", hv("0"));
        h.insert(
            "anthropic-ratelimit-input-tokens-reset",
            hv("2023-11-14T22:13:45Z"),
        );
        h.insert("anthropic-ratelimit-output-tokens-remaining", hv("900"));
        let hints = Hints::from_headers(&h, now, CAP);
        assert_eq!(hints.remaining_requests, Some(5));
        assert_eq!(hints.remaining_tokens, Some(0));
        assert_eq!(hints.reset_tokens, Some(Duration::from_secs(25)));
        assert_eq!(hints.wait(), Some(Duration::from_secs(25)));
    }

    #[test]
    fn wall_clock_is_injectable() {
        let clock = WallClock::from_fn(move || epoch(5));
        assert_eq!(clock.now(), epoch(5));
        assert_eq!(format!("{clock:?}"), "WallClock");
    }

    proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), now in any::<u64>(), cap_ms in any::<u64>()) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now % (1 << 40));
            let cap = Duration::from_millis(cap_ms);
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                for d in [
                    parse_millis(&v, cap),
                    parse_retry_after(&v, now, cap),
                    parse_reset(&v, cap),
                    parse_rfc3339(&v, now, cap),
                ].into_iter().flatten() {
                    prop_assert!(d <= cap.max(Duration::from_secs(u32::MAX as u64)));
                }
                let _ = parse_remaining(&v);
                let mut h = HeaderMap::new();
                for name in ["retry-after", "retry-after-ms", "x-ratelimit-reset-tokens",
                             "x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-reset"] {
                    h.insert(name, v.clone());
                }
                let hints = Hints::from_headers(&h, now, cap);
                if let Some(w) = hints.wait() { prop_assert!(w <= cap); }
            }
        }

        #[test]
        fn textual_numbers_never_exceed_cap(s in "[ +-]?[0-9]{0,25}(\\.[0-9]{0,10})?[ ]?(ms|s|m|h|us|ns)?", cap_s in 0u64..100_000) {
            let cap = Duration::from_secs(cap_s);
            let v = HeaderValue::from_str(&s).unwrap();
            for d in [parse_millis(&v, cap), parse_retry_after(&v, SystemTime::UNIX_EPOCH, cap), parse_reset(&v, cap)].into_iter().flatten() {
                prop_assert!(d <= cap, "{s:?} gave {d:?} > {cap:?}");
            }
        }
    }
}
