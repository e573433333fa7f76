//! Attacks on the redirect promises (README option row `ws_options_set_follow_redirects`, the
//! header's doc comment): a raw redirecting server written here records every request it gets
//! and answers what each test scripts: relative Locations, fragments, loops, codes that are not
//! followed, missing or doubled Locations, credentials across ports.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::server::TestServer;
use common::*;

/// A server on 127.0.0.1 answering each request head with `answer(n, request_head)` (n from 0),
/// then closing. Every request head is kept, in order.
struct Redirector {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Redirector {
    fn start(answer: impl Fn(usize, &str) -> String + Send + 'static) -> Redirector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let kept = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let head = read_head(&mut stream);
                let n = {
                    let mut kept = kept.lock().unwrap();
                    kept.push(head.clone());
                    kept.len() - 1
                };
                let _ = stream.write_all(answer(n, &head).as_bytes());
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink);
            }
        });
        Redirector { port, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// The request lines ("GET /x HTTP/1.1") received so far.
    fn lines(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().map(|h| h.lines().next().unwrap_or("").to_owned()).collect()
    }

    fn heads(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_head(stream: &mut TcpStream) -> String {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn redirect(code: u16, location: &str) -> String {
    format!("HTTP/1.1 {code} Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n")
}

const REFUSED: &str = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";

fn following(max: u32) -> Options {
    let options = no_keepalive();
    set(unsafe { ws_options_set_follow_redirects(options.0, max) });
    options
}

/// Connects and returns the first event (an open, or the final error).
fn outcome(url: &str, options: &Options) -> Ev {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    client.run_until("the open or the end", || !rec.of(conn).is_empty());
    let first = rec.of(conn)[0].clone();
    if first == Ev::Open(conn) {
        close(conn, 1000, "");
        client.run_until_final(&rec, conn);
    }
    first
}

/// The request line of the second request, after a redirect from `from` to `location`.
fn followed_to(from: &str, location: &'static str) -> String {
    let server = Redirector::start(move |n, _| if n == 0 { redirect(307, location) } else { REFUSED.to_owned() });
    let ev = outcome(&server.url(from), &following(1));
    assert!(matches!(ev, Ev::Error(_, WsStatus::HandshakeRejected, _)), "{location}: {ev:?}");
    let lines = server.lines();
    assert_eq!(lines.len(), 2, "{location}: the redirect was not followed: {ev:?}, requests {lines:?}");
    lines[1].clone()
}

/// The header: "A relative Location is resolved against the current URI" (RFC 3986 5.2,
/// which removes dot segments: /a/b/c with ../x is /a/x).
#[test]
fn a_relative_location_with_dot_segments_is_resolved() {
    assert_eq!(followed_to("/a/b/c", "../x"), "GET /a/x HTTP/1.1");
    assert_eq!(followed_to("/a/b/c", "./x"), "GET /a/b/x HTTP/1.1");
    assert_eq!(followed_to("/a/b/c", "/p/../q"), "GET /q HTTP/1.1");
}

/// RFC 3986 5.4.1: the reference "?y" against /a/b/c?x is /a/b/c?y.
#[test]
fn a_query_only_location_keeps_the_path() {
    assert_eq!(followed_to("/a/b/c?x=1", "?y=2"), "GET /a/b/c?y=2 HTTP/1.1");
}

/// RFC 9110 10.2.2: a Location may carry a fragment; a redirect with one is a redirect like
/// another (the fragment is not sent).
#[test]
fn a_location_with_a_fragment_is_followed_without_it() {
    assert_eq!(followed_to("/a", "/next#part"), "GET /next HTTP/1.1");
}

/// A plain relative name, and a network-path reference to the same server.
#[test]
fn plain_relative_locations_are_resolved() {
    assert_eq!(followed_to("/a/b/c?q", "d?e"), "GET /a/b/d?e HTTP/1.1");
}

/// README: only 301, 302, 307 and 308 are followed. 300, 303, 304, 305, 306 are refusals, even
/// with a Location, and nothing more is requested.
#[test]
fn other_3xx_codes_are_not_followed() {
    for code in [300u16, 303, 304, 305, 306] {
        let server = Redirector::start(move |_, _| redirect(code, "/elsewhere"));
        let ev = outcome(&server.url("/"), &following(5));
        match &ev {
            Ev::Error(_, WsStatus::HandshakeRejected, message) => {
                assert!(message.contains(&code.to_string()), "{code}: {message}")
            }
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(server.lines().len(), 1, "{code}: {:?}", server.lines());
    }
}

/// A redirect without a Location, or with two, is a rejection naming the code, with no second
/// request.
#[test]
fn a_redirect_without_or_with_two_locations_is_refused() {
    for extra in ["", "Location: /a\r\nLocation: /b\r\n"] {
        let server = Redirector::start(move |_, _| format!("HTTP/1.1 302 Found\r\n{extra}Content-Length: 0\r\n\r\n"));
        let ev = outcome(&server.url("/"), &following(5));
        assert!(matches!(&ev, Ev::Error(_, WsStatus::HandshakeRejected, m) if m.contains("302")), "{extra:?}: {ev:?}");
        assert_eq!(server.lines().len(), 1, "{extra:?}: {:?}", server.lines());
    }
}

/// A Location loop through relative paths: exactly max + 1 requests, then the limit's error.
#[test]
fn a_relative_loop_stops_at_the_limit() {
    let server = Redirector::start(|n, _| redirect(301, if n % 2 == 0 { "b" } else { "/a" }));
    let ev = outcome(&server.url("/a"), &following(5));
    assert!(matches!(&ev, Ev::Error(_, WsStatus::HandshakeRejected, m) if m.contains("too many redirects")), "{ev:?}");
    assert_eq!(server.lines().len(), 6, "{:?}", server.lines());
}

/// A Location near the 16 KiB head limit, and one past it: refused or followed, never a crash;
/// the error message stays readable (the Location is not copied whole into it).
#[test]
fn a_huge_location_is_handled() {
    for size in [15_000usize, 20_000] {
        let location = format!("/{}", "x".repeat(size));
        let server = Redirector::start(move |n, _| if n == 0 { redirect(307, &location) } else { REFUSED.to_owned() });
        let ev = outcome(&server.url("/"), &following(1));
        match ev {
            Ev::Error(_, WsStatus::HandshakeRejected, message) => {
                assert!(message.len() < 4096, "{size}: a message of {} bytes", message.len())
            }
            other => panic!("{size}: {other:?}"),
        }
    }
}

/// README: "Authorization and Cookie only to their own scheme, host and port": a redirect to
/// the same host on another port drops them; other headers follow.
#[test]
fn credentials_do_not_follow_to_another_port_of_the_same_host() {
    let target = TestServer::start();
    let to = format!("ws://127.0.0.1:{}/creds", target.port);
    let server = Redirector::start(move |_, _| redirect(302, &to));
    let options = following(1);
    unsafe {
        ws_options_add_header(options.0, cstr("authorization").as_ptr(), cstr("Bearer t0ken").as_ptr());
        ws_options_add_header(options.0, cstr("COOKIE").as_ptr(), cstr("session=42").as_ptr());
    }
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(&server.url("/start"), options.0);
    watch(conn, &rec);
    client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), ["authorization: ; cookie: "], "{:?}", rec.of(conn));
    // The first hop did get them (they were given for it).
    let first = server.heads()[0].to_ascii_lowercase();
    assert!(first.contains("authorization: bearer t0ken") && first.contains("cookie: session=42"), "{first}");
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
}

/// Once dropped at a hop to another origin, the credentials do not come back when a later hop
/// leads to yet another host, and the next hop of that chain never gets them.
#[test]
fn credentials_stay_dropped_along_a_chain() {
    let target = TestServer::start();
    let last = format!("ws://127.0.0.1:{}/creds", target.port);
    let middle = Redirector::start(move |_, _| redirect(307, &last));
    let via = format!("ws://localhost:{}/m", middle.port);
    let first = Redirector::start(move |_, _| redirect(307, &via));
    let options = following(3);
    unsafe {
        ws_options_add_header(options.0, cstr("Authorization").as_ptr(), cstr("Bearer t0ken").as_ptr());
    }
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(&first.url("/"), options.0);
    watch(conn, &rec);
    client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), ["authorization: ; cookie: "], "{:?}", rec.of(conn));
    assert!(!middle.heads()[0].to_ascii_lowercase().contains("authorization"), "{:?}", middle.heads());
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
}

/// Garbage Locations: refused with HANDSHAKE_REJECTED, never a crash, nothing requested.
#[test]
fn garbage_locations_are_refused() {
    for location in
        ["ws://", "ws://[::1", "ws://host:99999/", "ws://user@127.0.0.1/", "javascript:alert(1)", "ws://%ff%fe/"]
    {
        let server = Redirector::start(move |_, _| redirect(301, location));
        let ev = outcome(&server.url("/"), &following(2));
        assert!(matches!(ev, Ev::Error(_, WsStatus::HandshakeRejected, _)), "{location}: {ev:?}");
    }
}

/// README: the connect timeout covers "DNS + TCP + TLS + upgrade"; with redirects it covers
/// every hop: slow hops cannot each get a fresh timeout.
#[test]
fn the_connect_timeout_covers_all_the_hops() {
    let server = Redirector::start(|n, _| {
        std::thread::sleep(Duration::from_millis(300));
        redirect(307, &format!("/hop{}", n + 1))
    });
    let options = following(20);
    set(unsafe { ws_options_set_connect_timeout_ms(options.0, 1000) });
    let started = std::time::Instant::now();
    let ev = outcome(&server.url("/hop0"), &options);
    let took = started.elapsed();
    assert!(matches!(ev, Ev::Error(_, WsStatus::ConnectTimeout, _)), "{ev:?} after {took:?}");
    assert!(took < Duration::from_millis(2000), "failed after {took:?}");
    assert!(server.lines().len() <= 5, "{:?}", server.lines());
}

/// Through an HTTP proxy named in the options, each hop gets its own CONNECT (to the host of
/// that hop), and credentials are dropped at the origin change as without a proxy.
#[test]
fn redirects_through_a_proxy_tunnel_each_hop() {
    let target = TestServer::start();
    let proxy = common::proxies::tinyproxy(None, &[]);
    let options = following(2);
    set(unsafe { ws_options_set_proxy(options.0, cstr(&format!("http://127.0.0.1:{}", proxy.port)).as_ptr()) });
    unsafe { ws_options_add_header(options.0, cstr("Authorization").as_ptr(), cstr("Bearer t0ken").as_ptr()) };
    let to = format!("ws://localhost:{}/creds", target.port);
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(&target.url(&format!("/redirect?code=308&to={to}")), options.0);
    watch(conn, &rec);
    client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), ["authorization: ; cookie: "], "{:?}", rec.of(conn));
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
    let log = std::fs::read_to_string(proxy.dir.join("log")).unwrap();
    assert!(log.contains(&format!("CONNECT 127.0.0.1:{}", target.port)), "{log}");
    assert!(log.contains(&format!("CONNECT localhost:{}", target.port)), "{log}");
    let accepted = target.log.lines().iter().filter(|l| l.starts_with("accepted from")).cloned().collect::<Vec<_>>();
    assert_eq!(accepted, ["accepted from 127.0.0.3", "accepted from 127.0.0.3"]);
}
