//! The C callback types a host registers, and the one place that calls them.

use std::ffi::c_void;
use std::os::raw::c_char;

use crate::error::WsStatus;
use crate::host::handles::WsConn;

/// The kind of a received message.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WsMessageKind {
    /// A text message: the bytes are valid UTF-8, followed by a NUL that `len` does not count.
    Text = 1,
    /// A binary message.
    Binary = 2,
}

/// Called once when the connection is established (after the HTTP upgrade succeeded).
pub type WsOpenCallback = Option<unsafe extern "C" fn(conn: WsConn, user: *mut c_void)>;

/// Called for each received message. `data` is valid only until the callback returns; copy what
/// you keep. A text message is valid UTF-8 and `data[len]` is a NUL (a U+0000 inside the text
/// survives because `len` is given); a binary message of length 0 may have any non-NULL `data`.
pub type WsMessageCallback =
    Option<unsafe extern "C" fn(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void)>;

/// Final callback when a close handshake completed, whichever side started it. `code` is the code
/// of the peer's close frame (1005 if it had none; 1006 if the application closed the connection
/// before it opened). `reason` is UTF-8, `reason_len` bytes plus a NUL, valid only during the call.
/// After it returns the connection is gone.
pub type WsCloseCallback =
    Option<unsafe extern "C" fn(conn: WsConn, code: u16, reason: *const c_char, reason_len: usize, user: *mut c_void)>;

/// Final callback for every other end of a connection: `kind` is one of the error-callback
/// statuses (WS_STATUS_DNS .. WS_STATUS_INTERNAL) and `message` a human-readable, NUL-terminated
/// reason ("connection refused", "TLS: certificate not valid for name localhost", ...), valid only
/// during the call. After it returns the connection is gone.
pub type WsErrorCallback =
    Option<unsafe extern "C" fn(conn: WsConn, kind: WsStatus, message: *const c_char, user: *mut c_void)>;

/// The host's opaque pointer. The library never dereferences it; it only hands it back on the
/// host's thread, so moving it between threads is sound.
#[derive(Clone, Copy, Debug)]
pub struct UserPtr(pub *mut c_void);
unsafe impl Send for UserPtr {}

impl Default for UserPtr {
    fn default() -> UserPtr {
        UserPtr(std::ptr::null_mut())
    }
}

/// One connection's registered callbacks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Callbacks {
    pub open: (WsOpenCallback, UserPtr),
    pub message: (WsMessageCallback, UserPtr),
    pub close: (WsCloseCallback, UserPtr),
    pub error: (WsErrorCallback, UserPtr),
}

/// Calls into the host. Each returns whether a callback was registered (and so ran).
///
/// Safety for all of them: called only from `ws_dispatch` on the host's thread; the pointers
/// passed are valid for the lengths given for the whole call.
pub fn call_open(cb: (WsOpenCallback, UserPtr), conn: WsConn) -> bool {
    let (Some(f), user) = cb else { return false };
    unsafe { f(conn, user.0) };
    true
}

pub fn call_message(cb: (WsMessageCallback, UserPtr), conn: WsConn, data: &[u8], kind: WsMessageKind) -> bool {
    let (Some(f), user) = cb else { return false };
    unsafe { f(conn, data.as_ptr(), data.len(), kind, user.0) };
    true
}

/// `reason` must end with a NUL that is not part of the reason.
pub fn call_close(cb: (WsCloseCallback, UserPtr), conn: WsConn, code: u16, reason: &[u8]) -> bool {
    let (Some(f), user) = cb else { return false };
    debug_assert_eq!(reason.last(), Some(&0));
    unsafe { f(conn, code, reason.as_ptr().cast(), reason.len() - 1, user.0) };
    true
}

/// `message` must end with a NUL and contain no other.
pub fn call_error(cb: (WsErrorCallback, UserPtr), conn: WsConn, kind: WsStatus, message: &[u8]) -> bool {
    let (Some(f), user) = cb else { return false };
    debug_assert_eq!(message.last(), Some(&0));
    unsafe { f(conn, kind, message.as_ptr().cast(), user.0) };
    true
}
