//! A soak: many requests through the recommended stack (`stack::group`, every default) over
//! loopback [`MockServer`]s whose faults change all the time, checking that every request ends
//! in exactly one outcome and that nothing leaks.
//!
//! Each mock's fault changes every `step` requests (and 200 ms of tokio's clock) from a seeded
//! sequence: healthy half the time; otherwise 500s, a proxy's HTML 502, hangs, resets before the
//! head, streams cut after the head or ended early without their end marker, an in-band stream
//! error, a `200` with an `{"error": ..}` body, slow answers, and 429s with hostile hints
//! (`retry-after: 0`, `-1`, a date in the past, `retry-after-ms: -5` next to `retry-after: 1`);
//! rarely, the faults that park a backend for minutes (billing-quota 429s, a day, year 9999, a
//! number past `u64`). A third of the requests are
//! streamed; every request carries a 30 s deadline.
//!
//! [`Soak::run`] counts each request's outcome in its own slot (exactly one per request: none
//! lost, none answered twice), reads every answer to its end, then drops the stack and checks
//! that the tokio tasks alive, the mocks' open connections and the backends' in-flight counts
//! are back where they started. Run it on tokio's paused clock (hangs and waits then cost no
//! real time): `tests/soak.rs` runs 20,000 requests, `cargo run --release --example soak`
//! 1,000,000 and prints the figures.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::{Fault, MockServer};
use tower_llm_lb::auth::Credential;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::error::BoxError;
use tower_llm_lb::retry::Deadline;
use tower_llm_lb::stack::{self, Settings};
use tower_llm_lb::{Backend, Rng};

/// What to run.
#[derive(Clone, Debug)]
pub struct Soak {
    /// Requests sent in all.
    pub requests: usize,
    /// The most outstanding at once.
    pub in_flight: usize,
    /// Mock backends (each 40 req/s, Azure-like headers).
    pub backends: usize,
    /// Requests between fault changes (each change also lets 200 ms of tokio's clock pass).
    pub step: usize,
    /// Seed of the fault sequence and of the stack's random picks.
    pub seed: u64,
    /// How many times the figures are sampled along the way (memory, tasks).
    pub samples: usize,
    /// How many of the backends (the last ones) speak Anthropic's API: the OpenAI-shaped
    /// requests sent to them are translated, answers, errors and streams back (default 0).
    pub anthropic: usize,
}

impl Default for Soak {
    fn default() -> Self {
        Soak {
            requests: 20_000,
            in_flight: 64,
            backends: 3,
            step: 25,
            seed: 42,
            samples: 10,
            anthropic: 0,
        }
    }
}

/// The faults, by a random pick: healthy half the time. The faults that take a backend out
/// for minutes (a billing-quota 429, hints of a day, a year 9999 date, a number past `u64`,
/// each parked for the 300 s hint cap) are one pick in 2,000: were they as common as the
/// others, every backend would be parked within seconds and the soak would test nothing else.
fn fault(rng: &mut fastrand::Rng) -> Option<Fault> {
    let throttle = |pairs: &[(&str, &str)]| {
        Some(Fault::Throttle(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    };
    if rng.u32(..2000) == 0 {
        return match rng.u32(..4) {
            0 => Some(Fault::QuotaExhausted),
            1 => throttle(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
            2 => throttle(&[("retry-after", "86400")]),
            _ => throttle(&[("retry-after", "18446744073709551616")]),
        };
    }
    match rng.u32(..36) {
        0..=17 => None,
        18 | 19 => Some(Fault::Status(500)),
        20 => Some(Fault::Page(
            502,
            "<html><body>Bad Gateway</body></html>".into(),
        )),
        21 => Some(Fault::Hang),
        22 | 23 => Some(Fault::Reset),
        24 => Some(Fault::TruncateStream(2)),
        25 => Some(Fault::EndStreamEarly(1)),
        26 => Some(Fault::StreamError),
        27 => Some(Fault::Json(
            200,
            r#"{"error":{"message":"upstream failed","type":"server_error"}}"#.into(),
        )),
        28 => Some(Fault::Slow(Duration::from_millis(300))),
        29 => throttle(&[("retry-after", "0")]),
        30 => throttle(&[("retry-after", "-1")]),
        31 => throttle(&[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")]),
        32 => throttle(&[("retry-after-ms", "-5"), ("retry-after", "1")]),
        33 => throttle(&[("retry-after-ms", "1500")]),
        _ => throttle(&[("retry-after", "1")]),
    }
}

/// What the soak saw.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// Requests sent.
    pub requests: usize,
    /// Answered 2xx and read to the end.
    pub complete: usize,
    /// Answered with an error status (a 429 with its hint, a 5xx), read to the end.
    pub error_answers: usize,
    /// Answered, but the body ended in an error (a stream cut after its head).
    pub body_errors: usize,
    /// A typed error instead of an answer.
    pub errors: usize,
    /// Requests whose outcome was counted other than exactly once (must be 0).
    pub not_exactly_once: usize,
    /// Typed errors and error statuses by kind.
    pub kinds: BTreeMap<String, usize>,
    /// Requests the mocks received in all (attempts).
    pub attempts: u64,
    /// Tokio tasks alive before the stack was built, and after it was dropped.
    pub tasks: (usize, usize),
    /// The mocks' open connections after the stack was dropped (must be 0).
    pub connections_after: u64,
    /// The backends' in-flight counts after every answer was read (must be 0).
    pub in_flight_after: usize,
    /// Resident memory (KiB) at each sample, by requests sent so far (Linux; else empty).
    pub rss_kib: Vec<(usize, u64)>,
    /// Tokio's clock from first request to last outcome.
    pub virtual_time: Duration,
    /// Real time taken.
    pub wall: Duration,
}

impl SoakReport {
    /// The broken promises (empty: none).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ended = self.complete + self.error_answers + self.body_errors + self.errors;
        if ended != self.requests || self.not_exactly_once != 0 {
            out.push(format!(
                "{} requests, {ended} outcomes, {} not counted exactly once",
                self.requests, self.not_exactly_once
            ));
        }
        if self.tasks.1 > self.tasks.0 {
            out.push(format!(
                "tokio tasks: {} before, {} after",
                self.tasks.0, self.tasks.1
            ));
        }
        if self.connections_after != 0 {
            out.push(format!("{} connections still open", self.connections_after));
        }
        if self.in_flight_after != 0 {
            out.push(format!("{} still counted in flight", self.in_flight_after));
        }
        out
    }

    /// Growth of resident memory from the first sample past a tenth of the run to the last
    /// (KiB): a leak proportional to requests shows here.
    pub fn rss_growth_kib(&self) -> Option<i64> {
        let first = self
            .rss_kib
            .iter()
            .find(|(sent, _)| *sent * 10 >= self.requests)?;
        let last = self.rss_kib.last()?;
        Some(last.1 as i64 - first.1 as i64)
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} requests in {:.1} s ({:.0}/s; {:.0} s of tokio's clock), {} attempts at the mocks",
            self.requests,
            self.wall.as_secs_f64(),
            self.requests as f64 / self.wall.as_secs_f64().max(1e-9),
            self.virtual_time.as_secs_f64(),
            self.attempts
        )?;
        writeln!(
            f,
            "outcomes: {} complete, {} error answers, {} cut bodies, {} typed errors; {} not exactly once",
            self.complete, self.error_answers, self.body_errors, self.errors, self.not_exactly_once
        )?;
        for (kind, n) in &self.kinds {
            writeln!(f, "  {n:>8}  {kind}")?;
        }
        writeln!(
            f,
            "after: tasks {} -> {}, open connections {}, in flight {}",
            self.tasks.0, self.tasks.1, self.connections_after, self.in_flight_after
        )?;
        let rss: Vec<String> = self
            .rss_kib
            .iter()
            .map(|(sent, kib)| format!("{sent}: {} MiB", kib / 1024))
            .collect();
        write!(f, "resident memory by requests sent: {}", rss.join(", "))
    }
}

/// Resident memory of this process in KiB (Linux).
fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// How one request ended.
enum Ended {
    Complete,
    ErrorAnswer(u16),
    BodyError,
    Error(String),
}

impl Soak {
    /// Runs the soak (on tokio's paused clock, for hangs and waits to cost no real time).
    pub async fn run(&self) -> Result<SoakReport, BoxError> {
        let wall = std::time::Instant::now();
        let mut mocks = Vec::new();
        let mut backends = Vec::new();
        for i in 0..self.backends {
            let name = format!("soak-{i}");
            let key = format!("key-soak-{i}");
            let anthropic = i + self.anthropic >= self.backends;
            let builder = MockServer::builder()
                .name(&name)
                .rps(40.0)
                .azure_headers()
                .stream_chunks(4)
                .record_requests(false);
            let m = if anthropic {
                builder.x_api_key(&key)
            } else {
                builder.api_key(&key)
            }
            .start()
            .await?;
            backends.push(if anthropic {
                Backend::anthropic(&name, m.url())
                    .credential(Credential::x_api_key(&key)?)
                    .build()?
            } else {
                Backend::azure(&name, m.url(), "gpt-4o", "2024-10-21")
                    .credential(Credential::api_key(&key)?)
                    .build()?
            });
            mocks.push(m);
        }
        let tasks_before = alive_tasks();
        let settings = Settings {
            rng: Some(Rng::seeded(self.seed)),
            ..Settings::default()
        };
        let svc = stack::group(
            "soak",
            backends.clone(),
            tower_llm_lb::client::http_client(),
            &settings,
        )?;
        let slots: Arc<Vec<AtomicU8>> =
            Arc::new((0..self.requests).map(|_| AtomicU8::new(0)).collect());
        let permits = Arc::new(tokio::sync::Semaphore::new(self.in_flight));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ended>();
        let mut chaos = fastrand::Rng::with_seed(self.seed);
        let mut report = SoakReport {
            requests: self.requests,
            ..SoakReport::default()
        };
        let sample_every = (self.requests / self.samples.max(1)).max(1);
        // Outcomes are tallied as they come (held until the end, they would be the memory
        // growth the soak looks for).
        let requests = self.requests;
        let tally = tokio::spawn(async move {
            let mut t = SoakReport::default();
            let mut outcomes = 0;
            while outcomes < requests {
                // Every request ends by its deadline (30 s); a hang past it ends the tally.
                let Ok(Some(ended)) =
                    tokio::time::timeout(Duration::from_secs(31), rx.recv()).await
                else {
                    break;
                };
                outcomes += 1;
                match ended {
                    Ended::Complete => t.complete += 1,
                    Ended::ErrorAnswer(s) => {
                        t.error_answers += 1;
                        *t.kinds.entry(format!("answer {s}")).or_insert(0) += 1;
                    }
                    Ended::BodyError => t.body_errors += 1,
                    Ended::Error(kind) => {
                        t.errors += 1;
                        *t.kinds.entry(kind).or_insert(0) += 1;
                    }
                }
            }
            t
        });
        let start = tokio::time::Instant::now();
        for i in 0..self.requests {
            if i % self.step.max(1) == 0 {
                for m in &mocks {
                    m.set_fault(fault(&mut chaos));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if i % sample_every == 0
                && i > 0
                && let Some(kib) = rss_kib()
            {
                report.rss_kib.push((i, kib));
            }
            let permit = permits.clone().acquire_owned().await?;
            let body = if i % 3 == 0 {
                r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
            } else {
                r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#
            };
            let mut req = http::Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(ReplayBody::from(body))?;
            req.extensions_mut().insert(Deadline(
                tokio::time::Instant::now() + Duration::from_secs(30),
            ));
            let (svc, slots, tx) = (svc.clone(), slots.clone(), tx.clone());
            tokio::spawn(async move {
                let ended = match svc.oneshot(req).await {
                    Ok(res) => {
                        let status = res.status();
                        match res.into_body().collect().await {
                            Ok(_) if status.is_success() => Ended::Complete,
                            Ok(_) => Ended::ErrorAnswer(status.as_u16()),
                            Err(_) => Ended::BodyError,
                        }
                    }
                    Err(e) => Ended::Error(kind_of(&e)),
                };
                slots[i].fetch_add(1, Relaxed);
                let _ = tx.send(ended);
                drop(permit);
            });
        }
        drop(tx);
        let t = tally.await?;
        report.complete = t.complete;
        report.error_answers = t.error_answers;
        report.body_errors = t.body_errors;
        report.errors = t.errors;
        report.kinds = t.kinds;
        report.virtual_time = start.elapsed();
        report.not_exactly_once = slots.iter().filter(|s| s.load(Relaxed) != 1).count();
        if let Some(kib) = rss_kib() {
            report.rss_kib.push((self.requests, kib));
        }
        for m in &mocks {
            m.set_fault(None);
        }
        // Let every abandoned attempt's connection close and every timer fire.
        tokio::time::sleep(Duration::from_secs(120)).await;
        report.in_flight_after = backends
            .iter()
            .map(|b| b.state().snapshot().in_flight)
            .sum();
        report.attempts = mocks.iter().map(|m| m.counters().requests).sum();
        drop(svc);
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if mocks.iter().all(|m| m.counters().connections == 0) && alive_tasks() <= tasks_before
            {
                break;
            }
        }
        report.connections_after = mocks.iter().map(|m| m.counters().connections).sum();
        report.tasks = (tasks_before, alive_tasks());
        report.wall = wall.elapsed();
        Ok(report)
    }
}

/// A stable name for a typed error: its words, numbers (waits, counts) removed.
fn kind_of(e: &BoxError) -> String {
    let text = e.to_string();
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| !w.starts_with(|c: char| c.is_ascii_digit()))
        .take(30)
        .collect();
    words.join(" ")
}
