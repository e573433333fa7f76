//! What the I/O task does to a connection: hand events over to the host, learn whether it may
//! read, take the host's requests.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;

use super::event::Event;
use super::outbox::Taken;
use super::state::{store_waker, State};
use super::Conn;
use crate::host::callbacks::Callbacks;
use crate::wire::Wire;

/// How much the I/O task may read before it asks the gate again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allowance {
    pub(crate) messages: usize,
    /// What the messages may cost (the last message may pass it: messages are never split).
    pub(crate) cost: usize,
}

/// Whether the I/O task may read messages from the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    Open(Allowance),
    /// The host has not taken enough of what was read (flow control, or the receive queue limit).
    Closed,
    /// The client is being freed.
    Shutdown,
}

/// What the task learns each time it asks the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Permit {
    pub(crate) gate: Gate,
    /// The host called close: the close timeout runs from now, whatever still waits to be sent.
    pub(crate) close_requested: bool,
}

/// What the I/O task must do about requests made while it was connecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Proceed,
    CloseRequested,
    Shutdown,
}

impl Conn {
    /// Queues one event for the host; schedules the connection if it can be dispatched now.
    pub(crate) fn deliver(self: &Arc<Self>, event: Event) {
        let mut batch = VecDeque::from([event]);
        self.deliver_then_gate(&mut batch, None);
    }

    /// Queues events for the host under one lock (emptying `events`), and schedules the
    /// connection if it can be dispatched now: one wake-up of the host per batch.
    ///
    /// With `asking` (a waker, and whether the task can take requests now: it is not blocked
    /// writing), then tells under the same lock whether (and how much) the task may read; if it
    /// may not, the waker is woken when it may, or when the client is freed. A request queued
    /// while the task had no waker here wakes it too, if it can take requests.
    pub(crate) fn deliver_then_gate(
        self: &Arc<Self>,
        events: &mut VecDeque<Event>,
        asking: Option<(&Waker, bool)>,
    ) -> Permit {
        let messages = events.iter().filter(|e| matches!(e, Event::Message(_))).count();
        let cost: usize = events.iter().map(Event::cost).sum();
        let mut st = self.lock();
        if st.shutdown {
            events.clear();
            return Permit { gate: Gate::Shutdown, close_requested: st.close_requested };
        }
        st.inbox_cost += cost;
        st.inbox_messages += messages;
        if st.inbox.is_empty() {
            // The usual case: the batch becomes the inbox, and the task keeps the empty one.
            std::mem::swap(&mut st.inbox, events);
        } else {
            st.inbox.append(events);
        }
        let schedule = !st.scheduled && st.deliverable();
        st.scheduled |= schedule;
        let permit = match asking {
            Some((waker, wants_requests)) => gate_locked(&mut st, waker, wants_requests),
            None => Permit { gate: Gate::Closed, close_requested: st.close_requested },
        };
        drop(st);
        if schedule {
            self.hub.schedule(self.clone());
        }
        permit
    }

    /// What the host's thread may read now (see `host::reading`): None when the task must
    /// read (the gate is closed, flow control is on, a close was asked for, the client is
    /// being freed).
    pub(crate) fn host_allowance(&self) -> Option<Allowance> {
        let st = self.lock();
        if st.shutdown || st.close_requested || st.flow_control || !st.reading_allowed() {
            return None;
        }
        Some(Allowance { messages: usize::MAX, cost: st.receive_queue_limit - st.inbox_cost })
    }

    /// Whether the host has dispatched every message delivered so far (and completed it, under
    /// flow control). If not, `waker` is woken once it has.
    pub(crate) fn drained(&self, waker: &Waker) -> bool {
        let mut st = self.lock();
        if st.drained() || st.shutdown {
            return true;
        }
        store_waker(&mut st.task_waker, waker);
        st.wake_when_drained = true;
        false
    }

    /// What the host asked for while the task was busy connecting; `waker` is woken on a change.
    pub(crate) fn control(&self, waker: &Waker) -> Control {
        let mut st = self.lock();
        if st.shutdown {
            return Control::Shutdown;
        }
        if st.close_requested {
            return Control::CloseRequested;
        }
        store_waker(&mut st.task_waker, waker);
        Control::Proceed
    }

    /// What the upgrade agreed on: the subprotocol and the extensions (see ws_extensions).
    pub(crate) fn set_agreed(&self, protocol: Option<String>, extensions: Option<String>) {
        let mut st = self.lock();
        st.protocol = protocol;
        st.extensions = extensions;
    }

    /// The connection is open on `wire`: from now on, small sends may be written by the
    /// threads that make them (see `State::writable_now`).
    /// `compress_from`: messages of this size or more are compressed (permessage-deflate),
    /// so the I/O task frames them (usize::MAX: none is).
    pub(crate) fn attach_wire(&self, wire: Arc<Wire>, compress_from: usize) {
        let mut st = self.lock();
        st.wire = Some(wire);
        st.compress_from = compress_from;
    }

    /// Our close frame is going out: nothing may follow it, so sends go to the task (which
    /// drops them) from now on.
    pub(crate) fn detach_wire(&self) {
        self.lock().wire = None;
    }

    /// Takes everything queued for the task, and (if there was anything, or `to_write` says
    /// the task has frames of its own) makes the task the one writer until `release_writing`.
    /// One lock for all of it. Returns false, taking nothing, while a host's thread is writing
    /// (it wakes the task with `waker` when it is done, if there is anything to write).
    pub(crate) fn take_requests(&self, into: &mut Taken, to_write: bool, waker: &Waker) -> bool {
        let mut st = self.lock();
        if st.host_writing {
            if to_write || !st.outbox.is_empty() {
                st.task_waits_for_host = true;
                store_waker(&mut st.task_waker, waker);
            }
            return false;
        }
        into.refill_from(&mut st.outbox);
        st.task_writing |= to_write || !into.is_empty();
        true
    }

    /// The task has written everything: other threads may write again, unless something was
    /// queued meanwhile (then it returns false and stays the writer).
    pub(crate) fn release_writing(&self) -> bool {
        let mut st = self.lock();
        if !st.outbox.is_empty() {
            return false;
        }
        st.task_writing = false;
        true
    }

    /// The task is ending: nothing queued will be sent any more (bufferedAmount drops to 0),
    /// and later sends fail at once instead of waiting forever.
    pub(crate) fn task_ending(&self) {
        let mut st = self.lock();
        st.task_ended = true;
        st.wire = None;
        st.outbox.discard();
        self.buffered.store(0, Ordering::Relaxed);
        self.queued_cost.store(0, Ordering::Relaxed);
    }

    /// The client is being freed: drop pending events and tell the task to stop.
    pub(crate) fn shut_down(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.wire = None;
        st.inbox.clear();
        st.callbacks = Callbacks::default();
        let waker = st.task_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn gate_locked(st: &mut State, waker: &Waker, wants_requests: bool) -> Permit {
    let close_requested = st.close_requested;
    if st.shutdown {
        return Permit { gate: Gate::Shutdown, close_requested };
    }
    // Kept even when open, so that freeing the client wakes a task waiting on its socket.
    store_waker(&mut st.task_waker, waker);
    if wants_requests && !st.outbox.is_empty() && !st.host_writing {
        // Queued since the task last looked, while it had no waker here: look again. (Not
        // while the task is blocked writing, nor while a host's thread writes: it could not
        // take them, and would spin; the host's thread wakes it when done.)
        waker.wake_by_ref();
    }
    st.gate_closed = !st.reading_allowed();
    if st.gate_closed {
        return Permit { gate: Gate::Closed, close_requested };
    }
    let one_at_a_time = st.flow_control && !st.close_requested;
    let allowance = Allowance {
        messages: if one_at_a_time { 1 } else { usize::MAX },
        cost: st.receive_queue_limit - st.inbox_cost,
    };
    Permit { gate: Gate::Open(allowance), close_requested }
}
