//! Creating the sockets a primary owns: listening TCP and Unix sockets for
//! round-robin, and bound (not listening) TCP/UDP sockets that are shared with
//! workers under SCHED_NONE. Behaves like libuv's `uv_tcp_bind`/`uv_pipe_bind`
//! so that errors and socket options match what a Node server would get.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage, UnixAddr,
};

use crate::sys::{self, SysError, SysResult, Syscall};

/// Node's default `listen()` backlog.
pub const DEFAULT_BACKLOG: i32 = 511;

/// What a TCP or UDP socket binds to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSpec {
    /// `None` means "any address": dual-stack `::`, or `0.0.0.0` where IPv6 is missing.
    pub host: Option<IpAddr>,
    /// The interface of a scoped IPv6 address (`fe80::1%eth0`), or 0.
    pub scope_id: u32,
    pub port: u16,
    pub ipv6_only: bool,
    /// UDP only: `reuseAddr` of `dgram.createSocket`.
    pub reuse_addr: bool,
    /// SO_REUSEPORT: one socket per worker on the same port (SCHED_REUSEPORT).
    pub reuse_port: bool,
}

/// A listening socket plus the path to unlink when it closes (Unix sockets).
#[derive(Debug)]
pub struct Listening {
    pub fd: OwnedFd,
    pub unlink_on_close: UnlinkOnDrop,
    /// Set when `fd` duplicates a socket the application passed by number
    /// (`listen({ fd })`); see `Adopted`.
    pub adopted: Option<Adopted>,
}

/// The descriptor number an application passed to `listen({ fd })`, while
/// a listener works on a duplicate of it. The number stays the app's: it is
/// never closed here (so a worker that listens on it again after every
/// other has closed, a restart, gets it again), and the socket is never shut
/// down (systemd's socket activation holds it too, and queues connections
/// while the service restarts). As under node:cluster, whose handle wraps
/// the number, a second server on the number meanwhile fails with EEXIST.
#[derive(Debug)]
pub struct Adopted {
    fd: RawFd,
}

/// The numbers adopted by listeners that are still open.
static ADOPTED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

impl Drop for Adopted {
    fn drop(&mut self) {
        let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
        adopted.retain(|&fd| fd != self.fd);
    }
}

/// Removes a Unix socket's file when dropped, as libuv does when a pipe server closes.
#[derive(Debug, Default)]
pub struct UnlinkOnDrop(Option<PathBuf>);

impl UnlinkOnDrop {
    /// Leaves the file in place: someone else now owns the socket and its path.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

/// The name of interface `index`, or the number itself when it has none.
pub fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return index.to_string();
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// Parses a host as Node accepts it, including an IPv6 zone (`fe80::1%eth0`
/// or `fe80::1%2`). `None` when it is not an IP address or the zone is unknown.
pub fn parse_host(host: &str) -> Option<(IpAddr, u32)> {
    let (ip, zone) = match host.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (host, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let scope = match zone {
        None => 0,
        Some(_) if ip.is_ipv4() => return None,
        Some(z) => match z.parse::<u32>() {
            Ok(n) => n,
            Err(_) => nix::net::if_::if_nametoindex(z).ok()?,
        },
    };
    Some((ip, scope))
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The local address of an inet socket, as `server.address()` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockName {
    pub address: String,
    pub family: &'static str,
    pub port: u16,
}

fn bind_inet(ty: SockType, addr: SocketAddr, spec: &InetSpec) -> SysResult<OwnedFd> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = sys::socket(family, ty)?;
    if ty == SockType::Stream || spec.reuse_addr {
        // libuv always sets SO_REUSEADDR on TCP servers; UDP only on request.
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).syscall("setsockopt")?;
        #[cfg(not(target_os = "linux"))]
        if ty == SockType::Datagram {
            // BSD needs SO_REUSEPORT for several UDP sockets on one port, as libuv does.
            socket::setsockopt(&fd, sockopt::ReusePort, &true).syscall("setsockopt")?;
        }
    }
    if spec.reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).syscall("setsockopt")?;
    }
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &spec.ipv6_only).syscall("setsockopt")?;
    }
    let bound = match addr {
        SocketAddr::V4(v4) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(v6)),
    };
    bound.syscall("bind")?;
    Ok(fd)
}

/// Binds like Node does when no host is given: `::` first, `0.0.0.0` where
/// IPv6 fails. A port in use is not such a failure (libuv reports it, it does
/// not fall back), so EADDRINUSE is returned as it is.
fn bind_any(ty: SockType, spec: &InetSpec) -> SysResult<OwnedFd> {
    match spec.host {
        Some(IpAddr::V6(v6)) => bind_inet(ty, SocketAddr::V6(SocketAddrV6::new(v6, spec.port, 0, spec.scope_id)), spec),
        Some(ip) => bind_inet(ty, SocketAddr::new(ip, spec.port), spec),
        None => match bind_inet(ty, SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), spec.port), spec) {
            Err(e) if e.errno != Errno::EADDRINUSE => {
                bind_inet(ty, SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), spec.port), spec)
            }
            other => other,
        },
    }
}

/// The backlog `listen(2)` gets for a requested `n`: as Node passes it, the
/// kernel clamping it to its own limit (`net.core.somaxconn` on Linux), not
/// to the compile-time SOMAXCONN, which a tuned host may well exceed.
fn backlog(n: i32) -> i32 {
    if n <= 0 {
        DEFAULT_BACKLOG
    } else {
        n
    }
}

fn start_listening(fd: &OwnedFd, n: i32) -> SysResult<()> {
    // SAFETY: listen(2) on a socket we own; any backlog value is valid.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), backlog(n)) };
    Errno::result(rc).map(drop).syscall("listen")
}

/// A listening TCP socket for round-robin.
pub fn listen_tcp(spec: &InetSpec, n: i32) -> SysResult<Listening> {
    let fd = bind_any(SockType::Stream, spec)?;
    start_listening(&fd, n)?;
    Ok(Listening { fd, unlink_on_close: UnlinkOnDrop::default(), adopted: None })
}

/// A bound, not yet listening, TCP socket to share with workers (SCHED_NONE):
/// each worker's `server.listen()` calls `listen(2)` on it, as with node:cluster.
pub fn bind_tcp(spec: &InetSpec) -> SysResult<OwnedFd> {
    bind_any(SockType::Stream, spec)
}

/// A bound UDP socket to share with workers.
pub fn bind_udp(spec: &InetSpec) -> SysResult<OwnedFd> {
    bind_any(SockType::Datagram, spec)
}

/// sun_path's size less the leading NUL of an abstract name.
#[cfg(any(target_os = "linux", target_os = "android"))]
const ABSTRACT_NAME_MAX: usize = 107;

fn unix_addr(path: &str) -> SysResult<(UnixAddr, Option<PathBuf>)> {
    if let Some(name) = path.strip_prefix('\0') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            // Node 20's libuv binds and connects abstract names with the whole
            // sun_path, NUL-padded; the same address is needed to be reachable.
            let mut padded = name.as_bytes().to_vec();
            if padded.len() > ABSTRACT_NAME_MAX {
                return Err(SysError { syscall: "bind", errno: Errno::ENAMETOOLONG });
            }
            padded.resize(ABSTRACT_NAME_MAX, 0);
            return UnixAddr::new_abstract(&padded).syscall("bind").map(|a| (a, None));
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(SysError { syscall: "bind", errno: Errno::EINVAL });
        }
    }
    let addr = UnixAddr::new(path).syscall("bind")?;
    Ok((addr, Some(PathBuf::from(path))))
}

/// A Unix stream socket at `path`, bound; listening when `n` is given.
/// `mode` adds read/write permission for everyone, like `readableAll`/`writableAll`.
pub fn bind_unix(
    path: &str,
    listen_backlog: Option<i32>,
    readable_all: bool,
    writable_all: bool,
) -> SysResult<Listening> {
    let (addr, file) = unix_addr(path)?;
    let fd = sys::socket(AddressFamily::Unix, SockType::Stream)?;
    socket::bind(fd.as_raw_fd(), &addr).syscall("bind").map_err(|e| match e.errno {
        // As libuv's uv_pipe_bind reports a missing directory.
        Errno::ENOENT => SysError { errno: Errno::EACCES, ..e },
        _ => e,
    })?;
    let listening = Listening { fd, unlink_on_close: UnlinkOnDrop(file), adopted: None };
    if let Some(n) = listen_backlog {
        start_listening(&listening.fd, n)?;
    }
    if readable_all || writable_all {
        chmod_all(path, readable_all, writable_all)?;
    }
    Ok(listening)
}

fn chmod_all(path: &str, readable: bool, writable: bool) -> SysResult<()> {
    use std::os::unix::fs::PermissionsExt;
    let to_err = |e: std::io::Error| SysError {
        syscall: "chmod",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    };
    let meta = std::fs::metadata(path).map_err(to_err)?;
    let mut mode = meta.permissions().mode();
    if readable {
        mode |= 0o444;
    }
    if writable {
        mode |= 0o222;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(to_err)
}

/// Adopts a socket the application passed by number (`listen({ fd })`; see
/// `Adopted`): a close-on-exec duplicate that listens. `watched` says
/// whether the process's event loop watches the number already.
pub fn listen_fd(original: RawFd, n: i32, watched: impl FnOnce(RawFd) -> bool) -> SysResult<Listening> {
    let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    let fd = sys::dup_cloexec(original).map_err(|e| match e.errno {
        // Not open: EINVAL, as Node's own listen({ fd }) says.
        Errno::EBADF => SysError { syscall: "listen", errno: Errno::EINVAL },
        _ => e,
    })?;
    // Not a stream socket (or not a socket at all): EINVAL, as Node says.
    if socket::getsockopt(&fd, sockopt::SockType) != Ok(SockType::Stream) {
        return Err(SysError { syscall: "listen", errno: Errno::EINVAL });
    }
    // Another listener has it, or the event loop watches it (a server or a
    // connection of the primary's own): EEXIST, as libuv says when asked to
    // open a descriptor that one of its handles watches.
    if adopted.contains(&original) || watched(original) {
        return Err(SysError { syscall: "listen", errno: Errno::EEXIST });
    }
    sys::set_nonblocking(fd.as_fd(), true)?;
    start_listening(&fd, n)?;
    adopted.push(original);
    Ok(Listening { fd, unlink_on_close: UnlinkOnDrop::default(), adopted: Some(Adopted { fd: original }) })
}

/// Whether `fd` is an open IPv4 or IPv6 datagram socket: what libuv takes
/// for a UDP handle (`uv_guess_handle`).
pub fn is_udp_socket(fd: RawFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are valid for writes of the sizes given; a
    // number that is not an open socket only makes the call fail.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut ty as *mut libc::c_int).cast(), &mut len)
    };
    rc == 0
        && ty == libc::SOCK_DGRAM
        && socket::getsockname::<SockaddrStorage>(fd)
            .is_ok_and(|a| matches!(a.family(), Some(AddressFamily::Inet | AddressFamily::Inet6)))
}

/// The local address of an inet socket; `None` for a Unix socket.
pub fn sockname(fd: &OwnedFd) -> SysResult<Option<SockName>> {
    let storage: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).syscall("getsockname")?;
    if let Some(v4) = storage.as_sockaddr_in() {
        return Ok(Some(SockName { address: v4.ip().to_string(), family: "IPv4", port: v4.port() }));
    }
    if let Some(v6) = storage.as_sockaddr_in6() {
        let mut address = v6.ip().to_string();
        // Like Node, name the interface of a link-local address: fe80::1%eth0.
        if v6.ip().segments()[0] & 0xffc0 == 0xfe80 && v6.scope_id() != 0 {
            address = format!("{address}%{}", interface_name(v6.scope_id()));
        }
        return Ok(Some(SockName { address, family: "IPv6", port: v6.port() }));
    }
    let _ = storage.family();
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> InetSpec {
        InetSpec {
            host: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            scope_id: 0,
            port,
            ipv6_only: false,
            reuse_addr: false,
            reuse_port: false,
        }
    }

    #[test]
    fn tcp_listener_reports_its_port_and_is_cloexec() {
        let l = listen_tcp(&loopback(0), 16).unwrap();
        let name = sockname(&l.fd).unwrap().unwrap();
        assert_eq!(name.family, "IPv4");
        assert_eq!(name.address, "127.0.0.1");
        assert_ne!(name.port, 0);
        let flags = nix::fcntl::fcntl(l.fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn second_bind_on_same_port_is_eaddrinuse() {
        let first = listen_tcp(&loopback(0), 16).unwrap();
        let port = sockname(&first.fd).unwrap().unwrap().port;
        let err = listen_tcp(&loopback(port), 16).unwrap_err();
        assert_eq!(err, SysError { syscall: "bind", errno: Errno::EADDRINUSE });
    }

    #[test]
    fn unix_listener_unlinks_its_path_on_drop() {
        let dir = std::env::temp_dir().join(format!("cluster-rs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let p = path.to_str().unwrap();
        let l = bind_unix(p, Some(8), true, false).unwrap();
        assert!(path.exists());
        assert_eq!(sockname(&l.fd).unwrap(), None);
        let again = bind_unix(p, Some(8), false, false).unwrap_err();
        assert_eq!(again.errno, Errno::EADDRINUSE);
        drop(l);
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_names_are_padded_like_libuv_so_node_clients_reach_them() {
        let name = format!("\0cluster-rs-unit-{}", std::process::id());
        let l = bind_unix(&name, Some(4), false, false).unwrap();
        assert!(l.unlink_on_close.0.is_none(), "nothing to unlink for an abstract name");
        let table = std::fs::read_to_string("/proc/net/unix").unwrap();
        let shown = format!("@{}{}", &name[1..], "@".repeat(107 - (name.len() - 1)));
        assert!(table.lines().any(|line| line.ends_with(&shown)), "not bound as {shown}");
        let too_long = format!("\0{}", "x".repeat(108));
        assert_eq!(bind_unix(&too_long, Some(4), false, false).unwrap_err().errno, Errno::ENAMETOOLONG);
    }

    #[test]
    fn an_adopted_number_is_taken_once_at_a_time_and_stays_open() {
        let given = listen_tcp(&loopback(0), 16).unwrap().fd;
        let first = listen_fd(given.as_raw_fd(), 16, |_| false).unwrap();
        assert_eq!(listen_fd(given.as_raw_fd(), 16, |_| false).unwrap_err().errno, Errno::EEXIST);
        drop(first);
        // The number is still the app's, and may be listened on again.
        let again = listen_fd(given.as_raw_fd(), 16, |_| false).unwrap();
        assert_ne!(again.fd.as_raw_fd(), given.as_raw_fd());
    }

    #[test]
    fn a_number_the_event_loop_watches_is_refused_after_the_type_check() {
        let given = listen_tcp(&loopback(0), 16).unwrap().fd;
        let err = listen_fd(given.as_raw_fd(), 16, |fd| fd == given.as_raw_fd()).unwrap_err();
        assert_eq!(err.errno, Errno::EEXIST);
        let udp = bind_udp(&loopback(0)).unwrap();
        assert_eq!(listen_fd(udp.as_raw_fd(), 16, |_| true).unwrap_err().errno, Errno::EINVAL);
    }

    #[test]
    fn udp_sockets_share_a_port_only_with_reuse_addr() {
        let mut spec = loopback(0);
        spec.reuse_addr = true;
        let a = bind_udp(&spec).unwrap();
        spec.port = sockname(&a).unwrap().unwrap().port;
        let b = bind_udp(&spec).unwrap();
        assert_eq!(sockname(&b).unwrap().unwrap().port, spec.port);
        spec.reuse_addr = false;
        assert_eq!(bind_udp(&spec).unwrap_err().errno, Errno::EADDRINUSE);
    }

    #[test]
    fn hosts_parse_with_and_without_a_zone() {
        assert_eq!(parse_host("127.0.0.1"), Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 0)));
        assert_eq!(parse_host("fe80::1%7"), Some(("fe80::1".parse().unwrap(), 7)));
        assert_eq!(parse_host("fe80::1%lo").map(|(_, s)| s), nix::net::if_::if_nametoindex("lo").ok());
        assert_eq!(parse_host("fe80::1%no-such-interface0"), None);
        assert_eq!(parse_host("127.0.0.1%1"), None);
        assert_eq!(parse_host("localhost"), None);
    }

    #[test]
    fn reuse_port_sockets_share_a_port_and_listen_independently() {
        let mut spec = loopback(0);
        spec.reuse_port = true;
        let a = bind_tcp(&spec).unwrap();
        spec.port = sockname(&a).unwrap().unwrap().port;
        let b = bind_tcp(&spec).unwrap();
        start_listening(&a, 8).unwrap();
        start_listening(&b, 8).unwrap();
        spec.reuse_port = false;
        assert_eq!(bind_tcp(&spec).unwrap_err().errno, Errno::EADDRINUSE);
    }

    #[test]
    fn the_backlog_asked_for_is_passed_on_for_the_kernel_to_clamp() {
        assert_eq!(backlog(0), DEFAULT_BACKLOG);
        assert_eq!(backlog(-1), DEFAULT_BACKLOG);
        assert_eq!(backlog(16), 16);
        assert_eq!(backlog(65_535), 65_535, "not clamped to the compile-time SOMAXCONN");
        // And listen(2) takes it.
        listen_tcp(&loopback(0), 65_535).unwrap();
    }

    #[test]
    fn listen_fd_rejects_a_datagram_socket_and_bad_numbers() {
        let udp = bind_udp(&loopback(0)).unwrap();
        assert_eq!(listen_fd(udp.as_raw_fd(), 8, |_| false).unwrap_err().errno, Errno::EINVAL);
        // Not open: EINVAL, as Node's own listen({ fd }) reports it.
        assert_eq!(listen_fd(987_654, 8, |_| false).unwrap_err().errno, Errno::EINVAL);
    }
}
