//! Following a redirect of the upgrade request (301, 302, 307, 308), when the options allow it
//! (`ws_options_set_follow_redirects`; off by default, as browsers' WebSocket never follows).
//!
//! The Location may be absolute (`ws:`, `wss:`, or `http:`/`https:`, taken as `ws:`/`wss:`, as
//! servers that share a path with HTTP send them), network-path (`//host/...`), absolute-path
//! (`/...`) or relative to the current path. From `wss:` to `ws:` is refused: the connection
//! would lose its encryption. The upgrade's Authorization and Cookie headers go only to the
//! origin they were given for (same scheme, host and port), as curl does.

use crate::error::{Error, WsStatus};
use crate::uri::{self, Target};

/// The most redirects a connection may follow (curl's default limit).
pub(crate) const MAX_REDIRECTS: u32 = 30;

/// Headers that carry credentials: dropped when a redirect leaves the origin.
pub(crate) const CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "cookie"];

fn refused(why: String) -> Error {
    Error::new(WsStatus::HandshakeRejected, format!("handshake rejected: {why}"))
}

/// Where a redirect from `current` to `location` leads (RFC 3986 5.2: references resolved,
/// dot segments removed; a fragment, which a Location may carry, is not sent).
pub(crate) fn next_target(current: &Target, location: &str) -> Result<Target, Error> {
    let location = location.split('#').next().unwrap_or("");
    let scheme = if current.tls { "wss" } else { "ws" };
    let current_path = current.resource.split('?').next().unwrap_or("/");
    // (scheme, authority, path and query) of the target.
    let (scheme, authority, path_and_query) =
        if let Some((given, rest)) = location.split_once("://").filter(|(s, _)| is_scheme(s)) {
            let mapped = match given.to_ascii_lowercase().as_str() {
                "ws" | "http" => "ws",
                "wss" | "https" => "wss",
                other => return Err(refused(format!("a redirect to a {other}: URI ({location:?})"))),
            };
            let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
            (mapped, authority, path.to_owned())
        } else if let Some(rest) = location.strip_prefix("//") {
            let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
            (scheme, authority, path.to_owned())
        } else if location.starts_with('/') {
            (scheme, current.host_header.as_str(), location.to_owned())
        } else if location.starts_with('?') {
            (scheme, current.host_header.as_str(), format!("{current_path}{location}"))
        } else if location.is_empty() {
            (scheme, current.host_header.as_str(), current.resource.clone())
        } else {
            let directory = &current_path[..current_path.rfind('/').map_or(0, |i| i + 1)];
            (scheme, current.host_header.as_str(), format!("{directory}{location}"))
        };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query.as_str(), None),
    };
    let mut absolute = format!("{scheme}://{authority}{}", remove_dot_segments(path));
    if let Some(query) = query {
        absolute.push('?');
        absolute.push_str(query);
    }
    let mut next =
        uri::parse(&absolute).map_err(|e| refused(format!("a redirect to an invalid URI: {}", e.message)))?;
    if current.tls && !next.tls {
        return Err(refused(format!("a redirect from wss: to ws: ({location:?}) would drop the encryption")));
    }
    // The zone of an IPv6 literal carries over to the same address (a Location cannot name one).
    if next.host == current.host {
        next.zone = current.zone;
    }
    Ok(next)
}

/// Whether the credentials given for `from` may go to `to`.
pub(crate) fn same_origin(from: &Target, to: &Target) -> bool {
    (from.tls, &from.host, from.port) == (to.tls, &to.host, to.port)
}

/// RFC 3986 5.2.4: `.` and `..` segments removed from a path.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." | ".." => {
                if *segment == ".." && output.len() > 1 {
                    output.pop();
                }
                // A path that ends in a dot segment names a directory: keep its final '/'.
                if last {
                    output.push("");
                }
            }
            other => output.push(other),
        }
    }
    let joined = output.join("/");
    if path.starts_with('/') && !joined.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(uri: &str, location: &str) -> Result<String, String> {
        let current = uri::parse(uri).unwrap();
        next_target(&current, location)
            .map(|t| format!("{}://{}{}", if t.tls { "wss" } else { "ws" }, t.host_header, t.resource))
            .map_err(|e| e.message)
    }

    #[test]
    fn locations_resolve_against_the_current_uri() {
        let ok = |uri, location, expected: &str| assert_eq!(from(uri, location).as_deref(), Ok(expected), "{location}");
        ok("ws://a.example/x/y?q", "ws://b.example:81/z", "ws://b.example:81/z");
        ok("ws://a.example/x/y", "http://b.example/z", "ws://b.example/z");
        ok("wss://a.example/x/y", "https://b.example/z", "wss://b.example/z");
        ok("ws://a.example/x/y", "wss://b.example/z", "wss://b.example/z");
        ok("wss://a.example:8443/x", "//b.example/z", "wss://b.example/z");
        ok("ws://a.example:8080/x/y?q", "/z?r", "ws://a.example:8080/z?r");
        ok("ws://a.example/x/y?q=/w", "z", "ws://a.example/x/z");
        ok("ws://a.example", "z", "ws://a.example/z");
        ok("ws://[::1]:9/x", "/y", "ws://[::1]:9/y");
        // RFC 3986 5.4's examples, from ws://a/b/c/d;p?q.
        let base = "ws://a/b/c/d;p?q";
        for (reference, expected) in [
            ("g", "ws://a/b/c/g"),
            ("./g", "ws://a/b/c/g"),
            ("g/", "ws://a/b/c/g/"),
            ("/g", "ws://a/g"),
            ("?y", "ws://a/b/c/d;p?y"),
            ("g?y", "ws://a/b/c/g?y"),
            ("#s", "ws://a/b/c/d;p?q"),
            ("g#s", "ws://a/b/c/g"),
            ("", "ws://a/b/c/d;p?q"),
            (".", "ws://a/b/c/"),
            ("./", "ws://a/b/c/"),
            ("..", "ws://a/b/"),
            ("../", "ws://a/b/"),
            ("../g", "ws://a/b/g"),
            ("../..", "ws://a/"),
            ("../../g", "ws://a/g"),
            ("../../../g", "ws://a/g"),
            ("/./g", "ws://a/g"),
            ("/../g", "ws://a/g"),
            ("g.", "ws://a/b/c/g."),
            ("..g", "ws://a/b/c/..g"),
            ("./../g", "ws://a/b/g"),
            ("g/./h", "ws://a/b/c/g/h"),
            ("g/../h", "ws://a/b/c/h"),
            ("ws://x/p/../q", "ws://x/q"),
        ] {
            ok(base, reference, expected);
        }
    }

    #[test]
    fn unsafe_or_invalid_locations_are_refused() {
        for (uri, location, why) in [
            ("wss://a.example/", "ws://a.example/", "drop the encryption"),
            ("wss://a.example/", "http://a.example/", "drop the encryption"),
            ("ws://a.example/", "ftp://a.example/", "ftp:"),
            ("ws://a.example/", "ws://", "invalid URI"),
            ("ws://a.example/", "ws://a b/", "invalid URI"),
        ] {
            let message = from(uri, location).unwrap_err();
            assert!(message.contains(why), "{location}: {message}");
        }
    }

    #[test]
    fn the_origin_is_scheme_host_and_port() {
        let t = |u| uri::parse(u).unwrap();
        assert!(same_origin(&t("ws://a.example/x"), &t("ws://A.example:80/y")));
        assert!(!same_origin(&t("ws://a.example/"), &t("ws://b.example/")));
        assert!(!same_origin(&t("ws://a.example/"), &t("ws://a.example:81/")));
        assert!(!same_origin(&t("ws://a.example/"), &t("wss://a.example:80/")));
    }
}
