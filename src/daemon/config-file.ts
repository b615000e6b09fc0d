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

/** The YAML parser is loaded only when a YAML file is read: its resident memory is a cost a daemon without one need not pay. */
const loadYaml = (): typeof import('yaml') => createRequire(import.meta.url)('yaml') as typeof import('yaml');
import { buildDiskSpec, checkDistinct, DiskSpecError, readOption, type DiskSpec } from './disk-spec.js';
import { DISK_OPTIONS, RETIRED_DISK_KEYS, configKeyOf, type DiskFields } from './disk-options.js';
import { LOG_FORMATS, LOG_LEVELS, type LogFormat, type LogLevel } from '../log.js';
import { parseMetricsListen } from '../metrics/listen-address.js';
import { VublkError } from '../errors.js';

/** A config file that cannot be used; `keyPath` and `detail` are fields, the message only joins them. */
export class ConfigError extends VublkError {
  constructor(
    readonly file: string,
    /** Key path such as `disks[1].throttle.bps`; empty for the whole file. */
    readonly keyPath: string,
    readonly detail: string,
  ) {
    super('VUBLK_ERR_CONFIG', keyPath === '' ? `${file}: ${detail}` : `${file}: ${keyPath}: ${detail}`, { peerFault: true });
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
  /** Defaults of disk options the entries omit, from the command line (`--io-engine`); a reload keeps them. */
  diskDefaults: Partial<DiskFields>;
}

const TOP_KEYS = ['disks', 'metrics-listen', 'admin-public', 'log-level', 'log-format'] as const;
/** A disk entry's keys and the nested groups (`throttle:`), from the option table. */
const DISK_KEYS = [...DISK_OPTIONS.filter((row) => row.group === undefined).map((row) => row.key), 'throttle'];
const THROTTLE_KEYS = DISK_OPTIONS.filter((row) => row.group === 'throttle').map((row) => row.key);

/** Reads and validates a config file. Throws ConfigError. */
export function loadConfigFile(file: string, diskDefaults: Partial<DiskFields> = {}): ServeConfig {
  const absolute = path.resolve(file);
  let text: string;
  try {
    text = fs.readFileSync(absolute, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError(absolute, '', code === 'ENOENT' ? 'no such file' : `cannot be read: ${(error as Error).message}`);
  }
  return parseConfig(text, absolute, diskDefaults);
}

/** Parses config text; `file` decides the format (by extension) and the base of relative paths. */
export function parseConfig(text: string, file: string, diskDefaults: Partial<DiskFields> = {}): ServeConfig {
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
  return validate(data, file, diskDefaults);
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

function validate(data: unknown, file: string, diskDefaults: Partial<DiskFields>): ServeConfig {
  const fail = (keyPath: string, detail: string): never => {
    throw new ConfigError(file, keyPath, detail);
  };
  if (!isMapping(data)) return fail('', `the top level must be a mapping with a 'disks' list, got ${describe(data)}`);
  checkKeys(data, TOP_KEYS, '', fail);

  const config: ServeConfig = { file, disks: [], diskDefaults };
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
  config.disks = disks.map((entry: unknown, index) => diskSpec(entry, index, base, diskDefaults, fail));
  try {
    checkDistinct(config.disks);
  } catch (error) {
    if (error instanceof DiskSpecError) fail(error.where, error.detail);
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

function diskSpec(entry: unknown, index: number, base: string, defaults: Partial<DiskFields>, fail: Fail): DiskSpec {
  const where = `disks[${index}]`;
  if (!isMapping(entry)) return fail(where, `must be a mapping (name, image, socket, ...), got ${describe(entry)}`);
  for (const key of Object.keys(entry)) {
    const retired = RETIRED_DISK_KEYS[key];
    if (retired !== undefined) fail(`${where}.${key}`, retired);
  }
  checkKeys(entry, DISK_KEYS, where, fail);
  const throttle = entry['throttle'];
  if ('throttle' in entry) {
    if (!isMapping(throttle))
      return fail(`${where}.throttle`, `must be a mapping with ${THROTTLE_KEYS.join(', ')}, got ${describe(throttle)}`);
    checkKeys(throttle, THROTTLE_KEYS, `${where}.throttle`, fail);
  }
  const fields: Partial<Record<keyof DiskFields, unknown>> = {};
  try {
    for (const row of DISK_OPTIONS) {
      const holder = row.group === 'throttle' ? (isMapping(throttle) ? throttle : {}) : entry;
      if (row.key in holder) fields[row.field] = readOption(row, where, 'config', (r) => r.type.config(holder[row.key], base));
    }
    return buildDiskSpec(fields as Partial<DiskFields>, where, index, 'config', defaults);
  } catch (error) {
    if (!(error instanceof DiskSpecError)) throw error;
    return fail(error.option === undefined ? where : `${where}.${configKeyOf(error.option)}`, error.detail);
  }
}
