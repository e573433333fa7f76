//! `ws_options_*`: connection options that can grow without breaking the ABI.

use std::os::raw::c_char;
use std::time::Duration;

use super::client::{connect, WsClient};
use super::{c_path, c_str, null};
use crate::error::{Error, WsStatus};
use crate::host::handles::WsConn;
use crate::io::proxy;
use crate::io::redirect::MAX_REDIRECTS;
use crate::options::Options;

/// Options for ws_connect_with_options(). Opaque; create with ws_options_new(), free with
/// ws_options_free(). One thread at a time may use an options object; connect copies it, so it
/// may be changed or freed right after. Certificates and keys are read when set and shared by
/// the copies, never read again.
pub struct WsOptions {
    inner: Options,
}

unsafe fn options_mut<'a>(options: *mut WsOptions) -> Result<&'a mut Options, Error> {
    options.as_mut().map(|o| &mut o.inner).ok_or_else(|| null("options"))
}

fn millis(ms: u32, what: &str) -> Result<Duration, Error> {
    if ms == 0 {
        return Err(Error::new(WsStatus::InvalidArgument, format!("{what} must be at least 1 ms")));
    }
    Ok(Duration::from_millis(ms.into()))
}

/// New options holding the defaults (those of plain ws_connect). NULL only if out of memory.
/// Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_options_new() -> *mut WsOptions {
    ffi_boundary!(std::ptr::null_mut(), { Box::into_raw(Box::new(WsOptions { inner: Options::default() })) })
}

/// Frees options; NULL is a no-op. Any thread, also inside callbacks.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed; afterwards it must not
/// be used again.
#[no_mangle]
pub unsafe extern "C" fn ws_options_free(options: *mut WsOptions) {
    ffi_boundary!((), {
        if !options.is_null() {
            drop(Box::from_raw(options));
        }
    })
}

/// Also trusts the CA certificates of a PEM file (read now), in addition to the system's trust
/// store. WS_STATUS_CERTIFICATE_FILE if it cannot be read, is not a regular file or is larger
/// than 16 MiB, or holds no certificate. A certificate in it that is not a CA (a server's own
/// certificate, to pin it) is trusted as itself only: its key vouches for no other certificate.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed; `pem_path` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ws_options_add_ca_file(options: *mut WsOptions, pem_path: *const c_char) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        options.add_ca_file(c_path(pem_path, "pem_path")?)
    })
}

/// Presents a client certificate to servers that ask for one (mutual TLS). `chain_pem_path` is a
/// PEM file with the client's certificate first, then any intermediate CA certificates;
/// `key_pem_path` is a PEM file with its private key: PKCS#8 ("PRIVATE KEY"), PKCS#1
/// ("RSA PRIVATE KEY") or SEC1 ("EC PRIVATE KEY"), not encrypted. Both are read and checked now,
/// once: WS_STATUS_CERTIFICATE_FILE if a file cannot be read, is not a regular file or is
/// larger than 16 MiB, holds no certificate or no key, or the key does not match the
/// certificate (ws_last_error() says which). Setting it again
/// replaces it. A server that refuses the certificate fails the connection with WS_STATUS_TLS,
/// naming the server's alert ("unknown CA", "certificate required", ...).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed; `chain_pem_path` and
/// `key_pem_path` are NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_client_certificate(
    options: *mut WsOptions,
    chain_pem_path: *const c_char,
    key_pem_path: *const c_char,
) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        options.set_client_certificate(c_path(chain_pem_path, "chain_pem_path")?, c_path(key_pem_path, "key_pem_path")?)
    })
}

/// Adds an HTTP header to the upgrade request (e.g. "Authorization"). The headers the
/// WebSocket handshake sets itself (Host, Connection, Upgrade, Sec-WebSocket-*) are refused
/// with WS_STATUS_INVALID_ARGUMENT; use ws_options_add_subprotocol for subprotocols.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed; `name` and `value` are
/// NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn ws_options_add_header(
    options: *mut WsOptions,
    name: *const c_char,
    value: *const c_char,
) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        options.add_header(c_str(name, "name")?, c_str(value, "value")?)
    })
}

/// Offers a subprotocol (in the order added). After open, ws_protocol() tells which one the
/// server chose; a server that chooses one not offered, or more than one, fails the handshake.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed; `protocol` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ws_options_add_subprotocol(options: *mut WsOptions, protocol: *const c_char) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        options.add_subprotocol(c_str(protocol, "protocol")?)
    })
}

/// The proxy for the connections made with these options, instead of the one the environment
/// names: `http://[user:password@]host[:port]` (HTTP CONNECT; `http://` may be omitted),
/// `socks5://...` (the library resolves the server's name) or `socks5h://...` (the proxy
/// resolves it); the port defaults to 1080, as with curl; user name and password are
/// percent-decoded. An empty string means no proxy, whatever the environment says.
/// Without this call the environment decides when each connection starts, as curl does:
/// ws uses `ws_proxy` then `http_proxy`, wss `wss_proxy` then `https_proxy`, both then
/// `all_proxy`, lowercase before uppercase, and `no_proxy` lists the hosts to reach directly
/// (the README's "Proxies" section has the rules). WS_STATUS_INVALID_ARGUMENT for a URL that
/// is not one of these (ws_last_error() says why).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed; `url` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_proxy(options: *mut WsOptions, url: *const c_char) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        options.proxy = proxy::choice::setting(c_str(url, "url")?)?;
        Ok(())
    })
}

/// Follows up to `max_redirects` redirects (HTTP 301, 302, 307, 308) of the upgrade request
/// (default 0: a redirect fails the connection with WS_STATUS_HANDSHAKE_REJECTED, naming the
/// Location, as browsers' WebSocket does). A relative Location is resolved against the current
/// URI; http: and https: Locations are taken as ws: and wss:. A redirect from wss: to ws: is
/// refused. The Authorization and Cookie headers added with ws_options_add_header go only to
/// the scheme, host and port they were given for, as curl does. At most 30
/// (WS_STATUS_INVALID_ARGUMENT above).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_follow_redirects(options: *mut WsOptions, max_redirects: u32) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        if max_redirects > MAX_REDIRECTS {
            return Err(Error::new(
                WsStatus::InvalidArgument,
                format!("at most {MAX_REDIRECTS} redirects can be followed, not {max_redirects}"),
            ));
        }
        options.max_redirects = max_redirects;
        Ok(())
    })
}

/// Time allowed for DNS, TCP, TLS and the upgrade together (default 30000 ms; at least 1).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_connect_timeout_ms(options: *mut WsOptions, timeout_ms: u32) -> WsStatus {
    ffi_status!({
        options_mut(options)?.connect_timeout = millis(timeout_ms, "the connect timeout")?;
        Ok(())
    })
}

/// Time the peer has to complete a close handshake before the connection ends with
/// WS_STATUS_CLOSE_TIMEOUT (default 10000 ms; at least 1).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_close_timeout_ms(options: *mut WsOptions, timeout_ms: u32) -> WsStatus {
    ffi_status!({
        options_mut(options)?.close_timeout = millis(timeout_ms, "the close timeout")?;
        Ok(())
    })
}

/// Keepalive: after `interval_ms` without receiving anything, send a ping; if nothing arrives
/// within `timeout_ms` after it, end with WS_STATUS_KEEPALIVE_TIMEOUT. Default 30000 and
/// 30000; interval 0 turns keepalive pings off. Silence while the library is not reading (flow
/// control, slow host) does not count.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_keepalive(
    options: *mut WsOptions,
    interval_ms: u32,
    timeout_ms: u32,
) -> WsStatus {
    ffi_status!({
        let options = options_mut(options)?;
        let timeout = millis(timeout_ms, "the keepalive timeout")?;
        options.keepalive_interval = (interval_ms > 0).then(|| Duration::from_millis(interval_ms.into()));
        options.keepalive_timeout = timeout;
        Ok(())
    })
}

/// Largest message (and frame) accepted from the peer; a larger one fails the connection with
/// close code 1009 and WS_STATUS_MESSAGE_TOO_BIG. Default 64 MiB; at least 1.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_max_message_size(options: *mut WsOptions, bytes: usize) -> WsStatus {
    ffi_status!({ options_mut(options)?.set_max_message_size(bytes) })
}

/// Bytes read from the socket at a time (default 64 KiB, 256 B .. 16 MiB). The buffer exists
/// only while received bytes wait to be parsed: an idle connection holds none. A frame of
/// 16 KiB or more that has not fully arrived is read straight into an allocation of its own
/// (which becomes the message), whatever this size.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_read_buffer_size(options: *mut WsOptions, bytes: usize) -> WsStatus {
    ffi_status!({ options_mut(options)?.set_read_buffer_size(bytes) })
}

/// Received bytes that may wait for the host's dispatch before the library stops reading the
/// socket (default 1 MiB; at least 1). Memory per connection for received data stays below
/// this plus one message.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_receive_queue_limit(options: *mut WsOptions, bytes: usize) -> WsStatus {
    ffi_status!({
        if bytes == 0 {
            return Err(Error::new(WsStatus::InvalidArgument, "the receive queue limit must be at least 1 byte"));
        }
        options_mut(options)?.receive_queue_limit = bytes;
        Ok(())
    })
}

/// Bytes that may wait to be sent before ws_send refuses with WS_STATUS_SEND_QUEUE_FULL
/// (default 64 MiB; at least 1).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_send_queue_limit(options: *mut WsOptions, bytes: usize) -> WsStatus {
    ffi_status!({
        if bytes == 0 {
            return Err(Error::new(WsStatus::InvalidArgument, "the send queue limit must be at least 1 byte"));
        }
        options_mut(options)?.send_queue_limit = bytes;
        Ok(())
    })
}

/// Whether ws_dispatch() may read this connection's small messages itself (default true; Linux
/// only, elsewhere the I/O thread always reads). With true, while the host dispatches, data
/// arriving on an open connection wakes the host's loop directly and ws_dispatch() reads and
/// parses whole messages of up to 16 KiB (unfragmented, uncompressed) before their callbacks:
/// a request/reply round trip then wakes one thread instead of two. This starts from the
/// connection's second message, and only while the last message it read was small (see the
/// README's Threading contract for what goes back to the I/O thread). With false, the library's
/// I/O thread reads every byte, and the host's thread runs callbacks only (for hosts whose
/// dispatching thread must spend nothing but the callbacks' time).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_read_on_dispatch(options: *mut WsOptions, enabled: bool) -> WsStatus {
    ffi_status!({
        options_mut(options)?.read_on_dispatch = enabled;
        Ok(())
    })
}

/// permessage-deflate (RFC 7692): compression of messages, offered by default (enabled = true).
/// With it off the upgrade request offers no extension. Whether a connection compresses is
/// the server's choice: one that declines gets a plain connection. Compression and
/// decompression run on the library's I/O thread, never on the caller's.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_deflate(options: *mut WsOptions, enabled: bool) -> WsStatus {
    ffi_status!({
        options_mut(options)?.deflate.enabled = enabled;
        Ok(())
    })
}

/// permessage-deflate window sizes, as powers of two: `client_bits` (9..15, default 15) is the
/// largest window this client compresses with, offered as client_max_window_bits (the server
/// may lower it); `server_bits` (8..15, default 15) is the largest the server may use, requested
/// as server_max_window_bits below 15. The window received with context takeover is kept per
/// connection between messages (up to 2^server_bits bytes), so a smaller server window bounds
/// the memory of idle connections. Out of range: WS_STATUS_INVALID_ARGUMENT.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_deflate_window_bits(
    options: *mut WsOptions,
    client_bits: u32,
    server_bits: u32,
) -> WsStatus {
    ffi_status!({ options_mut(options)?.set_deflate_window_bits(client_bits, server_bits) })
}

/// permessage-deflate compression level, 1 (fastest) to 9 (smallest), default 6 (zlib's
/// default). Out of range: WS_STATUS_INVALID_ARGUMENT.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_deflate_level(options: *mut WsOptions, level: u32) -> WsStatus {
    ffi_status!({ options_mut(options)?.set_deflate_level(level) })
}

/// permessage-deflate context takeover: `client_no_takeover` offers client_no_context_takeover
/// (each message we send is compressed on its own: larger on the wire, and no sent bytes kept
/// between messages); `server_no_takeover` requests server_no_context_takeover (the server
/// compresses each message on its own; nothing received is kept between messages). Both
/// default to false (context kept both ways, as browsers and most clients do).
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_deflate_no_context_takeover(
    options: *mut WsOptions,
    client_no_takeover: bool,
    server_no_takeover: bool,
) -> WsStatus {
    ffi_status!({
        let deflate = &mut options_mut(options)?.deflate;
        (deflate.client_no_context_takeover, deflate.server_no_context_takeover) =
            (client_no_takeover, server_no_takeover);
        Ok(())
    })
}

/// With permessage-deflate negotiated, messages shorter than `bytes` go out uncompressed
/// (default 32; 0 compresses every message). Messages that would not shrink go out
/// uncompressed whatever their size.
/// Any thread, also inside callbacks; one thread at a time per options object.
///
/// # Safety
/// `options` is NULL or a pointer from ws_options_new() that was not freed.
#[no_mangle]
pub unsafe extern "C" fn ws_options_set_deflate_threshold(options: *mut WsOptions, bytes: usize) -> WsStatus {
    ffi_status!({
        options_mut(options)?.deflate.threshold = bytes;
        Ok(())
    })
}

/// ws_connect() with options (NULL options means the defaults); the options are copied. Any
/// thread, also inside callbacks.
///
/// # Safety
/// `client` is NULL or a pointer from ws_client_new() that was not freed; `options` is NULL or a
/// live options object; `uri` is NULL or a NUL-terminated string; `conn_out` is NULL or points to a
/// writable ws_conn.
#[no_mangle]
pub unsafe extern "C" fn ws_connect_with_options(
    client: *mut WsClient,
    uri: *const c_char,
    options: *const WsOptions,
    conn_out: *mut WsConn,
) -> WsStatus {
    ffi_status!({ connect(client, uri, options.as_ref().map(|o| &o.inner), conn_out) })
}
