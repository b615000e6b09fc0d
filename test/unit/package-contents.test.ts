// What `npm pack` of the root package ships: the daemon only. The test front-end and the load generator live
// in the bench/ workspace package and must neither be packed nor be imported by the daemon.
// Needs `npm run build` first (npm test does it): the package's files are the compiled dist/.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

interface PackReport {
  name: string;
  files: { path: string }[];
}

function packedFiles(): string[] {
  const stdout = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
  const reports = JSON.parse(stdout) as PackReport[];
  expect(reports.map((r) => r.name)).toEqual(['vublk']);
  return reports[0]!.files.map((f) => f.path);
}

function sourceFiles(dir: string): string[] {
  return readdirSync(path.join(ROOT, dir), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => path.join(dir, f));
}

describe('the vublk npm package', () => {
  it('ships the compiled daemon and no front-end or benchmark code', () => {
    const files = packedFiles();
    expect(files).toContain('dist/src/cli.js');
    expect(files).toContain('package.json');
    const stray = files.filter((f) => !/^dist\/(src|protocol)\//.test(f) && !['package.json', 'README.md', 'LICENSE'].includes(f));
    expect(stray).toEqual([]);
    const benchCode = files.filter((f) => /(^|\/)(bench|frontend|loadgen)(\/|$)/.test(f) || f.startsWith('bench/'));
    expect(benchCode).toEqual([]);
  });

  it('has a daemon that imports nothing outside src/ and protocol/ (never the bench/ workspace)', () => {
    const offenders: string[] = [];
    for (const file of [...sourceFiles('src'), ...sourceFiles('protocol')]) {
      const text = readFileSync(path.join(ROOT, file), 'utf8');
      for (const match of text.matchAll(/(?:from\s+|import\s*\(\s*)'(\.[^']+)'/g)) {
        const target = path.relative(ROOT, path.resolve(ROOT, path.dirname(file), match[1]!));
        if (!/^(src|protocol)\//.test(target)) offenders.push(`${file} → ${match[1]}`);
      }
      if (/from\s+'@vublk\/bench/.test(text)) offenders.push(`${file} → @vublk/bench`);
    }
    expect(offenders).toEqual([]);
  });
});
