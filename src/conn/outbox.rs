//! What the host asks the I/O task to do: sends and the close request, in order.
//!
//! Text is carried as text: `push_text` takes a `&str`, so a text frame's payload is always the
//! bytes of a `str`. The fields are private, so no code outside this module can queue other
//! bytes as text.

use std::collections::VecDeque;
use std::mem::size_of;

use bytes::{Bytes, BytesMut};
use tungstenite::protocol::CloseFrame;

use crate::wire::frame::{apply_mask, masking_key, Opcode, MAX_HEADER};

/// What one queued message costs beyond its payload, counted against the send queue limit so
/// that a flood of empty sends is bounded like a flood of large ones: its command in the queue
/// (twice, for the queue's spare capacity) and the frame header and mask added when sending.
pub(crate) const SEND_OVERHEAD: usize = 2 * size_of::<Command>() + MAX_HEADER;

/// One request, in the order the host made it. A send's payload is the next `len` bytes of
/// the payload buffer.
enum Command {
    Text(usize),
    Binary(usize),
    /// Boxed: rare, and it would make every command (and `SEND_OVERHEAD`) larger.
    Close(Box<CloseFrame>),
    /// Frames the host's thread framed (and began writing, perhaps): their unwritten bytes,
    /// what they are counted for until written, and whether part of them is on the wire.
    Rest(Box<(Bytes, Counted, bool)>),
    /// Messages that the host's thread handed to the TLS session, which could not write all of
    /// it yet, and what they are counted for.
    Flush(Box<Counted>),
    /// A large message in an allocation of its own, copied before the connection's lock was
    /// taken (see `Conn::send`).
    Owned(Box<(Opcode, Vec<u8>)>),
}

/// What queued messages count for in bufferedAmount and the send queue limit until written:
/// payload bytes, and messages (each costs `SEND_OVERHEAD` more).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) bytes: usize,
    pub(crate) messages: usize,
}

impl Counted {
    pub(crate) fn message(len: usize) -> Counted {
        Counted { bytes: len, messages: 1 }
    }

    /// What they count for against the send queue limit.
    pub(crate) fn cost(self) -> usize {
        self.bytes.saturating_add(self.messages.saturating_mul(SEND_OVERHEAD))
    }
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

    #[cfg(test)]
    pub(crate) fn push_text(&mut self, text: &str) {
        self.push_text_bytes(text.as_bytes());
    }

    /// A text message's bytes (UTF-8, checked by the caller).
    pub(crate) fn push_text_bytes(&mut self, text: &[u8]) {
        self.push_payload(text);
        self.commands.push_back(Command::Text(text.len()));
    }

    pub(crate) fn push_binary(&mut self, data: &[u8]) {
        self.push_payload(data);
        self.commands.push_back(Command::Binary(data.len()));
    }

    /// A message whose payload was copied into `data` already (no copy here).
    pub(crate) fn push_owned(&mut self, opcode: Opcode, data: Vec<u8>) {
        self.commands.push_back(Command::Owned(Box::new((opcode, data))));
    }

    pub(crate) fn push_close(&mut self, frame: CloseFrame) {
        self.commands.push_back(Command::Close(Box::new(frame)));
    }

    /// Framed bytes (the rest of frames partly written, or frames held back), counted for
    /// `counted` until written.
    pub(crate) fn push_rest(&mut self, rest: &[u8], counted: Counted) {
        self.commands.push_back(Command::Rest(Box::new((Bytes::copy_from_slice(rest), counted, false))));
    }

    /// As `push_rest`, before everything queued: the rest of frames a host's thread began
    /// writing (`begun`: part of them is on the wire), while other sends were queued behind it.
    pub(crate) fn push_rest_first(&mut self, rest: &[u8], counted: Counted, begun: bool) {
        self.commands.push_front(Command::Rest(Box::new((Bytes::copy_from_slice(rest), counted, begun))));
    }

    /// Messages waiting, encrypted, in the TLS session, counted for `counted` until written;
    /// before everything queued (as `push_rest_first`).
    pub(crate) fn push_flush_first(&mut self, counted: Counted) {
        self.commands.push_front(Command::Flush(Box::new(counted)));
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

    /// Empties the outbox; returns what its sends were counted for.
    pub(crate) fn discard(&mut self) -> Counted {
        self.payloads = Vec::new();
        self.commands.drain(..).fold(Counted::default(), |sum, command| {
            let counted = command.counted();
            Counted { bytes: sum.bytes + counted.bytes, messages: sum.messages + counted.messages }
        })
    }
}

impl Command {
    /// What the messages this command sends are counted for.
    fn counted(&self) -> Counted {
        match self {
            Command::Text(len) | Command::Binary(len) => Counted::message(*len),
            Command::Flush(counted) => **counted,
            Command::Rest(rest) => rest.1,
            Command::Owned(owned) => Counted::message(owned.1.len()),
            Command::Close(_) => Counted::default(),
        }
    }
}

/// What the task takes from the outbox in one step, handed out one request at a time.
#[derive(Default)]
pub(crate) struct Taken {
    commands: VecDeque<Command>,
    payloads: BytesMut,
    /// permessage-deflate: messages of this size or more are handed out unmasked, to be
    /// compressed (None: no message is).
    compress_from: Option<usize>,
}

/// One request taken from the outbox.
pub(crate) enum Outgoing {
    /// A message to frame: its payload is masked already, with `key`.
    Message {
        opcode: Opcode,
        key: [u8; 4],
        payload: Bytes,
    },
    /// A message to compress (permessage-deflate), then frame: its payload is not masked.
    Compress {
        opcode: Opcode,
        payload: Bytes,
    },
    /// The rest of a frame of a `len`-byte message, to write before anything else. `begun`:
    /// part of it is on the wire already, so the rest must follow whatever happens.
    Rest {
        bytes: Bytes,
        counted: Counted,
        begun: bool,
    },
    /// Messages waiting in the TLS session: flushing it sends them.
    Flush {
        counted: Counted,
    },
    Close(CloseFrame),
}

impl Taken {
    /// Takes everything queued in `outbox`, which keeps this one's (empty) queue so that both
    /// keep their capacity. Must be empty.
    pub(crate) fn refill_from(&mut self, outbox: &mut Outbox) {
        debug_assert!(self.commands.is_empty());
        std::mem::swap(&mut self.commands, &mut outbox.commands);
        // Owned: each payload is masked in place, then handed out as a slice of it (the
        // buffer is freed once the last one is written).
        // (Vec -> Bytes -> BytesMut keeps the allocation: no copy.)
        self.payloads = BytesMut::from(Bytes::from(std::mem::take(&mut outbox.payloads)));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Messages of `len` bytes or more are to be compressed (permessage-deflate).
    pub(crate) fn compress_from(&mut self, len: usize) {
        self.compress_from = Some(len);
    }

    /// Whether the next request is the rest of a frame the host's thread began writing (which
    /// must go out before anything else).
    pub(crate) fn next_is_rest(&self) -> bool {
        matches!(self.commands.front(), Some(Command::Rest(_) | Command::Flush(_)))
    }

    /// The next request, if any.
    pub(crate) fn pop(&mut self) -> Option<Outgoing> {
        let command = self.commands.pop_front()?;
        Some(match command {
            Command::Text(len) => self.message(Opcode::Text, len),
            Command::Binary(len) => self.message(Opcode::Binary, len),
            Command::Close(frame) => Outgoing::Close(*frame),
            Command::Rest(rest) => Outgoing::Rest { bytes: rest.0, counted: rest.1, begun: rest.2 },
            Command::Flush(counted) => Outgoing::Flush { counted: *counted },
            Command::Owned(owned) => {
                let (opcode, data) = *owned;
                // (Vec -> Bytes -> BytesMut keeps the allocation: no copy.)
                self.outgoing(opcode, BytesMut::from(Bytes::from(data)))
            }
        })
    }

    fn message(&mut self, opcode: Opcode, len: usize) -> Outgoing {
        let payload = self.payloads.split_to(len);
        self.outgoing(opcode, payload)
    }

    /// A message to frame: masked in place, or to compress first.
    fn outgoing(&self, opcode: Opcode, mut payload: BytesMut) -> Outgoing {
        let len = payload.len();
        if self.compress_from.is_some_and(|from| len >= from) {
            return Outgoing::Compress { opcode, payload: payload.freeze() };
        }
        let key = masking_key();
        apply_mask(&mut payload, key);
        Outgoing::Message { opcode, key, payload: payload.freeze() }
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
                Outgoing::Message { opcode, key, payload } => {
                    let mut plain = payload.to_vec();
                    apply_mask(&mut plain, key);
                    format!("{opcode:?} {}", String::from_utf8_lossy(&plain))
                }
                Outgoing::Compress { opcode, payload } => format!("compress {opcode:?} {}", payload.len()),
                Outgoing::Rest { bytes, counted, .. } => format!("rest {} {}", counted.bytes, bytes.len()),
                Outgoing::Flush { counted } => format!("flush {}", counted.bytes),
                Outgoing::Close(f) => format!("close {}", u16::from(f.code)),
            })
            .collect()
    }

    #[test]
    fn requests_come_out_in_order_with_their_own_bytes() {
        let mut outbox = Outbox::default();
        outbox.push_rest(b"tail", Counted::message(10));
        outbox.push_text("héllo");
        outbox.push_binary(b"");
        outbox.push_binary(b"\x01\x02");
        outbox.push_text("");
        outbox.push_close(CloseFrame { code: 1000.into(), reason: "".into() });
        assert_eq!(
            drain(&mut outbox),
            ["rest 10 4", "Text héllo", "Binary ", "Binary \u{1}\u{2}", "Text ", "close 1000"]
        );
        assert!(outbox.is_empty());
        outbox.push_text("again");
        assert_eq!(drain(&mut outbox), ["Text again"]);
    }

    /// A large message copied before the lock: sent as any other, counted the same.
    #[test]
    fn owned_payloads_come_out_in_order_and_masked() {
        let mut outbox = Outbox::default();
        outbox.push_binary(b"a");
        outbox.push_owned(Opcode::Text, b"owned".to_vec());
        outbox.push_binary(b"b");
        assert_eq!(drain(&mut outbox), ["Binary a", "Text owned", "Binary b"]);
        outbox.push_owned(Opcode::Binary, vec![7; 10]);
        assert_eq!(outbox.discard(), Counted::message(10));
    }

    /// What a host's thread began writing while sends were queued behind it goes first.
    #[test]
    fn the_rest_of_a_write_goes_before_what_was_queued_meanwhile() {
        let mut outbox = Outbox::default();
        outbox.push_text("queued meanwhile");
        outbox.push_rest_first(b"rest", Counted::message(7), true);
        assert_eq!(drain(&mut outbox), ["rest 7 4", "Text queued meanwhile"]);
        outbox.push_binary(b"x");
        outbox.push_flush_first(Counted::message(3));
        assert_eq!(drain(&mut outbox), ["flush 3", "Binary x"]);
    }

    #[test]
    fn messages_to_compress_come_out_unmasked() {
        let mut outbox = Outbox::default();
        outbox.push_text("tiny");
        outbox.push_binary(b"large enough");
        let mut taken = Taken::default();
        taken.compress_from(5);
        taken.refill_from(&mut outbox);
        assert!(matches!(taken.pop(), Some(Outgoing::Message { opcode: Opcode::Text, .. })));
        match taken.pop() {
            Some(Outgoing::Compress { opcode: Opcode::Binary, payload }) => assert_eq!(&payload[..], b"large enough"),
            _ => panic!("not to compress"),
        }
    }

    #[test]
    fn an_empty_send_still_costs_its_bookkeeping() {
        let mut outbox = Outbox::default();
        outbox.push_binary(b"");
        outbox.push_text("abc");
        outbox.push_rest(b"xy", Counted { bytes: 5, messages: 2 });
        outbox.push_close(CloseFrame { code: 1000.into(), reason: "".into() });
        let discarded = outbox.discard();
        assert_eq!(discarded, Counted { bytes: 8, messages: 4 });
        assert_eq!(discarded.cost(), 8 + 4 * SEND_OVERHEAD);
        assert!(outbox.is_empty());
        assert!(SEND_OVERHEAD >= 2 * size_of::<Command>());
    }

    /// README: "payloads plus 46 bytes each".
    #[test]
    fn the_bookkeeping_is_what_the_readme_says() {
        assert_eq!(SEND_OVERHEAD, 46);
        let readme = include_str!("../../README.md");
        assert!(readme.contains("plus 46 bytes of bookkeeping") && readme.contains("payloads plus 46 bytes each"));
    }
}
