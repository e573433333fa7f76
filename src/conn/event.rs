//! Events for the host and the received payloads they carry.

use std::mem::size_of;

use bytes::Bytes;

use crate::error::Error;

/// What one received message costs beyond its payload while it waits for dispatch, counted
/// against the receive queue limit so that a flood of empty messages is bounded like a flood
/// of large ones: its event in the queues that hold it (twice, for their spare capacity).
pub(crate) const RECEIVE_OVERHEAD: usize = 2 * size_of::<Event>();

/// A received message, ready to be handed to the host.
pub(crate) struct Payload {
    /// The message; text is UTF-8 followed by one NUL that is not part of it.
    bytes: Bytes,
    text: bool,
    /// The bytes it holds in memory (its allocation, or its part of a shared block) plus
    /// `RECEIVE_OVERHEAD`.
    cost: usize,
}

impl Payload {
    /// `bytes` as described on the field; `held` the memory they keep alive.
    pub(crate) fn new(bytes: Bytes, text: bool, held: usize) -> Payload {
        debug_assert!(!text || bytes.last() == Some(&0));
        Payload { bytes, text, cost: held + RECEIVE_OVERHEAD }
    }

    /// A payload that owns its allocation (text followed by its NUL): it costs the
    /// allocation's capacity, not its length.
    pub(crate) fn owned(data: Vec<u8>, text: bool) -> Payload {
        let held = data.capacity();
        Payload::new(Bytes::from(data), text, held)
    }

    pub(crate) fn is_text(&self) -> bool {
        self.text
    }

    /// The message's bytes (without the NUL that follows text).
    pub(crate) fn data(&self) -> &[u8] {
        &self.bytes[..self.bytes.len() - self.text as usize]
    }

    /// What it costs while it waits, in bytes.
    pub(crate) fn cost(&self) -> usize {
        self.cost
    }
}

/// Events the I/O task produces for the host, delivered in this order per connection.
pub(crate) enum Event {
    Open,
    Message(Payload),
    /// Final: a completed close handshake. `reason` ends with a NUL.
    Close {
        code: u16,
        reason: Vec<u8>,
    },
    /// Final: everything else.
    Error(Error),
}

impl Event {
    pub(crate) fn close(code: u16, reason: &str) -> Event {
        let mut bytes = Vec::with_capacity(reason.len() + 1);
        bytes.extend_from_slice(reason.as_bytes());
        bytes.push(0);
        Event::Close { code, reason: bytes }
    }

    pub(crate) fn is_final(&self) -> bool {
        matches!(self, Event::Close { .. } | Event::Error(_))
    }

    /// What it costs while it waits for dispatch (0 for events that are not messages: there
    /// are at most two of them per connection).
    pub(crate) fn cost(&self) -> usize {
        match self {
            Event::Message(payload) => payload.cost(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README: "plus 96 bytes of bookkeeping".
    #[test]
    fn the_bookkeeping_is_what_the_readme_says() {
        assert_eq!(RECEIVE_OVERHEAD, 96);
        let readme = include_str!("../../README.md");
        assert!(readme.contains("plus 96 bytes of\n  bookkeeping") && readme.contains("plus 96 bytes each"));
    }
}
