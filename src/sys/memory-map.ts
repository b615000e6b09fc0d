import { sys, MAP_SHARED, PROT_READ, PROT_WRITE, MFD_CLOEXEC } from './libc.js';
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
  const fd = check(sys.memfdCreate(name, MFD_CLOEXEC), 'memfd_create');
  check(sys.ftruncate(fd, size), 'ftruncate', `memfd ${name}`);
  return fd;
}
