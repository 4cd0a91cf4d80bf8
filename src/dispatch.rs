//! The primary's dispatcher: one thread that accepts connections on every
//! round-robin listener and hands them to workers over their channels.
//!
//! Invariants:
//! - A connection is held (its fd stays open here) from `accept` until a worker
//!   acks it as accepted. A decline, or the death of the worker's channel, puts
//!   it back in its listener's queue for another worker: nothing is lost.
//!   Pressure on a channel (the kernel short of buffers, or of room for
//!   descriptors in flight) puts back what was assigned to its worker and not
//!   yet written, too, but it is no decline: the channel only pauses (see
//!   `flush_channel`), and the worker keeps its place and may be given the
//!   connection later.
//! - What is partly written on a channel goes out before anything else, and a
//!   lease goes out whole before any connection, whatever a send met.
//! - A worker never holds more than `window` unacknowledged connections, so a
//!   stuck worker cannot swallow connections; the rest wait in the kernel's
//!   backlog, which is where they are cheapest.
//! - A connection that every attached worker declined (all are at
//!   `maxConnections`) waits for room, as under node:cluster's round-robin,
//!   and is not closed: see `Listener::full`.
//!
//! Under the ledger (Linux; `Balance::Ledger`) the thread accepts nothing: a
//! worker that joins (`Command::Join`, as the primary answers its query)
//! gets a `Lease` (the listening socket and the listener's ledger, see
//! `ledger`) and accepts on its own. The thread then only keeps the ledger's
//! slots and hands on the connections a worker returns, by the rules above.
//!
//! JavaScript talks to the thread through commands and a wake-up socket only.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::sockets::Listening;
use crate::sys::{self, AcceptFailure, SendFailure, SysResult};
use crate::wire::{self, Decoder, Incoming, Record, MAX_FDS_PER_MSG, RECORD_LEN};
use crate::worker_channel::DIRECT;

/// Default number of connections a worker may hold unacknowledged. Large
/// enough that a busy worker rarely drains its window and sits idle for the
/// ack → dispatch round trip (4 cost ~10% of throughput under
/// `Connection: close`, and fairness, since a full worker is passed over);
/// small enough that a stuck worker holds few connections.
pub const DEFAULT_WINDOW: usize = 8;

/// How far behind the others a worker may fall and still be owed the
/// difference, in windows (see `Listener::offer`).
const CATCH_UP_WINDOWS: u64 = 16;

/// How often one of the connections that every worker declined is offered
/// again while they wait for room (`Listener::full`). node:cluster's primary
/// offers such a connection around again at once, message after message,
/// for as long as every worker is full; one offer per listener every 2 ms
/// finds the room as well. A worker that takes one is offered the next at
/// once, and so on, while it has room.
const ROOM_RETRY: Duration = Duration::from_millis(2);

/// How long to stop accepting after running out of descriptors (EMFILE and
/// kin) when no acknowledgement frees one first.
const STARVED_WAIT: Duration = Duration::from_millis(100);

/// How long a channel under pressure pauses (`Channel::pause_for_pressure`):
/// the first time, and at most. Pressure passes when the kernel frees memory
/// or the workers take in the descriptors in flight, which it does not
/// announce (the channel may be writable all along), so the only way to know
/// is to try again. The first pause is short, so a passing shortage costs a
/// worker little; each one in a row doubles, so one that lasts costs few
/// futile sends; and the cap brings the worker back within a second once it
/// passes.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Who accepts the connections of a round-robin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// This thread accepts and hands each connection to a worker.
    Dispatch,
    /// Workers accept themselves, kept fair by a shared ledger (Linux only).
    Ledger,
}

pub enum Command {
    /// The primary's end of a new worker's channel.
    AddChannel {
        id: u32,
        fd: OwnedFd,
    },
    /// The worker is disconnecting: send it nothing more, keep reading its acks.
    RetireChannel {
        id: u32,
    },
    /// The worker is gone: give whatever it held to other workers.
    RemoveChannel {
        id: u32,
    },
    /// Under the ledger: the worker on `channel` is to accept on `listener`;
    /// its lease goes out now, while the primary answers its query, instead
    /// of when its `Ready` comes (a round trip later).
    Join {
        listener: u32,
        channel: u32,
    },
    AddListener {
        id: u32,
        listening: Listening,
        ledger: Option<ledger_share::ListenerLedger>,
    },
    /// No worker listens any more: close the socket and what waits on it.
    /// `done` hears once it is closed, so the port can be bound again at once.
    CloseListener {
        id: u32,
        done: Option<mpsc::SyncSender<()>>,
    },
    Stats {
        reply: mpsc::SyncSender<Vec<ChannelStats>>,
    },
    /// The next sends on channel `id` fail with these, one each (tests only).
    #[cfg(test)]
    FailSends {
        id: u32,
        errnos: Vec<Errno>,
    },
    /// Another `ROOM_RETRY` (tests only).
    #[cfg(test)]
    RoomRetry(Duration),
}

/// Per-worker counters, for tests and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub id: u32,
    pub handed: u64,
    pub accepted: u64,
    pub declined: u64,
    /// Times a send met pressure and the channel paused.
    pub pauses: u64,
    pub held: u32,
    /// Listeners this worker is attached to.
    pub attached: u32,
}

pub struct Dispatcher {
    balance: Balance,
    commands: Option<mpsc::Sender<Command>>,
    wake: OwnedFd,
    next_id: AtomicU32,
    thread: Option<JoinHandle<()>>,
}

impl Dispatcher {
    pub fn start(window: usize, balance: Balance) -> SysResult<Dispatcher> {
        Dispatcher::start_with(window, balance, crate::ledger::QUIET, 0)
    }

    /// As `start`, with another length of quiet after which offers start
    /// level again (`Listener::level`), and the first sequence number.
    fn start_with(window: usize, balance: Balance, quiet: Duration, first_seq: u32) -> SysResult<Dispatcher> {
        let (wake, wake_rx) = sys::stream_pair()?;
        sys::set_nonblocking(wake.as_fd(), true)?;
        sys::set_nonblocking(wake_rx.as_fd(), true)?;
        let (tx, rx) = mpsc::channel();
        let mut state = Loop::new(wake_rx, rx, window, quiet, first_seq);
        let thread = std::thread::Builder::new()
            .name("cluster-rs-dispatch".into())
            .spawn(move || state.run())
            .map_err(|e| sys::SysError {
                syscall: "pthread_create",
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })?;
        Ok(Dispatcher { commands: Some(tx), wake, next_id: AtomicU32::new(1), thread: Some(thread), balance })
    }

    /// A fresh id for a listener or a channel.
    pub fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn send(&self, command: Command) {
        if self.enqueue(command) {
            self.wake_up();
        }
    }

    /// Queues `command` without waking the thread: it runs, after what was
    /// queued before it, by the next wake-up (`wake_up`, or any `send`), or
    /// sooner if the thread is taking commands just then. False when the
    /// thread is gone.
    pub fn enqueue(&self, command: Command) -> bool {
        self.commands.as_ref().is_some_and(|tx| tx.send(command).is_ok())
    }

    /// Adds a listener; true when its workers will accept themselves (the
    /// ledger). Only TCP listeners have a ledger: a Unix socket cannot tell
    /// how many connections wait, which strict turns need.
    pub fn add_listener(&self, id: u32, listening: Listening, tcp: bool) -> bool {
        // Without a ledger (off Linux, or out of memory or descriptors) this
        // thread accepts, as under Dispatch.
        let ledger = match self.balance {
            Balance::Ledger if tcp => ledger_share::ListenerLedger::create().ok(),
            _ => None,
        };
        let leased = ledger.is_some();
        self.send(Command::AddListener { id, listening, ledger });
        leased
    }

    /// Closes a listener and returns once the socket is closed.
    pub fn close_listener(&self, id: u32) {
        let (done, closed) = mpsc::sync_channel(1);
        self.send(Command::CloseListener { id, done: Some(done) });
        let _ = closed.recv();
    }

    pub fn stats(&self) -> Vec<ChannelStats> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Command::Stats { reply });
        answer.recv().unwrap_or_default()
    }

    pub fn wake_up(&self) {
        // A full wake-up socket already means "wake up": EAGAIN is fine.
        let _ = nix::unistd::write(self.wake.as_fd(), &[1]);
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.commands = None;
        self.wake_up();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Conn {
    fd: OwnedFd,
    listener: u32,
    /// Workers that declined this connection; it is not offered to them again.
    declined_by: Vec<u32>,
}

struct Listener {
    socket: Listening,
    /// Channels attached to this listener, in round-robin order.
    members: Vec<u32>,
    /// How many connections each member has been offered, by position in
    /// `members`. The next connection goes to the member with room that was
    /// offered the fewest, the round-robin order breaking ties: a worker
    /// skipped while its window was full catches up once it has room again.
    /// The debt is bounded (`offer`) and forgotten after a quiet spell
    /// (`level`).
    offered: Vec<u64>,
    cursor: usize,
    /// When this thread last accepted on the listener.
    last_accept: Option<Instant>,
    /// Accepted connections that no worker could take yet.
    pending: VecDeque<Conn>,
    /// Connections that every member declined, oldest first: they wait for
    /// a worker to have room. One goes back to `pending` at `retry_at`, one
    /// more each time a worker takes one, and all when a worker joins.
    full: VecDeque<Conn>,
    retry_at: Option<Instant>,
    /// Under the ledger: workers accept themselves.
    ledger: Option<ledger_share::ListenerLedger>,
}

impl Listener {
    /// A worker joins level with the least-served member, so it shares the
    /// next connections with the others rather than taking all of them.
    fn attach(&mut self, channel: u32) {
        if !self.members.contains(&channel) {
            self.offered.push(self.offered.iter().copied().min().unwrap_or(0));
            self.members.push(channel);
        }
    }

    /// Records that the member at `index` was offered a connection. A member
    /// further behind the most-offered one than `limit` is brought up to that
    /// distance: a burst of skips is made up, but a worker that was stuck for
    /// a long time does not, once back, keep the others idle until it has
    /// made up all of it.
    fn offer(&mut self, index: usize, limit: u64) {
        self.offered[index] += 1;
        self.bring_within(limit);
        self.cursor = (index + 1) % self.members.len();
    }

    /// After a quiet spell: a member more than one behind the most-offered
    /// is brought to one behind, so that what the last busy spell left
    /// uneven is not made up with the next connections (a keep-alive pool,
    /// WebSockets), and the order of turns is kept.
    fn level(&mut self) {
        self.bring_within(1);
    }

    /// Brings every member more than `limit` behind the most-offered one
    /// up to that distance.
    fn bring_within(&mut self, limit: u64) {
        let floor = self.offered.iter().copied().max().unwrap_or(0).saturating_sub(limit);
        for o in &mut self.offered {
            *o = (*o).max(floor);
        }
    }

    /// Whether workers accept on this listener themselves (the ledger).
    fn leased(&self) -> bool {
        self.ledger.is_some()
    }

    /// `channel`'s worker has exited (and was detached when its channel
    /// went): what its ledger slot still held goes.
    fn forget(&mut self, channel: u32) {
        if let Some(ledger) = self.ledger.as_mut() {
            ledger.forget(channel);
        }
    }

    /// Under the ledger: a slot for `channel` and the lease that tells it so.
    fn lease(&mut self, listener: u32, channel: u32) -> Option<(Record, Vec<OwnedFd>)> {
        self.ledger.as_mut()?.lease(listener, channel, &self.socket.fd)
    }

    /// A connection offered to `channel` was not handed after all (its
    /// channel paused): it does not count as offered, so the worker is owed
    /// it as if it had been passed over while full.
    fn unoffer(&mut self, channel: u32) {
        if let Some(i) = self.members.iter().position(|&c| c == channel) {
            self.offered[i] = self.offered[i].saturating_sub(1);
        }
    }

    /// A worker has room now: `Some(taker)`, which just took a connection,
    /// is offered the oldest connection waiting for room, and the next when
    /// it takes that one (the others that declined it are still full, as far
    /// as we know); `None`, a worker that joined, is offered all of them.
    fn room_found(&mut self, taker: Option<u32>) {
        let Some(taker) = taker else {
            while let Some(conn) = self.full.pop_back() {
                self.pending.push_front(conn);
            }
            self.retry_at = None;
            return;
        };
        if let Some(mut conn) = self.full.pop_front() {
            conn.declined_by.retain(|&c| c != taker);
            self.pending.push_front(conn);
        }
    }

    /// Offers the oldest connection waiting for room again once its time
    /// has come; the others wait for its answer.
    fn retry_full(&mut self, now: Instant, period: Duration) {
        if self.retry_at.is_some_and(|t| t <= now) {
            if let Some(mut conn) = self.full.pop_front() {
                // Offered to every worker again: one may have room by now.
                conn.declined_by.clear();
                self.pending.push_front(conn);
            }
            self.retry_at = (!self.full.is_empty()).then(|| now + period);
        }
    }

    /// Every member declined `conn`: it waits for room, behind the others
    /// (as under node:cluster, where it goes to the back of the queue).
    fn wait_for_room(&mut self, conn: Conn, now: Instant, period: Duration) {
        self.full.push_back(conn);
        self.retry_at.get_or_insert(now + period);
    }

    /// `channel` no longer takes connections here (see also `forget`).
    fn detach(&mut self, channel: u32) {
        if let Some(ledger) = self.ledger.as_mut() {
            ledger.release(channel);
        }
        if let Some(i) = self.members.iter().position(|&c| c == channel) {
            self.members.remove(i);
            self.offered.remove(i);
            if i < self.cursor {
                self.cursor -= 1;
            }
            if self.cursor >= self.members.len() {
                self.cursor = 0;
            }
        }
    }
}

struct Channel {
    fd: OwnedFd,
    /// Leases to send before any connection: the record and its descriptors.
    leases: Vec<(Record, Vec<OwnedFd>)>,
    /// Every connection handed to this worker and not yet acked, by sequence.
    held: HashMap<u32, Conn>,
    /// Sequences assigned to this worker but not yet written.
    queued: Vec<u32>,
    /// Bytes left over from a short write; they go out before anything new.
    tail: Vec<u8>,
    decoder: Decoder,
    retired: bool,
    broken: bool,
    /// Under pressure: nothing is written, and no connection assigned, until
    /// this time; what the worker writes is still read.
    paused_until: Option<Instant>,
    /// The last pause; zero once a send succeeds.
    pause: Duration,
    stats: ChannelStats,
    /// Failures the next sends meet instead of sending, one each (tests only).
    #[cfg(test)]
    faults: std::cell::RefCell<VecDeque<Errno>>,
}

impl Channel {
    fn new(id: u32, fd: OwnedFd) -> Channel {
        Channel {
            fd,
            leases: Vec::new(),
            held: HashMap::new(),
            queued: Vec::new(),
            tail: Vec::new(),
            decoder: Decoder::default(),
            retired: false,
            broken: false,
            paused_until: None,
            pause: Duration::ZERO,
            stats: ChannelStats { id, ..Default::default() },
            #[cfg(test)]
            faults: Default::default(),
        }
    }

    /// Whether connections may be assigned to this worker (room aside).
    fn takes_connections(&self) -> bool {
        !self.retired && !self.broken && self.paused_until.is_none()
    }

    /// Whether there is something to write once the channel is writable.
    fn has_output(&self) -> bool {
        !self.tail.is_empty() || !self.queued.is_empty() || !self.leases.is_empty()
    }

    /// `wire::send` on the channel (in tests, the next fault queued instead).
    fn send(&self, bytes: &[u8], fds: &[RawFd]) -> SysResult<usize> {
        #[cfg(test)]
        if let Some(errno) = self.faults.borrow_mut().pop_front() {
            return Err(sys::SysError { syscall: "sendmsg", errno });
        }
        wire::send(self.fd.as_raw_fd(), bytes, fds)
    }

    /// A send went out: pressure, if there was any, has passed.
    fn sent(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// What a failed send means for the channel; true to send again at once.
    fn failed(&mut self, errno: Errno) -> bool {
        match sys::send_failure(errno) {
            SendFailure::Again => return true,
            // `wait` asks for POLLOUT while something is left to write.
            SendFailure::Full => {}
            SendFailure::Pressure => self.pause_for_pressure(),
            SendFailure::Broken => self.broken = true,
        }
        false
    }

    /// Stops writing for a while (see `FIRST_PAUSE`): 10 ms, doubling with
    /// each pause in a row, up to a second.
    fn pause_for_pressure(&mut self) {
        self.pause = (self.pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
        self.paused_until = Some(Instant::now() + self.pause);
        self.stats.pauses += 1;
    }
}

#[derive(Clone, Copy)]
enum Token {
    Wake,
    Listener(u32),
    Channel(u32),
}

struct Loop {
    wake: OwnedFd,
    commands: mpsc::Receiver<Command>,
    window: usize,
    quiet: Duration,
    /// `ROOM_RETRY`, but for tests.
    room_retry: Duration,
    listeners: HashMap<u32, Listener>,
    channels: HashMap<u32, Channel>,
    /// The next connection's sequence number: 31 bits, wrapping to 0, since
    /// a worker takes one with `DIRECT` set for a connection it accepted.
    next_seq: u32,
    /// Out of descriptors (EMFILE and kin): no accepting until then, or
    /// until an acknowledgement frees one.
    starved_until: Option<Instant>,
}

impl Loop {
    fn new(wake: OwnedFd, commands: mpsc::Receiver<Command>, window: usize, quiet: Duration, first_seq: u32) -> Loop {
        Loop {
            wake,
            commands,
            window: window.max(1),
            quiet,
            room_retry: ROOM_RETRY,
            listeners: HashMap::new(),
            channels: HashMap::new(),
            next_seq: first_seq & !DIRECT,
            starved_until: None,
        }
    }

    fn run(&mut self) {
        loop {
            let ready = match self.wait() {
                Ok(ready) => ready,
                Err(_) => continue,
            };
            for (token, events) in ready {
                match token {
                    Token::Wake => {
                        if !self.take_commands() {
                            return;
                        }
                    }
                    Token::Listener(id) => self.accept_from(id),
                    Token::Channel(id) => {
                        if events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                            self.read_channel(id);
                        }
                    }
                }
            }
            self.hand_out();
        }
    }

    /// Assigns what waits and writes it to the workers.
    fn hand_out(&mut self) {
        // A channel that pauses gives back what was assigned to it, and a
        // broken one what its worker held: the others take it now, not at
        // the next wake-up, which may be far off. Each round that gives
        // some back has paused or removed another channel, so this ends.
        loop {
            self.dispatch();
            let paused = self.flush();
            if !self.drop_broken_channels() && !paused {
                break;
            }
        }
    }

    fn has_room(&self, channel: u32) -> bool {
        self.channels.get(&channel).is_some_and(|c| c.takes_connections() && c.held.len() < self.window)
    }

    fn room(&self, listener: &Listener) -> usize {
        listener
            .members
            .iter()
            .filter_map(|id| self.channels.get(id))
            .filter(|c| c.takes_connections())
            .map(|c| self.window.saturating_sub(c.held.len()))
            .sum()
    }

    fn wait(&mut self) -> Result<Vec<(Token, PollFlags)>, Errno> {
        let mut tokens = vec![Token::Wake];
        let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        if self.starved_until.is_none() {
            for (&id, l) in &self.listeners {
                // After `dispatch`, what still waits with room left is for
                // busy workers only: accepting more is for the others.
                if self.room(l) > 0 && !l.leased() {
                    tokens.push(Token::Listener(id));
                    fds.push(PollFd::new(l.socket.fd.as_fd(), PollFlags::POLLIN));
                }
            }
        }
        for (&id, c) in &self.channels {
            // A paused channel is writable all along: asking would only spin.
            // Its acks are read all the same.
            let mut events = PollFlags::POLLIN;
            if c.paused_until.is_none() && c.has_output() {
                events |= PollFlags::POLLOUT;
            }
            tokens.push(Token::Channel(id));
            fds.push(PollFd::new(c.fd.as_fd(), events));
        }
        // Until the first of the times something is due: the end of a wait
        // for descriptors or of a pause, a retry for room.
        let now = Instant::now();
        let due = self
            .channels
            .values()
            .filter_map(|c| c.paused_until)
            .chain(self.listeners.values().filter_map(|l| l.retry_at))
            .chain(self.starved_until)
            .min()
            .map(|t| t.saturating_duration_since(now));
        // In whole milliseconds, rounded up: rounded down, the wait for a
        // pause that ends in less than one would spin until it ends.
        let timeout = match due {
            Some(wait) => PollTimeout::from(wait.as_nanos().div_ceil(1_000_000).min(u16::MAX as u128) as u16),
            None => PollTimeout::NONE,
        };
        nix::poll::poll(&mut fds, timeout)?;
        let ready = tokens
            .into_iter()
            .zip(fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())))
            .filter(|(_, ev)| !ev.is_empty())
            .collect();
        self.resume(Instant::now());
        Ok(ready)
    }

    /// Ends the pauses (and the wait for descriptors) that are over by `now`.
    fn resume(&mut self, now: Instant) {
        if self.starved_until.is_some_and(|t| t <= now) {
            self.starved_until = None;
        }
        for c in self.channels.values_mut() {
            if c.paused_until.is_some_and(|t| t <= now) {
                c.paused_until = None;
            }
        }
    }

    /// Applies queued commands. False when the dispatcher was dropped.
    fn take_commands(&mut self) -> bool {
        let mut sink = [0u8; 64];
        while matches!(nix::unistd::read(self.wake.as_fd(), &mut sink), Ok(n) if n > 0) {}
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.apply(command),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::AddChannel { id, fd } => {
                if sys::set_nonblocking(fd.as_fd(), true).is_ok() {
                    self.channels.insert(id, Channel::new(id, fd));
                }
            }
            Command::RetireChannel { id } => {
                if let Some(c) = self.channels.get_mut(&id) {
                    c.retired = true;
                    c.leases.clear();
                }
                self.listeners.values_mut().for_each(|l| l.detach(id));
            }
            Command::RemoveChannel { id } => {
                self.remove_channel(id);
                // Also when a broken channel was removed before: the worker
                // may have run until now.
                self.listeners.values_mut().for_each(|l| l.forget(id));
            }
            Command::AddListener { id, listening, ledger } => {
                self.listeners.insert(
                    id,
                    Listener {
                        socket: listening,
                        members: Vec::new(),
                        offered: Vec::new(),
                        cursor: 0,
                        last_accept: None,
                        pending: VecDeque::new(),
                        full: VecDeque::new(),
                        retry_at: None,
                        ledger,
                    },
                );
            }
            Command::CloseListener { id, done } => {
                if let Some(l) = self.listeners.remove(&id) {
                    if l.leased() && l.socket.adopted.is_none() {
                        // Workers hold the same socket and may not have closed
                        // theirs yet; shutting it down stops it listening for
                        // all of them, so the port is free once this returns.
                        // (Not a socket the application passed by number: see
                        // `sockets::Adopted`.)
                        let _ = nix::sys::socket::shutdown(l.socket.fd.as_raw_fd(), nix::sys::socket::Shutdown::Read);
                    }
                }
                self.starved_until = None;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Join { listener, channel } => {
                // Whatever the worker wrote before it asked to listen (over
                // IPC) comes first: a `Gone` for the server it closed, which
                // would otherwise take back the slot this join is given.
                self.read_channel(channel);
                self.join(channel, listener);
            }
            Command::Stats { reply } => {
                let mut all: Vec<ChannelStats> = self
                    .channels
                    .values()
                    .map(|c| ChannelStats {
                        held: c.held.len() as u32,
                        attached: self.listeners.values().filter(|l| l.members.contains(&c.stats.id)).count() as u32,
                        ..c.stats
                    })
                    .collect();
                all.sort_by_key(|s| s.id);
                let _ = reply.send(all);
            }
            #[cfg(test)]
            Command::RoomRetry(period) => self.room_retry = period,
            #[cfg(test)]
            Command::FailSends { id, errnos } => {
                if let Some(c) = self.channels.get_mut(&id) {
                    c.faults.get_mut().extend(errnos);
                }
            }
        }
    }

    fn accept_from(&mut self, id: u32) {
        let Some(l) = self.listeners.get(&id) else { return };
        let budget = self.room(l);
        let quiet = self.quiet;
        let l = self.listeners.get_mut(&id).unwrap();
        let now = Instant::now();
        for _ in 0..budget {
            match sys::accept(l.socket.fd.as_fd()) {
                Ok(fd) => {
                    if l.pending.is_empty() && l.last_accept.is_none_or(|t| now.duration_since(t) >= quiet) {
                        l.level();
                    }
                    l.last_accept = Some(now);
                    l.pending.push_back(Conn { fd, listener: id, declined_by: Vec::new() });
                }
                Err(e) => match sys::accept_failure(e.errno) {
                    AcceptFailure::Skip => continue,
                    AcceptFailure::Starved => {
                        self.starved_until = Some(Instant::now() + STARVED_WAIT);
                        break;
                    }
                    AcceptFailure::Done => break,
                },
            }
        }
    }

    /// Assigns waiting connections to workers with room: round-robin, except
    /// that a worker passed over while its window was full is preferred until
    /// it has been offered as many as the others. A connection every attached
    /// worker has declined waits for room (`Listener::full`).
    fn dispatch(&mut self) {
        let now = Instant::now();
        let period = self.room_retry;
        self.listeners.values_mut().for_each(|l| l.retry_full(now, period));
        let ids: Vec<u32> = self.listeners.iter().filter(|(_, l)| !l.pending.is_empty()).map(|(&id, _)| id).collect();
        let limit = self.window as u64 * CATCH_UP_WINDOWS;
        for id in ids {
            // In order, but past a connection that only busy workers may
            // take (the others declined it): it waits, the rest go on.
            let mut at = 0;
            loop {
                let l = self.listeners.get(&id).unwrap();
                let Some(conn) = l.pending.get(at) else { break };
                let n = l.members.len();
                if n > 0 && l.members.iter().all(|m| conn.declined_by.contains(m)) {
                    let l = self.listeners.get_mut(&id).unwrap();
                    let conn = l.pending.remove(at).unwrap();
                    l.wait_for_room(conn, now, period);
                    continue;
                }
                let pick = (0..n)
                    .map(|k| (l.cursor + k) % n)
                    .filter(|&i| !conn.declined_by.contains(&l.members[i]) && self.has_room(l.members[i]))
                    .min_by_key(|&i| l.offered[i]); // the first of equals: round-robin
                let Some(index) = pick else {
                    if self.room(l) == 0 {
                        break;
                    }
                    at += 1;
                    continue;
                };
                let l = self.listeners.get_mut(&id).unwrap();
                let channel_id = l.members[index];
                l.offer(index, limit);
                let conn = l.pending.remove(at).unwrap();
                let seq = self.next_seq;
                self.next_seq = self.next_seq.wrapping_add(1) & !DIRECT;
                let c = self.channels.get_mut(&channel_id).unwrap();
                c.held.insert(seq, conn);
                c.queued.push(seq);
            }
        }
    }

    /// Writes what waits on every channel. A channel that paused gives back
    /// the connections assigned to it and not yet written, to the head of
    /// their queues in their order; true when it gave back any.
    fn flush(&mut self) -> bool {
        let mut unsent = Vec::new();
        for (&id, c) in &mut self.channels {
            flush_channel(c);
            // Only one that paused just now has any queued: `dispatch`
            // assigns nothing to a paused channel.
            if c.paused_until.is_some() {
                // A forged ack may have settled one already (see `flush_channel`).
                unsent.extend(c.queued.drain(..).filter_map(|seq| c.held.remove(&seq)).map(|conn| (id, conn)));
            }
        }
        let gave_back = !unsent.is_empty();
        // Last first, as each goes to the head of its queue.
        for (id, conn) in unsent.into_iter().rev() {
            if let Some(l) = self.listeners.get_mut(&conn.listener) {
                l.unoffer(id);
            }
            // Not declined: the worker may take it once its pause is over.
            self.requeue(conn);
        }
        gave_back
    }

    fn read_channel(&mut self, id: u32) {
        let Some(c) = self.channels.get_mut(&id) else { return };
        let mut buf = [0u8; RECORD_LEN * 64];
        loop {
            let mut fds = Vec::new();
            match wire::recv(c.fd.as_raw_fd(), &mut buf, &mut fds) {
                Ok(r) if r.bytes == 0 => {
                    c.broken = true;
                    break;
                }
                // Only `Return` records carry descriptors here; any other record's are closed with it.
                Ok(r) => {
                    c.decoder.push(&buf[..r.bytes], fds, r.truncated);
                    // Poll is level-triggered: a further read of an emptied
                    // socket would only return EAGAIN. (The last read of a
                    // dead worker's channel goes on to the end all the same.)
                    if r.emptied(buf.len()) {
                        break;
                    }
                }
                Err(e) if sys::would_block(e.errno) => break,
                Err(e) if e.errno == Errno::EINTR => continue,
                Err(_) => {
                    c.broken = true;
                    break;
                }
            }
        }
        let mut incoming = Vec::new();
        c.decoder.drain(&mut incoming);
        for Incoming { record, fds } in incoming {
            match (record, fds) {
                (Record::Return { listener }, Some(mut fds)) => {
                    let fd = fds.pop().unwrap();
                    self.returned(id, listener, fd);
                }
                (record, _) => self.on_record(id, record),
            }
        }
    }

    fn on_record(&mut self, id: u32, record: Record) {
        let Some(c) = self.channels.get_mut(&id) else { return };
        match record {
            Record::Ack { seq, accepted: true } => {
                if let Some(conn) = c.held.remove(&seq) {
                    c.stats.accepted += 1;
                    self.starved_until = None;
                    if let Some(l) = self.listeners.get_mut(&conn.listener) {
                        l.room_found(Some(id));
                    }
                }
            }
            Record::Ack { seq, accepted: false } => {
                if let Some(mut conn) = c.held.remove(&seq) {
                    c.stats.declined += 1;
                    // A worker that is leaving declines everything it still
                    // held; that says nothing about its room, so only a
                    // member's decline is remembered.
                    let member = self.listeners.get(&conn.listener).is_some_and(|l| l.members.contains(&id));
                    if member {
                        conn.declined_by.push(id);
                    }
                    self.requeue(conn);
                }
            }
            Record::Ready { listener } => self.join(id, listener),
            Record::Gone { listener } => {
                if let Some(l) = self.listeners.get_mut(&listener) {
                    l.detach(id);
                }
            }
            Record::Return { .. } => {} // comes with its descriptor, see read_channel
            Record::Conn { .. } | Record::Lease { .. } | Record::NoLease { .. } => {}
        }
    }

    /// `channel`'s worker serves `listener` from now on; under the ledger it
    /// is also sent its lease.
    fn join(&mut self, channel: u32, listener: u32) {
        let Some(c) = self.channels.get_mut(&channel) else { return };
        if c.retired || c.broken {
            return;
        }
        if let Some(l) = self.listeners.get_mut(&listener) {
            l.attach(channel);
            l.room_found(None);
            if l.leased() {
                // Without a slot or descriptors for it, the worker
                // still hears, and still gets what others return.
                let lease = l.lease(listener, channel);
                c.leases.push(lease.unwrap_or((Record::NoLease { listener }, Vec::new())));
            }
        }
    }

    /// A connection a worker accepted itself but declined: for another worker.
    fn returned(&mut self, id: u32, listener: u32, fd: OwnedFd) {
        let leased = self.listeners.get(&listener).is_some_and(|l| l.leased());
        if let Some(c) = self.channels.get_mut(&id) {
            c.stats.declined += 1;
        }
        // From a worker that may not accept on it, it is not a connection of
        // this listener; dropping it closes it.
        if leased {
            self.requeue(Conn { fd, listener, declined_by: vec![id] });
        }
    }

    /// Puts a connection back at the head of its queue (dropping, i.e.
    /// closing, it when its listener is gone).
    fn requeue(&mut self, conn: Conn) {
        if let Some(l) = self.listeners.get_mut(&conn.listener) {
            l.pending.push_front(conn);
        }
    }

    fn remove_channel(&mut self, id: u32) {
        // What the worker wrote before it went is still there to read: its
        // last acknowledgements say which connections it took, and those
        // must not go to another worker.
        self.read_channel(id);
        let Some(c) = self.channels.remove(&id) else { return };
        self.listeners.values_mut().for_each(|l| l.detach(id));
        let mut held: Vec<(u32, Conn)> = c.held.into_iter().collect();
        // Oldest first, so the re-queued ones keep their order at the head.
        held.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for (_, conn) in held {
            // Unacknowledged is not untouched: a worker acknowledges a batch
            // before its app sees it, but one killed while that
            // acknowledgement waited for room in the channel may have read
            // from or answered a connection. Another worker would take it up
            // in the middle; closing it tells its client at once, as a
            // node:cluster worker's death does.
            if sys::connection_use(conn.fd.as_fd()) == sys::Use::Used {
                continue;
            }
            self.requeue(conn);
        }
    }

    /// Removes the channels found broken; true when there were any.
    fn drop_broken_channels(&mut self) -> bool {
        let broken: Vec<u32> = self.channels.iter().filter(|(_, c)| c.broken).map(|(&id, _)| id).collect();
        for &id in &broken {
            self.remove_channel(id);
        }
        !broken.is_empty()
    }
}

#[cfg(target_os = "linux")]
mod ledger_share {
    use std::collections::{HashMap, HashSet};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};

    use nix::sys::eventfd::{EfdFlags, EventFd};

    use crate::ledger::shared::{signal_progress, SharedTable};
    use crate::sys::{self, SysResult, Syscall};
    use crate::wire::Record;

    /// The primary's side of a listener's ledger: the table, the eventfd
    /// that tells waiting workers of progress, and who holds which slot.
    pub struct ListenerLedger {
        table: SharedTable,
        memfd: OwnedFd,
        progress: OwnedFd,
        /// Channel -> slot: leased, the worker accepts (or will).
        slots: HashMap<u32, usize>,
        /// Channel -> slot: released, but its worker may still be running.
        /// Its late writes to the table (a lease it attaches after all, a
        /// `leave` when it closes its server) must not meet another worker in
        /// the slot, so nobody else gets it until the channel is removed.
        reserved: HashMap<u32, usize>,
    }

    impl ListenerLedger {
        pub fn create() -> SysResult<ListenerLedger> {
            let (table, memfd) = SharedTable::create()?;
            let progress = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .syscall("eventfd")?
                .into();
            Ok(ListenerLedger { table, memfd, progress, slots: HashMap::new(), reserved: HashMap::new() })
        }

        /// A slot for `channel` and the lease record with its descriptors;
        /// None when it has one already, or no slot or descriptor is left.
        pub fn lease(&mut self, listener: u32, channel: u32, socket: &OwnedFd) -> Option<(Record, Vec<OwnedFd>)> {
            if self.slots.contains_key(&channel) {
                return None;
            }
            // A worker that listens again gets its own slot back.
            let slot = match self.reserved.remove(&channel) {
                Some(slot) => slot,
                None => {
                    let taken: HashSet<usize> = self.slots.values().chain(self.reserved.values()).copied().collect();
                    self.table.free_slot(|i| taken.contains(&i))?
                }
            };
            let fds = [socket, &self.memfd, &self.progress]
                .iter()
                .map(|fd| sys::dup_cloexec(fd.as_raw_fd()))
                .collect::<SysResult<Vec<OwnedFd>>>();
            let Ok(fds) = fds else {
                self.reserved.insert(channel, slot);
                return None;
            };
            // The worker takes the slot (`Table::attach`) once it can accept.
            self.slots.insert(channel, slot);
            Some((Record::Lease { listener, slot: slot as u32 }, fds))
        }

        /// `channel` no longer accepts here: free its slot, and wake anyone
        /// who was waiting for it.
        pub fn release(&mut self, channel: u32) {
            if let Some(slot) = self.slots.remove(&channel) {
                self.table.detach(slot);
                self.reserved.insert(channel, slot);
                signal_progress(self.progress.as_fd());
            }
        }

        /// `channel`'s worker is gone: its slot is free for others, and it
        /// no longer counts, even if it left while waiting or attached late.
        pub fn forget(&mut self, channel: u32) {
            if let Some(slot) = self.slots.remove(&channel).or_else(|| self.reserved.remove(&channel)) {
                self.table.detach(slot);
                self.table.remove_waiter(slot);
                signal_progress(self.progress.as_fd());
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::ledger::SLOTS;

        /// Any descriptor will do as the listening socket a lease dups.
        fn socket() -> OwnedFd {
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap().into()
        }

        fn slot_of(lease: Option<(Record, Vec<OwnedFd>)>) -> u32 {
            match lease {
                Some((Record::Lease { slot, .. }, fds)) => {
                    assert_eq!(fds.len(), 3);
                    slot
                }
                _ => panic!("no lease"),
            }
        }

        #[test]
        fn a_released_slot_is_nobody_elses_until_its_worker_is_gone() {
            let (mut ledger, socket) = (ListenerLedger::create().unwrap(), socket());
            assert_eq!(slot_of(ledger.lease(7, 1, &socket)), 0);
            // Worker 1 is disconnected; it may accept, or leave, for a while yet.
            ledger.release(1);
            assert_eq!(slot_of(ledger.lease(7, 2, &socket)), 1, "slot 0 is still worker 1's");
            assert_eq!(slot_of(ledger.lease(7, 1, &socket)), 0, "listening again, worker 1 gets its own back");
            ledger.release(1);
            // Worker 1 has exited.
            ledger.forget(1);
            assert_eq!(slot_of(ledger.lease(7, 3, &socket)), 0);
        }

        #[test]
        fn leases_run_out_after_the_last_slot_and_come_back_with_a_worker_gone() {
            let (mut ledger, socket) = (ListenerLedger::create().unwrap(), socket());
            for channel in 0..SLOTS as u32 {
                assert_eq!(slot_of(ledger.lease(7, channel, &socket)), channel);
            }
            assert!(ledger.lease(7, SLOTS as u32, &socket).is_none(), "no slot is left");
            ledger.forget(5);
            assert_eq!(slot_of(ledger.lease(7, SLOTS as u32, &socket)), 5);
        }

        #[test]
        fn a_worker_that_died_waiting_stops_counting_as_a_waiter() {
            let (mut ledger, socket) = (ListenerLedger::create().unwrap(), socket());
            let slot = slot_of(ledger.lease(7, 1, &socket)) as usize;
            ledger.table.attach(slot);
            ledger.table.add_waiter(slot);
            ledger.table.add_waiter(slot); // one wait, counted once
            assert_eq!(ledger.table.waiters(), 1);
            // It dies before it could remove itself; the primary removes its channel.
            ledger.forget(1);
            assert_eq!(ledger.table.waiters(), 0, "every accept would still wake all workers");
        }
    }
}

/// No ledger off Linux (it needs memfd, eventfd and timerfd): the type has
/// no values, so a listener's `ledger` is always None there.
#[cfg(not(target_os = "linux"))]
mod ledger_share {
    use std::os::fd::OwnedFd;

    use nix::errno::Errno;

    use crate::sys::{SysError, SysResult};
    use crate::wire::Record;

    pub enum ListenerLedger {}

    impl ListenerLedger {
        pub fn create() -> SysResult<ListenerLedger> {
            Err(SysError { syscall: "memfd_create", errno: Errno::ENOSYS })
        }

        pub fn lease(&mut self, _: u32, _: u32, _: &OwnedFd) -> Option<(Record, Vec<OwnedFd>)> {
            match *self {}
        }

        pub fn release(&mut self, _: u32) {
            match *self {}
        }

        pub fn forget(&mut self, _: u32) {
            match *self {}
        }
    }
}

/// Writes what waits on `c`: a lease whole before anything else, then what
/// is left of a short write, then the connections queued, as far as the
/// socket takes them. A send that meets pressure pauses the channel, and
/// what it was to write stays (the caller gives back the connections).
fn flush_channel(c: &mut Channel) {
    if c.broken || c.paused_until.is_some() {
        return;
    }
    loop {
        let sent = if !c.tail.is_empty() {
            // What is left of a short write goes first: the worker reads it
            // as the rest of a record.
            c.send(&c.tail, &[]).map(|n| {
                c.tail.drain(..n);
            })
        } else if !c.leases.is_empty() {
            // Then a lease, whole, before any connection (its tail, if
            // any, goes out next).
            let (record, fds) = &c.leases[0];
            let mut bytes = Vec::with_capacity(RECORD_LEN);
            record.encode(&mut bytes);
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            c.send(&bytes, &raw).map(|n| {
                c.tail.extend_from_slice(&bytes[n..]);
                c.leases.remove(0);
            })
        } else if !c.queued.is_empty() {
            let count = c.queued.len().min(MAX_FDS_PER_MSG);
            let mut bytes = Vec::with_capacity(count * RECORD_LEN);
            let mut fds = Vec::with_capacity(count);
            for seq in &c.queued[..count] {
                // Only a forged ack can settle a connection before it was sent;
                // it is gone from `held` then, and there is nothing to send.
                let Some(conn) = c.held.get(seq) else { continue };
                Record::Conn { listener: conn.listener, seq: *seq }.encode(&mut bytes);
                fds.push(conn.fd.as_raw_fd());
            }
            if fds.is_empty() {
                c.queued.drain(..count);
                continue;
            }
            // Nothing of a failed send went out: the batch stays queued.
            c.send(&bytes, &fds).map(|n| {
                c.queued.drain(..count);
                c.stats.handed += fds.len() as u64;
                c.tail.extend_from_slice(&bytes[n..]);
            })
        } else {
            return;
        };
        match sent {
            Ok(()) => c.sent(),
            Err(e) if c.failed(e.errno) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::{self, InetSpec};
    use crate::worker_channel::WorkerChannel;
    use std::cell::RefCell;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpStream};
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    struct Worker {
        channel: Arc<WorkerChannel>,
        batches: mpsc::Receiver<Vec<u32>>,
        queue: RefCell<VecDeque<(u32, i32)>>,
        end: i32,
    }

    impl Worker {
        fn try_next(&self, wait: Duration) -> Option<(u32, i32)> {
            if self.queue.borrow().is_empty() {
                let batch = self.batches.recv_timeout(wait).ok()?;
                let mut q = self.queue.borrow_mut();
                for c in batch.chunks_exact(3) {
                    q.push_back((c[1], c[2] as i32));
                }
            }
            self.queue.borrow_mut().pop_front()
        }

        fn next(&self) -> (u32, i32) {
            self.try_next(Duration::from_secs(5)).expect("no connection arrived")
        }

        fn accept(&self) -> TcpStream {
            let (seq, fd) = self.next();
            self.channel.settle(&[seq], &[]).unwrap();
            // SAFETY: settle() handed ownership of this fd to us.
            unsafe { TcpStream::from_raw_fd(fd) }
        }

        fn decline(&self) {
            let (seq, _) = self.next();
            self.channel.settle(&[], &[seq]).unwrap();
        }
    }

    /// A dispatcher whose listener is never quiet for long enough to level
    /// its offers, so that tests do not depend on how fast they run.
    fn setup(window: usize) -> (Dispatcher, u32, u16) {
        setup_quiet(window, Duration::MAX)
    }

    fn setup_quiet(window: usize, quiet: Duration) -> (Dispatcher, u32, u16) {
        setup_with(window, quiet, 0)
    }

    /// A listening socket on 127.0.0.1 and its port.
    fn loopback_listener() -> (Listening, u16) {
        let spec = InetSpec {
            host: Some(Ipv4Addr::LOCALHOST.into()),
            scope_id: 0,
            port: 0,
            ipv6_only: false,
            reuse_addr: false,
            reuse_port: false,
        };
        let listening = sockets::listen_tcp(&spec, 64).unwrap();
        let port = sockets::sockname(&listening.fd).unwrap().unwrap().port;
        (listening, port)
    }

    fn setup_with(window: usize, quiet: Duration, first_seq: u32) -> (Dispatcher, u32, u16) {
        let d = Dispatcher::start_with(window, Balance::Dispatch, quiet, first_seq).unwrap();
        let (listening, port) = loopback_listener();
        let id = d.next_id();
        d.add_listener(id, listening, true);
        (d, id, port)
    }

    /// Attaches a worker and waits until the dispatcher has read its Ready.
    fn worker(d: &Dispatcher, listener: u32) -> Worker {
        attached_worker(d, listener).0
    }

    /// As `worker`; also its channel id.
    fn attached_worker(d: &Dispatcher, listener: u32) -> (Worker, u32) {
        let (worker, id) = new_worker(d, listener, |add| d.send(add));
        wait_for(|| d.stats().iter().any(|s| s.id == id && s.attached == 1));
        (worker, id)
    }

    /// A worker whose channel `add` gives to `d`, and which has sent Ready
    /// for `listener`; also its channel id.
    fn new_worker(d: &Dispatcher, listener: u32, add: impl FnOnce(Command)) -> (Worker, u32) {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        let end = worker_end.as_raw_fd();
        let id = d.next_id();
        add(Command::AddChannel { id, fd: primary_end });
        let channel = Arc::new(WorkerChannel::new(worker_end).unwrap());
        let (tx, batches) = mpsc::channel();
        let receiving = channel.clone();
        std::thread::spawn(move || receiving.receive(|b| tx.send(b).is_ok()));
        channel.ready(listener).unwrap();
        (Worker { channel, batches, queue: RefCell::default(), end }, id)
    }

    fn wait_for(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "condition not reached in time");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn assert_connected(client: &mut TcpStream, server: &mut TcpStream) {
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn a_queued_channel_joins_when_the_thread_is_next_woken() {
        let (d, l, port) = setup(4);
        // A round trip: the thread has taken what setup queued.
        d.stats();
        let (w, _) = new_worker(&d, l, |add| assert!(d.enqueue(add)));
        let mut client = connect(port);
        // Other wake-ups (the connection) leave queued commands where they are.
        d.wake_up();
        let mut server = w.accept();
        assert_connected(&mut client, &mut server);
    }

    #[test]
    fn connections_alternate_between_workers() {
        let (d, l, port) = setup(4);
        let workers = [worker(&d, l), worker(&d, l)];
        let mut order = Vec::new();
        for _ in 0..6 {
            let mut client = connect(port);
            let (i, (seq, fd)) = offered(&[&workers[0], &workers[1]]);
            workers[i].channel.settle(&[seq], &[]).unwrap();
            // SAFETY: settled as accepted, so the fd is ours.
            let mut server = unsafe { TcpStream::from_raw_fd(fd) };
            assert_connected(&mut client, &mut server);
            order.push(i);
        }
        assert!(order.windows(2).all(|w| w[0] != w[1]), "not round-robin: {order:?}");
        wait_for(|| d.stats().iter().map(|s| s.accepted).sum::<u64>() == 6);
    }

    #[test]
    fn sequence_numbers_wrap_below_the_workers_own() {
        // Two before the wrap: the third connection is numbered 0 again,
        // never with DIRECT set (a worker drops a Conn that has it).
        let (d, l, port) = setup_with(4, Duration::MAX, DIRECT - 2);
        let workers = [worker(&d, l), worker(&d, l)];
        let seqs: Vec<u32> = (0..4)
            .map(|_| {
                let mut client = connect(port);
                let (i, (seq, fd)) = offered(&[&workers[0], &workers[1]]);
                workers[i].channel.settle(&[seq], &[]).unwrap();
                // SAFETY: settled as accepted, so the fd is ours.
                let mut server = unsafe { TcpStream::from_raw_fd(fd) };
                assert_connected(&mut client, &mut server);
                seq
            })
            .collect();
        assert_eq!(seqs, vec![DIRECT - 2, DIRECT - 1, 0, 1]);
        wait_for(|| d.stats().iter().map(|s| s.accepted).sum::<u64>() == 4);
    }

    /// Makes `n` connections one after another, each accepted by whichever
    /// of `workers` is offered it (and closed); returns who took each.
    fn take_turns(port: u16, workers: &[&Worker], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let _client = connect(port);
                let (i, (seq, fd)) = offered(workers);
                workers[i].channel.settle(&[seq], &[]).unwrap();
                // SAFETY: settled as accepted, so the fd is ours to close.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
                i
            })
            .collect()
    }

    /// `a` holds its first connection unsettled, so its window (of one) is
    /// full while `b` is offered `n`; then `a` settles it.
    fn pass_over(port: u16, a: &Worker, b: &Worker, n: usize) {
        let _first = connect(port);
        let (seq, fd) = a.next();
        assert_eq!(take_turns(port, &[b], n), vec![0; n]);
        a.channel.settle(&[seq], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    #[test]
    fn a_worker_passed_over_while_full_catches_up() {
        let (d, l, port) = setup(1);
        let (a, b) = (worker(&d, l), worker(&d, l));
        pass_over(port, &a, &b, 3);
        // Offered so far: a 1, b 3. Plain round-robin would alternate from
        // here; a is owed two, so it gets the next two in a row, and then
        // strict alternation resumes.
        let order = take_turns(port, &[&a, &b], 6);
        assert_eq!(order[..2], [0, 0], "the worker that was passed over should catch up first: {order:?}");
        assert!(order[2..].windows(2).all(|w| w[0] != w[1]), "not round-robin once level: {order:?}");
    }

    #[test]
    fn after_a_quiet_spell_a_worker_passed_over_is_not_made_up_for() {
        // Every connection here comes after a quiet spell.
        let (d, l, port) = setup_quiet(1, Duration::ZERO);
        let (a, b) = (worker(&d, l), worker(&d, l));
        pass_over(port, &a, &b, 3);
        // Within one of each other, then in turn (compare the test above).
        assert_eq!(take_turns(port, &[&a, &b], 6), [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn a_worker_left_far_behind_makes_up_only_sixteen_windows() {
        let (d, l, port) = setup(1);
        let (a, b) = (worker(&d, l), worker(&d, l));
        // a is 19 behind, 3 more than the 16 (windows of one) it may be owed.
        pass_over(port, &a, &b, 20);
        let order = take_turns(port, &[&a, &b], 17);
        assert_eq!(order, [[0; 16].as_slice(), &[1]].concat(), "a should make up 16, then alternate");
    }

    #[test]
    fn a_worker_that_joins_late_is_not_flooded() {
        let (d, l, port) = setup(4);
        let (a, b) = (worker(&d, l), worker(&d, l));
        take_turns(port, &[&a, &b], 6);
        // c was offered nothing so far; it joins level with the others and
        // takes one in three, not the next six.
        let c = worker(&d, l);
        let mut counts = [0; 3];
        for i in take_turns(port, &[&a, &b, &c], 6) {
            counts[i] += 1;
        }
        assert_eq!(counts, [2, 2, 2]);
    }

    #[test]
    fn a_declined_connection_goes_to_another_worker_never_back() {
        let (d, l, port) = setup(4);
        let (a, b) = (worker(&d, l), worker(&d, l));
        // First connection to a, second to b: the cursor now points at a again.
        let mut first = connect(port);
        let (seq1, _) = a.next();
        let mut second = connect(port);
        let mut s2 = b.accept();
        assert_connected(&mut second, &mut s2);
        // a declines the first; it must go to b, not back to a.
        a.channel.settle(&[], &[seq1]).unwrap();
        let mut s1 = b.accept();
        assert_connected(&mut first, &mut s1);
        assert!(a.try_next(Duration::from_millis(100)).is_none(), "offered to the decliner again");
    }

    #[test]
    fn a_declined_connection_waiting_for_a_stuck_worker_holds_up_no_others() {
        let (d, l, port) = setup(1);
        let workers = [worker(&d, l), worker(&d, l)];
        // The first connection fills one worker's window: it is stuck.
        let _first = connect(port);
        let (stuck, _) = offered(&[&workers[0], &workers[1]]);
        let free = &workers[1 - stuck];
        // The other declines the second: only the stuck worker may take it.
        let _second = connect(port);
        let (seq, _) = free.next();
        free.channel.settle(&[], &[seq]).unwrap();
        // A third client is for the worker with room.
        let mut third = connect(port);
        let (seq, fd) = free.try_next(Duration::from_secs(2)).expect("the listener stopped behind the declined one");
        free.channel.settle(&[seq], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours.
        let mut server = unsafe { TcpStream::from_raw_fd(fd) };
        assert_connected(&mut third, &mut server);
    }

    /// The dispatcher's loop without its thread, for tests that take it
    /// step by step.
    fn bare_loop(window: usize) -> Loop {
        let (_, wake) = sys::stream_pair().unwrap();
        let (_, commands) = mpsc::channel();
        Loop::new(wake, commands, window, Duration::MAX, 0)
    }

    /// A bare loop whose listener 1 is under the ledger.
    #[cfg(target_os = "linux")]
    fn bare_ledger_loop() -> Loop {
        let mut lp = bare_loop(4);
        let (listening, _) = loopback_listener();
        let ledger = ledger_share::ListenerLedger::create().unwrap();
        lp.apply(Command::AddListener { id: 1, listening, ledger: Some(ledger) });
        lp
    }

    /// A worker on channel `id` of `lp`, attached to `listener`.
    fn bare_worker(lp: &mut Loop, id: u32, listener: u32) -> WorkerChannel {
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        lp.apply(Command::AddChannel { id, fd: primary_end });
        let worker = WorkerChannel::new(worker_end).unwrap();
        worker.ready(listener).unwrap();
        lp.read_channel(id);
        worker
    }

    /// A loop with listener 1, on the port returned, and `n` workers
    /// attached to it, on channels 10, 11 and on.
    fn bare_workers(n: u32) -> (Loop, Vec<WorkerChannel>, u16) {
        let mut lp = bare_loop(4);
        let (listening, port) = loopback_listener();
        lp.apply(Command::AddListener { id: 1, listening, ledger: None });
        let workers = (10..10 + n).map(|id| bare_worker(&mut lp, id, 1)).collect();
        (lp, workers, port)
    }

    /// Waits until `lp` has accepted one more connection on `listener`.
    fn accept_one(lp: &mut Loop, listener: u32) {
        let waiting = lp.listeners[&listener].pending.len();
        wait_for(|| {
            lp.accept_from(listener);
            lp.listeners[&listener].pending.len() > waiting
        });
    }

    /// The records waiting on a worker's end of its channel, in the order
    /// sent (a `WorkerChannel` would keep leases and connections apart),
    /// each with how many descriptors came with it.
    fn records(worker: &WorkerChannel) -> Vec<(Record, usize)> {
        let mut decoder = Decoder::default();
        let mut buf = [0u8; RECORD_LEN * 64];
        loop {
            let mut fds = Vec::new();
            match wire::recv(worker.raw_fd(), &mut buf, &mut fds) {
                Ok(r) if r.bytes > 0 => decoder.push(&buf[..r.bytes], fds, r.truncated),
                _ => break,
            }
        }
        let mut incoming = Vec::new();
        decoder.drain(&mut incoming);
        incoming.into_iter().map(|i| (i.record, i.fds.map_or(0, |fds| fds.len()))).collect()
    }

    /// A loop with listener 1 and worker 10, which has been handed one
    /// connection: the worker's end, the batch it got, and the client.
    fn handed_one() -> (Loop, WorkerChannel, Vec<u32>, TcpStream) {
        let (mut lp, mut workers, port) = bare_workers(1);
        let worker = workers.pop().unwrap();
        let client = connect(port);
        accept_one(&mut lp, 1);
        lp.hand_out();
        let mut batch = Vec::new();
        worker.drain(&mut batch, &mut Vec::new()).unwrap();
        assert_eq!(batch.len(), 3);
        (lp, worker, batch, client)
    }

    #[test]
    fn a_connection_a_worker_took_just_before_it_went_is_not_handed_on() {
        let (mut lp, worker, batch, _client) = handed_one();
        // The worker takes it and exits; its primary removes the channel
        // before the loop has read the acknowledgement.
        worker.settle(&[batch[1]], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(batch[2] as i32) });
        drop(worker);
        lp.apply(Command::RemoveChannel { id: 10 });
        assert!(lp.listeners[&1].pending.is_empty(), "a connection the worker took was queued for another");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_connection_a_worker_read_from_before_it_went_is_closed_not_handed_on() {
        let (mut lp, worker, batch, mut client) = handed_one();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // SAFETY: the fd stays open while `worker`, which holds it unsettled,
        // lives, and ManuallyDrop leaves closing it to `worker`.
        let mut taken = std::mem::ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(batch[2] as i32) });
        let mut buf = [0u8; 64];
        assert!(taken.read(&mut buf).unwrap() > 0);
        // It exits before it acknowledges.
        drop(worker);
        lp.apply(Command::RemoveChannel { id: 10 });
        assert!(lp.listeners[&1].pending.is_empty(), "a connection the worker read from was queued for another");
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(client.read(&mut buf).unwrap(), 0, "its client was not told");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_connection_a_dead_worker_left_unread_goes_to_another_whole() {
        let (mut lp, worker, batch, mut client) = handed_one();
        client.write_all(b"request").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        // SAFETY: the fd stays open while `worker`, which holds it unsettled, lives.
        let taken = unsafe { std::os::fd::BorrowedFd::borrow_raw(batch[2] as i32) };
        let mut fds = [PollFd::new(taken, PollFlags::from_bits_retain(libc::POLLRDHUP))];
        assert_eq!(nix::poll::poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
        drop(worker);
        lp.apply(Command::RemoveChannel { id: 10 });
        let mut pending = std::mem::take(&mut lp.listeners.get_mut(&1).unwrap().pending);
        assert_eq!(pending.len(), 1, "the connection was not handed on");
        let mut next = TcpStream::from(pending.pop_front().unwrap().fd);
        let mut request = Vec::new();
        next.read_to_end(&mut request).unwrap();
        assert_eq!(request, b"request");
    }

    #[test]
    fn a_dead_workers_last_read_goes_past_a_message_with_descriptors() {
        // As above, but the worker first gave back a connection it had
        // accepted itself: the kernel ends a read after that message, and
        // the acknowledgement behind it must still be read.
        let (mut lp, worker, handed, _client) = handed_one();
        let (own, _peer) = sys::stream_pair().unwrap();
        let mut returned = Vec::new();
        worker.adopt(1, vec![own], &mut returned);
        worker.settle(&[], &[returned[1]]).unwrap();
        worker.settle(&[handed[1]], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours to close.
        drop(unsafe { OwnedFd::from_raw_fd(handed[2] as i32) });
        drop(worker);
        lp.apply(Command::RemoveChannel { id: 10 });
        assert!(lp.listeners[&1].pending.is_empty(), "a connection the worker took was queued for another");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_worker_that_closes_its_server_and_listens_again_gets_a_lease_again() {
        let mut lp = bare_ledger_loop();
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        lp.apply(Command::AddChannel { id: 10, fd: primary_end });
        let worker = WorkerChannel::new(worker_end).unwrap();
        let leases_after = |lp: &mut Loop| {
            lp.flush();
            let mut leases = Vec::new();
            worker.drain(&mut Vec::new(), &mut leases).unwrap();
            leases.iter().map(|l| l.grant.is_some()).collect::<Vec<bool>>()
        };
        lp.apply(Command::Join { listener: 1, channel: 10 });
        assert_eq!(leases_after(&mut lp), [true]);
        // The server closes (`Gone` on the data channel) and listens again
        // (the query over IPC, then `Join`) before the loop reads the `Gone`.
        worker.gone(1).unwrap();
        lp.apply(Command::Join { listener: 1, channel: 10 });
        lp.read_channel(10);
        assert_eq!(leases_after(&mut lp), [true], "the second listen got no lease");
        assert!(lp.listeners[&1].members.contains(&10));
    }

    /// Waits until one of `workers` is offered a connection; returns which, and it.
    fn offered(workers: &[&Worker]) -> (usize, (u32, i32)) {
        (0..1000)
            .find_map(|_| {
                workers.iter().enumerate().find_map(|(i, w)| w.try_next(Duration::from_millis(5)).map(|c| (i, c)))
            })
            .expect("connection not dispatched")
    }

    #[test]
    fn a_connection_every_worker_declined_waits_for_room_and_is_offered_again() {
        let (d, l, port) = setup(4);
        let (a, b) = (worker(&d, l), worker(&d, l));
        let mut client = connect(port);
        let (i, (seq, _)) = offered(&[&a, &b]);
        let (first, other) = if i == 0 { (&a, &b) } else { (&b, &a) };
        first.channel.settle(&[], &[seq]).unwrap();
        other.decline();
        // Both are full: it waits, and is offered again.
        let (j, (seq, fd)) = offered(&[&a, &b]);
        [&a, &b][j].channel.settle(&[seq], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours.
        let mut server = unsafe { TcpStream::from_raw_fd(fd) };
        assert_connected(&mut client, &mut server);
    }

    /// The client ends' addresses of `clients` or of `servers`, sorted.
    fn clients_of(clients: &[TcpStream], servers: &[TcpStream]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let mut a: Vec<_> = clients.iter().map(|s| s.local_addr().unwrap()).collect();
        let mut b: Vec<_> = servers.iter().map(|s| s.peer_addr().unwrap()).collect();
        a.sort();
        b.sort();
        (a, b)
    }

    /// Two connections that a worker at its limit declined, waiting for
    /// room with no retry in the test's time.
    fn two_waiting_for_room(d: &Dispatcher, l: u32, port: u16) -> (Worker, Vec<TcpStream>) {
        d.send(Command::RoomRetry(Duration::from_secs(3600)));
        let w = worker(d, l);
        let clients: Vec<TcpStream> = (0..2).map(|_| connect(port)).collect();
        w.decline();
        w.decline();
        wait_for(|| d.stats()[0].declined == 2);
        (w, clients)
    }

    #[test]
    fn when_a_worker_takes_a_connection_those_waiting_for_room_are_offered_again() {
        let (d, l, port) = setup(8);
        let (w, waiting) = two_waiting_for_room(&d, l, port);
        // The next connection finds room, and so do the two before it.
        let last = connect(port);
        assert_eq!(w.accept().peer_addr().unwrap(), last.local_addr().unwrap());
        let (waited, served) = clients_of(&waiting, &[w.accept(), w.accept()]);
        assert_eq!(served, waited);
    }

    #[test]
    fn a_worker_that_joins_is_offered_what_waits_for_room() {
        let (d, l, port) = setup(8);
        let (_full, waiting) = two_waiting_for_room(&d, l, port);
        let joined = worker(&d, l);
        let (waited, served) = clients_of(&waiting, &[joined.accept(), joined.accept()]);
        assert_eq!(served, waited);
    }

    #[test]
    fn connections_held_by_a_dead_worker_go_to_another() {
        let (d, l, port) = setup(2);
        let stuck = worker(&d, l);
        let mut clients: Vec<TcpStream> = (0..2).map(|_| connect(port)).collect();
        // The stuck worker received both (its window) and never settles; it dies.
        stuck.next();
        stuck.next();
        nix::sys::socket::shutdown(stuck.end, nix::sys::socket::Shutdown::Both).unwrap();
        let live = worker(&d, l);
        for client in clients.iter_mut() {
            let mut server = live.accept();
            server.write_all(b"x").unwrap();
            let mut buf = [0u8; 1];
            client.read_exact(&mut buf).unwrap();
        }
    }

    #[test]
    fn a_dead_workers_connections_go_to_another_without_waiting_for_a_wake_up() {
        let (d, l, port) = setup(2);
        let stuck = worker(&d, l);
        let _client = connect(port);
        stuck.next();
        // Attached after the connection went to the other: nothing else will
        // wake the dispatcher once the other is gone.
        let live = worker(&d, l);
        nix::sys::socket::shutdown(stuck.end, nix::sys::socket::Shutdown::Both).unwrap();
        assert!(live.try_next(Duration::from_secs(2)).is_some(), "the dead worker's connection waited");
    }

    #[test]
    fn forged_acks_do_not_disturb_the_dispatcher() {
        let (d, l, port) = setup(4);
        let a = worker(&d, l);
        // Acks for sequences never handed out, both kinds, then a real connection.
        let mut bytes = Vec::new();
        for seq in 0..64 {
            Record::Ack { seq, accepted: seq % 2 == 0 }.encode(&mut bytes);
        }
        wire::send(a.end, &bytes, &[]).unwrap();
        let mut client = connect(port);
        let mut server = a.accept();
        assert_connected(&mut client, &mut server);
    }

    #[test]
    fn closing_a_listener_closes_what_waits_on_it() {
        let (d, l, port) = setup(1);
        let a = worker(&d, l);
        let _held = connect(port);
        a.next(); // fills the window of one
        let mut waiting = connect(port);
        d.close_listener(l);
        let mut buf = [0u8; 1];
        // Either reset or end of stream: the client is not left hanging.
        assert!(matches!(waiting.read(&mut buf), Ok(0) | Err(_)));
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(), "closed at once");
    }

    /// Under the ledger: a listener, and the worker end of a channel the
    /// dispatcher has taken (no `Ready` sent on it).
    #[cfg(target_os = "linux")]
    fn ledger_with_channel() -> (Dispatcher, u32, u32, WorkerChannel) {
        let d = Dispatcher::start_with(4, Balance::Ledger, Duration::MAX, 0).unwrap();
        let (listening, _) = loopback_listener();
        let l = d.next_id();
        assert!(d.add_listener(l, listening, true), "a TCP listener has a ledger");
        let (primary_end, worker_end) = sys::stream_pair().unwrap();
        let c = d.next_id();
        d.send(Command::AddChannel { id: c, fd: primary_end });
        (d, l, c, WorkerChannel::new(worker_end).unwrap())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_joined_worker_is_sent_its_lease_without_asking() {
        let (d, l, c, worker) = ledger_with_channel();
        d.send(Command::Join { listener: l, channel: c });
        let (mut batch, mut leases) = (Vec::new(), Vec::new());
        worker.await_lease(l, Duration::from_secs(5), &mut batch, &mut leases).unwrap();
        assert!(batch.is_empty());
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].listener, l);
        assert_eq!(leases[0].grant.as_ref().map(|g| g.slot), Some(0));
        assert_eq!(d.stats()[0].attached, 1);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_retired_worker_is_not_joined() {
        let (d, l, c, worker) = ledger_with_channel();
        d.send(Command::RetireChannel { id: c });
        d.send(Command::Join { listener: l, channel: c });
        // Two round trips: the thread has also written what the first left queued.
        d.stats();
        assert_eq!(d.stats()[0].attached, 0);
        let (mut batch, mut leases) = (Vec::new(), Vec::new());
        assert!(worker.drain(&mut batch, &mut leases).unwrap(), "still open");
        assert!(leases.is_empty() && batch.is_empty());
    }

    /// A worker whose sends meet `errno` three times in a row keeps its
    /// channel (pausing 10, 20 and 40 ms), and is handed connections, and
    /// heard, once they go. The pauses end by the loop's own timeout.
    fn paused_not_dropped(errno: Errno) {
        let (d, l, port) = setup(4);
        let (a, id) = attached_worker(&d, l);
        d.send(Command::FailSends { id, errnos: vec![errno; 3] });
        let stats = || d.stats().into_iter().find(|s| s.id == id).expect("the channel was removed");
        for n in 1..=2 {
            let mut client = connect(port);
            let mut server = a.accept();
            assert_connected(&mut client, &mut server);
            wait_for(|| {
                let s = stats();
                s.handed == n && s.accepted == n
            });
        }
        let s = stats();
        assert_eq!((s.pauses, s.declined, s.attached), (3, 0, 1));
    }

    #[test]
    fn a_channel_out_of_room_for_descriptors_in_flight_is_paused_not_dropped() {
        paused_not_dropped(Errno::ETOOMANYREFS);
    }

    #[test]
    fn a_channel_out_of_buffers_is_paused_not_dropped() {
        paused_not_dropped(Errno::ENOBUFS);
    }

    #[test]
    fn a_paused_workers_connection_goes_to_another_and_may_come_back() {
        let (mut lp, mut workers, port) = bare_workers(1);
        let a = workers.pop().unwrap();
        // a holds one connection, unacknowledged.
        let mut first = connect(port);
        accept_one(&mut lp, 1);
        lp.hand_out();
        let mut held = Vec::new();
        a.drain(&mut held, &mut Vec::new()).unwrap();
        assert_eq!(held.len(), 3);
        // b joins level with a, so a is next in turn; its send fails.
        let b = bare_worker(&mut lp, 11, 1);
        lp.apply(Command::FailSends { id: 10, errnos: vec![Errno::ETOOMANYREFS] });
        let mut second = connect(port);
        accept_one(&mut lp, 1);
        lp.hand_out();
        let s = lp.channels[&10].stats;
        assert_eq!((s.pauses, s.handed), (1, 1));
        assert_eq!(lp.channels[&10].held.len(), 1, "still held for the paused worker");
        let mut batch = Vec::new();
        b.drain(&mut batch, &mut Vec::new()).unwrap();
        assert_eq!(batch.len(), 3, "the other worker did not get it at once");
        assert!(lp.channels[&11].held[&batch[1]].declined_by.is_empty());
        // b declines it. a, paused, has not: it waits for a, not closed as
        // if every worker had declined it.
        b.settle(&[], &[batch[1]]).unwrap();
        lp.read_channel(11);
        lp.hand_out();
        let pending = &lp.listeners[&1].pending;
        assert_eq!(pending.len(), 1, "closed");
        assert_eq!(pending[0].declined_by, [11]);
        assert!(lp.listeners[&1].members.contains(&10));
        // a's ack, sent during the pause, is read.
        a.settle(&[held[1]], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours.
        assert_connected(&mut first, &mut unsafe { TcpStream::from_raw_fd(held[2] as i32) });
        let ready = lp.wait().unwrap();
        assert!(
            ready.iter().any(|(t, ev)| matches!(t, Token::Channel(10)) && ev.contains(PollFlags::POLLIN)),
            "a paused channel is not polled for reading"
        );
        lp.read_channel(10);
        assert_eq!(lp.channels[&10].stats.accepted, 1);
        // Its pause over, a takes the connection b declined.
        lp.resume(Instant::now() + LONGEST_PAUSE);
        lp.hand_out();
        let mut again = Vec::new();
        a.drain(&mut again, &mut Vec::new()).unwrap();
        assert_eq!(again.len(), 3, "not handed after the pause");
        a.settle(&[again[1]], &[]).unwrap();
        // SAFETY: settled as accepted, so the fd is ours.
        assert_connected(&mut second, &mut unsafe { TcpStream::from_raw_fd(again[2] as i32) });
        assert_eq!(lp.channels[&10].stats.handed, 2);
    }

    #[test]
    fn a_paused_worker_is_owed_what_its_pause_gave_back() {
        let (mut lp, workers, port) = bare_workers(2);
        let hand = |lp: &mut Loop| {
            let client = connect(port);
            accept_one(lp, 1);
            lp.hand_out();
            client
        };
        // 10 is first in turn, but its send fails: 11 gets the first, and
        // the second while 10 is paused.
        lp.apply(Command::FailSends { id: 10, errnos: vec![Errno::ETOOMANYREFS] });
        let _clients = [hand(&mut lp), hand(&mut lp)];
        assert_eq!(records(&workers[1]).len(), 2);
        // Its pause over, 10 gets the next two: it was handed neither.
        lp.resume(Instant::now() + LONGEST_PAUSE);
        let _clients = [hand(&mut lp), hand(&mut lp)];
        assert_eq!(records(&workers[0]).len(), 2, "the connection it gave back counted as its turn");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lease_that_meets_pressure_goes_whole_after_the_pause_before_any_connection() {
        let mut lp = bare_ledger_loop();
        // The worker also serves listener 2, where this thread accepts for it.
        let (listening, port) = loopback_listener();
        lp.apply(Command::AddListener { id: 2, listening, ledger: None });
        let worker = bare_worker(&mut lp, 10, 2);
        lp.apply(Command::Join { listener: 1, channel: 10 });
        lp.apply(Command::FailSends { id: 10, errnos: vec![Errno::ENOBUFS] });
        let _client = connect(port);
        accept_one(&mut lp, 2);
        lp.hand_out();
        assert!(records(&worker).is_empty(), "written in spite of the pause");
        assert_eq!(lp.channels[&10].leases.len(), 1);
        assert_eq!(lp.listeners[&2].pending.len(), 1, "the connection was not given back");
        // Nor is the channel polled for writing, which would only spin.
        let ready = lp.wait().unwrap();
        assert!(!ready.iter().any(|(t, _)| matches!(t, Token::Channel(10))));
        lp.resume(Instant::now() + LONGEST_PAUSE);
        lp.hand_out();
        let got = records(&worker);
        assert!(
            matches!(got[..], [(Record::Lease { listener: 1, slot: 0 }, 3), (Record::Conn { listener: 2, .. }, 1)]),
            "{got:?}"
        );
    }

    #[test]
    fn what_was_partly_written_goes_first_after_a_pause() {
        let (mut lp, workers, port) = bare_workers(1);
        // A whole record stands in for what a short write left.
        Record::NoLease { listener: 1 }.encode(&mut lp.channels.get_mut(&10).unwrap().tail);
        lp.apply(Command::FailSends { id: 10, errnos: vec![Errno::ENOBUFS] });
        let _client = connect(port);
        accept_one(&mut lp, 1);
        lp.hand_out();
        assert!(records(&workers[0]).is_empty(), "written in spite of the pause");
        assert_eq!(lp.channels[&10].tail.len(), RECORD_LEN);
        lp.resume(Instant::now() + LONGEST_PAUSE);
        lp.hand_out();
        let got = records(&workers[0]);
        assert!(
            matches!(got[..], [(Record::NoLease { listener: 1 }, 0), (Record::Conn { listener: 1, .. }, 1)]),
            "{got:?}"
        );
    }

    #[test]
    fn a_lease_queued_behind_a_short_write_goes_before_the_connections() {
        let (mut lp, workers, port) = bare_workers(1);
        let c = lp.channels.get_mut(&10).unwrap();
        // A whole record stands in for what a short write left.
        Record::NoLease { listener: 1 }.encode(&mut c.tail);
        c.leases.push((Record::NoLease { listener: 2 }, Vec::new()));
        let _client = connect(port);
        accept_one(&mut lp, 1);
        lp.hand_out();
        let got = records(&workers[0]);
        assert!(
            matches!(
                got[..],
                [
                    (Record::NoLease { listener: 1 }, 0),
                    (Record::NoLease { listener: 2 }, 0),
                    (Record::Conn { listener: 1, .. }, 1)
                ]
            ),
            "{got:?}"
        );
    }

    #[test]
    fn the_wait_for_descriptors_ends_on_time_however_often_the_loop_wakes() {
        // The bare loop's wake-up socket is always ready, as a loop woken
        // again and again (by acks, pauses, retries) would be.
        let (mut lp, _workers, _port) = bare_workers(1);
        lp.starved_until = Some(Instant::now() + Duration::from_millis(30));
        wait_for(|| {
            lp.wait().unwrap();
            lp.starved_until.is_none()
        });
    }

    #[test]
    fn pauses_double_from_ten_ms_up_to_a_second_and_start_over_after_a_send() {
        let (fd, _peer) = sys::stream_pair().unwrap();
        let mut c = Channel::new(1, fd);
        Record::NoLease { listener: 1 }.encode(&mut c.tail);
        c.faults.get_mut().extend([Errno::ENOBUFS; 9]);
        let pauses: Vec<u128> = (0..9)
            .map(|_| {
                flush_channel(&mut c);
                c.paused_until = None;
                c.pause.as_millis()
            })
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        flush_channel(&mut c);
        assert!(c.tail.is_empty());
        Record::NoLease { listener: 1 }.encode(&mut c.tail);
        c.faults.get_mut().push_back(Errno::ENOMEM);
        flush_channel(&mut c);
        assert_eq!(c.pause, FIRST_PAUSE);
        assert_eq!(c.stats.pauses, 10);
    }

    /// A connection handed to a lone worker whose next sends meet `errnos`.
    fn handed_meeting(errnos: Vec<Errno>) -> (Loop, Vec<WorkerChannel>, TcpStream) {
        let (mut lp, workers, port) = bare_workers(1);
        lp.apply(Command::FailSends { id: 10, errnos });
        let client = connect(port);
        accept_one(&mut lp, 1);
        lp.hand_out();
        (lp, workers, client)
    }

    #[test]
    fn an_interrupted_send_is_made_again_at_once() {
        let (lp, workers, _client) = handed_meeting(vec![Errno::EINTR]);
        let got = records(&workers[0]);
        assert!(matches!(got[..], [(Record::Conn { listener: 1, .. }, 1)]), "{got:?}");
        assert_eq!(lp.channels[&10].stats.pauses, 0);
    }

    #[test]
    fn a_broken_pipe_still_ends_the_channel() {
        let (lp, _workers, _client) = handed_meeting(vec![Errno::EPIPE]);
        assert!(!lp.channels.contains_key(&10));
        assert!(lp.listeners[&1].members.is_empty());
        assert_eq!(lp.listeners[&1].pending.len(), 1, "what it held waits for another worker");
    }
}
