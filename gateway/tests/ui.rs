//! The gateway's live page in a real headless browser (Debian's Chromium): served at `/`, it
//! fetches `/stats` and shows each backend's state. Chromium is installed with the system
//! package manager when missing (`.ci/run` does the same); without it the test fails and says
//! why.

use std::process::Command;
use std::time::Duration;

use tower::ServiceExt;
use tower_llm_lb_config::Config;
use tower_llm_lb_gateway::Gateway;
use tower_llm_lb_mock::{Fault, MockServer};

/// The Chromium binary. Not installed by the test: `.ci/run` installs it (Debian's `chromium`).
fn chromium() -> String {
    for candidate in ["chromium", "chromium-browser", "/usr/bin/chromium"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate.to_string();
        }
    }
    panic!(
        "this test drives the live page in a headless Chromium, and none is installed: \
         `apt-get install chromium` (.ci/run installs it)"
    )
}

/// The page's DOM after its scripts ran for `budget` of virtual time.
fn rendered(browser: &str, url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("tower-llm-lb-ui-{}", std::process::id()));
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the `<tr data-backend="name">` row, tags removed.
fn row(dom: &str, name: &str) -> String {
    let at = dom
        .find(&format!("data-backend=\"{name}\""))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find("</tr>").unwrap();
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom[start..end].chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_each_backend_s_state_in_a_real_browser() {
    let browser = tokio::task::spawn_blocking(chromium).await.unwrap();
    let healthy = MockServer::builder()
        .name("healthy")
        .api_key("k-healthy")
        .start()
        .await
        .unwrap();
    let failing = MockServer::builder()
        .name("failing")
        .api_key("k-failing")
        .start()
        .await
        .unwrap();
    failing.set_fault(Some(Fault::Status(500)));
    let json = format!(
        r#"{{ "backends": {{
              "healthy": {{ "provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "k-healthy" }},
              "failing": {{ "provider": "azure", "url": "{}", "deployment": "gpt-4o", "api_key": "k-failing" }} }},
             "strategy": {{ "mode": "loadbalance", "algorithm": "round_robin" }},
             "circuit_breaker": {{ "base_open_ms": 60000 }} }}"#,
        healthy.url(),
        failing.url()
    );
    let config = Config::from_json(&json).unwrap();
    let (svc, backends) = config
        .build_with_backends(tower_llm_lb::client::http_client())
        .unwrap();
    // Round robin sends every other request to the failing backend (each is retried on the
    // healthy one) until its circuit opens.
    for _ in 0..20 {
        let req = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(tower_llm_lb::body::ReplayBody::from(r#"{"messages":[]}"#))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Gateway::new(svc, backends, Vec::new()).serve(listener, async {
            let _ = stopped.await;
        }),
    );

    let dom = tokio::task::spawn_blocking(move || rendered(&browser, &url))
        .await
        .unwrap();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;

    let healthy_row = row(&dom, "healthy");
    let failing_row = row(&dom, "failing");
    assert!(
        healthy_row.starts_with("healthy 0 1 ready"),
        "{healthy_row}"
    );
    assert!(
        failing_row.starts_with("failing 0 1 circuit open"),
        "{failing_row}"
    );
    assert!(dom.contains("2 backends, updated"), "{dom}");
    // Self-contained: nothing fetched from another origin.
    assert!(
        !dom.contains("http://") && !dom.contains("https://"),
        "{dom}"
    );
}

#[tokio::test]
async fn the_page_is_self_contained_html_and_carries_no_data() {
    let m = MockServer::builder().start().await.unwrap();
    let json = format!(
        r#"{{ "backends": {{ "a": {{ "provider": "openai", "url": "{}/v1", "api_key": "sk-ui-secret" }} }},
             "gateway": {{ "client_keys": ["client-1"] }} }}"#,
        m.url()
    );
    let (svc, backends) = Config::from_json(&json)
        .unwrap()
        .build_with_backends(tower_llm_lb::client::http_client())
        .unwrap();
    let app = Gateway::new(svc, backends, vec!["client-1".into()]).router();
    for path in ["/", "/ui"] {
        let res = app
            .clone()
            .oneshot(
                http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}: the page needs no key");
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("fetch(\"/stats\""));
        assert!(!html.contains("sk-ui-secret") && !html.contains("client-1"));
        assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    }
}
