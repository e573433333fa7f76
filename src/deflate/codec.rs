//! Compressing one message we send, inflating one message that arrived (RFC 7692 7.2).
//!
//! Each side keeps, between messages, only the context the next message may refer to: the
//! last bytes of the messages compressed so far, at most one window, and none where context
//! takeover is off. The states that do the work come from `pool`.

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

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
    /// None without context takeover.
    context: Option<Context>,
}

impl Inflater {
    pub(crate) fn new(agreed: &Agreed) -> Inflater {
        let context = (!agreed.server_no_context_takeover).then(|| Context::new(agreed.server_window_bits));
        Inflater { owner: pool::new_owner(), context }
    }

    /// Inflates one message (its payload as received, without the tail) into a new buffer of at
    /// most `max` bytes, with `spare` more bytes of capacity (for the text's NUL). The limit is
    /// checked while inflating: memory never grows past it.
    pub(crate) fn inflate(&mut self, compressed: &[u8], max: usize, spare: usize) -> Result<Vec<u8>, InflateError> {
        let context = &mut self.context;
        let result = pool::with_decompressor(self.owner, |d, live| {
            if !live {
                if let Some(context) = context.as_ref().filter(|c| !c.bytes.is_empty()) {
                    if let Err(e) = d.set_dictionary(&context.bytes) {
                        return (Err(InflateError::Corrupt(e.to_string())), false);
                    }
                }
            }
            let mut out = Vec::new();
            let result = inflate_sync(d, compressed, max, spare, &mut out).map(|ended| {
                // The output grew by doubling: a message waiting for the host must not hold
                // twice its size (the receive queue counts what it holds).
                if out.capacity() - out.len() > spare + out.len() / 16 {
                    out.shrink_to(out.len() + spare);
                }
                (out, ended)
            });
            // A stream that ended (a final block) starts again with the next message.
            let keep = context.is_some() && matches!(result, Ok((_, false)));
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
fn inflate_sync(
    d: &mut Decompress,
    compressed: &[u8],
    max: usize,
    spare: usize,
    out: &mut Vec<u8>,
) -> Result<bool, InflateError> {
    // One byte more than allowed: inflating that byte is how a message over the limit shows.
    let cap = max.saturating_add(1);
    for input in [compressed, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let consumed = (d.total_in() - start) as usize;
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    return Err(InflateError::TooBig { max });
                }
                // Doubling, from about what a JSON message inflates to, never past the cap. Once
                // all the input is in (or only the tail is), what the inflater may still hold is
                // at most a window: a small step then, or a message that fills its buffer exactly
                // would double it for nothing (an 8 MiB message peaked at 16 MiB).
                let finishing = consumed == input.len() || std::ptr::eq(input, &TAIL[..]);
                let want =
                    if finishing { 32 << 10 } else { out.len().max(compressed.len().saturating_mul(4)).max(1024) };
                let additional = want.min(cap - out.len()) + if out.len() + want >= cap { spare } else { 0 };
                out.try_reserve_exact(additional).map_err(|_| InflateError::OutOfMemory { size: out.len() + want })?;
            }
            let before = out.len();
            let status = d
                .decompress_vec(&input[consumed..], out, FlushDecompress::Sync)
                .map_err(|e| InflateError::Corrupt(e.to_string()))?;
            if out.len() > max {
                return Err(InflateError::TooBig { max });
            }
            if status == Status::StreamEnd {
                // After a final block nothing of the message may follow (the tail may: it is
                // not the sender's); ignoring it would deliver a cut message as whole.
                let left = input.len() - (d.total_in() - start) as usize;
                if std::ptr::eq(input, compressed) && left > 0 {
                    return Err(InflateError::Corrupt(format!("{left} bytes follow the end of the deflate stream")));
                }
                return Ok(true);
            }
            let done = (d.total_in() - start) as usize == input.len();
            if done && out.len() < out.capacity() {
                break;
            }
            if !done && out.len() == before && (d.total_in() - start) as usize == consumed && out.len() < out.capacity()
            {
                return Err(InflateError::Corrupt("the compressed data does not progress".into()));
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed() -> Agreed {
        Agreed {
            client_window_bits: 15,
            server_window_bits: 15,
            client_no_context_takeover: false,
            server_no_context_takeover: false,
            level: 6,
            threshold: 0,
        }
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
        assert_eq!(i.inflate(&[0x00], 10, 1).unwrap(), b"");
        assert_eq!(i.inflate(&[], 10, 1).unwrap(), b"", "an empty payload (RFC 7692 7.2.3.6)");
        let mut d = Deflater::new(&agreed());
        let mut out = Vec::new();
        assert!(!d.compress(b"", &mut out), "nothing to gain");
    }

    #[test]
    fn window_8_goes_uncompressed() {
        let mut d = Deflater::new(&Agreed { client_window_bits: 8, ..agreed() });
        assert!(!d.compress(&json(1), &mut Vec::new()));
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
