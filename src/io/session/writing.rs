//! The session's writes: framing what the host sent and the task's own frames (pongs, the
//! keepalive ping, close frames) into one ordered queue, and writing it as the socket takes it.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};

use super::{End, Session};
use crate::conn::{Counted, Outgoing};
use crate::wire::frame::{self, Opcode};
use crate::wire::Written;

/// Pieces of frames handed to one write (one sendmsg for plain TCP), and their bytes at most.
const SLICES_PER_WRITE: usize = 64;
const WRITE_MAX: usize = 64 << 10;
/// Answers to pings waiting to be written. Every ping is answered while the peer reads; only
/// a peer that pings faster than it reads makes them pile up, and then the oldest are dropped
/// (RFC 6455 5.5.3 allows answering only the most recent).
const MAX_PENDING_PONGS: usize = 32;

impl Session {
    /// Writes what there is to write, as long as the socket takes it: the rest of a frame the
    /// host's thread began, answers to pings, a keepalive ping, queued sends, close frames.
    /// Returns whether it made progress; `write_blocked` tells whether it waits for the socket.
    pub(super) fn write_round(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
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
    pub(super) fn close_frame_out(&self) -> bool {
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
    pub(super) fn answer_ping(&mut self, payload: Bytes) -> bool {
        if self.pongs.len() >= MAX_PENDING_PONGS && self.write_blocked {
            self.pongs.pop_front();
        }
        self.pongs.push_back(payload);
        self.pongs.len() < MAX_PENDING_PONGS || self.write_blocked
    }
}
