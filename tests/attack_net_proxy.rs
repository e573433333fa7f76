//! Attacks on the proxy promises (README "Proxies", "Status codes" WS_STATUS_PROXY and
//! WS_STATUS_PROXY_AUTH) with hostile HTTP CONNECT and SOCKS5 proxies written here: raw TCP
//! servers on loopback that misbehave on purpose. Every error must carry the right status,
//! name the proxy, never show its password, and come within the connect timeout.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::server::TestServer;
use common::*;

const PASSWORD: &str = "hunter2secret";

/// A one-connection proxy on 127.0.0.1 running `script` on the connection it accepts.
fn proxy_peer(script: impl FnOnce(TcpStream) + Send + 'static) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nodelay(true);
            script(stream);
        }
    });
    (port, handle)
}

/// Reads an HTTP request head (up to the empty line).
fn read_head(stream: &mut TcpStream) -> String {
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

fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let _ = stream.read_exact(&mut buf);
    buf
}

/// Copies both ways between the proxy's client and the test server (a tunnel).
fn splice(client: TcpStream, port: u16) {
    let server = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (mut c1, mut s1) = (client, server);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c1, &mut s1);
        let _ = s1.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut s2, &mut c2);
    let _ = c2.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

fn options(proxy: &str, connect_timeout_ms: u32) -> Options {
    let options = no_keepalive();
    set(unsafe { ws_options_set_proxy(options.0, cstr(proxy).as_ptr()) });
    set(unsafe { ws_options_set_connect_timeout_ms(options.0, connect_timeout_ms) });
    options
}

/// Connects through the proxy; the first event (open or final error) and when it came.
fn first_event(url: &str, options: &Options, limit: Duration) -> (Option<Ev>, Duration) {
    let client = Client::new();
    let rec = Recorder::default();
    let started = Instant::now();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    pump(&client, limit, || !rec.of(conn).is_empty());
    let took = started.elapsed();
    let first = rec.of(conn).first().cloned();
    if first == Some(Ev::Open(conn)) {
        close(conn, 1000, "");
        pump(&client, Duration::from_secs(5), || rec.finals(conn) > 0);
    }
    (first, took)
}

/// The final error through a hostile proxy at `port`, with credentials; checks that it names
/// the proxy and not its password.
fn failure(scheme: &str, port: u16, limit: Duration) -> (WsStatus, String, Duration) {
    let proxy = format!("{scheme}://alice:{PASSWORD}@127.0.0.1:{port}");
    let (event, took) = first_event("ws://127.0.0.1:9/", &options(&proxy, 3000), limit);
    let Some(Ev::Error(_, status, message)) = event else {
        panic!("{scheme} proxy: expected an error within {limit:?}, got {event:?} after {took:?}")
    };
    assert!(message.contains(&format!("127.0.0.1:{port}")), "the message names the proxy: {message}");
    assert!(!message.contains(PASSWORD), "the message shows the password: {message}");
    assert!(!message.chars().any(char::is_control), "control characters in {message:?}");
    (status, message, took)
}

/// README: "The connect timeout covers the proxy too" and "Errors name the proxy". A proxy that
/// accepts and never answers the CONNECT: the connection fails at the connect timeout, and the
/// message says the proxy is where it waited.
#[test]
fn a_proxy_that_never_answers_fails_at_the_connect_timeout_naming_the_proxy() {
    let (port, _peer) = proxy_peer(|mut stream| {
        read_head(&mut stream);
        std::thread::sleep(Duration::from_secs(8));
    });
    let proxy = format!("http://alice:{PASSWORD}@127.0.0.1:{port}");
    let (event, took) = first_event("ws://127.0.0.1:9/", &options(&proxy, 600), Duration::from_secs(6));
    let Some(Ev::Error(_, status, message)) = event else { panic!("expected an error, got {event:?} after {took:?}") };
    assert!(took >= Duration::from_millis(550) && took < Duration::from_millis(2600), "failed after {took:?}");
    assert!(matches!(status, WsStatus::ConnectTimeout | WsStatus::Proxy), "{status:?}: {message}");
    assert!(!message.contains(PASSWORD), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}")),
        "a connect timeout spent waiting for the proxy does not name the proxy: {message}"
    );
}

/// A proxy that answers its 200 one byte at a time (each in its own segment) is still a proxy.
#[test]
fn a_connect_answer_sent_byte_by_byte_opens_the_tunnel() {
    let server = TestServer::start();
    let server_port = server.port;
    let (port, _peer) = proxy_peer(move |mut stream| {
        read_head(&mut stream);
        for b in b"HTTP/1.1 200 Connection established\r\nProxy-Agent: slow\r\n\r\n" {
            stream.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        splice(stream, server_port);
    });
    let (event, took) =
        first_event(&server.url("/echo"), &options(&format!("http://127.0.0.1:{port}"), 10_000), DEADLINE);
    assert!(matches!(event, Some(Ev::Open(_))), "{event:?} after {took:?}");
}

/// RFC 9110 9.3.6: a client MUST ignore Content-Length in a 2xx answer to CONNECT; an HTTP/1.0
/// 200 is a valid answer too.
#[test]
fn an_http_1_0_200_with_content_length_zero_opens_the_tunnel() {
    let server = TestServer::start();
    let server_port = server.port;
    let (port, _peer) = proxy_peer(move |mut stream| {
        read_head(&mut stream);
        stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        splice(stream, server_port);
    });
    let (event, took) =
        first_event(&server.url("/echo"), &options(&format!("http://127.0.0.1:{port}"), 10_000), DEADLINE);
    assert!(matches!(event, Some(Ev::Open(_))), "{event:?} after {took:?}");
}

/// A 200 followed by bytes that no server sent (a body, garbage): refused as the proxy's fault.
#[test]
fn a_200_followed_by_garbage_is_a_proxy_error() {
    for extra in
        [&b"Content-Length: 5\r\n\r\nhello"[..], b"\r\n\x00\xff\xfegarbage", b"\r\nHTTP/1.1 101 Switching\r\n\r\n"]
    {
        let extra = extra.to_vec();
        let (port, peer) = proxy_peer(move |mut stream| {
            read_head(&mut stream);
            let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
            answer.extend_from_slice(&extra);
            stream.write_all(&answer).unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let (status, message, _) = failure("http", port, Duration::from_secs(10));
        assert_eq!(status, WsStatus::Proxy, "{message}");
        peer.join().unwrap();
    }
}

/// An endless response head: refused past the 16 KiB head limit, long before the timeout.
#[test]
fn an_endless_connect_answer_head_is_bounded() {
    let (port, _peer) = proxy_peer(|mut stream| {
        read_head(&mut stream);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n");
        let line = format!("X-Filler: {}\r\n", "a".repeat(100));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if stream.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
    });
    let (status, message, took) = failure("http", port, Duration::from_secs(10));
    assert_eq!(status, WsStatus::Proxy, "{message}");
    assert!(took < Duration::from_millis(2500), "took {took:?} (connect timeout 3 s)");
}

/// 407 answers: without a realm, with a huge realm full of control characters. Always
/// WS_STATUS_PROXY_AUTH, the message bounded and printable.
#[test]
fn a_407_without_realm_or_with_a_hostile_realm_is_proxy_auth() {
    let huge = "R".repeat(15_000);
    for challenge in [
        String::new(),
        "Proxy-Authenticate: Basic\r\n".to_owned(),
        format!("Proxy-Authenticate: Basic realm=\"{huge}\"\r\n"),
        format!("Proxy-Authenticate: Basic realm={huge}\r\n"),
        "Proxy-Authenticate: Basic realm=\"\r\n".to_owned(),
    ] {
        let sent = challenge.clone();
        let (port, peer) = proxy_peer(move |mut stream| {
            read_head(&mut stream);
            let challenge = sent;
            let answer = format!("HTTP/1.1 407 Proxy Authentication Required\r\n{challenge}Content-Length: 0\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes());
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        });
        let (status, message, _) = failure("http", port, Duration::from_secs(10));
        assert_eq!(status, WsStatus::ProxyAuth, "{}: {message}", &challenge[..challenge.len().min(60)]);
        assert!(message.contains("407"), "{message}");
        assert!(message.len() < 1024, "a message of {} bytes", message.len());
        peer.join().unwrap();
    }
}

/// A proxy that closes in the middle of its answer: WS_STATUS_PROXY at once.
#[test]
fn a_proxy_closing_mid_answer_is_a_proxy_error() {
    for partial in [&b""[..], b"HTTP/1.1 200 Conn", b"HTTP/1.1 200 OK\r\nX: y\r\n"] {
        let partial = partial.to_vec();
        let (port, peer) = proxy_peer(move |mut stream| {
            read_head(&mut stream);
            let _ = stream.write_all(&partial);
        });
        let (status, message, took) = failure("http", port, Duration::from_secs(10));
        assert_eq!(status, WsStatus::Proxy, "{message}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        peer.join().unwrap();
    }
}

/// The "proxy" is a WebSocket server (the test server): whatever it answers to CONNECT, the
/// error is the proxy's, naming it, and comes before the connect timeout.
#[test]
fn a_websocket_server_named_as_the_proxy_is_a_proxy_error() {
    let server = TestServer::start();
    let (status, message, took) = failure("http", server.port, Duration::from_secs(10));
    assert_eq!(status, WsStatus::Proxy, "{message}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

// ---- SOCKS5 ----------------------------------------------------------------------------------

/// A SOCKS5 proxy that reads the greeting, answers `method`, then (method 2) reads the
/// user/password and answers `auth`, then reads the request and answers `reply`; `then_close`.
fn socks_peer(method: Vec<u8>, auth: Option<Vec<u8>>, reply: Option<Vec<u8>>) -> (u16, JoinHandle<()>) {
    proxy_peer(move |mut stream| {
        let head = read_n(&mut stream, 2);
        read_n(&mut stream, usize::from(head[1]));
        if stream.write_all(&method).is_err() {
            return;
        }
        if let Some(auth) = auth {
            let v = read_n(&mut stream, 2);
            let user = read_n(&mut stream, usize::from(v[1]) + 1);
            read_n(&mut stream, usize::from(*user.last().unwrap()));
            if stream.write_all(&auth).is_err() {
                return;
            }
        }
        let Some(reply) = reply else { return };
        let request = read_n(&mut stream, 4);
        let rest = match request[3] {
            1 => 4 + 2,
            4 => 16 + 2,
            _ => usize::from(read_n(&mut stream, 1)[0]) + 2,
        };
        read_n(&mut stream, rest);
        let _ = stream.write_all(&reply);
        // Whatever the reply lacks never comes: the proxy is gone.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    })
}

#[test]
fn socks5_greeting_answers_that_break_the_protocol() {
    for (method, want) in [
        (vec![4, 0], WsStatus::Proxy),        // wrong version
        (vec![5, 1], WsStatus::Proxy),        // GSSAPI, not offered
        (vec![5, 0x80], WsStatus::Proxy),     // private method, not offered
        (vec![5, 0xff], WsStatus::ProxyAuth), // no acceptable method
        (vec![5], WsStatus::Proxy),           // truncated, then closed
        (vec![], WsStatus::Proxy),            // closed after the greeting
    ] {
        let (port, peer) = socks_peer(method.clone(), None, None);
        let (status, message, took) = failure("socks5", port, Duration::from_secs(10));
        assert_eq!(status, want, "method answer {method:?}: {message}");
        assert!(took < Duration::from_secs(2), "{method:?}: took {took:?}");
        peer.join().unwrap();
    }
}

#[test]
fn socks5_password_answers_that_refuse_or_break() {
    for (auth, want) in [
        (vec![1, 1], WsStatus::ProxyAuth),
        (vec![1, 0xff], WsStatus::ProxyAuth),
        (vec![1], WsStatus::Proxy),
        (vec![], WsStatus::Proxy),
    ] {
        let (port, peer) = socks_peer(vec![5, 2], Some(auth.clone()), None);
        let (status, message, _) = failure("socks5", port, Duration::from_secs(10));
        assert_eq!(status, want, "auth answer {auth:?}: {message}");
        peer.join().unwrap();
    }
}

/// README: reply codes 3 to 6 are WS_STATUS_CONNECT_FAILED; the proxy's own refusals (1, 2, 7,
/// 8 and unknown codes) WS_STATUS_PROXY; the message names the proxy and the reply.
#[test]
fn socks5_reply_codes_map_to_the_documented_statuses() {
    for code in [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0x7f, 0xff] {
        let reply = vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0];
        let (port, peer) = socks_peer(vec![5, 2], Some(vec![1, 0]), Some(reply));
        let (status, message, _) = failure("socks5", port, Duration::from_secs(10));
        let want = if (3..=6).contains(&code) { WsStatus::ConnectFailed } else { WsStatus::Proxy };
        assert_eq!(status, want, "reply {code}: {message}");
        assert!(message.contains(&format!("reply {code}")), "{message}");
        peer.join().unwrap();
    }
}

#[test]
fn socks5_replies_that_are_truncated_or_malformed() {
    for reply in [
        vec![5, 0, 0, 7, 1, 2, 3, 4, 0, 80], // unknown address type
        vec![4, 0, 0, 1, 0, 0, 0, 0, 0, 0],  // wrong version
        vec![5, 0, 0, 1, 127, 0],            // truncated address
        vec![5, 0, 0, 3, 200, b'a', b'b'],   // truncated name
        vec![5, 0],                          // truncated head
    ] {
        let (port, peer) = socks_peer(vec![5, 0], None, Some(reply.clone()));
        let (status, message, took) = failure("socks5", port, Duration::from_secs(10));
        assert_eq!(status, WsStatus::Proxy, "reply {reply:?}: {message}");
        assert!(took < Duration::from_secs(2), "{reply:?}: took {took:?}");
        peer.join().unwrap();
    }
}

/// A success reply whose bound address is a 255-byte name: read whole, then the tunnel works.
#[test]
fn socks5_success_with_a_255_byte_domain_opens_the_tunnel() {
    let server = TestServer::start();
    let server_port = server.port;
    let (port, _peer) = proxy_peer(move |mut stream| {
        let head = read_n(&mut stream, 2);
        read_n(&mut stream, usize::from(head[1]));
        stream.write_all(&[5, 0]).unwrap();
        let request = read_n(&mut stream, 4);
        assert_eq!(request[3], 3, "socks5h sends the name");
        let len = read_n(&mut stream, 1)[0];
        read_n(&mut stream, usize::from(len) + 2);
        let mut reply = vec![5, 0, 0, 3, 255];
        reply.extend(std::iter::repeat(b'x').take(255));
        reply.extend_from_slice(&[0x1f, 0x90]);
        stream.write_all(&reply).unwrap();
        splice(stream, server_port);
    });
    let url = server.url("/echo").replace("127.0.0.1", "localhost");
    let (event, took) = first_event(&url, &options(&format!("socks5h://127.0.0.1:{port}"), 10_000), DEADLINE);
    assert!(matches!(event, Some(Ev::Open(_))), "{event:?} after {took:?}");
}

/// A SOCKS5 proxy that never answers the greeting: the connect timeout, naming the proxy.
#[test]
fn a_socks5_proxy_that_never_answers_fails_at_the_connect_timeout_naming_the_proxy() {
    let (port, _peer) = proxy_peer(|mut stream| {
        read_n(&mut stream, 3);
        std::thread::sleep(Duration::from_secs(8));
    });
    let proxy = format!("socks5://alice:{PASSWORD}@127.0.0.1:{port}");
    let (event, took) = first_event("ws://127.0.0.1:9/", &options(&proxy, 600), Duration::from_secs(6));
    let Some(Ev::Error(_, status, message)) = event else { panic!("expected an error, got {event:?} after {took:?}") };
    assert!(took >= Duration::from_millis(550) && took < Duration::from_millis(2600), "failed after {took:?}");
    assert!(matches!(status, WsStatus::ConnectTimeout | WsStatus::Proxy), "{status:?}: {message}");
    assert!(!message.contains(PASSWORD), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}")),
        "a connect timeout spent waiting for the proxy does not name the proxy: {message}"
    );
}

/// An invalid proxy URL's error never echoes the password, whatever is wrong with the URL.
#[test]
fn invalid_proxy_urls_never_echo_the_password() {
    let options = Options::new();
    for bad in [
        format!("http://alice:{PASSWORD}@127.0.0.1:99999"),
        format!("http://alice:{PASSWORD}@127.0.0.1:0"),
        format!("http://alice:{PASSWORD}@bad host:1"),
        format!("ftp://alice:{PASSWORD}@p:1"),
        format!("http://alice:{PASSWORD}%FF@p:1"),
        format!("http://alice:{PASSWORD}@[::1:1"),
        format!("http://alice:{PASSWORD}@"),
        format!("socks5://alice:{PASSWORD}@p:1/x"),
    ] {
        assert_eq!(unsafe { ws_options_set_proxy(options.0, cstr(&bad).as_ptr()) }, WsStatus::InvalidArgument, "{bad}");
        let message = last_error();
        assert!(!message.is_empty() && !message.contains(PASSWORD), "{bad}: {message}");
    }
}

/// A 407 whose realm holds control characters (a terminal escape, a bell): whatever the
/// status, the message stays printable and names the proxy (checked by `failure`).
#[test]
fn a_407_with_control_characters_in_its_realm_gives_a_printable_message() {
    let (port, peer) = proxy_peer(|mut stream| {
        read_head(&mut stream);
        let answer = "HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm=\"\x1b[2J\x07evil\"\r\n\r\n";
        let _ = stream.write_all(answer.as_bytes());
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    let (status, message, _) = failure("http", port, Duration::from_secs(10));
    assert!(matches!(status, WsStatus::ProxyAuth | WsStatus::Proxy), "{status:?}: {message}");
    peer.join().unwrap();
}

/// A user name with CR LF in it (percent-encoded in the proxy URL): the CONNECT request gets no
/// extra header line, and the error message that names the proxy stays one printable line.
#[test]
fn a_user_name_with_cr_lf_injects_nothing() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (port, peer) = proxy_peer(move |mut stream| {
        tx.send(read_head(&mut stream)).unwrap();
        let _ = stream.write_all(b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm=\"r\"\r\n\r\n");
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    let proxy = format!("http://a%0D%0AX-Injected:%201:{PASSWORD}@127.0.0.1:{port}");
    let (event, _) = first_event("ws://127.0.0.1:9/", &options(&proxy, 3000), Duration::from_secs(10));
    let request = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(!request.to_ascii_lowercase().contains("x-injected"), "{request}");
    let Some(Ev::Error(_, status, message)) = event else { panic!("{event:?}") };
    assert_eq!(status, WsStatus::ProxyAuth, "{message}");
    assert!(!message.contains(PASSWORD), "{message}");
    assert!(!message.chars().any(char::is_control), "control characters in {message:?}");
    peer.join().unwrap();
}

/// socks5h with a host name too long for a SOCKS5 request (over 255 bytes, each label valid):
/// an error callback that names the proxy (README "Errors name the proxy"), with an error
/// callback status.
#[test]
fn a_name_too_long_for_socks5h_is_an_error_naming_the_proxy() {
    let (port, _peer) = proxy_peer(|mut stream| {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    let name = vec!["a".repeat(60); 5].join(".");
    let proxy = format!("socks5h://alice:{PASSWORD}@127.0.0.1:{port}");
    let (event, took) = first_event(&format!("ws://{name}/"), &options(&proxy, 3000), Duration::from_secs(10));
    let Some(Ev::Error(_, status, message)) = event else { panic!("{event:?} after {took:?}") };
    assert!(!message.contains(PASSWORD), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "the message does not name the proxy: {message}");
    assert_eq!(status, WsStatus::Proxy, "{message}");
}

/// RFC 9110 15.2: "A client MUST be able to parse one or more 1xx responses received prior to
/// a final response". A proxy that sends 100 Continue before its 200 opens the tunnel.
#[test]
fn a_100_continue_before_the_200_opens_the_tunnel() {
    let server = TestServer::start();
    let server_port = server.port;
    let (port, _peer) = proxy_peer(move |mut stream| {
        read_head(&mut stream);
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
        splice(stream, server_port);
    });
    let (event, took) =
        first_event(&server.url("/echo"), &options(&format!("http://127.0.0.1:{port}"), 10_000), DEADLINE);
    assert!(matches!(event, Some(Ev::Open(_))), "{event:?} after {took:?}");
}

/// While the proxy keeps the client waiting (connect timeout 30 s): ws_close ends the
/// connection at once (close 1006, as before an open), and ws_client_free returns promptly.
#[test]
fn close_and_free_do_not_wait_for_a_silent_proxy() {
    let (port, _peer) = proxy_peer(|mut stream| {
        read_head(&mut stream);
        std::thread::sleep(Duration::from_secs(15));
    });
    let proxy = format!("http://127.0.0.1:{port}");
    let opts = options(&proxy, 30_000);
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with("ws://127.0.0.1:9/", opts.0);
    watch(conn, &rec);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    assert!(final_within(&client, &rec, conn, Duration::from_secs(3)).is_some(), "{:?}", rec.of(conn));
    assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    assert!(matches!(rec.of(conn).last(), Some(Ev::Close(_, 1006, _))), "{:?}", rec.of(conn));

    let (port2, _peer2) = proxy_peer(|mut stream| {
        read_head(&mut stream);
        std::thread::sleep(Duration::from_secs(15));
    });
    let opts = options(&format!("http://127.0.0.1:{port2}"), 30_000);
    let other = Client::new();
    let rec = Recorder::default();
    let conn = other.connect_with("ws://127.0.0.1:9/", opts.0);
    watch(conn, &rec);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    drop(other);
    assert!(started.elapsed() < Duration::from_secs(2), "ws_client_free took {:?}", started.elapsed());
}

/// README: an internationalised name's ASCII form "is what is resolved": through socks5h the
/// proxy resolves it, so the request carries the ASCII form; through HTTP CONNECT too.
#[test]
fn an_internationalised_name_reaches_the_proxy_in_its_ascii_form() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (port, peer) = proxy_peer(move |mut stream| {
        let head = read_n(&mut stream, 2);
        read_n(&mut stream, usize::from(head[1]));
        stream.write_all(&[5, 0]).unwrap();
        let request = read_n(&mut stream, 4);
        let len = read_n(&mut stream, 1)[0];
        let name = read_n(&mut stream, usize::from(len));
        read_n(&mut stream, 2);
        tx.send((request[3], name)).unwrap();
        let _ = stream.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]);
    });
    let (event, _) =
        first_event("ws://B\u{fc}cher.example/", &options(&format!("socks5h://127.0.0.1:{port}"), 5000), DEADLINE);
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::ConnectFailed, _))), "{event:?}");
    let (kind, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((kind, String::from_utf8_lossy(&name).into_owned()), (3, "xn--bcher-kva.example".to_owned()));
    peer.join().unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let (port, peer) = proxy_peer(move |mut stream| {
        tx.send(read_head(&mut stream)).unwrap();
        let _ = stream.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
    });
    let (event, _) =
        first_event("ws://B\u{fc}cher.example/", &options(&format!("http://127.0.0.1:{port}"), 5000), DEADLINE);
    assert!(matches!(event, Some(Ev::Error(_, WsStatus::Proxy, _))), "{event:?}");
    let head = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(head.starts_with("CONNECT xn--bcher-kva.example:80 HTTP/1.1\r\n"), "{head}");
    peer.join().unwrap();
}

/// A refusal with a 10 KB reason phrase: the message stays short, as the upgrade's own
/// rejections are (their reason phrase is cut at 80 characters).
#[test]
fn a_refusal_with_a_huge_reason_phrase_gives_a_bounded_message() {
    let (port, peer) = proxy_peer(|mut stream| {
        read_head(&mut stream);
        let answer = format!("HTTP/1.1 403 {}\r\n\r\n", "Forbidden ".repeat(1000));
        let _ = stream.write_all(answer.as_bytes());
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    let (status, message, _) = failure("http", port, Duration::from_secs(10));
    assert_eq!(status, WsStatus::Proxy, "{}", &message[..200]);
    assert!(message.len() < 1024, "a message of {} bytes", message.len());
    peer.join().unwrap();
}

/// Bytes behind a SOCKS5 success reply, before the client said anything to the server, are
/// the proxy's (as the HTTP CONNECT path reasons for bytes behind its 200): WS_STATUS_PROXY,
/// naming the proxy, not a handshake rejection blamed on the server.
#[test]
fn bytes_behind_a_socks5_success_reply_are_the_proxys_fault() {
    let mut reply = vec![5, 0, 0, 1, 127, 0, 0, 1, 0, 80];
    reply.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
    let (port, peer) = socks_peer(vec![5, 0], None, Some(reply));
    let (status, message, _) = failure("socks5", port, Duration::from_secs(10));
    assert_eq!(status, WsStatus::Proxy, "{message}");
    peer.join().unwrap();
}
