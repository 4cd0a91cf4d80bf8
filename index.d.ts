// Type declarations for cluster-rs.
//
// cluster-rs is a drop-in replacement for `node:cluster`. Rather than restating
// Node's cluster API, these declarations alias the types that @types/node ships
// for `node:cluster` (Worker, Address, ClusterSettings, Cluster), so code that
// type-checks against `node:cluster` type-checks against `cluster-rs` after
// swapping the module specifier. On top of that come the cluster-rs additions:
// extra settings (ClusterRsSettings), shutdown(), reload() and the 'giveup'
// event.
//
// `require('cluster-rs')` returns the cluster object itself (index.js); ESM
// imports get that object as the default export and its members by name
// (Node's CommonJS interop, from the names index.js lists). The package is
// CommonJS-format for TypeScript (no "type": "module"), so the declaration
// is `export =`, which TypeScript maps correctly for both
// CommonJS and ESM (nodenext) consumers. An ES-style `export default` would
// break `import cluster from 'cluster-rs'` in ESM under nodenext, where the
// default import of a CommonJS module is the whole `module.exports`.
// The one declaration serves every import style:
//
//   import cluster from 'cluster-rs';              // CJS or ESM (nodenext)
//   import * as cluster from 'cluster-rs';         // cluster.default / cluster.Worker
//   import { fork, isPrimary, Worker } from 'cluster-rs';
//   import cluster = require('cluster-rs');
//   const cluster = require('cluster-rs');

/// <reference types="node" />

import * as nodeCluster from "node:cluster";
import type { Server, Socket } from "node:net";

declare namespace cluster {
    // Node's own declarations, re-exported unchanged. (The Worker class value
    // lives on the exported object below; this namespace must stay type-only
    // so that it can merge with the `cluster` constant.)
    type Worker = nodeCluster.Worker;
    type Address = nodeCluster.Address;
    type ClusterSettings = nodeCluster.ClusterSettings;

    /** Automatic restart policy for workers that exit unexpectedly. */
    interface RestartOptions {
        /** Delay in ms before a restart; doubles after each quick failure. Default 100. */
        delay?: number | undefined;
        /** Upper bound in ms for the growing delay. Default 15000. */
        maxDelay?: number | undefined;
        /** A worker that lived at least this many ms resets the backoff. Default 1000. */
        minUptime?: number | undefined;
        /** Restarts after quick failures in a row; the next quick failure gives the slot up (see 'giveup'). Default 16. */
        maxRestarts?: number | undefined;
    }

    /** `ClusterSettings` from Node plus the options understood only by cluster-rs. */
    interface ClusterRsSettings extends ClusterSettings {
        /** Restart workers that die unexpectedly; `true` uses the default policy. */
        restart?: boolean | RestartOptions | undefined;
        /** Signals that make the primary shut the cluster down gracefully. */
        shutdownOn?: NodeJS.Signals | NodeJS.Signals[] | undefined;
        /** Signal(s) that trigger a rolling reload of all workers. */
        reloadOn?: NodeJS.Signals | NodeJS.Signals[] | undefined;
        /** During reload(), a replacement is ready when it sends `process.send('ready')`, not when it listens. */
        waitReady?: boolean | undefined;
        /** Time in ms a reload() replacement has to become ready. Default 30000. */
        readyTimeout?: number | undefined;
        /** Time in ms granted to workers to exit during shutdown (and reload) before SIGKILL. Default 5000. */
        shutdownTimeout?: number | undefined;
    }

    interface ShutdownOptions {
        /** Overrides `settings.shutdownTimeout` for this call (ms). */
        timeout?: number | undefined;
    }

    /** Payload of the 'giveup' event: a worker slot that will no longer be restarted. */
    interface GiveUpInfo {
        id: number;
        restarts: number;
        code: number | null;
        signal: string | null;
    }

    /**
     * The cluster object. It is a `Cluster` in Node's sense (and assignable to
     * Node's `Cluster` type) with the cluster-rs settings and methods added.
     *
     * The event-method overloads are listed again here because an interface
     * member replaces, rather than extends, the inherited overload set; the
     * Node event signatures are kept as-is and 'giveup' is appended.
     */
    interface Cluster extends nodeCluster.Cluster {
        readonly settings: ClusterRsSettings;
        setupPrimary(settings?: ClusterRsSettings): void;
        /** Deprecated alias of `setupPrimary`, as in Node. */
        setupMaster(settings?: ClusterRsSettings): void;

        /**
         * cluster-rs only (value 3): every worker listens on its own SO_REUSEPORT
         * socket and the kernel balances connections by hash. Linux; elsewhere
         * it acts as SCHED_NONE.
         */
        readonly SCHED_REUSEPORT: number;

        /** Gracefully stop all workers; resolves once they have all exited. */
        shutdown(options?: ShutdownOptions): Promise<void>;
        /**
         * Replace all workers one by one without dropping service; resolves when done.
         * Called during a reload, it resolves after one more reload that follows it.
         */
        reload(): Promise<void>;

        addListener(event: string, listener: (...args: any[]) => void): this;
        addListener(event: "disconnect", listener: (worker: Worker) => void): this;
        addListener(event: "exit", listener: (worker: Worker, code: number, signal: string) => void): this;
        addListener(event: "fork", listener: (worker: Worker) => void): this;
        addListener(event: "listening", listener: (worker: Worker, address: Address) => void): this;
        addListener(event: "message", listener: (worker: Worker, message: any, handle: Socket | Server) => void): this;
        addListener(event: "online", listener: (worker: Worker) => void): this;
        addListener(event: "setup", listener: (settings: ClusterRsSettings) => void): this;
        addListener(event: "giveup", listener: (info: GiveUpInfo) => void): this;

        emit(event: string | symbol, ...args: any[]): boolean;
        emit(event: "disconnect", worker: Worker): boolean;
        emit(event: "exit", worker: Worker, code: number, signal: string): boolean;
        emit(event: "fork", worker: Worker): boolean;
        emit(event: "listening", worker: Worker, address: Address): boolean;
        emit(event: "message", worker: Worker, message: any, handle: Socket | Server): boolean;
        emit(event: "online", worker: Worker): boolean;
        emit(event: "setup", settings: ClusterRsSettings): boolean;
        emit(event: "giveup", info: GiveUpInfo): boolean;

        on(event: string, listener: (...args: any[]) => void): this;
        on(event: "disconnect", listener: (worker: Worker) => void): this;
        on(event: "exit", listener: (worker: Worker, code: number, signal: string) => void): this;
        on(event: "fork", listener: (worker: Worker) => void): this;
        on(event: "listening", listener: (worker: Worker, address: Address) => void): this;
        on(event: "message", listener: (worker: Worker, message: any, handle: Socket | Server) => void): this;
        on(event: "online", listener: (worker: Worker) => void): this;
        on(event: "setup", listener: (settings: ClusterRsSettings) => void): this;
        on(event: "giveup", listener: (info: GiveUpInfo) => void): this;

        once(event: string, listener: (...args: any[]) => void): this;
        once(event: "disconnect", listener: (worker: Worker) => void): this;
        once(event: "exit", listener: (worker: Worker, code: number, signal: string) => void): this;
        once(event: "fork", listener: (worker: Worker) => void): this;
        once(event: "listening", listener: (worker: Worker, address: Address) => void): this;
        once(event: "message", listener: (worker: Worker, message: any, handle: Socket | Server) => void): this;
        once(event: "online", listener: (worker: Worker) => void): this;
        once(event: "setup", listener: (settings: ClusterRsSettings) => void): this;
        once(event: "giveup", listener: (info: GiveUpInfo) => void): this;

        prependListener(event: string, listener: (...args: any[]) => void): this;
        prependListener(event: "disconnect", listener: (worker: Worker) => void): this;
        prependListener(event: "exit", listener: (worker: Worker, code: number, signal: string) => void): this;
        prependListener(event: "fork", listener: (worker: Worker) => void): this;
        prependListener(event: "listening", listener: (worker: Worker, address: Address) => void): this;
        prependListener(event: "message", listener: (worker: Worker, message: any, handle: Socket | Server) => void): this;
        prependListener(event: "online", listener: (worker: Worker) => void): this;
        prependListener(event: "setup", listener: (settings: ClusterRsSettings) => void): this;
        prependListener(event: "giveup", listener: (info: GiveUpInfo) => void): this;

        prependOnceListener(event: string, listener: (...args: any[]) => void): this;
        prependOnceListener(event: "disconnect", listener: (worker: Worker) => void): this;
        prependOnceListener(event: "exit", listener: (worker: Worker, code: number, signal: string) => void): this;
        prependOnceListener(event: "fork", listener: (worker: Worker) => void): this;
        prependOnceListener(event: "listening", listener: (worker: Worker, address: Address) => void): this;
        prependOnceListener(event: "message", listener: (worker: Worker, message: any, handle: Socket | Server) => void): this;
        prependOnceListener(event: "online", listener: (worker: Worker) => void): this;
        prependOnceListener(event: "setup", listener: (settings: ClusterRsSettings) => void): this;
        prependOnceListener(event: "giveup", listener: (info: GiveUpInfo) => void): this;
    }
}

// The shape of `module.exports`: the cluster object itself, plus `Worker` (the
// class, so `import { Worker }` yields both the value and the type) and
// `default`. The latter mirrors what @types/node declares for `node:cluster`,
// where `import * as cluster` / `import cluster = require()` code reaches the
// object as `cluster.default` (present at runtime in ESM namespaces and under
// esModuleInterop, as with node:cluster itself).
// Deliberately one interface rather than an intersection: TypeScript builds
// the `import * as` namespace type of a CommonJS module more reliably from it.
interface ClusterExports extends cluster.Cluster {
    readonly Worker: typeof nodeCluster.Worker;
    readonly default: cluster.Cluster;
}

declare const cluster: ClusterExports;

export = cluster;
