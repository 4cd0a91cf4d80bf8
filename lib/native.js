'use strict';
// Loads the compiled addon (the generated `binding.js` picks the right
// `.node` file for this platform) with an error that says how to build it.
// A worker is told the file its primary loaded (env.ADDON) and loads that one
// directly: the same build on both ends, without the platform detection,
// which costs a worker about a millisecond and a half of its start-up.

const env = require('./env.js');

function load() {
  const file = process.env[env.ADDON];
  if (file) {
    try {
      return require(file);
    } catch {
      // Moved or removed since the primary started: detect as usual.
    }
  }
  try {
    return require('../binding.js');
  } catch (err) {
    const e = new Error('cluster-rs: the native addon is not built for this platform ' +
                        `(${process.platform}-${process.arch}). Run \`npm install\` in the package ` +
                        'directory (it needs Rust) or install a published build.', { cause: err });
    e.code = 'ERR_CLUSTER_RS_NO_ADDON';
    throw e;
  }
}

const binding = load();

// The file the addon came from, for this process's workers.
function addonFile() {
  for (const [file, mod] of Object.entries(require.cache)) {
    if (mod && mod.exports === binding && file.endsWith('.node')) return file;
  }
  return undefined;
}

module.exports = binding;
module.exports.addonFile = addonFile;
