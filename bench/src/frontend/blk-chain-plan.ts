/**
 * Plans how a virtio-blk request is framed into descriptors. The request lives in ONE contiguous guest
 * buffer laid out as
 *
 *   [16-byte header][out data][in data][status padding…][status byte]
 *
 * and every framing the spec allows is just a different way of slicing it: header and data in one
 * descriptor, data and status in one descriptor, data split into many segments, a status descriptor longer
 * than one byte (the status is its LAST byte, as QEMU and Linux treat it). Pure arithmetic.
 */
import { REQUEST_HEADER_SIZE } from '../../../protocol/virtio-blk.js';

export interface BlkFraming {
  /** Header and out data (write payload, discard segments) in one readable descriptor. */
  headerWithData?: boolean;
  /** In data (read payload, GET_ID) and the status in one writable descriptor. */
  statusWithData?: boolean;
  /** Length of the status descriptor; the status is its last byte. Default 1. */
  statusBytes?: number;
  /** Split the data into this many descriptors (as equal as possible). Default 1. */
  dataSegments?: number;
}

export interface PlannedDescriptor {
  /** Offset inside the request buffer. */
  offset: number;
  len: number;
  writable: boolean;
}

export interface BlkChainPlan {
  /** Bytes of the contiguous request buffer. */
  totalBytes: number;
  outOffset: number;
  inOffset: number;
  statusOffset: number;
  descriptors: PlannedDescriptor[];
}

export class FramingError extends Error {
  constructor(detail: string) {
    super(`virtio-blk framing: ${detail}`);
    this.name = 'FramingError';
  }
}

/** Splits `len` bytes at `offset` into `count` nearly equal pieces (empty pieces are dropped). */
function segments(offset: number, len: number, count: number, writable: boolean): PlannedDescriptor[] {
  const pieces: PlannedDescriptor[] = [];
  const base = Math.floor(len / count);
  let remainder = len % count;
  let at = offset;
  for (let i = 0; i < count; i++) {
    const size = base + (remainder > 0 ? 1 : 0);
    if (remainder > 0) remainder--;
    if (size > 0) pieces.push({ offset: at, len: size, writable });
    at += size;
  }
  return pieces;
}

export function planBlkChain(outBytes: number, inBytes: number, framing: BlkFraming = {}): BlkChainPlan {
  const statusBytes = framing.statusBytes ?? 1;
  const dataSegments = framing.dataSegments ?? 1;
  if (!Number.isSafeInteger(outBytes) || outBytes < 0 || !Number.isSafeInteger(inBytes) || inBytes < 0) {
    throw new FramingError(`data sizes must be non-negative integers, got out ${outBytes} in ${inBytes}`);
  }
  if (!Number.isSafeInteger(statusBytes) || statusBytes < 1) throw new FramingError(`statusBytes must be ≥ 1, got ${statusBytes}`);
  if (!Number.isSafeInteger(dataSegments) || dataSegments < 1) throw new FramingError(`dataSegments must be ≥ 1, got ${dataSegments}`);

  const outOffset = REQUEST_HEADER_SIZE;
  const inOffset = outOffset + outBytes;
  const statusStart = inOffset + inBytes;
  const totalBytes = statusStart + statusBytes;
  const descriptors: PlannedDescriptor[] = [];

  if (framing.headerWithData && outBytes > 0) {
    // The first segment carries the header too; the rest of the out data follows in its own segments.
    const outPieces = segments(outOffset, outBytes, dataSegments, false);
    const first = outPieces.shift() as PlannedDescriptor;
    descriptors.push({ offset: 0, len: REQUEST_HEADER_SIZE + first.len, writable: false }, ...outPieces);
  } else {
    descriptors.push({ offset: 0, len: REQUEST_HEADER_SIZE, writable: false });
    if (outBytes > 0) descriptors.push(...segments(outOffset, outBytes, dataSegments, false));
  }

  if (framing.statusWithData && inBytes > 0) {
    const inPieces = segments(inOffset, inBytes, dataSegments, true);
    const last = inPieces.pop() as PlannedDescriptor;
    descriptors.push(...inPieces, { offset: last.offset, len: last.len + statusBytes, writable: true });
  } else {
    if (inBytes > 0) descriptors.push(...segments(inOffset, inBytes, dataSegments, true));
    descriptors.push({ offset: statusStart, len: statusBytes, writable: true });
  }

  return { totalBytes, outOffset, inOffset, statusOffset: totalBytes - 1, descriptors };
}
