/**
 * qcow2 behind the back-end seam: one mapping layer for both engines. A guest request is turned into
 * per-extent raw operations (`src/backend/qcow2` says where the bytes live) that are submitted through the
 * existing raw engines (io_uring or sync), one inner executor per host file (the top image, and each backing
 * file a read touches). So alignment, bounce buffers, short transfers and io_uring batching stay in one place.
 *
 * - IN whose range is one data extent (an allocated cluster range of one file: the common case) goes to that
 *   file's engine as it is, with only its sector moved (`fastRead`: no parent, no sub-request objects); the
 *   engine's completion carries the guest's head (offset by FAST_HEAD) and status address straight through.
 * - Other IN: `mapRead` → data extents become READV sub-requests into the guest buffers (split per extent);
 *   zero extents are zero-filled and compressed ones inflated and copied here (`landInGuest`: the one place
 *   this file writes guest bytes itself). The request completes when its last sub-request does.
 * - OUT: `prepareWrite` → a ticket and extents; WRITEV per extent; then `commitWrite` (or `abortWrite` on a
 *   failed data write), and only then the completion. RETRY (another in-flight allocation holds a cluster,
 *   maybe on another worker) leaves the request in `deferred`: it is tried again at the next reap/submit
 *   (a completion or the drain's retry timer: `submitPending` says false when nothing in flight will wake
 *   the worker), never waited for.
 * - FLUSH: `handle.flush()` (one fdatasync of the top image: data written through any fd of that file and
 *   metadata). Every write completed before it was committed first, so it is covered.
 * - DISCARD / WRITE_ZEROES: accepted only with nothing in flight (vublk's ordering rule), then
 *   `handle.discard` / `handle.writeZeroes` per range (RETRY: deferred as above; they are idempotent).
 * - Write-through (cache=writethrough/directsync, or the guest turned the write cache off): the data goes
 *   through the engine as a write-back write, and after the commit one `handle.flush()` makes data and the
 *   new L2 entry durable before the completion.
 * - O_DIRECT: the caller maps each layer fd to an fd of the same file opened with the cache mode's flags
 *   (`hostFd`), so extents of the buffered handle fds are served by direct I/O.
 *
 * - Ring stop (`waitIdle`) on a worker that serves several rings of the image: a deferred write may wait for
 *   an allocation in flight on a sibling ring of this thread, whose completions only that ring reaps. While
 *   waiting, the sibling executors of this thread are pumped (`pump`): their engines are reaped and writes
 *   committed, but their completions are held and delivered at their own next reap (a self-wake eventfd
 *   in their completion set makes the worker drain them), so their rings publish and notify as usual.
 *
 * Invariants: every ticket is committed or aborted exactly once (abort also when a sub-request could not be
 * submitted); a parent completes exactly once, after all its sub-requests; `inFlight` counts parents and
 * fast-path reads from `submit` to completion, deferred ones included.
 */
import { performance } from 'node:perf_hooks';
import { BlkRequestType, BlkStatus, BLK_ID_BYTES } from '../../protocol/virtio-blk.js';
import { RETRY, Qcow2Handle, attachLayer, type LayerDescription, type ReadExtent, type WriteExtent } from '../backend/qcow2/index.js';
import { openFlags, O_CLOEXEC, O_DIRECT, O_RDONLY } from '../sys/block-io.js';
import { sys } from '../sys/libc.js';
import { BlkRequest, readDiscardSegments, type RangeSegment } from './blk-request.js';
import type { DeviceLimits } from './device-limits.js';
import { EpollSet } from './epoll.js';
import { createEventFd, signalEventFd } from '../sys/eventfd.js';
import type { GuestMemory } from './guest-memory.js';
import { emptyCompletion, type Completion, type RequestExecutor } from './request-executor.js';
import { SECTOR_SIZE } from './iovec.js';

/** Engine tags at or above this are fast-path reads (tag = FAST_HEAD + the guest's head), below are sub ids. */
const FAST_HEAD = 0x4000_0000;
/** Parents in flight at most per queue (sub-requests may be many more; they wait in `queued`). */
export const QCOW2_MAX_IN_FLIGHT = 128;
const INNER_SEGMENTS = 1024 + 2;

/** The executors of this worker thread (pumped by a sibling's waitIdle). */
const executorsOfThisThread = new Set<Qcow2Executor>();

interface Parent {
  memory: GuestMemory;
  head: number;
  statusGpa: number;
  type: number;
  offset: number;
  dataBytes: number;
  started: number;
  segGpa: number[];
  segLen: number[];
  /** Sub-requests not yet completed (+1 while they are being submitted). */
  pending: number;
  error: string;
  ticket: number;
  writeThrough: boolean;
  ranges: RangeSegment[] | null;
}

interface Sub {
  parent: Parent;
  fd: number;
  type: number;
  offset: number;
  segGpa: number[];
  segLen: number[];
  length: number;
}

export interface Qcow2ExecutorOptions {
  /** The engine's fd for a layer fd (an O_DIRECT one in cache=none/directsync; else the fd itself). */
  hostFd: (layerFd: number) => number;
  /** A raw engine for one host fd. */
  makeInner: (fd: number) => RequestExecutor;
  ignoreFlush: boolean;
  /** Called once the executor closed (releases fds `hostFd` opened). */
  onClose?: () => void;
}

export class Qcow2Executor implements RequestExecutor {
  onComplete: (completion: Completion) => void = () => undefined;
  readonly completionFd: number;
  private readonly poll: EpollSet | null;
  private readonly pollReady = new Int32Array(16);
  private readonly inners = new Map<number, RequestExecutor>();
  private readonly subs: (Sub | null)[] = [];
  private readonly freeSubs: number[] = [];
  private readonly queued: Sub[] = [];
  private deferred: Parent[] = [];
  private active = 0;
  private readonly completion: Completion = emptyCompletion();
  private readonly scratch = new BlkRequest(INNER_SEGMENTS);
  private readonly readExtents: ReadExtent[] = [];
  private readonly writeExtents: WriteExtent[] = [];
  private compressedBuffer = new Uint8Array(0);
  private readonly sleeper = new Int32Array(new SharedArrayBuffer(4));
  private closed = false;
  /** While pumped by a sibling: completions are held here and delivered at the next reap. */
  private holding = false;
  private held: Completion[] = [];
  /** Signalled when held completions wait (it sits in the completion epoll set); -1 without one. */
  private readonly wakeFd: number;
  /** Reads served by the fast path (for tests). */
  fastReads = 0;

  constructor(
    private readonly handle: Qcow2Handle,
    private readonly limits: DeviceLimits,
    private readonly options: Qcow2ExecutorOptions,
  ) {
    const top = this.innerFor(handle.fd);
    if (top.completionFd >= 0) {
      // Several inner engines, one fd for the worker's epoll: an epoll set of their completion fds.
      this.poll = new EpollSet(16);
      this.poll.add(top.completionFd, true);
      this.completionFd = this.poll.fd;
      this.wakeFd = createEventFd();
      this.poll.add(this.wakeFd, true);
    } else {
      this.poll = null;
      this.completionFd = -1;
      this.wakeFd = -1;
    }
    executorsOfThisThread.add(this);
  }

  get inFlight(): number {
    return this.active;
  }

  canAccept(request: BlkRequest): boolean {
    if (request.type === BlkRequestType.DISCARD || request.type === BlkRequestType.WRITE_ZEROES) return this.active === 0;
    return this.active < QCOW2_MAX_IN_FLIGHT;
  }

  submit(memory: GuestMemory, request: BlkRequest, head: number, capacityBytes: number, writeback: boolean): void {
    // A read is mapped once: the fast path hands it over, or the general path starts from the same extents.
    const isRead = request.type === BlkRequestType.IN;
    const mapError = isRead ? this.mapRead(request.sector * SECTOR_SIZE, request.dataBytes) : null;
    if (isRead && mapError === null && this.fastRead(memory, request, head)) return;
    const parent: Parent = {
      memory,
      head,
      statusGpa: request.statusGpa,
      type: request.type,
      offset: request.sector * SECTOR_SIZE,
      dataBytes: request.dataBytes,
      started: performance.now(),
      segGpa: Array.from(request.segGpa.subarray(0, request.segCount)),
      segLen: Array.from(request.segLen.subarray(0, request.segCount)),
      pending: 0,
      error: '',
      ticket: 0,
      writeThrough: !writeback,
      ranges: null,
    };
    this.active++;
    switch (request.type) {
      case BlkRequestType.IN:
        this.startRead(parent, mapError);
        return;
      case BlkRequestType.OUT:
        if (!this.startWrite(parent)) this.deferred.push(parent);
        return;
      case BlkRequestType.FLUSH:
        this.flush(parent);
        return;
      case BlkRequestType.GET_ID:
        this.getId(parent);
        return;
      case BlkRequestType.DISCARD:
      case BlkRequestType.WRITE_ZEROES: {
        const ranges = readDiscardSegments(memory, request, this.limits, capacityBytes);
        if (!Array.isArray(ranges)) {
          this.complete(parent, ranges.status, ranges.reason);
          return;
        }
        parent.ranges = ranges;
        if (!this.startRanges(parent)) this.deferred.push(parent);
        return;
      }
      default:
        this.complete(parent, BlkStatus.UNSUPP, `unsupported request type ${request.type}`);
    }
  }

  submitPending(): boolean {
    const ok = this.advance();
    // Deferred work with nothing in flight: nothing will wake the worker but the drain's retry timer.
    if (this.deferred.length > 0 && this.active === this.deferred.length) return false;
    return ok;
  }

  reap(): number {
    if (this.closed) return 0;
    if (this.poll !== null) while (this.poll.wait(this.pollReady, 0) === this.pollReady.length);
    let total = this.deliverHeld();
    for (const inner of this.inners.values()) total += inner.reap();
    // What the completions above released (a deferred write's retry, a write's next extent) must reach the
    // kernel now: this reap may be the drain's last call, and a poisoned or idle ring is not drained again
    // until something wakes the worker, which a sub-request that was never submitted cannot do.
    this.advance();
    return total;
  }

  /**
   * Retries deferred parents, pushes queued sub-requests into the engines and hands them to the kernel.
   * False when an engine refused its submission (it must be retried).
   */
  private advance(): boolean {
    this.retryDeferred();
    this.pushQueued();
    let ok = true;
    for (const inner of this.inners.values()) if (!inner.submitPending()) ok = false;
    return ok;
  }

  waitIdle(timeoutMs: number): boolean {
    const deadline = performance.now() + timeoutMs;
    while (this.active > 0) {
      this.reap();
      if (this.active === 0) break;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      let busy = false;
      for (const inner of this.inners.values()) {
        if (inner.inFlight > 0) {
          busy = true;
          inner.waitIdle(Math.min(left, 10));
        }
      }
      if (!busy) {
        // Only deferred work left: what it waits for may be in flight on a sibling ring of this thread.
        for (const sibling of executorsOfThisThread) if (sibling !== this) sibling.pump();
        Atomics.wait(this.sleeper, 0, 0, Math.min(left, 1));
      }
    }
    return true;
  }

  /** Reaps the engines and commits what completed, holding the completions for this ring's own next reap. */
  private pump(): void {
    if (this.closed || this.poll === null || this.active === 0) return;
    this.holding = true;
    try {
      for (const inner of this.inners.values()) {
        inner.submitPending();
        inner.reap();
      }
      // What was pushed (continuations) must reach the kernel now: this ring's own drain, which would submit
      // it, may not run until something wakes it.
      this.advance();
    } finally {
      this.holding = false;
    }
    if (this.held.length > 0) signalEventFd(this.wakeFd);
  }

  private deliverHeld(): number {
    if (this.held.length === 0) return 0;
    const held = this.held;
    this.held = [];
    for (const completion of held) {
      this.active--;
      this.onComplete(completion);
    }
    return held.length;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    executorsOfThisThread.delete(this);
    this.held = [];
    if (this.wakeFd >= 0) sys.close(this.wakeFd);
    for (const parent of this.deferred) if (parent.ticket > 0) this.handle.abortWrite(parent.ticket);
    this.deferred = [];
    for (const inner of this.inners.values()) inner.close();
    this.inners.clear();
    this.poll?.close();
    this.handle.close();
    this.options.onClose?.();
  }

  // --- reads ---------------------------------------------------------------------------------------

  /** Fills `readExtents` with where the range lives; returns why it could not (startRead reports it), or null. */
  private mapRead(offset: number, length: number): Error | null {
    this.readExtents.length = 0;
    try {
      this.handle.mapRead(offset, length, this.readExtents);
      return null;
    } catch (error) {
      return error instanceof Error ? error : new Error(String(error));
    }
  }

  /**
   * A read whose mapping (`readExtents`) is one data extent is handed to that file's engine unchanged but for
   * its sector (the drain's request object is restored before returning). False when it does not qualify
   * (several or non-data extents, no room in that engine): the general path handles it.
   */
  private fastRead(memory: GuestMemory, request: BlkRequest, head: number): boolean {
    const extents = this.readExtents;
    const extent = extents[0];
    if (extents.length !== 1 || extent === undefined || extent.kind !== 'data' || extent.length !== request.dataBytes) return false;
    let inner: RequestExecutor;
    try {
      inner = this.innerFor(extent.fd);
    } catch {
      return false;
    }
    if (!inner.canAccept(request)) return false;
    const sector = request.sector;
    // Safe to move: the engine reads the request during submit only, and the drain reuses it afterwards.
    request.sector = extent.hostOffset / SECTOR_SIZE;
    this.active++;
    this.fastReads++;
    try {
      inner.submit(memory, request, FAST_HEAD + head, Number.MAX_SAFE_INTEGER, true);
    } finally {
      request.sector = sector;
    }
    return true;
  }

  /** `readExtents` holds this read's mapping (submit made it), unless `mapError` says why there is none. */
  private startRead(parent: Parent, mapError: Error | null): void {
    if (mapError !== null) {
      this.complete(parent, BlkStatus.IOERR, mapError.message);
      return;
    }
    const extents = this.readExtents;
    parent.pending = 1;
    const cursor = { seg: 0, skip: 0 };
    for (const extent of extents) {
      if (parent.error !== '') break;
      const sub = this.takePieces(parent, cursor, extent.length);
      if (extent.kind === 'data') {
        sub.fd = extent.fd;
        sub.offset = extent.hostOffset;
        sub.type = BlkRequestType.IN;
        this.enqueue(sub);
      } else if (extent.kind === 'zero') {
        this.landInGuest(parent, sub, null);
      } else {
        if (this.compressedBuffer.length < extent.length) this.compressedBuffer = new Uint8Array(extent.length);
        const bytes = this.compressedBuffer.subarray(0, extent.length);
        try {
          this.handle.readCompressed(extent, bytes);
        } catch (error) {
          this.fail(parent, (error as Error).message);
          break;
        }
        this.landInGuest(parent, sub, bytes);
      }
    }
    this.pushQueued();
    this.subDone(parent);
  }

  /**
   * Where this executor writes guest bytes of a read itself (zero extents, inflated compressed clusters;
   * data extents land through the engine's READV). `bytes` null: zeroes.
   */
  private landInGuest(parent: Parent, sub: Sub, bytes: Uint8Array | null): void {
    let at = 0;
    for (let i = 0; i < sub.segGpa.length; i++) {
      const gpa = sub.segGpa[i] ?? 0;
      const len = sub.segLen[i] ?? 0;
      const ok = bytes === null ? parent.memory.fill(gpa, len) : parent.memory.write(gpa, bytes.subarray(at, at + len));
      if (!ok) {
        this.fail(parent, 'read buffer left guest memory');
        return;
      }
      at += len;
    }
  }

  // --- writes --------------------------------------------------------------------------------------

  /** False on RETRY (the caller defers the request). */
  private startWrite(parent: Parent): boolean {
    const extents = this.writeExtents;
    extents.length = 0;
    let ticket: number;
    try {
      ticket = this.handle.prepareWrite(parent.offset, parent.dataBytes, extents);
    } catch (error) {
      this.complete(parent, BlkStatus.IOERR, (error as Error).message);
      return true;
    }
    if (ticket === RETRY) return false;
    parent.ticket = ticket;
    parent.pending = 1;
    const cursor = { seg: 0, skip: 0 };
    for (const extent of extents) {
      const sub = this.takePieces(parent, cursor, extent.length);
      sub.fd = extent.fd;
      sub.offset = extent.hostOffset;
      sub.type = BlkRequestType.OUT;
      this.enqueue(sub);
    }
    this.pushQueued();
    this.subDone(parent);
    return true;
  }

  /** All data of a write landed (or failed): commit or abort, then complete. */
  private finishWrite(parent: Parent): void {
    const ticket = parent.ticket;
    parent.ticket = 0;
    if (parent.error !== '') {
      try {
        if (ticket > 0) this.handle.abortWrite(ticket);
      } catch (error) {
        parent.error += `; abort: ${(error as Error).message}`;
      }
      this.complete(parent, BlkStatus.IOERR, parent.error);
      return;
    }
    try {
      if (ticket > 0) this.handle.commitWrite(ticket);
      if (parent.writeThrough) this.handle.flush();
    } catch (error) {
      this.complete(parent, BlkStatus.IOERR, (error as Error).message);
      return;
    }
    this.complete(parent, BlkStatus.OK, '');
  }

  // --- flush, discard, write zeroes, get id ----------------------------------------------------------

  private flush(parent: Parent): void {
    if (this.options.ignoreFlush) {
      this.complete(parent, BlkStatus.OK, '');
      return;
    }
    try {
      this.handle.flush();
    } catch (error) {
      this.complete(parent, BlkStatus.IOERR, (error as Error).message);
      return;
    }
    this.complete(parent, BlkStatus.OK, '');
  }

  /** False on RETRY; every range is applied again on the retry (idempotent). */
  private startRanges(parent: Parent): boolean {
    const discard = parent.type === BlkRequestType.DISCARD;
    try {
      for (const range of parent.ranges ?? []) {
        if (range.length === 0) continue;
        const result = discard
          ? this.handle.discard(range.offset, range.length)
          : this.handle.writeZeroes(range.offset, range.length, range.unmap);
        if (result === RETRY) return false;
      }
      if (parent.writeThrough && !discard) this.handle.flush();
    } catch (error) {
      this.complete(parent, BlkStatus.IOERR, (error as Error).message);
      return true;
    }
    this.complete(parent, BlkStatus.OK, '');
    return true;
  }

  private getId(parent: Parent): void {
    const length = Math.min(BLK_ID_BYTES, parent.dataBytes);
    let done = 0;
    for (let s = 0; s < parent.segGpa.length && done < length; s++) {
      const take = Math.min(parent.segLen[s] ?? 0, length - done);
      parent.memory.write(parent.segGpa[s] ?? 0, this.limits.serial.subarray(done, done + take));
      done += take;
    }
    this.complete(parent, BlkStatus.OK, '', done);
  }

  private retryDeferred(): void {
    if (this.deferred.length === 0) return;
    const waiting = this.deferred;
    this.deferred = [];
    for (const parent of waiting) {
      const started = parent.type === BlkRequestType.OUT ? this.startWrite(parent) : this.startRanges(parent);
      if (!started) this.deferred.push(parent);
    }
  }

  // --- sub-requests ----------------------------------------------------------------------------------

  /** The next `length` bytes of the parent's guest buffers, as a sub-request (fd/offset/type set by the caller). */
  private takePieces(parent: Parent, cursor: { seg: number; skip: number }, length: number): Sub {
    const sub: Sub = { parent, fd: -1, type: 0, offset: 0, segGpa: [], segLen: [], length };
    let left = length;
    while (left > 0 && cursor.seg < parent.segGpa.length) {
      const segLen = parent.segLen[cursor.seg] ?? 0;
      const take = Math.min(segLen - cursor.skip, left);
      sub.segGpa.push((parent.segGpa[cursor.seg] ?? 0) + cursor.skip);
      sub.segLen.push(take);
      left -= take;
      cursor.skip += take;
      if (cursor.skip >= segLen) {
        cursor.seg++;
        cursor.skip = 0;
      }
    }
    return sub;
  }

  private enqueue(sub: Sub): void {
    sub.parent.pending++;
    this.queued.push(sub);
  }

  /** Submits queued sub-requests in order while their engines have room. */
  private pushQueued(): void {
    let n = 0;
    while (n < this.queued.length) {
      const sub = this.queued[n] as Sub;
      if (sub.parent.error !== '') {
        n++;
        this.subDone(sub.parent);
        continue;
      }
      let inner: RequestExecutor;
      try {
        inner = this.innerFor(sub.fd);
      } catch (error) {
        n++;
        this.fail(sub.parent, `cannot open an engine for a backing file: ${(error as Error).message}`);
        this.subDone(sub.parent);
        continue;
      }
      const request = this.fillScratch(sub);
      if (!inner.canAccept(request)) break;
      n++;
      const id = this.freeSubs.pop() ?? this.subs.length;
      this.subs[id] = sub;
      inner.submit(sub.parent.memory, request, id, Number.MAX_SAFE_INTEGER, true);
    }
    if (n > 0) this.queued.splice(0, n);
  }

  private fillScratch(sub: Sub): BlkRequest {
    const r = this.scratch;
    r.type = sub.type;
    r.sector = sub.offset / SECTOR_SIZE;
    r.statusGpa = 0;
    r.segCount = 0;
    r.dataBytes = 0;
    for (let i = 0; i < sub.segGpa.length; i++) r.addSegment(sub.segGpa[i] ?? 0, sub.segLen[i] ?? 0);
    return r;
  }

  private innerFor(layerFd: number): RequestExecutor {
    const existing = this.inners.get(layerFd);
    if (existing !== undefined) return existing;
    const inner = this.options.makeInner(this.options.hostFd(layerFd));
    inner.onComplete = (c) => this.innerComplete(c);
    this.inners.set(layerFd, inner);
    if (this.poll !== undefined && this.poll !== null && inner.completionFd >= 0) this.poll.add(inner.completionFd, true);
    return inner;
  }

  private innerComplete(c: Completion): void {
    if (c.head >= FAST_HEAD) {
      // A fast-path read: the engine's completion is the guest's, with its own head back.
      c.head -= FAST_HEAD;
      this.deliver(c);
      return;
    }
    const sub = this.subs[c.head];
    if (sub === null || sub === undefined) return;
    this.subs[c.head] = null;
    this.freeSubs.push(c.head);
    if (c.status !== BlkStatus.OK) this.fail(sub.parent, c.error || `status ${c.status}`);
    this.subDone(sub.parent);
  }

  private fail(parent: Parent, error: string): void {
    if (parent.error === '') parent.error = error;
  }

  private subDone(parent: Parent): void {
    parent.pending--;
    if (parent.pending > 0) return;
    if (parent.type === BlkRequestType.OUT) {
      this.finishWrite(parent);
      return;
    }
    if (parent.error !== '') this.complete(parent, BlkStatus.IOERR, parent.error);
    else this.complete(parent, BlkStatus.OK, '');
  }

  private complete(parent: Parent, status: number, error: string, written?: number): void {
    const c = this.completion;
    c.head = parent.head;
    c.statusGpa = parent.statusGpa;
    c.type = parent.type;
    c.status = status;
    c.dataBytes = parent.dataBytes;
    c.written = written ?? (status === BlkStatus.OK && parent.type === BlkRequestType.IN ? parent.dataBytes : 0);
    c.latencyNanos = (performance.now() - parent.started) * 1e6;
    c.error = error;
    this.deliver(c);
  }

  /** Hands a finished request to the ring (held while a sibling pumps this executor). */
  private deliver(c: Completion): void {
    if (this.holding) {
      this.held.push({ ...c });
      return;
    }
    this.active--;
    this.onComplete(c);
  }
}

/**
 * A Qcow2Executor for one ring on this worker: attaches the image's shared state (its own fds over the
 * shared metadata), serves the top image's extents through `imageFd` (opened by the disk with the cache
 * mode's flags) and, with O_DIRECT, backing files through O_DIRECT fds of their own.
 */
export function createQcow2Executor(
  description: LayerDescription,
  imageFd: number,
  limits: DeviceLimits,
  direct: boolean,
  ignoreFlush: boolean,
  makeRaw: (fd: number) => RequestExecutor,
): Qcow2Executor {
  const layer = attachLayer(description);
  if (!(layer instanceof Qcow2Handle)) {
    layer.close();
    throw new Error('a raw image is served by the raw engine, not the qcow2 executor');
  }
  const opened: number[] = [];
  const hostFd = (layerFd: number): number => {
    if (layerFd === layer.fd) return imageFd;
    if (!direct) return layerFd;
    const fd = openFlags(`/proc/self/fd/${layerFd}`, O_RDONLY | O_DIRECT | O_CLOEXEC);
    opened.push(fd);
    return fd;
  };
  try {
    const executor = new Qcow2Executor(layer, limits, {
      hostFd,
      makeInner: makeRaw,
      ignoreFlush,
      onClose: () => opened.forEach((fd) => sys.close(fd)),
    });
    return executor;
  } catch (error) {
    layer.close();
    for (const fd of opened) sys.close(fd);
    throw error;
  }
}
