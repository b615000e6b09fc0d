import { sys, MAP_SHARED, PROT_READ, PROT_WRITE, MFD_CLOEXEC, MFD_ALLOW_SEALING } from './libc.js';
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

export function createMemfd(name: string, size: number): number {
  // Sealable like QEMU's memory-backend-memfd: a back-end may seal it against shrinking.
  const fd = check(sys.memfdCreate(name, MFD_CLOEXEC | MFD_ALLOW_SEALING), 'memfd_create');
  check(sys.ftruncate(fd, size), 'ftruncate', `memfd ${name}`);
  return fd;
}
