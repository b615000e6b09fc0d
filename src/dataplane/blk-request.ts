/**
 * Turns a walked descriptor chain into a validated virtio-blk request, or into the verdict for it.
 *
 * The chain is read as a byte stream (virtio 1.x §2.6.4: descriptor boundaries carry no meaning): the
 * device-readable bytes come first, then the device-writable ones. The header is the first 16 readable
 * bytes, the status is the last writable byte (in the LAST descriptor), and data is what lies between.
 * Rules are applied in a fixed order so a malformed request never reaches the throttle or the disk:
 *   status → header → framing/direction → per-type data rules → range/memory → read-only/unknown type.
 */
import {
  BlkRequestType,
  BlkStatus,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  DISCARD_SEGMENT_SIZE,
  DISCARD_FLAG_UNMAP,
} from '../../protocol/virtio-blk.js';
import { readLe64 } from '../../protocol/virtio.js';
import type { GuestMemory } from './guest-memory.js';
import type { ChainScratch } from './descriptor-chain.js';
import type { DeviceLimits } from './device-limits.js';

export const Disposition = {
  /** No trustworthy status byte: publish nothing (the guest times the request out). */
  Drop: 0,
  /** Answer with `status` without touching the disk. */
  Complete: 1,
  /** Valid: throttle, then execute. */
  Execute: 2,
} as const;
export type DispositionCode = (typeof Disposition)[keyof typeof Disposition];

/** One parsed request; a single instance is reused by its queue. */
export class BlkRequest {
  disposition: DispositionCode = Disposition.Drop;
  status: number = BlkStatus.OK;
  reason = '';
  type = 0;
  sector = 0;
  statusGpa = 0;
  /** Data segments, in stream order. */
  readonly segGpa: Float64Array;
  readonly segLen: Uint32Array;
  segCount = 0;
  dataBytes = 0;
  readonly header = new Uint8Array(REQUEST_HEADER_SIZE);
  private readonly headerView = new DataView(this.header.buffer);

  constructor(readonly segCapacity: number) {
    this.segGpa = new Float64Array(segCapacity);
    this.segLen = new Uint32Array(segCapacity);
  }

  /** Decodes type and sector from the copied header, or from a header found in place (`view` at `at`). */
  decodeHeaderFields(view: DataView = this.headerView, at = 0): void {
    this.type = view.getUint32(at, true);
    this.sector = readLe64(view, at + 8);
  }

  drop(reason: string): DispositionCode {
    this.disposition = Disposition.Drop;
    this.reason = reason;
    return this.disposition;
  }

  complete(status: number, reason: string): DispositionCode {
    this.disposition = Disposition.Complete;
    this.status = status;
    this.reason = reason;
    return this.disposition;
  }

  addSegment(gpa: number, length: number): boolean {
    if (this.segCount >= this.segCapacity) return false;
    this.segGpa[this.segCount] = gpa;
    this.segLen[this.segCount] = length;
    this.segCount++;
    this.dataBytes += length;
    return true;
  }
}

/** Parses `chain` into `request`. `capacityBytes` is read per call: it changes on a live resize. */
export function parseRequest(
  memory: GuestMemory,
  chain: ChainScratch,
  limits: DeviceLimits,
  capacityBytes: number,
  request: BlkRequest,
): DispositionCode {
  request.segCount = 0;
  request.dataBytes = 0;
  request.reason = '';
  request.status = BlkStatus.OK;
  request.type = -1;
  const n = chain.count;

  // Status: the last byte of the last descriptor, which must be device-writable and translatable.
  const last = n - 1;
  if (n === 0 || chain.writable[last] === 0 || (chain.len[last] ?? 0) === 0) {
    return request.drop('no device-writable status descriptor at the end of the chain');
  }
  const statusGpa = (chain.addr[last] ?? Infinity) + (chain.len[last] ?? 0) - 1;
  if (!Number.isSafeInteger(statusGpa) || memory.translate(statusGpa, 1) < 0) {
    return request.drop(`status byte at 0x${statusGpa.toString(16)} is outside guest memory`);
  }
  request.statusGpa = statusGpa;

  // Framing: readable descriptors first, then writable ones.
  let firstWritable = n;
  let readableBytes = 0;
  for (let i = 0; i < n; i++) {
    if (chain.writable[i]) {
      if (firstWritable === n) firstWritable = i;
    } else if (firstWritable !== n) {
      return request.complete(BlkStatus.IOERR, 'device-readable descriptor after a device-writable one');
    } else {
      readableBytes += chain.len[i] ?? 0;
    }
  }
  let writableBytes = 0;
  for (let i = firstWritable; i < n; i++) writableBytes += chain.len[i] ?? 0;

  // Header: the first 16 readable bytes, wherever the descriptor boundaries fall.
  if (readableBytes < REQUEST_HEADER_SIZE) {
    return request.complete(BlkStatus.IOERR, `only ${readableBytes} readable bytes, a request header needs ${REQUEST_HEADER_SIZE}`);
  }
  const inPlace = (chain.len[0] ?? 0) >= REQUEST_HEADER_SIZE ? memory.locate(chain.addr[0] ?? Infinity, REQUEST_HEADER_SIZE) : -1;
  if (inPlace >= 0) {
    // The usual layout: the whole header in the first descriptor, inside one region. Read where it lies.
    request.decodeHeaderFields(memory.hitView, inPlace);
  } else {
    let copied = 0;
    for (let i = 0; copied < REQUEST_HEADER_SIZE; i++) {
      const take = Math.min(chain.len[i] ?? 0, REQUEST_HEADER_SIZE - copied);
      if (take > 0 && !memory.readInto(chain.addr[i] ?? Infinity, request.header, copied, take)) {
        return request.complete(BlkStatus.IOERR, 'request header is outside guest memory');
      }
      copied += take;
    }
    request.decodeHeaderFields();
  }

  const type = request.type;
  const readsData = type === BlkRequestType.IN || type === BlkRequestType.GET_ID;
  const writesData = type === BlkRequestType.OUT || type === BlkRequestType.DISCARD || type === BlkRequestType.WRITE_ZEROES;
  const extraReadable = readableBytes - REQUEST_HEADER_SIZE;
  const extraWritable = writableBytes - 1;

  if (readsData || writesData) {
    if (readsData && extraReadable > 0) return request.complete(BlkStatus.IOERR, 'device-readable data on a request that returns data');
    if (writesData && extraWritable > 0) return request.complete(BlkStatus.IOERR, 'device-writable data on a request that carries data');
    const collected = readsData
      ? collectSegments(chain, firstWritable, n, 0, writableBytes - 1, limits.sizeMax, request)
      : collectSegments(chain, 0, firstWritable, REQUEST_HEADER_SIZE, extraReadable, limits.sizeMax, request);
    if (collected !== null) return request.complete(BlkStatus.IOERR, collected);
    if (request.dataBytes === 0) return request.complete(BlkStatus.IOERR, 'request carries no data');
    for (let s = 0; s < request.segCount; s++) {
      if (!memory.forEachHostPiece(request.segGpa[s] ?? Infinity, request.segLen[s] ?? 0, noop)) {
        return request.complete(BlkStatus.IOERR, `data buffer at 0x${(request.segGpa[s] ?? 0).toString(16)} is outside guest memory`);
      }
    }
  } else if (type === BlkRequestType.FLUSH) {
    if (extraReadable > 0 || extraWritable > 0) return request.complete(BlkStatus.IOERR, 'FLUSH carries data');
  }

  switch (type) {
    case BlkRequestType.IN:
    case BlkRequestType.OUT: {
      const block = limits.logicalBlockSize;
      if (request.dataBytes % block !== 0) {
        return request.complete(BlkStatus.IOERR, `data length ${request.dataBytes} is not a multiple of the ${block}-byte block`);
      }
      if ((request.sector * SECTOR_SIZE) % block !== 0) {
        return request.complete(BlkStatus.IOERR, `sector ${request.sector} is not aligned to the ${block}-byte block`);
      }
      if (!Number.isSafeInteger(request.sector * SECTOR_SIZE) || request.sector * SECTOR_SIZE + request.dataBytes > capacityBytes) {
        return request.complete(BlkStatus.IOERR, `sector ${request.sector} + ${request.dataBytes} bytes is past the end of the disk`);
      }
      if (type === BlkRequestType.OUT && limits.readOnly) return request.complete(BlkStatus.IOERR, 'write to a read-only disk');
      break;
    }
    case BlkRequestType.GET_ID:
      break;
    case BlkRequestType.FLUSH:
      if (limits.readOnly) return request.complete(BlkStatus.OK, 'flush of a read-only disk needs no I/O');
      break;
    case BlkRequestType.DISCARD:
    case BlkRequestType.WRITE_ZEROES: {
      const verdict = checkDiscardShape(request, limits);
      if (verdict !== null) return verdict;
      if (limits.readOnly) return request.complete(BlkStatus.IOERR, 'discard or write-zeroes on a read-only disk');
      break;
    }
    default:
      return request.complete(BlkStatus.UNSUPP, `unsupported request type ${type}`);
  }
  request.disposition = Disposition.Execute;
  return request.disposition;
}

function noop(): void {}

/**
 * Appends the stream bytes [skip, skip+length) of descriptors [from, to) as data segments.
 * Returns null on success or the reason for IOERR.
 */
function collectSegments(
  chain: ChainScratch,
  from: number,
  to: number,
  skip: number,
  length: number,
  sizeMax: number,
  request: BlkRequest,
): string | null {
  let toSkip = skip;
  let remaining = length;
  for (let i = from; i < to && remaining > 0; i++) {
    const len = chain.len[i] ?? 0;
    if (toSkip >= len) {
      toSkip -= len;
      continue;
    }
    const take = Math.min(len - toSkip, remaining);
    if (take > sizeMax) return `data segment of ${take} bytes exceeds size_max ${sizeMax}`;
    const gpa = (chain.addr[i] ?? Infinity) + toSkip;
    if (!Number.isSafeInteger(gpa + take)) return `data segment address 0x${gpa.toString(16)} overflows`;
    if (!request.addSegment(gpa, take)) return 'too many data segments';
    toSkip = 0;
    remaining -= take;
  }
  return null;
}

/** Segment-count and size checks of DISCARD/WRITE_ZEROES that need no guest memory reads (done at execute). */
function checkDiscardShape(request: BlkRequest, limits: DeviceLimits): DispositionCode | null {
  if (request.dataBytes % DISCARD_SEGMENT_SIZE !== 0) {
    return request.complete(BlkStatus.IOERR, `discard payload of ${request.dataBytes} bytes is not a whole number of segments`);
  }
  const segments = request.dataBytes / DISCARD_SEGMENT_SIZE;
  const maxSeg = request.type === BlkRequestType.DISCARD ? limits.maxDiscardSeg : limits.maxWriteZeroesSeg;
  if (segments > maxSeg) return request.complete(BlkStatus.UNSUPP, `${segments} segments, the device advertises at most ${maxSeg}`);
  return null;
}

/** One discard/write-zeroes segment after validation. */
export interface RangeSegment {
  offset: number;
  length: number;
  unmap: boolean;
}

/**
 * Reads and validates the discard/write-zeroes segments of an Execute-ready request.
 * Returns the ranges, or a status code with the reason.
 */
export function readDiscardSegments(
  memory: GuestMemory,
  request: BlkRequest,
  limits: DeviceLimits,
  capacityBytes: number,
): RangeSegment[] | { status: number; reason: string } {
  const payload = new Uint8Array(request.dataBytes);
  let at = 0;
  for (let s = 0; s < request.segCount; s++) {
    const len = request.segLen[s] ?? 0;
    if (!memory.read(request.segGpa[s] ?? Infinity, payload.subarray(at, at + len))) {
      return { status: BlkStatus.IOERR, reason: 'discard segment is outside guest memory' };
    }
    at += len;
  }
  const isWriteZeroes = request.type === BlkRequestType.WRITE_ZEROES;
  const maxSectors = isWriteZeroes ? limits.maxWriteZeroesSectors : limits.maxDiscardSectors;
  const view = new DataView(payload.buffer);
  const ranges: RangeSegment[] = [];
  for (let off = 0; off < payload.length; off += DISCARD_SEGMENT_SIZE) {
    const sector = readLe64(view, off);
    const numSectors = view.getUint32(off + 8, true);
    const flags = view.getUint32(off + 12, true);
    if ((flags & ~DISCARD_FLAG_UNMAP) !== 0) {
      return { status: BlkStatus.UNSUPP, reason: `reserved flag bits 0x${flags.toString(16)} in a discard segment` };
    }
    if (numSectors > maxSectors) {
      return { status: BlkStatus.IOERR, reason: `${numSectors} sectors in one segment, the device advertises at most ${maxSectors}` };
    }
    const offset = sector * SECTOR_SIZE;
    const length = numSectors * SECTOR_SIZE;
    if (!Number.isSafeInteger(offset) || offset + length > capacityBytes) {
      return { status: BlkStatus.IOERR, reason: `segment at sector ${sector} (+${numSectors}) is past the end of the disk` };
    }
    // The unmap flag only means something for WRITE_ZEROES; on DISCARD it is ignored.
    ranges.push({ offset, length, unmap: isWriteZeroes && (flags & DISCARD_FLAG_UNMAP) !== 0 });
  }
  return ranges;
}
