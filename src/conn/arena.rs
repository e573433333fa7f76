//! Where small received payloads are copied: shared blocks, sliced per message.

use std::collections::VecDeque;

use bytes::BytesMut;

use super::event::{Event, Payload, RECEIVE_OVERHEAD};

/// Copies of small received payloads, packed into shared blocks: one allocation per block
/// rather than one per message (the host frees them on its thread, so per-message allocations
/// would also mean per-message cross-thread frees). Payloads are appended to the block as they
/// are read; when the batch is handed over, the filled part of the block is frozen once and
/// each message becomes a slice of it (one reference count each, no further bookkeeping). A
/// block lives until its last message has been dispatched; the writer lets go of it whenever
/// the task goes idle.
pub(crate) struct PayloadArena {
    block: BytesMut,
    /// The payloads appended since the last hand-over: where each ends, and whether it is text.
    pending: Vec<(usize, bool)>,
    /// The block was let go of since the last message (or none was ever allocated).
    idle: bool,
    /// Memory allocated for blocks and not yet charged to a message.
    uncharged: usize,
}

impl Default for PayloadArena {
    fn default() -> PayloadArena {
        PayloadArena { block: BytesMut::new(), pending: Vec::new(), idle: true, uncharged: 0 }
    }
}

impl PayloadArena {
    const BLOCK: usize = 8 << 10;
    const FIRST_BLOCK: usize = 512;

    /// Appends a payload made of `parts` (concatenated); it becomes an event of `batch` at the
    /// next `drain_into`, in order. A full block is drained into `batch` first. Returns what
    /// the message will cost while it waits for dispatch (`Payload::cost`).
    pub(crate) fn push(&mut self, parts: &[&[u8]], text: bool, batch: &mut VecDeque<Event>) -> usize {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut charge = RECEIVE_OVERHEAD;
        if self.block.capacity() - self.block.len() < len {
            self.drain_into(batch);
            // The first block after an idle spell is small: a connection that receives one
            // message at a time would otherwise allocate a whole block for each.
            let size = if self.idle { Self::FIRST_BLOCK } else { Self::BLOCK };
            self.idle = false;
            self.block = BytesMut::with_capacity(size.max(len));
            // The whole block is charged once, to the first message in it: a block lives as
            // long as any of its messages, so a message alone in a block costs the block.
            self.uncharged += self.block.capacity();
            charge += self.block.capacity();
        }
        for part in parts {
            self.block.extend_from_slice(part);
        }
        self.pending.push((self.block.len(), text));
        // Its bytes are in the block (charged once, to the first message in it) and the
        // bookkeeping every message costs.
        charge
    }

    /// Messages appended and not yet drained.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Turns the appended payloads into message events at the end of `batch`.
    pub(crate) fn drain_into(&mut self, batch: &mut VecDeque<Event>) {
        if self.pending.is_empty() {
            return;
        }
        let filled = self.block.split().freeze();
        let mut start = 0;
        for (end, text) in self.pending.drain(..) {
            let bytes = filled.slice(start..end);
            start = end;
            let held = std::mem::take(&mut self.uncharged);
            batch.push_back(Event::Message(Payload::new(bytes, text, held)));
        }
    }

    /// Lets go of the current block (what was handed out stays valid). Nothing may be pending.
    pub(crate) fn release(&mut self) {
        debug_assert!(self.pending.is_empty());
        self.block = BytesMut::new();
        self.idle = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(batch: &VecDeque<Event>) -> Vec<usize> {
        batch.iter().map(|e| e.cost() - super::super::event::RECEIVE_OVERHEAD).collect()
    }

    #[test]
    fn each_block_is_charged_once_to_its_first_message() {
        let mut arena = PayloadArena::default();
        let mut batch = VecDeque::new();
        let told = [arena.push(&[b"a"], false, &mut batch), arena.push(&[b"bc", b"\0"], true, &mut batch)];
        arena.drain_into(&mut batch);
        assert_eq!(costs(&batch), [PayloadArena::FIRST_BLOCK, 0]);
        // What push tells the reader is what the message costs while it waits.
        let actual: Vec<usize> = batch.iter().map(|e| e.cost()).collect();
        assert_eq!(told.to_vec(), actual);
        // The same block, after a hand-over: already paid for.
        arena.push(&[b"d"], false, &mut batch);
        arena.drain_into(&mut batch);
        assert_eq!(costs(&batch)[2], 0);
        // A payload that does not fit starts a new, full-size block.
        arena.push(&[&[7u8; 600]], false, &mut batch);
        arena.drain_into(&mut batch);
        assert_eq!(costs(&batch)[3], PayloadArena::BLOCK);
        // After an idle spell, a small block again.
        arena.release();
        arena.push(&[b"e"], false, &mut batch);
        arena.drain_into(&mut batch);
        assert_eq!(costs(&batch)[4], PayloadArena::FIRST_BLOCK);
        let data: Vec<&[u8]> = batch
            .iter()
            .map(|e| match e {
                Event::Message(p) => p.data(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(data[..3], [&b"a"[..], b"bc", b"d"]);
    }
}
