//! Proxies: which one a connection goes through (`choice`), and the tunnel through it to the
//! server: HTTP `CONNECT` (`http_connect`) or SOCKS5 (`socks5`). Once the tunnel is open the
//! connection proceeds as if connected directly: TLS to the server inside it for wss, then the
//! upgrade.

pub(crate) mod choice;
mod http_connect;
mod socks5;

use tokio::net::TcpStream;

pub(crate) use choice::{Proxy, ProxyKind, ProxySetting};

use crate::error::{Error, WsStatus};

/// A TCP connection to `host:port` through `proxy`, ready for TLS or the upgrade.
/// `connect_tcp` connects to the proxy itself.
pub(crate) async fn tunnel<F, Fut>(proxy: &Proxy, host: &str, port: u16, connect_tcp: F) -> Result<TcpStream, Error>
where
    F: FnOnce(String, u16) -> Fut,
    Fut: std::future::Future<Output = Result<TcpStream, Error>>,
{
    let mut stream = connect_tcp(proxy.host.clone(), proxy.port).await.map_err(|e| {
        // The proxy could not be reached: the host's proxy setting is what to look at.
        Error::new(WsStatus::Proxy, format!("proxy {}: {}", proxy.shown(), e.message))
    })?;
    match proxy.kind {
        ProxyKind::HttpConnect => http_connect::open(&mut stream, proxy, host, port).await?,
        ProxyKind::Socks5 { remote_dns } => socks5::open(&mut stream, proxy, host, port, remote_dns).await?,
    }
    Ok(stream)
}

/// `host:port` as a request names it (an IPv6 literal in brackets).
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An I/O error while talking to the proxy.
fn lost(proxy: &Proxy, e: std::io::Error) -> Error {
    let what = match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "closed the connection".to_owned(),
        _ => format!("connection failed: {e}"),
    };
    Error::new(WsStatus::Proxy, format!("proxy {}: {what}", proxy.shown()))
}
