//! What the host's calls do to a connection, and dispatch, which runs its callbacks on the
//! host's thread.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use tungstenite::protocol::CloseFrame;

use super::event::Event;
use super::state::{Phase, State};
use super::Conn;
use crate::error::{Error, WsStatus};
use crate::host::callbacks::{self, Callbacks, WsMessageKind};
use crate::host::dispatch;
use crate::host::handles;

impl Conn {
    /// Changes the registered callbacks. In force for every callback that starts after this
    /// returns: from another thread it waits while a callback of this connection runs.
    pub(crate) fn set_callbacks(&self, change: impl FnOnce(&mut Callbacks)) {
        self.invoke.register(|| {
            let mut st = self.lock();
            change(&mut st.callbacks);
            self.callbacks_version.fetch_add(1, Ordering::Release);
        })
    }

    /// Starts the close handshake (or aborts the connect).
    pub(crate) fn close(&self, frame: CloseFrame) -> Result<(), Error> {
        let waker = {
            let mut st = self.lock();
            match st.phase {
                Phase::Connecting | Phase::Open => {}
                Phase::Closing => {
                    return Err(Error::new(WsStatus::AlreadyClosing, "close was already called on this connection"))
                }
                Phase::Finished => {
                    return Err(Error::new(
                        WsStatus::Closing,
                        "the connection has already ended: its final callback is running",
                    ))
                }
            }
            // Sends held back for the end of a batch were made before: they go first.
            st = self.uncork_locked(st);
            st.phase = Phase::Closing;
            // The task no longer honours flow control once closing: it must read the peer's close.
            st.close_requested = true;
            // Woken either way: the task may be connecting, or holding reads for flow control.
            st.queue_for_task(|outbox| outbox.push_close(frame)).or_else(|| st.task_waker.take())
        };
        if let Some(w) = waker {
            dispatch::wake_task(w, self.hub.id);
        }
        Ok(())
    }

    /// Turns flow control on or off. Turned on from another thread, it waits for a callback of
    /// this connection that runs now: at most one message callback starts after it returned
    /// before the hold (see `invoke`).
    pub(crate) fn set_flow_control(self: &Arc<Self>, enabled: bool) {
        if enabled {
            return self.invoke.register(|| {
                self.lock().flow_control = true;
                self.flow_control_on.store(true, Ordering::Release);
            });
        }
        let mut st = self.lock();
        st.flow_control = false;
        self.flow_control_on.store(false, Ordering::Release);
        if st.awaiting_complete {
            self.release(st);
        }
    }

    /// How many events wait for dispatch (what a dispatch called now may run).
    pub(crate) fn pending_events(&self) -> usize {
        self.lock().inbox.len()
    }

    pub(crate) fn message_complete(self: &Arc<Self>) {
        let st = self.lock();
        if st.awaiting_complete {
            self.release(st);
        }
    }

    /// Ends a wait for message_complete: reschedules held events and lets the task read again.
    fn release(self: &Arc<Self>, mut st: MutexGuard<'_, State>) {
        st.awaiting_complete = false;
        let schedule = !st.scheduled && st.deliverable();
        st.scheduled |= schedule;
        self.unlock_then_notify(st, schedule);
    }

    /// Releases the state's lock, then puts the connection on the ready list if `schedule`, and
    /// wakes the I/O task if it was waiting for the host and may go on now (see
    /// `State::waker_to_wake`). Both after the lock: whoever is woken must not find it taken.
    fn unlock_then_notify(self: &Arc<Self>, mut st: MutexGuard<'_, State>, schedule: bool) {
        let waker = st.waker_to_wake();
        drop(st);
        if schedule {
            self.hub.schedule(self.clone());
        }
        if let Some(w) = waker {
            dispatch::wake_task(w, self.hub.id);
        }
    }

    /// How many sends written on their caller's thread the socket took only in part (the
    /// write-order tests check that they reach this case).
    pub(crate) fn partial_writes(&self) -> usize {
        self.partial_writes.load(Ordering::Relaxed)
    }

    pub(crate) fn buffered_amount(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    pub(crate) fn protocol(&self) -> Option<String> {
        self.lock().protocol.clone()
    }

    pub(crate) fn extensions(&self) -> Option<String> {
        self.lock().extensions.clone()
    }

    /// Runs the callbacks of the events that are deliverable now, at most `budget` (as many as
    /// were pending when ws_dispatch was called: events arriving meanwhile wait for the next
    /// one, so a fast peer cannot keep one dispatch call busy forever). Returns how many
    /// callbacks ran.
    ///
    /// Events are taken from the inbox in batches under one lock; a callback that turns flow
    /// control on sends the rest of the batch back to the inbox, to wait for message_complete.
    /// `batch` is the dispatcher's reusable scratch queue (empty on entry and on return), so a
    /// dispatch allocates nothing.
    pub(crate) fn dispatch(self: &Arc<Self>, batch: &mut VecDeque<Event>, mut budget: usize) -> u32 {
        // Sends made by these callbacks wake the I/O task once, when the batch is done.
        let _wakes = dispatch::DeferredWakes::begin(self.hub.id);
        let mut calling = self.invoke.calling();
        let mut ran = 0;
        debug_assert!(batch.is_empty());
        'batches: while budget > 0 {
            let flow_control_at_take = self.flow_control_on.load(Ordering::Acquire);
            let (mut callbacks, mut version) = self.take_batch(budget, batch);
            if batch.is_empty() {
                break;
            }
            budget -= batch.len();
            while let Some(event) = batch.pop_front() {
                // Registrations and flow control from other threads go in between callbacks.
                calling.between_callbacks();
                let turned_on = !flow_control_at_take && self.flow_control_on.load(Ordering::Acquire);
                if turned_on && matches!(event, Event::Message(_)) {
                    // Flow control was turned on (by the last callback, or by another thread
                    // since) after this batch was taken: the rest waits in the inbox, and is
                    // taken again one message at a time.
                    batch.push_front(event);
                    budget += batch.len();
                    self.put_back(batch);
                    continue 'batches;
                }
                // Registered since the batch was taken: the new callbacks are in force.
                let current = self.callbacks_version.load(Ordering::Acquire);
                if current != version {
                    (callbacks, version) = (self.lock().callbacks, current);
                }
                if event.is_final() {
                    self.lock().phase = Phase::Finished;
                }
                ran += self.deliver_to_host(&event, &callbacks) as u32;
                if event.is_final() {
                    drop(calling);
                    self.become_gone();
                    return ran;
                }
            }
        }
        drop(calling);
        let mut st = self.lock();
        st.scheduled = st.deliverable();
        let schedule = st.scheduled;
        self.unlock_then_notify(st, schedule);
        ran
    }

    /// Calls the host's callback for one event; returns whether one was registered.
    fn deliver_to_host(&self, event: &Event, callbacks: &Callbacks) -> bool {
        match event {
            Event::Open => callbacks::call_open(callbacks.open, self.id),
            Event::Message(payload) => {
                let kind = if payload.is_text() { WsMessageKind::Text } else { WsMessageKind::Binary };
                callbacks::call_message(callbacks.message, self.id, payload.data(), kind)
            }
            Event::Close { code, reason } => callbacks::call_close(callbacks.close, self.id, *code, reason),
            Event::Error(e) => {
                let mut text = e.message.replace('\0', " ").into_bytes();
                text.push(0);
                callbacks::call_error(callbacks.error, self.id, e.status, &text)
            }
        }
    }

    /// Moves up to `max` deliverable events into `batch` (one at a time under flow control);
    /// returns the callbacks in force and their version.
    fn take_batch(self: &Arc<Self>, max: usize, batch: &mut VecDeque<Event>) -> (Callbacks, u64) {
        let mut st = self.lock();
        let taken_with = (st.callbacks, self.callbacks_version.load(Ordering::Acquire));
        let only_messages = st.inbox_messages == st.inbox.len();
        if only_messages && !st.flow_control && st.inbox.len() <= max && st.deliverable() {
            // The usual case: every waiting event is a message and nothing holds them: take
            // the whole inbox at once (the dispatcher's empty queue becomes the inbox).
            std::mem::swap(&mut st.inbox, batch);
            st.inbox_cost = 0;
            st.inbox_messages = 0;
        }
        while batch.len() < max && st.deliverable() {
            let Some(event) = st.inbox.pop_front() else {
                break;
            };
            match &event {
                Event::Open if st.phase != Phase::Connecting => {
                    // The host closed before the open was delivered: it no longer expects one.
                    continue;
                }
                Event::Open => st.phase = Phase::Open,
                Event::Message(payload) => {
                    st.inbox_cost -= payload.cost();
                    st.inbox_messages -= 1;
                    // With flow control on, this message holds the next ones until
                    // message_complete, which the callback itself may call: so the hold starts
                    // before the call. Without a callback nobody would complete it: no hold.
                    st.awaiting_complete = st.flow_control && st.callbacks.message.0.is_some();
                }
                // The phase becomes Finished when its callback is called, not now: the callbacks
                // of the messages before it still see the connection open.
                Event::Close { .. } | Event::Error(_) => {}
            }
            let stop = st.awaiting_complete || event.is_final();
            batch.push_back(event);
            if stop {
                break;
            }
        }
        self.unlock_then_notify(st, false);
        taken_with
    }

    /// Returns undelivered events of a batch to the front of the inbox.
    fn put_back(&self, batch: &mut VecDeque<Event>) {
        let mut st = self.lock();
        while let Some(event) = batch.pop_back() {
            if let Event::Message(payload) = &event {
                st.inbox_cost += payload.cost();
                st.inbox_messages += 1;
            }
            st.inbox.push_front(event);
        }
    }

    /// Called after the final callback returned: the handle stops working everywhere.
    fn become_gone(&self) {
        handles::remove(self.id);
        let mut st = self.lock();
        st.callbacks = Callbacks::default();
        st.inbox.clear();
        st.scheduled = false;
        drop(st);
        self.hub.connection_gone();
    }
}
