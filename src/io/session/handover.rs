//! Handing the reading of the socket to the dispatching thread (`crate::host::reading`) and
//! taking it back: the task offers it whenever it has nothing in hand, and takes it back when
//! the host gives it back or the task needs the socket itself.

use std::task::Context;

use super::{End, Session};
use crate::io::reader::FrameReader;

impl Session {
    /// Hands the reading of the socket to the host's thread, if nothing stands in the way:
    /// the task holds nothing unparsed and nothing for the host, no close is under way, no
    /// keepalive ping waits for its answer, the socket takes what the task writes, no
    /// compression, and the host is dispatching. Only once the connection has received a
    /// second message, since it opened or since the task last took its reading back, and
    /// while the last one was small: a connection that receives one message and idles
    /// (thousands of them, each waiting for one answer), or a stream of large messages (which
    /// the host's thread would hand straight back: 1 MiB messages cost 24% more CPU that way),
    /// is not worth the hand-over (a few system calls, and a little memory while the host has
    /// it).
    pub(super) fn offer_reading(&mut self, cx: &mut Context<'_>) {
        let idle = self.reader.between_frames()
            && self.wire.nothing_received_held()
            && self.batch.is_empty()
            && self.arena.pending() == 0
            && self.pongs.is_empty()
            && self.peer_close.is_none()
            && !self.peer_eof
            && self.read_failed.is_none()
            && self.failing.is_none()
            && !self.close_sent
            && self.close_deadline.is_none()
            && self.ping_sent.is_none()
            && !self.write_blocked
            && self.messages_read >= 2
            && self.last_read_small;
        if self.handed || !idle || !self.options.read_on_dispatch || !self.watch.reads() || !self.conn.hub.host_reads()
        {
            return;
        }
        // The host's thread could read now (its own check at every read).
        if self.conn.host_allowance().is_none() {
            return;
        }
        // Readability stops waking the I/O thread first; the socket then joins the host's
        // descriptor, which reports at once whatever arrived in between.
        if self.watch.set_reads(false).is_err() {
            // Unwatched: the next read fails and ends the connection.
            cx.waker().wake_by_ref();
            return;
        }
        let placeholder = FrameReader::new(Vec::new(), 0, 0, None);
        let reader = std::mem::replace(&mut self.reader, placeholder);
        match self.conn.hand_reading_to_host(reader, self.wire.clone(), cx.waker()) {
            Ok(()) => self.handed = true,
            Err(reader) => {
                self.reader = reader;
                if self.watch.set_reads(true).is_err() {
                    cx.waker().wake_by_ref();
                }
            }
        }
    }

    /// Takes the reading back from the host's thread if it gave it back, or (`now`) anyway.
    /// Returns whether it did.
    pub(super) fn reading_back(&mut self, now: bool, cx: &mut Context<'_>) -> Result<bool, End> {
        let Some(reading) = self.conn.take_reading_back(now, cx.waker()) else {
            return Ok(false);
        };
        let reading = *reading;
        self.handed = false;
        self.messages_read = 0;
        self.reader = reading.reader;
        if reading.heard {
            self.heard();
        }
        match reading.ended {
            Some(Ok(())) => self.peer_eof = true,
            Some(Err(e)) => self.read_failed = Some(e),
            None => {}
        }
        self.watch.set_reads(true).map_err(|e| self.io_failure(e))?;
        Ok(true)
    }
}
