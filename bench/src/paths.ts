/**
 * Where the two programs live. The bench package compiles to bench/dist/bench/src/ (its tsconfig's rootDir is the
 * repository, because it imports the daemon's protocol/ and src/sys/ sources), while tests run it from bench/src/:
 * so the paths are found from the package root, not by counting `..` from this file.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const BENCH_PACKAGE = '@vublk/bench';

function findBenchRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let depth = 0; depth < 8; depth++) {
    const manifest = path.join(dir, 'package.json');
    if (existsSync(manifest) && (JSON.parse(readFileSync(manifest, 'utf8')) as { name?: unknown }).name === BENCH_PACKAGE) return dir;
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  throw new Error(`cannot find the ${BENCH_PACKAGE} package above ${fileURLToPath(import.meta.url)}`);
}

/** The bench package's folder (bench/ in the repository). */
export const BENCH_ROOT = findBenchRoot();
/** The repository root: the vublk daemon package. */
export const REPO_ROOT = path.dirname(BENCH_ROOT);
/** The compiled daemon (`npm run build` at the root). */
export const DAEMON_CLI = path.join(REPO_ROOT, 'dist/src/cli.js');
/** The compiled `vublk-bench` command. */
export const BENCH_CLI = path.join(BENCH_ROOT, 'dist/bench/src/cli.js');
