'use strict';
// Loaded with `--require` (first in NODE_OPTIONS) into every worker a
// cluster-rs primary forks, before any other preloaded module and the
// application's own code. It makes this process a cluster worker
// the way Node's bootstrap does for node:cluster workers: the built-in module
// reports isWorker, routes net/dgram listens to our _getServer, and the
// worker says 'online'. Apps that never require cluster-rs work unchanged.

const { ENV } = require('./protocol.js');

const WORKER = Symbol.for('cluster-rs.worker');
const id = process.env[ENV.WORKER_ID];

// NODE_OPTIONS as the app gave it: without us, for the app and its children.
if (process.env[ENV.NODE_OPTIONS] !== undefined) {
  let own = null;
  try {
    own = JSON.parse(process.env[ENV.NODE_OPTIONS]);
  } catch {
    // Not ours to read: leave NODE_OPTIONS unset.
  }
  if (typeof own === 'string') process.env.NODE_OPTIONS = own;
  else delete process.env.NODE_OPTIONS;
  delete process.env[ENV.NODE_OPTIONS];
}

if (id !== undefined && globalThis[WORKER] === undefined) {
  const channelFd = Number.parseInt(process.env[ENV.CHANNEL_FD], 10);
  const primaryPid = Number.parseInt(process.env[ENV.PRIMARY_PID], 10) || 0;
  delete process.env[ENV.WORKER_ID];
  delete process.env[ENV.CHANNEL_FD];
  delete process.env[ENV.PRIMARY_PID];

  const channel = Number.isInteger(channelFd) ? channelFd : -1;
  const native = addon(channel);
  delete process.env[ENV.ADDON];
  // Never outlive the primary, even one killed by SIGKILL: the IPC channel's
  // 'disconnect' ends us (child.js), and on Linux a stuck loop is ended 2 s
  // after the primary's death (src/parent.rs).
  if (native !== null && native.workerGuard(primaryPid)) process.exit(0);

  // The built-in module, completed as a worker (see child.js): net and dgram
  // ask it for server handles.
  const cluster = require('./child.js');
  globalThis[WORKER] = cluster;
  cluster._setupWorker(Number(id) | 0, native === null ? -1 : channel, native);
}

// The native addon, or null where this worker may not load addons
// (`--no-addons` in its execArgv, or `--experimental-permission` without
// `--allow-addons`), as a node:cluster worker needs none. It then serves
// SCHED_NONE servers and UDP as usual; a round-robin server's connections
// come through the addon, so its listen fails (EINVAL), and the data channel
// is closed at once, so that the primary hands this worker nothing.
function addon(channel) {
  try {
    return require('./native.js');
  } catch (err) {
    if (err.code !== 'ERR_DLOPEN_DISABLED') throw err;
    if (channel >= 0) {
      require('node:fs').closeSync(channel);
      process.emitWarning('Addons are disabled in this worker, so its round-robin servers cannot listen ' +
                          '(EINVAL): allow addons in the workers\' execArgv, or use SCHED_NONE.',
                          { code: 'CLUSTER_RS_WORKER_WITHOUT_ADDON' });
    }
    return null;
  }
}
