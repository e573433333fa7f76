//! `ws_client_*`, dispatch, and the library-wide functions.

use std::os::raw::{c_char, c_int};
use std::time::Duration;

use super::{c_str, null, write_out};
use crate::client::Client;
use crate::error::{self, Error, WsStatus};
use crate::host::handles::WsConn;
use crate::options::Options;

/// A client context: the library's I/O threads and the event queue of one host event loop.
/// Opaque; create it with ws_client_new() and free it with ws_client_free().
pub struct WsClient {
    inner: Client,
}

/// The library's version, e.g. "0.1.0". Static; any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_version() -> *const c_char {
    ffi_boundary!(std::ptr::null(), { concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast() })
}

/// The library's version as one number, (MAJOR << 16) | (MINOR << 8) | PATCH (0x000100 for
/// 0.1.0), to compare with the header's WSCLIENT_VERSION_NUMBER: a program runs with any library
/// of the same major version that is not older than the header it was compiled against (the
/// ABI only grows). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_version_number() -> u32 {
    ffi_boundary!(0, { VERSION_NUMBER })
}

const VERSION_NUMBER: u32 = (decimal(env!("CARGO_PKG_VERSION_MAJOR")) << 16)
    | (decimal(env!("CARGO_PKG_VERSION_MINOR")) << 8)
    | decimal(env!("CARGO_PKG_VERSION_PATCH"));

// Minor and patch get 8 bits each in the number.
const _: () = assert!(decimal(env!("CARGO_PKG_VERSION_MINOR")) < 256 && decimal(env!("CARGO_PKG_VERSION_PATCH")) < 256);

/// A version component (decimal digits) at compile time.
const fn decimal(digits: &str) -> u32 {
    let digits = digits.as_bytes();
    let mut value = 0;
    let mut i = 0;
    while i < digits.len() {
        value = value * 10 + (digits[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// A static, NUL-terminated description of a status number ("unknown status" for numbers that
/// are not a ws_status). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_status_str(status: u32) -> *const c_char {
    ffi_boundary!(std::ptr::null(), {
        match WsStatus::from_u32(status) {
            Some(s) => s.describe().as_ptr().cast(),
            None => c"unknown status".as_ptr(),
        }
    })
}

/// The message of the last failed call on the calling thread: it says exactly what was wrong
/// ("invalid URI \"http://x\": the scheme is http:, not ws: or wss:"). Valid until the next
/// failing call on this thread; "" if none failed yet. Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_last_error() -> *const c_char {
    ffi_boundary!(std::ptr::null(), { error::last_error_ptr() })
}

/// Creates a client context and starts its I/O thread. Returns NULL on failure (see
/// ws_last_error()). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_client_new() -> *mut WsClient {
    ffi_boundary!(std::ptr::null_mut(), {
        match Client::new() {
            Ok(inner) => Box::into_raw(Box::new(WsClient { inner })),
            Err(e) => {
                error::set_last_error(&e.message);
                std::ptr::null_mut()
            }
        }
    })
}

/// Frees a client: every connection still alive is closed (code 1001, sent best-effort) and
/// becomes gone, without any further callback; the I/O threads stop; it returns within 250 ms.
/// (A DNS look-up still running in the system resolver cannot be interrupted: its thread is
/// abandoned, ends when the resolver returns, and touches nothing of the client.)
/// ws_client_free(NULL) is a no-op returning WS_STATUS_OK.
///
/// Returns WS_STATUS_DISPATCH_IN_PROGRESS and frees nothing if called while a dispatch or
/// ws_run of this client runs (from inside a callback, or on another thread). No other call on this client
/// may run concurrently with it or follow it; calls with its connection handles stay safe and
/// answer WS_STATUS_GONE.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed; once this returns
/// WS_STATUS_OK it must not be used again.
#[no_mangle]
pub unsafe extern "C" fn ws_client_free(client: *mut WsClient) -> WsStatus {
    ffi_status!({
        let Some(c) = client.as_ref() else {
            return Ok(());
        };
        c.inner.hub().begin_shutdown()?;
        Box::from_raw(client).inner.shut_down();
        Ok(())
    })
}

/// The file descriptor that is readable while callbacks are pending: add it to your poll,
/// epoll or select set (for reading) and call ws_dispatch() when it is readable. It stays
/// readable until a dispatch has taken every pending event, so level- and edge-triggered
/// loops both work; a wake-up may be spurious (the dispatch then runs nothing). On Linux it is
/// an epoll instance, which also holds the sockets whose small messages ws_dispatch() reads
/// itself (see ws_dispatch), so that their data wakes your loop directly; elsewhere a pipe.
/// Never read, write or close it. -1 if client is NULL. Any thread, also inside callbacks.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_client_fd(client: *const WsClient) -> c_int {
    ffi_boundary!(-1, {
        match client.as_ref() {
            Some(c) => c.inner.hub().fd(),
            None => -1,
        }
    })
}

/// Tells the library whether your loop watches ws_client_fd() edge-triggered (epoll with
/// EPOLLET, kqueue with EV_CLEAR) or level-triggered (the default). Kept for compatibility: it
/// changes nothing any more. Every ws_dispatch() leaves the descriptor unreadable when it has
/// taken every pending event, whatever the loop (on Linux it must take the ready sockets out of
/// the descriptor anyway, which costs the one system call this declaration used to save), and
/// both kinds of loop are woken for everything that arrives afterwards. Returns
/// WS_STATUS_NULL_ARGUMENT if client is NULL. Any thread, also inside callbacks.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_client_set_fd_edge_triggered(client: *mut WsClient, edge_triggered: bool) -> WsStatus {
    ffi_status!({
        client.as_ref().ok_or_else(|| null("client"))?;
        let _ = edge_triggered;
        Ok(())
    })
}

/// How many of the client's connections are not gone yet (0 if client is NULL). Any thread,
/// also inside callbacks.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_client_connection_count(client: *const WsClient) -> usize {
    ffi_boundary!(0, { client.as_ref().map_or(0, |c| c.inner.hub().live_connections()) })
}

/// Runs the callbacks that are pending now, on the calling thread, which is by definition the
/// host's thread: no callback ever runs anywhere else. Events that arrive during the call wait
/// for the next one, so a busy peer cannot keep it running forever.
///
/// On Linux it first reads, without waiting, the sockets of open connections whose data woke
/// the descriptor, and parses the small whole messages there (up to 16 KiB, unfragmented,
/// uncompressed; a few reads per connection at most), so that a request/reply round trip does
/// not wake the library's I/O thread; their callbacks run in the same call. Everything else
/// (control frames, larger or fragmented or compressed messages, closes, errors, and every
/// connection while this function is not called for 100 ms) is read by the I/O thread.
///
/// `callbacks_run` (optional) receives how many callbacks ran; `more_pending` (optional)
/// whether more are pending already (then call it again, or wait for the fd).
///
/// Returns WS_STATUS_DISPATCH_IN_PROGRESS and runs nothing if a dispatch of this client is
/// already running: from inside a callback (dispatch is not re-entrant) or on another thread.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed; `callbacks_run` and
/// `more_pending` are NULL or point to writable objects of their type.
#[no_mangle]
pub unsafe extern "C" fn ws_dispatch(
    client: *mut WsClient,
    callbacks_run: *mut u32,
    more_pending: *mut bool,
) -> WsStatus {
    ffi_status!({
        let client = client.as_ref().ok_or_else(|| null("client"))?;
        let (ran, more) = client.inner.hub().dispatch()?;
        write_out(callbacks_run, ran);
        write_out(more_pending, more);
        Ok(())
    })
}

/// A ready-made event loop: waits on the fd and dispatches until no connection of the client
/// is left (WS_STATUS_OK) or `timeout_ms` milliseconds have passed (WS_STATUS_TIMEOUT); a
/// negative timeout means no limit. Callbacks run on the calling thread. Not inside a callback
/// (WS_STATUS_DISPATCH_IN_PROGRESS). While it runs, it counts as a dispatch throughout: a
/// ws_dispatch or ws_client_free of this client from another thread is refused with
/// WS_STATUS_DISPATCH_IN_PROGRESS.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_run(client: *mut WsClient, timeout_ms: i32) -> WsStatus {
    ffi_status!({
        let client = client.as_ref().ok_or_else(|| null("client"))?;
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        client.inner.hub().run(timeout)
    })
}

pub(super) unsafe fn connect(
    client: *mut WsClient,
    uri: *const c_char,
    options: Option<&Options>,
    conn_out: *mut WsConn,
) -> Result<(), Error> {
    let client = client.as_ref().ok_or_else(|| null("client"))?;
    let uri = c_str(uri, "uri")?;
    if conn_out.is_null() {
        return Err(null("conn_out"));
    }
    let conn = client.inner.connect(uri, options)?;
    conn_out.write(conn);
    Ok(())
}

/// Starts connecting to an absolute ws: or wss: URI and returns at once with the handle in
/// `*conn_out`: DNS, TCP, TLS and the HTTP upgrade happen on the library's threads. No callback
/// runs before ws_connect has returned, and callbacks registered before the host's next
/// ws_dispatch are in force when the connection opens. Messages sent before it opens are
/// queued and sent in order right after the handshake.
///
/// The URI is `ws://` or `wss://` (any case), a host, an optional port, path and query:
/// - the host is a DNS name (ASCII letters, digits, '-', '.', '_'; sent in lower case), an IPv4
///   address, or an IPv6 address in brackets ("ws://[::1]:9000/"); a non-ASCII host name is
///   refused (give its "xn--" form);
/// - the port is 1 to 65535; absent or empty ("ws://host:/") it is 80 for ws, 443 for wss;
/// - the path and query may hold any character but spaces, control characters and '#'. "/" is
///   sent for an empty path ("ws://host?x=1" asks for "/?x=1"); non-ASCII characters are sent
///   percent-encoded as their UTF-8 bytes (U+00E9 as "%C3%A9"), as browsers do, and so are the
///   ASCII characters a URI cannot carry there (" < > [ \ ] ^ ` { | } and a '%' that starts
///   no %XX escape); everything else, %XX escapes included, is sent as it is;
/// - the Host header is the host (an IPv6 address in brackets), then ":port" unless the port
///   is the scheme's default.
///
/// Fails at once, with no connection made and `*conn_out` untouched, on a NULL argument, a
/// URI that is not valid UTF-8 (WS_STATUS_INVALID_UTF8) or that breaks the rules above: another
/// scheme, no host, a bad port, spaces or control characters, a fragment ('#'), user
/// information ("user@host"), an IPv6 zone identifier (WS_STATUS_INVALID_URI, and
/// ws_last_error() says which). Any thread, also inside callbacks (for example to reconnect
/// from a close callback).
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed; `uri` is NULL or a
/// NUL-terminated string; `conn_out` is NULL or points to a writable ws_conn.
#[no_mangle]
pub unsafe extern "C" fn ws_connect(client: *mut WsClient, uri: *const c_char, conn_out: *mut WsConn) -> WsStatus {
    ffi_status!({ connect(client, uri, None, conn_out) })
}
