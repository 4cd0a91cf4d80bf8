'use strict';
// cluster-rs: a drop-in replacement for node:cluster.
//
// - In a primary: our primary, whose native core accepts connections.
// - In a worker forked by a cluster-rs primary: our worker (set up by the preload).
// - In a worker forked by node:cluster itself, and on Windows: node:cluster.
// - In a primary where another copy of cluster-rs (another version, another
//   path) came first: that copy's cluster. A process has one cluster.

const WORKER = Symbol.for('cluster-rs.worker');
const PRIMARY = Symbol.for('cluster-rs.primary');

function load() {
  if (process.platform === 'win32') return require('node:cluster');
  if (globalThis[WORKER] !== undefined) return globalThis[WORKER];
  const builtin = require('node:cluster');
  if (builtin.isWorker || builtin[PRIMARY] !== undefined) return builtin;
  return require('./lib/primary.js');
}

module.exports = load();

// The names `import { ... } from 'cluster-rs'` offers. Node reads them from
// this statement without running it; each takes its value from the object
// above when first imported, as node:cluster's named exports do (a name the
// current side lacks is undefined). There is deliberately no "exports" map
// in package.json: resolving one loads Node's ESM resolver, about 2 ms of
// every worker's start-up in an app that has no other package needing it.
0 && (module.exports = {
  SCHED_NONE, SCHED_RR, SCHED_REUSEPORT, Worker, isMaster, isPrimary, isWorker, fork, disconnect, setupPrimary,
  setupMaster, settings, schedulingPolicy, workers, worker, shutdown, reload,
});
