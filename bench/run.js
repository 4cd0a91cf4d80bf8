#!/usr/bin/env node
'use strict';
// cluster-rs benchmark harness: node:cluster vs cluster-rs vs a single process.
//
// Usage (from the repo root; also `npm run bench -- <flags>`):
//
//   node bench/run.js                      full run: 3 rounds x 5 s, every
//                                          scenario, workers 2 and
//                                          os.availableParallelism()
//   node bench/run.js --quick              under 1 min: 1 round x 2 s (no
//                                          warm-up), close + keepalive, one
//                                          startup sample per impl, 2 workers
//   node bench/run.js --impl node-rr,single --rounds 5 --duration 10
//
// Flags (each overrides the --quick / full default):
//   --impl a,b,...      node-rr, node-none, rs-rr, rs-dispatch, rs-none, rs-reuseport, single (default all;
//                       rs-* are skipped with a message if cluster-rs cannot be
//                       loaded, i.e. the addon is not built yet)
//   --base IMPL         the impl the ratios are taken against (default node-rr
//                       if it runs, else the first); "paired" is the median of
//                       the ratios within each round
//   --rounds N          interleaved rounds; every impl runs once per round and
//                       the order rotates between rounds; medians are reported
//   --duration S        wrk duration per measurement, whole seconds
//   --warmup S          wrk warm-up before each measurement (default 1; --quick 0 = none)
//   --scenarios a,b     close (Connection: close, one TCP connection per
//                       request), keepalive, cpu (~1 ms CPU per request,
//                       keep-alive), pool (which workers a pool of
//                       --connections keep-alive connections lands on when it
//                       opens after, and during, --duration s of close load),
//                       startup (fork → all listening and SIGKILL → replacement
//                       listening, --startup-samples fresh servers per impl and
//                       round, the impls alternating sample by sample)
//   --workers 2,4       worker counts ("auto" = 2 and os.availableParallelism())
//   --connections N     wrk -c (default 50)       --threads N  wrk -t (default 1)
//   --cpu-ms MS         CPU burned per request in the cpu scenario (default 1)
//   --startup-samples N samples per impl and round in the startup scenario (default 8; --quick 1)
//   --out DIR           output directory (default bench/results)
//
// Environment: BENCH_RS_PATH=<dir> benchmarks another build of cluster-rs
// (default: this checkout), e.g. to compare two commits. The servers load it
// by package name, as an installed app does: bench/node_modules/cluster-rs
// is made a link to that build.
//
// Needs wrk (Debian/Ubuntu: apt-get install -y wrk). Writes
// bench/results/latest.{json,md,svg}. Each measurement starts bench/server.js
// as a fresh process group on a fresh port and SIGKILLs the whole group after.

const { spawn, spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
// The cluster-rs build under test: this checkout, or another one (to compare builds).
const RS_PATH = process.env.BENCH_RS_PATH ? path.resolve(process.env.BENCH_RS_PATH) : ROOT;
const SERVER = path.join(__dirname, 'server.js');
const ALL_IMPLS = ['node-rr', 'node-none', 'rs-rr', 'rs-dispatch', 'rs-none', 'rs-reuseport', 'single'];
const ALL_SCENARIOS = ['close', 'keepalive', 'cpu', 'pool', 'startup'];
// Scenarios whose figures are requests/s.
const isLoad = (scenario) => scenario !== 'pool' && scenario !== 'startup';
const IMPL_DEF = {
  'node-rr': { impl: 'node', policy: 'rr' },
  'node-none': { impl: 'node', policy: 'none' },
  'rs-rr': { impl: 'rs', policy: 'rr' },
  'rs-dispatch': { impl: 'rs', policy: 'rr', env: { CLUSTER_RS_BALANCE: 'dispatch' } },
  'rs-none': { impl: 'rs', policy: 'none' },
  'rs-reuseport': { impl: 'rs', policy: 'reuseport' },
  single: { impl: 'single', policy: null },
};
const WRK_SCRIPT = path.join(__dirname, 'wrk.lua');
const HOST = '127.0.0.1';
const START_TIMEOUT_MS = 20000;
const CMD_TIMEOUT_MS = 15000;

// ------------------------------------------------------------------ helpers
function die(msg, code = 1) {
  process.stderr.write(`\nbench: ERROR: ${msg}\n`);
  cleanupAll();
  process.exit(code);
}

function median(xs) {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

function cv(xs) {
  if (!xs.length) return null;
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
  if (mean === 0) return null;
  const variance = xs.reduce((a, b) => a + (b - mean) ** 2, 0) / xs.length;
  return Math.sqrt(variance) / mean;
}

const fmt = {
  int: (x) => (x == null ? '—' : Math.round(x).toLocaleString('en-US')),
  ms: (us) => (us == null ? '—' : (us / 1000).toFixed(us < 10000 ? 2 : us < 100000 ? 1 : 0) + ' ms'),
  msv: (ms) => (ms == null ? '—' : ms.toFixed(ms < 100 ? 1 : 0) + ' ms'),
  msDiff: (ms) => (ms == null ? '—' : (ms < 0 ? '−' : '+') + Math.abs(ms).toFixed(1) + ' ms'),
  ratio: (r) => (r == null ? '—' : r.toFixed(2) + '×'),
  f: (x, d = 2) => (x == null ? '—' : x.toFixed(d)),
  mb: (kb) => (kb == null ? '—' : (kb / 1024).toFixed(1) + ' MiB'),
};

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// ------------------------------------------------------------------ args
function parseArgs(argv) {
  const o = {};
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    if (a.startsWith('--') && a.includes('=')) { [a, v] = [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]; }
    const take = () => {
      if (v !== undefined) return v;
      if (i + 1 >= argv.length) die(`missing value for ${a}`, 2);
      return argv[++i];
    };
    switch (a) {
      case '--quick': o.quick = true; break;
      case '--impl': case '--impls': o.impls = take().split(',').map((s) => s.trim()).filter(Boolean); break;
      case '--base': o.base = take().trim(); break;
      case '--rounds': o.rounds = posInt(take(), a); break;
      case '--duration': case '-d': o.duration = posInt(String(take()).replace(/s$/, ''), a); break;
      case '--warmup': o.warmup = nonNegInt(String(take()).replace(/s$/, ''), a); break;
      case '--scenarios': case '--scenario': o.scenarios = take().split(',').map((s) => s.trim()).filter(Boolean); break;
      case '--workers': o.workers = take(); break;
      case '--connections': case '-c': o.connections = posInt(take(), a); break;
      case '--threads': case '-t': o.threads = posInt(take(), a); break;
      case '--startup-samples': o.startupSamples = posInt(take(), a); break;
      case '--cpu-ms': o.cpuMs = Number(take()); if (!(o.cpuMs > 0)) die('--cpu-ms must be > 0', 2); break;
      case '--out': o.out = path.resolve(take()); break;
      case '-h': case '--help': {
        const src = fs.readFileSync(__filename, 'utf8').split('\n');
        const end = src.findIndex((l, k) => k > 2 && !l.startsWith('//'));
        process.stdout.write(src.slice(2, end).map((l) => l.replace(/^\/\/ ?/, '')).join('\n') + '\n');
        process.exit(0);
      }
      // fallthrough impossible
      default: die(`unknown argument ${a} (see --help)`, 2);
    }
  }
  return o;
}
function posInt(s, name) { const n = Number(s); if (!Number.isInteger(n) || n < 1) die(`${name} must be a positive integer, got ${s}`, 2); return n; }
function nonNegInt(s, name) { const n = Number(s); if (!Number.isInteger(n) || n < 0) die(`${name} must be a non-negative integer, got ${s}`, 2); return n; }

// ------------------------------------------------------------------ process tracking / cleanup
const liveGroups = new Set(); // pids of detached server primaries (= pgid)
const liveWrk = new Set();

function groupAlive(pgid) {
  try { process.kill(-pgid, 0); return true; } catch (e) { return e.code === 'EPERM'; }
}
// Members of a process group that are not zombies (zombies cannot be killed;
// they only wait for their new parent to reap them).
function groupMembers(pgid) {
  const out = [];
  let ents = [];
  try { ents = fs.readdirSync('/proc'); } catch { return out; }
  for (const e of ents) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const st = fs.readFileSync(`/proc/${e}/stat`, 'utf8');
      const rest = st.slice(st.lastIndexOf(')') + 2).split(' ');
      if (Number(rest[2]) === pgid && rest[0] !== 'Z' && rest[0] !== 'X') out.push(Number(e));
    } catch {}
  }
  return out;
}

function cleanupAll() {
  for (const pg of liveGroups) { try { process.kill(-pg, 'SIGKILL'); } catch {} }
  for (const w of liveWrk) { try { w.kill('SIGKILL'); } catch {} }
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    process.stderr.write(`\nbench: ${sig} received, killing servers and exiting\n`);
    cleanupAll();
    process.exit(130);
  });
}
process.on('exit', cleanupAll);

// ------------------------------------------------------------------ environment checks
function checkWrk() {
  const r = spawnSync('wrk', ['--version'], { encoding: 'utf8' });
  if (r.error && r.error.code === 'ENOENT') {
    process.stderr.write(
      'bench: ERROR: wrk (HTTP load generator) is not installed or not on PATH.\n' +
      '  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y wrk\n' +
      '  macOS:          brew install wrk\n' +
      '  from source:    https://github.com/wg/wrk (make; put ./wrk on PATH)\n');
    process.exit(2);
  }
  if (r.error) die(`cannot run wrk: ${r.error.message}`, 2);
  return ((r.stdout || '') + (r.stderr || '')).split('\n')[0].replace(/\s+Copyright.*$/, '').trim();
}

// Makes bench/node_modules/cluster-rs a link to the build under test, so
// that bench/server.js loads it by name, resolution included, as an app
// that installed it does.
function linkPackage() {
  const dir = path.join(__dirname, 'node_modules');
  const link = path.join(dir, 'cluster-rs');
  try {
    if (fs.realpathSync(link) === fs.realpathSync(RS_PATH)) return;
  } catch {
    // Missing or dangling: made below.
  }
  fs.mkdirSync(dir, { recursive: true });
  fs.rmSync(link, { force: true }); // the link only (never a real directory: that throws)
  fs.symlinkSync(RS_PATH, link, process.platform === 'win32' ? 'junction' : 'dir');
}

function checkClusterRs() {
  const code = `const c = require(${JSON.stringify(RS_PATH)});` +
    `if (typeof c.fork !== 'function') throw new Error('module has no fork()');` +
    `if (c.SCHED_RR === undefined || c.SCHED_NONE === undefined) throw new Error('module lacks SCHED_RR/SCHED_NONE');` +
    `process.exit(0)`;
  const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8', timeout: 15000, cwd: ROOT });
  if (r.status === 0) return { ok: true };
  let reason = r.error ? r.error.message : (r.signal ? `killed by ${r.signal} (timeout?)` : '');
  if (!reason) {
    const lines = (r.stderr || '').split('\n').map((l) => l.trim()).filter(Boolean);
    reason = lines.find((l) => /^[\w.]*(Error|Exception)\b.*:|Cannot find module/.test(l)) || lines[0] || `exit code ${r.status}`;
  }
  return { ok: false, reason };
}

function calibrateCpu(targetMs) {
  const probe = 2000;
  crypto.pbkdf2Sync('hello', 'salt', probe, 32, 'sha256'); // warm up
  let best = Infinity;
  for (let i = 0; i < 7; i++) {
    const t0 = process.hrtime.bigint();
    crypto.pbkdf2Sync('hello', 'salt', probe, 32, 'sha256');
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e6);
  }
  return Math.max(1, Math.round(probe * targetMs / best));
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, HOST, () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

function readProcCpuS(pid) {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK; // utime + stime
  } catch { return null; }
}
// The host's CPU time so far, in clock ticks: all of it, and the part idle
// (idle and iowait; /proc/stat's first line), or null where there is none.
function readHostCpu() {
  try {
    const line = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0];
    // user nice system idle iowait irq softirq steal (guest time is in user's)
    const t = line.trim().split(/\s+/).slice(1, 9).map(Number);
    return { total: t.reduce((a, b) => a + b, 0), idle: t[3] + t[4] };
  } catch { return null; }
}
function readRssKb(pid) {
  try {
    const m = /VmRSS:\s+(\d+)\s*kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch { return null; }
}
const CLK_TCK = (() => {
  const r = spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' });
  return Number(r.stdout) > 0 ? Number(r.stdout) : 100;
})();

// ------------------------------------------------------------------ server under test
class ServerHandle {
  constructor(implName, env) {
    this.implName = implName;
    this.log = [];
    this.pending = new Map();
    this.seq = 0;
    this.exited = null;
    this.child = spawn(process.execPath, [SERVER], {
      env, detached: true, stdio: ['pipe', 'pipe', 'pipe'], cwd: ROOT,
    });
    this.pid = this.child.pid;
    liveGroups.add(this.pid);
    this.readyP = new Promise((res, rej) => { this.readyRes = res; this.readyRej = rej; });
    this.readyP.catch(() => {});
    let buf = '';
    this.child.stdout.setEncoding('utf8');
    this.child.stdout.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 1);
        this.onLine(line);
      }
    });
    this.child.stderr.setEncoding('utf8');
    this.child.stderr.on('data', (d) => this.addLog(d));
    this.child.stdin.on('error', () => {});
    this.exitP = new Promise((res) => this.child.on('exit', (code, sig) => {
      this.exited = { code, sig };
      const err = new Error(`server (${implName}) exited unexpectedly (code ${code}, signal ${sig})`);
      if (!this.killing) {
        this.readyRej(err);
        for (const p of this.pending.values()) p.rej(err);
      }
      res();
    }));
    this.child.on('error', (e) => { this.readyRej(e); });
  }
  addLog(s) {
    for (const l of String(s).split('\n')) if (l.trim()) this.log.push(l);
    if (this.log.length > 60) this.log.splice(0, this.log.length - 60);
  }
  logTail(n = 25) { return this.log.slice(-n).map((l) => '    | ' + l).join('\n') || '    | (no output)'; }
  onLine(line) {
    if (!line.startsWith('@@BENCH ')) { this.addLog(line); return; }
    let msg;
    try { msg = JSON.parse(line.slice(8)); } catch { this.addLog(line); return; }
    if (msg.type === 'ready') { this.readyRes(msg); return; }
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.ok) p.res(msg); else p.rej(new Error(`server command "${p.cmd}" failed: ${msg.error}`));
  }
  ready(timeoutMs) {
    return withTimeout(this.readyP, timeoutMs, `server (${this.implName}) did not report all workers listening within ${timeoutMs / 1000} s`);
  }
  cmd(cmd, timeoutMs = CMD_TIMEOUT_MS) {
    if (this.exited) return Promise.reject(new Error(`server (${this.implName}) already exited`));
    const id = ++this.seq;
    return new Promise((res, rej) => {
      const timer = setTimeout(() => { this.pending.delete(id); rej(new Error(`server (${this.implName}) did not answer "${cmd}" within ${timeoutMs / 1000} s`)); }, timeoutMs);
      this.pending.set(id, { res, rej, timer, cmd });
      this.child.stdin.write(JSON.stringify({ id, cmd }) + '\n');
    });
  }
  async kill() {
    this.killing = true;
    try { process.kill(-this.pid, 'SIGKILL'); } catch {}
    await withTimeout(this.exitP, 5000, 'primary did not exit after SIGKILL').catch(() => {});
    // Wait for the rest of the group (workers) to be gone.
    const t0 = Date.now();
    let members = groupMembers(this.pid);
    while (members.length && Date.now() - t0 < 5000) {
      try { process.kill(-this.pid, 'SIGKILL'); } catch {}
      await sleep(50);
      members = groupMembers(this.pid);
    }
    liveGroups.delete(this.pid);
    if (members.length) process.stderr.write(`bench: warning: processes ${members.join(',')} of group ${this.pid} still alive after SIGKILL\n`);
  }
}

function withTimeout(p, ms, msg) {
  let t;
  return Promise.race([p, new Promise((_, rej) => { t = setTimeout(() => rej(new Error(msg)), ms); })])
    .finally(() => clearTimeout(t));
}

// ------------------------------------------------------------------ wrk
function parseDurationUs(s) {
  const m = /^([\d.]+)(us|ms|s|m|h)$/.exec(s);
  if (!m) return null;
  const mult = { us: 1, ms: 1e3, s: 1e6, m: 60e6, h: 3600e6 }[m[2]];
  return Number(m[1]) * mult;
}

// Parses wrk's human output (run with --latency) and, if present, the
// WRK_JSON line our Lua done() prints (exact numbers; preferred).
function parseWrk(out) {
  const r = { text: {}, json: null };
  let m;
  if ((m = /Requests\/sec:\s+([\d.]+)/.exec(out))) r.text.rps = Number(m[1]);
  if ((m = /(\d+) requests in ([\d.]+\w+)/.exec(out))) { r.text.requests = Number(m[1]); r.text.durationUs = parseDurationUs(m[2]); }
  const dist = /Latency Distribution([\s\S]*?)\n\s*\d+ requests in/.exec(out);
  if (dist) {
    for (const line of dist[1].split('\n')) {
      const mm = /^\s*([\d.]+)%\s+([\d.]+\w+)/.exec(line);
      if (mm) r.text['p' + Number(mm[1])] = parseDurationUs(mm[2]);
    }
  }
  r.text.errors = { connect: 0, read: 0, write: 0, timeout: 0, status: 0 };
  if ((m = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out))) {
    Object.assign(r.text.errors, { connect: +m[1], read: +m[2], write: +m[3], timeout: +m[4] });
  }
  if ((m = /Non-2xx or 3xx responses: (\d+)/.exec(out))) r.text.errors.status = Number(m[1]);
  if ((m = /^WRK_JSON (\{.*\})\s*$/m.exec(out))) { try { r.json = JSON.parse(m[1]); } catch {} }

  const j = r.json;
  const errors = j ? { connect: j.connect, read: j.read, write: j.write, timeout: j.timeout, status: j.status } : r.text.errors;
  const requests = j ? j.requests : r.text.requests;
  const durationUs = j ? j.duration_us : r.text.durationUs;
  return {
    requests,
    durationS: durationUs / 1e6,
    rps: j && j.duration_us > 0 ? j.requests / (j.duration_us / 1e6) : r.text.rps,
    p50Us: j ? j.p50_us : r.text.p50,
    p99Us: j ? j.p99_us : r.text.p99,
    errors,
    errorsTotal: Object.values(errors).reduce((a, b) => a + b, 0),
    textRps: r.text.rps,
    // wrk's own CPU time over its run (it measures itself; see bench/wrk.lua).
    loadCpuS: j && j.cpu_ticks >= 0 ? j.cpu_ticks / CLK_TCK : null,
  };
}

function runWrk(port, scenario, seconds, cfg) {
  const args = ['-t', String(cfg.threads), '-c', String(cfg.connections), '-d', `${seconds}s`,
    '--latency', '--timeout', '5s', '-s', WRK_SCRIPT, `http://${HOST}:${port}/`];
  const env = { ...process.env, WRK_CONNECTION_CLOSE: scenario === 'close' ? '1' : '0' };
  return new Promise((resolve, reject) => {
    const w = spawn('wrk', args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    liveWrk.add(w);
    let out = '', err = '';
    w.stdout.on('data', (d) => { out += d; });
    w.stderr.on('data', (d) => { err += d; });
    const timer = setTimeout(() => { try { w.kill('SIGKILL'); } catch {} }, (seconds + 20) * 1000);
    w.on('error', (e) => { clearTimeout(timer); liveWrk.delete(w); reject(e); });
    w.on('exit', (code, sig) => {
      clearTimeout(timer);
      liveWrk.delete(w);
      if (code !== 0) return reject(new Error(`wrk ${args.join(' ')} failed (code ${code}, signal ${sig}):\n${out}${err}`));
      const res = parseWrk(out);
      if (res.requests == null || res.rps == null) return reject(new Error(`could not parse wrk output:\n${out}${err}`));
      res.raw = out;
      resolve(res);
    });
  });
}

// Opens `n` connections at once, as a client's keep-alive pool does, and asks
// on each which process serves it. Resolves to the count per process, most
// first, once every connection has answered; the connections are closed then.
function openPool(port, n) {
  const sockets = [];
  const answers = Array.from({ length: n }, () => new Promise((resolve, reject) => {
    const socket = net.connect(port, HOST, () => socket.write('GET /pid HTTP/1.1\r\nHost: bench\r\n\r\n'));
    sockets.push(socket);
    let reply = '';
    socket.setEncoding('latin1');
    socket.on('data', (d) => {
      reply += d;
      const m = /^HTTP\/1\.1 200[^]*?\r\n\r\n(\d+)$/.exec(reply);
      if (m) resolve(m[1]);
    });
    socket.on('error', reject);
    socket.on('close', () => reject(new Error(`a pool connection closed before its answer (${JSON.stringify(reply)})`)));
  }));
  const counts = Promise.all(answers).then((pids) => {
    const per = new Map();
    for (const pid of pids) per.set(pid, (per.get(pid) || 0) + 1);
    return [...per.values()].sort((a, b) => b - a);
  });
  const done = () => { for (const socket of sockets) socket.destroy(); };
  counts.then(done, done);
  return withTimeout(counts, 10000, `a pool of ${n} connections was not served within 10 s`);
}

// The pool scenario: a keep-alive pool opening 100 ms after a spell of
// `Connection: close` load, and one opening halfway through another.
async function poolSplits(port, workers, cfg) {
  await runWrk(port, 'close', cfg.duration, cfg);
  await sleep(100);
  const after = await openPool(port, cfg.connections);
  const load = runWrk(port, 'close', cfg.duration, cfg);
  await sleep(cfg.duration * 500);
  const during = await openPool(port, cfg.connections);
  await load;
  const pad = (split) => split.concat(Array(Math.max(0, workers - split.length)).fill(0));
  return { poolAfter: pad(after), poolDuring: pad(during) };
}

// ------------------------------------------------------------------ one measurement
async function measure(implName, scenario, workers, cfg) {
  const def = IMPL_DEF[implName];
  const port = await freePort();
  const env = Object.assign({}, process.env, {
    BENCH_IMPL: def.impl,
    BENCH_WORKERS: String(def.impl === 'single' ? 1 : workers),
    BENCH_HOST: HOST,
    BENCH_PORT: String(port),
    BENCH_CPU_ITER: String(scenario === 'cpu' ? cfg.cpuIter : 0),
    // (The pool scenario runs wrk twice.)
    BENCH_MAX_LIFE_MS: String(START_TIMEOUT_MS + (cfg.warmup + cfg.duration * (scenario === 'pool' ? 2 : 1)) * 1000 + 60000),
  });
  Object.assign(env, def.env);
  delete env.BENCH_RS_PATH; // the server loads the linked package (see linkPackage)
  delete env.NODE_UNIQUE_ID; // never let the primary think it is a worker
  delete env.NODE_CHANNEL_FD;
  if (def.policy) { env.BENCH_POLICY = def.policy; env.NODE_CLUSTER_SCHED_POLICY = def.policy; } else {
    delete env.BENCH_POLICY; delete env.NODE_CLUSTER_SCHED_POLICY;
  }

  const srv = new ServerHandle(implName, env);
  let stage = 'start';
  try {
    const ready = await srv.ready(START_TIMEOUT_MS);
    if (scenario === 'startup') {
      stage = 'kill-one-worker';
      const { restartMs } = await srv.cmd('killone');
      if (srv.exited) throw new Error('server exited during the measurement');
      return { impl: implName, scenario, workers, port, startupMs: ready.startupMs, restartMs };
    }
    if (scenario === 'pool') {
      stage = 'pools';
      const splits = await poolSplits(port, workers, cfg);
      if (srv.exited) throw new Error('server exited during the measurement');
      return { impl: implName, scenario, workers, port, ...splits, startupMs: ready.startupMs, restartMs: null };
    }
    stage = 'warm-up';
    if (cfg.warmup > 0) {
      await runWrk(port, scenario, cfg.warmup, cfg);
      await sleep(250); // let the server drain warm-up connections before counting
    }
    stage = 'reset';
    await srv.cmd('reset');
    const cpu0 = (await srv.cmd('cpu')).cpuUs;
    const proc0 = readProcCpuS(srv.pid);
    const host0 = readHostCpu();
    stage = 'load';
    const w = await runWrk(port, scenario, cfg.duration, cfg);
    const host1 = readHostCpu();
    const rssKb = readRssKb(srv.pid);
    const proc1 = readProcCpuS(srv.pid);
    stage = 'stats';
    const cpu1 = (await srv.cmd('cpu')).cpuUs;
    const statsReply = await srv.cmd('stats');
    const stats = statsReply.workers;
    if (statsReply.unexpectedExits && statsReply.unexpectedExits.length) {
      throw new Error(`worker(s) died during the load: ${JSON.stringify(statsReply.unexpectedExits)}`);
    }
    let restartMs = null;
    if (def.impl !== 'single') {
      stage = 'kill-one-worker';
      restartMs = (await srv.cmd('killone')).restartMs;
    }
    if (srv.exited) throw new Error('server exited during the measurement');

    const conns = stats.map((s) => s.connections);
    const connections = conns.reduce((a, b) => a + b, 0);
    const serverRequests = stats.reduce((a, s) => a + s.requests, 0);
    const primaryCpuS = (cpu1 - cpu0) / 1e6;
    // Workers report their own CPU since the reset; the single process has none.
    const workersCpuS = def.impl === 'single' ? null : stats.reduce((a, s) => a + (s.cpuUs || 0), 0) / 1e6;
    return {
      impl: implName, scenario, workers: def.impl === 'single' ? 1 : workers, port,
      rps: w.rps, requests: w.requests, durationS: w.durationS, p50Us: w.p50Us, p99Us: w.p99Us,
      errors: w.errors, errorsTotal: w.errorsTotal,
      perWorkerConnections: conns.slice().sort((a, b) => b - a),
      perWorkerRequests: stats.map((s) => s.requests).sort((a, b) => b - a),
      connections, serverRequests,
      connCv: stats.length > 1 ? cv(conns) : null,
      primaryCpuS,
      primaryCpuProcS: proc0 != null && proc1 != null ? proc1 - proc0 : null,
      primaryCpuPer10kConnS: connections >= 1000 ? primaryCpuS / connections * 1e4 : null,
      workersCpuPer10kConnS: connections >= 1000 && workersCpuS != null ? workersCpuS / connections * 1e4 : null,
      workersCpuUsPerReq: serverRequests > 0 && workersCpuS != null ? workersCpuS / serverRequests * 1e6 : null,
      primaryRssKb: rssKb,
      // The load generator's share: its CPU per request, and how busy its
      // threads were (near 1, it may limit the run as much as the server).
      loadCpuUsPerReq: w.loadCpuS != null && w.requests > 0 ? w.loadCpuS / w.requests * 1e6 : null,
      loadBusy: w.loadCpuS != null && w.durationS > 0 ? w.loadCpuS / (w.durationS * cfg.threads) : null,
      hostIdle: host0 && host1 && host1.total > host0.total ? (host1.idle - host0.idle) / (host1.total - host0.total) : null,
      startupMs: ready.startupMs,
      restartMs,
    };
  } catch (e) {
    e.stage = stage;
    e.serverLog = srv.logTail();
    throw e;
  } finally {
    await srv.kill();
  }
}

// ------------------------------------------------------------------ aggregation
function aggregate(runs, impls, scenarios, workerCounts, baseImpl) {
  const baseline = baseImpl ?? (impls.includes('node-rr') ? 'node-rr' : impls[0]);
  // Each round measures every impl within about a minute, so a figure taken
  // against the base's run of the same round is spared the machine's drift
  // between rounds: that run, for run `r`.
  // (In the startup scenario, the base's run of the same sample.)
  const baseRunFor = (r) => runs.find((x) => x.impl === baseline && x.round === r.round &&
                                            x.scenario === r.scenario && x.wc === r.wc && x.sample === r.sample);
  const rows = [];
  for (const scenario of scenarios.filter(isLoad)) {
    for (const wc of workerCounts) {
      const group = [];
      for (const impl of impls) {
        const rs = runs.filter((r) => r.impl === impl && r.scenario === scenario && r.wc === wc);
        if (!rs.length) continue;
        const nW = Math.max(...rs.map((r) => r.perWorkerConnections.length));
        const perWorker = [];
        for (let k = 0; k < nW; k++) perWorker.push(median(rs.map((r) => r.perWorkerConnections[k])));
        group.push({
          scenario, workers: IMPL_DEF[impl].impl === 'single' ? 1 : wc, workersConfig: wc, impl, n: rs.length,
          rps: median(rs.map((r) => r.rps)),
          rpsAll: rs.map((r) => Math.round(r.rps)),
          p50Us: median(rs.map((r) => r.p50Us)),
          p99Us: median(rs.map((r) => r.p99Us)),
          errors: median(rs.map((r) => r.errorsTotal)),
          errorsSum: rs.reduce((a, r) => a + r.errorsTotal, 0),
          perWorkerConnections: perWorker,
          connections: median(rs.map((r) => r.connections)),
          connCv: median(rs.map((r) => r.connCv)),
          primaryCpuS: median(rs.map((r) => r.primaryCpuS)),
          primaryCpuPer10kConnS: median(rs.map((r) => r.primaryCpuPer10kConnS)),
          workersCpuPer10kConnS: median(rs.map((r) => r.workersCpuPer10kConnS)),
          workersCpuUsPerReq: median(rs.map((r) => r.workersCpuUsPerReq)),
          primaryRssKb: median(rs.map((r) => r.primaryRssKb)),
          loadCpuUsPerReq: median(rs.map((r) => r.loadCpuUsPerReq)),
          loadBusy: median(rs.map((r) => r.loadBusy)),
          hostIdle: median(rs.map((r) => r.hostIdle)),
          ratio: null,
        });
      }
      const base = group.find((g) => g.impl === baseline);
      for (const g of group) {
        g.ratio = base && base.rps ? g.rps / base.rps : null;
        const paired = [];
        for (const r of g.impl === baseline ? [] : runs) {
          if (r.impl !== g.impl || r.scenario !== scenario || r.wc !== wc) continue;
          const b = baseRunFor(r);
          if (b && b.rps) paired.push(r.rps / b.rps);
        }
        g.pairedRatio = paired.length > 1 ? median(paired) : null;
        g.pairedRange = paired.length > 1 ? [Math.min(...paired), Math.max(...paired)] : null;
      }
      rows.push(...group);
    }
  }
  // Start-up and replacement come from the startup scenario when it ran;
  // otherwise each load measurement's server start gives a sample.
  const timed = runs.some((r) => r.scenario === 'startup') ? (scenario) => scenario === 'startup' : isLoad;
  const timings = [];
  for (const impl of impls) {
    if (IMPL_DEF[impl].impl === 'single') continue;
    for (const wc of workerCounts) {
      const rs = runs.filter((r) => r.impl === impl && r.wc === wc && timed(r.scenario));
      if (!rs.length) continue;
      // Start-up times vary by several ms from one measurement to the next
      // here: also the median difference from the base's same-round runs.
      const paired = (key) => {
        if (impl === baseline) return null;
        const diffs = [];
        for (const r of rs) {
          const b = baseRunFor(r);
          if (b && b[key] != null && r[key] != null) diffs.push(r[key] - b[key]);
        }
        return diffs.length > 1 ? median(diffs) : null;
      };
      timings.push({
        impl, workers: wc, n: rs.length,
        startupMs: median(rs.map((r) => r.startupMs)),
        restartMs: median(rs.map((r) => r.restartMs)),
        startupMsMin: Math.min(...rs.map((r) => r.startupMs)),
        restartMsMin: Math.min(...rs.map((r) => r.restartMs ?? Infinity)),
        startupPairedMs: paired('startupMs'),
        restartPairedMs: paired('restartMs'),
      });
    }
  }
  const pools = [];
  for (const impl of impls) {
    for (const wc of workerCounts) {
      const rs = runs.filter((r) => r.impl === impl && r.wc === wc && r.scenario === 'pool');
      if (!rs.length) continue;
      const largest = (split) => split[0] / split.reduce((a, b) => a + b, 0);
      pools.push({
        impl, workers: wc, n: rs.length,
        after: rs.map((r) => r.poolAfter),
        during: rs.map((r) => r.poolDuring),
        largestAfter: median(rs.map((r) => largest(r.poolAfter))),
        largestDuring: median(rs.map((r) => largest(r.poolDuring))),
      });
    }
  }
  return { baseline, rows, timings, pools };
}

// ------------------------------------------------------------------ output
const COLS = [
  ['scenario', (r) => r.scenario],
  ['workers', (r) => String(r.workers)],
  ['impl', (r) => r.impl],
  ['req/s', (r) => fmt.int(r.rps), 'r'],
  ['spread', (r) => (r.n > 1 && r.rps ? '±' + ((Math.max(...r.rpsAll) - Math.min(...r.rpsAll)) / 2 / r.rps * 100).toFixed(0) + '%' : '—'), 'r'],
  ['vs base', (r) => fmt.ratio(r.ratio), 'r'],
  ['paired', (r) => (r.pairedRatio == null ? '—' :
    `${fmt.ratio(r.pairedRatio)} (${r.pairedRange.map((x) => x.toFixed(2)).join('–')})`), 'r'],
  ['p50', (r) => fmt.ms(r.p50Us), 'r'],
  ['p99', (r) => fmt.ms(r.p99Us), 'r'],
  ['errors', (r) => fmt.int(r.errorsSum), 'r'],
  ['conns/worker', (r) => r.perWorkerConnections.map(fmt.int).join(' / '), 'r'],
  ['conn CV', (r) => fmt.f(r.connCv), 'r'],
  ['prim CPU s/10k conn', (r) => fmt.f(r.primaryCpuPer10kConnS, 3), 'r'],
  ['workers CPU s/10k conn', (r) => fmt.f(r.workersCpuPer10kConnS, 3), 'r'],
  ['workers CPU µs/req', (r) => fmt.f(r.workersCpuUsPerReq, 1), 'r'],
  ['prim CPU s', (r) => fmt.f(r.primaryCpuS, 2), 'r'],
  ['prim RSS', (r) => fmt.mb(r.primaryRssKb), 'r'],
  ['wrk CPU µs/req', (r) => fmt.f(r.loadCpuUsPerReq, 1), 'r'],
  ['wrk busy', (r) => pct(r.loadBusy), 'r'],
  ['host idle', (r) => pct(r.hostIdle), 'r'],
];
const TCOLS = [
  ['impl', (t) => t.impl],
  ['workers', (t) => String(t.workers)],
  ['fork → all listening', (t) => fmt.msv(t.startupMs), 'r'],
  ['vs base (paired)', (t) => fmt.msDiff(t.startupPairedMs), 'r'],
  ['SIGKILL → replacement listening', (t) => fmt.msv(t.restartMs), 'r'],
  ['vs base (paired)', (t) => fmt.msDiff(t.restartPairedMs), 'r'],
  ['samples', (t) => String(t.n), 'r'],
];
const pct = (x) => (x == null ? '—' : (x * 100).toFixed(0) + '%');
// wrk's threads busy this much of a run: it, not the server, may limit it.
const LOAD_BOUND = 0.9;
const splits = (list) => list.map((split) => split.join('/')).join(' ');
const PCOLS = [
  ['impl', (p) => p.impl],
  ['workers', (p) => String(p.workers)],
  ['after load', (p) => splits(p.after)],
  ['busiest', (p) => pct(p.largestAfter), 'r'],
  ['during load', (p) => splits(p.during)],
  ['busiest', (p) => pct(p.largestDuring), 'r'],
];

function textTable(cols, rows) {
  const cells = rows.map((r) => cols.map((c) => c[1](r)));
  const widths = cols.map((c, i) => Math.max(c[0].length, ...cells.map((row) => row[i].length)));
  const line = (vals) => vals.map((v, i) => (cols[i][2] === 'r' ? v.padStart(widths[i]) : v.padEnd(widths[i]))).join('  ');
  return [line(cols.map((c) => c[0])), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.map(line)].join('\n');
}

function mdTable(cols, rows) {
  const esc = (s) => String(s).replace(/\|/g, '\\|');
  return [
    '| ' + cols.map((c) => esc(c[0])).join(' | ') + ' |',
    '|' + cols.map((c) => (c[2] === 'r' ? '---:' : ':---')).join('|') + '|',
    ...rows.map((r) => '| ' + cols.map((c) => esc(c[1](r))).join(' | ') + ' |'),
  ].join('\n');
}

function xmlEsc(s) { return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;'); }

function svgChart(agg, impls, meta) {
  const colors = {
    'node-rr': '#7f7f7f', 'node-none': '#bcbcbc', 'rs-rr': '#d9480f', 'rs-dispatch': '#9c36b5', 'rs-none': '#f59f00',
    'rs-reuseport': '#2f9e44', single: '#1c7ed6',
  };
  const groups = [];
  for (const r of agg.rows) {
    const key = `${r.scenario} · ${r.workersConfig}w`;
    let g = groups.find((x) => x.key === key);
    if (!g) groups.push(g = { key, bars: [] });
    g.bars.push(r);
  }
  const barW = 30, gap = 6, groupGap = 40, left = 60, top = 60, plotH = 260, bottom = 70;
  // Wide enough for its label ("keepalive · 2w") even with one bar.
  const groupW = (n) => Math.max(n * barW + (n - 1) * gap, 110);
  const title = `Requests/s relative to ${agg.baseline} (median of ${meta.rounds} round${meta.rounds > 1 ? 's' : ''}, higher is better)`;
  const legendW = impls.reduce((a, i) => a + 28 + i.length * 7, 0);
  const width = Math.ceil(Math.max(left + title.length * 8.8 + 20, left + legendW + 20,
    left + groups.reduce((a, g) => a + groupW(g.bars.length) + groupGap, 0) + 20));
  const maxR = Math.max(1.2, ...agg.rows.map((r) => r.ratio || 0));
  const step = maxR > 4 ? 1 : maxR > 2 ? 0.5 : 0.25;
  const yMax = Math.ceil(maxR / step) * step;
  const y = (v) => top + plotH - (v / yMax) * plotH;
  const height = top + plotH + bottom + 24;
  const o = [];
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`);
  o.push(`<rect width="100%" height="100%" fill="#ffffff"/>`);
  o.push(`<text x="${left}" y="22" font-size="15" font-weight="bold">${xmlEsc(title)}</text>`);
  o.push(`<text x="${left}" y="40" fill="#555">${xmlEsc(`wrk -t${meta.threads} -c${meta.connections} -d${meta.duration}s · node ${meta.node} · ${meta.cpus} CPUs · ${meta.date}`)}</text>`);
  for (let v = 0; v <= yMax + 1e-9; v += step) {
    o.push(`<line x1="${left}" x2="${width - 10}" y1="${y(v).toFixed(1)}" y2="${y(v).toFixed(1)}" stroke="#e6e6e6"/>`);
    o.push(`<text x="${left - 6}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end" fill="#555">${v.toFixed(2)}×</text>`);
  }
  let x = left + groupGap / 2;
  for (const g of groups) {
    const inset = (groupW(g.bars.length) - (g.bars.length * (barW + gap) - gap)) / 2;
    g.bars.forEach((b, i) => {
      const bx = x + inset + i * (barW + gap);
      const r = b.ratio || 0;
      o.push(`<rect x="${bx}" y="${y(r).toFixed(1)}" width="${barW}" height="${(y(0) - y(r)).toFixed(1)}" fill="${colors[b.impl] || '#888'}"><title>${xmlEsc(`${b.impl} ${g.key}: ${fmt.int(b.rps)} req/s (${fmt.ratio(b.ratio)})`)}</title></rect>`);
      o.push(`<text x="${bx + barW / 2}" y="${(y(r) - 4).toFixed(1)}" text-anchor="middle" font-size="10">${b.ratio == null ? '—' : b.ratio.toFixed(2)}</text>`);
    });
    o.push(`<text x="${x + groupW(g.bars.length) / 2}" y="${top + plotH + 18}" text-anchor="middle" font-weight="bold">${xmlEsc(g.key)}</text>`);
    x += groupW(g.bars.length) + groupGap;
  }
  o.push(`<line x1="${left}" x2="${width - 10}" y1="${y(1).toFixed(1)}" y2="${y(1).toFixed(1)}" stroke="#222" stroke-dasharray="5,4"/>`);
  o.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${y(0)}" stroke="#222"/>`);
  o.push(`<line x1="${left}" x2="${width - 10}" y1="${y(0)}" y2="${y(0)}" stroke="#222"/>`);
  let lx = left;
  const ly = top + plotH + 44;
  for (const impl of impls) {
    o.push(`<rect x="${lx}" y="${ly - 10}" width="12" height="12" fill="${colors[impl] || '#888'}"/>`);
    o.push(`<text x="${lx + 16}" y="${ly}">${xmlEsc(impl)}</text>`);
    lx += 28 + impl.length * 7;
  }
  o.push('</svg>');
  return o.join('\n') + '\n';
}

function markdown(agg, meta, notes) {
  const m = [];
  m.push('# cluster-rs benchmark results', '');
  m.push(`- date: ${meta.date}`);
  m.push(`- command: \`${meta.command}\``);
  m.push(`- node ${meta.node}, ${meta.wrk}, ${meta.cpus} CPUs (os.availableParallelism() = ${meta.availableParallelism}), ${meta.cpuModel}, ${meta.os}`);
  m.push(`- wrk -t${meta.threads} -c${meta.connections} -d${meta.duration}s, ${meta.warmup}s warm-up, ${meta.rounds} interleaved round(s), medians reported`);
  if (meta.scenarios.includes('cpu')) m.push(`- cpu scenario: pbkdf2Sync sha256 × ${meta.cpuIter} iterations per request (≈ ${meta.cpuMs} ms on this machine)`);
  m.push(`- "vs base" = req/s ÷ ${agg.baseline} req/s in the same scenario and worker count`);
  m.push('', '![req/s relative to baseline](latest.svg)', '');
  if (agg.rows.length) m.push(mdTable(COLS, agg.rows), '');
  if (agg.timings.length) m.push('## Worker start-up and replacement', '', mdTable(TCOLS, agg.timings), '');
  if (agg.pools.length) m.push('## Keep-alive pools opening after and during load', '', mdTable(PCOLS, agg.pools), '');
  m.push('## Notes', '');
  for (const n of notes) m.push(`- ${n}`);
  return m.join('\n') + '\n';
}

const NOTES = [
  'close: every request sends `Connection: close` (set in bench/wrk.lua), so each request is a new TCP connection; keepalive: wrk\'s persistent connections; cpu: keep-alive with ~1 ms of pbkdf2 per request.',
  'spread = ±half the range (max − min) of req/s over the rounds, relative to the median: a quick noise indicator.',
  'paired = the median, over rounds, of req/s ÷ the baseline\'s req/s in the same round (range in brackets); the impls of a round run back to back, so this ratio is less exposed to the machine\'s drift than "vs base". Shown from 2 rounds.',
  'errors = wrk socket errors (connect, read, write, timeout) + non-2xx/3xx responses, summed over the rounds.',
  'conns/worker = TCP connections each worker\'s server saw (`connection` events), sorted descending, median per position; conn CV = stddev/mean over workers (0 = perfectly even).',
  'prim CPU = user+system CPU of the primary process (all its threads) during the measured load (process.cpuUsage() in the primary); per 10k conn only shown when ≥ 1000 connections were made (not meaningful for keep-alive). For `single` the "primary" is the only process and does all the work.',
  'workers CPU = user+system CPU of all workers together (process.cpuUsage() in each, since the reset before the load), per 10k connections; with the primary\'s, it says where a policy spends the machine. Per request too: with keep-alive, where no connection is accepted, it tells a cost the module adds to each request from the split of the connections and the machine\'s noise.',
  'prim RSS = VmRSS of the primary right after the load.',
  `wrk CPU = user+system CPU of wrk itself (all its threads, read from /proc/self/stat in bench/wrk.lua) per request; wrk busy = that CPU ÷ (duration × wrk threads); host idle = the idle part of all CPUs during the load (/proc/stat). On one machine wrk and the server share the CPUs: with host idle near 0, req/s ≈ busy CPUs ÷ (wrk's + primary's + workers' CPU per request), so a server can gain only what it spends itself. With wrk busy ${LOAD_BOUND * 100}% or more, the load generator is near its own limit and the harness says so.`,
  'pool: connections per worker of a pool of `--connections` keep-alive connections opened at once by the harness, 100 ms after `--duration` s of close load ("after load") and halfway through another ("during load"), one entry per round; busiest = the median over rounds of the busiest worker\'s part of the pool (ideal: 1 ÷ workers).',
  'fork → all listening: from just before the first fork() until N cluster `listening` events. SIGKILL → replacement listening: the primary kills one worker with SIGKILL and, like ordinary node:cluster code, forks a replacement on `exit`; time until that replacement is listening. With the startup scenario, these come from its samples: fresh servers that only start and replace a worker, the impls taking turns sample by sample; without it, from the server of each load measurement. vs base (paired) = the median difference from the baseline\'s sample of the same round (and sample).',
];

// ------------------------------------------------------------------ main
async function main() {
  const tStart = Date.now();
  const a = parseArgs(process.argv.slice(2));
  const quick = !!a.quick;
  const ap = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  const cfg = {
    rounds: a.rounds ?? (quick ? 1 : 3),
    duration: a.duration ?? (quick ? 2 : 5),
    warmup: a.warmup ?? (quick ? 0 : 1),
    connections: a.connections ?? 50,
    threads: a.threads ?? 1,
    cpuMs: a.cpuMs ?? 1,
    startupSamples: a.startupSamples ?? (quick ? 1 : 8),
    scenarios: a.scenarios ?? (quick ? ['close', 'keepalive', 'startup'] : ALL_SCENARIOS.slice()),
    out: a.out ?? path.join(__dirname, 'results'),
  };
  for (const s of cfg.scenarios) if (!ALL_SCENARIOS.includes(s)) die(`unknown scenario "${s}" (known: ${ALL_SCENARIOS.join(', ')})`, 2);
  let workersSpec = a.workers ?? (quick ? '2' : 'auto');
  let workerCounts;
  const notes = NOTES.slice();
  if (workersSpec === 'auto') {
    workerCounts = [...new Set([2, ap])];
    if (ap === 2) {
      const n = 'os.availableParallelism() is 2 on this machine, so the "2 workers" and "availableParallelism() workers" runs are the same: run once.';
      console.log(`bench: ${n}`);
      notes.push(n);
    }
  } else {
    workerCounts = [...new Set(String(workersSpec).split(',').map((s) => posInt(s.trim(), '--workers')))];
  }

  let impls = a.impls ?? ALL_IMPLS.slice();
  for (const i of impls) if (!IMPL_DEF[i]) die(`unknown implementation "${i}" (known: ${ALL_IMPLS.join(', ')})`, 2);
  impls = ALL_IMPLS.filter((i) => impls.includes(i)); // canonical order in tables/chart

  const wrkVersion = checkWrk();
  const skipped = [];
  if (impls.some((i) => IMPL_DEF[i].impl === 'rs')) {
    const rs = checkClusterRs();
    if (!rs.ok) {
      const sk = impls.filter((i) => IMPL_DEF[i].impl === 'rs');
      const msg = `cluster-rs could not be loaded from ${RS_PATH} (${rs.reason}); skipping ${sk.join(', ')}. Build the addon first (e.g. npm run build) to include them.`;
      console.log(`bench: ${msg}`);
      notes.push(msg);
      skipped.push(...sk);
      impls = impls.filter((i) => IMPL_DEF[i].impl !== 'rs');
    } else {
      linkPackage();
    }
  }
  if (!impls.length) die('nothing to run (all requested implementations were skipped)', 1);
  if (a.base !== undefined && !impls.includes(a.base)) die(`--base ${a.base} is not among the implementations run (${impls.join(', ')})`, 2);

  if (cfg.scenarios.includes('cpu')) {
    cfg.cpuIter = calibrateCpu(cfg.cpuMs);
    console.log(`bench: cpu scenario burns pbkdf2Sync(sha256, ${cfg.cpuIter} iterations) ≈ ${cfg.cpuMs} ms per request`);
  } else cfg.cpuIter = 0;

  const command = ['node bench/run.js',
    '--impl', impls.concat(skipped).join(','),
    '--scenarios', cfg.scenarios.join(','),
    '--workers', workerCounts.join(','),
    '--rounds', cfg.rounds, '--duration', cfg.duration, '--warmup', cfg.warmup,
    '--connections', cfg.connections, '--threads', cfg.threads,
  ].concat(cfg.cpuMs !== 1 ? ['--cpu-ms', cfg.cpuMs] : [],
    cfg.scenarios.includes('startup') ? ['--startup-samples', cfg.startupSamples] : [], a.base !== undefined ? ['--base', a.base] : []).join(' ');
  console.log(`bench: ${wrkVersion}; wrk -t${cfg.threads} -c${cfg.connections} -d${cfg.duration}s (+${cfg.warmup}s warm-up), ` +
    `${cfg.rounds} round(s); impls ${impls.join(', ')}; scenarios ${cfg.scenarios.join(', ')}; workers ${workerCounts.join(', ')}`);
  console.log(`bench: reproduce with: ${command}`);

  // Build the interleaved schedule: in every round each (scenario, workers)
  // combination runs every impl once, in an order that rotates per round.
  const combos = [];
  for (const s of cfg.scenarios) for (const wc of workerCounts) combos.push({ scenario: s, wc });
  const schedule = [];
  for (let r = 0; r < cfg.rounds; r++) {
    combos.forEach((c, ci) => {
      // `single` does not depend on the worker count: run it once per
      // scenario, and not at all for pools (it has no workers to share them).
      const list = impls.filter((i) => IMPL_DEF[i].impl !== 'single' || (c.wc === workerCounts[0] && isLoad(c.scenario)));
      if (!list.length) return;
      // The startup scenario alternates the impls sample by sample: each
      // paired difference compares servers started within a second or two.
      const samples = c.scenario === 'startup' ? cfg.startupSamples : 1;
      for (let j = 0; j < samples; j++) {
        const k = (r + ci + j) % list.length;
        const order = list.slice(k).concat(list.slice(0, k));
        for (const impl of order) schedule.push({ round: r + 1, scenario: c.scenario, wc: c.wc, impl, sample: j });
      }
    });
  }
  if (!schedule.length) die(`nothing to run: ${impls.join(', ')} take no part in ${cfg.scenarios.join(', ')}`, 2);
  const estOne = (scenario) => ({ pool: 2 * cfg.duration + 0.7, startup: 0.5 })[scenario] ?? cfg.duration + cfg.warmup + 0.7;
  const estS = schedule.reduce((a, it) => a + estOne(it.scenario), 0);
  console.log(`bench: ${schedule.length} measurements, roughly ${Math.ceil(estS)} s\n`);

  const runs = [];
  const W = String(schedule.length).length;
  for (let k = 0; k < schedule.length; k++) {
    const it = schedule[k];
    const wl = IMPL_DEF[it.impl].impl === 'single' ? '1p' : `${it.wc}w`;
    const label = `[${String(k + 1).padStart(W)}/${schedule.length}] round ${it.round}/${cfg.rounds}  ${it.scenario.padEnd(9)} ${wl.padEnd(3)} ${it.impl.padEnd(9)}`;
    process.stdout.write(label + ' ... ');
    let res;
    try {
      res = await measure(it.impl, it.scenario, it.wc, cfg);
    } catch (e) {
      process.stdout.write('FAILED\n');
      die(`${it.impl} / ${it.scenario} / ${it.wc} workers failed during ${e.stage || '?'}: ${e.message}\n  server output (last lines):\n${e.serverLog || '    | (none)'}`, 1);
    }
    res.round = it.round;
    res.wc = it.wc;
    res.sample = it.sample;
    runs.push(res);
    if (it.scenario === 'startup') {
      process.stdout.write(`start ${res.startupMs.toFixed(1)}ms  restart ${res.restartMs.toFixed(1)}ms\n`);
      continue;
    }
    if (it.scenario === 'pool') {
      process.stdout.write(`pool after load ${res.poolAfter.join('/')}  during load ${res.poolDuring.join('/')}` +
        `  start ${res.startupMs.toFixed(0)}ms\n`);
      continue;
    }
    const warn = [];
    if (it.scenario === 'close' && res.connections < 0.9 * res.serverRequests) warn.push(`only ${res.connections} connections for ${res.serverRequests} requests: Connection: close not in effect?`);
    if (it.scenario !== 'close' && res.connections > 20 * cfg.connections) warn.push(`${res.connections} connections for a keep-alive run`);
    if (res.requests > 0 && Math.abs(res.serverRequests - res.requests) > cfg.connections * 2 + 0.01 * res.requests) warn.push(`wrk counted ${res.requests} requests, servers ${res.serverRequests}`);
    if (res.loadBusy >= LOAD_BOUND) warn.push(`wrk was busy ${pct(res.loadBusy)} of the run: the load generator may limit this figure`);
    process.stdout.write(`${fmt.int(res.rps).padStart(7)} req/s  p50 ${fmt.ms(res.p50Us)}  p99 ${fmt.ms(res.p99Us)}  err ${res.errorsTotal}` +
      `  conns ${res.perWorkerConnections.join('/')}  prim cpu ${res.primaryCpuS.toFixed(2)}s` +
      (res.startupMs != null ? `  start ${res.startupMs.toFixed(0)}ms` : '') +
      (res.restartMs != null ? `  restart ${res.restartMs.toFixed(0)}ms` : '') + '\n');
    for (const w of warn) console.log(`      warning: ${w}`);
  }

  const agg = aggregate(runs, impls, cfg.scenarios, workerCounts, a.base);
  const bound = agg.rows.filter((r) => r.loadBusy >= LOAD_BOUND);
  if (bound.length) {
    const n = `wrk's threads were busy ${LOAD_BOUND * 100}% or more of the run (median) in ${bound.map((r) => `${r.scenario}/${r.workersConfig}w/${r.impl}`).join(', ')}: ` +
      'the load generator is near its limit there, and req/s tells of it as much as of the server. Load from another machine measures further.';
    console.log(`bench: ${n}`);
    notes.push(n);
  }
  const elapsedS = (Date.now() - tStart) / 1000;
  const meta = {
    date: new Date().toISOString(),
    command,
    argv: process.argv.slice(2),
    quick,
    node: process.version,
    wrk: wrkVersion,
    cpus: os.cpus().length,
    availableParallelism: ap,
    cpuModel: (os.cpus()[0] || {}).model || 'unknown CPU',
    os: `${os.type()} ${os.release()} ${os.arch()}`,
    rounds: cfg.rounds, duration: cfg.duration, warmup: cfg.warmup,
    connections: cfg.connections, threads: cfg.threads,
    scenarios: cfg.scenarios, workerCounts, impls, skipped,
    cpuIter: cfg.cpuIter, cpuMs: cfg.cpuMs, startupSamples: cfg.startupSamples,
    elapsedS,
  };

  if (agg.rows.length) {
    console.log('\nResults (medians over rounds; "vs base" = req/s relative to ' + agg.baseline + '):\n');
    console.log(textTable(COLS, agg.rows));
  }
  if (agg.timings.length) {
    console.log('\nWorker start-up and replacement (medians):\n');
    console.log(textTable(TCOLS, agg.timings));
  }
  if (agg.pools.length) {
    console.log('\nKeep-alive pools opening after and during load (connections per worker, one entry per round):\n');
    console.log(textTable(PCOLS, agg.pools));
  }

  fs.mkdirSync(cfg.out, { recursive: true });
  const jsonRuns = runs.map((r) => Object.assign({}, r));
  fs.writeFileSync(path.join(cfg.out, 'latest.json'), JSON.stringify({ meta, notes, baseline: agg.baseline, rows: agg.rows, timings: agg.timings, pools: agg.pools, runs: jsonRuns }, null, 2) + '\n');
  fs.writeFileSync(path.join(cfg.out, 'latest.md'), markdown(agg, meta, notes));
  fs.writeFileSync(path.join(cfg.out, 'latest.svg'), svgChart(agg, impls, meta));
  const rel = (p) => path.relative(process.cwd(), p) || p;
  console.log(`\nbench: wrote ${rel(path.join(cfg.out, 'latest.json'))}, ${rel(path.join(cfg.out, 'latest.md'))}, ${rel(path.join(cfg.out, 'latest.svg'))}`);
  console.log(`bench: took ${elapsedS.toFixed(1)} s`);
  console.log(`bench: reproduce with: ${command}`);
}

main().catch((e) => die(e && e.stack || String(e), 1));
