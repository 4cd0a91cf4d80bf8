'use strict';
// Loads the compiled addon (the generated `binding.js` picks the right
// `.node` file for this platform) with an error that says how to build it.
// A worker is told the file its primary loaded (ENV.ADDON) and loads that one
// directly: the same build on both ends, without the platform detection,
// which costs a worker about a millisecond and a half of its start-up.

const { ENV } = require('./protocol.js');

// The addon and the file it came from (for this process's workers).
function load() {
  const given = process.env[ENV.ADDON];
  if (given) {
    try {
      // process.dlopen skips require's resolution of an absolute path.
      const module = { exports: {} };
      process.dlopen(module, given);
      return { binding: module.exports, file: given };
    } catch {
      // Moved or removed since the primary started: detect as usual.
    }
  }
  let binding;
  try {
    binding = require('../binding.js');
  } catch (err) {
    const e = new Error('cluster-rs: the native addon is not built for this platform ' +
                        `(${process.platform}-${process.arch}). Run \`npm install\` in the package ` +
                        'directory (it needs Rust) or install a published build.', { cause: err });
    e.code = 'ERR_CLUSTER_RS_NO_ADDON';
    throw e;
  }
  const file = Object.keys(require.cache).find((f) => f.endsWith('.node') && require.cache[f].exports === binding);
  return { binding, file };
}

const { binding, file } = load();

module.exports = binding;
module.exports.addonFile = file;
