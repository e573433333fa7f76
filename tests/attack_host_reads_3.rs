//! Third round of attacks on reading sockets on the host's thread (`ws_client_fd()` is an
//! epoll instance; from a connection's second message on, while the last message read was
//! small, the socket joins it and `ws_dispatch` reads small whole frames itself; a read
//! shorter than asked ends the host's reading until the next edge).
//!
//! Whether a connection's reading is with the host's thread is seen from outside the library:
//! /proc/self/fdinfo of `ws_client_fd()` lists what that epoll instance watches. Every test
//! asserts a documented outcome (README "Threading contract", "Flow control and memory
//! bounds"; include/wsclient.h on ws_client_fd and ws_dispatch): no message lost, duplicated or
//! reordered, one final callback, pings answered, no missed wake-up.
//!
//! What this round found (the tests marked "FAILED before the fix", which pass now; and one
//! known limitation, ignored):
//! - a short read is not a drained socket: a FIN or a reset right behind the last bytes, or
//!   data behind a TCP urgent byte, stays unread after the host's short read, and no edge
//!   comes for it; the watchdog delivers it 100-200 ms later if the host idles, and never
//!   while the host keeps dispatching (another busy connection, a timer-driven loop);
//! - a loop run on one client from another client's callback never gets what the host's read
//!   gives back to the I/O task (pings, large messages): the task's wake-up is deferred until
//!   the outer callback returns;
//! - (also without reading on dispatch) the I/O task's own short-read shortcut loses the data
//!   behind a TCP urgent byte until new data arrives.
//!
//! The fixes: the harvest of the host's descriptor says which sockets reported more than data
//! (EPOLLRDHUP, EPOLLHUP, EPOLLERR, EPOLLPRI), and the host reads those until the socket says
//! it is empty; a callback's sends are held, and task wake-ups deferred, only for the
//! connections of its own client, and a reading given back wakes its task at once. The
//! nested request and close tests below were added with the second fix (they fail without it).

mod common;

use std::ffi::c_void;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

/// How long a host loop may wait for a wake-up that an event owes it.
const STALL: Duration = Duration::from_millis(1500);
const KIB16: usize = 16 << 10;

// ---- helpers (as in attack_host_reads_2.rs) ---------------------------------------------------

/// Records messages in order; replies to each with `r` + its first 12 bytes when asked; notes,
/// at each message callback, its length and whether the host's thread had the socket then.
#[derive(Default)]
struct Host {
    rec: Recorder,
    reply: AtomicBool,
    /// ws_client_fd() of the client, to look at what it watches from inside callbacks.
    client_fd: AtomicI32,
    seen: Mutex<Vec<(usize, usize)>>,
    send_failures: AtomicUsize,
}

unsafe extern "C" fn host_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let host = &*(user as *const Host);
    let fd = host.client_fd.load(Ordering::Relaxed);
    if fd > 0 {
        host.seen.lock().unwrap().push((len, sockets_handed_fd(fd)));
    }
    on_message(conn, data, len, kind, (&host.rec as *const Recorder).cast_mut().cast());
    if host.reply.load(Ordering::Relaxed) {
        let body = std::slice::from_raw_parts(data, len);
        let mut answer = b"r".to_vec();
        answer.extend_from_slice(&body[..body.len().min(12)]);
        // (Refused once the connection is closing.)
        let status = send_binary(conn, &answer);
        if !matches!(status, WsStatus::Ok | WsStatus::Closing) {
            host.send_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn watch_host(conn: WsConn, host: &Host) {
    watch(conn, &host.rec);
    let user = host as *const Host as *mut c_void;
    assert_eq!(ws_on_message(conn, Some(host_message), user), WsStatus::Ok);
}

const WARM_UP: &[u8] = b"warm-up";

/// Messages received, warm-up ones left out, as (is text, bytes).
fn payloads(rec: &Recorder, conn: WsConn) -> Vec<(bool, Vec<u8>)> {
    rec.of(conn)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Text(_, b) if !b.starts_with(WARM_UP) => Some((true, b)),
            Ev::Binary(_, b) if !b.starts_with(WARM_UP) => Some((false, b)),
            _ => None,
        })
        .collect()
}

/// Two warm-up messages (the hand-over starts from the second message); with `replies`, the
/// host's answers are read.
fn warm_up<S: Read + Write>(stream: &mut S, replies: bool, flush: impl Fn(&mut S)) {
    for i in 0..2 {
        let mut body = WARM_UP.to_vec();
        body.push(b'0' + i);
        stream.write_all(&frame(FIN | BINARY, &body)).unwrap();
        flush(stream);
        if replies {
            read_frame_from(stream).expect("the answer to a warm-up message");
        }
    }
}

fn final_event(rec: &Recorder, conn: WsConn) -> Option<Ev> {
    rec.of(conn).into_iter().find(Ev::is_final)
}

fn options_with(f: impl FnOnce(*mut WsOptions)) -> Options {
    let o = Options::new();
    unsafe { ws_options_set_deflate(o.0, false) };
    f(o.0);
    o
}

fn read_on_dispatch(on: bool) -> Options {
    options_with(|o| set(unsafe { ws_options_set_read_on_dispatch(o, on) }))
}

/// A message of exactly `len` bytes whose first bytes name it (`m<i>.`), the rest a pattern
/// (ASCII: valid text).
fn numbered(i: usize, len: usize) -> Vec<u8> {
    let mut out = format!("m{i}.").into_bytes();
    out.truncate(len);
    while out.len() < len {
        out.push(b'a' + (out.len() % 26) as u8);
    }
    out
}

/// The reply the host sends to `body`.
fn reply_to(body: &[u8]) -> Vec<u8> {
    [b"r".as_slice(), &body[..body.len().min(12)]].concat()
}

#[derive(Clone, Copy, Debug)]
enum Wait {
    EpollLevel,
    EpollEdge,
    Poll,
    Select,
}

/// A host loop that waits on the client's fd the way `wait` says.
struct Waiter {
    wait: Wait,
    fd: i32,
    epfd: i32,
}

impl Waiter {
    fn new(wait: Wait, fd: i32) -> Waiter {
        let mut epfd = -1;
        if let Wait::EpollLevel | Wait::EpollEdge = wait {
            epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            let et = if matches!(wait, Wait::EpollEdge) { libc::EPOLLET } else { 0 };
            let mut ev = libc::epoll_event { events: (libc::EPOLLIN | et) as u32, u64: 1 };
            assert_eq!(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) }, 0);
        }
        Waiter { wait, fd, epfd }
    }

    /// Waits at most `timeout`; whether the fd was reported readable.
    fn wait(&self, timeout: Duration) -> bool {
        let ms = timeout.as_millis() as i32;
        unsafe {
            match self.wait {
                Wait::EpollLevel | Wait::EpollEdge => {
                    let mut ev = libc::epoll_event { events: 0, u64: 0 };
                    libc::epoll_wait(self.epfd, &mut ev, 1, ms) == 1
                }
                Wait::Poll => readable(self.fd, timeout),
                Wait::Select => {
                    let mut set: libc::fd_set = std::mem::zeroed();
                    libc::FD_ZERO(&mut set);
                    libc::FD_SET(self.fd, &mut set);
                    let mut tv = libc::timeval { tv_sec: (ms / 1000) as _, tv_usec: ((ms % 1000) * 1000) as _ };
                    libc::select(self.fd + 1, &mut set, std::ptr::null_mut(), std::ptr::null_mut(), &mut tv) == 1
                }
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.epfd >= 0 {
            unsafe { libc::close(self.epfd) };
        }
    }
}

/// Runs the host until `done`, waiting as `waiter` does, dispatching again at once while
/// `more_pending`; fails if a wait passes STALL without a wake-up while `done` is false.
fn host_loop(client: &Client, waiter: &Waiter, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut more = true;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: the loop ran for a minute");
        if !more && !waiter.wait(STALL) {
            assert!(done(), "{what} ({:?}): no wake-up for {STALL:?} while an event was owed", waiter.wait);
            return;
        }
        more = client.dispatch().1;
    }
}

// ---- 1. message sizes alternating around 16 KiB ------------------------------------------------

/// The sizes of the alternating stream: at, under and over 16 KiB, empty, tiny and large, in an
/// order that makes the hand-over go back and forth (small after big, big after small, two
/// smalls, 16 KiB exactly after 16 KiB + 1...).
const SIZES: [usize; 18] = [
    KIB16,
    KIB16 + 1,
    7,
    100_000,
    KIB16,
    KIB16,
    KIB16 + 1,
    0,
    KIB16 - 1,
    KIB16 + 1,
    KIB16,
    1,
    65_536,
    KIB16,
    3,
    KIB16 + 1,
    KIB16 + 2,
    20,
];

/// Message `i` of the alternating stream: (text, bytes). Text and binary change with the size
/// pattern's rounds and every third message, so each size comes as both.
fn alternating(i: usize) -> (bool, Vec<u8>) {
    let len = SIZES[i % SIZES.len()];
    let text = ((i / SIZES.len()) % 2 == 0) ^ (i % 3 == 0);
    (text, numbered(i, len))
}

fn ws_frame((text, body): &(bool, Vec<u8>)) -> Vec<u8> {
    frame(FIN | if *text { TEXT } else { BINARY }, body)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pace {
    /// The server waits for the reply to each message before the next.
    RequestReply,
    /// Bursts of 1 to 5 messages, written in chunks cut at random points, then their replies.
    Bursts,
}

/// Plain ws: the alternating stream under one pace and one kind of wait. Every message
/// arrives whole, in order, with its kind; every reply reaches the server. In request/reply,
/// the host's thread never has the socket at the callback of a message over 16 KiB (the I/O
/// task read it and the last message read was not small), and it has it again at the callback
/// of the first small message after one (the task's second message since it took the reading
/// back) (README: "This starts from a connection's second message", "while the last message
/// read was small").
fn alternating_case(pace: Pace, wait: Wait, rounds: usize, seed: u64) {
    let what = format!("{pace:?}/{wait:?}");
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, true, |_| {});
        let mut rng = Rng(seed);
        let mut i = 0;
        while i < rounds {
            let k = if pace == Pace::RequestReply { 1 } else { 1 + rng.below(5) as usize };
            let k = k.min(rounds - i);
            let burst: Vec<u8> = (i..i + k).flat_map(|j| ws_frame(&alternating(j))).collect();
            let mut at = 0;
            while at < burst.len() {
                let n = if pace == Pace::RequestReply { burst.len() } else { 1 + rng.below(40_000) as usize };
                let n = n.min(burst.len() - at);
                peer.send(&burst[at..at + n]);
                at += n;
            }
            for j in i..i + k {
                let f = peer.read_frame().expect("a reply");
                assert_eq!(f.opcode, BINARY);
                assert_eq!(f.payload, reply_to(&alternating(j).1), "reply {j}");
            }
            i += k;
        }
        peer.send(&close_frame(1000, "sizes"));
        let _ = peer.read_until_close();
    });
    let client = Client::new();
    let waiter = Waiter::new(wait, client.fd());
    let host = Host { reply: AtomicBool::new(true), ..Default::default() };
    host.client_fd.store(client.fd(), Ordering::Relaxed);
    let options = options_with(|_| {});
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    host_loop(&client, &waiter, &what, || host.rec.finals(conn) == 1);
    let got = payloads(&host.rec, conn);
    assert_eq!(got.len(), rounds, "{what}: messages");
    for (i, m) in got.iter().enumerate() {
        let expected = alternating(i);
        assert!(
            *m == expected,
            "{what}: message {i} differs (len {} text {}, expected len {})",
            m.1.len(),
            m.0,
            expected.1.len()
        );
    }
    assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, "sizes".into())), "{what}");
    server.join().unwrap();
    let seen = host.seen.lock().unwrap().clone();
    eprintln!("{what}: handed at callbacks: {:?}", seen.iter().map(|(l, h)| format!("{l}:{h}")).collect::<Vec<_>>());
    if pace == Pace::RequestReply {
        // Leave out the two warm-up messages.
        let seen = &seen[2..];
        for (i, pair) in seen.windows(2).enumerate() {
            let ((before, _), (len, handed)) = (pair[0], pair[1]);
            if len > KIB16 {
                assert_eq!(
                    handed,
                    0,
                    "{what}: message {} ({len} bytes) was read by the I/O task, yet the socket was the host's",
                    i + 1
                );
            }
            if before > KIB16 && len <= KIB16 {
                assert_eq!(
                    handed,
                    1,
                    "{what}: message {} ({len} bytes, after one of {before}) did not hand the socket over",
                    i + 1
                );
            }
        }
        assert!(seen.iter().any(|(len, handed)| *len <= KIB16 && *handed == 1), "{what}: never handed over");
    }
}

/// Request/reply with sizes alternating around 16 KiB (text and binary, 16 KiB exactly, its
/// NUL past it for text), under edge-triggered epoll and select.
#[test]
fn sizes_alternating_around_16_kib_in_request_reply_arrive_whole_and_toggle_the_hand_over() {
    alternating_case(Pace::RequestReply, Wait::EpollEdge, 180, 1);
    alternating_case(Pace::RequestReply, Wait::Select, 72, 2);
}

/// Bursts of 1 to 5 messages of sizes alternating around 16 KiB, cut into segments at random
/// points, under level-triggered epoll and poll.
#[test]
fn sizes_alternating_around_16_kib_in_random_bursts_arrive_whole_and_in_order() {
    alternating_case(Pace::Bursts, Wait::EpollLevel, 216, 3);
    alternating_case(Pace::Bursts, Wait::Poll, 216, 4);
}

// ---- 2. a callback of one client running a loop on another -------------------------------------

/// What the inner server sends while the outer client's callback waits on the inner client.
#[derive(Clone, Copy, Debug)]
enum InnerSends {
    /// A ping, then a small text message "inner".
    PingAndText,
    /// A text message of 16 KiB + 1 (read by the I/O task), "inner..." .
    Big,
    /// A small text message "inner" alone (the host's thread reads it).
    Small,
}

struct Outer {
    rec: Recorder,
    inner: *mut WsClient,
    inner_rec: *const Recorder,
    inner_conn: AtomicUsize,
    go_inner: Mutex<Option<mpsc::Sender<()>>>,
    /// How long the nested loop waited for the inner message (None: it never came).
    waited: Mutex<Option<Option<Duration>>>,
}

unsafe extern "C" fn outer_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let outer = &*(user as *const Outer);
    on_message(conn, data, len, kind, (&outer.rec as *const Recorder).cast_mut().cast());
    if std::slice::from_raw_parts(data, len) != b"go" {
        return;
    }
    // A synchronous request in a callback: tell the inner server to send, then run the inner
    // client's loop right here until its message arrives (at most 3 s).
    let inner_rec = &*outer.inner_rec;
    let inner_conn = outer.inner_conn.load(Ordering::SeqCst) as WsConn;
    let before = inner_rec.texts(inner_conn).len();
    outer.go_inner.lock().unwrap().take().unwrap().send(()).unwrap();
    let start = Instant::now();
    let mut arrived = None;
    while start.elapsed() < Duration::from_secs(3) {
        if inner_rec.texts(inner_conn).len() > before {
            arrived = Some(start.elapsed());
            break;
        }
        let mut pfd = libc::pollfd { fd: ws_client_fd(outer.inner), events: libc::POLLIN, revents: 0 };
        libc::poll(&mut pfd, 1, 20);
        let (mut ran, mut more) = (0u32, false);
        assert_eq!(ws_dispatch(outer.inner, &mut ran, &mut more), WsStatus::Ok);
    }
    *outer.waited.lock().unwrap() = Some(arrived);
}

/// The outer client's message callback runs a loop on an inner client (poll its fd, dispatch
/// it) until the inner server's next message arrives: a synchronous request made from a
/// callback. README: ws_dispatch may be called from a callback for another client, and "no
/// message lost"; pings are answered while the host dispatches. The inner connection's socket
/// is with the host's thread when the inner server sends.
fn nested_case(sends: InnerSends, on: bool) {
    let what = format!("{sends:?}, read_on_dispatch {on}");
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (inner_url, inner_server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        go_rx.recv().unwrap();
        let start = Instant::now();
        match sends {
            InnerSends::PingAndText => {
                peer.send(&frame(FIN | PING, b"nested"));
                peer.send(&frame(FIN | TEXT, b"inner"));
            }
            InnerSends::Big => peer.send(&frame(FIN | TEXT, &numbered(0, KIB16 + 1))),
            InnerSends::Small => peer.send(&frame(FIN | TEXT, b"inner")),
        }
        // The pong, if a ping went out (at most 3 s).
        let pong = if matches!(sends, InnerSends::PingAndText) {
            peer.read_timeout(Duration::from_secs(3));
            match peer.read_frame() {
                Ok(f) if f.opcode == PONG && f.payload == b"nested" => Some(start.elapsed()),
                _ => None,
            }
        } else {
            Some(Duration::ZERO)
        };
        peer.read_timeout(PEER_TIMEOUT);
        let _ = peer.read_until_close();
        pong
    });
    let (outer_go_tx, outer_go_rx) = mpsc::channel::<()>();
    let (outer_url, outer_server) = serve(move |mut peer| {
        peer.upgrade();
        outer_go_rx.recv().unwrap();
        peer.send(&frame(FIN | TEXT, b"go"));
        let _ = peer.read_until_close();
    });
    let outer_client = Client::new();
    let inner_client = Client::new();
    let inner_rec = Recorder::default();
    let outer = Outer {
        rec: Recorder::default(),
        inner: inner_client.0,
        inner_rec: &inner_rec,
        inner_conn: AtomicUsize::new(0),
        go_inner: Mutex::new(Some(go_tx)),
        waited: Mutex::new(None),
    };
    let options = read_on_dispatch(on);
    let c_outer = outer_client.connect_with(&outer_url, options.0);
    let c_inner = inner_client.connect_with(&inner_url, options.0);
    outer.inner_conn.store(c_inner as usize, Ordering::SeqCst);
    watch(c_outer, &outer.rec);
    assert_eq!(ws_on_message(c_outer, Some(outer_message), user(&outer)), WsStatus::Ok);
    watch(c_inner, &inner_rec);
    wait_open(&outer_client, &outer.rec, c_outer);
    // The inner connection gets its warm-up messages; with reading on dispatch, its socket is
    // then the host's.
    assert!(pump(&inner_client, DEADLINE, || inner_rec.of(c_inner).len() == 3), "{what}: the warm-up");
    if on {
        wait_handed(&inner_client, 1, &what);
    }
    outer_go_tx.send(()).unwrap();
    assert!(pump(&outer_client, DEADLINE, || outer.waited.lock().unwrap().is_some()), "{what}: the outer go");
    let waited = outer.waited.lock().unwrap().unwrap();
    // Everything ends (whatever happened above), then the verdict.
    close(c_inner, 1000, "");
    close(c_outer, 1000, "");
    assert!(pump(&inner_client, DEADLINE, || inner_rec.finals(c_inner) == 1), "{what}: inner final");
    assert!(pump(&outer_client, DEADLINE, || outer.rec.finals(c_outer) == 1), "{what}: outer final");
    let pong = inner_server.join().unwrap();
    outer_server.join().unwrap();
    eprintln!("{what}: the inner message came after {waited:?}, the pong after {pong:?}");
    assert!(
        waited.is_some(),
        "{what}: the inner client's message never reached a loop dispatching it from a callback of the outer client (3 s)"
    );
    assert!(pong.is_some(), "{what}: the inner server's ping went unanswered for 3 s while its client was dispatched");
    let texts = inner_rec.texts(c_inner);
    assert_eq!(texts.len(), 1, "{what}: {texts:?}");
}

/// FAILED before the fix: with reading on dispatch (the default), a ping then a message arriving on a socket
/// the host's thread reads, while the host dispatches that client from another client's
/// callback: neither the pong nor the message comes until the outer callback returns. The
/// inner dispatch's read gives the reading back to the I/O task (src/host/reading.rs,
/// `Conn::read_on_host`) and wakes it through `dispatch::wake_task`, which, on a thread inside
/// any dispatch batch (the outer client's callback), only queues the wake-up until that batch
/// ends (src/host/dispatch.rs, `wake_task`, `DEFER_DEPTH`); the watchdog never fires, since
/// the inner client is being dispatched.
#[test]
fn a_ping_then_a_message_reach_a_loop_run_on_one_client_from_anothers_callback() {
    nested_case(InnerSends::PingAndText, true);
}

/// FAILED before the fix: as above, with a message of 16 KiB + 1 (given back to the I/O task by the host's
/// thread).
#[test]
fn a_big_message_reaches_a_loop_run_on_one_client_from_anothers_callback() {
    nested_case(InnerSends::Big, true);
}

/// The same three scenarios with the reading left to the I/O thread, and a small message with
/// reading on dispatch: the control cases.
#[test]
fn nested_loops_without_reading_on_dispatch_and_small_messages_with_it_get_their_message() {
    nested_case(InnerSends::PingAndText, false);
    nested_case(InnerSends::Big, false);
    nested_case(InnerSends::Small, true);
}

/// What the outer callback asks of the inner connection before it runs the inner loop.
#[derive(Clone, Copy, Debug, PartialEq)]
enum InnerAsk {
    /// ws_send "request": the inner server answers "reply".
    Request,
    /// ws_close: the inner server answers with its close frame.
    Close,
}

struct Asker {
    rec: Recorder,
    ask: InnerAsk,
    inner: *mut WsClient,
    inner_rec: *const Recorder,
    inner_conn: AtomicUsize,
    /// How long the nested loop waited for the outcome (None: it never came).
    waited: Mutex<Option<Option<Duration>>>,
}

unsafe extern "C" fn asker_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let asker = &*(user as *const Asker);
    on_message(conn, data, len, kind, (&asker.rec as *const Recorder).cast_mut().cast());
    let inner_rec = &*asker.inner_rec;
    let inner_conn = asker.inner_conn.load(Ordering::SeqCst) as WsConn;
    let status = match asker.ask {
        InnerAsk::Request => send_text(inner_conn, "request"),
        InnerAsk::Close => close(inner_conn, 1000, ""),
    };
    assert_eq!(status, WsStatus::Ok);
    let outcome = || match asker.ask {
        InnerAsk::Request => inner_rec.texts(inner_conn).iter().any(|t| t == "reply"),
        InnerAsk::Close => inner_rec.finals(inner_conn) == 1,
    };
    // The loop waits on the descriptor before it dispatches, as hosts' loops do.
    let start = Instant::now();
    let mut arrived = None;
    while start.elapsed() < Duration::from_secs(3) {
        let mut pfd = libc::pollfd { fd: ws_client_fd(asker.inner), events: libc::POLLIN, revents: 0 };
        libc::poll(&mut pfd, 1, 3000);
        let (mut ran, mut more) = (0u32, false);
        assert_eq!(ws_dispatch(asker.inner, &mut ran, &mut more), WsStatus::Ok);
        if outcome() {
            arrived = Some(start.elapsed());
            break;
        }
    }
    *asker.waited.lock().unwrap() = Some(arrived);
}

/// A callback of one client sends a request on (or closes) a connection of another client,
/// then runs that client's loop, waiting on its descriptor, until the reply (or the close)
/// comes: a synchronous request made from a callback (README: every function may be called
/// from inside callbacks, ws_dispatch of another client too). Before the fix, the send was
/// held (and the close's wake-up deferred) until the outer callback returned: nothing came
/// for 3 s.
fn nested_ask_case(ask: InnerAsk, on: bool) {
    let what = format!("{ask:?}, read_on_dispatch {on}");
    let (inner_url, inner_server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        peer.read_timeout(Duration::from_secs(5));
        let first = peer.read_frame();
        match &first {
            Ok(f) if f.opcode == TEXT && f.payload == b"request" => peer.send(&frame(FIN | TEXT, b"reply")),
            Ok(f) if f.opcode == CLOSE => peer.send(&close_frame(1000, "")),
            _ => {}
        }
        let _ = peer.read_until_close();
        first.map(|f| f.opcode).ok()
    });
    let (outer_go_tx, outer_go_rx) = mpsc::channel::<()>();
    let (outer_url, outer_server) = serve(move |mut peer| {
        peer.upgrade();
        outer_go_rx.recv().unwrap();
        peer.send(&frame(FIN | TEXT, b"go"));
        let _ = peer.read_until_close();
    });
    let outer_client = Client::new();
    let inner_client = Client::new();
    let inner_rec = Recorder::default();
    let asker = Asker {
        rec: Recorder::default(),
        ask,
        inner: inner_client.0,
        inner_rec: &inner_rec,
        inner_conn: AtomicUsize::new(0),
        waited: Mutex::new(None),
    };
    let options = read_on_dispatch(on);
    let c_outer = outer_client.connect_with(&outer_url, options.0);
    let c_inner = inner_client.connect_with(&inner_url, options.0);
    asker.inner_conn.store(c_inner as usize, Ordering::SeqCst);
    watch(c_outer, &asker.rec);
    assert_eq!(ws_on_message(c_outer, Some(asker_message), user(&asker)), WsStatus::Ok);
    watch(c_inner, &inner_rec);
    wait_open(&outer_client, &asker.rec, c_outer);
    assert!(pump(&inner_client, DEADLINE, || inner_rec.of(c_inner).len() == 3), "{what}: the warm-up");
    if on {
        wait_handed(&inner_client, 1, &what);
    }
    outer_go_tx.send(()).unwrap();
    assert!(pump(&outer_client, DEADLINE, || asker.waited.lock().unwrap().is_some()), "{what}: the outer go");
    let waited = asker.waited.lock().unwrap().unwrap();
    let _ = close(c_inner, 1000, "");
    close(c_outer, 1000, "");
    assert!(pump(&inner_client, DEADLINE, || inner_rec.finals(c_inner) == 1), "{what}: inner final");
    assert!(pump(&outer_client, DEADLINE, || asker.rec.finals(c_outer) == 1), "{what}: outer final");
    let first = inner_server.join().unwrap();
    outer_server.join().unwrap();
    eprintln!("{what}: the outcome came after {waited:?}; the inner server first read {first:?}");
    assert!(waited.is_some(), "{what}: nothing came for 3 s to a loop run on the inner client from a callback");
    let expected = if ask == InnerAsk::Request { TEXT } else { CLOSE };
    assert_eq!(first, Some(expected), "{what}");
}

#[test]
fn a_request_sent_on_one_client_from_anothers_callback_gets_its_reply_in_a_loop_run_there() {
    nested_ask_case(InnerAsk::Request, true);
    nested_ask_case(InnerAsk::Request, false);
}

#[test]
fn a_close_of_one_client_from_anothers_callback_completes_in_a_loop_run_there() {
    nested_ask_case(InnerAsk::Close, true);
    nested_ask_case(InnerAsk::Close, false);
}

// ---- 3. wss: records split, coalesced, key updates, under the short-read shortcut ---------------

/// A CA file and a server configuration for 127.0.0.1 limited to `versions`.
fn tls_server(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let name = format!("wsclient attack3 CA {} {}", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed));
    ca_params.distinguished_name.push(DnType::CommonName, name.clone());
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let chain = vec![cert.der().clone(), ca_cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let ca_pem = std::env::temp_dir().join(format!("{}.pem", name.replace(' ', "-")));
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    (ca_pem, Arc::new(config))
}

/// wss, TLS 1.2 or 1.3: once the host's thread reads the socket, the server sends the
/// alternating sizes in bursts whose frames are cut into 1 to 3 TLS records each (so records
/// hold parts of frames, several frames, or a frame's last byte), a burst's records written at
/// once (many records in one segment) or cut at random points into segments (a record, even
/// its 5-byte header, split across segments), sometimes waiting until the client has read
/// a segment before the next (a record's rest arrives after a short read took its start);
/// TLS 1.3 updates its keys now and then. Every message arrives whole and in order, every
/// reply decrypts at the server, the close handshake completes.
fn wss_records_case(tls13: bool, rounds: usize, seed: u64) {
    let what = if tls13 { "TLS 1.3" } else { "TLS 1.2" };
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        if tls13 { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS12] };
    let (ca_pem, config) = tls_server(versions);
    let listener = Listener::bind();
    let url = format!("wss://127.0.0.1:{}/", listener.port);
    let (handed_tx, handed_rx) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let peer = listener.accept();
        let socket = peer.client_socket();
        let connection = rustls::ServerConnection::new(config).unwrap();
        let mut tls = rustls::StreamOwned::new(connection, peer.stream);
        let request = read_request_from(&mut tls).unwrap();
        tls.write_all(response_to(&request, "").as_bytes()).unwrap();
        flush_tls(&mut tls).unwrap();
        warm_up(&mut tls, true, |tls| flush_tls(tls).unwrap());
        // A burst's records are made before any is written.
        tls.conn.set_buffer_limit(None);
        handed_rx.recv().unwrap();
        let mut rng = Rng(seed);
        let mut i = 0;
        let mut key_updates = 0;
        while i < rounds {
            let k = (1 + rng.below(6) as usize).min(rounds - i);
            for j in i..i + k {
                let bytes = ws_frame(&alternating(j));
                // 1 to 3 records per frame, cut at random points.
                let mut cuts = vec![0, bytes.len()];
                for _ in 0..rng.below(3) {
                    cuts.push(rng.below(bytes.len() as u64 + 1) as usize);
                }
                cuts.sort_unstable();
                for w in cuts.windows(2) {
                    if w[1] > w[0] {
                        tls.conn.writer().write_all(&bytes[w[0]..w[1]]).unwrap();
                    }
                }
                if tls13 && rng.below(7) == 0 {
                    tls.conn.refresh_traffic_keys().unwrap();
                    key_updates += 1;
                }
            }
            let mut records = Vec::new();
            while tls.conn.wants_write() {
                tls.conn.write_tls(&mut records).unwrap();
            }
            let mut at = 0;
            let whole = rng.below(3) == 0;
            while at < records.len() {
                let n = if whole {
                    records.len()
                } else {
                    match rng.below(4) {
                        0 => 1 + rng.below(6) as usize,
                        1 => 1 + rng.below(200) as usize,
                        _ => 1 + rng.below(20_000) as usize,
                    }
                };
                let n = n.min(records.len() - at);
                tls.sock.write_all(&records[at..at + n]).unwrap();
                at += n;
                if !whole && rng.below(4) == 0 {
                    // The client reads this segment before the next arrives.
                    assert!(socket.wait_read_everything(), "the client stopped reading");
                }
            }
            for j in i..i + k {
                let f = read_frame_from(&mut tls).expect("a reply");
                assert_eq!(f.opcode, BINARY);
                assert_eq!(f.payload, reply_to(&alternating(j).1), "reply {j}");
            }
            i += k;
        }
        tls.write_all(&close_frame(1000, "records")).unwrap();
        flush_tls(&mut tls).unwrap();
        let f = read_frame_from(&mut tls).expect("the close reply");
        assert_eq!(f.opcode, CLOSE);
        key_updates
    });
    let client = Client::new();
    let options = options_with(|o| {
        let ca = cstr(ca_pem.to_str().unwrap());
        set(unsafe { ws_options_add_ca_file(o, ca.as_ptr()) });
    });
    let host = Host { reply: AtomicBool::new(true), ..Default::default() };
    host.client_fd.store(client.fd(), Ordering::Relaxed);
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    wait_handed(&client, 1, what);
    handed_tx.send(()).unwrap();
    let waiter = Waiter::new(Wait::EpollEdge, client.fd());
    host_loop(&client, &waiter, what, || host.rec.finals(conn) == 1);
    let got = payloads(&host.rec, conn);
    assert_eq!(got.len(), rounds, "{what}: messages");
    for (i, m) in got.iter().enumerate() {
        assert!(*m == alternating(i), "{what}: message {i} differs (len {})", m.1.len());
    }
    assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, "records".into())), "{what}");
    let key_updates = server.join().unwrap();
    let seen = host.seen.lock().unwrap();
    let on_host = seen.iter().filter(|(_, handed)| *handed == 1).count();
    eprintln!("{what}: {key_updates} key updates; {on_host} of {} callbacks with the socket the host's", seen.len());
    // The stream was read on the host's thread in good part (else this tested nothing new).
    assert!(on_host >= 20, "{what}: only {on_host} callbacks found the socket with the host's thread");
    let _ = std::fs::remove_file(&ca_pem);
}

#[test]
fn wss_tls13_records_split_coalesced_and_key_updates_lose_nothing_while_the_host_reads() {
    wss_records_case(true, 150, 11);
}

#[test]
fn wss_tls12_records_split_and_coalesced_lose_nothing_while_the_host_reads() {
    wss_records_case(false, 150, 12);
}

/// wss, TLS 1.3: 400 small messages, each in a record of its own, all written in one segment
/// (about 12 KiB of records: one short read takes them all), then the server waits for every
/// reply. The host's thread decrypts them and must not take the socket for drained while
/// plaintext waits in the session (README: "a few reads per connection per call at most", the
/// rest at the next dispatch). A read buffer of 256 bytes makes each dispatch take few.
#[test]
fn wss_hundreds_of_records_in_one_segment_with_a_tiny_read_buffer_lose_nothing() {
    for read_buffer in [256usize, 64 << 10] {
        let what = format!("read buffer {read_buffer}");
        let (ca_pem, config) = tls_server(&[&rustls::version::TLS13]);
        let listener = Listener::bind();
        let url = format!("wss://127.0.0.1:{}/", listener.port);
        let (handed_tx, handed_rx) = mpsc::channel::<()>();
        let n = 400;
        let server = std::thread::spawn(move || {
            let peer = listener.accept();
            let connection = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(connection, peer.stream);
            let request = read_request_from(&mut tls).unwrap();
            tls.write_all(response_to(&request, "").as_bytes()).unwrap();
            flush_tls(&mut tls).unwrap();
            warm_up(&mut tls, true, |tls| flush_tls(tls).unwrap());
            handed_rx.recv().unwrap();
            for round in 0..3 {
                for i in 0..n {
                    tls.conn.writer().write_all(&frame(FIN | TEXT, format!("m{round}.{i}").as_bytes())).unwrap();
                }
                let mut records = Vec::new();
                while tls.conn.wants_write() {
                    tls.conn.write_tls(&mut records).unwrap();
                }
                tls.sock.write_all(&records).unwrap();
                for i in 0..n {
                    let f = read_frame_from(&mut tls).expect("a reply");
                    assert_eq!(f.payload, reply_to(format!("m{round}.{i}").as_bytes()));
                }
            }
            tls.write_all(&close_frame(1000, "many")).unwrap();
            flush_tls(&mut tls).unwrap();
            let f = read_frame_from(&mut tls).expect("the close reply");
            assert_eq!(f.opcode, CLOSE);
        });
        let client = Client::new();
        let options = options_with(|o| {
            let ca = cstr(ca_pem.to_str().unwrap());
            set(unsafe { ws_options_add_ca_file(o, ca.as_ptr()) });
            set(unsafe { ws_options_set_read_buffer_size(o, read_buffer) });
        });
        let host = Host { reply: AtomicBool::new(true), ..Default::default() };
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, &host);
        wait_handed(&client, 1, &what);
        handed_tx.send(()).unwrap();
        let waiter = Waiter::new(Wait::EpollEdge, client.fd());
        host_loop(&client, &waiter, &what, || host.rec.finals(conn) == 1);
        let expected: Vec<(bool, Vec<u8>)> =
            (0..3).flat_map(|r| (0..n).map(move |i| (true, format!("m{r}.{i}").into_bytes()))).collect();
        assert!(payloads(&host.rec, conn) == expected, "{what}: the messages differ");
        assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, "many".into())), "{what}");
        server.join().unwrap();
        let _ = std::fs::remove_file(&ca_pem);
    }
}

// ---- 4. plain TCP: a short read that did not drain the socket -----------------------------------

/// Sends `bytes` with MSG_OOB: their last byte becomes TCP urgent data, taken out of the
/// stream (SO_OOBINLINE is off), and a read stops at it.
fn send_urgent(stream: &TcpStream, bytes: &[u8]) {
    let n = unsafe { libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_OOB) };
    assert_eq!(n, bytes.len() as isize, "send MSG_OOB: {}", std::io::Error::last_os_error());
}

/// Holds back (or lets go) what is written to `stream` until a full segment (TCP_CORK).
fn cork(stream: &TcpStream, on: bool) {
    set_int_option(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CORK, on.into());
}

/// A server sends a message followed by one urgent byte (MSG_OOB: out of the stream, so the
/// WebSocket stream stays intact), then a second message, both before the client reads. A
/// recv stops at the urgent mark: the first read is short although the second message waits
/// in the socket, and no new data (no new edge) comes after it. Returns how long after the
/// host started dispatching each message arrived (None: not within 2 s).
fn urgent_case(on: bool) -> (Option<Duration>, Option<Duration>) {
    let (sent_tx, sent_rx) = mpsc::channel::<ClientSocket>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        go_rx.recv().unwrap();
        let mut first = frame(FIN | TEXT, b"first");
        first.push(b'!');
        // Corked (though urgent data is pushed at once: the two may come in two segments).
        cork(&peer.stream, true);
        send_urgent(&peer.stream, &first);
        peer.send(&frame(FIN | TEXT, b"second"));
        cork(&peer.stream, false);
        sent_tx.send(peer.client_socket()).unwrap();
        let _ = peer.read_until_close();
    });
    let client = Client::new();
    let options = options_with(|o| {
        set(unsafe { ws_options_set_read_on_dispatch(o, on) });
        set(unsafe { ws_options_set_keepalive(o, 0, 1000) });
    });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.texts(conn).is_empty() && rec.of(conn).len() == 3), "the warm-up");
    if on {
        wait_handed(&client, 1, "urgent");
    }
    go_tx.send(()).unwrap();
    let socket = sent_rx.recv().unwrap();
    // Both messages (and the urgent byte) reached the client's socket before anyone read.
    // (Whether the kernel counts the urgent byte or not.)
    let all = (7 + 8) as u64;
    // (Without reading on dispatch, the I/O thread reads at once: nothing to wait for.)
    let arrived = !on || socket.wait_until(|s| s.is_some_and(|s| s.rx_queue >= all));
    let start = Instant::now();
    let mut times = [None, None];
    pump(&client, Duration::from_secs(2), || {
        let texts = rec.texts(conn);
        for (k, name) in ["first", "second"].iter().enumerate() {
            if times[k].is_none() && texts.iter().any(|t| t == name) {
                times[k] = Some(start.elapsed());
            }
        }
        times.iter().all(Option::is_some)
    });
    close(conn, 1000, "");
    let _ = final_within(&client, &rec, conn, Duration::from_secs(5));
    server.join().unwrap();
    assert!(arrived, "the server's bytes never all reached the client's socket");
    eprintln!("read_on_dispatch {on}: first after {:?}, second after {:?}", times[0], times[1]);
    (times[0], times[1])
}

/// With reading on dispatch off: the same urgent byte, this time deterministically in the
/// socket with the message behind it when the I/O thread reads: a receive queue limit of 1
/// byte and a read buffer of 256 bytes hold the I/O thread back (it reads ahead one buffer,
/// then waits for the host) while ten filler messages, the message with its urgent byte and
/// the last message all reach the socket; then the host dispatches. Returns whether the last
/// message came within 2 s.
fn urgent_held_case() -> bool {
    let (sent_tx, sent_rx) = mpsc::channel::<ClientSocket>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        let mut bytes = Vec::new();
        for i in 0..10 {
            bytes.extend_from_slice(&frame(FIN | TEXT, &numbered(i, 100)));
        }
        peer.send(&bytes);
        let mut first = frame(FIN | TEXT, b"first");
        first.push(b'!');
        send_urgent(&peer.stream, &first);
        peer.send(&frame(FIN | TEXT, b"second"));
        sent_tx.send(peer.client_socket()).unwrap();
        let _ = peer.read_until_close();
    });
    let client = Client::new();
    let options = options_with(|o| {
        set(unsafe { ws_options_set_read_on_dispatch(o, false) });
        set(unsafe { ws_options_set_keepalive(o, 0, 1000) });
        set(unsafe { ws_options_set_receive_queue_limit(o, 1) });
        set(unsafe { ws_options_set_read_buffer_size(o, 256) });
    });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let socket = sent_rx.recv().unwrap();
    // Everything sent is in the client's socket or read ahead (one read buffer at most), and
    // the I/O thread waits for the host.
    // (The bytes behind the first message's end are 9 at most: at 16, the mark is unread.)
    let held = socket.wait_until(|s| s.is_some_and(|s| s.rx_queue >= 16));
    let mut last = socket.state().map(|s| s.rx_queue);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(50) {
        let now = socket.state().map(|s| s.rx_queue);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let came = pump(&client, Duration::from_secs(2), || rec.texts(conn).iter().any(|t| t == "second"));
    let texts = rec.texts(conn);
    close(conn, 1000, "");
    let _ = final_within(&client, &rec, conn, Duration::from_secs(5));
    server.join().unwrap();
    assert!(held, "the server's bytes never reached the client's socket");
    assert!(last.is_some_and(|n| n >= 16), "the I/O thread read past the urgent mark before the host dispatched");
    eprintln!("held urgent: {} messages, the last {:?}", texts.len(), texts.last());
    assert_eq!(texts.len(), if came { 12 } else { 11 }, "{texts:?}");
    came
}

/// KNOWN LIMITATION, ignored (with reading on dispatch off; with it on, see the next test): the message behind a TCP urgent byte is never
/// read: the I/O task's read stopped short at the urgent mark (a recv stops there), its
/// readiness was cleared (src/wire/watch.rs, `Watch::poll_read`: "a read shorter than asked
/// drained the socket"), and no new data came (README: no message lost; with the keepalive
/// on, the message waits for its ping's pong, 30 s by default).
///
/// Not fixed: the I/O thread learns nothing from a short read at the mark (tokio's readiness
/// for reading does not carry EPOLLPRI), and asking the socket after every short read would
/// cost every connection a system call per read for a peer that sends TCP urgent data, which
/// no WebSocket server has a reason to do. The message waits for the peer's next bytes (the
/// pong to the keepalive ping at the latest); the host's reads (reading on dispatch, the
/// default, from a connection's second message) see EPOLLPRI and read past the mark.
#[test]
#[ignore = "known limitation: the I/O thread's short read at a TCP urgent mark (see the doc comment)"]
fn a_message_behind_a_tcp_urgent_byte_is_delivered_without_reading_on_dispatch() {
    assert!(urgent_held_case(), "the message behind a short read that did not drain the socket never came (2 s)");
}

/// FAILED before the fix: with reading on dispatch (the default), the same: the host's short read at the
/// urgent mark ends its reading (src/wire/mod.rs, `Receiving::poll_recv` sets `drained` on
/// any read shorter than asked; src/host/reading.rs stops at `from.drained()`), the second
/// message stays in the socket and no edge comes for it: the descriptor is not readable and
/// the message arrives only when the watchdog takes the reading back, ~200 ms later (README:
/// the descriptor "never misses" a wake-up; the socket joins it "so that the server's data
/// wakes the host's loop directly").
#[test]
fn a_message_behind_a_tcp_urgent_byte_is_delivered_at_once_with_reading_on_dispatch() {
    let (first, second) = urgent_case(true);
    assert!(first.is_some(), "the first message never came");
    let second = second.expect("the second message never came (2 s)");
    assert!(
        second < Duration::from_millis(90),
        "the second message came {second:?} after the host started dispatching: the host's short read at the \
         urgent mark left it in the socket until the watchdog took the reading back"
    );
}

// ---- 5. endings racing the hand-over ------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Ending {
    Close,
    Fin,
    Reset,
    ReservedOpcode,
    ClientCloseFromAnotherThread,
}

/// One connection: a first message, then (once the host has it) the second message, the one
/// after which the I/O task hands its reading over, and right behind it, in the same segment
/// or a moment later, the connection's end. Every message arrives once, in order, then exactly
/// one final callback with the status the ending calls for.
fn ending_race(ending: Ending, same_segment: bool, seed: u64) {
    let what = format!("{ending:?}, same segment {same_segment}, seed {seed}");
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        peer.send(&frame(FIN | TEXT, b"one"));
        // The host's dispatch of "one" is what the client's message for it says.
        let f = peer.read_frame().expect("the host's answer to one");
        assert_eq!(f.payload, reply_to(b"one"));
        let mut rng = Rng(seed);
        let mut bytes = frame(FIN | TEXT, b"two");
        let tail = match ending {
            Ending::Close => close_frame(1000, "end"),
            Ending::ReservedOpcode => frame(FIN | 0x3, b"x"),
            _ => Vec::new(),
        };
        if same_segment {
            bytes.extend_from_slice(&tail);
            peer.send(&bytes);
        } else {
            peer.send(&bytes);
            // A moment later: around the hand-over (spin, no sleep: microseconds).
            let spin = Instant::now();
            let micros = rng.below(400);
            while spin.elapsed() < Duration::from_micros(micros) {
                std::hint::spin_loop();
            }
            if !tail.is_empty() {
                peer.send(&tail);
            }
        }
        match ending {
            Ending::Fin => {
                let _ = peer.stream.shutdown(std::net::Shutdown::Write);
                let _ = peer.read_to_end();
            }
            Ending::Reset => reset(peer.stream),
            _ => {
                let (frames, _) = peer.read_until_close();
                if let Some(code) = frames.last().and_then(Frame::close_code) {
                    if !matches!(ending, Ending::Close) {
                        // The client started the close: the server finishes it.
                        let _ = peer.stream.write_all(&close_frame(code, "ok"));
                    }
                }
                let _ = peer.read_to_end();
            }
        }
    });
    let client = Client::new();
    let host = Host { reply: AtomicBool::new(true), ..Default::default() };
    let options = options_with(|_| {});
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    let closer = if matches!(ending, Ending::ClientCloseFromAnotherThread) {
        let conn2 = conn;
        let rec_ptr = &host.rec as *const Recorder as usize;
        Some(std::thread::spawn(move || {
            let rec = unsafe { &*(rec_ptr as *const Recorder) };
            // As soon as "one" has been dispatched (the server sends "two" then).
            let deadline = Instant::now() + DEADLINE;
            while rec.texts(conn2).is_empty() {
                assert!(Instant::now() < deadline);
                std::hint::spin_loop();
            }
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_micros(seed % 300) {
                std::hint::spin_loop();
            }
            close(conn2, 1000, "bye")
        }))
    } else {
        None
    };
    assert!(final_within(&client, &host.rec, conn, Duration::from_secs(10)).is_some(), "{what}: no final callback");
    if let Some(closer) = closer {
        let status = closer.join().unwrap();
        assert!(matches!(status, WsStatus::Ok | WsStatus::Gone | WsStatus::Closing), "{what}: ws_close {status:?}");
    }
    server.join().unwrap();
    // Nothing after the final callback (a few more dispatches).
    pump(&client, Duration::from_millis(30), || false);
    let events = host.rec.of(conn);
    let texts = host.rec.texts(conn);
    let finals: Vec<_> = events.iter().filter(|e| e.is_final()).cloned().collect();
    assert_eq!(finals.len(), 1, "{what}: {events:?}");
    assert!(events.last().unwrap().is_final(), "{what}: an event after the final one: {events:?}");
    match ending {
        Ending::Close => {
            assert_eq!(texts, ["one", "two"], "{what}");
            assert_eq!(finals[0], Ev::Close(conn, 1000, "end".into()), "{what}");
        }
        Ending::Fin => {
            assert_eq!(texts, ["one", "two"], "{what}");
            assert!(matches!(finals[0], Ev::Error(_, WsStatus::ConnectionLost, _)), "{what}: {:?}", finals[0]);
        }
        Ending::Reset => {
            // (A reset right behind the data: the client may find the reset first.)
            assert!(texts == ["one"] || texts == ["one", "two"], "{what}: {texts:?}");
            assert!(matches!(finals[0], Ev::Error(_, WsStatus::ConnectionLost, _)), "{what}: {:?}", finals[0]);
        }
        Ending::ReservedOpcode => {
            assert_eq!(texts, ["one", "two"], "{what}");
            assert!(matches!(finals[0], Ev::Error(_, WsStatus::Protocol, _)), "{what}: {:?}", finals[0]);
        }
        Ending::ClientCloseFromAnotherThread => {
            // "two" may come before the close or not at all (the close raced it), never twice.
            assert!(texts == ["one"] || texts == ["one", "two"], "{what}: {texts:?}");
            assert!(matches!(finals[0], Ev::Close(_, 1000, _)), "{what}: {:?}", finals[0]);
        }
    }
}

/// Every ending, in the segment of the second message or microseconds after it, 12 times
/// each with different delays.
#[test]
fn endings_racing_the_hand_over_deliver_everything_then_one_final_callback() {
    for ending in
        [Ending::Close, Ending::Fin, Ending::Reset, Ending::ReservedOpcode, Ending::ClientCloseFromAnotherThread]
    {
        for seed in 1..=12u64 {
            ending_race(ending, seed % 3 == 0, seed * 7919);
        }
    }
}

// ---- 6. two clients, one host loop, streams paced in microseconds --------------------------------

/// A server that, once the client's socket is with the host's thread, streams `n` small
/// messages (1 to 200 bytes, text and binary), each after a pause of 0 to 60 µs (spun, so
/// that data keeps arriving while the host's reads return short), with a ping every 97
/// messages; its own reader counts the pongs. Returns (pings sent, pongs seen).
fn paced_server(n: usize, seed: u64, go: mpsc::Receiver<()>) -> (String, std::thread::JoinHandle<(usize, usize)>) {
    serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        go.recv().unwrap();
        let mut reader = peer.stream.try_clone().unwrap();
        let pongs = std::thread::spawn(move || {
            let mut pongs = 0;
            while let Ok(f) = read_frame_from(&mut reader) {
                match f.opcode {
                    PONG => pongs += 1,
                    CLOSE => break,
                    _ => {}
                }
            }
            pongs
        });
        let mut rng = Rng(seed);
        let mut pings = 0;
        for i in 0..n {
            peer.send(&paced_message(i));
            if i % 97 == 96 {
                peer.send(&frame(FIN | PING, format!("p{i}").as_bytes()));
                pings += 1;
            }
            let spin = Instant::now();
            let pause = Duration::from_micros(rng.below(60));
            while spin.elapsed() < pause {
                std::hint::spin_loop();
            }
        }
        peer.send(&close_frame(1000, "paced"));
        let pongs = pongs.join().unwrap();
        (pings, pongs)
    })
}

fn paced_message(i: usize) -> Vec<u8> {
    let (text, body) = paced(i);
    frame(FIN | if text { TEXT } else { BINARY }, &body)
}

/// Message `i` of a paced stream: (text, bytes).
fn paced(i: usize) -> (bool, Vec<u8>) {
    (i % 2 == 0, numbered(i, 1 + (i * 37) % 200))
}

/// Two clients in one process, their descriptors in one edge-triggered epoll set of the host,
/// each with a server streaming small messages paced in microseconds (data arriving as the
/// host's short reads return), pings among them: every message arrives once and in order,
/// every ping is answered, and the loop never waits STALL without a wake-up while messages are
/// owed.
#[test]
fn two_clients_in_one_edge_triggered_loop_with_microsecond_paced_streams_lose_nothing() {
    let n = 3000;
    let (go1, rx1) = mpsc::channel();
    let (go2, rx2) = mpsc::channel();
    let (url1, server1) = paced_server(n, 21, rx1);
    let (url2, server2) = paced_server(n, 22, rx2);
    let clients = [Client::new(), Client::new()];
    let hosts = [Host::default(), Host::default()];
    let options = options_with(|_| {});
    let conns = [clients[0].connect_with(&url1, options.0), clients[1].connect_with(&url2, options.0)];
    for k in 0..2 {
        watch_host(conns[k], &hosts[k]);
    }
    for client in &clients {
        wait_handed(client, 1, "paced");
    }
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    for (k, client) in clients.iter().enumerate() {
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: k as u64 };
        assert_eq!(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, client.fd(), &mut ev) }, 0);
    }
    go1.send(()).unwrap();
    go2.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut more = [true, true];
    let done = |hosts: &[Host; 2]| (0..2).all(|k| hosts[k].rec.finals(conns[k]) == 1);
    while !done(&hosts) {
        assert!(Instant::now() < deadline, "the streams did not end within a minute");
        if !more[0] && !more[1] {
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 2];
            let got = unsafe { libc::epoll_wait(epfd, evs.as_mut_ptr(), 2, STALL.as_millis() as i32) };
            if got <= 0 {
                assert!(done(&hosts), "no wake-up for {STALL:?} while messages were owed");
                break;
            }
            for ev in &evs[..got as usize] {
                more[ev.u64 as usize] = true;
            }
        }
        for k in 0..2 {
            if more[k] {
                more[k] = clients[k].dispatch().1;
            }
        }
    }
    unsafe { libc::close(epfd) };
    for k in 0..2 {
        let got = payloads(&hosts[k].rec, conns[k]);
        assert_eq!(got.len(), n, "client {k}: messages");
        for (i, m) in got.iter().enumerate() {
            assert!(*m == paced(i), "client {k}: message {i} differs");
        }
        assert_eq!(final_event(&hosts[k].rec, conns[k]), Some(Ev::Close(conns[k], 1000, "paced".into())));
    }
    for (k, server) in [server1, server2].into_iter().enumerate() {
        let (pings, pongs) = server.join().unwrap();
        assert_eq!(pongs, pings, "server {k}: pongs");
    }
}

// ---- 7. the end of the stream right behind the last message ------------------------------------

/// The kernel's TCP_CLOSE_WAIT: the peer's FIN has arrived.
const TCP_CLOSE_WAIT: u8 = 8;

/// A server sends a last small message and ends its side of the stream (a FIN, no close frame;
/// for wss no close_notify either), both reaching the client's socket before the host reads
/// (the socket is with the host's thread). A recv returns the message's bytes and stops at the
/// FIN: a short read, with the end of the stream still to be read and no new edge to come.
/// Returns how long after the host started dispatching the message and the final callback
/// came (None: not within 2 s), and the final event.
fn fin_behind_data_case(on: bool, tls: bool) -> (Option<Duration>, Option<Duration>, Option<Ev>) {
    let (sent_tx, sent_rx) = mpsc::channel::<ClientSocket>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let listener = Listener::bind();
    let (ca_pem, config) = tls_server(&[&rustls::version::TLS13]);
    let url = format!("{}://127.0.0.1:{}/", if tls { "wss" } else { "ws" }, listener.port);
    let server = std::thread::spawn(move || {
        let peer = listener.accept();
        let socket = peer.client_socket();
        let last = frame(FIN | TEXT, b"last");
        if tls {
            let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), peer.stream);
            let request = read_request_from(&mut tls).unwrap();
            tls.write_all(response_to(&request, "").as_bytes()).unwrap();
            flush_tls(&mut tls).unwrap();
            warm_up(&mut tls, false, |tls| flush_tls(tls).unwrap());
            go_rx.recv().unwrap();
            tls.write_all(&last).unwrap();
            flush_tls(&mut tls).unwrap();
            tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
            sent_tx.send(socket).unwrap();
            let mut rest = Vec::new();
            let _ = tls.sock.read_to_end(&mut rest);
        } else {
            let mut peer = peer;
            peer.upgrade();
            warm_up(&mut peer.stream, false, |_| {});
            go_rx.recv().unwrap();
            peer.send(&last);
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            sent_tx.send(socket).unwrap();
            let _ = peer.read_to_end();
        }
    });
    let client = Client::new();
    let options = options_with(|o| {
        set(unsafe { ws_options_set_read_on_dispatch(o, on) });
        set(unsafe { ws_options_set_keepalive(o, 0, 1000) });
        let ca = cstr(ca_pem.to_str().unwrap());
        set(unsafe { ws_options_add_ca_file(o, ca.as_ptr()) });
    });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "the warm-up");
    if on {
        wait_handed(&client, 1, "fin");
    }
    go_tx.send(()).unwrap();
    let socket = sent_rx.recv().unwrap();
    // The message and the FIN are in the client's socket before anyone reads
    // (without reading on dispatch the I/O thread reads at once: nothing to wait for.)
    let arrived = !on || socket.wait_until(|s| s.is_some_and(|s| s.state == TCP_CLOSE_WAIT && s.rx_queue > 0));
    let start = Instant::now();
    let mut times = [None, None];
    pump(&client, Duration::from_secs(2), || {
        if times[0].is_none() && rec.texts(conn).iter().any(|t| t == "last") {
            times[0] = Some(start.elapsed());
        }
        if times[1].is_none() && rec.finals(conn) > 0 {
            times[1] = Some(start.elapsed());
        }
        times.iter().all(Option::is_some)
    });
    let _ = final_within(&client, &rec, conn, Duration::from_secs(5));
    server.join().unwrap();
    let _ = std::fs::remove_file(&ca_pem);
    assert!(arrived, "the message and the FIN never both reached the client's socket");
    let what = format!("{} read_on_dispatch {on}", if tls { "wss" } else { "ws" });
    eprintln!("{what}: message after {:?}, final after {:?}: {:?}", times[0], times[1], final_event(&rec, conn));
    (times[0], times[1], final_event(&rec, conn))
}

fn assert_prompt_end(on: bool, tls: bool) {
    let (message, end, event) = fin_behind_data_case(on, tls);
    let what = format!("{} read_on_dispatch {on}", if tls { "wss" } else { "ws" });
    assert!(message.is_some(), "{what}: the last message never came");
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectionLost, _))), "{what}: {event:?}");
    let end = end.unwrap();
    // The watchdog takes the reading back after 100 ms at the earliest: an end that waited for
    // it was not woken by the descriptor.
    assert!(
        end < Duration::from_millis(90),
        "{what}: the end of the stream, in the socket with the last message, reached the host {end:?} after it \
         started dispatching (the short read that took the message left the FIN unread, and no wake-up came for it)"
    );
}

/// FAILED before the fix: with reading on dispatch (the default), a FIN right behind a server's last message
/// (both in the socket when the host's thread reads) reaches the host only when the watchdog
/// takes the reading back, ~100-200 ms later: the read that took the message was short, so
/// the host's thread assumed the socket drained and never read the end of the stream, and no
/// new edge comes for it (README: the descriptor "never misses" a wake-up).
#[test]
fn a_fin_right_behind_the_last_message_ends_the_connection_at_once() {
    assert_prompt_end(true, false);
}

/// FAILED before the fix: as above over wss (the FIN without close_notify).
#[test]
fn wss_a_fin_right_behind_the_last_message_ends_the_connection_at_once() {
    assert_prompt_end(true, true);
}

/// The control: with reading on dispatch off, the same end is prompt, ws and wss.
#[test]
fn a_fin_right_behind_the_last_message_ends_the_connection_at_once_without_reading_on_dispatch() {
    assert_prompt_end(false, false);
    assert_prompt_end(false, true);
}

/// The same end behind a last message, on one connection of a client whose other connection
/// is busy (its server sends a small message every 2 ms, so the host dispatches all the time
/// and the watchdog never finds it silent). Returns how long the quiet connection's final
/// callback took after the host started dispatching (None: not within 3 s), and that event.
fn fin_beside_a_busy_connection(on: bool, with_reset: bool) -> (Option<Duration>, Option<Ev>) {
    let (sent_tx, sent_rx) = mpsc::channel::<ClientSocket>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (quiet_url, quiet_server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        go_rx.recv().unwrap();
        peer.send(&frame(FIN | TEXT, b"last"));
        let socket = peer.client_socket();
        if with_reset {
            reset(peer.stream);
            sent_tx.send(socket).unwrap();
        } else {
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            sent_tx.send(socket).unwrap();
            let _ = peer.read_to_end();
        }
    });
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (busy_url, busy_server) = serve(move |mut peer| {
        peer.upgrade();
        let mut i = 0;
        while stop_rx.try_recv().is_err() {
            peer.send(&frame(FIN | TEXT, format!("busy{i}").as_bytes()));
            i += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        peer.send(&close_frame(1000, "busy"));
        let _ = peer.read_until_close();
    });
    let client = Client::new();
    let options = read_on_dispatch(on);
    let (quiet_rec, busy_rec) = (Recorder::default(), Recorder::default());
    let quiet = client.connect_with(&quiet_url, options.0);
    let busy = client.connect_with(&busy_url, options.0);
    watch(quiet, &quiet_rec);
    watch(busy, &busy_rec);
    assert!(pump(&client, DEADLINE, || quiet_rec.of(quiet).len() == 3), "the warm-up");
    if on {
        wait_handed(&client, 2, "both connections");
    }
    go_tx.send(()).unwrap();
    let socket = sent_rx.recv().unwrap();
    // (Without reading on dispatch the I/O thread reads at once: nothing to wait for.)
    // (A reset socket leaves the kernel's table: its data came before the reset.)
    let arrived = !on
        || socket.wait_until(|s| match s {
            None => with_reset,
            Some(s) => !with_reset && s.state == TCP_CLOSE_WAIT && s.rx_queue > 0,
        });
    let start = Instant::now();
    let took = final_within(&client, &quiet_rec, quiet, Duration::from_secs(3)).map(|_| start.elapsed());
    let event = final_event(&quiet_rec, quiet);
    stop_tx.send(()).unwrap();
    assert!(final_within(&client, &busy_rec, busy, DEADLINE).is_some(), "the busy connection's end");
    // The quiet connection's end, however late (the keepalive's ping finds it at the latest).
    let _ = final_within(&client, &quiet_rec, quiet, Duration::from_secs(70));
    quiet_server.join().unwrap();
    busy_server.join().unwrap();
    assert!(arrived, "the message and the FIN never both reached the client's socket");
    eprintln!("read_on_dispatch {on}: the quiet connection ended after {took:?}: {event:?}");
    eprintln!("  its events: {:?}", quiet_rec.of(quiet));
    (took, event)
}

/// FAILED before the fix: with reading on dispatch (the default), a connection whose server sends its last
/// message and a FIN never ends (not within 3 s; only the keepalive ping, 30 s later by
/// default, takes the reading back) while another connection of the same client keeps the
/// host dispatching: the short read that took the message left the FIN unread, no edge comes
/// for it, and the watchdog never fires for a host that dispatches. README: each connection
/// gets exactly one final callback; the descriptor never misses a wake-up.
#[test]
fn a_fin_behind_the_last_message_ends_the_connection_while_another_keeps_the_host_busy() {
    let (took, event) = fin_beside_a_busy_connection(true, false);
    assert!(took.is_some(), "the quiet connection's end never reached the host within 3 s");
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectionLost, _))), "{event:?}");
}

/// The control: without reading on dispatch the same end is prompt.
#[test]
fn a_fin_behind_the_last_message_beside_a_busy_connection_without_reading_on_dispatch() {
    for with_reset in [false, true] {
        let (took, event) = fin_beside_a_busy_connection(false, with_reset);
        assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectionLost, _))), "reset {with_reset}: {event:?}");
        assert!(took.is_some_and(|t| t < Duration::from_millis(500)), "reset {with_reset}: {took:?}");
    }
}

/// FAILED before the fix: as above with a reset (SO_LINGER 0) instead of a FIN right behind the last message:
/// the read that took the message was short, the pending reset is never read while the
/// other connection keeps the host dispatching.
#[test]
fn a_reset_behind_the_last_message_ends_the_connection_while_another_keeps_the_host_busy() {
    let (took, event) = fin_beside_a_busy_connection(true, true);
    assert!(took.is_some(), "the quiet connection's end never reached the host within 3 s");
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectionLost, _))), "{event:?}");
}

/// A server crashes in the middle of a message: a frame header announcing 100 bytes, 10 of
/// them, then its FIN, both in the socket before the host reads. The host is timer-driven: it
/// calls ws_dispatch every 10 ms without waiting on the descriptor (a game loop), so the
/// watchdog never finds it silent. Returns how long the final callback took (None: not
/// within 2 s) and the final event.
fn crash_mid_message_timer_host(on: bool) -> (Option<Duration>, Option<Ev>) {
    let (sent_tx, sent_rx) = mpsc::channel::<ClientSocket>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        go_rx.recv().unwrap();
        let mut partial = header(FIN | TEXT, 100);
        partial.extend_from_slice(b"0123456789");
        // Named before the FIN: a client that reads it at once closes its socket, and the
        // addresses are then gone (ENOTCONN, seen with reading on dispatch off).
        let socket = peer.client_socket();
        peer.send(&partial);
        peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
        sent_tx.send(socket).unwrap();
        let _ = peer.read_to_end();
    });
    let client = Client::new();
    let options = read_on_dispatch(on);
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "the warm-up");
    if on {
        wait_handed(&client, 1, "crash");
    }
    go_tx.send(()).unwrap();
    let socket = sent_rx.recv().unwrap();
    let arrived = !on || socket.wait_until(|s| s.is_some_and(|s| s.state == TCP_CLOSE_WAIT && s.rx_queue > 0));
    let start = Instant::now();
    let mut took = None;
    while start.elapsed() < Duration::from_secs(2) {
        client.dispatch();
        if rec.finals(conn) > 0 {
            took = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let event = final_event(&rec, conn);
    // However late, it ends once the host stops dispatching (the watchdog).
    let _ = final_within(&client, &rec, conn, Duration::from_secs(70));
    server.join().unwrap();
    assert!(arrived, "the partial frame and the FIN never both reached the client's socket");
    eprintln!("read_on_dispatch {on}: final after {took:?}: {event:?}");
    (took, event)
}

/// FAILED before the fix: with reading on dispatch (the default), a server that crashes mid-message (a partial
/// frame then its FIN in the socket together) never ends the connection for a host that
/// dispatches every 10 ms on a timer: the host's short read took the partial frame, took the
/// socket for drained, and never reads the FIN; the watchdog never fires for a host that
/// dispatches (README: "Each connection gets exactly one final callback"; the descriptor
/// "never misses" a wake-up). With the default keepalive it ends at the keepalive's ping, 30 s
/// later.
#[test]
fn a_server_crashing_mid_message_ends_the_connection_for_a_timer_driven_host() {
    let (took, event) = crash_mid_message_timer_host(true);
    assert!(took.is_some(), "no final callback within 2 s of dispatching every 10 ms: {event:?}");
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectionLost, _))), "{event:?}");
}

/// The control: without reading on dispatch it ends at once.
#[test]
fn a_server_crashing_mid_message_ends_the_connection_for_a_timer_driven_host_without_reading_on_dispatch() {
    let (took, event) = crash_mid_message_timer_host(false);
    assert!(took.is_some_and(|t| t < Duration::from_millis(500)), "{took:?}: {event:?}");
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectionLost, _))), "{event:?}");
}
