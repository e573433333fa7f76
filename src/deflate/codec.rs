//! Compressing one message we send, inflating one message that arrived (RFC 7692 7.2).
//!
//! Each side keeps, between messages, only the context the next message may refer to: the
//! last bytes of the messages compressed so far, at most one window, and none where context
//! takeover is off. The states that do the work come from `pool`.

use flate2::{Compress, FlushCompress};
use zlib_rs::{Inflate, InflateFlush, Status};

use super::{pool, Agreed};

/// The tail every compressed message ends with, removed when sending (RFC 7692 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The context kept between messages: the last bytes of the stream, at most `window` of them.
/// Sized to what arrived (a connection that sent one short message keeps that much).
struct Context {
    window: usize,
    bytes: Vec<u8>,
}

impl Context {
    fn new(window_bits: u8) -> Context {
        Context { window: 1 << window_bits, bytes: Vec::new() }
    }

    fn append(&mut self, data: &[u8]) {
        if data.len() >= self.window {
            self.bytes.clear();
            self.bytes.extend_from_slice(&data[data.len() - self.window..]);
            return;
        }
        let keep = (self.window - data.len()).min(self.bytes.len());
        self.bytes.drain(..self.bytes.len() - keep);
        self.bytes.reserve_exact(data.len());
        self.bytes.extend_from_slice(data);
    }
}

/// Compresses the messages of one connection.
pub(crate) struct Deflater {
    owner: u64,
    /// 0: everything goes out uncompressed (the server allowed only a 256-byte window, which
    /// zlib cannot produce: see `new`).
    window_bits: u8,
    level: u8,
    threshold: usize,
    /// None without context takeover.
    context: Option<Context>,
}

impl Deflater {
    pub(crate) fn new(agreed: &Agreed) -> Deflater {
        // zlib (and zlib-rs) cannot compress with a 256-byte window: with 8 bits a compressed
        // message could refer further back than the server keeps, so messages go uncompressed.
        let window_bits = if agreed.client_window_bits < 9 { 0 } else { agreed.client_window_bits };
        Deflater {
            owner: pool::new_owner(),
            window_bits,
            level: agreed.level,
            threshold: agreed.threshold,
            context: (!agreed.client_no_context_takeover).then(|| Context::new(window_bits.max(9))),
        }
    }

    /// Whether a message of `len` bytes is to be compressed (else it may take any path).
    pub(crate) fn compresses(&self, len: usize) -> bool {
        len >= self.compress_from()
    }

    /// The size from which messages are compressed (usize::MAX: none is).
    pub(crate) fn compress_from(&self) -> usize {
        if self.window_bits == 0 {
            usize::MAX
        } else {
            self.threshold
        }
    }

    /// Compresses `payload` into `out` (cleared first), without the tail. False: send it
    /// uncompressed (below the threshold, or it would not shrink); the stream is then as if
    /// the message had not been compressed.
    pub(crate) fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if !self.compresses(payload.len()) {
            return false;
        }
        out.clear();
        let context = &mut self.context;
        let compressed = pool::with_compressor(self.owner, self.window_bits, self.level, |c, live| {
            if !live {
                if let Some(context) = context.as_ref().filter(|c| !c.bytes.is_empty()) {
                    if c.set_dictionary(&context.bytes).is_err() {
                        return (false, false);
                    }
                }
            }
            let shrank = deflate_sync(c, payload, out) && out.len() < payload.len();
            // Sent uncompressed, the message is not in the server's window: the state must not
            // be used as it is for the next one. Without context takeover it is reset anyway.
            (shrank, shrank && context.is_some())
        });
        if let (true, Some(context)) = (compressed, &mut self.context) {
            context.append(payload);
        }
        compressed
    }
}

/// Deflates `input` with a sync flush into `out`, tail removed. False if zlib failed.
fn deflate_sync(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> bool {
    out.reserve(input.len() / 2 + 64);
    let start = c.total_in();
    loop {
        let consumed = (c.total_in() - start) as usize;
        if c.compress_vec(&input[consumed..], out, FlushCompress::Sync).is_err() {
            return false;
        }
        // Done once all input is in and the flush did not stop for lack of room.
        if (c.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.len().max(64));
    }
    if !out.ends_with(&TAIL) {
        return false;
    }
    out.truncate(out.len() - TAIL.len());
    true
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// More than `max` bytes once inflated.
    TooBig { max: usize },
    /// The memory for the inflated message could not be allocated.
    OutOfMemory { size: usize },
    /// Not valid deflate data (zlib's reason).
    Corrupt(String),
}

/// Inflates the messages of one connection.
pub(crate) struct Inflater {
    owner: u64,
    /// The server's window, 9..=15 (zlib's compressor makes an 8-bit window 9 bits, so
    /// zlib-based servers that agreed to 8 use 512 bytes; every zlib inflater reads them so).
    /// Below 15 the decompressor is rebuilt from the context for every message: a live one
    /// keeps 32 KiB of history whatever the window, and would accept from a server that refers
    /// further back than it agreed to what a rebuilt one refuses (1007), depending on what
    /// other connections did in between. A rebuild costs about 1 µs.
    window_bits: u8,
    /// None without context takeover.
    context: Option<Context>,
}

impl Inflater {
    pub(crate) fn new(agreed: &Agreed) -> Inflater {
        let window_bits = agreed.server_window_bits.clamp(9, 15);
        let context = (!agreed.server_no_context_takeover).then(|| Context::new(window_bits));
        Inflater { owner: pool::new_owner(), window_bits, context }
    }

    /// Inflates one message (its payload as received, without the tail) into a new buffer of at
    /// most `max` bytes, with `spare` more bytes of capacity (for the text's NUL). The limit is
    /// checked while inflating: memory never grows past it.
    pub(crate) fn inflate(&mut self, compressed: &[u8], max: usize, spare: usize) -> Result<Vec<u8>, InflateError> {
        let context = &mut self.context;
        let reuse = self.window_bits == 15;
        let result = pool::with_decompressor(self.owner, |d, live| {
            if !live {
                if let Some(context) = context.as_ref().filter(|c| !c.bytes.is_empty()) {
                    if let Err(e) = d.set_dictionary(&context.bytes) {
                        return (Err(InflateError::Corrupt(e.as_str().to_string())), false);
                    }
                }
            }
            let mut out = Vec::new();
            let result = inflate_message(d, compressed, max, spare, &mut out).map(|ended| {
                // The output grew by doubling: a message waiting for the host must not hold
                // twice its size (the receive queue counts what it holds).
                if out.capacity() - out.len() > spare + out.len() / 16 {
                    out.shrink_to(out.len() + spare);
                }
                (out, ended)
            });
            // A stream that ended (a final block) starts again with the next message.
            let keep = reuse && context.is_some() && matches!(result, Ok((_, false)));
            (result, keep)
        });
        let (out, _) = result?;
        if let Some(context) = &mut self.context {
            context.append(&out);
        }
        Ok(out)
    }
}

/// Inflates `compressed` then the tail into `out`. Ok(true) if the deflate stream ended (a
/// block marked final) within the message.
///
/// The data must end where the tail completes an empty stored block; data that stops inside a
/// block would make the tail's bytes, then the next message's, content of that block: wrong
/// data delivered silently. flate2 hides zlib's `data_type`, which tells where inflating
/// stopped, so this inflates block by block (zlib's Z_BLOCK) with zlib-rs itself: after the
/// message's own bytes and whatever output they still owe, the tail must be taken whole, with
/// no output, stopping at a block boundary before a byte placed after it.
fn inflate_message(
    d: &mut Inflate,
    compressed: &[u8],
    max: usize,
    spare: usize,
    out: &mut Vec<u8>,
) -> Result<bool, InflateError> {
    out.clear();
    let mut output =
        Output { out, filled: 0, max, spare, compressed_len: compressed.len(), input_left: compressed.len() };
    let result = inflate_into(d, compressed, &mut output);
    let filled = output.filled;
    out.truncate(filled);
    result
}

fn inflate_into(d: &mut Inflate, compressed: &[u8], output: &mut Output<'_>) -> Result<bool, InflateError> {
    let mut consumed = 0;
    while consumed < compressed.len() {
        output.input_left = compressed.len() - consumed;
        let (taken, _, ended) = output.inflate_some(d, &compressed[consumed..])?;
        consumed += taken;
        if ended {
            // After a final block nothing of the message may follow but the header of the
            // empty stored block the tail completes (RFC 7692 7.2.1 and the example of 7.2.3.4:
            // a final block, then 0x00); ignoring more would deliver a cut message as whole.
            let left = &compressed[consumed..];
            if !matches!(left, [] | [0x00 | 0x01]) {
                return Err(InflateError::Corrupt(format!(
                    "{} bytes follow the end of the deflate stream",
                    left.len()
                )));
            }
            return Ok(true);
        }
    }
    // What the message's bytes still owe (the output filled up before all of it was written).
    output.input_left = 0;
    if output.drain(d)? {
        return Ok(true);
    }
    let inside_a_block = || InflateError::Corrupt("the deflate data ends inside a block".into());
    let (taken, produced, ended) = output.inflate_some(d, &TAIL_AND_SENTINEL)?;
    if ended || taken != TAIL.len() || produced != 0 {
        return Err(inside_a_block());
    }
    // The stored block ended; if it was marked final, the stream ends here.
    if output.drain(d)? {
        return Ok(true);
    }
    // The tail was taken whole up to a block boundary, but it may have completed something
    // else (a block header, then an end of block) and left bits over: a stored block's
    // lengths leave none. Bits left over are ones (the tail ends with 0xff), so another empty
    // stored block read after them is read as a final block, or as another type: only with no
    // bit left over is it taken whole, silently, as the block it is.
    // (Inflating block by block, a final block shows as the end only at the next call.)
    let (taken, produced, ended) = output.inflate_some(d, &EMPTY_STORED_BLOCK)?;
    if ended || taken != EMPTY_STORED_BLOCK.len() || produced != 0 || output.drain(d)? {
        return Err(inside_a_block());
    }
    Ok(false)
}

/// zlib's reason for refusing the data. zlib-rs replaces the reason for an error found while
/// inflating fast ("invalid distance too far back", for one) by the one for calling again
/// after an error, which would mislead: that call was not ours.
fn reason(message: Option<&'static str>, error: zlib_rs::InflateError) -> String {
    match message {
        Some("repeated call with bad state") | None => format!("invalid deflate data ({})", error.as_str()),
        Some(message) => message.to_string(),
    }
}

/// The tail as the receiver appends it, and one byte more: at a block boundary, inflating block
/// by block stops before that byte.
const TAIL_AND_SENTINEL: [u8; 5] = [0x00, 0x00, 0xff, 0xff, 0x00];

/// An empty stored block, not final: what a sync flush writes (and nothing to the output).
const EMPTY_STORED_BLOCK: [u8; 5] = [0x00, 0x00, 0x00, 0xff, 0xff];

/// The buffer a message inflates into, grown as it fills and never past the limit.
struct Output<'a> {
    /// Zeroed up to its capacity as it grows (inflating into initialised memory keeps this free
    /// of unsafe code, and each byte is zeroed once); `filled` bytes of it are the message.
    out: &'a mut Vec<u8>,
    filled: usize,
    max: usize,
    spare: usize,
    compressed_len: usize,
    /// The message's bytes not yet given to the inflater.
    input_left: usize,
}

impl Output<'_> {
    /// Inflates from `input` up to the next block boundary, the end of the input or of the room
    /// there is (growing it first if it is full). Returns the bytes consumed, the bytes written
    /// and whether the deflate stream ended.
    fn inflate_some(&mut self, d: &mut Inflate, input: &[u8]) -> Result<(usize, usize, bool), InflateError> {
        if self.filled == self.out.len() {
            self.grow()?;
        }
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d.decompress(input, &mut self.out[self.filled..], InflateFlush::Block);
        let (taken, produced) = ((d.total_in() - in_before) as usize, (d.total_out() - out_before) as usize);
        self.filled += produced;
        let status = status.map_err(|e| InflateError::Corrupt(reason(d.error_message(), e)))?;
        if self.filled > self.max {
            return Err(InflateError::TooBig { max: self.max });
        }
        let room_left = self.filled < self.out.len();
        if status != Status::StreamEnd && taken == 0 && produced == 0 && room_left && !input.is_empty() {
            return Err(InflateError::Corrupt("the compressed data does not progress".into()));
        }
        Ok((taken, produced, status == Status::StreamEnd))
    }

    /// Writes what the inflater holds without more input, until it has room left over. Returns
    /// whether the deflate stream ended.
    fn drain(&mut self, d: &mut Inflate) -> Result<bool, InflateError> {
        loop {
            let (_, produced, ended) = self.inflate_some(d, &[])?;
            if ended {
                return Ok(true);
            }
            if produced == 0 && self.filled < self.out.len() {
                return Ok(false);
            }
        }
    }

    /// Makes room: doubling, from about what a JSON message inflates to, never past the limit
    /// (one byte more than allowed: inflating that byte is how a message over it shows), nor
    /// past what the input left can still make: deflate makes at most 1,032 bytes of a byte, and
    /// what the inflater holds back is less than 32 KiB. Without that bound a message that
    /// fills its buffer just before its last few bytes would double it for nothing (an 8 MiB
    /// message peaked at 16 MiB).
    fn grow(&mut self) -> Result<(), InflateError> {
        let cap = self.max.saturating_add(1);
        let len = self.filled;
        if len >= cap {
            return Err(InflateError::TooBig { max: self.max });
        }
        let doubling = len.max(self.compressed_len.saturating_mul(4)).max(1024);
        let want = doubling.min(self.input_left.saturating_mul(1032).saturating_add(32 << 10));
        let additional = want.min(cap - len) + if len + want >= cap { self.spare } else { 0 };
        self.out.try_reserve_exact(additional).map_err(|_| InflateError::OutOfMemory { size: len + want })?;
        self.out.resize(self.out.capacity(), 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed() -> Agreed {
        Agreed::for_tests()
    }

    /// Our compressor's output, read back by an inflater configured the other way round.
    fn round_trip(a: Agreed, messages: &[Vec<u8>]) -> usize {
        let mut deflater = Deflater::new(&a);
        let peer = Agreed {
            server_window_bits: a.client_window_bits.max(9),
            server_no_context_takeover: a.client_no_context_takeover,
            ..a
        };
        let mut inflater = Inflater::new(&peer);
        let mut wire = 0;
        let mut out = Vec::new();
        for m in messages {
            if deflater.compress(m, &mut out) {
                wire += out.len();
                assert_eq!(&inflater.inflate(&out, 1 << 24, 1).unwrap(), m);
            } else {
                wire += m.len();
            }
        }
        wire
    }

    fn json(i: usize) -> Vec<u8> {
        format!(
            "{{\"type\":\"chat.message\",\"seq\":{i},\"user\":\"someone\",\"text\":\"hello there number {}\"}}",
            i * 7
        )
        .into_bytes()
    }

    #[test]
    fn context_takeover_shrinks_repeated_messages_and_round_trips() {
        let messages: Vec<Vec<u8>> = (0..200).map(json).collect();
        let plain: usize = messages.iter().map(Vec::len).sum();
        let with = round_trip(agreed(), &messages);
        let without = round_trip(Agreed { client_no_context_takeover: true, ..agreed() }, &messages);
        assert!(with * 3 < plain && with < without, "plain {plain}, with takeover {with}, without {without}");
        for bits in 9..=15 {
            round_trip(Agreed { client_window_bits: bits, ..agreed() }, &messages);
        }
    }

    #[test]
    fn states_taken_by_other_connections_are_rebuilt_from_the_context() {
        // Three connections interleaved over two pooled compressors: every state is rebuilt.
        let messages: Vec<Vec<u8>> = (0..30).map(json).collect();
        let mut sides: Vec<(Deflater, Inflater)> =
            (0..3).map(|_| (Deflater::new(&agreed()), Inflater::new(&agreed()))).collect();
        let mut out = Vec::new();
        for m in &messages {
            for (d, i) in &mut sides {
                assert!(d.compress(m, &mut out));
                assert_eq!(&i.inflate(&out, 1 << 20, 0).unwrap(), m);
            }
        }
    }

    #[test]
    fn small_and_incompressible_messages_go_out_uncompressed_and_the_stream_stays_right() {
        let mut d = Deflater::new(&Agreed { threshold: 10, ..agreed() });
        let mut i = Inflater::new(&agreed());
        let mut out = Vec::new();
        assert!(!d.compress(b"short", &mut out));
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(!d.compress(&noise, &mut out), "random bytes do not shrink");
        for m in (0..5).map(json) {
            assert!(d.compress(&m, &mut out));
            assert_eq!(i.inflate(&out, 1 << 20, 0).unwrap(), m);
        }
    }

    #[test]
    fn an_empty_message() {
        let mut i = Inflater::new(&agreed());
        assert_eq!(i.inflate(&[0x00], 10, 1).unwrap(), b"", "what zlib makes of an empty message");
        assert_eq!(i.inflate(&[0x00], 10, 1).unwrap(), b"");
        let mut d = Deflater::new(&agreed());
        let mut out = Vec::new();
        assert!(!d.compress(b"", &mut out), "nothing to gain");
    }

    #[test]
    fn window_8_goes_uncompressed() {
        let mut d = Deflater::new(&Agreed { client_window_bits: 8, ..agreed() });
        assert!(!d.compress(&json(1), &mut Vec::new()));
    }

    /// With the tail appended, the data must end where an empty stored block does: anything
    /// else would make the tail (and the next message) content of an unfinished block.
    #[test]
    fn data_that_ends_inside_a_block_is_an_error() {
        let mut whole = Vec::new();
        assert!(Deflater::new(&agreed()).compress(&json(1), &mut whole));
        let cut: [&[u8]; 4] = [&[], &TAIL, &whole[..whole.len() - 1], &whole[..whole.len() / 2]];
        for data in cut {
            let e = Inflater::new(&agreed()).inflate(data, 1 << 20, 0).unwrap_err();
            assert!(matches!(e, InflateError::Corrupt(_)), "{data:02x?}: {e:?}");
        }
        // A stored block the tail leaves unfinished (its length says 5, 3 bytes came).
        let e = Inflater::new(&agreed()).inflate(&[0x00, 0x05, 0x00, 0xfa, 0xff, 1, 2, 3], 100, 0).unwrap_err();
        assert!(matches!(e, InflateError::Corrupt(_)), "{e:?}");
        assert_eq!(Inflater::new(&agreed()).inflate(&whole, 1 << 20, 0).unwrap(), json(1));
    }

    /// A message may end the deflate stream with a final block (RFC 7692 7.2.3.4); the next one
    /// starts a new stream.
    #[test]
    fn a_final_block_ends_the_stream_and_the_next_message_starts_anew() {
        let mut i = Inflater::new(&agreed());
        // "Hello" in a final fixed block, then an empty final stored block whose tail was removed.
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut data = Vec::with_capacity(64);
        c.compress_vec(b"Hello", &mut data, FlushCompress::Finish).unwrap();
        assert_eq!(i.inflate(&data, 100, 0).unwrap(), b"Hello");
        assert_eq!(i.inflate(&[0x01], 100, 0).unwrap(), b"", "an empty final stored block");
        let rfc_7692_7_2_3_4 = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(i.inflate(&rfc_7692_7_2_3_4, 100, 0).unwrap(), b"Hello", "a final block, then 0x00");
        let more = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00, 0x00];
        assert!(matches!(i.inflate(&more, 100, 0), Err(InflateError::Corrupt(_))), "more after the final block");
        for _ in 0..3 {
            let mut out = Vec::new();
            assert!(Deflater::new(&agreed()).compress(&json(2), &mut out));
            assert_eq!(i.inflate(&out, 1 << 20, 0).unwrap(), json(2));
        }
    }

    /// Messages that inflate to exactly the buffer's size at some step, then end: the boundary
    /// is found with the buffer full; and exactly at the limit, or one byte over it.
    #[test]
    fn messages_that_fill_the_buffer_exactly() {
        let mut i = Inflater::new(&agreed());
        let mut d = Deflater::new(&agreed());
        for len in [1000, 1023, 1024, 1025, 4096, 32768, 32769, 100_000] {
            let m: Vec<u8> = (0..len).map(|k| (k % 251) as u8 ^ (k / 7) as u8).collect();
            let mut out = Vec::new();
            assert!(d.compress(&m, &mut out));
            assert_eq!(i.inflate(&out, 1 << 20, 0).unwrap(), m, "{len} bytes");
            let alone = || {
                let mut out = Vec::new();
                assert!(Deflater::new(&agreed()).compress(&m, &mut out));
                out
            };
            assert_eq!(Inflater::new(&agreed()).inflate(&alone(), len, 1).unwrap(), m, "{len} bytes at the limit");
            let over = Inflater::new(&agreed()).inflate(&alone(), len - 1, 1);
            assert_eq!(over, Err(InflateError::TooBig { max: len - 1 }), "{len} bytes");
        }
    }

    #[test]
    fn corrupt_data_is_an_error() {
        let mut i = Inflater::new(&agreed());
        let e = i.inflate(&[0xff, 0xff, 0xff, 0xff], 100, 0).unwrap_err();
        assert!(matches!(e, InflateError::Corrupt(_)), "{e:?}");
    }

    #[test]
    fn the_limit_applies_to_the_inflated_size() {
        let zeros = vec![0u8; 100_000];
        let mut out = Vec::new();
        assert!(Deflater::new(&agreed()).compress(&zeros, &mut out));
        assert!(out.len() < 1000);
        let mut i = Inflater::new(&agreed());
        assert_eq!(i.inflate(&out, 99_999, 0), Err(InflateError::TooBig { max: 99_999 }));
        let mut i = Inflater::new(&agreed());
        let back = i.inflate(&out, 100_000, 1).unwrap();
        assert_eq!(back.len(), 100_000);
        assert!(back.capacity() <= 100_002, "the limit, one byte to see past it, the NUL: {}", back.capacity());
    }

    #[test]
    fn the_context_keeps_the_last_window() {
        let mut c = Context::new(9);
        c.append(&[1; 300]);
        assert_eq!(c.bytes.len(), 300);
        c.append(&[2; 300]);
        assert_eq!(c.bytes.len(), 512);
        assert_eq!(&c.bytes[..212], &[1; 212][..]);
        c.append(&[3; 1000]);
        assert_eq!(c.bytes, vec![3; 512]);
    }
}
