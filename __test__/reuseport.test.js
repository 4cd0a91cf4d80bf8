'use strict';
// cluster-rs's SCHED_REUSEPORT policy (Linux): one SO_REUSEPORT socket per
// worker, balanced by the kernel, none kept by the primary.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { runOk, one } = require('./helpers.js');

test('SCHED_REUSEPORT gives each worker its own socket on one port', {
  skip: process.platform !== 'linux' && 'SO_REUSEPORT balancing is Linux-only',
}, async () => {
  const result = await runOk('reuseport.js', [], { timeout: 30000 });
  const spread = one(result, 'spread');
  assert.equal(spread.policy, 3);
  assert.equal(spread.ports[0], spread.ports[1], 'both workers listen on the same port');
  assert.deepEqual(spread.sockets, { total: 2, held: 0 }, 'two listening sockets, none in the primary');
  assert.deepEqual(Object.keys(spread.counts).sort(), ['1', '2'], 'both workers served');
  assert.equal(spread.counts[1] + spread.counts[2], 200);
  // Hash balancing: each worker gets a fair share of 200 connections.
  assert.ok(Math.min(spread.counts[1], spread.counts[2]) >= 60, JSON.stringify(spread.counts));
  const after = one(result, 'after-exit');
  assert.deepEqual(after.counts, { 2: 50 }, 'the survivor serves everything once the other socket is gone');
});
