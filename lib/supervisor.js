'use strict';
// Supervision, all opt-in through setupPrimary(): restarting workers that
// die (the backoff decision and its timers live in the native core),
// graceful shutdown(), zero-downtime rolling reload(), and signal hooks.
// Without these settings a cluster behaves exactly like node:cluster.

const os = require('node:os');
const native = require('./native.js');
const {
  invalidArgType, invalidArgValue, validateObject, validateNumber,
} = require('./errors.js');

const DEFAULT_RESTART = { delay: 100, maxDelay: 15000, minUptime: 1000, maxRestarts: 16 };
const DEFAULT_SHUTDOWN_TIMEOUT = 5000;
const DEFAULT_READY_TIMEOUT = 30000;
// The longest a timer can wait: setTimeout() fires at once above it.
const TIMEOUT_MAX = 2 ** 31 - 1;

function unknownSignal(signal) {
  const err = new TypeError(`Unknown signal: ${signal}`);
  err.code = 'ERR_UNKNOWN_SIGNAL';
  return err;
}

function validateSignals(value, name) {
  const list = typeof value === 'string' ? [value] : value;
  if (!Array.isArray(list)) throw invalidArgType(name, ['string', 'Array'], value);
  for (const signal of list) {
    if (typeof signal !== 'string') throw invalidArgType(name, 'string', signal);
    if (!Object.hasOwn(os.constants.signals, signal)) throw unknownSignal(signal);
    if (signal === 'SIGKILL' || signal === 'SIGSTOP') throw invalidArgValue(name, signal, 'cannot be caught');
  }
  return list;
}

// Checks the cluster-rs settings; returns the restart policy (or null).
function validateSettings(settings) {
  let restart = null;
  if (settings.restart !== undefined && settings.restart !== false) {
    if (settings.restart === true) {
      restart = { ...DEFAULT_RESTART };
    } else {
      validateObject(settings.restart, 'options.restart');
      restart = { ...DEFAULT_RESTART };
      for (const key of Object.keys(DEFAULT_RESTART)) {
        const value = settings.restart[key];
        if (value === undefined) continue;
        validateNumber(value, `options.restart.${key}`, 0, key === 'maxRestarts' ? Infinity : Number.MAX_SAFE_INTEGER);
        restart[key] = value;
      }
    }
  }
  for (const key of ['shutdownTimeout', 'readyTimeout']) {
    if (settings[key] !== undefined) validateNumber(settings[key], `options.${key}`, 0, TIMEOUT_MAX);
  }
  if (settings.waitReady !== undefined && typeof settings.waitReady !== 'boolean') {
    throw invalidArgType('options.waitReady', 'boolean', settings.waitReady);
  }
  if (settings.shutdownOn !== undefined) validateSignals(settings.shutdownOn, 'options.shutdownOn');
  if (settings.reloadOn !== undefined) validateSignals(settings.reloadOn, 'options.reloadOn');
  return restart;
}

// `primary` gives: cluster, forkWorker(launch, slot), keysOf(worker),
// stopAccepting(), and the worker symbols kLaunch (what a worker was forked
// with: env and settings), kSlot, kStarted, kStopped.
function createSupervisor(primary) {
  const { cluster } = primary;
  const pending = new Map(); // slot -> { launch, id }: restarts waiting for their delay
  const hooked = new Map(); // signal -> the listener we put on process
  const retiring = new Set(); // workers disconnected (by us or the app) that have not exited yet
  const kCandidate = Symbol('cluster-rs.reload-candidate');
  const kReplacing = Symbol('cluster-rs.being-replaced');
  const kOwnListener = Symbol('cluster-rs.supervisor-listener');
  let policy = null;
  let keepAlive = null;
  let shutdownPromise = null;
  let shutdowns = 0;
  let suspensions = 0; // cluster.disconnect() calls whose workers have not all exited yet
  let reloadPromise = null; // the reload under way
  let reloadAfter = null; // one more, asked for while a reload was under way
  let started = false;

  function start() {
    if (started) return;
    started = true;
    native.supervisorStart(onDue);
  }

  function holdAlive() {
    if (pending.size > 0 && keepAlive === null) keepAlive = setInterval(() => {}, TIMEOUT_MAX);
    if (pending.size === 0 && keepAlive !== null) {
      clearInterval(keepAlive);
      keepAlive = null;
    }
  }

  function configure(settings) {
    policy = validateSettings(settings);
    if (policy) start();
    else cancelRestarts();
    // The hooks follow the settings: a signal moved from reloadOn to
    // shutdownOn, or dropped, is moved or dropped. (A signal in both shuts
    // down.)
    const wanted = new Map();
    for (const signal of settings.reloadOn ? validateSignals(settings.reloadOn, 'options.reloadOn') : []) {
      wanted.set(signal, onReloadSignal);
    }
    for (const signal of settings.shutdownOn ? validateSignals(settings.shutdownOn, 'options.shutdownOn') : []) {
      wanted.set(signal, onShutdownSignal);
    }
    for (const [signal, fn] of hooked) {
      if (wanted.get(signal) === fn) continue;
      process.removeListener(signal, fn);
      hooked.delete(signal);
    }
    for (const [signal, fn] of wanted) {
      if (hooked.has(signal)) continue;
      hooked.set(signal, fn);
      process.on(signal, fn);
    }
  }

  function onShutdownSignal() {
    shutdown().then(() => process.exit(0), () => process.exit(1));
  }

  function onReloadSignal() {
    reload().catch((err) => process.emitWarning(`cluster-rs: reload failed: ${err.message}`, 'ClusterRsWarning'));
  }

  // Whether anything may be restarted now: a policy is set, and no
  // shutdown() or cluster.disconnect() is under way.
  function mayRestart() {
    return policy !== null && !shutdownPromise && suspensions === 0;
  }

  // Called after a worker's 'exit' events.
  function onExit(worker, code, signal) {
    // Not restarted: workers stopped on purpose, reload candidates (the
    // reload fails instead), and workers a reload is replacing (the
    // replacement stands in for them).
    if (!mayRestart() || worker.exitedAfterDisconnect || worker[primary.kStopped] || worker[kCandidate] ||
        worker[kReplacing]) {
      return;
    }
    restartLater(worker[primary.kSlot], worker[primary.kLaunch], Date.now() - worker[primary.kStarted],
                 { id: worker.id, code, signal });
  }

  // Schedules a restart of `slot` by the policy, or gives the slot up.
  function restartLater(slot, launch, uptime, info) {
    const decision = native.supervisorExit(slot, uptime, policy.delay, policy.maxDelay, policy.minUptime,
                                           policy.maxRestarts);
    if (decision.giveUp) {
      if (cluster.listenerCount('giveup') > 0) {
        cluster.emit('giveup', { ...info, restarts: decision.quickFailures - 1 });
      } else {
        process.emitWarning(`cluster-rs: worker ${info.id} failed ${decision.quickFailures} times in a row ` +
                            'within minUptime; its slot is not restarted any more', 'ClusterRsWarning');
      }
      return;
    }
    pending.set(slot, { launch, id: info.id });
    holdAlive();
  }

  function onDue(slot) {
    const entry = pending.get(slot);
    if (entry === undefined) return;
    pending.delete(slot);
    holdAlive();
    if (!mayRestart()) return;
    // A failed start is a quick failure: tried again, given up in the end.
    const failedStart = (id, err) => {
      process.emitWarning(`cluster-rs: restarting worker ${entry.id} failed: ${err.message}`, 'ClusterRsWarning');
      // (An uptime of -1: never started, a quick failure whatever minUptime is.)
      if (mayRestart()) restartLater(slot, entry.launch, -1, { id, code: null, signal: null });
    };
    try {
      fork(entry.launch, slot, (worker, err) => failedStart(worker.id, err));
    } catch (err) {
      failedStart(entry.id, err); // no process at all (e.g. EMFILE making its channel)
    }
  }

  // A worker forked by the supervisor. A process that never started emits
  // 'error' (before 'fork', so before the app could listen) and no 'exit':
  // `onFailedStart` hears of it. Any other 'error' that only the
  // supervisor listens to is thrown, as an unhandled 'error' is.
  function fork(launch, slot, onFailedStart) {
    const worker = primary.forkWorker(launch, slot);
    worker.on('error', ownListener(function onError(err) {
      if (this.process.pid === undefined) {
        if (onFailedStart) onFailedStart(this, err);
      } else if (!this.listeners('error').some((fn) => !fn[kOwnListener])) {
        throw err;
      }
    }));
    return worker;
  }

  function ownListener(fn) {
    fn[kOwnListener] = true;
    return fn;
  }

  function cancelRestarts() {
    for (const slot of pending.keys()) native.supervisorCancel(slot);
    pending.clear();
    holdAlive();
  }

  // `worker` was disconnected and drains: shutdown() waits for it (and
  // kills it on its timeout) though it is no longer listed.
  function draining(worker) {
    if (worker.isDead() || retiring.has(worker)) return;
    retiring.add(worker);
    worker.process.once('exit', () => retiring.delete(worker));
  }

  function exited(worker) {
    return new Promise((resolve) => {
      if (worker.isDead()) resolve();
      else worker.process.once('exit', () => resolve());
    });
  }

  // Disconnects `workers` gracefully; SIGKILLs what is left after `timeout`.
  async function retire(workers, timeout) {
    const gone = Promise.all(workers.map(exited));
    for (const worker of workers) {
      if (worker.isDead()) continue;
      draining(worker);
      // (One the app already disconnected is on its way.)
      if (worker.isConnected() && !worker.exitedAfterDisconnect) worker.disconnect();
    }
    const killer = setTimeout(() => {
      for (const worker of workers) if (!worker.isDead()) worker.process.kill('SIGKILL');
    }, timeout);
    try {
      await gone;
    } finally {
      clearTimeout(killer);
    }
  }

  function shutdownTimeout(options) {
    if (options !== undefined) validateObject(options, 'options');
    const timeout = options && options.timeout !== undefined ? options.timeout :
      cluster.settings.shutdownTimeout ?? DEFAULT_SHUTDOWN_TIMEOUT;
    validateNumber(timeout, 'options.timeout', 0, TIMEOUT_MAX);
    return timeout;
  }

  function shutdown(options) {
    const timeout = shutdownTimeout(options);
    if (shutdownPromise) return shutdownPromise;
    cancelRestarts();
    shutdowns++;
    primary.stopAccepting();
    // Workers a reload (or the app) already disconnected are no longer
    // listed, but are still draining: they are waited for, and killed, too.
    const workers = [...new Set([...Object.values(cluster.workers), ...retiring])].filter((w) => !w.isDead());
    shutdownPromise = retire(workers, timeout).finally(() => { shutdownPromise = null; });
    return shutdownPromise;
  }

  // Resolves when `fresh` serves what `old` served (see `servesInPlaceOf`;
  // or, with waitReady, has sent 'ready'); rejects if it dies or takes too
  // long.
  function whenReady(fresh, old) {
    const serves = servesInPlaceOf(old, fresh);
    const waitReady = cluster.settings.waitReady === true;
    const timeout = cluster.settings.readyTimeout ?? DEFAULT_READY_TIMEOUT;
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        fresh.removeListener('listening', check);
        fresh.removeListener('online', check);
        fresh.removeListener('message', onMessage);
        fresh.removeListener('exit', onExit);
        fresh.removeListener('error', onError);
      };
      const check = () => {
        if (!waitReady && serves() && fresh.state !== 'none') {
          cleanup();
          resolve();
        }
      };
      const onMessage = (message) => {
        if (waitReady && message === 'ready') {
          cleanup();
          resolve();
        }
      };
      const onExit = (code, signal) => {
        cleanup();
        reject(Object.assign(new Error(`cluster-rs: replacement worker ${fresh.id} exited ` +
                                       `(${signal || `code ${code}`}) before it was ready`),
                             { code: 'ERR_CLUSTER_RS_RELOAD_FAILED', workerId: fresh.id, exitCode: code, signal }));
      };
      const onError = ownListener((err) => {
        if (fresh.process.pid !== undefined) return; // it started; an IPC error is not a failed start
        cleanup();
        reject(Object.assign(new Error(`cluster-rs: replacement worker ${fresh.id} could not start: ${err.message}`),
                             { code: 'ERR_CLUSTER_RS_RELOAD_FAILED', workerId: fresh.id, cause: err }));
      });
      const timer = setTimeout(() => {
        cleanup();
        reject(Object.assign(new Error(`cluster-rs: replacement worker ${fresh.id} was not ready ` +
                                       `within ${timeout} ms`), { code: 'ERR_CLUSTER_RS_RELOAD_TIMEOUT' }));
      }, timeout);
      fresh.on('listening', check);
      fresh.on('online', check);
      fresh.on('message', onMessage);
      fresh.once('exit', onExit);
      fresh.on('error', onError);
    });
  }

  // A test of whether `fresh` serves in place of `old`: every server `old`
  // serves. Except, when other workers run, one that none of them has may be
  // a server of each worker's own, on a port that comes from its id (metrics
  // on 9100 + id, say), which `fresh` cannot have: such servers count as
  // served by as many servers of `fresh`'s that `old` did not have. (With
  // no other workers nothing tells them apart from the app's own ports.)
  function servesInPlaceOf(old, fresh) {
    const others = new Set();
    let otherWorkers = 0;
    for (const w of Object.values(cluster.workers)) {
      if (w === old || w === fresh || w.isDead()) continue;
      otherWorkers++;
      primary.keysOf(w).forEach((k) => others.add(k));
    }
    const keys = primary.keysOf(old);
    return () => {
      const current = new Set(primary.keysOf(fresh));
      const missing = keys.filter((k) => !current.has(k));
      if (missing.length === 0) return true;
      if (otherWorkers === 0 || missing.some((k) => others.has(k))) return false;
      const added = [...current].filter((k) => !keys.includes(k));
      return added.length >= missing.length;
    };
  }

  async function replace(old) {
    // If `old` dies meanwhile, its replacement is already on the way.
    old[kReplacing] = true;
    let fresh;
    try {
      fresh = fork(old[primary.kLaunch], old[primary.kSlot]);
      fresh[kCandidate] = true;
      await whenReady(fresh, old);
    } catch (err) {
      // Gracefully, like any retirement: it may already hold connections.
      if (fresh && !fresh.isDead()) await retire([fresh], shutdownTimeout());
      old[kReplacing] = false;
      // The old worker died and its replacement failed: restart the slot.
      if (old.isDead() && mayRestart() && !old.exitedAfterDisconnect) {
        restartLater(old[primary.kSlot], old[primary.kLaunch], Date.now() - old[primary.kStarted],
                     { id: old.id, code: old.process.exitCode, signal: old.process.signalCode });
      }
      throw err;
    }
    fresh[kCandidate] = false;
    await retire([old], shutdownTimeout());
  }

  // A reload asked for while one is under way may be for code deployed
  // since: the workers already replaced run the older code. One more reload
  // follows the current one, for however many such calls.
  function reload() {
    if (reloadPromise === null) return reloadNow(shutdowns);
    if (reloadAfter === null) {
      const shutdownsBefore = shutdowns;
      reloadAfter = reloadPromise.catch(() => {}).then(() => {
        reloadAfter = null;
        return reloadPromise ?? reloadNow(shutdownsBefore);
      });
    }
    return reloadAfter;
  }

  function reloadNow(shutdownsBefore) {
    const aborted = () => Object.assign(new Error('cluster-rs: reload stopped by shutdown()'),
                                        { code: 'ERR_CLUSTER_RS_RELOAD_ABORTED' });
    reloadPromise = (async () => {
      if (shutdowns !== shutdownsBefore) throw aborted();
      for (const old of Object.values(cluster.workers)) {
        if (old.isDead() || !old.isConnected() || old.exitedAfterDisconnect) continue;
        try {
          await replace(old);
        } catch (err) {
          // A shutdown() meanwhile also ends the replacement it waited for.
          if (shutdowns !== shutdownsBefore) throw Object.assign(aborted(), { cause: err });
          throw err;
        }
        if (shutdowns !== shutdownsBefore) throw aborted();
      }
    })().finally(() => { reloadPromise = null; });
    return reloadPromise;
  }

  // cluster.disconnect(): no restarts, scheduled or new, until the workers
  // it disconnects have exited. (Its callback comes sooner: as under
  // node:cluster, once they are no longer listed.)
  function suspend(workers) {
    suspensions++;
    cancelRestarts();
    Promise.all(workers.map(exited)).then(() => { suspensions--; });
  }

  return { configure, onExit, draining, shutdown, reload, suspend };
}

module.exports = { createSupervisor, validateSettings };
