//! The frames we send (RFC 6455 5.2): a header, a fresh random masking key, the masked payload.

/// Opcodes of the frames we send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opcode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// RSV1 in a frame's first byte: the message is compressed (permessage-deflate, RFC 7692 6).
pub(crate) const RSV1: u8 = 0x40;

/// The longest header: 2 bytes, an 8-byte length, the 4-byte masking key.
pub(crate) const MAX_HEADER: usize = 14;

/// A fresh masking key. RFC 6455 5.3 wants it unpredictable: rand's thread-local generator is a
/// CSPRNG (ChaCha) seeded from the operating system, and costs no system call per frame.
pub(crate) fn masking_key() -> [u8; 4] {
    rand::random()
}

/// Appends the header of a final frame of `len` payload bytes, masked with `key`.
pub(crate) fn put_header(out: &mut Vec<u8>, opcode: Opcode, len: usize, key: [u8; 4]) {
    out.push(0x80 | opcode as u8);
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
}

/// Appends a whole frame: its header, then `payload` masked.
pub(crate) fn put_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    let key = masking_key();
    out.reserve(MAX_HEADER + payload.len());
    put_header(out, opcode, payload.len(), key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key);
}

/// XORs `data` with the masking key, repeated (the payload starts at key byte 0). Written
/// over 64-byte blocks against the key repeated so that the compiler turns it into vector
/// instructions (measured: 1.4 µs per 16 KiB, against 1.7 for 8 bytes at a time).
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let mut pattern = [0u8; 64];
    for (i, p) in pattern.iter_mut().enumerate() {
        *p = key[i & 3];
    }
    let mut blocks = data.chunks_exact_mut(64);
    for block in &mut blocks {
        for (byte, p) in block.iter_mut().zip(pattern) {
            *byte ^= p;
        }
    }
    // The rest starts at a multiple of 64, so at key byte 0.
    for (byte, p) in blocks.into_remainder().iter_mut().zip(pattern) {
        *byte ^= p;
    }
}

/// The payload of a close frame: the code, then the reason.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a client frame back: (first byte, payload unmasked, frame length).
    fn unframe(bytes: &[u8]) -> (u8, Vec<u8>, usize) {
        assert_eq!(bytes[1] & 0x80, 0x80, "client frames are masked");
        let (len, at) = match bytes[1] & 0x7F {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize, 10),
            n => (n as usize, 2),
        };
        let key: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        let mut payload = bytes[at + 4..at + 4 + len].to_vec();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
        (bytes[0], payload, at + 4 + len)
    }

    #[test]
    fn frames_of_every_length_class_read_back() {
        for len in [0, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut out = Vec::new();
            put_frame(&mut out, Opcode::Binary, &payload);
            let (first, back, used) = unframe(&out);
            assert_eq!((first, used), (0x82, out.len()), "length {len}");
            assert_eq!(back, payload, "length {len}");
        }
    }

    #[test]
    fn masking_matches_the_byte_by_byte_definition_at_every_length() {
        let key = [0x6d, 0xb6, 0xb2, 0x80];
        for len in 0..200 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }

    #[test]
    fn keys_differ() {
        let keys: std::collections::HashSet<[u8; 4]> = (0..1000).map(|_| masking_key()).collect();
        assert!(keys.len() > 990, "masking keys repeat: {} distinct of 1000", keys.len());
    }

    #[test]
    fn a_close_frame_carries_code_and_reason() {
        let mut out = Vec::new();
        put_frame(&mut out, Opcode::Close, &close_payload(1000, "bye"));
        let (first, payload, _) = unframe(&out);
        assert_eq!((first, payload), (0x88, b"\x03\xe8bye".to_vec()));
    }
}
