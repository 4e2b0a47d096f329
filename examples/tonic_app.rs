//! A tonic server whose handler calls LLM backends through the stack: a gRPC `ask.Ask/Ask`
//! service (messages and service written by hand, as `tonic-build` would generate them) asks a
//! chat model through one shared `LlmService` spread over two rate-limited mock backends, and
//! maps what the stack says to gRPC: a throttled answer becomes `RESOURCE_EXHAUSTED` with
//! `grpc-retry-pushback-ms`, a failure `UNAVAILABLE`. A tonic client then calls it.
//!
//! Two rounds of ten calls: with the default settings every call is answered (the stack waits
//! in line for room within its 10 s budget); then with no wait budget (for callers that retry
//! by themselves), the calls that find both backends throttled get `RESOURCE_EXHAUSTED` with
//! the pushback at once.
//!
//! Run: `cargo run --example tonic_app`

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};
use tower_llm_lb::auth::Credential;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::{grpc_client, http_client};
use tower_llm_lb::endpoint::Served;
use tower_llm_lb::stack::{self, LlmService, Settings};
use tower_llm_lb::{Backend, BoxError};
use tower_llm_lb_mock::MockServer;

/// `message AskRequest { string question = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct AskRequest {
    #[prost(string, tag = "1")]
    question: String,
}

/// `message AskReply { string answer = 1; string backend = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
struct AskReply {
    #[prost(string, tag = "1")]
    answer: String,
    #[prost(string, tag = "2")]
    backend: String,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `service Ask { rpc Ask(AskRequest) returns (AskReply); }`, over the LLM stack.
#[derive(Clone)]
struct AskServer {
    llm: LlmService,
}

impl tonic::server::NamedService for AskServer {
    const NAME: &'static str = "ask.Ask";
}

impl Service<http::Request<tonic::body::Body>> for AskServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let llm = self.llm.clone();
        Box::pin(async move {
            if req.uri().path() != "/ask.Ask/Ask" {
                return Ok(tonic::Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(AskMethod(llm), req).await)
        })
    }
}

struct AskMethod(LlmService);

impl tonic::server::UnaryService<AskRequest> for AskMethod {
    type Response = AskReply;
    type Future = BoxFuture<Result<tonic::Response<AskReply>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<AskRequest>) -> Self::Future {
        let llm = self.0.clone();
        Box::pin(async move { ask(llm, &req.get_ref().question).await })
    }
}

/// The handler: one chat call through the stack, its outcome in gRPC terms.
async fn ask(llm: LlmService, question: &str) -> Result<tonic::Response<AskReply>, tonic::Status> {
    let body = serde_json::json!({"messages": [{"role": "user", "content": question}]});
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(body.to_string()))
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let res = llm.oneshot(req).await.map_err(|e| {
        // Nothing was free and no wait fitted the budget: the stack says when something is.
        use tower_llm_lb::error::{Exhausted, Unavailable, find};
        let retry_at = find::<Exhausted>(&*e)
            .map(|x| x.earliest)
            .or_else(|| find::<Unavailable>(&*e).map(|u| u.earliest));
        match retry_at.flatten() {
            Some(at) => {
                let ms = at
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_millis()
                    .max(1) as u64;
                let mut status = tonic::Status::resource_exhausted(e.to_string());
                status
                    .metadata_mut()
                    .insert("grpc-retry-pushback-ms", ms.to_string().parse().unwrap());
                status
            }
            None => tonic::Status::unavailable(e.to_string()),
        }
    })?;
    if res.status() == http::StatusCode::TOO_MANY_REQUESTS {
        // Every backend is busy: tell the gRPC caller when to come back, in its own terms.
        let wait = res.headers().get("retry-after-ms").cloned();
        let mut status = tonic::Status::resource_exhausted("every backend is throttled");
        if let Some(ms) = wait {
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                ms.to_str().unwrap_or("500").parse().unwrap(),
            );
        }
        return Err(status);
    }
    if !res.status().is_success() {
        return Err(tonic::Status::unavailable(format!(
            "model answered {}",
            res.status()
        )));
    }
    let backend = res
        .extensions()
        .get::<Served>()
        .map(|s| s.backend.name().to_string())
        .unwrap_or_default();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?
        .to_bytes();
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let answer = json["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok(tonic::Response::new(AskReply { answer, backend }))
}

/// What one gRPC call got: the backend that answered, or the status code and its pushback.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))] // read by the test
enum Call {
    Answered(String),
    Refused(tonic::Code, Option<u64>),
}

/// Runs both rounds; what each call got, round by round.
async fn run() -> Result<[Vec<Call>; 2], BoxError> {
    let patient = Settings::default();
    let impatient = Settings {
        retry: tower_llm_lb::retry::RetryAfter429Layer {
            max_wait: std::time::Duration::ZERO,
            ..Default::default()
        },
        ..Settings::default()
    };
    Ok([round(&patient).await?, round(&impatient).await?])
}

/// Ten calls through a tonic server over a stack built with `settings`.
async fn round(settings: &Settings) -> Result<Vec<Call>, BoxError> {
    // Two LLM backends of 3 requests a second each.
    let mut mocks = Vec::new();
    let mut backends = Vec::new();
    for name in ["eastus", "westus"] {
        let mock = MockServer::builder()
            .name(name)
            .api_key(format!("key-{name}"))
            .rps(3.0)
            .azure_headers()
            .start()
            .await?;
        backends.push(
            Backend::azure(name, mock.url(), "gpt-4o", "2024-10-21")
                .credential(Credential::api_key(&format!("key-{name}"))?)
                .build()?,
        );
        mocks.push(mock);
    }
    let llm = stack::group("chat", backends, http_client(), settings)?;

    // The tonic server, on a free port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AskServer { llm })
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    // A tonic client over a plain HTTP/2 client.
    let origin: http::Uri = format!("http://{addr}").parse()?;
    let mut client = tonic::client::Grpc::with_origin(grpc_client::<tonic::body::Body>(), origin);
    let mut calls = Vec::new();
    for i in 0..10 {
        client.ready().await?;
        let res: Result<tonic::Response<AskReply>, _> = client
            .unary(
                tonic::Request::new(AskRequest {
                    question: format!("question {i}"),
                }),
                PathAndQuery::from_static("/ask.Ask/Ask"),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        match res {
            Ok(reply) => {
                let reply = reply.into_inner();
                println!("call {i}: {} answered {:?}", reply.backend, reply.answer);
                calls.push(Call::Answered(reply.backend));
            }
            Err(status) => {
                let pushback = status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                println!(
                    "call {i}: {:?} {} (pushback {pushback:?} ms)",
                    status.code(),
                    status.message()
                );
                calls.push(Call::Refused(status.code(), pushback));
            }
        }
    }
    for m in &mocks {
        let c = m.counters();
        println!(
            "{}: {} requests, {} ok, {} answered 429",
            m.name(),
            c.requests,
            c.ok,
            c.throttled
        );
    }
    let _ = stop.send(());
    server.await??;
    for m in &mocks {
        assert!(
            m.request_during_retry_after().is_none(),
            "no backend is sent a request while its 429 asks to wait"
        );
    }
    Ok(calls)
}

#[cfg_attr(test, allow(dead_code))]
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    run().await.map(|_| ())
}

#[cfg(test)]
#[tokio::test(start_paused = true)]
async fn the_example_runs() {
    let [patient, impatient] = run().await.unwrap();
    // Waiting in line: every call answered, by both backends.
    assert!(
        patient.iter().all(|c| matches!(c, Call::Answered(_))),
        "{patient:?}"
    );
    for name in ["eastus", "westus"] {
        assert!(
            patient
                .iter()
                .any(|c| matches!(c, Call::Answered(b) if b == name)),
            "{patient:?}"
        );
    }
    // No wait budget: the calls that find both throttled get RESOURCE_EXHAUSTED with a
    // pushback (never 0), the others an answer.
    let refused: Vec<_> = impatient
        .iter()
        .filter_map(|c| match c {
            Call::Refused(code, pushback) => Some((*code, *pushback)),
            Call::Answered(_) => None,
        })
        .collect();
    assert!(!refused.is_empty(), "{impatient:?}");
    assert!(
        refused.iter().all(
            |(code, ms)| *code == tonic::Code::ResourceExhausted && ms.is_some_and(|ms| ms > 0)
        ),
        "{impatient:?}"
    );
    assert!(
        impatient.iter().any(|c| matches!(c, Call::Answered(_))),
        "{impatient:?}"
    );
}
