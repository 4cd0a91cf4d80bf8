'use strict';
// Server under test for bench/run.js. Do not run by hand unless debugging:
//
//   BENCH_IMPL=node|rs|single BENCH_POLICY=rr|none BENCH_WORKERS=2 \
//   BENCH_PORT=8080 node bench/server.js
//
// The same file is the cluster primary and the worker. It talks to the harness
// over its stdin (one JSON command per line) and stdout (reply lines prefixed
// with "@@BENCH "); anything else on stdout/stderr is just log output.
//
// Environment:
//   BENCH_IMPL        node   -> require('node:cluster')
//                     rs     -> require(BENCH_RS_PATH || 'cluster-rs'); the harness
//                               links bench/node_modules/cluster-rs to the build
//                     single -> one plain process, no cluster at all
//   BENCH_POLICY      rr | none | reuseport (cluster-rs only)  (also exported as NODE_CLUSTER_SCHED_POLICY
//                     by the harness; here we additionally set
//                     cluster.schedulingPolicy before the first fork())
//   BENCH_WORKERS     number of workers
//   BENCH_HOST/PORT   address to listen on
//   BENCH_CPU_ITER    >0: each request burns pbkdf2Sync(..., iter) of CPU
//   BENCH_MAX_LIFE_MS self-destruct (kill own process group) after this long

const http = require('node:http');
const crypto = require('node:crypto');
const { performance } = require('node:perf_hooks');

const IMPL = process.env.BENCH_IMPL || 'node';
const POLICY = process.env.BENCH_POLICY || 'rr';
const WORKERS = Math.max(1, parseInt(process.env.BENCH_WORKERS || '2', 10));
const HOST = process.env.BENCH_HOST || '127.0.0.1';
const PORT = parseInt(process.env.BENCH_PORT || '8080', 10);
const CPU_ITER = parseInt(process.env.BENCH_CPU_ITER || '0', 10);
const MAX_LIFE_MS = parseInt(process.env.BENCH_MAX_LIFE_MS || '0', 10);

const BODY = Buffer.from('hello world');

function reply(obj) {
  process.stdout.write('@@BENCH ' + JSON.stringify(obj) + '\n');
}

// ---------------------------------------------------------------- HTTP server
// Used by every worker and by the `single` process.
function startHttpServer(onListening) {
  const stats = { connections: 0, requests: 0 };
  const server = http.createServer((req, res) => {
    // The pool scenario asks which process serves each of its connections.
    if (req.url === '/pid') { res.end(String(process.pid)); return; }
    stats.requests++;
    if (CPU_ITER > 0) crypto.pbkdf2Sync('hello', 'salt', CPU_ITER, 32, 'sha256');
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': BODY.length });
    res.end(BODY);
  });
  server.on('connection', () => { stats.connections++; });
  server.on('error', (err) => {
    process.stderr.write(`[bench server ${process.pid}] listen error: ${err.stack || err}\n`);
    process.exit(3);
  });
  server.listen(PORT, HOST, onListening);
  return { server, stats };
}

// Reads JSON commands from the harness on stdin. If stdin closes (harness
// died), run onEnd so nothing is left behind.
function commandLoop(handler, onEnd) {
  let buf = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line) continue;
      let msg;
      try { msg = JSON.parse(line); } catch { continue; }
      Promise.resolve()
        .then(() => handler(msg))
        .then((res) => reply(Object.assign({ id: msg.id, ok: true }, res)),
              (err) => reply({ id: msg.id, ok: false, error: String(err && err.stack || err) }));
    }
  });
  process.stdin.on('end', onEnd);
  process.stdin.on('error', onEnd);
}

function selfDestruct() {
  // The harness starts us as a process-group leader (detached), so this takes
  // the workers down as well.
  try { process.kill(-process.pid, 'SIGKILL'); } catch {}
  process.exit(1);
}

if (MAX_LIFE_MS > 0) {
  const t = setTimeout(() => {
    process.stderr.write(`[bench server ${process.pid}] max lifetime ${MAX_LIFE_MS} ms exceeded\n`);
    selfDestruct();
  }, MAX_LIFE_MS);
  t.unref();
}

// ---------------------------------------------------------------- single
if (IMPL === 'single') {
  const { stats } = startHttpServer(() => {
    reply({ type: 'ready', startupMs: null, workers: 1, pids: [process.pid] });
  });
  commandLoop((msg) => {
    switch (msg.cmd) {
      case 'reset': stats.connections = 0; stats.requests = 0; return {};
      case 'cpu': return { cpuUs: cpuUs() };
      case 'stats': return { workers: [{ pid: process.pid, connections: stats.connections, requests: stats.requests }] };
      case 'killone': return { restartMs: null };
      default: throw new Error('unknown command ' + msg.cmd);
    }
  }, () => process.exit(0));
  return;
}

// ---------------------------------------------------------------- cluster
let cluster;
if (IMPL === 'node') cluster = require('node:cluster');
else if (IMPL === 'rs') cluster = require(process.env.BENCH_RS_PATH || 'cluster-rs');
else throw new Error('BENCH_IMPL must be node, rs or single, got ' + IMPL);

const isPrimary = cluster.isPrimary !== undefined ? cluster.isPrimary : cluster.isMaster;

function cpuUs() {
  const u = process.cpuUsage();
  return u.user + u.system;
}

if (!isPrimary) {
  // ------------------------------------------------------------ worker
  const { stats } = startHttpServer();
  let cpuAtReset = cpuUs();
  process.on('message', (msg) => {
    if (!msg || typeof msg !== 'object' || !msg.benchCmd) return;
    if (msg.benchCmd === 'reset') { stats.connections = 0; stats.requests = 0; cpuAtReset = cpuUs(); }
    process.send({ benchReply: msg.seq, pid: process.pid, connections: stats.connections, requests: stats.requests,
                   cpuUs: cpuUs() - cpuAtReset });
  });
  return;
}

// -------------------------------------------------------------- primary
cluster.schedulingPolicy = POLICY === 'none' ? cluster.SCHED_NONE :
  POLICY === 'reuseport' ? cluster.SCHED_REUSEPORT : cluster.SCHED_RR;

let shuttingDown = false;
let startupT0 = 0;
let listeningCount = 0;
let readySent = false;
let killPending = null; // { t0, oldId }
let seq = 0;
const unexpectedExits = [];
const waiting = new Map(); // seq -> { need:Set(workerId), got:[], resolve, timer }

function liveWorkers() {
  return Object.values(cluster.workers || {}).filter(Boolean);
}

cluster.on('listening', (worker) => {
  listeningCount++;
  if (!readySent && listeningCount >= WORKERS) {
    readySent = true;
    const startupMs = performance.now() - startupT0;
    reply({ type: 'ready', startupMs, workers: WORKERS,
            pids: liveWorkers().map((w) => w.process && w.process.pid) });
  }
  if (killPending && worker.id !== killPending.oldId && worker.benchReplacement) {
    const restartMs = performance.now() - killPending.t0;
    const { resolve } = killPending;
    killPending = null;
    resolve({ restartMs });
  }
});

// Standard node:cluster idiom: replace workers that die.
cluster.on('exit', (worker, code, signal) => {
  if (shuttingDown) return;
  if (!readySent) {
    // Do not crash-loop: a worker that cannot start is a hard failure.
    process.stderr.write(`[bench primary] worker ${worker.id} exited (code ${code}, signal ${signal}) before all workers were listening; giving up\n`);
    shutdown(4);
    return;
  }
  if (!killPending || worker.id !== killPending.oldId) {
    unexpectedExits.push({ id: worker.id, pid: worker.process && worker.process.pid, code, signal });
    process.stderr.write(`[bench primary] worker ${worker.id} died unexpectedly (code ${code}, signal ${signal})\n`);
  }
  const w = cluster.fork();
  w.benchReplacement = true;
  attachWorker(w);
});

function attachWorker(w) {
  w.on('message', (msg) => {
    if (!msg || typeof msg !== 'object' || msg.benchReply === undefined) return;
    const p = waiting.get(msg.benchReply);
    if (!p) return;
    p.got.push({ pid: msg.pid, connections: msg.connections, requests: msg.requests, cpuUs: msg.cpuUs });
    p.need.delete(w.id);
    if (p.need.size === 0) { clearTimeout(p.timer); waiting.delete(msg.benchReply); p.resolve(p.got); }
  });
}

function askWorkers(cmd) {
  const ws = liveWorkers();
  const s = ++seq;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      waiting.delete(s);
      reject(new Error(`workers did not answer "${cmd}" within 5 s (got ${ws.length - entry.need.size}/${ws.length})`));
    }, 5000);
    const entry = { need: new Set(ws.map((w) => w.id)), got: [], resolve, timer };
    waiting.set(s, entry);
    for (const w of ws) w.send({ benchCmd: cmd, seq: s });
    if (ws.length === 0) { clearTimeout(timer); waiting.delete(s); resolve([]); }
  });
}

function shutdown(code = 0) {
  shuttingDown = true;
  for (const w of liveWorkers()) {
    try { if (w.process && w.process.pid) process.kill(w.process.pid, 'SIGKILL'); else w.kill('SIGKILL'); } catch {}
  }
  process.exit(code);
}

commandLoop((msg) => {
  switch (msg.cmd) {
    case 'reset': return askWorkers('reset').then(() => ({}));
    case 'cpu': return { cpuUs: cpuUs() };
    case 'stats': return askWorkers('stats').then((workers) => ({ workers, unexpectedExits }));
    case 'killone': {
      const victim = liveWorkers()[0];
      if (!victim) throw new Error('no live worker to kill');
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => { killPending = null; reject(new Error('replacement worker not listening within 10 s')); }, 10000);
        killPending = { t0: performance.now(), oldId: victim.id,
                        resolve: (r) => { clearTimeout(timer); resolve(r); } };
        const pid = victim.process && victim.process.pid;
        if (pid) process.kill(pid, 'SIGKILL'); else victim.kill('SIGKILL');
      });
    }
    default: throw new Error('unknown command ' + msg.cmd);
  }
}, () => shutdown(0));

startupT0 = performance.now();
for (let i = 0; i < WORKERS; i++) attachWorker(cluster.fork());
