//! Helpers for the tests (the crate's own and those in tests/, and the fuzz targets in fuzz/),
//! not part of the library's API: nothing here is exported to C.

use std::cell::Cell;

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

// --- The panic boundary --------------------------------------------------------------------------

thread_local! {
    /// Set by `panic_in_next_call`: the next exported call on this thread panics inside its
    /// boundary. Only Rust code can set it (nothing here is exported to C), and it clears itself
    /// when it fires, so it cannot fire in normal use; checking it is one thread-local read.
    static PANIC_IN_NEXT_CALL: Cell<bool> = const { Cell::new(false) };
}

/// Makes the next exported `ws_*` call on this thread panic inside its panic boundary, as an
/// internal bug would: the call must then return its documented default and ws_last_error()
/// must say that a panic was caught.
pub fn panic_in_next_call() {
    PANIC_IN_NEXT_CALL.set(true);
}

/// Whether `panic_in_next_call` is still waiting for a call to panic in (it did not fire).
pub fn panic_pending() -> bool {
    PANIC_IN_NEXT_CALL.get()
}

/// Called first inside every `ffi_boundary!`.
#[inline(always)]
pub(crate) fn panic_if_asked() {
    if PANIC_IN_NEXT_CALL.get() {
        PANIC_IN_NEXT_CALL.set(false);
        panic!("wsclient::testing::panic_in_next_call: the panic a test asked for");
    }
}

// --- Defaults ------------------------------------------------------------------------------------

/// The options plain `ws_connect` uses, as the README's tables state them.
#[derive(Debug)]
pub struct Defaults {
    pub extra_ca_certificates: usize,
    pub headers: usize,
    pub subprotocols: usize,
    pub connect_timeout_ms: u128,
    pub close_timeout_ms: u128,
    /// None: no keepalive pings.
    pub keepalive_interval_ms: Option<u128>,
    pub keepalive_timeout_ms: u128,
    pub max_message_size: usize,
    pub read_buffer_size: usize,
    pub receive_queue_limit: usize,
    pub send_queue_limit: usize,
}

/// The library's actual defaults (those of `Options::default()`, which plain `ws_connect` and
/// `ws_options_new` use).
pub fn defaults() -> Defaults {
    let o = crate::options::Options::default();
    Defaults {
        extra_ca_certificates: o.extra_ca.len(),
        headers: o.headers.len(),
        subprotocols: o.subprotocols.len(),
        connect_timeout_ms: o.connect_timeout.as_millis(),
        close_timeout_ms: o.close_timeout.as_millis(),
        keepalive_interval_ms: o.keepalive_interval.map(|d| d.as_millis()),
        keepalive_timeout_ms: o.keepalive_timeout.as_millis(),
        max_message_size: o.max_message_size,
        read_buffer_size: o.read_buffer_size,
        receive_queue_limit: o.receive_queue_limit,
        send_queue_limit: o.send_queue_limit,
    }
}
