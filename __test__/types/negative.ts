// Every statement below must be rejected by the compiler. Each offending line
// is preceded by an expect-error marker comment; __test__/types.test.js
// asserts that each marked line gets at least one diagnostic and that no other
// line gets any (so a typo cannot make the file "fail" for the wrong reason).
//
// Note: `fork(42)` is NOT here on purpose: like Node's `fork(env?: any)`, ours
// accepts any env.

import cluster from 'cluster-rs';
import { Worker } from 'cluster-rs';
// expect-error: no such export
import { notAnExport } from 'cluster-rs';

// expect-error: restart is boolean | RestartOptions
cluster.setupPrimary({ restart: 'yes' });
// expect-error: restart.delay is a number
cluster.setupPrimary({ restart: { delay: '1s' } });
// expect-error: unknown restart option
cluster.setupPrimary({ restart: { retries: 3 } });
// expect-error: not a signal name
cluster.setupPrimary({ shutdownOn: ['SIGFOO'] });
// expect-error: shutdownOn takes signal names, not numbers
cluster.setupPrimary({ shutdownOn: [15] });
// expect-error: reloadOn takes signal names
cluster.setupPrimary({ reloadOn: 'HUP' });
// expect-error: waitReady is a boolean
cluster.setupPrimary({ waitReady: 1 });
// expect-error: shutdownTimeout is a number
cluster.setupMaster({ shutdownTimeout: '10s' });
// expect-error: Node's settings stay typed too
cluster.setupPrimary({ exec: 42 });
// expect-error: unknown setting
cluster.setupPrimary({ restartDelay: 100 });
// expect-error: timeout is a number
void cluster.shutdown({ timeout: '5s' });
// expect-error: unknown shutdown option
void cluster.shutdown({ force: true });
// expect-error: shutdown takes an options object
void cluster.shutdown(5000);
// expect-error: reload takes no arguments
void cluster.reload(true);
// expect-error: reload returns a Promise
const n: number = cluster.reload();
// expect-error: giveup info has no such field
cluster.on('giveup', (info) => info.nope);
// expect-error: read-only
cluster.isPrimary = false;
// expect-error: read-only
cluster.settings = {};
// expect-error: send needs a message
cluster.fork().send();
// expect-error: not a Worker
const w: Worker = {};
// expect-error: no such export
cluster.notAFunction();

void [n, w, notAnExport];
export {};
