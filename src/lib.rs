//! wsclient: a WebSocket client with a C ABI.
//!
//! Connecting, reading and most writing run on the library's own threads (a small send is framed
//! and written by the thread that makes it: see `wire`); every callback runs on the host's
//! thread, inside its call to `ws_dispatch`, woken through a file descriptor. See README.md and
//! include/wsclient.h for the contract.
//!
//! Modules, one concern each, with a folder for each side of the thread boundary:
//! - `ffi/`: the C surface, a thin layer of argument checks and the panic boundary;
//! - `host/`: the host's thread: dispatch, callbacks, the handle table;
//! - `io/`: the library's own threads: connection task, session, frame reader, upgrade, TLS, DNS;
//! - `conn/`: one connection's state shared by both sides: inbox, outbox, flow control, the gate;
//! - `wire/`: the socket both sides may write to, and the frames we send;
//! - `client`: the client context (runtime, connect, free);
//! - `options`, `uri`, `error`, `sync`: what their names say;
//! - `testing`: helpers shared by the unit and integration tests (hidden, not API).

pub(crate) mod client;
pub(crate) mod conn;
pub(crate) mod deflate;
pub mod error;
pub mod ffi;
pub mod host;
pub(crate) mod io;
pub(crate) mod options;
pub(crate) mod sync;
#[doc(hidden)]
pub mod testing;
pub(crate) mod uri;
pub(crate) mod wire;

pub use error::WsStatus;
pub use host::callbacks::{WsCloseCallback, WsErrorCallback, WsMessageCallback, WsMessageKind, WsOpenCallback};
pub use host::handles::WsConn;
