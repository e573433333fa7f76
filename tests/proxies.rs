//! Proxies, against real ones started here on loopback: tinyproxy (HTTP CONNECT) and microsocks
//! (SOCKS5), with and without credentials, for ws and wss (TLS to the server inside the
//! tunnel). Each proxy binds its outgoing connections to an address of its own (127.0.0.2,
//! 127.0.0.3), so the server's log proves the connection came through it. The environment
//! rules are unit tests in src/io/proxy/choice.rs, and one end-to-end test in proxy_env.rs.

mod common;

use std::path::Path;

use common::proxies::{microsocks, tinyproxy};
use common::server::TestServer;
use common::*;

fn options_with(proxy: &str, ca: Option<&Path>) -> Options {
    let options = Options::new();
    assert_eq!(unsafe { ws_options_set_proxy(options.0, cstr(proxy).as_ptr()) }, WsStatus::Ok, "{}", last_error());
    if let Some(ca) = ca {
        let path = cstr(ca.to_str().unwrap());
        assert_eq!(unsafe { ws_options_add_ca_file(options.0, path.as_ptr()) }, WsStatus::Ok);
    }
    options
}

/// Connects through `proxy`, sends one message, expects it echoed; the server's log must show
/// the connection arriving from `via` (the proxy's outgoing address).
fn echo_through(server: &TestServer, url: &str, options: &Options, via: &str) {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    client.run_until("the open through the proxy", || !rec.of(conn).is_empty());
    assert_eq!(rec.of(conn).first(), Some(&Ev::Open(conn)), "{url}: {:?}", rec.of(conn));
    assert_eq!(send_text(conn, "through"), WsStatus::Ok);
    client.run_until("the echo through the proxy", || rec.texts(conn) == ["through"] || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), ["through"], "{url}: {:?}", rec.of(conn));
    let from = format!("accepted from {via}");
    server.log.wait_for(|l| l == from);
    assert_eq!(close(conn, 1000, "done"), WsStatus::Ok);
    client.run_until_final(&rec, conn);
}

/// Connects through the proxy and returns the final error (status and message).
fn failure_through(url: &str, options: &Options) -> (WsStatus, String) {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    match rec.of(conn).last() {
        Some(Ev::Error(_, status, message)) => (*status, message.clone()),
        other => panic!("{url}: expected an error, got {other:?}"),
    }
}

/// The echo path sends back what it gets.
fn echo_url(server: &TestServer, tls: bool) -> String {
    if tls {
        server.wss_url("localhost", "/echo")
    } else {
        server.url("/echo")
    }
}

#[test]
fn http_connect_carries_ws_and_wss() {
    let server = TestServer::start();
    let proxy = tinyproxy(None, &[]);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    echo_through(&server, &echo_url(&server, false), &options_with(&url, None), "127.0.0.3");
    echo_through(&server, &echo_url(&server, true), &options_with(&url, Some(&server.ca_pem)), "127.0.0.3");
    let log = std::fs::read_to_string(proxy.dir.join("log")).unwrap();
    assert!(log.contains(&format!("CONNECT 127.0.0.1:{}", server.port)), "tinyproxy's log: {log}");
    assert!(log.contains(&format!("CONNECT localhost:{}", server.tls_port)), "tinyproxy's log: {log}");
}

#[test]
fn http_connect_with_basic_credentials() {
    let server = TestServer::start();
    let proxy = tinyproxy(Some(("alice", "s3cret")), &[]);
    let good = format!("http://alice:s3cret@127.0.0.1:{}", proxy.port);
    echo_through(&server, &echo_url(&server, true), &options_with(&good, Some(&server.ca_pem)), "127.0.0.3");

    let none = format!("http://127.0.0.1:{}", proxy.port);
    let (status, message) = failure_through(&echo_url(&server, false), &options_with(&none, None));
    assert_eq!(status, WsStatus::ProxyAuth, "{message}");
    assert!(message.contains("407") && message.contains("realm \"Tinyproxy\""), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{}", proxy.port)), "names the proxy: {message}");

    let wrong = format!("http://alice:wrong@127.0.0.1:{}", proxy.port);
    let (status, message) = failure_through(&echo_url(&server, false), &options_with(&wrong, None));
    assert_eq!(status, WsStatus::ProxyAuth, "{message}");
    assert!(message.contains("refused the credentials") && !message.contains("wrong"), "{message}");
}

#[test]
fn http_connect_refusals_name_the_proxy_and_what_it_said() {
    let server = TestServer::start();
    // Tunnels to port 443 only: the server's port is refused with 403.
    let proxy = tinyproxy(None, &[443]);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let (status, message) = failure_through(&echo_url(&server, false), &options_with(&url, None));
    assert_eq!(status, WsStatus::Proxy, "{message}");
    assert!(message.contains("403") && message.contains(&format!("127.0.0.1:{}", server.port)), "{message}");

    // A server that is not there: tinyproxy answers 500 Unable to connect.
    let open = tinyproxy(None, &[]);
    let url = format!("http://127.0.0.1:{}", open.port);
    let (status, message) = failure_through(&format!("ws://127.0.0.1:{}/", closed_port()), &options_with(&url, None));
    assert_eq!(status, WsStatus::Proxy, "{message}");
    assert!(message.contains("500"), "{message}");
}

#[test]
fn socks5_carries_ws_and_wss_with_local_and_remote_resolution() {
    let server = TestServer::start();
    let proxy = microsocks(None);
    let local = format!("socks5://127.0.0.1:{}", proxy.port);
    let remote = format!("socks5h://127.0.0.1:{}", proxy.port);
    echo_through(&server, &echo_url(&server, false), &options_with(&local, None), "127.0.0.2");
    echo_through(&server, &echo_url(&server, true), &options_with(&local, Some(&server.ca_pem)), "127.0.0.2");
    echo_through(&server, &echo_url(&server, true), &options_with(&remote, Some(&server.ca_pem)), "127.0.0.2");
    echo_through(
        &server,
        &server.url("/echo").replace("127.0.0.1", "localhost"),
        &options_with(&remote, None),
        "127.0.0.2",
    );
}

#[test]
fn socks5_with_a_user_name_and_password() {
    let server = TestServer::start();
    let proxy = microsocks(Some(("bob", "p@ss:word")));
    let good = format!("socks5h://bob:p%40ss%3Aword@127.0.0.1:{}", proxy.port);
    echo_through(&server, &echo_url(&server, true), &options_with(&good, Some(&server.ca_pem)), "127.0.0.2");

    let none = format!("socks5://127.0.0.1:{}", proxy.port);
    let (status, message) = failure_through(&echo_url(&server, false), &options_with(&none, None));
    assert_eq!(status, WsStatus::ProxyAuth, "{message}");
    assert!(message.contains("requires a user name and password"), "{message}");

    let wrong = format!("socks5://bob:nope@127.0.0.1:{}", proxy.port);
    let (status, message) = failure_through(&echo_url(&server, false), &options_with(&wrong, None));
    assert_eq!(status, WsStatus::ProxyAuth, "{message}");
    assert!(message.contains("refused the user name and password"), "{message}");
}

#[test]
fn a_socks5_proxy_that_cannot_reach_the_server_says_so_with_its_reply_code() {
    let proxy = microsocks(None);
    let url = format!("socks5://127.0.0.1:{}", proxy.port);
    let (status, message) = failure_through(&format!("ws://127.0.0.1:{}/", closed_port()), &options_with(&url, None));
    assert_eq!(status, WsStatus::ConnectFailed, "{message}");
    assert!(message.contains("SOCKS5 reply") && message.contains(&format!("127.0.0.1:{}", proxy.port)), "{message}");
}

#[test]
fn a_proxy_that_is_not_there_is_named() {
    let port = closed_port();
    for scheme in ["http", "socks5"] {
        let url = format!("{scheme}://127.0.0.1:{port}");
        let (status, message) = failure_through("ws://127.0.0.1:9/", &options_with(&url, None));
        assert_eq!(status, WsStatus::Proxy, "{message}");
        assert!(message.contains(&format!("{scheme}://127.0.0.1:{port}")) && message.contains("refused"), "{message}");
    }
}

#[test]
fn invalid_proxy_urls_are_refused_at_the_option_call() {
    let options = Options::new();
    for bad in ["ftp://p:1", "http://p:0", "http://p/path", "socks4://p"] {
        assert_eq!(unsafe { ws_options_set_proxy(options.0, cstr(bad).as_ptr()) }, WsStatus::InvalidArgument, "{bad}");
        assert!(!last_error().is_empty());
    }
    assert_eq!(unsafe { ws_options_set_proxy(options.0, std::ptr::null()) }, WsStatus::NullArgument);
    assert_eq!(unsafe { ws_options_set_proxy(std::ptr::null_mut(), cstr("").as_ptr()) }, WsStatus::NullArgument);
}
