//! A local WebSocket test server (plain and TLS, on 127.0.0.1 with ephemeral ports) whose
//! behaviour is chosen by the request path. Used by the Rust tests, and by examples/testserver.rs
//! for the C examples and `make demo`.
//!
//! Paths:
//!   /echo?close_after=N        echo text as text and binary as binary; with close_after, close
//!                              with 1000 after echoing N messages (any other path echoes too)
//!   /push?n=N&size=S&code=C    N messages ("msg 0".. or S-byte binary), then close with C (1000);
//!                              logs "pushed K MiB" as each MiB reaches the socket; with
//!                              kind=text the S-byte messages are text ("msg K " then a letter),
//!                              with kind=mixed even ones are binary and odd ones text
//!   /close?code=C&reason=R     close at once with code C and reason R
//!   /drop                      send "bye", then drop the TCP connection without a close frame
//!   /reject                    refuse the upgrade with HTTP 403
//!   /silent                    upgrade, then never read nor write
//!   /headers                   send the Authorization header's value, then echo
//!   /host                      send the Host header's value, then echo
//!   /creds                     send the Authorization and Cookie headers' values, then echo
//!   /redirect?code=C&to=L      answer the upgrade with HTTP C (307) and Location L (all that
//!                              follows "to="; /redirect without one), logged as "redirect C to L"
//!   /protocol                  choose the first offered subprotocol, then echo
//!   /badproto                  choose subprotocol "bogus" whatever was offered
//!   /ping                      ping "are you there", send "pong:<payload>" when the pong arrives, then echo
//!   /PBX0/APPS/demo            a small JSON app service for `make demo` (Login, SubscribePresence, Logout)
//! Every close frame a server connection receives is logged as "close CODE REASON", and every
//! ping the echo receives as "ping"; every TCP connection accepted as "accepted from IP".

#![allow(dead_code, clippy::result_large_err)]

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// Lines the server writes about what it saw, and a way to wait for one.
#[derive(Default)]
pub struct ServerLog {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl ServerLog {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until a line satisfies `pred`; returns it.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_count(1, pred)
    }

    /// Waits (bounded) until `n` lines satisfy `pred`; returns the first.
    pub fn wait_for_count(&self, n: usize, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = self.lines.lock().unwrap();
        loop {
            let matching: Vec<&String> = lines.iter().filter(|l| pred(l)).collect();
            if matching.len() >= n {
                return matching[0].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "server log never showed the expected line; it has {:?}", *lines);
            lines = self.changed.wait_timeout(lines, left).unwrap().0;
        }
    }
}

pub struct TestServer {
    pub port: u16,
    pub tls_port: u16,
    /// A TLS port whose certificate names only "wrong.example".
    pub wrong_name_port: u16,
    /// Accepts TCP and never answers anything.
    pub blackhole_port: u16,
    /// The plain server on [::1], where the machine has IPv6 loopback.
    pub ipv6_port: Option<u16>,
    /// The TLS server on [::1], where the machine has IPv6 loopback.
    pub tls_ipv6_port: Option<u16>,
    /// A TLS port whose certificate (for localhost) expired in 2002.
    pub expired_port: u16,
    /// Accepts TCP, reads the start of the TLS handshake, and hangs up.
    pub hangup_port: u16,
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    pub log: Arc<ServerLog>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA made for this test run and a server configuration whose certificate it signed (for
/// localhost, 127.0.0.1 and ::1): for tests that run a TLS peer of their own.
pub fn tls_server_config() -> (String, Arc<rustls::ServerConfig>) {
    let tls = make_tls();
    (tls.ca_pem, tls.good_config)
}

struct Tls {
    ca_pem: String,
    good_config: Arc<rustls::ServerConfig>,
    good: tokio_rustls::TlsAcceptor,
    wrong_name: tokio_rustls::TlsAcceptor,
    expired: tokio_rustls::TlsAcceptor,
}

fn make_tls() -> Tls {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A distinct name per CA, so that two test servers' CAs are never mistaken for each other.
    static CA_SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let serial = CA_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("wsclient test CA {} {serial}", std::process::id());
    ca_params.distinguished_name.push(DnType::CommonName, name);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let config_for = |names: Vec<String>, expired: bool| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        params.distinguished_name.push(DnType::CommonName, "wsclient test server");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let chain = vec![cert.der().clone(), ca_cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(config)
    };
    let good_config = config_for(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()], false);
    let acceptor = |names: Vec<String>, expired: bool| tokio_rustls::TlsAcceptor::from(config_for(names, expired));
    Tls {
        good: tokio_rustls::TlsAcceptor::from(good_config.clone()),
        good_config,
        wrong_name: acceptor(vec!["wrong.example".into()], false),
        expired: acceptor(vec!["localhost".into()], true),
        ca_pem: ca_cert.pem(),
    }
}

impl TestServer {
    pub fn start() -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let log = Arc::new(ServerLog::default());
        let tls = make_tls();
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wsclient-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, &tls.ca_pem).unwrap();
        let (port, tls_port, wrong_name_port, blackhole_port, ipv6_port, (tls_ipv6_port, expired_port, hangup_port)) =
            runtime.block_on(async {
                let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let secure = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let wrong = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let blackhole = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let ipv6 = TcpListener::bind("[::1]:0").await.ok();
                let ipv6_port = ipv6.as_ref().map(|l| l.local_addr().unwrap().port());
                let tls_ipv6 = TcpListener::bind("[::1]:0").await.ok();
                let tls_ipv6_port = tls_ipv6.as_ref().map(|l| l.local_addr().unwrap().port());
                if let Some(listener) = tls_ipv6 {
                    tokio::spawn(serve(listener, Some(tls.good.clone()), log.clone()));
                }
                let expired = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let expired_port = expired.local_addr().unwrap().port();
                tokio::spawn(serve(expired, Some(tls.expired), log.clone()));
                let hangup = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let hangup_port = hangup.local_addr().unwrap().port();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    while let Ok((mut stream, _)) = hangup.accept().await {
                        let mut hello = [0u8; 16];
                        let _ = stream.read(&mut hello).await;
                        drop(stream);
                    }
                });
                let ports = (
                    plain.local_addr().unwrap().port(),
                    secure.local_addr().unwrap().port(),
                    wrong.local_addr().unwrap().port(),
                    blackhole.local_addr().unwrap().port(),
                    ipv6_port,
                    (tls_ipv6_port, expired_port, hangup_port),
                );
                if let Some(listener) = ipv6 {
                    tokio::spawn(serve(listener, None, log.clone()));
                }
                tokio::spawn(serve(plain, None, log.clone()));
                tokio::spawn(serve(secure, Some(tls.good), log.clone()));
                tokio::spawn(serve(wrong, Some(tls.wrong_name), log.clone()));
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Ok((stream, _)) = blackhole.accept().await {
                        held.push(stream);
                    }
                });
                ports
            });
        TestServer {
            port,
            tls_port,
            wrong_name_port,
            blackhole_port,
            ipv6_port,
            tls_ipv6_port,
            expired_port,
            hangup_port,
            dir,
            ca_pem,
            log,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    pub fn wss_url(&self, host: &str, path: &str) -> String {
        format!("wss://{host}:{}{path}", self.tls_port)
    }
}

async fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, log: Arc<ServerLog>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        log.push(format!("accepted from {}", peer.ip()));
        let log = log.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => handle(tcp, log).await,
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        handle(stream, log).await
                    }
                }
            }
        });
    }
}

fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(stream: S, log: Arc<ServerLog>) {
    let mut path = String::new();
    let mut query = String::new();
    let mut authorization = String::new();
    let mut host = String::new();
    let mut cookie = String::new();
    let log_redirect = log.clone();
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_owned();
        query = req.uri().query().unwrap_or("").to_owned();
        authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        host = req.headers().get("host").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        cookie = req.headers().get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let offered = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
        match path.as_str() {
            "/redirect" => {
                // Everything after "to=" is the Location (it may hold '&' and '?'); without
                // one, /redirect itself (a loop).
                let location = query.split_once("to=").map(|(_, to)| to).unwrap_or("/redirect");
                let code = param(&query, "code").and_then(|c| c.parse().ok()).unwrap_or(307);
                let mut redirect = ErrorResponse::new(None);
                *redirect.status_mut() = StatusCode::from_u16(code).unwrap();
                redirect.headers_mut().insert("location", HeaderValue::from_str(location).unwrap());
                log_redirect.push(format!("redirect {code} to {location}"));
                return Err(redirect);
            }
            "/reject" => {
                let mut refusal = ErrorResponse::new(Some("go away".into()));
                *refusal.status_mut() = StatusCode::FORBIDDEN;
                return Err(refusal);
            }
            "/protocol" => {
                if let Some(first) = offered.split(',').map(str::trim).find(|p| !p.is_empty()) {
                    resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(first).unwrap());
                }
            }
            "/badproto" => {
                resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("bogus"));
            }
            _ => {}
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await else {
        return;
    };
    log.push(format!("open {path}"));
    match path.as_str() {
        "/push" => {
            let n: usize = param(&query, "n").and_then(|v| v.parse().ok()).unwrap_or(10);
            let size: Option<usize> = param(&query, "size").and_then(|v| v.parse().ok());
            let code: u16 = param(&query, "code").and_then(|v| v.parse().ok()).unwrap_or(1000);
            let kind = param(&query, "kind").unwrap_or("binary");
            for i in 0..n {
                let message = match size {
                    Some(size) if kind == "text" || (kind == "mixed" && i % 2 == 1) => {
                        Message::text(sized_text(i, size))
                    }
                    Some(size) => {
                        let mut bytes = vec![(i % 251) as u8; size];
                        bytes[..8.min(size)].copy_from_slice(&(i as u64).to_le_bytes()[..8.min(size)]);
                        Message::Binary(Bytes::from(bytes))
                    }
                    None => Message::text(format!("msg {i}")),
                };
                if ws.feed(message).await.is_err() {
                    return;
                }
                // Progress, in whole MiB that reached the socket.
                let (before, after) = ((i * size.unwrap_or(0)) >> 20, ((i + 1) * size.unwrap_or(0)) >> 20);
                if after > before {
                    if ws.flush().await.is_err() {
                        return;
                    }
                    log.push(format!("pushed {after} MiB"));
                }
            }
            let _ =
                ws.send(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: "done".into() }))).await;
            drain(ws, &log).await;
        }
        "/close" => {
            let code: u16 = param(&query, "code").and_then(|v| v.parse().ok()).unwrap_or(1000);
            let reason = param(&query, "reason").unwrap_or("").to_owned();
            let _ =
                ws.send(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))).await;
            drain(ws, &log).await;
        }
        "/drop" => {
            let _ = ws.send(Message::text("bye")).await;
            drop(ws);
        }
        "/PBX0/APPS/demo" => demo_service(ws, &log).await,
        "/silent" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        "/creds" => {
            let _ = ws.send(Message::text(format!("authorization: {authorization}; cookie: {cookie}"))).await;
            echo(ws, &log).await;
        }
        "/host" => {
            let _ = ws.send(Message::text(format!("host: {host}"))).await;
            echo(ws, &log).await;
        }
        "/headers" => {
            let _ = ws.send(Message::text(format!("authorization: {authorization}"))).await;
            echo(ws, &log).await;
        }
        "/ping" => {
            let _ = ws.send(Message::Ping(Bytes::from_static(b"are you there"))).await;
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Pong(payload) = message {
                    let text = format!("pong:{}", String::from_utf8_lossy(&payload));
                    let _ = ws.send(Message::text(text)).await;
                    break;
                }
            }
            echo(ws, &log).await;
        }
        _ => {
            let close_after = param(&query, "close_after").and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
            echo_then_close(ws, &log, close_after).await
        }
    }
}

/// `size` bytes of ASCII text starting with "msg <i> ", distinct for every `i` (a JS engine
/// that interns strings cannot share them).
fn sized_text(i: usize, size: usize) -> String {
    // Bytes, not chars: this runs unoptimized in tests, for gigabytes.
    let mut bytes = vec![b'a' + (i % 26) as u8; size];
    let prefix = format!("msg {i} ");
    let n = prefix.len().min(size);
    bytes[..n].copy_from_slice(&prefix.as_bytes()[..n]);
    String::from_utf8(bytes).unwrap()
}

fn log_close(log: &ServerLog, frame: &Option<CloseFrame>) {
    match frame {
        Some(f) => log.push(format!("close {} {}", u16::from(f.code), f.reason)),
        None => log.push("close none".into()),
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(ws: WebSocketStream<S>, log: &ServerLog) {
    echo_then_close(ws, log, usize::MAX).await
}

async fn echo_then_close<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
    log: &ServerLog,
    close_after: usize,
) {
    let mut echoed = 0;
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(message).await.is_err() {
                    return;
                }
                echoed += 1;
                if echoed == close_after {
                    let _ =
                        ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
                }
            }
            Message::Close(frame) => log_close(log, &frame),
            Message::Ping(_) => log.push("ping".into()),
            _ => {}
        }
    }
    log.push("ended".into());
}

/// Reads until the client's close reply (or the end), logging it.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>, log: &ServerLog) {
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Close(frame) = message {
            log_close(log, &frame);
        }
    }
}

/// The app service of `make demo`: answers a few JSON requests by their "mt" field.
async fn demo_service<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>, log: &ServerLog) {
    let is = |text: &str, mt: &str| text.contains(&format!("\"mt\":\"{mt}\""));
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            if let Message::Close(frame) = message {
                log_close(log, &frame);
            }
            continue;
        };
        let replies: Vec<String> = if is(&text, "Login") {
            vec![r#"{"mt":"LoginResult","ok":true,"user":"alice","server":"wsclient demo PBX"}"#.into()]
        } else if is(&text, "SubscribePresence") {
            let people = [("bob", "available"), ("carol", "busy"), ("dave", "away"), ("erin", "available")];
            let mut replies: Vec<String> = people
                .iter()
                .map(|(user, status)| format!(r#"{{"mt":"PresenceChanged","user":"{user}","status":"{status}"}}"#))
                .collect();
            replies.push(format!(r#"{{"mt":"SubscribePresenceResult","count":{}}}"#, people.len()));
            replies
        } else if is(&text, "Logout") {
            let _ = ws.send(Message::text(r#"{"mt":"LogoutResult"}"#)).await;
            let frame = CloseFrame { code: CloseCode::Normal, reason: "bye alice".into() };
            let _ = ws.send(Message::Close(Some(frame))).await;
            continue;
        } else {
            vec![r#"{"mt":"Error","text":"unknown request"}"#.into()]
        };
        for reply in replies {
            if ws.send(Message::text(reply)).await.is_err() {
                return;
            }
        }
    }
}
