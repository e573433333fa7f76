//! The connection's state machine, phase by event: what the host's calls do in each phase, what
//! dispatch delivers, when the I/O task may read, and what it is woken for.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Wake, Waker};
use std::time::Duration;

use tungstenite::protocol::CloseFrame;

use super::event::RECEIVE_OVERHEAD;
use super::outbox::SEND_OVERHEAD;
use super::*;
use crate::error::{Error, WsStatus};
use crate::host::callbacks::WsMessageKind;
use crate::host::handles;

/// What the callbacks saw, in order.
#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl Seen {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

unsafe extern "C" fn on_open(_: WsConn, user: *mut c_void) {
    (*(user as *const Seen)).push("open".into());
}
unsafe extern "C" fn on_message(_: WsConn, data: *const u8, len: usize, kind: WsMessageKind, user: *mut c_void) {
    let bytes = std::slice::from_raw_parts(data, len);
    (*(user as *const Seen)).push(format!("{kind:?} {}", String::from_utf8_lossy(bytes)));
}
unsafe extern "C" fn on_close(_: WsConn, code: u16, _: *const c_char, _: usize, user: *mut c_void) {
    (*(user as *const Seen)).push(format!("close {code}"));
}
unsafe extern "C" fn on_error(_: WsConn, kind: WsStatus, _: *const c_char, user: *mut c_void) {
    (*(user as *const Seen)).push(format!("error {kind:?}"));
}

/// Counts the times the I/O task would be woken.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fixture {
    conn: Arc<Conn>,
    seen: Box<Seen>,
    wakes: Arc<CountingWaker>,
    waker: Waker,
    batch: VecDeque<Event>,
}

impl Fixture {
    fn new(send_limit: usize, receive_limit: usize) -> Fixture {
        let hub = Arc::new(Hub::new().unwrap());
        let conn = handles::insert(|id| Arc::new(Conn::new(id, hub, send_limit, receive_limit)));
        let seen = Box::<Seen>::default();
        let user = &*seen as *const Seen as *mut c_void;
        conn.set_callbacks(|c| {
            c.open = (Some(on_open), callbacks::UserPtr(user));
            c.message = (Some(on_message), callbacks::UserPtr(user));
            c.close = (Some(on_close), callbacks::UserPtr(user));
            c.error = (Some(on_error), callbacks::UserPtr(user));
        });
        let wakes = Arc::new(CountingWaker::default());
        let waker = Waker::from(wakes.clone());
        Fixture { conn, seen, wakes, waker, batch: VecDeque::new() }
    }

    fn dispatch(&mut self) -> Vec<String> {
        let budget = self.conn.pending_events();
        self.conn.dispatch(&mut self.batch, budget);
        self.seen.take()
    }

    /// Hands events over as the task does, and asks the gate.
    fn deliver(&self, events: impl IntoIterator<Item = Event>) -> super::task_side::Permit {
        let mut events: VecDeque<Event> = events.into_iter().collect();
        self.conn.deliver_then_gate(&mut events, Some((&self.waker, true)))
    }

    fn gate(&self) -> Gate {
        self.deliver([]).gate
    }

    fn wakes(&self) -> usize {
        self.wakes.0.load(Ordering::SeqCst)
    }
}

impl Drop for Fixture {
    /// Ends the connection as a client's free would (the handle table and the hub's ready list
    /// would otherwise keep it and its hub alive: a leak under LeakSanitizer).
    fn drop(&mut self) {
        handles::remove(self.conn.id);
        self.conn.shut_down();
        self.conn.hub.clear();
    }
}

fn text(s: &str) -> Event {
    Event::Message(Payload::owned([s.as_bytes(), b"\0"].concat(), true))
}

fn binary(bytes: &[u8]) -> Event {
    Event::Message(Payload::owned(bytes.to_vec(), false))
}

fn frame() -> CloseFrame {
    CloseFrame { code: 1000.into(), reason: "".into() }
}

use crate::host::callbacks;

#[test]
fn connecting_then_open_then_messages_then_close() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    assert_eq!(f.dispatch(), Vec::<String>::new());
    assert!(f.conn.send_text("early").is_ok(), "sends before open are queued");
    assert_eq!(f.conn.buffered_amount(), 5);
    f.deliver([Event::Open, text("a"), binary(b"b")]);
    assert_eq!(f.dispatch(), ["open", "Text a", "Binary b"]);
    f.deliver([Event::close(1000, "bye")]);
    assert_eq!(f.dispatch(), ["close 1000"]);
    assert!(handles::lookup(f.conn.id).is_none(), "gone after the final callback");
}

#[test]
fn nothing_follows_the_final_event() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([Event::Open, Event::Error(Error::new(WsStatus::ConnectionLost, "lost")), text("late")]);
    assert_eq!(f.dispatch(), ["open", "error ConnectionLost"]);
    assert_eq!(f.dispatch(), Vec::<String>::new());
}

#[test]
fn close_in_each_phase() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    // Connecting: close is accepted once, then refused as already closing; sends are refused.
    assert!(f.conn.close(frame()).is_ok());
    assert_eq!(f.conn.close(frame()).unwrap_err().status, WsStatus::AlreadyClosing);
    assert_eq!(f.conn.send_text("x").unwrap_err().status, WsStatus::Closing);
    assert!(f.deliver([]).close_requested, "the task learns of the close at once");
    // The open that raced with the close is not delivered: the host no longer expects it.
    f.deliver([Event::Open, Event::close(1006, "")]);
    assert_eq!(f.dispatch(), ["close 1006"]);
}

#[test]
fn close_while_the_final_callback_runs_is_closing() {
    let f = Fixture::new(1 << 20, 1 << 20);
    let conn = f.conn.clone();
    f.deliver([Event::Open]);
    let mut f = f;
    f.dispatch();
    // Open: close is accepted, and flow control is no longer honoured by the task.
    conn.set_flow_control(true);
    f.deliver([text("held")]);
    assert_eq!(f.dispatch(), ["Text held"]);
    assert_eq!(f.gate(), Gate::Closed, "a message awaits completion");
    assert!(conn.close(frame()).is_ok());
    assert!(matches!(f.gate(), Gate::Open(Allowance { messages: usize::MAX, .. })), "closing reads the peer's close");
}

#[test]
fn flow_control_delivers_one_message_per_completion() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([Event::Open]);
    f.dispatch();
    f.conn.set_flow_control(true);
    assert_eq!(f.gate(), Gate::Open(Allowance { messages: 1, cost: 1 << 20 }));
    f.deliver([text("1"), text("2"), Event::close(1000, "")]);
    assert_eq!(f.dispatch(), ["Text 1"]);
    assert_eq!(f.dispatch(), Vec::<String>::new(), "held until message_complete");
    let woken = f.wakes();
    assert_eq!(f.gate(), Gate::Closed);
    f.conn.message_complete();
    assert_eq!(f.dispatch(), ["Text 2"]);
    // The final event, too, waits for the last message to be completed.
    assert_eq!(f.dispatch(), Vec::<String>::new());
    f.conn.message_complete();
    assert!(f.wakes() > woken, "completing reopens the gate and wakes the task");
    assert_eq!(f.dispatch(), ["close 1000"]);
}

#[test]
fn turning_flow_control_off_releases_a_held_message() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([Event::Open]);
    f.dispatch();
    f.conn.set_flow_control(true);
    f.deliver([text("1"), text("2"), text("3")]);
    assert_eq!(f.dispatch(), ["Text 1"]);
    f.conn.set_flow_control(false);
    assert_eq!(f.dispatch(), ["Text 2", "Text 3"]);
}

#[test]
fn every_message_counts_against_the_receive_queue_limit_empty_ones_too() {
    let limit = 100 * RECEIVE_OVERHEAD;
    let mut f = Fixture::new(1 << 20, limit);
    f.deliver([Event::Open]);
    f.dispatch();
    let mut delivered = 0;
    while f.gate() != Gate::Closed {
        f.deliver([binary(b"")]);
        delivered += 1;
        assert!(delivered <= 100, "empty messages must count");
    }
    assert!(delivered >= 50, "{delivered} messages closed the gate: each costs its allocation plus bookkeeping");
    let woken = f.wakes();
    assert_eq!(f.dispatch().len(), delivered);
    assert!(f.wakes() > woken, "taking them reopens the gate and wakes the task");
    assert!(matches!(f.gate(), Gate::Open(_)));
}

#[test]
fn every_send_counts_against_the_send_queue_limit_empty_ones_too() {
    let f = Fixture::new(10 * SEND_OVERHEAD, 1 << 20);
    for _ in 0..10 {
        assert!(f.conn.send_binary(b"").is_ok());
    }
    let refused = f.conn.send_binary(b"").unwrap_err();
    assert_eq!(refused.status, WsStatus::SendQueueFull);
    assert_eq!(f.conn.buffered_amount(), 0, "bufferedAmount counts payload bytes only");
    // Written: the room comes back.
    f.conn.sent(Counted::message(0));
    assert!(f.conn.send_binary(b"").is_ok());
}

#[test]
fn the_end_of_the_task_empties_the_send_queue() {
    let f = Fixture::new(1 << 20, 1 << 20);
    f.conn.send_text("never sent").unwrap();
    f.conn.send_binary(&[0; 100]).unwrap();
    assert_eq!(f.conn.buffered_amount(), 110);
    f.conn.task_ending();
    assert_eq!(f.conn.buffered_amount(), 0);
    assert_eq!(f.conn.send_text("x").unwrap_err().status, WsStatus::Closing);
}

#[test]
fn requests_reach_the_task_in_order_and_wake_it_once() {
    let f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([]);
    let woken = f.wakes();
    f.conn.send_text("a").unwrap();
    f.conn.send_binary(b"b").unwrap();
    f.conn.close(frame()).unwrap();
    assert_eq!(f.wakes(), woken + 1, "only the first request wakes the task");
    let mut taken = Taken::default();
    assert!(f.conn.take_requests(&mut taken, false, &f.waker));
    let mut order = Vec::new();
    while let Some(request) = taken.pop() {
        order.push(match request {
            Outgoing::Message { payload, .. } => format!("{} bytes", payload.len()),
            Outgoing::Close(_) => "close".into(),
            _ => "other".into(),
        });
    }
    assert_eq!(order, ["1 bytes", "1 bytes", "close"]);
}

#[test]
fn a_task_blocked_writing_is_not_woken_by_what_it_cannot_take() {
    let f = Fixture::new(1 << 20, 1 << 20);
    f.conn.send_text("queued while the task had no waker").unwrap();
    let woken = f.wakes();
    let mut none = VecDeque::new();
    // Blocked writing: asking the gate must not wake the task (it would spin).
    f.conn.deliver_then_gate(&mut none, Some((&f.waker, false)));
    assert_eq!(f.wakes(), woken);
    // Able to take requests: it looks again.
    f.conn.deliver_then_gate(&mut none, Some((&f.waker, true)));
    assert_eq!(f.wakes(), woken + 1);
}

/// While a host's thread writes a send without the lock, the task takes nothing and writes
/// nothing of its own (bytes would interleave), does not wake itself for what was queued
/// meanwhile (it would spin), and asks to be woken when the host's thread is done.
#[test]
fn while_a_hosts_thread_writes_the_task_waits_without_spinning() {
    let f = Fixture::new(1 << 20, 1 << 20);
    f.conn.lock().host_writing = true;
    f.conn.send_text("queued behind the host's write").unwrap();
    let woken = f.wakes();
    let mut taken = Taken::default();
    assert!(!f.conn.take_requests(&mut taken, true, &f.waker), "a pong of its own must wait too");
    assert!(taken.is_empty());
    let mut none = VecDeque::new();
    f.conn.deliver_then_gate(&mut none, Some((&f.waker, true)));
    assert_eq!(f.wakes(), woken, "not woken while it could not take them");
    {
        let st = f.conn.lock();
        assert!(st.task_waits_for_host && !st.task_writing && st.task_waker.is_some());
    }
    // The host's thread is done (as `write_claimed` ends): the task takes the send.
    f.conn.lock().host_writing = false;
    assert!(f.conn.take_requests(&mut taken, false, &f.waker));
    assert!(!taken.is_empty());
    assert!(f.conn.lock().task_writing);
}

#[test]
fn drained_waits_for_the_callbacks_and_completion() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([Event::Open]);
    f.dispatch();
    f.conn.set_flow_control(true);
    f.deliver([text("1")]);
    assert!(!f.conn.drained(&f.waker));
    let woken = f.wakes();
    assert_eq!(f.dispatch(), ["Text 1"]);
    assert!(!f.conn.drained(&f.waker), "dispatched but not completed");
    f.conn.message_complete();
    assert!(f.wakes() > woken);
    assert!(f.conn.drained(&f.waker));
}

#[test]
fn freeing_the_client_stops_the_task_and_drops_events() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([Event::Open, text("x")]);
    let woken = f.wakes();
    f.conn.shut_down();
    assert!(f.wakes() > woken);
    assert_eq!(f.gate(), Gate::Shutdown);
    assert_eq!(f.dispatch(), Vec::<String>::new());
}

static CALLBACK_RUNNING: AtomicBool = AtomicBool::new(false);
static REPLACED_WHILE_RUNNING: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn slow_message(_: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    let barrier = &*(user as *const Barrier);
    CALLBACK_RUNNING.store(true, Ordering::SeqCst);
    barrier.wait();
    // Gives the other thread every chance to replace the callback while this one runs.
    std::thread::sleep(Duration::from_millis(50));
    CALLBACK_RUNNING.store(false, Ordering::SeqCst);
}

unsafe extern "C" fn replacement(_: WsConn, _: *const u8, _: usize, _: WsMessageKind, user: *mut c_void) {
    (*(user as *const Seen)).push("replacement".into());
}

#[test]
fn a_registration_from_another_thread_waits_for_the_running_callback() {
    let mut f = Fixture::new(1 << 20, 1 << 20);
    f.deliver([Event::Open]);
    f.dispatch();
    let barrier = Box::new(Barrier::new(2));
    let user = &*barrier as *const Barrier as *mut c_void;
    f.conn.set_callbacks(|c| c.message = (Some(slow_message), callbacks::UserPtr(user)));
    f.deliver([text("1")]);
    let conn = f.conn.clone();
    let seen = &*f.seen as *const Seen as usize;
    let barrier_addr = user as usize;
    let other = std::thread::spawn(move || {
        // Starts while the first message's callback runs.
        let barrier = unsafe { &*(barrier_addr as *const Barrier) };
        barrier.wait();
        conn.set_callbacks(|c| c.message = (Some(replacement), callbacks::UserPtr(seen as *mut c_void)));
        // In force once it returned: the old callback is not running, and will not run again.
        REPLACED_WHILE_RUNNING.store(CALLBACK_RUNNING.load(Ordering::SeqCst), Ordering::SeqCst);
    });
    f.dispatch();
    other.join().unwrap();
    assert!(!REPLACED_WHILE_RUNNING.load(Ordering::SeqCst), "the registration returned while the old callback ran");
    f.deliver([text("2")]);
    assert_eq!(f.dispatch(), ["replacement"], "the next message goes to the new callback");
}
