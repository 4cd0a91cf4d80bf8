// @ts-check
// Plain CommonJS JavaScript consumer, checked with checkJs: `require()` of
// cluster-rs is fully typed.
'use strict';

const cluster = require('cluster-rs');
const { fork, isPrimary, Worker } = require('cluster-rs');

if (isPrimary) {
    cluster.setupPrimary({ exec: 'worker.js', restart: { maxRestarts: 5 }, shutdownOn: ['SIGTERM'] });
    /** @type {import('cluster-rs').Worker} */
    const w = fork({ ROLE: 'api' });
    console.log(w instanceof Worker, w.id);
    cluster.on('exit', (worker, code, signal) => console.log(worker.id, code.toFixed(), signal.length));
    cluster.on('giveup', (info) => console.log(info.restarts));
    cluster.shutdown({ timeout: 1000 }).then(() => cluster.reload());
}
