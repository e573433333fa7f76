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

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::time::{Instant, Sleep};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

use super::reader::{Buffered, FrameReader, Item, ReadError};
use crate::conn::{Allowance, Conn, Counted, Event, Gate, Outgoing, Payload, PayloadArena, Taken};
use crate::deflate::{Agreed, Deflater, Inflater};
use crate::error::{Error, WsStatus};
use crate::host::dispatch;
use crate::options::Options;
use crate::wire::frame::{self, Opcode};
use crate::wire::{Receiving, Watch, Wire, Written};

/// Pieces of frames handed to one write (one sendmsg for plain TCP), and their bytes at most.
const SLICES_PER_WRITE: usize = 64;
const WRITE_MAX: usize = 64 << 10;
/// How long a client being freed waits for its close frame to be written (ws_client_free
/// returns within `client::FREE_WAIT`, a little more).
const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_millis(200);
/// Rounds of work before the task yields to the other connections on its thread.
const ROUNDS_PER_POLL: usize = 64;
/// Messages read before they are handed to the host as one batch (one lock, one wake-up).
const MAX_BATCH: usize = 1024;
/// Answers to pings waiting to be written. Every ping is answered while the peer reads; only
/// a peer that pings faster than it reads makes them pile up, and then the oldest are dropped
/// (RFC 6455 5.5.3 allows answering only the most recent).
const MAX_PENDING_PONGS: usize = 32;
/// Bytes of ours the peer must acknowledge within a keepalive timeout, while our ping waits
/// behind data it has not read yet, to count as alive (see `Session::peer_took_data`).
const TAKEN_WHILE_ALIVE: u64 = 64 << 10;
/// Socket reads in one round of reading ahead while the host holds messages.
const READ_AHEAD_ROUNDS: usize = 16;

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

    /// Hands the reading of the socket to the host's thread, if nothing stands in the way:
    /// the task holds nothing unparsed and nothing for the host, no close is under way, no
    /// keepalive ping waits for its answer, the socket takes what the task writes, no
    /// compression, and the host is dispatching. Only once the connection has received a
    /// second message, since it opened or since the task last took its reading back, and
    /// while the last one was small: a connection that receives one message and idles
    /// (thousands of them, each waiting for one answer), or a stream of large messages (which
    /// the host's thread would hand straight back: 1 MiB messages cost 24% more CPU that way),
    /// is not worth the hand-over (a few system calls, and a little memory while the host has
    /// it).
    fn offer_reading(&mut self, cx: &mut Context<'_>) {
        let idle = self.reader.between_frames()
            && self.wire.nothing_received_held()
            && self.batch.is_empty()
            && self.arena.pending() == 0
            && self.pongs.is_empty()
            && self.peer_close.is_none()
            && !self.peer_eof
            && self.read_failed.is_none()
            && self.failing.is_none()
            && !self.close_sent
            && self.close_deadline.is_none()
            && self.ping_sent.is_none()
            && !self.write_blocked
            && self.messages_read >= 2
            && self.last_read_small;
        if self.handed || !idle || !self.options.read_on_dispatch || !self.watch.reads() || !self.conn.hub.host_reads()
        {
            return;
        }
        // The host's thread could read now (its own check at every read).
        if self.conn.host_allowance().is_none() {
            return;
        }
        // Readability stops waking the I/O thread first; the socket then joins the host's
        // descriptor, which reports at once whatever arrived in between.
        if self.watch.set_reads(false).is_err() {
            // Unwatched: the next read fails and ends the connection.
            cx.waker().wake_by_ref();
            return;
        }
        let placeholder = FrameReader::new(Vec::new(), 0, 0, None);
        let reader = std::mem::replace(&mut self.reader, placeholder);
        match self.conn.hand_reading_to_host(reader, self.wire.clone(), cx.waker()) {
            Ok(()) => self.handed = true,
            Err(reader) => {
                self.reader = reader;
                if self.watch.set_reads(true).is_err() {
                    cx.waker().wake_by_ref();
                }
            }
        }
    }

    /// Takes the reading back from the host's thread if it gave it back, or (`now`) anyway.
    /// Returns whether it did.
    fn reading_back(&mut self, now: bool, cx: &mut Context<'_>) -> Result<bool, End> {
        let Some(reading) = self.conn.take_reading_back(now, cx.waker()) else {
            return Ok(false);
        };
        let reading = *reading;
        self.handed = false;
        self.messages_read = 0;
        self.reader = reading.reader;
        if reading.heard {
            self.heard();
        }
        match reading.ended {
            Some(Ok(())) => self.peer_eof = true,
            Some(Err(e)) => self.read_failed = Some(e),
            None => {}
        }
        self.watch.set_reads(true).map_err(|e| self.io_failure(e))?;
        Ok(true)
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

    /// Writes what there is to write, as long as the socket takes it: the rest of a frame the
    /// host's thread began, answers to pings, a keepalive ping, queued sends, close frames.
    /// Returns whether it made progress; `write_blocked` tells whether it waits for the socket.
    fn write_round(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let mut progress = false;
        loop {
            if !self.queued.is_empty() || (self.writing && self.write_blocked) {
                match self.write_queued(cx) {
                    Ok(true) => progress = true,
                    Ok(false) => return Ok(progress),
                    Err(e) => return Err(self.io_failure(e)),
                }
                continue;
            }
            let own_frames = !self.pongs.is_empty() || self.ping_due || self.close_reply.is_some();
            // Once our close frame is out, what the host sends is dropped where it waits: the
            // outbox, emptied when the session ends.
            if self.taken.is_empty() && !self.close_sent {
                // Also makes the task the writer, if it takes anything or has frames of its own;
                // unless a host's thread is writing: it wakes the task when it is done.
                self.waiting_for_host = !self.conn.take_requests(&mut self.taken, own_frames, cx.waker());
                if self.waiting_for_host {
                    return Ok(progress);
                }
                self.writing |= own_frames || !self.taken.is_empty();
            }
            if !self.frame_next()? {
                // Nothing left to write: let other threads write again, unless sends were
                // queued meanwhile.
                if self.writing {
                    self.conn.sent(std::mem::take(&mut self.unflushed));
                    if self.close_sent {
                        // Nothing more goes out: the writer role has no further use.
                        return Ok(progress);
                    }
                    if !self.conn.release_writing() {
                        continue;
                    }
                    self.writing = false;
                }
                return Ok(progress);
            }
            progress = true;
        }
    }

    /// Frames the next thing to write into `queued`; returns false if there is nothing.
    fn frame_next(&mut self) -> Result<bool, End> {
        debug_assert!(self.queued.is_empty() || self.writing);
        // The rest of a frame the host's thread began goes before anything else.
        if self.taken.next_is_rest() {
            return self.frame_taken();
        }
        if let Some(payload) = self.pongs.pop_front() {
            // Once our close frame is out, nothing may follow it: the answer is dropped.
            if !self.close_sent {
                self.queue_own(Opcode::Pong, &payload);
            }
            return Ok(true);
        }
        if std::mem::take(&mut self.ping_due) {
            if !self.close_sent {
                self.queue_own(Opcode::Ping, &[]);
            }
            return Ok(true);
        }
        if let Some(reply) = self.close_reply.take() {
            if !self.close_sent {
                let payload = reply.map(|f| frame::close_payload(f.code.into(), &f.reason)).unwrap_or_default();
                self.queue_own(Opcode::Close, &payload);
                self.closing_frame_sent();
            }
            return Ok(true);
        }
        self.frame_taken()
    }

    /// Frames the next request taken from the outbox.
    fn frame_taken(&mut self) -> Result<bool, End> {
        let Some(request) = self.taken.pop() else {
            return Ok(false);
        };
        let after_close = self.close_sent || self.peer_close.is_some();
        match request {
            Outgoing::Message { payload, .. } | Outgoing::Compress { payload, .. } if after_close => {
                // Sent after the close started: no longer allowed on the wire.
                self.conn.sent(Counted::message(payload.len()));
            }
            // Frames the host's thread held back, whole: after the close began, dropped. The
            // rest of a frame it began writing goes out even after the peer's close frame (the
            // stream would be broken otherwise); it always precedes our own close frame.
            Outgoing::Rest { counted, begun: false, .. } | Outgoing::Flush { counted } if after_close => {
                self.conn.sent(counted)
            }
            Outgoing::Rest { counted, begun: true, .. } if self.close_sent => self.conn.sent(counted),
            Outgoing::Message { opcode, key, payload } => {
                let mut header = Vec::with_capacity(frame::MAX_HEADER);
                frame::put_header(&mut header, opcode, payload.len(), key);
                self.count(Counted::message(payload.len()));
                self.queued.push_back(Bytes::from(header));
                if !payload.is_empty() {
                    self.queued.push_back(payload);
                }
            }
            Outgoing::Compress { opcode, payload } => self.queue_compressed(opcode, payload),
            Outgoing::Rest { bytes, counted, .. } => {
                self.count(counted);
                self.queued.push_back(bytes);
            }
            Outgoing::Flush { counted } => {
                // Already in the TLS session: writing what waits there sends it.
                self.count(counted);
                self.write_blocked = true;
            }
            Outgoing::Close(frame) => {
                if !after_close {
                    let payload = frame::close_payload(frame.code.into(), &frame.reason);
                    self.queue_own(Opcode::Close, &payload);
                    self.closing_frame_sent();
                    self.arm_close_deadline();
                }
            }
        }
        Ok(true)
    }

    /// Compresses a message (permessage-deflate) and queues its frame, RSV1 set; one that is
    /// not worth compressing goes out as it is. Counted for what the host handed over.
    fn queue_compressed(&mut self, opcode: Opcode, payload: Bytes) {
        self.count(Counted::message(payload.len()));
        let deflater = self.deflater.as_mut().expect("messages are handed out to compress only with a deflater");
        let mut compressed = Vec::new();
        let (mut body, rsv1) = if deflater.compress(&payload, &mut compressed) {
            (compressed, frame::RSV1)
        } else {
            // Not worth it (it would not shrink): the message as it is.
            (payload.to_vec(), 0)
        };
        let key = frame::masking_key();
        let mut header = Vec::with_capacity(frame::MAX_HEADER);
        frame::put_header(&mut header, opcode, body.len(), key);
        header[0] |= rsv1;
        frame::apply_mask(&mut body, key);
        self.queued.push_back(Bytes::from(header));
        if !body.is_empty() {
            self.queued.push_back(Bytes::from(body));
        }
    }

    /// Our close frame has been written (all of it, TLS session included).
    fn close_frame_out(&self) -> bool {
        self.close_sent && self.queued.is_empty() && !self.write_blocked
    }

    fn count(&mut self, counted: Counted) {
        self.unflushed.bytes += counted.bytes;
        self.unflushed.messages += counted.messages;
    }

    /// Queues a frame of the task's own (a pong, a ping, a close frame).
    fn queue_own(&mut self, opcode: Opcode, payload: &[u8]) {
        let mut out = Vec::with_capacity(frame::MAX_HEADER + payload.len());
        frame::put_frame(&mut out, opcode, payload);
        self.queued.push_back(Bytes::from(out));
    }

    /// Our close frame is queued: nothing may follow it on the wire.
    fn closing_frame_sent(&mut self) {
        self.close_sent = true;
        self.conn.detach_wire();
    }

    /// Writes queued bytes (and what waits in the TLS session). Ok(true): some went out, or
    /// the socket is writable again; Ok(false): it waits for the socket (`write_blocked`).
    fn write_queued(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let done = if self.queued.is_empty() {
            self.wire.flush_now()?
        } else {
            // At most WRITE_MAX a system call: a socket filled a megabyte at a time did not
            // just take longer per call, it took far more time in all (measured: 40 ms per MiB
            // against a peer whose receive buffer is full, 160 ms of I/O-thread CPU in all).
            // The slices live on the stack: every write of the task comes through here.
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let mut budget = WRITE_MAX;
            let mut count = 0;
            for (slice, bytes) in slices.iter_mut().zip(&self.queued) {
                let n = bytes.len().min(budget);
                if n == 0 {
                    break;
                }
                budget -= n;
                *slice = IoSlice::new(&bytes[..n]);
                count += 1;
            }
            let (taken, written) = self.wire.write_now(&slices[..count])?;
            self.advance_queued(taken);
            written == Written::All && self.queued.is_empty()
        };
        if done {
            self.write_blocked = false;
            return Ok(true);
        }
        self.write_blocked = true;
        match self.watch.poll_writable(cx) {
            Poll::Ready(result) => result.map(|()| true),
            Poll::Pending => Ok(false),
        }
    }

    /// Drops the first `n` queued bytes: they are written.
    fn advance_queued(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.queued.front_mut().expect("no more written than queued");
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queued.pop_front();
        }
    }

    /// Remembers a ping to answer in the next write round. Answers are coalesced (the oldest
    /// dropped) only while the socket does not take what we write: a peer that reads gets every
    /// answer. Returns whether reading may go on before the answers are written.
    fn answer_ping(&mut self, payload: Bytes) -> bool {
        if self.pongs.len() >= MAX_PENDING_PONGS && self.write_blocked {
            self.pongs.pop_front();
        }
        self.pongs.push_back(payload);
        self.pongs.len() < MAX_PENDING_PONGS || self.write_blocked
    }

    /// Reads messages into the batch, as many as the allowance permits and the socket has.
    fn read(&mut self, cx: &mut Context<'_>, allowance: Allowance) -> Result<bool, End> {
        if self.peer_close.is_some() {
            // Nothing may follow the peer's close frame.
            return Ok(false);
        }
        let (mut messages, mut cost, mut progress) = (0, 0, false);
        // Every frame counts against one read's bound, control frames too: a peer that floods
        // pings while it does not read our pongs (they are coalesced then, and cost no
        // allowance) would otherwise keep this loop, and the I/O thread's other connections
        // with it, going for as long as it keeps the socket full.
        let mut frames = 0;
        while messages < allowance.messages
            && cost < allowance.cost
            && frames < MAX_BATCH
            && self.batch.len() + self.arena.pending() < MAX_BATCH
        {
            let item = match self.reader.next_item() {
                Ok(Some(item)) => item,
                Ok(None) if self.peer_eof => return Err(self.stream_ended()),
                Ok(None) if self.read_failed.is_some() => {
                    let failure = self.read_failed.take().expect("checked by the guard");
                    return Err(self.io_failure(failure));
                }
                Ok(None) => match self.reader.poll_read_from(&mut Receiving::task(&self.wire, &self.watch), cx) {
                    Poll::Ready(Ok(0)) => return Err(self.stream_ended()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(self.io_failure(e)),
                    Poll::Pending => break,
                },
                Err(refused) => {
                    // What was read before the violation goes to the host first, and its
                    // replies go out before our close frame, as with a client that reads one
                    // frame at a time.
                    self.failing = Some(refusal(refused));
                    self.arm_close_deadline();
                    return Ok(true);
                }
            };
            progress = true;
            frames += 1;
            match item {
                Item::Message { text } => {
                    messages += 1;
                    self.messages_read = self.messages_read.saturating_add(1);
                    let payload = self.reader.payload();
                    self.last_read_small = payload.len() <= crate::host::reading::READ_ON_HOST_MAX;
                    // Copied out of the read buffer (text with the NUL the C API promises).
                    let parts: &[&[u8]] = if text { &[payload, b"\0"] } else { &[payload] };
                    cost += self.arena.push(parts, text, &mut self.batch);
                }
                Item::OwnedMessage { text, data } => {
                    messages += 1;
                    self.messages_read = self.messages_read.saturating_add(1);
                    // (Text carries a NUL past its end.)
                    self.last_read_small = data.len() <= crate::host::reading::READ_ON_HOST_MAX + usize::from(text);
                    // Handed over as it is, after the messages appended before it.
                    self.arena.drain_into(&mut self.batch);
                    let payload = Payload::owned(data, text);
                    cost += payload.cost();
                    self.batch.push_back(Event::Message(payload));
                }
                Item::Ping => {
                    let payload = Bytes::copy_from_slice(self.reader.payload());
                    if !self.answer_ping(payload) {
                        // Write the answers first (the next round), then read on.
                        break;
                    }
                }
                Item::Pong => {}
                Item::Close(frame) => {
                    self.peer_closed(frame)?;
                    break;
                }
            }
        }
        if progress {
            self.heard();
        }
        Ok(progress)
    }

    /// While the host holds messages (flow control, or a full receive queue), reads ahead at
    /// most one read buffer and answers the pings found there, so that a peer's heartbeat is
    /// answered while a message waits for the host. Data frames stay where they are.
    fn read_ahead(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        if self.peer_close.is_some() || self.peer_eof || self.read_failed.is_some() {
            return Ok(false);
        }
        let mut progress = false;
        for _ in 0..READ_AHEAD_ROUNDS {
            while let Some(control) = self.reader.next_buffered_control() {
                progress = true;
                if let Buffered::Ping(payload) = control {
                    if !self.answer_ping(payload) {
                        // Write the answers first (the next round), then look on.
                        return Ok(true);
                    }
                }
            }
            match self.reader.poll_read_ahead(&mut Receiving::task(&self.wire, &self.watch), cx) {
                // No room: the rest waits until the host has taken what is held.
                None | Some(Poll::Pending) => break,
                Some(Poll::Ready(Ok(0))) => {
                    // Reported once the held messages have been delivered.
                    self.peer_eof = true;
                    break;
                }
                Some(Poll::Ready(Ok(_))) => progress = true,
                Some(Poll::Ready(Err(e))) => return Err(self.io_failure(e)),
            }
        }
        Ok(progress)
    }

    /// The peer's close frame arrived: answer it (after the answer to the latest ping that
    /// came before it), and wait for our answer to be written.
    fn peer_closed(&mut self, frame: Option<(u16, String)>) -> Result<(), End> {
        if !self.close_sent {
            if let Some(latest) = self.pongs.pop_back() {
                self.pongs.clear();
                self.pongs.push_back(latest);
            }
            // The reply echoes the peer's code and reason (none if it sent none).
            let reply = frame
                .as_ref()
                .map(|(code, reason)| CloseFrame { code: CloseCode::from(*code), reason: reason.as_str().into() });
            self.close_reply = Some(reply);
        }
        self.peer_close = Some(frame.unwrap_or((1005, String::new())));
        self.arm_close_deadline();
        Ok(())
    }

    /// The peer broke the protocol: once the host has dispatched (and, under flow control,
    /// completed) every message read before the violation, write what it queued meanwhile,
    /// then end with the close frame the violation calls for. Bounded by the close timeout.
    fn finish_failing(&mut self, cx: &mut Context<'_>, progress: bool) -> Result<bool, End> {
        if let Err(timeout) = self.check_timers(cx) {
            return Err(self.failing.take().unwrap_or(timeout));
        }
        // Messages still read are handed over (a violation stops reading, not delivering).
        self.hand_over();
        if !self.conn.drained(cx.waker()) {
            return Ok(progress);
        }
        // What the host queued before it was drained goes out, then our close frame.
        let wrote = self.write_round(cx)?;
        if self.waiting_for_host {
            // A host's thread is writing a send: it goes out whole, before our close frame.
            return Ok(progress || wrote);
        }
        if !self.writing || self.close_frame_out() {
            return Err(self.failing.take().expect("checked by the caller"));
        }
        Ok(progress || wrote)
    }

    /// Something arrived: the peer is alive.
    fn heard(&mut self) {
        self.last_heard = Instant::now();
        if self.ping_sent.take().is_some() {
            // The ping was answered: the next check is one interval from now, not the timeout.
            if let Some(interval) = self.options.keepalive_interval {
                let next = self.last_heard + interval;
                let next = self.close_deadline.map_or(next, |d| d.min(next));
                self.timer.as_mut().reset(next);
            }
        }
    }

    fn arm_close_deadline(&mut self) {
        if self.close_deadline.is_none() {
            let deadline = Instant::now() + self.options.close_timeout;
            self.close_deadline = Some(deadline);
            let earliest = deadline.min(self.timer.deadline());
            self.timer.as_mut().reset(earliest);
        }
    }

    /// Close deadline and keepalive. Returns whether it did something (sent a ping).
    fn check_timers(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(false);
        }
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        if let Some(deadline) = self.close_deadline {
            if now >= deadline {
                let ms = self.options.close_timeout.as_millis();
                return Err(End::error(
                    WsStatus::CloseTimeout,
                    format!(
                        "close timeout: the close handshake (and the data queued before it) did not complete \
                         within {ms} ms"
                    ),
                ));
            }
            next = next.min(deadline);
        }
        let mut pinged = false;
        let closing = self.close_sent || self.peer_close.is_some() || self.close_deadline.is_some();
        if let (Some(interval), false) = (self.options.keepalive_interval, closing) {
            let timeout = self.options.keepalive_timeout;
            let ping_sent = self.ping_sent;
            match ping_sent {
                Some(sent) if now >= sent + timeout && self.peer_took_data() => {
                    // Our ping waits behind data the peer is still taking (an upload over a
                    // slow link): it is alive. The next ping goes out one interval from now.
                    self.last_heard = now;
                    self.ping_sent = None;
                    next = next.min(now + interval);
                }
                Some(sent) if now >= sent + timeout => {
                    let ms = (now - self.last_heard).as_millis();
                    return Err(End::error(
                        WsStatus::KeepaliveTimeout,
                        format!("keepalive timeout: nothing received from the peer for {ms} ms, not even a pong"),
                    ));
                }
                Some(sent) => next = next.min(sent + timeout),
                None if now >= self.last_heard + interval => {
                    self.ping_due = true;
                    self.ping_sent = Some(now);
                    self.acked_at_ping = acknowledged_bytes(self.wire.socket()).unwrap_or(0);
                    pinged = true;
                    next = next.min(now + timeout);
                }
                None => next = next.min(self.last_heard + interval),
            }
        }
        self.timer.as_mut().reset(next);
        // Poll the re-armed timer so that it wakes this task.
        let _ = self.timer.as_mut().poll(cx);
        Ok(pinged)
    }

    /// Whether the peer took more of our data since the ping went out than its kernel alone
    /// would (our pings are a few bytes): then it reads, and our ping merely waits behind what
    /// it has not read yet. A peer whose application stopped reading takes at most its receive
    /// buffer, and then no more: the keepalive timeout fires then.
    fn peer_took_data(&self) -> bool {
        acknowledged_bytes(self.wire.socket()).is_some_and(|acked| acked > self.acked_at_ping + TAKEN_WHILE_ALIVE)
    }

    /// The peer's side of the stream ended (the socket reached its end).
    fn stream_ended(&mut self) -> End {
        match self.peer_close.take() {
            Some((code, reason)) => End::event(Event::close(code, &reason)),
            None => {
                End::error(WsStatus::ConnectionLost, "connection closed by the peer without a close handshake".into())
            }
        }
    }

    fn io_failure(&mut self, err: io::Error) -> End {
        let message = match &err {
            e if e.kind() == io::ErrorKind::ConnectionReset => "connection reset by the peer".into(),
            e => format!("connection lost: {e}"),
        };
        if let Some((code, reason)) = self.peer_close.take() {
            // The peer's close frame arrived: the handshake is as complete as it can be.
            return End::event(Event::close(code, &reason));
        }
        End::error(WsStatus::ConnectionLost, message)
    }
}

/// How many bytes sent on `socket` the peer has acknowledged so far (Linux's TCP_INFO), if known.
fn acknowledged_bytes(socket: RawFd) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes of it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let answered = unsafe {
            libc::getsockopt(
                socket,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (answered == 0).then_some(info.tcpi_bytes_acked)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

/// How a session ends when the peer's bytes break the protocol.
fn refusal(refused: ReadError) -> End {
    match refused {
        ReadError::InvalidUtf8 => End::failing(
            WsStatus::Protocol,
            "protocol error: invalid UTF-8 in a text message or close reason from the peer".into(),
            CloseCode::Invalid,
            "invalid UTF-8",
        ),
        ReadError::TooBig { size, max } => End::failing(
            WsStatus::MessageTooBig,
            format!("message too big: {size} bytes, the limit is {max}"),
            CloseCode::Size,
            "message too big",
        ),
        ReadError::OutOfMemory { size } => End::failing(
            WsStatus::MessageTooBig,
            format!("message too big: {size} bytes could not be allocated"),
            CloseCode::Size,
            "message too big",
        ),
        ReadError::InflatedTooBig { max } => End::failing(
            WsStatus::MessageTooBig,
            format!("message too big: a compressed message inflates to more than {max} bytes, the limit"),
            CloseCode::Size,
            "message too big",
        ),
        ReadError::Corrupt(why) => End::failing(
            WsStatus::Protocol,
            format!("protocol error: a compressed message from the peer cannot be inflated: {why}"),
            CloseCode::Invalid,
            "invalid compressed data",
        ),
        ReadError::Protocol(what) => {
            End::failing(WsStatus::Protocol, format!("protocol error: {what}"), CloseCode::Protocol, "protocol error")
        }
    }
}
