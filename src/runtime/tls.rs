//! TLS on the client port (rustls): the certificate, key and optional
//! client-CA files, loaded at start and again on SIGHUP (new connections
//! get the new ones). A connection is TLS if its first byte opens a TLS
//! record (0x16); the bytes it carries are then sniffed like a plaintext
//! connection's (native or LiveLock protocol). With `required`, a plaintext
//! connection is closed.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// The first byte of a TLS handshake record.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Where the server's TLS material is, and whether plaintext is refused.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Verify client certificates against these CAs (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Refuse plaintext connections (the LiveLock protocol included).
    pub required: bool,
}

/// The TLS setup the loops read when a connection turns out to be TLS.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong.
    pub fn load(files: TlsFiles) -> Result<Tls, String> {
        let config = server_config(&files)?;
        Ok(Tls {
            files,
            config: RwLock::new(config),
        })
    }

    /// Reads the files again (SIGHUP); on error the old setup stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files)?;
        *self.config.write() = config;
        Ok(())
    }

    /// The setup for a new TLS connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.read().clone()
    }

    pub fn required(&self) -> bool {
        self.files.required
    }
}

/// The rustls server setup of `files` (client certificates verified
/// against `client_ca` when given).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("TLS certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificate {}: no certificate in the file",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("TLS client CA {}: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("TLS client CA {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("TLS client CA {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS client CA {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not go together: {e}"))?;
    Ok(Arc::new(config))
}
