'use strict';
// The classic node:cluster HTTP server, with the one-line swap.
// Run: node examples/http.js  then  curl localhost:8000
const cluster = require('..'); // in an app: require('cluster-rs')
const http = require('node:http');
const os = require('node:os');

if (cluster.isPrimary) {
  for (let i = 0; i < os.availableParallelism(); i++) cluster.fork();
  cluster.on('listening', (worker, address) => console.log(`worker ${worker.id} listening on ${address.port}`));
  cluster.on('exit', (worker, code, signal) => console.log(`worker ${worker.id} exited (${signal || code})`));
} else {
  http.createServer((req, res) => res.end(`hello from worker ${cluster.worker.id}\n`)).listen(8000);
}
