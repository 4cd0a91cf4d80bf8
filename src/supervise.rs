//! Restart supervision: the backoff decision for a worker slot that exited,
//! and a timer thread that says when a scheduled restart is due.
//!
//! A slot is one place in the cluster that a worker fills; its replacement
//! takes the same slot. A worker that lived at least `min_uptime` counts as
//! healthy and resets the slot's backoff. Each quick failure doubles the delay
//! up to `max_delay`; more than `max_restarts` quick failures in a row give
//! the slot up, so a crash loop never becomes a fork storm.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub delay: Duration,
    pub max_delay: Duration,
    pub min_uptime: Duration,
    pub max_restarts: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(15),
            min_uptime: Duration::from_secs(1),
            max_restarts: 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RestartAfter { delay: Duration, quick_failures: u32 },
    GiveUp { quick_failures: u32 },
}

/// The backoff state of one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slot {
    pub quick_failures: u32,
}

impl Slot {
    /// `uptime`: how long the worker ran; `None` when its process could not
    /// be spawned, which is a quick failure whatever `min_uptime` is.
    pub fn on_exit(&mut self, policy: &Policy, uptime: Option<Duration>) -> Decision {
        if uptime.is_some_and(|u| u >= policy.min_uptime) {
            self.quick_failures = 0;
            return Decision::RestartAfter { delay: policy.delay, quick_failures: 0 };
        }
        self.quick_failures = self.quick_failures.saturating_add(1);
        if self.quick_failures > policy.max_restarts {
            return Decision::GiveUp { quick_failures: self.quick_failures };
        }
        let doublings = (self.quick_failures - 1).min(31);
        let delay = policy.delay.saturating_mul(1u32 << doublings).min(policy.max_delay.max(policy.delay));
        Decision::RestartAfter { delay, quick_failures: self.quick_failures }
    }
}

/// All slots of a primary.
#[derive(Default)]
pub struct Slots {
    slots: HashMap<u32, Slot>,
}

impl Slots {
    pub fn on_exit(&mut self, slot: u32, policy: &Policy, uptime: Option<Duration>) -> Decision {
        let decision = self.slots.entry(slot).or_default().on_exit(policy, uptime);
        if matches!(decision, Decision::GiveUp { .. }) {
            self.slots.remove(&slot);
        }
        decision
    }

    pub fn forget(&mut self, slot: u32) {
        self.slots.remove(&slot);
    }
}

/// One thread that calls `fire(token)` when each scheduled deadline passes.
pub struct Timers {
    shared: Arc<(Mutex<TimerState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct TimerState {
    due: BinaryHeap<Reverse<(Instant, u32)>>,
    cancelled: HashSet<u32>,
    closed: bool,
}

impl Timers {
    pub fn start(mut fire: impl FnMut(u32) + Send + 'static) -> std::io::Result<Timers> {
        let shared: Arc<(Mutex<TimerState>, Condvar)> = Arc::default();
        let inner = shared.clone();
        let thread = std::thread::Builder::new().name("cluster-rs-timers".into()).spawn(move || {
            let (lock, wake) = &*inner;
            let mut state = lock.lock().unwrap();
            loop {
                if state.closed {
                    return;
                }
                let now = Instant::now();
                match state.due.peek().copied() {
                    None => state = wake.wait(state).unwrap(),
                    Some(Reverse((at, token))) if at <= now => {
                        state.due.pop();
                        if !state.cancelled.remove(&token) {
                            drop(state);
                            fire(token);
                            state = lock.lock().unwrap();
                        }
                    }
                    Some(Reverse((at, _))) => state = wake.wait_timeout(state, at - now).unwrap().0,
                }
            }
        })?;
        Ok(Timers { shared, thread: Some(thread) })
    }

    pub fn schedule(&self, token: u32, after: Duration) {
        let (lock, wake) = &*self.shared;
        let mut state = lock.lock().unwrap();
        state.cancelled.remove(&token);
        // A delay too large to represent is as good as never.
        let at =
            Instant::now().checked_add(after).unwrap_or_else(|| Instant::now() + Duration::from_secs(u32::MAX as u64));
        state.due.push(Reverse((at, token)));
        wake.notify_one();
    }

    /// Cancels a scheduled token. Returns whether one was pending.
    pub fn cancel(&self, token: u32) -> bool {
        let (lock, _) = &*self.shared;
        let mut state = lock.lock().unwrap();
        let pending = state.due.iter().any(|Reverse((_, t))| *t == token);
        if pending {
            state.cancelled.insert(token);
        }
        pending
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap().closed = true;
        wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const QUICK: Duration = Duration::from_millis(10);

    #[test]
    fn quick_failures_double_the_delay_up_to_the_cap_then_give_up() {
        let policy = Policy { max_restarts: 10, max_delay: Duration::from_millis(1000), ..Policy::default() };
        let mut slot = Slot::default();
        let delays: Vec<u64> = (0..10)
            .map(|_| match slot.on_exit(&policy, Some(QUICK)) {
                Decision::RestartAfter { delay, .. } => delay.as_millis() as u64,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000, 1000]);
        assert_eq!(slot.on_exit(&policy, Some(QUICK)), Decision::GiveUp { quick_failures: 11 });
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let policy = Policy::default();
        let mut slot = Slot::default();
        slot.on_exit(&policy, Some(QUICK));
        slot.on_exit(&policy, Some(QUICK));
        assert_eq!(slot.quick_failures, 2);
        let d = slot.on_exit(&policy, Some(Duration::from_secs(5)));
        assert_eq!(d, Decision::RestartAfter { delay: Duration::from_millis(100), quick_failures: 0 });
        assert_eq!(
            slot.on_exit(&policy, Some(QUICK)),
            Decision::RestartAfter { delay: Duration::from_millis(100), quick_failures: 1 }
        );
    }

    #[test]
    fn a_process_that_could_not_be_spawned_is_a_quick_failure_even_with_no_min_uptime() {
        let policy = Policy { min_uptime: Duration::ZERO, max_restarts: 2, ..Policy::default() };
        let mut slot = Slot::default();
        assert!(matches!(slot.on_exit(&policy, Some(QUICK)), Decision::RestartAfter { quick_failures: 0, .. }));
        assert!(matches!(slot.on_exit(&policy, None), Decision::RestartAfter { quick_failures: 1, .. }));
        assert!(matches!(slot.on_exit(&policy, None), Decision::RestartAfter { quick_failures: 2, .. }));
        assert_eq!(slot.on_exit(&policy, None), Decision::GiveUp { quick_failures: 3 });
    }

    #[test]
    fn zero_max_restarts_gives_up_on_the_first_quick_failure() {
        let policy = Policy { max_restarts: 0, ..Policy::default() };
        let mut slots = Slots::default();
        assert_eq!(slots.on_exit(7, &policy, Some(QUICK)), Decision::GiveUp { quick_failures: 1 });
        // A given-up slot starts afresh if it is ever used again.
        assert!(slots.slots.is_empty());
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let policy = Policy { max_restarts: u32::MAX, ..Policy::default() };
        let mut slot = Slot { quick_failures: 1000 };
        assert!(
            matches!(slot.on_exit(&policy, Some(QUICK)), Decision::RestartAfter { delay, .. } if delay == policy.max_delay)
        );
    }

    #[test]
    fn timers_fire_in_deadline_order_and_cancel() {
        let (tx, rx) = mpsc::channel();
        let timers = Timers::start(move |t| tx.send(t).unwrap()).unwrap();
        timers.schedule(3, Duration::from_millis(60));
        timers.schedule(1, Duration::from_millis(20));
        timers.schedule(2, Duration::from_millis(40));
        assert!(timers.cancel(2));
        assert!(!timers.cancel(99));
        let got: Vec<u32> = (0..2).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got, [1, 3]);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
