'use strict';
// Preload for the Node test-suite runner (see run.js in this folder).
//
// Makes `require('cluster')` / `require('node:cluster')` return cluster-rs
// instead of Node's built-in module. The module used is the one named by
// CLUSTER_RS_MODULE (a package directory or a file); by default the
// repository root. Requires made from inside that package are left alone so
// the facade itself can still reach the real built-in.
//
// Load it with `--require <abs path>` and also put `--require <abs path>` in
// NODE_OPTIONS so every descendant process (workers, grandchildren) gets it.

const Module = require('module');
const path = require('path');
const fs = require('fs');

const HOOKED = Symbol.for('cluster-rs.node-suite.redirect');

if (!Module[HOOKED]) {
  const target = path.resolve(
    process.env.CLUSTER_RS_MODULE || path.resolve(__dirname, '..', '..'));

  let targetDir = target;
  try {
    if (!fs.statSync(target).isDirectory()) targetDir = path.dirname(target);
  } catch {
    // Not on disk as given (e.g. no extension); treat as a file path.
    targetDir = path.dirname(target);
  }
  const realDir = (() => {
    try { return fs.realpathSync(targetDir); } catch { return targetDir; }
  })();
  const prefixes = [...new Set([targetDir, realDir])].map((d) => d + path.sep);

  function insideTarget(filename) {
    if (typeof filename !== 'string') return false;
    return prefixes.some((p) => filename.startsWith(p));
  }

  const originalLoad = Module._load;
  Module[HOOKED] = true;
  Module._load = function clusterRsRedirectLoad(request, parent, isMain) {
    if ((request === 'cluster' || request === 'node:cluster') &&
        !insideTarget(parent && parent.filename)) {
      return originalLoad.call(this, target, parent, isMain);
    }
    return originalLoad.apply(this, arguments);
  };
}
