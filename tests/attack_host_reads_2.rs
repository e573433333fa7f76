//! Second round of attacks on reading sockets on the host's thread (`ws_client_fd()` is an
//! epoll instance holding the eventfd and, while the host's thread has their reading, the
//! sockets of open connections; `ws_dispatch` reads them).
//!
//! Whether a connection's reading is with the host's thread is seen from outside the library:
//! /proc/self/fdinfo of `ws_client_fd()` lists what that epoll instance watches (the eventfd
//! alone, or the eventfd and the sockets handed over). Every test asserts a documented bound or
//! outcome (README "Threading contract", "Flow control and memory bounds", the options table;
//! include/wsclient.h on ws_client_fd, ws_dispatch, ws_client_free, the read buffer); the only
//! sleeps are a host busy elsewhere on purpose, and pauses that shape a peer's traffic.

mod common;

use std::ffi::c_void;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

/// How long a host loop may wait for a wake-up that an event owes it.
const STALL: Duration = Duration::from_millis(1500);
/// How long a ping may wait for its answer while the host is behind.
const PONG_BOUND: Duration = Duration::from_secs(1);

// ---- what the host's descriptor watches ------------------------------------------------------

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn readable_now(fd: i32) -> bool {
    readable(fd, Duration::ZERO)
}

/// A masked client frame's payload is read by `read_frame_from`; this makes a text frame.
fn text_frame(s: &str) -> Vec<u8> {
    frame(FIN | TEXT, s.as_bytes())
}

/// Records messages in order (kind, bytes), replies to each text `m<i>` with `r<i>` when asked.
#[derive(Default)]
struct Host {
    rec: Recorder,
    reply: AtomicBool,
}

unsafe extern "C" fn host_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let host = &*(user as *const Host);
    on_message(conn, data, len, kind, (&host.rec as *const Recorder).cast_mut().cast());
    if host.reply.load(Ordering::Relaxed) {
        let body = std::slice::from_raw_parts(data, len);
        let mut answer = b"r".to_vec();
        answer.extend_from_slice(&body[..body.len().min(12)]);
        assert_eq!(send_binary(conn, &answer), WsStatus::Ok);
    }
}

fn watch_host(conn: WsConn, host: &Host) {
    watch(conn, &host.rec);
    let user = host as *const Host as *mut c_void;
    assert_eq!(ws_on_message(conn, Some(host_message), user), WsStatus::Ok);
}

/// The messages a connection received, the warm-up messages left out.
fn payloads(rec: &Recorder, conn: WsConn) -> Vec<Vec<u8>> {
    rec.of(conn)
        .into_iter()
        .filter_map(|e| match e {
            Ev::Text(_, b) | Ev::Binary(_, b) if !b.starts_with(WARM_UP) => Some(b),
            _ => None,
        })
        .collect()
}

/// What warm-up messages start with.
const WARM_UP: &[u8] = b"warm-up";

/// The I/O task hands its reading to the host's thread from a connection's second message on
/// (README): a peer that wants the socket handed over right away sends two warm-up messages
/// first (`payloads` leaves them out); `replies`: the host answers each, read them here.
fn warm_up<S: std::io::Read + std::io::Write>(stream: &mut S, replies: bool, flush: impl Fn(&mut S)) {
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

/// A message of exactly `len` bytes whose first bytes name it (`m<i>.`), the rest a pattern.
fn numbered(i: usize, len: usize) -> Vec<u8> {
    let mut out = format!("m{i}.").into_bytes();
    out.truncate(len);
    while out.len() < len {
        out.push(b'a' + (out.len() % 26) as u8);
    }
    out
}

// ---- 1. descriptors: every ending of a handed connection, many cycles --------------------------

#[derive(Clone, Copy, Debug)]
enum Ending {
    ClientClose,
    ServerClose,
    ServerFin,
    ServerReset,
    ClientFree,
}

/// One connection per ending, each handed to the host's thread before it ends: the socket
/// leaves the host's descriptor when the connection ends, and after 40 cycles (new clients
/// and a long-lived one) the process holds the descriptors it held before (README:
/// ws_client_free leaves nothing of the client).
#[test]
fn handed_connections_leave_no_descriptor_behind_whatever_ends_them() {
    if !in_child("handed_connections_leave_no_descriptor_behind_whatever_ends_them", &[]) {
        return;
    }
    let endings =
        [Ending::ClientClose, Ending::ServerClose, Ending::ServerFin, Ending::ServerReset, Ending::ClientFree];
    // A first cycle starts what the library starts once (runtime pieces, resolver) before the count.
    let cycle = |client: Option<&Client>, ending: Ending, i: usize| {
        let own;
        let client = match client {
            Some(c) => c,
            None => {
                own = Client::new();
                &own
            }
        };
        let (tx, rx) = mpsc::channel::<()>();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            warm_up(&mut peer.stream, true, |_| {});
            peer.send(&text_frame(&format!("m{i}")));
            let reply = peer.read_frame().expect("the reply");
            assert_eq!(reply.payload, format!("rm{i}").into_bytes());
            rx.recv().unwrap();
            match ending {
                Ending::ServerClose => {
                    peer.send(&close_frame(1000, "bye"));
                    let _ = peer.read_until_close();
                }
                Ending::ServerFin => peer.stream.shutdown(std::net::Shutdown::Write).unwrap(),
                Ending::ServerReset => {
                    reset(peer.stream);
                    return;
                }
                Ending::ClientClose => {
                    let (frames, _) = peer.read_until_close();
                    assert_eq!(frames.last().and_then(Frame::close_code), Some(1000));
                    peer.send(&close_frame(1000, ""));
                }
                Ending::ClientFree => {}
            }
            let _ = peer.read_to_end();
        });
        let host = Host { reply: AtomicBool::new(true), ..Default::default() };
        let options = options_with(|_| {});
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, &host);
        pump(client, Duration::from_secs(10), || !payloads(&host.rec, conn).is_empty());
        wait_handed(client, 1, &format!("cycle {i} ({ending:?}), after a message"));
        tx.send(()).unwrap();
        match ending {
            // While the host's thread has its reading: the client is freed as the cycle ends.
            Ending::ClientFree => {}
            Ending::ClientClose => {
                assert_eq!(close(conn, 1000, "done"), WsStatus::Ok);
                client.run_until_final(&host.rec, conn);
            }
            _ => client.run_until_final(&host.rec, conn),
        }
        let expected_final = match ending {
            Ending::ClientClose => Some(Ev::Close(conn, 1000, String::new())),
            Ending::ServerClose => Some(Ev::Close(conn, 1000, "bye".into())),
            _ => None,
        };
        if expected_final.is_some() {
            assert_eq!(final_event(&host.rec, conn), expected_final, "cycle {i} ({ending:?})");
        } else if !matches!(ending, Ending::ClientFree) {
            let status = match final_event(&host.rec, conn) {
                Some(Ev::Error(_, status, _)) => Some(status),
                _ => None,
            };
            assert_eq!(status, Some(WsStatus::ConnectionLost), "cycle {i} ({ending:?})");
        }
        if !matches!(ending, Ending::ClientFree) {
            assert_eq!(host.rec.finals(conn), 1);
            assert_eq!(
                sockets_handed(client),
                0,
                "cycle {i} ({ending:?}): the ended connection's socket is still watched"
            );
        }
        (server, matches!(ending, Ending::ClientFree))
    };
    let warm = Client::new();
    let (server, _) = cycle(Some(&warm), Ending::ClientClose, 0);
    server.join().unwrap();
    drop(warm);
    let before = open_fds();
    let long_lived = Client::new();
    for i in 1..=40 {
        let ending = endings[i % endings.len()];

        if i % 2 == 0 && !matches!(ending, Ending::ClientFree) {
            let (server, _) = cycle(Some(&long_lived), ending, i);
            server.join().unwrap();
        } else {
            // A client of its own, freed at the end of the cycle (ClientFree: while handed).
            let (server, _) = cycle(None, ending, i);
            server.join().unwrap();
        }
    }
    assert_eq!(long_lived.dispatch().0, 0);
    drop(long_lived);
    let after = open_fds();
    assert_eq!(after, before, "descriptors before 40 cycles: {before}, after: {after}");
}

// ---- 2. memory: the read buffer of the host's thread --------------------------------------------

/// README: ws_client_free "returns within 250 ms, with nothing of the client left"; the read
/// buffer "exists only while received bytes wait to be parsed: an idle connection holds none"
/// (header). A connection with a 16 MiB read buffer whose small messages the host's thread
/// read, closed by the client (the I/O task takes the reading back, so the host's thread does
/// not read again), its client freed: the heap is back where it was (within 1 MiB). Fails as
/// of 0cef559: the host's read leaves its drained buffer in the host thread's own spare
/// (`SPARE_BUFFER`, src/io/reader.rs), which nothing frees while that thread lives.
#[test]
fn a_freed_client_leaves_no_read_buffer_on_the_host_thread() {
    if !in_child("a_freed_client_leaves_no_read_buffer_on_the_host_thread", &[]) {
        return;
    }
    let exchange = |read_buffer: usize| {
        let client = Client::new();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            for i in 0..20 {
                peer.send(&text_frame(&format!("m{i}")));
                peer.read_frame().expect("the reply");
            }
            // The client closes (its I/O task takes the reading back), the server answers.
            let (frames, _) = peer.read_until_close();
            assert_eq!(frames.last().map(|f| f.opcode), Some(CLOSE));
            peer.send(&close_frame(1000, ""));
            let _ = peer.read_to_end();
        });
        let options =
            options_with(|o| assert_eq!(unsafe { ws_options_set_read_buffer_size(o, read_buffer) }, WsStatus::Ok));
        let host = Host { reply: AtomicBool::new(true), ..Default::default() };
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, &host);
        wait_handed(&client, 1, "after the open");
        pump(&client, Duration::from_secs(10), || payloads(&host.rec, conn).len() == 20);
        assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
        client.run_until_final(&host.rec, conn);
        assert_eq!(payloads(&host.rec, conn).len(), 20);
        server.join().unwrap();
        eprintln!("read buffer {read_buffer}: heap with the connection ended {:.2} MiB", heap_in_use() as f64 / MIB);
        drop(client);
    };
    // The same exchange with the default buffer first: what the process keeps for good.
    exchange(64 << 10);
    exchange(64 << 10);
    let before = heap_in_use();
    exchange(16 << 20);
    let after = heap_in_use();
    let grown = after as f64 - before as f64;
    eprintln!("heap before {:.2} MiB, after {:.2} MiB", before as f64 / MIB, after as f64 / MIB);
    assert!(
        grown < MIB,
        "a freed client left {:.2} MiB on the heap (its 16 MiB read buffer, kept by the host's thread?)",
        grown / MIB
    );
}

// ---- 3. every kind of host loop, request/reply ---------------------------------------------------

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
    epoll: Option<Epoll>,
}

impl Waiter {
    fn new(wait: Wait, fd: i32) -> Waiter {
        let epoll = matches!(wait, Wait::EpollLevel | Wait::EpollEdge).then(|| {
            let epoll = Epoll::new();
            epoll.add(fd, 1, matches!(wait, Wait::EpollEdge));
            epoll
        });
        Waiter { wait, fd, epoll }
    }

    /// Waits at most `timeout`; whether the fd was reported readable.
    fn wait(&self, timeout: Duration) -> bool {
        let ms = timeout.as_millis() as i32;
        unsafe {
            match self.wait {
                Wait::EpollLevel | Wait::EpollEdge => self.epoll.as_ref().is_some_and(|e| e.woken(timeout)),
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

/// Request/reply (the server waits for each reply before the next message), small messages
/// and messages of 16 KiB - 1, 16 KiB and 16 KiB + 1 among them: a loop waiting on ws_client_fd()
/// with epoll (level- and edge-triggered), poll() and select() gets every wake-up (README: it
/// never misses one), every message arrives whole and in order, and after the last exchange a
/// dispatch that took everything leaves the descriptor unreadable (header, ws_client_fd).
#[test]
fn request_reply_under_every_kind_of_wait_misses_no_wake_up() {
    for wait in [Wait::EpollEdge, Wait::EpollLevel, Wait::Poll, Wait::Select] {
        let sizes = |i: usize| match i % 10 {
            3 => (16 << 10) - 1,
            5 => 16 << 10,
            7 => (16 << 10) + 1,
            _ => 1 + i % 200,
        };
        let rounds = 400;
        let (tx_done, rx_done) = mpsc::channel::<()>();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            for i in 0..rounds {
                peer.send(&frame(FIN | BINARY, &numbered(i, sizes(i))));
                let reply = peer.read_frame().expect("the reply");
                assert_eq!(
                    reply.payload[..],
                    [b"r".as_slice(), &numbered(i, sizes(i))[..sizes(i).min(12)]].concat()[..]
                );
            }
            rx_done.recv().unwrap();
            peer.send(&close_frame(1000, "done"));
            let _ = peer.read_until_close();
        });
        let client = Client::new();
        let waiter = Waiter::new(wait, client.fd());
        let host = Host { reply: AtomicBool::new(true), ..Default::default() };
        let options = options_with(|_| {});
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, &host);
        let what = format!("{wait:?}");
        host_loop(&client, &waiter, &what, || payloads(&host.rec, conn).len() == rounds);
        let got = payloads(&host.rec, conn);
        for (i, m) in got.iter().enumerate() {
            assert!(m == &numbered(i, sizes(i)), "{what}: message {i} differs (len {})", m.len());
        }
        // The server waits now: once a dispatch took everything, the descriptor is unreadable
        // (one spurious wake-up at most: the replies written meanwhile may show one).
        wait_handed(&client, 1, &what);
        client.dispatch();
        let (ran, more) = client.dispatch();
        assert_eq!((ran, more), (0, false), "{what}");
        assert!(!readable_now(client.fd()), "{what}: the descriptor is readable after a dispatch that took everything");
        tx_done.send(()).unwrap();
        host_loop(&client, &waiter, &what, || host.rec.finals(conn) == 1);
        assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, "done".into())), "{what}");
        server.join().unwrap();
    }
}

// ---- 4. frames at 16 KiB and at the read buffer's size -----------------------------------------

/// Frames of 16 KiB - 1, 16 KiB and 16 KiB + 1 (text and binary), each sent alone or trickled a
/// byte at a time, with read buffers of 256 B, exactly one such frame with its header (16 KiB +
/// 4 B) and one byte either side, and 64 KiB: every message arrives whole, in order, with its
/// kind.
#[test]
fn frames_at_16_kib_and_at_the_read_buffer_size_arrive_whole() {
    let sizes = [(16 << 10) - 1, 16 << 10, (16 << 10) + 1, 125, 126, 0];
    for read_buffer in [256, (16 << 10) + 3, (16 << 10) + 4, (16 << 10) + 5, 64 << 10] {
        let mut frames = Vec::new();
        let mut expected = Vec::new();
        for (k, &len) in sizes.iter().enumerate() {
            for text in [false, true] {
                let body = numbered(frames.len(), len);
                frames.push(frame(FIN | if text { TEXT } else { BINARY }, &body));
                expected.push((text, body, k % 2 == 0));
            }
        }
        let count = frames.len();
        let trickles: Vec<bool> = expected.iter().map(|e| e.2).collect();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            for (f, trickle) in frames.iter().zip(trickles) {
                if trickle && f.len() < 300 {
                    for b in f {
                        peer.send(&[*b]);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                } else if trickle {
                    // Cut around the header and the middle, with pauses.
                    for piece in [&f[..1], &f[1..4], &f[4..f.len() / 2], &f[f.len() / 2..]] {
                        peer.send(piece);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                } else {
                    peer.send(f);
                }
                peer.read_frame().expect("the reply");
            }
            peer.send(&close_frame(1000, ""));
            let _ = peer.read_until_close();
        });
        let client = Client::new();
        let host = Host { reply: AtomicBool::new(true), ..Default::default() };
        let options =
            options_with(|o| assert_eq!(unsafe { ws_options_set_read_buffer_size(o, read_buffer) }, WsStatus::Ok));
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, &host);
        client.run_until_final(&host.rec, conn);
        let got: Vec<(bool, Vec<u8>)> = host
            .rec
            .of(conn)
            .into_iter()
            .filter_map(|e| match e {
                Ev::Text(_, b) => Some((true, b)),
                Ev::Binary(_, b) => Some((false, b)),
                _ => None,
            })
            .collect();
        assert_eq!(got.len(), count, "read buffer {read_buffer}");
        for (i, ((text, body), (etext, ebody, _))) in got.iter().zip(&expected).enumerate() {
            assert!(
                text == etext && body == ebody,
                "read buffer {read_buffer}: message {i} (len {}) differs",
                ebody.len()
            );
        }
        assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, String::new())));
        server.join().unwrap();
    }
}

// ---- 5. a host that stops dispatching after the open ---------------------------------------------

/// The host dispatches the open, then is busy elsewhere for good: pings are answered within
/// 1 s (the I/O thread takes the reading back), the idle connection then costs no CPU, and
/// what the server sent meanwhile (then a FIN) is delivered whole and in order, followed by one
/// WS_STATUS_CONNECTION_LOST, once the host dispatches again.
#[test]
fn a_host_that_stops_dispatching_after_the_open_leaves_no_ping_unanswered_and_costs_no_cpu() {
    if !in_child("a_host_that_stops_dispatching_after_the_open_leaves_no_ping_unanswered_and_costs_no_cpu", &[]) {
        return;
    }
    let (go, wait_go) = mpsc::channel::<()>();
    let (pongs_tx, pongs_rx) = mpsc::channel::<Vec<Duration>>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, false, |_| {});
        wait_go.recv().unwrap();
        let mut delays = Vec::new();
        for i in 0..3u8 {
            // Pings at different distances from the last dispatch (about 0, 150 and 400 ms).
            std::thread::sleep(Duration::from_millis([0, 150, 250][i as usize]));
            let sent = Instant::now();
            peer.send(&frame(FIN | PING, &[i]));
            let pong = peer.read_frame().expect("the pong");
            assert_eq!((pong.opcode, pong.payload.clone()), (PONG, vec![i]));
            delays.push(sent.elapsed());
        }
        pongs_tx.send(delays).unwrap();
        wait_go.recv().unwrap();
        for i in 0..300 {
            peer.send(&text_frame(&format!("m{i}")));
        }
        peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = peer.read_to_end();
    });
    let client = Client::new();
    let host = Host::default();
    let options = options_with(|_| {});
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    wait_handed(&client, 1, "after the warm-up");
    go.send(()).unwrap();
    // The host is busy elsewhere from here on.
    let delays = pongs_rx.recv_timeout(Duration::from_secs(10)).expect("the pongs");
    eprintln!("pongs came after {delays:?}");
    for d in &delays {
        assert!(*d <= PONG_BOUND, "a ping waited {d:?} for its answer while the host did not dispatch");
    }
    let idle = cpu_over_idle_window(None);
    go.send(()).unwrap();
    client.run_until_final(&host.rec, conn);
    let expected: Vec<Vec<u8>> = (0..300).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads(&host.rec, conn), expected);
    assert!(matches!(final_event(&host.rec, conn), Some(Ev::Error(_, WsStatus::ConnectionLost, _))));
    server.join().unwrap();
    assert_idle(&[("a handed connection whose host stopped dispatching", idle)]);
}

// ---- 6. a host that polls around the watchdog's tick --------------------------------------------

/// A host that calls ws_dispatch every 50 to 150 ms without waiting on the fd (around the
/// 100 ms after which the I/O thread takes the reading back), while the server sends bursts of
/// small messages with pings among them: every message arrives once and in order, every ping
/// is answered within 1 s and in order.
#[test]
fn a_host_polling_every_50_to_150_ms_loses_nothing_and_leaves_no_ping_unanswered() {
    let rounds = 30;
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        let mut reader = peer.stream.try_clone().unwrap();
        let (tx, rx) = mpsc::channel::<(u8, Instant)>();
        let pongs = std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            for want in 0..rounds as u8 {
                let f = read_frame_from(&mut reader).expect("a pong");
                assert_eq!((f.opcode, f.payload.clone()), (PONG, vec![want]), "pongs in order");
                let (i, sent) = rx.recv().unwrap();
                assert_eq!(i, want);
                worst = worst.max(sent.elapsed());
            }
            worst
        });
        let mut rng = Rng(0x5eed_1234);
        let mut n = 0;
        for r in 0..rounds {
            for _ in 0..rng.below(20) {
                peer.send(&text_frame(&format!("m{n}")));
                n += 1;
            }
            let sent = Instant::now();
            peer.send(&frame(FIN | PING, &[r as u8]));
            tx.send((r as u8, sent)).unwrap();
            for _ in 0..rng.below(5) {
                peer.send(&text_frame(&format!("m{n}")));
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(20 + rng.below(120)));
        }
        let worst = pongs.join().unwrap();
        peer.send(&close_frame(1000, ""));
        let _ = peer.read_until_close();
        (n, worst)
    });
    let client = Client::new();
    let host = Host::default();
    let options = options_with(|_| {});
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    let mut rng = Rng(77);
    let deadline = Instant::now() + Duration::from_secs(40);
    while host.rec.finals(conn) == 0 {
        assert!(Instant::now() < deadline, "the exchange did not end");
        client.dispatch();
        // The host's loop: busy for 50 to 150 ms between dispatches.
        std::thread::sleep(Duration::from_millis(50 + rng.below(101)));
    }
    let (n, worst) = server.join().unwrap();
    eprintln!("{n} messages; the slowest pong took {worst:?}");
    let expected: Vec<Vec<u8>> = (0..n).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads(&host.rec, conn), expected);
    assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, String::new())));
    assert!(worst <= PONG_BOUND, "a ping waited {worst:?} for its answer");
}

// ---- 7. wss: the server updates its keys while the host's thread reads ---------------------------

/// A TLS 1.3 server that updates its traffic keys (asking the client to update its own) every
/// few messages while the host's thread reads: every message arrives, every reply the client
/// writes afterwards decrypts at the server, and the close handshake completes.
#[test]
fn wss_key_updates_from_the_server_while_the_host_reads_lose_nothing() {
    let identity = TlsIdentity::new();
    let config = Arc::new(identity.server_config());
    let listener = Listener::bind();
    let url = format!("wss://127.0.0.1:{}/", listener.port);
    let identity = Arc::new(identity);
    let id2 = identity.clone();
    let (handed_tx, handed_rx) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let mut tls = id2.accept_with(config, listener.accept());
        let request = read_request_from(&mut tls).unwrap();
        tls.write_all(response_to(&request, "").as_bytes()).unwrap();
        flush_tls(&mut tls).unwrap();
        warm_up(&mut tls, true, |tls| flush_tls(tls).unwrap());
        handed_rx.recv().unwrap();
        for i in 0..60 {
            if i % 5 == 2 {
                tls.conn.refresh_traffic_keys().expect("a key update (TLS 1.3)");
            }
            tls.write_all(&text_frame(&format!("m{i}"))).unwrap();
            flush_tls(&mut tls).unwrap();
            let reply = read_frame_from(&mut tls).expect("the reply, after a key update");
            assert_eq!(reply.payload, format!("rm{i}").into_bytes());
        }
        tls.write_all(&close_frame(1000, "keys")).unwrap();
        flush_tls(&mut tls).unwrap();
        let f = read_frame_from(&mut tls).expect("the close reply");
        assert_eq!(f.opcode, CLOSE);
    });
    let client = Client::new();
    let options = options_with(|o| {
        let ca = cstr(identity.ca_pem.to_str().unwrap());
        assert_eq!(unsafe { ws_options_add_ca_file(o, ca.as_ptr()) }, WsStatus::Ok);
    });
    let host = Host { reply: AtomicBool::new(true), ..Default::default() };
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    wait_handed(&client, 1, "wss after the warm-up");
    handed_tx.send(()).unwrap();
    client.run_until_final(&host.rec, conn);
    assert_eq!(payloads(&host.rec, conn).len(), 60);
    assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, "keys".into())));
    server.join().unwrap();
}

// ---- 8. nested clients -------------------------------------------------------------------------

struct Nested {
    host: Host,
    inner: *mut WsClient,
    nested_runs: AtomicUsize,
}

unsafe extern "C" fn outer_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let nested = &*(user as *const Nested);
    host_message(conn, data, len, kind, (&nested.host as *const Host).cast_mut().cast());
    // A callback of one client dispatches another (its own callbacks run right here).
    let (mut ran, mut more) = (0u32, false);
    assert_eq!(ws_dispatch(nested.inner, &mut ran, &mut more), WsStatus::Ok);
    nested.nested_runs.fetch_add(ran as usize, Ordering::Relaxed);
}

/// Two clients, each streaming request/reply with its server; the outer client's message
/// callback dispatches the inner client: every message of both arrives once, in order, on the
/// dispatching thread, and neither host loop is left without a wake-up.
#[test]
fn a_callback_dispatching_another_client_loses_nothing_on_either() {
    let rounds = 300;
    let script = move |mut peer: Peer| {
        peer.upgrade();
        for i in 0..rounds {
            peer.send(&text_frame(&format!("m{i}")));
            if i % 7 == 0 {
                peer.send(&frame(FIN | PING, b"p"));
            }
            loop {
                let f = peer.read_frame().expect("a reply");
                if f.opcode == BINARY {
                    assert_eq!(f.payload, format!("rm{i}").into_bytes());
                    break;
                }
            }
        }
        peer.send(&close_frame(1000, ""));
        let _ = peer.read_until_close();
    };
    let (url_outer, outer_server) = serve(script);
    let (url_inner, inner_server) = serve(script);
    let outer = Client::new();
    let inner = Client::new();
    let nested = Nested {
        host: Host { reply: AtomicBool::new(true), ..Default::default() },
        inner: inner.0,
        nested_runs: AtomicUsize::new(0),
    };
    let inner_host = Host { reply: AtomicBool::new(true), ..Default::default() };
    let options = options_with(|_| {});
    let c_outer = outer.connect_with(&url_outer, options.0);
    let c_inner = inner.connect_with(&url_inner, options.0);
    watch_host(c_outer, &nested.host);
    assert_eq!(ws_on_message(c_outer, Some(outer_message), &nested as *const Nested as *mut c_void), WsStatus::Ok);
    watch_host(c_inner, &inner_host);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut fds = [
        libc::pollfd { fd: outer.fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: inner.fd(), events: libc::POLLIN, revents: 0 },
    ];
    while nested.host.rec.finals(c_outer) == 0 || inner_host.rec.finals(c_inner) == 0 {
        assert!(Instant::now() < deadline, "the exchanges did not end");
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, STALL.as_millis() as i32) };
        assert!(n > 0, "no wake-up for {STALL:?} while both exchanges were under way");
        if fds[0].revents != 0 {
            outer.dispatch();
        }
        if fds[1].revents != 0 {
            inner.dispatch();
        }
    }
    let expected: Vec<Vec<u8>> = (0..rounds).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads(&nested.host.rec, c_outer), expected);
    assert_eq!(payloads(&inner_host.rec, c_inner), expected);
    let me = std::thread::current().id();
    for rec in [&nested.host.rec, &inner_host.rec] {
        assert!(rec.threads.lock().unwrap().iter().all(|t| *t == me), "a callback ran on another thread");
    }
    eprintln!("{} inner callbacks ran nested", nested.nested_runs.load(Ordering::Relaxed));
    outer_server.join().unwrap();
    inner_server.join().unwrap();
}

// ---- 9. flow control from another thread while the host's thread reads --------------------------

struct Held {
    host: Host,
    /// Message callbacks started since flow control was last turned on (by the other thread).
    since_hold: AtomicUsize,
    holding: AtomicBool,
}

unsafe extern "C" fn held_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let held = &*(user as *const Held);
    if held.holding.load(Ordering::SeqCst) {
        held.since_hold.fetch_add(1, Ordering::SeqCst);
    }
    host_message(conn, data, len, kind, (&held.host as *const Host).cast_mut().cast());
}

/// Another thread turns flow control on while the host's thread reads a stream of small
/// messages, lets a while pass, completes and turns it off, again and again. README: once
/// ws_set_flow_control(conn, true) has returned on another thread, at most one message
/// callback starts before the hold; nothing is lost or reordered.
#[test]
fn flow_control_toggled_from_another_thread_while_the_host_reads_holds_after_at_most_one_message() {
    let total = 20_000;
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        let mut batch = Vec::new();
        for i in 0..total {
            batch.extend_from_slice(&text_frame(&format!("m{i}")));
            if i % 50 == 49 {
                peer.send(&batch);
                batch.clear();
                if i % 1000 == 999 {
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        }
        peer.send(&batch);
        peer.send(&close_frame(1000, ""));
        let _ = peer.read_until_close();
    });
    let client = Client::new();
    let held =
        Arc::new(Held { host: Host::default(), since_hold: AtomicUsize::new(0), holding: AtomicBool::new(false) });
    let options = options_with(|_| {});
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &held.host);
    assert_eq!(ws_on_message(conn, Some(held_message), Arc::as_ptr(&held) as *mut c_void), WsStatus::Ok);
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let toggler = {
        let (held, stop, violations) = (held.clone(), stop.clone(), violations.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(99);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_micros(200 + rng.below(3000)));
                if ws_set_flow_control(conn, true) != WsStatus::Ok {
                    return;
                }
                held.since_hold.store(0, Ordering::SeqCst);
                held.holding.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(500 + rng.below(5000)));
                let started = held.since_hold.load(Ordering::SeqCst);
                if started > 1 {
                    violations.lock().unwrap().push(started);
                }
                held.holding.store(false, Ordering::SeqCst);
                if ws_set_flow_control(conn, false) != WsStatus::Ok {
                    return;
                }
                let _ = ws_message_complete(conn);
            }
        })
    };
    client.run_until_final(&held.host.rec, conn);
    stop.store(true, Ordering::SeqCst);
    toggler.join().unwrap();
    server.join().unwrap();
    let expected: Vec<Vec<u8>> = (0..total).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads(&held.host.rec, conn).len(), total);
    assert_eq!(payloads(&held.host.rec, conn), expected);
    let violations = violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "message callbacks started after ws_set_flow_control(true) returned: {violations:?}"
    );
}

// ---- 10. ws_client_free at every moment ---------------------------------------------------------

/// A stream of small messages; the client is freed after 0 to 12 dispatches (the host's thread
/// reading, between reads, with the watchdog about to take the reading back): ws_client_free
/// returns within 250 ms (+250 ms for a shared machine), and the server sees the connection end.
#[test]
fn ws_client_free_at_every_moment_of_a_handed_stream_is_prompt_and_ends_the_connection() {
    for k in 0..24 {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            let mut reader = peer.stream.try_clone().unwrap();
            let ended = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
            let mut i = 0;
            while !stop2.load(Ordering::Relaxed) {
                if peer.stream.write_all(&text_frame(&format!("m{i}"))).is_err() {
                    break;
                }
                i += 1;
                if i % 16 == 0 {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            ended.join().unwrap();
        });
        let client = Client::new();
        let host = Host::default();
        let options = options_with(|_| {});
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, &host);
        pump(&client, Duration::from_secs(10), || !payloads(&host.rec, conn).is_empty());
        for _ in 0..k % 13 {
            client.wait_readable(Duration::from_millis(20));
            client.dispatch();
        }
        if k % 3 == 0 {
            // Freed while the watchdog finds the host silent, now or soon.
            std::thread::sleep(Duration::from_millis(80 + (k as u64 % 5) * 10));
        }
        let start = Instant::now();
        let status = unsafe { ws_client_free(client.0) };
        let took = start.elapsed();
        std::mem::forget(client);
        assert_eq!(status, WsStatus::Ok);
        assert!(took <= Duration::from_millis(500), "case {k}: ws_client_free took {took:?}");
        assert_eq!(unsafe { ws_send(conn, b"x".as_ptr().cast(), 1) }, WsStatus::Gone);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }
}

// ---- 11. keepalive with tiny intervals on a handed connection -----------------------------------

/// Keepalive every 5 ms (timeout 200 ms) on a connection the host's thread reads: while the
/// server answers every ping and sends a small message every 3 ms for a second, the connection
/// lives (options table: silence only counts when nothing arrives); then, once the server
/// stops answering and sending, WS_STATUS_KEEPALIVE_TIMEOUT comes no earlier than interval +
/// timeout after the last message, and within 1 s more.
#[test]
fn keepalive_every_5_ms_on_a_handed_connection_lives_while_answered_and_times_out_when_not() {
    let answering2 = Arc::new(AtomicBool::new(true));
    let (last_tx, last_rx) = mpsc::channel::<Instant>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        let writer = Arc::new(Mutex::new(peer.stream.try_clone().unwrap()));
        let mut reader = peer.stream.try_clone().unwrap();
        let pongs_writer = writer.clone();
        let answering = answering2.clone();
        let pings = std::thread::spawn(move || {
            let mut pings = 0;
            while let Ok(f) = read_frame_from(&mut reader) {
                if f.opcode == PING {
                    pings += 1;
                    if answering.load(Ordering::SeqCst) {
                        let _ = pongs_writer.lock().unwrap().write_all(&frame(FIN | PONG, &f.payload));
                    }
                }
            }
            pings
        });
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(1) {
            writer.lock().unwrap().write_all(&text_frame(&format!("m{i}"))).unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(3));
        }
        answering2.store(false, Ordering::SeqCst);
        let last = Instant::now();
        last_tx.send(last).unwrap();
        (i, pings.join().unwrap())
    });
    let client = Client::new();
    let host = Host::default();
    let options = options_with(|o| assert_eq!(unsafe { ws_options_set_keepalive(o, 5, 200) }, WsStatus::Ok));
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    let mut handed_seen = false;
    let ok = pump(&client, Duration::from_secs(20), || {
        handed_seen |= sockets_handed(&client) > 0;
        host.rec.finals(conn) > 0
    });
    assert!(ok, "the connection never ended");
    let ended = Instant::now();
    let last = last_rx.recv().unwrap();
    let (sent, pings) = server.join().unwrap();
    eprintln!("{sent} messages, {pings} pings; ended {:?} after the last message", ended - last);
    let expected: Vec<Vec<u8>> = (0..sent).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads(&host.rec, conn), expected);
    assert!(handed_seen, "the host's thread never had the reading");
    match final_event(&host.rec, conn) {
        Some(Ev::Error(_, WsStatus::KeepaliveTimeout, _)) => {}
        other => panic!("expected a keepalive timeout once the server went silent, got {other:?}"),
    }
    let since = ended - last;
    // `last` is taken by the server just after its last write: the client may have read it a
    // little before. Early by more than 5 ms would be early.
    assert!(since >= Duration::from_millis(200), "the keepalive timeout came {since:?} after the last message");
    assert!(since <= Duration::from_millis(1205), "the keepalive timeout came {since:?} after the last message");
}

// ---- 12. large sends while the host's thread reads ----------------------------------------------

/// The host sends 40 messages of 100 KiB (written by the I/O task, the socket filling: the
/// task takes the reading back while its writes block) while the server streams small
/// messages with pings among them and reads slowly: every message arrives whole and in order
/// both ways, every ping is answered, in order (README: every ping is answered as long as the
/// server reads).
#[test]
fn large_sends_while_the_host_reads_small_messages_lose_nothing_either_way() {
    let big = 40;
    let small = 3000;
    let listener = Listener::bind_receive_buffer(64 << 10);
    let (url, server) = serve_on(listener, move |mut peer| {
        peer.upgrade();
        let mut reader = peer.stream.try_clone().unwrap();
        let (all_bigs, got_all_bigs) = mpsc::channel::<()>();
        let reading = std::thread::spawn(move || {
            let (mut bigs, mut pongs) = (Vec::new(), Vec::new());
            while let Ok(f) = read_frame_from(&mut reader) {
                match f.opcode {
                    PONG => pongs.push(f.payload),
                    BINARY => {
                        bigs.push(f.payload);
                        if bigs.len() == big {
                            let _ = all_bigs.send(());
                        }
                        // A slow reader: the client's writes block now and then.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    CLOSE => break,
                    _ => {}
                }
            }
            (bigs, pongs)
        });
        let mut pings = 0u32;
        for i in 0..small {
            peer.send(&text_frame(&format!("m{i}")));
            if i % 50 == 0 {
                peer.send(&frame(FIN | PING, &pings.to_be_bytes()));
                pings += 1;
            }
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The close only once the client's sends are all in: a close earlier would end them
        // (seen under AddressSanitizer, which slows the client more than this server).
        let _ = got_all_bigs.recv_timeout(Duration::from_secs(60));
        peer.send(&close_frame(1000, ""));
        let (bigs, pongs) = reading.join().unwrap();
        (bigs, pongs, pings)
    });
    let client = Client::new();
    let host = Host::default();
    let options = options_with(|_| {});
    let conn = client.connect_with(&url, options.0);
    watch_host(conn, &host);
    let body = |i: usize| -> Vec<u8> { (0..100 << 10).map(|k| (k * 7 + i) as u8).collect() };
    pump(&client, Duration::from_secs(10), || !payloads(&host.rec, conn).is_empty());
    for i in 0..big {
        assert_eq!(send_binary(conn, &body(i)), WsStatus::Ok);
        client.wait_readable(Duration::from_millis(5));
        client.dispatch();
    }
    client.run_until_final(&host.rec, conn);
    let (bigs, pongs, pings) = server.join().unwrap();
    let expected: Vec<Vec<u8>> = (0..small).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads(&host.rec, conn), expected);
    assert_eq!(final_event(&host.rec, conn), Some(Ev::Close(conn, 1000, String::new())));
    assert_eq!(bigs.len(), big, "large messages the server got");
    for (i, b) in bigs.iter().enumerate() {
        assert!(*b == body(i), "large message {i} differs");
    }
    let want: Vec<Vec<u8>> = (0..pings).map(|p| p.to_be_bytes().to_vec()).collect();
    assert_eq!(pongs, want, "every ping answered, in order");
}

// ---- 13. many clients, idle --------------------------------------------------------------------

/// Twelve clients, one connection each, handed to the host's thread, the host waiting on all
/// twelve descriptors with poll(): over an idle window the I/O threads and the process use no
/// CPU (README: idle connections cost nothing); then a message to each still arrives.
#[test]
fn twelve_idle_clients_with_handed_connections_cost_no_cpu() {
    if !in_child("twelve_idle_clients_with_handed_connections_cost_no_cpu", &[]) {
        return;
    }
    let n = 12;
    let mut go = Vec::new();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    let hosts: Vec<Host> = (0..n).map(|_| Host::default()).collect();
    let options = options_with(|_| {});
    let mut conns = Vec::new();
    for (k, host) in hosts.iter().enumerate() {
        let (tx, rx) = mpsc::channel::<()>();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            warm_up(&mut peer.stream, false, |_| {});
            rx.recv().unwrap();
            peer.send(&text_frame(&format!("late{k}")));
            peer.send(&close_frame(1000, ""));
            let _ = peer.read_until_close();
        });
        let client = Client::new();
        let conn = client.connect_with(&url, options.0);
        watch_host(conn, host);
        wait_handed(&client, 1, &format!("client {k}"));
        go.push(tx);
        servers.push(server);
        clients.push(client);
        conns.push(conn);
    }
    let mut fds: Vec<libc::pollfd> =
        clients.iter().map(|c| libc::pollfd { fd: c.fd(), events: libc::POLLIN, revents: 0 }).collect();
    let mut host_loop = |limit: Duration, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + limit;
        while !done() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now()).as_millis() as i32;
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, left.min(50)) } > 0 {
                for (pfd, client) in fds.iter().zip(&clients) {
                    if pfd.revents != 0 {
                        client.dispatch();
                    }
                }
            }
        }
    };
    let (io, process) = (io_threads_cpu(), process_cpu());
    host_loop(IDLE_WINDOW, &|| false);
    let idle = (io_threads_cpu() - io, process_cpu() - process);
    for tx in &go {
        tx.send(()).unwrap();
    }
    host_loop(Duration::from_secs(20), &|| conns.iter().zip(&hosts).all(|(c, h)| h.rec.finals(*c) > 0));
    for (k, (conn, host)) in conns.iter().zip(&hosts).enumerate() {
        assert_eq!(payloads(&host.rec, *conn), vec![format!("late{k}").into_bytes()]);
        assert_eq!(final_event(&host.rec, *conn), Some(Ev::Close(*conn, 1000, String::new())));
    }
    for s in servers {
        s.join().unwrap();
    }
    assert_idle(&[("twelve idle clients, handed, the host waiting with poll()", idle)]);
}
