//! The client context: one per host event loop. It owns the library's I/O threads (a tokio
//! runtime) and the hub through which its connections' events reach the host's thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::error::{Error, WsStatus};
use crate::host::dispatch::Hub;
use crate::host::handles::{self, WsConn};
use crate::io::proxy::{self, choice::ProxyEnvironment, ProxySetting};
use crate::io::task::{self, Launch};
use crate::io::tls::TlsConfigs;
use crate::options::Options;
use crate::uri;

/// I/O threads per client. One thread serves thousands of connections; TLS handshakes are the
/// only CPU-heavy part, and the host's own thread does the callbacks.
const IO_THREADS: usize = 1;
/// The longest ws_client_free takes: its connections' close frames are sent within
/// `SHUTDOWN_CLOSE_WAIT` of it, and the I/O thread stops in what is left.
pub(crate) const FREE_WAIT: Duration = Duration::from_millis(250);

pub struct Client {
    hub: Arc<Hub>,
    runtime: Option<tokio::runtime::Runtime>,
    tls: Arc<TlsConfigs>,
    default_options: Arc<Options>,
}

impl Client {
    pub fn new() -> Result<Client, Error> {
        let hub = Hub::new()
            .map_err(|e| Error::new(WsStatus::Runtime, format!("cannot create the event descriptor: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .thread_name("wsclient-io")
            // Writes on these threads (the upgrade, TLS records) must not raise SIGPIPE when a
            // peer has reset the connection: the error ends the connection, the process lives.
            .on_thread_start(block_sigpipe)
            .enable_all()
            .build()
            .map_err(|e| Error::new(WsStatus::Runtime, format!("cannot start the I/O threads: {e}")))?;
        Ok(Client {
            hub: Arc::new(hub),
            runtime: Some(runtime),
            tls: Arc::new(TlsConfigs::default()),
            default_options: Arc::new(Options::default()),
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Starts a connection and returns its handle at once; everything else happens on the
    /// library's threads and is reported through callbacks.
    pub fn connect(&self, uri: &str, options: Option<&Options>) -> Result<WsConn, Error> {
        let target = uri::parse(uri)?;
        let options = match options {
            Some(o) => Arc::new(o.clone()),
            None => self.default_options.clone(),
        };
        // The environment is read here, on the caller's thread, where a host would change it;
        // an invalid proxy in it fails the connect at once.
        let proxy_env = match options.proxy {
            ProxySetting::Environment => ProxyEnvironment::of_process()?,
            _ => ProxyEnvironment::default(),
        };
        let env = |name: &str| proxy_env.get(name);
        proxy::choice::choose(&options.proxy, &env, target.tls, &target.host, target.port)?;
        let runtime =
            self.runtime.as_ref().ok_or_else(|| Error::new(WsStatus::Runtime, "the client is shutting down"))?;
        let conn = handles::insert(|id| {
            Arc::new(Conn::new(id, self.hub.clone(), options.send_queue_limit, options.receive_queue_limit))
        });
        self.hub.connection_added();
        self.hub.task_started();
        let launch = Launch { conn: conn.clone(), target, options, tls: self.tls.clone(), proxy_env };
        runtime.spawn(task::run(launch));
        Ok(conn.id)
    }

    /// Ends every connection (no more callbacks), stops the threads and frees everything. The
    /// caller has claimed the hub with `Hub::begin_shutdown` first.
    ///
    /// Returns within `FREE_WAIT`: a DNS look-up still running in the system resolver cannot be
    /// interrupted, so it is abandoned to its resolver thread (see `io::resolve`), which touches
    /// nothing of the client.
    pub fn shut_down(mut self) {
        let deadline = Instant::now() + FREE_WAIT;
        let hub_id = self.hub.id;
        for conn in handles::remove_all(|c| c.hub.id == hub_id) {
            conn.shut_down();
        }
        self.hub.wait_for_tasks(deadline.saturating_duration_since(Instant::now()));
        if let Some(runtime) = self.runtime.take() {
            // Drops the tasks still running (their close frames were best effort) and joins
            // the I/O thread: nothing in it blocks (DNS look-ups run elsewhere), so this is quick.
            drop(runtime);
        }
        self.hub.clear();
    }
}

/// Blocks SIGPIPE on the calling thread (one of the library's own): a write to a connection the
/// peer reset then fails with EPIPE instead of killing a host that keeps SIGPIPE's default.
fn block_sigpipe() {
    // SAFETY: plain libc calls on a local signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
