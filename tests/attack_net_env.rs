//! Attacks on the proxy environment rules (README "Proxies": curl's conventions) at their
//! edges, end to end against tinyproxy: NO_PROXY with spaces, tabs, ports, IPv6 brackets, `*`,
//! trailing dots and case; empty variables; the CGI rule; redirects that cross the no_proxy
//! boundary; the environment as read by ws_connect. One test in its own binary: it changes the
//! process's environment.

mod common;

use common::proxies::{tinyproxy, TINYPROXY_FROM};
use common::server::TestServer;
use common::*;

const VARIABLES: [&str; 13] = [
    "ws_proxy",
    "wss_proxy",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "WS_PROXY",
    "WSS_PROXY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "REQUEST_METHOD",
];

fn environment(pairs: &[(&str, &str)]) {
    for name in VARIABLES {
        std::env::remove_var(name);
    }
    for (name, value) in pairs {
        std::env::set_var(name, value);
    }
}

/// Connects (following up to 3 redirects), waits for the first text (the /host path sends one)
/// and returns where the server saw each new connection come from.
fn path_of(server: &TestServer, url: &str, options: &Options, after_connect: impl FnOnce()) -> Vec<String> {
    let accepted = || -> Vec<String> {
        server.log.lines().into_iter().filter_map(|l| l.strip_prefix("accepted from ").map(str::to_owned)).collect()
    };
    let before = accepted().len();
    let opened = server.log.lines().iter().filter(|l| l.starts_with("open ")).count();
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    after_connect();
    watch(conn, &rec);
    client.run_until("the open", || !rec.of(conn).is_empty());
    assert_eq!(rec.of(conn).first(), Some(&Ev::Open(conn)), "{url}: {:?}", rec.of(conn));
    server.log.wait_for_count(opened + 1, |l| l.starts_with("open "));
    close(conn, 1000, "");
    client.run_until_final(&rec, conn);
    accepted()[before..].to_vec()
}

fn came_from(server: &TestServer, url: &str) -> String {
    let hops = path_of(server, url, &following(0), || {});
    assert_eq!(hops.len(), 1, "{url}: {hops:?}");
    hops[0].clone()
}

fn following(max: u32) -> Options {
    let options = no_keepalive();
    set(unsafe { ws_options_set_follow_redirects(options.0, max) });
    options
}

#[test]
fn the_environment_rules_hold_at_their_edges() {
    let server = TestServer::start();
    let proxy = tinyproxy(None, &[]);
    let tp = format!("http://127.0.0.1:{}", proxy.port);
    let port = server.port;
    let by_ip = server.url("/host");
    let by_name = by_ip.replace("127.0.0.1", "localhost");
    let mut failures = Vec::new();
    let mut check = |what: &str, got: String, want: &str| {
        if got != want {
            failures.push(format!("{what}: came from {got}, expected {want}"));
        }
    };

    environment(&[("all_proxy", &tp)]);
    check("all_proxy alone", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("all_proxy", &tp), ("NO_PROXY", "  example.org ,\t127.0.0.1  ")]);
    check("NO_PROXY with spaces and a tab", came_from(&server, &by_ip), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", "example.org 127.0.0.1")]);
    check("no_proxy separated by a space", came_from(&server, &by_ip), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", &format!("localhost:{port}"))]);
    check("no_proxy name:port, same port", came_from(&server, &by_name), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", &format!("localhost:{}", port ^ 1))]);
    check("no_proxy name:port, another port", came_from(&server, &by_name), TINYPROXY_FROM);

    environment(&[("all_proxy", &tp), ("no_proxy", "localhost.")]);
    check("no_proxy entry with a trailing dot", came_from(&server, &by_name), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", "LOCALHOST")]);
    check("no_proxy entry in upper case", came_from(&server, &by_name), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", "calhost,host")]);
    check("no_proxy suffix not on a label boundary", came_from(&server, &by_name), TINYPROXY_FROM);

    environment(&[("all_proxy", &tp), ("no_proxy", "*")]);
    check("no_proxy *", came_from(&server, &by_ip), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", "example.org,*")]);
    check("no_proxy with * in a list", came_from(&server, &by_ip), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", "127.0.0.1/33")]);
    check("no_proxy with an invalid range", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("all_proxy", &tp), ("no_proxy", "localhost")]);
    check("a name does not match an address", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("all_proxy", &tp), ("no_proxy", ""), ("NO_PROXY", "127.0.0.1")]);
    check("an empty no_proxy counts as unset", came_from(&server, &by_ip), "127.0.0.1");

    environment(&[("all_proxy", &tp), ("no_proxy", "example.org"), ("NO_PROXY", "127.0.0.1")]);
    check("lowercase no_proxy wins", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("WS_PROXY", &tp)]);
    check("WS_PROXY in upper case", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("ws_proxy", ""), ("WS_PROXY", &tp)]);
    check("an empty ws_proxy counts as unset", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("ws_proxy", "   "), ("all_proxy", &tp)]);
    check("a blank ws_proxy counts as unset", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("REQUEST_METHOD", "GET"), ("HTTP_PROXY", &tp)]);
    check("CGI: HTTP_PROXY ignored", came_from(&server, &by_ip), "127.0.0.1");

    environment(&[("REQUEST_METHOD", "GET"), ("http_proxy", &tp)]);
    check("CGI: http_proxy still used", came_from(&server, &by_ip), TINYPROXY_FROM);

    environment(&[("REQUEST_METHOD", "GET"), ("ALL_PROXY", &tp)]);
    check("CGI: ALL_PROXY still used", came_from(&server, &by_ip), TINYPROXY_FROM);

    if let Some(v6) = server.ipv6_port {
        let url = format!("ws://[::1]:{v6}/host");
        environment(&[("all_proxy", &tp), ("no_proxy", &format!("[::1]:{v6}"))]);
        check("no_proxy [::1]:port", came_from(&server, &url), "::1");
        environment(&[("all_proxy", &tp), ("no_proxy", "::1")]);
        check("no_proxy ::1", came_from(&server, &url), "::1");
        environment(&[("all_proxy", &tp), ("no_proxy", "[::1]")]);
        check("no_proxy [::1]", came_from(&server, &url), "::1");
        environment(&[("all_proxy", &tp), ("no_proxy", "::/0")]);
        check("no_proxy ::/0", came_from(&server, &url), "::1");
    } else {
        skipped("the_environment_rules_hold_at_their_edges (IPv6 part)", "no IPv6 loopback here");
    }

    // A redirect that crosses the no_proxy boundary: each hop chooses again.
    environment(&[("all_proxy", &tp), ("no_proxy", "127.0.0.1")]);
    let url = format!("ws://localhost:{port}/redirect?to=ws://127.0.0.1:{port}/host");
    let hops = path_of(&server, &url, &following(1), || {});
    if hops != [TINYPROXY_FROM, "127.0.0.1"] {
        failures.push(format!("redirect from a proxied to a direct host: {hops:?}"));
    }
    environment(&[("all_proxy", &tp), ("no_proxy", "localhost")]);
    let url = format!("ws://127.0.0.1:{port}/redirect?to=ws://localhost:{port}/host");
    let hops = path_of(&server, &url, &following(1), || {});
    if hops != [TINYPROXY_FROM, "127.0.0.1"] {
        failures.push(format!("redirect from a proxied to a direct host: {hops:?}"));
    }
    // The environment is the one ws_connect read: changed right after, the next hop does not
    // see it.
    environment(&[("all_proxy", &tp)]);
    let url = format!("ws://localhost:{port}/redirect?to=ws://127.0.0.1:{port}/host");
    let hops = path_of(&server, &url, &following(1), || std::env::set_var("no_proxy", "*"));
    if hops != [TINYPROXY_FROM, TINYPROXY_FROM] {
        failures.push(format!("the environment changed after ws_connect was seen by a redirect: {hops:?}"));
    }

    // An invalid proxy URL in the environment: named by its variable, password not shown.
    environment(&[("ws_proxy", "http://u:hunter2@127.0.0.1:99999")]);
    let client = Client::new();
    let mut conn = 0;
    let status = unsafe { ws_connect(client.0, cstr(&by_ip).as_ptr(), &mut conn) };
    let message = last_error();
    if status != WsStatus::InvalidArgument || !message.contains("ws_proxy") || message.contains("hunter2") {
        failures.push(format!("invalid ws_proxy: {status:?}: {message}"));
    }

    // A proxy variable that is not UTF-8 is not a valid proxy URL: ws_connect must refuse, not
    // connect directly as if no proxy were set.
    environment(&[]);
    {
        use std::os::unix::ffi::OsStrExt;
        let mut value = format!("http://127.0.0.1:{}", proxy.port).into_bytes();
        value.push(0xff);
        std::env::set_var("ws_proxy", std::ffi::OsStr::from_bytes(&value));
    }
    let client = Client::new();
    let mut conn = 0;
    let status = unsafe { ws_connect(client.0, cstr(&by_ip).as_ptr(), &mut conn) };
    let message = last_error();
    if status != WsStatus::InvalidArgument {
        let rec = Recorder::default();
        if status == WsStatus::Ok {
            watch(conn, &rec);
            client.run_until("the open or the end", || !rec.of(conn).is_empty());
            close(conn, 1000, "");
            client.run_until_final(&rec, conn);
        }
        failures.push(format!(
            "a ws_proxy that is not UTF-8: ws_connect answered {status:?} ({message}), then {:?}",
            rec.of(conn).first()
        ));
    }

    // An invalid proxy variable met only at a redirect's hop (the first host was in no_proxy):
    // the error names the variable, with an error-callback status (README: 20 and above).
    environment(&[("ws_proxy", "ftp://nowhere"), ("no_proxy", "localhost")]);
    let url = format!("ws://localhost:{port}/redirect?to=ws://127.0.0.1:{port}/host");
    let options = following(1);
    let mut conn = 0;
    let status = unsafe { ws_connect_with_options(client.0, cstr(&url).as_ptr(), options.0, &mut conn) };
    if status == WsStatus::Ok {
        let rec = Recorder::default();
        watch(conn, &rec);
        client.run_until_final(&rec, conn);
        match rec.of(conn).last() {
            Some(Ev::Error(_, status, message)) if (*status as u32) >= 20 && message.contains("ws_proxy") => {}
            other => failures.push(format!("an invalid ws_proxy met at a redirect: {other:?}")),
        }
    }
    drop(client);

    environment(&[]);
    assert!(failures.is_empty(), "{} rule(s) broken:\n{}", failures.len(), failures.join("\n"));
}
