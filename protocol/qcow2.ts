/**
 * qcow2 on-disk layout (QEMU docs/interop/qcow2.txt): the header, its extensions, and the bit fields of
 * L1/L2/refcount entries. Pure codecs, no I/O. All multi-byte fields are big-endian.
 * Offsets are JavaScript Numbers: a field above 2^53 can only come from a broken image and is reported
 * as invalid by the parser instead of being rounded.
 */
import { VublkError } from './errors.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW2_V2_HEADER_LENGTH = 72;
export const QCOW2_V3_HEADER_LENGTH = 104;

/** Incompatible feature bits (header offset 72, v3). */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_EXTERNAL_DATA = 1n << 2n;
export const INCOMPAT_COMPRESSION_TYPE = 1n << 3n;
export const INCOMPAT_EXTENDED_L2 = 1n << 4n;
/** Compatible feature bits (header offset 80, v3). */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

/** Header extension types. */
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_ENCRYPTION = 0x0537be77;
export const EXT_EXTERNAL_DATA_FILE = 0x44415441;

/** L1/L2 entry bits, as seen in the high and low 32-bit halves of the big-endian u64. */
export const ENTRY_COPIED_HI = 0x8000_0000; // bit 63
export const ENTRY_COMPRESSED_HI = 0x4000_0000; // bit 62 (L2 only)
export const L2_ZERO_LO = 0x1; // bit 0 (v3, standard clusters only)
/** Bits 9..55 of a standard entry hold the host offset. */
export const OFFSET_MASK_HI = 0x00ff_ffff;
export const OFFSET_MASK_LO = 0xffff_fe00;
/** Reserved bits of an L1 entry (1..8 and 56..62) and of a standard L2 entry (1..8 and 56..61). */
export const L1_RESERVED_HI = 0x7f00_0000;
export const L1_RESERVED_LO = 0x0000_01ff;
export const L2_RESERVED_HI = 0x3f00_0000;
export const L2_RESERVED_LO = 0x0000_01fe;
export const REFCOUNT_TABLE_RESERVED_LO = 0x0000_01ff;

export const MIN_CLUSTER_BITS = 12; // 4 KiB: the smallest vublk supports (QEMU allows 512 B)
export const MAX_CLUSTER_BITS = 21; // 2 MiB
/** QEMU's limits: an L1 table of at most 32 MiB, a refcount table of at most 8 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
export const MAX_BACKING_NAME_BYTES = 1023;

export interface Qcow2HeaderExtension {
  readonly type: number;
  readonly offset: number; // where its data starts in the file
  readonly data: Uint8Array;
}

export interface Qcow2Header {
  readonly version: number;
  readonly backingFileOffset: number;
  readonly backingFileSize: number;
  readonly clusterBits: number;
  readonly size: number;
  readonly cryptMethod: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: bigint;
  readonly compatibleFeatures: bigint;
  readonly autoclearFeatures: bigint;
  readonly refcountOrder: number;
  readonly headerLength: number;
  readonly compressionType: number;
  readonly extensions: readonly Qcow2HeaderExtension[];
  /** The backing file name (from backingFileOffset) or undefined. */
  readonly backingFile: string | undefined;
  /** The backing format extension's text, if recorded. */
  readonly backingFormat: string | undefined;
  /** Names for feature bits from the feature name table: key "type:bit" (type 0 incompat, 1 compat, 2 autoclear). */
  readonly featureNames: ReadonlyMap<string, string>;
}

/** The header could not be decoded; `field` names the offending part. */
export class Qcow2HeaderError extends VublkError {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super('VUBLK_ERR_QCOW2_HEADER', message, { peerFault: true });
  }
}

function u64(view: DataView, offset: number, field: string): number {
  const value = view.getBigUint64(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2HeaderError(field, `${field} ${value} is out of range`);
  return Number(value);
}

/** True when `bytes` starts with the qcow2 magic (used by format probing). */
export function hasQcow2Magic(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0) === QCOW2_MAGIC;
}

/**
 * Decodes the header and its extensions from the first cluster of the file (`bytes` must hold at least
 * the header; extensions and the backing name are read from it when they lie inside).
 */
export function parseQcow2Header(bytes: Uint8Array): Qcow2Header {
  if (bytes.length < QCOW2_V2_HEADER_LENGTH) throw new Qcow2HeaderError('length', 'file too short for a qcow2 header');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) throw new Qcow2HeaderError('magic', 'not a qcow2 image (bad magic)');
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) throw new Qcow2HeaderError('version', `qcow2 version ${version} is not supported (2 and 3 are)`);
  const backingFileOffset = u64(view, 8, 'backing_file_offset');
  const backingFileSize = view.getUint32(16);
  const clusterBits = view.getUint32(20);
  const size = u64(view, 24, 'size');
  const cryptMethod = view.getUint32(32);
  const l1Size = view.getUint32(36);
  const l1TableOffset = u64(view, 40, 'l1_table_offset');
  const refcountTableOffset = u64(view, 48, 'refcount_table_offset');
  const refcountTableClusters = view.getUint32(56);
  const nbSnapshots = view.getUint32(60);
  const snapshotsOffset = u64(view, 64, 'snapshots_offset');
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = QCOW2_V2_HEADER_LENGTH;
  let compressionType = 0;
  if (version === 3) {
    if (bytes.length < QCOW2_V3_HEADER_LENGTH) throw new Qcow2HeaderError('length', 'file too short for a qcow2 v3 header');
    incompatibleFeatures = view.getBigUint64(72);
    compatibleFeatures = view.getBigUint64(80);
    autoclearFeatures = view.getBigUint64(88);
    refcountOrder = view.getUint32(96);
    headerLength = view.getUint32(100);
    if (headerLength < QCOW2_V3_HEADER_LENGTH) throw new Qcow2HeaderError('header_length', `header_length ${headerLength} is below 104`);
    if (headerLength > 104) {
      if (bytes.length < 105) throw new Qcow2HeaderError('length', 'file too short for the compression type field');
      compressionType = view.getUint8(104);
    }
  }
  if (headerLength > bytes.length) throw new Qcow2HeaderError('header_length', `header_length ${headerLength} exceeds the first cluster`);

  const extensions: Qcow2HeaderExtension[] = [];
  let backingFormat: string | undefined;
  const featureNames = new Map<string, string>();
  // Extensions follow the header (v2: from byte 72) up to the end marker; bounded by the bytes we have.
  let at = headerLength;
  for (let guard = 0; guard < 4096; guard++) {
    if (at + 8 > bytes.length) break; // v2 images without extensions may end right here
    const type = view.getUint32(at);
    const length = view.getUint32(at + 4);
    if (type === EXT_END) break;
    const dataStart = at + 8;
    if (length > bytes.length - dataStart)
      throw new Qcow2HeaderError('extension', `header extension 0x${type.toString(16)} overruns the first cluster`);
    const data = bytes.subarray(dataStart, dataStart + length);
    extensions.push({ type, offset: dataStart, data });
    if (type === EXT_BACKING_FORMAT) backingFormat = new TextDecoder().decode(data);
    if (type === EXT_FEATURE_NAMES) {
      for (let e = 0; e + 48 <= data.length; e += 48) {
        const name = new TextDecoder().decode(data.subarray(e + 2, e + 48)).replace(/\0.*$/s, '');
        featureNames.set(`${data[e]}:${data[e + 1]}`, name);
      }
    }
    at = dataStart + Math.ceil(length / 8) * 8;
  }

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize === 0 || backingFileSize > MAX_BACKING_NAME_BYTES)
      throw new Qcow2HeaderError('backing_file_size', `backing file name length ${backingFileSize} is out of range`);
    if (backingFileOffset + backingFileSize > bytes.length)
      throw new Qcow2HeaderError('backing_file_offset', 'backing file name lies outside the first cluster');
    backingFile = new TextDecoder().decode(bytes.subarray(backingFileOffset, backingFileOffset + backingFileSize));
  }
  return {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    extensions,
    backingFile,
    backingFormat,
    featureNames,
  };
}

/** Names of the well-known incompatible bits; unknown ones are named from the image's feature table. */
export function incompatibleFeatureName(bit: number, header: Pick<Qcow2Header, 'featureNames'>): string {
  const known: Record<number, string> = {
    0: 'dirty',
    1: 'corrupt',
    2: 'external data file',
    3: 'compression type',
    4: 'extended L2 entries',
  };
  return known[bit] ?? header.featureNames.get(`0:${bit}`) ?? `unknown incompatible feature bit ${bit}`;
}

/** Encodes the L1/L2 u64 entry fields of a Number offset into hi/lo halves. */
export function offsetHi(offset: number): number {
  return Math.floor(offset / 0x1_0000_0000) >>> 0;
}
export function offsetLo(offset: number): number {
  return offset >>> 0;
}

/** The host offset held in a standard (non-compressed) L1 or L2 entry. */
export function standardEntryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_MASK_HI) * 0x1_0000_0000 + ((lo & OFFSET_MASK_LO) >>> 0);
}

/** Where a compressed cluster's deflate stream lies (spec: "Compressed Clusters Descriptor"). */
export interface CompressedDescriptor {
  readonly hostOffset: number;
  /** Bytes that may hold the stream: whole 512-byte sectors counted from the sector of hostOffset. */
  readonly maxLength: number;
}

export function decodeCompressedEntry(hi: number, lo: number, clusterBits: number): CompressedDescriptor {
  const x = 62 - (clusterBits - 8); // bits 0..x-1: offset; x..61: additional sectors
  const value = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const offset = Number(value & ((1n << BigInt(x)) - 1n));
  const sectors = Number((value >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
  return { hostOffset: offset, maxLength: sectors * 512 - (offset % 512) };
}

/** Byte offsets of the header fields vublk rewrites (resize, autoclear). */
export const HEADER_SIZE_OFFSET = 24;
export const HEADER_L1_SIZE_OFFSET = 36;
export const HEADER_L1_TABLE_OFFSET = 40;
export const HEADER_AUTOCLEAR_OFFSET = 88;

/**
 * Reads and writes refcount entries of 2^order bits inside a refcount block (big-endian, MSB-first inside a
 * byte for sub-byte widths, as QEMU stores them).
 */
export function readRefcount(block: Uint8Array, index: number, order: number): number {
  switch (order) {
    case 4:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 3:
      return block[index]!;
    case 5:
      return ((block[index * 4]! << 24) | (block[index * 4 + 1]! << 16) | (block[index * 4 + 2]! << 8) | block[index * 4 + 3]!) >>> 0;
    case 6: {
      const hi = ((block[index * 8]! << 24) | (block[index * 8 + 1]! << 16) | (block[index * 8 + 2]! << 8) | block[index * 8 + 3]!) >>> 0;
      const lo =
        ((block[index * 8 + 4]! << 24) | (block[index * 8 + 5]! << 16) | (block[index * 8 + 6]! << 8) | block[index * 8 + 7]!) >>> 0;
      return hi * 0x1_0000_0000 + lo;
    }
    default: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)]!;
      const shift = (index % perByte) * bits; // QEMU: entry i of a byte lives in bits i*width (LSB first)
      return (byte >> shift) & ((1 << bits) - 1);
    }
  }
}

export function writeRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  switch (order) {
    case 4:
      block[index * 2] = (value >>> 8) & 0xff;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 3:
      block[index] = value & 0xff;
      return;
    case 5:
      for (let i = 0; i < 4; i++) block[index * 4 + i] = (value >>> (24 - 8 * i)) & 0xff;
      return;
    case 6: {
      const hi = Math.floor(value / 0x1_0000_0000);
      for (let i = 0; i < 4; i++) block[index * 8 + i] = (hi >>> (24 - 8 * i)) & 0xff;
      for (let i = 0; i < 4; i++) block[index * 8 + 4 + i] = (value >>> (24 - 8 * i)) & 0xff;
      return;
    }
    default: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at]! & ~mask) | ((value << shift) & mask);
    }
  }
}

export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}
