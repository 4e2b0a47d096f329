//! The `tower-llm-lb` binary as a user runs it: help, a bad and a good config, and serving the
//! embedded mock backends on a free port.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{serve_config, serve_over, write};

const BIN: &str = env!("CARGO_BIN_EXE_tower-llm-lb");

/// A JSON chat request to the gateway at `url`.
fn chat_post(url: &str, body: &'static str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap()
}

/// Sends `signal` (`HUP`, `TERM`) to the process.
fn signal(child: &std::process::Child, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal}");
}

#[test]
fn help_succeeds_and_a_bad_config_is_one_line_naming_the_field_with_exit_2() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));

    let bad = write(
        "bad.json",
        r#"{"backends":{"a":{"provider":"azure","deployment":"d","api_key":"sk-cli-secret"}}}"#,
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "backends.a.url: missing");

    let out = Command::new(BIN)
        .args(["serve", "--nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "misuse");
}

#[test]
fn check_prints_the_resolved_backends_without_their_secrets() {
    let good = write(
        "good.json",
        r#"{"backends":{"east":{"provider":"azure","url":"https://east.openai.azure.com","deployment":"gpt-4o","api_key":"sk-cli-secret","models":["gpt-4o"]}}}"#,
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("east") && text.contains("gpt-4o"), "{text}");
    assert!(!text.contains("sk-cli-secret"), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("sk-cli-secret"));
}

#[tokio::test]
async fn serve_mock_answers_on_the_port_it_prints() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--mock",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let req = http::Request::post(format!("{url}/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    use tower::ServiceExt;
    let res = tower_llm_lb::client::http_client().oneshot(req).await;
    child.kill().unwrap();
    let _ = child.wait();
    let res = res.unwrap();
    assert_eq!(res.status(), 200, "served through the embedded backends");
}

/// Which backend answers a chat request now (`x-llm-lb-backend`), or the status.
async fn who_answers(url: &str) -> String {
    use tower::ServiceExt;
    let res = tower_llm_lb::client::http_client()
        .oneshot(chat_post(url, r#"{"model":"gpt-4o","messages":[]}"#))
        .await
        .unwrap();
    match res.headers().get("x-llm-lb-backend") {
        Some(b) if res.status() == 200 => b.to_str().unwrap().to_string(),
        _ => format!("status {}", res.status()),
    }
}

/// Asks until `want` answers (bounded: the reload is asynchronous), and says what answered.
async fn until_answered_by(url: &str, want: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        last = who_answers(url).await;
        if last == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test]
async fn serve_reloads_its_config_on_sighup_and_keeps_serving_when_the_new_one_is_bad() {
    use tower_llm_lb_mock::MockServer;
    let one = MockServer::builder()
        .name("one")
        .bearer("k1")
        .start()
        .await
        .unwrap();
    let two = MockServer::builder()
        .name("two")
        .bearer("k2")
        .start()
        .await
        .unwrap();
    let config = |name: &str, m: &MockServer, key: &str| {
        format!(
            r#"{{"backends":{{"{name}":{{"provider":"openai","url":"{}/v1","api_key":"{key}"}}}}}}"#,
            m.url()
        )
    };
    let path = write("reload.json", &config("one", &one, "k1"));
    let (mut child, url) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || serve_config(&path)
    })
    .await
    .unwrap();
    assert_eq!(who_answers(&url).await, "one");

    // A new backend in place of the old: served after SIGHUP, no restart.
    std::fs::write(&path, config("two", &two, "k2")).unwrap();
    signal(&child, "HUP");
    assert_eq!(until_answered_by(&url, "two").await, "two");
    // (Requests sent before the reload took effect went to `one`: how many is timing.)
    let before_the_reload = one.counters().ok;

    // A broken config: logged, and the running one keeps serving.
    std::fs::write(&path, r#"{"backends":{"x":{"provider":"openai"}}}"#).unwrap();
    signal(&child, "HUP");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(who_answers(&url).await, "two");

    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("config reloaded"), "{log}");
    assert!(
        log.contains("config reload failed; still serving the previous config")
            && log.contains("backends.x.url: missing"),
        "{log}"
    );
    assert!(
        !log.contains("k1") && !log.contains("k2"),
        "no key in the log: {log}"
    );
    assert_eq!(
        one.counters().ok,
        before_the_reload,
        "the old backend got requests after the new config served"
    );
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_escapes() {
    use tower_llm_lb_mock::MockServer;
    let mock = MockServer::builder()
        .name("plain")
        .bearer("k1")
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("plain-logs.json", &mock, "").await;
    assert_eq!(who_answers(&url).await, "plain");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("gateway listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "an ANSI escape in piped logs: {log:?}"
    );
}

#[tokio::test]
async fn every_request_gets_one_access_line_with_its_id_status_backend_and_time() {
    use tower::ServiceExt;
    use tower_llm_lb_mock::MockServer;
    let mock = MockServer::builder()
        .name("east")
        .bearer("k1")
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("access-line.json", &mock, "").await;
    let mut req = chat_post(&url, r#"{"model":"gpt-4o","messages":[]}"#);
    req.headers_mut()
        .insert("x-request-id", http::HeaderValue::from_static("trace-me-1"));
    let res = tower_llm_lb::client::http_client()
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The line is written by the log thread: give it its turn before the process goes.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(r#"request_id="trace-me-1""#))
        .collect();
    assert_eq!(lines.len(), 1, "one line per request: {log}");
    // It starts with its time as tracing-subscriber writes it: `2026-12-07T03:24:31.205010Z`.
    let time = lines[0].as_bytes();
    let digits = |r: std::ops::Range<usize>| time[r].iter().all(u8::is_ascii_digit);
    assert!(
        time.len() > 27
            && digits(0..4)
            && time[4] == b'-'
            && digits(5..7)
            && time[10] == b'T'
            && digits(11..13)
            && time[19] == b'.'
            && digits(20..26)
            && time[26] == b'Z',
        "{}",
        lines[0]
    );
    for field in [
        " INFO ",
        "method=POST",
        "path=/v1/chat/completions",
        "status=200",
        "backend=east",
        "client=loopback",
        "elapsed_us=",
    ] {
        assert!(lines[0].contains(field), "{field} in {}", lines[0]);
    }
    assert!(!log.contains("k1"), "no key in the log: {log}");
}

#[tokio::test]
async fn sigterm_lets_a_slow_answer_and_a_stream_in_flight_finish_refuses_new_connections_and_exits_0()
 {
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tower::ServiceExt;
    use tower_llm_lb_mock::MockServer;
    // Answers after 1 s; a stream's 8 chunks come 200 ms apart after that (2.6 s in all).
    let mock = MockServer::builder()
        .name("slow")
        .bearer("k1")
        .latency(Duration::from_secs(1))
        .stream_chunks(8)
        .chunk_delay(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("drain.json", &mock, "").await;
    let send = |body: &'static str| {
        let req = chat_post(&url, body);
        tokio::spawn(async move {
            let res = tower_llm_lb::client::http_client()
                .oneshot(req)
                .await
                .unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.map(|b| b.to_bytes());
            (status, body)
        })
    };
    let plain = send(r#"{"model":"gpt-4o","messages":[]}"#);
    let stream = send(r#"{"model":"gpt-4o","messages":[],"stream":true}"#);
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&child, "TERM");
    // The listener stops accepting: a new connection is refused.
    let addr = url.trim_start_matches("http://").to_string();
    let mut refused = false;
    for _ in 0..40 {
        if let Err(e) = tokio::net::TcpStream::connect(&addr).await {
            // Refused, or reset when it reached the listener's queue as the listener closed.
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ),
                "{e}"
            );
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused, "a new connection after SIGTERM was accepted");
    // Both requests in flight finish whole.
    let (status, body) = plain.await.unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body.unwrap()).contains("choices"));
    let (status, body) = stream.await.unwrap();
    assert_eq!(status, 200);
    let body = body.expect("the stream ends cleanly");
    assert!(String::from_utf8_lossy(&body).contains("data: [DONE]"));
    // Then the process exits 0 on its own.
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
}

#[tokio::test]
async fn sigterm_waits_no_longer_than_the_grace_period() {
    use std::time::{Duration, Instant};
    use tower::ServiceExt;
    use tower_llm_lb_mock::MockServer;
    let mock = MockServer::builder()
        .name("stuck")
        .bearer("k1")
        .latency(Duration::from_secs(20))
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("grace.json", &mock, r#"{"shutdown_grace_ms":300}"#).await;
    let stuck = tokio::spawn(tower_llm_lb::client::http_client().oneshot(chat_post(&url, "{}")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    signal(&child, "TERM");
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM, not after the 300 ms grace",
        sent.elapsed()
    );
    assert!(stuck.await.unwrap().is_err(), "the stuck request was cut");
}

#[tokio::test]
async fn json_logs_give_one_object_per_request_with_model_attempts_tokens_and_duration() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use tower_llm_lb_mock::MockServer;
    let mock = MockServer::builder()
        .name("east")
        .bearer("k1")
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("json-log.json", &mock, r#"{"log_format":"json"}"#).await;
    let mut req = chat_post(
        &url,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    req.headers_mut()
        .insert("x-request-id", http::HeaderValue::from_static("json-1"));
    let res = tower_llm_lb::client::http_client()
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // The line is written by the log thread: give it its turn before the process goes.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let objects: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    let line = objects
        .iter()
        .find(|o| o["request_id"] == "json-1")
        .unwrap_or_else(|| panic!("no line for the request: {log}"));
    assert_eq!(line["message"], "request");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/v1/chat/completions");
    assert_eq!(line["backend"], "east");
    assert_eq!(line["model"], "gpt-4o");
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["prompt_tokens"], answer["usage"]["prompt_tokens"]);
    assert_eq!(
        line["completion_tokens"],
        answer["usage"]["completion_tokens"]
    );
    assert!(line["duration_us"].as_u64().unwrap() >= line["elapsed_us"].as_u64().unwrap());
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    assert!(!log.contains("k1"), "no key in the log: {log}");
}

#[tokio::test]
async fn health_exits_0_when_the_gateway_answers_and_1_when_it_does_not() {
    let mock = tower_llm_lb_mock::MockServer::builder()
        .bearer("k1")
        .start()
        .await
        .unwrap();
    let (mut child, url) = serve_over("health.json", &mock, "").await;
    let ask = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["health", "--url", &url])
                .output()
                .unwrap()
                .status
                .code()
        })
    };
    assert_eq!(ask(format!("{url}/health")).await.unwrap(), Some(0));
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(ask(format!("{url}/health")).await.unwrap(), Some(1));
}
