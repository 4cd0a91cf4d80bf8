'use strict';
// What passes between a primary and its workers outside the data channel.
//
// At spawn, environment variables (ENV). The preload reads and deletes them
// before the application starts, so they are neither visible to it nor
// inherited by its own children. (node:cluster's NODE_UNIQUE_ID is never set
// at spawn: it would start the built-in worker machinery.)
//
// After that, control messages, which ride Node's own IPC channel.
// A `cmd` that starts with "NODE_" makes child_process emit them as
// 'internalMessage', never as 'message', so user code never sees them. We use
// the same message shapes as node:cluster (cmd 'NODE_CLUSTER', act, seq/ack),
// so tools and tests that watch those messages see what they expect.

const ENV = {
  WORKER_ID: 'CLUSTER_RS_WORKER_ID',
  CHANNEL_FD: 'CLUSTER_RS_CHANNEL_FD',
  PRIMARY_PID: 'CLUSTER_RS_PRIMARY_PID',
  ADDON: 'CLUSTER_RS_ADDON',
  NODE_OPTIONS: 'CLUSTER_RS_NODE_OPTIONS', // the worker's own, as JSON (null: unset)
};

const callbacks = new Map();
let seq = 0;

// Sends a control message; `cb` runs when the other side answers with `ack`,
// `onSent` once the message (and its handle) is written.
function sendControl(proc, message, handle, cb, onSent) {
  if (!proc.connected) return false;
  message = { cmd: 'NODE_CLUSTER', ...message, seq };
  if (typeof cb === 'function') callbacks.set(seq, cb);
  seq += 1;
  return proc.send(message, handle, onSent);
}

// An 'internalMessage' listener that routes acks to their callbacks and
// everything else of ours to `onMessage` (called with `this` = worker).
function controlListener(worker, onMessage) {
  return function onInternalMessage(message, handle) {
    if (message === null || typeof message !== 'object' || message.cmd !== 'NODE_CLUSTER') return;
    let fn = onMessage;
    if (message.ack !== undefined) {
      const callback = callbacks.get(message.ack);
      if (callback !== undefined) {
        fn = callback;
        callbacks.delete(message.ack);
      }
    }
    Reflect.apply(fn, worker, arguments);
  };
}

module.exports = { ENV, sendControl, controlListener };
