//! Attacks on the send path: a small send written on the host's thread, which claims the socket,
//! writes without the connection's lock, then counts and queues the rest (commit 2cd0629).
//!
//! To hold a host's thread exactly inside its write, deterministically, the message it sends
//! lives in memory registered with userfaultfd: the library reads the payload only once it has
//! claimed the socket (framing and masking it), so the sending thread stops there, with the
//! socket claimed, until the test releases the page. That is what a slow host looks like to the
//! library (a thread preempted, or a payload paged out), held as long as the test needs.

mod common;

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::hostile::*;
use common::*;

// ---- a page the test hands out on demand (userfaultfd) ---------------------------------------

mod stall {
    use std::io;
    use std::time::Duration;

    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
    const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
    const UFFD_API: u64 = 0xaa;
    const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
    const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Copy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }

    /// `len` bytes (whole pages) that nobody can read until `release`: the first thread that
    /// touches them stops there. Their content, once released, is `content`.
    pub struct Stall {
        uffd: i32,
        region: *mut u8,
        len: usize,
        content: Vec<u8>,
        released: bool,
    }

    unsafe impl Send for Stall {}
    unsafe impl Sync for Stall {}

    impl Stall {
        /// None where userfaultfd is not available (the caller reports the test skipped).
        pub fn new(content: Vec<u8>) -> Option<Stall> {
            let page = 4096;
            let len = content.len().div_ceil(page) * page;
            unsafe {
                let uffd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) as i32;
                if uffd < 0 {
                    return None;
                }
                let mut api = Api { api: UFFD_API, features: 0, ioctls: 0 };
                if libc::ioctl(uffd, UFFDIO_API, &mut api) != 0 {
                    libc::close(uffd);
                    return None;
                }
                let region = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(region, libc::MAP_FAILED);
                let mut register =
                    Register { start: region as u64, len: len as u64, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
                if libc::ioctl(uffd, UFFDIO_REGISTER, &mut register) != 0 {
                    libc::munmap(region, len);
                    libc::close(uffd);
                    return None;
                }
                let mut content = content;
                content.resize(len, 0);
                Some(Stall { uffd, region: region.cast(), len, content, released: false })
            }
        }

        /// The bytes, as a slice to hand to the library (reading them stalls until released).
        pub fn ptr(&self) -> *const u8 {
            self.region
        }

        /// Waits until a thread touched the bytes (and stopped there); false if none did
        /// within `timeout`.
        pub fn wait_touched(&self, timeout: Duration) -> bool {
            let mut pfd = libc::pollfd { fd: self.uffd, events: libc::POLLIN, revents: 0 };
            if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } <= 0 {
                return false;
            }
            let mut msg = [0u8; 32];
            let n = unsafe { libc::read(self.uffd, msg.as_mut_ptr().cast(), 32) };
            assert_eq!(n, 32, "uffd read: {}", io::Error::last_os_error());
            assert_eq!(msg[0], UFFD_EVENT_PAGEFAULT);
            true
        }

        /// Fills every page with its content and wakes the thread that waits on them.
        pub fn release(&mut self) {
            if std::mem::replace(&mut self.released, true) {
                return;
            }
            let mut copy = Copy {
                dst: self.region as u64,
                src: self.content.as_ptr() as u64,
                len: self.len as u64,
                mode: 0,
                copy: 0,
            };
            let status = unsafe { libc::ioctl(self.uffd, UFFDIO_COPY, &mut copy) };
            assert_eq!(status, 0, "UFFDIO_COPY: {}", io::Error::last_os_error());
        }
    }

    impl Drop for Stall {
        fn drop(&mut self) {
            self.release();
            unsafe {
                libc::munmap(self.region.cast(), self.len);
                libc::close(self.uffd);
            }
        }
    }
}

use stall::Stall;

/// Tests that measure the I/O threads' CPU, and the one that keeps them busy, run one at a time
/// (the CPU of every client's I/O threads in this process is counted together).
static CPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    CPU.lock().unwrap_or_else(|e| e.into_inner())
}

/// A message that checks its own bytes: `tag`, its length, then a pattern.
fn pattern(tag: u8, len: usize) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(len as u32).to_le_bytes());
    m.extend((5..len).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    m
}

fn is_pattern(payload: &[u8]) -> bool {
    payload.len() >= 5
        && u32::from_le_bytes(payload[1..5].try_into().unwrap()) as usize == payload.len()
        && payload == pattern(payload[0], payload.len())
}

/// A thread that sends `stall`'s bytes as one binary message; returns its status.
fn send_stalled(conn: WsConn, stall: &Arc<Stall>, len: usize) -> std::thread::JoinHandle<WsStatus> {
    let stall = stall.clone();
    std::thread::spawn(move || unsafe { ws_send_binary(conn, stall.ptr().cast(), len) })
}

/// A raw server that greets the client with a message once upgraded: the client's session
/// runs once the greeting arrives (see `open`), so the host's threads write small sends
/// themselves from then on (right after the open callback, before the session started, they
/// go to the I/O task).
fn serve_warm<T: Send + 'static>(
    listener: Listener,
    script: impl FnOnce(Peer) -> T + Send + 'static,
) -> (String, std::thread::JoinHandle<T>) {
    serve_on(listener, move |mut p| {
        p.upgrade();
        p.send(&frame(FIN | TEXT, b"hello"));
        script(p)
    })
}

/// Opens a connection to `url` (keepalive off) with every callback recorded, and waits until
/// its session runs (the greeting of `serve_warm` arrived).
fn open(client: &Client, rec: &Recorder, url: &str) -> WsConn {
    let options = no_keepalive();
    let conn = client.connect_with(url, options.0);
    watch(conn, rec);
    wait_open(client, rec, conn);
    client.run_until("the greeting", || rec.texts(conn).contains(&"hello".to_string()));
    conn
}

/// Whether the connection's lock is free (a call that takes it returns within 300 ms): a
/// sender stalled with it free is inside the write of a send it claimed the socket for, not
/// copying a send into the queue under the lock.
fn lock_free(conn: WsConn) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0 as std::os::raw::c_char; 64];
        let _ = unsafe { ws_protocol(conn, buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()) };
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_millis(300)).is_ok()
}

/// The stall, or a loud skip where userfaultfd is not available.
fn stall_of(test: &str, content: Vec<u8>) -> Option<Arc<Stall>> {
    let stall = Stall::new(content).map(Arc::new);
    if stall.is_none() {
        skipped(test, "userfaultfd is not available here");
    }
    stall
}

/// Releases a stall shared with a sender thread (the sender holds the other reference).
fn release(stall: &Arc<Stall>) {
    // SAFETY of the cast: `release` only issues an ioctl and flips a flag the sender never reads.
    let ptr = Arc::as_ptr(stall) as *mut Stall;
    unsafe { (*ptr).release() };
}

/// The peer breaks the protocol while a host's thread is in the middle of writing a send.
/// Promise (README status table, "Security: Frames"): WS_STATUS_PROTOCOL means close 1002 was
/// sent; what the host sent goes out before the close frame. The library must wait for the
/// host's thread to finish its write and then send its close frame.
#[test]
fn a_protocol_error_while_a_host_thread_writes_still_sends_close_1002() {
    let Some(stall) = stall_of("a_protocol_error_while_a_host_thread_writes_still_sends_close_1002", pattern(1, 8000))
    else {
        return;
    };
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, peer) = serve_warm(Listener::bind(), move |mut p| {
        go_rx.recv().unwrap();
        // A reserved opcode: the client must fail the connection with close 1002.
        p.send(&frame(FIN | 0x3, b""));
        p.read_timeout(Duration::from_secs(10));
        p.read_until_close()
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = open(&client, &rec, &url);
    let sender = send_stalled(conn, &stall, 8000);
    assert!(stall.wait_touched(DEADLINE), "the sender never reached its write");
    assert!(lock_free(conn), "the sender is not inside a write of its own: the test missed its case");
    go_tx.send(()).unwrap();
    // Give the library the time a host would need to finish its write (the stall), then let
    // the write finish.
    let ended_while_stalled = pump(&client, Duration::from_millis(1500), || rec.finals(conn) > 0);
    release(&stall);
    assert_eq!(sender.join().unwrap(), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.finals(conn), 1);
    assert_eq!(final_status(&rec, conn), Some(WsStatus::Protocol), "{:?}", rec.of(conn));
    let (frames, failure) = peer.join().unwrap();
    let codes: Vec<_> = frames.iter().map(|f| (f.opcode, f.close_code(), f.payload.len())).collect();
    assert!(
        frames.last().and_then(Frame::close_code) == Some(1002),
        "no close frame 1002 reached the peer (ended while the host's thread was writing: \
         {ended_while_stalled}); frames (opcode, close code, length): {codes:?}, then {failure:?}"
    );
}

/// The peer sends its close frame while a host's thread is in the middle of writing a send:
/// the host's message arrives whole, then our answer to the close; one close callback.
#[test]
fn a_peer_close_while_a_host_thread_writes_waits_for_the_write() {
    let Some(stall) = stall_of("a_peer_close_while_a_host_thread_writes_waits_for_the_write", pattern(2, 12000)) else {
        return;
    };
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, peer) = serve_warm(Listener::bind(), move |mut p| {
        go_rx.recv().unwrap();
        p.send(&close_frame(4001, "bye"));
        p.read_timeout(Duration::from_secs(10));
        let got = p.read_until_close();
        let after = p.read_frame().is_ok();
        (got, after)
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = open(&client, &rec, &url);
    let sender = send_stalled(conn, &stall, 12000);
    assert!(stall.wait_touched(DEADLINE));
    assert!(lock_free(conn), "the sender is not inside a write of its own: the test missed its case");
    go_tx.send(()).unwrap();
    // The close frame is read while the host's thread still writes: no final callback can
    // come before our answer is out, which waits for that write.
    let socket_read = pump(&client, Duration::from_millis(300), || rec.finals(conn) > 0);
    assert!(!socket_read, "closed before the host's write was done: {:?}", rec.of(conn));
    release(&stall);
    assert_eq!(sender.join().unwrap(), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.finals(conn), 1);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 4001, "bye".into())));
    let ((frames, failure), after) = peer.join().unwrap();
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(frames.len(), 2, "{:?}", frames.iter().map(|f| f.opcode).collect::<Vec<_>>());
    assert!(frames[0].opcode == BINARY && is_pattern(&frames[0].payload), "the message arrives whole");
    assert_eq!(frames[1].close_code(), Some(4001));
    assert!(!after, "nothing after our close frame");
    assert_eq!(buffered(conn), 0);
}

/// ws_buffered_amount, 0 once the handle is gone.
fn buffered(conn: WsConn) -> usize {
    let mut bytes = 0;
    match unsafe { ws_buffered_amount(conn, &mut bytes) } {
        WsStatus::Ok => bytes,
        WsStatus::Gone => 0,
        other => panic!("ws_buffered_amount: {other:?}"),
    }
}

/// The peer resets the connection exactly while a host's thread is in the middle of a write:
/// the send call returns, one error callback (connection lost) ends the connection, and
/// nothing is counted as waiting any more; later sends are refused.
#[test]
fn a_reset_while_a_host_thread_writes_ends_with_one_error() {
    let Some(stall) = stall_of("a_reset_while_a_host_thread_writes_ends_with_one_error", pattern(3, 10000)) else {
        return;
    };
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, peer) = serve_warm(Listener::bind(), move |p| {
        go_rx.recv().unwrap();
        reset(p.stream);
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = open(&client, &rec, &url);
    // Something counted before the stalled send: a message the I/O task writes.
    let sender = send_stalled(conn, &stall, 10000);
    assert!(stall.wait_touched(DEADLINE));
    assert!(lock_free(conn), "the sender is not inside a write of its own: the test missed its case");
    go_tx.send(()).unwrap();
    peer.join().unwrap();
    // The reset is seen by the I/O task while the host's thread still writes.
    let ended = pump(&client, Duration::from_millis(500), || rec.finals(conn) > 0);
    release(&stall);
    assert_eq!(sender.join().unwrap(), WsStatus::Ok);
    if !ended {
        client.run_until_final(&rec, conn);
    }
    pump(&client, Duration::from_millis(200), || false);
    assert_eq!(rec.finals(conn), 1, "{:?}", rec.of(conn));
    assert_eq!(final_status(&rec, conn), Some(WsStatus::ConnectionLost), "{:?}", rec.of(conn));
    assert_eq!(buffered(conn), 0);
    assert_eq!(send_text(conn, "late"), WsStatus::Gone);
}

/// ws_client_free while a host's thread is in the middle of a write: it returns within 250 ms
/// (README), and the sending thread's call returns once it can go on.
#[test]
fn freeing_the_client_while_a_host_thread_writes_returns_in_time() {
    let Some(stall) = stall_of("freeing_the_client_while_a_host_thread_writes_returns_in_time", pattern(4, 6000))
    else {
        return;
    };
    let (url, peer) = serve_warm(Listener::bind(), move |mut p| {
        p.read_timeout(Duration::from_secs(10));
        p.read_until_close()
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = open(&client, &rec, &url);
    let sender = send_stalled(conn, &stall, 6000);
    assert!(stall.wait_touched(DEADLINE));
    assert!(lock_free(conn), "the sender is not inside a write of its own: the test missed its case");
    let raw = client.0;
    std::mem::forget(client);
    let start = Instant::now();
    assert_eq!(unsafe { ws_client_free(raw) }, WsStatus::Ok);
    let took = start.elapsed();
    release(&stall);
    let status = sender.join().unwrap();
    assert!(matches!(status, WsStatus::Ok | WsStatus::Gone | WsStatus::Closing), "{status:?}");
    assert_eq!(send_text(conn, "late"), WsStatus::Gone);
    assert!(took < Duration::from_millis(250), "ws_client_free took {took:?}");
    let (frames, _) = peer.join().unwrap();
    // Whatever reached the peer is whole frames (a close frame, if any, comes last).
    for (i, f) in frames.iter().enumerate() {
        match f.opcode {
            BINARY => assert!(is_pattern(&f.payload)),
            CLOSE => assert_eq!(i, frames.len() - 1),
            other => panic!("opcode {other}"),
        }
    }
}

/// ws_client_free while another thread is inside ws_send of a large message whose bytes are
/// slow to read (a paged-out buffer): the README says free returns within 250 ms. (The large
/// message was copied into the send queue under the connection's lock, which free needs too.)
#[test]
fn freeing_the_client_while_a_thread_copies_a_large_send_returns_in_time() {
    let Some(stall) =
        stall_of("freeing_the_client_while_a_thread_copies_a_large_send_returns_in_time", pattern(5, 100_000))
    else {
        return;
    };
    let (url, peer) = serve_warm(Listener::bind(), move |mut p| {
        p.read_timeout(Duration::from_secs(10));
        p.read_until_close()
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = open(&client, &rec, &url);
    let sender = send_stalled(conn, &stall, 100_000);
    // The sender is inside ws_send, reading the stalled buffer (it held the connection's lock
    // there until the copy moved before the lock: that was the finding).
    assert!(stall.wait_touched(DEADLINE));
    let raw = client.0 as usize;
    std::mem::forget(client);
    let (done_tx, done_rx) = mpsc::channel();
    let freer = std::thread::spawn(move || {
        let start = Instant::now();
        let status = unsafe { ws_client_free(raw as *mut WsClient) };
        done_tx.send(()).unwrap();
        (status, start.elapsed())
    });
    // Bounded: if free has not returned after a second, let the copy finish.
    let returned = done_rx.recv_timeout(Duration::from_secs(1)).is_ok();
    release(&stall);
    let _ = sender.join().unwrap();
    let (status, took) = freer.join().unwrap();
    let _ = peer.join();
    assert_eq!(status, WsStatus::Ok);
    assert!(returned && took < Duration::from_millis(250), "ws_client_free took {took:?}");
}

/// While a host's thread holds the socket, the I/O task must neither write nor spin: here it
/// has plenty to write (answers to a stream of pings, a close request from another thread,
/// queued sends), and must sleep until the host's thread is done, then write all of it in
/// order.
#[test]
fn the_io_task_sleeps_while_a_host_thread_writes() {
    let Some(stall) = stall_of("the_io_task_sleeps_while_a_host_thread_writes", pattern(6, 16000)) else {
        return;
    };
    let _serial = serial();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (url, peer) = serve_warm(Listener::bind(), move |mut p| {
        go_rx.recv().unwrap();
        for i in 0..10u8 {
            p.send(&frame(FIN | PING, &[i]));
        }
        p.read_timeout(Duration::from_secs(10));
        let got = p.read_until_close();
        if got.1.is_none() {
            p.send(&close_frame(1000, ""));
        }
        got
    });
    let client = Client::new();
    let rec = Recorder::default();
    let conn = open(&client, &rec, &url);
    let sender = send_stalled(conn, &stall, 16000);
    assert!(stall.wait_touched(DEADLINE));
    assert!(lock_free(conn), "the sender is not inside a write of its own: the test missed its case");
    // Sent meanwhile from other threads: they queue behind the stalled write.
    let small = pattern(7, 100);
    let large = pattern(8, 40000);
    let t = std::thread::spawn(move || (send_binary(conn, &small), send_binary(conn, &large)));
    assert_eq!(t.join().unwrap(), (WsStatus::Ok, WsStatus::Ok));
    go_tx.send(()).unwrap();
    assert_eq!(close(conn, 1000, "done"), WsStatus::Ok);
    // Let the pings arrive and be read, then measure a window with the host's thread stalled.
    std::thread::sleep(Duration::from_millis(100));
    let (io_cpu, _) = cpu_over_idle_window(Some(&client));
    assert!(rec.finals(conn) == 0, "ended while the host's thread was writing: {:?}", rec.of(conn));
    release(&stall);
    assert_eq!(sender.join().unwrap(), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    assert_eq!(rec.finals(conn), 1);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
    let (frames, failure) = peer.join().unwrap();
    assert!(failure.is_none(), "{failure:?}");
    let data: Vec<u8> = frames.iter().filter(|f| f.opcode == BINARY).map(|f| f.payload[0]).collect();
    assert_eq!(data, [6, 7, 8], "the messages in the order they were sent");
    assert!(frames.iter().filter(|f| f.opcode == BINARY).all(|f| is_pattern(&f.payload)));
    let pongs: Vec<u8> = frames.iter().filter(|f| f.opcode == PONG).map(|f| f.payload[0]).collect();
    assert_eq!(pongs, (0..10).collect::<Vec<u8>>(), "every ping answered, in order");
    assert_eq!(frames.last().and_then(Frame::close_code), Some(1000), "the close frame comes last");
    let limit = IDLE_WINDOW.mul_f64(IDLE_CPU_SHARE);
    assert!(io_cpu <= limit, "the I/O threads used {io_cpu:?} of CPU in {IDLE_WINDOW:?} while a host's thread wrote");
}

// ---- counting under concurrent partial writes ---------------------------------------------------

/// A slow reader: at most 2 KiB a read, with a pause before each.
struct Slow<S>(S);

impl<S: Read> Read for Slow<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_micros(200));
        let n = buf.len().min(2 << 10);
        self.0.read(&mut buf[..n])
    }
}

/// Four threads send small messages (written on their own threads when the socket is free)
/// through a peer that reads slowly, under a small send queue limit, while a fifth thread
/// watches ws_buffered_amount. Promises: it never exceeds what was accepted and not yet
/// confirmed written (here: the limit), never wraps around, comes back to 0 once all is
/// written; SEND_QUEUE_FULL is the only refusal; every accepted message arrives whole, once,
/// in each thread's order.
#[test]
fn buffered_amount_stays_within_the_limit_under_concurrent_partial_writes() {
    const SENDERS: usize = 4;
    const PER_SENDER: u32 = 400;
    const LIMIT: usize = 128 << 10;
    let _serial = serial();
    let (url, peer) = serve_on(Listener::bind_small_receive_buffer(), move |mut p| {
        p.upgrade();
        let mut seqs = vec![Vec::new(); SENDERS];
        loop {
            let f = read_frame_from(&mut Slow(&mut p.stream)).expect("whole frames until the close");
            match f.opcode {
                BINARY => {
                    let sender = f.payload[0] as usize;
                    let seq = u32::from_le_bytes(f.payload[1..5].try_into().unwrap());
                    let body = &f.payload[5..];
                    assert!(body.iter().all(|&b| b == (seq as u8) ^ (sender as u8)), "message changed");
                    seqs[sender].push(seq);
                }
                CLOSE => {
                    p.send(&close_frame(1000, ""));
                    return seqs;
                }
                other => panic!("opcode {other}"),
            }
        }
    });
    let client = Client::new();
    let rec = Recorder::default();
    let options = no_keepalive();
    set(unsafe { ws_options_set_send_queue_limit(options.0, LIMIT) });
    let conn = client.connect_with(&url, options.0);
    watch(conn, &rec);
    wait_open(&client, &rec, conn);
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, max_seen) = (stop.clone(), max_seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let b = buffered(conn);
                max_seen.fetch_max(b, Ordering::Relaxed);
                std::thread::yield_now();
            }
        })
    };
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            std::thread::spawn(move || {
                let mut full = 0u32;
                for seq in 0..PER_SENDER {
                    let len = [20usize, 700, 3000, 9000, 16000][(seq as usize + sender) % 5];
                    let mut m = vec![sender as u8];
                    m.extend_from_slice(&seq.to_le_bytes());
                    m.resize(len, (seq as u8) ^ (sender as u8));
                    loop {
                        match send_binary(conn, &m) {
                            WsStatus::Ok => break,
                            WsStatus::SendQueueFull => {
                                full += 1;
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            other => panic!("sender {sender}, message {seq}: {other:?}"),
                        }
                    }
                }
                full
            })
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let done = done.clone();
        std::thread::spawn(move || {
            let full: u32 = senders.into_iter().map(|s| s.join().unwrap()).sum();
            done.store(true, Ordering::SeqCst);
            full
        })
    };
    client.run_until("every sender done", || done.load(Ordering::SeqCst));
    let full = waiter.join().unwrap();
    client.run_until("everything written", || buffered(conn) == 0);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let partial = wsclient::testing::partial_writes(conn).unwrap();
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    let seqs = peer.join().unwrap();
    let max = max_seen.load(Ordering::Relaxed);
    eprintln!("max buffered {max}, {full} refusals, {partial} partial writes on the senders' threads");
    assert!(full > 0, "the limit was never reached: the test missed its case");
    assert!(max <= LIMIT, "ws_buffered_amount reported {max} bytes, over the {LIMIT}-byte limit");
    for (sender, s) in seqs.iter().enumerate() {
        assert_eq!(*s, (0..PER_SENDER).collect::<Vec<_>>(), "sender {sender}");
    }
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
}
