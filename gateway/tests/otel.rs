//! OpenTelemetry traces (feature `otel`) from the real binary to an OTLP/gRPC receiver started
//! here: the caller's `traceparent` continued, the span's context passed to the backend, and
//! the GenAI attributes on the span.
#![cfg(feature = "otel")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tower::ServiceExt;
use tower_llm_lb_mock::MockServer;

/// What the receiver was sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = req
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

#[tokio::test]
async fn a_request_is_one_span_continuing_the_callers_trace_and_passed_to_the_backend() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    let mock = MockServer::builder()
        .name("east")
        .bearer("k1")
        .start()
        .await
        .unwrap();
    let path = common::write(
        "otel.json",
        &format!(
            r#"{{"backends":{{"east":{{"provider":"openai","url":"{}/v1","api_key":"k1"}}}}}}"#,
            mock.url()
        ),
    );
    let (mut child, url) = tokio::task::spawn_blocking(move || {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tower-llm-lb"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        common::first_url(child)
    })
    .await
    .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = http::Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let res = tower_llm_lb::client::http_client()
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();

    // The backend got the trace, with the gateway's span as the parent.
    let sent = mock.requests()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(sent.starts_with(&format!("00-{trace_id}-")), "{sent}");
    assert!(
        !sent.contains("00f067aa0ba902b7"),
        "the caller's span id passed on: {sent}"
    );

    // The request's span (kind server) and its attempt's (kind client, its child).
    let spans = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let spans = receiver.0.lock().unwrap().clone();
            if spans.len() >= 2 {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no spans exported");
    let server = opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32;
    let span = spans.iter().find(|s| s.kind == server).unwrap().clone();
    let attempt = spans.iter().find(|s| s.kind != server).unwrap().clone();
    child.kill().unwrap();

    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(sent, format!("00-{trace_id}-{}-01", hex(&span.span_id)));
    assert_eq!(span.name, "chat gpt-4o");
    let s = |v: &str| Some(Value::StringValue(v.to_string()));
    assert_eq!(attribute(&span, "gen_ai.operation.name"), s("chat"));
    assert_eq!(attribute(&span, "gen_ai.request.model"), s("gpt-4o"));
    assert_eq!(attribute(&span, "gen_ai.provider.name"), s("openai"));
    assert_eq!(attribute(&span, "llm_lb.backend"), s("east"));
    assert_eq!(attribute(&span, "server.address"), s("127.0.0.1"));
    assert_eq!(
        attribute(&span, "http.response.status_code"),
        Some(Value::IntValue(200))
    );
    assert_eq!(
        attribute(&span, "llm_lb.attempts"),
        Some(Value::IntValue(1))
    );
    assert!(matches!(
        attribute(&span, "gen_ai.usage.input_tokens"),
        Some(Value::IntValue(n)) if n > 0
    ));
    assert_eq!(spans.len(), 2, "one attempt: {spans:?}");
    assert_eq!(attempt.parent_span_id, span.span_id);
    assert_eq!(attempt.trace_id, span.trace_id);
    assert_eq!(attempt.name, "chat gpt-4o");
    assert_eq!(attribute(&attempt, "llm_lb.backend"), s("east"));
    assert_eq!(attribute(&attempt, "llm_lb.outcome"), s("success"));
    assert!(
        attempt.start_time_unix_nano >= span.start_time_unix_nano
            && attempt.end_time_unix_nano <= span.end_time_unix_nano,
        "the attempt lies within the request"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
