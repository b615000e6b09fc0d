/** Test fixture: a GuestMemory over a Node Buffer (real memory, real host addresses, no mmap needed). */
import { GuestMemory } from '../../src/dataplane/guest-memory.js';
import { addressOf } from '../../src/sys/libc.js';

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
