//! TLS for the listener (rustls): the certificate and key come from PEM files named in
//! `[server] tls_cert` / `tls_key`, and are reloaded without a restart when either file
//! changes (checked every `RELOAD_CHECK`) or on SIGHUP. A reload that fails (a file half
//! written, a key that does not match its certificate) keeps the pair in use and logs why;
//! the next change or SIGHUP tries again. New handshakes get the new pair; open
//! connections keep the one they started with.
//!
//! ALPN offers `h2` then `http/1.1`: clients that speak HTTP/2 get it, others HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// How often the certificate and key files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// ALPN protocol ids, in the server's order of preference.
pub const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a certificate/key pair cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {path}: {why}")]
    Certificate { path: PathBuf, why: String },
    #[error("cannot read TLS private key {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("TLS certificate {cert} and key {key} do not go together: {why}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What a file looked like when it was last loaded: a change of either means reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
    })
}

/// The certificate in use, swapped in place on reload; rustls asks it at every handshake.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamps at the last load attempt (successful or not).
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Neither file changed since the last attempt.
    Unchanged,
    /// The new pair is in use.
    Reloaded,
    /// The new files could not be used; the previous pair stays.
    Failed,
}

impl CertStore {
    /// Loads the pair, or says in one line why it cannot be used.
    pub fn load(files: TlsFiles) -> Result<Arc<CertStore>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = (stamp(&files.cert), stamp(&files.key));
        let key = load_pair(&files, &provider)?;
        Ok(Arc::new(CertStore {
            files,
            provider,
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(seen),
        }))
    }

    /// The acceptor for the listener: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reloads the pair if either file changed since the last attempt (`force`: even if
    /// not, as on SIGHUP).
    pub fn reload(&self, force: bool) -> Reload {
        let now = (stamp(&self.files.cert), stamp(&self.files.key));
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *seen == now {
                return Reload::Unchanged;
            }
            *seen = now;
        }
        match load_pair(&self.files, &self.provider) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                crate::metrics::tls_reload("ok");
                Reload::Reloaded
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays in use");
                crate::metrics::tls_reload("error");
                Reload::Failed
            }
        }
    }

    /// Checks the files every `RELOAD_CHECK` and on SIGHUP, for the life of the process.
    pub fn watch(self: &Arc<Self>) {
        let store = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut every = tokio::time::interval(RELOAD_CHECK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let force = tokio::select! {
                    _ = every.tick() => false,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => true,
                };
                #[cfg(not(unix))]
                let force = {
                    every.tick().await;
                    false
                };
                let s = store.clone();
                // File reads and key parsing: off the async workers.
                let _ = tokio::task::spawn_blocking(move || s.reload(force)).await;
            }
        });
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let cert_err = |why: String| TlsError::Certificate {
        path: files.cert.clone(),
        why,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM CERTIFICATE block in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        why: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_garbage_files_are_one_line_errors_that_name_the_file() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let missing = dir.join("missing.pem");
        for (cert, want) in [(&missing, "missing.pem"), (&garbage, "no PEM CERTIFICATE")] {
            let e = CertStore::load(TlsFiles {
                cert: cert.clone(),
                key: garbage.clone(),
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
