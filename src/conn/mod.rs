//! One connection as both sides see it: the host side (callbacks, the inbox of events waiting
//! for dispatch, flow control) and the gate through which the I/O task learns when it may read.
//!
//! All of it sits behind one mutex per connection. Callbacks are always called with that mutex
//! released, so a callback may call any API function on any connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::error::{Error, WsStatus};
use crate::host::callbacks::{self, Callbacks, WsMessageKind};
use crate::host::dispatch::{self, Hub};
use crate::host::handles::{self, WsConn};

mod arena;
mod event;
mod outbox;

pub(crate) use arena::PayloadArena;
pub(crate) use event::{Event, Payload};
pub(crate) use outbox::{Command, Outbox};

/// Where the connection stands as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The open callback has not run yet.
    Connecting,
    Open,
    /// The host called close.
    Closing,
    /// The final callback is running.
    Finished,
}

struct State {
    phase: Phase,
    callbacks: Callbacks,
    inbox: VecDeque<Event>,
    inbox_bytes: usize,
    inbox_messages: usize,
    /// The connection is in the hub's ready list (or being dispatched right now).
    scheduled: bool,
    flow_control: bool,
    /// Flow control: a message was delivered and message_complete has not been called yet.
    awaiting_complete: bool,
    close_requested: bool,
    /// The client is being freed: the task must stop.
    shutdown: bool,
    /// The I/O task, when it waits for the gate or for a control change.
    task_waker: Option<Waker>,
    /// The task was last told the gate is closed: it waits for the host to take events (or
    /// complete a message) and must be woken then. Otherwise it waits on its socket and a
    /// wake-up from the host would be wasted (one more switch between threads).
    gate_closed: bool,
    protocol: Option<String>,
    /// Sends and the close request for the I/O task: under the connection's lock, and nothing
    /// is allocated until something is sent.
    outbox: Outbox,
    /// The I/O task has ended: nothing queued now would ever be sent.
    task_ended: bool,
}

pub struct Conn {
    pub id: WsConn,
    pub hub: Arc<Hub>,
    state: Mutex<State>,
    /// Bytes accepted by send and not yet handed to the socket (the browser's bufferedAmount).
    buffered: AtomicUsize,
    /// Bumped by every callback registration, so a dispatch batch notices it without a lock.
    callbacks_version: AtomicU64,
    /// Mirrors `State::flow_control` for the same reason.
    flow_control_on: AtomicBool,
    send_queue_limit: usize,
    receive_queue_limit: usize,
}

/// How much the I/O task may read before it asks the gate again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowance {
    pub messages: usize,
    /// Bytes of messages (the last message may pass it: messages are never split).
    pub bytes: usize,
}

/// Whether the I/O task may read from the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open(Allowance),
    /// The host has not taken enough of what was read (flow control, or the receive queue limit).
    Closed,
    /// The client is being freed.
    Shutdown,
}

/// What the I/O task must do about requests made while it was connecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Proceed,
    CloseRequested,
    Shutdown,
}

impl Conn {
    pub fn new(
        id: WsConn,
        hub: Arc<Hub>,
        send_queue_limit: usize,
        receive_queue_limit: usize,
    ) -> Conn {
        Conn {
            id,
            hub,
            state: Mutex::new(State {
                phase: Phase::Connecting,
                callbacks: Callbacks::default(),
                inbox: VecDeque::new(),
                inbox_bytes: 0,
                inbox_messages: 0,
                scheduled: false,
                flow_control: false,
                awaiting_complete: false,
                close_requested: false,
                shutdown: false,
                task_waker: None,
                gate_closed: false,
                protocol: None,
                outbox: Outbox::default(),
                task_ended: false,
            }),
            buffered: AtomicUsize::new(0),
            callbacks_version: AtomicU64::new(0),
            flow_control_on: AtomicBool::new(false),
            send_queue_limit,
            receive_queue_limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data behind: every update is a
        // handful of plain assignments. Keep going rather than poisoning the connection.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- host side -------------------------------------------------------------------------

    pub fn callbacks_mut<R>(&self, f: impl FnOnce(&mut Callbacks) -> R) -> R {
        let result = f(&mut self.lock().callbacks);
        self.callbacks_version.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Queues a copy of `payload` (valid UTF-8 if `text`); it goes out after the handshake, in
    /// order with the other sends.
    pub fn send(&self, payload: &[u8], text: bool) -> Result<(), Error> {
        let len = payload.len();
        let mut st = self.lock();
        if matches!(st.phase, Phase::Closing | Phase::Finished) {
            return Err(Error::new(
                WsStatus::Closing,
                "the connection is closing: nothing more can be sent",
            ));
        }
        if st.task_ended {
            return Err(Error::new(
                WsStatus::Closing,
                "the connection has ended: nothing more can be sent",
            ));
        }
        let queued = self.buffered.load(Ordering::Relaxed);
        if queued.saturating_add(len) > self.send_queue_limit {
            return Err(Error::new(
                WsStatus::SendQueueFull,
                format!(
                    "{queued} bytes wait to be sent and the limit is {}",
                    self.send_queue_limit
                ),
            ));
        }
        self.buffered.fetch_add(len, Ordering::Relaxed);
        let waker = wake_if_first(&mut st, |outbox| outbox.push_send(payload, text));
        drop(st);
        if let Some(w) = waker {
            dispatch::wake_task(w);
        }
        Ok(())
    }

    /// Starts the close handshake (or aborts the connect). A second call is a no-op.
    pub fn close(&self, frame: CloseFrame) -> Result<(), Error> {
        let waker = {
            let mut st = self.lock();
            match st.phase {
                Phase::Connecting | Phase::Open => {}
                Phase::Closing => {
                    return Err(Error::new(
                        WsStatus::AlreadyClosing,
                        "close was already called on this connection",
                    ))
                }
                Phase::Finished => {
                    return Err(Error::new(
                        WsStatus::Closing,
                        "the connection is already closed",
                    ))
                }
            }
            st.phase = Phase::Closing;
            // The task no longer honours flow control once closing: it must read the peer's close.
            st.close_requested = true;
            // Woken either way: the task may be connecting, or holding reads for flow control.
            wake_if_first(&mut st, |outbox| {
                outbox.commands.push_back(Command::Close(frame))
            })
            .or_else(|| st.task_waker.take())
        };
        if let Some(w) = waker {
            dispatch::wake_task(w);
        }
        Ok(())
    }

    pub fn set_flow_control(self: &Arc<Self>, enabled: bool) {
        let mut st = self.lock();
        st.flow_control = enabled;
        self.flow_control_on.store(enabled, Ordering::Release);
        if !enabled && st.awaiting_complete {
            self.release(st);
        }
    }

    pub fn message_complete(self: &Arc<Self>) {
        let st = self.lock();
        if st.awaiting_complete {
            self.release(st);
        }
    }

    /// Ends a wait for message_complete: reschedules held events and lets the task read again.
    fn release(self: &Arc<Self>, mut st: MutexGuard<'_, State>) {
        st.awaiting_complete = false;
        let schedule = !st.scheduled && deliverable(&st);
        if schedule {
            st.scheduled = true;
        }
        let waker = self.reopen_gate(&mut st);
        drop(st);
        if schedule {
            self.hub.schedule(self.clone());
        }
        if let Some(w) = waker {
            dispatch::wake_task(w);
        }
    }

    pub fn buffered_amount(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    pub fn protocol(&self) -> Option<String> {
        self.lock().protocol.clone()
    }

    /// Runs the callbacks of the events that are deliverable now, at most as many as were queued
    /// when it started (so a fast peer cannot keep one dispatch call busy forever). Returns how
    /// many callbacks ran.
    ///
    /// Events are taken from the inbox in batches under one lock; a callback that turns flow
    /// control on sends the rest of the batch back to the inbox, to wait for message_complete.
    /// `batch` is the dispatcher's reusable scratch queue (empty on entry and on return), so a
    /// dispatch allocates nothing.
    pub fn dispatch(self: &Arc<Self>, batch: &mut VecDeque<Event>) -> u32 {
        // Sends made by these callbacks wake the I/O task once, when the batch is done.
        let _wakes = dispatch::DeferredWakes::begin();
        let mut budget = self.lock().inbox.len();
        let mut ran = 0;
        debug_assert!(batch.is_empty());
        while budget > 0 {
            let flow_control_at_take = self.flow_control_on.load(Ordering::Acquire);
            let mut callbacks = self.take_batch(budget, batch);
            if batch.is_empty() {
                break;
            }
            budget -= batch.len();
            let mut version = self.callbacks_version.load(Ordering::Acquire);
            while let Some(event) = batch.pop_front() {
                let current = self.callbacks_version.load(Ordering::Acquire);
                if current != version {
                    // A callback re-registered callbacks: the new ones are in force from now on.
                    callbacks = self.lock().callbacks;
                    version = current;
                }
                ran += self.deliver_to_host(&event, &callbacks) as u32;
                if event.is_final() {
                    self.become_gone();
                    return ran;
                }
                let turned_on =
                    !flow_control_at_take && self.flow_control_on.load(Ordering::Acquire);
                if turned_on && !batch.is_empty() {
                    budget += batch.len();
                    self.put_back(batch);
                }
            }
        }
        let mut st = self.lock();
        st.scheduled = deliverable(&st);
        if st.scheduled {
            drop(st);
            self.hub.schedule(self.clone());
        }
        ran
    }

    /// Calls the host's callback for one event; returns whether one was registered.
    fn deliver_to_host(&self, event: &Event, callbacks: &Callbacks) -> bool {
        match event {
            Event::Open => callbacks::call_open(callbacks.open, self.id),
            Event::Message(Payload::Text(bytes)) => callbacks::call_message(
                callbacks.message,
                self.id,
                &bytes[..bytes.len() - 1],
                WsMessageKind::Text,
            ),
            Event::Message(Payload::Binary(bytes)) => {
                callbacks::call_message(callbacks.message, self.id, bytes, WsMessageKind::Binary)
            }
            Event::Close { code, reason } => {
                callbacks::call_close(callbacks.close, self.id, *code, reason)
            }
            Event::Error(e) => {
                let mut text = e.message.replace('\0', " ").into_bytes();
                text.push(0);
                callbacks::call_error(callbacks.error, self.id, e.status, &text)
            }
        }
    }

    /// Moves up to `max` deliverable events into `batch` (one at a time under flow control) and
    /// returns the callbacks in force.
    fn take_batch(&self, max: usize, batch: &mut VecDeque<Event>) -> Callbacks {
        let mut st = self.lock();
        let mut callbacks = st.callbacks;
        let only_messages = st.inbox_messages == st.inbox.len();
        if only_messages && !st.flow_control && st.inbox.len() <= max && deliverable(&st) {
            // The usual case: every waiting event is a message and nothing holds them: take
            // the whole inbox at once (the dispatcher's empty queue becomes the inbox).
            std::mem::swap(&mut st.inbox, batch);
            st.inbox_bytes = 0;
            st.inbox_messages = 0;
        }
        while batch.len() < max && deliverable(&st) {
            let Some(event) = st.inbox.pop_front() else {
                break;
            };
            match &event {
                Event::Open => {
                    if st.phase == Phase::Connecting {
                        st.phase = Phase::Open;
                    } else {
                        // The host closed before the open was delivered: it no longer expects one.
                        callbacks.open.0 = None;
                    }
                }
                Event::Message(payload) => {
                    st.inbox_bytes -= payload.len();
                    st.inbox_messages -= 1;
                    // With flow control on, this message holds the next ones until
                    // message_complete, which the callback itself may call: so the hold starts
                    // before the call. Without a callback nobody would complete it: no hold.
                    st.awaiting_complete = st.flow_control && callbacks.message.0.is_some();
                }
                Event::Close { .. } | Event::Error(_) => st.phase = Phase::Finished,
            }
            let stop = st.awaiting_complete || event.is_final();
            batch.push_back(event);
            if stop {
                break;
            }
        }
        let waker = self.reopen_gate(&mut st);
        drop(st);
        if let Some(w) = waker {
            dispatch::wake_task(w);
        }
        callbacks
    }

    /// Returns undelivered events of a batch to the front of the inbox.
    fn put_back(&self, batch: &mut VecDeque<Event>) {
        let mut st = self.lock();
        while let Some(event) = batch.pop_back() {
            if let Event::Message(payload) = &event {
                st.inbox_bytes += payload.len();
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

    // ---- I/O task side ---------------------------------------------------------------------

    /// Queues one event for the host; schedules the connection if it can be dispatched now.
    pub fn deliver(self: &Arc<Self>, event: Event) {
        let mut batch = VecDeque::from([event]);
        self.deliver_batch(&mut batch);
    }

    /// Queues events for the host under one lock (emptying `events`), and schedules the
    /// connection if it can be dispatched now: one wake-up of the host per batch.
    pub fn deliver_batch(self: &Arc<Self>, events: &mut VecDeque<Event>) {
        self.deliver_then_gate(events, None);
    }

    /// `deliver_batch`, then (with a waker) the gate, under the same lock.
    pub fn deliver_then_gate(
        self: &Arc<Self>,
        events: &mut VecDeque<Event>,
        waker: Option<&Waker>,
    ) -> Gate {
        let (messages, bytes) = message_totals(events);
        let mut st = self.lock();
        if st.shutdown {
            events.clear();
            return Gate::Shutdown;
        }
        st.inbox_bytes += bytes;
        st.inbox_messages += messages;
        if st.inbox.is_empty() {
            // The usual case: the batch becomes the inbox, and the task keeps the empty one.
            std::mem::swap(&mut st.inbox, events);
        } else {
            st.inbox.append(events);
        }
        let schedule = !st.scheduled && deliverable(&st);
        st.scheduled |= schedule;
        let gate = waker.map_or(Gate::Closed, |w| self.gate_locked(&mut st, w));
        drop(st);
        if schedule {
            self.hub.schedule(self.clone());
        }
        gate
    }

    /// Whether (and how much) the task may read now; if it may not, `waker` is woken when it
    /// may, or when the client is freed.
    pub fn gate(&self, waker: &Waker) -> Gate {
        let mut st = self.lock();
        self.gate_locked(&mut st, waker)
    }

    fn gate_locked(&self, st: &mut State, waker: &Waker) -> Gate {
        if st.shutdown {
            return Gate::Shutdown;
        }
        // Kept even when open, so that freeing the client wakes a task waiting on its socket.
        store_waker(&mut st.task_waker, waker);
        if !st.outbox.is_empty() {
            // Queued since the task last looked, while it had no waker here: look again.
            waker.wake_by_ref();
        }
        st.gate_closed = !self.reading_allowed(st);
        if st.gate_closed {
            return Gate::Closed;
        }
        let one_at_a_time = st.flow_control && !st.close_requested;
        Gate::Open(Allowance {
            messages: if one_at_a_time { 1 } else { usize::MAX },
            bytes: self.receive_queue_limit - st.inbox_bytes,
        })
    }

    /// What the host asked for while the task was busy connecting; `waker` is woken on a change.
    pub fn control(&self, waker: &Waker) -> Control {
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

    pub fn set_protocol(&self, protocol: Option<String>) {
        self.lock().protocol = protocol;
    }

    /// Takes everything queued for the task into `into`, which must be empty (payload buffer
    /// included); one lock for all of it.
    pub fn take_commands(&self, into: &mut Outbox) {
        debug_assert!(into.is_empty() && into.payloads.is_empty());
        std::mem::swap(into, &mut self.lock().outbox);
    }

    /// The task is ending: later sends fail at once instead of waiting forever.
    pub fn task_ending(&self) {
        let mut st = self.lock();
        st.task_ended = true;
        let unsent = st.outbox.discard();
        self.buffered.fetch_sub(unsent, Ordering::Relaxed);
    }

    /// The task wrote `bytes` of queued messages to the socket.
    pub fn sent(&self, bytes: usize) {
        self.buffered.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The client is being freed: drop pending events and tell the task to stop.
    pub fn shut_down(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.inbox.clear();
        st.callbacks = Callbacks::default();
        let waker = st.task_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The task's waker, if the task waits for the gate and reading is allowed again.
    fn reopen_gate(&self, st: &mut State) -> Option<Waker> {
        if !st.gate_closed || !self.reading_allowed(st) {
            return None;
        }
        st.gate_closed = false;
        st.task_waker.take()
    }

    fn reading_allowed(&self, st: &State) -> bool {
        let held_by_flow_control = st.flow_control
            && !st.close_requested
            && (st.awaiting_complete || st.inbox_messages > 0);
        !held_by_flow_control && st.inbox_bytes < self.receive_queue_limit
    }
}

/// How many messages, and how many payload bytes, `events` holds.
fn message_totals(events: &VecDeque<Event>) -> (usize, usize) {
    events
        .iter()
        .fold((0, 0), |(messages, bytes), event| match event {
            Event::Message(payload) => (messages + 1, bytes + payload.len()),
            _ => (messages, bytes),
        })
}

/// Whether the first event in the inbox may be handed to the host now. While a message waits
/// for message_complete nothing follows it, the final event included: otherwise whether the
/// host could still complete its last message would depend on timing (whether the peer's close
/// was read before or after the host set flow control).
fn deliverable(st: &State) -> bool {
    !st.inbox.is_empty() && !st.awaiting_complete
}

/// Queues a command with `push`; returns the task's waker if the task may be waiting for one.
fn wake_if_first(st: &mut State, push: impl FnOnce(&mut Outbox)) -> Option<Waker> {
    let was_empty = st.outbox.is_empty();
    push(&mut st.outbox);
    if was_empty {
        st.task_waker.take()
    } else {
        None
    }
}

fn store_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}
