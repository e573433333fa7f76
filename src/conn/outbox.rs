//! What the host asks the I/O task to do: sends and the close request, in order.
//!
//! Text is carried as text: `push_text` takes a `&str`, and the only way a text message leaves
//! the outbox is as tungstenite's UTF-8 type built from exactly those bytes. The fields are
//! private, so no safe code outside this module can break that.

use std::collections::VecDeque;
use std::mem::size_of;

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

/// What one queued message costs beyond its payload, counted against the send queue limit so
/// that a flood of empty sends is bounded like a flood of large ones: its command in the queue
/// (twice, for the queue's spare capacity) and the frame header and mask tungstenite adds.
pub(crate) const SEND_OVERHEAD: usize = 2 * size_of::<Command>() + 14;

/// One request, in the order the host made it. A send's payload is the next `len` bytes of
/// the payload buffer.
enum Command {
    Text(usize),
    Binary(usize),
    /// Boxed: rare, and it would make every command (and `SEND_OVERHEAD`) larger.
    Close(Box<CloseFrame>),
}

/// Sends and the close request for the I/O task. The payloads are copied back to back into one
/// buffer: a send allocates nothing of its own, and the task takes everything queued, buffer
/// included, in one step.
#[derive(Default)]
pub(crate) struct Outbox {
    commands: VecDeque<Command>,
    payloads: Vec<u8>,
}

impl Outbox {
    /// The smallest payload buffer allocated, so that a run of small sends does not grow it
    /// step by step.
    const MIN_PAYLOADS: usize = 512;

    pub(crate) fn push_text(&mut self, text: &str) {
        self.push_payload(text.as_bytes());
        self.commands.push_back(Command::Text(text.len()));
    }

    pub(crate) fn push_binary(&mut self, data: &[u8]) {
        self.push_payload(data);
        self.commands.push_back(Command::Binary(data.len()));
    }

    pub(crate) fn push_close(&mut self, frame: CloseFrame) {
        self.commands.push_back(Command::Close(Box::new(frame)));
    }

    fn push_payload(&mut self, payload: &[u8]) {
        if self.payloads.capacity() == 0 {
            self.payloads.reserve(payload.len().max(Self::MIN_PAYLOADS));
        }
        self.payloads.extend_from_slice(payload);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Empties the outbox; returns what its sends were counted for: (payload bytes, cost).
    pub(crate) fn discard(&mut self) -> (usize, usize) {
        self.payloads = Vec::new();
        self.commands
            .drain(..)
            .fold((0, 0), |(bytes, cost), command| match command {
                Command::Text(len) | Command::Binary(len) => {
                    (bytes + len, cost + len + SEND_OVERHEAD)
                }
                Command::Close(_) => (bytes, cost),
            })
    }
}

/// What the task takes from the outbox in one step, handed out one request at a time.
#[derive(Default)]
pub(crate) struct Taken {
    commands: VecDeque<Command>,
    payloads: Bytes,
    next_payload: usize,
}

/// One request taken from the outbox.
pub(crate) enum Outgoing {
    /// A message and its payload length.
    Message(Message, usize),
    Close(CloseFrame),
}

impl Taken {
    /// Takes everything queued in `outbox`, which keeps this one's (empty) queue so that both
    /// keep their capacity. Must be empty.
    pub(crate) fn refill_from(&mut self, outbox: &mut Outbox) {
        debug_assert!(self.commands.is_empty());
        std::mem::swap(&mut self.commands, &mut outbox.commands);
        // Frozen once; each message becomes a slice of it (freed once the last one is written).
        self.payloads = Bytes::from(std::mem::take(&mut outbox.payloads));
        self.next_payload = 0;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The next request, if any.
    pub(crate) fn pop(&mut self) -> Option<Outgoing> {
        let command = self.commands.pop_front()?;
        Some(match command {
            Command::Text(len) => {
                let payload = self.next_slice(len);
                // SAFETY: a Text command is only created by `push_text`, from a `&str` whose
                // bytes were copied verbatim, in order, into the payload buffer: the slice is
                // exactly those bytes.
                let text = unsafe { Utf8Bytes::from_bytes_unchecked(payload) };
                Outgoing::Message(Message::Text(text), len)
            }
            Command::Binary(len) => Outgoing::Message(Message::Binary(self.next_slice(len)), len),
            Command::Close(frame) => Outgoing::Close(*frame),
        })
    }

    fn next_slice(&mut self, len: usize) -> Bytes {
        let start = self.next_payload;
        self.next_payload += len;
        self.payloads.slice(start..start + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(outbox: &mut Outbox) -> Vec<String> {
        let mut taken = Taken::default();
        taken.refill_from(outbox);
        std::iter::from_fn(|| taken.pop())
            .map(|o| match o {
                Outgoing::Message(Message::Text(t), len) => format!("text {len} {}", t.as_str()),
                Outgoing::Message(Message::Binary(b), len) => format!("binary {len} {b:?}"),
                Outgoing::Message(other, _) => panic!("unexpected {other:?}"),
                Outgoing::Close(f) => format!("close {}", u16::from(f.code)),
            })
            .collect()
    }

    #[test]
    fn requests_come_out_in_order_with_their_own_bytes() {
        let mut outbox = Outbox::default();
        outbox.push_text("héllo");
        outbox.push_binary(b"");
        outbox.push_binary(&[1, 2]);
        outbox.push_text("");
        outbox.push_close(CloseFrame {
            code: 1000.into(),
            reason: "".into(),
        });
        assert_eq!(
            drain(&mut outbox),
            [
                "text 6 héllo",
                "binary 0 b\"\"",
                "binary 2 b\"\\x01\\x02\"",
                "text 0 ",
                "close 1000"
            ]
        );
        assert!(outbox.is_empty());
        outbox.push_text("again");
        assert_eq!(drain(&mut outbox), ["text 5 again"]);
    }

    #[test]
    fn an_empty_send_still_costs_its_bookkeeping() {
        let mut outbox = Outbox::default();
        outbox.push_binary(b"");
        outbox.push_text("abc");
        outbox.push_close(CloseFrame {
            code: 1000.into(),
            reason: "".into(),
        });
        assert_eq!(outbox.discard(), (3, 3 + 2 * SEND_OVERHEAD));
        assert!(outbox.is_empty());
        assert!(SEND_OVERHEAD >= 2 * size_of::<Command>());
    }

    /// README: "payloads plus 46 bytes each".
    #[test]
    fn the_bookkeeping_is_what_the_readme_says() {
        assert_eq!(SEND_OVERHEAD, 46);
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains("plus 46 bytes of bookkeeping")
                && readme.contains("payloads plus 46 bytes each")
        );
    }
}
