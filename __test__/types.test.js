'use strict';

// Type-level tests for index.d.ts, run with the TypeScript compiler API.
//
// Sources live in __test__/types/:
//   app-node*.ts    Apps written against `node:cluster`. Each is checked as-is
//                   (so it is known to be valid for @types/node) and as a twin
//                   whose 'node:cluster' specifiers are rewritten to
//                   'cluster-rs' in a temp dir. Both must be error-free.
//   other *.ts      cluster-rs-only usage (extensions, extra import styles);
//                   must be error-free.
//   *.js            JavaScript consumers, checked with checkJs; error-free.
//   negative*.ts    Must fail: the line after each expect-error marker comment
//                   needs at least one diagnostic, and no other line may have one.
//
// Each check runs under several module setups: CommonJS (with and without
// esModuleInterop) and NodeNext (ESM .mts and CommonJS .cts copies, with and
// without esModuleInterop). 'cluster-rs' resolves to <repo>/index.d.ts via
// `paths`, plus one NodeNext run that resolves it like a real install would
// (node_modules/cluster-rs -> repo, through package.json "types").
//
// Needs the `typescript` (5.x or 6.x) and `@types/node` (20.x) packages, from
// the repo's node_modules or NODE_PATH; CLUSTER_RS_TYPES_NODE_MODULES=<dir>
// makes a given node_modules directory take precedence. Without them the
// tests are skipped, loudly.

const { test } = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..');
const DTS = path.join(REPO, 'index.d.ts');
const SRC_DIR = path.join(__dirname, 'types');
const NODE_SPECIFIER = /(['"])node:cluster\1/g;
const MARKER = '// expect-error:';

function loadToolchain() {
  const override = process.env.CLUSTER_RS_TYPES_NODE_MODULES;
  const resolve = (request) => require.resolve(request, { paths: override ? [override, __dirname] : [__dirname] });
  let ts;
  let typesNodeDir;
  try {
    ts = require(resolve('typescript'));
  } catch {
    return { skip: 'typescript is not installed: add the devDependency (npm i -D typescript@5) or put a node_modules containing it on NODE_PATH' };
  }
  try {
    typesNodeDir = path.dirname(resolve('@types/node/package.json'));
  } catch {
    return { skip: '@types/node is not installed: add the devDependency (npm i -D @types/node@20) or put a node_modules containing it on NODE_PATH' };
  }
  const typesNodeVersion = JSON.parse(fs.readFileSync(path.join(typesNodeDir, 'package.json'), 'utf8')).version;
  if (typeof ts.createProgram !== 'function') {
    return { skip: `typescript ${ts.version} has no compiler API (createProgram); use typescript 5.x or 6.x` };
  }
  return { ts, typesNodeDir, typesNodeVersion };
}

const toolchain = loadToolchain();
const skip = toolchain.skip || false;

function listSources() {
  const files = fs.readdirSync(SRC_DIR).sort();
  const pick = (re) => files.filter((f) => re.test(f));
  return {
    nodeApps: pick(/^app-node.*\.ts$/),
    rsApps: pick(/\.ts$/).filter((f) => !/^app-node/.test(f) && !/^negative/.test(f)),
    jsApps: pick(/\.js$/),
    negatives: pick(/^negative.*\.ts$/),
  };
}

function makeTwin(name, text) {
  const twin = text.replace(NODE_SPECIFIER, "'cluster-rs'");
  assert.notStrictEqual(twin, text, `${name}: no 'node:cluster' specifier to rewrite`);
  return twin;
}

// Parsed declaration files (lib.*.d.ts, @types/node) are shared between the
// programs of the different configurations; that roughly halves the run time.
const sourceFileCache = new Map();

function createHost(ts, options) {
  const host = ts.createCompilerHost(options, true);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (fileName, languageVersionOrOptions, onError, shouldCreate) => {
    if (!fileName.endsWith('.d.ts') || fileName === DTS) {
      return getSourceFile(fileName, languageVersionOrOptions, onError, shouldCreate);
    }
    const lv = languageVersionOrOptions;
    const key = typeof lv === 'object' ? `${fileName}|${lv.languageVersion}|${lv.impliedNodeFormat}` : `${fileName}|${lv}`;
    let sf = sourceFileCache.get(key);
    if (!sf) {
      sf = getSourceFile(fileName, languageVersionOrOptions, onError, shouldCreate);
      if (sf) sourceFileCache.set(key, sf);
    }
    return sf;
  };
  return host;
}

function configs(ts) {
  const cjs = { module: ts.ModuleKind.CommonJS, moduleResolution: ts.ModuleResolutionKind.Node10 };
  const nodenext = { module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext };
  return [
    { name: 'commonjs', tsExts: ['.ts'], jsExt: '.js', options: { ...cjs, esModuleInterop: false } },
    { name: 'commonjs + esModuleInterop + exactOptionalPropertyTypes', tsExts: ['.ts'], jsExt: '.js', options: { ...cjs, esModuleInterop: true, exactOptionalPropertyTypes: true } },
    { name: 'nodenext (.mts ESM + .cts CJS)', tsExts: ['.mts', '.cts'], jsExt: '.cjs', options: { ...nodenext } },
    { name: 'nodenext, esModuleInterop: false', tsExts: ['.mts', '.cts'], jsExt: '.cjs', options: { ...nodenext, esModuleInterop: false } },
    { name: 'nodenext via package.json "types"', tsExts: ['.mts', '.cts'], jsExt: '.cjs', options: { ...nodenext }, viaPackage: true },
  ];
}

// Writes the sources for one configuration into `dir` and returns
// [{ file, label, kind: 'pass' | 'fail', text }].
function stage(dir, cfg, sources) {
  const out = [];
  const put = (base, ext, text, label, kind) => {
    const file = path.join(dir, base + ext);
    fs.writeFileSync(file, text);
    out.push({ file, label: `${label} as ${ext}`, kind, text });
  };
  for (const name of sources.nodeApps) {
    const text = fs.readFileSync(path.join(SRC_DIR, name), 'utf8');
    const base = path.basename(name, '.ts');
    for (const ext of cfg.tsExts) {
      put(`${base}.node`, ext, text, `${name} (node:cluster)`, 'pass');
      put(`${base}.rs`, ext, makeTwin(name, text), `${name} (twin, cluster-rs)`, 'pass');
    }
  }
  for (const name of sources.rsApps) {
    const text = fs.readFileSync(path.join(SRC_DIR, name), 'utf8');
    for (const ext of cfg.tsExts) put(path.basename(name, '.ts'), ext, text, name, 'pass');
  }
  for (const name of sources.jsApps) {
    const text = fs.readFileSync(path.join(SRC_DIR, name), 'utf8');
    put(path.basename(name, '.js'), cfg.jsExt, text, name, 'pass');
  }
  for (const name of sources.negatives) {
    const text = fs.readFileSync(path.join(SRC_DIR, name), 'utf8');
    for (const ext of cfg.tsExts) put(path.basename(name, '.ts'), ext, text, name, 'fail');
  }
  return out;
}

function check(cfg, sources) {
  const { ts, typesNodeDir } = toolchain;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cluster-rs-types-'));
  try {
    const staged = stage(dir, cfg, sources);
    let paths = { 'cluster-rs': [DTS] };
    if (cfg.viaPackage) {
      // Resolve like an installed dependency instead of through `paths`.
      fs.mkdirSync(path.join(dir, 'node_modules'));
      fs.symlinkSync(REPO, path.join(dir, 'node_modules', 'cluster-rs'), 'junction');
      paths = undefined;
    }
    const options = {
      strict: true,
      noEmit: true,
      skipLibCheck: false, // index.d.ts itself must be checked
      target: ts.ScriptTarget.ES2022,
      lib: ['lib.es2022.d.ts'],
      types: ['node'],
      typeRoots: [path.dirname(typesNodeDir)],
      paths,
      allowJs: true,
      checkJs: true,
      forceConsistentCasingInFileNames: true,
      ...cfg.options,
    };
    // TypeScript 6 flags esModuleInterop: false and moduleResolution: node10 as
    // deprecated; both are still worth covering while they work.
    if (Number(ts.versionMajorMinor.split('.')[0]) === 6) options.ignoreDeprecations = '6.0';
    if (!options.paths) delete options.paths;
    const program = ts.createProgram({
      rootNames: staged.map((s) => s.file),
      options,
      host: createHost(ts, options),
    });

    const resolved = program.getSourceFile(DTS);
    assert.ok(resolved, `'cluster-rs' did not resolve to ${DTS}`);

    const byFile = new Map();
    const stray = [];
    for (const d of ts.getPreEmitDiagnostics(program)) {
      const fileName = d.file && path.resolve(d.file.fileName);
      const entry = fileName && staged.find((s) => s.file === fileName);
      if (entry) {
        if (!byFile.has(entry)) byFile.set(entry, []);
        byFile.get(entry).push(d);
      } else {
        stray.push(d);
      }
    }

    const fmtHost = {
      getCanonicalFileName: (f) => f,
      getCurrentDirectory: () => dir,
      getNewLine: () => '\n',
    };
    const fmt = (ds) => ts.formatDiagnostics(ds, fmtHost);
    const problems = [];
    if (stray.length) problems.push(`diagnostics outside the test sources (index.d.ts, @types/node or options):\n${fmt(stray)}`);

    for (const entry of staged) {
      const ds = byFile.get(entry) || [];
      if (entry.kind === 'pass') {
        if (ds.length) problems.push(`${entry.label} must type-check:\n${fmt(ds)}`);
        continue;
      }
      const lines = entry.text.split('\n');
      const expected = new Set();
      lines.forEach((l, i) => {
        if (l.trim().startsWith(MARKER)) expected.add(i + 1);
      });
      assert.ok(expected.size > 0, `${entry.label}: no '${MARKER}' markers`);
      const actual = new Map();
      for (const d of ds) {
        const line = d.file.getLineAndCharacterOfPosition(d.start).line;
        if (!actual.has(line)) actual.set(line, []);
        actual.get(line).push(d);
      }
      for (const line of expected) {
        if (!actual.has(line)) {
          problems.push(`${entry.label}:${line + 1}: expected a type error, got none: ${lines[line].trim()}\n  (${lines[line - 1].trim()})`);
        }
      }
      for (const [line, lds] of actual) {
        if (!expected.has(line)) problems.push(`${entry.label}:${line + 1}: unexpected error:\n${fmt(lds)}`);
      }
    }
    assert.ok(problems.length === 0, problems.join('\n'));
    return staged.length;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('index.d.ts type tests', { skip }, async (t) => {
  const { ts, typesNodeVersion } = toolchain;
  t.diagnostic(`typescript ${ts.version}, @types/node ${typesNodeVersion}`);
  if (!/^20\./.test(typesNodeVersion)) {
    t.diagnostic(`warning: these tests target @types/node 20.x, found ${typesNodeVersion}`);
  }
  const sources = listSources();
  assert.ok(sources.nodeApps.length > 0 && sources.negatives.length > 0, `no type test sources in ${SRC_DIR}`);

  for (const cfg of configs(ts)) {
    await t.test(cfg.name, () => {
      check(cfg, sources);
    });
  }
});
