/**
 * The load generator's event loop: one thread drives every queue of one vhost-user connection. It sleeps in
 * epoll_wait on the rings' call eventfds (edge-triggered, so an interrupt costs no read() to re-arm), and on
 * every wake-up, per queue: reaps all completions, refills the freed slots, publishes the batch with one
 * avail.idx store and at most one kick, then re-arms the interrupt (EVENT_IDX used_event) and re-checks.
 * Blocking is the point: nothing else runs in this process while it measures, so the generator costs one
 * epoll_wait and at most one eventfd write per queue and wake-up on top of the JS that builds requests.
 */
import { performance } from 'node:perf_hooks';
import { sys, addressOf, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLLIN } from '../../../src/sys/libc.js';
import { check, lastErrno, Errno, SyscallError } from '../../../src/sys/errors.js';
import { BlkRequestType, BlkStatus } from '../../../protocol/virtio-blk.js';
import { LatencyHistogram } from './latency-histogram.js';
import type { LoadQueue } from './load-queue.js';

const EPOLLET = 0x8000_0000;
const EPOLLRDHUP = 0x2000;
const EPOLLERR = 0x8;
const EPOLLHUP = 0x10;
/** struct epoll_event is packed on x86-64: le32 events, le64 data. */
const EVENT_SIZE = 12;
const HANGUP_TAG = 0xffff_ffff;

/** Chooses the next request of a queue. */
export interface RequestSource {
  /** Prepares the next request of `queue` in `slot` (queue.prepare); false when this queue has nothing more to submit. */
  next(queue: LoadQueue, slot: number): boolean;
}

export interface PhaseOptions {
  queues: readonly LoadQueue[];
  /** One per queue, same order. */
  sources: readonly RequestSource[];
  /** Runs for every completion (before the slot is reused), e.g. to check read data. */
  onComplete?: (queue: LoadQueue, slot: number, status: number) => void;
  /** Timed phase: stop submitting after rampMs + durationMs. Untimed: run until every source is exhausted. */
  durationMs?: number;
  /** Completions before this are not counted (warm-up). */
  rampMs?: number;
  /** No completion for this long while requests are in flight: fail. Default 10 s. */
  stallMs?: number;
  /** The vhost-user socket: a hang-up ends the phase with an error. */
  socketFd?: number;
}

export interface QueueStats {
  queue: number;
  requests: number;
  reads: number;
  writes: number;
  flushes: number;
  bytesRead: number;
  bytesWritten: number;
  latency: LatencyHistogram;
}

export interface RequestFailure {
  queue: number;
  type: number;
  offset: number;
  bytes: number;
  status: number;
}

export interface PhaseResult {
  /** The measured window (ms): durationMs for timed phases, start to last completion otherwise. */
  elapsedMs: number;
  queues: QueueStats[];
  /** CPU time of this process during the measured window (µs). */
  cpuUserMicros: number;
  cpuSystemMicros: number;
  wakeups: number;
  /** Reap passes that found at least one completion. */
  reapBatches: number;
  kicks: number;
  suppressedKicks: number;
  /** Every completion, warm-up and tail included. */
  allCompletions: number;
  failure: RequestFailure | null;
}

export class BackendStallError extends Error {
  constructor(detail: string) {
    super(detail);
    this.name = 'BackendStallError';
  }
}

export class BackendHangupError extends Error {
  constructor() {
    super('the back-end closed the vhost-user connection');
    this.name = 'BackendHangupError';
  }
}

function newStats(queue: number): QueueStats {
  return { queue, requests: 0, reads: 0, writes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0, latency: new LatencyHistogram() };
}

export function runPhase(options: PhaseOptions): PhaseResult {
  const { queues, sources } = options;
  if (sources.length !== queues.length) throw new RangeError('one request source per queue');
  const timed = options.durationMs !== undefined;
  const rampMs = options.rampMs ?? 0;
  const stallMs = options.stallMs ?? 10_000;
  const stats = queues.map((q) => newStats(q.index));
  const exhausted = queues.map(() => false);
  const onComplete = options.onComplete;

  const epfd = check(sys.epollCreate1(EPOLL_CLOEXEC), 'epoll_create1');
  const ctl = Buffer.alloc(EVENT_SIZE);
  const ctlAddress = addressOf(ctl);
  const maxEvents = queues.length + 1;
  const events = Buffer.alloc(EVENT_SIZE * maxEvents);
  const eventsAddress = addressOf(events);
  const register = (fd: number, mask: number, tag: number): void => {
    ctl.writeUInt32LE(mask >>> 0, 0);
    ctl.writeUInt32LE(tag >>> 0, 4);
    ctl.writeUInt32LE(0, 8);
    check(sys.epollCtl(epfd, EPOLL_CTL_ADD, fd, ctlAddress), 'epoll_ctl(ADD)', `fd ${fd}`);
  };

  let recording = false;
  let stopping = false;
  let nowMs = 0;
  let failure: RequestFailure | null = null;
  const kicksBefore = queues.reduce((sum, q) => sum + q.kicks, 0);
  const suppressedBefore = queues.reduce((sum, q) => sum + q.suppressedKicks, 0);
  let allCompletions = 0;

  const done = (queue: LoadQueue, slot: number, status: number): void => {
    allCompletions++;
    if (status !== BlkStatus.OK && failure === null) {
      failure = {
        queue: queue.index,
        type: queue.slotType[slot] as number,
        offset: queue.slotOffset[slot] as number,
        bytes: queue.slotBytes[slot] as number,
        status,
      };
      stopping = true;
    }
    if (onComplete !== undefined) onComplete(queue, slot, status);
    if (!recording) return;
    const s = stats[queue.index] as QueueStats;
    s.requests++;
    const type = queue.slotType[slot] as number;
    const bytes = queue.slotBytes[slot] as number;
    if (type === BlkRequestType.IN) {
      s.reads++;
      s.bytesRead += bytes;
    } else if (type === BlkRequestType.OUT) {
      s.writes++;
      s.bytesWritten += bytes;
    } else if (type === BlkRequestType.FLUSH) {
      s.flushes++;
    }
    s.latency.record(Math.round((nowMs - (queue.slotSubmitMs[slot] as number)) * 1e6));
  };

  const fill = (queue: LoadQueue, i: number): void => {
    if (stopping || exhausted[i]) return;
    const source = sources[i] as RequestSource;
    while (queue.free > 0) {
      const slot = queue.takeSlot();
      if (!source.next(queue, slot)) {
        queue.returnSlot(slot);
        exhausted[i] = true;
        return;
      }
      queue.enqueue(slot);
    }
  };

  let wakeups = 0;
  let reapBatches = 0;
  let cpuStart: NodeJS.CpuUsage | null = null;
  let cpuUsed: NodeJS.CpuUsage | null = null;
  const startMs = performance.now();
  const measureStartMs = startMs + rampMs;
  const deadlineMs = measureStartMs + (options.durationMs ?? 0);
  let lastCompletionMs = startMs;
  let lastProgressMs = startMs;
  try {
    for (const queue of queues) register(queue.callFd, EPOLLIN | EPOLLET, queue.index);
    if (options.socketFd !== undefined && options.socketFd >= 0) register(options.socketFd, EPOLLRDHUP | EPOLLET, HANGUP_TAG);

    nowMs = performance.now();
    if (nowMs >= measureStartMs) {
      recording = true;
      cpuStart = process.cpuUsage();
    }
    queues.forEach((queue, i) => {
      fill(queue, i);
      queue.publish(performance.now());
    });

    for (;;) {
      let inflight = 0;
      for (const queue of queues) inflight += queue.inflight;
      if (inflight === 0 && (stopping || exhausted.every(Boolean))) break;

      let timeout = 100;
      if (timed && !stopping) timeout = Math.max(1, Math.min(100, Math.ceil(deadlineMs - nowMs)));
      const n = sys.epollWait(epfd, eventsAddress, maxEvents, timeout);
      if (n < 0) {
        const errno = lastErrno();
        if (errno !== Errno.EINTR) throw new SyscallError('epoll_wait', errno);
      }
      wakeups++;
      for (let e = 0; e < n; e++) {
        if (
          events.readUInt32LE(e * EVENT_SIZE + 4) === HANGUP_TAG &&
          (events.readUInt32LE(e * EVENT_SIZE) & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) !== 0
        ) {
          throw new BackendHangupError();
        }
      }
      nowMs = performance.now();
      if (timed && !stopping && nowMs >= deadlineMs) {
        stopping = true;
        if (cpuStart !== null) cpuUsed = process.cpuUsage(cpuStart);
        recording = false;
      } else if (!recording && !stopping && nowMs >= measureStartMs) {
        recording = true;
        cpuStart = process.cpuUsage();
      }

      let progress = 0;
      for (let i = 0; i < queues.length; i++) {
        const queue = queues[i] as LoadQueue;
        for (;;) {
          const got = queue.reap(done);
          if (got > 0) {
            reapBatches++;
            progress += got;
            if (recording) lastCompletionMs = nowMs;
          }
          fill(queue, i);
          queue.publish(performance.now());
          if (!queue.rearm()) break;
          nowMs = performance.now();
        }
      }
      if (progress > 0) lastProgressMs = nowMs;
      else if (nowMs - lastProgressMs > stallMs && queues.some((q) => q.inflight > 0)) {
        throw new BackendStallError(
          `no completion for ${stallMs} ms with requests in flight: ${queues.map((q) => q.describe()).join('; ')}`,
        );
      }
    }
  } finally {
    sys.close(epfd);
  }
  if (cpuUsed === null && cpuStart !== null) cpuUsed = process.cpuUsage(cpuStart);
  const elapsedMs = timed ? (options.durationMs as number) : lastCompletionMs - startMs;
  return {
    elapsedMs,
    queues: stats,
    cpuUserMicros: cpuUsed?.user ?? 0,
    cpuSystemMicros: cpuUsed?.system ?? 0,
    wakeups,
    reapBatches,
    kicks: queues.reduce((sum, q) => sum + q.kicks, 0) - kicksBefore,
    suppressedKicks: queues.reduce((sum, q) => sum + q.suppressedKicks, 0) - suppressedBefore,
    allCompletions,
    failure,
  };
}
