/**
 * Opening an image on the control thread: format selection, header validation, the L1 and refcount tables
 * read into shared memory, and the backing chain (read-only). Produces a structured-clonable
 * LayerDescription that worker threads attach to (qcow2-handle.ts). Malformed images are refused here
 * with Qcow2Error naming what is wrong; what cannot be checked cheaply at open is checked at access.
 */
import * as fs from 'node:fs';
import {
  EXT_ENCRYPTION,
  EXT_EXTERNAL_DATA_FILE,
  HEADER_AUTOCLEAR_OFFSET,
  INCOMPAT_COMPRESSION_TYPE,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFCOUNT_TABLE_BYTES,
  MIN_CLUSTER_BITS,
  Qcow2HeaderError,
  incompatibleFeatureName,
  parseQcow2Header,
  standardEntryOffset,
  type Qcow2Header,
} from '../../../protocol/qcow2.js';
import { Qcow2Error } from './errors.js';
import { fileSize, preadFull, pwriteFull, syncData } from './file-io.js';
import { parseImageFormat, probeFormat, resolveBackingPath, type ImageFormat } from './format-probe.js';
import {
  F_FILE_CLUSTERS,
  F_FREE_HINT,
  F_L1_OFFSET,
  F_L1_SIZE,
  F_RT_ENTRIES,
  F_RT_OFFSET,
  F_SIZE,
  createSharedState,
  viewsOf,
  type LayerDescription,
  type Qcow2Geometry,
} from './shared-state.js';

export interface OpenImageOptions {
  /** Explicit format: always honoured. Undefined: probe (with a warning). */
  readonly format?: ImageFormat;
  readonly readOnly?: boolean;
  /** Bytes of L2 tables cached per image (shared by all threads). Default: enough for the whole disk, at most 32 MiB. */
  readonly l2CacheBytes?: number;
  /** Largest virtual size a live resize may reach (sizes the shared L1 table). Default max(4 × size, 1 TiB). */
  readonly maxVirtualSize?: number;
  readonly warn?: (message: string) => void;
}

const MAX_CHAIN_DEPTH = 64;
const DEFAULT_L2_CACHE_MAX = 32 * 1024 * 1024;

/** Opens `path` and its backing chain; returns the description workers attach to. */
export function openImage(path: string, options: OpenImageOptions = {}): LayerDescription {
  const warn = options.warn ?? ((message: string) => process.emitWarning(message));
  return openLayer(path, options.format, options.readOnly ?? false, options, warn, new Set<string>(), 0);
}

function openLayer(
  path: string,
  explicitFormat: ImageFormat | undefined,
  readOnly: boolean,
  options: OpenImageOptions,
  warn: (message: string) => void,
  visited: Set<string>,
  depth: number,
): LayerDescription {
  if (depth > MAX_CHAIN_DEPTH) throw new Qcow2Error('QCOW2_FORMAT', `backing chain deeper than ${MAX_CHAIN_DEPTH}`);
  let real: string;
  try {
    real = fs.realpathSync(path);
  } catch (error) {
    throw new Qcow2Error('QCOW2_IO', `cannot open image ${path}: ${(error as Error).message}`);
  }
  if (visited.has(real)) throw new Qcow2Error('QCOW2_FORMAT', `backing chain loop: ${path} appears twice`);
  visited.add(real);
  let fd: number;
  try {
    fd = fs.openSync(path, readOnly ? 'r' : 'r+');
  } catch (error) {
    throw new Qcow2Error('QCOW2_IO', `cannot open image ${path}: ${(error as Error).message}`);
  }
  try {
    let format = explicitFormat;
    const probed = format === undefined;
    if (format === undefined) {
      format = probeFormat(fd);
      warn(`image ${path}: no format given, probed '${format}'; give the format explicitly (probing a guest-writable image is unsafe)`);
    }
    if (format === 'raw') return { format: 'raw', path, readOnly, size: fileSize(fd) };
    return openQcow2(fd, path, readOnly, probed, options, warn, visited, depth);
  } finally {
    fs.closeSync(fd);
  }
}

function refuse(path: string, feature: string): never {
  throw new Qcow2Error('QCOW2_UNSUPPORTED', `qcow2 image ${path} uses ${feature}, which vublk does not support`);
}

function invalid(path: string, what: string): never {
  throw new Qcow2Error('QCOW2_INVALID', `qcow2 image ${path} is invalid: ${what}`);
}

function readHeader(fd: number, path: string, bytes: number): Qcow2Header {
  const first = Buffer.alloc(Math.min(bytes, 1 << MIN_CLUSTER_BITS));
  preadFull(fd, first, 0);
  const clusterBits = first.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    if (first.readUInt32BE(0) === 0x514649fb) refuse(path, `a cluster size of 2^${clusterBits} bytes (4 KiB to 2 MiB are supported)`);
  }
  const whole = Buffer.alloc(Math.min(bytes, 2 ** Math.min(Math.max(clusterBits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)));
  preadFull(fd, whole, 0);
  try {
    return parseQcow2Header(whole);
  } catch (error) {
    if (error instanceof Qcow2HeaderError) invalid(path, error.message);
    throw error;
  }
}

function openQcow2(
  fd: number,
  path: string,
  readOnly: boolean,
  probed: boolean,
  options: OpenImageOptions,
  warn: (message: string) => void,
  visited: Set<string>,
  depth: number,
): LayerDescription {
  const fileBytes = fileSize(fd);
  const header = readHeader(fd, path, fileBytes);
  const cs = 2 ** header.clusterBits;
  const fileClusters = Math.ceil(fileBytes / cs);

  // Features vublk does not implement, by name.
  if (header.cryptMethod !== 0 || header.extensions.some((e) => e.type === EXT_ENCRYPTION)) refuse(path, 'encryption');
  if (header.extensions.some((e) => e.type === EXT_EXTERNAL_DATA_FILE)) refuse(path, 'an external data file');
  for (let bit = 0; bit < 64; bit++) {
    if ((header.incompatibleFeatures & (1n << BigInt(bit))) === 0n) continue;
    if (1n << BigInt(bit) === INCOMPAT_COMPRESSION_TYPE && header.compressionType === 0) continue;
    const name = incompatibleFeatureName(bit, header);
    if (bit === 0) refuse(path, 'the dirty bit (lazy refcounts need a repair: qemu-img check -r all)');
    if (bit === 1) refuse(path, 'the corrupt bit (repair it with qemu-img check -r all)');
    if (bit === 3) refuse(path, `compression type ${header.compressionType} (only deflate is supported)`);
    refuse(path, name);
  }
  if (header.compressionType !== 0) refuse(path, `compression type ${header.compressionType} (only deflate is supported)`);
  if (header.refcountOrder > 6) invalid(path, `refcount_order ${header.refcountOrder} is above 6`);

  // Geometry and table placement.
  const l2Entries = cs / 8;
  const bytesPerL1Entry = cs * l2Entries;
  if (header.size % 512 !== 0) invalid(path, `virtual size ${header.size} is not a multiple of 512`);
  const neededL1 = Math.ceil(header.size / bytesPerL1Entry);
  if (header.l1Size < neededL1) invalid(path, `l1_size ${header.l1Size} is too small for ${header.size} bytes`);
  if (header.l1Size * 8 > MAX_L1_BYTES) invalid(path, `l1_size ${header.l1Size} exceeds 32 MiB`);
  const checkTable = (offset: number, bytes: number, name: string): void => {
    if (offset % cs !== 0) invalid(path, `${name} offset ${offset} is not cluster aligned`);
    if (bytes > 0 && (offset === 0 || offset + bytes > fileClusters * cs))
      invalid(path, `${name} (${bytes} bytes at ${offset}) lies outside the file`);
  };
  checkTable(header.l1TableOffset, header.l1Size * 8, 'L1 table');
  if (header.refcountTableClusters === 0) invalid(path, 'refcount table has no clusters');
  if (header.refcountTableClusters * cs > MAX_REFCOUNT_TABLE_BYTES) invalid(path, 'refcount table exceeds 8 MiB');
  checkTable(header.refcountTableOffset, header.refcountTableClusters * cs, 'refcount table');
  if (header.nbSnapshots > 0) checkTable(header.snapshotsOffset, 1, 'snapshot table');
  const headerClusterEnd = 1;
  const l1Clusters: [number, number] = [header.l1TableOffset / cs, Math.ceil((header.l1Size * 8) / cs)];
  const rtClusters: [number, number] = [header.refcountTableOffset / cs, header.refcountTableClusters];
  const overlaps = (a: [number, number], b: [number, number]): boolean => a[1] > 0 && b[1] > 0 && a[0] < b[0] + b[1] && b[0] < a[0] + a[1];
  const headerRange: [number, number] = [0, headerClusterEnd];
  if (overlaps(l1Clusters, headerRange) || overlaps(rtClusters, headerRange) || overlaps(l1Clusters, rtClusters)) {
    invalid(path, 'header, L1 table and refcount table overlap');
  }

  const refcountBits = 2 ** header.refcountOrder;
  const geometry: Qcow2Geometry = {
    version: header.version as 2 | 3,
    clusterBits: header.clusterBits,
    clusterSize: cs,
    l2Entries,
    refcountOrder: header.refcountOrder,
    refcountBlockEntries: (cs * 8) / refcountBits,
    headerClusterEnd,
    snapshotsOffset: header.snapshotsOffset,
    nbSnapshots: header.nbSnapshots,
  };

  // Backing chain (read-only), resolved before any shared memory is made.
  let backing: LayerDescription | null = null;
  if (header.backingFile !== undefined) {
    if (probed && header.backingFormat === undefined) {
      throw new Qcow2Error(
        'QCOW2_FORMAT',
        `image ${path} was probed as qcow2 and names backing file '${header.backingFile}' without a backing format; give format=qcow2 explicitly`,
      );
    }
    const backingPath = resolveBackingPath(path, header.backingFile);
    const backingFormat =
      header.backingFormat === undefined ? undefined : parseImageFormat(header.backingFormat, `backing file of ${path}`);
    backing = openLayer(backingPath, backingFormat, true, { ...options, format: backingFormat }, warn, visited, depth + 1);
  }

  // Read-only layers (backing files) never grow: their shared tables are sized exactly.
  const maxVirtual = Math.max(options.maxVirtualSize ?? 0, header.size * 4, 2 ** 40);
  const l1Capacity = readOnly
    ? header.l1Size
    : Math.max(header.l1Size, Math.min(MAX_L1_BYTES / 8, Math.ceil(maxVirtual / bytesPerL1Entry)));
  const rtCapacity = readOnly ? (header.refcountTableClusters * cs) / 8 : MAX_REFCOUNT_TABLE_BYTES / 8;
  const wantedCache = options.l2CacheBytes ?? Math.min(DEFAULT_L2_CACHE_MAX, Math.max(neededL1, 1) * cs);
  const l2Slots = Math.max(4, Math.ceil(Math.min(wantedCache / cs, Math.max(header.l1Size, 4)) / 4) * 4);
  const shared = createSharedState(geometry, l1Capacity, rtCapacity, l2Slots, backing);
  const views = viewsOf(shared);

  // L1 table: every entry must point at an aligned cluster inside the file, away from the header and tables.
  const l1Bytes = Buffer.alloc(header.l1Size * 8);
  preadFull(fd, l1Bytes, header.l1TableOffset);
  for (let i = 0; i < header.l1Size; i++) {
    const hi = l1Bytes.readUInt32BE(i * 8);
    const lo = l1Bytes.readUInt32BE(i * 8 + 4);
    const offset = standardEntryOffset(hi, lo);
    if (offset !== 0) {
      if ((hi & L1_RESERVED_HI) !== 0 || (lo & L1_RESERVED_LO) !== 0) invalid(path, `L1 entry ${i} has reserved bits set`);
      if (offset % cs !== 0) invalid(path, `L1 entry ${i} (${offset}) is not cluster aligned`);
      const cluster = offset / cs;
      if (cluster >= fileClusters) invalid(path, `L1 entry ${i} points past the end of the file`);
      if (overlaps([cluster, 1], headerRange) || overlaps([cluster, 1], l1Clusters) || overlaps([cluster, 1], rtClusters)) {
        invalid(path, `L1 entry ${i} points into metadata`);
      }
    }
    views.l1[i * 2] = offset === 0 ? 0 : hi;
    views.l1[i * 2 + 1] = offset === 0 ? 0 : lo;
  }

  // Refcount table: entries must be aligned clusters inside the file, away from the header and L1.
  const rtEntries = (header.refcountTableClusters * cs) / 8;
  const rtBytes = Buffer.alloc(rtEntries * 8);
  preadFull(fd, rtBytes, header.refcountTableOffset);
  for (let i = 0; i < rtEntries; i++) {
    const value = rtBytes.readBigUInt64BE(i * 8) & ~0x1ffn;
    if (value === 0n) continue;
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) invalid(path, `refcount table entry ${i} is out of range`);
    const offset = Number(value);
    if (offset % cs !== 0) invalid(path, `refcount table entry ${i} is not cluster aligned`);
    const cluster = offset / cs;
    if (cluster >= fileClusters) invalid(path, `refcount block ${i} lies past the end of the file`);
    if (overlaps([cluster, 1], headerRange) || overlaps([cluster, 1], l1Clusters) || overlaps([cluster, 1], rtClusters)) {
      invalid(path, `refcount block ${i} overlaps the header or a table`);
    }
    views.refcountTable[i] = offset;
  }

  views.floats[F_SIZE] = header.size;
  views.floats[F_L1_OFFSET] = header.l1TableOffset;
  views.floats[F_L1_SIZE] = header.l1Size;
  views.floats[F_RT_OFFSET] = header.refcountTableOffset;
  views.floats[F_RT_ENTRIES] = rtEntries;
  views.floats[F_FILE_CLUSTERS] = fileClusters;
  views.floats[F_FREE_HINT] = 0;

  if (!readOnly && header.version === 3 && header.autoclearFeatures !== 0n) {
    // Autoclear bits describe data (e.g. dirty bitmaps) vublk does not keep up to date: clear them before writing.
    pwriteFull(fd, new Uint8Array(8), HEADER_AUTOCLEAR_OFFSET);
    syncData(fd);
    warn(
      `image ${path}: cleared autoclear feature bits 0x${header.autoclearFeatures.toString(16)} (e.g. persistent bitmaps become invalid)`,
    );
  }
  return { format: 'qcow2', path, readOnly, shared };
}
