// cluster-rs specific API: extra settings, shutdown(), reload(), the 'giveup'
// event, and the import styles that only cluster-rs supports (named imports of
// the cluster functions/flags, `.fork` etc. directly on `import * as` and
// `import x = require(...)`). Type-checked as CommonJS and as ESM.

import cluster from 'cluster-rs';
import { fork, isPrimary, isWorker, setupPrimary, shutdown, reload, Worker, SCHED_RR } from 'cluster-rs';
import type { Cluster, ClusterRsSettings, ClusterSettings, GiveUpInfo, RestartOptions, ShutdownOptions } from 'cluster-rs';
import * as ns from 'cluster-rs';
import req = require('cluster-rs');
import type { Cluster as NodeCluster, ClusterSettings as NodeClusterSettings, Worker as NodeWorker } from 'node:cluster';

// The cluster-rs object is a Node Cluster; Node's types are ours.
const asNode: NodeCluster = cluster;
const sameWorker: NodeWorker = fork();
const backWorker: Worker = sameWorker;
const nodeSettings: NodeClusterSettings = cluster.settings;
const ourBase: ClusterSettings = nodeSettings;
void [asNode, backWorker, ourBase];

const restart: RestartOptions = { delay: 100, maxDelay: 30_000, minUptime: 5_000, maxRestarts: 10 };
const settings: ClusterRsSettings = {
    exec: 'server.js',
    args: ['--port', '8080'],
    inspectPort: () => 9229,
    serialization: 'json',
    restart,
    shutdownOn: ['SIGTERM', 'SIGINT'],
    reloadOn: 'SIGHUP',
    waitReady: true,
    shutdownTimeout: 10_000,
};

if (isPrimary) {
    setupPrimary(settings);
    cluster.setupPrimary({ restart: true });
    cluster.setupPrimary({ restart: false, reloadOn: ['SIGHUP', 'SIGUSR2'] });
    cluster.setupPrimary({ restart: {} });
    cluster.setupMaster({ restart: { maxRestarts: 3 }, waitReady: false });
    cluster.schedulingPolicy = SCHED_RR;

    // Settings read back keep the extension fields.
    const r = cluster.settings.restart;
    if (typeof r === 'object') {
        const max: number | undefined = r.maxRestarts;
        void max;
    }
    const signals: NodeJS.Signals | NodeJS.Signals[] | undefined = cluster.settings.shutdownOn;
    cluster.setupPrimary({ shutdownOn: 'SIGTERM' });
    const timeout: number | undefined = cluster.settings.shutdownTimeout;
    void [signals, timeout];

    // 'setup' hands over the full cluster-rs settings.
    cluster.on('setup', (s) => void s.waitReady);

    // 'giveup', contextually typed, on every registration method.
    cluster.on('giveup', (info) => {
        const id: number = info.id;
        const restarts: number = info.restarts;
        const code: number | null = info.code;
        const signal: string | null = info.signal;
        void [id, restarts, code, signal];
        // @ts-expect-error -- not a GiveUpInfo field
        void info.reason;
    });
    cluster.once('giveup', (info: GiveUpInfo) => void info.restarts);
    cluster.addListener('giveup', (info) => void info.code);
    cluster.prependListener('giveup', (info) => void info.signal);
    cluster.prependOnceListener('giveup', (info) => void info.id);
    cluster.emit('giveup', { id: 1, restarts: 10, code: 1, signal: null });
    // Node's events are untouched.
    cluster.on('exit', (worker, code, signal) => void [worker.id, code.toFixed(), signal.length]);

    // Chaining keeps the cluster-rs type.
    const chained: Promise<void> = cluster.on('giveup', () => {}).on('exit', () => {}).shutdown();
    void chained;

    // shutdown / reload
    const opts: ShutdownOptions = { timeout: 5_000 };
    const done: Promise<void> = cluster.shutdown(opts);
    void done;
    void cluster.shutdown();
    void cluster.shutdown({});
    void shutdown({ timeout: 1 });
    void reload().then(() => console.log('reloaded'));
    void cluster.reload();

    // Like Node, fork() takes any env value.
    fork({ PORT: '8080' });
} else if (isWorker) {
    cluster.worker?.send({ ready: true });
}

// `import * as` and `import = require` see the cluster object directly as well
// as Node's `.default` view.
void ns.shutdown();
void ns.default.reload();
const nsWorker: ns.Worker | undefined = ns.worker;
void nsWorker;
const nsCluster: ns.Cluster = ns.default;
void nsCluster;
void req.reload();
req.default.setupPrimary({ waitReady: true });
const reqSettings: req.ClusterRsSettings = req.settings;
void reqSettings;
console.log(ns.Worker === req.Worker, req.isPrimary);

// A function written against cluster-rs's Cluster type.
async function stopAll(c: Cluster): Promise<void> {
    await c.shutdown({ timeout: 1_000 });
}
void stopAll(cluster);

class MyWorker extends Worker {}
void MyWorker;

export {};
