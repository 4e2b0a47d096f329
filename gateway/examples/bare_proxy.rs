//! The floor for any proxy built on our stack: a hyper server that forwards every request,
//! unchanged, through one pooled hyper-util client to one upstream, on the default
//! multi-thread tokio runtime, with `TCP_NODELAY` on both sides. Nothing else: no routing, no
//! body buffering, no metrics, no logs. `benches/proxy.sh` runs it beside nginx, haproxy and
//! the gateway to say how much of the gateway's CPU per request is its own work.
//!
//! ```sh
//! cargo run --release -p tower-llm-lb-gateway --example bare_proxy -- 127.0.0.1:8081 http://127.0.0.1:9000
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Incoming>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: Uri = upstream.parse()?;
    let authority = upstream
        .authority()
        .ok_or("the upstream URL has no host")?
        .clone();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "bare proxy on http://{} to {upstream}",
        listener.local_addr()?
    );
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let forward = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = Some(authority.clone());
                parts.path_and_query = req.uri().path_and_query().cloned();
                async move {
                    *req.uri_mut() = Uri::from_parts(parts).expect("a valid URI");
                    let res: Response<_> = match client.request(req).await {
                        Ok(res) => res.map(http_body_util::Either::Left),
                        Err(e) => Response::builder()
                            .status(502)
                            .body(http_body_util::Either::Right(http_body_util::Full::new(
                                bytes::Bytes::from(e.to_string()),
                            )))
                            .expect("a valid response"),
                    };
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), forward)
                .await;
        });
    }
}
