//! Helpers shared by the gateway's integration tests: the binary on a free port, a log
//! capture, the README's config blocks.

#![allow(dead_code)]

/// The test kit's log capture, under the name these tests use.
#[allow(unused_imports)]
pub use tower_llm_lb_mock::CapturedLogs as Captured;

/// The README's first JSON block after `marker`.
pub fn readme_json_after(marker: &str) -> &'static str {
    let readme = include_str!("../../../README.md");
    let from = readme.find(marker).expect("the marker is in the README");
    let start = from + readme[from..].find("```json\n").expect("a JSON block") + "```json\n".len();
    &readme[start..start + readme[start..].find("```").unwrap()]
}

/// A `serve --config` process on a free port, its base URL and its stderr.
pub fn serve_config(path: &std::path::Path) -> (std::process::Child, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tower-llm-lb"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
            "--config",
        ])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    first_url(child)
}

/// A started `serve` process and the base URL it printed first.
pub fn first_url(mut child: std::process::Child) -> (std::process::Child, String) {
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches("/v1")
        .to_string();
    (child, url)
}

/// Writes `json` to a file named `name` in this test process's temporary folder.
pub fn write(name: &str, json: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-llm-lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path
}

/// The binary serving a config file `file` of one OpenAI-compatible backend, `mock` (key `k1`),
/// with `gateway` as the config's `gateway` section when not empty; its process and base URL.
pub async fn serve_over(
    file: &str,
    mock: &tower_llm_lb_mock::MockServer,
    gateway: &str,
) -> (std::process::Child, String) {
    let gateway = if gateway.is_empty() {
        String::new()
    } else {
        format!(r#","gateway":{gateway}"#)
    };
    let path = write(
        file,
        &format!(
            r#"{{"backends":{{"{}":{{"provider":"openai","url":"{}/v1","api_key":"k1"}}}}{gateway}}}"#,
            mock.name(),
            mock.url()
        ),
    );
    tokio::task::spawn_blocking(move || serve_config(&path))
        .await
        .unwrap()
}

/// The gateway (in process) serving the config `json` on a loopback port until the returned
/// sender is dropped; sharing state through Redis when the config says so.
pub async fn serve_json(json: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = tower_llm_lb_config::Config::from_json(json).unwrap();
    let (svc, backends) = config
        .build_with_backends(tower_llm_lb::client::http_client())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut gateway = tower_llm_lb_gateway::Gateway::new(svc, backends.clone(), Vec::new())
        .configured(&config)
        .unwrap();
    // Replicas sharing state through Redis, when the config says so.
    if let Some(link) = config.shared_state(backends).unwrap() {
        gateway = gateway.shared_state(link);
    }
    tokio::spawn(gateway.serve(listener, async {
        let _ = rx.await;
    }));
    (url, tx)
}
