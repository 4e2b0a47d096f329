//! An axum app whose own handler calls the LLM through one shared stack kept in its state.
//! Starts two mock backends, serves `GET /summary` on a free port, calls it once and exits.
//!
//! Run: `cargo run --example axum_app`

use axum::extract::State;
use axum::routing::get;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::http_client;
use tower_llm_lb::stack::{self, LlmService, Settings};
use tower_llm_lb::{Backend, BoxError, auth::Credential};
use tower_llm_lb_mock::MockServer;

/// The handler: asks the model, returns its text. The stack is shared by every request.
async fn summary(State(llm): State<LlmService>) -> Result<String, (http::StatusCode, String)> {
    let fail = |e: BoxError| (http::StatusCode::BAD_GATEWAY, e.to_string());
    let req = http::Request::post("/v1/chat/completions")
        .body(ReplayBody::from(
            r#"{"messages":[{"role":"user","content":"summarise the news"}]}"#,
        ))
        .map_err(|e| fail(e.into()))?;
    let res = llm.oneshot(req).await.map_err(fail)?;
    let bytes = res.into_body().collect().await.map_err(fail)?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| fail(e.into()))?;
    Ok(json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Serves the app, calls `GET /summary` once; its status and body.
async fn run() -> Result<(http::StatusCode, String), BoxError> {
    let a = MockServer::builder()
        .name("region-a")
        .api_key("ka")
        .start()
        .await?;
    let b = MockServer::builder()
        .name("region-b")
        .api_key("kb")
        .start()
        .await?;
    let backends = [
        Backend::azure("region-a", a.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("ka")?)
            .build()?,
        Backend::azure("region-b", b.url(), "gpt-4o", "2024-10-21")
            .credential(Credential::api_key("kb")?)
            .build()?,
    ];
    let llm = stack::group("gpt-4o", backends, http_client(), &Settings::default())?;

    let app = axum::Router::new()
        .route("/summary", get(summary))
        .with_state(llm);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let res = http_client::<http_body_util::Empty<bytes::Bytes>>()
        .get(format!("http://{addr}/summary").parse()?)
        .await?;
    let status = res.status();
    let text = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
    println!("GET /summary -> {status} {text}");
    server.abort();
    Ok((status, text))
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await.map(|_| ())
}

#[cfg(test)]
#[tokio::test(start_paused = true)]
async fn the_example_runs() {
    let (status, text) = run().await.unwrap();
    assert_eq!(status, http::StatusCode::OK);
    // The model's text, from one of the two regions.
    assert!(
        text == "Hello from region-a" || text == "Hello from region-b",
        "{text}"
    );
}
