// The worker pool's placement and command routing, with stand-in threads (no worker is spawned): rings go to
// the least-loaded worker, commands reach the worker that runs the ring, and a command whose acknowledgement
// is slow holds nobody else's.
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { WorkerPool, type PoolThread, type SpawnThread } from '../../src/control/worker-pool.js';
import type { CommandBody } from '../../src/control/worker-thread.js';
import type { DiskContext, MemoryTable, RingStart, WorkerAck } from '../../src/dataplane/worker-protocol.js';
import { DEFAULT_MAX_DISCARD_SECTORS, DEFAULT_SEG_MAX, DEFAULT_SIZE_MAX } from '../../src/dataplane/device-limits.js';

const log = pino({ level: 'silent' });

class StandInThread implements PoolThread {
  exited = false;
  readonly commands: CommandBody[] = [];
  /** Commands matching this are not acknowledged until release() is called. */
  hold: (body: CommandBody) => boolean = () => false;
  private readonly held: (() => void)[] = [];

  /** Requests this worker reports left in flight by a stop or a memory update (absent from the ack when 0). */
  leftInFlight = 0;

  send(body: CommandBody): Promise<WorkerAck> {
    this.commands.push(body);
    const ack: WorkerAck = {
      type: 'ack',
      seq: this.commands.length,
      ...(body.op === 'stop' ? { lastAvailIdx: 42 } : {}),
      ...((body.op === 'stop' || body.op === 'memory') && this.leftInFlight > 0 ? { leftInFlight: this.leftInFlight } : {}),
    };
    if (this.hold(body)) return new Promise((resolve) => this.held.push(() => resolve(ack)));
    return Promise.resolve(ack);
  }

  release(): void {
    for (const resolve of this.held.splice(0)) resolve();
  }

  exit(): Promise<boolean> {
    this.exited = true;
    return Promise.resolve(true);
  }

  ops(): string[] {
    return this.commands.map((c) => ('diskId' in c ? `${c.op} ${c.diskId}:${'queue' in c ? c.queue : '*'}` : c.op));
  }
}

function standIns(): { spawn: SpawnThread; threads: StandInThread[] } {
  const threads: StandInThread[] = [];
  return {
    threads,
    spawn: (index) => {
      const thread = new StandInThread();
      threads[index] = thread;
      return thread;
    },
  };
}

const disk: DiskContext = {
  disk: 'd',
  imageFd: -1,
  limits: {
    sizeMax: DEFAULT_SIZE_MAX,
    segMax: DEFAULT_SEG_MAX,
    logicalBlockSize: 512,
    readOnly: false,
    serial: new Uint8Array(20),
    maxDiscardSectors: DEFAULT_MAX_DISCARD_SECTORS,
    maxDiscardSeg: 1,
    maxWriteZeroesSectors: DEFAULT_MAX_DISCARD_SECTORS,
    maxWriteZeroesSeg: 1,
  },
  counters: new SharedArrayBuffer(8),
  throttle: null,
};
const ring: RingStart = {
  size: 128,
  descUserAddr: 0,
  availUserAddr: 4096,
  usedUserAddr: 8192,
  lastAvailIdx: 0,
  eventIdx: true,
  usedLogGpa: -1,
  kickFd: -1,
  callFd: -1,
  errFd: -1,
};

function table(id: number, version = 1): MemoryTable {
  return { id, version, regions: [] };
}

function start(pool: WorkerPool, diskId: number, queue: number, memoryId: number): Promise<void> {
  return pool.startRing(diskId, queue, {
    disk,
    settings: { capacityBytes: 1 << 20, writeback: true },
    memory: table(memoryId),
    log: { id: memoryId, version: 0, hostAddr: 0, size: 0 },
    ring,
  });
}

describe('worker pool', () => {
  it('runs every ring of a pinned disk on one worker (one connection per disk), others spread', async () => {
    const { spawn } = standIns();
    const pool = new WorkerPool(3, log, spawn);
    const pinned = pool.addDisk(() => undefined, { pinQueues: true });
    const spread = pool.addDisk(() => undefined);
    await start(pool, spread, 0, 1);
    for (let q = 0; q < 4; q++) await start(pool, pinned, q, 2);
    // The pinned disk's first ring went to the least-loaded worker (1), the other three followed it.
    expect(pool.ringsPerWorker).toEqual([1, 4, 0]);
    await start(pool, spread, 1, 1);
    expect(pool.ringsPerWorker).toEqual([1, 4, 1]);
    // Once all its rings stopped, the pinned disk is placed afresh (least loaded), and pinned again.
    for (let q = 0; q < 4; q++) await pool.stopRing(pinned, q);
    await start(pool, pinned, 0, 3);
    await start(pool, pinned, 1, 3);
    expect(pool.ringsPerWorker).toEqual([1, 2, 1]);
  });

  it('passes on the requests a ring left in flight: from its stop, and summed over workers from a memory update', async () => {
    const { spawn, threads } = standIns();
    const pool = new WorkerPool(2, log, spawn);
    const a = pool.addDisk(() => undefined);
    await start(pool, a, 0, 7);
    await start(pool, a, 1, 7);
    expect(await pool.updateMemory(table(7, 1))).toBe(0);
    threads[0]!.leftInFlight = 3;
    threads[1]!.leftInFlight = 5;
    expect(await pool.updateMemory(table(7, 2))).toBe(8);
    expect(await pool.stopRing(a, 1)).toEqual({ lastAvailIdx: 42, leftInFlight: 5 });
    threads[0]!.leftInFlight = 0;
    expect(await pool.stopRing(a, 0)).toEqual({ lastAvailIdx: 42, leftInFlight: 0 });
  });

  it('places each ring on the least-loaded worker, spawning threads only when needed, and re-balances on stop', async () => {
    const { spawn, threads } = standIns();
    const pool = new WorkerPool(3, log, spawn);
    const a = pool.addDisk(() => undefined);
    const b = pool.addDisk(() => undefined);
    await start(pool, a, 0, 1);
    expect(threads.length).toBe(1);
    await start(pool, a, 1, 1);
    await start(pool, b, 0, 2);
    await start(pool, b, 1, 2);
    expect(pool.ringsPerWorker).toEqual([2, 1, 1]);
    expect(threads.map((t) => t.ops())).toEqual([['start 1:0', 'start 2:1'], ['start 1:1'], ['start 2:0']]);
    expect(await pool.stopRing(a, 1)).toEqual({ lastAvailIdx: 42, leftInFlight: 0 });
    expect(pool.ringsPerWorker).toEqual([2, 0, 1]);
    // A stopped ring is not running anywhere: nothing to stop, no command sent.
    expect(await pool.stopRing(a, 1)).toEqual({ lastAvailIdx: undefined, leftInFlight: 0 });
    await start(pool, a, 1, 1);
    expect(threads[1]!.ops()).toEqual(['start 1:1', 'stop 1:1', 'start 1:1']);
    expect(pool.ringsPerWorker).toEqual([2, 1, 1]);
  });

  it('sends call fds, settings and memory tables only to the workers running the rings concerned', async () => {
    const { spawn, threads } = standIns();
    const pool = new WorkerPool(2, log, spawn);
    const a = pool.addDisk(() => undefined);
    const b = pool.addDisk(() => undefined);
    await start(pool, a, 0, 10); // worker 0
    await start(pool, b, 0, 20); // worker 1
    await start(pool, b, 1, 20); // worker 0
    threads.forEach((t) => t.commands.splice(0));
    await pool.setNotifyFd(a, 0, 'setCall', 99);
    await pool.updateMemory(table(10, 2));
    await pool.updateSettings(a, { capacityBytes: 2 << 20, writeback: false });
    expect(threads[0]!.ops()).toEqual(['setCall 1:0', 'memory', 'settings 1:*']);
    expect(threads[1]!.ops()).toEqual([]);
    await pool.updateMemory(table(20, 2));
    expect(threads[0]!.commands.at(-1)).toEqual({ op: 'memory', memory: table(20, 2) });
    expect(threads[1]!.commands.at(-1)).toEqual({ op: 'memory', memory: table(20, 2) });
    // A ring that is not running gets no fd: the session keeps it for the next start.
    await pool.setNotifyFd(a, 1, 'setCall', 98);
    expect(threads.flatMap((t) => t.ops()).filter((op) => op === 'setCall 1:1')).toEqual([]);
  });

  it('a slow acknowledgement holds only the command waiting for it, not other sessions on the same or other workers', async () => {
    const { spawn, threads } = standIns();
    const pool = new WorkerPool(2, log, spawn);
    const slow = pool.addDisk(() => undefined);
    const others = [pool.addDisk(() => undefined), pool.addDisk(() => undefined), pool.addDisk(() => undefined)];
    await start(pool, slow, 0, 1); // worker 0
    threads[0]!.hold = (body) => body.op === 'stop' && body.diskId === slow;
    let slowDone = false;
    const slowStop = pool.stopRing(slow, 0).then(() => (slowDone = true));
    // Three other sessions start rings (on both workers, worker 0 included) and stop them again.
    for (const [i, id] of others.entries()) await start(pool, id, 0, 2 + i);
    for (const id of others) expect((await pool.stopRing(id, 0)).lastAvailIdx).toBe(42);
    expect(threads[0]!.ops().filter((op) => op.startsWith('start')).length).toBeGreaterThan(1);
    expect(slowDone).toBe(false);
    threads[0]!.release();
    await slowStop;
    expect(pool.ringsPerWorker).toEqual([0, 0]);
  });

  it('forgets the rings of a worker that exited; close reports a worker that would not stop', async () => {
    const { spawn, threads } = standIns();
    const pool = new WorkerPool(1, log, spawn);
    const a = pool.addDisk(() => undefined);
    await start(pool, a, 0, 1);
    threads[0]!.exited = true;
    expect((await pool.stopRing(a, 0)).lastAvailIdx).toBeUndefined();
    await start(pool, a, 0, 1);
    expect(threads.length).toBe(1);
    expect(pool.runningThreads).toBe(1);
    threads[0]!.exit = () => Promise.resolve(false);
    expect(await pool.close()).toBe(false);
    await expect(start(pool, a, 1, 1)).rejects.toThrow(/shut down/);
  });
});
