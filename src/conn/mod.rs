//! One connection as both sides of the thread boundary see it.
//!
//! - `host_side`: what the host's calls do (close, flow control, callback registration) and
//!   dispatch, which runs the callbacks on the host's thread;
//! - `sending`: sends, written on the caller's thread where that is the shortest way;
//! - `task_side`: what the I/O task does (hand over events, ask the gate whether it may read,
//!   take the host's requests);
//! - `state`: the state both share, behind one mutex, and the rules that read it;
//! - `outbox`, `event`, `arena`: what crosses the boundary each way.
//!
//! Callbacks are always called with the state's mutex released, so a callback may call any API
//! function on any connection.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::host::dispatch::Hub;
use crate::host::handles::WsConn;
use crate::host::invoke::InvokeLock;

mod arena;
mod event;
mod host_side;
mod outbox;
mod sending;
mod state;
mod task_side;

pub(crate) use arena::PayloadArena;
pub(crate) use event::{Event, Payload};
pub(crate) use outbox::{Counted, Outgoing, Taken};
pub(crate) use task_side::{Allowance, Control, Gate};

use state::State;

pub(crate) struct Conn {
    pub(crate) id: WsConn,
    pub(crate) hub: Arc<Hub>,
    state: Mutex<State>,
    /// Payload bytes accepted by send and not yet handed to the socket (the browser's
    /// bufferedAmount).
    buffered: AtomicUsize,
    /// What those sends cost, bookkeeping included: this is what the send queue limit bounds.
    queued_cost: AtomicUsize,
    /// Bumped by every callback registration (under the state's lock), so a dispatch batch
    /// notices it without taking that lock for every callback.
    callbacks_version: AtomicU64,
    /// Mirrors `State::flow_control` for the same reason.
    flow_control_on: AtomicBool,
    /// Sends written in part on their caller's thread (see `partial_writes`).
    partial_writes: AtomicUsize,
    /// Held while a callback of this connection runs; registrations from other threads wait
    /// for it, so that a registration is in force for every callback after it returned.
    invoke: InvokeLock,
    send_queue_limit: usize,
    /// The reading side, while the host's thread reads the socket (see `host::reading`).
    pub(crate) reading: crate::host::reading::ReadingSlot,
}

impl Conn {
    pub(crate) fn new(id: WsConn, hub: Arc<Hub>, send_queue_limit: usize, receive_queue_limit: usize) -> Conn {
        Conn {
            id,
            hub,
            state: Mutex::new(State::new(receive_queue_limit)),
            buffered: AtomicUsize::new(0),
            queued_cost: AtomicUsize::new(0),
            callbacks_version: AtomicU64::new(0),
            flow_control_on: AtomicBool::new(false),
            partial_writes: AtomicUsize::new(0),
            invoke: InvokeLock::default(),
            send_queue_limit,
            reading: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data behind: every update is a
        // handful of plain assignments. Keep going rather than poisoning the connection.
        crate::sync::lock(&self.state)
    }
}

#[cfg(test)]
mod tests;
