//! Which proxy a connection goes through: the one the options name, else the one the
//! environment names, following curl's conventions, which C users already know:
//!
//! - `ws://` looks at `ws_proxy`, then `http_proxy`; `wss://` at `wss_proxy`, then
//!   `https_proxy`; both then at `all_proxy`. For each name the lowercase variable wins over the
//!   uppercase one; an empty variable counts as unset. Uppercase `HTTP_PROXY` is ignored when
//!   `REQUEST_METHOD` is set (a CGI script, whose `HTTP_*` variables come from the request:
//!   the "httpoxy" attack).
//! - `no_proxy` (or `NO_PROXY`): a list separated by commas or spaces. `*` alone matches every
//!   host; a name matches itself and its subdomains on a label boundary (`example.com` and
//!   `.example.com` both match `example.com` and `a.example.com`, not `badexample.com`); an IP
//!   address matches itself; `10.0.0.0/8` or `fd00::/8` match the addresses in the range; any
//!   entry may end with `:port` (`[::1]:8080` for IPv6) to match that port only. Names compare
//!   without case and without a trailing dot. Names are not resolved to compare with addresses.

use std::net::IpAddr;

use percent_encoding::percent_decode_str;

use crate::error::{Error, WsStatus};

/// How the proxy reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyKind {
    /// HTTP `CONNECT` (RFC 9110 9.3.6), then TLS to the server inside the tunnel for wss.
    HttpConnect,
    /// SOCKS5 (RFC 1928). `remote_dns`: the proxy resolves the host name (`socks5h://`);
    /// otherwise the library resolves it and sends the address (`socks5://`).
    Socks5 { remote_dns: bool },
}

/// A proxy, from its URL: `[scheme://][user[:password]@]host[:port][/]`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Proxy {
    pub kind: ProxyKind,
    /// A name (lower case) or an IP address, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// User name and password, percent-decoded.
    pub credentials: Option<(String, String)>,
}

impl Proxy {
    /// The proxy as errors name it: its URL without the password.
    pub fn shown(&self) -> String {
        let scheme = match self.kind {
            ProxyKind::HttpConnect => "http",
            ProxyKind::Socks5 { remote_dns: false } => "socks5",
            ProxyKind::Socks5 { remote_dns: true } => "socks5h",
        };
        // Escaped: a decoded user name may hold line breaks that would forge log lines.
        let user = self.credentials.as_ref().map(|(user, _)| format!("{}@", user.escape_debug())).unwrap_or_default();
        format!("{scheme}://{user}{}:{}", bracketed(&self.host), self.port)
    }
}

impl std::fmt::Debug for Proxy {
    // Never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The port of a proxy URL without one: 1080 for every scheme, as curl assumes.
pub(crate) const DEFAULT_PROXY_PORT: u16 = 1080;

/// What the options say about proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum ProxySetting {
    /// Whatever the environment says when the connection starts (the default).
    #[default]
    Environment,
    /// No proxy, whatever the environment says (`ws_options_set_proxy(options, "")`).
    Direct,
    Through(Proxy),
}

/// The setting `ws_options_set_proxy` makes of its argument.
pub(crate) fn setting(url: &str) -> Result<ProxySetting, Error> {
    if url.is_empty() {
        return Ok(ProxySetting::Direct);
    }
    parse(url).map(ProxySetting::Through).map_err(|why| Error::new(WsStatus::InvalidArgument, why))
}

/// The environment's proxy variables, read once when a connection starts: `choose` is asked
/// again at each redirect, and must see the environment the connection started with.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProxyEnvironment(Vec<(&'static str, String)>);

impl ProxyEnvironment {
    const NAMES: [&'static str; 13] = [
        "ws_proxy",
        "wss_proxy",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "WS_PROXY",
        "WSS_PROXY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "REQUEST_METHOD",
    ];

    /// The process's environment now. A variable that is not UTF-8 is an error naming it (it
    /// cannot be a valid proxy URL or list, and ignoring it would bypass the proxy).
    pub fn of_process() -> Result<ProxyEnvironment, Error> {
        let mut found = Vec::new();
        for name in Self::NAMES {
            let Some(value) = std::env::var_os(name) else { continue };
            match value.into_string() {
                Ok(value) => found.push((name, value)),
                // Only its presence matters.
                Err(_) if name == "REQUEST_METHOD" => found.push((name, String::new())),
                Err(_) => {
                    let msg = format!("environment variable {name} is not UTF-8");
                    return Err(Error::new(WsStatus::InvalidArgument, msg));
                }
            }
        }
        Ok(ProxyEnvironment(found))
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, value)| value.clone())
    }
}

/// The proxy for a connection to `host:port` (`tls`: wss), or `None` to connect directly.
/// `env` reads an environment variable; an invalid proxy URL in the environment is an error
/// that names the variable.
pub(crate) fn choose(
    setting: &ProxySetting,
    env: &dyn Fn(&str) -> Option<String>,
    tls: bool,
    host: &str,
    port: u16,
) -> Result<Option<Proxy>, Error> {
    match setting {
        ProxySetting::Direct => Ok(None),
        ProxySetting::Through(proxy) => Ok(Some(proxy.clone())),
        ProxySetting::Environment => {
            let Some((name, url)) = proxy_variable(env, tls) else { return Ok(None) };
            let no_proxy = variable(env, "no_proxy", false).map(|(_, list)| list).unwrap_or_default();
            if bypasses(&no_proxy, host, port) {
                return Ok(None);
            }
            parse(&url)
                .map(Some)
                .map_err(|why| Error::new(WsStatus::InvalidArgument, format!("environment variable {name}: {why}")))
        }
    }
}

/// The variable that names the proxy, and its value.
fn proxy_variable(env: &dyn Fn(&str) -> Option<String>, tls: bool) -> Option<(String, String)> {
    let cgi = env("REQUEST_METHOD").is_some();
    let names: [&str; 3] =
        if tls { ["wss_proxy", "https_proxy", "all_proxy"] } else { ["ws_proxy", "http_proxy", "all_proxy"] };
    names.iter().find_map(|name| variable(env, name, cgi && *name == "http_proxy"))
}

/// `name` in lower case, else in upper case (unless `no_upper`); empty counts as unset.
fn variable(env: &dyn Fn(&str) -> Option<String>, name: &str, no_upper: bool) -> Option<(String, String)> {
    let upper = name.to_ascii_uppercase();
    let candidates = if no_upper { vec![name.to_owned()] } else { vec![name.to_owned(), upper] };
    candidates.into_iter().find_map(|n| env(&n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
}

/// Parses a proxy URL; the error says what is wrong with it (never echoing a password).
pub(crate) fn parse(url: &str) -> Result<Proxy, String> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("http".to_owned(), url),
    };
    let kind = match scheme.as_str() {
        "http" => ProxyKind::HttpConnect,
        "socks5" => ProxyKind::Socks5 { remote_dns: false },
        "socks5h" => ProxyKind::Socks5 { remote_dns: true },
        other => {
            return Err(format!("proxy scheme {other:?} is not supported (http://, socks5:// and socks5h:// are)"))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("a proxy URL has no path, query or fragment".into());
    }
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let credentials = userinfo.map(decode_credentials).transpose()?;
    let (host, port) =
        split_host_port(hostport).ok_or_else(|| format!("the proxy's host and port in {hostport:?} are not valid"))?;
    if host.is_empty() {
        return Err("the proxy URL has no host".into());
    }
    let port = port.unwrap_or(DEFAULT_PROXY_PORT);
    Ok(Proxy { kind, host: host.to_ascii_lowercase(), port, credentials })
}

fn decode_credentials(userinfo: &str) -> Result<(String, String), String> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |part: &str, what: &str| {
        percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| format!("the proxy {what} is not UTF-8 once percent-decoded"))
    };
    Ok((decode(user, "user name")?, decode(password, "password")?))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; `None` when malformed. The port is 1 to 65535.
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        match after {
            "" => (v6, None),
            _ => (v6, Some(after.strip_prefix(':')?)),
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            Some(_) => return None, // an IPv6 address without brackets
            None => (text, None),
        }
    };
    let valid_host = host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0)?),
    };
    valid_host.then_some((host, port))
}

/// Whether `no_proxy` says to connect to `host:port` directly.
pub(crate) fn bypasses(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let address = host.parse::<IpAddr>().ok();
    no_proxy.split([',', ' ', '\t']).map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        let Some((pattern, entry_port)) = split_entry(entry) else { return false };
        if entry_port.is_some_and(|p| p != port) {
            return false;
        }
        match address {
            Some(address) => address_matches(pattern, address),
            None => name_matches(pattern, &host),
        }
    })
}

/// An entry's pattern and its port, if it has one.
fn split_entry(entry: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((inside, port));
    }
    // A bare IPv6 address or range has several colons: no port then.
    if entry.matches(':').count() > 1 {
        return Some((entry, None));
    }
    match entry.rsplit_once(':') {
        Some((pattern, port)) => Some((pattern, Some(port.parse().ok()?))),
        None => Some((entry, None)),
    }
}

fn name_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_start_matches('.').trim_end_matches('.').to_ascii_lowercase();
    if pattern.is_empty() {
        return false;
    }
    host == pattern || host.strip_suffix(&pattern).is_some_and(|head| head.ends_with('.'))
}

fn address_matches(pattern: &str, address: IpAddr) -> bool {
    let (base, bits) = match pattern.split_once('/') {
        Some((base, bits)) => match bits.parse::<u8>() {
            Ok(bits) => (base, Some(bits)),
            Err(_) => return false,
        },
        None => (pattern, None),
    };
    let Ok(base) = base.parse::<IpAddr>() else { return false };
    match (base, address) {
        (IpAddr::V4(b), IpAddr::V4(a)) => prefix_equal(&b.octets(), &a.octets(), bits.unwrap_or(32)),
        (IpAddr::V6(b), IpAddr::V6(a)) => prefix_equal(&b.octets(), &a.octets(), bits.unwrap_or(128)),
        _ => false,
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal (false when `bits` is too large).
fn prefix_equal(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    if bits > a.len() * 8 {
        return false;
    }
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    fn chosen(pairs: &[(&str, &str)], tls: bool, host: &str, port: u16) -> Option<String> {
        choose(&ProxySetting::Environment, &env_of(pairs), tls, host, port).unwrap().map(|p| p.shown())
    }

    #[test]
    fn each_scheme_looks_at_its_own_variables_then_all_proxy() {
        let env = [("ws_proxy", "http://ws:1"), ("http_proxy", "http://h:2"), ("wss_proxy", "http://wss:3")];
        assert_eq!(chosen(&env, false, "x", 80).as_deref(), Some("http://ws:1"));
        assert_eq!(chosen(&env, true, "x", 443).as_deref(), Some("http://wss:3"));
        assert_eq!(chosen(&env[1..2], false, "x", 80).as_deref(), Some("http://h:2"));
        assert_eq!(chosen(&[("https_proxy", "http://s:4")], true, "x", 443).as_deref(), Some("http://s:4"));
        assert_eq!(chosen(&[("https_proxy", "http://s:4")], false, "x", 80), None, "https_proxy is not for ws");
        assert_eq!(chosen(&[("http_proxy", "http://h:2")], true, "x", 443), None, "http_proxy is not for wss");
        assert_eq!(chosen(&[("ALL_PROXY", "socks5h://a:5")], true, "x", 443).as_deref(), Some("socks5h://a:5"));
        assert_eq!(
            chosen(&[("all_proxy", "socks5://a:5"), ("http_proxy", "http://h:2")], false, "x", 80).as_deref(),
            Some("http://h:2"),
            "the scheme's own variable comes before all_proxy"
        );
        assert_eq!(chosen(&[], false, "x", 80), None);
    }

    #[test]
    fn lowercase_wins_and_empty_counts_as_unset() {
        let env = [("http_proxy", "http://lower:1"), ("HTTP_PROXY", "http://upper:2")];
        assert_eq!(chosen(&env, false, "x", 80).as_deref(), Some("http://lower:1"));
        assert_eq!(chosen(&env[1..], false, "x", 80).as_deref(), Some("http://upper:2"));
        let empty = [("ws_proxy", ""), ("http_proxy", "http://h:2")];
        assert_eq!(chosen(&empty, false, "x", 80).as_deref(), Some("http://h:2"));
        let no_proxy = [("http_proxy", "http://h:2"), ("no_proxy", "other"), ("NO_PROXY", "x")];
        assert_eq!(chosen(&no_proxy, false, "x", 80).as_deref(), Some("http://h:2"), "lowercase no_proxy wins");
        assert_eq!(chosen(&[no_proxy[0], no_proxy[2]], false, "x", 80), None);
    }

    #[test]
    fn uppercase_http_proxy_is_ignored_in_a_cgi_script() {
        let env = [("HTTP_PROXY", "http://evil:1"), ("REQUEST_METHOD", "GET")];
        assert_eq!(chosen(&env, false, "x", 80), None);
        let env = [("http_proxy", "http://ok:1"), ("REQUEST_METHOD", "GET")];
        assert_eq!(chosen(&env, false, "x", 80).as_deref(), Some("http://ok:1"));
        let env = [("HTTPS_PROXY", "http://ok:2"), ("REQUEST_METHOD", "GET")];
        assert_eq!(chosen(&env, true, "x", 443).as_deref(), Some("http://ok:2"), "only HTTP_PROXY is a request header");
    }

    #[test]
    fn the_option_overrides_the_environment() {
        let env = env_of(&[("http_proxy", "http://h:2")]);
        assert_eq!(choose(&setting("").unwrap(), &env, false, "x", 80).unwrap(), None);
        let through = setting("socks5://s:9").unwrap();
        assert_eq!(choose(&through, &env, false, "x", 80).unwrap().unwrap().shown(), "socks5://s:9");
        let env = env_of(&[("no_proxy", "*")]);
        assert!(choose(&through, &env, false, "x", 80).unwrap().is_some(), "no_proxy is for the environment's proxy");
    }

    #[test]
    fn an_invalid_proxy_in_the_environment_names_the_variable() {
        let err =
            choose(&ProxySetting::Environment, &env_of(&[("HTTPS_PROXY", "ftp://p")]), true, "x", 443).unwrap_err();
        assert_eq!(err.status, WsStatus::InvalidArgument);
        assert!(err.message.contains("HTTPS_PROXY") && err.message.contains("ftp"), "{}", err.message);
    }

    #[test]
    fn proxy_urls() {
        let p = parse("proxy.example:3128").unwrap();
        assert_eq!((p.kind, p.host.as_str(), p.port), (ProxyKind::HttpConnect, "proxy.example", 3128));
        assert_eq!(parse("http://P").unwrap().port, DEFAULT_PROXY_PORT);
        assert_eq!(parse("http://p:/").unwrap().port, DEFAULT_PROXY_PORT);
        let p = parse("SOCKS5H://us%40er:p%3Ass@[::1]:1081/").unwrap();
        assert_eq!(p.kind, ProxyKind::Socks5 { remote_dns: true });
        assert_eq!((p.host.as_str(), p.port), ("::1", 1081));
        assert_eq!(p.credentials, Some(("us@er".into(), "p:ss".into())));
        assert_eq!(format!("{p:?}"), "socks5h://us@er@[::1]:1081", "never the password");
        assert_eq!(parse("socks5://u@h:1").unwrap().credentials, Some(("u".into(), "".into())));
        for bad in [
            "https://p:1",
            "socks4://p",
            "http://p:0",
            "http://p:70000",
            "http://p/x",
            "http://",
            "http://::1:80",
            "http://[zz]:1",
            "http://p q",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        assert!(!parse("http://u:secret@p:1").unwrap_err_or_ok().contains("secret"));
    }

    trait ErrOrOk {
        fn unwrap_err_or_ok(self) -> String;
    }
    impl ErrOrOk for Result<Proxy, String> {
        fn unwrap_err_or_ok(self) -> String {
            match self {
                Ok(p) => format!("{p:?}"),
                Err(e) => e,
            }
        }
    }

    #[test]
    fn no_proxy_names_match_on_label_boundaries() {
        for (list, host, expected) in [
            ("example.com", "example.com", true),
            ("example.com", "a.b.example.com", true),
            (".example.com", "example.com", true),
            (".example.com", "a.example.com", true),
            ("example.com", "badexample.com", false),
            ("example.com", "example.com.evil", false),
            ("EXAMPLE.com.", "Example.COM.", true),
            ("a.com, b.com", "x.b.com", true),
            ("a.com b.com", "b.com", true),
            ("localhost", "127.0.0.1", false),
            ("*", "anything", true),
            ("*.example.com", "a.example.com", false),
            ("", "x", false),
            (",,", "x", false),
        ] {
            assert_eq!(bypasses(list, host, 80), expected, "no_proxy={list:?} host={host}");
        }
    }

    #[test]
    fn no_proxy_addresses_ranges_and_ports() {
        for (list, host, port, expected) in [
            ("127.0.0.1", "127.0.0.1", 80, true),
            ("127.0.0.1", "127.0.0.2", 80, false),
            ("127.0.0.0/8", "127.200.1.1", 80, true),
            ("10.0.0.0/8", "11.0.0.1", 80, false),
            ("192.168.1.0/25", "192.168.1.127", 80, true),
            ("192.168.1.0/25", "192.168.1.128", 80, false),
            ("0.0.0.0/0", "8.8.8.8", 80, true),
            ("1.2.3.4/33", "1.2.3.4", 80, false),
            ("::1", "::1", 80, true),
            ("[::1]", "::1", 80, true),
            ("fd00::/8", "fd12::5", 80, true),
            ("fd00::/8", "fe80::1", 80, false),
            ("::ffff:0:0/96", "127.0.0.1", 80, false),
            ("example.com:8080", "example.com", 8080, true),
            ("example.com:8080", "example.com", 80, false),
            ("127.0.0.1:9000", "127.0.0.1", 9000, true),
            ("[::1]:9000", "::1", 9000, true),
            ("[::1]:9000", "::1", 9001, false),
            ("example.com:x", "example.com", 80, false),
        ] {
            assert_eq!(bypasses(list, host, port), expected, "no_proxy={list:?} {host}:{port}");
        }
    }
}
