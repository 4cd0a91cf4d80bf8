'use strict';
// Supervision: restart with backoff and 'giveup', shutdown(), rolling
// reload(), shutdownOn/reloadOn, the orphan guard, leaks over many restarts,
// and validation of the settings.
//
// Every test runs a real primary (__test__/fixtures/sup-*.js) as a detached
// child (its own process group), with a time limit after which the whole group
// is SIGKILLed and the test fails. Fixtures report JSON lines on stdout, each
// with `ev` and a timestamp `t` (ms, the primary's clock). Nothing waits on a
// sleep: timers here are only failure guards.

const nodeTest = require('node:test');
const assert = require('node:assert/strict');
const { runPrimary, alive, waitGone, killAll } = require('./helpers.js');
const TOLERANCE = 5; // ms of slack on lower bounds (clock granularity)

// ---------------------------------------------------------------- helpers

nodeTest.after(killAll);

// node:test's test(), with the output of the test's primaries appended to a
// failure (tests run one at a time).
const runs = [];
function test(name, options, fn) {
  return nodeTest.test(name, options, async (t) => {
    runs.length = 0;
    try {
      await fn(t);
    } catch (err) {
      for (const r of runs) {
        if (r.output) err.message += `\n=== ${r.label} ===\n${r.output()}`;
      }
      throw err;
    }
  });
}

// Runs `node [nodeArgs] fixtures/<name> [args]` as a detached primary (see
// helpers.runPrimary); a fixture's 'fatal' line fails the run at once.
async function run(name, args = [], { timeout = 15000, onMessage, nodeArgs = [] } = {}) {
  const record = { label: `${name} ${args.join(' ')}`, output: null };
  runs.push(record);
  const result = await runPrimary(name, args, { timeout, onMessage, nodeArgs, failOnFatal: true });
  record.output = result.describe;
  return result;
}

const pick = (result, ev) => result.messages.filter((m) => m.ev === ev);

function one(result, ev) {
  const all = pick(result, ev);
  assert.equal(all.length, 1, `expected one '${ev}' message, got ${all.length}\n${result.describe()}`);
  return all[0];
}

// The primary exited by itself with code 0 and left nothing behind.
function assertCleanExit(result) {
  assert.equal(result.signal, null, result.describe());
  assert.equal(result.code, 0, result.describe());
  assert.deepEqual(result.strays, [], 'processes of the primary\'s group outlived it');
}

// ---------------------------------------------------------------- restart

test('crash loop: the delay doubles up to maxDelay, then giveup and no more forks', { timeout: 20000 },
     async () => {
       const policy = { delay: 50, maxDelay: 200, minUptime: 1000, maxRestarts: 4 };
       const result = await run('sup-crashloop.js', [JSON.stringify(policy)]);
       assertCleanExit(result);

       const forks = pick(result, 'fork');
       const exits = pick(result, 'exit');
       assert.deepEqual(forks.map((m) => m.id), [1, 2, 3, 4, 5], 'the first worker and 4 restarts, new ids');
       assert.deepEqual(exits.map((m) => [m.id, m.code, m.signal]), forks.map((m) => [m.id, 3, null]));

       const expected = [50, 100, 200, 200];
       expected.forEach((delay, i) => {
         const gap = forks[i + 1].t - exits[i].t;
         assert.ok(gap >= delay - TOLERANCE, `restart ${i + 1}: gap ${gap.toFixed(1)} ms < delay ${delay} ms`);
         assert.ok(gap < delay + 1000, `restart ${i + 1}: gap ${gap.toFixed(1)} ms, far over delay ${delay} ms`);
       });

       const giveup = one(result, 'giveup');
       assert.deepEqual(giveup.info, { id: 5, restarts: 4, code: 3, signal: null });
       assert.equal(giveup.workers, 0);
       assert.ok(giveup.t >= exits[4].t);
       assert.ok(forks.every((m) => m.t < giveup.t), 'a worker was forked after giveup');
       assert.deepEqual(pick(result, 'warning'), [], 'no warning when a giveup listener exists');
       // Nothing pending any more: the primary ended on its own.
       const primaryExit = one(result, 'primary-exit');
       assert.equal(primaryExit.workers, 0);
     });

test('giveup without a listener: a ClusterRsWarning, not a crash', { timeout: 20000 }, async () => {
  const policy = { delay: 10, maxDelay: 10, minUptime: 1000, maxRestarts: 1 };
  const result = await run('sup-crashloop.js', [JSON.stringify(policy), 'nolistener']);
  assertCleanExit(result);
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2]);
  const warning = one(result, 'warning');
  assert.equal(warning.name, 'ClusterRsWarning');
  assert.match(warning.message, /worker 2/);
  assert.match(result.stderr, /ClusterRsWarning/);
});

test('shutdown() cancels a pending restart', { timeout: 20000 }, async () => {
  // The restart would be due 5 s after the crash; shutdown() right after the
  // crash must cancel it, and the primary must end at once.
  const policy = { delay: 5000, minUptime: 1000 };
  const result = await run('sup-crashloop.js', [JSON.stringify(policy), 'shutdown']);
  assertCleanExit(result);
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1], 'a worker was forked after shutdown()');
  assert.equal(one(result, 'shutdown-resolved').workers, 0);
  const waited = one(result, 'primary-exit').t - one(result, 'exit').t;
  assert.ok(waited < 2000, `the primary lingered ${waited.toFixed(0)} ms for a cancelled restart`);
});

test('a run longer than minUptime resets the backoff', { timeout: 20000 }, async () => {
  // Lifetimes per generation: quick, quick, healthy (600 ms > minUptime
  // 300), quick, quick, quick. With the reset the delays are 200, 400, 200,
  // 200, 400 and giveup comes after the 6th worker; without it the 4th
  // worker's exit would already give up (3 quick failures > maxRestarts 2)
  // and the delay after the healthy run would be 800.
  const policy = { delay: 200, maxDelay: 5000, minUptime: 300, maxRestarts: 2 };
  const result = await run('sup-healthy.js', [JSON.stringify(policy), JSON.stringify([0, 0, 600, 0, 0, 0])]);
  assertCleanExit(result);
  assert.deepEqual(pick(result, 'unexpected-generation'), []);

  const forks = pick(result, 'fork');
  const exits = pick(result, 'exit');
  assert.deepEqual(forks.map((m) => m.id), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(exits.map((m) => m.code), [1, 1, 1, 1, 1, 1]);
  assert.ok(exits[2].t - forks[2].t >= 300, 'the third worker ran longer than minUptime');

  const expected = [200, 400, 200, 200, 400];
  expected.forEach((delay, i) => {
    const gap = forks[i + 1].t - exits[i].t;
    assert.ok(gap >= delay - TOLERANCE, `restart ${i + 1}: gap ${gap.toFixed(1)} ms < delay ${delay} ms`);
    assert.ok(gap < delay + 1000, `restart ${i + 1}: gap ${gap.toFixed(1)} ms`);
  });
  // After the healthy run the delay is back to `delay`, not 4 * delay.
  const afterHealthy = forks[3].t - exits[2].t;
  assert.ok(afterHealthy < 600, `delay after a healthy run: ${afterHealthy.toFixed(1)} ms (expected ~200)`);

  const giveup = one(result, 'giveup');
  assert.deepEqual(giveup.info, { id: 6, restarts: 2, code: 1, signal: null });
});

// Which exits are restarted (sup-purpose.js): in every mode the primary must
// end by itself, which it only does with no restart pending.
async function purpose(mode, options = {}) {
  const result = await run('sup-purpose.js', [mode], options);
  assertCleanExit(result);
  assert.deepEqual(pick(result, 'giveup'), []);
  return result;
}

test('restarts and reloads fork a worker with the settings it was forked with, not the latest', {
  timeout: 20000,
}, async () => {
  const result = await run('sup-launch.js');
  assertCleanExit(result);
  const kinds = pick(result, 'kind').map((m) => [m.id, m.kind]);
  // 1 web and 2 jobs; 3 replaces web; 4 and 5 are the reload's.
  assert.deepEqual(kinds.slice(0, 3).sort(), [[1, 'web'], [2, 'jobs'], [3, 'web']]);
  assert.deepEqual(kinds.slice(3).map((k) => k[1]).sort(), ['jobs', 'web']);
  assert.deepEqual(one(result, 'reloaded').workers.sort(), [4, 5]);
});

test('no restart after worker.kill()', {
  timeout: 20000,
}, async () => {
  const result = await purpose('kill');
  const exits = pick(result, 'exit');
  assert.equal(exits[0].signal, 'SIGTERM');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1], 'the killed worker was restarted');
  assert.deepEqual(pick(result, 'restarted'), []);
});

test('no restart after worker.disconnect()', { timeout: 20000 }, async () => {
  const result = await purpose('disconnect');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1], 'the disconnected worker was restarted');
  assert.deepEqual(pick(result, 'exit').map((m) => [m.id, m.code, m.signal, m.ead]), [[1, 0, null, true]]);
});

test('no restart after cluster.disconnect()', { timeout: 20000 }, async () => {
  const result = await purpose('cluster');
  one(result, 'cluster-disconnected');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2], 'a disconnected worker was restarted');
  assert.deepEqual(pick(result, 'exit').map((m) => [m.code, m.ead]), [[0, true], [0, true]]);
});

function assertRestartedOnce(result, firstExit) {
  const forks = pick(result, 'fork');
  const exits = pick(result, 'exit');
  assert.deepEqual(forks.map((m) => m.id), [1, 2], 'one restart, with a new id');
  assert.deepEqual([exits[0].id, exits[0].code, exits[0].signal, exits[0].ead], [1, ...firstExit, false]);
  assert.ok(forks[1].t - exits[0].t >= 50 - TOLERANCE, 'restarted before the delay');
  // The replacement goes through the usual events and gets the same env.
  assert.deepEqual(pick(result, 'online').map((m) => m.id), [1, 2]);
  assert.deepEqual(pick(result, 'listening').map((m) => m.id), [1, 2]);
  const restarted = one(result, 'restarted');
  assert.equal(restarted.id, 2);
  assert.equal(restarted.tag, 'tag-1', 'the replacement got the env passed to fork()');
}

test('restart after process.exit(1) in the worker', { timeout: 20000 }, async () => {
  assertRestartedOnce(await purpose('exit1'), [1, null]);
});

test("restart after process.exit(1) even when an 'exit' listener of the app throws", { timeout: 20000 }, async () => {
  const result = await purpose('exit1-throw');
  assert.deepEqual(pick(result, 'uncaught').map((m) => m.message), ['a listener failed']);
  assertRestartedOnce(result, [1, null]);
});

test('restart after an external SIGKILL of the worker', { timeout: 20000 }, async () => {
  const result = await purpose('sigkill', {
    onMessage(m) {
      if (m.ev === 'all-ready') process.kill(m.pids[0], 'SIGKILL');
    },
  });
  assertRestartedOnce(result, [null, 'SIGKILL']);
});

test('restart after an external SIGKILL, also when worker.kill() threw for a bad signal before', {
  timeout: 20000,
}, async () => {
  const result = await purpose('kill-bad', {
    onMessage(m) {
      if (m.ev === 'kill-me') process.kill(m.pid, 'SIGKILL');
    },
  });
  assert.deepEqual(pick(result, 'threw').map((m) => m.code), ['ERR_UNKNOWN_SIGNAL']);
  assertRestartedOnce(result, [null, 'SIGKILL']);
});

test('cluster.disconnect() drops a restart that waits out its delay; the primary ends', { timeout: 20000 },
     async () => {
       // Without it, the restart would keep the primary running: the run times out.
       const result = await run('sup-races.js', ['disconnect-pending'], { timeout: 10000 });
       assertCleanExit(result);
       one(result, 'disconnected');
       assert.deepEqual(one(result, 'primary-exit').forks, [1]);
     });

test('restarts that cannot be spawned count as quick failures and end in giveup', { timeout: 20000 },
     async () => {
       const result = await run('sup-races.js', ['spawn-fail']);
       assertCleanExit(result);
       // maxRestarts 2: the crash and two failed spawns, then the slot is given up.
       assert.deepEqual(one(result, 'primary-exit').forks, [1, 2, 3]);
       assert.deepEqual(one(result, 'giveup').info, { id: 3, restarts: 2, code: null, signal: null });
       assert.equal(pick(result, 'warning').length, 2);
       assert.match(pick(result, 'warning')[0].message, /spawn .* ENOENT/);
     });

test('restarts that cannot be spawned are quick failures with minUptime: 0 too', { timeout: 20000 }, async () => {
  const result = await run('sup-races.js', ['spawn-fail', '0']);
  assertCleanExit(result);
  // The crash counts as a healthy run (minUptime 0); the three failed spawns
  // after it do not.
  assert.deepEqual(one(result, 'primary-exit').forks, [1, 2, 3, 4]);
  assert.deepEqual(one(result, 'giveup').info, { id: 4, restarts: 2, code: null, signal: null });
});

// ---------------------------------------------------------------- reload

function checkReload(result, { waitReady }) {
  assertCleanExit(result);
  assert.deepEqual(pick(result, 'bad-exit'), [], 'a worker exited with a non-zero code');
  const r = one(result, 'result');
  assert.equal(r.errorCount, 0, `failed requests during reload: ${JSON.stringify(r.errors)}`);
  assert.ok(r.perPhase[1] > 0 && r.perPhase[2] > 0, `no traffic during a reload: ${r.perPhase}`);

  const [g0, g1, g2] = r.generations;
  assert.equal(r.generations.length, 3);
  for (const g of r.generations) assert.equal(g.length, 2, `generations: ${JSON.stringify(r.generations)}`);
  const all = new Set([...g0, ...g1, ...g2]);
  assert.equal(all.size, 6, `every reload replaces every worker: ${JSON.stringify(r.generations)}`);
  for (const id of g2) assert.ok(r.byId[id] > 0, `worker ${id} of the last generation served nothing`);

  // One at a time: old worker i is disconnected only once its replacement is
  // up (listening, or 'ready' with waitReady), and the next replacement is
  // forked only after that.
  const at = (what, id) => {
    const e = r.timeline.find(([, w, i]) => w === what && i === id);
    assert.ok(e, `no '${what}' for worker ${id}: ${JSON.stringify(r.timeline)}`);
    return e[0];
  };
  for (const [olds, news] of [[g0, g1], [g1, g2]]) {
    olds.forEach((old, i) => {
      const fresh = news[i];
      const up = at(waitReady ? 'ready' : 'listening', fresh);
      assert.ok(at('fork', fresh) < up);
      assert.ok(up <= at('disconnect', old), `worker ${old} was disconnected before ${fresh} was up`);
      if (waitReady) {
        assert.ok(at('ready', fresh) - at('listening', fresh) >= 140 - TOLERANCE,
                  'the replacement said ready 150 ms after listening');
      }
      if (i + 1 < news.length) {
        assert.ok(at('disconnect', old) < at('fork', news[i + 1]), 'two workers replaced at once');
      }
    });
  }
  assert.deepEqual(one(result, 'done').workers, []);
}

test('reload under load: two rolling reloads, zero failed requests', { timeout: 30000 }, async () => {
  checkReload(await run('sup-reload.js', ['listen'], { timeout: 25000 }), { waitReady: false });
});

test('reload with waitReady: old workers leave only after the new ones say ready', { timeout: 30000 },
     async () => {
       checkReload(await run('sup-reload.js', ['waitReady'], { timeout: 25000 }), { waitReady: true });
     });

test('reload() asked again during a reload: one more follows, and every worker runs what was deployed',
     { timeout: 30000 }, async () => {
       const result = await run('sup-reload-more.js', ['again'], { timeout: 25000 });
       assertCleanExit(result);
       const r = one(result, 'result');
       assert.deepEqual(r, { ...r, same: false, settled: ['fulfilled', 'fulfilled'] });
       assert.deepEqual(r.versions, ['v2', 'v2'], 'a worker replaced before the second reload() kept the old code');
     });

test('reload when each worker also listens on a port of its own (base + id)', { timeout: 30000 }, async () => {
  const result = await run('sup-reload-more.js', ['own-port'], { timeout: 25000 });
  assertCleanExit(result);
  const r = one(result, 'result');
  assert.equal(r.outcome, 'reloaded');
  assert.equal(r.served, true);
  assert.deepEqual(r.ids, [3, 4]);
  assert.deepEqual(r.own, ['own 3', 'own 4']);
});

test('reload of a single worker whose new code opens another port first waits for the app\'s port',
     { timeout: 30000 }, async () => {
       const result = await run('sup-reload-more.js', ['new-port'], { timeout: 25000 });
       assertCleanExit(result);
       assert.deepEqual(one(result, 'result'), {
         ...one(result, 'result'),
         outcome: 'reloaded',
         log: ['new listening other', 'new listening app', 'old disconnect'],
       });
     });

function checkReloadFailure(result, code) {
  assertCleanExit(result);
  const settled = one(result, 'reload-settled');
  assert.ok(settled.error, 'reload() resolved');
  assert.equal(settled.error.code, code);
  const r = one(result, 'result');
  assert.deepEqual(r.before, [1, 2]);
  assert.deepEqual(r.after, [1, 2], 'the old workers (and only they) remain');
  // The old workers still serve, both of them.
  assert.deepEqual([...new Set(r.bodies)].sort(), ['1', '2']);
  return settled.error;
}

test('reload failure: the replacement exits before it is ready', { timeout: 20000 }, async () => {
  const result = await run('sup-reload-fail.js', ['crash']);
  const error = checkReloadFailure(result, 'ERR_CLUSTER_RS_RELOAD_FAILED');
  assert.equal(error.workerId, 3);
  assert.equal(error.exitCode, 7);
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2, 3], 'the second worker was replaced anyway');
});

test('reload failure: the replacement is not ready within readyTimeout', {
  timeout: 20000,
}, async () => {
  const result = await run('sup-reload-fail.js', ['timeout']);
  const error = checkReloadFailure(result, 'ERR_CLUSTER_RS_RELOAD_TIMEOUT');
  assert.ok(error.ms >= 300 - TOLERANCE, `rejected after ${error.ms} ms, before readyTimeout`);
  // The late replacement is retired like any worker (disconnected, killed
  // only after shutdownTimeout): it must be gone, and the old ones serve.
  assert.ok(pick(result, 'exit').some((m) => m.id === 3), 'the late replacement is still alive');
});

test('reload failure with a restart policy: the failed replacement is not restarted', {
  timeout: 20000,
}, async () => {
  const result = await run('sup-reload-fail.js', ['crash', 'restart']);
  checkReloadFailure(result, 'ERR_CLUSTER_RS_RELOAD_FAILED');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2, 3]);
});

test('reload timeout with a restart policy: the killed replacement is not restarted', {
  timeout: 20000,
}, async () => {
  const result = await run('sup-reload-fail.js', ['timeout', 'restart']);
  checkReloadFailure(result, 'ERR_CLUSTER_RS_RELOAD_TIMEOUT');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2, 3]);
});

test('a worker that dies while a reload replaces it gets no restart on top of its replacement',
     { timeout: 20000 }, async () => {
       const result = await run('sup-races.js', ['crash-mid-reload']);
       assertCleanExit(result);
       assert.deepEqual(one(result, 'reloaded').live, [3, 4], 'two workers configured, two after the reload');
       assert.deepEqual(one(result, 'primary-exit').forks, [1, 2, 3, 4]);
     });

test('reload(): a replacement that cannot be spawned rejects at once; the old worker stays',
     { timeout: 20000 }, async () => {
       const result = await run('sup-races.js', ['reload-spawn-fail']);
       assertCleanExit(result);
       const reload = one(result, 'reload');
       assert.equal(reload.code, 'ERR_CLUSTER_RS_RELOAD_FAILED');
       assert.ok(reload.ms < 10000, `rejected after ${reload.ms} ms (readyTimeout is 60 s)`);
       assert.equal(reload.oldAlive, true);
     });

// ---------------------------------------------------------------- shutdown

function checkShutdown(result) {
  assertCleanExit(result);
  const exits = pick(result, 'exit');
  const healthy = exits.find((m) => m.role === 'healthy');
  const stuck = exits.find((m) => m.role === 'stuck');
  assert.deepEqual([healthy.code, healthy.signal], [0, null], 'the healthy worker exits by itself');
  assert.deepEqual([stuck.code, stuck.signal], [null, 'SIGKILL'], 'the stuck worker is SIGKILLed');
  // The healthy worker's open request finished before it left.
  const slow = pick(result, 'response').find((m) => m.name === 'slow');
  assert.ok(slow, `the in-flight request did not complete\n${result.describe()}`);
  assert.deepEqual([slow.status, slow.body], [200, 'slow-ok']);
  assert.ok(slow.t <= healthy.t);
  assert.ok(healthy.t < stuck.t);
  // A client arriving after shutdown() began is not served.
  const late = pick(result, 'client-error').find((m) => m.name === 'late');
  assert.ok(late, 'a connection made after shutdown() was served');
  assert.ok(['ECONNREFUSED', 'ECONNRESET'].includes(late.code), late.code);

  const resolved = one(result, 'shutdown-resolved');
  assert.ok(resolved.ms >= 500 - TOLERANCE, `resolved after ${resolved.ms} ms, before the timeout`);
  assert.ok(resolved.ms < 3000, `resolved after ${resolved.ms} ms`);
  assert.ok(stuck.t <= resolved.t, 'resolved before the stuck worker was gone');
  assert.equal(resolved.workers, 0);
  assert.deepEqual(resolved.dead, [true, true]);
  // The restart policy does not bring anything back.
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2]);
}

test('shutdown({ timeout: 500 }) SIGKILLs a stuck worker; a healthy one exits 0', { timeout: 20000 },
     async () => {
       checkShutdown(await run('sup-shutdown.js', ['option']));
     });

test('shutdown() uses settings.shutdownTimeout', { timeout: 20000 }, async () => {
  checkShutdown(await run('sup-shutdown.js', ['setting']));
});

test('shutdown() during a reload waits for the worker the reload is draining; the reload rejects',
     { timeout: 20000 }, async () => {
       const result = await run('sup-races.js', ['shutdown-mid-reload']);
       assertCleanExit(result);
       const shutdown = one(result, 'shutdown');
       assert.equal(shutdown.oldAlive, false, 'the draining worker outlived shutdown()');
       assert.ok(shutdown.ms >= 200 - TOLERANCE, `resolved after ${shutdown.ms} ms, before its timeout`);
       assert.equal(one(result, 'reload').code, 'ERR_CLUSTER_RS_RELOAD_ABORTED');
     });

test('cluster.disconnect() during a reload whose old worker died: the slot is not restarted when the reload fails',
     { timeout: 20000 }, async () => {
       const result = await run('sup-races.js', ['disconnect-reloading']);
       assertCleanExit(result);
       one(result, 'disconnected');
       assert.equal(one(result, 'reload').code, 'ERR_CLUSTER_RS_RELOAD_FAILED');
       assert.deepEqual(one(result, 'primary-exit').forks, [1, 2], 'a worker was restarted after cluster.disconnect()');
     });

test("shutdown() while a reload's replacement starts aborts the reload", { timeout: 20000 }, async () => {
  const result = await run('sup-races.js', ['shutdown-replacing']);
  assertCleanExit(result);
  assert.equal(one(result, 'reload').code, 'ERR_CLUSTER_RS_RELOAD_ABORTED');
});

test('worker.disconnect() twice: the worker still drains and exits 0', { timeout: 20000 }, async () => {
  const result = await run('sup-races.js', ['disconnect-twice']);
  assertCleanExit(result);
  const exit = one(result, 'exit');
  assert.deepEqual([exit.code, exit.signal], [0, null], result.describe());
});

test('shutdown() waits for a worker the app disconnected, and kills it on its timeout', { timeout: 20000 },
     async () => {
       const result = await run('sup-races.js', ['shutdown-drained']);
       assertCleanExit(result);
       const shutdown = one(result, 'shutdown');
       assert.equal(shutdown.oldAlive, false, 'the draining worker outlived shutdown()');
       assert.ok(shutdown.ms >= 200 - TOLERANCE, `resolved after ${shutdown.ms} ms, before its timeout`);
     });

test("shutdown() resolves though an 'exit' listener of the app throws", { timeout: 20000 }, async () => {
  const result = await run('sup-races.js', ['exit-throws']);
  assertCleanExit(result);
  assert.deepEqual(pick(result, 'uncaught').map((m) => m.message), ['a listener failed']);
  assert.deepEqual(one(result, 'shutdown').workers, 0);
});

// ---------------------------------------------------------------- signals

test('shutdownOn SIGTERM: the primary shuts down and exits 0', { timeout: 20000 }, async () => {
  let pids = null;
  const result = await run('sup-signals.js', [], {
    onMessage(m, child) {
      if (m.ev === 'ready') {
        pids = m.pids;
        child.kill('SIGTERM');
      }
    },
  });
  assertCleanExit(result);
  assert.equal(pids.length, 2);
  assert.deepEqual(pids.filter(alive), [], 'a worker outlived the primary');
  const exits = pick(result, 'exit');
  assert.deepEqual(exits.map((m) => [m.code, m.signal]), [[0, null], [0, null]], 'workers left gracefully');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2], 'restart: true must not restart them');
  assert.deepEqual(one(result, 'primary-exit').code, 0);
});

test('a later setupPrimary() moves a signal from reloadOn to shutdownOn, and drops the one it no longer names', {
  timeout: 20000,
}, async () => {
  const result = await run('sup-signals.js', ['moved'], {
    onMessage(m, child) {
      if (m.ev === 'ready') child.kill('SIGHUP');
    },
  });
  assertCleanExit(result);
  const hooks = one(result, 'hooks');
  assert.deepEqual([hooks.SIGHUP, hooks.SIGTERM], [1, 0], 'listeners on process for SIGHUP and SIGTERM');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2], 'SIGHUP reloaded instead of shutting down');
  assert.deepEqual(one(result, 'primary-exit').code, 0);
});

test('reloadOn SIGHUP replaces every worker; then SIGTERM shuts down', { timeout: 20000 }, async () => {
  const pids = new Set();
  let hupped = false;
  let termed = false;
  const listening = new Set();
  const exited = new Set();
  const result = await run('sup-signals.js', [], {
    onMessage(m, child) {
      if (m.ev === 'fork') pids.add(m.wpid);
      if (m.ev === 'ready' && !hupped) {
        hupped = true;
        child.kill('SIGHUP');
      }
      if (m.ev === 'listening') listening.add(m.id);
      if (m.ev === 'exit') exited.add(m.id);
      if (!termed && exited.has(1) && exited.has(2) && listening.has(3) && listening.has(4)) {
        termed = true;
        child.kill('SIGTERM');
      }
    },
  });
  assertCleanExit(result);
  assert.ok(termed, 'the reload did not complete');
  assert.equal(pids.size, 4);
  assert.deepEqual([...pids].filter(alive), [], 'a worker outlived the primary');
  assert.deepEqual(pick(result, 'fork').map((m) => m.id), [1, 2, 3, 4]);
  const exits = pick(result, 'exit');
  assert.deepEqual(exits.slice(0, 2).map((m) => m.id), [1, 2], 'the old workers left first');
  assert.ok(exits.every((m) => m.code === 0 && m.signal === null), 'every worker left gracefully');
  assert.deepEqual(pick(result, 'warning'), []);
});

// ---------------------------------------------------------------- orphans

test('workers never outlive a SIGKILLed primary', { timeout: 20000 }, async () => {
  let gone = null;
  let pids = null;
  const result = await run('sup-orphan.js', [], {
    onMessage(m, child) {
      if (m.ev !== 'ready') return;
      pids = m.pids;
      assert.equal(pids.length, 3);
      assert.ok(pids.every(alive));
      process.kill(child.pid, 'SIGKILL');
      gone = waitGone(pids, 5000); // the busy one goes 2 s after its primary (src/parent.rs)
      gone.catch(() => {}); // awaited below
    },
  });
  assert.equal(result.signal, 'SIGKILL');
  assert.ok(gone, `the fixture never reported its workers\n${result.describe()}`);
  await gone;
  assert.deepEqual(result.strays, []);
});

// ---------------------------------------------------------------- leaks

test('200 restarts leak neither fds nor memory in the primary', { timeout: 60000 }, async () => {
  const restarts = 200;
  const result = await run('sup-leak.js', [String(restarts)], { timeout: 50000, nodeArgs: ['--expose-gc'] });
  assertCleanExit(result);
  const { first, last, forks, workers } = one(result, 'result');
  assert.equal(forks, restarts + 1);
  assert.equal(workers, 1);
  assert.ok(last.fds - first.fds <= 0, `fds grew from ${first.fds} to ${last.fds}`);
  const growth = (last.rss - first.rss) / 2 ** 20;
  assert.ok(growth < 30, `RSS grew by ${growth.toFixed(1)} MiB`);
  assert.equal(one(result, 'primary-exit').forks, restarts + 1, 'a worker was restarted after disconnect()');
});

// ---------------------------------------------------------------- validation

test('invalid settings throw Node-style errors and change nothing', { timeout: 20000 }, async () => {
  const result = await run('sup-validate.js');
  assertCleanExit(result);
  const cases = Object.fromEntries(pick(result, 'case').map((m) => [m.name, m]));
  const expect = {
    'restart-string': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.restart/],
    'restart-null': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.restart/],
    'restart-delay-negative': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.restart\.delay.*Received -1/],
    'restart-delay-string': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.restart\.delay/],
    'restart-maxDelay-nan': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.restart\.maxDelay/],
    'restart-maxRestarts-negative': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.restart\.maxRestarts/],
    'shutdownOn-unknown': ['ERR_UNKNOWN_SIGNAL', 'TypeError', /SIGNOPE/],
    'shutdownOn-number': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.shutdownOn/],
    'shutdownOn-object': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.shutdownOn/],
    'reloadOn-unknown': ['ERR_UNKNOWN_SIGNAL', 'TypeError', /SIGNOPE/],
    'shutdownTimeout-negative': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.shutdownTimeout/],
    'readyTimeout-string': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.readyTimeout/],
    'waitReady-string': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.waitReady/],
    // shutdown() throws synchronously rather than returning a rejected Promise.
    'shutdown-timeout-string': ['ERR_INVALID_ARG_TYPE', 'TypeError', /options\.timeout/],
    'shutdown-timeout-negative': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.timeout/],
    'shutdown-options-string': ['ERR_INVALID_ARG_TYPE', 'TypeError', /"options" argument/],
    'shutdownOn-sigkill': ['ERR_INVALID_ARG_VALUE', 'TypeError', /options\.shutdownOn.*cannot be caught.*SIGKILL/],
    'reloadOn-sigstop': ['ERR_INVALID_ARG_VALUE', 'TypeError', /options\.reloadOn.*cannot be caught.*SIGSTOP/],
    // Timers cannot wait longer: setTimeout() would fire at once instead.
    'shutdownTimeout-too-long': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.shutdownTimeout.*<= 2147483647/],
    'readyTimeout-too-long': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.readyTimeout/],
    'shutdown-timeout-too-long': ['ERR_OUT_OF_RANGE', 'RangeError', /options\.timeout/],
  };
  for (const [name, [code, type, message]] of Object.entries(expect)) {
    const c = cases[name];
    assert.ok(c, `case ${name} did not run`);
    assert.equal(c.threw, true, `${name} did not throw`);
    assert.equal(c.code, code, name);
    assert.equal(c.type, type, name);
    assert.match(c.message, message, name);
    assert.equal(c.settingsUnchanged, true, `${name} changed cluster.settings`);
  }
  for (const name of ['valid-restart-true', 'valid-restart-object', 'valid-signals', 'valid-restart-false']) {
    assert.equal(cases[name].threw, false, `${name} threw ${cases[name].message}`);
    assert.equal(cases[name].settingsUnchanged, false, `${name} was not applied`);
  }
  one(result, 'empty-ok');
});
