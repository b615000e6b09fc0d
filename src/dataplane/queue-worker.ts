/**
 * Entry point of a pool worker thread. It sleeps in epoll_wait on its control eventfd and, for every ring it
 * serves, that ring's kick eventfd and retry timer, and runs the drain bracket of whichever ring woke it.
 * Blocking here is the point: this thread has nothing else to do, and the control plane's event loop never
 * waits for it.
 *
 * A worker serves rings of any disk and any session: each ring carries its own disk context (image fd,
 * limits, counters, throttle) and runs over its session's memory table, kept here by table id for as long
 * as one of this worker's rings uses it.
 */
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { drainEventFd } from '../sys/eventfd.js';
import { EpollSet } from './epoll.js';
import { waitPolling } from './adaptive-poll.js';
import { GuestMemory } from './guest-memory.js';
import { RingServer } from './ring-server.js';
import { DirtyLog } from './dirty-log.js';
import type { DirtyLogTable, MemoryTable, WorkerCommand, WorkerInit, WorkerMessage } from './worker-protocol.js';

/** Ready fds handled per epoll_wait: more are simply reported by the next wait. */
const READY_BATCH = 64;
/** How long a worker with requests outstanding sleeps at most before checking its busy rings itself. */
const WATCHDOG_MS = 100;

interface ServedRing {
  server: RingServer;
  diskId: number;
  memoryId: number;
}

interface HeldMemory {
  version: number;
  memory: GuestMemory;
}

interface HeldLog {
  version: number;
  log: DirtyLog;
}

function ringKey(diskId: number, queue: number): string {
  return `${diskId}:${queue}`;
}

class PoolWorker {
  private readonly epoll = new EpollSet(READY_BATCH);
  private readonly rings = new Map<string, ServedRing>();
  private readonly memories = new Map<number, HeldMemory>();
  /** Dirty logs by session (memory table id), kept while a ring of that session runs here. */
  private readonly logs = new Map<number, HeldLog>();
  private running = true;
  private readonly ready = new Int32Array(READY_BATCH);

  constructor(
    private readonly init: WorkerInit,
    private readonly port: MessagePort,
  ) {
    this.epoll.add(init.controlFd);
  }

  run(): void {
    try {
      this.serve();
    } finally {
      for (const ring of this.rings.values()) ring.server.close();
      this.rings.clear();
      this.epoll.close();
    }
  }

  private serve(): void {
    while (this.running) {
      // With work outstanding the wait is bounded: a wake-up that never comes (a kernel notification lost
      // or deferred) then costs WATCHDOG_MS, not a guest stuck for ever. Idle rings: no timeout, no CPU.
      let timeoutMs = -1;
      for (const { server } of this.rings.values()) {
        if (server.busy) {
          timeoutMs = WATCHDOG_MS;
          break;
        }
      }
      const n = waitPolling(this.epoll, this.ready, this.pollUs, this.servers, timeoutMs);
      if (n === 0 && timeoutMs >= 0) {
        for (const { server } of this.rings.values()) server.watchdog();
        continue;
      }
      for (let i = 0; i < n; i++) {
        const fd = this.ready[i] ?? -1;
        if (fd === this.init.controlFd) {
          drainEventFd(fd);
          this.handleCommands();
          if (!this.running) return;
          continue;
        }
        // Kick, completion or timer fd of one ring.
        for (const { server } of this.rings.values()) if (server.dispatch(fd)) break;
      }
    }
  }

  /** Adaptive polling: the largest poll-us any served ring's disk asked for (0 = sleep at once). */
  private pollUs = 0;
  private servers: RingServer[] = [];

  private refreshPolling(): void {
    this.servers = [...this.rings.values()].map((r) => r.server);
    this.pollUs = this.servers.reduce((max, server) => Math.max(max, server.pollUs), 0);
  }

  private handleCommands(): void {
    for (;;) {
      const received = receiveMessageOnPort(this.port);
      if (received === undefined) {
        this.refreshPolling();
        return;
      }
      const command = received.message as WorkerCommand;
      let error: string | undefined;
      let result: AckFields = {};
      try {
        result = this.apply(command);
      } catch (cause) {
        error = cause instanceof Error ? cause.message : String(cause);
      }
      this.post({
        type: 'ack',
        seq: command.seq,
        ...(result.lastAvailIdx === undefined ? {} : { lastAvailIdx: result.lastAvailIdx }),
        ...(result.leftInFlight ? { leftInFlight: result.leftInFlight } : {}),
        ...(error ? { error } : {}),
      });
    }
  }

  private ringFor(diskId: number, queue: number): ServedRing {
    const ring = this.rings.get(ringKey(diskId, queue));
    if (ring === undefined) throw new Error(`queue ${queue} of disk #${diskId} is not served by worker ${this.init.worker}`);
    return ring;
  }

  /** The table's current GuestMemory here; a newer version replaces it for every ring that uses it. */
  private memoryFor(table: MemoryTable): GuestMemory {
    const held = this.memories.get(table.id);
    if (held !== undefined && held.version >= table.version) return held.memory;
    const memory = new GuestMemory(table.regions);
    this.memories.set(table.id, { version: table.version, memory });
    if (held !== undefined) {
      for (const ring of this.rings.values()) if (ring.memoryId === table.id) ring.server.memoryChanged(memory);
    }
    return memory;
  }

  /** The session's current dirty log here; a newer version replaces it for every ring of the session. */
  private logFor(table: DirtyLogTable): DirtyLog {
    const held = this.logs.get(table.id);
    if (held !== undefined && held.version >= table.version) return held.log;
    const log = table.size > 0 ? DirtyLog.mapped(table.hostAddr, table.size) : DirtyLog.off;
    this.logs.set(table.id, { version: table.version, log });
    if (held !== undefined) {
      for (const ring of this.rings.values()) if (ring.memoryId === table.id) ring.server.setDirtyLog(log);
    }
    return log;
  }

  private forget(key: string, ring: ServedRing): void {
    ring.server.close();
    this.rings.delete(key);
    for (const other of this.rings.values()) if (other.memoryId === ring.memoryId) return;
    this.memories.delete(ring.memoryId);
    this.logs.delete(ring.memoryId);
  }

  private apply(command: WorkerCommand): AckFields {
    switch (command.op) {
      case 'memory': {
        // Only tables a ring here uses are kept: a table nobody here runs over needs no copy.
        if (!this.memories.has(command.memory.id)) return {};
        this.memoryFor(command.memory);
        let leftInFlight = 0;
        for (const ring of this.rings.values()) if (ring.memoryId === command.memory.id) leftInFlight += ring.server.leftInFlight;
        return { leftInFlight };
      }
      case 'log':
        if (this.logs.has(command.log.id)) this.logFor(command.log);
        return {};
      case 'start': {
        const key = ringKey(command.diskId, command.queue);
        const previous = this.rings.get(key);
        if (previous !== undefined) this.forget(key, previous);
        const memory = this.memoryFor(command.memory);
        const log = this.logFor(command.log);
        const server = new RingServer(
          command.queue,
          command.disk,
          this.epoll,
          (event) => this.post({ ...event, diskId: command.diskId }),
          command.settings,
        );
        const ring = { server, diskId: command.diskId, memoryId: command.memory.id };
        this.rings.set(key, ring);
        try {
          server.setDirtyLog(log);
          server.start(command.ring, command.ring.lastAvailIdx, memory);
        } catch (error) {
          this.forget(key, ring);
          throw error;
        }
        return {};
      }
      case 'stop': {
        const key = ringKey(command.diskId, command.queue);
        const ring = this.rings.get(key);
        if (ring === undefined) return {};
        const lastAvailIdx = ring.server.stop();
        const leftInFlight = ring.server.leftInFlight;
        this.forget(key, ring);
        return { lastAvailIdx, leftInFlight };
      }
      case 'setCall':
        this.ringFor(command.diskId, command.queue).server.setCall(command.fd);
        return {};
      case 'setErr':
        this.ringFor(command.diskId, command.queue).server.setErr(command.fd);
        return {};
      case 'settings':
        for (const ring of this.rings.values()) {
          if (ring.diskId === command.diskId) ring.server.applySettings(command.settings.capacityBytes, command.settings.writeback);
        }
        return {};
      case 'exit':
        for (const [key, ring] of this.rings) this.forget(key, ring);
        this.running = false;
        return {};
    }
  }

  private post(message: WorkerMessage): void {
    this.port.postMessage(message);
  }
}

/** What a command's ack reports besides success (WorkerAck). */
interface AckFields {
  lastAvailIdx?: number | undefined;
  leftInFlight?: number;
}

const init = workerData as WorkerInit;
if (parentPort === null) throw new Error('queue-worker must run as a worker thread');
new PoolWorker(init, parentPort).run();
// Leaving the blocking loop lets the thread's event loop end, which terminates the worker.
parentPort.close();
