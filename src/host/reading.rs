//! Reading on the host's thread: a request/reply round trip without a switch between threads.
//!
//! When the I/O task of an open connection has nothing in hand (no unparsed byte, no message
//! held by the host, no close under way, no compression) and the host has dispatched lately,
//! it hands the reading of the socket to the host's thread: the socket joins the epoll
//! instance behind `ws_client_fd()` and the task stops watching it for reading (`Watch`).
//! Data arriving then wakes the host's loop and nothing else; `ws_dispatch` reads it and
//! parses the whole small data frames (at most 16 KiB, unfragmented, uncompressed) into the
//! connection's queue, as the task would have, before running the callbacks. That is one
//! thread woken per round trip instead of two, and two system calls fewer.
//!
//! Anything else gives the reading back to the task, with the bytes read and left unparsed:
//! a control frame (pings are answered by the task), a fragment, a larger frame, bytes that
//! break the protocol, the end of the stream or an error, a full receive queue or flow
//! control, TLS records that need an answer. The task also takes it back by itself: for
//! `ws_close`, for its keepalive timer, when the client is freed, and, through the hub's
//! watchdog, when the host has not dispatched for `HOST_SILENT` (a host busy elsewhere must
//! not leave a server's pings unanswered).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::conn::{Allowance, Conn, Event, PayloadArena};
use crate::io::reader::{FrameReader, OnHost};
use crate::wire::{Receiving, Wire};

/// The largest frame the host's thread reads; larger ones are read by the I/O task, where they
/// do not cost the host's thread (as with sends, `WRITE_ON_HOST_THREAD_MAX`).
pub(crate) const READ_ON_HOST_MAX: usize = 16 << 10;
/// Socket reads of one connection in one dispatch: more waits for the next dispatch, so that
/// one busy connection does not hold up the others' callbacks.
const READS_PER_DISPATCH: usize = 4;
/// Messages read in one dispatch, at most (as an I/O task's batch).
const MESSAGES_PER_DISPATCH: usize = 1024;
/// How long the host may go without dispatching before the I/O task takes every connection's
/// reading back (checked by the hub's watchdog, every `HOST_SILENT`): a ping waiting for a
/// host busy elsewhere is answered within twice this.
pub(crate) const HOST_SILENT: Duration = Duration::from_millis(100);

/// What a dispatch reads with, one connection at a time: kept by the client (in its dispatch's
/// scratch) rather than by every connection, and freed with the client, not left with the
/// thread.
#[derive(Default)]
pub(crate) struct ReadTools {
    /// Where the messages read are copied (released after each connection: a block holds
    /// one connection's messages, and is charged to it).
    arena: PayloadArena,
    batch: VecDeque<Event>,
    /// The read buffer no connection holds (see `FrameReader::swap_spare`).
    spare: Vec<u8>,
}

impl ReadTools {
    /// Lends the spare buffer to this thread's readers for as long as `read` runs.
    pub(crate) fn with_spare<R>(&mut self, read: impl FnOnce(&mut ReadTools) -> R) -> R {
        let thread_spare = FrameReader::swap_spare(std::mem::take(&mut self.spare));
        let result = read(self);
        self.spare = FrameReader::swap_spare(thread_spare);
        result
    }
}

/// The reading side of a connection, while the host's thread has it.
pub(crate) struct Reading {
    pub(crate) reader: FrameReader,
    wire: Arc<Wire>,
    /// The task takes it back: it stopped being read on the host's thread.
    pub(crate) returned: bool,
    /// Something was read since the hand-over (the keepalive hears the peer).
    pub(crate) heard: bool,
    /// The host's read found the end of the stream (Ok) or failed (Err); the task reports it
    /// once the bytes before it are parsed.
    pub(crate) ended: Option<io::Result<()>>,
    /// The I/O task, woken when the reading comes back.
    task: Waker,
    /// The socket reported more than data (see `ReadySocket`): read it until it says it is
    /// empty, a read shorter than asked does not prove it.
    beyond_data: bool,
}

/// What one dispatch's read left.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The socket had no more.
    Drained,
    /// The socket may have more: read again at the next dispatch.
    Again,
    /// Give the reading back to the task.
    GiveBack,
}

/// The slot in each connection where its reading waits while the host's thread has it.
#[derive(Default)]
pub(crate) struct ReadingSlot(Mutex<Option<Box<Reading>>>);

impl ReadingSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Box<Reading>>> {
        crate::sync::lock(&self.0)
    }
}

impl Conn {
    /// The I/O task hands its reading to the host's thread; the socket joins the hub's
    /// descriptor. Returns the reader back if the descriptor refused the socket.
    pub(crate) fn hand_reading_to_host(
        self: &Arc<Self>,
        reader: FrameReader,
        wire: Arc<Wire>,
        task: &Waker,
    ) -> Result<(), FrameReader> {
        let fd = wire.socket();
        let reading = Box::new(Reading {
            reader,
            wire,
            returned: false,
            heard: false,
            ended: None,
            task: task.clone(),
            beyond_data: false,
        });
        let mut slot = self.reading.lock();
        debug_assert!(slot.is_none());
        self.hub.add_reader(self);
        if self.hub.watch_socket(fd, self.id).is_err() {
            self.hub.forget_reader(self.id);
            return Err(reading.reader);
        }
        *slot = Some(reading);
        Ok(())
    }

    /// The I/O task: takes its reading back if the host gave it back, or (`now`) in any case.
    /// Otherwise None, and `task` is woken when the host gives it back.
    pub(crate) fn take_reading_back(&self, now: bool, task: &Waker) -> Option<Box<Reading>> {
        let mut slot = self.reading.lock();
        let reading = slot.as_mut()?;
        if !reading.returned {
            if !now {
                if !reading.task.will_wake(task) {
                    reading.task = task.clone();
                }
                return None;
            }
            self.stop_host_reading(reading);
        }
        slot.take()
    }

    /// The hub's watchdog: the host has not dispatched for a while; the task takes the
    /// reading back (woken now).
    pub(crate) fn return_reading(&self) {
        let mut slot = self.reading.lock();
        if let Some(reading) = slot.as_mut().filter(|r| !r.returned) {
            self.stop_host_reading(reading);
            reading.task.wake_by_ref();
        }
    }

    /// Takes the socket out of the hub's descriptor; the reading is the task's again.
    fn stop_host_reading(&self, reading: &mut Reading) {
        reading.returned = true;
        self.hub.unwatch_socket(reading.wire.socket());
        self.hub.forget_reader(self.id);
    }

    /// ws_dispatch, for a connection whose socket the harvest found ready (`beyond_data`: see
    /// `ReadySocket`): reads it and queues the messages for this dispatch. Returns whether to
    /// read again at the next dispatch (the socket may have more than one dispatch takes).
    pub(crate) fn read_on_host(self: &Arc<Self>, tools: &mut ReadTools, beyond_data: bool) -> bool {
        let mut slot = self.reading.lock();
        let Some(reading) = slot.as_mut().filter(|r| !r.returned) else {
            // Given back meanwhile: the task reads it.
            return false;
        };
        reading.beyond_data |= beyond_data;
        match reading.read(self, tools) {
            Outcome::Drained => false,
            Outcome::Again => true,
            Outcome::GiveBack => {
                self.stop_host_reading(reading);
                // Woken now, not when the batch of callbacks this dispatch may be nested in
                // ends (`dispatch::wake_task`): a loop run on this client from another
                // client's callback waits for what the task does next.
                reading.task.wake_by_ref();
                false
            }
        }
    }
}

impl Reading {
    fn read(&mut self, conn: &Arc<Conn>, tools: &mut ReadTools) -> Outcome {
        let Some(allowance) = conn.host_allowance() else {
            return Outcome::GiveBack;
        };
        let outcome = self.read_into(conn, allowance, &mut tools.arena, &mut tools.batch);
        // Nothing of this connection stays in the arena: the next one starts a block of its
        // own (what a block costs is charged to the connection whose messages it holds).
        tools.arena.release();
        outcome
    }

    fn read_into(
        &mut self,
        conn: &Arc<Conn>,
        mut allowance: Allowance,
        arena: &mut PayloadArena,
        batch: &mut VecDeque<Event>,
    ) -> Outcome {
        allowance.messages = allowance.messages.min(MESSAGES_PER_DISPATCH);
        // Nothing waits on this context: the host's loop is woken by the descriptor.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let wanted_write = self.wire.session_wants_write();
        let (mut messages, mut cost, mut reads) = (0, 0, 0);
        let mut from = Receiving::host(&self.wire, !self.beyond_data);
        let outcome = loop {
            if messages >= allowance.messages || cost >= allowance.cost {
                // The rest waits for the next dispatch (or the task, if the gate stays closed).
                break Outcome::Again;
            }
            match self.reader.next_on_host(READ_ON_HOST_MAX) {
                OnHost::Message { text } => {
                    let payload = self.reader.payload();
                    // Copied out of the read buffer (text with the NUL the C API promises).
                    let parts: &[&[u8]] = if text { &[payload, b"\0"] } else { &[payload] };
                    cost += arena.push(parts, text, batch);
                    messages += 1;
                    continue;
                }
                OnHost::Other => break Outcome::GiveBack,
                // A short read emptied the socket: its next bytes are a new wake-up.
                OnHost::NeedBytes if from.drained() => break Outcome::Drained,
                OnHost::NeedBytes if reads == READS_PER_DISPATCH => break Outcome::Again,
                OnHost::NeedBytes => {}
            }
            reads += 1;
            match self.reader.poll_read_on_host(&mut from, &mut cx) {
                Poll::Ready(Ok(0)) => {
                    self.ended = Some(Ok(()));
                    break Outcome::GiveBack;
                }
                Poll::Ready(Ok(_)) => self.heard = true,
                Poll::Ready(Err(e)) => {
                    self.ended = Some(Err(e));
                    break Outcome::GiveBack;
                }
                Poll::Pending => {
                    // The socket said it is empty: whatever comes next is a new wake-up.
                    self.beyond_data = false;
                    break Outcome::Drained;
                }
            }
        };
        arena.drain_into(batch);
        if !batch.is_empty() {
            conn.deliver_then_gate(batch, None);
        }
        if outcome == Outcome::Drained {
            // Nothing waits: an idle connection holds no buffer.
            self.reader.release_if_drained();
        }
        // TLS: reading may have produced records to send (an alert, a key update's answer):
        // the task writes them.
        if !wanted_write && self.wire.session_wants_write() {
            return Outcome::GiveBack;
        }
        outcome
    }
}

/// The connections of a hub whose reading the host's thread has, by connection id.
#[derive(Default)]
pub(crate) struct Readers(Mutex<std::collections::HashMap<u64, Weak<Conn>>>);

impl Readers {
    pub(crate) fn add(&self, conn: &Arc<Conn>) {
        crate::sync::lock(&self.0).insert(conn.id, Arc::downgrade(conn));
    }

    pub(crate) fn remove(&self, id: u64) {
        crate::sync::lock(&self.0).remove(&id);
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Conn>> {
        crate::sync::lock(&self.0).get(&id).and_then(Weak::upgrade)
    }

    pub(crate) fn is_empty(&self) -> bool {
        crate::sync::lock(&self.0).is_empty()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Conn>> {
        crate::sync::lock(&self.0).values().filter_map(Weak::upgrade).collect()
    }

    pub(crate) fn clear(&self) {
        crate::sync::lock(&self.0).clear();
    }
}

/// The hand-over, phase by event, on a real socket: the host's reads, each way the reading goes
/// back to the task, and what wakes the task.
#[cfg(all(test, target_os = "linux", not(feature = "pipe-wake")))]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;
    use crate::host::dispatch::Hub;
    use crate::host::wakeup::ReadySocket;
    use crate::io::reader::Item;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn readable(fd: std::os::fd::RawFd) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    fn text(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x81, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    /// Waits (bounded) until the hub's descriptor is readable: the peer's bytes arrived.
    fn until_readable(hub: &Hub) {
        let mut pfd = libc::pollfd { fd: hub.fd(), events: libc::POLLIN, revents: 0 };
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "the peer's bytes never woke the descriptor");
    }

    #[test]
    fn the_reading_goes_to_the_host_and_back_phase_by_event() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (wire, _watch) = Wire::plain(tokio::net::TcpStream::from_std(ours).unwrap()).unwrap();
        let wire = Arc::new(wire);
        let hub = Arc::new(Hub::new().unwrap());
        let conn = Arc::new(Conn::new(7, hub.clone(), 1 << 20, 1 << 20));
        let task = Arc::new(CountingWaker::default());
        let waker = Waker::from(task.clone());
        let woken = || task.0.load(Ordering::SeqCst);
        let mut tools = ReadTools::default();
        let new_reader = || FrameReader::new(Vec::new(), 4096, 1 << 20, None);
        let mut harvested = Vec::new();
        let beyond = |h: &[ReadySocket]| h.iter().any(|r| r.beyond_data);

        // Handed over: nothing arrived, nothing to read.
        assert!(conn.hand_reading_to_host(new_reader(), wire.clone(), &waker).is_ok());
        assert!(!readable(hub.fd()));
        // A small message: it wakes the descriptor, the host reads it into the queue, the
        // task is not woken and the reading stays with the host.
        peer.write_all(&text(b"one")).unwrap();
        until_readable(&hub);
        hub.clone().dispatch_harvest_for_tests(&mut harvested);
        assert_eq!(harvested, [ReadySocket { id: 7, beyond_data: false }]);
        assert!(!conn.read_on_host(&mut tools, beyond(&harvested)), "drained");
        assert_eq!(conn.pending_events(), 1);
        assert_eq!(woken(), 0);
        assert!(conn.take_reading_back(false, &waker).is_none(), "still the host's");

        // A ping: given back unread, the task woken, the socket out of the descriptor.
        peer.write_all(&[0x89, 1, b'p']).unwrap();
        until_readable(&hub);
        hub.clone().dispatch_harvest_for_tests(&mut harvested);
        assert!(!conn.read_on_host(&mut tools, beyond(&harvested)));
        assert_eq!(woken(), 1);
        peer.write_all(&text(b"two")).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!readable(hub.fd()), "a socket given back no longer wakes the host");
        let mut back = conn.take_reading_back(false, &waker).expect("given back");
        assert!(back.returned && back.heard && back.ended.is_none());
        assert_eq!(back.reader.next_item(), Ok(Some(Item::Ping)), "the ping waits for the task");
        assert!(!conn.read_on_host(&mut tools, beyond(&harvested)), "nothing to read once taken back");

        // Handed over again (the task read "two"), then taken back by the watchdog: the task
        // is woken and takes it.
        let mut reader = back.reader;
        let mut buf = vec![0; 64];
        let n = crate::wire::recv(wire.socket(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &text(b"two")[..]);
        reader.release_if_drained();
        assert!(conn.hand_reading_to_host(reader, wire.clone(), &waker).is_ok());
        conn.return_reading();
        assert_eq!(woken(), 2);
        let back = conn.take_reading_back(false, &waker).expect("taken back by the watchdog");
        assert!(!back.heard);

        // Handed over, then taken back by the task itself (ws_close, its timer): no wake-up.
        assert!(conn.hand_reading_to_host(back.reader, wire.clone(), &waker).is_ok());
        let back = conn.take_reading_back(true, &waker).expect("taken back now");
        assert_eq!(woken(), 2);

        // Flow control: the host reads nothing and gives the reading back.
        assert!(conn.hand_reading_to_host(back.reader, wire.clone(), &waker).is_ok());
        conn.set_flow_control(true);
        peer.write_all(&text(b"three")).unwrap();
        until_readable(&hub);
        hub.clone().dispatch_harvest_for_tests(&mut harvested);
        assert!(!conn.read_on_host(&mut tools, beyond(&harvested)));
        assert_eq!(woken(), 3);
        let mut back = conn.take_reading_back(false, &waker).expect("given back for flow control");
        assert_eq!(back.reader.next_item(), Ok(None), "nothing read");
        conn.set_flow_control(false);

        // The end of the stream: given back with it.
        let n = crate::wire::recv(wire.socket(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &text(b"three")[..]);
        assert!(conn.hand_reading_to_host(back.reader, wire.clone(), &waker).is_ok());
        drop(peer);
        until_readable(&hub);
        hub.clone().dispatch_harvest_for_tests(&mut harvested);
        assert!(!conn.read_on_host(&mut tools, beyond(&harvested)));
        let back = conn.take_reading_back(false, &waker).expect("given back at the end");
        assert!(matches!(back.ended, Some(Ok(()))));
        assert_eq!(woken(), 4);
    }
}
