//! The worker's end of the data channel.
//!
//! Whatever is readable is drained at once and delivered as one batch of
//! plain numbers (`[listener, seq, fd, ...]`), one callback per wake-up rather
//! than one per connection. In a worker the wake-up comes from the worker's
//! own libuv loop (see `binding::worker_attach`). The descriptors stay owned
//! here until JavaScript settles them: an accepted fd is handed over to the
//! handle that wrapped it, a declined one is closed, and the primary hears
//! about both in one write.
//!
//! Under the ledger the primary sends a `Lease` instead of connections: the
//! worker accepts on the listener itself (`acceptor`), and those connections
//! join the same batches, with sequence numbers of their own (`DIRECT` set).
//! One the worker cannot take goes back to the primary (`Return`) for another.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::sys::{self, SysError, SysResult};
use crate::wire::{self, Decoder, Incoming, Record, MAX_FDS_PER_MSG, RECORD_LEN};

/// Set in the sequence numbers of connections the worker accepted itself;
/// the primary numbers its own below it.
pub const DIRECT: u32 = 1 << 31;

/// The primary's answer to `Ready` on a listener under the ledger: leave to
/// accept on it (see `wire::Record::Lease`), or `None` (`NoLease`).
pub struct Lease {
    pub listener: u32,
    pub grant: Option<Grant>,
}

pub struct Grant {
    pub slot: u32,
    pub socket: OwnedFd,
    pub table: OwnedFd,
    pub progress: OwnedFd,
}

pub struct WorkerChannel {
    fd: OwnedFd,
    decoder: Mutex<Decoder>,
    /// Delivered, not yet settled: sequence → (listener, descriptor).
    unsettled: Mutex<HashMap<u32, (u32, OwnedFd)>>,
    next_direct: AtomicU32,
    /// How long a write waits for room before it gives up.
    write_timeout: PollTimeout,
    /// Set once a write gave up after sending part of what it had: the
    /// primary would read what came next as the rest of that record, so
    /// nothing more is written.
    broken: AtomicBool,
}

impl WorkerChannel {
    /// Takes the channel end the primary passed at spawn. It is made
    /// close-on-exec at once, so the worker's own children do not inherit it,
    /// and non-blocking, so reads can be driven by the worker's event loop.
    pub fn new(fd: OwnedFd) -> SysResult<WorkerChannel> {
        sys::set_cloexec(fd.as_fd())?;
        sys::set_nonblocking(fd.as_fd(), true)?;
        Ok(WorkerChannel {
            fd,
            decoder: Mutex::default(),
            unsettled: Mutex::new(HashMap::new()),
            next_direct: AtomicU32::new(0),
            write_timeout: PollTimeout::from(1000u16),
            broken: AtomicBool::new(false),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads everything there is without blocking and appends each received
    /// connection to `batch` as `[listener, seq, fd]`, and each lease to
    /// `leases`. Returns false once the primary has closed the channel.
    pub fn drain(&self, batch: &mut Vec<u32>, leases: &mut Vec<Lease>) -> SysResult<bool> {
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
                    // The loop's poll is level-triggered: another read of an
                    // emptied socket would only say EAGAIN.
                    if r.emptied(buf.len()) {
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
            for Incoming { record, fds } in incoming {
                match (record, fds) {
                    (Record::Conn { listener, seq }, Some(mut fds)) if seq & DIRECT == 0 => {
                        let fd = fds.pop().unwrap();
                        batch.extend_from_slice(&[listener, seq, fd.as_raw_fd() as u32]);
                        unsettled.insert(seq, (listener, fd));
                    }
                    (Record::Lease { listener, slot }, Some(fds)) => {
                        let [socket, table, progress] = <[OwnedFd; 3]>::try_from(fds).unwrap();
                        leases.push(Lease { listener, grant: Some(Grant { slot, socket, table, progress }) });
                    }
                    (Record::Lease { listener, .. } | Record::NoLease { listener }, _) => {
                        leases.push(Lease { listener, grant: None });
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
            self.wait_for(PollFlags::POLLIN, PollTimeout::NONE)?;
            let mut batch = Vec::new();
            let open = self.drain(&mut batch, &mut Vec::new())?;
            if !batch.is_empty() && !deliver(batch) {
                return Ok(());
            }
            if !open {
                return Ok(());
            }
        }
    }

    /// Adds connections this worker accepted itself on `listener` to `batch`.
    pub fn adopt(&self, listener: u32, fds: Vec<OwnedFd>, batch: &mut Vec<u32>) {
        let mut unsettled = self.unsettled.lock().unwrap();
        for fd in fds {
            let seq = DIRECT | self.next_direct.fetch_add(1, Ordering::Relaxed);
            batch.extend_from_slice(&[listener, seq, fd.as_raw_fd() as u32]);
            unsettled.insert(seq, (listener, fd));
        }
    }

    /// Settles delivered connections: `accepted` fds now belong to the caller's
    /// handles; `declined` ones go back to the primary: a received one is
    /// closed here (the primary still holds it), one the worker accepted
    /// itself travels back with a `Return`.
    pub fn settle(&self, accepted: &[u32], declined: &[u32]) -> SysResult<()> {
        let mut bytes = Vec::with_capacity((accepted.len() + declined.len()) * RECORD_LEN);
        let mut returns = Vec::new();
        {
            let mut unsettled = self.unsettled.lock().unwrap();
            for &seq in accepted {
                if let Some((_, fd)) = unsettled.remove(&seq) {
                    // Ownership moves to the JS handle that opened this number.
                    let _ = fd.into_raw_fd();
                    if seq & DIRECT == 0 {
                        Record::Ack { seq, accepted: true }.encode(&mut bytes);
                    }
                }
            }
            for &seq in declined {
                match unsettled.remove(&seq) {
                    Some((listener, fd)) if seq & DIRECT != 0 => returns.push((listener, fd)),
                    Some(_) => Record::Ack { seq, accepted: false }.encode(&mut bytes),
                    None => {}
                }
            }
        }
        self.write_all(&bytes)?;
        for chunk in returns.chunks(MAX_FDS_PER_MSG) {
            let mut bytes = Vec::with_capacity(chunk.len() * RECORD_LEN);
            chunk.iter().for_each(|&(listener, _)| Record::Return { listener }.encode(&mut bytes));
            let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            self.write_all_with(&bytes, &fds)?;
        }
        Ok(())
    }

    pub fn ready(&self, listener: u32) -> SysResult<()> {
        self.write_record(Record::Ready { listener })
    }

    /// Waits, at most `timeout`, for the lease on a listener under the
    /// ledger (`Lease` or `NoLease`; the primary sends it as it answers the
    /// worker's query), so that the worker accepts before its server reports
    /// 'listening'. Whatever else arrives meanwhile goes to `batch` and
    /// `leases` as from `drain`.
    pub fn await_lease(
        &self,
        listener: u32,
        timeout: std::time::Duration,
        batch: &mut Vec<u32>,
        leases: &mut Vec<Lease>,
    ) -> SysResult<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let open = self.drain(batch, leases)?;
            if !open || leases.iter().any(|l| l.listener == listener) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(SysError { syscall: "recvmsg", errno: Errno::ETIMEDOUT });
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            self.wait_for(PollFlags::POLLIN, PollTimeout::from(ms))?;
        }
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
    fn write_all(&self, bytes: &[u8]) -> SysResult<()> {
        self.write_all_with(bytes, &[])
    }

    /// Waits until the channel is ready for `events`; false when `timeout`
    /// passed first. A signal counts as a wake-up: the caller looks again.
    fn wait_for(&self, events: PollFlags, timeout: PollTimeout) -> SysResult<bool> {
        let mut fds = [PollFd::new(self.fd.as_fd(), events)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(true),
            Err(errno) => Err(SysError { syscall: "poll", errno }),
        }
    }

    /// As `write_all`; the descriptors go with the first bytes sent. A write
    /// that fails part-way breaks the channel for writing (see `broken`).
    fn write_all_with(&self, mut bytes: &[u8], mut fds: &[RawFd]) -> SysResult<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(SysError { syscall: "sendmsg", errno: Errno::EPIPE });
        }
        let total = bytes.len();
        while !bytes.is_empty() {
            let failed = match wire::send(self.fd.as_raw_fd(), bytes, fds) {
                Ok(n) => {
                    bytes = &bytes[n..];
                    fds = &[];
                    continue;
                }
                Err(e) if e.errno == Errno::EINTR => continue,
                Err(e) if sys::would_block(e.errno) => match self.wait_for(PollFlags::POLLOUT, self.write_timeout) {
                    Ok(true) => continue,
                    Ok(false) => SysError { syscall: "sendmsg", errno: Errno::ETIMEDOUT },
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if bytes.len() < total {
                self.broken.store(true, Ordering::Relaxed);
            }
            return Err(failed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 `Ack` records: more than the socket holds.
    fn many_records() -> Vec<u8> {
        let mut bytes = Vec::new();
        for seq in 0..100_000 {
            Record::Ack { seq, accepted: true }.encode(&mut bytes);
        }
        bytes
    }

    /// Reads what the primary's end holds now, without waiting.
    fn read_all_now(fd: &OwnedFd) -> usize {
        let mut buf = [0u8; 65536];
        let mut total = 0;
        loop {
            match nix::unistd::read(fd.as_fd(), &mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) if sys::would_block(e) => return total,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    #[test]
    fn a_write_that_gives_up_part_way_is_the_last_one() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        sys::set_nonblocking(primary_end.as_fd(), true).unwrap();
        let mut channel = WorkerChannel::new(worker_end).unwrap();
        channel.write_timeout = PollTimeout::from(20u16);
        // More records than the socket holds, with nobody reading them.
        let bytes = many_records();
        assert_eq!(channel.write_all(&bytes).unwrap_err().errno, Errno::ETIMEDOUT);
        let sent = read_all_now(&primary_end);
        assert!(sent > 0 && sent < bytes.len(), "{sent} of {}", bytes.len());
        // The primary has read up to the middle of a record (or to the end
        // of one): a record written now would be read out of step.
        assert_eq!(channel.gone(1).unwrap_err().errno, Errno::EPIPE);
        assert_eq!(read_all_now(&primary_end), 0);
    }

    #[test]
    fn a_write_that_waited_for_room_goes_on() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        let channel = WorkerChannel::new(worker_end).unwrap();
        let bytes = many_records();
        let total = bytes.len();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut got = 0;
            while got < total + RECORD_LEN {
                got += nix::unistd::read(primary_end.as_fd(), &mut buf).unwrap();
            }
            got
        });
        channel.write_all(&bytes).unwrap();
        channel.gone(1).unwrap();
        assert_eq!(reader.join().unwrap(), total + RECORD_LEN);
    }
}
