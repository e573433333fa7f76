//! The host's side: what runs on (or serves) the thread that calls `ws_dispatch`.
//!
//! - `dispatch`: the ready list, the wake-up descriptor and dispatch itself;
//! - `callbacks`: the C callback types and the one place that calls them;
//! - `handles`: the table behind `ws_conn` handles;
//! - `invoke`: when a registration made on another thread is in force;
//! - `reading`: the socket reads the host's thread does during its dispatches;
//! - `wakeup`: the descriptor behind ws_client_fd() (an eventfd, or a pipe).

pub mod callbacks;
pub(crate) mod dispatch;
pub(crate) mod handles;
pub(crate) mod invoke;
pub(crate) mod reading;
pub(crate) mod wakeup;
