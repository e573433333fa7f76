//! permessage-deflate streams as a server makes them, for the tests that play the server.

use flate2::{Compress, Compression, FlushCompress};

pub const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
pub const PMD: &str = "permessage-deflate";

/// One message's payload from a continuing stream: sync-flushed, the tail removed.
pub fn deflate_msg(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1024);
    let start = c.total_in();
    loop {
        let at = (c.total_in() - start) as usize;
        c.compress_vec(&data[at..], &mut out, FlushCompress::Sync).unwrap();
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.len().max(1024));
    }
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - 4);
    out
}

/// A whole message compressed on its own (a fresh raw deflate stream, no context).
pub fn deflate_alone(data: &[u8]) -> Vec<u8> {
    deflate_msg(&mut Compress::new(Compression::best(), false), data)
}

/// Bytes that do not compress (a xorshift stream).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
