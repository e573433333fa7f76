//! Helpers for the tests (the crate's own and those in tests/, and the fuzz targets in fuzz/),
//! not part of the library's API: nothing here is exported to C.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// xorshift64*: a small deterministic generator, so that a randomized test's failure can be
/// replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max as u64 + 1) as usize;
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

// --- Fuzzing: entry points for the cargo-fuzz targets in fuzz/ ---------------------------------
//
// The parsers are crate-internal; these functions run them on arbitrary bytes and check the
// invariants that must hold whatever the bytes (a failed check panics, which the fuzzer reports).

/// The frame reader on arbitrary bytes, cut at arbitrary points.
///
/// Layout of `data`: byte 0 picks the maximum message size, byte 1 the read size, byte 2 how
/// many cut bytes follow (0 to 7); each cut byte gives the length of one chunk (the list is
/// cycled); the rest is the stream. Checks: no panic; the items (and the error that ends the
/// stream, if any) are the same whether the stream arrives whole, in the chunks the input
/// describes, or one byte at a time, and whether the I/O task reads it alone or the host's
/// thread takes turns with it (as `crate::host::reading` does: taking over between frames,
/// reading the small whole messages, giving back at anything else); no message is longer than
/// the maximum; text is UTF-8; control payloads are at most 125 bytes.
pub fn fuzz_frames(data: &[u8]) {
    use crate::io::reader::{FrameReader, Item, OnHost};
    use std::task::{Context, Poll};

    let [max_byte, read_byte, cuts_byte, rest @ ..] = data else {
        return;
    };
    let max_message = match max_byte {
        // No limit at all: memory must follow the bytes that arrived, whatever a header says.
        255 => usize::MAX,
        254 => crate::options::DEFAULT_MAX_MESSAGE_SIZE,
        b => 1 + (*b as usize) * (*b as usize),
    };
    let read_size = 256 << (read_byte % 9);
    let ncuts = (*cuts_byte % 8) as usize;
    let (cuts, stream) = rest.split_at(ncuts.min(rest.len()));
    let chunk_len = |b: u8| ((b & 0x3F) as usize + 1) << (2 * (b >> 6));

    /// An item as the host sees it: whether a message was read into the buffer or into an
    /// allocation of its own depends on how the bytes arrived, what it holds does not.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Message { text: bool, data: Vec<u8> },
        Ping(Vec<u8>),
        Pong,
        Close(Option<(u16, String)>),
    }
    /// What a stream produced: its items, then how it ended.
    type Outcome = (Vec<Seen>, Option<String>);
    // `turns`: the host's thread takes the reader over between frames, every other time it can.
    let read = |chunks: &mut dyn Iterator<Item = usize>, turns: bool| -> Outcome {
        let mut reader = FrameReader::new(Vec::new(), read_size, max_message, None);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut items = Vec::new();
        let mut offset = 0;
        let (mut host, mut chances) = (false, 0u32);
        while offset < stream.len() {
            let end = (offset + chunks.next().unwrap_or(1).max(1)).min(stream.len());
            let mut source = &stream[offset..end];
            offset = end;
            while !source.is_empty() {
                let read = if host {
                    reader.poll_read_on_host(&mut source, &mut cx)
                } else {
                    reader.poll_read_from(&mut source, &mut cx)
                };
                match read {
                    Poll::Ready(Ok(n)) => assert!(n > 0, "a read from a non-empty slice"),
                    other => panic!("a slice reads at once: {other:?}"),
                }
                loop {
                    if turns && !host && reader.between_frames() {
                        chances += 1;
                        host = chances % 2 == 0;
                    }
                    if host {
                        match reader.next_on_host(16 << 10) {
                            OnHost::Message { text } => {
                                items.push(Seen::Message { text, data: reader.payload().to_vec() });
                                continue;
                            }
                            OnHost::NeedBytes => break,
                            OnHost::Other => host = false,
                        }
                    }
                    let seen = match reader.next_item() {
                        Ok(Some(Item::Message { text })) => Seen::Message { text, data: reader.payload().to_vec() },
                        Ok(Some(Item::OwnedMessage { text, mut data })) => {
                            if text {
                                assert_eq!(data.pop(), Some(0), "text is handed over with a NUL");
                            }
                            Seen::Message { text, data }
                        }
                        Ok(Some(Item::Ping)) => Seen::Ping(reader.payload().to_vec()),
                        Ok(Some(Item::Pong)) => Seen::Pong,
                        Ok(Some(Item::Close(close))) => Seen::Close(close),
                        Ok(None) => break,
                        Err(e) => return (items, Some(format!("{e:?}"))),
                    };
                    items.push(seen);
                }
            }
            reader.release_if_drained();
        }
        (items, None)
    };

    let whole = read(&mut std::iter::once(stream.len()), false);
    let chunked = |turns| {
        if cuts.is_empty() {
            read(&mut std::iter::repeat(1), turns)
        } else {
            read(&mut cuts.iter().map(|b| chunk_len(*b)).cycle(), turns)
        }
    };
    let cut = chunked(false);
    assert!(whole == cut, "the stream read differently when cut: whole {whole:?}, cut {cut:?}");
    let turns = chunked(true);
    assert!(whole == turns, "the stream read differently taking turns: whole {whole:?}, taking turns {turns:?}");
    for item in &whole.0 {
        match item {
            Seen::Message { text, data } => {
                assert!(data.len() <= max_message, "message over the maximum");
                assert!(!text || std::str::from_utf8(data).is_ok(), "text not UTF-8");
            }
            Seen::Ping(payload) => assert!(payload.len() <= 125, "ping payload over 125 bytes"),
            Seen::Close(Some((code, reason))) => {
                assert!(*code >= 1000, "close code {code}");
                assert!(reason.len() <= 123, "close reason over 123 bytes");
            }
            Seen::Pong | Seen::Close(None) => {}
        }
    }
}

/// The key of RFC 6455's example; the fuzz corpus's responses carry its accept value.
pub const FUZZ_UPGRADE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The upgrade response parser on arbitrary bytes.
///
/// Byte 0 chooses the subprotocols offered (bit 0: "chat", bit 1: "superchat"); the rest is
/// what the server sent. Checks: no panic; a complete upgrade leaves exactly the bytes after
/// the head (which ends at its first empty line after the status line), needed the whole head (one byte less is
/// incomplete), carries the right accept value, chose an offered subprotocol if any, and stays
/// the same when more bytes follow.
pub fn fuzz_upgrade_response(data: &[u8]) {
    use crate::io::handshake::parse_response;
    use tungstenite::handshake::derive_accept_key;

    let [offer, buf @ ..] = data else {
        return;
    };
    let mut options = crate::options::Options::default();
    for (bit, name) in [(1, "chat"), (2, "superchat")] {
        if offer & bit != 0 {
            options.add_subprotocol(name).expect("a valid name");
        }
    }
    let key = FUZZ_UPGRADE_KEY;
    let Ok(Some(upgraded)) = parse_response(buf, key, &options) else {
        return;
    };
    let head_len = buf.len() - upgraded.leftover.len();
    assert_eq!(upgraded.leftover, buf[head_len..], "leftover is not a suffix");
    let head = &buf[..head_len];
    // Empty lines before the status line are skipped (httparse, as RFC 9112 2.2 allows).
    let mut start = 0;
    while head[start..].starts_with(b"\r\n") || head[start..].starts_with(b"\n") {
        start += if head[start] == b'\r' { 2 } else { 1 };
    }
    let blank = |i: usize| head[i..].starts_with(b"\n\r\n") || head[i..].starts_with(b"\n\n");
    let first_blank = (start..head.len()).find(|&i| blank(i));
    let end = first_blank.map(|i| i + if head[i + 1] == b'\r' { 3 } else { 2 });
    assert_eq!(end, Some(head_len), "the head does not end at its first empty line");
    let accept = derive_accept_key(key.as_bytes());
    assert!(head.windows(accept.len()).any(|w| w == accept.as_bytes()), "upgraded without the accept value");
    if let Some(protocol) = &upgraded.protocol {
        assert!(options.subprotocols.contains(protocol), "unoffered {protocol}");
    }
    assert!(
        matches!(parse_response(&buf[..head_len - 1], key, &options), Ok(None)),
        "a head one byte short is complete"
    );
    let mut more = buf.to_vec();
    more.extend_from_slice(b"\x81\x00more");
    let again = parse_response(&more, key, &options)
        .ok()
        .flatten()
        .expect("more bytes after a complete head change the outcome");
    assert_eq!(again.protocol, upgraded.protocol);
    assert_eq!(again.leftover, more[head_len..]);
}

/// URI validation on arbitrary bytes (UTF-8 only, as `ws_connect` checks that first).
///
/// Checks: no panic; an accepted URI has a non-empty host without brackets, a port from 1 to
/// 65535, a request target that starts with '/' and is plain printable ASCII (non-ASCII is
/// percent-encoded), an ASCII Host header; and the URI made of its scheme, Host header and
/// request target parses again to the same target (its zone identifier aside).
pub fn fuzz_uri(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(target) = crate::uri::parse(text) else {
        return;
    };
    assert!(!target.host.is_empty(), "empty host");
    assert!(!target.host.contains(['[', ']']), "brackets in {:?}", target.host);
    assert_ne!(target.port, 0);
    assert!(target.resource.starts_with('/'), "{:?}", target.resource);
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    assert!(printable(&target.resource), "{:?}", target.resource);
    assert!(printable(&target.host_header), "{:?}", target.host_header);
    let scheme = if target.tls { "wss" } else { "ws" };
    let shown = format!("{scheme}://{}{}", target.host_header, target.resource);
    let again = crate::uri::parse(&shown).expect("an accepted URI's parts are accepted again");
    // The zone stays out of the Host header (RFC 6874 4), so only it may differ.
    assert_eq!(crate::uri::Target { zone: target.zone, ..again }, target, "{text:?} re-parsed from {shown:?}");
}

// --- The panic boundary --------------------------------------------------------------------------

thread_local! {
    /// Set by `panic_in_next_call`: the next exported call on this thread panics inside its
    /// boundary. Only Rust code can set it (nothing here is exported to C), and it clears itself
    /// when it fires, so it cannot fire in normal use.
    static PANIC_IN_NEXT_CALL: Cell<bool> = const { Cell::new(false) };
}

/// Whether any thread ever asked for a panic: in normal use this is never written, so the check
/// in every exported call is one relaxed load of a global that stays in cache (the thread-local
/// is read only after a test has used the hook; in the shared library a thread-local read can
/// be a call to __tls_get_addr).
static HOOK_USED: AtomicBool = AtomicBool::new(false);

/// Makes the next exported `ws_*` call on this thread panic inside its panic boundary, as an
/// internal bug would: the call must then return its documented default and ws_last_error()
/// must say that a panic was caught.
pub fn panic_in_next_call() {
    HOOK_USED.store(true, Ordering::Relaxed);
    PANIC_IN_NEXT_CALL.set(true);
}

/// Whether `panic_in_next_call` is still waiting for a call to panic in (it did not fire).
pub fn panic_pending() -> bool {
    PANIC_IN_NEXT_CALL.get()
}

/// Called first inside every `ffi_boundary!`.
#[inline(always)]
pub(crate) fn panic_if_asked() {
    if HOOK_USED.load(Ordering::Relaxed) {
        panic_if_asked_on_this_thread();
    }
}

#[cold]
#[inline(never)]
fn panic_if_asked_on_this_thread() {
    if PANIC_IN_NEXT_CALL.get() {
        PANIC_IN_NEXT_CALL.set(false);
        panic!("wsclient::testing::panic_in_next_call: the panic a test asked for");
    }
}

// --- Defaults ------------------------------------------------------------------------------------

/// The options plain `ws_connect` uses, as the README's tables state them.
#[derive(Debug)]
pub struct Defaults {
    pub extra_ca_certificates: usize,
    pub client_certificates: usize,
    pub headers: usize,
    pub subprotocols: usize,
    pub connect_timeout_ms: u128,
    pub close_timeout_ms: u128,
    /// None: no keepalive pings.
    pub keepalive_interval_ms: Option<u128>,
    pub keepalive_timeout_ms: u128,
    pub max_message_size: usize,
    pub read_buffer_size: usize,
    pub receive_queue_limit: usize,
    pub send_queue_limit: usize,
    /// Whether the proxy comes from the environment (else the options name one, or none).
    pub proxy_from_environment: bool,
    pub max_redirects: u32,
    pub deflate: bool,
    pub deflate_client_window_bits: u8,
    pub deflate_server_window_bits: u8,
    pub deflate_level: u8,
    pub deflate_threshold: usize,
    pub deflate_client_no_context_takeover: bool,
    pub deflate_server_no_context_takeover: bool,
    pub read_on_dispatch: bool,
}

/// The library's actual defaults (those of `Options::default()`, which plain `ws_connect` and
/// `ws_options_new` use).
pub fn defaults() -> Defaults {
    let o = crate::options::Options::default();
    Defaults {
        extra_ca_certificates: o.tls.extra_ca.len(),
        client_certificates: usize::from(o.tls.client_cert.is_some()),
        headers: o.headers.len(),
        subprotocols: o.subprotocols.len(),
        connect_timeout_ms: o.connect_timeout.as_millis(),
        close_timeout_ms: o.close_timeout.as_millis(),
        keepalive_interval_ms: o.keepalive_interval.map(|d| d.as_millis()),
        keepalive_timeout_ms: o.keepalive_timeout.as_millis(),
        max_message_size: o.max_message_size,
        read_buffer_size: o.read_buffer_size,
        receive_queue_limit: o.receive_queue_limit,
        send_queue_limit: o.send_queue_limit,
        proxy_from_environment: o.proxy == crate::io::proxy::ProxySetting::Environment,
        max_redirects: o.max_redirects,
        deflate: o.deflate.enabled,
        read_on_dispatch: o.read_on_dispatch,
        deflate_client_window_bits: o.deflate.client_max_window_bits,
        deflate_server_window_bits: o.deflate.server_max_window_bits,
        deflate_level: o.deflate.level,
        deflate_threshold: o.deflate.threshold,
        deflate_client_no_context_takeover: o.deflate.client_no_context_takeover,
        deflate_server_no_context_takeover: o.deflate.server_no_context_takeover,
    }
}

// --- Counters for tests ----------------------------------------------------------------------------

/// How many sends on `conn` written on their caller's thread the socket took only in part (the
/// I/O task wrote the rest; for TLS, the rest waited encrypted in the session), if it is not
/// gone: the case the write-order tests must reach.
pub fn partial_writes(conn: crate::WsConn) -> Option<usize> {
    crate::host::handles::lookup(conn).map(|c| c.partial_writes())
}

/// permessage-deflate on arbitrary bytes: the answer parser and the frame reader inflating.
///
/// Byte 0: bit 7 set: the rest (as text, lossily) is a server's Sec-WebSocket-Extensions value,
/// checked against the default offer (bits 0-2 of byte 0 vary the offer); the answer must be
/// refused or give parameters in range that do not exceed the offer. Bit 7 clear: the rest is a
/// stream of server frames read with permessage-deflate agreed (bit 0: server context takeover
/// off, bits 1-3: server window 8 + n (clamped to 15)); every message is at most the maximum
/// message size (4 KiB) once inflated, whatever it was compressed from, and nothing panics.
pub fn fuzz_deflate(data: &[u8]) {
    let [mode, rest @ ..] = data else {
        return;
    };
    if mode & 0x80 != 0 {
        fuzz_extension_answer(*mode, rest);
    } else {
        fuzz_inflating_frames(*mode, rest);
    }
}

fn fuzz_extension_answer(mode: u8, answer: &[u8]) {
    use crate::deflate::{accept, DeflateConfig};
    let config = DeflateConfig {
        client_max_window_bits: if mode & 1 != 0 { 10 } else { 15 },
        server_max_window_bits: if mode & 2 != 0 { 9 } else { 15 },
        server_no_context_takeover: mode & 4 != 0,
        ..DeflateConfig::default()
    };
    let text = String::from_utf8_lossy(answer);
    let elements: Vec<&str> = text.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    if let Ok(Some(agreed)) = accept(&elements, &config) {
        assert!((8..=config.client_max_window_bits).contains(&agreed.client_window_bits), "{agreed:?}");
        assert!((8..=config.server_max_window_bits).contains(&agreed.server_window_bits), "{agreed:?}");
        assert!(agreed.server_no_context_takeover || !config.server_no_context_takeover, "{agreed:?}");
        assert_eq!(elements.len(), 1, "two extensions accepted");
    }
}

fn fuzz_inflating_frames(mode: u8, stream: &[u8]) {
    use crate::deflate::{Agreed, Inflater};
    use crate::io::reader::{FrameReader, Item};
    use std::task::{Context, Poll};

    const MAX: usize = 4096;
    let agreed = Agreed {
        client_window_bits: 15,
        server_window_bits: (8 + ((mode >> 1) & 7)).min(15),
        client_no_context_takeover: false,
        server_no_context_takeover: mode & 1 != 0,
        level: 6,
        threshold: 0,
    };
    let mut reader = FrameReader::new(Vec::new(), 256, MAX, Some(Inflater::new(&agreed)));
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    for mut chunk in stream.chunks(97) {
        while !chunk.is_empty() {
            match reader.poll_read_from(&mut chunk, &mut cx) {
                Poll::Ready(Ok(n)) => assert!(n > 0, "a read from a non-empty slice"),
                other => panic!("a slice reads at once: {other:?}"),
            }
            loop {
                match reader.next_item() {
                    Ok(Some(Item::Message { .. })) => assert!(reader.payload().len() <= MAX),
                    Ok(Some(Item::OwnedMessage { text, data })) => {
                        assert!(data.len() <= MAX + usize::from(text), "{} bytes handed over", data.len());
                        if text {
                            assert!(std::str::from_utf8(&data[..data.len() - 1]).is_ok(), "invalid UTF-8 handed over");
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
}
