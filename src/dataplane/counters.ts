/**
 * Device-lifetime request counters, one block per queue, in a SharedArrayBuffer owned by the disk.
 * Each block has one writer at a time: the pool worker running that queue's ring (a ring moves between
 * workers only between a stop and a start, and publishes everything before it is released). The writer
 * accumulates in plain Numbers during a drain and publishes at the end of the drain; readers (metrics on the
 * main thread) take consistent snapshots. No message is posted per request.
 *
 * Layout of a block: one sequence word, then one 8-byte cell per counter holding an unsigned integer as two
 * int32 halves (low, high; exact up to 2^53: 9 PB of bytes, or 104 days of summed request latency in
 * nanoseconds). Publishing is a seqlock: the writer makes the sequence odd, stores the changed cells, makes
 * it even again; a reader retries while the sequence is odd or changed across its reads, so a snapshot
 * (a histogram with its sum) is always one publish's. Every access is an Atomics operation on an
 * Int32Array: the memory model orders Atomics among themselves, not plain accesses against them, so plain
 * float64 cells around the sequence word would be sound only on strongly ordered CPUs.
 * Why not Atomics.add on a BigInt64Array (the first version): every add allocated two BigInts, about 350 ns
 * and a few hundred bytes of garbage per drain for the worker's young-generation GC to collect.
 */
import { performance } from 'node:perf_hooks';

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
  /** Requests that rode in an earlier request's back-end operation (network images: request merging). */
  merged: 20,
  // Network back-end events (NBD connections; short reads), in BackendEvent order (backend-channel.ts), counted by whichever
  // queue of the disk polled the worker's connections when they happened.
  backendConnects: 21,
  backendConnectFailures: 22,
  backendConnectionsLost: 23,
  backendResent: 24,
  backendHandedOver: 25,
  backendTimedOut: 26,
  backendStalls: 27,
  backendProtocolErrors: 28,
  backendShortReads: 29,
  /**
   * A gauge: the worker's connections to the disk's network back-end that are not up right now, published by
   * one queue per worker (the oldest of the disk's queues there), 0 on the others.
   */
  backendConnectionsDown: 30,
} as const;
export type CounterName = keyof typeof Counter;
const SCALAR_COUNTERS = 31;

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

/** 8-byte words per queue block: the sequence word (an int32 in the first half) and the counters. */
const BLOCK_WORDS = COUNTERS_PER_QUEUE + 1;
/** Tries a reader spins for a consistent snapshot before it starts yielding its CPU between tries. */
const SPIN_TRIES = 1_000;
/**
 * How long a reader waits for a publish to end, yielding between tries, before it takes what it read: far
 * longer than a scheduler time slice, so a writer preempted in the middle of a publish runs again first.
 */
const READ_WAIT_MS = 100;
/** Each yield between tries (Atomics.wait on a cell nobody signals: a sleep that works on every thread). */
const YIELD_MS = 0.05;

export function createCounterBuffer(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(queues * BLOCK_WORDS * 8);
}

const TWO_32 = 0x1_0000_0000;

/** Cell `cell` (an 8-byte word index) of `words`: low half unsigned, plus the high half. */
function loadCell(words: Int32Array, cell: number): number {
  return (Atomics.load(words, cell * 2) >>> 0) + Atomics.load(words, cell * 2 + 1) * TWO_32;
}

/** Stores `value` into a cell that held `previous`: the high half only when it changed (rarely). */
function storeCell(words: Int32Array, cell: number, value: number, previous: number): void {
  // ToInt32 keeps the low 32 bits of the low half; loadCell reads it back unsigned.
  Atomics.store(words, cell * 2, value % TWO_32);
  const high = Math.floor(value / TWO_32);
  if (high !== Math.floor(previous / TWO_32)) Atomics.store(words, cell * 2 + 1, high);
}

/** One counter buffer as int32 words: the sequence word of a block at its first word, then its cells. */
class CounterViews {
  readonly words: Int32Array;
  /** Per queue: a sequence value a reader waited READ_WAIT_MS on in vain (its writer died), else -1. */
  private readonly abandoned: Int32Array;
  private readonly pause = new Int32Array(new SharedArrayBuffer(4));
  constructor(buffer: SharedArrayBuffer) {
    this.words = new Int32Array(buffer);
    this.abandoned = new Int32Array(this.queues).fill(-1);
  }
  get queues(): number {
    return this.words.length / 2 / BLOCK_WORDS;
  }
  /**
   * Runs `read` (given the block's first cell index) until no publish of `queue` overlapped it; returns what
   * the last run returned.
   */
  snapshot<T>(queue: number, read: (words: Int32Array, base: number) => T): T {
    const seqIndex = queue * BLOCK_WORDS * 2;
    const base = queue * BLOCK_WORDS + 1;
    let value: T | undefined;
    let deadline = 0;
    // Bounded by READ_WAIT_MS. A publish takes well under a microsecond, so spinning covers the usual overlap;
    // a writer preempted mid-publish (the sequence odd until the scheduler runs it again, milliseconds on a
    // busy host: spinning 10,000 tries returned torn histograms then) is waited for with the CPU given up.
    // A writer that died mid-publish (the sequence odd for ever) gets the last read returned, which may mix
    // two publishes, once per sequence value: `abandoned` makes later reads of that state not wait again.
    for (let tries = 0; ; tries++) {
      const before = Atomics.load(this.words, seqIndex);
      if ((before & 1) === 0) {
        value = read(this.words, base);
        if (Atomics.load(this.words, seqIndex) === before) return value;
      }
      if (tries < SPIN_TRIES) continue;
      if (before === this.abandoned[queue]) break;
      const now = performance.now();
      if (deadline === 0) deadline = now + READ_WAIT_MS;
      else if (now >= deadline) {
        this.abandoned[queue] = before;
        break;
      }
      Atomics.wait(this.pause, 0, 0, YIELD_MS);
    }
    return value ?? read(this.words, base);
  }
}

export interface LatencySnapshot {
  /** Non-cumulative counts per bucket of LATENCY_BUCKETS_SECONDS, then the +Inf bucket. */
  buckets: number[];
  count: number;
  sumSeconds: number;
}

/** Read side, used by the control plane. */
export class CounterReader {
  private readonly views: CounterViews;
  constructor(buffer: SharedArrayBuffer) {
    this.views = new CounterViews(buffer);
  }

  get queues(): number {
    return this.views.queues;
  }

  read(queue: number, name: CounterName): number {
    const index = Counter[name];
    return this.views.snapshot(queue, (words, base) => loadCell(words, base + index));
  }

  total(name: CounterName): number {
    let sum = 0;
    for (let q = 0; q < this.queues; q++) sum += this.read(q, name);
    return sum;
  }

  latency(queue: number, op: LatencyOpName): LatencySnapshot {
    const first = HISTOGRAM_BASE + LatencyOp[op] * HISTOGRAM_CELLS;
    // One snapshot for the whole histogram: its buckets, count and sum agree with each other.
    return this.views.snapshot(queue, (words, base) => {
      const buckets: number[] = [];
      let count = 0;
      for (let i = 0; i <= LATENCY_BUCKETS_SECONDS.length; i++) {
        const n = loadCell(words, base + first + i);
        buckets.push(n);
        count += n;
      }
      const sumNs = loadCell(words, base + first + LATENCY_BUCKETS_SECONDS.length + 1);
      return { buckets, count, sumSeconds: sumNs / 1e9 };
    });
  }
}

/** Write side for one queue, used by its worker. */
export class QueueCounters {
  private readonly words: Int32Array;
  /** What the cells hold: this is their only writer, so it stores without loading them first. */
  private readonly totals = new Float64Array(COUNTERS_PER_QUEUE);
  private readonly seqIndex: number;
  private readonly base: number;
  private readonly pending = new Float64Array(COUNTERS_PER_QUEUE);
  /** Indices with a pending amount, so a publish touches only those (a drain changes a handful of 96). */
  private readonly changed = new Int32Array(COUNTERS_PER_QUEUE);
  private readonly listed = new Uint8Array(COUNTERS_PER_QUEUE);
  private changedCount = 0;

  constructor(buffer: SharedArrayBuffer, queue: number) {
    this.words = new Int32Array(buffer);
    this.seqIndex = queue * BLOCK_WORDS * 2;
    this.base = queue * BLOCK_WORDS + 1;
    // A ring that moved here from another worker continues that writer's totals (it stopped first).
    for (let i = 0; i < COUNTERS_PER_QUEUE; i++) this.totals[i] = loadCell(this.words, this.base + i);
  }

  add(index: number, amount = 1): void {
    // Listed once per publish, on its first add: `changed` never holds more than COUNTERS_PER_QUEUE entries.
    if (this.listed[index] === 0) {
      this.listed[index] = 1;
      this.changed[this.changedCount++] = index;
    }
    this.pending[index] = (this.pending[index] ?? 0) + amount;
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
    const seq = Atomics.load(this.words, this.seqIndex);
    Atomics.store(this.words, this.seqIndex, seq + 1);
    storeCell(this.words, this.base + index, value, this.totals[index] ?? 0);
    this.totals[index] = value;
    Atomics.store(this.words, this.seqIndex, seq + 2);
  }

  flush(): void {
    const count = this.changedCount;
    if (count === 0) return;
    // The sequence is read from the buffer, not kept here: a ring that moved to another worker continues it.
    const seq = Atomics.load(this.words, this.seqIndex);
    Atomics.store(this.words, this.seqIndex, seq + 1);
    for (let i = 0; i < count; i++) {
      const index = this.changed[i]!;
      const previous = this.totals[index] ?? 0;
      const total = previous + (this.pending[index] ?? 0);
      this.totals[index] = total;
      storeCell(this.words, this.base + index, total, previous);
      this.pending[index] = 0;
      this.listed[index] = 0;
    }
    Atomics.store(this.words, this.seqIndex, seq + 2);
    this.changedCount = 0;
  }
}
