//! Connection options: headers, subprotocols, timeouts, keepalive, message size.

mod common;

use std::time::{Duration, Instant};

use common::server::TestServer;
use common::*;

fn final_error(client: &Client, rec: &Recorder, conn: WsConn) -> (WsStatus, String) {
    client.run_until_final(rec, conn);
    match rec.of(conn).last() {
        Some(Ev::Error(_, status, message)) => (*status, message.clone()),
        other => panic!("expected an error, got {other:?} after {:?}", rec.of(conn)),
    }
}

#[test]
fn extra_headers_reach_the_server() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_add_header(options.0, cstr("Authorization").as_ptr(), cstr("Bearer abc123").as_ptr()) };
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/headers"), options.0);
    watch(conn, &rec);
    client.run_until("the server's report", || rec.texts(conn) == ["authorization: Bearer abc123"]);
}

#[test]
fn chosen_subprotocol_is_readable_after_open() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe {
        ws_options_add_subprotocol(options.0, cstr("chat.v2").as_ptr());
        ws_options_add_subprotocol(options.0, cstr("chat.v1").as_ptr());
    }
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/protocol"), options.0);
    watch(conn, &rec);
    client.run_until("open", || rec.of(conn) == [Ev::Open(conn)]);
    let mut buf = [0u8; 16];
    let mut len = 0;
    assert_eq!(unsafe { ws_protocol(conn, buf.as_mut_ptr().cast(), buf.len(), &mut len) }, WsStatus::Ok);
    assert_eq!(&buf[..len + 1], b"chat.v2\0");
    assert_eq!(len, 7);
    // Too small: the size needed (the NUL included) comes back, and a buffer of that size works.
    let mut tiny = [0u8; 7];
    assert_eq!(unsafe { ws_protocol(conn, tiny.as_mut_ptr().cast(), tiny.len(), &mut len) }, WsStatus::BufferTooSmall);
    assert_eq!(len, 8);
    let mut exact = vec![0u8; len];
    assert_eq!(unsafe { ws_protocol(conn, exact.as_mut_ptr().cast(), exact.len(), &mut len) }, WsStatus::Ok);
    assert_eq!(exact, b"chat.v2\0");
}

#[test]
fn a_subprotocol_not_offered_fails_the_handshake() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_add_subprotocol(options.0, cstr("chat").as_ptr()) };
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/badproto"), options.0);
    watch(conn, &rec);
    let (status, message) = final_error(&client, &rec, conn);
    assert_eq!(status, WsStatus::HandshakeRejected);
    assert!(message.contains("subprotocol"), "{message}");
    assert_eq!(rec.of(conn).len(), 1, "no open before the error");
}

#[test]
fn connect_timeout() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_set_connect_timeout_ms(options.0, 100) };
    let rec = Recorder::default();
    let conn = client.connect_with(&format!("ws://127.0.0.1:{}/", server.blackhole_port), options.0);
    watch(conn, &rec);
    let (status, message) = final_error(&client, &rec, conn);
    assert_eq!(status, WsStatus::ConnectTimeout);
    assert!(message.contains("100 ms"), "{message}");
}

#[test]
fn close_timeout_when_the_server_never_answers() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_set_close_timeout_ms(options.0, 100) };
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/silent"), options.0);
    watch(conn, &rec);
    client.run_until("open", || rec.of(conn) == [Ev::Open(conn)]);
    assert_eq!(close(conn, 1000, "bye"), WsStatus::Ok);
    let (status, message) = final_error(&client, &rec, conn);
    assert_eq!(status, WsStatus::CloseTimeout);
    assert!(message.contains("100 ms"), "{message}");
}

/// A peer that answers nothing fails the connection once the interval and the timeout have
/// passed: not before, and not much later.
#[test]
fn keepalive_detects_a_dead_peer_within_the_bound() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    let (interval, timeout) = (50, 300);
    unsafe { ws_options_set_keepalive(options.0, interval, timeout) };
    let rec = Recorder::default();
    let started = Instant::now();
    let conn = client.connect_with(&server.url("/silent"), options.0);
    watch(conn, &rec);
    let (status, message) = final_error(&client, &rec, conn);
    let took = started.elapsed();
    assert_eq!(status, WsStatus::KeepaliveTimeout);
    assert!(message.starts_with("keepalive timeout"), "{message}");
    let bound = Duration::from_millis((interval + timeout).into());
    assert!(took >= bound, "failed after {took:?}, before {bound:?}");
    // The slack is for connecting and a loaded machine; a missed timer would take far longer.
    assert!(took < bound + Duration::from_secs(2), "failed only after {took:?}");
}

/// A peer that answers every ping survives several full keepalive timeouts.
#[test]
fn keepalive_keeps_a_live_peer_through_several_timeouts() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    let (interval, timeout) = (50, 400);
    unsafe { ws_options_set_keepalive(options.0, interval, timeout) };
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/echo"), options.0);
    watch(conn, &rec);
    client.run_until("open", || rec.of(conn) == [Ev::Open(conn)]);
    let pings = survive_keepalive(timeout, |n| {
        server.log.wait_for_count(n, |l| l == "ping");
    });
    assert!(pings >= 8, "only {pings} pings in four keepalive timeouts");
    assert_eq!(send_text(conn, "still here"), WsStatus::Ok);
    client.run_until("echo", || rec.texts(conn) == ["still here"]);
    assert_eq!(rec.finals(conn), 0, "{:?}", rec.of(conn));
}

#[test]
fn a_message_over_the_limit_fails_with_1009() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_set_max_message_size(options.0, 1000) };
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/echo"), options.0);
    watch(conn, &rec);
    assert_eq!(send_binary(conn, &[1u8; 1000]), WsStatus::Ok);
    assert_eq!(send_binary(conn, &[2u8; 1001]), WsStatus::Ok);
    let (status, message) = final_error(&client, &rec, conn);
    assert_eq!(status, WsStatus::MessageTooBig);
    assert!(message.contains("1001"), "{message}");
    assert_eq!(rec.of(conn)[1], Ev::Binary(conn, vec![1u8; 1000]));
    server.log.wait_for(|l| l.starts_with("close 1009"));
}

#[test]
fn options_are_copied_at_connect() {
    let server = TestServer::start();
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_add_header(options.0, cstr("Authorization").as_ptr(), cstr("first").as_ptr()) };
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/headers"), options.0);
    drop(options); // freed right after connect
    watch(conn, &rec);
    client.run_until("the report", || rec.texts(conn) == ["authorization: first"]);
}
