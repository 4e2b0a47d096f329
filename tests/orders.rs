//! The same three situations (a throttled backend, a failing backend, a backend given the wrong
//! key) through nine orders of the layers, over one real hyper client and real loopback mocks.
//! Each order either serves sensibly or refuses with a typed error without sending; in every
//! order no request reaches a backend during its retry-after, no key reaches another backend,
//! and every request ends. The README's "Layer order" table states what each order means; this
//! test is what keeps it true.

mod common;

use std::time::Duration;

use common::chat;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::auth::{AuthInjectLayer, Credential};
use tower_llm_lb::balance::{Balance, BalanceLayer};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::{EndpointLayer, Served};
use tower_llm_lb::error::{CredentialMisplaced, NoBackendChosen, find};
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::{Fault, MockServer};

/// A stack under test, reduced to what the matrix looks at: the status and who answered (the
/// body is read to the end, as a caller would).
type Svc = BoxCloneSyncService<Request<ReplayBody>, (StatusCode, String), BoxError>;

fn boxed<S, B>(svc: S) -> Svc
where
    S: tower::Service<Request<ReplayBody>, Response = http::Response<B>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(svc.and_then(|res: http::Response<B>| async move {
        let status = res.status();
        let by = res
            .extensions()
            .get::<Served>()
            .map_or_else(|| "-".to_string(), |s| s.backend.name().to_string());
        res.into_body().collect().await.map_err(Into::into)?;
        Ok((status, by))
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// `a` takes 2 requests a second (Azure-like 429s with whole-second `retry-after`).
    Throttle,
    /// `a` answers 500 to everything.
    Failure,
    /// `a` is configured with a key it rejects (401).
    WrongKey,
}

struct Bed {
    mocks: Vec<MockServer>,
    backends: Vec<Backend>,
}

async fn bed(case: Case) -> Bed {
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for name in ["a", "b", "c"] {
        let rps = if case == Case::Throttle && name == "a" {
            2.0
        } else {
            50.0
        };
        let m = MockServer::builder()
            .name(name)
            .api_key(format!("key-{name}"))
            .rps(rps)
            .azure_headers()
            .record_requests(true)
            .start()
            .await
            .unwrap();
        if case == Case::Failure && name == "a" {
            m.set_fault(Some(Fault::Status(500)));
        }
        let key = if case == Case::WrongKey && name == "a" {
            "wrong-key".to_string()
        } else {
            format!("key-{name}")
        };
        backends.push(
            Backend::azure(name, m.url(), "gpt-4o", "2024-10-21")
                .credential(Credential::api_key(&key).unwrap())
                .build()
                .unwrap(),
        );
        mocks.push(m);
    }
    Bed { mocks, backends }
}

fn breakers() -> BreakerGroup {
    BreakerGroup::try_new(Policy::default()).unwrap()
}

/// What a caller saw over one run.
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    /// Answers that were not 200 (429 with a hint, a 500, a 401 passed on).
    other: Vec<StatusCode>,
    errors: Vec<BoxError>,
}

async fn drive(svc: &Svc, n: usize) -> Seen {
    let mut seen = Seen::default();
    for _ in 0..n {
        let mut req = chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        req.headers_mut()
            .insert("authorization", "Bearer caller-key".parse().unwrap());
        // Every request ends: a hang would trip this (virtual) bound.
        let result = tokio::time::timeout(Duration::from_secs(120), svc.clone().oneshot(req))
            .await
            .expect("a request never ended");
        match result {
            Ok((StatusCode::OK, _)) => seen.ok += 1,
            Ok((status, _)) => seen.other.push(status),
            Err(e) => seen.errors.push(e),
        }
    }
    seen
}

/// What an order is expected to do in a case.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Every request served.
    All,
    /// At least this many of the requests served; the rest answered or failed with a typed error.
    AtLeast(usize),
    /// None served: the backend's answer (or a typed error) comes back.
    NoneServed,
    /// Refused by a misplaced layer, with this typed error, without sending to another backend.
    Refused(fn(&BoxError) -> bool),
}

struct Order {
    name: &'static str,
    build: fn(&[Backend]) -> Svc,
    throttle: Want,
    failure: Want,
    wrong_key: Want,
}

const N: usize = 30;

fn misplaced(e: &BoxError) -> bool {
    find::<CredentialMisplaced>(&**e).is_some()
}

fn unmarked(e: &BoxError) -> bool {
    find::<NoBackendChosen>(&**e).is_some()
}

fn orders() -> Vec<Order> {
    vec![
        Order {
            name: "1 retry > balance > breaker > endpoint > auth (recommended)",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(RetryAfter429Layer::default())
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(breakers().layer_for_chosen(b))
                        .layer(EndpointLayer::for_chosen())
                        .layer(AuthInjectLayer::for_chosen())
                        .service(http_client::<ReplayBody>()),
                )
            },
            throttle: Want::All,
            failure: Want::All,
            wrong_key: Want::All,
        },
        Order {
            name: "2 retry > balance > endpoint > breaker > auth",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(RetryAfter429Layer::default())
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(EndpointLayer::for_chosen())
                        .layer(breakers().layer_for_chosen(b))
                        .layer(AuthInjectLayer::for_chosen())
                        .service(http_client::<ReplayBody>()),
                )
            },
            throttle: Want::All,
            failure: Want::All,
            wrong_key: Want::All,
        },
        Order {
            name: "3 retry > balance > auth > endpoint > breaker",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(RetryAfter429Layer::default())
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(AuthInjectLayer::for_chosen())
                        .layer(EndpointLayer::for_chosen())
                        .layer(breakers().layer_for_chosen(b))
                        .service(http_client::<ReplayBody>()),
                )
            },
            throttle: Want::All,
            failure: Want::All,
            wrong_key: Want::All,
        },
        Order {
            name: "4 balance > retry > breaker > endpoint > auth (retries stay on the chosen backend)",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(RetryAfter429Layer::default())
                        .layer(breakers().layer_for_chosen(b))
                        .layer(EndpointLayer::for_chosen())
                        .layer(AuthInjectLayer::for_chosen())
                        .service(http_client::<ReplayBody>()),
                )
            },
            // A 429 waits for the chosen backend's retry-after (the endpoint refuses to send
            // before it), within the wait budget.
            throttle: Want::All,
            // The requests that met `a` before its circuit opened end with its 500.
            failure: Want::AtLeast(N - 6),
            // The one request that met `a` ends with its 401 (as an error naming it).
            wrong_key: Want::AtLeast(N - 1),
        },
        Order {
            name: "5 balance > breaker > endpoint > auth (no retry layer)",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(breakers().layer_for_chosen(b))
                        .layer(EndpointLayer::for_chosen())
                        .layer(AuthInjectLayer::for_chosen())
                        .service(http_client::<ReplayBody>()),
                )
            },
            // A 429 is the caller's, with the backend's hint; `Balance` skips `a` meanwhile.
            throttle: Want::AtLeast(N - 8),
            failure: Want::AtLeast(N - 6),
            wrong_key: Want::AtLeast(N - 1),
        },
        Order {
            name: "6 retry > endpoint > auth, one backend (no balance)",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(RetryAfter429Layer::default())
                        .layer(EndpointLayer::new(b[0].clone()))
                        .layer(AuthInjectLayer::for_backend(&b[0]))
                        .service(http_client::<ReplayBody>()),
                )
            },
            // Each 429 is waited out (no request during the retry-after), within 10 s.
            throttle: Want::All,
            failure: Want::NoneServed,
            wrong_key: Want::NoneServed,
        },
        Order {
            name: "7 per-backend stacks: retry > Balance::from_backends(breaker > endpoint > auth)",
            build: |b| {
                let group = breakers();
                let balance = Balance::from_backends(b.to_vec(), |backend| {
                    ServiceBuilder::new()
                        .layer(group.layer_for(backend))
                        .layer(EndpointLayer::new(backend.clone()))
                        .layer(AuthInjectLayer::for_backend(backend))
                        .service(http_client::<ReplayBody>())
                })
                .build()
                .unwrap();
                boxed(
                    ServiceBuilder::new()
                        .layer(RetryAfter429Layer::default())
                        .service(balance),
                )
            },
            throttle: Want::All,
            failure: Want::All,
            wrong_key: Want::All,
        },
        Order {
            name: "8 auth for `a` > retry > balance > endpoint (misplaced: one backend's key above the pick)",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(AuthInjectLayer::for_backend(&b[0]))
                        .layer(RetryAfter429Layer::default())
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(EndpointLayer::for_chosen())
                        .service(http_client::<ReplayBody>()),
                )
            },
            throttle: Want::Refused(misplaced),
            failure: Want::Refused(misplaced),
            wrong_key: Want::Refused(misplaced),
        },
        Order {
            name: "9 breaker for the chosen > balance (misplaced: nothing chosen yet)",
            build: |b| {
                boxed(
                    ServiceBuilder::new()
                        .layer(RetryAfter429Layer::default())
                        .layer(breakers().layer_for_chosen(b))
                        .layer(BalanceLayer::try_new(b.to_vec()).unwrap())
                        .layer(EndpointLayer::for_chosen())
                        .layer(AuthInjectLayer::for_chosen())
                        .service(http_client::<ReplayBody>()),
                )
            },
            throttle: Want::Refused(unmarked),
            failure: Want::Refused(unmarked),
            wrong_key: Want::Refused(unmarked),
        },
    ]
}

async fn check(order: &Order, case: Case) -> String {
    let bed = bed(case).await;
    // Order 6 is a one-backend stack: `a` alone.
    let svc = (order.build)(&bed.backends);
    let seen = drive(&svc, N).await;
    let want = match case {
        Case::Throttle => order.throttle,
        Case::Failure => order.failure,
        Case::WrongKey => order.wrong_key,
    };
    let sent: Vec<u64> = bed.mocks.iter().map(|m| m.counters().requests).collect();
    let what = format!(
        "{} / {case:?}: served {}, other answers {:?}, errors {:?}; sent to a, b, c: {sent:?}",
        order.name,
        seen.ok,
        seen.other,
        seen.errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    );
    // Invariants of every order.
    for m in &bed.mocks {
        assert_eq!(
            m.request_during_retry_after(),
            None,
            "{what}: {} got a request during its retry-after",
            m.name()
        );
        let c = m.counters();
        assert_eq!(
            c.foreign_credentials,
            0,
            "{what}: {} got a key not its own",
            m.name()
        );
        if m.name() != "a" || case != Case::WrongKey {
            assert_eq!(c.unauthorized, 0, "{what}: {} got a wrong key", m.name());
        }
    }
    match want {
        Want::All => assert_eq!(seen.ok, N, "{what}"),
        Want::AtLeast(k) => {
            assert!(seen.ok >= k, "{what}");
            // What was not served came back as an answer or a typed error naming attempts.
            for e in &seen.errors {
                assert!(!format!("{e}").contains("key-"), "{what}: {e}");
            }
        }
        Want::NoneServed => {
            assert_eq!(seen.ok, 0, "{what}");
            // At most `max_attempts` sends per request, with a backoff between them.
            assert!(bed.mocks[0].counters().requests <= 4 * N as u64, "{what}");
        }
        Want::Refused(is) => {
            assert!(!seen.errors.is_empty(), "{what}");
            for e in &seen.errors {
                assert!(is(e), "{what}: {e}");
            }
            // Nothing reached a backend with a key that was not its own (checked above): the
            // backends the misplaced layer was not built for got nothing at all.
            for m in &bed.mocks[1..] {
                assert_eq!(m.counters().requests, 0, "{what}: {}", m.name());
            }
        }
    }
    // Throttling: `a` never saw more than its quota's worth of 429s in a row for long.
    if case == Case::Failure && matches!(want, Want::All) {
        assert!(
            bed.mocks[0].counters().requests <= 8,
            "{what}: a's circuit opened"
        );
    }
    what
}

#[tokio::test(start_paused = true)]
async fn every_order_serves_sensibly_or_refuses_with_a_typed_error() {
    for order in orders() {
        for case in [Case::Throttle, Case::Failure, Case::WrongKey] {
            let what = check(&order, case).await;
            eprintln!("{what}");
        }
    }
}
