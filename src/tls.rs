//! The server's TLS certificate (`tls_cert` and `tls_key`, PEM files) for the listeners that
//! offer TLS: today the PostgreSQL wire protocol. The files are read at start (an error
//! there stops the start, naming the file) and again when either changes on disk, so a
//! renewed certificate is used by the next connection without a restart; a renewal that
//! does not load is logged and the previous certificate kept. Live sessions are not touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, bail};
use parking_lot::Mutex;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// A certificate and key on disk, and the acceptor made of them.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<(SystemTime, SystemTime)>, TlsAcceptor)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let pem = std::fs::read(cert).with_context(|| format!("cannot read tls_cert {}", cert.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls_cert {} is not PEM", cert.display()))?;
    if certs.is_empty() {
        bail!("tls_cert {} holds no CERTIFICATE block", cert.display());
    }
    let pem = std::fs::read(key).with_context(|| format!("cannot read tls_key {}", key.display()))?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("tls_key {} is not PEM", key.display()))?
        .with_context(|| format!("tls_key {} holds no PRIVATE KEY block", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| format!("tls_key {} does not match tls_cert {}", key.display(), cert.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl TlsFiles {
    /// Loads `cert` and `key`; fails with the file and the reason.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let stamp = modified(cert).zip(modified(key));
        let a = acceptor(cert, key)?;
        Ok(Arc::new(Self { cert: cert.to_owned(), key: key.to_owned(), current: Mutex::new((stamp, a)) }))
    }

    /// The acceptor for a new connection, from the files as they are now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamp = modified(&self.cert).zip(modified(&self.key));
        let mut current = self.current.lock();
        if stamp.is_some() && stamp != current.0 {
            match acceptor(&self.cert, &self.key) {
                Ok(a) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    *current = (stamp, a);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the changed TLS files do not load; the previous certificate stays");
                    current.0 = stamp;
                }
            }
        }
        current.1.clone()
    }
}
