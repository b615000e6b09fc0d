/**
 * The asynchronous engine on its own: requests stay in flight after submit, completions arrive through the
 * registered eventfd, the in-flight limit is reported by canAccept rather than waited for; and O_DIRECT on a
 * file on a disk file system (cache=none): aligned guest buffers go straight to the kernel, unaligned ones
 * through bounce buffers (counted), with the same bytes on disk either way, for both engines.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { BlkRequest } from '../../src/dataplane/blk-request.js';
import type { Completion, RequestExecutor } from '../../src/dataplane/request-executor.js';
import { SyncExecutor } from '../../src/dataplane/sync-executor.js';
import { UringExecutor } from '../../src/dataplane/uring-executor.js';
import { engineOptions, openRawImage } from '../../src/dataplane/raw-image.js';
import { probeIoUring } from '../../src/sys/io-uring.js';
import { waitReadable } from '../../src/sys/poll-wait.js';
import { addressOf, sys } from '../../src/sys/libc.js';
import { directIoDir } from '../support/host-disk.js';
import { ENGINE_TEST_LIMITS, memoryFixture, type MemoryFixture } from './guest-memory-fixture.js';

const limits = ENGINE_TEST_LIMITS;
const IMAGE_BYTES = 4 << 20;
const uringUnavailable = probeIoUring();
const directDir = directIoDir();

function request(type: number, sector: number, segs: [number, number][], statusGpa: number): BlkRequest {
  const r = new BlkRequest(limits.segMax + 2);
  r.type = type;
  r.sector = sector;
  r.statusGpa = statusGpa;
  for (const [gpa, len] of segs) r.addSegment(gpa, len);
  return r;
}

/** Reaps until `count` completions arrived or 10 s passed, sleeping on the completion fd in between. */
function collect(executor: RequestExecutor, completions: Completion[], count: number): void {
  const deadline = Date.now() + 10_000;
  while (completions.length < count && Date.now() < deadline) {
    executor.submitPending();
    executor.reap();
    if (completions.length < count && executor.completionFd >= 0) waitReadable(executor.completionFd, 100);
  }
}

describe.skipIf(uringUnavailable !== null)('io_uring engine, asynchronous', () => {
  let dir: string;
  let fd: number;
  let fx: MemoryFixture;
  let executor: UringExecutor;
  let completions: Completion[];

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(directDir ?? os.tmpdir(), 'vublk-async-'));
    fs.writeFileSync(path.join(dir, 'disk.img'), randomBytes(IMAGE_BYTES));
    fx = memoryFixture(8 << 20);
    completions = [];
  });

  afterEach(() => {
    executor?.close();
    if (fd >= 0) sys.close(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('leaves requests in flight after submit, reports a full engine through canAccept, and delivers completions via its eventfd', () => {
    const opened = openRawImage(path.join(dir, 'disk.img'), false, directDir !== null ? 'none' : 'writeback');
    fd = opened.fd;
    executor = new UringExecutor(fd, limits, { ...engineOptions(opened.io), depth: 4 });
    executor.onComplete = (c) => completions.push({ ...c });
    expect(executor.completionFd).toBeGreaterThanOrEqual(0);
    const pageOffset = (4096 - (addressOf(fx.bytes) % 4096)) % 4096;
    const heads: number[] = [];
    for (let i = 0; i < 4; i++) {
      const r = request(BlkRequestType.IN, i * 8, [[fx.gpa(pageOffset + i * 4096), 4096]], fx.gpa(fx.bytes.length - 1 - i));
      expect(executor.canAccept(r)).toBe(true);
      executor.submit(fx.memory, r, i, IMAGE_BYTES, true);
      heads.push(i);
    }
    // Nothing completes inside submit: the engine only prepared SQEs.
    expect(completions).toEqual([]);
    expect(executor.inFlight).toBe(4);
    expect(executor.canAccept(request(BlkRequestType.IN, 0, [[fx.gpa(0), 4096]], fx.gpa(0)))).toBe(false);
    expect(executor.submitPending()).toBe(true);
    collect(executor, completions, 4);
    expect(completions.map((c) => c.head).sort()).toEqual(heads);
    expect(completions.every((c) => c.status === BlkStatus.OK && c.written === 4096)).toBe(true);
    expect(executor.inFlight).toBe(0);
    const image = fs.readFileSync(path.join(dir, 'disk.img'));
    expect(Buffer.compare(fx.bytes.subarray(pageOffset, pageOffset + 4 * 4096), image.subarray(0, 4 * 4096))).toBe(0);
  });

  it('waitIdle returns at once with nothing in flight', () => {
    fd = fs.openSync(path.join(dir, 'disk.img'), 'r+');
    executor = new UringExecutor(fd, limits, { depth: 2 });
    expect(executor.waitIdle(1000)).toBe(true);
  });
});

const engines: [string, boolean][] = [
  ['io_uring', uringUnavailable !== null || directDir === null],
  ['sync', directDir === null],
];
if (directDir === null) console.warn('O_DIRECT tests skipped: no directory on a file system that accepts O_DIRECT');

describe.each(engines)('cache=none (O_DIRECT) with the %s engine', (engine, skip) => {
  let dir: string;
  let fd = -1;
  let fx: MemoryFixture;
  let executor: RequestExecutor;
  let completions: Completion[];
  let bounces = 0;

  beforeEach(() => {
    if (skip) return;
    dir = fs.mkdtempSync(path.join(directDir!, 'vublk-direct-'));
    fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(IMAGE_BYTES));
    fx = memoryFixture(8 << 20);
    completions = [];
    bounces = 0;
  });

  afterEach(() => {
    if (skip) return;
    executor?.close();
    if (fd >= 0) sys.close(fd);
    fd = -1;
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it.skipIf(skip)('writes and reads aligned buffers directly and unaligned ones through counted bounce buffers', () => {
    const opened = openRawImage(path.join(dir, 'disk.img'), false, 'none');
    fd = opened.fd;
    expect(opened.io.memAlign).toBeGreaterThan(1);
    expect(opened.io.memAlign & (opened.io.memAlign - 1)).toBe(0);
    const fdinfo = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
    const flags = parseInt(/flags:\s*(\d+)/.exec(fdinfo)![1]!, 8);
    expect(flags & fs.constants.O_DIRECT).toBe(fs.constants.O_DIRECT);
    const options = { ...engineOptions(opened.io), onBounce: () => bounces++ };
    executor = engine === 'io_uring' ? new UringExecutor(fd, limits, options) : new SyncExecutor(fd, limits, options);
    executor.onComplete = (c) => completions.push({ ...c });

    const align = (4096 - (addressOf(fx.bytes) % 4096)) % 4096;
    const data = randomBytes(64 * 1024);
    const status = (i: number): number => fx.gpa(fx.bytes.length - 1 - i);
    // Aligned write of 32 KiB in two segments, unaligned write (odd address, 512-byte pieces) of 32 KiB.
    fx.bytes.set(data.subarray(0, 32768), align);
    fx.bytes.set(data.subarray(32768), align + 65536 + 8);
    const writes = [
      request(
        BlkRequestType.OUT,
        0,
        [
          [fx.gpa(align), 16384],
          [fx.gpa(align + 16384), 16384],
        ],
        status(0),
      ),
      request(
        BlkRequestType.OUT,
        64,
        [
          [fx.gpa(align + 65536 + 8), 512 * 60],
          [fx.gpa(align + 65536 + 8 + 512 * 60), 32768 - 512 * 60],
        ],
        status(1),
      ),
    ];
    writes.forEach((w, i) => {
      executor.submit(fx.memory, w, i, IMAGE_BYTES, true);
    });
    collect(executor, completions, 2);
    expect(completions.map((c) => c.status)).toEqual([BlkStatus.OK, BlkStatus.OK]);
    expect(bounces).toBe(1);
    expect(Buffer.compare(fs.readFileSync(path.join(dir, 'disk.img')).subarray(0, 65536), data)).toBe(0);

    // Read back: unaligned destination for the first half, aligned for the second.
    completions.length = 0;
    const reads = [
      request(BlkRequestType.IN, 0, [[fx.gpa(align + 200000 + 3), 32768]], status(2)),
      request(BlkRequestType.IN, 64, [[fx.gpa(align + 4 * 65536), 32768]], status(3)),
    ];
    reads.forEach((r, i) => executor.submit(fx.memory, r, 10 + i, IMAGE_BYTES, true));
    collect(executor, completions, 2);
    expect(completions.map((c) => c.status)).toEqual([BlkStatus.OK, BlkStatus.OK]);
    expect(bounces).toBe(2);
    expect(Buffer.compare(fx.bytes.subarray(align + 200003, align + 200003 + 32768), data.subarray(0, 32768))).toBe(0);
    expect(Buffer.compare(fx.bytes.subarray(align + 4 * 65536, align + 4 * 65536 + 32768), data.subarray(32768))).toBe(0);

    // FLUSH → fdatasync, in both engines.
    completions.length = 0;
    executor.submit(fx.memory, request(BlkRequestType.FLUSH, 0, [], status(4)), 20, IMAGE_BYTES, true);
    collect(executor, completions, 1);
    expect(completions[0]).toMatchObject({ status: BlkStatus.OK, type: BlkRequestType.FLUSH });
  });
});
