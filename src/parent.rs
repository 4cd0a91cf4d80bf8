//! A worker's tie to its primary.
//!
//! On Linux the kernel signals a worker when its primary dies, even by
//! SIGKILL (`PR_SET_PDEATHSIG`). The worker then has `GRACE_SECS` to go the
//! way a node:cluster worker goes: its event loop sees the IPC channel close
//! and exits, or, when the primary had disconnected it, finishes what it
//! serves (`release`). Only a worker whose loop is stuck (a busy loop, a long
//! synchronous handler) never sees that; SIGALRM's default action ends it.
//! The signal used to be SIGTERM, which ended at once a worker that was busy
//! when its primary disconnected it and exited, before it could read the
//! disconnect. Elsewhere nothing signals a worker: as under node:cluster,
//! one whose loop is stuck outlives its primary.

/// How long a worker whose primary died may run on before it is ended.
pub const GRACE_SECS: u32 = 2;

#[cfg(target_os = "linux")]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use nix::errno::Errno;

    use crate::sys::{SysResult, Syscall};

    /// Set once the worker is draining: it outlives its primary if need be.
    static RELEASED: AtomicBool = AtomicBool::new(false);

    /// The parent-death signal: a real-time one, which Node, libuv and V8
    /// leave alone.
    fn primary_death_signal() -> libc::c_int {
        libc::SIGRTMIN() + 4
    }

    extern "C" fn on_primary_death(_: libc::c_int) {
        // SAFETY: alarm() is async-signal-safe.
        unsafe { libc::alarm(super::GRACE_SECS) };
        // A release on another thread meanwhile stands: it stored the flag
        // before its own alarm(0), so either that came after ours or this
        // load sees the flag.
        if RELEASED.load(SeqCst) {
            // SAFETY: as above.
            unsafe { libc::alarm(0) };
        }
    }

    pub fn follow() -> SysResult<()> {
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_primary_death as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action.sa_mask` is a valid sigset_t to clear.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is initialised; its handler only calls alarm(),
        // which is async-signal-safe.
        let rc = unsafe { libc::sigaction(primary_death_signal(), &action, std::ptr::null_mut()) };
        Errno::result(rc).syscall("sigaction")?;
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, primary_death_signal() as libc::c_ulong, 0, 0, 0) };
        Errno::result(rc).syscall("prctl")?;
        Ok(())
    }

    pub fn release() {
        RELEASED.store(true, SeqCst);
        // SAFETY: PR_SET_PDEATHSIG with 0 clears the signal; no memory is touched.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
        // SAFETY: alarm(0) cancels a grace that already began.
        unsafe { libc::alarm(0) };
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use crate::sys::SysResult;

    pub fn follow() -> SysResult<()> {
        Ok(())
    }

    pub fn release() {}
}

/// Signals this process when its parent (the primary) dies, and ends it
/// `GRACE_SECS` later unless it went by itself or was released.
pub use imp::follow;
/// This process is draining: its primary's death no longer ends it.
pub use imp::release;
