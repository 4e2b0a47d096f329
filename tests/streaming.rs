//! Streamed (SSE) answers flow through the stack chunk by chunk, never buffered.

mod common;

use common::{chat, stack};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_llm_lb::Backend;
use tower_llm_lb_mock::{Fault, MockServer};

/// A mock streaming 5 chunks with `fault`, and an OpenAI backend named `name` on it.
async fn faulty_stream(name: &str, fault: Fault) -> (MockServer, Backend) {
    let mock = MockServer::builder()
        .stream_chunks(5)
        .start()
        .await
        .unwrap();
    mock.set_fault(Some(fault));
    let backend = Backend::openai(name, format!("{}/v1", mock.url()))
        .build()
        .unwrap();
    (mock, backend)
}

#[tokio::test]
async fn first_chunk_arrives_before_the_server_sends_the_last() {
    let mock = MockServer::builder()
        .stream_chunks(4)
        .gated_stream()
        .start()
        .await
        .unwrap();
    let backend = Backend::openai("o", format!("{}/v1", mock.url()))
        .build()
        .unwrap();
    let res = stack(&backend)
        .oneshot(chat(r#"{"model":"gpt-4o","stream":true}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    // The server is holding the rest: only one chunk has left it.
    assert_eq!(mock.counters().streamed_chunks, 1);
    // A stream being read is still in flight on its backend (so least-loaded picks see it).
    assert_eq!(backend.state().snapshot().in_flight, 1);
    mock.release_chunks(3);
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        rest.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert_eq!(rest.matches("data: {").count(), 3);
    assert!(rest.ends_with("data: [DONE]\n\n"));
    assert_eq!(mock.counters().streamed_chunks, 4);
    assert_eq!(
        backend.state().snapshot().in_flight,
        0,
        "read to the end: no longer in flight"
    );
}

#[tokio::test]
async fn a_stream_cut_upstream_ends_in_an_error_not_a_clean_end() {
    let (_mock, backend) = faulty_stream("o", Fault::TruncateStream(2)).await;
    let res = stack(&backend)
        .oneshot(chat(r#"{"stream":true}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let err = res
        .into_body()
        .collect()
        .await
        .expect_err("a truncated stream must not end cleanly");
    let text = err.to_string();
    assert!(
        text.starts_with("backend o: answer interrupted"),
        "names the backend and what happened: {text}"
    );
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_without_done_is_still_an_error() {
    use tower_llm_lb::error::StreamInterrupted;
    let (mock, backend) = faulty_stream("o", Fault::EndStreamEarly(2)).await;
    let res = stack(&backend)
        .oneshot(chat(r#"{"stream":true}"#))
        .await
        .unwrap();
    let err = res
        .into_body()
        .collect()
        .await
        .expect_err("no [DONE]: not a complete answer");
    let typed = err.downcast_ref::<StreamInterrupted>().expect("typed");
    assert_eq!(typed.backend.as_deref(), Some("o"));
    assert_eq!(
        err.to_string(),
        "backend o: streamed answer ended without its end marker"
    );
    // A complete stream still ends cleanly.
    mock.set_fault(None);
    let res = stack(&backend)
        .oneshot(chat(r#"{"stream":true}"#))
        .await
        .unwrap();
    assert!(res.into_body().collect().await.is_ok());
}

#[tokio::test]
async fn a_broken_stream_names_its_backend() {
    use tower_llm_lb::error::StreamInterrupted;
    let (_mock, backend) = faulty_stream("west", Fault::TruncateStream(2)).await;
    let res = stack(&backend)
        .oneshot(chat(r#"{"stream":true}"#))
        .await
        .unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    let typed = err.downcast_ref::<StreamInterrupted>().expect("typed");
    assert_eq!(typed.backend.as_deref(), Some("west"));
    assert!(
        err.to_string()
            .starts_with("backend west: answer interrupted: "),
        "{err}"
    );
}
