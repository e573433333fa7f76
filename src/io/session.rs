//! The session of an open connection: move messages both ways until the connection ends.
//!
//! The session is one hand-written poll loop rather than `select!` over futures: nothing is
//! cancelled half-way, reading and writing never block each other, and one task (no split
//! stream, no second task) serves a connection, which keeps idle connections small. It writes
//! through tungstenite (which frames and masks) and reads through `reader::FrameReader`.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::reader::{FrameReader, Item, ReadError};
use crate::conn::{Allowance, Command, Conn, Event, Gate, Outbox, Payload, PayloadArena};
use crate::error::{Error, WsStatus};
use crate::options::Options;

/// Bytes tungstenite collects before it writes mid-batch; a batch is flushed at its end anyway.
const WRITE_BUFFER_SIZE: usize = 64 << 10;
/// How long a client being freed waits for its close frame to be written.
const SHUTDOWN_CLOSE_WAIT: Duration = Duration::from_millis(250);
/// Rounds of work before the task yields to the other connections on its thread.
const ROUNDS_PER_POLL: usize = 64;
/// Messages read before they are handed to the host as one batch (one lock, one wake-up).
const MAX_BATCH: usize = 1024;

/// Runs the session of a connected stream; `leftover` holds the bytes that arrived with the
/// upgrade response. Returns the final event (None when the client is being freed).
pub(crate) async fn serve<S>(
    conn: Arc<Conn>,
    stream: S,
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
    Session::new(conn, ws, reader, options).run().await
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
}

struct Session<S> {
    conn: Arc<Conn>,
    /// Writes (tungstenite frames them); reads go past it, through `reader`.
    ws: WebSocketStream<S>,
    reader: FrameReader,
    /// Commands taken from the connection's outbox, not yet handed to tungstenite (its payload
    /// buffer is moved to `payloads` when taken).
    taken: Outbox,
    /// The payloads of the taken sends, back to back, and where the next one starts.
    payloads: Bytes,
    next_payload: usize,
    options: Arc<Options>,
    /// Payload bytes handed to tungstenite and not yet flushed to the socket.
    unflushed: usize,
    needs_flush: bool,
    close_sent: bool,
    /// The payload of a ping to answer.
    pong: Option<Bytes>,
    /// The peer's close frame (code, reason), once it arrived.
    peer_close: Option<(u16, String)>,
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
            reader,
            taken: Outbox::default(),
            payloads: Bytes::new(),
            next_payload: 0,
            options,
            unflushed: 0,
            needs_flush: false,
            close_sent: false,
            pong: None,
            peer_close: None,
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
        let close_with = match (&end.event, end.close_with) {
            (None, _) => Some((
                CloseFrame {
                    code: CloseCode::Away,
                    reason: "client shutting down".into(),
                },
                SHUTDOWN_CLOSE_WAIT,
            )),
            (Some(_), Some(frame)) => Some((
                frame,
                self.options.close_timeout.min(Duration::from_secs(1)),
            )),
            (Some(_), None) => None,
        };
        if let Some((frame, wait)) = close_with {
            // Best effort: the connection is ending either way.
            let _ = tokio::time::timeout(wait, self.ws.close(Some(frame))).await;
        }
        end.event
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let outcome = self.poll_rounds(cx);
        self.arena.drain_into(&mut self.batch);
        // What was read goes to the host before the task waits or ends (so messages always
        // precede the final event).
        if !self.batch.is_empty() {
            self.conn.deliver_batch(&mut self.batch);
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
        let mut progress = self.write_commands(cx)?;
        self.flush(cx)?;
        if self.peer_close.is_some() && !self.needs_flush {
            // Both close frames have been exchanged: the close handshake is complete.
            let (code, reason) = self.peer_close.take().unwrap_or((1005, String::new()));
            return Err(End::event(Event::close(code, &reason)));
        }
        // Hand over what was read (so that the gate counts it) and ask the gate, in one lock.
        self.arena.drain_into(&mut self.batch);
        let gate = if self.batch.is_empty() {
            self.conn.gate(cx.waker())
        } else {
            self.conn
                .deliver_then_gate(&mut self.batch, Some(cx.waker()))
        };
        match gate {
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
            }
        }
        progress |= self.check_timers(cx)?;
        Ok(progress)
    }

    /// Hands queued sends (and a close request) to tungstenite, as long as it accepts them.
    fn write_commands(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        let mut progress = false;
        loop {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(self.io_failure(e)),
                Poll::Pending => return Ok(progress),
            }
            if self.queue_pong()? {
                progress = true;
                continue;
            }
            if self.taken.is_empty() {
                self.take_commands();
            }
            let Some(command) = self.taken.commands.pop_front() else {
                return Ok(progress);
            };
            progress = true;
            match command {
                Command::Send { len, .. } if self.close_sent || self.peer_close.is_some() => {
                    // Sent after the close started: no longer allowed on the wire.
                    self.next_payload += len;
                    self.conn.sent(len);
                }
                Command::Send { text, len } => {
                    let payload = self
                        .payloads
                        .slice(self.next_payload..self.next_payload + len);
                    self.next_payload += len;
                    let message = if text {
                        // SAFETY: ws_send checked that the text is UTF-8 before queueing it.
                        Message::Text(unsafe { Utf8Bytes::from_bytes_unchecked(payload) })
                    } else {
                        Message::Binary(payload)
                    };
                    self.queue(message)?;
                    self.unflushed += len;
                }
                Command::Close(frame) => {
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

    /// Queues the answer to the latest ping, if one is due; returns whether one was (once our
    /// close frame is out, nothing may follow it: the answer is dropped).
    fn queue_pong(&mut self) -> Result<bool, End> {
        let Some(payload) = self.pong.take() else {
            return Ok(false);
        };
        if !self.close_sent {
            self.queue(Message::Pong(payload))?;
        }
        Ok(true)
    }

    /// Takes what the host queued; its payload buffer is frozen once and each message becomes
    /// a slice of it (the buffer is freed once tungstenite has copied the last one out).
    fn take_commands(&mut self) {
        self.conn.take_commands(&mut self.taken);
        self.payloads = Bytes::from(std::mem::take(&mut self.taken.payloads));
        self.next_payload = 0;
    }

    fn flush(&mut self, cx: &mut Context<'_>) -> Result<(), End> {
        if !self.needs_flush {
            return Ok(());
        }
        match self.ws.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => {
                self.conn.sent(std::mem::take(&mut self.unflushed));
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
        let (mut messages, mut bytes, mut progress) = (0, 0, false);
        while messages < allowance.messages
            && bytes < allowance.bytes
            && self.batch.len() + self.arena.pending() < MAX_BATCH
        {
            let item = match self.reader.next_item() {
                Ok(Some(item)) => item,
                Ok(None) => match self.reader.poll_read_from(self.ws.get_mut(), cx) {
                    Poll::Ready(Ok(0)) => return Err(self.stream_ended()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(self.io_failure(WsError::Io(e))),
                    Poll::Pending => break,
                },
                Err(refused) => return Err(refusal(refused)),
            };
            progress = true;
            match item {
                Item::Message { text } => {
                    messages += 1;
                    let payload = self.reader.payload();
                    bytes += payload.len();
                    // Copied out of the read buffer (text with the NUL the C API promises).
                    let parts: &[&[u8]] = if text { &[payload, b"\0"] } else { &[payload] };
                    self.arena.push(parts, text, &mut self.batch);
                }
                Item::OwnedMessage { text, mut data } => {
                    messages += 1;
                    bytes += data.len();
                    // Handed over as it is, after the messages appended before it.
                    self.arena.drain_into(&mut self.batch);
                    let payload = if text {
                        data.push(0);
                        Payload::Text(Bytes::from(data))
                    } else {
                        Payload::Binary(Bytes::from(data))
                    };
                    self.batch.push_back(Event::Message(payload));
                }
                Item::Ping => {
                    // Answered by the next write round; pings that arrive before it can be
                    // written are answered once, for the latest (RFC 6455 5.5.3): a peer that
                    // pings without reading cannot make the answers pile up.
                    self.pong = Some(Bytes::copy_from_slice(self.reader.payload()));
                }
                Item::Pong => {}
                Item::Close(frame) => {
                    if !self.close_sent {
                        // The answer to a ping that came before the close goes first.
                        self.queue_pong()?;
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
                    break;
                }
            }
        }
        if progress {
            self.heard();
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
                return Err(End::event(Event::Error(Error::new(
                    WsStatus::CloseTimeout,
                    format!("close timeout: the peer did not complete the close handshake within {ms} ms"),
                ))));
            }
            next = next.min(deadline);
        }
        let mut pinged = false;
        if let (Some(interval), false) = (
            self.options.keepalive_interval,
            self.close_sent || self.peer_close.is_some(),
        ) {
            let timeout = self.options.keepalive_timeout;
            match self.ping_sent {
                Some(sent) if now >= sent + timeout => {
                    let ms = (now - self.last_heard).as_millis();
                    return Err(End::event(Event::Error(Error::new(
                        WsStatus::KeepaliveTimeout,
                        format!("keepalive timeout: nothing received from the peer for {ms} ms, not even a pong"),
                    ))));
                }
                Some(sent) => next = next.min(sent + timeout),
                None if now >= self.last_heard + interval => {
                    self.queue(Message::Ping(Bytes::new()))?;
                    self.ping_sent = Some(now);
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

    /// The peer's side of the stream ended (the socket reached its end).
    fn stream_ended(&mut self) -> End {
        match self.peer_close.take() {
            Some((code, reason)) => End::event(Event::close(code, &reason)),
            None => End::event(Event::Error(Error::new(
                WsStatus::ConnectionLost,
                "connection closed by the peer without a close handshake",
            ))),
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
        End::event(Event::Error(Error::new(WsStatus::ConnectionLost, message)))
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
        ReadError::Protocol(what) => End::failing(
            WsStatus::Protocol,
            format!("protocol error: {what}"),
            CloseCode::Protocol,
            "protocol error",
        ),
    }
}
