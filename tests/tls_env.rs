//! SSL_CERT_FILE replaces the system trust store, as with OpenSSL-based tools. A test binary of
//! its own: it changes the process environment.

mod common;

use common::server::TestServer;
use common::*;

#[test]
fn ssl_cert_file_and_dir_are_honoured() {
    let server = TestServer::start();
    std::env::set_var("SSL_CERT_FILE", &server.ca_pem);
    std::env::remove_var("SSL_CERT_DIR");
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.wss_url("localhost", "/echo"));
    watch(conn, &rec);
    assert_eq!(send_text(conn, "trusted through SSL_CERT_FILE"), WsStatus::Ok);
    client.run_until("the echo", || rec.texts(conn) == ["trusted through SSL_CERT_FILE"]);
    drop(client);

    // The same server is not trusted once SSL_CERT_FILE names another CA (read per client).
    let other = TestServer::start();
    std::env::set_var("SSL_CERT_FILE", &other.ca_pem);
    let client = Client::new();
    let conn = client.connect(&server.wss_url("localhost", "/echo"));
    watch(conn, &rec);
    client.run_until_final(&rec, conn);
    match &rec.of(conn)[..] {
        [Ev::Error(_, WsStatus::Tls, m)] => assert!(m.contains("not trusted"), "{m}"),
        other => panic!("{other:?}"),
    }
    drop(client);
    ssl_cert_dir_is_honoured();
}

/// SSL_CERT_DIR likewise. Called from the test above: both change the process environment,
/// so they must not run in parallel.
fn ssl_cert_dir_is_honoured() {
    let server = TestServer::start();
    let dir = server.dir.join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&server.ca_pem, dir.join("test-ca.pem")).unwrap();
    std::env::set_var("SSL_CERT_DIR", &dir);
    std::env::set_var("SSL_CERT_FILE", dir.join("nonexistent.pem"));
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect(&server.wss_url("localhost", "/echo"));
    watch(conn, &rec);
    assert_eq!(send_text(conn, "trusted through SSL_CERT_DIR"), WsStatus::Ok);
    client.run_until("the echo", || {
        !rec.of(conn).is_empty() && rec.of(conn).iter().any(|e| e.is_final() || matches!(e, Ev::Text(..)))
    });
    assert_eq!(rec.texts(conn), ["trusted through SSL_CERT_DIR"], "{:?}", rec.of(conn));
}
