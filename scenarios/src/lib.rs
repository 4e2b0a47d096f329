//! The real-load scenario suite, the project's referee: the gateway as a new user runs it, over
//! real sockets, against mock backends that throttle like Azure OpenAI. Not published: it is the
//! workspace's own measuring tool.
//!
//! Each [`Scenario`] starts its mock backends on loopback, writes the config a new user writes
//! (backends, keys, priorities; anything else only where the scenario says so), builds it with
//! [`Config::build_with_backends`] and serves it with the [`Gateway`] on a loopback port. An
//! open-loop load generator then offers its requests at a fixed rate, at most `in_flight` at a
//! time, through a plain hyper client that does not retry (every 429 or 5xx the gateway lets
//! through counts against it), and the [`Report`] says what the client saw and what the backends
//! saw.
//!
//! The mock backends behave like Azure standard deployments: a token bucket of one second's
//! quota, `429` with `retry-after` in whole seconds rounded up and the real wait in
//! `retry-after-ms`, per-minute `x-ratelimit-limit-*` / `-remaining-*` and no reset header,
//! latency 50 ms + 2 ms per output token.
//!
//! `examples/scenarios.rs` (in this crate; `cargo run --release --example scenarios` from the
//! workspace root) runs the full suite and prints the table; `tests/scenarios.rs` runs reduced
//! versions on tokio's paused clock.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use tower_llm_lb::Counters;
use tower_llm_lb::error::BoxError;
use tower_llm_lb_config::Config;
use tower_llm_lb_gateway::Gateway;
use tower_llm_lb_mock::{Fault, MockServer};

/// How one backend of a scenario behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    /// Healthy, throttled at this many requests per second (Azure-style headers).
    Quota(f64),
    /// Healthy, throttled at this many tokens per second (prompt bytes / 4 + `max_tokens`),
    /// no request limit.
    Tokens(f64),
    /// Healthy, no quota.
    Unlimited,
    /// Nothing listens on its port: every connect is refused.
    Refused,
    /// Answers every request with this status.
    Always(u16),
    /// Accepts requests and never answers.
    Hang,
    /// Healthy, but expects another key than the config gives it: answers every request `401`
    /// (a rotated key the config still has).
    WrongKey,
    /// Answers every request with `status` for the first `outage` of the run (a rolling
    /// restart, a regional blip), then healthy, throttled at `rps` requests per second.
    Recovers {
        /// The status of the outage.
        status: u16,
        /// How long the outage lasts from the start of the load.
        outage: Duration,
        /// Its request quota once healthy.
        rps: f64,
    },
}

/// One backend of a scenario.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// Its name in the config.
    pub name: &'static str,
    /// How it behaves.
    pub behaviour: Behaviour,
    /// Its priority tier (`None`: not set in the config).
    pub priority: Option<u32>,
}

impl BackendSpec {
    /// A backend with no priority set.
    pub fn new(name: &'static str, behaviour: Behaviour) -> Self {
        BackendSpec {
            name,
            behaviour,
            priority: None,
        }
    }

    /// Sets its priority tier in the config.
    pub fn priority(mut self, p: u32) -> Self {
        self.priority = Some(p);
        self
    }

    fn is_bad(&self) -> bool {
        matches!(
            self.behaviour,
            Behaviour::Refused | Behaviour::Always(_) | Behaviour::Hang | Behaviour::WrongKey
        )
    }
}

/// One scenario: backends, the config around them, and the load offered.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Short name (`S1`).
    pub name: &'static str,
    /// What it shows.
    pub title: &'static str,
    /// The backends.
    pub backends: Vec<BackendSpec>,
    /// Top-level config fields added to the backends (empty: defaults only).
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Requests offered.
    pub requests: usize,
    /// Offered rate, requests per second.
    pub rate: f64,
    /// The most requests the client has outstanding at once.
    pub in_flight: usize,
    /// The client gives up on a request after this long.
    pub client_timeout: Duration,
    /// `max_tokens` of each request (the mock's latency grows 2 ms per token).
    pub max_tokens: u32,
    /// The mock's base latency.
    pub latency: Duration,
    /// Whether the backends send quota headers (Azure PTU deployments send none).
    pub quota_headers: bool,
    /// Gateway replicas, each with its own state and client over the same backends; the
    /// load goes round robin over them, as a Kubernetes Service spreads it (default 1).
    pub replicas: usize,
    /// The Redis URL the replicas share their state through (`shared_state`; none: each
    /// on its own). The runner starts the Redis server.
    pub shared_redis: Option<String>,
    /// Which replica takes each request, cycled (`[0, 0, 0, 1, 2]`: 60/20/20); empty: round
    /// robin.
    pub spread: Vec<usize>,
    /// The backends count a request's tokens from its prompt text, as Azure documents (its
    /// characters / 4 times this, plus `max_tokens`); none: from its JSON bytes / 4.
    pub prompt_text: Option<f64>,
    /// Clients, each with its own gateway client key and load (empty: one client, the load
    /// above). The gateway is given their keys, so each is its own tenant.
    pub clients: Vec<ClientLoad>,
}

/// One client of a scenario with several: its gateway key and its open-loop load.
#[derive(Clone, Debug)]
pub struct ClientLoad {
    /// Its gateway client key (also its name in the report).
    pub key: &'static str,
    /// Requests it sends.
    pub requests: usize,
    /// Its rate, requests per second.
    pub rate: f64,
    /// The most it has outstanding at once.
    pub in_flight: usize,
    /// Whether it sends `x-llm-lb-priority: batch`.
    pub batch: bool,
}

impl ClientLoad {
    /// An interactive client.
    pub fn new(key: &'static str, requests: usize, rate: f64, in_flight: usize) -> Self {
        ClientLoad {
            key,
            requests,
            rate,
            in_flight,
            batch: false,
        }
    }
}

/// What one client of a several-client scenario got.
#[derive(Clone, Debug)]
pub struct ClientLine {
    /// Its key.
    pub key: &'static str,
    /// Requests sent.
    pub sent: usize,
    /// 200 answers.
    pub served: usize,
    /// Median and 99th percentile latency of its served requests.
    pub p50: Duration,
    /// See `p50`.
    pub p99: Duration,
}

impl Scenario {
    fn base(name: &'static str, title: &'static str, backends: Vec<BackendSpec>) -> Self {
        Scenario {
            name,
            title,
            backends,
            extra: serde_json::Map::new(),
            requests: 300,
            rate: 30.0,
            in_flight: 32,
            client_timeout: Duration::from_secs(20),
            max_tokens: 20,
            latency: Duration::from_millis(50),
            quota_headers: true,
            replicas: 1,
            shared_redis: None,
            spread: Vec::new(),
            prompt_text: None,
            clients: Vec::new(),
        }
    }

    /// S10: one client sending ten times its share beside three quiet ones, all together over
    /// the quota (three backends of 20 req/s; 100 req/s from one key, 10 req/s from each of
    /// three others, for 10 s). Each key is a tenant: the quiet ones get their requests served
    /// in turn with the loud one's, not behind its queue.
    pub fn s10_loud_client() -> Self {
        let b = |n| BackendSpec::new(n, Behaviour::Quota(20.0));
        let mut clients = vec![ClientLoad::new("loud", 1000, 100.0, 1000)];
        clients.extend(QUIET.iter().map(|k| ClientLoad::new(k, 100, 10.0, 16)));
        Scenario {
            requests: 1300,
            rate: 130.0,
            clients,
            ..Self::base(
                "S10",
                "one client 10x beside three quiet ones",
                vec![b("east"), b("west"), b("north")],
            )
        }
    }

    /// S10a: S10's three quiet clients alone (what S10's quiet clients are compared with).
    pub fn s10a_quiet_alone() -> Self {
        let mut s = Self::s10_loud_client();
        s.name = "S10a";
        s.title = "the three quiet clients alone";
        s.clients.remove(0);
        s.requests = 300;
        s.rate = 30.0;
        s
    }

    /// S10b: S10 with the loud client's requests marked `batch`: the quiet (interactive)
    /// ones are served first.
    pub fn s10b_batch_flood() -> Self {
        let mut s = Self::s10_loud_client();
        s.name = "S10b";
        s.title = "a batch flood beside three interactive clients";
        s.clients[0].batch = true;
        s
    }

    /// S1: three backends of 20 req/s each; 600 requests at 120 req/s (2x capacity), 32 in
    /// flight. Ideal wall time 10 s.
    pub fn s1_quota() -> Self {
        let b = |n| BackendSpec::new(n, Behaviour::Quota(20.0));
        Scenario {
            requests: 600,
            rate: 120.0,
            ..Self::base(
                "S1",
                "quota 2x overload",
                vec![b("east"), b("west"), b("north")],
            )
        }
    }

    /// S11: sustained overload: 1.5x the three backends' quota (90 req/s for 60 req/s) for two
    /// minutes, 1,000 in flight at the client. The excess must be refused; what is served should
    /// not wait the whole budget.
    pub fn s11_sustained() -> Self {
        let b = |n| BackendSpec::new(n, Behaviour::Quota(20.0));
        Scenario {
            requests: 10_800,
            rate: 90.0,
            in_flight: 1_000,
            client_timeout: Duration::from_secs(30),
            ..Self::base(
                "S11",
                "sustained 1.5x for 2 minutes",
                vec![b("east"), b("west"), b("north")],
            )
        }
    }

    /// S1p: S1 with backends that send no quota headers: the pace is learned from 429s.
    pub fn s1p_quota_no_headers() -> Self {
        Scenario {
            name: "S1p",
            title: "quota 2x, no quota headers",
            quota_headers: false,
            ..Self::s1_quota()
        }
    }

    /// S6: S1 with token quotas instead of request quotas: each backend allows 20 requests'
    /// worth of tokens per second (Azure standard deployments are mostly token-bound).
    pub fn s6_token_quota() -> Self {
        let mut s = Self::s1_quota();
        s.name = "S6";
        s.title = "token quota 2x overload";
        let per_second = 20.0 * f64::from(s.request_tokens());
        for b in &mut s.backends {
            b.behaviour = Behaviour::Tokens(per_second);
        }
        s
    }

    /// S6t: S6 against backends that count tokens as Azure documents (the prompt's text
    /// characters / 4 plus `max_tokens`), not by the JSON around it: each allows 20 such
    /// requests per second.
    pub fn s6t_token_quota_text() -> Self {
        let mut s = Self::s6_token_quota();
        s.name = "S6t";
        s.title = "token quota 2x, counted from the prompt text";
        s.prompt_text = Some(1.0);
        let per_second = 20.0 * f64::from(s.request_tokens());
        for b in &mut s.backends {
            b.behaviour = Behaviour::Tokens(per_second);
        }
        s
    }

    /// S6h / S6l: S6t against a service that counts the prompt 30% heavier (`scale` 1.3) or
    /// lighter (0.7) than its documentation says: each allows 20 such requests per second, so
    /// the gateway must follow the service's counting, not its own estimate.
    pub fn s6_token_quota_counted(scale: f64) -> Self {
        let mut s = Self::s6t_token_quota_text();
        (s.name, s.title) = if scale > 1.0 {
            (
                "S6h",
                "token quota 2x, the service counts the prompt 30% heavier",
            )
        } else {
            (
                "S6l",
                "token quota 2x, the service counts the prompt 30% lighter",
            )
        };
        s.prompt_text = Some(scale);
        let per_second = 20.0 * f64::from(s.request_tokens());
        for b in &mut s.backends {
            b.behaviour = Behaviour::Tokens(per_second);
        }
        s
    }

    /// S6s: S6t with answers that take 2 s, as real completions do: an answer's quota headers
    /// tell what was left 2 s ago, before the requests sent since, and the gateway's estimate
    /// of a request's cost (its JSON bytes / 4) is ~1.6x what the service counts (the
    /// prompt's text / 4), so the gateway must learn the service's count. 400 in flight so
    /// the client is not the limit; the ideal wall time does not count the last answers' 2 s.
    pub fn s6s_token_quota_slow() -> Self {
        let mut s = Self::s6t_token_quota_text();
        s.name = "S6s";
        s.title = "token quota 2x, counted from the prompt text, 2 s answers";
        s.latency = Duration::from_millis(2000);
        s.in_flight = 400;
        s.client_timeout = Duration::from_secs(40);
        s
    }

    /// S6sh / S6sl: S6s against a service that counts the prompt 30% heavier (`scale` 1.3) or
    /// lighter (0.7) than documented.
    pub fn s6s_token_quota_slow_counted(scale: f64) -> Self {
        let base = Self::s6_token_quota_counted(scale);
        let mut s = Self::s6s_token_quota_slow();
        (s.name, s.title) = if scale > 1.0 {
            ("S6sh", "S6s, the service counts the prompt 30% heavier")
        } else {
            ("S6sl", "S6s, the service counts the prompt 30% lighter")
        };
        s.prompt_text = base.prompt_text;
        s.backends = base.backends;
        s
    }

    /// S2: a PTU deployment (priority 1) before two pay-as-you-go ones (priority 2), 20 req/s
    /// each; 400 requests at 40 req/s.
    pub fn s2_ptu_first() -> Self {
        Scenario {
            requests: 400,
            rate: 40.0,
            ..Self::base(
                "S2",
                "PTU first",
                vec![
                    BackendSpec::new("ptu", Behaviour::Quota(20.0)).priority(1),
                    BackendSpec::new("paygo-a", Behaviour::Quota(20.0)).priority(2),
                    BackendSpec::new("paygo-b", Behaviour::Quota(20.0)).priority(2),
                ],
            )
        }
    }

    /// S2p: S2 with backends that send no quota headers at all (Azure PTU deployments answer
    /// only `retry-after` / `retry-after-ms` on their 429s): the pace must be learned from 429s.
    pub fn s2p_ptu_no_headers() -> Self {
        Scenario {
            name: "S2p",
            title: "PTU first, no quota headers",
            quota_headers: false,
            ..Self::s2_ptu_first()
        }
    }

    /// S3: [connection refused, always 500, healthy]; 300 requests at 30 req/s.
    pub fn s3_failover() -> Self {
        Scenario {
            requests: 300,
            rate: 30.0,
            ..Self::base(
                "S3",
                "failover",
                vec![
                    BackendSpec::new("refused", Behaviour::Refused),
                    BackendSpec::new("err500", Behaviour::Always(500)),
                    BackendSpec::new("healthy", Behaviour::Unlimited),
                ],
            )
        }
    }

    /// S9: three deployments of 20 req/s, offered 50 req/s for 15 s; one answers 503 for the
    /// first 5 s (a rolling restart) and is healthy after: it should serve again about when it
    /// recovers, not a doubled open time later.
    pub fn s9_recovery() -> Self {
        Scenario {
            requests: 750,
            rate: 50.0,
            ..Self::base(
                "S9",
                "recovery after a 5 s outage",
                vec![
                    BackendSpec::new(
                        "east",
                        Behaviour::Recovers {
                            status: 503,
                            outage: Duration::from_secs(5),
                            rps: 20.0,
                        },
                    ),
                    BackendSpec::new("west", Behaviour::Quota(20.0)),
                    BackendSpec::new("north", Behaviour::Quota(20.0)),
                ],
            )
        }
    }

    /// S4: [never answers, healthy], per-attempt first-byte timeout 5 s configured; 40
    /// requests at 4 req/s.
    pub fn s4_hang() -> Self {
        let mut s = Self::s4d_hang_defaults();
        s.name = "S4";
        s.title = "hang, 5 s timeout";
        s.requests = 40;
        s.extra.insert(
            "timeouts".into(),
            serde_json::json!({ "first_byte_ms": 5000 }),
        );
        s
    }

    /// S4d: [never answers, healthy], every setting default; 20 requests at 4 req/s.
    pub fn s4d_hang_defaults() -> Self {
        Scenario {
            requests: 20,
            rate: 4.0,
            ..Self::base(
                "S4d",
                "hang, all defaults",
                vec![
                    BackendSpec::new("hung", Behaviour::Hang),
                    BackendSpec::new("healthy", Behaviour::Unlimited),
                ],
            )
        }
    }

    /// S7: [a rotated key the config still has, healthy, healthy], every setting default;
    /// 300 requests at 30 req/s.
    pub fn s7_stale_key() -> Self {
        Scenario {
            requests: 300,
            rate: 30.0,
            ..Self::base(
                "S7",
                "stale key, all defaults",
                vec![
                    BackendSpec::new("stale", Behaviour::WrongKey),
                    BackendSpec::new("east", Behaviour::Unlimited),
                    BackendSpec::new("west", Behaviour::Unlimited),
                ],
            )
        }
    }

    /// S8: S1's backends and load through three gateway replicas, each learning alone (the
    /// load round robin over them).
    pub fn s8_replicas() -> Self {
        let mut s = Self::s1_quota();
        s.name = "S8";
        s.title = "S1 through 3 replicas, each on its own";
        s.replicas = 3;
        s
    }

    /// S8r: S8 with the replicas sharing waits and open circuits through Redis at `url`.
    pub fn s8r_replicas_shared(url: &str) -> Self {
        let mut s = Self::s8_replicas();
        s.name = "S8r";
        s.title = "S1 through 3 replicas sharing state in Redis";
        s.shared_redis = Some(url.to_string());
        s
    }

    /// S8u: S8r with the load spread unevenly, 60% to one replica and 20% to each other (sticky
    /// clients): each replica's share of the quotas must follow its demand.
    pub fn s8u_replicas_uneven(url: &str) -> Self {
        let mut s = Self::s8r_replicas_shared(url);
        s.name = "S8u";
        s.title = "S8r with the load 60/20/20 over the replicas";
        s.spread = vec![0, 0, 0, 1, 2];
        s
    }

    /// S8p: S8r with backends that send no quota headers (S1p through three replicas): the pace
    /// is learned from 429s and the answers that got through between them, every replica's.
    pub fn s8p_replicas_no_headers(url: &str) -> Self {
        let mut s = Self::s8r_replicas_shared(url);
        s.name = "S8p";
        s.title = "S1p through 3 replicas sharing state in Redis";
        s.quota_headers = false;
        s
    }

    /// S8k: S8r with the Redis server down for the middle third of the run (the runner stops
    /// and restarts it).
    pub fn s8k_replicas_redis_down(url: &str) -> Self {
        let mut s = Self::s8r_replicas_shared(url);
        s.name = "S8k";
        s.title = "S8r with Redis down from 3.3 s to 6.7 s";
        s
    }

    /// Every scenario of the suite but S5 (overhead, see [`overhead`]), S8r and S8k (they need
    /// a Redis server).
    pub fn suite() -> Vec<Scenario> {
        vec![
            Self::s1_quota(),
            Self::s1p_quota_no_headers(),
            Self::s2_ptu_first(),
            Self::s2p_ptu_no_headers(),
            Self::s3_failover(),
            Self::s4_hang(),
            Self::s4d_hang_defaults(),
            Self::s6_token_quota(),
            Self::s6t_token_quota_text(),
            Self::s6_token_quota_counted(1.3),
            Self::s6_token_quota_counted(0.7),
            Self::s6s_token_quota_slow(),
            Self::s6s_token_quota_slow_counted(1.3),
            Self::s6s_token_quota_slow_counted(0.7),
            Self::s7_stale_key(),
            Self::s9_recovery(),
            Self::s10a_quiet_alone(),
            Self::s10_loud_client(),
            Self::s10b_batch_flood(),
            Self::s11_sustained(),
            Self::s8_replicas(),
        ]
    }

    /// The ideal wall time: the offered duration, or the healthy capacity's time to serve all.
    pub fn ideal(&self) -> Duration {
        let offered = self.requests as f64 / self.rate;
        let capacity: f64 = self
            .backends
            .iter()
            .map(|b| match b.behaviour {
                Behaviour::Quota(r) | Behaviour::Recovers { rps: r, .. } => r,
                Behaviour::Tokens(t) => t / f64::from(self.request_tokens()),
                Behaviour::Unlimited => f64::INFINITY,
                _ => 0.0,
            })
            .sum();
        Duration::from_secs_f64(offered.max(self.requests as f64 / capacity))
    }

    /// What one request of the load costs of a token quota, as the mock counts it.
    pub fn request_tokens(&self) -> u32 {
        let prompt = match self.prompt_text {
            // The one message's text (see `request_body`).
            Some(scale) => (REQUEST_TEXT.chars().count() as f64 / 4.0 * scale).ceil() as u32,
            None => (request_body(self.max_tokens).len() as u32).div_ceil(4),
        };
        prompt + self.max_tokens
    }

    /// The config a new user writes for these backends, plus [`Scenario::extra`].
    pub fn config(&self, urls: &[String]) -> serde_json::Value {
        let mut backends = serde_json::Map::new();
        for (spec, url) in self.backends.iter().zip(urls) {
            let mut b = serde_json::json!({
                "provider": "azure", "url": url, "deployment": "gpt-4o",
                "api_key": format!("key-{}", spec.name),
            });
            if let Some(p) = spec.priority {
                b["priority"] = p.into();
            }
            backends.insert(spec.name.into(), b);
        }
        let mut config = serde_json::Map::new();
        config.insert("backends".into(), backends.into());
        config.extend(self.extra.clone());
        config.into()
    }

    /// Runs the scenario: backends, gateway, load; then the report.
    pub async fn run(&self) -> Result<Report, BoxError> {
        let mut mocks: Vec<Option<MockServer>> = Vec::new();
        let mut refusing = Vec::new();
        let mut urls = Vec::new();
        for spec in &self.backends {
            if spec.behaviour == Behaviour::Refused {
                // A port that refuses connections, reserved for the run.
                let port = tower_llm_lb_mock::RefusingPort::new()?;
                urls.push(port.url());
                refusing.push(port);
                mocks.push(None);
                continue;
            }
            let key = match spec.behaviour {
                Behaviour::WrongKey => format!("rotated-key-{}", spec.name),
                _ => format!("key-{}", spec.name),
            };
            let mut b = MockServer::builder()
                .name(spec.name)
                .api_key(key)
                .latency(self.latency)
                .latency_per_token(Duration::from_millis(2))
                .record_requests(true);
            b = if self.quota_headers {
                b.azure_headers()
            } else {
                b.quota_headers(false)
            };
            match spec.behaviour {
                Behaviour::Quota(r) | Behaviour::Recovers { rps: r, .. } => b = b.rps(r),
                Behaviour::Tokens(t) => b = b.tps(t),
                _ => {}
            }
            if let Some(scale) = self.prompt_text {
                b = b.count_prompt_text(scale);
            }
            let m = b.start().await?;
            match spec.behaviour {
                Behaviour::Always(s) | Behaviour::Recovers { status: s, .. } => {
                    m.set_fault(Some(Fault::Status(s)))
                }
                Behaviour::Hang => m.set_fault(Some(Fault::Hang)),
                _ => {}
            }
            urls.push(m.url());
            mocks.push(Some(m));
        }
        let mut json = self.config(&urls);
        if let Some(url) = &self.shared_redis {
            json["shared_state"] = serde_json::json!({
                "redis_url": url,
                "key_prefix": format!("scenario-{}-{}", self.name, std::process::id()),
            });
        }
        let config = Config::from_json(&json.to_string())?;
        let mut addrs = Vec::new();
        let mut stops = Vec::new();
        let mut servers = Vec::new();
        let mut all_backends = Vec::new();
        let mut links = Vec::new();
        for _ in 0..self.replicas.max(1) {
            // Each replica: its own client and its own state.
            let (service, backends) =
                config.build_with_backends(tower_llm_lb::client::http_client())?;
            let keys = self.clients.iter().map(|c| c.key.to_string()).collect();
            let mut gateway = Gateway::new(service, backends.clone(), keys);
            if let Some(link) = config.shared_state(backends.clone())? {
                links.push(link.clone());
                gateway = gateway.shared_state(link);
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop_tx);
            servers.push(tokio::spawn(gateway.serve(listener, async move {
                let _ = stop_rx.await;
            })));
            all_backends.push(backends);
        }
        // The first replica's view, for the gateway-side counts.
        let backends = all_backends.swap_remove(0);
        let state_of = |name: &str| {
            backends
                .iter()
                .find(|b| b.name() == name)
                .map(|b| b.state().clone())
        };
        // What the bad backends had been sent after the first second (the gateway's own count:
        // a refused port has nobody to count it).
        let bad: Vec<(&'static str, tower_llm_lb::BackendState)> = self
            .backends
            .iter()
            .filter(|b| b.is_bad())
            .filter_map(|b| state_of(b.name).map(|s| (b.name, s)))
            .collect();
        let start = Instant::now();
        let watcher = {
            let bad = bad.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bad.iter()
                    .map(|(_, s)| s.snapshot().counters.requests)
                    .collect::<Vec<_>>()
            })
        };
        let targets: Vec<SocketAddr> = if self.spread.is_empty() {
            addrs.clone()
        } else {
            self.spread
                .iter()
                .filter_map(|i| addrs.get(*i).copied())
                .collect()
        };
        // Backends whose outage ends during the load: healthy again at `start + outage`.
        let outages: Vec<(usize, Duration)> = self
            .backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b.behaviour {
                Behaviour::Recovers { outage, .. } => Some((i, outage)),
                _ => None,
            })
            .collect();
        let recoveries = async {
            for (i, outage) in &outages {
                tokio::time::sleep_until(start + *outage).await;
                if let Some(m) = &mocks[*i] {
                    m.set_fault(None);
                }
            }
        };
        let loads = async {
            if self.clients.is_empty() {
                let samples = load_over(
                    &targets,
                    self.requests,
                    self.rate,
                    self.in_flight,
                    self.client_timeout,
                    self.max_tokens,
                )
                .await;
                return vec![samples];
            }
            let each = self.clients.iter().map(|c| {
                let who = Caller {
                    key: c.key,
                    batch: c.batch,
                };
                load_as(
                    &targets,
                    who,
                    c.requests,
                    c.rate,
                    c.in_flight,
                    self.client_timeout,
                    self.max_tokens,
                )
            });
            futures_util::future::join_all(each).await
        };
        let (by_client, ()) = tokio::join!(loads, recoveries);
        let wall = start.elapsed();
        let at_one_second = watcher.await.unwrap_or_default();
        for stop in stops {
            let _ = stop.send(());
        }
        for server in servers {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }

        let per_client: Vec<ClientLine> = self
            .clients
            .iter()
            .zip(&by_client)
            .map(|(c, samples)| {
                let mut ok: Vec<Duration> = samples
                    .iter()
                    .filter(|x| x.result == Ok(200))
                    .map(|x| x.latency)
                    .collect();
                ok.sort();
                ClientLine {
                    key: c.key,
                    sent: c.requests,
                    served: ok.len(),
                    p50: percentile(&ok, 0.5),
                    p99: percentile(&ok, 0.99),
                }
            })
            .collect();
        let samples: Vec<Sample> = by_client.into_iter().flatten().collect();
        let mut report = Report::new(self, samples, wall);
        report.per_client = per_client;
        report.shared = links.iter().map(|l| l.status()).collect();
        for (spec, mock) in self.backends.iter().zip(&mocks) {
            let counters: Counters = state_of(spec.name)
                .map(|s| s.snapshot().counters)
                .unwrap_or_default();
            // A mock counts what reached it (a hung one answers nothing); a refused port has
            // only the gateway's count.
            if mock
                .as_ref()
                .is_some_and(|m| m.request_during_retry_after().is_some())
            {
                report.during_retry_after.push(spec.name);
            }
            let (served, throttled, attempts) = match mock {
                Some(m) => {
                    let c = m.counters();
                    (c.ok, c.throttled, c.requests)
                }
                None => (0, 0, counters.requests),
            };
            report.backend_429s += throttled;
            report.per_backend.push(BackendLine {
                name: spec.name,
                served,
                throttled,
                attempts,
            });
        }
        // How soon each recovered backend served again: its first 200 after its outage.
        for (i, outage) in &outages {
            let end = start + *outage;
            let seen = mocks[*i]
                .as_ref()
                .map(MockServer::requests)
                .unwrap_or_default();
            let back = seen
                .iter()
                .filter(|r| r.status == 200 && r.at >= end)
                .map(|r| r.at - end)
                .min();
            let tried = seen.iter().filter(|r| r.at < end).count();
            report.recovery.push((self.backends[*i].name, back, tried));
        }
        let secs_after = (wall.as_secs_f64() - 1.0).max(1e-3);
        for ((name, state), before) in bad.iter().zip(at_one_second) {
            let after = state.snapshot().counters.requests.saturating_sub(before);
            report.bad_rate.push((name, after as f64 / secs_after));
        }
        drop(mocks);
        Ok(report)
    }
}

/// What happened to one request, as the client saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `Ok(status)`, or the client-side failure (`timeout`, `connect`).
    pub result: Result<u16, &'static str>,
    /// From sending to the whole answer read.
    pub latency: Duration,
    /// The `retry-after-ms` of a 429, if any.
    pub retry_after_ms: Option<u64>,
}

/// The open-loop load: `n` requests at `rate` per second, at most `in_flight` outstanding.
pub async fn load(
    addr: SocketAddr,
    n: usize,
    rate: f64,
    in_flight: usize,
    timeout: Duration,
    max_tokens: u32,
) -> Vec<Sample> {
    load_over(&[addr], n, rate, in_flight, timeout, max_tokens).await
}

/// [`load`] spread round robin over several gateways.
pub async fn load_over(
    addrs: &[SocketAddr],
    n: usize,
    rate: f64,
    in_flight: usize,
    timeout: Duration,
    max_tokens: u32,
) -> Vec<Sample> {
    let who = Caller {
        key: "caller-key",
        batch: false,
    };
    load_as(addrs, who, n, rate, in_flight, timeout, max_tokens).await
}

/// Who sends a load: the gateway client key it presents, and whether it marks its requests
/// `batch`.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// Sent as `Authorization: Bearer`.
    pub key: &'static str,
    /// Sends `x-llm-lb-priority: batch`.
    pub batch: bool,
}

/// [`load_over`] as one caller.
pub async fn load_as(
    addrs: &[SocketAddr],
    who: Caller,
    n: usize,
    rate: f64,
    in_flight: usize,
    timeout: Duration,
    max_tokens: u32,
) -> Vec<Sample> {
    let client = tower_llm_lb::client::http_client::<Full<Bytes>>();
    let urls: Vec<http::Uri> = addrs
        .iter()
        .filter_map(|a| format!("http://{a}/v1/chat/completions").parse().ok())
        .collect();
    if urls.is_empty() {
        return Vec::new();
    }
    let body = request_body(max_tokens);
    let permits = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    for i in 0..n {
        tokio::time::sleep_until(start + gap * i as u32).await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let url = urls[i % urls.len()].clone();
        let (client, body) = (client.clone(), body.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let mut req = http::Request::post(url)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {}", who.key));
            if who.batch {
                req = req.header("x-llm-lb-priority", "batch");
            }
            let req = req.body(Full::new(body));
            let Ok(req) = req else {
                return Sample {
                    result: Err("request"),
                    latency: Duration::ZERO,
                    retry_after_ms: None,
                };
            };
            let call = async {
                let res = client.request(req).await.map_err(|_| "connect")?;
                let status = res.status().as_u16();
                let ra = res
                    .headers()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                res.into_body().collect().await.map_err(|_| "body")?;
                Ok::<_, &'static str>((status, ra))
            };
            let (result, retry_after_ms) = match tokio::time::timeout(timeout, call).await {
                Ok(Ok((status, ra))) => (Ok(status), ra),
                Ok(Err(e)) => (Err(e), None),
                Err(_) => (Err("timeout"), None),
            };
            Sample {
                result,
                latency: sent.elapsed(),
                retry_after_ms,
            }
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        if let Ok(s) = s {
            out.push(s);
        }
    }
    out
}

/// The quiet clients of S10.
const QUIET: [&str; 3] = ["quiet-1", "quiet-2", "quiet-3"];

/// The body of every request of the load.
/// The prompt of every scenario request.
const REQUEST_TEXT: &str = "Say hello in one short sentence.";

fn request_body(max_tokens: u32) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": REQUEST_TEXT}],
            "max_tokens": max_tokens,
        })
        .to_string(),
    )
}

/// One backend's line of a [`Report`].
#[derive(Clone, Debug)]
pub struct BackendLine {
    /// Its name.
    pub name: &'static str,
    /// Answers it served (2xx), by its own count.
    pub served: u64,
    /// 429s it answered, by its own count.
    pub throttled: u64,
    /// Attempts the gateway sent it (including refused connects).
    pub attempts: u64,
}

/// What a scenario run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// The scenario's name.
    pub name: &'static str,
    /// Its title.
    pub title: &'static str,
    /// Requests sent.
    pub sent: usize,
    /// 200 answers.
    pub served: usize,
    /// Client-visible errors by kind (`429`, `502`, `timeout`, …).
    pub errors: BTreeMap<String, usize>,
    /// 429s returned with `retry-after-ms: 0`.
    pub zero_retry_after: usize,
    /// 99th percentile of the time to a 429 the clients got (zero: none).
    pub refused_p99: Duration,
    /// 429s the backends answered in all.
    pub backend_429s: u64,
    /// From the first request to the last answer.
    pub wall: Duration,
    /// The ideal wall time.
    pub ideal: Duration,
    /// Median latency of served requests.
    pub p50: Duration,
    /// 99th percentile latency of served requests.
    pub p99: Duration,
    /// Slowest request, any outcome.
    pub max: Duration,
    /// Per backend.
    pub per_backend: Vec<BackendLine>,
    /// Attempts per second the gateway sent each bad backend after the first second.
    pub bad_rate: Vec<(&'static str, f64)>,
    /// Backends that received a request while a 429 of theirs still asked to wait (on tokio's
    /// paused clock this must stay empty; on the real clock a request already on its way when
    /// the 429 left may land here too).
    pub during_retry_after: Vec<&'static str>,
    /// Each replica's shared-state link at the end (empty: none).
    pub shared: Vec<tower_llm_lb::shared::Status>,
    /// Each backend that recovered during the run: how long after its outage ended it served
    /// its first request (`None`: never), and how many requests it got during the outage.
    pub recovery: Vec<(&'static str, Option<Duration>, usize)>,
    /// Per client, in a scenario with several (empty: one client).
    pub per_client: Vec<ClientLine>,
}

/// The `p` quantile of sorted latencies (zero when there are none).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

impl Report {
    fn new(s: &Scenario, samples: Vec<Sample>, wall: Duration) -> Self {
        let mut errors = BTreeMap::new();
        let mut ok: Vec<Duration> = Vec::new();
        let mut zero = 0;
        let mut refused: Vec<Duration> = Vec::new();
        let mut max = Duration::ZERO;
        for x in &samples {
            max = max.max(x.latency);
            match x.result {
                Ok(200) => ok.push(x.latency),
                Ok(code) => {
                    *errors.entry(code.to_string()).or_insert(0) += 1;
                    if code == 429 {
                        refused.push(x.latency);
                    }
                    if code == 429 && x.retry_after_ms == Some(0) {
                        zero += 1;
                    }
                }
                Err(kind) => *errors.entry(kind.to_string()).or_insert(0) += 1,
            }
        }
        ok.sort();
        refused.sort();
        let pct = |p: f64| percentile(&ok, p);
        Report {
            name: s.name,
            title: s.title,
            sent: s.requests,
            served: ok.len(),
            p50: pct(0.5),
            p99: pct(0.99),
            max,
            errors,
            zero_retry_after: zero,
            refused_p99: percentile(&refused, 0.99),
            backend_429s: 0,
            wall,
            ideal: s.ideal(),
            per_backend: Vec::new(),
            bad_rate: Vec::new(),
            recovery: Vec::new(),
            during_retry_after: Vec::new(),
            shared: Vec::new(),
            per_client: Vec::new(),
        }
    }

    /// The targets of the issue that this run missed (empty: all met).
    pub fn missed(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut need = |ok: bool, what: String| {
            if !ok {
                out.push(what)
            }
        };
        // S8 is the baseline S8r is measured against (replicas each learning alone): no target.
        if self.name == "S8" {
            return out;
        }
        // S10 and S10b offer more than the quota for longer than the wait budget: the loud
        // client's excess is refused (an honest 429); the quiet clients are measured instead.
        let overloaded = matches!(self.name, "S10" | "S10b" | "S11");
        need(
            overloaded || self.served == self.sent,
            format!("{}: served {}/{}", self.name, self.served, self.sent),
        );
        match self.name {
            // Issue 28: under sustained overload, goodput stays and the served do not wait the
            // budget (p50 <= 1 s, p99 <= 2 s above the 90 ms service time).
            "S11" => {
                let capacity = 60.0 * self.wall.as_secs_f64();
                need(
                    self.served as f64 >= 0.95 * capacity,
                    format!("S11: served {} of ~{capacity:.0}", self.served),
                );
                need(
                    self.p50 <= Duration::from_millis(1090),
                    format!("S11: p50 {:?} > 1.09 s", self.p50),
                );
                need(
                    self.p99 <= Duration::from_millis(2090),
                    format!("S11: p99 {:?} > 2.09 s", self.p99),
                );
                need(
                    self.refused_p99 <= Duration::from_millis(100),
                    format!("S11: 429s p99 in {:?} > 100 ms", self.refused_p99),
                );
            }
            "S10" | "S10b" => {
                for c in self.per_client.iter().filter(|c| c.key != "loud") {
                    need(
                        c.served == c.sent,
                        format!("{}: {} served {}/{}", self.name, c.key, c.served, c.sent),
                    );
                    // Alone (S10a) they see ~93 ms; behind the loud client's queue, 9 s.
                    need(
                        c.p99 <= Duration::from_millis(500),
                        format!("{}: {} p99 {:?} > 0.5 s", self.name, c.key, c.p99),
                    );
                }
            }
            "S1" => {
                let ratio = self.wall.as_secs_f64() / self.ideal.as_secs_f64();
                need(ratio <= 1.05, format!("S1: wall {ratio:.2}x ideal > 1.05"));
                need(
                    self.p99 <= Duration::from_millis(1200),
                    format!("S1: p99 {:?} > 1.2 s", self.p99),
                );
                let per = self.backend_429s as f64 / self.served.max(1) as f64;
                need(
                    per <= 0.05,
                    format!("S1: {per:.3} backend 429s per success > 0.05"),
                );
            }
            // Issue 16: replicas sharing state serve what one gateway serves, with S1's line
            // of backend 429s.
            "S8r" | "S8k" => {
                let per = self.backend_429s as f64 / self.served.max(1) as f64;
                need(
                    per <= 0.05,
                    format!("{}: {per:.3} backend 429s per success > 0.05", self.name),
                );
            }
            "S1p" | "S2p" | "S6" | "S6t" | "S6h" | "S6l" | "S6s" | "S6sh" | "S6sl" => {
                let per = self.backend_429s as f64 / self.served.max(1) as f64;
                need(
                    per <= 0.05,
                    format!("{}: {per:.3} backend 429s per success > 0.05", self.name),
                );
            }
            "S2" => {
                need(
                    self.backend_429s <= 10,
                    format!("S2: {} backend 429s > 10", self.backend_429s),
                );
                let ptu = self.per_backend.first().map_or(0, |b| b.served);
                // Saturated: the PTU served (nearly) its quota over the run, burst included.
                let quota = 20.0 * self.wall.as_secs_f64();
                need(
                    ptu as f64 >= 0.9 * quota,
                    format!("S2: PTU served {ptu} of ~{quota:.0}"),
                );
            }
            "S3" => {
                for (name, rate) in &self.bad_rate {
                    need(
                        *rate <= 1.0,
                        format!("S3: {rate:.1} attempts/s to {name} after the first second"),
                    );
                }
            }
            "S9" => {
                for (name, back, _) in &self.recovery {
                    need(
                        back.is_some_and(|b| b <= Duration::from_secs(2)),
                        format!("S9: {name} back {back:?} after its outage (> 2 s)"),
                    );
                }
            }
            "S4d" => need(
                self.max <= Duration::from_secs(15),
                format!("S4d: slowest request {:?} > 15 s", self.max),
            ),
            "S7" => {
                // Asked once, then left alone 60 s (doubling): at most one more ask a minute.
                for (name, rate) in &self.bad_rate {
                    need(
                        *rate <= 0.05,
                        format!("S7: {rate:.2} attempts/s to {name} after the first second"),
                    );
                }
                need(
                    self.errors.is_empty(),
                    "S7: a client saw an error".to_string(),
                );
            }
            _ => {}
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{v}x {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let share = self
            .per_backend
            .iter()
            .map(|b| format!("{} {}/{}a", b.name, b.served, b.attempts))
            .collect::<Vec<_>>()
            .join(" ");
        let bad = self
            .bad_rate
            .iter()
            .map(|(n, r)| format!("{n} {r:.1}/s"))
            .chain(self.recovery.iter().map(|(n, back, tried)| match back {
                Some(b) => format!(
                    "{n}: {tried} tries in its outage, back {:.1} s after it",
                    b.as_secs_f64()
                ),
                None => format!("{n}: {tried} tries in its outage, never back"),
            }))
            .chain(self.per_client.iter().map(|c| {
                format!(
                    "{} {}/{} p50/p99 {:.0}/{:.0} ms",
                    c.key,
                    c.served,
                    c.sent,
                    c.p50.as_secs_f64() * 1e3,
                    c.p99.as_secs_f64() * 1e3
                )
            }))
            .collect::<Vec<_>>()
            .join(" ");
        write!(
            f,
            "| {} {} | {}/{} | {} (429 ra=0: {}{}) | {} | {:.1} s / {:.1} s | {:.0} / {:.0} ms | {} | {} |",
            self.name,
            self.title,
            self.served,
            self.sent,
            errors,
            self.zero_retry_after,
            if self.refused_p99.is_zero() {
                String::new()
            } else {
                format!(", p99 in {:.0} ms", self.refused_p99.as_secs_f64() * 1e3)
            },
            self.backend_429s,
            self.wall.as_secs_f64(),
            self.ideal.as_secs_f64(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            share,
            if bad.is_empty() { "-".into() } else { bad },
        )
    }
}

/// The table's header for [`Report`]'s `Display`.
pub const TABLE_HEADER: &str = "| scenario | served | client errors | backend 429s | wall / ideal | p50 / p99 | per backend (served/attempts) | bad backends after 1 s |\n|---|---|---|---|---|---|---|---|";

/// S5: throughput of the gateway against the same backend asked directly, `n` requests each
/// with `in_flight` outstanding, one zero-latency backend. Returns (direct req/s, gateway
/// req/s).
pub async fn overhead(n: usize, in_flight: usize) -> Result<(f64, f64), BoxError> {
    let mock = zero_mock().await?;
    let config = Config::from_json(
        &serde_json::json!({ "backends": { "zero": {
            "provider": "openai", "url": format!("{}/v1", mock.url()), "api_key": "key-zero" } } })
        .to_string(),
    )?;
    let (service, backends) = config.build_with_backends(tower_llm_lb::client::http_client())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Gateway::new(service, backends, Vec::new()).serve(
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let rate = 1e6;
    let timeout = Duration::from_secs(20);
    let mut direct = 0.0;
    let mut via = 0.0;
    // Alternate, best of three each, so a noisy neighbour hurts both alike.
    for _ in 0..3 {
        let t = Instant::now();
        load_direct(mock.addr(), n, in_flight, timeout).await;
        direct = f64::max(direct, n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        load(gw, n, rate, in_flight, timeout, 16).await;
        via = f64::max(via, n as f64 / t.elapsed().as_secs_f64());
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok((direct, via))
}

/// What sharing state costs a request: the same load through two gateways over one
/// zero-latency mock, one on its own and one sharing its state through Redis at `redis_url`,
/// alternating, best of three each. Returns (requests per second, p99) for the plain gateway,
/// then for the sharing one, and the sharing one's shared-state status at the end.
pub async fn shared_overhead(
    n: usize,
    in_flight: usize,
    redis_url: &str,
) -> Result<
    (
        (f64, Duration),
        (f64, Duration),
        tower_llm_lb::shared::Status,
    ),
    BoxError,
> {
    let mock = zero_mock().await?;
    let mut json = serde_json::json!({ "backends": { "zero": {
        "provider": "openai", "url": format!("{}/v1", mock.url()), "api_key": "key-zero" } } });
    let plain = Config::from_json(&json.to_string())?;
    json["shared_state"] = serde_json::json!({
        "redis_url": redis_url, "key_prefix": format!("overhead-{}", std::process::id()) });
    let sharing = Config::from_json(&json.to_string())?;
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    let mut link = None;
    for config in [&plain, &sharing] {
        let (service, backends) = config.build_with_backends(tower_llm_lb::client::http_client())?;
        let mut gateway = Gateway::new(service, backends.clone(), Vec::new());
        if let Some(l) = config.shared_state(backends)? {
            link = Some(l.clone());
            gateway = gateway.shared_state(l);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        tokio::spawn(gateway.serve(listener, async move {
            let _ = stop_rx.await;
        }));
    }
    let timeout = Duration::from_secs(20);
    let mut best = [(0.0, Duration::MAX); 2];
    for _ in 0..3 {
        for (i, addr) in addrs.iter().enumerate() {
            let t = Instant::now();
            let samples = load(*addr, n, 1e6, in_flight, timeout, 16).await;
            let rate = n as f64 / t.elapsed().as_secs_f64();
            let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
            lat.sort();
            let p99 = lat
                .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default();
            best[i] = (f64::max(best[i].0, rate), best[i].1.min(p99));
        }
    }
    let status = link
        .map(|l| l.status())
        .ok_or("no shared state was started")?;
    for stop in stops {
        let _ = stop.send(());
    }
    Ok((best[0], best[1], status))
}

/// A mock with no latency, no limits and no recording: what a gateway's own cost is measured
/// against.
async fn zero_mock() -> std::io::Result<MockServer> {
    MockServer::builder()
        .name("zero")
        .bearer("key-zero")
        .record_requests(false)
        .start()
        .await
}

/// The same load straight at a mock (its OpenAI route with its key).
async fn load_direct(addr: SocketAddr, n: usize, in_flight: usize, timeout: Duration) {
    let client = tower_llm_lb::client::http_client::<Full<Bytes>>();
    let body = Bytes::from(
        serde_json::json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
            "max_tokens": 16,
        })
        .to_string(),
    );
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (client, body) = (client.clone(), body.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("authorization", "Bearer key-zero")
                .body(Full::new(body));
            if let Ok(req) = req {
                let _ = tokio::time::timeout(timeout, async {
                    if let Ok(res) = client.request(req).await {
                        let _ = res.into_body().collect().await;
                    }
                })
                .await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
