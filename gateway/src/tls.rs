//! The TLS listener: rustls (ring), HTTP/2 or HTTP/1.1 by ALPN, the certificate chain and key
//! read from PEM files and read again when they change (cert-manager and its peers rotate a
//! secret's files in place): the next handshake uses the new pair, connections already open keep
//! theirs. A pair that fails to load is logged and the last good one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the files are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// A TLS acceptor whose certificate follows its files.
#[derive(Clone)]
pub(crate) struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.current.cert_file)
            .field("key_file", &self.current.key_file)
            .finish_non_exhaustive()
    }
}

/// The pair in use, and where it comes from.
struct Current {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    key: arc_swap::ArcSwap<CertifiedKey>,
    /// The files' bytes when last loaded (compared, not their times: a rotation within the
    /// same second is seen too).
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Current")
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }
}

impl Tls {
    /// Loads `cert_file` and `key_file`; fails naming the file and what is wrong with it.
    pub(crate) fn new(cert_file: &Path, key_file: &Path) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key) = (read(cert_file)?, read(key_file)?);
        let pair = certified(&provider, cert_file, &cert, key_file, &key)?;
        let current = Arc::new(Current {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider: provider.clone(),
            key: arc_swap::ArcSwap::from_pointee(pair),
            loaded: std::sync::Mutex::new((cert, key)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("gateway.tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
        })
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again if they changed; `Ok(true)` when a new pair is in use.
    pub(crate) fn reload(&self) -> Result<bool, String> {
        let c = &self.current;
        let (cert, key) = (read(&c.cert_file)?, read(&c.key_file)?);
        let mut loaded = c.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == cert && loaded.1 == key {
            return Ok(false);
        }
        let pair = certified(&c.provider, &c.cert_file, &cert, &c.key_file, &key)?;
        c.key.store(Arc::new(pair));
        *loaded = (cert, key);
        Ok(true)
    }

    /// Checks the files every 2 s until the returned task is aborted.
    pub(crate) fn watch(&self) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                match tls.reload() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(cert_file = %tls.current.cert_file.display(), "TLS certificate reloaded");
                    }
                    Ok(false) => failing = false,
                    // Logged once per failing spell (a rotation writes two files, not at once).
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "TLS certificate reload failed; still serving the previous one");
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("gateway.tls: {}: {e}", path.display()))
}

/// The pair from the files' bytes, the key checked against the certificate.
fn certified(
    provider: &CryptoProvider,
    cert_file: &Path,
    cert: &[u8],
    key_file: &Path,
    key: &[u8],
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("gateway.tls: {}: {e}", cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "gateway.tls: {}: no PEM certificate in it",
            cert_file.display()
        ));
    }
    // Never echo the key's bytes.
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
        format!(
            "gateway.tls: {}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)",
            key_file.display()
        )
    })?;
    let pair = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "gateway.tls: {} and {}: {e}",
            cert_file.display(),
            key_file.display()
        )
    })?;
    Ok(pair)
}
