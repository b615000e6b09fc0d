/**
 * qcow2 through the real daemon (`npm run build` first) with the TS front-end, under $VUBLK_IO_ENGINE:
 * - a seeded random workload (writes of random sizes and offsets, discards, write-zeroes with and without
 *   unmap, flushes; batches of non-overlapping requests spread over the queues) on 1 and 2 queues, with
 *   and without a backing file, cluster sizes 4 KiB / 64 KiB / 2 MiB. The same workload goes to a raw image
 *   through vublk. After a clean stop: `qemu-img check` reports no errors and no leaks, `qemu-img compare`
 *   finds the qcow2 and the raw image identical, and qemu-storage-daemon serving the qcow2 returns the
 *   raw image's bytes.
 * - compressed (`convert -c`) and snapshotted images read back through vublk exactly what
 *   `qemu-img convert -O raw` gives.
 * - live resize through the admin API grows the qcow2 (L1) and the guest can write past the old end.
 * - malformed images → a clear start error naming the problem, never a crash.
 *   QCOW2_DAEMON_SEED replays a workload.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlkStatus, SECTOR_SIZE, encodeDiscardSegment } from '../../protocol/virtio-blk.js';
import { VhostUserFrontend, VirtioBlkDriver, QemuStorageDaemon, type BlkSubmission } from '../../bench/src/frontend/index.js';
import { startDaemon, waitForSocketFile, type DaemonProcess } from '../support/daemon-process.js';
import { hasQemuImg } from '../support/qcow2-harness.js';
import { Prng, seedFromEnv } from '../support/prng.js';
import { QSD_BINARY } from '../frontend/qsd-harness.js';
import { directIoDir } from '../support/host-disk.js';
import http from 'node:http';

const KiB = 1024;
const MiB = 1024 * KiB;
const SEED = seedFromEnv('QCOW2_DAEMON_SEED');
const DISK = 24 * MiB;
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';

const QEMU_IMG = hasQemuImg();
function needQemuImg(ctx: { skip: (note?: string) => void }): void {
  if (QEMU_IMG) return;
  if (required) throw new Error('VUBLK_E2E_REQUIRED=1 but qemu-img is not installed');
  ctx.skip('qemu-img is not installed');
}

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function tempDir(): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2d-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

interface Served {
  daemon: DaemonProcess;
  fe: VhostUserFrontend;
  blk: VirtioBlkDriver;
}

async function serve(image: string, format: 'raw' | 'qcow2' | null, queues: number, extra: string[] = []): Promise<Served> {
  const socket = path.join(path.dirname(image), `${path.basename(image)}.sock`);
  const daemon = await startDaemon({
    rawArgs: [
      'serve',
      '--socket',
      socket,
      '--image',
      image,
      '--num-queues',
      String(queues),
      ...(format === null ? [] : ['--format', format]),
      ...extra,
    ],
    waitForSocket: false,
  });
  cleanups.push(() => daemon.stop());
  await waitForSocketFile(daemon, socket);
  const fe = await VhostUserFrontend.connect(socket, { numQueues: queues, timeoutMs: 30_000, requireInterrupts: false });
  cleanups.push(() => fe.close());
  return { daemon, fe, blk: new VirtioBlkDriver(fe) };
}

type Op =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'zeroes'; offset: number; length: number; unmap: boolean }
  | { kind: 'flush' };

/** Batches of requests whose ranges do not overlap (so the result does not depend on completion order). */
function workload(seed: number, clusterSize: number, batches: number): Op[][] {
  const rng = new Prng(seed);
  const out: Op[][] = [];
  const sectors = DISK / SECTOR_SIZE;
  for (let b = 0; b < batches; b++) {
    const batch: Op[] = [];
    const taken: [number, number][] = [];
    const free = (offset: number, length: number): boolean => taken.every(([o, l]) => offset + length <= o || o + l <= offset);
    const n = rng.int(1, 8);
    for (let i = 0; i < n; i++) {
      const roll = rng.int(0, 99);
      if (roll < 70) {
        const length = rng.int(1, rng.chance(0.2) ? 1024 : 64) * SECTOR_SIZE;
        const offset = rng.int(0, sectors - length / SECTOR_SIZE) * SECTOR_SIZE;
        if (!free(offset, length)) continue;
        taken.push([offset, length]);
        const data = Buffer.alloc(length);
        rng.fill(data);
        batch.push({ kind: 'write', offset, data });
      } else if (roll < 80) {
        // Whole clusters: a partial-cluster discard is advisory in qcow2 (kept) but punched in a raw file.
        const clusters = DISK / clusterSize;
        const count = rng.int(1, Math.max(1, Math.min(4, clusters >> 2)));
        const first = rng.int(0, clusters - count);
        const offset = first * clusterSize;
        const length = count * clusterSize;
        if (!free(offset, length)) continue;
        taken.push([offset, length]);
        batch.push({ kind: 'discard', offset, length });
      } else if (roll < 92) {
        const length = rng.int(1, 512) * SECTOR_SIZE;
        const offset = rng.int(0, sectors - length / SECTOR_SIZE) * SECTOR_SIZE;
        if (!free(offset, length)) continue;
        taken.push([offset, length]);
        batch.push({ kind: 'zeroes', offset, length, unmap: rng.chance(0.5) });
      } else {
        batch.push({ kind: 'flush' });
      }
    }
    if (batch.length > 0) out.push(batch);
  }
  return out;
}

async function run(served: Served, ops: Op[][], queues: number): Promise<void> {
  const { blk } = served;
  let q = 0;
  for (const batch of ops) {
    const subs: BlkSubmission[] = [];
    const kicked = new Set<number>();
    for (const op of batch) {
      const queue = q++ % queues;
      kicked.add(queue);
      const options = { kick: false, queue, dataSegments: 1 + (q % 3) };
      switch (op.kind) {
        case 'write':
          subs.push(blk.submit({ type: 1, sector: op.offset / SECTOR_SIZE, out: op.data }, options));
          break;
        case 'discard':
          subs.push(
            blk.submit(
              { type: 11, out: encodeDiscardSegment({ sector: op.offset / SECTOR_SIZE, numSectors: op.length / SECTOR_SIZE, flags: 0 }) },
              { kick: false, queue },
            ),
          );
          break;
        case 'zeroes':
          subs.push(
            blk.submit(
              {
                type: 13,
                out: encodeDiscardSegment({
                  sector: op.offset / SECTOR_SIZE,
                  numSectors: op.length / SECTOR_SIZE,
                  flags: op.unmap ? 1 : 0,
                }),
              },
              { kick: false, queue },
            ),
          );
          break;
        case 'flush':
          subs.push(blk.submit({ type: 4 }, { kick: false, queue }));
          break;
      }
    }
    for (const queue of kicked) blk.kick(queue);
    const done = await blk.wait(subs, 60_000);
    const bad = done.filter((c) => c.status !== BlkStatus.OK);
    if (bad.length > 0)
      throw new Error(
        `seed ${SEED}: ${bad.length} requests failed (status ${bad[0]!.status}); daemon output:\n${served.daemon.output().slice(-3000)}`,
      );
  }
}

async function readAll(blk: VirtioBlkDriver, size: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let at = 0; at < size; at += MiB) parts.push(await blk.read(at / SECTOR_SIZE, Math.min(MiB, size - at), { dataSegments: 3 }));
  return Buffer.concat(parts);
}

function checkClean(image: string): void {
  const report = JSON.parse(qemuImg('check', '--output=json', image)) as Record<string, unknown>;
  expect(report['corruptions'] ?? 0, JSON.stringify(report)).toBe(0);
  expect(report['leaks'] ?? 0, JSON.stringify(report)).toBe(0);
  expect(report['check-errors'] ?? 0, JSON.stringify(report)).toBe(0);
}

async function qsdBytes(image: string, size: number): Promise<Buffer> {
  const socketPath = path.join(path.dirname(image), 'qsd.sock');
  const qsd = await QemuStorageDaemon.start({ image, socketPath, format: 'qcow2', numQueues: 1, writable: false });
  try {
    const fe = await VhostUserFrontend.connect(socketPath, { numQueues: 1, timeoutMs: 30_000, requireInterrupts: false });
    try {
      return await readAll(new VirtioBlkDriver(fe), size);
    } finally {
      await fe.close();
    }
  } finally {
    await qsd.stop();
  }
}

const cases: [number, number, boolean][] = [];
for (const cluster of [4 * KiB, 64 * KiB, 2 * MiB])
  for (const queues of [1, 2]) for (const backing of [false, true]) cases.push([cluster, queues, backing]);

describe(`qcow2 through the daemon (engine ${process.env['VUBLK_IO_ENGINE'] ?? 'auto'}, seed ${SEED})`, () => {
  it.for(cases)(
    'cluster %i, %i queue(s), backing %s: check clean, compare identical to raw, qemu-storage-daemon agrees',
    { timeout: 180_000 },
    async ([cluster, queues, backing], ctx) => {
      needQemuImg(ctx);
      const dir = tempDir();
      const raw = path.join(dir, 'raw.img');
      const image = path.join(dir, 'disk.qcow2');
      if (backing) {
        const base = path.join(dir, 'base.img');
        const bytes = Buffer.alloc(DISK);
        new Prng(SEED ^ 0x5a5a).fill(bytes);
        writeFileSync(base, bytes);
        copyFileSync(base, raw);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, '-b', 'base.img', '-F', 'raw', image);
      } else {
        writeFileSync(raw, '');
        execFileSync('truncate', ['-s', String(DISK), raw]);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, image, String(DISK));
      }
      const ops = workload(SEED + cluster + queues * 7 + (backing ? 1 : 0), cluster, 60);
      // 4 KiB clusters: 12 L2 tables for the disk, a 4-table cache (l2-cache-size=16K) so they are evicted and reloaded.
      const cacheArgs = cluster === 4 * KiB ? ['--l2-cache-size', '16K'] : [];
      for (const [file, format] of [
        [raw, 'raw'],
        [image, 'qcow2'],
      ] as const) {
        const served = await serve(file, format, queues, format === 'qcow2' ? cacheArgs : []);
        await run(served, ops, queues);
        await served.fe.close();
        expect(await served.daemon.stop()).toBe(0);
      }
      checkClean(image);
      const compare = execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, raw], { encoding: 'utf8' });
      expect(compare).toContain('identical');
      if (QSD_BINARY !== null) {
        const viaQsd = await qsdBytes(image, DISK);
        expect(viaQsd.equals(readFileSync(raw))).toBe(true);
      }
    },
  );

  it.for(['none', 'writethrough', 'directsync', 'unsafe'])(
    'cache=%s (64 KiB clusters, backing, 2 queues): check clean, compare identical to raw',
    { timeout: 180_000 },
    async (cache, ctx) => {
      needQemuImg(ctx);
      const direct = cache === 'none' || cache === 'directsync';
      const base = direct ? directIoDir() : os.tmpdir();
      if (base === null) {
        ctx.skip('optional: no file system here accepts O_DIRECT');
        return;
      }
      const dir = mkdtempSync(path.join(base, 'vublk-qcow2c-'));
      cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
      const raw = path.join(dir, 'raw.img');
      const image = path.join(dir, 'disk.qcow2');
      const bytes = Buffer.alloc(DISK);
      new Prng(SEED ^ 0x77).fill(bytes);
      writeFileSync(path.join(dir, 'base.img'), bytes);
      writeFileSync(raw, bytes);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', 'base.img', '-F', 'raw', image);
      const ops = workload(SEED + 99, 65536, 40);
      for (const [file, format] of [
        [raw, 'raw'],
        [image, 'qcow2'],
      ] as const) {
        const served = await serve(file, format, 2, ['--cache', cache]);
        await run(served, ops, 2);
        // Unaligned guest buffers (the front-end puts data right after the header) bounce under O_DIRECT.
        const check = await readAll(served.blk, DISK);
        await served.fe.close();
        expect(await served.daemon.stop()).toBe(0);
        if (format === 'qcow2') expect(check.equals(readFileSync(raw))).toBe(true);
      }
      checkClean(image);
      expect(execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, raw], { encoding: 'utf8' })).toContain('identical');
    },
  );

  it('compressed and snapshotted images read back what qemu-img convert -O raw gives; writes leave the snapshot intact', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    const source = path.join(dir, 'source.img');
    const bytes = Buffer.alloc(8 * MiB);
    new Prng(SEED ^ 0x33).fill(bytes.subarray(0, 3 * MiB));
    bytes.fill(0x41, 5 * MiB, 6 * MiB);
    writeFileSync(source, bytes);
    const compressed = path.join(dir, 'compressed.qcow2');
    qemuImg('convert', '-q', '-c', '-O', 'qcow2', '-o', 'cluster_size=65536', source, compressed);
    const snap = path.join(dir, 'snap.qcow2');
    qemuImg('convert', '-q', '-O', 'qcow2', source, snap);
    qemuImg('snapshot', '-c', 's1', snap);
    for (const image of [compressed, snap]) {
      const expected = path.join(dir, 'expected.raw');
      qemuImg('convert', '-q', '-O', 'raw', image, expected);
      const served = await serve(image, 'qcow2', 1);
      expect((await readAll(served.blk, 8 * MiB)).equals(readFileSync(expected))).toBe(true);
      // Overwrite snapshot-shared / compressed clusters.
      const data = Buffer.alloc(256 * KiB, 0x77);
      await served.blk.write(MiB / SECTOR_SIZE + 3, data);
      expect((await served.blk.read(MiB / SECTOR_SIZE + 3, data.length)).equals(data)).toBe(true);
      await served.fe.close();
      expect(await served.daemon.stop()).toBe(0);
      checkClean(image);
    }
    // The snapshot still holds the original bytes.
    qemuImg('snapshot', '-a', 's1', snap);
    const after = path.join(dir, 'after.raw');
    qemuImg('convert', '-q', '-O', 'raw', snap, after);
    expect(readFileSync(after).equals(bytes)).toBe(true);
  }, 120_000);

  it('live resize through the admin API grows the image; the guest writes past the old end', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    const image = path.join(dir, 'grow.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, '8M');
    const served = await serve(image, 'qcow2', 1);
    const line = await served.daemon.waitForLog((l) => l.msg === 'admin API listening', 15_000);
    const reply = await postUnix(String(line['socket']), '/admin/disks/disk0/resize', { size: 64 * MiB });
    expect(reply.status, reply.body).toBe(200);
    const data = Buffer.alloc(64 * KiB, 0x5c);
    const deadline = Date.now() + 10_000;
    for (;;) {
      // The ring switches to the new capacity before the front-end is told; until then the write is refused.
      try {
        await served.blk.write((40 * MiB) / SECTOR_SIZE, data);
        break;
      } catch (error) {
        if (Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    expect((await served.blk.read((40 * MiB) / SECTOR_SIZE, data.length)).equals(data)).toBe(true);
    await served.fe.close();
    expect(await served.daemon.stop()).toBe(0);
    const info = JSON.parse(qemuImg('info', '--output=json', image)) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(64 * MiB);
    checkClean(image);
  }, 60_000);

  it('format probing: a raw image without format= is served raw with a warning; a probed qcow2 whose backing format is not recorded is refused', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    const raw = path.join(dir, 'plain.img');
    writeFileSync(raw, Buffer.alloc(4 * MiB, 0x11));
    const served = await serve(raw, null, 1);
    expect((await served.blk.read(0, 4096)).every((b) => b === 0x11)).toBe(true);
    expect(served.daemon.logs().some((l) => l.level === 40 && /probed 'raw'/.test(l.msg))).toBe(true);
    await served.fe.close();
    await served.daemon.stop();

    writeFileSync(path.join(dir, 'base.img'), Buffer.alloc(MiB));
    const overlay = path.join(dir, 'overlay.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.img', '-F', 'raw', overlay);
    // Turn the backing-format extension into an unknown one: the image no longer records its backing format.
    const header = readFileSync(overlay).subarray(0, 65536);
    const at = header.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    expect(at).toBeGreaterThan(0);
    patch(overlay, at, Buffer.from([0x12, 0x34, 0x56, 0x78]));
    const socket = path.join(dir, 'probe.sock');
    const daemon = await startDaemon({ rawArgs: ['serve', '--socket', socket, '--image', overlay], waitForSocket: false });
    cleanups.push(() => daemon.stop());
    const deadline = Date.now() + 15_000;
    while (daemon.running() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 25));
    expect(daemon.running()).toBe(false);
    expect(daemon.output()).toMatch(/backing/i);
    // Given explicitly, the same image is served (the backing file is probed, with a warning).
    const explicit = await serve(overlay, 'qcow2', 1);
    expect((await explicit.blk.read(0, 4096)).every((b) => b === 0)).toBe(true);
  }, 60_000);

  it('read-only: a qcow2 overlay is served read-only (reads through to the backing file, writes refused, image unchanged)', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    writeFileSync(path.join(dir, 'base.img'), Buffer.alloc(2 * MiB, 0x3c));
    const overlay = path.join(dir, 'ro.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.img', '-F', 'raw', overlay);
    const before = readFileSync(overlay);
    const served = await serve(overlay, 'qcow2', 1, ['--read-only']);
    expect((await served.blk.read(8, 4096)).every((b) => b === 0x3c)).toBe(true);
    const write = await served.blk.execute({ type: 1, sector: 0, out: Buffer.alloc(4096, 1) });
    expect(write.status).toBe(BlkStatus.IOERR);
    await served.fe.close();
    expect(await served.daemon.stop()).toBe(0);
    expect(readFileSync(overlay).equals(before)).toBe(true);
  }, 60_000);

  it('malformed images: a clear start error naming the problem, never a crash', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    const cases: [string, (image: string) => void, RegExp][] = [
      ['bad version', (image) => patch(image, 4, Buffer.from([0, 0, 0, 9])), /version|invalid|qcow2/i],
      ['huge cluster bits', (image) => patch(image, 20, Buffer.from([0, 0, 0, 30])), /cluster size/i],
      ['L1 past the end of file', (image) => patch(image, 40, Buffer.from([0, 0, 0, 0x10, 0, 0, 0, 0])), /L1|past|end of file|invalid/i],
      ['encrypted', (image) => patch(image, 32, Buffer.from([0, 0, 0, 1])), /encrypt/i],
      ['truncated', (image) => execFileSync('truncate', ['-s', '100', image]), /invalid|short|qcow2|end of file/i],
    ];
    for (const [name, damage, message] of cases) {
      const image = path.join(dir, `${name.replace(/ /g, '-')}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', image, '8M');
      damage(image);
      const socket = path.join(dir, 'bad.sock');
      const daemon = await startDaemon({
        rawArgs: ['serve', '--socket', socket, '--image', image, '--format', 'qcow2'],
        waitForSocket: false,
      });
      cleanups.push(() => daemon.stop());
      const deadline = Date.now() + 15_000;
      while (daemon.running() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 25));
      expect(daemon.running(), `${name}: daemon still running`).toBe(false);
      const output = daemon.output();
      expect(output, name).toMatch(message);
      expect(output, name).not.toMatch(/TypeError|RangeError|at .*\.js:\d+/);
    }
  }, 120_000);
});

describe('ring stop with allocating writes racing across queues of one worker', () => {
  it('GET_VRING_BASE while writes to the same fresh clusters are in flight on both queues (--threads 1): every request completes', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    const image = path.join(dir, 'race.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '64M');
    const served = await serve(image, 'qcow2', 2, ['--threads', '1']);
    const { blk, fe } = served;
    const rng = new Prng(SEED ^ 0x99);
    let cluster = 0;
    for (let round = 0; round < 8; round++) {
      const subs: BlkSubmission[] = [];
      const expected: { sector: number; data: Buffer }[] = [];
      for (let i = 0; i < 24; i++) {
        // Two queues write different 4 KiB blocks of the same unallocated cluster: one allocates, the other gets RETRY.
        const base = (cluster + (i >> 1)) * 65536;
        const sector = (base + (i & 1) * 8192 + rng.int(0, 3) * 512) / SECTOR_SIZE;
        const data = Buffer.alloc(4096, (round * 24 + i) & 0xff);
        expected.push({ sector, data });
        subs.push(blk.submit({ type: 1, sector, out: data }, { kick: false, queue: i & 1 }));
      }
      cluster += 12;
      blk.kick(0);
      blk.kick(1);
      // Stop only once the worker has popped every request (avail_event, EVENT_IDX, is re-armed at the index
      // it reached): a stop that overtook the kicks would find nothing in flight, and the requests would
      // wait for the restart below, which is not the race this test is about.
      const popped = (q: number): boolean => fe.queue(q).ring.availEvent === fe.queue(q).indices.availIdx;
      for (const deadline = Date.now() + 10_000; !(popped(0) && popped(1)); ) {
        if (Date.now() > deadline) throw new Error('the worker did not pop the kicked requests within 10 s');
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
      await fe.stopQueue(1);
      await fe.stopQueue(0);
      const done = await blk.wait(subs, 20_000);
      expect(done.every((c) => c.status === BlkStatus.OK)).toBe(true);
      await fe.startQueue(0, fe.queue(0).indices.availIdx);
      await fe.startQueue(1, fe.queue(1).indices.availIdx);
      for (const { sector, data } of expected) expect((await blk.read(sector, data.length)).equals(data)).toBe(true);
    }
    expect(served.daemon.output()).not.toMatch(/still in flight/);
    await fe.close();
    expect(await served.daemon.stop()).toBe(0);
    checkClean(image);
  }, 120_000);
});

describe('hostile metadata found at access', () => {
  it('an L2 entry pointing past the end of file or into metadata: IOERR for that cluster, the disk stays up', async (ctx) => {
    needQemuImg(ctx);
    const dir = tempDir();
    const image = path.join(dir, 'hostile.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', image, '8M');
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 128k', '-c', 'write -P 0x43 1M 64k', image], { stdio: 'ignore' });
    const bytes = readFileSync(image);
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00ff_ffff_ffff_fe00n);
    const copied = 1n << 63n;
    // Cluster 0 → far past the end of file; cluster 1 → the L1 table (metadata).
    const entry = (offset: bigint): Buffer => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(offset | copied);
      return b;
    };
    patch(image, l2, entry(1n << 40n));
    patch(image, l2 + 8, entry(BigInt(l1)));
    const served = await serve(image, 'qcow2', 1);
    const bad = await served.blk.execute({ type: 0, sector: 0, inLength: 4096 });
    expect(bad.status).toBe(BlkStatus.IOERR);
    const header = await served.blk.execute({ type: 0, sector: (64 * KiB) / SECTOR_SIZE, inLength: 4096 });
    expect(header.status).toBe(BlkStatus.IOERR);
    const write = await served.blk.execute({ type: 1, sector: (64 * KiB) / SECTOR_SIZE, out: Buffer.alloc(4096, 1) });
    expect(write.status).toBe(BlkStatus.IOERR);
    // Healthy clusters are still served.
    expect((await served.blk.read(MiB / SECTOR_SIZE, 4096)).every((b) => b === 0x43)).toBe(true);
    expect(served.daemon.running()).toBe(true);
    // The L1 table the hostile entry pointed at was not written to.
    expect(
      readFileSync(image)
        .subarray(l1, l1 + 8)
        .equals(bytes.subarray(l1, l1 + 8)),
    ).toBe(true);
  }, 60_000);
});

function patch(file: string, offset: number, bytes: Buffer): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

function postUnix(socketPath: string, pathname: string, body: unknown): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath, path: pathname, method: 'POST', headers: { 'content-type': 'application/json' }, timeout: 10_000 },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('timeout', () => req.destroy(new Error(`POST ${pathname}: no answer within 10 s`)));
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}
