//! Shared state across replicas through a real `redis-server` on loopback (`.ci/run` installs
//! it), never a mock of Redis. Replicas are separate stacks in one process,
//! each with its own state and client, over the same mock backends.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_llm_lb::Backend;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::shared::{RedisStore, SharedSettings, SharedState};
use tower_llm_lb::stack::LlmService;
use tower_llm_lb_config::Config;
use tower_llm_lb_mock::{Fault, MockServer, RedisServer};

/// A real `redis-server` on a loopback port (`.ci/run` installs it; by hand, a missing one is
/// named with the command that installs it).
fn redis(password: Option<&str>) -> RedisServer {
    RedisServer::start(password).unwrap_or_else(|e| panic!("this test needs redis-server: {e}"))
}

fn chat() -> http::Request<ReplayBody> {
    http::Request::post("/v1/chat/completions")
        .body(ReplayBody::from(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap()
}

/// One replica: its own stack, state and client over the mock.
fn replica(mock: &MockServer) -> (LlmService, Vec<Backend>) {
    let json = format!(
        r#"{{ "backends": {{ "east": {{ "provider": "openai", "url": "{}/v1" }} }},
             "retry": {{ "attempts": 1 }} }}"#,
        mock.url()
    );
    Config::from_json(&json)
        .unwrap()
        .build_with_backends(http_client())
        .unwrap()
}

fn settings(prefix: &str) -> SharedSettings {
    SharedSettings {
        interval: Duration::from_millis(20),
        budget: Duration::from_millis(500),
        key_prefix: prefix.into(),
    }
}

/// Waits (real time, up to `limit`) until `done` holds.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// Links two replicas' backends through the Redis at `url`, under `prefix`.
fn link_both(url: &str, prefix: &str, a: &[Backend], b: &[Backend]) -> (SharedState, SharedState) {
    link_both_through(RedisStore::new(url, prefix).unwrap(), prefix, a, b)
}

/// Links two replicas' backends through `store`, under `prefix`.
fn link_both_through(
    store: RedisStore,
    prefix: &str,
    a: &[Backend],
    b: &[Backend],
) -> (SharedState, SharedState) {
    let store = Arc::new(store);
    (
        SharedState::spawn(store.clone(), a.to_vec(), settings(prefix)),
        SharedState::spawn(store, b.to_vec(), settings(prefix)),
    )
}

/// `svc` sends one request, which `mock` answers `429` with `header: value`.
async fn throttled_once(mock: &MockServer, svc: LlmService, header: &str, value: &str) {
    mock.set_fault(Some(Fault::Throttle(vec![(header.into(), value.into())])));
    let res = svc.oneshot(chat()).await.unwrap();
    assert_eq!(res.status(), 429);
    // Dropped: a response not yet read to its end is a request in flight, demand.
    drop(res);
    mock.set_fault(None);
}

/// Replica A earns a `429 retry-after: 2`; then replica B sends one request. Returns whether
/// the mock got a request during the wait it asked for.
async fn second_replica_after_a_429(redis: Option<String>, prefix: &str) -> bool {
    let store = redis.map(|url| RedisStore::new(&url, prefix).unwrap());
    second_replica_through(store, prefix).await
}

/// [`second_replica_after_a_429`] through `store`.
async fn second_replica_through(store: Option<RedisStore>, prefix: &str) -> bool {
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let (a, backends_a) = replica(&mock);
    let (b, backends_b) = replica(&mock);
    let shared = store.is_some();
    let _links = store.map(|store| link_both_through(store, prefix, &backends_a, &backends_b));
    if let Some((link_a, link_b)) = &_links {
        // Both linked before the 429 (a cluster's first connect takes a while).
        assert!(
            eventually(Duration::from_secs(5), || link_a.status().exchanges > 0
                && link_b.status().exchanges > 0)
            .await
        );
    }
    throttled_once(&mock, a, "retry-after", "2").await;
    if shared {
        // B hears of A's wait through Redis.
        let state = backends_b[0].state().clone();
        assert!(
            eventually(Duration::from_secs(2), || state
                .snapshot()
                .throttled_until
                .is_some_and(
                    |u| u > tokio::time::Instant::now() + Duration::from_secs(1)
                ))
            .await,
            "replica B never heard of A's 429: {:?}",
            _links.as_ref().map(|(a, b)| (a.status(), b.status()))
        );
    }
    if let Some((link_a, link_b)) = &_links {
        // Each counts both replicas.
        assert!(
            eventually(Duration::from_secs(2), || link_a.status().replicas == 2
                && link_b.status().replicas == 2)
            .await,
            "{:?}",
            link_a.status()
        );
        // A's request was A's demand, B had none: B's share is the smaller; the two add up to
        // the backend's quota.
        let (sa, sb) = (backends_a[0].state().clone(), backends_b[0].state().clone());
        assert!(
            eventually(Duration::from_secs(3), || sb.snapshot().share
                < sa.snapshot().share
                && (sa.snapshot().share + sb.snapshot().share - 1.0).abs() < 0.02)
            .await,
            "shares ({}, {})",
            sa.snapshot().share,
            sb.snapshot().share
        );
    }
    let res = b.oneshot(chat()).await;
    // Waited out (then served), or refused at once: either way, not sent during the wait.
    assert!(res.is_err() || res.unwrap().status().as_u16() < 500);
    mock.request_during_retry_after().is_some()
}

#[tokio::test]
async fn a_wait_one_replica_was_given_keeps_the_others_away_through_redis() {
    let redis = redis(None);
    assert!(
        !second_replica_after_a_429(Some(redis.url()), "t1").await,
        "with the shared state, replica B waited for A's retry-after"
    );
    // Without it, B knows nothing and sends into the wait.
    assert!(second_replica_after_a_429(None, "t1").await);
}

#[tokio::test]
async fn each_replica_s_share_of_the_quota_follows_its_demand() {
    let redis = redis(None);
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let (a, backends_a) = replica(&mock);
    let (b, backends_b) = replica(&mock);
    let _links = link_both(&redis.url(), "t8", &backends_a, &backends_b);
    let (sa, sb) = (backends_a[0].state().clone(), backends_b[0].state().clone());
    let near = |x: f64, to: f64| (x - to).abs() < 0.02;
    // Within `secs`, A's and B's shares come near `to`.
    let reach = |to: (f64, f64), secs: u64, what: &'static str| {
        let (sa, sb) = (sa.clone(), sb.clone());
        async move {
            let done = eventually(Duration::from_secs(secs), || {
                near(sa.snapshot().share, to.0) && near(sb.snapshot().share, to.1)
            })
            .await;
            assert!(
                done,
                "{what}: ({}, {})",
                sa.snapshot().share,
                sb.snapshot().share
            );
        }
    };
    reach((0.5, 0.5), 10, "no demand: halves").await;
    // Four requests to A whose answers it has not read to their end: A's demand, none of B's.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(a.clone().oneshot(chat()).await.unwrap());
    }
    // A quarter of an equal share each (1/8), the rest by demand: A 7/8, B 1/8.
    reach((0.875, 0.125), 5, "A busy").await;
    assert!(
        near(sa.snapshot().share + sb.snapshot().share, 1.0),
        "the shares add up to the quota"
    );
    // Then the demand moves to B: so does the quota.
    drop(held);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(b.clone().oneshot(chat()).await.unwrap());
    }
    assert!(
        eventually(Duration::from_secs(5), || sb.snapshot().share > 0.75
            && sa.snapshot().share < 0.25)
        .await,
        "B busy: ({}, {})",
        sa.snapshot().share,
        sb.snapshot().share
    );
    drop(held);
}

#[tokio::test]
async fn another_replica_s_answers_count_toward_the_pace_of_a_backend_without_quota_headers() {
    let redis = redis(None);
    let mock = MockServer::builder()
        .name("east")
        .quota_headers(false)
        .start()
        .await
        .unwrap();
    let (a, backends_a) = replica(&mock);
    let (b, backends_b) = replica(&mock);
    let links = link_both(&redis.url(), "t7", &backends_a, &backends_b);
    assert!(
        eventually(Duration::from_secs(5), || links.0.status().replicas == 2
            && links.1.status().replicas == 2)
        .await
    );
    // B's 429 (no quota headers: only its wait) gives B a pace for the backend.
    throttled_once(&mock, b, "retry-after-ms", "200").await;
    let state_b = backends_b[0].state().clone();
    let learned = state_b
        .snapshot()
        .whole_pace
        .expect("B paces the backend after its 429");
    // Past the shared wait, 50 answers get through to A: as many answers not throttled shrink
    // B's pace as they would had they been B's own (0.05% each: about 2.5%).
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..50 {
        let res = a.clone().oneshot(chat()).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(backends_a[0].state().snapshot().counters.throttled, 0);
    assert!(
        eventually(Duration::from_secs(3), || state_b
            .snapshot()
            .whole_pace
            .is_some_and(|p| p < learned.mul_f64(0.99)))
        .await,
        "B's pace {:?}, learned {learned:?}",
        state_b.snapshot().whole_pace
    );
}

#[tokio::test]
async fn with_redis_down_requests_go_on_and_the_link_comes_back_without_its_password_anywhere() {
    let mut redis = redis(Some("s3cret-pw"));
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let (svc, backends) = replica(&mock);
    let store = Arc::new(RedisStore::new(&redis.url(), "t2").unwrap());
    let link = SharedState::spawn(store, backends, settings("t2"));
    assert!(
        eventually(Duration::from_secs(15), || link.status().healthy).await,
        "{:?}",
        link.status()
    );
    redis.kill();
    for _ in 0..20 {
        let res = svc.clone().oneshot(chat()).await.unwrap();
        assert_eq!(res.status(), 200, "Redis being down fails no request");
    }
    assert!(eventually(Duration::from_secs(5), || !link.status().healthy).await);
    let down = link.status();
    assert!(down.failures > 0 && down.last_error.is_some());
    redis.restart().expect("redis-server starts again");
    assert!(
        eventually(Duration::from_secs(10), || link.status().healthy).await,
        "back within 10 s of Redis returning: {:?}",
        link.status()
    );
    let seen = format!("{:?} {:?}", link.status(), link);
    assert!(!seen.contains("s3cret-pw"), "{seen}");
    assert!(seen.contains("redis://:***@127.0.0.1"), "{seen}");
    // A wrong password: an error that does not quote the URL.
    let bad = format!("redis://:wrong-pw@127.0.0.1:{}", redis.port());
    let (_, backends) = replica(&mock);
    let link = SharedState::spawn(
        Arc::new(RedisStore::new(&bad, "t2").unwrap()),
        backends,
        settings("t2"),
    );
    assert!(eventually(Duration::from_secs(5), || link.status().failures > 0).await);
    let seen = format!("{:?}", link.status());
    assert!(
        !seen.contains("wrong-pw") && !link.status().healthy,
        "{seen}"
    );
}

#[test]
fn the_readme_s_and_deploy_s_shared_state_configs_parse() {
    for doc in [include_str!("../README.md"), include_str!("../DEPLOY.md")] {
        let start = doc
            .find("{ \"shared_state\"")
            .or_else(|| doc.find("{\n  \"shared_state\""))
            .unwrap();
        let end = start + doc[start..].find("```").unwrap();
        let config = Config::from_json(&doc[start..end]).unwrap();
        assert!(
            format!("{config:?}").contains("shared_state: Some"),
            "the shared_state section is read"
        );
    }
}

#[tokio::test]
async fn replicas_share_through_a_redis_cluster() {
    let dir = std::env::temp_dir().join(format!("llm-lb-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::cluster_node(&dir).expect("a cluster node starts"))
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("redis-cli (from redis-tools, with redis-server) runs");
    assert!(created.success(), "redis-cli --cluster create failed");
    let ready = || {
        Command::new("redis-cli")
            .args(["-p", &nodes[0].port().to_string(), "cluster", "info"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
    };
    assert!(
        eventually(Duration::from_secs(10), ready).await,
        "the cluster never became ready"
    );
    let seeds = nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}", n.port()))
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        !second_replica_after_a_429(Some(seeds), "t4").await,
        "through the cluster, replica B waited for A's retry-after"
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rediss://`: a server that speaks TLS only, its certificate from a private CA given to the
/// store; then the same server refused to a store that checks the system's roots.
#[tokio::test]
async fn replicas_share_through_redis_over_tls() {
    let dir = std::env::temp_dir().join(format!("llm-lb-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let redis = RedisServer::start_tls(
        Some("s3cret-tls"),
        &dir,
        &cert.cert.pem(),
        &cert.key_pair.serialize_pem(),
    )
    .unwrap_or_else(|e| panic!("this test needs redis-server with TLS: {e}"));
    assert!(redis.url().starts_with("rediss://"));
    let ca = cert.cert.pem();
    let store = RedisStore::with_root_certificate(&redis.url(), "t9", ca.as_bytes()).unwrap();
    assert!(
        !second_replica_through(Some(store), "t9").await,
        "over TLS, replica B waited for A's retry-after"
    );
    // Not trusted without its CA: the link fails and says nothing of the password.
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let (_svc, backends) = replica(&mock);
    let link = SharedState::spawn(
        Arc::new(RedisStore::new(&redis.url(), "t9").unwrap()),
        backends,
        settings("t9"),
    );
    assert!(eventually(Duration::from_secs(5), || link.status().failures > 0).await);
    let status = link.status();
    assert_eq!(status.exchanges, 0, "{status:?}");
    assert!(!format!("{status:?}").contains("s3cret-tls"), "{status:?}");
    // The config's `redis_ca_file` links through the same server.
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let config = Config::from_json(
        &serde_json::json!({
            "backends": { "east": { "provider": "openai", "url": format!("{}/v1", mock.url()), "api_key": "k" } },
            "shared_state": { "redis_url": redis.url(), "redis_ca_file": ca_file, "key_prefix": "t9c" }
        })
        .to_string(),
    )
    .unwrap();
    let (_svc, backends) = config.build_with_backends(http_client()).unwrap();
    let link = config
        .shared_state(backends)
        .unwrap()
        .expect("a shared state");
    assert!(
        eventually(Duration::from_secs(5), || link.status().exchanges > 0).await,
        "{:?}",
        link.status()
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_replica_started_before_redis_links_when_redis_comes() {
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let (svc, backends) = replica(&mock);
    // A port with nothing on it yet: the server's, stopped.
    let mut redis = redis(None);
    redis.kill();
    let url = redis.url();
    let link = SharedState::spawn(
        Arc::new(RedisStore::new(&url, "t6").unwrap()),
        backends,
        settings("t6"),
    );
    assert!(eventually(Duration::from_secs(5), || link.status().failures > 2).await);
    let res = svc.oneshot(chat()).await.unwrap();
    assert_eq!(res.status(), 200, "served on its own meanwhile");
    redis.restart().expect("redis-server starts");
    assert!(
        eventually(Duration::from_secs(15), || link.status().healthy).await,
        "{:?}",
        link.status()
    );
}
