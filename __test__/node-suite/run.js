#!/usr/bin/env node
'use strict';
// Runs the cluster-related tests of Node's own test tree (test/parallel and
// test/sequential of a Node v20 source checkout) against cluster-rs, or
// against the built-in `cluster` module with --builtin (baseline).
//
// Usage:
//   NODE_SUITE_DIR=/path/to/node-src node __test__/node-suite/run.js [options]
//
// Options:
//   --builtin          do not redirect require('cluster'); baseline run
//   --filter <s>       only tests whose file name contains <s> (repeatable)
//   --list-from <f>    only tests named in <f>: one base name per line
//                      (".js" optional, text after whitespace and lines
//                      starting with "#" ignored)
//   --json <f>         write per-test results as JSON to <f>
//   --user <name>      run the tests as that (non-root) user; needs root
//   -j, --jobs <n>     concurrency for test/parallel (default 2)
//   --timeout <s>      per-test time limit in seconds (default 60)
//   --list             print the selected tests and exit
//
// Environment:
//   NODE_SUITE_DIR     node source root, the directory holding test/ (required)
//   CLUSTER_RS_MODULE  module that replaces cluster (default: repo root)
//   NODE_SUITE_TIMEOUT per-test limit in seconds (default 60)
//   NODE_SUITE_JOBS    concurrency (default 2)
//   NODE_SUITE_LOG     directory for failure logs (default /tmp/node-suite-logs)
//   NODE_TEST_DIR      where test/common/tmpdir puts its .tmp.N dirs; if
//                      unset the runner makes one under the OS temp dir
//                      (owned by --user if given)

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn } = require('child_process');

const REDIRECT = path.join(__dirname, 'redirect.js');
const TAIL_LINES = 30;
const MAX_CAPTURE = 4 * 1024 * 1024;

function usage(msg) {
  if (msg) console.error(`run.js: ${msg}`);
  console.error('usage: NODE_SUITE_DIR=<node src> node run.js [--builtin] ' +
    '[--filter s] [--list-from file] [--json file] [--user name] ' +
    '[-j n] [--timeout s] [--list]');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {
    builtin: false,
    filters: [],
    listFrom: null,
    json: null,
    user: null,
    jobs: +(process.env.NODE_SUITE_JOBS || 2),
    timeout: +(process.env.NODE_SUITE_TIMEOUT || 60),
    listOnly: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '--builtin': opts.builtin = true; break;
      case '--filter': opts.filters.push(value()); break;
      case '--list-from': opts.listFrom = value(); break;
      case '--json': opts.json = value(); break;
      case '--user': opts.user = value(); break;
      case '-j': case '--jobs': opts.jobs = +value(); break;
      case '--timeout': opts.timeout = +value(); break;
      case '--list': opts.listOnly = true; break;
      case '-h': case '--help': usage(); break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!(opts.jobs >= 1)) usage('jobs must be >= 1');
  if (!(opts.timeout > 0)) usage('timeout must be > 0');
  return opts;
}

// ---- test selection -------------------------------------------------------

const LOADS_CLUSTER = /require\(\s*(['"])(node:)?cluster\1\s*\)/;

function selectTests(root, opts) {
  const tests = [];
  for (const suite of ['parallel', 'sequential']) {
    const dir = path.join(root, 'test', suite);
    for (const name of fs.readdirSync(dir).sort()) {
      if (!/^test-.*\.js$/.test(name)) continue;
      const file = path.join(dir, name);
      const source = fs.readFileSync(file, 'utf8');
      if (!name.startsWith('test-cluster-') && !LOADS_CLUSTER.test(source)) continue;
      tests.push({ suite, name, file, flags: flagsOf(source) });
    }
  }

  let wanted = null;
  if (opts.listFrom) {
    wanted = new Set();
    for (const raw of fs.readFileSync(opts.listFrom, 'utf8').split('\n')) {
      const line = raw.trim();
      if (!line || line.startsWith('#')) continue;
      let n = path.basename(line.split(/\s+/)[0]);
      if (!n.endsWith('.js')) n += '.js';
      wanted.add(n);
    }
  }
  return tests.filter((t) =>
    (!wanted || wanted.has(t.name)) &&
    (opts.filters.length === 0 || opts.filters.some((f) => t.name.includes(f))));
}

// The first `// Flags:` comment of the file, split on whitespace.
function flagsOf(source) {
  const m = /\/\/\s+Flags:(.*)/.exec(source);
  return m ? m[1].trim().split(/\s+/).filter(Boolean) : [];
}

// ---- users ----------------------------------------------------------------

function lookupUser(name) {
  for (const line of fs.readFileSync('/etc/passwd', 'utf8').split('\n')) {
    const f = line.split(':');
    if (f[0] === name) {
      return { name, uid: +f[2], gid: +f[3], home: f[5] || '/' };
    }
  }
  throw new Error(`no such user: ${name}`);
}

function ensureTestDir(user) {
  if (process.env.NODE_TEST_DIR) return process.env.NODE_TEST_DIR;
  const uid = user ? user.uid : process.getuid();
  const dir = path.join(os.tmpdir(), `node-suite-testdir-${uid}`);
  fs.mkdirSync(dir, { recursive: true });
  if (user) fs.chownSync(dir, user.uid, user.gid);
  return dir;
}

// ---- running one test -----------------------------------------------------

function tailLines(text, n) {
  const lines = text.replace(/\s+$/, '').split('\n');
  return lines.slice(-n).join('\n');
}

function firstReason(stdout, stderr, status) {
  if (status === 'TIMEOUT') return 'timed out';
  const lines = (stderr + '\n' + stdout).split('\n').map((l) => l.trim());
  const hit = lines.find((l) =>
    /^(\w*Error|AssertionError|Error \[|Mismatched|TypeError|RangeError)/.test(l) ||
    /^(node:)?internal\/.*Error/.test(l));
  return hit || lines.find(Boolean) || '';
}

function killGroup(pid, signal) {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false;
  }
}

function runTest(test, ctx, slot) {
  return new Promise((resolve) => {
    const args = [];
    if (!ctx.opts.builtin) args.push('--require', REDIRECT);
    args.push(...test.flags, test.file);

    const env = { ...process.env };
    env.TEST_THREAD_ID = String(slot);
    env.TEST_PARALLEL = test.suite === 'parallel' ? '1' : '0';
    env.NODE_TEST_DIR = ctx.testDir;
    if (!ctx.opts.builtin) {
      const pre = `--require "${REDIRECT}"`;
      env.NODE_OPTIONS = env.NODE_OPTIONS ? `${pre} ${env.NODE_OPTIONS}` : pre;
      if (process.env.CLUSTER_RS_MODULE) {
        env.CLUSTER_RS_MODULE = path.resolve(process.env.CLUSTER_RS_MODULE);
      }
    } else {
      delete env.CLUSTER_RS_MODULE;
    }
    const spawnOpts = {
      cwd: ctx.root,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true, // own process group, so it can be killed as a whole
    };
    if (ctx.user) {
      spawnOpts.uid = ctx.user.uid;
      spawnOpts.gid = ctx.user.gid;
      env.HOME = ctx.user.home;
      env.USER = env.LOGNAME = ctx.user.name;
    }

    const started = process.hrtime.bigint();
    const child = spawn(process.execPath, args, spawnOpts);
    const out = { stdout: '', stderr: '' };
    for (const k of ['stdout', 'stderr']) {
      child[k].setEncoding('utf8');
      child[k].on('data', (d) => {
        out[k] += d;
        if (out[k].length > MAX_CAPTURE) out[k] = out[k].slice(-MAX_CAPTURE / 2);
      });
    }

    let timedOut = false;
    let finished = false;
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(child.pid, 'SIGKILL');
    }, ctx.opts.timeout * 1000);

    function finish(code, signal, spawnError) {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      // Leftovers (workers that outlived the test) go too.
      killGroup(child.pid, 'SIGKILL');
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      let status;
      if (timedOut) status = 'TIMEOUT';
      else if (spawnError) status = 'FAIL';
      else if (code === 0 && /^1\.\.0 # Skipped/m.test(out.stdout)) status = 'SKIP';
      else if (code === 0) status = 'ok';
      else status = 'FAIL';
      if (spawnError) out.stderr += `\n[runner] spawn error: ${spawnError.message}\n`;
      const result = {
        name: test.name,
        suite: test.suite,
        status,
        seconds: +seconds.toFixed(2),
        code,
        signal,
        flags: test.flags,
      };
      if (status === 'SKIP') {
        const m = /^1\.\.0 # Skipped:?\s*(.*)$/m.exec(out.stdout);
        result.reason = m ? m[1] : '';
      } else if (status !== 'ok') {
        result.reason = firstReason(out.stdout, out.stderr, status);
        result.log = writeLog(ctx, test, args, result, out);
      }
      resolve(result);
    }

    child.on('error', (err) => finish(null, null, err));
    // 'exit' rather than 'close': a stray descendant may hold the pipes open.
    child.on('exit', (code, signal) => {
      // Give the pipes a moment to drain, then stop waiting on them.
      let drained = 0;
      const done = () => {
        if (++drained === 2) finish(code, signal);
      };
      for (const k of ['stdout', 'stderr']) {
        if (child[k].readableEnded || child[k].destroyed) done();
        else child[k].once('end', done);
      }
      setTimeout(() => {
        child.stdout.destroy();
        child.stderr.destroy();
        finish(code, signal);
      }, 2000).unref();
    });
  });
}

function writeLog(ctx, test, args, result, out) {
  const file = path.join(ctx.logDir, `${test.suite}-${test.name}.log`);
  const text = [
    `test: ${test.suite}/${test.name}`,
    `cmd: ${process.execPath} ${args.join(' ')}`,
    `cwd: ${ctx.root}`,
    `mode: ${ctx.opts.builtin ? 'builtin' : 'redirect'}` +
      (ctx.user ? ` user=${ctx.user.name}` : ''),
    `status: ${result.status} code=${result.code} signal=${result.signal} ` +
      `seconds=${result.seconds}`,
    `--- stdout (last ${TAIL_LINES} lines) ---`,
    tailLines(out.stdout, TAIL_LINES),
    `--- stderr (last ${TAIL_LINES} lines) ---`,
    tailLines(out.stderr, TAIL_LINES),
    '',
  ].join('\n');
  try {
    fs.writeFileSync(file, text);
  } catch (e) {
    console.error(`run.js: cannot write log ${file}: ${e.message}`);
  }
  return file;
}

// ---- scheduling -----------------------------------------------------------

async function runPool(tests, jobs, ctx, onResult) {
  let next = 0;
  async function worker(slot) {
    while (next < tests.length) {
      const t = tests[next++];
      onResult(await runTest(t, ctx, slot));
    }
  }
  const workers = [];
  for (let s = 0; s < Math.min(jobs, tests.length); s++) workers.push(worker(s));
  await Promise.all(workers);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const root = process.env.NODE_SUITE_DIR;
  if (!root) usage('NODE_SUITE_DIR is not set');
  const rootAbs = path.resolve(root);
  if (!fs.existsSync(path.join(rootAbs, 'test', 'common', 'index.js'))) {
    usage(`${rootAbs} does not look like a node source root (no test/common)`);
  }

  const tests = selectTests(rootAbs, opts);
  if (opts.listOnly) {
    for (const t of tests) {
      console.log(`${t.suite}/${t.name}${t.flags.length ? '  ' + t.flags.join(' ') : ''}`);
    }
    console.log(`${tests.length} tests`);
    return;
  }

  const user = opts.user ? lookupUser(opts.user) : null;
  if (user && process.getuid() !== 0) usage('--user needs the runner to be root');
  const logDir = path.resolve(process.env.NODE_SUITE_LOG || '/tmp/node-suite-logs');
  fs.mkdirSync(logDir, { recursive: true });
  const ctx = { opts, root: rootAbs, user, logDir, testDir: ensureTestDir(user) };

  const results = [];
  const report = (r) => {
    results.push(r);
    const label = r.status === 'SKIP' ? 'skip' : r.status;
    const extra = r.status === 'SKIP' ? `  # ${r.reason}` : '';
    console.log(`${label.padEnd(7)} ${r.suite}/${r.name} ${r.seconds.toFixed(1)}s${extra}`);
  };

  // test/parallel may share the machine; test/sequential runs one at a time,
  // as in Node's own runner (these use fixed ports such as common.PORT).
  await runPool(tests.filter((t) => t.suite === 'parallel'), opts.jobs, ctx, report);
  await runPool(tests.filter((t) => t.suite === 'sequential'), 1, ctx, report);

  const passed = results.filter((r) => r.status === 'ok').length;
  const skipped = results.filter((r) => r.status === 'SKIP').length;
  const failed = results.length - passed - skipped;

  if (opts.json) {
    fs.writeFileSync(opts.json, JSON.stringify({
      mode: opts.builtin ? 'builtin' : 'redirect',
      module: opts.builtin ? null :
        path.resolve(process.env.CLUSTER_RS_MODULE || path.resolve(__dirname, '..', '..')),
      user: user ? user.name : os.userInfo().username,
      node: process.version,
      root: rootAbs,
      passed, failed, skipped,
      results,
    }, null, 2) + '\n');
  }

  if (failed) console.log(`failure logs: ${logDir}`);
  console.log(`${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ''));
  process.exitCode = failed ? 1 : 0;
}

main().catch((err) => {
  console.error(err && err.stack || err);
  process.exit(2);
});
