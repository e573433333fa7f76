//! TCP connections to a host name with several addresses: Happy Eyeballs (RFC 8305). The
//! addresses are tried in the resolver's order (RFC 6724), the two families interleaved; the
//! next attempt starts when the previous one fails, or after `ATTEMPT_DELAY` without an answer,
//! the first to connect wins and the others are dropped. So an address that swallows SYNs costs
//! 250 ms, not the whole connect timeout.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpStream;

use super::resolve;
use crate::error::{Error, WsStatus};

/// RFC 8305 5: "Connection Attempt Delay", 250 ms recommended.
pub(crate) const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// A TCP connection to `host:port` (a name or an IP literal), with TCP_NODELAY. `zone`: the
/// interface of an IPv6 literal with a zone identifier (0: none).
pub(crate) async fn connect(host: &str, port: u16, zone: u32) -> Result<TcpStream, Error> {
    let mut addrs = resolve::lookup(host, port)
        .await
        .map_err(|e| Error::new(WsStatus::Dns, format!("DNS: cannot resolve {host}: {e}")))?;
    if zone != 0 {
        for addr in &mut addrs {
            if let SocketAddr::V6(v6) = addr {
                v6.set_scope_id(zone);
            }
        }
    }
    if addrs.is_empty() {
        return Err(Error::new(WsStatus::Dns, format!("DNS: {host} has no address")));
    }
    match race(interleave(addrs), ATTEMPT_DELAY).await {
        Ok(stream) => {
            // Small messages go out at once; batching is done above the socket.
            let _ = stream.set_nodelay(true);
            crate::wire::no_sigpipe(&stream);
            Ok(stream)
        }
        Err((addr, e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(Error::new(WsStatus::ConnectFailed, format!("connection refused by {addr}")))
        }
        Err((addr, e)) => Err(Error::new(WsStatus::ConnectFailed, format!("cannot connect to {addr}: {e}"))),
    }
}

/// The addresses in the order to try them: the first one's family first, then alternating
/// families (RFC 8305 4), each family in the resolver's order.
pub(crate) fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else { return addrs };
    let preferred_v6 = first.is_ipv6();
    let (mut preferred, mut other): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv6() == preferred_v6);
    preferred.reverse();
    other.reverse();
    let mut ordered = Vec::with_capacity(preferred.len() + other.len());
    while !preferred.is_empty() || !other.is_empty() {
        ordered.extend(preferred.pop());
        ordered.extend(other.pop());
    }
    ordered
}

/// Connects to the first address that answers, starting the next attempt when one fails or
/// after `delay` without an answer. The error is the last attempt's.
async fn race(addrs: Vec<SocketAddr>, delay: Duration) -> Result<TcpStream, (SocketAddr, io::Error)> {
    let mut waiting = addrs.into_iter();
    let mut attempts = FuturesUnordered::new();
    let attempt = |addr: SocketAddr| async move { TcpStream::connect(addr).await.map_err(|e| (addr, e)) };
    let mut last_failure = None;
    if let Some(addr) = waiting.next() {
        attempts.push(attempt(addr));
    }
    loop {
        let more = waiting.len() > 0;
        tokio::select! {
            outcome = attempts.next(), if !attempts.is_empty() => match outcome {
                Some(Ok(stream)) => return Ok(stream),
                Some(Err(failure)) => {
                    last_failure = Some(failure);
                    match waiting.next() {
                        Some(addr) => attempts.push(attempt(addr)),
                        None if attempts.is_empty() => break,
                        None => {}
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep(delay), if more => {
                attempts.extend(waiting.next().map(attempt));
            }
            else => break,
        }
    }
    Err(last_failure.unwrap_or_else(|| {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        (unspecified, io::Error::new(io::ErrorKind::NotFound, "no address to connect to"))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_starting_with_the_first() {
        let v6 = |i: u8| a(&format!("[2001:db8::{i}]:80"));
        let v4 = |i: u8| a(&format!("192.0.2.{i}:80"));
        assert_eq!(interleave(vec![v6(1), v6(2), v6(3), v4(1), v4(2)]), [v6(1), v4(1), v6(2), v4(2), v6(3)]);
        assert_eq!(interleave(vec![v4(1), v6(1), v6(2)]), [v4(1), v6(1), v6(2)]);
        assert_eq!(interleave(vec![v4(2), v4(1)]), [v4(2), v4(1)]);
        assert_eq!(interleave(vec![]), Vec::<SocketAddr>::new());
    }

    #[tokio::test]
    async fn a_refused_address_moves_on_at_once_and_the_last_error_is_reported() {
        let closed = |_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (first, second) = (closed(0), closed(1));
        let started = std::time::Instant::now();
        // A delay far longer than the test: moving on must not wait for it.
        let (addr, e) = race(vec![first, second], Duration::from_secs(60)).await.unwrap_err();
        assert_eq!((addr, e.kind()), (second, io::ErrorKind::ConnectionRefused));
        assert!(started.elapsed() < Duration::from_secs(30));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let stream = race(vec![closed(2), open], Duration::from_secs(60)).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), open);
    }
}
