//! Reading on the dispatching thread (README "Threading contract", `ws_options_set_read_on_dispatch`):
//! a request/reply round trip wakes the host's thread only, not the library's I/O thread; with
//! the option off the I/O thread reads every message again; a host that stops dispatching gets
//! its connections' reading taken back, so a server's ping is answered within the bound the
//! README states.
//!
//! One test function runs the cases one after the other: they count the I/O thread's context
//! switches, and that thread serves every connection of the process.

mod common;

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

const ROUND_TRIPS: usize = 2000;

/// Voluntary context switches so far of this process's I/O thread(s).
fn io_thread_switches() -> u64 {
    let mut switches = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != "wsclient-io" {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:")).unwrap();
        switches += line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
    }
    switches
}

/// A peer that answers every text frame with a reply of `reply_len` bytes; ends with the
/// client's close.
fn replying_peer(reply_len: usize) -> (String, std::thread::JoinHandle<usize>) {
    serve(move |mut p| {
        p.upgrade();
        let reply = frame(FIN | TEXT, &vec![b'r'; reply_len]);
        let mut echoed = 0;
        loop {
            let Ok(f) = p.read_frame() else { return echoed };
            match f.opcode {
                TEXT => {
                    p.send(&reply);
                    echoed += 1;
                }
                CLOSE => {
                    p.send(&close_frame(1000, ""));
                    return echoed;
                }
                _ => {}
            }
        }
    })
}

/// Counts replies; sends the next request from inside the callback until ROUND_TRIPS.
struct PingPong {
    replies: AtomicUsize,
}

unsafe extern "C" fn next_request(conn: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    let this = &*(user as *const PingPong);
    if this.replies.fetch_add(1, Ordering::SeqCst) + 1 < ROUND_TRIPS {
        assert_eq!(send_text(conn, "request"), WsStatus::Ok);
    }
}

/// ROUND_TRIPS request/reply round trips (replies of `reply_len` bytes) driven by a host loop
/// (poll on the descriptor, then ws_dispatch); returns the I/O thread's voluntary context
/// switches during them.
fn round_trips(read_on_dispatch: bool, reply_len: usize) -> u64 {
    let (url, peer) = replying_peer(reply_len);
    let client = Client::new();
    let options = no_keepalive();
    set(unsafe { ws_options_set_read_on_dispatch(options.0, read_on_dispatch) });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let pingpong = PingPong { replies: AtomicUsize::new(0) };
    set(ws_on_message(conn, Some(next_request), user(&pingpong)));
    let before = io_thread_switches();
    assert_eq!(send_text(conn, "request"), WsStatus::Ok);
    let done = || pingpong.replies.load(Ordering::SeqCst) >= ROUND_TRIPS;
    assert!(pump(&client, Duration::from_secs(60), done), "{} round trips", pingpong.replies.load(Ordering::SeqCst));
    let switches = io_thread_switches() - before;
    watch(conn, &rec);
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    assert!(pump(&client, Duration::from_secs(10), || rec.finals(conn) > 0), "{:?}", rec.events());
    drop(client);
    assert_eq!(peer.join().unwrap(), ROUND_TRIPS);
    switches
}

/// A connection in request/reply (so its reading is with the host), then the host stops
/// dispatching right after a dispatch, and the peer pings at once: the pong comes within the
/// README's bound, however long the host stays away; the messages sent meanwhile wait for the
/// host and arrive whole, in order.
fn ping_while_the_host_is_away() -> Duration {
    let (url, peer) = serve(|mut p| {
        p.upgrade();
        // Request/reply until the client says "away".
        loop {
            let f = p.read_frame().expect("a request");
            if f.opcode == TEXT && f.payload == b"away" {
                break;
            }
            p.send(&frame(FIN | TEXT, &f.payload));
        }
        let sent = Instant::now();
        p.send(&frame(FIN | TEXT, b"one"));
        p.send(&frame(FIN | PING, b"are you there"));
        p.send(&frame(FIN | TEXT, b"two"));
        let pong = loop {
            let f = p.read_timeout(Duration::from_secs(10)).read_frame().expect("the pong");
            if f.opcode == PONG {
                assert_eq!(f.payload, b"are you there");
                break sent.elapsed();
            }
        };
        let _ = p.read_timeout(Duration::from_secs(10)).read_until_close();
        p.send(&close_frame(1000, ""));
        pong
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(&url, no_keepalive().0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    for i in 0..50 {
        assert_eq!(send_text(conn, &format!("r{i}")), WsStatus::Ok);
        assert!(pump(&client, Duration::from_secs(10), || rec.texts(conn).len() > i), "{:?}", rec.events());
    }
    assert_eq!(send_text(conn, "away"), WsStatus::Ok);
    // The host is away (busy elsewhere) until the peer has its pong; it checks every 10 ms.
    let peer_done = || peer.is_finished() || rec.texts(conn).len() > 50;
    let away = Instant::now();
    while !peer_done() && away.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(rec.texts(conn).len(), 50, "nothing was dispatched while the host was away");
    assert!(pump(&client, Duration::from_secs(10), || rec.texts(conn).len() == 52), "{:?}", rec.events());
    assert_eq!(rec.texts(conn)[50..], ["one".to_owned(), "two".to_owned()]);
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    assert!(pump(&client, Duration::from_secs(10), || rec.finals(conn) > 0), "{:?}", rec.events());
    drop(client);
    peer.join().unwrap()
}

#[test]
fn a_round_trip_wakes_only_the_host_and_a_host_away_leaves_no_ping_unanswered() {
    let on = round_trips(true, 64);
    let off = round_trips(false, 64);
    // Replies of 16 KiB are still read on the dispatching thread; one byte more, by the I/O
    // thread (the requests are small either way: the host's thread writes them).
    let largest = round_trips(true, 16 << 10);
    let larger = round_trips(true, (16 << 10) + 1);
    eprintln!(
        "I/O thread's voluntary switches over {ROUND_TRIPS} round trips: read on dispatch {on}, off {off}; replies \
         of 16 KiB {largest}, of 16 KiB + 1 {larger}"
    );
    // With the option off, the I/O thread wakes for (nearly) every reply: the count can fail
    // the check below (it does not sleep when the next reply is there before it would).
    assert!(off >= ROUND_TRIPS as u64 / 4, "the I/O thread slept only {off} times over {ROUND_TRIPS} round trips");
    // On, it wakes only for its watchdog's ticks (100 ms) and the hand-over.
    if cfg!(all(target_os = "linux", not(feature = "pipe-wake"))) {
        assert!(on < ROUND_TRIPS as u64 / 10, "the I/O thread woke {on} times over {ROUND_TRIPS} round trips");
        assert!(largest < ROUND_TRIPS as u64 / 10, "16 KiB replies: the I/O thread woke {largest} times");
        assert!(larger >= ROUND_TRIPS as u64 / 4, "16 KiB + 1 replies: the I/O thread slept only {larger} times");
    } else {
        assert!(on >= ROUND_TRIPS as u64 / 4, "no reading on dispatch where the descriptor is a pipe: {on}");
    }
    let pong = ping_while_the_host_is_away();
    eprintln!("pong after {pong:?} while the host was away");
    assert!(pong < Duration::from_millis(400), "the ping waited {pong:?} for a host that was away");
}
