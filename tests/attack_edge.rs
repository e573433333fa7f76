//! Attacks on ws_client_set_fd_edge_triggered (include/wsclient.h; README "Threading contract"):
//! a host whose loop watches ws_client_fd() edge-triggered (epoll EPOLLET) and says so "is woken
//! once each time callbacks become pending after a dispatch took them all", never misses a
//! wake-up, and its ws_dispatch "leaves the descriptor as it is"; ws_run "is unaffected (it
//! resets the descriptor)" and must not spin; where the descriptor is a pipe (`pipe-wake`) it is
//! "reset anyway"; the call is allowed from "any thread, also inside callbacks; in force from
//! the next dispatch".
//!
//! Every host loop here is an EPOLLET loop that dispatches exactly once per wake-up, whatever
//! more_pending says. A stall is 2 s without a wake-up while callbacks were pending: found by
//! dispatching after the timeout (a level-triggered poll cannot tell: in declared mode the
//! descriptor stays readable by design).
//!
//! Traffic comes from raw peers driven by the client's own messages (see `commanded_peer`),
//! so that each burst begins only after the previous one was dispatched: every burst is a new
//! "callbacks become pending after a dispatch took them all".

mod common;

use std::ffi::c_void;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

/// The build's wake-up descriptor is a pipe (reset by every dispatch), not an eventfd.
const PIPE: bool = cfg!(feature = "pipe-wake");

/// How long the loop waits before it checks whether it missed a wake-up.
const STALL: Duration = Duration::from_secs(2);

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The eventfd's counter as the kernel shows it (/proc/self/fdinfo; nothing is read from the
/// descriptor itself). None for a pipe.
fn eventfd_count(fd: i32) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let line = info.lines().find(|l| l.starts_with("eventfd-count:"))?;
    Some(u64::from_str_radix(line["eventfd-count:".len()..].trim(), 16).unwrap())
}

/// Bytes waiting in the pipe (FIONREAD: nothing is read); 0 for an eventfd.
fn pipe_bytes(fd: i32) -> usize {
    if PIPE {
        unread_bytes(fd)
    } else {
        0
    }
}

fn declare(client: *mut WsClient, edge_triggered: bool) {
    assert_eq!(unsafe { ws_client_set_fd_edge_triggered(client, edge_triggered) }, WsStatus::Ok);
}

fn dispatch_raw(client: *mut WsClient) -> (u32, bool) {
    let (mut ran, mut more) = (0u32, false);
    let status = unsafe { ws_dispatch(client, &mut ran, &mut more) };
    assert_eq!(status, WsStatus::Ok, "dispatch: {}", last_error());
    (ran, more)
}

// ---- the host's loop ---------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    wakeups: u64,
    spurious: u64,
    /// The loop waited STALL while callbacks were pending.
    stalls: Vec<String>,
    /// Declared dispatches that reset the eventfd (its counter went down).
    resets: Vec<String>,
}

/// An EPOLLET loop over `clients` (each declared edge-triggered by the caller, or toggled): one
/// ws_dispatch per wake-up of a client's descriptor, whatever more_pending says, until `done`
/// or `limit`. `check_counter`: record any dispatch after which an eventfd's counter went down
/// (a declared dispatch must leave it as it is). `after_wake(i)` runs after each wake-up's
/// dispatches (i counts them from 0).
fn et_loop(
    clients: &[*mut WsClient],
    check_counter: bool,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    mut after_wake: impl FnMut(u64),
) -> Vec<Stats> {
    let epoll = Epoll::new();
    for (k, client) in clients.iter().enumerate() {
        epoll.add(unsafe { ws_client_fd(*client) }, k as u64, true);
    }
    let mut stats: Vec<Stats> = clients.iter().map(|_| Stats::default()).collect();
    let mut counters: Vec<Option<u64>> = clients.iter().map(|c| eventfd_count(unsafe { ws_client_fd(*c) })).collect();
    let mut check = |k: usize, stats: &mut Vec<Stats>, what: &str| {
        if !check_counter {
            return;
        }
        let now = eventfd_count(unsafe { ws_client_fd(clients[k]) });
        if let (Some(before), Some(after)) = (counters[k], now) {
            if after < before && stats[k].resets.len() < 10 {
                stats[k].resets.push(format!("{what}: the eventfd's counter went from {before} to {after}"));
            }
        }
        counters[k] = now;
    };
    let deadline = Instant::now() + limit;
    let mut wakes = 0u64;
    while !done() {
        assert!(Instant::now() < deadline, "the host loop ran out of time ({limit:?}): {stats:?}");
        let mut woken = epoll.wait(STALL);
        if woken.is_empty() {
            // An edge that came right at the timeout is a late wake-up, not a missed one.
            woken = epoll.wait(Duration::ZERO);
        }
        if woken.is_empty() {
            for (k, client) in clients.iter().enumerate() {
                let (ran, more) = dispatch_raw(*client);
                check(k, &mut stats, "after a stall");
                if ran > 0 {
                    let s = &mut stats[k];
                    s.stalls.push(format!(
                        "client {k}, after {} wake-ups: {STALL:?} without a wake-up while {ran} callbacks were \
                         pending (more: {more})",
                        s.wakeups
                    ));
                }
            }
            continue;
        }
        for token in woken {
            let k = token as usize;
            stats[k].wakeups += 1;
            let (ran, _) = dispatch_raw(clients[k]);
            if ran == 0 {
                stats[k].spurious += 1;
            }
            check(k, &mut stats, "a declared dispatch");
        }
        after_wake(wakes);
        wakes += 1;
    }
    stats
}

fn assert_no_stalls(stats: &[Stats]) {
    for (k, s) in stats.iter().enumerate() {
        eprintln!("client {k}: {} wake-ups, {} spurious, stalls {:?}", s.wakeups, s.spurious, s.stalls);
    }
    for (k, s) in stats.iter().enumerate() {
        assert!(s.stalls.is_empty(), "client {k}: missed wake-ups: {:?}", s.stalls);
        assert!(s.resets.is_empty(), "client {k}: declared dispatches reset the descriptor: {:?}", s.resets);
    }
}

// ---- the peer ----------------------------------------------------------------------------------

/// Messages "000000 ...", numbered over the connection's life from `from`, as one write.
fn messages(from: u64, n: u64) -> Vec<u8> {
    (from..from + n).flat_map(|i| frame(FIN | TEXT, format!("{i:06} payload of a burst").as_bytes())).collect()
}

/// A peer that does what the client's text frames ask ("verb N"): `burst N` sends N messages in
/// one write; `trickle N` sends them in chunks of 1 to 64 with pauses of 0 to 200 µs; `close N`
/// sends N then its close frame (code 1000) and reads until the client's; `reset N` sends N
/// then resets the TCP connection; `bad N` sends N then a frame with a reserved opcode; `eof N`
/// sends N then ends the stream without a close frame. Other frames (sends of other threads)
/// are ignored; a close frame from the client is answered. Returns how many messages it sent.
fn commanded(stream: TcpStream, seed: u64) -> u64 {
    stream.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(PEER_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut p = Peer { stream };
    p.upgrade();
    let mut rng = Rng(seed | 1);
    let mut next = 0u64;
    loop {
        let Ok(f) = p.read_frame() else { return next };
        if f.opcode == CLOSE {
            let _ = p.stream.write_all(&close_frame(1000, ""));
            return next;
        }
        if f.opcode != TEXT {
            continue;
        }
        let text = String::from_utf8_lossy(&f.payload).into_owned();
        let mut words = text.split(' ');
        let (Some(verb), Some(Ok(n))) = (words.next(), words.next().map(str::parse::<u64>)) else {
            continue;
        };
        let from = next;
        next += n;
        let ok = match verb {
            "burst" | "close" | "reset" | "bad" | "eof" => p.stream.write_all(&messages(from, n)).is_ok(),
            "trickle" => {
                let mut i = from;
                let mut ok = true;
                while i < from + n && ok {
                    let chunk = (1 + rng.below(64)).min(from + n - i);
                    ok = p.stream.write_all(&messages(i, chunk)).is_ok();
                    i += chunk;
                    std::thread::sleep(Duration::from_micros(rng.below(200)));
                }
                ok
            }
            _ => {
                next -= n;
                continue;
            }
        };
        if !ok {
            return next;
        }
        match verb {
            "close" => {
                let _ = p.stream.write_all(&close_frame(1000, ""));
                let _ = p.read_until_close();
                return next;
            }
            "reset" => {
                reset(p.stream);
                return next;
            }
            "bad" => {
                let _ = p.stream.write_all(&frame(FIN | 0x3, b""));
                let _ = p.read_to_end();
                return next;
            }
            "eof" => {
                let _ = p.stream.shutdown(std::net::Shutdown::Write);
                let _ = p.read_to_end();
                return next;
            }
            _ => {}
        }
    }
}

/// One commanded peer on a port of its own.
/// Connects one connection to each commanded peer (keepalive off), each watched by its tally,
/// under flow control if asked, and sends each peer its first command.
fn connect_commanded(
    client: &Client,
    peers: &[(String, JoinHandle<u64>)],
    tallies: &[Arc<Tally>],
    flow_control: bool,
    first: &str,
) -> Vec<WsConn> {
    let options = no_keepalive();
    peers
        .iter()
        .zip(tallies)
        .map(|((url, _), t)| {
            let c = client.connect_with(url, options.0);
            watch_tally(c, t);
            if flow_control {
                set(ws_set_flow_control(c, true));
            }
            command(c, first);
            c
        })
        .collect()
}

fn commanded_peer(seed: u64) -> (String, JoinHandle<u64>) {
    serve(move |p| commanded(p.stream, seed))
}

/// A server that accepts connections until dropped and serves each with `commanded`.
struct Server {
    url: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<JoinHandle<u64>>>>,
}

impl Server {
    fn start(seed: u64) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://127.0.0.1:{}/", listener.local_addr().unwrap().port());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peers = Vec::new();
            let mut k = 0;
            while !flag.load(Ordering::Acquire) {
                if !readable(listener.as_raw_fd(), Duration::from_millis(50)) {
                    continue;
                }
                let (stream, _) = listener.accept().unwrap();
                k += 1;
                peers.push(std::thread::spawn(move || commanded(stream, seed.wrapping_mul(31).wrapping_add(k))));
            }
            peers
        });
        Server { url, stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let peers = self.thread.take().unwrap().join();
        if !std::thread::panicking() {
            for p in peers.unwrap() {
                p.join().unwrap();
            }
        }
    }
}

// ---- what the host records per connection --------------------------------------------------------

type Hook = Box<dyn Fn(&Tally, WsConn, u64) + Send + Sync>;

/// One connection's messages (checked in order: "000000", "000001", ...) and final callbacks;
/// `hook(tally, conn, index)` runs inside each message callback, after the check.
#[derive(Default)]
struct Tally {
    next: AtomicU64,
    wrong: Mutex<Vec<String>>,
    finals: Mutex<Vec<String>>,
    opened: AtomicBool,
    hook: Option<Hook>,
}

impl Tally {
    fn with(hook: impl Fn(&Tally, WsConn, u64) + Send + Sync + 'static) -> Tally {
        Tally { hook: Some(Box::new(hook)), ..Tally::default() }
    }
    fn got(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }
    fn finals(&self) -> Vec<String> {
        self.finals.lock().unwrap().clone()
    }
    fn ended(&self) -> bool {
        !self.finals.lock().unwrap().is_empty()
    }
    fn wrong(&self) -> Vec<String> {
        self.wrong.lock().unwrap().clone()
    }
}

unsafe extern "C" fn tally_open(_: WsConn, user: *mut c_void) {
    (*(user as *const Tally)).opened.store(true, Ordering::SeqCst);
}

unsafe extern "C" fn tally_message(conn: WsConn, data: *const u8, len: usize, _: WsMessageKind, user: *mut c_void) {
    let tally = &*(user as *const Tally);
    let text = std::str::from_utf8(std::slice::from_raw_parts(data, len)).unwrap_or("");
    let index: u64 = text.get(..6).and_then(|i| i.parse().ok()).unwrap_or(u64::MAX);
    let expected = tally.next.fetch_add(1, Ordering::SeqCst);
    if index != expected {
        let mut wrong = tally.wrong.lock().unwrap();
        if wrong.len() < 10 {
            wrong.push(format!("{text:?} where message {expected} was due"));
        }
    }
    if let Some(hook) = &tally.hook {
        hook(tally, conn, expected);
    }
}

unsafe extern "C" fn tally_close(_: WsConn, code: u16, _: *const std::os::raw::c_char, _: usize, user: *mut c_void) {
    (*(user as *const Tally)).finals.lock().unwrap().push(format!("close {code}"));
}

unsafe extern "C" fn tally_error(_: WsConn, kind: WsStatus, message: *const std::os::raw::c_char, user: *mut c_void) {
    let message = std::ffi::CStr::from_ptr(message).to_string_lossy();
    (*(user as *const Tally)).finals.lock().unwrap().push(format!("error {kind:?}: {message}"));
}

fn watch_tally(conn: WsConn, tally: &Tally) {
    set(ws_on_open(conn, Some(tally_open), user(tally)));
    set(ws_on_message(conn, Some(tally_message), user(tally)));
    set(ws_on_close(conn, Some(tally_close), user(tally)));
    set(ws_on_error(conn, Some(tally_error), user(tally)));
}

fn command(conn: WsConn, text: &str) {
    assert_eq!(send_text(conn, text), WsStatus::Ok, "send {text:?}: {}", last_error());
}

/// A hook that asks for the next round when a round of `per_round` messages is complete:
/// `rounds` rounds in all, alternating burst and trickle, then `last` ("close 0": the peer
/// closes; "": nothing).
fn rounds_hook(rounds: u64, per_round: u64, last: &'static str) -> impl Fn(&Tally, WsConn, u64) + Send + Sync {
    move |_, conn, index| {
        let done = index + 1;
        if done % per_round != 0 {
            return;
        }
        let round = done / per_round;
        if round < rounds {
            let verb = if round % 2 == 0 { "burst" } else { "trickle" };
            command(conn, &format!("{verb} {per_round}"));
        } else if round == rounds && !last.is_empty() {
            command(conn, last);
        }
    }
}

/// Sends from another thread on `conns`, every 0 to 150 µs, `total` at most, until `stop`.
fn sender(conns: Vec<WsConn>, total: usize, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut rng = Rng(99);
        let mut sent = 0;
        while sent < total && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(rng.below(150)));
            let conn = conns[rng.below(conns.len() as u64) as usize];
            if send_text(conn, "noise from another thread") == WsStatus::Ok {
                sent += 1;
            }
        }
        sent
    })
}

fn assert_all_delivered(tallies: &[Arc<Tally>], expected: u64, final_is: &str) {
    for (k, t) in tallies.iter().enumerate() {
        assert!(
            t.got() == expected && t.wrong().is_empty(),
            "connection {k}: {} of {expected} messages; wrong: {:?}; finals: {:?}",
            t.got(),
            t.wrong(),
            t.finals()
        );
        assert_eq!(t.finals(), vec![final_is.to_owned()], "connection {k}: its final callbacks");
    }
}

// ---- 1. bursts far larger than one hand-over, one dispatch per wake-up -----------------------------

/// Header: "your loop is woken once each time callbacks become pending after a dispatch took
/// them all, and ws_dispatch() leaves the descriptor as it is". Eight connections, five rounds
/// of 2,500 messages each (bursts in one write and trickles in small chunks), every round asked
/// for by the callback that ran the last message of the previous one (so every round starts
/// after a dispatch took everything); two connections under flow control, completed at random
/// from another thread; sends from a third thread. An EPOLLET loop that dispatches once per
/// wake-up: no stall, every message in order, and no declared dispatch reset the eventfd.
#[test]
fn declared_loop_one_dispatch_per_wakeup_bursts_beyond_the_batch_on_many_connections() {
    const CONNS: usize = 8;
    const ROUNDS: u64 = 5;
    const PER_ROUND: u64 = 2500;
    let peers: Vec<_> = (0..CONNS).map(|k| commanded_peer(k as u64 + 1)).collect();
    let tallies: Vec<Arc<Tally>> =
        (0..CONNS).map(|_| Arc::new(Tally::with(rounds_hook(ROUNDS, PER_ROUND, "close 0")))).collect();
    let client = Client::new();
    declare(client.0, true);
    let conns = connect_commanded(&client, &peers, &tallies, false, &format!("burst {PER_ROUND}"));
    set(ws_set_flow_control(conns[0], true));
    set(ws_set_flow_control(conns[1], true));
    let stop = Arc::new(AtomicBool::new(false));
    let completer = {
        let (stop, held) = (stop.clone(), [conns[0], conns[1]]);
        std::thread::spawn(move || {
            let mut rng = Rng(4242);
            while !stop.load(Ordering::Relaxed) {
                if rng.below(4) == 0 {
                    std::thread::sleep(Duration::from_micros(rng.below(100)));
                } else {
                    std::thread::yield_now();
                }
                for c in held {
                    ws_message_complete(c);
                }
            }
        })
    };
    let noise = sender(conns.clone(), 3000, stop.clone());
    let stats = et_loop(&[client.0], true, Duration::from_secs(25), || tallies.iter().all(|t| t.ended()), |_| {});
    stop.store(true, Ordering::Relaxed);
    completer.join().unwrap();
    let sent = noise.join().unwrap();
    eprintln!("{sent} sends from another thread; eventfd counter {:?}", eventfd_count(client.fd()));
    assert_no_stalls(&stats);
    assert_all_delivered(&tallies, ROUNDS * PER_ROUND, "close 1000");
    // Where the descriptor is the eventfd itself (no longer on Linux, where it is an epoll
    // instance that every dispatch harvests), its counter never went down.
    if let Some(count) = eventfd_count(client.fd()) {
        assert!(
            count >= stats[0].wakeups,
            "the eventfd's counter ({count}) is below the wake-ups ({}): something reset it",
            stats[0].wakeups
        );
    }
    drop(client);
    for (_, p) in peers {
        p.join().unwrap();
    }
}

// ---- 2. flow control, every message completed from another thread ---------------------------------

/// Each message is completed by another thread after its callback returned (handed over by a
/// channel, completed 0 to 150 µs later): every completion makes the next message pending after
/// the dispatch took everything, from a thread that is neither the host's nor an I/O thread.
/// Three connections, 1,200 messages each in one burst: the EPOLLET loop (one dispatch per
/// wake-up) must be woken for every one of them.
#[test]
fn declared_loop_is_woken_by_each_message_complete_from_another_thread() {
    const CONNS: usize = 3;
    const N: u64 = 1200;
    let peers: Vec<_> = (0..CONNS).map(|k| commanded_peer(k as u64 + 11)).collect();
    let (tx, rx) = mpsc::channel::<WsConn>();
    let tx = Arc::new(Mutex::new(tx));
    let tallies: Vec<Arc<Tally>> = (0..CONNS)
        .map(|_| {
            let tx = tx.clone();
            Arc::new(Tally::with(move |_, conn, index| {
                tx.lock().unwrap().send(conn).unwrap();
                if index + 1 == N {
                    command(conn, "close 0");
                }
            }))
        })
        .collect();
    let client = Client::new();
    declare(client.0, true);
    let conns = connect_commanded(&client, &peers, &tallies, true, &format!("burst {N}"));
    let completer = std::thread::spawn(move || {
        let mut rng = Rng(7);
        let mut refused = Vec::new();
        let mut completed = 0u64;
        while let Ok(conn) = rx.recv_timeout(Duration::from_secs(20)) {
            std::thread::sleep(Duration::from_micros(rng.below(150)));
            match ws_message_complete(conn) {
                WsStatus::Ok => completed += 1,
                other => refused.push(other),
            }
            if completed == CONNS as u64 * N {
                break;
            }
        }
        (completed, refused)
    });
    let stats = et_loop(&[client.0], true, Duration::from_secs(25), || tallies.iter().all(|t| t.ended()), |_| {});
    let (completed, refused) = completer.join().unwrap();
    assert_no_stalls(&stats);
    assert!(refused.is_empty(), "ws_message_complete refused: {refused:?}");
    assert_eq!(completed, CONNS as u64 * N);
    assert_all_delivered(&tallies, N, "close 1000");
    assert!(stats[0].wakeups >= CONNS as u64 * N / 2, "too few wake-ups for one message per completion: {stats:?}");
    drop(conns);
    drop(client);
    for (_, p) in peers {
        p.join().unwrap();
    }
}

// ---- 3. toggling the declaration under traffic ----------------------------------------------------

/// Header: "Any thread, also inside callbacks; in force from the next dispatch". The loop
/// stays EPOLLET while another thread flips the declaration every 0 to 300 µs and callbacks
/// flip it every 97th message (so dispatches alternate between resetting the descriptor and
/// leaving it): whichever a dispatch did, no wake-up may be missed.
#[test]
fn toggling_the_declaration_from_another_thread_and_from_callbacks_misses_no_wake_up() {
    const CONNS: usize = 4;
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 2000;
    let client = Client::new();
    let client_addr = client.0 as usize;
    let peers: Vec<_> = (0..CONNS).map(|k| commanded_peer(k as u64 + 21)).collect();
    let next_round = rounds_hook(ROUNDS, PER_ROUND, "close 0");
    let next_round = Arc::new(next_round);
    let tallies: Vec<Arc<Tally>> = (0..CONNS)
        .map(|_| {
            let next_round = next_round.clone();
            Arc::new(Tally::with(move |t, conn, index| {
                if index % 97 == 0 {
                    declare(client_addr as *mut WsClient, (index / 97) % 2 == 0);
                }
                next_round(t, conn, index);
            }))
        })
        .collect();
    let options = no_keepalive();
    for ((url, _), t) in peers.iter().zip(&tallies) {
        let c = client.connect_with(url, options.0);
        watch_tally(c, t);
        command(c, &format!("trickle {PER_ROUND}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let toggler = {
        let (stop, flips) = (stop.clone(), flips.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(31337);
            let mut on = true;
            while !stop.load(Ordering::Relaxed) {
                declare(client_addr as *mut WsClient, on);
                on = !on;
                flips.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(rng.below(300)));
            }
        })
    };
    let stats = et_loop(&[client.0], false, Duration::from_secs(25), || tallies.iter().all(|t| t.ended()), |_| {});
    stop.store(true, Ordering::Relaxed);
    toggler.join().unwrap();
    eprintln!("{} flips from another thread", flips.load(Ordering::Relaxed));
    assert_no_stalls(&stats);
    assert_all_delivered(&tallies, ROUNDS * PER_ROUND, "close 1000");
    drop(client);
    for (_, p) in peers {
        p.join().unwrap();
    }
}

// ---- 4. ws_run between declared dispatches ----------------------------------------------------------

/// Header: "ws_run() is unaffected (it resets the descriptor, whichever was said)". Under
/// traffic the host alternates its EPOLLET loop (declared) with ws_run(client, 2 ms) every
/// third wake-up: what arrives during or after a ws_run must still wake the EPOLLET loop. Then,
/// over idle connections, after thousands of declared dispatches: ws_run(400 ms) waits (its
/// thread's CPU stays low), a second one too, and afterwards the EPOLLET loop is still woken by
/// new messages.
#[test]
fn ws_run_alternating_with_a_declared_loop_misses_nothing_and_waits_when_idle() {
    const CONNS: usize = 3;
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 2000;
    let peers: Vec<_> = (0..CONNS).map(|k| commanded_peer(k as u64 + 41)).collect();
    let tallies: Vec<Arc<Tally>> =
        (0..CONNS).map(|_| Arc::new(Tally::with(rounds_hook(ROUNDS, PER_ROUND, "")))).collect();
    let client = Client::new();
    declare(client.0, true);
    let conns = connect_commanded(&client, &peers, &tallies, false, &format!("burst {PER_ROUND}"));
    let mut runs = Vec::new();
    let stats = et_loop(
        &[client.0],
        false,
        Duration::from_secs(25),
        || tallies.iter().all(|t| t.got() == ROUNDS * PER_ROUND),
        |i| {
            if i % 3 == 2 {
                runs.push(unsafe { ws_run(client.0, 2) });
            }
        },
    );
    assert_no_stalls(&stats);
    assert!(runs.iter().all(|s| *s == WsStatus::Timeout), "ws_run answered {runs:?}");
    assert!(!runs.is_empty());
    for (k, t) in tallies.iter().enumerate() {
        assert!(t.wrong().is_empty() && !t.ended(), "connection {k}: {:?} {:?}", t.wrong(), t.finals());
    }
    // Idle now. Declared dispatches that run nothing, then ws_run must wait, not spin.
    for _ in 0..1000 {
        dispatch_raw(client.0);
    }
    for attempt in 0..2 {
        let cpu0 = thread_cpu();
        let started = Instant::now();
        let status = unsafe { ws_run(client.0, 400) };
        let (waited, cpu) = (started.elapsed(), thread_cpu() - cpu0);
        eprintln!("ws_run {attempt}: {status:?} after {waited:?}, {cpu:?} of CPU");
        assert_eq!(status, WsStatus::Timeout);
        assert!(waited >= Duration::from_millis(390), "ws_run {attempt} returned after {waited:?}");
        assert!(cpu < Duration::from_millis(60), "ws_run {attempt} used {cpu:?} of CPU in {waited:?} (a busy loop)");
        // Declared dispatches in between, as the host's loop would make.
        dispatch_raw(client.0);
    }
    // The EPOLLET loop is woken for what comes after ws_run reset the descriptor.
    for &c in &conns {
        command(c, "burst 1");
    }
    let stats = et_loop(
        &[client.0],
        true,
        Duration::from_secs(10),
        || tallies.iter().all(|t| t.got() == ROUNDS * PER_ROUND + 1),
        |_| {},
    );
    assert_no_stalls(&stats);
    for &c in &conns {
        assert_eq!(close(c, 1000, ""), WsStatus::Ok);
    }
    let stats = et_loop(&[client.0], true, Duration::from_secs(10), || tallies.iter().all(|t| t.ended()), |_| {});
    assert_no_stalls(&stats);
    assert_all_delivered(&tallies, ROUNDS * PER_ROUND + 1, "close 1000");
    drop(client);
    for (_, p) in peers {
        p.join().unwrap();
    }
}

// ---- 5. callbacks that connect, reconnect and dispatch a second declared client ------------------

/// Client A's connections each get 40 messages and the peer's close; A's close callback
/// reconnects (30 times); every 10th message of A's callbacks dispatches client B (declared
/// too) from inside the callback; every 7th A connection's 20th message connects a new
/// connection on B from inside the callback. B's connections run rounds of bursts. Both
/// descriptors in one EPOLLET loop, one dispatch per wake-up each: no stall on either client,
/// every connection complete.
#[test]
fn callbacks_reconnect_connect_and_dispatch_a_second_declared_client_without_missed_wake_ups() {
    const RECONNECTS: usize = 30;
    const A_MESSAGES: u64 = 40;
    const B_ROUNDS: u64 = 3;
    const B_PER_ROUND: u64 = 1500;
    let server = Server::start(5);
    let a = Client::new();
    let b = Client::new();
    declare(a.0, true);
    declare(b.0, true);

    struct Shared {
        a: usize,
        b: usize,
        url: std::ffi::CString,
        reconnects_left: AtomicUsize,
        a_tallies: Mutex<Vec<Arc<Tally>>>,
        b_tallies: Mutex<Vec<Arc<Tally>>>,
        nested: Mutex<Vec<WsStatus>>,
        nested_ran: AtomicU64,
        problems: Mutex<Vec<String>>,
    }
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        a: a.0 as usize,
        b: b.0 as usize,
        url: cstr(&server.url),
        reconnects_left: AtomicUsize::new(RECONNECTS),
        a_tallies: Mutex::new(Vec::new()),
        b_tallies: Mutex::new(Vec::new()),
        nested: Mutex::new(Vec::new()),
        nested_ran: AtomicU64::new(0),
        problems: Mutex::new(Vec::new()),
    }));
    fn connect(shared: &Shared, client: usize, tally: Tally, first: &str) -> Option<WsConn> {
        let mut conn = 0;
        let status = unsafe { ws_connect(client as *mut WsClient, shared.url.as_ptr(), &mut conn) };
        if status != WsStatus::Ok {
            shared.problems.lock().unwrap().push(format!("ws_connect: {status:?}: {}", last_error()));
            return None;
        }
        let tally = Arc::new(tally);
        watch_tally(conn, &tally);
        command(conn, first);
        let list = if client == shared.a { &shared.a_tallies } else { &shared.b_tallies };
        list.lock().unwrap().push(tally);
        Some(conn)
    }
    fn b_connection(shared: &'static Shared) {
        let tally = Tally::with(rounds_hook(B_ROUNDS, B_PER_ROUND, "close 0"));
        connect(shared, shared.b, tally, &format!("burst {B_PER_ROUND}"));
    }
    unsafe extern "C" fn a_close(_: WsConn, code: u16, r: *const std::os::raw::c_char, l: usize, user: *mut c_void) {
        tally_close(0, code, r, l, user);
        let shared = SHARED.get().unwrap();
        if shared.reconnects_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            a_connection(shared);
        }
    }
    fn a_connection(shared: &'static Shared) {
        let index = shared.a_tallies.lock().unwrap().len();
        let tally = Tally::with(move |_, _, i| {
            let shared = SHARED.get().unwrap();
            if i % 10 == 9 {
                let (mut ran, mut more) = (0, false);
                let status = unsafe { ws_dispatch(shared.b as *mut WsClient, &mut ran, &mut more) };
                shared.nested_ran.fetch_add(ran as u64, Ordering::Relaxed);
                shared.nested.lock().unwrap().push(status);
            }
            if i == 20 && index % 7 == 0 {
                b_connection(shared);
            }
        });
        if let Some(conn) = connect(shared, shared.a, tally, &format!("close {A_MESSAGES}")) {
            // The close callback reconnects (the tally's own records the close).
            let t = shared.a_tallies.lock().unwrap().last().unwrap().clone();
            set(ws_on_close(conn, Some(a_close), user(&*t)));
        }
    }
    static SHARED: std::sync::OnceLock<&'static Shared> = std::sync::OnceLock::new();
    assert!(SHARED.set(shared).is_ok());

    a_connection(shared);
    b_connection(shared);
    b_connection(shared);
    let done = || {
        let a_done = shared.reconnects_left.load(Ordering::SeqCst) == 0
            && shared.a_tallies.lock().unwrap().iter().all(|t| t.ended());
        a_done && shared.b_tallies.lock().unwrap().iter().all(|t| t.ended())
    };
    let stats = et_loop(&[a.0, b.0], true, Duration::from_secs(28), done, |_| {});
    assert_no_stalls(&stats);
    let problems = shared.problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:?}");
    let nested = shared.nested.lock().unwrap().clone();
    assert!(nested.iter().all(|s| *s == WsStatus::Ok), "nested dispatches of B answered {nested:?}");
    eprintln!("{} nested dispatches of B ran {} callbacks", nested.len(), shared.nested_ran.load(Ordering::Relaxed));
    let a_tallies = shared.a_tallies.lock().unwrap().clone();
    let b_tallies = shared.b_tallies.lock().unwrap().clone();
    assert_eq!(a_tallies.len(), RECONNECTS + 1);
    assert!(a_tallies.iter().all(|t| t.opened.load(Ordering::SeqCst)));
    assert_all_delivered(&a_tallies, A_MESSAGES, "close 1000");
    assert_eq!(b_tallies.len(), 2 + (0..=RECONNECTS).filter(|k| k % 7 == 0).count());
    assert_all_delivered(&b_tallies, B_ROUNDS * B_PER_ROUND, "close 1000");
    drop(a);
    drop(b);
    drop(server);
}

// ---- 6. several clients, each with its own EPOLLET loop on its own thread --------------------------

/// Four clients, each declared edge-triggered, each with its own EPOLLET loop on its own
/// thread, three connections each with rounds of bursts and trickles, and one thread sending
/// on all twelve connections: no loop stalls, no declared dispatch resets its eventfd.
#[test]
fn several_declared_clients_each_on_its_own_thread_miss_no_wake_up() {
    const CLIENTS: usize = 4;
    const CONNS: usize = 3;
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 1500;
    let stop = Arc::new(AtomicBool::new(false));
    let (conns_tx, conns_rx) = mpsc::channel::<Vec<WsConn>>();
    let loops: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let conns_tx = conns_tx.clone();
            std::thread::spawn(move || {
                let peers: Vec<_> = (0..CONNS).map(|k| commanded_peer((n * 10 + k) as u64 + 61)).collect();
                let tallies: Vec<Arc<Tally>> =
                    (0..CONNS).map(|_| Arc::new(Tally::with(rounds_hook(ROUNDS, PER_ROUND, "close 0")))).collect();
                let client = Client::new();
                declare(client.0, true);
                let conns = connect_commanded(&client, &peers, &tallies, false, &format!("trickle {PER_ROUND}"));
                conns_tx.send(conns).unwrap();
                let stats =
                    et_loop(&[client.0], true, Duration::from_secs(25), || tallies.iter().all(|t| t.ended()), |_| {});
                assert_no_stalls(&stats);
                assert_all_delivered(&tallies, ROUNDS * PER_ROUND, "close 1000");
                drop(client);
                for (_, p) in peers {
                    p.join().unwrap();
                }
                stats.into_iter().next().unwrap().wakeups
            })
        })
        .collect();
    drop(conns_tx);
    let all: Vec<WsConn> = conns_rx.iter().flatten().collect();
    let noise = sender(all, 5000, stop.clone());
    let results: Vec<_> = loops.into_iter().map(|l| l.join()).collect();
    stop.store(true, Ordering::Relaxed);
    noise.join().unwrap();
    for (n, r) in results.into_iter().enumerate() {
        match r {
            Ok(wakeups) => eprintln!("client {n}: {wakeups} wake-ups"),
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

// ---- 7. connections that end while events are pending; freeing with events pending -----------------

/// Connections that end right behind 3,000 messages (the peer's close, a TCP reset, a protocol
/// error, the end of the stream without a close) while the EPOLLET loop, declared, dispatches
/// once per wake-up: each gets exactly one final callback and no wake-up is missed (the final
/// callback is pending after a dispatch took the messages). Messages come in order, all of
/// them before the peer's close.
#[test]
fn connections_ending_behind_bursts_wake_the_declared_loop_for_their_final_callback() {
    const N: u64 = 3000;
    let verbs = ["close", "reset", "bad", "eof", "close", "reset", "bad", "eof"];
    let peers: Vec<_> = (0..verbs.len()).map(|k| commanded_peer(k as u64 + 81)).collect();
    let tallies: Vec<Arc<Tally>> = verbs.iter().map(|_| Arc::new(Tally::default())).collect();
    let client = Client::new();
    declare(client.0, true);
    let options = no_keepalive();
    let mut held = Vec::new();
    for (((url, _), t), verb) in peers.iter().zip(&tallies).zip(verbs) {
        let c = client.connect_with(url, options.0);
        watch_tally(c, t);
        // Flow control on half of them: the final callback waits behind held messages.
        if verb == "close" || verb == "bad" {
            set(ws_set_flow_control(c, true));
            held.push(c);
        }
        command(c, &format!("{verb} {N}"));
    }
    // Completes held messages from another thread, at random.
    let stop = Arc::new(AtomicBool::new(false));
    let completer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(5);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(rng.below(50)));
                for &c in &held {
                    ws_message_complete(c);
                }
            }
        })
    };
    let stats = et_loop(&[client.0], true, Duration::from_secs(25), || tallies.iter().all(|t| t.ended()), |_| {});
    stop.store(true, Ordering::Relaxed);
    completer.join().unwrap();
    assert_no_stalls(&stats);
    for ((k, t), verb) in tallies.iter().enumerate().zip(verbs) {
        let finals = t.finals();
        assert_eq!(finals.len(), 1, "connection {k} ({verb}): {finals:?}");
        assert!(t.wrong().is_empty(), "connection {k} ({verb}): {:?}", t.wrong());
        match verb {
            "close" => {
                assert_eq!(finals[0], "close 1000", "connection {k}");
                assert_eq!(t.got(), N, "connection {k}: every message before the peer's close");
            }
            _ => assert!(finals[0].starts_with("error"), "connection {k} ({verb}): {finals:?}"),
        }
    }
    drop(client);
    for (_, p) in peers {
        p.join().unwrap();
    }
}

/// ws_client_free with events pending on every connection (5,000 messages each, some held by
/// flow control, never completed), after a few declared EPOLLET dispatches: it returns within
/// 250 ms (README), runs no callback, and every handle answers WS_STATUS_GONE. Run under
/// valgrind to check for leaks (see the report).
#[test]
fn freeing_a_declared_client_with_events_pending_neither_hangs_nor_calls_back() {
    const CONNS: usize = 6;
    let peers: Vec<_> = (0..CONNS).map(|k| commanded_peer(k as u64 + 91)).collect();
    let tallies: Vec<Arc<Tally>> = (0..CONNS).map(|_| Arc::new(Tally::default())).collect();
    let client = Client::new();
    declare(client.0, true);
    let options = no_keepalive();
    let conns: Vec<WsConn> = peers
        .iter()
        .zip(&tallies)
        .enumerate()
        .map(|(k, ((url, _), t))| {
            let c = client.connect_with(url, options.0);
            watch_tally(c, t);
            if k % 2 == 0 {
                set(ws_set_flow_control(c, true));
            }
            command(c, "trickle 5000");
            c
        })
        .collect();
    // Dispatch, once per wake-up, until every connection has had a message and 20 wake-ups more.
    let extra = std::cell::Cell::new(None::<u32>);
    let stats = et_loop(
        &[client.0],
        true,
        Duration::from_secs(20),
        || extra.get() == Some(0),
        |_| match extra.get() {
            Some(n) => extra.set(Some(n - 1)),
            None if tallies.iter().all(|t| t.got() > 0) => extra.set(Some(20)),
            None => {}
        },
    );
    assert_no_stalls(&stats);
    let before: Vec<u64> = tallies.iter().map(|t| t.got()).collect();
    assert!(tallies.iter().all(|t| !t.ended()));
    let started = Instant::now();
    let raw = client.0;
    std::mem::forget(client);
    assert_eq!(unsafe { ws_client_free(raw) }, WsStatus::Ok);
    let took = started.elapsed();
    eprintln!("ws_client_free took {took:?} with {before:?} messages delivered");
    assert!(took < Duration::from_millis(250), "ws_client_free took {took:?}");
    let after: Vec<u64> = tallies.iter().map(|t| t.got()).collect();
    assert_eq!(before, after, "callbacks ran after ws_client_free");
    assert!(tallies.iter().all(|t| !t.ended()), "a final callback ran during ws_client_free");
    for &c in &conns {
        assert_eq!(ws_message_complete(c), WsStatus::Gone);
        assert_eq!(send_text(c, "x"), WsStatus::Gone);
    }
    for (_, p) in peers {
        p.join().unwrap();
    }
}

// ---- 8. what a declared dispatch does to the descriptor, and when ---------------------------------

/// A message callback that declares its client level-triggered, then records the message.
struct Undeclare {
    client: usize,
    tally: *const Tally,
}

unsafe extern "C" fn undeclare_in_callback(conn: WsConn, d: *const u8, l: usize, k: WsMessageKind, user: *mut c_void) {
    let this = &*(user as *const Undeclare);
    declare(this.client as *mut WsClient, false);
    tally_message(conn, d, l, k, this.tally as *mut c_void);
}

/// Header: the declaration is a hint that no longer changes what a dispatch does to the
/// descriptor; "ws_run() is unaffected". Watched from outside through the kernel (poll with no
/// wait; the bytes in the pipe): whether declared or not, and also when a callback says false in
/// the middle of a dispatch, a dispatch that leaves nothing pending leaves the descriptor
/// unreadable, and the EPOLLET loop is woken for everything that arrives afterwards; ws_run
/// leaves it unreadable too.
#[test]
fn every_dispatch_leaves_the_descriptor_unreadable_when_nothing_is_pending_whatever_the_declaration() {
    let (url, peer) = commanded_peer(101);
    let client = Client::new();
    let rec = Tally::default();
    let conn = client.connect_with(&url, no_keepalive().0);
    watch_tally(conn, &rec);
    declare(client.0, true);
    let fd = client.fd();
    let epoll = Epoll::new();
    epoll.add(fd, 0, true);
    // The open and 100 messages, dispatched as they come.
    command(conn, "trickle 100");
    while rec.got() < 100 {
        assert!(!epoll.wait(STALL).is_empty(), "no wake-up for pending messages ({} so far)", rec.got());
        dispatch_raw(client.0);
    }
    let dispatch_idle = || {
        // Nothing arrives now (the peer waits for a command): a dispatch runs nothing, and
        // leaves the descriptor unreadable.
        assert_eq!(dispatch_raw(client.0).0, 0);
        assert!(!readable(fd, Duration::ZERO), "readable after a dispatch that left nothing pending");
        assert_eq!(pipe_bytes(fd), 0);
    };
    // An idle window lets any set racing with the last dispatch land.
    std::thread::sleep(Duration::from_millis(50));
    dispatch_idle();
    // A callback says false in the middle of a declared dispatch: nothing changes.
    let undeclare = Undeclare { client: client.0 as usize, tally: &rec };
    set(ws_on_message(conn, Some(undeclare_in_callback), user(&undeclare)));
    command(conn, "burst 1");
    assert!(!epoll.wait(STALL).is_empty(), "no wake-up for the message");
    assert_eq!(dispatch_raw(client.0).0, 1);
    dispatch_idle();
    // Declared again from this thread.
    watch_tally(conn, &rec);
    declare(client.0, true);
    command(conn, "burst 1");
    assert!(!epoll.wait(STALL).is_empty(), "no wake-up for the message after the declaration");
    assert_eq!(dispatch_raw(client.0).0, 1);
    dispatch_idle();
    // ws_run leaves it unreadable as well.
    assert_eq!(unsafe { ws_run(client.0, 50) }, WsStatus::Timeout);
    assert!(!readable(fd, Duration::ZERO), "ws_run left the descriptor readable");
    // And the EPOLLET loop is woken afterwards.
    command(conn, "burst 1");
    assert!(!epoll.wait(STALL).is_empty(), "no wake-up after ws_run");
    assert_eq!(dispatch_raw(client.0).0, 1);
    assert_eq!(rec.got(), 103);
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    let stats = et_loop(&[client.0], false, Duration::from_secs(10), || rec.ended(), |_| {});
    assert_no_stalls(&stats);
    assert_eq!(rec.finals(), vec!["close 1000".to_owned()]);
    assert!(rec.wrong().is_empty(), "{:?}", rec.wrong());
    drop(client);
    peer.join().unwrap();
}

// ---- 9. many connections, small rounds: many empty-to-pending transitions at once ----------------

/// 120 connections on one declared client, each asking for 40 rounds of 3 messages (the next
/// round asked for by the callback of the last message of the previous one), so that
/// connections become pending one by one, concurrently, while dispatches take the ready list:
/// the EPOLLET loop, one dispatch per wake-up, misses no wake-up; no declared dispatch resets
/// the eventfd; ws_client_set_fd_edge_triggered(NULL) is refused.
#[test]
fn many_connections_becoming_pending_one_by_one_miss_no_wake_up() {
    const CONNS: usize = 120;
    const ROUNDS: u64 = 40;
    const PER_ROUND: u64 = 3;
    assert_eq!(unsafe { ws_client_set_fd_edge_triggered(std::ptr::null_mut(), true) }, WsStatus::NullArgument);
    let server = Server::start(77);
    let tallies: Vec<Arc<Tally>> =
        (0..CONNS).map(|_| Arc::new(Tally::with(rounds_hook(ROUNDS, PER_ROUND, "close 0")))).collect();
    let client = Client::new();
    declare(client.0, true);
    let options = no_keepalive();
    for t in &tallies {
        let c = client.connect_with(&server.url, options.0);
        watch_tally(c, t);
        command(c, &format!("burst {PER_ROUND}"));
    }
    let stats = et_loop(&[client.0], true, Duration::from_secs(25), || tallies.iter().all(|t| t.ended()), |_| {});
    assert_no_stalls(&stats);
    assert_all_delivered(&tallies, ROUNDS * PER_ROUND, "close 1000");
    drop(client);
    drop(server);
}

// ---- 10. a peer flooding pings while another connection's messages wait ---------------------------

unsafe extern "C" fn stamp_message(_: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    (*(user as *const Mutex<Vec<Instant>>)).lock().unwrap().push(Instant::now());
}

/// Not the declaration itself but what the declared loop relies on: that the library's I/O
/// thread hands messages over and wakes the host while a peer misbehaves. Connection X's peer
/// sends one message, then floods pings (125-byte payloads) for 3 s without ever reading;
/// connection Y's peer sends a message every 10 ms. The declared EPOLLET loop must get X's
/// message and Y's messages as they come: no gap of 1 s.
#[test]
fn a_ping_flood_on_one_connection_does_not_hold_back_the_others_wake_ups() {
    ping_flood_beside_a_ticking_connection(125, Duration::from_secs(1));
}

/// The same with empty pings (2 bytes each on the wire), which the peer writes faster than the
/// client can parse them, so the socket rarely runs dry: the I/O thread must still leave that
/// connection for the others. On the old code a read of the flooded socket went on as long as
/// data kept coming (pings cost nothing against a read's bound), and the task, once it had done
/// its rounds, woke itself at once, while the runtime looks for I/O only every 61 task polls:
/// Y's messages stopped for 258 and 459 ms in two runs. With every frame counted and the task
/// rescheduled after the runtime's next look for I/O, the largest gap was 20-38 ms (release).
#[test]
fn an_empty_ping_flood_the_client_cannot_keep_up_with_does_not_hold_back_another_connection() {
    ping_flood_beside_a_ticking_connection(0, Duration::from_millis(200));
}

fn ping_flood_beside_a_ticking_connection(ping_size: usize, max_gap_allowed: Duration) {
    let (x_url, x_peer) = serve(move |mut p| {
        p.upgrade();
        let _ = p.read_frame();
        let mut wire = frame(FIN | TEXT, b"000000 before the flood");
        let pings: Vec<u8> = (0..2000).flat_map(|_| frame(FIN | PING, &vec![7u8; ping_size])).collect();
        let start = Instant::now();
        let _ = p.stream.write_all(&wire);
        wire.clear();
        while start.elapsed() < Duration::from_secs(3) {
            if p.stream.write_all(&pings).is_err() {
                return;
            }
        }
        let _ = p.stream.write_all(&close_frame(1000, ""));
        let _ = p.read_to_end();
    });
    let (y_url, y_peer) = serve(|mut p| {
        p.upgrade();
        let _ = p.read_frame();
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(4) {
            if p.stream.write_all(&frame(FIN | TEXT, format!("{i:06} tick").as_bytes())).is_err() {
                return;
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = p.stream.write_all(&close_frame(1000, ""));
        let _ = p.read_until_close();
    });
    let client = Client::new();
    declare(client.0, true);
    let options = no_keepalive();
    let (x_times, y_times) = (Mutex::new(Vec::<Instant>::new()), Mutex::new(Vec::<Instant>::new()));
    let (xt, yt) = (Tally::default(), Tally::default());
    let x = client.connect_with(&x_url, options.0);
    let y = client.connect_with(&y_url, options.0);
    watch_tally(x, &xt);
    watch_tally(y, &yt);
    set(ws_on_message(x, Some(stamp_message), user(&x_times)));
    set(ws_on_message(y, Some(stamp_message), user(&y_times)));
    let started = Instant::now();
    command(x, "go");
    command(y, "go");
    let stats = et_loop(&[client.0], true, Duration::from_secs(25), || xt.ended() && yt.ended(), |_| {});
    let x_first = x_times.lock().unwrap().first().map(|t| t.duration_since(started));
    let y_times = y_times.lock().unwrap().clone();
    let gaps: Vec<Duration> = y_times.windows(2).map(|w| w[1] - w[0]).collect();
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "X's message after {x_first:?}; Y: {} messages, largest gap {max_gap:?}; finals {:?} {:?}",
        y_times.len(),
        xt.finals(),
        yt.finals()
    );
    assert_no_stalls(&stats);
    assert!(x_first.is_some_and(|t| t < Duration::from_secs(1)), "X's message came after {x_first:?}");
    assert!(max_gap < max_gap_allowed, "Y's messages stopped for {max_gap:?} during X's ping flood");
    drop(client);
    x_peer.join().unwrap();
    y_peer.join().unwrap();
}
