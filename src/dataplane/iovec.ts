/**
 * struct iovec arrays for vectored I/O, shared by every engine. An array lives in one Buffer (16 bytes per
 * entry: base lo, base hi, len lo, len hi as u32 words) whose address is handed to the kernel, so the
 * kernel reads and writes guest memory directly. Also: skipping past a short transfer and zero-filling the
 * tail of a short read, both once, for every engine.
 */
import { SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import { addressOf, IOV_MAX, IOVEC_BYTES } from '../sys/libc.js';
import type { GuestMemory } from './guest-memory.js';

export { SECTOR_SIZE, IOV_MAX, IOVEC_BYTES };
const TWO_32 = 0x1_0000_0000;

/** Writes iovec `index` of `words` (starting at word `base`). */
export function setIovec(words: Uint32Array, base: number, index: number, address: number, length: number): void {
  const w = base + index * 4;
  words[w] = address % TWO_32;
  words[w + 1] = Math.floor(address / TWO_32);
  words[w + 2] = length;
  words[w + 3] = 0;
}

/**
 * Advances an iovec array past `bytes` transferred, starting at iovec `first` of the array at word `base`;
 * returns the new first index (the entry it stops in is trimmed in place). Pure index math.
 */
export function skipIovecs(words: Uint32Array, base: number, first: number, bytes: number): number {
  let i = first;
  let remaining = bytes;
  while (remaining > 0) {
    const w = base + i * 4;
    const len = words[w + 2] ?? 0;
    if (remaining < len) {
      const address = (words[w] ?? 0) + (words[w + 1] ?? 0) * TWO_32 + remaining;
      words[w] = address % TWO_32;
      words[w + 1] = Math.floor(address / TWO_32);
      words[w + 2] = len - remaining;
      return i;
    }
    remaining -= len;
    i++;
  }
  return i;
}

/**
 * Zero-fills the data segments from stream byte `done` on: a read that hit end of file (an image shorter
 * than the capacity) returns zeroes there, like a sparse tail would.
 */
export function zeroFillTail(
  memory: GuestMemory,
  segGpa: ArrayLike<number>,
  segLen: ArrayLike<number>,
  from: number,
  count: number,
  done: number,
): void {
  let skip = done;
  for (let s = from; s < from + count; s++) {
    const len = segLen[s] ?? 0;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    memory.fill((segGpa[s] ?? 0) + skip, len - skip);
    skip = 0;
  }
}

/**
 * A fixed pool of iovec arrays (`arrays` × `perArray` entries) in one Buffer. `fill` collects a request's
 * host pieces into array `n`; a request needing more entries than `perArray` is reported, not truncated.
 */
export class IovecPool {
  readonly buffer: Buffer;
  readonly words: Uint32Array;
  readonly address: number;
  private fillBase = 0;
  private fillCount = 0;

  constructor(
    readonly arrays: number,
    readonly perArray: number,
  ) {
    // Not zero-filled: an entry is always written before the kernel sees it, and untouched pages of a large
    // pool (slots a shallow queue never reaches) then cost no resident memory.
    this.buffer = Buffer.allocUnsafeSlow(arrays * perArray * IOVEC_BYTES);
    this.words = new Uint32Array(this.buffer.buffer, this.buffer.byteOffset, arrays * perArray * 4);
    this.address = addressOf(this.buffer);
  }

  /** Word index of array `n`'s first entry. */
  base(n: number): number {
    return n * this.perArray * 4;
  }

  /** Host address of entry `index` of array `n`. */
  addressOf(n: number, index: number): number {
    return this.address + (n * this.perArray + index) * IOVEC_BYTES;
  }

  /** Base address held by entry `index` of array `n`. */
  entryAddress(n: number, index: number): number {
    const w = this.base(n) + index * 4;
    return (this.words[w] ?? 0) + (this.words[w + 1] ?? 0) * TWO_32;
  }

  /** Length held by entry `index` of array `n`. */
  entryLength(n: number, index: number): number {
    return this.words[this.base(n) + index * 4 + 2] ?? 0;
  }

  private readonly collect = (hostAddr: number, length: number): void => {
    if (this.fillCount < this.perArray) setIovec(this.words, this.fillBase, this.fillCount, hostAddr, length);
    this.fillCount++;
  };

  /**
   * Fills array `n` with the host pieces of the given guest segments. Returns the entry count, which is
   * more than `perArray` (and the array incomplete) when the request does not fit.
   */
  fill(n: number, memory: GuestMemory, segGpa: ArrayLike<number>, segLen: ArrayLike<number>, segCount: number): number {
    this.fillBase = this.base(n);
    this.fillCount = 0;
    for (let s = 0; s < segCount; s++) memory.forEachHostPiece(segGpa[s] ?? 0, segLen[s] ?? 0, this.collect);
    return this.fillCount;
  }

  /** Puts a single entry into array `n` (a bounce buffer). */
  setSingle(n: number, address: number, length: number): void {
    setIovec(this.words, this.base(n), 0, address, length);
  }

  skip(n: number, first: number, bytes: number): number {
    return skipIovecs(this.words, this.base(n), first, bytes);
  }

  /** Whether every entry of array `n` (count entries) has base and length multiples of `align`. */
  aligned(n: number, count: number, align: number): boolean {
    if (align <= 1) return true;
    const base = this.base(n);
    for (let i = 0; i < count; i++) {
      const w = base + i * 4;
      if ((this.words[w] ?? 0) % align !== 0 || (this.words[w + 2] ?? 0) % align !== 0) return false;
    }
    return true;
  }
}
