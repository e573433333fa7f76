//! Sends are written on the thread that makes them when they are small and nothing is queued
//! before them, by the I/O task otherwise; the task also writes its own frames (answers to
//! pings, keepalive pings, close frames). Whatever the interleaving, every message must arrive
//! whole, once, in the order each thread sent it, and nothing may follow our close frame. The
//! peer here reads slowly through a small receive buffer, so that writes are partial on both
//! threads, and pings all along; over ws and over wss.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::hostile::*;
use common::server::tls_server_config;
use common::*;

/// Who sends what: how many threads, how many messages each, of which sizes (cycled).
#[derive(Clone, Copy)]
struct Plan {
    senders: usize,
    per_sender: u32,
    sizes: &'static [usize],
    /// The peer pings all along (the I/O task then writes answers among the sends).
    pings: bool,
    /// The sender goes on past `per_sender` until a send was written in part on its own
    /// thread (see `send_until_partial`).
    until_partial: bool,
}

/// Four threads at once, sizes on both sides of 16 KiB: the I/O task writes most.
const MIXED: Plan = Plan { senders: 4, per_sender: 250, sizes: &SIZES, pings: true, until_partial: false };
/// One thread, sizes the caller's thread writes itself: the socket fills up under its own
/// writes, which it then takes only in part (the I/O task writes the rest).
const SMALL_FROM_ONE_THREAD: Plan =
    Plan { senders: 1, per_sender: 1500, sizes: &SMALL_SIZES, pings: false, until_partial: true };

/// How many messages the sender of `until_partial` may send before the test gives up.
const PARTIAL_CAP: u32 = 60_000;
/// Around the size up to which the caller's thread writes a message itself (16 KiB).
const SIZES: [usize; 8] = [0, 1, 9, 125, 5000, 16384, 16385, 40000];

/// Sizes that the caller's thread writes itself (up to 16 KiB).
const SMALL_SIZES: [usize; 5] = [9, 125, 5000, 9000, 16384];

/// A message that says who sent it, in which order, and checks its own bytes.
fn message(plan: Plan, sender: usize, seq: u32) -> Vec<u8> {
    sized_message(sender, seq, plan.sizes[(seq as usize + sender) % plan.sizes.len()])
}

fn sized_message(sender: usize, seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(9);
    let mut m = Vec::with_capacity(len);
    m.push(sender as u8);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(&(len as u32).to_le_bytes());
    m.extend((9..len).map(|i| (i as u8) ^ (seq as u8) ^ (sender as u8)));
    m
}

/// What the peer saw.
#[derive(Debug, Default)]
struct Seen {
    /// Per sender, the sequence numbers in arrival order.
    sequences: Vec<Vec<u32>>,
    replies: u32,
    pongs: Vec<Vec<u8>>,
    pings_sent: usize,
    close: Option<u16>,
    /// What arrived after our close frame (must stay empty), or how reading failed.
    after_close: Vec<String>,
}

/// A slow reader: at most 4 KiB a read, with a pause before each (a slow link).
struct Slow<S>(S);

impl<S: Read> Read for Slow<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_micros(300));
        let n = buf.len().min(4 << 10);
        self.0.read(&mut buf[..n])
    }
}

/// The peer's side of the conversation on an upgraded stream: reads every frame slowly,
/// checks it, pings every 50 frames, sends a few text messages the host answers from inside
/// its callback, answers the client's close and reads to the end.
fn peer<S: Read + Write>(mut stream: S, plan: Plan) -> Seen {
    let mut seen = Seen { sequences: vec![Vec::new(); MIXED.senders], ..Seen::default() };
    let mut frames = 0usize;
    stream.write_all(&frame(FIN | TEXT, b"question 0")).unwrap();
    loop {
        let f = match read_frame_from(&mut Slow(&mut stream)) {
            Ok(f) => f,
            Err(e) => {
                seen.after_close.push(format!("reading failed before the close: {e}"));
                return seen;
            }
        };
        assert!(f.fin, "a fragment: {:?}", f.opcode);
        frames += 1;
        match f.opcode {
            BINARY => {
                let p = &f.payload;
                let (sender, seq) = (p[0] as usize, u32::from_le_bytes(p[1..5].try_into().unwrap()));
                let len = u32::from_le_bytes(p[5..9].try_into().unwrap()) as usize;
                assert_eq!(p, &sized_message(sender, seq, len), "message {seq} of sender {sender} arrived changed");
                seen.sequences[sender].push(seq);
            }
            TEXT => {
                assert!(f.payload.starts_with(b"answer "), "{:?}", String::from_utf8_lossy(&f.payload));
                seen.replies += 1;
                if seen.replies < 20 {
                    let q = format!("question {}", seen.replies);
                    stream.write_all(&frame(FIN | TEXT, q.as_bytes())).unwrap();
                }
            }
            PONG => seen.pongs.push(f.payload),
            CLOSE => {
                seen.close = f.close_code();
                stream.write_all(&close_frame(1000, "")).unwrap();
                // Nothing may follow the close frame: read to the end.
                loop {
                    match read_frame_from(&mut stream) {
                        Ok(f) => seen.after_close.push(format!("opcode {} after the close", f.opcode)),
                        Err(_) => return seen,
                    }
                }
            }
            other => panic!("opcode {other}"),
        }
        if plan.pings && frames % 50 == 0 {
            let payload = format!("ping {}", seen.pings_sent);
            stream.write_all(&frame(FIN | PING, payload.as_bytes())).unwrap();
            seen.pings_sent += 1;
        }
    }
}

/// Answers a question from inside the message callback; `user` counts the answers.
unsafe extern "C" fn answer(conn: WsConn, data: *const u8, len: usize, _: WsMessageKind, user: *mut std::ffi::c_void) {
    let question = std::slice::from_raw_parts(data, len);
    let reply = [b"answer ", question].concat();
    assert_eq!(ws_send(conn, reply.as_ptr().cast(), reply.len()), WsStatus::Ok);
    (*(user as *const AtomicU32)).fetch_add(1, Ordering::SeqCst);
}

/// Sends from SENDERS threads at once while the dispatching thread answers the peer's
/// questions, then closes; returns when the connection has ended, with how many messages
/// each sender sent.
fn converse(client: &Client, url: &str, options: Option<&Options>, plan: Plan) -> Vec<u32> {
    let rec = Recorder::default();
    let conn = match options {
        Some(o) => client.connect_with(url, o.0),
        None => client.connect(url),
    };
    watch(conn, &rec);
    let answered = AtomicU32::new(0);
    let user = &answered as *const AtomicU32 as *mut std::ffi::c_void;
    assert_eq!(ws_on_message(conn, Some(answer), user), WsStatus::Ok);
    client.run_until("open", || rec.of(conn).contains(&Ev::Open(conn)));
    let done = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..plan.senders)
        .map(|sender| {
            std::thread::spawn(move || {
                if plan.until_partial {
                    return send_until_partial(conn, plan, sender);
                }
                for seq in 0..plan.per_sender {
                    let m = message(plan, sender, seq);
                    assert_eq!(send_binary(conn, &m), WsStatus::Ok, "sender {sender}, message {seq}");
                }
                plan.per_sender
            })
        })
        .collect();
    let waiter = {
        let done = done.clone();
        std::thread::spawn(move || {
            let sent: Vec<u32> = senders.into_iter().map(|s| s.join().unwrap()).collect();
            done.store(true, Ordering::SeqCst);
            sent
        })
    };
    client.run_until("every sender done", || done.load(Ordering::SeqCst));
    if plan.until_partial {
        let partial = wsclient::testing::partial_writes(conn).unwrap();
        assert!(partial > 0, "no send was written in part on the caller's thread: the test missed its case");
    }
    // The peer asks its next question when it reads an answer: all 20 come while it reads.
    client.run_until("every question answered", || answered.load(Ordering::SeqCst) == 20);
    let sent = waiter.join().unwrap();
    assert_eq!(unsafe { ws_close(conn, 1000, std::ptr::null()) }, WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
    sent
}

/// Sends `plan.per_sender` messages, and on until one was written in part on this thread.
/// Whether a write is partial depends on where the socket's buffer fills (Linux takes a
/// whole small write into the packet it extends, or nothing when it needs a new packet and
/// the buffer is full), and once a send is queued every later one queues behind it while the
/// peer reads slowly. So, until the case happened, each time a send was queued the sender
/// waits for the I/O task to empty the queue: the next sends are written here again until
/// the socket fills anew, another chance of a partial write.
fn send_until_partial(conn: WsConn, plan: Plan, sender: usize) -> u32 {
    let partial = || wsclient::testing::partial_writes(conn).unwrap();
    let mut seq = 0;
    while seq < plan.per_sender || partial() == 0 {
        assert!(seq < PARTIAL_CAP, "no send was written in part on the caller's thread in {seq} sends");
        assert_eq!(send_binary(conn, &message(plan, sender, seq)), WsStatus::Ok, "message {seq}");
        seq += 1;
        if partial() == 0 && buffered(conn) > 0 {
            wait_until_sent(conn);
        }
    }
    seq
}

fn buffered(conn: WsConn) -> usize {
    let mut bytes = 0;
    assert_eq!(unsafe { ws_buffered_amount(conn, &mut bytes) }, WsStatus::Ok);
    bytes
}

/// Waits until the send queue is empty (polled: the library has no event for it).
fn wait_until_sent(conn: WsConn) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while buffered(conn) > 0 {
        assert!(std::time::Instant::now() < deadline, "the send queue did not empty");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn check(seen: &Seen, plan: Plan, sent: &[u32]) {
    assert!(seen.after_close.is_empty(), "{:?}", seen.after_close);
    assert_eq!(seen.close, Some(1000));
    for (sender, seqs) in seen.sequences.iter().enumerate() {
        let expected: Vec<u32> = (0..sent.get(sender).copied().unwrap_or(0)).collect();
        assert!(
            *seqs == expected,
            "sender {sender}: {} messages, first out of order at {:?}",
            seqs.len(),
            seqs.iter().zip(&expected).position(|(a, b)| a != b)
        );
    }
    assert_eq!(seen.replies, 20, "every question answered");
    // Pings are answered in order (none was sent faster than the client reads). The last few
    // may go unanswered: nothing follows our close frame, and the peer sent them before it
    // read it, but maybe after we sent it.
    let expected: Vec<Vec<u8>> = (0..seen.pongs.len()).map(|i| format!("ping {i}").into_bytes()).collect();
    assert_eq!(seen.pongs, expected);
    assert!(
        !plan.pings || (seen.pongs.len() > 10 && seen.pongs.len() * 2 >= seen.pings_sent),
        "{} of {} pings answered",
        seen.pongs.len(),
        seen.pings_sent
    );
}

#[test]
fn concurrent_sends_and_the_tasks_own_frames_keep_order_over_ws() {
    over_ws(MIXED);
}

#[test]
fn sends_the_socket_takes_in_part_on_the_callers_thread_keep_order_over_ws() {
    over_ws(SMALL_FROM_ONE_THREAD);
}

fn over_ws(plan: Plan) {
    let (url, peer_thread) = serve_on(Listener::bind_small_receive_buffer(), move |mut p| {
        p.upgrade();
        peer(p.stream, plan)
    });
    let client = Client::new();
    let sent = converse(&client, &url, None, plan);
    check(&peer_thread.join().unwrap(), plan, &sent);
}

/// The TLS peer: the same conversation inside a TLS session of a CA made for the test.
fn tls_peer(listener: Listener, config: Arc<rustls::ServerConfig>, plan: Plan) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let tcp: TcpStream = listener.accept().stream;
        let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config).unwrap(), tcp);
        let request = read_request_from(&mut tls).unwrap();
        tls.write_all(response_to(&request, "").as_bytes()).unwrap();
        peer(tls, plan)
    })
}

#[test]
fn concurrent_sends_and_the_tasks_own_frames_keep_order_over_wss() {
    over_wss(MIXED);
}

#[test]
fn sends_the_socket_takes_in_part_on_the_callers_thread_keep_order_over_wss() {
    over_wss(SMALL_FROM_ONE_THREAD);
}

fn over_wss(plan: Plan) {
    let (ca_pem, config) = tls_server_config();
    let listener = Listener::bind_small_receive_buffer();
    let url = format!("wss://127.0.0.1:{}/", listener.port);
    let peer_thread = tls_peer(listener, config, plan);
    static DIRS: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wsclient-order-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let options = Options::new();
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, cstr(ca.to_str().unwrap()).as_ptr()) }, WsStatus::Ok);
    let client = Client::new();
    let sent = converse(&client, &url, Some(&options), plan);
    check(&peer_thread.join().unwrap(), plan, &sent);
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends race the connection's end: threads send as fast as they can while the peer closes.
/// Every send answers OK, CLOSING or GONE; one final callback; the peer sees whole frames only
/// (a frame begun is finished), and nothing after our close frame.
#[test]
fn sends_racing_the_end_of_the_connection() {
    let (url, peer_thread) = serve(|mut p| {
        p.upgrade();
        // Reads a few frames, then closes and reads the rest: whole frames, then the client's
        // close answer, then nothing.
        for _ in 0..200 {
            p.read_frame().expect("whole frames");
        }
        p.send(&close_frame(1000, "enough"));
        let (frames, failure) = p.read_until_close();
        let after = p.read_frame();
        (frames.last().map(|f| f.opcode), failure.map(|e| e.to_string()), after.is_ok())
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&url);
    watch(conn, &rec);
    client.run_until("open", || rec.of(conn).contains(&Ev::Open(conn)));
    let senders: Vec<_> = (0..MIXED.senders)
        .map(|sender| {
            std::thread::spawn(move || {
                for seq in 0.. {
                    match send_binary(conn, &message(MIXED, sender, seq)) {
                        WsStatus::Ok | WsStatus::SendQueueFull => {}
                        WsStatus::Closing | WsStatus::Gone => return,
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    client.run_until_final(&rec, conn);
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(rec.finals(conn), 1);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, "enough".into())));
    let (last, failure, more) = peer_thread.join().unwrap();
    assert_eq!((last, failure, more), (Some(CLOSE), None, false), "the close frame comes last");
}
