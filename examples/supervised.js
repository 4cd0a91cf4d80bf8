'use strict';
// Supervision: crashed workers come back with backoff, SIGHUP reloads every
// worker without dropping a request, SIGTERM/SIGINT shut down gracefully.
// Run: node examples/supervised.js
//      curl localhost:8000/crash   (the worker dies; a new one replaces it)
//      kill -HUP <primary pid>     (rolling reload)
//      kill <primary pid>          (graceful shutdown, exit code 0)
const cluster = require('..'); // in an app: require('cluster-rs')
const http = require('node:http');

if (cluster.isPrimary) {
  cluster.setupPrimary({
    restart: { delay: 100, maxDelay: 5000, minUptime: 1000, maxRestarts: 10 },
    reloadOn: 'SIGHUP',
    shutdownOn: ['SIGTERM', 'SIGINT'],
  });
  console.log(`primary ${process.pid}`);
  cluster.fork();
  cluster.fork();
  cluster.on('fork', (worker) => console.log(`forked worker ${worker.id}`));
  cluster.on('giveup', (info) => console.log(`worker slot given up after ${info.restarts} restarts`));
} else {
  http.createServer((req, res) => {
    if (req.url === '/crash') process.exit(1);
    res.end(`hello from worker ${cluster.worker.id}\n`);
  }).listen(8000);
}
