/**
 * One pool of worker threads per daemon, serving every ring of every disk (rust-vmm's VhostUserHandler
 * owns the threads; the device only describes itself). The number of threads is fixed by `--threads`
 * (default: one per CPU), whatever the number of disks: a connected disk costs its rings, not a thread.
 *
 * Placement: a ring is placed when it starts, on the worker with the fewest rings (ties: the lowest index),
 * and leaves it when it stops, so load re-balances at every ring start. A pinned disk's rings all go to the
 * worker already running one of them. Every thread is spawned when the first front-end connects
 * (`startAll`), while its handshake runs, so no ring start waits for a thread to boot, and a daemon no
 * front-end ever used keeps no thread; they sleep in epoll_wait: an idle daemon uses no CPU.
 *
 * Invariants:
 * - A ring is placed on at most one worker; its placement is recorded before its start command is sent and
 *   dropped only after its stop is acknowledged, so every later command for it (fds, settings, memory)
 *   reaches the worker that runs it, in order.
 * - A memory table update reaches every worker running a ring over that table before the caller unmaps
 *   what the update removed.
 */
import type { Logger } from '../log.js';
import type {
  DirtyLogTable,
  DiskContext,
  DiskSettings,
  MemoryTable,
  RingStart,
  WorkerAck,
  WorkerEvent,
} from '../dataplane/worker-protocol.js';
import { WorkerThread, type CommandBody } from './worker-thread.js';

/** How long shutdown waits for each worker thread to leave. */
const EXIT_TIMEOUT_MS = 5_000;

interface Placement {
  worker: number;
  diskId: number;
  memoryId: number;
}

export interface RingStartCommand {
  disk: DiskContext;
  settings: DiskSettings;
  memory: MemoryTable;
  log: DirtyLogTable;
  ring: RingStart;
}

/** What the pool needs of a worker thread (WorkerThread; a stand-in in the pool's unit test). */
export interface PoolThread {
  readonly exited: boolean;
  send(body: CommandBody): Promise<WorkerAck>;
  exit(timeoutMs: number): Promise<boolean>;
}

/** Where a ring stopped, and the requests it left in flight (see RingServer.leftInFlight). */
export interface RingStopped {
  lastAvailIdx: number | undefined;
  leftInFlight: number;
}

export type SpawnThread = (index: number, onEvent: (event: WorkerEvent) => void, onExit: (code: number) => void) => PoolThread;

const spawnWorkerThread: SpawnThread = (index, onEvent, onExit) => new WorkerThread(index, onEvent, onExit);

function ringKey(diskId: number, queue: number): string {
  return `${diskId}:${queue}`;
}

export class WorkerPool {
  private readonly threads: (PoolThread | undefined)[];
  /** Rings placed on each worker. */
  private readonly load: number[];
  private readonly placements = new Map<string, Placement>();
  private readonly eventListeners = new Map<number, (event: WorkerEvent) => void>();
  /** Disks whose rings must all run on one worker. */
  private readonly pinnedDisks = new Set<number>();
  private nextDiskId = 1;
  private nextMemoryId = 1;
  private closed = false;

  constructor(
    readonly size: number,
    private readonly log: Logger,
    private readonly spawn: SpawnThread = spawnWorkerThread,
  ) {
    if (!Number.isSafeInteger(size) || size < 1) throw new RangeError(`worker pool size ${size} is not a positive integer`);
    this.threads = new Array<PoolThread | undefined>(size).fill(undefined);
    this.load = new Array<number>(size).fill(0);
  }

  /** Threads running now (spawned and not exited). */
  get runningThreads(): number {
    return this.threads.filter((t) => t !== undefined && !t.exited).length;
  }

  /** Rings per worker, for logs and tests. */
  get ringsPerWorker(): readonly number[] {
    return this.load;
  }

  /**
   * Registers a disk; its workers' events (engine in use, poison) go to `onEvent`. `pinQueues`: every ring
   * of the disk runs on one worker (the one its first running ring was placed on), for back-ends with one
   * connection per disk (NBD without multi-conn, RBD's one completion queue per image handle).
   */
  addDisk(onEvent: (event: WorkerEvent) => void, placement: { pinQueues?: boolean } = {}): number {
    const id = this.nextDiskId++;
    this.eventListeners.set(id, onEvent);
    if (placement.pinQueues === true) this.pinnedDisks.add(id);
    return id;
  }

  removeDisk(diskId: number): void {
    this.eventListeners.delete(diskId);
    this.pinnedDisks.delete(diskId);
  }

  /** A daemon-wide id for a session's memory table (different sessions map different guests). */
  newMemoryId(): number {
    return this.nextMemoryId++;
  }

  async startRing(diskId: number, queue: number, command: RingStartCommand): Promise<void> {
    if (this.closed) throw new Error('the worker pool is shut down');
    const key = ringKey(diskId, queue);
    let placement = this.placements.get(key);
    if (placement === undefined) {
      placement = { worker: this.pinnedWorker(diskId) ?? this.leastLoaded(), diskId, memoryId: command.memory.id };
      this.placements.set(key, placement);
      this.load[placement.worker]!++;
    }
    placement.memoryId = command.memory.id;
    const { worker } = placement;
    try {
      await this.thread(worker).send({ op: 'start', diskId, queue, ...command });
    } catch (error) {
      this.unplace(key);
      throw error;
    }
    this.log.debug({ diskId, queue, worker, rings: this.load }, 'ring placed');
  }

  /**
   * Stops a ring; returns where it stopped (undefined when it was not running anywhere) and how many requests
   * it had to leave in flight (their guest memory must stay mapped).
   */
  async stopRing(diskId: number, queue: number): Promise<RingStopped> {
    const key = ringKey(diskId, queue);
    const placement = this.placements.get(key);
    if (placement === undefined) return { lastAvailIdx: undefined, leftInFlight: 0 };
    const thread = this.threads[placement.worker];
    try {
      if (thread === undefined || thread.exited) return { lastAvailIdx: undefined, leftInFlight: 0 };
      const ack = await thread.send({ op: 'stop', diskId, queue });
      return { lastAvailIdx: ack.lastAvailIdx, leftInFlight: ack.leftInFlight ?? 0 };
    } finally {
      this.unplace(key);
    }
  }

  async setNotifyFd(diskId: number, queue: number, op: 'setCall' | 'setErr', fd: number): Promise<void> {
    const placement = this.placements.get(ringKey(diskId, queue));
    if (placement === undefined) return;
    await this.thread(placement.worker).send({ op, diskId, queue, fd });
  }

  /**
   * Sends a new version of a memory table to every worker running a ring over it; returns how many requests
   * over the previous version the rings had to leave in flight (that memory must stay mapped).
   */
  async updateMemory(table: MemoryTable): Promise<number> {
    const workers = this.workersWhere((p) => p.memoryId === table.id);
    const acks = await Promise.all(workers.map((w) => this.thread(w).send({ op: 'memory', memory: table })));
    return acks.reduce((sum, ack) => sum + (ack.leftInFlight ?? 0), 0);
  }

  /** Sends a new version of a session's dirty log to every worker running a ring of that session. */
  async updateLog(table: DirtyLogTable): Promise<void> {
    const workers = this.workersWhere((p) => p.memoryId === table.id);
    await Promise.all(workers.map((w) => this.thread(w).send({ op: 'log', log: table })));
  }

  /** Sends a disk's new settings to every worker running one of its rings. */
  async updateSettings(diskId: number, settings: DiskSettings): Promise<void> {
    const workers = this.workersWhere((p) => p.diskId === diskId);
    await Promise.all(workers.map((w) => this.thread(w).send({ op: 'settings', diskId, settings })));
  }

  /**
   * Stops every worker. Returns false when a thread did not leave in time (blocked in a system call): the
   * process must then exit without joining it.
   */
  async close(): Promise<boolean> {
    this.closed = true;
    const results = await Promise.all(this.threads.map((t) => (t === undefined ? true : t.exit(EXIT_TIMEOUT_MS))));
    this.placements.clear();
    this.load.fill(0);
    const stuck = results.filter((ok) => !ok).length;
    if (stuck > 0) this.log.error({ stuck }, 'worker threads did not stop in time');
    return stuck === 0;
  }

  private workersWhere(match: (p: Placement) => boolean): number[] {
    const workers = new Set<number>();
    for (const p of this.placements.values()) if (match(p)) workers.add(p.worker);
    return [...workers];
  }

  /** For a pinned disk: the worker running its rings, if one runs. */
  private pinnedWorker(diskId: number): number | undefined {
    if (!this.pinnedDisks.has(diskId)) return undefined;
    for (const p of this.placements.values()) if (p.diskId === diskId) return p.worker;
    return undefined;
  }

  private leastLoaded(): number {
    let best = 0;
    for (let w = 1; w < this.size; w++) if (this.load[w]! < this.load[best]!) best = w;
    return best;
  }

  private unplace(key: string): void {
    const placement = this.placements.get(key);
    if (placement === undefined) return;
    this.placements.delete(key);
    this.load[placement.worker]!--;
  }

  /** Spawns every thread now; each sleeps in epoll_wait until it is given a ring. */
  startAll(): void {
    for (let index = 0; index < this.size; index++) this.thread(index);
  }

  /** The worker thread at `index`, spawned on first use (again after an unexpected exit). */
  private thread(index: number): PoolThread {
    const existing = this.threads[index];
    if (existing !== undefined && !existing.exited) return existing;
    const thread = this.spawn(
      index,
      (event) => this.eventListeners.get(event.diskId)?.(event),
      (code) => {
        if (!this.closed) this.log.error({ worker: index, code }, 'worker thread exited unexpectedly');
        // Its rings are gone with it: forget them, so their sessions see them stopped.
        for (const [key, p] of this.placements) if (p.worker === index) this.unplace(key);
      },
    );
    this.threads[index] = thread;
    this.log.debug({ worker: index }, 'worker thread started');
    return thread;
  }
}
