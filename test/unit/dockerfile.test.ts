// The Dockerfile cannot be built here (no Docker engine), so its promises are checked against the repository:
// what it copies exists and is in the build context, the npm scripts it runs exist, its entrypoint is the
// package's bin, and its base image is a Node LTS release the package supports.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse as parseYaml } from 'yaml';
import { ROOT, copyParts, jsonArray, readDockerfile } from '../support/dockerfile.js';

const dockerignore = readFileSync(path.join(ROOT, '.dockerignore'), 'utf8');
const pkg = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as {
  bin: Record<string, string>;
  scripts: Record<string, string>;
  engines: { node: string };
};
const tsconfig = JSON.parse(readFileSync(path.join(ROOT, 'tsconfig.json'), 'utf8')) as { compilerOptions: { outDir: string } };

const { of, stages, finalStage, env, healthcheck, defaultConfigSource, cmd } = readDockerfile();

/** .dockerignore semantics that matter here: last matching pattern wins, `!` re-includes, a directory covers its contents. */
function excludedFromContext(file: string): boolean {
  const patterns = dockerignore
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
  const toRegExp = (glob: string): RegExp =>
    new RegExp(
      `^${glob
        .replace(/[.+^${}()|[\]\\]/g, '\\$&')
        .replace(/\*\*/g, '\u0000')
        .replace(/\*/g, '[^/]*')
        .replace(/\?/g, '[^/]')
        .replace(/\u0000/g, '.*')}$`,
    );
  const prefixes = file.split('/').map((_, i, parts) => parts.slice(0, i + 1).join('/'));
  let excluded = false;
  for (const raw of patterns) {
    const negate = raw.startsWith('!');
    const pattern = (negate ? raw.slice(1) : raw).replace(/^\/+|\/+$/g, '');
    if (prefixes.some((p) => toRegExp(pattern).test(p))) excluded = !negate;
  }
  return excluded;
}

describe('Dockerfile', () => {
  it('copies only files that exist in the repository and are in the build context', () => {
    const copies = [...of('COPY'), ...of('ADD')].map((i) => copyParts(i.args)).filter((c) => c.flags['from'] === undefined);
    expect(copies.length).toBeGreaterThan(0);
    for (const { sources } of copies) {
      for (const source of sources) {
        expect(existsSync(path.join(ROOT, source)), `COPY ${source}: missing from the repository`).toBe(true);
        expect(excludedFromContext(source), `COPY ${source}: excluded by .dockerignore`).toBe(false);
      }
    }
  });

  it('leaves the bench/ workspace (test front-end and load generator) out of the image', () => {
    const sources = [...of('COPY'), ...of('ADD')].flatMap((i) => copyParts(i.args).sources);
    for (const source of sources) expect(path.posix.normalize(source).split('/')[0], `COPY ${source}`).not.toBe('bench');
    expect(excludedFromContext('bench/src/frontend/index.ts')).toBe(true);
    expect(excludedFromContext('bench/package.json')).toBe(true);
    // The build stage compiles the daemon alone: `npm run build` would also build the absent workspace.
    const builds = of('RUN').flatMap((i) => [...i.args.matchAll(/npm run(?:-script)?\s+([\w:-]+)/g)].map((m) => m[1]!));
    expect(builds).not.toContain('build');
    expect(pkg.scripts['build:daemon']).toMatch(/tsc -p tsconfig.build.json$/);
  });

  it('copies from a stage that exists, out of the directory the build writes', () => {
    const fromStage = of('COPY')
      .map((i) => copyParts(i.args))
      .filter((c) => c.flags['from'] !== undefined);
    expect(fromStage.length).toBeGreaterThan(0);
    const buildWorkdir = of('WORKDIR').find((i) => i.stage === 0)?.args;
    for (const { flags, sources } of fromStage) {
      expect(stages.map((s) => s.name)).toContain(flags['from']);
      for (const source of sources) expect(source).toBe(path.posix.join(buildWorkdir!, tsconfig.compilerOptions.outDir));
    }
  });

  it('runs only npm scripts that package.json defines, and installs with npm ci', () => {
    const runs = of('RUN').map((i) => i.args);
    const scripts = runs.flatMap((r) => [...r.matchAll(/npm run(?:-script)?\s+([\w:-]+)/g)].map((m) => m[1]!));
    expect(scripts.length).toBeGreaterThan(0);
    for (const script of scripts) expect(Object.keys(pkg.scripts), `npm run ${script}`).toContain(script);
    expect(runs.some((r) => /npm ci\b/.test(r))).toBe(true);
  });

  it('installs the runtime stage without dev dependencies but with optional ones (koffi’s native binary)', () => {
    const runtimeInstalls = of('RUN').filter((i) => i.stage === finalStage && /npm (ci|install)\b/.test(i.args));
    expect(runtimeInstalls.length).toBe(1);
    expect(runtimeInstalls[0]!.args).toMatch(/--omit=dev\b/);
    expect(runtimeInstalls[0]!.args).not.toMatch(/--omit=optional|--no-optional/);
    expect(runtimeInstalls[0]!.args).not.toMatch(/--ignore-scripts/);
  });

  it('has the package bin as its entrypoint', () => {
    const entrypoint = jsonArray(of('ENTRYPOINT').at(-1)!.args);
    const workdir = of('WORKDIR')
      .filter((i) => i.stage === finalStage)
      .at(-1)!.args;
    expect(entrypoint[0]).toBe('node');
    expect(Object.values(pkg.bin)).toContain(path.posix.relative(workdir, entrypoint[1]!));
    const cmd = jsonArray(of('CMD').at(-1)!.args);
    expect(cmd[0]).toBe('serve');
  });

  it('builds on a Node LTS release the package supports, pinned by tag', () => {
    const minimum = Number(/(\d+)/.exec(pkg.engines.node)![1]);
    const external = stages.filter((s) => !stages.some((other) => other.name === s.image));
    expect(external.length).toBe(stages.length);
    for (const { image } of external) {
      const match = /^node:(\d+)(?:\.\d+){0,2}(?:-[a-z0-9-]+)?(?:@sha256:[0-9a-f]{64})?$/.exec(image);
      expect(match, `${image} is not a node:<version> tag`).not.toBeNull();
      const major = Number(match![1]);
      expect(major % 2, `Node ${major} is not an LTS line (LTS majors are even)`).toBe(0);
      expect(major).toBeGreaterThanOrEqual(Math.max(20, minimum));
    }
    expect(new Set(stages.map((s) => s.image)).size, 'build and runtime use the same Node').toBe(1);
  });

  it('runs as the vublk user, with the socket and image directories as volumes', () => {
    const user = of('USER')
      .filter((i) => i.stage === finalStage)
      .at(-1)?.args;
    expect(user).toBe('vublk');
    const volumes = jsonArray(of('VOLUME').at(-1)!.args);
    expect(volumes).toEqual(expect.arrayContaining(['/run/vublk', '/var/lib/vublk']));
  });

  it('health-checks /healthz at VUBLK_HEALTH_URL (an overridable ENV) with node, not a hard-coded address', () => {
    expect(healthcheck.slice(0, 2)).toEqual(['node', '-e']);
    expect(healthcheck[2]).toContain('process.env.VUBLK_HEALTH_URL');
    expect(healthcheck[2]).not.toMatch(/\d+\.\d+\.\d+\.\d+:\d+/);
    expect(env['VUBLK_HEALTH_URL']).toMatch(/^http:\/\/.+\/healthz$/);
  });

  it('ships a default config where CMD looks for it: disks in the volumes, metrics where the health check asks', () => {
    expect(cmd).toEqual(['serve', '--config', '/etc/vublk/vublk.yaml']);
    expect(defaultConfigSource, 'a COPY of a repository file to the --config path').not.toBe('');
    const config = parseYaml(readFileSync(path.join(ROOT, defaultConfigSource), 'utf8')) as {
      'metrics-listen': string;
      disks: { socket: string; image: string }[];
    };
    expect(env['VUBLK_HEALTH_URL']).toBe(`http://${config['metrics-listen']}/healthz`);
    const volumes = jsonArray(of('VOLUME').at(-1)!.args);
    expect(config.disks.length).toBeGreaterThan(0);
    for (const disk of config.disks) {
      expect(volumes).toContain(path.posix.dirname(disk.socket));
      expect(volumes).toContain(path.posix.dirname(disk.image));
    }
  });
});
