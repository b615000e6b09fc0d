/**
 * What a guest range maps to. The data plane moves the bytes (preadv/pwritev/io_uring straight into guest
 * memory); the format layer only says where they are.
 */

/** Guest bytes stored at `hostOffset` of `fd` (the top image or a backing file). */
export interface DataExtent {
  readonly kind: 'data';
  readonly fd: number;
  readonly hostOffset: number;
  readonly length: number;
}

/** Guest bytes that read as zeroes (unallocated without backing, zero clusters, past the backing's end). */
export interface ZeroExtent {
  readonly kind: 'zero';
  readonly length: number;
}

/**
 * Guest bytes inside a compressed cluster: call `handle.readCompressed(extent, into)` to get them
 * (inflated in memory, then copied by the engine).
 */
export interface CompressedExtent {
  readonly kind: 'compressed';
  readonly source: CompressedSource;
  readonly hostOffset: number;
  readonly maxLength: number;
  readonly offsetInCluster: number;
  readonly length: number;
}

export interface CompressedSource {
  /** Copies `extent.length` bytes of the inflated cluster (from offsetInCluster) into `into`. */
  readCompressed(extent: CompressedExtent, into: Uint8Array): void;
}

export type ReadExtent = DataExtent | ZeroExtent | CompressedExtent;

/** Where to write guest bytes: always the top image's fd. */
export interface WriteExtent {
  readonly fd: number;
  readonly hostOffset: number;
  readonly length: number;
}

/** Returned by prepareWrite/discard/writeZeroes when another in-flight allocation holds one of the clusters. */
export const RETRY = -1;
/** Ticket of a write that needs no commit (in-place overwrite of allocated clusters, raw images). */
export const NO_COMMIT = 0;

/** Pushes an extent, merging it into the previous one when they are contiguous. */
export function pushReadExtent(out: ReadExtent[], extent: ReadExtent): void {
  const last = out[out.length - 1];
  if (last !== undefined) {
    if (last.kind === 'zero' && extent.kind === 'zero') {
      out[out.length - 1] = { kind: 'zero', length: last.length + extent.length };
      return;
    }
    if (last.kind === 'data' && extent.kind === 'data' && last.fd === extent.fd && last.hostOffset + last.length === extent.hostOffset) {
      out[out.length - 1] = { kind: 'data', fd: last.fd, hostOffset: last.hostOffset, length: last.length + extent.length };
      return;
    }
  }
  out.push(extent);
}

export function pushWriteExtent(out: WriteExtent[], extent: WriteExtent): void {
  const last = out[out.length - 1];
  if (last !== undefined && last.fd === extent.fd && last.hostOffset + last.length === extent.hostOffset) {
    out[out.length - 1] = { fd: last.fd, hostOffset: last.hostOffset, length: last.length + extent.length };
    return;
  }
  out.push(extent);
}
