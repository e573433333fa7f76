//! TLS configuration (rustls with the ring provider) and readable TLS error messages.
//!
//! Certificates are always verified, host names included, against the operating system's trust
//! store (SSL_CERT_FILE and SSL_CERT_DIR replace it, as with OpenSSL-based tools) plus any CA the
//! options add. There is deliberately no way to turn verification off.

use std::sync::{Arc, OnceLock};

use rustls::{CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;

use crate::error::{Error, WsStatus};

/// The system's roots, read when a client makes its first wss connection.
fn load_system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    // Unreadable or unparsable system certificates are skipped, as OpenSSL does; with no root at
    // all every handshake fails with "certificate not trusted", which says what is wrong.
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(system: &RootCertStore, extra_ca: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = system.clone();
    for cert in extra_ca {
        roots
            .add(cert.clone())
            .map_err(|e| Error::new(WsStatus::CertificateFile, format!("CA certificate cannot be used: {e}")))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(WsStatus::Tls, format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One client's TLS configurations. The system store is read once per client, on its first wss
/// connection, so SSL_CERT_FILE and SSL_CERT_DIR are honoured as they are at that moment.
#[derive(Default)]
pub struct TlsConfigs {
    system: OnceLock<RootCertStore>,
    default: OnceLock<Result<Arc<ClientConfig>, Error>>,
}

impl TlsConfigs {
    /// The configuration for a connection: shared when the options add no CA.
    pub fn get(&self, extra_ca: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, Error> {
        let system = self.system.get_or_init(load_system_roots);
        if extra_ca.is_empty() {
            self.default.get_or_init(|| build(system, &[])).clone()
        } else {
            build(system, extra_ca)
        }
    }
}

/// Turns an I/O error from the TLS handshake into a message that names the cause.
pub fn describe_handshake_error(err: &std::io::Error, host: &str) -> String {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "TLS: the server closed the connection during the TLS handshake".into()
            }
            std::io::ErrorKind::ConnectionReset => "TLS: connection reset during the TLS handshake".into(),
            _ => format!("TLS: {err}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("TLS: certificate not valid for name {host}")
            }
            CertificateError::UnknownIssuer => "TLS: certificate not trusted (unknown issuer)".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "TLS: certificate expired".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "TLS: certificate not valid yet".into()
            }
            CertificateError::Revoked => "TLS: certificate revoked".into(),
            CertificateError::BadSignature => "TLS: certificate not trusted (bad signature)".into(),
            other => format!("TLS: invalid certificate ({other:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("TLS: the server does not speak TLS ({tls})")
        }
        other => format!("TLS: {other}"),
    }
}
