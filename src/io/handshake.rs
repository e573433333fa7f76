//! The HTTP upgrade (RFC 6455 section 4) done here rather than by tungstenite, for two reasons:
//! memory (tungstenite's handshake reads through an 8 KiB buffer, and thousands of connections
//! open at once all hold one), and errors that name exactly what the server got wrong.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::error::{Error, WsStatus};
use crate::options::Options;
use crate::uri::Target;

/// Largest response head accepted (status line and headers).
const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Bytes read at a time while waiting for the response head.
const READ_STEP: usize = 1024;
const MAX_HEADERS: usize = 64;

/// What a successful upgrade leaves behind.
pub struct Upgraded {
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
    /// Bytes the server sent after its response head (the first frames, already read).
    pub leftover: Vec<u8>,
}

fn rejected(message: impl Into<String>) -> Error {
    Error::new(WsStatus::HandshakeRejected, message)
}

/// The request head: GET, Host, the WebSocket headers, then the options' headers.
fn request(target: &Target, options: &Options, key: &str) -> Vec<u8> {
    let path = target.uri.path_and_query().map_or("/", |p| p.as_str());
    let host = target.uri.authority().map_or("", |a| a.as_str());
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    if !options.subprotocols.is_empty() {
        head.push_str(&format!(
            "Sec-WebSocket-Protocol: {}\r\n",
            options.subprotocols.join(", ")
        ));
    }
    let mut bytes = head.into_bytes();
    for (name, value) in &options.headers {
        bytes.extend_from_slice(name.as_str().as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(value.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes
}

fn io_lost(e: std::io::Error) -> Error {
    Error::new(
        WsStatus::ConnectionLost,
        format!("connection lost during the WebSocket handshake: {e}"),
    )
}

/// Sends the upgrade request and checks the server's answer.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &Target,
    options: &Options,
) -> Result<Upgraded, Error> {
    let key = generate_key();
    stream
        .write_all(&request(target, options, &key))
        .await
        .map_err(io_lost)?;
    stream.flush().await.map_err(io_lost)?;
    let mut buf = Vec::with_capacity(READ_STEP);
    loop {
        if let Some(upgraded) = parse_response(&buf, &key, options)? {
            return Ok(upgraded);
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(rejected(format!(
                "handshake rejected: response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        buf.reserve(READ_STEP);
        let n = stream.read_buf(&mut buf).await.map_err(io_lost)?;
        if n == 0 {
            return Err(Error::new(
                WsStatus::ConnectionLost,
                "connection closed by the server during the WebSocket handshake",
            ));
        }
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| std::str::from_utf8(h.value).unwrap_or("").trim())
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Ok(None) while the head is incomplete.
pub(crate) fn parse_response(
    buf: &[u8],
    key: &str,
    options: &Options,
) -> Result<Option<Upgraded>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(rejected(format!(
                "handshake rejected: malformed HTTP response ({e})"
            )))
        }
    };
    let code = response.code.unwrap_or(0);
    if code != 101 {
        let reason = response
            .reason
            .filter(|r| !r.is_empty())
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        return Err(rejected(format!("handshake rejected: HTTP {code}{reason}")));
    }
    let headers = response.headers;
    if !has_token(header(headers, "upgrade"), "websocket") {
        return Err(rejected(
            "handshake rejected: the response lacks \"Upgrade: websocket\"",
        ));
    }
    if !has_token(header(headers, "connection"), "upgrade") {
        return Err(rejected(
            "handshake rejected: the response lacks \"Connection: Upgrade\"",
        ));
    }
    match header(headers, "sec-websocket-accept") {
        None => {
            return Err(rejected(
                "handshake rejected: the response lacks Sec-WebSocket-Accept",
            ))
        }
        Some(accept) if accept != derive_accept_key(key.as_bytes()) => {
            return Err(rejected(
                "handshake rejected: wrong Sec-WebSocket-Accept from the server",
            ))
        }
        Some(_) => {}
    }
    if let Some(extensions) = header(headers, "sec-websocket-extensions").filter(|e| !e.is_empty())
    {
        return Err(rejected(format!(
            "handshake rejected: the server chose extensions that were not offered ({extensions})"
        )));
    }
    let protocol = header(headers, "sec-websocket-protocol")
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    if let Some(chosen) = &protocol {
        if !options.subprotocols.iter().any(|p| p == chosen) {
            return Err(rejected(format!("handshake rejected: the server chose subprotocol {chosen:?}, which was not offered")));
        }
    }
    Ok(Some(Upgraded {
        protocol,
        leftover: buf[head_len..].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        crate::uri::parse("ws://example.com:8080/chat?room=1").unwrap()
    }

    fn answer(key: &str, extra: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n{extra}\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes()
    }

    #[test]
    fn request_head() {
        let mut options = Options::default();
        options.add_header("Authorization", "Bearer x").unwrap();
        options.add_subprotocol("chat").unwrap();
        let head = String::from_utf8(request(&target(), &options, "KEY")).unwrap();
        assert!(
            head.starts_with("GET /chat?room=1 HTTP/1.1\r\nHost: example.com:8080\r\n"),
            "{head}"
        );
        assert!(head.contains("Sec-WebSocket-Key: KEY\r\n"));
        assert!(head.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(head.ends_with("authorization: Bearer x\r\n\r\n"), "{head}");
    }

    #[test]
    fn responses() {
        let options = Options::default();
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut good = answer(key, "");
        good.extend_from_slice(b"\x81\x02hi");
        let upgraded = parse_response(&good, key, &options).unwrap().unwrap();
        assert_eq!(upgraded.leftover, b"\x81\x02hi");
        assert!(parse_response(&good[..20], key, &options)
            .unwrap()
            .is_none());
        let err = |bytes: &[u8]| parse_response(bytes, key, &options).err().unwrap().message;
        assert_eq!(
            err(b"HTTP/1.1 403 Forbidden\r\n\r\n"),
            "handshake rejected: HTTP 403 Forbidden"
        );
        assert!(err(&answer("other", "")).contains("wrong Sec-WebSocket-Accept"));
        assert!(
            err(b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
                .contains("lacks Sec-WebSocket-Accept")
        );
        assert!(err(&answer(key, "Sec-WebSocket-Protocol: chat\r\n")).contains("not offered"));
        assert!(err(&answer(
            key,
            "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        ))
        .contains("extensions"));
        assert!(err(b"garbage\r\n\r\n").contains("malformed"));
    }
}
