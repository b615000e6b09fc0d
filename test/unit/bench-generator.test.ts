// The load generator's pure parts: latency histogram, request sources, ring planning, verify block size.
import { describe, expect, it } from 'vitest';
import { LatencyHistogram, HISTOGRAM_BUCKETS, bucketHigh, bucketLow, bucketOf } from '../../bench/src/loadgen/latency-histogram.js';
import { RandomSource, SequentialSource, FixedSource, splitRegion, queueSeed, timedSources } from '../../bench/src/loadgen/workload.js';
import { chooseVerifyBs, ringPlan } from '../../bench/src/loadgen/bench.js';
import { median } from '../../bench/src/loadgen/compare.js';
import { BlkRequestType } from '../../protocol/virtio-blk.js';
import type { LoadQueue } from '../../bench/src/loadgen/load-queue.js';

interface Prepared {
  slot: number;
  type: number;
  offset: number;
  bytes: number;
}

/** Stands in for a LoadQueue: sources only call prepare(). */
function recorder(): { queue: LoadQueue; prepared: Prepared[] } {
  const prepared: Prepared[] = [];
  const queue = { prepare: (slot: number, type: number, offset: number, bytes: number) => prepared.push({ slot, type, offset, bytes }) };
  return { queue: queue as unknown as LoadQueue, prepared };
}

describe('latency histogram', () => {
  it('buckets are contiguous, ordered and at most ~3 % wide', () => {
    for (let b = 0; b < HISTOGRAM_BUCKETS - 1; b++) {
      expect(bucketHigh(b)).toBe(bucketLow(b + 1));
      if (bucketLow(b) >= 64) expect((bucketHigh(b) - bucketLow(b)) / bucketLow(b)).toBeLessThanOrEqual(1 / 32 + 1e-12);
    }
    for (const v of [0, 1, 63, 64, 65, 1000, 12_345, 999_999, 2 ** 31, 2 ** 32 - 1]) {
      const b = bucketOf(v);
      expect(bucketLow(b)).toBeLessThanOrEqual(v);
      expect(v).toBeLessThan(bucketHigh(b));
    }
    expect(bucketOf(-5)).toBe(0);
    expect(bucketOf(1e12)).toBe(HISTOGRAM_BUCKETS - 1);
  });

  it('percentiles of a known distribution are within the bucket width', () => {
    const h = new LatencyHistogram();
    for (let us = 1; us <= 10_000; us++) h.record(us * 1000);
    expect(h.count).toBe(10_000);
    expect(h.quantile(0.5) / 5_000_000).toBeCloseTo(1, 1);
    expect(Math.abs(h.quantile(0.99) / 9_900_000 - 1)).toBeLessThan(0.03);
    expect(Math.abs(h.quantile(0.999) / 9_990_000 - 1)).toBeLessThan(0.03);
    expect(h.quantile(1)).toBeLessThanOrEqual(h.maxNanos);
    expect(h.meanNanos).toBeCloseTo(5_000_500, -1);
    expect(h.minNanos).toBe(1000);
  });

  it('merges per-queue histograms and records batches', () => {
    const a = new LatencyHistogram();
    const b = new LatencyHistogram();
    a.recordMany(10_000, 99);
    b.record(1_000_000);
    a.add(b);
    expect(a.count).toBe(100);
    expect(a.quantile(0.5)).toBeLessThan(11_000);
    expect(a.quantile(1)).toBe(1_000_000);
    expect(new LatencyHistogram().quantile(0.5)).toBeNaN();
  });
});

describe('request sources', () => {
  it('random offsets are block-aligned, inside the region, reproducible per seed and differ per queue', () => {
    const run = (seed: number): number[] => {
      const { queue, prepared } = recorder();
      const source = new RandomSource(0, 1000, 4096, 100, seed);
      for (let i = 0; i < 5000; i++) source.next(queue, i % 32);
      return prepared.map((p) => p.offset);
    };
    const offsets = run(queueSeed(1, 0));
    expect(offsets.every((o) => o % 4096 === 0 && o >= 0 && o < 1000 * 4096)).toBe(true);
    expect(new Set(offsets).size).toBeGreaterThan(900);
    expect(run(queueSeed(1, 0))).toEqual(offsets);
    expect(run(queueSeed(1, 1))).not.toEqual(offsets);
    expect(queueSeed(0, 0)).not.toBe(0);
  });

  it('mixes reads and writes by rwmixread', () => {
    const { queue, prepared } = recorder();
    const source = new RandomSource(0, 1 << 20, 4096, 70, 12345);
    for (let i = 0; i < 20_000; i++) source.next(queue, 0);
    const reads = prepared.filter((p) => p.type === BlkRequestType.IN).length / prepared.length;
    expect(reads).toBeGreaterThan(0.67);
    expect(reads).toBeLessThan(0.73);
    expect(prepared.every((p) => p.type === BlkRequestType.IN || p.type === BlkRequestType.OUT)).toBe(true);
  });

  it('sequential sources walk their range and wrap (timed) or stop (verify)', () => {
    const { queue, prepared } = recorder();
    const wrapping = new SequentialSource(8192, 8192 + 3 * 4096, 4096, BlkRequestType.IN, true);
    for (let i = 0; i < 5; i++) expect(wrapping.next(queue, i)).toBe(true);
    expect(prepared.map((p) => p.offset)).toEqual([8192, 12288, 16384, 8192, 12288]);
    const filled: number[] = [];
    const once = new SequentialSource(0, 2 * 4096, 4096, BlkRequestType.OUT, false, (_q, _slot, offset) => filled.push(offset));
    expect([once.next(queue, 0), once.next(queue, 1), once.next(queue, 2)]).toEqual([true, true, false]);
    expect(filled).toEqual([0, 4096]);
    const flush = new FixedSource(1, BlkRequestType.FLUSH);
    expect([flush.next(queue, 0), flush.next(queue, 0)]).toEqual([true, false]);
  });

  it('splits a region into aligned, disjoint, covering ranges', () => {
    const ranges = splitRegion(10 * 4096 + 100, 4096, 3);
    expect(ranges).toEqual([
      { start: 0, end: 3 * 4096 },
      { start: 3 * 4096, end: 6 * 4096 },
      { start: 6 * 4096, end: 10 * 4096 },
    ]);
    expect(timedSources('read', 1 << 20, 4096, 2, 1, 50)).toHaveLength(2);
  });
});

describe('ring planning and verify block size', () => {
  it('uses direct 3-descriptor chains while they fit, indirect beyond', () => {
    expect(ringPlan(1, null, false)).toEqual({ queueSize: 128, indirect: false });
    expect(ringPlan(32, null, false)).toEqual({ queueSize: 128, indirect: false });
    expect(ringPlan(64, null, false)).toEqual({ queueSize: 256, indirect: false });
    expect(ringPlan(341, null, false)).toEqual({ queueSize: 1024, indirect: false });
    expect(ringPlan(512, null, false)).toEqual({ queueSize: 512, indirect: true });
    expect(ringPlan(32, null, true)).toEqual({ queueSize: 128, indirect: true });
    expect(() => ringPlan(64, 128, false)).not.toThrow();
    expect(ringPlan(64, 128, false).indirect).toBe(true);
    expect(() => ringPlan(300, 256, true)).toThrow(/needs 300 descriptors/);
  });

  it('reads back with another block size that divides the region', () => {
    expect(chooseVerifyBs(4096, 8 << 20)).toBe(8192);
    expect(chooseVerifyBs(128 * 1024, 8 << 20)).toBe(256 * 1024);
    expect(chooseVerifyBs(4096, 3 * 4096)).toBe(2048);
    expect(chooseVerifyBs(512, 512)).toBe(512);
    // Never above the device's size_max: 1 MiB writes are read back in 4 KiB pieces rather than 2 MiB ones.
    expect(chooseVerifyBs(1 << 20, 16 << 20, 1 << 20)).toBe(4096);
  });

  it('median of rounds', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
    expect(median([NaN, 5])).toBe(5);
    expect(median([])).toBeNaN();
  });
});
