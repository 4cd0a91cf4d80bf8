//! Thin, portable wrappers over the socket syscalls the core needs.
//!
//! Every descriptor leaves this module as an `OwnedFd` with close-on-exec set,
//! so no process that a primary or a worker spawns inherits a listening socket
//! or a channel. Linux sets the flag atomically (`SOCK_CLOEXEC`, `accept4`,
//! `MSG_CMSG_CLOEXEC`); macOS has none of those and sets it right after the call.

#[cfg(not(target_os = "linux"))]
use std::os::fd::AsFd;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

/// A failed syscall: the errno and the name of the call, as Node reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysError {
    pub syscall: &'static str,
    pub errno: Errno,
}

impl std::fmt::Display for SysError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} ({})", self.syscall, self.errno, self.errno.desc())
    }
}

impl std::error::Error for SysError {}

pub type SysResult<T> = Result<T, SysError>;

/// Names the syscall behind a `nix::Result`.
pub trait Syscall<T> {
    fn syscall(self, name: &'static str) -> SysResult<T>;
}

impl<T> Syscall<T> for nix::Result<T> {
    fn syscall(self, name: &'static str) -> SysResult<T> {
        self.map_err(|errno| SysError { syscall: name, errno })
    }
}

#[cfg(target_os = "linux")]
const ATOMIC_FLAGS: SockFlag = SockFlag::SOCK_CLOEXEC.union(SockFlag::SOCK_NONBLOCK);

/// `socket(2)`, close-on-exec and non-blocking.
pub fn socket(family: AddressFamily, ty: SockType) -> SysResult<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        socket::socket(family, ty, ATOMIC_FLAGS, None).syscall("socket")
    }
    #[cfg(not(target_os = "linux"))]
    {
        let fd = socket::socket(family, ty, SockFlag::empty(), None).syscall("socket")?;
        set_cloexec(fd.as_fd())?;
        set_nonblocking(fd.as_fd(), true)?;
        Ok(fd)
    }
}

/// A connected pair of Unix stream sockets, both close-on-exec, both blocking.
pub fn stream_pair() -> SysResult<(OwnedFd, OwnedFd)> {
    #[cfg(target_os = "linux")]
    {
        socket::socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).syscall("socketpair")
    }
    #[cfg(not(target_os = "linux"))]
    {
        let (a, b) =
            socket::socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::empty()).syscall("socketpair")?;
        set_cloexec(a.as_fd())?;
        set_cloexec(b.as_fd())?;
        Ok((a, b))
    }
}

/// Accepts one pending connection. The new descriptor is close-on-exec and
/// blocking: the worker's libuv makes it non-blocking when it wraps it.
pub fn accept(listener: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        socket::accept4(listener, SockFlag::SOCK_CLOEXEC).syscall("accept")
    }
    #[cfg(not(target_os = "linux"))]
    {
        let fd = socket::accept(listener).syscall("accept")?;
        set_cloexec(fd.as_fd())?;
        // BSD sockets inherit O_NONBLOCK from the listener; Linux's do not.
        set_nonblocking(fd.as_fd(), false)?;
        Ok(fd)
    }
}

/// Flags for `recvmsg` so that received descriptors are close-on-exec at once.
pub fn recv_cloexec_flags() -> socket::MsgFlags {
    #[cfg(target_os = "linux")]
    {
        socket::MsgFlags::MSG_CMSG_CLOEXEC
    }
    #[cfg(not(target_os = "linux"))]
    {
        socket::MsgFlags::empty()
    }
}

/// Takes ownership of descriptors that arrived in an `SCM_RIGHTS` message.
pub fn adopt_received(raw: &[RawFd]) -> Vec<OwnedFd> {
    raw.iter()
        .map(|&fd| {
            // SAFETY: the kernel installed `fd` in our table for this message
            // and nothing else refers to it yet, so we are its only owner.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            #[cfg(not(target_os = "linux"))]
            let _ = set_cloexec(owned.as_fd());
            owned
        })
        .collect()
}

pub fn set_cloexec(fd: BorrowedFd<'_>) -> SysResult<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).syscall("fcntl").map(drop)
}

pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> SysResult<()> {
    let bits = fcntl(fd, FcntlArg::F_GETFL).syscall("fcntl")?;
    let mut flags = OFlag::from_bits_truncate(bits);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags)).syscall("fcntl").map(drop)
}

/// Duplicates a descriptor we were given (e.g. `listen({ fd })`), close-on-exec.
pub fn dup_cloexec(fd: RawFd) -> SysResult<OwnedFd> {
    // SAFETY: only borrowed for the duration of the fcntl call; a bad number
    // makes fcntl fail with EBADF, it does not touch memory.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let new = fcntl(borrowed, FcntlArg::F_DUPFD_CLOEXEC(3)).syscall("dup")?;
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Takes ownership of a descriptor number that a caller hands over.
///
/// # Safety
/// `fd` must be open and owned by nobody else.
pub unsafe fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `TCP_INFO` of a TCP socket, with how many of its bytes the kernel filled
/// in (an older kernel fills in fewer fields); None for other sockets.
#[cfg(target_os = "linux")]
pub fn tcp_info(fd: RawFd) -> Option<(libc::tcp_info, usize)> {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    (rc == 0).then_some((info, len as usize))
}

/// What a connection's own counters say of whether a process that held it
/// used it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Nothing read from it, written to it or shut down on this side: the
    /// next to take it sees it as its client left it.
    Fresh,
    /// Read from, written to, shut down on this side, or already closed.
    Used,
    /// No way to tell: not TCP, a kernel older than 4.19, not Linux.
    Unknown,
}

/// The kernel's TCP states that `tcpi_state` reports and we look for
/// (include/net/tcp_states.h): those a fresh connection can be in, and a
/// listener's.
#[cfg(target_os = "linux")]
const TCP_ESTABLISHED: u8 = 1;
#[cfg(target_os = "linux")]
const TCP_CLOSE_WAIT: u8 = 8;
#[cfg(target_os = "linux")]
pub const TCP_LISTEN: u8 = 10;

/// Whether a process that held the accepted TCP connection `fd` used it,
/// from what the kernel counts: bytes sent or waiting to be sent, bytes
/// received beyond those still unread, and its state.
#[cfg(target_os = "linux")]
pub fn connection_use(fd: BorrowedFd<'_>) -> Use {
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    let counted = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_sent) + std::mem::size_of::<u64>();
    // Bytes that arrive between the two reads of the counters would pass for
    // bytes read: look again while they move.
    for _ in 0..3 {
        let Some((before, len)) = tcp_info(fd) else { return Use::Unknown };
        if len < counted {
            return Use::Unknown;
        }
        let state = before.tcpi_state;
        if !matches!(state, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
            || before.tcpi_bytes_sent > 0
            || before.tcpi_notsent_bytes > 0
        {
            return Use::Used;
        }
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer given.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } != 0 {
            return Use::Unknown;
        }
        let Some((after, _)) = tcp_info(fd) else { return Use::Unknown };
        if after.tcpi_bytes_received != before.tcpi_bytes_received || after.tcpi_state != state {
            continue;
        }
        // The client's FIN counts as a byte received, never as one unread.
        let fin = u64::from(state == TCP_CLOSE_WAIT);
        let read = before.tcpi_bytes_received.saturating_sub(fin).saturating_sub(unread.max(0) as u64);
        return if read == 0 { Use::Fresh } else { Use::Used };
    }
    // A client still sending: whether any of it was read cannot be told.
    Use::Used
}

#[cfg(not(target_os = "linux"))]
pub fn connection_use(_: BorrowedFd<'_>) -> Use {
    Use::Unknown
}

/// True when the errno means "try again later" on a non-blocking descriptor.
pub fn would_block(errno: Errno) -> bool {
    errno == Errno::EAGAIN || errno == Errno::EWOULDBLOCK
}

/// What a failed `accept` means for the loop that called it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// That connection is gone; the next one may be fine: accept again.
    Skip,
    /// Out of descriptors or memory: stop until some are freed.
    Starved,
    /// Nothing to take now: the queue is empty, or the socket no longer listens.
    Done,
}

pub fn accept_failure(errno: Errno) -> AcceptFailure {
    match errno {
        Errno::ECONNABORTED | Errno::EINTR | Errno::EPROTO => AcceptFailure::Skip,
        // Linux reports a pending connection's network error from accept
        // itself, and accept(2) says to treat those "like EAGAIN by
        // retrying": the queue behind it is still there. Taken as the end
        // of the queue, it left an edge-triggered acceptor waiting for the
        // next arrival.
        #[cfg(target_os = "linux")]
        Errno::ENETDOWN
        | Errno::ENOPROTOOPT
        | Errno::EHOSTDOWN
        | Errno::ENONET
        | Errno::EHOSTUNREACH
        | Errno::EOPNOTSUPP
        | Errno::ENETUNREACH => AcceptFailure::Skip,
        Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM => AcceptFailure::Starved,
        _ => AcceptFailure::Done,
    }
}

/// What a failed `sendmsg` on a data channel means for its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// Interrupted: send again now.
    Again,
    /// The peer's buffer is full: send again once the channel is writable.
    Full,
    /// The kernel is short of memory, or of room for descriptors in flight
    /// (ETOOMANYREFS): the channel is fine, but writable says nothing about
    /// when that passes, so send again after a pause.
    Pressure,
    /// The peer is gone, or the descriptor is unusable: the channel is over.
    Broken,
}

pub fn send_failure(errno: Errno) -> SendFailure {
    match errno {
        Errno::EINTR => SendFailure::Again,
        e if would_block(e) => SendFailure::Full,
        Errno::ENOBUFS | Errno::ENOMEM | Errno::ETOOMANYREFS => SendFailure::Pressure,
        _ => SendFailure::Broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    mod connection_use {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::os::fd::AsFd;

        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

        use super::super::{connection_use, stream_pair, Use};

        /// A loopback client and the server's end of its connection.
        fn pair() -> (TcpStream, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            (client, server)
        }

        /// Waits until `server` has something to read (or its client's FIN, with `RDHUP`).
        fn arrived(server: &TcpStream, flags: PollFlags) {
            let mut fds = [PollFd::new(server.as_fd(), flags)];
            assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
        }

        #[test]
        fn a_connection_nobody_read_or_answered_is_fresh() {
            let (mut client, server) = pair();
            assert_eq!(connection_use(server.as_fd()), Use::Fresh);
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            arrived(&server, PollFlags::POLLIN);
            assert_eq!(connection_use(server.as_fd()), Use::Fresh);
            // The client's FIN counts among the bytes received, never as unread.
            client.shutdown(Shutdown::Write).unwrap();
            arrived(&server, PollFlags::from_bits_retain(libc::POLLRDHUP));
            assert_eq!(connection_use(server.as_fd()), Use::Fresh);
        }

        #[test]
        fn a_connection_read_from_answered_or_shut_down_is_used() {
            let (mut client, mut server) = pair();
            client.write_all(b"abc").unwrap();
            arrived(&server, PollFlags::POLLIN);
            let mut one = [0u8; 1];
            server.read_exact(&mut one).unwrap();
            assert_eq!(connection_use(server.as_fd()), Use::Used, "read in part");

            let (mut client, mut server) = pair();
            client.write_all(b"abc").unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut all = Vec::new();
            server.read_to_end(&mut all).unwrap();
            assert_eq!(connection_use(server.as_fd()), Use::Used, "read to the end");

            let (_client, mut server) = pair();
            server.write_all(b"220 ready\r\n").unwrap();
            assert_eq!(connection_use(server.as_fd()), Use::Used, "answered");

            let (_client, server) = pair();
            server.shutdown(Shutdown::Write).unwrap();
            assert_eq!(connection_use(server.as_fd()), Use::Used, "shut down");
        }

        #[test]
        fn what_is_not_tcp_cannot_be_told() {
            let (a, _b) = stream_pair().unwrap();
            assert_eq!(connection_use(a.as_fd()), Use::Unknown);
        }
    }

    #[test]
    fn only_a_gone_peer_ends_a_channel() {
        assert_eq!(send_failure(Errno::EINTR), SendFailure::Again);
        assert_eq!(send_failure(Errno::EAGAIN), SendFailure::Full);
        for errno in [Errno::ENOBUFS, Errno::ENOMEM, Errno::ETOOMANYREFS] {
            assert_eq!(send_failure(errno), SendFailure::Pressure, "{errno}");
        }
        for errno in [Errno::EPIPE, Errno::ECONNRESET, Errno::EBADF, Errno::ENOTCONN] {
            assert_eq!(send_failure(errno), SendFailure::Broken, "{errno}");
        }
    }

    #[test]
    fn an_accept_error_of_one_connection_does_not_end_the_queue() {
        for errno in [Errno::ECONNABORTED, Errno::EINTR, Errno::EPROTO] {
            assert_eq!(accept_failure(errno), AcceptFailure::Skip, "{errno}");
        }
        #[cfg(target_os = "linux")]
        for errno in [
            Errno::ENETDOWN,
            Errno::ENOPROTOOPT,
            Errno::EHOSTDOWN,
            Errno::ENONET,
            Errno::EHOSTUNREACH,
            Errno::EOPNOTSUPP,
            Errno::ENETUNREACH,
        ] {
            assert_eq!(accept_failure(errno), AcceptFailure::Skip, "{errno}");
        }
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert_eq!(accept_failure(errno), AcceptFailure::Starved, "{errno}");
        }
        for errno in [Errno::EAGAIN, Errno::EWOULDBLOCK, Errno::EBADF, Errno::EINVAL, Errno::ENOTSOCK] {
            assert_eq!(accept_failure(errno), AcceptFailure::Done, "{errno}");
        }
    }
}
