//! The HTTP upgrade (RFC 6455 section 4) done here rather than by tungstenite, for two reasons:
//! memory (tungstenite's handshake reads through an 8 KiB buffer, and thousands of connections
//! open at once all hold one), and errors that name exactly what the server got wrong.
//!
//! httparse splits the response head; what it means is decided here (RFC 6455 4.1, RFC 9110,
//! RFC 9112):
//! - the head (status line, header lines, the empty line) is at most 16 KiB, with at most 64
//!   header lines; bytes after it are the first frames, handed to the session;
//! - the status line must be `HTTP/1.1 101` (the reason phrase is not read); any other code is
//!   reported with its reason;
//! - lines of one name are one header, their values joined by commas (RFC 9110 5.3); folded
//!   lines (obs-fold) are unfolded (RFC 9112 5.2); the headers read here must be ASCII, the
//!   others are not looked at;
//! - `Upgrade` must be `websocket` alone, `Connection` must contain `Upgrade` (any case);
//! - `Sec-WebSocket-Accept` must appear once, with the value derived from our key;
//! - every extension in `Sec-WebSocket-Extensions` (on any number of lines, RFC 6455 erratum
//!   3433) must have been offered: only permessage-deflate is, and its parameters are checked
//!   by `crate::deflate` (RFC 7692 7);
//! - `Sec-WebSocket-Protocol` may appear once, naming one subprotocol that was offered.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tungstenite::handshake::client::generate_key;
use tungstenite::handshake::derive_accept_key;

use crate::deflate::{self, Agreed};
use crate::error::{Error, WsStatus};
use crate::options::Options;
use crate::uri::Target;

/// Largest response head accepted, in bytes: status line, header lines and the empty line that
/// ends the head (its final CRLFCRLF included).
pub(crate) const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Header lines parsed without an allocation; a head with more (it may have as many as fit in
/// `MAX_RESPONSE_HEAD`: its size is the one limit) is parsed again with room for all of them.
const USUAL_HEADERS: usize = 64;
/// Bytes read at a time while waiting for the response head.
const READ_STEP: usize = 1024;

/// What a successful upgrade leaves behind.
pub struct Upgraded {
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
    /// Bytes the server sent after its response head (the first frames, already read).
    pub leftover: Vec<u8>,
    /// permessage-deflate, if the server accepted it.
    pub(crate) deflate: Option<Agreed>,
}

/// The server's answer: the upgrade, or a redirect (301, 302, 307 or 308 with a Location).
pub enum Answer {
    Upgraded(Upgraded),
    Redirect(Redirect),
}

pub struct Redirect {
    /// "HTTP 307 Temporary Redirect", for messages.
    pub status: String,
    /// The Location header's value, as sent.
    pub location: String,
}

impl Answer {
    /// The upgrade; a redirect is a rejection (where redirects are not followed).
    pub fn upgraded(self) -> Result<Upgraded, Error> {
        match self {
            Answer::Upgraded(upgraded) => Ok(upgraded),
            Answer::Redirect(redirect) => Err(redirect.not_followed()),
        }
    }
}

impl Redirect {
    pub fn not_followed(&self) -> Error {
        rejected(format!(
            "{} to {} (not followed: ws_options_set_follow_redirects turns that on)",
            self.status,
            shown(&self.location)
        ))
    }
}

fn rejected(reason: impl std::fmt::Display) -> Error {
    Error::new(WsStatus::HandshakeRejected, format!("handshake rejected: {reason}"))
}

/// The request head: GET, Host, the WebSocket headers, then the options' headers.
fn request(target: &Target, options: &Options, key: &str) -> Vec<u8> {
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n",
        target.resource, target.host_header
    );
    if !options.subprotocols.is_empty() {
        head.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", options.subprotocols.join(", ")));
    }
    if let Some(offer) = deflate::offer(&options.deflate) {
        head.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n"));
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

/// `certificate_presented`: over TLS, with a client certificate.
fn io_lost(e: std::io::Error, host: &str, certificate_presented: bool) -> Error {
    // In TLS 1.3 the client's side of the handshake is over before the server has checked the
    // client's certificate: a server that refuses it says so here, with an alert.
    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        return Error::new(WsStatus::Tls, super::tls::describe_handshake_error(&e, host));
    }
    // A server that resets the connection as it refuses the certificate (a rustls server does,
    // for a chain too large for it) leaves no alert to read: say what it may have been.
    let hint = if certificate_presented && e.kind() == std::io::ErrorKind::ConnectionReset {
        " (the server may have refused the client certificate)"
    } else {
        ""
    };
    Error::new(WsStatus::ConnectionLost, format!("connection lost during the WebSocket handshake: {e}{hint}"))
}

/// Sends the upgrade request and checks the server's answer.
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &Target,
    options: &Options,
) -> Result<Answer, Error> {
    let key = generate_key();
    let io_lost = |e| io_lost(e, &target.host, target.tls && options.tls.client_cert.is_some());
    stream.write_all(&request(target, options, &key)).await.map_err(io_lost)?;
    stream.flush().await.map_err(io_lost)?;
    let mut buf = Vec::new();
    loop {
        if let Some(answer) = parse_answer(&buf, &key, options)? {
            return Ok(answer);
        }
        // An incomplete head of MAX_RESPONSE_HEAD bytes is refused above, so reading never
        // goes past that many bytes: what follows a head stays in the stream for the session,
        // except for the bytes read together with the head, which become `leftover`.
        let room = MAX_RESPONSE_HEAD.saturating_sub(buf.len()).clamp(1, READ_STEP);
        let filled = buf.len();
        buf.reserve_exact(room);
        buf.resize(filled + room, 0);
        let n = stream.read(&mut buf[filled..]).await.map_err(io_lost)?;
        buf.truncate(filled + n);
        if n == 0 {
            return Err(Error::new(
                WsStatus::ConnectionLost,
                "connection closed by the server during the WebSocket handshake",
            ));
        }
    }
}

/// Optional whitespace in a header value; CR and LF are left there by an unfolded obs-fold,
/// which stands for a space (RFC 9112 5.2).
fn is_ows(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// A value from the response, quoted for an error message, cut to a readable length.
fn shown(value: &str) -> String {
    const MAX_CHARS: usize = 80;
    if value.chars().count() <= MAX_CHARS {
        format!("{value:?}")
    } else {
        let cut: String = value.chars().take(MAX_CHARS).collect();
        format!("{cut:?}...")
    }
}

/// The values of every line named `name`: together they are one header (RFC 9110 5.3). Only
/// the headers the upgrade reads go through here, and their grammar is ASCII: other bytes
/// refuse the response.
fn lines<'b>(headers: &[httparse::Header<'b>], name: &str) -> Result<Vec<&'b str>, Error> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .filter(|v| v.is_ascii())
                .ok_or_else(|| rejected(format!("the {name} header has bytes that are not ASCII")))
        })
        .collect()
}

/// The elements of a list header over all its lines (RFC 9110 5.6.1): separated by commas
/// outside quoted strings, trimmed, the empty ones dropped.
fn elements<'b>(values: &[&'b str]) -> Vec<&'b str> {
    let mut out = Vec::new();
    let mut push = |element: &'b str| {
        let element = element.trim_matches(is_ows);
        if !element.is_empty() {
            out.push(element);
        }
    };
    for value in values {
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, b) in value.bytes().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => {
                    push(&value[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        push(&value[start..]);
    }
    out
}

/// Checks the extensions the server chose: each must have been offered (RFC 6455 4.1), which
/// only permessage-deflate is (unless turned off), with parameters that answer the offer (RFC
/// 7692 7). Returns what was agreed.
fn check_extensions(chosen: &[&str], options: &Options) -> Result<Option<Agreed>, Error> {
    deflate::accept(chosen, &options.deflate).map_err(rejected)
}

/// The subprotocol the server chose: at most one line, naming one subprotocol that was offered
/// (RFC 6455 4.1 and 11.3.4), compared exactly. An empty value chooses none.
fn chosen_protocol(values: &[&str], options: &Options) -> Result<Option<String>, Error> {
    let value = match values {
        [] => return Ok(None),
        [value] => value.trim_matches(is_ows),
        _ => {
            return Err(rejected(format!(
                "Sec-WebSocket-Protocol appears {} times; the server must choose one subprotocol",
                values.len()
            )))
        }
    };
    if value.is_empty() {
        return Ok(None);
    }
    if value.contains(',') {
        return Err(rejected(format!("the server chose several subprotocols ({}); it must choose one", shown(value))));
    }
    if !options.subprotocols.iter().any(|p| p == value) {
        return Err(rejected(format!("the server chose subprotocol {}, which was not offered", shown(value))));
    }
    Ok(Some(value.to_owned()))
}

fn parse_head<'h, 'b>(response: &mut httparse::Response<'h, 'b>, window: &'b [u8]) -> httparse::Result<usize> {
    httparse::ParserConfig::default()
        .allow_obsolete_multiline_headers_in_responses(true)
        .parse_response(response, window)
}

/// Reads the server's response head from `buf` (every byte received so far): Ok(None) while it
/// is incomplete, the upgrade once it is complete and valid, else why it is refused (always
/// WS_STATUS_HANDSHAKE_REJECTED). A pure function of its arguments, which the fuzz targets call.
/// The upgrade the response head in `buf` makes (None: the head is incomplete); a redirect is
/// a rejection.
pub(crate) fn parse_response(buf: &[u8], key: &str, options: &Options) -> Result<Option<Upgraded>, Error> {
    parse_answer(buf, key, options)?.map(Answer::upgraded).transpose()
}

/// What the response head in `buf` says (None: the head is incomplete).
pub(crate) fn parse_answer(buf: &[u8], key: &str, options: &Options) -> Result<Option<Answer>, Error> {
    // A head that is complete within the limit is complete within its first bytes.
    let window = &buf[..buf.len().min(MAX_RESPONSE_HEAD)];
    let mut usual = [httparse::EMPTY_HEADER; USUAL_HEADERS];
    let mut many = Vec::new();
    let mut response = httparse::Response::new(&mut usual);
    let mut parsed = parse_head(&mut response, window);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        // Every header line ends with a line feed: that many fit.
        many.resize(window.iter().filter(|&&b| b == b'\n').count(), httparse::EMPTY_HEADER);
        response = httparse::Response::new(&mut many);
        parsed = parse_head(&mut response, window);
    }
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(rejected(format!("the response head is longer than {MAX_RESPONSE_HEAD} bytes")))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(rejected(format!("malformed HTTP response ({e})"))),
    };
    let code = response.code.unwrap_or(0);
    if code != 101 {
        // The reason phrase is printable ASCII (httparse gives "" for any other byte).
        let reason: String = response.reason.unwrap_or("").chars().take(80).collect();
        let reason = reason.trim();
        let sep = if reason.is_empty() { "" } else { " " };
        let status = format!("HTTP {code}{sep}{reason}");
        if matches!(code, 301 | 302 | 307 | 308) {
            if let [location] = lines(response.headers, "Location")?[..] {
                let location = location.trim_matches(is_ows).to_owned();
                return Ok(Some(Answer::Redirect(Redirect { status, location })));
            }
        }
        return Err(rejected(status));
    }
    if response.version != Some(1) {
        return Err(rejected("the server answered 101 in HTTP/1.0 (a 101 requires HTTP/1.1)"));
    }
    let headers = response.headers;

    let upgrade = lines(headers, "Upgrade")?;
    match elements(&upgrade)[..] {
        [] => return Err(rejected("the response lacks \"Upgrade: websocket\"")),
        [protocol] if protocol.eq_ignore_ascii_case("websocket") => {}
        _ => {
            return Err(rejected(format!(
                "the response's Upgrade is {}, not \"websocket\"",
                shown(&upgrade.join(", "))
            )))
        }
    }
    if !elements(&lines(headers, "Connection")?).iter().any(|option| option.eq_ignore_ascii_case("upgrade")) {
        return Err(rejected("the response lacks \"Connection: Upgrade\""));
    }
    match lines(headers, "Sec-WebSocket-Accept")?[..] {
        [] => return Err(rejected("the response lacks Sec-WebSocket-Accept")),
        [accept] if accept.trim_matches(is_ows) == derive_accept_key(key.as_bytes()) => {}
        [_] => return Err(rejected("wrong Sec-WebSocket-Accept from the server")),
        ref several => {
            return Err(rejected(format!("Sec-WebSocket-Accept appears {} times; it must appear once", several.len())))
        }
    }
    let deflate = check_extensions(&elements(&lines(headers, "Sec-WebSocket-Extensions")?), options)?;
    let protocol = chosen_protocol(&lines(headers, "Sec-WebSocket-Protocol")?, options)?;
    Ok(Some(Answer::Upgraded(Upgraded { protocol, leftover: buf[head_len..].to_vec(), deflate })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn accept() -> String {
        derive_accept_key(KEY.as_bytes())
    }

    /// A response head: `status`, then each of `lines` with its CRLF, then the empty line.
    fn head(status: &str, lines: &[&str]) -> Vec<u8> {
        let mut bytes = format!("{status}\r\n").into_bytes();
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        bytes
    }

    /// A valid 101 for `key` with `extra` lines after the required ones.
    fn good_for(key: &str, extra: &[&str]) -> Vec<u8> {
        let accept = format!("Sec-WebSocket-Accept: {}", derive_accept_key(key.as_bytes()));
        let mut lines = vec!["Upgrade: websocket", "Connection: Upgrade", &accept];
        lines.extend_from_slice(extra);
        head("HTTP/1.1 101 Switching Protocols", &lines)
    }

    /// A valid 101 for KEY with `extra` lines after the required ones.
    fn good_with(extra: &[&str]) -> Vec<u8> {
        good_for(KEY, extra)
    }

    /// A valid 101 for `key` padded to exactly `size` bytes.
    fn padded(key: &str, size: usize) -> Vec<u8> {
        let base = good_for(key, &["X-Pad: "]).len();
        let pad = format!("X-Pad: {}", "p".repeat(size - base));
        let bytes = good_for(key, &[&pad]);
        assert_eq!(bytes.len(), size);
        bytes
    }

    /// The bytes for a failure message, cut to a readable length.
    fn lossy(bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        format!("{:?}", text.chars().take(300).collect::<String>())
    }

    fn parse_with(bytes: &[u8], options: &Options) -> Result<Option<Upgraded>, Error> {
        parse_response(bytes, KEY, options)
    }

    #[track_caller]
    fn opens(bytes: &[u8]) -> Upgraded {
        match parse_with(bytes, &Options::default()) {
            Ok(Some(upgraded)) => upgraded,
            Ok(None) => panic!("incomplete: {}", lossy(bytes)),
            Err(e) => panic!("{}: {}", e.message, lossy(bytes)),
        }
    }

    #[track_caller]
    fn refused_with(bytes: &[u8], options: &Options) -> String {
        match parse_with(bytes, options) {
            Err(e) => {
                assert_eq!(e.status, WsStatus::HandshakeRejected, "{}", e.message);
                assert!(e.message.starts_with("handshake rejected: "), "{}", e.message);
                e.message
            }
            Ok(Some(_)) => panic!("opened: {}", lossy(bytes)),
            Ok(None) => panic!("incomplete: {}", lossy(bytes)),
        }
    }

    #[track_caller]
    fn refused(bytes: &[u8]) -> String {
        refused_with(bytes, &Options::default())
    }

    /// The request head sent for `uri` with default options.
    fn request_for(uri: &str) -> String {
        let target = crate::uri::parse(uri).unwrap();
        String::from_utf8(request(&target, &Options::default(), "KEY")).unwrap()
    }

    #[test]
    fn request_head() {
        let mut options = Options::default();
        options.add_header("Authorization", "Bearer x").unwrap();
        options.add_subprotocol("chat").unwrap();
        let target = crate::uri::parse("ws://example.com:8080/chat?room=1").unwrap();
        let head = String::from_utf8(request(&target, &options, "KEY")).unwrap();
        assert!(head.starts_with("GET /chat?room=1 HTTP/1.1\r\nHost: example.com:8080\r\n"), "{head}");
        assert!(head.contains("Sec-WebSocket-Key: KEY\r\n"));
        assert!(head.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(head.contains("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"));
        assert!(head.ends_with("authorization: Bearer x\r\n\r\n"), "{head}");
    }

    #[test]
    fn the_request_target_always_starts_with_a_slash() {
        for (uri, line) in [
            ("ws://example.com", "GET / HTTP/1.1\r\n"),
            ("ws://example.com/", "GET / HTTP/1.1\r\n"),
            ("ws://example.com?x=1", "GET /?x=1 HTTP/1.1\r\n"),
            ("ws://example.com:8080?x=1&y", "GET /?x=1&y HTTP/1.1\r\n"),
            ("ws://example.com?", "GET /? HTTP/1.1\r\n"),
            ("ws://example.com/a/b?c=d?e", "GET /a/b?c=d?e HTTP/1.1\r\n"),
            ("ws://[::1]:9000?x=1", "GET /?x=1 HTTP/1.1\r\n"),
        ] {
            assert!(request_for(uri).starts_with(line), "{uri}: {}", request_for(uri));
        }
    }

    #[test]
    fn non_ascii_and_other_characters_a_uri_cannot_carry_are_percent_encoded() {
        for (uri, line) in [
            // UTF-8, then %XX, as browsers do.
            (
                "ws://example.com/caf\u{e9}/\u{65e5}\u{672c}?q=\u{fc}&e=\u{1f600}",
                "GET /caf%C3%A9/%E6%97%A5%E6%9C%AC?q=%C3%BC&e=%F0%9F%98%80 HTTP/1.1\r\n",
            ),
            // Escapes already there stay as they are, in either case.
            ("ws://example.com/%41%e9?%2F", "GET /%41%e9?%2F HTTP/1.1\r\n"),
            // A % that starts no escape is itself escaped.
            ("ws://example.com/100%?p=%zz&q=%4", "GET /100%25?p=%25zz&q=%254 HTTP/1.1\r\n"),
            // ASCII that RFC 3986 does not allow in a path or query.
            (
                "ws://example.com/a\"b<c>d[e]f{g}h|i\\j^k`l?m\"n<o>p[]=1",
                "GET /a%22b%3Cc%3Ed%5Be%5Df%7Bg%7Dh%7Ci%5Cj%5Ek%60l?m%22n%3Co%3Ep%5B%5D=1 HTTP/1.1\r\n",
            ),
            // Everything RFC 3986 allows goes out as it is.
            (
                "ws://example.com/AZaz09-._~!$&'()*+,;=:@/?/?AZaz09-._~!$&'()*+,;=:@",
                "GET /AZaz09-._~!$&'()*+,;=:@/?/?AZaz09-._~!$&'()*+,;=:@ HTTP/1.1\r\n",
            ),
        ] {
            assert!(request_for(uri).starts_with(line), "{uri}: {}", request_for(uri));
        }
    }

    #[test]
    fn the_host_header() {
        for (uri, host) in [
            // The default port is left out (as browsers do, and RFC 6455 4.1 says), given or not.
            ("ws://example.com/", "example.com"),
            ("ws://example.com:80/", "example.com"),
            ("ws://example.com:/", "example.com"),
            ("wss://example.com/", "example.com"),
            ("wss://example.com:443/", "example.com"),
            ("wss://example.com:0443/", "example.com"),
            // Any other port is given, the other scheme's default included.
            ("ws://example.com:443/", "example.com:443"),
            ("wss://example.com:80/", "example.com:80"),
            ("ws://example.com:8080/", "example.com:8080"),
            // IPv6 literals keep their brackets.
            ("ws://[::1]:9000/", "[::1]:9000"),
            ("ws://[::1]/", "[::1]"),
            ("wss://[::1]:443/", "[::1]"),
            ("ws://[0:0:0:0:0:0:0:1]/", "[::1]"),
            ("ws://[2001:DB8::A]:81/", "[2001:db8::a]:81"),
            ("ws://127.0.0.1:9000/", "127.0.0.1:9000"),
            // Host names have no case: lower case, as browsers send them.
            ("WS://EXAMPLE.com:8080/Path", "example.com:8080"),
            ("Wss://Example.COM/", "example.com"),
        ] {
            let head = request_for(uri);
            let line = format!("\r\nHost: {host}\r\n");
            assert!(head.contains(&line), "{uri}: {head}");
        }
        assert!(request_for("WS://EXAMPLE.com:8080/Path?Q=A").starts_with("GET /Path?Q=A HTTP/1.1\r\n"));
    }

    #[test]
    fn a_good_response_opens_and_keeps_what_follows_the_head() {
        let mut bytes = good_with(&[]);
        let head_len = bytes.len();
        bytes.extend_from_slice(b"\x81\x02hi\x82\x00");
        let upgraded = opens(&bytes);
        assert_eq!(upgraded.leftover, b"\x81\x02hi\x82\x00");
        assert_eq!(upgraded.protocol, None);
        for cut in 0..head_len {
            assert!(parse_with(&bytes[..cut], &Options::default()).unwrap().is_none(), "cut at {cut}");
        }
        assert!(opens(&bytes[..head_len]).leftover.is_empty());
    }

    #[test]
    fn status_lines() {
        assert_eq!(refused(b"HTTP/1.1 403 Forbidden\r\n\r\n"), "handshake rejected: HTTP 403 Forbidden");
        assert_eq!(refused(b"HTTP/1.1 400\r\n\r\n"), "handshake rejected: HTTP 400");
        assert_eq!(refused(b"HTTP/1.0 403 Forbidden\r\n\r\n"), "handshake rejected: HTTP 403 Forbidden");
        // A 101 without a reason phrase (with or without the space before it) is fine.
        let accept = format!("Sec-WebSocket-Accept: {}", accept());
        let lines = ["Upgrade: websocket", "Connection: Upgrade", &accept];
        opens(&head("HTTP/1.1 101", &lines));
        opens(&head("HTTP/1.1 101 ", &lines));
        opens(&head("HTTP/1.1 101 OK", &lines));
        // A 101 requires HTTP/1.1.
        let message = refused(&head("HTTP/1.0 101 Switching Protocols", &lines));
        assert!(message.contains("HTTP/1.0"), "{message}");
        assert!(refused(&head("HTTP/2 101", &lines)).contains("malformed"));
        assert!(refused(&head("HTTP/1.1 1010 Switching", &lines)).contains("malformed"));
        assert!(refused(b"garbage\r\n\r\n").contains("malformed"));
    }

    #[test]
    fn header_lines_of_one_name_are_one_header() {
        // RFC 9110 5.3: lines of one name are one comma-separated list.
        let accept = format!("Sec-WebSocket-Accept: {}", accept());
        for lines in [
            &["Upgrade: websocket", "Connection: keep-alive", "Connection: Upgrade", &accept][..],
            &["Upgrade: websocket", "Connection: Upgrade", "Connection: keep-alive", &accept],
            &["Upgrade: websocket", "Connection: keep-alive, Upgrade", &accept],
            &["Upgrade: websocket", "Connection: ,, keep-alive ,upgrade,", &accept],
            &["Upgrade: websocket", "connection: keep-alive", "CONNECTION: UPGRADE", &accept],
            &["UPGRADE: WebSocket", "Connection: Upgrade", &accept],
        ] {
            opens(&head("HTTP/1.1 101 Switching Protocols", lines));
        }
        for lines in [
            &["Upgrade: websocket", "Connection: keep-alive", &accept][..],
            &["Upgrade: websocket", &accept],
            &["Upgrade: websocket", "Connection: Upgraded", &accept],
        ] {
            let message = refused(&head("HTTP/1.1 101 Switching Protocols", lines));
            assert!(message.contains("Connection: Upgrade"), "{message}");
        }
    }

    #[test]
    fn upgrade_must_be_websocket_alone() {
        // RFC 6455 4.1: the value must be "websocket" (any case); a list would switch to more
        // than one protocol.
        let accept = format!("Sec-WebSocket-Accept: {}", accept());
        for upgrade in [
            &[][..],
            &["Upgrade: h2c"],
            &["Upgrade: websocket, h2c"],
            &["Upgrade: websocket", "Upgrade: h2c"],
            &["Upgrade: websocket/13"],
            &["Upgrade: "],
        ] {
            let mut lines = upgrade.to_vec();
            lines.extend_from_slice(&["Connection: Upgrade", &accept]);
            let message = refused(&head("HTTP/1.1 101 Switching Protocols", &lines));
            assert!(message.contains("Upgrade"), "{message}");
        }
    }

    #[test]
    fn the_accept_key_must_be_there_once_and_right() {
        let wrong = format!("Sec-WebSocket-Accept: {}", derive_accept_key(b"other"));
        let right = format!("Sec-WebSocket-Accept: {}", accept());
        let required = ["Upgrade: websocket", "Connection: Upgrade"];
        let with = |accepts: &[&str]| {
            let mut lines = required.to_vec();
            lines.extend_from_slice(accepts);
            head("HTTP/1.1 101 Switching Protocols", &lines)
        };
        assert_eq!(refused(&with(&[])), "handshake rejected: the response lacks Sec-WebSocket-Accept");
        assert_eq!(refused(&with(&[&wrong])), "handshake rejected: wrong Sec-WebSocket-Accept from the server");
        // RFC 6455 11.3.3: it must not appear more than once, whatever the copies say.
        let (right, wrong) = (right.as_str(), wrong.as_str());
        for accepts in [[right, wrong], [wrong, right], [right, right]] {
            let message = refused(&with(&accepts));
            assert!(message.contains("Sec-WebSocket-Accept") && message.contains("2 times"), "{message}");
        }
        let folded_in_two = format!("Sec-WebSocket-Accept: {}\r\n {}", &accept()[..10], &accept()[10..]);
        assert!(refused(&with(&[&folded_in_two])).contains("wrong Sec-WebSocket-Accept"));
    }

    #[test]
    fn an_extension_that_was_not_offered_fails_on_any_line() {
        // Only permessage-deflate is offered: any other extension named fails, on whichever
        // line it comes, and the error names it.
        let off = Options {
            deflate: crate::deflate::DeflateConfig { enabled: false, ..Default::default() },
            ..Default::default()
        };
        let message = refused_with(&good_with(&["Sec-WebSocket-Extensions: permessage-deflate"]), &off);
        assert!(message.contains("\"permessage-deflate\", which was not offered"), "{message}");
        assert!(opens(&good_with(&["Sec-WebSocket-Extensions: permessage-deflate"])).deflate.is_some());
        assert!(opens(&good_with(&[])).deflate.is_none(), "declined: a plain connection");
        for (lines, named) in [
            (&["Sec-WebSocket-Extensions: ", "Sec-WebSocket-Extensions: x-evil; a=1"][..], "x-evil"),
            (
                &["Sec-WebSocket-Extensions:", "Sec-WebSocket-Extensions: ,", "sec-websocket-extensions: x-third"],
                "x-third",
            ),
            (&["Sec-WebSocket-Extensions: , x-after-empty"], "x-after-empty"),
            // A quoted parameter may hold a comma: it does not start another extension.
            (&["Sec-WebSocket-Extensions: x-q; p=\"a, b\""], "\"x-q\""),
        ] {
            let message = refused(&good_with(lines));
            assert!(message.contains(named), "{message}");
            assert!(message.contains("not offered"), "{message}");
        }
        // Empty lines name nothing (RFC 9110 5.6.1: empty list elements are ignored).
        opens(&good_with(&["Sec-WebSocket-Extensions: "]));
        opens(&good_with(&["Sec-WebSocket-Extensions: ", "Sec-WebSocket-Extensions: , ,"]));
    }

    #[test]
    fn the_server_must_choose_exactly_one_offered_subprotocol() {
        let mut options = Options::default();
        options.add_subprotocol("chat").unwrap();
        options.add_subprotocol("superchat").unwrap();
        let chosen = |lines: &[&str]| {
            parse_with(&good_with(lines), &options).map(|u| u.unwrap().protocol).map_err(|e| e.message)
        };
        assert_eq!(chosen(&[]), Ok(None));
        assert_eq!(chosen(&["Sec-WebSocket-Protocol: chat"]), Ok(Some("chat".into())));
        assert_eq!(chosen(&["Sec-WebSocket-Protocol:  superchat  "]), Ok(Some("superchat".into())));
        // An empty value chooses none.
        assert_eq!(chosen(&["Sec-WebSocket-Protocol: "]), Ok(None));
        for (lines, says) in [
            (&["Sec-WebSocket-Protocol: other"][..], "not offered"),
            // Subprotocol names are compared exactly, as browsers do.
            (&["Sec-WebSocket-Protocol: Chat"], "not offered"),
            (&["Sec-WebSocket-Protocol: chat, superchat"], "one"),
            (&["Sec-WebSocket-Protocol: chat,"], "one"),
            (&["Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: chat"], "2 times"),
            (&["Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: superchat"], "2 times"),
            (&["Sec-WebSocket-Protocol: ", "Sec-WebSocket-Protocol: chat"], "2 times"),
        ] {
            let message = refused_with(&good_with(lines), &options);
            assert!(message.contains(says), "{lines:?}: {message}");
            assert!(message.contains("Sec-WebSocket-Protocol") || message.contains("subprotocol"), "{message}");
        }
        // Offered nothing: any choice fails.
        assert!(refused(&good_with(&["Sec-WebSocket-Protocol: chat"])).contains("not offered"));
    }

    #[test]
    fn folded_lines_are_unfolded() {
        // RFC 9112 5.2: a user agent replaces obs-fold with spaces.
        let accept = format!("Sec-WebSocket-Accept: {}", accept());
        opens(&head(
            "HTTP/1.1 101 Switching Protocols",
            &["Upgrade: websocket", "Connection: keep-alive,\r\n Upgrade", &accept],
        ));
        opens(&head(
            "HTTP/1.1 101 Switching Protocols",
            &["Upgrade:\r\n\twebsocket", "Connection: Upgrade", &accept, "X-Note: a\r\n b"],
        ));
        let message = refused(&head(
            "HTTP/1.1 101 Switching Protocols",
            &["Upgrade: web\r\n socket", "Connection: Upgrade", &accept],
        ));
        assert!(message.contains("Upgrade"), "{message}");
    }

    #[test]
    fn bytes_outside_ascii() {
        // In a header the upgrade does not read: ignored (RFC 9110 allows obs-text in values).
        let mut bytes = good_with(&[]);
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(b"Server: caf\xe9 \xff\xfe\r\n\r\n");
        opens(&bytes);
        // In a status line's reason: ignored too.
        let mut bytes = b"HTTP/1.1 101 Sw\xefitching".to_vec();
        bytes.extend_from_slice(&good_with(&[])[32..]);
        opens(&bytes);
        // In a header the upgrade reads: refused, naming the header.
        for (line, name) in [
            (&b"Connection: Upgrade, \xff"[..], "Connection"),
            (b"Sec-WebSocket-Protocol: ch\xc3\xa4t", "Sec-WebSocket-Protocol"),
            (b"Sec-WebSocket-Extensions: \xe9", "Sec-WebSocket-Extensions"),
        ] {
            let mut bytes = good_with(&[]);
            bytes.truncate(bytes.len() - 2);
            bytes.extend_from_slice(line);
            bytes.extend_from_slice(b"\r\n\r\n");
            let message = refused(&bytes);
            assert!(message.contains(name) && message.contains("not ASCII"), "{message}");
        }
        // Control characters are not allowed in any value.
        let mut bytes = good_with(&[]);
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(b"X-Nul: a\x00b\r\n\r\n");
        assert!(refused(&bytes).contains("malformed"));
    }

    #[test]
    fn header_lines_are_limited_only_by_the_head_size() {
        let filler: Vec<String> = (0..1500).map(|i| format!("X{i}: {i}")).collect();
        let lines: Vec<&str> = filler.iter().map(String::as_str).collect();
        opens(&good_with(&lines[..61]));
        opens(&good_with(&lines[..62]));
        // About 1,300 short lines fit in 16 KiB.
        opens(&good_with(&lines[..1300]));
        assert!(refused(&good_with(&lines)).contains("longer than 16384 bytes"));
    }

    #[test]
    fn the_head_may_be_16384_bytes_and_no_more() {
        /// A good head of exactly `size` bytes, then a frame.
        fn sized(size: usize) -> (Vec<u8>, usize) {
            let mut bytes = padded(KEY, size);
            bytes.extend_from_slice(b"\x81\x02hi");
            (bytes, size)
        }
        let (bytes, head_len) = sized(16384);
        assert_eq!(opens(&bytes).leftover, b"\x81\x02hi");
        assert!(parse_with(&bytes[..head_len - 1], &Options::default()).unwrap().is_none());
        let (bytes, head_len) = sized(16385);
        let expected = "handshake rejected: the response head is longer than 16384 bytes";
        // Whether the bytes past the limit have arrived or not.
        assert_eq!(refused(&bytes), expected);
        assert_eq!(refused(&bytes[..head_len]), expected);
        assert_eq!(refused(&bytes[..16384]), expected);
        assert!(parse_with(&bytes[..16383], &Options::default()).unwrap().is_none());
        // A header line that never ends.
        let mut endless = b"HTTP/1.1 101 Switching Protocols\r\nX-Endless: ".to_vec();
        endless.resize(20000, b'a');
        assert_eq!(refused(&endless), expected);
    }

    #[test]
    fn other_malformed_heads() {
        let accept = format!("Sec-WebSocket-Accept: {}", accept());
        for lines in [
            // RFC 9112 5.1: no whitespace between a field name and its colon.
            &["Upgrade : websocket", "Connection: Upgrade", &accept][..],
            &["Upgrade websocket", "Connection: Upgrade", &accept],
            &[" Upgrade: websocket", "Connection: Upgrade", &accept],
        ] {
            let message = refused(&head("HTTP/1.1 101 Switching Protocols", lines));
            assert!(message.contains("malformed"), "{message}");
        }
        // Bare LF line ends are accepted (RFC 9112 2.2 allows it).
        let lf = String::from_utf8(good_with(&[])).unwrap().replace("\r\n", "\n");
        opens(lf.as_bytes());
    }

    /// Runs `upgrade` against a server that answers with a head of `size` bytes and `after`
    /// behind it, in two writes: the head but its last 2 bytes, then (once the client has read
    /// them) those 2 bytes with `after`. Returns upgrade's outcome and every byte the stream
    /// still held.
    async fn upgrade_against(size: usize, after: &[u8]) -> (Result<Upgraded, Error>, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut server) = tokio::io::duplex(128 << 10);
        let after = after.to_vec();
        let server = tokio::spawn(async move {
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                request.push(server.read_u8().await.unwrap());
            }
            let request = String::from_utf8(request).unwrap();
            let key = request.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).unwrap().to_owned();
            let mut bytes = padded(&key, size);
            bytes.extend_from_slice(&after);
            server.write_all(&bytes[..size - 2]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            server.write_all(&bytes[size - 2..]).await.unwrap();
            // Dropping the server's end: the client reads what is left, then the end.
        });
        let target = crate::uri::parse("ws://example.com/").unwrap();
        let outcome = upgrade(&mut client, &target, &Options::default()).await.and_then(Answer::upgraded);
        server.await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        (outcome, rest)
    }

    #[tokio::test]
    async fn the_upgrade_reads_no_further_than_the_limit_and_loses_nothing() {
        let frames: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        for size in [150, 1023, 1024, 1025, 16383, 16384] {
            let (outcome, rest) = upgrade_against(size, &frames).await;
            let upgraded = outcome.unwrap_or_else(|e| panic!("{size}: {}", e.message));
            assert!(
                size + upgraded.leftover.len() <= MAX_RESPONSE_HEAD,
                "{size}: read {} bytes past the head",
                upgraded.leftover.len()
            );
            let mut all = upgraded.leftover;
            all.extend_from_slice(&rest);
            assert!(all == frames, "{size}: the bytes after the head are not kept");
        }
        // Too long: refused after reading exactly the limit, nothing beyond.
        let (outcome, rest) = upgrade_against(16385, &frames).await;
        let error = outcome.err().unwrap();
        assert_eq!(error.message, "handshake rejected: the response head is longer than 16384 bytes");
        assert_eq!(rest.len(), 16385 + frames.len() - MAX_RESPONSE_HEAD);
    }
}
