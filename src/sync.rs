//! Locking that a panic does not poison.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex` whether or not a panic poisoned it. The library catches its panics (at the C
/// boundary, around each connection's task) and carries on; a lock left poisoned would make
/// every later use of what it guards fail as well.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
