// ESM entry: the same object as `require('cluster-rs')` as the default export,
// plus named exports like node:cluster's (the union of what its primary and
// worker sides export; a name the current side lacks is undefined).
import { createRequire } from 'node:module';

const cluster = createRequire(import.meta.url)('./index.js');

export default cluster;

export const {
  SCHED_NONE, SCHED_RR, SCHED_REUSEPORT, Worker, isMaster, isPrimary, isWorker,
  fork, disconnect, setupPrimary, setupMaster, workers,
  shutdown, reload,
} = cluster;

// These are reassigned as the cluster runs; keep the bindings live.
export let settings = cluster.settings;
export let schedulingPolicy = cluster.schedulingPolicy;
export let worker = cluster.worker;

function live(name, update) {
  const desc = Object.getOwnPropertyDescriptor(cluster, name);
  if (!desc || !('value' in desc)) return;
  let value = desc.value;
  Object.defineProperty(cluster, name, {
    configurable: true,
    enumerable: true,
    get() { return value; },
    set(v) { value = v; update(v); },
  });
}
live('settings', (v) => { settings = v; });
live('schedulingPolicy', (v) => { schedulingPolicy = v; });
live('worker', (v) => { worker = v; });
