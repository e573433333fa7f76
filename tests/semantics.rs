//! The numbered semantics of the C API (issue: "Semantics: the seed's, made precise"), over ws,
//! through the exported C functions, against the in-process test server.

mod common;

use std::ffi::c_void;
use std::os::raw::c_char;
use std::ptr::{null, null_mut};

use common::server::TestServer;
use common::*;

/// Connects to `path` over ws, or over wss trusting the test server's CA.
fn connect_over(client: &Client, server: &TestServer, tls: bool, path: &str) -> WsConn {
    if !tls {
        return client.connect(&server.url(path));
    }
    let options = Options::new();
    let ca = cstr(server.ca_pem.to_str().unwrap());
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, ca.as_ptr()) }, WsStatus::Ok);
    client.connect_with(&server.wss_url("localhost", path), options.0)
}

/// Scenario 1: connect returns at once; callbacks registered after it are in force; nothing runs before
/// the host dispatches, and everything runs on the dispatching thread.
#[test]
fn callbacks_registered_after_connect_are_in_force_and_run_on_the_dispatching_thread() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/echo"));
    // Wait until the open event is pending, without dispatching: no callback may have run.
    assert!(client.wait_readable(DEADLINE));
    assert!(rec.events().is_empty());
    watch(conn, &rec);
    assert_eq!(send_text(conn, "hello"), WsStatus::Ok);
    client.run_until("echo", || rec.texts(conn) == ["hello"]);
    assert_eq!(rec.of(conn)[0], Ev::Open(conn));
    let me = std::thread::current().id();
    assert!(rec.threads.lock().unwrap().iter().all(|t| *t == me));
    assert_eq!(close(conn, 0, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
}

/// Scenario 2: Messages sent before open are queued and go out in order right after the handshake.
#[test]
fn sends_before_open_go_out_in_order() {
    for tls in [false, true] {
        sends_before_open_go_out_in_order_over(tls);
    }
}

fn sends_before_open_go_out_in_order_over(tls: bool) {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = connect_over(&client, &server, tls, "/echo");
    watch(conn, &rec);
    let sent: Vec<String> = (0..100).map(|i| format!("early {i}")).collect();
    for text in &sent {
        assert_eq!(send_text(conn, text), WsStatus::Ok);
    }
    assert_eq!(send_binary(conn, &[1, 2, 3]), WsStatus::Ok);
    client.run_until("all echoes", || rec.of(conn).iter().any(|e| matches!(e, Ev::Binary(..))));
    assert_eq!(rec.texts(conn), sent);
    assert_eq!(rec.of(conn)[0], Ev::Open(conn));
    assert_eq!(rec.of(conn).last(), Some(&Ev::Binary(conn, vec![1, 2, 3])));
}

/// Scenario 3: Exactly one final callback; error for a refused connection, with nothing before or after;
/// the handle is gone once it returned.
#[test]
fn refused_connection_gets_one_error_and_then_is_gone() {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&format!("ws://127.0.0.1:{}/", closed_port()));
    watch(conn, &rec);
    // Queued, or refused if the connect has already failed on the I/O thread: both are right.
    let status = send_text(conn, "queued before the failure");
    assert!(matches!(status, WsStatus::Ok | WsStatus::Closing), "{status:?}");
    client.run_until_final(&rec, conn);
    let events = rec.of(conn);
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        Ev::Error(_, WsStatus::ConnectFailed, message) => {
            assert!(message.contains("connection refused"), "{message}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert_eq!(send_text(conn, "late"), WsStatus::Gone);
    assert_eq!(close(conn, 0, ""), WsStatus::Gone);
    assert_eq!(ws_on_open(conn, None, std::ptr::null_mut()), WsStatus::Gone);
    assert_eq!(unsafe { ws_client_connection_count(client.0) }, 0);
    // Nothing more arrives for it (the fd may show one spurious wake-up: it runs nothing).
    if client.wait_readable(std::time::Duration::ZERO) {
        assert_eq!(client.dispatch().0, 0);
    }
    assert_eq!(rec.of(conn).len(), 1);
}

/// Scenario 3: A server-initiated close handshake ends with close (code and reason from the server).
#[test]
fn server_close_reports_its_code_and_reason() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    for (code, tls) in [(1000u16, false), (1001, true), (1011, false), (4000, true)] {
        let conn = connect_over(&client, &server, tls, &format!("/close?code={code}&reason=server%20says"));
        watch(conn, &rec);
        client.run_until_final(&rec, conn);
        assert_eq!(rec.of(conn), vec![Ev::Open(conn), Ev::Close(conn, code, "server%20says".into())]);
    }
}

/// Scenario 3: A client-initiated close sends the code and reason to the server and ends with close.
#[test]
fn client_close_sends_code_and_reason() {
    for tls in [false, true] {
        client_close_sends_code_and_reason_over(tls);
    }
}

fn client_close_sends_code_and_reason_over(tls: bool) {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = connect_over(&client, &server, tls, "/echo");
    watch(conn, &rec);
    client.run_until("open", || !rec.of(conn).is_empty());
    assert_eq!(close(conn, 4321, "client done"), WsStatus::Ok);
    assert_eq!(close(conn, 1000, ""), WsStatus::AlreadyClosing, "6. a second close is a no-op with a status");
    assert_eq!(send_text(conn, "after close"), WsStatus::Closing);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 4321, "client done".into())));
    server.log.wait_for(|l| l == "close 4321 client done");
}

/// ws_close_with_reason takes the reason by length, so a reason holding U+0000 reaches the
/// server whole (ws_close would cut it at the NUL) and comes back whole in the close callback.
#[test]
fn close_with_reason_sends_a_reason_holding_nul_whole() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/echo"));
    watch(conn, &rec);
    client.run_until("open", || !rec.of(conn).is_empty());
    let reason = "a\0b é";
    let status = unsafe { ws_close_with_reason(conn, 4001, reason.as_ptr().cast(), reason.len()) };
    assert_eq!(status, WsStatus::Ok);
    let again = unsafe { ws_close_with_reason(conn, 4001, reason.as_ptr().cast(), reason.len()) };
    assert_eq!(again, WsStatus::AlreadyClosing, "as ws_close: a second close is a no-op with a status");
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 4001, reason.into())));
    server.log.wait_for(|l| l == "close 4001 a\0b é");
}

/// Scenario 3: A TCP drop without a close frame is an error, after the message sent before it.
#[test]
fn tcp_drop_is_an_error_after_the_messages() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/drop"));
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    let events = rec.of(conn);
    assert_eq!(events[..2], [Ev::Open(conn), Ev::Text(conn, b"bye".to_vec())]);
    assert!(matches!(&events[2], Ev::Error(_, WsStatus::ConnectionLost, _)), "{events:?}");
    assert_eq!(events.len(), 3);
}

/// Scenario 3: HTTP 403 on the upgrade is an error naming it.
#[test]
fn rejected_handshake_is_an_error_naming_the_status() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/reject"));
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    match &rec.of(conn)[..] {
        [Ev::Error(_, WsStatus::HandshakeRejected, m)] => assert!(m.contains("HTTP 403"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Scenario 4: Every message sent before the close frame is delivered before the close callback, with
/// flow control off and on.
#[test]
fn messages_before_close_are_all_delivered_first() {
    let server = TestServer::start();
    let client = Client::new();
    for (flow, tls) in [(false, false), (true, false), (false, true), (true, true)] {
        let rec = Recorder::default();
        let conn = connect_over(&client, &server, tls, "/push?n=500&code=4001");
        watch(conn, &rec);
        assert_eq!(ws_set_flow_control(conn, flow), WsStatus::Ok);
        client.run_until("the end", || {
            if flow {
                ws_message_complete(conn);
            }
            rec.finals(conn) > 0
        });
        let expected: Vec<String> = (0..500).map(|i| format!("msg {i}")).collect();
        assert_eq!(rec.texts(conn), expected);
        assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 4001, "done".into())));
    }
}

unsafe extern "C" fn record_without_completing(
    conn: WsConn,
    data: *const u8,
    len: usize,
    kind: WsMessageKind,
    user: *mut c_void,
) {
    on_message(conn, data, len, kind, user);
}

/// Scenario 5: Flow control: after a message callback, no further message until message_complete, even
/// across many dispatches; completing from outside the callback releases exactly the next.
#[test]
fn flow_control_holds_messages_until_complete() {
    for tls in [false, true] {
        flow_control_holds_messages_until_complete_over(tls);
    }
}

fn flow_control_holds_messages_until_complete_over(tls: bool) {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = connect_over(&client, &server, tls, "/push?n=20");
    watch(conn, &rec);
    let user = &rec as *const Recorder as *mut c_void;
    assert_eq!(ws_on_message(conn, Some(record_without_completing), user), WsStatus::Ok);
    assert_eq!(ws_set_flow_control(conn, true), WsStatus::Ok);
    for i in 0..20 {
        client.run_until("next message", || rec.texts(conn).len() == i + 1);
        // Nothing else may come however often we dispatch: the fd stays quiet.
        assert!(!client.wait_readable(std::time::Duration::from_millis(20)) || client.dispatch().0 == 0);
        assert_eq!(rec.texts(conn).len(), i + 1);
        assert_eq!(rec.texts(conn)[i], format!("msg {i}"));
        assert_eq!(ws_message_complete(conn), WsStatus::Ok);
    }
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, "done".into())));
}

/// Scenario 6: close while connecting aborts and reports close; no open.
#[test]
fn close_while_connecting_reports_close() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    // The blackhole accepts TCP and never answers the upgrade: the connect cannot finish.
    let conn = client.connect(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    watch(conn, &rec);
    assert_eq!(send_text(conn, "never sent"), WsStatus::Ok);
    assert_eq!(close(conn, 0, ""), WsStatus::Ok);
    assert_eq!(close(conn, 0, ""), WsStatus::AlreadyClosing);
    client.run_until_final(&rec, conn);
    assert_eq!(
        rec.of(conn),
        vec![Ev::Close(conn, 1006, "closed by the application before the connection opened".into())]
    );
}

unsafe extern "C" fn close_on_open(conn: WsConn, user: *mut c_void) {
    on_open(conn, user);
    assert_eq!(ws_close(conn, 4002, c"from onopen".as_ptr()), WsStatus::Ok);
}

#[test]
fn close_inside_the_open_callback() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = connect_over(&client, &server, true, "/echo");
    watch(conn, &rec);
    ws_on_open(conn, Some(close_on_open), &rec as *const Recorder as *mut c_void);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn), vec![Ev::Open(conn), Ev::Close(conn, 4002, "from onopen".into())]);
    server.log.wait_for(|l| l == "close 4002 from onopen");
}

struct Reconnect {
    rec: Recorder,
    client: *mut WsClient,
    url: std::ffi::CString,
    second: std::sync::Mutex<Option<WsConn>>,
}

unsafe extern "C" fn reconnect_on_close(
    conn: WsConn,
    code: u16,
    reason: *const std::os::raw::c_char,
    len: usize,
    user: *mut c_void,
) {
    let state = &*(user as *const Reconnect);
    on_close(conn, code, reason, len, &state.rec as *const Recorder as *mut c_void);
    // Inside a callback: dispatch and free are refused, connect works.
    assert_eq!(ws_dispatch(state.client, std::ptr::null_mut(), std::ptr::null_mut()), WsStatus::DispatchInProgress);
    assert_eq!(ws_run(state.client, 0), WsStatus::DispatchInProgress);
    assert_eq!(ws_client_free(state.client), WsStatus::DispatchInProgress);
    let mut next = 0;
    assert_eq!(ws_connect(state.client, state.url.as_ptr(), &mut next), WsStatus::Ok);
    watch(next, &state.rec);
    assert_eq!(send_text(next, "second life"), WsStatus::Ok);
    *state.second.lock().unwrap() = Some(next);
}

#[test]
fn reconnect_from_inside_the_close_callback() {
    let server = TestServer::start();
    let client = Client::new();
    let state = Reconnect {
        rec: Recorder::default(),
        client: client.0,
        url: cstr(&server.url("/echo")),
        second: Default::default(),
    };
    let first = client.connect(&server.url("/close?code=1001&reason=restart"));
    watch(first, &state.rec);
    ws_on_close(first, Some(reconnect_on_close), &state as *const Reconnect as *mut c_void);
    client.run_until("the second connection's echo", || {
        state.second.lock().unwrap().is_some_and(|c| state.rec.texts(c) == ["second life"])
    });
    assert_eq!(state.rec.of(first).last(), Some(&Ev::Close(first, 1001, "restart".into())));
}

/// Pings from the server are answered with pongs.
#[test]
fn server_pings_are_answered() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/ping"));
    watch(conn, &rec);
    client.run_until("the server's pong report", || rec.texts(conn) == ["pong:are you there"]);
}

/// Sends from several threads at once all arrive, each thread's in its order.
#[test]
fn sends_from_several_threads() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/echo"));
    watch(conn, &rec);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..250 {
                    assert_eq!(send_text(conn, &format!("{t}:{i}")), WsStatus::Ok);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    client.run_until("1000 echoes", || rec.texts(conn).len() == 1000);
    let texts = rec.texts(conn);
    for t in 0..4 {
        let mine: Vec<String> = texts.iter().filter(|s| s.starts_with(&format!("{t}:"))).cloned().collect();
        let expected: Vec<String> = (0..250).map(|i| format!("{t}:{i}")).collect();
        assert_eq!(mine, expected);
    }
}

/// Text keeps an embedded U+0000 and arbitrary Unicode; binary keeps every byte value.
#[test]
fn payloads_survive_exactly() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/echo"));
    watch(conn, &rec);
    let text = "a\u{0}b é 中文 😀";
    let binary: Vec<u8> = (0..=255u8).collect();
    assert_eq!(send_text(conn, text), WsStatus::Ok);
    assert_eq!(send_text(conn, ""), WsStatus::Ok);
    assert_eq!(send_binary(conn, &binary), WsStatus::Ok);
    assert_eq!(send_binary(conn, &[]), WsStatus::Ok);
    client.run_until("4 echoes", || rec.of(conn).len() == 5);
    assert_eq!(
        rec.of(conn)[1..],
        [
            Ev::Text(conn, text.as_bytes().to_vec()),
            Ev::Text(conn, vec![]),
            Ev::Binary(conn, binary),
            Ev::Binary(conn, vec![])
        ]
    );
}

/// bufferedAmount counts what send accepted and the socket has not taken yet.
#[test]
fn buffered_amount_counts_unsent_bytes() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/echo"));
    watch(conn, &rec);
    let big = vec![7u8; 1 << 20];
    assert_eq!(send_binary(conn, &big), WsStatus::Ok);
    let mut amount = 0usize;
    // A connection whose upgrade is never answered keeps everything queued.
    let stuck = client.connect(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    assert_eq!(send_binary(stuck, &big), WsStatus::Ok);
    assert_eq!(send_text(stuck, "and 17 more bytes"), WsStatus::Ok);
    assert_eq!(unsafe { ws_buffered_amount(stuck, &mut amount) }, WsStatus::Ok);
    assert_eq!(amount, (1 << 20) + 17);
    client.run_until("the echo", || rec.of(conn).iter().any(|e| matches!(e, Ev::Binary(..))));
    assert_eq!(unsafe { ws_buffered_amount(conn, &mut amount) }, WsStatus::Ok);
    assert_eq!(amount, 0);
}

/// The send queue limit refuses a message rather than growing without bound.
#[test]
fn send_queue_limit_refuses_with_a_status() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    assert_eq!(unsafe { ws_options_set_send_queue_limit(options.0, 1000) }, WsStatus::Ok);
    // The blackhole never answers the upgrade: what is sent stays queued.
    let conn = client.connect_with(&format!("ws://127.0.0.1:{}/", server.blackhole_port), options.0);
    assert_eq!(send_binary(conn, &[0u8; 600]), WsStatus::Ok);
    assert_eq!(send_binary(conn, &[0u8; 600]), WsStatus::SendQueueFull);
    assert!(last_error().contains("limit"), "{}", last_error());
    let mut queued = 0;
    assert_eq!(unsafe { ws_buffered_amount(conn, &mut queued) }, WsStatus::Ok);
    assert_eq!(queued, 600, "the refused message was not queued");
}

/// ws_run dispatches until no connection is left.
#[test]
fn run_returns_when_no_connection_is_left() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    for _ in 0..3 {
        let conn = client.connect(&server.url("/push?n=3"));
        watch(conn, &rec);
    }
    assert_eq!(unsafe { ws_run(client.0, 30_000) }, WsStatus::Ok);
    assert_eq!(rec.events().iter().filter(|e| e.is_final()).count(), 3);
    assert_eq!(rec.events().len(), 3 * 5);
    // Nothing left: returns at once.
    assert_eq!(unsafe { ws_run(client.0, -1) }, WsStatus::Ok);
    // Time up while a connection lives.
    let conn = client.connect(&server.url("/silent"));
    watch(conn, &rec);
    assert_eq!(unsafe { ws_run(client.0, 50) }, WsStatus::Timeout);
}

/// IPv6 literals work (where the machine has IPv6 loopback).
#[test]
fn ipv6_literal() {
    let server = TestServer::start();
    let Some(port) = server.ipv6_port else {
        skipped("ipv6_literal", "no IPv6 loopback (::1) on this machine");
        return;
    };
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&format!("ws://[::1]:{port}/echo?over=ipv6"));
    watch(conn, &rec);
    assert_eq!(send_text(conn, "v6"), WsStatus::Ok);
    client.run_until("the echo over IPv6", || rec.texts(conn) == ["v6"]);
}

/// Scenario 5: Flow control off and a host that does not dispatch while the server pushes 32 times the
/// receive queue limit: nothing is lost and order is kept. (The memory bound itself is measured
/// from outside the library in tests/hostile_peers.rs.)
#[test]
fn a_slow_host_bounds_what_waits_and_loses_nothing() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    let limit = 64 << 10;
    assert_eq!(unsafe { ws_options_set_receive_queue_limit(options.0, limit) }, WsStatus::Ok);
    let rec = Recorder::default();
    let size = 16 << 10;
    let count = 2048; // 32 MiB, far more than the socket buffers hold
    let conn = client.connect_with(&server.url(&format!("/push?n={count}&size={size}")), options.0);
    watch(conn, &rec);
    // The host dispatches nothing while the server pushes 2 MiB (what the socket buffers alone
    // can hold), 32 times the limit: without the bound, all of it would wait in the library.
    server.log.wait_for(|l| l == "pushed 2 MiB");
    client.run_until_final(&rec, conn);
    let binaries: Vec<Vec<u8>> = rec
        .of(conn)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Binary(_, b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(binaries.len(), count);
    for (i, b) in binaries.iter().enumerate() {
        assert_eq!(b.len(), size);
        assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), i as u64, "in order");
    }
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, "done".into())));
    let mut buffered = 0;
    assert_eq!(unsafe { ws_buffered_amount(conn, &mut buffered) }, WsStatus::Gone, "gone after the final callback");
}

unsafe extern "C" fn count_open(_conn: WsConn, user: *mut c_void) {
    *(user as *mut u32) += 1;
}

/// A later registration replaces the earlier one; NULL clears it.
#[test]
fn registration_replaces_and_null_clears() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/push?n=2"));
    watch(conn, &rec);
    let mut opens = 0u32;
    // Replaces the recorder's open callback: only the counter sees the open.
    assert_eq!(ws_on_open(conn, Some(count_open), &mut opens as *mut u32 as *mut c_void), WsStatus::Ok);
    // Clears the message callback: messages are consumed without a call.
    assert_eq!(ws_on_message(conn, None, std::ptr::null_mut()), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(opens, 1);
    assert_eq!(rec.of(conn), vec![Ev::Close(conn, 1000, "done".into())]);
}

unsafe extern "C" fn enable_flow_control_on_first(
    conn: WsConn,
    data: *const u8,
    len: usize,
    kind: WsMessageKind,
    user: *mut c_void,
) {
    on_message(conn, data, len, kind, user);
    assert_eq!(ws_set_flow_control(conn, true), WsStatus::Ok);
}

/// Flow control turned on inside a message callback holds the messages already received (even
/// those taken in the same dispatch batch) until message_complete.
#[test]
fn flow_control_turned_on_inside_a_callback_holds_the_rest() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/push?n=50"));
    watch(conn, &rec);
    ws_on_message(conn, Some(enable_flow_control_on_first), &rec as *const Recorder as *mut c_void);
    client.run_until("the first messages", || !rec.texts(conn).is_empty());
    let seen = rec.texts(conn).len();
    // From the second message on, each one waits for message_complete.
    assert!(seen <= 2, "{seen} messages delivered before any message_complete");
    while rec.finals(conn) == 0 {
        let before = rec.texts(conn).len();
        assert_eq!(ws_message_complete(conn), WsStatus::Ok);
        client.run_until("the next event", || rec.texts(conn).len() > before || rec.finals(conn) > 0);
        assert!(rec.texts(conn).len() <= before + 1, "more than one message per message_complete");
    }
    let expected: Vec<String> = (0..50).map(|i| format!("msg {i}")).collect();
    assert_eq!(rec.texts(conn), expected);
}

/// With flow control on, the final callback waits for the last message's message_complete,
/// even when the peer's close was read before flow control was turned on.
#[test]
fn the_close_callback_waits_for_the_last_message_complete() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/push?n=5"));
    watch(conn, &rec);
    ws_on_message(conn, Some(record_without_completing), &rec as *const Recorder as *mut c_void);
    // The server logs our close reply: by then every message and the close are in our inbox.
    server.log.wait_for(|l| l == "close 1000 done");
    assert_eq!(ws_set_flow_control(conn, true), WsStatus::Ok);
    for i in 0..5 {
        client.run_until("the next message", || rec.texts(conn).len() == i + 1);
        while client.wait_readable(std::time::Duration::ZERO) {
            client.dispatch();
        }
        assert_eq!(rec.finals(conn), 0, "the close came before message {i} was completed");
        assert_eq!(ws_message_complete(conn), WsStatus::Ok);
    }
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, "done".into())));
}

/// Whether thread `tid` of this process is blocked in poll(2) (x86_64: syscall 7) or ppoll
/// (271), as /proc tells.
fn blocked_in_poll(tid: i32) -> bool {
    let syscall = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
    matches!(syscall.split_whitespace().next(), Some("7" | "271"))
}

/// ws_run counts as a dispatch for as long as it runs, also while it waits: a ws_client_free
/// from another thread meanwhile is refused (it would free what ws_run is using), and so is a
/// ws_dispatch. The threading contract: "The same holds for ws_run() and ws_client_free()".
#[test]
fn free_from_another_thread_while_run_waits_is_refused() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.url("/echo"));
    watch(conn, &rec);
    client.run_until("open", || rec.of(conn) == [Ev::Open(conn)]);
    let client_addr = client.0 as usize;
    let run_tid = unsafe { libc::gettid() };
    let other = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !blocked_in_poll(run_tid) {
            assert!(std::time::Instant::now() < deadline, "ws_run never waited");
            std::thread::yield_now();
        }
        let client = client_addr as *mut WsClient;
        let freed = unsafe { ws_client_free(client) };
        let dispatched = unsafe { ws_dispatch(client, null_mut(), null_mut()) };
        // Ends the connection, so that ws_run returns.
        assert_eq!(unsafe { ws_close(conn, 1000, null()) }, WsStatus::Ok);
        (freed, dispatched)
    });
    assert_eq!(unsafe { ws_run(client.0, 30_000) }, WsStatus::Ok);
    let (freed, dispatched) = other.join().unwrap();
    assert_eq!(freed, WsStatus::DispatchInProgress);
    assert_eq!(dispatched, WsStatus::DispatchInProgress);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
}

unsafe extern "C" fn close_inside_final(conn: WsConn, _: u16, _: *const c_char, _: usize, user: *mut c_void) {
    *(user as *mut WsStatus) = ws_close(conn, 1000, null());
}

/// ws_close from inside the final callback: the connection has ended, so WS_STATUS_CLOSING
/// (as the header says), and nothing else happens.
#[test]
fn close_inside_the_final_callback_is_closing() {
    let server = TestServer::start();
    let client = Client::new();
    let conn = client.connect(&server.url("/close?code=1000"));
    let mut status = WsStatus::Ok;
    let user = (&mut status as *mut WsStatus).cast();
    assert_eq!(ws_on_close(conn, Some(close_inside_final), user), WsStatus::Ok);
    assert_eq!(unsafe { ws_run(client.0, 30_000) }, WsStatus::Ok);
    assert_eq!(status, WsStatus::Closing);
}
