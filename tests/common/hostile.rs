//! A hostile WebSocket peer, and ways to watch the client from outside the library.
//!
//! The peer is a raw server on 127.0.0.1 (plain std::net, a thread per test, every blocking call
//! with a timeout) driven step by step by the test. It does what well-behaved servers never do:
//! stops reading, trickles bytes, announces frames it never sends, pings in bursts, breaks the
//! protocol right behind a message, never finishes its response head.
//!
//! What the tests assert is measured from outside the library, never read from its counters:
//! - what the client's socket holds, asked of the kernel as `ss` does (netlink sock_diag): bytes
//!   the client has not read yet (rx_queue) and bytes it could not send yet (tx_queue);
//! - the CPU time of the library's I/O threads (named "wsclient-io") and of the process;
//! - the process's memory: malloc's heap in use, resident and virtual sizes;
//! - whether a process survives at all: `in_child` runs a test in a process of its own (this
//!   test binary, run again for that one test), which also keeps the figures of tests running
//!   in parallel out of each other's measurements.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::{pump, Client};

/// The longest any blocking step of the peer waits (a safety net: tests synchronise on events).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;
/// The FIN bit of a frame's first byte.
pub const FIN: u8 = 0x80;
/// RSV1: the message is compressed (permessage-deflate).
pub const RSV1: u8 = 0x40;

// ---- frames ----------------------------------------------------------------------------------

/// The header of an unmasked (server) frame: `first` is FIN, RSV and opcode as on the wire;
/// `len` is announced whether or not that many bytes ever follow.
pub fn header(first: u8, len: u64) -> Vec<u8> {
    let mut bytes = vec![first];
    match len {
        n if n < 126 => bytes.push(n as u8),
        n if n < 65536 => {
            bytes.push(126);
            bytes.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            bytes.push(127);
            bytes.extend_from_slice(&n.to_be_bytes());
        }
    }
    bytes
}

/// A whole unmasked frame.
pub fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = header(first, payload.len() as u64);
    bytes.extend_from_slice(payload);
    bytes
}

pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    frame(FIN | CLOSE, &payload)
}

/// A frame the client sent, unmasked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        match (self.opcode, self.payload.as_slice()) {
            (CLOSE, [high, low, ..]) => Some(u16::from_be_bytes([*high, *low])),
            _ => None,
        }
    }
}

/// Reads one (masked, client) frame.
pub fn read_frame_from(stream: &mut impl Read) -> io::Result<Frame> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    let mut len = (head[1] & 0x7f) as u64;
    if len == 126 {
        let mut ext = [0u8; 2];
        stream.read_exact(&mut ext)?;
        len = u16::from_be_bytes(ext) as u64;
    } else if len == 127 {
        let mut ext = [0u8; 8];
        stream.read_exact(&mut ext)?;
        len = u64::from_be_bytes(ext);
    }
    if head[1] & 0x80 == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "an unmasked frame from the client"));
    }
    let mut mask = [0u8; 4];
    stream.read_exact(&mut mask)?;
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Frame { fin: head[0] & 0x80 != 0, rsv1: head[0] & 0x40 != 0, opcode: head[0] & 0x0f, payload })
}

/// Reads the client's upgrade request head (up to the empty line).
pub fn read_request_from(stream: &mut impl Read) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    Ok(String::from_utf8(head).expect("the request head is ASCII"))
}

/// A valid 101 response to `request`, with `extra` header lines (each ending in CRLF) before the
/// empty line.
pub fn response_to(request: &str, extra: &str) -> String {
    let key =
        request.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).expect("the request carries a key").trim();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{extra}\r\n",
        derive_accept_key(key.as_bytes())
    )
}

// ---- the peer --------------------------------------------------------------------------------

pub struct Listener {
    listener: TcpListener,
    pub port: u16,
}

impl Listener {
    pub fn bind() -> Listener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        Listener { listener, port }
    }

    /// A listener whose connections have a small, fixed receive buffer (64 KiB, no
    /// auto-tuning): a peer that does not read makes the client's writes block after a few
    /// hundred KiB, whatever the machine's TCP settings (tcp_rmem may allow 32 MiB).
    pub fn bind_small_receive_buffer() -> Listener {
        let listener = Listener::bind();
        set_int_option(listener.listener.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 64 << 10);
        listener
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// The next connection (waits at most PEER_TIMEOUT).
    pub fn accept(&self) -> Peer {
        assert!(readable(self.listener.as_raw_fd(), PEER_TIMEOUT), "no client connected within {PEER_TIMEOUT:?}");
        let (stream, _) = self.listener.accept().unwrap();
        Peer::new(stream)
    }
}

/// Runs `script` on a thread of its own as the server of one connection; returns the URL to
/// connect to and the thread, whose result is what the script saw.
pub fn serve<T: Send + 'static>(script: impl FnOnce(Peer) -> T + Send + 'static) -> (String, JoinHandle<T>) {
    serve_on(Listener::bind(), script)
}

/// `serve` on a listener of the caller's choice.
pub fn serve_on<T: Send + 'static>(
    listener: Listener,
    script: impl FnOnce(Peer) -> T + Send + 'static,
) -> (String, JoinHandle<T>) {
    let url = listener.url();
    let thread = std::thread::spawn(move || script(listener.accept()));
    (url, thread)
}

/// One accepted connection, seen from the server's side.
pub struct Peer {
    pub stream: TcpStream,
}

impl Peer {
    fn new(stream: TcpStream) -> Peer {
        stream.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(PEER_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Peer { stream }
    }

    pub fn read_request(&mut self) -> String {
        read_request_from(&mut self.stream).expect("the upgrade request")
    }

    /// Reads the request and answers with a valid 101.
    pub fn upgrade(&mut self) {
        let request = self.read_request();
        self.send(response_to(&request, "").as_bytes());
    }

    /// Reads the request and answers with a valid 101 that chooses `extensions` (the value of
    /// Sec-WebSocket-Extensions); returns the request.
    pub fn upgrade_with_extensions(&mut self, extensions: &str) -> String {
        let request = self.read_request();
        self.send(response_to(&request, &format!("Sec-WebSocket-Extensions: {extensions}\r\n")).as_bytes());
        request
    }

    /// Writes all of `bytes` (panics if the client is gone).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("the peer's write");
    }

    pub fn read_frame(&mut self) -> io::Result<Frame> {
        read_frame_from(&mut self.stream)
    }

    /// Reads with `timeout` instead of the default for the calls that follow.
    pub fn read_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        self
    }

    /// Frames until (and with) the client's close frame, or until reading fails (EOF, reset,
    /// timeout): the frames, and the failure if there was one.
    pub fn read_until_close(&mut self) -> (Vec<Frame>, Option<io::Error>) {
        let mut frames = Vec::new();
        loop {
            match self.read_frame() {
                Ok(f) => {
                    let close = f.opcode == CLOSE;
                    frames.push(f);
                    if close {
                        return (frames, None);
                    }
                }
                Err(e) => return (frames, Some(e)),
            }
        }
    }

    /// How the client's side of the TCP stream ends, read until then (discarding any data).
    pub fn read_to_end(&mut self) -> io::Result<usize> {
        let mut total = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.stream.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }

    /// Bytes the client sent that this peer has not read (FIONREAD).
    pub fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        assert_eq!(unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::FIONREAD, &mut n) }, 0);
        n as usize
    }

    /// The client's end of this connection, as the kernel sees it.
    pub fn client_socket(&self) -> ClientSocket {
        ClientSocket { client: self.stream.peer_addr().unwrap(), server: self.stream.local_addr().unwrap() }
    }
}

// ---- the client's socket, as the kernel sees it ------------------------------------------------

/// TCP states as the kernel numbers them.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;

#[derive(Clone, Copy, Debug)]
pub struct SocketState {
    pub state: u8,
    /// Bytes written by the client and not yet acknowledged by the peer (on loopback: bytes
    /// the client could not send because the peer's receive window is closed).
    pub tx_queue: u64,
    /// Bytes that arrived and that the client has not read yet.
    pub rx_queue: u64,
}

/// Asks the kernel (netlink sock_diag, as `ss` does) about TCP sockets over IPv4: the one from
/// `local` to `remote` if `exact` is given, else every socket in one of the `states` (a mask of
/// 1 << state). Returns (local, remote, state) for each. Fast whatever the number of sockets
/// in TIME_WAIT that earlier tests left (reading /proc/net/tcp is not).
fn tcp_diag(states: u32, exact: Option<(SocketAddr, SocketAddr)>) -> Vec<(SocketAddr, SocketAddr, SocketState)> {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct SockId {
        sport: [u8; 2],
        dport: [u8; 2],
        src: [u8; 16],
        dst: [u8; 16],
        interface: u32,
        cookie: [u32; 2],
    }
    #[repr(C)]
    struct Request {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Reply {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: SockId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    let v4 = |addr: SocketAddr| match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    let mut id = SockId { cookie: [u32::MAX; 2], ..SockId::default() };
    if let Some((local, remote)) = exact {
        let (local, remote) = (v4(local), v4(remote));
        id.sport = local.port().to_be_bytes();
        id.dport = remote.port().to_be_bytes();
        id.src[..4].copy_from_slice(&local.ip().octets());
        id.dst[..4].copy_from_slice(&remote.ip().octets());
    }
    let request = Request {
        len: std::mem::size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: (libc::NLM_F_REQUEST | if exact.is_none() { libc::NLM_F_DUMP } else { 0 }) as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states,
        id,
    };
    use std::os::fd::{FromRawFd, OwnedFd};
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    assert!(fd >= 0, "netlink socket: {}", io::Error::last_os_error());
    let _owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    let sent = unsafe {
        libc::sendto(
            fd,
            (&request as *const Request).cast(),
            request.len as usize,
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    assert_eq!(sent, request.len as isize, "netlink send: {}", io::Error::last_os_error());
    let addr = |ip: [u8; 16], port: [u8; 2]| {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), u16::from_be_bytes(port)))
    };
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n >= 0, "netlink recv: {}", io::Error::last_os_error());
        let mut at = 0;
        while at + 16 <= n as usize {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
            match kind {
                // The end of a dump, or (exact look-up) no such socket.
                NLMSG_DONE | NLMSG_ERROR => return found,
                SOCK_DIAG_BY_FAMILY => {
                    let reply: Reply = unsafe { std::ptr::read_unaligned(buf[at + 16..].as_ptr().cast()) };
                    let state = SocketState {
                        state: reply.state,
                        tx_queue: reply.wqueue as u64,
                        rx_queue: reply.rqueue as u64,
                    };
                    found.push((addr(reply.id.src, reply.id.sport), addr(reply.id.dst, reply.id.dport), state));
                }
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if exact.is_some() {
            return found;
        }
    }
}

/// Every TCP socket in state `state` whose remote end is `remote`, by local address.
pub fn sockets_to(remote: SocketAddr, state: u8) -> Vec<(SocketAddr, SocketState)> {
    tcp_diag(1 << state, None).into_iter().filter(|(_, r, _)| *r == remote).map(|(l, _, s)| (l, s)).collect()
}

/// One TCP socket, from `local` to `remote`; None once it is gone.
fn socket_state(local: SocketAddr, remote: SocketAddr) -> Option<SocketState> {
    tcp_diag(u32::MAX, Some((local, remote))).first().map(|(_, _, s)| *s)
}

/// The client's end of one connection.
#[derive(Clone, Copy, Debug)]
pub struct ClientSocket {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl ClientSocket {
    /// Its state now; None once the socket is gone.
    pub fn state(&self) -> Option<SocketState> {
        socket_state(self.client, self.server)
    }

    /// Waits (at most PEER_TIMEOUT, looking every millisecond) until `pred` holds for the
    /// socket's state (None: the socket is gone); returns whether it did.
    pub fn wait_until(&self, pred: impl Fn(Option<SocketState>) -> bool) -> bool {
        let deadline = Instant::now() + PEER_TIMEOUT;
        while Instant::now() < deadline {
            if pred(self.state()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Waits until the client has read every byte that reached its socket (or closed it).
    pub fn wait_read_everything(&self) -> bool {
        self.wait_until(|s| s.map_or(true, |s| s.rx_queue == 0))
    }

    /// Waits until the client's writes are blocked: at least `bytes` sit unsent in its socket.
    pub fn wait_blocked_writing(&self, bytes: u64) -> bool {
        self.wait_until(|s| s.is_some_and(|s| s.tx_queue >= bytes))
    }

    /// Waits until at least `bytes` wait in the client's socket, unread.
    pub fn wait_unread(&self, bytes: u64) -> bool {
        self.wait_until(|s| s.is_some_and(|s| s.rx_queue >= bytes))
    }

    /// The peer's end of the connection (its tx_queue: bytes the client's closed receive
    /// window keeps the peer from sending).
    pub fn peer_state(&self) -> Option<SocketState> {
        socket_state(self.server, self.client)
    }

    /// Waits until the client has stopped reading: its receive window is closed, so that at
    /// least `bytes` the peer wrote cannot even be sent to it.
    pub fn wait_not_reading(&self, bytes: u64) -> bool {
        let deadline = Instant::now() + PEER_TIMEOUT;
        while Instant::now() < deadline {
            if self.peer_state().is_some_and(|s| s.tx_queue >= bytes) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

// ---- CPU and memory, measured from outside the library ---------------------------------------

fn clock_tick() -> Duration {
    Duration::from_secs(1) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u32
}

/// CPU time (user + system) used so far by this process's threads named `name`.
pub fn threads_cpu(name: &str) -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // Fields after "(comm)": state is field 3, utime 14 and stime 15.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    clock_tick() * ticks as u32
}

/// CPU time used so far by the library's I/O threads (all clients of this process).
pub fn io_threads_cpu() -> Duration {
    threads_cpu("wsclient-io")
}

/// CPU time used so far by the whole process.
pub fn process_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A field of /proc/self/status in KiB ("VmHWM", "VmRSS", "VmData", "VmSize", "VmPeak").
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':')).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Bytes malloc has handed out and not had back (every arena, mmapped blocks included).
pub fn heap_in_use() -> usize {
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

pub const MIB: f64 = (1 << 20) as f64;

/// Limits the process's address space to `bytes` (RLIMIT_AS): an allocation past it fails.
pub fn limit_address_space(bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
}

// ---- idle CPU, measured while the host waits ----------------------------------------------------
/// How long an idle window lasts while CPU is measured; and the share of it an idle library
/// may use (a correct one uses none: it sleeps in epoll).
pub const IDLE_WINDOW: Duration = Duration::from_millis(1500);
pub const IDLE_CPU_SHARE: f64 = 0.10;

/// CPU used over one idle window by the library's I/O threads and by the whole process, while
/// the host waits on the fd and dispatches whenever it is readable (as a host's loop does).
pub fn cpu_over_idle_window(client: Option<&Client>) -> (Duration, Duration) {
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
pub fn assert_idle(windows: &[(&str, (Duration, Duration))]) {
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

// ---- a test in a process of its own ---------------------------------------------------------

const CHILD_ENV: &str = "WSCLIENT_HOSTILE_CHILD";
/// The longest a child test may run before it is killed.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

/// Runs the test `name` in a child process of its own: this test binary again, with `--exact
/// name`, and `env` set. In that child, returns true: the caller runs the test's body there.
/// In the parent, waits for the child (at most two minutes, then kills it), prints its output
/// and panics unless it exited with success (a failed assertion, an abort or a signal all fail
/// the test), then returns false.
pub fn in_child(name: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var(CHILD_ENV).is_ok_and(|v| v == name) {
        return true;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on threads of their own, so that a child that prints much never blocks on a pipe.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CHILD_DEADLINE;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!("{}{}", stdout.join().unwrap(), stderr.join().unwrap());
    eprintln!("---- child process of {name} ----\n{text}---- end of child ----");
    assert!(!timed_out, "the child process of {name} ran longer than {CHILD_DEADLINE:?} and was killed");
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        let what = if signal == libc::SIGABRT { " (SIGABRT: the process aborted)" } else { "" };
        panic!("the child process of {name} was killed by signal {signal}{what}");
    }
    assert!(status.success(), "the child process of {name} failed ({status})");
    // A child that ran no test (a wrong name) must not pass silently.
    assert!(text.contains("1 passed"), "the child process ran no test named {name}");
    false
}

// ---- helpers for the raw sockets ------------------------------------------------------------

pub fn set_int_option(fd: i32, level: i32, option: i32, value: i32) {
    let status = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(status, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// Whether `fd` becomes readable within `timeout`.
pub fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) > 0 }
}

/// The descriptors the epoll instance `epfd` watches (from /proc/self/fdinfo).
pub fn epoll_watched(epfd: i32) -> Vec<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")).unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("tfd:"))
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

/// How many sockets of the client whose descriptor is `fd` the host's thread reads (its epoll
/// instance watches them beside the eventfd).
pub fn sockets_handed_fd(fd: i32) -> usize {
    epoll_watched(fd).len().saturating_sub(1)
}

pub fn sockets_handed(client: &Client) -> usize {
    sockets_handed_fd(client.fd())
}

/// Waits until `n` sockets of `client` are handed to the host's thread (at most 10 s),
/// dispatching at least every 20 ms, readable or not, as a timer-driven host does: a host that
/// only waits lets the watchdog find it silent after 100-200 ms without a dispatch and take
/// every reading back, and idle connections then stay with the I/O thread until their next
/// message (seen under AddressSanitizer, where 300 hand-overs spread over more than that).
pub fn wait_handed(client: &Client, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sockets_handed(client) != n && Instant::now() < deadline {
        client.wait_readable(Duration::from_millis(20));
        client.dispatch();
    }
    assert_eq!(sockets_handed(client), n, "{what}: sockets handed to the host's thread");
}

/// An epoll instance, as a host's event loop has one; closed when dropped.
pub struct Epoll(i32);

impl Epoll {
    pub fn new() -> Epoll {
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(fd >= 0, "epoll_create1: {}", io::Error::last_os_error());
        Epoll(fd)
    }

    /// Watches `fd` for reading, edge-triggered (EPOLLET) or level-triggered, under `token`.
    pub fn add(&self, fd: i32, token: u64, edge: bool) {
        let events = libc::EPOLLIN | if edge { libc::EPOLLET } else { 0 };
        let mut event = libc::epoll_event { events: events as u32, u64: token };
        assert_eq!(unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut event) }, 0);
    }

    /// The tokens of the descriptors that woke the loop within `timeout` (at most 8).
    pub fn wait(&self, timeout: Duration) -> Vec<u64> {
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let n = unsafe { libc::epoll_wait(self.0, out.as_mut_ptr(), 8, timeout.as_millis() as i32) };
        assert!(n >= 0, "epoll_wait: {}", io::Error::last_os_error());
        out[..n as usize].iter().map(|e| e.u64).collect()
    }

    /// Whether a descriptor woke the loop within `timeout`.
    pub fn woken(&self, timeout: Duration) -> bool {
        !self.wait(timeout).is_empty()
    }

    pub fn fd(&self) -> i32 {
        self.0
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

/// A listening socket on 127.0.0.1 whose accept queue is full: a connect to it sends SYNs
/// that the kernel drops, so it stays in progress (SYN_SENT) for as long as the client waits.
/// Returns the address and what must stay alive meanwhile.
pub fn full_backlog_listener() -> (SocketAddr, (std::os::fd::OwnedFd, Vec<TcpStream>)) {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    assert_eq!(unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len) }, 0);
    assert_eq!(unsafe { libc::listen(fd, 0) }, 0);
    let mut bound: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut bound_len = len;
    assert_eq!(unsafe { libc::getsockname(fd, (&mut bound as *mut libc::sockaddr_in).cast(), &mut bound_len,) }, 0);
    let address = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, u16::from_be(bound.sin_port)));
    // Connections nobody accepts fill the queue; the first one that stays in SYN_SENT shows it
    // is full.
    let mut held = Vec::new();
    loop {
        assert!(held.len() < 16, "the accept queue never filled");
        match TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
            Ok(stream) => held.push(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
            Err(e) => panic!("filling the accept queue: {e}"),
        }
    }
    (address, (owned, held))
}

// ---- TLS ------------------------------------------------------------------------------------

/// A CA (written to a PEM file the client can be told to trust) and a server certificate for
/// 127.0.0.1 and localhost signed by it.
pub struct TlsIdentity {
    pub ca_pem: PathBuf,
    config: Arc<rustls::ServerConfig>,
}

impl TlsIdentity {
    pub fn new() -> TlsIdentity {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("wsclient hostile CA {} {serial}", std::process::id());
        ca_params.distinguished_name.push(DnType::CommonName, name.clone());
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "wsclient hostile peer");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let chain = vec![cert.der().clone(), ca_cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let ca_pem = std::env::temp_dir().join(format!("{}.pem", name.replace(' ', "-")));
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
        TlsIdentity { ca_pem, config: Arc::new(config) }
    }

    /// The server side of TLS over an accepted connection (the handshake happens on first use).
    pub fn accept(&self, peer: Peer) -> rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
        let connection = rustls::ServerConnection::new(self.config.clone()).unwrap();
        rustls::StreamOwned::new(connection, peer.stream)
    }
}

impl Drop for TlsIdentity {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca_pem);
    }
}

// ---- round 2: TLS peers with more control ----------------------------------------------------

/// A TLS stream over an accepted connection, as `TlsIdentity::accept` makes it.
pub type TlsPeer = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

impl TlsIdentity {
    /// A copy of the server configuration, to change before `accept_with` (tickets, versions).
    pub fn server_config(&self) -> rustls::ServerConfig {
        (*self.config).clone()
    }

    /// The server side of TLS over `peer`, with `config` instead of the identity's own.
    pub fn accept_with(&self, config: Arc<rustls::ServerConfig>, peer: Peer) -> TlsPeer {
        let connection = rustls::ServerConnection::new(config).unwrap();
        rustls::StreamOwned::new(connection, peer.stream)
    }
}

/// Writes what rustls has to send (records already made) to the socket.
pub fn flush_tls(tls: &mut TlsPeer) -> io::Result<()> {
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    tls.sock.flush()
}

// ---- round 3: the write path (sends written on the caller's thread, held by callbacks) --------

impl Listener {
    /// A listener whose connections have a receive buffer of `bytes` (no auto-tuning).
    pub fn bind_receive_buffer(bytes: i32) -> Listener {
        let listener = Listener::bind();
        set_int_option(listener.listener.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
        listener
    }
}

/// Ends a TCP connection with a reset (SO_LINGER 0, then close), as a crashed peer would.
pub fn reset(stream: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let status = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(status, 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(stream);
}

/// Bytes waiting unread in a socket (FIONREAD).
pub fn unread_bytes(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    assert_eq!(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) }, 0);
    n as usize
}

/// Makes SIGPIPE kill the process again, as it does in a C program that did not ignore it (a
/// Rust program, this test binary included, ignores it from its start).
pub fn sigpipe_as_in_a_c_host() {
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// The client's unsent bytes and the peer's unread ones, once neither has changed for `quiet`
/// (at most PEER_TIMEOUT): (client tx_queue, peer rx_queue).
pub fn settled_queues(socket: &ClientSocket, quiet: Duration) -> (u64, u64) {
    let deadline = Instant::now() + PEER_TIMEOUT;
    let read = || {
        let client = socket.state().map_or(0, |s| s.tx_queue);
        let peer = socket.peer_state().map_or(0, |s| s.rx_queue);
        (client, peer)
    };
    let mut last = read();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        let now = read();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// A reader that takes at most `max` bytes per read (a peer that reads a byte at a time).
pub struct Trickle<S> {
    pub inner: S,
    pub max: usize,
}

impl<S: Read> Read for Trickle<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.max);
        self.inner.read(&mut buf[..n])
    }
}

impl<S: Write> Write for Trickle<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
