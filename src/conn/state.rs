//! The state both sides of a connection share, behind its mutex, and the rules that read it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;

use super::event::Event;
use super::outbox::Outbox;
use super::sending::Frames;
use crate::host::callbacks::Callbacks;
use crate::wire::Wire;

/// The most bytes of frames held back for the end of a dispatch batch (see `State::corked`).
/// 128 KiB: eight 16 KiB replies in one write (at 64 KiB the fourth frame's header tipped
/// it over, and four replies took two writes: strace of W3).
pub(super) const CORK_MAX: usize = 128 << 10;

/// The largest message the host's thread frames and writes itself (see `State::writable_now`);
/// larger ones are framed and written by the I/O task, where they do not cost the host's thread.
pub(super) const WRITE_ON_HOST_THREAD_MAX: usize = 16 << 10;

/// Where the connection stands as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// The open callback has not run yet.
    Connecting,
    Open,
    /// The host called close.
    Closing,
    /// The final callback is running.
    Finished,
}

pub(super) struct State {
    pub(super) phase: Phase,
    pub(super) callbacks: Callbacks,
    /// Events waiting for dispatch, in order.
    pub(super) inbox: VecDeque<Event>,
    /// What the messages in the inbox cost (payloads and bookkeeping): bounded by the receive
    /// queue limit.
    pub(super) inbox_cost: usize,
    pub(super) inbox_messages: usize,
    pub(super) receive_queue_limit: usize,
    /// The connection is in the hub's ready list (or being dispatched right now).
    pub(super) scheduled: bool,
    pub(super) flow_control: bool,
    /// Flow control: a message was delivered and message_complete has not been called yet.
    pub(super) awaiting_complete: bool,
    pub(super) close_requested: bool,
    /// The client is being freed: the task must stop.
    pub(super) shutdown: bool,
    /// The I/O task, when it waits for the gate or for a control change.
    pub(super) task_waker: Option<Waker>,
    /// The task was last told the gate is closed: it waits for the host to take events (or
    /// complete a message) and must be woken then. Otherwise it waits on its socket and a
    /// wake-up from the host would be wasted (one more switch between threads).
    pub(super) gate_closed: bool,
    /// The task waits until the host has dispatched everything delivered so far (see
    /// `Conn::drained`).
    pub(super) wake_when_drained: bool,
    pub(super) protocol: Option<String>,
    /// The extensions in force, as ws_extensions tells them.
    pub(super) extensions: Option<String>,
    /// Sends and the close request for the I/O task: under the connection's lock, and nothing
    /// is allocated until something is sent.
    pub(super) outbox: Outbox,
    /// The I/O task has ended: nothing queued now would ever be sent.
    pub(super) task_ended: bool,
    /// The open connection's socket, while sends may still go on it (until our close frame).
    pub(super) wire: Option<Arc<Wire>>,
    /// The I/O task has taken requests (or has its own frames) it has not written yet: nobody
    /// else may write until it is done.
    pub(super) task_writing: bool,
    /// A host's thread is writing a send on the socket, without the lock (see
    /// `Conn::write_now`): nobody else may write until it is done.
    pub(super) host_writing: bool,
    /// The task has something to write and waits for `host_writing` to end (the host's thread
    /// wakes it then).
    pub(super) task_waits_for_host: bool,
    /// Frames of sends made by callbacks, written together when their dispatch batch ends
    /// (one system call for a batch of replies); nothing else goes out before them.
    pub(super) corked: Frames,
    /// permessage-deflate: messages of this size or more are compressed, on the I/O thread, so
    /// they never take the host's thread's path (usize::MAX: none is).
    pub(super) compress_from: usize,
}

impl State {
    pub(super) fn new(receive_queue_limit: usize) -> State {
        State {
            phase: Phase::Connecting,
            callbacks: Callbacks::default(),
            inbox: VecDeque::new(),
            inbox_cost: 0,
            inbox_messages: 0,
            receive_queue_limit,
            scheduled: false,
            flow_control: false,
            awaiting_complete: false,
            close_requested: false,
            shutdown: false,
            task_waker: None,
            gate_closed: false,
            wake_when_drained: false,
            protocol: None,
            extensions: None,
            outbox: Outbox::default(),
            task_ended: false,
            wire: None,
            task_writing: false,
            host_writing: false,
            task_waits_for_host: false,
            corked: Frames::default(),
            compress_from: usize::MAX,
        }
    }

    /// The socket, if a send of `len` bytes may be written on the calling thread right now:
    /// small, and nothing queued or being written before it, so that order is kept.
    pub(super) fn writable_now(&self, len: usize) -> Option<&Arc<Wire>> {
        if len > WRITE_ON_HOST_THREAD_MAX
            || len >= self.compress_from
            || self.task_writing
            || self.host_writing
            || !self.outbox.is_empty()
            || !self.corked.is_empty()
        {
            return None;
        }
        self.wire.as_ref()
    }

    /// Whether the first event in the inbox may be handed to the host now. While a message
    /// waits for message_complete nothing follows it, the final event included: otherwise
    /// whether the host could still complete its last message would depend on timing (whether
    /// the peer's close was read before or after the host set flow control).
    pub(super) fn deliverable(&self) -> bool {
        !self.inbox.is_empty() && !self.awaiting_complete
    }

    /// Whether the task may read more messages from the socket.
    pub(super) fn reading_allowed(&self) -> bool {
        let held_by_flow_control =
            self.flow_control && !self.close_requested && (self.awaiting_complete || self.inbox_messages > 0);
        !held_by_flow_control && self.inbox_cost < self.receive_queue_limit
    }

    /// Every message delivered to the host has been dispatched (its callback has returned: the
    /// connection is not being dispatched), and none awaits completion.
    pub(super) fn drained(&self) -> bool {
        self.inbox_messages == 0 && !self.awaiting_complete && !self.scheduled
    }

    /// The task's waker, if the task waits for the gate and reading is allowed again, or waits
    /// for the host to drain what it was given and it has.
    pub(super) fn waker_to_wake(&mut self) -> Option<Waker> {
        if self.gate_closed && self.reading_allowed() {
            self.gate_closed = false;
            return self.task_waker.take();
        }
        if self.wake_when_drained && self.drained() {
            self.wake_when_drained = false;
            return self.task_waker.take();
        }
        None
    }

    /// Queues a request with `push`; returns the task's waker if the task may be waiting for
    /// one (it took everything before, so only the first request needs to wake it).
    pub(super) fn queue_for_task(&mut self, push: impl FnOnce(&mut Outbox)) -> Option<Waker> {
        let was_empty = self.outbox.is_empty();
        push(&mut self.outbox);
        if was_empty {
            self.task_waker.take()
        } else {
            None
        }
    }
}

pub(super) fn store_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}
