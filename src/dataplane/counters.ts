/**
 * Device-lifetime request counters, one block per queue, in a SharedArrayBuffer owned by the disk.
 * Each block has exactly one writer (the queue's worker), which accumulates in plain Numbers during a drain
 * and publishes with one Atomics.add per changed counter at the end of the drain; readers (metrics on the
 * main thread) use Atomics.load. No message is posted per request.
 */
export const Counter = {
  reads: 0,
  writes: 1,
  flushes: 2,
  discards: 3,
  writeZeroes: 4,
  getIds: 5,
  bytesRead: 6,
  bytesWritten: 7,
  ioErrors: 8,
  unsupported: 9,
  throttled: 10,
  /** A gauge: requests waiting for tokens right now. */
  throttlePending: 11,
  invalidAvailIdx: 12,
  /** A gauge: 1 while the queue is poisoned. */
  poisoned: 13,
  drains: 14,
  notifications: 15,
} as const;
export type CounterName = keyof typeof Counter;
export const COUNTERS_PER_QUEUE = 16;

export function createCounterBuffer(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(queues * COUNTERS_PER_QUEUE * 8);
}

/** Read side, used by the control plane. */
export class CounterReader {
  private readonly cells: BigInt64Array;
  constructor(buffer: SharedArrayBuffer) {
    this.cells = new BigInt64Array(buffer);
  }

  get queues(): number {
    return this.cells.length / COUNTERS_PER_QUEUE;
  }

  read(queue: number, name: CounterName): number {
    return Number(Atomics.load(this.cells, queue * COUNTERS_PER_QUEUE + Counter[name]));
  }

  total(name: CounterName): number {
    let sum = 0;
    for (let q = 0; q < this.queues; q++) sum += this.read(q, name);
    return sum;
  }
}

/** Write side for one queue, used by its worker. */
export class QueueCounters {
  private readonly cells: BigInt64Array;
  private readonly base: number;
  private readonly pending = new Float64Array(COUNTERS_PER_QUEUE);
  private dirty = false;

  constructor(buffer: SharedArrayBuffer, queue: number) {
    this.cells = new BigInt64Array(buffer);
    this.base = queue * COUNTERS_PER_QUEUE;
  }

  add(index: number, amount = 1): void {
    this.pending[index] = (this.pending[index] ?? 0) + amount;
    this.dirty = true;
  }

  /** Gauges are set, not accumulated; they are published immediately (rare transitions). */
  setGauge(index: number, value: number): void {
    Atomics.store(this.cells, this.base + index, BigInt(value));
  }

  flush(): void {
    if (!this.dirty) return;
    for (let i = 0; i < COUNTERS_PER_QUEUE; i++) {
      const amount = this.pending[i] ?? 0;
      if (amount !== 0) {
        Atomics.add(this.cells, this.base + i, BigInt(amount));
        this.pending[i] = 0;
      }
    }
    this.dirty = false;
  }
}
