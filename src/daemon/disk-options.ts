/**
 * The one table of disk options (like cloud-hypervisor's OptionParser table in vhost_user_block). Each row
 * says, for one option: its `--disk` / config-file key, its `serve` flag, how its value is parsed from text
 * and from YAML/JSON, its default, whether SIGHUP applies it live, and its name in the admin JSON.
 *
 * Derived from it: the `serve` disk flags (cli.ts), the `--disk` parser and the config-file keys
 * (disk-spec.ts, config-file.ts), the reload plan (reload.ts) and the `vublk disks` output (daemon.ts).
 * Adding an option is one row here plus its use site: a row whose `field` is a DiskOptions key reaches
 * BlkDisk's options without further plumbing.
 *
 * Pure apart from path resolution and account lookup; nothing is created or opened here.
 */
import path from 'node:path';
import { VublkError } from '../errors.js';
import { InvalidSizeError, parseCount, parseRate, parseSize } from '../throttle/size.js';
import { groupId, userId } from './account-lookup.js';
import { MAX_QUEUE_SIZE } from '../../protocol/split-ring.js';
import { IO_ENGINE_SETTINGS } from '../dataplane/worker-protocol.js';
import { CACHE_MODES, type CacheMode } from '../dataplane/request-executor.js';
import { IMAGE_FORMATS } from '../backend/qcow2/index.js';
import type { DiskOptions } from '../device/blk-disk.js';
import { MAX_MERGE_MAX_BYTES, type NetworkImageOptions } from '../device/network-image.js';
import { DEFAULT_MAX_DISCARD_SEG, DEFAULT_MAX_WRITE_ZEROES_SEG, MAX_RANGE_SEG } from '../dataplane/device-limits.js';

export const DEFAULT_QUEUE_SIZE = 1024;
export const MAX_QUEUES = 64;

/** A value an option cannot take; `detail` says why without naming the option (the caller names it). */
export class OptionValueError extends VublkError {
  constructor(readonly detail: string) {
    super('VUBLK_ERR_OPTION_VALUE', detail, { peerFault: true });
  }
}

/** The fields that are DiskOptions fields as they are (documented there); the rest differ or are not options of a disk. */
type SharedDiskField =
  | 'sizeBytes'
  | 'numQueues'
  | 'queueSize'
  | 'readOnly'
  | 'serial'
  | 'logicalBlockSize'
  | 'writeback'
  | 'ioEngine'
  | 'maxDiscardSeg'
  | 'maxWriteZeroesSeg'
  | 'locking'
  | 'format'
  | 'l2CacheBytes'
  | 'bufferAlign'
  | keyof NetworkImageOptions;

/**
 * Every option of one disk, parsed. Fields that are also DiskOptions keys flow into DiskOptions as they
 * are; the socket fields make the listen address and the throttle fields the DiskLimits.
 */
export interface DiskFields extends Pick<DiskOptions, SharedDiskField> {
  name?: string | undefined;
  imagePath?: string | undefined;
  socket?: string | undefined;
  socketFd?: number | undefined;
  socketMode?: number | undefined;
  socketOwner?: number | undefined;
  socketGroup?: number | undefined;
  cache: CacheMode;
  pollUs: number;
  iops?: number | undefined;
  iopsBurst?: number | undefined;
  bps?: number | undefined;
  bpsBurst?: number | undefined;
}

export type DiskField = keyof DiskFields;

/** How one kind of value is read. Both readers throw OptionValueError. */
export interface ValueType<T> {
  /** How the value is written in help text: `<n>`, `<bytes>`. */
  readonly placeholder: string;
  /** From `serve` flag or `--disk` text. */
  text(text: string): T;
  /** From a YAML/JSON value; `base` is the folder relative paths are resolved against. */
  config(value: unknown, base: string): T;
}

export interface DiskOption<F extends DiskField = DiskField> {
  field: F;
  /** Key in `--disk key=value` and in a config file's disk entry (inside `group` when set). */
  key: string;
  /** Config-file mapping the key lives in (`throttle:`), if any. */
  group?: 'throttle';
  /** `serve` flag (long form, no placeholder) describing the single command-line disk; absent = none. */
  flag?: string;
  /** A flag without a value: what giving it sets (`--writethrough` sets writeback off). */
  flagSets?: NonNullable<DiskFields[F]>;
  /** The flag (and `env`) also sets the default of disks from `--disk` and `--config` that omit the key. */
  flagIsDefault?: boolean;
  /** Environment variable read when the flag is absent. */
  env?: string;
  help: string;
  type: ValueType<NonNullable<DiskFields[F]>>;
  /** The value when nobody sets one; absent = unset (the use site decides). */
  default?: DiskFields[F];
  /** `live`: a SIGHUP with a changed value applies it; `restart`: only reported. */
  reload: 'live' | 'restart';
  /** Key in `GET /admin/disks` (`vublk disks`); absent = not shown there. */
  admin?: string;
}

export type AnyDiskOption = { [F in DiskField]-?: DiskOption<F> }[DiskField];

function option<F extends DiskField>(row: DiskOption<F>): AnyDiskOption {
  return row as unknown as AnyDiskOption;
}

// --- value types ---------------------------------------------------------------------------------

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

function inRange(value: number, min: number, max: number): number {
  if (value < min || value > max) throw new OptionValueError(`must be between ${min} and ${max}, got ${value}`);
  return value;
}

function wholeNumber(min: number, max: number, placeholder = '<n>'): ValueType<number> {
  return {
    placeholder,
    text(text) {
      if (!/^\d+$/.test(text)) throw new OptionValueError(`must be a whole number, got '${text}'`);
      return inRange(Number(text), min, max);
    },
    config(value) {
      if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
        throw new OptionValueError(`must be a non-negative whole number, got ${describe(value)}`);
      }
      return inRange(value, min, max);
    },
  };
}

function powerOfTwo(max: number): ValueType<number> {
  const base = wholeNumber(1, max);
  const check = (n: number): number => {
    if ((n & (n - 1)) !== 0) throw new OptionValueError(`must be a power of two, got ${n}`);
    return n;
  };
  return { placeholder: base.placeholder, text: (t) => check(base.text(t)), config: (v, b) => check(base.config(v, b)) };
}

function oneOf<T extends string | number>(choices: readonly T[]): ValueType<T> {
  const pick = (value: unknown, shown: string): T => {
    const found = choices.find((c) => c === value);
    if (found === undefined) {
      const allowed = choices.length === 2 ? `${choices[0]} or ${choices[1]}` : `one of ${choices.join(', ')}`;
      throw new OptionValueError(`must be ${allowed}, got ${shown}`);
    }
    return found;
  };
  const numeric = typeof choices[0] === 'number';
  return {
    placeholder: `<${choices.join('|')}>`,
    text: (text) => pick(numeric && /^\d+$/.test(text) ? Number(text) : text, `'${text}'`),
    config: (value) => pick(value, describe(value)),
  };
}

const onOff: ValueType<boolean> = {
  placeholder: 'on|off',
  text(text) {
    if (['on', 'true', 'yes', '1'].includes(text)) return true;
    if (['off', 'false', 'no', '0'].includes(text)) return false;
    throw new OptionValueError(`must be on or off, got '${text}'`);
  },
  config(value) {
    if (typeof value !== 'boolean') throw new OptionValueError(`must be true or false, got ${describe(value)}`);
    return value;
  },
};

function nonEmptyText(value: unknown): string {
  if (typeof value !== 'string' || value === '') throw new OptionValueError(`must be a non-empty string, got ${describe(value)}`);
  return value;
}

const plainText: ValueType<string> = { placeholder: '<str>', text: (t) => t, config: nonEmptyText };

const serialText: ValueType<string> = {
  placeholder: '<str>',
  text: (t) => t,
  config(value) {
    if (typeof value !== 'string') throw new OptionValueError(`must be a string, got ${describe(value)}`);
    return value;
  },
};

/** Network image locations are kept as written; anything else is a path. */
export function isNetworkImage(image: string): boolean {
  return /^nbds?(\+unix)?:\/\//i.test(image) || image.startsWith('rbd:');
}

const imageLocation: ValueType<string> = {
  placeholder: '<path|nbd://...|rbd:POOL/IMAGE>',
  text: (t) => {
    if (t === '') throw new OptionValueError('must not be empty');
    return isNetworkImage(t) ? t : path.resolve(t);
  },
  config: (value, base) => {
    const text = nonEmptyText(value);
    return isNetworkImage(text) ? text : path.resolve(base, text);
  },
};

const filePath: ValueType<string> = {
  placeholder: '<path>',
  text: (t) => {
    if (t === '') throw new OptionValueError('must not be empty');
    return path.resolve(t);
  },
  config: (value, base) => path.resolve(base, nonEmptyText(value)),
};

/** Sizes, rates and counts: text with units; in a file a plain number or such a text. */
function amount(parse: (text: string) => number, placeholder: string, example: string): ValueType<number> {
  const text = (t: string): number => {
    try {
      return parse(t);
    } catch (error) {
      if (error instanceof InvalidSizeError) throw new OptionValueError(error.message);
      throw error;
    }
  };
  return {
    placeholder,
    text,
    config(value) {
      if (typeof value === 'number') {
        if (!Number.isSafeInteger(value) || value < 0) throw new OptionValueError(`must be a non-negative whole number, got ${value}`);
        return value;
      }
      if (typeof value === 'string' && value.trim() !== '') return text(value);
      throw new OptionValueError(`must be a number or a string such as "${example}", got ${describe(value)}`);
    },
  };
}

/** A size, or `off` (0): a limit that can also be turned off. */
function sizeOrOff(max: number): ValueType<number> {
  const size = amount(parseSize, '<bytes|off>', '1M');
  const check = (n: number): number => {
    if (n > max) throw new OptionValueError(`must be at most ${max} bytes, got ${n}`);
    return n;
  };
  return {
    placeholder: size.placeholder,
    text: (t) => (t === 'off' ? 0 : check(size.text(t))),
    config: (v, base) => (v === 'off' || v === false ? 0 : check(size.config(v, base))),
  };
}

const octalMode: ValueType<number> = {
  placeholder: '<octal>',
  text(text) {
    if (!/^0?[0-7]{3}$/.test(text)) throw new OptionValueError(`must be octal like 0660, got '${text}'`);
    return parseInt(text, 8);
  },
  config(value) {
    return octalMode.text(nonEmptyText(value));
  },
};

function account(lookup: (name: string) => number, placeholder: string): ValueType<number> {
  const text = (t: string): number => {
    try {
      return lookup(t);
    } catch (error) {
      if (error instanceof VublkError) throw new OptionValueError(error.message);
      throw error;
    }
  };
  return { placeholder, text, config: (value) => text(typeof value === 'number' ? String(value) : nonEmptyText(value)) };
}

// --- the table -----------------------------------------------------------------------------------

export const DISK_OPTIONS: readonly AnyDiskOption[] = [
  option({
    field: 'name',
    key: 'name',
    help: 'disk name in logs, metrics and the admin API (default disk0, disk1, ...)',
    type: plainText,
    reload: 'restart',
    admin: 'name',
  }),
  option({
    field: 'imagePath',
    key: 'image',
    flag: '--image',
    help: 'backing image file or block device, an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH) or a Ceph RBD image (rbd:POOL/IMAGE)',
    type: imageLocation,
    reload: 'restart',
    admin: 'image',
  }),
  option({ field: 'socket', key: 'socket', flag: '--socket', help: 'Unix socket to listen on', type: filePath, reload: 'restart' }),
  option({
    field: 'socketFd',
    key: 'socket-fd',
    flag: '--socket-fd',
    help: 'serve on an already-listening inherited Unix socket fd instead of a socket path',
    type: wholeNumber(0, 1 << 20),
    reload: 'restart',
  }),
  option({
    field: 'socketMode',
    key: 'socket-mode',
    flag: '--socket-mode',
    help: 'permissions of the socket file vublk creates (default 0600)',
    type: octalMode,
    reload: 'restart',
  }),
  option({
    field: 'socketOwner',
    key: 'socket-owner',
    flag: '--socket-owner',
    help: 'owner of the socket file (name or uid), e.g. the user QEMU runs as',
    type: account(userId, '<user>'),
    reload: 'restart',
  }),
  option({
    field: 'socketGroup',
    key: 'socket-group',
    flag: '--socket-group',
    help: 'group of the socket file (name or gid); use with --socket-mode 0660',
    type: account(groupId, '<group>'),
    reload: 'restart',
  }),
  option({
    field: 'sizeBytes',
    key: 'size',
    flag: '--size',
    help: 'create the image at this size if missing, or grow it (e.g. 1G, 512M, 1073741824)',
    type: amount(parseSize, '<bytes>', '10G'),
    reload: 'restart',
  }),
  option({
    field: 'numQueues',
    key: 'num-queues',
    flag: '--num-queues',
    help: 'number of virtqueues',
    type: wholeNumber(1, MAX_QUEUES),
    default: 1,
    reload: 'restart',
    admin: 'num-queues',
  }),
  option({
    field: 'queueSize',
    key: 'queue-size',
    flag: '--queue-size',
    help: 'largest queue size a front-end may configure (power of two)',
    type: powerOfTwo(MAX_QUEUE_SIZE),
    default: DEFAULT_QUEUE_SIZE,
    reload: 'restart',
    admin: 'queue-size',
  }),
  option({
    field: 'readOnly',
    key: 'read-only',
    flag: '--read-only',
    flagSets: true,
    help: 'export the disk read-only (VIRTIO_BLK_F_RO)',
    type: onOff,
    default: false,
    reload: 'restart',
    admin: 'read-only',
  }),
  option({
    field: 'serial',
    key: 'serial',
    flag: '--serial',
    help: 'serial answered to GET_ID (up to 20 ASCII characters; default from the image name)',
    type: serialText,
    reload: 'restart',
  }),
  option({
    field: 'logicalBlockSize',
    key: 'logical-block-size',
    flag: '--logical-block-size',
    help: 'logical block size',
    type: oneOf([512, 4096] as const),
    default: 512,
    reload: 'restart',
    admin: 'logical-block-size',
  }),
  option({
    field: 'writeback',
    key: 'writeback',
    flag: '--writethrough',
    flagSets: false,
    help: 'start with the write cache off (every write is synced before it completes)',
    type: onOff,
    default: true,
    reload: 'restart',
  }),
  option({
    field: 'ioEngine',
    key: 'io-engine',
    flag: '--io-engine',
    flagIsDefault: true,
    env: 'VUBLK_IO_ENGINE',
    help: 'request engine: auto (io_uring, else sync), io_uring or sync; also the default of --disk/--config disks without io-engine=',
    type: oneOf(IO_ENGINE_SETTINGS),
    default: 'auto',
    reload: 'restart',
    admin: 'io-engine',
  }),
  option({
    field: 'cache',
    key: 'cache',
    flag: '--cache',
    flagIsDefault: true,
    help: 'cache mode, as QEMU: writeback, none (O_DIRECT; unaligned guest buffers bounce), writethrough, directsync (O_DIRECT + O_DSYNC), unsafe (FLUSH ignored); also the default of --disk/--config disks without cache=',
    type: oneOf(CACHE_MODES),
    default: 'writeback',
    reload: 'restart',
    admin: 'cache',
  }),
  option({
    field: 'bufferAlign',
    key: 'buffer-align',
    flag: '--buffer-align',
    help: 'cache=none/directsync: the alignment (bytes, a power of two up to 4096) guest buffers must have for O_DIRECT; others go through bounce buffers. Default: what statx reports (STATX_DIOALIGN), else the logical block size; raise it where the kernel reports none (before 6.1) or too little',
    type: powerOfTwo(4096),
    reload: 'restart',
    admin: 'buffer-align',
  }),
  option({
    field: 'pollUs',
    key: 'poll-us',
    flag: '--poll-us',
    flagIsDefault: true,
    help: 'adaptive polling: the workers serving this disk spin up to N µs on its rings and completions before sleeping (0 = off)',
    type: wholeNumber(0, 1_000_000),
    default: 0,
    reload: 'restart',
    admin: 'poll-us',
  }),
  option({
    field: 'maxDiscardSeg',
    key: 'max-discard-seg',
    flag: '--max-discard-seg',
    help: "ranges one DISCARD request may carry (config max_discard_seg; QEMU's own device uses 1)",
    type: wholeNumber(1, MAX_RANGE_SEG),
    default: DEFAULT_MAX_DISCARD_SEG,
    reload: 'restart',
    admin: 'max-discard-seg',
  }),
  option({
    field: 'maxWriteZeroesSeg',
    key: 'max-write-zeroes-seg',
    flag: '--max-write-zeroes-seg',
    help: "ranges one WRITE_ZEROES request may carry (config max_write_zeroes_seg; QEMU's own device uses 1)",
    type: wholeNumber(1, MAX_RANGE_SEG),
    default: DEFAULT_MAX_WRITE_ZEROES_SEG,
    reload: 'restart',
    admin: 'max-write-zeroes-seg',
  }),
  option({
    field: 'locking',
    key: 'locking',
    help: 'QEMU-compatible image locks (OFD locks on bytes 100+/200+); off only where two daemons share an image by design (migration)',
    type: onOff,
    default: true,
    reload: 'restart',
    admin: 'locking',
  }),
  option({
    field: 'connectTimeout',
    key: 'connect-timeout',
    help: 'NBD / RBD: seconds to reach the server or cluster (RBD: also each monitor command); default NBD 5, RBD 30',
    type: wholeNumber(1, 86_400, '<s>'),
    reload: 'restart',
    admin: 'connect-timeout',
  }),
  option({
    field: 'reconnectTimeout',
    key: 'reconnect-timeout',
    help: 'NBD: seconds requests wait for a lost server (reconnecting with backoff) before they fail with IOERR (default 30)',
    type: wholeNumber(1, 86_400, '<s>'),
    reload: 'restart',
    admin: 'reconnect-timeout',
  }),
  option({
    field: 'requestTimeout',
    key: 'request-timeout',
    help: 'NBD: seconds without a reply before the connection counts as stalled and is reset (default 60; 0 = never)',
    type: wholeNumber(0, 86_400, '<s>'),
    reload: 'restart',
    admin: 'request-timeout',
  }),
  option({
    field: 'connections',
    key: 'connections',
    help: 'NBD: connections each worker thread keeps to the export when the server advertises multi-conn, requests going to the least busy (default 2; without multi-conn the disk has one)',
    type: wholeNumber(1, 16, '<n>'),
    reload: 'restart',
    admin: 'connections',
  }),
  option({
    field: 'mergeMaxBytes',
    key: 'merge',
    help: 'NBD / RBD: adjacent READs (or WRITEs) submitted together go to the server as one request of at most this many bytes (default 1M; off = never)',
    type: sizeOrOff(MAX_MERGE_MAX_BYTES),
    reload: 'restart',
    admin: 'merge',
  }),
  option({
    field: 'rbdConf',
    key: 'conf',
    help: "RBD: ceph.conf to read (default: librados' search, /etc/ceph/ceph.conf)",
    type: filePath,
    reload: 'restart',
    admin: 'conf',
  }),
  option({ field: 'rbdId', key: 'id', help: 'RBD: cephx client id (default admin)', type: plainText, reload: 'restart', admin: 'id' }),
  option({
    field: 'rbdKeyring',
    key: 'keyring',
    help: "RBD: keyring file holding the client's key (default: what ceph.conf says)",
    type: filePath,
    reload: 'restart',
    admin: 'keyring',
  }),
  option({
    field: 'rbdMonHost',
    key: 'mon-host',
    help: "RBD: monitor addresses, overriding ceph.conf's mon_host",
    type: plainText,
    reload: 'restart',
    admin: 'mon-host',
  }),
  option({
    field: 'rbdLock',
    key: 'lock',
    help: "RBD: exclusive (take the image's exclusive lock at start and keep it), migratable (hold it while the guest's device runs, so a live migration hands it over) or none",
    type: oneOf(['exclusive', 'migratable', 'none'] as const),
    reload: 'restart',
    admin: 'lock',
  }),
  option({
    field: 'osdTimeout',
    key: 'osd-timeout',
    help: 'RBD: seconds before an unanswered I/O fails with IOERR (default 0: wait for the cluster)',
    type: wholeNumber(0, 86_400, '<s>'),
    reload: 'restart',
    admin: 'osd-timeout',
  }),
  option({
    field: 'format',
    key: 'format',
    flag: '--format',
    help: 'image format: raw or qcow2 (default: probed, with a warning; a probed qcow2 image may only name a backing file whose format it records)',
    type: oneOf(IMAGE_FORMATS),
    reload: 'restart',
    admin: 'format',
  }),
  option({
    field: 'l2CacheBytes',
    key: 'l2-cache-size',
    flag: '--l2-cache-size',
    help: 'qcow2: bytes of L2 tables cached, shared by all queues (default: enough for the whole disk, at most 32M)',
    type: amount(parseSize, '<bytes>', '4M'),
    reload: 'restart',
    admin: 'l2-cache-size',
  }),
  option({
    field: 'iops',
    key: 'iops',
    group: 'throttle',
    flag: '--iops',
    help: 'throttle: requests per second across all queues (e.g. 500, 10k; 0 = unlimited)',
    type: amount(parseCount, '<n>', '10k'),
    reload: 'live',
  }),
  option({
    field: 'iopsBurst',
    key: 'iops-burst',
    group: 'throttle',
    flag: '--iops-burst',
    help: 'throttle: request burst (default: one second of --iops)',
    type: amount(parseCount, '<n>', '20k'),
    reload: 'live',
  }),
  option({
    field: 'bps',
    key: 'bps',
    group: 'throttle',
    flag: '--bps',
    help: 'throttle: bytes per second across all queues (e.g. 100M; 0 = unlimited)',
    type: amount(parseRate, '<rate>', '100M'),
    reload: 'live',
  }),
  option({
    field: 'bpsBurst',
    key: 'bps-burst',
    group: 'throttle',
    flag: '--bps-burst',
    help: 'throttle: byte burst (default: one second of --bps)',
    type: amount(parseSize, '<size>', '200M'),
    reload: 'live',
  }),
];

/** Keys that used to be disk options, and where the setting lives now (said instead of "unknown key"). */
export const RETIRED_DISK_KEYS: Readonly<Record<string, string>> = {
  threads: 'threads is no longer a disk option: the daemon has one worker pool for every disk, sized by `vublk serve --threads N`',
};

export function diskOptionByKey(key: string): AnyDiskOption | undefined {
  return DISK_OPTIONS.find((row) => row.key === key);
}

/** `throttle.bps` for a grouped option, else the key: how a config file spells its path. */
export function configKeyOf(row: AnyDiskOption): string {
  return row.group === undefined ? row.key : `${row.group}.${row.key}`;
}

/** The table's defaults, overridden by `overrides` (e.g. `--io-engine` for every disk). */
export function defaultFields(overrides: Partial<DiskFields> = {}): DiskFields {
  const fields: Partial<Record<DiskField, unknown>> = {};
  for (const row of DISK_OPTIONS) if (row.default !== undefined) fields[row.field] = row.default;
  return { ...(fields as DiskFields), ...withoutUndefined(overrides) };
}

export function withoutUndefined<T extends object>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** The options shown in `GET /admin/disks` (`vublk disks`), by their admin names. */
export function adminOptionValues(fields: DiskFields): Record<string, unknown> {
  const shown: Record<string, unknown> = {};
  for (const row of DISK_OPTIONS) {
    const value = fields[row.field];
    if (row.admin !== undefined && value !== undefined) shown[row.admin] = value;
  }
  return shown;
}
