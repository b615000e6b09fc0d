// The qcow2 executor on a real image with the io_uring engine: work that a reap releases (a deferred write
// retried once the allocation it waited for committed) reaches the kernel within that reap, so a drain that
// ends there (a poisoned ring is not drained again) does not leave it unsubmitted for ever.
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
});
