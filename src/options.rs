//! Connection options: everything `ws_connect_with_options` can change, with defaults chosen for
//! hosts that keep many mostly idle connections.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tungstenite::http::{HeaderName, HeaderValue};

use crate::deflate::DeflateConfig;
use crate::error::{Error, WsStatus};
use crate::io::proxy::ProxySetting;

pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;
pub(crate) const DEFAULT_READ_BUFFER_SIZE: usize = 64 << 10;
pub(crate) const DEFAULT_RECEIVE_QUEUE_LIMIT: usize = 1 << 20;
pub(crate) const DEFAULT_SEND_QUEUE_LIMIT: usize = 64 << 20;

/// Header names the library writes itself: setting them would break the upgrade.
const RESERVED_HEADERS: [&str; 7] = [
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
];

/// What makes one TLS configuration differ from another: each client builds one configuration
/// per distinct value (src/io/tls.rs), so that connections share its session cache.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsSettings {
    /// Shared, not copied: options are copied at every connect.
    pub(crate) extra_ca: Arc<Vec<CertificateDer<'static>>>,
    pub(crate) client_cert: Option<Arc<ClientCertificate>>,
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &TlsSettings) -> bool {
        // By content, not by pointer: hosts that build new options for every connect (the same
        // files each time) must still find the configuration built before.
        let same_cert = match (&self.client_cert, &other.client_cert) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.chain == b.chain,
            _ => false,
        };
        same_cert && (Arc::ptr_eq(&self.extra_ca, &other.extra_ca) || self.extra_ca == other.extra_ca)
    }
}

/// A client certificate chain and its private key, read and checked when the option is set.
#[derive(Debug)]
pub(crate) struct ClientCertificate {
    /// Identifies the certificate: the key was checked to be the one of its first certificate.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: Arc<CertifiedKey>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub(crate) tls: TlsSettings,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub subprotocols: Vec<String>,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
    /// `None`: no keepalive pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    pub max_message_size: usize,
    pub read_buffer_size: usize,
    /// Received bytes waiting for the host beyond which the library stops reading the socket.
    pub receive_queue_limit: usize,
    /// Bytes accepted by send and not yet written beyond which send refuses.
    pub send_queue_limit: usize,
    /// The proxy: from the environment unless set.
    pub proxy: ProxySetting,
    /// Redirects of the upgrade request to follow (0: none, the default).
    pub max_redirects: u32,
    /// permessage-deflate: offered unless disabled.
    pub deflate: DeflateConfig,
    /// ws_dispatch may read small messages on the host's thread (see `host::reading`).
    pub read_on_dispatch: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            tls: TlsSettings::default(),
            headers: Vec::new(),
            subprotocols: Vec::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            read_buffer_size: DEFAULT_READ_BUFFER_SIZE,
            receive_queue_limit: DEFAULT_RECEIVE_QUEUE_LIMIT,
            send_queue_limit: DEFAULT_SEND_QUEUE_LIMIT,
            proxy: ProxySetting::Environment,
            max_redirects: 0,
            deflate: DeflateConfig::default(),
            read_on_dispatch: true,
        }
    }
}

/// The largest PEM file read: the biggest CA bundles are a few hundred KiB.
pub(crate) const MAX_PEM_FILE: u64 = 16 << 20;

/// A PEM file's bytes. Only regular files of at most MAX_PEM_FILE bytes are read, so that a path
/// naming a FIFO (open would block), /dev/zero or a huge file never blocks the caller's thread or
/// exhausts memory; `what` names the file in errors.
pub(crate) fn read_pem_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let error =
        |message: String| Error::new(WsStatus::CertificateFile, format!("{what} {}: {message}", path.display()));
    // Non-blocking, so that opening a FIFO without a writer returns at once (then refused below).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| error(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| error(e.to_string()))?;
    if !metadata.is_file() {
        return Err(error("not a regular file".into()));
    }
    read_at_most_max_pem_file(file)
        .map_err(|e| error(e.to_string()))?
        .ok_or_else(|| error(format!("larger than {} MiB", MAX_PEM_FILE >> 20)))
}

/// A file's bytes, or None if it holds more than MAX_PEM_FILE (bounded even if the file grows
/// while it is read, or never ends, as /dev/zero).
pub(crate) fn read_at_most_max_pem_file(file: std::fs::File) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= MAX_PEM_FILE).then_some(bytes))
}

fn invalid(message: String) -> Error {
    Error::new(WsStatus::InvalidArgument, message)
}

impl Options {
    /// Trusts the certificates of a PEM file in addition to the system's trust store.
    pub fn add_ca_file(&mut self, path: &Path) -> Result<(), Error> {
        let pem = read_pem_file(path, "CA file")?;
        let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
        let path = path.display();
        let certs = certs.map_err(|e| Error::new(WsStatus::CertificateFile, format!("CA file {path}: {e}")))?;
        if certs.is_empty() {
            return Err(Error::new(WsStatus::CertificateFile, format!("CA file {path}: no certificate in it")));
        }
        // Checked now rather than at each connect: a certificate that cannot be a trust anchor.
        for cert in &certs {
            RootCertStore::empty().add(cert.clone()).map_err(|e| {
                Error::new(WsStatus::CertificateFile, format!("CA file {path}: a certificate cannot be used: {e}"))
            })?;
        }
        Arc::make_mut(&mut self.tls.extra_ca).extend(certs);
        Ok(())
    }

    /// Presents this certificate chain (PEM, the client's certificate first) with its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1) to servers that ask for one. Both are read and checked now.
    pub fn set_client_certificate(&mut self, chain_path: &Path, key_path: &Path) -> Result<(), Error> {
        let file_error = |message: String| Error::new(WsStatus::CertificateFile, message);
        let chain_pem = read_pem_file(chain_path, "client certificate file")?;
        let key_pem = read_pem_file(key_path, "key file")?;
        let (chain_path, key_path) = (chain_path.display(), key_path.display());
        let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&chain_pem).collect();
        let chain = chain.map_err(|e| file_error(format!("client certificate file {chain_path}: {e}")))?;
        if chain.is_empty() {
            return Err(file_error(format!("client certificate file {chain_path}: no certificate in it")));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            pem::Error::NoItemsFound => {
                file_error(format!("key file {key_path}: no private key in it (PKCS#8, PKCS#1 or SEC1 PEM)"))
            }
            e => file_error(format!("key file {key_path}: {e}")),
        })?;
        let key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| file_error(format!("key file {key_path}: the key cannot be used: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), key);
        // Any doubt is an error, so that the chain alone identifies the pair (TlsSettings::eq).
        certified.keys_match().map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                file_error(format!("key file {key_path} does not match the certificate in {chain_path}"))
            }
            e => file_error(format!("client certificate file {chain_path}: {e}")),
        })?;
        self.tls.client_cert = Some(Arc::new(ClientCertificate { chain, key: Arc::new(certified) }));
        Ok(())
    }

    pub fn add_header(&mut self, name: &str, value: &str) -> Result<(), Error> {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(format!("invalid HTTP header name {name:?}")))?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(invalid(format!("header {name} is set by the library and cannot be added")));
        }
        let value =
            HeaderValue::from_str(value).map_err(|_| invalid(format!("invalid value for HTTP header {name}")))?;
        self.headers.push((header, value));
        Ok(())
    }

    pub fn add_subprotocol(&mut self, protocol: &str) -> Result<(), Error> {
        let is_token = !protocol.is_empty()
            && protocol.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !is_token {
            return Err(invalid(format!("invalid subprotocol name {protocol:?}")));
        }
        self.subprotocols.push(protocol.to_owned());
        Ok(())
    }

    pub fn set_max_message_size(&mut self, bytes: usize) -> Result<(), Error> {
        if bytes == 0 {
            return Err(invalid("the maximum message size must be at least 1 byte".into()));
        }
        self.max_message_size = bytes;
        Ok(())
    }

    /// Window sizes (bits) for permessage-deflate: ours 9..=15, the server's 8..=15.
    pub fn set_deflate_window_bits(&mut self, client: u32, server: u32) -> Result<(), Error> {
        if !(9..=15).contains(&client) {
            return Err(invalid(format!("the client's deflate window bits must be 9 to 15, not {client}")));
        }
        if !(8..=15).contains(&server) {
            return Err(invalid(format!("the server's deflate window bits must be 8 to 15, not {server}")));
        }
        (self.deflate.client_max_window_bits, self.deflate.server_max_window_bits) = (client as u8, server as u8);
        Ok(())
    }

    pub fn set_deflate_level(&mut self, level: u32) -> Result<(), Error> {
        if !(1..=9).contains(&level) {
            return Err(invalid(format!(
                "the deflate level must be 1 (fastest) to 9 (smallest), not {level}; ws_options_set_deflate(options, \
                 false) turns compression off"
            )));
        }
        self.deflate.level = level as u8;
        Ok(())
    }

    pub fn set_read_buffer_size(&mut self, bytes: usize) -> Result<(), Error> {
        if !(256..=(16 << 20)).contains(&bytes) {
            return Err(invalid("the read buffer size must be between 256 bytes and 16 MiB".into()));
        }
        self.read_buffer_size = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README says 16 MiB; a file of exactly that size is read, one byte more is refused,
    /// and so are files that are not regular.
    #[test]
    fn pem_files_are_regular_files_of_at_most_16_mib() {
        assert_eq!(MAX_PEM_FILE, 16 * 1024 * 1024);
        let path = std::env::temp_dir().join(format!("wsclient-pem-limit-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_PEM_FILE).unwrap();
        assert_eq!(read_pem_file(&path, "test file").unwrap().len() as u64, MAX_PEM_FILE);
        file.set_len(MAX_PEM_FILE + 1).unwrap();
        let refused = read_pem_file(&path, "test file").unwrap_err();
        assert!(refused.message.contains("larger than 16 MiB"), "{}", refused.message);
        std::fs::remove_file(&path).unwrap();
        for not_regular in ["/dev/zero", "/tmp"] {
            let refused = read_pem_file(Path::new(not_regular), "test file").unwrap_err();
            assert_eq!(refused.status, WsStatus::CertificateFile);
            assert!(refused.message.contains("not a regular file"), "{not_regular}: {}", refused.message);
        }
    }
}
