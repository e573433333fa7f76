//! The I/O side: everything that runs on the library's own threads (its tokio threads, and
//! the resolver threads of `resolve`).
//!
//! - `task`: one connection's task from connect to its final event;
//! - `session`: the poll loop of an open connection (it writes through `crate::wire`, and
//!   hands its reading to the dispatching thread when it has nothing in hand: see
//!   `crate::host::reading`);
//! - `reader`: the frames the peer sends, parsed straight from the socket (by either side);
//! - `handshake`: the HTTP upgrade;
//! - `resolve`: host names, on resolver threads shared by all clients;
//! - `eyeballs`: TCP connections to the addresses of a name, raced (Happy Eyeballs);
//! - `tls`: TLS configurations and readable TLS errors;
//! - `proxy`: which proxy a connection goes through, and the tunnel through it;
//! - `redirect`: where a redirect of the upgrade leads, and what goes there.

pub(crate) mod eyeballs;
pub(crate) mod handshake;
pub(crate) mod pinned;
pub(crate) mod proxy;
pub(crate) mod reader;
pub(crate) mod redirect;
pub(crate) mod resolve;
pub(crate) mod session;
pub(crate) mod task;
pub(crate) mod tls;
