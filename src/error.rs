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
    /// A certificate file could not be read or holds no certificate.
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
}

impl WsStatus {
    /// Every status, for `ws_status_str` and the tests.
    pub(crate) const ALL: [WsStatus; 26] = [
        WsStatus::Ok,
        WsStatus::NullArgument,
        WsStatus::InvalidArgument,
        WsStatus::InvalidUri,
        WsStatus::InvalidUtf8,
        WsStatus::Gone,
        WsStatus::Closing,
        WsStatus::AlreadyClosing,
        WsStatus::DispatchInProgress,
        WsStatus::SendQueueFull,
        WsStatus::BufferTooSmall,
        WsStatus::Timeout,
        WsStatus::CertificateFile,
        WsStatus::Runtime,
        WsStatus::Panic,
        WsStatus::Dns,
        WsStatus::ConnectFailed,
        WsStatus::Tls,
        WsStatus::HandshakeRejected,
        WsStatus::Protocol,
        WsStatus::ConnectionLost,
        WsStatus::ConnectTimeout,
        WsStatus::CloseTimeout,
        WsStatus::KeepaliveTimeout,
        WsStatus::MessageTooBig,
        WsStatus::Internal,
    ];

    /// The status with this number, if any.
    pub fn from_u32(value: u32) -> Option<WsStatus> {
        Self::ALL.iter().copied().find(|s| *s as u32 == value)
    }

    /// A short, static, NUL-terminated description.
    pub fn describe(self) -> &'static str {
        match self {
            WsStatus::Ok => "ok\0",
            WsStatus::NullArgument => "a required argument is NULL\0",
            WsStatus::InvalidArgument => "invalid argument\0",
            WsStatus::InvalidUri => "invalid URI: an absolute ws: or wss: URI is required\0",
            WsStatus::InvalidUtf8 => "text is not valid UTF-8\0",
            WsStatus::Gone => "the connection is gone\0",
            WsStatus::Closing => "the connection is closing or closed\0",
            WsStatus::AlreadyClosing => "close was already called on this connection\0",
            WsStatus::DispatchInProgress => "a dispatch of this client is already running\0",
            WsStatus::SendQueueFull => "the send queue of the connection is full\0",
            WsStatus::BufferTooSmall => "the buffer is too small\0",
            WsStatus::Timeout => "the time is up\0",
            WsStatus::CertificateFile => "the certificate file could not be used\0",
            WsStatus::Runtime => "the library could not start its threads or event descriptor\0",
            WsStatus::Panic => "internal error: a panic was caught at the C boundary\0",
            WsStatus::Dns => "host name could not be resolved\0",
            WsStatus::ConnectFailed => "TCP connection failed\0",
            WsStatus::Tls => "TLS handshake failed\0",
            WsStatus::HandshakeRejected => "WebSocket handshake rejected\0",
            WsStatus::Protocol => "WebSocket protocol violation\0",
            WsStatus::ConnectionLost => "connection lost\0",
            WsStatus::ConnectTimeout => "connect timeout\0",
            WsStatus::CloseTimeout => "close handshake timeout\0",
            WsStatus::KeepaliveTimeout => "keepalive timeout: the peer stopped answering\0",
            WsStatus::MessageTooBig => "message too big\0",
            WsStatus::Internal => "internal error\0",
        }
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
        Error {
            status,
            message: message.into(),
        }
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
        for s in WsStatus::ALL {
            assert_eq!(WsStatus::from_u32(s as u32), Some(s));
            assert!(s.describe().ends_with('\0'));
            assert_eq!(s.describe().matches('\0').count(), 1);
        }
        assert_eq!(WsStatus::from_u32(15), None);
        assert_eq!(WsStatus::from_u32(u32::MAX), None);
    }
}
