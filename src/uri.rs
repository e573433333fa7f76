//! Validation of the URI given to connect, taken apart into what the connection needs.
//!
//! Accepted: `ws://` or `wss://` (any case), a host, an optional port, an optional path and
//! query (RFC 3986 `scheme "://" authority path-abempty [ "?" query ]`):
//! - the host is a DNS name (ASCII letters, digits, `-`, `.`, `_`; lower-cased, as host names
//!   have no case), an IPv4 address, or an IPv6 address in brackets;
//! - the port is 1 to 65535; absent or empty (`ws://host:/`, RFC 3986 3.2.3) it is the scheme's
//!   default, 80 or 443;
//! - in the path and query, every character a URI cannot carry there is percent-encoded:
//!   non-ASCII characters as their UTF-8 bytes, `%XX` each, as browsers do (WHATWG URL; RFC
//!   3987 3.1 maps an IRI to a URI the same way); the ASCII ``"<>[\]^`{|}``; and a `%` that
//!   does not start a `%XX` escape. A path that is empty becomes `/` (`ws://host?x=1` asks for
//!   `/?x=1`), as browsers send it.
//!
//! Refused: spaces and control characters anywhere, a fragment (`#`), user information
//! (`user@`), a non-ASCII host (give its `xn--` form), other characters in a host name, IPv6
//! zone identifiers and IPvFuture literals.

use std::net::Ipv6Addr;

use crate::error::{Error, WsStatus};

/// Where to connect, taken apart from a valid URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// Host name (lower case) or IP literal, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// The request target of the upgrade's GET (origin-form: `/`, path, `?` and query),
    /// percent-encoded: only characters RFC 3986 allows there.
    pub resource: String,
    /// The value of the Host header: the host (an IPv6 literal in brackets), then `:port`
    /// unless the port is the scheme's default (as browsers send it, RFC 6455 4.1).
    pub host_header: String,
}

fn bad(reason: &str, uri: &str) -> Error {
    Error::new(WsStatus::InvalidUri, format!("invalid URI {uri:?}: {reason}"))
}

const NOT_ABSOLUTE: &str = "it is not absolute (ws://host/... or wss://host/...)";
const BAD_PORT: &str = "the port must be a number from 1 to 65535";

/// Characters RFC 3986 allows as they are in a path or a query (besides `%XX` escapes):
/// unreserved, sub-delims, ":", "@", "/" and "?".
fn allowed_in_resource(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b)
}

/// The request target for the path and query of a URI (all that follows its authority).
fn resource(path_and_query: &str) -> String {
    let bytes = path_and_query.as_bytes();
    let mut out = String::with_capacity(bytes.len() + 1);
    if !path_and_query.starts_with('/') {
        out.push('/');
    }
    for (i, &b) in bytes.iter().enumerate() {
        let escape = b == b'%'
            && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        if escape || allowed_in_resource(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A host name: ASCII letters, digits, '-', '.' and '_', in lower case.
fn host_name(host: &str, text: &str) -> Result<String, Error> {
    if host.is_empty() {
        return Err(bad("it has no host", text));
    }
    if !host.is_ascii() {
        return Err(bad(
            "internationalized host names are not supported: give the host in its ASCII \
             (xn--) form",
            text,
        ));
    }
    if let Some(c) = host.chars().find(|c| !(c.is_ascii_alphanumeric() || "-._".contains(*c))) {
        return Err(bad(&format!("the host cannot contain {c:?}"), text));
    }
    Ok(host.to_ascii_lowercase())
}

pub fn parse(text: &str) -> Result<Target, Error> {
    if text.is_empty() {
        return Err(bad("it is empty", text));
    }
    if text.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(bad("it contains spaces or control characters", text));
    }
    if text.contains('#') {
        return Err(bad("a WebSocket URI cannot have a fragment (#)", text));
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(bad(NOT_ABSOLUTE, text));
    };
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !is_scheme {
        return Err(bad(NOT_ABSOLUTE, text));
    }
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "ws" => false,
        "wss" => true,
        other => return Err(bad(&format!("the scheme is {other}:, not ws: or wss:"), text)),
    };
    let (authority, path_and_query) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err(bad("user information (user@host) is not supported", text));
    }
    let (host, port, ipv6) = if let Some(inside) = authority.strip_prefix('[') {
        let Some((literal, after)) = inside.split_once(']') else {
            return Err(bad("an IPv6 address must end with ']'", text));
        };
        let address: Ipv6Addr = literal.parse().map_err(|_| {
            bad(
                &format!(
                    "[{literal}] is not an IPv6 address \
                     (zone identifiers and IPvFuture are not supported)"
                ),
                text,
            )
        })?;
        let port = match after {
            "" => None,
            _ => Some(
                after.strip_prefix(':').ok_or_else(|| bad("only a port (:port) can follow an IPv6 address", text))?,
            ),
        };
        (address.to_string(), port, true)
    } else {
        if authority.matches(':').count() > 1 {
            return Err(bad("the host cannot contain ':' (an IPv6 address goes in brackets: ws://[::1]:port/)", text));
        }
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        (host_name(host, text)?, port, false)
    };
    let default_port = if tls { 443 } else { 80 };
    let port = match port {
        None | Some("") => default_port,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(bad(BAD_PORT, text)),
        },
        Some(_) => return Err(bad(BAD_PORT, text)),
    };
    let mut host_header = if ipv6 { format!("[{host}]") } else { host.clone() };
    if port != default_port {
        host_header.push_str(&format!(":{port}"));
    }
    Ok(Target { tls, host, port, resource: resource(path_and_query), host_header })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn parts(uri: &str) -> (bool, String, u16) {
        let t = parse(uri).unwrap_or_else(|e| panic!("{uri}: {}", e.message));
        (t.tls, t.host, t.port)
    }

    #[track_caller]
    fn refused(uri: &str) -> String {
        let err = parse(uri).expect_err(uri);
        assert_eq!(err.status, WsStatus::InvalidUri, "{uri}");
        let prefix = format!("invalid URI {uri:?}: ");
        assert!(err.message.starts_with(&prefix), "{}", err.message);
        err.message[prefix.len()..].to_owned()
    }

    #[test]
    fn accepts_ws_and_wss() {
        let t = |tls, host: &str, port| (tls, host.to_owned(), port);
        assert_eq!(parts("ws://example.com/chat?x=1"), t(false, "example.com", 80));
        assert_eq!(parts("wss://example.com:8443/a/b"), t(true, "example.com", 8443));
        assert_eq!(parts("ws://[::1]:9000/"), t(false, "::1", 9000));
        assert_eq!(parts("WSS://127.0.0.1"), t(true, "127.0.0.1", 443));
        assert_eq!(parts("ws://example.com"), t(false, "example.com", 80));
        assert_eq!(parts("ws://example.com?x=1"), t(false, "example.com", 80));
        assert_eq!(parts("ws://host_name-1.example./"), t(false, "host_name-1.example.", 80));
        assert_eq!(parts("ws://example.com:0080/"), t(false, "example.com", 80));
        assert_eq!(parts("ws://example.com:65535/"), t(false, "example.com", 65535));
    }

    #[test]
    fn taken_apart() {
        assert_eq!(
            parse("WSS://Example.COM:8443?q=caf\u{e9}").unwrap(),
            Target {
                tls: true,
                host: "example.com".into(),
                port: 8443,
                resource: "/?q=caf%C3%A9".into(),
                host_header: "example.com:8443".into(),
            }
        );
        assert_eq!(
            parse("ws://[::FFFF:127.0.0.1]:80/a%2Fb").unwrap(),
            Target {
                tls: false,
                host: "::ffff:127.0.0.1".into(),
                port: 80,
                resource: "/a%2Fb".into(),
                host_header: "[::ffff:127.0.0.1]".into(),
            }
        );
    }

    #[test]
    fn an_empty_port_means_the_default_port() {
        // RFC 3986 3.2.3: "port = *DIGIT"; an empty port is the scheme's default.
        let t = |tls, host: &str, port| (tls, host.to_owned(), port);
        assert_eq!(parts("ws://example.com:/"), t(false, "example.com", 80));
        assert_eq!(parts("wss://example.com:/"), t(true, "example.com", 443));
        assert_eq!(parts("ws://example.com:"), t(false, "example.com", 80));
        assert_eq!(parts("ws://example.com:?x=1"), t(false, "example.com", 80));
        assert_eq!(parts("wss://[::1]:/"), t(true, "::1", 443));
    }

    #[test]
    fn scheme_and_host_have_no_case() {
        let t = |tls, host: &str, port| (tls, host.to_owned(), port);
        assert_eq!(parts("WS://EXAMPLE.COM:8080/Path"), t(false, "example.com", 8080));
        assert_eq!(parts("wSs://ExAmPlE.cOm/"), t(true, "example.com", 443));
        assert_eq!(parts("ws://[2001:DB8::A]/"), t(false, "2001:db8::a", 80));
    }

    #[test]
    fn non_ascii_paths_and_queries_are_accepted() {
        // IRIs (RFC 3987) and what browsers accept: percent-encoded when sent.
        for uri in [
            "ws://example.com/caf\u{e9}",
            "wss://example.com/\u{65e5}\u{672c}?q=\u{fc}",
            "ws://example.com?\u{1f600}",
            "ws://example.com/a\"b{c}|d\\e^f`g<h>[i]",
            "ws://example.com/100%",
        ] {
            parts(uri);
        }
    }

    #[test]
    fn rejects_the_rest() {
        let mut wrongly = Vec::new();
        for bad in [
            "",
            "http://example.com/",
            "https://example.com/",
            "/relative/path",
            "example.com",
            "ws:example.com",
            "ws:/example.com",
            "ws://",
            "ws:///path",
            "ws://?x=1",
            "ws://:80/",
            "ws://host:0/",
            "ws://host:65536/",
            "ws://host:99999/",
            "ws://host:999999999999999999999999/",
            "ws://host:abc/",
            "ws://host:+80/",
            "ws://host:-1/",
            "ws://host:80:81/",
            "ws://host: 80/",
            "ws://ho st/",
            "ws://host/pa th",
            "ws://host/a\tb",
            "ws://host/a\nb",
            "ws://host/a\x7fb",
            "ws://host/#frag",
            "ws://host#frag",
            "ws://user@host/",
            "ws://user:pw@host/",
            " ws://host/",
            "ws://host/ ",
            "ws://::1/",
            "ws://[::1/",
            "ws://[::1]x/",
            "ws://[::1]:x/",
            "ws://[]/",
            "ws://[not-an-ip]/",
            "ws://[127.0.0.1]/",
            "ws://[fe80::1%25eth0]/",
            "ws://[v1.fe80::1]/",
            "ws://ho%41st/",
            "ws://a,b/",
            "ws://a;b/",
            "ws://a!b/",
            "ws://b\u{fc}cher.example/",
        ] {
            match parse(bad) {
                Err(e) if e.status == WsStatus::InvalidUri => {
                    assert!(e.message.starts_with("invalid URI"), "{}", e.message)
                }
                other => wrongly.push(format!("{bad:?}: {other:?}")),
            }
        }
        assert!(wrongly.is_empty(), "accepted: {wrongly:#?}");
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(refused("ws://host:0/"), "the port must be a number from 1 to 65535");
        assert_eq!(refused("relative/path"), "it is not absolute (ws://host/... or wss://host/...)");
        assert_eq!(refused("http://x/"), "the scheme is http:, not ws: or wss:");
        assert!(refused("ws://b\u{fc}cher.example/").contains("xn--"));
        assert!(refused("ws://user@host/").contains("user information"));
        assert!(refused("ws://host/#f").contains("fragment"));
        assert!(refused("ws://[::1/").contains("IPv6"));
        assert!(refused("ws://[fe80::1%25eth0]/").contains("IPv6"));
        assert!(refused("ws://a,b/").contains("','"));
    }
}
