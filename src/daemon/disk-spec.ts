/**
 * A disk as the user described it (`serve` flags, `--disk key=value,...` or a config-file entry), read
 * through the option table (disk-options.ts) and validated into DiskOptions plus where to listen.
 * Pure: no files are touched here, so every error is reported before anything is created.
 */
import type { DiskLimits } from '../throttle/disk-throttle.js';
import type { DiskOptions } from '../device/blk-disk.js';
import type { ListenAddress } from '../control/export-listener.js';
import { VublkError } from '../errors.js';
import { cachePolicy } from '../dataplane/request-executor.js';
import {
  DISK_OPTIONS,
  OptionValueError,
  RETIRED_DISK_KEYS,
  configKeyOf,
  defaultFields,
  diskOptionByKey,
  withoutUndefined,
  type AnyDiskOption,
  type DiskFields,
  isNetworkImage,
} from './disk-options.js';
import { parseNbdUri } from '../backend/nbd/nbd-uri.js';
import { rbdSpecOf } from '../device/network-image.js';

export { DEFAULT_QUEUE_SIZE, MAX_QUEUES } from './disk-options.js';

/** A disk description that cannot be served. `key` names the option to blame, when one is. */
export class DiskSpecError extends VublkError {
  constructor(
    /** Which disk: `--disk #2 (...)`, `disks[1]`; empty for the command line's single disk (the flag says it). */
    readonly where: string,
    /** What is wrong, without `where` or the key. */
    readonly detail: string,
    /** The option to blame, if one is; a config file turns it into a key path such as `disks[1].throttle.bps`. */
    readonly option?: AnyDiskOption,
    /** How the option is named in `message` (the flag on the command line, else the key). */
    label?: string,
  ) {
    const prefix = [where, option === undefined ? '' : (label ?? option.key)].filter((part) => part !== '').join(': ');
    super('VUBLK_ERR_DISK_SPEC', prefix === '' ? detail : `${prefix}: ${detail}`, { peerFault: true });
  }
}

export interface DiskSpec {
  options: DiskOptions;
  listen: ListenAddress;
  /** Every option as parsed (defaults included): what the reload plan compares and the admin API shows. */
  fields: DiskFields;
}

/** Where the values came from: decides how an error names the option. */
export type DiskSource = 'flags' | 'disk-argument' | 'config';

/** Reads one option's value with the table's parser; errors name the option. */
export function readOption(row: AnyDiskOption, where: string, source: DiskSource, read: (row: AnyDiskOption) => unknown): unknown {
  try {
    return read(row);
  } catch (error) {
    if (error instanceof OptionValueError) throw new DiskSpecError(where, error.detail, row, labelOf(row, source));
    throw error;
  }
}

function labelOf(row: AnyDiskOption, source: DiskSource): string {
  if (source === 'flags' && row.flag !== undefined) return row.flag;
  if (source === 'config') return configKeyOf(row);
  return row.key;
}

/**
 * Turns parsed fields into a DiskSpec: table defaults (then `defaults`, e.g. `--io-engine`) under the given
 * fields, then the checks that involve more than one option.
 */
export function buildDiskSpec(
  given: Partial<DiskFields>,
  where: string,
  index: number,
  source: DiskSource,
  defaults: Partial<DiskFields> = {},
): DiskSpec {
  const fields: DiskFields = { ...defaultFields(defaults), ...withoutUndefined(given) };
  const fail = (detail: string, key?: string): never => {
    const row = key === undefined ? undefined : diskOptionByKey(key);
    throw new DiskSpecError(where, detail, row, row === undefined ? undefined : labelOf(row, source));
  };
  fields.name ??= `disk${index}`;
  if (fields.imagePath === undefined) return fail('an image path is required', 'image');
  if (fields.socket !== undefined && fields.socketFd !== undefined) fail('give either a socket path or a socket fd, not both');
  if (fields.socket === undefined && fields.socketFd === undefined) {
    fail('a socket path (socket=PATH) or an inherited socket fd (socket-fd=N) is required', 'socket');
  }
  const block = fields.logicalBlockSize;
  if (fields.sizeBytes !== undefined && (fields.sizeBytes < block || fields.sizeBytes % block !== 0)) {
    fail(`must be a non-zero multiple of ${block} bytes, got ${fields.sizeBytes}`, 'size');
  }
  checkNetworkImage(fields, fail);
  checkBufferAlign(fields, fail);
  if (fields.iopsBurst && !fields.iops) fail('needs iops', 'iops-burst');
  if (fields.bpsBurst && !fields.bps) fail('needs bps', 'bps-burst');

  const { socket, socketFd, socketMode, socketOwner, socketGroup, iops, iopsBurst, bps, bpsBurst, ...device } = fields;
  const throttle: DiskLimits = { iops, iopsBurst, bps, bpsBurst };
  const listen: ListenAddress =
    socketFd !== undefined
      ? { kind: 'fd', fd: socketFd }
      : { kind: 'path', path: socket!, mode: socketMode, uid: socketOwner, gid: socketGroup };
  const options: DiskOptions = { ...device, name: fields.name, imagePath: fields.imagePath, throttle };
  return { options, listen, fields };
}

/** Parses `image=PATH,socket=PATH,num-queues=2,read-only=on,...` (a value may not contain a comma). */
export function parseDiskArgument(text: string, index: number, defaults: Partial<DiskFields> = {}): DiskSpec {
  const where = `--disk #${index + 1} (${text})`;
  const values = new Map<string, string>();
  for (const part of text.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) throw new DiskSpecError(where, `'${part}' is not key=value`);
    const key = part.slice(0, eq);
    const retired = RETIRED_DISK_KEYS[key];
    if (retired !== undefined) throw new DiskSpecError(where, retired);
    if (diskOptionByKey(key) === undefined) {
      throw new DiskSpecError(where, `unknown key '${key}' (known: ${DISK_OPTIONS.map((row) => row.key).join(', ')})`);
    }
    if (values.has(key)) throw new DiskSpecError(where, `key '${key}' given twice`);
    values.set(key, part.slice(eq + 1));
  }
  const fields: Partial<Record<keyof DiskFields, unknown>> = {};
  for (const row of DISK_OPTIONS) {
    const value = values.get(row.key);
    if (value !== undefined) fields[row.field] = readOption(row, where, 'disk-argument', (r) => r.type.text(value));
  }
  return buildDiskSpec(fields as Partial<DiskFields>, where, index, 'disk-argument', defaults);
}

/** Names must be unique (metrics labels, logs) and so must socket paths. */
export function checkDistinct(specs: readonly DiskSpec[]): void {
  const names = new Set<string>();
  const sockets = new Set<string>();
  for (const spec of specs) {
    if (names.has(spec.options.name)) throw new DiskSpecError('disks', `two disks are named '${spec.options.name}'`);
    names.add(spec.options.name);
    if (spec.listen.kind === 'path') {
      if (sockets.has(spec.listen.path)) throw new DiskSpecError('disks', `two disks listen on ${spec.listen.path}`);
      sockets.add(spec.listen.path);
    }
  }
}

const RBD_KEYS = ['conf', 'id', 'keyring', 'mon-host', 'lock', 'osd-timeout'] as const;
const NBD_KEYS = ['reconnect-timeout', 'request-timeout', 'connections'] as const;
const RBD_FIELDS = ['rbdConf', 'rbdId', 'rbdKeyring', 'rbdMonHost', 'rbdLock', 'osdTimeout'] as const;
const NBD_FIELDS = ['reconnectTimeout', 'requestTimeout', 'connections'] as const;

/** buffer-align is about O_DIRECT on a local image: refused where it would silently do nothing. */
function checkBufferAlign(fields: DiskFields, fail: (detail: string, key?: string) => never): void {
  if (fields.bufferAlign === undefined) return;
  if (isNetworkImage(fields.imagePath!)) fail('only applies to image files and block devices (O_DIRECT)', 'buffer-align');
  if (!cachePolicy(fields.cache).direct)
    fail(`only applies to cache=none and cache=directsync (O_DIRECT), not cache=${fields.cache}`, 'buffer-align');
}

/**
 * Network images: the location must parse (pure: nothing is connected here), options of the other kind of
 * image are refused, and what only applies to files (size=) is refused rather than ignored.
 */
function checkNetworkImage(fields: DiskFields, fail: (detail: string, key?: string) => never): void {
  const image = fields.imagePath!;
  const network = isNetworkImage(image);
  const rbd = network && image.startsWith('rbd:');
  const nbd = network && !rbd;
  RBD_FIELDS.forEach((field, i) => {
    if (!rbd && fields[field] !== undefined) fail(`only applies to rbd: images`, RBD_KEYS[i]);
  });
  NBD_FIELDS.forEach((field, i) => {
    if (!nbd && fields[field] !== undefined) fail(`only applies to nbd:// images`, NBD_KEYS[i]);
  });
  if (!network) {
    if (fields.connectTimeout !== undefined) fail('only applies to nbd:// and rbd: images', 'connect-timeout');
    // Files and block devices: the kernel's block layer merges adjacent requests already.
    if (fields.mergeMaxBytes !== undefined) fail('only applies to nbd:// and rbd: images', 'merge');
    return;
  }
  if (fields.sizeBytes !== undefined)
    fail('a network image has the size its server gives it (resize an RBD image with `vublk resize`)', 'size');
  try {
    if (nbd) parseNbdUri(image);
    else rbdSpecOf(fields);
  } catch (error) {
    if (error instanceof VublkError) fail(error.message, 'image');
    throw error;
  }
}
