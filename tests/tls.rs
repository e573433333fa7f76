//! wss: certificates and host names verified against a CA the test generates, trusted through
//! the options; failures named.

mod common;

use common::server::TestServer;
use common::*;

fn trusting(server: &TestServer) -> Options {
    let options = Options::new();
    let path = cstr(server.ca_pem.to_str().unwrap());
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, path.as_ptr()) }, WsStatus::Ok, "{}", last_error());
    options
}

fn only_event(client: &Client, rec: &Recorder, conn: WsConn) -> Ev {
    client.run_until_final(rec, conn);
    let events = rec.of(conn);
    assert_eq!(events.len(), 1, "{events:?}");
    events[0].clone()
}

#[test]
fn wss_echo_with_the_ca_from_the_options() {
    let server = TestServer::start();
    let client = Client::new();
    let options = trusting(&server);
    for host in ["localhost", "127.0.0.1"] {
        let rec = Recorder::default();
        let conn = client.connect_with(&server.wss_url(host, "/echo"), options.0);
        watch(conn, &rec);
        assert_eq!(send_text(conn, "secret"), WsStatus::Ok);
        client.run_until("the echo over TLS", || rec.texts(conn) == ["secret"]);
        assert_eq!(close(conn, 0, ""), WsStatus::Ok);
        client.run_until_final(&rec, conn);
        assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
    }
}

#[test]
fn untrusted_certificate_is_an_error() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    // No CA added: the system store does not know the test CA.
    let conn = client.connect(&server.wss_url("localhost", "/echo"));
    watch(conn, &rec);
    match only_event(&client, &rec, conn) {
        Ev::Error(_, WsStatus::Tls, m) => assert!(m.contains("not trusted"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_host_name_is_an_error_naming_it() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&server);
    let conn = client.connect_with(&format!("wss://localhost:{}/echo", server.wrong_name_port), options.0);
    watch(conn, &rec);
    match only_event(&client, &rec, conn) {
        Ev::Error(_, WsStatus::Tls, m) => {
            assert_eq!(m, "TLS: certificate not valid for name localhost")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn plain_server_on_a_wss_uri_is_an_error() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&server);
    let conn = client.connect_with(&format!("wss://localhost:{}/echo", server.port), options.0);
    watch(conn, &rec);
    match only_event(&client, &rec, conn) {
        Ev::Error(_, WsStatus::Tls, m) => assert!(m.starts_with("TLS:"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ca_file_errors_are_reported_when_set() {
    let options = Options::new();
    let missing = cstr("/nonexistent/ca.pem");
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, missing.as_ptr()) }, WsStatus::CertificateFile);
    assert!(last_error().contains("/nonexistent/ca.pem"), "{}", last_error());
    let dir = std::env::temp_dir().join(format!("wsclient-empty-{}.pem", std::process::id()));
    std::fs::write(&dir, "not a certificate\n").unwrap();
    let empty = cstr(dir.to_str().unwrap());
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, empty.as_ptr()) }, WsStatus::CertificateFile);
    assert!(last_error().contains("no certificate"), "{}", last_error());
    std::fs::remove_file(dir).unwrap();
}

#[test]
fn expired_certificate_is_an_error_naming_it() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&server);
    let conn = client.connect_with(&format!("wss://localhost:{}/echo", server.expired_port), options.0);
    watch(conn, &rec);
    match only_event(&client, &rec, conn) {
        Ev::Error(_, WsStatus::Tls, m) => assert_eq!(m, "TLS: certificate expired"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_server_hanging_up_during_the_tls_handshake_is_an_error() {
    let server = TestServer::start();
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&server);
    let conn = client.connect_with(&format!("wss://localhost:{}/echo", server.hangup_port), options.0);
    watch(conn, &rec);
    match only_event(&client, &rec, conn) {
        Ev::Error(_, WsStatus::Tls, m) => assert!(m.contains("during the TLS handshake"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wss_to_an_ipv6_literal() {
    let server = TestServer::start();
    let Some(port) = server.tls_ipv6_port else {
        skipped("wss_to_an_ipv6_literal", "no IPv6 loopback (::1) on this machine");
        return;
    };
    let client = Client::new();
    let rec = Recorder::default();
    let options = trusting(&server);
    let conn = client.connect_with(&format!("wss://[::1]:{port}/echo"), options.0);
    watch(conn, &rec);
    assert_eq!(send_text(conn, "over TLS and IPv6"), WsStatus::Ok);
    client.run_until("the echo", || rec.texts(conn) == ["over TLS and IPv6"] || rec.finals(conn) > 0);
    assert_eq!(rec.texts(conn), ["over TLS and IPv6"], "{:?}", rec.of(conn));
}
