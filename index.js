'use strict';
// cluster-rs: a drop-in replacement for node:cluster.
//
// - In a primary: our primary, whose native core accepts connections.
// - In a worker forked by a cluster-rs primary: our worker (set up by the preload).
// - In a worker forked by node:cluster itself, and on Windows: node:cluster.

const WORKER = Symbol.for('cluster-rs.worker');

function load() {
  if (process.platform === 'win32') return require('node:cluster');
  if (globalThis[WORKER] !== undefined) return globalThis[WORKER];
  const builtin = require('node:cluster');
  if (builtin.isWorker) return builtin;
  return require('./lib/primary.js');
}

module.exports = load();
