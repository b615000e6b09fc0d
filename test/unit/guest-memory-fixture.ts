/** Test fixture: a GuestMemory over a Node Buffer (real memory, real host addresses, no mmap needed). */
import { GuestMemory } from '../../src/dataplane/guest-memory.js';
import { addressOf } from '../../src/sys/libc.js';
import type { DeviceLimits } from '../../src/dataplane/device-limits.js';

export const GUEST_BASE = 0x10_0000;

export interface MemoryFixture {
  memory: GuestMemory;
  bytes: Buffer;
  view: DataView;
  /** Guest address of byte `offset` of the buffer. */
  gpa(offset: number): number;
}

export function memoryFixture(size = 1 << 20): MemoryFixture {
  const bytes = Buffer.alloc(size);
  const memory = new GuestMemory([{ guestPhysAddr: GUEST_BASE, size, userAddr: 0x7f00_0000_0000, hostAddr: addressOf(bytes) }]);
  return { memory, bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.length), gpa: (offset) => GUEST_BASE + offset };
}

/** Device limits for engine tests: 1 MiB requests of up to 16 segments, 4 discard / write-zeroes ranges. */
export const ENGINE_TEST_LIMITS: DeviceLimits = {
  sizeMax: 1 << 20,
  segMax: 16,
  logicalBlockSize: 512,
  readOnly: false,
  serial: new Uint8Array(20),
  maxDiscardSectors: 0x3fffff,
  maxDiscardSeg: 4,
  maxWriteZeroesSectors: 0x3fffff,
  maxWriteZeroesSeg: 4,
};
