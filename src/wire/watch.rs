//! The I/O task's registration of a connection's socket with the I/O thread's reactor.
//!
//! While the task reads the socket, the registration asks for both readability and
//! writability. While the host's thread reads it during its dispatches (see
//! `crate::host::reading`), it asks for writability alone: arriving data then wakes the host's
//! loop and not the I/O thread, which is the thread switch a request/reply round trip saves.
//! Tokio registers a socket once, for good, so changing what is asked for is a new
//! registration (two epoll_ctl calls, paid only when the reading side changes hands).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};

/// The socket's descriptor, not owned: the `Wire` owns the socket and outlives the watch
/// (the session drops its watch first).
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) struct Watch {
    /// None only between two registrations (and for good if a new one failed).
    fd: Option<AsyncFd<Fd>>,
    reads: bool,
}

impl Watch {
    /// Registers `fd` for reading and writing.
    pub(super) fn new(fd: RawFd) -> io::Result<Watch> {
        Ok(Watch { fd: Some(register(Fd(fd), true)?), reads: true })
    }

    /// Whether readability is watched (the task reads the socket).
    pub(crate) fn reads(&self) -> bool {
        self.reads
    }

    /// Watches readability again, or stops watching it. An error (the reactor refused the
    /// registration) leaves the socket unwatched: the connection must end.
    pub(crate) fn set_reads(&mut self, reads: bool) -> io::Result<()> {
        if self.reads == reads {
            return Ok(());
        }
        let fd = self.fd.take().ok_or_else(unwatched)?.into_inner();
        self.fd = Some(register(fd, reads)?);
        self.reads = reads;
        Ok(())
    }

    fn fd(&self) -> io::Result<&AsyncFd<Fd>> {
        self.fd.as_ref().ok_or_else(unwatched)
    }

    /// Reads at most `buf.len()` bytes, waiting for the socket if it has none. A read shorter
    /// than asked drained the socket: its readiness is cleared then, which spares the read that
    /// would only say so (as tokio's own streams do).
    pub(crate) fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        debug_assert!(self.reads, "read by the task while the host's thread reads");
        loop {
            let mut guard = ready!(self.fd()?.poll_read_ready(cx))?;
            match guard.try_io(|fd| super::recv(fd.get_ref().0, buf)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < buf.len() {
                        guard.clear_ready_matching(Ready::READABLE);
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // WouldBlock: the readiness was cleared; wait for the next.
                Err(_) => continue,
            }
        }
    }

    /// Ready when the socket may take more, after a write that it did not take whole: that
    /// write (on whichever thread) found it full, so readiness seen before is stale and is
    /// cleared once, the first time round (a later readiness has a newer tick and survives).
    pub(crate) fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let fd = self.fd()?;
        let mut guard = ready!(fd.poll_write_ready(cx))?;
        // Is it really writable? One poll(2) answers, without writing anything.
        if writable_now(fd.get_ref().0) {
            return Poll::Ready(Ok(()));
        }
        guard.clear_ready_matching(Ready::WRITABLE);
        drop(guard);
        ready!(fd.poll_write_ready(cx))?.retain_ready();
        Poll::Ready(Ok(()))
    }
}

fn register(fd: Fd, reads: bool) -> io::Result<AsyncFd<Fd>> {
    let interest = if reads { Interest::READABLE | Interest::WRITABLE } else { Interest::WRITABLE };
    // SAFETY: the descriptor stays open for as long as the registration lives: the `Wire`
    // owns the socket, and the session that holds this watch holds the wire, and drops the
    // watch (deregistering) before it lets go of the wire.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn writable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
}

fn unwatched() -> io::Error {
    io::Error::other("the socket could not be registered with the I/O thread's reactor")
}
