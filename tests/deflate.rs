//! permessage-deflate (RFC 7692): against Python's websockets and Node's ws with compression on,
//! in every parameter combination they support, and against the raw hostile server for what
//! well-behaved servers never do (invalid negotiation answers, RSV1 where it is not allowed,
//! corrupt data, a decompression bomb).

mod common;

use std::io::Write;
use std::time::Duration;

use common::deflate::TAIL;
use common::hostile::*;
use common::peers::Peer;
use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// A JSON-like text of about `len` bytes that repeats itself the way app messages do.
fn json_like(seed: usize, len: usize) -> String {
    let mut out = String::new();
    let mut i = seed;
    while out.len() < len {
        out.push_str(&format!(
            "{{\"type\":\"chat.message\",\"seq\":{i},\"user\":\"u_{:08x}\",\"text\":\"hello\"}}",
            i * 7919
        ));
        i += 1;
    }
    out.truncate(len);
    out
}

fn binary(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((seed * 7 + j) % 251) as u8).collect()
}

/// Echo of text and binary, 0 bytes to 16 MiB, with compression negotiated.
#[test]
fn echo_with_deflate_from_0_bytes_to_16_mib() {
    for (peer, counts_bytes) in [(Peer::start_python_in("deflate"), false), (Peer::start_node_in("deflate"), true)] {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("{}/echo", peer.url()));
        watch(conn, &rec);
        let sizes = [0usize, 1, 31, 32, 125, 126, 65535, 65536, 1 << 20, 16 << 20];
        let mut expected = vec![Ev::Open(conn)];
        let mut sent = 0;
        for (i, &size) in sizes.iter().enumerate() {
            let text = json_like(i, size);
            let data = binary(i, size);
            assert_eq!(send_text(conn, &text), WsStatus::Ok);
            assert_eq!(send_binary(conn, &data), WsStatus::Ok);
            sent += 2 * size;
            expected.push(Ev::Text(conn, text.into_bytes()));
            expected.push(Ev::Binary(conn, data));
        }
        client.run_until("every echo", || rec.of(conn).len() == expected.len());
        assert!(rec.of(conn) == expected, "an echo differs");
        let extensions = peer.wait_for_prefixed("extensions ", 1);
        assert!(extensions[0].starts_with("permessage-deflate"), "not negotiated: {extensions:?}");
        assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
        client.run_until_final(&rec, conn);
        if counts_bytes {
            // Node counts the bytes it read: what went out compressed is far smaller.
            let read: usize = peer.wait_for_prefixed("bytes_read ", 1)[0].parse().unwrap();
            assert!(read * 10 < sent, "{read} bytes on the wire for {sent} bytes of messages");
        }
    }
}

/// One connection per combination of context takeover (each way) and window bits 9 to 15
/// (each way), all open at once, each echoing text and binary messages that refer back to the
/// ones before them. 196 connections per peer share the I/O thread's pooled compressors, so
/// their states are also rebuilt from each connection's context all the time.
#[test]
fn every_parameter_combination_round_trips() {
    for peer in [Peer::start_python_in("deflate-open"), Peer::start_node_in("deflate")] {
        let client = Client::new();
        let rec = Recorder::default();
        let mut conns = Vec::new();
        for (client_nct, server_nct) in [(false, false), (true, false), (false, true), (true, true)] {
            for client_bits in 9..=15u32 {
                for server_bits in 9..=15u32 {
                    let options = Options::new();
                    set(unsafe { ws_options_set_deflate_window_bits(options.0, client_bits, server_bits) });
                    set(unsafe { ws_options_set_deflate_no_context_takeover(options.0, client_nct, server_nct) });
                    set(unsafe { ws_options_set_deflate_threshold(options.0, 0) });
                    let conn = client.connect_with(&format!("{}/echo", peer.url()), options.0);
                    watch(conn, &rec);
                    conns.push((conn, (client_nct, server_nct, client_bits, server_bits)));
                }
            }
        }
        let messages = |i: usize| -> Vec<Ev> {
            vec![
                Ev::Text(0, json_like(i, 2000).into_bytes()),
                Ev::Text(0, json_like(i + 1, 2000).into_bytes()),
                Ev::Binary(0, binary(i, 70_000)),
                Ev::Text(0, Vec::new()),
            ]
        };
        client.run_until("every open", || conns.iter().all(|(c, _)| !rec.of(*c).is_empty()));
        for (i, (conn, _)) in conns.iter().enumerate() {
            for m in messages(i) {
                let status = match m {
                    Ev::Text(_, t) => send_text(*conn, std::str::from_utf8(&t).unwrap()),
                    Ev::Binary(_, b) => send_binary(*conn, &b),
                    _ => unreachable!(),
                };
                assert_eq!(status, WsStatus::Ok);
            }
        }
        client.run_until("every echo", || conns.iter().all(|(c, _)| rec.of(*c).len() >= 5));
        for (i, (conn, combination)) in conns.iter().enumerate() {
            let expected: Vec<Ev> = std::iter::once(Ev::Open(*conn))
                .chain(messages(i).into_iter().map(|m| match m {
                    Ev::Text(_, t) => Ev::Text(*conn, t),
                    Ev::Binary(_, b) => Ev::Binary(*conn, b),
                    other => other,
                }))
                .collect();
            assert!(rec.of(*conn) == expected, "echo differs with {combination:?}: {:?}", rec.of(*conn).last());
        }
        // The connections opened in any order: count what each parameter was answered with.
        let negotiated = peer.wait_for_prefixed("extensions ", conns.len());
        assert!(negotiated.iter().all(|e| e.starts_with("permessage-deflate")), "{negotiated:?}");
        let with = |param: &str| negotiated.iter().filter(|e| e.split("; ").any(|p| p == param)).count();
        assert_eq!(with("server_no_context_takeover"), 98, "{negotiated:?}");
        for bits in 9..15 {
            assert_eq!(with(&format!("server_max_window_bits={bits}")), 28, "{negotiated:?}");
        }
    }
}

/// A compressed message in fragments, with pings between them (Node), and in fragments
/// compressed as one stream (Python).
#[test]
fn fragmented_compressed_messages() {
    for (peer, path) in
        [(Peer::start_node_in("deflate"), "/fragments_ping"), (Peer::start_python_in("deflate"), "/fragments")]
    {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("{}{path}", peer.url()));
        watch(conn, &rec);
        client.run_until("the message", || !rec.texts(conn).is_empty());
        assert_eq!(send_text(conn, &json_like(1, 500)), WsStatus::Ok);
        client.run_until("the echo", || rec.texts(conn).len() == 2);
        assert_eq!(rec.texts(conn), ["hello wörld".to_string(), json_like(1, 500)]);
        assert!(peer.wait_for_prefixed("extensions ", 1)[0].starts_with("permessage-deflate"));
    }
}

// ---- against the raw server --------------------------------------------------------------------

/// Inflates the payloads of a client's compressed message with a peer's decompressor.
fn inflate(d: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(payload.len() * 20 + 64);
    let start = d.total_in();
    while ((d.total_in() - start) as usize) < input.len() {
        let at = (d.total_in() - start) as usize;
        d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync).unwrap();
        out.reserve(out.len().max(64));
    }
    out
}

/// What the client sends: RSV1 on compressed messages only (small ones go as they are), the
/// tail removed, the context carried over unless the server said client_no_context_takeover.
#[test]
fn what_the_client_sends_inflates_back_as_the_server_would() {
    for (answer, takeover) in [("permessage-deflate", true), ("permessage-deflate; client_no_context_takeover", false)]
    {
        let (url, server) = serve(move |mut peer| {
            let request = peer.upgrade_with_extensions(answer);
            let mut d = Decompress::new(false);
            let mut seen = Vec::new();
            for _ in 0..4 {
                let frame = peer.read_frame().unwrap();
                if !takeover {
                    d.reset(false);
                }
                let payload = if frame.rsv1 { inflate(&mut d, &frame.payload) } else { frame.payload.clone() };
                seen.push((frame.rsv1, frame.payload.len(), payload));
            }
            (request, seen)
        });
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&url);
        watch(conn, &rec);
        wait_open(&client, &rec, conn);
        let big = json_like(3, 5000);
        for m in ["tiny", big.as_str(), big.as_str(), ""] {
            assert_eq!(send_text(conn, m), WsStatus::Ok);
        }
        let (request, seen) = server.join().unwrap();
        assert!(
            request.contains("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"),
            "{request}"
        );
        assert_eq!((seen[0].0, &seen[0].2[..]), (false, &b"tiny"[..]), "below the threshold: uncompressed");
        assert!(seen[1].0 && seen[1].2 == big.as_bytes() && seen[1].1 < 2000, "{:?}", (seen[1].0, seen[1].1));
        assert!(seen[2].0 && seen[2].2 == big.as_bytes());
        if takeover {
            assert!(seen[2].1 < 100, "the same message again refers back: {} bytes", seen[2].1);
        } else {
            assert_eq!(seen[2].1, seen[1].1, "no context: compressed the same way");
        }
        assert_eq!((seen[3].0, seen[3].1), (false, 0));
    }
}

/// Turned off, nothing is offered; a server that declines gets a plain connection.
#[test]
fn off_or_declined_means_a_plain_connection() {
    for off in [true, false] {
        let (url, server) = serve(|mut peer| {
            let request = peer.read_request();
            peer.send(response_to(&request, "").as_bytes());
            let frame = peer.read_frame().unwrap();
            (request, frame)
        });
        let client = Client::new();
        let options = Options::new();
        set(unsafe { ws_options_set_deflate(options.0, !off) });
        let rec = Recorder::default();
        let conn = client.connect_with(&url, options.0);
        watch(conn, &rec);
        wait_open(&client, &rec, conn);
        let text = json_like(0, 3000);
        assert_eq!(send_text(conn, &text), WsStatus::Ok);
        let (request, frame) = server.join().unwrap();
        assert_eq!(request.contains("Sec-WebSocket-Extensions"), !off, "{request}");
        assert!(!frame.rsv1 && frame.payload == text.as_bytes());
    }
}

/// Connects to a server that answers with `extensions` and returns the final event.
fn handshake_error(extensions: &'static str) -> Ev {
    let (url, _server) = serve(move |mut peer| {
        peer.upgrade_with_extensions(extensions);
        let _ = peer.read_timeout(Duration::from_secs(5)).read_to_end();
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    last_event(&rec, conn).unwrap()
}

#[test]
fn invalid_negotiation_answers_fail_the_handshake_naming_them() {
    for (answer, named) in [
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", "appears twice"),
        ("permessage-deflate; server_max_window_bits=16", "\"16\" is not a window size"),
        ("permessage-deflate; client_max_window_bits=7", "\"7\" is not a window size"),
        ("permessage-deflate; mystery", "\"mystery\" is unknown"),
        ("x-webkit-deflate-frame", "\"x-webkit-deflate-frame\", which was not offered"),
        ("permessage-deflate, permessage-deflate", "two extensions"),
        ("permessage-deflate, x-other", "two extensions"),
    ] {
        match handshake_error(answer) {
            Ev::Error(_, WsStatus::HandshakeRejected, message) => {
                assert!(message.contains(named), "{answer}: {message}")
            }
            other => panic!("{answer}: {other:?}"),
        }
    }
}

/// Runs a raw server that negotiates `extensions` (None: none) and then sends `frames`; returns
/// the client's final event and the close code of the client's close frame.
fn fails_with(extensions: Option<&'static str>, frames: Vec<u8>) -> (Ev, Option<u16>) {
    let (url, server) = serve(move |mut peer| {
        match extensions {
            Some(e) => drop(peer.upgrade_with_extensions(e)),
            None => peer.upgrade(),
        }
        peer.send(&frames);
        let (seen, _) = peer.read_until_close();
        seen.last().and_then(Frame::close_code)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    (last_event(&rec, conn).unwrap(), server.join().unwrap())
}

#[test]
fn rsv1_where_it_is_not_allowed_fails_with_1002() {
    const PMD: Option<&str> = Some("permessage-deflate");
    let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    for (extensions, frames, why) in [
        (None, frame(FIN | RSV1 | TEXT, &hello), "no extension was negotiated"),
        (PMD, frame(FIN | RSV1 | PING, b""), "RSV1 set on a control frame"),
        (PMD, frame(FIN | RSV1 | PONG, b""), "RSV1 set on a control frame"),
        (
            PMD,
            [frame(RSV1 | TEXT, &hello[..2]), frame(FIN | RSV1 | CONTINUATION, &hello[2..])].concat(),
            "continuation",
        ),
        (PMD, frame(FIN | 0x20 | TEXT, b"x"), "reserved bits"),
    ] {
        let (event, code) = fails_with(extensions, frames);
        match event {
            Ev::Error(_, WsStatus::Protocol, message) => assert!(message.contains(why), "{message}"),
            other => panic!("{why}: {other:?}"),
        }
        assert_eq!(code, Some(1002), "{why}");
    }
}

#[test]
fn corrupt_compressed_data_fails_with_1007() {
    let (event, code) = fails_with(Some("permessage-deflate"), frame(FIN | RSV1 | BINARY, &[0xff; 16]));
    match event {
        Ev::Error(_, WsStatus::Protocol, message) => {
            assert!(message.contains("a compressed message from the peer cannot be inflated"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(code, Some(1007));
}

/// 1 GiB of zeros compressed to about 1 MiB, sent as one compressed message in fragments,
/// against a 16 MiB limit: the connection ends with 1009 and memory stays far below a GiB. The
/// compressed stream is made while it is sent: 1 MiB of zeros compressed once (a sync-flushed
/// block of zeros decodes the same wherever it stands), sent 1024 times.
#[test]
fn a_decompression_bomb_ends_with_1009_and_memory_stays_bounded() {
    if !in_child("a_decompression_bomb_ends_with_1009_and_memory_stays_bounded", &[]) {
        return;
    }
    let mut c = Compress::new(Compression::best(), false);
    let zeros = vec![0u8; 1 << 20];
    let mut block = Vec::with_capacity(1 << 16);
    c.compress_vec(&zeros, &mut block, FlushCompress::Sync).unwrap();
    // The first block starts the stream; the ones after it are the same bytes minus nothing:
    // every block is a literal zero then matches at distance 1.
    assert!(block.ends_with(&TAIL) && block.len() < 4096, "{}", block.len());
    let (url, server) = serve(move |mut peer| {
        peer.upgrade_with_extensions("permessage-deflate");
        peer.send(&frame(RSV1 | BINARY, &block));
        for _ in 1..1024 {
            if peer.stream.write_all(&frame(CONTINUATION, &block)).is_err() {
                break;
            }
        }
        let _ = peer.stream.write_all(&frame(FIN | CONTINUATION, &block[..block.len() - 4]));
        let (seen, _) = peer.read_until_close();
        seen.last().and_then(Frame::close_code)
    });
    let before = status_kib("VmHWM");
    let client = Client::new();
    let options = no_keepalive();
    set(unsafe { ws_options_set_max_message_size(options.0, 16 << 20) });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    match last_event(&rec, conn).unwrap() {
        Ev::Error(_, WsStatus::MessageTooBig, message) => {
            assert!(message.contains("inflates to more than"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.join().unwrap(), Some(1009));
    let grown_mib = (status_kib("VmHWM") - before) / 1024;
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB for a 16 MiB limit");
}

#[test]
fn deflate_options_check_their_arguments() {
    let options = Options::new();
    unsafe {
        assert_eq!(ws_options_set_deflate(std::ptr::null_mut(), true), WsStatus::NullArgument);
        assert_eq!(ws_options_set_deflate_level(std::ptr::null_mut(), 6), WsStatus::NullArgument);
        assert_eq!(ws_options_set_deflate_window_bits(std::ptr::null_mut(), 15, 15), WsStatus::NullArgument);
        assert_eq!(
            ws_options_set_deflate_no_context_takeover(std::ptr::null_mut(), true, true),
            WsStatus::NullArgument
        );
        assert_eq!(ws_options_set_deflate_threshold(std::ptr::null_mut(), 0), WsStatus::NullArgument);
        for level in [0, 10, u32::MAX] {
            assert_eq!(ws_options_set_deflate_level(options.0, level), WsStatus::InvalidArgument);
            assert!(last_error().contains("deflate level"), "{}", last_error());
        }
        for (client, server) in [(8, 15), (16, 15), (15, 7), (15, 16), (0, 0)] {
            assert_eq!(ws_options_set_deflate_window_bits(options.0, client, server), WsStatus::InvalidArgument);
            assert!(last_error().contains("window bits"), "{}", last_error());
        }
        set(ws_options_set_deflate_window_bits(options.0, 9, 8));
        set(ws_options_set_deflate_level(options.0, 1));
        set(ws_options_set_deflate_level(options.0, 9));
    }
}
