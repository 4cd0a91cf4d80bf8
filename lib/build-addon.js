'use strict';
// npm's install step. In a copy of cluster-rs installed from the registry or
// a tarball, builds the native addon from the Rust sources the package
// carries, unless an addon is there already (built before, or from a
// per-platform package). In a git checkout `prepare` builds it instead, with
// @napi-rs/cli. On Windows cluster-rs is node:cluster and needs none.

const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');

function libc() {
  if (process.platform !== 'linux') return '';
  return process.report.getReport().header.glibcVersionRuntime ? '-gnu' : '-musl';
}

// The platform as napi-rs names it, and the file binding.js looks for.
const triple = `${process.platform}-${process.arch}${libc()}`;
const addon = `cluster-rs.${triple}.node`;

function provided() {
  if (fs.existsSync(path.join(root, addon))) return true;
  try {
    require.resolve(`cluster-rs-${triple}`, { paths: [root] });
    return true;
  } catch {
    return false;
  }
}

function main() {
  if (process.platform === 'win32') return 0;
  if (fs.existsSync(path.join(root, '.git'))) return 0;
  if (provided()) return 0;

  const ownTarget = process.env.CARGO_TARGET_DIR === undefined;
  const target = ownTarget ? path.join(root, 'target') : path.resolve(process.env.CARGO_TARGET_DIR);
  console.error(`cluster-rs: building the native addon (${addon}) from source; this takes a minute`);
  const build = spawnSync('cargo', ['build', '--release', '--lib', '--locked'], { cwd: root, stdio: 'inherit' });
  if (build.error || build.status !== 0) {
    console.error('cluster-rs: could not build the native addon. It needs Rust (cargo): install it from ' +
                  'https://rustup.rs, then run `npm rebuild cluster-rs`.' +
                  (build.error ? ` (${build.error.message})` : ''));
    return 1;
  }
  const built = path.join(target, 'release', process.platform === 'darwin' ? 'libcluster_rs.dylib' : 'libcluster_rs.so');
  fs.copyFileSync(built, path.join(root, addon));
  // The build directory holds hundreds of megabytes nothing needs any more.
  if (ownTarget) fs.rmSync(target, { recursive: true, force: true });
  return 0;
}

process.exitCode = main();
