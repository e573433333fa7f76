//! The proxy named by the environment, end to end, against real proxies (the rules themselves
//! are unit tests in src/io/proxy/choice.rs). One test in its own binary: it changes the
//! process's environment, which no other test here may see.

mod common;

use common::proxies::{microsocks, tinyproxy, MICROSOCKS_FROM, TINYPROXY_FROM};
use common::server::TestServer;
use common::*;

const VARIABLES: [&str; 9] = [
    "ws_proxy",
    "wss_proxy",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

fn environment(pairs: &[(&str, &str)]) {
    for name in VARIABLES {
        std::env::remove_var(name);
    }
    for (name, value) in pairs {
        std::env::set_var(name, value);
    }
}

/// Connects, waits for the open and returns where the server saw the connection come from.
fn came_from(server: &TestServer, url: &str, options: Option<&Options>) -> String {
    let client = Client::new();
    let rec = Recorder::default();
    let before = server.log.lines().iter().filter(|l| l.starts_with("accepted from")).count();
    let conn = match options {
        Some(options) => client.connect_with(url, options.0),
        None => client.connect(url),
    };
    watch(conn, &rec);
    client.run_until("the open", || !rec.of(conn).is_empty());
    assert_eq!(rec.of(conn).first(), Some(&Ev::Open(conn)), "{url}: {:?}", rec.of(conn));
    server.log.wait_for_count(before + 1, |l| l.starts_with("accepted from"));
    let accepted: Vec<String> = server.log.lines().into_iter().filter(|l| l.starts_with("accepted from")).collect();
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
    accepted[before].trim_start_matches("accepted from ").to_owned()
}

#[test]
fn the_environment_chooses_the_proxy_as_curl_does() {
    let server = TestServer::start();
    let http = tinyproxy(None, &[]);
    let socks = microsocks(None);
    let http_url = format!("http://127.0.0.1:{}", http.port);
    let socks_url = format!("socks5h://127.0.0.1:{}", socks.port);
    let ws = server.url("/echo");
    let wss = server.wss_url("localhost", "/echo");
    let trusting = Options::new();
    let ca = cstr(server.ca_pem.to_str().unwrap());
    assert_eq!(unsafe { ws_options_add_ca_file(trusting.0, ca.as_ptr()) }, WsStatus::Ok);

    environment(&[]);
    assert_eq!(came_from(&server, &ws, None), "127.0.0.1", "no variable: direct");

    environment(&[("http_proxy", &http_url)]);
    assert_eq!(came_from(&server, &ws, None), TINYPROXY_FROM, "http_proxy for ws");
    assert_eq!(came_from(&server, &wss, Some(&trusting)), "127.0.0.1", "http_proxy is not for wss");

    environment(&[("https_proxy", &socks_url), ("http_proxy", &http_url)]);
    assert_eq!(came_from(&server, &wss, Some(&trusting)), MICROSOCKS_FROM, "https_proxy for wss");

    environment(&[("ws_proxy", &socks_url), ("http_proxy", &http_url)]);
    assert_eq!(came_from(&server, &ws, None), MICROSOCKS_FROM, "ws_proxy before http_proxy");

    environment(&[("ALL_PROXY", &http_url)]);
    assert_eq!(came_from(&server, &wss, Some(&trusting)), TINYPROXY_FROM, "all_proxy, uppercase");

    environment(&[("all_proxy", &http_url), ("no_proxy", "localhost,127.0.0.0/8")]);
    assert_eq!(came_from(&server, &ws, None), "127.0.0.1", "no_proxy range");
    assert_eq!(came_from(&server, &wss, Some(&trusting)), "127.0.0.1", "no_proxy name");

    environment(&[("all_proxy", &http_url), ("no_proxy", &format!("127.0.0.1:{}", server.tls_port))]);
    assert_eq!(came_from(&server, &ws, None), TINYPROXY_FROM, "no_proxy for another port");

    environment(&[("all_proxy", &http_url)]);
    let direct = Options::new();
    assert_eq!(unsafe { ws_options_set_proxy(direct.0, cstr("").as_ptr()) }, WsStatus::Ok);
    assert_eq!(came_from(&server, &ws, Some(&direct)), "127.0.0.1", "an empty proxy option means direct");

    environment(&[("ws_proxy", "ftp://nowhere")]);
    let client = Client::new();
    let mut conn = 0;
    let status = unsafe { ws_connect(client.0, cstr(&ws).as_ptr(), &mut conn) };
    assert_eq!((status, conn), (WsStatus::InvalidArgument, 0));
    assert!(last_error().contains("ws_proxy"), "names the variable: {}", last_error());
    environment(&[]);
}
