//! `GET /metrics`: the gateway's figures in Prometheus' text format, with `prometheus-client`.
//!
//! Per route and status: requests answered and the time to each answer's head (for a stream,
//! its first byte). Per backend, read from its shared state at each scrape: attempts by outcome,
//! requests in flight, circuit state, cooldown left and latency average. Label values come only
//! from the config (backend names) and from fixed sets (routes, HTTP status codes, outcomes, circuit
//! states): no user data, so the label sets stay bounded.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use arc_swap::ArcSwap;

use super::Live;
use tower_llm_lb::Circuit;
use tower_llm_lb::Snapshot;
use tower_llm_lb::backend::Backend;

/// The labels of the backend collector's families (read at a scrape, not per request).
type Labels = Vec<(&'static str, String)>;

/// A label value naming a backend or a model: a shared name, cloned without allocating.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Name(Arc<str>);

impl Name {
    pub(crate) fn from_shared(name: Arc<str>) -> Self {
        Name(name)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Self {
        Name(name.into())
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

// The per-request families' label sets: copies of static strings, numbers and shared names,
// so counting a request allocates nothing (each set is hashed once per lookup).

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    client: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientLabels {
    client: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AttemptLabels {
    backend: Name,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    backend: Name,
    model: Name,
    kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientTokenLabels {
    client: &'static str,
    kind: &'static str,
}

/// The metrics of the label sets a gateway has already counted, found by comparing labels
/// rather than hashing them: a family's own lookup hashes the labels with SipHash, about 300
/// instructions for each of a request's four lookups. The label sets a gateway sees are few
/// (routes, statuses, clients, backends and outcomes), so a short list searched in order finds
/// them; past [`SEEN_CAP`] sets, the family's lookup. A handle is the family's own metric (a
/// shared counter or histogram), so what is counted through it is what the family exposes.
struct Seen<K, M>(std::sync::RwLock<Vec<(K, M)>>);

/// How many label sets a [`Seen`] keeps.
const SEEN_CAP: usize = 64;

impl<K: Clone + Eq + std::hash::Hash, M: Clone> Seen<K, M> {
    fn new() -> Self {
        Seen(std::sync::RwLock::new(Vec::new()))
    }

    /// Runs `f` on the metric of `labels` in `family`.
    fn with<C>(&self, family: &Family<K, M, C>, labels: &K, f: impl FnOnce(&M))
    where
        C: prometheus_client::metrics::family::MetricConstructor<M>,
    {
        let mut full = false;
        if let Ok(seen) = self.0.read() {
            if let Some((_, m)) = seen.iter().find(|(k, _)| k == labels) {
                return f(m);
            }
            full = seen.len() >= SEEN_CAP;
        }
        let m = family.get_or_create_owned(labels);
        f(&m);
        // Once the list is full, a label set past it takes no write lock.
        if !full
            && let Ok(mut seen) = self.0.write()
            && seen.len() < SEEN_CAP
            && !seen.iter().any(|(k, _)| k == labels)
        {
            seen.push((labels.clone(), m));
        }
    }
}

/// Reads one gauge of a backend from its state as read at the scrape.
type Read = fn(&Snapshot) -> f64;

/// The gateway's metrics: its own counters and histograms, and a collector over the backends'
/// states.
pub(crate) struct Metrics {
    registry: Registry,
    /// The handles of label sets already counted (see [`Seen`]).
    seen_requests: Seen<RequestLabels, Counter>,
    seen_duration: Seen<RouteLabels, Histogram>,
    seen_attempts: Seen<AttemptLabels, Histogram>,
    seen_waits: Seen<ClientLabels, Histogram>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    tokens: Family<TokenLabels, Counter>,
    client_tokens: Family<ClientTokenLabels, Counter>,
    attempt_seconds: Family<AttemptLabels, Histogram>,
    retries: Counter,
    waits: Family<ClientLabels, Histogram>,
    /// Tokens per backend, `(prompt, completion)`, for `/stats` (reading the families would
    /// create a zero series for every label set asked about).
    backend_tokens: std::sync::Mutex<std::collections::HashMap<Name, (u64, u64)>>,
    /// The `model` label of a request whose model no backend declares.
    other: Name,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The routes a request can be counted under: the common ones by name, any other forwarded
/// route (`/v1/files/{id}`, say) as `other`, so the label set stays fixed.
pub(crate) fn route_label(path: &str) -> Option<&'static str> {
    const ROUTES: [&str; 15] = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/responses",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/files",
        "/v1/batches",
        "/v1/messages/count_tokens",
        "/v1/messages/batches",
    ];
    ROUTES
        .into_iter()
        .find(|r| *r == path)
        .or_else(|| path.starts_with("/v1/").then_some("other"))
}

impl Metrics {
    pub(crate) fn new(live: Arc<ArcSwap<Live>>) -> Self {
        let mut registry = Registry::with_prefix("llm_lb");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered by the gateway, by route, status and client (`key-N`: the N-th configured client key; `loopback`; `refused`)",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 5 ms to about 82 s.
            Histogram::new(exponential_buckets(0.005, 2.0, 15))
        });
        registry.register(
            "request_duration_seconds",
            "Time to the answer's head (a stream's first byte), by route and status",
            duration.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens the answers report using (their `usage`), by backend, model and kind (prompt, completion)",
            tokens.clone(),
        );
        let client_tokens = Family::<ClientTokenLabels, Counter>::default();
        registry.register(
            "client_tokens",
            "Tokens the answers report using, by client (`key-N`, `loopback`) and kind",
            client_tokens.clone(),
        );
        let attempt_seconds = Family::<AttemptLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 15))
        });
        registry.register(
            "attempt_duration_seconds",
            "Each attempt's time to its answer's head (or to its failure), by backend and outcome",
            attempt_seconds.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Attempts past each request's first (retries, failovers, hedges)",
            retries.clone(),
        );
        let waits = Family::<ClientLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "wait_duration_seconds",
            "Time each request spent waiting between attempts (in line for a paced slot, a cooldown, a backoff), by client (`key-N`, `loopback`)",
            waits.clone(),
        );
        registry.register_collector(Box::new(BackendCollector(live)));
        Metrics {
            registry,
            seen_requests: Seen::new(),
            seen_duration: Seen::new(),
            seen_attempts: Seen::new(),
            seen_waits: Seen::new(),
            requests,
            duration,
            tokens,
            client_tokens,
            attempt_seconds,
            retries,
            waits,
            backend_tokens: Default::default(),
            other: Name::from("other"),
        }
    }

    /// The `model` label of a request asking for `model`: it when a backend declares it, else
    /// `other` (label values stay a bounded set).
    pub(crate) fn model_label(&self, live: &Live, model: Option<&str>) -> Name {
        model
            .and_then(|m| live.declared_name(m))
            .unwrap_or_else(|| self.other.clone())
    }

    /// Tokens one backend's answers reported, `(prompt, completion)`, summed over models.
    pub(crate) fn tokens_of(&self, backend: &str) -> (u64, u64) {
        self.backend_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(backend)
            .copied()
            .unwrap_or_default()
    }

    /// Counts what a request's attempts say: each attempt's time to its answer's head (or its
    /// failure) by backend and outcome, the retries (attempts past the first), and the time the
    /// request spent waiting between attempts (all of `total` not spent in one).
    pub(crate) fn attempts(
        &self,
        attempts: &[tower_llm_lb::error::Attempt],
        total: Duration,
        client: &'static str,
    ) {
        let mut busy = Duration::ZERO;
        for a in attempts {
            busy += a.elapsed;
            let labels = AttemptLabels {
                backend: Name(a.backend.clone()),
                outcome: a.outcome.name(),
            };
            self.seen_attempts
                .with(&self.attempt_seconds, &labels, |h| {
                    h.observe(a.elapsed.as_secs_f64())
                });
        }
        self.retries.inc_by(attempts.len().saturating_sub(1) as u64);
        self.seen_waits
            .with(&self.waits, &ClientLabels { client }, |h| {
                h.observe(total.saturating_sub(busy).as_secs_f64())
            });
    }

    /// Counts one answer.
    pub(crate) fn observe(
        &self,
        route: &'static str,
        status: u16,
        client: &'static str,
        started: Instant,
    ) {
        let labels = RouteLabels { route, status };
        self.seen_duration.with(&self.duration, &labels, |h| {
            h.observe(started.elapsed().as_secs_f64())
        });
        let labels = RequestLabels {
            route,
            status,
            client,
        };
        self.seen_requests.with(&self.requests, &labels, |c| {
            c.inc();
        });
    }

    /// The text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# the metrics could not be encoded");
        }
        out
    }
}

/// Reads every backend's state at each scrape (the backends served now, after any reload).
struct BackendCollector(Arc<ArcSwap<Live>>);

impl std::fmt::Debug for BackendCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendCollector")
    }
}

impl Collector for BackendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let live = self.0.load();
        let backend = |b: &Backend| -> Labels { vec![("backend", b.name().to_string())] };
        // Each backend's state read once for every family of this scrape.
        let states: Vec<Snapshot> = live
            .backends()
            .iter()
            .map(|b| b.state().snapshot())
            .collect();
        {
            let mut e = encoder.encode_descriptor(
                "backend_attempts",
                "Attempts sent to (or refused for) each backend, by outcome",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (b, s) in live.backends().iter().zip(&states) {
                let c = s.counters;
                for (outcome, n) in [
                    ("success", c.success),
                    ("throttled", c.throttled),
                    ("server_error", c.server_errors),
                    ("failure", c.failures),
                    ("client_error", c.client_errors),
                    ("refused", c.unavailable),
                ] {
                    let mut labels = backend(b);
                    labels.push(("outcome", outcome.to_string()));
                    ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
                }
            }
        }
        let gauges: [(&str, &str, Read); 4] = [
            (
                "backend_in_flight",
                "Requests in flight at each backend",
                |s| s.in_flight as f64,
            ),
            (
                "backend_circuit_open",
                "1 while a backend's circuit is open or half-open, else 0",
                |s| match s.circuit {
                    Circuit::Closed => 0.0,
                    _ => 1.0,
                },
            ),
            (
                "backend_cooldown_seconds",
                "Time left of a backend's cooldown (a 429's wait, a rejected key's)",
                |s| {
                    s.cooldown_until
                        .map_or(0.0, |u| u.saturating_duration_since(s.at).as_secs_f64())
                },
            ),
            (
                "backend_latency_seconds",
                "A backend's latency average (0 before its first answer)",
                |s| s.latency.map_or(0.0, |d| d.as_secs_f64()),
            ),
        ];
        for (name, help, read) in gauges {
            let mut e = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (b, s) in live.backends().iter().zip(&states) {
                ConstGauge::new(read(s)).encode(e.encode_family(&backend(b))?)?;
            }
        }
        Ok(())
    }
}

/// Watches an answer's body on its way to the caller for the `usage` it reports: keeps its
/// first 2 KiB and last 4-8 KiB (never the whole body) and counts the tokens when the body
/// ends. An answer cut short counts nothing.
pub(crate) struct UsageWatch {
    metrics: Arc<Metrics>,
    backend: Name,
    model: Name,
    client: &'static str,
    /// The answer's first chunk while it is the only one (most non-streamed answers come in
    /// one): kept by reference count, not copied.
    only: Option<bytes::Bytes>,
    head: Vec<u8>,
    tail: Vec<u8>,
}

const HEAD: usize = 2048;
const TAIL: usize = 4096;

impl UsageWatch {
    /// A watch for a successful answer served by a backend; `None` otherwise.
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        res: &http::Response<tower_llm_lb::stack::LlmBody>,
        model: Name,
        client: &'static str,
    ) -> Option<Self> {
        let served = res.extensions().get::<tower_llm_lb::endpoint::Served>()?;
        res.status().is_success().then(|| UsageWatch {
            metrics,
            backend: Name(served.backend.name_arc().clone()),
            model,
            client,
            only: None,
            head: Vec::new(),
            tail: Vec::new(),
        })
    }

    pub(crate) fn feed(&mut self, data: &bytes::Bytes) {
        if self.only.is_none() && self.head.is_empty() {
            self.only = Some(data.clone());
            return;
        }
        if let Some(first) = self.only.take() {
            self.copy(&first);
        }
        self.copy(data);
    }

    fn copy(&mut self, data: &[u8]) {
        if self.head.len() < HEAD {
            let n = (HEAD - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
        }
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(data);
            if self.tail.len() > 2 * TAIL {
                self.tail.drain(..self.tail.len() - TAIL);
            }
        }
    }

    /// Counts the tokens the answer says it used; `(prompt, completion)` when it says.
    pub(crate) fn finish(self) -> Option<(u64, u64)> {
        let usage = match &self.only {
            Some(only) => tower_llm_lb::provider::usage_of(
                &only[..only.len().min(HEAD)],
                &only[only.len().saturating_sub(TAIL)..],
            ),
            None => tower_llm_lb::provider::usage_of(&self.head, &self.tail),
        };
        let (prompt, completion) = usage?;
        {
            let mut totals = self
                .metrics
                .backend_tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // The backend's entry is made once; after that, no allocation.
            let t = match totals.get_mut(&self.backend) {
                Some(t) => t,
                None => totals.entry(self.backend.clone()).or_default(),
            };
            t.0 += prompt;
            t.1 += completion;
        }
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let labels = TokenLabels {
                backend: self.backend.clone(),
                model: self.model.clone(),
                kind,
            };
            self.metrics.tokens.get_or_create(&labels).inc_by(n);
            let labels = ClientTokenLabels {
                client: self.client,
                kind,
            };
            self.metrics.client_tokens.get_or_create(&labels).inc_by(n);
        }
        Some((prompt, completion))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_past_the_seen_list_are_counted_in_the_family_too() {
        let family = Family::<ClientLabels, Counter>::default();
        let seen = Seen::new();
        let clients: Vec<&'static str> = (0..SEEN_CAP + 10)
            .map(|i| &*Box::leak(format!("key-{i}").into_boxed_str()))
            .collect();
        for _ in 0..3 {
            for client in &clients {
                seen.with(&family, &ClientLabels { client }, |c| {
                    c.inc();
                });
            }
        }
        for client in &clients {
            assert_eq!(
                family.get_or_create(&ClientLabels { client }).get(),
                3,
                "{client}"
            );
        }
        assert_eq!(seen.0.read().unwrap().len(), SEEN_CAP);
    }
}
