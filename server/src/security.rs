//! What protects the gRPC port: API keys ([`crate::auth`]), TLS with rustls (optionally
//! requiring client certificates), and their reload on SIGHUP or when a file changes.
//!
//! TLS is terminated here rather than by tonic's `ServerTlsConfig` so the certificate can be
//! replaced while the server runs: every accepted connection handshakes with the configuration
//! current at that moment, and connections already open keep theirs.

use crate::auth::{ApiKey, KeySet, Keys};
use crate::config::{ApiKeySettings, Settings};
use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;

/// The files of a TLS configuration.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must chain to these (mTLS); `None` = no client certificates asked.
    pub client_ca: Option<PathBuf>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// A rustls server configuration from PEM files, speaking HTTP/2 (ALPN `h2`).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key in {}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).with_context(|| format!("adding a client CA from {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .with_context(|| format!("{} and {} do not make a usable pair", files.cert.display(), files.key.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS configuration that can be replaced while serving.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    pub fn load(files: TlsFiles) -> Result<Self> {
        let current = RwLock::new(server_config(&files)?);
        Ok(Self { files, current })
    }

    /// Reads the files again; on error the configuration in use stays.
    pub fn reload(&self) -> Result<()> {
        let cfg = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn watched(&self) -> Vec<PathBuf> {
        let f = &self.files;
        [Some(f.cert.clone()), Some(f.key.clone()), f.client_ca.clone()].into_iter().flatten().collect()
    }
}

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS connections accepted on `listener`: handshakes run concurrently, each with the
/// configuration current when its connection arrived; failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Keys, TLS and reflection for one server.
#[derive(Clone)]
pub struct Security {
    pub keys: Keys,
    pub tls: Option<Arc<Tls>>,
    /// Serve gRPC server reflection.
    pub reflection: bool,
    /// Where the keys come from, for reloads.
    key_sources: KeySources,
}

#[derive(Clone, Default)]
struct KeySources {
    inline: Vec<ApiKeySettings>,
    file: Option<PathBuf>,
}

impl KeySources {
    fn load(&self) -> Result<KeySet> {
        let mut keys = Vec::new();
        for (i, k) in self.inline.iter().enumerate() {
            keys.push(k.key().with_context(|| format!("auth.keys[{i}]"))?);
        }
        if let Some(f) = &self.file {
            #[derive(serde::Deserialize)]
            struct KeysFile {
                #[serde(default)]
                keys: Vec<ApiKeySettings>,
            }
            let parsed: KeysFile = config::Config::builder()
                .add_source(config::File::new(&f.to_string_lossy(), config::FileFormat::Toml))
                .build()
                .and_then(|c| c.try_deserialize())
                .with_context(|| format!("reading API keys from {}", f.display()))?;
            for (i, k) in parsed.keys.iter().enumerate() {
                keys.push(k.key().with_context(|| format!("{}: keys[{i}]", f.display()))?);
            }
        }
        Ok(KeySet::new(keys))
    }
}

impl Default for Security {
    fn default() -> Self {
        Self::open()
    }
}

impl Security {
    /// No keys, no TLS, reflection on: the local default.
    pub fn open() -> Self {
        Self { keys: Default::default(), tls: None, reflection: true, key_sources: KeySources::default() }
    }

    /// Keys and TLS as `s` configures them; `s` is validated first (keys, TLS file pairs).
    pub fn from_settings(s: &Settings) -> Result<Self> {
        s.validate()?;
        let key_sources = KeySources { inline: s.auth.keys.clone(), file: s.auth.keys_file.clone() };
        let keys = Arc::new(RwLock::new(Arc::new(key_sources.load()?)));
        let tls = match (&s.tls.cert, &s.tls.key) {
            (Some(cert), Some(key)) => Some(Arc::new(Tls::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: s.tls.client_ca.clone(),
            })?)),
            // Validation refused a lone cert, key or client CA.
            _ => None,
        };
        Ok(Self { keys, tls, reflection: s.reflection, key_sources })
    }

    /// With these API keys (for tests and embedding).
    pub fn with_keys(mut self, keys: Vec<ApiKey>) -> Self {
        self.keys = Arc::new(RwLock::new(Arc::new(KeySet::new(keys))));
        self
    }

    /// With TLS from these files.
    pub fn with_tls(mut self, files: TlsFiles) -> Result<Self> {
        self.tls = Some(Arc::new(Tls::load(files)?));
        Ok(self)
    }

    pub fn has_keys(&self) -> bool {
        !self.keys.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Reads keys and certificates again; what fails to load leaves the old one in place.
    pub fn reload(&self) {
        if !(self.key_sources.inline.is_empty() && self.key_sources.file.is_none()) {
            match self.key_sources.load() {
                Ok(k) => {
                    let n = k.len();
                    *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(k);
                    tracing::info!(keys = n, "API keys reloaded");
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "API keys not reloaded; the previous ones stay"),
            }
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "TLS not reloaded; the previous certificates stay")
                }
            }
        }
    }

    /// Reloads on SIGHUP, and when a watched file (certificate, key, CA, keys file) changes,
    /// as a mounted Kubernetes secret does when it is rotated. Runs until the task is dropped.
    pub async fn watch(self, poll: Duration) {
        let mut files: Vec<PathBuf> = self.tls.iter().flat_map(|t| t.watched()).collect();
        files.extend(self.key_sources.file.clone());
        let stamp = |files: &[PathBuf]| -> Vec<Option<std::time::SystemTime>> {
            files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
        };
        let mut seen = stamp(&files);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let signal = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<()>();
            tokio::select! {
                _ = signal => {
                    tracing::info!("SIGHUP: reloading keys and certificates");
                    self.reload();
                    seen = stamp(&files);
                }
                _ = tokio::time::sleep(poll) => {
                    let now = stamp(&files);
                    if now != seen {
                        tracing::info!("a key or certificate file changed: reloading");
                        self.reload();
                        seen = now;
                    }
                }
            }
        }
    }
}
