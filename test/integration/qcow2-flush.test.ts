/**
 * qcow2 FLUSH and write-through writes on the io_uring engine: the fdatasync is a sub-request of the top
 * image's engine, so `submit` returns with the FLUSH still in flight (the worker goes back to its rings) and
 * the completion arrives through reap. The data must be in the image (`qemu-img compare`, `check` clean).
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { openImage } from '../../src/backend/qcow2/index.js';
import { BlkRequest } from '../../src/dataplane/blk-request.js';
import { createQcow2Executor, type Qcow2Executor } from '../../src/dataplane/qcow2-executor.js';
import type { Completion } from '../../src/dataplane/request-executor.js';
import { UringExecutor } from '../../src/dataplane/uring-executor.js';
import { probeIoUring } from '../../src/sys/io-uring.js';
import { ENGINE_TEST_LIMITS, memoryFixture, type MemoryFixture } from '../unit/guest-memory-fixture.js';
import { patternFor, qemuImg, qemuImgCheck, qemuImgCompare, qemuImgSkipReason } from '../support/qcow2-harness.js';

const skip = qemuImgSkipReason() ?? probeIoUring();
if (skip !== null) console.warn(`qcow2 flush tests skipped: ${skip}`);
const DISK_BYTES = 16 << 20;

describe.skipIf(skip !== null)('qcow2 FLUSH on the io_uring engine', () => {
  let dir: string;
  let imagePath: string;
  let fd: number;
  let fx: MemoryFixture;
  let executor: Qcow2Executor;
  let completions: Completion[];
  const request = new BlkRequest(ENGINE_TEST_LIMITS.segMax + 2);

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-qflush-'));
    imagePath = path.join(dir, 'disk.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', imagePath, String(DISK_BYTES));
    fd = fs.openSync(imagePath, 'r+');
    fx = memoryFixture(4 << 20);
    completions = [];
    const description = openImage(imagePath, { format: 'qcow2' });
    executor = createQcow2Executor(
      description,
      fd,
      ENGINE_TEST_LIMITS,
      false,
      false,
      (hostFd) => new UringExecutor(hostFd, ENGINE_TEST_LIMITS),
    );
    executor.onComplete = (c) => completions.push({ ...c });
  });

  afterEach(() => {
    executor.close();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function submit(head: number, type: number, sector: number, data: [number, number] | null, writeback: boolean): void {
    request.type = type;
    request.sector = sector;
    request.segCount = 0;
    request.dataBytes = 0;
    request.statusGpa = fx.gpa(fx.bytes.length - 1 - head);
    if (data !== null) request.addSegment(fx.gpa(data[0]), data[1]);
    expect(executor.canAccept(request)).toBe(true);
    executor.submit(fx.memory, request, head, DISK_BYTES, writeback);
  }

  it('a FLUSH stays in flight after submit, completes through reap after the writes, and the data is in the image', () => {
    const first = patternFor(1, 65536);
    const second = patternFor(2, 65536);
    fx.bytes.set(first, 0);
    fx.bytes.set(second, 65536);
    submit(0, BlkRequestType.OUT, 0, [0, 65536], true);
    // Write-through: committed, then synced by the engine, then completed.
    submit(1, BlkRequestType.OUT, 1024, [65536, 65536], false);
    submit(2, BlkRequestType.FLUSH, 0, null, true);
    // Nothing was waited for inside submit: the worker would go back to its rings now.
    expect(completions).toEqual([]);
    expect(executor.inFlight).toBe(3);
    executor.submitPending();
    expect(executor.waitIdle(20_000)).toBe(true);
    expect(completions.map((c) => [c.head, c.status, c.error]).sort()).toEqual([
      [0, BlkStatus.OK, ''],
      [1, BlkStatus.OK, ''],
      [2, BlkStatus.OK, ''],
    ]);
    expect(executor.inFlight).toBe(0);

    const raw = path.join(dir, 'expected.raw');
    const expected = Buffer.alloc(DISK_BYTES);
    first.copy(expected, 0);
    second.copy(expected, 1024 * 512);
    fs.writeFileSync(raw, expected);
    const compared = qemuImgCompare(raw, 'raw', imagePath, 'qcow2');
    expect(compared.status, compared.output).toBe(0);
    // Closed first, like a daemon at exit: clusters reserved for later allocations are given back.
    executor.close();
    const checked = qemuImgCheck(imagePath);
    expect(checked.status, checked.output).toBe(0);
  });

  it('a FLUSH the kernel fails completes with IOERR naming the errno', () => {
    executor.close();
    // The top image's engine on /dev/null: its fdatasync fails (EINVAL, no fsync there), and that error
    // must reach the guest's FLUSH.
    const description = openImage(imagePath, { format: 'qcow2' });
    const broken = fs.openSync('/dev/null', 'r');
    try {
      executor = createQcow2Executor(
        description,
        broken,
        ENGINE_TEST_LIMITS,
        false,
        false,
        (hostFd) => new UringExecutor(hostFd, ENGINE_TEST_LIMITS),
      );
      executor.onComplete = (c) => completions.push({ ...c });
      submit(0, BlkRequestType.FLUSH, 0, null, true);
      executor.submitPending();
      expect(executor.waitIdle(20_000)).toBe(true);
      expect(completions).toHaveLength(1);
      expect(completions[0]!.status).toBe(BlkStatus.IOERR);
      expect(completions[0]!.error).toMatch(/fdatasync: E[A-Z]+/);
    } finally {
      executor.close();
      fs.closeSync(broken);
      executor = createQcow2Executor(
        openImage(imagePath, { format: 'qcow2' }),
        fd,
        ENGINE_TEST_LIMITS,
        false,
        false,
        (hostFd) => new UringExecutor(hostFd, ENGINE_TEST_LIMITS),
      );
    }
  });
});
