//! Fourth round of attacks on reading on dispatch and on the sends held in callbacks (the
//! change "a short read no longer hides a FIN, a reset or urgent data behind it; a callback
//! holds only its own client's sends and wake-ups").
//!
//! Promises attacked (README "Threading contract", "Performance"; include/wsclient.h on
//! ws_send, ws_dispatch, ws_client_fd): every connection ends with exactly one final callback,
//! promptly; no message lost, duplicated or reordered; the descriptor is not readable after a
//! dispatch that took everything; messages go out in the order of the calls that sent them,
//! whatever the threads; a callback may run another client's loop and get its answers.

#![allow(clippy::needless_range_loop)]

mod common;

use std::ffi::c_void;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

/// The kernel's TCP_CLOSE_WAIT: the peer's FIN has arrived.
const TCP_CLOSE_WAIT: u8 = 8;

// ---- helpers -----------------------------------------------------------------------------------

const WARM_UP: &[u8] = b"warm-up";

/// Two warm-up messages (the hand-over starts from the second message).
fn warm_up<S: Write>(stream: &mut S, flush: impl Fn(&mut S)) {
    for i in 0..2u8 {
        let mut body = WARM_UP.to_vec();
        body.push(b'0' + i);
        stream.write_all(&frame(FIN | BINARY, &body)).unwrap();
        flush(stream);
    }
}

/// Texts received, warm-up messages left out.
fn texts(rec: &Recorder, conn: WsConn) -> Vec<String> {
    rec.texts(conn)
}

fn final_event(rec: &Recorder, conn: WsConn) -> Option<Ev> {
    rec.of(conn).into_iter().find(Ev::is_final)
}

fn options_with(f: impl FnOnce(*mut WsOptions)) -> Options {
    let o = Options::new();
    unsafe { ws_options_set_deflate(o.0, false) };
    set(unsafe { ws_options_set_keepalive(o.0, 0, 1000) });
    f(o.0);
    o
}

#[derive(Clone, Copy, Debug)]
enum Wait {
    EpollLevel,
    EpollEdge,
    Poll,
    Select,
    /// ws_run with a short timeout, over and over.
    Run,
}

/// A host loop that waits on the client's fd as `wait` says.
struct Waiter {
    wait: Wait,
    fd: i32,
    epoll: Option<Epoll>,
}

impl Waiter {
    fn new(wait: Wait, fd: i32) -> Waiter {
        let epoll = match wait {
            Wait::EpollLevel | Wait::EpollEdge => {
                let e = Epoll::new();
                e.add(fd, 1, matches!(wait, Wait::EpollEdge));
                Some(e)
            }
            _ => None,
        };
        Waiter { wait, fd, epoll }
    }

    fn wait(&self, timeout: Duration) -> bool {
        let ms = timeout.as_millis() as i32;
        match self.wait {
            Wait::EpollLevel | Wait::EpollEdge => self.epoll.as_ref().unwrap().woken(timeout),
            Wait::Poll | Wait::Run => readable(self.fd, timeout),
            Wait::Select => unsafe {
                let mut set: libc::fd_set = std::mem::zeroed();
                libc::FD_ZERO(&mut set);
                libc::FD_SET(self.fd, &mut set);
                let mut tv = libc::timeval { tv_sec: (ms / 1000) as _, tv_usec: ((ms % 1000) * 1000) as _ };
                libc::select(self.fd + 1, &mut set, std::ptr::null_mut(), std::ptr::null_mut(), &mut tv) == 1
            },
        }
    }
}

/// Runs the host until `done` (at most `limit`), the way `waiter` says; returns whether `done`
/// held. With Wait::Run, ws_run for 20 ms at a time.
fn host_loop(client: &Client, waiter: &Waiter, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut more = true;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        if let Wait::Run = waiter.wait {
            let status = unsafe { ws_run(client.0, 20) };
            assert!(matches!(status, WsStatus::Ok | WsStatus::Timeout), "ws_run: {status:?}");
            continue;
        }
        if !more && !waiter.wait(Duration::from_millis(50)) {
            continue;
        }
        more = client.dispatch().1;
    }
    true
}

/// How a quiet connection's server ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    /// Its burst, then a FIN in the same write.
    Fin,
    /// Its burst, then a reset (SO_LINGER 0).
    Reset,
    /// Its burst, then half a frame, then a FIN.
    PartialThenFin,
    /// Its burst, then a close frame and a FIN right behind.
    CloseThenFin,
}

fn burst_message(conn: usize, i: usize) -> String {
    format!("c{conn}.m{i}")
}

// ---- 1. several connections ending while another streams ---------------------------------------

/// One client, `n` quiet connections and one busy one (its server sends a small message every
/// 2 ms, so the host dispatches all the time: the watchdog never rescues a missed end). Once
/// every socket is the host's, each quiet server writes a burst of small messages (one of them
/// 1,500: more than one dispatch's 1,024) and its end (FIN, reset, partial frame + FIN, close
/// frame + FIN), all in the socket before the host reads. Every quiet connection must get its
/// whole burst in order (for a reset: a prefix of it in order) and exactly one final callback
/// within 2 s; the loop is `wait`.
fn ending_beside_a_stream(wait: Wait, on: bool) {
    let what = format!("{wait:?}, read_on_dispatch {on}");
    const N: usize = 8;
    let ends = [End::Fin, End::Reset, End::PartialThenFin, End::CloseThenFin];
    let counts: Vec<usize> = (0..N).map(|i| if i == 2 { 1500 } else { 1 + (i * 97) % 300 }).collect();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
    let mut servers: Vec<(String, JoinHandle<ClientSocket>)> = Vec::new();
    let mut go_txs = Vec::new();
    for i in 0..N {
        let (tx, rx) = mpsc::channel::<()>();
        go_txs.push(tx);
        let end = ends[i % ends.len()];
        let count = counts[i];
        servers.push(serve(move |mut peer| {
            peer.upgrade();
            warm_up(&mut peer.stream, |_| {});
            rx.recv().unwrap();
            let mut bytes = Vec::new();
            for m in 0..count {
                bytes.extend_from_slice(&frame(FIN | TEXT, burst_message(i, m).as_bytes()));
            }
            match end {
                End::PartialThenFin => {
                    bytes.extend_from_slice(&header(FIN | TEXT, 100));
                    bytes.extend_from_slice(b"0123456789");
                }
                End::CloseThenFin => bytes.extend_from_slice(&close_frame(1000, "bye")),
                _ => {}
            }
            peer.send(&bytes);
            let socket = peer.client_socket();
            if end == End::Reset {
                reset(peer.stream);
            } else {
                peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
                let _ = peer.read_to_end();
            }
            socket
        }));
    }
    drop(go_rx);
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
        i
    });
    let client = Client::new();
    let options = options_with(|o| set(unsafe { ws_options_set_read_on_dispatch(o, on) }));
    let rec = Recorder::default();
    let conns: Vec<WsConn> = servers.iter().map(|(url, _)| client.connect_with(url, options.0)).collect();
    let busy = client.connect_with(&busy_url, options.0);
    for &c in &conns {
        watch(c, &rec);
    }
    watch(busy, &rec);
    let warmed = |c: WsConn| rec.of(c).len() == 3;
    assert!(pump(&client, DEADLINE, || conns.iter().all(|&c| warmed(c))), "{what}: the warm-up");
    if on {
        wait_handed(&client, N + 1, &what);
    }
    let waiter = Waiter::new(wait, client.fd());
    go_txs.iter().for_each(|tx| tx.send(()).unwrap());
    drop(go_tx);
    let start = Instant::now();
    let ended = host_loop(&client, &waiter, Duration::from_secs(3), || conns.iter().all(|&c| rec.finals(c) > 0));
    let took = start.elapsed();
    let late: Vec<usize> = (0..N).filter(|&i| rec.finals(conns[i]) == 0).collect();
    // Whatever happened, everything ends before the verdict.
    stop_tx.send(()).unwrap();
    assert!(host_loop(&client, &waiter, DEADLINE, || rec.finals(busy) > 0), "{what}: the busy connection's end");
    let late_end = host_loop(&client, &waiter, Duration::from_secs(40), || conns.iter().all(|&c| rec.finals(c) > 0));
    for (_, s) in servers {
        s.join().unwrap();
    }
    let busy_sent = busy_server.join().unwrap();
    assert!(ended, "{what}: connections {late:?} had no final callback within 3 s (ended later: {late_end}); the host was dispatching");
    eprintln!("{what}: all {N} ended within {took:?}; busy sent {busy_sent}");
    for i in 0..N {
        let c = conns[i];
        let end = ends[i % ends.len()];
        let got = texts(&rec, c);
        let expected: Vec<String> = (0..counts[i]).map(|m| burst_message(i, m)).collect();
        if end == End::Reset {
            assert!(expected.starts_with(&got), "{what}: connection {i} ({end:?}): not a prefix in order");
        } else {
            assert!(got == expected, "{what}: connection {i} ({end:?}): {} of {} messages", got.len(), expected.len());
        }
        assert_eq!(rec.finals(c), 1, "{what}: connection {i}: {:?}", final_event(&rec, c));
        let event = final_event(&rec, c).unwrap();
        match end {
            End::CloseThenFin => assert_eq!(event, Ev::Close(c, 1000, "bye".into()), "{what}: connection {i}"),
            _ => assert!(matches!(event, Ev::Error(..)), "{what}: connection {i}: {event:?}"),
        }
        assert!(rec.of(c).last().unwrap().is_final(), "{what}: connection {i}: something after its final callback");
    }
    assert_eq!(rec.finals(busy), 1);
    let busy_texts = texts(&rec, busy);
    assert_eq!(busy_texts.len(), busy_sent, "{what}: the busy connection's messages");
    assert!(busy_texts.iter().enumerate().all(|(i, t)| *t == format!("busy{i}")), "{what}: busy order");
}

#[test]
fn connections_ending_every_way_beside_a_streaming_one_end_promptly_epoll_edge() {
    ending_beside_a_stream(Wait::EpollEdge, true);
}

#[test]
fn connections_ending_every_way_beside_a_streaming_one_end_promptly_poll_and_select() {
    ending_beside_a_stream(Wait::Poll, true);
    ending_beside_a_stream(Wait::Select, true);
}

#[test]
fn connections_ending_every_way_beside_a_streaming_one_end_promptly_epoll_level_and_ws_run() {
    ending_beside_a_stream(Wait::EpollLevel, true);
    ending_beside_a_stream(Wait::Run, true);
}

#[test]
fn connections_ending_every_way_beside_a_streaming_one_without_reading_on_dispatch() {
    ending_beside_a_stream(Wait::EpollEdge, false);
}

// ---- 2. a FIN behind a long burst, tiny read buffer, one connection -----------------------------

/// One connection, a read buffer of `read_buffer` bytes (the host reads a few buffers per
/// dispatch at most), a burst of `count` small messages and the server's `end`, all in the
/// client's socket before the host reads (checked in the kernel's table). The host loop
/// (edge-triggered epoll) must get every message in order and the final callback, and the
/// final callback must come within 90 ms of the last message (the watchdog needs 100 ms at
/// least: an end that waited for it was missed by the descriptor). Afterwards the descriptor
/// is not readable once a dispatch said nothing more is pending.
fn fin_behind_a_long_burst(end: End, read_buffer: usize, count: usize, on: bool) {
    let what = format!("{end:?}, read buffer {read_buffer}, {count} messages, read_on_dispatch {on}");
    let (sent_tx, sent_rx) = mpsc::channel::<(ClientSocket, u64)>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, |_| {});
        go_rx.recv().unwrap();
        let mut bytes = Vec::new();
        for m in 0..count {
            bytes.extend_from_slice(&frame(FIN | TEXT, burst_message(0, m).as_bytes()));
        }
        match end {
            End::PartialThenFin => {
                bytes.extend_from_slice(&header(FIN | TEXT, 100));
                bytes.extend_from_slice(b"0123");
            }
            End::CloseThenFin => bytes.extend_from_slice(&close_frame(1000, "bye")),
            _ => {}
        }
        peer.send(&bytes);
        let socket = peer.client_socket();
        if end == End::Reset {
            sent_tx.send((socket, bytes.len() as u64)).unwrap();
            // Only once the client's socket has it all.
            std::thread::sleep(Duration::from_millis(0));
            reset(peer.stream);
        } else {
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            sent_tx.send((socket, bytes.len() as u64)).unwrap();
            let _ = peer.read_to_end();
        }
    });
    let client = Client::new();
    let options = options_with(|o| {
        set(unsafe { ws_options_set_read_on_dispatch(o, on) });
        set(unsafe { ws_options_set_read_buffer_size(o, read_buffer) });
    });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "{what}: the warm-up");
    if on {
        wait_handed(&client, 1, &what);
    }
    go_tx.send(()).unwrap();
    let (socket, len) = sent_rx.recv().unwrap();
    if on && end != End::Reset {
        let all_in = socket.wait_until(|s| s.is_some_and(|s| s.state == TCP_CLOSE_WAIT && s.rx_queue >= len));
        assert!(all_in, "{what}: the burst and the FIN never both reached the client's socket");
    }
    let waiter = Waiter::new(Wait::EpollEdge, client.fd());
    let mut last_message_at = None;
    let mut final_at = None;
    let start = Instant::now();
    host_loop(&client, &waiter, Duration::from_secs(3), || {
        if last_message_at.is_none() && rec.texts(conn).len() >= count {
            last_message_at = Some(start.elapsed());
        }
        if final_at.is_none() && rec.finals(conn) > 0 {
            final_at = Some(start.elapsed());
        }
        final_at.is_some()
    });
    let _ = final_within(&client, &rec, conn, Duration::from_secs(40));
    server.join().unwrap();
    let got = texts(&rec, conn);
    let expected: Vec<String> = (0..count).map(|m| burst_message(0, m)).collect();
    eprintln!(
        "{what}: last message after {last_message_at:?}, final after {final_at:?}: {:?}",
        final_event(&rec, conn)
    );
    if end == End::Reset {
        assert!(expected.starts_with(&got), "{what}: not a prefix in order");
    } else {
        assert!(
            got == expected,
            "{what}: {} of {} messages (in order: {})",
            got.len(),
            count,
            expected.starts_with(&got)
        );
    }
    assert_eq!(rec.finals(conn), 1, "{what}");
    let final_at = final_at.unwrap_or_else(|| panic!("{what}: no final callback within 3 s"));
    if let Some(last) = last_message_at {
        assert!(
            final_at.saturating_sub(last) < Duration::from_millis(90),
            "{what}: the end came {:?} after the last message (the watchdog, not the descriptor)",
            final_at - last
        );
    }
    // Nothing left: a dispatch that says so leaves the descriptor unreadable.
    let (_, more) = client.dispatch();
    if !more {
        assert!(
            !readable(client.fd(), Duration::ZERO),
            "{what}: the descriptor stayed readable after a dispatch took everything"
        );
    }
}

#[test]
fn a_fin_behind_a_long_burst_with_a_tiny_read_buffer_ends_at_once() {
    fin_behind_a_long_burst(End::Fin, 256, 3000, true);
    fin_behind_a_long_burst(End::PartialThenFin, 256, 3000, true);
    fin_behind_a_long_burst(End::CloseThenFin, 256, 3000, true);
}

#[test]
fn a_fin_behind_a_burst_past_the_dispatch_budget_with_the_default_buffer_ends_at_once() {
    fin_behind_a_long_burst(End::Fin, 64 << 10, 5000, true);
    fin_behind_a_long_burst(End::CloseThenFin, 64 << 10, 5000, true);
    fin_behind_a_long_burst(End::Reset, 64 << 10, 5000, true);
}

#[test]
fn a_fin_behind_a_long_burst_without_reading_on_dispatch() {
    fin_behind_a_long_burst(End::Fin, 256, 3000, false);
    fin_behind_a_long_burst(End::PartialThenFin, 64 << 10, 5000, false);
}

// ---- 3. idle after ends: no busy loop, no readable descriptor ----------------------------------

/// A client keeps one idle connection open while three others end (FIN behind data, close
/// frame + FIN, reset). Afterwards, over an idle window, the host loop (level-triggered poll)
/// is not woken more than a few times, and neither the process nor the I/O threads spin.
#[test]
fn no_busy_loop_after_peers_ended_beside_an_idle_connection() {
    let mut servers = Vec::new();
    let mut go = Vec::new();
    for end in [End::Fin, End::CloseThenFin, End::Reset, End::PartialThenFin] {
        let (tx, rx) = mpsc::channel::<()>();
        go.push(tx);
        servers.push(serve(move |mut peer| {
            peer.upgrade();
            warm_up(&mut peer.stream, |_| {});
            rx.recv().unwrap();
            let mut bytes = frame(FIN | TEXT, b"last");
            match end {
                End::CloseThenFin => bytes.extend_from_slice(&close_frame(1000, "")),
                End::PartialThenFin => bytes.extend_from_slice(&header(FIN | TEXT, 10)),
                _ => {}
            }
            peer.send(&bytes);
            if end == End::Reset {
                reset(peer.stream);
            } else {
                peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
                let _ = peer.read_to_end();
            }
        }));
    }
    let (idle_stop_tx, idle_stop_rx) = mpsc::channel::<()>();
    let (idle_url, idle_server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, |_| {});
        idle_stop_rx.recv().unwrap();
        peer.send(&close_frame(1000, "idle"));
        let _ = peer.read_until_close();
    });
    let client = Client::new();
    let options = options_with(|_| {});
    let rec = Recorder::default();
    let conns: Vec<WsConn> = servers.iter().map(|(u, _)| client.connect_with(u, options.0)).collect();
    let idle = client.connect_with(&idle_url, options.0);
    conns.iter().chain([&idle]).for_each(|&c| watch(c, &rec));
    assert!(pump(&client, DEADLINE, || conns.iter().chain([&idle]).all(|&c| rec.of(c).len() == 3)), "warm-up");
    wait_handed(&client, 5, "all five");
    go.iter().for_each(|t| t.send(()).unwrap());
    assert!(pump(&client, Duration::from_secs(3), || conns.iter().all(|&c| rec.finals(c) == 1)), "the ends");
    // Settle, then count wake-ups over an idle window.
    pump(&client, Duration::from_millis(300), || false);
    // (Other tests run in this process meanwhile: only this thread's CPU is ours alone.)
    let thread_cpu = || {
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(usage.ru_utime) + tv(usage.ru_stime)
    };
    let (io, host) = (io_threads_cpu(), thread_cpu());
    let start = Instant::now();
    let mut wakeups = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        if readable(client.fd(), Duration::from_millis(100)) {
            wakeups += 1;
            client.dispatch();
        }
    }
    let (io, host) = (io_threads_cpu().saturating_sub(io), thread_cpu() - host);
    idle_stop_tx.send(()).unwrap();
    assert!(pump(&client, DEADLINE, || rec.finals(idle) == 1), "the idle connection's end");
    for (_, s) in servers {
        s.join().unwrap();
    }
    idle_server.join().unwrap();
    eprintln!("idle window: {wakeups} wake-ups, host thread {host:?}, I/O threads (all clients) {io:?}");
    assert!(wakeups <= 3, "the descriptor woke the host {wakeups} times in 1.5 s of silence");
    assert!(host < Duration::from_millis(150), "the host's thread used {host:?} of CPU in 1.5 s of silence");
    assert_eq!(rec.finals(idle), 1);
}

// ---- 4. wss: a FIN or close_notify behind a long burst of records --------------------------------

/// wss (TLS 1.3, the test CA): a burst of `count` small messages in records of their own, then
/// close_notify or not, then a FIN, all written at once behind the hand-over, read buffer 512.
/// Every message arrives in order, exactly one final callback within 2 s.
fn wss_fin_behind_records(close_notify: bool, count: usize) {
    let what = format!("wss close_notify {close_notify}, {count} messages");
    let identity = TlsIdentity::new();
    let listener = Listener::bind();
    let url = format!("wss://localhost:{}/", listener.port);
    let config = Arc::new(identity.server_config());
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let peer = listener.accept();
        let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), peer.stream);
        let request = read_request_from(&mut tls).unwrap();
        tls.write_all(response_to(&request, "").as_bytes()).unwrap();
        flush_tls(&mut tls).unwrap();
        warm_up(&mut tls, |tls| flush_tls(tls).unwrap());
        go_rx.recv().unwrap();
        tls.conn.set_buffer_limit(None);
        for m in 0..count {
            tls.conn.writer().write_all(&frame(FIN | TEXT, burst_message(0, m).as_bytes())).unwrap();
        }
        if close_notify {
            tls.conn.send_close_notify();
        }
        let mut records = Vec::new();
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut records).unwrap();
        }
        tls.sock.write_all(&records).unwrap();
        tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = tls.sock.read_to_end(&mut rest);
    });
    let client = Client::new();
    let options = options_with(|o| {
        let ca = cstr(identity.ca_pem.to_str().unwrap());
        set(unsafe { ws_options_add_ca_file(o, ca.as_ptr()) });
        set(unsafe { ws_options_set_read_buffer_size(o, 512) });
    });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "{what}: warm-up {:?}", rec.of(conn));
    wait_handed(&client, 1, &what);
    go_tx.send(()).unwrap();
    let waiter = Waiter::new(Wait::EpollEdge, client.fd());
    let ended = host_loop(&client, &waiter, Duration::from_secs(2), || rec.finals(conn) > 0);
    let _ = final_within(&client, &rec, conn, Duration::from_secs(40));
    server.join().unwrap();
    let expected: Vec<String> = (0..count).map(|m| burst_message(0, m)).collect();
    let got = texts(&rec, conn);
    assert!(got == expected, "{what}: {} of {count} messages", got.len());
    assert!(ended, "{what}: no final callback within 2 s");
    assert_eq!(rec.finals(conn), 1, "{what}");
    eprintln!("{what}: {:?}", final_event(&rec, conn));
}

#[test]
fn wss_a_fin_with_or_without_close_notify_behind_a_long_burst_ends_at_once() {
    wss_fin_behind_records(false, 2000);
    wss_fin_behind_records(true, 2000);
}

// ---- 5. nested loops three deep, sends from everywhere ------------------------------------------

/// A server that records every text it receives, answers "q..." with "r" + it, and answers a
/// close frame.
fn echo_server() -> (String, JoinHandle<Vec<String>>) {
    serve(|mut peer| {
        peer.upgrade();
        peer.read_timeout(Duration::from_secs(20));
        let mut got = Vec::new();
        while let Ok(f) = peer.read_frame() {
            match f.opcode {
                TEXT => {
                    let t = String::from_utf8(f.payload).unwrap();
                    if t.starts_with('q') {
                        peer.send(&frame(FIN | TEXT, format!("r{t}").as_bytes()));
                    }
                    got.push(t);
                }
                CLOSE => {
                    peer.send(&close_frame(1000, ""));
                    break;
                }
                _ => {}
            }
        }
        got
    })
}

struct Nest {
    clients: [*mut WsClient; 3],
    conns: [AtomicUsize; 3],
    recs: [Recorder; 3],
    /// Whether each nested wait got its reply (level 1: B's, level 2: C's).
    waits: Mutex<Vec<(usize, bool)>>,
    /// The inner loop runs with ws_run instead of ws_dispatch.
    with_run: bool,
}

impl Nest {
    fn conn(&self, k: usize) -> WsConn {
        self.conns[k].load(Ordering::SeqCst) as WsConn
    }

    /// Runs client `k`'s loop until its recorder has `reply` (3 s at most).
    unsafe fn wait_reply(&self, k: usize, reply: &str) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if self.recs[k].texts(self.conn(k)).iter().any(|t| t == reply) {
                return true;
            }
            if self.with_run {
                let status = ws_run(self.clients[k], 20);
                assert!(matches!(status, WsStatus::Timeout | WsStatus::Ok), "nested ws_run: {status:?}");
            } else {
                readable(ws_client_fd(self.clients[k]), Duration::from_millis(20));
                assert_eq!(ws_dispatch(self.clients[k], std::ptr::null_mut(), std::ptr::null_mut()), WsStatus::Ok);
            }
        }
        false
    }
}

unsafe extern "C" fn nest_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let nest = &*(user as *const Nest);
    let k = (0..3).find(|&k| nest.conn(k) == conn).unwrap();
    on_message(conn, data, len, kind, (&nest.recs[k] as *const Recorder).cast_mut().cast());
    let text = std::str::from_utf8(std::slice::from_raw_parts(data, len)).unwrap();
    let (a, b, c) = (nest.conn(0), nest.conn(1), nest.conn(2));
    let ok = |s: WsStatus| assert_eq!(s, WsStatus::Ok, "{}", last_error());
    match (k, text) {
        (0, "rqa0") => {
            ok(send_text(a, "a1"));
            ok(send_text(b, "qb1"));
            let got = nest.wait_reply(1, "rqb1");
            nest.waits.lock().unwrap().push((1, got));
            ok(send_text(a, "a5"));
            ok(send_text(b, "b5"));
        }
        (1, "rqb1") => {
            ok(send_text(b, "b2"));
            ok(send_text(a, "a2"));
            ok(send_text(c, "qc1"));
            let got = nest.wait_reply(2, "rqc1");
            nest.waits.lock().unwrap().push((2, got));
            ok(send_text(a, "a4"));
            ok(send_text(b, "b4"));
            ok(send_text(c, "c4"));
        }
        (2, "rqc1") => {
            ok(send_text(c, "c2"));
            ok(send_text(b, "b3"));
            ok(send_text(a, "a3"));
        }
        _ => {}
    }
}

/// Three clients A, B, C, one connection each to a recording echo server. A's callback sends
/// on A (held) and on B, then runs B's loop until B's reply; B's callback sends on B (held),
/// on A, on C, and runs C's loop until C's reply; C's callback sends on C, B and A. Meanwhile
/// another thread sends 3,000 numbered messages on A. Every nested wait gets its reply; each
/// server receives the host's messages in the order of the calls (A: qa0 a1 a2 a3 a4 a5; B:
/// qb1 b2 b3 b4 b5; C: qc1 c2 c4) and the other thread's all, in order.
fn three_deep(with_run: bool) {
    let what = format!("nested with {}", if with_run { "ws_run" } else { "ws_dispatch" });
    let servers: Vec<_> = (0..3).map(|_| echo_server()).collect();
    let clients = [Client::new(), Client::new(), Client::new()];
    let nest = Box::new(Nest {
        clients: [clients[0].0, clients[1].0, clients[2].0],
        conns: Default::default(),
        recs: Default::default(),
        waits: Mutex::new(Vec::new()),
        with_run,
    });
    let options = options_with(|_| {});
    for k in 0..3 {
        let c = clients[k].connect_with(&servers[k].0, options.0);
        nest.conns[k].store(c as usize, Ordering::SeqCst);
        watch(c, &nest.recs[k]);
        assert_eq!(ws_on_message(c, Some(nest_message), user(&*nest)), WsStatus::Ok);
        wait_open(&clients[k], &nest.recs[k], c);
    }
    let a = nest.conn(0);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for i in 0..3000 {
                assert_eq!(send_text(a, &format!("t{i}")), WsStatus::Ok);
                if i % 50 == 0 {
                    std::thread::yield_now();
                }
                if stop.load(Ordering::Relaxed) {
                    return i + 1;
                }
            }
            3000
        })
    };
    assert_eq!(send_text(a, "qa0"), WsStatus::Ok);
    assert!(pump(&clients[0], DEADLINE, || nest.waits.lock().unwrap().len() == 2), "{what}: the chain");
    let sent = sender.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    for k in 0..3 {
        assert_eq!(close(nest.conn(k), 1000, ""), WsStatus::Ok);
        assert!(pump(&clients[k], DEADLINE, || nest.recs[k].finals(nest.conn(k)) == 1), "{what}: final {k}");
    }
    let got: Vec<Vec<String>> = servers.into_iter().map(|(_, s)| s.join().unwrap()).collect();
    let waits = nest.waits.lock().unwrap().clone();
    assert!(waits.iter().all(|(_, ok)| *ok), "{what}: a nested wait never got its reply: {waits:?}");
    let host_a: Vec<&str> = got[0].iter().filter(|t| !t.starts_with('t')).map(String::as_str).collect();
    let thread_a: Vec<String> = got[0].iter().filter(|t| t.starts_with('t')).cloned().collect();
    assert_eq!(host_a, ["qa0", "a1", "a2", "a3", "a4", "a5"], "{what}: A");
    assert_eq!(got[1], ["qb1", "b2", "b3", "b4", "b5"], "{what}: B");
    assert_eq!(got[2], ["qc1", "c2", "c4"], "{what}: C");
    let expected: Vec<String> = (0..sent).map(|i| format!("t{i}")).collect();
    assert!(thread_a == expected, "{what}: the other thread's {} messages: {} arrived", sent, thread_a.len());
    drop(clients);
    drop(nest);
}

#[test]
fn three_nested_loops_with_ws_dispatch_get_their_replies_and_keep_every_order() {
    three_deep(false);
}

#[test]
fn three_nested_loops_with_ws_run_get_their_replies_and_keep_every_order() {
    three_deep(true);
}

// ---- 6. the end racing the host's read ----------------------------------------------------------

/// `rounds` connections one after the other, each handed to the host's thread; its server
/// sends a last message (whole, or its first half then the rest) and then, after a delay of
/// 0 to ~400 µs (so that the FIN lands before the harvest, between the harvest and the read,
/// or after the read), its FIN. The host loop (edge-triggered epoll) must get the message and
/// the final callback within 90 ms of the FIN being sent (the watchdog needs 100 ms at least).
fn end_racing_the_read(split: bool, rounds: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut worst = Duration::ZERO;
    for round in 0..rounds {
        let delay_us = rng.below(400);
        let (fin_tx, fin_rx) = mpsc::channel::<Instant>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (url, server) = serve(move |mut peer| {
            peer.upgrade();
            warm_up(&mut peer.stream, |_| {});
            go_rx.recv().unwrap();
            let last = frame(FIN | TEXT, format!("last{round}").as_bytes());
            if split {
                peer.send(&last[..3]);
                std::thread::sleep(Duration::from_micros(delay_us / 2));
                peer.send(&last[3..]);
            } else {
                peer.send(&last);
            }
            std::thread::sleep(Duration::from_micros(delay_us));
            peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            fin_tx.send(Instant::now()).unwrap();
            let _ = peer.read_to_end();
        });
        let client = Client::new();
        let options = options_with(|_| {});
        let rec = Recorder::default();
        let conn = client.connect_with(&url, options.0);
        watch(conn, &rec);
        assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "round {round}: warm-up");
        wait_handed(&client, 1, "race");
        let waiter = Waiter::new(Wait::EpollEdge, client.fd());
        go_tx.send(()).unwrap();
        assert!(host_loop(&client, &waiter, Duration::from_secs(3), || rec.finals(conn) > 0), "round {round}: no end");
        let ended = Instant::now();
        let fin_at = fin_rx.recv().unwrap();
        server.join().unwrap();
        let took = ended.saturating_duration_since(fin_at);
        worst = worst.max(took);
        assert_eq!(rec.texts(conn), [format!("last{round}")], "round {round}");
        assert_eq!(rec.finals(conn), 1);
        assert!(
            took < Duration::from_millis(90),
            "round {round} (delay {delay_us} µs, split {split}): the end reached the host {took:?} after the FIN"
        );
    }
    eprintln!("split {split}: worst {worst:?} over {rounds} rounds");
}

#[test]
fn a_fin_racing_the_hosts_read_of_the_last_message_ends_at_once() {
    end_racing_the_read(false, 40, 21);
}

#[test]
fn a_fin_racing_the_hosts_read_of_a_split_last_frame_ends_at_once() {
    end_racing_the_read(true, 40, 22);
}

// ---- 7. flow control and a FIN behind the messages ---------------------------------------------

/// Flow control on; the server sends 20 small messages and a FIN at once (on a socket the
/// host's thread had). The host completes each message from another thread a little later.
/// Every message comes in order, the final callback once, after the last message was
/// completed and within 90 ms of it.
#[test]
fn flow_control_with_completes_from_another_thread_and_a_fin_behind_the_messages() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, |_| {});
        go_rx.recv().unwrap();
        let bytes: Vec<u8> = (0..20).flat_map(|m| frame(FIN | TEXT, burst_message(0, m).as_bytes())).collect();
        peer.send(&bytes);
        peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = peer.read_to_end();
    });
    let client = Client::new();
    let options = options_with(|_| {});
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "warm-up");
    wait_handed(&client, 1, "flow");
    assert_eq!(ws_message_complete(conn), WsStatus::Ok);
    assert_eq!(ws_set_flow_control(conn, true), WsStatus::Ok);
    go_tx.send(()).unwrap();
    let completed = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = Arc::new(AtomicUsize::new(0));
    let completer = {
        let (completed, seen) = (completed.clone(), seen.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut done = 0;
            while done < 20 && Instant::now() < deadline {
                if seen.load(Ordering::SeqCst) > done {
                    std::thread::sleep(Duration::from_millis(3));
                    assert_eq!(ws_message_complete(conn), WsStatus::Ok);
                    completed.lock().unwrap().push(Instant::now());
                    done += 1;
                } else {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            done
        })
    };
    let waiter = Waiter::new(Wait::EpollEdge, client.fd());
    let ended = host_loop(&client, &waiter, Duration::from_secs(5), || {
        seen.store(rec.texts(conn).len(), Ordering::SeqCst);
        rec.finals(conn) > 0
    });
    let final_at = Instant::now();
    let done = completer.join().unwrap();
    server.join().unwrap();
    let expected: Vec<String> = (0..20).map(|m| burst_message(0, m)).collect();
    assert_eq!(rec.texts(conn), expected);
    assert!(ended, "no final callback within 5 s (completed {done})");
    assert_eq!(done, 20);
    let last_complete = *completed.lock().unwrap().last().unwrap();
    let took = final_at.saturating_duration_since(last_complete);
    eprintln!("flow control: the final came {took:?} after the last complete");
    assert!(took < Duration::from_millis(90), "the end came {took:?} after the last message was completed");
    assert!(matches!(final_event(&rec, conn), Some(Ev::Error(_, WsStatus::ConnectionLost, _))));
}

// ---- 8. held sends and another thread's sends of every size on one connection --------------------

/// The server pushes 400 small messages; the host's callback answers each with "h<i>" (held
/// until its batch ends), while another thread sends 400 messages "t<j>" of sizes alternating
/// from 8 bytes to 70 KiB (some held behind the callback's, some too large to hold). The
/// server receives both subsequences whole and in order.
#[test]
fn held_replies_and_another_threads_sends_of_every_size_keep_their_order() {
    const N: usize = 400;
    let (url, server) = serve(move |mut peer| {
        peer.upgrade();
        let mut writer = peer.stream.try_clone().unwrap();
        let pusher = std::thread::spawn(move || {
            for i in 0..N {
                writer.write_all(&frame(FIN | TEXT, format!("p{i}").as_bytes())).unwrap();
                if i % 7 == 0 {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
        });
        peer.read_timeout(Duration::from_secs(20));
        let mut got = Vec::new();
        while got.len() < 2 * N {
            match peer.read_frame() {
                Ok(f) if f.opcode == TEXT => got.push(String::from_utf8(f.payload).unwrap()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        pusher.join().unwrap();
        peer.send(&close_frame(1000, "done"));
        let _ = peer.read_until_close();
        got
    });
    struct Replier {
        rec: Recorder,
    }
    unsafe extern "C" fn reply(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
        let r = &*(user as *const Replier);
        on_message(conn, data, len, kind, (&r.rec as *const Recorder).cast_mut().cast());
        let text = std::str::from_utf8(std::slice::from_raw_parts(data, len)).unwrap();
        if let Some(i) = text.strip_prefix('p') {
            assert_eq!(send_text(conn, &format!("h{i}")), WsStatus::Ok);
        }
    }
    let client = Client::new();
    let options = options_with(|_| {});
    let replier = Replier { rec: Recorder::default() };
    let conn = client.connect_with(&url, options.0);
    watch(conn, &replier.rec);
    assert_eq!(ws_on_message(conn, Some(reply), user(&replier)), WsStatus::Ok);
    wait_open(&client, &replier.rec, conn);
    let sizes = [8usize, 16 << 10, 100, (16 << 10) + 1, 3000, 70 << 10, 1];
    let body = move |j: usize| {
        let mut t = format!("t{j}.");
        while t.len() < sizes[j % sizes.len()] {
            t.push('x');
        }
        t
    };
    let sender = std::thread::spawn(move || {
        for j in 0..N {
            assert_eq!(send_text(conn, &body(j)), WsStatus::Ok);
            if j % 3 == 0 {
                std::thread::yield_now();
            }
        }
    });
    client.run_until_final(&replier.rec, conn);
    sender.join().unwrap();
    let got = server.join().unwrap();
    let hs: Vec<&String> = got.iter().filter(|t| t.starts_with('h')).collect();
    let ts: Vec<&String> = got.iter().filter(|t| t.starts_with('t')).collect();
    let expected_h: Vec<String> = (0..N).map(|i| format!("h{i}")).collect();
    assert!(
        hs.iter().map(|s| s.as_str()).eq(expected_h.iter().map(String::as_str)),
        "the held replies: {} of {N}",
        hs.len()
    );
    for (j, t) in ts.iter().enumerate() {
        assert!(**t == body(j), "the other thread's message {j} differs or is out of order (len {})", t.len());
    }
    assert_eq!(ts.len(), N);
}

// ---- 9. a callback completing or freeing another client --------------------------------------------

/// Client B has flow control on and holds its first message uncompleted; client A's callback
/// completes it (ws_message_complete on B's connection) and runs B's loop until B's second
/// message comes (3 s at most). Then it frees a third client C, whose connection it sent a
/// message on just before (ws_client_free from a callback of another client: allowed, returns
/// within 250 ms). `on`: reading on dispatch.
fn complete_and_free_from_another_callback(on: bool) {
    let what = format!("read_on_dispatch {on}");
    let (b_go_tx, b_go_rx) = mpsc::channel::<()>();
    let (b_url, b_server) = serve(move |mut peer| {
        peer.upgrade();
        warm_up(&mut peer.stream, |_| {});
        b_go_rx.recv().unwrap();
        peer.send(&frame(FIN | TEXT, b"b1"));
        peer.send(&frame(FIN | TEXT, b"b2"));
        let _ = peer.read_until_close();
    });
    let (c_url, c_server) = serve(move |mut peer| {
        peer.upgrade();
        peer.read_timeout(Duration::from_secs(5));
        let mut got = Vec::new();
        while let Ok(f) = peer.read_frame() {
            got.push((f.opcode, f.payload.clone()));
            if f.opcode == CLOSE {
                break;
            }
        }
        got
    });
    let (a_go_tx, a_go_rx) = mpsc::channel::<()>();
    let (a_url, a_server) = serve(move |mut peer| {
        peer.upgrade();
        a_go_rx.recv().unwrap();
        peer.send(&frame(FIN | TEXT, b"go"));
        let _ = peer.read_until_close();
    });
    struct Outer {
        rec: Recorder,
        b: *mut WsClient,
        b_rec: *const Recorder,
        b_conn: AtomicUsize,
        c: Mutex<Option<Client>>,
        c_conn: AtomicUsize,
        outcome: Mutex<Option<(bool, WsStatus, Duration)>>,
    }
    unsafe extern "C" fn outer_message(
        conn: WsConn,
        data: *const u8,
        len: usize,
        kind: WsMessageKind,
        user: *mut c_void,
    ) {
        let o = &*(user as *const Outer);
        on_message(conn, data, len, kind, (&o.rec as *const Recorder).cast_mut().cast());
        let b_conn = o.b_conn.load(Ordering::SeqCst) as WsConn;
        let b_rec = &*o.b_rec;
        assert_eq!(ws_message_complete(b_conn), WsStatus::Ok);
        let start = Instant::now();
        let mut got = false;
        while start.elapsed() < Duration::from_secs(3) {
            if b_rec.texts(b_conn).iter().any(|t| t == "b2") {
                got = true;
                break;
            }
            readable(ws_client_fd(o.b), Duration::from_millis(20));
            assert_eq!(ws_dispatch(o.b, std::ptr::null_mut(), std::ptr::null_mut()), WsStatus::Ok);
        }
        let c_conn = o.c_conn.load(Ordering::SeqCst) as WsConn;
        assert_eq!(send_text(c_conn, "before free"), WsStatus::Ok);
        let c = o.c.lock().unwrap().take().unwrap();
        let free_start = Instant::now();
        let status = ws_client_free(c.0);
        let free_took = free_start.elapsed();
        if status == WsStatus::Ok {
            std::mem::forget(c);
        }
        *o.outcome.lock().unwrap() = Some((got, status, free_took));
    }
    let (a, b, c) = (Client::new(), Client::new(), Client::new());
    let options = options_with(|o| set(unsafe { ws_options_set_read_on_dispatch(o, on) }));
    let b_rec = Recorder::default();
    let c_rec = Recorder::default();
    let b_conn = b.connect_with(&b_url, options.0);
    watch(b_conn, &b_rec);
    let c_conn = c.connect_with(&c_url, options.0);
    watch(c_conn, &c_rec);
    wait_open(&c, &c_rec, c_conn);
    assert!(pump(&b, DEADLINE, || b_rec.of(b_conn).len() == 3), "{what}: B's warm-up");
    if on {
        wait_handed(&b, 1, &what);
    }
    assert_eq!(ws_message_complete(b_conn), WsStatus::Ok);
    assert_eq!(ws_set_flow_control(b_conn, true), WsStatus::Ok);
    b_go_tx.send(()).unwrap();
    assert!(pump(&b, DEADLINE, || b_rec.texts(b_conn).iter().any(|t| t == "b1")), "{what}: b1");
    let outer = Outer {
        rec: Recorder::default(),
        b: b.0,
        b_rec: &b_rec,
        b_conn: AtomicUsize::new(b_conn as usize),
        c: Mutex::new(Some(c)),
        c_conn: AtomicUsize::new(c_conn as usize),
        outcome: Mutex::new(None),
    };
    let a_conn = a.connect_with(&a_url, options.0);
    watch(a_conn, &outer.rec);
    assert_eq!(ws_on_message(a_conn, Some(outer_message), user(&outer)), WsStatus::Ok);
    wait_open(&a, &outer.rec, a_conn);
    a_go_tx.send(()).unwrap();
    assert!(pump(&a, DEADLINE, || outer.outcome.lock().unwrap().is_some()), "{what}: A's go");
    let (got, status, free_took) = outer.outcome.lock().unwrap().unwrap();
    assert_eq!(ws_message_complete(b_conn), WsStatus::Ok);
    let _ = close(b_conn, 1000, "");
    close(a_conn, 1000, "");
    assert!(pump(&b, DEADLINE, || b_rec.finals(b_conn) == 1), "{what}: B final");
    assert!(pump(&a, DEADLINE, || outer.rec.finals(a_conn) == 1), "{what}: A final");
    b_server.join().unwrap();
    a_server.join().unwrap();
    let c_got = c_server.join().unwrap();
    eprintln!("{what}: b2 {got}, free {status:?} in {free_took:?}; C's server got {c_got:?}");
    assert!(got, "{what}: B's second message never came to a loop run from A's callback after the complete");
    assert_eq!(status, WsStatus::Ok, "{what}: ws_client_free of another client from a callback");
    assert!(free_took < Duration::from_millis(250), "{what}: ws_client_free took {free_took:?}");
    assert_eq!(c_rec.finals(c_conn), 0, "{what}: a callback ran after ws_client_free");
    assert_eq!(b_rec.texts(b_conn), ["b1", "b2"], "{what}");
}

#[test]
fn a_callback_completes_another_clients_message_waits_for_the_next_and_frees_a_third() {
    complete_and_free_from_another_callback(true);
    complete_and_free_from_another_callback(false);
}

// ---- 10. more sockets ending at once than one harvest takes ------------------------------------

/// 300 connections of one client (more than the 256 events one harvest takes), every socket
/// the host's; then each server writes a few messages and its end (FIN, or close frame + FIN)
/// at once. Every connection gets its messages in order and exactly one final callback within
/// 3 s, under edge-triggered epoll.
#[test]
fn three_hundred_connections_ending_at_once_all_end_promptly() {
    three_hundred(true);
}

#[test]
fn three_hundred_connections_ending_at_once_without_reading_on_dispatch() {
    three_hundred(false);
}

fn three_hundred(on: bool) {
    const N: usize = 300;
    let listener = Listener::bind();
    let url = format!("ws://127.0.0.1:{}/", listener.port);
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let mut peers: Vec<Peer> = (0..N)
            .map(|_| {
                let mut p = listener.accept();
                p.upgrade();
                p
            })
            .collect();
        for p in &mut peers {
            warm_up(&mut p.stream, |_| {});
        }
        go_rx.recv().unwrap();
        peers
    });
    let client = Client::new();
    let options = options_with(|_| {});
    let rec = Recorder::default();
    set(unsafe { ws_options_set_read_on_dispatch(options.0, on) });
    let conns: Vec<WsConn> = (0..N).map(|_| client.connect_with(&url, options.0)).collect();
    conns.iter().for_each(|&c| watch(c, &rec));
    assert!(pump(&client, DEADLINE, || conns.iter().all(|&c| rec.of(c).len() == 3)), "warm-up");
    if on {
        wait_handed(&client, N, "300");
    }
    go_tx.send(()).unwrap();
    let mut peers = server.join().unwrap();
    // Which connection is which: each client socket's local port against the peer's remote one
    // is not known here; so every server sends the same messages, ended by its index's kind.
    for (i, p) in peers.iter_mut().enumerate() {
        let mut bytes: Vec<u8> = (0..5).flat_map(|m| frame(FIN | TEXT, format!("m{m}").as_bytes())).collect();
        if i % 2 == 1 {
            bytes.extend_from_slice(&close_frame(1000, "bye"));
        }
        p.send(&bytes);
        p.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let waiter = Waiter::new(Wait::EpollEdge, client.fd());
    let start = Instant::now();
    let mut finals_at = Vec::new();
    let ended = host_loop(&client, &waiter, Duration::from_secs(3), || {
        let n = conns.iter().filter(|&&c| rec.finals(c) > 0).count();
        if n > finals_at.len() {
            finals_at.resize(n, start.elapsed());
        }
        n == N
    });
    let took = start.elapsed();
    let at = |k: usize| finals_at.get(k - 1).copied();
    eprintln!(
        "read_on_dispatch {on}: finals: 1st {:?}, 100th {:?}, 200th {:?}, 256th {:?}, 257th {:?}, 300th {:?}",
        at(1),
        at(100),
        at(200),
        at(256),
        at(257),
        at(300)
    );
    let missing = conns.iter().filter(|&&c| rec.finals(c) == 0).count();
    let _ = host_loop(&client, &waiter, Duration::from_secs(40), || conns.iter().all(|&c| rec.finals(c) > 0));
    drop(peers);
    eprintln!("300 connections, read_on_dispatch {on}: ended {ended} after {took:?}");
    assert!(ended, "{missing} of {N} connections had no final callback within 3 s");
    let (mut closes, mut errors) = (0, 0);
    for &c in &conns {
        assert_eq!(rec.texts(c), ["m0", "m1", "m2", "m3", "m4"], "{:?}", rec.of(c));
        assert_eq!(rec.finals(c), 1);
        match final_event(&rec, c) {
            Some(Ev::Close(_, 1000, _)) => closes += 1,
            Some(Ev::Error(_, WsStatus::ConnectionLost, _)) => errors += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((closes, errors), (N / 2, N / 2));
}

// ---- 11. two event loops on two threads sending on each other's connections --------------------

struct Cross {
    rec: Recorder,
    /// The other loop's connection.
    other: AtomicUsize,
    /// This loop's own connection.
    own: AtomicUsize,
    prefix: &'static str,
    count: AtomicUsize,
}

unsafe extern "C" fn cross_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let x = &*(user as *const Cross);
    on_message(conn, data, len, kind, (&x.rec as *const Recorder).cast_mut().cast());
    let n = x.count.fetch_add(1, Ordering::SeqCst);
    let own = x.own.load(Ordering::SeqCst) as WsConn;
    let other = x.other.load(Ordering::SeqCst) as WsConn;
    // One send on its own connection (held), one on the other loop's (which may be held by the
    // other thread's batch), alternately first.
    let (first, second) = if n % 2 == 0 { (own, other) } else { (other, own) };
    for c in [first, second] {
        let body = format!("{}{n}", x.prefix);
        let status = send_text(c, &body);
        assert!(matches!(status, WsStatus::Ok | WsStatus::Closing), "{status:?}");
    }
}

/// Two clients, each dispatched by a thread of its own; each server pushes 500 messages; each
/// message callback sends "<prefix><n>" on its own connection and on the other loop's. Each
/// server receives both loops' messages, each loop's in order, none lost or duplicated.
#[test]
fn two_loops_on_two_threads_sending_on_each_others_connections_keep_each_order() {
    const N: usize = 500;
    let server = || {
        serve(move |mut peer| {
            peer.upgrade();
            let mut writer = peer.stream.try_clone().unwrap();
            let pusher = std::thread::spawn(move || {
                for i in 0..N {
                    writer.write_all(&frame(FIN | TEXT, format!("p{i}").as_bytes())).unwrap();
                    if i % 10 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            });
            peer.read_timeout(Duration::from_secs(20));
            let mut got = Vec::new();
            while got.len() < 2 * N {
                match peer.read_frame() {
                    Ok(f) if f.opcode == TEXT => got.push(String::from_utf8(f.payload).unwrap()),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            pusher.join().unwrap();
            peer.send(&close_frame(1000, ""));
            let _ = peer.read_until_close();
            got
        })
    };
    let ((url_a, sa), (url_b, sb)) = (server(), server());
    let (ca, cb) = (Client::new(), Client::new());
    let options = options_with(|_| {});
    let xa = Arc::new(Cross { rec: Recorder::default(), other: 0.into(), own: 0.into(), prefix: "A", count: 0.into() });
    let xb = Arc::new(Cross { rec: Recorder::default(), other: 0.into(), own: 0.into(), prefix: "B", count: 0.into() });
    let a = ca.connect_with(&url_a, options.0);
    let b = cb.connect_with(&url_b, options.0);
    xa.own.store(a as usize, Ordering::SeqCst);
    xa.other.store(b as usize, Ordering::SeqCst);
    xb.own.store(b as usize, Ordering::SeqCst);
    xb.other.store(a as usize, Ordering::SeqCst);
    watch(a, &xa.rec);
    watch(b, &xb.rec);
    assert_eq!(ws_on_message(a, Some(cross_message), user(&*xa)), WsStatus::Ok);
    assert_eq!(ws_on_message(b, Some(cross_message), user(&*xb)), WsStatus::Ok);
    struct SendClient(Client);
    unsafe impl Send for SendClient {}
    let run = |c: Client, x: Arc<Cross>, conn: WsConn| {
        let c = SendClient(c);
        std::thread::spawn(move || {
            let c = c;
            c.0.run_until_final(&x.rec, conn);
            c
        })
    };
    let ta = run(ca, xa.clone(), a);
    let tb = run(cb, xb.clone(), b);
    let (ca, cb) = (ta.join().unwrap(), tb.join().unwrap());
    let (got_a, got_b) = (sa.join().unwrap(), sb.join().unwrap());
    for (name, got) in [("A's server", &got_a), ("B's server", &got_b)] {
        for prefix in ["A", "B"] {
            let seq: Vec<usize> =
                got.iter().filter_map(|t| t.strip_prefix(prefix)).map(|n| n.parse().unwrap()).collect();
            assert!(
                seq.windows(2).all(|w| w[1] == w[0] + 1),
                "{name}: loop {prefix}'s messages out of order or lost: {seq:?}"
            );
            assert_eq!(seq.first(), Some(&0), "{name}: loop {prefix}");
        }
        assert_eq!(got.len(), 2 * N, "{name}");
    }
    drop((ca, cb));
}

// ---- 12. an urgent byte in the middle of a long burst, a FIN behind ------------------------------

/// The server writes 1,000 small messages, one more followed by a TCP urgent byte (MSG_OOB:
/// out of the stream, so the WebSocket stream stays intact; a recv stops at its mark), 1,000
/// more and its FIN, all before the host reads (the socket is the host's). Read buffer 1 KiB:
/// many dispatches, the urgent mark in the middle. Every message in order, one final within 3 s.
fn urgent_in_a_burst(on: bool) {
    let what = format!("read_on_dispatch {on}");
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, server) = serve(move |mut peer| {
        use std::os::fd::AsRawFd;
        peer.upgrade();
        warm_up(&mut peer.stream, |_| {});
        go_rx.recv().unwrap();
        let first: Vec<u8> = (0..1000).flat_map(|m| frame(FIN | TEXT, burst_message(0, m).as_bytes())).collect();
        peer.send(&first);
        let mut urgent = frame(FIN | TEXT, burst_message(0, 1000).as_bytes());
        urgent.push(b'!');
        let n = unsafe { libc::send(peer.stream.as_raw_fd(), urgent.as_ptr().cast(), urgent.len(), libc::MSG_OOB) };
        assert_eq!(n, urgent.len() as isize);
        let rest: Vec<u8> = (1001..2001).flat_map(|m| frame(FIN | TEXT, burst_message(0, m).as_bytes())).collect();
        peer.send(&rest);
        peer.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = peer.read_to_end();
    });
    let client = Client::new();
    let options = options_with(|o| {
        set(unsafe { ws_options_set_read_on_dispatch(o, on) });
        set(unsafe { ws_options_set_read_buffer_size(o, 1024) });
    });
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    assert!(pump(&client, DEADLINE, || rec.of(conn).len() == 3), "{what}: warm-up");
    if on {
        wait_handed(&client, 1, &what);
    }
    go_tx.send(()).unwrap();
    let waiter = Waiter::new(Wait::EpollEdge, client.fd());
    let ended = host_loop(&client, &waiter, Duration::from_secs(3), || rec.finals(conn) > 0);
    let got = texts(&rec, conn);
    let _ = final_within(&client, &rec, conn, Duration::from_secs(40));
    server.join().unwrap();
    let expected: Vec<String> = (0..2001).map(|m| burst_message(0, m)).collect();
    eprintln!("{what}: ended {ended}, {} messages then: {:?}", got.len(), final_event(&rec, conn));
    assert!(ended, "{what}: no final callback within 3 s ({} of 2001 messages by then)", got.len());
    assert!(texts(&rec, conn) == expected, "{what}: {} of 2001 messages", texts(&rec, conn).len());
    assert_eq!(rec.finals(conn), 1);
}

#[test]
fn an_urgent_byte_in_the_middle_of_a_long_burst_with_a_fin_behind() {
    urgent_in_a_burst(true);
}

#[test]
fn an_urgent_byte_in_the_middle_of_a_long_burst_with_a_fin_behind_without_reading_on_dispatch() {
    urgent_in_a_burst(false);
}

// ---- 13. a send held on the outer client's other connection, released by an inner batch ---------

struct Relay {
    rec: Recorder,
    a2: AtomicUsize,
    b: *mut WsClient,
    b_rec: *const Recorder,
    b_conn: AtomicUsize,
    outcome: Mutex<Option<bool>>,
}

unsafe extern "C" fn relay_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let r = &*(user as *const Relay);
    on_message(conn, data, len, kind, (&r.rec as *const Recorder).cast_mut().cast());
    if std::slice::from_raw_parts(data, len) != b"go" {
        return;
    }
    // Held until a batch ends (same client as this callback's).
    assert_eq!(send_text(r.a2.load(Ordering::SeqCst) as WsConn, "qx"), WsStatus::Ok);
    let b_conn = r.b_conn.load(Ordering::SeqCst) as WsConn;
    let start = Instant::now();
    let mut got = false;
    while start.elapsed() < Duration::from_secs(3) {
        if (*r.b_rec).texts(b_conn).iter().any(|t| t == "relay") {
            got = true;
            break;
        }
        readable(ws_client_fd(r.b), Duration::from_millis(20));
        assert_eq!(ws_dispatch(r.b, std::ptr::null_mut(), std::ptr::null_mut()), WsStatus::Ok);
    }
    *r.outcome.lock().unwrap() = Some(got);
}

/// Client A's callback (connection A1) sends "qx" on A's other connection A2 (held: a send of
/// the same client), then runs client B's loop until B's server relays that A2's server got
/// "qx". With `noise`, B's server sends "noise" first, so a batch of B's callbacks ends inside
/// the wait: its end releases what A's batch held ("every batch's end, also a nested one,
/// releases what is held"), A2's server gets "qx", and the relay comes. Without, no batch of
/// B's runs: the release comes from the dispatch of B itself (a dispatch of another client from
/// a callback releases what is held; without that, "qx" stayed held for the whole 3 s wait).
fn held_send_case(noise: bool) {
    let (relay_tx, relay_rx) = mpsc::channel::<()>();
    let (noise_tx, noise_rx) = mpsc::channel::<()>();
    let (b_url, b_server) = serve(move |mut peer| {
        peer.upgrade();
        noise_rx.recv().unwrap();
        if noise {
            peer.send(&frame(FIN | TEXT, b"noise"));
        }
        if relay_rx.recv_timeout(Duration::from_secs(5)).is_ok() {
            peer.send(&frame(FIN | TEXT, b"relay"));
        }
        let _ = peer.read_until_close();
    });
    let (a2_url, a2_server) = serve(move |mut peer| {
        peer.upgrade();
        peer.read_timeout(Duration::from_secs(5));
        let f = peer.read_frame();
        let got = matches!(&f, Ok(f) if f.payload == b"qx");
        if got {
            relay_tx.send(()).unwrap();
        }
        let _ = peer.read_until_close();
        got
    });
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (a1_url, a1_server) = serve(move |mut peer| {
        peer.upgrade();
        go_rx.recv().unwrap();
        peer.send(&frame(FIN | TEXT, b"go"));
        let _ = peer.read_until_close();
    });
    let (a, b) = (Client::new(), Client::new());
    let options = options_with(|_| {});
    let b_rec = Recorder::default();
    let b_conn = b.connect_with(&b_url, options.0);
    watch(b_conn, &b_rec);
    wait_open(&b, &b_rec, b_conn);
    let relay = Relay {
        rec: Recorder::default(),
        a2: 0.into(),
        b: b.0,
        b_rec: &b_rec,
        b_conn: (b_conn as usize).into(),
        outcome: Mutex::new(None),
    };
    let a1 = a.connect_with(&a1_url, options.0);
    let a2 = a.connect_with(&a2_url, options.0);
    relay.a2.store(a2 as usize, Ordering::SeqCst);
    watch(a1, &relay.rec);
    watch(a2, &relay.rec);
    assert_eq!(ws_on_message(a1, Some(relay_message), user(&relay)), WsStatus::Ok);
    wait_open(&a, &relay.rec, a1);
    assert!(pump(&a, DEADLINE, || relay.rec.of(a2).contains(&Ev::Open(a2))), "A2 open");
    noise_tx.send(()).unwrap();
    go_tx.send(()).unwrap();
    assert!(pump(&a, DEADLINE, || relay.outcome.lock().unwrap().is_some()), "A's go");
    let got = relay.outcome.lock().unwrap().unwrap();
    for c in [a1, a2] {
        close(c, 1000, "");
    }
    close(b_conn, 1000, "");
    assert!(pump(&a, DEADLINE, || relay.rec.finals(a1) == 1 && relay.rec.finals(a2) == 1), "A finals");
    assert!(pump(&b, DEADLINE, || b_rec.finals(b_conn) == 1), "B final");
    let a2_got = a2_server.join().unwrap();
    a1_server.join().unwrap();
    b_server.join().unwrap();
    assert!(a2_got, "A2's server never got the held send");
    assert!(got, "the relay never came: the held send was not released by the nested batch's end");
    let expected: &[&str] = if noise { &["noise", "relay"] } else { &["relay"] };
    assert_eq!(b_rec.texts(b_conn), expected);
}

#[test]
fn a_send_held_by_the_outer_batch_is_released_by_a_nested_batchs_end() {
    held_send_case(true);
}

#[test]
fn a_send_held_by_the_outer_batch_is_released_by_a_dispatch_of_another_client() {
    held_send_case(false);
}
