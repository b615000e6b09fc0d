/**
 * The request executor of a network image (NBD or RBD), one per queue, behind the same seam as the raw
 * engines (request-executor.ts), so the drain bracket, validation, throttle, counters and dirty logging
 * are the ones every back-end shares. Requests go to the disk's transport on this worker (backend-channel.ts)
 * with iovecs straight into guest memory (host addresses; the transport copies the list).
 *
 * Request semantics, the same as the raw engine's:
 * - FLUSH covers every write completed before it was submitted (NBD_CMD_FLUSH; rbd_aio_flush). With
 *   cache=unsafe it completes at once.
 * - DISCARD / WRITE_ZEROES start once everything submitted before them completed, and nothing after them
 *   starts before they complete (`canAccept`), as the raw engine runs them synchronously. Their ranges run
 *   one after another.
 * - Write-through (the guest turned the write cache off): a write completes when durable (NBD FUA, or a
 *   flush after it on RBD).
 * - errno 0 → OK; ENOTSUP/EOPNOTSUPP → UNSUPP; anything else → IOERR (counted in io_errors by the drain).
 * - GET_ID and unknown types are answered inside `submit` (the sync engine's code, which needs no image).
 *
 * completionFd is an epoll set of the transport's fd and this queue's own wake eventfd, registered
 * level-triggered by the ring server: the transport stays readable while it has progress to make, so a
 * pump that stopped early (fairness budget) is simply called again.
 *
 * Invariant: a slot is owned by one request from `submit` to its completion; `active` counts them.
 */
import { performance } from 'node:perf_hooks';
import { BlkRequestType, BlkStatus, blkRequestName } from '../../protocol/virtio-blk.js';
import { createEventFd, drainEventFd, signalEventFd } from '../sys/eventfd.js';
import { closeFd } from '../sys/fd.js';
import { InterestSet } from '../sys/interest-set.js';
import { waitReadable } from '../sys/poll-wait.js';
import { Errno, errnoName } from '../sys/errors.js';
import type { GuestMemory } from './guest-memory.js';
import { readDiscardSegments, type BlkRequest, type RangeSegment } from './blk-request.js';
import type { DeviceLimits } from './device-limits.js';
import { emptyCompletion, type Completion, type RequestExecutor } from './request-executor.js';
import { SyncExecutor } from './sync-executor.js';
import { SECTOR_SIZE } from './iovec.js';
import { BackendChannel, channelFor, type ChannelMember } from './backend-channel.js';
import type { NetworkBackend } from './network-backend.js';

/** Requests in flight per queue (as the io_uring engine). */
export const NETWORK_DEPTH = 256;
/** Host pieces one request may have (the transports copy at most this many). */
const MAX_PIECES = 1024;

enum Phase {
  /** The request's only (or current) operation is on the wire. */
  Main,
  /** A write done in write-through mode without FUA: its flush is on the wire. */
  FlushAfterWrite,
}

export interface NetworkExecutorOptions {
  /** FLUSH completes at once (cache=unsafe). */
  ignoreFlush?: boolean;
  /** Told when the connection is lost or back (for the control plane's log). */
  onHealthChange?: (reason: string) => void;
}

export class NetworkExecutor implements RequestExecutor, ChannelMember {
  onComplete: (completion: Completion) => void = () => undefined;
  readonly completionFd: number;
  /** The ring server registers completionFd level-triggered (see the file comment). */
  readonly completionLevelTriggered = true;

  private readonly channel: BackendChannel;
  private readonly memberId: number;
  private readonly wakeSet = new InterestSet();
  private readonly wakeFd = createEventFd();
  private wakeSignalled = false;
  private readonly sync: SyncExecutor;

  // per slot
  private readonly head = new Int32Array(NETWORK_DEPTH);
  private readonly statusGpa = new Float64Array(NETWORK_DEPTH);
  private readonly type = new Uint32Array(NETWORK_DEPTH);
  private readonly dataBytes = new Float64Array(NETWORK_DEPTH);
  private readonly started = new Float64Array(NETWORK_DEPTH);
  private readonly phase = new Uint8Array(NETWORK_DEPTH);
  private readonly errno = new Int32Array(NETWORK_DEPTH);
  /** DISCARD / WRITE_ZEROES ranges still to run, per slot. */
  private readonly ranges: (RangeSegment[] | null)[] = new Array<RangeSegment[] | null>(NETWORK_DEPTH).fill(null);
  private readonly freeSlots: number[] = [];
  private active = 0;
  /** A DISCARD / WRITE_ZEROES is in flight: nothing else starts. */
  private barrierSlot = -1;

  /** Completions routed to this queue and not yet published: (slot, errno) pairs. */
  private readonly done: number[] = [];
  /**
   * Entries of `done` in use. The array itself never shrinks: truncating it (length = 0) made V8 drop its
   * backing store, and the next completion allocated a new one, once per reap.
   */
  private doneLength = 0;
  private submittedSinceKick = false;

  // submission scratch: the request's host pieces
  private readonly pieceAddresses = new Float64Array(MAX_PIECES);
  private readonly pieceLengths = new Float64Array(MAX_PIECES);
  private pieceCount = 0;
  private readonly segments = { count: 0, addresses: this.pieceAddresses, lengths: this.pieceLengths };
  private readonly collect = (hostAddr: number, length: number): void => {
    if (this.pieceCount < MAX_PIECES) {
      this.pieceAddresses[this.pieceCount] = hostAddr;
      this.pieceLengths[this.pieceCount] = length;
    }
    this.pieceCount++;
  };

  private readonly completion: Completion = emptyCompletion();

  /** `backend`: the disk's back-end (its channel on this worker is found or opened); a channel: tests. */
  constructor(
    backend: NetworkBackend | BackendChannel,
    private readonly limits: DeviceLimits,
    private readonly options: NetworkExecutorOptions = {},
  ) {
    for (let slot = NETWORK_DEPTH - 1; slot >= 0; slot--) this.freeSlots.push(slot);
    // GET_ID, unknown types and (cache=unsafe) FLUSH: answered without an image.
    this.sync = new SyncExecutor(-1, limits, { ignoreFlush: true });
    this.sync.onComplete = (c) => this.onComplete(c);
    this.channel = backend instanceof BackendChannel ? backend : channelFor(backend);
    this.memberId = this.channel.join(this);
    this.wakeSet.watch(this.channel.transport.fd, true, false);
    this.wakeSet.watch(this.wakeFd, true, false);
    this.completionFd = this.wakeSet.fd;
  }

  get inFlight(): number {
    return this.active;
  }

  canAccept(request: BlkRequest): boolean {
    if (this.freeSlots.length === 0 || this.barrierSlot >= 0) return false;
    if (request.type === BlkRequestType.DISCARD || request.type === BlkRequestType.WRITE_ZEROES) return this.active === 0;
    return true;
  }

  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    const type = request.type;
    if (type === BlkRequestType.FLUSH && this.options.ignoreFlush === true) {
      this.sync.submit(memory, request, head, capacityBytes, writeback);
      return;
    }
    if (
      type !== BlkRequestType.IN &&
      type !== BlkRequestType.OUT &&
      type !== BlkRequestType.FLUSH &&
      type !== BlkRequestType.DISCARD &&
      type !== BlkRequestType.WRITE_ZEROES
    ) {
      // GET_ID (and unknown types: UNSUPP) need no image.
      this.sync.submit(memory, request, head, capacityBytes, writeback);
      return;
    }
    const started = performance.now();
    let ranges: RangeSegment[] | null = null;
    if (type === BlkRequestType.DISCARD || type === BlkRequestType.WRITE_ZEROES) {
      const parsed = readDiscardSegments(memory, request, this.limits, capacityBytes);
      if (!Array.isArray(parsed)) {
        this.completeNow(head, request, parsed.status, parsed.reason, started);
        return;
      }
      ranges = parsed.filter((r) => r.length > 0);
      if (ranges.length === 0) {
        this.completeNow(head, request, BlkStatus.OK, '', started);
        return;
      }
    }
    if (type === BlkRequestType.IN || type === BlkRequestType.OUT) {
      this.pieceCount = 0;
      for (let s = 0; s < request.segCount; s++) {
        if (!memory.forEachHostPiece(request.segGpa[s] ?? 0, request.segLen[s] ?? 0, this.collect)) {
          this.completeNow(head, request, BlkStatus.IOERR, 'data buffer left guest memory', started);
          return;
        }
      }
      if (this.pieceCount > MAX_PIECES) {
        this.completeNow(head, request, BlkStatus.IOERR, `request has ${this.pieceCount} host pieces, more than ${MAX_PIECES}`, started);
        return;
      }
      this.segments.count = this.pieceCount;
    }

    const slot = this.freeSlots.pop()!;
    this.active++;
    this.head[slot] = head;
    this.statusGpa[slot] = request.statusGpa;
    this.type[slot] = type;
    this.dataBytes[slot] = request.dataBytes;
    this.started[slot] = started;
    this.phase[slot] = Phase.Main;
    this.errno[slot] = 0;
    const tag = this.channel.tag(this.memberId, slot);
    const transport = this.channel.transport;
    const offset = request.sector * SECTOR_SIZE;
    this.submittedSinceKick = true;
    switch (type) {
      case BlkRequestType.IN:
        transport.read(tag, offset, this.segments);
        return;
      case BlkRequestType.OUT:
        // Write-through: durable on completion (FUA, or a flush after it when the transport has no FUA).
        transport.write(tag, offset, this.segments, !writeback && transport.supportsFua);
        if (!writeback && !transport.supportsFua) this.phase[slot] = Phase.FlushAfterWrite;
        return;
      case BlkRequestType.FLUSH:
        transport.flush(tag);
        return;
      default:
        this.ranges[slot] = ranges;
        this.barrierSlot = slot;
        this.startNextRange(slot);
    }
  }

  /** Starts the slot's next DISCARD / WRITE_ZEROES range. */
  private startNextRange(slot: number): void {
    const range = this.ranges[slot]!.shift()!;
    const tag = this.channel.tag(this.memberId, slot);
    if (this.type[slot] === BlkRequestType.DISCARD) this.channel.transport.discard(tag, range.offset, range.length);
    else this.channel.transport.writeZeroes(tag, range.offset, range.length, range.unmap);
    this.submittedSinceKick = true;
  }

  completionReady(): void {
    this.channel.transport.ready();
  }

  submitPending(): boolean {
    if (this.submittedSinceKick) {
      this.submittedSinceKick = false;
      this.channel.transport.kick();
    }
    return true;
  }

  /** ChannelMember: a completion for one of this queue's slots. */
  accept(slot: number, errno: number, direct: boolean): void {
    this.done[this.doneLength] = slot;
    this.done[this.doneLength + 1] = errno;
    this.doneLength += 2;
    if (!direct && !this.wakeSignalled) {
      this.wakeSignalled = true;
      signalEventFd(this.wakeFd);
    }
  }

  reap(): number {
    if (this.wakeSignalled) {
      this.wakeSignalled = false;
      drainEventFd(this.wakeFd);
    }
    const change = this.channel.poll(this);
    if (change !== '') this.options.onHealthChange?.(change);
    let delivered = 0;
    // Bounded: each pair is taken once; follow-up operations complete in a later poll.
    const pairs = this.doneLength;
    for (let i = 0; i < pairs; i += 2) {
      if (this.finish(this.done[i]!, this.done[i + 1]!)) delivered++;
    }
    // Completions that arrived while finishing (none, usually) stay for the next reap.
    if (this.doneLength > pairs) this.done.copyWithin(0, pairs, this.doneLength);
    this.doneLength -= pairs;
    if (this.submittedSinceKick) this.submitPending();
    return delivered;
  }

  /** One operation of `slot` ended; returns true when the request completed (and was published). */
  private finish(slot: number, errno: number): boolean {
    if (errno !== 0 && this.errno[slot] === 0) this.errno[slot] = errno;
    const failed = this.errno[slot] !== 0;
    if (!failed && this.phase[slot] === Phase.FlushAfterWrite) {
      this.phase[slot] = Phase.Main;
      this.channel.transport.flush(this.channel.tag(this.memberId, slot));
      this.submittedSinceKick = true;
      return false;
    }
    const ranges = this.ranges[slot] ?? null;
    if (!failed && ranges !== null && ranges.length > 0) {
      this.startNextRange(slot);
      return false;
    }
    this.ranges[slot] = null;
    if (this.barrierSlot === slot) this.barrierSlot = -1;
    const code = this.errno[slot]!;
    const type = this.type[slot]!;
    const c = this.completion;
    c.head = this.head[slot]!;
    c.statusGpa = this.statusGpa[slot]!;
    c.type = type;
    c.status = code === 0 ? BlkStatus.OK : code === Errno.EOPNOTSUPP ? BlkStatus.UNSUPP : BlkStatus.IOERR;
    c.dataBytes = this.dataBytes[slot]!;
    c.written = code === 0 && type === BlkRequestType.IN ? c.dataBytes : 0;
    c.latencyNanos = (performance.now() - this.started[slot]!) * 1e6;
    c.error = code === 0 ? '' : `${blkRequestName(type)}: ${errnoName(code)}`;
    this.freeSlots.push(slot);
    this.active--;
    this.onComplete(c);
    return true;
  }

  private completeNow(head: number, request: BlkRequest, status: number, error: string, started: number): void {
    const c = this.completion;
    c.head = head;
    c.statusGpa = request.statusGpa;
    c.type = request.type;
    c.status = status;
    c.written = 0;
    c.dataBytes = request.dataBytes;
    c.latencyNanos = (performance.now() - started) * 1e6;
    c.error = error;
    this.onComplete(c);
  }

  waitIdle(timeoutMs: number): boolean {
    const deadline = performance.now() + timeoutMs;
    for (let round = 0; round < 1_000_000; round++) {
      this.reap();
      if (this.active === 0) return true;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      waitReadable(this.completionFd, Math.min(left, 100));
      this.completionReady();
    }
    return this.active === 0;
  }

  close(): void {
    // Requests still in flight (a stop that timed out) are answered by nobody: the channel drops them.
    this.channel.leave(this.memberId);
    this.wakeSet.close();
    closeFd(this.wakeFd);
    this.sync.close();
  }
}
