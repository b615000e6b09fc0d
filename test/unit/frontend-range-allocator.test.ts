import { describe, it, expect } from 'vitest';
import { RangeAllocator, AllocatorMisuseError } from '../../bench/src/frontend/range-allocator.js';

const GiB = 1024 ** 3;

describe('RangeAllocator', () => {
  it('hands out aligned, non-overlapping ranges first-fit', () => {
    const allocator = new RangeAllocator(0x1000, 0x10000);
    const a = allocator.alloc(100, { align: 64 }) as number;
    const b = allocator.alloc(100, { align: 64 }) as number;
    expect(a).toBe(0x1000);
    expect(b).toBe(0x1080);
    expect(allocator.freeBytes).toBe(0x10000 - 200);
    expect(allocator.allocatedCount).toBe(2);
  });

  it('reuses and merges freed ranges', () => {
    const allocator = new RangeAllocator(0, 4096);
    const a = allocator.alloc(1024) as number;
    const b = allocator.alloc(1024) as number;
    const c = allocator.alloc(1024) as number;
    allocator.release(b);
    expect(allocator.alloc(1024)).toBe(b);
    allocator.release(a);
    allocator.release(b);
    allocator.release(c);
    expect(allocator.freeBytes).toBe(4096);
    // Fully merged: one allocation of everything fits again.
    expect(allocator.alloc(4096)).toBe(0);
  });

  it('returns null when nothing fits, and the size must be positive', () => {
    const allocator = new RangeAllocator(0, 100);
    expect(allocator.alloc(101)).toBeNull();
    expect(() => allocator.alloc(0)).toThrow(AllocatorMisuseError);
  });

  it('places buffers flush against the end of the range with fromEnd', () => {
    const allocator = new RangeAllocator(4 * GiB, 6 * GiB);
    const gpa = allocator.alloc(4096, { fromEnd: true, align: 1 }) as number;
    expect(gpa + 4096).toBe(10 * GiB);
    const below = allocator.alloc(100, { fromEnd: true, align: 512 }) as number;
    expect(below % 512).toBe(0);
    expect(below + 100).toBeLessThanOrEqual(gpa);
  });

  it('respects minAddress beyond 2^32 without 32-bit truncation', () => {
    const allocator = new RangeAllocator(0, 6 * GiB);
    const gpa = allocator.alloc(8192, { minAddress: 5 * GiB + 3, align: 4096 }) as number;
    expect(gpa).toBe(5 * GiB + 4096);
    expect(allocator.alloc(8192, { minAddress: 6 * GiB })).toBeNull();
  });

  it('catches double frees and foreign addresses', () => {
    const allocator = new RangeAllocator(0, 4096);
    const a = allocator.alloc(16) as number;
    allocator.release(a);
    expect(() => allocator.release(a)).toThrow(/double free/);
    expect(() => allocator.release(1234)).toThrow(AllocatorMisuseError);
  });

  it('rejects alignments that are not powers of two', () => {
    const allocator = new RangeAllocator(0, 4096);
    expect(() => allocator.alloc(16, { align: 3 })).toThrow(/power of two/);
  });

  it('reset() forgets everything', () => {
    const allocator = new RangeAllocator(0, 4096);
    allocator.alloc(4096);
    allocator.reset();
    expect(allocator.alloc(4096)).toBe(0);
  });
});
