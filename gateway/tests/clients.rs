//! Hostile and careless clients against the real binary: each test below held a connection (or
//! a stream, or a backend's attempt) open indefinitely before the gateway had client limits.
//! The limits here are set short so the tests are quick; the defaults are 30 s.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_llm_lb_mock::MockServer;

use common::serve_over;

/// How long any test here waits for the gateway before calling it stuck.
const STUCK: Duration = Duration::from_secs(20);

/// The `host:port` of a base URL.
fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (a reset counts); what was read.
async fn until_closed(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(STUCK, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway kept the connection open");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_client_dripping_its_request_head_is_cut_off() {
    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let (mut child, url) =
        serve_over("drip.json", &mock, r#"{"client_header_timeout_ms":300}"#).await;
    let tcp = TcpStream::connect(addr(&url)).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // One header byte every 50 ms, for as long as the gateway listens (at most STUCK).
    let drip = tokio::spawn(async move {
        wr.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-drip: ")
            .await
            .unwrap();
        let mut sent = 0;
        while sent < 400 && wr.write_all(b"a").await.is_ok() {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    });
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(STUCK, rd.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the gateway kept reading a dripped head");
    let sent = drip.await.unwrap();
    assert!(sent < 400, "the whole drip went through: {sent} bytes");
    assert_eq!(mock.counters().requests, 0, "nothing reached the backend");
    child.kill().unwrap();
}

#[tokio::test]
async fn a_stalled_request_body_is_answered_408_and_the_connection_closed() {
    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let (mut child, url) =
        serve_over("stall.json", &mock, r#"{"client_body_timeout_ms":300}"#).await;
    let mut tcp = TcpStream::connect(addr(&url)).await.unwrap();
    // Announces 100 bytes and sends one.
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let answer = until_closed(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    assert_eq!(mock.counters().requests, 0, "nothing reached the backend");
    child.kill().unwrap();
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let (mut child, url) =
        serve_over("idle.json", &mock, r#"{"client_header_timeout_ms":300}"#).await;
    let tcp = TcpStream::connect(addr(&url)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "gw")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    // The connection is kept alive for a next request, and closed by the gateway when none comes.
    let ended = tokio::time::timeout(STUCK, conn).await;
    assert!(ended.is_ok(), "the idle connection stayed open");
    child.kill().unwrap();
}

/// The process's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn connections_past_the_limit_wait_in_the_queue_and_are_served_as_others_close() {
    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let (mut child, url) = serve_over(
        "limit.json",
        &mock,
        r#"{"max_connections":20,"client_header_timeout_ms":500}"#,
    )
    .await;
    let before = open_fds(child.id());
    // 100 clients connect and send nothing.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(addr(&url)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = open_fds(child.id());
    assert!(
        during <= before + 20,
        "{during} descriptors open with 100 idle clients (was {before}, limit 20)"
    );
    // A real request queued behind them is served once the idle ones are closed.
    let res = tokio::time::timeout(
        STUCK,
        reqwest_like_post(&url, r#"{"model":"gpt-4o","messages":[]}"#),
    )
    .await
    .expect("the queued request was never served");
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    drop(idle);
    child.kill().unwrap();
}

/// A chat request on a new connection, written by hand; the whole answer.
async fn reqwest_like_post(url: &str, body: &str) -> String {
    let mut tcp = TcpStream::connect(addr(url)).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body.as_bytes()).await.unwrap();
    until_closed(&mut tcp).await
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_cancels_the_backend_attempt() {
    let mock = MockServer::builder()
        .bearer("k1")
        .stream_chunks(10_000)
        .chunk_delay(Duration::from_millis(5))
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("gone.json", &mock, "").await;
    let mut tcp = TcpStream::connect(addr(&url)).await.unwrap();
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 512];
    let n = tcp.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(tcp);
    // The backend's stream stops (a chunk every 5 ms while it runs), far short of its end.
    let stopped = settled(&mock, Duration::from_millis(300)).await;
    assert!(
        stopped < 10_000,
        "the whole stream was read: {stopped} chunks"
    );
    child.kill().unwrap();
}

/// The backend's streamed chunks once the count stops moving over `quiet`.
async fn settled(mock: &MockServer, quiet: Duration) -> u64 {
    tokio::time::timeout(STUCK, async {
        let mut last = mock.counters().streamed_chunks;
        loop {
            tokio::time::sleep(quiet).await;
            let now = mock.counters().streamed_chunks;
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
    .expect("the backend's stream never stopped")
}

#[tokio::test]
async fn a_client_reading_a_stream_slowly_holds_the_backend_back_instead_of_filling_memory() {
    let mock = MockServer::builder()
        .bearer("k1")
        .stream_chunks(1_000_000)
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("slow.json", &mock, "").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr(&url).parse().unwrap()).await.unwrap();
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 512];
    let n = tcp.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // The client reads nothing more: once the sockets' buffers are full, the backend's stream
    // stands still (the gateway does not read ahead into memory).
    let settled = settled(&mock, Duration::from_millis(500)).await;
    assert!(
        settled < 1_000_000,
        "the whole stream was read: {settled} chunks"
    );
    child.kill().unwrap();
}

#[tokio::test]
async fn an_http2_client_without_tls_is_served_on_the_direct_path_and_the_router() {
    use http_body_util::BodyExt;
    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let (mut child, url) = serve_over("h2c.json", &mock, "").await;
    let tcp = TcpStream::connect(addr(&url)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // A chat request whose body comes in two DATA frames, without a content-length.
    let frames = [
        &br#"{"model":"gpt-4o","#[..],
        &br#""messages":[{"role":"user","content":"hi"}]}"#[..],
    ]
    .map(|b| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from_static(b)))
    });
    let req = http::Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "h2-1")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "h2-1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("choices"),
        "{body:?}"
    );
    assert_eq!(
        mock.requests()[0].body,
        &br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#[..]
    );
    // A route of the router, on the same connection.
    let health = http::Request::get(format!("{url}/health"))
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let res = send.send_request(health).await.unwrap();
    assert_eq!(res.status(), 200);
    child.kill().unwrap();
}
