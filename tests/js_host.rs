//! The JS host: wsjs runs scripts that use the documented objects against local servers, our
//! Rust server and Python's `websockets` (an independent implementation), and its output is
//! checked line by line.

mod common;

use common::skip_under_asan;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::peers::Peer;
use common::server::TestServer;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn wsjs() -> PathBuf {
    let path = root().join("examples-c/build/wsjs");
    assert!(
        path.exists(),
        "{} is missing: run `make test`, which builds it first",
        path.display()
    );
    path
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs tests/js/NAME.js with its placeholders filled in: %WS% %WSS% (the Rust test server),
/// %CLOSED% (a port nobody listens on) and %URL% (the server given).
fn run(name: &str, server: &TestServer, url: &str, envs: &[(&str, &Path)]) -> Run {
    let source =
        std::fs::read_to_string(root().join("tests/js").join(format!("{name}.js"))).unwrap();
    let script = source
        .replace("%WSS%", &format!("wss://localhost:{}", server.tls_port))
        .replace("%WS%", &format!("ws://127.0.0.1:{}", server.port))
        .replace(
            "%CLOSED%",
            &format!("ws://127.0.0.1:{}", common::closed_port()),
        )
        .replace("%URL%", url);
    let path = server.dir.join(format!("{name}.js"));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let mut command = Command::new(wsjs());
    command
        .arg(&path)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a script that must succeed and print exactly `expected`.
fn expect(name: &str, server: &TestServer, url: &str, expected: &[&str]) {
    let out = run(name, server, url, &[]);
    assert_eq!(
        out.code,
        Some(0),
        "{name}.js failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        expected,
        "{name}.js; stderr: {}",
        out.stderr
    );
}

#[test]
fn seed_snippets_as_written() {
    if skip_under_asan(
        "seed_snippets_as_written",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let out = run("seed", &server, "", &[("SSL_CERT_FILE", &server.ca_pem)]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "connection is up\nconnection closed\n");
    server.log.wait_for(|l| l == "open /PBX0/APPS/websocket");
}

#[test]
fn send_before_open_is_delivered_after_open_in_order() {
    if skip_under_asan(
        "send_before_open_is_delivered_after_open_in_order",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect(
        "send_before_open",
        &server,
        "",
        &["open, sent before it: true", "echoes: m0,m1,m2,m3,m4"],
    );
}

#[test]
fn chaining_returns_the_same_object() {
    if skip_under_asan(
        "chaining_returns_the_same_object",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect(
        "chaining",
        &server,
        "",
        &[
            "every method returns the object: true",
            "second onopen",
            "echo chained true",
            "closed",
        ],
    );
}

#[test]
fn flow_control_with_deferred_complete_against_both_servers() {
    if skip_under_asan(
        "flow_control_with_deferred_complete_against_both_servers",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let expected = ["closed 1000 done after 200 messages, 0 violations"];
    expect(
        "flow_deferred",
        &server,
        &format!("ws://127.0.0.1:{}", server.port),
        &expected,
    );
    let peer = Peer::start_python();
    expect("flow_deferred", &server, &peer.url(), &expected);
}

#[test]
fn server_close_tcp_drop_and_403() {
    if skip_under_asan(
        "server_close_tcp_drop_and_403",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let out = run("endings", &server, "", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "close onclose 4000 server%20done",
            "drop message bye",
            "drop onerror connection closed by the peer without a close handshake",
            "reject onerror handshake rejected: HTTP 403 Forbidden",
        ]
    );
}

#[test]
fn refused_connection_then_the_object_is_gone() {
    if skip_under_asan(
        "refused_connection_then_the_object_is_gone",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let out = run("refused", &server, "", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("onerror: connection refused by 127.0.0.1:"),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1..],
        [
            "send threw: the connection is gone",
            "onopen threw: the connection is gone"
        ]
    );
}

#[test]
fn wss_trusted_through_ssl_cert_file_and_untrusted_without() {
    if skip_under_asan(
        "wss_trusted_through_ssl_cert_file_and_untrusted_without",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let trusted = run("wss", &server, "", &[("SSL_CERT_FILE", &server.ca_pem)]);
    assert_eq!(trusted.code, Some(0), "{}", trusted.stderr);
    assert_eq!(
        trusted.stdout,
        "secure connection is up\necho: over TLS\nclosed 1000\n"
    );
    let untrusted = run("wss", &server, "", &[]);
    assert_eq!(untrusted.code, Some(0), "{}", untrusted.stderr);
    assert_eq!(
        untrusted.stdout,
        "error: TLS: certificate not trusted (unknown issuer)\n"
    );
}

#[test]
fn unicode_round_trip_with_an_independent_server() {
    if skip_under_asan(
        "unicode_round_trip_with_an_independent_server",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let peer = Peer::start_python();
    expect(
        "unicode",
        &server,
        &peer.url(),
        &["unicode round trips: 8 of 8 emoji length 8"],
    );
    // And with our own server.
    expect(
        "unicode",
        &server,
        &format!("ws://127.0.0.1:{}", server.port),
        &["unicode round trips: 8 of 8 emoji length 8"],
    );
}

#[test]
fn one_mib_messages() {
    if skip_under_asan(
        "one_mib_messages",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect(
        "big",
        &server,
        "",
        &["text 1048576 true", "binary 1048576 true true", "closed"],
    );
}

#[test]
fn two_hundred_connections_from_one_script() {
    if skip_under_asan(
        "two_hundred_connections_from_one_script",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect("many", &server, "", &["all closed: 200 echoed: 200"]);
}

#[test]
fn close_inside_onopen() {
    if skip_under_asan(
        "close_inside_onopen",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect(
        "close_in_onopen",
        &server,
        "",
        &["open", "closed 4001 closing in onopen"],
    );
    server.log.wait_for(|l| l == "close 4001 closing in onopen");
}

#[test]
fn reconnect_from_inside_onclose() {
    if skip_under_asan(
        "reconnect_from_inside_onclose",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect(
        "reconnect",
        &server,
        "",
        &[
            "echo round 0",
            "echo round 1",
            "echo round 2",
            "done after 3 connections",
        ],
    );
}

#[test]
fn binary_echo_as_uint8array() {
    if skip_under_asan(
        "binary_echo_as_uint8array",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let expected = ["true 6 0,1,2,253,254,255", "true 3 9,8,7", "closed"];
    expect(
        "binary",
        &server,
        &format!("ws://127.0.0.1:{}", server.port),
        &expected,
    );
    let peer = Peer::start_python();
    expect("binary", &server, &peer.url(), &expected);
}

#[test]
fn invalid_uris_throw_with_the_reason() {
    if skip_under_asan(
        "invalid_uris_throw_with_the_reason",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    expect(
        "errors",
        &server,
        "",
        &[
            "true invalid URI \"http://example.com/\": the scheme is http:, not ws: or wss:",
            "true invalid URI \"relative/path\": it is not absolute (ws://host/... or wss://host/...)",
            "true invalid URI \"\": it is empty",
            "true invalid URI \"ws://host:99999/\": the port must be a number from 1 to 65535",
        ],
    );
}

#[test]
fn uncaught_exceptions_print_the_stack_and_exit_1() {
    if skip_under_asan(
        "uncaught_exceptions_print_the_stack_and_exit_1",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let top = run("uncaught_top", &server, "", &[]);
    assert_eq!(top.code, Some(1));
    assert_eq!(top.stdout, "before\n");
    assert!(
        top.stderr.contains("Error: top-level failure") && top.stderr.contains("uncaught_top.js:2"),
        "{}",
        top.stderr
    );
    let callback = run("uncaught_callback", &server, "", &[]);
    assert_eq!(callback.code, Some(1));
    assert_eq!(callback.stdout, "open\n");
    assert!(
        callback.stderr.contains("ReferenceError")
            && callback.stderr.contains("uncaught_callback.js:2"),
        "{}",
        callback.stderr
    );
}

#[test]
fn ten_thousand_connections_do_not_grow_memory() {
    if skip_under_asan(
        "ten_thousand_connections_do_not_grow_memory",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let out = run("memory", &server, "", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    eprintln!("{}", out.stdout.trim());
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(fields[..2], ["connections:", "10000"], "{}", out.stdout);
    let growth: f64 = fields.last().unwrap().parse().unwrap();
    // Each connection allocates a JS object, closures, handshake buffers and the library's
    // state: were any of it kept, 9,000 connections would add megabytes (128 KiB is 14 bytes a
    // connection). What stays is caches that do not grow with the count.
    assert!(
        growth < (128 << 10) as f64,
        "the heap grew by {growth} bytes over 9,000 connections"
    );
}

/// `make demo`'s script, through examples-c/demo.sh, over wss with the throwaway CA.
#[test]
fn the_demo_runs() {
    if skip_under_asan(
        "the_demo_runs",
        "it runs wsjs, which does not use the ASan build",
    ) {
        return;
    }
    let output = Command::new(root().join("examples-c/demo.sh"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout
            .contains("presence of 4 users: bob=available, carol=busy, dave=away, erin=available"),
        "{stdout}"
    );
    assert!(
        stdout.contains("connection closed: 1000 bye alice\n[demo] wsjs exited with 0"),
        "{stdout}"
    );
}
