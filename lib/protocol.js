'use strict';
// Control messages between primary and workers ride Node's own IPC channel.
// A `cmd` that starts with "NODE_" makes child_process emit them as
// 'internalMessage', never as 'message', so user code never sees them. We use
// the same message shapes as node:cluster (cmd 'NODE_CLUSTER', act, seq/ack),
// so tools and tests that watch those messages see what they expect.

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

module.exports = { sendControl, controlListener };
