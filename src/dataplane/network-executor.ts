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
 * Request merging (`merge=`, on by default): a READ or WRITE that starts where the previous one of the same
 * type ends, submitted in the same batch (between two `submitPending`), joins it in one transport operation
 * (one NBD command, one rbd_aio_*v) whose iovec list is both requests' buffers in order. A network server
 * spends most of a small request on the request itself (the OSD ~85 µs per 4 KiB op), so a sequential stream
 * costs it less; QEMU's own virtio-blk device merges the same way (`request-merging`), its vhost-user export
 * does not. Nothing waits to be merged: the batch is what the drain already submits before one kick. Each
 * request keeps its slot and completes with the operation's result (all fail if it fails, as in QEMU).
 *
 * Invariants: a slot is owned by one request from `submit` to its completion; `active` counts them. A merged
 * operation is on the wire under its first slot's tag (the leader); the others are linked from it through
 * `nextInOp` and have no operation of their own. The open group (`openLeader`) never outlives a batch:
 * `submitPending`, `reap` and every non-mergeable submission send it first.
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
  /** Largest merged READ / WRITE in bytes; 0 turns merging off (default: no merging). */
  mergeMaxBytes?: number;
  /** Told of each request that joined an earlier one's operation (for the merge counter). */
  onMerged?: () => void;
  /** Told when the connection is lost or back (for the control plane's log). */
  onHealthChange?: (reason: string) => void;
  /** Told of connection events since the last report (BackendEvent order; for the queue's counters). */
  onBackendEvents?: (deltas: Float64Array) => void;
  /** Told how many of the transport's connections are down, when this queue reports it (for a gauge). */
  onConnectionsDown?: (count: number) => void;
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
  /** The next request riding on the same operation (merging), -1 at the end of the list. */
  private readonly nextInOp = new Int32Array(NETWORK_DEPTH).fill(-1);
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

  // The operation being assembled in this batch (its pieces are the scratch's first `pieceCount`).
  private readonly mergeMaxBytes: number;
  /** Its first slot, whose tag it goes out under; -1 when none is open. */
  private openLeader = -1;
  private openLast = -1;
  private openType = 0;
  private openFua = false;
  /** Byte offset where it ends: the next request must start here to join. */
  private openEnd = 0;
  private openBytes = 0;

  /** `backend`: the disk's back-end (its channel on this worker is found or opened); a channel: tests. */
  constructor(
    backend: NetworkBackend | BackendChannel,
    private readonly limits: DeviceLimits,
    private readonly options: NetworkExecutorOptions = {},
  ) {
    for (let slot = NETWORK_DEPTH - 1; slot >= 0; slot--) this.freeSlots.push(slot);
    this.mergeMaxBytes = Math.max(0, options.mergeMaxBytes ?? 0);
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
    if (type === BlkRequestType.IN || type === BlkRequestType.OUT) {
      this.submitData(memory, request, head, type, writeback, started);
      return;
    }
    // Nothing joins across a FLUSH, DISCARD or WRITE_ZEROES: the open operation goes first.
    this.sendOpen();
    let ranges: RangeSegment[] | null = null;
    if (type !== BlkRequestType.FLUSH) {
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
    const slot = this.takeSlot(head, request, type, started);
    const tag = this.channel.tag(this.memberId, slot);
    this.submittedSinceKick = true;
    if (type === BlkRequestType.FLUSH) {
      this.channel.transport.flush(tag);
      return;
    }
    this.ranges[slot] = ranges;
    this.barrierSlot = slot;
    this.startNextRange(slot);
  }

  /** A READ or WRITE: joins the open operation when it continues it, else opens one of its own. */
  private submitData(memory: GuestMemory, request: BlkRequest, head: number, type: number, writeback: boolean, started: number): void {
    const offset = request.sector * SECTOR_SIZE;
    // Write-through: durable on completion (FUA, or a flush after it when the transport has no FUA).
    const fua = type === BlkRequestType.OUT && !writeback;
    const joins =
      this.openLeader >= 0 &&
      type === this.openType &&
      fua === this.openFua &&
      offset === this.openEnd &&
      this.openBytes + request.dataBytes <= this.mergeMaxBytes;
    if (!joins) this.sendOpen();
    const before = this.pieceCount;
    if (!this.collectPieces(memory, request)) {
      this.pieceCount = before;
      this.completeNow(head, request, BlkStatus.IOERR, 'data buffer left guest memory', started);
      return;
    }
    const pieces = this.pieceCount - before;
    if (pieces > MAX_PIECES) {
      this.pieceCount = before;
      this.completeNow(head, request, BlkStatus.IOERR, `request has ${pieces} host pieces, more than ${MAX_PIECES}`, started);
      return;
    }
    if (this.pieceCount > MAX_PIECES) {
      // Too many pieces to join: send the open operation and start this one alone (its pieces were
      // collected only as far as the scratch goes, so collect them again from the start).
      this.pieceCount = before;
      this.sendOpen();
      this.collectPieces(memory, request);
    }
    const slot = this.takeSlot(head, request, type, started);
    if (this.openLeader >= 0) {
      this.nextInOp[this.openLast] = slot;
      this.openLast = slot;
      this.openBytes += request.dataBytes;
      this.openEnd += request.dataBytes;
      this.options.onMerged?.();
    } else {
      this.openLeader = slot;
      this.openLast = slot;
      this.openType = type;
      this.openFua = fua;
      this.openBytes = request.dataBytes;
      this.openEnd = offset + request.dataBytes;
    }
    this.submittedSinceKick = true;
    if (this.mergeMaxBytes === 0) this.sendOpen();
  }

  /** Appends the host pieces of the request's buffers to the scratch; false when a buffer leaves guest memory. */
  private collectPieces(memory: GuestMemory, request: BlkRequest): boolean {
    for (let s = 0; s < request.segCount; s++) {
      if (!memory.forEachHostPiece(request.segGpa[s] ?? 0, request.segLen[s] ?? 0, this.collect)) return false;
    }
    return true;
  }

  /** Claims a slot for a request about to go to the transport. */
  private takeSlot(head: number, request: BlkRequest, type: number, started: number): number {
    const slot = this.freeSlots.pop()!;
    this.active++;
    this.head[slot] = head;
    this.statusGpa[slot] = request.statusGpa;
    this.type[slot] = type;
    this.dataBytes[slot] = request.dataBytes;
    this.started[slot] = started;
    this.phase[slot] = Phase.Main;
    this.errno[slot] = 0;
    this.nextInOp[slot] = -1;
    return slot;
  }

  /** Hands the open READ / WRITE operation (if any) to the transport. */
  private sendOpen(): void {
    const leader = this.openLeader;
    if (leader < 0) return;
    this.openLeader = -1;
    this.segments.count = this.pieceCount;
    this.pieceCount = 0;
    const tag = this.channel.tag(this.memberId, leader);
    const transport = this.channel.transport;
    const offset = this.openEnd - this.openBytes;
    if (this.openType === BlkRequestType.IN) {
      transport.read(tag, offset, this.segments);
      return;
    }
    transport.write(tag, offset, this.segments, this.openFua && transport.supportsFua);
    if (this.openFua && !transport.supportsFua) this.phase[leader] = Phase.FlushAfterWrite;
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
    this.sendOpen();
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

  /** What this queue last reported of the connections down (its gauge); 0 until it reports. */
  private connectionsDown = 0;

  /** ChannelMember: this queue is the one that reports the transport's connections down. */
  backendConnectionsDown(count: number): void {
    this.connectionsDown = count;
    this.options.onConnectionsDown?.(count);
  }

  /** ChannelMember: connection events seen while this queue polled. */
  backendEvents(deltas: Float64Array): void {
    this.options.onBackendEvents?.(deltas);
  }

  reap(): number {
    this.sendOpen();
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
      delivered += this.finish(this.done[i]!, this.done[i + 1]!);
    }
    // Completions that arrived while finishing (none, usually) stay for the next reap.
    if (this.doneLength > pairs) this.done.copyWithin(0, pairs, this.doneLength);
    this.doneLength -= pairs;
    if (this.submittedSinceKick) this.submitPending();
    return delivered;
  }

  /** One operation of `slot` ended; returns how many requests it completed (and published). */
  private finish(slot: number, errno: number): number {
    if (errno !== 0 && this.errno[slot] === 0) this.errno[slot] = errno;
    const failed = this.errno[slot] !== 0;
    if (!failed && this.phase[slot] === Phase.FlushAfterWrite) {
      this.phase[slot] = Phase.Main;
      this.channel.transport.flush(this.channel.tag(this.memberId, slot));
      this.submittedSinceKick = true;
      return 0;
    }
    const ranges = this.ranges[slot] ?? null;
    if (!failed && ranges !== null && ranges.length > 0) {
      this.startNextRange(slot);
      return 0;
    }
    this.ranges[slot] = null;
    if (this.barrierSlot === slot) this.barrierSlot = -1;
    const code = this.errno[slot]!;
    const now = performance.now();
    let completed = 0;
    // Bounded: the list links distinct slots (each joined once, cleared when taken), at most NETWORK_DEPTH.
    for (let member = slot; member >= 0 && completed < NETWORK_DEPTH; completed++) {
      const next = this.nextInOp[member]!;
      this.nextInOp[member] = -1;
      this.publish(member, code, now);
      member = next;
    }
    return completed;
  }

  /** Completes the request of `slot` with errno `code` and frees the slot. */
  private publish(slot: number, code: number, now: number): void {
    const type = this.type[slot]!;
    const c = this.completion;
    c.head = this.head[slot]!;
    c.statusGpa = this.statusGpa[slot]!;
    c.type = type;
    c.status = code === 0 ? BlkStatus.OK : code === Errno.EOPNOTSUPP ? BlkStatus.UNSUPP : BlkStatus.IOERR;
    c.dataBytes = this.dataBytes[slot]!;
    c.written = code === 0 && type === BlkRequestType.IN ? c.dataBytes : 0;
    c.latencyNanos = (now - this.started[slot]!) * 1e6;
    c.error = code === 0 ? '' : `${blkRequestName(type)}: ${errnoName(code)}`;
    this.freeSlots.push(slot);
    this.active--;
    this.onComplete(c);
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
    // The queue no longer reports for the transport: its gauge must not keep counting connections.
    if (this.connectionsDown !== 0) this.backendConnectionsDown(0);
    this.wakeSet.close();
    closeFd(this.wakeFd);
    this.sync.close();
  }
}
