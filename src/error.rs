//! Status codes, the library's error type and the per-thread "last error" message.
//!
//! Every exported function returns a [`WsStatus`] (or reports one through the error callback);
//! the human-readable detail of the last failure on a thread is kept for `ws_last_error()`.

use std::cell::RefCell;
use std::ffi::CString;
use std::fmt;

/// Result status of every `ws_*` call, and the kind of failure given to the error callback.
///
/// The numbers are part of the ABI: they are never renumbered or reused. New codes are only
/// ever added at the end of a group.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WsStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument is out of range or malformed (see `ws_last_error()` for which).
    InvalidArgument = 2,
    /// The URI is not an absolute ws: or wss: URI with a host.
    InvalidUri = 3,
    /// Text that must be UTF-8 is not valid UTF-8.
    InvalidUtf8 = 4,
    /// The connection handle is unknown, or its final callback has already returned.
    Gone = 5,
    /// The connection is closing or closed: it no longer sends, but it is not gone yet.
    Closing = 6,
    /// `ws_close` was already called on this connection (harmless, nothing was done).
    AlreadyClosing = 7,
    /// `ws_dispatch`, `ws_run` or `ws_client_free` was called while a dispatch of the same client
    /// is running (from inside a callback, or from another thread); nothing was done.
    DispatchInProgress = 8,
    /// The send queue of the connection would exceed its limit; the message was not queued.
    SendQueueFull = 9,
    /// The caller's buffer is too small; the needed size was written where the call says.
    BufferTooSmall = 10,
    /// `ws_run` returned because its time was up while connections were still alive.
    Timeout = 11,
    /// A certificate or key file could not be read, holds no certificate or key, or the key does
    /// not match the certificate.
    CertificateFile = 12,
    /// The library could not start its threads or create its event descriptor.
    Runtime = 13,
    /// An internal panic was caught at the C boundary; the call did nothing.
    Panic = 14,

    /// Error callback: the host name could not be resolved.
    Dns = 20,
    /// Error callback: the TCP connection could not be made (refused, unreachable, ...).
    ConnectFailed = 21,
    /// Error callback: the TLS handshake failed (untrusted or wrong certificate, not TLS, ...).
    Tls = 22,
    /// Error callback: the server rejected or botched the WebSocket upgrade (HTTP 403, bad accept key, ...).
    HandshakeRejected = 23,
    /// Error callback: the peer violated the WebSocket protocol (bad frame, invalid UTF-8 text, ...).
    Protocol = 24,
    /// Error callback: the connection was lost without a close handshake (reset, EOF, I/O error).
    ConnectionLost = 25,
    /// Error callback: connecting (DNS, TCP, TLS and upgrade together) took longer than the connect timeout.
    ConnectTimeout = 26,
    /// Error callback: the peer did not complete the close handshake within the close timeout.
    CloseTimeout = 27,
    /// Error callback: the peer sent nothing, not even a pong, within the keepalive timeout.
    KeepaliveTimeout = 28,
    /// Error callback: the peer sent a message larger than the maximum message size.
    MessageTooBig = 29,
    /// Error callback: an internal error (a bug) ended the connection.
    Internal = 30,
    /// Error callback: the proxy could not be reached, refused the tunnel (HTTP 403, a SOCKS5
    /// refusal by its rules, ...) or did not speak its protocol; the message names the proxy and
    /// what it said. (A proxy that reports the server unreachable gives WS_STATUS_CONNECT_FAILED.)
    Proxy = 31,
    /// Error callback: the proxy wants credentials, or refused those in the proxy URL (HTTP 407,
    /// with the realm in the message; SOCKS5 user name and password).
    ProxyAuth = 32,
}

/// The one table of statuses beside the enum: each variant once, with its description. It
/// makes `WsStatus::ALL` and `describe()`, and the compiler ties it to the enum: a variant
/// missing here fails the build (the match is exhaustive), one named twice too (unreachable
/// pattern), and so does a name that is not a variant. (The enum itself stays a plain item, as
/// cbindgen, which does not expand macros, must see it to write the header.)
macro_rules! status_table {
    ($($status:ident => $description:literal,)*) => {
        impl WsStatus {
            /// Every status, in the order of their numbers.
            pub(crate) const ALL: &'static [WsStatus] = &[$(WsStatus::$status),*];

            /// A short, static, NUL-terminated description.
            #[deny(unreachable_patterns)]
            pub fn describe(self) -> &'static str {
                match self {
                    $(WsStatus::$status => concat!($description, "\0"),)*
                }
            }
        }
    };
}

status_table! {
    Ok => "ok",
    NullArgument => "a required argument is NULL",
    InvalidArgument => "invalid argument",
    InvalidUri => "invalid URI: an absolute ws: or wss: URI is required",
    InvalidUtf8 => "text is not valid UTF-8",
    Gone => "the connection is gone",
    Closing => "the connection is closing or closed",
    AlreadyClosing => "close was already called on this connection",
    DispatchInProgress => "a dispatch of this client is already running",
    SendQueueFull => "the send queue of the connection is full",
    BufferTooSmall => "the buffer is too small",
    Timeout => "the time is up",
    CertificateFile => "a certificate or key file could not be used",
    Runtime => "the library could not start its threads or event descriptor",
    Panic => "internal error: a panic was caught at the C boundary",
    Dns => "host name could not be resolved",
    ConnectFailed => "TCP connection failed",
    Tls => "TLS handshake failed",
    HandshakeRejected => "WebSocket handshake rejected",
    Protocol => "WebSocket protocol violation",
    ConnectionLost => "connection lost",
    ConnectTimeout => "connect timeout",
    CloseTimeout => "close handshake timeout",
    KeepaliveTimeout => "keepalive timeout: the peer stopped answering",
    MessageTooBig => "message too big",
    Internal => "internal error",
    Proxy => "the proxy failed or refused the tunnel",
    ProxyAuth => "the proxy requires credentials or refused them",
}

impl WsStatus {
    /// The status with this number, if any.
    pub fn from_u32(value: u32) -> Option<WsStatus> {
        Self::ALL.iter().copied().find(|s| *s as u32 == value)
    }
}

/// A failure: its status and a message that says what exactly went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: WsStatus,
    pub message: String,
}

impl Error {
    pub fn new(status: WsStatus, message: impl Into<String>) -> Error {
        Error { status, message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Remembers `message` as this thread's last error (interior NULs are replaced).
pub fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

/// Pointer to this thread's last error message; valid until the next failing call on this thread.
pub fn last_error_ptr() -> *const libc::c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_round_trip() {
        for &s in WsStatus::ALL {
            assert_eq!(WsStatus::from_u32(s as u32), Some(s));
            assert!(s.describe().ends_with('\0'));
            assert_eq!(s.describe().matches('\0').count(), 1);
        }
        assert!(
            WsStatus::ALL.windows(2).all(|w| (w[0] as u32) < (w[1] as u32)),
            "the table is in the order of the numbers"
        );
        assert_eq!(WsStatus::from_u32(15), None);
        assert_eq!(WsStatus::from_u32(u32::MAX), None);
    }
}
