//! The `tower-llm-lb` command: the gateway as a binary (`cargo install tower-llm-lb --features
//! gateway`).
//!
//! ```text
//! tower-llm-lb serve --config gateway.json [--listen 0.0.0.0:8080] [--log debug]
//! tower-llm-lb serve --mock                  # embedded mock backends, no credentials
//! tower-llm-lb check --config gateway.json   # validate, print the resolved backends (secrets redacted)
//! tower-llm-lb health [--url http://127.0.0.1:8080/health]   # exit 0 when the gateway answers 200
//! ```
//!
//! Every option has an environment variable (`TOWER_LLM_LB_CONFIG`, `TOWER_LLM_LB_LISTEN`,
//! `TOWER_LLM_LB_LOG`). Exit status: 0 on success (and for `--help`), 2 for bad arguments or a
//! bad config (printed as `path: message`), 1 when serving fails.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use tower_llm_lb::error::BoxError;
use tower_llm_lb_config::Config;

use crate::settings::GatewayConfig;

/// Tower middleware's OpenAI-compatible gateway: spreads LLM API calls over many endpoints and
/// keeps working when they throttle or fail.
#[derive(Debug, Parser)]
#[command(name = "tower-llm-lb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gateway.
    Serve(Serve),
    /// Validate a config and print the resolved backends, secrets redacted.
    Check {
        /// The config file (`.json` or `.toml`).
        #[arg(long, env = "TOWER_LLM_LB_CONFIG")]
        config: String,
    },
    /// Ask a running gateway's `/health`: exit 0 on `200`, 1 otherwise (a container's
    /// `HEALTHCHECK`, where no curl is installed).
    Health {
        /// The URL to ask (plain HTTP).
        #[arg(
            long,
            env = "TOWER_LLM_LB_HEALTH_URL",
            default_value = "http://127.0.0.1:8080/health"
        )]
        url: String,
    },
}

#[derive(Debug, Args)]
struct Serve {
    /// The config file (`.json` or `.toml`).
    #[arg(long, env = "TOWER_LLM_LB_CONFIG", required_unless_present = "mock")]
    config: Option<String>,
    /// Serve over embedded mock backends (no credentials needed).
    #[arg(long, conflicts_with = "config")]
    mock: bool,
    /// The address to listen on (default: the config's `gateway.listen`, else 127.0.0.1:8080;
    /// port 0 picks a free one, printed at start).
    #[arg(long, env = "TOWER_LLM_LB_LISTEN")]
    listen: Option<String>,
    /// The log level on stderr (error, warn, info, debug, trace).
    #[arg(long, env = "TOWER_LLM_LB_LOG", default_value = "info")]
    log: tracing::Level,
    /// Log lines as text or one JSON object per line (default: the config's
    /// `gateway.log_format`, else text).
    #[arg(long, env = "TOWER_LLM_LB_LOG_FORMAT", value_enum)]
    log_format: Option<super::log::Format>,
}

/// Runs the command line in `args` (the first item is the program's name), as `main` does.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // `--help` and `--version` print and succeed; misuse prints why and exits 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Health { url } => health(&url),
        Command::Serve(args) => serve(args),
    }
}

/// The binary's `main`: [`main_with`] over the process's arguments.
pub fn main() -> ExitCode {
    main_with(std::env::args_os())
}

fn health(url: &str) -> ExitCode {
    let Ok(uri) = url.parse::<http::Uri>() else {
        eprintln!("--url: not a URL: {url}");
        return ExitCode::from(2);
    };
    let asked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BoxError::from)
        .and_then(|rt| {
            rt.block_on(async {
                let client =
                    tower_llm_lb::client::http_client::<http_body_util::Empty<bytes::Bytes>>();
                let req = http::Request::get(uri).body(http_body_util::Empty::new())?;
                let res =
                    tokio::time::timeout(std::time::Duration::from_secs(5), client.request(req))
                        .await??;
                Ok::<_, BoxError>(res.status())
            })
        });
    match asked {
        Ok(status) if status == http::StatusCode::OK => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{url}: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &str) -> ExitCode {
    let config = match Config::from_path(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Built with a client that is never used: the check sends nothing. The gateway's section is
    // checked as serving applies it (aliases, limits, TLS files, log format).
    let built = GatewayConfig::of(&config)
        .and_then(|g| {
            config
                .build_with_backends(tower_llm_lb::client::http_client())
                .map_err(|e| e.to_string())
                .map(|built| (g.log_format, built))
        })
        .and_then(|(log_format, (service, backends))| {
            super::Gateway::new(service, backends.clone(), Vec::new())
                .configured(&config)
                .map(|_| (log_format, backends))
        })
        .and_then(|(log_format, backends)| match log_format {
            Some(f) => f.parse::<super::log::Format>().map(|_| backends),
            None => Ok(backends),
        });
    match built {
        Ok(backends) => {
            println!("{path}: ok, {} backend(s)", backends.len());
            for b in &backends {
                let models = b
                    .models()
                    .map(|m| m.collect::<Vec<_>>().join(", "))
                    .unwrap_or_else(|| "any".into());
                println!(
                    "  {:<20} {:<9} priority {} weight {} credential {} models {}",
                    b.name(),
                    b.provider().name(),
                    b.priority(),
                    b.weight(),
                    if b.credential().is_some() {
                        "set (redacted)"
                    } else {
                        "none"
                    },
                    models
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: Serve) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The config's log format, read before anything logs (the config is read again to serve).
    let format = match args.log_format {
        Some(f) => f,
        None => {
            let configured = args
                .config
                .as_deref()
                .filter(|_| !args.mock)
                .and_then(|path| Config::from_path(path).ok())
                .and_then(|c| GatewayConfig::of(&c).ok())
                .and_then(|g| g.log_format);
            match configured.map(|f| f.parse()) {
                None => super::log::Format::Text,
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let _flush_at_exit = super::log::init(args.log, format);
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(msg)) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
        Err(Failure::Serve(e)) => {
            eprintln!("tower-llm-lb: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// The config or an argument is wrong (exit 2).
    Config(String),
    /// Serving failed (exit 1).
    Serve(BoxError),
}

/// The embedded mock backends of `--mock`, kept alive while the gateway serves.
#[cfg(feature = "mock")]
type Mocks = Vec<tower_llm_lb_mock::MockServer>;
#[cfg(not(feature = "mock"))]
type Mocks = ();

/// `--mock`: mock backends on loopback and the config that points at them.
#[cfg(feature = "mock")]
async fn mock_config() -> Result<(Mocks, Config), Failure> {
    let (mocks, json) = super::mock_backends()
        .await
        .map_err(|e| Failure::Serve(e.into()))?;
    let config = Config::from_json(&json).map_err(|e| Failure::Config(e.to_string()))?;
    Ok((mocks, config))
}

#[cfg(not(feature = "mock"))]
async fn mock_config() -> Result<(Mocks, Config), Failure> {
    Err(Failure::Config(
        "--mock: this binary was built without the gateway crate's `mock` feature".into(),
    ))
}

async fn run(args: Serve) -> Result<(), Failure> {
    let serve_err = |e: BoxError| Failure::Serve(e);
    // Mock servers must live as long as the gateway.
    let (_mocks, config) = if args.mock {
        mock_config().await?
    } else {
        let path = args.config.as_deref().unwrap_or_default();
        let config = Config::from_path(path).map_err(|e| Failure::Config(e.to_string()))?;
        (Mocks::default(), config)
    };
    let settings = GatewayConfig::of(&config).map_err(Failure::Config)?;
    let client_keys = settings.client_keys.clone();
    let listen = args
        .listen
        .or_else(|| settings.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| Failure::Config(format!("--listen: not an address: {listen}")))?;
    let client = Client(std::sync::Arc::new(
        tower_llm_lb::client::https_client(tower_llm_lb::client::Roots::WebPki)
            .map_err(serve_err)?,
    ));
    let (service, backends) = config
        .build_with_backends(client.clone())
        .map_err(|e| Failure::Config(e.to_string()))?;
    let names: Vec<_> = backends.iter().map(|b| b.name().to_string()).collect();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| serve_err(format!("cannot listen on {addr}: {e}").into()))?;
    let bound = listener.local_addr().map_err(|e| serve_err(e.into()))?;
    let shared = config
        .shared_state(backends.clone())
        .map_err(|e| Failure::Config(e.to_string()))?;
    let tls = settings.tls.is_some();
    let gateway = super::Gateway::new(service, backends, client_keys.clone())
        .configured(&config)
        .map_err(Failure::Config)?;
    // Traces, when the environment names an OTLP endpoint (feature `otel`).
    #[cfg(feature = "otel")]
    let otel = super::otel::Otel::from_env()
        .map_err(Failure::Config)?
        .map(std::sync::Arc::new);
    #[cfg(feature = "otel")]
    let gateway = gateway.traced(otel.clone());
    tracing::info!(addr = %bound, backends = ?names, client_keys = client_keys.len(), tls, "gateway listening");
    let scheme = if tls { "https" } else { "http" };
    println!("tower-llm-lb gateway on {scheme}://{bound}/v1 over {names:?}");
    gateway.replace_shared_state(shared);
    // Reload without restart: on SIGHUP, and when the file changes (checked every 2 s).
    let watcher = args.config.clone().filter(|_| !args.mock).map(|path| {
        let gateway = gateway.clone();
        tokio::spawn(watch(path, gateway, client))
    });
    let grace = std::time::Duration::from_millis(
        settings
            .shutdown_grace_ms
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
    );
    // The first SIGTERM or SIGINT starts the drain; a second one exits at once.
    let (stopping, mut stop) = tokio::sync::watch::channel(false);
    let mut signals = Signals::new().map_err(|e| serve_err(e.into()))?;
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: finishing what is in flight; a second signal exits at once"
        );
        let _ = stopping.send(true);
        signals.next().await;
        tracing::warn!("second signal: exiting with requests in flight");
        std::process::exit(1);
    });
    let mut began = stop.clone();
    let drained = gateway.serve(listener, async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let served = tokio::select! {
        served = drained => served.map_err(|e| serve_err(e.into())),
        () = async {
            let _ = began.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown grace period over: exiting with requests still in flight");
            Ok(())
        }
    };
    if let Some(w) = watcher {
        w.abort();
    }
    #[cfg(feature = "otel")]
    if let Some(otel) = otel {
        otel.shutdown();
    }
    served
}

/// `gateway.shutdown_grace_ms`'s default: Kubernetes' own grace period.
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 30_000;

/// SIGTERM (what Kubernetes, systemd and `docker stop` send) and SIGINT (Ctrl-C), as one stream.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The gateway's client to its backends: HTTPS (webpki roots) or plain HTTP, shared. A stack
/// clones the service under it for every request (tower's `Service::call` takes `&mut self`),
/// and hyper-util's `Client` is about 300 bytes holding several reference counts; this is one
/// reference count (hyper-util's `Client::request` takes `&self`).
#[derive(Clone, Debug)]
struct Client(std::sync::Arc<tower_llm_lb::client::HttpsClient<tower_llm_lb::body::ReplayBody>>);

impl tower::Service<http::Request<tower_llm_lb::body::ReplayBody>> for Client {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // hyper-util's client is always ready: its pool waits inside the call.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tower_llm_lb::body::ReplayBody>) -> Self::Future {
        self.0.request(req)
    }
}

/// Reloads the config at `path` into `gateway` on SIGHUP and whenever the file's modification
/// time or length changes (checked every 2 s; a Kubernetes ConfigMap's symlink swap counts). A
/// config that does not load or validate is logged, and the running one keeps serving.
async fn watch(path: String, gateway: super::Gateway, client: Client) {
    let stamp = |p: &str| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<bool>();
        let why = tokio::select! {
            true = signalled => "SIGHUP",
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                "the file changed"
            }
        };
        match reload(&path, &gateway, client.clone()) {
            Ok(n) => tracing::info!(path, why, backends = n, "config reloaded"),
            Err(e) => tracing::error!(
                path,
                why,
                error = %e,
                "config reload failed; still serving the previous config"
            ),
        }
    }
}

/// Loads, validates and builds the config at `path` and swaps it in; unchanged backends keep
/// their state.
fn reload(path: &str, gateway: &super::Gateway, client: Client) -> Result<usize, String> {
    let config = Config::from_path(path).map_err(|e| e.to_string())?;
    let (service, backends) = config
        .build_reusing(client, &gateway.backends())
        .map_err(|e| e.to_string())?;
    let GatewayConfig {
        client_keys: keys,
        model_aliases: aliases,
        ..
    } = GatewayConfig::of(&config)?;
    let n = backends.len();
    // The new backends' shared state (a new link over them; none when the config has none).
    let link = config
        .shared_state(backends.clone())
        .map_err(|e| e.to_string())?;
    gateway.replace(
        service,
        backends,
        keys,
        aliases,
        config.models().map(String::from).collect(),
    )?;
    gateway.replace_shared_state(link);
    Ok(n)
}
