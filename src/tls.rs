//! The server's TLS: the certificate (`tls_cert`, `tls_key`, PEM files) of every listener
//! that offers TLS (MQTT over TLS, HTTPS, the PostgreSQL wire protocol), and the device CA
//! (`tls_client_ca`) whose client certificates authenticate devices (mutual TLS).
//!
//! The files are read at start (an error there stops the start, naming the file) and again
//! when any of them changes on disk or the process receives SIGHUP, so a renewed
//! certificate is used by the next handshake without a restart; a renewal that does not
//! load is logged and the previous certificate kept. Live sessions are never touched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use ferrite_ingest::mqtt::{Door, MqttFront, TransportIdentity};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The prefix of a SAN URI that names a device: `urn:ferrite:device:{id}`.
pub const DEVICE_URI_PREFIX: &str = "urn:ferrite:device:";

/// The certificate, key and device CA on disk, and the acceptor made of them.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: Mutex<(Option<Vec<SystemTime>>, TlsAcceptor)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The CERTIFICATE blocks of the PEM file `path` (`what` names it in errors).
pub(crate) fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} {} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {} holds no CERTIFICATE block", path.display());
    }
    Ok(certs)
}

fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(cert, "tls_cert")?;
    let pem = std::fs::read(key).with_context(|| format!("cannot read tls_key {}", key.display()))?;
    let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("tls_key {} is not PEM", key.display()))?
        .with_context(|| format!("tls_key {} holds no PRIVATE KEY block", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca, "tls_client_ca")? {
                roots
                    .add(c)
                    .with_context(|| format!("tls_client_ca {} is not a usable CA certificate", ca.display()))?;
            }
            // A client without a certificate may still authenticate in its CONNECT (a
            // token or secret); one with a certificate must present a valid one of this CA.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("tls_client_ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key_der)
        .with_context(|| format!("tls_key {} does not match tls_cert {}", key.display(), cert.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl TlsFiles {
    /// Loads `cert`, `key` and the device CA `client_ca` if any; fails with the file and the reason.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Arc<Self>> {
        let files = Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
            current: Mutex::new((None, acceptor(cert, key, client_ca)?)),
        };
        files.current.lock().0 = files.stamp();
        Ok(Arc::new(files))
    }

    /// Whether client certificates are asked for (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    fn stamp(&self) -> Option<Vec<SystemTime>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| modified(p))
            .collect()
    }

    /// The acceptor for a new connection, from the files as they are now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamp = self.stamp();
        let mut current = self.current.lock();
        if stamp.is_some() && stamp != current.0 {
            self.reload_locked(&mut current, stamp);
        }
        current.1.clone()
    }

    /// Reads the files again now (SIGHUP), whether or not they look changed.
    pub fn reload(&self) {
        let stamp = self.stamp();
        let mut current = self.current.lock();
        self.reload_locked(&mut current, stamp);
    }

    fn reload_locked(&self, current: &mut (Option<Vec<SystemTime>>, TlsAcceptor), stamp: Option<Vec<SystemTime>>) {
        match acceptor(&self.cert, &self.key, self.client_ca.as_deref()) {
            Ok(a) => {
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                *current = (stamp, a);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the TLS files do not load; the previous certificate stays");
                current.0 = stamp;
            }
        }
    }
}

/// The device id a client certificate names: its `urn:ferrite:device:{id}` SAN URI if it
/// has one, else its subject CN.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let cert = x509_certificate::X509Certificate::from_der(der).ok()?;
    // subjectAltName, 2.5.29.17.
    let from_uri = cert.iter_extensions().filter(|e| e.id.as_ref() == [0x55, 0x1d, 0x11]).find_map(|e| {
        san_uris(&e.value.to_bytes()).into_iter().find_map(|u| u.strip_prefix(DEVICE_URI_PREFIX).map(str::to_owned))
    });
    from_uri.or_else(|| cert.subject_common_name()).filter(|s| !s.is_empty())
}

/// One DER element: (tag, contents, rest).
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The URIs (`[6] IA5String`) of a subjectAltName extension's value.
fn san_uris(value: &[u8]) -> Vec<String> {
    let Some((0x30, mut names, _)) = der_element(value) else { return Vec::new() };
    let mut uris = Vec::new();
    while let Some((tag, contents, rest)) = der_element(names) {
        if tag == 0x86
            && let Ok(u) = std::str::from_utf8(contents)
        {
            uris.push(u.to_owned());
        }
        names = rest;
    }
    uris
}

/// What a completed handshake tells about the client.
pub fn identity_of(stream: &TlsStream<tokio::net::TcpStream>) -> TransportIdentity {
    TransportIdentity { door: Door::Mqtts, certificate_subject: verified_subject(stream) }
}

/// The device the client's verified certificate names, if it presented one.
fn verified_subject(stream: &TlsStream<tokio::net::TcpStream>) -> Option<String> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| certificate_subject(c))
}

/// Who connected to the HTTPS listener: its address, and the device its verified client
/// certificate names (mutual TLS). [`https_peer`] turns it into the request extensions the
/// routes read.
#[derive(Debug, Clone)]
pub struct HttpsPeer {
    addr: SocketAddr,
    certificate_subject: Option<Arc<str>>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpsListener>> for HttpsPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpsListener>) -> Self {
        Self { addr: *stream.remote_addr(), certificate_subject: verified_subject(stream.io()).map(Arc::from) }
    }
}

/// Middleware of the HTTPS routes: the peer's address as every route reads it
/// (`ConnectInfo<SocketAddr>`), and its certificate's device as a [`ferrite_engine::auth::ClientCertificate`].
pub async fn https_peer(mut request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    if let Some(axum::extract::ConnectInfo(peer)) =
        request.extensions().get::<axum::extract::ConnectInfo<HttpsPeer>>().cloned()
    {
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer.addr));
        if let Some(subject) = peer.certificate_subject {
            request.extensions_mut().insert(ferrite_engine::auth::ClientCertificate(subject));
        }
    }
    next.run(request).await
}

/// Completes a TLS handshake within [`HANDSHAKE_TIMEOUT`]; a client that speaks plain MQTT
/// or HTTP to a TLS port, or presents a certificate of an unknown CA or an expired one,
/// fails here (logged and counted) and never reaches a session.
pub async fn handshake(
    files: &TlsFiles,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    listener: &'static str,
    metrics: &ferrite_engine::Metrics,
) -> Option<TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, files.acceptor().accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            metrics.inc("ferrite_tls_handshake_failures_total", &[("listener", listener)], 1);
            tracing::warn!(%peer, listener, error = %e, "TLS handshake refused");
            None
        }
        Err(_) => {
            metrics.inc("ferrite_tls_handshake_failures_total", &[("listener", listener)], 1);
            tracing::warn!(%peer, listener, "TLS handshake not completed within 10s");
            None
        }
    }
}

/// Accepts MQTT over TLS on `listener` until `shutdown` turns true; each handshake runs on
/// its own task so that a slow client never holds up the others.
pub async fn serve_mqtts(
    listener: TcpListener,
    files: Arc<TlsFiles>,
    front: Arc<MqttFront>,
    metrics: Arc<ferrite_engine::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (files, front, metrics) = (files.clone(), front.clone(), metrics.clone());
                    tokio::spawn(async move {
                        if let Some(tls) = handshake(&files, stream, peer, "mqtts", &metrics).await {
                            let identity = identity_of(&tls);
                            let (rd, wr) = tokio::io::split(tls);
                            front.spawn_session(rd, wr, peer, identity);
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mqtts accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// The HTTPS listener for axum: TCP accepts whose handshakes run on tasks of their own and
/// arrive here once complete.
pub struct HttpsListener {
    addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
}

impl HttpsListener {
    /// Starts accepting on `listener`; handshakes use `files` as they are at each accept.
    pub fn start(
        listener: TcpListener,
        files: Arc<TlsFiles>,
        metrics: Arc<ferrite_engine::Metrics>,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "https accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let (files, metrics, tx) = (files.clone(), metrics.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(tls) = handshake(&files, stream, peer, "https", &metrics).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(Self { addr, ready })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (it never does while the listener lives): wait forever,
            // the graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn a_device_is_named_by_its_san_uri_or_else_its_common_name() -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "cn-device");
        let cert = params.self_signed(&key)?;
        assert_eq!(certificate_subject(cert.der()).as_deref(), Some("cn-device"));

        params.subject_alt_names.push(rcgen::SanType::URI(format!("{DEVICE_URI_PREFIX}uri-device").try_into()?));
        params.subject_alt_names.push(rcgen::SanType::DnsName("example.com".try_into()?));
        let cert = params.self_signed(&key)?;
        assert_eq!(certificate_subject(cert.der()).as_deref(), Some("uri-device"));

        assert_eq!(certificate_subject(b"not a certificate"), None);
        Ok(())
    }

    /// A CA, and certificates it signs (`days_ago..days_left` around today).
    struct Pki {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: String,
    }

    impl Pki {
        fn new(name: &str) -> anyhow::Result<Self> {
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
            let ca_pem = params.self_signed(&key)?.pem();
            Ok(Self { issuer: rcgen::Issuer::new(params, key), ca_pem })
        }

        fn sign(&self, names: &[&str], cn: &str, years: (i32, i32)) -> anyhow::Result<(String, String)> {
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
            params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
            params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
            Ok((params.signed_by(&key, &self.issuer)?.pem(), key.serialize_pem()))
        }
    }

    /// Handshakes a client presenting `client` (PEM cert, key) with a server of `files`;
    /// what the server made of it.
    async fn handshake_with(
        files: &TlsFiles,
        ca_pem: &str,
        client: Option<&(String, String)>,
    ) -> Option<TransportIdentity> {
        let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = listener.local_addr().ok()?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(c.ok()?).ok()?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>().ok()?;
                let key = rustls_pemfile::private_key(&mut key.as_bytes()).ok()??;
                builder.with_client_auth_cert(chain, key).ok()?
            }
            None => builder.with_no_client_auth(),
        };
        let client_side = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
            tls.write_all(b"x").await?;
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
            std::io::Result::Ok(())
        });
        let (tcp, peer) = listener.accept().await.ok()?;
        let metrics = ferrite_engine::Metrics::new();
        let result = handshake(files, tcp, peer, "test", &metrics).await.map(|s| identity_of(&s));
        drop(client_side);
        result
    }

    #[tokio::test]
    async fn client_certificates_of_the_device_ca_name_the_device_and_others_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (devices, strangers) = (Pki::new("devices")?, Pki::new("strangers")?);
        let server = devices.sign(&["localhost"], "server", (2020, 2090))?;
        for (name, text) in [("server.pem", &server.0), ("server.key", &server.1), ("ca.pem", &devices.ca_pem)] {
            std::fs::write(dir.path().join(name), text)?;
        }
        let files = TlsFiles::load(
            &dir.path().join("server.pem"),
            &dir.path().join("server.key"),
            Some(&dir.path().join("ca.pem")),
        )?;
        assert!(files.mutual());

        let valid = devices.sign(&[], "dev-7", (2020, 2090))?;
        let who = handshake_with(&files, &devices.ca_pem, Some(&valid)).await.context("a valid certificate")?;
        assert_eq!((who.tls(), who.certificate_subject.as_deref()), (true, Some("dev-7")));
        let anonymous = handshake_with(&files, &devices.ca_pem, None).await.context("no certificate")?;
        assert_eq!(anonymous.certificate_subject, None, "no certificate: the CONNECT authenticates");

        let expired = devices.sign(&[], "dev-7", (2020, 2021))?;
        assert!(handshake_with(&files, &devices.ca_pem, Some(&expired)).await.is_none(), "expired");
        let not_yet = devices.sign(&[], "dev-7", (2080, 2090))?;
        assert!(handshake_with(&files, &devices.ca_pem, Some(&not_yet)).await.is_none(), "not yet valid");
        let foreign = strangers.sign(&[], "dev-7", (2020, 2090))?;
        assert!(handshake_with(&files, &devices.ca_pem, Some(&foreign)).await.is_none(), "unknown CA");
        Ok(())
    }

    #[test]
    fn der_lengths_past_the_end_are_refused() {
        assert_eq!(der_element(&[0x30, 0x05, 1, 2]), None);
        assert_eq!(der_element(&[0x30, 0x82, 0x00]), None);
        assert_eq!(der_element(&[0x86, 0x01, b'x', 9]), Some((0x86, &b"x"[..], &[9u8][..])));
        assert!(san_uris(&[0x04, 0x00]).is_empty());
    }
}
