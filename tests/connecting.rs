//! Connecting to names with several addresses (Happy Eyeballs, RFC 8305), internationalised
//! names (IDNA) and IPv6 zone identifiers. Names ending in ".test" are answered by a test-only
//! system resolver defined in this binary (the library's look-ups go through getaddrinfo).

mod common;

use std::time::{Duration, Instant};

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
        let Some(addresses) = answer else { return real()(node, service, hints, res) };
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

/// A listening socket on `ip:port` whose accept queue is full: the kernel drops the SYNs that
/// reach it, as a firewall that drops packets would, so a connect to it hangs. None (and a loud
/// skip) if the kernel here answers anyway.
struct SynSwallower {
    _listener: std::os::fd::OwnedFd,
    _queued: Vec<std::net::TcpStream>,
}

fn syn_swallower(ip: [u8; 4], port: u16) -> Option<SynSwallower> {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let listener = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    assert_eq!(unsafe { libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) }, 0, "bind");
    assert_eq!(unsafe { libc::listen(fd, 0) }, 0);
    let target = std::net::SocketAddr::from((ip, port));
    // A backlog of 0 holds one connection; then the queue is full.
    let mut queued = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
            Ok(stream) => queued.push(stream),
            Err(_) => return Some(SynSwallower { _listener: listener, _queued: queued }),
        }
    }
    skipped("syn_swallower", "this kernel completes connections beyond a full accept queue");
    None
}

fn open_within(client: &Client, rec: &Recorder, conn: WsConn) -> (Duration, Option<Ev>) {
    let started = Instant::now();
    client.run_until("the end of connecting", || !rec.of(conn).is_empty());
    (started.elapsed(), rec.of(conn).first().cloned())
}

/// README: "an address that does not answer costs 250 ms, not the connect timeout". The name
/// has two addresses; the first swallows SYNs, the second is the server.
#[test]
fn an_address_that_swallows_syns_costs_250_ms_not_the_connect_timeout() {
    let server = TestServer::start();
    let Some(_swallower) = syn_swallower([127, 0, 0, 2], server.port) else { return };
    answer("eyeballs.test", &["127.0.0.2", "127.0.0.1"]);
    let client = Client::new();
    let options = Options::new();
    unsafe { ws_options_set_connect_timeout_ms(options.0, 10_000) };
    let rec = Recorder::default();
    let conn = client.connect_with(&format!("ws://eyeballs.test:{}/echo", server.port), options.0);
    watch(conn, &rec);
    let (took, first) = open_within(&client, &rec, conn);
    assert_eq!(first, Some(Ev::Open(conn)), "after {took:?}: {:?}", rec.of(conn));
    assert!(took >= Duration::from_millis(240), "the second address waited the attempt delay: {took:?}");
    assert!(took < Duration::from_secs(3), "opened in {took:?}, not within 3 s of the 250 ms delay");
    server.log.wait_for(|l| l == "accepted from 127.0.0.1");
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
}

/// A refused first address does not fail the connection (the unit tests in src/io/eyeballs.rs
/// show that the next attempt starts at once).
#[test]
fn a_refused_first_address_does_not_fail_the_connection() {
    let server = TestServer::start();
    // Nothing listens on 127.0.0.4 at the server's port: refused.
    answer("refused-first.test", &["127.0.0.4", "127.0.0.1"]);
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&format!("ws://refused-first.test:{}/echo", server.port));
    watch(conn, &rec);
    let (_, first) = open_within(&client, &rec, conn);
    assert_eq!(first, Some(Ev::Open(conn)), "{:?}", rec.of(conn));
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
}

/// Connects and returns the first text the server sends (the /host path sends its Host header).
fn first_text(client: &Client, url: &str, options: Option<&Options>) -> Result<String, Vec<Ev>> {
    let rec = Recorder::default();
    let conn = match options {
        Some(options) => client.connect_with(url, options.0),
        None => client.connect(url),
    };
    watch(conn, &rec);
    client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    let texts = rec.texts(conn);
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
    texts.first().cloned().ok_or_else(|| rec.of(conn))
}

/// An internationalised name is looked up and sent in the Host header in its ASCII form.
#[test]
fn an_internationalised_name_goes_out_in_its_ascii_form() {
    let server = TestServer::start();
    answer("xn--bcher-kva.test", &["127.0.0.1"]);
    let client = Client::new();
    let url = format!("ws://B\u{fc}cher.test:{}/host", server.port);
    assert_eq!(first_text(&client, &url, None).unwrap(), format!("host: xn--bcher-kva.test:{}", server.port));
    assert!(test_resolver::ASKED.lock().unwrap().iter().any(|n| n == "xn--bcher-kva.test"));
    // Percent-encoded UTF-8 is the same name.
    let url = format!("ws://b%C3%BCcher.test:{}/host", server.port);
    assert_eq!(first_text(&client, &url, None).unwrap(), format!("host: xn--bcher-kva.test:{}", server.port));
}

/// A zone identifier chooses the interface and stays out of the Host header.
#[test]
fn an_ipv6_zone_identifier_is_decoded_and_left_out_of_the_host_header() {
    let server = TestServer::start();
    let Some(port) = server.ipv6_port else {
        skipped("an_ipv6_zone_identifier_is_decoded_and_left_out_of_the_host_header", "no IPv6 loopback here");
        return;
    };
    let client = Client::new();
    let url = format!("ws://[::1%25lo]:{port}/host");
    assert_eq!(first_text(&client, &url, None).unwrap(), format!("host: [::1]:{port}"));
    // An interface that does not exist is refused by ws_connect, naming it.
    let mut conn = 0;
    let status = unsafe { ws_connect(client.0, cstr("ws://[fe80::1%25nosuch0]/").as_ptr(), &mut conn) };
    assert_eq!(status, WsStatus::InvalidUri);
    assert!(last_error().contains("nosuch0"), "{}", last_error());
}
