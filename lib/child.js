'use strict';
// The cluster object in a worker. `net` and `dgram` ask the built-in cluster
// module for server handles; the preload points that module's `_getServer`
// here. Round-robin servers get a faux handle, and connections arrive from the
// native data channel in batches: each one becomes a real TCP/Pipe handle
// passed to net's own `onconnection`, so 'connection', maxConnections,
// pauseOnConnect, allowHalfOpen, noDelay and keep-alive behave as without cluster.

const path = require('node:path');
const { sendControl, controlListener } = require('./protocol.js');

// node:cluster's own worker-side object, completed here, so that
// `require('node:cluster')` and `require('cluster-rs')` give one object in a
// worker, as both names do in node:cluster's workers. The built-in module
// picks its side from NODE_UNIQUE_ID when it is first loaded: the preload,
// first in NODE_OPTIONS, loads this module before any other code can.
function builtinWorkerSide() {
  process.env.NODE_UNIQUE_ID = '';
  try {
    return require('node:cluster');
  } finally {
    delete process.env.NODE_UNIQUE_ID;
  }
}

const cluster = builtinWorkerSide();
// Its Worker class too (an EventEmitter around `process`); disconnect() and
// destroy() are ours, below.
const { Worker } = cluster;
const handles = new Map(); // key -> handle, for disconnect
const indexes = new Map();
const byListener = new Map(); // native listener id -> { handle, server, isPipe }
const TIMEOUT_MAX = 2 ** 31 - 1;
let channelOpen = false;
// The addon (lib/native.js); null in a worker that may not load addons
// (see the preload), which then has no data channel either.
let native = null;

cluster._setupWorker = function setupWorker(id, channelFd, addon) {
  const worker = new Worker({ id, process, state: 'online' });
  cluster.worker = worker;
  native = addon;

  if (channelFd >= 0) {
    const rc = native.workerAttach(channelFd, onBatch);
    channelOpen = rc === 0;
    // Acknowledgements that found the channel full wait in the addon until
    // the primary reads; lost with us, they would send the connections we
    // took to another worker too.
    if (channelOpen) process.on('exit', () => native.workerFlush());
  }

  process.once('disconnect', () => {
    worker.emit('disconnect');
    // The primary went away without asking us to go: leave at once.
    if (!worker.exitedAfterDisconnect) process.exit(0);
  });

  process.on('internalMessage', controlListener(worker, onmessage));
  send({ act: 'online' });

  function onmessage(message) {
    if (message.act === 'disconnect') Reflect.apply(disconnectWorker, worker, [true]);
  }
};

// `obj` is a net.Server or a dgram.Socket.
cluster._getServer = function getServer(obj, options, cb) {
  let address = options.address;
  if (options.port < 0 && typeof address === 'string') address = path.resolve(address);

  const indexesKey = [address, options.port, options.addressType, options.fd].join(':');
  let indexSet = indexes.get(indexesKey);
  if (indexSet === undefined) {
    indexSet = { nextIndex: 0, set: new Set() };
    indexes.set(indexesKey, indexSet);
  }
  const index = indexSet.nextIndex++;
  indexSet.set.add(index);

  const message = { act: 'queryServer', index, data: null, ...options };
  message.address = address;

  // Custom data on the handle, e.g. TLS ticket keys shared by all workers.
  if (obj._getServerData) message.data = obj._getServerData();

  send(message, (reply, handle) => {
    if (typeof obj._setServerData === 'function') obj._setServerData(reply.data);
    if (handle) shared(reply, { handle, indexesKey, index }, cb);
    else roundRobin(reply, { indexesKey, index, server: obj }, cb);
  });

  obj.once('listening', () => {
    if (!indexes.has(indexesKey)) return; // closed already
    cluster.worker.state = 'listening';
    const bound = obj.address();
    message.act = 'listening';
    message.port = (bound && bound.port) || options.port;
    send(message);
  });
};

function removeIndexesKey(indexesKey, index) {
  const indexSet = indexes.get(indexesKey);
  if (!indexSet) return;
  indexSet.set.delete(index);
  if (indexSet.set.size === 0) indexes.delete(indexesKey);
}

// A socket shared by all workers (SCHED_NONE, UDP): a real handle.
function shared(message, { handle, indexesKey, index }, cb) {
  const key = message.key;
  const close = handle.close;
  handle.close = function closeShared() {
    send({ act: 'close', key });
    handles.delete(key);
    removeIndexesKey(indexesKey, index);
    return Reflect.apply(close, handle, arguments);
  };
  handles.set(key, handle);
  cb(message.errno, handle);
}

// Round-robin: the primary accepts; we get a faux handle that net.Server
// drives like a real one.
function roundRobin(message, { indexesKey, index, server }, cb) {
  if (message.errno) return cb(message.errno, null);
  if (!channelOpen) {
    // No data channel (no addon here): nothing could reach this server.
    // The primary counts us in already; leave, so that it lets the port go.
    send({ act: 'close', key: message.key });
    removeIndexesKey(indexesKey, index);
    return cb(-22 /* EINVAL */, null);
  }

  let key = message.key;
  const listener = message.listener;
  let keepAlive = null;

  function ref() {
    if (!keepAlive) keepAlive = setInterval(() => {}, TIMEOUT_MAX);
  }

  function unref() {
    if (keepAlive) {
      clearInterval(keepAlive);
      keepAlive = null;
    }
  }

  function listen() {
    return 0; // the primary's socket listens already
  }

  function close() {
    // net treats handle.close() as synchronous. Connections already on their
    // way are declined (see onBatch) and the primary gives them to others.
    if (key === undefined) return;
    unref();
    native.workerGone(listener);
    send({ act: 'close', key });
    handles.delete(key);
    byListener.delete(listener);
    removeIndexesKey(indexesKey, index);
    key = undefined;
  }

  function getsockname(out) {
    if (key) Object.assign(out, message.sockname);
    return 0;
  }

  const handle = { close, listen, ref, unref };
  handle.ref();
  if (message.sockname) handle.getsockname = getsockname; // TCP only

  handles.set(key, handle);
  byListener.set(listener, { handle, server, isPipe: !message.sockname });
  // Under the ledger this returns once the worker accepts itself, so that a
  // client that connects right after 'listening' meets it in turn.
  const early = native.workerReady(listener, Boolean(message.leased));
  if (early.length > 0) process.nextTick(onBatch, early);
  cb(0, handle);
  // What connections need is loaded once the server listens, not while its
  // listen waits for the primary: loaded then, it held up the reply.
  if (handleModule === undefined) setImmediate(handleMaker).unref();
}

// A batch from the native channel: [listener, seq, fd, listener, seq, fd, ...]:
// connections the primary handed over or the worker accepted itself. Each is
// taken or declined, and the primary hears of all of them in one write,
// before any of them reaches the app, as node:cluster's worker acknowledges
// a connection before its server sees it: a worker that dies in a
// 'connection' listener then takes its connections with it, and the primary
// hands none of them, half-used, to another worker.
function onBatch(batch) {
  const accepted = [];
  const declined = [];
  const taken = []; // [server handle, connection handle, ...]
  let added; // server -> connections taken in this batch, under maxConnections
  try {
    for (let i = 0; i + 2 < batch.length; i += 3) {
      const seq = batch[i + 1];
      const entry = byListener.get(batch[i]);
      const server = entry && entry.server;
      const limited = entry !== undefined && Boolean(server.maxConnections);
      const extra = limited && added !== undefined ? added.get(server) || 0 : 0;
      if (!entry || typeof entry.handle.onconnection !== 'function' ||
          (limited && server._connections + extra >= server.maxConnections)) {
        declined.push(seq);
        continue;
      }
      const handle = handleMaker().connectionHandle(batch[i + 2], entry.isPipe);
      if (typeof handle === 'number') {
        declined.push(seq);
        continue;
      }
      accepted.push(seq);
      taken.push(entry.handle, handle);
      if (limited) (added ||= new Map()).set(server, extra + 1);
    }
  } finally {
    // After an unexpected throw (making a handle), what is left of the
    // batch, from the entry it was making on, goes to another worker.
    for (let i = (accepted.length + declined.length) * 3; i + 2 < batch.length; i += 3) declined.push(batch[i + 1]);
    native.workerSettle(accepted, declined);
    // A 'connection' listener that closes its server does not stop the
    // rest of the batch: those were taken while it listened, and it serves
    // them (node:cluster's primary would give them to another worker).
    for (let i = 0; i < taken.length; i += 2) {
      try {
        taken[i].onconnection(0, taken[i + 1]);
      } catch (err) {
        // A 'connection' listener threw. Under node:cluster each connection
        // arrives in a message of its own, so the others are still served
        // and the error surfaces as uncaught: the same here.
        process.nextTick(rethrow, err);
      }
    }
  }
}

function rethrow(err) {
  throw err;
}

// Not loaded before the first round-robin server listens (see roundRobin):
// it brings in node:net, which an app that only uses dgram, or none, never
// needs, and two modules of ours.
let handleModule;
function handleMaker() {
  if (handleModule === undefined) handleModule = require('./handles.js');
  return handleModule;
}

function send(message, cb) {
  return sendControl(process, message, null, cb);
}

let disconnecting = false;

function disconnectWorker(primaryInitiated) {
  // Once: a second request (the primary's disconnect() called twice) would
  // close the IPC channel before the servers have, and the first one's
  // process.disconnect() would then throw ERR_IPC_DISCONNECTED.
  if (disconnecting) return;
  disconnecting = true;
  this.exitedAfterDisconnect = true;
  // Draining now, no longer an orphan to be: outlive the primary if need be.
  if (native !== null) native.workerUnguard();
  let waiting = 1;

  function checkWaiting() {
    waiting--;
    if (waiting !== 0) return;
    // A worker-initiated disconnect waits until the primary has recorded
    // exitedAfterDisconnect; a primary-initiated one need not.
    if (primaryInitiated) process.disconnect();
    else send({ act: 'exitedAfterDisconnect' }, () => process.disconnect());
  }

  for (const handle of handles.values()) {
    waiting++;
    const owner = ownerOf(handle);
    if (owner) owner.close(checkWaiting);
    else handle.close(checkWaiting);
  }
  handles.clear();
  checkWaiting();
}

// The net.Server or dgram.Socket that owns a handle (net stores it under an
// internal symbol; our faux handles know their server directly).
function ownerOf(handle) {
  for (const entry of byListener.values()) {
    if (entry.handle === handle) return entry.server;
  }
  for (const sym of Object.getOwnPropertySymbols(handle)) {
    if (sym.description === 'owner_symbol') return handle[sym];
  }
  return null;
}

Worker.prototype.disconnect = function disconnect() {
  if (this.state !== 'disconnecting' && this.state !== 'destroying') {
    this.state = 'disconnecting';
    Reflect.apply(disconnectWorker, this, []);
  }
  return this;
};

Worker.prototype.destroy = function destroy() {
  if (this.state === 'destroying') return;
  this.exitedAfterDisconnect = true;
  if (!this.isConnected()) {
    process.exit(0);
  } else {
    this.state = 'destroying';
    send({ act: 'exitedAfterDisconnect' }, () => process.disconnect());
    process.once('disconnect', () => process.exit(0));
  }
};

module.exports = cluster;
