import { describe, it, expect } from 'vitest';
import { GuestMemory, WINDOW_BYTES } from '../../bench/src/frontend/guest-memory.js';
import { GuestMemoryError, OutOfGuestMemoryError, FrontendClosedError } from '../../bench/src/frontend/errors.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

describe('GuestMemory', () => {
  it('maps a 6 GiB sparse memfd and reads/writes above 4 GiB and across windows', () => {
    const memory = GuestMemory.create([
      { gpa: 0, size: 16 * MiB },
      { gpa: 4 * GiB, size: 6 * GiB },
    ]);
    try {
      const high = 4 * GiB + 5 * GiB + 123;
      memory.write(high, Buffer.from('above four gigabytes'));
      expect(memory.read(high, 20).toString()).toBe('above four gigabytes');
      // A write straddling a window boundary goes through two windows.
      const straddle = 4 * GiB + WINDOW_BYTES - 3;
      memory.write(straddle, Buffer.from([1, 2, 3, 4, 5, 6]));
      expect([...memory.read(straddle, 6)]).toEqual([1, 2, 3, 4, 5, 6]);
      expect([...memory.view(straddle, 6)]).toEqual([1, 2, 3, 4, 5, 6]);
      // The very last byte of the region.
      memory.write(10 * GiB - 1, Buffer.from([0x5a]));
      expect(memory.read(10 * GiB - 1, 1)[0]).toBe(0x5a);
      expect(() => memory.read(10 * GiB - 1, 2)).toThrow(GuestMemoryError);
      expect(() => memory.read(16 * MiB, 1)).toThrow(GuestMemoryError);
      expect(memory.toUserAddr(4 * GiB + 10)).toBe(BigInt(memory.regions[1]?.hostAddress ?? 0) + 10n);
      expect(memory.wireRegions()[1]).toMatchObject({ guestPhysAddr: BigInt(4 * GiB), memorySize: BigInt(6 * GiB), mmapOffset: 0n });
    } finally {
      memory.close();
    }
  });

  it('allocates per region, above a floor, or flush against the end', () => {
    const memory = GuestMemory.create([
      { gpa: 0, size: MiB },
      { gpa: 8 * GiB, size: 6 * GiB },
    ]);
    try {
      expect(memory.alloc(4096)).toBe(0);
      const tail = memory.alloc(4096, { region: 1, fromEnd: true, align: 1 });
      expect(tail + 4096).toBe(14 * GiB);
      expect(memory.alloc(64, { minAddress: 13 * GiB })).toBe(13 * GiB);
      expect(() => memory.alloc(2 * MiB, { region: 0 })).toThrow(OutOfGuestMemoryError);
      memory.free(tail);
      expect(() => memory.free(tail)).toThrow(/double free/);
    } finally {
      memory.close();
    }
  });

  it('honours fdOffset and rejects overlapping regions', () => {
    expect(() =>
      GuestMemory.create([
        { gpa: 0, size: 2 * MiB },
        { gpa: MiB, size: MiB },
      ]),
    ).toThrow(/overlap/);
    const memory = GuestMemory.create([{ gpa: 0x100000, size: MiB, fdOffset: 64 * 1024 }]);
    expect(memory.wireRegions()[0]?.mmapOffset).toBe(65536n);
    memory.close();
    expect(() => memory.read(0x100000, 1)).toThrow(FrontendClosedError);
  });
});
