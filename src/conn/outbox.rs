//! What the host asks the I/O task to do: sends and the close request, in order.

use std::collections::VecDeque;

use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// What the host asks the I/O task to do, in the order it asked.
pub enum Command {
    /// A message whose payload is the next `len` bytes of the outbox's payloads.
    Send {
        text: bool,
        len: usize,
    },
    Close(CloseFrame),
}

/// Sends and the close request, in the order the host made them, for the I/O task. The
/// payloads are copied back to back into one buffer: a send allocates nothing of its own, and
/// the task takes everything queued, buffer included, in one step.
#[derive(Default)]
pub struct Outbox {
    pub commands: VecDeque<Command>,
    pub payloads: Vec<u8>,
}

impl Outbox {
    /// The smallest payload buffer allocated, so that a run of small sends does not grow it
    /// step by step.
    const MIN_PAYLOADS: usize = 512;

    pub(crate) fn push_send(&mut self, payload: &[u8], text: bool) {
        if self.payloads.capacity() == 0 {
            self.payloads.reserve(payload.len().max(Self::MIN_PAYLOADS));
        }
        self.payloads.extend_from_slice(payload);
        self.commands.push_back(Command::Send {
            text,
            len: payload.len(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Empties the outbox; returns the payload bytes of the sends it held.
    pub(crate) fn discard(&mut self) -> usize {
        self.payloads = Vec::new();
        self.commands
            .drain(..)
            .map(|c| {
                if let Command::Send { len, .. } = c {
                    len
                } else {
                    0
                }
            })
            .sum()
    }
}
