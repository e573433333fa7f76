//! Frames from the peer: the receiving half of the WebSocket protocol (RFC 6455 section 5),
//! read straight from the socket. (What we send is framed by `crate::wire::frame`.)
//!
//! Why our own: tungstenite keeps a read buffer of fixed size for the life of a connection, so
//! a connection had to choose between small reads (many system calls for large messages) and a
//! large buffer held by every idle connection. Here the buffer exists only while bytes wait to be
//! parsed: a connection reads up to `read_size` bytes at a time while data arrives and holds no
//! buffer when idle. A frame larger than what is buffered is read straight into an allocation
//! of its own, which becomes the message handed to the host (no copy). Parsing works on the
//! buffer in place, without per-frame bookkeeping.

use std::io;
use std::ops::Range;
use std::task::{Context, Poll};

use std::cell::Cell;

use bytes::Bytes;

use crate::deflate::{InflateError, Inflater};

/// A data frame at least this large that is not complete in the buffer is read into an
/// allocation of its own (smaller ones wait in the buffer for the rest of their bytes).
const OWN_ALLOCATION_FROM: usize = 16 << 10;
/// Free space below which the buffer is compacted or grown before a read.
const MIN_READ: usize = 1 << 10;
/// The last bytes of a large frame, when no more than this many are missing, are read into the
/// buffer with what follows them (and then moved), not alone: messages of 16 KiB arriving back
/// to back cost a second, 16-byte read every fourth message otherwise (strace of W3).
const REST_READ_WITH_WHAT_FOLLOWS: usize = 16 << 10;

thread_local! {
    /// A read buffer no connection holds, for the next one that receives on this thread: a
    /// connection that goes idle after every message (request and response) would otherwise
    /// allocate and free a buffer for each.
    static SPARE_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// What the peer sent, one complete item at a time.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// A one-frame message whose payload is `FrameReader::payload()` until the next call.
    Message {
        text: bool,
    },
    /// A message in an allocation of its own (a large frame, or reassembled fragments); text
    /// is followed by a NUL that is not part of it.
    OwnedMessage {
        text: bool,
        data: Vec<u8>,
    },
    /// A ping whose payload is `FrameReader::payload()`.
    Ping,
    Pong,
    /// The peer's close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Why the peer's bytes were refused; each maps to a close code.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// 1002.
    Protocol(&'static str),
    /// 1007.
    InvalidUtf8,
    /// 1009.
    TooBig { size: u64, max: usize },
    /// 1009: the memory for a message of `size` bytes could not be allocated.
    OutOfMemory { size: u64 },
    /// 1009: a compressed message inflates to more than `max` bytes.
    InflatedTooBig { max: usize },
    /// 1007: a compressed message is not valid deflate data (zlib's reason).
    Corrupt(String),
}

/// What the host's thread finds next in the buffer (see `FrameReader::next_on_host`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OnHost {
    /// A whole small data frame, taken out of the buffer.
    Message { text: bool },
    /// The start of one, or nothing: more bytes must be read.
    NeedBytes,
    /// Something the I/O task reads (a control frame, a fragment, a large frame, bytes that
    /// break the protocol): left in the buffer.
    Other,
}

/// A control frame found behind data the host has not taken yet (see
/// `FrameReader::next_buffered_control`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Buffered {
    Ping(Bytes),
    Pong,
}

/// A data frame being read into its own allocation.
struct LargeFrame {
    opcode: u8,
    fin: bool,
    compressed: bool,
    len: usize,
    data: Vec<u8>,
}

/// A fragmented message being put together.
struct Fragments {
    text: bool,
    /// permessage-deflate: `data` holds the compressed bytes, inflated at the last fragment.
    compressed: bool,
    data: Vec<u8>,
    /// Text: how much of `data` is known to be valid UTF-8 (the rest is the start of a
    /// character that the next fragment completes).
    valid_up_to: usize,
}

pub(crate) struct FrameReader {
    /// Bytes read and not parsed yet start at `start`.
    buf: Vec<u8>,
    start: usize,
    /// The payload of the last `Message` or `Ping` item, in `buf`.
    last_payload: Range<usize>,
    /// Boxed, as `fragments`: rare, and every connection's reader holds the fields (twice,
    /// while the host's thread reads: see `crate::host::reading`).
    large: Option<Box<LargeFrame>>,
    fragments: Option<Box<Fragments>>,
    read_size: usize,
    max_message: usize,
    /// permessage-deflate, if negotiated: RSV1 marks compressed messages. Boxed: every
    /// connection's reader holds the field, few connections compress.
    inflater: Option<Box<Inflater>>,
}

struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    header_len: usize,
    len: u64,
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

impl FrameReader {
    /// `leftover`: bytes that arrived with the handshake response.
    pub fn new(leftover: Vec<u8>, read_size: usize, max_message: usize, inflater: Option<Inflater>) -> FrameReader {
        FrameReader {
            buf: leftover,
            start: 0,
            last_payload: 0..0,
            large: None,
            fragments: None,
            read_size,
            max_message,
            inflater: inflater.map(Box::new),
        }
    }

    /// The payload of the last `Item::Message` or `Item::Ping`.
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.last_payload.clone()]
    }

    /// The next complete item, or None when more bytes must be read first (`poll_read_from`).
    pub fn next_item(&mut self) -> Result<Option<Item>, ReadError> {
        if let Some(large) = &mut self.large {
            // Its last bytes may have been read into the buffer (see `poll_read_from`).
            let waiting = self.buf.len() - self.start;
            if waiting > 0 && large.data.len() < large.len {
                let take = waiting.min(large.len - large.data.len());
                try_grow(&mut large.data, large.len, take)?;
                large.data.extend_from_slice(&self.buf[self.start..self.start + take]);
                self.start += take;
            }
            if large.data.len() < large.len {
                // Room for what may arrive next: memory follows the bytes that arrived.
                grow_for_arrival(&mut large.data, large.len, self.read_size)?;
                return Ok(None);
            }
            let LargeFrame { opcode, fin, compressed, data, .. } = *self.large.take().expect("checked above");
            if let Some(item) = self.data_frame(opcode, fin, compressed, Payload::Owned(data))? {
                return Ok(Some(item));
            }
        }
        loop {
            let available = &self.buf[self.start..];
            let Some(header) = parse_header(available)? else {
                return Ok(None);
            };
            self.check_frame(&header)?;
            let len = header.len as usize;
            let body = self.start + header.header_len;
            if self.buf.len() - body < len {
                if header.opcode < CLOSE && len >= OWN_ALLOCATION_FROM {
                    self.start_large_frame(&header, body)?;
                }
                return Ok(None);
            }
            let payload = body..body + len;
            self.start = payload.end;
            let item = match header.opcode {
                PING => {
                    self.last_payload = payload;
                    Some(Item::Ping)
                }
                PONG => Some(Item::Pong),
                CLOSE => Some(parse_close(&self.buf[payload])?),
                opcode => self.data_frame(opcode, header.fin, header.rsv1, Payload::InBuffer(payload))?,
            };
            if item.is_some() {
                return Ok(item);
            }
        }
    }

    /// Reads more bytes from `stream`: into the large frame being read, else into the buffer.
    /// Ready(Ok(0)) is the end of the stream.
    pub fn poll_read_from<S: Source + ?Sized>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if let Some(large) = &mut self.large {
            let missing = large.len - large.data.len();
            if missing > REST_READ_WITH_WHAT_FOLLOWS {
                // `next_item` made room for some of the missing bytes.
                let room = missing.min(large.data.capacity() - large.data.len());
                return stream.poll_read_into(cx, &mut large.data, room);
            }
        }
        self.make_room();
        let room = self.buf.capacity() - self.buf.len();
        stream.poll_read_into(cx, &mut self.buf, room)
    }

    /// Control frames that arrived behind data frames not read yet, taken out of the buffer
    /// (the data frames stay): while the host holds messages, a ping behind them is answered.
    /// Only what is in the buffer is seen (see `poll_read_ahead`); a close frame, a frame not
    /// complete yet, or bytes that break the protocol end the search (they are dealt with in
    /// order, when the host has caught up).
    pub fn next_buffered_control(&mut self) -> Option<Buffered> {
        if self.large.is_some() {
            return None;
        }
        let mut at = self.start;
        loop {
            let header = parse_header(&self.buf[at..]).ok()??;
            let body = at + header.header_len;
            let end = body.checked_add(usize::try_from(header.len).ok()?)?;
            if end > self.buf.len() {
                return None;
            }
            match header.opcode {
                CONTINUATION | TEXT | BINARY => at = end,
                PING | PONG if header.fin && !header.rsv1 && header.len <= 125 => {
                    let found = match header.opcode {
                        PING => Buffered::Ping(Bytes::copy_from_slice(&self.buf[body..end])),
                        _ => Buffered::Pong,
                    };
                    // Moves the bytes behind it: at most one read buffer.
                    self.buf.drain(at..end);
                    return Some(found);
                }
                _ => return None,
            }
        }
    }

    /// Reads more bytes into the buffer while the host holds messages, as long as the bytes
    /// waiting in it stay under one read buffer: what `next_buffered_control` can search.
    /// None when there is no room (or a large frame is being read): the rest waits.
    pub fn poll_read_ahead<S: Source + ?Sized>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        let waiting = self.buf.len() - self.start;
        if self.large.is_some() || waiting >= self.read_size {
            return None;
        }
        self.make_room();
        let room = (self.read_size - waiting).min(self.buf.capacity() - self.buf.len());
        Some(stream.poll_read_into(cx, &mut self.buf, room))
    }

    /// Whether nothing is held between frames: no unparsed byte, no large frame or fragmented
    /// message under way, no compression. Only then may another thread take the reading over
    /// (see `crate::host::reading`).
    pub fn between_frames(&self) -> bool {
        self.start == self.buf.len() && self.large.is_none() && self.fragments.is_none() && self.inflater.is_none()
    }

    /// The next item, for the host's thread (`crate::host::reading`): a whole unfragmented
    /// data frame of at most `max_len` bytes, complete in the buffer, taken out as
    /// `Item::Message` (its payload is `payload()`); anything else is left where it is, for
    /// the I/O task to read as it always does (whatever is wrong with it, it reports).
    pub fn next_on_host(&mut self, max_len: usize) -> OnHost {
        if self.large.is_some() || self.fragments.is_some() || self.inflater.is_some() {
            return OnHost::Other;
        }
        let header = match parse_header(&self.buf[self.start..]) {
            Ok(Some(header)) => header,
            Ok(None) => return OnHost::NeedBytes,
            Err(_) => return OnHost::Other,
        };
        let simple = header.fin && !header.rsv1 && matches!(header.opcode, TEXT | BINARY);
        if !simple || header.len > max_len as u64 || self.check_frame(&header).is_err() {
            return OnHost::Other;
        }
        let body = self.start + header.header_len;
        let payload = body..body + header.len as usize;
        if payload.end > self.buf.len() {
            return OnHost::NeedBytes;
        }
        let text = header.opcode == TEXT;
        if text && std::str::from_utf8(&self.buf[payload.clone()]).is_err() {
            return OnHost::Other;
        }
        self.start = payload.end;
        self.last_payload = payload;
        OnHost::Message { text }
    }

    /// Reads more bytes into the buffer, for the host's thread: at most what fits in one read
    /// buffer (`make_room` keeps one there).
    pub fn poll_read_on_host<S: Source + ?Sized>(
        &mut self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        debug_assert!(self.large.is_none());
        self.make_room();
        let room = self.buf.capacity() - self.buf.len();
        stream.poll_read_into(cx, &mut self.buf, room)
    }

    /// Puts `spare` in this thread's place for a spare buffer, and returns what was there: the
    /// host's thread keeps its spare with the client it reads for (see `host::reading`), so
    /// that freeing the client frees it.
    pub fn swap_spare(spare: Vec<u8>) -> Vec<u8> {
        SPARE_BUFFER.replace(spare)
    }

    /// Lets go of the buffer if nothing in it waits to be parsed (an idle connection holds none).
    pub fn release_if_drained(&mut self) {
        if self.start == self.buf.len() && self.large.is_none() && self.buf.capacity() > 0 {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            // Kept as the thread's spare if it has none (the one it had is freed otherwise).
            let spare = SPARE_BUFFER.take();
            SPARE_BUFFER.set(if spare.capacity() >= buf.capacity() { spare } else { buf });
            self.start = 0;
            self.last_payload = 0..0;
        }
    }

    /// Moves unparsed bytes to the front, and makes sure a read of a useful size fits.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(self.buf.len() - self.start);
            self.last_payload = 0..0;
            self.start = 0;
        }
        if self.buf.capacity() == 0 {
            let spare = SPARE_BUFFER.take();
            if spare.capacity() >= self.read_size {
                self.buf = spare;
            } else {
                SPARE_BUFFER.set(spare);
            }
        }
        let room = self.buf.capacity() - self.buf.len();
        if room < MIN_READ || self.buf.capacity() < self.read_size {
            // Exact: a buffer of `read_size` (more only while a frame larger than that waits
            // for its last bytes, and such frames below OWN_ALLOCATION_FROM are small).
            self.buf.reserve_exact(self.read_size.max(self.buf.len() + MIN_READ) - self.buf.len());
        }
    }

    fn check_frame(&self, header: &Header) -> Result<(), ReadError> {
        if header.rsv1 {
            // RFC 7692 6: RSV1 marks the first frame of a compressed message, and only that.
            if self.inflater.is_none() {
                return Err(ReadError::Protocol("RSV1 set in a frame header, and no extension was negotiated"));
            }
            match header.opcode {
                CLOSE | PING | PONG => return Err(ReadError::Protocol("RSV1 set on a control frame")),
                CONTINUATION => return Err(ReadError::Protocol("RSV1 set on a continuation frame")),
                _ => {}
            }
        }
        match header.opcode {
            CLOSE | PING | PONG => {
                if !header.fin {
                    return Err(ReadError::Protocol("fragmented control frame"));
                }
                if header.len > 125 {
                    return Err(ReadError::Protocol("control frame longer than 125 bytes"));
                }
            }
            CONTINUATION | TEXT | BINARY => {
                let so_far = self.fragments.as_ref().map_or(0, |f| f.data.len()) as u64;
                if header.len.saturating_add(so_far) > self.max_message as u64 {
                    return Err(ReadError::TooBig { size: header.len.saturating_add(so_far), max: self.max_message });
                }
                match (header.opcode, self.fragments.is_some()) {
                    (CONTINUATION, false) => {
                        return Err(ReadError::Protocol("continuation frame without a message to continue"))
                    }
                    (TEXT | BINARY, true) => {
                        return Err(ReadError::Protocol("new data frame before the fragmented message ended"))
                    }
                    _ => {}
                }
            }
            _ => return Err(ReadError::Protocol("reserved opcode")),
        }
        Ok(())
    }

    /// Starts reading a large data frame into an allocation of its own, which grows with the
    /// bytes that arrive (a header alone reserves no more than one read buffer).
    fn start_large_frame(&mut self, header: &Header, body: usize) -> Result<(), ReadError> {
        let len = header.len as usize;
        let mut data = Vec::new();
        let arrived = &self.buf[body..];
        try_grow(&mut data, len, arrived.len().saturating_mul(2).max(self.read_size))?;
        data.extend_from_slice(arrived);
        self.buf.truncate(self.start);
        self.large =
            Some(Box::new(LargeFrame { opcode: header.opcode, fin: header.fin, compressed: header.rsv1, len, data }));
        Ok(())
    }

    /// A complete data frame: a message, or a fragment of one (None).
    fn data_frame(
        &mut self,
        opcode: u8,
        fin: bool,
        compressed: bool,
        payload: Payload,
    ) -> Result<Option<Item>, ReadError> {
        let text = match opcode {
            CONTINUATION => self.fragments.as_ref().is_some_and(|f| f.text),
            opcode => opcode == TEXT,
        };
        if compressed && opcode != CONTINUATION && fin {
            let bytes = match &payload {
                Payload::InBuffer(range) => &self.buf[range.clone()],
                Payload::Owned(data) => &data[..],
            };
            let data = inflate(&mut self.inflater, bytes, self.max_message, text)?;
            return finish_owned(text, data).map(Some);
        }
        if opcode != CONTINUATION && fin {
            // A whole message in one frame: the usual case.
            return match payload {
                Payload::InBuffer(range) => {
                    if text && std::str::from_utf8(&self.buf[range.clone()]).is_err() {
                        return Err(ReadError::InvalidUtf8);
                    }
                    self.last_payload = range;
                    Ok(Some(Item::Message { text }))
                }
                Payload::Owned(data) => finish_owned(text, data).map(Some),
            };
        }
        let fragments = self
            .fragments
            .get_or_insert_with(|| Box::new(Fragments { text, compressed, data: Vec::new(), valid_up_to: 0 }));
        let bytes = match &payload {
            Payload::InBuffer(range) => &self.buf[range.clone()],
            Payload::Owned(data) => &data[..],
        };
        match payload {
            Payload::Owned(data) if fragments.data.is_empty() => fragments.data = data,
            _ => {
                // Grows like a Vec (doubling when full), but an allocation failure is an error,
                // not an abort.
                let needed = fragments.data.len() + bytes.len();
                if needed > fragments.data.capacity() {
                    let target = needed.max(fragments.data.capacity().saturating_mul(2));
                    let additional = target - fragments.data.len();
                    try_grow(&mut fragments.data, self.max_message.max(needed), additional)?;
                }
                fragments.data.extend_from_slice(bytes);
            }
        }
        if fragments.text && !fragments.compressed {
            // Invalid UTF-8 fails the message at the fragment that holds it, not at its end.
            fragments.check_utf8(fin)?;
        }
        if !fin {
            return Ok(None);
        }
        let Fragments { text, compressed, data, .. } = *self.fragments.take().expect("inserted above");
        if compressed {
            let data = inflate(&mut self.inflater, &data, self.max_message, text)?;
            return finish_owned(text, data).map(Some);
        }
        Ok(Some(Item::OwnedMessage { text, data: with_nul_if_text(text, data)? }))
    }
}

enum Payload {
    InBuffer(Range<usize>),
    Owned(Vec<u8>),
}

impl Fragments {
    /// Checks the text received since the last check; at the end of the message (`fin`) no
    /// character may be left unfinished.
    fn check_utf8(&mut self, fin: bool) -> Result<(), ReadError> {
        match std::str::from_utf8(&self.data[self.valid_up_to..]) {
            Ok(_) => self.valid_up_to = self.data.len(),
            // The start of a character that the next fragment may complete.
            Err(e) if e.error_len().is_none() && !fin => self.valid_up_to += e.valid_up_to(),
            Err(_) => return Err(ReadError::InvalidUtf8),
        }
        Ok(())
    }
}

/// Inflates a compressed message (all its frames' payloads), within the maximum message size,
/// checked while inflating. Text gets room for its NUL.
fn inflate(
    inflater: &mut Option<Box<Inflater>>,
    compressed: &[u8],
    max: usize,
    text: bool,
) -> Result<Vec<u8>, ReadError> {
    let inflater = inflater.as_mut().expect("RSV1 is refused without an inflater");
    inflater.inflate(compressed, max, usize::from(text)).map_err(|e| match e {
        InflateError::TooBig { max } => ReadError::InflatedTooBig { max },
        InflateError::OutOfMemory { size } => ReadError::OutOfMemory { size: size as u64 },
        InflateError::Corrupt(why) => ReadError::Corrupt(why),
    })
}

fn finish_owned(text: bool, data: Vec<u8>) -> Result<Item, ReadError> {
    if text && std::str::from_utf8(&data).is_err() {
        return Err(ReadError::InvalidUtf8);
    }
    Ok(Item::OwnedMessage { text, data: with_nul_if_text(text, data)? })
}

/// Text is handed to the host followed by a NUL (not part of the message).
fn with_nul_if_text(text: bool, mut data: Vec<u8>) -> Result<Vec<u8>, ReadError> {
    if text {
        data.try_reserve_exact(1).map_err(|_| ReadError::OutOfMemory { size: data.len() as u64 + 1 })?;
        data.push(0);
    }
    Ok(data)
}

/// Makes room in `data` (which will hold at most `len` bytes) for about as many bytes as it
/// holds already, and at least `step`: the allocation doubles as bytes arrive, and never runs
/// more than one step ahead of them.
fn grow_for_arrival(data: &mut Vec<u8>, len: usize, step: usize) -> Result<(), ReadError> {
    if data.capacity() > data.len() {
        return Ok(());
    }
    try_grow(data, len, data.len().max(step))
}

/// Reserves `additional` more bytes in `data`, without passing `len` (plus the text NUL);
/// an allocation failure is an error, not an abort.
fn try_grow(data: &mut Vec<u8>, len: usize, additional: usize) -> Result<(), ReadError> {
    let target = data.len().saturating_add(additional).min(len.saturating_add(1));
    let additional = target.saturating_sub(data.len());
    data.try_reserve_exact(additional).map_err(|_| ReadError::OutOfMemory { size: len as u64 })
}

/// The frame header at the start of `bytes`, or None if it has not fully arrived.
fn parse_header(bytes: &[u8]) -> Result<Option<Header>, ReadError> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    if first & 0x30 != 0 {
        // No extension we offer uses RSV2 or RSV3 (RSV1 is checked with the frame's context).
        return Err(ReadError::Protocol("reserved bits set in a frame header"));
    }
    if second & 0x80 != 0 {
        return Err(ReadError::Protocol("masked frame from the server"));
    }
    let (len, header_len) = match second & 0x7F {
        126 => match bytes.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        short => (short as u64, 2),
    };
    if len >> 63 != 0 {
        return Err(ReadError::Protocol("frame length with the most significant bit set"));
    }
    Ok(Some(Header { fin: first & 0x80 != 0, rsv1: first & 0x40 != 0, opcode: first & 0x0F, header_len, len }))
}

fn parse_close(payload: &[u8]) -> Result<Item, ReadError> {
    let (code, reason) = match payload {
        [] => return Ok(Item::Close(None)),
        [_] => return Err(ReadError::Protocol("close frame with a one-byte payload")),
        [high, low, reason @ ..] => (u16::from_be_bytes([*high, *low]), reason),
    };
    // The codes an endpoint may send (RFC 6455 7.4, and the IANA registry's 1012-1014).
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(ReadError::Protocol("invalid close code"));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| ReadError::InvalidUtf8)?;
    Ok(Item::Close(Some((code, reason.to_owned()))))
}

/// Where the reader's bytes come from: the connection's socket (`wire::Wire`), or a slice.
pub(crate) trait Source {
    /// Reads at most `max` bytes into the spare capacity of `buf` (which has that much).
    /// Ready(Ok(0)) is the end of the stream.
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>, max: usize) -> Poll<io::Result<usize>>;
}

/// Bytes from a slice, as many as fit each time (the tests and fuzz targets cut streams so).
impl Source for &[u8] {
    fn poll_read_into(&mut self, _: &mut Context<'_>, buf: &mut Vec<u8>, max: usize) -> Poll<io::Result<usize>> {
        let n = max.min(self.len());
        buf.extend_from_slice(&self[..n]);
        *self = &self[n..];
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n < 65536 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `bytes` to a reader `step` bytes at a time and collects what it produces.
    fn read_all(bytes: &[u8], step: usize) -> Result<Vec<(Item, Vec<u8>)>, ReadError> {
        read_all_with(bytes, step, None)
    }

    fn read_all_with(bytes: &[u8], step: usize, inflater: Option<Inflater>) -> Result<Vec<(Item, Vec<u8>)>, ReadError> {
        let mut reader = FrameReader::new(Vec::new(), 4096, 1 << 20, inflater);
        let mut items = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for mut source in bytes.chunks(step) {
            // A reader may take less than a chunk (the rest of a large frame): read until used up.
            while !source.is_empty() {
                match reader.poll_read_from(&mut source, &mut cx) {
                    Poll::Ready(Ok(_)) => {}
                    other => panic!("a slice reads at once: {other:?}"),
                }
                while let Some(item) = reader.next_item()? {
                    let payload = match &item {
                        Item::Message { .. } | Item::Ping => reader.payload().to_vec(),
                        _ => Vec::new(),
                    };
                    items.push((item, payload));
                }
            }
        }
        Ok(items)
    }

    /// 16 KiB messages back to back, read 64 KiB at a time: every read brings the last bytes of
    /// a large frame with the frames that follow (no read of a few bytes alone), and every
    /// message comes whole.
    #[test]
    fn the_last_bytes_of_a_large_frame_come_with_what_follows() {
        let messages: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 16 << 10]).collect();
        let wire: Vec<u8> = messages.iter().flat_map(|m| frame(0x82, m)).collect();
        let mut reader = FrameReader::new(Vec::new(), 64 << 10, 1 << 20, None);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let (mut source, mut reads, mut got) = (&wire[..], Vec::new(), Vec::new());
        while !source.is_empty() {
            let before = source.len();
            assert!(matches!(reader.poll_read_from(&mut source, &mut cx), Poll::Ready(Ok(_))));
            reads.push(before - source.len());
            while let Some(item) = reader.next_item().unwrap() {
                got.push(match item {
                    Item::Message { .. } => reader.payload().to_vec(),
                    Item::OwnedMessage { data, .. } => data,
                    other => panic!("{other:?}"),
                });
            }
        }
        assert!(got == messages, "{} messages", got.len());
        // Full reads, but the stream's last 64 bytes.
        assert!(reads[..reads.len() - 1].iter().all(|&n| n == 64 << 10), "reads of {reads:?} bytes");
    }

    fn inflater() -> Option<Inflater> {
        Some(Inflater::new(&crate::deflate::Agreed::for_tests()))
    }

    /// "Hello" compressed, without its tail (RFC 7692 7.2.3.1).
    const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

    #[test]
    fn compressed_messages_whole_or_fragmented_with_control_frames_between() {
        let mut wire = frame(0xC1, &HELLO);
        // RFC 7692 7.2.3.1's fragmented example, a ping between the fragments.
        wire.extend(frame(0x41, &HELLO[..3]));
        wire.extend(frame(0x89, b"p"));
        wire.extend(frame(0x80, &HELLO[3..]));
        wire.extend(frame(0xC2, &[0x00])); // an empty compressed message
        wire.extend(frame(0x81, b"plain")); // uncompressed, between compressed ones
        for step in [1, 3, wire.len()] {
            let items = read_all_with(&wire, step, inflater()).unwrap();
            let expected = vec![
                (Item::OwnedMessage { text: true, data: b"Hello\0".to_vec() }, vec![]),
                (Item::Ping, b"p".to_vec()),
                (Item::OwnedMessage { text: true, data: b"Hello\0".to_vec() }, vec![]),
                (Item::OwnedMessage { text: false, data: vec![] }, vec![]),
                (Item::Message { text: true }, b"plain".to_vec()),
            ];
            assert_eq!(items, expected, "step {step}");
        }
    }

    #[test]
    fn rsv1_is_refused_where_rfc_7692_forbids_it() {
        for (wire, expected) in [
            (frame(0xC9, b""), "RSV1 set on a control frame"),
            (frame(0xC8, &[3, 232]), "RSV1 set on a control frame"),
            ([frame(0x41, &HELLO[..3]), frame(0xC0, &HELLO[3..])].concat(), "RSV1 set on a continuation frame"),
            ([frame(0x01, b"a"), frame(0xC0, b"b")].concat(), "RSV1 set on a continuation frame"),
        ] {
            assert_eq!(read_all_with(&wire, wire.len(), inflater()).unwrap_err(), ReadError::Protocol(expected));
        }
        let corrupt = read_all_with(&frame(0xC1, &[0xff, 0xff, 0xff]), 100, inflater()).unwrap_err();
        assert!(matches!(corrupt, ReadError::Corrupt(_)), "{corrupt:?}");
        // Inflates to invalid UTF-8 (0xff).
        let bad_text = read_all_with(&frame(0xC1, &[0xfb, 0x0f, 0x00]), 100, inflater()).unwrap_err();
        assert_eq!(bad_text, ReadError::InvalidUtf8);
    }

    #[test]
    fn messages_come_out_whole_however_the_bytes_are_cut() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = frame(0x81, "héllo".as_bytes());
        wire.extend(frame(0x82, &[1, 2, 3]));
        wire.extend(frame(0x02, b"frag")); // binary, not final
        wire.extend(frame(0x89, b"ping between fragments"));
        wire.extend(frame(0x80, b"mented")); // final continuation
        wire.extend(frame(0x82, &big)); // 64-bit length, read into its own allocation
        wire.extend(frame(0x82, &big[..300])); // 16-bit length
        wire.extend(frame(0x88, &[0x03, 0xE8, b'b', b'y', b'e']));
        for step in [1, 2, 3, 7, 100, 4096, wire.len()] {
            let items = read_all(&wire, step).unwrap();
            let expected = vec![
                (Item::Message { text: true }, "héllo".as_bytes().to_vec()),
                (Item::Message { text: false }, vec![1, 2, 3]),
                (Item::Ping, b"ping between fragments".to_vec()),
                (Item::OwnedMessage { text: false, data: b"fragmented".to_vec() }, vec![]),
                (Item::OwnedMessage { text: false, data: big.clone() }, vec![]),
                (Item::Message { text: false }, big[..300].to_vec()),
                (Item::Close(Some((1000, "bye".into()))), vec![]),
            ];
            assert!(items == expected, "cut every {step} bytes: {:?}", items.iter().map(|i| &i.0).collect::<Vec<_>>());
        }
    }

    #[test]
    fn protocol_violations_are_refused() {
        let cases: Vec<(Vec<u8>, ReadError)> = vec![
            (frame(0x83, b"x"), ReadError::Protocol("reserved opcode")),
            (frame(0xC1, b"x"), ReadError::Protocol("RSV1 set in a frame header, and no extension was negotiated")),
            (frame(0xA1, b"x"), ReadError::Protocol("reserved bits set in a frame header")),
            (frame(0x91, b"x"), ReadError::Protocol("reserved bits set in a frame header")),
            (vec![0x81, 0x81, 1, 2, 3, 4, b'x'], ReadError::Protocol("masked frame from the server")),
            (frame(0x09, b"x"), ReadError::Protocol("fragmented control frame")),
            (frame(0x89, &[0; 126]), ReadError::Protocol("control frame longer than 125 bytes")),
            (frame(0x80, b"x"), ReadError::Protocol("continuation frame without a message to continue")),
            (
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                ReadError::Protocol("new data frame before the fragmented message ended"),
            ),
            (frame(0x88, &[3]), ReadError::Protocol("close frame with a one-byte payload")),
            (frame(0x88, &[0x03, 0xED]), ReadError::Protocol("invalid close code")),
            (frame(0x88, &[0x03, 0xE8, 0xFF]), ReadError::InvalidUtf8),
            (frame(0x81, &[b'a', 0xC3]), ReadError::InvalidUtf8),
            ([frame(0x01, &[0xE2, 0x82]), frame(0x80, &[0x28])].concat(), ReadError::InvalidUtf8),
            (
                vec![0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0],
                ReadError::Protocol("frame length with the most significant bit set"),
            ),
            (vec![0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 0], ReadError::TooBig { size: 1 << 28, max: 1 << 20 }),
            (
                [frame(0x02, &[0; 700_000]), frame(0x80, &[0; 400_000])].concat(),
                ReadError::TooBig { size: 1_100_000, max: 1 << 20 },
            ),
        ];
        for (wire, expected) in cases {
            assert_eq!(read_all(&wire, wire.len()).unwrap_err(), expected, "{:02x?}", &wire[..wire.len().min(12)]);
        }
    }

    /// Found by the fuzzer: every fragment doubled the message's allocation, needed or not,
    /// so 31 one-byte fragments asked for 2 GiB (with no maximum message size).
    #[test]
    fn many_small_fragments_grow_the_message_as_much_as_their_bytes() {
        let mut reader = FrameReader::new(Vec::new(), 4096, usize::MAX, None);
        let mut wire = frame(0x02, &[0; 20_000]);
        for _ in 0..40 {
            wire.extend(frame(0x00, b"x"));
        }
        wire.extend(frame(0x80, b"end"));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut source = &wire[..];
        let mut data = None;
        while data.is_none() {
            assert!(reader.poll_read_from(&mut source, &mut cx).is_ready());
            if let Some(Item::OwnedMessage { data: d, .. }) = reader.next_item().unwrap() {
                data = Some(d);
            }
        }
        let data = data.unwrap();
        assert_eq!(data.len(), 20_043);
        assert!(data.capacity() < 2 * 20_043, "capacity {}", data.capacity());
    }

    #[test]
    fn text_split_inside_a_character_across_fragments_is_valid() {
        let euro = "€".as_bytes();
        let wire = [frame(0x01, &euro[..1]), frame(0x80, &euro[1..])].concat();
        let items = read_all(&wire, 1).unwrap();
        assert_eq!(items, vec![(Item::OwnedMessage { text: true, data: [euro, b"\0"].concat() }, vec![])]);
    }

    #[test]
    fn random_valid_streams_read_the_same_however_they_are_cut() {
        let mut rng = Rng(0x5EED_0001);
        for round in 0..300 {
            let mut wire = Vec::new();
            for _ in 0..rng.below(12) + 1 {
                let len = match rng.below(4) {
                    0 => rng.below(126),
                    1 => 126 + rng.below(2000),
                    2 => rng.below(40_000),
                    _ => 0,
                } as usize;
                let payload: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                match rng.below(4) {
                    0 => wire.extend(frame(0x82, &payload)),
                    1 => wire.extend(frame(0x89, &payload[..len.min(125)])),
                    2 => wire.extend(frame(0x81, "x€y".repeat(len / 5 + 1).as_bytes())),
                    _ => {
                        let cut = len / 2;
                        wire.extend(frame(0x02, &payload[..cut]));
                        wire.extend(frame(0x8A, b"pong"));
                        wire.extend(frame(0x80, &payload[cut..]));
                    }
                }
            }
            let whole = read_all(&wire, wire.len()).unwrap();
            for _ in 0..3 {
                let step = rng.below(3000) as usize + 1;
                assert!(read_all(&wire, step).unwrap() == whole, "round {round}, cut every {step} bytes");
            }
        }
    }

    /// What a stream reads as, whoever reads it: messages as (text, payload), the other items as
    /// they are.
    fn normalized(items: Vec<(Item, Vec<u8>)>) -> Vec<(Item, Vec<u8>)> {
        items
            .into_iter()
            .map(|(item, payload)| match item {
                Item::OwnedMessage { text, mut data } => {
                    if text {
                        assert_eq!(data.pop(), Some(0), "text ends with a NUL");
                    }
                    (Item::Message { text }, data)
                }
                other => (other, payload),
            })
            .collect()
    }

    /// Feeds `bytes` `step` at a time to a reader that the host's thread and the I/O task take
    /// turns at, as `crate::host::reading` does: the host takes it over only between frames,
    /// reads what `next_on_host` takes and gives it back at the first thing it does not take.
    fn read_taking_turns(bytes: &[u8], step: usize, rng: &mut Rng) -> Result<Vec<(Item, Vec<u8>)>, ReadError> {
        let mut reader = FrameReader::new(Vec::new(), 4096, 1 << 20, None);
        let (mut items, mut source, mut host) = (Vec::new(), bytes, false);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if !host && reader.between_frames() && rng.below(2) == 0 {
                host = true;
            }
            if host {
                match reader.next_on_host(16 << 10) {
                    OnHost::Message { text } => {
                        items.push((Item::Message { text }, reader.payload().to_vec()));
                        continue;
                    }
                    OnHost::Other => {
                        host = false;
                        continue;
                    }
                    OnHost::NeedBytes => {}
                }
            } else if let Some(item) = reader.next_item()? {
                let payload = match &item {
                    Item::Message { .. } | Item::Ping => reader.payload().to_vec(),
                    _ => Vec::new(),
                };
                items.push((item, payload));
                continue;
            }
            if source.is_empty() {
                return Ok(items);
            }
            let mut chunk = &source[..step.min(source.len())];
            let before = chunk.len();
            let read = if host {
                reader.poll_read_on_host(&mut chunk, &mut cx)
            } else {
                reader.poll_read_from(&mut chunk, &mut cx)
            };
            assert!(matches!(read, Poll::Ready(Ok(_))), "a slice reads at once: {read:?}");
            source = &source[before - chunk.len()..];
        }
    }

    /// The host's thread and the I/O task taking turns read every stream as the task alone
    /// does, valid or not: the same messages, control frames and refusal, in the same order.
    #[test]
    fn streams_read_the_same_when_the_host_and_the_task_take_turns() {
        let mut rng = Rng(0x5EED_0003);
        for round in 0..400 {
            let mut wire = Vec::new();
            for _ in 0..rng.below(16) + 1 {
                let len = match rng.below(4) {
                    0 => rng.below(126),
                    1 => (16 << 10) - 2 + rng.below(5),
                    2 => rng.below(40_000),
                    _ => 0,
                } as usize;
                let payload: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                match rng.below(6) {
                    0 | 1 => wire.extend(frame(0x82, &payload)),
                    2 => wire.extend(frame(0x89, &payload[..len.min(125)])),
                    3 => wire.extend(frame(0x81, "x€y".repeat(len / 5 + 1).as_bytes())),
                    4 => {
                        let cut = len / 2;
                        wire.extend(frame(0x02, &payload[..cut]));
                        wire.extend(frame(0x8A, b"pong"));
                        wire.extend(frame(0x80, &payload[cut..]));
                    }
                    // Bytes that break the protocol (a reserved opcode, invalid UTF-8, RSV1).
                    _ => wire.extend(frame([0x83, 0x81, 0xC2][rng.below(3) as usize], &[0xFF, 0xFE])),
                }
            }
            let alone = read_all(&wire, wire.len()).map(normalized);
            for _ in 0..3 {
                let step = rng.below(5000) as usize + 1;
                let turns = read_taking_turns(&wire, step, &mut rng).map(normalized);
                match (&alone, &turns) {
                    (Ok(a), Ok(t)) => assert!(a == t, "round {round}, cut every {step} bytes"),
                    (Err(a), Err(t)) => assert_eq!(a, t, "round {round}, cut every {step} bytes"),
                    _ => panic!(
                        "round {round}, cut every {step}: alone {:?}, taking turns {:?}",
                        alone.is_ok(),
                        turns.is_ok()
                    ),
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x5EED_0002);
        for _ in 0..3000 {
            let len = rng.below(300) as usize;
            let mut wire: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            if let Some(first) = wire.first_mut() {
                // Mostly plausible first bytes, so that parsing gets past the first check.
                *first &= if rng.below(2) == 0 { 0x8F } else { 0xFF };
            }
            let step = rng.below(20) as usize + 1;
            // Either items or a refusal: any outcome but a panic is fine.
            let _ = read_all(&wire, step);
        }
    }

    #[test]
    fn an_idle_reader_holds_no_buffer() {
        let mut reader = FrameReader::new(frame(0x82, b"abc"), 65536, 1 << 20, None);
        assert_eq!(reader.next_item().unwrap(), Some(Item::Message { text: false }));
        assert_eq!(reader.next_item().unwrap(), None);
        reader.release_if_drained();
        assert_eq!(reader.buf.capacity(), 0);
        // Half a frame is kept.
        let mut reader = FrameReader::new(frame(0x82, b"abc")[..3].to_vec(), 65536, 1 << 20, None);
        assert_eq!(reader.next_item().unwrap(), None);
        reader.release_if_drained();
        assert_eq!(reader.buf.len(), 3);
    }
}
