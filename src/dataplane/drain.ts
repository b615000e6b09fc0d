/**
 * The drain bracket: everything one queue does per wake-up (a kick, a completion, a timer).
 *
 *   reap completions → gate (running, not poisoned) → suppress kicks → pop/validate/throttle/submit until
 *   empty or the back-end is full → hand the batch to the device, publish what completed → re-arm kicks and
 *   re-check (never strand a request) → one interrupt if the driver wants it.
 *
 * Requests stay in flight across drains; their completions are published by a later wake-up, in any order.
 * When the back-end has no room (in-flight limit, bounce buffers) the drain stops popping and leaves the
 * rest in the avail ring with kicks still suppressed: the completion that frees room wakes the queue again.
 * The drain never blocks on I/O.
 *
 * A broken avail index or descriptor table poisons the queue: nothing more is consumed and kicks are not
 * re-armed, so a hostile guest cannot make the worker spin; requests popped before the poison still
 * complete and are published. Only a ring restart clears it.
 */
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { ChainOutcome, ChainScratch, walkChain } from './descriptor-chain.js';
import { BlkRequest, Disposition, parseRequest } from './blk-request.js';
import { Counter, LatencyOp, type QueueCounters } from './counters.js';
import type { GuestMemory } from './guest-memory.js';
import type { SplitQueue } from './split-queue.js';
import type { DeviceLimits } from './device-limits.js';
import type { Completion, RequestExecutor } from './request-executor.js';
import type { InflightQueue } from './inflight-queue.js';
import type { RingDirtyLog } from './dirty-log.js';

/** Admission control: 0 = go (tokens taken), otherwise nanoseconds to wait (nothing taken). */
export interface Admission {
  admit(bytes: number): number;
}

export const unlimited: Admission = { admit: () => 0 };

export type PoisonCause = 'invalid_avail_idx' | 'ring_structure';

export interface DrainContext {
  queue: SplitQueue;
  memory: GuestMemory;
  limits: DeviceLimits;
  capacityBytes: number;
  writeback: boolean;
  executor: RequestExecutor;
  counters: QueueCounters;
  admission: Admission;
  scratch: ChainScratch;
  request: BlkRequest;
  /** Set once a stall has been counted, cleared when the stalled request is admitted. */
  stalled: boolean;
  /** False while the ring is stopping: completions are still published, nothing more is popped. */
  accepting: boolean;
  poisoned: boolean;
  /** Inflight tracking (INFLIGHT_SHMFD), or null when the front-end gave no region. */
  inflight?: InflightQueue | null;
  onPoison(cause: PoisonCause, reason: string): void;
  /** Raises the guest interrupt (call eventfd). */
  interrupt(): void;
  /** Live migration: marks guest pages the device writes (data, status, used ring). Absent in unit tests. */
  dirtyLog?: RingDirtyLog;
  /** The drain's bookkeeping, made on the first drain and reused (a drain runs per wake-up: no garbage). */
  notify?: NotifyState;
}

export function createRequestScratch(limits: DeviceLimits): { scratch: ChainScratch; request: BlkRequest } {
  return { scratch: new ChainScratch(limits.segMax + 2), request: new BlkRequest(limits.segMax + 2) };
}

/**
 * A long drain hands what it prepared to the device and publishes completions as it goes, after every quarter
 * of what was waiting when the round began (at least MIN_COMPLETION_BATCH requests), so the driver can refill
 * the ring while the rest is served: stop-and-go at depth becomes a pipeline (the gain is measured in
 * docs/benchmarks.md).
 */
export const MIN_COMPLETION_BATCH = 4;

/**
 * Mid-drain interrupts coalesce to half the driver's window: the driver is told (when it asked to be) once
 * the completions it has not heard of are at least as many as the requests still on the device's side (in
 * the avail ring or in flight), or when fewer than this many are left there. Why: an interrupt mostly wakes
 * a sleeping driver on another CPU, which costs the device thread more than serving a 4 KiB page-cached read
 * (an eventfd write with a cross-CPU wake-up, ~4 µs on a virtual machine; 19 % of the worker at QD32 when it
 * came every 8 requests). Telling it at half the window still leaves the device half a window of work while
 * the driver refills, so the pipeline never runs dry. A shallow window (fewer than this left) is told at
 * once: there a late interrupt would idle the device. The end of a drain always tells (completeAndNotify).
 */
export const COALESCE_MIN_REMAINING = 8;

/** Where the last interrupt decision was taken, within one drain. */
export interface NotifyState {
  notifiedUsed: number;
  sinceCheck: number;
  batch: number;
  /** The device refused a submission with nothing in flight (retry on a timer). */
  submitRefused: boolean;
  /** Requests in flight when the drain stopped popping for lack of room; -1 when it did not. */
  blockedInFlight: number;
}

function submitAndReap(ctx: DrainContext, notify: NotifyState): void {
  if (!ctx.executor.submitPending()) notify.submitRefused = true;
  ctx.executor.reap();
}

/** The device refused a submission with nothing in flight to wake us: retry after this long. */
export const SUBMIT_RETRY_NANOS = 1_000_000;
/** serveRequest: the back-end has no room; the chain was put back. */
const BLOCKED = -1;

/** A drain that stopped for lack of room goes round again at most this often before leaving it to a timer. */
const MAX_DRAIN_ROUNDS = 8;

/** Runs one drain. Returns 0 when there is nothing to retry, or the nanoseconds to wait before retrying a stall. */
export function drainQueue(ctx: DrainContext): number {
  // Not re-entered for one ring (a drain never starts another), so the state can be the ring's own.
  const notify = (ctx.notify ??= { notifiedUsed: 0, sinceCheck: 0, batch: 0, submitRefused: false, blockedInFlight: -1 });
  notify.notifiedUsed = ctx.queue.usedIdx;
  notify.sinceCheck = 0;
  notify.batch = MIN_COMPLETION_BATCH;
  notify.submitRefused = false;
  notify.blockedInFlight = -1;
  let wait = 0;
  for (let round = 0; ; round++) {
    notify.blockedInFlight = -1;
    try {
      ctx.executor.reap();
      if (!ctx.poisoned && ctx.accepting) wait = drainUntilEmpty(ctx, notify);
    } finally {
      ctx.counters.add(Counter.drains);
      completeAndNotify(ctx, notify);
    }
    // Stopped for lack of room, kicks suppressed, waiting for a completion to wake the queue: if the final
    // submit above completed requests itself (an engine that finishes some synchronously), that completion
    // wakes nobody, so go round again rather than strand the requests left in the avail ring.
    if (notify.blockedInFlight < 0 || wait > 0) break;
    if (ctx.executor.inFlight === 0 && notify.blockedInFlight === 0) {
      // Refused with nothing in flight to wake us: retry on the timer.
      wait = SUBMIT_RETRY_NANOS;
      break;
    }
    if (ctx.executor.inFlight >= notify.blockedInFlight) break;
    if (round + 1 >= MAX_DRAIN_ROUNDS) {
      wait = SUBMIT_RETRY_NANOS;
      break;
    }
  }
  if (notify.submitRefused) wait = wait > 0 ? Math.min(wait, SUBMIT_RETRY_NANOS) : SUBMIT_RETRY_NANOS;
  return wait;
}

/**
 * Hands what was prepared to the device and publishes whatever has completed, then interrupts the driver if
 * it wants to hear about what was published since the last interrupt. Counters are published before the
 * guest is told, so anyone who saw a completion sees it counted.
 */
function completeAndNotify(ctx: DrainContext, notify: NotifyState, midDrain = false): void {
  submitAndReap(ctx, notify);
  notify.sinceCheck = 0;
  if (midDrain) {
    // Deferring is safe: notifiedUsed stays put, so the next decision still sees the driver's used_event.
    const untold = (ctx.queue.usedIdx - notify.notifiedUsed) & 0xffff;
    const remaining = ctx.queue.pending() + ctx.executor.inFlight;
    if (untold < remaining && remaining >= COALESCE_MIN_REMAINING) return;
  }
  const interrupt = ctx.queue.shouldInterrupt(notify.notifiedUsed);
  if (interrupt) ctx.counters.add(Counter.notifications);
  ctx.counters.flush();
  if (interrupt) {
    notify.notifiedUsed = ctx.queue.usedIdx;
    ctx.interrupt();
  }
}

function drainUntilEmpty(ctx: DrainContext, notify: NotifyState): number {
  const { queue, counters } = ctx;
  for (;;) {
    queue.suppressKicks();
    notify.batch = Math.max(MIN_COMPLETION_BATCH, queue.pending() >> 2);
    let blocked = false;
    for (;;) {
      // Requests a previous back-end left in flight go first, oldest first (inflight tracking).
      const inflight = ctx.inflight ?? null;
      const resubmit = inflight !== null && inflight.resubmitsLeft > 0;
      let head: number;
      if (resubmit) {
        head = inflight.takeResubmit();
      } else {
        const pending = queue.pending();
        if (pending === 0) break;
        if (pending > queue.size) {
          counters.add(Counter.invalidAvailIdx);
          poison(ctx, 'invalid_avail_idx', `avail.idx is ${pending} entries ahead of the device, more than the queue size ${queue.size}`);
          return 0;
        }
        head = queue.popHead();
        // Marked before anything else: a popped entry is either in the used ring or marked (dropped ones too).
        inflight?.popped(head);
      }
      const outcome = walkChain(ctx.memory, queue.descView, queue.descBase, queue.size, head, ctx.scratch);
      if (outcome === ChainOutcome.Poison) {
        counters.add(Counter.ioErrors);
        poison(ctx, 'ring_structure', ctx.scratch.reason);
        return 0;
      }
      if (outcome === ChainOutcome.Drop) {
        counters.add(Counter.ioErrors);
        continue;
      }
      const wait = serveRequest(ctx, head, resubmit);
      if (wait === BLOCKED) {
        blocked = true;
        break;
      }
      if (wait > 0) return wait;
      if (++notify.sinceCheck >= notify.batch) completeAndNotify(ctx, notify, true);
    }
    // Publish what completed before re-arming, so the driver sees its completions before it is asked to kick.
    const inFlight = ctx.executor.inFlight;
    submitAndReap(ctx, notify);
    if (blocked) {
      // Still full: the next completion wakes this queue (kicks stay suppressed meanwhile).
      if (ctx.executor.inFlight >= inFlight) {
        notify.blockedInFlight = ctx.executor.inFlight;
        return 0;
      }
      continue;
    }
    if (!queue.rearmKicks()) return 0;
  }
}

/**
 * Validates, admits and submits (or answers) one chain. Returns a stall wait or BLOCKED (the chain was put
 * back in either case), or 0.
 */
function serveRequest(ctx: DrainContext, head: number, resubmit = false): number {
  const { request, counters } = ctx;
  const disposition = parseRequest(ctx.memory, ctx.scratch, ctx.limits, ctx.capacityBytes, request);
  if (disposition === Disposition.Drop) {
    counters.add(Counter.ioErrors);
    return 0;
  }
  if (disposition === Disposition.Complete) {
    if (request.status === BlkStatus.IOERR) counters.add(Counter.ioErrors);
    else if (request.status === BlkStatus.UNSUPP) counters.add(Counter.unsupported);
    else if (request.type === BlkRequestType.FLUSH) counters.add(Counter.flushes);
    publish(ctx, head, request.status, 0);
    return 0;
  }

  if (!ctx.executor.canAccept(request)) {
    putBack(ctx, head, resubmit);
    return BLOCKED;
  }
  const wait = ctx.admission.admit(request.dataBytes);
  if (wait > 0) {
    putBack(ctx, head, resubmit);
    if (!ctx.stalled) {
      ctx.stalled = true;
      counters.add(Counter.throttled);
      counters.setGauge(Counter.throttlePending, 1);
    }
    return wait;
  }
  if (ctx.stalled) {
    ctx.stalled = false;
    counters.setGauge(Counter.throttlePending, 0);
  }

  // Data lands in guest buffers at completion: remember where, so it can be marked then.
  if (writesGuestBuffers(request.type)) ctx.dirtyLog?.recordWrites(head, request);
  ctx.executor.submit(ctx.memory, request, head, ctx.capacityBytes, ctx.writeback);
  return 0;
}

/** The chain waits for room or tokens: back into the avail ring, or back to the head of the resubmit list. */
function putBack(ctx: DrainContext, head: number, resubmit: boolean): void {
  if (resubmit) {
    ctx.inflight?.untakeResubmit();
    return;
  }
  ctx.queue.unpop();
  ctx.inflight?.unpopped(head);
}

/** Counts and publishes one finished request (called by the executor, possibly in a later wake-up). */
export function completeRequest(ctx: DrainContext, c: Completion): void {
  const counters = ctx.counters;
  counters.observeLatency(latencyOp(c.type), c.latencyNanos);
  if (c.status === BlkStatus.OK) countSuccess(counters, c.type, c.dataBytes);
  else if (c.status === BlkStatus.UNSUPP) counters.add(Counter.unsupported);
  else counters.add(Counter.ioErrors);
  // Also after a poison: the request was popped before it, and the sync engine would have published it.
  // The data is in guest memory now (whatever the status): mark it before the request is published.
  if (writesGuestBuffers(c.type)) ctx.dirtyLog?.markWrites(c.head);
  publishAt(ctx, c.head, c.statusGpa, c.status, c.status === BlkStatus.OK ? c.written : 0);
}

function writesGuestBuffers(type: number): boolean {
  return type === BlkRequestType.IN || type === BlkRequestType.GET_ID;
}

function latencyOp(type: number): number {
  if (type === BlkRequestType.IN) return LatencyOp.read;
  if (type === BlkRequestType.OUT) return LatencyOp.write;
  if (type === BlkRequestType.FLUSH) return LatencyOp.flush;
  return LatencyOp.other;
}

function countSuccess(counters: QueueCounters, type: number, dataBytes: number): void {
  switch (type) {
    case BlkRequestType.IN:
      counters.add(Counter.reads);
      counters.add(Counter.bytesRead, dataBytes);
      break;
    case BlkRequestType.OUT:
      counters.add(Counter.writes);
      counters.add(Counter.bytesWritten, dataBytes);
      break;
    case BlkRequestType.FLUSH:
      counters.add(Counter.flushes);
      break;
    case BlkRequestType.GET_ID:
      counters.add(Counter.getIds);
      break;
    case BlkRequestType.DISCARD:
      counters.add(Counter.discards);
      break;
    case BlkRequestType.WRITE_ZEROES:
      counters.add(Counter.writeZeroes);
      break;
  }
}

/** Status byte first; the used element only if the status byte landed, or the guest would read a stale one. */
function publish(ctx: DrainContext, head: number, status: number, written: number): void {
  publishAt(ctx, head, ctx.request.statusGpa, status, written);
}

function publishAt(ctx: DrainContext, head: number, statusGpa: number, status: number, written: number): void {
  if (!ctx.memory.writeU8(statusGpa, status)) {
    ctx.counters.add(Counter.ioErrors);
    return;
  }
  ctx.dirtyLog?.markByte(statusGpa);
  // Two-phase put (inflight tracking): a crash between the used ring and the clear is repaired on resume.
  ctx.inflight?.beforeUsed(head);
  ctx.queue.pushUsed(head, written + 1);
  ctx.inflight?.afterUsed(head, ctx.queue.usedIdx);
}

function poison(ctx: DrainContext, cause: PoisonCause, reason: string): void {
  ctx.poisoned = true;
  ctx.counters.setGauge(Counter.poisoned, 1);
  ctx.onPoison(cause, reason);
}
