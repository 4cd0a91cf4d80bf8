'use strict';
// Worker and primary death: workers never outlive a primary killed with
// SIGKILL, and connections in flight to a dying worker are not lost.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const { runPrimary, runOk, one, killAll, waitGone, alive, DISPATCH, LEDGER } = require('./helpers.js');

after(killAll);

// Starts orphans.js, SIGKILLs the primary once its workers are ready, and
// resolves with the worker pids (the primary is gone by then).
async function killPrimary(module, args = []) {
  let pids = null;
  const result = await runPrimary('orphans.js', args, {
    module,
    keepGroup: true, // the workers must go by themselves
    onMessage(m, child) {
      if (m.ev === 'ready') {
        pids = m.pids;
        process.kill(child.pid, 'SIGKILL');
      }
    },
  });
  assert.equal(result.signal, 'SIGKILL', result.stderr);
  assert.equal(pids.length, 2);
  return pids;
}

for (const module of ['rs', 'node']) {
  test(`workers exit when the primary is SIGKILLed (${module})`, async () => {
    const pids = await killPrimary(module);
    try {
      await waitGone(pids, 5000);
    } finally {
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
    }
  });
}

// A worker the primary disconnected is draining, not orphaned: the
// parent-death signal no longer applies to it, also when the worker reads
// the disconnect only after the primary has gone.
for (const [module, mode] of [['rs', 'drain'], ['node', 'drain'], ['rs', 'drain-busy'], ['node', 'drain-busy']]) {
  test(`a disconnected worker finishes its request after the primary exits (${module}, ${mode})`, async () => {
    let reply;
    let pids = [];
    const result = await runPrimary('orphans.js', [mode], {
      module,
      keepGroup: true,
      onMessage(m) {
        if (m.ev !== 'ready') return;
        pids = m.pids;
        reply = new Promise((resolve) => {
          http.get({ host: '127.0.0.1', port: m.port, agent: false }, (res) => {
            let body = '';
            res.setEncoding('utf8');
            res.on('data', (chunk) => { body += chunk; });
            res.on('end', () => resolve(body));
          }).on('error', (err) => resolve(err.code));
        });
      },
    });
    try {
      assert.equal(result.code, 0, result.describe());
      assert.equal(await reply, 'late');
      await waitGone(pids, 5000);
    } finally {
      for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
    }
  });
}

// cluster-rs ties workers to the primary with a parent-death signal, so even a
// worker whose event loop is blocked goes. (node:cluster's would spin on.)
test('workers stuck in a busy loop still exit when the primary is SIGKILLed', async () => {
  const pids = await killPrimary('rs', ['spin']);
  try {
    await waitGone(pids, 5000);
  } finally {
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL');
  }
});

// node:cluster loses (strands) the connection it handed to the stuck worker,
// so this one is cluster-rs only.
test('connections held by a stuck worker are served by another once it is killed', async () => {
  const result = await runOk('stuck-worker.js', ['12'], { env: DISPATCH });
  const r = one(result, 'result');
  assert.deepEqual(r.errors, []);
  assert.equal(r.bodies.length, 12);
  assert.ok(r.bodies.every((b) => b === 'worker 2'), r.bodies.join());
  assert.ok(r.heldByA >= 1 && r.heldByA <= 8, `A held ${r.heldByA} (the window is 8)`);
  assert.equal(r.aSignal, 'SIGKILL');
  assert.equal(r.stats['2'].handed, 12);
});

test('under the ledger a stuck worker holds no connection: the other serves every one', {
  skip: !LEDGER && 'the ledger is Linux-only',
}, async () => {
  const result = await runOk('stuck-worker.js', ['12']);
  const r = one(result, 'result');
  assert.deepEqual(r.errors, []);
  assert.equal(r.bodies.length, 12);
  assert.ok(r.bodies.every((b) => b === 'worker 2'), r.bodies.join());
  assert.equal(r.heldByA, 0, 'all answered while A still spun');
  assert.equal(r.aSignal, 'SIGKILL');
  assert.equal(r.stats['2'].handed, 0, 'the primary handed nothing: B accepted every one');
});

// A worker out of descriptors cannot receive the fds the primary passes: the
// kernel truncates SCM_RIGHTS. The connections that lost their fd must be
// declined (the primary still holds them and passes them on), and the channel
// must keep working once the worker has descriptors again, so no connection
// is left hanging.
// Under the ledger A's own accept fails instead, and the others take them.
for (const balance of ['ledger', 'dispatch']) {
  test(`a worker out of descriptors leaves no connection hanging once it has some again (${balance})`, async () => {
    const [rs, node] = await Promise.all(['rs', 'node'].map((module) => runOk('emfile.js', [], {
      module, shell: 'ulimit -n 256', env: { CLUSTER_RS_BALANCE: balance },
    })));
    const b = one(node, 'result');
    assert.equal(b.hogged, true);
    assert.deepEqual(b.after, ['2', '2', '2', '2'], 'node:cluster: nothing hangs once A has descriptors again');
    const a = one(rs, 'result');
    assert.equal(a.hogged, true);
    assert.ok(!a.after.includes('timeout'), `after A freed descriptors: ${a.after}`);
    assert.ok(!a.starved.includes('timeout'), `while A had none: ${a.starved}`);
    // The dispatcher passed A some, which lost their fds on the way.
    if (balance === 'dispatch') assert.ok(a.stats['1'].declined > 0, JSON.stringify(a.stats));
  });
}
