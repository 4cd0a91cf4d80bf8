// A plain node:cluster application, typed against @types/node.
//
// __test__/types.test.js type-checks this file as-is (proving it is valid
// against Node's own types) and then a twin in which every 'node:cluster'
// specifier is replaced by 'cluster-rs'. Nothing else may differ, so keep the
// cluster import specifiers exactly 'node:cluster' and use only what
// @types/node allows. Never executed; it only has to type-check.
//
// Must stay valid as CommonJS (.ts/.cts) and as ESM (.mts): no top-level
// await, no relative imports, no default imports of modules other than
// node:cluster (those need esModuleInterop).

import cluster from 'node:cluster';
import { Worker } from 'node:cluster';
import type { Address, Cluster, ClusterSettings } from 'node:cluster';
import * as http from 'node:http';
import * as net from 'node:net';
import * as os from 'node:os';

type Msg =
    | { cmd: 'ready'; pid: number }
    | { cmd: 'stats'; requests: number }
    | { cmd: 'shutdown' };

function isMsg(value: unknown): value is Msg {
    return typeof value === 'object' && value !== null && 'cmd' in value;
}

// ---------------------------------------------------------------------------
// Primary

function startPrimary(c: Cluster): void {
    let nextInspectPort = 9230;
    const settings: ClusterSettings = {
        exec: __filenameLike(),
        args: ['--worker'],
        execArgv: ['--max-old-space-size=256'],
        silent: false,
        stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
        cwd: os.tmpdir(),
        windowsHide: true,
        serialization: 'advanced',
        inspectPort: () => nextInspectPort++,
    };
    if (process.getuid && process.getgid) {
        settings.uid = process.getuid();
        settings.gid = process.getgid();
    }
    c.setupPrimary(settings);
    c.setupPrimary({ inspectPort: 9229 });
    c.setupPrimary();
    c.setupMaster({ exec: 'worker.js' });

    const exec: string | undefined = c.settings.exec;
    const port: number | (() => number) | undefined = c.settings.inspectPort;
    void exec;
    void port;

    c.schedulingPolicy = c.SCHED_RR;
    if (process.platform === 'win32') c.schedulingPolicy = c.SCHED_NONE;
    const policy: number = c.schedulingPolicy;
    void policy;

    const total = Math.max(2, os.availableParallelism());
    const forked: Worker[] = [];
    for (let i = 0; i < total; i++) {
        forked.push(c.fork({ WORKER_INDEX: String(i), NODE_ENV: process.env.NODE_ENV ?? 'production' }));
    }
    const bare: Worker = c.fork();
    forked.push(bare);

    // Cluster events, listeners fully annotated.
    c.on('fork', (worker: Worker) => console.log('forked', worker.id));
    c.on('online', (worker: Worker) => console.log('online', worker.process.pid));
    c.on('listening', (worker: Worker, address: Address) => {
        const kind: 4 | 6 | -1 | 'udp4' | 'udp6' = address.addressType;
        console.log(worker.id, address.address, address.port, kind);
    });
    c.on('disconnect', (worker: Worker) => console.log('disconnect', worker.id));
    c.on('exit', (worker: Worker, code: number, signal: string) => {
        if (!worker.exitedAfterDisconnect) {
            console.log(`worker ${worker.id} died (${signal || code}), restarting`);
            c.fork();
        }
    });
    c.on('message', (worker: Worker, message: any, handle: net.Socket | net.Server) => {
        if (isMsg(message) && message.cmd === 'stats') console.log(worker.id, message.requests);
        if (handle instanceof net.Socket) handle.end();
    });
    c.on('setup', (s: ClusterSettings) => console.log('setup', s.exec));

    // Same events, contextually typed and through the other registration methods.
    c.once('exit', (worker, code, signal) => {
        const n: number = code;
        const s: string = signal;
        const id: number = worker.id;
        void [n, s, id];
    });
    c.addListener('listening', (worker, address) => void [worker.id, address.port]);
    c.prependListener('online', (worker) => void worker.isConnected());
    c.prependOnceListener('setup', (s) => void s.silent);
    c.on('some-custom-event', (...args: any[]) => void args);
    const chained: Cluster = c.on('fork', () => {}).once('online', () => {});
    void chained;
    c.off('fork', () => {});
    c.removeAllListeners('exit');
    const emitted: boolean = c.emit('fork', bare);
    void emitted;

    // Iterating workers.
    const workers = c.workers;
    if (workers) {
        for (const id in workers) {
            const worker = workers[id];
            worker?.send({ cmd: 'shutdown' });
        }
        for (const worker of Object.values(workers)) {
            if (!worker) continue;
            console.log(worker.id, worker.process.pid, worker.isDead(), worker.isConnected());
        }
    }

    // Worker API and worker events.
    for (const worker of forked) {
        worker.on('online', () => console.log('up', worker.id));
        worker.on('listening', (address: Address) => console.log(address.port));
        worker.on('message', (message: any, handle: net.Socket | net.Server) => {
            if (isMsg(message) && message.cmd === 'ready') console.log('ready', message.pid);
            void handle;
        });
        worker.once('disconnect', () => console.log('gone', worker.id));
        worker.on('exit', (code: number, signal: string) => console.log(code, signal));
        worker.on('error', (err: Error) => console.error(err.message));
        worker.prependListener('exit', (code, signal) => void [code.toFixed(), signal.length]);

        const queued: boolean = worker.send({ cmd: 'stats', requests: 0 });
        void queued;
        worker.send('ping', (err: Error | null) => {
            if (err) console.error(err);
        });

        const server = net.createServer();
        worker.send('server', server);
        worker.send('server', server, (err) => void err);
        worker.send('socket', new net.Socket(), { keepOpen: true }, (err: Error | null) => void err);
        worker.send('nothing', undefined, { keepOpen: false });

        if (worker.isDead()) continue;
        if (worker.exitedAfterDisconnect) continue;
        const self: Worker = worker.disconnect();
        void self;
        worker.kill();
        worker.kill('SIGTERM');
        worker.destroy('SIGKILL');
        const isWorkerInstance: boolean = worker instanceof Worker;
        void isWorkerInstance;
    }

    c.disconnect();
    c.disconnect(() => console.log('all workers disconnected'));

    // @ts-expect-error -- isPrimary is read-only, as in Node.
    c.isPrimary = false;
    // @ts-expect-error -- unknown setting.
    c.setupPrimary({ notASetting: true });
    // @ts-expect-error -- send needs a message.
    bare.send();
}

// ---------------------------------------------------------------------------
// Worker

function startWorker(): void {
    const me: Worker | undefined = cluster.worker;
    if (!me) throw new Error('not a worker');
    const myId: number = me.id;

    let requests = 0;
    const server = http.createServer((req, res) => {
        requests++;
        res.end(`worker ${myId} handled ${req.url}\n`);
    });
    server.listen(Number(process.env.PORT ?? 8000));

    process.send?.({ cmd: 'ready', pid: process.pid } satisfies Msg);
    if (process.send) {
        process.send({ cmd: 'stats', requests }, undefined, {}, (err: Error | null) => void err);
    }
    process.on('message', (msg: unknown) => {
        if (isMsg(msg) && msg.cmd === 'shutdown') {
            server.close(() => me.disconnect());
        }
    });
    me.on('disconnect', () => process.exit(0));
    cluster.worker?.on('message', (message: any) => void message);
}

function __filenameLike(): string {
    return process.argv[1] ?? 'app.js';
}

// ---------------------------------------------------------------------------
// Entry

const role: 'primary' | 'worker' = cluster.isPrimary ? 'primary' : 'worker';
if (cluster.isPrimary || cluster.isMaster) {
    startPrimary(cluster);
} else if (cluster.isWorker) {
    startWorker();
}
console.log(role);

// Subclassing Worker stays possible (Worker is a class, not just a type).
class TrackedWorker extends Worker {
    started = Date.now();
}
void TrackedWorker;

export {};
