//! The compressor and decompressor states of the I/O thread, lent out one message at a time.
//!
//! A state remembers which connection used it last: if that connection comes back and nobody
//! used the state since, it carries on where it stopped (live, nothing to rebuild). Otherwise the
//! state is reset and the connection restores its context into it (`set_dictionary`). One busy
//! connection per thread (the usual case) never rebuilds; many busy ones at once take turns.
//!
//! Measured on the benchmark corpus (1.5 KB JSON messages): rebuilding a compressor from a
//! 32 KiB context costs about 35 µs more than compressing with a live one (about 60 µs), a
//! decompressor about 1 µs. Hence a few compressors and one decompressor per thread.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{Compress, Compression};
use zlib_rs::Inflate;

/// Compressors kept per I/O thread (each about 256 KiB at window 15 once used).
const COMPRESSORS: usize = 2;

/// Who uses a state: one side (sending or receiving) of one connection. 0 is nobody.
pub(super) fn new_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct Slot<T> {
    state: T,
    /// What the state was made for (compressors: window bits and level).
    made_for: (u8, u8),
    /// The last user, if the state is where that user's last message left it; 0 otherwise.
    owner: u64,
    last_used: u64,
}

#[derive(Default)]
struct Pool {
    compressors: Vec<Slot<Compress>>,
    decompressor: Option<Slot<Inflate>>,
    clock: u64,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Runs `f` with a compressor for `window_bits` (9..=15) and `level`, and whether it is live
/// for `owner` (else it was just reset and holds no context). `f` returns its result and whether
/// the state is now where the owner's stream stands (false: it must not be taken as live later).
pub(super) fn with_compressor<R>(
    owner: u64,
    window_bits: u8,
    level: u8,
    f: impl FnOnce(&mut Compress, bool) -> (R, bool),
) -> R {
    POOL.with_borrow_mut(|pool| {
        pool.clock += 1;
        let clock = pool.clock;
        let made_for = (window_bits, level);
        let slots = &mut pool.compressors;
        let index = match slots.iter().position(|s| s.owner == owner && s.made_for == made_for) {
            Some(i) => i,
            None if slots.len() < COMPRESSORS => {
                let state = Compress::new_with_window_bits(Compression::new(level.into()), false, window_bits);
                slots.push(Slot { state, made_for, owner: 0, last_used: 0 });
                slots.len() - 1
            }
            None => {
                // The least recently used, made for the same parameters if possible.
                let i = (0..slots.len())
                    .min_by_key(|&i| (slots[i].made_for != made_for, slots[i].last_used))
                    .expect("COMPRESSORS > 0");
                if slots[i].made_for != made_for {
                    slots[i].state = Compress::new_with_window_bits(Compression::new(level.into()), false, window_bits);
                    slots[i].made_for = made_for;
                }
                slots[i].owner = 0;
                i
            }
        };
        let slot = &mut slots[index];
        let live = slot.owner == owner;
        if !live {
            slot.state.reset();
        }
        let (result, keep) = f(&mut slot.state, live);
        slot.owner = if keep { owner } else { 0 };
        slot.last_used = clock;
        result
    })
}

/// Runs `f` with the thread's decompressor and whether it is live for `owner` (else it was
/// just reset), as `with_compressor` does. zlib-rs keeps 32 KiB of history whatever window it
/// is given, so one state serves every window (see `Inflater` for smaller ones).
pub(super) fn with_decompressor<R>(owner: u64, f: impl FnOnce(&mut Inflate, bool) -> (R, bool)) -> R {
    POOL.with_borrow_mut(|pool| {
        let slot = pool.decompressor.get_or_insert_with(|| Slot {
            state: Inflate::new(false, 15),
            made_for: (15, 0),
            owner: 0,
            last_used: 0,
        });
        let live = slot.owner == owner;
        if !live {
            slot.state.reset(false);
        }
        let (result, keep) = f(&mut slot.state, live);
        slot.owner = if keep { owner } else { 0 };
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_stays_live_for_its_last_user_only() {
        let (a, b) = (new_owner(), new_owner());
        assert!(!with_compressor(a, 15, 6, |_, live| (live, true)));
        assert!(with_compressor(a, 15, 6, |_, live| (live, true)), "nobody used it since");
        // Two slots: b takes the other one, and a stays live.
        assert!(!with_compressor(b, 15, 6, |_, live| (live, true)));
        assert!(with_compressor(a, 15, 6, |_, live| (live, true)));
        // A third user takes the least recently used (b's).
        let c = new_owner();
        assert!(!with_compressor(c, 15, 6, |_, live| (live, true)));
        assert!(!with_compressor(b, 15, 6, |_, live| (live, true)), "b's state was taken");
        // Not kept: not live next time.
        with_compressor(a, 15, 6, |_, _| ((), false));
        assert!(!with_compressor(a, 15, 6, |_, live| (live, true)));
        assert!(!with_decompressor(a, |_, live| (live, true)));
        assert!(with_decompressor(a, |_, live| (live, true)));
        assert!(!with_decompressor(b, |_, live| (live, true)));
        assert!(!with_decompressor(a, |_, live| (live, true)));
    }
}
