//! The session's reads: frames from the socket into the host's batch within the gate's
//! allowance, reading ahead for pings while the host holds messages, and how a session ends
//! when the peer closes, breaks the protocol or goes away.

use std::io;
use std::task::{Context, Poll};

use bytes::Bytes;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

use super::{End, Session};
use crate::conn::{Allowance, Event, Payload};
use crate::error::WsStatus;
use crate::io::reader::{Buffered, Item, ReadError};
use crate::wire::Receiving;

/// Messages read before they are handed to the host as one batch (one lock, one wake-up).
const MAX_BATCH: usize = 1024;
/// Socket reads in one round of reading ahead while the host holds messages.
const READ_AHEAD_ROUNDS: usize = 16;

impl Session {
    /// Reads messages into the batch, as many as the allowance permits and the socket has.
    pub(super) fn read(&mut self, cx: &mut Context<'_>, allowance: Allowance) -> Result<bool, End> {
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
    pub(super) fn read_ahead(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
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
    pub(super) fn finish_failing(&mut self, cx: &mut Context<'_>, progress: bool) -> Result<bool, End> {
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

    /// The peer's side of the stream ended (the socket reached its end).
    fn stream_ended(&mut self) -> End {
        match self.peer_close.take() {
            Some((code, reason)) => End::event(Event::close(code, &reason)),
            None => {
                End::error(WsStatus::ConnectionLost, "connection closed by the peer without a close handshake".into())
            }
        }
    }

    pub(super) fn io_failure(&mut self, err: io::Error) -> End {
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
