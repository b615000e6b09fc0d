// One daemon, 32 disks × 2 queues, served by one worker pool: 32 front-ends connect at the same moment and
// every one completes the handshake and verified 4 KiB I/O. The thread count does not depend on the number
// of disks. Handshake times, RSS and threads are reported, not asserted (no timing assertions in tests).
import { afterEach, describe, expect, it } from 'vitest';
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { processThreadKinds } from '../../bench/src/loadgen/proc-stats.js';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { KiB, MiB, errorLogs, pattern, sectorBytes, waitUntil } from '../support/session-harness.js';

const DISKS = 32;
const QUEUES = 2;
const THREADS = 2;

/**
 * The threads the daemon started. io_uring's kernel workers (`iou-wrk-*`) are left out: they are tasks of the
 * process too, but the kernel starts and ends them for blocking I/O (buffered writes it cannot do inline), a
 * bounded number per submitting thread and not per disk (a CI run once counted 16 threads with 32 disks and 15
 * with one; the 16th was a third iou-wrk).
 */
function threadCount(pid: number): number {
  return processThreadKinds(pid).own;
}

/**
 * The thread count once it has held for three reads 100 ms apart (at most 3 s): a thread Node or libuv starts
 * or ends for a moment is not the pool.
 */
async function settledThreadCount(pid: number): Promise<number> {
  let last = threadCount(pid);
  let same = 1;
  for (let i = 0; i < 30 && same < 3; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    const now = threadCount(pid);
    same = now === last ? same + 1 : 1;
    last = now;
  }
  return last;
}

function rssMiB(pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match ? Math.round(Number(match[1]) / 1024) : NaN;
}

async function startDisks(count: number, extraArgs: string[] = []): Promise<DaemonProcess> {
  const args = ['serve', '--metrics-listen', 'off', '--threads', String(THREADS), ...extraArgs];
  // Relative paths: the daemon runs in its own temporary directory.
  for (let i = 0; i < count; i++) args.push('--disk', `name=d${i},image=d${i}.img,socket=s${i}.sock,num-queues=${QUEUES},size=16M`);
  const daemon = await startDaemon({ rawArgs: args, waitForSocket: false });
  await daemon.waitForLog((l) => l.msg === 'worker pool ready', 30_000);
  for (let i = 0; i < count; i++) expect(existsSync(path.join(daemon.dir, `s${i}.sock`))).toBe(true);
  return daemon;
}

interface Outcome {
  handshakeMs: number;
  totalMs: number;
}

/** Handshake, then per queue a 4 KiB write read back on the other queue and checked in the image file. */
async function serveOne(daemon: DaemonProcess, disk: number, open: VhostUserFrontend[]): Promise<Outcome> {
  const t0 = performance.now();
  const frontend = await VhostUserFrontend.connect(path.join(daemon.dir, `s${disk}.sock`), {
    numQueues: QUEUES,
    timeoutMs: 20_000,
    memory: [{ gpa: 0, size: 4 * MiB }],
  });
  open.push(frontend);
  const handshakeMs = performance.now() - t0;
  const blk = new VirtioBlkDriver(frontend);
  for (let q = 0; q < QUEUES; q++) {
    const data = pattern(disk * 10 + q, 4 * KiB);
    const sector = 8 + q * 8;
    await blk.write(sector, data, { queue: q });
    const back = await blk.read(sector, data.length, { queue: 1 - q });
    expect(back.equals(data), `disk ${disk} queue ${q}: read back`).toBe(true);
    expect(sectorBytes(path.join(daemon.dir, `d${disk}.img`), sector, data.length).equals(data), `disk ${disk} queue ${q}: image`).toBe(
      true,
    );
  }
  return { handshakeMs, totalMs: performance.now() - t0 };
}

describe('one worker pool for every disk', () => {
  const daemons: DaemonProcess[] = [];
  const frontends: VhostUserFrontend[] = [];

  afterEach(async () => {
    for (const f of frontends.splice(0)) f.close();
    for (const d of daemons.splice(0)) await d.stop();
  });

  it(`${DISKS} front-ends connecting at once to ${DISKS} disks × ${QUEUES} queues all complete the handshake and verified I/O`, {
    timeout: 240_000,
  }, async () => {
    const daemon = await startDisks(DISKS);
    daemons.push(daemon);
    const pid = daemon.child.pid as number;
    const idleThreads = threadCount(pid);
    const idleRss = rssMiB(pid);

    const results = await Promise.allSettled(Array.from({ length: DISKS }, (_, i) => serveOne(daemon, i, frontends)));
    const failures = results.flatMap((r, i) => (r.status === 'rejected' ? [`disk ${i}: ${(r.reason as Error).message}`] : []));
    expect(failures, daemon.output().slice(-3000)).toEqual([]);
    const outcomes = results.map((r) => (r as PromiseFulfilledResult<Outcome>).value);
    const connectedThreads = await settledThreadCount(pid);
    const connectedRss = rssMiB(pid);
    const handshakes = outcomes.map((o) => o.handshakeMs).sort((a, b) => a - b);
    const median = handshakes[Math.floor(handshakes.length / 2)]!;
    console.log(
      `[pool] ${DISKS} disks × ${QUEUES} queues, --threads ${THREADS}: handshake median ${median.toFixed(0)} ms, max ${handshakes.at(-1)!.toFixed(0)} ms; ` +
        `handshake + I/O max ${Math.max(...outcomes.map((o) => o.totalMs)).toFixed(0)} ms; ` +
        `threads idle ${idleThreads} / all connected ${connectedThreads} (+ ${processThreadKinds(pid).ioUringWorkers} io_uring kernel workers); RSS idle ${idleRss} MiB / all connected ${connectedRss} MiB`,
    );
    expect(daemon.logs().filter((l) => l.msg === 'ring started').length).toBeGreaterThanOrEqual(DISKS * QUEUES);
    expect(errorLogs(daemon)).toEqual([]);

    // The same workload on one disk: the same number of threads.
    for (const f of frontends.splice(0)) f.close();
    await waitUntil(() => daemon.logs().filter((l) => l.msg === 'front-end disconnected').length === DISKS, 20_000, 'every disconnect');
    const single = await startDisks(1);
    daemons.push(single);
    await serveOne(single, 0, frontends);
    const singleThreads = await settledThreadCount(single.child.pid as number);
    console.log(
      `[pool] threads: 1 disk ${singleThreads}, ${DISKS} disks ${connectedThreads}; RSS 1 disk ${rssMiB(single.child.pid as number)} MiB`,
    );
    expect(singleThreads).toBe(connectedThreads);
  });

  it('the pool threads start with the first front-end: a daemon nobody connected to keeps none', { timeout: 60_000 }, async () => {
    const daemon = await startDisks(2, ['--log-level', 'debug']);
    daemons.push(daemon);
    const started = (): number => daemon.logs().filter((l) => l.msg === 'worker thread started').length;
    const idleThreads = threadCount(daemon.child.pid as number);
    expect(started()).toBe(0);
    await serveOne(daemon, 0, frontends);
    expect(started()).toBe(THREADS);
    // A second front-end (another disk) finds them running.
    await serveOne(daemon, 1, frontends);
    expect(started()).toBe(THREADS);
    expect(threadCount(daemon.child.pid as number)).toBeGreaterThanOrEqual(idleThreads + THREADS);
  });
});
