/**
 * Request sources for the load generator: random and sequential offsets, reads, writes and a read/write mix,
 * each queue with its own seeded PRNG so a run is reproducible for a given --seed.
 */
import { BlkRequestType } from '../../../protocol/virtio-blk.js';
import type { RequestSource } from './engine.js';
import type { LoadQueue } from './load-queue.js';

export const RW_MODES = ['randread', 'randwrite', 'read', 'write', 'randrw'] as const;
export type RwMode = (typeof RW_MODES)[number];

const TWO_POW_32 = 0x1_0000_0000;

/** xorshift32 state derived from the run's seed and the queue index (never 0). */
export function queueSeed(seed: number, queue: number): number {
  let h = (Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(queue + 1, 0xc2b2ae35)) >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  return h >>> 0 || 0x6d2b79f5;
}

/** Random block-aligned offsets in [start, start + blocks·bs). */
export class RandomSource implements RequestSource {
  private state: number;

  constructor(
    private readonly start: number,
    private readonly blocks: number,
    private readonly bs: number,
    /** Percentage of reads: 100 = randread, 0 = randwrite. */
    private readonly readPercent: number,
    seed: number,
  ) {
    if (blocks < 1) throw new RangeError('the region holds no whole block');
    this.state = seed >>> 0 || 1;
  }

  private random(): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x >>> 0;
    return this.state;
  }

  next(queue: LoadQueue, slot: number): boolean {
    let block: number;
    if (this.blocks <= TWO_POW_32) block = Math.floor((this.random() / TWO_POW_32) * this.blocks);
    else block = Math.floor(((this.random() * TWO_POW_32 + this.random()) / (TWO_POW_32 * TWO_POW_32)) * this.blocks);
    let type: number = BlkRequestType.IN;
    if (this.readPercent <= 0) type = BlkRequestType.OUT;
    else if (this.readPercent < 100 && this.random() % 100 >= this.readPercent) type = BlkRequestType.OUT;
    queue.prepare(slot, type, this.start + block * this.bs, this.bs);
    return true;
  }
}

/**
 * Consecutive blocks over [start, end): wraps around for timed runs, or stops at the end (verify passes).
 * `beforeSubmit` may fill the data buffer (verify writes the pattern there).
 */
export class SequentialSource implements RequestSource {
  private cursor: number;

  constructor(
    private readonly start: number,
    private readonly end: number,
    private readonly bs: number,
    private readonly type: number,
    private readonly wrap: boolean,
    private readonly beforeSubmit?: (queue: LoadQueue, slot: number, offset: number, bytes: number) => void,
  ) {
    if (end - start < bs) throw new RangeError('the region holds no whole block');
    this.cursor = start;
  }

  next(queue: LoadQueue, slot: number): boolean {
    if (this.cursor + this.bs > this.end) {
      if (!this.wrap) return false;
      this.cursor = this.start;
    }
    const offset = this.cursor;
    this.cursor += this.bs;
    this.beforeSubmit?.(queue, slot, offset, this.bs);
    queue.prepare(slot, this.type, offset, this.bs);
    return true;
  }
}

/** Emits `count` requests of one kind without data (FLUSH), then stops. */
export class FixedSource implements RequestSource {
  constructor(
    private count: number,
    private readonly type: number,
  ) {}

  next(queue: LoadQueue, slot: number): boolean {
    if (this.count <= 0) return false;
    this.count--;
    queue.prepare(slot, this.type, 0, 0);
    return true;
  }
}

/** Splits [0, size) into `parts` contiguous, bs-aligned ranges (the last one takes the remainder). */
export function splitRegion(size: number, bs: number, parts: number): Array<{ start: number; end: number }> {
  const blocks = Math.floor(size / bs);
  const per = Math.floor(blocks / parts);
  const ranges: Array<{ start: number; end: number }> = [];
  for (let i = 0; i < parts; i++) {
    const start = i * per * bs;
    const end = i === parts - 1 ? blocks * bs : (i + 1) * per * bs;
    ranges.push({ start, end });
  }
  return ranges;
}

/** The sources of a timed run, one per queue. */
export function timedSources(rw: RwMode, size: number, bs: number, queues: number, seed: number, rwmixread: number): RequestSource[] {
  const sources: RequestSource[] = [];
  const ranges = splitRegion(size, bs, queues);
  for (let q = 0; q < queues; q++) {
    const range = ranges[q] as { start: number; end: number };
    switch (rw) {
      case 'randread':
        sources.push(new RandomSource(0, Math.floor(size / bs), bs, 100, queueSeed(seed, q)));
        break;
      case 'randwrite':
        sources.push(new RandomSource(0, Math.floor(size / bs), bs, 0, queueSeed(seed, q)));
        break;
      case 'randrw':
        sources.push(new RandomSource(0, Math.floor(size / bs), bs, rwmixread, queueSeed(seed, q)));
        break;
      case 'read':
        sources.push(new SequentialSource(range.start, range.end, bs, BlkRequestType.IN, true));
        break;
      case 'write':
        sources.push(new SequentialSource(range.start, range.end, bs, BlkRequestType.OUT, true));
        break;
    }
  }
  return sources;
}
