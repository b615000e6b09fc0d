/**
 * Executes validated requests against the backing file with synchronous vectored syscalls on the worker
 * thread. iovecs carry host addresses straight into mapped guest memory, so data is never copied through JS.
 */
import { performance } from 'node:perf_hooks';
import { BlkRequestType, BlkStatus, BLK_ID_BYTES } from '../../protocol/virtio-blk.js';
import { sys, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../sys/libc.js';
import { lastErrno, errnoName, Errno } from '../sys/errors.js';
import type { GuestMemory } from './guest-memory.js';
import { readDiscardSegments, type BlkRequest, type RangeSegment } from './blk-request.js';
import type { DeviceLimits } from './device-limits.js';
import { emptyCompletion, type Completion, type EngineOptions, type RequestExecutor } from './request-executor.js';
import { IOV_MAX, IovecPool, SECTOR_SIZE, zeroFillTail } from './iovec.js';
import { AlignedBuffer, copyBounce } from './bounce-pool.js';
import { blockDeviceRange } from '../sys/block-io.js';

const ZERO_CHUNK = 1 << 20;

/** fallocate mode for a file range: DISCARD and WRITE_ZEROES with UNMAP punch a hole, else ZERO_RANGE. */
export function fallocateMode(range: RangeSegment, isWriteZeroes: boolean): number {
  return !isWriteZeroes || range.unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
}

interface ExecutionResult {
  status: number;
  /** Bytes written into guest buffers (not counting the status byte). */
  written: number;
  /** Why the request failed, for logs; empty on success. */
  error: string;
}

/** Performs each request inside `submit` with blocking syscalls; nothing is ever left in flight. */
export class SyncExecutor implements RequestExecutor {
  readonly inFlight = 0;
  readonly completionFd = -1;
  onComplete: (completion: Completion) => void = () => undefined;
  private readonly completion: Completion = emptyCompletion();
  private readonly iov = new IovecPool(1, IOV_MAX);
  private iovCount = 0;
  private readonly result: ExecutionResult = { status: BlkStatus.OK, written: 0, error: '' };
  private zeroes: AlignedBuffer | null = null;
  /** O_DIRECT bounce memory, grown on demand (rare: only requests with unaligned guest buffers). */
  private bounce: AlignedBuffer | null = null;
  private readonly memAlign: number;

  constructor(
    private readonly fd: number,
    private readonly limits: DeviceLimits,
    private readonly options: EngineOptions = {},
  ) {
    this.memAlign = options.memAlign ?? 1;
  }

  canAccept(): boolean {
    return true;
  }

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

  submitPending(): boolean {
    return true;
  }

  reap(): number {
    return 0;
  }

  waitIdle(): boolean {
    return true;
  }

  close(): void {
    this.bounce?.close();
    this.bounce = null;
    this.zeroes?.close();
    this.zeroes = null;
  }

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
        if (result.status === BlkStatus.OK && !writeback && this.options.dsync !== true) this.sync();
        return result;
      case BlkRequestType.FLUSH:
        return this.options.ignoreFlush === true ? result : this.sync();
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

  /**
   * Builds the iovec array for the request's data segments: straight into guest memory, or one bounce
   * buffer when O_DIRECT alignment is not met (or the request needs more than IOV_MAX iovecs under
   * O_DIRECT). False if it needs more than IOV_MAX entries and cannot bounce.
   */
  private buildIov(memory: GuestMemory, request: BlkRequest): boolean {
    this.iovCount = this.iov.fill(0, memory, request.segGpa, request.segLen, request.segCount);
    const fits = this.iovCount <= IOV_MAX;
    if (this.memAlign <= 1 || (fits && this.iov.aligned(0, this.iovCount, this.memAlign))) {
      this.usingBounce = false;
      return fits;
    }
    if (this.bounce === null || this.bounce.length < request.dataBytes) {
      this.bounce?.close();
      this.bounce = new AlignedBuffer(Math.ceil(request.dataBytes / 4096) * 4096);
    }
    this.iov.setSingle(0, this.bounce.address, request.dataBytes);
    this.iovCount = 1;
    this.usingBounce = true;
    this.options.onBounce?.();
    return true;
  }

  private usingBounce = false;

  private read(memory: GuestMemory, request: BlkRequest): ExecutionResult {
    const done = this.transfer(memory, request, sys.preadv, 'preadv');
    if (done < 0) return this.result;
    if (this.usingBounce && this.bounce !== null) {
      const bytes = this.bounce.bytes;
      if (!copyBounce(memory, request.segGpa, request.segLen, 0, request.segCount, () => bytes, bytes.length, true, done)) {
        return this.fail(BlkStatus.IOERR, 'read buffer left guest memory');
      }
    }
    if (done < request.dataBytes) zeroFillTail(memory, request.segGpa, request.segLen, 0, request.segCount, done);
    this.result.written = request.dataBytes;
    return this.result;
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
    if (this.usingBounce && call === sys.pwritev && this.bounce !== null) {
      const bytes = this.bounce.bytes;
      if (!copyBounce(memory, request.segGpa, request.segLen, 0, request.segCount, () => bytes, bytes.length, false)) {
        this.fail(BlkStatus.IOERR, 'write buffer left guest memory');
        return -1;
      }
    }
    const offset = request.sector * SECTOR_SIZE;
    let done = 0;
    let first = 0;
    while (done < request.dataBytes) {
      const n = call(this.fd, this.iov.addressOf(0, first), this.iovCount - first, offset + done);
      if (n < 0) {
        const errno = lastErrno();
        if (errno === Errno.EINTR) continue;
        this.fail(BlkStatus.IOERR, `${name}: ${errnoName(errno)}`);
        return -1;
      }
      if (n === 0) break;
      done += n;
      first = this.iov.skip(0, first, n);
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
      const error = this.applyRange(range, isWriteZeroes);
      if (error !== '') return this.fail(BlkStatus.IOERR, error);
    }
    return this.result;
  }

  /**
   * Discards or zeroes one validated range with blocking calls; '' on success, else why it failed. Also the
   * io_uring engine's fallback for a range its asynchronous fallocate could not do.
   */
  applyRange(range: RangeSegment, isWriteZeroes: boolean): string {
    if (range.length === 0) return '';
    if (this.options.blockDevice === true) {
      // Block devices: BLKZEROOUT zeroes (unmapping where the device can), BLKDISCARD is a hint.
      if (blockDeviceRange(this.fd, isWriteZeroes, range.offset, range.length) === 0) return '';
      const errno = lastErrno();
      if (!isWriteZeroes && errno === Errno.EOPNOTSUPP) return '';
      return `ioctl(${isWriteZeroes ? 'BLKZEROOUT' : 'BLKDISCARD'}): ${errnoName(errno)}`;
    }
    if (sys.fallocate(this.fd, fallocateMode(range, isWriteZeroes), range.offset, range.length) === 0) return '';
    const errno = lastErrno();
    // Discard is a hint: a file system without hole punching simply keeps the data.
    if (!isWriteZeroes && errno === Errno.EOPNOTSUPP) return '';
    if (isWriteZeroes && errno === Errno.EOPNOTSUPP) {
      return this.writeZeroes(range.offset, range.length) ? '' : `pwrite of zeroes: ${errnoName(lastErrno())}`;
    }
    return `fallocate: ${errnoName(errno)}`;
  }

  /** Fallback for file systems without FALLOC_FL_ZERO_RANGE. */
  private writeZeroes(offset: number, length: number): boolean {
    // Page-aligned, so it also suits O_DIRECT.
    this.zeroes ??= new AlignedBuffer(ZERO_CHUNK);
    const address = this.zeroes.address;
    for (let at = 0; at < length; ) {
      const chunk = Math.min(ZERO_CHUNK, length - at);
      this.iov.setSingle(0, address, chunk);
      const n = sys.pwritev(this.fd, this.iov.addressOf(0, 0), 1, offset + at);
      if (n <= 0) return false;
      at += n;
    }
    return true;
  }
}
