//! Validation of the URI given to connect: only absolute ws: and wss: URIs with a host pass.

use tokio_tungstenite::tungstenite::http::Uri;

use crate::error::{Error, WsStatus};

/// Where to connect, taken apart from a valid URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The URI as given, for the HTTP request.
    pub uri: Uri,
    pub tls: bool,
    /// Host name or IP literal, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
}

fn bad(reason: &str, uri: &str) -> Error {
    Error::new(
        WsStatus::InvalidUri,
        format!("invalid URI {uri:?}: {reason}"),
    )
}

/// The text after the port colon of an authority, if it has one (IPv6 brackets skipped).
fn explicit_port(authority: &str) -> Option<&str> {
    let after_host = match authority.strip_prefix('[') {
        Some(rest) => &rest[rest.find(']')? + 1..],
        None => authority,
    };
    after_host.rfind(':').map(|i| &after_host[i + 1..])
}

pub fn parse(text: &str) -> Result<Target, Error> {
    if text.is_empty() {
        return Err(bad("it is empty", text));
    }
    if text
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad("it contains spaces or control characters", text));
    }
    if text.contains('#') {
        return Err(bad("a WebSocket URI cannot have a fragment (#)", text));
    }
    if !text.contains("://") {
        return Err(bad(
            "it is not absolute (ws://host/... or wss://host/...)",
            text,
        ));
    }
    let uri: Uri = text.parse().map_err(|e| bad(&format!("{e}"), text))?;
    let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("ws") => false,
        Some("wss") => true,
        Some(other) => {
            return Err(bad(
                &format!("the scheme is {other}:, not ws: or wss:"),
                text,
            ))
        }
        None => {
            return Err(bad(
                "it is not absolute (ws://host/... or wss://host/...)",
                text,
            ))
        }
    };
    let authority = uri.authority().ok_or_else(|| bad("it has no host", text))?;
    if authority.as_str().contains('@') {
        return Err(bad("user information (user@host) is not supported", text));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("it has no host", text));
    }
    let port = match explicit_port(authority.as_str()) {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some("") => return Err(bad("the port is empty", text)),
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad("the port must be a number from 1 to 65535", text)),
        },
    };
    Ok(Target {
        host: host.to_owned(),
        port,
        tls,
        uri,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ws_and_wss() {
        let t = parse("ws://example.com/chat?x=1").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (false, "example.com", 80));
        let t = parse("wss://example.com:8443/a/b").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port),
            (true, "example.com", 8443)
        );
        let t = parse("ws://[::1]:9000/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        let t = parse("WSS://127.0.0.1").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (true, "127.0.0.1", 443));
    }

    #[test]
    fn rejects_the_rest() {
        for bad in [
            "",
            "http://example.com/",
            "https://example.com/",
            "/relative/path",
            "example.com",
            "ws://",
            "ws:///path",
            "ws://host:0/",
            "ws://host:65536/",
            "ws://host:99999/",
            "ws://host:abc/",
            "ws://host:/",
            "ws://ho st/",
            "ws://host/pa th",
            "ws://host/#frag",
            "ws://user@host/",
            " ws://host/",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.status, WsStatus::InvalidUri, "{bad}");
            assert!(err.message.starts_with("invalid URI"), "{}", err.message);
        }
    }
}
