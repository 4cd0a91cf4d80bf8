//! The napi surface. Everything crossing it is plain data: ids, fd numbers,
//! counters, and `{ errno, syscall }` for failures, which `lib/errors.js`
//! turns into Node-shaped errors in one place.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use napi_derive::napi;
use once_cell::sync::OnceCell;

use crate::dispatch::{Balance, Command, Dispatcher, DEFAULT_WINDOW};
use crate::sockets::{self, InetSpec, Listening};
use crate::supervise::{Decision, Policy, Slots, Timers};
use crate::sys::{self, SysError, SysResult};
use crate::worker_channel::{Backlog, Lease, WorkerChannel, PRESSURE_PAUSE};

/// The outcome of creating a socket: `id` (listener) or `fd` (shared socket)
/// on success, a negative `errno` and the failing `syscall` otherwise.
#[napi(object)]
#[derive(Default)]
pub struct SocketResult {
    pub id: i32,
    pub fd: i32,
    pub errno: i32,
    pub syscall: Option<String>,
    pub address: Option<String>,
    pub family: Option<String>,
    pub port: Option<u32>,
    /// Round-robin: workers accept themselves (the ledger), and each hears
    /// its lease before its server is listening.
    pub leased: bool,
}

#[napi(object)]
pub struct ChannelStats {
    pub id: u32,
    pub handed: f64,
    pub accepted: f64,
    pub declined: f64,
    pub held: u32,
    pub attached: u32,
}

fn failed(e: SysError) -> SocketResult {
    SocketResult {
        id: -1,
        fd: -1,
        errno: -(e.errno as i32),
        syscall: Some(e.syscall.to_string()),
        ..Default::default()
    }
}

static DISPATCHER: OnceCell<Dispatcher> = OnceCell::new();
/// The worker ends of channels, kept open until the worker has been spawned.
static SPAWN_ENDS: Mutex<Vec<(u32, OwnedFd)>> = Mutex::new(Vec::new());
static WORKER: OnceCell<Arc<WorkerChannel>> = OnceCell::new();

fn dispatcher() -> SysResult<&'static Dispatcher> {
    DISPATCHER.get_or_try_init(|| {
        let window = std::env::var("CLUSTER_RS_WINDOW").ok().and_then(|w| w.parse().ok()).unwrap_or(DEFAULT_WINDOW);
        let balance = match std::env::var("CLUSTER_RS_BALANCE").as_deref() {
            Ok("dispatch") => Balance::Dispatch,
            _ => Balance::Ledger, // where there is one: Linux
        };
        Dispatcher::start(window, balance)
    })
}

fn inet(host: Option<String>, port: u32, ipv6_only: bool, reuse_addr: bool) -> std::result::Result<InetSpec, SysError> {
    let einval = SysError { syscall: "bind", errno: nix::errno::Errno::EINVAL };
    let (host, scope_id) = match host.as_deref() {
        None | Some("") => (None, 0),
        Some(h) => sockets::parse_host(h).map(|(ip, scope)| (Some(ip), scope)).ok_or(einval)?,
    };
    let port = u16::try_from(port).map_err(|_| einval)?;
    Ok(InetSpec { host, scope_id, port, ipv6_only, reuse_addr, reuse_port: false })
}

fn register(listening: SysResult<Listening>) -> SocketResult {
    let run = || -> SysResult<SocketResult> {
        let listening = listening?;
        let name = sockets::sockname(&listening.fd)?;
        let d = dispatcher()?;
        let id = d.next_id();
        let leased = d.add_listener(id, listening, name.is_some());
        let mut out = SocketResult { id: id as i32, fd: -1, leased, ..Default::default() };
        if let Some(n) = name {
            out.address = Some(n.address);
            out.family = Some(n.family.to_string());
            out.port = Some(n.port as u32);
        }
        Ok(out)
    };
    run().unwrap_or_else(failed)
}

fn shared(fd: SysResult<OwnedFd>) -> SocketResult {
    match fd {
        Ok(fd) => SocketResult { id: -1, fd: fd.into_raw_fd(), ..Default::default() },
        Err(e) => failed(e),
    }
}

/// A round-robin TCP listener owned by the dispatcher.
#[napi]
pub fn listen_tcp(host: Option<String>, port: u32, ipv6_only: bool, backlog: i32) -> SocketResult {
    register(inet(host, port, ipv6_only, false).and_then(|spec| sockets::listen_tcp(&spec, backlog)))
}

/// A round-robin Unix-socket listener owned by the dispatcher.
#[napi]
pub fn listen_unix(path: String, backlog: i32, readable_all: bool, writable_all: bool) -> SocketResult {
    register(sockets::bind_unix(&path, Some(backlog), readable_all, writable_all))
}

/// A round-robin listener on a socket the application passed by number.
#[napi]
pub fn listen_fd(env: Env, fd: i32, backlog: i32) -> Result<SocketResult> {
    let uv_loop = env.get_uv_event_loop()?.cast();
    Ok(register(sockets::listen_fd(fd, backlog, |fd| loop_watches_fd(uv_loop, fd))))
}

/// Whether an active handle of `uv_loop` (this thread's) uses descriptor
/// `fd`: a server, a connection or a pipe that is listening, reading or
/// writing, which is when libuv watches its descriptor.
fn loop_watches_fd(uv_loop: *mut std::ffi::c_void, fd: i32) -> bool {
    extern "C" fn visit(handle: *mut std::ffi::c_void, arg: *mut std::ffi::c_void) {
        let mut own: std::ffi::c_int = -1;
        // SAFETY: uv_walk passes a live handle of its loop; `own` is writable.
        // Handles without a descriptor (timers, closing ones) return an error.
        let rc = unsafe { uv::uv_fileno(handle, &mut own) };
        if rc != 0 {
            return;
        }
        // SAFETY: as above: a live handle, only read.
        let active = unsafe { uv::uv_is_active(handle) } != 0;
        // SAFETY: `arg` is the `(fd, found)` pair `loop_watches_fd` passed,
        // alive and not otherwise borrowed while uv_walk runs.
        let (fd, found) = unsafe { &mut *arg.cast::<(i32, bool)>() };
        if active && own == *fd {
            *found = true;
        }
    }
    let mut search = (fd, false);
    // SAFETY: `uv_loop` is this thread's running loop, from
    // napi_get_uv_event_loop; `visit` only reads each handle's descriptor.
    unsafe { uv::uv_walk(uv_loop, visit, (&mut search as *mut (i32, bool)).cast()) };
    search.1
}

/// A bound TCP socket for SCHED_NONE; the returned fd belongs to the caller.
#[napi]
pub fn bind_shared_tcp(host: Option<String>, port: u32, ipv6_only: bool) -> SocketResult {
    shared(inet(host, port, ipv6_only, false).and_then(|spec| sockets::bind_tcp(&spec)))
}

/// A bound TCP socket with SO_REUSEPORT, one per worker (SCHED_REUSEPORT);
/// the returned fd belongs to the caller, and `port` tells the port bound.
#[napi]
pub fn bind_reuse_port(host: Option<String>, port: u32, ipv6_only: bool) -> SocketResult {
    let run = || -> SysResult<SocketResult> {
        let mut spec = inet(host, port, ipv6_only, false)?;
        spec.reuse_port = true;
        let fd = sockets::bind_tcp(&spec)?;
        let port = sockets::sockname(&fd)?.map(|n| n.port as u32);
        Ok(SocketResult { id: -1, fd: fd.into_raw_fd(), port, ..Default::default() })
    };
    run().unwrap_or_else(failed)
}

/// A bound UDP socket shared by workers; the returned fd belongs to the caller.
#[napi]
pub fn bind_shared_udp(host: Option<String>, port: u32, ipv6_only: bool, reuse_addr: bool) -> SocketResult {
    shared(inet(host, port, ipv6_only, reuse_addr).and_then(|spec| sockets::bind_udp(&spec)))
}

/// A bound Unix socket for SCHED_NONE; the caller owns the fd and the path.
#[napi]
pub fn bind_shared_unix(path: String, readable_all: bool, writable_all: bool) -> SocketResult {
    shared(sockets::bind_unix(&path, None, readable_all, writable_all).map(|mut l| {
        // A handle opened from an fd does not know its path: the primary's
        // SharedHandle unlinks it when the last worker leaves.
        l.unlink_on_close.disarm();
        l.fd
    }))
}

/// Closes a descriptor a shared-socket call handed over, when no handle
/// could adopt it (the caller owned it; nothing else does).
#[napi]
pub fn close_fd(fd: i32) {
    if fd >= 0 {
        // SAFETY: the fd came from bind_shared_* or bind_reuse_port, which
        // gave ownership to the caller, and the caller gives it back here.
        drop(unsafe { sys::own(fd) });
    }
}

/// Closes a round-robin listener; returns once its socket is closed.
#[napi]
pub fn close_listener(id: u32) {
    if let Some(d) = DISPATCHER.get() {
        d.close_listener(id);
    }
}

/// A new worker channel: `[channelId, workerFd]`, or `[-errno]` on failure.
/// `workerFd` stays open until `releaseSpawnEnd(channelId)`.
///
/// This and the other channel calls only queue their change: the dispatcher
/// thread takes it when next woken, by `wakeDispatcher()` or by any call that
/// sends it a command of its own. The primary wakes it once per tick, after
/// the tick's forks: woken just before a fork, the thread made it slower.
#[napi]
pub fn open_channel() -> Vec<i32> {
    let run = || -> SysResult<Vec<i32>> {
        let d = dispatcher()?;
        let (primary_end, worker_end) = sys::stream_pair()?;
        let id = d.next_id();
        let raw = worker_end.as_raw_fd();
        SPAWN_ENDS.lock().unwrap().push((id, worker_end));
        d.enqueue(Command::AddChannel { id, fd: primary_end });
        Ok(vec![id as i32, raw])
    };
    run().unwrap_or_else(|e| vec![-(e.errno as i32)])
}

/// Lets the dispatcher thread take the channel changes queued for it.
#[napi]
pub fn wake_dispatcher() {
    if let Some(d) = DISPATCHER.get() {
        d.wake_up();
    }
}

/// Closes the primary's copy of a worker's channel end once it is spawned.
#[napi]
pub fn release_spawn_end(channel: u32) {
    SPAWN_ENDS.lock().unwrap().retain(|(id, _)| *id != channel);
}

/// The worker is disconnecting: it is sent nothing more (queued, as above).
#[napi]
pub fn retire_channel(channel: u32) {
    if let Some(d) = DISPATCHER.get() {
        d.enqueue(Command::RetireChannel { id: channel });
    }
}

/// Under the ledger: the worker on `channel` is to accept on `listener`,
/// and its lease goes out at once, ahead of the primary's answer to its
/// query (see `worker_ready`).
#[napi]
pub fn join_listener(listener: u32, channel: u32) {
    if let Some(d) = DISPATCHER.get() {
        d.send(Command::Join { listener, channel });
    }
}

/// The worker is gone (queued, as above).
#[napi]
pub fn remove_channel(channel: u32) {
    release_spawn_end(channel);
    if let Some(d) = DISPATCHER.get() {
        d.enqueue(Command::RemoveChannel { id: channel });
    }
}

#[napi]
pub fn dispatch_stats() -> Vec<ChannelStats> {
    DISPATCHER
        .get()
        .map(|d| d.stats())
        .unwrap_or_default()
        .into_iter()
        .map(|s| ChannelStats {
            id: s.id,
            handed: s.handed as f64,
            accepted: s.accepted as f64,
            declined: s.declined as f64,
            held: s.held,
            attached: s.attached,
        })
        .collect()
}

/// Starts receiving on the worker's channel end `fd`, from this worker's own
/// event loop: a `uv_poll` watches the channel, and each wake-up drains it
/// and calls `onBatch([listener, seq, fd, ...])` once, through
/// `napi_make_callback` so that nextTicks and microtasks run afterwards as
/// after any I/O callback. No thread, no extra wake-up per batch.
/// Returns 0 or -errno.
#[napi]
pub fn worker_attach(env: Env, fd: i32, on_batch: Function<Vec<u32>, ()>) -> Result<i32> {
    if WORKER.get().is_some() {
        return Ok(-(nix::errno::Errno::EBUSY as i32));
    }
    // SAFETY: the primary placed this fd in our table at spawn for us alone,
    // and the preload hands it over once (checked just above).
    let owned = unsafe { sys::own(fd) };
    let channel = match WorkerChannel::new(owned) {
        Ok(c) => Arc::new(c),
        Err(e) => return Ok(-(e.errno as i32)),
    };
    let _ = WORKER.set(channel.clone());
    let uv_loop = env.get_uv_event_loop()?;
    let receiver = LoopReceiver::new(&env, on_batch.raw(), channel)?;
    Ok(receiver.start(uv_loop.cast()))
}

mod uv {
    use std::ffi::{c_int, c_void};

    pub const UV_POLL: c_int = 8; // uv_handle_type
    #[cfg(target_os = "linux")]
    pub const UV_PREPARE: c_int = 9;
    pub const UV_TIMER: c_int = 13;
    pub const UV_READABLE: c_int = 1; // uv_poll_event
    pub const UV_WRITABLE: c_int = 2;
    pub type PollCb = extern "C" fn(handle: *mut c_void, status: c_int, events: c_int);
    pub type TimerCb = extern "C" fn(handle: *mut c_void);
    #[cfg(target_os = "linux")]
    pub type PrepareCb = extern "C" fn(handle: *mut c_void);
    pub type WalkCb = extern "C" fn(handle: *mut c_void, arg: *mut c_void);

    // libuv, exported by the node binary that loads this addon.
    extern "C" {
        pub fn uv_handle_size(kind: c_int) -> usize;
        pub fn uv_poll_init(uv_loop: *mut c_void, handle: *mut c_void, fd: c_int) -> c_int;
        pub fn uv_poll_start(handle: *mut c_void, events: c_int, cb: PollCb) -> c_int;
        pub fn uv_poll_stop(handle: *mut c_void) -> c_int;
        #[cfg(target_os = "linux")]
        pub fn uv_prepare_init(uv_loop: *mut c_void, handle: *mut c_void) -> c_int;
        #[cfg(target_os = "linux")]
        pub fn uv_prepare_start(handle: *mut c_void, cb: PrepareCb) -> c_int;
        pub fn uv_timer_init(uv_loop: *mut c_void, handle: *mut c_void) -> c_int;
        pub fn uv_timer_start(handle: *mut c_void, cb: TimerCb, timeout: u64, repeat: u64) -> c_int;
        pub fn uv_unref(handle: *mut c_void);
        pub fn uv_walk(uv_loop: *mut c_void, cb: WalkCb, arg: *mut c_void);
        pub fn uv_fileno(handle: *mut c_void, fd: *mut c_int) -> c_int;
        pub fn uv_is_active(handle: *mut c_void) -> c_int;
        #[cfg(target_os = "linux")]
        pub fn uv_close(handle: *mut c_void, cb: CloseCb);
    }
    #[cfg(target_os = "linux")]
    pub type CloseCb = extern "C" fn(handle: *mut c_void);
}

/// A zeroed, initialised, unreferenced libuv handle of `kind` (`init` is
/// its `uv_*_init` on this thread's loop), its `data` set; or a negative
/// errno. The caller owns the allocation.
fn new_handle(
    kind: std::ffi::c_int,
    init: impl FnOnce(*mut std::ffi::c_void) -> std::ffi::c_int,
    data: *mut std::ffi::c_void,
) -> std::result::Result<*mut std::ffi::c_void, i32> {
    // SAFETY: uv_handle_size only reads a constant table.
    let size = unsafe { uv::uv_handle_size(kind) };
    // SAFETY: a zeroed allocation of the size libuv asks for.
    let handle = unsafe { libc::calloc(1, size) };
    if handle.is_null() {
        return Err(-libc::ENOMEM);
    }
    let rc = init(handle);
    if rc != 0 {
        // SAFETY: not registered with the loop (init failed); ours to free.
        unsafe { libc::free(handle) };
        return Err(rc);
    }
    // SAFETY: the handle was just initialised; its first field is `void* data`.
    unsafe { *handle.cast::<*mut std::ffi::c_void>() = data };
    // SAFETY: an initialised handle; unref so that it alone never keeps a worker alive.
    unsafe { uv::uv_unref(handle) };
    Ok(handle)
}

/// A started `uv_poll_t` of `uv_loop` watching `fd` for reading (see
/// `new_handle`).
fn new_poll(
    uv_loop: *mut std::ffi::c_void,
    fd: i32,
    data: *mut std::ffi::c_void,
    cb: uv::PollCb,
) -> std::result::Result<*mut std::ffi::c_void, i32> {
    // SAFETY: `handle` is writable memory of the right size and `uv_loop`
    // is this thread's running loop, from napi_get_uv_event_loop.
    let handle = new_handle(uv::UV_POLL, |handle| unsafe { uv::uv_poll_init(uv_loop, handle, fd) }, data)?;
    // SAFETY: the handle is initialised; the callback matches uv_poll_cb.
    let rc = unsafe { uv::uv_poll_start(handle, uv::UV_READABLE, cb) };
    if rc != 0 {
        return Err(rc);
    }
    Ok(handle)
}

/// What the poll callback needs; lives for the rest of the process (a worker
/// has one channel), pointed to by the uv handle's `data` field.
struct LoopReceiver {
    env: napi::sys::napi_env,
    callback: napi::sys::napi_ref,
    context: napi::sys::napi_async_context,
    channel: Arc<WorkerChannel>,
    uv_loop: *mut std::ffi::c_void,
    /// The channel's poll handle; null once the primary closed the channel.
    poll: Cell<*mut std::ffi::c_void>,
    /// The poll also waits for room to write (`Backlog::Writable`).
    writable: Cell<bool>,
    /// A timer for `Backlog::Pause`, made when first needed, and whether it runs.
    pause: Cell<*mut std::ffi::c_void>,
    pausing: Cell<bool>,
}

thread_local! {
    /// The worker's receiver, once attached (JS thread only).
    static RECEIVER: std::cell::Cell<*const LoopReceiver> = const { std::cell::Cell::new(std::ptr::null()) };
}

fn napi_ok(status: napi::sys::napi_status, what: &str) -> Result<()> {
    if status == napi::sys::Status::napi_ok {
        Ok(())
    } else {
        Err(Error::from_reason(format!("cluster-rs: {what} failed (napi status {status})")))
    }
}

impl LoopReceiver {
    fn new(env: &Env, callback: napi::sys::napi_value, channel: Arc<WorkerChannel>) -> Result<LoopReceiver> {
        let raw = env.raw();
        let mut reference = std::ptr::null_mut();
        // SAFETY: `callback` is a live function value of this env; the
        // reference keeps it alive for as long as the receiver exists.
        napi_ok(
            unsafe { napi::sys::napi_create_reference(raw, callback, 1, &mut reference) },
            "napi_create_reference",
        )?;
        let name = env.create_string("cluster-rs:connections")?;
        let mut context = std::ptr::null_mut();
        // SAFETY: `name` is a string value of this env; `context` is written by the call.
        napi_ok(
            unsafe { napi::sys::napi_async_init(raw, std::ptr::null_mut(), name.raw(), &mut context) },
            "napi_async_init",
        )?;
        Ok(LoopReceiver {
            env: raw,
            callback: reference,
            context,
            channel,
            uv_loop: std::ptr::null_mut(),
            poll: Cell::new(std::ptr::null_mut()),
            writable: Cell::new(false),
            pause: Cell::new(std::ptr::null_mut()),
            pausing: Cell::new(false),
        })
    }

    /// Registers the poll handle; returns 0 or a negative errno.
    fn start(mut self, uv_loop: *mut std::ffi::c_void) -> i32 {
        let fd = self.channel.raw_fd();
        self.uv_loop = uv_loop;
        // Lives for the rest of the process: the handle watches the channel
        // until the worker exits, and acceptors deliver through it.
        let data = Box::into_raw(Box::new(self));
        RECEIVER.with(|r| r.set(data));
        match new_poll(uv_loop, fd, data.cast(), on_channel_event) {
            Ok(handle) => {
                // SAFETY: `data` was leaked above and is never freed.
                unsafe { &*data }.poll.set(handle);
                0
            }
            Err(rc) => rc,
        }
    }

    /// Has the loop send what waits in the channel's outbox (see
    /// `Backlog`): when the channel is writable, or after a pause. Called
    /// after everything that writes to the channel.
    fn follow_backlog(&self) {
        let poll = self.poll.get();
        if poll.is_null() {
            return;
        }
        let backlog = self.channel.backlog();
        let writable = backlog == Backlog::Writable;
        if writable != self.writable.get() {
            let events = if writable { uv::UV_READABLE | uv::UV_WRITABLE } else { uv::UV_READABLE };
            // SAFETY: the channel's poll handle, active, on its loop's thread;
            // starting it again changes the events it waits for.
            if unsafe { uv::uv_poll_start(poll, events, on_channel_event) } == 0 {
                self.writable.set(writable);
            }
        }
        if backlog == Backlog::Pause && !self.pausing.get() {
            self.start_pause();
        }
    }

    fn start_pause(&self) {
        let mut timer = self.pause.get();
        if timer.is_null() {
            let data = (self as *const LoopReceiver).cast_mut().cast();
            // SAFETY: `timer` is writable memory of the right size and
            // `uv_loop` this thread's running loop. The receiver its `data`
            // points to lives for the rest of the process.
            let Ok(made) = new_handle(uv::UV_TIMER, |timer| unsafe { uv::uv_timer_init(self.uv_loop, timer) }, data)
            else {
                return;
            };
            timer = made;
            self.pause.set(timer);
        }
        let ms = PRESSURE_PAUSE.as_millis() as u64;
        // SAFETY: an initialised timer of this loop; the callback matches uv_timer_cb.
        if unsafe { uv::uv_timer_start(timer, on_pause_over, ms, 0) } == 0 {
            self.pausing.set(true);
        }
    }

    /// Calls the JS callback with one batch, as any libuv I/O callback would.
    fn deliver(&self, batch: Vec<u32>) {
        use napi::bindgen_prelude::ToNapiValue;
        use napi::sys;
        let env = self.env;
        let mut scope = std::ptr::null_mut();
        // SAFETY: we are on the JS thread, inside the loop, outside any JS frame.
        if unsafe { sys::napi_open_handle_scope(env, &mut scope) } != sys::Status::napi_ok {
            return;
        }
        // SAFETY: each call below is on the JS thread of `env` with values of
        // this scope; their outputs are written by the calls.
        unsafe {
            let mut func = std::ptr::null_mut();
            let mut global = std::ptr::null_mut();
            let args = Vec::<u32>::to_napi_value(env, batch);
            if let Ok(arg) = args {
                if sys::napi_get_reference_value(env, self.callback, &mut func) == sys::Status::napi_ok
                    && sys::napi_get_global(env, &mut global) == sys::Status::napi_ok
                {
                    let mut result = std::ptr::null_mut();
                    let status = sys::napi_make_callback(env, self.context, global, func, 1, &arg, &mut result);
                    if status == sys::Status::napi_pending_exception {
                        let mut err = std::ptr::null_mut();
                        sys::napi_get_and_clear_last_exception(env, &mut err);
                        sys::napi_fatal_exception(env, err);
                    }
                }
            }
            sys::napi_close_handle_scope(env, scope);
        }
    }
}

extern "C" fn on_channel_event(handle: *mut std::ffi::c_void, status: std::ffi::c_int, events: std::ffi::c_int) {
    // SAFETY: `data` was set to a leaked LoopReceiver before the poll started.
    let receiver = unsafe { &*(*handle.cast::<*mut LoopReceiver>()) };
    if status == 0 && events & uv::UV_WRITABLE != 0 {
        // An error means the primary is gone; reading says so below.
        let _ = receiver.channel.flush();
    }
    let mut batch = Vec::new();
    let mut leases = Vec::new();
    let open = status == 0 && receiver.channel.drain(&mut batch, &mut leases).unwrap_or(false);
    take_leases(receiver, leases);
    if !batch.is_empty() {
        receiver.deliver(batch);
    }
    if !open {
        // The primary is gone; the IPC channel's 'disconnect' ends the worker.
        receiver.poll.set(std::ptr::null_mut());
        // SAFETY: an active poll handle of this loop.
        unsafe { uv::uv_poll_stop(handle) };
        return;
    }
    receiver.follow_backlog();
}

extern "C" fn on_pause_over(timer: *mut std::ffi::c_void) {
    // SAFETY: `data` was set to the leaked LoopReceiver when the timer was made.
    let receiver = unsafe { &*(*timer.cast::<*const LoopReceiver>()) };
    receiver.pausing.set(false);
    let _ = receiver.channel.flush();
    receiver.follow_backlog();
}

/// Runs `f` with the worker's receiver, once its channel is attached.
fn with_receiver(f: impl FnOnce(&LoopReceiver)) {
    let receiver = RECEIVER.with(|r| r.get());
    if !receiver.is_null() {
        // SAFETY: set when the channel was attached, and never freed.
        f(unsafe { &*receiver });
    }
}

fn errno_of(r: SysResult<()>) -> i32 {
    r.err().map(|e| -(e.errno as i32)).unwrap_or(0)
}

#[napi]
pub fn worker_settle(accepted: Vec<u32>, declined: Vec<u32>) -> i32 {
    let rc = WORKER.get().map(|w| errno_of(w.settle(&accepted, &declined))).unwrap_or(0);
    with_receiver(LoopReceiver::follow_backlog);
    rc
}

/// For a worker about to exit: sends what still waits for the primary
/// (acknowledgements that found no room), waiting a second at most, since
/// the primary would otherwise hand those connections to another worker.
#[napi]
pub fn worker_flush() -> i32 {
    WORKER.get().map(|w| errno_of(w.wait_until_sent(std::time::Duration::from_secs(1)))).unwrap_or(0)
}

thread_local! {
    /// Listeners this worker serves: `worker_ready` ran, `worker_gone` not yet.
    static SERVING: RefCell<HashSet<u32>> = RefCell::new(HashSet::new());
    /// Leases that came before their listener's server was set up: the
    /// primary sends one as it answers the worker's query, and the channel
    /// may be read before the answer is.
    static EARLY_LEASES: RefCell<HashMap<u32, Lease>> = RefCell::new(HashMap::new());
}

/// Starts accepting on each granted lease of a listener this worker serves
/// (Linux), and keeps the others until it does; a `NoLease` needs nothing.
fn take_leases(receiver: &LoopReceiver, leases: Vec<Lease>) {
    for lease in leases {
        if !SERVING.with(|s| s.borrow().contains(&lease.listener)) {
            EARLY_LEASES.with(|e| e.borrow_mut().insert(lease.listener, lease));
            continue;
        }
        #[cfg(target_os = "linux")]
        if let Some(grant) = lease.grant {
            direct::start(receiver, lease.listener, grant);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (receiver, lease);
    }
}

/// How long a worker waits for its lease before its server listens anyway
/// (it starts accepting whenever the lease arrives).
const LEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// This worker serves `listener` from now on. Under the ledger (`leased`)
/// it starts accepting on the lease the primary sent with its answer,
/// waiting for it if need be, before it returns, so the server is listening
/// once its callback runs, on the same tick as under node:cluster. Otherwise
/// it tells the primary to send connections. Returns connections that
/// arrived meanwhile, as a batch for `onBatch`.
#[napi]
pub fn worker_ready(listener: u32, leased: bool) -> Vec<u32> {
    let Some(w) = WORKER.get() else { return Vec::new() };
    let mut batch = Vec::new();
    SERVING.with(|s| s.borrow_mut().insert(listener));
    if !leased {
        let _ = w.ready(listener);
        with_receiver(LoopReceiver::follow_backlog);
        return batch;
    }
    let mut leases: Vec<Lease> = EARLY_LEASES.with(|e| e.borrow_mut().remove(&listener)).into_iter().collect();
    if leases.is_empty() {
        let _ = w.await_lease(listener, LEASE_TIMEOUT, &mut batch, &mut leases);
    }
    with_receiver(|receiver| {
        take_leases(receiver, leases);
        receiver.follow_backlog();
    });
    batch
}

#[napi]
pub fn worker_gone(listener: u32) -> i32 {
    SERVING.with(|s| s.borrow_mut().remove(&listener));
    EARLY_LEASES.with(|e| e.borrow_mut().remove(&listener));
    #[cfg(target_os = "linux")]
    direct::stop(listener);
    let rc = WORKER.get().map(|w| errno_of(w.gone(listener))).unwrap_or(0);
    with_receiver(LoopReceiver::follow_backlog);
    rc
}

/// Worker side of the ledger: per leased listener, two uv_polls of which one
/// runs at a time (see `acceptor`): on the listening socket while the worker
/// may accept, on the acceptor's epoll while the ledger makes it wait. Both
/// deliver through the channel's receiver.
#[cfg(target_os = "linux")]
mod direct {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::ffi::{c_int, c_void};

    use super::{new_handle, new_poll, uv, with_receiver, LoopReceiver};
    use crate::acceptor::Acceptor;
    use crate::worker_channel::Grant;

    /// How far ahead of the least-served worker one may accept while
    /// connections queue, at least (`CLUSTER_RS_LAG`; see `Acceptor::lag`).
    const DEFAULT_LAG: u64 = 8;
    /// Connections accepted per turn of the loop, as libuv accepts for a
    /// server of its own.
    const PER_TURN: usize = 1;

    struct Direct {
        listener: u32,
        acceptor: Acceptor,
        /// The poll on the listening socket, and the one on the acceptor's
        /// epoll; `waiting` says which of them runs.
        socket_poll: *mut c_void,
        events_poll: *mut c_void,
        waiting: bool,
        /// Runs on each turn of the loop (`Acceptor::on_loop_turn`).
        prepare: *mut c_void,
    }

    thread_local! {
        /// Each listener's Direct, which its handles point to.
        static DIRECTS: RefCell<HashMap<u32, *mut Direct>> = RefCell::new(HashMap::new());
    }

    pub fn start(receiver: &LoopReceiver, listener: u32, grant: Grant) {
        let lag = std::env::var("CLUSTER_RS_LAG").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_LAG);
        // An acceptor from an earlier lease leaves first: the primary gives
        // a worker that listens again its own slot back, which the new one
        // attaches to and the old one's leave would free.
        stop(listener);
        let Ok(acceptor) = Acceptor::new(grant.socket, grant.table, grant.progress, grant.slot as usize, lag, PER_TURN)
        else {
            // The slot stays free; connections still reach this worker when
            // others return them.
            return;
        };
        let (Some(socket_fd), events_fd) = (acceptor.socket_fd(), acceptor.events_fd()) else { return };
        let direct = Box::into_raw(Box::new(Direct {
            listener,
            acceptor,
            socket_poll: std::ptr::null_mut(),
            events_poll: std::ptr::null_mut(),
            waiting: false,
            prepare: std::ptr::null_mut(),
        }));
        // SAFETY: `direct` came from Box::into_raw above; nothing else refers to it yet.
        let d = unsafe { &mut *direct };
        let uv_loop = receiver.uv_loop;
        match (
            new_poll(uv_loop, socket_fd, direct.cast(), on_ready),
            new_poll(uv_loop, events_fd, direct.cast(), on_ready),
            // SAFETY: `handle` is writable memory of the right size and
            // `uv_loop` is this thread's running loop.
            new_handle(uv::UV_PREPARE, |handle| unsafe { uv::uv_prepare_init(uv_loop, handle) }, direct.cast()),
        ) {
            (Ok(socket_poll), Ok(events_poll), Ok(prepare)) => {
                // Not waiting yet: the socket's poll runs.
                // SAFETY: a started poll handle and an initialised prepare
                // handle of this loop; the callback matches uv_prepare_cb.
                unsafe {
                    uv::uv_poll_stop(events_poll);
                    uv::uv_prepare_start(prepare, on_loop_turn);
                }
                (d.socket_poll, d.events_poll, d.prepare) = (socket_poll, events_poll, prepare);
                DIRECTS.with(|m| m.borrow_mut().insert(listener, direct));
            }
            (socket_poll, events_poll, prepare) => {
                // The slot stays free, as above; what was made is undone.
                for handle in [socket_poll, events_poll, prepare].into_iter().flatten() {
                    // SAFETY: a handle of this loop, closed once; it frees only itself.
                    unsafe { uv::uv_close(handle, on_closed) };
                }
                // SAFETY: `direct` came from Box::into_raw; the closing handles never read it.
                drop(unsafe { Box::from_raw(direct) });
            }
        }
    }

    /// Stops accepting on `listener` at once; the handles are freed once
    /// libuv has closed them, the rest now.
    pub fn stop(listener: u32) {
        let Some(direct) = DIRECTS.with(|m| m.borrow_mut().remove(&listener)) else { return };
        // SAFETY: `direct` came from Box::into_raw in `start`, and no other
        // reference to it is live (we are not inside its callback's borrow).
        let mut direct = unsafe { Box::from_raw(direct) };
        // The socket's poll goes first: other processes hold the socket, so
        // closing our descriptor would not take it out of the loop's epoll.
        // SAFETY: handles of this loop, each closed once; their close
        // callback frees only the handle, never the Direct.
        unsafe {
            uv::uv_close(direct.socket_poll, on_closed);
            uv::uv_close(direct.events_poll, on_closed);
            uv::uv_close(direct.prepare, on_closed);
        }
        direct.acceptor.leave();
    }

    extern "C" fn on_loop_turn(handle: *mut c_void) {
        // SAFETY: `data` is the listener's Direct, alive while its handles are.
        let direct = unsafe { &*(*handle.cast::<*const Direct>()) };
        direct.acceptor.on_loop_turn();
    }

    extern "C" fn on_closed(handle: *mut c_void) {
        // SAFETY: libuv is done with the handle, which new_handle allocated.
        unsafe { libc::free(handle) };
    }

    extern "C" fn on_ready(handle: *mut c_void, _status: c_int, _events: c_int) {
        let (listener, fds) = {
            // SAFETY: `data` is the listener's Direct, alive while its polls
            // are (see `stop`); the borrow ends before JS runs.
            let direct = unsafe { &mut *(*handle.cast::<*mut Direct>()) };
            let mut fds = Vec::new();
            direct.acceptor.run(&mut fds);
            let waiting = direct.acceptor.waiting();
            if waiting != direct.waiting {
                direct.waiting = waiting;
                let (from, to) = if waiting {
                    (direct.socket_poll, direct.events_poll)
                } else {
                    (direct.events_poll, direct.socket_poll)
                };
                // SAFETY: both are open poll handles of this loop.
                unsafe {
                    uv::uv_poll_stop(from);
                    uv::uv_poll_start(to, uv::UV_READABLE, on_ready);
                }
            }
            (direct.listener, fds)
        };
        if fds.is_empty() {
            return;
        }
        // The receiver is set before any lease could arrive.
        with_receiver(|receiver| {
            let mut batch = Vec::with_capacity(fds.len() * 3);
            receiver.channel.adopt(listener, fds, &mut batch);
            receiver.deliver(batch);
        });
    }
}

/// Whether `fd` (the application's, in `bind({ fd })`) is a UDP socket.
#[napi]
pub fn is_udp_socket(fd: i32) -> bool {
    sockets::is_udp_socket(fd)
}

/// An unbound socket of the given kind ("tcp4", "tcp6", "unix", "udp4", "udp6"),
/// so JS can learn the class of handle Node makes for it. The caller owns it.
#[napi]
pub fn probe_socket(kind: String) -> i32 {
    use nix::sys::socket::{AddressFamily, SockType};
    let (family, ty) = match kind.as_str() {
        "tcp4" => (AddressFamily::Inet, SockType::Stream),
        "tcp6" => (AddressFamily::Inet6, SockType::Stream),
        "unix" => (AddressFamily::Unix, SockType::Stream),
        "udp4" => (AddressFamily::Inet, SockType::Datagram),
        "udp6" => (AddressFamily::Inet6, SockType::Datagram),
        _ => return -(nix::errno::Errno::EINVAL as i32),
    };
    match sys::socket(family, ty) {
        Ok(fd) => fd.into_raw_fd(),
        Err(e) => -(e.errno as i32),
    }
}

static TIMERS: OnceCell<Timers> = OnceCell::new();
static SLOTS: Mutex<Option<Slots>> = Mutex::new(None);

/// Starts the restart timer thread; `onDue(slot)` runs when a restart is due.
#[napi]
pub fn supervisor_start(on_due: Function<u32, ()>) -> Result<()> {
    if TIMERS.get().is_some() {
        return Ok(());
    }
    // Weak: JS keeps the primary alive while a restart is pending.
    let tsfn = on_due.build_threadsafe_function::<u32>().weak::<true>().build()?;
    let timers = Timers::start(move |slot| {
        tsfn.call(slot, ThreadsafeFunctionCallMode::NonBlocking);
    })
    .map_err(|e| Error::from_reason(format!("cluster-rs: cannot start the timer thread: {e}")))?;
    let _ = TIMERS.set(timers);
    Ok(())
}

#[napi(object)]
pub struct RestartDecision {
    pub give_up: bool,
    pub delay_ms: f64,
    pub quick_failures: u32,
}

/// Records that the worker in `slot` exited after `uptimeMs` (negative: its
/// process could not be spawned) and, unless the slot is given up,
/// schedules its restart. Durations are in milliseconds.
#[napi]
pub fn supervisor_exit(
    slot: u32,
    uptime_ms: f64,
    delay_ms: f64,
    max_delay_ms: f64,
    min_uptime_ms: f64,
    max_restarts: f64,
) -> RestartDecision {
    let ms = |v: f64| std::time::Duration::from_millis(v.max(0.0).min(u64::MAX as f64) as u64);
    let policy = Policy {
        delay: ms(delay_ms),
        max_delay: ms(max_delay_ms),
        min_uptime: ms(min_uptime_ms),
        max_restarts: max_restarts.max(0.0).min(u32::MAX as f64) as u32,
    };
    // A negative uptime: the process could not be spawned.
    let uptime = (uptime_ms >= 0.0).then(|| ms(uptime_ms));
    let decision = SLOTS.lock().unwrap().get_or_insert_with(Slots::default).on_exit(slot, &policy, uptime);
    match decision {
        Decision::GiveUp { quick_failures } => RestartDecision { give_up: true, delay_ms: 0.0, quick_failures },
        Decision::RestartAfter { delay, quick_failures } => {
            if let Some(t) = TIMERS.get() {
                t.schedule(slot, delay);
            }
            RestartDecision { give_up: false, delay_ms: delay.as_millis() as f64, quick_failures }
        }
    }
}

/// Cancels a pending restart of `slot` and forgets its backoff.
#[napi]
pub fn supervisor_cancel(slot: u32) -> bool {
    if let Some(s) = SLOTS.lock().unwrap().as_mut() {
        s.forget(slot);
    }
    TIMERS.get().is_some_and(|t| t.cancel(slot))
}

/// Ties a worker's life to its primary's (see `parent`). Returns true when
/// the primary is already gone (the worker should exit now).
#[napi]
pub fn worker_guard(primary_pid: i32) -> bool {
    let _ = crate::parent::follow();
    primary_pid > 0 && nix::unistd::getppid().as_raw() != primary_pid
}

/// Unties a worker that is leaving by disconnect: it finishes what it serves
/// even if the primary exits first, as node:cluster's workers do.
#[napi]
pub fn worker_unguard() {
    crate::parent::release();
}
