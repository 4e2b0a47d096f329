//! The rustls client against a real TLS server on loopback (a self-signed certificate made for
//! the test): the handshake, ALPN (HTTP/2), and the stack's routing and credentials over it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;
use tower_llm_lb::auth::Credential;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::client::{Roots, https_client, https_client_with};
use tower_llm_lb::stack::{self, Settings};
use tower_llm_lb::{Backend, BoxError};

/// A TLS server for `localhost` answering with the HTTP version, path and `api-key` it saw.
async fn tls_server() -> (
    std::net::SocketAddr,
    rustls::pki_types::CertificateDer<'static>,
) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let key = req
                            .headers()
                            .get("api-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let seen = format!("{:?} {} {key}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(seen),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, cert_der)
}

fn client_trusting(
    cert: rustls::pki_types::CertificateDer<'static>,
) -> tower_llm_lb::client::HttpsClient<ReplayBody> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Protocols set by the caller are replaced, not a panic.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    https_client_with(config)
}

#[tokio::test]
async fn the_stack_speaks_http2_over_tls_to_a_backend_with_a_private_ca() -> Result<(), BoxError> {
    let (addr, cert) = tls_server().await;
    let backend = Backend::azure(
        "east",
        format!("https://localhost:{}", addr.port()),
        "gpt-4o",
        "2024-10-21",
    )
    .credential(Credential::api_key("tls-key")?)
    .build()?;
    let svc = stack::group(
        "tls",
        [backend],
        client_trusting(cert),
        &Settings::default(),
    )?;
    let req = http::Request::post("/v1/chat/completions").body(ReplayBody::from("{}"))?;
    let res = svc.oneshot(req).await?;
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await?.to_bytes();
    assert_eq!(
        body,
        "HTTP/2.0 /openai/deployments/gpt-4o/chat/completions tls-key"
    );
    Ok(())
}

#[tokio::test]
async fn a_server_outside_the_trusted_roots_is_refused_with_a_typed_error() -> Result<(), BoxError>
{
    let (addr, _cert) = tls_server().await;
    let backend = Backend::openai(
        "self-signed",
        format!("https://localhost:{}/v1", addr.port()),
    )
    .credential(Credential::bearer("sk-never-sent")?)
    .build()?;
    // Mozilla's roots do not include the test's self-signed certificate.
    let client = https_client::<ReplayBody>(Roots::WebPki)?;
    // A short backoff: this test runs on the real clock.
    let settings = Settings {
        retry: tower_llm_lb::retry::RetryAfter429Layer {
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            ..Default::default()
        },
        ..Settings::default()
    };
    let svc = stack::group("tls", [backend], client, &settings)?;
    let req = http::Request::post("/v1/chat/completions").body(ReplayBody::from("{}"))?;
    let err = svc.oneshot(req).await.unwrap_err();
    // A refused certificate is a connect error naming the backend; with no other backend to
    // try, it is asked again only after a backoff, up to the attempts allowed (4).
    let exhausted = tower_llm_lb::error::find::<tower_llm_lb::error::Exhausted>(&*err)
        .expect("the attempts are listed");
    assert_eq!(exhausted.attempts.len(), 4);
    for a in &exhausted.attempts {
        assert_eq!(&*a.backend, "self-signed");
        assert_eq!(a.outcome, tower_llm_lb::Outcome::ConnectError);
    }
    assert!(!format!("{err:?}").contains("sk-never-sent"));
    Ok(())
}
