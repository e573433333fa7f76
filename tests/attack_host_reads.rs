//! Attacks on the promises that reading small frames on the host's thread, inside ws_dispatch,
//! could break (the planned change: while a connection is open and the host dispatches, whole
//! unfragmented uncompressed data frames of up to 16 KiB are read and parsed there, and the
//! connection goes back to the I/O thread for control frames, fragments, larger or compressed
//! frames, protocol errors, EOF and resets, a full receive queue or flow control, ws_close,
//! keepalive, and a host that has stopped dispatching for about 100 ms while data waits).
//!
//! Every test passes on the code as it is (the I/O thread reads everything) and asserts a
//! documented bound or outcome (README "Threading contract", "Flow control and memory bounds",
//! "Security", the options table; include/wsclient.h):
//! - every message arrives once, whole, in order, with its kind; every ping gets exactly its pong,
//!   in order, while the server reads; callbacks run only on the dispatching thread;
//! - a host loop (epoll on ws_client_fd, level-triggered, or edge-triggered and declared so) is
//!   never left 1.5 s without a wake-up while callbacks are pending;
//! - pings are answered while the host is behind (stalled between dispatches, stuck in a
//!   callback, holding a message, or with its receive queue full), within 1 s;
//! - keepalive: no timeout while the peer answers or data flows; a timeout within interval +
//!   timeout (+ 1 s) of the last thing received, never earlier;
//! - each ending (close, FIN, reset, each protocol violation, a message over the maximum) right
//!   behind a burst: every message before it, then exactly one final callback with the right
//!   status or code, and (protocol errors) the host's replies before the close frame;
//! - ws_close and sends from other threads, flow control completed from another thread: every
//!   message the peer sent before its close frame delivered, every accepted send delivered
//!   before the close frame;
//! - ws_dispatch runs only the callbacks pending when it is called;
//! - ws_client_free is refused while another thread dispatches, and returns promptly otherwise;
//! - idle connections (50 of them, and ones holding a message with data unread behind it) cost
//!   no CPU.
//!
//! The peers are raw, scripted servers (plain TCP or rustls) that read the client's frames while
//! they write, so that neither side can block the other; streams are made from seeded `Rng`s and
//! written in chunks of 1 byte to 100 KiB, some split across writes with short pauses. Tests
//! synchronise on events; the only sleeps are a host that is blocked on purpose, and pauses that
//! shape traffic.

mod common;

use std::ffi::c_void;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use common::deflate::{deflate_msg, PMD};
use common::hostile::*;
use common::*;
use flate2::{Compress, Compression};

/// How long a host loop may go without a wake-up while callbacks are pending.
const STALL: Duration = Duration::from_millis(1500);
/// The longest any one test's host loop may run (a safety net; the tests take seconds).
const LOOP_LIMIT: Duration = Duration::from_secs(40);
/// How long a ping may wait for its answer while the host is behind.
const PONG_BOUND: Duration = Duration::from_secs(1);

// ---- randomness ------------------------------------------------------------------------------

/// A number in lo..=hi.
fn between(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below((hi - lo + 1) as u64) as usize
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.below(256) as u8).collect()
}

/// Valid UTF-8 of exactly `len` bytes, starting with `tag` where it fits: ASCII with 2-, 3- and
/// 4-byte characters and U+0000 mixed in.
fn text_of(rng: &mut Rng, len: usize, tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    if tag.len() <= len {
        out.extend_from_slice(tag.as_bytes());
    }
    while out.len() < len {
        let piece: &[u8] = match rng.below(12) {
            0 => "é".as_bytes(),
            1 => "€".as_bytes(),
            2 => "😀".as_bytes(),
            3 => b"\0",
            _ => b"abcdefghijklmnopqrstuvwxyz ".as_slice(),
        };
        if piece.len() > 4 {
            out.push(piece[rng.below(piece.len() as u64) as usize]);
        } else if out.len() + piece.len() <= len {
            out.extend_from_slice(piece);
        } else {
            out.push(b'.');
        }
    }
    out
}

/// A message as the host received it (or as the test expects it).
#[derive(Clone, PartialEq, Eq)]
struct Msg {
    text: bool,
    data: Vec<u8>,
}

impl Msg {
    fn text(data: &[u8]) -> Msg {
        Msg { text: true, data: data.to_vec() }
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = &self.data[..self.data.len().min(24)];
        let kind = if self.text { "text" } else { "binary" };
        write!(f, "{kind} of {} bytes {:?}", self.data.len(), String::from_utf8_lossy(head))
    }
}

/// Asserts that the host got exactly `expected`, naming the first difference (not the megabytes).
fn assert_messages(got: &[Msg], expected: &[Msg], what: &str) {
    if got == expected {
        return;
    }
    let first = got.iter().zip(expected).position(|(g, e)| g != e).unwrap_or(got.len().min(expected.len()));
    panic!(
        "{what}: the host got {} messages, {} were sent; the first difference is at message {first}: got {:?}, \
         expected {:?} (the one before: {:?})",
        got.len(),
        expected.len(),
        got.get(first),
        expected.get(first),
        first.checked_sub(1).and_then(|i| expected.get(i)),
    );
}

// ---- streams a server sends ------------------------------------------------------------------

/// Frames as a server sends them, with the messages and pings they hold.
#[derive(Default)]
struct Stream {
    wire: Vec<u8>,
    messages: Vec<Msg>,
    pings: Vec<Vec<u8>>,
}

impl Stream {
    fn ping(&mut self, rng: &mut Rng) {
        let mut payload = format!("ping {} ", self.pings.len()).into_bytes();
        let filler = rng.below((126 - payload.len()) as u64) as usize;
        payload.extend(random_bytes(rng, filler));
        self.wire.extend(frame(FIN | PING, &payload));
        self.pings.push(payload);
    }

    fn unsolicited_pong(&mut self, rng: &mut Rng) {
        let len = rng.below(126) as usize;
        self.wire.extend(frame(FIN | PONG, &random_bytes(rng, len)));
    }

    /// `msg` as one frame, or in `fragments` frames cut at random bytes (inside UTF-8
    /// characters too) with pings and unsolicited pongs between them; compressed
    /// (permessage-deflate, RSV1 on the first frame) when `deflate` is given and the dice say so.
    fn message(&mut self, rng: &mut Rng, msg: Msg, deflate: Option<&mut Compress>, fragments: usize) {
        let (body, rsv) = match deflate {
            // (Not an empty one: a sync flush right after another makes no bytes at all.)
            Some(c) if !msg.data.is_empty() && rng.below(10) < 4 => (deflate_msg(c, &msg.data), RSV1),
            _ => (msg.data.clone(), 0),
        };
        let opcode = if msg.text { TEXT } else { BINARY };
        if fragments <= 1 {
            self.wire.extend(frame(FIN | rsv | opcode, &body));
        } else {
            let mut cuts: Vec<usize> = (0..fragments - 1).map(|_| rng.below(body.len() as u64 + 1) as usize).collect();
            cuts.sort_unstable();
            cuts.push(body.len());
            let mut from = 0;
            for (i, &to) in cuts.iter().enumerate() {
                let first = if i == 0 { opcode | rsv } else { CONTINUATION };
                let fin = if i == cuts.len() - 1 { FIN } else { 0 };
                self.wire.extend(frame(fin | first, &body[from..to]));
                from = to;
                if fin == 0 {
                    match rng.below(10) {
                        0..=4 => self.ping(rng),
                        5 => self.unsolicited_pong(rng),
                        _ => {}
                    }
                }
            }
        }
        self.messages.push(msg);
    }
}

/// A message of `len` bytes numbered `i`: text (valid UTF-8) or binary.
fn numbered(rng: &mut Rng, i: usize, len: usize, text: bool) -> Msg {
    if text {
        return Msg { text, data: text_of(rng, len, &format!("#{i}:")) };
    }
    let mut data = random_bytes(rng, len);
    let tag = (i as u32).to_le_bytes();
    let n = len.min(4);
    data[..n].copy_from_slice(&tag[..n]);
    Msg { text, data }
}

/// A long randomized stream: small text and binary messages, messages just under and over
/// 16 KiB, larger ones, fragmented ones (pings between fragments), pings with payloads,
/// unsolicited pongs, empty messages; it ends with a ping, whose answer shows the client read it
/// all. With `deflate`, some messages are compressed.
fn mixed_stream(rng: &mut Rng, items: usize, mut deflate: Option<&mut Compress>) -> Stream {
    let mut s = Stream::default();
    for i in 0..items {
        let text = rng.below(2) == 0;
        match rng.below(100) {
            0..=34 => {
                let len = rng.below(200) as usize;
                let m = numbered(rng, i, len, true);
                s.message(rng, m, deflate.as_deref_mut(), 1);
            }
            35..=54 => {
                let len = rng.below(2000) as usize;
                let m = numbered(rng, i, len, false);
                s.message(rng, m, deflate.as_deref_mut(), 1);
            }
            55..=61 => {
                let len = between(rng, 2000, 16383);
                let m = numbered(rng, i, len, text);
                s.message(rng, m, deflate.as_deref_mut(), 1);
            }
            62..=71 => {
                // Around the 16 KiB line: 16,380 to 16,388 bytes.
                let len = between(rng, (16 << 10) - 4, (16 << 10) + 4);
                let m = numbered(rng, i, len, text);
                s.message(rng, m, deflate.as_deref_mut(), 1);
            }
            72..=74 => {
                let len = between(rng, (16 << 10) + 5, 160 << 10);
                let m = numbered(rng, i, len, text);
                s.message(rng, m, deflate.as_deref_mut(), 1);
            }
            75..=82 => {
                let len = if rng.below(2) == 0 { rng.below(3000) as usize } else { rng.below(40_000) as usize };
                let m = numbered(rng, i, len, text);
                let fragments = between(rng, 2, 6);
                s.message(rng, m, deflate.as_deref_mut(), fragments);
            }
            83..=90 => s.ping(rng),
            91..=95 => s.unsolicited_pong(rng),
            _ => {
                let m = Msg { text, data: Vec::new() };
                s.message(rng, m, deflate.as_deref_mut(), 1);
            }
        }
    }
    s.ping(rng);
    s
}

/// A stream of mostly small whole messages (the frames the change would read on the host's
/// thread), with pings, unsolicited pongs, a few small fragmented messages and a few around
/// 16 KiB between them; it ends with a ping.
fn small_stream(rng: &mut Rng, items: usize) -> Stream {
    let mut s = Stream::default();
    for i in 0..items {
        let text = rng.below(3) != 0;
        match rng.below(100) {
            0..=79 => {
                let len = rng.below(300) as usize;
                let m = numbered(rng, i, len, text);
                s.message(rng, m, None, 1);
            }
            80..=87 => s.ping(rng),
            88..=91 => s.unsolicited_pong(rng),
            92..=95 => {
                let len = rng.below(600) as usize;
                let m = numbered(rng, i, len, text);
                let fragments = between(rng, 2, 3);
                s.message(rng, m, None, fragments);
            }
            _ => {
                let len = between(rng, (16 << 10) - 2, (16 << 10) + 2);
                let m = numbered(rng, i, len, text);
                s.message(rng, m, None, 1);
            }
        }
    }
    s.ping(rng);
    s
}

/// `n` small messages tagged "{tag}{i}:" (0 to `max` bytes of filler after the tag), text and
/// binary, as frames in one buffer.
fn small_messages(rng: &mut Rng, tag: &str, n: usize, max: usize) -> (Vec<u8>, Vec<Msg>) {
    let mut wire = Vec::new();
    let mut messages = Vec::new();
    for i in 0..n {
        let text = rng.below(3) != 0;
        let filler = rng.below(max as u64 + 1) as usize;
        let mut data = format!("{tag}{i}:").into_bytes();
        if text {
            data.extend(text_of(rng, filler, ""));
        } else {
            data.extend(random_bytes(rng, filler));
        }
        wire.extend(frame(FIN | if text { TEXT } else { BINARY }, &data));
        messages.push(Msg { text, data });
    }
    (wire, messages)
}

/// A frame masked as only a client may send it (a server that does is broken).
fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = header(first, payload.len() as u64);
    bytes[1] |= 0x80;
    let key = [0x12, 0x34, 0x56, 0x78];
    bytes.extend_from_slice(&key);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    bytes
}

/// The size of the next chunk a peer writes: 1 byte to 100 KiB.
fn chunk_size(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=2 => between(rng, 1, 16),
        3..=5 => between(rng, 17, 2000),
        6..=8 => between(rng, 2001, 32 << 10),
        _ => between(rng, 32 << 10, 100 << 10),
    }
}

// ---- the raw peer ----------------------------------------------------------------------------

/// One frame the client sent (unmasked), parsed from the start of `buf`: the frame and the
/// bytes it took; None if it has not all arrived.
fn parse_client_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 == 0 {
        return Err(format!("an unmasked frame from the client: {:02x?}", &buf[..buf.len().min(8)]));
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask = &buf[at..at + 4];
    let payload = buf[at + 4..at + 4 + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    let frame = Frame { fin: buf[0] & 0x80 != 0, rsv1: buf[0] & 0x40 != 0, opcode: buf[0] & 0x0f, payload };
    Ok(Some((frame, at + 4 + len)))
}

/// A server's side of one connection, plain or TLS, non-blocking underneath: it writes what the
/// test says and reads (and parses) what the client sends whenever it waits or its writes are
/// blocked, so that neither side can block the other.
struct Raw {
    sock: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    inbuf: Vec<u8>,
    /// The client's frames, with when each was parsed.
    frames: Vec<(Instant, Frame)>,
    /// How the client's side ended: None while it has not; Some(None) at EOF (or TLS
    /// close_notify), Some(Some(kind)) on an error.
    ended: Option<Option<io::ErrorKind>>,
    /// When `ended` was first seen.
    ended_at: Option<Instant>,
    /// What was wrong with what the client sent.
    bad: Vec<String>,
    /// Answer the client's pings (keepalive).
    answer_pings: bool,
    to_answer: Vec<Vec<u8>>,
    /// How long one `send` may stay blocked.
    send_limit: Duration,
}

impl Raw {
    fn plain(mut peer: Peer, deflate: bool) -> Raw {
        if deflate {
            peer.upgrade_with_extensions(PMD);
        } else {
            peer.upgrade();
        }
        Raw::over(peer.stream, None)
    }

    fn tls(identity: &TlsIdentity, peer: Peer) -> Raw {
        let mut tls = identity.accept(peer);
        let request = read_request_from(&mut tls).expect("the upgrade request over TLS");
        tls.write_all(response_to(&request, "").as_bytes()).unwrap();
        tls.flush().unwrap();
        let rustls::StreamOwned { conn, sock } = tls;
        Raw::over(sock, Some(Box::new(conn)))
    }

    fn over(sock: TcpStream, tls: Option<Box<rustls::ServerConnection>>) -> Raw {
        sock.set_nonblocking(true).unwrap();
        Raw {
            sock,
            tls,
            inbuf: Vec::new(),
            frames: Vec::new(),
            ended: None,
            ended_at: None,
            bad: Vec::new(),
            answer_pings: false,
            to_answer: Vec::new(),
            send_limit: PEER_TIMEOUT,
        }
    }

    fn end(&mut self, how: Option<io::ErrorKind>) {
        if self.ended.is_none() {
            self.ended = Some(how);
            self.ended_at = Some(Instant::now());
        }
    }

    /// Waits (at most `timeout`) until the socket is readable (or writable, with `write`).
    fn wait_io(&self, write: bool, timeout: Duration) {
        // Once the client's side ended the socket stays readable: wait for writability only.
        let read = if self.ended.is_none() { libc::POLLIN } else { 0 };
        let events = read | if write { libc::POLLOUT } else { 0 };
        if events == 0 {
            std::thread::sleep(timeout);
            return;
        }
        let mut pfd = libc::pollfd { fd: self.sock.as_raw_fd(), events, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1) as i32) };
    }

    /// Reads what the client has sent so far, without blocking, and parses it.
    fn read_available(&mut self) {
        let mut buf = [0u8; 16 << 10];
        while self.ended.is_none() {
            match self.tls.as_mut() {
                None => match self.sock.read(&mut buf) {
                    Ok(0) => self.end(None),
                    Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => self.end(Some(e.kind())),
                },
                Some(tls) => {
                    let mut drained = false;
                    let mut ended = None;
                    match tls.read_tls(&mut self.sock) {
                        Ok(0) => ended = Some(None),
                        Ok(_) => {
                            if let Err(e) = tls.process_new_packets() {
                                self.bad.push(format!("TLS from the client: {e}"));
                                ended = Some(Some(io::ErrorKind::InvalidData));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => drained = true,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => ended = Some(Some(e.kind())),
                    }
                    loop {
                        match tls.reader().read(&mut buf) {
                            // close_notify.
                            Ok(0) => {
                                ended.get_or_insert(None);
                                break;
                            }
                            Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                            Err(_) => break,
                        }
                    }
                    if let Some(how) = ended {
                        self.end(how);
                    }
                    if drained {
                        break;
                    }
                }
            }
        }
        self.parse();
    }

    fn parse(&mut self) {
        let mut at = 0;
        loop {
            match parse_client_frame(&self.inbuf[at..]) {
                Ok(Some((frame, used))) => {
                    at += used;
                    if frame.opcode == PING && self.answer_pings {
                        self.to_answer.push(frame.payload.clone());
                    }
                    self.frames.push((Instant::now(), frame));
                }
                Ok(None) => break,
                Err(why) => {
                    self.bad.push(why);
                    at = self.inbuf.len();
                    break;
                }
            }
        }
        self.inbuf.drain(..at);
    }

    /// Reads what there is, and answers the client's pings if told to.
    fn pump(&mut self) {
        self.read_available();
        for payload in std::mem::take(&mut self.to_answer) {
            let _ = self.send(&frame(FIN | PONG, &payload));
        }
    }

    /// Writes all of `bytes`, reading what the client sends while the socket is full.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + self.send_limit;
        let mut at = 0;
        loop {
            let blocked = match self.tls.as_mut() {
                None => {
                    if at == bytes.len() {
                        return Ok(());
                    }
                    match self.sock.write(&bytes[at..]) {
                        Ok(n) => {
                            at += n;
                            false
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                        Err(e) => return Err(e),
                    }
                }
                Some(tls) => {
                    if at < bytes.len() && !tls.wants_write() {
                        at += tls.writer().write(&bytes[at..])?;
                    }
                    if !tls.wants_write() {
                        if at == bytes.len() {
                            return Ok(());
                        }
                        false
                    } else {
                        match tls.write_tls(&mut self.sock) {
                            Ok(_) => false,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                            Err(e) => return Err(e),
                        }
                    }
                }
            };
            if blocked {
                if Instant::now() > deadline {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                self.wait_io(true, Duration::from_millis(50));
                self.read_available();
            }
        }
    }

    /// Writes `wire` in chunks of 1 byte to 100 KiB, pausing briefly after some (reading
    /// meanwhile): frames split across writes, some with a pause in the middle.
    fn send_chunked(&mut self, wire: &[u8], rng: &mut Rng) -> io::Result<()> {
        self.send_chunked_up_to(wire, rng, usize::MAX)
    }

    /// `send_chunked` with chunks of at most `max` bytes.
    fn send_chunked_up_to(&mut self, wire: &[u8], rng: &mut Rng, max: usize) -> io::Result<()> {
        let mut at = 0;
        while at < wire.len() {
            let end = (at + chunk_size(rng).min(max)).min(wire.len());
            self.send(&wire[at..end])?;
            at = end;
            if rng.below(4) == 0 {
                self.idle(Duration::from_millis(1 + rng.below(3)));
            } else {
                self.pump();
            }
        }
        Ok(())
    }

    /// Reads (and answers pings if told to) until `pred` holds, at most `limit`; false if it did
    /// not, or if the client's side ended first.
    fn wait(&mut self, limit: Duration, mut pred: impl FnMut(&Raw) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.pump();
            if pred(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.ended.is_some() {
                return false;
            }
            self.wait_io(false, left.min(Duration::from_millis(100)));
        }
    }

    /// A pause that shapes traffic (reading meanwhile).
    fn idle(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        self.wait(d, |_| false);
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
    }

    fn close_notify(&mut self) -> io::Result<()> {
        self.tls.as_mut().expect("a TLS peer").send_close_notify();
        self.send(&[])
    }

    fn of(&self, opcode: u8) -> impl Iterator<Item = &(Instant, Frame)> + '_ {
        self.frames.iter().filter(move |(_, f)| f.opcode == opcode)
    }

    fn pongs(&self) -> Vec<Vec<u8>> {
        self.of(PONG).map(|(_, f)| f.payload.clone()).collect()
    }

    fn pong_count(&self) -> usize {
        self.of(PONG).count()
    }

    /// The text messages the client sent before its close frame.
    fn texts(&self) -> Vec<String> {
        self.frames
            .iter()
            .take_while(|(_, f)| f.opcode != CLOSE)
            .filter(|(_, f)| f.opcode == TEXT)
            .map(|(_, f)| String::from_utf8_lossy(&f.payload).into_owned())
            .collect()
    }

    fn close(&self) -> Option<&Frame> {
        self.of(CLOSE).map(|(_, f)| f).next()
    }

    /// Frames the client sent after its close frame (nothing may follow it).
    fn after_close(&self) -> usize {
        self.frames.iter().skip_while(|(_, f)| f.opcode != CLOSE).count().saturating_sub(1)
    }

    fn client_ended_or_closed(&self) -> bool {
        self.ended.is_some() || self.close().is_some()
    }
}

// ---- the host --------------------------------------------------------------------------------

/// Flow control on, each message completed in its callback (unless the hook says to hold it).
const FLOW_INLINE: u8 = 1;
/// Flow control on, messages completed by another thread (see `Host::complete_held`).
const FLOW_EXTERNAL: u8 = 2;

/// Runs inside a message callback after the message was recorded: (connection, message, its
/// index). Returns whether to complete it (with FLOW_INLINE).
type Hook = Box<dyn FnMut(WsConn, &Msg, usize) -> bool + Send>;

/// What one connection's callbacks saw.
#[derive(Default)]
struct Host {
    msgs: Mutex<Vec<Msg>>,
    finals: Mutex<Vec<Ev>>,
    final_at: Mutex<Option<Instant>>,
    opens: AtomicUsize,
    /// The dispatching thread: callbacks anywhere else are counted in `elsewhere`.
    thread: Mutex<Option<ThreadId>>,
    elsewhere: AtomicUsize,
    after_final: AtomicUsize,
    /// Answer each message with a send ("r{index}") from its callback.
    reply: AtomicBool,
    refused_sends: Mutex<Vec<WsStatus>>,
    /// Work done in each message callback (a slow host).
    work: Mutex<Duration>,
    flow: AtomicU8,
    /// A message was delivered and not completed yet (FLOW_EXTERNAL).
    held: AtomicBool,
    flow_violations: AtomicUsize,
    wrong: Mutex<Vec<String>>,
    hook: Mutex<Option<Hook>>,
}

impl Host {
    fn with_hook(hook: impl FnMut(WsConn, &Msg, usize) -> bool + Send + 'static) -> Host {
        let host = Host::default();
        *host.hook.lock().unwrap() = Some(Box::new(hook));
        host
    }

    fn watch(&self, conn: WsConn) {
        let user = user(self);
        set(ws_on_open(conn, Some(h_open), user));
        set(ws_on_message(conn, Some(h_message), user));
        set(ws_on_close(conn, Some(h_close), user));
        set(ws_on_error(conn, Some(h_error), user));
    }

    /// The calling thread is the host's: callbacks must run here.
    fn here(&self) {
        *self.thread.lock().unwrap() = Some(std::thread::current().id());
    }

    fn enter(&self) {
        if let Some(thread) = *self.thread.lock().unwrap() {
            if thread != std::thread::current().id() {
                self.elsewhere.fetch_add(1, Ordering::SeqCst);
            }
        }
        if !self.finals.lock().unwrap().is_empty() {
            self.after_final.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.msgs.lock().unwrap().len()
    }

    fn finals(&self) -> Vec<Ev> {
        self.finals.lock().unwrap().clone()
    }

    fn ended(&self) -> bool {
        !self.finals.lock().unwrap().is_empty()
    }

    /// With FLOW_EXTERNAL: completes the message waiting for it, if one does.
    fn complete_held(&self, conn: WsConn) -> WsStatus {
        if self.held.swap(false, Ordering::SeqCst) {
            ws_message_complete(conn)
        } else {
            WsStatus::Ok
        }
    }

    /// Asserts what every test asserts of a connection's callbacks: all on the host's thread,
    /// nothing after the final one, exactly one final callback, flow control respected.
    fn assert_clean(&self, what: &str) {
        assert_eq!(self.elsewhere.load(Ordering::SeqCst), 0, "{what}: callbacks ran off the dispatching thread");
        assert_eq!(self.after_final.load(Ordering::SeqCst), 0, "{what}: callbacks ran after the final one");
        assert_eq!(self.finals().len(), 1, "{what}: final callbacks {:?}", self.finals());
        assert_eq!(self.opens.load(Ordering::SeqCst), 1, "{what}: open callbacks");
        assert_eq!(
            self.flow_violations.load(Ordering::SeqCst),
            0,
            "{what}: a message callback started before the previous message was completed"
        );
        let wrong = self.wrong.lock().unwrap().clone();
        assert!(wrong.is_empty(), "{what}: {wrong:?}");
    }
}

unsafe fn host_of<'a>(user: *mut c_void) -> &'a Host {
    &*(user as *const Host)
}

unsafe extern "C" fn h_open(_: WsConn, user: *mut c_void) {
    let host = host_of(user);
    host.enter();
    host.opens.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn h_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let host = host_of(user);
    host.enter();
    let flow = host.flow.load(Ordering::SeqCst);
    if flow == FLOW_EXTERNAL && host.held.swap(true, Ordering::SeqCst) {
        host.flow_violations.fetch_add(1, Ordering::SeqCst);
    }
    let text = kind == WsMessageKind::Text;
    if text && *data.add(len) != 0 {
        host.wrong.lock().unwrap().push("a text message without its NUL".into());
    }
    let msg = Msg { text, data: std::slice::from_raw_parts(data, len).to_vec() };
    let index = {
        let mut msgs = host.msgs.lock().unwrap();
        msgs.push(msg.clone());
        msgs.len() - 1
    };
    if host.reply.load(Ordering::SeqCst) {
        let status = send_text(conn, &format!("r{index}"));
        if status != WsStatus::Ok {
            host.refused_sends.lock().unwrap().push(status);
        }
    }
    let work = *host.work.lock().unwrap();
    if !work.is_zero() {
        let start = Instant::now();
        while start.elapsed() < work {
            std::hint::spin_loop();
        }
    }
    let complete = match host.hook.lock().unwrap().as_mut() {
        Some(hook) => hook(conn, &msg, index),
        None => true,
    };
    if flow == FLOW_INLINE && complete {
        ws_message_complete(conn);
    }
}

unsafe extern "C" fn h_close(
    conn: WsConn,
    code: u16,
    reason: *const std::os::raw::c_char,
    len: usize,
    user: *mut c_void,
) {
    let host = host_of(user);
    host.enter();
    let reason = String::from_utf8_lossy(std::slice::from_raw_parts(reason.cast::<u8>(), len)).into_owned();
    *host.final_at.lock().unwrap() = Some(Instant::now());
    host.finals.lock().unwrap().push(Ev::Close(conn, code, reason));
}

unsafe extern "C" fn h_error(conn: WsConn, kind: WsStatus, message: *const std::os::raw::c_char, user: *mut c_void) {
    let host = host_of(user);
    host.enter();
    let message = std::ffi::CStr::from_ptr(message).to_string_lossy().into_owned();
    *host.final_at.lock().unwrap() = Some(Instant::now());
    host.finals.lock().unwrap().push(Ev::Error(conn, kind, message));
}

fn final_status(host: &Host) -> Option<WsStatus> {
    match host.finals().first() {
        Some(Ev::Error(_, status, _)) => Some(*status),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct LoopStats {
    wakeups: u64,
    /// The loop waited STALL for a wake-up while callbacks were pending.
    stalls: Vec<String>,
    longest_dispatch: Duration,
}

/// A host's event loop: epoll on ws_client_fd (level-triggered, or edge-triggered and declared
/// so with ws_client_set_fd_edge_triggered), one ws_dispatch per wake-up whatever more_pending
/// says, `after` after each, until `done` (at most LOOP_LIMIT). A wait of STALL without a wake-up
/// is followed by a dispatch: if that runs callbacks, the loop missed a wake-up.
fn host_loop(client: &Client, edge: bool, mut done: impl FnMut() -> bool, mut after: impl FnMut()) -> LoopStats {
    if edge {
        set(unsafe { ws_client_set_fd_edge_triggered(client.0, true) });
    }
    let epoll = Epoll::new();
    epoll.add(client.fd(), 1, edge);
    let mut stats = LoopStats::default();
    let deadline = Instant::now() + LOOP_LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "the host loop ran out of time ({LOOP_LIMIT:?}): {stats:?}");
        // A wake-up that came right at the timeout is a late one, not a missed one.
        let woken = epoll.woken(STALL) || epoll.woken(Duration::ZERO);
        let start = Instant::now();
        let (ran, more) = client.dispatch();
        stats.longest_dispatch = stats.longest_dispatch.max(start.elapsed());
        if woken {
            stats.wakeups += 1;
        } else if ran > 0 {
            stats.stalls.push(format!(
                "after {} wake-ups: {STALL:?} without a wake-up while {ran} callbacks were pending (more: {more})",
                stats.wakeups
            ));
        }
        after();
    }
    if edge {
        set(unsafe { ws_client_set_fd_edge_triggered(client.0, false) });
    }
    stats
}

fn assert_no_stalls(stats: &LoopStats, what: &str) {
    eprintln!("{what}: host loop {stats:?}");
    assert!(stats.stalls.is_empty(), "{what}: the host loop missed wake-ups: {:?}", stats.stalls);
}

/// Options with keepalive off (and, for wss, the test CA trusted).
fn options(identity: Option<&TlsIdentity>) -> Options {
    let options = no_keepalive();
    if let Some(identity) = identity {
        let ca = cstr(identity.ca_pem.to_str().unwrap());
        set(unsafe { ws_options_add_ca_file(options.0, ca.as_ptr()) });
    }
    options
}

/// The "r0", "r1", ... replies of a host that answers each of `n` messages.
fn replies(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("r{i}")).collect()
}

/// Two threads take turns dispatching `client` (one at a time, handing over after 1 to 30
/// wake-ups), each telling `host` it is the host's thread before each dispatch, until the
/// connection has ended. A wait of STALL without a wake-up while callbacks were pending counts
/// as a stall.
fn two_threads_in_turn(client: &Client, host: &Host, seed: u64) -> LoopStats {
    let pointer = ClientPtr(client.0);
    let fd = client.fd();
    let turn = Mutex::new(0usize);
    let turned = std::sync::Condvar::new();
    let stats = Mutex::new(LoopStats::default());
    std::thread::scope(|scope| {
        for me in 0..2usize {
            let (pointer, turn, turned, stats) = (&pointer, &turn, &turned, &stats);
            scope.spawn(move || {
                let mut rng = Rng(seed ^ (me as u64 + 1));
                let deadline = Instant::now() + LOOP_LIMIT;
                loop {
                    let mut whose = turn.lock().unwrap();
                    while *whose != me && !host.ended() {
                        whose = turned.wait_timeout(whose, Duration::from_millis(100)).unwrap().0;
                    }
                    drop(whose);
                    if host.ended() {
                        turned.notify_all();
                        return;
                    }
                    for _ in 0..between(&mut rng, 1, 30) {
                        assert!(Instant::now() < deadline, "two threads in turn ran out of time");
                        let woken = readable(fd, STALL);
                        host.here();
                        let (mut ran, mut more) = (0u32, false);
                        set(unsafe { ws_dispatch(pointer.get(), &mut ran, &mut more) });
                        let mut stats = stats.lock().unwrap();
                        if woken {
                            stats.wakeups += 1;
                        } else if ran > 0 {
                            stats
                                .stalls
                                .push(format!("{STALL:?} without a wake-up while {ran} callbacks were pending"));
                        }
                        if host.ended() {
                            break;
                        }
                    }
                    *turn.lock().unwrap() = 1 - me;
                    turned.notify_all();
                }
            });
        }
    });
    stats.into_inner().unwrap()
}

// ---- 1. order and integrity across the switches ----------------------------------------------

/// How a stream's server ends the connection once every ping was answered.
#[derive(Clone, Copy, Debug, PartialEq)]
enum StreamEnd {
    /// A close frame (1000, "stream done"); the close handshake completes.
    Close,
    /// TLS close_notify without a close frame: the stream ends without a handshake.
    CloseNotify,
    /// A TCP reset.
    Reset,
}

#[derive(Clone, Copy, Debug)]
struct StreamCase {
    seed: u64,
    items: usize,
    /// The host's loop is edge-triggered and declared so.
    edge: bool,
    /// The host answers each message with a send from its callback (request/reply).
    reply: bool,
    tls: bool,
    deflate: bool,
    read_buffer: Option<usize>,
    end: StreamEnd,
    /// Mostly small messages (`small_stream`), written in chunks of at most 2 KiB.
    small: bool,
    /// How the host dispatches.
    driver: Driver,
}

/// How a stream test's host dispatches.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Driver {
    /// Its own epoll loop (`host_loop`).
    Loop,
    /// ws_run, until the connection is gone.
    Run,
    /// Two threads that take turns, each dispatching for a random number of wake-ups.
    TwoThreads,
}

impl StreamCase {
    fn new(seed: u64) -> StreamCase {
        StreamCase {
            seed,
            items: 700,
            edge: false,
            reply: false,
            tls: false,
            deflate: false,
            read_buffer: None,
            end: StreamEnd::Close,
            small: false,
            driver: Driver::Loop,
        }
    }
}

struct StreamReport {
    pongs: Vec<Vec<u8>>,
    texts: Vec<String>,
    close: Option<Frame>,
    after_close: usize,
    bad: Vec<String>,
    all_answered: bool,
}

/// A raw server sends a long randomized stream (see `mixed_stream`) in chunks of 1 byte to
/// 100 KiB; the host loop records. Every message arrives once, whole, in order, with its kind;
/// every ping gets exactly its pong, in order; (request/reply) every reply arrives, in order;
/// exactly one final callback, the right one for the ending; no missed wake-up.
fn stream_case(case: StreamCase) {
    let what = format!("{case:?}");
    let mut rng = Rng(case.seed);
    let mut compressor = Compress::new(Compression::default(), false);
    let stream = if case.small {
        small_stream(&mut rng, case.items)
    } else {
        mixed_stream(&mut rng, case.items, case.deflate.then_some(&mut compressor))
    };
    let (expected, pings) = (stream.messages, stream.pings);
    let wire = stream.wire;
    let (n, ping_count) = (expected.len(), pings.len());
    eprintln!("{what}: {} bytes, {n} messages, {ping_count} pings", wire.len());
    let identity = case.tls.then(|| Arc::new(TlsIdentity::new()));
    let listener = Listener::bind();
    let url = if case.tls { format!("wss://127.0.0.1:{}/", listener.port) } else { listener.url() };
    let server_identity = identity.clone();
    let peer = std::thread::spawn(move || {
        let p = listener.accept();
        let mut raw = match &server_identity {
            Some(identity) => Raw::tls(identity, p),
            None => Raw::plain(p, case.deflate),
        };
        let mut rng = Rng(case.seed ^ 0x5eed);
        let max = if case.small { 2 << 10 } else { usize::MAX };
        raw.send_chunked_up_to(&wire, &mut rng, max).expect("the peer's writes");
        let all_answered = raw
            .wait(Duration::from_secs(20), |r| r.pong_count() >= ping_count && (!case.reply || r.texts().len() >= n));
        let report = |raw: &Raw| StreamReport {
            pongs: raw.pongs(),
            texts: raw.texts(),
            close: raw.close().cloned(),
            after_close: raw.after_close(),
            bad: raw.bad.clone(),
            all_answered,
        };
        match case.end {
            StreamEnd::Close => {
                raw.send(&close_frame(1000, "stream done")).unwrap();
                raw.wait(Duration::from_secs(10), |r| r.close().is_some());
                raw.wait(Duration::from_secs(5), |r| r.ended.is_some());
                report(&raw)
            }
            StreamEnd::CloseNotify => {
                raw.close_notify().unwrap();
                raw.wait(Duration::from_secs(5), |r| r.ended.is_some());
                report(&raw)
            }
            StreamEnd::Reset => {
                let report = report(&raw);
                reset(raw.sock);
                report
            }
        }
    });
    let host = Host::default();
    host.reply.store(case.reply, Ordering::SeqCst);
    let client = Client::new();
    let options = options(identity.as_deref());
    if let Some(bytes) = case.read_buffer {
        set(unsafe { ws_options_set_read_buffer_size(options.0, bytes) });
    }
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    let stats = match case.driver {
        Driver::Loop => host_loop(&client, case.edge, || host.ended(), || {}),
        Driver::Run => {
            let status = unsafe { ws_run(client.0, LOOP_LIMIT.as_millis() as i32) };
            assert_eq!(status, WsStatus::Ok, "{what}: ws_run");
            LoopStats::default()
        }
        Driver::TwoThreads => two_threads_in_turn(&client, &host, case.seed),
    };
    let report = peer.join().unwrap();
    assert_no_stalls(&stats, &what);
    assert_messages(&host.messages(), &expected, &what);
    assert!(report.bad.is_empty(), "{what}: what the client sent: {:?}", report.bad);
    assert!(report.all_answered, "{what}: the peer waited 20 s for the answers");
    assert_eq!(report.pongs.len(), ping_count, "{what}: pongs for {ping_count} pings");
    assert!(report.pongs == pings, "{what}: the pongs do not answer the pings one by one, in order");
    if case.reply {
        assert_eq!(report.texts, replies(n), "{what}: the host's replies");
        assert!(host.refused_sends.lock().unwrap().is_empty(), "{what}: {:?}", host.refused_sends.lock().unwrap());
    } else {
        assert!(report.texts.is_empty(), "{what}: the client sent messages of its own: {:?}", report.texts);
    }
    let expected_final = match case.end {
        StreamEnd::Close => Ev::Close(conn, 1000, "stream done".into()),
        StreamEnd::CloseNotify | StreamEnd::Reset => Ev::Error(conn, WsStatus::ConnectionLost, String::new()),
    };
    match (&expected_final, host.finals().first()) {
        (Ev::Error(_, want, _), Some(Ev::Error(_, got, _))) => assert_eq!(got, want, "{what}: {:?}", host.finals()),
        (want, got) => assert_eq!(got, Some(want), "{what}"),
    }
    if case.end == StreamEnd::Close {
        assert_eq!(report.close.as_ref().and_then(Frame::close_code), Some(1000), "{what}: the client's close frame");
        assert_eq!(report.after_close, 0, "{what}: frames after the client's close frame");
    }
    host.assert_clean(&what);
}

/// README "Threading contract" and "Security" (frames): a level-triggered epoll host.
#[test]
fn a_mixed_stream_arrives_whole_and_in_order_with_every_ping_answered_level_triggered() {
    stream_case(StreamCase::new(0x1001));
}

/// The same with the host's loop edge-triggered and declared so (ws_client_set_fd_edge_triggered):
/// one dispatch per wake-up must never leave callbacks pending without a new wake-up.
#[test]
fn a_mixed_stream_arrives_whole_and_in_order_with_every_ping_answered_edge_triggered() {
    stream_case(StreamCase { edge: true, ..StreamCase::new(0x1002) });
}

/// Request/reply: the host answers every message with a send from its callback (the small-send
/// path on the host's thread) while the server pings between and inside messages: every reply
/// arrives, in order, and every pong.
#[test]
fn a_mixed_stream_with_a_reply_to_every_message_loses_no_reply_and_no_pong() {
    stream_case(StreamCase { reply: true, ..StreamCase::new(0x1003) });
    stream_case(StreamCase { reply: true, edge: true, items: 300, ..StreamCase::new(0x1004) });
}

/// Mostly small whole frames, trickled in chunks of at most 2 KiB with pauses: the host's loop
/// and the peer take turns all the time, edge-triggered and level-triggered, with and without
/// replies.
#[test]
fn a_trickled_stream_of_small_messages_arrives_whole_and_in_order_with_every_ping_answered() {
    stream_case(StreamCase { small: true, items: 2000, ..StreamCase::new(0x1007) });
    stream_case(StreamCase { small: true, items: 2000, edge: true, reply: true, ..StreamCase::new(0x1008) });
}

/// README: "ws_run(client, timeout_ms) is a ready-made loop": it must deliver the same stream
/// whole and in order, every ping answered, and return once the connection is gone.
#[test]
fn a_mixed_stream_under_ws_run_arrives_whole_and_in_order_with_every_ping_answered() {
    stream_case(StreamCase { driver: Driver::Run, reply: true, ..StreamCase::new(0x1009) });
    stream_case(StreamCase { driver: Driver::Run, small: true, items: 1500, ..StreamCase::new(0x100a) });
}

/// Header of ws_dispatch: callbacks run "on the calling thread, which is by definition the
/// host's thread". Two threads take turns dispatching (never at once) during a trickled stream
/// of small messages: each callback runs on the thread dispatching at the time, and the stream
/// arrives whole and in order.
#[test]
fn a_trickled_stream_dispatched_by_two_threads_in_turn_runs_every_callback_on_the_dispatching_one() {
    stream_case(StreamCase {
        driver: Driver::TwoThreads,
        small: true,
        items: 2000,
        reply: true,
        ..StreamCase::new(0x100b)
    });
}

/// A 300-byte read buffer (ws_options_set_read_buffer_size): small frames larger than one read
/// must still come whole.
#[test]
fn a_mixed_stream_with_a_300_byte_read_buffer_arrives_whole_and_in_order() {
    stream_case(StreamCase { read_buffer: Some(300), items: 400, ..StreamCase::new(0x1005) });
}

/// permessage-deflate negotiated: compressed messages (which stay on the I/O thread) between
/// uncompressed small ones (which the change would read on the host's thread), some fragmented:
/// the order must hold across the two.
#[test]
fn a_mixed_stream_with_compressed_and_plain_messages_keeps_its_order() {
    stream_case(StreamCase { deflate: true, reply: true, ..StreamCase::new(0x1006) });
}

// ---- 6. the same over wss ----------------------------------------------------------------------

#[test]
fn wss_a_mixed_stream_arrives_whole_and_in_order_with_every_ping_answered() {
    stream_case(StreamCase { tls: true, reply: true, items: 500, ..StreamCase::new(0x6001) });
}

/// A TLS close_notify without a close frame, once every ping was answered: every message, then
/// one error callback (WS_STATUS_CONNECTION_LOST: closed without a close handshake).
#[test]
fn wss_close_notify_after_a_mixed_stream_delivers_everything_then_one_error() {
    stream_case(StreamCase { tls: true, items: 400, end: StreamEnd::CloseNotify, ..StreamCase::new(0x6002) });
}

/// A TCP reset under TLS, once every ping was answered: every message, then one error callback.
#[test]
fn wss_a_reset_after_a_mixed_stream_delivers_everything_then_one_error() {
    stream_case(StreamCase { tls: true, edge: true, items: 400, end: StreamEnd::Reset, ..StreamCase::new(0x6003) });
}

// ---- 2. a host that stops dispatching --------------------------------------------------------

/// How the host falls behind for STALL_FOR.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stall {
    /// Its thread is blocked between two dispatches.
    BetweenDispatches,
    /// Its thread is blocked inside a message callback (in the middle of a dispatch).
    InCallback,
    /// It keeps dispatching, but holds a message (flow control on, not completed).
    FlowHeld,
}

const STALL_FOR: Duration = Duration::from_millis(2500);

struct StallReport {
    expected: Vec<Msg>,
    pings: Vec<Vec<u8>>,
    pongs: Vec<Vec<u8>>,
    /// How long each ping sent while the host was behind waited for its answer (None: none
    /// came within 1.5 s).
    latencies: Vec<Option<Duration>>,
    close: Option<u16>,
    bad: Vec<String>,
}

/// README "Flow control and memory bounds": "the library still reads ahead ... and answers the
/// pings it finds there, so a server's heartbeat is answered while a message waits for the
/// host", and the options table: "Pings from the server are always answered". Messages flow;
/// the host falls behind for 2.5 s (see `Stall`) right when a message "stall" arrives; the peer
/// sends a burst of small messages, then a ping every 100 ms with a few messages behind it (all
/// of it well within one read buffer): each ping must be answered within 1 s while the host is
/// behind. Once it resumes, the host gets every message, in order, then the close.
fn stall_case(stall: Stall, queue_limit: Option<usize>, seed: u64) {
    let what = format!("{stall:?}, receive queue limit {queue_limit:?}");
    let (stalling_tx, stalling_rx) = mpsc::channel::<Instant>();
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(seed);
        let mut expected = Vec::new();
        let (wire, msgs) = small_messages(&mut rng, "a", 100, 200);
        raw.send_chunked(&wire, &mut rng).unwrap();
        expected.extend(msgs);
        raw.send(&frame(FIN | TEXT, b"stall")).unwrap();
        expected.push(Msg::text(b"stall"));
        let deadline = Instant::now() + PEER_TIMEOUT;
        let since = loop {
            if let Ok(at) = stalling_rx.try_recv() {
                break at;
            }
            assert!(Instant::now() < deadline, "the host never stalled");
            raw.idle(Duration::from_millis(2));
        };
        // A burst right behind the stall (with a small receive queue limit, it fills the queue).
        let (burst, msgs) = small_messages(&mut rng, "b", 150, 60);
        raw.send(&burst).unwrap();
        expected.extend(msgs);
        let (mut pings, mut latencies) = (Vec::new(), Vec::new());
        while since.elapsed() + Duration::from_millis(400) < STALL_FOR {
            let k = pings.len();
            let payload = format!("ping {k} while the host is behind").into_bytes();
            raw.send(&frame(FIN | PING, &payload)).unwrap();
            let sent = Instant::now();
            pings.push(payload);
            let (wire, msgs) = small_messages(&mut rng, &format!("p{k}-"), 5, 60);
            raw.send(&wire).unwrap();
            expected.extend(msgs);
            let answered = raw.wait(Duration::from_millis(1500), |r| r.pong_count() > k);
            latencies.push(answered.then(|| raw.of(PONG).nth(k).unwrap().0 - sent));
            raw.idle(Duration::from_millis(100));
        }
        // After the stall: more messages, a last ping, the close.
        let (wire, msgs) = small_messages(&mut rng, "c", 100, 200);
        raw.send_chunked(&wire, &mut rng).unwrap();
        expected.extend(msgs);
        pings.push(b"last".to_vec());
        raw.send(&frame(FIN | PING, b"last")).unwrap();
        raw.wait(Duration::from_secs(10), |r| r.pong_count() >= pings.len());
        raw.send(&close_frame(1000, "stalled")).unwrap();
        raw.wait(Duration::from_secs(10), |r| r.close().is_some());
        StallReport {
            expected,
            pings,
            pongs: raw.pongs(),
            latencies,
            close: raw.close().and_then(Frame::close_code),
            bad: raw.bad.clone(),
        }
    });
    let stall_now = Arc::new(AtomicBool::new(false));
    let held_since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (hook_stall, hook_held, hook_tx) = (stall_now.clone(), held_since.clone(), stalling_tx.clone());
    let host = Host::with_hook(move |_, msg, _| {
        if msg.data != b"stall" {
            return true;
        }
        match stall {
            Stall::InCallback => {
                hook_tx.send(Instant::now()).unwrap();
                // A host blocked in its callback (on purpose, not a wait for an event).
                std::thread::sleep(STALL_FOR);
                true
            }
            Stall::BetweenDispatches => {
                hook_stall.store(true, Ordering::SeqCst);
                true
            }
            Stall::FlowHeld => {
                *hook_held.lock().unwrap() = Some(Instant::now());
                hook_tx.send(Instant::now()).unwrap();
                false
            }
        }
    });
    let client = Client::new();
    let options = options(None);
    if let Some(limit) = queue_limit {
        set(unsafe { ws_options_set_receive_queue_limit(options.0, limit) });
    }
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    if stall == Stall::FlowHeld {
        host.flow.store(FLOW_INLINE, Ordering::SeqCst);
        set(ws_set_flow_control(conn, true));
    }
    host.here();
    let stats = host_loop(
        &client,
        false,
        || host.ended(),
        || {
            if stall_now.swap(false, Ordering::SeqCst) {
                stalling_tx.send(Instant::now()).unwrap();
                // A host blocked elsewhere (on purpose, not a wait for an event).
                std::thread::sleep(STALL_FOR);
            }
            let mut held = held_since.lock().unwrap();
            if held.is_some_and(|at| at.elapsed() >= STALL_FOR) {
                *held = None;
                set(ws_message_complete(conn));
            }
        },
    );
    let report = peer.join().unwrap();
    eprintln!(
        "{what}: {} pings while the host was behind, answered after {:?}",
        report.latencies.len(),
        report.latencies
    );
    assert_no_stalls(&stats, &what);
    assert!(report.bad.is_empty(), "{what}: {:?}", report.bad);
    assert!(report.latencies.len() >= 5, "{what}: only {} pings went out during the stall", report.latencies.len());
    assert!(
        report.latencies.iter().all(|l| l.is_some_and(|l| l < PONG_BOUND)),
        "{what}: pings sent while the host was behind were not all answered within {PONG_BOUND:?}: {:?}",
        report.latencies
    );
    assert!(report.pongs == report.pings, "{what}: pongs {:?} for pings {:?}", report.pongs.len(), report.pings.len());
    assert_messages(&host.messages(), &report.expected, &what);
    assert_eq!(host.finals(), vec![Ev::Close(conn, 1000, "stalled".into())], "{what}");
    assert_eq!(report.close, Some(1000), "{what}: the client's close frame");
    host.assert_clean(&what);
}

#[test]
fn pings_are_answered_within_1_s_while_the_host_is_blocked_between_dispatches() {
    stall_case(Stall::BetweenDispatches, None, 0x2001);
}

/// The host's thread is stuck inside a message callback, in the middle of a dispatch (where the
/// change would have it own the socket).
#[test]
fn pings_are_answered_within_1_s_while_the_host_is_stuck_in_a_callback() {
    stall_case(Stall::InCallback, None, 0x2002);
}

/// The same with a receive queue limit of 1 byte: the burst behind the stall fills the queue at
/// once, and the pings behind it are found by reading ahead.
#[test]
fn pings_behind_a_full_receive_queue_are_answered_within_1_s_while_the_host_is_stuck() {
    stall_case(Stall::InCallback, Some(1), 0x2003);
}

/// Flow control on, one message held (not completed) for 2.5 s while the host keeps dispatching.
#[test]
fn pings_behind_a_message_held_by_flow_control_are_answered_within_1_s() {
    stall_case(Stall::FlowHeld, None, 0x2004);
}

// ---- 3. keepalive while the host is idle or stalled -----------------------------------------

fn keepalive(interval_ms: u32, timeout_ms: u32) -> Options {
    let options = Options::new();
    set(unsafe { ws_options_set_keepalive(options.0, interval_ms, timeout_ms) });
    options
}

/// Options table: keepalive "ping after interval of silence, fail after timeout more". A peer
/// that answers pings: messages flow, the host blocks for 2 s (between dispatches, while the peer
/// is silent but for its answers), then more messages flow. Keepalive 200 + 300 ms: it must not
/// end the connection.
#[test]
fn keepalive_does_not_end_a_connection_whose_peer_answers_while_the_host_is_blocked() {
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        raw.answer_pings = true;
        let mut rng = Rng(0x3001);
        let mut expected = Vec::new();
        let (wire, msgs) = small_messages(&mut rng, "a", 50, 100);
        raw.send_chunked(&wire, &mut rng).unwrap();
        expected.extend(msgs);
        raw.send(&frame(FIN | TEXT, b"stall")).unwrap();
        expected.push(Msg::text(b"stall"));
        // Silent (answering pings) until the host says it is back.
        let back = raw.wait(Duration::from_secs(15), |r| r.texts().iter().any(|t| t == "resumed"));
        let pings = raw.of(PING).count();
        let (wire, msgs) = small_messages(&mut rng, "c", 50, 100);
        let _ = raw.send_chunked(&wire, &mut rng);
        expected.extend(msgs);
        let _ = raw.send(&close_frame(1000, "kept"));
        raw.wait(Duration::from_secs(10), |r| r.close().is_some());
        (expected, back, pings)
    });
    let stall_now = Arc::new(AtomicBool::new(false));
    let hook_stall = stall_now.clone();
    let host = Host::with_hook(move |_, msg, _| {
        if msg.data == b"stall" {
            hook_stall.store(true, Ordering::SeqCst);
        }
        true
    });
    let client = Client::new();
    let options = keepalive(200, 300);
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    let stats = host_loop(
        &client,
        false,
        || host.ended(),
        || {
            if stall_now.swap(false, Ordering::SeqCst) {
                // A host blocked elsewhere (on purpose, not a wait for an event).
                std::thread::sleep(Duration::from_secs(2));
                send_text(conn, "resumed");
            }
        },
    );
    let (expected, back, pings) = peer.join().unwrap();
    eprintln!(
        "keepalive 200+300 ms, host blocked 2 s: the client sent {pings} pings meanwhile; finals {:?}",
        host.finals()
    );
    assert_no_stalls(&stats, "keepalive, host blocked");
    assert!(back, "the peer never heard that the host was back: {:?}", host.finals());
    assert_messages(&host.messages(), &expected, "keepalive, host blocked");
    assert_eq!(host.finals(), vec![Ev::Close(conn, 1000, "kept".into())]);
    host.assert_clean("keepalive, host blocked");
}

/// Options table and header of ws_options_set_keepalive: "after interval_ms without receiving
/// anything, send a ping; if nothing arrives within timeout_ms after it, end with
/// WS_STATUS_KEEPALIVE_TIMEOUT". Small messages arrive every 10 ms for 1 s (each one must count
/// as something received, whichever thread reads it), then the peer falls silent and answers
/// nothing: the error comes no earlier than interval + timeout after the last message was
/// written, and no later than interval + timeout + 1 s; every message before it.
#[test]
fn keepalive_timeout_comes_interval_plus_timeout_after_the_last_small_message() {
    const INTERVAL: u32 = 300;
    const TIMEOUT: u32 = 300;
    let (last_tx, last_rx) = mpsc::channel::<Instant>();
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(0x3002);
        let (_, msgs) = small_messages(&mut rng, "k", 100, 100);
        let mut last = Instant::now();
        for m in &msgs {
            raw.send(&frame(FIN | if m.text { TEXT } else { BINARY }, &m.data)).unwrap();
            last = Instant::now();
            raw.idle(Duration::from_millis(10));
        }
        last_tx.send(last).unwrap();
        raw.wait(Duration::from_secs(10), |r| r.ended.is_some());
        (msgs, raw.of(PING).count())
    });
    let host = Host::default();
    let client = Client::new();
    let options = keepalive(INTERVAL, TIMEOUT);
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    let stats = host_loop(&client, false, || host.ended(), || {});
    let (expected, pings) = peer.join().unwrap();
    let last = last_rx.recv().unwrap();
    let after = host.final_at.lock().unwrap().unwrap() - last;
    eprintln!("keepalive {INTERVAL}+{TIMEOUT} ms: the error came {after:?} after the last message; {pings} pings");
    assert_no_stalls(&stats, "keepalive timeout");
    assert_messages(&host.messages(), &expected, "keepalive timeout");
    assert_eq!(final_status(&host), Some(WsStatus::KeepaliveTimeout), "{:?}", host.finals());
    let least = Duration::from_millis(u64::from(INTERVAL + TIMEOUT) - 20);
    let most = Duration::from_millis(u64::from(INTERVAL + TIMEOUT) + 1000);
    assert!(
        after >= least && after <= most,
        "the keepalive timeout came {after:?} after the last message (allowed {least:?} to {most:?})"
    );
    assert!(pings >= 1, "the client ended the connection without a keepalive ping");
    host.assert_clean("keepalive timeout");
}

/// Small messages every 20 ms for 2.5 s, from a peer that never answers a ping, to a host that
/// replies to each: with keepalive 300 + 300 ms the connection must not end (what arrives
/// counts, whichever thread reads it).
#[test]
fn keepalive_does_not_end_a_connection_while_small_messages_keep_arriving() {
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(0x3003);
        let start = Instant::now();
        let mut expected = Vec::new();
        while start.elapsed() < Duration::from_millis(2500) {
            let (wire, msgs) = small_messages(&mut rng, &format!("t{}-", expected.len()), 1, 80);
            raw.send(&wire).unwrap();
            expected.extend(msgs);
            raw.idle(Duration::from_millis(20));
        }
        let _ = raw.send(&close_frame(1000, "flowed"));
        raw.wait(Duration::from_secs(10), |r| r.close().is_some());
        (expected, raw.of(PING).count(), raw.texts().len())
    });
    let host = Host::default();
    host.reply.store(true, Ordering::SeqCst);
    let client = Client::new();
    let options = keepalive(300, 300);
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    let stats = host_loop(&client, false, || host.ended(), || {});
    let (expected, pings, replies_seen) = peer.join().unwrap();
    eprintln!("{} messages every 20 ms: {pings} keepalive pings, {replies_seen} replies", expected.len());
    assert_no_stalls(&stats, "keepalive while messages flow");
    assert_messages(&host.messages(), &expected, "keepalive while messages flow");
    assert_eq!(host.finals(), vec![Ev::Close(conn, 1000, "flowed".into())]);
    assert_eq!(replies_seen, expected.len(), "the host's replies");
    host.assert_clean("keepalive while messages flow");
}

/// A silent peer (it answers nothing) and a host blocked for 1.5 s right after the last
/// message: whatever happened while it was blocked, once it dispatches again the keepalive
/// timeout must come within interval + timeout + 1 s, after every message.
#[test]
fn keepalive_timeout_reaches_a_host_that_was_blocked_within_interval_plus_timeout_of_its_return() {
    const INTERVAL: u32 = 200;
    const TIMEOUT: u32 = 300;
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(0x3004);
        let (mut wire, mut msgs) = small_messages(&mut rng, "s", 80, 100);
        wire.extend(frame(FIN | TEXT, b"stall"));
        msgs.push(Msg::text(b"stall"));
        raw.send_chunked(&wire, &mut rng).unwrap();
        raw.wait(Duration::from_secs(15), |r| r.ended.is_some());
        msgs
    });
    let stall_now = Arc::new(AtomicBool::new(false));
    let hook_stall = stall_now.clone();
    let host = Host::with_hook(move |_, msg, _| {
        if msg.data == b"stall" {
            hook_stall.store(true, Ordering::SeqCst);
        }
        true
    });
    let client = Client::new();
    let options = keepalive(INTERVAL, TIMEOUT);
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    let mut back = None;
    let stats = host_loop(
        &client,
        false,
        || host.ended(),
        || {
            if stall_now.swap(false, Ordering::SeqCst) {
                // A host blocked elsewhere (on purpose, not a wait for an event).
                std::thread::sleep(Duration::from_millis(1500));
                back = Some(Instant::now());
            }
        },
    );
    let expected = peer.join().unwrap();
    let back = back.expect("the host stalled");
    let final_at = host.final_at.lock().unwrap().unwrap();
    let after = final_at.saturating_duration_since(back);
    eprintln!("silent peer, host blocked 1.5 s: the error came {after:?} after the host was back");
    assert_no_stalls(&stats, "keepalive after a blocked host");
    assert_messages(&host.messages(), &expected, "keepalive after a blocked host");
    assert_eq!(final_status(&host), Some(WsStatus::KeepaliveTimeout), "{:?}", host.finals());
    let most = Duration::from_millis(u64::from(INTERVAL + TIMEOUT) + 1000);
    assert!(after <= most, "the keepalive timeout came {after:?} after the host was back (allowed {most:?})");
    host.assert_clean("keepalive after a blocked host");
}

// ---- 4. endings in every phase ----------------------------------------------------------------

/// What ends a connection right behind a burst of small messages.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    /// A close frame (4001, "bye ending"); the peer waits for the client's.
    CloseFrame,
    /// A close frame, then at once the end of the peer's side of the stream.
    CloseThenFin,
    /// The end of the stream, no close frame.
    Fin,
    /// A reset, once the client has read everything.
    Reset,
    /// A TLS close_notify (wss only), no close frame.
    CloseNotify,
    /// Opcode 3 (reserved).
    ReservedOpcode,
    /// A masked frame from the server.
    MaskedFrame,
    /// A small text frame that is not UTF-8.
    InvalidUtf8,
    /// RSV1 without permessage-deflate.
    Rsv1WithoutDeflate,
    /// A continuation frame with no message begun.
    OrphanContinuation,
    /// A whole text frame in the middle of a fragmented message.
    DataFrameInsideAFragmentedMessage,
    /// A ping without FIN.
    FragmentedPing,
    /// A ping of 126 bytes.
    OversizedPing,
    /// A small (5,000-byte) frame over a maximum message size of 4,096 bytes.
    OverTheMaximumSize,
}

impl Ending {
    fn wire(self) -> Vec<u8> {
        match self {
            Ending::CloseFrame | Ending::CloseThenFin => close_frame(4001, "bye ending"),
            Ending::Fin | Ending::Reset | Ending::CloseNotify => Vec::new(),
            Ending::ReservedOpcode => frame(FIN | 0x3, b"reserved"),
            Ending::MaskedFrame => masked_frame(FIN | TEXT, b"masked"),
            Ending::InvalidUtf8 => frame(FIN | TEXT, b"valid until \xff here"),
            Ending::Rsv1WithoutDeflate => frame(FIN | RSV1 | TEXT, b"rsv1"),
            Ending::OrphanContinuation => frame(FIN | CONTINUATION, b"orphan"),
            Ending::DataFrameInsideAFragmentedMessage => {
                [frame(TEXT, b"begun "), frame(FIN | TEXT, b"interloper")].concat()
            }
            Ending::FragmentedPing => frame(PING, b"no fin"),
            Ending::OversizedPing => frame(FIN | PING, &[1u8; 126]),
            Ending::OverTheMaximumSize => frame(FIN | BINARY, &[7u8; 5000]),
        }
    }

    /// The final callback's status (None: the close callback) and, for violations, the code
    /// of the close frame the client must send.
    fn outcome(self) -> (Option<WsStatus>, Option<u16>) {
        match self {
            Ending::CloseFrame | Ending::CloseThenFin => (None, None),
            Ending::Fin | Ending::Reset | Ending::CloseNotify => (Some(WsStatus::ConnectionLost), None),
            Ending::InvalidUtf8 => (Some(WsStatus::Protocol), Some(1007)),
            Ending::OverTheMaximumSize => (Some(WsStatus::MessageTooBig), Some(1009)),
            _ => (Some(WsStatus::Protocol), Some(1002)),
        }
    }
}

/// How the host keeps up.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pace {
    /// It dispatches at every wake-up.
    Fast,
    /// 300 µs of work per message and 10 ms between dispatches.
    Slow,
    /// It does not dispatch at all until the peer has sent everything (and 300 ms more).
    Late,
}

/// README "Security": "Messages read before the violation are delivered first, and what the
/// host sends in reply goes out before the close frame"; "Each of these ends in one error
/// callback"; Threading contract: "Every message the peer sent before its close frame is
/// delivered before the close callback", "exactly one final callback". 300 small messages, then
/// the ending, written in random chunks; the host replies to each message. Every message
/// arrives; then exactly one final callback, the right one; for a violation, the client's close
/// frame carries its code and every reply precedes it; otherwise the replies that went out are
/// in order.
fn ending_case(ending: Ending, pace: Pace, seed: u64, tls: bool) {
    let what = format!("{ending:?} behind 300 small messages, host {pace:?}{}", if tls { ", wss" } else { "" });
    let mut rng = Rng(seed);
    let (mut wire, expected) = small_messages(&mut rng, "e", 300, 300);
    wire.extend(ending.wire());
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let identity = tls.then(|| Arc::new(TlsIdentity::new()));
    let server_identity = identity.clone();
    let listener = Listener::bind();
    let url = if tls { format!("wss://127.0.0.1:{}/", listener.port) } else { listener.url() };
    let peer = std::thread::spawn(move || {
        let p = listener.accept();
        let socket = p.client_socket();
        let mut raw = match &server_identity {
            Some(identity) => Raw::tls(identity, p),
            None => Raw::plain(p, false),
        };
        let mut rng = Rng(seed ^ 0xe);
        // (A client that refuses a frame from its header may have closed before the rest.)
        let written = raw.send_chunked_up_to(&wire, &mut rng, 4 << 10);
        assert!(written.is_ok() || ending.outcome().1.is_some(), "{ending:?}: the peer's writes: {written:?}");
        match ending {
            Ending::CloseThenFin | Ending::Fin => raw.sock.shutdown(Shutdown::Write).unwrap(),
            Ending::CloseNotify => raw.close_notify().unwrap(),
            Ending::Reset => {
                assert!(socket.wait_read_everything(), "{ending:?}: the client never read the burst");
                raw.read_available();
                let texts = raw.texts();
                sent_tx.send(()).unwrap();
                reset(raw.sock);
                return (texts, None, 0);
            }
            _ => {}
        }
        sent_tx.send(()).unwrap();
        raw.wait(Duration::from_secs(15), Raw::client_ended_or_closed);
        (raw.texts(), raw.close().and_then(Frame::close_code), raw.after_close())
    });
    let host = Host::default();
    host.reply.store(true, Ordering::SeqCst);
    if pace == Pace::Slow {
        *host.work.lock().unwrap() = Duration::from_micros(300);
    }
    let client = Client::new();
    let options = options(identity.as_deref());
    if ending == Ending::OverTheMaximumSize {
        set(unsafe { ws_options_set_max_message_size(options.0, 4096) });
    }
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    if pace == Pace::Late {
        sent_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        // A host busy elsewhere (on purpose, not a wait for an event).
        std::thread::sleep(Duration::from_millis(300));
    }
    let stats = host_loop(
        &client,
        false,
        || host.ended(),
        || {
            if pace == Pace::Slow {
                std::thread::sleep(Duration::from_millis(10));
            }
        },
    );
    let (texts, close_code, after_close) = peer.join().unwrap();
    eprintln!("{what}: finals {:?}; the peer got {} replies, close {close_code:?}", host.finals(), texts.len());
    assert_no_stalls(&stats, &what);
    assert_messages(&host.messages(), &expected, &what);
    let (status, code) = ending.outcome();
    match status {
        None => assert_eq!(host.finals(), vec![Ev::Close(conn, 4001, "bye ending".into())], "{what}"),
        Some(status) => assert_eq!(final_status(&host), Some(status), "{what}: {:?}", host.finals()),
    }
    let all = replies(expected.len());
    if let Some(code) = code {
        assert_eq!(close_code, Some(code), "{what}: the client's close frame");
        assert_eq!(texts, all, "{what}: the host's replies before the close frame");
        assert!(host.refused_sends.lock().unwrap().is_empty(), "{what}: {:?}", host.refused_sends.lock().unwrap());
    } else {
        assert!(all.starts_with(&texts), "{what}: the replies that went out are not in order: {texts:?}");
    }
    assert_eq!(after_close, 0, "{what}: frames after the client's close frame");
    host.assert_clean(&what);
}

fn every_pace(ending: Ending, seed: u64) {
    every_pace_over(ending, seed, false);
}

fn every_pace_over(ending: Ending, seed: u64, tls: bool) {
    ending_case(ending, Pace::Fast, seed, tls);
    ending_case(ending, Pace::Slow, seed + 1, tls);
    ending_case(ending, Pace::Late, seed + 2, tls);
}

#[test]
fn a_close_frame_behind_a_burst_delivers_the_burst_then_the_close() {
    every_pace(Ending::CloseFrame, 0x4010);
}

#[test]
fn a_close_frame_then_fin_behind_a_burst_delivers_the_burst_then_the_close() {
    every_pace(Ending::CloseThenFin, 0x4020);
}

#[test]
fn a_fin_behind_a_burst_delivers_the_burst_then_one_connection_lost() {
    every_pace(Ending::Fin, 0x4030);
}

#[test]
fn a_reset_behind_a_burst_the_client_read_delivers_the_burst_then_one_connection_lost() {
    every_pace(Ending::Reset, 0x4040);
}

#[test]
fn a_reserved_opcode_behind_a_burst_delivers_the_burst_and_the_replies_then_1002() {
    every_pace(Ending::ReservedOpcode, 0x4050);
}

#[test]
fn a_masked_frame_behind_a_burst_delivers_the_burst_and_the_replies_then_1002() {
    every_pace(Ending::MaskedFrame, 0x4060);
}

#[test]
fn invalid_utf8_in_a_small_text_frame_behind_a_burst_delivers_the_burst_and_the_replies_then_1007() {
    every_pace(Ending::InvalidUtf8, 0x4070);
}

#[test]
fn rsv1_without_deflate_behind_a_burst_delivers_the_burst_and_the_replies_then_1002() {
    every_pace(Ending::Rsv1WithoutDeflate, 0x4080);
}

#[test]
fn an_orphan_continuation_behind_a_burst_delivers_the_burst_and_the_replies_then_1002() {
    every_pace(Ending::OrphanContinuation, 0x4090);
}

/// A small whole text frame while a fragmented message is under way is not a message: the
/// connection fails (1002) and neither the fragment nor the interloper is delivered.
#[test]
fn a_whole_frame_inside_a_fragmented_message_behind_a_burst_is_refused_with_1002() {
    every_pace(Ending::DataFrameInsideAFragmentedMessage, 0x40a0);
}

#[test]
fn a_fragmented_ping_behind_a_burst_delivers_the_burst_and_the_replies_then_1002() {
    every_pace(Ending::FragmentedPing, 0x40b0);
}

#[test]
fn an_oversized_ping_behind_a_burst_delivers_the_burst_and_the_replies_then_1002() {
    every_pace(Ending::OversizedPing, 0x40c0);
}

/// The maximum message size applies to small frames too: 5,000 bytes over a 4,096-byte maximum.
#[test]
fn a_small_frame_over_the_maximum_size_behind_a_burst_is_refused_with_1009() {
    every_pace(Ending::OverTheMaximumSize, 0x40d0);
}

// ---- 5. ws_close, sends and completions from other threads during a small-message stream ------

/// Where ws_close comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Closer {
    /// The thread that also sends, while the host dispatches.
    OtherThread,
    /// A message callback, on the host's thread.
    Callback,
}

#[derive(Clone, Copy, Debug)]
struct CloseCase {
    seed: u64,
    closer: Closer,
    /// Flow control on, messages completed by another thread at random times.
    flow: bool,
    queue_limit: Option<usize>,
}

/// README "Threading contract": "Every message the peer sent before its close frame is
/// delivered before the close callback"; header of ws_send: "Messages go out in the order of the
/// calls that sent them, whatever the threads", "WS_STATUS_CLOSING after ws_close"; of ws_close:
/// "Starts the close handshake after the messages already queued". A peer streams small messages
/// (and pings) until it reads the client's close frame, then answers it; another thread sends
/// "s0", "s1", ... and, once the host has had a random number of messages, closes (or a
/// callback does). Every message the peer sent arrives, in order, once; every send that returned
/// OK arrives before the close frame, in order; sends after ws_close return CLOSING; the close
/// callback carries the peer's code; flow control is never overrun.
fn close_case(case: CloseCase) {
    let what = format!("{case:?}");
    // How many messages the host has had: the peer stays at most 400 ahead, so that what waits
    // when the close begins is delivered well within the close timeout (which bounds it all).
    let delivered = Arc::new(AtomicUsize::new(0));
    let peer_delivered = delivered.clone();
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(case.seed);
        let mut expected = Vec::new();
        let mut pings = 0;
        let start = Instant::now();
        while raw.close().is_none() && raw.ended.is_none() && start.elapsed() < Duration::from_secs(20) {
            let batch = between(&mut rng, 1, 20);
            let (wire, msgs) = small_messages(&mut rng, &format!("c{}-", expected.len()), batch, 100);
            if raw.send(&wire).is_err() {
                break;
            }
            expected.extend(msgs);
            if rng.below(8) == 0 {
                raw.send(&frame(FIN | PING, format!("{pings}").as_bytes())).unwrap();
                pings += 1;
            }
            if rng.below(4) == 0 {
                raw.idle(Duration::from_millis(1));
            } else {
                raw.pump();
            }
            while expected.len() > peer_delivered.load(Ordering::SeqCst) + 400 && raw.close().is_none() {
                raw.idle(Duration::from_millis(1));
            }
        }
        eprintln!(
            "{case:?}: the peer saw the client's close frame after {:?}, having sent {} messages",
            start.elapsed(),
            expected.len()
        );
        let _ = raw.send(&close_frame(1000, "ack"));
        raw.wait(Duration::from_secs(10), |r| r.ended.is_some());
        let close = raw.close().map(|f| (f.close_code(), String::from_utf8_lossy(&f.payload[2..]).into_owned()));
        (expected, raw.texts(), close, raw.after_close(), raw.bad.clone())
    });
    let mut rng = Rng(case.seed ^ 0xc105e);
    let close_after = between(&mut rng, 200, 3000);
    let t0 = Instant::now();
    let host = Arc::new(Host::with_hook(move |conn, _, index| {
        delivered.store(index + 1, Ordering::SeqCst);
        if case.closer == Closer::Callback && index == close_after {
            eprintln!("{case:?}: ws_close in the callback of message {index} after {:?}", t0.elapsed());
            assert_eq!(close(conn, 1000, "enough"), WsStatus::Ok);
        }
        true
    }));
    let client = Client::new();
    let options = options(None);
    set(unsafe { ws_options_set_close_timeout_ms(options.0, 5000) });
    if let Some(limit) = case.queue_limit {
        set(unsafe { ws_options_set_receive_queue_limit(options.0, limit) });
    }
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    if case.flow {
        host.flow.store(FLOW_EXTERNAL, Ordering::SeqCst);
        set(ws_set_flow_control(conn, true));
    }
    host.here();
    let completer = case.flow.then(|| {
        let host = host.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(case.seed ^ 0xc0);
            while !host.ended() {
                std::thread::sleep(Duration::from_micros(rng.below(300)));
                if host.complete_held(conn) == WsStatus::Gone {
                    break;
                }
            }
        })
    });
    let sender_host = host.clone();
    let sender = std::thread::spawn(move || {
        let mut rng = Rng(case.seed ^ 0x5e);
        let mut sent = 0;
        let mut closed = None;
        while !sender_host.ended() {
            std::thread::sleep(Duration::from_micros(rng.below(400)));
            if closed.is_none() && case.closer == Closer::OtherThread && sender_host.count() >= close_after {
                closed = Some(close(conn, 1000, "enough"));
                break;
            }
            match send_text(conn, &format!("s{sent}")) {
                WsStatus::Ok => sent += 1,
                _ => break,
            }
        }
        // After ws_close, sends are refused (until the connection is gone).
        let after: Vec<WsStatus> = (0..3).map(|_| send_text(conn, "too late")).collect();
        (sent, closed, after)
    });
    let stats = host_loop(&client, false, || host.ended(), || {});
    let (sent, closed, after) = sender.join().unwrap();
    if let Some(completer) = completer {
        completer.join().unwrap();
    }
    let (expected, texts, close_frame, after_close, bad) = peer.join().unwrap();
    eprintln!(
        "{what}: the peer sent {} messages, the host got {}; {sent} sends, close {closed:?}, then {after:?}; the \
         client's close frame {close_frame:?}",
        expected.len(),
        host.count()
    );
    eprintln!("{what}: finals {:?} after {:?}", host.finals(), t0.elapsed());
    assert_no_stalls(&stats, &what);
    assert!(bad.is_empty(), "{what}: {bad:?}");
    assert_messages(&host.messages(), &expected, &what);
    assert_eq!(host.finals(), vec![Ev::Close(conn, 1000, "ack".into())], "{what}");
    assert_eq!(close_frame, Some((Some(1000), "enough".to_string())), "{what}: the client's close frame");
    assert_eq!(after_close, 0, "{what}: frames after the client's close frame");
    let sends: Vec<String> = (0..sent).map(|i| format!("s{i}")).collect();
    assert_eq!(texts, sends, "{what}: the sends that returned OK, before the close frame");
    if case.closer == Closer::OtherThread {
        assert_eq!(closed, Some(WsStatus::Ok), "{what}: ws_close");
        assert!(
            after.iter().all(|s| matches!(s, WsStatus::Closing | WsStatus::Gone)),
            "{what}: sends after ws_close: {after:?}"
        );
    }
    host.assert_clean(&what);
}

#[test]
fn ws_close_from_another_thread_during_a_small_message_stream_loses_nothing() {
    close_case(CloseCase { seed: 0x5001, closer: Closer::OtherThread, flow: false, queue_limit: None });
}

/// Flow control on, messages completed from a third thread at random times, a 4 KiB receive
/// queue limit.
#[test]
fn ws_close_from_another_thread_under_flow_control_and_a_small_receive_queue_loses_nothing() {
    close_case(CloseCase { seed: 0x5002, closer: Closer::OtherThread, flow: true, queue_limit: Some(4 << 10) });
}

/// ws_close from inside a message callback (the host's thread, mid-dispatch) while sends come
/// from another thread.
#[test]
fn ws_close_from_a_callback_during_a_small_message_stream_loses_nothing() {
    close_case(CloseCase { seed: 0x5003, closer: Closer::Callback, flow: false, queue_limit: None });
    close_case(CloseCase { seed: 0x5004, closer: Closer::Callback, flow: true, queue_limit: Some(1) });
}

// ---- dispatch runs what was pending when it was called ------------------------------------------

/// README "Threading contract": "ws_dispatch() runs the callbacks pending when it is called (not
/// those arriving meanwhile)". One message is pending; inside its callback the peer sends 50
/// more (and the callback lets them arrive): that dispatch must run one callback, and the 50
/// come with later dispatches, in order.
#[test]
fn messages_that_arrive_during_a_callback_wait_for_the_next_dispatch() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (sent_tx, sent_rx) = mpsc::channel::<()>();
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(0x7001);
        let mut expected = vec![Msg::text(b"first")];
        // Once the host has dispatched the open.
        go_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        raw.send(&frame(FIN | TEXT, b"first")).unwrap();
        go_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        let (wire, msgs) = small_messages(&mut rng, "m", 50, 100);
        raw.send(&wire).unwrap();
        expected.extend(msgs);
        sent_tx.send(()).unwrap();
        go_rx.recv_timeout(PEER_TIMEOUT).unwrap();
        raw.send(&close_frame(1000, "")).unwrap();
        raw.wait(Duration::from_secs(10), |r| r.close().is_some());
        expected
    });
    let hook_go = go_tx.clone();
    let host = Host::with_hook(move |_, msg, _| {
        if msg.data == b"first" {
            hook_go.send(()).unwrap();
            sent_rx.recv_timeout(PEER_TIMEOUT).unwrap();
            // Time for the 50 to cross loopback (shaping, not synchronisation: whether they
            // arrived or not, they may not run in this dispatch).
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    });
    let client = Client::new();
    let options = options(None);
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    assert!(pump(&client, DEADLINE, || host.opens.load(Ordering::SeqCst) == 1));
    go_tx.send(()).unwrap();
    let mut ran_with_first = None;
    let deadline = Instant::now() + DEADLINE;
    while ran_with_first.is_none() {
        assert!(Instant::now() < deadline, "the first message never came");
        if client.wait_readable(Duration::from_millis(100)) {
            let (ran, _) = client.dispatch();
            if host.count() > 0 {
                ran_with_first = Some((ran, host.count()));
            }
        }
    }
    assert!(pump(&client, DEADLINE, || host.count() == 51));
    go_tx.send(()).unwrap();
    client.run_until("the close", || host.ended());
    let expected = peer.join().unwrap();
    eprintln!("the dispatch that ran the first message: {ran_with_first:?} (callbacks, messages)");
    assert_eq!(ran_with_first, Some((1, 1)), "a dispatch ran messages that arrived during it");
    assert_messages(&host.messages(), &expected, "messages after a dispatch");
    host.assert_clean("messages after a dispatch");
}

/// The same under a flood, without any timing: the peer counts each message before it writes
/// it, and the first message callback of each dispatch reads that count (which can only be
/// larger than it was when the dispatch was called); no message whose number is not below it
/// may run in that dispatch (it was written after the call began). Callbacks work now and then,
/// so that much arrives during dispatches. Every message arrives, in order.
#[test]
fn a_dispatch_never_runs_a_message_written_after_it_was_called() {
    let handed = Arc::new(AtomicU64::new(0));
    let peer_handed = handed.clone();
    let (url, peer) = serve(move |p| {
        let mut raw = Raw::plain(p, false);
        let mut rng = Rng(0x7002);
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < Duration::from_millis(1500) {
            let batch = between(&mut rng, 1, 60);
            let wire: Vec<u8> = (n..n + batch).flat_map(|i| frame(FIN | TEXT, format!("f{i}").as_bytes())).collect();
            peer_handed.fetch_add(batch as u64, Ordering::SeqCst);
            raw.send(&wire).unwrap();
            n += batch;
            if rng.below(3) == 0 {
                raw.idle(Duration::from_millis(rng.below(3)));
            }
        }
        raw.send(&close_frame(1000, "flooded")).unwrap();
        raw.wait(Duration::from_secs(10), |r| r.close().is_some());
        n
    });
    // The count the first message callback of the current dispatch saw (u64::MAX: none yet).
    let bound = Arc::new(AtomicU64::new(u64::MAX));
    let hook_bound = bound.clone();
    let host = Host::with_hook(move |_, _, index| {
        if hook_bound.load(Ordering::SeqCst) == u64::MAX {
            hook_bound.store(handed.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        if index % 97 == 0 {
            // A callback that works a while (not a wait for an event).
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(2) {
                std::hint::spin_loop();
            }
        }
        true
    });
    let client = Client::new();
    let options = options(None);
    let conn = client.connect_with(&url, options.0);
    host.watch(conn);
    host.here();
    let mut violations = Vec::new();
    let mut dispatches = 0;
    let deadline = Instant::now() + LOOP_LIMIT;
    while !host.ended() {
        assert!(Instant::now() < deadline, "the flood never ended");
        if !client.wait_readable(Duration::from_millis(100)) {
            continue;
        }
        bound.store(u64::MAX, Ordering::SeqCst);
        let before = host.count();
        client.dispatch();
        dispatches += 1;
        let bound = bound.load(Ordering::SeqCst);
        let msgs = host.messages();
        for m in &msgs[before..] {
            let index: u64 = std::str::from_utf8(&m.data[1..]).unwrap().parse().unwrap();
            if index >= bound && violations.len() < 10 {
                violations.push(format!(
                    "message {index} ran in a dispatch whose first message callback saw {bound} written"
                ));
            }
        }
    }
    let n = peer.join().unwrap();
    eprintln!("{n} messages in {dispatches} dispatches");
    assert!(violations.is_empty(), "{violations:?}");
    let expected: Vec<Msg> = (0..n).map(|i| Msg::text(format!("f{i}").as_bytes())).collect();
    assert_messages(&host.messages(), &expected, "flood");
    assert_eq!(host.finals(), vec![Ev::Close(conn, 1000, "flooded".into())]);
    host.assert_clean("flood");
}

// ---- 7. many connections ------------------------------------------------------------------------

/// What the test tells a peer of the many-connections test.
#[derive(Debug)]
enum Cmd {
    /// Send "hold" (the host holds it under flow control), then 200 KiB behind it.
    Hold,
    /// Close.
    Finish,
}

/// Connection k's stream: 100 to 400 small messages "{k}:{i}:...", a ping now and then, a last
/// ping.
fn many_stream(k: usize) -> Stream {
    let mut rng = Rng(0x7700 + k as u64);
    let mut s = Stream::default();
    for i in 0..between(&mut rng, 100, 400) {
        if rng.below(25) == 0 {
            s.ping(&mut rng);
        }
        let text = rng.below(2) == 0;
        let filler = rng.below(300) as usize;
        let mut data = format!("{k}:{i}:").into_bytes();
        data.extend(if text { text_of(&mut rng, filler, "") } else { random_bytes(&mut rng, filler) });
        s.message(&mut rng, Msg { text, data }, None, 1);
    }
    s.ping(&mut rng);
    s
}

/// The tail a held connection's peer sends: "hold", then 100 binary messages of 2 KiB.
fn held_tail() -> (Vec<u8>, Vec<Msg>) {
    let mut msgs = vec![Msg::text(b"hold")];
    msgs.extend((0..100u8).map(|i| Msg { text: false, data: vec![i; 2048] }));
    let wire = msgs.iter().flat_map(|m| frame(FIN | if m.text { TEXT } else { BINARY }, &m.data)).collect();
    (wire, msgs)
}

const MANY: usize = 50;
/// Connections 0..HELD run under flow control, and later hold a message with 200 KiB behind it.
const HELD: usize = 5;

/// 50 connections on one client, each with its own raw peer streaming small messages at its
/// own rate (chunks of up to 2 KiB, pauses of up to 15 ms; every seventh peer pauses 400 ms
/// midway), while the host's thread blocks for 100 ms now and then: every message arrives, in
/// order, on its connection, and every ping is answered. Then, with all of them idle, and again
/// with five of them holding a message (flow control) with 200 KiB unread behind it, the
/// library uses no CPU to speak of while the host waits on the descriptor and dispatches when it
/// is readable (`assert_idle`: at most 10% of a 1.5 s window for the I/O threads, 20% for the
/// process). Then the held messages are completed, everything behind them arrives, and each
/// connection closes with one close callback. Runs in a process of its own (CPU is measured).
#[test]
fn fifty_connections_at_different_rates_lose_nothing_and_cost_no_cpu_when_idle() {
    const NAME: &str = "fifty_connections_at_different_rates_lose_nothing_and_cost_no_cpu_when_idle";
    if common::skip_under_asan(NAME, "it bounds CPU, which AddressSanitizer multiplies: checked in the normal build")
        || !in_child(NAME, &[])
    {
        return;
    }
    let (streamed_tx, streamed_rx) = mpsc::channel::<usize>();
    let (held_tx, held_rx) = mpsc::channel::<(usize, Option<u64>)>();
    let mut commands = Vec::new();
    let mut peers = Vec::new();
    let mut urls = Vec::new();
    for k in 0..MANY {
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        commands.push(cmd_tx);
        let (streamed_tx, held_tx) = (streamed_tx.clone(), held_tx.clone());
        let (url, peer) = serve(move |p| {
            let socket = p.client_socket();
            let mut raw = Raw::plain(p, false);
            let stream = many_stream(k);
            let mut rng = Rng(0x9900 + k as u64);
            let (max_chunk, max_pause) = (500 * (k % 4 + 1), (k % 5) as u64 * 3 + 1);
            let mut at = 0;
            let mut paused = k % 7 != 3;
            while at < stream.wire.len() {
                let end = (at + between(&mut rng, 1, max_chunk)).min(stream.wire.len());
                raw.send(&stream.wire[at..end]).unwrap();
                at = end;
                raw.idle(Duration::from_millis(rng.below(max_pause)));
                if !paused && at > stream.wire.len() / 2 {
                    paused = true;
                    raw.idle(Duration::from_millis(400));
                }
            }
            let answered = raw.wait(Duration::from_secs(20), |r| r.pong_count() >= stream.pings.len());
            streamed_tx.send(k).unwrap();
            // Until told to finish (or after a minute).
            while let Ok(Cmd::Hold) = cmd_rx.recv_timeout(Duration::from_secs(60)) {
                raw.send(&held_tail().0).unwrap();
                held_tx.send((k, socket.state().map(|s| s.rx_queue))).unwrap();
            }
            raw.send(&close_frame(1000, "fin")).unwrap();
            raw.wait(Duration::from_secs(10), |r| r.close().is_some());
            (answered && raw.pongs() == stream.pings, raw.bad.clone())
        });
        urls.push(url);
        peers.push(peer);
    }
    let hosts: Vec<Host> = (0..MANY)
        .map(|k| if k < HELD { Host::with_hook(|_, msg, _| msg.data != b"hold") } else { Host::default() })
        .collect();
    let client = Client::new();
    let options = options(None);
    let conns: Vec<WsConn> = urls
        .iter()
        .zip(&hosts)
        .enumerate()
        .map(|(k, (url, host))| {
            let conn = client.connect_with(url, options.0);
            host.watch(conn);
            host.here();
            if k < HELD {
                host.flow.store(FLOW_INLINE, Ordering::SeqCst);
                set(ws_set_flow_control(conn, true));
            }
            conn
        })
        .collect();
    let expected: Vec<Vec<Msg>> = (0..MANY).map(|k| many_stream(k).messages).collect();
    let mut streamed = 0;
    let mut rng = Rng(0x5a11);
    let stats = host_loop(
        &client,
        false,
        || {
            streamed += streamed_rx.try_iter().count();
            streamed == MANY && hosts.iter().zip(&expected).all(|(h, e)| h.count() >= e.len())
        },
        || {
            if rng.below(40) == 0 {
                // A host blocked elsewhere for a moment (on purpose).
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    );
    assert_no_stalls(&stats, "50 connections");
    for (k, host) in hosts.iter().enumerate() {
        assert_messages(&host.messages(), &expected[k], &format!("connection {k} of {MANY}"));
    }
    let idle = cpu_over_idle_window(Some(&client));
    for command in &commands[..HELD] {
        command.send(Cmd::Hold).unwrap();
    }
    let held: Vec<(usize, Option<u64>)> = (0..HELD).map(|_| held_rx.recv_timeout(PEER_TIMEOUT).unwrap()).collect();
    assert!(pump(&client, DEADLINE, || hosts[..HELD]
        .iter()
        .all(|h| h.messages().last().is_some_and(|m| m.data == b"hold"))));
    eprintln!("held connections: (k, bytes the client had not read right after the tail went out) {held:?}");
    let holding = cpu_over_idle_window(Some(&client));
    for &conn in &conns[..HELD] {
        set(ws_message_complete(conn));
    }
    let tail = held_tail().1;
    assert!(pump(&client, DEADLINE, || hosts[..HELD]
        .iter()
        .zip(&expected)
        .all(|(h, e)| h.count() >= e.len() + tail.len())));
    for (k, host) in hosts[..HELD].iter().enumerate() {
        let all: Vec<Msg> = expected[k].iter().chain(&tail).cloned().collect();
        assert_messages(&host.messages(), &all, &format!("held connection {k}"));
    }
    for command in &commands {
        command.send(Cmd::Finish).unwrap();
    }
    assert!(pump(&client, DEADLINE, || hosts.iter().all(Host::ended)), "not every connection closed");
    for (k, (host, peer)) in hosts.iter().zip(peers).enumerate() {
        let (answered, bad) = peer.join().unwrap();
        assert!(answered, "connection {k}: its pings were not all answered, one by one, in order");
        assert!(bad.is_empty(), "connection {k}: {bad:?}");
        assert_eq!(host.finals(), vec![Ev::Close(conns[k], 1000, "fin".into())], "connection {k}");
        host.assert_clean(&format!("connection {k}"));
    }
    assert_idle(&[
        ("50 idle connections", idle),
        ("50 idle connections, 5 holding a message with 200 KiB unread behind it", holding),
    ]);
}

// ---- 8. ws_client_free while messages stream in ----------------------------------------------------

/// A peer that streams small messages "{k}:{i}:..." as fast as the client takes them until the
/// client's side ends (at most 20 s); returns how many it sent, when it saw the end, and the
/// code of the client's close frame if one came.
/// What a flooding peer saw: messages sent, when the client's side ended, its close code.
type FloodEnd = (usize, Option<Instant>, Option<u16>);

fn flooding_peer(k: usize) -> (String, JoinHandle<FloodEnd>) {
    serve(move |p| {
        let mut raw = Raw::plain(p, false);
        raw.send_limit = Duration::from_secs(5);
        let mut rng = Rng(0xf100d + k as u64);
        let mut n = 0;
        let start = Instant::now();
        while raw.ended.is_none() && start.elapsed() < Duration::from_secs(20) {
            let (wire, _) = small_messages(&mut rng, &format!("{k}:{n}+"), 20, 80);
            if raw.send(&wire).is_err() {
                break;
            }
            n += 20;
            if rng.below(8) == 0 {
                raw.idle(Duration::from_millis(1));
            } else {
                raw.pump();
            }
        }
        if raw.ended.is_none() {
            raw.wait(Duration::from_secs(5), |r| r.ended.is_some());
        }
        (n, raw.ended_at, raw.close().and_then(Frame::close_code))
    })
}

/// The batches a flooding peer's messages came in are whole and in order: "{k}:{b}+{i}:" with b
/// the batch's first number and i 0..20.
fn assert_flood_in_order(host: &Host, k: usize) {
    for (n, m) in host.messages().iter().enumerate() {
        let want = format!("{k}:{}+{}:", n / 20 * 20, n % 20);
        assert!(m.data.starts_with(want.as_bytes()), "connection {k}: message {n} is {m:?}, expected {want}...");
    }
}

/// A client pointer that may cross to another thread (the test keeps it valid meanwhile).
struct ClientPtr(*mut WsClient);

unsafe impl Send for ClientPtr {}
// (Shared by threads that take turns: never two calls of the client's at once but those
// its contract allows.)
unsafe impl Sync for ClientPtr {}

impl ClientPtr {
    fn get(&self) -> *mut WsClient {
        self.0
    }
}

/// Header of ws_client_free: "Returns WS_STATUS_DISPATCH_IN_PROGRESS and frees nothing if called
/// while a dispatch or ws_run of this client runs (... on another thread)", the same for
/// ws_dispatch and ws_run (README); and otherwise "returns within 250 ms", every handle GONE
/// from any thread. Four peers flood small messages; in the middle of a dispatch (inside a
/// callback) another thread tries ws_client_free, ws_dispatch and ws_run: each is refused at
/// once (within 250 ms); the connections go on, every message in order. Then the host frees the
/// client between two dispatches while the floods go on: it returns within 750 ms (250 ms
/// documented; the margin is for a loaded machine), every handle answers GONE, and every peer
/// sees its connection end within 2 s.
#[test]
fn ws_client_free_is_refused_during_a_dispatch_and_prompt_after_it_while_messages_stream() {
    const CONNS: usize = 4;
    let (urls, peers): (Vec<String>, Vec<_>) = (0..CONNS).map(flooding_peer).unzip();
    let client = Client::new();
    let (try_tx, try_rx) = mpsc::channel::<()>();
    let (result_tx, result_rx) = mpsc::channel();
    let pointer = ClientPtr(client.0);
    let other = std::thread::spawn(move || {
        if try_rx.recv_timeout(PEER_TIMEOUT).is_err() {
            return;
        }
        let start = Instant::now();
        let free = unsafe { ws_client_free(pointer.get()) };
        let dispatch = unsafe { ws_dispatch(pointer.get(), std::ptr::null_mut(), std::ptr::null_mut()) };
        let run = unsafe { ws_run(pointer.get(), 10) };
        result_tx.send((free, dispatch, run, start.elapsed())).unwrap();
    });
    type Refusals = (WsStatus, WsStatus, WsStatus, Duration);
    let refused: Arc<Mutex<Option<Refusals>>> = Arc::default();
    let hook_refused = refused.clone();
    let mut hosts = vec![Host::with_hook(move |_, _, index| {
        if index == 300 {
            try_tx.send(()).unwrap();
            *hook_refused.lock().unwrap() = Some(result_rx.recv_timeout(PEER_TIMEOUT).unwrap());
        }
        true
    })];
    hosts.extend((1..CONNS).map(|_| Host::default()));
    let options = options(None);
    let conns: Vec<WsConn> = urls
        .iter()
        .zip(&hosts)
        .map(|(url, host)| {
            let conn = client.connect_with(url, options.0);
            host.watch(conn);
            host.here();
            conn
        })
        .collect();
    let stats = host_loop(
        &client,
        false,
        || hosts.iter().all(|h| h.count() >= 1000) && refused.lock().unwrap().is_some(),
        || {},
    );
    other.join().unwrap();
    let start = Instant::now();
    let freed = unsafe { ws_client_free(client.0) };
    let took = start.elapsed();
    let freed_at = start;
    std::mem::forget(client);
    let gone = std::thread::spawn(move || {
        conns.iter().map(|&c| (send_text(c, "x"), ws_message_complete(c), close(c, 1000, ""))).collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let ends: Vec<_> = peers.into_iter().map(|p| p.join().unwrap()).collect();
    let refused = refused.lock().unwrap().unwrap();
    eprintln!(
        "from another thread during a dispatch: {refused:?}; ws_client_free then took {took:?}; the peers: (sent, ended \
         after, close code) {:?}",
        ends.iter().map(|(n, at, code)| (n, at.map(|at| at.saturating_duration_since(freed_at)), code)).collect::<Vec<_>>()
    );
    assert_no_stalls(&stats, "free");
    assert_eq!(
        (refused.0, refused.1, refused.2),
        (WsStatus::DispatchInProgress, WsStatus::DispatchInProgress, WsStatus::DispatchInProgress),
        "ws_client_free, ws_dispatch and ws_run from another thread during a dispatch"
    );
    assert!(refused.3 < Duration::from_millis(250), "the refusals took {:?}", refused.3);
    assert_eq!(freed, WsStatus::Ok);
    assert!(took < Duration::from_millis(750), "ws_client_free took {took:?}");
    assert!(gone.iter().all(|g| *g == (WsStatus::Gone, WsStatus::Gone, WsStatus::Gone)), "after the free: {gone:?}");
    for (k, (host, (_, ended_at, _))) in hosts.iter().zip(&ends).enumerate() {
        assert_flood_in_order(host, k);
        assert!(host.finals().is_empty(), "connection {k}: a final callback after ws_client_free: {:?}", host.finals());
        let after = ended_at.map(|at| at.saturating_duration_since(freed_at));
        assert!(
            after.is_some_and(|a| a < Duration::from_secs(2)),
            "connection {k}: its peer saw the end after {after:?}"
        );
    }
}

/// Freed right after a random number of dispatches (the host's thread has just been
/// dispatching, and reading, mid-stream), four times over: ws_client_free returns within 750 ms
/// (250 ms documented), no callback runs after it, and every peer sees its connection end within
/// 2 s; what was delivered before is whole and in order.
#[test]
fn ws_client_free_right_after_dispatches_mid_stream_is_prompt_and_ends_every_connection() {
    let mut rng = Rng(0xf4ee);
    for round in 0..4 {
        let (urls, peers): (Vec<String>, Vec<_>) = (0..3).map(|k| flooding_peer(10 * round + k)).unzip();
        let hosts: Vec<Host> = (0..3).map(|_| Host::default()).collect();
        let client = Client::new();
        let options = options(None);
        for (url, host) in urls.iter().zip(&hosts) {
            let conn = client.connect_with(url, options.0);
            host.watch(conn);
            host.here();
        }
        let dispatches = between(&mut rng, 5, 150);
        let mut done = 0;
        let deadline = Instant::now() + DEADLINE;
        while done < dispatches || hosts.iter().any(|h| h.count() == 0) {
            assert!(Instant::now() < deadline, "round {round}: the floods never came");
            if client.wait_readable(Duration::from_millis(100)) {
                client.dispatch();
                done += 1;
            }
        }
        let counts: Vec<usize> = hosts.iter().map(Host::count).collect();
        let start = Instant::now();
        let freed = unsafe { ws_client_free(client.0) };
        let took = start.elapsed();
        let freed_at = start;
        std::mem::forget(client);
        let ends: Vec<_> = peers.into_iter().map(|p| p.join().unwrap()).collect();
        eprintln!("round {round}: freed after {done} dispatches ({counts:?} messages) in {took:?}");
        assert_eq!(freed, WsStatus::Ok);
        assert!(took < Duration::from_millis(750), "round {round}: ws_client_free took {took:?}");
        for (k, (host, (_, ended_at, _))) in hosts.iter().zip(&ends).enumerate() {
            assert_flood_in_order(host, 10 * round + k);
            assert_eq!(host.count(), counts[k], "round {round}, connection {k}: callbacks after ws_client_free");
            assert!(host.finals().is_empty(), "round {round}, connection {k}: {:?}", host.finals());
            let after = ended_at.map(|at| at.saturating_duration_since(freed_at));
            assert!(
                after.is_some_and(|a| a < Duration::from_secs(2)),
                "round {round}, connection {k}: its peer saw the end after {after:?}"
            );
        }
    }
}

// ---- 6 (continued). endings over wss ------------------------------------------------------------

/// A TLS close_notify right behind a burst of small messages (no close frame): the burst, then
/// one WS_STATUS_CONNECTION_LOST, with a fast, a slow and a late host.
#[test]
fn wss_close_notify_right_behind_a_burst_delivers_the_burst_then_one_connection_lost() {
    every_pace_over(Ending::CloseNotify, 0x6010, true);
}

/// Over wss: a close frame, a reset once the client read everything, invalid UTF-8 and a
/// reserved opcode right behind a burst: the burst, the replies (before the close frame, for a
/// violation), one final callback.
#[test]
fn wss_endings_behind_a_burst_deliver_the_burst_then_one_final_callback() {
    every_pace_over(Ending::CloseFrame, 0x6020, true);
    every_pace_over(Ending::Reset, 0x6030, true);
    every_pace_over(Ending::InvalidUtf8, 0x6040, true);
    every_pace_over(Ending::ReservedOpcode, 0x6050, true);
}
