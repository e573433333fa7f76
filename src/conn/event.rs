//! Events for the host and the received payloads they carry.

use tokio_tungstenite::tungstenite::Bytes;

use crate::error::Error;

/// A received message, ready to be handed to the host.
pub enum Payload {
    /// UTF-8 text followed by one NUL that is not part of the message.
    Text(Bytes),
    Binary(Bytes),
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(bytes) => bytes.len() - 1,
            Payload::Binary(bytes) => bytes.len(),
        }
    }
}

/// Events the I/O task produces for the host, delivered in this order per connection.
pub enum Event {
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
    pub fn close(code: u16, reason: &str) -> Event {
        let mut bytes = Vec::with_capacity(reason.len() + 1);
        bytes.extend_from_slice(reason.as_bytes());
        bytes.push(0);
        Event::Close {
            code,
            reason: bytes,
        }
    }

    pub(crate) fn is_final(&self) -> bool {
        matches!(self, Event::Close { .. } | Event::Error(_))
    }
}
