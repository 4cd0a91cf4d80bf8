// node:cluster used through `import * as`. With @types/node the namespace
// carries the cluster object as `.default` (no `fork` etc. at top level) and
// the Worker class as `.Worker`. Twin-checked against cluster-rs like
// app-node.ts; keep the specifier exactly 'node:cluster'.

import * as cluster from 'node:cluster';

const c: cluster.Cluster = cluster.default;
const settings: cluster.ClusterSettings = { exec: 'worker.js', inspectPort: () => 9229 };

if (c.isPrimary) {
    c.setupPrimary(settings);
    const w: cluster.Worker = c.fork({ ROLE: 'web' });
    w.on('listening', (address: cluster.Address) => console.log(address.port));
    c.on('exit', (worker: cluster.Worker, code: number) => {
        if (code !== 0) cluster.default.fork();
        console.log(worker instanceof cluster.Worker);
    });
    for (const worker of Object.values(cluster.default.workers ?? {})) worker?.kill();
} else {
    cluster.default.worker?.send({ hello: 'primary' });
}

class MyWorker extends cluster.Worker {}
void MyWorker;

export {};
