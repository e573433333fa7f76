//! Where small received payloads are copied: shared blocks, sliced per message.

use std::collections::VecDeque;

use bytes::BytesMut;

use super::event::{Event, Payload};

/// Copies of small received payloads, packed into shared blocks: one allocation per block
/// rather than one per message (the host frees them on its thread, so per-message allocations
/// would also mean per-message cross-thread frees). Payloads are appended to the block as they
/// are read; when the batch is handed over, the filled part of the block is frozen once and
/// each message becomes a slice of it (one reference count each, no further bookkeeping). A
/// block lives until its last message has been dispatched; the writer lets go of it whenever
/// the task goes idle.
pub struct PayloadArena {
    block: BytesMut,
    /// The payloads appended since the last hand-over: where each ends, and whether it is text.
    pending: Vec<(usize, bool)>,
    /// The block was let go of since the last message (or none was ever allocated).
    idle: bool,
}

impl Default for PayloadArena {
    fn default() -> PayloadArena {
        PayloadArena {
            block: BytesMut::new(),
            pending: Vec::new(),
            idle: true,
        }
    }
}

impl PayloadArena {
    const BLOCK: usize = 8 << 10;
    const FIRST_BLOCK: usize = 512;

    /// Appends a payload made of `parts` (concatenated); it becomes an event of `batch` at the
    /// next `drain_into`, in order. A full block is drained into `batch` first.
    pub fn push(&mut self, parts: &[&[u8]], text: bool, batch: &mut VecDeque<Event>) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.block.capacity() - self.block.len() < len {
            self.drain_into(batch);
            // The first block after an idle spell is small: a connection that receives one
            // message at a time would otherwise allocate a whole block for each.
            let size = if self.idle {
                Self::FIRST_BLOCK
            } else {
                Self::BLOCK
            };
            self.idle = false;
            self.block = BytesMut::with_capacity(size.max(len));
        }
        for part in parts {
            self.block.extend_from_slice(part);
        }
        self.pending.push((self.block.len(), text));
    }

    /// Messages appended and not yet drained.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Turns the appended payloads into message events at the end of `batch`.
    pub fn drain_into(&mut self, batch: &mut VecDeque<Event>) {
        if self.pending.is_empty() {
            return;
        }
        let filled = self.block.split().freeze();
        let mut start = 0;
        for (end, text) in self.pending.drain(..) {
            let bytes = filled.slice(start..end);
            start = end;
            batch.push_back(Event::Message(if text {
                Payload::Text(bytes)
            } else {
                Payload::Binary(bytes)
            }));
        }
    }

    /// Lets go of the current block (what was handed out stays valid). Nothing may be pending.
    pub fn release(&mut self) {
        debug_assert!(self.pending.is_empty());
        self.block = BytesMut::new();
        self.idle = true;
    }
}
