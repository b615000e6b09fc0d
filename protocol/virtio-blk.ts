/**
 * virtio-blk wire formats (virtio 1.2 §5.2): feature bits, request types and status codes,
 * the request header, discard/write-zeroes segments, and the device configuration space.
 * Pure data: no I/O. All fields are little-endian (legacy drivers on x86 are little-endian too).
 */
import { readLe64 } from './virtio.js';

export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

export const BlkRequestType = {
  IN: 0,
  OUT: 1,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
} as const;

const REQUEST_NAMES: Readonly<Record<number, string>> = {
  [BlkRequestType.IN]: 'read',
  [BlkRequestType.OUT]: 'write',
  [BlkRequestType.FLUSH]: 'flush',
  [BlkRequestType.GET_ID]: 'get-id',
  [BlkRequestType.DISCARD]: 'discard',
  [BlkRequestType.WRITE_ZEROES]: 'write-zeroes',
};

/** A request type as logs and reports name it (`read`, `write-zeroes`, ... or `type N`). */
export function blkRequestName(type: number): string {
  return REQUEST_NAMES[type] ?? `type ${type}`;
}

export const BlkStatus = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;

/** Sector unit of the `sector` field and of capacity, whatever the logical block size. */
export const SECTOR_SIZE = 512;
/** `struct virtio_blk_outhdr`: le32 type, le32 ioprio, le64 sector. */
export const REQUEST_HEADER_SIZE = 16;
/** GET_ID answers with exactly this many bytes (zero-padded, not NUL-terminated when full). */
export const BLK_ID_BYTES = 20;
/** `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors, le32 flags. */
export const DISCARD_SEGMENT_SIZE = 16;
export const DISCARD_FLAG_UNMAP = 0x1;

export interface BlkRequestHeader {
  type: number;
  ioprio: number;
  sector: number;
}

/** Decodes the 16-byte request header; sector above 2^53 decodes as Infinity so range checks reject it. */
export function decodeRequestHeader(bytes: Uint8Array): BlkRequestHeader {
  if (bytes.length < REQUEST_HEADER_SIZE) {
    throw new RangeError(`virtio-blk header needs ${REQUEST_HEADER_SIZE} bytes, got ${bytes.length}`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, REQUEST_HEADER_SIZE);
  return {
    type: view.getUint32(0, true),
    ioprio: view.getUint32(4, true),
    sector: readLe64(view, 8),
  };
}

export function encodeRequestHeader(header: BlkRequestHeader): Uint8Array {
  const bytes = new Uint8Array(REQUEST_HEADER_SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, header.type, true);
  view.setUint32(4, header.ioprio, true);
  view.setBigUint64(8, BigInt(header.sector), true);
  return bytes;
}

export interface DiscardSegment {
  sector: number;
  numSectors: number;
  flags: number;
}

export function encodeDiscardSegment(segment: DiscardSegment): Uint8Array {
  const bytes = new Uint8Array(DISCARD_SEGMENT_SIZE);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, BigInt(segment.sector), true);
  view.setUint32(8, segment.numSectors, true);
  view.setUint32(12, segment.flags, true);
  return bytes;
}

/** The fields of `struct virtio_blk_config` that vublk fills in. */
export interface BlkConfig {
  /** Size in 512-byte sectors. */
  capacity: number;
  sizeMax: number;
  segMax: number;
  blkSize: number;
  physicalBlockExp: number;
  alignmentOffset: number;
  minIoSize: number;
  optIoSize: number;
  /** 1 = writeback cache (guest must FLUSH), 0 = writethrough. */
  writeback: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: number;
}

/** Byte offsets inside `struct virtio_blk_config` (virtio 1.2 §5.2.4). */
export const BlkConfigOffset = {
  capacity: 0,
  sizeMax: 8,
  segMax: 12,
  geometry: 16,
  blkSize: 20,
  physicalBlockExp: 24,
  alignmentOffset: 25,
  minIoSize: 26,
  optIoSize: 28,
  writeback: 32,
  numQueues: 34,
  maxDiscardSectors: 36,
  maxDiscardSeg: 40,
  discardSectorAlignment: 44,
  maxWriteZeroesSectors: 48,
  maxWriteZeroesSeg: 52,
  writeZeroesMayUnmap: 56,
} as const;

/** Includes the secure-erase and zoned fields (left zero) so any config_len a front-end asks for is covered. */
export const BLK_CONFIG_SIZE = 96;

export function encodeBlkConfig(config: BlkConfig): Uint8Array {
  const bytes = new Uint8Array(BLK_CONFIG_SIZE);
  const view = new DataView(bytes.buffer);
  const o = BlkConfigOffset;
  view.setBigUint64(o.capacity, BigInt(config.capacity), true);
  view.setUint32(o.sizeMax, config.sizeMax, true);
  view.setUint32(o.segMax, config.segMax, true);
  view.setUint32(o.blkSize, config.blkSize, true);
  view.setUint8(o.physicalBlockExp, config.physicalBlockExp);
  view.setUint8(o.alignmentOffset, config.alignmentOffset);
  view.setUint16(o.minIoSize, config.minIoSize, true);
  view.setUint32(o.optIoSize, config.optIoSize, true);
  view.setUint8(o.writeback, config.writeback);
  view.setUint16(o.numQueues, config.numQueues, true);
  view.setUint32(o.maxDiscardSectors, config.maxDiscardSectors, true);
  view.setUint32(o.maxDiscardSeg, config.maxDiscardSeg, true);
  view.setUint32(o.discardSectorAlignment, config.discardSectorAlignment, true);
  view.setUint32(o.maxWriteZeroesSectors, config.maxWriteZeroesSectors, true);
  view.setUint32(o.maxWriteZeroesSeg, config.maxWriteZeroesSeg, true);
  view.setUint8(o.writeZeroesMayUnmap, config.writeZeroesMayUnmap);
  return bytes;
}

export function decodeBlkConfig(bytes: Uint8Array): BlkConfig {
  if (bytes.length < 60) throw new RangeError(`virtio_blk_config needs at least 60 bytes, got ${bytes.length}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const o = BlkConfigOffset;
  return {
    capacity: Number(view.getBigUint64(o.capacity, true)),
    sizeMax: view.getUint32(o.sizeMax, true),
    segMax: view.getUint32(o.segMax, true),
    blkSize: view.getUint32(o.blkSize, true),
    physicalBlockExp: view.getUint8(o.physicalBlockExp),
    alignmentOffset: view.getUint8(o.alignmentOffset),
    minIoSize: view.getUint16(o.minIoSize, true),
    optIoSize: view.getUint32(o.optIoSize, true),
    writeback: view.getUint8(o.writeback),
    numQueues: view.getUint16(o.numQueues, true),
    maxDiscardSectors: view.getUint32(o.maxDiscardSectors, true),
    maxDiscardSeg: view.getUint32(o.maxDiscardSeg, true),
    discardSectorAlignment: view.getUint32(o.discardSectorAlignment, true),
    maxWriteZeroesSectors: view.getUint32(o.maxWriteZeroesSectors, true),
    maxWriteZeroesSeg: view.getUint32(o.maxWriteZeroesSeg, true),
    writeZeroesMayUnmap: view.getUint8(o.writeZeroesMayUnmap),
  };
}
