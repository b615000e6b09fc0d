// The RBD back-end library (src/backend/rbd/) against a real single-node Ceph cluster started by
// test/support/ceph/micro-cluster.sh: aio through the eventfd + rbd_poll_io_events path with several
// requests in flight, flush, read-back and `rbd export` comparison, discard and write-zeroes, resize, the
// exclusive lock between two clients, and a clear error (never a hang) for every way opening can fail.
// Skips with the reason when Ceph is not installed, fails then under VUBLK_E2E_REQUIRED=1.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RbdImage } from '../../src/backend/rbd/rbd-image.js';
import { IovecArray, RbdQueue, type RbdSegments } from '../../src/backend/rbd/rbd-queue.js';
import { parseRbdSpec, type RbdSpecOptions } from '../../src/backend/rbd/rbd-spec.js';
import { RbdError, type RbdErrorCode } from '../../src/backend/rbd/rbd-error.js';
import { addressOf } from '../../src/sys/libc.js';
import { waitReadable } from '../../src/sys/poll-wait.js';
import { cephMissing, startMicroCluster, type MicroCluster } from '../support/ceph/micro-cluster.js';
import { rbdLockOwners, rbdWatchers } from '../support/ceph/rbd-clients.js';
import { CLI, startDaemon, type DaemonProcess } from '../support/daemon-process.js';
import { BENCH_CLI } from '../../bench/src/paths.js';
import { METRICS_ARGS, metricsUrl, scrape } from '../support/metrics-scrape.js';
import { sampleValue } from '../support/prom-text.js';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { VhostUserFrontend, VirtioBlkDriver } from '../../bench/src/frontend/index.js';
import { Prng, seedFromEnv } from '../support/prng.js';
import { runBench, verifyArgs } from '../support/bench-run.js';
import { fillPattern, patternKey } from '../../bench/src/loadgen/pattern.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 64 * MiB;
const OBJECT_SIZE = 4 * MiB;
const missing = cephMissing();
const required = process.env['VUBLK_E2E_REQUIRED'] === '1';
if (missing !== null) console.warn(`RBD tests ${required ? 'cannot run' : 'skipped'}: ${missing}`);

/** Submitted requests keep their buffers and iovec arrays here until reaped (librbd holds the pointers). */
interface Pending {
  buffers: Buffer[];
  iov?: IovecArray;
}

/** Runs `submit` for each request, then reaps until idle; returns tag -> result. */
function drive(queue: RbdQueue, submit: (pending: Map<number, Pending>) => void, timeoutMs = 60_000): Map<number, number> {
  const pending = new Map<number, Pending>();
  submit(pending);
  const results = new Map<number, number>();
  const idle = queue.waitIdle(timeoutMs, (tag, result) => {
    expect(results.has(tag), `tag ${tag} completed twice`).toBe(false);
    results.set(tag, result);
  });
  expect(idle, `requests still in flight after ${timeoutMs} ms`).toBe(true);
  expect(results.size).toBe(pending.size);
  return results;
}

/** An iovec array over `buffers` (each one entry). */
function iovOver(buffers: Buffer[]): IovecArray {
  const iov = new IovecArray(buffers.length);
  buffers.forEach((b, i) => iov.set(i, addressOf(b), b.length));
  return iov;
}

/** A segment list over `buffers` (what the data plane hands in: host addresses and lengths). */
function segmentsOf(buffers: Buffer[]): RbdSegments {
  return { count: buffers.length, addresses: buffers.map((b) => addressOf(b)), lengths: buffers.map((b) => b.length) };
}

/** Splits `length` bytes into 1..4 pieces of random sizes (multiples of 512). */
function split(prng: Prng, length: number): number[] {
  const pieces: number[] = [];
  let left = length;
  const count = prng.int(1, 4);
  for (let i = 0; i < count - 1 && left > 512; i++) {
    const len = prng.int(1, Math.max(1, left / 512 - 1)) * 512;
    pieces.push(len);
    left -= len;
  }
  pieces.push(left);
  return pieces;
}

/** Waits (bounded) until every thread of `pid` is in the stopped state: SIGSTOP is delivered asynchronously. */
async function allThreadsStopped(pid: number): Promise<void> {
  for (let attempt = 0; attempt < 200; attempt++) {
    const tasks = readdirSync(`/proc/${pid}/task`);
    const states = tasks.map((tid) => {
      try {
        const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
        return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
      } catch {
        return 'T'; // the thread exited
      }
    });
    if (states.every((state) => state === 'T' || state === 't')) return;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`process ${pid} did not stop within 2 s of SIGSTOP`);
}

async function expectOpenError(spec: ReturnType<typeof parseRbdSpec>, code: RbdErrorCode, message: RegExp): Promise<RbdError> {
  let image: RbdImage | undefined;
  try {
    image = await RbdImage.open(spec);
  } catch (error) {
    expect(error).toBeInstanceOf(RbdError);
    expect((error as RbdError).code, (error as Error).message).toBe(code);
    expect((error as Error).message).toMatch(message);
    return error as RbdError;
  }
  await image.close();
  throw new Error(`opening ${spec.pool}/${spec.image} succeeded; expected ${code}`);
}

describe('RBD back-end against a real Ceph cluster', () => {
  if (missing !== null) {
    if (required) it('Ceph is installed (VUBLK_E2E_REQUIRED=1)', () => expect.fail(missing));
    else it.skip(`Ceph not installed: ${missing}`, () => undefined);
    return;
  }

  let cluster: MicroCluster;
  const seed = seedFromEnv('VUBLK_RBD_SEED');
  /** What the image must contain: every write through the library goes here too. */
  const model = Buffer.alloc(IMAGE_SIZE);
  const opened: RbdImage[] = [];

  const options = (extra: RbdSpecOptions = {}): RbdSpecOptions => ({
    conf: cluster.conf,
    id: 'vublk',
    keyring: cluster.vublkKeyring,
    connectTimeout: '10',
    ...extra,
  });
  async function open(image = 'rbd:rbd/img1', extra: RbdSpecOptions = {}): Promise<RbdImage> {
    const handle = await RbdImage.open(parseRbdSpec(image, options(extra)));
    opened.push(handle);
    return handle;
  }
  async function close(image: RbdImage, queue?: RbdQueue): Promise<void> {
    queue?.close();
    await image.close();
    opened.splice(opened.indexOf(image), 1);
  }

  beforeAll(async () => {
    cluster = await startMicroCluster();
    await cluster.run('rbd', ['create', '--size', '64M', 'rbd/img1']);
    const usage = await cluster.usage();
    console.log(
      `micro cluster up in ${cluster.startSeconds} s; RSS mon ${usage.mon.rssKiB} KiB, mgr ${usage.mgr.rssKiB} KiB, osd ${usage.osd.rssKiB} KiB; ` +
        `CPU mon ${usage.mon.cpuSeconds} s, mgr ${usage.mgr.cpuSeconds} s, osd ${usage.osd.cpuSeconds} s; seed ${seed} (VUBLK_RBD_SEED)`,
    );
  }, 330_000);

  afterAll(async () => {
    for (const image of opened.splice(0)) await image.close().catch(() => undefined);
    if (!cluster) return;
    const usage = await cluster.usage().catch(() => undefined);
    if (usage) {
      console.log(
        `micro cluster at the end: RSS (peak) mon ${usage.mon.rssKiB} (${usage.mon.peakRssKiB}) KiB, mgr ${usage.mgr.rssKiB} (${usage.mgr.peakRssKiB}) KiB, ` +
          `osd ${usage.osd.rssKiB} (${usage.osd.peakRssKiB}) KiB; CPU mon ${usage.mon.cpuSeconds} s, mgr ${usage.mgr.cpuSeconds} s, osd ${usage.osd.cpuSeconds} s`,
      );
    }
    await cluster.stop();
  }, 120_000);

  it('opens the image with the size, object layout and lock it has in the cluster', async () => {
    const image = await open();
    expect(image.size()).toBe(IMAGE_SIZE);
    expect(image.stat()).toEqual({ size: IMAGE_SIZE, objectSize: OBJECT_SIZE, objects: IMAGE_SIZE / OBJECT_SIZE, order: 22 });
    expect(image.lockHeld).toBe(true);
    expect(image.isLockOwner()).toBe(true);
    await close(image);
  });

  it('writes patterns at random offsets with many requests in flight, flushes, reads back and matches rbd export', async () => {
    const prng = new Prng(seed);
    const image = await open();
    const queue = new RbdQueue(image.handle, image.eventFd);
    for (let round = 0; round < 6; round++) {
      // Up to 24 writes in flight, non-overlapping within a round so the result does not depend on order.
      const taken: [number, number][] = [];
      const writes: { tag: number; offset: number; data: Buffer }[] = [];
      for (let tag = 0; tag < 24; tag++) {
        const length = prng.int(1, 64) * 4096 + (prng.chance(0.3) ? prng.int(1, 7) * 512 : 0);
        const offset = prng.int(0, (IMAGE_SIZE - length) / 512) * 512;
        if (taken.some(([start, end]) => offset < end && start < offset + length)) continue;
        taken.push([offset, offset + length]);
        const data = Buffer.alloc(length);
        prng.fill(data);
        writes.push({ tag, offset, data });
      }
      const results = drive(queue, (pending) => {
        for (const { tag, offset, data } of writes) {
          let at = 0;
          const buffers = split(prng, data.length).map((len) => data.subarray(at, (at += len)));
          // Odd tags: a segment list the queue copies; even tags: the caller's own iovec array.
          if (tag % 2 === 1) {
            pending.set(tag, { buffers });
            queue.submitWrite(tag, offset, segmentsOf(buffers));
            continue;
          }
          const iov = iovOver(buffers);
          pending.set(tag, { buffers, iov });
          queue.submitWritev(tag, offset, iov.address, buffers.length);
        }
      });
      for (const { tag, offset, data } of writes) {
        expect(results.get(tag), `write tag ${tag}`).toBeGreaterThanOrEqual(0);
        data.copy(model, offset);
      }
      const flushed = drive(queue, (pending) => {
        pending.set(1, { buffers: [] });
        queue.submitFlush(1);
      });
      expect(flushed.get(1)).toBe(0);
    }

    // Read back at random places (several in flight, scattered over iovecs) and the whole image.
    const reads: { tag: number; offset: number; buffers: Buffer[] }[] = [];
    const readResults = drive(queue, (pending) => {
      for (let tag = 0; tag < 32; tag++) {
        const length = prng.int(1, 128) * 512;
        const offset = prng.int(0, (IMAGE_SIZE - length) / 512) * 512;
        const buffers = split(prng, length).map((len) => Buffer.alloc(len, 0xee));
        reads.push({ tag, offset, buffers });
        if (tag % 2 === 1) {
          pending.set(tag, { buffers });
          queue.submitRead(tag, offset, segmentsOf(buffers));
          continue;
        }
        const iov = iovOver(buffers);
        pending.set(tag, { buffers, iov });
        queue.submitReadv(tag, offset, iov.address, buffers.length);
      }
    });
    for (const { tag, offset, buffers } of reads) {
      const got = Buffer.concat(buffers);
      expect(readResults.get(tag)).toBe(got.length);
      expect(got.equals(model.subarray(offset, offset + got.length)), `read tag ${tag} at ${offset}`).toBe(true);
    }
    const whole = Buffer.alloc(IMAGE_SIZE);
    const chunks = drive(queue, (pending) => {
      for (let i = 0; i < IMAGE_SIZE / (4 * MiB); i++) {
        const part = whole.subarray(i * 4 * MiB, (i + 1) * 4 * MiB);
        const iov = iovOver([part]);
        pending.set(i, { buffers: [part], iov });
        queue.submitReadv(i, i * 4 * MiB, iov.address, 1);
      }
    });
    for (const result of chunks.values()) expect(result).toBe(4 * MiB);
    expect(whole.equals(model)).toBe(true);

    // What the cluster holds, read by Ceph's own client.
    const exported = await cluster.run('rbd', ['export', '--no-progress', 'rbd/img1', '-'], 120_000);
    expect(exported.length).toBe(IMAGE_SIZE);
    expect(exported.equals(model)).toBe(true);
    await close(image, queue);
  });

  it('reads zeroes after write-zeroes (any range) and after discarding whole objects', async () => {
    const image = await open();
    const queue = new RbdQueue(image.handle, image.eventFd);
    const fill = Buffer.alloc(12 * MiB, 0x5a);
    const filled = drive(queue, (pending) => {
      const iov = iovOver([fill]);
      pending.set(1, { buffers: [fill], iov });
      queue.submitWritev(1, 0, iov.address, 1);
    });
    expect(filled.get(1)).toBeGreaterThanOrEqual(0);
    fill.copy(model, 0);

    // write-zeroes at unaligned (sector) places inside an object and across an object boundary.
    const zeroRanges: [number, number][] = [
      [4096 + 512, 3 * 4096],
      [OBJECT_SIZE - 8192, 16384],
    ];
    // discard one whole object (librbd's discard may skip partial objects; a whole object always reads 0).
    const discardRange: [number, number] = [2 * OBJECT_SIZE, OBJECT_SIZE];
    const results = drive(queue, (pending) => {
      zeroRanges.forEach(([offset, length], i) => {
        pending.set(10 + i, { buffers: [] });
        queue.submitWriteZeroes(10 + i, offset, length);
      });
      pending.set(20, { buffers: [] });
      queue.submitDiscard(20, discardRange[0], discardRange[1]);
    });
    for (const result of results.values()) expect(result).toBe(0);
    for (const [offset, length] of [...zeroRanges, discardRange]) model.fill(0, offset, offset + length);

    const back = Buffer.alloc(12 * MiB, 0xee);
    drive(queue, (pending) => {
      const iov = iovOver([back]);
      pending.set(1, { buffers: [back], iov });
      queue.submitReadv(1, 0, iov.address, 1);
    });
    expect(back.equals(model.subarray(0, 12 * MiB))).toBe(true);
    // The bytes around the zeroed ranges are untouched.
    expect(back[4096 + 511]).toBe(0x5a);
    expect(back[4096 + 512]).toBe(0);
    expect(back[4096 + 512 + 3 * 4096]).toBe(0x5a);
    await close(image, queue);
  });

  it('reports a request librbd refuses at submit through reap, like any completion', async () => {
    const image = await open();
    const queue = new RbdQueue(image.handle, image.eventFd);
    const results = drive(queue, (pending) => {
      const buffer = Buffer.alloc(4096);
      const iov = iovOver([buffer]);
      pending.set(1, { buffers: [buffer], iov });
      // iovcnt 0: librbd rejects the request before starting it.
      queue.submitReadv(1, 0, iov.address, 0);
      // Too many segments: refused by the queue itself, also through reap.
      pending.set(2, { buffers: [] });
      queue.submitRead(2, 0, {
        count: 2000,
        addresses: new Array<number>(2000).fill(addressOf(buffer)),
        lengths: new Array<number>(2000).fill(1),
      });
    });
    expect(results.get(1)).toBeLessThan(0);
    expect(results.get(2)).toBe(-22 /* EINVAL */);
    await close(image, queue);
  });

  it('reap without draining the eventfd still takes the completion and leaves the eventfd readable for the next epoll round', async () => {
    const image = await open();
    const queue = new RbdQueue(image.handle, image.eventFd);
    const buffer = Buffer.alloc(4096);
    queue.submitRead(1, 0, segmentsOf([buffer]));
    expect(waitReadable(queue.fd, 30_000), 'the eventfd signals the completion').toBe(true);
    const results: [number, number][] = [];
    // Poll librbd until the completion is there, without reading the eventfd (what the worker does within a drain).
    for (let i = 0; i < 3000 && results.length === 0; i++) {
      queue.reap((tag, result) => results.push([tag, result]), false);
      if (results.length === 0) await new Promise((resolve) => setTimeout(resolve, 10));
    }
    expect(results).toEqual([[1, 4096]]);
    expect(waitReadable(queue.fd, 0), 'not drained: the next epoll round still comes').toBe(true);
    expect(queue.reap(() => expect.fail('nothing is left to complete'))).toBe(0);
    expect(waitReadable(queue.fd, 0), 'a reap that drains clears it').toBe(false);
    await close(image, queue);
  });

  it('resizes the image: the new size is seen by this handle, a second client and rbd info', async () => {
    const image = await open();
    await image.resize(96 * MiB);
    expect(image.size()).toBe(96 * MiB);
    const info = JSON.parse((await cluster.run('rbd', ['info', '--format', 'json', 'rbd/img1'])).toString()) as { size: number };
    expect(info.size).toBe(96 * MiB);
    const queue = new RbdQueue(image.handle, image.eventFd);
    // The grown tail is readable and reads zeroes.
    const tail = Buffer.alloc(MiB, 0xee);
    const read = drive(queue, (pending) => {
      const iov = iovOver([tail]);
      pending.set(1, { buffers: [tail], iov });
      queue.submitReadv(1, 95 * MiB, iov.address, 1);
    });
    expect(read.get(1)).toBe(MiB);
    expect(tail.every((b) => b === 0)).toBe(true);
    await close(image, queue);
    const reader = await open('rbd:rbd/img1', { readOnly: true });
    expect(reader.size()).toBe(96 * MiB);
    await close(reader);
    // Back to the size the model covers.
    const again = await open();
    await again.resize(IMAGE_SIZE);
    expect(again.size()).toBe(IMAGE_SIZE);
    await close(again);
  });

  it('a read past the end of an image another client shrank: librbd answers it short, the rest of the buffer is zeroed and counted', async () => {
    await cluster.run('rbd', ['create', '--size', '8M', 'rbd/shrunk']);
    const data = Buffer.alloc(8 * MiB);
    new Prng(seed).fill(data);
    const writer = await open('rbd:rbd/shrunk');
    const writes = new RbdQueue(writer.handle, writer.eventFd);
    expect(
      drive(writes, (pending) => {
        pending.set(1, { buffers: [data] });
        writes.submitWrite(1, 0, segmentsOf([data]));
      }).get(1),
    ).toBe(0);
    await close(writer, writes);

    // Another client shrinks the image to 6 MiB while this handle holds it (a read-only handle watches nothing).
    const reader = await open('rbd:rbd/shrunk');
    const queue = new RbdQueue(reader.handle, reader.eventFd);
    await cluster.run('rbd', ['resize', '--allow-shrink', '--size', '6M', 'rbd/shrunk']);
    // The lock owner runs the resize for that client; the handle then knows the new end.
    for (let i = 0; i < 100 && reader.size() !== 6 * MiB; i++) await new Promise((r) => setTimeout(r, 100));
    expect(reader.size()).toBe(6 * MiB);
    // 5 MiB .. 7 MiB in three pieces (the data plane's segment list): 1 MiB of image, then past its end.
    const pieces = [Buffer.alloc(768 * 1024, 0xee), Buffer.alloc(512 * 1024, 0xee), Buffer.alloc(768 * 1024, 0xee)];
    // Through the caller's own iovec array: 6 MiB - 512 KiB .. 6 MiB + 512 KiB.
    const whole = Buffer.alloc(MiB, 0xee);
    const results = drive(queue, (pending) => {
      pending.set(1, { buffers: pieces });
      queue.submitRead(1, 5 * MiB, segmentsOf(pieces));
      const iov = iovOver([whole]);
      pending.set(2, { buffers: [whole], iov });
      queue.submitReadv(2, 6 * MiB - 512 * 1024, iov.address, 1);
    });
    expect(results.get(1), 'librbd reads up to the end it knows').toBe(MiB);
    expect(results.get(2)).toBe(512 * 1024);
    const got = Buffer.concat(pieces);
    expect(got.subarray(0, MiB).equals(data.subarray(5 * MiB, 6 * MiB)), 'the part inside the image').toBe(true);
    expect(
      got.subarray(MiB).every((b) => b === 0),
      'past the end: zeroes, not what the buffer held',
    ).toBe(true);
    expect(whole.subarray(0, 512 * 1024).equals(data.subarray(6 * MiB - 512 * 1024, 6 * MiB))).toBe(true);
    expect(whole.subarray(512 * 1024).every((b) => b === 0)).toBe(true);
    expect(queue.shortReads).toBe(2);
    expect(queue.lastShortRead).toEqual({ asked: MiB, read: 512 * 1024 });
    // A whole read inside the image is not one.
    const inside = Buffer.alloc(64 * 1024, 0xee);
    expect(
      drive(queue, (pending) => {
        pending.set(3, { buffers: [inside] });
        queue.submitRead(3, 0, segmentsOf([inside]));
      }).get(3),
    ).toBe(64 * 1024);
    expect(inside.equals(data.subarray(0, 64 * 1024))).toBe(true);
    expect(queue.shortReads).toBe(2);
    await close(reader, queue);
  });

  it('through the daemon: a guest read past the end of a shrunk image completes with zeroes there, counted and logged', async () => {
    await cluster.run('rbd', ['create', '--size', '8M', 'rbd/shrunk2']);
    const disk = `image=rbd:rbd/shrunk2,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=vublk.sock`;
    const daemon = await startDaemon({ rawArgs: ['serve', '--disk', disk, ...METRICS_ARGS, '--admin-socket', 'off'] });
    const frontend = await VhostUserFrontend.connect(daemon.socketPath);
    try {
      const url = await metricsUrl(daemon);
      const driver = new VirtioBlkDriver(frontend);
      const data = Buffer.alloc(MiB);
      new Prng(seed).fill(data);
      await driver.write((5 * MiB) / 512, data);
      // Another client shrinks the image under the daemon (the lock owner runs the resize for it).
      await cluster.run('rbd', ['resize', '--allow-shrink', '--size', '5632K', 'rbd/shrunk2']);
      const since = daemon.logs().length;
      const got = await driver.read((5 * MiB) / 512, MiB);
      expect(got.subarray(0, 512 * 1024).equals(data.subarray(0, 512 * 1024)), 'the part still in the image').toBe(true);
      expect(
        got.subarray(512 * 1024).every((b) => b === 0),
        'past the end: zeroes',
      ).toBe(true);
      const line = await daemon.waitForLog((l) => l.msg === 'network back-end', 10_000, since);
      expect(String(line.reason)).toMatch(/librbd answered 1 read short \(the latest: 524288 of 1048576 bytes/);
      const m = await scrape(url);
      expect(sampleValue(m, 'vublk_backend_short_reads_total', { disk: 'disk0', queue: '0' })).toBe(1);
      expect(sampleValue(m, 'vublk_io_errors_total', { disk: 'disk0', queue: '0' })).toBe(0);
      // A write wholly past the image's end fails (librbd refuses it); the guest sees IOERR, counted.
      const past = await driver.execute({ type: BlkRequestType.OUT, sector: (6 * MiB) / 512, out: Buffer.alloc(4096, 0x33) });
      expect(past.status).toBe(BlkStatus.IOERR);
      expect(sampleValue(await scrape(url), 'vublk_io_errors_total', { disk: 'disk0', queue: '0' })).toBe(1);
    } finally {
      frontend.close();
      await daemon.stop();
    }
  });

  it('exclusive lock: a second writer is refused; with lock=none it cannot write until the owner releases', async () => {
    const first = await open();
    const firstError = await expectOpenError(
      parseRbdSpec('rbd:rbd/img1', options()),
      'VUBLK_ERR_RBD_LOCKED',
      /another client holds its exclusive lock/,
    );
    expect(firstError.errno).toBeLessThan(0);

    // lock=none (the target of a live migration): opens, but its writes fail while the owner keeps the lock.
    const second = await open('rbd:rbd/img1', { lock: 'none' });
    expect(second.lockHeld).toBe(false);
    expect(second.isLockOwner()).toBe(false);
    const queue = new RbdQueue(second.handle, second.eventFd);
    const data = Buffer.alloc(4096, 0x77);
    const write = (): number =>
      drive(queue, (pending) => {
        const iov = iovOver([data]);
        pending.set(1, { buffers: [data], iov });
        queue.submitWritev(1, 0, iov.address, 1);
      }).get(1)!;
    expect(write()).toBe(-30 /* EROFS */);
    expect(first.isLockOwner()).toBe(true);

    // Switch-over: the owner gives the lock up, the other side's next write takes it.
    await first.releaseLock();
    expect(write()).toBe(0);
    data.copy(model, 0);
    expect(second.isLockOwner()).toBe(true);
    await close(second, queue);
    await close(first);
  });

  it('closing an image while it still asks for the lock waits for that call, then the wait ends with the refusal', async () => {
    const holder = await open('rbd:rbd/img1');
    const waiter = await open('rbd:rbd/img1', { lock: 'none' });
    const acquiring = waiter.acquireLock(5_000);
    await new Promise((r) => setTimeout(r, 300));
    const started = Date.now();
    await close(waiter);
    await expect(acquiring).rejects.toMatchObject({ code: expect.stringMatching(/VUBLK_ERR_RBD_(LOCKED|FAILED)/) });
    expect(Date.now() - started, 'close did not wait out the 5 s lock wait').toBeLessThan(3_000);
    expect(holder.isLockOwner()).toBe(true);
    await close(holder);
  });

  it('lock=migratable: a daemon takes the lock when the device starts and gives it up before it answers GET_VRING_BASE; a second one waits, then writes fail with IOERR until it can take it', async () => {
    await cluster.run('rbd', ['create', '--size', '16M', 'rbd/mig1']);
    const daemons: DaemonProcess[] = [];
    const frontends: VhostUserFrontend[] = [];
    const clients: number[] = [];
    try {
      // connect-timeout=2 bounds how long a device start waits for a lock held elsewhere.
      for (let i = 0; i < 2; i++) {
        const disk = `image=rbd:rbd/mig1,lock=migratable,connect-timeout=2,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=vublk.sock`;
        // admin.sock: relative, in the daemon's own directory (its working directory).
        daemons.push(await startDaemon({ rawArgs: ['serve', '--disk', disk, ...METRICS_ARGS, '--admin-socket', 'admin.sock'] }));
        const fresh = (await rbdWatchers(cluster, 'rbd/mig1')).filter((id) => !clients.includes(id));
        expect(fresh, 'each daemon has one client watching the image').toHaveLength(1);
        clients.push(fresh[0]!);
      }
      const urls = [await metricsUrl(daemons[0]!), await metricsUrl(daemons[1]!)];
      // What the cluster says (rbd lock ls), checked against what each daemon reports (vublk_rbd_lock_owner).
      const owners = async (): Promise<string[]> => {
        const listed = (await rbdLockOwners(cluster, 'rbd/mig1')).map((id) =>
          id === clients[0] ? 'A' : id === clients[1] ? 'B' : `client.${id}`,
        );
        const reported: string[] = [];
        for (const [i, name] of ['A', 'B'].entries()) {
          if (sampleValue(await scrape(urls[i]!), 'vublk_rbd_lock_owner', { disk: 'disk0' }) === 1) reported.push(name);
        }
        expect(reported, 'the daemons report the lock the cluster lists').toEqual(listed);
        return listed;
      };
      expect(await owners(), 'opened, no device started: nobody holds the lock').toEqual([]);

      // A's device starts (the handshake starts its ring): A takes the lock before serving anything.
      frontends.push(await VhostUserFrontend.connect(daemons[0]!.socketPath));
      const a = new VirtioBlkDriver(frontends[0]!);
      expect(await owners()).toEqual(['A']);
      await a.write(8, Buffer.alloc(4096, 0xa1));
      // `vublk disks` says the same through the admin socket.
      const lockOwnerListed = (daemon: DaemonProcess): unknown => {
        const adminSocket = path.join(path.dirname(daemon.socketPath), 'admin.sock');
        const listed = execFileSync(process.execPath, [CLI, 'disks', '--admin-socket', adminSocket], { encoding: 'utf8', timeout: 20_000 });
        return (JSON.parse(listed) as { disks: { 'lock-owner'?: boolean }[] }).disks[0]?.['lock-owner'];
      };
      expect([lockOwnerListed(daemons[0]!), lockOwnerListed(daemons[1]!)]).toEqual([true, false]);

      // B's device start finds the lock pinned by A: it asks for connect-timeout, then starts without it.
      frontends.push(await VhostUserFrontend.connect(daemons[1]!.socketPath));
      const b = new VirtioBlkDriver(frontends[1]!);
      await daemons[1]!.waitForLog((line) => /device started without its image lock/.test(String(line.msg)), 15_000);
      expect((await b.execute({ type: BlkRequestType.OUT, sector: 16, out: Buffer.alloc(4096, 0xb1) })).status).toBe(BlkStatus.IOERR);
      expect((await b.read(8, 4096)).equals(Buffer.alloc(4096, 0xa1)), 'B reads what A wrote').toBe(true);
      expect(await owners()).toEqual(['A']);

      // The front-end stops A's device (a migration's switch-over): the lock is free when the reply arrives,
      // so a client already connected takes it at once, without waiting (then gives it back).
      const probe = await open('rbd:rbd/mig1', { lock: 'none' });
      const baseA = await frontends[0]!.stopQueue(0);
      await expect(probe.acquireLock(0), 'free once GET_VRING_BASE was answered').resolves.toBeUndefined();
      await probe.releaseLock();
      await close(probe);
      expect(await owners()).toEqual([]);
      expect(daemons[0]!.logs().some((line) => line.msg === 'exclusive lock of rbd:rbd/mig1 released')).toBe(true);

      // B's device stops and starts again: now it takes the lock, and its writes go through.
      const baseB = await frontends[1]!.stopQueue(0);
      await frontends[1]!.startQueue(0, baseB);
      expect(await owners()).toEqual(['B']);
      await b.write(16, Buffer.alloc(4096, 0xb2));
      expect((await b.read(16, 4096)).equals(Buffer.alloc(4096, 0xb2))).toBe(true);

      // A restarted (a cancelled migration) cannot take it back while B runs.
      await frontends[0]!.startQueue(0, baseA);
      expect((await a.execute({ type: BlkRequestType.OUT, sector: 24, out: Buffer.alloc(4096, 0xa2) })).status).toBe(BlkStatus.IOERR);
      expect(await owners()).toEqual(['B']);

      // B's front-end leaves: the lock goes with it.
      frontends[1]!.close();
      const deadline = Date.now() + 10_000;
      while ((await rbdLockOwners(cluster, 'rbd/mig1')).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      expect(await owners(), 'released when the front-end disconnects').toEqual([]);

      // A front-end that leaves while its device start still waits for the lock: once the holder lets go, the
      // daemon must not hold a lock no guest uses.
      let logSince = daemons[0]!.logs().length;
      frontends[0]!.close();
      await daemons[0]!.waitForLog((line) => line.msg === 'front-end disconnected', 10_000, logSince);
      const holder = await open('rbd:rbd/mig1');
      logSince = daemons[0]!.logs().length;
      // The front-end's handshake waits for the device start, so it runs in a process of its own, killed then.
      const generator = spawn(process.execPath, [BENCH_CLI, 'run', '--socket', daemons[0]!.socketPath, '--runtime', '5'], {
        stdio: 'ignore',
      });
      await daemons[0]!.waitForLog((line) => line.msg === 'front-end connected', 10_000, logSince);
      await new Promise((r) => setTimeout(r, 500));
      generator.kill('SIGKILL');
      await daemons[0]!.waitForLog((line) => line.msg === 'front-end disconnected', 10_000, logSince);
      await close(holder);
      await new Promise((r) => setTimeout(r, 2_500));
      expect(await owners(), 'the abandoned start took no lock').toEqual([]);
      // The session ends the wait as soon as the front-end hangs up (see the next test), and its device stops as
      // for any front-end that leaves: the lock it asked for is given back, never held for nobody.
      const after = daemons[0]!
        .logs()
        .slice(logSince)
        .map((line) => line.msg);
      expect(after.indexOf('exclusive lock of rbd:rbd/mig1 released'), JSON.stringify(after)).toBeGreaterThan(
        after.indexOf('front-end disconnected'),
      );
    } finally {
      for (const fe of frontends) fe.close();
      for (const daemon of daemons) await daemon.stop();
    }
  }, 120_000);

  it('lock=migratable: a front-end that hangs up while its device start waits for the lock ends the wait at once, not after connect-timeout', async () => {
    await cluster.run('rbd', ['create', '--size', '16M', 'rbd/mig2']);
    // connect-timeout=60: the wait would outlast every deadline below if only its end noticed the hang-up.
    const disk = `image=rbd:rbd/mig2,lock=migratable,connect-timeout=60,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=vublk.sock`;
    const daemon = await startDaemon({ rawArgs: ['serve', '--disk', disk, '--metrics-listen', 'off', '--admin-socket', 'off'] });
    const holder = await open('rbd:rbd/mig2');
    let holding = true;
    try {
      const [holderId] = await rbdLockOwners(cluster, 'rbd/mig2');
      expect(holderId, 'another client holds the lock').toBeDefined();
      const logSince = daemon.logs().length;
      // The front-end's handshake waits for the device start, so it runs in a process of its own, killed then.
      const generator = spawn(process.execPath, [BENCH_CLI, 'run', '--socket', daemon.socketPath, '--runtime', '5'], { stdio: 'ignore' });
      await daemon.waitForLog((line) => line.msg === 'front-end connected', 10_000, logSince);
      await new Promise((r) => setTimeout(r, 500));
      generator.kill('SIGKILL');
      await daemon.waitForLog((line) => line.msg === 'front-end disconnected', 10_000, logSince);
      const after = daemon
        .logs()
        .slice(logSince)
        .map((line) => String(line.msg));
      expect(
        after.findIndex((msg) => msg.startsWith('device start abandoned')),
        `the wait ended before the session's teardown: ${JSON.stringify(after)}`,
      ).toBeGreaterThanOrEqual(0);
      expect(
        after.some((msg) => msg.startsWith('exclusive lock of rbd:rbd/mig2 taken')),
        'no lock was taken for nobody',
      ).toBe(false);
      expect(await rbdLockOwners(cluster, 'rbd/mig2'), 'the holder keeps its lock').toEqual([holderId]);
      // The daemon asks no more: once the holder lets go, the lock stays free.
      holding = false;
      await close(holder);
      await new Promise((r) => setTimeout(r, 1_000));
      expect(await rbdLockOwners(cluster, 'rbd/mig2')).toEqual([]);
    } finally {
      if (holding) await close(holder).catch(() => undefined);
      await daemon.stop();
    }
  }, 60_000);

  it('a worker thread drives I/O on a handle opened by the main thread, woken by its epoll set', async () => {
    const image = await open();
    const workerCode = `
      const { parentPort, workerData } = require('node:worker_threads');
      import(workerData.queueModule).then(async ({ RbdQueue, IovecArray }) => {
        const { addressOf } = await import(workerData.libcModule);
        const queue = new RbdQueue(workerData.handle, workerData.eventFd);
        const data = Buffer.alloc(65536, 0x42);
        const iov = new IovecArray(1);
        iov.set(0, addressOf(data), data.length);
        const { EpollSet } = await import(workerData.epollModule);
        const results = [];
        // The data plane's way: the queue's fd in the worker's epoll set (edge-triggered), reap on readiness.
        const epoll = new EpollSet();
        epoll.add(queue.fd, true);
        const ready = new Int32Array(8);
        queue.submitWritev(1, workerData.offset, iov.address, 1);
        queue.submitFlush(2);
        const deadline = Date.now() + 30000;
        let wakeups = 0;
        while (queue.inFlight > 0 && Date.now() < deadline) {
          const n = epoll.wait(ready, 1000);
          if (n > 0 && ready[0] === queue.fd) wakeups++;
          queue.reap((tag, result) => results.push([tag, result]));
        }
        epoll.close();
        parentPort.postMessage({ idle: queue.inFlight === 0, results, wakeups });
      }).catch((error) => parentPort.postMessage({ error: String(error) }));
    `;
    const root = path.resolve(import.meta.dirname, '../..');
    const worker = new Worker(workerCode, {
      eval: true,
      workerData: {
        handle: image.handle,
        eventFd: image.eventFd,
        offset: 8 * MiB,
        queueModule: path.join(root, 'dist/src/backend/rbd/rbd-queue.js'),
        libcModule: path.join(root, 'dist/src/sys/libc.js'),
        epollModule: path.join(root, 'dist/src/dataplane/epoll.js'),
      },
    });
    const reply = await new Promise<{ idle?: boolean; results?: [number, number][]; wakeups?: number; error?: string }>(
      (resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('worker did not answer in 60 s')), 60_000);
        worker.once('message', (message) => {
          clearTimeout(timer);
          resolve(message as never);
        });
        worker.once('error', reject);
      },
    );
    await worker.terminate();
    expect(reply.error).toBeUndefined();
    expect(reply.idle).toBe(true);
    expect(reply.wakeups).toBeGreaterThan(0);
    expect(new Map(reply.results)).toEqual(
      new Map([
        [1, 0],
        [2, 0],
      ]),
    );
    model.fill(0x42, 8 * MiB, 8 * MiB + 65536);
    const exported = await cluster.run('rbd', ['export', '--no-progress', 'rbd/img1', '-'], 120_000);
    expect(exported.subarray(8 * MiB, 8 * MiB + 65536).equals(model.subarray(8 * MiB, 8 * MiB + 65536))).toBe(true);
    await close(image);
  });

  it('cluster stalls: with osd-timeout requests fail with ETIMEDOUT, without it they wait and complete', async () => {
    const osdPid = Number(readFileSync(path.join(cluster.dir, 'run/osd.0.pid'), 'utf8'));
    const timed = await open('rbd:rbd/img1', { osdTimeout: '2', lock: 'none' });
    const patient = await open('rbd:rbd/img1', { lock: 'none' });
    const timedQueue = new RbdQueue(timed.handle, timed.eventFd);
    const patientQueue = new RbdQueue(patient.handle, patient.eventFd);
    const a = Buffer.alloc(4096);
    const b = Buffer.alloc(4096);
    const iovA = iovOver([a]);
    const iovB = iovOver([b]);
    const results = new Map<string, number>();
    process.kill(osdPid, 'SIGSTOP');
    await allThreadsStopped(osdPid);
    try {
      timedQueue.submitReadv(1, MiB, iovA.address, 1);
      patientQueue.submitReadv(1, MiB, iovB.address, 1);
      expect(timedQueue.waitIdle(30_000, (tag, result) => results.set(`timed ${tag}`, result))).toBe(true);
      expect(results.get('timed 1')).toBe(-110 /* ETIMEDOUT */);
      // The patient one is still waiting for the OSD.
      expect(patientQueue.waitIdle(500, (tag, result) => results.set(`patient ${tag}`, result))).toBe(false);
    } finally {
      process.kill(osdPid, 'SIGCONT');
    }
    expect(patientQueue.waitIdle(60_000, (tag, result) => results.set(`patient ${tag}`, result))).toBe(true);
    expect(results.get('patient 1')).toBe(4096);
    expect(b.equals(model.subarray(MiB, MiB + 4096))).toBe(true);
    // The timed-out handle recovers with the cluster.
    timedQueue.submitReadv(2, MiB, iovA.address, 1);
    expect(timedQueue.waitIdle(30_000, (tag, result) => results.set(`timed ${tag}`, result))).toBe(true);
    expect(results.get('timed 2')).toBe(4096);
    expect(a.equals(b)).toBe(true);
    await close(timed, timedQueue);
    await close(patient, patientQueue);
  });

  it('a cluster stall across a front-end leaving: the ring stops without its reads, their guest memory is quarantined (librbd finishing them late crashed the daemon before), and a front-end meanwhile reads the right data', async () => {
    await cluster.run('rbd', ['create', '--size', '16M', 'rbd/stall']);
    const osdPid = Number(readFileSync(path.join(cluster.dir, 'run/osd.0.pid'), 'utf8'));
    const disk = `image=rbd:rbd/stall,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=vublk.sock`;
    const daemon = await startDaemon({ rawArgs: ['serve', '--disk', disk, ...METRICS_ARGS, '--admin-socket', 'off'] });
    const url = await metricsUrl(daemon);
    const data = Buffer.alloc(2 * MiB);
    const prng = new Prng(seed);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(prng.u32(), i);
    // Eight 64 KiB reads, 128 KiB apart, from `first` on (sectors).
    const reads = (first: number) =>
      Array.from({ length: 8 }, (_, i) => ({ type: BlkRequestType.IN, sector: first + i * 256, inLength: 64 * 1024 }));
    let stalled = false;
    const stall = async () => {
      process.kill(osdPid, 'SIGSTOP');
      stalled = true;
      await allThreadsStopped(osdPid);
    };
    const resume = () => {
      process.kill(osdPid, 'SIGCONT');
      stalled = false;
    };
    const frontends: VhostUserFrontend[] = [];
    const connect = async () => {
      const frontend = await VhostUserFrontend.connect(daemon.socketPath);
      frontends.push(frontend);
      return { frontend, driver: new VirtioBlkDriver(frontend) };
    };
    /** Leaves with reads in flight on a stalled cluster; resolves once the daemon quarantined their memory. */
    const leaveWithReadsInFlight = async (first: number) => {
      const { frontend, driver } = await connect();
      const abandoned = driver.executeAll(reads(first)).catch(() => null);
      await new Promise((r) => setTimeout(r, 300));
      const since = daemon.logs().length;
      frontend.close();
      // The ring waits 5 s for them, then stops without them.
      await daemon.waitForLog((line) => /guest memory is quarantined/.test(String(line.msg)), 30_000, since);
      await abandoned;
    };
    try {
      const { driver: writer } = await connect();
      // Written first, so the reads go to the OSD (librbd answers reads of absent objects itself).
      for (let at = 0; at < data.length; at += MiB) await writer.write(at / 512, data.subarray(at, at + MiB));
      frontends[0]!.close();

      // 1. Nobody connected when librbd finishes the abandoned reads: they land in quarantined memory.
      await stall();
      await leaveWithReadsInFlight(0);
      resume();
      await new Promise((r) => setTimeout(r, 2_000));
      expect(daemon.running(), 'the daemon survived reads finished into memory its front-end had left').toBe(true);

      // 2. A front-end connected when they finish: its own requests get their own completions and data.
      await stall();
      await leaveWithReadsInFlight(2048);
      const { driver: next } = await connect();
      const mine = next.executeAll(reads(0), { timeoutMs: 60_000 });
      await new Promise((r) => setTimeout(r, 300));
      resume();
      (await mine).forEach((completion, i) => {
        expect(completion.status, `read ${i} of the next front-end`).toBe(BlkStatus.OK);
        const at = i * 128 * 1024;
        expect(completion.data.equals(data.subarray(at, at + 64 * 1024)), `data of read ${i} of the next front-end`).toBe(true);
      });
      await next.write(3072, Buffer.alloc(4096, 0x5a));
      expect((await next.read(3072, 4096)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
      expect(daemon.running()).toBe(true);
      expect(sampleValue(await scrape(url), 'vublk_guest_memory_quarantined_bytes')).toBeGreaterThan(0);
    } finally {
      if (stalled) resume();
      for (const fe of frontends) fe.close();
      await daemon.stop();
    }
  }, 120_000);

  it('merged requests (merge=, the default): a sequential verify through the daemon, ops merged, and rbd export holds every byte', async () => {
    await cluster.run('rbd', ['create', '--size', '16M', 'rbd/merge']);
    const disk = `image=rbd:rbd/merge,conf=${cluster.conf},id=vublk,keyring=${cluster.vublkKeyring},socket=vublk.sock`;
    const daemon = await startDaemon({ rawArgs: ['serve', '--disk', disk, ...METRICS_ARGS, '--admin-socket', 'off'] });
    try {
      const url = await metricsUrl(daemon);
      // 8 MiB in 16 KiB writes at QD16, read back in 32 KiB reads: batches of adjacent requests, and merged
      // operations that cross the 4 MiB object boundary (librbd splits those itself).
      const result = await runBench(verifyArgs(daemon.socketPath, { size: '8M', bs: '16k', iodepth: 16, seed: 21 }), 120_000);
      expect(result.code, `${result.stdout}${result.stderr}\n${daemon.output().slice(-3000)}`).toBe(0);
      expect(result.stdout).toContain('verify: OK, every byte matches');
      const m = await scrape(url);
      const merged = sampleValue(m, 'vublk_merged_requests_total', { disk: 'disk0', queue: '0' });
      const requests = sampleValue(m, 'vublk_requests_total', { disk: 'disk0', queue: '0', op: 'write' });
      expect(requests).toBe(512);
      expect(merged, 'requests that joined another one').toBeGreaterThan(100);
      expect(sampleValue(m, 'vublk_io_errors_total', { disk: 'disk0', queue: '0' })).toBe(0);
      const expected = Buffer.alloc(8 * MiB);
      fillPattern(expected, 0, patternKey(21));
      const exported = await cluster.run('rbd', ['export', '--no-progress', 'rbd/merge', '-'], 120_000);
      expect(exported.subarray(0, 8 * MiB).equals(expected)).toBe(true);
    } finally {
      await daemon.stop();
    }
  });

  it("the librbd settings the daemon applies, read back through its client admin socket; 128 MiB of 1 MiB writes wanted in flight at once (more than the Objecter's 100 MiB limit) all complete", async () => {
    await cluster.run('rbd', ['create', '--size', '128M', 'rbd/big-writes']);
    const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-rbd-asok-'));
    const asok = path.join(dir, 'client.asok');
    // The cluster's ceph.conf plus an admin socket of the daemon's own ([client] overrides [global]).
    const conf = path.join(dir, 'ceph.conf');
    writeFileSync(conf, `${readFileSync(cluster.conf, 'utf8')}\n[client]\nadmin_socket = ${asok}\n`);
    const disk = `image=rbd:rbd/big-writes,conf=${conf},id=vublk,keyring=${cluster.vublkKeyring},socket=vublk.sock`;
    const daemon = await startDaemon({ rawArgs: ['serve', '--disk', disk, ...METRICS_ARGS, '--admin-socket', 'off'] });
    try {
      // The daemon's librados answers on its admin socket with JSON (`ceph --admin-daemon`).
      const adminSocket = <T>(...command: string[]): T =>
        JSON.parse(execFileSync('ceph', ['--admin-daemon', asok, ...command], { encoding: 'utf8', timeout: 30_000 })) as T;
      const setting = (key: string): string => adminSocket<Record<string, string>>('config', 'get', key)[key]!;
      expect(setting('rbd_cache'), 'a write completes when the OSDs have it').toBe('false');
      expect(setting('rbd_disable_zero_copy_writes'), 'write data copied at submission').toBe('true');
      // 128 writes of 1 MiB wanted in flight at once: the Objecter lets 100 MiB through and holds the rest in
      // librbd's own threads until replies free room (vublk's worker never waits for it).
      const result = await runBench(verifyArgs(daemon.socketPath, { size: '128M', bs: '1M', iodepth: 128, seed: 31 }), 120_000);
      expect(result.code, `${result.stdout}${result.stderr}\n${daemon.output().slice(-3000)}`).toBe(0);
      expect(result.stdout).toContain('verify: OK, every byte matches');
      const m = await scrape(await metricsUrl(daemon));
      expect(sampleValue(m, 'vublk_requests_total', { disk: 'disk0', queue: '0', op: 'write' })).toBe(128);
      expect(sampleValue(m, 'vublk_io_errors_total', { disk: 'disk0', queue: '0' })).toBe(0);
      const objecter = adminSocket<{ 'throttle-objecter_bytes'?: { max?: number; get_sum?: number } }>('perf', 'dump')[
        'throttle-objecter_bytes'
      ];
      expect(objecter?.max, "librbd's default in-flight byte limit").toBe(100 * MiB);
      expect(objecter?.get_sum ?? 0, 'every write went through the Objecter').toBeGreaterThanOrEqual(128 * MiB);
    } finally {
      await daemon.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("a writer killed under I/O: flushed data survives, and a new exclusive open takes the dead holder's lock", async () => {
    const root = path.resolve(import.meta.dirname, '../..');
    // The child opens with the exclusive lock, writes and flushes a pattern, says so, then keeps writing
    // until it is killed.
    const childCode = `
      const { RbdImage } = await import(${JSON.stringify(path.join(root, 'dist/src/backend/rbd/rbd-image.js'))});
      const { RbdQueue, IovecArray } = await import(${JSON.stringify(path.join(root, 'dist/src/backend/rbd/rbd-queue.js'))});
      const { parseRbdSpec } = await import(${JSON.stringify(path.join(root, 'dist/src/backend/rbd/rbd-spec.js'))});
      const { addressOf } = await import(${JSON.stringify(path.join(root, 'dist/src/sys/libc.js'))});
      const image = await RbdImage.open(parseRbdSpec('rbd:rbd/img1', ${JSON.stringify(options())}));
      const queue = new RbdQueue(image.handle, image.eventFd);
      const data = Buffer.alloc(MIB, 0xc3);
      const iov = new IovecArray(1);
      iov.set(0, addressOf(data), data.length);
      const check = (tag, result) => { if (result < 0) { console.log('FAILED ' + tag + ' ' + result); process.exit(1); } };
      queue.submitWritev(1, 16 * MIB, iov.address, 1);
      if (!queue.waitIdle(60000, check)) process.exit(2);
      queue.submitFlush(2);
      if (!queue.waitIdle(60000, check)) process.exit(3);
      console.log('FLUSHED');
      const junk = Buffer.alloc(MIB, 0x3c);
      const junkIov = new IovecArray(1);
      junkIov.set(0, addressOf(junk), junk.length);
      for (let i = 0; ; i++) {
        queue.submitWritev(10 + i, 20 * MIB + (i % 4) * MIB, junkIov.address, 1);
        queue.waitIdle(1000, check);
      }
    `.replace(/MIB/g, String(MiB));
    const child = spawn(process.execPath, ['--input-type=module', '-e', childCode], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`child did not flush in 60 s: ${stdout} ${stderr}`)), 60_000);
        child.stdout.on('data', (d: Buffer) => {
          stdout += d.toString();
          if (stdout.includes('FLUSHED')) {
            clearTimeout(timer);
            resolve();
          }
        });
        child.once('exit', (code) => reject(new Error(`child exited ${code}: ${stdout} ${stderr}`)));
      });
      // Let a few unflushed writes be in flight, then kill it the hard way (no close, lock not released).
      await new Promise((resolve) => setTimeout(resolve, 300));
    } finally {
      child.kill('SIGKILL');
      await exited;
    }
    model.fill(0xc3, 16 * MiB, 17 * MiB);
    // librbd breaks a dead holder's lock once its watch times out (osd_client_watch_timeout, 30 s).
    const image = await open();
    expect(image.isLockOwner()).toBe(true);
    const queue = new RbdQueue(image.handle, image.eventFd);
    const back = Buffer.alloc(MiB);
    const read = drive(queue, (pending) => {
      const iov = iovOver([back]);
      pending.set(1, { buffers: [back], iov });
      queue.submitReadv(1, 16 * MiB, iov.address, 1);
    });
    expect(read.get(1)).toBe(MiB);
    expect(back.equals(model.subarray(16 * MiB, 17 * MiB))).toBe(true);
    await close(image, queue);
  }, 150_000);

  describe('clear errors, each within a bounded time', () => {
    it('missing pool', async () => {
      await expectOpenError(parseRbdSpec('rbd:nosuchpool/img1', options()), 'VUBLK_ERR_RBD_NO_POOL', /pool 'nosuchpool' does not exist/);
    });

    it('missing image', async () => {
      await expectOpenError(
        parseRbdSpec('rbd:rbd/nosuchimage', options()),
        'VUBLK_ERR_RBD_NO_IMAGE',
        /image 'nosuchimage' does not exist in pool 'rbd'/,
      );
    });

    it('missing keyring file', async () => {
      await expectOpenError(
        parseRbdSpec('rbd:rbd/img1', options({ keyring: '/nonexistent/keyring' })),
        'VUBLK_ERR_RBD_AUTH',
        /keyring \/nonexistent\/keyring .* not readable/,
      );
    });

    it('keyring with the wrong key, and an id the cluster does not know', async () => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-rbd-key-'));
      try {
        const wrong = path.join(dir, 'wrong.keyring');
        execFileSync('ceph-authtool', ['--create-keyring', wrong, '--gen-key', '-n', 'client.vublk']);
        await expectOpenError(parseRbdSpec('rbd:rbd/img1', options({ keyring: wrong })), 'VUBLK_ERR_RBD_AUTH', /refused client\.vublk/);
        await expectOpenError(parseRbdSpec('rbd:rbd/img1', options({ id: 'nobody' })), 'VUBLK_ERR_RBD_AUTH', /refused client\.nobody/);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it('unreadable ceph.conf', async () => {
      await expectOpenError(
        parseRbdSpec('rbd:rbd/img1', options({ conf: '/nonexistent/ceph.conf' })),
        'VUBLK_ERR_RBD_CONFIG',
        /ceph configuration \/nonexistent\/ceph.conf is not readable/,
      );
    });

    it('permission denied: a read-only client opening for writing', async () => {
      const error = await expectOpenError(
        parseRbdSpec('rbd:rbd/img1', options({ id: 'reader', keyring: cluster.readerKeyring })),
        'VUBLK_ERR_RBD_PERMISSION',
        /client\.reader may not/,
      );
      expect(error.errno).toBeLessThan(0);
      // The same client may open it read-only.
      const reader = await open('rbd:rbd/img1', { id: 'reader', keyring: cluster.readerKeyring, readOnly: true });
      expect(reader.size()).toBe(IMAGE_SIZE);
      await close(reader);
    });

    it('unreachable monitor (a closed port): RBD_CLUSTER_UNREACHABLE after the connect timeout', async () => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-rbd-conf-'));
      try {
        // Port 9 (discard): nothing listens on it here, so every connection attempt is refused.
        const conf = path.join(dir, 'ceph.conf');
        writeFileSync(conf, `[global]\nmon_host = v2:127.0.0.1:9\nauth_client_required = cephx\n`);
        await expectOpenError(
          parseRbdSpec('rbd:rbd/img1', options({ conf, connectTimeout: '3' })),
          'VUBLK_ERR_RBD_CLUSTER_UNREACHABLE',
          /no Ceph monitor answered within 3 s/,
        );
        // mon-host= overrides ceph.conf's monitors.
        await expectOpenError(
          parseRbdSpec('rbd:rbd/img1', options({ monHost: `v2:127.0.0.1:9`, connectTimeout: '2' })),
          'VUBLK_ERR_RBD_CLUSTER_UNREACHABLE',
          /within 2 s/,
        );
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
});
