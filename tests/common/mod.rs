//! Test helpers: drive the library only through its exported C functions, record every
//! callback, and wait for events (never for time) with a generous safety deadline.

#![allow(dead_code)]

pub mod certs;
pub mod deflate;
pub mod hostile;
pub mod peers;
pub mod proxies;
pub mod server;

use std::ffi::{c_void, CStr, CString};
use std::os::raw::c_char;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use wsclient::ffi::client::*;
pub use wsclient::ffi::connection::*;
pub use wsclient::ffi::options::*;
pub use wsclient::{WsConn, WsMessageKind, WsStatus};

/// Safety net for waits: tests synchronise on events; this only stops a broken test.
pub const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Open(WsConn),
    Text(WsConn, Vec<u8>),
    Binary(WsConn, Vec<u8>),
    Close(WsConn, u16, String),
    Error(WsConn, WsStatus, String),
}

impl Ev {
    pub fn conn(&self) -> WsConn {
        match self {
            Ev::Open(c) | Ev::Text(c, _) | Ev::Binary(c, _) | Ev::Close(c, ..) | Ev::Error(c, ..) => *c,
        }
    }
    pub fn is_final(&self) -> bool {
        matches!(self, Ev::Close(..) | Ev::Error(..))
    }
}

/// Records callbacks. Lives on the test's stack/heap; its address is the `user` pointer.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<Ev>>,
    /// Thread on which callbacks ran (all must be the dispatching thread).
    pub threads: Mutex<Vec<std::thread::ThreadId>>,
}

impl Recorder {
    pub fn push(&self, ev: Ev) {
        self.threads.lock().unwrap().push(std::thread::current().id());
        self.events.lock().unwrap().push(ev);
    }
    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
        self.threads.lock().unwrap().clear();
    }

    pub fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }
    pub fn of(&self, conn: WsConn) -> Vec<Ev> {
        self.events().into_iter().filter(|e| e.conn() == conn).collect()
    }
    pub fn finals(&self, conn: WsConn) -> usize {
        self.of(conn).iter().filter(|e| e.is_final()).count()
    }
    pub fn texts(&self, conn: WsConn) -> Vec<String> {
        self.of(conn)
            .into_iter()
            .filter_map(|e| match e {
                Ev::Text(_, t) => Some(String::from_utf8(t).unwrap()),
                _ => None,
            })
            .collect()
    }
}

pub unsafe fn rec<'a>(user: *mut c_void) -> &'a Recorder {
    &*(user as *const Recorder)
}

pub unsafe extern "C" fn on_open(conn: WsConn, user: *mut c_void) {
    rec(user).push(Ev::Open(conn));
}

pub unsafe extern "C" fn on_message(conn: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let bytes = std::slice::from_raw_parts(data, len).to_vec();
    match kind {
        WsMessageKind::Text => {
            assert_eq!(*data.add(len), 0, "text must be NUL-terminated");
            assert!(std::str::from_utf8(&bytes).is_ok(), "text must be UTF-8");
            rec(user).push(Ev::Text(conn, bytes))
        }
        WsMessageKind::Binary => rec(user).push(Ev::Binary(conn, bytes)),
    }
}

pub unsafe extern "C" fn on_close(conn: WsConn, code: u16, reason: *const c_char, len: usize, user: *mut c_void) {
    assert_eq!(*reason.add(len), 0, "reason must be NUL-terminated");
    let reason = String::from_utf8(std::slice::from_raw_parts(reason.cast::<u8>(), len).to_vec()).unwrap();
    rec(user).push(Ev::Close(conn, code, reason));
}

pub unsafe extern "C" fn on_error(conn: WsConn, kind: WsStatus, message: *const c_char, user: *mut c_void) {
    let message = CStr::from_ptr(message).to_str().unwrap().to_owned();
    rec(user).push(Ev::Error(conn, kind, message));
}

/// Registers all four recording callbacks on `conn`.
pub fn watch(conn: WsConn, recorder: &Recorder) {
    let user = recorder as *const Recorder as *mut c_void;
    assert_eq!(ws_on_open(conn, Some(on_open), user), WsStatus::Ok);
    assert_eq!(ws_on_message(conn, Some(on_message), user), WsStatus::Ok);
    assert_eq!(ws_on_close(conn, Some(on_close), user), WsStatus::Ok);
    assert_eq!(ws_on_error(conn, Some(on_error), user), WsStatus::Ok);
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(ws_last_error()).to_str().unwrap().to_owned() }
}

/// A client freed on drop.
pub struct Client(pub *mut WsClient);

impl Client {
    pub fn new() -> Client {
        let c = ws_client_new();
        assert!(!c.is_null(), "ws_client_new: {}", last_error());
        Client(c)
    }

    pub fn connect(&self, url: &str) -> WsConn {
        let mut conn = 0;
        let status = unsafe { ws_connect(self.0, cstr(url).as_ptr(), &mut conn) };
        assert_eq!(status, WsStatus::Ok, "connect {url}: {}", last_error());
        assert_ne!(conn, 0);
        conn
    }

    pub fn connect_with(&self, url: &str, options: *const WsOptions) -> WsConn {
        let mut conn = 0;
        let status = unsafe { ws_connect_with_options(self.0, cstr(url).as_ptr(), options, &mut conn) };
        assert_eq!(status, WsStatus::Ok, "connect {url}: {}", last_error());
        conn
    }

    pub fn fd(&self) -> i32 {
        unsafe { ws_client_fd(self.0) }
    }

    /// One dispatch; returns (callbacks run, more pending).
    pub fn dispatch(&self) -> (u32, bool) {
        let (mut ran, mut more) = (0u32, false);
        let status = unsafe { ws_dispatch(self.0, &mut ran, &mut more) };
        assert_eq!(status, WsStatus::Ok, "dispatch: {}", last_error());
        (ran, more)
    }

    /// Waits for the fd to become readable (at most `timeout`); true if it is.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) > 0 }
    }

    /// Dispatches until `done` holds, waiting on the fd between dispatches.
    pub fn run_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            if self.wait_readable(left) {
                self.dispatch();
            }
        }
    }

    /// Dispatches until `conn`'s final callback has run.
    pub fn run_until_final(&self, recorder: &Recorder, conn: WsConn) {
        self.run_until("the final callback", || recorder.finals(conn) > 0);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let status = unsafe { ws_client_free(self.0) };
        if !std::thread::panicking() {
            assert_eq!(status, WsStatus::Ok);
        }
    }
}

/// Options freed on drop.
pub struct Options(pub *mut WsOptions);

impl Options {
    pub fn new() -> Options {
        Options(ws_options_new())
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        unsafe { ws_options_free(self.0) };
    }
}

pub fn send_text(conn: WsConn, text: &str) -> WsStatus {
    unsafe { ws_send(conn, text.as_ptr().cast(), text.len()) }
}

/// What waits to be sent on `conn` (ws_buffered_amount).
pub fn buffered(conn: WsConn) -> usize {
    let mut bytes = 0;
    assert_eq!(unsafe { ws_buffered_amount(conn, &mut bytes) }, WsStatus::Ok);
    bytes
}

/// Waits until nothing waits to be sent on `conn` (polled: the library has no event for it).
pub fn wait_until_sent(conn: WsConn) {
    let deadline = Instant::now() + DEADLINE;
    while buffered(conn) > 0 {
        assert!(Instant::now() < deadline, "the send queue did not empty");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn send_binary(conn: WsConn, data: &[u8]) -> WsStatus {
    unsafe { ws_send_binary(conn, data.as_ptr().cast(), data.len()) }
}

pub fn close(conn: WsConn, code: u16, reason: &str) -> WsStatus {
    let reason = cstr(reason);
    unsafe { ws_close(conn, code, reason.as_ptr()) }
}

/// A port on 127.0.0.1 where nothing listens.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The names of the functions include/wsclient.h declares.
pub fn header_functions() -> std::collections::BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("include/wsclient.h");
    let header = std::fs::read_to_string(path).unwrap();
    let mut code = String::new();
    let mut rest = header.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = &rest[start + rest[start..].find("*/").unwrap() + 2..];
    }
    code.push_str(rest);
    // The identifier right before each "(": function names, and "(*ws_x_cb)" typedefs' none.
    code.match_indices('(')
        .map(|(i, _)| {
            let before = &code[..i];
            let start = before.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |j| j + 1);
            &before[start..]
        })
        .filter(|w| w.starts_with("ws_"))
        .map(str::to_owned)
        .collect()
}

/// Waits, ping by ping, until the connection has been idle for four full keepalive timeouts
/// (`timeout_ms`) while the peer answered its pings; `wait_for_pings(n)` returns once the
/// peer has seen `n` pings. Returns how many it saw.
pub fn survive_keepalive(timeout_ms: u32, mut wait_for_pings: impl FnMut(usize)) -> usize {
    let start = Instant::now();
    let span = Duration::from_millis(4 * u64::from(timeout_ms));
    let mut pings = 0;
    while start.elapsed() < span {
        pings += 1;
        wait_for_pings(pings);
    }
    pings
}

/// Reports loudly that a test did not test anything here (libtest hides what a passing test
/// prints, so this goes to the process's stderr directly), or fails it where
/// WSCLIENT_REQUIRE_ALL=1 says that every test must run.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    assert!(std::env::var_os("WSCLIENT_REQUIRE_ALL").is_none(), "{test}: {why} (WSCLIENT_REQUIRE_ALL is set)");
    let line = format!("\nSKIPPED: {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Under `make asan` (WSCLIENT_ASAN=1), tests that only drive other programs (which are not
/// built with the sanitizer) or that measure the process's memory (which ASan's shadow and
/// quarantine inflate) are skipped, loudly. Returns whether to skip.
pub fn skip_under_asan(test: &str, why: &str) -> bool {
    if std::env::var_os("WSCLIENT_ASAN").is_none() {
        return false;
    }
    use std::io::Write;
    let line = format!("\nSKIPPED under AddressSanitizer: {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    true
}

// ---- helpers of the hostile tests (hostile_peers.rs, hostile_round2.rs) -----------------------

/// Dispatches (as a host's event loop does) until `done` holds or `limit` has passed; returns
/// whether it held.
pub fn pump(client: &Client, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
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
pub fn wait_open(client: &Client, rec: &Recorder, conn: WsConn) {
    assert!(
        pump(client, DEADLINE, || rec.of(conn).contains(&Ev::Open(conn)) || rec.finals(conn) > 0),
        "the connection never opened"
    );
    assert_eq!(rec.of(conn).first(), Some(&Ev::Open(conn)), "{:?}", rec.of(conn));
}

/// Dispatches until `conn`'s final callback, at most `limit`; returns the time it took, or
/// None if it did not come.
pub fn final_within(client: &Client, rec: &Recorder, conn: WsConn, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    pump(client, limit, || rec.finals(conn) > 0).then(|| start.elapsed())
}

pub fn last_event(rec: &Recorder, conn: WsConn) -> Option<Ev> {
    rec.of(conn).last().cloned()
}

pub fn final_status(rec: &Recorder, conn: WsConn) -> Option<WsStatus> {
    match last_event(rec, conn) {
        Some(Ev::Error(_, status, _)) => Some(status),
        _ => None,
    }
}

pub fn set(status: WsStatus) {
    assert_eq!(status, WsStatus::Ok, "{}", last_error());
}

/// Options with keepalive pings off (tests that hold a peer silent must not be ended by them).
pub fn no_keepalive() -> Options {
    let options = Options::new();
    set(unsafe { ws_options_set_keepalive(options.0, 0, 1000) });
    options
}

/// The C library's getaddrinfo, for a test binary that defines its own (a test-only resolver)
/// and passes the names it does not answer on.
pub type GetAddrInfo = unsafe extern "C" fn(
    *const std::os::raw::c_char,
    *const std::os::raw::c_char,
    *const libc::addrinfo,
    *mut *mut libc::addrinfo,
) -> std::os::raw::c_int;

pub fn system_getaddrinfo() -> GetAddrInfo {
    static REAL: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let address = *REAL.get_or_init(|| unsafe { libc::dlsym(libc::RTLD_NEXT, c"getaddrinfo".as_ptr()) as usize });
    assert_ne!(address, 0, "the C library's getaddrinfo");
    unsafe { std::mem::transmute::<usize, GetAddrInfo>(address) }
}

/// A callback's `user` pointer to `value`.
pub fn user<T>(value: &T) -> *mut c_void {
    value as *const T as *mut c_void
}

/// A tiny random number generator (xorshift), seeded per test.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
