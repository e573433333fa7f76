//! The session's one timer: the close deadline and keepalive (a ping after an idle interval,
//! and the end of a peer that answers nothing, not even by taking our data).

use std::future::Future;
use std::os::fd::RawFd;
use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use super::{End, Session};
use crate::error::WsStatus;

/// Bytes of ours the peer must acknowledge within a keepalive timeout, while our ping waits
/// behind data it has not read yet, to count as alive (see `Session::peer_took_data`).
const TAKEN_WHILE_ALIVE: u64 = 64 << 10;

impl Session {
    /// Something arrived: the peer is alive.
    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
        if self.ping_sent.take().is_some() {
            // The ping was answered: the next check is one interval from now, not the timeout.
            if let Some(interval) = self.options.keepalive_interval {
                let next = self.last_heard + interval;
                let next = self.close_deadline.map_or(next, |d| d.min(next));
                self.timer.as_mut().reset(next);
            }
        }
    }

    pub(super) fn arm_close_deadline(&mut self) {
        if self.close_deadline.is_none() {
            let deadline = Instant::now() + self.options.close_timeout;
            self.close_deadline = Some(deadline);
            let earliest = deadline.min(self.timer.deadline());
            self.timer.as_mut().reset(earliest);
        }
    }

    /// Close deadline and keepalive. Returns whether it did something (sent a ping).
    pub(super) fn check_timers(&mut self, cx: &mut Context<'_>) -> Result<bool, End> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(false);
        }
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        if let Some(deadline) = self.close_deadline {
            if now >= deadline {
                let ms = self.options.close_timeout.as_millis();
                return Err(End::error(
                    WsStatus::CloseTimeout,
                    format!(
                        "close timeout: the close handshake (and the data queued before it) did not complete \
                         within {ms} ms"
                    ),
                ));
            }
            next = next.min(deadline);
        }
        let mut pinged = false;
        let closing = self.close_sent || self.peer_close.is_some() || self.close_deadline.is_some();
        if let (Some(interval), false) = (self.options.keepalive_interval, closing) {
            let timeout = self.options.keepalive_timeout;
            let ping_sent = self.ping_sent;
            match ping_sent {
                Some(sent) if now >= sent + timeout && self.peer_took_data() => {
                    // Our ping waits behind data the peer is still taking (an upload over a
                    // slow link): it is alive. The next ping goes out one interval from now.
                    self.last_heard = now;
                    self.ping_sent = None;
                    next = next.min(now + interval);
                }
                Some(sent) if now >= sent + timeout => {
                    let ms = (now - self.last_heard).as_millis();
                    return Err(End::error(
                        WsStatus::KeepaliveTimeout,
                        format!("keepalive timeout: nothing received from the peer for {ms} ms, not even a pong"),
                    ));
                }
                Some(sent) => next = next.min(sent + timeout),
                None if now >= self.last_heard + interval => {
                    self.ping_due = true;
                    self.ping_sent = Some(now);
                    self.acked_at_ping = acknowledged_bytes(self.wire.socket()).unwrap_or(0);
                    pinged = true;
                    next = next.min(now + timeout);
                }
                None => next = next.min(self.last_heard + interval),
            }
        }
        self.timer.as_mut().reset(next);
        // Poll the re-armed timer so that it wakes this task.
        let _ = self.timer.as_mut().poll(cx);
        Ok(pinged)
    }

    /// Whether the peer took more of our data since the ping went out than its kernel alone
    /// would (our pings are a few bytes): then it reads, and our ping merely waits behind what
    /// it has not read yet. A peer whose application stopped reading takes at most its receive
    /// buffer, and then no more: the keepalive timeout fires then.
    fn peer_took_data(&self) -> bool {
        acknowledged_bytes(self.wire.socket()).is_some_and(|acked| acked > self.acked_at_ping + TAKEN_WHILE_ALIVE)
    }
}

/// How many bytes sent on `socket` the peer has acknowledged so far (Linux's TCP_INFO), if known.
fn acknowledged_bytes(socket: RawFd) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes of it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let answered = unsafe {
            libc::getsockopt(
                socket,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        (answered == 0).then_some(info.tcpi_bytes_acked)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}
