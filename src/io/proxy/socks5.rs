//! A SOCKS5 tunnel (RFC 1928), with user name and password (RFC 1929) when the proxy URL has
//! them. `socks5://` sends the address the library resolved; `socks5h://` sends the name.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{lost, Proxy};
use crate::error::{Error, WsStatus};
use crate::io::resolve;

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0;
const USER_PASSWORD: u8 = 2;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
const IPV4: u8 = 1;
const DOMAIN: u8 = 3;
const IPV6: u8 = 4;

pub(super) async fn open(
    stream: &mut TcpStream,
    proxy: &Proxy,
    host: &str,
    port: u16,
    remote_dns: bool,
) -> Result<(), Error> {
    let destination = destination(host, port, remote_dns, proxy).await?;
    authenticate(stream, proxy).await?;
    let mut request = vec![VERSION, CONNECT, 0];
    request.extend_from_slice(&destination);
    stream.write_all(&request).await.map_err(|e| lost(proxy, e))?;
    read_reply(stream, proxy, host, port).await?;
    if bytes_waiting(stream) {
        // The server behind the tunnel speaks only after the client: these are the proxy's.
        let msg = format!("proxy {}: bytes followed its SOCKS5 reply", proxy.shown());
        return Err(Error::new(WsStatus::Proxy, msg));
    }
    Ok(())
}

/// Whether bytes already wait to be read (without reading them or waiting).
fn bytes_waiting(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a valid socket and a one-byte buffer; MSG_PEEK leaves the byte in the socket.
    let n = unsafe {
        libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    n > 0
}

/// The destination as the request carries it: an address (resolved here) or a name.
async fn destination(host: &str, port: u16, remote_dns: bool, proxy: &Proxy) -> Result<Vec<u8>, Error> {
    let address = match host.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) if remote_dns => None,
        Err(_) => {
            let addrs = resolve::lookup(host, port)
                .await
                .map_err(|e| Error::new(WsStatus::Dns, format!("DNS: cannot resolve {host}: {e}")))?;
            let first = addrs.first().map(SocketAddr::ip);
            Some(first.ok_or_else(|| Error::new(WsStatus::Dns, format!("DNS: {host} has no address")))?)
        }
    };
    let mut out = Vec::with_capacity(4 + host.len() + 2);
    match address {
        Some(IpAddr::V4(v4)) => {
            out.push(IPV4);
            out.extend_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            out.push(IPV6);
            out.extend_from_slice(&v6.octets());
        }
        None => {
            let len = u8::try_from(host.len()).map_err(|_| {
                let msg = format!("proxy {}: the host name {host} is too long for SOCKS5 (255 bytes)", proxy.shown());
                Error::new(WsStatus::Proxy, msg)
            })?;
            out.push(DOMAIN);
            out.push(len);
            out.extend_from_slice(host.as_bytes());
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
    Ok(out)
}

async fn authenticate(stream: &mut TcpStream, proxy: &Proxy) -> Result<(), Error> {
    let greeting: &[u8] = match proxy.credentials {
        Some(_) => &[VERSION, 2, NO_AUTHENTICATION, USER_PASSWORD],
        None => &[VERSION, 1, NO_AUTHENTICATION],
    };
    stream.write_all(greeting).await.map_err(|e| lost(proxy, e))?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.map_err(|e| lost(proxy, e))?;
    let error = |status, why: &str| Err(Error::new(status, format!("proxy {}: {why}", proxy.shown())));
    match (choice, &proxy.credentials) {
        ([VERSION, NO_AUTHENTICATION], _) => Ok(()),
        ([VERSION, USER_PASSWORD], Some((user, password))) => user_password(stream, proxy, user, password).await,
        ([VERSION, NO_ACCEPTABLE_METHOD], None) => {
            error(WsStatus::ProxyAuth, "the SOCKS5 proxy requires a user name and password")
        }
        ([VERSION, NO_ACCEPTABLE_METHOD], Some(_)) => {
            error(WsStatus::ProxyAuth, "the SOCKS5 proxy accepts neither no authentication nor a password")
        }
        ([VERSION, _], _) => error(WsStatus::Proxy, "the SOCKS5 proxy chose a method that was not offered"),
        _ => error(WsStatus::Proxy, "not a SOCKS5 proxy (its answer is not SOCKS version 5)"),
    }
}

async fn user_password(stream: &mut TcpStream, proxy: &Proxy, user: &str, password: &str) -> Result<(), Error> {
    let too_long =
        |what| Error::new(WsStatus::ProxyAuth, format!("proxy {}: the {what} exceeds 255 bytes", proxy.shown()));
    let user_len = u8::try_from(user.len()).map_err(|_| too_long("user name"))?;
    let password_len = u8::try_from(password.len()).map_err(|_| too_long("password"))?;
    let mut message = vec![1, user_len];
    message.extend_from_slice(user.as_bytes());
    message.push(password_len);
    message.extend_from_slice(password.as_bytes());
    stream.write_all(&message).await.map_err(|e| lost(proxy, e))?;
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply).await.map_err(|e| lost(proxy, e))?;
    if reply[1] != 0 {
        let msg = format!("proxy {}: the SOCKS5 proxy refused the user name and password", proxy.shown());
        return Err(Error::new(WsStatus::ProxyAuth, msg));
    }
    Ok(())
}

async fn read_reply(stream: &mut TcpStream, proxy: &Proxy, host: &str, port: u16) -> Result<(), Error> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.map_err(|e| lost(proxy, e))?;
    if head[0] != VERSION {
        let msg = format!("proxy {}: not a SOCKS5 reply", proxy.shown());
        return Err(Error::new(WsStatus::Proxy, msg));
    }
    if head[1] != 0 {
        return Err(refused(head[1], proxy, host, port));
    }
    // The address the proxy bound, then its port: read and not needed.
    let address_len = match head[3] {
        IPV4 => 4,
        IPV6 => 16,
        DOMAIN => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await.map_err(|e| lost(proxy, e))?;
            usize::from(len[0])
        }
        other => {
            let msg = format!("proxy {}: SOCKS5 reply with unknown address type {other}", proxy.shown());
            return Err(Error::new(WsStatus::Proxy, msg));
        }
    };
    let mut rest = vec![0u8; address_len + 2];
    stream.read_exact(&mut rest).await.map_err(|e| lost(proxy, e))?;
    Ok(())
}

/// A SOCKS5 reply code other than success. Where the proxy says the server could not be
/// reached, the status is the one a direct connection would have had (the server is what to
/// look at); the proxy's own refusals are `Proxy`.
fn refused(code: u8, proxy: &Proxy, host: &str, port: u16) -> Error {
    let (status, what) = match code {
        1 => (WsStatus::Proxy, "general SOCKS server failure"),
        2 => (WsStatus::Proxy, "connection not allowed by ruleset"),
        3 => (WsStatus::ConnectFailed, "network unreachable"),
        4 => (WsStatus::ConnectFailed, "host unreachable"),
        5 => (WsStatus::ConnectFailed, "connection refused"),
        6 => (WsStatus::ConnectFailed, "TTL expired"),
        7 => (WsStatus::Proxy, "command not supported"),
        8 => (WsStatus::Proxy, "address type not supported"),
        _ => (WsStatus::Proxy, "unknown reply"),
    };
    let target = super::authority(host, port);
    Error::new(status, format!("proxy {} could not connect to {target}: {what} (SOCKS5 reply {code})", proxy.shown()))
}
