// The shared iovec module: collecting host pieces, skipping after a short transfer, zero-filling a short
// read's tail, and the alignment check O_DIRECT relies on.
import { describe, expect, it } from 'vitest';
import { IOV_MAX, IovecPool, SECTOR_SIZE, skipIovecs, zeroFillTail } from '../../src/dataplane/iovec.js';
import { memoryFixture } from './guest-memory-fixture.js';

function entries(pool: IovecPool, n: number, count: number): [number, number][] {
  const base = pool.base(n);
  return Array.from({ length: count }, (_, i) => [
    (pool.words[base + i * 4] ?? 0) + (pool.words[base + i * 4 + 1] ?? 0) * 0x1_0000_0000,
    pool.words[base + i * 4 + 2] ?? 0,
  ]);
}

describe('iovec module', () => {
  it('defines SECTOR_SIZE and IOV_MAX once, as Linux and virtio do', () => {
    expect(SECTOR_SIZE).toBe(512);
    expect(IOV_MAX).toBe(1024);
  });

  it('fills an array with host pieces and reports a request that needs more entries than it holds', () => {
    const fx = memoryFixture(1 << 16);
    const pool = new IovecPool(2, 2);
    const host = (offset: number): number => fx.memory.translate(fx.gpa(offset), 1);
    expect(pool.fill(1, fx.memory, [fx.gpa(0), fx.gpa(4096)], [512, 1024], 2)).toBe(2);
    expect(entries(pool, 1, 2)).toEqual([
      [host(0), 512],
      [host(4096), 1024],
    ]);
    expect(pool.fill(0, fx.memory, [fx.gpa(0), fx.gpa(1024), fx.gpa(2048)], [8, 8, 8], 3)).toBe(3);
  });

  it('skips past a short transfer, trimming the entry it stops in', () => {
    const pool = new IovecPool(1, 4);
    pool.setSingle(0, 0x1_0000_0000 - 100, 300);
    const words = pool.words;
    words[4] = 5000;
    words[5] = 0;
    words[6] = 200;
    expect(skipIovecs(words, 0, 0, 150)).toBe(0);
    expect(entries(pool, 0, 1)).toEqual([[0x1_0000_0000 + 50, 150]]);
    expect(pool.skip(0, 0, 150)).toBe(1);
    expect(pool.skip(0, 1, 50)).toBe(1);
    expect(entries(pool, 0, 2)[1]).toEqual([5050, 150]);
  });

  it('zero-fills the tail of a short read across segments', () => {
    const fx = memoryFixture(1 << 16);
    fx.bytes.fill(0xaa);
    zeroFillTail(fx.memory, [fx.gpa(0), fx.gpa(1000)], [100, 100], 0, 2, 150);
    expect(fx.bytes.subarray(0, 100).every((b) => b === 0xaa)).toBe(true);
    expect(fx.bytes.subarray(1000, 1050).every((b) => b === 0xaa)).toBe(true);
    expect(fx.bytes.subarray(1050, 1100).every((b) => b === 0)).toBe(true);
    expect(fx.bytes[1100]).toBe(0xaa);
  });

  it('checks the alignment of every address and length', () => {
    const pool = new IovecPool(1, 2);
    pool.setSingle(0, 8192, 4096);
    expect(pool.aligned(0, 1, 4096)).toBe(true);
    expect(pool.aligned(0, 1, 1)).toBe(true);
    pool.setSingle(0, 8192 + 512, 4096);
    expect(pool.aligned(0, 1, 4096)).toBe(false);
    expect(pool.aligned(0, 1, 512)).toBe(true);
    pool.setSingle(0, 8192, 1000);
    expect(pool.aligned(0, 1, 512)).toBe(false);
  });
});
