// node:cluster used through `import x = require(...)`. As with `import * as`,
// @types/node exposes the cluster object as `.default`. Twin-checked against
// cluster-rs like app-node.ts; keep the specifier exactly 'node:cluster'.

import cluster = require('node:cluster');

const c: cluster.Cluster = cluster.default;
if (c.isPrimary) {
    c.schedulingPolicy = c.SCHED_RR;
    const w: cluster.Worker = c.fork();
    w.send('hi', undefined, { keepOpen: false }, (err: Error | null) => void err);
    c.on('online', (worker: cluster.Worker) => console.log(worker.id));
    c.on('setup', (s: cluster.ClusterSettings) => void s);
    c.disconnect(() => {});
} else {
    cluster.default.worker?.disconnect();
}

const isWorker = (x: unknown): x is cluster.Worker => x instanceof cluster.Worker;
void isWorker;

export {};
