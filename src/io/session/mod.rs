//! The session of an open connection: move messages both ways until the connection ends.
//!
//! The session is one hand-written poll loop rather than `select!` over futures: nothing is
//! cancelled half-way, reading and writing never block each other, and one task (no split
//! stream, no second task) serves a connection, which keeps idle connections small. It reads
//! through `reader::FrameReader` and writes through `wire::Wire`, which the host's thread may
//! write to as well (small sends with nothing queued before them): the connection's lock says
//! who writes (`Conn::take_requests`, `Conn::release_writing`).
//!
//! Nothing here may wait by spinning: every `Poll::Pending` it returns has a waker registered
//! with something that will fire (the socket, the timer, or the host through the gate).
//!
//! - this module: the session's state, its poll loop (`step`) and its end;
//! - `reading`: frames from the socket into the host's batch, and reading ahead for pings;
//! - `writing`: the ordered queue of frames out, and writing it;
//! - `timers`: the close deadline and keepalive;
//! - `handover`: giving the reading to the dispatching thread and taking it back.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

use super::reader::FrameReader;
use crate::conn::{Conn, Counted, Event, Gate, PayloadArena, Taken};
use crate::deflate::{Agreed, Deflater, Inflater};
use crate::error::{Error, WsStatus};
use crate::host::dispatch;
use crate::options::Options;
use crate::wire::{Watch, Wire};

mod handover;
mod reading;
mod timers;
mod writing;

/// How long a client being freed waits for its close frame to be written (ws_client_free
/// returns within `client::FREE_WAIT`, a little more).
const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_millis(200);
/// Rounds of work before the task yields to the other connections on its thread.
const ROUNDS_PER_POLL: usize = 64;

/// Runs the session of an open connection on `wire`; `leftover` holds the bytes that arrived
/// with the upgrade response; `deflate`, permessage-deflate if it was agreed. Returns the final
/// event (None when the client is being freed).
pub(crate) async fn serve(
    conn: Arc<Conn>,
    wire: Wire,
    watch: Watch,
    leftover: Vec<u8>,
    options: Arc<Options>,
    deflate: Option<Agreed>,
) -> Option<Event> {
    // Made by a plain function and run as a temporary: a local Session held here would take
    // its size a second time in every connection's future (measured: 1632 -> 2568 bytes).
    start(conn, wire, watch, leftover, options, deflate).run().await
}

fn start(
    conn: Arc<Conn>,
    wire: Wire,
    watch: Watch,
    leftover: Vec<u8>,
    options: Arc<Options>,
    deflate: Option<Agreed>,
) -> Session {
    let wire = Arc::new(wire);
    let deflater = deflate.as_ref().map(Deflater::new);
    conn.attach_wire(wire.clone(), deflater.as_ref().map_or(usize::MAX, Deflater::compress_from));
    let inflater = deflate.as_ref().map(Inflater::new);
    let reader = FrameReader::new(leftover, options.read_buffer_size, options.max_message_size, inflater);
    let mut session = Session::new(conn, wire, watch, reader, options);
    if let Some(deflater) = deflater {
        session.taken.compress_from(deflater.compress_from());
        session.deflater = Some(Box::new(deflater));
    }
    session
}

/// How a session ended: the final event (None when the client is being freed) and a close
/// frame to send on the way out, if the protocol asks for one.
struct End {
    event: Option<Event>,
    close_with: Option<CloseFrame>,
}

impl End {
    fn event(event: Event) -> End {
        End { event: Some(event), close_with: None }
    }

    fn failing(status: WsStatus, message: String, code: CloseCode, reason: &'static str) -> End {
        End {
            event: Some(Event::Error(Error::new(status, message))),
            close_with: Some(CloseFrame { code, reason: reason.into() }),
        }
    }

    fn error(status: WsStatus, message: String) -> End {
        End::event(Event::Error(Error::new(status, message)))
    }
}

struct Session {
    /// The socket's registration with the I/O thread's reactor. First: dropped (deregistered)
    /// before the wire, which may close the socket.
    watch: Watch,
    conn: Arc<Conn>,
    wire: Arc<Wire>,
    /// The bytes the peer had acknowledged when the keepalive ping went out.
    acked_at_ping: u64,
    reader: FrameReader,
    /// Requests taken from the connection's outbox, not framed yet.
    taken: Taken,
    /// Framed bytes (headers, masked payloads) waiting to be written, in order.
    queued: VecDeque<Bytes>,
    options: Arc<Options>,
    /// Messages handed to the socket's queue (`queued`) and not fully written yet: they count
    /// toward bufferedAmount until they are.
    unflushed: Counted,
    /// The task is the connection's writer (see `Conn::take_requests`).
    writing: bool,
    /// The socket took less than we had for it: we wait until it is writable.
    write_blocked: bool,
    close_sent: bool,
    /// A keepalive ping to write.
    ping_due: bool,
    /// Our answer to the peer's close frame, to write.
    close_reply: Option<Option<CloseFrame>>,
    /// Payloads of pings to answer, oldest first.
    pongs: VecDeque<Bytes>,
    /// The peer's close frame (code, reason), once it arrived.
    peer_close: Option<(u16, String)>,
    /// The peer ended its side of the stream, seen while reading ahead.
    peer_eof: bool,
    /// The peer broke the protocol: how the session ends once the host has dispatched the
    /// messages read before the violation and its replies are written.
    failing: Option<End>,
    /// A host's thread is writing a send: the task writes nothing until it is done (and wakes
    /// the task).
    waiting_for_host: bool,
    close_deadline: Option<Instant>,
    last_heard: Instant,
    ping_sent: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// Events read but not yet handed to the host.
    batch: VecDeque<Event>,
    /// Where small payloads are copied to.
    arena: PayloadArena,
    /// permessage-deflate, if agreed: compresses what we send.
    deflater: Option<Box<Deflater>>,
    /// The host's thread reads the socket (see `crate::host::reading`); `reader` is a
    /// placeholder meanwhile.
    handed: bool,
    /// A read on the host's thread failed: reported once what was read before it is parsed.
    read_failed: Option<io::Error>,
    /// Messages the task read since the connection opened or since it last took its reading
    /// back, and whether the last one was small enough for the host's thread to read (see
    /// `offer_reading`).
    messages_read: u32,
    last_read_small: bool,
}
impl Session {
    fn new(conn: Arc<Conn>, wire: Arc<Wire>, watch: Watch, reader: FrameReader, options: Arc<Options>) -> Self {
        let now = Instant::now();
        let first_check = now + options.keepalive_interval.unwrap_or(Duration::from_secs(3600));
        Session {
            watch,
            conn,
            wire,
            acked_at_ping: 0,
            reader,
            taken: Taken::default(),
            queued: VecDeque::new(),
            options,
            unflushed: Counted::default(),
            writing: false,
            write_blocked: false,
            close_sent: false,
            ping_due: false,
            close_reply: None,
            pongs: VecDeque::new(),
            peer_close: None,
            peer_eof: false,
            failing: None,
            waiting_for_host: false,
            close_deadline: None,
            last_heard: now,
            ping_sent: None,
            timer: Box::pin(tokio::time::sleep_until(first_check)),
            batch: VecDeque::new(),
            arena: PayloadArena::default(),
            deflater: None,
            handed: false,
            read_failed: None,
            messages_read: 0,
            last_read_small: false,
        }
    }

    async fn run(mut self) -> Option<Event> {
        let end = poll_fn(|cx| self.poll(cx)).await;
        // The socket leaves the host's descriptor before the connection ends.
        if self.handed {
            if let Some(reading) = self.conn.take_reading_back(true, futures_util::task::noop_waker_ref()) {
                self.reader = reading.reader;
            }
            self.handed = false;
        }
        let (close_with, wait) = match end.event {
            None => {
                let away = CloseFrame { code: CloseCode::Away, reason: "client shutting down".into() };
                (Some(away), SHUTDOWN_CLOSE_WAIT)
            }
            Some(_) => (end.close_with, self.options.close_timeout.min(Duration::from_secs(1))),
        };
        // Best effort, and bounded: the connection is ending either way. The close frame (if
        // the protocol asks for one and none went out yet), then the end of our side of the
        // stream: a TCP FIN, after a TLS close_notify for wss.
        self.conn.detach_wire();
        if let (Some(frame), false) = (close_with, self.close_sent) {
            self.close_reply = Some(Some(frame));
        }
        let _ = tokio::time::timeout(wait, poll_fn(|cx| self.poll_wind_up(cx))).await;
        end.event
    }

    /// Writes what must still go out (the close frame), then shuts our side of the stream.
    fn poll_wind_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.write_round(cx) {
                Err(_) => return Poll::Ready(Ok(())),
                // (A host's thread writing wakes the task when it is done.)
                Ok(_) if self.write_blocked || self.waiting_for_host => return Poll::Pending,
                Ok(true) => continue,
                Ok(false) => break,
            }
        }
        self.wire.poll_shut_down(&self.watch, cx)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        // The host is woken once this poll is done (see `HostWakes`).
        let _host_wakes = dispatch::HostWakes::hold();
        let outcome = self.poll_rounds(cx);
        // What was read goes to the host before the task waits or ends (so messages always
        // precede the final event).
        self.hand_over();
        if outcome.is_pending() {
            // Idle connections keep no block and no read buffer of their own.
            self.arena.release();
            self.reader.release_if_drained();
            self.offer_reading(cx);
        }
        outcome
    }

    fn poll_rounds(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        for _ in 0..ROUNDS_PER_POLL {
            match self.step(cx) {
                Ok(true) => continue,
                Ok(false) => return Poll::Pending,
                Err(end) => return Poll::Ready(end),
            }
        }
        // Plenty done: let the other connections on this thread run, then come back. Through
        // tokio's yield_now, which wakes the task only after the runtime has polled for I/O: a
        // plain self-wake put it back in the run queue at once, and the runtime looks for I/O
        // only every 61 task polls, so a connection flooded with frames starved the others of
        // their readiness (370 ms gaps in a 10 ms tick on another connection).
        let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
        Poll::Pending
    }

    /// One round of work. Ok(true): progress was made, go again. Ok(false): all is waiting.
    fn step(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let mut progress = self.write_round(cx)?;
        if self.peer_close.is_some() && self.close_frame_out() {
            // Both close frames have been exchanged: the close handshake is complete.
            let (code, reason) = self.peer_close.take().unwrap_or((1005, String::new()));
            return Err(End::event(Event::close(code, &reason)));
        }
        if self.failing.is_some() {
            return self.finish_failing(cx, progress);
        }
        // Hand over what was read (so that the gate counts it) and ask the gate, in one lock.
        self.arena.drain_into(&mut self.batch);
        // Requests queued meanwhile wake the task only if it can take them: not while it waits
        // for the socket, nor after our close frame (they are dropped where they wait).
        let asking = Some((cx.waker(), !self.write_blocked && !self.close_sent));
        let permit = self.conn.deliver_then_gate(&mut self.batch, asking);
        if permit.close_requested {
            // The close timeout bounds the whole close, what still waits to be sent included.
            self.arm_close_deadline();
        }
        match permit.gate {
            Gate::Shutdown => return Err(End { event: None, close_with: None }),
            // The host's thread reads: the task takes the reading back when the host gives
            // it back, and for a close, for its timer (keepalive, close deadline), and when
            // the socket stops taking what it writes: a connection that sends faster than the
            // peer reads is not in request/reply, and the pings that arrive meanwhile are read
            // and answered (or coalesced) at once, as ever, while the writes wait.
            _ if self.handed => {
                let now = permit.close_requested
                    || self.close_deadline.is_some()
                    || self.timer.is_elapsed()
                    || self.write_blocked;
                progress |= self.reading_back(now, cx)?;
            }
            Gate::Open(allowance) => progress |= self.read(cx, allowance)?,
            Gate::Closed => {
                // The host is behind, not the peer: silence while we do not read proves nothing.
                self.last_heard = Instant::now();
                self.ping_sent = None;
                progress |= self.read_ahead(cx)?;
            }
        }
        progress |= self.check_timers(cx)?;
        Ok(progress)
    }

    /// Hands the messages read so far to the host, if there are any.
    fn hand_over(&mut self) {
        self.arena.drain_into(&mut self.batch);
        if !self.batch.is_empty() {
            self.conn.deliver_then_gate(&mut self.batch, None);
        }
    }
}
