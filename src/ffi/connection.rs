//! Functions on one connection, named by its `ws_conn` handle. All of them may be called from
//! any thread and from inside callbacks; on a gone handle they answer WS_STATUS_GONE.

use std::ffi::c_void;
use std::os::raw::c_char;

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

use super::{byte_slice, c_str, live, null, write_out};
use crate::conn::Conn;
use crate::error::{Error, WsStatus};
use crate::host::callbacks::{UserPtr, WsCloseCallback, WsErrorCallback, WsMessageCallback, WsOpenCallback};
use crate::host::handles::WsConn;

/// Sets (or with NULL clears) the open callback; see ws_open_cb. A later registration replaces
/// the earlier one.
/// A registration is in force for every callback that starts after it returned: called from
/// another thread while a callback of this connection runs, it waits for that callback to
/// return (so the old callback's `user` may be freed as soon as it returns). Called from
/// inside a callback, it applies from the next callback on and does not wait (a callback of
/// another event loop's connection may still be running). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_on_open(conn: WsConn, callback: WsOpenCallback, user: *mut c_void) -> WsStatus {
    ffi_status!({
        live(conn)?.set_callbacks(|c| c.open = (callback, UserPtr(user)));
        Ok(())
    })
}

/// Sets (or with NULL clears) the message callback; see ws_message_cb. As ws_on_open().
///
/// A registration is in force for every callback that starts after it returned: called from
/// another thread while a callback of this connection runs, it waits for that callback to
/// return (so the old callback's `user` may be freed as soon as it returns). Called from
/// inside a callback, it applies from the next callback on and does not wait (a callback of
/// another event loop's connection may still be running). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_on_message(conn: WsConn, callback: WsMessageCallback, user: *mut c_void) -> WsStatus {
    ffi_status!({
        live(conn)?.set_callbacks(|c| c.message = (callback, UserPtr(user)));
        Ok(())
    })
}

/// Sets (or with NULL clears) the close callback; see ws_close_cb. As ws_on_open().
///
/// A registration is in force for every callback that starts after it returned: called from
/// another thread while a callback of this connection runs, it waits for that callback to
/// return (so the old callback's `user` may be freed as soon as it returns). Called from
/// inside a callback, it applies from the next callback on and does not wait (a callback of
/// another event loop's connection may still be running). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_on_close(conn: WsConn, callback: WsCloseCallback, user: *mut c_void) -> WsStatus {
    ffi_status!({
        live(conn)?.set_callbacks(|c| c.close = (callback, UserPtr(user)));
        Ok(())
    })
}

/// Sets (or with NULL clears) the error callback; see ws_error_cb. As ws_on_open().
///
/// A registration is in force for every callback that starts after it returned: called from
/// another thread while a callback of this connection runs, it waits for that callback to
/// return (so the old callback's `user` may be freed as soon as it returns). Called from
/// inside a callback, it applies from the next callback on and does not wait (a callback of
/// another event loop's connection may still be running). Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_on_error(conn: WsConn, callback: WsErrorCallback, user: *mut c_void) -> WsStatus {
    ffi_status!({
        live(conn)?.set_callbacks(|c| c.error = (callback, UserPtr(user)));
        Ok(())
    })
}

/// Sends a text message of `len` bytes (no NUL needed; embedded NULs are sent). The bytes are
/// copied (or written) before it returns. Before the connection opens, messages wait and go out
/// in order right after the handshake. A message of at most 16 KiB with nothing queued before
/// it is written to the socket on the calling thread with one non-blocking write (sent from
/// inside a callback of the same client, when its dispatch batch ends or the callback
/// dispatches another client, together with the batch's other sends);
/// anything else, and what the socket does not take, is written by the library's I/O thread.
/// Messages go out in the order of the calls that sent them, whatever the threads.
///
/// WS_STATUS_INVALID_UTF8 if the text is not valid UTF-8 (nothing is sent);
/// WS_STATUS_CLOSING after ws_close or once the connection has ended; WS_STATUS_SEND_QUEUE_FULL
/// if the bytes waiting to be sent would pass the send queue limit. Any thread, also inside
/// callbacks.
///
/// # Safety
/// `text` points to `len` readable bytes (it may be NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn ws_send(conn: WsConn, text: *const c_char, len: usize) -> WsStatus {
    ffi_status!({
        let bytes = byte_slice(text.cast(), len, "text")?;
        let conn = live(conn)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::new(WsStatus::InvalidUtf8, format!("text is not valid UTF-8 ({e})")))?;
        conn.send_text(text)
    })
}

/// Queues a binary message of `len` bytes (copied before it returns). Otherwise as ws_send().
/// Any thread, also inside callbacks.
///
/// # Safety
/// `data` points to `len` readable bytes (it may be NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn ws_send_binary(conn: WsConn, data: *const c_void, len: usize) -> WsStatus {
    ffi_status!({
        let bytes = byte_slice(data.cast(), len, "data")?;
        live(conn)?.send_binary(bytes)
    })
}

/// Starts the close handshake after the messages already queued: `code` 0 means 1000, else
/// 1000 or 3000..4999; `reason` (NULL for none) is UTF-8 of at most 123 bytes, NUL-terminated
/// (ws_close_with_reason() takes a length instead, for a reason that holds U+0000). The close (or
/// error) callback follows; the close timeout bounds all of it, the queued messages included
/// (WS_STATUS_CLOSE_TIMEOUT if the peer does not take them and answer in time). While
/// connecting, it aborts the connection and the close callback follows with code 1006. If the
/// peer started the close first, it returns WS_STATUS_OK and the close callback follows with the
/// peer's code. A second call does nothing and returns WS_STATUS_ALREADY_CLOSING; a call from
/// inside the final callback returns WS_STATUS_CLOSING (the connection has ended).
/// Any thread, also inside callbacks.
///
/// # Safety
/// `reason` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ws_close(conn: WsConn, code: u16, reason: *const c_char) -> WsStatus {
    ffi_status!({
        let conn = live(conn)?;
        let reason = if reason.is_null() { "" } else { c_str(reason, "reason")? };
        close(&conn, code, reason)
    })
}

/// As ws_close(), with a reason of `reason_len` bytes instead of a NUL-terminated one (as
/// ws_send() and the close callback take text), so that a reason may hold U+0000: UTF-8 of at
/// most 123 bytes; `reason` may be NULL when `reason_len` is 0. Checked exactly as ws_close()
/// checks its arguments. Any thread, also inside callbacks.
///
/// # Safety
/// `reason` points to `reason_len` readable bytes (it may be NULL when `reason_len` is 0).
#[no_mangle]
pub unsafe extern "C" fn ws_close_with_reason(
    conn: WsConn,
    code: u16,
    reason: *const c_char,
    reason_len: usize,
) -> WsStatus {
    ffi_status!({
        let bytes = byte_slice(reason.cast(), reason_len, "reason")?;
        let conn = live(conn)?;
        let reason = std::str::from_utf8(bytes)
            .map_err(|e| Error::new(WsStatus::InvalidUtf8, format!("reason is not valid UTF-8 ({e})")))?;
        close(&conn, code, reason)
    })
}

/// What ws_close and ws_close_with_reason share once the reason is UTF-8: the code and length
/// checks, then the close.
fn close(conn: &Conn, code: u16, reason: &str) -> Result<(), Error> {
    let code = if code == 0 { 1000 } else { code };
    if !(code == 1000 || (3000..=4999).contains(&code)) {
        return Err(Error::new(WsStatus::InvalidArgument, format!("close code {code} is not 1000 or 3000..4999")));
    }
    if reason.len() > 123 {
        return Err(Error::new(WsStatus::InvalidArgument, "close reason is longer than 123 bytes"));
    }
    conn.close(CloseFrame { code: CloseCode::from(code), reason: reason.into() })
}

/// Turns flow control on or off (off by default). On: after each message callback, no further
/// message callback runs until ws_message_complete() is called (inside the callback or any time
/// later, from any thread), and meanwhile the library stops reading the socket so TCP
/// back-pressure reaches the server. The close or error callback, too, waits until the last
/// message is completed. Off: messages are delivered as fast as the host dispatches. Turning it
/// off releases a held message. Turned on from another thread while a callback of this
/// connection runs, it waits for that callback to return: at most one message callback starts
/// after it returned before the hold. Any thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_set_flow_control(conn: WsConn, enabled: bool) -> WsStatus {
    ffi_status!({
        live(conn)?.set_flow_control(enabled);
        Ok(())
    })
}

/// Tells the library that the last message has been handled: with flow control on, the next
/// message may be delivered. Harmless (WS_STATUS_OK) when no message is waiting for it. Any
/// thread, also inside callbacks.
#[no_mangle]
pub extern "C" fn ws_message_complete(conn: WsConn) -> WsStatus {
    ffi_status!({
        live(conn)?.message_complete();
        Ok(())
    })
}

/// Writes to `*bytes_out` how many payload bytes were accepted by ws_send/ws_send_binary and
/// not yet written to the socket (the browser's bufferedAmount). Any thread, also inside
/// callbacks.
///
/// # Safety
/// `bytes_out` is NULL or points to a writable size_t.
#[no_mangle]
pub unsafe extern "C" fn ws_buffered_amount(conn: WsConn, bytes_out: *mut usize) -> WsStatus {
    ffi_status!({
        if bytes_out.is_null() {
            return Err(null("bytes_out"));
        }
        write_out(bytes_out, live(conn)?.buffered_amount());
        Ok(())
    })
}

/// Copies the subprotocol the server chose (NUL-terminated; "" if none, or not open yet) into
/// `buf` of `buf_len` bytes and its length (without the NUL) to `*len_out` (optional). If it
/// does not fit, returns WS_STATUS_BUFFER_TOO_SMALL with the size `buf` needs (the length plus
/// one, for the NUL) in `*len_out`. Any thread, also inside callbacks.
///
/// # Safety
/// `buf` is NULL or points to `buf_len` writable bytes; `len_out` is NULL or points to a writable
/// size_t.
#[no_mangle]
pub unsafe extern "C" fn ws_protocol(conn: WsConn, buf: *mut c_char, buf_len: usize, len_out: *mut usize) -> WsStatus {
    ffi_status!({ copy_string_out(&live(conn)?.protocol().unwrap_or_default(), "protocol", buf, buf_len, len_out) })
}

/// Copies the extensions in force on the connection (NUL-terminated; "" if none, or not open
/// yet) into `buf` of `buf_len` bytes and its length (without the NUL) to `*len_out`
/// (optional), as ws_protocol() does. With compression negotiated it reads
/// "permessage-deflate; client_max_window_bits=N; server_max_window_bits=M", then
/// "; client_no_context_takeover" and "; server_no_context_takeover" where they apply: the
/// parameters in force, whether the server named them or they are the defaults. Any thread,
/// also inside callbacks.
///
/// # Safety
/// `buf` is NULL or points to `buf_len` writable bytes; `len_out` is NULL or points to a writable
/// size_t.
#[no_mangle]
pub unsafe extern "C" fn ws_extensions(
    conn: WsConn,
    buf: *mut c_char,
    buf_len: usize,
    len_out: *mut usize,
) -> WsStatus {
    ffi_status!({
        copy_string_out(&live(conn)?.extensions().unwrap_or_default(), "extension list", buf, buf_len, len_out)
    })
}

/// Copies `value` and a NUL into `buf`, its length to `*len_out` (if not NULL); too small a
/// buffer: WS_STATUS_BUFFER_TOO_SMALL, with the size needed in `*len_out`.
unsafe fn copy_string_out(
    value: &str,
    what: &str,
    buf: *mut c_char,
    buf_len: usize,
    len_out: *mut usize,
) -> Result<(), Error> {
    let needed = value.len() + 1;
    if buf.is_null() || buf_len < needed {
        write_out(len_out, needed);
        return Err(Error::new(
            WsStatus::BufferTooSmall,
            format!("the {what} needs a buffer of {needed} bytes (its length plus the NUL)"),
        ));
    }
    write_out(len_out, value.len());
    std::ptr::copy_nonoverlapping(value.as_ptr(), buf.cast(), value.len());
    *buf.add(value.len()) = 0;
    Ok(())
}
