//! The C surface: argument checks, the panic boundary and conversions. No logic lives here.
//!
//! Every exported function's body is one `ffi_boundary!` or `ffi_status!` (a test checks it):
//! a panic never crosses into C.

use std::ffi::CStr;
use std::os::raw::c_char;
use std::sync::Arc;

use crate::conn::Conn;
use crate::error::{set_last_error, Error, WsStatus};
use crate::host::handles::{self, WsConn};

/// Runs `$body`; if it panics, records the panic as the last error and returns `$default`.
/// (A test can make the call panic here: `testing::panic_in_next_call`.)
macro_rules! ffi_boundary {
    ($default:expr, $body:block) => {{
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            $crate::testing::panic_if_asked();
            $body
        })) {
            Ok(value) => value,
            Err(_) => {
                $crate::error::set_last_error("internal error: a panic was caught at the C boundary");
                $default
            }
        }
    }};
}

/// `ffi_boundary!` for functions whose body yields `Result<(), Error>`: returns the status and
/// records the message of a failure as the last error.
macro_rules! ffi_status {
    ($body:block) => {{
        ffi_boundary!($crate::error::WsStatus::Panic, {
            // A closure so that `?` works in the body.
            #[allow(clippy::redundant_closure_call)]
            let result: Result<(), $crate::error::Error> = (|| $body)();
            $crate::ffi::status_of(result)
        })
    }};
}

pub mod client;
pub mod connection;
pub mod options;

pub(crate) fn status_of(result: Result<(), Error>) -> WsStatus {
    match result {
        Ok(()) => WsStatus::Ok,
        Err(e) => {
            set_last_error(&e.message);
            e.status
        }
    }
}

fn null(what: &str) -> Error {
    Error::new(WsStatus::NullArgument, format!("{what} is NULL"))
}

/// A NUL-terminated UTF-8 string argument.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Error> {
    if ptr.is_null() {
        return Err(null(what));
    }
    CStr::from_ptr(ptr)
        .to_str()
        .map_err(|e| Error::new(WsStatus::InvalidUtf8, format!("{what} is not valid UTF-8 ({e})")))
}

/// A NUL-terminated file path: its bytes as they are (paths need not be UTF-8).
unsafe fn c_path<'a>(ptr: *const c_char, what: &str) -> Result<&'a std::path::Path, Error> {
    if ptr.is_null() {
        return Err(null(what));
    }
    use std::os::unix::ffi::OsStrExt;
    Ok(std::path::Path::new(std::ffi::OsStr::from_bytes(CStr::from_ptr(ptr).to_bytes())))
}

/// A (pointer, length) argument; NULL is allowed only with length 0.
unsafe fn byte_slice<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Error> {
    if ptr.is_null() {
        return if len == 0 { Ok(&[]) } else { Err(null(what)) };
    }
    if len > isize::MAX as usize {
        return Err(Error::new(WsStatus::InvalidArgument, format!("{what}: length {len} is too large")));
    }
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// Writes an output parameter, if the caller gave one.
unsafe fn write_out<T>(ptr: *mut T, value: T) {
    if !ptr.is_null() {
        ptr.write(value);
    }
}

fn live(conn: WsConn) -> Result<Arc<Conn>, Error> {
    handles::lookup(conn).ok_or_else(|| {
        Error::new(
            WsStatus::Gone,
            format!("connection {conn:#x} is gone (its final callback has returned, or it never existed)"),
        )
    })
}
