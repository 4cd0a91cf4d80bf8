'use strict';
// Loads the compiled addon (the generated `binding.js` picks the right
// `.node` file for this platform) with an error that says how to build it.

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

module.exports = binding;
