//! SSL_CERT_FILE replaces the system trust store, as with OpenSSL-based tools. A test binary of
//! its own: it changes the process environment.

mod common;

use common::server::TestServer;
use common::*;

#[test]
fn ssl_cert_file_is_honoured() {
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
}
