//! TLS session resumption across reconnects: a client builds each distinct TLS configuration
//! once and its connections share it, session cache included, so only the first of many
//! connections to a server does a full handshake. Counted at a rustls server in the test
//! (`ServerConnection::handshake_kind`), with an extra CA, and with a client certificate too.

mod common;

use std::sync::{Arc, Mutex};

use common::certs::{Ca, TempDir};
use common::*;
use futures_util::StreamExt;
use rustls::HandshakeKind;

const RECONNECTS: usize = 100;

/// A wss server on loopback that counts its TLS handshakes by kind, upgrades, and reads until
/// the client closes.
struct CountingServer {
    port: u16,
    kinds: Arc<Mutex<Vec<HandshakeKind>>>,
    _runtime: tokio::runtime::Runtime,
}

impl CountingServer {
    fn start(config: Arc<rustls::ServerConfig>) -> CountingServer {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let kinds = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let seen = kinds.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    // Recorded before the upgrade's answer: the client's open event comes after.
                    seen.lock().unwrap().push(tls.get_ref().1.handshake_kind().expect("handshake done"));
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else { return };
                    while let Some(Ok(_)) = ws.next().await {}
                });
            }
        });
        CountingServer { port, kinds, _runtime: runtime }
    }

    fn full_handshakes(&self) -> usize {
        self.kinds.lock().unwrap().iter().filter(|k| **k != HandshakeKind::Resumed).count()
    }
}

/// Opens and closes `RECONNECTS` connections one after the other, each with options made anew by
/// `options` (as a host that builds its options per connect does); returns the server's count
/// of full handshakes.
fn full_handshakes_over_reconnects(server: &CountingServer, options: impl Fn() -> Options) -> usize {
    let client = Client::new();
    let url = format!("wss://localhost:{}/", server.port);
    for _ in 0..RECONNECTS {
        let rec = Recorder::default();
        let options = options();
        let conn = client.connect_with(&url, options.0);
        watch(conn, &rec);
        client.run_until("open", || !rec.of(conn).is_empty());
        assert_eq!(rec.of(conn), [Ev::Open(conn)]);
        assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
        client.run_until_final(&rec, conn);
    }
    assert_eq!(server.kinds.lock().unwrap().len(), RECONNECTS);
    let full = server.full_handshakes();
    println!("{full} full TLS handshakes over {RECONNECTS} connections");
    full
}

fn add_ca(options: &Options, path: &std::path::Path) {
    let path = cstr(path.to_str().unwrap());
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, path.as_ptr()) }, WsStatus::Ok, "{}", last_error());
}

#[test]
fn reconnects_resume_the_tls_session_with_an_extra_ca() {
    let dir = TempDir::new("resumption");
    let ca = Ca::new("wsclient test resumption CA");
    let server = CountingServer::start(Ca::server_config(&ca.server(), None));
    let ca_pem = dir.write("ca.pem", &ca.pem);
    let full = full_handshakes_over_reconnects(&server, || {
        let options = Options::new();
        add_ca(&options, &ca_pem);
        options
    });
    assert_eq!(full, 1, "only the first connection does a full handshake");
}

#[test]
fn reconnects_resume_the_tls_session_with_a_client_certificate() {
    let dir = TempDir::new("resumption-client-cert");
    let ca = Ca::new("wsclient test resumption CA");
    let client_ca = Ca::new("wsclient test resumption client CA");
    let server = CountingServer::start(Ca::server_config(&ca.server(), Some(&client_ca)));
    let ca_pem = dir.write("ca.pem", &ca.pem);
    let leaf = client_ca.client("resuming client", rcgen::KeyPair::generate().unwrap());
    let chain = cstr(dir.write("client.pem", &leaf.chain_pem).to_str().unwrap());
    let key = cstr(dir.write("client-key.pem", &leaf.key_pem).to_str().unwrap());
    let full = full_handshakes_over_reconnects(&server, || {
        let options = Options::new();
        add_ca(&options, &ca_pem);
        let status = unsafe { ws_options_set_client_certificate(options.0, chain.as_ptr(), key.as_ptr()) };
        assert_eq!(status, WsStatus::Ok, "{}", last_error());
        options
    });
    assert_eq!(full, 1, "only the first connection does a full handshake");
}
