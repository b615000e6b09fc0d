/**
 * The driver side of a split ring against a fake DEVICE written in the test: it reads the avail ring and
 * writes the used ring straight in guest memory, and signals the call eventfd (or, on purpose, doesn't).
 */
import { describe, it, expect, afterEach } from 'vitest';
import { GuestMemory } from '../../bench/src/frontend/guest-memory.js';
import { VirtqueueDriver } from '../../bench/src/frontend/virtqueue-driver.js';
import { MissingCompletionError, MissingInterruptError, RingFullError, UsedRingError } from '../../bench/src/frontend/errors.js';
import { drainEventFd, signalEventFd } from '../../src/sys/eventfd.js';
import { DescFlag, UsedOffset, USED_F_NO_NOTIFY, availEventOffset, needsEvent, usedEventOffset } from '../../protocol/split-ring.js';

class FakeDevice {
  lastAvail = 0;
  usedIdx = 0;

  constructor(
    private readonly memory: GuestMemory,
    private readonly queue: VirtqueueDriver,
  ) {}

  /** Pops every available chain, following NEXT and INDIRECT; returns [head, buffers]. */
  pop(): { head: number; buffers: { addr: bigint; len: number; flags: number }[] }[] {
    const chains = [];
    while (this.lastAvail !== this.queue.ring.availIdx) {
      const head = this.queue.ring.availRing(this.lastAvail % this.queue.size);
      this.lastAvail = (this.lastAvail + 1) & 0xffff;
      const buffers = [];
      let d = this.queue.ring.readDescriptor(head);
      if (d.flags & DescFlag.INDIRECT) {
        const table = this.memory.read(Number(d.addr), d.len);
        for (let i = 0; i < d.len / 16; i++) {
          buffers.push({
            addr: table.readBigUInt64LE(i * 16),
            len: table.readUInt32LE(i * 16 + 8),
            flags: table.readUInt16LE(i * 16 + 12),
          });
        }
      } else {
        for (;;) {
          buffers.push({ addr: d.addr, len: d.len, flags: d.flags });
          if (!(d.flags & DescFlag.NEXT)) break;
          d = this.queue.ring.readDescriptor(d.next);
        }
      }
      chains.push({ head, buffers });
    }
    return chains;
  }

  push(id: number, len: number, notify = true): void {
    const used = this.queue.usedGpa;
    const element = Buffer.alloc(8);
    element.writeUInt32LE(id, 0);
    element.writeUInt32LE(len, 4);
    this.memory.write(used + UsedOffset.ring + 8 * (this.usedIdx % this.queue.size), element);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.memory.write(used + UsedOffset.idx, Buffer.from([this.usedIdx & 0xff, this.usedIdx >> 8]));
    if (notify) signalEventFd(this.queue.callFd);
  }

  setUsedFlags(flags: number): void {
    this.memory.write(this.queue.usedGpa + UsedOffset.flags, Buffer.from([flags, 0]));
  }

  setAvailEvent(value: number): void {
    this.memory.write(this.queue.usedGpa + availEventOffset(this.queue.size), Buffer.from([value & 0xff, value >> 8]));
  }

  get usedEvent(): number {
    return this.memory.read(this.queue.availGpa + usedEventOffset(this.queue.size), 2).readUInt16LE(0);
  }

  kicks(): number {
    return drainEventFd(this.queue.kickFd);
  }
}

let memory: GuestMemory;
let queue: VirtqueueDriver;

function setup(eventIdx: boolean, size = 8): FakeDevice {
  memory = GuestMemory.create([{ gpa: 0x10000, size: 1024 * 1024 }]);
  queue = new VirtqueueDriver(memory, { index: 0, size, eventIdx, timeoutMs: 300, recheckMs: 5 });
  return new FakeDevice(memory, queue);
}

afterEach(() => {
  queue.close();
  memory.close();
});

describe('VirtqueueDriver', () => {
  it('publishes direct and indirect chains the device can walk', async () => {
    const device = setup(false);
    const a = queue.submit(
      [
        { gpa: 0x20000, len: 16, writable: false },
        { gpa: 0x20010, len: 512, writable: true },
      ],
      { token: 'direct' },
    );
    const b = queue.submit(
      [
        { gpa: 0x30000, len: 16, writable: false },
        { gpa: 0x30010, len: 1, writable: true },
      ],
      { indirect: true, token: 'indirect' },
    );
    expect(queue.freeDescriptors).toBe(8 - 3);
    expect(queue.kick()).toBe(true);
    expect(device.kicks()).toBe(1);
    const chains = device.pop();
    expect(chains.map((c) => c.head)).toEqual([a, b]);
    expect(chains[0]?.buffers).toEqual([
      { addr: 0x20000n, len: 16, flags: DescFlag.NEXT },
      { addr: 0x20010n, len: 512, flags: DescFlag.WRITE },
    ]);
    expect(chains[1]?.buffers).toEqual([
      { addr: 0x30000n, len: 16, flags: DescFlag.NEXT },
      { addr: 0x30010n, len: 1, flags: DescFlag.WRITE },
    ]);
    device.push(b, 1);
    device.push(a, 512);
    const used = await queue.waitUsed({ min: 2 });
    expect(used.map((u) => [u.id, u.len, u.token])).toEqual([
      [b, 1, 'indirect'],
      [a, 512, 'direct'],
    ]);
    expect(queue.freeDescriptors).toBe(8);
    expect(queue.stats.completions).toBe(2);
  });

  it('throws RingFullError instead of overrunning the table', () => {
    setup(false, 2);
    queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    expect(() =>
      queue.addChain([
        { gpa: 0x20000, len: 1, writable: false },
        { gpa: 0x20000, len: 1, writable: true },
      ]),
    ).toThrow(RingFullError);
  });

  it('honours NO_NOTIFY without EVENT_IDX, and a forced kick overrides it', () => {
    const device = setup(false);
    device.setUsedFlags(USED_F_NO_NOTIFY);
    queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    expect(queue.kick()).toBe(false);
    expect(device.kicks()).toBe(0);
    queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    expect(queue.kick({ force: true })).toBe(true);
    expect(device.kicks()).toBe(1);
    expect(queue.stats).toMatchObject({ kicks: 1, suppressedKicks: 1 });
  });

  it('honours avail_event under EVENT_IDX and keeps used_event at the reaped index', async () => {
    const device = setup(true);
    device.setAvailEvent(0);
    const first = queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    expect(queue.kick()).toBe(true); // 0 -> 1 crosses avail_event 0
    device.setAvailEvent(5);
    queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    expect(queue.kick()).toBe(false); // 1 -> 2 does not reach 5
    device.pop();
    device.push(first, 1);
    await queue.waitUsed();
    expect(device.usedEvent).toBe(1);
  });

  it('under EVENT_IDX, used_event stays at an entry reaped before its interrupt, so the device still owes it', async () => {
    const device = setup(true);
    const head = queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    device.pop();
    device.push(head, 1, false); // published; the device has not made its notification check yet
    expect(queue.poll()).toHaveLength(1); // the driver finds it by polling, before any interrupt
    // Moving used_event to 1 now would let the device skip the interrupt legitimately (and the wait would then
    // report a missing interrupt): it must stay at the entry still waiting for one.
    expect(device.usedEvent).toBe(0);
    expect(needsEvent(device.usedEvent, 1, 0)).toBe(true);
    signalEventFd(queue.callFd);
    expect(await queue.waitUsed()).toHaveLength(1);
    expect(device.usedEvent).toBe(1);
  });

  it('reports a completion without interrupt as MissingInterruptError, with the elements', async () => {
    const device = setup(false);
    const head = queue.submit([{ gpa: 0x20000, len: 1, writable: true }], { token: 't' });
    device.pop();
    device.push(head, 1, false);
    const error = await queue.waitUsed().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(MissingInterruptError);
    expect((error as MissingInterruptError).elements).toEqual([{ id: head, len: 1, token: 't' }]);
    // Not waiting for interrupts: the same situation is fine.
    const again = queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    device.pop();
    device.push(again, 1, false);
    expect(await queue.waitUsed({ requireInterrupt: false })).toHaveLength(1);
  });

  it('reports nothing in the used ring as MissingCompletionError within the timeout', async () => {
    setup(false);
    queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    const started = Date.now();
    const error = await queue.waitUsed({ timeoutMs: 100 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(MissingCompletionError);
    expect((error as Error).message).toMatch(/used.idx 0/);
    expect(Date.now() - started).toBeLessThan(1000);
  });

  it('one interrupt covers every entry visible when it is seen', async () => {
    const device = setup(false);
    const heads = [0, 1, 2].map(() => queue.submit([{ gpa: 0x20000, len: 1, writable: true }]));
    device.pop();
    device.push(heads[0] as number, 1, false);
    device.push(heads[1] as number, 1, false);
    device.push(heads[2] as number, 1, true);
    expect(await queue.waitUsed({ min: 3 })).toHaveLength(3);
  });

  it('rejects used ids that are not in-flight heads', async () => {
    const device = setup(false);
    queue.submit([
      { gpa: 0x20000, len: 1, writable: true },
      { gpa: 0x20000, len: 1, writable: true },
    ]);
    device.pop();
    device.push(1, 0); // descriptor 1 is the chain's second descriptor, not its head
    await expect(queue.waitUsed()).rejects.toBeInstanceOf(UsedRingError);
  });

  it('rejects a used.idx that runs ahead of the avail ring', async () => {
    const device = setup(false);
    const head = queue.submit([{ gpa: 0x20000, len: 1, writable: true }]);
    device.pop();
    device.push(head, 1, false);
    device.push(head, 1, true);
    await expect(queue.waitUsed()).rejects.toThrow(/only 1 chains are outstanding/);
  });

  it('raw ring access writes exactly what it is told', () => {
    setup(false);
    queue.ring.writeDescriptor(3, { addr: 0xffff_ffff_ffff_fff0n, len: 0xffffffff, flags: 0xffff, next: 7 });
    expect(queue.ring.readDescriptor(3)).toEqual({ addr: 0xffff_ffff_ffff_fff0n, len: 0xffffffff, flags: 0xffff, next: 7 });
    queue.ring.setAvailRing(0, 3);
    queue.ring.availIdx = 0x1234;
    expect(queue.ring.availIdx).toBe(0x1234);
    expect(queue.ring.availRing(0)).toBe(3);
    expect(() => queue.ring.writeDescriptor(8, { addr: 0, len: 0, flags: 0, next: 0 })).toThrow(RangeError);
  });
});
