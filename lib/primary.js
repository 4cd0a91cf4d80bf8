'use strict';
// The cluster object in the primary. Its API and event order follow
// node:cluster; what differs is underneath: every worker gets a native data
// channel (an extra stdio fd) over which the native dispatcher hands it
// connections, and workers start with a preload that turns them into
// cluster-rs workers even when their code never requires cluster-rs.

const path = require('node:path');
const EventEmitter = require('node:events');
const { fork } = require('node:child_process');
const native = require('./native.js');
const { ENV, sendControl, controlListener } = require('./protocol.js');
const { RoundRobinHandle, SharedHandle, ReusePortHandle } = require('./primary-handles.js');
const { createSupervisor, validateSettings } = require('./supervisor.js');
const { badPort, validatePort, systemError, invalidArgValue } = require('./errors.js');

// node:cluster's own primary-side object (an EventEmitter), taken over: our
// members replace its own below, so that `require('node:cluster')` and
// `require('cluster-rs')` are one object in the primary, as they are in a
// worker. Libraries that use node:cluster (metrics aggregators, sticky
// sessions) then see our workers and events.
const cluster = require('node:cluster');
// Its Worker class too (an EventEmitter around the worker's ChildProcess);
// disconnect() and destroy() are ours, below.
const { Worker } = cluster;
const intercom = new EventEmitter();
const SCHED_NONE = 1;
const SCHED_RR = 2;
const SCHED_REUSEPORT = 3; // cluster-rs only; Linux (elsewhere it acts as SCHED_NONE)
const PRELOAD = path.join(__dirname, 'preload.js');

const handles = new Map();
const kChannel = Symbol('cluster-rs.channel');
// What a worker was forked with: its env and the settings of the time,
// which its restarts and reloads fork with again.
const kLaunch = Symbol('cluster-rs.launch');
const kSlot = Symbol('cluster-rs.slot');
const kStarted = Symbol('cluster-rs.started');
// Set when the app stops a worker on purpose (kill/destroy): never restarted.
const kStopped = Symbol('cluster-rs.stopped');
let ids = 0;
let initialized = false;

// Marks the object as taken over: another copy of cluster-rs loaded later
// in this process uses it as it is (see index.js).
cluster[Symbol.for('cluster-rs.primary')] = __filename;
cluster.isWorker = false;
cluster.isMaster = true;
cluster.isPrimary = true;
// The built-in's own `workers` object, kept: a library that took it before
// cluster-rs loaded (`const { workers } = require('cluster')`) sees ours.
if (cluster.workers === null || typeof cluster.workers !== 'object') cluster.workers = {};
cluster.settings = {};
cluster.SCHED_NONE = SCHED_NONE;
cluster.SCHED_RR = SCHED_RR;
cluster.SCHED_REUSEPORT = SCHED_REUSEPORT;

let schedulingPolicy = process.env.NODE_CLUSTER_SCHED_POLICY;
if (schedulingPolicy === 'rr') schedulingPolicy = SCHED_RR;
else if (schedulingPolicy === 'none') schedulingPolicy = SCHED_NONE;
else if (schedulingPolicy === 'reuseport') schedulingPolicy = SCHED_REUSEPORT;
else schedulingPolicy = SCHED_RR;
cluster.schedulingPolicy = schedulingPolicy;

cluster.setupPrimary = function setupPrimary(options) {
  const settings = {
    args: process.argv.slice(2),
    exec: process.argv[1],
    execArgv: process.execArgv,
    silent: false,
    ...cluster.settings,
    ...options,
  };

  // One V8 profile log per process, as node:cluster arranges.
  // (Not an array of strings: fork() says so, as under node:cluster.)
  const flag = (prefix) => Array.isArray(settings.execArgv) &&
    settings.execArgv.some((s) => typeof s === 'string' && s.startsWith(prefix));
  if (flag('--prof') && !flag('--logfile=')) {
    settings.execArgv = [...settings.execArgv, '--logfile=v8-%p.log'];
  }

  validateSettings(settings);
  cluster.settings = settings;
  supervisor.configure(settings);

  if (initialized === true) return process.nextTick(emitSetup, settings);

  initialized = true;
  schedulingPolicy = cluster.schedulingPolicy; // frozen from here on
  if (schedulingPolicy !== SCHED_NONE && schedulingPolicy !== SCHED_RR && schedulingPolicy !== SCHED_REUSEPORT) {
    const err = new Error(`Bad cluster.schedulingPolicy: ${schedulingPolicy}`);
    err.code = 'ERR_INTERNAL_ASSERTION';
    throw err;
  }

  process.nextTick(emitSetup, settings);

  process.on('internalMessage', (message) => {
    if (message === null || typeof message !== 'object' || message.cmd !== 'NODE_DEBUG_ENABLED') return;
    for (const worker of Object.values(cluster.workers)) {
      if (worker.state === 'online' || worker.state === 'listening') {
        process._debugProcess(worker.process.pid);
      } else {
        worker.once('online', function onOnline() { process._debugProcess(this.process.pid); });
      }
    }
  });
};

cluster.setupMaster = cluster.setupPrimary;

function emitSetup(settings) {
  cluster.emit('setup', settings);
}

// Inspector ports for workers: same rules as node:cluster.
const kInspectArg = /--inspect(?:-brk|-port)?|--debug-port/;
let debugPortOffset = 1;

function usesInspector(execArgv) {
  return execArgv.some((arg) => kInspectArg.test(arg)) || kInspectArg.test(process.env.NODE_OPTIONS);
}

function inspectPortFor(setting) {
  let port = setting;
  if (typeof port === 'function') {
    port = port();
  } else if (port == null) {
    port = process.debugPort + debugPortOffset;
    if (port > 65535) port = port - 65535 + 1024 - 1;
    debugPortOffset++;
  }
  validatePort(port);
  return port;
}

// A stdio string as child_process.fork reads it, with the IPC channel.
function stdioFromString(stdio) {
  switch (stdio) {
    case 'ignore':
    case 'overlapped':
    case 'pipe':
      return [stdio, stdio, stdio, 'ipc'];
    case 'inherit':
      return [0, 1, 2, 'ipc'];
    default:
      throw invalidArgValue('stdio', stdio);
  }
}

// fork()'s stdio, as child_process.fork would compute it, plus our channel.
function stdioWith(settings, channelFd) {
  let stdio = settings.stdio;
  if (typeof stdio === 'string') stdio = stdioFromString(stdio);
  else if (!Array.isArray(stdio)) stdio = settings.silent ? ['pipe', 'pipe', 'pipe', 'ipc'] : [0, 1, 2, 'ipc'];
  if (channelFd === undefined) return { stdio, childFd: -1 };
  // child_process gives the child fds 0-2 even where the array stops short
  // (pipes, for missing entries): ours comes after them.
  const padded = [...stdio];
  while (padded.length < 3) padded.push(undefined);
  return { stdio: [...padded, channelFd], childFd: padded.length };
}

function openChannel() {
  if (schedulingPolicy !== SCHED_RR) return null;
  const [id, fd] = native.openChannel();
  if (id < 0) throw systemError(id, 'socketpair');
  wakeDispatcherSoon();
  return { id, fd };
}

// Channel changes (new, retired, removed) are queued for the native
// dispatcher thread, which is woken once, after this tick's JavaScript: a
// fork that followed a wake-up took 1-1.5 ms longer (measured), and a
// replacement is forked right after its predecessor's channel is removed.
let wakePending = false;

function wakeDispatcherSoon() {
  if (wakePending) return;
  wakePending = true;
  process.nextTick(() => {
    wakePending = false;
    native.wakeDispatcher();
  });
}

// (A Worker the app built itself has no channel.)
function removeChannel(worker) {
  if (!(worker[kChannel] >= 0)) return;
  native.removeChannel(worker[kChannel]);
  wakeDispatcherSoon();
}

function retireChannel(worker) {
  if (!(worker[kChannel] >= 0)) return;
  native.retireChannel(worker[kChannel]);
  wakeDispatcherSoon();
}

function createWorkerProcess(id, { env: workerEnv, settings }, channel) {
  const execArgv = [...settings.execArgv];

  if (settings.inspectPort === null) throw badPort('Port', null, true);
  if (usesInspector(settings.execArgv)) {
    execArgv.push(`--inspect-port=${inspectPortFor(settings.inspectPort)}`);
  }

  const { stdio, childFd } = stdioWith(settings, channel ? channel.fd : undefined);
  const env = {
    ...process.env,
    ...workerEnv,
    [ENV.WORKER_ID]: `${id}`,
    [ENV.CHANNEL_FD]: `${childFd}`,
    [ENV.PRIMARY_PID]: `${process.pid}`,
  };
  if (native.addonFile) env[ENV.ADDON] = native.addonFile;
  else delete env[ENV.ADDON];
  // The preload goes first in NODE_OPTIONS: Node runs those --require
  // modules before the command line's, and ours must make the process a
  // worker before any other preloaded module (an APM agent, say) looks at
  // node:cluster. The preload puts NODE_OPTIONS back as it was.
  // The worker's own, as child_process would pass it: unset when undefined,
  // otherwise a string (`fork({ NODE_OPTIONS: null })` gives "null").
  const own = env.NODE_OPTIONS === undefined ? null : `${env.NODE_OPTIONS}`;
  env[ENV.NODE_OPTIONS] = JSON.stringify(own);
  env.NODE_OPTIONS = `--require "${PRELOAD.replace(/["\\]/g, '\\$&')}"` + (own ? ` ${own}` : '');
  const child = fork(settings.exec, settings.args, {
    cwd: settings.cwd,
    env,
    serialization: settings.serialization,
    silent: settings.silent,
    windowsHide: settings.windowsHide,
    execArgv,
    stdio,
    gid: settings.gid,
    uid: settings.uid,
  });
  // The data channel's entry (always null: an fd, not a pipe) is ours, not
  // the app's: worker.process.stdio is as long as under node:cluster.
  if (childFd >= 0) child.stdio.splice(childFd, 1);
  return child;
}

function removeWorker(worker) {
  delete cluster.workers[worker.id];
  if (Object.keys(cluster.workers).length === 0) intercom.emit('disconnect');
}

function removeHandlesForWorker(worker) {
  for (const [key, handle] of handles) {
    if (handle.remove(worker)) handles.delete(key);
  }
}

cluster.fork = function fork(env) {
  cluster.setupPrimary();
  return forkWorker({ env, settings: cluster.settings }, ids + 1);
};

// A new worker in `slot` (the id of the first worker that filled it; a
// restarted or reloaded worker keeps its predecessor's slot and launch).
function forkWorker(launch, slot) {
  const id = ++ids;
  const channel = openChannel();
  let workerProcess;
  try {
    workerProcess = createWorkerProcess(id, launch, channel);
  } catch (err) {
    if (channel) native.removeChannel(channel.id);
    throw err;
  } finally {
    // The child has its copy now (or never will): close ours.
    if (channel) native.releaseSpawnEnd(channel.id);
  }
  const worker = new Worker({ id, process: workerProcess });
  worker[kChannel] = channel ? channel.id : -1;
  worker[kLaunch] = launch;
  worker[kSlot] = slot;
  worker[kStarted] = Date.now();

  worker.on('message', function onMessage(message, handle) {
    cluster.emit('message', this, message, handle);
  });

  worker.process.once('exit', (exitCode, signalCode) => {
    // Keep the worker listed until it has also disconnected.
    if (!worker.isConnected()) {
      removeHandlesForWorker(worker);
      removeWorker(worker);
    }
    removeChannel(worker);
    worker.exitedAfterDisconnect = !!worker.exitedAfterDisconnect;
    worker.state = 'dead';
    emitToApp(worker, 'exit', exitCode, signalCode);
    supervisor.onExit(worker, exitCode, signalCode);
  });

  worker.process.once('disconnect', () => {
    retireChannel(worker);
    // A process that never started (spawn failed) has no 'exit' to come.
    if (worker.process.pid === undefined) removeChannel(worker);
    removeHandlesForWorker(worker);
    // Keep the worker listed until its process has also exited.
    if (worker.isDead()) removeWorker(worker);
    worker.exitedAfterDisconnect = !!worker.exitedAfterDisconnect;
    worker.state = 'disconnected';
    emitToApp(worker, 'disconnect');
  });

  worker.process.on('internalMessage', controlListener(worker, onmessage));
  process.nextTick(emitFork, worker);
  cluster.workers[worker.id] = worker;
  return worker;
}

// Emits `event` on the worker, then on the cluster. A listener of the app
// that throws surfaces as uncaught, as it would have, but on the next tick:
// what comes after it still runs (the supervisor's restart, and the worker
// process's other listeners, which shutdown() and reload() wait on).
function emitToApp(worker, event, ...args) {
  try {
    worker.emit(event, ...args);
    cluster.emit(event, worker, ...args);
  } catch (err) {
    process.nextTick(rethrow, err);
  }
}

function rethrow(err) {
  throw err;
}

function emitFork(worker) {
  cluster.emit('fork', worker);
}

cluster.disconnect = function disconnect(cb) {
  const workers = Object.values(cluster.workers);
  // Workers that exit meanwhile, on purpose or not, are not restarted.
  supervisor.suspend(workers);
  if (workers.length === 0) {
    process.nextTick(() => intercom.emit('disconnect'));
  } else {
    for (const worker of workers) {
      if (worker.isConnected()) worker.disconnect();
    }
  }
  if (typeof cb === 'function') intercom.once('disconnect', cb);
};

const actions = { close, exitedAfterDisconnect, listening, online, queryServer };

function onmessage(message) {
  const fn = Object.hasOwn(actions, message.act) ? actions[message.act] : undefined;
  if (typeof fn === 'function') fn(this, message);
}

function online(worker) {
  worker.state = 'online';
  worker.emit('online');
  cluster.emit('online', worker);
}

function exitedAfterDisconnect(worker, message) {
  worker.exitedAfterDisconnect = true;
  send(worker, { ack: message.seq });
}

const UV_EINVAL = -22;
const ADDRESS_TYPES = new Set([4, 6, -1, null, undefined, 'udp4', 'udp6']);

// A queryServer message as net and dgram build it; anything else is refused
// with EINVAL rather than turned into a socket.
function wellFormedQuery(m) {
  const isInt = (v) => Number.isInteger(v);
  if (!isInt(m.index) || m.index < 0 || !ADDRESS_TYPES.has(m.addressType)) return false;
  if (m.address !== null && m.address !== undefined && typeof m.address !== 'string') return false;
  if (isInt(m.fd) && m.fd >= 0) return true;
  if (!isInt(m.port) || m.port > 65535) return false;
  if (isUdp(m)) return m.port >= 0;
  return m.port >= 0 || (typeof m.address === 'string' && m.address.length > 0);
}

function isUdp(message) {
  return message.addressType === 'udp4' || message.addressType === 'udp6';
}

function queryServer(worker, message) {
  if (worker.exitedAfterDisconnect) return;
  // dgram passes bind()'s port on as the app gave it: none, or a string
  // such as process.env.PORT. node:cluster binds `port || 0`, as a number.
  if (isUdp(message) && typeof message.port !== 'number') message.port = +message.port || 0;
  if (!wellFormedQuery(message)) {
    send(worker, { errno: UV_EINVAL, key: null, ack: message.seq, data: null });
    return;
  }

  const key = `${message.address}:${message.port}:${message.addressType}:${message.fd}:${message.index}`;
  let handle = handles.get(key);

  if (handle === undefined) {
    let address = message.address;
    // Unix socket paths are limited to ~100 bytes: use the shorter spelling.
    if (message.port < 0 && typeof address === 'string') {
      address = path.relative(process.cwd(), address);
      if (message.address.length < address.length) address = message.address;
    }
    handle = new (handleClassFor(message))(key, address, message);
    handles.set(key, handle);
  }

  if (!handle.data) handle.data = message.data;

  handle.add(worker, (errno, reply, sendHandle, onSent) => {
    const { data } = handles.get(key);
    if (errno) handles.delete(key); // lets another worker try again
    send(worker, { errno, key, ack: message.seq, data, ...reply }, sendHandle, undefined, onSent);
  }, worker[kChannel]);
}

// UDP is always shared: there is nothing to balance but datagrams.
function handleClassFor(message) {
  if (isUdp(message)) return SharedHandle;
  if (schedulingPolicy === SCHED_RR) return RoundRobinHandle;
  const tcpPort = message.port >= 0 && !(message.fd >= 0);
  if (schedulingPolicy === SCHED_REUSEPORT && tcpPort && process.platform === 'linux') return ReusePortHandle;
  return SharedHandle;
}

function listening(worker, message) {
  const info = {
    addressType: message.addressType,
    address: message.address,
    port: message.port,
    fd: message.fd,
  };
  worker.state = 'listening';
  worker.emit('listening', info);
  cluster.emit('listening', worker, info);
}

// A worker closed a server. Its handle may already be gone through
// removeHandlesForWorker(), hence the guard.
function close(worker, message) {
  const handle = handles.get(message.key);
  if (handle && handle.remove(worker)) handles.delete(message.key);
}

function send(worker, message, handle, cb, onSent) {
  return sendControl(worker.process, message, handle, cb, onSent);
}

Worker.prototype.disconnect = function disconnect() {
  this.exitedAfterDisconnect = true;
  retireChannel(this);
  send(this, { act: 'disconnect' });
  removeHandlesForWorker(this);
  removeWorker(this);
  supervisor.draining(this);
  return this;
};

Worker.prototype.destroy = function destroy(signo) {
  // After the signal went: a bad one throws (ERR_UNKNOWN_SIGNAL), and then
  // the worker was not stopped.
  this.process.kill(signo || 'SIGTERM');
  this[kStopped] = true;
};

// The server keys a worker is attached to.
function keysOf(worker) {
  const keys = [];
  for (const [key, handle] of handles) if (handle.workers.has(worker.id)) keys.push(key);
  return keys;
}

// Stops the primary accepting: round-robin listeners close now; workers
// finish what they hold. (Shared sockets close as their workers leave.)
function stopAccepting() {
  for (const handle of handles.values()) {
    if (handle instanceof RoundRobinHandle) handle.close();
  }
}

const supervisor = createSupervisor({ cluster, forkWorker, keysOf, stopAccepting, kLaunch, kSlot, kStarted, kStopped });
cluster.shutdown = function shutdown(options) { return supervisor.shutdown(options); };
cluster.reload = function reload() { return supervisor.reload(); };

// Per-worker dispatch counters of the native core (for tests and benchmarks).
cluster._dispatchStats = function dispatchStats() {
  const byChannel = new Map(native.dispatchStats().map((s) => [s.id, s]));
  const out = {};
  for (const worker of Object.values(cluster.workers)) {
    const s = byChannel.get(worker[kChannel]);
    if (s) out[worker.id] = { handed: s.handed, accepted: s.accepted, declined: s.declined, held: s.held };
  }
  return out;
};

// `import { fork } from 'node:cluster'` done before we took the object over
// gets our members too.
require('node:module').syncBuiltinESMExports();

module.exports = cluster;
