//! An HTTP `CONNECT` tunnel (RFC 9110 9.3.6), with Basic credentials (RFC 7617) when the
//! proxy URL has them.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{authority, lost, Proxy};
use crate::error::{Error, WsStatus};

/// The largest response head a proxy may send, as for the upgrade response.
const MAX_HEAD: usize = 16 * 1024;

pub(super) async fn open(stream: &mut TcpStream, proxy: &Proxy, host: &str, port: u16) -> Result<(), Error> {
    stream.write_all(request(proxy, host, port).as_bytes()).await.map_err(|e| lost(proxy, e))?;
    let head = read_head(stream, proxy).await?;
    check_response(&head, proxy, host, port)
}

fn request(proxy: &Proxy, host: &str, port: u16) -> String {
    let target = authority(host, port);
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = &proxy.credentials {
        let token = data_encoding::BASE64.encode(format!("{user}:{password}").as_bytes());
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// Reads the final response head, skipping interim 1xx answers (RFC 9110 15.2). Nothing may
/// follow it: the server behind the tunnel speaks only after the client (the TLS client hello,
/// or the upgrade request), so bytes after the head would be the proxy's, and are refused
/// rather than lost.
async fn read_head(stream: &mut TcpStream, proxy: &Proxy) -> Result<Vec<u8>, Error> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // Where the blank line may still end: only new bytes (and the three before them) can end
    // it, so a proxy that answers a byte at a time costs no more than one that answers at once.
    let mut searched_from = 0;
    let mut interim_bytes = 0;
    loop {
        while let Some(end) = blank_line(&head, searched_from) {
            if !is_interim(&head) {
                let extra = head.len() - end - 4;
                if is_success(&head) && extra > 0 {
                    let msg = format!("proxy {}: {extra} bytes followed its CONNECT response", proxy.shown());
                    return Err(Error::new(WsStatus::Proxy, msg));
                }
                head.truncate(end + 4);
                return Ok(head);
            }
            interim_bytes += end + 4;
            head.drain(..end + 4);
            searched_from = 0;
        }
        searched_from = head.len().saturating_sub(3);
        if head.len() > MAX_HEAD || interim_bytes > MAX_HEAD {
            let msg = format!("proxy {}: its CONNECT response head exceeds {MAX_HEAD} bytes", proxy.shown());
            return Err(Error::new(WsStatus::Proxy, msg));
        }
        let n = stream.read(&mut chunk).await.map_err(|e| lost(proxy, e))?;
        if n == 0 {
            return Err(lost(proxy, std::io::ErrorKind::UnexpectedEof.into()));
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

/// Where the first blank line ("\r\n\r\n") at or after `from` starts.
fn blank_line(head: &[u8], from: usize) -> Option<usize> {
    head.get(from..)?.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + from)
}

fn status_class(head: &[u8]) -> Option<u8> {
    let rest = head.strip_prefix(b"HTTP/1.1 ").or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    rest.first().copied()
}

/// A 1xx answer other than 101 comes before the final one.
fn is_interim(head: &[u8]) -> bool {
    status_class(head) == Some(b'1') && !head[9..].starts_with(b"101")
}

fn is_success(head: &[u8]) -> bool {
    status_class(head) == Some(b'2')
}

fn check_response(head: &[u8], proxy: &Proxy, host: &str, port: u16) -> Result<(), Error> {
    let mut headers = vec![httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    let bad = |why: String| Error::new(WsStatus::Proxy, format!("proxy {}: {why}", proxy.shown()));
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("its CONNECT response is not valid HTTP".into())),
    }
    let code = response.code.unwrap_or(0);
    // Printable ASCII (httparse gives "" for other bytes), cut to a readable length.
    let reason: String = response.reason.unwrap_or("").chars().take(80).collect();
    let reason = reason.trim();
    if (200..300).contains(&code) {
        return Ok(());
    }
    let said = format!("{code} {reason}").trim_end().to_owned();
    let target = authority(host, port);
    // 407 is the standard answer; some proxies (tinyproxy, to wrong credentials) send 401.
    if code == 407 || code == 401 {
        let realm = response
            .headers
            .iter()
            .filter(|h| {
                h.name.eq_ignore_ascii_case("proxy-authenticate") || h.name.eq_ignore_ascii_case("www-authenticate")
            })
            .find_map(|h| realm(&String::from_utf8_lossy(h.value)));
        let realm = realm.map(|r| format!(" (realm \"{r}\")")).unwrap_or_default();
        let given = if proxy.credentials.is_some() { "refused the credentials given" } else { "requires credentials" };
        let msg = format!("proxy {}: {said}: it {given}{realm}", proxy.shown());
        return Err(Error::new(WsStatus::ProxyAuth, msg));
    }
    Err(bad(format!("refused the tunnel to {target}: {said}")))
}

/// The realm of a `Proxy-Authenticate` challenge, if it names one.
fn realm(challenge: &str) -> Option<String> {
    let at = challenge.to_ascii_lowercase().find("realm=")?;
    let value = &challenge[at + "realm=".len()..];
    let value = match value.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next()?,
        None => value.split([',', ' ']).next()?,
    };
    Some(value.chars().filter(|c| !c.is_control()).take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::proxy::choice::parse;

    #[test]
    fn the_request_names_the_target_and_carries_basic_credentials() {
        let proxy = parse("http://Aladdin:open%20sesame@p:3128").unwrap();
        assert_eq!(
            request(&proxy, "::1", 443),
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"
        );
        assert_eq!(request(&parse("p").unwrap(), "h", 80), "CONNECT h:80 HTTP/1.1\r\nHost: h:80\r\n\r\n");
    }

    #[test]
    fn responses() {
        let proxy = parse("http://p:1").unwrap();
        let check = |head: &str| check_response(head.as_bytes(), &proxy, "h", 80);
        assert!(check("HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(check("HTTP/1.0 200 OK\r\nProxy-agent: x\r\n\r\n").is_ok());
        let long = format!("HTTP/1.1 403 {}\r\n\r\n", "x".repeat(10_000));
        assert!(check(&long).unwrap_err().message.len() < 300, "the reason phrase is cut");
        let e =
            check("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"Corp Net\"\r\n\r\n")
                .unwrap_err();
        assert_eq!(e.status, WsStatus::ProxyAuth);
        assert!(e.message.contains("Corp Net") && e.message.contains("requires credentials"), "{}", e.message);
        let e = check("HTTP/1.0 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"Tinyproxy\"\r\n\r\n").unwrap_err();
        assert_eq!(e.status, WsStatus::ProxyAuth, "tinyproxy's answer to wrong credentials");
        let e = check("HTTP/1.1 403 Forbidden\r\n\r\n").unwrap_err();
        assert_eq!(e.status, WsStatus::Proxy);
        assert!(e.message.contains("403 Forbidden") && e.message.contains("h:80"), "{}", e.message);
        assert_eq!(check("SSH-2.0-x\r\n\r\n").unwrap_err().status, WsStatus::Proxy);
    }

    #[test]
    fn interim_answers_are_told_apart() {
        assert!(is_interim(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!is_interim(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"));
        assert!(!is_interim(b"HTTP/1.1 200 OK\r\n\r\n") && is_success(b"HTTP/1.0 204 x\r\n\r\n"));
        assert!(!is_interim(b"XTTP/1.1 100\r\n\r\n") && !is_interim(b"HTTP/1.1"));
        assert_eq!(blank_line(b"a\r\n\r\nb\r\n\r\n", 0), Some(1));
        assert_eq!(blank_line(b"a\r\n\r\nb\r\n\r\n", 2), Some(6));
        assert_eq!(blank_line(b"ab", 5), None);
    }

    #[test]
    fn realms() {
        assert_eq!(realm("Basic realm=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(realm("Basic REALM=x, charset=UTF-8").as_deref(), Some("x"));
        assert_eq!(realm("Negotiate"), None);
    }
}
