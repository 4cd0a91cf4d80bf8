'use strict';
// TCP/HTTP servers in workers: the round-robin data path and the net.Server
// options and behaviours it must preserve, compared with node:cluster.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { runOk, one, killAll, which, hasIPv6Loopback, tmpdir, DISPATCH, LEDGER } = require('./helpers.js');

after(killAll);

const both = (fixture, args, options = {}) => Promise.all([
  runOk(fixture, args, { ...options, module: 'rs' }),
  runOk(fixture, args, { ...options, module: 'node' }),
]);

const count = (list, value) => list.filter((v) => v === value).length;

for (const balance of ['ledger', 'dispatch']) {
  test(`a 'connection' listener that throws leaves the rest of its batch to be served (${balance})`, async () => {
    const [rs, node] = await both('tcp.js', ['throwing'], { env: { CLUSTER_RS_BALANCE: balance } });
    for (const result of [rs, node]) {
      // One 'threw' per worker that got connections (which worker gets how
      // many depends on which one is back first); every other client served.
      const { answers } = one(result, 'result');
      const threw = answers.filter((a) => a === 'threw').length;
      assert.ok(threw === 1 || threw === 2, result.describe());
      assert.deepEqual(answers, [...Array(8 - threw).fill('served'), ...Array(threw).fill('threw')], result.describe());
    }
  });
}

for (const balance of ['ledger', 'dispatch', 'unix socket']) {
  test(`a connection its worker answered in part before exiting is ended, not served again (${balance})`, async () => {
    const dir = balance === 'unix socket' ? tmpdir() : undefined;
    const run = (module) => runOk('tcp.js', ['exitHolding', ...(dir ? [path.join(dir, module)] : [])],
                                  { module, env: dir ? {} : { CLUSTER_RS_BALANCE: balance } });
    const results = await Promise.all([run('rs'), run('node')]).finally(() => {
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });
    for (const result of results) {
      const { answer, next, exits } = one(result, 'result');
      const [, first] = /^part from (\d+);$/.exec(answer) || [];
      assert.ok(first, result.describe());
      assert.match(next, /^whole from \d+$/, result.describe());
      assert.notEqual(next, `whole from ${first}`, result.describe());
      assert.equal(exits, 1, result.describe());
    }
  });
}

test('maxConnections holds within a batch: a worker takes up to its limit of what arrived while it was stuck', async () => {
  const [rs, node] = await both('tcp.js', ['batchLimit'], { env: DISPATCH });
  for (const result of [rs, node]) {
    const { greetings, aConns } = one(result, 'result');
    assert.equal(greetings.length, 6, result.describe());
    assert.equal(greetings.filter((g) => g === '1').length, aConns, result.describe());
    assert.ok(aConns <= 2, result.describe());
  }
  // The dispatcher handed the stuck worker 3 of the 6 (every other one):
  // it took 2 and declined 1, which went to the other.
  const { aConns, stats } = one(rs, 'result');
  assert.equal(aConns, 2, rs.describe());
  assert.equal(stats['1'].declined, 1, rs.describe());
});

test('a worker script that never requires cluster-rs shares the port; both workers serve', async () => {
  const [rs, node] = await both('plain.js');
  for (const result of [rs, node]) {
    assert.deepEqual(one(result, 'result'), {
      ev: 'result', ports: [true, true], servedBy: [0, 0, 0, 1, 1, 1], isWorker: true, ids: [1, 2],
    });
  }
});

for (const balance of ['ledger', 'dispatch']) {
  test(`round-robin: sequential requests alternate between workers; counters agree (${balance})`, async () => {
    const N = 20;
    const [rs, node] = await both('tcp.js', ['split', String(N)], { env: { CLUSTER_RS_BALANCE: balance } });
    const a = one(rs, 'result');
    const b = one(node, 'result');
    for (const r of [a, b]) {
      assert.equal(r.order.length, N);
      assert.ok(Math.abs(count(r.order, 1) - count(r.order, 2)) <= 1, r.order.join());
      // The worker's socket is the client's connection: ports and address match.
      assert.deepEqual(r.mismatches, []);
      // 'connection' fired once per connection (N requests + 4 idle ones),
      // and getConnections() counts the 4 idle ones still open.
      assert.equal(r.reports[0].connections + r.reports[1].connections, N + 4);
      assert.equal(r.reports[0].open + r.reports[1].open, 4);
      assert.deepEqual(r.reports.map((x) => x.extraFds), [0, 0]);
      assert.equal(r.policy, 2);
    }
    // cluster-rs alternates exactly.
    assert.ok(a.order.every((id, i) => i === 0 || id !== a.order[i - 1]), `not alternating: ${a.order}`);
    assert.deepEqual(a.reports.map((x) => x.open), [2, 2]);
    // The native dispatcher's counters agree with what the workers saw.
    for (const id of [1, 2]) {
      const s = a.stats[id];
      const connections = a.reports[id - 1].connections;
      const handed = balance === 'ledger' && LEDGER ? 0 : connections; // under the ledger workers accept themselves
      assert.deepEqual(s, { handed, accepted: handed, declined: 0, held: s.held }, `worker ${id}`);
      assert.equal(connections, count(a.order, id) + 2);
    }
  });
}

for (const window of ['', '64']) {
  test(`a burst of 300 concurrent connections is served completely${window ? ' (CLUSTER_RS_WINDOW=64)' : ''}`,
       async () => {
         const env = window ? { ...DISPATCH, CLUSTER_RS_WINDOW: window } : {};
         const [rs, node] = await both('tcp.js', ['burst', '300'], { env });
         for (const result of [rs, node]) {
           const r = one(result, 'result');
           assert.deepEqual(r.errors, []);
           assert.equal(r.ok, 300);
           assert.deepEqual(r.connections, r.perWorker, 'one connection event per request');
           assert.deepEqual(r.extraFds, [0, 0], 'workers hold no descriptors beyond their open connections');
         }
         // (No balance check: a worker with a full window is passed over, so
         // a worker that is slower to pick up may get fewer connections.)
         const r = one(rs, 'result');
         for (const id of [1, 2]) {
           const s = r.stats[id];
           if (!window && LEDGER) { // the ledger: workers accept themselves, the primary hands nothing
             assert.equal(s.handed, 0);
             continue;
           }
           assert.equal(s.handed, r.perWorker[id - 1]);
           assert.equal(s.declined, 0);
           assert.equal(s.accepted + s.held, s.handed);
         }
       });
}

for (const balance of ['ledger', 'dispatch']) {
  test(`after a spell of load left one worker ahead, connections one at a time take turns again (${balance})`,
       async () => {
         // Under the ledger a lag of 100 lets the free worker take the whole
         // burst while the other is stuck; the dispatcher gives the stuck one
         // its window of 8.
         const env = { CLUSTER_RS_BALANCE: balance, CLUSTER_RS_LAG: '100' };
         const [rs, node] = await both('tcp.js', ['afterload'], { env });
         for (const r of [one(rs, 'result'), one(node, 'result')]) {
           assert.equal(r.burst[0] + r.burst[1], 30);
           assert.equal(r.after.length, 10);
         }
         const { burst, after } = one(rs, 'result');
         assert.ok(burst[1] >= burst[0] + 10, `the burst went mostly to the free worker: ${burst}`);
         // Within one of each other, then in turn: the stuck worker's
         // shortfall is not made up with the next connections.
         const runs = after.join('').match(/1+|2+/g);
         assert.ok(runs.every((run) => run.length <= 2) && runs.filter((run) => run.length === 2).length <= 1,
                   `not in turn: ${after}`);
       });
}

test('clients that reset their connections at once leave the workers serving', async () => {
  const [rs, node] = await both('tcp.js', ['resets']);
  for (const result of [rs, node]) {
    const r = one(result, 'result');
    assert.equal(r.bodies.length, 6);
    assert.ok(r.bodies.every((id) => id === 1 || id === 2));
    assert.deepEqual(r.alive, [true, true]);
  }
});

test('SCHED_NONE: two workers, every request succeeds', async () => {
  const N = 12;
  const env = { NODE_CLUSTER_SCHED_POLICY: 'none' };
  const [rs, node] = await both('tcp.js', ['split', String(N)], { env });
  for (const result of [rs, node]) {
    const r = one(result, 'result');
    assert.equal(r.policy, 1);
    assert.equal(r.order.length, N);
    assert.ok(r.order.every((id) => id === 1 || id === 2));
    assert.deepEqual(r.mismatches, []);
    assert.equal(r.reports[0].connections + r.reports[1].connections, N + 4);
    assert.equal(r.reports[0].open + r.reports[1].open, 4);
  }
  assert.deepEqual(one(rs, 'result').stats, {}, 'no native channels under SCHED_NONE');
});

for (const held of [false, true]) {
  const title = held ? ', the worker busy while both are answered' : '';
  test(`two servers per worker: the Nth listen(0) of every worker shares one port${title}`, async () => {
    const [rs, node] = await both('tcp.js', held ? ['multi', 'held'] : ['multi']);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      const [p1, p2] = r.ports;
      assert.deepEqual(p1, p2, 'both workers got the same two ports');
      assert.notEqual(p1[0], p1[1]);
      assert.deepEqual(Object.keys(r.served).map(Number).sort(), [...p1].sort());
      assert.deepEqual(r.served[p1[0]].sort(), ['1:first', '1:first', '2:first', '2:first']);
      assert.deepEqual(r.served[p1[1]].sort(), ['1:second', '1:second', '2:second', '2:second']);
    }
  });
}

test('pauseOnConnect and allowHalfOpen apply to connections handed to workers', async () => {
  const [rs, node] = await both('tcp.js', ['options']);
  assert.deepEqual(rs.messages, node.messages);
  const paused = JSON.stringify({ flowing: false, reading: false, halfOpen: true });
  assert.deepEqual(one(rs, 'result').replies, [
    `${paused}|hello|written after end by 1`, `${paused}|hello|written after end by 2`,
  ]);
});

for (const env of [{}, DISPATCH]) {
  test(`maxConnections: a full worker declines and the other worker serves${env === DISPATCH ? ' (dispatch)' : ''}`,
       async () => {
         const [rs, node] = await both('tcp.js', ['maxconn'], { env });
         for (const result of [rs, node]) {
           const r = one(result, 'result');
           assert.deepEqual(r.errors, []);
           assert.deepEqual(r.bodies, ['2', '2', '2', '2', '2', '2', '2', '2']);
           assert.equal(r.aConns, 1);
         }
         const { stats } = one(rs, 'result');
         // Under the ledger worker 1 accepted itself and returned what it declined.
         if (env === DISPATCH || !LEDGER) assert.equal(stats[1].accepted, 1);
         assert.ok(stats[1].declined >= 4, JSON.stringify(stats));
         assert.equal(stats[2].declined, 0);
       });
}

for (const env of [{}, DISPATCH]) {
  test(`maxConnections: while every worker is full, a new client waits and is served once one has room${env === DISPATCH ? ' (dispatch)' : ''}`,
       async () => {
         const [rs, node] = await both('tcp.js', ['full'], { env });
         for (const result of [rs, node]) {
           const r = one(result, 'result');
           assert.ok(r.reply === '1' || r.reply === '2', JSON.stringify(r));
           assert.equal(r.idle, 2);
         }
       });
}

test('server.close() waits for open connections; then the worker listens on the same port again', async () => {
  const [rs, node] = await both('tcp.js', ['relisten']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result').steps, [
    'echo:one', 'close-called', 'echo-after-close:two', 'close-callback', 'relistened', 'echo-new:three',
  ]);
});

// Closing a round-robin listener must be done when close() returns: the
// worker's next queryServer binds the same port right away.
test('close() then listen() on the same port at once, 200 times', async () => {
  const [rs, node] = await both('tcp.js', ['relisten-now']);
  assert.deepEqual(one(node, 'result'), { ev: 'result', n: 200, code: null });
  assert.deepEqual(one(rs, 'result'), { ev: 'result', n: 200, code: null });
});

// The same, seen from the primary: once disconnect() of the last worker has
// returned, the port is free.
test('the primary can listen on the port as soon as its only worker is disconnect()ed', async () => {
  const [rs, node] = await both('tcp.js', ['takeover']);
  const all = Array(5).fill('listening');
  assert.deepEqual(one(node, 'result').outcomes, all);
  assert.deepEqual(one(rs, 'result').outcomes, all);
});

test('exclusive: true gives each worker its own port', async () => {
  const [rs, node] = await both('tcp.js', ['exclusive']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result'), { ev: 'result', distinct: true, bodies: ['1', '2'], clusterListening: 0 });
});

for (const policy of ['rr', 'none']) {
  const env = { NODE_CLUSTER_SCHED_POLICY: policy };
  // Under SCHED_NONE the kernel picks the worker, so only check that both served.
  const served = (bodies, n) => {
    assert.equal(bodies.length, n);
    assert.ok(bodies.every((b) => b === '1' || b === '2'), `${bodies}`);
    if (policy === 'rr') assert.equal(count(bodies, '1'), n / 2, `${bodies}`);
  };

  test(`backlog: the listening socket gets the backlog the worker asked for (${policy})`, {
    skip: which('ss') ? false : 'ss (iproute2) is not installed',
  }, async () => {
    const [rs, node] = await both('tcp.js', ['backlog'], { env });
    assert.deepEqual(rs.messages, node.messages);
    const somaxconn = Number(fs.readFileSync('/proc/sys/net/core/somaxconn', 'utf8'));
    assert.deepEqual(one(rs, 'result').sendQ, [[Math.min(37, somaxconn)], [Math.min(511, somaxconn)]]);
  });

  const hosts = [
    { host: '127.0.0.1', addressType: 4, address: '127.0.0.1', family: 'IPv4', bound: '127.0.0.1' },
    { host: '::1', addressType: 6, address: '::1', family: 'IPv6', bound: '::1', v6: true },
    { host: '', addressType: 4, address: null, family: 'IPv6', bound: '::', v6: true },
  ];
  for (const h of hosts) {
    test(`listen on ${h.host ? `host ${h.host}` : 'no host (any address)'} (${policy})`, async (t) => {
      if (h.v6 && !await hasIPv6Loopback()) return t.skip('no IPv6 loopback here');
      const [rs, node] = await both('tcp.js', ['host', h.host], { env });
      for (const result of [rs, node]) {
        const r = one(result, 'result');
        assert.equal(r.error, undefined, r.error);
        assert.equal(r.address.addressType, h.addressType);
        assert.equal(r.address.address, h.address);
        const own = { address: h.bound, family: h.family, port: r.address.port };
        assert.deepEqual(r.addresses, [own, own]);
        served(r.bodies, 4);
      }
    });
  }

  test(`ipv6Only: workers hold [::]:P for IPv6 only; IPv4 P stays free (${policy})`, async (t) => {
    if (!await hasIPv6Loopback()) return t.skip('no IPv6 loopback here');
    const [rs, node] = await both('tcp.js', ['ipv6only'], { env });
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.equal(r.v4, 'listening');
      assert.equal(r.v4body, 'primary');
      served(r.bodies, 2);
    }
  });
}

// A link-local address needs its zone (fe80::1%eth0), as libuv's uv_ip6_addr()
// accepts it, and server.address() names the interface again.
const linkLocal = Object.entries(os.networkInterfaces())
  .flatMap(([name, list]) => list.filter((a) => a.family === 'IPv6' && a.scopeid && !a.internal)
    .map((a) => `${a.address}%${name}`))[0];
test('a scoped IPv6 link-local address (fe80::…%iface)', {
  skip: linkLocal ? false : 'no interface with a link-local IPv6 address',
}, async () => {
  const [rs, node] = await both('tcp.js', ['host', linkLocal]);
  const expected = one(node, 'result');
  assert.deepEqual(expected.bodies, ['1', '1', '2', '2']);
  const r = one(rs, 'result');
  assert.equal(r.error, undefined, `listen failed: ${r.error} (${r.syscall})`);
  assert.deepEqual(r.bodies, ['1', '1', '2', '2']);
  assert.equal(r.address.address, linkLocal);
});

test('connections handed to a worker that closes its server go to the other worker', async () => {
  const dir = tmpdir();
  try {
    const [rs, node] = await Promise.all([
      runOk('busy.js', ['closing', path.join(dir, 'rs')], { env: DISPATCH }),
      runOk('busy.js', ['closing', path.join(dir, 'node')], { module: 'node' }),
    ]);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.deepEqual(r.errors, []);
      assert.deepEqual(r.ok, Array(10).fill('2'));
    }
    // The closing worker really was holding connections when it closed.
    assert.ok(one(rs, 'result').before[1].held >= 1);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a connection a worker declined waits for another worker instead of being dropped', async () => {
  const dir = tmpdir();
  try {
    const rs = await runOk('busy.js', ['decline', path.join(dir, 'flag')]);
    const r = one(rs, 'result');
    assert.deepEqual(r.errors, []);
    assert.deepEqual(r.ok, Array(10).fill('2'));
    assert.equal(r.before[2].held, 8, 'the busy worker held a full window (the default, 8)');
    assert.ok(r.before[1].declined >= 1);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
