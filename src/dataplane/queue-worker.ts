/**
 * Entry point of a queue worker thread. It sleeps in epoll_wait on its control eventfd, its ring's kick
 * eventfd and a retry timer, and runs the drain bracket on its own ring. Blocking here is the point: this
 * thread has nothing else to do, and the control plane's event loop never waits for it.
 */
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { drainEventFd, signalEventFd } from '../sys/eventfd.js';
import { EpollSet } from './epoll.js';
import { RetryTimer } from './retry-timer.js';
import { GuestMemory } from './guest-memory.js';
import { SplitQueue, RingMappingError } from './split-queue.js';
import { descriptorTableBytes, availRingBytes, usedRingBytes } from '../../protocol/split-ring.js';
import { Counter, QueueCounters } from './counters.js';
import { SyncExecutor } from './sync-executor.js';
import { UringExecutor } from './uring-executor.js';
import type { IoEngineName, RequestExecutor } from './request-executor.js';
import { completeRequest, createRequestScratch, drainQueue, unlimited, type Admission, type DrainContext, type PoisonCause } from './drain.js';
import { DiskThrottle } from '../throttle/disk-throttle.js';
import type { RingStart, WorkerCommand, WorkerInit, WorkerMessage } from './worker-protocol.js';

/** Kick-less (polling-mode) rings are drained on this tick. */
const POLL_TICK_NANOS = 1_000_000;

class QueueWorker {
  private readonly epoll = new EpollSet();
  private readonly timer = new RetryTimer();
  private readonly counters: QueueCounters;
  private readonly executor: RequestExecutor;
  private readonly admission: Admission;
  private readonly scratch;
  private readonly request;
  private memory = new GuestMemory([]);
  private ring: RingStart | null = null;
  private context: DrainContext | null = null;
  private capacityBytes: number;
  private writeback: boolean;
  private running = true;
  private readonly ready = new Int32Array(8);

  constructor(
    private readonly init: WorkerInit,
    private readonly port: MessagePort,
  ) {
    this.counters = new QueueCounters(init.counters, init.queue);
    this.executor = this.createExecutor();
    this.executor.onComplete = (completion) => {
      if (this.context !== null) completeRequest(this.context, completion);
    };
    this.admission = init.throttle ? DiskThrottle.attach(init.throttle) : unlimited;
    ({ scratch: this.scratch, request: this.request } = createRequestScratch(init.limits));
    this.capacityBytes = init.capacityBytes;
    this.writeback = init.writeback;
    this.epoll.add(init.controlFd);
    this.epoll.add(this.timer.fd);
  }

  run(): void {
    try {
      this.serve();
    } finally {
      this.executor.close();
      this.epoll.close();
      this.timer.close();
    }
  }

  private serve(): void {
    while (this.running) {
      const n = this.epoll.wait(this.ready);
      for (let i = 0; i < n; i++) {
        const fd = this.ready[i];
        if (fd === this.init.controlFd) {
          drainEventFd(fd);
          this.handleCommands();
        } else if (fd === this.timer.fd) {
          this.timer.acknowledge();
          this.drain();
        } else if (this.ring !== null && fd === this.ring.kickFd) {
          // Edge-triggered: the kick counter is never read back (it would take 2^64 kicks to saturate).
          this.drain();
        }
      }
    }
  }

  /** `auto` tries io_uring and falls back to the sync engine; an explicit `io_uring` that fails is fatal. */
  private createExecutor(): RequestExecutor {
    const setting = this.init.ioEngine ?? 'auto';
    let engine: IoEngineName = 'sync';
    let reason = 'sync engine requested';
    let executor: RequestExecutor | null = null;
    if (setting !== 'sync') {
      try {
        executor = new UringExecutor(this.init.imageFd, this.init.limits);
        engine = 'io_uring';
        reason = `io_uring (${setting === 'auto' ? 'auto' : 'requested'})`;
      } catch (error) {
        const detail = error instanceof Error ? error.message : String(error);
        if (setting === 'io_uring') {
          this.post({ type: 'event', kind: 'error', queue: this.init.queue, reason: `io_uring requested but unavailable: ${detail}` });
          throw new Error(`queue ${this.init.queue}: io_uring requested but unavailable: ${detail}`);
        }
        reason = `io_uring unavailable, using sync: ${detail}`;
      }
    }
    this.post({ type: 'event', kind: 'started', queue: this.init.queue, reason, ioEngine: engine });
    return executor ?? new SyncExecutor(this.init.imageFd, this.init.limits);
  }

  private drain(): void {
    const ctx = this.context;
    if (ctx === null) return;
    const wait = drainQueue(ctx);
    if (wait > 0) this.timer.arm(Math.min(wait, 1e9));
  }

  private handleCommands(): void {
    for (;;) {
      const received = receiveMessageOnPort(this.port);
      if (received === undefined) return;
      const command = received.message as WorkerCommand;
      let error: string | undefined;
      let lastAvailIdx: number | undefined;
      try {
        lastAvailIdx = this.apply(command);
      } catch (cause) {
        error = cause instanceof Error ? cause.message : String(cause);
      }
      this.post({ type: 'ack', seq: command.seq, ...(lastAvailIdx === undefined ? {} : { lastAvailIdx }), ...(error ? { error } : {}) });
    }
  }

  private apply(command: WorkerCommand): number | undefined {
    switch (command.op) {
      case 'memory':
        this.memory = new GuestMemory(command.regions);
        if (this.ring !== null) this.startRing(this.ring, this.context?.queue.lastAvailIdx ?? this.ring.lastAvailIdx);
        return undefined;
      case 'start':
        this.stopRing();
        this.startRing(command.ring, command.ring.lastAvailIdx);
        return undefined;
      case 'stop':
        return this.stopRing();
      case 'setCall':
        if (this.ring !== null) {
          this.ring.callFd = command.fd;
          // A guest may have missed an interrupt while the old call fd was being replaced.
          if (command.fd >= 0) signalEventFd(command.fd);
        }
        return undefined;
      case 'setErr':
        if (this.ring !== null) this.ring.errFd = command.fd;
        return undefined;
      case 'settings':
        this.capacityBytes = command.capacityBytes;
        this.writeback = command.writeback;
        if (this.context !== null) {
          this.context.capacityBytes = command.capacityBytes;
          this.context.writeback = command.writeback;
        }
        return undefined;
      case 'exit':
        this.stopRing();
        this.running = false;
        return undefined;
    }
  }

  /** Resolves ring memory and begins serving; an unusable ring poisons the queue instead of failing the session. */
  private startRing(ring: RingStart, lastAvailIdx: number): void {
    const wasRunning = this.context !== null;
    if (wasRunning && this.ring?.kickFd !== undefined && this.ring.kickFd >= 0) this.epoll.remove(this.ring.kickFd);
    this.ring = ring;
    this.context = null;
    const poisonedFromStart = (reason: string): void => {
      this.counters.add(Counter.ioErrors);
      this.counters.setGauge(Counter.poisoned, 1);
      this.counters.flush();
      this.raisePoison('ring_structure', reason);
    };
    const desc = this.memory.userToGuest(ring.descUserAddr, descriptorTableBytes(ring.size));
    const avail = this.memory.userToGuest(ring.availUserAddr, availRingBytes(ring.size));
    const used = this.memory.userToGuest(ring.usedUserAddr, usedRingBytes(ring.size));
    if (desc < 0 || avail < 0 || used < 0) {
      poisonedFromStart('ring addresses are not inside the memory table');
      return;
    }
    let queue: SplitQueue;
    try {
      queue = new SplitQueue(this.memory, { size: ring.size, descGpa: desc, availGpa: avail, usedGpa: used }, ring.eventIdx, lastAvailIdx);
    } catch (error) {
      if (error instanceof RingMappingError) {
        poisonedFromStart(error.message);
        return;
      }
      throw error;
    }
    this.counters.setGauge(Counter.poisoned, 0);
    this.context = {
      queue,
      memory: this.memory,
      limits: this.init.limits,
      capacityBytes: this.capacityBytes,
      writeback: this.writeback,
      executor: this.executor,
      counters: this.counters,
      admission: this.admission,
      scratch: this.scratch,
      request: this.request,
      stalled: false,
      poisoned: false,
      onPoison: (cause, reason) => this.raisePoison(cause, reason),
      interrupt: () => {
        const fd = this.ring?.callFd ?? -1;
        if (fd >= 0) signalEventFd(fd);
      },
    };
    if (ring.kickFd >= 0) this.epoll.add(ring.kickFd, true);
    else this.timer.arm(POLL_TICK_NANOS, POLL_TICK_NANOS);
    // Requests may have been queued before the ring (re)started; their kick is long gone.
    this.drain();
  }

  /** Stops serving and returns the next avail index to consume (what GET_VRING_BASE reports). */
  private stopRing(): number | undefined {
    const ring = this.ring;
    if (ring === null) return undefined;
    const ctx = this.context;
    const lastAvailIdx = ctx?.queue.lastAvailIdx ?? ring.lastAvailIdx;
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
    this.post({ type: 'event', kind: 'poisoned', queue: this.init.queue, reason, cause });
  }

  private post(message: WorkerMessage): void {
    this.port.postMessage(message);
  }
}

const init = workerData as WorkerInit;
if (parentPort === null) throw new Error('queue-worker must run as a worker thread');
new QueueWorker(init, parentPort).run();
// Leaving the blocking loop lets the thread's event loop end, which terminates the worker.
parentPort.close();
