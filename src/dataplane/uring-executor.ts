/**
 * Executes validated requests through io_uring: a drain prepares one SQE per request (two for a write in
 * write-through mode) and `flush` submits them all and waits for all of them with a single io_uring_enter in
 * the common case. iovecs carry host addresses straight into mapped guest memory, like the sync engine.
 *
 * Semantics are those of SyncExecutor:
 * - IN → READV; a short read is continued with the remainder; at end of file the rest is zero-filled.
 * - OUT → WRITEV; a short write is continued. In write-through mode a datasync FSYNC is linked after the
 *   write (IOSQE_IO_LINK) and the write completes only once it is synced; a short write breaks the link
 *   (the fsync is cancelled) and the remainder is resubmitted with a fresh linked fsync.
 * - FLUSH → FSYNC(DATASYNC) with IOSQE_IO_DRAIN: it starts only after every SQE submitted before it has
 *   completed. If an earlier write was still being continued (short write) when the fsync completed, the
 *   fsync is issued again behind it.
 * - GET_ID runs synchronously; DISCARD / WRITE_ZEROES (and anything else) first complete everything in flight,
 *   then run synchronously on an internal SyncExecutor.
 *
 * Requests occupy one of `depth` slots, each with its own preallocated iovec array; when all slots are busy,
 * `submit` submits and reaps until one frees. Nothing is left in flight when `flush` returns.
 */
import koffi from 'koffi';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { addressOf } from '../sys/libc.js';
import { errnoName, Errno } from '../sys/errors.js';
import { IoUring, IoUringOp, SqeFlag, IORING_FSYNC_DATASYNC } from '../sys/io-uring.js';
import type { GuestMemory } from './guest-memory.js';
import type { BlkRequest } from './blk-request.js';
import type { DeviceLimits } from './device-limits.js';
import type { Completion, RequestExecutor } from './request-executor.js';
import { SyncExecutor } from './sync-executor.js';

/** Default number of requests in flight per queue. */
export const DEFAULT_URING_DEPTH = 128;
/** Linux's UIO_MAXIOV: one READV/WRITEV takes at most this many iovecs. */
const IOV_MAX = 1024;
const ECANCELED = koffi.os.errno['ECANCELED'] ?? 125;
/** Something to sleep on (Atomics.wait) when the kernel is short of resources and nothing is in flight. */
const NAP = new Int32Array(new SharedArrayBuffer(4));

/** CQE kinds, in the high half of the 32-bit user data; the slot is in the low half. */
const KIND_RW = 0;
const KIND_SYNC = 1;

const SlotFlag = {
  /** Write-through write: must be synced before it completes. */
  writeThrough: 1,
  /** A read reached end of file. */
  eof: 2,
  /** The slot's (latest) fsync succeeded. */
  synced: 4,
} as const;

export function encodeUserData(slot: number, kind: number): number {
  return ((kind << 16) | slot) >>> 0;
}

export function userDataSlot(userData: number): number {
  return userData & 0xffff;
}

export function userDataKind(userData: number): number {
  return userData >>> 16;
}

/**
 * Advances an iovec array (16 bytes each: base lo, base hi, len lo, len hi as u32 words) past `bytes`
 * transferred, starting at iovec `first` of `words`; returns the new first index. Pure index math,
 * shared by the engine and its tests.
 */
export function skipIovecs(words: Uint32Array, base: number, first: number, bytes: number): number {
  let i = first;
  let remaining = bytes;
  while (remaining > 0) {
    const w = base + i * 4;
    const len = words[w + 2] ?? 0;
    if (remaining < len) {
      const address = (words[w] ?? 0) + (words[w + 1] ?? 0) * 0x1_0000_0000 + remaining;
      words[w] = address % 0x1_0000_0000;
      words[w + 1] = Math.floor(address / 0x1_0000_0000);
      words[w + 2] = len - remaining;
      return i;
    }
    remaining -= len;
    i++;
  }
  return i;
}

export interface UringExecutorOptions {
  /** Requests in flight at most (slots); default DEFAULT_URING_DEPTH. */
  depth?: number;
}

export class UringExecutor implements RequestExecutor {
  onComplete: (completion: Completion) => void = () => undefined;
  readonly depth: number;
  private readonly ring: IoUring;
  private readonly sync: SyncExecutor;
  private readonly completion: Completion = { head: 0, statusGpa: 0, type: 0, status: 0, written: 0, dataBytes: 0, latencyNanos: 0, error: '' };

  // Slot state, struct-of-arrays.
  private readonly freeSlots: Int32Array;
  private freeCount: number;
  private active = 0;
  /** CQEs expected from SQEs prepared or submitted and not yet reaped. */
  private outstandingCqes = 0;
  private sequence = 0;
  private readonly slotHead: Int32Array;
  private readonly slotType: Int32Array;
  private readonly slotStatusGpa: Float64Array;
  private readonly slotDataBytes: Float64Array;
  private readonly slotStarted: Float64Array;
  private readonly slotOffset: Float64Array;
  /** Bytes transferred so far. */
  private readonly slotDone: Float64Array;
  /** `slotDone` when the current READV/WRITEV was submitted (to advance the iovecs by what it moved). */
  private readonly slotSubmittedDone: Float64Array;
  private readonly slotIovFirst: Int32Array;
  private readonly slotIovCount: Int32Array;
  private readonly slotPending: Int32Array;
  private readonly slotFlags: Uint8Array;
  private readonly slotSeq: Float64Array;
  private readonly slotError: string[];
  private readonly slotMemory: (GuestMemory | null)[];
  private readonly segCapacity: number;
  private readonly slotSegCount: Int32Array;
  private readonly slotSegGpa: Float64Array;
  private readonly slotSegLen: Uint32Array;

  private readonly iovPerSlot: number;
  private readonly iov: Buffer;
  private readonly iovWords: Uint32Array;
  private readonly iovAddress: number;
  /** Collector state for forEachHostPiece. */
  private fillBase = 0;
  private fillCount = 0;
  private closed = false;

  private readonly collect = (hostAddr: number, length: number): void => {
    if (this.fillCount < this.iovPerSlot) {
      const w = this.fillBase + this.fillCount * 4;
      this.iovWords[w] = hostAddr % 0x1_0000_0000;
      this.iovWords[w + 1] = Math.floor(hostAddr / 0x1_0000_0000);
      this.iovWords[w + 2] = length;
      this.iovWords[w + 3] = 0;
    }
    this.fillCount++;
  };

  private readonly onCqe = (userData: number, res: number): void => this.handleCqe(userData, res);

  /** Sets up the ring; throws SyscallError when io_uring is unavailable. */
  constructor(
    private readonly fd: number,
    limits: DeviceLimits,
    options: UringExecutorOptions = {},
  ) {
    const depth = Math.max(1, Math.min(options.depth ?? DEFAULT_URING_DEPTH, 0x8000));
    this.depth = depth;
    // Each slot has at most two SQEs in flight (a write and its linked fsync).
    this.ring = IoUring.create({ entries: 2 * depth });
    this.sync = new SyncExecutor(fd, limits);
    this.sync.onComplete = (completion) => this.onComplete(completion);
    this.freeSlots = new Int32Array(depth);
    for (let i = 0; i < depth; i++) this.freeSlots[i] = depth - 1 - i;
    this.freeCount = depth;
    this.slotHead = new Int32Array(depth);
    this.slotType = new Int32Array(depth);
    this.slotStatusGpa = new Float64Array(depth);
    this.slotDataBytes = new Float64Array(depth);
    this.slotStarted = new Float64Array(depth);
    this.slotOffset = new Float64Array(depth);
    this.slotDone = new Float64Array(depth);
    this.slotSubmittedDone = new Float64Array(depth);
    this.slotIovFirst = new Int32Array(depth);
    this.slotIovCount = new Int32Array(depth);
    this.slotPending = new Int32Array(depth);
    this.slotFlags = new Uint8Array(depth);
    this.slotSeq = new Float64Array(depth);
    this.slotError = new Array<string>(depth).fill('');
    this.slotMemory = new Array<GuestMemory | null>(depth).fill(null);
    this.segCapacity = limits.segMax + 2;
    this.slotSegCount = new Int32Array(depth);
    this.slotSegGpa = new Float64Array(depth * this.segCapacity);
    this.slotSegLen = new Uint32Array(depth * this.segCapacity);
    // A segment crossing a memory-region boundary becomes two iovecs; requests needing more fall back to sync.
    this.iovPerSlot = Math.min(IOV_MAX, 2 * this.segCapacity);
    this.iov = Buffer.alloc(depth * this.iovPerSlot * 16);
    this.iovWords = new Uint32Array(this.iov.buffer, this.iov.byteOffset, depth * this.iovPerSlot * 4);
    this.iovAddress = addressOf(this.iov);
  }

  get inFlight(): number {
    return this.active;
  }

  /** io_uring setup flags the kernel accepted (for diagnostics). */
  get setupFlags(): number {
    return this.ring.setupFlags;
  }

  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    switch (request.type) {
      case BlkRequestType.IN:
      case BlkRequestType.OUT:
        this.submitReadWrite(memory, request, head, capacityBytes, writeback);
        return;
      case BlkRequestType.FLUSH: {
        const started = performance.now();
        const slot = this.acquireSlot();
        this.initSlot(slot, memory, request, head, started);
        this.prepareFsync(slot, SqeFlag.IO_DRAIN);
        return;
      }
      case BlkRequestType.GET_ID:
        // Touches guest memory only: no ordering with the disk.
        this.sync.submit(memory, request, head, capacityBytes, writeback);
        return;
      default:
        // DISCARD / WRITE_ZEROES (and anything unexpected): behind everything submitted before them.
        this.flush();
        this.sync.submit(memory, request, head, capacityBytes, writeback);
    }
  }

  flush(): void {
    while (this.active > 0 || this.ring.pendingSubmissions > 0) {
      if (this.outstandingCqes === 0) throw new Error(`io_uring engine: ${this.active} requests active but no completion expected`);
      if (!this.ring.submitAndWait(this.outstandingCqes)) this.backOff();
      this.ring.reap(this.onCqe);
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ring.close();
  }

  private submitReadWrite(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    const started = performance.now();
    const slot = this.acquireSlot();
    this.fillBase = slot * this.iovPerSlot * 4;
    this.fillCount = 0;
    for (let s = 0; s < request.segCount; s++) memory.forEachHostPiece(request.segGpa[s] ?? 0, request.segLen[s] ?? 0, this.collect);
    if (this.fillCount > this.iovPerSlot) {
      // Rare (segments split across many memory regions): the sync engine handles it, up to IOV_MAX iovecs.
      this.releaseSlot(slot);
      this.sync.submit(memory, request, head, capacityBytes, writeback);
      return;
    }
    this.initSlot(slot, memory, request, head, started);
    this.slotOffset[slot] = request.sector * 512;
    this.slotIovCount[slot] = this.fillCount;
    if (request.type === BlkRequestType.IN) {
      const n = Math.min(request.segCount, this.segCapacity);
      const base = slot * this.segCapacity;
      for (let s = 0; s < n; s++) {
        this.slotSegGpa[base + s] = request.segGpa[s] ?? 0;
        this.slotSegLen[base + s] = request.segLen[s] ?? 0;
      }
      this.slotSegCount[slot] = n;
    } else if (!writeback) {
      this.slotFlags[slot] = SlotFlag.writeThrough;
    }
    this.prepareReadWrite(slot);
  }

  private initSlot(slot: number, memory: GuestMemory, request: BlkRequest, head: number, started: number): void {
    this.slotStarted[slot] = started;
    this.slotHead[slot] = head;
    this.slotType[slot] = request.type;
    this.slotStatusGpa[slot] = request.statusGpa;
    this.slotDataBytes[slot] = request.dataBytes;
    this.slotDone[slot] = 0;
    this.slotSubmittedDone[slot] = 0;
    this.slotIovFirst[slot] = 0;
    this.slotIovCount[slot] = 0;
    this.slotPending[slot] = 0;
    this.slotFlags[slot] = 0;
    this.slotSeq[slot] = ++this.sequence;
    this.slotError[slot] = '';
    this.slotMemory[slot] = memory;
  }

  /**
   * io_uring_enter said EBUSY / EAGAIN (completions to reap first, or no memory for requests): wait for a
   * completion if the kernel holds any, else nap for a millisecond and let the caller try again.
   */
  private backOff(): void {
    if (this.ring.cqReady > 0) return;
    const inKernel = this.outstandingCqes - this.ring.pendingSubmissions;
    if (inKernel > 0 && this.ring.wait(1)) return;
    Atomics.wait(NAP, 0, 0, 1);
  }

  private acquireSlot(): number {
    while (this.freeCount === 0) {
      // Submit what is pending and wait for at least one completion; reaping frees slots.
      if (!this.ring.submitAndWait(1)) this.backOff();
      this.ring.reap(this.onCqe);
    }
    this.active++;
    return this.freeSlots[--this.freeCount] ?? 0;
  }

  private releaseSlot(slot: number): void {
    this.slotMemory[slot] = null;
    this.freeSlots[this.freeCount++] = slot;
    this.active--;
  }

  /** Makes room for `n` SQEs (submitting what is prepared if the submission queue is full). */
  private ensureSqSpace(n: number): void {
    while (this.ring.sqSpace < n) {
      if (this.ring.submitAndWait(0)) continue;
      this.backOff();
      this.ring.reap(this.onCqe);
    }
  }

  /** Queues the (remaining part of the) slot's READV/WRITEV, plus a linked fsync for write-through. */
  private prepareReadWrite(slot: number): void {
    const writeThrough = (this.slotFlags[slot] ?? 0) & SlotFlag.writeThrough;
    this.ensureSqSpace(writeThrough ? 2 : 1);
    const first = this.slotIovFirst[slot] ?? 0;
    const done = this.slotDone[slot] ?? 0;
    this.slotSubmittedDone[slot] = done;
    const opcode = this.slotType[slot] === BlkRequestType.IN ? IoUringOp.READV : IoUringOp.WRITEV;
    const iovAddress = this.iovAddress + (slot * this.iovPerSlot + first) * 16;
    this.ring.prepare(
      opcode,
      writeThrough ? SqeFlag.IO_LINK : 0,
      this.fd,
      (this.slotOffset[slot] ?? 0) + done,
      iovAddress,
      (this.slotIovCount[slot] ?? 0) - first,
      0,
      encodeUserData(slot, KIND_RW),
    );
    this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
    this.outstandingCqes++;
    if (writeThrough) {
      this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) & ~SlotFlag.synced;
      this.ring.prepare(IoUringOp.FSYNC, 0, this.fd, 0, 0, 0, IORING_FSYNC_DATASYNC, encodeUserData(slot, KIND_SYNC));
      this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
      this.outstandingCqes++;
    }
  }

  private prepareFsync(slot: number, flags: number): void {
    this.ensureSqSpace(1);
    this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) & ~SlotFlag.synced;
    this.ring.prepare(IoUringOp.FSYNC, flags, this.fd, 0, 0, 0, IORING_FSYNC_DATASYNC, encodeUserData(slot, KIND_SYNC));
    this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
    this.outstandingCqes++;
  }

  private handleCqe(userData: number, res: number): void {
    const slot = userDataSlot(userData);
    this.outstandingCqes--;
    const type = this.slotType[slot] ?? 0;
    if (userDataKind(userData) === KIND_RW) {
      const moved = res;
      if (moved < 0) {
        // EINTR / EAGAIN: resubmitted by advance() (nothing was transferred).
        if (-moved !== Errno.EINTR && -moved !== Errno.EAGAIN) this.setError(slot, `${type === BlkRequestType.IN ? 'readv' : 'writev'}: ${errnoName(-moved)}`);
      } else if (moved === 0) {
        if (type === BlkRequestType.IN) this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) | SlotFlag.eof;
        else this.setError(slot, 'writev wrote nothing');
      } else {
        this.slotDone[slot] = (this.slotDone[slot] ?? 0) + moved;
      }
    } else if (res === 0) {
      this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) | SlotFlag.synced;
    } else if (-res !== ECANCELED && -res !== Errno.EINTR && -res !== Errno.EAGAIN) {
      // ECANCELED: the linked write came up short (or failed); the write's own CQE decides what happens.
      this.setError(slot, `fdatasync: ${errnoName(-res)}`);
    }
    const pending = (this.slotPending[slot] ?? 1) - 1;
    this.slotPending[slot] = pending;
    if (pending === 0) this.advance(slot);
  }

  private setError(slot: number, error: string): void {
    if (this.slotError[slot] === '') this.slotError[slot] = error;
  }

  /** All CQEs of the slot's last submission are in: complete it, or submit what is left to do. */
  private advance(slot: number): void {
    const error = this.slotError[slot] ?? '';
    if (error !== '') {
      this.complete(slot, BlkStatus.IOERR, error);
      return;
    }
    const type = this.slotType[slot] ?? 0;
    const flags = this.slotFlags[slot] ?? 0;
    const total = this.slotDataBytes[slot] ?? 0;
    const done = this.slotDone[slot] ?? 0;
    if (type === BlkRequestType.FLUSH) {
      if ((flags & SlotFlag.synced) === 0 || this.earlierWriteInFlight(slot)) this.prepareFsync(slot, SqeFlag.IO_DRAIN);
      else this.complete(slot, BlkStatus.OK, '');
      return;
    }
    if (done < total && (flags & SlotFlag.eof) === 0) {
      this.continueTransfer(slot, done);
      return;
    }
    if (type === BlkRequestType.IN) {
      if (done < total) this.zeroTail(slot, done);
      this.complete(slot, BlkStatus.OK, '');
      return;
    }
    if ((flags & SlotFlag.writeThrough) !== 0 && (flags & SlotFlag.synced) === 0) {
      this.prepareFsync(slot, 0);
      return;
    }
    this.complete(slot, BlkStatus.OK, '');
  }

  /** Resubmits the rest of a short (or interrupted) read or write. */
  private continueTransfer(slot: number, done: number): void {
    const moved = done - (this.slotSubmittedDone[slot] ?? 0);
    if (moved > 0) this.slotIovFirst[slot] = skipIovecs(this.iovWords, slot * this.iovPerSlot * 4, this.slotIovFirst[slot] ?? 0, moved);
    this.prepareReadWrite(slot);
  }

  /** A flush must not complete while a write submitted before it is still being continued. */
  private earlierWriteInFlight(flushSlot: number): boolean {
    const seq = this.slotSeq[flushSlot] ?? 0;
    for (let s = 0; s < this.depth; s++) {
      if (s !== flushSlot && (this.slotPending[s] ?? 0) > 0 && this.slotType[s] === BlkRequestType.OUT && (this.slotSeq[s] ?? 0) < seq) return true;
    }
    return false;
  }

  /** A read past end of file (image shorter than the capacity) returns zeroes, like a sparse tail would. */
  private zeroTail(slot: number, done: number): void {
    const memory = this.slotMemory[slot];
    if (memory === null || memory === undefined) return;
    const base = slot * this.segCapacity;
    const count = this.slotSegCount[slot] ?? 0;
    let skip = done;
    for (let s = 0; s < count; s++) {
      const len = this.slotSegLen[base + s] ?? 0;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      memory.fill((this.slotSegGpa[base + s] ?? 0) + skip, len - skip);
      skip = 0;
    }
  }

  private complete(slot: number, status: number, error: string): void {
    const c = this.completion;
    const type = this.slotType[slot] ?? 0;
    c.head = this.slotHead[slot] ?? 0;
    c.statusGpa = this.slotStatusGpa[slot] ?? 0;
    c.type = type;
    c.status = status;
    c.dataBytes = this.slotDataBytes[slot] ?? 0;
    c.written = status === BlkStatus.OK && type === BlkRequestType.IN ? c.dataBytes : 0;
    c.latencyNanos = (performance.now() - (this.slotStarted[slot] ?? 0)) * 1e6;
    c.error = error;
    this.releaseSlot(slot);
    this.onComplete(c);
  }
}
