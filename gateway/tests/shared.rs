//! The gateway's shared state through a real `redis-server` on loopback (`.ci/run` installs it):
//! `/stats` shows the link and keeps the password out, and a reloaded config links the new
//! backends without a restart. The library's shared-state tests are in the root's
//! `tests/shared.rs`.

mod common;

use std::time::Duration;

use tower::ServiceExt;
use tower_llm_lb::client::http_client;
use tower_llm_lb_config::Config;
use tower_llm_lb_mock::{MockServer, RedisServer};

/// A real `redis-server` on a loopback port.
fn redis(password: Option<&str>) -> RedisServer {
    RedisServer::start(password).unwrap_or_else(|e| panic!("this test needs redis-server: {e}"))
}

#[tokio::test]
async fn the_config_s_shared_state_shows_on_stats_and_keeps_its_password_out_of_debug() {
    let redis = redis(Some("s3cret-pw"));
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{ "east": {{ "provider": "openai", "url": "{}/v1" }} }},
             "shared_state": {{ "redis_url": "{}", "key_prefix": "t3", "sync_interval_ms": 20 }},
             "gateway": {{ "client_keys": ["k"] }} }}"#,
        mock.url(),
        redis.url()
    );
    let config = Config::from_json(&json).unwrap();
    assert!(!format!("{config:?}").contains("s3cret-pw"));
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    let link = config.shared_state(backends.clone()).unwrap().unwrap();
    let app = tower_llm_lb_gateway::Gateway::new(svc, backends, vec!["k".into()])
        .shared_state(link)
        .router();
    let stats = || async {
        let req = http::Request::get("/stats")
            .header("authorization", "Bearer k")
            .body(axum::body::Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    let mut seen = String::new();
    for _ in 0..200 {
        seen = stats().await;
        if seen.contains(r#""healthy":true"#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.contains(r#""healthy":true"#), "{seen}");
    assert!(!seen.contains("s3cret-pw"), "{seen}");
    // Each backend shows this replica's share of its quota (alone, and idle: all of it).
    assert!(seen.contains(r#""quota_share":1.0"#), "{seen}");
    // Both a URL and its variable: refused, naming the field.
    let both = r#"{ "backends": { "b": { "provider": "openai", "url": "http://127.0.0.1:1/v1" } },
                   "shared_state": { "redis_url": "redis://127.0.0.1:1", "redis_url_env": "X" } }"#;
    let config = Config::from_json(both).unwrap();
    let err = config.shared_state(Vec::new()).unwrap_err();
    assert_eq!(err.path(), "shared_state");
}

#[tokio::test]
async fn a_reloaded_config_s_shared_state_is_linked_without_a_restart() {
    let redis = redis(None);
    let mock = MockServer::builder().name("east").start().await.unwrap();
    let dir = std::env::temp_dir().join(format!("llm-lb-shared-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.json");
    let config = |shared: &str| {
        format!(
            r#"{{ "backends": {{ "east": {{ "provider": "openai", "url": "{}/v1" }} }} {shared} }}"#,
            mock.url()
        )
    };
    std::fs::write(&path, config("")).unwrap();
    let (mut child, url) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || common::serve_config(&path)
    })
    .await
    .unwrap();
    let stats = || async {
        let req = http::Request::get(format!("{url}/stats"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let res = http_client().oneshot(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    };
    assert!(stats().await["shared_state"].is_null());
    // The file now links the replica to Redis: picked up within the 2 s file check.
    std::fs::write(
        &path,
        config(&format!(
            r#", "shared_state": {{ "redis_url": "{}", "key_prefix": "t5" }}"#,
            redis.url()
        )),
    )
    .unwrap();
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        seen = stats().await["shared_state"].clone();
        if seen["healthy"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(seen["healthy"], true, "{seen}");
    assert_eq!(seen["replicas"], 1);
}
