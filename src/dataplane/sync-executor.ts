/**
 * Executes validated requests against the backing file with synchronous vectored syscalls on the worker
 * thread. iovecs carry host addresses straight into mapped guest memory, so data is never copied through JS.
 */
import { BlkRequestType, BlkStatus, BLK_ID_BYTES } from '../../protocol/virtio-blk.js';
import { sys, addressOf, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../sys/libc.js';
import { lastErrno, errnoName, Errno } from '../sys/errors.js';
import type { GuestMemory } from './guest-memory.js';
import type { BlkRequest } from './blk-request.js';
import { readDiscardSegments } from './blk-request.js';
import type { DeviceLimits } from './device-limits.js';
import type { Completion, RequestExecutor } from './request-executor.js';

/** Linux's IOV_MAX: one preadv/pwritev takes at most this many iovecs. */
const IOV_MAX = 1024;
const ZERO_CHUNK = 1 << 20;

interface ExecutionResult {
  status: number;
  /** Bytes written into guest buffers (not counting the status byte). */
  written: number;
  /** Why the request failed, for logs; empty on success. */
  error: string;
}

/** Performs each request inside `submit` with blocking syscalls; `flush` has nothing left to do. */
export class SyncExecutor implements RequestExecutor {
  readonly inFlight = 0;
  onComplete: (completion: Completion) => void = () => undefined;
  private readonly completion: Completion = { head: 0, statusGpa: 0, type: 0, status: 0, written: 0, dataBytes: 0, latencyNanos: 0, error: '' };
  private readonly iov = Buffer.alloc(IOV_MAX * 16);
  private readonly iovWords = new Uint32Array(this.iov.buffer, this.iov.byteOffset, IOV_MAX * 4);
  private readonly iovAddress = addressOf(this.iov);
  private iovCount = 0;
  private readonly result: ExecutionResult = { status: BlkStatus.OK, written: 0, error: '' };
  private zeroes: Buffer | null = null;

  constructor(
    private readonly fd: number,
    private readonly limits: DeviceLimits,
  ) {}

  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    const started = performance.now();
    const result = this.execute(memory, request, capacityBytes, writeback);
    const c = this.completion;
    c.head = head;
    c.statusGpa = request.statusGpa;
    c.type = request.type;
    c.status = result.status;
    c.written = result.written;
    c.dataBytes = request.dataBytes;
    c.latencyNanos = (performance.now() - started) * 1e6;
    c.error = result.error;
    this.onComplete(c);
  }

  flush(): void {}

  close(): void {}

  private execute(memory: GuestMemory, request: BlkRequest, capacityBytes: number, writeback: boolean): ExecutionResult {
    const result = this.result;
    result.status = BlkStatus.OK;
    result.written = 0;
    result.error = '';
    switch (request.type) {
      case BlkRequestType.IN:
        return this.read(memory, request);
      case BlkRequestType.OUT:
        this.write(memory, request);
        if (result.status === BlkStatus.OK && !writeback) this.sync();
        return result;
      case BlkRequestType.FLUSH:
        return this.sync();
      case BlkRequestType.GET_ID: {
        const length = Math.min(BLK_ID_BYTES, request.dataBytes);
        let done = 0;
        for (let s = 0; s < request.segCount && done < length; s++) {
          const take = Math.min(request.segLen[s] ?? 0, length - done);
          memory.write(request.segGpa[s] ?? 0, this.limits.serial.subarray(done, done + take));
          done += take;
        }
        result.written = done;
        return result;
      }
      case BlkRequestType.DISCARD:
      case BlkRequestType.WRITE_ZEROES:
        return this.discardOrZero(memory, request, capacityBytes);
      default:
        return this.fail(BlkStatus.UNSUPP, `unsupported request type ${request.type}`);
    }
  }

  private fail(status: number, error: string): ExecutionResult {
    this.result.status = status;
    this.result.error = error;
    return this.result;
  }

  private pushIov(hostAddr: number, length: number): void {
    if (this.iovCount >= IOV_MAX) {
      this.iovCount++;
      return;
    }
    const w = this.iovCount * 4;
    this.iovWords[w] = hostAddr % 0x1_0000_0000;
    this.iovWords[w + 1] = Math.floor(hostAddr / 0x1_0000_0000);
    this.iovWords[w + 2] = length;
    this.iovWords[w + 3] = 0;
    this.iovCount++;
  }

  private readonly collect = (hostAddr: number, length: number): void => this.pushIov(hostAddr, length);

  /** Builds the iovec array for the request's data segments; false if it needs more than IOV_MAX entries. */
  private buildIov(memory: GuestMemory, request: BlkRequest): boolean {
    this.iovCount = 0;
    for (let s = 0; s < request.segCount; s++) memory.forEachHostPiece(request.segGpa[s] ?? 0, request.segLen[s] ?? 0, this.collect);
    return this.iovCount <= IOV_MAX;
  }

  /** Advances the iovec array past `done` bytes (after a short transfer); returns the new first index. */
  private skipIov(first: number, done: number): number {
    let i = first;
    let remaining = done;
    while (remaining > 0) {
      const w = i * 4;
      const len = this.iovWords[w + 2] ?? 0;
      if (remaining < len) {
        const base = (this.iovWords[w] ?? 0) + (this.iovWords[w + 1] ?? 0) * 0x1_0000_0000 + remaining;
        this.iovWords[w] = base % 0x1_0000_0000;
        this.iovWords[w + 1] = Math.floor(base / 0x1_0000_0000);
        this.iovWords[w + 2] = len - remaining;
        return i;
      }
      remaining -= len;
      i++;
    }
    return i;
  }

  private read(memory: GuestMemory, request: BlkRequest): ExecutionResult {
    const done = this.transfer(memory, request, sys.preadv, 'preadv');
    if (done < 0) return this.result;
    if (done < request.dataBytes) this.zeroTail(memory, request, done);
    this.result.written = request.dataBytes;
    return this.result;
  }

  /** A read past end of file (image shorter than the capacity) returns zeroes, like a sparse tail would. */
  private zeroTail(memory: GuestMemory, request: BlkRequest, done: number): void {
    let skip = done;
    for (let s = 0; s < request.segCount; s++) {
      const len = request.segLen[s] ?? 0;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      memory.fill((request.segGpa[s] ?? 0) + skip, len - skip);
      skip = 0;
    }
  }

  private write(memory: GuestMemory, request: BlkRequest): ExecutionResult {
    const done = this.transfer(memory, request, sys.pwritev, 'pwritev');
    if (done >= 0 && done < request.dataBytes) this.fail(BlkStatus.IOERR, 'pwritev wrote nothing');
    return this.result;
  }

  /**
   * Moves the request's data with one vectored call, continuing after short transfers. Returns the bytes
   * moved (less than asked only at end of file), or -1 after recording the failure in `result`.
   */
  private transfer(memory: GuestMemory, request: BlkRequest, call: typeof sys.preadv, name: string): number {
    if (!this.buildIov(memory, request)) {
      this.fail(BlkStatus.IOERR, 'request needs more than IOV_MAX iovecs');
      return -1;
    }
    const offset = request.sector * 512;
    let done = 0;
    let first = 0;
    while (done < request.dataBytes) {
      const n = call(this.fd, this.iovAddress + first * 16, this.iovCount - first, offset + done);
      if (n < 0) {
        const errno = lastErrno();
        if (errno === Errno.EINTR) continue;
        this.fail(BlkStatus.IOERR, `${name}: ${errnoName(errno)}`);
        return -1;
      }
      if (n === 0) break;
      done += n;
      first = this.skipIov(first, n);
    }
    return done;
  }

  private sync(): ExecutionResult {
    if (sys.fdatasync(this.fd) < 0) return this.fail(BlkStatus.IOERR, `fdatasync: ${errnoName(lastErrno())}`);
    return this.result;
  }

  private discardOrZero(memory: GuestMemory, request: BlkRequest, capacityBytes: number): ExecutionResult {
    const ranges = readDiscardSegments(memory, request, this.limits, capacityBytes);
    if (!Array.isArray(ranges)) return this.fail(ranges.status, ranges.reason);
    const isWriteZeroes = request.type === BlkRequestType.WRITE_ZEROES;
    for (const range of ranges) {
      if (range.length === 0) continue;
      const mode = !isWriteZeroes || range.unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
      if (sys.fallocate(this.fd, mode, range.offset, range.length) === 0) continue;
      const errno = lastErrno();
      // Discard is a hint: a file system without hole punching simply keeps the data.
      if (!isWriteZeroes && errno === Errno.EOPNOTSUPP) continue;
      if (isWriteZeroes && errno === Errno.EOPNOTSUPP) {
        if (!this.writeZeroes(range.offset, range.length)) return this.fail(BlkStatus.IOERR, `pwrite of zeroes: ${errnoName(lastErrno())}`);
        continue;
      }
      return this.fail(BlkStatus.IOERR, `fallocate: ${errnoName(errno)}`);
    }
    return this.result;
  }

  /** Fallback for file systems without FALLOC_FL_ZERO_RANGE. */
  private writeZeroes(offset: number, length: number): boolean {
    this.zeroes ??= Buffer.alloc(ZERO_CHUNK);
    const address = addressOf(this.zeroes);
    for (let at = 0; at < length; ) {
      const chunk = Math.min(ZERO_CHUNK, length - at);
      this.iovWords[0] = address % 0x1_0000_0000;
      this.iovWords[1] = Math.floor(address / 0x1_0000_0000);
      this.iovWords[2] = chunk;
      this.iovWords[3] = 0;
      const n = sys.pwritev(this.fd, this.iovAddress, 1, offset + at);
      if (n <= 0) return false;
      at += n;
    }
    return true;
  }
}
