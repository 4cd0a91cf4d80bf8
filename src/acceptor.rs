//! A worker's own accept on a listener shared under the ledger (Linux).
//!
//! The worker's event loop watches one of two descriptors per listener (see
//! `binding`), as `waiting` says:
//!
//! - While the worker may accept, the listening socket itself,
//!   level-triggered: each turn of the loop that finds connections queued
//!   accepts at most `per_turn` of them (one, in a worker), as libuv accepts
//!   for a server of its own. Taking a whole queue per wake-up, from behind
//!   an epoll of our own, cost two workers about 10% of their throughput
//!   against node:cluster's `SCHED_NONE` on a host where wake-ups are dear
//!   (see bench/README.md).
//! - While the ledger makes it wait (its turn, its share, a busy worker, no
//!   descriptors left), the acceptor's epoll, which holds three
//!   edge-triggered sources: the listening socket (a connection arrived),
//!   the listener's progress eventfd (a worker the others were waiting for
//!   accepted), and a timer (a wait is long enough to excuse whoever causes
//!   it, or a turn or a grace is over). The socket is not watched
//!   level-triggered then, or the loop would spin.
//!
//! How strictly a worker keeps to its turn depends on the busy spell (see
//! `ledger`). While the spell is young (a client that connects one at a
//! time, a keep-alive pool opening), a worker that is ahead leaves a lone
//! connection to the worker whose turn it is and a queue to be shared out,
//! so such connections split evenly. Once the spell is settled (sustained
//! load: the lag it earned exceeds the configured one) and the listener has
//! no more workers than this process may use CPUs, turns are kept loosely:
//! a worker ahead gives the others only a moment for a lone connection and
//! takes a queue up to its lag at once. Keeping to turns there left
//! connections waiting for busy workers while this one idled, and the
//! shares still stay within the lag. With more workers than CPUs another
//! worker runs while one waits, and taking whole queues only made them
//! contend for the socket.

use std::cell::Cell;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{self, SockFlag};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::ledger::shared::{signal_progress, SharedTable};
use crate::ledger::QUIET;
use crate::sys::{self, accept_failure, AcceptFailure, SysResult, Syscall};

/// How long a worker waits for one that holds it back before excusing it.
pub const EXCUSE_AFTER: Duration = Duration::from_millis(25);
/// With turns kept loosely, how long a worker that is ahead leaves a lone
/// connection to the worker whose turn it is: one idle in its loop was woken
/// by the same arrival and takes it well within this.
const TURN_WAIT: Duration = Duration::from_micros(50);
/// How far ahead of the least-served worker, in hundredths of what it
/// accepted in the busy spell, a worker may run while connections queue
/// (when that is more than the configured lag).
const LAG_PERCENT: u64 = 4;
/// How long, at most, a worker leaves the rest of a queue to the others
/// after taking its share, while they take from it (they were woken by the
/// same arrivals); see `Grace`.
const GRACE: Duration = Duration::from_millis(5);
/// Out of descriptors: how long before trying to accept again.
const STARVED_RETRY: Duration = Duration::from_millis(100);
/// Accepts that fail for a connection's own sake (it was reset while
/// queued) skipped in one wake-up: as many as this is the socket failing.
const MAX_SKIPPED: usize = 128;

const SOCKET: u64 = 0;
const PROGRESS: u64 = 1;
const TIMER: u64 = 2;

pub struct Acceptor {
    /// Closed by `leave`, so that the port is free as soon as no worker and
    /// no primary holds it.
    socket: Option<OwnedFd>,
    table: SharedTable,
    slot: usize,
    progress: OwnedFd,
    timer: TimerFd,
    /// When the timer is due, from `arm` until a look consumes its expiry.
    timer_due: Cell<Option<Instant>>,
    epoll: Epoll,
    lag: u64,
    waiting_since: Option<Instant>,
    /// Set while the timer runs for a turn's short wait rather than
    /// for the excuse.
    turn_timer: bool,
    /// How many CPUs this process may run on.
    cpus: usize,
    /// Set when this worker took its share of a queue and left the rest
    /// (see `Grace`), until the queue is empty.
    grace: Option<Grace>,
    starved_until: Option<Instant>,
    /// Most connections accepted per wake-up.
    per_turn: usize,
    /// The busy spell (`Table::spell`) this worker last saw, and its count
    /// when it first saw it: `lag` grows with what it accepted since.
    spell: u64,
    spell_start: u64,
}

/// A worker that took its share of a queue leaves the rest to the others
/// while they take from it: until `until`, and only as long as the queue is
/// shorter at each look than at the one before (`Leaving`). A queue that did
/// not shrink means the others are busy, and this worker goes on, up to its
/// lag, until the queue is empty (`Over`): over several turns of the loop,
/// as it takes `per_turn` at a time.
enum Grace {
    Leaving { until: Instant, queue: u32 },
    Over,
}

impl Acceptor {
    /// `socket`, `table` and `progress` are the descriptors of a lease; the
    /// table's descriptor is only needed to map it. A wake-up accepts at most
    /// `per_turn` connections.
    pub fn new(
        socket: OwnedFd,
        table: OwnedFd,
        progress: OwnedFd,
        slot: usize,
        lag: u64,
        per_turn: usize,
    ) -> SysResult<Acceptor> {
        let table = SharedTable::map(&table)?;
        let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)
            .syscall("timerfd_create")?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).syscall("epoll_create1")?;
        let edge = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        epoll.add(socket.as_fd(), EpollEvent::new(edge, SOCKET)).syscall("epoll_ctl")?;
        epoll.add(progress.as_fd(), EpollEvent::new(edge, PROGRESS)).syscall("epoll_ctl")?;
        epoll.add(timer.as_fd(), EpollEvent::new(edge, TIMER)).syscall("epoll_ctl")?;
        // Join level with the least-served: from here on we count.
        table.attach(slot);
        let (spell, spell_start) = (table.spell(), table.accepted(slot));
        Ok(Acceptor {
            socket: Some(socket),
            table,
            slot,
            progress,
            timer,
            timer_due: Cell::new(None),
            epoll,
            lag,
            waiting_since: None,
            turn_timer: false,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            grace: None,
            starved_until: None,
            per_turn: per_turn.max(1),
            spell,
            spell_start,
        })
    }

    /// The listening socket, for the event loop to poll (level-triggered)
    /// while the worker is not `waiting`; None once it left.
    pub fn socket_fd(&self) -> Option<RawFd> {
        self.socket.as_ref().map(|s| s.as_raw_fd())
    }

    /// The acceptor's epoll, for the event loop to poll while the worker is
    /// `waiting`.
    pub fn events_fd(&self) -> RawFd {
        self.epoll.0.as_raw_fd()
    }

    /// Whether the worker waits, by the ledger's rules, with connections
    /// queued: the event loop then polls `events_fd`, not the socket.
    pub fn waiting(&self) -> bool {
        self.waiting_since.is_some()
            || matches!(self.grace, Some(Grace::Leaving { .. }))
            || self.starved_until.is_some()
    }

    /// Called on each turn of the worker's loop, before it polls: a worker
    /// the others excused while its loop was stuck rejoins as soon as the
    /// loop runs again (see `ledger`), not at the next connection that the
    /// others may take first, unseen by it. A load and a branch when it
    /// was not excused.
    pub fn on_loop_turn(&self) {
        if self.socket.is_some() {
            self.table.rejoin(self.slot);
        }
    }

    /// Handles a wake-up: accepts what the ledger allows into `out`.
    pub fn run(&mut self, out: &mut Vec<OwnedFd>) {
        self.look(out);
        self.keep_timer_for_wait();
    }

    fn look(&mut self, out: &mut Vec<OwnedFd>) {
        // Woken through our epoll, which reports edges: consume them. (While
        // the socket itself is polled, the epoll's reports only pile up,
        // and are consumed here on the first look of the next wait.)
        if self.waiting() {
            self.drain_events();
        }
        if self.socket.is_none() {
            return;
        }
        let now = Instant::now();
        if self.starved_until.is_some_and(|t| now < t) {
            return;
        }
        self.starved_until = None;
        let clock = monotonic_ns();
        // The listener was quiet (see `Table::quiet`): what arrives now, one
        // connection or a queue of them, starts a new spell.
        if self.table.quiet(clock, QUIET.as_nanos() as u64) {
            let moved = self.table.begin_spell();
            if moved > 0 && self.table.waiters() > 0 {
                // The turn may now be a waiting worker's.
                self.signal();
            }
        }
        let spell = self.table.spell();
        if spell != self.spell {
            self.spell = spell;
            self.spell_start = self.table.accepted(self.slot);
        }
        let mut taken = 0;
        loop {
            let strict = self.table.allowance(self.slot, false, self.lag);
            // Only asked when it matters: when this worker is not the one
            // whose turn it is.
            let loose = strict == 0 && self.loose_turns();
            // The queue's length, when this pass needed it.
            let queue = if strict > 0 { None } else { self.pending() };
            let (allowed, queued) = if strict > 0 {
                (strict, false)
            } else {
                match queue {
                    // Nothing to wait for: the next arrival wakes us.
                    Some(0) => {
                        self.table.note_empty();
                        self.stop_waiting();
                        self.grace = None;
                        return;
                    }
                    // One, for the worker whose turn it is; with turns
                    // kept loosely, unless it leaves it waiting.
                    Some(1) => match self.waiting_since {
                        Some(since) if loose && now.duration_since(since) >= TURN_WAIT => {
                            (self.table.allowance(self.slot, true, self.lag()).min(1), true)
                        }
                        _ => (0, false),
                    },
                    // A queue, with turns kept loosely: up to the lag.
                    Some(_) if loose => {
                        self.grace = None;
                        (self.table.allowance(self.slot, true, self.lag()), true)
                    }
                    // A queue: this worker's share of it, then (once the
                    // others stop taking from it) up to the lag; a socket
                    // that cannot tell: up to the lag.
                    queue => {
                        let ahead = self.table.allowance(self.slot, true, self.lag());
                        let share = queue.map_or(ahead, |q| self.table.share(self.slot, u64::from(q)));
                        if share > 0 || ahead == 0 {
                            self.grace = None;
                            (ahead.min(share), true)
                        } else {
                            // Not held back: only leaving the others their
                            // share. (While waiting_since is set, the timer
                            // is the excuse timer; nothing else re-arms it.)
                            self.stop_waiting();
                            let queue = queue.unwrap_or(0);
                            if queue > 0 {
                                self.table.note_backlog();
                            }
                            match self.grace {
                                None => {
                                    self.begin_wait();
                                    self.grace = Some(Grace::Leaving { until: now + GRACE, queue });
                                    self.arm(GRACE);
                                    return;
                                }
                                Some(Grace::Leaving { until, queue: before }) if now < until && queue < before => {
                                    self.grace = Some(Grace::Leaving { until, queue });
                                    return;
                                }
                                // The others took nothing since we last
                                // looked (they are busy), or the grace is over.
                                Some(_) => {
                                    self.grace = Some(Grace::Over);
                                    (ahead, true)
                                }
                            }
                        }
                    }
                }
            };
            if allowed == 0 {
                if queue.is_some_and(|q| q > 0) {
                    self.table.note_backlog();
                }
                match self.waiting_since {
                    None => {
                        // Announce the wait, then look again: whoever moves
                        // after this sees a waiter and signals. The timer
                        // wakes us to excuse whoever still holds us back.
                        self.begin_wait();
                        self.waiting_since = Some(now);
                        self.table.add_waiter(self.slot);
                        // With turns kept loosely, a turn is waited for only
                        // briefly (then the timer is the excuse timer).
                        self.turn_timer = loose && !queued;
                        self.arm(self.wait_limit());
                        continue;
                    }
                    Some(since) if now.duration_since(since) >= EXCUSE_AFTER => {
                        if self.table.excuse_laggards(self.slot, queued, self.lag()) > 0 {
                            continue;
                        }
                        self.arm(EXCUSE_AFTER);
                        return;
                    }
                    // The turn's short wait is over and this worker may not
                    // take the connection after all (it is at its lag):
                    // wait on for the excuse.
                    Some(since) if self.turn_timer && now.duration_since(since) >= TURN_WAIT => {
                        self.turn_timer = false;
                        self.arm(EXCUSE_AFTER - now.duration_since(since));
                        return;
                    }
                    // The timer armed when the wait began is still running.
                    Some(_) => return,
                }
            }
            self.stop_waiting();
            let mut got = 0u64;
            let mut empty = false;
            // Each skipped error took a connection off the queue; as many as
            // MAX_SKIPPED is the socket failing, not its connections.
            let mut skipped = 0;
            // At most per_turn in this wake-up, however far the lag goes.
            let allowed = allowed.min((self.per_turn - taken) as u64);
            while got < allowed {
                match self.accept_one() {
                    Ok(fd) => {
                        out.push(fd);
                        got += 1;
                    }
                    Err(errno) => match accept_failure(errno) {
                        AcceptFailure::Skip if skipped < MAX_SKIPPED => {
                            skipped += 1;
                            continue;
                        }
                        AcceptFailure::Starved => {
                            self.begin_wait();
                            self.starved_until = Some(now + STARVED_RETRY);
                            self.arm(STARVED_RETRY);
                            break;
                        }
                        // EAGAIN, or the socket is no longer listening (or
                        // keeps failing): the next arrival wakes us.
                        AcceptFailure::Skip | AcceptFailure::Done => {
                            empty = true;
                            self.grace = None;
                            break;
                        }
                    },
                }
            }
            taken += got as usize;
            // A wake-up that stopped at its limit left connections waiting
            // if the queue's length, when this pass looked at it, says so.
            // Otherwise the loop wakes us for the rest at once, and a worker
            // that leaves them waiting notes it then (`note_backlog`): the
            // listener's quiet time (see `Table::quiet`) relies on it.
            let capped = !empty && self.starved_until.is_none() && taken >= self.per_turn;
            let left_waiting = !empty && (!capped || queue.is_some_and(|q| u64::from(q) > got));
            if got > 0 {
                let before = self.table.record(self.slot, got);
                self.table.note_accept(clock, left_waiting);
                // Only an accept by the least-served can let a waiting
                // worker go: waking the waiters for any other cost them a
                // look each for nothing.
                if self.table.waiters() > 0 && self.table.may_release_waiters(self.slot, before) {
                    self.signal();
                }
            } else if empty {
                self.table.note_empty();
            }
            if empty || capped || self.starved_until.is_some() {
                return;
            }
        }
    }

    /// Stops accepting: the slot is freed and anyone waiting for this worker
    /// is told. Idempotent; also done on drop.
    pub fn leave(&mut self) {
        let Some(socket) = self.socket.take() else { return };
        // Other processes hold the same socket, so closing ours would not
        // take it out of our epoll set: do that first.
        let _ = self.epoll.delete(socket.as_fd());
        drop(socket);
        self.stop_waiting();
        self.table.detach(self.slot);
        self.signal();
    }

    /// Called as a wait begins. While the worker accepted, the loop polled
    /// the socket, and the arrivals it saw piled up in our epoll as edges:
    /// consume them, so that the wait is woken by what comes after it, not
    /// at once. (Everything after this point is looked at again, or wakes
    /// us: see where it is called.)
    fn begin_wait(&self) {
        if !self.waiting() {
            self.drain_events();
        }
    }

    fn stop_waiting(&mut self) {
        self.turn_timer = false;
        if self.waiting_since.take().is_some() {
            self.table.remove_waiter(self.slot);
        }
    }

    fn signal(&self) {
        signal_progress(self.progress.as_fd());
    }

    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_nanos(1));
        let _ = self.timer.set(Expiration::OneShot(TimeSpec::from_duration(after)), TimerSetTimeFlags::empty());
        self.timer_due.set(Some(Instant::now() + after));
    }

    /// How long a wait lasts from its start until its timer goes off: a
    /// turn's short wait, or the wait for the excuse.
    fn wait_limit(&self) -> Duration {
        if self.turn_timer {
            TURN_WAIT
        } else {
            EXCUSE_AFTER
        }
    }

    /// Makes sure a wait has a timer to end it. Each way into a wait arms
    /// the timer for its own end, but waits overlap (a turn waited for
    /// during a grace re-arms the grace's timer for the turn), and one whose
    /// timer went off meanwhile would otherwise wait for the next arrival,
    /// which a burst that already arrived never brings.
    fn keep_timer_for_wait(&self) {
        if !self.waiting() || self.timer_due.get().is_some() {
            return;
        }
        let grace = match self.grace {
            Some(Grace::Leaving { until, .. }) => Some(until),
            _ => None,
        };
        let turn = self.waiting_since.map(|since| since + self.wait_limit());
        let due = [grace, turn, self.starved_until].into_iter().flatten().min();
        let now = Instant::now();
        self.arm(due.map_or(TURN_WAIT, |due| due.saturating_duration_since(now)).max(TURN_WAIT));
    }

    /// Consumes the readiness reports (all sources are edge-triggered, so a
    /// report is not repeated) and the timer's expiry count.
    fn drain_events(&self) {
        let mut events = [EpollEvent::empty(); 4];
        loop {
            match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => {
                    if events[..n].iter().any(|e| e.data() == TIMER) {
                        let mut expirations = [0u8; 8];
                        let _ = nix::unistd::read(self.timer.as_fd(), &mut expirations);
                        self.timer_due.set(None);
                    }
                    if n < events.len() {
                        return;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }

    /// How far ahead of the least-served this worker may run while
    /// connections queue: the configured lag, or 4% of what it accepted in
    /// this busy spell if that is more. A burst after a quiet spell (a
    /// keep-alive pool opening, on a fresh server or one that has served
    /// millions) is split nearly evenly; under sustained load a worker that
    /// is briefly slower does not make the others wait, and the shares still
    /// stay within 4% (a coefficient of variation of at most 0.02 between
    /// two workers; node:cluster's own round-robin ends our benchmark's runs
    /// at 0.01–0.04).
    fn lag(&self) -> u64 {
        self.lag.max(self.earned_lag())
    }

    /// Whether turns are kept loosely now: the busy spell is settled (the
    /// lag it earned exceeds the configured one) and the listener has no
    /// more workers than `cpus` (see the module's comment).
    fn loose_turns(&self) -> bool {
        self.earned_lag() > self.lag && self.table.active_workers() <= self.cpus
    }

    /// The lag this worker earned in the current busy spell: `LAG_PERCENT`
    /// of what it accepted in it.
    fn earned_lag(&self) -> u64 {
        self.table.accepted(self.slot).saturating_sub(self.spell_start) * LAG_PERCENT / 100
    }

    fn accept_one(&self) -> nix::Result<OwnedFd> {
        let socket = self.socket.as_ref().ok_or(Errno::EBADF)?;
        socket::accept4(socket.as_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
    }

    /// How many connections wait in the accept queue; None when the socket
    /// cannot tell (closed, or no longer listening).
    fn pending(&self) -> Option<u32> {
        queue_length(self.socket.as_ref()?.as_raw_fd())
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Nanoseconds on CLOCK_MONOTONIC, which every process of the machine shares.
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or_else(|_| TimeSpec::new(0, 0));
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// The length of a TCP listener's accept queue, or None for other sockets.
fn queue_length(fd: RawFd) -> Option<u32> {
    // For a listening socket the kernel reports its accept queue as `unacked`.
    sys::tcp_info(fd).filter(|(info, _)| info.tcpi_state == sys::TCP_LISTEN).map(|(info, _)| info.tcpi_unacked)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::eventfd::{EfdFlags, EventFd};

    use super::{monotonic_ns, queue_length, Acceptor};
    use crate::ledger::shared::SharedTable;
    use crate::ledger::QUIET;

    /// Most connections a test's acceptor takes per look: enough that one
    /// look shows what the ledger's rules allow.
    const BATCH: usize = 128;

    /// `n` workers' acceptors (slots 0, 1, ...; lag 8; as many CPUs as
    /// workers; `BATCH` per look) on one fresh listener.
    fn workers(n: usize) -> (TcpListener, SharedTable, Vec<Acceptor>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let (table, memfd) = SharedTable::create().unwrap();
        let progress: OwnedFd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap().into();
        let socket = || OwnedFd::from(listener.try_clone().unwrap());
        let dup = |fd: &OwnedFd| fd.as_fd().try_clone_to_owned().unwrap();
        let acceptors = (0..n)
            .map(|slot| {
                let mut acceptor = Acceptor::new(socket(), dup(&memfd), dup(&progress), slot, 8, BATCH).unwrap();
                acceptor.cpus = n;
                acceptor
            })
            .collect();
        (listener, table, acceptors)
    }

    /// Two workers' acceptors on one listener, both having accepted 100,000
    /// connections in this busy spell, the last just now: the spell is
    /// settled (turns are kept loosely), and either may run 4,000 ahead of
    /// the other.
    fn two_busy_workers() -> (TcpListener, SharedTable, Acceptor, Acceptor) {
        let (listener, table, a, b) = two_fresh_workers();
        table.record(0, 100_000);
        table.record(1, 100_000);
        table.note_accept(monotonic_ns(), false);
        (listener, table, a, b)
    }

    /// Makes it look as if the last accept, which left `waiting`
    /// connections or none, was the quiet time ago.
    fn last_accept_long_ago(table: &SharedTable, waiting: bool) {
        table.note_accept(monotonic_ns() - QUIET.as_nanos() as u64, waiting);
    }

    /// Makes it look as if nobody had accepted for the quiet time.
    fn quiet(table: &SharedTable) {
        last_accept_long_ago(table, false);
    }

    /// Lets two workers take turns at a queue until it is empty; returns
    /// how many each took.
    fn drain(listener: &TcpListener, a: &mut Acceptor, b: &mut Acceptor) -> (usize, usize) {
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        while queue_length(listener.as_raw_fd()).unwrap() > 0 {
            a.run(&mut got_a);
            b.run(&mut got_b);
        }
        (got_a.len(), got_b.len())
    }

    /// Opens `n` connections and waits until all of them are in the
    /// listener's accept queue.
    fn connect(listener: &TcpListener, n: u32) -> Vec<TcpStream> {
        let addr = listener.local_addr().unwrap();
        let queued = queue_length(listener.as_raw_fd()).unwrap();
        let clients = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue_length(listener.as_raw_fd()).unwrap() < queued + n {
            assert!(Instant::now() < deadline, "connections never reached the accept queue");
            std::thread::yield_now();
        }
        clients
    }

    /// Two fresh workers' acceptors (lag 8): a young spell.
    fn two_fresh_workers() -> (TcpListener, SharedTable, Acceptor, Acceptor) {
        let (listener, table, mut acceptors) = workers(2);
        let b = acceptors.pop().unwrap();
        let a = acceptors.pop().unwrap();
        (listener, table, a, b)
    }

    /// Waits until the acceptor's event loop would wake it.
    fn wait_for_wakeup(acceptor: &Acceptor) {
        let mut fds = [PollFd::new(acceptor.epoll.0.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1, "no wake-up within 5 s");
    }

    /// The first worker one ahead of the second, one connection arrives, and
    /// the first looks: it leaves the connection to the second, whose turn it
    /// is, and waits. The clients, and what the first took (nothing).
    fn one_left_to_the_second(
        listener: &TcpListener,
        table: &SharedTable,
        a: &mut Acceptor,
    ) -> (Vec<TcpStream>, Vec<OwnedFd>) {
        table.record(0, 1);
        let clients = connect(listener, 1);
        let mut got = Vec::new();
        a.run(&mut got);
        assert_eq!(got.len(), 0, "left to the worker whose turn it is");
        assert!(a.waiting(), "waiting: the loop must not poll the socket, which stays readable");
        (clients, got)
    }

    /// Ten connections queue, then `a` looks once and `b` once: what each took.
    fn ten_queued_then_each_looks(listener: &TcpListener, a: &mut Acceptor, b: &mut Acceptor) -> (usize, usize) {
        let _clients = connect(listener, 10);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        a.run(&mut got_a);
        b.run(&mut got_b);
        (got_a.len(), got_b.len())
    }

    #[test]
    fn a_look_accepts_at_most_per_turn_and_leaves_the_rest_to_the_next_turn() {
        let (listener, table, mut a, _b) = two_busy_workers();
        a.per_turn = 1;
        let _clients = connect(&listener, 3);
        table.note_accept(monotonic_ns(), true); // still under load
        let mut got = Vec::new();
        a.run(&mut got);
        assert_eq!(got.len(), 1, "one per turn of the loop: its turn");
        assert!(!a.waiting(), "not waiting: the loop goes on polling the socket, which is still readable");
        a.run(&mut got);
        assert_eq!(got.len(), 2, "then one of the queue, taken at once in a settled spell");
        assert!(!a.waiting());
        let quiet = QUIET.as_nanos() as u64;
        assert!(!table.quiet(monotonic_ns() + quiet, quiet), "it saw one left: a stall, not a quiet spell");
        // The last is the other worker's turn: left to it for a moment, and
        // the loop must stop polling the socket meanwhile.
        a.run(&mut got);
        assert_eq!(got.len(), 2);
        assert!(a.waiting());
        assert_eq!(table.accepted(0), 100_002);
    }

    /// Whether the listener's progress eventfd was written since the last
    /// call (which reads it).
    fn signalled(acceptor: &Acceptor) -> bool {
        nix::unistd::read(acceptor.progress.as_fd(), &mut [0u8; 8]).is_ok()
    }

    #[test]
    fn only_an_accept_by_the_least_served_wakes_the_waiters() {
        let (listener, table, mut acceptors) = workers(3);
        table.record(0, 100_000);
        table.record(1, 100_010);
        table.record(2, 100_020);
        table.note_accept(monotonic_ns(), true);
        let (a, rest) = acceptors.split_first_mut().unwrap();
        let b = &mut rest[0];
        // The third worker waits (as the ledger counts it).
        table.add_waiter(2);
        // The second, ahead of the first, takes a queue in a settled spell.
        let _clients = connect(&listener, 3);
        let mut got = Vec::new();
        b.run(&mut got);
        assert_eq!(got.len(), 3);
        assert!(!signalled(b), "the first worker still holds the waiter back");
        // The first, the least-served, accepts.
        let _clients = connect(&listener, 2);
        a.run(&mut got);
        assert_eq!(got.len(), 5);
        assert!(signalled(a), "the waiter may go now");
    }

    #[test]
    fn a_worker_excused_while_stuck_rejoins_on_its_loops_next_turn() {
        let (listener, table, mut a, b) = two_fresh_workers();
        // The second worker is stuck; the first waits for its turn, then
        // excuses it.
        let (_clients, mut got) = one_left_to_the_second(&listener, &table, &mut a);
        assert_eq!(table.excuse_laggards(0, false, 8), 1);
        a.run(&mut got);
        assert_eq!(got.len(), 1);
        assert!(table.excused(1));
        // Its loop runs again with nothing queued: it counts again at once,
        // level with the other, before any connection could pass it by.
        b.on_loop_turn();
        assert!(!table.excused(1));
        assert_eq!(table.accepted(1), table.accepted(0));
    }

    #[test]
    fn a_wait_left_without_its_timer_is_given_one() {
        let (_listener, _table, mut a, _b) = two_fresh_workers();
        // Not waiting: nothing to arm.
        a.keep_timer_for_wait();
        assert!(a.timer_due.get().is_none());
        // As after a look that consumed the timer of an overlapping wait and
        // returned in its grace, relying on a timer that had already gone off.
        a.grace = Some(super::Grace::Leaving { until: Instant::now() + Duration::from_millis(1), queue: 3 });
        a.keep_timer_for_wait();
        assert!(a.timer_due.get().is_some());
        wait_for_wakeup(&a);
    }

    #[test]
    fn a_look_that_takes_the_last_connection_at_its_limit_leaves_no_backlog() {
        let (listener, table, mut acceptors) = workers(1);
        let a = &mut acceptors[0];
        a.per_turn = 1;
        let _clients = connect(&listener, 1);
        let mut got = Vec::new();
        a.run(&mut got);
        assert_eq!(got.len(), 1);
        let quiet = QUIET.as_nanos() as u64;
        assert!(
            table.quiet(monotonic_ns() + quiet, quiet),
            "it left nothing waiting, so a quiet time later the listener is quiet"
        );
    }

    #[test]
    fn in_a_young_spell_a_burst_is_shared_out_even_when_the_lag_would_allow_more() {
        let (listener, table, mut a, mut b) = two_fresh_workers();
        let taken = ten_queued_then_each_looks(&listener, &mut a, &mut b);
        assert_eq!(taken, (5, 5), "the first worker takes its share and leaves the rest");
        assert_eq!((table.accepted(0), table.accepted(1)), (5, 5));
    }

    #[test]
    fn in_a_settled_spell_a_queue_is_taken_up_to_the_lag_at_once() {
        let (listener, table, mut a, mut b) = two_busy_workers();
        let taken = ten_queued_then_each_looks(&listener, &mut a, &mut b);
        assert_eq!(taken, (10, 0), "its turn, then the rest: 4,000 ahead would be allowed");
        assert_eq!(table.accepted(0), 100_010);
    }

    #[test]
    fn with_more_workers_than_cpus_a_settled_spell_keeps_turns() {
        let (listener, table, mut a, mut b) = two_busy_workers();
        a.cpus = 1;
        b.cpus = 1;
        let taken = ten_queued_then_each_looks(&listener, &mut a, &mut b);
        assert_eq!(taken, (5, 5), "the first worker takes its share and leaves the rest");
        assert_eq!((table.accepted(0), table.accepted(1)), (100_005, 100_005));
    }

    #[test]
    fn in_a_settled_spell_a_lone_connection_waits_only_briefly_for_its_turn() {
        let (listener, table, mut a, _b) = two_busy_workers();
        let (_clients, mut got) = one_left_to_the_second(&listener, &table, &mut a);
        // That worker is busy and does not come: the short wait's timer
        // wakes this one, which takes the connection.
        wait_for_wakeup(&a);
        a.run(&mut got);
        assert_eq!(got.len(), 1);
        assert!(!a.waiting());
        assert_eq!(table.accepted(0), 100_002);
        assert!(!table.excused(1), "taken before the wait would excuse the other worker");
    }

    #[test]
    fn after_a_quiet_spell_connections_one_at_a_time_take_turns_again() {
        let (listener, table, mut a, mut b) = two_busy_workers();
        // The last busy spell left the second worker 20 ahead (within its lag).
        table.record(1, 20);
        quiet(&table);
        let mut order = String::new();
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.extend(connect(&listener, 1));
            let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
            b.run(&mut got_b);
            a.run(&mut got_a);
            order.push(match (got_a.len(), got_b.len()) {
                (1, 0) => 'a',
                (0, 1) => 'b',
                other => panic!("one connection, accepted as {other:?}"),
            });
        }
        // The first worker comes within one of the second, then they
        // alternate, instead of the first taking the next 20.
        assert_eq!(order, "aababa");
    }

    #[test]
    fn in_a_young_spell_a_queue_the_others_do_not_take_from_is_not_left_to_them() {
        let (listener, table, mut a, _b) = two_fresh_workers();
        let _clients = connect(&listener, 10);
        let mut got = Vec::new();
        a.run(&mut got);
        assert_eq!(got.len(), 5);
        assert!(a.waiting(), "leaving the rest to the others for a while");
        // The other worker took nothing since: it is busy, so this one goes
        // on, up to its lag of 8, rather than leave connections waiting.
        a.run(&mut got);
        assert_eq!(got.len(), 8);
        assert_eq!(table.accepted(0), 8);
    }

    #[test]
    fn after_a_quiet_spell_a_burst_is_shared_out_even_if_the_others_are_slow_to_come() {
        let (listener, table, mut a, mut b) = two_busy_workers();
        quiet(&table);
        let _clients = connect(&listener, 30);
        let mut got_a = Vec::new();
        // The other worker does not come for its share. In the new spell
        // this one may run only the configured lag ahead, not 4% of all it
        // ever accepted.
        a.run(&mut got_a);
        a.run(&mut got_a);
        assert_eq!(got_a.len(), 8, "its turn, then up to 8 ahead of the other");
        let (more_a, got_b) = drain(&listener, &mut b, &mut a);
        assert_eq!((got_a.len() + got_b, more_a), (15, 15));
    }

    #[test]
    fn a_burst_after_a_quiet_spell_does_not_make_up_the_last_spell() {
        let (listener, table, mut a, mut b) = two_busy_workers();
        // The last busy spell left the first worker 40 ahead (within its lag).
        table.record(0, 40);
        quiet(&table);
        let _clients = connect(&listener, 30);
        // Levelled to one behind, the second worker takes one more of the
        // burst, and they end level; not the second 35 and the first none.
        assert_eq!(drain(&listener, &mut a, &mut b), (14, 16));
        assert_eq!((table.accepted(0), table.accepted(1)), (100_054, 100_055));
    }

    #[test]
    fn a_lone_worker_that_empties_the_queue_leaves_no_backlog() {
        let (listener, table, mut acceptors) = workers(1);
        let a = &mut acceptors[0];
        let _clients = connect(&listener, 1);
        let mut got = Vec::new();
        // Always its turn: it accepts one, then finds the queue empty.
        a.run(&mut got);
        assert_eq!(got.len(), 1);
        let quiet = QUIET.as_nanos() as u64;
        assert!(table.quiet(monotonic_ns() + quiet, quiet), "a quiet time later, the listener is quiet");
    }

    #[test]
    fn waiting_for_a_busy_worker_is_not_a_quiet_spell() {
        let (listener, table, mut a, _b) = two_busy_workers();
        quiet(&table);
        let _clients = connect(&listener, 30);
        let mut got = Vec::new();
        a.run(&mut got);
        assert_eq!(got.len(), 8, "its turn, then up to 8 ahead of the other");
        // The other worker is busy for longer than the quiet time. The
        // queue it left is not a new spell: it keeps its count, and this
        // worker goes on waiting for it.
        last_accept_long_ago(&table, true);
        a.run(&mut got);
        assert_eq!(got.len(), 8);
        assert_eq!(table.accepted(1), 100_000);
    }
}
