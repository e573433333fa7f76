//! The socket of an open connection, which both threads may write to.
//!
//! A small send with nothing queued before it is framed and written by the thread that makes
//! it, usually the host's (see `conn::host_side`): that saves the switch to the I/O thread and
//! back that a request/reply round trip would otherwise pay. Everything else is written by the
//! I/O task. Who may write when is decided under the connection's lock (`State::writable_now`):
//! only one side writes at a time, and never ahead of what is queued.
//!
//! For wss the TLS session sits behind its own mutex, taken briefly by whichever side encrypts
//! (a write) or decrypts (a read, by the I/O task or by the dispatching thread: see
//! `crate::host::reading`): a record is a few microseconds of work, so neither side waits on
//! the other's progress, only, rarely, on a record being processed.
//!
//! - `frame`: the frames we send (header, masking key, masked payload);
//! - `watch`: the I/O task's registration of the socket with its reactor, for reading and
//!   writing, or for writing alone while the dispatching thread reads.

pub(crate) mod frame;
mod watch;

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use rustls::ClientConnection;

use crate::io::reader::Source;
pub(crate) use watch::Watch;

/// The socket of an open connection, shared by both threads (and, for TLS, the session both
/// sides use). It holds no registration with the I/O thread's reactor: the I/O task holds that
/// (`Watch`), so that it alone decides whether arriving data wakes the I/O thread.
pub(crate) struct Wire {
    tcp: TcpStream,
    /// Boxed: a session is over a kilobyte, which a plain connection should not carry.
    tls: Option<Box<Mutex<ClientConnection>>>,
}

/// The reading side, for the thread that reads now: the I/O task through its `Watch`, or the
/// host's thread during a dispatch (no watch: Pending when the socket has nothing). Both know
/// that a short read drained the socket and spare the read that would only say so: the watch
/// clears its readiness, and the host's reads end there (the socket's next data is a new edge
/// in the descriptor the host's loop waits on), unless the socket reported more than data.
pub(crate) struct Receiving<'a> {
    wire: &'a Wire,
    watch: Option<&'a Watch>,
    drained: std::cell::Cell<bool>,
    short_reads_drain: bool,
}

/// What a write left behind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// All of it is on its way.
    All,
    /// Plain TCP: this many bytes were written; the rest must be written later, first.
    Part(usize),
    /// TLS: everything was taken into the session, but encrypted bytes wait in it.
    Unflushed,
}

impl Wire {
    /// The wire of a plain TCP connection, and the I/O task's registration of it.
    pub(crate) fn plain(tcp: tokio::net::TcpStream) -> io::Result<(Wire, Watch)> {
        Wire::new(tcp, None)
    }

    /// The wire of a TLS connection, and the I/O task's registration of it.
    pub(crate) fn tls(tcp: tokio::net::TcpStream, session: ClientConnection) -> io::Result<(Wire, Watch)> {
        Wire::new(tcp, Some(Box::new(Mutex::new(session))))
    }

    fn new(tcp: tokio::net::TcpStream, tls: Option<Box<Mutex<ClientConnection>>>) -> io::Result<(Wire, Watch)> {
        // Out of tokio's TcpStream (which registers for reading, always) into a registration
        // the task controls. The socket stays non-blocking.
        let tcp = tcp.into_std()?;
        let watch = Watch::new(tcp.as_raw_fd())?;
        Ok((Wire { tcp, tls }, watch))
    }

    /// The socket's descriptor (to ask the kernel about it).
    pub(crate) fn socket(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }

    fn session(&self) -> Option<MutexGuard<'_, ClientConnection>> {
        // A panic in rustls leaves the session to the connection's end; never poison it.
        self.tls.as_deref().map(crate::sync::lock)
    }

    /// Whether everything received has been handed out of the TLS session (always, for plain
    /// TCP): only then does the socket's readiness tell whether there is more to read.
    pub(crate) fn nothing_received_held(&self) -> bool {
        self.session().map_or(true, |tls| tls.wants_read())
    }

    /// TLS: whether the session has bytes to write that reading produced (an alert, a key
    /// update's answer): whoever read must see that they are written.
    pub(crate) fn session_wants_write(&self) -> bool {
        self.session().is_some_and(|tls| tls.wants_write())
    }

    // ---- writing: either thread, one at a time (the connection's lock decides who) --------

    /// Writes `chunks` (whole frames, in order) as far as the socket takes them now, without
    /// waiting. Plain TCP writes them with one system call; TLS takes them all into the
    /// session (at most its 64 KiB buffer limit past what it holds) and writes what it can.
    /// Returns the bytes of `chunks` taken.
    pub(crate) fn write_now(&self, chunks: &[IoSlice<'_>]) -> io::Result<(usize, Written)> {
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        let Some(mut tls) = self.session() else {
            let written = match send_vectored(&self.tcp, chunks) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                other => other?,
            };
            return Ok((written, if written == total { Written::All } else { Written::Part(written) }));
        };
        let taken = tls.writer().write_vectored(chunks)?;
        let state = flush_session(&mut tls, &self.tcp)?;
        let written = if taken < total { Written::Part(taken) } else { state };
        Ok((taken, written))
    }

    /// TLS: writes encrypted bytes waiting in the session, as far as the socket takes them.
    /// Returns whether none wait any more (always true for plain TCP).
    pub(crate) fn flush_now(&self) -> io::Result<bool> {
        match self.session() {
            None => Ok(true),
            Some(mut tls) => Ok(flush_session(&mut tls, &self.tcp)? == Written::All),
        }
    }

    /// Starts the end of our side of the stream: the TLS close_notify, then (once it is out)
    /// the TCP FIN. Ready when both are done.
    pub(crate) fn poll_shut_down(&self, watch: &Watch, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(mut tls) = self.session() {
            // Sent once, however often this is polled.
            tls.send_close_notify();
            if flush_session(&mut tls, &self.tcp)? == Written::All {
                break;
            }
            drop(tls);
            ready!(watch.poll_writable(cx))?;
        }
        // SAFETY: shutdown(2) on the socket this wire owns.
        unsafe { libc::shutdown(self.socket(), libc::SHUT_WR) };
        Poll::Ready(Ok(()))
    }
}

impl<'a> Receiving<'a> {
    /// The I/O task's reading side.
    pub(crate) fn task(wire: &'a Wire, watch: &'a Watch) -> Receiving<'a> {
        Receiving { wire, watch: Some(watch), drained: Default::default(), short_reads_drain: true }
    }

    /// The dispatching thread's reading side, for one dispatch. `short_reads_drain`: a read
    /// shorter than asked emptied the socket (false when the socket reported its end, an
    /// error or urgent data behind its data: see `crate::host::wakeup::ReadySocket`).
    pub(crate) fn host(wire: &'a Wire, short_reads_drain: bool) -> Receiving<'a> {
        Receiving { wire, watch: None, drained: Default::default(), short_reads_drain }
    }

    /// The dispatching thread's: whether a short read emptied the socket, and nothing it
    /// brought waits in the TLS session.
    pub(crate) fn drained(&self) -> bool {
        self.drained.get() && self.wire.nothing_received_held()
    }

    /// Reads at most `buf.len()` bytes of the socket.
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let Some(watch) = self.watch else {
            if self.drained.get() {
                return Poll::Pending;
            }
            return match recv(self.wire.socket(), buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                Ok(n) => {
                    self.drained.set(self.short_reads_drain && n > 0 && n < buf.len());
                    Poll::Ready(Ok(n))
                }
                other => Poll::Ready(other),
            };
        };
        watch.poll_read(cx, buf)
    }
}

impl Source for Receiving<'_> {
    /// Reads at most `max` bytes (the decrypted bytes, for TLS) into the spare capacity of
    /// `buf`, which has at least that much. Ready(Ok(0)) is the end of the stream.
    fn poll_read_into(&mut self, cx: &mut Context<'_>, buf: &mut Vec<u8>, max: usize) -> Poll<io::Result<usize>> {
        let Some(mut tls) = self.wire.session() else {
            let len = buf.len();
            let spare = &mut buf.spare_capacity_mut()[..max];
            // SAFETY: recv only writes into the buffer, and only the bytes it reports are
            // taken as initialised.
            let spare = unsafe { &mut *(spare as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
            let n = ready!(self.poll_recv(cx, spare))?;
            // SAFETY: the socket initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(len + n) };
            return Poll::Ready(Ok(n));
        };
        loop {
            let state = tls.process_new_packets().map_err(|e| tls_failed(&mut tls, &self.wire.tcp, e))?;
            let available = state.plaintext_bytes_to_read().min(max);
            if available > 0 {
                let start = buf.len();
                buf.resize(start + available, 0);
                tls.reader().read_exact(&mut buf[start..])?;
                return Poll::Ready(Ok(available));
            }
            if state.peer_has_closed() {
                return Poll::Ready(Ok(0));
            }
            match tls.read_tls(&mut PollRead { from: self, cx }) {
                // The end of the stream, with or without close_notify: what was complete has
                // been read, and an unfinished frame shows as one.
                Ok(0) => return Poll::Ready(Ok(0)),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The reading side as std's Read, for rustls's read_tls: Pending becomes WouldBlock (with the
/// task's waker registered, when the task reads).
struct PollRead<'a, 'b, 'c> {
    from: &'a Receiving<'c>,
    cx: &'a mut Context<'b>,
}

impl Read for PollRead<'_, '_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.from.poll_recv(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// One non-blocking recv.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes the session's encrypted bytes as far as the socket takes them now.
fn flush_session(tls: &mut ClientConnection, tcp: &TcpStream) -> io::Result<Written> {
    while tls.wants_write() {
        match tls.write_tls(&mut TcpIo(tcp)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Written::Unflushed),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
    }
    Ok(Written::All)
}

/// A TLS error while reading: the session queued an alert for the peer; send it (best effort).
fn tls_failed(tls: &mut ClientConnection, tcp: &TcpStream, error: rustls::Error) -> io::Error {
    let _ = flush_session(tls, tcp);
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Writes `bufs` to the socket without waiting, and without SIGPIPE: a peer that reset the
/// connection must end it with an error, not kill a host that keeps SIGPIPE's default (the
/// host's threads write too, and a library must not change the process's signals). The I/O
/// task, which waits for the socket to become writable, clears its readiness itself after a
/// write that the socket did not take whole (see `Watch`).
fn send_vectored(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; it points at `bufs` (IoSlice is ABI-compatible with
    // iovec), which outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(MAX_IOV) as _;
    loop {
        let sent = unsafe { libc::sendmsg(tcp.as_raw_fd(), &msg, SEND_FLAGS) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How many slices one sendmsg takes: IOV_MAX, 1024 on Linux, macOS and the BSDs.
const MAX_IOV: usize = 1024;

/// MSG_NOSIGNAL keeps a write to a reset connection from raising SIGPIPE on Linux and the BSDs.
/// macOS has no such flag for send: `no_sigpipe` sets SO_NOSIGPIPE on the socket instead.
#[cfg(not(target_vendor = "apple"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(target_vendor = "apple")]
const SEND_FLAGS: libc::c_int = 0;

/// On macOS, sets SO_NOSIGPIPE on a new socket (every write to it then fails with EPIPE rather
/// than raise SIGPIPE, whichever thread writes); elsewhere MSG_NOSIGNAL does that per write.
pub(crate) fn no_sigpipe(tcp: &tokio::net::TcpStream) {
    #[cfg(target_vendor = "apple")]
    {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on the socket `tcp` owns, with an int option.
        unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NOSIGPIPE,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    #[cfg(not(target_vendor = "apple"))]
    let _ = tcp;
}

/// The socket as std's Write, without waiting (for rustls's write_tls).
struct TcpIo<'a>(&'a TcpStream);

impl Write for TcpIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_vectored(self.0, &[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        send_vectored(self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open connection holds one; a plain one must not carry room for a TLS session
    /// (over a kilobyte: 2,000 connections once held 3 MiB more for it).
    #[test]
    fn a_wire_stays_small() {
        let size = std::mem::size_of::<Wire>();
        assert!(size <= 32, "a wire is {size} bytes");
    }
}
