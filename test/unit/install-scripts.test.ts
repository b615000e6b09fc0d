// `npm ci` must print no warning. npm 11 blocks dependency install scripts unless package.json's allowScripts
// covers them, and warns for every uncovered one: so every installed package with an install script must be
// named there (koffi's only checks that its prebuilt binary loads, else builds from source).
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const INSTALL_SCRIPTS = ['preinstall', 'install', 'postinstall'];

interface Manifest {
  name: string;
  version: string;
  scripts?: Record<string, string>;
  allowScripts?: Record<string, boolean>;
}

const readManifest = (dir: string): Manifest => JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as Manifest;

/** Every package folder under node_modules, scoped ones and nested node_modules included (depth-bounded). */
function installedPackages(modules: string, depth = 0): string[] {
  if (depth > 6 || !existsSync(modules)) return [];
  const found: string[] = [];
  for (const entry of readdirSync(modules, { withFileTypes: true })) {
    if (entry.name.startsWith('.')) continue;
    const dir = path.join(modules, entry.name);
    if (entry.name.startsWith('@')) {
      for (const scoped of readdirSync(dir)) found.push(path.join(dir, scoped));
    } else {
      found.push(dir);
    }
  }
  return found
    .filter((dir) => existsSync(path.join(dir, 'package.json')))
    .flatMap((dir) => [dir, ...installedPackages(path.join(dir, 'node_modules'), depth + 1)]);
}

describe('npm install scripts', () => {
  it('are all reviewed in package.json allowScripts, so npm ci does not warn', () => {
    const allow = readManifest(ROOT).allowScripts ?? {};
    const packages = installedPackages(path.join(ROOT, 'node_modules'));
    expect(packages.length).toBeGreaterThan(0);
    const withScripts = packages.map(readManifest).filter((m) => INSTALL_SCRIPTS.some((s) => m.scripts?.[s] !== undefined));
    expect(withScripts.map((m) => m.name)).toContain('koffi');
    const uncovered = withScripts.filter((m) => allow[m.name] === undefined && allow[`${m.name}@${m.version}`] === undefined);
    expect(uncovered.map((m) => `${m.name}@${m.version}`)).toEqual([]);
  });
});
