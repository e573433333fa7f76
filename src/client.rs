//! The client context: one per host event loop. It owns the library's I/O threads (a tokio
//! runtime) and the hub through which its connections' events reach the host's thread.

use std::sync::Arc;
use std::time::Duration;

use crate::conn::Conn;
use crate::error::{Error, WsStatus};
use crate::host::dispatch::Hub;
use crate::host::handles::{self, WsConn};
use crate::io::task::{self, Launch};
use crate::io::tls::TlsConfigs;
use crate::options::Options;
use crate::uri;

/// I/O threads per client. One thread serves thousands of connections; TLS handshakes are the
/// only CPU-heavy part, and the host's own thread does the callbacks.
const IO_THREADS: usize = 1;
/// Blocking threads, used only for DNS look-ups of host names.
const MAX_DNS_THREADS: usize = 4;
/// How long freeing a client waits for its connections to send their close frames.
const FREE_WAIT: Duration = Duration::from_secs(2);

pub struct Client {
    hub: Arc<Hub>,
    runtime: Option<tokio::runtime::Runtime>,
    tls: Arc<TlsConfigs>,
    default_options: Arc<Options>,
}

impl Client {
    pub fn new() -> Result<Client, Error> {
        let hub = Hub::new().map_err(|e| {
            Error::new(
                WsStatus::Runtime,
                format!("cannot create the event descriptor: {e}"),
            )
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .max_blocking_threads(MAX_DNS_THREADS)
            .thread_name("wsclient-io")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(
                    WsStatus::Runtime,
                    format!("cannot start the I/O threads: {e}"),
                )
            })?;
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
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::new(WsStatus::Runtime, "the client is shutting down"))?;
        let conn = handles::insert(|id| {
            Arc::new(Conn::new(
                id,
                self.hub.clone(),
                options.send_queue_limit,
                options.receive_queue_limit,
            ))
        });
        self.hub.connection_added();
        self.hub.task_started();
        let launch = Launch {
            conn: conn.clone(),
            target,
            options,
            tls: self.tls.clone(),
        };
        runtime.spawn(task::run(launch));
        Ok(conn.id)
    }

    /// Ends every connection (no more callbacks), stops the threads and frees everything. The
    /// caller has claimed the hub with `Hub::begin_shutdown` first.
    pub fn shut_down(mut self) {
        let hub_id = self.hub.id;
        for conn in handles::remove_all(|c| c.hub.id == hub_id) {
            conn.shut_down();
        }
        self.hub.wait_for_tasks(FREE_WAIT);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(FREE_WAIT);
        }
        self.hub.clear();
    }
}
