//! Protocol faults no well-behaved server produces, from a small raw-socket server written here
//! (plain blocking std::net, one thread per test): bad frames, a broken upgrade, a connection
//! cut mid-frame. Each must end in exactly one error callback naming the cause, and where RFC
//! 6455 says so, with the right close code sent to the server.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;

use common::*;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// How the raw server answers the upgrade.
#[derive(Clone, Copy, PartialEq)]
enum Upgrade {
    Good,
    OneByteAtATime,
    MissingAccept,
    WrongAccept,
    /// `Connection: keep-alive` and `Connection: Upgrade` on two lines (one header, RFC 9110 5.3).
    TwoConnectionLines,
    /// An empty Sec-WebSocket-Extensions line, then one naming an extension that was not offered.
    ExtensionOnSecondLine,
    /// A 101 in HTTP/1.0 (a 101 requires HTTP/1.1).
    Http10,
    /// The right Sec-WebSocket-Accept, then a second, wrong one.
    SecondWrongAccept,
    /// 65 header lines (the documented limit is 64).
    ManyHeaders,
    /// A good head padded to exactly this many bytes (its final CRLFCRLF included), written in
    /// two parts: all but its last 2 bytes, then (20 ms later, so that the client has read the
    /// first part) those 2 bytes and a text frame "first" in one write.
    HeadOfSize(usize),
}

/// The text frame `HeadOfSize` sends right behind the head.
const FIRST_FRAME: &[u8] = b"\x81\x05first";

/// The response head `how` sends, for the request's key.
fn response(how: Upgrade, key: &str) -> Vec<u8> {
    let accept = derive_accept_key(key.as_bytes());
    let status = match how {
        Upgrade::Http10 => "HTTP/1.0 101 Switching Protocols",
        _ => "HTTP/1.1 101 Switching Protocols",
    };
    let mut lines = vec!["Upgrade: websocket".to_owned()];
    match how {
        Upgrade::TwoConnectionLines => {
            lines.push("Connection: keep-alive".into());
            lines.push("Connection: Upgrade".into());
        }
        _ => lines.push("Connection: Upgrade".into()),
    }
    match how {
        Upgrade::MissingAccept => {}
        Upgrade::WrongAccept => lines.push(format!("Sec-WebSocket-Accept: {}", derive_accept_key(b"some other key"))),
        Upgrade::SecondWrongAccept => {
            lines.push(format!("Sec-WebSocket-Accept: {accept}"));
            lines.push(format!("Sec-WebSocket-Accept: {}", derive_accept_key(b"some other key")));
        }
        _ => lines.push(format!("Sec-WebSocket-Accept: {accept}")),
    }
    match how {
        Upgrade::ExtensionOnSecondLine => {
            lines.push("Sec-WebSocket-Extensions: ".into());
            lines.push("Sec-WebSocket-Extensions: x-unoffered; level=9".into());
        }
        Upgrade::ManyHeaders => {
            while lines.len() < 65 {
                lines.push(format!("X-Filler-{}: {}", lines.len(), lines.len()));
            }
        }
        _ => {}
    }
    let mut head = format!("{status}\r\n");
    for line in &lines {
        head.push_str(line);
        head.push_str("\r\n");
    }
    if let Upgrade::HeadOfSize(size) = how {
        // "X-Pad: " + padding + CRLF, then the final CRLF.
        let padding = size - head.len() - "X-Pad: \r\n\r\n".len();
        head.push_str(&format!("X-Pad: {}\r\n", "p".repeat(padding)));
    }
    head.push_str("\r\n");
    if let Upgrade::HeadOfSize(size) = how {
        assert_eq!(head.len(), size);
    }
    head.into_bytes()
}

/// Reads the request head and answers it; returns the request head as received (the stream is
/// then ready for frames).
fn upgrade(stream: &mut TcpStream, how: Upgrade) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("the request head is ASCII");
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .expect("the request carries a key")
        .trim()
        .to_owned();
    let mut bytes = response(how, &key);
    if let Upgrade::HeadOfSize(size) = how {
        stream.write_all(&bytes[..size - 2]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        bytes.drain(..size - 2);
        bytes.extend_from_slice(FIRST_FRAME);
        // A client that refuses the head may have hung up already (a reset, not a failure).
        let _ = stream.write_all(&bytes);
    } else if how == Upgrade::OneByteAtATime {
        for b in bytes {
            stream.write_all(&[b]).unwrap();
            stream.flush().unwrap();
        }
    } else {
        stream.write_all(&bytes).unwrap();
    }
    head
}

/// Writes one unmasked (server) frame: `first` is FIN/RSV/opcode as on the wire.
fn frame(stream: &mut TcpStream, first: u8, payload: &[u8]) {
    let mut bytes = vec![first];
    match payload.len() {
        n if n < 126 => bytes.push(n as u8),
        n if n < 65536 => {
            bytes.push(126);
            bytes.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            bytes.push(127);
            bytes.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    bytes.extend_from_slice(payload);
    stream.write_all(&bytes).unwrap();
}

/// Reads one (masked, client) frame: (opcode, unmasked payload), or None at EOF.
fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    let mut len = (head[1] & 0x7f) as usize;
    if len == 126 {
        let mut ext = [0u8; 2];
        stream.read_exact(&mut ext).ok()?;
        len = u16::from_be_bytes(ext) as usize;
    } else if len == 127 {
        let mut ext = [0u8; 8];
        stream.read_exact(&mut ext).ok()?;
        len = u64::from_be_bytes(ext) as usize;
    }
    assert!(head[1] & 0x80 != 0, "client frames are masked");
    let mut mask = [0u8; 4];
    stream.read_exact(&mut mask).ok()?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Some((head[0] & 0x0f, payload))
}

/// The close code of the first close frame the client sends (skipping other frames).
fn client_close_code(stream: &mut TcpStream) -> Option<u16> {
    while let Some((opcode, payload)) = read_frame(stream) {
        if opcode == 0x8 {
            return Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
    None
}

/// Runs `script` as the server of one connection; returns its URL and the thread (whose result
/// is what the script saw).
fn raw_server<T: Send + 'static>(script: impl FnOnce(TcpStream) -> T + Send + 'static) -> (String, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://127.0.0.1:{}/", listener.local_addr().unwrap().port());
    let thread = std::thread::spawn(move || script(listener.accept().unwrap().0));
    (url, thread)
}

/// Connects, runs to the final callback, and returns the events.
fn run(url: &str) -> Vec<Ev> {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(url);
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    rec.of(conn)
}

fn final_error(events: &[Ev]) -> (WsStatus, String) {
    match events.last() {
        Some(Ev::Error(_, status, message)) => (*status, message.clone()),
        other => panic!("expected an error, got {other:?} in {events:?}"),
    }
}

#[test]
fn invalid_utf8_text_fails_with_1007() {
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::Good);
        frame(&mut s, 0x81, b"ok");
        frame(&mut s, 0x81, b"caf\xe9");
        client_close_code(&mut s)
    });
    let events = run(&url);
    assert_eq!(events[1], Ev::Text(events[0].conn(), b"ok".to_vec()), "the valid message first");
    let (status, message) = final_error(&events);
    assert_eq!(status, WsStatus::Protocol);
    assert!(message.contains("invalid UTF-8"), "{message}");
    assert_eq!(server.join().unwrap(), Some(1007));
}

#[test]
fn reserved_opcode_fails_with_1002() {
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::Good);
        frame(&mut s, 0x83, b"?");
        client_close_code(&mut s)
    });
    let (status, message) = final_error(&run(&url));
    assert_eq!(status, WsStatus::Protocol);
    assert!(message.starts_with("protocol error"), "{message}");
    assert_eq!(server.join().unwrap(), Some(1002));
}

#[test]
fn reserved_bit_fails_with_1002() {
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::Good);
        frame(&mut s, 0xC1, b"compressed?");
        client_close_code(&mut s)
    });
    let (status, _) = final_error(&run(&url));
    assert_eq!(status, WsStatus::Protocol);
    assert_eq!(server.join().unwrap(), Some(1002));
}

#[test]
fn tcp_closed_mid_frame_is_an_error() {
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::Good);
        // A header announcing 100 bytes, then 10 of them, then the end.
        s.write_all(&[0x82, 100]).unwrap();
        s.write_all(&[7u8; 10]).unwrap();
    });
    let events = run(&url);
    server.join().unwrap();
    let (status, message) = final_error(&events);
    assert_eq!(status, WsStatus::ConnectionLost, "{message}");
    assert_eq!(events.len(), 2, "open, then the error: {events:?}");
}

#[test]
fn fragments_with_a_ping_between_are_one_message_and_the_ping_is_answered() {
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::Good);
        frame(&mut s, 0x01, b"hel");
        frame(&mut s, 0x89, b"between");
        frame(&mut s, 0x00, b"lo ");
        frame(&mut s, 0x80, "wörld".as_bytes());
        frame(&mut s, 0x88, &[0x03, 0xe8]);
        let mut seen = Vec::new();
        while let Some((opcode, payload)) = read_frame(&mut s) {
            seen.push((opcode, payload));
            if opcode == 0x8 {
                break;
            }
        }
        seen
    });
    let events = run(&url);
    let conn = events[0].conn();
    assert_eq!(
        events,
        vec![Ev::Open(conn), Ev::Text(conn, "hello wörld".as_bytes().to_vec()), Ev::Close(conn, 1000, String::new())]
    );
    let seen = server.join().unwrap();
    assert_eq!(seen[0], (0xA, b"between".to_vec()), "the pong echoes the ping's payload");
    assert_eq!(seen.last().unwrap().0, 0x8, "the close is answered");
}

#[test]
fn missing_accept_header_is_rejected() {
    let (url, server) = raw_server(|mut s| upgrade(&mut s, Upgrade::MissingAccept));
    let events = run(&url);
    server.join().unwrap();
    let (status, message) = final_error(&events);
    assert_eq!(status, WsStatus::HandshakeRejected);
    assert_eq!(message, "handshake rejected: the response lacks Sec-WebSocket-Accept");
    assert_eq!(events.len(), 1);
}

#[test]
fn wrong_accept_header_is_rejected() {
    let (url, server) = raw_server(|mut s| upgrade(&mut s, Upgrade::WrongAccept));
    let events = run(&url);
    server.join().unwrap();
    let (status, message) = final_error(&events);
    assert_eq!(status, WsStatus::HandshakeRejected);
    assert_eq!(message, "handshake rejected: wrong Sec-WebSocket-Accept from the server");
}

#[test]
fn a_handshake_sent_one_byte_at_a_time_works() {
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::OneByteAtATime);
        let echo = read_frame(&mut s);
        frame(&mut s, 0x81, &echo.unwrap().1);
        frame(&mut s, 0x88, &[0x0f, 0xa0]);
        client_close_code(&mut s)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    assert_eq!(send_text(conn, "slowly"), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(
        rec.of(conn),
        vec![Ev::Open(conn), Ev::Text(conn, b"slowly".to_vec()), Ev::Close(conn, 4000, String::new())]
    );
    assert_eq!(server.join().unwrap(), Some(4000), "the close reply carries the server's code");
}

#[test]
fn a_peer_that_pings_without_reading_cannot_make_the_answers_pile_up() {
    // 300,000 pings (38 MB) sent without reading: more pongs than the kernel's socket buffers
    // hold (a few MB on loopback), so the client's writes block. While they do, it answers
    // only the latest ping (RFC 6455 5.5.3) instead of queueing an answer per ping.
    const PINGS: u32 = 300_000;
    let (url, server) = raw_server(|mut s| {
        upgrade(&mut s, Upgrade::Good);
        let mut wire = Vec::with_capacity(PINGS as usize * 127 + 4);
        for i in 0..PINGS {
            let mut payload = [0u8; 125];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            wire.extend_from_slice(&[0x89, 125]);
            wire.extend_from_slice(&payload);
        }
        wire.extend_from_slice(&[0x88, 2, 0x03, 0xe8]);
        s.write_all(&wire).unwrap();
        let (mut pongs, mut latest) = (0u32, None);
        while let Some((opcode, payload)) = read_frame(&mut s) {
            match opcode {
                0xA => {
                    pongs += 1;
                    latest = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                0x8 => break,
                _ => {}
            }
        }
        (pongs, latest)
    });
    let events = run(&url);
    let conn = events[0].conn();
    assert_eq!(events, vec![Ev::Open(conn), Ev::Close(conn, 1000, String::new())]);
    let (pongs, latest) = server.join().unwrap();
    assert!(pongs > 0 && pongs < PINGS, "{pongs} pongs for {PINGS} pings");
    assert_eq!(latest, Some(PINGS - 1), "the last ping before the close is answered");
}

/// The server of one connection that upgrades as `how` says and, if the client opens, closes
/// with 1000; the thread returns the request head it received.
fn upgrade_then_close(how: Upgrade) -> (String, JoinHandle<String>) {
    raw_server(move |mut s| {
        let head = upgrade(&mut s, how);
        frame(&mut s, 0x88, &[0x03, 0xe8]);
        client_close_code(&mut s);
        head
    })
}

fn assert_opens_and_closes(events: &[Ev]) {
    let conn = events[0].conn();
    assert_eq!(events, [Ev::Open(conn), Ev::Close(conn, 1000, String::new())]);
}

fn assert_rejected(events: &[Ev], expected: &str) {
    let (status, message) = final_error(events);
    assert_eq!(status, WsStatus::HandshakeRejected, "{message}");
    assert!(message.contains(expected), "{message}");
    assert_eq!(events.len(), 1, "only the error: {events:?}");
}

#[test]
fn two_connection_lines_are_one_header_and_the_connection_opens() {
    let (url, server) = upgrade_then_close(Upgrade::TwoConnectionLines);
    assert_opens_and_closes(&run(&url));
    server.join().unwrap();
}

#[test]
fn an_unoffered_extension_on_a_second_line_fails_the_handshake_naming_it() {
    let (url, server) = upgrade_then_close(Upgrade::ExtensionOnSecondLine);
    assert_rejected(&run(&url), "x-unoffered");
    server.join().unwrap();
}

#[test]
fn a_101_in_http_1_0_is_refused() {
    let (url, server) = upgrade_then_close(Upgrade::Http10);
    assert_rejected(&run(&url), "HTTP/1.0");
    server.join().unwrap();
}

#[test]
fn a_second_wrong_accept_line_is_refused() {
    let (url, server) = upgrade_then_close(Upgrade::SecondWrongAccept);
    assert_rejected(&run(&url), "Sec-WebSocket-Accept");
    server.join().unwrap();
}

#[test]
fn more_header_lines_than_usual_open() {
    let (url, server) = upgrade_then_close(Upgrade::ManyHeaders);
    let events = run(&url);
    // The head's size is the one limit: 68 lines of a few bytes are fine.
    assert_opens_and_closes(&events);
    server.join().unwrap();
}

#[test]
fn a_16384_byte_head_opens_and_the_frame_behind_it_is_kept() {
    let (url, server) = upgrade_then_close(Upgrade::HeadOfSize(16384));
    let events = run(&url);
    let conn = events[0].conn();
    assert_eq!(events, [Ev::Open(conn), Ev::Text(conn, b"first".to_vec()), Ev::Close(conn, 1000, String::new())]);
    server.join().unwrap();
}

#[test]
fn a_frame_in_the_same_segment_as_the_head_is_kept() {
    let (url, server) = upgrade_then_close(Upgrade::HeadOfSize(300));
    let events = run(&url);
    let conn = events[0].conn();
    assert_eq!(events[1], Ev::Text(conn, b"first".to_vec()), "{events:?}");
    server.join().unwrap();
}

#[test]
fn a_16385_byte_head_is_refused() {
    // The client hangs up once the head passes the limit: the server only answers.
    let (url, server) = raw_server(|mut s| upgrade(&mut s, Upgrade::HeadOfSize(16385)));
    assert_rejected(&run(&url), "longer than 16384 bytes");
    server.join().unwrap();
}

/// The URL of a raw server with its trailing "/" replaced by `rest`.
fn with_rest(url: &str, rest: &str) -> String {
    format!("{}{rest}", url.strip_suffix('/').unwrap())
}

#[test]
fn a_query_without_a_path_is_sent_after_a_slash() {
    let (url, server) = upgrade_then_close(Upgrade::Good);
    assert_opens_and_closes(&run(&with_rest(&url, "?x=1")));
    let head = server.join().unwrap();
    let host = url.strip_prefix("ws://").unwrap().strip_suffix('/').unwrap();
    assert!(head.starts_with(&format!("GET /?x=1 HTTP/1.1\r\nHost: {host}\r\n")), "{head}");
}

#[test]
fn a_non_ascii_path_and_query_are_sent_percent_encoded() {
    let (url, server) = upgrade_then_close(Upgrade::Good);
    assert_opens_and_closes(&run(&with_rest(&url, "/caf\u{e9}/\u{65e5}?q=\u{fc}&x=%41")));
    let head = server.join().unwrap();
    assert!(head.starts_with("GET /caf%C3%A9/%E6%97%A5?q=%C3%BC&x=%41 HTTP/1.1\r\n"), "{head}");
}

#[test]
fn an_uppercase_scheme_and_host_connect_and_the_host_header_is_lowercase() {
    let (url, server) = upgrade_then_close(Upgrade::Good);
    // 127.0.0.1 has no case: use "LOCALHOST", which resolves on loopback.
    let port = url.rsplit(':').next().unwrap().trim_end_matches('/');
    assert_opens_and_closes(&run(&format!("WS://LOCALHOST:{port}/Path")));
    let head = server.join().unwrap();
    assert!(head.starts_with(&format!("GET /Path HTTP/1.1\r\nHost: localhost:{port}\r\n")), "{head}");
}
