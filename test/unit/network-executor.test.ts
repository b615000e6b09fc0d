/**
 * The network executor's request semantics over a scripted transport (the only stand-in: real NBD and RBD
 * servers are in test/integration/nbd-disk.test.ts and test/e2e/rbd-guest.test.ts): completions routed to
 * the queue that owns them when two queues share a transport, errno → status, DISCARD / WRITE_ZEROES as
 * barriers with their ranges one after another, write-through as FUA or write + flush, cache=unsafe flushes,
 * and request merging (adjacent READs or WRITEs of one batch in one operation).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { BlkRequest } from '../../src/dataplane/blk-request.js';
import type { IoSegments } from '../../src/backend/nbd/io-segments.js';
import type { Completion } from '../../src/dataplane/request-executor.js';
import {
  BACKEND_EVENTS,
  BackendChannel,
  BackendEvent,
  type Transport,
  type TransportDeliver,
} from '../../src/dataplane/backend-channel.js';
import { Counter } from '../../src/dataplane/counters.js';
import { NetworkExecutor } from '../../src/dataplane/network-executor.js';
import { createEventFd } from '../../src/sys/eventfd.js';
import { closeFd } from '../../src/sys/fd.js';
import { ENGINE_TEST_LIMITS, memoryFixture } from './guest-memory-fixture.js';

const limits = ENGINE_TEST_LIMITS;

/** Records every operation; the test answers them with `answer(tag, errno)`. */
class ScriptedTransport implements Transport {
  readonly fd = createEventFd();
  readonly ops: string[] = [];
  readonly tags: number[] = [];
  /** Each READ / WRITE's iovec list as (host address, length) pairs. */
  readonly lists: [number, number][][] = [];
  private readonly answers: [number, number][] = [];
  closed = false;
  constructor(readonly supportsFua: boolean) {}
  private record(op: string, tag: number): void {
    this.ops.push(op);
    this.tags.push(tag);
  }
  private list(segments: IoSegments): void {
    const pairs: [number, number][] = [];
    for (let i = 0; i < segments.count; i++) pairs.push([segments.addresses[i]!, segments.lengths[i]!]);
    this.lists.push(pairs);
  }
  read(tag: number, offset: number, segments: IoSegments): void {
    this.record(`read ${offset}`, tag);
    this.list(segments);
  }
  write(tag: number, offset: number, segments: IoSegments, fua: boolean): void {
    this.record(`write ${offset}${fua ? ' fua' : ''}`, tag);
    this.list(segments);
  }
  flush(tag: number): void {
    this.record('flush', tag);
  }
  discard(tag: number, offset: number, length: number): void {
    this.record(`discard ${offset}+${length}`, tag);
  }
  writeZeroes(tag: number, offset: number, length: number, mayUnmap: boolean): void {
    this.record(`zeroes ${offset}+${length}${mayUnmap ? ' unmap' : ''}`, tag);
  }
  kick(): void {}
  readyReports = 0;
  ready(): void {
    this.readyReports++;
  }
  poll(deliver: TransportDeliver): void {
    for (const [tag, errno] of this.answers.splice(0)) deliver(tag, errno);
  }
  healthChange(): string {
    return '';
  }
  /** Event totals the test sets (BackendEvent order); the serial is their sum, as the NBD transport's. */
  readonly events = new Float64Array(BACKEND_EVENTS);
  get eventSerial(): number {
    return this.events.reduce((a, b) => a + b, 0);
  }
  eventTotals(out: Float64Array): void {
    out.set(this.events);
  }
  connectionsDown = 0;
  answer(tag: number, errno = 0): void {
    this.answers.push([tag, errno]);
  }
  close(): void {
    this.closed = true;
    closeFd(this.fd);
  }
}

const fixture = memoryFixture(1 << 20);

function request(type: number, sector: number, segs: [number, number][], statusOffset: number): BlkRequest {
  const r = new BlkRequest(limits.segMax + 2);
  r.type = type;
  r.sector = sector;
  r.statusGpa = fixture.gpa(statusOffset);
  for (const [offset, len] of segs) r.addSegment(fixture.gpa(offset), len);
  return r;
}

/** A DISCARD / WRITE_ZEROES payload of (sector, sectors, flags) segments at `offset` of guest memory. */
function rangePayload(offset: number, ranges: [number, number, number][]): [number, number] {
  ranges.forEach(([sector, count, flags], i) => {
    fixture.view.setBigUint64(offset + i * 16, BigInt(sector), true);
    fixture.view.setUint32(offset + i * 16 + 8, count, true);
    fixture.view.setUint32(offset + i * 16 + 12, flags, true);
  });
  return [offset, ranges.length * 16];
}

const executors: NetworkExecutor[] = [];
afterEach(() => {
  for (const e of executors.splice(0)) e.close();
});

function setup(
  supportsFua = true,
  options = {},
): { transport: ScriptedTransport; channel: BackendChannel; executor: NetworkExecutor; done: Completion[] } {
  const transport = new ScriptedTransport(supportsFua);
  const channel = new BackendChannel('test', transport);
  const executor = new NetworkExecutor(channel, limits, options);
  executors.push(executor);
  const done: Completion[] = [];
  executor.onComplete = (c) => done.push({ ...c });
  return { transport, channel, executor, done };
}

const CAPACITY = 1 << 20;

describe('network executor', () => {
  it('routes completions to the queue that submitted them when two queues share a transport', () => {
    const { transport, channel, executor: q0, done: done0 } = setup();
    const q1 = new NetworkExecutor(channel, limits);
    executors.push(q1);
    const done1: Completion[] = [];
    q1.onComplete = (c) => done1.push({ ...c });
    q0.submit(fixture.memory, request(BlkRequestType.IN, 0, [[4096, 4096]], 100), 7, CAPACITY, true);
    q1.submit(fixture.memory, request(BlkRequestType.OUT, 8, [[8192, 4096]], 101), 9, CAPACITY, true);
    expect(transport.ops).toEqual(['read 0', 'write 4096']);
    transport.answer(transport.tags[1]!);
    transport.answer(transport.tags[0]!, 5);
    // q0 polls: its own failure is published now, q1's success waits for q1 (woken through its eventfd).
    q0.reap();
    expect(done0.map((c) => [c.head, c.status])).toEqual([[7, BlkStatus.IOERR]]);
    expect(done0[0]!.error).toMatch(/read: EIO/);
    expect(done1).toEqual([]);
    q1.reap();
    expect(done1.map((c) => [c.head, c.status, c.written])).toEqual([[9, BlkStatus.OK, 0]]);
    expect(q0.inFlight + q1.inFlight).toBe(0);
  });

  it('maps ENOTSUP to UNSUPP and reports the read length as written', () => {
    const { transport, executor, done } = setup();
    executor.submit(
      fixture.memory,
      request(
        BlkRequestType.IN,
        0,
        [
          [0, 512],
          [1024, 1024],
        ],
        200,
      ),
      1,
      CAPACITY,
      true,
    );
    executor.submit(fixture.memory, request(BlkRequestType.FLUSH, 0, [], 201), 2, CAPACITY, true);
    transport.answer(transport.tags[0]!);
    transport.answer(transport.tags[1]!, 95);
    executor.reap();
    expect(done.map((c) => [c.head, c.status, c.written])).toEqual([
      [1, BlkStatus.OK, 1536],
      [2, BlkStatus.UNSUPP, 0],
    ]);
  });

  it('DISCARD waits for an empty queue, blocks everything after it, and runs its ranges one by one', () => {
    const { transport, executor, done } = setup();
    const read = request(BlkRequestType.IN, 0, [[0, 512]], 300);
    executor.submit(fixture.memory, read, 1, CAPACITY, true);
    const discard = request(
      BlkRequestType.DISCARD,
      0,
      [
        rangePayload(2048, [
          [8, 8, 0],
          [64, 16, 0],
        ]),
      ],
      301,
    );
    expect(executor.canAccept(discard)).toBe(false);
    transport.answer(transport.tags[0]!);
    executor.reap();
    expect(executor.canAccept(discard)).toBe(true);
    executor.submit(fixture.memory, discard, 2, CAPACITY, true);
    expect(executor.canAccept(read)).toBe(false);
    expect(transport.ops.slice(1)).toEqual(['discard 4096+4096']);
    transport.answer(transport.tags[1]!);
    executor.reap();
    expect(transport.ops.slice(2)).toEqual(['discard 32768+8192']);
    expect(done.map((c) => c.head)).toEqual([1]);
    transport.answer(transport.tags[2]!);
    executor.reap();
    expect(done.map((c) => [c.head, c.status])).toEqual([
      [1, BlkStatus.OK],
      [2, BlkStatus.OK],
    ]);
    expect(executor.canAccept(read)).toBe(true);
  });

  it('WRITE_ZEROES passes the unmap flag; a failed range fails the request without running the rest', () => {
    const { transport, executor, done } = setup();
    const zeroes = request(
      BlkRequestType.WRITE_ZEROES,
      0,
      [
        rangePayload(2048, [
          [0, 8, 1],
          [16, 8, 0],
        ]),
      ],
      400,
    );
    executor.submit(fixture.memory, zeroes, 3, CAPACITY, true);
    expect(transport.ops).toEqual(['zeroes 0+4096 unmap']);
    transport.answer(transport.tags[0]!, 28);
    executor.reap();
    expect(transport.ops).toHaveLength(1);
    expect(done.map((c) => [c.head, c.status])).toEqual([[3, BlkStatus.IOERR]]);
  });

  it('write-through: FUA where the transport has it, else a flush after the write before completing', () => {
    const fua = setup(true);
    fua.executor.submit(fixture.memory, request(BlkRequestType.OUT, 0, [[0, 512]], 500), 1, CAPACITY, false);
    expect(fua.transport.ops).toEqual(['write 0 fua']);

    const rbd = setup(false);
    rbd.executor.submit(fixture.memory, request(BlkRequestType.OUT, 0, [[0, 512]], 500), 1, CAPACITY, false);
    expect(rbd.transport.ops).toEqual(['write 0']);
    rbd.transport.answer(rbd.transport.tags[0]!);
    rbd.executor.reap();
    expect(rbd.transport.ops).toEqual(['write 0', 'flush']);
    expect(rbd.done).toEqual([]);
    rbd.transport.answer(rbd.transport.tags[1]!);
    rbd.executor.reap();
    expect(rbd.done.map((c) => [c.head, c.status])).toEqual([[1, BlkStatus.OK]]);
  });

  it('cache=unsafe answers FLUSH without the transport; GET_ID is answered inside submit', () => {
    const { transport, executor, done } = setup(true, { ignoreFlush: true });
    executor.submit(fixture.memory, request(BlkRequestType.FLUSH, 0, [], 600), 1, CAPACITY, true);
    executor.submit(fixture.memory, request(BlkRequestType.GET_ID, 0, [[0, 20]], 601), 2, CAPACITY, true);
    expect(transport.ops).toEqual([]);
    expect(done.map((c) => [c.head, c.status])).toEqual([
      [1, BlkStatus.OK],
      [2, BlkStatus.OK],
    ]);
  });

  it('the last queue to leave closes the transport; a late completion of a queue that left is dropped', () => {
    const { transport, channel, executor } = setup();
    const other = new NetworkExecutor(channel, limits);
    other.submit(fixture.memory, request(BlkRequestType.IN, 0, [[0, 512]], 700), 1, CAPACITY, true);
    other.close();
    expect(transport.closed).toBe(false);
    transport.answer(transport.tags[0]!);
    executor.reap(); // nobody to publish to: no throw, nothing delivered
    executors.splice(executors.indexOf(executor), 1);
    executor.close();
    expect(transport.closed).toBe(true);
  });

  it('reports connection events once, as deltas, to the queue that polled; counters follow BackendEvent order', () => {
    const seen: number[][] = [];
    const { transport, channel } = setup(true, { onBackendEvents: (d: Float64Array) => seen.push([...d]) });
    const other: number[][] = [];
    const q1 = new NetworkExecutor(channel, limits, { onBackendEvents: (d: Float64Array) => other.push([...d]) });
    executors.push(q1);
    const q0 = executors[executors.length - 2]!;
    q0.reap();
    expect(seen).toEqual([]); // nothing happened yet
    transport.events[BackendEvent.connects] = 3;
    q0.reap();
    q0.reap(); // no new event: no second report
    transport.events[BackendEvent.connectionsLost] = 1;
    transport.events[BackendEvent.resent] = 4;
    transport.events[BackendEvent.handedOver] = 2;
    q1.reap();
    const zero = new Array(BACKEND_EVENTS).fill(0);
    const expected0 = [...zero];
    expected0[BackendEvent.connects] = 3;
    const expected1 = [...zero];
    expected1[BackendEvent.connectionsLost] = 1;
    expected1[BackendEvent.resent] = 4;
    expected1[BackendEvent.handedOver] = 2;
    expect(seen).toEqual([expected0]);
    expect(other).toEqual([expected1]);
    // The ring server adds delta i to Counter.backendConnects + i: the two orders must agree.
    const names = Object.keys(BackendEvent);
    for (const name of names) {
      const counter = `backend${name[0]!.toUpperCase()}${name.slice(1)}` as keyof typeof Counter;
      expect(Counter[counter], name).toBe(Counter.backendConnects + BackendEvent[name as keyof typeof BackendEvent]);
    }
    expect(names.length).toBe(BACKEND_EVENTS);
  });

  it('one queue, the oldest, reports the connections down; when it leaves it reports 0 and the next takes over', () => {
    const down0: number[] = [];
    const down1: number[] = [];
    const { transport, channel } = setup(true, { onConnectionsDown: (n: number) => down0.push(n) });
    const q0 = executors[executors.length - 1]!;
    const q1 = new NetworkExecutor(channel, limits, { onConnectionsDown: (n: number) => down1.push(n) });
    transport.connectionsDown = 2;
    q1.reap();
    q0.reap();
    q0.reap(); // unchanged: not reported again
    transport.connectionsDown = 1;
    q1.reap(); // not the owner: never reports
    q0.reap();
    expect(down0).toEqual([2, 1]);
    expect(down1).toEqual([]);
    // The owner leaves: its own gauge goes to 0, and q1 reports the current count from its next poll.
    executors.splice(executors.indexOf(q0), 1);
    q0.close();
    expect(down0).toEqual([2, 1, 0]);
    q1.reap();
    expect(down1).toEqual([1]);
    transport.connectionsDown = 0;
    q1.reap();
    expect(down1).toEqual([1, 0]);
    // Closing with 0 reported adds nothing.
    q1.close();
    expect(down1).toEqual([1, 0]);
  });

  it("passes the worker's epoll reports on to the transport (completionReady)", () => {
    const { transport, executor } = setup();
    expect(transport.readyReports).toBe(0);
    executor.completionReady();
    executor.completionReady();
    expect(transport.readyReports).toBe(2);
  });

  describe('request merging', () => {
    const merging = (supportsFua = true, mergeMaxBytes = 16384) => {
      let merged = 0;
      const parts = setup(supportsFua, { mergeMaxBytes, onMerged: () => merged++ });
      return { ...parts, merged: () => merged };
    };
    const host = (offset: number): number => {
      let address = 0;
      fixture.memory.forEachHostPiece(fixture.gpa(offset), 1, (a) => {
        address = a;
      });
      return address;
    };

    it('sends adjacent READs of one batch as one operation over both buffer lists, and completes each', () => {
      const { transport, executor, done, merged } = merging();
      executor.submit(fixture.memory, request(BlkRequestType.IN, 8, [[65536, 4096]], 100), 1, CAPACITY, true);
      executor.submit(
        fixture.memory,
        request(
          BlkRequestType.IN,
          16,
          [
            [8192, 1024],
            [20480, 3072],
          ],
          101,
        ),
        2,
        CAPACITY,
        true,
      );
      // Nothing goes out before the batch ends: the drain submits, then calls submitPending once.
      expect(transport.ops).toEqual([]);
      expect(executor.inFlight).toBe(2);
      executor.submitPending();
      expect(transport.ops).toEqual(['read 4096']);
      expect(transport.lists[0]).toEqual([
        [host(65536), 4096],
        [host(8192), 1024],
        [host(20480), 3072],
      ]);
      expect(merged()).toBe(1);
      transport.answer(transport.tags[0]!);
      executor.reap();
      expect(done.map((c) => [c.head, c.status, c.written, c.statusGpa])).toEqual([
        [1, BlkStatus.OK, 4096, fixture.gpa(100)],
        [2, BlkStatus.OK, 4096, fixture.gpa(101)],
      ]);
      expect(executor.inFlight).toBe(0);
    });

    it('keeps apart what does not continue the operation: a gap, another type, the size limit, a later batch', () => {
      const { transport, executor, merged } = merging(true, 8192);
      const submit = (type: number, sector: number, head: number): void =>
        executor.submit(fixture.memory, request(type, sector, [[4096 * head, 4096]], 100 + head), head, CAPACITY, true);
      submit(BlkRequestType.IN, 0, 1);
      submit(BlkRequestType.IN, 16, 2); // a gap of 4 KiB
      submit(BlkRequestType.OUT, 24, 3); // a WRITE after a READ
      submit(BlkRequestType.OUT, 32, 4); // joins 3: 8 KiB, the limit
      submit(BlkRequestType.OUT, 40, 5); // would make 12 KiB
      executor.submitPending();
      submit(BlkRequestType.OUT, 48, 6); // continues 5, but in the next batch
      executor.submitPending();
      expect(transport.ops).toEqual(['read 0', 'read 8192', 'write 12288', 'write 20480', 'write 24576']);
      expect(transport.lists.map((l) => l.length)).toEqual([1, 1, 2, 1, 1]);
      expect(merged()).toBe(1);
    });

    it('a FLUSH or a write-through WRITE does not join a writeback one; a FLUSH sends the open operation first', () => {
      const { transport, executor } = merging();
      executor.submit(fixture.memory, request(BlkRequestType.OUT, 0, [[0, 4096]], 100), 1, CAPACITY, true);
      executor.submit(fixture.memory, request(BlkRequestType.OUT, 8, [[4096, 4096]], 101), 2, CAPACITY, false);
      executor.submit(fixture.memory, request(BlkRequestType.FLUSH, 0, [], 102), 3, CAPACITY, true);
      executor.submit(fixture.memory, request(BlkRequestType.OUT, 16, [[8192, 4096]], 103), 4, CAPACITY, true);
      executor.submitPending();
      expect(transport.ops).toEqual(['write 0', 'write 4096 fua', 'flush', 'write 8192']);
    });

    it('a failed operation fails every request in it', () => {
      const { transport, executor, done } = merging();
      for (let i = 0; i < 3; i++) {
        executor.submit(fixture.memory, request(BlkRequestType.IN, i * 8, [[4096 * i, 4096]], 100 + i), 10 + i, CAPACITY, true);
      }
      executor.reap(); // a reap also sends the open operation (the drain reaps between batches)
      expect(transport.ops).toEqual(['read 0']);
      transport.answer(transport.tags[0]!, 5);
      executor.reap();
      expect(done.map((c) => [c.head, c.status, c.written])).toEqual([
        [10, BlkStatus.IOERR, 0],
        [11, BlkStatus.IOERR, 0],
        [12, BlkStatus.IOERR, 0],
      ]);
      expect(done.every((c) => /read: EIO/.test(c.error))).toBe(true);
    });

    it('write-through without FUA: the merged WRITE is followed by one flush, then both complete', () => {
      const { transport, executor, done } = merging(false);
      executor.submit(fixture.memory, request(BlkRequestType.OUT, 0, [[0, 4096]], 100), 1, CAPACITY, false);
      executor.submit(fixture.memory, request(BlkRequestType.OUT, 8, [[4096, 4096]], 101), 2, CAPACITY, false);
      executor.submitPending();
      expect(transport.ops).toEqual(['write 0']);
      transport.answer(transport.tags[0]!);
      executor.reap();
      expect(transport.ops).toEqual(['write 0', 'flush']);
      expect(done).toEqual([]);
      transport.answer(transport.tags[1]!);
      executor.reap();
      expect(done.map((c) => [c.head, c.status])).toEqual([
        [1, BlkStatus.OK],
        [2, BlkStatus.OK],
      ]);
    });

    it('a request that would take the operation past 1024 buffer pieces starts one of its own', () => {
      const { transport, executor, done, merged } = merging(true, 4 << 20);
      const many = (sector: number, count: number, statusOffset: number): BlkRequest => {
        const r = new BlkRequest(count + 2);
        r.type = BlkRequestType.IN;
        r.sector = sector;
        r.statusGpa = fixture.gpa(statusOffset);
        for (let i = 0; i < count; i++) r.addSegment(fixture.gpa(i * 512), 512);
        return r;
      };
      executor.submit(fixture.memory, many(0, 1000, 100), 1, CAPACITY, true);
      executor.submit(fixture.memory, many(1000, 100, 101), 2, CAPACITY, true); // 1,100 pieces: alone
      executor.submit(fixture.memory, many(1100, 1, 102), 3, CAPACITY, true); // joins request 2
      executor.submitPending();
      expect(transport.ops).toEqual(['read 0', `read ${1000 * 512}`]);
      expect(transport.lists.map((l) => l.length)).toEqual([1000, 101]);
      expect(transport.lists[1]![0]).toEqual([host(0), 512]);
      expect(merged()).toBe(1);
      transport.answer(transport.tags[1]!);
      transport.answer(transport.tags[0]!);
      executor.reap();
      expect(done.map((c) => [c.head, c.written])).toEqual([
        [2, 51200],
        [3, 512],
        [1, 512000],
      ]);
    });

    it('a request whose buffer leaves guest memory fails alone; the operation it would have joined goes on', () => {
      const { transport, executor, done } = merging();
      executor.submit(fixture.memory, request(BlkRequestType.IN, 0, [[0, 4096]], 100), 1, CAPACITY, true);
      const bad = request(BlkRequestType.IN, 8, [], 101);
      bad.addSegment(fixture.gpa(0) + (1 << 30), 4096);
      executor.submit(fixture.memory, bad, 2, CAPACITY, true);
      executor.submit(fixture.memory, request(BlkRequestType.IN, 8, [[8192, 4096]], 102), 3, CAPACITY, true);
      expect(done.map((c) => [c.head, c.status])).toEqual([[2, BlkStatus.IOERR]]);
      executor.submitPending();
      expect(transport.ops).toEqual(['read 0']);
      expect(transport.lists[0]!.map(([, length]) => length)).toEqual([4096, 4096]);
    });
  });
});
