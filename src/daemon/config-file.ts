/**
 * `vublk serve --config FILE`: several disks and the daemon's settings in one YAML (.yaml, .yml) or JSON
 * (.json) file, validated whole at load. Every error names the file, the key path (`disks[1].throttle.bps`)
 * and what is wrong; unknown keys are errors. Relative image and socket paths are relative to the file's
 * folder. Disk values go through buildDiskSpec, like `--disk`, so the rules are the same everywhere.
 *
 *   metrics-listen: 127.0.0.1:9477      # or [::1]:9477, unix:/run/vublk/metrics.sock, off
 *   log-level: info
 *   disks:
 *     - name: disk0
 *       socket: /run/vublk/disk0.sock   # or socket-fd: 3
 *       image: /var/lib/vublk/disk0.img
 *       size: 10G
 *       num-queues: 2
 *       throttle: { iops: 5000, bps: 100M }
 */
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

/** The YAML parser is loaded only when a YAML file is read: it costs ~8 MiB of RSS a daemon without one need not pay. */
const loadYaml = (): typeof import('yaml') => createRequire(import.meta.url)('yaml') as typeof import('yaml');
import { buildDiskSpec, checkDistinct, DiskSpecError, type DiskSpec, type DiskSpecInput } from './disk-spec.js';
import { LOG_FORMATS, LOG_LEVELS, type LogFormat, type LogLevel } from '../log.js';
import { parseMetricsListen } from '../metrics/listen-address.js';

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    /** Key path such as `disks[1].throttle.bps`; empty for the whole file. */
    readonly keyPath: string,
    readonly detail: string,
  ) {
    super(keyPath === '' ? `${file}: ${detail}` : `${file}: ${keyPath}: ${detail}`);
    this.name = 'ConfigError';
  }
}

export interface ServeConfig {
  /** Absolute path of the file. */
  file: string;
  disks: DiskSpec[];
  /** As written (validated); undefined when the file does not set it. */
  metricsListen?: string | undefined;
  adminPublic?: boolean | undefined;
  logLevel?: LogLevel | undefined;
  logFormat?: LogFormat | undefined;
}

const TOP_KEYS = ['disks', 'metrics-listen', 'admin-public', 'log-level', 'log-format'] as const;
const DISK_KEYS = [
  'name',
  'image',
  'socket',
  'socket-fd',
  'socket-mode',
  'socket-owner',
  'socket-group',
  'size',
  'num-queues',
  'threads',
  'queue-size',
  'read-only',
  'serial',
  'logical-block-size',
  'writeback',
  'io-engine',
  'cache',
  'poll-us',
  'throttle',
] as const;
const THROTTLE_KEYS = ['iops', 'iops-burst', 'bps', 'bps-burst'] as const;
type ThrottleKey = (typeof THROTTLE_KEYS)[number];

/** Reads and validates a config file. Throws ConfigError. */
export function loadConfigFile(file: string): ServeConfig {
  const absolute = path.resolve(file);
  let text: string;
  try {
    text = fs.readFileSync(absolute, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError(absolute, '', code === 'ENOENT' ? 'no such file' : `cannot be read: ${(error as Error).message}`);
  }
  return parseConfig(text, absolute);
}

/** Parses config text; `file` decides the format (by extension) and the base of relative paths. */
export function parseConfig(text: string, file: string): ServeConfig {
  const extension = path.extname(file).toLowerCase();
  let data: unknown;
  if (extension === '.json') {
    try {
      data = JSON.parse(text) as unknown;
    } catch (error) {
      throw new ConfigError(file, '', `invalid JSON: ${(error as Error).message}`);
    }
  } else if (extension === '.yaml' || extension === '.yml') {
    const { LineCounter, parseDocument } = loadYaml();
    const lineCounter = new LineCounter();
    const doc = parseDocument(text, { prettyErrors: false, uniqueKeys: true, lineCounter });
    const error = doc.errors[0];
    if (error !== undefined) {
      const at = lineCounter.linePos(error.pos[0]);
      throw new ConfigError(file, '', `invalid YAML at line ${at.line}, column ${at.col}: ${error.message.split('\n')[0]}`);
    }
    data = doc.toJS() as unknown;
  } else {
    throw new ConfigError(file, '', `unknown config format '${extension || '(no extension)'}': name the file .yaml, .yml or .json`);
  }
  return validate(data, file);
}

type Fields = Record<string, unknown>;

function isMapping(value: unknown): value is Fields {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

function validate(data: unknown, file: string): ServeConfig {
  const fail = (keyPath: string, detail: string): never => {
    throw new ConfigError(file, keyPath, detail);
  };
  if (!isMapping(data)) return fail('', `the top level must be a mapping with a 'disks' list, got ${describe(data)}`);
  checkKeys(data, TOP_KEYS, '', fail);

  const config: ServeConfig = { file, disks: [] };
  if ('metrics-listen' in data) {
    const text = data['metrics-listen'];
    if (typeof text !== 'string') fail('metrics-listen', `must be a string such as "127.0.0.1:9477" or "off", got ${describe(text)}`);
    try {
      parseMetricsListen(text as string);
    } catch (error) {
      fail('metrics-listen', (error as Error).message);
    }
    config.metricsListen = text as string;
  }
  if ('admin-public' in data) config.adminPublic = boolean(data['admin-public'], 'admin-public', fail);
  if ('log-level' in data) config.logLevel = choice(data['log-level'], LOG_LEVELS, 'log-level', fail);
  if ('log-format' in data) config.logFormat = choice(data['log-format'], LOG_FORMATS, 'log-format', fail);

  const disks = data['disks'];
  if (disks === undefined) fail('disks', 'is required: a list with one entry per disk');
  if (!Array.isArray(disks)) return fail('disks', `must be a list, got ${describe(disks)}`);
  if (disks.length === 0) fail('disks', 'is empty: describe at least one disk');
  const base = path.dirname(file);
  config.disks = disks.map((entry: unknown, index) => diskSpec(entry, index, base, fail));
  try {
    checkDistinct(config.disks);
  } catch (error) {
    if (error instanceof DiskSpecError) fail('disks', error.detail);
    throw error;
  }
  return config;
}

type Fail = (keyPath: string, detail: string) => never;

function checkKeys(fields: Fields, known: readonly string[], where: string, fail: Fail): void {
  for (const key of Object.keys(fields)) {
    if (!known.includes(key)) fail(where === '' ? key : `${where}.${key}`, `unknown key (known: ${known.join(', ')})`);
  }
}

function boolean(value: unknown, keyPath: string, fail: Fail): boolean {
  if (typeof value !== 'boolean') return fail(keyPath, `must be true or false, got ${describe(value)}`);
  return value;
}

function choice<T extends string>(value: unknown, choices: readonly T[], keyPath: string, fail: Fail): T {
  if (typeof value !== 'string' || !(choices as readonly string[]).includes(value)) {
    return fail(keyPath, `must be one of ${choices.join(', ')}, got ${describe(value)}`);
  }
  return value as T;
}

function text(value: unknown, keyPath: string, fail: Fail): string {
  if (typeof value !== 'string' || value === '') return fail(keyPath, `must be a non-empty string, got ${describe(value)}`);
  return value;
}

/** A number or a string with a unit ("100M"); numbers must be non-negative whole numbers. */
function amount(value: unknown, keyPath: string, fail: Fail, example: string): string {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) return fail(keyPath, `must be a non-negative whole number, got ${value}`);
    return String(value);
  }
  if (typeof value === 'string' && value.trim() !== '') return value;
  return fail(keyPath, `must be a number or a string such as "${example}", got ${describe(value)}`);
}

function integer(value: unknown, keyPath: string, fail: Fail): string {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    return fail(keyPath, `must be a non-negative whole number, got ${describe(value)}`);
  }
  return String(value);
}

function diskSpec(entry: unknown, index: number, base: string, fail: Fail): DiskSpec {
  const where = `disks[${index}]`;
  if (!isMapping(entry)) return fail(where, `must be a mapping (name, image, socket, ...), got ${describe(entry)}`);
  checkKeys(entry, DISK_KEYS, where, fail);
  const get = <T>(key: string, convert: (value: unknown, keyPath: string, fail: Fail) => T): T | undefined =>
    key in entry ? convert(entry[key], `${where}.${key}`, fail) : undefined;
  const input: DiskSpecInput = {
    name: get('name', text),
    image: get('image', (v, p, f) => path.resolve(base, text(v, p, f))),
    socket: get('socket', (v, p, f) => path.resolve(base, text(v, p, f))),
    socketFd: get('socket-fd', integer),
    socketMode: get('socket-mode', text),
    socketOwner: get('socket-owner', (v, p, f) => (typeof v === 'number' ? String(v) : text(v, p, f))),
    socketGroup: get('socket-group', (v, p, f) => (typeof v === 'number' ? String(v) : text(v, p, f))),
    size: get('size', (v, p, f) => amount(v, p, f, '10G')),
    numQueues: get('num-queues', integer),
    threads: get('threads', integer),
    queueSize: get('queue-size', integer),
    readOnly: get('read-only', boolean),
    serial: get('serial', (v, p, f) => (typeof v === 'string' ? v : f(p, `must be a string, got ${describe(v)}`))),
    logicalBlockSize: get('logical-block-size', integer),
    writeback: get('writeback', boolean),
    ioEngine: get('io-engine', text),
    cache: get('cache', text),
    pollUs: get('poll-us', integer),
  };
  if ('throttle' in entry) {
    const throttle = entry['throttle'];
    const tWhere = `${where}.throttle`;
    if (!isMapping(throttle)) return fail(tWhere, `must be a mapping with iops, iops-burst, bps, bps-burst, got ${describe(throttle)}`);
    checkKeys(throttle, THROTTLE_KEYS, tWhere, fail);
    const examples: Record<ThrottleKey, string> = { iops: '10k', 'iops-burst': '20k', bps: '100M', 'bps-burst': '200M' };
    const value = (key: ThrottleKey): string | undefined => (key in throttle ? amount(throttle[key], `${tWhere}.${key}`, fail, examples[key]) : undefined);
    input.iops = value('iops');
    input.iopsBurst = value('iops-burst');
    input.bps = value('bps');
    input.bpsBurst = value('bps-burst');
  }
  try {
    return buildDiskSpec(input, where, index);
  } catch (error) {
    if (!(error instanceof DiskSpecError)) throw error;
    const key = error.key;
    if (key === undefined) return fail(where, error.detail);
    const keyPath = (THROTTLE_KEYS as readonly string[]).includes(key) ? `${where}.throttle.${key}` : `${where}.${key}`;
    return fail(keyPath, stripKey(error.detail, key));
  }
}

/** `bps: invalid rate ...` → `invalid rate ...`; `num-queues must be ...` → `must be ...` (the path names the key). */
function stripKey(detail: string, key: string): string {
  if (detail.startsWith(`${key}: `)) return detail.slice(key.length + 2);
  if (detail.startsWith(`${key} `)) return detail.slice(key.length + 1);
  return detail;
}
