'use strict';
// Node handles made from descriptors the native core hands us. The handle
// classes are not public, so we learn them once from a handle Node itself
// builds around a throwaway socket, then construct connection handles
// directly (type SOCKET, as libuv's own accept would).

const net = require('node:net');
const native = require('./native.js');
const { systemError } = require('./errors.js');

const SOCKET = 0; // TCPConstants.SOCKET and PipeConstants.SOCKET
const classes = new Map();

function handleClass(kind) {
  let Class = classes.get(kind);
  if (Class === undefined) {
    const fd = native.probeSocket(kind);
    if (fd < 0) throw systemError(fd, 'socket');
    const probe = net._createServerHandle(null, 0, 4, fd);
    if (typeof probe === 'number') throw systemError(probe, 'open');
    Class = probe.constructor;
    probe.close();
    classes.set(kind, Class);
  }
  return Class;
}

// A connected TCP or Pipe handle that owns `fd`, or a negative errno.
function connectionHandle(fd, isPipe) {
  const Class = handleClass(isPipe ? 'unix' : 'tcp4');
  const handle = new Class(SOCKET);
  const err = handle.open(fd);
  if (err) {
    handle.close();
    return err;
  }
  return handle;
}

// A server handle (TCP or Pipe, bound and maybe listening) that owns `fd`.
function serverHandle(fd) {
  return net._createServerHandle(null, 0, 4, fd);
}

// A UDP handle that owns `fd`. dgram's own factory for this is deprecated,
// so the class comes from the handle inside a (never bound) dgram socket.
let UDP;
function udpHandle(fd) {
  if (UDP === undefined) {
    const dgram = require('node:dgram');
    const probe = dgram.createSocket('udp4');
    const state = Object.getOwnPropertySymbols(probe).map((s) => probe[s])
      .find((v) => v && typeof v === 'object' && v.handle && typeof v.handle.recvStart === 'function');
    UDP = state.handle.constructor;
    probe.close();
  }
  const handle = new UDP();
  const err = handle.open(fd);
  if (err) {
    handle.close();
    return err;
  }
  return handle;
}

module.exports = { connectionHandle, serverHandle, udpHandle };
