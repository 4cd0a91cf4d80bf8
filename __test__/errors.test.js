'use strict';
// Listen errors in workers: the 'error' a worker's server emits when the
// port is taken (by a socket of this test process), compared with node:cluster.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const dgram = require('node:dgram');
const path = require('node:path');
const { spawnSync } = require('node:child_process');
const { runOk, one, killAll, hasIPv6Loopback } = require('./helpers.js');

after(killAll);

// Runs eaddrinuse.js for both modules while `blocker` holds the port.
async function whileTaken(blocker, args, env) {
  const port = blocker.address().port;
  try {
    return await Promise.all(['rs', 'node'].map((module) => runOk('eaddrinuse.js', [String(port), ...args],
                                                                    { module, env })));
  } finally {
    await new Promise((resolve) => blocker.close(resolve));
  }
}

function tcpBlocker(options) {
  const server = net.createServer();
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ port: 0, ...options }, () => resolve(server));
  });
}

for (const policy of ['rr', 'none']) {
  for (const host of ['127.0.0.1', '']) {
    test(`EADDRINUSE from a worker's listen (${policy}, host ${host || 'none'})`, async () => {
      const blocker = await tcpBlocker({ host: '127.0.0.1' });
      const port = blocker.address().port;
      const [rs, node] = await whileTaken(blocker, [host], { NODE_CLUSTER_SCHED_POLICY: policy });
      const a = one(rs, 'result');
      assert.deepEqual(a, one(node, 'result'));
      assert.deepEqual(a, {
        ev: 'result', outcome: 'error', code: 'EADDRINUSE', errno: a.errno, syscall: 'bind', address: host || null,
        port, message: `bind EADDRINUSE ${host || null}:${port}`, errnoName: 'EADDRINUSE', clusterListening: 0,
        state: 'online',
      });
      assert.ok(Number.isInteger(a.errno) && a.errno < 0, `errno ${a.errno}`);
    });
  }
}

for (const policy of ['rr', 'none']) {
  test(`a Unix socket in a missing directory, descriptors not open or not sockets, UDP addresses of the other family: the errors node:cluster gives (${policy})`,
       async () => {
         const env = { NODE_CLUSTER_SCHED_POLICY: policy };
         const [rs, node] = await Promise.all(['rs', 'node'].map((module) => runOk('listen-errors.js', [],
                                                                                    { module, env })));
         assert.deepEqual(one(rs, 'result'), one(node, 'result'));
         assert.deepEqual(one(rs, 'result').errors, {
           // libuv reports a pipe bound in a missing directory as EACCES.
           missingDir: { code: 'EACCES', errno: -13, syscall: 'bind' },
           closedFd: { code: 'EINVAL', errno: -22, syscall: 'bind' },
           notSocketFd: { code: 'EINVAL', errno: -22, syscall: 'bind' },
           udp4On6: { code: 'EINVAL', errno: -22, syscall: 'bind' },
           udp6On4: { code: 'EINVAL', errno: -22, syscall: 'bind' },
           udpNotSocketFd: { code: 'EINVAL', errno: -22, syscall: 'open' },
         });
       });
}

test('EADDRINUSE from a worker\'s dgram bind', async () => {
  const socket = dgram.createSocket('udp4');
  await new Promise((resolve) => socket.bind(0, '127.0.0.1', resolve));
  const port = socket.address().port;
  const [rs, node] = await whileTaken(socket, ['127.0.0.1', 'udp']);
  const a = one(rs, 'result');
  assert.deepEqual(a, one(node, 'result'));
  assert.equal(a.code, 'EADDRINUSE');
  assert.equal(a.syscall, 'bind');
  assert.equal(a.port, port);
  assert.equal(a.address, '127.0.0.1');
});

test('EACCES for a privileged port', {
  skip: process.getuid && process.getuid() === 0 ? 'running as root: privileged ports can be bound' : false,
}, async () => {
  // Port 1 needs privileges; with no blocker, eaddrinuse.js just listens.
  const [rs, node] = await Promise.all(['rs', 'node'].map((module) => runOk('eaddrinuse.js', ['1', '127.0.0.1'],
                                                                         { module })));
  const a = one(rs, 'result');
  assert.deepEqual(a, one(node, 'result'));
  assert.equal(a.code, 'EACCES');
  assert.equal(a.syscall, 'bind');
});

// libuv defers EADDRINUSE from bind() to listen(), so Node's "bind [::], else
// 0.0.0.0" fallback never applies to a port in use and the worker gets
// EADDRINUSE; it must not end up quietly listening on 0.0.0.0:P instead.
test('no-host listen on a port held by an IPv6-only socket', async (t) => {
  if (!await hasIPv6Loopback()) return t.skip('no IPv6 here');
  const blocker = await tcpBlocker({ host: '::', ipv6Only: true });
  const [rs, node] = await whileTaken(blocker, ['']);
  assert.equal(one(node, 'result').code, 'EADDRINUSE');
  assert.equal(one(rs, 'result').outcome, 'error');
  assert.deepEqual(one(rs, 'result'), one(node, 'result'));
});

// With addons off, the package cannot work: it says so with Node's own
// error, not with advice to build the addon.
test('require(\'cluster-rs\') where addons are disabled throws ERR_DLOPEN_DISABLED', () => {
  const code = `try { require(${JSON.stringify(path.resolve(__dirname, '..'))}); console.log('loaded'); }
                catch (err) { console.log(err.code); }`;
  const r = spawnSync(process.execPath, ['--no-addons', '-e', code], { encoding: 'utf8', timeout: 15000 });
  assert.equal(r.stdout.trim(), 'ERR_DLOPEN_DISABLED', r.stderr);
});
