//! Sending: the shortest way for each message, in the order the calls were made.
//!
//! - A small message with nothing queued or being written before it is framed and written on
//!   the caller's thread, with one non-blocking write (no switch to the I/O thread).
//! - Sends made inside callbacks are held ("corked") until their dispatch batch ends and
//!   written together: a batch of replies is one system call. While sends are held, every send
//!   joins them (or, too large, flushes them first), and a close flushes them first.
//! - Everything else, and the unwritten rest of what the caller's thread began, goes to the
//!   I/O task, which writes it before anything of its own. That includes every message that
//!   permessage-deflate compresses: compression runs on the I/O thread, not the host's.
//!
//! Every message is counted (bufferedAmount, the send queue limit) from the moment the call
//! accepts it until its last byte is handed to the socket.

use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::outbox::{Counted, Outbox, SEND_OVERHEAD};
use super::state::{Phase, State, CORK_MAX, WRITE_ON_HOST_THREAD_MAX};
use super::Conn;
use crate::error::{Error, WsStatus};
use crate::host::dispatch;
use crate::wire::frame::{self, Opcode};
use crate::wire::{Wire, Written};

/// Frames made on the caller's thread, back to back, with what each one carries.
#[derive(Default)]
pub(super) struct Frames {
    bytes: Vec<u8>,
    /// Per frame: where it ends in `bytes`, and its payload length.
    ends: Vec<(usize, usize)>,
}

impl Frames {
    /// Capacity kept between uses; a larger buffer (a burst of replies) is freed.
    const KEEP: usize = 4 << 10;

    fn push(&mut self, opcode: Opcode, payload: &[u8]) {
        frame::put_frame(&mut self.bytes, opcode, payload);
        self.ends.push((self.bytes.len(), payload.len()));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        if self.bytes.capacity() > Self::KEEP {
            *self = Frames::default();
        }
    }

    /// What all of them are counted for.
    fn counted(&self) -> Counted {
        Counted { bytes: self.ends.iter().map(|(_, len)| len).sum(), messages: self.ends.len() }
    }

    /// What the first `written` bytes carried: the payload bytes (of a frame written in part,
    /// those past its header) and the messages written whole.
    fn carried_by(&self, written: usize) -> Counted {
        let mut done = Counted::default();
        let mut start = 0;
        for &(end, len) in &self.ends {
            if written >= end {
                done.bytes += len;
                done.messages += 1;
            } else {
                let header = end - start - len;
                done.bytes += written.saturating_sub(start + header);
                break;
            }
            start = end;
        }
        done
    }
}

thread_local! {
    /// Where this thread frames the messages it writes itself (kept: no allocation per send).
    static FRAMES: std::cell::RefCell<Frames> = std::cell::RefCell::new(Frames::default());
}

impl Conn {
    /// Sends `text`; it goes out after the handshake, in order with the other sends.
    pub(crate) fn send_text(self: &Arc<Self>, text: &str) -> Result<(), Error> {
        self.send(Opcode::Text, text.as_bytes())
    }

    /// Sends `data`, as `send_text` does.
    pub(crate) fn send_binary(self: &Arc<Self>, data: &[u8]) -> Result<(), Error> {
        self.send(Opcode::Binary, data)
    }

    fn send(self: &Arc<Self>, opcode: Opcode, payload: &[u8]) -> Result<(), Error> {
        let len = payload.len();
        // A message too large for this thread to write goes to the I/O task: its copy is made
        // before the lock is taken, so that a slow copy (a large message, a buffer paged out)
        // holds up neither the I/O task nor ws_client_free. (A refused send pays a copy.)
        let owned = (len > WRITE_ON_HOST_THREAD_MAX).then(|| payload.to_vec());
        let push = |outbox: &mut Outbox| match (owned, opcode) {
            (Some(data), _) => outbox.push_owned(opcode, data),
            (None, Opcode::Text) => outbox.push_text_bytes(payload),
            (None, _) => outbox.push_binary(payload),
        };
        let mut st = self.lock();
        if matches!(st.phase, Phase::Closing | Phase::Finished) {
            return Err(Error::new(WsStatus::Closing, "the connection is closing: nothing more can be sent"));
        }
        if st.task_ended {
            return Err(Error::new(WsStatus::Closing, "the connection has ended: nothing more can be sent"));
        }
        self.accept(Counted::message(len))?;
        if !st.corked.is_empty() || dispatch::in_batch_of(self.hub.id) {
            if self.cork(&mut st, opcode, payload) {
                return Ok(());
            }
            // Too much to hold back: what is held goes first.
            st = self.uncork_locked(st);
        }
        if let Some(wire) = st.writable_now(len).cloned() {
            st.host_writing = true;
            drop(st);
            FRAMES.with_borrow_mut(|frames| {
                frames.clear();
                frames.push(opcode, payload);
                drop(self.write_claimed(&wire, frames));
            });
            return Ok(());
        }
        self.hand_to_task(st, push);
        Ok(())
    }

    /// Counts a message accepted for sending, within the send queue limit.
    fn accept(&self, message: Counted) -> Result<(), Error> {
        let queued = self.queued_cost.load(Ordering::Relaxed);
        if queued.saturating_add(message.cost()) > self.send_queue_limit {
            return Err(Error::new(
                WsStatus::SendQueueFull,
                format!(
                    "{queued} bytes wait to be sent (payloads plus {SEND_OVERHEAD} bytes a message) and the limit \
                     is {}",
                    self.send_queue_limit
                ),
            ));
        }
        self.queued_cost.fetch_add(message.cost(), Ordering::Relaxed);
        self.buffered.fetch_add(message.bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Holds a send back until the dispatch batch ends (see the module's comment). Returns
    /// false if it cannot: too large, or the socket is not the caller's to write now.
    fn cork(self: &Arc<Self>, st: &mut State, opcode: Opcode, payload: &[u8]) -> bool {
        let len = payload.len();
        let holding = !st.corked.is_empty();
        let may_start = !holding && st.writable_now(len).is_some();
        // A message to compress goes to the I/O thread (after what is held).
        let fits = len <= WRITE_ON_HOST_THREAD_MAX && len < st.compress_from && st.corked.bytes.len() + len <= CORK_MAX;
        if !(fits && (holding || may_start)) {
            return false;
        }
        if !holding {
            dispatch::uncork_when_batch_ends(self.clone());
        }
        st.corked.push(opcode, payload);
        true
    }

    /// Writes the sends held back (see `cork`), at the end of the dispatch batch.
    pub(crate) fn uncork(&self) {
        drop(self.uncork_locked(self.lock()));
    }

    pub(super) fn uncork_locked<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if st.corked.is_empty() {
            return st;
        }
        let mut corked = std::mem::take(&mut st.corked);
        if st.task_ended {
            // Nothing will be sent any more (and the counts were reset when the task ended).
        } else {
            match st.wire.clone() {
                // Still our socket to write (no other write began since, no close frame).
                Some(wire) if !st.task_writing && !st.host_writing && st.outbox.is_empty() => {
                    st.host_writing = true;
                    drop(st);
                    st = self.write_claimed(&wire, &corked);
                }
                // The task writes first (its answers to pings, the rest of a frame): they follow,
                // or, after our close frame, are dropped where they wait.
                _ => {
                    let counted = corked.counted();
                    st = self.hand_to_task_locked(st, |outbox| outbox.push_rest(&corked.bytes, counted));
                }
            }
        }
        corked.clear();
        st.corked = corked;
        st
    }

    /// Writes `frames` now, on this thread, which has claimed the socket (`host_writing`, set
    /// under the lock that is not held now: the write system call runs without it, so the I/O
    /// task can hand over what it reads and other threads can queue sends meanwhile, instead
    /// of waiting on the lock). What the socket does not take goes to the I/O task, before
    /// anything queued meanwhile. Uncounts what was written; returns the lock.
    fn write_claimed(&self, wire: &Wire, frames: &Frames) -> MutexGuard<'_, State> {
        let all = frames.counted();
        let (taken, written) = match wire.write_now(&[IoSlice::new(&frames.bytes)]) {
            Ok(result) => result,
            // The I/O task meets the same error on the socket and ends the connection: the
            // frames wait for it like any other.
            Err(_) => (0, Written::Part(0)),
        };
        let mut st = self.lock();
        st.host_writing = false;
        let task_waits = std::mem::take(&mut st.task_waits_for_host);
        if st.task_ended {
            // Nothing will be sent any more, and the counts were reset when the task ended.
            return st;
        }
        match written {
            Written::All => self.sent(all),
            // TLS: all of it is in the session, which the task will flush.
            Written::Unflushed => {
                self.partial_writes.fetch_add(1, Ordering::Relaxed);
                st.outbox.push_flush_first(all);
            }
            Written::Part(_) => {
                // Part of it is on the wire already: the rest must follow, whatever the send
                // queue holds now (it was counted when accepted), and goes out first.
                if taken > 0 {
                    self.partial_writes.fetch_add(1, Ordering::Relaxed);
                }
                let done = frames.carried_by(taken);
                self.sent(done);
                let rest = Counted { bytes: all.bytes - done.bytes, messages: all.messages - done.messages };
                st.outbox.push_rest_first(&frames.bytes[taken..], rest, taken > 0);
            }
        }
        // The task may have been told of sends queued meanwhile and found the socket taken.
        if task_waits || !st.outbox.is_empty() {
            if let Some(w) = st.task_waker.take() {
                dispatch::wake_task(w, self.hub.id);
            }
        }
        st
    }

    /// Queues a message (counted already) for the I/O task.
    fn hand_to_task(&self, st: MutexGuard<'_, State>, push: impl FnOnce(&mut Outbox)) {
        drop(self.hand_to_task_locked(st, push));
    }

    /// Queues what `push` adds for the I/O task, and wakes the task if it may wait for it.
    fn hand_to_task_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        push: impl FnOnce(&mut Outbox),
    ) -> MutexGuard<'a, State> {
        if let Some(w) = st.queue_for_task(push) {
            dispatch::wake_task(w, self.hub.id);
        }
        st
    }

    /// Messages were handed to the socket (or dropped after the close): they no longer count.
    pub(crate) fn sent(&self, counted: Counted) {
        self.buffered.fetch_sub(counted.bytes, Ordering::Relaxed);
        self.queued_cost.fetch_sub(counted.cost(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_partial_write_carried() {
        let mut frames = Frames::default();
        frames.push(Opcode::Text, b"abc"); // 2 + 4 + 3 = 9 bytes
        frames.push(Opcode::Binary, &[0; 200]); // 4 + 4 + 200 = 208 bytes, ends at 217
        assert_eq!(frames.counted(), Counted { bytes: 203, messages: 2 });
        assert_eq!(frames.carried_by(0), Counted::default());
        assert_eq!(frames.carried_by(5), Counted::default(), "in the first header");
        assert_eq!(frames.carried_by(7), Counted { bytes: 1, messages: 0 });
        assert_eq!(frames.carried_by(9), Counted { bytes: 3, messages: 1 });
        assert_eq!(frames.carried_by(17), Counted { bytes: 3, messages: 1 }, "in the second header");
        assert_eq!(frames.carried_by(18), Counted { bytes: 4, messages: 1 });
        assert_eq!(frames.carried_by(217), Counted { bytes: 203, messages: 2 });
    }

    #[test]
    fn a_large_buffer_is_not_kept() {
        let mut frames = Frames::default();
        frames.push(Opcode::Binary, &[0; 60_000]);
        frames.clear();
        assert_eq!(frames.bytes.capacity(), 0);
        frames.push(Opcode::Binary, &[0; 100]);
        frames.clear();
        assert!(frames.bytes.capacity() >= 100, "a small one is kept");
    }
}
