/**
 * The asynchronous request engine on io_uring. Requests stay in flight across drains: `submit` prepares
 * SQEs, `submitPending` hands them to the kernel without waiting (one io_uring_enter per drain in the common
 * case), and completions are delivered by `reap` whenever the ring's registered eventfd (IORING_REGISTER_
 * EVENTFD, watched by the worker's epoll) says they may be there. iovecs carry host addresses straight into
 * mapped guest memory; with O_DIRECT, guest buffers that miss the alignment go through bounce chunks.
 *
 * Semantics are those of SyncExecutor:
 * - IN → READV; a short read is continued with the remainder; at end of file the rest is zero-filled.
 * - OUT → WRITEV; a short write is continued. In write-through mode a datasync FSYNC is linked after the
 *   write (IOSQE_IO_LINK) and the write completes only once it is synced; a short write breaks the link
 *   (the fsync is cancelled) and the remainder is resubmitted with a fresh linked fsync.
 * - FLUSH → FSYNC(DATASYNC) with IOSQE_IO_DRAIN: it starts only after every SQE submitted before it has
 *   completed, so it covers every write completed before it was received. If an earlier write was still
 *   being continued (short write) when the fsync completed, the fsync is issued again behind it.
 * - DISCARD / WRITE_ZEROES on a file: one FALLOCATE per range (PUNCH_HOLE, or ZERO_RANGE for WRITE_ZEROES
 *   without UNMAP), the ranges one after another. The first SQE carries IOSQE_IO_DRAIN, so the request
 *   starts only once everything submitted before it has completed, without the worker waiting (its later
 *   ranges are not ordered against requests that came after it: virtio-blk orders nothing in flight).
 *   A range the kernel refuses (EOPNOTSUPP: no ZERO_RANGE on tmpfs; EINVAL: a kernel before FALLOCATE)
 *   is redone synchronously by the SyncExecutor's rules (discard is a hint; zeroes are then written);
 *   once ZERO_RANGE failed, later zero ranges go straight to that fallback, behind a draining NOP.
 * - DISCARD / WRITE_ZEROES on a block device (BLKDISCARD / BLKZEROOUT are ioctls, not io_uring operations):
 *   `canAccept` refuses them while anything is in flight, then they run synchronously.
 * - GET_ID (and requests whose iovecs do not fit a slot, or whose bounce does not fit the pool) run
 *   synchronously too.
 *
 * Invariants: a slot is owned by exactly one request from `submit` to its completion (its head and
 * submission sequence are stable meanwhile); at most two SQEs per slot are outstanding, and the SQ holds
 * 2 × depth entries, so preparing never finds the SQ full; nothing here blocks except `waitIdle`.
 */
import { performance } from 'node:perf_hooks';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { errnoName, Errno } from '../sys/errors.js';
import { IoUring, IoUringOp, SqeFlag, IORING_FSYNC_DATASYNC } from '../sys/io-uring.js';
import { createEventFd, drainEventFd } from '../sys/eventfd.js';
import { sys } from '../sys/libc.js';
import type { GuestMemory } from './guest-memory.js';
import { readDiscardSegments, type BlkRequest, type RangeSegment } from './blk-request.js';
import type { DeviceLimits } from './device-limits.js';
import { emptyCompletion, type Completion, type EngineOptions, type RequestExecutor } from './request-executor.js';
import { fallocateMode, SyncExecutor } from './sync-executor.js';
import { IOV_MAX, IovecPool, SECTOR_SIZE, zeroFillTail } from './iovec.js';
import { BOUNCE_CHUNK_BYTES, BouncePool, copyBounce } from './bounce-pool.js';
import { waitReadable } from '../sys/poll-wait.js';

/** Default number of requests in flight per queue (the largest queue size vublk offers is 1024). */
export const DEFAULT_URING_DEPTH = 256;
/** Bounce memory per queue in O_DIRECT mode. */
export const BOUNCE_POOL_BYTES = 4 * 1024 * 1024;

/** CQE kinds, in the high half of the 32-bit user data; the slot is in the low half. */
const KIND_RW = 0;
const KIND_SYNC = 1;
/** A DISCARD / WRITE_ZEROES range (FALLOCATE), or the draining NOP in front of a synchronous one. */
const KIND_RANGE = 2;

const SlotFlag = {
  /** Write-through write: must be synced before it completes. */
  writeThrough: 1,
  /** A read reached end of file. */
  eof: 2,
  /** The slot's (latest) fsync succeeded. */
  synced: 4,
  /** Data goes through bounce chunks. */
  bounced: 8,
  /** The range SQE in flight is a NOP: its range is done synchronously when it completes. */
  rangeNop: 16,
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

export class UringExecutor implements RequestExecutor {
  onComplete: (completion: Completion) => void = () => undefined;
  readonly depth: number;
  readonly completionFd: number;
  private readonly ring: IoUring;
  private readonly sync: SyncExecutor;
  private readonly completion: Completion = emptyCompletion();
  private readonly memAlign: number;
  private readonly dsync: boolean;
  private readonly ignoreFlush: boolean;
  private readonly onBounce: () => void;
  private readonly bounce: BouncePool | null;
  private readonly chunksPerSlot: number;

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
  private readonly slotChunks: Int32Array;
  private readonly iov: IovecPool;
  /** DISCARD / WRITE_ZEROES: the request's ranges and the next one to do. */
  private readonly slotRanges: (RangeSegment[] | null)[];
  private readonly slotRangeAt: Int32Array;
  /** Files take DISCARD / WRITE_ZEROES through FALLOCATE SQEs; block devices synchronously. */
  private readonly asyncRanges: boolean;
  /** FALLOC_FL_ZERO_RANGE was refused once (tmpfs): zero ranges go to the synchronous fallback. */
  private zeroRangeRefused = false;
  private closed = false;
  /** READ / WRITE (one buffer) are available: a one-piece transfer skips the kernel's iovec import. */
  private readonly singleBufferOps: boolean;
  /** See batchNow; -1 when the next read must go to the clock. */
  private clock = -1;

  private readonly onCqe = (userData: number, res: number): void => this.handleCqe(userData, res);
  private readonly limits: DeviceLimits;

  /** Sets up the ring; throws SyscallError when io_uring is unavailable. */
  constructor(
    private readonly fd: number,
    limits: DeviceLimits,
    options: EngineOptions = {},
  ) {
    const depth = Math.max(1, Math.min(options.depth ?? DEFAULT_URING_DEPTH, 0x8000));
    this.depth = depth;
    this.memAlign = options.memAlign ?? 1;
    this.dsync = options.dsync ?? false;
    this.ignoreFlush = options.ignoreFlush ?? false;
    this.onBounce = options.onBounce ?? ((): void => undefined);
    // Each slot has at most two SQEs in flight (a write and its linked fsync).
    this.ring = IoUring.create({ entries: 2 * depth });
    try {
      this.completionFd = createEventFd();
      this.ring.registerEventFd(this.completionFd);
    } catch (error) {
      this.ring.close();
      throw error;
    }
    this.singleBufferOps = this.ring.supportsOp(IoUringOp.READ) && this.ring.supportsOp(IoUringOp.WRITE);
    this.sync = new SyncExecutor(fd, limits, options);
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
    this.bounce = this.memAlign > 1 ? new BouncePool(BOUNCE_POOL_BYTES / BOUNCE_CHUNK_BYTES) : null;
    this.chunksPerSlot = this.bounce?.chunks ?? 0;
    this.slotChunks = new Int32Array(depth * this.chunksPerSlot);
    // A segment crossing a memory-region boundary becomes two iovecs; requests needing more fall back to sync.
    this.iov = new IovecPool(depth, Math.max(this.chunksPerSlot, Math.min(IOV_MAX, 2 * this.segCapacity)));
    this.slotRanges = new Array<RangeSegment[] | null>(depth).fill(null);
    this.slotRangeAt = new Int32Array(depth);
    this.asyncRanges = options.blockDevice !== true;
    this.limits = limits;
  }

  get inFlight(): number {
    return this.active;
  }

  /** Room for one more request: a slot, bounce chunks; on a block device DISCARD / WRITE_ZEROES only once idle. */
  canAccept(request: BlkRequest): boolean {
    if (this.freeCount === 0) return false;
    if (request.type === BlkRequestType.DISCARD || request.type === BlkRequestType.WRITE_ZEROES)
      return this.asyncRanges || this.active === 0;
    if (this.bounce === null || (request.type !== BlkRequestType.IN && request.type !== BlkRequestType.OUT)) return true;
    const chunks = BouncePool.chunksFor(request.dataBytes);
    // Whether this request bounces is only known once its iovecs are built; asking for the chunks it would
    // need keeps the check cheap and errs on the side of waiting for a completion.
    return chunks > this.bounce.chunks || this.bounce.available >= chunks || this.active === 0;
  }

  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    switch (request.type) {
      case BlkRequestType.IN:
      case BlkRequestType.OUT:
        this.submitReadWrite(memory, request, head, capacityBytes, writeback);
        return;
      case BlkRequestType.FLUSH: {
        if (this.ignoreFlush) {
          this.sync.submit(memory, request, head, capacityBytes, writeback);
          return;
        }
        const slot = this.acquireSlot();
        this.initSlot(slot, memory, request, head, this.batchNow());
        this.prepareFsync(slot, SqeFlag.IO_DRAIN);
        return;
      }
      case BlkRequestType.DISCARD:
      case BlkRequestType.WRITE_ZEROES:
        if (this.asyncRanges) {
          this.submitRanges(memory, request, head, capacityBytes);
          return;
        }
        // A block device: canAccept let it in only with nothing in flight.
        this.sync.submit(memory, request, head, capacityBytes, writeback);
        return;
      default:
        // GET_ID touches guest memory only.
        this.sync.submit(memory, request, head, capacityBytes, writeback);
    }
  }

  /**
   * The clock of the current batch, read once per batch rather than twice per request: every request
   * prepared until the batch is handed to the kernel shares one start time, and every completion of one
   * reap one end time. A latency so includes the time the request waited for the requests popped before it.
   */
  private batchNow(): number {
    if (this.clock < 0) this.clock = performance.now();
    return this.clock;
  }

  submitPending(): boolean {
    this.clock = -1;
    if (this.ring.pendingSubmissions === 0) return true;
    if (this.ring.submitAndWait(0)) return true;
    // EAGAIN / EBUSY: fine as long as something in the kernel will complete and wake the worker.
    return this.outstandingCqes - this.ring.pendingSubmissions > 0;
  }

  reap(): number {
    if (this.closed) return 0;
    this.clock = -1;
    let total = 0;
    // Bounded: each round either reaps something or stops; continuations are submitted between rounds.
    for (let round = 0; round < 4; round++) {
      if (this.ring.pendingSubmissions > 0) this.ring.submitAndWait(0);
      const n = this.ring.reap(this.onCqe);
      total += n;
      if (n === 0 || this.ring.pendingSubmissions === 0) break;
    }
    this.clock = -1;
    return total;
  }

  waitIdle(timeoutMs: number): boolean {
    const deadline = performance.now() + timeoutMs;
    while (this.active > 0) {
      drainEventFd(this.completionFd);
      this.submitPending();
      this.reap();
      if (this.active === 0) break;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      waitReadable(this.completionFd, Math.min(Math.ceil(left), 100));
    }
    return true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ring.close();
    sys.close(this.completionFd);
    this.bounce?.close();
    this.sync.close();
  }

  private submitReadWrite(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    const started = this.batchNow();
    const slot = this.acquireSlot();
    const count = this.iov.fill(slot, memory, request.segGpa, request.segLen, request.segCount);
    const mustBounce = this.bounce !== null && (count > this.iov.perArray || !this.iov.aligned(slot, count, this.memAlign));
    if (mustBounce ? !this.canBounce(request.dataBytes) : count > this.iov.perArray) {
      // Rare (segments split across many memory regions, or a bounce larger than the pool): the sync engine.
      this.releaseSlot(slot);
      this.sync.submit(memory, request, head, capacityBytes, writeback);
      return;
    }
    this.initSlot(slot, memory, request, head, started);
    this.slotOffset[slot] = request.sector * SECTOR_SIZE;
    this.slotIovCount[slot] = count;
    const n = Math.min(request.segCount, this.segCapacity);
    const base = slot * this.segCapacity;
    for (let s = 0; s < n; s++) {
      this.slotSegGpa[base + s] = request.segGpa[s] ?? 0;
      this.slotSegLen[base + s] = request.segLen[s] ?? 0;
    }
    this.slotSegCount[slot] = n;
    if (request.type === BlkRequestType.OUT && !writeback && !this.dsync) this.slotFlags[slot] = SlotFlag.writeThrough;
    if (mustBounce) this.bounceSlot(slot, memory, request);
    this.prepareReadWrite(slot);
  }

  /** DISCARD / WRITE_ZEROES on a file: validated here, then one range at a time, the first one draining. */
  private submitRanges(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number): void {
    const ranges = readDiscardSegments(memory, request, this.limits, capacityBytes);
    if (!Array.isArray(ranges)) {
      // Bad segments are answered at once, like the sync engine does (nothing touched the file).
      this.sync.submit(memory, request, head, capacityBytes, true);
      return;
    }
    const slot = this.acquireSlot();
    this.initSlot(slot, memory, request, head, this.batchNow());
    this.slotRanges[slot] = ranges;
    this.slotRangeAt[slot] = 0;
    this.prepareRange(slot, SqeFlag.IO_DRAIN);
  }

  /**
   * Queues the slot's next non-empty range (FALLOCATE), or a NOP when that range must be done synchronously
   * (the NOP's completion does it, so `flags` still orders it); completes the slot when none is left.
   */
  private prepareRange(slot: number, flags: number): void {
    const ranges = this.slotRanges[slot] ?? [];
    let at = this.slotRangeAt[slot] ?? 0;
    while (at < ranges.length && (ranges[at]?.length ?? 0) === 0) at++;
    this.slotRangeAt[slot] = at;
    const range = ranges[at];
    if (range === undefined) {
      this.complete(slot, BlkStatus.OK, '');
      return;
    }
    const isWriteZeroes = this.slotType[slot] === BlkRequestType.WRITE_ZEROES;
    const nop = this.zeroRangeRefused && isWriteZeroes && !range.unmap;
    if (nop) this.prepare(IoUringOp.NOP, flags, 0, 0, 0, 0, encodeUserData(slot, KIND_RANGE));
    else
      this.prepare(
        IoUringOp.FALLOCATE,
        flags,
        range.offset,
        range.length,
        fallocateMode(range, isWriteZeroes),
        0,
        encodeUserData(slot, KIND_RANGE),
      );
    this.slotFlags[slot] = nop ? (this.slotFlags[slot] ?? 0) | SlotFlag.rangeNop : (this.slotFlags[slot] ?? 0) & ~SlotFlag.rangeNop;
    this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
  }

  /** A range's FALLOCATE (or NOP) completed: redo it synchronously if needed, then the next range. */
  private rangeDone(slot: number, res: number, wasNop: boolean): void {
    const ranges = this.slotRanges[slot] ?? [];
    const at = this.slotRangeAt[slot] ?? 0;
    const range = ranges[at];
    const isWriteZeroes = this.slotType[slot] === BlkRequestType.WRITE_ZEROES;
    if (range !== undefined && (wasNop || res < 0)) {
      if (isWriteZeroes && !range.unmap && -res === Errno.EOPNOTSUPP) this.zeroRangeRefused = true;
      // The synchronous rules decide: a refused discard is fine, refused zeroing writes zeroes, else IOERR.
      const error = this.sync.applyRange(range, isWriteZeroes);
      if (error !== '') {
        this.complete(slot, BlkStatus.IOERR, error);
        return;
      }
    }
    this.slotRangeAt[slot] = at + 1;
    this.prepareRange(slot, 0);
  }

  private canBounce(bytes: number): boolean {
    const pool = this.bounce;
    return pool !== null && pool.available >= BouncePool.chunksFor(bytes);
  }

  /** Points the slot's iovecs at bounce chunks (copying a write's data in). */
  private bounceSlot(slot: number, memory: GuestMemory, request: BlkRequest): void {
    const pool = this.bounce as BouncePool;
    const chunks = BouncePool.chunksFor(request.dataBytes);
    const base = slot * this.chunksPerSlot;
    const iovBase = this.iov.base(slot);
    for (let c = 0; c < chunks; c++) {
      const chunk = pool.take();
      this.slotChunks[base + c] = chunk;
      const length = Math.min(BOUNCE_CHUNK_BYTES, request.dataBytes - c * BOUNCE_CHUNK_BYTES);
      const w = iovBase + c * 4;
      const address = pool.address(chunk);
      this.iov.words[w] = address % 0x1_0000_0000;
      this.iov.words[w + 1] = Math.floor(address / 0x1_0000_0000);
      this.iov.words[w + 2] = length;
      this.iov.words[w + 3] = 0;
    }
    this.slotIovCount[slot] = chunks;
    this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) | SlotFlag.bounced;
    this.onBounce();
    if (request.type === BlkRequestType.OUT) {
      copyBounce(
        memory,
        request.segGpa,
        request.segLen,
        0,
        request.segCount,
        (i) => pool.bytes(this.slotChunks[base + i] ?? 0, BOUNCE_CHUNK_BYTES),
        BOUNCE_CHUNK_BYTES,
        false,
      );
    }
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
    this.slotSegCount[slot] = 0;
    this.slotSeq[slot] = ++this.sequence;
    this.slotError[slot] = '';
    this.slotMemory[slot] = memory;
  }

  private acquireSlot(): number {
    if (this.freeCount === 0) throw new Error('io_uring engine: submit without room (canAccept was not asked)');
    this.active++;
    return this.freeSlots[--this.freeCount] ?? 0;
  }

  private releaseSlot(slot: number): void {
    if (((this.slotFlags[slot] ?? 0) & SlotFlag.bounced) !== 0 && this.bounce !== null) {
      const chunks = this.slotIovCount[slot] ?? 0;
      const base = slot * this.chunksPerSlot;
      for (let c = 0; c < chunks; c++) this.bounce.give(this.slotChunks[base + c] ?? 0);
    }
    this.slotFlags[slot] = 0;
    this.slotMemory[slot] = null;
    this.slotRanges[slot] = null;
    this.freeSlots[this.freeCount++] = slot;
    this.active--;
  }

  private prepare(opcode: number, flags: number, offset: number, address: number, length: number, opFlags: number, userData: number): void {
    if (!this.ring.prepare(opcode, flags, this.fd, offset, address, length, opFlags, userData)) {
      throw new Error('io_uring engine: submission queue full (invariant broken)');
    }
    this.outstandingCqes++;
  }

  /** Queues the (remaining part of the) slot's READV/WRITEV, plus a linked fsync for write-through. */
  private prepareReadWrite(slot: number): void {
    const writeThrough = (this.slotFlags[slot] ?? 0) & SlotFlag.writeThrough;
    const first = this.slotIovFirst[slot] ?? 0;
    const done = this.slotDone[slot] ?? 0;
    this.slotSubmittedDone[slot] = done;
    const read = this.slotType[slot] === BlkRequestType.IN;
    const pieces = (this.slotIovCount[slot] ?? 0) - first;
    // One piece: READ / WRITE with the buffer itself, so the kernel imports no iovec array.
    const single = pieces === 1 && this.singleBufferOps;
    this.prepare(
      single ? (read ? IoUringOp.READ : IoUringOp.WRITE) : read ? IoUringOp.READV : IoUringOp.WRITEV,
      writeThrough ? SqeFlag.IO_LINK : 0,
      (this.slotOffset[slot] ?? 0) + done,
      single ? this.iov.entryAddress(slot, first) : this.iov.addressOf(slot, first),
      single ? this.iov.entryLength(slot, first) : pieces,
      0,
      encodeUserData(slot, KIND_RW),
    );
    this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
    if (writeThrough) {
      this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) & ~SlotFlag.synced;
      this.prepare(IoUringOp.FSYNC, 0, 0, 0, 0, IORING_FSYNC_DATASYNC, encodeUserData(slot, KIND_SYNC));
      this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
    }
  }

  private prepareFsync(slot: number, flags: number): void {
    this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) & ~SlotFlag.synced;
    this.prepare(IoUringOp.FSYNC, flags, 0, 0, 0, IORING_FSYNC_DATASYNC, encodeUserData(slot, KIND_SYNC));
    this.slotPending[slot] = (this.slotPending[slot] ?? 0) + 1;
  }

  private handleCqe(userData: number, res: number): void {
    const slot = userDataSlot(userData);
    this.outstandingCqes--;
    const type = this.slotType[slot] ?? 0;
    const kind = userDataKind(userData);
    if (kind === KIND_RANGE) {
      this.slotPending[slot] = (this.slotPending[slot] ?? 1) - 1;
      this.rangeDone(slot, res, ((this.slotFlags[slot] ?? 0) & SlotFlag.rangeNop) !== 0);
      return;
    }
    if (kind === KIND_RW) {
      const moved = res;
      if (moved < 0) {
        // EINTR / EAGAIN: resubmitted by advance() (nothing was transferred).
        if (-moved !== Errno.EINTR && -moved !== Errno.EAGAIN)
          this.setError(slot, `${type === BlkRequestType.IN ? 'readv' : 'writev'}: ${errnoName(-moved)}`);
      } else if (moved === 0) {
        if (type === BlkRequestType.IN) this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) | SlotFlag.eof;
        else this.setError(slot, 'writev wrote nothing');
      } else {
        this.slotDone[slot] = (this.slotDone[slot] ?? 0) + moved;
      }
    } else if (res === 0) {
      this.slotFlags[slot] = (this.slotFlags[slot] ?? 0) | SlotFlag.synced;
    } else if (-res !== Errno.ECANCELED && -res !== Errno.EINTR && -res !== Errno.EAGAIN) {
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
      if (!this.finishRead(slot, done)) {
        this.complete(slot, BlkStatus.IOERR, 'read buffer left guest memory');
        return;
      }
      this.complete(slot, BlkStatus.OK, '');
      return;
    }
    if ((flags & SlotFlag.writeThrough) !== 0 && (flags & SlotFlag.synced) === 0) {
      this.prepareFsync(slot, 0);
      return;
    }
    this.complete(slot, BlkStatus.OK, '');
  }

  /** Copies a bounced read back to the guest and zero-fills what lies past end of file. */
  private finishRead(slot: number, done: number): boolean {
    const memory = this.slotMemory[slot];
    if (memory === null || memory === undefined) return true;
    const base = slot * this.segCapacity;
    const count = this.slotSegCount[slot] ?? 0;
    if (((this.slotFlags[slot] ?? 0) & SlotFlag.bounced) !== 0) {
      const pool = this.bounce as BouncePool;
      const chunkBase = slot * this.chunksPerSlot;
      const copied = copyBounce(
        memory,
        this.slotSegGpa.subarray(base, base + count),
        this.slotSegLen.subarray(base, base + count),
        0,
        count,
        (i) => pool.bytes(this.slotChunks[chunkBase + i] ?? 0, BOUNCE_CHUNK_BYTES),
        BOUNCE_CHUNK_BYTES,
        true,
        done,
      );
      if (!copied) return false;
    }
    if (done < (this.slotDataBytes[slot] ?? 0)) zeroFillTail(memory, this.slotSegGpa, this.slotSegLen, base, count, done);
    return true;
  }

  /** Resubmits the rest of a short (or interrupted) read or write. */
  private continueTransfer(slot: number, done: number): void {
    const moved = done - (this.slotSubmittedDone[slot] ?? 0);
    if (moved > 0) this.slotIovFirst[slot] = this.iov.skip(slot, this.slotIovFirst[slot] ?? 0, moved);
    this.prepareReadWrite(slot);
  }

  /** A flush must not complete while a write submitted before it is still being continued. */
  private earlierWriteInFlight(flushSlot: number): boolean {
    const seq = this.slotSeq[flushSlot] ?? 0;
    for (let s = 0; s < this.depth; s++) {
      if (s === flushSlot || (this.slotPending[s] ?? 0) === 0 || (this.slotSeq[s] ?? 0) >= seq) continue;
      const type = this.slotType[s];
      if (type === BlkRequestType.OUT || type === BlkRequestType.WRITE_ZEROES || type === BlkRequestType.DISCARD) return true;
    }
    return false;
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
    c.latencyNanos = (this.batchNow() - (this.slotStarted[slot] ?? 0)) * 1e6;
    c.error = error;
    this.releaseSlot(slot);
    this.onComplete(c);
  }
}
