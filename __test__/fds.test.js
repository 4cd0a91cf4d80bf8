'use strict';
// Descriptors: nothing of the cluster's leaks into a worker's children, and
// the primary closes what it opened for workers once they are gone.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { runOk, one, killAll, LEDGER } = require('./helpers.js');

after(killAll);

for (const policy of ['rr', 'none']) {
  test(`a worker's child inherits only stdio (${policy})`, async () => {
    const env = { NODE_CLUSTER_SCHED_POLICY: policy };
    const [rs, node] = await Promise.all([
      runOk('fds.js', ['grandchild'], { env }),
      runOk('fds.js', ['grandchild'], { env, module: 'node' }),
    ]);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      // The worker did hold sockets beyond stdio (IPC, a connection, and for
      // cluster-rs round-robin its native channel)...
      assert.ok(r.ownSockets >= 2, `worker sockets: ${r.ownSockets}`);
      // ...but its child sees 0, 1, 2 and whatever the primary itself was
      // started with (descriptors inherited from outside the test), nothing else.
      const allowed = new Set(r.baseline.map((e) => e.fd));
      const fds = r.grandchild.map((e) => e.fd);
      assert.deepEqual(fds.slice(0, 3), [0, 1, 2]);
      assert.deepEqual(fds.filter((fd) => !allowed.has(fd)), [], JSON.stringify(r.grandchild));
      assert.ok(!r.grandchild.some((e) => e.fd > 2 && /^socket:/.test(e.target)), JSON.stringify(r.grandchild));
      // A node child of a worker is a primary again, with no cluster variables.
      assert.deepEqual(r.child, { isPrimary: true, isWorker: false, builtin: false, env: [] }, r.childErr);
    }
    // Under the ledger the worker also holds the listening socket it accepts on.
    const own = LEDGER ? 4 : 3;
    if (policy === 'rr') assert.equal(one(rs, 'result').ownSockets, own, 'IPC, native channel, [listener,] connection');
  });

  test(`the primary's descriptor count returns to its level after workers exit (${policy})`, async () => {
    const env = { NODE_CLUSTER_SCHED_POLICY: policy };
    const [rs, node] = await Promise.all([
      runOk('fds.js', ['count'], { env }),
      runOk('fds.js', ['count'], { env, module: 'node' }),
    ]);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.equal(r.second, r.warm, JSON.stringify(r));
      assert.equal(r.third, r.warm, JSON.stringify(r));
      assert.equal(r.fourth, r.warm, JSON.stringify(r));
    }
  });
}
