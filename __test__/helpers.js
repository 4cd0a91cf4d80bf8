'use strict';
// Shared helpers for the cluster-rs test suite (not a test file itself).
//
// Every test runs a fixture *primary* script as a detached child process (its
// own process group, so the primary and all of its workers can be killed at
// once), with a time limit. Fixtures report results as JSON lines on stdout;
// `runPrimary` collects them. Nothing here waits on a timer except the
// failure guard.

const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
const FIXTURES = path.join(__dirname, 'fixtures');
const MODULES = { rs: ROOT, node: 'node:cluster' };

const groups = new Set(); // pids of live detached primaries (= their process group ids)

function killGroup(pid, signal = 'SIGKILL') {
  try {
    process.kill(-pid, signal);
  } catch {
    // ESRCH: the group is gone already.
  }
}

function killAll() {
  for (const pid of groups) killGroup(pid);
  groups.clear();
}

process.on('exit', killAll);

// The environment fixtures start from: ours, without settings that would
// change how a cluster behaves.
function baseEnv() {
  const env = { ...process.env };
  for (const key of ['NODE_CLUSTER_SCHED_POLICY', 'CLUSTER_RS_WINDOW', 'NODE_OPTIONS', 'NODE_UNIQUE_ID',
                     'NODE_TEST_CONTEXT']) {
    delete env[key];
  }
  for (const key of Object.keys(env)) if (key.startsWith('CLUSTER_RS_')) delete env[key];
  return env;
}

function fixture(name) {
  return path.join(FIXTURES, name);
}

// Runs `node [nodeArgs] <fixture> ...args` as a primary. Resolves with
// { code, signal, messages, lines, stdout, stderr, pid, strays, describe }
// once it has exited and its pipes closed (workers inherit them); `strays` are
// processes of its group still alive then, `describe()` its output for an
// assertion message. On timeout the whole process group is killed and the
// promise rejects with what the fixture had printed so far.
//
// options:
//   module     'rs' (default) or 'node': sets CLUSTER_MODULE for the fixture
//   env        extra environment variables
//   timeout    ms before the group is killed (default 20000)
//   stdio      extra stdio entries after [ignore, pipe, pipe] (fd 3, 4, ...)
//   cwd        working directory
//   nodeArgs   node options before the fixture's path
//   onMessage  (message, child) => void, for each JSON line as it arrives;
//              if it throws, the group is killed and the run rejects
//   failOnFatal  true: a fixture's { ev: 'fatal' } line kills the group and
//              rejects at once
//   onSpawn    (child) => void, right after spawning
//   keepGroup  true: leave the process group alone when the primary exits
//              (by default whatever is left of it is killed then)
//   shell      a shell command run first, e.g. 'ulimit -n 256'; node is then
//              exec'ed by that shell (same pid, same process group)
function runPrimary(name, args = [], options = {}) {
  const {
    module = 'rs', env = {}, timeout = 20000, stdio = [], cwd, onMessage, onSpawn, shell, keepGroup = false,
    nodeArgs = [], failOnFatal = false,
  } = options;
  const file = path.isAbsolute(name) ? name : fixture(name);
  const command = shell ?
    ['/bin/sh', ['-c', `${shell} && exec "$0" "$@"`, process.execPath, ...nodeArgs, file, ...args]] :
    [process.execPath, [...nodeArgs, file, ...args]];
  return new Promise((resolve, reject) => {
    const child = spawn(...command, {
      cwd: cwd || FIXTURES,
      env: { ...baseEnv(), ...env, CLUSTER_MODULE: MODULES[module] || module },
      stdio: ['ignore', 'pipe', 'pipe', ...stdio],
      detached: true,
    });
    groups.add(child.pid);
    const messages = [];
    const lines = [];
    let stdout = '';
    let stderr = '';
    let pending = '';
    let settled = false;
    const label = `${path.basename(file)} ${args.join(' ')}`;
    const describe = () => `--- stdout ---\n${stdout}\n--- stderr ---\n${stderr}`;

    const timer = setTimeout(() => {
      killGroup(child.pid);
      finish(new Error(`${label} timed out after ${timeout} ms\n${describe()}`));
    }, timeout);

    function finish(err, value) {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve(value);
    }

    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      pending += chunk;
      let nl;
      while ((nl = pending.indexOf('\n')) !== -1) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        lines.push(line);
        if (!line.startsWith('{')) continue;
        let message;
        try {
          message = JSON.parse(line);
        } catch {
          continue;
        }
        messages.push(message);
        if (failOnFatal && message.ev === 'fatal') {
          killGroup(child.pid);
          finish(new Error(`${label} failed: ${message.message}\n${describe()}`));
        }
        if (onMessage && !settled) {
          try {
            onMessage(message, child);
          } catch (err) {
            killGroup(child.pid);
            err.message += `\n${describe()}`;
            finish(err);
          }
        }
      }
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    child.on('error', (err) => finish(err));
    child.on('close', (code, signal) => {
      const strays = groupMembers(child.pid);
      // Workers left behind by a primary that died are killed with their group
      // (at the latest when this test file ends, with keepGroup).
      if (!keepGroup) {
        groups.delete(child.pid);
        killGroup(child.pid);
      }
      finish(null, { code, signal, messages, lines, stdout, stderr, pid: child.pid, strays, describe });
    });
    if (onSpawn) onSpawn(child);
  });
}

// Runs the fixture and asserts that it exited 0; returns the result.
async function runOk(name, args, options) {
  const result = await runPrimary(name, args, options);
  if (result.code !== 0) {
    throw new Error(`${name} ${args ? args.join(' ') : ''} exited with ${result.code ?? result.signal}\n` +
                    `--- stdout ---\n${result.stdout}\n--- stderr ---\n${result.stderr}`);
  }
  return result;
}

// The messages with a given `ev` (or matching a predicate).
function pick(result, what) {
  const test = typeof what === 'function' ? what : (m) => m.ev === what;
  return result.messages.filter(test);
}

function one(result, what) {
  const all = pick(result, what);
  if (all.length !== 1) {
    throw new Error(`expected one message ${String(what)}, got ${all.length}\n${result.stdout}\n${result.stderr}`);
  }
  return all[0];
}

// /proc/<pid>/stat fields after the command name: state, ppid, process group.
function procStat(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const [state, ppid, pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { state, ppid: Number(ppid), pgrp: Number(pgrp) };
  } catch {
    return null;
  }
}

// True while a process exists and is not a zombie (nobody may reap the
// orphans of a killed primary in a container, so a zombie counts as gone).
function alive(pid) {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if (err.code === 'ESRCH') return false;
    throw err;
  }
  const stat = procStat(pid);
  return stat !== null && stat.state !== 'Z' && stat.state !== 'X';
}

// Live (non-zombie) members of a process group.
function groupMembers(pgid) {
  const members = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = procStat(entry);
    if (stat && stat.pgrp === pgid && stat.state !== 'Z' && stat.state !== 'X') members.push(Number(entry));
  }
  return members;
}

// Polls until none of `pids` is alive; rejects after `limit` ms with the survivors.
function waitGone(pids, limit = 5000) {
  const deadline = Date.now() + limit;
  return new Promise((resolve, reject) => {
    (function check() {
      const left = pids.filter(alive);
      if (left.length === 0) return resolve();
      if (Date.now() > deadline) return reject(new Error(`still alive after ${limit} ms: ${left.join(', ')}`));
      setTimeout(check, 20);
    })();
  });
}

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

function tmpdir(prefix = 'cluster-rs-test-') {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

function hasIPv6Loopback() {
  const net = require('node:net');
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(0, '::1', () => server.close(() => resolve(true)));
  });
}

// A self-signed key and certificate made with the openssl CLI, or null.
function makeCert(dir) {
  if (!which('openssl')) return null;
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  const r = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert,
                                  '-days', '1', '-subj', '/CN=localhost'], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  return { key, cert };
}

// For tests of the dispatcher (the primary accepts and hands connections on),
// which the ledger replaces by default on Linux.
const DISPATCH = Object.freeze({ CLUSTER_RS_BALANCE: 'dispatch' });
// Whether round-robin uses the ledger unless DISPATCH is set: workers accept
// themselves, so the primary hands them nothing.
const LEDGER = process.platform === 'linux';

module.exports = {
  DISPATCH, LEDGER,
  ROOT, FIXTURES, fixture, runPrimary, runOk, pick, one, alive, waitGone, groupMembers, procStat, which, tmpdir,
  hasIPv6Loopback, makeCert, killAll, killGroup,
};
