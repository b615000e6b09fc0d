// The qcow2 executor on a real image with the io_uring engine: work that a reap releases (a deferred write
// retried once the allocation it waited for committed) reaches the kernel within that reap, so a drain that
// ends there (a poisoned ring is not drained again) does not leave it unsubmitted for ever; a read inside one
// allocated extent goes straight to the engine (the fast path), a read across data and a hole does not, and
// both land the right bytes.
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { openImage } from '../../src/backend/qcow2/index.js';
import { BlkRequest } from '../../src/dataplane/blk-request.js';
import { createQcow2Executor } from '../../src/dataplane/qcow2-executor.js';
import type { Completion } from '../../src/dataplane/request-executor.js';
import { UringExecutor } from '../../src/dataplane/uring-executor.js';
import { waitReadable } from '../../src/sys/poll-wait.js';
import { ENGINE_TEST_LIMITS, memoryFixture } from '../unit/guest-memory-fixture.js';
import { qemuImg, qemuImgSkipReason } from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason();
const limits = ENGINE_TEST_LIMITS;
let dir = '';

beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-qcow2exec-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.skipIf(skip !== null)('qcow2 executor (io_uring)', () => {
  it('a write deferred behind an allocation is submitted by the reap that retries it', () => {
    const file = path.join(dir, 'fresh.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', file, '16M');
    const fd = openSync(file, 'r+');
    const executor = createQcow2Executor(openImage(file), fd, limits, false, false, (hostFd) => new UringExecutor(hostFd, limits));
    const fixture = memoryFixture(1 << 20);
    const done: Completion[] = [];
    executor.onComplete = (c) => done.push({ ...c });
    const write = (head: number, sector: number, dataOffset: number): void => {
      const r = new BlkRequest(limits.segMax + 2);
      r.type = BlkRequestType.OUT;
      r.sector = sector;
      r.statusGpa = fixture.gpa(0x8000 + head);
      r.addSegment(fixture.gpa(dataOffset), 4096);
      executor.submit(fixture.memory, r, head, 16 << 20, true);
    };
    try {
      // Two writes into the same unallocated cluster: the second waits (RETRY) for the first's allocation.
      write(1, 0, 0x10000);
      write(2, 8, 0x20000);
      executor.submitPending();
      const deadline = Date.now() + 10_000;
      while (done.length < 2 && Date.now() < deadline) {
        // Only what the kernel completes wakes us: an unsubmitted sub-request would leave this wait empty.
        if (!waitReadable(executor.completionFd, 2000)) break;
        executor.reap(); // the last call, as at the end of a drain: no submitPending after it
      }
      expect(done.map((c) => [c.head, c.status])).toEqual([
        [1, BlkStatus.OK],
        [2, BlkStatus.OK],
      ]);
    } finally {
      executor.waitIdle(5000);
      executor.close();
      closeSync(fd);
    }
  });
  it('a read inside one allocated extent takes the fast path; a read across data and a hole takes the general one', () => {
    const file = path.join(dir, 'data.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', file, '16M');
    // Clusters 0 and 1 hold 0xab; cluster 2 stays unallocated (reads as zeroes).
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0xab 0 128k', file]);
    const fd = openSync(file, 'r');
    const executor = createQcow2Executor(openImage(file), fd, limits, false, false, (hostFd) => new UringExecutor(hostFd, limits));
    const fixture = memoryFixture(1 << 20);
    fixture.bytes.fill(0xff);
    const done: Completion[] = [];
    executor.onComplete = (c) => done.push({ ...c });
    const read = (head: number, offset: number, length: number, dataOffset: number): void => {
      const r = new BlkRequest(limits.segMax + 2);
      r.type = BlkRequestType.IN;
      r.sector = offset / 512;
      r.statusGpa = fixture.gpa(0x8000 + head);
      r.addSegment(fixture.gpa(dataOffset), length);
      executor.submit(fixture.memory, r, head, 16 << 20, true);
      // The drain's request object is the caller's again: its sector is not left moved.
      expect(r.sector).toBe(offset / 512);
    };
    const settle = (count: number): void => {
      executor.submitPending();
      const deadline = Date.now() + 10_000;
      while (done.length < count && Date.now() < deadline) {
        if (!waitReadable(executor.completionFd, 2000)) break;
        executor.reap();
      }
    };
    try {
      read(1, 4096, 8192, 0x10000);
      expect(executor.fastReads).toBe(1);
      settle(1);
      read(2, 96 * 1024, 64 * 1024, 0x20000);
      expect(executor.fastReads).toBe(1);
      settle(2);
      expect(done.map((c) => [c.head, c.status, c.written])).toEqual([
        [1, BlkStatus.OK, 8192],
        [2, BlkStatus.OK, 65536],
      ]);
      expect(done[0]?.statusGpa).toBe(fixture.gpa(0x8001));
      expect(fixture.bytes.subarray(0x10000, 0x10000 + 8192).every((b) => b === 0xab)).toBe(true);
      expect(fixture.bytes.subarray(0x20000, 0x20000 + 32768).every((b) => b === 0xab)).toBe(true);
      expect(fixture.bytes.subarray(0x28000, 0x28000 + 32768).every((b) => b === 0)).toBe(true);
      // Nothing outside the two buffers was touched.
      expect(fixture.bytes[0x10000 + 8192]).toBe(0xff);
      expect(fixture.bytes[0x30000]).toBe(0xff);
      expect(executor.inFlight).toBe(0);
    } finally {
      executor.waitIdle(5000);
      executor.close();
      closeSync(fd);
    }
  });
});
