/**
 * Device-lifetime request counters, one block per queue, in a SharedArrayBuffer owned by the disk.
 * Each block has one writer at a time: the pool worker running that queue's ring (a ring moves between
 * workers only between a stop and a start, and publishes everything before it is released). The writer
 * accumulates in plain Numbers during a drain and publishes with one Atomics.add per changed counter at the
 * end of the drain; readers (metrics on the main thread) use Atomics.load. No message is posted per request.
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
  /** Requests whose data went through an O_DIRECT bounce buffer (guest buffer not aligned). */
  bounced: 16,
  /** Guest pages marked in the migration dirty log (a page written twice counts twice). */
  dirtyPagesLogged: 17,
  /** Device writes to guest pages the dirty log does not cover (not marked: the front-end sized it too small). */
  dirtyLogOutOfRange: 18,
  /** Drains the worker's watchdog ran: requests were outstanding and no wake-up came for WATCHDOG_MS. */
  watchdogDrains: 19,
} as const;
export type CounterName = keyof typeof Counter;
const SCALAR_COUNTERS = 20;

/** Operations with a latency histogram each. */
export const LatencyOp = {
  read: 0,
  write: 1,
  flush: 2,
  other: 3,
} as const;
export type LatencyOpName = keyof typeof LatencyOp;
const LATENCY_OPS = 4;

/** Upper bounds (seconds) of the latency buckets, Prometheus style (cumulative on export, +Inf implied). */
export const LATENCY_BUCKETS_SECONDS = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
] as const;
const BUCKET_BOUNDS_NS = LATENCY_BUCKETS_SECONDS.map((s) => Math.round(s * 1e9));
/** Per op: one cell per finite bucket, one for +Inf, one for the sum in nanoseconds. */
const HISTOGRAM_CELLS = LATENCY_BUCKETS_SECONDS.length + 2;
const HISTOGRAM_BASE = SCALAR_COUNTERS;

export const COUNTERS_PER_QUEUE = SCALAR_COUNTERS + LATENCY_OPS * HISTOGRAM_CELLS;

export function createCounterBuffer(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(queues * COUNTERS_PER_QUEUE * 8);
}

export interface LatencySnapshot {
  /** Non-cumulative counts per bucket of LATENCY_BUCKETS_SECONDS, then the +Inf bucket. */
  buckets: number[];
  count: number;
  sumSeconds: number;
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

  latency(queue: number, op: LatencyOpName): LatencySnapshot {
    const base = queue * COUNTERS_PER_QUEUE + HISTOGRAM_BASE + LatencyOp[op] * HISTOGRAM_CELLS;
    const buckets: number[] = [];
    let count = 0;
    for (let i = 0; i <= LATENCY_BUCKETS_SECONDS.length; i++) {
      const n = Number(Atomics.load(this.cells, base + i));
      buckets.push(n);
      count += n;
    }
    const sumNs = Number(Atomics.load(this.cells, base + LATENCY_BUCKETS_SECONDS.length + 1));
    return { buckets, count, sumSeconds: sumNs / 1e9 };
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

  /** Records one request's service time in its op's histogram (published with the next flush). */
  observeLatency(op: number, nanos: number): void {
    let bucket = 0;
    while (bucket < BUCKET_BOUNDS_NS.length && nanos > (BUCKET_BOUNDS_NS[bucket] ?? 0)) bucket++;
    const base = HISTOGRAM_BASE + op * HISTOGRAM_CELLS;
    this.add(base + bucket);
    this.add(base + LATENCY_BUCKETS_SECONDS.length + 1, Math.round(nanos));
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
