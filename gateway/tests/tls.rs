//! The gateway's TLS listener on a real socket: clients that trust a test CA, HTTP/2 and
//! HTTP/1.1 by ALPN, and a certificate rotated in its files while the gateway serves.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower_llm_lb::client::http_client;
use tower_llm_lb_config::Config;
use tower_llm_lb_gateway::Gateway;
use tower_llm_lb_mock::MockServer;

/// A CA, and a certificate for `localhost` it signed: (CA certificate, chain PEM, key PEM).
fn issued() -> (rustls::pki_types::CertificateDer<'static>, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tower-llm-lb test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.der().clone(), leaf.pem(), key.serialize_pem())
}

fn client_config(
    ca: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A chat request to `port` over a new TLS connection trusting `ca`, HTTP/2 by ALPN: the
/// answer's status and HTTP version, or the error.
async fn chat_over_h2(
    port: u16,
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> Result<(u16, http::Version), String> {
    let client = tower_llm_lb::client::https_client_with::<Full<Bytes>>(client_config(ca, &[]));
    let req = http::Request::post(format!("https://localhost:{port}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (status, version) = (res.status().as_u16(), res.version());
    res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((status, version))
}

#[tokio::test]
async fn serves_https_by_alpn_and_picks_up_a_rotated_certificate() {
    let dir = std::env::temp_dir().join(format!("tower-llm-lb-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (ca, chain, key) = issued();
    std::fs::write(&cert_file, chain).unwrap();
    std::fs::write(&key_file, key).unwrap();

    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let json = serde_json::json!({
        "backends": { "m": { "provider": "openai", "url": format!("{}/v1", mock.url()), "api_key": "k1" } },
        "gateway": { "tls": { "cert_file": cert_file, "key_file": key_file } },
    })
    .to_string();
    let config = Config::from_json(&json).unwrap();
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    let gateway = Gateway::new(svc, backends, Vec::new())
        .configured(&config)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(gateway.serve(listener, std::future::pending()));

    // HTTP/2 when the client offers it.
    assert_eq!(
        chat_over_h2(port, &ca).await.unwrap(),
        (200, http::Version::HTTP_2)
    );

    // HTTP/1.1 for a client that offers only that.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca, &[b"http/1.1"])))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::post("/v1/chat/completions")
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"gpt-4o","messages":[]}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (res.status().as_u16(), res.version()),
        (200, http::Version::HTTP_11)
    );

    // A plain-HTTP client gets no answer.
    let plain = http_client::<Full<Bytes>>()
        .request(
            http::Request::get(format!("http://127.0.0.1:{port}/health"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // cert-manager rotates the pair, from another CA: new connections get the new certificate.
    let (new_ca, chain, key) = issued();
    std::fs::write(&key_file, key).unwrap();
    std::fs::write(&cert_file, chain).unwrap();
    let picked_up = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if chat_over_h2(port, &new_ca).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        picked_up.is_ok(),
        "the rotated certificate was never served"
    );
    let old = chat_over_h2(port, &ca).await;
    assert!(old.is_err(), "the old CA still verifies: {old:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_certificate_file_that_cannot_be_used_is_a_config_error_naming_it() {
    let dir = std::env::temp_dir().join(format!("tower-llm-lb-tls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_file, "not a certificate").unwrap();
    std::fs::write(&key_file, "not a key").unwrap();
    let mock = MockServer::builder().bearer("k1").start().await.unwrap();
    let json = serde_json::json!({
        "backends": { "m": { "provider": "openai", "url": format!("{}/v1", mock.url()), "api_key": "k1" } },
        "gateway": { "tls": { "cert_file": cert_file, "key_file": key_file } },
    })
    .to_string();
    let config = Config::from_json(&json).unwrap();
    let (svc, backends) = config.build_with_backends(http_client()).unwrap();
    let err = Gateway::new(svc, backends, Vec::new())
        .configured(&config)
        .unwrap_err();
    assert!(
        err.contains("tls.crt") && err.contains("no PEM certificate"),
        "{err}"
    );
    let missing = Gateway::new(config.build(http_client()).unwrap(), Vec::new(), Vec::new())
        .tls(dir.join("absent.crt"), &key_file)
        .unwrap_err();
    assert!(missing.contains("absent.crt"), "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}
