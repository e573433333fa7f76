//! The process-wide table that turns a `ws_conn` integer into a live connection.
//!
//! A handle is `(generation << 32) | (slot index + 1)`. A slot's generation changes each time
//! it is freed, so a stale handle never finds a newer connection that reuses the slot. The table
//! is global rather than per client so that a call with a gone handle is answered safely even
//! after its client has been freed.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::conn::Conn;

/// The C type of a connection handle. 0 is never a valid handle.
pub type WsConn = u64;

struct Slot {
    generation: u32,
    conn: Option<Arc<Conn>>,
}

struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: RwLock<Table> = RwLock::new(Table {
    slots: Vec::new(),
    free: Vec::new(),
});

fn read() -> RwLockReadGuard<'static, Table> {
    TABLE
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Table> {
    TABLE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn split(handle: WsConn) -> Option<(usize, u32)> {
    let low = (handle & 0xffff_ffff) as u32;
    let index = low.checked_sub(1)? as usize;
    Some((index, (handle >> 32) as u32))
}

/// Puts a new connection into the table; `make` receives the handle it will be known by.
pub fn insert(make: impl FnOnce(WsConn) -> Arc<Conn>) -> Arc<Conn> {
    let mut table = write();
    let index = match table.free.pop() {
        Some(index) => index,
        None => {
            table.slots.push(Slot {
                generation: 1,
                conn: None,
            });
            (table.slots.len() - 1) as u32
        }
    };
    let slot = &mut table.slots[index as usize];
    let handle = ((slot.generation as u64) << 32) | (index as u64 + 1);
    let conn = make(handle);
    slot.conn = Some(conn.clone());
    conn
}

/// The live connection behind `handle`, if it is not gone.
pub fn lookup(handle: WsConn) -> Option<Arc<Conn>> {
    let (index, generation) = split(handle)?;
    let table = read();
    let slot = table.slots.get(index)?;
    if slot.generation != generation {
        return None;
    }
    slot.conn.clone()
}

/// Removes `handle` from the table: from now on it is gone. Returns the connection it named.
pub fn remove(handle: WsConn) -> Option<Arc<Conn>> {
    let (index, generation) = split(handle)?;
    let mut table = write();
    let slot = table.slots.get_mut(index)?;
    if slot.generation != generation || slot.conn.is_none() {
        return None;
    }
    let conn = slot.conn.take();
    // Generation 0 is skipped so that no handle is ever 0.
    slot.generation = slot.generation.wrapping_add(1).max(1);
    table.free.push(index as u32);
    conn
}

/// Removes every connection for which `belongs` is true, returning them.
pub fn remove_all(belongs: impl Fn(&Conn) -> bool) -> Vec<Arc<Conn>> {
    let handles: Vec<WsConn> = {
        let table = read();
        table
            .slots
            .iter()
            .filter_map(|s| s.conn.as_ref())
            .filter(|c| belongs(c))
            .map(|c| c.id)
            .collect()
    };
    handles.into_iter().filter_map(remove).collect()
}
