//! TLS configuration (rustls with the ring provider) and readable TLS error messages.
//!
//! Certificates are always verified, host names included, against the operating system's trust
//! store (SSL_CERT_FILE and SSL_CERT_DIR replace it, as with OpenSSL-based tools) plus any CA the
//! options add. There is deliberately no way to turn verification off.

use std::sync::{Arc, Mutex};

use rustls::sign::SingleCertAndKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::pinned;
use crate::error::{Error, WsStatus};
use crate::options::read_at_most_max_pem_file;
use crate::options::TlsSettings;
use crate::sync::lock;

/// Distinct configurations a client keeps. A host rarely has more than a few (one per set of
/// extra CAs and client certificate); past this the least recently used one is dropped, and
/// its session cache with it.
const MAX_CONFIGS: usize = 8;

/// The system's roots, read by a thread of its own (see `TlsConfigs::system_roots`).
fn load_system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    // Unreadable or unparsable system certificates are skipped, as OpenSSL does; with no root at
    // all every handshake fails with "certificate not trusted", which says what is wrong.
    roots.add_parsable_certificates(system_certificates());
    roots
}

/// What rustls-native-certs finds, except that SSL_CERT_FILE is read here with a bound:
/// rustls-native-certs reads it whole, so SSL_CERT_FILE=/dev/zero (or a huge file) grew the
/// process until an allocation failed and aborted it. Past MAX_PEM_FILE it counts as unreadable.
fn system_certificates() -> Vec<CertificateDer<'static>> {
    let Some(file) = std::env::var_os("SSL_CERT_FILE") else {
        return rustls_native_certs::load_native_certs().certs;
    };
    let mut certs: Vec<_> = read_bounded(std::path::Path::new(&file))
        .map(|pem| CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect())
        .unwrap_or_default();
    for dir in std::env::split_paths(&std::env::var_os("SSL_CERT_DIR").unwrap_or_default()) {
        if !dir.as_os_str().is_empty() {
            certs.extend(rustls_native_certs::load_certs_from_paths(None, Some(&dir)).certs);
        }
    }
    certs
}

/// A file's bytes, or None if it cannot be read or holds more than MAX_PEM_FILE. Unlike the
/// options' files it may block (a FIFO, a slow network file system): it runs on the trust
/// store's own thread.
fn read_bounded(path: &std::path::Path) -> Option<Vec<u8>> {
    read_at_most_max_pem_file(std::fs::File::open(path).ok()?).ok()?
}

/// The system's roots as they will be once read: None until then.
type SystemRoots = tokio::sync::watch::Receiver<Option<Arc<RootCertStore>>>;

/// Starts reading the system store on a short-lived thread: it is blocking file I/O (hundreds
/// of files with SSL_CERT_DIR), which on the I/O thread would stall every other connection of
/// the client. A thread of its own rather than tokio's blocking pool, so that ws_client_free
/// never waits for it: a late answer goes to receivers that are gone.
fn start_reading_system_roots() -> Result<SystemRoots, Error> {
    let (answer, answered) = tokio::sync::watch::channel(None);
    std::thread::Builder::new()
        .name("wsclient-roots".into())
        .spawn(move || {
            let _ = answer.send(Some(Arc::new(load_system_roots())));
        })
        .map_err(|e| Error::new(WsStatus::Tls, format!("TLS: cannot start a thread to read the trust store: {e}")))?;
    Ok(answered)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(system: &Arc<RootCertStore>, settings: &TlsSettings) -> Result<Arc<ClientConfig>, Error> {
    let unusable =
        |e: rustls::Error| Error::new(WsStatus::CertificateFile, format!("CA certificate cannot be used: {e}"));
    // Extra certificates that are CAs join the roots; the others are trusted as themselves only.
    let (cas, pinned): (Vec<_>, Vec<_>) = settings.extra_ca.iter().cloned().partition(pinned::can_issue);
    let roots = if cas.is_empty() {
        system.clone()
    } else {
        let mut roots = RootCertStore::clone(system);
        for cert in cas {
            roots.add(cert).map_err(unusable)?;
        }
        Arc::new(roots)
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(WsStatus::Tls, format!("TLS: {e}")))?;
    let builder = if pinned.is_empty() {
        builder.with_root_certificates(roots)
    } else {
        let verifier = pinned::PinnedOrCa::new(roots, pinned, provider()).map_err(unusable)?;
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
    };
    let config = match &settings.client_cert {
        None => builder.with_no_client_auth(),
        Some(cert) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.key.clone()))),
    };
    Ok(Arc::new(config))
}

/// One client's TLS configurations, each built once and shared by the connections whose options
/// ask for it: immutable, and with the session cache in it, so that reconnects resume their
/// TLS sessions instead of doing full handshakes.
#[derive(Default)]
pub(crate) struct TlsConfigs {
    /// Read once per client, on its first wss connection, so SSL_CERT_FILE and SSL_CERT_DIR are
    /// honoured as they are at that moment. The connections that need it meanwhile wait for the
    /// same reading, also those started after others gave up waiting (a connect timeout): a
    /// store that never answers costs one thread per client, not one per connect.
    system: Mutex<Option<SystemRoots>>,
    /// The least recently used first.
    built: Mutex<Vec<(TlsSettings, Arc<ClientConfig>)>>,
}

impl TlsConfigs {
    /// The configuration for a connection with these settings.
    pub(crate) async fn get(&self, settings: &TlsSettings) -> Result<Arc<ClientConfig>, Error> {
        if let Some(config) = self.cached(settings, None) {
            return Ok(config);
        }
        let system = self.system_roots().await?;
        let config = build(&system, settings)?;
        Ok(self.cached(settings, Some(config)).expect("just inserted"))
    }

    /// The system's roots, once read (the first caller starts the reading).
    async fn system_roots(&self) -> Result<Arc<RootCertStore>, Error> {
        let mut roots = {
            let mut system = lock(&self.system);
            match &*system {
                Some(roots) => roots.clone(),
                None => system.insert(start_reading_system_roots()?).clone(),
            }
        };
        let read = roots.wait_for(Option::is_some).await.map(|roots| roots.clone());
        match read {
            Ok(Some(roots)) => Ok(roots),
            _ => {
                // The reading thread ended without an answer (it panicked): the next connect tries again.
                *lock(&self.system) = None;
                Err(Error::new(WsStatus::Tls, "TLS: reading the system trust store failed"))
            }
        }
    }

    /// The cached configuration for `settings`, marked as the most recently used; `new` is
    /// added if there is none (another connection may have built one meanwhile: it wins).
    fn cached(&self, settings: &TlsSettings, new: Option<Arc<ClientConfig>>) -> Option<Arc<ClientConfig>> {
        let mut built = lock(&self.built);
        let entry = match built.iter().position(|(s, _)| s == settings) {
            Some(i) => built.remove(i),
            None => (settings.clone(), new?),
        };
        let config = entry.1.clone();
        built.push(entry);
        if built.len() > MAX_CONFIGS {
            built.remove(0);
        }
        Some(config)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.built).len()
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
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                "TLS: the server requires a client certificate (alert: certificate required)".into()
            }
            AlertDescription::UnknownCA => {
                "TLS: the server does not trust the client certificate (alert: unknown CA)".into()
            }
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown => {
                format!("TLS: the server rejected the client certificate (alert: {alert:?})")
            }
            other => format!("TLS: the server sent the alert {other:?}"),
        },
        other => format!("TLS: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;

    fn new_ca() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn trusting(ca: &CertificateDer<'static>) -> TlsSettings {
        TlsSettings { extra_ca: Arc::new(vec![ca.clone()]), client_cert: None }
    }

    #[tokio::test]
    async fn each_distinct_configuration_is_built_once_and_few_are_kept() {
        let configs = TlsConfigs::default();
        let plain = configs.get(&TlsSettings::default()).await.unwrap();
        assert!(Arc::ptr_eq(&plain, &configs.get(&TlsSettings::default()).await.unwrap()));
        let ca = new_ca();
        let with_ca = configs.get(&trusting(&ca)).await.unwrap();
        assert!(!Arc::ptr_eq(&plain, &with_ca));
        // Settings of other options with the same CA (another copy of it) find the same one.
        assert!(Arc::ptr_eq(&with_ca, &configs.get(&trusting(&ca)).await.unwrap()));
        for _ in 0..2 * MAX_CONFIGS {
            configs.get(&trusting(&new_ca())).await.unwrap();
        }
        assert_eq!(configs.len(), MAX_CONFIGS);
        // The least recently used went first: this one is built anew.
        assert!(!Arc::ptr_eq(&with_ca, &configs.get(&trusting(&ca)).await.unwrap()));
    }
}
