/**
 * Page-aligned bounce buffers for O_DIRECT when a guest buffer does not meet the image's alignment.
 * Pre-allocated per queue at start (anonymous mmap, so page aligned), cut into fixed chunks; a request takes
 * as many chunks as its data needs and returns them on completion. When the pool is short, the drain stops
 * popping until a completion returns chunks; a request larger than the whole pool bounces through the sync
 * engine's own buffer instead.
 */
import koffi from 'koffi';
import { sys, PROT_READ, PROT_WRITE } from '../sys/libc.js';
import { lastErrno, SyscallError } from '../sys/errors.js';

const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;

export const BOUNCE_CHUNK_BYTES = 64 * 1024;

/** One page-aligned anonymous mapping with a byte view. */
export class AlignedBuffer {
  readonly address: number;
  readonly bytes: Uint8Array;
  private closed = false;

  constructor(readonly length: number) {
    const address = sys.mmap(0, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (typeof address !== 'number') throw new SyscallError('mmap', lastErrno(), `${length}-byte bounce buffer`);
    this.address = address;
    this.bytes = new Uint8Array(koffi.view(address, length));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    sys.munmap(this.address, this.length);
  }
}

export class BouncePool {
  private readonly buffer: AlignedBuffer;
  private readonly free: Int32Array;
  private freeCount: number;

  constructor(readonly chunks: number) {
    this.buffer = new AlignedBuffer(chunks * BOUNCE_CHUNK_BYTES);
    this.free = new Int32Array(chunks);
    for (let i = 0; i < chunks; i++) this.free[i] = chunks - 1 - i;
    this.freeCount = chunks;
  }

  static chunksFor(bytes: number): number {
    return Math.ceil(bytes / BOUNCE_CHUNK_BYTES);
  }

  get available(): number {
    return this.freeCount;
  }

  take(): number {
    if (this.freeCount === 0) throw new Error('bounce pool exhausted');
    return this.free[--this.freeCount] ?? 0;
  }

  give(chunk: number): void {
    this.free[this.freeCount++] = chunk;
  }

  address(chunk: number): number {
    return this.buffer.address + chunk * BOUNCE_CHUNK_BYTES;
  }

  bytes(chunk: number, length: number): Uint8Array {
    const at = chunk * BOUNCE_CHUNK_BYTES;
    return this.buffer.bytes.subarray(at, at + length);
  }

  close(): void {
    this.buffer.close();
  }
}

/**
 * Copies a request's data between its guest segments and bounce memory laid out as a stream: byte `p` of
 * the stream is at `chunkAddress(p / chunk)`-relative offset `p % chunk`. `toGuest` = after a read.
 * Copies `limit` stream bytes at most. Returns false if guest memory is unmapped.
 */
export function copyBounce(
  memory: { read(gpa: number, target: Uint8Array): boolean; write(gpa: number, source: Uint8Array): boolean },
  segGpa: ArrayLike<number>,
  segLen: ArrayLike<number>,
  segFrom: number,
  segCount: number,
  chunkBytes: (index: number) => Uint8Array,
  chunkSize: number,
  toGuest: boolean,
  limit = Infinity,
): boolean {
  let stream = 0;
  for (let s = segFrom; s < segFrom + segCount && stream < limit; s++) {
    const gpa = segGpa[s] ?? 0;
    const len = Math.min(segLen[s] ?? 0, limit - stream);
    let done = 0;
    while (done < len) {
      const at = stream + done;
      const within = at % chunkSize;
      const take = Math.min(len - done, chunkSize - within);
      const bytes = chunkBytes(Math.floor(at / chunkSize)).subarray(within, within + take);
      if (!(toGuest ? memory.write(gpa + done, bytes) : memory.read(gpa + done, bytes))) return false;
      done += take;
    }
    stream += len;
  }
  return true;
}
