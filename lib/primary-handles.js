'use strict';
// What the primary keeps per server key (address:port:type:fd:index), like
// node:cluster's RoundRobinHandle and SharedHandle, but the sockets are made
// by the native core, and round-robin connections never touch JavaScript.

const fs = require('node:fs');
const { isIP } = require('node:net');
const native = require('./native.js');
const { serverHandle, udpHandle } = require('./handles.js');

const UV_TCP_IPV6ONLY = 1;
const UV_UDP_IPV6ONLY = 1;
const UV_UDP_REUSEADDR = 4;
const UV_EINVAL = -22;

// Round-robin: the native core owns the socket; workers attach to it by
// listener id over their data channel. Either the dispatcher thread accepts
// and hands connections on, or (`leased`, the ledger on Linux) each worker
// accepts itself, kept to its fair share by a ledger in shared memory.
class RoundRobinHandle {
  constructor(key, address, { port, fd, flags, backlog, readableAll, writableAll }) {
    this.key = key;
    this.workers = new Map();
    let result;
    if (fd >= 0) {
      result = native.listenFd(fd, backlog | 0);
    } else if (port >= 0) {
      result = native.listenTcp(address || null, port, Boolean(flags & UV_TCP_IPV6ONLY), backlog | 0);
    } else {
      result = native.listenUnix(String(address), backlog | 0, Boolean(readableAll), Boolean(writableAll));
    }
    this.errno = result.errno;
    this.listener = result.id;
    this.leased = Boolean(result.leased);
    this.sockname = result.port === undefined || result.port === null ? null :
      { address: result.address, family: result.family, port: result.port };
  }

  // `channel`: the worker's data channel.
  add(worker, send, channel) {
    this.workers.set(worker.id, worker);
    if (this.errno) return send(this.errno, null, null);
    // Its lease goes out first, so that it is there when the worker reads
    // this answer (it would otherwise ask for it then, a round trip more).
    if (this.leased) native.joinListener(this.listener, channel);
    const reply = { listener: this.listener, leased: this.leased };
    if (this.sockname) reply.sockname = this.sockname; // TCP only, as node:cluster
    send(null, reply, null);
  }

  // True when the last worker left and the listener is closed.
  remove(worker) {
    if (!this.workers.delete(worker.id)) return false;
    if (this.workers.size !== 0) return false;
    this.close();
    return true;
  }

  close() {
    if (this.listener >= 0) native.closeListener(this.listener);
    this.listener = -1;
  }
}

// SCHED_NONE and UDP: one bound socket, made natively, sent to every worker
// over IPC; each worker accepts (or receives) on it itself.
class SharedHandle {
  constructor(key, address, { port, addressType, fd, flags, readableAll, writableAll }) {
    this.key = key;
    this.workers = new Map();
    this.handle = null;
    this.errno = 0;
    this.path = null;
    const udp = addressType === 'udp4' || addressType === 'udp6';
    let result;
    if (typeof fd === 'number' && fd >= 0) {
      // The application's own descriptor: wrap it as node:cluster does
      // (for UDP, only a UDP socket: anything else is EINVAL there too).
      let handle;
      if (!udp) handle = serverHandle(fd);
      else if (native.isUdpSocket(fd)) handle = udpHandle(fd);
      else handle = UV_EINVAL;
      if (typeof handle === 'number') this.errno = handle;
      else this.handle = handle;
      return;
    } else if (udp && address && isIP(address) !== (addressType === 'udp4' ? 4 : 6)) {
      // The socket's type sets the family, as libuv's bind does.
      this.errno = UV_EINVAL;
      return;
    } else if (udp) {
      result = native.bindSharedUdp(address || null, port | 0, Boolean(flags & UV_UDP_IPV6ONLY),
                                    Boolean(flags & UV_UDP_REUSEADDR));
    } else if (port >= 0) {
      result = native.bindSharedTcp(address || null, port, Boolean(flags & 1));
    } else {
      result = native.bindSharedUnix(String(address), Boolean(readableAll), Boolean(writableAll));
      // A file to remove when the last worker leaves; an abstract name
      // (leading NUL) has none.
      if (!result.errno && !String(address).startsWith('\0')) this.path = String(address);
    }
    if (result.errno) {
      this.errno = result.errno;
      return;
    }
    const handle = udp ? udpHandle(result.fd) : serverHandle(result.fd);
    if (typeof handle === 'number') {
      native.closeFd(result.fd); // no handle took it
      this.errno = handle;
    } else {
      this.handle = handle;
    }
  }

  add(worker, send) {
    this.workers.set(worker.id, worker);
    send(this.errno, null, this.handle);
  }

  remove(worker) {
    if (!this.workers.delete(worker.id)) return false;
    if (this.workers.size !== 0) return false;
    if (this.handle) this.handle.close();
    this.handle = null;
    // At once, as libuv does when a pipe server closes: the worker may
    // listen on the same path again with its next message.
    if (this.path) {
      try {
        fs.unlinkSync(this.path);
      } catch {
        // Gone already.
      }
    }
    return true;
  }
}

// SCHED_REUSEPORT (Linux): every worker gets its own listening socket on the
// same port (SO_REUSEPORT); the kernel spreads connections over their accept
// queues by connection hash, and the primary does nothing per connection.
// The primary keeps no copy: a socket nobody accepts on would still get its
// share of connections.
class ReusePortHandle {
  constructor(key, address, { port, flags }) {
    this.key = key;
    this.workers = new Map();
    this.address = address || null;
    this.port = port;
    this.ipv6Only = Boolean(flags & UV_TCP_IPV6ONLY);
  }

  add(worker, send) {
    const result = native.bindReusePort(this.address, this.port, this.ipv6Only);
    if (result.errno) return send(result.errno, null, null);
    const handle = serverHandle(result.fd);
    if (typeof handle === 'number') {
      native.closeFd(result.fd); // no handle took it
      return send(handle, null, null);
    }
    this.port = result.port; // listen(0): later workers join the same port
    this.workers.set(worker.id, worker);
    send(0, null, handle, () => handle.close());
  }

  remove(worker) {
    if (!this.workers.delete(worker.id)) return false;
    return this.workers.size === 0;
  }
}

module.exports = { RoundRobinHandle, SharedHandle, ReusePortHandle };
