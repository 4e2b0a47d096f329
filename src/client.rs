//! Ready-made hyper-util clients: HTTPS with rustls (feature `rustls`, on by default) and plain
//! HTTP for loopback servers.
//!
//! The clients speak HTTP/1.1 and HTTP/2 (chosen by ALPN on HTTPS) and never follow redirects, so
//! a credential never travels to another origin.

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A plain-HTTP hyper-util client (loopback mock servers, a local vLLM).
pub fn http_client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A plaintext HTTP/2 (prior knowledge) hyper-util client, for gRPC servers without TLS
/// ([`Provider::Grpc`](crate::provider::Provider::Grpc) backends): gRPC needs HTTP/2, and
/// without TLS there is no ALPN to agree on it. One client serves every backend; hyper
/// multiplexes calls to each server over one connection.
pub fn grpc_client<B>() -> Client<HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

#[cfg(feature = "rustls")]
pub use tls::*;

#[cfg(feature = "rustls")]
mod tls {
    use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    /// The HTTPS client type [`https_client`] returns.
    pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

    /// Which root certificates an HTTPS client trusts.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum Roots {
        /// Mozilla's roots, compiled in (the `webpki-roots` crate): works in scratch containers.
        #[default]
        WebPki,
        /// The operating system's store (needed behind TLS-inspecting corporate proxies).
        Native,
    }

    /// An HTTPS client (rustls with the ring provider; HTTP/1.1 and HTTP/2 by ALPN; plain `http://`
    /// allowed for local servers), trusting `roots`.
    ///
    /// Fails only if `Roots::Native` finds no usable certificate.
    pub fn https_client<B>(roots: Roots) -> Result<HttpsClient<B>, crate::BoxError>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
    {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = HttpsConnectorBuilder::new();
        let builder = match roots {
            Roots::WebPki => builder.with_provider_and_webpki_roots(provider)?,
            Roots::Native => builder.with_provider_and_native_roots(provider)?,
        };
        Ok(finish(builder))
    }

    /// An HTTPS client with your own rustls configuration: private or corporate roots, client
    /// certificates (mTLS), pinned protocol versions. ALPN is set here (HTTP/2, then HTTP/1.1);
    /// any protocols already in `config` are replaced.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_llm_lb::client::https_client_with;
    ///
    /// // Your CA's certificate(s), e.g. read from a PEM file: `roots.add(der_certificate)?`.
    /// let roots = rustls::RootCertStore::empty();
    /// let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    /// let config = rustls::ClientConfig::builder_with_provider(provider)
    ///     .with_safe_default_protocol_versions()?
    ///     .with_root_certificates(roots)
    ///     .with_no_client_auth();
    /// let client = https_client_with::<tower_llm_lb::body::ReplayBody>(config);
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn https_client_with<B>(mut config: rustls::ClientConfig) -> HttpsClient<B>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
    {
        // hyper-rustls sets ALPN itself and refuses a config that already has some.
        config.alpn_protocols.clear();
        finish(HttpsConnectorBuilder::new().with_tls_config(config))
    }

    fn finish<B>(
        builder: HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
    ) -> HttpsClient<B>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
    {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new()).build(connector)
    }
}
