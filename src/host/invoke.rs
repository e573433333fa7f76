//! When a callback registration (or turning flow control on) made on another thread is in
//! force: for every callback of the connection that starts after the call returned. The call
//! waits while the dispatching thread runs a callback of that connection; the dispatching
//! thread, between two callbacks, lets waiting calls in first. So a host may replace a callback
//! and then free the old one's `user`, or turn flow control on and know that at most one more
//! message callback starts before the hold.
//!
//! The dispatching thread marks a whole batch of callbacks with two atomic operations and
//! checks for waiting calls with one load per callback: a flood of small messages pays almost
//! nothing for it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use crate::host::dispatch;
use crate::sync::lock;

/// `InvokeLock::state`: the dispatching thread is running this connection's callbacks.
const CALLING: usize = 1;
/// `InvokeLock::state`, counted above `CALLING`: calls from other threads that wait.
const WAITING_CALL: usize = 2;

#[derive(Default)]
pub(crate) struct InvokeLock {
    state: AtomicUsize,
    /// The thread running the callbacks (a `thread_token`), 0 when none.
    holder: AtomicU64,
    lock: Mutex<()>,
    changed: Condvar,
}

impl InvokeLock {
    /// Marks this thread as running the connection's callbacks until the guard is dropped.
    pub(crate) fn calling(&self) -> Calling<'_> {
        self.acquire();
        Calling { lock: self }
    }

    fn acquire(&self) {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state < WAITING_CALL {
                if self.state.compare_exchange(state, state | CALLING, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    break;
                }
                continue;
            }
            // Calls from other threads wait: they go first.
            let mut guard = lock(&self.lock);
            while self.state.load(Ordering::Acquire) >= WAITING_CALL {
                guard = self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
        self.holder.store(thread_token(), Ordering::Relaxed);
    }

    fn release(&self) {
        self.holder.store(0, Ordering::Relaxed);
        let before = self.state.fetch_and(!CALLING, Ordering::Release);
        if before >= WAITING_CALL {
            let _guard = lock(&self.lock);
            self.changed.notify_all();
        }
    }

    /// Runs `change` (a registration, turning flow control on) so that it is in force for every
    /// callback that starts after it returns: from another thread, after the callback running
    /// now (if any) has returned. Inside a callback of this connection it needs no wait, and
    /// inside any other callback it does not wait either: two event loops registering on each
    /// other's connections from their callbacks would wait for each other forever.
    pub(crate) fn register<R>(&self, change: impl FnOnce() -> R) -> R {
        if self.holder.load(Ordering::Relaxed) == thread_token() || dispatch::in_callback() {
            return change();
        }
        self.state.fetch_add(WAITING_CALL, Ordering::AcqRel);
        let mut guard = lock(&self.lock);
        while self.state.load(Ordering::Acquire) & CALLING != 0 {
            guard = self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        // Counted out and announced even if `change` panics, so that dispatch never waits for
        // a call that is gone; dropped before `guard`, so the announcement is made under the
        // lock (a dispatching thread checks and waits under it: it cannot miss it).
        let _done = CallDone(self);
        change()
    }
}

/// The end of a waiting call: no longer counted, and the dispatching thread may go on.
struct CallDone<'a>(&'a InvokeLock);

impl Drop for CallDone<'_> {
    fn drop(&mut self) {
        self.0.state.fetch_sub(WAITING_CALL, Ordering::AcqRel);
        self.0.changed.notify_all();
    }
}

/// A batch of one connection's callbacks running on this thread.
pub(crate) struct Calling<'a> {
    lock: &'a InvokeLock,
}

impl Calling<'_> {
    /// Between two callbacks: lets calls from other threads that wait go first. Returns
    /// whether any did (the caller then looks again at what they may have changed).
    pub(crate) fn between_callbacks(&mut self) -> bool {
        if self.lock.state.load(Ordering::Relaxed) < WAITING_CALL {
            return false;
        }
        self.lock.release();
        self.lock.acquire();
        true
    }
}

impl Drop for Calling<'_> {
    fn drop(&mut self) {
        self.lock.release();
    }
}

/// A number naming the calling thread, never 0.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|t| *t)
}
