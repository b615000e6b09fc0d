// Poisoned queues (design.md §3.3 and §5, docs/architecture.md "Poisoned queue") against the real daemon
// (`npm run build` first): a broken ring is reported exactly once (counter, err eventfd, NEEDS_RESET in
// GET_STATUS, the queue_poisoned gauge), publishes nothing, costs no CPU however often the guest kicks, and
// serves again after a ring restart. The request engine follows $VUBLK_IO_ENGINE, as in .ci/run.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DescFlag } from '../../protocol/split-ring.js';
import { BlkRequestType } from '../../protocol/virtio-blk.js';
import { DeviceStatus } from '../../protocol/virtio.js';
import { MissingCompletionError, VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { ChainBuilder, restartQueue } from '../support/chain-builder.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { METRICS_ARGS, QueueMetrics, ZERO_COUNTS, countsDelta, metricsUrl, type QueueCounts } from '../support/metrics-scrape.js';

const QUEUE_SIZE = 128;
const KICKS = 10_000;
/** Kicks are spread over about this long, then the daemon is left alone for as long again. */
const STORM_MS = 1_000;
/** A worker spinning on the poisoned ring would burn ~2 s of CPU in the measured window. */
const MAX_CPU_SECONDS = 0.5;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** utime + stime of a process, in seconds (all threads). */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may contain spaces) start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const utime = Number(fields[11]);
  const stime = Number(fields[12]);
  return (utime + stime) / 100; // USER_HZ is 100 on Linux
}

let daemon: DaemonProcess;
let metrics: QueueMetrics;

beforeAll(async () => {
  daemon = await startDaemon({ size: '16M', args: ['--num-queues', '2', ...METRICS_ARGS] });
  metrics = new QueueMetrics(await metricsUrl(daemon));
});

afterAll(async () => {
  await daemon?.stop();
});

async function settledDelta(queue: number, before: QueueCounts, expected: Partial<QueueCounts>): Promise<QueueCounts> {
  const want = { ...ZERO_COUNTS, ...expected };
  const after = await metrics.waitFor(queue, (c) => JSON.stringify(countsDelta(before, c)) === JSON.stringify(want), 3_000);
  return countsDelta(before, after);
}

interface PoisonCase {
  name: string;
  /** Breaks queue 0's ring. */
  poison(fe: VhostUserFrontend, chains: ChainBuilder): void;
  counters: Partial<QueueCounts>;
}

const cases: PoisonCase[] = [
  {
    name: 'avail.idx jumps by queue size + 1',
    poison: (fe) => {
      const q = fe.queue(0);
      q.ring.availIdx = q.indices.availIdx + QUEUE_SIZE + 1;
      q.kick({ force: true });
    },
    counters: { invalidAvailIdx: 1, poisoned: 1 },
  },
  {
    name: 'descriptor loop',
    poison: (_fe, chains) => {
      chains.submit([
        { addr: chains.header(BlkRequestType.IN, 0), len: 16 },
        { addr: chains.alloc(512), len: 512, write: true },
        { addr: chains.alloc(512), len: 512, write: true, rawFlags: DescFlag.WRITE | DescFlag.NEXT, next: 1 },
      ]);
    },
    counters: { ioErrors: 1, poisoned: 1 },
  },
];

describe.each(cases)('poisoned queue: $name', (c) => {
  it('is reported once, publishes nothing, stays cheap under 10,000 kicks, and serves again after a ring restart', async () => {
    const fe = await VhostUserFrontend.connect(daemon.socketPath, { numQueues: 2, queueSize: QUEUE_SIZE, protocol: { status: true } });
    const chains = new ChainBuilder(fe, 0);
    try {
      const blk = new VirtioBlkDriver(fe);
      const q = fe.queue(0);
      // Serving before.
      await blk.write(0, Buffer.alloc(4096, 0x3c), { queue: 0 });
      expect(q.errorSignals()).toBe(0);
      expect((await fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(0);

      const before = await metrics.settledCounts(0);
      const usedBefore = q.ring.usedIdx;
      c.poison(fe, chains);
      expect(await settledDelta(0, before, c.counters)).toEqual({ ...ZERO_COUNTS, ...c.counters });
      expect(q.errorSignals()).toBe(1);
      expect((await fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(DeviceStatus.NEEDS_RESET);

      // The kick storm, measured: CPU of the whole daemon over the storm and a quiet period as long.
      const pid = daemon.child.pid as number;
      const cpuBefore = cpuSeconds(pid);
      const started = Date.now();
      const rounds = 100;
      for (let r = 0; r < rounds; r++) {
        for (let k = 0; k < KICKS / rounds; k++) q.kick({ force: true });
        await sleep(STORM_MS / rounds);
      }
      await sleep(Math.max(STORM_MS, Date.now() - started));
      const cpu = cpuSeconds(pid) - cpuBefore;
      const window = (Date.now() - started) / 1000;
      console.log(`[poison: ${c.name}] daemon CPU over ${KICKS} kicks and a ${window.toFixed(2)} s window: ${cpu.toFixed(2)} s`);
      expect(cpu).toBeLessThan(MAX_CPU_SECONDS);

      // Still exactly one of everything; nothing published.
      expect(countsDelta(before, await metrics.counts(0))).toEqual({ ...ZERO_COUNTS, ...c.counters });
      expect(q.errorSignals()).toBe(0);
      expect(q.ring.usedIdx).toBe(usedBefore);
      await expect(q.waitUsed({ timeoutMs: 200 })).rejects.toBeInstanceOf(MissingCompletionError);
      expect((await fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(DeviceStatus.NEEDS_RESET);

      // The other queue is not affected.
      expect((await blk.read(0, 4096, { queue: 1 })).every((b) => b === 0x3c)).toBe(true);

      // Ring restart: GET_VRING_BASE clears poison; SET_VRING_BASE/ADDR/KICK with a sane ring serves again.
      await restartQueue(fe, 0);
      expect((await fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(0);
      expect((await blk.read(0, 4096, { queue: 0 })).every((b) => b === 0x3c)).toBe(true);
      const after = await settledDelta(0, before, { ...c.counters, poisoned: 0, reads: 1, bytesRead: 4096 });
      expect(after).toEqual({ ...ZERO_COUNTS, ...c.counters, poisoned: 0, reads: 1, bytesRead: 4096 });
      expect(q.errorSignals()).toBe(0);
    } finally {
      chains.release();
      fe.close();
    }
  });
});

describe('poisoned queue across a memory-table change', () => {
  // design.md §5: poison lasts until a ring restart, reset or reconnect — a memory-table change is none of those.
  it('stays poisoned (nothing served) after SET_MEM_TABLE', async () => {
    const fe = await VhostUserFrontend.connect(daemon.socketPath, { numQueues: 2, queueSize: QUEUE_SIZE, protocol: { status: true } });
    const chains = new ChainBuilder(fe, 0);
    try {
      const before = await metrics.settledCounts(0);
      chains.submit([
        { addr: chains.header(BlkRequestType.IN, 0), len: 16 },
        { addr: chains.alloc(512), len: 512, write: true, rawFlags: DescFlag.WRITE | DescFlag.NEXT, next: 0 },
      ]);
      expect(await settledDelta(0, before, { ioErrors: 1, poisoned: 1 })).toEqual({ ...ZERO_COUNTS, ioErrors: 1, poisoned: 1 });
      await fe.setMemTable();
      expect((await fe.getStatus()) & DeviceStatus.NEEDS_RESET).toBe(DeviceStatus.NEEDS_RESET);
      expect((await metrics.counts(0)).poisoned).toBe(1);
      const blk = new VirtioBlkDriver(fe);
      const stuck = blk.submit({ type: BlkRequestType.IN, sector: 0, inLength: 512 }, { queue: 0 });
      await expect(blk.wait(stuck, 300)).rejects.toBeInstanceOf(MissingCompletionError);
    } finally {
      chains.release();
      fe.close();
    }
  });
});
