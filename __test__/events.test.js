'use strict';
// Events in the primary and in workers: order, arguments and worker state,
// compared with node:cluster running the same fixture.

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { runOk, pick, one, killAll } = require('./helpers.js');

after(killAll);

// Per worker id: the events the primary process saw, in order ('primary'),
// and what the worker printed itself ('worker'). Ports are replaced by 'P'
// once checked to be the one shared port. Worker 2 is kill()ed, worker 3
// kills itself and worker 4 disconnects itself and exits: whether the
// primary sees their 'disconnect' or their 'exit' first is up to the OS
// (under node:cluster too; seen for worker 4 on a loaded machine), so from
// the first of them on their events are kept in a canonical order without
// the fields that depend on it.
function normalize(result) {
  const byId = {};
  const ports = new Set();
  for (const m of pick(result, 'event')) {
    const entry = { ...m };
    delete entry.ev;
    if (entry.address) {
      ports.add(entry.address.port);
      entry.address = { ...entry.address, port: 'P' };
    }
    const id = entry.id ?? 0;
    byId[id] ??= { primary: [], worker: [] };
    byId[id][entry.src === 'worker-side' ? 'worker' : 'primary'].push(entry);
  }
  for (const id of [2, 3, 4]) {
    const killed = byId[id].primary;
    const at = killed.findIndex((e) => e.name === 'disconnect' || e.name === 'exit');
    const tail = killed.splice(at).map(({ src, name, ead, code, signal }) => ({ src, name, ead, code, signal }));
    // By event, the worker's before the cluster's, as they are emitted.
    const key = (e) => `${e.name}:${e.src === 'worker' ? 0 : 1}:${e.src}`;
    tail.sort((a, b) => key(a).localeCompare(key(b)));
    killed.push(...tail);
  }
  return { byId, ports: [...ports] };
}

const names = (events) => events.map((e) => `${e.src}:${e.name}`);

test('event order, arguments and worker state match node:cluster', async () => {
  const [rs, node] = await Promise.all([
    runOk('events.js', [], { module: 'rs' }),
    runOk('events.js', [], { module: 'node' }),
  ]);
  const a = normalize(rs);
  const b = normalize(node);

  assert.equal(a.ports.length, 1, 'all listening events carry the one shared port');
  assert.ok(a.ports[0] > 0);
  assert.deepEqual(a.byId, b.byId);

  // Independently of node:cluster, spell out what is expected.
  assert.deepEqual(one(rs, 'flags'), {
    ev: 'flags', isPrimary: true, isMaster: true, isWorker: false, worker: 'undefined', workers: [],
  });
  const clusterOnly = (id) => a.byId[id].primary.filter((e) => e.src === 'cluster').map((e) => e.name);
  // setup (one per fork() call) and fork come on later ticks, in fork order.
  assert.deepEqual(a.byId[0].primary.map((e) => e.name), ['setup', 'setup', 'setup', 'setup']);
  const order = pick(rs, (m) => m.ev === 'event' && m.src === 'cluster' && ['setup', 'fork'].includes(m.name))
    .map((m) => `${m.name}${m.id ?? ''}`);
  assert.deepEqual(order, ['setup', 'fork1', 'setup', 'fork2', 'setup', 'fork3', 'setup', 'fork4']);

  for (const id of [1, 2, 3, 4]) {
    const events = a.byId[id].primary;
    assert.deepEqual(clusterOnly(id).slice(0, 5), ['fork', 'online', 'message', 'listening', 'message'], `worker ${id}`);
    // The worker-level event fires before the cluster-level one.
    const seq = names(events);
    for (const ev of id === 2 ? ['online', 'listening'] : ['online', 'listening', 'disconnect', 'exit']) {
      assert.ok(seq.indexOf(`worker:${ev}`) < seq.indexOf(`cluster:${ev}`), `${ev} of worker ${id}: ${seq}`);
    }
    const states = events.filter((e) => e.src === 'cluster' && e.state).map((e) => `${e.name}=${e.state}`);
    assert.deepEqual(states.filter((s) => !s.startsWith('message') && !s.startsWith('exit') &&
                                     !s.startsWith('disconnect')),
                     ['fork=none', 'online=online', 'listening=listening']);
    const listening = events.find((e) => e.src === 'cluster' && e.name === 'listening');
    assert.deepEqual(listening.address, {
      keys: ['address', 'addressType', 'fd', 'port'], addressType: 4, address: '127.0.0.1', port: 'P', fd: 'undefined',
    });
    const messages = events.filter((e) => e.src === 'cluster' && e.name === 'message').map((e) => e.message);
    assert.deepEqual(messages, [{ hello: id }, { thanks: id }]);
    assert.ok(events.filter((e) => e.name === 'message').every((e) => e.handle === 'undefined'));
    const exit = events.find((e) => e.src === 'cluster' && e.name === 'exit');
    assert.equal(exit.ead, id !== 2, `exitedAfterDisconnect of worker ${id}`);
    assert.deepEqual([exit.code, exit.signal], id === 2 ? [null, 'SIGTERM'] : [0, null]);
  }

  // disconnect() sets exitedAfterDisconnect at once; kill() does not.
  const afterDisconnect = a.byId[1].primary.find((e) => e.name === 'after-disconnect()');
  assert.equal(afterDisconnect.ead, true);
  const afterKill = a.byId[2].primary.find((e) => e.name === 'after-kill()');
  assert.equal(afterKill.ead, undefined);

  // Worker 1 (disconnected): disconnect then exit, then 'error' for the late send.
  const tail1 = a.byId[1].primary.slice(-5);
  assert.deepEqual(tail1.map((e) => `${e.src}:${e.name}:${e.state}`), [
    'worker:disconnect:disconnected', 'cluster:disconnect:disconnected',
    'worker:exit:dead', 'cluster:exit:dead', 'worker:error:dead',
  ]);
  assert.equal(tail1[4].code, 'ERR_IPC_CHANNEL_CLOSED');
  assert.equal(tail1[0].connected, false);
  assert.equal(tail1[2].dead, true);
  assert.equal(tail1[2].listed, false, 'an exited, disconnected worker is no longer in cluster.workers');

  // What the workers saw themselves.
  for (const id of [1, 2, 3, 4]) {
    const w = a.byId[id].worker;
    assert.deepEqual(w[0], {
      src: 'worker-side', name: 'start', id, state: 'online', isPrimary: false, isMaster: false, isWorker: true,
      workers: 'undefined', connected: true, dead: false, sameProcess: true,
    });
    assert.deepEqual(w.find((e) => e.name === 'message').message, { welcome: id });
  }
  assert.deepEqual(a.byId[3].worker.at(-1), { src: 'worker-side', name: 'disconnect', id: 3, state: 'destroying', ead: true });
  assert.deepEqual(a.byId[1].worker.at(-1), { src: 'worker-side', name: 'disconnect', id: 1, state: 'listening', ead: true });
  assert.deepEqual(a.byId[4].worker.at(-1), { src: 'worker-side', name: 'disconnect', id: 4, state: 'disconnecting', ead: true });
  assert.deepEqual(one(rs, 'done').workers, []);
});

test('control traffic never reaches user message listeners', async () => {
  const [rs, node] = await Promise.all([
    runOk('messages.js', [], { module: 'rs' }),
    runOk('messages.js', [], { module: 'node' }),
  ]);
  for (const result of [rs, node]) {
    const primary = one(result, 'primary');
    assert.deepEqual(primary.seen, { cluster: { 1: 5, 2: 5 }, worker: { 1: 5, 2: 5 } });
    assert.deepEqual(primary.bad, []);
    assert.equal(primary.served.length, 6);
    assert.ok(primary.served.includes('1') && primary.served.includes('2'), `${primary.served}`);
    // The 'listening' address of a TCP and of a UDP server.
    assert.deepEqual(primary.addresses, [
      '{"addressType":"udp4","address":"127.0.0.1","port":true,"fd":-1}',
      '{"addressType":"udp4","address":"127.0.0.1","port":true,"fd":-1}',
      '{"addressType":4,"address":"127.0.0.1","port":"P"}',
      '{"addressType":4,"address":"127.0.0.1","port":"P"}',
    ]);
    const workers = pick(result, 'worker').sort((x, y) => x.id - y.id);
    assert.deepEqual(workers, [
      { ev: 'worker', id: 1, viaProcess: 5, viaWorker: 5, bad: [] },
      { ev: 'worker', id: 2, viaProcess: 5, viaWorker: 5, bad: [] },
    ]);
  }
});
