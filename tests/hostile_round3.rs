//! Round 3 of the attacks on the documented promises: the new write path. A small send with
//! nothing queued before it is written on the caller's thread; sends made inside callbacks are
//! held ("corked") until their dispatch batch ends; the I/O task writes the rest, and its own
//! pings, pongs and close frames; for wss both threads share the TLS session.
//!
//! What the tests assert is measured from outside the library (what the peer receives, byte for
//! byte; what the kernel holds in the sockets; whether the process survives), never read from
//! the library's counters, except where a counter's value is itself the promise
//! (ws_buffered_amount), and then it is checked against what the kernel holds.
//!
//! The raw peer and the outside measurements are tests/common/hostile.rs (rounds 1 to 3). Tests
//! wait for events; the fixed durations are margins for hand-overs that show nowhere outside the
//! library (said where used) and the bounds being asserted.

mod common;

use std::ffi::c_void;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
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

fn last_event(rec: &Recorder, conn: WsConn) -> Option<Ev> {
    rec.of(conn).last().cloned()
}

fn set(status: WsStatus) {
    assert_eq!(status, WsStatus::Ok, "{}", last_error());
}

/// Options with keepalive pings off.
fn no_keepalive() -> Options {
    let options = Options::new();
    set(unsafe { ws_options_set_keepalive(options.0, 0, 1000) });
    options
}

fn buffered(conn: WsConn) -> (WsStatus, usize) {
    let mut n = usize::MAX;
    let status = unsafe { ws_buffered_amount(conn, &mut n) };
    (status, n)
}

/// A watchdog for tests run in a child process: if `done` is not set within `limit`, prints
/// `what` and ends the process with a failure.
fn watchdog(limit: Duration, what: &'static str) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if flag.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("WATCHDOG: {what} (nothing happened for {limit:?})");
        std::process::exit(3);
    });
    done
}

/// Options that trust `identity`'s CA, keepalive off.
fn trusting(identity: &TlsIdentity) -> Options {
    let options = no_keepalive();
    let ca = cstr(identity.ca_pem.to_str().unwrap());
    set(unsafe { ws_options_add_ca_file(options.0, ca.as_ptr()) });
    options
}

/// The TLS handshake and the WebSocket upgrade, on the server's side.
fn tls_upgrade(identity: &TlsIdentity, peer: Peer) -> TlsPeer {
    let mut tls = identity.accept(peer);
    let request = read_request_from(&mut tls).expect("the upgrade request over TLS");
    tls.write_all(response_to(&request, "").as_bytes()).unwrap();
    tls.flush().unwrap();
    tls
}

/// How a frame the peer received reads in a report.
fn show(f: &Frame) -> String {
    match f.opcode {
        CLOSE => format!("close {:?} {:?}", f.close_code(), String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]))),
        TEXT => format!("text {:?}", String::from_utf8_lossy(&f.payload)),
        BINARY => format!("binary of {} bytes", f.payload.len()),
        PING => "ping".into(),
        PONG => format!("pong {:?}", String::from_utf8_lossy(&f.payload)),
        other => format!("opcode {other}"),
    }
}

/// The peer's side of a one-question conversation: sends `question`, reads the client's frames
/// up to and with its close frame, answers the close, then reads whatever still comes (nothing
/// may follow a close frame) until the stream ends. Returns every frame read, in order.
fn ask_then_read_to_the_end<S: Read + Write>(stream: &mut S, question: &[u8]) -> Vec<Frame> {
    stream.write_all(&frame(FIN | TEXT, question)).unwrap();
    stream.flush().unwrap();
    let mut frames = Vec::new();
    loop {
        match read_frame_from(stream) {
            Ok(f) => {
                let close = f.opcode == CLOSE;
                frames.push(f);
                if close {
                    break;
                }
            }
            Err(_) => return frames,
        }
    }
    let _ = stream.write_all(&close_frame(1000, ""));
    let _ = stream.flush();
    while let Ok(f) = read_frame_from(stream) {
        frames.push(f);
    }
    frames
}

// ---- 1. ws_close and the sends a callback holds -----------------------------------------------

/// What a replying callback saw: the statuses of its calls, in order.
#[derive(Default)]
struct Calls {
    statuses: Mutex<Vec<(&'static str, WsStatus)>>,
}

impl Calls {
    fn push(&self, what: &'static str, status: WsStatus) {
        self.statuses.lock().unwrap().push((what, status));
    }

    fn all(&self) -> Vec<(&'static str, WsStatus)> {
        self.statuses.lock().unwrap().clone()
    }
}

/// Replies to the question, then closes, from inside the message callback.
unsafe extern "C" fn reply_then_close(conn: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    let calls = &*(user as *const Calls);
    calls.push("send", send_text(conn, "the reply"));
    calls.push("close", close(conn, 1000, "done"));
    calls.push("send after close", send_text(conn, "too late"));
}

/// Connects to `url`, lets `reply_then_close` answer the peer's question; returns the calls'
/// statuses and the connection's events.
fn reply_then_close_over(url: &str, options: &Options) -> (Vec<(&'static str, WsStatus)>, Vec<Ev>) {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    let calls = Calls::default();
    set(ws_on_message(conn, Some(reply_then_close), user(&calls)));
    assert!(pump(&client, DEADLINE, || rec.finals(conn) > 0), "no final callback: {:?}", rec.of(conn));
    (calls.all(), rec.of(conn))
}

fn assert_reply_then_close(what: &str, calls: &[(&str, WsStatus)], events: &[Ev], frames: &[Frame]) {
    let seen: Vec<String> = frames.iter().map(show).collect();
    eprintln!("{what}: the callback's calls {calls:?}; the peer received {seen:?}; events {events:?}");
    assert_eq!(
        calls,
        [("send", WsStatus::Ok), ("close", WsStatus::Ok), ("send after close", WsStatus::Closing)],
        "{what}"
    );
    assert_eq!(
        seen,
        [r#"text "the reply""#.to_string(), r#"close Some(1000) "done""#.to_string()],
        "{what}: the reply, sent before ws_close, must reach the peer whole, before the close frame, and \
         nothing may follow the close frame"
    );
}

/// Header of ws_close: "Starts the close handshake after the messages already queued"; ws_send:
/// "Messages go out in the order of the calls that sent them". A message callback that replies,
/// then closes (the commonest way to end a conversation), then tries to send again (CLOSING):
/// the peer must get the reply, then the close frame, then nothing.
#[test]
fn a_callback_that_replies_then_closes_sends_the_reply_before_the_close_frame() {
    let (url, peer) = serve(|mut p| {
        p.upgrade();
        p.read_timeout(Duration::from_secs(10));
        ask_then_read_to_the_end(&mut p.stream, b"question")
    });
    let (calls, events) = reply_then_close_over(&url, &no_keepalive());
    let frames = peer.join().unwrap();
    assert_reply_then_close("ws", &calls, &events, &frames);
}

/// The same over wss (the TLS session shared by both threads).
#[test]
fn tls_a_callback_that_replies_then_closes_sends_the_reply_before_the_close_frame() {
    let identity = Arc::new(TlsIdentity::new());
    let server_identity = identity.clone();
    let listener = Listener::bind();
    let url = format!("wss://127.0.0.1:{}/", listener.port);
    let peer = std::thread::spawn(move || {
        let mut tls = tls_upgrade(&server_identity, listener.accept());
        tls.sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        ask_then_read_to_the_end(&mut tls, b"question")
    });
    let (calls, events) = reply_then_close_over(&url, &trusting(&identity));
    let frames = peer.join().unwrap();
    assert_reply_then_close("wss", &calls, &events, &frames);
}

/// Sends a reply, then has another thread send a message and close, and waits for that thread.
unsafe extern "C" fn reply_then_another_thread_closes(
    conn: WsConn,
    _: *const u8,
    _: usize,
    _: WsMessageKind,
    user: *mut c_void,
) {
    let calls = &*(user as *const Calls);
    calls.push("send in the callback", send_text(conn, "from the callback"));
    let (sent, closed) =
        std::thread::spawn(move || (send_text(conn, "from another thread"), close(conn, 1000, "bye"))).join().unwrap();
    calls.push("send on another thread", sent);
    calls.push("close on another thread", closed);
}

/// README: ws_close "Starts the close handshake after the messages already queued"; "Every other
/// function may be called from any thread and from inside callbacks". A message callback sends a
/// reply, then another thread sends a message and calls ws_close (the callback waits for it: the
/// calls happen one after the other). The peer must get both messages, in the order of the
/// calls, then the close frame, then nothing.
#[test]
fn a_close_from_another_thread_goes_after_the_reply_a_callback_sent_before_it() {
    let mut outcomes = Vec::new();
    for round in 0..20 {
        let (url, peer) = serve(|mut p| {
            p.upgrade();
            p.read_timeout(Duration::from_secs(10));
            ask_then_read_to_the_end(&mut p.stream, b"question")
        });
        let client = Client::new();
        let rec = Recorder::default();
        let options = no_keepalive();
        let conn = client.connect_with(&url, options.0);
        watch(conn, &rec);
        let calls = Calls::default();
        set(ws_on_message(conn, Some(reply_then_another_thread_closes), user(&calls)));
        assert!(pump(&client, DEADLINE, || rec.finals(conn) > 0), "no final callback: {:?}", rec.of(conn));
        let seen: Vec<String> = peer.join().unwrap().iter().map(show).collect();
        let calls = calls.all();
        assert!(calls.iter().all(|(_, s)| *s == WsStatus::Ok), "round {round}: {calls:?}");
        let expected = [
            r#"text "from the callback""#.to_string(),
            r#"text "from another thread""#.to_string(),
            r#"close Some(1000) "bye""#.to_string(),
        ];
        if seen != expected {
            outcomes.push(format!("round {round}: the peer received {seen:?}"));
        }
    }
    eprintln!("{} of 20 rounds wrong: {outcomes:#?}", outcomes.len());
    assert!(
        outcomes.is_empty(),
        "the messages sent before ws_close must reach the peer, in order, before the close frame: {} of 20 \
         rounds wrong, first {:?}",
        outcomes.len(),
        outcomes.first()
    );
}

// ---- 2. ws_buffered_amount and the sends a callback holds -------------------------------------

/// What the probing callback saw: the send's status, ws_buffered_amount's answer, and the bytes
/// in the kernel (the peer's unread and the client's unsent).
type Probed = (WsStatus, (WsStatus, usize), u64);

/// What the probing callback needs and what it saw.
#[derive(Default)]
struct HeldProbe {
    /// The peer's end of the connection (a copy of its socket, to ask the kernel what arrived).
    peer: Mutex<Option<(TcpStream, ClientSocket)>>,
    /// (send status, ws_buffered_amount's answer, bytes in the kernel: peer unread + client unsent)
    seen: Mutex<Option<Probed>>,
}

unsafe extern "C" fn send_then_probe(conn: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    let probe = &*(user as *const HeldProbe);
    let status = send_binary(conn, &[0x5a; 1000]);
    let amount = buffered(conn);
    let guard = probe.peer.lock().unwrap();
    let (peer, socket) = guard.as_ref().unwrap();
    let in_kernel = unread_bytes(peer.as_raw_fd()) as u64 + socket.state().map_or(0, |s| s.tx_queue);
    *probe.seen.lock().unwrap() = Some((status, amount, in_kernel));
}

/// Header of ws_buffered_amount: "how many payload bytes were accepted by ws_send/ws_send_binary
/// and not yet written to the socket (the browser's bufferedAmount)". A message callback sends
/// 1,000 bytes, then asks ws_buffered_amount, then the kernel whether any byte of it reached the
/// socket (the peer's unread bytes and the client's unsent ones). Sends made inside a callback
/// wait for the end of the dispatch batch: none is in the kernel yet, so the answer must be at
/// least 1,000.
#[test]
fn buffered_amount_counts_the_bytes_a_callback_sent_while_they_wait_for_the_batch_end() {
    let (sockets, peer_sockets) = mpsc::channel();
    let (done, peer_done) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        sockets.send((p.stream.try_clone().unwrap(), p.client_socket())).unwrap();
        p.send(&frame(FIN | TEXT, b"question"));
        let _ = peer_done.recv_timeout(PEER_TIMEOUT);
        p.read_frame().map(|f| (f.opcode, f.payload.len()))
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let probe = HeldProbe::default();
    *probe.peer.lock().unwrap() = Some(peer_sockets.recv_timeout(PEER_TIMEOUT).unwrap());
    set(ws_on_message(conn, Some(send_then_probe), user(&probe)));
    assert!(pump(&client, DEADLINE, || probe.seen.lock().unwrap().is_some()), "the question never came");
    done.send(()).unwrap();
    let (status, amount, in_kernel) = probe.seen.lock().unwrap().unwrap();
    let received = peer.join().unwrap();
    eprintln!(
        "inside the callback, after a send of 1000 bytes: {status:?}, ws_buffered_amount {amount:?}, bytes in \
         the kernel {in_kernel}; the peer then read {received:?}"
    );
    assert_eq!(status, WsStatus::Ok);
    assert_eq!(received.ok(), Some((BINARY, 1000)), "the message was sent at all");
    assert_eq!(amount.0, WsStatus::Ok);
    assert!(
        in_kernel > 0 || amount.1 >= 1000,
        "ws_buffered_amount answered {} while none of the 1000 bytes had reached the socket",
        amount.1
    );
}

/// What the callbacks of the next test saw.
#[derive(Default)]
struct EndProbe {
    go_peer: Mutex<Option<mpsc::Sender<()>>>,
    /// Sends answered OK in the message callback (the reply and the probes).
    accepted: AtomicUsize,
    /// How the last probe was answered.
    last: Mutex<Option<WsStatus>>,
    /// ws_buffered_amount inside the close callback.
    in_close: Mutex<Option<(WsStatus, usize)>>,
    close: Mutex<Option<(u16, String)>>,
}

/// Sends a reply, lets the peer close, then sends one byte at a time until ws_send answers
/// CLOSING ("once the connection has ended").
unsafe extern "C" fn reply_while_the_peer_closes(
    conn: WsConn,
    _: *const u8,
    _: usize,
    _: WsMessageKind,
    user: *mut c_void,
) {
    let probe = &*(user as *const EndProbe);
    if send_text(conn, "the reply") == WsStatus::Ok {
        probe.accepted.fetch_add(1, Ordering::SeqCst);
    }
    probe.go_peer.lock().unwrap().take().unwrap().send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let status = send_text(conn, "p");
        *probe.last.lock().unwrap() = Some(status);
        if status != WsStatus::Ok {
            return;
        }
        probe.accepted.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1));
    }
}

unsafe extern "C" fn buffered_in_close(
    conn: WsConn,
    code: u16,
    reason: *const std::os::raw::c_char,
    len: usize,
    user: *mut c_void,
) {
    let probe = &*(user as *const EndProbe);
    *probe.in_close.lock().unwrap() = Some(buffered(conn));
    let reason = String::from_utf8_lossy(std::slice::from_raw_parts(reason.cast::<u8>(), len)).into_owned();
    *probe.close.lock().unwrap() = Some((code, reason));
}

/// README: "ws_buffered_amount() tells how many payload bytes wait to be written (0 once the
/// connection has ended)". A message callback replies, then the peer closes; the callback goes
/// on sending until ws_send answers CLOSING, which the header gives "once the connection has
/// ended". In the close callback that follows, ws_buffered_amount must be 0.
#[test]
fn buffered_amount_is_zero_in_the_close_callback_after_a_callback_sent_while_the_peer_closed() {
    let (go_peer, peer_go) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        p.send(&frame(FIN | TEXT, b"question"));
        let _ = peer_go.recv_timeout(PEER_TIMEOUT);
        p.send(&close_frame(1000, "peer done"));
        let (frames, _) = p.read_timeout(Duration::from_secs(10)).read_until_close();
        let _ = p.read_to_end();
        frames.iter().map(show).collect::<Vec<_>>()
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let probe = EndProbe::default();
    *probe.go_peer.lock().unwrap() = Some(go_peer);
    set(ws_on_message(conn, Some(reply_while_the_peer_closes), user(&probe)));
    set(ws_on_close(conn, Some(buffered_in_close), user(&probe)));
    assert!(
        pump(&client, DEADLINE, || probe.close.lock().unwrap().is_some() || rec.finals(conn) > 0),
        "no final callback: {:?}",
        rec.of(conn)
    );
    let frames = peer.join().unwrap();
    let last = *probe.last.lock().unwrap();
    let in_close = *probe.in_close.lock().unwrap();
    eprintln!(
        "{} sends accepted in the callback, then {last:?}; the peer received {frames:?}; in the close callback \
         ({:?}) ws_buffered_amount answered {in_close:?}; events {:?}",
        probe.accepted.load(Ordering::SeqCst),
        probe.close.lock().unwrap(),
        rec.of(conn)
    );
    assert_eq!(last, Some(WsStatus::Closing), "ws_send says the connection has ended");
    assert_eq!(*probe.close.lock().unwrap(), Some((1000, "peer done".to_string())));
    assert_eq!(in_close, Some((WsStatus::Ok, 0)), "bytes said to wait once the connection has ended");
}

// ---- 3. ws_close in a message callback after the peer's close --------------------------------

unsafe extern "C" fn close_in_message(conn: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    let calls = &*(user as *const Calls);
    calls.push("close in the message callback", close(conn, 1000, ""));
}

/// Header of ws_close: "If the peer started the close first, it returns WS_STATUS_OK and the close
/// callback follows with the peer's code. ... a call from inside the final callback returns
/// WS_STATUS_CLOSING". The peer sends a message and its close frame in one write; the host
/// dispatches once the connection has ended (the peer saw the client's close answer and the end
/// of its stream, and ws_send answers CLOSING); in the message callback, which is not the final
/// callback, ws_close must answer OK, as it does when the host dispatches sooner.
///
/// (50 ms after ws_send first answers CLOSING, for the I/O thread to queue the final event right
/// after it: that hand-over shows nowhere outside the library.)
#[test]
fn ws_close_in_the_message_before_the_peers_close_answers_ok_however_late_the_host_dispatches() {
    let (go_peer, peer_go) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        let _ = peer_go.recv_timeout(PEER_TIMEOUT);
        let mut bytes = frame(FIN | TEXT, b"last words");
        bytes.extend(close_frame(4000, "bye"));
        p.send(&bytes);
        let (frames, _) = p.read_timeout(Duration::from_secs(10)).read_until_close();
        let end = p.read_to_end();
        (frames.iter().map(show).collect::<Vec<_>>(), end.is_ok())
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let calls = Calls::default();
    set(ws_on_message(conn, Some(close_in_message), user(&calls)));
    go_peer.send(()).unwrap();
    let (frames, ended) = peer.join().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while send_text(conn, "probe") == WsStatus::Ok {
        assert!(Instant::now() < deadline, "ws_send never answered CLOSING");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(pump(&client, DEADLINE, || rec.finals(conn) > 0), "no final callback");
    let calls = calls.all();
    eprintln!(
        "the peer received {frames:?} (then its stream ended: {ended}); calls {calls:?}; events {:?}",
        rec.of(conn)
    );
    // (The message callback here is the probe, which records nothing itself.)
    assert_eq!(rec.of(conn)[1..], [Ev::Close(conn, 4000, "bye".into())]);
    assert_eq!(
        calls,
        [("close in the message callback", WsStatus::Ok)],
        "the message callback is not the final callback, and the peer started the close first"
    );
}

// ---- 4. the send queue limit and the sends a callback holds ------------------------------------

/// Sends 1,000-byte messages until one is refused; counts those accepted.
unsafe extern "C" fn send_until_refused(conn: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    let probe = &*(user as *const (AtomicUsize, Mutex<Option<WsStatus>>));
    for _ in 0..1_000_000 {
        let status = send_binary(conn, &[0x33; 1000]);
        if status != WsStatus::Ok {
            *probe.1.lock().unwrap() = Some(status);
            return;
        }
        probe.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// One frame of a 1,000-byte message: 2 bytes, a 2-byte length, the 4-byte mask, the payload.
const FRAME_OF_1000: u64 = 1008;
/// One 1,000-byte message and its bookkeeping (README: "payloads plus 46 bytes each") fit,
/// two do not.
const SMALL_SEND_LIMIT: usize = 1100;

/// A connection with a send queue limit of 1,100 bytes to a peer that reads nothing: a message
/// callback sends 1,000-byte messages until ws_send refuses. Returns (messages accepted, the
/// refusal, frame bytes held inside the library once the sockets have settled, and then
/// ws_buffered_amount's answer).
fn held_after_a_callback_fills_the_socket() -> (u64, Option<WsStatus>, u64, (WsStatus, usize)) {
    let (sockets, peer_sockets) = mpsc::channel();
    let (stop, peer_stop) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        sockets.send(p.client_socket()).unwrap();
        p.send(&frame(FIN | TEXT, b"go"));
        let _ = peer_stop.recv_timeout(PEER_TIMEOUT);
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    set(unsafe { ws_options_set_send_queue_limit(options.0, SMALL_SEND_LIMIT) });
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let socket = peer_sockets.recv_timeout(PEER_TIMEOUT).unwrap();
    let probe = (AtomicUsize::new(0), Mutex::new(None));
    set(ws_on_message(conn, Some(send_until_refused), user(&probe)));
    assert!(pump(&client, DEADLINE, || probe.1.lock().unwrap().is_some()), "the callback never ran to its end");
    let (unsent, unread) = settled_queues(&socket, Duration::from_millis(300));
    let accepted = probe.0.load(Ordering::SeqCst) as u64;
    let held = (accepted * FRAME_OF_1000).saturating_sub(unsent + unread);
    let refusal = *probe.1.lock().unwrap();
    let amount = buffered(conn);
    stop.send(()).unwrap();
    peer.join().unwrap();
    (accepted, refusal, held, amount)
}

/// README: "past 64 MiB (`ws_options_set_send_queue_limit`) `ws_send` refuses with
/// WS_STATUS_SEND_QUEUE_FULL rather than grow"; header: "Bytes that may wait to be sent before
/// ws_send refuses". A limit of 1,100 bytes (one message and its bookkeeping), a peer that reads nothing, and a message callback
/// that sends 1,000-byte messages until refused: what the library holds once the sockets settle
/// (the frames accepted minus what the kernel holds: the client's unsent bytes and the peer's
/// unread ones) may pass the limit by at most the one message the socket took in part. Three
/// connections.
#[test]
fn the_send_queue_limit_bounds_what_waits_after_a_callbacks_sends_fill_the_socket() {
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(held_after_a_callback_fills_the_socket());
    }
    eprintln!(
        "limit {SMALL_SEND_LIMIT} bytes: (accepted 1000-byte messages, refusal, bytes held in the library, \
         ws_buffered_amount): {runs:?}"
    );
    for (accepted, refusal, held, _) in &runs {
        assert!(*accepted > 0);
        assert_eq!(*refusal, Some(WsStatus::SendQueueFull));
        assert!(
            *held <= SMALL_SEND_LIMIT as u64 + FRAME_OF_1000,
            "{held} bytes wait inside the library with a send queue limit of {SMALL_SEND_LIMIT} (runs: {runs:?})"
        );
    }
}

/// One frame of a 16 KiB message: 2 bytes, a 2-byte length, the 4-byte mask, the payload.
const FRAME_OF_16K: u64 = 16392;

/// A connection with a send queue limit of 20,000 bytes (one 16 KiB message) to a peer that
/// reads nothing: a thread (not a callback) sends 16 KiB messages, which its own thread writes,
/// until ws_send refuses. Returns (messages accepted, the refusal, ws_buffered_amount's answer,
/// payload bytes held inside the library once the sockets have settled).
fn buffered_after_a_partial_write() -> (u64, WsStatus, (WsStatus, usize), u64) {
    let (sockets, peer_sockets) = mpsc::channel();
    let (stop, peer_stop) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        sockets.send(p.client_socket()).unwrap();
        let _ = peer_stop.recv_timeout(PEER_TIMEOUT);
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    set(unsafe { ws_options_set_send_queue_limit(options.0, 20_000) });
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let socket = peer_sockets.recv_timeout(PEER_TIMEOUT).unwrap();
    let message = vec![0x44u8; 16384];
    let mut accepted = 0u64;
    let (refusal, unsent, unread, held_frames) = loop {
        match send_binary(conn, &message) {
            WsStatus::Ok => accepted += 1,
            other => {
                // Refused: a message waits. Until the socket was the caller's (the first sends
                // may wait for the I/O task), that one may since have been written: then send on.
                let (unsent, unread) = settled_queues(&socket, Duration::from_millis(300));
                let held_frames = (accepted * FRAME_OF_16K).saturating_sub(unsent + unread);
                if held_frames > 0 {
                    break (other, unsent, unread, held_frames);
                }
            }
        }
        assert!(accepted < 100_000, "ws_send never refused");
    };
    let amount = buffered(conn);
    eprintln!("client unsent {unsent}, peer unread {unread}, frames accepted {accepted}");
    // The limit (20,000 bytes) holds the unwritten end of a frame begun plus one whole message
    // at most: the held bytes less the 8-byte header of each whole frame among them (the
    // partial frame's header went out first).
    let held_payload = held_frames.saturating_sub(8 * (held_frames / FRAME_OF_16K));
    stop.send(()).unwrap();
    peer.join().unwrap();
    (accepted, refusal, amount, held_payload)
}

/// Header of ws_buffered_amount: "how many payload bytes were accepted by ws_send/ws_send_binary
/// and not yet written to the socket". A thread sends 16 KiB messages to a peer that reads
/// nothing, with a send queue limit of one message, until refused: the last one accepted was
/// written in part by the sending thread. Once the sockets settle, ws_buffered_amount must be
/// the payload bytes that the kernel has not got (the frames accepted minus the client's unsent
/// and the peer's unread bytes), within 8 bytes (a frame's header). Three connections.
#[test]
fn buffered_amount_after_a_partial_write_counts_only_what_the_socket_did_not_take() {
    let runs: Vec<_> = (0..3).map(|_| buffered_after_a_partial_write()).collect();
    eprintln!("(16 KiB messages accepted, refusal, ws_buffered_amount, payload bytes held in the library): {runs:?}");
    for (accepted, refusal, (status, amount), held) in &runs {
        assert!(*accepted > 0);
        assert_eq!(*refusal, WsStatus::SendQueueFull);
        assert_eq!(*status, WsStatus::Ok);
        assert!(
            (*amount as u64).abs_diff(*held) <= 8,
            "ws_buffered_amount answered {amount} while {held} payload bytes had not reached the socket (runs: \
             {runs:?})"
        );
    }
}

/// Header of ws_buffered_amount: "how many payload bytes were accepted ... and not yet written
/// to the socket". The situation of the previous test (a callback's sends, held until its batch
/// ends, written together, the socket taking them in part), with a limit of 1,100 bytes: once
/// the sockets settle, ws_buffered_amount must be the payload bytes of what the library holds
/// (at most 8 bytes of header for each 1,000 of payload), not the payload of every message
/// written together with them. Three connections.
#[test]
fn buffered_amount_after_a_callbacks_held_sends_were_written_in_part_counts_only_what_the_socket_did_not_take() {
    let runs: Vec<_> = (0..3).map(|_| held_after_a_callback_fills_the_socket()).collect();
    eprintln!("(accepted 1000-byte messages, refusal, frame bytes held in the library, ws_buffered_amount): {runs:?}");
    for (_, _, held, (status, amount)) in &runs {
        assert_eq!(*status, WsStatus::Ok);
        let payload_held = held * 1000 / FRAME_OF_1000;
        assert!(
            (*amount as u64).abs_diff(payload_held) <= 8 + held / 100,
            "ws_buffered_amount answered {amount} while about {payload_held} payload bytes had not reached the \
             socket (runs: {runs:?})"
        );
    }
}

// ---- 5. a peer that resets, and a host that keeps SIGPIPE's default ------------------------------

/// One connection whose peer reads 20 frames and resets it while two threads send small messages
/// as fast as they can (wss if `identity` is given). Returns the connection's final event.
fn reset_while_sending(identity: Option<Arc<TlsIdentity>>) -> Ev {
    let listener = Listener::bind();
    let url = match identity {
        Some(_) => format!("wss://127.0.0.1:{}/", listener.port),
        None => listener.url(),
    };
    let options = match &identity {
        Some(identity) => trusting(identity),
        None => no_keepalive(),
    };
    let peer = std::thread::spawn(move || {
        let p = listener.accept();
        match identity {
            Some(identity) => {
                let mut tls = tls_upgrade(&identity, p);
                for _ in 0..20 {
                    let _ = read_frame_from(&mut tls);
                }
                reset(tls.sock);
            }
            None => {
                let mut p = p;
                p.upgrade();
                for _ in 0..20 {
                    let _ = p.read_frame();
                }
                reset(p.stream);
            }
        }
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let senders: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..2_000_000 {
                    match send_binary(conn, &[1u8; 100]) {
                        WsStatus::Ok | WsStatus::SendQueueFull => {}
                        _ => return,
                    }
                }
            })
        })
        .collect();
    client.run_until_final(&rec, conn);
    for s in senders {
        s.join().unwrap();
    }
    peer.join().unwrap();
    last_event(&rec, conn).unwrap()
}

/// README, status 25: "error callback: reset or closed without a close handshake"; Security: the
/// limits "keep a hostile or broken peer from exhausting the host". The library is meant for C
/// hosts, where SIGPIPE keeps its default action (it ends the process) unless the host ignores
/// it, which the README never asks. Peers that reset their connection while two threads send:
/// each connection must end in its error callback, and the process must live. 40 connections,
/// in a process of its own with SIGPIPE as a C program has it.
#[test]
fn peers_that_reset_while_threads_send_do_not_kill_a_host_that_keeps_sigpipe_default() {
    const NAME: &str = "peers_that_reset_while_threads_send_do_not_kill_a_host_that_keeps_sigpipe_default";
    if !in_child(NAME, &[]) {
        return;
    }
    sigpipe_as_in_a_c_host();
    let done = watchdog(Duration::from_secs(100), "resets while sending");
    let mut finals = std::collections::BTreeMap::new();
    for round in 0..40 {
        eprintln!("round {round}");
        let key = match reset_while_sending(None) {
            Ev::Error(_, status, _) => format!("error {status:?}"),
            Ev::Close(_, code, _) => format!("close {code}"),
            other => panic!("not a final event: {other:?}"),
        };
        *finals.entry(key).or_insert(0) += 1;
    }
    done.store(true, Ordering::Release);
    eprintln!("40 resets while sending, the process alive; final callbacks: {finals:?}");
}

/// The same over wss, without any send: a wss connection, open and idle, that its peer resets
/// must end in one error callback (CONNECTION_LOST), and the process must live. 10 connections,
/// in a process of its own with SIGPIPE as a C program has it.
#[test]
fn tls_a_peer_that_resets_an_idle_connection_does_not_kill_a_host_that_keeps_sigpipe_default() {
    const NAME: &str = "tls_a_peer_that_resets_an_idle_connection_does_not_kill_a_host_that_keeps_sigpipe_default";
    if !in_child(NAME, &[]) {
        return;
    }
    sigpipe_as_in_a_c_host();
    let done = watchdog(Duration::from_secs(60), "idle wss resets");
    let identity = Arc::new(TlsIdentity::new());
    for round in 0..10 {
        eprintln!("round {round}");
        let listener = Listener::bind();
        let url = format!("wss://127.0.0.1:{}/", listener.port);
        let server_identity = identity.clone();
        let (opened, peer_opened) = mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let tls = tls_upgrade(&server_identity, listener.accept());
            let _ = peer_opened.recv_timeout(PEER_TIMEOUT);
            reset(tls.sock);
        });
        let client = Client::new();
        let rec = Recorder::default();
        let options = trusting(&identity);
        let conn = client.connect_with(&url, options.0);
        watch(conn, &rec);
        wait_open(&client, &rec, conn);
        opened.send(()).unwrap();
        client.run_until_final(&rec, conn);
        peer.join().unwrap();
        assert!(
            matches!(last_event(&rec, conn), Some(Ev::Error(_, WsStatus::ConnectionLost, _))),
            "{:?}",
            rec.of(conn)
        );
    }
    done.store(true, Ordering::Release);
    eprintln!("10 idle wss connections reset by their peers, the process alive");
}

// ---- 6. partial writes everywhere: a peer that reads one byte at a time -------------------------

/// A message that says who sent it, in which order, and checks its own bytes (at least 9).
fn tagged(sender: usize, seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(9);
    let mut m = Vec::with_capacity(len);
    m.push(sender as u8);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(&(len as u32).to_le_bytes());
    m.extend((9..len).map(|i| (i as u8) ^ (seq as u8) ^ (sender as u8).wrapping_mul(31)));
    m
}

/// Checks a tagged message; returns (sender, seq).
fn untag(p: &[u8]) -> Result<(usize, u32), String> {
    if p.len() < 9 {
        return Err(format!("a binary message of {} bytes", p.len()));
    }
    let (sender, seq) = (p[0] as usize, u32::from_le_bytes(p[1..5].try_into().unwrap()));
    let len = u32::from_le_bytes(p[5..9].try_into().unwrap()) as usize;
    if p != tagged(sender, seq, len).as_slice() {
        return Err(format!("message {seq} of sender {sender} arrived changed ({} bytes)", p.len()));
    }
    Ok((sender, seq))
}

/// What a conversing peer saw.
#[derive(Debug, Default)]
struct Seen {
    /// Per sender, the sequence numbers in arrival order.
    sequences: Vec<Vec<u32>>,
    replies: u32,
    pongs: Vec<Vec<u8>>,
    pings_sent: usize,
    close: Option<u16>,
    /// Everything wrong: changed messages, unknown frames, frames after the close frame.
    wrong: Vec<String>,
}

/// The peer's side of a conversation on an upgraded stream: reads every frame (through
/// `reader`, which may trickle), checks it, pings every `ping_every` frames, asks `questions`
/// questions that the host answers from inside its callback (one after each answer), answers
/// the client's close and reads to the end.
fn converse_peer<S: Read + Write>(stream: &mut S, max_read: usize, ping_every: usize, questions: u32) -> Seen {
    let mut seen = Seen { sequences: vec![Vec::new(); 8], ..Seen::default() };
    let mut frames = 0usize;
    stream.write_all(&frame(FIN | TEXT, b"question 0")).unwrap();
    stream.flush().unwrap();
    loop {
        let f = match read_frame_from(&mut Trickle { inner: &mut *stream, max: max_read }) {
            Ok(f) => f,
            Err(e) => {
                seen.wrong.push(format!("reading failed before the close: {e}"));
                return seen;
            }
        };
        frames += 1;
        if !f.fin {
            seen.wrong.push(format!("a fragment, opcode {}", f.opcode));
        }
        match f.opcode {
            BINARY => match untag(&f.payload) {
                Ok((sender, seq)) => seen.sequences[sender].push(seq),
                Err(e) => seen.wrong.push(e),
            },
            TEXT => {
                if !f.payload.starts_with(b"answer ") {
                    seen.wrong.push(format!("text {:?}", String::from_utf8_lossy(&f.payload)));
                }
                seen.replies += 1;
                if seen.replies < questions {
                    let q = format!("question {}", seen.replies);
                    stream.write_all(&frame(FIN | TEXT, q.as_bytes())).unwrap();
                    stream.flush().unwrap();
                }
            }
            PONG => seen.pongs.push(f.payload),
            CLOSE => {
                seen.close = f.close_code();
                let _ = stream.write_all(&close_frame(1000, ""));
                let _ = stream.flush();
                while let Ok(f) = read_frame_from(stream) {
                    seen.wrong.push(format!("{} after the close frame", show(&f)));
                }
                return seen;
            }
            other => seen.wrong.push(format!("opcode {other}")),
        }
        if ping_every > 0 && frames % ping_every == 0 {
            let payload = format!("ping {}", seen.pings_sent);
            stream.write_all(&frame(FIN | PING, payload.as_bytes())).unwrap();
            stream.flush().unwrap();
            seen.pings_sent += 1;
        }
    }
}

/// Answers a question from inside the message callback; `user` counts the answers.
unsafe extern "C" fn answer(conn: WsConn, data: *const u8, len: usize, _: WsMessageKind, user: *mut c_void) {
    let question = std::slice::from_raw_parts(data, len);
    let reply = [b"answer ", question].concat();
    assert_eq!(ws_send(conn, reply.as_ptr().cast(), reply.len()), WsStatus::Ok);
    (*(user as *const AtomicUsize)).fetch_add(1, Ordering::SeqCst);
}

/// Who sends what.
#[derive(Clone, Copy)]
struct Plan {
    senders: usize,
    per_sender: u32,
    sizes: &'static [usize],
    questions: u32,
    /// Each sender goes on past `per_sender` (up to four times as many) until the socket has
    /// taken three of the sends made on their callers' threads in part.
    until_partial_writes: bool,
}

/// Around 16 KiB, where the caller's thread stops writing itself, and around the frame
/// header's length encodings (125/126, 65535/65536).
const EDGE_SIZES: [usize; 9] = [9, 125, 126, 16383, 16384, 16385, 200, 65535, 65536];

/// The host's side: senders on threads of their own while the dispatching thread answers the
/// peer's questions; then ws_close right away, while much may still wait to be written.
/// Returns the final event, how many sends the socket took in part on their caller's thread,
/// and how many messages each sender sent.
fn converse_host(client: &Client, conn: WsConn, rec: &Recorder, plan: Plan) -> (Option<Ev>, usize, Vec<u32>) {
    let answered = AtomicUsize::new(0);
    set(ws_on_message(conn, Some(answer), user(&answered)));
    wait_open(client, rec, conn);
    let done = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..plan.senders)
        .map(|sender| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut seq = 0;
                loop {
                    let enough = !plan.until_partial_writes
                        || seq >= 4 * plan.per_sender
                        || wsclient::testing::partial_writes(conn).unwrap_or(0) >= 3;
                    if seq >= plan.per_sender && enough {
                        break;
                    }
                    let m = tagged(sender, seq, plan.sizes[(seq as usize + sender) % plan.sizes.len()]);
                    assert_eq!(send_binary(conn, &m), WsStatus::Ok, "sender {sender}, message {seq}");
                    seq += 1;
                    // Once a send is queued, every later one queues behind it while the peer
                    // reads slowly (and a callback's send made while this thread writes is
                    // queued too): until the case happened, let the queue empty, so that this
                    // thread writes again until the socket fills anew.
                    if plan.until_partial_writes
                        && wsclient::testing::partial_writes(conn).unwrap_or(0) < 3
                        && common::buffered(conn) > 0
                    {
                        wait_until_sent(conn);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
                seq
            })
        })
        .collect();
    let all = plan.questions as usize;
    assert!(
        pump(client, Duration::from_secs(60), || done.load(Ordering::SeqCst) == plan.senders
            && answered.load(Ordering::SeqCst) == all),
        "senders done: {}, questions answered: {}",
        done.load(Ordering::SeqCst),
        answered.load(Ordering::SeqCst)
    );
    let sent = senders.into_iter().map(|s| s.join().unwrap()).collect();
    let partial = wsclient::testing::partial_writes(conn).unwrap_or(0);
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    assert!(pump(client, Duration::from_secs(60), || rec.finals(conn) > 0), "no final callback");
    (last_event(rec, conn), partial, sent)
}

fn check_conversation(what: &str, seen: &Seen, plan: Plan, sent: &[u32]) {
    eprintln!(
        "{what}: {:?} messages per sender, {} replies, {} of {} pings answered (in order), close {:?}, wrong: {:?}",
        seen.sequences[..plan.senders].iter().map(Vec::len).collect::<Vec<_>>(),
        seen.replies,
        seen.pongs.len(),
        seen.pings_sent,
        seen.close,
        seen.wrong
    );
    assert!(seen.wrong.is_empty(), "{what}: {:?}", seen.wrong);
    assert_eq!(seen.close, Some(1000), "{what}");
    for (sender, &count) in sent.iter().enumerate().take(plan.senders) {
        let expected: Vec<u32> = (0..count).collect();
        let seqs = &seen.sequences[sender];
        assert!(
            *seqs == expected,
            "{what}: sender {sender}: {} messages, first out of order at {:?}",
            seqs.len(),
            seqs.iter().zip(&expected).position(|(a, b)| a != b)
        );
    }
    assert_eq!(seen.replies, plan.questions, "{what}: every question answered");
    // Pongs answer pings in order. Some may be missing: answers waiting behind megabytes the
    // peer has not read yet are coalesced past 32 (README: "only pings sent faster than the
    // server reads the answers are coalesced ..., the oldest dropped first").
    let answered: Vec<usize> = seen
        .pongs
        .iter()
        .map(|p| String::from_utf8_lossy(p).strip_prefix("ping ").and_then(|i| i.parse().ok()).unwrap_or(usize::MAX))
        .collect();
    assert!(
        answered.windows(2).all(|w| w[0] < w[1]) && answered.iter().all(|i| *i < seen.pings_sent),
        "{what}: pongs out of order, or answering no ping: {answered:?}"
    );
}

/// One thread sending what its own thread writes (up to 16 KiB): once the socket is full,
/// the socket takes its writes in part.
const TRICKLE: Plan =
    Plan { senders: 1, per_sender: 1500, sizes: &SMALL_EDGE_SIZES, questions: 10, until_partial_writes: true };
/// Two threads, sizes on both sides of 16 KiB: the I/O task writes most.
const TRICKLE_MIXED: Plan =
    Plan { senders: 2, per_sender: 45, sizes: &EDGE_SIZES, questions: 10, until_partial_writes: false };
const SMALL_EDGE_SIZES: [usize; 7] = [9, 125, 126, 16383, 16384, 200, 5000];

/// README "Performance": "what the socket does not take at once ... pings, pongs and close
/// frames are written by the I/O task; ... only one side writes at a time, and nothing
/// overtakes what was sent before it". A peer with a 4 KiB receive buffer that reads seven bytes
/// per read (every header cut) and pings every 10 frames; one thread sends 1,500 messages of up
/// to 16 KiB (its own thread writes them, and once the socket is full the socket takes them in
/// part; it sends more, up to 6,000, until that happened three times), the host answers
/// questions from its callback, then closes while much still waits:
/// every frame arrives whole, in order, pongs in order among them, the close frame last.
/// (Loopback sockets take megabytes before a write is partial: one byte a read would take
/// minutes; the wss test below reads one byte at a time.)
#[test]
fn a_peer_that_reads_seven_bytes_at_a_time_gets_every_frame_whole_and_in_order() {
    let (url, peer) = serve_on(Listener::bind_receive_buffer(4096), |mut p| {
        p.upgrade();
        converse_peer(&mut p.stream, 7, 10, TRICKLE.questions)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let (end, partial, sent) = converse_host(&client, conn, &rec, TRICKLE);
    let seen = peer.join().unwrap();
    eprintln!("ws, seven bytes a read: {partial} sends written in part on their caller's thread; {end:?}");
    check_conversation("ws, seven bytes a read", &seen, TRICKLE, &sent);
    assert!(partial > 0, "no send was written in part on its caller's thread: the test missed its case");
    assert_eq!(end, Some(Ev::Close(conn, 1000, String::new())));
}

/// Over wss, the TLS peer reads the TCP stream one byte at a time, and every record must decrypt
/// (a record made of bytes from both threads would not); two threads send messages around
/// 16 KiB and around the header's length encodings (125/126, 65535/65536).
#[test]
fn tls_a_peer_that_reads_one_byte_at_a_time_gets_every_record_and_frame_whole_and_in_order() {
    let identity = Arc::new(TlsIdentity::new());
    let server_identity = identity.clone();
    let listener = Listener::bind_receive_buffer(4096);
    let url = format!("wss://127.0.0.1:{}/", listener.port);
    let peer = std::thread::spawn(move || {
        let p = listener.accept();
        let connection = rustls::ServerConnection::new(Arc::new(server_identity.server_config())).unwrap();
        let mut tls = rustls::StreamOwned::new(connection, Trickle { inner: p.stream, max: 1 });
        let request = read_request_from(&mut tls).expect("the upgrade request over TLS");
        tls.write_all(response_to(&request, "").as_bytes()).unwrap();
        tls.flush().unwrap();
        converse_peer(&mut tls, usize::MAX, 10, TRICKLE_MIXED.questions)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&identity);
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let (end, partial, sent) = converse_host(&client, conn, &rec, TRICKLE_MIXED);
    let seen = peer.join().unwrap();
    eprintln!("wss, one byte a read: {partial} sends written in part on their caller's thread; {end:?}");
    check_conversation("wss, one byte a read", &seen, TRICKLE_MIXED, &sent);
    assert_eq!(end, Some(Ev::Close(conn, 1000, String::new())));
}

// ---- 7. wss: the server updates its keys while both threads encrypt ----------------------------

const KEY_UPDATES: Plan = Plan {
    senders: 3,
    per_sender: 300,
    sizes: &[9, 100, 3000, 16384, 16385, 30000],
    questions: 30,
    until_partial_writes: false,
};

/// TLS 1.3 KeyUpdate with update_requested: the client's session answers with a KeyUpdate of its
/// own and encrypts with new keys from then on, while the host's threads encrypt their sends in
/// the same session. The server requests a key update every 25 frames it reads; three threads
/// send and the host answers questions: every record decrypts, every frame arrives whole and in
/// order, the close is normal.
#[test]
fn tls_key_updates_requested_while_threads_send_keep_every_record_readable_and_in_order() {
    let identity = Arc::new(TlsIdentity::new());
    let server_identity = identity.clone();
    let listener = Listener::bind_small_receive_buffer();
    let url = format!("wss://127.0.0.1:{}/", listener.port);
    let updates = Arc::new(AtomicUsize::new(0));
    let counted = updates.clone();
    let peer = std::thread::spawn(move || {
        let mut tls = tls_upgrade(&server_identity, listener.accept());
        assert_eq!(tls.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        // Reads through a wrapper that requests a key update every 25 frames' worth of reads.
        struct Updating<'a> {
            tls: &'a mut TlsPeer,
            reads: usize,
            updates: Arc<AtomicUsize>,
        }
        impl Read for Updating<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.reads += 1;
                if self.reads % 75 == 0 {
                    self.tls.conn.refresh_traffic_keys().map_err(std::io::Error::other)?;
                    self.tls.flush()?;
                    self.updates.fetch_add(1, Ordering::SeqCst);
                }
                self.tls.read(buf)
            }
        }
        impl Write for Updating<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.tls.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.tls.flush()
            }
        }
        converse_peer(
            &mut Updating { tls: &mut tls, reads: 0, updates: counted },
            usize::MAX,
            40,
            KEY_UPDATES.questions,
        )
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&identity);
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let (end, partial, sent) = converse_host(&client, conn, &rec, KEY_UPDATES);
    let seen = peer.join().unwrap();
    eprintln!(
        "wss with {} key updates requested: {partial} partial writes on the callers' threads; {end:?}",
        updates.load(Ordering::SeqCst)
    );
    check_conversation("wss with key updates", &seen, KEY_UPDATES, &sent);
    assert!(updates.load(Ordering::SeqCst) >= 20, "too few key updates: the test missed its case");
    assert_eq!(end, Some(Ev::Close(conn, 1000, String::new())));
}

// ---- 8. sends before the open, then the caller's thread -----------------------------------------

/// Sends one text message from the open callback.
unsafe extern "C" fn send_on_open(conn: WsConn, user: *mut c_void) {
    let status = send_text(conn, "from the open callback");
    *(*(user as *const Mutex<Option<WsStatus>>)).lock().unwrap() = Some(status);
}

/// README "Threading contract": "Sends before open are queued and go out in order after the
/// handshake"; header of ws_send: "Messages go out in the order of the calls that sent them,
/// whatever the threads". A thread sends 300 messages while the peer holds back its 101; then
/// the peer answers and the thread goes on (its sends now race the open: queued, or written by
/// the thread itself once the socket is the caller's), a second thread starts sending, and the
/// open callback sends one message. Every thread's messages arrive whole and in order, the
/// first thread's 300 before the open callback's message (they were sent before the open), and
/// nothing follows the close frame.
#[test]
fn sends_queued_before_the_open_go_before_those_written_after_it() {
    const EARLY: u32 = 300;
    const PER_SENDER: u32 = 1500;
    let (go, peer_go) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        let request = p.read_request();
        let _ = peer_go.recv_timeout(PEER_TIMEOUT);
        p.send(response_to(&request, "").as_bytes());
        p.read_timeout(Duration::from_secs(20));
        // (sender, seq) or None for the open callback's message, in arrival order; what was wrong.
        let mut arrived = Vec::new();
        let mut wrong = Vec::new();
        loop {
            match p.read_frame() {
                Ok(f) if f.opcode == BINARY => match untag(&f.payload) {
                    Ok(tag) => arrived.push(Some(tag)),
                    Err(e) => wrong.push(e),
                },
                Ok(f) if f.opcode == TEXT && f.payload == b"from the open callback" => arrived.push(None),
                Ok(f) if f.opcode == CLOSE => {
                    p.send(&close_frame(1000, ""));
                    while let Ok(f) = p.read_frame() {
                        wrong.push(format!("{} after the close frame", show(&f)));
                    }
                    return (arrived, wrong);
                }
                Ok(f) => wrong.push(show(&f)),
                Err(e) => {
                    wrong.push(format!("reading failed before the close: {e}"));
                    return (arrived, wrong);
                }
            }
        }
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let opened = Mutex::new(None);
    set(ws_on_open(conn, Some(send_on_open), user(&opened)));
    let sizes = [9usize, 125, 126, 16383, 16384, 16385, 200, 5000];
    let (started, second_go) = mpsc::channel::<()>();
    let first = std::thread::spawn(move || {
        for seq in 0..PER_SENDER {
            if seq == EARLY {
                go.send(()).unwrap();
                started.send(()).unwrap();
            }
            assert_eq!(send_binary(conn, &tagged(0, seq, sizes[seq as usize % sizes.len()])), WsStatus::Ok);
        }
    });
    let second = std::thread::spawn(move || {
        let _ = second_go.recv_timeout(PEER_TIMEOUT);
        for seq in 0..PER_SENDER {
            assert_eq!(send_binary(conn, &tagged(1, seq, sizes[(seq as usize + 3) % sizes.len()])), WsStatus::Ok);
        }
    });
    assert!(pump(&client, DEADLINE, || first.is_finished() && second.is_finished()), "the senders never finished");
    first.join().unwrap();
    second.join().unwrap();
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    assert!(pump(&client, DEADLINE, || rec.finals(conn) > 0), "no final callback");
    let (arrived, wrong) = peer.join().unwrap();
    let open_at = arrived.iter().position(Option::is_none);
    let early_end = arrived.iter().position(|a| *a == Some((0, EARLY - 1)));
    eprintln!(
        "{} messages arrived; the open callback's ({:?}) at {open_at:?}, the last early one at {early_end:?}; wrong: \
         {wrong:?}",
        arrived.len(),
        *opened.lock().unwrap()
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(*opened.lock().unwrap(), Some(WsStatus::Ok));
    for sender in 0..2 {
        let seqs: Vec<u32> = arrived.iter().flatten().filter(|(s, _)| *s == sender).map(|(_, q)| *q).collect();
        assert!(
            seqs == (0..PER_SENDER).collect::<Vec<_>>(),
            "sender {sender}: {} messages, first out of order at {:?}",
            seqs.len(),
            seqs.iter().enumerate().position(|(i, q)| *q != i as u32)
        );
    }
    assert_eq!(arrived.iter().filter(|a| a.is_none()).count(), 1, "the open callback's message, once");
    assert!(open_at > early_end, "the open callback's message overtook messages sent before the open");
    assert_eq!(last_event(&rec, conn), Some(Ev::Close(conn, 1000, String::new())));
}

// ---- 9. connections ending while threads send: a later connection gets none of their bytes -----

/// The message sent on connection `n`: its number, then a pattern of it (64 bytes).
fn for_connection(n: u32) -> Vec<u8> {
    let mut m = n.to_le_bytes().to_vec();
    m.extend((4..64).map(|i| (i as u8) ^ (n as u8)));
    m
}

/// The peer of one connection: checks that the upgrade request is the one of the path it names
/// and that every frame carries that connection's number, then resets the connection after 30
/// frames. Returns what was wrong.
fn numbered_peer(mut p: Peer) -> Vec<String> {
    let mut wrong = Vec::new();
    p.read_timeout(Duration::from_secs(10));
    let request = match read_request_from(&mut p.stream) {
        Ok(r) => r,
        Err(e) => return vec![format!("no request: {e}")],
    };
    let n = request.strip_prefix("GET /c").and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse::<u32>().ok());
    let Some(n) = n else {
        return vec![format!("a garbled request: {:?}", &request[..request.len().min(80)])];
    };
    p.send(response_to(&request, "").as_bytes());
    for _ in 0..30 {
        match p.read_frame() {
            Ok(f) if f.opcode == BINARY && f.payload == for_connection(n) => {}
            Ok(f) => {
                let tag = f.payload.get(..4).map(|t| u32::from_le_bytes(t.try_into().unwrap()));
                wrong.push(format!("connection {n} received {} tagged {tag:?}", show(&f)));
            }
            Err(_) => break,
        }
    }
    reset(p.stream);
    wrong
}

/// A closed descriptor's number is the next one a new socket gets: a write made through a stale
/// descriptor would land in another connection (a later client connection, or, in this
/// process, a peer's end). 300 connections, six at a time, each reset by its peer after 30
/// frames while four threads send on every live connection as fast as they can: every request
/// the peers read is the one of its connection, every frame carries its connection's number,
/// and every connection ends with CONNECTION_LOST (a byte of a stale write arriving on a client
/// connection would fail it as a protocol error).
#[test]
fn connections_reset_while_threads_send_never_write_into_a_later_connection() {
    const CONNECTIONS: u32 = 300;
    const LIVE: usize = 6;
    let listener = Listener::bind();
    let port = listener.port;
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let acceptor = {
        let problems = problems.clone();
        std::thread::spawn(move || {
            let mut peers = Vec::new();
            for _ in 0..CONNECTIONS {
                let p = listener.accept();
                let problems = problems.clone();
                peers.push(std::thread::spawn(move || problems.lock().unwrap().extend(numbered_peer(p))));
            }
            for p in peers {
                p.join().unwrap();
            }
        })
    };
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let live = Arc::new(Mutex::new(Vec::<(WsConn, u32)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let (live, stop) = (live.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let snapshot = live.lock().unwrap().clone();
                    if snapshot.is_empty() {
                        std::thread::yield_now();
                    }
                    for (conn, n) in snapshot {
                        if send_binary(conn, &for_connection(n)) == WsStatus::Ok {
                            sent += 1;
                        }
                    }
                }
                sent
            })
        })
        .collect();
    let mut opened = 0u32;
    let mut finals = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        {
            let mut live = live.lock().unwrap();
            live.retain(|(conn, _)| {
                let ended = rec.finals(*conn) > 0;
                if ended {
                    let key = match last_event(&rec, *conn) {
                        Some(Ev::Error(_, status, _)) => format!("error {status:?}"),
                        other => format!("{other:?}"),
                    };
                    *finals.entry(key).or_insert(0) += 1;
                }
                !ended
            });
            while live.len() < LIVE && opened < CONNECTIONS {
                let conn = client.connect_with(&format!("ws://127.0.0.1:{port}/c{opened}"), options.0);
                watch(conn, &rec);
                live.push((conn, opened));
                opened += 1;
            }
            if live.is_empty() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "connections still alive after 120 s: {:?}", live.lock().unwrap());
        if client.wait_readable(Duration::from_millis(20)) {
            client.dispatch();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|s| s.join().unwrap()).sum();
    acceptor.join().unwrap();
    let problems = problems.lock().unwrap().clone();
    eprintln!("{CONNECTIONS} connections, {sent} sends accepted; final callbacks {finals:?}; problems {problems:?}");
    assert!(problems.is_empty(), "{} problems, first {:?}", problems.len(), problems.first());
    assert_eq!(finals.get("error ConnectionLost"), Some(&(CONNECTIONS as usize)), "{finals:?}");
}

// ---- 10. a close that waits for the peer, after a callback's held sends -------------------------

/// What the callback of the next test needs: its calls, and word from the peer that the close
/// frame arrived.
#[derive(Default)]
struct CloseElsewhere {
    calls: Calls,
    peer_got_close: Mutex<Option<mpsc::Receiver<()>>>,
}

/// As `reply_then_another_thread_closes`, then waits (at most 2 s) until the peer has received
/// the close frame before it returns (so the I/O task has written it before the batch ends).
unsafe extern "C" fn reply_then_another_thread_closes_and_wait(
    conn: WsConn,
    data: *const u8,
    len: usize,
    kind: WsMessageKind,
    state: *mut c_void,
) {
    let state = &*(state as *const CloseElsewhere);
    reply_then_another_thread_closes(conn, data, len, kind, user(&state.calls));
    if let Some(got) = state.peer_got_close.lock().unwrap().take() {
        let _ = got.recv_timeout(Duration::from_secs(2));
    }
}

/// README "Security": the limits "keep a hostile or broken peer from exhausting the host"; the
/// close timeout bounds a close the peer does not answer. A message callback sends a reply, then
/// another thread sends and calls ws_close (the callback waits for it, then until the peer has
/// the close frame, at most 2 s); the peer reads everything but never answers the close. Until the close timeout (2 s) ends the connection, nothing happens
/// but waiting: the library's I/O threads may use at most 10% of that time in CPU. Run in a
/// process of its own (the I/O threads' CPU is the process's).
#[test]
fn a_close_the_peer_does_not_answer_costs_no_cpu_after_a_callbacks_held_sends() {
    const NAME: &str = "a_close_the_peer_does_not_answer_costs_no_cpu_after_a_callbacks_held_sends";
    if !in_child(NAME, &[]) {
        return;
    }
    let done = watchdog(Duration::from_secs(60), "a close the peer does not answer");
    let (stop, peer_stop) = mpsc::channel::<()>();
    let (got_close, peer_got_close) = mpsc::channel::<()>();
    let (url, peer) = serve(move |mut p| {
        p.upgrade();
        p.send(&frame(FIN | TEXT, b"question"));
        let (frames, _) = p.read_timeout(Duration::from_secs(10)).read_until_close();
        let _ = got_close.send(());
        // Never answers: waits until the test is done.
        let _ = peer_stop.recv_timeout(PEER_TIMEOUT);
        frames.iter().map(show).collect::<Vec<_>>()
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    set(unsafe { ws_options_set_close_timeout_ms(options.0, 2000) });
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let state = CloseElsewhere::default();
    *state.peer_got_close.lock().unwrap() = Some(peer_got_close);
    set(ws_on_message(conn, Some(reply_then_another_thread_closes_and_wait), user(&state)));
    let calls = &state.calls;
    assert!(pump(&client, DEADLINE, || calls.all().len() == 3), "the question never came");
    let (io, started) = (io_threads_cpu(), Instant::now());
    assert!(pump(&client, DEADLINE, || rec.finals(conn) > 0), "no final callback");
    let (io, waited) = (io_threads_cpu() - io, started.elapsed());
    stop.send(()).unwrap();
    let frames = peer.join().unwrap();
    done.store(true, Ordering::Release);
    eprintln!(
        "calls {:?}; the peer received {frames:?}; waiting {waited:?} for the close, the I/O threads used {io:?} of CPU; \
         events {:?}",
        calls.all(),
        rec.of(conn)
    );
    assert!(matches!(last_event(&rec, conn), Some(Ev::Error(_, WsStatus::CloseTimeout, _))), "{:?}", rec.of(conn));
    assert!(
        io <= waited.mul_f64(0.10),
        "the I/O threads used {io:?} of CPU in {waited:?} while the close waited for the peer"
    );
}

// ---- 11. a callback's burst, written together, while other threads send ------------------------

/// What the bursting callback counts.
#[derive(Default)]
struct Burst {
    answered: AtomicUsize,
    next: std::sync::atomic::AtomicU32,
}

/// The sender number of the callback's burst messages.
const BURST_SENDER: usize = 7;

/// Answers each question with 40 numbered messages (held until the batch ends and written
/// together), then the text answer.
unsafe extern "C" fn answer_with_a_burst(
    conn: WsConn,
    data: *const u8,
    len: usize,
    _: WsMessageKind,
    user: *mut c_void,
) {
    let burst = &*(user as *const Burst);
    for _ in 0..40 {
        let seq = burst.next.fetch_add(1, Ordering::SeqCst);
        let m = tagged(BURST_SENDER, seq, [9usize, 125, 1000, 3000][seq as usize % 4]);
        assert_eq!(send_binary(conn, &m), WsStatus::Ok);
    }
    let reply = [b"answer ", std::slice::from_raw_parts(data, len)].concat();
    assert_eq!(ws_send(conn, reply.as_ptr().cast(), reply.len()), WsStatus::Ok);
    burst.answered.fetch_add(1, Ordering::SeqCst);
}

/// README "Performance": "Sends made inside callbacks are held until their dispatch batch ends
/// and written together ... nothing overtakes what was sent before it". A peer that reads 512
/// bytes at a time and pings every 50 frames; two threads send 3,000 messages of up to 16 KiB
/// each while the host answers 150 questions, each with 40 messages and a text answer from its
/// callback (the batch's frames written together when it ends, in part when the socket is
/// full, the rest by the I/O task while the threads go on sending). Every thread's messages and
/// the callback's arrive whole and in order, pongs in order, the close frame last.
#[test]
fn a_callbacks_burst_written_in_part_while_threads_send_keeps_every_order() {
    const PLAN: Plan =
        Plan { senders: 2, per_sender: 3000, sizes: &SMALL_EDGE_SIZES, questions: 150, until_partial_writes: false };
    let (url, peer) = serve_on(Listener::bind_small_receive_buffer(), |mut p| {
        p.upgrade();
        converse_peer(&mut p.stream, 512, 50, PLAN.questions)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    let burst = Burst::default();
    set(ws_on_message(conn, Some(answer_with_a_burst), user(&burst)));
    wait_open(&client, &rec, conn);
    let senders: Vec<_> = (0..PLAN.senders)
        .map(|sender| {
            std::thread::spawn(move || {
                for seq in 0..PLAN.per_sender {
                    let m = tagged(sender, seq, PLAN.sizes[(seq as usize + sender) % PLAN.sizes.len()]);
                    assert_eq!(send_binary(conn, &m), WsStatus::Ok, "sender {sender}, message {seq}");
                }
            })
        })
        .collect();
    assert!(
        pump(&client, Duration::from_secs(60), || senders.iter().all(|s| s.is_finished())
            && burst.answered.load(Ordering::SeqCst) == PLAN.questions as usize),
        "questions answered: {}",
        burst.answered.load(Ordering::SeqCst)
    );
    for s in senders {
        s.join().unwrap();
    }
    let partial = wsclient::testing::partial_writes(conn).unwrap_or(0);
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    assert!(pump(&client, Duration::from_secs(60), || rec.finals(conn) > 0), "no final callback");
    let seen = peer.join().unwrap();
    let bursts = &seen.sequences[BURST_SENDER];
    eprintln!(
        "{partial} writes on callers' threads taken in part; the callback's burst messages: {}; {:?}",
        bursts.len(),
        last_event(&rec, conn)
    );
    check_conversation("a callback's bursts among two senders", &seen, PLAN, &[PLAN.per_sender; 2]);
    assert!(
        *bursts == (0..40 * PLAN.questions).collect::<Vec<_>>(),
        "the callback's messages: {} of {}, first out of order at {:?}",
        bursts.len(),
        40 * PLAN.questions,
        bursts.iter().enumerate().position(|(i, q)| *q != i as u32)
    );
    assert_eq!(last_event(&rec, conn), Some(Ev::Close(conn, 1000, String::new())));
}
