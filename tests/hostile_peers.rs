//! Peers that misbehave, against what the README and include/wsclient.h promise (issue 9).
//!
//! Each test is one way a hostile or slow peer (or a slow host) can try to make a documented
//! promise false, and asserts the documented bound, measured from outside the library: the
//! kernel's view of the client's socket, CPU time of the I/O threads, the process's heap,
//! resident and virtual size, or whether the process survives at all. Tests whose figures
//! would be disturbed by other tests, or which may kill their process, run in a child process
//! of their own (`in_child`).
//!
//! The peer is tests/common/hostile.rs. Tests wait for events (callbacks, what the peer reads,
//! what the kernel shows of the client's socket); the only fixed durations are the idle windows
//! over which CPU is measured and the bounds being asserted, each several times what a correct
//! implementation needs. Every wait has a deadline, so a broken library makes a test fail, not
//! hang.

mod common;

use std::ffi::c_void;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

// ---- host-side helpers ------------------------------------------------------------------------

/// Dispatches (as a host's event loop does) until `done` holds or `limit` has passed; returns
/// whether it held.
fn pump(client: &Client, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if client.wait_readable(left.min(Duration::from_millis(20))) {
            client.dispatch();
        }
    }
}

/// Dispatches until `conn`'s open callback ran.
fn wait_open(client: &Client, rec: &Recorder, conn: WsConn) {
    assert!(
        pump(client, DEADLINE, || rec.of(conn).contains(&Ev::Open(conn)) || rec.finals(conn) > 0),
        "the connection never opened"
    );
    assert_eq!(rec.of(conn).first(), Some(&Ev::Open(conn)), "{:?}", rec.of(conn));
}

/// Dispatches until `conn`'s final callback, at most `limit`; returns the time it took, or
/// None if it did not come.
fn final_within(client: &Client, rec: &Recorder, conn: WsConn, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    pump(client, limit, || rec.finals(conn) > 0).then(|| start.elapsed())
}

fn last_event(rec: &Recorder, conn: WsConn) -> Option<Ev> {
    rec.of(conn).last().cloned()
}

fn final_status(rec: &Recorder, conn: WsConn) -> Option<WsStatus> {
    match last_event(rec, conn) {
        Some(Ev::Error(_, status, _)) => Some(status),
        _ => None,
    }
}

fn set(status: WsStatus) {
    assert_eq!(status, WsStatus::Ok, "{}", last_error());
}

/// How long an idle window lasts while CPU is measured; and the share of it an idle library
/// may use (a correct one uses none: it sleeps in epoll).
const IDLE_WINDOW: Duration = Duration::from_millis(1500);
const IDLE_CPU_SHARE: f64 = 0.10;

/// CPU used over one idle window by the library's I/O threads and by the whole process, while
/// the host waits on the fd and dispatches whenever it is readable (as a host's loop does).
fn cpu_over_idle_window(client: Option<&Client>) -> (Duration, Duration) {
    let (io, process) = (io_threads_cpu(), process_cpu());
    match client {
        Some(client) => {
            pump(client, IDLE_WINDOW, || false);
        }
        // A host busy elsewhere: it does not dispatch at all.
        None => std::thread::sleep(IDLE_WINDOW),
    }
    (io_threads_cpu() - io, process_cpu() - process)
}

/// Asserts that every window was idle (after printing all of them).
fn assert_idle(windows: &[(&str, (Duration, Duration))]) {
    let limit = IDLE_WINDOW.mul_f64(IDLE_CPU_SHARE);
    for (what, (io, process)) in windows {
        eprintln!("{what}: the I/O threads used {io:?} and the process {process:?} of CPU in {IDLE_WINDOW:?}");
    }
    for (what, (io, process)) in windows {
        assert!(
            *io <= limit && *process <= limit * 2,
            "{what}: the library busy-waits: its I/O threads used {io:?} of CPU (the process {process:?}) \
             in an idle window of {IDLE_WINDOW:?} (allowed {limit:?})"
        );
    }
}

/// Options with keepalive pings off (tests that hold a peer silent must not be ended by them).
fn no_keepalive() -> Options {
    let options = Options::new();
    set(unsafe { ws_options_set_keepalive(options.0, 0, 1000) });
    options
}

/// Queues `n` binary messages of 1 MiB.
fn queue_mebibytes(conn: WsConn, n: usize) {
    let mib = vec![0x5a_u8; 1 << 20];
    for _ in 0..n {
        assert_eq!(send_binary(conn, &mib), WsStatus::Ok, "{}", last_error());
    }
}

// ---- 1. nothing busy-waits ---------------------------------------------------------------------

/// Issue 9.1. README: "Nothing may busy-wait, ever" (issue) and, for the library, "I/O and TLS
/// run on the library's own thread". A peer that does not read while the host uploads 20 MiB:
/// once the client's writes are blocked, its I/O thread must sleep until the socket is
/// writable, also when the host queues one more message meanwhile (every upload to a slower
/// peer does that).
#[test]
fn blocked_writes_do_not_spin_when_the_host_sends_more() {
    if !in_child("blocked_writes_do_not_spin_when_the_host_sends_more", &[]) {
        return;
    }
    let (socket_tx, socket_rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let (url, peer) = serve_on(Listener::bind_small_receive_buffer(), move |mut p| {
        p.upgrade();
        socket_tx.send(p.client_socket()).unwrap();
        // Reads nothing until released; then everything, to check that nothing was lost.
        let _ = released.recv_timeout(PEER_TIMEOUT);
        let (frames, _) = p.read_until_close();
        if frames.last().is_some_and(|f| f.opcode == CLOSE) {
            p.send(&close_frame(1000, ""));
        }
        frames.iter().map(|f| (f.opcode, f.payload.len())).collect::<Vec<_>>()
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    // Queued before the open: the I/O task takes all 20 at once after the handshake.
    queue_mebibytes(conn, 20);
    let socket = socket_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    wait_open(&client, &rec, conn);
    assert!(socket.wait_blocked_writing(64 << 10), "the client's writes never blocked: {:?}", socket.state());

    let blocked = cpu_over_idle_window(Some(&client));
    assert_eq!(send_text(conn, "one more"), WsStatus::Ok);
    let blocked_with_one_more = cpu_over_idle_window(Some(&client));
    assert_idle(&[("writes blocked", blocked), ("writes blocked, one more message queued", blocked_with_one_more)]);

    release.send(()).unwrap();
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    let mut expected = vec![(BINARY, 1 << 20); 20];
    expected.extend([(TEXT, 8), (CLOSE, 2)]);
    assert_eq!(peer.join().unwrap(), expected, "what the peer received");
}

/// Issue 9.1, the receiving side: the host does not dispatch, the receive queue is full and the
/// peer keeps sending. The library stops reading (README: "a connection stops reading its
/// socket once 1 MiB of received messages waits") and must then sleep, not poll.
#[test]
fn a_full_receive_queue_does_not_spin() {
    if !in_child("a_full_receive_queue_does_not_spin", &[]) {
        return;
    }
    let (socket_tx, socket_rx) = mpsc::channel();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        socket_tx.send(p.client_socket()).unwrap();
        // 1 KiB messages until the client stops reading and the peer's write times out.
        let wire: Vec<u8> = (0..64).flat_map(|_| frame(FIN | BINARY, &[1; 1024])).collect();
        p.stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        while p.stream.write_all(&wire).is_ok() {}
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let socket = socket_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    // The host is busy elsewhere from now on: it does not dispatch.
    assert!(socket.wait_not_reading(64 << 10), "the client never stopped reading: {:?}", socket.peer_state());
    assert_idle(&[("receive queue full, host not dispatching", cpu_over_idle_window(None))]);
    drop(client);
    peer.join().unwrap();
}

/// Issue 9.1 with flow control: the host holds a message (README: "meanwhile the library does
/// not read the socket") while the peer keeps sending; the host's loop keeps running.
#[test]
fn a_held_message_does_not_spin() {
    if !in_child("a_held_message_does_not_spin", &[]) {
        return;
    }
    let (socket_tx, socket_rx) = mpsc::channel();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        socket_tx.send(p.client_socket()).unwrap();
        let wire: Vec<u8> = (0..64).flat_map(|_| frame(FIN | BINARY, &[1; 1024])).collect();
        p.stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        while p.stream.write_all(&wire).is_ok() {}
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    set(ws_set_flow_control(conn, true));
    let socket = socket_rx.recv_timeout(PEER_TIMEOUT).unwrap();
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() >= 2), "the first message never came");
    assert!(socket.wait_not_reading(64 << 10), "the client never stopped reading: {:?}", socket.peer_state());
    assert_idle(&[("a message held by flow control", cpu_over_idle_window(Some(&client)))]);
    assert_eq!(rec.of(conn).len(), 2, "one message at a time");
    drop(client);
    peer.join().unwrap();
}
