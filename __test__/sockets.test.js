'use strict';
// Other kinds of servers in workers: Unix sockets, listen({ fd }), TLS and
// UDP, compared with node:cluster.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const { runOk, one, killAll, tmpdir, makeCert } = require('./helpers.js');

after(killAll);

const both = (fixture, args, options = {}) => Promise.all([
  runOk(fixture, args, { ...options, module: 'rs' }),
  runOk(fixture, args, { ...options, module: 'node' }),
]);

for (const policy of ['rr', 'none']) {
  test(`HTTP over Unix sockets, absolute and relative paths (${policy})`, async () => {
    const dirs = [fs.realpathSync(tmpdir()), fs.realpathSync(tmpdir())];
    try {
      const env = { NODE_CLUSTER_SCHED_POLICY: policy };
      const [rs, node] = await Promise.all([
        runOk('unix.js', [dirs[0]], { env }),
        runOk('unix.js', [dirs[1]], { env, module: 'node' }),
      ]);
      const a = one(rs, 'result');
      const b = one(node, 'result');
      for (const r of [a, b]) {
        assert.deepEqual(r.listening, ['1:-1:-1:abs.sock', '1:-1:-1:rel.sock', '2:-1:-1:abs.sock', '2:-1:-1:rel.sock']);
        assert.equal(r.isSocket, true);
        assert.deepEqual(r.left, [false, false], 'socket files removed once the workers are gone');
        for (const which of ['abs', 'rel']) {
          assert.equal(r.served[which].length, 4);
          assert.ok(r.served[which].every((id) => id === '1' || id === '2'));
        }
      }
      if (policy === 'rr') {
        assert.deepEqual(a, b);
        assert.deepEqual(a.served, { abs: ['1', '1', '2', '2'], rel: ['1', '1', '2', '2'] });
        assert.equal(a.mode, '777', 'readableAll + writableAll');
      } else {
        // node:cluster ignores readableAll/writableAll for shared (SCHED_NONE)
        // pipes (net.js chmods only when the handle exists synchronously);
        // cluster-rs applies them. Not compared.
        assert.equal(a.mode, '777');
      }
    } finally {
      for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

for (const policy of ['rr', 'none']) {
  test(`a worker closes a Unix-socket server and listens on the same name again (${policy})`, async () => {
    const dirs = [fs.realpathSync(tmpdir()), fs.realpathSync(tmpdir())];
    try {
      const env = { NODE_CLUSTER_SCHED_POLICY: policy };
      const results = await Promise.all([
        runOk('unix-relisten.js', [dirs[0]], { env }),
        runOk('unix-relisten.js', [dirs[1]], { env, module: 'node' }),
      ]);
      const expected = Array(3).fill('listening');
      for (const result of results) {
        assert.deepEqual(one(result, 'result'), {
          ev: 'result', primaryAlive: true,
          steps: process.platform === 'linux' ? { file: expected, abstract: expected } : { file: expected },
        }, result.describe());
      }
    } finally {
      for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('a Unix socket path longer than sun_path works through the relative path', async () => {
  const base = fs.realpathSync(tmpdir());
  const dirs = ['rs', 'node'].map((m) => path.join(base, m, 'd'.repeat(110)));
  for (const dir of dirs) fs.mkdirSync(dir, { recursive: true });
  try {
    const [rs, node] = await Promise.all([
      runOk('unix-long.js', [], { cwd: dirs[0] }),
      runOk('unix-long.js', [], { cwd: dirs[1], module: 'node' }),
    ]);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.ok(r.length > 108, `${r.length}`);
      assert.deepEqual(r.bodies, ['1', '1', '2', '2']);
    }
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
});

for (const policy of ['rr', 'none']) {
  test(`listen({ fd }) with a listening socket the primary was given (${policy})`, async () => {
    // Our own listening socket becomes each primary's fd 3; then we close our
    // copy, so only the clusters accept on it.
    const servers = [net.createServer((c) => c.end('test runner')), net.createServer((c) => c.end('test runner'))];
    await Promise.all(servers.map((s) => new Promise((resolve) => s.listen(0, '127.0.0.1', resolve))));
    const env = { NODE_CLUSTER_SCHED_POLICY: policy };
    const [rs, node] = await Promise.all(['rs', 'node'].map((module, i) => runOk('listen-fd.js',
      [String(servers[i].address().port)], {
        module, env, stdio: [servers[i]._handle.fd], onSpawn: () => servers[i].close(),
      })));
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.deepEqual(r.fds, [3, 3]);
      if (policy === 'rr') assert.deepEqual(r.bodies, ['1', '1', '1', '2', '2', '2']);
      else assert.ok(r.bodies.length === 6 && r.bodies.every((b) => b === '1' || b === '2'), `${r.bodies}`);
    }
    // Once every server on it has closed: node:cluster closes the number
    // (round-robin) or its handle (SCHED_NONE), so, nobody else holding the
    // socket, the port refuses connections, and a worker that listens on
    // the number again fails (it is gone, or reused: EEXIST for the new
    // worker's IPC pipe). Our round-robin listener works on a duplicate,
    // and the number stays the app's: listening on it again, as after a
    // restart, works.
    const reopened = policy === 'rr' ? [rs] : [];
    for (const result of [rs, node]) {
      const { after, relisten } = one(result, 'result');
      if (reopened.includes(result)) {
        assert.deepEqual({ after, relisten }, { after: 'connected', relisten: 'listening' });
      } else {
        assert.equal(after, 'ECONNREFUSED');
        assert.notEqual(relisten, 'listening');
      }
    }
  });
}

test('listen({ fd }) on a descriptor already in use in the primary fails with EEXIST', async () => {
  // A second server on the same descriptor, and a connection the primary
  // itself has open (its event loop watches that descriptor).
  for (const mode of ['twice', 'connected']) {
    const server = net.createServer();
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const env = { NODE_CLUSTER_SCHED_POLICY: 'rr' };
      const [rs, node] = await both('listen-fd.js', [String(server.address().port), mode],
                                    { env, stdio: [server._handle.fd] });
      const expected = mode === 'twice' ? { codes: ['listening', 'EEXIST'] } : { code: 'EEXIST' };
      for (const result of [rs, node]) {
        const { ev, ...r } = one(result, 'result');
        assert.deepEqual(r, expected, mode);
      }
    } finally {
      server.close();
    }
  }
});

test('listen({ fd }): the socket goes on listening for whoever passed it, after the cluster closes', async () => {
  // As with systemd's socket activation: the socket's owner (here the test
  // runner, which keeps its copy) queues connections on it while the
  // service restarts. The cluster's workers serve, then all disconnect.
  for (const module of ['rs', 'node']) {
    // An HTTP server: the cluster's own requests may meet it too.
    const server = http.createServer((req, res) => res.end('test runner'));
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const { port } = server.address();
      const r = one(await runOk('listen-fd.js', [String(port)], {
        module, env: { NODE_CLUSTER_SCHED_POLICY: 'rr' }, stdio: [server._handle.fd],
      }), 'result');
      assert.deepEqual(r.fds, [3, 3]);
      assert.equal(r.after, 'connected', `${module}: the passed socket no longer listens`);
    } finally {
      server.close();
    }
  }
});

test('TLS servers in workers; session ticket keys are shared', async (t) => {
  const dir = tmpdir();
  try {
    const cert = makeCert(dir);
    if (!cert) return t.skip('openssl is not available to make a self-signed certificate');
    const [rs, node] = await both('tls.js', [cert.key, cert.cert]);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.deepEqual(r.data, ['secure 1', 'secure 1', 'secure 2', 'secure 2']);
      assert.equal(r.sameKeys, true, 'workers share ticket keys through the server data');
      assert.equal(r.keyLength, 96);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('dgram: workers binding the same port share one socket', async () => {
  const [rs, node] = await both('dgram.js', ['shared']);
  for (const result of [rs, node]) {
    const r = one(result, 'result');
    assert.equal(r.samePort, true);
    assert.equal(r.received, 20);
    assert.deepEqual(r.addresses, ['127.0.0.1', '127.0.0.1']);
  }
});

for (const mode of ['noport', 'stringport']) {
  test(`dgram: bind() ${mode === 'noport' ? 'with no port' : 'with the port as a string'} is shared too`, async () => {
    const [rs, node] = await both('dgram.js', [mode]);
    for (const result of [rs, node]) {
      const r = one(result, 'result');
      assert.equal(r.samePort, true, result.describe());
      assert.equal(r.received, 20);
      assert.deepEqual(r.addresses, ['0.0.0.0', '0.0.0.0']);
    }
  });
}

test('dgram: exclusive sockets are each worker\'s own', async () => {
  const [rs, node] = await both('dgram.js', ['exclusive']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result'), {
    ev: 'result', samePort: false, received: 40, counts: { 1: 20, 2: 20 }, addresses: ['127.0.0.1', '127.0.0.1'],
  });
});

test('a Linux abstract Unix socket (\\0name) is shared by the workers', {
  skip: process.platform !== 'linux' && 'abstract sockets are Linux-only',
}, async () => {
  const [rs, node] = await both('listen-variants.js', ['abstract']);
  assert.deepEqual(one(rs, 'result'), one(node, 'result'));
  assert.deepEqual(one(rs, 'result'), { ev: 'result', bodies: ['1', '1', '2', '2'], listening: 2 });
});

test('listen(handle) in a worker binds that handle itself, as with node:cluster', async () => {
  const [rs, node] = await both('listen-variants.js', ['handle']);
  assert.deepEqual(one(rs, 'result'), one(node, 'result'));
  assert.deepEqual(one(rs, 'result'), { ev: 'result', bodies: ['1', '2'], listening: 0 });
});
