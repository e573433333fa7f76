//! Redirects of the upgrade request: off by default, followed when the options say so, with
//! a hop limit, no downgrade from wss to ws, and credentials kept to their origin.

mod common;

use common::server::TestServer;
use common::*;

fn following(max: u32) -> Options {
    let options = Options::new();
    assert_eq!(unsafe { ws_options_set_follow_redirects(options.0, max) }, WsStatus::Ok);
    options
}

fn with_credentials(options: &Options) {
    unsafe {
        ws_options_add_header(options.0, cstr("Authorization").as_ptr(), cstr("Bearer t0ken").as_ptr());
        ws_options_add_header(options.0, cstr("Cookie").as_ptr(), cstr("session=42").as_ptr());
        ws_options_add_header(options.0, cstr("X-Other").as_ptr(), cstr("kept").as_ptr());
    }
}

/// The first text, or the final event if the connection ended before one.
fn first_text(url: &str, options: &Options) -> Result<String, Ev> {
    let client = Client::new();
    let rec = Recorder::default();
    let conn = client.connect_with(url, options.0);
    watch(conn, &rec);
    client.run_until("a text or the end", || !rec.texts(conn).is_empty() || rec.finals(conn) > 0);
    if let Some(text) = rec.texts(conn).first() {
        close(conn, 1000, "");
        client.run_until_final(&rec, conn);
        return Ok(text.clone());
    }
    Err(rec.of(conn).last().cloned().unwrap())
}

fn rejected(result: Result<String, Ev>) -> String {
    match result {
        Err(Ev::Error(_, WsStatus::HandshakeRejected, message)) => message,
        other => panic!("expected a rejected handshake, got {other:?}"),
    }
}

#[test]
fn a_redirect_is_not_followed_by_default_and_the_error_names_the_location() {
    let server = TestServer::start();
    let to = server.url("/creds");
    let message = rejected(first_text(&server.url(&format!("/redirect?code=301&to={to}")), &Options::new()));
    assert!(message.contains("HTTP 301") && message.contains(&to), "{message}");
    assert!(message.contains("ws_options_set_follow_redirects"), "{message}");
}

#[test]
fn each_redirect_code_is_followed_and_credentials_stay_with_their_origin() {
    let server = TestServer::start();
    for code in [301, 302, 307, 308] {
        let options = following(1);
        with_credentials(&options);
        // Same origin, relative Location: the credentials go along.
        let url = server.url(&format!("/redirect?code={code}&to=/creds"));
        assert_eq!(first_text(&url, &options).unwrap(), "authorization: Bearer t0ken; cookie: session=42", "{code}");
        // Another host (localhost is not 127.0.0.1 to an origin): they do not.
        let elsewhere = format!("ws://localhost:{}/creds", server.port);
        let url = server.url(&format!("/redirect?code={code}&to={elsewhere}"));
        assert_eq!(first_text(&url, &options).unwrap(), "authorization: ; cookie: ", "{code}");
        server.log.wait_for(|l| *l == format!("redirect {code} to {elsewhere}"));
    }
}

#[test]
fn the_hop_limit_holds() {
    let server = TestServer::start();
    // A loop: each answer redirects to /redirect, which does the same.
    let looping = server.url("/redirect");
    let message = rejected(first_text(&looping, &following(3)));
    assert!(message.contains("too many redirects (3"), "{message}");
    // The first request and three followed: four answers.
    server.log.wait_for_count(4, |l| l.starts_with("redirect 307"));
    assert_eq!(server.log.lines().iter().filter(|l| l.starts_with("redirect 307")).count(), 4);

    // Within the limit: two hops.
    let two = server.url(&format!("/redirect?to={}", server.url("/redirect?to=/host")));
    assert_eq!(first_text(&two, &following(2)).unwrap(), format!("host: 127.0.0.1:{}", server.port));
}

#[test]
fn wss_to_ws_is_refused_and_ws_to_wss_followed() {
    let server = TestServer::start();
    let options = following(1);
    let ca = cstr(server.ca_pem.to_str().unwrap());
    assert_eq!(unsafe { ws_options_add_ca_file(options.0, ca.as_ptr()) }, WsStatus::Ok);
    let down = server.wss_url("localhost", &format!("/redirect?to={}", server.url("/host")));
    let message = rejected(first_text(&down, &options));
    assert!(message.contains("drop the encryption"), "{message}");
    let up = server.url(&format!("/redirect?to={}", server.wss_url("localhost", "/host")));
    assert_eq!(first_text(&up, &options).unwrap(), format!("host: localhost:{}", server.tls_port));
}

#[test]
fn the_limit_is_checked_at_the_option_call() {
    let options = Options::new();
    assert_eq!(unsafe { ws_options_set_follow_redirects(options.0, 31) }, WsStatus::InvalidArgument);
    assert!(last_error().contains("30"), "{}", last_error());
    assert_eq!(unsafe { ws_options_set_follow_redirects(options.0, 30) }, WsStatus::Ok);
    assert_eq!(unsafe { ws_options_set_follow_redirects(std::ptr::null_mut(), 1) }, WsStatus::NullArgument);
}
