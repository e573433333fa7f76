//! The session of an open connection: move messages both ways until the connection ends.
//!
//! The session is one hand-written poll loop rather than `select!` over futures: nothing is
//! cancelled half-way, reading and writing never block each other, and one task (no split
//! stream, no second task) serves a connection, which keeps idle connections small. It writes
//! through tungstenite (which frames and masks) and reads through `reader::FrameReader`.
//!
//! Nothing here may wait by spinning: every `Poll::Pending` it returns has a waker registered
//! with something that will fire (the socket, the timer, or the host through the gate).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::reader::{Buffered, FrameReader, Item, ReadError};
use crate::conn::{Allowance, Conn, Event, Gate, Outgoing, Payload, PayloadArena, Taken};
use crate::error::{Error, WsStatus};
use crate::options::Options;

/// Bytes tungstenite collects before it writes mid-batch; a batch is flushed at its end anyway.
const WRITE_BUFFER_SIZE: usize = 64 << 10;
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

/// Runs the session of a connected stream; `leftover` holds the bytes that arrived with the
/// upgrade response. Returns the final event (None when the client is being freed).
pub(crate) async fn serve<S>(
    conn: Arc<Conn>,
    stream: S,
    socket: RawFd,
    leftover: Vec<u8>,
    options: Arc<Options>,
) -> Option<Event>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // tungstenite frames what we send; received frames are read by `FrameReader`, so
    // tungstenite's own read buffer is never used: none is allocated.
    let config = WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(WRITE_BUFFER_SIZE);
    let ws = WebSocketStream::from_raw_socket(stream, Role::Client, Some(config)).await;
    let reader = FrameReader::new(leftover, options.read_buffer_size, options.max_message_size);
    Session::new(conn, ws, socket, reader, options).run().await
}

/// How a session ended: the final event (None when the client is being freed) and a close
/// frame to send on the way out, if the protocol asks for one.
struct End {
    event: Option<Event>,
    close_with: Option<CloseFrame>,
}

impl End {
    fn event(event: Event) -> End {
        End {
            event: Some(event),
            close_with: None,
        }
    }

    fn failing(status: WsStatus, message: String, code: CloseCode, reason: &'static str) -> End {
        End {
            event: Some(Event::Error(Error::new(status, message))),
            close_with: Some(CloseFrame {
                code,
                reason: reason.into(),
            }),
        }
    }

    fn error(status: WsStatus, message: String) -> End {
        End::event(Event::Error(Error::new(status, message)))
    }
}

/// Writes not yet flushed to the socket: they count toward bufferedAmount until they are.
#[derive(Default)]
struct Unflushed {
    bytes: usize,
    messages: usize,
}

struct Session<S> {
    conn: Arc<Conn>,
    /// Writes (tungstenite frames them); reads go past it, through `reader`.
    ws: WebSocketStream<S>,
    /// The socket under it, to see whether the peer takes what we sent (see `peer_took_data`).
    socket: RawFd,
    /// The bytes the peer had acknowledged when the keepalive ping went out.
    acked_at_ping: u64,
    reader: FrameReader,
    /// Requests taken from the connection's outbox, not yet handed to tungstenite.
    taken: Taken,
    options: Arc<Options>,
    unflushed: Unflushed,
    needs_flush: bool,
    /// tungstenite refused more until the socket takes what it holds.
    write_blocked: bool,
    close_sent: bool,
    /// Payloads of pings to answer, oldest first.
    pongs: VecDeque<Bytes>,
    /// The peer's close frame (code, reason), once it arrived.
    peer_close: Option<(u16, String)>,
    /// The peer ended its side of the stream, seen while reading ahead.
    peer_eof: bool,
    /// The peer broke the protocol: how the session ends once the host has dispatched the
    /// messages read before the violation and its replies are written.
    failing: Option<End>,
    close_deadline: Option<Instant>,
    last_heard: Instant,
    ping_sent: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// Events read but not yet handed to the host.
    batch: VecDeque<Event>,
    /// Where small payloads are copied to.
    arena: PayloadArena,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(
        conn: Arc<Conn>,
        ws: WebSocketStream<S>,
        socket: RawFd,
        reader: FrameReader,
        options: Arc<Options>,
    ) -> Self {
        let now = Instant::now();
        let first_check = now
            + options
                .keepalive_interval
                .unwrap_or(Duration::from_secs(3600));
        Session {
            conn,
            ws,
            socket,
            acked_at_ping: 0,
            reader,
            taken: Taken::default(),
            options,
            unflushed: Unflushed::default(),
            needs_flush: false,
            write_blocked: false,
            close_sent: false,
            pongs: VecDeque::new(),
            peer_close: None,
            peer_eof: false,
            failing: None,
            close_deadline: None,
            last_heard: now,
            ping_sent: None,
            timer: Box::pin(tokio::time::sleep_until(first_check)),
            batch: VecDeque::new(),
            arena: PayloadArena::default(),
        }
    }

    async fn run(mut self) -> Option<Event> {
        let end = poll_fn(|cx| self.poll(cx)).await;
        let (close_with, wait) = match end.event {
            None => {
                let away = CloseFrame {
                    code: CloseCode::Away,
                    reason: "client shutting down".into(),
                };
                (Some(away), SHUTDOWN_CLOSE_WAIT)
            }
            Some(_) => (
                end.close_with,
                self.options.close_timeout.min(Duration::from_secs(1)),
            ),
        };
        // Best effort, and bounded: the connection is ending either way. The close frame (if
        // the protocol asks for one), then the end of our side of the stream: a TCP FIN, after
        // a TLS close_notify for wss.
        let _ = tokio::time::timeout(wait, async {
            if let Some(frame) = close_with {
                let _ = self.ws.close(Some(frame)).await;
            }
            let _ = self.ws.get_mut().shutdown().await;
        })
        .await;
        end.event
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let outcome = self.poll_rounds(cx);
        self.arena.drain_into(&mut self.batch);
        // What was read goes to the host before the task waits or ends (so messages always
        // precede the final event).
        if !self.batch.is_empty() {
            self.conn.deliver_then_gate(&mut self.batch, None);
        }
        if outcome.is_pending() {
            // Idle connections keep no block and no read buffer of their own.
            self.arena.release();
            self.reader.release_if_drained();
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
        // Plenty done: let the other connections on this thread run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One round of work. Ok(true): progress was made, go again. Ok(false): all is waiting.
    fn step(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let mut progress = self.write_requests(cx)?;
        self.flush(cx)?;
        if self.peer_close.is_some() && !self.needs_flush {
            // Both close frames have been exchanged: the close handshake is complete.
            let (code, reason) = self.peer_close.take().unwrap_or((1005, String::new()));
            return Err(End::event(Event::close(code, &reason)));
        }
        if self.failing.is_some() {
            return self.finish_failing(cx, progress);
        }
        // Hand over what was read (so that the gate counts it) and ask the gate, in one lock.
        self.arena.drain_into(&mut self.batch);
        let asking = Some((cx.waker(), !self.write_blocked));
        let permit = self.conn.deliver_then_gate(&mut self.batch, asking);
        if permit.close_requested {
            // The close timeout bounds the whole close, what still waits to be sent included.
            self.arm_close_deadline();
        }
        match permit.gate {
            Gate::Shutdown => {
                return Err(End {
                    event: None,
                    close_with: None,
                })
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

    /// Hands pongs, queued sends and a close request to tungstenite, as long as it accepts them.
    fn write_requests(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let mut progress = false;
        loop {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => self.write_blocked = false,
                Poll::Ready(Err(e)) => return Err(self.io_failure(e)),
                Poll::Pending => {
                    self.write_blocked = true;
                    return Ok(progress);
                }
            }
            if let Some(payload) = self.pongs.pop_front() {
                // Once our close frame is out, nothing may follow it: the answer is dropped.
                if !self.close_sent {
                    self.queue(Message::Pong(payload))?;
                }
                progress = true;
                continue;
            }
            if self.taken.is_empty() {
                self.conn.take_requests(&mut self.taken);
            }
            let Some(request) = self.taken.pop() else {
                return Ok(progress);
            };
            progress = true;
            match request {
                Outgoing::Message(_, len) if self.close_sent || self.peer_close.is_some() => {
                    // Sent after the close started: no longer allowed on the wire.
                    self.conn.sent(len, 1);
                }
                Outgoing::Message(message, len) => {
                    self.queue(message)?;
                    self.unflushed.bytes += len;
                    self.unflushed.messages += 1;
                }
                Outgoing::Close(frame) => {
                    if !self.close_sent && self.peer_close.is_none() {
                        self.queue(Message::Close(Some(frame)))?;
                        self.close_sent = true;
                        self.arm_close_deadline();
                    }
                }
            }
        }
    }

    /// Hands a message to tungstenite, which buffers it until the next flush.
    fn queue(&mut self, message: Message) -> Result<(), End> {
        self.ws
            .start_send_unpin(message)
            .map_err(|e| self.io_failure(e))?;
        self.needs_flush = true;
        Ok(())
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

    fn flush(&mut self, cx: &mut Context<'_>) -> Result<(), End> {
        if !self.needs_flush {
            return Ok(());
        }
        match self.ws.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => {
                let Unflushed { bytes, messages } = std::mem::take(&mut self.unflushed);
                self.conn.sent(bytes, messages);
                self.needs_flush = false;
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(self.io_failure(e)),
            Poll::Pending => Ok(()),
        }
    }

    /// Reads messages into the batch, as many as the allowance permits and the socket has.
    fn read(&mut self, cx: &mut Context<'_>, allowance: Allowance) -> Result<bool, End> {
        if self.peer_close.is_some() {
            // Nothing may follow the peer's close frame.
            return Ok(false);
        }
        let (mut messages, mut cost, mut progress) = (0, 0, false);
        while messages < allowance.messages
            && cost < allowance.cost
            && self.batch.len() + self.arena.pending() < MAX_BATCH
        {
            let item = match self.reader.next_item() {
                Ok(Some(item)) => item,
                Ok(None) if self.peer_eof => return Err(self.stream_ended()),
                Ok(None) => match self.reader.poll_read_from(self.ws.get_mut(), cx) {
                    Poll::Ready(Ok(0)) => return Err(self.stream_ended()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(self.io_failure(WsError::Io(e))),
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
            match item {
                Item::Message { text } => {
                    messages += 1;
                    let payload = self.reader.payload();
                    // Copied out of the read buffer (text with the NUL the C API promises).
                    let parts: &[&[u8]] = if text { &[payload, b"\0"] } else { &[payload] };
                    cost += self.arena.push(parts, text, &mut self.batch);
                }
                Item::OwnedMessage { text, data } => {
                    messages += 1;
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
        if self.peer_close.is_some() || self.peer_eof {
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
            match self.reader.poll_read_ahead(self.ws.get_mut(), cx) {
                // No room: the rest waits until the host has taken what is held.
                None | Some(Poll::Pending) => break,
                Some(Poll::Ready(Ok(0))) => {
                    // Reported once the held messages have been delivered.
                    self.peer_eof = true;
                    break;
                }
                Some(Poll::Ready(Ok(_))) => progress = true,
                Some(Poll::Ready(Err(e))) => return Err(self.io_failure(WsError::Io(e))),
            }
        }
        Ok(progress)
    }

    /// The peer's close frame arrived: answer it (after a pong that is due), and wait for our
    /// answer to be written.
    fn peer_closed(&mut self, frame: Option<(u16, String)>) -> Result<(), End> {
        if !self.close_sent {
            if let Some(payload) = self.pongs.pop_back() {
                // The answer to the latest ping that came before the close goes first.
                self.pongs.clear();
                self.queue(Message::Pong(payload))?;
            }
            // The reply echoes the peer's code and reason (none if it sent none).
            let reply = frame.as_ref().map(|(code, reason)| CloseFrame {
                code: CloseCode::from(*code),
                reason: reason.as_str().into(),
            });
            self.queue(Message::Close(reply))?;
            self.close_sent = true;
        }
        self.peer_close = Some(frame.unwrap_or((1005, String::new())));
        self.needs_flush = true;
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
        self.arena.drain_into(&mut self.batch);
        if !self.batch.is_empty() {
            self.conn.deliver_then_gate(&mut self.batch, None);
        }
        if !self.conn.drained(cx.waker()) {
            return Ok(progress);
        }
        if self.taken.is_empty() && !self.write_blocked {
            self.conn.take_requests(&mut self.taken);
            if !self.taken.is_empty() {
                return Ok(true);
            }
        }
        if self.taken.is_empty() && !self.needs_flush {
            return Err(self.failing.take().expect("checked by the caller"));
        }
        Ok(progress)
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
                    self.queue(Message::Ping(Bytes::new()))?;
                    self.ping_sent = Some(now);
                    self.acked_at_ping = acknowledged_bytes(self.socket).unwrap_or(0);
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
        acknowledged_bytes(self.socket)
            .is_some_and(|acked| acked > self.acked_at_ping + TAKEN_WHILE_ALIVE)
    }

    /// The peer's side of the stream ended (the socket reached its end).
    fn stream_ended(&mut self) -> End {
        match self.peer_close.take() {
            Some((code, reason)) => End::event(Event::close(code, &reason)),
            None => End::error(
                WsStatus::ConnectionLost,
                "connection closed by the peer without a close handshake".into(),
            ),
        }
    }

    fn io_failure(&mut self, err: WsError) -> End {
        let message = match &err {
            WsError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                "connection reset by the peer".into()
            }
            WsError::Io(e) => format!("connection lost: {e}"),
            WsError::ConnectionClosed | WsError::AlreadyClosed => "connection closed".into(),
            other => format!("connection lost: {other}"),
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
        ReadError::Protocol(what) => End::failing(
            WsStatus::Protocol,
            format!("protocol error: {what}"),
            CloseCode::Protocol,
            "protocol error",
        ),
    }
}
