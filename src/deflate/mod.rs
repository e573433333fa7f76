//! permessage-deflate (RFC 7692), in three parts kept apart:
//! - `negotiate`: the offer in the upgrade request and the check of the server's answer;
//! - `codec`: compressing what we send and inflating what arrives, one message at a time;
//! - `pool`: where the compressor and decompressor states live. They are large (a zlib-style
//!   compressor at window 15 is about 256 KiB), so no connection owns one: the I/O thread keeps
//!   a few and lends them out for one message at a time. What a connection keeps between
//!   messages is only the context it must carry over (the last bytes it sent and received, at
//!   most one window each way, and only where context takeover is in force): when a borrowed
//!   state was used by another connection since, it is rebuilt from that context.

mod codec;
mod negotiate;
mod pool;

pub(crate) use codec::{Deflater, InflateError, Inflater};
pub(crate) use negotiate::{accept, offer};

/// What the host may tune (see the ws_options_set_deflate* functions); `Default` is what plain
/// ws_connect offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    pub enabled: bool,
    /// The window we compress with at most, 9..=15 (offered as `client_max_window_bits`).
    pub client_max_window_bits: u8,
    /// The window we ask the server to compress with at most, 8..=15 (15: not asked).
    pub server_max_window_bits: u8,
    pub client_no_context_takeover: bool,
    pub server_no_context_takeover: bool,
    /// zlib compression level, 1..=9.
    pub level: u8,
    /// Messages shorter than this go out uncompressed.
    pub threshold: usize,
}

pub(crate) const DEFAULT_LEVEL: u8 = 6;
pub(crate) const DEFAULT_THRESHOLD: usize = 32;

impl Default for DeflateConfig {
    fn default() -> DeflateConfig {
        DeflateConfig {
            enabled: true,
            client_max_window_bits: 15,
            server_max_window_bits: 15,
            client_no_context_takeover: false,
            server_no_context_takeover: false,
            level: DEFAULT_LEVEL,
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

/// What the handshake agreed on, for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// The window we may compress with (8..=15; 8 means we send uncompressed, see `codec`).
    pub client_window_bits: u8,
    /// The window the server compresses with (8..=15).
    pub server_window_bits: u8,
    pub client_no_context_takeover: bool,
    pub server_no_context_takeover: bool,
    pub level: u8,
    pub threshold: usize,
}

impl Agreed {
    /// Windows of 15 bits and context kept both ways, level 6, every message compressed: what
    /// the unit tests start from.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Agreed {
        Agreed {
            client_window_bits: 15,
            server_window_bits: 15,
            client_no_context_takeover: false,
            server_no_context_takeover: false,
            level: 6,
            threshold: 0,
        }
    }

    /// The parameters in force, as ws_extensions tells them.
    pub(crate) fn describe(&self) -> String {
        let mut out = format!(
            "{}; client_max_window_bits={}; server_max_window_bits={}",
            negotiate::NAME,
            self.client_window_bits,
            self.server_window_bits
        );
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz target's seeds (fuzz/corpus/deflate, written by fuzz/seeds.py) run as a unit
    /// test too, so its invariants are checked where no nightly toolchain is.
    #[test]
    fn the_fuzz_seeds_hold_the_invariants() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/deflate");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            crate::testing::fuzz_deflate(&std::fs::read(entry.unwrap().path()).unwrap());
            seen += 1;
        }
        assert!(seen >= 10, "{seen} seeds");
    }
}
