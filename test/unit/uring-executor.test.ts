/**
 * Both request engines against a real image file and real (Buffer-backed) guest memory: they must agree on
 * every result. The io_uring half is skipped when the kernel refuses io_uring.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BlkRequestType, BlkStatus, encodeDiscardSegment } from '../../protocol/virtio-blk.js';
import { BlkRequest } from '../../src/dataplane/blk-request.js';
import type { DeviceLimits } from '../../src/dataplane/device-limits.js';
import type { Completion, RequestExecutor } from '../../src/dataplane/request-executor.js';
import { SyncExecutor } from '../../src/dataplane/sync-executor.js';
import { UringExecutor } from '../../src/dataplane/uring-executor.js';
import { probeIoUring } from '../../src/sys/io-uring.js';
import { waitReadable } from '../../src/sys/poll-wait.js';
import { drainEventFd } from '../../src/sys/eventfd.js';
import { ENGINE_TEST_LIMITS, memoryFixture, type MemoryFixture } from './guest-memory-fixture.js';

const limits: DeviceLimits = { ...ENGINE_TEST_LIMITS, serial: new Uint8Array(Buffer.from('serial-0123456789abc')) };
const IMAGE_BYTES = 1 << 20;
const CAPACITY = 2 * IMAGE_BYTES; // reads past the end of the file zero-fill
const uringUnavailable = probeIoUring();

type Factory = (fd: number) => RequestExecutor;
const engines: [string, Factory, boolean][] = [
  ['sync', (fd) => new SyncExecutor(fd, limits), false],
  ['io_uring (depth 4)', (fd) => new UringExecutor(fd, limits, { depth: 4 }), uringUnavailable !== null],
  ['io_uring (depth 128)', (fd) => new UringExecutor(fd, limits), uringUnavailable !== null],
];
if (uringUnavailable !== null) console.warn(`io_uring engine tests skipped: ${uringUnavailable}`);

interface Op {
  type: number;
  sector?: number;
  /** [offset in guest memory, length] data segments. */
  segs?: [number, number][];
}

describe.each(engines)('%s engine', (_name, create, skip) => {
  let dir: string;
  let imagePath: string;
  let image: Buffer;
  let fd: number;
  let fx: MemoryFixture;
  let executor: RequestExecutor;
  let completions: Completion[];
  const request = new BlkRequest(limits.segMax + 2);
  let nextHead = 0;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-exec-'));
    imagePath = path.join(dir, 'disk.img');
    image = randomBytes(IMAGE_BYTES);
    fs.writeFileSync(imagePath, image);
    fd = fs.openSync(imagePath, 'r+');
    fx = memoryFixture(8 << 20);
    completions = [];
    nextHead = 0;
  });

  afterEach(() => {
    executor?.close();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function start(useFd = fd): void {
    executor = create(useFd);
    executor.onComplete = (c) => completions.push({ ...c });
  }

  /** Submits one request (status byte at the end of guest memory, per head); returns its head. */
  function submit(op: Op, writeback = true): number {
    request.type = op.type;
    request.sector = op.sector ?? 0;
    request.segCount = 0;
    request.dataBytes = 0;
    const head = nextHead++;
    request.statusGpa = fx.gpa(fx.bytes.length - 1 - head);
    for (const [offset, len] of op.segs ?? []) request.addSegment(fx.gpa(offset), len);
    // The engine never waits for room itself: the drain stops popping; here, wait for what is in flight.
    if (!executor.canAccept(request)) expect(executor.waitIdle(10_000)).toBe(true);
    // The engine never waits for room itself: the drain stops popping; here, wait for what is in flight.
    if (!executor.canAccept(request)) expect(executor.waitIdle(10_000)).toBe(true);
    executor.submit(fx.memory, request, head, CAPACITY, writeback);
    return head;
  }

  function byHead(head: number): Completion {
    const found = completions.find((c) => c.head === head);
    expect(found, `completion for head ${head}`).toBeDefined();
    return found!;
  }

  it.skipIf(skip)('reads many multi-segment requests straight into guest memory, more than the depth at once', () => {
    start();
    fx.bytes.fill(0xee);
    const reads: { head: number; sector: number; segs: [number, number][] }[] = [];
    let at = 0;
    for (let i = 0; i < 40; i++) {
      const sector = (i * 37) % (IMAGE_BYTES / 512 - 256);
      const segs: [number, number][] = [];
      for (let s = 0; s < 1 + (i % 3); s++) {
        const len = 512 * (1 + ((i + s) % 16));
        segs.push([at, len]);
        at += len + 512; // gaps stay 0xee
      }
      reads.push({ head: submit({ type: BlkRequestType.IN, sector, segs }), sector, segs });
    }
    expect(executor.waitIdle(10_000)).toBe(true);
    expect(executor.inFlight).toBe(0);
    expect(completions).toHaveLength(40);
    for (const { head, sector, segs } of reads) {
      const c = byHead(head);
      const total = segs.reduce((n, [, len]) => n + len, 0);
      expect(c).toMatchObject({ status: BlkStatus.OK, type: BlkRequestType.IN, written: total, dataBytes: total, error: '' });
      expect(c.latencyNanos).toBeGreaterThan(0);
      let fileAt = sector * 512;
      for (const [offset, len] of segs) {
        expect(fx.bytes.subarray(offset, offset + len).equals(image.subarray(fileAt, fileAt + len))).toBe(true);
        expect(fx.bytes[offset + len]).toBe(0xee);
        fileAt += len;
      }
    }
  });

  it.skipIf(skip)('zero-fills a read that runs past the end of the image file', () => {
    start();
    fx.bytes.fill(0xff);
    const sector = (IMAGE_BYTES - 8192) / 512;
    const head = submit({
      type: BlkRequestType.IN,
      sector,
      segs: [
        [0, 4096],
        [8192, 12288],
      ],
    });
    const beyond = submit({ type: BlkRequestType.IN, sector: IMAGE_BYTES / 512 + 8, segs: [[65536, 4096]] });
    expect(executor.waitIdle(10_000)).toBe(true);
    expect(byHead(head)).toMatchObject({ status: BlkStatus.OK, written: 16384 });
    expect(fx.bytes.subarray(0, 4096).equals(image.subarray(IMAGE_BYTES - 8192, IMAGE_BYTES - 4096))).toBe(true);
    expect(fx.bytes.subarray(8192, 12288).equals(image.subarray(IMAGE_BYTES - 4096))).toBe(true);
    expect(fx.bytes.subarray(12288, 20480).every((b) => b === 0)).toBe(true);
    expect(fx.bytes[20480]).toBe(0xff);
    expect(byHead(beyond)).toMatchObject({ status: BlkStatus.OK, written: 4096 });
    expect(fx.bytes.subarray(65536, 65536 + 4096).every((b) => b === 0)).toBe(true);
  });

  for (const writeback of [true, false]) {
    it.skipIf(skip)(`writes (${writeback ? 'writeback' : 'write-through'}), then a FLUSH that completes after every earlier write`, () => {
      start();
      const STRIDE = 40960; // 24 of them stay inside the 1 MiB image
      const payload = randomBytes(2 << 20);
      fx.bytes.set(payload, 0);
      const writes: number[] = [];
      for (let i = 0; i < 24; i++) {
        const len = 4096 * (1 + (i % 8));
        writes.push(
          submit(
            {
              type: BlkRequestType.OUT,
              sector: (i * STRIDE) / 512,
              segs: [
                [i * STRIDE, len / 2],
                [i * STRIDE + len / 2, len / 2],
              ],
            },
            writeback,
          ),
        );
      }
      const flush = submit({ type: BlkRequestType.FLUSH });
      expect(executor.waitIdle(10_000)).toBe(true);
      expect(executor.inFlight).toBe(0);
      const flushAt = completions.findIndex((c) => c.head === flush);
      for (const head of writes) {
        expect(byHead(head)).toMatchObject({ status: BlkStatus.OK, written: 0, error: '' });
        expect(completions.findIndex((c) => c.head === head)).toBeLessThan(flushAt);
      }
      expect(byHead(flush)).toMatchObject({ status: BlkStatus.OK, type: BlkRequestType.FLUSH });
      const onDisk = fs.readFileSync(imagePath);
      for (let i = 0; i < 24; i++) {
        const len = 4096 * (1 + (i % 8));
        expect(onDisk.subarray(i * STRIDE, i * STRIDE + len).equals(payload.subarray(i * STRIDE, i * STRIDE + len))).toBe(true);
        expect(onDisk.subarray(i * STRIDE + len, (i + 1) * STRIDE).equals(image.subarray(i * STRIDE + len, (i + 1) * STRIDE))).toBe(true);
      }
    });
  }

  it.skipIf(skip)('extends the file when writing past its end', () => {
    start();
    fx.bytes.fill(0x5a, 0, 8192);
    const head = submit({ type: BlkRequestType.OUT, sector: (IMAGE_BYTES + 4096) / 512, segs: [[0, 8192]] });
    expect(executor.waitIdle(10_000)).toBe(true);
    expect(byHead(head).status).toBe(BlkStatus.OK);
    const onDisk = fs.readFileSync(imagePath);
    expect(onDisk.length).toBe(IMAGE_BYTES + 4096 + 8192);
    expect(onDisk.subarray(IMAGE_BYTES, IMAGE_BYTES + 4096).every((b) => b === 0)).toBe(true);
    expect(onDisk.subarray(IMAGE_BYTES + 4096).every((b) => b === 0x5a)).toBe(true);
  });

  it.skipIf(skip)('keeps a DISCARD behind the write submitted before it, and answers GET_ID', () => {
    start();
    fx.bytes.fill(0x77, 0, 65536);
    const write = submit({ type: BlkRequestType.OUT, sector: 128, segs: [[0, 65536]] });
    fx.bytes.set(encodeDiscardSegment({ sector: 128, numSectors: 64, flags: 0 }), 131072);
    const discard = submit({ type: BlkRequestType.WRITE_ZEROES, segs: [[131072, 16]] });
    const getId = submit({ type: BlkRequestType.GET_ID, segs: [[200000, 20]] });
    expect(executor.waitIdle(10_000)).toBe(true);
    expect(byHead(write).status).toBe(BlkStatus.OK);
    expect(byHead(discard)).toMatchObject({ status: BlkStatus.OK, type: BlkRequestType.WRITE_ZEROES });
    expect(byHead(getId)).toMatchObject({ status: BlkStatus.OK, written: 20 });
    expect(Buffer.from(fx.bytes.subarray(200000, 200020)).toString('latin1')).toBe('serial-0123456789abc');
    const onDisk = fs.readFileSync(imagePath);
    expect(onDisk.subarray(65536, 65536 + 32768).every((b) => b === 0)).toBe(true);
    expect(onDisk.subarray(65536 + 32768, 65536 + 65536).every((b) => b === 0x77)).toBe(true);
  });

  it.skipIf(skip)('fails a write on a read-only fd with IOERR naming the errno, and keeps serving', () => {
    const readOnly = fs.openSync(imagePath, 'r');
    try {
      start(readOnly);
      fx.bytes.fill(1, 0, 4096);
      const write = submit({ type: BlkRequestType.OUT, sector: 0, segs: [[0, 4096]] }, false);
      const read = submit({ type: BlkRequestType.IN, sector: 8, segs: [[8192, 4096]] });
      const flush = submit({ type: BlkRequestType.FLUSH });
      expect(executor.waitIdle(10_000)).toBe(true);
      expect(byHead(write).status).toBe(BlkStatus.IOERR);
      expect(byHead(write).error).toMatch(/EBADF/);
      expect(byHead(read).status).toBe(BlkStatus.OK);
      expect(fx.bytes.subarray(8192, 12288).equals(image.subarray(4096, 8192))).toBe(true);
      // fdatasync on a read-only fd succeeds on Linux.
      expect(byHead(flush).status).toBe(BlkStatus.OK);
      expect(executor.inFlight).toBe(0);
    } finally {
      executor.close();
      fs.closeSync(readOnly);
    }
  });

  it.skipIf(skip)('fails every request on a bad fd without leaving anything in flight', () => {
    start(1 << 20);
    submit({ type: BlkRequestType.IN, sector: 0, segs: [[0, 4096]] });
    submit({ type: BlkRequestType.OUT, sector: 0, segs: [[0, 4096]] }, false);
    submit({ type: BlkRequestType.FLUSH });
    expect(executor.waitIdle(10_000)).toBe(true);
    expect(completions.map((c) => c.status)).toEqual([BlkStatus.IOERR, BlkStatus.IOERR, BlkStatus.IOERR]);
    for (const c of completions) expect(c.error).toMatch(/EBADF/);
    expect(executor.inFlight).toBe(0);
  });

  it.skipIf(skip)('flush with nothing submitted returns at once, and close is idempotent', () => {
    start();
    expect(executor.waitIdle(10_000)).toBe(true);
    expect(completions).toEqual([]);
    executor.close();
    executor.close();
  });
});

// DISCARD / WRITE_ZEROES on a file go through FALLOCATE SQEs: the worker never waits for them, the first
// one drains what came before, and a file system without ZERO_RANGE (tmpfs) gets zeroes written instead.
describe.skipIf(uringUnavailable !== null)('io_uring engine: DISCARD / WRITE_ZEROES without blocking the worker', () => {
  const cases: [string, string][] = [
    ['ext4 or the like (os.tmpdir())', os.tmpdir()],
    ['tmpfs (/dev/shm: no FALLOC_FL_ZERO_RANGE)', '/dev/shm'],
  ];
  describe.each(cases)('on %s', (_label, base) => {
    const available = fs.existsSync(base);
    let dir: string;
    let fd: number;
    let fx: MemoryFixture;
    let executor: UringExecutor;
    let completions: Completion[];
    const request = new BlkRequest(limits.segMax + 2);

    beforeEach(() => {
      if (!available) return;
      dir = fs.mkdtempSync(path.join(base, 'vublk-ranges-'));
      fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(IMAGE_BYTES, 0x5a));
      fd = fs.openSync(path.join(dir, 'disk.img'), 'r+');
      fx = memoryFixture(1 << 20);
      completions = [];
      executor = new UringExecutor(fd, limits);
      executor.onComplete = (c) => completions.push({ ...c });
    });

    afterEach(() => {
      if (!available) return;
      executor.close();
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** A DISCARD / WRITE_ZEROES of [sector, sectors, unmap] ranges; its segments at guest offset `at`. */
    function submitRanges(head: number, type: number, ranges: [number, number, boolean][], at: number): void {
      ranges.forEach(([sector, numSectors, unmap], i) =>
        fx.bytes.set(encodeDiscardSegment({ sector, numSectors, flags: unmap ? 1 : 0 }), at + 16 * i),
      );
      request.type = type;
      request.sector = 0;
      request.segCount = 0;
      request.dataBytes = 0;
      request.statusGpa = fx.gpa(fx.bytes.length - 1 - head);
      request.addSegment(fx.gpa(at), 16 * ranges.length);
      expect(executor.canAccept(request)).toBe(true);
      executor.submit(fx.memory, request, head, IMAGE_BYTES, true);
    }

    it.skipIf(!available)('stay in flight after submit (even behind a write), start after it, and zero what they cover', () => {
      fx.bytes.fill(0x11, 0, 65536);
      request.type = BlkRequestType.OUT;
      request.sector = 0;
      request.segCount = 0;
      request.dataBytes = 0;
      request.statusGpa = fx.gpa(fx.bytes.length - 100);
      request.addSegment(fx.gpa(0), 65536);
      executor.submit(fx.memory, request, 100, IMAGE_BYTES, true);
      // Zero (no unmap) two ranges, one of them inside the write's range, and discard one elsewhere.
      submitRanges(
        1,
        BlkRequestType.WRITE_ZEROES,
        [
          [64, 32, false],
          [1024, 8, false],
        ],
        200_000,
      );
      submitRanges(2, BlkRequestType.DISCARD, [[512, 64, false]], 200_100);
      submitRanges(3, BlkRequestType.WRITE_ZEROES, [[1536, 16, true]], 200_200);
      // Nothing ran inside submit: the worker would go back to its rings now.
      expect(completions).toEqual([]);
      expect(executor.inFlight).toBe(4);
      expect(executor.submitPending()).toBe(true);
      expect(executor.waitIdle(10_000)).toBe(true);
      // The write first (the first range drains it); the later ranges of a request are not ordered against
      // requests that came after it, as nothing in flight is in virtio-blk.
      expect(completions[0]).toMatchObject({ head: 100, status: BlkStatus.OK });
      expect(completions.map((c) => [c.head, c.status, c.error]).sort()).toEqual([
        [1, BlkStatus.OK, ''],
        [100, BlkStatus.OK, ''],
        [2, BlkStatus.OK, ''],
        [3, BlkStatus.OK, ''],
      ]);
      const disk = fs.readFileSync(path.join(dir, 'disk.img'));
      expect(disk.length).toBe(IMAGE_BYTES);
      // The zeroed range inside the write lost to the WRITE_ZEROES submitted after it, the rest kept the write.
      expect(disk.subarray(0, 32768).every((b) => b === 0x11)).toBe(true);
      expect(disk.subarray(32768, 49152).every((b) => b === 0)).toBe(true);
      expect(disk.subarray(49152, 65536).every((b) => b === 0x11)).toBe(true);
      expect(disk.subarray(1024 * 512, 1032 * 512).every((b) => b === 0)).toBe(true);
      expect(disk.subarray(1032 * 512, 1033 * 512).every((b) => b === 0x5a)).toBe(true);
      expect(disk.subarray(512 * 512, 576 * 512).every((b) => b === 0)).toBe(true);
      expect(disk.subarray(1536 * 512, 1552 * 512).every((b) => b === 0)).toBe(true);
      // A second zeroing after a refused ZERO_RANGE (tmpfs) takes the remembered fallback.
      fs.writeSync(fd, Buffer.alloc(4096, 0x22), 0, 4096, 1800 * 512);
      submitRanges(4, BlkRequestType.WRITE_ZEROES, [[1800, 8, false]], 200_300);
      expect(executor.waitIdle(10_000)).toBe(true);
      expect(completions.at(-1)).toMatchObject({ head: 4, status: BlkStatus.OK, type: BlkRequestType.WRITE_ZEROES });
      expect(
        fs
          .readFileSync(path.join(dir, 'disk.img'))
          .subarray(1800 * 512, 1808 * 512)
          .every((b) => b === 0),
      ).toBe(true);
    });

    it.skipIf(!available)('fail with IOERR naming the errno when the kernel refuses the range, and keep serving', () => {
      executor.close();
      const readOnly = fs.openSync(path.join(dir, 'disk.img'), 'r');
      try {
        executor = new UringExecutor(readOnly, limits);
        executor.onComplete = (c) => completions.push({ ...c });
        submitRanges(1, BlkRequestType.DISCARD, [[0, 8, false]], 200_000);
        expect(executor.waitIdle(10_000)).toBe(true);
        expect(completions).toHaveLength(1);
        expect(completions[0]!.status).toBe(BlkStatus.IOERR);
        expect(completions[0]!.error).toMatch(/fallocate: EBADF/);
        expect(executor.inFlight).toBe(0);
      } finally {
        executor.close();
        fs.closeSync(readOnly);
        executor = new UringExecutor(fd, limits);
      }
    });
  });
});

// The worker sleeps on the ring's eventfd between wake-ups (edge-triggered epoll) and reaps once per wake.
// Requests held behind a draining FLUSH are released together when it completes; every one of them must
// complete through such wake-ups alone (with DEFER_TASKRUN the kernel left part of the burst unposted and
// never signalled the eventfd again: the worker slept for ever).
describe.skipIf(uringUnavailable !== null)('io_uring engine: a burst behind a FLUSH, driven by eventfd wake-ups only', () => {
  it('writes, a FLUSH, then many reads: all complete, each wake-up followed by one reap', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-burst-'));
    const fd = fs.openSync(path.join(dir, 'disk.img'), 'w+');
    fs.ftruncateSync(fd, IMAGE_BYTES);
    const fx = memoryFixture(4 << 20);
    const executor = new UringExecutor(fd, limits);
    const done: Completion[] = [];
    executor.onComplete = (c) => done.push({ ...c });
    const request = new BlkRequest(limits.segMax + 2);
    const submit = (head: number, type: number, sector: number, at: number | null): void => {
      request.type = type;
      request.sector = sector;
      request.segCount = 0;
      request.dataBytes = 0;
      request.statusGpa = fx.gpa(fx.bytes.length - 1 - head);
      if (at !== null) request.addSegment(fx.gpa(at), 4096);
      expect(executor.canAccept(request)).toBe(true);
      executor.submit(fx.memory, request, head, IMAGE_BYTES, true);
    };
    try {
      const count = 96;
      for (let i = 0; i < count; i++) submit(i, BlkRequestType.OUT, i * 8, i * 4096);
      submit(count, BlkRequestType.FLUSH, 0, null);
      for (let i = 0; i < count; i++) submit(count + 1 + i, BlkRequestType.IN, i * 8, (count + i) * 4096);
      expect(executor.submitPending()).toBe(true);
      for (let wakeups = 0; done.length < 2 * count + 1; wakeups++) {
        expect(waitReadable(executor.completionFd, 10_000), `wake-up ${wakeups}: ${done.length} of ${2 * count + 1} completed`).toBe(true);
        drainEventFd(executor.completionFd);
        executor.reap();
        executor.submitPending();
      }
      expect(done.every((c) => c.status === BlkStatus.OK)).toBe(true);
      expect(executor.inFlight).toBe(0);
    } finally {
      executor.close();
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
