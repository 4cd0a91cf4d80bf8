//! The primary's dispatcher: one thread that accepts connections on every
//! round-robin listener and hands them to workers over their channels.
//!
//! Invariants:
//! - A connection is held (its fd stays open here) from `accept` until a worker
//!   acks it as accepted. A decline, or the death of the worker's channel, puts
//!   it back in its listener's queue for another worker: nothing is lost.
//! - A worker never holds more than `window` unacknowledged connections, so a
//!   stuck worker cannot swallow connections; the rest wait in the kernel's
//!   backlog, which is where they are cheapest.
//! - A connection that every attached worker declined is closed, as a single
//!   server at `maxConnections` closes it.
//!
//! JavaScript talks to the thread through commands and a wake-up socket only.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::sockets::Listening;
use crate::sys::{self, SysResult};
use crate::wire::{self, Decoder, Incoming, Record, MAX_FDS_PER_MSG, RECORD_LEN};

/// Default number of connections a worker may hold unacknowledged.
pub const DEFAULT_WINDOW: usize = 4;

pub enum Command {
    /// The primary's end of a new worker's channel.
    AddChannel { id: u32, fd: OwnedFd },
    /// The worker is disconnecting: send it nothing more, keep reading its acks.
    RetireChannel { id: u32 },
    /// The worker is gone: give whatever it held to other workers.
    RemoveChannel { id: u32 },
    AddListener { id: u32, listening: Listening },
    /// No worker listens any more: close the socket and what waits on it.
    CloseListener { id: u32 },
    Stats { reply: mpsc::SyncSender<Vec<ChannelStats>> },
}

/// Per-worker counters, for tests and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub id: u32,
    pub handed: u64,
    pub accepted: u64,
    pub declined: u64,
    pub held: u32,
}

pub struct Dispatcher {
    commands: Option<mpsc::Sender<Command>>,
    wake: OwnedFd,
    next_id: AtomicU32,
    thread: Option<JoinHandle<()>>,
}

impl Dispatcher {
    pub fn start(window: usize) -> SysResult<Dispatcher> {
        let (wake, wake_rx) = sys::stream_pair()?;
        sys::set_nonblocking(wake.as_fd(), true)?;
        sys::set_nonblocking(wake_rx.as_fd(), true)?;
        let (tx, rx) = mpsc::channel();
        let mut state = Loop {
            wake: wake_rx,
            commands: rx,
            window: window.max(1),
            listeners: HashMap::new(),
            channels: HashMap::new(),
            next_seq: 0,
            starved: false,
        };
        let thread = std::thread::Builder::new()
            .name("cluster-rs-dispatch".into())
            .spawn(move || state.run())
            .map_err(|e| sys::SysError {
                syscall: "pthread_create",
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })?;
        Ok(Dispatcher { commands: Some(tx), wake, next_id: AtomicU32::new(1), thread: Some(thread) })
    }

    /// A fresh id for a listener or a channel.
    pub fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn send(&self, command: Command) {
        if let Some(tx) = &self.commands {
            if tx.send(command).is_ok() {
                self.wake_up();
            }
        }
    }

    pub fn stats(&self) -> Vec<ChannelStats> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Command::Stats { reply });
        answer.recv().unwrap_or_default()
    }

    fn wake_up(&self) {
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
    declines: usize,
}

struct Listener {
    socket: Listening,
    /// Channels attached to this listener, in round-robin order.
    members: Vec<u32>,
    cursor: usize,
    /// Accepted connections that no worker could take yet.
    pending: VecDeque<Conn>,
}

impl Listener {
    fn detach(&mut self, channel: u32) {
        if let Some(i) = self.members.iter().position(|&c| c == channel) {
            self.members.remove(i);
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
    /// Every connection handed to this worker and not yet acked, by sequence.
    held: HashMap<u32, Conn>,
    /// Sequences assigned to this worker but not yet written.
    queued: Vec<u32>,
    /// Bytes left over from a short write; they go out before anything new.
    tail: Vec<u8>,
    decoder: Decoder,
    retired: bool,
    broken: bool,
    stats: ChannelStats,
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
    listeners: HashMap<u32, Listener>,
    channels: HashMap<u32, Channel>,
    next_seq: u32,
    /// Out of descriptors (EMFILE and kin): stop accepting until one is freed.
    starved: bool,
}

impl Loop {
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
            self.dispatch();
            self.flush();
            self.drop_broken_channels();
        }
    }

    fn has_room(&self, channel: u32) -> bool {
        self.channels.get(&channel).is_some_and(|c| !c.retired && !c.broken && c.held.len() < self.window)
    }

    fn room(&self, listener: &Listener) -> usize {
        listener
            .members
            .iter()
            .filter_map(|id| self.channels.get(id))
            .filter(|c| !c.retired && !c.broken)
            .map(|c| self.window.saturating_sub(c.held.len()))
            .sum()
    }

    fn wait(&mut self) -> Result<Vec<(Token, PollFlags)>, Errno> {
        let mut tokens = vec![Token::Wake];
        let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        if !self.starved {
            for (&id, l) in &self.listeners {
                if l.pending.is_empty() && self.room(l) > 0 {
                    tokens.push(Token::Listener(id));
                    fds.push(PollFd::new(l.socket.fd.as_fd(), PollFlags::POLLIN));
                }
            }
        }
        for (&id, c) in &self.channels {
            let mut events = PollFlags::POLLIN;
            if !c.tail.is_empty() || !c.queued.is_empty() {
                events |= PollFlags::POLLOUT;
            }
            tokens.push(Token::Channel(id));
            fds.push(PollFd::new(c.fd.as_fd(), events));
        }
        let timeout = if self.starved { PollTimeout::from(100u16) } else { PollTimeout::NONE };
        let n = nix::poll::poll(&mut fds, timeout)?;
        if n == 0 {
            self.starved = false;
        }
        Ok(tokens
            .into_iter()
            .zip(fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())))
            .filter(|(_, ev)| !ev.is_empty())
            .collect())
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
                    self.channels.insert(id, Channel {
                        fd,
                        held: HashMap::new(),
                        queued: Vec::new(),
                        tail: Vec::new(),
                        decoder: Decoder::default(),
                        retired: false,
                        broken: false,
                        stats: ChannelStats { id, ..Default::default() },
                    });
                }
            }
            Command::RetireChannel { id } => {
                if let Some(c) = self.channels.get_mut(&id) {
                    c.retired = true;
                }
                self.listeners.values_mut().for_each(|l| l.detach(id));
            }
            Command::RemoveChannel { id } => self.remove_channel(id),
            Command::AddListener { id, listening } => {
                self.listeners.insert(id, Listener {
                    socket: listening,
                    members: Vec::new(),
                    cursor: 0,
                    pending: VecDeque::new(),
                });
            }
            Command::CloseListener { id } => {
                self.listeners.remove(&id);
                self.starved = false;
            }
            Command::Stats { reply } => {
                let mut all: Vec<ChannelStats> = self
                    .channels
                    .values()
                    .map(|c| ChannelStats { held: c.held.len() as u32, ..c.stats })
                    .collect();
                all.sort_by_key(|s| s.id);
                let _ = reply.send(all);
            }
        }
    }

    fn accept_from(&mut self, id: u32) {
        let Some(l) = self.listeners.get(&id) else { return };
        let budget = self.room(l);
        let l = self.listeners.get_mut(&id).unwrap();
        for _ in 0..budget {
            match sys::accept(l.socket.fd.as_fd()) {
                Ok(fd) => l.pending.push_back(Conn { fd, listener: id, declines: 0 }),
                Err(e) if sys::would_block(e.errno) => break,
                Err(e) if matches!(e.errno, Errno::ECONNABORTED | Errno::EINTR | Errno::EPROTO) => continue,
                Err(e) if matches!(e.errno, Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => {
                    self.starved = true;
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Assigns waiting connections to workers with room, round-robin.
    fn dispatch(&mut self) {
        let ids: Vec<u32> = self.listeners.iter().filter(|(_, l)| !l.pending.is_empty()).map(|(&id, _)| id).collect();
        for id in ids {
            loop {
                let l = self.listeners.get(&id).unwrap();
                if l.pending.is_empty() {
                    break;
                }
                let n = l.members.len();
                let pick = (0..n).map(|k| (l.cursor + k) % n).find(|&i| self.has_room(l.members[i]));
                let Some(index) = pick else { break };
                let l = self.listeners.get_mut(&id).unwrap();
                let channel_id = l.members[index];
                l.cursor = (index + 1) % n;
                let conn = l.pending.pop_front().unwrap();
                let seq = self.next_seq;
                self.next_seq = self.next_seq.wrapping_add(1);
                let c = self.channels.get_mut(&channel_id).unwrap();
                c.held.insert(seq, conn);
                c.queued.push(seq);
            }
        }
    }

    fn flush(&mut self) {
        for c in self.channels.values_mut() {
            flush_channel(c);
        }
    }

    fn read_channel(&mut self, id: u32) {
        let Some(c) = self.channels.get_mut(&id) else { return };
        let mut buf = [0u8; RECORD_LEN * 64];
        loop {
            let mut fds = Vec::new();
            match wire::recv(c.fd.as_raw_fd(), &mut buf, &mut fds) {
                Ok(0) => {
                    c.broken = true;
                    break;
                }
                // Descriptors from a worker are never expected; the decoder drops them.
                Ok(n) => c.decoder.push(&buf[..n], fds),
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
        for Incoming { record, .. } in incoming {
            self.on_record(id, record);
        }
    }

    fn on_record(&mut self, id: u32, record: Record) {
        let Some(c) = self.channels.get_mut(&id) else { return };
        match record {
            Record::Ack { seq, accepted: true } => {
                if c.held.remove(&seq).is_some() {
                    c.stats.accepted += 1;
                    self.starved = false;
                }
            }
            Record::Ack { seq, accepted: false } => {
                if let Some(mut conn) = c.held.remove(&seq) {
                    c.stats.declined += 1;
                    // A worker that is leaving declines everything it still
                    // held; that says nothing about the other workers' room.
                    let member = self.listeners.get(&conn.listener).is_some_and(|l| l.members.contains(&id));
                    if member {
                        conn.declines += 1;
                    }
                    self.requeue(conn);
                }
            }
            Record::Ready { listener } => {
                if c.retired || c.broken {
                    return;
                }
                if let Some(l) = self.listeners.get_mut(&listener) {
                    if !l.members.contains(&id) {
                        l.members.push(id);
                    }
                }
            }
            Record::Gone { listener } => {
                if let Some(l) = self.listeners.get_mut(&listener) {
                    l.detach(id);
                }
            }
            Record::Conn { .. } => {}
        }
    }

    /// Puts a connection back at the head of its queue, or closes it when its
    /// listener is gone or every attached worker has declined it.
    fn requeue(&mut self, conn: Conn) {
        let Some(l) = self.listeners.get_mut(&conn.listener) else { return };
        if conn.declines > 0 && conn.declines >= l.members.len().max(1) {
            return;
        }
        l.pending.push_front(conn);
    }

    fn remove_channel(&mut self, id: u32) {
        let Some(c) = self.channels.remove(&id) else { return };
        self.listeners.values_mut().for_each(|l| l.detach(id));
        let mut held: Vec<(u32, Conn)> = c.held.into_iter().collect();
        // Oldest first, so the re-queued ones keep their order at the head.
        held.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        for (_, conn) in held {
            self.requeue(conn);
        }
    }

    fn drop_broken_channels(&mut self) {
        let broken: Vec<u32> = self.channels.iter().filter(|(_, c)| c.broken).map(|(&id, _)| id).collect();
        for id in broken {
            self.remove_channel(id);
        }
    }
}

fn flush_channel(c: &mut Channel) {
    if c.broken {
        return;
    }
    if !c.tail.is_empty() {
        match wire::send(c.fd.as_raw_fd(), &c.tail, &[]) {
            Ok(n) => drop(c.tail.drain(..n)),
            Err(e) if sys::would_block(e.errno) => return,
            Err(_) => {
                c.broken = true;
                return;
            }
        }
        if !c.tail.is_empty() {
            return;
        }
    }
    while !c.queued.is_empty() {
        let count = c.queued.len().min(MAX_FDS_PER_MSG);
        let mut bytes = Vec::with_capacity(count * RECORD_LEN);
        let mut fds = Vec::with_capacity(count);
        for seq in &c.queued[..count] {
            let conn = &c.held[seq];
            Record::Conn { listener: conn.listener, seq: *seq }.encode(&mut bytes);
            fds.push(conn.fd.as_raw_fd());
        }
        match wire::send(c.fd.as_raw_fd(), &bytes, &fds) {
            Ok(n) => {
                c.queued.drain(..count);
                c.stats.handed += count as u64;
                if n < bytes.len() {
                    c.tail.extend_from_slice(&bytes[n..]);
                    return;
                }
            }
            Err(e) if sys::would_block(e.errno) => return,
            Err(_) => {
                c.broken = true;
                return;
            }
        }
    }
}
