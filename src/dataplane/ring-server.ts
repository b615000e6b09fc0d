/**
 * Everything one virtqueue needs on its worker thread: its counters, back-end (request executor), throttle
 * handle, request scratch, retry timer, and — while started — its ring and drain context. A pool worker runs
 * one RingServer per ring it serves (of any disk); they share the thread's epoll set, each uses its own disk
 * context and its session's guest memory table.
 *
 * What the worker gives a RingServer: an EpollSet (the server registers its kick fd and completion fd
 * edge-triggered, and its timer fd), the guest memory on start / memoryChanged, and every ready fd through
 * `dispatch(fd)` (true when the fd was this ring's). With polling on, the worker calls `poll()` between waits.
 *
 * Requests stay in flight across wake-ups. Each occupies a back-end slot from submission to completion
 * with its descriptor head and submission sequence (UringExecutor slotHead / slotSeq) — the stable slot
 * inflight tracking (INFLIGHT_SHMFD) mirrors. `stop()` stops popping and waits, bounded, for everything in
 * flight to complete and be published before it reports last_avail_idx, so the index is exact.
 */
import { signalEventFd } from '../sys/eventfd.js';
import type { EpollSet } from './epoll.js';
import { RetryTimer } from './retry-timer.js';
import type { GuestMemory } from './guest-memory.js';
import { SplitQueue, RingMappingError } from './split-queue.js';
import { descriptorTableBytes, availRingBytes, usedRingBytes } from '../../protocol/split-ring.js';
import { Counter, QueueCounters } from './counters.js';
import { SyncExecutor } from './sync-executor.js';
import { UringExecutor } from './uring-executor.js';
import { NetworkExecutor } from './network-executor.js';
import { BACKEND_EVENTS } from './backend-channel.js';
import { cachePolicy, type EngineOptions, type IoEngineName, type RequestExecutor } from './request-executor.js';
import { engineOptions } from './raw-image.js';
import { createQcow2Executor } from './qcow2-executor.js';
import {
  completeRequest,
  createRequestScratch,
  drainQueue,
  unlimited,
  type Admission,
  type DrainContext,
  type PoisonCause,
} from './drain.js';
import { DiskThrottle } from '../throttle/disk-throttle.js';
import { DirtyLog, RingDirtyLog } from './dirty-log.js';
import type { DiskContext, DiskSettings, RingEvent, RingStart } from './worker-protocol.js';
import { InflightQueue, InflightRegionError } from './inflight-queue.js';

/** Kick-less (polling-mode) rings are drained on this tick. */
const POLL_TICK_NANOS = 1_000_000;
/** How long a ring stop or memory change waits for requests in flight. */
export const QUIESCE_TIMEOUT_MS = 5_000;

export class RingServer {
  readonly timer = new RetryTimer();
  private readonly counters: QueueCounters;
  private readonly executor: RequestExecutor;
  private readonly admission: Admission;
  private readonly scratch;
  private readonly request;
  private ring: RingStart | null = null;
  private context: DrainContext | null = null;
  /**
   * Requests the last quiesce had to leave in flight: the back-end did not answer within QUIESCE_TIMEOUT_MS
   * (a stalled cluster). They may still read or write the guest memory they point into, so the session must
   * not unmap it (it holds it: MappedRegion.held in control/memory-table.ts).
   */
  leftInFlight = 0;
  /** Inflight tracking, taken over at the first start (a memory change restarts without resuming again). */
  private inflight: InflightQueue | null = null;
  /** The session's migration dirty log (DirtyLog.off unless the front-end set VHOST_F_LOG_ALL). */
  private log: DirtyLog = DirtyLog.off;
  private ringLog: RingDirtyLog | null = null;

  constructor(
    readonly queue: number,
    private readonly init: DiskContext,
    private readonly epoll: EpollSet,
    private readonly post: (message: RingEvent) => void,
    private settings: DiskSettings,
  ) {
    this.counters = new QueueCounters(init.counters, queue);
    this.executor = this.createExecutor();
    // A completion after the ring stopped (a stop that timed out) has nowhere to go: counted, not published.
    this.executor.onComplete = (completion) => {
      if (this.context !== null) completeRequest(this.context, completion);
      else this.counters.add(Counter.ioErrors);
    };
    if (this.executor.completionFd >= 0) epoll.add(this.executor.completionFd, this.executor.completionLevelTriggered !== true);
    this.admission = init.throttle ? DiskThrottle.attach(init.throttle) : unlimited;
    ({ scratch: this.scratch, request: this.request } = createRequestScratch(init.limits));
    epoll.add(this.timer.fd);
  }

  /** The kick fd currently watched for this ring, or -1. */
  get kickFd(): number {
    return this.context !== null ? (this.ring?.kickFd ?? -1) : -1;
  }

  /** `auto` tries io_uring and falls back to the sync engine; an explicit `io_uring` that fails is fatal. */
  private createExecutor(): RequestExecutor {
    const setting = this.init.ioEngine ?? 'auto';
    let engine: IoEngineName = 'sync';
    let reason = 'sync engine requested';
    let executor: RequestExecutor | null = null;
    const options: EngineOptions = { ...engineOptions(this.init.image), onBounce: () => this.counters.add(Counter.bounced) };
    if (this.init.network !== undefined) {
      // NBD / RBD: the disk's transport on this worker, shared by its queues here (network-executor.ts).
      const network = new NetworkExecutor(this.init.network, this.init.limits, {
        ignoreFlush: options.ignoreFlush === true,
        mergeMaxBytes: this.init.network.mergeMaxBytes,
        onMerged: () => this.counters.add(Counter.merged),
        onHealthChange: (reason) => this.post({ type: 'event', kind: 'backend', queue: this.queue, reason }),
        onConnectionsDown: (count) => this.counters.setGauge(Counter.backendConnectionsDown, count),
        onBackendEvents: (deltas) => {
          for (let i = 0; i < BACKEND_EVENTS; i++) if (deltas[i]! > 0) this.counters.add(Counter.backendConnects + i, deltas[i]);
        },
      });
      this.post({ type: 'event', kind: 'started', queue: this.queue, reason: `${this.init.network.kind} back-end` });
      return network;
    }
    // qcow2: one mapping layer over raw engines (one per host file), whichever engine it is.
    const qcow2 = this.init.qcow2;
    const wrap = (makeRaw: (fd: number) => RequestExecutor): RequestExecutor => {
      if (qcow2 === undefined) return makeRaw(this.init.imageFd);
      const policy = cachePolicy(this.init.image?.cache ?? 'writeback');
      return createQcow2Executor(qcow2, this.init.imageFd, this.init.limits, policy.direct, policy.ignoreFlush, makeRaw);
    };
    if (setting !== 'sync') {
      try {
        executor = wrap((fd) => new UringExecutor(fd, this.init.limits, options));
        engine = 'io_uring';
        reason = `io_uring (${setting === 'auto' ? 'auto' : 'requested'})`;
      } catch (error) {
        const detail = error instanceof Error ? error.message : String(error);
        if (setting === 'io_uring') {
          this.post({ type: 'event', kind: 'error', queue: this.queue, reason: `io_uring requested but unavailable: ${detail}` });
          throw new Error(`queue ${this.queue}: io_uring requested but unavailable: ${detail}`);
        }
        reason = `io_uring unavailable, using sync: ${detail}`;
      }
    }
    this.post({ type: 'event', kind: 'started', queue: this.queue, reason, ioEngine: engine });
    return executor ?? wrap((fd) => new SyncExecutor(fd, this.init.limits, options));
  }

  /** Adaptive polling asked for by the disk (µs, 0 = off). */
  get pollUs(): number {
    return this.init.pollUs ?? 0;
  }

  /** Handles a ready fd if it is this ring's (kick, completion, timer); false otherwise. */
  dispatch(fd: number): boolean {
    if (fd === this.kickFd || fd === this.executor.completionFd) {
      // Edge-triggered: the counters are never read back (2^64 events to saturate).
      if (fd === this.executor.completionFd) this.executor.completionReady?.();
      this.wake();
      return true;
    }
    if (fd === this.timer.fd) {
      this.onTimer();
      return true;
    }
    return false;
  }

  /**
   * Work a wake-up is owed for: requests in flight (a poisoned ring's too), or (while serving) requests in
   * the avail ring. A stopped ring owes nothing.
   */
  get busy(): boolean {
    const ctx = this.context;
    if (ctx === null) return false;
    // A poisoned ring still publishes what it had in flight (the driver may wait for it before resetting).
    if (this.executor.inFlight > 0) return true;
    return !ctx.poisoned && ctx.accepting && ctx.queue.pending() !== 0;
  }

  /** The worker's watchdog fired with this ring busy: drain, and count it (a wake-up was owed). */
  watchdog(): void {
    if (!this.busy) return;
    this.counters.add(Counter.watchdogDrains);
    this.executor.completionReady?.(); // a wake-up was lost: do not trust what the executor last saw either
    this.drain();
  }

  /**
   * Adaptive polling: drains when the avail ring has entries or requests are in flight. Returns whether
   * anything moved (popped or published), so the worker knows to keep spinning.
   */
  poll(): boolean {
    const ctx = this.context;
    if (ctx === null) return false;
    if (ctx.queue.pending() === 0 && this.executor.inFlight === 0) return false;
    const avail = ctx.queue.lastAvailIdx;
    const used = ctx.queue.usedIdx;
    this.drain();
    return ctx.queue.lastAvailIdx !== avail || ctx.queue.usedIdx !== used;
  }

  /** A kick or a completion. With the ring stopped, completions are still taken off the back-end. */
  private wake(): void {
    if (this.context === null) this.executor.reap();
    else this.drain();
  }

  /** A kick or a timer expiry: drain, and arm the retry timer if the throttle stalled us. */
  drain(): void {
    const ctx = this.context;
    if (ctx === null) return;
    const wait = drainQueue(ctx);
    // A polling-mode ring (no kick fd) must keep its periodic tick after a throttle retry.
    if (wait > 0) this.timer.arm(Math.min(wait, 1e9), this.ring !== null && this.ring.kickFd < 0 ? POLL_TICK_NANOS : 0);
  }

  onTimer(): void {
    this.timer.acknowledge();
    this.drain();
  }

  /**
   * Re-resolves a started ring against a new memory table, continuing where it stopped. A poisoned ring
   * stays poisoned (only a ring restart clears it) and touches no guest memory, so it is left alone.
   */
  memoryChanged(memory: GuestMemory): void {
    if (this.ring === null) return;
    if (this.poisoned) {
      // Nothing more is popped, but requests popped before the poison may still point into the old mapping.
      this.leftInFlight = this.executor.waitIdle(QUIESCE_TIMEOUT_MS) ? 0 : this.executor.inFlight;
      return;
    }
    // Requests in flight point into the old mapping: let them finish (and publish) first.
    const lastAvailIdx = this.quiesce() ?? this.ring.lastAvailIdx;
    this.start(this.ring, lastAvailIdx, memory);
  }

  /**
   * Stops popping and waits (bounded) for everything in flight to complete and be published, then tells
   * the driver. Returns the next avail index to consume, or undefined without a drain context.
   */
  private quiesce(): number | undefined {
    const ctx = this.context;
    if (ctx === null) return undefined;
    ctx.accepting = false;
    const usedBefore = ctx.queue.usedIdx;
    this.leftInFlight = 0;
    if (!this.executor.waitIdle(QUIESCE_TIMEOUT_MS)) {
      this.leftInFlight = this.executor.inFlight;
      this.post({
        type: 'event',
        kind: 'error',
        queue: this.queue,
        reason: `${this.executor.inFlight} requests still in flight after ${QUIESCE_TIMEOUT_MS} ms; the ring stops without them`,
      });
    }
    if (!ctx.poisoned && ctx.queue.shouldInterrupt(usedBefore)) {
      ctx.counters.add(Counter.notifications);
      ctx.counters.flush();
      ctx.interrupt();
    }
    ctx.counters.flush();
    return ctx.queue.lastAvailIdx;
  }

  /** Poisoned since the last (re)start: by the drain, or because the ring could not be mapped at all. */
  private get poisoned(): boolean {
    return this.context === null ? this.ring !== null : this.context.poisoned;
  }

  applySettings(capacityBytes: number, writeback: boolean): void {
    this.settings = { capacityBytes, writeback };
    if (this.context !== null) {
      this.context.capacityBytes = capacityBytes;
      this.context.writeback = writeback;
    }
  }

  setCall(fd: number): void {
    if (this.ring === null) return;
    this.ring.callFd = fd;
    // A guest may have missed an interrupt while the old call fd was being replaced.
    if (fd >= 0) signalEventFd(fd);
  }

  /** Switches to a new version of the session's dirty log (logging on, off, or a replaced log region). */
  setDirtyLog(log: DirtyLog): void {
    this.log = log;
    if (this.ringLog !== null) this.ringLog.log = log;
  }

  setErr(fd: number): void {
    if (this.ring !== null) this.ring.errFd = fd;
  }

  /** Resolves ring memory and begins serving; an unusable ring poisons the queue instead of failing the session. */
  start(ring: RingStart, lastAvailIdx: number, memory: GuestMemory): void {
    if (this.context !== null && this.ring !== null && this.ring.kickFd >= 0) this.epoll.remove(this.ring.kickFd);
    this.ring = ring;
    this.context = null;
    const desc = memory.userToGuest(ring.descUserAddr, descriptorTableBytes(ring.size));
    const avail = memory.userToGuest(ring.availUserAddr, availRingBytes(ring.size));
    const used = memory.userToGuest(ring.usedUserAddr, usedRingBytes(ring.size));
    if (desc < 0 || avail < 0 || used < 0) {
      this.poisonedFromStart('ring addresses are not inside the memory table');
      return;
    }
    let queue: SplitQueue;
    try {
      queue = new SplitQueue(memory, { size: ring.size, descGpa: desc, availGpa: avail, usedGpa: used }, ring.eventIdx, lastAvailIdx);
    } catch (error) {
      if (error instanceof RingMappingError) {
        this.poisonedFromStart(error.message);
        return;
      }
      throw error;
    }
    this.counters.setGauge(Counter.poisoned, 0);
    if (this.inflight === null && ring.inflight !== undefined) queue.lastAvailIdx = this.takeOverInflight(ring, queue, lastAvailIdx);
    // Requests in flight keep their recorded ranges across a memory change (same ring size).
    if (this.ringLog === null || this.ringLog.queueSize !== ring.size) this.ringLog = new RingDirtyLog(ring.size, this.counters);
    this.ringLog.log = this.log;
    this.ringLog.usedLogGpa = ring.usedLogGpa;
    queue.dirtyLog = this.ringLog;
    this.context = {
      queue,
      memory,
      limits: this.init.limits,
      capacityBytes: this.settings.capacityBytes,
      writeback: this.settings.writeback,
      executor: this.executor,
      counters: this.counters,
      admission: this.admission,
      scratch: this.scratch,
      request: this.request,
      stalled: false,
      accepting: true,
      poisoned: false,
      inflight: this.inflight,
      onPoison: (cause, reason) => this.raisePoison(cause, reason),
      interrupt: () => {
        const fd = this.ring?.callFd ?? -1;
        if (fd >= 0) signalEventFd(fd);
      },
      dirtyLog: this.ringLog,
    };
    if (ring.kickFd >= 0) this.epoll.add(ring.kickFd, true);
    else this.timer.arm(POLL_TICK_NANOS, POLL_TICK_NANOS);
    // Requests may have been queued before the ring (re)started; their kick is long gone.
    this.drain();
  }

  /**
   * Inflight tracking at ring start: resumes what a previous back-end left in flight (resubmitted before any
   * new pop) and returns where popping continues. A region that fails validation is refused with an error
   * event and started afresh: the ring then runs from the front-end's base, still tracked.
   */
  private takeOverInflight(ring: RingStart, queue: SplitQueue, frontendBase: number): number {
    const mapping = ring.inflight!;
    let inflight: InflightQueue;
    try {
      inflight = new InflightQueue(mapping);
    } catch (error) {
      if (!(error instanceof InflightRegionError)) throw error;
      this.post({ type: 'event', kind: 'error', queue: this.queue, reason: `${error.message}; running without inflight tracking` });
      return frontendBase;
    }
    this.inflight = inflight;
    try {
      const resume = inflight.resume(queue.usedIdx, queue.size, frontendBase);
      if (resume.resubmit.length > 0 || resume.batchFixed > 0 || resume.lastAvailIdx !== (frontendBase & 0xffff)) {
        this.post({
          type: 'event',
          kind: 'inflight',
          queue: this.queue,
          reason: `${resume.resubmit.length} requests resubmitted, ${resume.batchFixed} completed before the crash; avail index ${resume.lastAvailIdx} (front-end said ${frontendBase & 0xffff})`,
        });
      }
      return resume.lastAvailIdx;
    } catch (error) {
      if (!(error instanceof InflightRegionError)) throw error;
      this.post({
        type: 'event',
        kind: 'error',
        queue: this.queue,
        reason: `${error.message}; tracking starts afresh at the front-end's base`,
      });
      inflight.reset(queue.usedIdx);
      return frontendBase;
    }
  }

  private poisonedFromStart(reason: string): void {
    this.counters.add(Counter.ioErrors);
    this.counters.setGauge(Counter.poisoned, 1);
    this.counters.flush();
    this.raisePoison('ring_structure', reason);
  }

  /** Stops serving and returns the next avail index to consume (what GET_VRING_BASE reports). */
  stop(): number | undefined {
    const ring = this.ring;
    if (ring === null) return undefined;
    const ctx = this.context;
    const lastAvailIdx = this.quiesce() ?? ring.lastAvailIdx;
    if (ctx !== null && ring.kickFd >= 0) this.epoll.remove(ring.kickFd);
    if (ctx?.stalled) this.counters.setGauge(Counter.throttlePending, 0);
    this.timer.disarm();
    this.timer.acknowledge();
    this.ring = null;
    this.context = null;
    this.counters.setGauge(Counter.poisoned, 0);
    return lastAvailIdx;
  }

  private raisePoison(cause: PoisonCause, reason: string): void {
    const errFd = this.ring?.errFd ?? -1;
    if (errFd >= 0) signalEventFd(errFd);
    this.post({ type: 'event', kind: 'poisoned', queue: this.queue, reason, cause });
  }

  close(): void {
    this.stop();
    if (this.executor.completionFd >= 0) this.epoll.remove(this.executor.completionFd);
    // The ring may next run on another worker: nothing counted here may stay unpublished.
    this.counters.flush();
    this.executor.close();
    this.timer.close();
  }
}
