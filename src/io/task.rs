//! The I/O task of one connection, on the library's tokio threads: connect (DNS, TCP, TLS, HTTP
//! upgrade), run the session until the connection ends, then hand the host exactly one final
//! event.

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures_util::FutureExt;
use rustls_pki_types::ServerName;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::handshake::{self, Upgraded};
use super::resolve;
use super::session;
use super::tls::{self, TlsConfigs};
use crate::conn::{Conn, Control, Event};
use crate::deflate::Agreed;
use crate::error::{Error, WsStatus};
use crate::options::Options;
use crate::uri::Target;
use crate::wire::Wire;

/// Everything a connection task needs.
pub struct Launch {
    pub conn: Arc<Conn>,
    pub target: Target,
    pub options: Arc<Options>,
    pub tls: Arc<TlsConfigs>,
}

/// Runs a connection to its end and queues its final event (none when the client is freed).
pub async fn run(launch: Launch) {
    let conn = launch.conn.clone();
    let outcome = AssertUnwindSafe(drive(launch)).catch_unwind().await;
    let final_event = outcome.unwrap_or_else(|_| {
        Some(Event::Error(Error::new(WsStatus::Internal, "internal error: the connection task panicked")))
    });
    conn.task_ending();
    if let Some(event) = final_event {
        conn.deliver(event);
    }
    conn.hub.task_ended();
}

async fn drive(launch: Launch) -> Option<Event> {
    let Launch { conn, target, options, tls } = launch;
    // Boxed, as is the session below: the task itself stays small, and each phase holds only
    // the memory it needs (the connect machinery is freed once connected).
    let connecting = Box::pin(tokio::time::timeout(options.connect_timeout, connect(&conn, &target, &options, &tls)));
    let until_control = poll_fn(|cx| match conn.control(cx.waker()) {
        Control::Proceed => Poll::Pending,
        other => Poll::Ready(other),
    });
    let connected = tokio::select! {
        biased;
        control = until_control => return match control {
            Control::Shutdown => None,
            _ => Some(Event::close(1006, "closed by the application before the connection opened")),
        },
        connected = connecting => connected,
    };
    let connected = match connected {
        Err(_) => {
            let ms = options.connect_timeout.as_millis();
            let msg = format!("connect timeout: {}:{} not connected within {ms} ms", target.host, target.port);
            return Some(Event::Error(Error::new(WsStatus::ConnectTimeout, msg)));
        }
        Ok(Err(e)) => return Some(Event::Error(e)),
        Ok(Ok(connected)) => connected,
    };
    conn.deliver(Event::Open);
    connected.await
}

/// The session of a connected stream, boxed: the task's own future stays small whatever the
/// stream type (a TLS stream alone is kilobytes).
type SessionFuture = Pin<Box<dyn Future<Output = Option<Event>> + Send>>;

fn session(
    conn: &Arc<Conn>,
    (wire, read): (Wire, OwnedReadHalf),
    upgraded: Upgraded,
    options: &Arc<Options>,
) -> SessionFuture {
    Box::pin(session::serve(conn.clone(), wire, read, upgraded.leftover, options.clone(), upgraded.deflate))
}

async fn connect(
    conn: &Arc<Conn>,
    target: &Target,
    options: &Arc<Options>,
    tls: &TlsConfigs,
) -> Result<SessionFuture, Error> {
    let mut tcp = connect_tcp(&target.host, target.port).await?;
    if !target.tls {
        let upgraded = handshake::upgrade(&mut tcp, target, options).await?;
        conn.set_agreed(upgraded.protocol.clone(), upgraded.deflate.as_ref().map(Agreed::describe));
        return Ok(session(conn, Wire::plain(tcp), upgraded, options));
    }
    let tls_config = tls.get(&options.extra_ca)?;
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| Error::new(WsStatus::Tls, format!("TLS: {} is not a valid server name", target.host)))?;
    let mut stream = TlsConnector::from(tls_config)
        .connect(name, tcp)
        .await
        .map_err(|e| Error::new(WsStatus::Tls, tls::describe_handshake_error(&e, &target.host)))?;
    let upgraded = handshake::upgrade(&mut stream, target, options).await?;
    conn.set_agreed(upgraded.protocol.clone(), upgraded.deflate.as_ref().map(Agreed::describe));
    // From here on the session is shared with the host's thread (see `wire`).
    let (tcp, session_state) = stream.into_inner();
    Ok(session(conn, Wire::tls(tcp, session_state), upgraded, options))
}

async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, Error> {
    let addrs = resolve::lookup(host, port)
        .await
        .map_err(|e| Error::new(WsStatus::Dns, format!("DNS: cannot resolve {host}: {e}")))?;
    let mut last_failure = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Small messages go out at once; batching is done above the socket.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last_failure = Some((addr, e)),
        }
    }
    Err(match last_failure {
        None => Error::new(WsStatus::Dns, format!("DNS: {host} has no address")),
        Some((addr, e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Error::new(WsStatus::ConnectFailed, format!("connection refused by {addr}"))
        }
        Some((addr, e)) => Error::new(WsStatus::ConnectFailed, format!("cannot connect to {addr}: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task holds only what every phase shares; the connect and session phases
    /// are boxed. Thousands of idle connections depend on it (it once was 12.4 KiB).
    #[test]
    fn a_connection_task_stays_small() {
        fn size_of_future<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let hub = Arc::new(crate::host::dispatch::Hub::new().unwrap());
        let conn = Arc::new(Conn::new(1, hub, 1, 1));
        let target = crate::uri::parse("wss://127.0.0.1:1/").unwrap();
        let launch =
            Launch { conn, target, options: Arc::new(Options::default()), tls: Arc::new(TlsConfigs::default()) };
        let size = size_of_future(&run(launch));
        assert!(size <= 1024, "a connection task is {size} bytes");
    }
}
