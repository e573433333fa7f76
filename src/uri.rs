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
//! - an internationalised host name (`ws://bücher.example/`, or its UTF-8 percent-encoded)
//!   is converted to its ASCII form (`xn--bcher-kva.example`, UTS 46 as browsers do), which is
//!   what is resolved, sent in the Host header and checked against the certificate;
//! - an IPv6 address may carry a zone identifier (RFC 6874: `ws://[fe80::1%25eth0]/`, an
//!   interface name or number): the connection goes out through that interface, and the Host
//!   header omits the zone, which means nothing to the server (RFC 6874 4).
//!
//! Refused: spaces and control characters anywhere, a fragment (`#`), user information
//! (`user@`), a host name that is not valid (other characters, or no valid IDNA form), an
//! unknown zone, and IPvFuture literals.

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
    /// The interface index of an IPv6 zone identifier (`[fe80::1%25eth0]`), or 0.
    pub zone: u32,
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

/// A host name: ASCII letters, digits, '-', '.' and '_', in lower case; an internationalised
/// name (non-ASCII, or percent-encoded UTF-8) in its ASCII form.
fn host_name(host: &str, text: &str) -> Result<String, Error> {
    if host.is_empty() {
        return Err(bad("it has no host", text));
    }
    if !host.is_ascii() || host.contains('%') {
        return international(host, text);
    }
    if let Some(c) = host.chars().find(|c| !(c.is_ascii_alphanumeric() || "-._".contains(*c))) {
        return Err(bad(&format!("the host cannot contain {c:?}"), text));
    }
    Ok(host.to_ascii_lowercase())
}

/// The ASCII form (IDNA, UTS 46 with the rules browsers use) of a name given in Unicode or
/// percent-encoded UTF-8.
fn international(host: &str, text: &str) -> Result<String, Error> {
    let decoded = percent_encoding::percent_decode_str(host)
        .decode_utf8()
        .map_err(|_| bad("the host's percent-encoded bytes are not UTF-8", text))?;
    let ascii = idna::domain_to_ascii(&decoded)
        .map_err(|_| bad(&format!("the host {decoded:?} is not a valid internationalised name (IDNA)"), text))?;
    if ascii.is_empty() {
        return Err(bad("it has no host", text));
    }
    // What IDNA maps to (full stops, compatibility forms) must still be a plain host name.
    if let Some(c) = ascii.chars().find(|c| !(c.is_ascii_alphanumeric() || "-._".contains(*c))) {
        return Err(bad(&format!("the host cannot contain {c:?}"), text));
    }
    Ok(ascii)
}

/// An IPv6 literal with an optional zone (`fe80::1%25eth0`): the address and the zone's
/// interface index (0 without a zone).
fn ipv6_literal(literal: &str, text: &str) -> Result<(Ipv6Addr, u32), Error> {
    let (address, zone) = match literal.split_once('%') {
        Some((address, zone)) => (address, Some(zone)),
        None => (literal, None),
    };
    let address: Ipv6Addr = address
        .parse()
        .map_err(|_| bad(&format!("[{literal}] is not an IPv6 address (IPvFuture is not supported)"), text))?;
    let Some(zone) = zone else { return Ok((address, 0)) };
    // RFC 6874: the '%' is itself percent-encoded ("%25"), then the zone's characters.
    let zone = zone
        .strip_prefix("25")
        .ok_or_else(|| bad("a zone identifier follows \"%25\" in a URI (RFC 6874: [fe80::1%25eth0])", text))?;
    let zone = percent_encoding::percent_decode_str(zone)
        .decode_utf8()
        .map_err(|_| bad("the zone identifier is not UTF-8", text))?;
    Ok((address, zone_index(&zone).ok_or_else(|| bad(&format!("no network interface {zone:?} here"), text))?))
}

/// The interface index of a zone: a number, or an interface's name.
fn zone_index(zone: &str) -> Option<u32> {
    if let Ok(index) = zone.parse::<u32>() {
        let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
        let exists = index > 0 && !unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null();
        return exists.then_some(index);
    }
    let name = std::ffi::CString::new(zone).ok()?;
    // SAFETY: a NUL-terminated string; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index > 0).then_some(index)
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
    // `zone`: Some for an IPv6 literal.
    let (host, port, zone) = if let Some(inside) = authority.strip_prefix('[') {
        let Some((literal, after)) = inside.split_once(']') else {
            return Err(bad("an IPv6 address must end with ']'", text));
        };
        let (address, zone) = ipv6_literal(literal, text)?;
        let port = match after {
            "" => None,
            _ => Some(
                after.strip_prefix(':').ok_or_else(|| bad("only a port (:port) can follow an IPv6 address", text))?,
            ),
        };
        (address.to_string(), port, Some(zone))
    } else {
        if authority.matches(':').count() > 1 {
            return Err(bad("the host cannot contain ':' (an IPv6 address goes in brackets: ws://[::1]:port/)", text));
        }
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        (host_name(host, text)?, port, None)
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
    let mut host_header = if zone.is_some() { format!("[{host}]") } else { host.clone() };
    if port != default_port {
        host_header.push_str(&format!(":{port}"));
    }
    Ok(Target { tls, host, port, resource: resource(path_and_query), host_header, zone: zone.unwrap_or(0) })
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
                zone: 0,
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
                zone: 0,
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
            "ws://[fe80::1%25no-such-interface]/",
            "ws://[fe80::1%eth0]/",
            "ws://[fe80::1%25]/",
            "ws://[v1.fe80::1]/",
            "ws://a,b/",
            "ws://a;b/",
            "ws://a!b/",
            "ws://xn--a.example%00/",
            "ws://%ff.example/",
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
    fn internationalised_names_go_out_in_their_ascii_form() {
        for (uri, host, host_header) in [
            ("ws://b\u{fc}cher.example/", "xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("wss://B\u{dc}CHER.example:8443/", "xn--bcher-kva.example", "xn--bcher-kva.example:8443"),
            ("ws://b%C3%BCcher.example/", "xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("ws://\u{4f8b}\u{3048}.\u{30c6}\u{30b9}\u{30c8}/", "xn--r8jz45g.xn--zckzah", "xn--r8jz45g.xn--zckzah"),
            ("ws://faß.de/", "xn--fa-hia.de", "xn--fa-hia.de"),
            ("ws://example\u{3002}com/", "example.com", "example.com"),
            // RFC 3986 3.2.2: a registered name may be percent-encoded; decoded, as browsers do.
            ("ws://ho%41st/", "hoast", "hoast"),
        ] {
            let t = parse(uri).unwrap_or_else(|e| panic!("{uri}: {}", e.message));
            assert_eq!((t.host.as_str(), t.host_header.as_str()), (host, host_header), "{uri}");
        }
    }

    #[test]
    fn zone_identifiers_choose_the_interface_and_stay_out_of_the_host_header() {
        let lo = zone_index("lo").expect("a loopback interface named lo");
        let t = parse("ws://[fe80::1%25lo]:9000/").unwrap();
        assert_eq!((t.host.as_str(), t.zone, t.host_header.as_str()), ("fe80::1", lo, "[fe80::1]:9000"));
        assert_eq!(parse(&format!("ws://[fe80::1%25{lo}]/")).unwrap().zone, lo);
        assert_eq!(parse("ws://[::1]/").unwrap().zone, 0);
        assert!(parse("ws://[fe80::1%25999999]/").is_err(), "a number naming no interface");
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(refused("ws://host:0/"), "the port must be a number from 1 to 65535");
        assert_eq!(refused("relative/path"), "it is not absolute (ws://host/... or wss://host/...)");
        assert_eq!(refused("http://x/"), "the scheme is http:, not ws: or wss:");
        assert!(refused("ws://user@host/").contains("user information"));
        assert!(refused("ws://host/#f").contains("fragment"));
        assert!(refused("ws://[::1/").contains("IPv6"));
        assert!(refused("ws://[fe80::1%25nope0]/").contains("no network interface \"nope0\""));
        assert!(refused("ws://[fe80::1%lo]/").contains("%25"));
        assert!(refused("ws://a,b/").contains("','"));
    }
}
