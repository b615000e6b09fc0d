/**
 * A disk as the user described it (flags or `--disk key=value,...`), validated into DiskOptions plus where to
 * listen. Pure: no files are touched here, so every error is reported before anything is created.
 */
import path from 'node:path';
import { parseCount, parseRate, parseSize } from '../throttle/size.js';
import type { DiskLimits } from '../throttle/disk-throttle.js';
import type { DiskOptions } from '../device/blk-disk.js';
import type { ListenAddress, SocketAccess } from '../control/export-listener.js';
import { groupId, userId } from './account-lookup.js';
import { MAX_QUEUE_SIZE } from '../../protocol/split-ring.js';
import { IO_ENGINE_SETTINGS, isIoEngineSetting, type IoEngineSetting } from '../dataplane/worker-protocol.js';
import { CACHE_MODES, cachePolicy, isCacheMode, type CacheMode } from '../dataplane/request-executor.js';

export class DiskSpecError extends Error {
  constructor(
    where: string,
    /** What is wrong, without the `where` prefix. */
    readonly detail: string,
    /** The offending key (`num-queues`, `bps`, ...) when one key is to blame; lets a config file name its path. */
    readonly key?: string,
  ) {
    super(`${where}: ${detail}`);
    this.name = 'DiskSpecError';
  }
}

export interface DiskSpec {
  options: DiskOptions;
  listen: ListenAddress;
}

export interface DiskSpecInput {
  name?: string | undefined;
  image?: string | undefined;
  socket?: string | undefined;
  socketFd?: string | undefined;
  size?: string | undefined;
  numQueues?: string | undefined;
  queueSize?: string | undefined;
  readOnly?: boolean | undefined;
  serial?: string | undefined;
  logicalBlockSize?: string | undefined;
  writeback?: boolean | undefined;
  iops?: string | undefined;
  iopsBurst?: string | undefined;
  bps?: string | undefined;
  bpsBurst?: string | undefined;
  /** auto | io_uring | sync */
  ioEngine?: string | undefined;
  /** writeback | none | writethrough | directsync | unsafe */
  cache?: string | undefined;
  pollUs?: string | undefined;
  threads?: string | undefined;
  socketMode?: string | undefined;
  socketOwner?: string | undefined;
  socketGroup?: string | undefined;
}

export const DEFAULT_QUEUE_SIZE = 1024;
export const MAX_QUEUES = 64;

function integer(where: string, key: string, text: string, min: number, max: number): number {
  if (!/^\d+$/.test(text)) throw new DiskSpecError(where, `${key} must be a whole number, got '${text}'`, key);
  const value = Number(text);
  if (value < min || value > max) throw new DiskSpecError(where, `${key} must be between ${min} and ${max}, got ${value}`, key);
  return value;
}

function onOff(where: string, key: string, text: string): boolean {
  if (['on', 'true', 'yes', '1'].includes(text)) return true;
  if (['off', 'false', 'no', '0'].includes(text)) return false;
  throw new DiskSpecError(where, `${key} must be on or off, got '${text}'`, key);
}

export function buildDiskSpec(input: DiskSpecInput, where: string, index: number): DiskSpec {
  if (!input.image) throw new DiskSpecError(where, 'an image path is required', 'image');
  if (input.socket && input.socketFd) throw new DiskSpecError(where, 'give either a socket path or a socket fd, not both');
  if (!input.socket && !input.socketFd) throw new DiskSpecError(where, 'a socket path (socket=PATH) or an inherited socket fd (socket-fd=N) is required', 'socket');
  const numQueues = input.numQueues ? integer(where, 'num-queues', input.numQueues, 1, MAX_QUEUES) : 1;
  const threads = input.threads ? integer(where, 'threads', input.threads, 1, MAX_QUEUES) : undefined;
  const queueSize = input.queueSize ? integer(where, 'queue-size', input.queueSize, 1, MAX_QUEUE_SIZE) : DEFAULT_QUEUE_SIZE;
  if ((queueSize & (queueSize - 1)) !== 0) throw new DiskSpecError(where, `queue-size must be a power of two, got ${queueSize}`, 'queue-size');
  const block = input.logicalBlockSize ? integer(where, 'logical-block-size', input.logicalBlockSize, 512, 4096) : 512;
  if (block !== 512 && block !== 4096) throw new DiskSpecError(where, `logical-block-size must be 512 or 4096, got ${block}`, 'logical-block-size');
  let sizeBytes: number | undefined;
  if (input.size !== undefined) {
    try {
      sizeBytes = parseSize(input.size);
    } catch (error) {
      throw new DiskSpecError(where, `size: ${(error as Error).message}`, 'size');
    }
    if (sizeBytes < block || sizeBytes % block !== 0) throw new DiskSpecError(where, `size must be a non-zero multiple of ${block} bytes, got ${sizeBytes}`, 'size');
  }
  const throttle = parseThrottle(input, where);
  const cache = input.cache ?? defaultCacheMode;
  if (!isCacheMode(cache)) throw new DiskSpecError(where, `cache must be one of ${CACHE_MODES.join(', ')}, got '${cache}'`, 'cache');
  const listen: ListenAddress = input.socketFd
    ? { kind: 'fd', fd: integer(where, 'socket-fd', input.socketFd, 0, 1 << 20) }
    : { kind: 'path', path: path.resolve(input.socket!), ...socketAccess(input, where) };
  return {
    options: {
      name: input.name ?? (index === 0 ? 'disk0' : `disk${index}`),
      imagePath: path.resolve(input.image),
      sizeBytes,
      numQueues,
      queueSize,
      readOnly: input.readOnly ?? false,
      serial: input.serial,
      logicalBlockSize: block as 512 | 4096,
      writeback: input.writeback ?? cachePolicy(cache).writeback,
      ioEngine: parseIoEngine(where, input.ioEngine),
      cache,
      pollUs: input.pollUs ? integer(where, 'poll-us', input.pollUs, 0, 1_000_000) : 0,
      threads,
      throttle,
    },
    listen,
  };
}

let defaultIoEngine: IoEngineSetting = 'auto';
let defaultCacheMode: CacheMode = 'writeback';

/** The cache mode of disks that do not name one (`--cache`). To move into the options table. */
export function setDefaultCacheMode(mode: CacheMode): void {
  defaultCacheMode = mode;
}

/** The engine of disks that do not name one (`--io-engine`, itself defaulting to $VUBLK_IO_ENGINE or auto). */
export function setDefaultIoEngine(engine: IoEngineSetting): void {
  defaultIoEngine = engine;
}

function parseIoEngine(where: string, text: string | undefined): IoEngineSetting {
  if (text === undefined) return defaultIoEngine;
  if (!isIoEngineSetting(text)) throw new DiskSpecError(where, `io-engine must be one of ${IO_ENGINE_SETTINGS.join(', ')}, got '${text}'`, 'io-engine');
  return text;
}

function parseThrottle(input: DiskSpecInput, where: string): DiskLimits {
  const value = (key: string, text: string | undefined, parse: (t: string) => number): number | undefined => {
    if (text === undefined) return undefined;
    try {
      return parse(text);
    } catch (error) {
      throw new DiskSpecError(where, `${key}: ${(error as Error).message}`, key);
    }
  };
  const limits: DiskLimits = {
    iops: value('iops', input.iops, parseCount),
    iopsBurst: value('iops-burst', input.iopsBurst, parseCount),
    bps: value('bps', input.bps, parseRate),
    bpsBurst: value('bps-burst', input.bpsBurst, parseSize),
  };
  if (limits.iopsBurst && !limits.iops) throw new DiskSpecError(where, 'iops-burst needs iops', 'iops-burst');
  if (limits.bpsBurst && !limits.bps) throw new DiskSpecError(where, 'bps-burst needs bps', 'bps-burst');
  return limits;
}

function socketAccess(input: DiskSpecInput, where: string): SocketAccess {
  let mode: number | undefined;
  if (input.socketMode !== undefined) {
    if (!/^0?[0-7]{3}$/.test(input.socketMode)) throw new DiskSpecError(where, `socket-mode must be octal like 0660, got '${input.socketMode}'`, 'socket-mode');
    mode = parseInt(input.socketMode, 8);
  }
  const resolve = (key: string, text: string | undefined, lookup: (name: string) => number): number | undefined => {
    if (text === undefined) return undefined;
    try {
      return lookup(text);
    } catch (error) {
      throw new DiskSpecError(where, `${key}: ${(error as Error).message}`, key);
    }
  };
  return { mode, uid: resolve('socket-owner', input.socketOwner, userId), gid: resolve('socket-group', input.socketGroup, groupId) };
}

const DISK_KEYS = new Set(['socket-mode', 'socket-owner', 'socket-group', 'iops', 'iops-burst', 'bps', 'bps-burst', 'name', 'image', 'socket', 'socket-fd', 'size', 'num-queues', 'queue-size', 'read-only', 'serial', 'logical-block-size', 'writeback', 'io-engine', 'threads', 'cache', 'poll-us']);

/** Parses `image=PATH,socket=PATH,num-queues=2,read-only=on,...` (a value may not contain a comma). */
export function parseDiskArgument(text: string, index: number): DiskSpec {
  const where = `--disk #${index + 1} (${text})`;
  const fields = new Map<string, string>();
  for (const part of text.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) throw new DiskSpecError(where, `'${part}' is not key=value`);
    const key = part.slice(0, eq);
    if (!DISK_KEYS.has(key)) throw new DiskSpecError(where, `unknown key '${key}' (known: ${[...DISK_KEYS].join(', ')})`);
    if (fields.has(key)) throw new DiskSpecError(where, `key '${key}' given twice`);
    fields.set(key, part.slice(eq + 1));
  }
  const flag = (key: string): boolean | undefined => (fields.has(key) ? onOff(where, key, fields.get(key)!) : undefined);
  return buildDiskSpec(
    {
      name: fields.get('name'),
      image: fields.get('image'),
      socket: fields.get('socket'),
      socketFd: fields.get('socket-fd'),
      size: fields.get('size'),
      numQueues: fields.get('num-queues'),
      queueSize: fields.get('queue-size'),
      readOnly: flag('read-only'),
      serial: fields.get('serial'),
      logicalBlockSize: fields.get('logical-block-size'),
      writeback: flag('writeback'),
      iops: fields.get('iops'),
      iopsBurst: fields.get('iops-burst'),
      bps: fields.get('bps'),
      bpsBurst: fields.get('bps-burst'),
      ioEngine: fields.get('io-engine'),
      cache: fields.get('cache'),
      pollUs: fields.get('poll-us'),
      threads: fields.get('threads'),
      socketMode: fields.get('socket-mode'),
      socketOwner: fields.get('socket-owner'),
      socketGroup: fields.get('socket-group'),
    },
    where,
    index,
  );
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
