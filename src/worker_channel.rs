//! The worker's end of the data channel.
//!
//! Whatever is readable is drained at once and delivered as one batch of
//! plain numbers (`[listener, seq, fd, ...]`), one callback per wake-up rather
//! than one per connection. In a worker the wake-up comes from the worker's
//! own libuv loop (see `binding::worker_attach`). The descriptors stay owned
//! here until JavaScript settles them: an accepted fd is handed over to the
//! handle that wrapped it, a declined one is closed, and the primary hears
//! about both in one write.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::sys::{self, SysError, SysResult};
use crate::wire::{self, Decoder, Incoming, Record, RECORD_LEN};

pub struct WorkerChannel {
    fd: OwnedFd,
    decoder: Mutex<Decoder>,
    unsettled: Mutex<HashMap<u32, OwnedFd>>,
}

impl WorkerChannel {
    /// Takes the channel end the primary passed at spawn. It is made
    /// close-on-exec at once, so the worker's own children do not inherit it,
    /// and non-blocking, so reads can be driven by the worker's event loop.
    pub fn new(fd: OwnedFd) -> SysResult<WorkerChannel> {
        sys::set_cloexec(fd.as_fd())?;
        sys::set_nonblocking(fd.as_fd(), true)?;
        Ok(WorkerChannel { fd, decoder: Mutex::default(), unsettled: Mutex::new(HashMap::new()) })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads everything there is without blocking and appends each received
    /// connection to `batch` as `[listener, seq, fd]`. Returns false once the
    /// primary has closed the channel.
    pub fn drain(&self, batch: &mut Vec<u32>) -> SysResult<bool> {
        let mut decoder = self.decoder.lock().unwrap();
        let mut buf = [0u8; RECORD_LEN * 64];
        let mut open = true;
        loop {
            let mut fds = Vec::new();
            match wire::recv(self.fd.as_raw_fd(), &mut buf, &mut fds) {
                Ok(r) if r.bytes == 0 => {
                    open = false;
                    break;
                }
                Ok(r) => {
                    decoder.push(&buf[..r.bytes], fds, r.truncated);
                    // A short read emptied the socket; the loop's poll is
                    // level-triggered, so another read would only say EAGAIN.
                    if r.bytes < buf.len() {
                        break;
                    }
                }
                Err(e) if e.errno == Errno::EINTR => continue,
                Err(e) if sys::would_block(e.errno) => break,
                Err(e) => return Err(e),
            }
        }
        let mut incoming = Vec::new();
        decoder.drain(&mut incoming);
        drop(decoder);
        let mut lost = Vec::new();
        {
            let mut unsettled = self.unsettled.lock().unwrap();
            for Incoming { record, fd } in incoming {
                match (record, fd) {
                    (Record::Conn { listener, seq }, Some(fd)) => {
                        batch.extend_from_slice(&[listener, seq, fd.as_raw_fd() as u32]);
                        unsettled.insert(seq, fd);
                    }
                    // We had no descriptor to receive it into: the primary still
                    // holds the connection and gives it to another worker.
                    (Record::Conn { seq, .. }, None) => lost.push(seq),
                    _ => {}
                }
            }
        }
        if !lost.is_empty() {
            let mut bytes = Vec::with_capacity(lost.len() * RECORD_LEN);
            lost.iter().for_each(|&seq| Record::Ack { seq, accepted: false }.encode(&mut bytes));
            self.write_all(&bytes)?;
        }
        Ok(open)
    }

    /// Blocks until the primary closes the channel, handing each batch to
    /// `deliver` (which returns false to stop). Workers are driven by their
    /// event loop instead (see `binding::worker_attach`); the dispatcher's
    /// tests use this from a thread.
    #[cfg(test)]
    pub fn receive(&self, mut deliver: impl FnMut(Vec<u32>) -> bool) -> SysResult<()> {
        loop {
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(SysError { syscall: "poll", errno }),
                Ok(_) => {}
            }
            let mut batch = Vec::new();
            let open = self.drain(&mut batch)?;
            if !batch.is_empty() && !deliver(batch) {
                return Ok(());
            }
            if !open {
                return Ok(());
            }
        }
    }

    /// Settles delivered connections: `accepted` fds now belong to the caller's
    /// handles, `declined` ones are closed and go back to the primary.
    pub fn settle(&self, accepted: &[u32], declined: &[u32]) -> SysResult<()> {
        let mut bytes = Vec::with_capacity((accepted.len() + declined.len()) * RECORD_LEN);
        {
            let mut unsettled = self.unsettled.lock().unwrap();
            for &seq in accepted {
                if let Some(fd) = unsettled.remove(&seq) {
                    // Ownership moves to the JS handle that opened this number.
                    let _ = fd.into_raw_fd();
                    Record::Ack { seq, accepted: true }.encode(&mut bytes);
                }
            }
            for &seq in declined {
                if unsettled.remove(&seq).is_some() {
                    Record::Ack { seq, accepted: false }.encode(&mut bytes);
                }
            }
        }
        self.write_all(&bytes)
    }

    pub fn ready(&self, listener: u32) -> SysResult<()> {
        self.write_record(Record::Ready { listener })
    }

    pub fn gone(&self, listener: u32) -> SysResult<()> {
        self.write_record(Record::Gone { listener })
    }

    fn write_record(&self, record: Record) -> SysResult<()> {
        let mut bytes = Vec::with_capacity(RECORD_LEN);
        record.encode(&mut bytes);
        self.write_all(&bytes)
    }

    /// Writes from the JS thread without blocking it for long: the primary
    /// reads continuously and at most a window of acks is ever outstanding,
    /// so the socket buffer does not fill; if it ever does, wait up to a second.
    fn write_all(&self, mut bytes: &[u8]) -> SysResult<()> {
        while !bytes.is_empty() {
            match wire::send(self.fd.as_raw_fd(), bytes, &[]) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.errno == Errno::EINTR => continue,
                Err(e) if sys::would_block(e.errno) => {
                    let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT)];
                    let ready = nix::poll::poll(&mut fds, PollTimeout::from(1000u16))
                        .map_err(|errno| SysError { syscall: "poll", errno })?;
                    if ready == 0 {
                        return Err(SysError { syscall: "sendmsg", errno: Errno::ETIMEDOUT });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
