//! An OpenAI-compatible gateway over the configured stack.
//!
//! ```sh
//! cargo run --release --example gateway -- --config gateway.json   # your backends
//! cargo run --release --example gateway -- --mock                  # embedded mock backends
//! ```
//!
//! Then point any OpenAI SDK at `http://127.0.0.1:8080/v1`. Options: `--listen ADDR`.
//! Logs go to stderr (`RUST_LOG`-style level via `--log debug`).

use std::net::SocketAddr;

use tower_llm_lb::BoxError;
use tower_llm_lb::config::Config;
use tower_llm_lb::gateway::{Gateway, mock_backends};

struct Args {
    config: Option<String>,
    mock: bool,
    listen: Option<String>,
    log: tracing::Level,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        config: None,
        mock: false,
        listen: None,
        log: tracing::Level::INFO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => out.config = Some(it.next().ok_or("--config needs a file")?),
            "--mock" => out.mock = true,
            "--listen" => out.listen = Some(it.next().ok_or("--listen needs an address")?),
            "--log" => {
                let level = it.next().ok_or("--log needs a level")?;
                out.log = level
                    .parse()
                    .map_err(|_| format!("--log: unknown level {level:?}"))?;
            }
            "-h" | "--help" => {
                return Err("usage: gateway (--config FILE.json|FILE.toml | --mock) [--listen ADDR] [--log LEVEL]".into());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if out.config.is_none() && !out.mock {
        return Err("give --config FILE or --mock (try --help)".into());
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = match args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(args.log)
        .with_writer(std::io::stderr)
        .init();

    // Mock servers must live as long as the gateway.
    let (_mocks, config) = if args.mock {
        let (mocks, json) = mock_backends().await?;
        (mocks, Config::from_json(&json)?)
    } else {
        let path = args.config.as_deref().unwrap_or_default();
        (Vec::new(), Config::from_path(path)?)
    };
    let client_keys = config
        .gateway
        .as_ref()
        .map(|g| g.client_keys.clone())
        .unwrap_or_default();
    let listen = args
        .listen
        .or_else(|| config.gateway.as_ref().and_then(|g| g.listen.clone()))
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| format!("--listen: not an address: {listen}"))?;
    let (service, backends) = config.build_with_backends(tower_llm_lb::client::https_client(
        tower_llm_lb::client::Roots::WebPki,
    )?)?;
    let names: Vec<_> = backends.iter().map(|b| b.name().to_string()).collect();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, backends = ?names, client_keys = client_keys.len(), "gateway listening");
    println!("tower-llm-lb gateway on http://{addr}/v1 over {names:?}");
    Gateway::new(service, backends, client_keys)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down: finishing in-flight requests");
        })
        .await?;
    Ok(())
}
