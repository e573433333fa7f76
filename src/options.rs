//! Connection options: everything `ws_connect_with_options` can change, with defaults chosen for
//! hosts that keep many mostly idle connections.

use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tungstenite::http::{HeaderName, HeaderValue};

use crate::deflate::DeflateConfig;
use crate::error::{Error, WsStatus};

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

#[derive(Clone, Debug)]
pub struct Options {
    pub extra_ca: Vec<CertificateDer<'static>>,
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
    /// permessage-deflate: offered unless disabled.
    pub deflate: DeflateConfig,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            extra_ca: Vec::new(),
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
            deflate: DeflateConfig::default(),
        }
    }
}

fn invalid(message: String) -> Error {
    Error::new(WsStatus::InvalidArgument, message)
}

impl Options {
    /// Trusts the certificates of a PEM file in addition to the system's trust store.
    pub fn add_ca_file(&mut self, path: &str) -> Result<(), Error> {
        let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
            .map_err(|e| Error::new(WsStatus::CertificateFile, format!("CA file {path}: {e}")))?
            .collect();
        let certs = certs.map_err(|e| Error::new(WsStatus::CertificateFile, format!("CA file {path}: {e}")))?;
        if certs.is_empty() {
            return Err(Error::new(WsStatus::CertificateFile, format!("CA file {path}: no certificate in it")));
        }
        self.extra_ca.extend(certs);
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
