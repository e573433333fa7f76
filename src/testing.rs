//! Helpers for the tests (the crate's own and those in tests/), not part of the library's API.

/// xorshift64*: a small deterministic generator, so that a randomized test's failure can be
/// replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max as u64 + 1) as usize;
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

// --- Counters for tests ----------------------------------------------------------------------------

/// How many sends on `conn` written on their caller's thread the socket took only in part (the
/// I/O task wrote the rest; for TLS, the rest waited encrypted in the session), if it is not
/// gone: the case the write-order tests must reach.
pub fn partial_writes(conn: crate::WsConn) -> Option<usize> {
    crate::host::handles::lookup(conn).map(|c| c.partial_writes())
}
