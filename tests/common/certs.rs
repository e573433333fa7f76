//! Certificates made by the tests: CAs, server and client certificates (rcgen), their keys in
//! each PEM format a client certificate may come in, and rustls server configurations that
//! require a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A directory of its own per test, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsclient-{what}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `contents` to the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

/// A certificate signed by a test CA: the chain (the certificate, then its CA) and the key as
/// PKCS#8, both PEM.
pub struct Leaf {
    pub chain_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} {}", std::process::id()));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), der: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    /// A server certificate for localhost and 127.0.0.1 (an ECDSA P-256 key).
    pub fn server(&self) -> Leaf {
        self.sign(vec!["localhost".into(), "127.0.0.1".into()], "wsclient test server", KeyPair::generate().unwrap())
    }

    /// A client certificate whose subject's common name is `name`, for `key`.
    pub fn client(&self, name: &str, key: KeyPair) -> Leaf {
        self.sign(Vec::new(), name, key)
    }

    fn sign(&self, names: Vec<String>, common_name: &str, key: KeyPair) -> Leaf {
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![if names.is_empty() {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { chain_pem: format!("{}{}", cert.pem(), self.pem), key_pem: key.serialize_pem() }
    }

    /// A rustls server configuration presenting `leaf` that requires a client certificate signed
    /// by this CA (or, with `client_ca` None, asks for none).
    pub fn server_config(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<_> = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes()).map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der.clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        Arc::new(builder.with_single_cert(chain, key).unwrap())
    }
}

/// An RSA key (rcgen's ring backend cannot make one), as PKCS#8 PEM, made by the openssl tool.
pub fn rsa_key() -> KeyPair {
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .expect("run openssl (Debian's openssl package)");
    assert!(out.status.success(), "openssl genpkey failed: {}", String::from_utf8_lossy(&out.stderr));
    KeyPair::from_pem(std::str::from_utf8(&out.stdout).unwrap()).unwrap()
}

/// The key of a PKCS#8 PEM file in its traditional PEM form: PKCS#1 ("RSA PRIVATE KEY") for an
/// RSA key, SEC1 ("EC PRIVATE KEY") for an EC key.
pub fn traditional(pkcs8_pem: &Path) -> String {
    let out = Command::new("openssl")
        .arg("pkey")
        .arg("-in")
        .arg(pkcs8_pem)
        .arg("-traditional")
        .output()
        .expect("run openssl (Debian's openssl package)");
    assert!(out.status.success(), "openssl pkey failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
