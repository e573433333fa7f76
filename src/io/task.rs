//! The I/O task of one connection, on the library's tokio threads: connect (DNS, TCP, TLS, HTTP
//! upgrade), run the session until the connection ends, then hand the host exactly one final
//! event.

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures_util::FutureExt;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::eyeballs;
use super::handshake::{self, Answer, Redirect, Upgraded};
use super::proxy::choice::ProxyEnvironment;
use super::proxy::{self, Proxy};
use super::redirect;
use super::session;
use super::tls::{self, TlsConfigs};
use crate::conn::{Conn, Control, Event};
use crate::deflate::Agreed;
use crate::error::{Error, WsStatus};
use crate::options::Options;
use crate::uri::Target;
use crate::wire::{Watch, Wire};

/// Everything a connection task needs.
pub struct Launch {
    pub conn: Arc<Conn>,
    pub target: Target,
    pub options: Arc<Options>,
    pub tls: Arc<TlsConfigs>,
    /// The environment's proxy variables, as they were when the connection started (each
    /// redirect may lead to a host whose proxy differs).
    pub proxy_env: ProxyEnvironment,
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
    let Launch { conn, target, options, tls, proxy_env } = launch;
    // Boxed, as is the session below: the task itself stays small, and each phase holds only
    // the memory it needs (the connect machinery is freed once connected).
    // Where connecting stands (the host, and the proxy if any), for a timeout's message.
    let progress = std::sync::Mutex::new(format!("{}:{}", target.host, target.port));
    let connecting = Box::pin(tokio::time::timeout(
        options.connect_timeout,
        connect(&conn, &target, &options, &tls, &proxy_env, &progress),
    ));
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
            let progress = crate::sync::lock(&progress).clone();
            let msg = format!("connect timeout: {progress} not connected within {ms} ms");
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
    wire: std::io::Result<(Wire, Watch)>,
    upgraded: Upgraded,
    options: &Arc<Options>,
) -> Result<SessionFuture, Error> {
    let (wire, watch) = wire.map_err(|e| {
        Error::new(WsStatus::ConnectionLost, format!("connection lost: the socket could not be watched: {e}"))
    })?;
    Ok(Box::pin(session::serve(conn.clone(), wire, watch, upgraded.leftover, options.clone(), upgraded.deflate)))
}

/// Connects, following redirects as far as the options allow.
async fn connect(
    conn: &Arc<Conn>,
    first: &Target,
    options: &Arc<Options>,
    tls: &TlsConfigs,
    proxy_env: &ProxyEnvironment,
    progress: &std::sync::Mutex<String>,
) -> Result<SessionFuture, Error> {
    let mut target = first.clone();
    // The upgrade's own options: the credentials go only to the origin they were given for.
    let mut upgrade_options = Cow::Borrowed(&**options);
    let mut followed = 0;
    loop {
        let env = |name: &str| proxy_env.get(name);
        // The first host's proxy was checked by ws_connect; a later hop's is a failure of the
        // connection, reported as the proxy's.
        let proxy = proxy::choice::choose(&options.proxy, &env, target.tls, &target.host, target.port)
            .map_err(|e| Error::new(WsStatus::Proxy, e.message))?;
        let via = proxy.as_ref().map(|p| format!(" through proxy {}", p.shown())).unwrap_or_default();
        *crate::sync::lock(progress) = format!("{}:{}{via}", target.host, target.port);
        let redirect = match reach(conn, &target, &upgrade_options, options, tls, proxy.as_ref()).await? {
            Reached::Open(session) => return Ok(session),
            Reached::Redirect(redirect) => redirect,
        };
        if followed == options.max_redirects {
            return Err(match followed {
                0 => redirect.not_followed(),
                n => Error::new(
                    WsStatus::HandshakeRejected,
                    format!(
                        "handshake rejected: too many redirects ({n} followed, the limit), the last to {:?}",
                        redirect.location
                    ),
                ),
            });
        }
        followed += 1;
        let next = redirect::next_target(&target, &redirect.location)?;
        if !redirect::same_origin(&target, &next) {
            let credential = |name: &str| redirect::CREDENTIAL_HEADERS.contains(&name);
            upgrade_options.to_mut().headers.retain(|(name, _)| !credential(name.as_str()));
        }
        target = next;
    }
}

/// Where one attempt to connect ends: an open connection, or a redirect elsewhere.
enum Reached {
    Open(SessionFuture),
    Redirect(Redirect),
}

/// One attempt: TCP (through the proxy, if any), TLS, the upgrade.
async fn reach(
    conn: &Arc<Conn>,
    target: &Target,
    upgrade_options: &Options,
    options: &Arc<Options>,
    tls: &TlsConfigs,
    proxy: Option<&Proxy>,
) -> Result<Reached, Error> {
    let mut tcp = match proxy {
        None => eyeballs::connect(&target.host, target.port, target.zone).await?,
        Some(proxy) => {
            proxy::tunnel(proxy, &target.host, target.port, |host, port| async move {
                eyeballs::connect(&host, port, 0).await
            })
            .await?
        }
    };
    if !target.tls {
        let upgraded = match handshake::upgrade(&mut tcp, target, upgrade_options).await? {
            Answer::Upgraded(upgraded) => upgraded,
            Answer::Redirect(redirect) => return Ok(Reached::Redirect(redirect)),
        };
        conn.set_agreed(upgraded.protocol.clone(), upgraded.deflate.as_ref().map(Agreed::describe));
        return Ok(Reached::Open(session(conn, Wire::plain(tcp), upgraded, options)?));
    }
    let tls_config = tls.get(&options.tls).await?;
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| Error::new(WsStatus::Tls, format!("TLS: {} is not a valid server name", target.host)))?;
    let mut stream = TlsConnector::from(tls_config)
        .connect(name, tcp)
        .await
        .map_err(|e| Error::new(WsStatus::Tls, tls::describe_handshake_error(&e, &target.host)))?;
    let upgraded = match handshake::upgrade(&mut stream, target, upgrade_options).await? {
        Answer::Upgraded(upgraded) => upgraded,
        Answer::Redirect(redirect) => return Ok(Reached::Redirect(redirect)),
    };
    conn.set_agreed(upgraded.protocol.clone(), upgraded.deflate.as_ref().map(Agreed::describe));
    // From here on the session is shared with the host's thread (see `wire`).
    let (tcp, session_state) = stream.into_inner();
    Ok(Reached::Open(session(conn, Wire::tls(tcp, session_state), upgraded, options)?))
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
        let launch = Launch {
            conn,
            target,
            options: Arc::new(Options::default()),
            tls: Arc::new(TlsConfigs::default()),
            proxy_env: Default::default(),
        };
        let size = size_of_future(&run(launch));
        assert!(size <= 1024, "a connection task is {size} bytes");
    }
}
