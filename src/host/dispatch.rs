//! The hand-over from the library's I/O threads to the host's thread.
//!
//! Connections with deliverable events sit in a ready list. The wake-up descriptor (an epoll
//! instance, or a pipe: see `wakeup`) is readable whenever that list is not empty (and at most
//! once spuriously after a dispatch emptied it), so a host's poll/epoll loop (level-triggered
//! or edge-triggered) never misses a wake-up. On Linux it also holds the sockets whose reading
//! the host's thread has (`host::reading`): their data wakes the host, and the dispatch reads
//! them before it takes the ready list. `dispatch` runs callbacks on the calling thread and
//! nowhere else.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::reading::{ReadTools, Readers, HOST_SILENT};
use super::wakeup::{ReadySocket, Wakeup};
use crate::conn::{Conn, Event};
use crate::error::{Error, WsStatus};
use crate::sync::lock;

thread_local! {
    /// How many dispatch batches are running on this thread (a callback may dispatch another
    /// client), and the I/O tasks their callbacks woke meanwhile.
    static DEFER_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The hub whose batch of callbacks runs on this thread (the innermost one), 0 if none:
    /// only its connections' sends are held and its tasks' wake-ups deferred. A callback that
    /// sends on, closes or completes a connection of another client, and runs that client's
    /// loop to wait for the outcome, must not find them held until it returns.
    static BATCH_HUB: Cell<u64> = const { Cell::new(0) };
    static DEFERRED: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
    /// Connections whose sends made by callbacks are held until the batch ends.
    static CORKED: RefCell<Vec<Arc<Conn>>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    /// The hub whose dispatch is reading sockets on this thread (see `host::reading`): the
    /// connections it schedules meanwhile need no wake-up, the dispatch takes them next.
    static READING_FOR_HUB: Cell<u64> = const { Cell::new(0) };
}

/// Marks this thread as reading sockets for a hub (see `READING_FOR_HUB`) until dropped, also
/// by a panic: a mark left behind would keep that hub's wake-ups from this thread.
struct ReadingFor(());

impl ReadingFor {
    fn hub(id: u64) -> ReadingFor {
        READING_FOR_HUB.set(id);
        ReadingFor(())
    }
}

impl Drop for ReadingFor {
    fn drop(&mut self) {
        READING_FOR_HUB.set(0);
    }
}

thread_local! {
    /// On an I/O thread inside a connection task's poll: host wake-ups are held back (see
    /// `HostWakes`), and these are the hubs to wake when the poll ends.
    static HOLDING_HOST_WAKES: Cell<bool> = const { Cell::new(false) };
    static HELD_HOST_WAKES: RefCell<Vec<Arc<Hub>>> = const { RefCell::new(Vec::new()) };
}

/// Holds back the wake-ups of hosts that an I/O task's poll causes until the poll ends, so
/// that the task has done its work (and is about to wait) when the host's thread starts: with
/// both on one core, a host woken earlier preempts the task, which must then be switched back
/// in only to finish and wait.
pub(crate) struct HostWakes(());

impl HostWakes {
    pub(crate) fn hold() -> HostWakes {
        HOLDING_HOST_WAKES.set(true);
        HostWakes(())
    }

    /// Takes the wake-up of `hub`'s host if a poll holds wake-ups back on this thread.
    fn defer(hub: &Arc<Hub>) -> bool {
        if !HOLDING_HOST_WAKES.get() {
            return false;
        }
        HELD_HOST_WAKES.with_borrow_mut(|hubs| {
            if !hubs.iter().any(|h| Arc::ptr_eq(h, hub)) {
                hubs.push(hub.clone());
            }
        });
        true
    }
}

impl Drop for HostWakes {
    fn drop(&mut self) {
        HOLDING_HOST_WAKES.set(false);
        let mut hubs = HELD_HOST_WAKES.take();
        for hub in hubs.drain(..) {
            hub.wakeup.set();
        }
        // Its capacity is kept for the next poll.
        HELD_HOST_WAKES.set(hubs);
    }
}

/// Writes `conn`'s held-back sends when the dispatch batch running on this thread ends.
pub(crate) fn uncork_when_batch_ends(conn: Arc<Conn>) {
    CORKED.with_borrow_mut(|conns| conns.push(conn));
}

/// Whether this thread is running callbacks (inside a dispatch batch).
pub(crate) fn in_callback() -> bool {
    DEFER_DEPTH.get() > 0
}

/// Whether this thread is running a batch of callbacks of the client of `hub`.
pub(crate) fn in_batch_of(hub: u64) -> bool {
    BATCH_HUB.get() == hub
}

/// Wakes a connection's I/O task (of the client of `hub`), or, inside a dispatch batch of that
/// client on this thread, when the batch ends. A host answering a batch of messages with sends
/// then wakes the task once rather than once per send; each of those wake-ups is a switch
/// between threads when they share a core.
pub fn wake_task(waker: Waker, hub: u64) {
    if !in_batch_of(hub) {
        return waker.wake();
    }
    DEFERRED.with_borrow_mut(|wakers| {
        if !wakers.iter().any(|w| w.will_wake(&waker)) {
            wakers.push(waker);
        }
    });
}

/// A batch of callbacks of the client of a hub: defers its tasks' wake-ups (see `wake_task`)
/// and holds its sends for as long as it lives; releases them when dropped, also when a
/// callback panics, so no wake-up is ever lost. Nested (a callback dispatches another
/// client), the inner batch's end releases what the outer one held so far too.
pub struct DeferredWakes {
    outer_hub: u64,
}

impl DeferredWakes {
    pub fn begin(hub: u64) -> DeferredWakes {
        DEFER_DEPTH.set(DEFER_DEPTH.get() + 1);
        DeferredWakes { outer_hub: BATCH_HUB.replace(hub) }
    }
}

impl Drop for DeferredWakes {
    fn drop(&mut self) {
        DEFER_DEPTH.set(DEFER_DEPTH.get() - 1);
        BATCH_HUB.set(self.outer_hub);
        release_held();
    }
}

/// Writes the sends held back on this thread and wakes the tasks whose wake-ups were
/// deferred: at the end of a batch of callbacks, and when a callback dispatches another client.
fn release_held() {
    // The sends held back go out first (they may wake tasks too).
    let corked = CORKED.with_borrow_mut(std::mem::take);
    corked.iter().for_each(|conn| conn.uncork());
    CORKED.with_borrow_mut(|conns| {
        if conns.is_empty() {
            // Keeps its capacity for the next batch.
            *conns = corked;
            conns.clear();
        }
    });
    // Waking schedules the task on the runtime and calls no code of ours: the borrow is not
    // re-entered. The vector keeps its capacity for the next batch.
    DEFERRED.with_borrow_mut(|wakers| wakers.drain(..).for_each(Waker::wake));
}

static NEXT_HUB_ID: AtomicU64 = AtomicU64::new(1);

/// What one client's connections share with the host's thread.
pub struct Hub {
    pub id: u64,
    ready: Mutex<VecDeque<Arc<Conn>>>,
    /// Reused by every dispatch, so that dispatching allocates nothing (only the dispatching
    /// thread touches it).
    scratch: Mutex<DispatchScratch>,
    wakeup: Wakeup,
    dispatching: AtomicBool,
    /// Connections not gone yet.
    live: AtomicUsize,
    /// I/O tasks still running, and a condition signalled when one ends (for ws_client_free).
    tasks: Mutex<usize>,
    task_ended: Condvar,
    /// Connections whose reading the host's thread has (see `host::reading`).
    readers: Readers,
    /// Sockets to read again at the next dispatch (one dispatch did not take all they had).
    read_again: Mutex<Vec<u64>>,
    /// Dispatches so far, and whether the watchdog found the host silent since the last one.
    dispatches: AtomicU64,
    host_silent: AtomicBool,
    /// The watchdog task runs (see `watchdog`).
    watchdog: AtomicBool,
}

/// The queues one dispatch works with: the connections taken from the ready list (swapped
/// with it, so both keep their capacity) and the events taken for one connection's callbacks.
#[derive(Default)]
struct DispatchScratch {
    connections: VecDeque<Arc<Conn>>,
    /// How many events each of them had pending when the dispatch began.
    budgets: Vec<usize>,
    events: VecDeque<Event>,
    /// The sockets to read in this dispatch.
    sockets: Vec<ReadySocket>,
    /// What reading them takes (see `host::reading`).
    tools: ReadTools,
}

/// Clears the dispatching flag when a dispatch ends, even by a panic.
struct DispatchGuard<'a>(&'a AtomicBool);

impl Drop for DispatchGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Hub {
    pub fn new() -> io::Result<Hub> {
        Ok(Hub {
            id: NEXT_HUB_ID.fetch_add(1, Ordering::Relaxed),
            ready: Mutex::new(VecDeque::new()),
            scratch: Mutex::new(DispatchScratch::default()),
            wakeup: Wakeup::new()?,
            dispatching: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            tasks: Mutex::new(0),
            task_ended: Condvar::new(),
            readers: Readers::default(),
            read_again: Mutex::new(Vec::new()),
            dispatches: AtomicU64::new(0),
            host_silent: AtomicBool::new(false),
            watchdog: AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.wakeup.fd()
    }

    /// Puts a connection with deliverable events on the ready list.
    pub fn schedule(self: &Arc<Self>, conn: Arc<Conn>) {
        let was_empty = {
            let mut ready = lock(&self.ready);
            let was_empty = ready.is_empty();
            ready.push_back(conn);
            was_empty
        };
        // Signalled after the lock is released: a host woken at once must not find it taken.
        // A dispatch that runs in between takes the connection and the signal is then spurious
        // (one dispatch with nothing to do), never lost.
        if was_empty && READING_FOR_HUB.get() != self.id && !HostWakes::defer(self) {
            self.wakeup.set();
        }
    }

    /// Runs the callbacks pending now on the calling thread, after reading the sockets whose
    /// reading the host's thread has (see `host::reading`). Returns how many ran and whether
    /// more are pending (events that arrived meanwhile, or beyond one round's budget).
    pub fn dispatch(&self) -> Result<(u32, bool), Error> {
        let _guard = self.enter_dispatch()?;
        Ok(self.dispatch_entered())
    }

    /// `dispatch`, by a caller that holds the dispatch guard.
    fn dispatch_entered(&self) -> (u32, bool) {
        if in_callback() {
            // A loop run from a callback of another client: what that callback's batch holds
            // goes now (the loop may wait for its answer, and may run no callback of its own
            // whose batch's end would release it).
            release_held();
        }
        let mut scratch = lock(&self.scratch);
        let DispatchScratch { connections, budgets, events, sockets, tools } = &mut *scratch;
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        if self.host_silent.load(Ordering::Relaxed) {
            self.host_silent.store(false, Ordering::Relaxed);
        }
        let mut read_again = false;
        if Wakeup::HOST_READS {
            // The harvest makes the descriptor unreadable and says which sockets have data;
            // what they hold is queued before the ready list is taken, so that it is
            // dispatched now. Whatever is scheduled after the harvest sets the descriptor.
            let again =
                lock(&self.read_again).drain(..).map(|id| ReadySocket { id, beyond_data: false }).collect::<Vec<_>>();
            sockets.extend(again);
            self.wakeup.harvest(sockets);
            read_again = tools.with_spare(|tools| self.read_sockets(sockets, tools));
            std::mem::swap(&mut *lock(&self.ready), connections);
        } else {
            let mut ready = lock(&self.ready);
            self.wakeup.clear();
            std::mem::swap(&mut *ready, connections);
        }
        // What is pending now is what this dispatch runs, whatever arrives while it runs.
        budgets.clear();
        budgets.extend(connections.iter().map(|conn| conn.pending_events()));
        let ran =
            connections.drain(..).zip(budgets.drain(..)).map(|(conn, budget)| conn.dispatch(events, budget)).sum();
        (ran, read_again || !lock(&self.ready).is_empty())
    }

    /// Reads the sockets of `ready` (emptied) on this thread, for the connections whose
    /// reading the host's thread has. Returns whether some must be read again at the next
    /// dispatch; the descriptor is set for it then.
    fn read_sockets(&self, ready: &mut Vec<ReadySocket>, tools: &mut ReadTools) -> bool {
        if ready.is_empty() {
            return false;
        }
        let _reading = ReadingFor::hub(self.id);
        let mut again = Vec::new();
        for ReadySocket { id, beyond_data } in ready.drain(..) {
            if let Some(conn) = self.readers.get(id) {
                if conn.read_on_host(tools, beyond_data) && !again.contains(&id) {
                    again.push(id);
                }
            }
        }
        if again.is_empty() {
            return false;
        }
        *lock(&self.read_again) = again;
        self.wakeup.set();
        true
    }

    /// What a dispatch's harvest finds (the connections whose sockets have data), for tests.
    #[cfg(all(test, target_os = "linux", not(feature = "pipe-wake")))]
    pub(crate) fn dispatch_harvest_for_tests(self: Arc<Self>, sockets: &mut Vec<ReadySocket>) {
        sockets.clear();
        self.wakeup.harvest(sockets);
    }

    /// A connection's reading goes to the host's thread (see `host::reading`); the watchdog
    /// starts if it is not running.
    pub(crate) fn add_reader(self: &Arc<Self>, conn: &Arc<Conn>) {
        self.readers.add(conn);
        if !self.watchdog.swap(true, Ordering::AcqRel) {
            tokio::spawn(watchdog(Arc::downgrade(self)));
        }
    }

    pub(crate) fn forget_reader(&self, id: u64) {
        self.readers.remove(id);
    }

    pub(crate) fn watch_socket(&self, fd: RawFd, id: u64) -> io::Result<()> {
        self.wakeup.watch(fd, id)
    }

    pub(crate) fn unwatch_socket(&self, fd: RawFd) {
        self.wakeup.unwatch(fd);
    }

    /// Whether I/O tasks may hand their reading to the host's thread: this build can, and the
    /// host has dispatched since the watchdog last found it silent.
    pub(crate) fn host_reads(&self) -> bool {
        Wakeup::HOST_READS && !self.host_silent.load(Ordering::Relaxed)
    }

    fn enter_dispatch(&self) -> Result<DispatchGuard<'_>, Error> {
        self.dispatching
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .map(|_| DispatchGuard(&self.dispatching))
            .map_err(|_| {
                Error::new(
                    WsStatus::DispatchInProgress,
                    "a dispatch of this client is running (called from inside a callback or from another thread)",
                )
            })
    }

    /// Marks the start of ws_client_free; fails if a dispatch is running. Never undone.
    pub fn begin_shutdown(&self) -> Result<(), Error> {
        std::mem::forget(self.enter_dispatch()?);
        Ok(())
    }

    /// Waits for callbacks to be pending for at most `timeout`. Returns true if they are.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let ms = match timeout {
            None => -1,
            Some(t) => t.as_millis().min(i32::MAX as u128) as i32,
        };
        let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0
    }

    /// Dispatches until no connection is left or `timeout` has passed. It holds the dispatch
    /// guard throughout, also while it waits: a ws_client_free (or a dispatch) from another
    /// thread meanwhile is refused instead of freeing what it uses.
    pub fn run(&self, timeout: Option<Duration>) -> Result<(), Error> {
        let _guard = self.enter_dispatch()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let (_, more) = self.dispatch_entered();
            if self.live_connections() == 0 {
                return Ok(());
            }
            // The deadline holds also while events keep coming.
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if more && remaining != Some(Duration::ZERO) {
                continue;
            }
            if remaining == Some(Duration::ZERO) {
                return Err(Error::new(WsStatus::Timeout, "the time is up and connections are still alive"));
            }
            self.wait(remaining);
        }
    }

    pub fn connection_added(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    pub fn connection_gone(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    pub fn task_started(&self) {
        *lock(&self.tasks) += 1;
    }

    pub fn task_ended(&self) {
        *lock(&self.tasks) -= 1;
        self.task_ended.notify_all();
    }

    /// Waits until every I/O task has ended, or `timeout`. Returns whether they all ended.
    pub fn wait_for_tasks(&self, timeout: Duration) -> bool {
        let tasks = lock(&self.tasks);
        let (tasks, _) = self
            .task_ended
            .wait_timeout_while(tasks, timeout, |n| *n > 0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *tasks == 0
    }

    /// Drops every scheduled connection (breaks the hub -> conn -> hub reference cycle).
    pub fn clear(&self) {
        self.readers.clear();
        let drained: Vec<_> = lock(&self.ready).drain(..).collect();
        drop(drained);
        *lock(&self.scratch) = DispatchScratch::default();
        self.wakeup.clear();
    }
}

/// Watches a hub whose connections' reading the host's thread has: when the host has not
/// dispatched for `HOST_SILENT`, the I/O tasks take their reading back, so that a host busy
/// elsewhere leaves no ping unanswered and no keepalive misjudged. Ends when no connection's
/// reading is with the host (the next hand-over starts it again) or the hub is gone.
async fn watchdog(hub: std::sync::Weak<Hub>) {
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(HOST_SILENT).await;
        let Some(hub) = hub.upgrade() else { return };
        if hub.readers.is_empty() {
            hub.watchdog.store(false, Ordering::Release);
            // A hand-over between the check and the store found the watchdog running.
            if hub.readers.is_empty() || hub.watchdog.swap(true, Ordering::AcqRel) {
                return;
            }
        }
        let dispatches = hub.dispatches.load(Ordering::Relaxed);
        if dispatches != seen {
            seen = dispatches;
            continue;
        }
        hub.host_silent.store(true, Ordering::Relaxed);
        for conn in hub.readers.all() {
            conn.return_reading();
        }
    }
}
