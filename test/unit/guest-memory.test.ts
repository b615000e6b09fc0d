/** GuestMemory's allocation-free accessors (request headers, status bytes) across region boundaries. */
import { describe, expect, it } from 'vitest';
import { GuestMemory } from '../../src/dataplane/guest-memory.js';
import { addressOf } from '../../src/sys/libc.js';

/** Two regions adjacent in guest-physical space (0x1000..0x2000 and 0x2000..0x3000), and one far above. */
function threeRegions() {
  const low = Buffer.alloc(0x1000);
  const mid = Buffer.alloc(0x1000);
  const high = Buffer.alloc(0x1000);
  const memory = new GuestMemory([
    { guestPhysAddr: 0x1000, size: 0x1000, userAddr: 0x7f00_0000_0000, hostAddr: addressOf(low) },
    { guestPhysAddr: 0x2000, size: 0x1000, userAddr: 0x7f00_1000_0000, hostAddr: addressOf(mid) },
    { guestPhysAddr: 0x10_0000, size: 0x1000, userAddr: 0x7f00_2000_0000, hostAddr: addressOf(high) },
  ]);
  return { memory, low, mid, high };
}

describe('GuestMemory.readInto', () => {
  it('copies a header inside one region to the requested offset of the target', () => {
    const { memory, mid } = threeRegions();
    for (let i = 0; i < 16; i++) mid[0x100 + i] = i + 1;
    const target = new Uint8Array(20);
    expect(memory.readInto(0x2100, target, 4, 16)).toBe(true);
    expect([...target]).toEqual([0, 0, 0, 0, ...Array.from({ length: 16 }, (_, i) => i + 1)]);
  });

  it('copies bytes that straddle two adjacent regions', () => {
    const { memory, low, mid } = threeRegions();
    low.fill(0xaa, 0xff8);
    mid.fill(0xbb, 0, 8);
    const target = new Uint8Array(16);
    expect(memory.readInto(0x1ff8, target, 0, 16)).toBe(true);
    expect([...target]).toEqual([...Array<number>(8).fill(0xaa), ...Array<number>(8).fill(0xbb)]);
  });

  it('refuses bytes that run past the mapped memory, and a gap between regions', () => {
    const { memory } = threeRegions();
    const target = new Uint8Array(16);
    expect(memory.readInto(0x2ff8, target, 0, 16)).toBe(false);
    expect(memory.readInto(0x0ff8, target, 0, 16)).toBe(false);
    expect(memory.readInto(0x5000, target, 0, 1)).toBe(false);
  });

  it('takes the copying path for a long read, with the same result', () => {
    const { memory, low, mid } = threeRegions();
    low.fill(1, 0xf00);
    mid.fill(2, 0, 0x100);
    const target = new Uint8Array(0x200);
    expect(memory.readInto(0x1f00, target, 0, 0x200)).toBe(true);
    expect(target[0xff]).toBe(1);
    expect(target[0x100]).toBe(2);
  });
});

describe('GuestMemory.writeU8', () => {
  it('writes to whichever region holds the address, alternating between regions', () => {
    const { memory, low, mid, high } = threeRegions();
    // Alternating regions exercises the last-region shortcut in both directions.
    expect(memory.writeU8(0x1001, 1)).toBe(true);
    expect(memory.writeU8(0x10_0002, 2)).toBe(true);
    expect(memory.writeU8(0x1003, 3)).toBe(true);
    expect(memory.writeU8(0x2fff, 4)).toBe(true);
    expect(memory.writeU8(0x1fff, 5)).toBe(true);
    expect([low[1], high[2], low[3], mid[0xfff], low[0xfff]]).toEqual([1, 2, 3, 4, 5]);
  });

  it('refuses an address outside every region right after a hit', () => {
    const { memory } = threeRegions();
    expect(memory.writeU8(0x2fff, 1)).toBe(true);
    expect(memory.writeU8(0x3000, 1)).toBe(false);
    expect(memory.writeU8(0xfff, 1)).toBe(false);
    expect(memory.slice(0x3000, 1)).toBeNull();
  });
});
