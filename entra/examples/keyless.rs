//! Keyless Azure OpenAI over several regions: one Entra ID identity (a service principal) gives
//! one bearer token, cached and refreshed ahead of expiry, shared by every regional backend.
//!
//! Runs against an embedded mock token endpoint and mock regions (no credentials needed); for
//! real use, drop `.authority(..)` and `.client(..)` and give your tenant, client id and secret.
//!
//! Run: `cargo run -p tower-llm-lb-entra --example keyless`

use std::sync::Arc;
use std::time::Duration;

use tower::ServiceExt;
use tower_llm_lb::auth::{Credential, TokenCache};
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::endpoint::Served;
use tower_llm_lb::stack::{self, Settings};
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_entra::{ClientCredentials, TokenClient};
use tower_llm_lb_mock::{MockServer, MockTokenServer};

async fn run() -> Result<(), BoxError> {
    let tokens =
        MockTokenServer::start("app-id", "app-secret", "-", Duration::from_secs(3600)).await?;
    let mut regions = Vec::new();
    for name in ["eastus", "westus", "swedencentral"] {
        regions.push(
            MockServer::builder()
                .name(name)
                .entra(&tokens)
                .start()
                .await?,
        );
    }

    let identity = ClientCredentials::new("my-tenant", "app-id", "app-secret")?
        .authority(&tokens.url()) // the mock; by default login.microsoftonline.com
        .client(TokenClient::new(http_client().map_err(BoxError::from)));
    let token = TokenCache::new(Arc::new(identity)); // one token for every region
    let backends = regions.iter().map(|m| {
        Backend::azure(m.name(), m.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::token_cache(token.clone()))
            .build()
    });
    let backends = backends.collect::<Result<Vec<_>, _>>()?;
    let llm = stack::group("gpt-4o", backends, http_client(), &Settings::default())?;

    for _ in 0..6 {
        let req = http::Request::post("/v1/chat/completions").body(ReplayBody::from("{}"))?;
        let res = llm.clone().oneshot(req).await?;
        let region = res
            .extensions()
            .get::<Served>()
            .map(|s| s.backend.name().to_string());
        println!("{} from {}", res.status(), region.unwrap_or_default());
    }
    println!(
        "token fetches: {} (one identity, one token, every region)",
        tokens.fetches()
    );
    Ok(())
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await
}

#[cfg(test)]
#[tokio::test(start_paused = true)]
async fn the_example_runs() {
    run().await.unwrap();
}
