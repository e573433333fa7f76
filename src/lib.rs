//! wsclient: a WebSocket client with a C ABI.
//!
//! I/O and TLS run on the library's own tokio threads; every callback runs on the host's thread,
//! inside its call to `ws_dispatch`, woken through a file descriptor. See README.md and
//! include/wsclient.h for the contract.
//!
//! Modules, one concern each:
//! - `ffi`: the C surface, a thin layer of argument checks and the panic boundary;
//! - `client`: the client context (runtime, connect, free);
//! - `conn`: one connection's shared state: callbacks, inbox, flow control;
//! - `dispatch`: the ready list, the wake-up descriptor and dispatch on the host's thread;
//! - `task`: the I/O task of one connection (tungstenite frames what it sends);
//! - `reader`: the frames the peer sends, parsed straight from the socket;
//! - `handles`: the table behind `ws_conn` handles;
//! - `handshake`: the HTTP upgrade;
//! - `options`, `uri`, `tls`, `error`, `callbacks`: what their names say;
//! - `testing`: helpers shared by the unit and integration tests (hidden, not API).

pub mod callbacks;
pub mod client;
pub mod conn;
pub mod dispatch;
pub mod error;
pub mod ffi;
pub mod handles;
pub mod handshake;
pub mod options;
pub mod reader;
pub mod task;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod uri;

pub use callbacks::{WsCloseCallback, WsErrorCallback, WsMessageCallback, WsMessageKind, WsOpenCallback};
pub use error::WsStatus;
pub use handles::WsConn;
