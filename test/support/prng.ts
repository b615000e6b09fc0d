/** mulberry32: a tiny seeded PRNG, so a failing fuzz run can be replayed from its seed. */
export class Prng {
  private state: number;

  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }

  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    return this.u32() / 0x1_0000_0000;
  }

  /** Uniform integer in [min, max] (inclusive). */
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('pick from an empty list');
    return items[Math.floor(this.next() * items.length)] as T;
  }

  /** Picks by weight: [[weight, value], ...]. */
  weighted<T>(table: ReadonlyArray<readonly [number, T]>): T {
    let total = 0;
    for (const [w] of table) total += w;
    let r = this.next() * total;
    for (const [w, value] of table) {
      r -= w;
      if (r < 0) return value;
    }
    return (table[table.length - 1] as readonly [number, T])[1];
  }

  /** Fills `bytes` with pseudo-random data (4 bytes per step; the byte order follows the host's). */
  fill(bytes: Uint8Array): void {
    let i = 0;
    if (bytes.byteOffset % 4 === 0) {
      const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
      for (let w = 0; w < words.length; w++) words[w] = this.u32();
      i = words.length * 4;
    }
    for (; i < bytes.length; i++) bytes[i] = this.u32() & 0xff;
  }
}

/** A seed from the environment (decimal or 0x hex) or a fresh random one. */
export function seedFromEnv(name: string): number {
  const text = process.env[name];
  if (text !== undefined && text !== '') {
    const value = Number(text);
    if (!Number.isInteger(value) || value < 0 || value > 0xffff_ffff) throw new Error(`${name}=${text} is not a 32-bit unsigned integer`);
    return value;
  }
  return Math.floor(Math.random() * 0x1_0000_0000) >>> 0;
}
