'use strict';
// API surface: flags, settings and how they reach workers, stdio,
// serialization, handles, lifecycle predicates, scheduling policy, bad input
// and the ESM entry. Most cases run against node:cluster as well.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { spawnSync } = require('node:child_process');
const path = require('node:path');
const { runOk, runPrimary, one, killAll, tmpdir, fixture, ROOT, DISPATCH } = require('./helpers.js');

after(killAll);

const both = (fixture, args, options = {}) => Promise.all([
  runOk(fixture, args, { ...options, module: 'rs' }),
  runOk(fixture, args, { ...options, module: 'node' }),
]);

test('settings after setupPrimary reach the worker (exec, args, execArgv, cwd, env, silent)', async () => {
  const cwd = fs.realpathSync(tmpdir());
  try {
    const [rs, node] = await both('settings.js', ['silent', cwd]);
    const strip = (r) => r.messages.map((m) => JSON.stringify(m).replaceAll(cwd, '<cwd>'));
    assert.deepEqual(strip(rs), strip(node));

    assert.deepEqual(one(rs, 'before'), {
      ev: 'before', settings: {}, SCHED_RR: 2, SCHED_NONE: 1, setupMasterIsSetupPrimary: true,
    });
    const expected = {
      args: ['a', 'b c'], exec: 'report-worker.js', execArgv: ['--max-old-space-size=64'], silent: true, cwd,
    };
    assert.deepEqual(one(rs, 'after-setup').settings, expected);
    // A second call merges into what is there.
    assert.deepEqual(one(rs, 'after-second-setup').settings, { ...expected, args: ['x', 'y'] });
    assert.deepEqual(one(rs, 'stdio'), {
      ev: 'stdio', stdin: 'object', length: 4, stdoutReadable: true, stderrReadable: true,
    });

    const done = one(rs, 'done');
    assert.equal(done.code, 0);
    // 'setup' once per setupPrimary() call, plus once for the one inside fork().
    assert.equal(done.setups.length, 3);
    assert.deepEqual(done.setups[0], expected);
    assert.deepEqual(done.report, {
      ev: 'report', args: ['x', 'y'], execArgv: ['--max-old-space-size=64'], cwd, extra: 'extra value',
      nodeOptions: null, leftovers: [], isWorker: true, builtinIsWorker: true, builtinWorkerId: 1, id: 1, stdin: 'Socket',
      builtinIsCluster: true, builtinKeys: ['Worker', 'isMaster', 'isPrimary', 'isWorker', 'worker'],
      generatedLoaderRan: false,
    });
    assert.equal(done.stderr, 'to stderr\n');
    // silent: nothing of the worker's reached the primary's own stdout.
    assert.ok(!rs.lines.some((l) => l.includes('"ev":"report"') && !l.includes('"ev":"done"')));
  } finally {
    fs.rmSync(cwd, { recursive: true, force: true });
  }
});

test('settings.stdio: an explicit stdio array is used as given', async () => {
  const [rs, node] = await both('settings.js', ['stdio']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'stdio'), { ev: 'stdio', stdin: null, length: 4, stdoutReadable: true, stderrReadable: true });
  const done = one(rs, 'done');
  assert.deepEqual(done.report.args, ['x', 'y']);
  assert.deepEqual(done.report.execArgv, []);
  assert.equal(done.report.nodeOptions, '--no-deprecation');
  assert.equal(done.report.stdin, 'ReadStream');
  assert.equal(done.stderr, 'to stderr\n');
});

test('disconnect() of a Worker the app built around a child of its own asks the child to go', async () => {
  const [rs, node] = await both('api.js', ['own-worker']);
  for (const r of [rs, node]) {
    assert.deepEqual(one(r, 'own-worker'), { ev: 'own-worker', same: true, asked: 'disconnect', exitedAfterDisconnect: true });
  }
});

test('settings.stdio shorter than 3 entries: the missing fds are pipes, and the data channel comes after them', async () => {
  const [rs, node] = await both('api.js', ['short-stdio']);
  for (const r of [rs, node]) {
    assert.deepEqual(one(r, 'short-stdio'), { ev: 'short-stdio', body: 'worker 1', output: 'to stdout\n', length: 3 });
  }
});

test("serialization: 'advanced' carries Map, Set, BigInt and Date both ways", async () => {
  const [rs, node] = await both('api.js', ['advanced']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'advanced'), {
    ev: 'advanced', mapIsMap: true, entries: [['1', 'string', 'one'], ['two', 'bigint', '2']], setIsSet: true,
    big: 'bigint', bigValue: String(2n ** 70n), date: true, workerSawMap: true,
  });
});

test('worker.send(msg, handle) with a net.Server and a net.Socket; message event with a handle', async () => {
  const [rs, node] = await both('api.js', ['handles']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'handles'), {
    ev: 'handles', viaServer: 'worker 1', viaSocket: 'socket handled by worker 1',
    received: { id: 1, m: 'here', type: 'Server', listening: true },
  });
});

test('isConnected()/isDead() through a worker\'s life and cluster.disconnect(cb)', async () => {
  const [rs, node] = await both('api.js', ['lifecycle']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'lifecycle'), {
    ev: 'lifecycle',
    states: [
      'forked:1:true:false:none', 'forked:2:true:false:none',
      'listening:1:true:false:listening', 'listening:2:true:false:listening',
      'disconnect-cb:0', 'exited:1:false:true:dead', 'exited:2:false:true:dead', 'empty-disconnect-cb:sync=false',
    ],
    ead: [true, true],
  });
});

test('schedulingPolicy: default, NODE_CLUSTER_SCHED_POLICY=rr|none, and assignment before fork', async () => {
  const cases = [
    { env: {}, args: ['policy', 'x'], before: 2, after: 2, fd: 'undefined' },
    { env: { NODE_CLUSTER_SCHED_POLICY: 'rr' }, args: ['policy', 'x'], before: 2, after: 2, fd: 'undefined' },
    { env: { NODE_CLUSTER_SCHED_POLICY: 'none' }, args: ['policy', 'x'], before: 1, after: 1, fd: 'number' },
    { env: { NODE_CLUSTER_SCHED_POLICY: 'bogus' }, args: ['policy', 'x'], before: 2, after: 2, fd: 'undefined' },
    { env: {}, args: ['policy', 'assign-none'], before: 2, after: 1, fd: 'number' },
  ];
  await Promise.all(cases.map(async (c) => {
    const [rs, node] = await both('api.js', c.args, { env: c.env });
    const a = one(rs, 'policy');
    const b = one(node, 'policy');
    assert.deepEqual({ ...a, stats: null }, b, JSON.stringify(c));
    // Round-robin workers get a stand-in handle; SCHED_NONE ones a real socket.
    assert.deepEqual([a.before, a.after, a.report.fd], [c.before, c.after, c.fd], JSON.stringify(c));
    // Only round-robin workers have a native channel.
    assert.equal(a.stats, c.after === 2 ? 1 : 0);
  }));
});

test('disconnect() and kill() right after fork(), before the worker is online', async () => {
  const [rs, node] = await both('api.js', ['early']);
  const a = one(rs, 'early');
  const b = one(node, 'early');
  assert.deepEqual(a.first, b.first);
  assert.deepEqual([...a.second].sort(), [...b.second].sort());
  assert.deepEqual(a.first, ['1:online:online:true:', '1:disconnect:disconnected:true:', '1:exit:dead:true:0,']);
  assert.deepEqual([...a.second].sort(), ['2:disconnect:disconnected:false:', '2:exit:dead:false:,SIGTERM']);
  assert.deepEqual(a.workers, []);
});

test('--inspect in execArgv: inspectPort() is asked once per worker; each worker runs an inspector', async () => {
  const [rs, node] = await both('api.js', ['inspect']);
  assert.deepEqual(rs.messages, node.messages);
  const report = { execArgv: ['--inspect=127.0.0.1:0', '--inspect-port=0'], inspector: true };
  assert.deepEqual(one(rs, 'inspect'), { ev: 'inspect', calls: 2, reports: [report, report] });
});

test('in a worker of a node:cluster primary, cluster-rs is node:cluster', async () => {
  const r = one(await runOk('mixed.js'), 'result');
  assert.deepEqual(r, {
    ev: 'result', report: { same: true, isWorker: true, id: 1, preloaded: false }, body: 'worker 1',
  });
});

test('a module preloaded through NODE_OPTIONS already finds the worker side of node:cluster', async () => {
  const [rs, node] = await both('api.js', ['preloaded']);
  for (const r of [rs, node]) {
    const { report, body } = one(r, 'preloaded');
    assert.deepEqual({ ...report, port: 0 }, {
      port: 0, same: true, isWorker: true, isPrimary: false, primaryMembers: 'undefined',
      // What the preloaded module saw when it loaded, before the app ran.
      early: { isPrimary: false, isWorker: true, fork: 'undefined' },
    });
    assert.equal(body, 'worker 1');
  }
});

test('NODE_OPTIONS in cluster.fork(env) reaches the worker as child_process passes it', async () => {
  // undefined leaves it unset; anything else becomes a string.
  const [rs, node] = await both('api.js', ['env']);
  for (const r of [rs, node]) {
    assert.deepEqual(one(r, 'env').seen, ['null', '5', 'false', '', 'unset', '--no-deprecation']);
  }
});

test('in the primary, node:cluster is the same object: a library using it sees the workers and events', async () => {
  const [rs, node] = await both('api.js', ['builtin']);
  for (const r of [rs, node]) {
    assert.deepEqual(one(r, 'builtin'), {
      ev: 'builtin', same: true, seen: ['fork 1', 'message from 1'], body: 'worker 1', fork: true,
      workers: [['1'], ['1']], settings: true,
    });
  }
});

// What napi-rs calls this platform's build, and its per-platform package in npm/.
const TRIPLE = `${process.platform}-${process.arch}${process.platform === 'linux' ? '-gnu' : ''}`;

test('the addon: the one built here, opened directly; installed from the registry, the per-platform package\'s',
  { skip: process.platform !== 'linux' && 'reads /proc/self/maps' }, async () => {
    const built = path.join(ROOT, `cluster-rs.${TRIPLE}.node`);
    const here = one(await runOk('api.js', ['addon']), 'addon');
    assert.deepEqual(here, { ev: 'addon', body: 'worker 1', primary: [built], worker: [built], loaderRan: false });

    // The layout npm makes of `npm install cluster-rs`: the package, without a
    // build of its own, beside the per-platform package that holds the addon.
    const dir = fs.realpathSync(tmpdir());
    try {
      const pkg = path.join(dir, 'node_modules', 'cluster-rs');
      for (const f of ['package.json', 'index.js', 'binding.js', 'lib']) {
        fs.cpSync(path.join(ROOT, f), path.join(pkg, f), { recursive: true });
      }
      const platformPkg = path.join(dir, 'node_modules', `cluster-rs-${TRIPLE}`);
      fs.cpSync(path.join(ROOT, 'npm', TRIPLE, 'package.json'), path.join(platformPkg, 'package.json'));
      const addon = path.join(platformPkg, `cluster-rs.${TRIPLE}.node`);
      fs.cpSync(built, addon);
      const installed = one(await runOk('api.js', ['addon'], { module: pkg }), 'addon');
      assert.deepEqual(installed, { ev: 'addon', body: 'worker 1', primary: [addon], worker: [addon], loaderRan: true });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

// What a user gets from `npm install cluster-rs` where no per-platform
// package has a build: the package carries the Rust sources, and npm's
// install step builds the addon from them (offline here: the crates are
// those the checkout's own build fetched).
test('installed from the packed package, the addon is built from source and a cluster serves', {
  skip: process.platform === 'win32' && 'cluster-rs is node:cluster on Windows',
  timeout: 600000,
}, async () => {
  const dir = fs.realpathSync(tmpdir());
  try {
    const npm = (args, cwd) => {
      const r = spawnSync('npm', args, { cwd, encoding: 'utf8', env: { ...process.env, CARGO_NET_OFFLINE: 'true' } });
      assert.equal(r.status, 0, `npm ${args.join(' ')}\n${r.stdout}\n${r.stderr}`);
      return r.stdout;
    };
    const tarball = npm(['pack', '--ignore-scripts', '--pack-destination', dir], ROOT).trim().split('\n').pop();
    const app = path.join(dir, 'app');
    fs.mkdirSync(app);
    fs.writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }));
    npm(['install', '--offline', '--no-audit', '--no-fund', path.join(dir, tarball)], app);
    const pkg = path.join(app, 'node_modules', 'cluster-rs');
    assert.ok(fs.existsSync(path.join(pkg, `cluster-rs.${TRIPLE}.node`)), 'no addon was built');
    assert.ok(!fs.existsSync(path.join(pkg, 'target')), 'the build directory was left behind');
    const served = one(await runOk('api.js', ['builtin'], { module: pkg }), 'builtin');
    assert.equal(served.body, 'worker 1');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a second copy of cluster-rs in the primary, required after workers started, is the first one\'s cluster',
  async () => {
    // Another path to the same addon: one native core, as with a package
    // installed twice. Before, the copy took node:cluster over again and
    // dropped the running workers and settings.
    const dir = fs.realpathSync(tmpdir());
    try {
      const copy = path.join(dir, 'cluster-rs');
      for (const f of ['package.json', 'index.js', 'lib']) {
        fs.cpSync(path.join(ROOT, f), path.join(copy, f), { recursive: true });
      }
      const built = `cluster-rs.${TRIPLE}.node`;
      fs.symlinkSync(path.join(ROOT, built), path.join(copy, built));
      const r = one(await runOk('api.js', ['copies', copy]), 'copies');
      assert.deepEqual(r, { ev: 'copies', same: true, workers: ['1'], restart: true, body: 'worker 2' });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

test('a worker loads what connections need once its first round-robin server listens, not before', async () => {
  const r = one(await runOk('api.js', ['lazy']), 'lazy');
  const before = ['child.js', 'native.js', 'preload.js', 'protocol.js'];
  assert.deepEqual(r, {
    ev: 'lazy', body: 'worker 1', idle: before, atListening: before,
    turned: [...before, 'errors.js', 'handles.js'].sort(),
  });
});

test('fork() with inspectPort: null throws ERR_SOCKET_BAD_PORT', async () => {
  const [rs, node] = await both('bad-input.js', ['inspect-null']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result'), {
    ev: 'result', threw: true, code: 'ERR_SOCKET_BAD_PORT', name: 'RangeError', type: 'RangeError',
    message: 'Port should be >= 0 and < 65536. Received null.', workers: 0,
  });
});

test("fork() with inspectPort: 'x' and --inspect throws ERR_SOCKET_BAD_PORT", async () => {
  const [rs, node] = await both('bad-input.js', ['inspect-string']);
  assert.deepEqual(rs.messages, node.messages);
  const r = one(rs, 'result');
  assert.equal(r.code, 'ERR_SOCKET_BAD_PORT');
  assert.equal(r.message, "Port should be >= 0 and < 65536. Received type string ('x').");
  assert.equal(r.workers, 0);
});

test('fork() with an invalid schedulingPolicy throws', async () => {
  const [rs, node] = await both('bad-input.js', ['bad-policy']);
  const a = one(rs, 'result');
  const b = one(node, 'result');
  assert.equal(a.threw, true);
  assert.equal(a.code, b.code);
  assert.equal(a.code, 'ERR_INTERNAL_ASSERTION');
  assert.match(a.message, /^Bad cluster\.schedulingPolicy: 42/);
  assert.equal(a.workers, 0);
});

test('fork() with a stdio array lacking ipc throws ERR_CHILD_PROCESS_IPC_REQUIRED', async () => {
  const [rs, node] = await both('bad-input.js', ['stdio-no-ipc']);
  assert.deepEqual(rs.messages, node.messages);
  assert.equal(one(rs, 'result').code, 'ERR_CHILD_PROCESS_IPC_REQUIRED');
});

test('fork() with a stdio string child_process does not know throws ERR_INVALID_ARG_VALUE', async () => {
  const [rs, node] = await both('bad-input.js', ['stdio-bad-string']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result').results.map((r) => r.code), ['ERR_INVALID_ARG_VALUE', 'ERR_INVALID_ARG_VALUE']);
  assert.equal(one(rs, 'result').workers, 0);
});

test('worker.send() without a message throws ERR_MISSING_ARGS', async () => {
  const [rs, node] = await both('bad-input.js', ['send-nothing']);
  assert.deepEqual(rs.messages, node.messages);
  assert.equal(one(rs, 'result').code, 'ERR_MISSING_ARGS');
});

test('fork() of a missing exec: the worker exits with a non-zero code', async () => {
  const [rs, node] = await both('bad-input.js', ['missing-exec']);
  assert.deepEqual(rs.messages, node.messages);
  const r = one(rs, 'result');
  assert.notEqual(r.code, 0);
  assert.equal(r.signal, null);
  assert.equal(r.ead, false);
  assert.match(rs.stderr, /Cannot find module/);
});

test('malformed control messages are ignored by worker and primary', async () => {
  const [rs, node] = await both('bad-input.js', ['malformed-control']);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result'), {
    ev: 'result', reply: 'junk sent', before: 'ok 1', after: ['ok 1', 'ok 1', 'ok 1'], state: 'listening',
    connected: true, workers: ['1'],
  });
});

test('junk records on the native channel are ignored', async () => {
  const rs = await runOk('bad-input.js', ['native-garbage'], { env: DISPATCH });
  const r = one(rs, 'result');
  assert.deepEqual(r.reply, { wrote: 48, fd: true });
  assert.deepEqual(r.after, ['ok 1', 'ok 1', 'ok 1', 'ok 1']);
  assert.deepEqual(r.stats['1'], { handed: 4, accepted: 4, declined: 0, held: 0 });
});

// Imported by package name from node_modules, as after an install; the same
// app imports node:cluster in its twin.
test('ESM: default and named exports in primary and worker, as node:cluster\'s', async () => {
  const dir = tmpdir();
  try {
    fs.mkdirSync(path.join(dir, 'node_modules'));
    fs.symlinkSync(ROOT, path.join(dir, 'node_modules', 'cluster-rs'), 'dir');
    const text = fs.readFileSync(fixture('esm.mjs'), 'utf8');
    fs.writeFileSync(path.join(dir, 'rs.mjs'), text);
    fs.writeFileSync(path.join(dir, 'node.mjs'), text.replaceAll("'cluster-rs'", "'node:cluster'"));
    const [rs, node] = await Promise.all([
      runOk(path.join(dir, 'rs.mjs'), [], { cwd: dir }),
      runOk(path.join(dir, 'node.mjs'), [], { cwd: dir, module: 'node' }),
    ]);
    const primary = one(rs, 'primary');
    assert.deepEqual(primary, {
      ev: 'primary', isPrimary: true, isWorker: false, isMaster: true, sameAsRequire: true, defaultInNamespace: true,
      workersSame: true, listed: ['1'], atImport: {}, namedSettingsAfterSetup: false, args: ['from-esm'],
      schedulingPolicy: 2, SCHED_RR: 2, SCHED_NONE: 1, worker: 'undefined', forkIsFunction: 'function',
      workerClass: 'function', notImportable: [],
    });
    assert.deepEqual(primary, one(node, 'primary'));
    const fromWorker = one(rs, 'from-worker');
    assert.deepEqual(fromWorker, {
      ev: 'from-worker', isPrimary: false, isWorker: true, isMaster: false, args: ['from-esm'], id: 1,
      sameWorker: true, fork: 'undefined', workers: 'undefined', port: true, notImportable: [],
    });
    assert.deepEqual(fromWorker, one(node, 'from-worker'));
    assert.deepEqual(one(rs, 'listening'), { ev: 'listening', id: 1, addressType: 4 });
    assert.deepEqual(one(rs, 'extensions').names, ['SCHED_REUSEPORT', 'shutdown', 'reload']);
    assert.deepEqual(one(node, 'extensions').names, []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a failing fixture is reported, not hidden (sanity check of the harness)', async () => {
  const r = await runPrimary('bad-input.js', ['no-such-mode']);
  assert.notEqual(r.code, 0);
});

test("a worker's replacement of cluster._getServer is what net and dgram call", async () => {
  const [rs, node] = await both('get-server.js', []);
  assert.deepEqual(rs.messages, node.messages);
  assert.deepEqual(one(rs, 'result'), {
    ev: 'result', calls: ['net', 'dgram'],
    net: { code: 'EADDRINUSE', syscall: 'bind', port: 4321 },
    dgram: { code: 'EADDRINUSE', syscall: 'bind', port: 4322 },
    restored: true,
  });
  assert.deepEqual(one(rs, 'exit'), { ev: 'exit', code: 0, signal: null });
});

test('a worker that may not load addons (--no-addons) runs; only its round-robin servers fail', async () => {
  for (const policy of ['none', 'rr']) {
    const env = { NODE_CLUSTER_SCHED_POLICY: policy };
    const [rs, node] = await both('no-addons.js', [], { env });
    const served = { ev: 'result', listen: 'listening', body: 'worker 1', port: null, exitCode: 0 };
    assert.deepEqual(one(node, 'result'), served);
    if (policy === 'none') {
      assert.deepEqual(one(rs, 'result'), served);
      assert.doesNotMatch(rs.stderr, /CLUSTER_RS_WORKER_WITHOUT_ADDON/);
    } else {
      // Its connections would come through the addon: the listen fails, with
      // a warning that says why, and the worker goes on. The primary lets
      // the port go: nobody listens on it, and trying again fails the same.
      assert.deepEqual(one(rs, 'result'), {
        ...served, listen: 'bind EINVAL', again: 'bind EINVAL', body: null, port: 'ECONNREFUSED',
      });
      assert.match(rs.stderr, /\[CLUSTER_RS_WORKER_WITHOUT_ADDON\] Warning: Addons are disabled in this worker/);
    }
  }
});
