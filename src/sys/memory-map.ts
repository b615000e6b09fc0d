import {
  sys,
  MAP_ANONYMOUS,
  MAP_FIXED,
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  PROT_READ,
  PROT_WRITE,
  MFD_CLOEXEC,
  MFD_ALLOW_SEALING,
} from './libc.js';
import { check, lastErrno, SyscallError } from './errors.js';

/** Maps `length` bytes of `fd` at `offset` read-write and shared; returns the address as a Number. */
export function mapShared(fd: number, length: number, offset: number): number {
  const address = sys.mmap(0, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  if (typeof address !== 'number') throw new SyscallError('mmap', lastErrno(), `fd ${fd}, ${length} bytes at offset ${offset}`);
  return address;
}

export function unmap(address: number, length: number): void {
  check(sys.munmap(address, length), 'munmap');
}

let quarantined = 0;

/**
 * Instead of unmapping memory that a request left in flight may still write (a storage library finishing a
 * read late): replaces the mapping in place with private anonymous memory, reserved lazily. MAP_FIXED swaps
 * it without a moment where the addresses are free, so nothing else can be mapped there (a late write would
 * land in it); what was mapped (guest RAM) is released at once, and only the pages a late write touches
 * cost memory. The addresses are never given back: their total is kept for the metrics.
 */
export function quarantine(address: number, length: number): void {
  const result = sys.mmap(address, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
  if (result !== address) throw new SyscallError('mmap', lastErrno(), `MAP_FIXED over ${length} bytes at 0x${address.toString(16)}`);
  quarantined += length;
}

/** Bytes of mappings quarantined in this process so far (see quarantine). */
export function quarantinedBytes(): number {
  return quarantined;
}

export function createMemfd(name: string, size: number): number {
  // Sealable like QEMU's memory-backend-memfd: a back-end may seal it against shrinking.
  const fd = check(sys.memfdCreate(name, MFD_CLOEXEC | MFD_ALLOW_SEALING), 'memfd_create');
  check(sys.ftruncate(fd, size), 'ftruncate', `memfd ${name}`);
  return fd;
}
