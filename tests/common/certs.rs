//! Certificates for the TLS tests, made by rcgen: a CA and what it signs,
//! written as PEM files in a scratch directory.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use super::ScratchDir;

/// A CA, and files of certificates it signed.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub path: PathBuf,
}

impl Ca {
    pub fn new(dir: &ScratchDir, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(&format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca { cert, key, path }
    }

    /// A certificate for `names`, signed by this CA: (cert file, key file).
    pub fn issue(&self, dir: &ScratchDir, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        let (cert_path, key_path) = (
            dir.join(&format!("{file}.pem")),
            dir.join(&format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}
