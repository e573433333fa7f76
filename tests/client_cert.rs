//! TLS client certificates (ws_options_set_client_certificate) against an independent server
//! that requires one: Python's ssl module with CERT_REQUIRED (tests/peers/py_server.py --tls).
//! The CAs, certificates and keys are made by the test.

mod common;

use std::path::PathBuf;

use common::certs::{self, Ca, TempDir};
use common::peers::Peer;
use common::*;

/// A Python server requiring client certificates of `client_ca`, and the files a client needs.
struct Setup {
    dir: TempDir,
    server_ca: PathBuf,
    client_ca: Ca,
    peer: Peer,
}

impl Setup {
    fn start() -> Setup {
        let dir = TempDir::new("client-cert");
        let server_ca = Ca::new("wsclient test server CA");
        let client_ca = Ca::new("wsclient test client CA");
        let server = server_ca.server();
        let cert = dir.write("server.pem", &server.chain_pem);
        let key = dir.write("server-key.pem", &server.key_pem);
        let client_ca_pem = dir.write("client-ca.pem", &client_ca.pem);
        let peer = Peer::start_python_tls(&cert, &key, &client_ca_pem);
        let server_ca = dir.write("server-ca.pem", &server_ca.pem);
        Setup { dir, server_ca, client_ca, peer }
    }

    fn url(&self) -> String {
        format!("wss://localhost:{}/echo", self.peer.port)
    }

    /// Options trusting the server's CA, presenting the certificate in `chain` with `key` if given.
    fn options(&self, cert: Option<(&PathBuf, &PathBuf)>) -> Options {
        let options = Options::new();
        let ca = cstr(self.server_ca.to_str().unwrap());
        assert_eq!(unsafe { ws_options_add_ca_file(options.0, ca.as_ptr()) }, WsStatus::Ok, "{}", last_error());
        if let Some((chain, key)) = cert {
            assert_eq!(set_client_certificate(&options, chain, key), WsStatus::Ok, "{}", last_error());
        }
        options
    }
}

fn set_client_certificate(options: &Options, chain: &std::path::Path, key: &std::path::Path) -> WsStatus {
    let chain = cstr(chain.to_str().unwrap());
    let key = cstr(key.to_str().unwrap());
    unsafe { ws_options_set_client_certificate(options.0, chain.as_ptr(), key.as_ptr()) }
}

/// Connects, and returns the connection's one event when it failed, or None once a message was
/// echoed (then closes it).
fn echo_or_error(client: &Client, url: &str, options: &Options) -> Option<Ev> {
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    assert_eq!(send_text(conn, "hello with a certificate"), WsStatus::Ok);
    client.run_until("the echo or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    if rec.finals(conn) > 0 {
        let events = rec.of(conn);
        assert_eq!(events.len(), 1, "{events:?}");
        return Some(events[0].clone());
    }
    assert_eq!(rec.texts(conn), ["hello with a certificate"]);
    assert_eq!(close(conn, 1000, ""), WsStatus::Ok);
    client.run_until_final(&rec, conn);
    None
}

#[test]
fn a_client_certificate_is_accepted_with_its_key_in_each_pem_format() {
    let setup = Setup::start();
    let client = Client::new();
    let ec = setup.client_ca.client("ec client", rcgen::KeyPair::generate().unwrap());
    let rsa = setup.client_ca.client("rsa client", certs::rsa_key());
    let ec_chain = setup.dir.write("ec.pem", &ec.chain_pem);
    let ec_pkcs8 = setup.dir.write("ec-pkcs8.pem", &ec.key_pem);
    let ec_sec1 = setup.dir.write("ec-sec1.pem", &certs::traditional(&ec_pkcs8));
    let rsa_chain = setup.dir.write("rsa.pem", &rsa.chain_pem);
    let rsa_pkcs8 = setup.dir.write("rsa-pkcs8.pem", &rsa.key_pem);
    let rsa_pkcs1 = setup.dir.write("rsa-pkcs1.pem", &certs::traditional(&rsa_pkcs8));
    assert!(std::fs::read_to_string(&ec_sec1).unwrap().contains("BEGIN EC PRIVATE KEY"));
    assert!(std::fs::read_to_string(&rsa_pkcs1).unwrap().contains("BEGIN RSA PRIVATE KEY"));
    let cases = [
        ("ec client", &ec_chain, &ec_pkcs8),
        ("ec client", &ec_chain, &ec_sec1),
        ("rsa client", &rsa_chain, &rsa_pkcs8),
        ("rsa client", &rsa_chain, &rsa_pkcs1),
    ];
    for (i, (name, chain, key)) in cases.into_iter().enumerate() {
        let options = setup.options(Some((chain, key)));
        assert_eq!(echo_or_error(&client, &setup.url(), &options), None, "{}", key.display());
        // The server saw the certificate: it printed the client's name, once more each time.
        let times = cases.iter().take(i + 1).filter(|c| c.0 == name).count();
        setup.peer.wait_for_lines(&format!("client {name}"), times);
    }
}

#[test]
fn a_missing_client_certificate_is_a_tls_error_naming_it() {
    let setup = Setup::start();
    let client = Client::new();
    match echo_or_error(&client, &setup.url(), &setup.options(None)) {
        Some(Ev::Error(_, WsStatus::Tls, m)) => {
            assert_eq!(m, "TLS: the server requires a client certificate (alert: certificate required)")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_client_certificate_the_server_does_not_trust_is_a_tls_error_naming_it() {
    let setup = Setup::start();
    let client = Client::new();
    let stranger = Ca::new("wsclient test stranger CA").client("stranger", rcgen::KeyPair::generate().unwrap());
    let chain = setup.dir.write("stranger.pem", &stranger.chain_pem);
    let key = setup.dir.write("stranger-key.pem", &stranger.key_pem);
    match echo_or_error(&client, &setup.url(), &setup.options(Some((&chain, &key)))) {
        Some(Ev::Error(_, WsStatus::Tls, m)) => {
            assert_eq!(m, "TLS: the server does not trust the client certificate (alert: unknown CA)")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_certificate_errors_are_reported_when_set() {
    let dir = TempDir::new("client-cert-errors");
    let ca = Ca::new("wsclient test client CA");
    let leaf = ca.client("client", rcgen::KeyPair::generate().unwrap());
    let chain = dir.write("chain.pem", &leaf.chain_pem);
    let key = dir.write("key.pem", &leaf.key_pem);
    let other_key = dir.write("other-key.pem", &rcgen::KeyPair::generate().unwrap().serialize_pem());
    let missing = dir.0.join("missing.pem");
    let garbage = dir.write("garbage.pem", "not PEM at all\n");
    let options = Options::new();

    let refused = |chain: &std::path::Path, key: &std::path::Path| {
        assert_eq!(set_client_certificate(&options, chain, key), WsStatus::CertificateFile);
        last_error()
    };
    let m = refused(&missing, &key);
    assert!(m.starts_with(&format!("client certificate file {}: ", missing.display())), "{m}");
    let m = refused(&chain, &missing);
    assert!(m.starts_with(&format!("key file {}: ", missing.display())), "{m}");
    // The key file where the certificate belongs, and the other way round.
    let m = refused(&key, &chain);
    assert_eq!(m, format!("client certificate file {}: no certificate in it", key.display()));
    let m = refused(&chain, &chain);
    assert_eq!(m, format!("key file {}: no private key in it (PKCS#8, PKCS#1 or SEC1 PEM)", chain.display()));
    let m = refused(&chain, &garbage);
    assert!(m.starts_with(&format!("key file {}: ", garbage.display())), "{m}");
    let m = refused(&chain, &other_key);
    assert_eq!(m, format!("key file {} does not match the certificate in {}", other_key.display(), chain.display()));

    // NULL arguments.
    let path = cstr(chain.to_str().unwrap());
    let status = unsafe { ws_options_set_client_certificate(std::ptr::null_mut(), path.as_ptr(), path.as_ptr()) };
    assert_eq!(status, WsStatus::NullArgument);
    let status = unsafe { ws_options_set_client_certificate(options.0, std::ptr::null(), path.as_ptr()) };
    assert_eq!(status, WsStatus::NullArgument);
    assert!(last_error().contains("chain_pem_path"), "{}", last_error());
    let status = unsafe { ws_options_set_client_certificate(options.0, path.as_ptr(), std::ptr::null()) };
    assert_eq!(status, WsStatus::NullArgument);
    assert!(last_error().contains("key_pem_path"), "{}", last_error());

    // And the right pair is taken.
    assert_eq!(set_client_certificate(&options, &chain, &key), WsStatus::Ok, "{}", last_error());
}
