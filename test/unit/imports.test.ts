/**
 * House rules the linter does not check: a module is imported by one statement per file (type and value
 * imports of one module share it), and the daemon's layers only import downwards
 * (protocol ← sys ← backend ← throttle ← dataplane ← device ← control ← metrics ← daemon ← cli).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(import.meta.dirname, '../..');
const SOURCE_DIRS = ['src', 'protocol', 'test', 'bench/src'];

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const entry of fs.readdirSync(d, { withFileTypes: true })) {
      const full = path.join(d, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (/\.(ts|mts)$/.test(entry.name) && !entry.name.endsWith('.d.ts')) out.push(full);
    }
  };
  if (fs.existsSync(dir)) walk(dir);
  return out;
}

/** Module specifiers of every static import statement in a file (re-exports are not imports). */
function importedModules(text: string): string[] {
  const specs: string[] = [];
  for (const match of text.matchAll(/^\s*import\s[^'";]*?\sfrom\s+['"]([^'"]+)['"]/gm)) specs.push(match[1]!);
  for (const match of text.matchAll(/^\s*import\s+['"]([^'"]+)['"]/gm)) specs.push(match[1]!);
  return specs;
}

const LAYERS = [
  'protocol',
  'src/sys',
  'src/backend',
  'src/throttle',
  'src/dataplane',
  'src/device',
  'src/control',
  'src/metrics',
  'src/daemon',
  'src/cli.ts',
];

/** The layer rank of a file of the daemon, or undefined for files outside the layered folders. */
function layerOf(file: string): number | undefined {
  const rel = path.relative(ROOT, file);
  const rank = LAYERS.findIndex((layer) => rel === layer || rel.startsWith(`${layer}/`));
  return rank < 0 ? undefined : rank;
}

describe('imports', () => {
  it('import each module once per file', () => {
    const offenders: string[] = [];
    for (const dir of SOURCE_DIRS) {
      for (const file of sourceFiles(path.join(ROOT, dir))) {
        const seen = new Set<string>();
        for (const spec of importedModules(fs.readFileSync(file, 'utf8'))) {
          if (seen.has(spec)) offenders.push(`${path.relative(ROOT, file)}: ${spec}`);
          seen.add(spec);
        }
      }
    }
    expect(offenders).toEqual([]);
  });

  it('the daemon layers import only downwards', () => {
    const offenders: string[] = [];
    for (const dir of ['src', 'protocol']) {
      for (const file of sourceFiles(path.join(ROOT, dir))) {
        const own = layerOf(file);
        if (own === undefined) continue;
        for (const spec of importedModules(fs.readFileSync(file, 'utf8'))) {
          if (!spec.startsWith('.')) continue;
          const target = layerOf(path.resolve(path.dirname(file), spec).replace(/\.js$/, '.ts'));
          if (target !== undefined && target > own) offenders.push(`${path.relative(ROOT, file)} → ${spec}`);
        }
      }
    }
    expect(offenders).toEqual([]);
  });
});
