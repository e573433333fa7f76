//! Attacks on "Connecting" (Happy Eyeballs, RFC 8305) and on the URI promises for
//! internationalised names and IPv6 zone identifiers (README "URIs"). Names ending in ".test"
//! are answered by a test-only getaddrinfo defined in this binary (the technique of
//! tests/connecting.rs); a ".test" name it was not told about is not found, so no look-up ever
//! leaves the machine.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::proxies::{tinyproxy, TINYPROXY_FROM};
use common::server::TestServer;
use common::*;

/// The test resolver: this binary defines getaddrinfo, so the library's look-ups come here.
/// Names in `ANSWERS` get the listed addresses, in that order; others go to the C library.
mod test_resolver {
    use std::ffi::{CStr, CString};
    use std::os::raw::{c_char, c_int};
    use std::ptr::null_mut;
    use std::sync::Mutex;

    pub static ANSWERS: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());
    /// Every name looked up, as the library asked for it.
    pub static ASKED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    use super::common::system_getaddrinfo as real;

    #[no_mangle]
    pub unsafe extern "C" fn getaddrinfo(
        node: *const c_char,
        service: *const c_char,
        hints: *const libc::addrinfo,
        res: *mut *mut libc::addrinfo,
    ) -> c_int {
        if node.is_null() {
            return real()(node, service, hints, res);
        }
        let name = CStr::from_ptr(node).to_string_lossy().into_owned();
        ASKED.lock().unwrap().push(name.clone());
        let answer = ANSWERS.lock().unwrap().iter().find(|(n, _)| *n == name).map(|(_, a)| a.clone());
        let Some(addresses) = answer else {
            if name.ends_with(".test") {
                return libc::EAI_NONAME;
            }
            return real()(node, service, hints, res);
        };
        // Each address through the C library (numeric, so no look-up), the lists chained.
        let mut head: *mut libc::addrinfo = null_mut();
        let mut tail: *mut libc::addrinfo = null_mut();
        for address in addresses {
            let mut list = null_mut();
            let address = CString::new(address).unwrap();
            let status = real()(address.as_ptr(), service, hints, &mut list);
            if status != 0 {
                return status;
            }
            if head.is_null() {
                head = list;
            } else {
                (*tail).ai_next = list;
            }
            tail = list;
            while !(*tail).ai_next.is_null() {
                tail = (*tail).ai_next;
            }
        }
        *res = head;
        0
    }
}

fn answer(name: &str, addresses: &[&str]) {
    let mut answers = test_resolver::ANSWERS.lock().unwrap();
    answers.retain(|(n, _)| n != name);
    answers.push((name.to_owned(), addresses.iter().map(|a| a.to_string()).collect()));
}

/// A listening socket on `ip:port` whose accept queue is full (backlog 0, one connection of
/// ours queued): the kernel drops the SYNs that reach it, so a connect to it hangs.
struct Swallower {
    listener: OwnedFd,
    _queued: Vec<std::net::TcpStream>,
}

impl Swallower {
    fn new(ip: std::net::IpAddr, port: u16) -> Option<Swallower> {
        let (family, addr, len) = sockaddr(ip, port);
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let listener = unsafe { OwnedFd::from_raw_fd(fd) };
        if family == libc::AF_INET6 {
            let one: libc::c_int = 1;
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            unsafe { libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &one as *const _ as *const _, size) };
        }
        assert_eq!(unsafe { libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) }, 0, "bind {ip}:{port}");
        assert_eq!(unsafe { libc::listen(fd, 0) }, 0);
        let target = std::net::SocketAddr::new(ip, port);
        let mut queued = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
                Ok(stream) => queued.push(stream),
                Err(_) => return Some(Swallower { listener, _queued: queued }),
            }
        }
        skipped("Swallower", "this kernel completes connections beyond a full accept queue");
        None
    }

    /// Accepts every connection waiting in the queue (without blocking); how many there were.
    fn drain(&self) -> usize {
        let fd = self.listener.as_raw_fd();
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
        let mut n = 0;
        loop {
            let accepted = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
            if accepted < 0 {
                return n;
            }
            unsafe { libc::close(accepted) };
            n += 1;
        }
    }
}

fn sockaddr(ip: std::net::IpAddr, port: u16) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match ip {
        std::net::IpAddr::V4(v4) => {
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, addr) };
            (libc::AF_INET, storage, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        std::net::IpAddr::V6(v6) => {
            let addr = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port.to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.octets() },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, addr) };
            (libc::AF_INET6, storage, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().unwrap()
}

/// Connects; the first event (open or final error) and how long it took.
fn first_event(client: &Client, rec: &Recorder, url: &str, options: &Options) -> (WsConn, Ev, Duration) {
    let started = Instant::now();
    let conn = client.connect_with(url, options.0);
    watch(conn, rec);
    client.run_until("the open or the end", || !rec.of(conn).is_empty());
    (conn, rec.of(conn)[0].clone(), started.elapsed())
}

fn timeout_options(ms: u32) -> Options {
    let options = no_keepalive();
    set(unsafe { ws_options_set_connect_timeout_ms(options.0, ms) });
    options
}

fn close_and_finish(client: &Client, rec: &Recorder, conn: WsConn) {
    close(conn, 1000, "");
    client.run_until_final(rec, conn);
}

/// Two silent addresses before the server: each costs the 250 ms attempt delay, no more.
#[test]
fn two_silent_addresses_cost_two_attempt_delays() {
    let server = TestServer::start();
    let Some(_a) = Swallower::new(ip("127.0.0.2"), server.port) else { return };
    let Some(_b) = Swallower::new(ip("127.0.0.3"), server.port) else { return };
    answer("two-silent.test", &["127.0.0.2", "127.0.0.3", "127.0.0.1"]);
    let client = Client::new();
    let rec = Recorder::default();
    let url = format!("ws://two-silent.test:{}/echo", server.port);
    let (conn, first, took) = first_event(&client, &rec, &url, &timeout_options(10_000));
    assert_eq!(first, Ev::Open(conn), "after {took:?}");
    assert!(took >= Duration::from_millis(480), "opened in {took:?}: the attempt delay was not waited");
    assert!(took < Duration::from_millis(2000), "opened in {took:?}, not near 2 x 250 ms");
    close_and_finish(&client, &rec, conn);
}

/// The families interleave (RFC 8305 4): v4 silent, v4 silent, v6 server is tried as v4, v6,
/// v4, so the server is reached after one attempt delay, not two.
#[test]
fn the_families_interleave() {
    let server = TestServer::start();
    let Some(port) = server.ipv6_port else {
        skipped("the_families_interleave", "no IPv6 loopback here");
        return;
    };
    let Some(_a) = Swallower::new(ip("127.0.0.2"), port) else { return };
    let Some(_b) = Swallower::new(ip("127.0.0.3"), port) else { return };
    answer("interleave.test", &["127.0.0.2", "127.0.0.3", "::1"]);
    let client = Client::new();
    let rec = Recorder::default();
    let url = format!("ws://interleave.test:{port}/echo");
    let (conn, first, took) = first_event(&client, &rec, &url, &timeout_options(10_000));
    assert_eq!(first, Ev::Open(conn), "after {took:?}");
    assert!(took < Duration::from_millis(480), "opened in {took:?}: the v6 address was not tried second");
    close_and_finish(&client, &rec, conn);
}

/// Only silent addresses: the connect timeout, not later (and not the sum of anything).
#[test]
fn only_silent_addresses_fail_at_the_connect_timeout() {
    let port = closed_port();
    let Some(_a) = Swallower::new(ip("127.0.0.2"), port) else { return };
    let Some(_b) = Swallower::new(ip("127.0.0.3"), port) else { return };
    answer("all-silent.test", &["127.0.0.2", "127.0.0.3"]);
    let client = Client::new();
    let rec = Recorder::default();
    let url = format!("ws://all-silent.test:{port}/");
    let (conn, first, took) = first_event(&client, &rec, &url, &timeout_options(800));
    assert!(matches!(first, Ev::Error(_, WsStatus::ConnectTimeout, _)), "{first:?} after {took:?}");
    assert!(took >= Duration::from_millis(750) && took < Duration::from_millis(2000), "failed after {took:?}");
    // Nothing follows the final callback.
    pump(&client, Duration::from_millis(300), || false);
    assert_eq!(rec.of(conn).len(), 1, "{:?}", rec.of(conn));
}

/// "The first to connect kept and the others dropped": once the connection opened through the
/// second address, the attempt at the silent first one is gone. Its listener's queue is
/// emptied after the open; a SYN the client retransmitted (after 1 s, then 3 s) would now be
/// accepted and show up in the queue. Nothing may, and the server sees one connection only.
#[test]
fn the_losing_attempt_is_dropped_and_nothing_comes_late() {
    let server = TestServer::start();
    let Some(silent) = Swallower::new(ip("127.0.0.2"), server.port) else { return };
    answer("loser.test", &["127.0.0.2", "127.0.0.1"]);
    let client = Client::new();
    let rec = Recorder::default();
    let url = format!("ws://loser.test:{}/echo", server.port);
    let (conn, first, took) = first_event(&client, &rec, &url, &timeout_options(10_000));
    assert_eq!(first, Ev::Open(conn), "after {took:?}");
    let ours = silent.drain();
    assert!(ours >= 1, "the swallower's own queued connection");
    // Past the client's first two SYN retransmissions (1 s and 3 s after its attempt began).
    let started = Instant::now();
    pump(&client, Duration::from_millis(3600), || false);
    assert!(started.elapsed() >= Duration::from_millis(3500));
    assert_eq!(silent.drain(), 0, "the losing attempt kept connecting after the open");
    assert_eq!(send_text(conn, "still here"), WsStatus::Ok);
    client.run_until("the echo", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), ["still here"]);
    close_and_finish(&client, &rec, conn);
    let accepted = server.log.lines().iter().filter(|l| l.starts_with("accepted from")).count();
    assert_eq!(accepted, 1, "{:?}", server.log.lines());
    pump(&client, Duration::from_millis(300), || false);
    assert!(matches!(rec.of(conn).last(), Some(Ev::Close(..))), "{:?}", rec.of(conn));
    assert_eq!(rec.finals(conn), 1, "{:?}", rec.of(conn));
}

/// The proxy's own name is connected to the same way: its silent first address costs 250 ms,
/// not the connect timeout.
#[test]
fn a_proxy_name_with_a_silent_first_address_costs_250_ms() {
    let server = TestServer::start();
    let proxy = tinyproxy(None, &[]);
    let Some(_a) = Swallower::new(ip("127.0.0.2"), proxy.port) else { return };
    answer("proxy.test", &["127.0.0.2", "127.0.0.1"]);
    let options = timeout_options(10_000);
    set(unsafe { ws_options_set_proxy(options.0, cstr(&format!("http://proxy.test:{}", proxy.port)).as_ptr()) });
    let client = Client::new();
    let rec = Recorder::default();
    let (conn, first, took) = first_event(&client, &rec, &server.url("/echo"), &options);
    assert_eq!(first, Ev::Open(conn), "after {took:?}");
    assert!(took < Duration::from_millis(3000), "opened in {took:?}");
    server.log.wait_for(|l| l == format!("accepted from {TINYPROXY_FROM}"));
    close_and_finish(&client, &rec, conn);
}

/// "The next address started as soon as one fails": twenty refused addresses cost no attempt
/// delay each; the connection fails at once, with WS_STATUS_CONNECT_FAILED.
#[test]
fn many_refused_addresses_fail_at_once() {
    let port = closed_port();
    let addresses: Vec<String> = (10..30).map(|i| format!("127.0.0.{i}")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    answer("many-refused.test", &refs);
    let client = Client::new();
    let rec = Recorder::default();
    let url = format!("ws://many-refused.test:{port}/");
    let (_, first, took) = first_event(&client, &rec, &url, &timeout_options(10_000));
    assert!(matches!(first, Ev::Error(_, WsStatus::ConnectFailed, _)), "{first:?} after {took:?}");
    assert!(took < Duration::from_millis(240), "20 refused addresses took {took:?}");
}

// ---- internationalised names -----------------------------------------------------------------

fn connect_status(url: &str) -> (WsStatus, String) {
    let client = Client::new();
    let mut conn = 0;
    let status = unsafe { ws_connect(client.0, cstr(url).as_ptr(), &mut conn) };
    let mut message = last_error();
    if status == WsStatus::Ok {
        let rec = Recorder::default();
        watch(conn, &rec);
        client.run_until_final(&rec, conn);
        message = format!("ws_connect accepted it; then {:?}", rec.of(conn).last());
    }
    (status, message)
}

/// README: "Refused at once with WS_STATUS_INVALID_URI ...: a name with no valid IDNA form".
#[test]
fn names_idna_refuses_are_invalid_uris_with_a_reason() {
    for host in [
        "\u{FFFD}.test",             // disallowed code point
        "\u{0301}abc.test",          // a label starting with a combining mark
        "xn--b\u{fc}cher.test",      // an A-label prefix on a U-label
        "%C3%28.test",               // percent-encoded bytes that are not UTF-8
        "%C3.test",                  // a truncated UTF-8 sequence
        "b\u{fc}cher%2Fx.test",      // a slash by percent-encoding
        "b\u{fc}cher%00.test",       // a NUL by percent-encoding
        "\u{FF05}41.test",           // a fullwidth percent sign, mapped to '%'
        "b\u{fc}cher\u{3000}x.test", // an ideographic space
        "\u{200D}.test",             // a lone zero-width joiner
    ] {
        let (status, message) = connect_status(&format!("ws://{host}:1/"));
        assert_eq!(status, WsStatus::InvalidUri, "{host:?}: {message}");
        assert!(message.contains("host") || message.contains("IDNA"), "{host:?}: {message}");
    }
}

/// Mixed case outside ASCII is case-folded as UTS 46 says: BÜCHER is bücher.
#[test]
fn mixed_case_non_ascii_names_fold_to_the_same_ascii_form() {
    let server = TestServer::start();
    answer("xn--bcher-kva.test", &["127.0.0.1"]);
    for host in ["B\u{dc}CHER.TEST", "b\u{fc}CHER.test", "B%C3%9CCHER.test"] {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("ws://{host}:{}/host", server.port));
        watch(conn, &rec);
        client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
        assert_eq!(
            rec.texts(conn),
            [format!("host: xn--bcher-kva.test:{}", server.port)],
            "{host}: {:?}",
            rec.of(conn)
        );
        close_and_finish(&client, &rec, conn);
    }
}

/// Very long names (in Unicode and percent-encoded): refused, or looked up and not found;
/// never a crash, and quickly.
#[test]
fn very_long_international_names_are_handled() {
    for host in [
        format!("{}.test", "\u{fc}".repeat(100_000)),
        format!("{}.test", "%C3%BC".repeat(20_000)),
        format!("{}test", "\u{fc}.".repeat(20_000)),
    ] {
        let started = Instant::now();
        let (status, message) = connect_status(&format!("ws://{host}:1/"));
        assert!(
            matches!(status, WsStatus::InvalidUri | WsStatus::Ok),
            "{status:?}: {}",
            &message[..200.min(message.len())]
        );
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }
}

// ---- zone identifiers --------------------------------------------------------------------

/// README: "a zone naming no interface here" is refused. A number is an interface's index:
/// one that no interface has names none.
#[test]
fn a_zone_number_naming_no_interface_is_refused() {
    for zone in ["999999", "4294967295", "77"] {
        let (status, message) = connect_status(&format!("ws://[fe80::1%25{zone}]:1/"));
        assert_eq!(status, WsStatus::InvalidUri, "zone {zone}: {message}");
        assert!(message.contains(zone), "{message}");
    }
}

/// Zones with odd characters: refused with INVALID_URI, never a crash.
#[test]
fn zones_with_odd_characters_are_invalid_uris() {
    for zone in [
        "%25",
        "%25%00",
        "%25lo%00",
        "%25%2F",
        "%25lo%20",
        "%25%ZZ",
        "%2",
        "%25%FF",
        "%250",
        "%254294967296",
        "%25-1",
        "lo",
        "%25\u{e9}th0",
    ] {
        let zone = zone.to_owned();
        let long = format!("%25{}", "a".repeat(5000));
        for zone in [zone, long] {
            let (status, message) = connect_status(&format!("ws://[fe80::1{zone}]:1/"));
            assert_eq!(status, WsStatus::InvalidUri, "zone {zone:?}: {message}");
        }
    }
}

/// The loopback interface by number: works like its name (index of "lo").
#[test]
fn a_zone_given_as_the_loopback_index_connects() {
    let server = TestServer::start();
    let Some(port) = server.ipv6_port else {
        skipped("a_zone_given_as_the_loopback_index_connects", "no IPv6 loopback here");
        return;
    };
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert!(index > 0);
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&format!("ws://[::1%25{index}]:{port}/host"));
    watch(conn, &rec);
    client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), [format!("host: [::1]:{port}")], "{:?}", rec.of(conn));
    close_and_finish(&client, &rec, conn);
}
