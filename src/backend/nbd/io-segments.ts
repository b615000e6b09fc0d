/**
 * Host-memory scatter lists (guest buffers already translated to host addresses) and the one operation the
 * NBD client needs on them: write the iovecs covering bytes [start, start+length) of the list, skipping
 * whole segments before `start`. Addresses are Numbers (< 2^53); an iovec is written as four u32 words.
 */

/** What a caller hands in: `count` segments of host memory. Copied at submission; the caller may reuse it. */
export interface IoSegments {
  readonly count: number;
  readonly addresses: ArrayLike<number>;
  readonly lengths: ArrayLike<number>;
}

/** The client's own copy of a request's segments. */
export class SegmentList {
  readonly addresses: Float64Array;
  readonly lengths: Float64Array;
  readonly count: number;
  readonly totalBytes: number;

  constructor(segments: IoSegments) {
    this.count = segments.count;
    this.addresses = new Float64Array(segments.count);
    this.lengths = new Float64Array(segments.count);
    let total = 0;
    for (let i = 0; i < segments.count; i++) {
      const address = segments.addresses[i] ?? 0;
      const length = segments.lengths[i] ?? 0;
      if (!Number.isSafeInteger(address) || address <= 0 || !Number.isSafeInteger(length) || length < 0) {
        throw new RangeError(`segment ${i} has a bad address or length`);
      }
      this.addresses[i] = address;
      this.lengths[i] = length;
      total += length;
    }
    this.totalBytes = total;
  }

  /**
   * Writes iovecs for bytes [start, start+length) into `iov` (u32 words, 4 per iovec) from iovec index `at`,
   * at most `max - at` of them. Returns the index after the last iovec written.
   */
  fill(start: number, length: number, iov: Uint32Array, at: number, max: number): number {
    let skip = start;
    let left = length;
    let out = at;
    for (let s = 0; s < this.count && left > 0 && out < max; s++) {
      const segLength = this.lengths[s] ?? 0;
      if (skip >= segLength) {
        skip -= segLength;
        continue;
      }
      const take = Math.min(segLength - skip, left);
      writeIovec(iov, out++, (this.addresses[s] ?? 0) + skip, take);
      left -= take;
      skip = 0;
    }
    return out;
  }

  /** Calls `visit(address, length)` for each piece of bytes [start, start+length). */
  forEach(start: number, length: number, visit: (address: number, length: number) => void): void {
    let skip = start;
    let left = length;
    for (let s = 0; s < this.count && left > 0; s++) {
      const segLength = this.lengths[s] ?? 0;
      if (skip >= segLength) {
        skip -= segLength;
        continue;
      }
      const take = Math.min(segLength - skip, left);
      visit((this.addresses[s] ?? 0) + skip, take);
      left -= take;
      skip = 0;
    }
  }
}

export function writeIovec(iov: Uint32Array, index: number, address: number, length: number): void {
  const w = index * 4;
  iov[w] = address % 0x1_0000_0000;
  iov[w + 1] = Math.floor(address / 0x1_0000_0000);
  iov[w + 2] = length % 0x1_0000_0000;
  iov[w + 3] = Math.floor(length / 0x1_0000_0000);
}
