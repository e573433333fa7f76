//! The wake-up descriptor behind ws_client_fd(): a level-triggered "callbacks are pending" flag
//! that the host polls. An eventfd on Linux; a pipe elsewhere (macOS and the BSDs have no
//! eventfd), and on Linux too with the `pipe-wake` feature, so that the tests exercise that path.
//!
//! `set` may be called from any thread, `clear` by the dispatching one; a `set` racing with a
//! `clear` leaves the descriptor readable (at worst one spurious wake-up), never unreadable with
//! callbacks pending.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// On Linux: an epoll instance (what the host polls) holding an eventfd (set when callbacks
/// are pending) and the sockets of the connections whose reading the host's thread has taken
/// over (see `crate::host::reading`): data arriving on them wakes the host's loop directly.
/// Every dispatch harvests it (`harvest`), which also makes it unreadable again.
#[cfg(all(target_os = "linux", not(feature = "pipe-wake")))]
pub(crate) struct Wakeup {
    epoll: OwnedFd,
    event: OwnedFd,
}

/// A socket the harvest found ready: its connection's id, and whether it reported more than
/// data (the peer's FIN, a reset, TCP urgent data). Then a read shorter than asked may not have
/// emptied it: it stopped at the end of the data before the FIN or the error, or at the urgent
/// mark, and no new wake-up will come for what is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadySocket {
    pub(crate) id: u64,
    pub(crate) beyond_data: bool,
}

/// The token of the eventfd in the epoll instance; sockets use their connection's id, never this.
#[cfg(all(target_os = "linux", not(feature = "pipe-wake")))]
const EVENT_TOKEN: u64 = u64::MAX;

/// How many ready descriptors one harvest takes; the rest stay ready for the next dispatch.
#[cfg(all(target_os = "linux", not(feature = "pipe-wake")))]
const HARVEST_MAX: usize = 256;

#[cfg(all(target_os = "linux", not(feature = "pipe-wake")))]
impl Wakeup {
    /// Whether the host's thread may read sockets (this build can put them in the descriptor).
    pub(crate) const HOST_READS: bool = true;

    pub(crate) fn new() -> io::Result<Wakeup> {
        let owned = |fd: i32| {
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        };
        let event = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        let epoll = owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let wakeup = Wakeup { epoll, event };
        // Edge-triggered: each set is an edge, and the eventfd is never read (see `set`).
        wakeup.ctl(libc::EPOLL_CTL_ADD, wakeup.event.as_raw_fd(), EVENT_TOKEN)?;
        Ok(wakeup)
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
        // EPOLLRDHUP and EPOLLPRI (EPOLLERR and EPOLLHUP come always) tell a harvest what
        // follows a socket's data (see `ReadySocket`).
        let events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLET;
        let mut event = libc::epoll_event { events: events as u32, u64: token };
        // SAFETY: a valid epoll instance and event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub(crate) fn set(&self) {
        let one: u64 = 1;
        // Fails only with EAGAIN, when the counter would pass u64::MAX - 1 (2^64 sets, never
        // read): reset the counter and write again, which is the edge.
        let fd = self.event.as_raw_fd();
        if unsafe { libc::write(fd, (&one as *const u64).cast(), 8) } < 0 {
            let mut value: u64 = 0;
            unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }

    /// Makes the descriptor unreadable until the next set or socket data.
    pub(crate) fn clear(&self) {
        self.harvest(&mut Vec::new());
    }

    /// Takes what is ready: the sockets with data (or their end) go to `sockets`.
    pub(crate) fn harvest(&self, sockets: &mut Vec<ReadySocket>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; HARVEST_MAX];
        // SAFETY: `events` has room for HARVEST_MAX events; no waiting.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), HARVEST_MAX as i32, 0) };
        for event in &events[..n.max(0) as usize] {
            let (token, flags) = (event.u64, event.events);
            if token != EVENT_TOKEN {
                let beyond = (libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLERR | libc::EPOLLHUP) as u32;
                sockets.push(ReadySocket { id: token, beyond_data: flags & beyond != 0 });
            }
        }
        if n == HARVEST_MAX as i32 {
            // More may be ready: the next dispatch takes them (the host is told more is pending).
            self.set();
        }
    }

    /// Puts a socket in the descriptor: its data (or its end) wakes the host's loop, with
    /// `token` in the harvest. Already readable, it is harvested at the next dispatch.
    pub(crate) fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert_ne!(token, EVENT_TOKEN);
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    /// Takes a socket out of the descriptor.
    pub(crate) fn unwatch(&self, fd: RawFd) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: a valid epoll instance; a socket not in it is refused harmlessly.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut event) };
    }
}

/// The read end (what the host polls) and the write end of a non-blocking pipe.
#[cfg(any(not(target_os = "linux"), feature = "pipe-wake"))]
pub(crate) struct Wakeup {
    read: OwnedFd,
    write: OwnedFd,
    /// Whether a set is pending: a set writes a byte only when none is, so the pipe holds a byte
    /// or two, never fills, and no set is refused (a refused write raced with a clear was lost:
    /// with a one-page pipe, as Linux gives once a user has many, that happened in a test).
    pending: std::sync::atomic::AtomicBool,
}

#[cfg(any(not(target_os = "linux"), feature = "pipe-wake"))]
impl Wakeup {
    pub(crate) fn new() -> io::Result<Wakeup> {
        let mut fds = [0; 2];
        // pipe() and then fcntl, not pipe2(): macOS has no pipe2. The descriptors could leak into
        // a child forked in between; the library forks nothing, and a host that forks and execs
        // concurrently with ws_client_new() gets at most these two descriptors in the child.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&read, &write] {
            let fd = fd.as_raw_fd();
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags < 0
                    || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
                    || libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(Wakeup { read, write, pending: std::sync::atomic::AtomicBool::new(false) })
    }

    /// A pipe cannot hold sockets: the I/O thread reads them all.
    pub(crate) const HOST_READS: bool = false;

    pub(crate) fn harvest(&self, _sockets: &mut Vec<ReadySocket>) {
        self.clear();
    }

    pub(crate) fn watch(&self, _fd: RawFd, _token: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub(crate) fn unwatch(&self, _fd: RawFd) {}

    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub(crate) fn set(&self) {
        if !self.pending.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.write_byte();
        }
    }

    pub(crate) fn clear(&self) {
        self.pending.store(false, std::sync::atomic::Ordering::Release);
        // Drains every byte (one or two), until EAGAIN.
        let mut buf = [0u8; 64];
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        // A set between the store and the drain had its byte drained with the others: put one
        // back, so that what was set after the clear began stays readable.
        if self.pending.load(std::sync::atomic::Ordering::Acquire) {
            self.write_byte();
        }
    }

    fn write_byte(&self) {
        // SAFETY: a valid descriptor and a one-byte buffer. It cannot be refused: the pipe
        // holds at most two bytes.
        unsafe { libc::write(self.write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(wakeup: &Wakeup) -> bool {
        let mut pfd = libc::pollfd { fd: wakeup.fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    fn is_pipe(wakeup: &Wakeup) -> bool {
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(wakeup.fd(), &mut stat) }, 0);
        stat.st_mode & libc::S_IFMT == libc::S_IFIFO
    }

    #[test]
    fn readable_from_set_until_clear() {
        let wakeup = Wakeup::new().unwrap();
        assert_eq!(is_pipe(&wakeup), cfg!(any(not(target_os = "linux"), feature = "pipe-wake")), "the kind built");
        assert!(!readable(&wakeup));
        wakeup.set();
        assert!(readable(&wakeup));
        wakeup.set();
        wakeup.clear();
        assert!(!readable(&wakeup), "one clear takes every set");
        wakeup.clear();
        assert!(!readable(&wakeup), "a clear with nothing set is harmless");
    }

    #[test]
    fn sets_from_other_threads_are_never_lost() {
        // Sets race with clears; then, once the clears are done, each thread sets once more:
        // those sets must be seen (a clear that comes after a set takes it: that is not a loss).
        let wakeup = std::sync::Arc::new(Wakeup::new().unwrap());
        let clears_done = std::sync::Arc::new(std::sync::Barrier::new(5));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (wakeup, clears_done) = (wakeup.clone(), clears_done.clone());
                std::thread::spawn(move || {
                    (0..10_000).for_each(|_| wakeup.set());
                    clears_done.wait();
                    wakeup.set();
                })
            })
            .collect();
        for _ in 0..1000 {
            wakeup.clear();
        }
        clears_done.wait();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(readable(&wakeup), "the sets after the last clear are seen");
        wakeup.clear();
        assert!(!readable(&wakeup));
    }

    /// Every set after a harvest (every dispatch harvests) is a new edge for a host's
    /// edge-triggered epoll, also the set that finds the eventfd's counter full (it is never
    /// read: 2^64 sets would fill it).
    #[cfg(target_os = "linux")]
    #[test]
    fn every_set_after_a_harvest_is_an_edge_even_with_the_counter_full() {
        let wakeup = Wakeup::new().unwrap();
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0);
        let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 7 };
        assert_eq!(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, wakeup.fd(), &mut event) }, 0);
        let edge = || {
            let mut out = libc::epoll_event { events: 0, u64: 0 };
            unsafe { libc::epoll_wait(epfd, &mut out, 1, 0) == 1 }
        };
        assert!(!edge());
        for _ in 0..3 {
            wakeup.set();
            assert!(edge(), "a set is an edge");
            assert!(!edge(), "and only one");
            wakeup.clear();
            assert!(!readable(&wakeup), "a harvest leaves it unreadable");
        }
        #[cfg(not(feature = "pipe-wake"))]
        {
            // The eventfd's counter at its maximum, u64::MAX - 1: the next write is refused.
            let near_full: u64 = u64::MAX - 1 - 3;
            let fd = wakeup.event.as_raw_fd();
            assert_eq!(unsafe { libc::write(fd, (&near_full as *const u64).cast(), 8) }, 8);
            assert!(edge());
            wakeup.clear();
            wakeup.set();
            assert!(edge(), "the set that found the counter full is an edge all the same");
            let mut value: u64 = 0;
            assert_eq!(unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) }, 8);
            assert_eq!(value, 1, "the counter was reset, then set");
        }
        unsafe { libc::close(epfd) };
    }

    /// A watched socket's data makes the descriptor readable and is harvested with its token;
    /// more data after the harvest is a new wake-up; an unwatched socket wakes nothing.
    #[cfg(all(target_os = "linux", not(feature = "pipe-wake")))]
    #[test]
    fn a_watched_socket_wakes_the_descriptor_and_is_harvested_with_its_token() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let wakeup = Wakeup::new().unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        wakeup.watch(ours.as_raw_fd(), 42).unwrap();
        assert!(!readable(&wakeup));
        theirs.write_all(b"x").unwrap();
        assert!(readable(&wakeup), "data on a watched socket");
        let mut ready = Vec::new();
        wakeup.harvest(&mut ready);
        assert_eq!(ready, vec![ReadySocket { id: 42, beyond_data: false }]);
        assert!(!readable(&wakeup), "harvested (the byte is still unread)");
        theirs.write_all(b"y").unwrap();
        assert!(readable(&wakeup), "more data is a new wake-up");
        ready.clear();
        wakeup.set();
        wakeup.harvest(&mut ready);
        assert_eq!(ready, vec![ReadySocket { id: 42, beyond_data: false }], "the eventfd is not reported as a socket");
        wakeup.unwatch(ours.as_raw_fd());
        theirs.write_all(b"z").unwrap();
        assert!(!readable(&wakeup), "an unwatched socket wakes nothing");
        // The peer's end behind its data is reported with it: a short read does not empty
        // the socket then.
        wakeup.watch(ours.as_raw_fd(), 42).unwrap();
        wakeup.harvest(&mut ready);
        ready.clear();
        theirs.write_all(b"w").unwrap();
        drop(theirs);
        wakeup.harvest(&mut ready);
        assert_eq!(ready, vec![ReadySocket { id: 42, beyond_data: true }]);
    }
}
