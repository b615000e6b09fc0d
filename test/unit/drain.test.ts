// The drain bracket on a real split ring in real memory (a Buffer's address) with the sync engine on a
// real temp file: the notification bracket, its re-check, and the interrupt decision.
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DescFlag, USED_F_NO_NOTIFY } from '../../protocol/split-ring.js';
import { BlkRequestType, BlkStatus, encodeRequestHeader } from '../../protocol/virtio-blk.js';
import { SplitQueue } from '../../src/dataplane/split-queue.js';
import { SyncExecutor } from '../../src/dataplane/sync-executor.js';
import { createCounterBuffer, CounterReader, QueueCounters } from '../../src/dataplane/counters.js';
import { completeRequest, createRequestScratch, drainQueue, unlimited, type DrainContext } from '../../src/dataplane/drain.js';
import type { DeviceLimits } from '../../src/dataplane/device-limits.js';
import type { RequestExecutor } from '../../src/dataplane/request-executor.js';
import { memoryFixture, type MemoryFixture } from './guest-memory-fixture.js';

const SIZE = 16;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;
const limits: DeviceLimits = {
  sizeMax: 1 << 20,
  segMax: 8,
  logicalBlockSize: 512,
  readOnly: false,
  serial: new Uint8Array(20),
  maxDiscardSectors: 1024,
  maxDiscardSeg: 1,
  maxWriteZeroesSectors: 1024,
  maxWriteZeroesSeg: 1,
};

const dir = mkdtempSync(path.join(os.tmpdir(), 'vublk-drain-'));
const imageFd = openSync(path.join(dir, 'disk.img'), 'w+');
writeSync(imageFd, Buffer.alloc(1 << 20, 0xab));
afterAll(() => {
  closeSync(imageFd);
  rmSync(dir, { recursive: true, force: true });
});

/** A driver for the test: writes 3-descriptor FLUSH/IN chains and publishes them on the avail ring. */
class TinyDriver {
  private nextDesc = 0;
  availIdx = 0;
  constructor(
    private readonly fx: MemoryFixture,
    private readonly size = SIZE,
  ) {}

  private desc(index: number, offset: number, len: number, flags: number, next: number): void {
    const at = DESC + index * 16;
    this.fx.view.setBigUint64(at, BigInt(this.fx.gpa(offset)), true);
    this.fx.view.setUint32(at + 8, len, true);
    this.fx.view.setUint16(at + 12, flags, true);
    this.fx.view.setUint16(at + 14, next, true);
  }

  /** Publishes a one-sector read (without kicking: the test calls the drain itself). Returns the head. */
  publishRead(sector: number): number {
    const head = this.nextDesc;
    const base = 0x10000 + head * 0x1000;
    this.fx.bytes.set(encodeRequestHeader({ type: BlkRequestType.IN, ioprio: 0, sector }), base);
    this.fx.bytes[base + 0x800] = 0xff; // status byte, overwritten by the device
    this.desc(head, base, 16, DescFlag.NEXT, head + 1);
    this.desc(head + 1, base + 0x200, 512, DescFlag.NEXT | DescFlag.WRITE, head + 2);
    this.desc(head + 2, base + 0x800, 1, DescFlag.WRITE, 0);
    this.nextDesc += 3;
    this.fx.view.setUint16(AVAIL + 4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx++;
    this.fx.view.setUint16(AVAIL + 2, this.availIdx, true);
    return head;
  }

  status(head: number): number {
    return this.fx.bytes[0x10000 + head * 0x1000 + 0x800] ?? -1;
  }

  usedIdx(): number {
    return this.fx.view.getUint16(USED + 2, true);
  }
}

function setup(eventIdx: boolean, executorHook?: (flush: () => void) => void, size = SIZE) {
  const fx = memoryFixture();
  const driver = new TinyDriver(fx, size);
  const counterBuffer = createCounterBuffer(1);
  const sync = new SyncExecutor(imageFd, limits);
  let interrupts = 0;
  // The executor the drain sees; `executorHook` runs inside submitPending(), i.e. after a round, before re-arming.
  const executor: RequestExecutor = {
    get inFlight() {
      return sync.inFlight;
    },
    set onComplete(handler) {
      sync.onComplete = handler;
    },
    get onComplete() {
      return sync.onComplete;
    },
    submit: (...args) => sync.submit(...args),
    completionFd: -1,
    canAccept: () => true,
    submitPending: () => {
      executorHook?.(() => undefined);
      return sync.submitPending();
    },
    reap: () => sync.reap(),
    waitIdle: () => true,
    close: () => sync.close(),
  };
  const queue = new SplitQueue(fx.memory, { size, descGpa: fx.gpa(DESC), availGpa: fx.gpa(AVAIL), usedGpa: fx.gpa(USED) }, eventIdx, 0);
  const ctx: DrainContext = {
    queue,
    memory: fx.memory,
    limits,
    capacityBytes: 1 << 20,
    writeback: true,
    executor,
    counters: new QueueCounters(counterBuffer, 0),
    admission: unlimited,
    ...createRequestScratch(limits),
    stalled: false,
    accepting: true,
    poisoned: false,
    onPoison: () => undefined,
    interrupt: () => interrupts++,
  };
  sync.onComplete = (c) => completeRequest(ctx, c);
  return { fx, driver, ctx, counters: new CounterReader(counterBuffer), interrupts: () => interrupts };
}

describe('drain bracket', () => {
  it('serves a request the driver adds after the last pop but before kicks are re-armed (the re-check)', () => {
    let injected = false;
    let driverRef: TinyDriver | null = null;
    const { driver, ctx, counters, interrupts } = setup(false, (flush) => {
      flush();
      // The driver saw NO_NOTIFY, so it publishes without kicking: only the re-check can find this one.
      if (!injected && driverRef !== null) {
        injected = true;
        driverRef.publishRead(8);
      }
    });
    driverRef = driver;
    const first = driver.publishRead(0);
    expect(drainQueue(ctx)).toBe(0);
    expect(injected).toBe(true);
    expect(driver.usedIdx()).toBe(2);
    expect(driver.status(first)).toBe(BlkStatus.OK);
    expect(driver.status(3)).toBe(BlkStatus.OK);
    expect(counters.read(0, 'reads')).toBe(2);
    expect(interrupts()).toBe(1);
  });

  it('suppresses kicks while draining and re-arms them afterwards (used.flags)', () => {
    let flagsDuringDrain = -1;
    let fxRef: MemoryFixture | null = null;
    const { fx, driver, ctx } = setup(false, (flush) => {
      // The first flush ends the first round, before kicks are re-armed.
      if (flagsDuringDrain < 0) flagsDuringDrain = fxRef!.view.getUint16(USED, true);
      flush();
    });
    fxRef = fx;
    driver.publishRead(0);
    drainQueue(ctx);
    expect(flagsDuringDrain).toBe(USED_F_NO_NOTIFY);
    expect(fx.view.getUint16(USED, true)).toBe(0);
  });

  it('under EVENT_IDX re-arms by moving avail_event to the next index, and interrupts only past used_event', () => {
    const { fx, driver, ctx, interrupts } = setup(true);
    // The driver asks to be interrupted only once used.idx passes 1 (i.e. after the second completion).
    fx.view.setUint16(AVAIL + 4 + 2 * SIZE, 1, true);
    driver.publishRead(0);
    drainQueue(ctx);
    expect(fx.view.getUint16(USED + 4 + 8 * SIZE, true)).toBe(1); // avail_event = next avail index
    expect(interrupts()).toBe(0);
    driver.publishRead(8);
    drainQueue(ctx);
    expect(driver.usedIdx()).toBe(2);
    expect(interrupts()).toBe(1);
  });

  it('does not interrupt a driver that set VRING_AVAIL_F_NO_INTERRUPT', () => {
    const { fx, driver, ctx, interrupts } = setup(false);
    fx.view.setUint16(AVAIL, 1, true);
    driver.publishRead(0);
    drainQueue(ctx);
    expect(driver.usedIdx()).toBe(1);
    expect(interrupts()).toBe(0);
  });

  // Interrupt coalescing (COALESCE_MIN_REMAINING in drain.ts): one drain over many requests, completed inline.
  function interruptsAt(requests: number): number[] {
    const at: number[] = [];
    const { driver, ctx } = setup(false, undefined, 128); // 3 descriptors per request
    ctx.interrupt = () => at.push(driver.usedIdx());
    for (let i = 0; i < requests; i++) driver.publishRead(i);
    drainQueue(ctx);
    expect(driver.usedIdx()).toBe(requests);
    return at;
  }

  it('a long drain tells the driver once half its window has completed, then as the window empties, and at the end', () => {
    // Checks come every 8 pops (a quarter of 32); at 8 the driver has 24 still queued: no interrupt yet.
    expect(interruptsAt(32)).toEqual([16, 24, 32]);
  });

  it('a shallow window is told as soon as fewer than COALESCE_MIN_REMAINING requests are left', () => {
    // Checks every 4 pops: at 4, 8 are left (deferred); at 8, 4 are left (told); then the end.
    expect(interruptsAt(12)).toEqual([8, 12]);
    expect(interruptsAt(4)).toEqual([4]);
  });
});
