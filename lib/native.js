'use strict';
// Loads the compiled addon, with an error that says how to build it.
//
// The file is opened directly when its path is known: in a worker, the file
// its primary loaded (ENV.ADDON: the same build on both ends); elsewhere, the
// one `npm install` builds into the package directory. Otherwise (an addon
// from a per-platform package, musl, a moved file) the generated `binding.js`
// detects the platform and finds it. That loader compiles and runs about
// 37 KB of JavaScript: opening the file directly takes 0.6 ms against 3.2 ms
// here, and a primary's `require('cluster-rs')` 10.9 ms against 12.7 ms.

const path = require('node:path');
const { ENV } = require('./protocol.js');

// The name napi-rs gives the build for this platform (glibc on Linux).
const BUILT_HERE = path.join(__dirname, '..',
                             `cluster-rs.${process.platform}-${process.arch}${process.platform === 'linux' ? '-gnu' : ''}.node`);

function open(file) {
  const module = { exports: {} };
  // process.dlopen skips require's resolution of an absolute path.
  process.dlopen(module, file);
  return { binding: module.exports, file };
}

// The addon and the file it came from (for this process's workers).
function load() {
  for (const file of [process.env[ENV.ADDON], BUILT_HERE]) {
    if (!file) continue;
    try {
      return open(file);
    } catch (err) {
      // Addons are off (--no-addons, or --experimental-permission without
      // --allow-addons): no other file would load either. Node's own error.
      if (err.code === 'ERR_DLOPEN_DISABLED') throw err;
      // Moved or removed since the primary started, not built here, or
      // built for another libc: detect as usual.
    }
  }
  let binding;
  try {
    binding = require('../binding.js');
  } catch (err) {
    const e = new Error('cluster-rs: the native addon is not built for this platform ' +
                        `(${process.platform}-${process.arch}). Run \`npm rebuild cluster-rs\` in your app ` +
                        '(or `npm install` in a checkout of cluster-rs): it builds the addon from source, ' +
                        'which needs Rust (https://rustup.rs).', { cause: err });
    e.code = 'ERR_CLUSTER_RS_NO_ADDON';
    throw e;
  }
  const file = Object.keys(require.cache).find((f) => f.endsWith('.node') && require.cache[f].exports === binding);
  return { binding, file };
}

const { binding, file } = load();

module.exports = binding;
module.exports.addonFile = file;
