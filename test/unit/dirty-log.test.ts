// The migration dirty log over real memfds: what the data plane marks is what the front-end reads back
// through its own view of the fd, bits are never lost against a concurrent reader that clears them, and
// the control plane refuses logs that could fault the daemon.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import koffi from 'koffi';
import { afterEach, describe, expect, it } from 'vitest';
import { Counter } from '../../src/dataplane/counters.js';
import { DirtyLog, RingDirtyLog } from '../../src/dataplane/dirty-log.js';
import { DirtyLogError, MAX_LOG_BYTES, mapLog, unmapLog, type MappedLog } from '../../src/control/dirty-log-map.js';
import { sys } from '../../src/sys/libc.js';
import { closeFd } from '../../src/sys/fd.js';

const MFD_CLOEXEC = 1;
const MFD_ALLOW_SEALING = 2;
const F_ADD_SEALS = 1033;
const F_GET_SEALS = 1034;
const F_SEAL_SHRINK = 2;
const F_SEAL_GROW = 4;
const PAGE = 4096;

/** A memfd of `size` bytes like QEMU's log (sealable; sealed against shrinking when `seal`). */
function logMemfd(size: number, seal = true): number {
  const fd = sys.memfdCreate('vublk-test-log', MFD_CLOEXEC | MFD_ALLOW_SEALING);
  expect(fd).toBeGreaterThanOrEqual(0);
  expect(sys.ftruncate(fd, size)).toBe(0);
  if (seal) expect(sys.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)).toBe(0);
  return fd;
}

/** The log bytes as the front-end sees them: read through the fd, not through our mapping. */
function frontendView(fd: number, size: number): Uint8Array {
  const bytes = new Uint8Array(size);
  expect(fs.readSync(fd, bytes, 0, size, 0)).toBe(size);
  return bytes;
}

function markedPages(bytes: Uint8Array): number[] {
  const pages: number[] = [];
  bytes.forEach((byte, i) => {
    for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) pages.push(i * 8 + bit);
  });
  return pages;
}

class CounterSink {
  readonly values = new Map<number, number>();
  add(index: number, amount = 1): void {
    this.values.set(index, (this.values.get(index) ?? 0) + amount);
  }
  get(index: number): number {
    return this.values.get(index) ?? 0;
  }
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

/** Maps a fresh sealed memfd log of `size` bytes the way SET_LOG_BASE does; returns a dup of its fd to read it. */
function mappedLog(size: number): { mapped: MappedLog; log: DirtyLog; readFd: number } {
  const fd = logMemfd(size);
  const readFd = fs.openSync(`/proc/self/fd/${fd}`, 'r');
  const mapped = mapLog({ mmapSize: BigInt(size), mmapOffset: 0n }, fd);
  cleanups.push(
    () => unmapLog(mapped),
    () => fs.closeSync(readFd),
  );
  return { mapped, log: DirtyLog.mapped(mapped.hostAddr, mapped.size), readFd };
}

describe('DirtyLog over a shared memfd', () => {
  it('sets bit p % 8 of byte p / 8 for every 4 KiB page a range touches, visible through the fd', () => {
    const { log, readFd } = mappedLog(64);
    const counters = new CounterSink();
    log.markRange(0, 1, counters); // page 0
    log.markRange(9 * PAGE + 4095, 2, counters); // straddles pages 9 and 10
    log.markRange(100 * PAGE, 3 * PAGE, counters); // pages 100..102
    expect(markedPages(frontendView(readFd, 64))).toEqual([0, 9, 10, 100, 101, 102]);
    expect(frontendView(readFd, 64)[1]).toBe(0b110); // pages 9 and 10: bits 1 and 2 of byte 1
    expect(counters.get(Counter.dirtyPagesLogged)).toBe(6);
    expect(counters.get(Counter.dirtyLogOutOfRange)).toBe(0);
  });

  it('never clears a bit the front-end left set (OR, not store)', () => {
    const { log, readFd } = mappedLog(8);
    const writer = fs.openSync(`/proc/self/fd/${readFd}`, 'r+');
    try {
      fs.writeSync(writer, new Uint8Array([0b1000_0000]), 0, 1, 0);
    } finally {
      fs.closeSync(writer);
    }
    log.markRange(0, 1, new CounterSink());
    expect(frontendView(readFd, 8)[0]).toBe(0b1000_0001);
  });

  it('counts and skips pages beyond the log, marking the part that fits', () => {
    const { log, readFd } = mappedLog(2); // 16 pages
    const counters = new CounterSink();
    log.markRange(16 * PAGE, 1, counters); // first page past the end
    log.markRange(2 ** 52, 4096, counters); // far away
    log.markRange(15 * PAGE, 2 * PAGE, counters); // page 15 fits, 16 does not
    expect(markedPages(frontendView(readFd, 2))).toEqual([15]);
    expect(counters.get(Counter.dirtyLogOutOfRange)).toBe(3);
    expect(counters.get(Counter.dirtyPagesLogged)).toBe(1);
  });

  it('does nothing when logging is off', () => {
    const counters = new CounterSink();
    DirtyLog.off.markRange(0, PAGE, counters);
    expect(DirtyLog.off.active).toBe(false);
    expect(counters.values.size).toBe(0);
  });

  it('loses no bit against a reader that swaps bytes out concurrently (atomic OR)', async () => {
    const pages = 1 << 16;
    const { mapped } = mappedLog(pages / 8);
    // A second thread marks every page once, in a shuffled order, while this thread keeps harvesting.
    const marker = new Worker(
      `
      const { workerData, parentPort } = require('node:worker_threads');
      const koffi = require('koffi');
      const bits = new Uint8Array(koffi.view(workerData.hostAddr, workerData.size));
      for (let round = 0; round < 8; round++) {
        for (let page = round; page < workerData.pages; page += 8) Atomics.or(bits, Math.floor(page / 8), 1 << page % 8);
      }
      parentPort.postMessage('done');
      `,
      { eval: true, workerData: { hostAddr: mapped.hostAddr, size: mapped.size, pages } },
    );
    const bits = DirtyLog.mapped(mapped.hostAddr, mapped.size);
    const view = new Uint8Array(koffi.view(mapped.hostAddr, mapped.size));
    const harvested = new Uint8Array(mapped.size);
    let finished = false;
    const done = new Promise<void>((resolve, reject) => {
      marker.once('message', () => resolve());
      marker.once('error', reject);
    });
    void done.then(() => (finished = true));
    const deadline = Date.now() + 30_000;
    while (!finished && Date.now() < deadline) {
      for (let i = 0; i < view.length; i++) harvested[i]! |= Atomics.exchange(view, i, 0);
      await new Promise((resolve) => setImmediate(resolve));
    }
    await done;
    for (let i = 0; i < view.length; i++) harvested[i]! |= Atomics.exchange(view, i, 0);
    await marker.terminate();
    expect(markedPages(harvested).length).toBe(pages);
    expect(bits.pages).toBe(pages);
  });
});

describe('RingDirtyLog', () => {
  it('marks the recorded data segments of a request when it completes, even if logging began in flight', () => {
    const { log, readFd } = mappedLog(64);
    const counters = new CounterSink();
    const ring = new RingDirtyLog(8, counters);
    const request = { segCount: 2, segGpa: new Float64Array([3 * PAGE + 512, 40 * PAGE]), segLen: new Uint32Array([PAGE, 512]) };
    ring.recordWrites(5, request); // submitted while logging is off
    ring.log = log; // logging turned on while the request is in flight
    ring.markWrites(5);
    ring.markWrites(5); // a second completion of the same head marks nothing more
    expect(markedPages(frontendView(readFd, 64))).toEqual([3, 4, 40]);
  });

  it('marks used-ring writes at log_guest_addr only when the front-end asked for it', () => {
    const { log, readFd } = mappedLog(64);
    const ring = new RingDirtyLog(8, new CounterSink());
    ring.log = log;
    ring.markUsed(2, 2);
    expect(markedPages(frontendView(readFd, 64))).toEqual([]);
    ring.usedLogGpa = 7 * PAGE + 4094;
    ring.markUsed(2, 2); // used->idx lands on the next page
    ring.markByte(20 * PAGE);
    expect(markedPages(frontendView(readFd, 64))).toEqual([8, 20]);
  });

  it('ignores heads outside the queue', () => {
    const ring = new RingDirtyLog(4, new CounterSink());
    ring.recordWrites(9, { segCount: 1, segGpa: new Float64Array([0]), segLen: new Uint32Array([1]) });
    ring.markWrites(-1);
    ring.markWrites(4);
  });
});

describe('mapLog (SET_LOG_BASE)', () => {
  it('maps a log at an offset inside the fd', () => {
    const fd = logMemfd(3 * PAGE);
    const readFd = fs.openSync(`/proc/self/fd/${fd}`, 'r');
    cleanups.push(() => fs.closeSync(readFd));
    const mapped = mapLog({ mmapSize: 16n, mmapOffset: BigInt(PAGE + 8) }, fd);
    cleanups.push(() => unmapLog(mapped));
    DirtyLog.mapped(mapped.hostAddr, mapped.size).markRange(0, 1, new CounterSink());
    const bytes = new Uint8Array(3 * PAGE);
    fs.readSync(readFd, bytes, 0, bytes.length, 0);
    expect(bytes[PAGE + 8]).toBe(1);
    expect(markedPages(bytes)).toEqual([(PAGE + 8) * 8]);
  });

  it('seals a sealable memfd against shrinking', () => {
    const fd = logMemfd(PAGE, false);
    const probe = fs.openSync(`/proc/self/fd/${fd}`, 'r');
    cleanups.push(() => fs.closeSync(probe));
    const mapped = mapLog({ mmapSize: BigInt(PAGE), mmapOffset: 0n }, fd);
    cleanups.push(() => unmapLog(mapped));
    expect(sys.fcntl(probe, F_GET_SEALS, 0) & F_SEAL_SHRINK).toBe(F_SEAL_SHRINK);
  });

  const refusals: [string, () => number, bigint, bigint, RegExp][] = [
    ['a log past the end of its fd', () => logMemfd(PAGE), BigInt(PAGE), 8n, /past the end/],
    ['a log of size 0', () => logMemfd(PAGE), 0n, 0n, /size 0/],
    ['a log over the size limit', () => logMemfd(PAGE), BigInt(MAX_LOG_BYTES + 1), 0n, /limit/],
    [
      'a memfd that cannot be sealed',
      () => {
        const fd = sys.memfdCreate('vublk-test-unsealable', MFD_CLOEXEC);
        sys.ftruncate(fd, PAGE);
        return fd;
      },
      BigInt(PAGE),
      0n,
      /shrink/,
    ],
    [
      'a regular file',
      () => {
        const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vublk-log-')), 'log');
        fs.writeFileSync(file, Buffer.alloc(PAGE));
        return fs.openSync(file, 'r+');
      },
      BigInt(PAGE),
      0n,
      /shrink/,
    ],
    ['a character device', () => fs.openSync('/dev/null', 'r+'), 8n, 0n, /not a memfd/],
  ];
  for (const [what, open, size, offset, message] of refusals) {
    it(`refuses ${what} and closes its fd`, () => {
      const fd = open();
      expect(() => mapLog({ mmapSize: size, mmapOffset: offset }, fd)).toThrow(DirtyLogError);
      // Consumed either way: the fd number is closed.
      expect(() => fs.fstatSync(fd)).toThrow();
      const again = open();
      try {
        expect(() => mapLog({ mmapSize: size, mmapOffset: offset }, again)).toThrow(message);
      } finally {
        if (fs.existsSync(`/proc/self/fd/${again}`)) closeFd(again);
      }
    });
  }
});
