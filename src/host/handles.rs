//! The process-wide table that turns a `ws_conn` integer into a live connection.
//!
//! A handle is `(generation << 32) | (slot index + 1)`. A slot's generation changes each time
//! it is freed, so a stale handle never finds a newer connection that reuses the slot; a slot
//! whose generation would pass `MAX_GENERATION` is retired for good (16 bytes, after 2^21 - 1
//! connections through it), so a handle value is never reused. Generations stop at 21 bits so
//! that every handle is below 2^53 and a binding can keep it in a JavaScript number (a double)
//! exactly. The table is global rather than per client so that
//! a call with a gone handle is answered safely even after its client has been freed.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::conn::Conn;

/// The C type of a connection handle. 0 is never a valid handle, and a value is never reused.
/// Every handle is below 2^53, so a binding may keep it in a JavaScript number (a double)
/// exactly; it needs more than 32 bits.
pub type WsConn = u64;

/// The last generation a slot gets: handles then stay below 2^53 (see the module's comment).
const MAX_GENERATION: u32 = (1 << 21) - 1;

struct Slot {
    generation: u32,
    conn: Option<Arc<Conn>>,
}

struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: RwLock<Table> = RwLock::new(Table::new());

impl Table {
    const fn new() -> Table {
        Table { slots: Vec::new(), free: Vec::new() }
    }

    fn insert(&mut self, make: impl FnOnce(WsConn) -> Arc<Conn>) -> Arc<Conn> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot { generation: 1, conn: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        let handle = ((slot.generation as u64) << 32) | (index as u64 + 1);
        let conn = make(handle);
        slot.conn = Some(conn.clone());
        conn
    }

    fn lookup(&self, handle: WsConn) -> Option<Arc<Conn>> {
        let (index, generation) = split(handle)?;
        let slot = self.slots.get(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.conn.clone()
    }

    fn remove(&mut self, handle: WsConn) -> Option<Arc<Conn>> {
        let (index, generation) = split(handle)?;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation || slot.conn.is_none() {
            return None;
        }
        let conn = slot.conn.take();
        // Once every handle value this slot can make has been used, it is retired (not freed).
        if slot.generation < MAX_GENERATION {
            slot.generation += 1;
            self.free.push(index as u32);
        }
        conn
    }
}

fn read() -> RwLockReadGuard<'static, Table> {
    TABLE.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Table> {
    TABLE.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn split(handle: WsConn) -> Option<(usize, u32)> {
    let low = (handle & 0xffff_ffff) as u32;
    let index = low.checked_sub(1)? as usize;
    Some((index, (handle >> 32) as u32))
}

/// Puts a new connection into the table; `make` receives the handle it will be known by.
pub fn insert(make: impl FnOnce(WsConn) -> Arc<Conn>) -> Arc<Conn> {
    write().insert(make)
}

/// The live connection behind `handle`, if it is not gone.
pub fn lookup(handle: WsConn) -> Option<Arc<Conn>> {
    read().lookup(handle)
}

/// Removes `handle` from the table: from now on it is gone. Returns the connection it named.
pub fn remove(handle: WsConn) -> Option<Arc<Conn>> {
    write().remove(handle)
}

/// Removes every connection for which `belongs` is true, returning them.
pub fn remove_all(belongs: impl Fn(&Conn) -> bool) -> Vec<Arc<Conn>> {
    let handles: Vec<WsConn> = {
        let table = read();
        table.slots.iter().filter_map(|s| s.conn.as_ref()).filter(|c| belongs(c)).map(|c| c.id).collect()
    };
    handles.into_iter().filter_map(remove).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::dispatch::Hub;

    fn conn(hub: &Arc<Hub>) -> impl FnOnce(WsConn) -> Arc<Conn> + '_ {
        move |id| Arc::new(Conn::new(id, hub.clone(), 1, 1))
    }

    #[test]
    fn a_stale_handle_never_names_a_newer_connection() {
        let hub = Arc::new(Hub::new().unwrap());
        let mut table = Table::new();
        let first = table.insert(conn(&hub)).id;
        assert!(table.remove(first).is_some());
        let second = table.insert(conn(&hub)).id;
        assert_ne!(first, second, "the slot is reused with a new generation");
        assert!(table.lookup(first).is_none());
        assert!(table.remove(first).is_none());
        assert_eq!(table.lookup(second).map(|c| c.id), Some(second));
        assert!(table.lookup(0).is_none(), "0 is never a handle");
    }

    #[test]
    fn a_slot_is_retired_after_its_last_generation_and_handles_stay_below_2_pow_53() {
        let hub = Arc::new(Hub::new().unwrap());
        let mut table = Table::new();
        // A free slot that 2^21 - 2 connections have gone through already, at the highest index
        // a handle can name.
        table.slots.resize_with(2, || Slot { generation: 1, conn: None });
        table.slots[1].generation = MAX_GENERATION;
        table.free.push(1);
        let last = table.insert(conn(&hub)).id;
        assert_eq!(last, (u64::from(MAX_GENERATION) << 32) | 2);
        assert!(last < 1 << 53, "the largest handle fits a double's 53-bit mantissa");
        assert_eq!(((u64::from(MAX_GENERATION) << 32) | u64::from(u32::MAX)), (1 << 53) - 1);
        assert!(table.remove(last).is_some());
        let next = table.insert(conn(&hub)).id;
        assert_eq!(next, (1 << 32) | 3, "the retired slot is not reused: a new one is made");
        assert!(table.lookup(last).is_none());
        assert!(table.remove(last).is_none());
        assert_eq!(table.slots[1].generation, MAX_GENERATION, "retired, not wrapped to a generation already used");
    }
}
