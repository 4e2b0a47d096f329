//! The stack mounted straight into an axum app as a route service (no gateway), errors mapped
//! to responses by axum's `HandleErrorLayer` with `gateway::response_for`.

mod common;

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::body::BufferRequestLayer;
use tower_llm_lb::client::http_client;
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb::stack::{self, Settings};
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_gateway::response_for;
use tower_llm_lb_mock::MockServer;

#[tokio::test(start_paused = true)]
async fn the_stack_as_an_axum_route_service_answers_and_maps_its_errors_to_responses() {
    let mock = MockServer::builder()
        .name("only")
        .rps(1.0)
        .azure_headers()
        .start()
        .await
        .unwrap();
    let backend = Backend::azure("only", mock.url(), "gpt-4o", "2024-10-21")
        .build()
        .unwrap();
    let settings = Settings {
        retry: RetryAfter429Layer {
            max_wait: Duration::ZERO,
            ..Default::default()
        },
        ..Settings::default()
    };
    let llm = stack::group("g", [backend], http_client(), &settings).unwrap();
    let route = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|e: BoxError| async move {
            response_for(&e)
        }))
        .layer(BufferRequestLayer::new(1 << 20))
        .service(llm);
    let app = Router::new().route_service("/v1/chat/completions", route);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let ask = || async {
        let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"max_tokens\":5}")))
            .unwrap();
        let res = http_client::<Full<Bytes>>().oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = ask().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    // The quota (1 req/s) is spent and the request may not wait: an OpenAI-shaped 429.
    let mut saw_429 = false;
    for _ in 0..3 {
        let (status, body) = ask().await;
        if status == 429 {
            saw_429 = true;
            assert!(body.contains("\"error\""), "{body}");
        }
    }
    assert!(saw_429);
    server.abort();
}
