// Inflight tracking: the worker's InflightQueue over a real shared mapping (a crash is simulated by a second
// InflightQueue taking over the same bytes, as the next daemon does), and the control plane's validation of
// what a front-end hands over with SET_INFLIGHT_FD.
import { afterEach, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import { createMemfd, mapShared, unmap } from '../../src/sys/memory-map.js';
import { closeFd } from '../../src/sys/fd.js';
import { InflightQueue, InflightRegionError } from '../../src/dataplane/inflight-queue.js';
import {
  DESC_STATE_BYTES,
  QUEUE_HEADER_BYTES,
  QueueHeaderOffset,
  inflightQueueStride,
  inflightRegionBytes,
} from '../../src/dataplane/inflight-layout.js';
import { InflightFdError, createInflightFd, mapInflightRegion } from '../../src/control/inflight-region.js';
import koffi from 'koffi';
import { spawnSync } from 'node:child_process';

const SIZE = 16;
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

function region(bytes = inflightQueueStride(SIZE)): { addr: number; view: DataView } {
  const fd = createMemfd('inflight-test', bytes);
  const addr = mapShared(fd, bytes, 0);
  closeFd(fd);
  cleanups.push(() => unmap(addr, bytes));
  return { addr, view: new DataView(koffi.view(addr, bytes)) };
}

function queueOver(addr: number): InflightQueue {
  return new InflightQueue({ hostAddr: addr, bytes: inflightQueueStride(SIZE), descNum: SIZE });
}

describe('InflightQueue', () => {
  it('an uninitialized region resumes at the front-end base and is set up (version 1, desc_num)', () => {
    const { addr, view } = region();
    const resume = queueOver(addr).resume(5, SIZE, 5);
    expect(resume).toEqual({ lastAvailIdx: 5, resubmit: [], batchFixed: 0 });
    expect(view.getUint16(QueueHeaderOffset.version, true)).toBe(1);
    expect(view.getUint16(QueueHeaderOffset.descNum, true)).toBe(SIZE);
  });

  it('after a crash: what was popped and not used is resubmitted in pop order, popping continues past it', () => {
    const { addr } = region();
    const first = queueOver(addr);
    first.resume(0, SIZE, 0);
    for (const head of [7, 3, 12, 1]) first.popped(head);
    // 3 completes first (out of order): used.idx becomes 1.
    first.beforeUsed(3);
    first.afterUsed(3, 1);
    // "kill -9": the next daemon takes over the same bytes; QEMU rewound its base to used.idx = 1.
    const next = queueOver(addr);
    expect(next.resume(1, SIZE, 1)).toEqual({ lastAvailIdx: 4, resubmit: [7, 12, 1], batchFixed: 0 });
    // New pops count on from the oldest resubmitted: a second crash keeps the order.
    next.popped(9);
    expect(queueOver(addr).resume(1, SIZE, 1).resubmit).toEqual([7, 12, 1, 9]);
  });

  it('a crash between used.idx and the clear: the last batch is committed, not resubmitted', () => {
    const { addr } = region();
    const first = queueOver(addr);
    first.resume(0, SIZE, 0);
    first.popped(4);
    first.popped(6);
    first.beforeUsed(6);
    // used ring updated (used.idx 0 → 1), then the process died before afterUsed.
    const resume = queueOver(addr).resume(1, SIZE, 1);
    expect(resume).toEqual({ lastAvailIdx: 2, resubmit: [4], batchFixed: 1 });
  });

  it('a put-back (no room, throttle) is not in flight', () => {
    const { addr } = region();
    const q = queueOver(addr);
    q.resume(0, SIZE, 0);
    q.popped(2);
    q.popped(5);
    q.unpopped(5);
    expect(q.markedHeads()).toEqual([2]);
  });

  const corruptions: [string, (view: DataView) => void, RegExp][] = [
    ['an unknown version', (v) => v.setUint16(QueueHeaderOffset.version, 7, true), /version 7/],
    ['desc_num other than the queue size', (v) => v.setUint16(QueueHeaderOffset.descNum, SIZE * 2, true), /desc_num 32/],
    ['an inflight flag other than 0/1', (v) => v.setUint8(QUEUE_HEADER_BYTES + DESC_STATE_BYTES * 3, 9), /flag 9/],
    [
      'a last batch linking outside the ring',
      (v) => {
        v.setUint8(QUEUE_HEADER_BYTES, 1);
        v.setUint16(QueueHeaderOffset.lastBatchHead, 0xffff, true);
        v.setUint16(QueueHeaderOffset.usedIdx, 0xfffe, true);
      },
      /outside the ring/,
    ],
    ['used_idx far behind used.idx', (v) => v.setUint16(QueueHeaderOffset.usedIdx, 1000, true), /behind/],
  ];
  for (const [what, corrupt, message] of corruptions) {
    it(`refuses a region with ${what}, leaving it as found`, () => {
      const { addr, view } = region();
      queueOver(addr).resume(0, SIZE, 0);
      corrupt(view);
      const before = Buffer.from(new Uint8Array(view.buffer)).toString('hex');
      expect(() => queueOver(addr).resume(0, SIZE, 0)).toThrow(message);
      expect(() => queueOver(addr).resume(0, SIZE, 0)).toThrow(InflightRegionError);
      expect(Buffer.from(new Uint8Array(view.buffer)).toString('hex')).toBe(before);
    });
  }

  it('refuses a ring larger than the region and a region too small for its descriptors', () => {
    const { addr } = region();
    queueOver(addr).resume(0, SIZE, 0);
    expect(() => queueOver(addr).resume(0, SIZE * 2, 0)).toThrow(/larger than the region/);
    expect(() => new InflightQueue({ hostAddr: addr, bytes: 64, descNum: SIZE })).toThrow(InflightRegionError);
  });
});

describe('SET_INFLIGHT_FD validation', () => {
  const geometry = { numQueues: 2, queueSize: 128 };

  it('GET_INFLIGHT_FD sizes the memfd for num_queues × queue_size; SET maps it back', () => {
    const { fd, description } = createInflightFd(geometry, 2);
    expect(Number(description.mmapSize)).toBe(inflightRegionBytes(2, 128));
    expect(fs.fstatSync(fd).size).toBe(inflightRegionBytes(2, 128));
    const mapped = mapInflightRegion(description, fd, 2);
    expect(mapped.queue(1)?.hostAddr).toBe(mapped.queue(0)!.hostAddr + inflightQueueStride(128));
    expect(mapped.queue(2)).toBeUndefined();
    mapped.unmap();
  });

  const refusals: [string, Partial<{ numQueues: number; queueSize: number; mmapSize: bigint; mmapOffset: bigint }>, RegExp][] = [
    ['num_queues 0', { numQueues: 0 }, /num_queues 0/],
    ['more queues than the disk', { numQueues: 3 }, /num_queues 3/],
    ['queue_size not a power of two', { queueSize: 100 }, /queue_size 100/],
    ['mmap_size too small', { mmapSize: 64n }, /mmap_size 64/],
    ['an unaligned offset', { mmapOffset: 3n }, /mmap_offset 3/],
    ['an offset past the end of the file', { mmapOffset: 1n << 20n }, /the file has/],
  ];
  for (const [what, change, message] of refusals) {
    it(`refuses ${what}`, () => {
      const { fd, description } = createInflightFd(geometry, 2);
      expect(() => mapInflightRegion({ ...description, ...change }, fd, 2)).toThrow(message);
      // The fd was consumed either way.
      expect(() => fs.fstatSync(fd)).toThrow();
    });
  }

  it('refuses an fd that is not a file, and a queue header of another geometry', () => {
    const [readEnd, writeEnd] = pipeFds();
    const description = { mmapSize: BigInt(inflightRegionBytes(2, 128)), mmapOffset: 0n, ...geometry };
    expect(() => mapInflightRegion(description, readEnd, 2)).toThrow(/pipe/);
    closeFd(writeEnd);
    const { fd } = createInflightFd(geometry, 2);
    const header = mapShared(fd, 16, 0);
    const view = new DataView(koffi.view(header, 16));
    view.setUint16(QueueHeaderOffset.version, 1, true);
    view.setUint16(QueueHeaderOffset.descNum, 64, true);
    unmap(header, 16);
    expect(() => mapInflightRegion(description, fd, 2)).toThrow(InflightFdError);
  });
});

/** A FIFO opened read-write stands in for the pipe a hostile front-end could send. */
function pipeFds(): [number, number] {
  const dir = fs.mkdtempSync('/tmp/vublk-inflight-');
  const fifo = `${dir}/fifo`;
  if (spawnSync('mkfifo', [fifo]).status !== 0) throw new Error('mkfifo failed');
  const read = fs.openSync(fifo, fs.constants.O_RDWR);
  const write = fs.openSync(fifo, fs.constants.O_RDWR);
  fs.rmSync(dir, { recursive: true, force: true });
  return [read, write];
}
