//! Bad input answered with a clear status and message: NULL, invalid URIs, invalid UTF-8,
//! gone handles, bad option values. Never a crash.

mod common;

use std::os::raw::c_char;
use std::ptr::{null, null_mut};

use common::server::TestServer;
use common::*;

#[test]
fn invalid_uris_are_refused_at_once() {
    let client = Client::new();
    for uri in [
        "",
        "http://127.0.0.1/",
        "https://example.com/",
        "/relative",
        "example.com/path",
        "ws://",
        "ws:///nohost",
        "ws://host:0/",
        "ws://host:65536/",
        "ws://host:port/",
        "ws://ho st/",
        "ws://host/with space",
        "ws://host/#fragment",
    ] {
        let mut conn: WsConn = 12345;
        let status = unsafe { ws_connect(client.0, cstr(uri).as_ptr(), &mut conn) };
        assert_eq!(status, WsStatus::InvalidUri, "{uri:?}");
        assert_eq!(conn, 12345, "conn_out is untouched on failure");
        assert!(last_error().starts_with("invalid URI"), "{uri:?}: {}", last_error());
    }
    assert_eq!(unsafe { ws_client_connection_count(client.0) }, 0);
}

#[test]
fn null_and_non_utf8_arguments() {
    let server = TestServer::start();
    let client = Client::new();
    let url = cstr(&server.url("/echo"));
    let mut conn = 0;
    unsafe {
        assert_eq!(ws_connect(null_mut(), url.as_ptr(), &mut conn), WsStatus::NullArgument);
        assert_eq!(ws_connect(client.0, null(), &mut conn), WsStatus::NullArgument);
        assert_eq!(ws_connect(client.0, url.as_ptr(), null_mut()), WsStatus::NullArgument);
        assert!(last_error().contains("conn_out"), "{}", last_error());
        let latin1 = b"ws://h\xe9/\0";
        assert_eq!(ws_connect(client.0, latin1.as_ptr().cast(), &mut conn), WsStatus::InvalidUtf8);
        assert_eq!(ws_connect_with_options(client.0, url.as_ptr(), null(), &mut conn), WsStatus::Ok);
        assert_eq!(ws_dispatch(null_mut(), null_mut(), null_mut()), WsStatus::NullArgument);
        assert_eq!(ws_run(null_mut(), 0), WsStatus::NullArgument);
        assert_eq!(ws_client_fd(null()), -1);
        assert_eq!(ws_client_connection_count(null()), 0);
        assert_eq!(ws_client_set_fd_edge_triggered(null_mut(), true), WsStatus::NullArgument);
        assert!(last_error().contains("client"), "{}", last_error());
        assert_eq!(ws_client_free(null_mut()), WsStatus::Ok);

        assert_eq!(ws_send(conn, null(), 3), WsStatus::NullArgument);
        assert_eq!(ws_send(conn, null(), 0), WsStatus::Ok, "NULL with length 0 is an empty message");
        let bad = b"caf\xe9";
        assert_eq!(ws_send(conn, bad.as_ptr().cast(), bad.len()), WsStatus::InvalidUtf8);
        assert!(last_error().contains("UTF-8"));
        let truncated = "é".as_bytes();
        assert_eq!(ws_send(conn, truncated.as_ptr().cast(), 1), WsStatus::InvalidUtf8);
        assert_eq!(ws_send_binary(conn, null(), 1), WsStatus::NullArgument);
        assert_eq!(ws_buffered_amount(conn, null_mut()), WsStatus::NullArgument);
        assert_eq!(ws_close(conn, 999, null()), WsStatus::InvalidArgument);
        assert_eq!(ws_close(conn, 1005, null()), WsStatus::InvalidArgument);
        assert_eq!(ws_close(conn, 5000, null()), WsStatus::InvalidArgument);
        let long = cstr(&"x".repeat(124));
        assert_eq!(ws_close(conn, 1000, long.as_ptr()), WsStatus::InvalidArgument);
        // A C string: NUL-terminated (AddressSanitizer caught strlen reading past `bad`).
        assert_eq!(ws_close(conn, 1000, c"caf\xe9".as_ptr()), WsStatus::InvalidUtf8);
        // ws_close_with_reason checks exactly what ws_close checks, the reason by its length.
        let r = |reason: &[u8]| reason.as_ptr().cast::<c_char>();
        assert_eq!(ws_close_with_reason(conn, 999, null(), 0), WsStatus::InvalidArgument);
        assert_eq!(ws_close_with_reason(conn, 1005, null(), 0), WsStatus::InvalidArgument);
        assert_eq!(ws_close_with_reason(conn, 5000, null(), 0), WsStatus::InvalidArgument);
        assert!(last_error().contains("close code 5000"), "{}", last_error());
        let long = "x".repeat(124);
        assert_eq!(ws_close_with_reason(conn, 1000, r(long.as_bytes()), 124), WsStatus::InvalidArgument);
        assert!(last_error().contains("123 bytes"), "{}", last_error());
        assert_eq!(ws_close_with_reason(conn, 1000, null(), 1), WsStatus::NullArgument);
        assert_eq!(ws_close_with_reason(conn, 1000, r(b"caf\xe9"), 4), WsStatus::InvalidUtf8);
        assert_eq!(ws_close_with_reason(conn, 1000, r("é".as_bytes()), 1), WsStatus::InvalidUtf8, "cut mid-character");
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        let mut small = [0i8; 1];
        let mut len = 99;
        assert_eq!(ws_protocol(conn, small.as_mut_ptr(), small.len(), &mut len), WsStatus::Ok);
        assert_eq!(len, 0);
        assert_eq!(ws_protocol(conn, null_mut(), 0, &mut len), WsStatus::BufferTooSmall);
    }
}

#[test]
fn gone_and_invented_handles_answer_gone() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/close?code=1000"));
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    // Invented handles that no live connection can have (the table is shared by parallel tests):
    // generation 0 is never issued, nor any at or above 2^21 (handles stay below 2^53).
    for handle in [conn, 0, 1, u64::MAX, (conn & 0xffff_ffff) | (0x8000_0000 << 32), conn ^ (1 << 62)] {
        unsafe {
            assert_eq!(send_text(handle, "x"), WsStatus::Gone, "{handle:#x}");
            assert_eq!(ws_send_binary(handle, b"x".as_ptr().cast(), 1), WsStatus::Gone);
            assert_eq!(ws_close(handle, 0, null()), WsStatus::Gone);
            // Gone comes first, whatever else is wrong with the call.
            let invalid_utf8 = [0xffu8, 0xfe];
            assert_eq!(ws_send(handle, invalid_utf8.as_ptr().cast(), 2), WsStatus::Gone);
            assert_eq!(ws_close(handle, 1001, null()), WsStatus::Gone);
            assert_eq!(ws_close_with_reason(handle, 1000, b"x".as_ptr().cast(), 1), WsStatus::Gone);
            let mut buf = [0 as c_char; 1];
            assert_eq!(ws_protocol(handle, buf.as_mut_ptr(), 1, null_mut()), WsStatus::Gone);
            assert_eq!(ws_set_flow_control(handle, true), WsStatus::Gone);
            assert_eq!(ws_message_complete(handle), WsStatus::Gone);
            assert_eq!(ws_on_message(handle, None, null_mut()), WsStatus::Gone);
            let mut n = 0;
            assert_eq!(ws_buffered_amount(handle, &mut n), WsStatus::Gone);
        }
        assert!(last_error().contains("gone"), "{}", last_error());
    }
    // A new connection reusing the slot gets a different handle.
    let next = client.connect(&server.url("/echo"));
    assert_ne!(next, conn);
    assert_eq!(send_text(conn, "x"), WsStatus::Gone);
}

#[test]
fn calls_on_gone_handles_from_other_threads_after_free() {
    let server = TestServer::start();
    let client = Client::new();
    let conns: Vec<WsConn> = (0..20).map(|_| client.connect(&server.url("/echo"))).collect();
    let rec = Recorder::default();
    for &c in &conns {
        watch(c, &rec);
    }
    client.run_until("all open", || rec.events().len() == 20);
    let hammer = {
        let conns = conns.clone();
        std::thread::spawn(move || {
            let mut gone = 0;
            while gone < conns.len() {
                gone = conns.iter().filter(|&&c| send_text(c, "x") == WsStatus::Gone).count();
            }
        })
    };
    drop(client); // frees with 20 connections open
    hammer.join().unwrap();
    for c in conns {
        assert_eq!(send_text(c, "x"), WsStatus::Gone);
        assert_eq!(ws_message_complete(c), WsStatus::Gone);
    }
}

#[test]
fn free_with_many_connections_open_returns_and_closes_them() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conns: Vec<WsConn> = (0..100).map(|_| client.connect(&server.url("/echo"))).collect();
    for &c in &conns {
        watch(c, &rec);
    }
    client.run_until("all open", || rec.events().len() == 100);
    // Some still connecting, too.
    for _ in 0..20 {
        client.connect(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    }
    drop(client);
    // Each open connection told the server it was going away.
    server.log.wait_for_count(100, |l| l == "close 1001 client shutting down");
    let closes = server.log.lines().iter().filter(|l| *l == "close 1001 client shutting down").count();
    assert_eq!(closes, 100);
    assert_eq!(rec.events().len(), 100, "no callback after free");
}

#[test]
fn status_strings() {
    for n in 0..64u32 {
        let text = unsafe { std::ffi::CStr::from_ptr(ws_status_str(n)) }.to_str().unwrap();
        assert!(!text.is_empty());
    }
    let ok = unsafe { std::ffi::CStr::from_ptr(ws_status_str(0)) };
    assert_eq!(ok.to_str().unwrap(), "ok");
    let unknown = unsafe { std::ffi::CStr::from_ptr(ws_status_str(15)) };
    assert_eq!(unknown.to_str().unwrap(), "unknown status");
    let gone = unsafe { std::ffi::CStr::from_ptr(ws_status_str(WsStatus::Gone as u32)) };
    assert_eq!(gone.to_str().unwrap(), "the connection is gone");
}

#[test]
fn option_values_are_checked() {
    let options = Options::new();
    unsafe {
        assert_eq!(ws_options_set_connect_timeout_ms(null_mut(), 5), WsStatus::NullArgument);
        assert_eq!(ws_options_set_read_on_dispatch(null_mut(), false), WsStatus::NullArgument);
        assert_eq!(ws_options_set_connect_timeout_ms(options.0, 0), WsStatus::InvalidArgument);
        assert_eq!(ws_options_set_close_timeout_ms(options.0, 0), WsStatus::InvalidArgument);
        assert_eq!(ws_options_set_keepalive(options.0, 10, 0), WsStatus::InvalidArgument);
        assert_eq!(ws_options_set_keepalive(options.0, 0, 10), WsStatus::Ok);
        assert_eq!(ws_options_set_max_message_size(options.0, 0), WsStatus::InvalidArgument);
        assert_eq!(ws_options_set_read_buffer_size(options.0, 10), WsStatus::InvalidArgument);
        assert_eq!(ws_options_set_read_buffer_size(options.0, 4096), WsStatus::Ok);
        assert_eq!(ws_options_set_receive_queue_limit(options.0, 0), WsStatus::InvalidArgument);
        assert_eq!(ws_options_set_send_queue_limit(options.0, 0), WsStatus::InvalidArgument);
        for (name, value) in [
            ("Host", "x"),
            ("sec-websocket-key", "x"),
            ("Sec-WebSocket-Protocol", "x"),
            ("bad name", "x"),
            ("X-Ok", "bad\nvalue"),
        ] {
            assert_eq!(
                ws_options_add_header(options.0, cstr(name).as_ptr(), cstr(value).as_ptr()),
                WsStatus::InvalidArgument,
                "{name}"
            );
        }
        assert_eq!(
            ws_options_add_header(options.0, cstr("Authorization").as_ptr(), cstr("Bearer t").as_ptr()),
            WsStatus::Ok
        );
        assert_eq!(ws_options_add_header(options.0, null(), cstr("x").as_ptr()), WsStatus::NullArgument);
        for bad in ["", "a b", "a,b", "é"] {
            assert_eq!(ws_options_add_subprotocol(options.0, cstr(bad).as_ptr()), WsStatus::InvalidArgument, "{bad:?}");
        }
        assert_eq!(ws_options_add_subprotocol(options.0, cstr("chat.v2").as_ptr()), WsStatus::Ok);
        ws_options_free(null_mut());
    }
}

/// Every exported function sits behind the panic boundary.
#[test]
fn every_export_has_the_panic_boundary() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi");
    let mut exports = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = source.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.contains("extern \"C\" fn ws_") {
                continue;
            }
            exports += 1;
            assert_eq!(lines[i - 1].trim(), "#[no_mangle]", "{}: {line}", path.display());
            // The body's first statement is the boundary.
            let body_start = lines[i..].iter().position(|l| l.trim_end().ends_with('{')).unwrap() + i;
            let first = lines[body_start + 1].trim();
            assert!(
                first.starts_with("ffi_boundary!(") || first.starts_with("ffi_status!("),
                "{}: {line} starts with {first:?}",
                path.display()
            );
        }
    }
    assert!(exports >= 30, "found only {exports} exports");
}

/// What an exported function returned.
#[derive(Debug, PartialEq)]
enum Returned {
    Status(WsStatus),
    Null(bool),
    Int(i64),
    Nothing,
}

/// Every export, made to panic inside its boundary (`testing::panic_in_next_call`), returns its
/// documented default (WS_STATUS_PANIC, NULL, -1, 0, nothing), and ws_last_error() says that a
/// panic was caught. The arguments are such that the call would return something else if it
/// did not panic, so an export without the boundary (where the hook lives) fails here.
#[test]
fn a_panic_inside_any_export_returns_its_default_and_is_reported() {
    use std::ffi::c_void;
    use Returned::*;

    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    // A connection that stays alive: the blackhole never answers the upgrade.
    let conn = client.connect(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    watch(conn, &rec);
    let user = &rec as *const Recorder as *mut c_void;
    let c = client.0;
    let uri = cstr(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    let text = cstr("x");
    let options = Options::new();
    let spare_options = ws_options_new();
    let spare_client = ws_client_new();
    let (mut out_conn, mut out_size): (WsConn, usize) = (0, 0);
    let mut buf = [0 as std::os::raw::c_char; 64];
    let (out_conn, out_size, buf) = (&mut out_conn as *mut WsConn, &mut out_size as *mut usize, buf.as_mut_ptr());
    let p = |ptr: *const std::os::raw::c_char| Null(ptr.is_null());

    type Call<'a> = Box<dyn FnMut() -> Returned + 'a>;
    let calls: Vec<(&str, Returned, Call)> = unsafe {
        vec![
            ("ws_version", Null(true), Box::new(|| p(ws_version()))),
            ("ws_version_number", Int(0), Box::new(|| Int(ws_version_number().into()))),
            ("ws_status_str", Null(true), Box::new(|| p(ws_status_str(0)))),
            ("ws_last_error", Null(true), Box::new(|| p(ws_last_error()))),
            (
                "ws_client_new",
                Null(true),
                Box::new(|| {
                    let new = ws_client_new();
                    let null = new.is_null();
                    ws_client_free(new);
                    Null(null)
                }),
            ),
            ("ws_client_free", Status(WsStatus::Panic), Box::new(|| Status(ws_client_free(spare_client)))),
            ("ws_client_fd", Int(-1), Box::new(|| Int(ws_client_fd(c).into()))),
            ("ws_client_connection_count", Int(0), Box::new(|| Int(ws_client_connection_count(c) as i64))),
            (
                "ws_client_set_fd_edge_triggered",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_client_set_fd_edge_triggered(c, false))),
            ),
            ("ws_dispatch", Status(WsStatus::Panic), Box::new(|| Status(ws_dispatch(c, null_mut(), null_mut())))),
            ("ws_run", Status(WsStatus::Panic), Box::new(|| Status(ws_run(c, 0)))),
            ("ws_connect", Status(WsStatus::Panic), Box::new(|| Status(ws_connect(c, uri.as_ptr(), out_conn)))),
            (
                "ws_connect_with_options",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_connect_with_options(c, uri.as_ptr(), options.0, out_conn))),
            ),
            ("ws_on_open", Status(WsStatus::Panic), Box::new(|| Status(ws_on_open(conn, Some(on_open), user)))),
            (
                "ws_on_message",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_on_message(conn, Some(on_message), user))),
            ),
            ("ws_on_close", Status(WsStatus::Panic), Box::new(|| Status(ws_on_close(conn, Some(on_close), user)))),
            ("ws_on_error", Status(WsStatus::Panic), Box::new(|| Status(ws_on_error(conn, Some(on_error), user)))),
            ("ws_send", Status(WsStatus::Panic), Box::new(|| Status(ws_send(conn, text.as_ptr(), 1)))),
            (
                "ws_send_binary",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_send_binary(conn, text.as_ptr().cast(), 1))),
            ),
            ("ws_close", Status(WsStatus::Panic), Box::new(|| Status(ws_close(conn, 1000, null())))),
            (
                "ws_close_with_reason",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_close_with_reason(conn, 1000, null(), 0))),
            ),
            ("ws_set_flow_control", Status(WsStatus::Panic), Box::new(|| Status(ws_set_flow_control(conn, true)))),
            ("ws_message_complete", Status(WsStatus::Panic), Box::new(|| Status(ws_message_complete(conn)))),
            ("ws_buffered_amount", Status(WsStatus::Panic), Box::new(|| Status(ws_buffered_amount(conn, out_size)))),
            ("ws_protocol", Status(WsStatus::Panic), Box::new(|| Status(ws_protocol(conn, buf, 64, out_size)))),
            ("ws_extensions", Status(WsStatus::Panic), Box::new(|| Status(ws_extensions(conn, buf, 64, out_size)))),
            (
                "ws_options_new",
                Null(true),
                Box::new(|| {
                    let new = ws_options_new();
                    let null = new.is_null();
                    ws_options_free(new);
                    Null(null)
                }),
            ),
            (
                "ws_options_free",
                Nothing,
                Box::new(|| {
                    ws_options_free(spare_options);
                    Nothing
                }),
            ),
            (
                "ws_options_add_ca_file",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_add_ca_file(options.0, null()))),
            ),
            (
                "ws_options_set_client_certificate",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_client_certificate(options.0, null(), null()))),
            ),
            (
                "ws_options_add_header",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_add_header(options.0, text.as_ptr(), text.as_ptr()))),
            ),
            (
                "ws_options_add_subprotocol",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_add_subprotocol(options.0, text.as_ptr()))),
            ),
            (
                "ws_options_set_proxy",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_proxy(options.0, text.as_ptr()))),
            ),
            (
                "ws_options_set_follow_redirects",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_follow_redirects(options.0, 1))),
            ),
            (
                "ws_options_set_connect_timeout_ms",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_connect_timeout_ms(options.0, 1000))),
            ),
            (
                "ws_options_set_close_timeout_ms",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_close_timeout_ms(options.0, 1000))),
            ),
            (
                "ws_options_set_keepalive",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_keepalive(options.0, 1000, 1000))),
            ),
            (
                "ws_options_set_max_message_size",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_max_message_size(options.0, 1000))),
            ),
            (
                "ws_options_set_read_on_dispatch",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_read_on_dispatch(options.0, false))),
            ),
            (
                "ws_options_set_read_buffer_size",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_read_buffer_size(options.0, 1000))),
            ),
            (
                "ws_options_set_receive_queue_limit",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_receive_queue_limit(options.0, 1000))),
            ),
            (
                "ws_options_set_send_queue_limit",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_send_queue_limit(options.0, 1000))),
            ),
            (
                "ws_options_set_deflate",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_deflate(options.0, true))),
            ),
            (
                "ws_options_set_deflate_window_bits",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_deflate_window_bits(options.0, 15, 15))),
            ),
            (
                "ws_options_set_deflate_level",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_deflate_level(options.0, 6))),
            ),
            (
                "ws_options_set_deflate_no_context_takeover",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_deflate_no_context_takeover(options.0, false, false))),
            ),
            (
                "ws_options_set_deflate_threshold",
                Status(WsStatus::Panic),
                Box::new(|| Status(ws_options_set_deflate_threshold(options.0, 32))),
            ),
        ]
    };
    let names: std::collections::BTreeSet<String> = calls.iter().map(|(name, ..)| name.to_string()).collect();
    assert_eq!(names, header_functions(), "every export, and only those");
    let mut failures = Vec::new();
    for (name, default, mut call) in calls {
        // Some other last error first, so that the panic's must replace it.
        assert_eq!(send_text(0, "x"), WsStatus::Gone);
        wsclient::testing::panic_in_next_call();
        let returned = call();
        let fired = !wsclient::testing::panic_pending();
        if !fired {
            // The call ran without its boundary (and its hook): disarm before going on.
            ws_version();
        }
        let message = last_error();
        if !fired || returned != default || !message.contains("a panic was caught") {
            failures.push(format!(
                "{name}: panicked {fired}, returned {returned:?} (default {default:?}), last error {message:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Nothing happened: the connection is as it was, and the spare objects are still whole.
    assert_eq!(rec.events(), []);
    assert_eq!(send_text(conn, "still queued"), WsStatus::Ok);
    assert_eq!(unsafe { ws_client_connection_count(c) }, 1);
    unsafe {
        ws_options_free(spare_options);
        assert_eq!(ws_client_free(spare_client), WsStatus::Ok);
    }
}
