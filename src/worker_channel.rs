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

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::sys::{self, SendFailure, SysError, SysResult};
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
    /// What the primary has not taken yet (see `Outbox`).
    outbox: Mutex<Outbox>,
    /// How long a control record (`Ready`, `Gone`) waits for room.
    control_timeout: Duration,
    /// Set once the primary's end is gone: nothing more is written.
    broken: AtomicBool,
}

/// Writes that found no room, in order, so that the JavaScript thread never
/// waits for the primary to read and nothing written is lost. The
/// dispatcher reads continuously, so this holds anything only while the
/// primary cannot keep up; its event loop then sends the rest when the
/// channel is writable again (see `Backlog`).
#[derive(Default)]
struct Outbox {
    /// Each message with the descriptors that go with its first byte; they
    /// stay open here until sent.
    messages: VecDeque<(Vec<u8>, Vec<OwnedFd>)>,
    /// The kernel refused for want of memory or room for descriptors in
    /// flight, rather than for want of buffer space.
    pressure: bool,
}

/// How long a worker waits before it writes again after the kernel refused
/// for want of memory (`Backlog::Pause`). Such a refusal is rare and passes
/// when other processes free memory or descriptors; until then, acks wait
/// and the primary holds their connections, within its window.
pub const PRESSURE_PAUSE: Duration = Duration::from_millis(10);

/// What a worker's event loop waits for before it calls `flush` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Everything is written.
    Empty,
    /// The primary's buffer is full: flush when the channel is writable.
    Writable,
    /// The kernel is under pressure (`SendFailure::Pressure`): writable says
    /// nothing about when that passes, so flush after a pause.
    Pause,
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
            outbox: Mutex::default(),
            control_timeout: Duration::from_secs(1),
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
            self.post(bytes, Vec::new())?;
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
    /// itself travels back with a `Return`. Never waits: what finds no room
    /// stays in the outbox (see `backlog`).
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
        if !bytes.is_empty() {
            self.post(bytes, Vec::new())?;
        }
        let mut returns = returns.into_iter().peekable();
        while returns.peek().is_some() {
            let chunk: Vec<(u32, OwnedFd)> = returns.by_ref().take(MAX_FDS_PER_MSG).collect();
            let mut bytes = Vec::with_capacity(chunk.len() * RECORD_LEN);
            chunk.iter().for_each(|&(listener, _)| Record::Return { listener }.encode(&mut bytes));
            self.post(bytes, chunk.into_iter().map(|(_, fd)| fd).collect())?;
        }
        Ok(())
    }

    pub fn ready(&self, listener: u32) -> SysResult<()> {
        self.write_control(Record::Ready { listener })
    }

    /// Waits, at most `timeout`, for the lease on a listener under the
    /// ledger (`Lease` or `NoLease`; the primary sends it as it answers the
    /// worker's query), so that the worker accepts before its server reports
    /// 'listening'. Whatever else arrives meanwhile goes to `batch` and
    /// `leases` as from `drain`.
    pub fn await_lease(
        &self,
        listener: u32,
        timeout: Duration,
        batch: &mut Vec<u32>,
        leases: &mut Vec<Lease>,
    ) -> SysResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.drain(batch, leases)?;
            if !open || leases.iter().any(|l| l.listener == listener) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SysError { syscall: "recvmsg", errno: Errno::ETIMEDOUT });
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            self.wait_for(PollFlags::POLLIN, PollTimeout::from(ms))?;
        }
    }

    pub fn gone(&self, listener: u32) -> SysResult<()> {
        self.write_control(Record::Gone { listener })
    }

    /// Writes a control record and waits, up to a second, until it (and
    /// whatever was waiting before it) has been sent. The primary relies on
    /// the order of the two ways a worker talks to it: what the worker wrote
    /// here before a message on Node's IPC channel (a `Gone` before the query
    /// of a server that listens again) is there to read when that message
    /// arrives. On a timeout the record stays queued all the same.
    fn write_control(&self, record: Record) -> SysResult<()> {
        let mut bytes = Vec::with_capacity(RECORD_LEN);
        record.encode(&mut bytes);
        self.post(bytes, Vec::new())?;
        self.wait_until_sent(self.control_timeout)
    }

    /// Blocks until the outbox is empty, at most about `timeout`. For a
    /// worker about to exit (what is still queued would be lost with it)
    /// and for control records.
    pub fn wait_until_sent(&self, timeout: Duration) -> SysResult<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let backlog = self.flush()?;
            if backlog == Backlog::Empty {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SysError { syscall: "sendmsg", errno: Errno::ETIMEDOUT });
            }
            if backlog == Backlog::Pause {
                std::thread::sleep(left.min(PRESSURE_PAUSE));
            } else {
                let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                self.wait_for(PollFlags::POLLOUT, PollTimeout::from(ms))?;
            }
        }
    }

    /// Queues a message (its descriptors go with its first byte) after
    /// whatever waits, and sends what it can without blocking.
    fn post(&self, bytes: Vec<u8>, fds: Vec<OwnedFd>) -> SysResult<Backlog> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(SysError { syscall: "sendmsg", errno: Errno::EPIPE });
        }
        let mut outbox = self.outbox.lock().unwrap();
        outbox.messages.push_back((bytes, fds));
        self.send_queued(&mut outbox)
    }

    /// Sends what waits in the outbox, in order, without blocking; says what
    /// to wait for before calling again. An error means the primary is gone.
    pub fn flush(&self) -> SysResult<Backlog> {
        let mut outbox = self.outbox.lock().unwrap();
        self.send_queued(&mut outbox)
    }

    /// What the outbox waits for now (see `flush`).
    pub fn backlog(&self) -> Backlog {
        let outbox = self.outbox.lock().unwrap();
        match (outbox.messages.is_empty(), outbox.pressure) {
            (true, _) => Backlog::Empty,
            (false, false) => Backlog::Writable,
            (false, true) => Backlog::Pause,
        }
    }

    fn send_queued(&self, outbox: &mut Outbox) -> SysResult<Backlog> {
        outbox.pressure = false;
        while let Some((bytes, fds)) = outbox.messages.front_mut() {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            match wire::send(self.fd.as_raw_fd(), bytes, &raw) {
                Ok(n) if n == bytes.len() => drop(outbox.messages.pop_front()),
                Ok(n) => {
                    // The descriptors went with the first bytes: the rest
                    // follows alone. Closing our copies is safe now.
                    bytes.drain(..n);
                    fds.clear();
                }
                Err(e) => match sys::send_failure(e.errno) {
                    SendFailure::Again => {}
                    SendFailure::Full => return Ok(Backlog::Writable),
                    SendFailure::Pressure => {
                        outbox.pressure = true;
                        return Ok(Backlog::Pause);
                    }
                    SendFailure::Broken => {
                        self.broken.store(true, Ordering::Relaxed);
                        outbox.messages.clear();
                        return Err(e);
                    }
                },
            }
        }
        Ok(Backlog::Empty)
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

    /// Reads everything the primary's end gets from now on, until the
    /// worker's end closes: the bytes, and the descriptors that came.
    fn read_to_end(primary_end: OwnedFd) -> std::thread::JoinHandle<(Vec<u8>, Vec<OwnedFd>)> {
        std::thread::spawn(move || {
            sys::set_nonblocking(primary_end.as_fd(), false).unwrap();
            let mut buf = [0u8; 65536];
            let (mut bytes, mut fds) = (Vec::new(), Vec::new());
            loop {
                let r = wire::recv(primary_end.as_raw_fd(), &mut buf, &mut fds).unwrap();
                if r.bytes == 0 {
                    return (bytes, fds);
                }
                bytes.extend_from_slice(&buf[..r.bytes]);
            }
        })
    }

    /// Flushes as the worker's event loop does: again each time the channel is writable.
    fn flush_until_empty(channel: &WorkerChannel) {
        while channel.flush().unwrap() != Backlog::Empty {
            assert!(channel.wait_for(PollFlags::POLLOUT, PollTimeout::from(5000u16)).unwrap());
        }
    }

    #[test]
    fn acks_that_find_no_room_wait_in_order_without_holding_up_the_worker() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        sys::set_nonblocking(primary_end.as_fd(), true).unwrap();
        let channel = WorkerChannel::new(worker_end).unwrap();
        // More records than the socket holds, with nobody reading them: the
        // call returns at once, and what did not fit waits.
        let bytes = many_records();
        assert_eq!(channel.post(bytes.clone(), Vec::new()).unwrap(), Backlog::Writable);
        assert_eq!(channel.backlog(), Backlog::Writable);
        let sent = read_all_now(&primary_end);
        assert!(sent > 0 && sent < bytes.len(), "{sent} of {}", bytes.len());
        // More comes after it, whole and in order, once the primary reads.
        channel.settle(&[], &[]).unwrap();
        let mut more = Vec::new();
        Record::Gone { listener: 7 }.encode(&mut more);
        assert_eq!(channel.post(more.clone(), Vec::new()).unwrap(), Backlog::Writable);
        let reader = read_to_end(primary_end);
        flush_until_empty(&channel);
        assert_eq!(channel.backlog(), Backlog::Empty);
        drop(channel);
        let (rest, _) = reader.join().unwrap();
        let mut expected = bytes[sent..].to_vec();
        expected.extend_from_slice(&more);
        assert!(rest == expected, "{} bytes arrived, {} expected", rest.len(), expected.len());
    }

    #[test]
    fn a_returned_connection_that_finds_no_room_stays_open_until_sent() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        let channel = WorkerChannel::new(worker_end).unwrap();
        assert_eq!(channel.post(many_records(), Vec::new()).unwrap(), Backlog::Writable);
        // A connection this worker accepted itself and declines.
        let (conn, _peer) = sys::stream_pair().unwrap();
        let inode = nix::sys::stat::fstat(&conn).unwrap().st_ino;
        let mut batch = Vec::new();
        channel.adopt(3, vec![conn], &mut batch);
        channel.settle(&[], &[batch[1]]).unwrap();
        assert_eq!(channel.backlog(), Backlog::Writable);
        let reader = read_to_end(primary_end);
        flush_until_empty(&channel);
        drop(channel);
        let (bytes, fds) = reader.join().unwrap();
        let mut decoder = Decoder::default();
        decoder.push(&bytes, fds, false);
        let mut incoming = Vec::new();
        decoder.drain(&mut incoming);
        let returned: Vec<_> = incoming
            .into_iter()
            .filter_map(|Incoming { record, fds }| match (record, fds) {
                (Record::Return { listener }, Some(fds)) => Some((listener, fds)),
                _ => None,
            })
            .collect();
        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].0, 3);
        assert_eq!(nix::sys::stat::fstat(&returned[0].1[0]).unwrap().st_ino, inode);
    }

    #[test]
    fn a_control_record_waits_for_room_and_then_goes_on() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        let channel = WorkerChannel::new(worker_end).unwrap();
        let bytes = many_records();
        let total = bytes.len();
        assert_eq!(channel.post(bytes, Vec::new()).unwrap(), Backlog::Writable);
        let reader = read_to_end(primary_end);
        // Sent, with what waited before it, by the time it returns.
        channel.gone(1).unwrap();
        assert_eq!(channel.backlog(), Backlog::Empty);
        drop(channel);
        assert_eq!(reader.join().unwrap().0.len(), total + RECORD_LEN);
    }

    #[test]
    fn a_control_record_nobody_reads_stays_queued_after_the_timeout() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        sys::set_nonblocking(primary_end.as_fd(), true).unwrap();
        let mut channel = WorkerChannel::new(worker_end).unwrap();
        channel.control_timeout = Duration::from_millis(20);
        let bytes = many_records();
        channel.post(bytes.clone(), Vec::new()).unwrap();
        assert_eq!(channel.gone(1).unwrap_err().errno, Errno::ETIMEDOUT);
        let sent = read_all_now(&primary_end);
        let reader = read_to_end(primary_end);
        flush_until_empty(&channel);
        drop(channel);
        assert_eq!(sent + reader.join().unwrap().0.len(), bytes.len() + RECORD_LEN);
    }

    #[test]
    fn once_the_primary_is_gone_nothing_more_is_written() {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        let channel = WorkerChannel::new(worker_end).unwrap();
        drop(primary_end);
        let (conn, _peer) = sys::stream_pair().unwrap();
        let mut batch = Vec::new();
        channel.adopt(3, vec![conn], &mut batch);
        assert_eq!(channel.settle(&[], &[batch[1]]).unwrap_err().errno, Errno::EPIPE);
        assert_eq!(channel.backlog(), Backlog::Empty);
        assert_eq!(channel.gone(1).unwrap_err().errno, Errno::EPIPE);
    }
}
