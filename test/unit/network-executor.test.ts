/**
 * The network executor's request semantics over a scripted transport (the only stand-in: real NBD and RBD
 * servers are in test/integration/nbd-disk.test.ts and test/e2e/rbd-guest.test.ts): completions routed to
 * the queue that owns them when two queues share a transport, errno → status, DISCARD / WRITE_ZEROES as
 * barriers with their ranges one after another, write-through as FUA or write + flush, cache=unsafe flushes.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { BlkRequestType, BlkStatus } from '../../protocol/virtio-blk.js';
import { BlkRequest } from '../../src/dataplane/blk-request.js';
import type { Completion } from '../../src/dataplane/request-executor.js';
import { BackendChannel, type Transport, type TransportDeliver } from '../../src/dataplane/backend-channel.js';
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
  private readonly answers: [number, number][] = [];
  closed = false;
  constructor(readonly supportsFua: boolean) {}
  private record(op: string, tag: number): void {
    this.ops.push(op);
    this.tags.push(tag);
  }
  read(tag: number, offset: number): void {
    this.record(`read ${offset}`, tag);
  }
  write(tag: number, offset: number, _segments: unknown, fua: boolean): void {
    this.record(`write ${offset}${fua ? ' fua' : ''}`, tag);
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

  it("passes the worker's epoll reports on to the transport (completionReady)", () => {
    const { transport, executor } = setup();
    expect(transport.readyReports).toBe(0);
    executor.completionReady();
    executor.completionReady();
    expect(transport.readyReports).toBe(2);
  });
});
