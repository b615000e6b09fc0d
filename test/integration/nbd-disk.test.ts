/**
 * vublk serving NBD exports (image=nbd://..., nbd+unix://...) from real servers — nbdkit (memory, file,
 * delay and error filters) and qemu-nbd — driven by `vublk-bench run --verify` through the vhost-user
 * front-end: data written, flushed and read back through every queue; injected EIO becomes IOERR and
 * vublk_io_errors_total while the daemon stays up; a server killed and restarted under I/O loses nothing
 * and I/O resumes; start-up errors (no server, no export) are clear. Skips with the reason when nbdkit or
 * qemu-nbd is missing (fails under VUBLK_E2E_REQUIRED=1).
 */
import { afterEach, describe, expect, it, type TestContext } from 'vitest';
import { readFileSync, writeFileSync, truncateSync } from 'node:fs';
import path from 'node:path';
import { startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { freePort, requireTool, startNbdkit, startQemuNbd, tempDir, type ServerProcess } from '../support/nbd-servers.js';
import { METRICS_ARGS, metricsUrl, queueCounts, scrape } from '../support/metrics-scrape.js';
import { sampleValue, select, type Exposition } from '../support/prom-text.js';
import { runBench, verifyArgs, type BenchResult } from '../support/bench-run.js';
import { fillPattern, patternKey } from '../../bench/src/loadgen/pattern.js';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';

const MiB = 1024 * 1024;

function bench(args: string[], timeoutMs = 60_000): Promise<BenchResult> {
  return runBench(args, timeoutMs);
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function dir(): string {
  const temp = tempDir();
  cleanups.push(() => temp.remove());
  return temp.dir;
}

async function serveNbd(image: string, extra = '', args: string[] = []): Promise<DaemonProcess> {
  const work = dir();
  const socket = path.join(work, 'vublk.sock');
  const daemon = await startDaemon({
    rawArgs: ['serve', '--disk', `image=${image},socket=${socket}${extra}`, ...args],
    waitForSocket: false,
  });
  cleanups.push(async () => {
    await daemon.stop();
  });
  await daemon.waitForLog((l) => l.msg === 'listening for a vhost-user front-end' || l.level >= 50, 20_000);
  expect(daemon.running(), daemon.output()).toBe(true);
  return Object.assign(daemon, { socketPath: socket });
}

/** qemu-nbd on a Unix socket serving a new sparse raw file of `mib` MiB; it can be killed and started again. */
async function qemuNbdOnFile(mib: number): Promise<{ image: string; nbdSocket: string; kill(): Promise<void>; restart(): Promise<void> }> {
  const work = dir();
  const image = path.join(work, 'disk.raw');
  writeFileSync(image, '');
  truncateSync(image, mib * MiB);
  const nbdSocket = path.join(work, 'nbd.sock');
  let server = await startQemuNbd({ unix: nbdSocket }, image);
  cleanups.push(() => server.kill());
  return {
    image,
    nbdSocket,
    kill: () => server.kill(),
    restart: async () => {
      server = await startQemuNbd({ unix: nbdSocket }, image);
    },
  };
}

async function keep(server: Promise<ServerProcess>): Promise<ServerProcess> {
  const started = await server;
  cleanups.push(() => started.kill());
  return started;
}

/** nbdkit on a Unix socket in a fresh directory; `args(work)`: its filters, plugin and parameters. */
async function nbdkitInDir(context: TestContext, args: (work: string) => string[]): Promise<{ work: string; nbdSocket: string }> {
  requireTool(context, 'nbdkit');
  const work = dir();
  const nbdSocket = path.join(work, 'nbd.sock');
  await keep(startNbdkit({ unix: nbdSocket }, args(work)));
  return { work, nbdSocket };
}

/** A per-queue counter added up over the disk's queues (connection events land on whichever queue polled). */
function diskTotal(m: Exposition, name: string): number {
  return select(m, name, { disk: 'disk0' }).reduce((sum, sample) => sum + sample.value, 0);
}

/** Scrapes until the disk's `vublk_backend_connections_down` is `expected` (it follows the connections). */
async function expectConnectionsDown(base: string, expected: number, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let down = Number.NaN;
  while (Date.now() < deadline) {
    down = diskTotal(await scrape(base), 'vublk_backend_connections_down');
    if (down === expected) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  expect(down, `vublk_backend_connections_down after ${timeoutMs} ms`).toBe(expected);
}

function expectVerified(result: BenchResult, daemon: DaemonProcess): void {
  expect(result.code, `${result.stdout}${result.stderr}\ndaemon:\n${daemon.output().slice(-3000)}`).toBe(0);
  expect(result.stdout).toContain('verify: OK, every byte matches');
}

/** The image file holds, at [0, bytes), what `vublk-bench --verify --seed S` wrote: the server has the bytes. */
function expectImageHolds(image: string, seed: number, bytes: number): void {
  expect(readFileSync(image).subarray(0, bytes).equals(pattern(seed, bytes)), `${image} holds seed ${seed}`).toBe(true);
}

/** The pattern `vublk-bench --verify --seed S` writes at [0, bytes). */
function pattern(seed: number, bytes: number): Buffer {
  const data = new Uint8Array(bytes);
  fillPattern(data, 0, patternKey(seed));
  return Buffer.from(data);
}

describe('vublk over NBD', () => {
  it('nbdkit memory (multi-conn, Unix socket): verify on two queues, one connection per worker', async (context) => {
    requireTool(context, 'nbdkit');
    const work = dir();
    const nbdSocket = path.join(work, 'nbd.sock');
    await keep(startNbdkit({ unix: nbdSocket }, ['memory', '64M']));
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',num-queues=2', ['--threads', '2']);
    const ready = await daemon.waitForLog((l) => l.msg === 'disk ready');
    expect(ready['backend']).toBe('nbd');
    expect(ready['queuesPinned']).toBe(false);
    expect(ready['capacityBytes']).toBe(64 * MiB);
    const result = await bench(verifyArgs(daemon.socketPath, { size: '8M', bs: '4k', queues: 2, iodepth: 8, seed: 5 }));
    expectVerified(result, daemon);
  });

  it('qemu-nbd over TCP (a raw file): verify, and the bytes are in the file', async (context) => {
    requireTool(context, 'qemu-nbd');
    const work = dir();
    const image = path.join(work, 'disk.raw');
    writeFileSync(image, '');
    truncateSync(image, 32 * MiB);
    const port = await freePort();
    await keep(startQemuNbd({ port }, image, ['-x', 'disk0']));
    const daemon = await serveNbd(`nbd://127.0.0.1:${port}/disk0`, ',num-queues=2');
    const result = await bench(verifyArgs(daemon.socketPath, { size: '4M', bs: '16k', queues: 2, iodepth: 4, seed: 7 }));
    expectVerified(result, daemon);
    // FLUSH went to the server; qemu-nbd wrote through its page cache into the file.
    expectImageHolds(image, 7, 4 * MiB);
  });

  it('nbdkit file plugin behind the delay filter: verify passes with 5 ms per request', async (context) => {
    requireTool(context, 'nbdkit');
    const work = dir();
    const image = path.join(work, 'disk.raw');
    writeFileSync(image, '');
    truncateSync(image, 16 * MiB);
    const nbdSocket = path.join(work, 'nbd.sock');
    await keep(startNbdkit({ unix: nbdSocket }, ['--filter=delay', 'file', image, 'delay-read=5ms', 'delay-write=5ms']));
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`);
    const result = await bench(verifyArgs(daemon.socketPath, { size: '2M', bs: '64k', iodepth: 16, seed: 3 }));
    expectVerified(result, daemon);
    expectImageHolds(image, 3, 2 * MiB);
  });

  /** READ and WRITE commands nbdkit's log filter saw, with their byte counts. */
  function dataCommands(logFile: string): { reads: number[]; writes: number[] } {
    const found = { reads: [] as number[], writes: [] as number[] };
    for (const match of readFileSync(logFile, 'utf8').matchAll(/ (Read|Write) id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)/g)) {
      (match[1] === 'Read' ? found.reads : found.writes).push(Number(match[2]));
    }
    return found;
  }

  it('merge=: adjacent requests reach the server as fewer, larger commands, the data is right, and the counter says how many joined', async (context) => {
    // 4 MiB of 16 KiB writes at QD16, read back in 32 KiB reads: sequential, so a batch of requests is contiguous.
    const size = 4 * MiB;
    const guestWrites = size / (16 * 1024);
    const guestReads = size / (32 * 1024);
    // The limit is merge= or the server's maximum payload, whichever is smaller (the policy filter advertises 64K
    // and answers EINVAL above it). A merge past the server's maximum would only be split again by the client,
    // and the counter would then claim commands that were not saved (it did, with the cap removed: 288 for 256).
    const cases = [
      { setting: '', seed: 11, limit: MiB, serverMax: '' },
      { setting: ',merge=64K', seed: 12, limit: 64 * 1024, serverMax: '' },
      { setting: '', seed: 14, limit: 64 * 1024, serverMax: '64K' },
      { setting: ',merge=off', seed: 13, limit: 32 * 1024, serverMax: '' },
    ];
    for (const { setting, seed, limit, serverMax } of cases) {
      const { work, nbdSocket } = await nbdkitInDir(context, (work) => {
        const image = path.join(work, 'disk.raw');
        writeFileSync(image, '');
        truncateSync(image, 16 * MiB);
        const log = ['--filter=log', 'file', image, `logfile=${path.join(work, 'nbdkit.log')}`];
        if (serverMax === '') return log;
        return [log[0]!, '--filter=blocksize-policy', ...log.slice(1), `blocksize-maximum=${serverMax}`, 'blocksize-error-policy=error'];
      });
      const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}${setting}`, '', [...METRICS_ARGS]);
      const base = await metricsUrl(daemon);
      const result = await bench(verifyArgs(daemon.socketPath, { size: '4M', bs: '16k', iodepth: 16, seed }));
      expectVerified(result, daemon);
      expectImageHolds(path.join(work, 'disk.raw'), seed, size);
      const { reads, writes } = dataCommands(path.join(work, 'nbdkit.log'));
      // Every byte went to the server exactly once, in commands no larger than the limit.
      expect(
        writes.reduce((a, b) => a + b, 0),
        setting,
      ).toBe(size);
      expect(
        reads.reduce((a, b) => a + b, 0),
        setting,
      ).toBe(size);
      expect(Math.max(...writes, ...reads), `${setting} ${serverMax}`).toBeLessThanOrEqual(limit);
      // The counter is exact: each request that joined another saved one command.
      // (Counters are published just after a drain's interrupt: read until the last drain is in, bounded.)
      const expected = guestWrites - writes.length + guestReads - reads.length;
      let merged = -1;
      for (let i = 0; i < 50 && merged !== expected; i++) {
        if (i > 0) await new Promise((r) => setTimeout(r, 20));
        merged = sampleValue(await scrape(base), 'vublk_merged_requests_total', { disk: 'disk0', queue: '0' });
      }
      expect(merged, setting).toBe(expected);
      if (setting === ',merge=off') expect(merged).toBe(0);
      else
        expect(writes.length + reads.length, `${setting}: commands ${writes.length}+${reads.length}`).toBeLessThan(
          (guestWrites + guestReads) / 2,
        );
      await daemon.stop();
    }
  });

  /** Requests per NBD connection, from nbdkit's log filter (`connection=N Read|Write|Flush ...` lines). */
  function requestsPerConnection(logFile: string): Map<number, number> {
    const counts = new Map<number, number>();
    for (const match of readFileSync(logFile, 'utf8').matchAll(/connection=(\d+) (Read|Write|Flush) /g)) {
      const id = Number(match[1]);
      counts.set(id, (counts.get(id) ?? 0) + 1);
    }
    return counts;
  }

  it('connections=3 with multi-conn: one worker spreads one queue over three connections; the file holds every byte', async (context) => {
    // The delay keeps requests on the wire, so the least busy connection is not always the same one.
    const { work, nbdSocket } = await nbdkitInDir(context, (work) => {
      const image = path.join(work, 'disk.raw');
      writeFileSync(image, '');
      truncateSync(image, 16 * MiB);
      return [
        '--filter=log',
        '--filter=delay',
        'file',
        image,
        `logfile=${path.join(work, 'nbdkit.log')}`,
        'delay-read=1ms',
        'delay-write=1ms',
      ];
    });
    const image = path.join(work, 'disk.raw');
    const logFile = path.join(work, 'nbdkit.log');
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',connections=3', ['--threads', '1']);
    const ready = await daemon.waitForLog((l) => l.msg === 'disk ready');
    expect(ready['nbdConnections']).toBe(3);
    const result = await bench(verifyArgs(daemon.socketPath, { size: '2M', bs: '16k', iodepth: 16, seed: 11 }));
    expectVerified(result, daemon);
    expectImageHolds(image, 11, 2 * MiB);
    // The probe connection at start carried no request; the worker's three carried all of them.
    const perConnection = requestsPerConnection(logFile);
    expect([...perConnection.keys()].length, JSON.stringify([...perConnection])).toBe(3);
    for (const [id, count] of perConnection) expect(count, `connection ${id}`).toBeGreaterThan(10);
  });

  it('connections=3 to a server that takes two clients: the third never connects and holds no request', async (context) => {
    // limit=2: a third client is turned away. delay-open: the guest's first requests arrive before any
    // connection is up; those that wait on the one turned away move to one that comes up (which one the
    // server turns away varies from run to run; test/integration/nbd-transport.test.ts pins it).
    const { nbdSocket } = await nbdkitInDir(context, () => [
      '--filter=limit',
      '--filter=delay',
      'memory',
      '16M',
      'limit=2',
      'delay-open=300ms',
    ]);
    // A short reconnect timeout: a request left on the connection that never comes up would fail within it.
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',connections=3,reconnect-timeout=2', [
      '--threads',
      '1',
      ...METRICS_ARGS,
    ]);
    const base = await metricsUrl(daemon);
    const result = await bench(verifyArgs(daemon.socketPath, { size: '2M', bs: '16k', iodepth: 16, seed: 13 }));
    expectVerified(result, daemon);
    // The third connection is reported down (it keeps trying, with backoff); the disk serves on.
    await daemon.waitForLog((l) => l.msg === 'network back-end' && /NBD connection lost \(3 connections\)/.test(String(l['reason'])));
    // And counted: two connections made, the third's attempts failed, no request waited for it until the timeout.
    const m = await scrape(base);
    expect(diskTotal(m, 'vublk_backend_connects_total')).toBeGreaterThanOrEqual(2);
    expect(diskTotal(m, 'vublk_backend_connect_failures_total')).toBeGreaterThanOrEqual(1);
    expect(diskTotal(m, 'vublk_backend_requests_timed_out_total')).toBe(0);
  });

  it('connections=4 where the server does not advertise multi-conn: one connection, and a warning says so', async (context) => {
    const { work, nbdSocket } = await nbdkitInDir(context, (work) => [
      '--filter=multi-conn',
      '--filter=log',
      'memory',
      '16M',
      'multi-conn-mode=disable',
      `logfile=${path.join(work, 'nbdkit.log')}`,
    ]);
    const logFile = path.join(work, 'nbdkit.log');
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',connections=4,num-queues=2', ['--threads', '2']);
    const ready = await daemon.waitForLog((l) => l.msg === 'disk ready');
    expect(ready['nbdConnections']).toBe(1);
    expect(ready['queuesPinned']).toBe(true);
    expect(daemon.logs().some((l) => l.level === 40 && String(l.msg).includes('does not advertise multi-conn'))).toBe(true);
    const result = await bench(verifyArgs(daemon.socketPath, { size: '2M', bs: '16k', queues: 2, iodepth: 8, seed: 12 }));
    expectVerified(result, daemon);
    expect([...requestsPerConnection(logFile).keys()].length).toBe(1);
  });

  it('injected EIO (nbdkit error filter) becomes IOERR and io_errors; the daemon stays up and serves on', async (context) => {
    requireTool(context, 'nbdkit');
    const work = dir();
    const nbdSocket = path.join(work, 'nbd.sock');
    const trigger = path.join(work, 'fail-reads');
    await keep(
      startNbdkit({ unix: nbdSocket }, [
        '--filter=error',
        'memory',
        '16M',
        'error-pread=EIO',
        'error-pread-rate=100%',
        `error-pread-file=${trigger}`,
      ]),
    );
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, '', [...METRICS_ARGS]);
    const base = await metricsUrl(daemon);
    // Writes work; while the trigger file exists every read fails.
    const written = await bench(verifyArgs(daemon.socketPath, { size: '1M', bs: '4k', iodepth: 4, seed: 11 }));
    expectVerified(written, daemon);
    writeFileSync(trigger, '');
    const failing = await bench(verifyArgs(daemon.socketPath, { size: '1M', bs: '4k', seed: 11, only: true }));
    expect(failing.code, failing.stdout + failing.stderr).not.toBe(0);
    const counts = queueCounts(await scrape(base), 0);
    expect(counts.ioErrors).toBeGreaterThan(0);
    expect(daemon.running()).toBe(true);
    // The fault goes away: the same data reads back.
    const { rmSync } = await import('node:fs');
    rmSync(trigger);
    const again = await bench(verifyArgs(daemon.socketPath, { size: '1M', bs: '4k', seed: 11, only: true }));
    expectVerified(again, daemon);
  });

  it('the NBD server killed and restarted under I/O: requests wait, are resent, and nothing is lost', {
    timeout: 120_000,
  }, async (context) => {
    requireTool(context, 'qemu-nbd');
    const { image, nbdSocket, ...server } = await qemuNbdOnFile(64);
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',num-queues=2,reconnect-timeout=60', [...METRICS_ARGS]);
    const base = await metricsUrl(daemon);
    const run = bench(
      [
        '--socket',
        daemon.socketPath,
        '--verify',
        '--size',
        '48M',
        '--bs',
        '64k',
        '--queues',
        '2',
        '--iodepth',
        '8',
        '--seed',
        '21',
        '--timeout',
        '60000',
      ],
      110_000,
    );
    // Kill the server once the write pass is well under way, restart it a second later.
    const deadline = Date.now() + 60_000;
    let writesAtKill = 0;
    for (;;) {
      const counts = queueCounts(await scrape(base), 0);
      writesAtKill = counts.writes;
      if (counts.writes > 50) break;
      if (Date.now() > deadline) throw new Error(`no writes reached the disk:\n${daemon.output().slice(-2000)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    await server.kill();
    // The kill landed inside the write pass (queue 0 alone writes 384 of the 768 blocks).
    expect(writesAtKill).toBeLessThan(384);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    await server.restart();
    const result = await run;
    expectVerified(result, daemon);
    const m = await scrape(base);
    const counts = queueCounts(m, 0);
    expect(counts.ioErrors).toBe(0);
    // The operator saw it: the connection was lost, then came back (each worker's connection says so once).
    await daemon.waitForLog((l) => l.msg === 'network back-end' && /NBD connection lost/.test(String(l['reason'])));
    await daemon.waitForLog((l) => l.msg === 'network back-end' && /NBD connection up again/.test(String(l['reason'])));
    // And counted: connections lost, and made again (each worker's queue finished its writes on one); the
    // writes on the wire at the kill went again.
    const lost = diskTotal(m, 'vublk_backend_connections_lost_total');
    expect(lost).toBeGreaterThanOrEqual(1);
    expect(diskTotal(m, 'vublk_backend_connects_total')).toBeGreaterThan(lost);
    expect(diskTotal(m, 'vublk_backend_requests_resent_total') + diskTotal(m, 'vublk_backend_requests_handed_over_total')).toBeGreaterThan(
      0,
    );
    expect(diskTotal(m, 'vublk_backend_requests_timed_out_total')).toBe(0);
    expectImageHolds(image, 21, 48 * MiB);
  });

  it('a server away longer than reconnect-timeout: requests fail with IOERR, and the disk recovers when it returns', {
    timeout: 90_000,
  }, async (context) => {
    requireTool(context, 'qemu-nbd');
    const { image, nbdSocket, ...server } = await qemuNbdOnFile(16);
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',reconnect-timeout=1', [...METRICS_ARGS]);
    const base = await metricsUrl(daemon);
    expectVerified(await bench(verifyArgs(daemon.socketPath, { size: '1M', bs: '4k', seed: 61 })), daemon);
    await server.kill();
    const failing = await bench([...verifyArgs(daemon.socketPath, { size: '1M', bs: '4k', seed: 61, only: true }), '--timeout', '20000']);
    expect(failing.code, failing.stdout + failing.stderr).not.toBe(0);
    const m = await scrape(base);
    expect(queueCounts(m, 0).ioErrors).toBeGreaterThan(0);
    // The requests that waited out reconnect-timeout are counted as such, beside the failed attempts.
    expect(diskTotal(m, 'vublk_backend_requests_timed_out_total')).toBeGreaterThan(0);
    expect(diskTotal(m, 'vublk_backend_requests_timed_out_total')).toBeLessThanOrEqual(diskTotal(m, 'vublk_io_errors_total'));
    expect(diskTotal(m, 'vublk_backend_connect_failures_total')).toBeGreaterThan(0);
    expect(daemon.running()).toBe(true);
    await server.restart();
    // Reconnect attempts continue (backoff up to 2 s): the first requests after the return may still fail.
    const deadline = Date.now() + 30_000;
    for (;;) {
      const again = await bench([...verifyArgs(daemon.socketPath, { size: '1M', bs: '4k', seed: 61, only: true }), '--timeout', '20000']);
      if (again.code === 0) break;
      if (Date.now() > deadline)
        throw new Error(`the disk did not recover:\n${again.stdout}${again.stderr}\n${daemon.output().slice(-2000)}`);
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  });

  it('vublk_backend_connections_down follows the connections of an attached disk, each counted once', async (context) => {
    requireTool(context, 'qemu-nbd');
    const { image, nbdSocket, ...server } = await qemuNbdOnFile(16);
    // Two queues on one worker share its two connections: the disk has two, whichever queues report them.
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`, ',num-queues=2,connections=2,reconnect-timeout=60', [
      '--threads',
      '1',
      ...METRICS_ARGS,
    ]);
    const base = await metricsUrl(daemon);
    const frontend = await VhostUserFrontend.connect(daemon.socketPath, { timeoutMs: 30_000, numQueues: 2 });
    cleanups.push(() => frontend.close());
    const driver = new VirtioBlkDriver(frontend);
    await driver.write(0, Buffer.alloc(4096, 0x11), { queue: 0 });
    await driver.write(8, Buffer.alloc(4096, 0x22), { queue: 1 });
    await expectConnectionsDown(base, 0);
    await server.kill();
    await expectConnectionsDown(base, 2);
    const perQueue = select(await scrape(base), 'vublk_backend_connections_down', { disk: 'disk0' }).map((sample) => sample.value);
    expect(perQueue.sort(), 'one queue of the worker carries the gauge').toEqual([0, 2]);
    await server.restart();
    await expectConnectionsDown(base, 0);
    expect((await driver.read(8, 4096, { queue: 1 })).equals(Buffer.alloc(4096, 0x22))).toBe(true);
    // The server goes again and the front-end leaves while it is away: the worker closes the connections,
    // and the queue that carried them stops counting them.
    await server.kill();
    await expectConnectionsDown(base, 2);
    frontend.close();
    await expectConnectionsDown(base, 0);
  }, 60_000);

  it('a memory table sent while a read waits longer than the ring can: the old mapping stays until the session ends, and the late read lands in guest memory', async (context) => {
    // Reads take 8 s: longer than the 5 s a ring waits for its requests before it re-maps without them.
    const { nbdSocket } = await nbdkitInDir(context, (work) => {
      const image = path.join(work, 'disk.raw');
      writeFileSync(image, '');
      truncateSync(image, 4 * MiB);
      return ['--filter=delay', 'file', image, 'delay-read=8', 'delay-write=0'];
    });
    const daemon = await serveNbd(`nbd+unix:///?socket=${nbdSocket}`);
    const frontend = await VhostUserFrontend.connect(daemon.socketPath, { timeoutMs: 30_000 });
    cleanups.push(() => frontend.close());
    const driver = new VirtioBlkDriver(frontend);
    const data = Buffer.alloc(64 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    await driver.write(16, data);
    const since = daemon.logs().length;
    const read = driver.executeAll([{ type: BlkRequestType.IN, sector: 16, inLength: data.length }], { timeoutMs: 30_000 });
    await new Promise((r) => setTimeout(r, 300));
    // The same regions again (QEMU re-sends the whole table on any change): each is mapped anew, and the old
    // mapping, which the read in flight points into, must not go away under it.
    await frontend.setMemTable();
    const [completion] = await read;
    expect(daemon.running(), 'the daemon survived the read finishing into the old mapping').toBe(true);
    expect(completion!.status).toBe(BlkStatus.OK);
    expect(completion!.data.equals(data), 'the late read reached the guest').toBe(true);
    expect(
      daemon
        .logs()
        .slice(since)
        .some((line) => /requests left in flight/.test(String(line.msg))),
    ).toBe(true);
    // The disk goes on serving.
    await driver.write(64, Buffer.alloc(4096, 0x42));
    expect((await driver.read(64, 4096)).equals(Buffer.alloc(4096, 0x42))).toBe(true);
  }, 60_000);

  it('start-up errors name the cause: no server, no such export', async (context) => {
    requireTool(context, 'qemu-nbd');
    const work = dir();
    const socket = path.join(work, 'vublk.sock');
    const nobody = await startDaemon({
      rawArgs: ['serve', '--disk', `image=nbd+unix:///x?socket=${path.join(work, 'none.sock')},socket=${socket},connect-timeout=2`],
      waitForSocket: false,
    });
    cleanups.push(async () => {
      await nobody.stop();
    });
    const code = await nobody.exited(20_000);
    expect(code).not.toBe(0);
    expect(nobody.output()).toMatch(/unreachable/);

    const nbdSocket = path.join(work, 'nbd.sock');
    const image = path.join(work, 'disk.raw');
    writeFileSync(image, '');
    truncateSync(image, MiB);
    await keep(startQemuNbd({ unix: nbdSocket }, image, ['-x', 'only']));
    const wrong = await startDaemon({
      rawArgs: ['serve', '--disk', `image=nbd+unix:///other?socket=${nbdSocket},socket=${socket}`],
      waitForSocket: false,
    });
    cleanups.push(async () => {
      await wrong.stop();
    });
    const code2 = await wrong.exited(20_000);
    expect(code2).not.toBe(0);
    expect(wrong.output()).toMatch(/no export 'other'/);
  });
});
