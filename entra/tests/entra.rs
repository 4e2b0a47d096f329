//! Keyless auth against loopback mock servers: a mock Entra ID token endpoint issues short-lived
//! tokens, and the mock LLM server accepts them only until they expire.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{Captured, chat, stack};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_lb::auth::{Credential, TokenCache, TokenSource};
use tower_llm_lb::client::http_client;
use tower_llm_lb::error::TokenUnavailable;
use tower_llm_lb::error::find;
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_entra::{AzureCli, ChainSource, ClientCredentials, ManagedIdentity, TokenClient};
use tower_llm_lb_mock::{MockServer, MockTokenServer};

const SECRET: &str = "client-secret-value~42";

fn loopback() -> TokenClient {
    TokenClient::new(http_client().map_err(BoxError::from))
}

async fn setup(lifetime: Duration) -> (MockTokenServer, MockServer, ClientCredentials) {
    let tokens = MockTokenServer::start("app-1", SECRET, "id-header", lifetime)
        .await
        .unwrap();
    let llm = MockServer::builder().entra(&tokens).start().await.unwrap();
    let source = ClientCredentials::new("tenant-1", "app-1", SECRET)
        .unwrap()
        .authority(&tokens.url())
        .client(loopback());
    (tokens, llm, source)
}

fn backend(llm: &MockServer, credential: Credential) -> Backend {
    Backend::azure("east", llm.url(), "gpt-4o", "2024-10-21")
        .credential(credential)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_requests_cause_one_token_fetch() {
    let (tokens, llm, source) = setup(Duration::from_secs(3600)).await;
    let svc = stack(&backend(&llm, Credential::token_source(source)));
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(svc.clone().oneshot(chat("{}"))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(tokens.fetches(), 1);
    assert_eq!(llm.counters().ok, 1000);
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_ahead_of_expiry_and_an_expired_one_is_never_sent() {
    let (tokens, llm, source) = setup(Duration::from_secs(600)).await;
    let svc = stack(&backend(&llm, Credential::token_source(source)));
    // Requests every 30 s for 40 minutes: four token lifetimes.
    for _ in 0..80 {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    assert_eq!(
        llm.counters().unauthorized,
        0,
        "no request carried an expired token"
    );
    // Refreshed at half-life (300 s ahead of a 600 s token): about one fetch per 300 s.
    let f = tokens.fetches();
    assert!((8..=10).contains(&f), "{f} fetches in 2400 s");
}

#[tokio::test(start_paused = true)]
async fn token_endpoint_down_with_a_valid_cached_token_keeps_requests_working() {
    let (tokens, llm, source) = setup(Duration::from_secs(3600)).await;
    let svc = stack(&backend(&llm, Credential::token_source(source)));
    assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    tokens.set_failing(true);
    // Into the refresh window (last 5 minutes), with the endpoint down.
    tokio::time::sleep(Duration::from_secs(3600 - 200)).await;
    for _ in 0..20 {
        assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(llm.counters().unauthorized, 0);
    // Past expiry with the endpoint still down: a typed error naming the source, nothing sent.
    tokio::time::sleep(Duration::from_secs(200)).await;
    let sent = llm.counters().requests;
    let err = svc.clone().oneshot(chat("{}")).await.unwrap_err();
    let t = find::<TokenUnavailable>(&*err).expect("typed");
    assert_eq!(&*t.source_name, "client-credentials(tenant-1)");
    assert!(t.to_string().contains("503"), "{t}");
    assert!(!err.to_string().contains(SECRET));
    assert_eq!(llm.counters().requests, sent);
    // The endpoint recovers: requests work again after the backoff.
    tokens.set_failing(false);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(svc.oneshot(chat("{}")).await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn one_source_serves_many_backends_of_a_tenant() {
    let (tokens, llm, source) = setup(Duration::from_secs(3600)).await;
    let other = MockServer::builder().entra(&tokens).start().await.unwrap();
    let cache = TokenCache::new(Arc::new(source));
    let a = stack(&backend(&llm, Credential::token_cache(cache.clone())));
    let b = stack(
        &Backend::azure("west", other.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::token_cache(cache))
            .build()
            .unwrap(),
    );
    for _ in 0..5 {
        assert_eq!(a.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
        assert_eq!(b.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    }
    assert_eq!(tokens.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn managed_identity_imds_retries_throttling_and_app_service_works() {
    let tokens = MockTokenServer::start("app-1", SECRET, "id-header", Duration::from_secs(3600))
        .await
        .unwrap();
    let llm = MockServer::builder().entra(&tokens).start().await.unwrap();
    tokens.throttle_imds(2);
    let imds = ManagedIdentity::imds()
        .endpoint(&format!("{}/metadata/identity/oauth2/token", tokens.url()))
        .client(loopback());
    let token = imds.fetch().await.unwrap();
    assert!(token.expires_at() > Instant::now() + Duration::from_secs(3500));
    assert_eq!(tokens.fetches(), 3, "two 429s retried with backoff");
    let app = ManagedIdentity::app_service(&format!("{}/msi/token", tokens.url()), "id-header")
        .unwrap()
        .client(loopback())
        .wall_clock(tokens.wall_clock());
    let svc = stack(&backend(&llm, Credential::token_source(app)));
    assert_eq!(svc.oneshot(chat("{}")).await.unwrap().status(), 200);
    let wrong =
        ManagedIdentity::app_service(&format!("{}/msi/token", tokens.url()), "wrong-header")
            .unwrap()
            .client(loopback());
    let e = wrong.fetch().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "managed-identity(app-service): token endpoint answered 401 (unauthorized)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_chain_falls_through_to_the_first_source_that_answers() {
    let tokens = MockTokenServer::start("app-1", SECRET, "id-header", Duration::from_secs(3600))
        .await
        .unwrap();
    let wrong_secret = ClientCredentials::new("tenant-1", "app-1", "not-the-secret")
        .unwrap()
        .authority(&tokens.url())
        .client(loopback());
    let imds = ManagedIdentity::imds()
        .endpoint(&format!("{}/metadata/identity/oauth2/token", tokens.url()))
        .client(loopback());
    let chain = ChainSource::new(vec![Arc::new(wrong_secret), Arc::new(imds)]);
    chain.fetch().await.unwrap();
    assert_eq!(tokens.fetches(), 2);
    chain.fetch().await.unwrap();
    assert_eq!(
        tokens.fetches(),
        3,
        "the working source is used directly from then on"
    );
    let dead = ChainSource::new(vec![Arc::new(AzureCli::new().program("/nonexistent/az"))]);
    let e = dead.fetch().await.unwrap_err().to_string();
    assert!(
        e.starts_with("chain: azure-cli: could not run /nonexistent/az"),
        "{e}"
    );
}

#[tokio::test]
async fn the_azure_cli_source_reads_az_output() {
    let dir = std::env::temp_dir().join(format!("tower-llm-lb-az-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("az");
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho '{{\"accessToken\":\"cli-token\",\"expires_on\":{expires},\"tokenType\":\"Bearer\"}}'\n"),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let token = AzureCli::new()
        .program(script.to_str().unwrap())
        .fetch()
        .await
        .unwrap();
    assert!(token.expires_at() > Instant::now() + Duration::from_secs(3000));
    let fail = dir.join("az-fail");
    std::fs::write(&fail, "#!/bin/sh\nexit 1\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fail, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let e = AzureCli::new()
        .program(fail.to_str().unwrap())
        .fetch()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("run `az login`?"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn secrets_and_tokens_never_appear_in_logs() {
    let captured = Captured::default();
    let _guard = captured.install();
    let (tokens, llm, source) = setup(Duration::from_secs(600)).await;
    tracing::info!(?source, "source");
    let svc = stack(&backend(&llm, Credential::token_source(source)));
    svc.clone().oneshot(chat("{}")).await.unwrap();
    tokens.set_failing(true);
    tokio::time::sleep(Duration::from_secs(601)).await;
    let _ = svc.oneshot(chat("{}")).await;
    let logs = captured.text();
    assert!(logs.contains("token fetch failed"), "{logs}");
    assert!(!logs.contains(SECRET), "client secret leaked");
    assert!(!logs.contains("mock-token-"), "token leaked");
}

/// A stand-in for an `azure_identity` credential (same trait), counting its calls.
#[derive(Debug, Default)]
struct SdkCredential {
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for SdkCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        assert_eq!(scopes, ["https://cognitiveservices.azure.com/.default"]);
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let expires = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        Ok(azure_core::credentials::AccessToken::new(
            "sdk-token",
            expires,
        ))
    }
}

#[tokio::test]
async fn an_azure_sdk_credential_plugs_in_as_a_token_source() {
    use tower_llm_lb_entra::AzureSdkCredential;
    let llm = MockServer::builder()
        .bearer("sdk-token")
        .start()
        .await
        .unwrap();
    let sdk = Arc::new(SdkCredential::default());
    let svc = stack(&backend(
        &llm,
        Credential::token_source(AzureSdkCredential::new(sdk.clone())),
    ));
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(chat("{}"))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(sdk.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_revoked_token_is_replaced_after_one_401_and_the_request_still_succeeds() {
    let (tokens, llm, source) = setup(Duration::from_secs(3600)).await;
    let backend = backend(&llm, Credential::token_source(source));
    let svc = tower_llm_lb::stack::group(
        "east",
        [backend.clone()],
        http_client(),
        &tower_llm_lb::stack::Settings::default(),
    )
    .unwrap();
    assert_eq!(svc.clone().oneshot(chat("{}")).await.unwrap().status(), 200);
    assert_eq!(tokens.fetches(), 1);
    // The token is revoked before it expires: the backend answers 401 to it.
    tokens.registry().revoke_all();
    let res = svc.clone().oneshot(chat("{}")).await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "a new token, and the request goes through"
    );
    assert_eq!(tokens.fetches(), 2, "one refresh forced by the 401");
    assert_eq!(llm.counters().unauthorized, 1);
    assert!(
        backend.state().snapshot().unavailable_until.is_none(),
        "a token credential is not taken out on its first 401"
    );
}
