//! AuthInject against real loopback mock servers: each credential kind reaches its backend, and no
//! caller's or other backend's key ever does.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::{Captured, body_string, chat, stack};
use tower::ServiceExt;
use tower_llm_lb::auth::{BoxFuture, Credential, Token, TokenSource};
use tower_llm_lb::endpoint::Served;
use tower_llm_lb::error::TokenUnavailable;
use tower_llm_lb::error::{BackendError, find};
use tower_llm_lb::{Backend, BoxError, Outcome};
use tower_llm_lb_mock::MockServer;

#[tokio::test]
async fn azure_api_key_reaches_the_deployment_route() {
    let mock = MockServer::builder()
        .api_key("azure-key-1")
        .start()
        .await
        .unwrap();
    let backend = Backend::azure("east", mock.url(), "gpt-4o", "2024-10-21")
        .credential(Credential::api_key("azure-key-1").unwrap())
        .build()
        .unwrap();
    let res = stack(&backend)
        .oneshot(chat(r#"{"messages":[]}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = &mock.requests()[0];
    assert_eq!(
        seen.path_and_query,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen.headers["api-key"], "azure-key-1");
    assert_eq!(seen.headers["host"], mock.addr().to_string().as_str());
    assert!(body_string(res).await.contains("\"model\":\"gpt-4o\""));
}

#[tokio::test]
async fn openai_bearer_and_anthropic_x_api_key_reach_their_backends() {
    let openai = MockServer::builder()
        .bearer("sk-openai")
        .start()
        .await
        .unwrap();
    let anthropic = MockServer::builder()
        .x_api_key("sk-ant")
        .start()
        .await
        .unwrap();
    let o = Backend::openai("openai", format!("{}/v1", openai.url()))
        .credential(Credential::bearer("sk-openai").unwrap())
        .build()
        .unwrap();
    let a = Backend::anthropic("claude", anthropic.url())
        .credential(Credential::x_api_key("sk-ant").unwrap())
        .build()
        .unwrap();
    let res = stack(&o)
        .oneshot(chat(r#"{"model":"gpt-4o"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(openai.requests()[0].path_and_query, "/v1/chat/completions");
    let req = http::Request::post("/v1/messages")
        .body(
            r#"{"model":"claude-sonnet","max_tokens":10,"messages":[{"role":"user","content":"Hi"}]}"#
                .into(),
        )
        .unwrap();
    let res = stack(&a).oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = &anthropic.requests()[0];
    assert_eq!(seen.headers["x-api-key"], "sk-ant");
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert_eq!(openai.counters().foreign_credentials, 0);
    assert_eq!(anthropic.counters().foreign_credentials, 0);
}

#[tokio::test]
async fn caller_credentials_never_reach_the_backend() {
    let mock = MockServer::builder()
        .api_key("backend-key")
        .start()
        .await
        .unwrap();
    let backend = Backend::azure("east", mock.url(), "gpt-4o", "2024-10-21")
        .credential(Credential::api_key("backend-key").unwrap())
        .build()
        .unwrap();
    let mut req = chat("{}");
    let h = req.headers_mut();
    h.insert("authorization", "Bearer callers-own".parse().unwrap());
    h.insert("api-key", "callers-api-key".parse().unwrap());
    h.insert("x-api-key", "callers-x-key".parse().unwrap());
    h.insert("cookie", "session=abc".parse().unwrap());
    let res = stack(&backend).oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = &mock.requests()[0].headers;
    assert_eq!(seen.get_all("api-key").iter().count(), 1);
    assert_eq!(seen["api-key"], "backend-key");
    for leaked in ["authorization", "x-api-key", "cookie"] {
        assert!(seen.get(leaked).is_none(), "{leaked} leaked");
    }
    assert_eq!(mock.counters().foreign_credentials, 0);
}

#[tokio::test]
async fn one_backends_key_never_reaches_another() {
    let a = MockServer::builder()
        .api_key("key-a")
        .start()
        .await
        .unwrap();
    let b = MockServer::builder()
        .api_key("key-b")
        .start()
        .await
        .unwrap();
    let ba = Backend::azure("a", a.url(), "d", "2024-10-21")
        .credential(Credential::api_key("key-a").unwrap())
        .build()
        .unwrap();
    let bb = Backend::azure("b", b.url(), "d", "2024-10-21")
        .credential(Credential::api_key("key-b").unwrap())
        .build()
        .unwrap();
    let (sa, sb) = (stack(&ba), stack(&bb));
    for _ in 0..3 {
        // The same request object shape goes to both: each gets its own key only.
        assert_eq!(sa.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
        assert_eq!(sb.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    }
    assert!(a.requests().iter().all(|r| r.headers["api-key"] == "key-a"));
    assert!(b.requests().iter().all(|r| r.headers["api-key"] == "key-b"));
    assert_eq!(a.counters().ok + b.counters().ok, 6);
}

#[tokio::test]
async fn a_wrong_key_is_caught_by_the_backend() {
    let mock = MockServer::builder()
        .api_key("right")
        .start()
        .await
        .unwrap();
    let backend = Backend::azure("east", mock.url(), "d", "2024-10-21")
        .credential(Credential::api_key("wrong").unwrap())
        .build()
        .unwrap();
    let res = stack(&backend).oneshot(chat("{}")).await.unwrap();
    assert_eq!(res.status(), 401);
    // Our key, not the caller's: the backend is broken for us, not the request.
    assert_eq!(
        res.extensions().get::<Served>().unwrap().outcome,
        Outcome::CredentialRejected {
            status: http::StatusCode::UNAUTHORIZED
        }
    );
    assert_eq!(mock.counters().unauthorized, 1);
    assert!(
        backend.state().snapshot().unavailable_until.is_some(),
        "taken out of rotation"
    );
}

struct Issuer {
    fetches: AtomicUsize,
    fail: std::sync::atomic::AtomicBool,
}

impl TokenSource for Issuer {
    fn name(&self) -> &str {
        "test-issuer"
    }
    fn fetch(&self) -> BoxFuture<'_, Result<Token, BoxError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, SeqCst);
            tokio::task::yield_now().await;
            if self.fail.load(SeqCst) {
                return Err("issuer down".into());
            }
            Token::bearer("entra-token-1", Duration::from_secs(3600))
        })
    }
}

#[tokio::test]
async fn token_source_serves_many_concurrent_requests_with_one_fetch() {
    let mock = MockServer::builder()
        .bearer("entra-token-1")
        .start()
        .await
        .unwrap();
    let issuer = Arc::new(Issuer {
        fetches: AtomicUsize::new(0),
        fail: false.into(),
    });
    let cache = tower_llm_lb::auth::TokenCache::new(issuer.clone());
    let backend = Backend::azure("east", mock.url(), "d", "2024-10-21")
        .credential(Credential::token_cache(cache))
        .build()
        .unwrap();
    let svc = stack(&backend);
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(chat("{}"))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(issuer.fetches.load(SeqCst), 1);
    assert_eq!(mock.counters().ok, 100);
}

#[tokio::test]
async fn failing_token_source_is_a_typed_error_and_nothing_is_sent() {
    let mock = MockServer::builder()
        .bearer("entra-token-1")
        .start()
        .await
        .unwrap();
    let issuer = Issuer {
        fetches: AtomicUsize::new(0),
        fail: true.into(),
    };
    let backend = Backend::azure("east", mock.url(), "d", "2024-10-21")
        .credential(Credential::token_source(issuer))
        .build()
        .unwrap();
    let err = stack(&backend).oneshot(chat("{}")).await.unwrap_err();
    let typed = find::<TokenUnavailable>(&*err).expect("typed error");
    assert_eq!(&*typed.source_name, "test-issuer");
    assert_eq!(typed.to_string(), "no token from test-issuer: issuer down");
    let backend_err = err
        .downcast_ref::<BackendError>()
        .expect("names the backend");
    assert_eq!(&*backend_err.backend, "east");
    assert_eq!(backend_err.outcome, Outcome::Unavailable { retry_at: None });
    assert_eq!(mock.counters().requests, 0);
}

#[tokio::test]
async fn secrets_never_appear_in_logs_or_debug_output() {
    let captured = Captured::default();
    let _guard = captured.install();

    let mock = MockServer::builder()
        .api_key("sk-topsecret-42")
        .start()
        .await
        .unwrap();
    let backend = Backend::azure("east", mock.url(), "d", "2024-10-21")
        .credential(Credential::api_key("sk-topsecret-42").unwrap())
        .build()
        .unwrap();
    let svc = stack(&backend);
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    tracing::info!(?res, ?backend, ?svc, "response");
    mock.set_fault(Some(tower_llm_lb_mock::Fault::QuotaExhausted));
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    tracing::info!(?res, "second");
    let logs = captured.text();
    assert!(
        logs.contains("quota exhausted"),
        "expected the quota warning in: {logs}"
    );
    assert!(!logs.contains("sk-topsecret-42"), "secret leaked into logs");
    assert!(!format!("{backend:?} {svc:?}").contains("topsecret"));
}
