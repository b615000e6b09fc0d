/**
 * Cache modes, block devices and host I/O errors against the real daemon (`npm run build` first), with
 * each request engine:
 * - cache=none on a file on a disk file system: the image fd is O_DIRECT, data written through unaligned
 *   guest buffers (the test front-end puts data right after the 16-byte header) lands in the file and
 *   reads back, and vublk_bounce_requests_total counts the bounced requests; cache=none on tmpfs is refused
 *   with a clear error.
 * - directsync: O_DIRECT + O_DSYNC and the write cache advertised off; unsafe: FLUSH answers OK.
 * - a loop block device (4096-byte sectors) as the image: size from BLKGETSIZE64, the logical block size
 *   raised to the device's, DISCARD / WRITE_ZEROES through BLKDISCARD / BLKZEROOUT.
 * - ENOSPC (image on a 1 MiB tmpfs) and EIO (a device-mapper `error` device): IOERR, counted in
 *   vublk_io_errors_total, and the daemon keeps serving.
 * Root-only parts (losetup, mount, dmsetup) skip with a reason when not root or the tool is missing.
 */
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  readlinkSync,
  rmSync,
  writeFileSync,
  constants,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlkStatus, SECTOR_SIZE } from '../../protocol/virtio-blk.js';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { probeIoUring } from '../../src/sys/io-uring.js';
import { startDaemon, waitForSocketFile, type DaemonProcess } from '../support/daemon-process.js';
import { METRICS_ARGS, metricsUrl, scrape } from '../support/metrics-scrape.js';
import { select } from '../support/prom-text.js';
import { directIoDir } from '../support/host-disk.js';

const MiB = 1024 * 1024;
const uringUnavailable = probeIoUring();
const directDir = directIoDir();
const isRoot = process.getuid?.() === 0;
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';

function has(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Why the test cannot run here; a missing tool is the only reason VUBLK_E2E_REQUIRED=1 turns into a failure. */
function skipReason(needs: { root?: boolean; tools?: string[]; direct?: boolean }): string | null {
  for (const tool of needs.tools ?? []) if (!has(tool)) return `${tool} is not installed`;
  if (needs.root && !isRoot) return 'optional: needs root';
  if (needs.direct && directDir === null) return 'optional: no file system here accepts O_DIRECT';
  return null;
}

/** Skips the running test with `reason` (fails instead under VUBLK_E2E_REQUIRED=1). */
function need(ctx: { skip: (note?: string) => void }, reason: string | null): void {
  if (reason === null) return;
  if (required && !reason.startsWith('optional:')) throw new Error(`VUBLK_E2E_REQUIRED=1 but ${reason}`);
  ctx.skip(reason);
}

const cleanups: (() => Promise<unknown> | void)[] = [];
const finalCleanups: (() => void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});
afterAll(() => {
  for (const cleanup of finalCleanups.splice(0).reverse()) {
    try {
      cleanup();
    } catch (error) {
      console.warn(`cleanup failed: ${(error as Error).message}`);
    }
  }
});

async function serve(
  image: string,
  args: string[],
  size?: string,
  queueSize?: number,
): Promise<{ daemon: DaemonProcess; blk: VirtioBlkDriver; fe: VhostUserFrontend }> {
  const socketDir = mkdtempSync(path.join(os.tmpdir(), 'vublk-cache-'));
  cleanups.push(() => rmSync(socketDir, { recursive: true, force: true }));
  const socket = path.join(socketDir, 'vublk.sock');
  const daemon = await startDaemon({
    rawArgs: ['serve', '--socket', socket, '--image', image, ...(size ? ['--size', size] : []), ...METRICS_ARGS, ...args],
    waitForSocket: false,
  });
  cleanups.push(() => daemon.stop());
  await waitForSocketFile(daemon, socket);
  const fe = await VhostUserFrontend.connect(socket, {
    numQueues: 1,
    timeoutMs: 20_000,
    requireInterrupts: false,
    ...(queueSize ? { queueSize } : {}),
  });
  cleanups.push(() => fe.close());
  return { daemon, blk: new VirtioBlkDriver(fe), fe };
}

/** open(2) flags of the daemon's fd for `image`, from /proc/PID/fdinfo. */
function imageFdFlags(daemon: DaemonProcess, image: string): number {
  const pid = daemon.child.pid!;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target = '';
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue;
    }
    if (target === image) return parseInt(/flags:\s*(\d+)/.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))![1]!, 8);
  }
  throw new Error(`the daemon has no fd open on ${image}`);
}

async function counter(daemon: DaemonProcess, name: string): Promise<number> {
  const m = await scrape(await metricsUrl(daemon));
  return select(m, name, { disk: 'disk0' }).reduce((sum, s) => sum + s.value, 0);
}

function pattern(length: number, seed: number): Buffer {
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) data.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
  return data;
}

const engines = [
  ['io_uring', uringUnavailable !== null],
  ['sync', false],
] as const;

describe.each(engines)('--io-engine %s', (engine, noEngine) => {
  it.skipIf(noEngine)('cache=none: O_DIRECT image, unaligned guest buffers bounce (counted), data lands and reads back', async (ctx) => {
    need(ctx, skipReason({ direct: true }));
    const dir = mkdtempSync(path.join(directDir!, 'vublk-none-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const image = path.join(dir, 'disk.img');
    const { daemon, blk } = await serve(image, ['--io-engine', engine, '--cache', 'none'], '16M');
    expect(imageFdFlags(daemon, image) & constants.O_DIRECT).toBe(constants.O_DIRECT);
    const writes = Array.from({ length: 32 }, (_, i) => ({ sector: i * 256, data: pattern(4096 * (1 + (i % 8)), i) }));
    const subs = writes.map((w, i) => blk.submit({ type: 1, sector: w.sector, out: w.data }, { kick: false, dataSegments: 1 + (i % 3) }));
    blk.kick(0);
    const done = await blk.wait(subs, 20_000);
    expect(done.map((c) => c.status)).toEqual(writes.map(() => BlkStatus.OK));
    expect(await blk.flush()).toBe(BlkStatus.OK);
    for (const w of writes) expect((await blk.read(w.sector, w.data.length, { dataSegments: 2 })).equals(w.data)).toBe(true);
    const file = readFileSync(image);
    for (const w of writes) expect(file.subarray(w.sector * SECTOR_SIZE, w.sector * SECTOR_SIZE + w.data.length).equals(w.data)).toBe(true);
    expect(await counter(daemon, 'vublk_bounce_requests_total')).toBeGreaterThanOrEqual(writes.length);
    expect(await counter(daemon, 'vublk_io_errors_total')).toBe(0);
  });

  it.skipIf(noEngine)('directsync: O_DIRECT + O_DSYNC, write cache advertised off; unsafe: FLUSH answers OK', async (ctx) => {
    need(ctx, skipReason({ direct: true }));
    const dir = mkdtempSync(path.join(directDir!, 'vublk-dsync-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const image = path.join(dir, 'disk.img');
    const { daemon, blk, fe } = await serve(image, ['--io-engine', engine, '--cache', 'directsync'], '8M');
    const flags = imageFdFlags(daemon, image);
    expect(flags & constants.O_DIRECT).toBe(constants.O_DIRECT);
    expect(flags & constants.O_DSYNC).toBe(constants.O_DSYNC);
    expect(fe.blkConfig?.writeback).toBe(0);
    const data = pattern(65536, 7);
    await blk.write(64, data);
    expect((await blk.read(64, data.length)).equals(data)).toBe(true);

    const unsafeImage = path.join(dir, 'unsafe.img');
    const unsafe = await serve(unsafeImage, ['--io-engine', engine, '--cache', 'unsafe'], '8M');
    expect(imageFdFlags(unsafe.daemon, unsafeImage) & constants.O_DIRECT).toBe(0);
    expect(unsafe.fe.blkConfig?.writeback).toBe(1);
    await unsafe.blk.write(0, data);
    expect(await unsafe.blk.flush()).toBe(BlkStatus.OK);
    expect((await unsafe.blk.read(0, data.length)).equals(data)).toBe(true);
  });

  it.skipIf(noEngine)(
    'a loop block device: size from the device, 4096-byte sectors, DISCARD and WRITE_ZEROES through the ioctls',
    async (ctx) => {
      need(ctx, skipReason({ root: true, tools: ['losetup'], direct: true }));
      const dir = mkdtempSync(path.join(directDir!, 'vublk-loop-'));
      finalCleanups.push(() => rmSync(dir, { recursive: true, force: true }));
      const backing = path.join(dir, 'backing.img');
      writeFileSync(backing, pattern(12 * MiB, 3));
      const device = execFileSync('losetup', ['-f', '--show', '--sector-size', '4096', backing], { encoding: 'utf8' }).trim();
      finalCleanups.push(() => execFileSync('losetup', ['-d', device]));
      for (const cache of ['none', 'writeback'] as const) {
        const { daemon, blk, fe } = await serve(device, ['--io-engine', engine, '--cache', cache]);
        expect(fe.blkConfig?.capacity).toBe((12 * MiB) / SECTOR_SIZE);
        expect(fe.blkConfig?.blkSize).toBe(4096);
        expect(imageFdFlags(daemon, device) & constants.O_DIRECT).toBe(cache === 'none' ? constants.O_DIRECT : 0);
        const data = pattern(128 * 1024, cache === 'none' ? 11 : 12);
        await blk.write(2048, data);
        expect((await blk.read(2048, data.length)).equals(data)).toBe(true);
        expect(await blk.writeZeroes([{ sector: 2048, numSectors: 64, flags: 0 }])).toBe(BlkStatus.OK);
        const expected = Buffer.from(data);
        expected.fill(0, 0, 64 * SECTOR_SIZE);
        expect((await blk.read(2048, data.length)).equals(expected)).toBe(true);
        expect(await blk.discard([{ sector: 4096, numSectors: 64, flags: 0 }])).toBe(BlkStatus.OK);
        expect(await blk.flush()).toBe(BlkStatus.OK);
        expect(await counter(daemon, 'vublk_io_errors_total')).toBe(0);
        for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
      }
    },
  );

  it.skipIf(noEngine)('ENOSPC (image on a 1 MiB tmpfs): IOERR, counted, the daemon keeps serving', async (ctx) => {
    need(ctx, skipReason({ root: true, tools: ['mount', 'umount'] }));
    const mountPoint = mkdtempSync(path.join(os.tmpdir(), 'vublk-enospc-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1M', 'tmpfs', mountPoint]);
    finalCleanups.push(() => rmSync(mountPoint, { recursive: true, force: true }));
    finalCleanups.push(() => execFileSync('umount', [mountPoint]));
    const { daemon, blk } = await serve(path.join(mountPoint, 'disk.img'), ['--io-engine', engine], '8M');
    const subs = Array.from({ length: 16 }, (_, i) =>
      blk.submit({ type: 1, sector: i * 256, out: pattern(128 * 1024, i) }, { kick: false }),
    );
    blk.kick(0);
    const statuses = (await blk.wait(subs, 20_000)).map((c) => c.status);
    const failed = statuses.filter((s) => s === BlkStatus.IOERR).length;
    expect(failed).toBeGreaterThan(0);
    expect(statuses.every((s) => s === BlkStatus.OK || s === BlkStatus.IOERR)).toBe(true);
    expect(await counter(daemon, 'vublk_io_errors_total')).toBe(failed);
    // Still serving: a read of what fitted, and a GET_ID.
    expect((await blk.getId()).status).toBe(BlkStatus.OK);
    expect((await blk.read(0, 4096)).length).toBe(4096);
    expect(daemon.running()).toBe(true);
  });

  it.skipIf(noEngine)('EIO (a device-mapper error device): IOERR, counted, the daemon keeps serving', async (ctx) => {
    need(ctx, skipReason({ root: true, tools: ['dmsetup'] }));
    need(ctx, existsSync('/dev/mapper/control') ? null : 'optional: no /dev/mapper/control (device-mapper unavailable)');
    const name = `vublk-eio-${process.pid}-${engine}`;
    try {
      execFileSync('dmsetup', ['create', name, '--table', '0 16384 error'], { stdio: 'pipe' });
    } catch (error) {
      need(ctx, `optional: dmsetup create failed: ${(error as Error).message.split('\n')[0]}`);
    }
    finalCleanups.push(() => execFileSync('dmsetup', ['remove', name]));
    const device = `/dev/mapper/${name}`;
    const { daemon, blk } = await serve(device, ['--io-engine', engine]);
    const read = await blk.execute({ type: 0, sector: 0, inLength: 4096 });
    const write = await blk.execute({ type: 1, sector: 8, out: pattern(4096, 1) });
    expect([read.status, write.status]).toEqual([BlkStatus.IOERR, BlkStatus.IOERR]);
    expect(await counter(daemon, 'vublk_io_errors_total')).toBe(2);
    expect((await blk.getId()).status).toBe(BlkStatus.OK);
    expect(daemon.running()).toBe(true);
  });
});

describe('GET_VRING_BASE with requests in flight (asynchronous engine, O_DIRECT)', () => {
  it.skipIf(uringUnavailable !== null)(
    'answers only once every popped request is published: used.idx equals the index it reports',
    async (ctx) => {
      need(ctx, skipReason({ direct: true }));
      const dir = mkdtempSync(path.join(directDir!, 'vublk-stop-'));
      cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
      const image = path.join(dir, 'disk.img');
      writeFileSync(image, pattern(32 * MiB, 5));
      const { blk, fe } = await serve(image, ['--io-engine', 'io_uring', '--cache', 'none'], undefined, 1024);
      let popped = 0;
      for (let round = 0; round < 5; round++) {
        const subs = Array.from({ length: 64 }, (_, i) =>
          blk.submit({ type: 0, sector: ((round * 64 + i) % 256) * 128, inLength: 64 * 1024 }, { kick: false }),
        );
        blk.kick(0);
        const before = fe.queue(0).ring.usedIdx;
        const base = await fe.stopQueue(0);
        popped += base - before;
        // Everything the worker popped before the stop was completed and published before it answered.
        expect(fe.queue(0).ring.usedIdx).toBe(base);
        expect(base).toBeLessThanOrEqual(fe.queue(0).ring.availIdx);
        fe.queue(0).reset(base);
        await fe.startQueue(0, base);
        void subs;
      }
      console.log(`[GET_VRING_BASE] ${popped} requests were popped before the stops and all were published`);
    },
  );
});

describe('--poll-us', () => {
  it.skipIf(uringUnavailable !== null)('serves with adaptive polling, and an idle daemon sleeps (every thread blocked)', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-poll-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const { daemon, blk } = await serve(path.join(dir, 'disk.img'), ['--io-engine', 'io_uring', '--poll-us', '500'], '8M');
    for (let i = 0; i < 20; i++) {
      const data = pattern(8192, i);
      await blk.write(i * 16, data);
      expect((await blk.read(i * 16, data.length)).equals(data)).toBe(true);
    }
    // Polling ends after 500 µs without work: soon every thread of the daemon is asleep at the same moment.
    const pid = daemon.child.pid!;
    const states = (): string[] =>
      readdirSync(`/proc/${pid}/task`).map((tid) => {
        try {
          return readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8').replace(/^.*\) /s, '')[0] ?? '?';
        } catch {
          return 'S';
        }
      });
    let allAsleep = false;
    for (let attempt = 0; attempt < 100 && !allAsleep; attempt++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      allAsleep = states().every((state) => state === 'S' || state === 'D');
    }
    expect(allAsleep, `thread states: ${states().join('')}`).toBe(true);
  });
});

describe('cache=none where O_DIRECT is refused', () => {
  it('tmpfs: the daemon exits with an error that names O_DIRECT and the fix', async (ctx) => {
    need(ctx, skipReason({ root: true, tools: ['mount', 'umount'] }));
    const mountPoint = mkdtempSync(path.join(os.tmpdir(), 'vublk-tmpfs-'));
    mkdirSync(mountPoint, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4M', 'tmpfs', mountPoint]);
    finalCleanups.push(() => rmSync(mountPoint, { recursive: true, force: true }));
    finalCleanups.push(() => execFileSync('umount', [mountPoint]));
    // tmpfs learned O_DIRECT in Linux 6.6; on such kernels there is nothing to refuse here.
    const probe = path.join(mountPoint, 'probe');
    writeFileSync(probe, Buffer.alloc(4096));
    let accepts = false;
    try {
      closeSync(openSync(probe, constants.O_RDWR | constants.O_DIRECT));
      accepts = true;
    } catch {
      accepts = false;
    }
    if (accepts) need(ctx, 'optional: tmpfs accepts O_DIRECT on this kernel (Linux >= 6.6)');
    const socket = path.join(mountPoint, 'vublk.sock');
    const daemon = await startDaemon({
      rawArgs: ['serve', '--socket', socket, '--image', path.join(mountPoint, 'disk.img'), '--size', '1M', '--cache', 'none'],
      waitForSocket: false,
    });
    cleanups.push(() => daemon.stop());
    const deadline = Date.now() + 15_000;
    while (daemon.running() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(daemon.running()).toBe(false);
    expect(daemon.output()).toMatch(/O_DIRECT.*refuses/);
  });
});
