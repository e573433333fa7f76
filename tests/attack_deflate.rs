//! Attacks on the README's permessage-deflate promises by a raw server that negotiates the
//! extension and then misbehaves: inflated memory while the host holds messages, window sizes
//! beyond what was negotiated, bytes after a final block, the inflated-size boundary, UTF-8
//! checked after inflating, many tiny fragments, control frames between compressed fragments,
//! and what the client compresses when several threads send.

mod common;

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::deflate::*;
use common::hostile::*;
use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// A complete raw deflate stream ending with a BFINAL=1 block.
fn deflate_final(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Finish).unwrap();
    assert_eq!(c.total_in() as usize, data.len());
    out
}

/// Connects to a raw server that negotiates `extensions` and then sends `frames`; returns the
/// events of the connection once it has ended, and the close code the client sent.
fn outcome(extensions: &'static str, options: Options, frames: Vec<u8>) -> (Vec<Ev>, Option<u16>) {
    let (url, server) = serve(move |mut peer| {
        peer.upgrade_with_extensions(extensions);
        peer.send(&frames);
        let (seen, _) = peer.read_until_close();
        let code = seen.last().and_then(Frame::close_code);
        if code.is_some() && code != Some(1000) {
            return code;
        }
        // The client answered a close of ours, or is still waiting: end politely.
        let _ = std::io::Write::write_all(&mut peer.stream, &close_frame(1000, ""));
        code
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    (rec.of(conn), server.join().unwrap())
}

// ---- memory while the host holds messages ----------------------------------------------------

static COUNTED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn count_message(_: WsConn, _: *const u8, len: usize, _: WsMessageKind, _: *mut c_void) {
    COUNTED.fetch_add(len, Ordering::Relaxed);
}

/// The server sends `count` compressed messages of 1 MiB of zeros each (about 1 KiB each on the
/// wire) while the host does not dispatch (`flow_control`: it takes the first message and does
/// not complete it). Returns the peak growth of malloc's heap in use, in MiB, over 3 s.
fn heap_growth_while_the_host_holds(flow_control: bool, count: usize) -> f64 {
    heap_growth_with(flow_control, count, 1 << 20)
}

/// `heap_growth_while_the_host_holds` with messages of `size` zeros.
fn heap_growth_with(flow_control: bool, count: usize, size: usize) -> f64 {
    let one = deflate_alone(&vec![0u8; size]);
    assert!(one.len() < size / 500 + 64, "{}", one.len());
    let (url, server) = serve(move |mut peer| {
        peer.upgrade_with_extensions(PMD);
        for _ in 0..count {
            if std::io::Write::write_all(&mut peer.stream, &frame(FIN | RSV1 | BINARY, &one)).is_err() {
                break;
            }
        }
        let _ = peer.read_timeout(Duration::from_secs(10)).read_to_end();
    });
    let client = Client::new();
    let options = no_keepalive();
    let rec = Recorder::default();
    let before = heap_in_use();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let user = &rec as *const Recorder as *mut c_void;
    set(ws_on_message(conn, Some(count_message), user));
    if flow_control {
        set(ws_set_flow_control(conn, true));
    }
    wait_open(&client, &rec, conn);
    if flow_control {
        // Take the first message and hold it.
        assert!(pump(&client, DEADLINE, || COUNTED.load(Ordering::Relaxed) > 0));
    }
    let mut peak = 0usize;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        peak = peak.max(heap_in_use().saturating_sub(before));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    drop(client);
    let _ = server.join();
    peak as f64 / MIB
}

/// README, flow control off: "a connection stops reading its socket once 1 MiB of received
/// messages waits for dispatch ... so memory for received data stays below that limit plus one
/// message ... plus the read buffer (64 KiB)". With compression each message costs its
/// inflated size: 300 messages of 1 MiB inflated arrive in 300 KiB of socket bytes.
#[test]
fn inflated_messages_are_bounded_by_the_receive_queue_limit() {
    if !in_child("inflated_messages_are_bounded_by_the_receive_queue_limit", &[]) {
        return;
    }
    let grown = heap_growth_while_the_host_holds(false, 300);
    eprintln!("heap grew by {grown:.1} MiB while the host did not dispatch");
    // 1 MiB queue + one message of 1 MiB + 64 KiB read buffer, plus generous slack.
    assert!(grown < 8.0, "heap grew by {grown:.1} MiB for a 1 MiB receive queue limit and 1 MiB messages");
}

/// README, flow control on: "no further message callback runs until ws_message_complete() ...
/// meanwhile the library does not read the socket ... still reads ahead up to one read buffer
/// (64 KiB)". 64 KiB of read-ahead can hold about 60 compressed messages of 1 MiB each.
#[test]
fn flow_control_read_ahead_does_not_inflate_what_it_holds() {
    if !in_child("flow_control_read_ahead_does_not_inflate_what_it_holds", &[]) {
        return;
    }
    let grown = heap_growth_while_the_host_holds(true, 300);
    eprintln!("heap grew by {grown:.1} MiB while the host held one message");
    assert!(grown < 8.0, "heap grew by {grown:.1} MiB while the host held one 1 MiB message");
}

// ---- what the server's stream may refer to ----------------------------------------------------

/// A connection whose server was held to `server_max_window_bits=9` (512 bytes) receives a
/// message of 4 KiB of noise, then the same 4 KiB again compressed as a back-reference 4 KiB
/// away: beyond the negotiated window. `interleave`: another compressed connection on the same
/// client receives a message between the two. Returns the second message's outcome.
fn beyond_the_window(interleave: bool) -> Result<Vec<u8>, (WsStatus, String)> {
    back_reference(interleave, 9)
}

/// `beyond_the_window` with the server held to `server_bits`.
fn back_reference(interleave: bool, server_bits: u32) -> Result<Vec<u8>, (WsStatus, String)> {
    let data = noise(7, 4096);
    let mut c = Compress::new_with_window_bits(Compression::best(), false, 15);
    let first = deflate_msg(&mut c, &data);
    let second = deflate_msg(&mut c, &data);
    assert!(second.len() < 64, "the second message is a back-reference: {} bytes", second.len());
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, server) = serve(move |mut peer| {
        let answer =
            if server_bits == 15 { PMD.to_string() } else { format!("{PMD}; server_max_window_bits={server_bits}") };
        peer.upgrade_with_extensions(&answer);
        peer.send(&frame(FIN | RSV1 | BINARY, &first));
        go_rx.recv().unwrap();
        peer.send(&frame(FIN | RSV1 | BINARY, &second));
        let _ = peer.read_timeout(Duration::from_secs(10)).read_until_close();
    });
    let (other_tx, other_rx) = mpsc::channel::<()>();
    let (other_url, other_server) = serve(move |mut peer| {
        peer.upgrade_with_extensions(PMD);
        if other_rx.recv().is_ok() {
            peer.send(&frame(FIN | RSV1 | TEXT, &deflate_alone(&[b'x'; 3000])));
        }
        let _ = peer.read_timeout(Duration::from_secs(10)).read_until_close();
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    set(unsafe { ws_options_set_deflate_window_bits(options.0, 15, server_bits) });
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let other = client.connect(&other_url);
    watch(other, &rec);
    client.run_until("the first message", || rec.of(conn).len() >= 2);
    assert_eq!(rec.of(conn)[1], Ev::Binary(conn, data.clone()));
    wait_open(&client, &rec, other);
    if interleave {
        other_tx.send(()).unwrap();
        client.run_until("the other connection's message", || rec.of(other).len() >= 2);
        assert!(matches!(&rec.of(other)[1], Ev::Text(_, t) if t.len() == 3000), "{:?}", rec.of(other));
    }
    go_tx.send(()).unwrap();
    client.run_until("the second message", || rec.of(conn).len() >= 3);
    let result = match rec.of(conn)[2].clone() {
        Ev::Binary(_, b) => Ok(b),
        Ev::Error(_, status, message) => Err((status, message)),
        other => panic!("{other:?}"),
    };
    let _ = close(conn, 1000, "");
    let _ = close(other, 1000, "");
    drop(client);
    let _ = server.join();
    drop(other_tx);
    let _ = other_server.join();
    result
}

/// README: the decompressor is pooled and "rebuilt from the context that connection kept ... at
/// most one window each way (2^server bits)". A stream that refers further back than the
/// negotiated server window must get the same answer whatever other connections did between its
/// messages (it was delivered when the connection was alone and refused with 1007 when another
/// connection used the pooled decompressor in between). README: it fails with close 1007.
#[test]
fn a_reference_beyond_the_negotiated_window_gets_the_same_answer_whatever_other_connections_do() {
    let alone = beyond_the_window(false);
    let interleaved = beyond_the_window(true);
    let short = |r: &Result<Vec<u8>, (WsStatus, String)>| match r {
        Ok(b) => format!("delivered {} bytes", b.len()),
        Err((s, m)) => format!("{s:?}: {m}"),
    };
    let refused =
        |r: &Result<Vec<u8>, (WsStatus, String)>| matches!(r, Err((WsStatus::Protocol, m)) if m.contains("inflate"));
    assert!(
        refused(&alone) && refused(&interleaved),
        "alone: {}; with another connection between the messages: {}",
        short(&alone),
        short(&interleaved)
    );
}

/// README: "when another connection used it since, it is rebuilt from the context that
/// connection kept". A message that refers 4 KiB back into the previous one, within the
/// default 32 KiB window, inflates the same whether or not another connection used the pooled
/// decompressor between the two messages.
#[test]
fn a_back_reference_within_the_window_survives_another_connection_using_the_decompressor() {
    let data = noise(7, 4096);
    assert_eq!(back_reference(false, 15), Ok(data.clone()), "alone");
    assert_eq!(back_reference(true, 15), Ok(data), "with another connection between the messages");
}

/// server_no_context_takeover negotiated, and the server refers back to its previous message:
/// the data cannot inflate on its own, so the connection fails with 1007 (never wrong data).
#[test]
fn server_no_context_takeover_and_a_back_reference_fails_with_1007() {
    let data = noise(3, 2000);
    let mut c = Compress::new(Compression::best(), false);
    let first = deflate_msg(&mut c, &data);
    let second = deflate_msg(&mut c, &data);
    let frames = [frame(FIN | RSV1 | BINARY, &first), frame(FIN | RSV1 | BINARY, &second)].concat();
    let (events, code) = outcome("permessage-deflate; server_no_context_takeover", no_keepalive(), frames);
    assert_eq!(events[1], Ev::Binary(events[0].conn(), data));
    assert!(
        matches!(&events[2], Ev::Error(_, WsStatus::Protocol, m) if m.contains("cannot be inflated")),
        "{events:?}"
    );
    assert_eq!(code, Some(1007));
}

/// Context takeover kept (the server may refer back) but a server that resets its compressor
/// for every message: each message inflates on its own.
#[test]
fn a_server_that_resets_its_context_without_saying_so_is_read_correctly() {
    let messages: Vec<Vec<u8>> = (0..5).map(|i| format!("message {i} {}", "abc".repeat(40)).into_bytes()).collect();
    let frames: Vec<u8> = messages.iter().flat_map(|m| frame(FIN | RSV1 | TEXT, &deflate_alone(m))).collect();
    let frames = [frames, close_frame(1000, "")].concat();
    let (events, _) = outcome(PMD, no_keepalive(), frames);
    let texts: Vec<Vec<u8>> =
        events.iter().filter_map(|e| if let Ev::Text(_, t) = e { Some(t.clone()) } else { None }).collect();
    assert_eq!(texts, messages, "{events:?}");
    assert!(matches!(events.last(), Some(Ev::Close(_, 1000, _))), "{events:?}");
}

// ---- final blocks ------------------------------------------------------------------------------

/// A message whose deflate stream ends with a final block (BFINAL=1) and then carries more
/// compressed data: README "compressed data that does not inflate fails it with close 1007".
/// The bytes after the end of the stream must not be dropped silently: either they are
/// inflated too or the connection fails; delivering only the part before them is wrong data.
#[test]
fn data_after_a_final_block_is_not_dropped_silently() {
    let mut payload = deflate_final(b"hello ");
    payload.extend(deflate_alone(b"world, and the rest of the message"));
    let frames = [frame(FIN | RSV1 | TEXT, &payload), close_frame(1000, "")].concat();
    let (events, code) = outcome(PMD, no_keepalive(), frames);
    let delivered: Vec<String> = events
        .iter()
        .filter_map(|e| if let Ev::Text(_, t) = e { Some(String::from_utf8_lossy(t).into_owned()) } else { None })
        .collect();
    assert!(
        delivered.is_empty() || delivered == ["hello world, and the rest of the message"],
        "the message was delivered truncated: {delivered:?} (events {events:?}, close code {code:?})"
    );
}

/// A final block in the middle of a context-takeover connection: the next message starts a new
/// stream, with or without references to the previous message's bytes.
#[test]
fn a_final_block_then_more_messages_with_context_takeover() {
    let first = json(0);
    let with_final = deflate_final(&first);
    // The next message as a new stream that refers back to `first` (its dictionary).
    let mut c = Compress::new(Compression::best(), false);
    c.set_dictionary(&first).unwrap();
    let second = deflate_msg(&mut c, &first);
    assert!(second.len() < 40, "{}", second.len());
    let third = deflate_alone(b"a third message, standing alone, all by itself");
    let frames = [
        frame(FIN | RSV1 | TEXT, &with_final),
        frame(FIN | RSV1 | TEXT, &second),
        frame(FIN | RSV1 | TEXT, &third),
        close_frame(1000, ""),
    ]
    .concat();
    let (events, _) = outcome(PMD, no_keepalive(), frames);
    let c = events[0].conn();
    assert_eq!(
        events[1..4],
        [
            Ev::Text(c, first.clone()),
            Ev::Text(c, first),
            Ev::Text(c, b"a third message, standing alone, all by itself".to_vec())
        ],
        "{events:?}"
    );
}

fn json(i: usize) -> Vec<u8> {
    let mut s = String::new();
    while s.len() < 1500 {
        s.push_str(&format!("{{\"seq\":{i},\"user\":\"u_{:06}\",\"text\":\"hello there\"}}", i * 31));
    }
    s.into_bytes()
}

// ---- sizes and text ----------------------------------------------------------------------------

fn with_max(max: u32) -> Options {
    let options = no_keepalive();
    set(unsafe { ws_options_set_max_message_size(options.0, max as usize) });
    options
}

/// README: the maximum message size applies to the inflated size; the first byte over it ends
/// the connection with 1009. Exactly the limit is delivered, text and binary.
#[test]
fn inflating_to_exactly_the_limit_is_delivered_and_one_more_byte_is_1009() {
    for (opcode, fill) in [(TEXT, "é"), (BINARY, "z")] {
        let exact = fill.repeat(5000 / fill.len()).into_bytes();
        assert_eq!(exact.len(), 5000);
        let frames = [frame(FIN | RSV1 | opcode, &deflate_alone(&exact)), close_frame(1000, "")].concat();
        let (events, _) = outcome(PMD, with_max(5000), frames);
        let c = events[0].conn();
        let want = if opcode == TEXT { Ev::Text(c, exact.clone()) } else { Ev::Binary(c, exact.clone()) };
        assert_eq!(events[1], want, "exactly the limit");
        let mut over = exact.clone();
        over.push(b'!');
        let (events, code) = outcome(PMD, with_max(5000), frame(FIN | RSV1 | opcode, &deflate_alone(&over)));
        assert!(
            matches!(&events[1], Ev::Error(_, WsStatus::MessageTooBig, m) if m.contains("inflates to more than 5000")),
            "{events:?}"
        );
        assert_eq!(code, Some(1009));
        // The same over the limit in fragments of 7 compressed bytes.
        let compressed = deflate_alone(&over);
        let mut frames = Vec::new();
        let chunks: Vec<&[u8]> = compressed.chunks(7).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let first = if i == 0 { RSV1 | opcode } else { CONTINUATION };
            frames.extend(frame(first | if i + 1 == chunks.len() { FIN } else { 0 }, chunk));
        }
        let (events, code) = outcome(PMD, with_max(5000), frames);
        assert!(matches!(&events[1], Ev::Error(_, WsStatus::MessageTooBig, _)), "{events:?}");
        assert_eq!(code, Some(1009));
    }
}

/// Text that is valid compressed data but invalid UTF-8 once inflated: close 1007.
#[test]
fn text_that_is_invalid_utf8_once_inflated_fails_with_1007() {
    for bad in [&b"abc\xff"[..], b"abc\xc3", b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80 too high"] {
        let (events, code) = outcome(PMD, no_keepalive(), frame(FIN | RSV1 | TEXT, &deflate_alone(bad)));
        assert!(
            matches!(&events[1], Ev::Error(_, WsStatus::Protocol, m) if m.contains("UTF-8")),
            "{bad:?}: {events:?}"
        );
        assert_eq!(code, Some(1007), "{bad:?}");
    }
}

/// Compressed text in fragments cut inside the deflate stream and between the bytes of
/// multi-byte characters (each fragment one compressed byte), with pings between fragments:
/// delivered whole, every ping answered.
#[test]
fn compressed_text_in_one_byte_fragments_with_pings_between() {
    let text = "héllo wörld ✓ 𝄞 ".repeat(30);
    // Stored blocks keep the UTF-8 bytes visible in the stream, so fragments split characters.
    let mut c = Compress::new(Compression::none(), false);
    let compressed = deflate_msg(&mut c, text.as_bytes());
    let (url, server) = serve(move |mut peer| {
        peer.upgrade_with_extensions(PMD);
        let n = compressed.len();
        let mut wire = Vec::new();
        for (i, b) in compressed.iter().enumerate() {
            let first = if i == 0 { RSV1 | TEXT } else { CONTINUATION };
            wire.extend(frame(first | if i + 1 == n { FIN } else { 0 }, &[*b]));
            if i % 50 == 0 {
                wire.extend(frame(FIN | PING, &(i as u32).to_be_bytes()));
            }
        }
        peer.send(&wire);
        let mut pongs = 0;
        loop {
            let f = peer.read_frame().unwrap();
            if f.opcode == PONG {
                pongs += 1;
            }
            if f.opcode == CLOSE {
                peer.send(&close_frame(1000, ""));
                return pongs;
            }
        }
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    client.run_until("the message", || rec.of(conn).len() >= 2);
    assert_eq!(rec.of(conn)[1], Ev::Text(conn, text.clone().into_bytes()));
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    let expected_pings = text.len().div_ceil(50); // upper bound check below
    let pongs = server.join().unwrap();
    assert!(pongs >= 1 && pongs <= expected_pings + 2, "{pongs} pongs");
}

/// A close frame from the server between two fragments of a compressed message: the client
/// answers it and ends with the server's code, and delivers no partial message.
#[test]
fn a_close_between_compressed_fragments_ends_cleanly() {
    let compressed = deflate_alone(&json(1));
    let frames = [
        frame(RSV1 | TEXT, &compressed[..10]),
        close_frame(1001, "going away"),
        frame(FIN | CONTINUATION, &compressed[10..]),
    ]
    .concat();
    let (events, code) = outcome(PMD, no_keepalive(), frames);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(&events[1], Ev::Close(_, 1001, r) if r == "going away"), "{events:?}");
    assert_eq!(code, Some(1001));
}

/// Empty compressed messages in the valid forms: one empty stored block without its tail
/// (0x00, RFC 7692 7.2.3.6), an empty final fixed block, an empty final stored block; each
/// three times in a row, as text and binary.
#[test]
fn empty_compressed_messages_are_delivered_empty() {
    let mut wrong = Vec::new();
    let payloads: [&[u8]; 3] = [&[0x00], &[0x03, 0x00], &[0x01, 0x00, 0x00, 0xff, 0xff]];
    for payload in payloads {
        for (a, b) in [(TEXT, TEXT), (BINARY, BINARY), (TEXT, BINARY)] {
            let (events, _) = outcome(PMD, no_keepalive(), three_times(payload, a, b));
            let c = events[0].conn();
            let empty = |op| if op == TEXT { Ev::Text(c, vec![]) } else { Ev::Binary(c, vec![]) };
            if events.get(1..4) != Some(&[empty(a), empty(b), empty(b)][..]) {
                wrong.push(format!("payload {payload:02x?} three times (opcodes {a}, {b}, {b}): {:?}", &events[1..]));
            }
        }
    }
    assert!(wrong.is_empty(), "empty compressed messages delivered wrongly:\n{}", wrong.join("\n"));
}

fn three_times(payload: &[u8], a: u8, b: u8) -> Vec<u8> {
    [
        frame(FIN | RSV1 | a, payload),
        frame(FIN | RSV1 | b, payload),
        frame(FIN | RSV1 | b, payload),
        close_frame(1000, ""),
    ]
    .concat()
}

/// README: "compressed data that does not inflate fails it with close 1007". A compressed
/// message whose deflate data, with the 00 00 ff ff tail appended, stops inside a block does
/// not inflate to a whole message: an empty payload with RSV1 (00 00 ff ff alone is a stored
/// block header cut short), or the payload 00 00 ff ff (with the tail: a stored block of 65,280
/// bytes of which 3 arrived). Each must fail with 1007; delivering the tail's own bytes as
/// data, or carrying the unfinished block into the next message (whose bytes then become
/// content of the previous block), is wrong data delivered silently.
#[test]
fn deflate_data_that_stops_inside_a_block_fails_with_1007() {
    let mut wrong = Vec::new();
    let payloads: [&[u8]; 2] = [&[], &[0x00, 0x00, 0xff, 0xff]];
    for payload in payloads {
        for (a, b) in [(BINARY, BINARY), (TEXT, TEXT)] {
            let (events, code) = outcome(PMD, no_keepalive(), three_times(payload, a, b));
            let delivered: Vec<&Ev> = events.iter().filter(|e| matches!(e, Ev::Text(..) | Ev::Binary(..))).collect();
            let failed = matches!(events.last(), Some(Ev::Error(_, WsStatus::Protocol, m)) if m.contains("inflate"));
            if !failed
                || code != Some(1007)
                || delivered.iter().any(|e| !matches!(e, Ev::Text(_, d) | Ev::Binary(_, d) if d.is_empty()))
            {
                wrong.push(format!(
                    "payload {payload:02x?} three times (opcodes {a}, {b}, {b}): {:?}, close code {code:?}",
                    &events[1..]
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "deflate data cut inside a block was not refused with 1007:\n{}", wrong.join("\n"));
}

/// 100,000 fragments: a compressed message of 100,000 bytes of noise (stored blocks) sent one
/// compressed byte per frame, then 100,000 empty continuation frames in another message:
/// delivered, within seconds, and memory bounded.
#[test]
fn a_hundred_thousand_tiny_compressed_fragments() {
    let data = noise(11, 100_000);
    let compressed = deflate_alone(&data);
    let n = compressed.len();
    let mut wire = Vec::with_capacity(n * 3 + 400_000);
    for (i, b) in compressed.iter().enumerate() {
        let first = if i == 0 { RSV1 | BINARY } else { CONTINUATION };
        wire.extend(frame(first | if i + 1 == n { FIN } else { 0 }, &[*b]));
    }
    let small = deflate_alone(b"after many empty fragments, the message");
    wire.extend(frame(RSV1 | TEXT, &small));
    for _ in 0..100_000 {
        wire.extend(frame(CONTINUATION, &[]));
    }
    wire.extend(frame(FIN | CONTINUATION, &[]));
    wire.extend(close_frame(1000, ""));
    let start = Instant::now();
    let io_before = io_threads_cpu();
    let (events, _) = outcome(PMD, no_keepalive(), wire);
    let (elapsed, io) = (start.elapsed(), io_threads_cpu() - io_before);
    let c = events[0].conn();
    assert_eq!(events[1], Ev::Binary(c, data));
    assert_eq!(events[2], Ev::Text(c, b"after many empty fragments, the message".to_vec()));
    assert!(io < Duration::from_secs(3), "the I/O thread used {io:?} ({elapsed:?} in all)");
}

// ---- what the client sends ---------------------------------------------------------------------

/// Inflates one of the client's messages (its frames' payloads joined) with the server's
/// continuing decompressor.
fn inflate_client(d: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(payload.len() * 8 + 1024);
    let start = d.total_in();
    loop {
        let at = (d.total_in() - start) as usize;
        d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync).unwrap();
        if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.len().max(1024));
    }
}

/// Reads the client's messages until its close frame: (compressed?, inflated payload).
fn client_messages(peer: &mut Peer) -> Vec<(bool, Vec<u8>)> {
    let mut d = Decompress::new(false);
    let mut messages = Vec::new();
    let mut partial: Option<(bool, Vec<u8>)> = None;
    loop {
        let f = peer.read_frame().unwrap();
        match f.opcode {
            CLOSE => {
                peer.send(&close_frame(1000, ""));
                return messages;
            }
            PING | PONG => continue,
            _ => {}
        }
        let (rsv1, mut data) = partial.take().unwrap_or((f.rsv1, Vec::new()));
        assert!(f.opcode == CONTINUATION || data.is_empty(), "a new message inside another");
        assert!(!(f.opcode == CONTINUATION && f.rsv1), "RSV1 on a continuation from the client");
        data.extend_from_slice(&f.payload);
        if !f.fin {
            partial = Some((rsv1, data));
            continue;
        }
        let payload = if rsv1 { inflate_client(&mut d, &data) } else { data };
        messages.push((rsv1, payload));
    }
}

/// A message of `size` bytes that names its sender and number (compressible, except `noise`).
fn tagged(thread: usize, seq: usize, size: usize) -> Vec<u8> {
    let mut m = format!("<{thread}:{seq}>").into_bytes();
    while m.len() < size {
        m.extend_from_slice(format!(" t{thread} s{seq} filler").as_bytes());
    }
    m.truncate(size);
    m
}

const SIZES: [usize; 9] = [12, 31, 32, 33, 100, 1000, 5000, 70_000, 40];

/// Two threads send 200 messages each, of sizes around the 32-byte threshold up to 70 KB,
/// while the host thread dispatches. README: "Messages under 32 bytes ... go out
/// uncompressed"; what arrives inflates back to exactly what each thread sent, in each
/// thread's order, with the context carried from message to message.
#[test]
fn messages_sent_from_two_threads_inflate_back_in_order() {
    let (url, server) = serve(|mut peer| {
        peer.upgrade_with_extensions(PMD);
        client_messages(&mut peer)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let senders: Vec<_> = (0..2)
        .map(|t| {
            std::thread::spawn(move || {
                for seq in 0..200 {
                    let m = tagged(t, seq, SIZES[seq % SIZES.len()]);
                    let status = if seq % 2 == 0 {
                        send_binary(conn, &m)
                    } else {
                        send_text(conn, std::str::from_utf8(&m).unwrap())
                    };
                    assert_eq!(status, WsStatus::Ok);
                }
            })
        })
        .collect();
    pump(&client, Duration::from_millis(200), || false);
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    let messages = server.join().unwrap();
    assert_eq!(messages.len(), 400);
    let mut next = [0usize; 2];
    for (rsv1, m) in &messages {
        let t = usize::from(m[1] - b'0');
        let want = tagged(t, next[t], SIZES[next[t] % SIZES.len()]);
        assert!(
            *m == want,
            "thread {t}: message {} differs: {:?}",
            next[t],
            String::from_utf8_lossy(&m[..m.len().min(40)])
        );
        assert_eq!(*rsv1, m.len() >= 32, "{} bytes sent {}", m.len(), if *rsv1 { "compressed" } else { "plain" });
        next[t] += 1;
    }
    assert_eq!(next, [200, 200]);
}

/// README: "messages that would not shrink go out uncompressed"; the bytes arrive unchanged,
/// and the next compressed message still inflates with the context that skipped them.
#[test]
fn a_message_that_would_not_shrink_goes_out_plain_and_the_context_stays_right() {
    let (url, server) = serve(|mut peer| {
        peer.upgrade_with_extensions(PMD);
        client_messages(&mut peer)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let sent = [json(1), noise(5, 5000), json(1), noise(6, 40), json(2)];
    for m in &sent {
        assert_eq!(send_binary(conn, m), WsStatus::Ok);
    }
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    let messages = server.join().unwrap();
    let flags: Vec<bool> = messages.iter().map(|m| m.0).collect();
    assert_eq!(flags, [true, false, true, false, true]);
    let payloads: Vec<Vec<u8>> = messages.into_iter().map(|m| m.1).collect();
    assert_eq!(payloads, sent);
}

// ---- what is in force --------------------------------------------------------------------------

fn extensions_of(conn: WsConn) -> String {
    let mut buf = [0 as std::os::raw::c_char; 256];
    let mut len = 0usize;
    set(unsafe { ws_extensions(conn, buf.as_mut_ptr(), buf.len(), &mut len) });
    let bytes: Vec<u8> = buf[..len].iter().map(|&c| c as u8).collect();
    String::from_utf8(bytes).unwrap()
}

/// The header's ws_extensions: "permessage-deflate; client_max_window_bits=N;
/// server_max_window_bits=M", then the no-context-takeover flags that apply; a buffer too
/// small gets WS_STATUS_BUFFER_TOO_SMALL and the size it needs. And what the client sends
/// inflates with the window the server allowed it (a 9-bit decompressor on the server).
#[test]
fn ws_extensions_tells_what_is_in_force_and_the_client_keeps_to_it() {
    for (answer, in_force, server_window) in [
        (PMD, "permessage-deflate; client_max_window_bits=15; server_max_window_bits=15", 15u8),
        (
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=15; server_max_window_bits=15",
            15,
        ),
        (
            "permessage-deflate; client_max_window_bits=9; server_max_window_bits=12; client_no_context_takeover; \
             server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=9; server_max_window_bits=12; client_no_context_takeover; \
             server_no_context_takeover",
            9,
        ),
        (
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=9",
            "permessage-deflate; client_max_window_bits=9; server_max_window_bits=15; server_no_context_takeover",
            9,
        ),
        (
            "permessage-deflate; client_max_window_bits=8",
            "permessage-deflate; client_max_window_bits=8; server_max_window_bits=15",
            8,
        ),
    ] {
        let (url, server) = serve(move |mut peer| {
            peer.upgrade_with_extensions(answer);
            let mut d = Decompress::new_with_window_bits(false, server_window.max(9));
            let mut seen = Vec::new();
            loop {
                let f = peer.read_frame().unwrap();
                if f.opcode == CLOSE {
                    peer.send(&close_frame(1000, ""));
                    return seen;
                }
                let mut input = f.payload.clone();
                if f.rsv1 {
                    input.extend_from_slice(&TAIL);
                    let mut out = Vec::with_capacity(1 << 16);
                    let r = d.decompress_vec(&input, &mut out, FlushDecompress::Sync);
                    seen.push((true, r.map(|_| out).map_err(|e| e.to_string())));
                } else {
                    seen.push((false, Ok(input)));
                }
            }
        });
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&url);
        watch(conn, &rec);
        wait_open(&client, &rec, conn);
        assert_eq!(extensions_of(conn), in_force, "answer {answer}");
        let mut small = [0 as std::os::raw::c_char; 10];
        let mut need = 0usize;
        assert_eq!(
            unsafe { ws_extensions(conn, small.as_mut_ptr(), small.len(), &mut need) },
            WsStatus::BufferTooSmall
        );
        assert_eq!(need, in_force.len() + 1);
        let m = json(4);
        for _ in 0..3 {
            assert_eq!(send_binary(conn, &m), WsStatus::Ok);
        }
        assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
        client.run_until_final(&rec, conn);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 3);
        for (compressed, inflated) in seen {
            assert_eq!(compressed, server_window >= 9, "{answer}: with client_max_window_bits=8 we send plain");
            assert_eq!(inflated.as_deref(), Ok(&m[..]), "{answer}: inflated with a {server_window}-bit window");
        }
    }
}

/// RSV2 or RSV3 on a compressed message, and RSV1 on the continuation of a compressed message
/// after a ping between the fragments: close 1002.
#[test]
fn other_reserved_bits_on_compressed_frames_fail_with_1002() {
    let compressed = deflate_alone(&json(2));
    for (frames, why) in [
        (frame(FIN | RSV1 | 0x20 | TEXT, &compressed), "RSV2"),
        (frame(FIN | RSV1 | 0x10 | BINARY, &compressed), "RSV3"),
        (
            [
                frame(RSV1 | TEXT, &compressed[..5]),
                frame(FIN | PING, b"p"),
                frame(FIN | RSV1 | CONTINUATION, &compressed[5..]),
            ]
            .concat(),
            "RSV1 on a continuation after a ping",
        ),
    ] {
        let (events, code) = outcome(PMD, no_keepalive(), frames);
        assert!(matches!(events.last(), Some(Ev::Error(_, WsStatus::Protocol, _))), "{why}: {events:?}");
        assert_eq!(events.len(), 2, "{why}: nothing delivered: {events:?}");
        assert_eq!(code, Some(1002), "{why}");
    }
}

/// As above with 8 MiB messages (8 KiB on the wire each). README: memory for received data
/// "stays below that limit plus one message ... plus the read buffer", and the limit "counts
/// what each waiting message really costs ... the memory that holds it": 1 MiB + 8 MiB +
/// 64 KiB = 9.06 MiB. (The same message sent uncompressed grows the heap by 8.1 MiB; a
/// single compressed one, alone, by 16.1 MiB: the inflated message's allocation is about twice
/// its length, as inflating doubles the buffer and the result is not shrunk; peak RSS grows by
/// about 4 MiB more than for the plain message.)
#[test]
fn large_inflated_messages_are_bounded_by_the_queue_limit_plus_one_message() {
    if !in_child("large_inflated_messages_are_bounded_by_the_queue_limit_plus_one_message", &[]) {
        return;
    }
    let grown = heap_growth_with(false, 40, 8 << 20);
    eprintln!("heap grew by {grown:.1} MiB while the host did not dispatch");
    assert!(
        grown < 10.5,
        "heap grew by {grown:.1} MiB for a 1 MiB queue limit and 8 MiB inflated messages (bound: 9.06 MiB)"
    );
}

/// README: "a compressed message in fragments is gathered as it arrives, still compressed,
/// then inflated: its compressed bytes are bounded by the same limit". Empty stored blocks
/// (5 bytes each, inflating to nothing) past the limit: 1009; under it: the message.
#[test]
fn padding_of_empty_blocks_is_bounded_by_the_limit_in_compressed_bytes() {
    let block = [0x00, 0x00, 0x00, 0xff, 0xff];
    for (blocks, delivered) in [(10_000usize, true), (30_000, false)] {
        let mut compressed: Vec<u8> = block.repeat(blocks);
        compressed.extend(deflate_alone(b"hi there, after the padding"));
        let chunks: Vec<&[u8]> = compressed.chunks(500).collect();
        let mut frames = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let first = if i == 0 { RSV1 | TEXT } else { CONTINUATION };
            frames.extend(frame(first | if i + 1 == chunks.len() { FIN } else { 0 }, chunk));
        }
        frames.extend(close_frame(1000, ""));
        let (events, code) = outcome(PMD, with_max(100_000), frames);
        let c = events[0].conn();
        if delivered {
            assert_eq!(events[1], Ev::Text(c, b"hi there, after the padding".to_vec()), "{blocks} blocks");
        } else {
            assert!(matches!(&events[1], Ev::Error(_, WsStatus::MessageTooBig, _)), "{blocks} blocks: {events:?}");
            assert_eq!(code, Some(1009));
        }
    }
}

/// Flow control on, and 60 compressed messages that each refer back to the one before (context
/// takeover), some in fragments: completed one by one from the host, every message inflates
/// right and in order.
#[test]
fn flow_control_with_context_takeover_delivers_every_message_right() {
    let messages: Vec<Vec<u8>> = (0..60).map(|i| tagged(i % 3, i, 200 + 37 * i)).collect();
    let mut c = Compress::new(Compression::default(), false);
    let mut wire = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let payload = deflate_msg(&mut c, m);
        if i % 4 == 3 && payload.len() > 4 {
            wire.extend(frame(RSV1 | BINARY, &payload[..3]));
            wire.extend(frame(FIN | PING, b"x"));
            wire.extend(frame(FIN | CONTINUATION, &payload[3..]));
        } else {
            wire.extend(frame(FIN | RSV1 | BINARY, &payload));
        }
    }
    let (url, server) = serve(move |mut peer| {
        peer.upgrade_with_extensions(PMD);
        peer.send(&wire);
        let _ = peer.read_timeout(Duration::from_secs(10)).read_until_close();
        peer.send(&close_frame(1000, ""));
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    set(ws_set_flow_control(conn, true));
    wait_open(&client, &rec, conn);
    for i in 0..messages.len() {
        client.run_until("the next message", || rec.of(conn).len() > i + 1);
        assert_eq!(rec.of(conn).len(), i + 2, "one message at a time");
        set(ws_message_complete(conn));
    }
    let got: Vec<Ev> = rec.of(conn)[1..].to_vec();
    let want: Vec<Ev> = messages.iter().map(|m| Ev::Binary(conn, m.clone())).collect();
    assert!(got == want, "a message differs");
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    server.join().unwrap();
}
