/**
 * First-fit allocator over one address range [base, base + size): guest buffers come and go with requests,
 * so a bump pointer alone would leak under a load generator. Pure arithmetic on Numbers (exact up to 2^53,
 * far beyond any guest-physical address a test uses); no bit operations, which would truncate at 2^32.
 */

export interface AllocOptions {
  /** Power of two; the returned address is a multiple of it. Default 8. */
  align?: number;
  /** Lowest acceptable start address (e.g. 4 GiB to test 64-bit offsets). */
  minAddress?: number;
  /** Take the highest fitting range instead of the lowest, e.g. a buffer that ends exactly at a region's end. */
  fromEnd?: boolean;
}

interface FreeRange {
  start: number;
  end: number;
}

export class AllocatorMisuseError extends Error {
  constructor(detail: string) {
    super(`range allocator: ${detail}`);
    this.name = 'AllocatorMisuseError';
  }
}

function alignUp(value: number, align: number): number {
  return Math.ceil(value / align) * align;
}

function alignDown(value: number, align: number): number {
  return Math.floor(value / align) * align;
}

export class RangeAllocator {
  /** Sorted, non-overlapping, non-adjacent (adjacent ranges are merged on free). */
  private free: FreeRange[];
  private readonly allocations = new Map<number, number>();

  constructor(
    readonly base: number,
    readonly size: number,
  ) {
    if (!Number.isSafeInteger(base) || !Number.isSafeInteger(size) || base < 0 || size <= 0 || !Number.isSafeInteger(base + size)) {
      throw new AllocatorMisuseError(`invalid range base ${base} size ${size}`);
    }
    this.free = [{ start: base, end: base + size }];
  }

  get end(): number {
    return this.base + this.size;
  }

  get freeBytes(): number {
    return this.free.reduce((sum, range) => sum + range.end - range.start, 0);
  }

  get allocatedCount(): number {
    return this.allocations.size;
  }

  /** Returns the start address, or null if no free range fits. */
  alloc(size: number, options: AllocOptions = {}): number | null {
    const align = options.align ?? 8;
    if (!Number.isSafeInteger(size) || size <= 0) throw new AllocatorMisuseError(`cannot allocate ${size} bytes`);
    if (!Number.isSafeInteger(align) || align <= 0 || (align & (align - 1)) !== 0 || align > 2 ** 30) {
      throw new AllocatorMisuseError(`alignment ${align} is not a power of two up to 1 GiB`);
    }
    const minAddress = options.minAddress ?? this.base;
    const order = options.fromEnd ? [...this.free.keys()].reverse() : [...this.free.keys()];
    for (const i of order) {
      const range = this.free[i];
      if (range === undefined) continue;
      const lowest = Math.max(range.start, minAddress);
      const start = options.fromEnd ? alignDown(range.end - size, align) : alignUp(lowest, align);
      if (start < lowest || start + size > range.end) continue;
      this.carve(i, start, start + size);
      this.allocations.set(start, size);
      return start;
    }
    return null;
  }

  /** Returns a range obtained from alloc(); its size is remembered, so double frees are caught. */
  release(address: number): void {
    const size = this.allocations.get(address);
    if (size === undefined) throw new AllocatorMisuseError(`0x${address.toString(16)} is not an allocated address (double free?)`);
    this.allocations.delete(address);
    this.insertFree(address, address + size);
  }

  /** Forgets every allocation. */
  reset(): void {
    this.allocations.clear();
    this.free = [{ start: this.base, end: this.end }];
  }

  private carve(index: number, start: number, end: number): void {
    const range = this.free[index];
    if (range === undefined) return;
    const pieces: FreeRange[] = [];
    if (range.start < start) pieces.push({ start: range.start, end: start });
    if (end < range.end) pieces.push({ start: end, end: range.end });
    this.free.splice(index, 1, ...pieces);
  }

  private insertFree(start: number, end: number): void {
    let i = 0;
    while (i < this.free.length && (this.free[i]?.start ?? Infinity) < start) i++;
    this.free.splice(i, 0, { start, end });
    // Merge with the right neighbour, then the left one.
    const next = this.free[i + 1];
    const current = this.free[i];
    if (current && next && current.end === next.start) {
      current.end = next.end;
      this.free.splice(i + 1, 1);
    }
    const previous = this.free[i - 1];
    if (previous && current && previous.end === current.start) {
      previous.end = current.end;
      this.free.splice(i, 1);
    }
  }
}
