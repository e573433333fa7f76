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
}

/// Reads the request head and answers it; returns the stream, ready for frames.
fn upgrade(stream: &mut TcpStream, how: Upgrade) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .expect("the request carries a key")
        .trim()
        .to_owned();
    let accept = match how {
        Upgrade::WrongAccept => derive_accept_key(b"some other key"),
        _ => derive_accept_key(key.as_bytes()),
    };
    let accept_line = if how == Upgrade::MissingAccept {
        String::new()
    } else {
        format!("Sec-WebSocket-Accept: {accept}\r\n")
    };
    let response = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{accept_line}\r\n");
    if how == Upgrade::OneByteAtATime {
        for b in response.bytes() {
            stream.write_all(&[b]).unwrap();
            stream.flush().unwrap();
        }
    } else {
        stream.write_all(response.as_bytes()).unwrap();
    }
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
fn raw_server<T: Send + 'static>(
    script: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (String, JoinHandle<T>) {
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
    assert_eq!(
        events[1],
        Ev::Text(events[0].conn(), b"ok".to_vec()),
        "the valid message first"
    );
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
        vec![
            Ev::Open(conn),
            Ev::Text(conn, "hello wörld".as_bytes().to_vec()),
            Ev::Close(conn, 1000, String::new())
        ]
    );
    let seen = server.join().unwrap();
    assert_eq!(
        seen[0],
        (0xA, b"between".to_vec()),
        "the pong echoes the ping's payload"
    );
    assert_eq!(seen.last().unwrap().0, 0x8, "the close is answered");
}

#[test]
fn missing_accept_header_is_rejected() {
    let (url, server) = raw_server(|mut s| upgrade(&mut s, Upgrade::MissingAccept));
    let events = run(&url);
    server.join().unwrap();
    let (status, message) = final_error(&events);
    assert_eq!(status, WsStatus::HandshakeRejected);
    assert_eq!(
        message,
        "handshake rejected: the response lacks Sec-WebSocket-Accept"
    );
    assert_eq!(events.len(), 1);
}

#[test]
fn wrong_accept_header_is_rejected() {
    let (url, server) = raw_server(|mut s| upgrade(&mut s, Upgrade::WrongAccept));
    let events = run(&url);
    server.join().unwrap();
    let (status, message) = final_error(&events);
    assert_eq!(status, WsStatus::HandshakeRejected);
    assert_eq!(
        message,
        "handshake rejected: wrong Sec-WebSocket-Accept from the server"
    );
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
        vec![
            Ev::Open(conn),
            Ev::Text(conn, b"slowly".to_vec()),
            Ev::Close(conn, 4000, String::new())
        ]
    );
    assert_eq!(
        server.join().unwrap(),
        Some(4000),
        "the close reply carries the server's code"
    );
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
    assert_eq!(
        events,
        vec![Ev::Open(conn), Ev::Close(conn, 1000, String::new())]
    );
    let (pongs, latest) = server.join().unwrap();
    assert!(
        pongs > 0 && pongs < PINGS,
        "{pongs} pongs for {PINGS} pings"
    );
    assert_eq!(
        latest,
        Some(PINGS - 1),
        "the last ping before the close is answered"
    );
}
