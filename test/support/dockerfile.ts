/**
 * A small reader of the repository's Dockerfile (no Docker engine here): instructions per build stage, the
 * JSON-array forms, COPY parts. Used by the Dockerfile's consistency checks and by the test that runs the
 * image's default command and health check against a real daemon.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));

export interface Instruction {
  keyword: string;
  args: string;
  stage: number;
}

/** Instructions with continuation lines joined and comments dropped; `stage` counts FROM lines from 0. */
export function parseDockerfile(text: string): Instruction[] {
  const joined = text
    .split('\n')
    .filter((line) => !/^\s*#/.test(line))
    .join('\n')
    .replace(/\\\n/g, ' ');
  const out: Instruction[] = [];
  let stage = -1;
  for (const line of joined.split('\n')) {
    const match = /^\s*([A-Za-z]+)\s+(.*)$/.exec(line);
    if (!match) continue;
    const keyword = match[1]!.toUpperCase();
    if (keyword === 'FROM') stage++;
    out.push({ keyword, args: match[2]!.trim(), stage });
  }
  return out;
}

export function jsonArray(args: string): string[] {
  const parsed = JSON.parse(args) as unknown;
  if (!Array.isArray(parsed) || !parsed.every((x) => typeof x === 'string')) throw new Error(`not a JSON string array: ${args}`);
  return parsed as string[];
}

/** COPY/ADD sources and destination, flags (--from=..., --chown=...) separated. */
export function copyParts(args: string): { flags: Record<string, string>; sources: string[]; dest: string } {
  const words = args.trim().startsWith('[') ? jsonArray(args) : args.split(/\s+/);
  const flags: Record<string, string> = {};
  while (words[0]?.startsWith('--')) {
    const [key, value] = words.shift()!.slice(2).split('=');
    flags[key!] = value ?? '';
  }
  return { flags, sources: words.slice(0, -1), dest: words[words.length - 1]! };
}

export interface Dockerfile {
  instructions: Instruction[];
  of(keyword: string): Instruction[];
  stages: { image: string; name: string | undefined }[];
  finalStage: number;
  /** ENV of the final stage (`ENV KEY=VALUE` form). */
  env: Record<string, string>;
  /** The HEALTHCHECK's CMD array. */
  healthcheck: string[];
  /** The repository file the image's default config (`CMD [... "--config", FILE]`) is copied from. */
  defaultConfigSource: string;
  cmd: string[];
}

export function readDockerfile(): Dockerfile {
  const instructions = parseDockerfile(readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8'));
  const of = (keyword: string): Instruction[] => instructions.filter((i) => i.keyword === keyword);
  const stages = of('FROM').map((i) => {
    const [image, as, name] = i.args.split(/\s+/);
    return { image: image!, name: as?.toUpperCase() === 'AS' ? name : undefined };
  });
  const finalStage = stages.length - 1;
  const env: Record<string, string> = {};
  for (const i of of('ENV').filter((e) => e.stage === finalStage)) {
    const match = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(i.args);
    if (match) env[match[1]!] = match[2]!;
  }
  const check = of('HEALTHCHECK').at(-1)?.args ?? '';
  const healthcheck = check.includes('CMD') ? jsonArray(check.slice(check.indexOf('CMD') + 3).trim()) : [];
  const cmd = jsonArray(of('CMD').at(-1)?.args ?? '[]');
  const configPath = cmd[cmd.indexOf('--config') + 1] ?? '';
  const copy = of('COPY')
    .filter((i) => i.stage === finalStage)
    .map((i) => copyParts(i.args))
    .find((c) => c.flags['from'] === undefined && c.dest === configPath);
  return { instructions, of, stages, finalStage, env, healthcheck, defaultConfigSource: copy?.sources[0] ?? '', cmd };
}
