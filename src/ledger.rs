//! The accept ledger: how workers that accept on one shared listening socket
//! stay fair without the primary touching a connection.
//!
//! Under the ledger, round-robin means "equal shares": every worker attached
//! to a listener has a slot in a small table in shared memory with the number
//! of connections it accepted. A worker may accept while it is less than a
//! bound ahead of the least-served active worker; past that it waits until
//! the others catch up. The bound is one connection when nothing queues (so a
//! client that connects one at a time meets the workers in turn, as under
//! node:cluster's round-robin) and `lag` when connections queue, so that
//! under load nobody idles while the kernel's queue is full.
//!
//! A worker that holds the others back for too long (a busy loop, a long
//! synchronous handler) is excused: it no longer counts until its loop next
//! looks for connections, and then it joins level with the least-served of
//! the others, so a stall is never paid back by stalling everyone else.
//! (It rejoins when it looks, not when it accepts: an excused worker that
//! only rejoined on accepting lost every tie in strict turns to the lower
//! slots and could never take a lone connection. So a worker that is busy
//! in long handlers and looks between them holds the next lone connection
//! up to 25 ms again.)
//!
//! Shares are kept within a busy spell, not across quiet ones: once nobody
//! has accepted for a while (and not because connections wait for busy
//! workers), whoever fell behind is brought within one of the most-served,
//! and a new spell begins. Otherwise the next connections after a spell of
//! load (a keep-alive pool, WebSockets) would all go to the worker that took
//! fewer of the last spell's short-lived ones. The lag a worker may run
//! ahead by under load grows with what it accepted in the current spell
//! (see `acceptor`), so it starts small again too.
//!
//! Slots are written by their owner (the count) and by the primary (attach,
//! detach); anyone may excuse or level. Counts are approximate under races
//! by at most the connections accepted in between, which is all fairness
//! needs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// How long a listener must have had nothing to accept before what came
/// after counts as a new spell, and shares start level again (here, and for
/// the dispatcher's offers). Under load workers accept every few tens of
/// microseconds; the load generator of our benchmark pauses for a
/// millisecond now and then.
pub const QUIET: Duration = Duration::from_millis(10);

/// Slots per listener: the most workers that can share one listener's ledger,
/// more than the CPUs of the largest machines. The table takes 64 KiB, of
/// which a listener with few workers touches the first page only.
pub const SLOTS: usize = 4094;

const FREE: u32 = 0;
const ACTIVE: u32 = 1;
const EXCUSED: u32 = 2;

#[repr(C)]
pub struct Slot {
    accepted: AtomicU64,
    state: AtomicU32,
    /// 1 while the slot's worker counts in `Table::waiters`: a worker that
    /// dies waiting is taken out of the count by the primary (`remove_waiter`).
    waiting: AtomicU32,
}

#[repr(C)]
pub struct Table {
    /// Workers waiting for the others to catch up: who accepts while this is
    /// non-zero signals progress.
    waiters: AtomicU32,
    /// Slots below this index may be in use.
    high: AtomicU32,
    /// When a worker last accepted on the listener (nanoseconds on a clock
    /// all its workers share; 0 before the first).
    last_accept: AtomicU64,
    /// Busy spells begun on the listener: a worker that sees this change
    /// measures what it accepts in the spell from there.
    spells: AtomicU64,
    /// 1 when the last worker to accept left connections waiting in the
    /// queue, until a worker finds it empty.
    backlog: AtomicU32,
    _pad: u32,
    slots: [Slot; SLOTS],
}

pub const TABLE_SIZE: usize = std::mem::size_of::<Table>();
const _: () = assert!(TABLE_SIZE == 64 * 1024);

impl Table {
    /// A zeroed table in this process's memory, for tests.
    #[cfg(test)]
    pub fn new_boxed() -> Box<Table> {
        Box::new(Table {
            waiters: AtomicU32::new(0),
            high: AtomicU32::new(0),
            last_accept: AtomicU64::new(0),
            spells: AtomicU64::new(0),
            backlog: AtomicU32::new(0),
            _pad: 0,
            slots: std::array::from_fn(|_| Slot {
                accepted: AtomicU64::new(0),
                state: AtomicU32::new(FREE),
                waiting: AtomicU32::new(0),
            }),
        })
    }

    fn in_use(&self) -> &[Slot] {
        let high = (self.high.load(SeqCst) as usize).min(SLOTS);
        &self.slots[..high]
    }

    /// The slots of workers that count now.
    fn active(&self) -> impl Iterator<Item = &Slot> {
        self.in_use().iter().filter(|s| s.state.load(SeqCst) == ACTIVE)
    }

    /// How many workers count now.
    pub fn active_workers(&self) -> usize {
        self.active().count()
    }

    /// The least count among active slots, leaving out `except`.
    fn floor(&self, except: Option<usize>) -> Option<u64> {
        self.least(ACTIVE, except)
    }

    /// The least count among slots in `state`, leaving out `except`.
    fn least(&self, state: u32, except: Option<usize>) -> Option<u64> {
        self.in_use()
            .iter()
            .enumerate()
            .filter(|&(i, s)| Some(i) != except && s.state.load(SeqCst) == state)
            .map(|(_, s)| s.accepted.load(SeqCst))
            .min()
    }

    /// Gives `slot` to a worker, level with the least-served active worker
    /// so that it shares the next connections rather than taking them all;
    /// with none active, level with the least-served excused one, which
    /// rejoins at its own count.
    pub fn attach(&self, slot: usize) {
        let start = self.floor(None).or_else(|| self.least(EXCUSED, None)).unwrap_or(0);
        let s = &self.slots[slot];
        s.accepted.store(start, SeqCst);
        s.state.store(ACTIVE, SeqCst);
        self.high.fetch_max(slot as u32 + 1, SeqCst);
    }

    /// Primary or the worker itself: the slot's worker no longer accepts.
    pub fn detach(&self, slot: usize) {
        self.slots[slot].state.store(FREE, SeqCst);
    }

    /// How many connections the worker in `slot` may accept now. `queued`
    /// says whether connections are waiting in the kernel's queue beyond the
    /// one that woke us: then it may run up to `lag` ahead of the
    /// least-served; otherwise only the least-served may accept, the lowest
    /// slot first among equals, so that workers take strict turns. An excused
    /// worker rejoins here, level with the least-served of the others.
    pub fn allowance(&self, slot: usize, queued: bool, lag: u64) -> u64 {
        if !self.rejoin(slot) {
            return 0; // detached: the worker is leaving
        }
        let mine = self.slots[slot].accepted.load(SeqCst);
        if queued {
            let floor = self.floor(None).unwrap_or(mine).min(mine);
            floor.saturating_add(lag.max(1)).saturating_sub(mine)
        } else {
            u64::from(self.ahead_of(slot, mine, false, lag).next().is_none())
        }
    }

    /// An excused worker in `slot` counts again, level with the least-served
    /// of the others. Returns whether the slot counts (false: detached).
    pub fn rejoin(&self, slot: usize) -> bool {
        let me = &self.slots[slot];
        match me.state.load(SeqCst) {
            ACTIVE => true,
            EXCUSED => {
                if let Some(floor) = self.floor(Some(slot)) {
                    me.accepted.fetch_max(floor, SeqCst);
                }
                let _ = me.state.compare_exchange(EXCUSED, ACTIVE, SeqCst, SeqCst);
                true
            }
            _ => false,
        }
    }

    /// The active workers that keep `slot` (at count `mine`) from accepting
    /// under the rule `allowance` applies.
    fn ahead_of(&self, slot: usize, mine: u64, queued: bool, lag: u64) -> impl Iterator<Item = &Slot> {
        self.in_use().iter().enumerate().filter_map(move |(i, s)| {
            if i == slot || s.state.load(SeqCst) != ACTIVE {
                return None;
            }
            let theirs = s.accepted.load(SeqCst);
            let blocks = if queued { theirs.saturating_add(lag.max(1)) <= mine } else { (theirs, i) < (mine, slot) };
            blocks.then_some(s)
        })
    }

    /// How many of `queued` waiting connections are this worker's share:
    /// what brings it level with the others once the queue is shared out
    /// (rounded up), so a burst into idle workers is split evenly.
    pub fn share(&self, slot: usize, queued: u64) -> u64 {
        let (sum, n) = self.active().fold((0u64, 0u64), |(sum, n), s| (sum + s.accepted.load(SeqCst), n + 1));
        let level = (sum + queued).div_ceil(n.max(1));
        level.saturating_sub(self.slots[slot].accepted.load(SeqCst))
    }

    /// Counts `n` connections accepted by `slot`; returns its count before.
    pub fn record(&self, slot: usize, n: u64) -> u64 {
        self.slots[slot].accepted.fetch_add(n, SeqCst)
    }

    /// Whether an accept by `slot`, whose count was `before`, may let a
    /// waiting worker accept: only if no other active worker is below
    /// `before`. Whoever waits for the others is held back by the
    /// least-served, under either rule of `allowance`, and stays held back
    /// while that one is below the worker that accepted.
    pub fn may_release_waiters(&self, slot: usize, before: u64) -> bool {
        self.floor(Some(slot)).is_none_or(|floor| floor >= before)
    }

    /// Notes that a worker accepted at `now`, and whether it left
    /// connections waiting.
    pub fn note_accept(&self, now: u64, left_waiting: bool) {
        self.last_accept.store(now, SeqCst);
        self.backlog.store(u32::from(left_waiting), SeqCst);
    }

    /// Notes that connections wait which the worker that looked did not
    /// take (it waits for its turn, or leaves them to the others).
    pub fn note_backlog(&self) {
        if self.backlog.load(SeqCst) == 0 {
            self.backlog.store(1, SeqCst);
        }
    }

    /// Notes that a worker found the queue empty.
    pub fn note_empty(&self) {
        if self.backlog.load(SeqCst) != 0 {
            self.backlog.store(0, SeqCst);
        }
    }

    /// Whether the listener has been quiet: nobody accepted within `quiet`
    /// before `now`, and the last to accept left nothing waiting.
    /// Connections that wait because every worker is busy or held back are
    /// a stall, which the excuse deals with, not the start of a new spell.
    pub fn quiet(&self, now: u64, quiet: u64) -> bool {
        self.backlog.load(SeqCst) == 0 && now.saturating_sub(self.last_accept.load(SeqCst)) >= quiet
    }

    /// Brings every active worker that is more than one behind the
    /// most-served to one behind: what the last busy spell left uneven is
    /// not made up with the next connections, and the order of turns is
    /// kept. Returns how many moved.
    fn level(&self) -> usize {
        let Some(top) = self.active().map(|s| s.accepted.load(SeqCst)).max() else { return 0 };
        let floor = top.saturating_sub(1);
        self.active().filter(|s| s.accepted.fetch_max(floor, SeqCst) < floor).count()
    }

    /// Starts a new busy spell: shares start level (see `level`, whose
    /// count this returns), and the spell number moves on. Several workers
    /// may start the same spell at once; each start only evens things out.
    pub fn begin_spell(&self) -> usize {
        let moved = self.level();
        self.spells.fetch_add(1, SeqCst);
        moved
    }

    /// The number of the current busy spell.
    pub fn spell(&self) -> u64 {
        self.spells.load(SeqCst)
    }

    /// Excuses the active workers that keep `slot` from accepting (under the
    /// rule for `queued`, as `allowance`). Returns how many.
    pub fn excuse_laggards(&self, slot: usize, queued: bool, lag: u64) -> usize {
        // Only a worker that counts may judge the others: one whose slot the
        // primary has freed (it is leaving) may not.
        if self.slots[slot].state.load(SeqCst) != ACTIVE {
            return 0;
        }
        let mine = self.slots[slot].accepted.load(SeqCst);
        self.ahead_of(slot, mine, queued, lag)
            .filter(|s| s.state.compare_exchange(ACTIVE, EXCUSED, SeqCst, SeqCst).is_ok())
            .count()
    }

    /// The worker in `slot` waits for the others to catch up.
    pub fn add_waiter(&self, slot: usize) {
        if self.slots[slot].waiting.swap(1, SeqCst) == 0 {
            self.waiters.fetch_add(1, SeqCst);
        }
    }

    /// The worker in `slot` no longer waits; also the primary's, for a
    /// worker that died waiting.
    pub fn remove_waiter(&self, slot: usize) {
        if self.slots[slot].waiting.swap(0, SeqCst) == 1 {
            self.waiters.fetch_sub(1, SeqCst);
        }
    }

    pub fn waiters(&self) -> u32 {
        self.waiters.load(SeqCst)
    }

    /// Whether the worker in `slot` is excused.
    #[cfg(test)]
    pub fn excused(&self, slot: usize) -> bool {
        self.slots[slot].state.load(SeqCst) == EXCUSED
    }

    pub fn accepted(&self, slot: usize) -> u64 {
        self.slots[slot].accepted.load(SeqCst)
    }

    /// The lowest slot that is free, if any.
    pub fn free_slot(&self, taken: impl Fn(usize) -> bool) -> Option<usize> {
        (0..SLOTS).find(|&i| !taken(i) && self.slots[i].state.load(SeqCst) == FREE)
    }
}

/// A table in shared memory: a memfd that the primary creates and every
/// worker of the listener maps.
#[cfg(target_os = "linux")]
pub mod shared {
    use std::num::NonZeroUsize;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::ptr::NonNull;

    use nix::sys::memfd::{memfd_create, MFdFlags};
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

    use super::{Table, TABLE_SIZE};
    use crate::sys::{SysResult, Syscall};

    pub struct SharedTable {
        ptr: NonNull<Table>,
    }

    // SAFETY: the table is made of atomics only; the mapping lives as long as
    // the value, and every access goes through `&Table`.
    unsafe impl Send for SharedTable {}
    // SAFETY: as above: shared access is to atomics only.
    unsafe impl Sync for SharedTable {}

    impl SharedTable {
        /// A new zeroed table and the descriptor that shares it.
        pub fn create() -> SysResult<(SharedTable, OwnedFd)> {
            let fd = memfd_create(c"cluster-rs-ledger", MFdFlags::MFD_CLOEXEC).syscall("memfd_create")?;
            nix::unistd::ftruncate(fd.as_fd(), TABLE_SIZE as i64).syscall("ftruncate")?;
            let table = SharedTable::map(&fd)?;
            Ok((table, fd))
        }

        /// Maps a table another process shared with us.
        pub fn map(fd: &OwnedFd) -> SysResult<SharedTable> {
            let len = NonZeroUsize::new(TABLE_SIZE).unwrap();
            let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
            // SAFETY: a fresh shared mapping of a memfd at least TABLE_SIZE
            // long (ftruncate above, or by the primary); nothing else aliases
            // it as non-atomic memory.
            let ptr = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, fd.as_fd(), 0) }.syscall("mmap")?;
            Ok(SharedTable { ptr: ptr.cast() })
        }
    }

    /// Tells the workers waiting on a listener's progress eventfd that they
    /// may look again (someone accepted, or a slot was freed).
    pub fn signal_progress(progress: BorrowedFd<'_>) {
        // An eventfd's counter only overflows after 2^64 - 2 writes.
        let _ = nix::unistd::write(progress, &1u64.to_ne_bytes());
    }

    impl std::ops::Deref for SharedTable {
        type Target = Table;
        fn deref(&self) -> &Table {
            // SAFETY: a live, page-aligned mapping of TABLE_SIZE bytes; zeroed
            // memory is a valid Table (all atomics).
            unsafe { self.ptr.as_ref() }
        }
    }

    impl Drop for SharedTable {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `map`, unmapped once.
            let _ = unsafe { munmap(self.ptr.cast(), TABLE_SIZE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(workers: usize) -> Box<Table> {
        let t = Table::new_boxed();
        (0..workers).for_each(|i| t.attach(i));
        t
    }

    /// Who accepts each of `n` connections made one at a time (nothing
    /// queues) among `workers` slots.
    fn turns(t: &Table, workers: usize, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let turn: Vec<usize> = (0..workers).filter(|&i| t.allowance(i, false, 64) > 0).collect();
                assert_eq!(turn.len(), 1, "exactly one worker's turn");
                t.record(turn[0], 1);
                turn[0]
            })
            .collect()
    }

    #[test]
    fn without_a_queue_workers_take_strict_turns() {
        let t = table(3);
        assert_eq!(turns(&t, 3, 7), vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn with_a_queue_a_worker_may_run_ahead_by_the_lag() {
        let t = table(2);
        assert_eq!(t.allowance(0, true, 64), 64);
        t.record(0, 64);
        assert_eq!(t.allowance(0, true, 64), 0);
        t.record(1, 10);
        assert_eq!(t.allowance(0, true, 64), 10);
        assert_eq!(t.allowance(1, true, 64), 64, "the one behind: a lag at a time");
    }

    #[test]
    fn a_late_worker_joins_level_with_the_least_served() {
        let t = table(2);
        t.record(0, 100);
        t.record(1, 40);
        t.attach(2);
        assert_eq!(t.accepted(2), 40);
        assert_eq!(t.allowance(2, false, 64), 0, "slot 1 first among equals");
        assert_eq!(t.allowance(1, false, 64), 1);
        assert_eq!(t.allowance(0, true, 64), 4);
    }

    #[test]
    fn a_worker_that_joins_while_the_others_are_excused_starts_level_with_them() {
        let t = table(2);
        t.record(1, 1_000_000);
        // Slot 0 excused slot 1 (stuck), then left; a replacement takes slot 0.
        t.record(0, 1_000_001);
        assert_eq!(t.excuse_laggards(0, false, 64), 1);
        t.detach(0);
        t.attach(0);
        assert_eq!(t.accepted(0), 1_000_000, "at 0 it would take every turn until it caught up");
        // Then the two take turns, the lower slot first among equals.
        assert_eq!(turns(&t, 2, 4), vec![0, 1, 0, 1]);
    }

    #[test]
    fn a_detached_worker_holds_nobody_back_and_may_not_accept() {
        let t = table(2);
        t.record(0, 64);
        assert_eq!(t.allowance(0, true, 64), 0);
        t.detach(1);
        assert_eq!(t.allowance(0, true, 64), 64);
        assert_eq!(t.allowance(1, true, 64), 0);
    }

    #[test]
    fn an_excused_worker_stops_counting_and_rejoins_level() {
        let t = table(3);
        t.record(0, 64);
        t.record(2, 64);
        assert_eq!(t.allowance(0, true, 64), 0);
        assert_eq!(t.excuse_laggards(0, true, 64), 1, "only the one that is a full lag behind");
        assert_eq!(t.allowance(0, true, 64), 64);
        t.record(0, 30);
        // Back: level with the least-served of the others (slot 2, at 64),
        // and its turn, being the lowest slot at that count.
        assert_eq!(t.allowance(1, false, 64), 1);
        assert_eq!(t.accepted(1), 64);
        assert_eq!(t.allowance(0, true, 64), 34);
    }

    #[test]
    fn without_a_queue_whoever_has_the_turn_can_be_excused() {
        let t = table(2);
        // Slot 0 has the turn (lowest among equals); slot 1 waits for it.
        assert_eq!(t.allowance(1, false, 64), 0);
        assert_eq!(t.excuse_laggards(1, false, 64), 1);
        assert_eq!(t.allowance(1, false, 64), 1);
    }

    #[test]
    fn a_lone_worker_always_has_the_turn() {
        let t = table(1);
        t.record(0, 1000);
        assert_eq!(t.allowance(0, false, 64), 1);
        assert_eq!(t.allowance(0, true, 64), 64);
    }

    #[test]
    fn a_burst_is_shared_out_level() {
        let t = table(2);
        t.record(0, 10);
        t.record(1, 10);
        assert_eq!(t.share(0, 4), 2);
        t.record(0, 2);
        assert_eq!(t.share(0, 2), 0, "its two taken, the rest is the other's");
        assert_eq!(t.share(1, 2), 2);
        // Two behind: its share of six makes up the two, then half the rest.
        assert_eq!(t.share(1, 6), 4);
        let lone = table(1);
        assert_eq!(lone.share(0, 7), 7);
    }

    #[test]
    fn after_a_quiet_spell_turns_resume_instead_of_repaying_the_last_spell() {
        let t = table(3);
        t.record(0, 100);
        t.record(1, 20);
        t.record(2, 99);
        t.note_accept(5_000, false);
        assert!(!t.quiet(5_999, 1_000));
        assert!(t.quiet(6_000, 1_000));
        let spell = t.spell();
        assert_eq!(t.begin_spell(), 1, "only the one more than one behind moves");
        assert_eq!(t.spell(), spell + 1);
        assert_eq!((t.accepted(0), t.accepted(1), t.accepted(2)), (100, 99, 99));
        assert_eq!(turns(&t, 3, 6), vec![1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn connections_left_waiting_are_a_stall_not_a_quiet_spell() {
        let t = table(2);
        t.note_accept(5_000, true);
        assert!(!t.quiet(1_000_000, 1_000), "nobody accepted, but connections wait");
        t.note_empty();
        assert!(t.quiet(1_000_000, 1_000));
    }

    #[test]
    fn leveling_leaves_workers_that_do_not_count_alone() {
        let t = table(3);
        t.record(0, 100);
        t.record(2, 100);
        t.detach(1);
        assert_eq!(t.level(), 0);
        assert_eq!(t.accepted(1), 0);
        t.attach(1);
        t.record(2, 50);
        t.excuse_laggards(2, true, 8);
        assert_eq!(t.level(), 0, "excused workers rejoin by their own rule");
        assert_eq!((t.accepted(0), t.accepted(1)), (100, 100));
    }

    #[test]
    fn a_huge_lag_lets_a_worker_accept_instead_of_overflowing() {
        let t = table(2);
        t.record(0, 5);
        t.record(1, 5);
        assert!(t.allowance(1, true, u64::MAX - 1) > 0);
    }

    #[test]
    fn a_worker_whose_slot_was_freed_excuses_nobody() {
        let t = table(2);
        t.record(1, 3);
        t.detach(1);
        assert_eq!(t.excuse_laggards(1, false, 8), 0);
        assert!(!t.excused(0));
    }

    #[test]
    fn free_slots_are_reused_lowest_first() {
        let t = table(3);
        t.detach(1);
        assert_eq!(t.free_slot(|_| false), Some(1));
        assert_eq!(t.free_slot(|i| i == 1), Some(3));
    }

    #[test]
    fn only_an_accept_by_the_least_served_can_let_a_waiter_go() {
        let t = table(3);
        t.record(1, 5);
        t.record(2, 7);
        // Worker 2 waits, under either rule, held back by worker 0.
        assert_eq!((t.allowance(2, false, 8), t.allowance(2, true, 2)), (0, 0));
        // Worker 1 accepts (it may run ahead while connections queue):
        // worker 2 is still held back, and need not be told.
        let before = t.record(1, 1);
        assert!(!t.may_release_waiters(1, before));
        assert_eq!((t.allowance(2, false, 8), t.allowance(2, true, 2)), (0, 0));
        // Worker 0 accepts: it was the least-served.
        let before = t.record(0, 6);
        assert!(t.may_release_waiters(0, before));
        assert_eq!(t.allowance(2, true, 2), 1, "worker 2 may go on now");
        // Among equals, any of them may be the one a waiter waits for.
        let before = t.record(1, 0);
        assert!(t.may_release_waiters(1, before), "worker 1 is level with worker 0");
    }

    #[test]
    fn the_last_slot_counts_and_then_none_is_free() {
        let t = table(SLOTS - 1);
        assert_eq!(t.free_slot(|_| false), Some(SLOTS - 1));
        t.attach(SLOTS - 1);
        assert_eq!(t.active_workers(), SLOTS);
        assert_eq!(t.free_slot(|_| false), None);
        // Everyone level: the lowest slot's turn, then the last one's once
        // all the others have taken theirs.
        assert_eq!(t.allowance(SLOTS - 1, false, 8), 0);
        for i in 0..SLOTS - 1 {
            t.record(i, 1);
        }
        assert_eq!(t.allowance(SLOTS - 1, false, 8), 1);
    }
}
